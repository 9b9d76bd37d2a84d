//! [`EtcdStore`]: the session store on etcd, for controllers that outgrow
//! one process.
//!
//! # Invariants
//!
//! - A session is created by one transaction guarded on its router's state
//!   key (`live`, at the incarnation's revision) and on its id being free;
//!   the fence is one transaction that turns `live` into `fenced`. etcd
//!   serializes both, so once the fence committed no create can (I2).
//! - A session's record and its pointer are written, and deleted, in the
//!   same transaction: the two agree (I7), which `audit` checks.
//! - Every write of an existing record is guarded by the record's
//!   `create_revision`, so no write meant for one life of a session id
//!   touches a later one, and none brings a deleted record back.
//! - Each controller holds at most one handle per session record (the
//!   cache; a `create` answered after its router's whole deletion is the
//!   one exception, see the type's docs); a close by any controller
//!   reaches it through the watch.
//! - `finish` deletes in transactions within [`MAX_TXN_OPS`], each guarded
//!   on the router still being fenced in the incarnation, each record on
//!   being the one listed and its pointer on being created with it, then
//!   confirms with a linearizable count that nothing is left before it
//!   writes the tombstone. Every step can run again: a deletion whose
//!   controller died is resumed by another one.
//!
//! # Deadlock safety
//!
//! Locks, in the order they may be taken: the watch's `progress` mutex,
//! then one `cache` shard (then, building a handle, the new handle's own
//! lock, which nobody else holds yet). Nothing else is taken under either,
//! and no guard is held across an `.await`. No user code runs under them
//! (I8): handles are closed (which runs user resources) after both are
//! released; nothing that may hold the last handle of a session or a
//! decoded payload (whose `Drop` is user code) is dropped under them (a
//! cache entry removed comes out of the shard with its handle, and records
//! not made into handles drop after the guards); and closes of handles
//! built closed are counted in the metrics after them.

mod keys;
mod watch;
mod writer;

use std::fmt;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, KvClient, Txn,
    TxnOp, TxnOpResponse,
};
use foldhash::fast::RandomState;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use super::SessionStore;
use super::error::{
    BackendError, CreateError, CreateErrorKind, FenceError, FinishError, RegisterError,
    RouterError, SessionError,
};
use super::report::{AuditReport, FenceSnapshot, FinishReport, RouterCensus, RouterStatus};
use super::rules::{FenceStep, admits, check_finishable, fence_step, holds};
use crate::events::{Repair, RepairAction};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Resource, Session, SessionState};
pub use keys::RecordError;
use keys::{KeyKind, Keys, decode, decode_head, prefix_end, successor};
use watch::Progress;
use writer::{CloseWrite, MAX_TXN_OPS, RemoveWrite, Write, WriterCounters};

/// At most this many keys are read or deleted by one request.
const PAGE: i64 = 1000;

/// The largest answer from etcd the store decodes (a page of records, or a
/// watch response).
const MAX_ANSWER: usize = 64 << 20;

/// A payload that [`EtcdStore`] can keep in etcd: it is written with the
/// session and read back by every controller.
///
/// Implemented for `()`, [`String`] and `Vec<u8>`; implement it for your own
/// payload with the encoding of your choice.
///
/// # Example
///
/// ```
/// use session_lifecycle::etcd::EtcdPayload;
///
/// /// The client's name and its service.
/// #[derive(Debug, PartialEq)]
/// struct Client {
///     name: String,
///     service: u32,
/// }
///
/// impl EtcdPayload for Client {
///     fn encode(&self, out: &mut Vec<u8>) {
///         out.extend_from_slice(&self.service.to_be_bytes());
///         out.extend_from_slice(self.name.as_bytes());
///     }
///
///     fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
///         let (service, name) = bytes.split_at_checked(4).ok_or("payload too short")?;
///         Ok(Client {
///             name: String::from_utf8(name.to_vec())?,
///             service: u32::from_be_bytes(service.try_into()?),
///         })
///     }
/// }
///
/// let client = Client { name: "alice".into(), service: 7 };
/// let mut bytes = Vec::new();
/// client.encode(&mut bytes);
/// assert_eq!(Client::decode(&bytes).unwrap(), client);
/// assert!(Client::decode(&[1]).is_err());
/// ```
pub trait EtcdPayload: Sized + Send + Sync + 'static {
    /// Appends the payload's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads a payload back from what [`encode`](Self::encode) wrote.
    ///
    /// # Errors
    ///
    /// Whatever makes `bytes` unreadable; the store reports it as a backend
    /// error naming the key.
    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>>;
}

impl EtcdPayload for () {
    fn encode(&self, _out: &mut Vec<u8>) {}

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected payload bytes", bytes.len()).into())
        }
    }
}

impl EtcdPayload for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(String::from_utf8(bytes.to_vec())?)
    }
}

impl EtcdPayload for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(bytes.to_vec())
    }
}

/// What went wrong talking to etcd. Store methods return it inside a
/// [`BackendError`] (its [`source`](std::error::Error::source)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// Connecting to etcd failed.
    #[error("cannot reach etcd at {endpoints:?}: {source}")]
    Connect {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A request failed (etcd unreachable, timed out, or refused it). The
    /// store changed nothing, or the whole transaction: never half of one.
    #[error("etcd request `{operation}` failed: {source}")]
    Request {
        /// What the store was doing.
        operation: &'static str,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A key of the store holds a value this crate cannot read.
    #[error("etcd key {key} holds an unreadable value: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why it cannot be read.
        reason: String,
    },
    /// A write is queued but etcd did not acknowledge it in time; the store
    /// keeps retrying it in the background.
    #[error(
        "etcd did not acknowledge the {what} within {waited:?}; it is retried in the background"
    )]
    WritePending {
        /// The write.
        what: &'static str,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Other controllers kept changing a key this call had to change.
    #[error("etcd key {key} kept changing under this call")]
    Contention {
        /// The key.
        key: String,
    },
    /// A session's token or payload is larger than etcd accepts.
    #[error("session record of {bytes} bytes is larger than the {limit} bytes allowed")]
    TooLarge {
        /// The record's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl EtcdError {
    fn request(operation: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |source| Self::Request { operation, source }
    }

    fn corrupt(key: &[u8], reason: impl fmt::Display) -> Self {
        Self::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        }
    }
}

impl From<EtcdError> for BackendError {
    fn from(error: EtcdError) -> Self {
        BackendError::new(error)
    }
}

macro_rules! backend_from_etcd {
    ($($error:ty),*) => {$(
        impl From<EtcdError> for $error {
            fn from(error: EtcdError) -> Self {
                Self::Backend(BackendError::new(error))
            }
        }
    )*};
}
backend_from_etcd!(
    RegisterError,
    RouterError,
    SessionError,
    FenceError,
    FinishError
);

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/session-lifecycle/";

/// Builds an [`EtcdStore`]; see [`EtcdStore::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct EtcdStoreBuilder {
    endpoints: Vec<String>,
    prefix: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    write_timeout: Duration,
    concurrency: usize,
    max_record: usize,
}

impl EtcdStoreBuilder {
    /// The key prefix every key of the store lives under (default
    /// [`DEFAULT_PREFIX`]). Stores with different prefixes on one etcd are
    /// independent; controllers that share sessions use the same prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one etcd request may take before it fails with
    /// [`EtcdError::Request`] (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long `close`, `remove` and `finish` wait for the background
    /// writer before they return [`EtcdError::WritePending`] (default 10 s).
    /// The write is not dropped: it is retried until etcd takes it.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// How many transactions a deletion or the writer keeps in flight at
    /// once (default 4).
    pub fn concurrency(mut self, transactions: usize) -> Self {
        self.concurrency = transactions.max(1);
        self
    }

    /// The largest session record (token plus payload plus 15 bytes) that
    /// `create` accepts (default 16 KiB). Listings read 1,000 records per
    /// request, and the store accepts answers of up to 64 MiB, so keep
    /// records small: a session's bulky state belongs elsewhere.
    pub fn max_record(mut self, bytes: usize) -> Self {
        self.max_record = bytes;
        self
    }

    /// Connects to etcd, reads the current revision and starts the store's
    /// watch and writer tasks on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`EtcdError::Connect`] if etcd cannot be reached.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    pub async fn connect<P: EtcdPayload>(self) -> Result<EtcdStore<P>, EtcdError> {
        let options = ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout);
        let connect_error = |source| EtcdError::Connect {
            endpoints: self.endpoints.clone(),
            source,
        };
        let client = Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(connect_error)?;
        let keys = Keys::new(&self.prefix);
        let mut kv = client.kv_client().max_decoding_message_size(MAX_ANSWER);
        let response = kv
            .get(
                keys.router(RouterId::new(0)),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(connect_error)?;
        let revision = response.header().map_or(0, |header| header.revision());
        let (writes, queue) = mpsc::unbounded_channel();
        let counters = Arc::new(WriterCounters::default());
        tokio::spawn(writer::run(
            kv.clone(),
            queue,
            self.concurrency,
            Arc::clone(&counters),
        ));
        let stop = CancellationToken::new();
        let (suspend, suspended) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            suspend,
            kv,
            keys,
            cache: DashMap::with_hasher(RandomState::default()),
            progress: Mutex::new(Progress {
                applied: revision,
                ..Progress::default()
            }),
            link: Arc::new(Link {
                writes,
                quiet: DashMap::with_hasher(RandomState::default()),
            }),
            counters,
            stop: stop.clone(),
            write_timeout: self.write_timeout,
            concurrency: self.concurrency,
            max_record: self.max_record,
        });
        tokio::spawn(watch::run(
            Arc::downgrade(&shared),
            client.watch_client().max_decoding_message_size(MAX_ANSWER),
            shared.keys.all_routers(),
            stop,
            suspended,
        ));
        Ok(EtcdStore { shared, client })
    }

    /// Adds an endpoint (`http://host:port`).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }
}

/// The session store on etcd: several controllers share one set of
/// sessions, with the same guarantees as [`MemoryStore`](crate::MemoryStore)
/// (fence, incarnations, index consistency, cleanup in the store).
///
/// Behind the cargo feature `etcd`.
///
/// # Keys
///
/// Under the prefix `P` (default [`DEFAULT_PREFIX`]): `P r/<router>` holds
/// the router's state (`live`, `fenced <incarnation>`, `deleted
/// <incarnation>`), `P r/<router>/s/<session>` the session's record (state,
/// close reason, incarnation, token, payload), and `P s/<session>` the
/// router the session lives on. Ids are 16 hex digits. No lease is used: a
/// router's sessions are removed by its deletion, in pages, never by
/// revoking one huge lease.
///
/// # Consistency
///
/// - Creation is one transaction guarded on the router's state and
///   incarnation and on the id being free; the fence is one transaction. A
///   live router's incarnation is the etcd revision that made it live, so
///   incarnations grow across every controller and every re-registration.
/// - Each controller holds one handle per session it created or read. A
///   close on a handle is written to etcd in the background (batched,
///   guarded, retried until etcd takes it; [`flush`](Self::flush) waits for
///   it). A close or removal by any controller reaches the other
///   controllers' handles through a watch of the prefix: their `closed()`
///   resolve. A watch cut off by a compaction re-lists instead.
/// - `Terminating` is the state of the handles of the controller that runs
///   a deletion; etcd records sessions as open or closed.
/// - A `create` that commits just before its router's fence and answers
///   only after the whole deletion finished gets a handle of its own, open,
///   which closes (`Reclaimed`) as soon as the watch reports the record
///   gone; the deletion closed (and counted) another handle of that session.
/// - [`get`](SessionStore::get) answers from the handle this controller
///   holds when it holds one (kept current by the watch) and reads etcd
///   otherwise; every other method reads etcd (linearizable reads).
/// - A deletion is driven by the same [`RouterDeleter`](crate::RouterDeleter):
///   its wait sees confirmations through the watch, and
///   [`finish`](SessionStore::finish) reads 1,000 records at a time,
///   deletes them 32 per transaction (within etcd's 128 operations) and
///   confirms with a linearizable check that nothing is left before it
///   writes the tombstone. If the controller running a
///   deletion dies after the fence, `RouterDeleter::delete` on another
///   controller resumes it.
///
/// # Limits
///
/// - Deleted routers keep their tombstone key (`deleted <incarnation>`)
///   forever; `audit` and `census` read every router key.
/// - While etcd is unreachable, closes made on handles queue in memory
///   (unbounded) until etcd takes them.
/// - A pointer put back by [`repair`](SessionStore::repair) is not deleted
///   by `finish` (it is not the one created with the record); the next
///   repair drops it.
/// - The store publishes no [`Event`](crate::Event)s and counts no
///   `metrics` of its own; the deleter, monitor, reconciler and sweeper
///   driving it do.
///
/// # Faults
///
/// etcd unreachable or restarting gives typed errors
/// ([`BackendError`] wrapping an [`EtcdError`]); etcd applies a transaction
/// whole or not at all, so nothing is half-applied. Reads and guarded
/// writes that can safely run twice are retried; `create` and
/// `register_router` are not (the outcome of a request that timed out is
/// unknown: a create that timed out may have created the session, which a
/// later create of the same id reports as a duplicate, and reconciliation
/// or an audit sweep cleans up).
///
/// # Example
///
/// ```no_run
/// use session_lifecycle::etcd::EtcdStore;
/// use session_lifecycle::{NewSession, RouterId, SessionId, SessionStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store: EtcdStore = EtcdStore::builder()
///     .endpoint("http://127.0.0.1:2379")
///     .prefix("/my-controller/sessions/")
///     .connect()
///     .await?;
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let session = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// assert_eq!(store.count(router).await?, 1);
/// # drop(session);
/// # Ok(())
/// # }
/// ```
pub struct EtcdStore<P = ()> {
    shared: Arc<Shared<P>>,
    client: Client,
}

impl<P> Clone for EtcdStore<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            client: self.client.clone(),
        }
    }
}

impl<P> fmt::Debug for EtcdStore<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.shared.keys.prefix())
            .field("cached", &self.shared.cache.len())
            .finish_non_exhaustive()
    }
}

/// Counters of an [`EtcdStore`]'s background writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Closes written (or found already gone).
    pub closes: u64,
    /// Removals written (or found already gone).
    pub removes: u64,
    /// Transactions sent.
    pub transactions: u64,
    /// Transactions that failed and were retried.
    pub failures: u64,
    /// Single writes etcd refused as such (never expected: a record is
    /// smaller than etcd's request limit); each is logged at error level.
    pub refused: u64,
}

impl EtcdStore<()> {
    /// A builder with no endpoint yet, the default prefix and timeouts.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use session_lifecycle::etcd::EtcdStore;
    /// use tokio::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store: EtcdStore<String> = EtcdStore::builder()
    ///     .endpoint("http://etcd-0:2379")
    ///     .endpoint("http://etcd-1:2379")
    ///     .request_timeout(Duration::from_secs(2))
    ///     .connect()
    ///     .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> EtcdStoreBuilder {
        EtcdStoreBuilder {
            endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            concurrency: 4,
            max_record: 16 << 10,
        }
    }
}

impl<P: EtcdPayload> EtcdStore<P> {
    /// The etcd client the store uses (for your own keys, or a health check).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key prefix, ending with `/`.
    #[must_use]
    pub fn prefix(&self) -> &str {
        self.shared.keys.prefix()
    }

    /// How many session handles this controller holds.
    #[must_use]
    pub fn cached(&self) -> usize {
        self.shared.cache.len()
    }

    /// The background writer's counters.
    #[must_use]
    pub fn writer_stats(&self) -> WriterStats {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = &self.shared.counters;
        WriterStats {
            closes: counters.closes.load(Relaxed),
            removes: counters.removes.load(Relaxed),
            transactions: counters.transactions.load(Relaxed),
            failures: counters.failures.load(Relaxed),
            refused: counters.refused.load(Relaxed),
        }
    }

    /// Waits until every close made on this controller's handles so far is
    /// written to etcd (for a graceful shutdown).
    ///
    /// # Errors
    ///
    /// [`EtcdError::WritePending`] after the write timeout; the writes are
    /// still retried.
    pub async fn flush(&self) -> Result<(), EtcdError> {
        self.shared.flush().await
    }

    /// Disconnects the store's watch until the returned guard drops, so a
    /// test can make it fall behind (and be compacted away). Feature
    /// `test-util`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(store: session_lifecycle::etcd::EtcdStore) {
    /// let suspended = store.suspend_watch();
    /// // ... other controllers change things, etcd compacts ...
    /// drop(suspended); // the watch resumes, or re-lists if compacted
    /// # }
    /// ```
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn suspend_watch(&self) -> WatchSuspension {
        self.shared.suspend.send_replace(true);
        WatchSuspension {
            suspend: self.shared.suspend.clone(),
        }
    }
}

/// Keeps an [`EtcdStore`]'s watch disconnected while it lives; see
/// [`EtcdStore::suspend_watch`].
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Debug)]
pub struct WatchSuspension {
    suspend: tokio::sync::watch::Sender<bool>,
}

#[cfg(feature = "test-util")]
impl Drop for WatchSuspension {
    fn drop(&mut self) {
        self.suspend.send_replace(false);
    }
}

/// What the store shares with its watch task.
pub(super) struct Shared<P> {
    kv: KvClient,
    keys: Keys,
    cache: DashMap<SessionId, Cached<P>, RandomState>,
    progress: Mutex<Progress>,
    link: Arc<Link>,
    counters: Arc<WriterCounters>,
    stop: CancellationToken,
    /// `true` while a test holds the watch disconnected. Kept alive without
    /// `test-util` too: the watch stops when it is dropped.
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    suspend: tokio::sync::watch::Sender<bool>,
    write_timeout: Duration,
    concurrency: usize,
    max_record: usize,
}

impl<P> Drop for Shared<P> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A handle this controller holds, with the revision that created its
/// record (which life of the id it is).
struct Cached<P> {
    session: Session<P>,
    created: i64,
}

/// What the close hooks of the handles need: the writer's queue, and the
/// ids being closed because etcd says so (no need to write those back).
struct Link {
    writes: mpsc::UnboundedSender<Write>,
    /// Ids (and the `create_revision` of the record) being closed because
    /// etcd says so.
    quiet: DashMap<SessionId, i64, RandomState>,
}

/// Attached to every open handle: writes its close to etcd.
struct WriteClose {
    link: Arc<Link>,
    id: SessionId,
    record: Vec<u8>,
    incarnation: Incarnation,
    created: i64,
    payload: Box<[u8]>,
}

impl Resource for WriteClose {
    fn release(self: Box<Self>, reason: CloseReason) {
        if self
            .link
            .quiet
            .get(&self.id)
            .is_some_and(|c| *c == self.created)
        {
            return; // closed because etcd says so
        }
        let value = keys::encode_closed(self.incarnation, reason, &self.payload);
        // Fails only once the writer is gone with the runtime: nothing left
        // to write with.
        let _ = self.link.writes.send(Write::Close(CloseWrite {
            record: self.record,
            created: self.created,
            value,
        }));
    }

    fn release_inline(&self) -> bool {
        true
    }
}

/// A record read from etcd and decoded, ready to become a handle.
struct Loaded<P> {
    router: RouterId,
    id: SessionId,
    created: i64,
    record: keys::Record<P>,
    payload: Box<[u8]>,
}

impl<P: EtcdPayload> Shared<P> {
    fn kv(&self) -> KvClient {
        self.kv.clone()
    }

    async fn flush(&self) -> Result<(), EtcdError> {
        let (done, flushed) = oneshot::channel();
        let _ = self.link.writes.send(Write::Flush(done));
        self.within("flush of queued closes", flushed).await?;
        Ok(())
    }

    /// Waits for the writer's answer, up to the write timeout.
    async fn within<T>(
        &self,
        what: &'static str,
        answer: oneshot::Receiver<T>,
    ) -> Result<Option<T>, EtcdError> {
        match tokio::time::timeout(self.write_timeout, answer).await {
            Ok(answer) => Ok(answer.ok()),
            Err(_elapsed) => Err(EtcdError::WritePending {
                what,
                waited: self.write_timeout,
            }),
        }
    }

    /// Closes the handle of the record created at `created` because etcd
    /// says it is closed or gone: not written back. `true` if this call
    /// closed it.
    fn close_quietly(&self, session: &Session<P>, created: i64, reason: CloseReason) -> bool {
        if session.is_closed() {
            return false;
        }
        let id = session.id();
        self.link.quiet.insert(id, created);
        let won = session.close(reason).won();
        self.link.quiet.remove_if(&id, |_, c| *c == created);
        won
    }

    /// Decodes a record read from etcd.
    fn load(&self, kv: &KeyValue) -> Result<Loaded<P>, EtcdError> {
        let Some(KeyKind::Record(router, id)) = self.keys.parse(kv.key()) else {
            return Err(EtcdError::corrupt(kv.key(), "not a session record key"));
        };
        let value = kv.value();
        let record = decode::<P>(value).map_err(|error| EtcdError::corrupt(kv.key(), error))?;
        let payload = decode_head(value)
            .map(|head| head.payload(value).into())
            .map_err(|error| EtcdError::corrupt(kv.key(), error))?;
        Ok(Loaded {
            router,
            id,
            created: kv.create_revision(),
            record,
            payload,
        })
    }

    /// The hook that writes the handle's close to etcd.
    fn hook(
        &self,
        router: RouterId,
        id: SessionId,
        incarnation: Incarnation,
        created: i64,
        payload: Box<[u8]>,
    ) -> WriteClose {
        WriteClose {
            link: Arc::clone(&self.link),
            id,
            record: self.keys.record(router, id),
            incarnation,
            created,
            payload,
        }
    }

    /// Announces loads about to read records, so the watch remembers what
    /// changes meanwhile.
    fn begin_loads(&self) -> LoadGuard<'_, P> {
        self.progress.lock().loads += 1;
        LoadGuard { shared: self }
    }

    /// Turns records read at `revision` into this controller's handles,
    /// reusing the handles it holds; a record whose id has a later life
    /// cached is left out (it is gone). Records whose handle must be
    /// checked again (changed while loading) are pushed to `recheck`.
    fn adopt(
        &self,
        loaded: Vec<Loaded<P>>,
        revision: i64,
        recheck: &mut Vec<(RouterId, SessionId, i64)>,
    ) -> Vec<Session<P>> {
        let mut sessions = Vec::with_capacity(loaded.len());
        let mut closes = Vec::new();
        // Records not made into handles drop after the guards: a decoded
        // payload's `Drop` is user code.
        let mut discarded = Vec::new();
        // Closes of handles built closed, counted after the guards (the
        // metrics recorder is user code).
        #[cfg(feature = "metrics")]
        let mut built_closed = Vec::new();
        {
            let progress = self.progress.lock();
            for loaded in loaded {
                let (id, created) = (loaded.id, loaded.created);
                let session = match self.cache.entry(id) {
                    Entry::Occupied(entry) if entry.get().created == created => {
                        let cached = entry.get().session.clone();
                        if let Some(reason) = loaded.record.closed {
                            closes.push((cached.clone(), created, reason));
                        }
                        discarded.push(loaded);
                        cached
                    }
                    // A later life of the id is cached: the record read is
                    // gone already (and may have been another router's).
                    Entry::Occupied(entry) if entry.get().created > created => {
                        discarded.push(loaded);
                        continue;
                    }
                    entry => {
                        let (session, closed) = self.materialize(loaded);
                        let open = closed.is_none();
                        #[cfg(feature = "metrics")]
                        built_closed.extend(closed);
                        let previous = match entry {
                            Entry::Occupied(mut entry) => Some(std::mem::replace(
                                entry.get_mut(),
                                Cached {
                                    session: session.clone(),
                                    created,
                                },
                            )),
                            Entry::Vacant(entry) => {
                                entry.insert(Cached {
                                    session: session.clone(),
                                    created,
                                });
                                None
                            }
                        };
                        if let Some(previous) = previous {
                            // An older life of the id, deleted since.
                            closes.push((
                                previous.session,
                                previous.created,
                                CloseReason::Reclaimed,
                            ));
                        }
                        let changed = progress.stale(id, revision);
                        if open && changed {
                            recheck.push((session.router(), id, created));
                        }
                        session
                    }
                };
                sessions.push(session);
            }
        }
        drop(discarded);
        #[cfg(feature = "metrics")]
        for reason in built_closed {
            crate::metrics::closed(reason.as_str());
        }
        for (session, created, reason) in closes {
            self.close_quietly(&session, created, reason);
        }
        sessions
    }

    /// A handle for a loaded record, and the reason it was closed with if
    /// the record is closed. Called under the store's guards: it runs no
    /// user code (a closed record's handle is closed without counting it in
    /// the metrics; the caller counts it).
    fn materialize(&self, loaded: Loaded<P>) -> (Session<P>, Option<CloseReason>) {
        let Loaded {
            router,
            id,
            created,
            record,
            payload,
        } = loaded;
        let mut spec = NewSession::new(id, router, record.incarnation).payload(record.payload);
        if let Some(token) = record.token {
            spec = spec.token(token);
        }
        let session = spec.into_session_with_generation(generation(created));
        match record.closed {
            Some(reason) => {
                // Nothing attached, nobody waits: the close runs no user code.
                let _ = session.close_unrecorded(reason);
                (session, Some(reason))
            }
            None => {
                let hook = self.hook(router, id, record.incarnation, created, payload);
                // A new handle is open: the attach cannot be refused.
                let _ = session.attach(hook);
                (session, None)
            }
        }
    }

    /// Reads again the records of handles that may have missed a change.
    async fn recheck(&self, stale: Vec<(RouterId, SessionId, i64)>) -> Result<(), EtcdError> {
        for chunk in stale.chunks(MAX_TXN_OPS) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|&(router, id, _)| TxnOp::get(self.keys.record(router, id), None))
                    .collect::<Vec<_>>(),
            );
            let response = self
                .kv()
                .txn(txn)
                .await
                .map_err(EtcdError::request("recheck"))?;
            for (&(_, id, created), op) in chunk.iter().zip(response.op_responses()) {
                let current = match op {
                    TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                    _ => None,
                };
                self.settle(id, created, current.as_ref());
            }
        }
        Ok(())
    }

    /// Brings the cached handle of `(id, created)` in line with the record
    /// etcd holds now (`None`: no record).
    fn settle(&self, id: SessionId, created: i64, current: Option<&KeyValue>) {
        let (session, reason) = match current {
            Some(kv) if kv.create_revision() == created => {
                let Ok(Some(reason)) = decode_head(kv.value()).map(|head| head.closed) else {
                    return; // open, as the handle (or unreadable: audit reports it)
                };
                let cached = self.cache.get(&id).filter(|c| c.created == created);
                let Some(session) = cached.map(|c| c.session.clone()) else {
                    return;
                };
                (session, reason)
            }
            _ => {
                // Gone, or another life of the id.
                let removed = self.cache.remove_if(&id, |_, c| c.created == created);
                let Some((_, cached)) = removed else { return };
                (cached.session, CloseReason::Reclaimed)
            }
        };
        self.close_quietly(&session, created, reason);
    }

    /// After a compacted watch: checks every cached handle; returns the
    /// revision the check read at.
    async fn recheck_cached(&self) -> Result<i64, EtcdError> {
        let cached: Vec<(RouterId, SessionId, i64)> = self
            .cache
            .iter()
            .map(|entry| (entry.session.router(), *entry.key(), entry.created))
            .collect();
        let revision = self.revision().await?;
        self.recheck(cached).await?;
        Ok(revision)
    }

    /// The store's current revision.
    async fn revision(&self) -> Result<i64, EtcdError> {
        let response = self
            .kv()
            .get(
                self.keys.router(RouterId::new(0)),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(EtcdError::request("read revision"))?;
        Ok(response.header().map_or(0, |header| header.revision()))
    }

    /// Every key in `[start, end)`, read page by page at one revision (the
    /// first page's unless `at` is given). Returns the keys and the revision.
    async fn list(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        at: Option<i64>,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut kvs = Vec::new();
        let mut from = start;
        let mut revision = at;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            if keys_only {
                options = options.with_keys_only();
            }
            let mut response = self
                .kv()
                .get(from, Some(options))
                .await
                .map_err(EtcdError::request("list"))?;
            if revision.is_none() {
                revision = response.header().map(|header| header.revision());
            }
            let more = response.more();
            let page = response.take_kvs();
            let Some(last) = page.last() else { break };
            from = successor(last.key());
            kvs.extend(page);
            if !more {
                break;
            }
        }
        Ok((kvs, revision.unwrap_or(0)))
    }

    /// The router's status (`None`: not registered).
    async fn status(&self, router: RouterId) -> Result<Option<RouterStatus>, EtcdError> {
        let response = self
            .kv()
            .get(self.keys.router(router), None)
            .await
            .map_err(EtcdError::request("read router"))?;
        response.kvs().first().map(router_status).transpose()
    }

    /// The handles of every record of `router`, read at one revision.
    async fn router_sessions(&self, router: RouterId) -> Result<Vec<Session<P>>, EtcdError> {
        // Read at the current revision, after the load is announced: every
        // change the watch applied before is in the read, every later one
        // is remembered for it. (A read at an older revision could miss a
        // change the watch applied before the load began.)
        let _loads = self.begin_loads();
        let prefix = self.keys.records(router);
        let end = prefix_end(&prefix);
        let (kvs, revision) = self.list(prefix, end, None, false).await?;
        let loaded = kvs
            .iter()
            .map(|kv| self.load(kv))
            .collect::<Result<Vec<_>, _>>()?;
        let mut recheck = Vec::new();
        let sessions = self.adopt(loaded, revision, &mut recheck);
        self.recheck(recheck).await?;
        Ok(sessions)
    }

    /// The handle of session `id`, read from etcd when not cached.
    async fn handle(&self, id: SessionId) -> Result<Option<Session<P>>, EtcdError> {
        // An open handle is current (the watch closes it); a closed one may
        // belong to a record removed a moment ago: read etcd.
        let stale = match self.cache.get(&id) {
            Some(cached) if !cached.session.is_closed() => {
                return Ok(Some(cached.session.clone()));
            }
            Some(cached) => Some(cached.created),
            None => None,
        };
        let _loads = self.begin_loads();
        let pointer = self.keys.pointer(id);
        // Two reads (pointer, then record): if the session moved to another
        // router in between, read again.
        let mut last_pointer = None;
        for _ in 0..CONTENTION {
            let response = self
                .kv()
                .get(pointer.clone(), None)
                .await
                .map_err(EtcdError::request("read session pointer"))?;
            let Some(kv) = response.kvs().first() else {
                if let Some(created) = stale {
                    self.cache.remove_if(&id, |_, c| c.created == created);
                }
                return Ok(None);
            };
            let router = parse_pointer(kv)?;
            let pointer_revision = kv.mod_revision();
            let response = self
                .kv()
                .get(self.keys.record(router, id), None)
                .await
                .map_err(EtcdError::request("read session"))?;
            let revision = response.header().map_or(0, |header| header.revision());
            let Some(kv) = response.kvs().first() else {
                if last_pointer == Some(pointer_revision) {
                    return Ok(None); // a dangling pointer: `audit` reports it
                }
                // Moved or removed since the pointer was read: read again.
                last_pointer = Some(pointer_revision);
                continue;
            };
            let loaded = self.load(kv)?;
            let mut recheck = Vec::new();
            let adopted = self.adopt(vec![loaded], revision, &mut recheck).pop();
            self.recheck(recheck).await?;
            // Left out: a later life is cached, which is the id's session.
            return Ok(adopted.or_else(|| self.cache.get(&id).map(|c| c.session.clone())));
        }
        Err(EtcdError::Contention {
            key: String::from_utf8_lossy(&pointer).into_owned(),
        })
    }

    /// Deletes the record of a handle (closed already) and its pointer,
    /// through the writer, after the handle's close; `true` if this call
    /// deleted it.
    async fn remove_record(&self, session: &Session<P>) -> Result<bool, EtcdError> {
        let id = session.id();
        let Some(created) = self
            .cache
            .get(&id)
            .filter(|c| Session::ptr_eq(&c.session, session))
            .map(|c| c.created)
        else {
            return Ok(false); // removed meanwhile (the watch saw it go)
        };
        let (done, removed) = oneshot::channel();
        let _ = self.link.writes.send(Write::Remove(RemoveWrite {
            record: self.keys.record(session.router(), id),
            pointer: self.keys.pointer(id),
            created,
            done: Some(done),
        }));
        let removed = self.within("removal", removed).await?.unwrap_or(false);
        self.cache.remove_if(&id, |_, c| c.created == created);
        Ok(removed)
    }
}

/// Counts the loads in flight while it lives.
struct LoadGuard<'a, P> {
    shared: &'a Shared<P>,
}

impl<P> Drop for LoadGuard<'_, P> {
    fn drop(&mut self) {
        self.shared.progress.lock().end_load();
    }
}

fn router_status(kv: &KeyValue) -> Result<RouterStatus, EtcdError> {
    keys::parse_router(kv.value(), kv.mod_revision())
        .ok_or_else(|| EtcdError::corrupt(kv.key(), "not a router state"))
}

fn parse_pointer(kv: &KeyValue) -> Result<RouterId, EtcdError> {
    let raw: [u8; 8] = kv
        .value()
        .try_into()
        .map_err(|_| EtcdError::corrupt(kv.key(), "a session pointer is 8 bytes"))?;
    Ok(RouterId::new(u64::from_be_bytes(raw)))
}

/// The guard "the router key `key` is live in `incarnation`": its value is
/// `live` and it was last written at the incarnation's revision.
fn live_in(key: &[u8], incarnation: Incarnation) -> [Compare; 2] {
    [
        Compare::value(key, CompareOp::Equal, keys::LIVE),
        Compare::mod_revision(
            key,
            CompareOp::Equal,
            i64::try_from(incarnation.get()).unwrap_or(i64::MAX),
        ),
    ]
}

fn revision_of(response: &etcd_client::TxnResponse) -> i64 {
    response.header().map_or(0, |header| header.revision())
}

/// The generation of the handle of a record created at revision `created`
/// (etcd revisions are positive): every controller on the etcd agrees on
/// it, so a [`SessionKey`] means the same life of the id everywhere.
fn generation(created: i64) -> u64 {
    u64::try_from(created).unwrap_or_default()
}

/// The first key-value of the `index`-th get of a transaction's responses.
fn txn_get(responses: &[TxnOpResponse], index: usize) -> Option<&KeyValue> {
    match responses.get(index) {
        Some(TxnOpResponse::Get(get)) => get.kvs().first(),
        _ => None,
    }
}

/// How many times a call re-reads a key that other controllers change under
/// it before it gives up with [`EtcdError::Contention`].
const CONTENTION: usize = 16;

impl<P: EtcdPayload> EtcdStore<P> {
    async fn register(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        let key = self.shared.keys.router(router);
        for _ in 0..CONTENTION {
            let status = self.shared.status(router).await?;
            let guard = match status {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Some(RouterStatus::Live(incarnation)) => {
                    return Err(RegisterError::AlreadyRegistered {
                        router,
                        incarnation,
                    });
                }
                Some(RouterStatus::Fenced(incarnation)) => {
                    return Err(RegisterError::Deleting {
                        router,
                        incarnation,
                    });
                }
                Some(RouterStatus::Deleted(incarnation)) => Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    keys::router_value(RouterStatus::Deleted(incarnation)),
                ),
            };
            let txn =
                Txn::new()
                    .when([guard])
                    .and_then([TxnOp::put(key.clone(), keys::LIVE, None)]);
            let response = self
                .shared
                .kv()
                .txn(txn)
                .await
                .map_err(EtcdError::request("register router"))?;
            if response.succeeded() {
                return keys::incarnation(revision_of(&response))
                    .ok_or_else(|| EtcdError::corrupt(&key, "no revision in the answer").into());
            }
        }
        Err(EtcdError::Contention {
            key: String::from_utf8_lossy(&key).into_owned(),
        }
        .into())
    }

    async fn create_session(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        let shared = &self.shared;
        let (router, id, incarnation) = (spec.router(), spec.id(), spec.incarnation());
        let mut payload = Vec::new();
        spec.payload_ref().encode(&mut payload);
        let value = keys::encode_open(incarnation, spec.token_bytes(), &payload);
        if value.len() > shared.max_record {
            let error = EtcdError::TooLarge {
                bytes: value.len(),
                limit: shared.max_record,
            };
            return Err(CreateError::new(backend_kind(error), spec));
        }
        let router_key = shared.keys.router(router);
        let pointer = shared.keys.pointer(id);
        let record = shared.keys.record(router, id);
        // A create is a load too: what changes the record before the handle
        // is cached must not be missed.
        let _loads = shared.begin_loads();
        let txn = Txn::new()
            .when({
                let [live, at] = live_in(&router_key, incarnation);
                [
                    live,
                    at,
                    Compare::create_revision(pointer.clone(), CompareOp::Equal, 0),
                ]
            })
            .and_then([
                TxnOp::put(pointer.clone(), router.get().to_be_bytes(), None),
                TxnOp::put(record, value, None),
            ])
            .or_else([TxnOp::get(router_key, None), TxnOp::get(pointer, None)]);
        let response = match shared.kv().txn(txn).await {
            Ok(response) => response,
            Err(error) => {
                let kind = backend_kind(EtcdError::request("create session")(error));
                return Err(CreateError::new(kind, spec));
            }
        };
        if !response.succeeded() {
            let responses = response.op_responses();
            let kind = match txn_get(&responses, 0).map(router_status) {
                None => CreateErrorKind::UnknownRouter(router),
                Some(Err(error)) => backend_kind(error),
                Some(Ok(status)) => match admits(status, router, incarnation) {
                    Err(kind) => kind,
                    Ok(()) => CreateErrorKind::DuplicateSession(id),
                },
            };
            return Err(CreateError::new(kind, spec));
        }
        let created = revision_of(&response);
        let session = spec.into_session_with_generation(generation(created));
        let hook = shared.hook(router, id, incarnation, created, payload.into());
        let _ = session.attach(hook); // new, so open
        let (session, previous, recheck) = {
            let progress = shared.progress.lock();
            let (session, previous) = match shared.cache.entry(id) {
                // A listing racing this create adopted the record first:
                // one handle per record, so that one.
                Entry::Occupied(entry) if entry.get().created == created => {
                    (entry.get().session.clone(), None)
                }
                // A later life of the id is cached: this record was removed
                // by another controller already.
                Entry::Occupied(entry) if entry.get().created > created => {
                    (session.clone(), Some((session, created)))
                }
                Entry::Occupied(mut entry) => {
                    let cached = Cached {
                        session: session.clone(),
                        created,
                    };
                    let previous = std::mem::replace(entry.get_mut(), cached);
                    (session, Some((previous.session, previous.created)))
                }
                Entry::Vacant(entry) => {
                    entry.insert(Cached {
                        session: session.clone(),
                        created,
                    });
                    (session, None)
                }
            };
            let changed = progress.stale(id, created);
            (session, previous, changed)
        };
        if let Some((previous, created)) = previous {
            shared.close_quietly(&previous, created, CloseReason::Reclaimed);
        }
        if recheck {
            // Changed since it was created (by another controller): the
            // handle catches up now. It exists either way.
            if let Err(error) = shared.recheck(vec![(router, id, created)]).await {
                tracing::warn!(%error, %id, "could not re-read a session changed while it was created");
            }
        }
        Ok(session)
    }

    /// Closes the handle of `id` (only if it is the life `key` names) and
    /// deletes its record.
    async fn close_session(
        &self,
        id: SessionId,
        key: Option<SessionKey>,
        reason: CloseReason,
    ) -> Result<(Session<P>, CloseOutcome, bool), SessionError> {
        let session = self
            .shared
            .handle(id)
            .await?
            .filter(|session| key.is_none_or(|key| session.key() == key))
            .ok_or(SessionError::UnknownSession(id))?;
        // The close is queued before the removal: other controllers see
        // the reason first.
        let outcome = session.close(reason);
        let removed = self.shared.remove_record(&session).await?;
        Ok((session, outcome, removed))
    }

    async fn remove_session(
        &self,
        id: SessionId,
        key: Option<SessionKey>,
    ) -> Result<Session<P>, SessionError> {
        match self.close_session(id, key, CloseReason::Reclaimed).await? {
            (session, _, true) => Ok(session),
            // Removed by someone else first (this controller had not heard).
            (_, _, false) => Err(SessionError::UnknownSession(id)),
        }
    }

    async fn fence_router(
        &self,
        router: RouterId,
        expected: Option<Incarnation>,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        let key = self.shared.keys.router(router);
        for _ in 0..CONTENTION {
            let status = self
                .shared
                .status(router)
                .await?
                .ok_or(FenceError::UnknownRouter(router))?;
            let (incarnation, newly_fenced) = match fence_step(router, status, expected)? {
                FenceStep::Resume(incarnation) => (incarnation, false),
                FenceStep::Fence(incarnation) => {
                    let txn = Txn::new()
                        .when(live_in(&key, incarnation))
                        .and_then([TxnOp::put(
                            key.clone(),
                            keys::router_value(RouterStatus::Fenced(incarnation)),
                            None,
                        )]);
                    let response = self
                        .shared
                        .kv()
                        .txn(txn)
                        .await
                        .map_err(EtcdError::request("fence router"))?;
                    if !response.succeeded() {
                        continue; // fenced or re-registered meanwhile: look again
                    }
                    (incarnation, true)
                }
            };
            // Read after the fence: every session created before it is in
            // the listing, unless closed and removed since (I2).
            let sessions = self.shared.router_sessions(router).await?;
            return Ok(FenceSnapshot {
                router,
                incarnation,
                newly_fenced,
                sessions,
            });
        }
        Err(EtcdError::Contention {
            key: String::from_utf8_lossy(&key).into_owned(),
        }
        .into())
    }

    async fn finish_router(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        let shared = &self.shared;
        let key = shared.keys.router(router);
        let fenced = keys::router_value(RouterStatus::Fenced(incarnation));
        let check = |status: Option<RouterStatus>| match status {
            None => Err(FinishError::UnknownRouter(router)),
            Some(status) => check_finishable(router, incarnation, status),
        };
        check(shared.status(router).await?)?;
        // The closes this controller made reach etcd first, with their
        // reasons, before the records go.
        shared.flush().await?;
        let prefix = shared.keys.records(router);
        let (mut removed, mut closed) = (0, 0);
        // Page by page: a linearizable read of the first 1,000 records left,
        // then their deletion; the router is fenced, so nothing new appears.
        loop {
            let options = GetOptions::new()
                .with_range(prefix_end(&prefix))
                .with_limit(PAGE);
            let kvs = shared
                .kv()
                .get(prefix.clone(), Some(options))
                .await
                .map_err(EtcdError::request("list sessions"))?
                .take_kvs();
            if kvs.is_empty() {
                break;
            }
            // This controller's open handles are closed here (the close is
            // written too, guarded: if a deletion below fails, etcd still
            // learns it); `handled` says which closes this call won.
            let mut handled = std::collections::HashMap::new();
            for kv in &kvs {
                let Some(KeyKind::Record(_, id)) = shared.keys.parse(kv.key()) else {
                    continue;
                };
                let created = kv.create_revision();
                let cached = shared.cache.get(&id).filter(|c| c.created == created);
                if let Some(session) = cached.map(|c| c.session.clone()) {
                    handled.insert(id, session.close(CloseReason::Reclaimed).won());
                }
            }
            for (deleted, kind) in self.delete_page(&key, &fenced, kvs).await? {
                let Some(deleted) = deleted else {
                    // No longer fenced in this incarnation: say why.
                    check(shared.status(router).await?)?;
                    continue;
                };
                removed += 1;
                // Closed by this call: a handle here whose close it won, or
                // a record no handle here holds, still open when deleted.
                let open = decode_head(deleted.value()).map_or(true, |h| h.closed.is_none());
                let won = match kind {
                    Some(KeyKind::Record(_, id)) => handled.get(&id).copied().unwrap_or(open),
                    _ => open,
                };
                closed += usize::from(won);
                if let Some(KeyKind::Record(_, id)) = kind {
                    let created = deleted.create_revision();
                    shared.cache.remove_if(&id, |_, c| c.created == created);
                }
            }
        }
        // Confirmed empty by a linearizable count, guarded on the fence:
        // then the tombstone.
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, fenced.clone()),
                Compare::create_revision(prefix.clone(), CompareOp::Equal, 0)
                    .with_range(prefix_end(&prefix)),
            ])
            .and_then([TxnOp::put(
                key.clone(),
                keys::router_value(RouterStatus::Deleted(incarnation)),
                None,
            )]);
        let response = shared
            .kv()
            .txn(txn)
            .await
            .map_err(EtcdError::request("tombstone router"))?;
        if !response.succeeded() {
            check(shared.status(router).await?)?;
            return Err(EtcdError::Contention {
                key: String::from_utf8_lossy(&prefix).into_owned(),
            }
            .into());
        }
        Ok(FinishReport {
            router,
            incarnation,
            removed,
            closed,
        })
    }
}

fn backend_kind(error: EtcdError) -> CreateErrorKind {
    CreateErrorKind::Backend(BackendError::new(error))
}

impl<P: EtcdPayload> EtcdStore<P> {
    /// Deletes the listed records of a fenced router, and their pointers, in
    /// transactions within etcd's [`MAX_TXN_OPS`], several in flight. Each
    /// transaction is guarded on the router still being fenced in the
    /// incarnation (`fenced` at `key`); each record is deleted only if it is
    /// still the one listed (its `create_revision`), and its pointer only if
    /// it was created with it, so a removal racing `finish` and a new life
    /// of the id elsewhere are left alone. Returns, per transaction, `None`
    /// if the router was no longer fenced, else the records it deleted as
    /// they were, with what their keys name.
    async fn delete_page(
        &self,
        key: &[u8],
        fenced: &[u8],
        kvs: Vec<KeyValue>,
    ) -> Result<Vec<(Option<KeyValue>, Option<KeyKind>)>, EtcdError> {
        let shared = &self.shared;
        let mut out = Vec::with_capacity(kvs.len());
        // Two nested transactions per record; etcd counts a nested
        // transaction's operations against what its parent leaves of the
        // 128: 32 records (64 operations) per transaction.
        let pages: Vec<Vec<KeyValue>> = kvs
            .chunks(MAX_TXN_OPS / 4)
            .map(<[KeyValue]>::to_vec)
            .collect();
        let results: Vec<Result<Option<Vec<KeyValue>>, EtcdError>> = futures::stream::iter(pages)
            .map(|page| async move {
                let ops: Vec<TxnOp> = page
                    .iter()
                    .flat_map(|kv| {
                        let created = kv.create_revision();
                        // The record, if it is still this one.
                        let record = TxnOp::txn(
                            Txn::new()
                                .when([Compare::create_revision(
                                    kv.key(),
                                    CompareOp::Equal,
                                    created,
                                )])
                                .and_then([TxnOp::delete(
                                    kv.key(),
                                    Some(DeleteOptions::new().with_prev_key()),
                                )]),
                        );
                        // Its pointer, if created with it.
                        let pointer = match shared.keys.parse(kv.key()) {
                            Some(KeyKind::Record(_, id)) => {
                                let pointer = shared.keys.pointer(id);
                                Some(TxnOp::txn(
                                    Txn::new()
                                        .when([Compare::create_revision(
                                            pointer.clone(),
                                            CompareOp::Equal,
                                            created,
                                        )])
                                        .and_then([TxnOp::delete(pointer, None)]),
                                ))
                            }
                            _ => None,
                        };
                        std::iter::once(record).chain(pointer)
                    })
                    .collect();
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, fenced)])
                    .and_then(ops);
                let response = shared
                    .kv()
                    .txn(txn)
                    .await
                    .map_err(EtcdError::request("delete sessions"))?;
                if !response.succeeded() {
                    return Ok(None);
                }
                // The records deleted, as they were: from the nested
                // transactions whose guard held.
                let deleted = response
                    .op_responses()
                    .into_iter()
                    .filter_map(|op| match op {
                        TxnOpResponse::Txn(nested) if nested.succeeded() => Some(nested),
                        _ => None,
                    })
                    .flat_map(|nested| nested.op_responses())
                    .filter_map(|op| match op {
                        TxnOpResponse::Delete(mut delete) => Some(delete.take_prev_kvs()),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                Ok(Some(deleted))
            })
            .buffer_unordered(shared.concurrency)
            .collect()
            .await;
        for result in results {
            match result? {
                None => out.push((None, None)),
                Some(deleted) => out.extend(deleted.into_iter().map(|kv| {
                    let kind = shared.keys.parse(kv.key());
                    (Some(kv), kind)
                })),
            }
        }
        Ok(out)
    }
}

impl<P: EtcdPayload> SessionStore for EtcdStore<P> {
    type Payload = P;

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.register(router).await
    }

    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.shared
            .status(router)
            .await?
            .ok_or(RouterError::UnknownRouter(router))
    }

    async fn create(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        self.create_session(spec).await
    }

    async fn get(&self, id: SessionId) -> Result<Option<Session<P>>, BackendError> {
        Ok(self.shared.handle(id).await?)
    }

    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        Ok(self.close_session(id, None, reason).await?.1)
    }

    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        Ok(self.close_session(key.id(), Some(key), reason).await?.1)
    }

    async fn remove(&self, id: SessionId) -> Result<Session<P>, SessionError> {
        self.remove_session(id, None).await
    }

    async fn remove_exact(&self, key: SessionKey) -> Result<Session<P>, SessionError> {
        self.remove_session(key.id(), Some(key)).await
    }

    async fn sessions(&self, router: RouterId) -> Result<Vec<Session<P>>, RouterError> {
        if self.shared.status(router).await?.is_none() {
            return Err(RouterError::UnknownRouter(router));
        }
        Ok(self.shared.router_sessions(router).await?)
    }

    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        let keys = &self.shared.keys;
        let prefix = keys.records(router);
        let end = prefix_end(&prefix);
        let txn = Txn::new().and_then([
            TxnOp::get(
                keys.router(router),
                Some(GetOptions::new().with_keys_only()),
            ),
            TxnOp::get(
                prefix,
                Some(GetOptions::new().with_range(end).with_count_only()),
            ),
        ]);
        let response = self
            .shared
            .kv()
            .txn(txn)
            .await
            .map_err(EtcdError::request("count sessions"))?;
        let responses = response.op_responses();
        if txn_get(&responses, 0).is_none() {
            return Err(RouterError::UnknownRouter(router));
        }
        let count = match responses.get(1) {
            Some(TxnOpResponse::Get(get)) => get.count(),
            _ => 0,
        };
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<P>, FenceError> {
        self.fence_router(router, None).await
    }

    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        self.fence_router(router, Some(incarnation)).await
    }

    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.finish_router(router, incarnation).await
    }

    async fn audit(&self) -> Result<AuditReport, BackendError> {
        // This controller's closes first: the audit sees its own writes.
        self.shared.flush().await?;
        Ok(self.scan().await?.audit())
    }

    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.shared.flush().await?;
        let scan = self.scan().await?;
        let mut census: Vec<RouterCensus> = Vec::new();
        for (&router, &status) in &scan.routers {
            let mut counts = RouterCensus::new(router, status);
            for record in scan.records.values().filter(|r| r.router == router) {
                match record.closed {
                    Some(_) => counts.closed += 1,
                    None if self.terminating(record.id, record.created) => counts.terminating += 1,
                    None => counts.active += 1,
                }
            }
            if matches!(status, RouterStatus::Deleted(_)) && counts.sessions() == 0 {
                continue;
            }
            census.push(counts);
        }
        census.sort_unstable_by_key(|counts| counts.router);
        Ok(census)
    }

    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        Ok(self.repair_findings(findings).await?)
    }
}

/// Every router, record and pointer of the store, read at one revision.
struct Scan {
    routers: std::collections::BTreeMap<RouterId, RouterStatus>,
    records: std::collections::BTreeMap<SessionId, ScannedRecord>,
    pointers: std::collections::BTreeMap<SessionId, RouterId>,
    /// Keys that could not be read.
    unreadable: usize,
}

#[derive(Clone, Copy)]
struct ScannedRecord {
    router: RouterId,
    id: SessionId,
    incarnation: Incarnation,
    created: i64,
    closed: Option<CloseReason>,
}

impl Scan {
    fn audit(&self) -> AuditReport {
        let mut report = AuditReport {
            routers: self.routers.len(),
            sessions: self.pointers.len(),
            ..AuditReport::default()
        };
        for record in self.records.values() {
            if self.pointers.get(&record.id) != Some(&record.router) {
                report.missing_from_map.push((record.router, record.id));
            }
            let belongs = self
                .routers
                .get(&record.router)
                .is_some_and(|&status| holds(status, record.incarnation));
            if !belongs {
                report.orphans.push(record.id);
            }
            if record.closed.is_some() {
                report.closed_in_store.push(record.id);
            }
        }
        for (&id, &router) in &self.pointers {
            if self
                .records
                .get(&id)
                .is_none_or(|record| record.router != router)
            {
                report.missing_from_index.push(id);
            }
        }
        report
    }
}

impl<P: EtcdPayload> EtcdStore<P> {
    /// Reads the whole store at one revision.
    async fn scan(&self) -> Result<Scan, EtcdError> {
        let shared = &self.shared;
        let routers = shared.keys.all_routers();
        let (kvs, revision) = shared
            .list(routers.clone(), prefix_end(&routers), None, false)
            .await?;
        let pointers = shared.keys.all_pointers();
        let (pointer_kvs, _) = shared
            .list(
                pointers.clone(),
                prefix_end(&pointers),
                Some(revision),
                false,
            )
            .await?;
        let mut scan = Scan {
            routers: std::collections::BTreeMap::new(),
            records: std::collections::BTreeMap::new(),
            pointers: std::collections::BTreeMap::new(),
            unreadable: 0,
        };
        for kv in kvs.iter().chain(&pointer_kvs) {
            match shared.keys.parse(kv.key()) {
                Some(KeyKind::Router(router)) => match router_status(kv) {
                    Ok(status) => {
                        scan.routers.insert(router, status);
                    }
                    Err(_) => scan.unreadable += 1,
                },
                Some(KeyKind::Record(router, id)) => match decode_head(kv.value()) {
                    Ok(head) => {
                        scan.records.insert(
                            id,
                            ScannedRecord {
                                router,
                                id,
                                incarnation: head.incarnation,
                                created: kv.create_revision(),
                                closed: head.closed,
                            },
                        );
                    }
                    Err(_) => scan.unreadable += 1,
                },
                Some(KeyKind::Pointer(id)) => match parse_pointer(kv) {
                    Ok(router) => {
                        scan.pointers.insert(id, router);
                    }
                    Err(_) => scan.unreadable += 1,
                },
                None => scan.unreadable += 1,
            }
        }
        if scan.unreadable > 0 {
            tracing::warn!(
                keys = scan.unreadable,
                "unreadable keys under the store's prefix"
            );
        }
        Ok(scan)
    }

    /// Whether this controller's handle of the record is `Terminating`.
    fn terminating(&self, id: SessionId, created: i64) -> bool {
        self.shared
            .cache
            .get(&id)
            .is_some_and(|c| c.created == created && c.session.state() == SessionState::Terminating)
    }

    async fn repair_findings(&self, findings: &AuditReport) -> Result<Vec<Repair>, EtcdError> {
        let shared = &self.shared;
        shared.flush().await?;
        // Checked again: the store kept serving since the audit.
        let scan = self.scan().await?;
        let now = scan.audit();
        let fenced =
            |router: RouterId| matches!(scan.routers.get(&router), Some(RouterStatus::Fenced(_)));
        let mut repairs = Vec::new();
        for &(router, id) in &findings.missing_from_map {
            if !now.missing_from_map.contains(&(router, id)) || fenced(router) {
                continue;
            }
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            let belongs = record.closed.is_none()
                && scan
                    .routers
                    .get(&router)
                    .is_some_and(|&status| holds(status, record.incarnation));
            let pointer = shared.keys.pointer(id);
            let record_key = shared.keys.record(router, id);
            if belongs && !scan.pointers.contains_key(&id) {
                // Put the pointer back, if still missing and the record is
                // still this one.
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(pointer.clone(), CompareOp::Equal, 0),
                        Compare::create_revision(record_key, CompareOp::Equal, record.created),
                    ])
                    .and_then([TxnOp::put(pointer, router.get().to_be_bytes(), None)]);
                if self.guarded("restore session pointer", txn).await? {
                    repairs.push(repaired(&record, RepairAction::Restored));
                }
                continue;
            }
            if self.evict(&record, false).await? {
                repairs.push(repaired(&record, RepairAction::DroppedIndexEntry));
            }
        }
        for &id in &findings.missing_from_index {
            if !now.missing_from_index.contains(&id) {
                continue;
            }
            let Some(&router) = scan.pointers.get(&id) else {
                continue;
            };
            if fenced(router) {
                continue;
            }
            // A pointer with no record: the session's data is gone, so the
            // id is released.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    shared.keys.record(router, id),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::delete(shared.keys.pointer(id), None)]);
            if self.guarded("drop dangling pointer", txn).await? {
                if let Some((_, cached)) = shared.cache.remove(&id) {
                    shared.close_quietly(&cached.session, cached.created, CloseReason::Reclaimed);
                }
                repairs.push(Repair {
                    session: id,
                    router,
                    incarnation: Incarnation::new(0),
                    action: RepairAction::OrphanReclaimed,
                });
            }
        }
        for &id in &findings.orphans {
            if !now.orphans.contains(&id) {
                continue; // not an orphan (any more)
            }
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            if self.evict(&record, true).await? {
                repairs.push(repaired(&record, RepairAction::OrphanReclaimed));
            }
        }
        for &id in &findings.closed_in_store {
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            if record.closed.is_none() || fenced(record.router) || now.orphans.contains(&id) {
                continue; // a deletion's `finish` or the orphan pass has it
            }
            if self.evict(&record, true).await? {
                repairs.push(repaired(&record, RepairAction::ClosedRemoved));
            }
        }
        Ok(repairs)
    }

    /// Closes (this controller's handle of) the record with `Reclaimed` and
    /// deletes it, and its pointer if `pointer` and it points here.
    async fn evict(&self, record: &ScannedRecord, pointer: bool) -> Result<bool, EtcdError> {
        let shared = &self.shared;
        let cached = shared
            .cache
            .get(&record.id)
            .filter(|c| c.created == record.created)
            .map(|c| c.session.clone());
        if let Some(session) = &cached {
            // Written through the writer too: if the deletion below fails,
            // etcd still learns the session is closed.
            let _ = session.close(CloseReason::Reclaimed);
        }
        let record_key = shared.keys.record(record.router, record.id);
        let mut txn = Txn::new().when([Compare::create_revision(
            record_key.clone(),
            CompareOp::Equal,
            record.created,
        )]);
        let mut ops = vec![TxnOp::delete(record_key, None)];
        if pointer {
            // The pointer goes with the record if it was created with it.
            let pointer = shared.keys.pointer(record.id);
            ops.push(TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(
                        pointer.clone(),
                        CompareOp::Equal,
                        record.created,
                    )])
                    .and_then([TxnOp::delete(pointer, None)]),
            ));
        }
        txn = txn.and_then(ops);
        let deleted = self.guarded("reclaim session", txn).await?;
        if deleted {
            shared
                .cache
                .remove_if(&record.id, |_, c| c.created == record.created);
        }
        Ok(deleted)
    }

    /// Sends a guarded repair; `true` if its guard held.
    async fn guarded(&self, operation: &'static str, txn: Txn) -> Result<bool, EtcdError> {
        let response = self
            .shared
            .kv()
            .txn(txn)
            .await
            .map_err(EtcdError::request(operation))?;
        Ok(response.succeeded())
    }
}

fn repaired(record: &ScannedRecord, action: RepairAction) -> Repair {
    Repair {
        session: record.id,
        router: record.router,
        incarnation: record.incarnation,
        action,
    }
}
