//! The key layout and the value encodings of [`EtcdStore`](super::EtcdStore).
//!
//! Under the store's prefix `P` (which ends with `/`):
//!
//! | key | value |
//! | --- | --- |
//! | `P` `r/` router | router state: `live`, `fenced <incarnation>`, `deleted <incarnation>` |
//! | `P` `r/` router `/s/` session | the session record ([`Record`]) |
//! | `P` `s/` session | the router the session lives on (8 bytes, big-endian) |
//!
//! Ids are 16 lowercase hex digits, so keys sort as the ids do. A live
//! router's incarnation is the revision that made it live (its key's
//! `mod_revision`): etcd revisions only grow, so a router registered again
//! after its deletion always gets a larger incarnation.

use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::CloseReason;
use crate::store::RouterStatus;

use super::EtcdPayload;

/// The keys of one store, all under its prefix.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    prefix: String,
}

/// What a key of the store names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeyKind {
    Router(RouterId),
    Record(RouterId, SessionId),
    Pointer(SessionId),
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The router state key.
    pub(super) fn router(&self, router: RouterId) -> Vec<u8> {
        format!("{}r/{:016x}", self.prefix, router.get()).into_bytes()
    }

    /// The prefix every record of the router starts with.
    pub(super) fn records(&self, router: RouterId) -> Vec<u8> {
        format!("{}r/{:016x}/s/", self.prefix, router.get()).into_bytes()
    }

    /// The session's record, under its router.
    pub(super) fn record(&self, router: RouterId, session: SessionId) -> Vec<u8> {
        format!(
            "{}r/{:016x}/s/{:016x}",
            self.prefix,
            router.get(),
            session.get()
        )
        .into_bytes()
    }

    /// The session's pointer to its router.
    pub(super) fn pointer(&self, session: SessionId) -> Vec<u8> {
        format!("{}s/{:016x}", self.prefix, session.get()).into_bytes()
    }

    /// The prefix of every router state key and record.
    pub(super) fn all_routers(&self) -> Vec<u8> {
        format!("{}r/", self.prefix).into_bytes()
    }

    /// The prefix of every pointer.
    pub(super) fn all_pointers(&self) -> Vec<u8> {
        format!("{}s/", self.prefix).into_bytes()
    }

    /// What `key` names, if it is one of this store's keys.
    pub(super) fn parse(&self, key: &[u8]) -> Option<KeyKind> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        if let Some(rest) = rest.strip_prefix(b"r/") {
            let router = RouterId::new(hex(rest.get(..16)?)?);
            return match rest.get(16..)? {
                [] => Some(KeyKind::Router(router)),
                tail => {
                    let session = tail.strip_prefix(b"/s/")?;
                    (session.len() == 16)
                        .then(|| hex(session))
                        .flatten()
                        .map(|id| KeyKind::Record(router, SessionId::new(id)))
                }
            };
        }
        let session = rest.strip_prefix(b"s/")?;
        (session.len() == 16)
            .then(|| hex(session))
            .flatten()
            .map(|id| KeyKind::Pointer(SessionId::new(id)))
    }
}

/// The id written as exactly 16 lowercase hex digits, as this store writes
/// it; anything else (a sign, upper case) is not this store's key.
fn hex(digits: &[u8]) -> Option<u64> {
    if digits.len() != 16
        || !digits
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 16).ok()
}

/// Whether `prefix` ends like a router's range of a store one level up
/// (`…r/<16 lowercase hex digits>/`): a store there would write its
/// pointers in that store's record format.
pub(super) fn nests_in_a_router_range(prefix: &str) -> bool {
    // As `Keys::new` reads it: a missing final `/` is added.
    let head = prefix.strip_suffix('/').unwrap_or(prefix);
    head.len() >= 18
        && head.is_char_boundary(head.len() - 18)
        && head[head.len() - 18..]
            .strip_prefix("r/")
            .is_some_and(|id| hex(id.as_bytes()).is_some())
        && (head.len() == 18 || head[..head.len() - 18].ends_with('/'))
}

/// The end of the range of every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: etcd's "to the end of the keyspace".
    vec![0]
}

/// The key right after `key`: where the next page of a listing starts.
pub(super) fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

pub(super) const LIVE: &[u8] = b"live";

/// The value of a router state key other than `live`.
pub(super) fn router_value(status: RouterStatus) -> Vec<u8> {
    match status {
        RouterStatus::Live(_) => LIVE.to_vec(),
        RouterStatus::Fenced(incarnation) => format!("fenced {}", incarnation.get()).into_bytes(),
        RouterStatus::Deleted(incarnation) => format!("deleted {}", incarnation.get()).into_bytes(),
    }
}

/// Decodes a router state key read at `mod_revision`.
pub(super) fn parse_router(value: &[u8], mod_revision: i64) -> Option<RouterStatus> {
    if value == LIVE {
        return Some(RouterStatus::Live(incarnation(mod_revision)?));
    }
    let text = std::str::from_utf8(value).ok()?;
    let (phase, number) = text.split_once(' ')?;
    let incarnation = Incarnation::new(number.parse().ok()?);
    match phase {
        "fenced" => Some(RouterStatus::Fenced(incarnation)),
        "deleted" => Some(RouterStatus::Deleted(incarnation)),
        _ => None,
    }
}

/// A revision as an incarnation (revisions are positive).
pub(super) fn incarnation(revision: i64) -> Option<Incarnation> {
    u64::try_from(revision)
        .ok()
        .filter(|&r| r > 0)
        .map(Incarnation::new)
}

/// A session record as stored in etcd.
///
/// Layout: version byte `1`, state byte (`0` open, `2` closed), reason byte
/// (`0` while open), the incarnation (8 bytes, big-endian), the token's
/// length (4 bytes, big-endian; `0` for none) and bytes, then the payload.
/// A closed record keeps no token.
///
/// Versions: a reader accepts only the versions it knows ([`VERSION`]);
/// any other is [`RecordError::Version`], and the store treats the record
/// as unreadable (left out of listings, reported by `audit`, deleted by its
/// router's `finish`; see `EtcdStore`'s *Record format and versions*). A
/// later version must keep the first byte as its version, so every reader
/// can tell it apart.
#[derive(Debug)]
pub(super) struct Record<P> {
    pub(super) incarnation: Incarnation,
    pub(super) closed: Option<CloseReason>,
    pub(super) token: Option<Vec<u8>>,
    pub(super) payload: P,
}

/// The record version this crate writes and reads.
const VERSION: u8 = 1;
const OPEN: u8 = 0;
const CLOSED: u8 = 2;
const HEADER: usize = 3 + 8 + 4;

/// Encodes an open record.
pub(super) fn encode_open<P: EtcdPayload>(
    incarnation: Incarnation,
    token: Option<&[u8]>,
    payload: &P,
) -> Vec<u8> {
    let token = token.unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + token.len());
    out.extend_from_slice(&[VERSION, OPEN, 0]);
    out.extend_from_slice(&incarnation.get().to_be_bytes());
    // Tokens longer than 4 GiB cannot be stored; `create` refuses them.
    let length = u32::try_from(token.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(token);
    payload.encode(&mut out);
    out
}

/// Encodes a closed record around an already encoded payload.
pub(super) fn encode_closed(
    incarnation: Incarnation,
    reason: CloseReason,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&[VERSION, CLOSED, reason.wire_code()]);
    out.extend_from_slice(&incarnation.get().to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Why a record could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The value is shorter than its header says.
    #[error("session record truncated")]
    Truncated,
    /// The record was written by an unknown version of the crate.
    #[error("session record version {0} is unknown")]
    Version(u8),
    /// The state or reason byte is not one this crate writes.
    #[error("session record has unknown state {state} or reason {reason}")]
    State {
        /// The state byte.
        state: u8,
        /// The reason byte.
        reason: u8,
    },
    /// The payload codec refused the payload bytes.
    #[error("session payload could not be decoded: {0}")]
    Payload(String),
}

/// The fixed part of a record: incarnation and close reason, without the
/// token and payload.
pub(super) struct Head {
    pub(super) incarnation: Incarnation,
    pub(super) closed: Option<CloseReason>,
    /// Where the payload starts.
    payload_at: usize,
    token: std::ops::Range<usize>,
}

pub(super) fn decode_head(value: &[u8]) -> Result<Head, RecordError> {
    let header = value.get(..HEADER).ok_or(RecordError::Truncated)?;
    if header[0] != VERSION {
        return Err(RecordError::Version(header[0]));
    }
    let closed = match (header[1], header[2]) {
        (OPEN, 0) => None,
        (CLOSED, code) => Some(CloseReason::try_from_code(code).ok_or(RecordError::State {
            state: CLOSED,
            reason: code,
        })?),
        (state, reason) => return Err(RecordError::State { state, reason }),
    };
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&header[3..11]);
    let incarnation = Incarnation::new(u64::from_be_bytes(raw));
    let mut length = [0u8; 4];
    length.copy_from_slice(&header[11..15]);
    let length = usize::try_from(u32::from_be_bytes(length)).map_err(|_| RecordError::Truncated)?;
    let end = HEADER.checked_add(length).ok_or(RecordError::Truncated)?;
    if end > value.len() {
        return Err(RecordError::Truncated);
    }
    Ok(Head {
        incarnation,
        closed,
        payload_at: end,
        token: HEADER..end,
    })
}

impl Head {
    /// The encoded payload of the record this head came from.
    pub(super) fn payload<'v>(&self, value: &'v [u8]) -> &'v [u8] {
        value.get(self.payload_at..).unwrap_or_default()
    }
}

pub(super) fn decode<P: EtcdPayload>(value: &[u8]) -> Result<Record<P>, RecordError> {
    let head = decode_head(value)?;
    let token = value.get(head.token.clone()).unwrap_or_default();
    // User code: a `decode` that panics makes the record unreadable, as
    // one that returns an error does.
    let payload = match crate::contain::contain(|| {
        P::decode(head.payload(value)).map_err(|error| error.to_string())
    }) {
        Some(Ok(payload)) => payload,
        Some(Err(error)) => return Err(RecordError::Payload(error)),
        None => return Err(RecordError::Payload("the payload's decode panicked".into())),
    };
    Ok(Record {
        incarnation: head.incarnation,
        closed: head.closed,
        token: (!token.is_empty()).then(|| token.to_vec()),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stores_own_spelling_of_an_id_is_its_key() {
        let keys = Keys::new("/sl");
        let id = SessionId::new(10);
        assert_eq!(keys.parse(&keys.pointer(id)), Some(KeyKind::Pointer(id)));
        for foreign in [
            "/sl/s/+00000000000000a",
            "/sl/s/000000000000000A",
            "/sl/s/-0000000000000001",
        ] {
            assert_eq!(keys.parse(foreign.as_bytes()), None, "{foreign}");
        }
        assert!(nests_in_a_router_range("/sl/r/0000000000000002/"));
        assert!(nests_in_a_router_range("/sl/r/0000000000000002"));
        assert!(nests_in_a_router_range("r/00000000000000ff/"));
        for fine in [
            "/sl/",
            "/sl/r/0000000000000002/s/nested/",
            "/sl/r/000000000000000G/",
            "/sl/xr/0000000000000002/",
        ] {
            assert!(!nests_in_a_router_range(fine), "{fine}");
        }
    }

    #[test]
    fn keys_round_trip_and_sort_like_ids() {
        let keys = Keys::new("/sl");
        assert_eq!(keys.prefix(), "/sl/");
        let (router, session) = (RouterId::new(0xabc), SessionId::new(u64::MAX));
        assert_eq!(
            keys.parse(&keys.router(router)),
            Some(KeyKind::Router(router))
        );
        assert_eq!(
            keys.parse(&keys.record(router, session)),
            Some(KeyKind::Record(router, session))
        );
        assert_eq!(
            keys.parse(&keys.pointer(session)),
            Some(KeyKind::Pointer(session))
        );
        assert!(
            keys.record(router, session)
                .starts_with(&keys.records(router))
        );
        assert!(!keys.router(router).starts_with(&keys.records(router)));
        assert!(keys.record(router, SessionId::new(9)) < keys.record(router, SessionId::new(10)));
        for junk in [
            &b"/other/r/0"[..],
            b"/sl/r/xyz",
            b"/sl/r/0000000000000abc/t/1",
            b"/sl/s/12",
        ] {
            assert_eq!(keys.parse(junk), None, "{}", String::from_utf8_lossy(junk));
        }
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(&[0xff, 0xff]), [0]);
    }

    #[test]
    fn router_values_round_trip() {
        let i = Incarnation::new(42);
        assert_eq!(parse_router(LIVE, 42), Some(RouterStatus::Live(i)));
        for status in [RouterStatus::Fenced(i), RouterStatus::Deleted(i)] {
            assert_eq!(parse_router(&router_value(status), 7), Some(status));
        }
        assert_eq!(parse_router(b"fenced x", 1), None);
        assert_eq!(parse_router(b"gone 1", 1), None);
        assert_eq!(parse_router(LIVE, 0), None);
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let i = Incarnation::new(7);
        let open = encode_open(i, Some(b"t0k3n"), &String::from("alice"));
        let record: Record<String> = decode(&open).unwrap();
        assert_eq!(record.incarnation, i);
        assert_eq!(record.closed, None);
        assert_eq!(record.token.as_deref(), Some(&b"t0k3n"[..]));
        assert_eq!(record.payload, "alice");

        let head = decode_head(&open).unwrap();
        let closed = encode_closed(i, CloseReason::Forced, head.payload(&open));
        let record: Record<String> = decode(&closed).unwrap();
        assert_eq!(record.closed, Some(CloseReason::Forced));
        assert_eq!(record.token, None);
        assert_eq!(record.payload, "alice");

        assert_eq!(
            decode::<()>(&open[..5]).unwrap_err(),
            RecordError::Truncated
        );
        let mut bad = open.clone();
        bad[0] = 9;
        assert_eq!(decode::<()>(&bad).unwrap_err(), RecordError::Version(9));
        let mut bad = open.clone();
        bad[1] = 1;
        assert!(matches!(decode::<()>(&bad), Err(RecordError::State { .. })));
        let mut bad = open;
        bad[14] = 200; // a token longer than the value
        assert_eq!(decode::<()>(&bad).unwrap_err(), RecordError::Truncated);
    }
}
