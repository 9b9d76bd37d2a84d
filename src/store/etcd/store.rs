//! [`EtcdStore`] itself: its public methods and the `SessionStore` impl.

use std::fmt;
use std::sync::Arc;

use etcd_client::{Client, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::keys::prefix_end;
use super::shared::Shared;
use super::txn::txn_get;
use super::{EtcdError, EtcdPayload};
use crate::events::Repair;
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session};
use crate::store::SessionStore;
use crate::store::error::{
    BackendError, CreateError, FenceError, FinishError, RegisterError, RouterError, SessionError,
};
use crate::store::report::{AuditReport, FenceSnapshot, FinishReport, RouterCensus, RouterStatus};

/// The session store on etcd: several controllers share one set of
/// sessions, with the same guarantees as [`MemoryStore`](crate::MemoryStore)
/// (fence, incarnations, index consistency, cleanup in the store).
///
/// Behind the cargo feature `etcd`.
///
/// # Keys
///
/// Under the prefix `P` (default [`DEFAULT_PREFIX`](super::DEFAULT_PREFIX)): `P r/<router>` holds
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
/// - A [`close`](SessionStore::close) or
///   [`close_exact`](SessionStore::close_exact) that finds the session
///   closing by another caller of this controller, its resources still
///   being released, waits for that close to complete before it removes
///   the record: a deletion that resumes meanwhile still lists the
///   session, and waits for its release (I1). A
///   [`remove`](SessionStore::remove) or
///   [`remove_exact`](SessionStore::remove_exact) does not wait: it
///   returns the session at once and leaves the record to a task of the
///   current runtime that deletes it once that close completes.
/// - A `create` that commits just before its router's fence and answers
///   only after the whole deletion finished gets a handle of its own, open,
///   which closes (`Reclaimed`) as soon as the watch reports the record
///   gone; the deletion closed (and counted) another handle of that session.
/// - [`get`](SessionStore::get) answers from the handle this controller
///   holds when it holds one (kept current by the watch) and reads etcd
///   otherwise; every other method reads etcd (linearizable reads).
/// - A deletion is driven by the same [`RouterDeleter`](crate::RouterDeleter):
///   its wait sees confirmations through the watch, and
///   [`finish`](SessionStore::finish) lists the router's keys (keys and
///   revisions only, 1,000 per request), deletes them 32 per transaction
///   (within `max_txn_ops`, 4 transactions in flight) and writes the
///   tombstone once a final listing finds nothing of the incarnation left.
///   If the controller running a deletion dies after the fence,
///   `RouterDeleter::delete` on another controller resumes it.
/// - Concurrent creates share transactions (up to
///   [`create_batch`](super::EtcdStoreBuilder::create_batch), default 64): each
///   is a nested transaction with its own guards and its own outcome.
///
/// # Record format and versions
///
/// A session record starts with a version byte (1 today), then the state,
/// the close reason, the incarnation and the token (see the `keys`
/// module), then the payload as [`EtcdPayload::encode`] wrote it. A
/// controller reads only the record versions it knows and its own payload
/// type. A record it cannot read (a newer version, another payload type
/// during a rolling upgrade, garbage) is:
///
/// - left out of `sessions` and a fence's snapshot
///   (logged), and an error for `get` of its id: no handle of it exists on
///   this controller, so it is never closed or written back here;
/// - reported by [`audit`](SessionStore::audit) in
///   [`AuditReport::unreadable`](crate::AuditReport::unreadable), and
///   removed by [`repair`](SessionStore::repair) only when its router is
///   deleted (a newer controller may still read it; a key of a router the
///   store does not know may be another writer's);
/// - deleted, with its pointer, by its router's
///   [`finish`](SessionStore::finish), and counted in
///   [`FinishReport::unreadable`](crate::FinishReport::unreadable): it
///   never keeps a router fenced.
///
/// A newer controller that writes a new record version must therefore
/// come after every controller reads it: deploy the reader first, then
/// the writer. An older controller's version-1 records are read by every
/// later one. A key under the prefix that is not in the key format
/// (another store's prefix nested in this one's) is foreign: reported by
/// `audit` and `finish`, never deleted, never blocking.
///
/// # Limits
///
/// - Deleted routers keep their tombstone key (`deleted <incarnation>`)
///   forever; `audit` and `census` read every router key.
/// - While etcd is unreachable, closes made on handles queue in memory
///   (unbounded) until etcd takes them.
/// - A record is at most [`MAX_RECORD_LIMIT`](super::MAX_RECORD_LIMIT)
///   (1 MiB: etcd refuses requests over 1.5 MiB); a listing reads as many
///   records as fit in 16 MiB.
/// - A pointer put back by [`repair`](SessionStore::repair) is not deleted
///   by `finish` (it is not the one created with the record); the next
///   repair drops it.
/// - The store publishes no [`Event`](crate::Event)s and counts no
///   `metrics` of its own; the deleter, monitor, reconciler and sweeper
///   driving it do.
///
/// # Faults
///
/// The store keeps serving while etcd does (a majority of its members up,
/// I10). Give it every member's endpoint: requests are balanced over them,
/// a connection whose keep-alive goes unanswered (a hung member) is
/// dropped, and a member without a leader answers at once instead of
/// serving a stalled watch.
///
/// - Every read, the fence, `finish`'s deletions, the tombstone and
///   repairs are safe to repeat: a transient failure (a member down, no
///   leader, a timeout) is retried on another member with jittered
///   exponential backoff (25 ms to 1 s) until
///   [`retry_deadline`](super::EtcdStoreBuilder::retry_deadline) (15 s) after the
///   first attempt; then the call fails with a [`BackendError`] of kind
///   [`Unavailable`](crate::BackendErrorKind::Unavailable), and calling
///   again is safe.
/// - Closes and removals made on handles go through the background writer,
///   retried until etcd takes them; a caller that waited
///   [`write_timeout`](super::EtcdStoreBuilder::write_timeout) gets kind
///   [`Pending`](crate::BackendErrorKind::Pending): the write will land.
/// - `create` and `register_router` never apply twice. After a failure
///   that may have landed, the store looks (the session's pointer, the
///   router's state): if it did not land, it is sent again (still guarded,
///   so a late landing of the first attempt and the second exclude each
///   other); if it landed or the look fails, the call fails with kind
///   [`OutcomeUnknown`](crate::BackendErrorKind::OutcomeUnknown) (get the
///   session or read the router's status to learn which). A create that
///   was certainly never sent fails with `Unavailable`: it did not apply.
/// - etcd applies a transaction whole or not at all: nothing is ever half
///   applied. Refusals (too large, too many operations) are split where a
///   request can be, and otherwise fail with kind
///   [`TooLarge`](crate::BackendErrorKind::TooLarge) or
///   [`Refused`](crate::BackendErrorKind::Refused).
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
    pub(super) shared: Arc<Shared<P>>,
    pub(super) client: Client,
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

/// Counters of an [`EtcdStore`]'s requests, besides its writer's
/// ([`WriterStats`]). Read one by one: not a consistent cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdStats {
    /// Sessions created.
    pub creates: u64,
    /// Transactions that carried creates (concurrent creates share one).
    pub create_transactions: u64,
    /// Creates answered [`EtcdError::OutcomeUnknown`].
    pub creates_unknown: u64,
    /// Requests that failed transiently and were sent again (reads, guarded
    /// writes, the writer's and the watch's retries).
    pub retries: u64,
    /// Reads of records done again because a change may have been missed
    /// while they were loaded.
    pub rechecks: u64,
    /// Members that get no requests now: they did not answer the last
    /// member check (see [`EtcdStoreBuilder::member_check`]).
    ///
    /// [`EtcdStoreBuilder::member_check`]: super::EtcdStoreBuilder::member_check
    pub members_excluded: u64,
    /// Times a member was left out of the requests since the store
    /// connected.
    pub member_exclusions: u64,
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

    /// The store's request counters.
    #[must_use]
    pub fn stats(&self) -> EtcdStats {
        use std::sync::atomic::Ordering::Relaxed;
        let creates = &self.shared.create_counters;
        EtcdStats {
            creates: creates.creates.load(Relaxed),
            create_transactions: creates.transactions.load(Relaxed),
            creates_unknown: creates.unknown.load(Relaxed),
            retries: self.shared.retry.retried(),
            rechecks: self.shared.rechecks.load(Relaxed),
            members_excluded: self.shared.member_counters.excluded.load(Relaxed),
            member_exclusions: self.shared.member_counters.exclusions.load(Relaxed),
        }
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
        Ok(self.close_session(id, None, reason, true).await?.1)
    }

    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        Ok(self
            .close_session(key.id(), Some(key), reason, true)
            .await?
            .1)
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
        // The range of this store's own record keys (16 lower-case hex
        // digits), not the whole of `r/<router>/s/`: keys of other writers
        // there (a nested store's, look-alikes) mostly fall outside it.
        let first = keys.record(router, SessionId::new(0));
        let end = prefix_end(&keys.record(router, SessionId::new(u64::MAX)));
        let txn = Txn::new().and_then([
            TxnOp::get(
                keys.router(router),
                Some(GetOptions::new().with_keys_only()),
            ),
            TxnOp::get(
                first,
                Some(GetOptions::new().with_range(end).with_count_only()),
            ),
        ]);
        let response = self.shared.txn("count sessions", txn).await?;
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
