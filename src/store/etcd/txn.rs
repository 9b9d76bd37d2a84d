//! Small helpers for building and reading etcd transactions.

use etcd_client::{Compare, CompareOp, KeyValue, TxnOpResponse};

use super::EtcdError;
use super::keys;
use crate::id::{Incarnation, RouterId};
use crate::store::report::RouterStatus;

/// At most this many keys are read by one request.
pub(super) const PAGE: i64 = 1000;

/// A page of records is cut to about this many bytes (etcd answers at most
/// [`MAX_ANSWER`]).
const PAGE_BYTES: usize = 16 << 20;

/// Requests stay well under etcd's default 1.5 MiB request limit.
pub(super) const MAX_TXN_BYTES: usize = 1 << 20;

/// The sizes every request of a store is cut to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// The largest record `create` accepts.
    pub(super) max_record: usize,
    /// etcd's `--max-txn-ops`, as configured.
    pub(super) max_txn_ops: usize,
    /// How many creates may share a transaction.
    pub(super) create_batch: usize,
    /// Records per page of a listing that reads values.
    pub(super) page: i64,
}

impl Limits {
    pub(super) fn new(max_record: usize, max_txn_ops: usize, create_batch: usize) -> Self {
        // A record's key and the answer's framing: well under 256 bytes.
        let per_record = max_record.saturating_add(256);
        let page = (PAGE_BYTES / per_record).clamp(1, PAGE as usize);
        Self {
            max_record,
            max_txn_ops,
            create_batch,
            page: i64::try_from(page).unwrap_or(PAGE),
        }
    }

    /// Records `finish` deletes per transaction: two nested transactions
    /// each (one guard and one delete apiece), and etcd counts a nested
    /// transaction's operations against what its parent leaves of the
    /// limit; at most 32, so a transaction's answer (the records deleted,
    /// as they were) stays small.
    pub(super) fn deletes_per_txn(&self) -> usize {
        (self.max_txn_ops.saturating_sub(1) / 2).clamp(1, 32)
    }

    /// Creates per transaction: one nested transaction of three guards
    /// each.
    pub(super) fn creates_per_txn(&self) -> usize {
        self.create_batch
            .min(self.max_txn_ops.saturating_sub(3))
            .max(1)
    }
}

/// The largest answer from etcd the store decodes (a page of records, or a
/// watch response).
pub(super) const MAX_ANSWER: usize = 64 << 20;

pub(super) fn router_status(kv: &KeyValue) -> Result<RouterStatus, EtcdError> {
    keys::parse_router(kv.value(), kv.mod_revision())
        .ok_or_else(|| EtcdError::corrupt(kv.key(), "not a router state"))
}

pub(super) fn parse_pointer(kv: &KeyValue) -> Result<RouterId, EtcdError> {
    let raw: [u8; 8] = kv
        .value()
        .try_into()
        .map_err(|_| EtcdError::corrupt(kv.key(), "a session pointer is 8 bytes"))?;
    Ok(RouterId::new(u64::from_be_bytes(raw)))
}

/// The guard "the router key `key` is live in `incarnation`": its value is
/// `live` and it was last written at the incarnation's revision.
pub(super) fn live_in(key: &[u8], incarnation: Incarnation) -> [Compare; 2] {
    [
        Compare::value(key, CompareOp::Equal, keys::LIVE),
        Compare::mod_revision(
            key,
            CompareOp::Equal,
            i64::try_from(incarnation.get()).unwrap_or(i64::MAX),
        ),
    ]
}

pub(super) fn revision_of(response: &etcd_client::TxnResponse) -> i64 {
    response.header().map_or(0, |header| header.revision())
}

/// The generation of the handle of a record created at revision `created`
/// (etcd revisions are positive): every controller on the etcd agrees on
/// it, so a [`SessionKey`] means the same life of the id everywhere.
pub(super) fn generation(created: i64) -> u64 {
    u64::try_from(created).unwrap_or_default()
}

/// The first key-value of the `index`-th get of a transaction's responses.
pub(super) fn txn_get(responses: &[TxnOpResponse], index: usize) -> Option<&KeyValue> {
    match responses.get(index) {
        Some(TxnOpResponse::Get(get)) => get.kvs().first(),
        _ => None,
    }
}

/// How many times a call re-reads a key that other controllers change under
/// it before it gives up with [`EtcdError::Contention`].
pub(super) const CONTENTION: usize = 16;
