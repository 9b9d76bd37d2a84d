//! The session store: the trait, its reports, the in-memory store, and
//! [`BoxStore`] for a store chosen at run time.

mod boxed;
mod error;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
mod memory;
mod report;
mod rules;

use std::future::Future;

pub use crate::events::{Repair, RepairAction};
pub use boxed::BoxStore;
pub use error::{
    BackendError, BackendErrorKind, CreateError, CreateErrorKind, FenceError, FinishError,
    RegisterError, RouterError, SessionError,
};
#[cfg(any(test, feature = "test-util"))]
pub use memory::{Corruption, Fault};
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use report::{AuditReport, FenceSnapshot, FinishReport, RouterCensus, RouterStatus};

use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session};

/// Where the sessions of a controller live.
///
/// The methods are async so a remote store (etcd) can implement the trait;
/// [`MemoryStore`] answers every call without waiting (yielding between
/// slices on big routers' `fence` and `finish`). Implementations keep
/// these guarantees, which the rest of the crate relies on:
///
/// - **Fence (I2).** Once [`fence`](Self::fence) returned for a router, every
///   [`create`](Self::create) on that router, or on any older incarnation of
///   it, fails; and every session created before is in the fence's snapshot
///   or already closed and removed. The snapshot lists each session once
///   (a deletion counts what it lists: a session listed twice is counted,
///   notified and confirmed twice in its report).
/// - **Incarnations.** [`register_router`](Self::register_router) hands out a
///   larger incarnation each time a router id is registered after deletion;
///   a session names the incarnation it is created against and is refused
///   unless that incarnation is live.
/// - **Index consistency (I7).** The router→sessions index and the session
///   map agree; [`audit`](Self::audit) checks it.
/// - **Cleanup lives in the store.** [`close`](Self::close) closes and
///   removes; [`finish`](Self::finish) closes whatever is left of a fenced
///   router before it tombstones the incarnation, whatever path got there.
/// - **No waiting on the deletion that calls.** A
///   [`RouterDeleter`](crate::RouterDeleter) awaits the store's methods
///   with no deadline of its own (a notifier's call has one): a method
///   that awaits a deletion of the very router it is called for, from
///   inside that call, waits for itself, and the deletion never ends.
///   Spawn such work instead; awaiting the deletion of another router is
///   fine, with or without
///   [`max_concurrent`](crate::RouterDeleterBuilder::max_concurrent)
///   (a deletion started from inside a running one takes no slot; await
///   it there, not a task spawned for it).
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
///
/// let session = store.create(NewSession::new(SessionId::new(10), router, incarnation)).await?;
/// assert_eq!(store.count(router).await?, 1);
///
/// let snapshot = store.fence(router).await?;
/// assert_eq!(snapshot.sessions.len(), 1);
/// let late = store.create(NewSession::new(SessionId::new(11), router, incarnation)).await;
/// assert!(late.is_err()); // fenced
///
/// let _ = store.close(session.id(), CloseReason::RouterDeleted).await?;
/// store.finish(router, incarnation).await?;
/// assert!(store.audit().await?.is_clean());
///
/// // The router comes back after its deletion: a new life, which a late
/// // request to fence the old one leaves alone.
/// assert!(store.register_router(router).await? > incarnation);
/// assert!(store.fence_incarnation(router, incarnation).await.is_err());
/// # Ok(())
/// # }
/// ```
pub trait SessionStore: Send + Sync + 'static {
    /// The user payload each session carries.
    type Payload: Send + Sync + 'static;

    /// Registers a router and returns its new incarnation; a router whose
    /// previous incarnation was deleted gets a larger one.
    ///
    /// # Errors
    ///
    /// [`RegisterError::AlreadyRegistered`] if the router is live,
    /// [`RegisterError::Deleting`] while it is fenced.
    fn register_router(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Incarnation, RegisterError>> + Send;

    /// The router's phase and incarnation.
    ///
    /// # Errors
    ///
    /// [`RouterError::UnknownRouter`] if the store does not know the router
    /// (never registered, or its tombstone was evicted).
    fn router_status(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<RouterStatus, RouterError>> + Send;

    /// Creates a session, if its router is live in the session's incarnation.
    /// See the example on [`SessionStore`].
    ///
    /// # Errors
    ///
    /// [`CreateError`] says why (unknown router, stale incarnation, fenced or
    /// deleted router, duplicate id) and hands the description back; nothing
    /// changed in the store.
    fn create(
        &self,
        spec: NewSession<Self::Payload>,
    ) -> impl Future<Output = Result<Session<Self::Payload>, CreateError<Self::Payload>>> + Send;

    /// The session with this id, if the store holds it.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    fn get(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<Session<Self::Payload>>, BackendError>> + Send;

    /// Closes the session with `reason` and removes it from the store. See
    /// the example on [`SessionStore`].
    ///
    /// Closing a session that is already closed is not an error: the outcome
    /// says this caller lost the race, and the session is still removed.
    /// The close acts on whichever session holds `id` when it runs; for a
    /// message that may arrive late or twice, use
    /// [`close_exact`](Self::close_exact).
    ///
    /// # Errors
    ///
    /// [`SessionError::UnknownSession`] if the store does not hold the id.
    fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> impl Future<Output = Result<CloseOutcome, SessionError>> + Send;

    /// Removes the session from the store and returns it. A session that is
    /// still open is closed first with [`CloseReason::Reclaimed`]: no session
    /// leaves the store open.
    ///
    /// # Errors
    ///
    /// [`SessionError::UnknownSession`] if the store does not hold the id.
    fn remove(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Session<Self::Payload>, SessionError>> + Send;

    /// Closes the session whose [`SessionKey`] is `key` with `reason` and
    /// removes it, if the store holds that very session; a later session
    /// reusing the id is left alone. Use it for anything that may arrive
    /// late or twice: a router's confirmation of a
    /// [`TerminationBatch`](crate::TerminationBatch) (which carries the
    /// keys), a retried message, a cleanup that looked the session up earlier.
    ///
    /// # Errors
    ///
    /// [`SessionError::UnknownSession`] if the store holds no session with
    /// this key (removed already, or the id now belongs to another session),
    /// [`SessionError::Backend`] if the backend failed.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let store = MemoryStore::new();
    /// # let router = RouterId::new(1);
    /// # let incarnation = store.register_router(router).await?;
    /// let id = SessionId::new(1);
    /// let old = store.create(NewSession::new(id, router, incarnation)).await?;
    /// assert!(store.close_exact(old.key(), CloseReason::ClientClosed).await?.won());
    ///
    /// // A duplicate of that close, after the id was reused, is refused.
    /// let new = store.create(NewSession::new(id, router, incarnation)).await?;
    /// assert!(store.close_exact(old.key(), CloseReason::ClientClosed).await.is_err());
    /// assert!(!new.is_closed());
    /// # Ok(())
    /// # }
    /// ```
    fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> impl Future<Output = Result<CloseOutcome, SessionError>> + Send;

    /// Removes the session whose [`SessionKey`] is `key` and returns it, as
    /// [`remove`](Self::remove) does, if the store holds that very session.
    /// A later session holding the same id is left alone.
    ///
    /// # Errors
    ///
    /// [`SessionError::UnknownSession`] if the store holds no session with
    /// this key, [`SessionError::Backend`] if the backend failed.
    fn remove_exact(
        &self,
        key: SessionKey,
    ) -> impl Future<Output = Result<Session<Self::Payload>, SessionError>> + Send;

    /// The sessions the store holds for the router, in no particular order.
    ///
    /// # Errors
    ///
    /// [`RouterError::UnknownRouter`] if the store does not know the router.
    fn sessions(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Vec<Session<Self::Payload>>, RouterError>> + Send;

    /// How many sessions the store holds for the router.
    ///
    /// # Errors
    ///
    /// [`RouterError::UnknownRouter`] if the store does not know the router.
    fn count(&self, router: RouterId) -> impl Future<Output = Result<usize, RouterError>> + Send;

    /// Fences the router: atomically stops every creation on it and returns
    /// a snapshot of its sessions. See the example on [`SessionStore`].
    ///
    /// Fencing a router that is already fenced returns a fresh snapshot
    /// (with [`FenceSnapshot::newly_fenced`] false): this is how an
    /// interrupted deletion resumes.
    ///
    /// # Errors
    ///
    /// [`FenceError::UnknownRouter`], or [`FenceError::AlreadyDeleted`] if the
    /// router's last incarnation is deleted.
    fn fence(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<FenceSnapshot<Self::Payload>, FenceError>> + Send;

    /// Fences the router as [`fence`](Self::fence) does, but only in
    /// `incarnation`: a request that names an older incarnation fences
    /// nothing, so a delayed or duplicated deletion can never fence the
    /// router's newer life.
    ///
    /// # Errors
    ///
    /// [`FenceError::AlreadyDeleted`] (with `incarnation`) if `incarnation`
    /// is deleted, or older than the router's current one;
    /// [`FenceError::IncarnationMismatch`] if it is newer than any the
    /// router has had; [`FenceError::UnknownRouter`]; [`FenceError::Backend`].
    /// See the example on [`SessionStore`].
    fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FenceSnapshot<Self::Payload>, FenceError>> + Send;

    /// Finishes the deletion of a fenced router incarnation: closes (with
    /// [`CloseReason::Reclaimed`]) any session still open, removes every
    /// session of the router, and tombstones the incarnation. See the
    /// example on [`SessionStore`].
    ///
    /// # Errors
    ///
    /// [`FinishError`] if the router is unknown, not fenced, in another
    /// incarnation, or already deleted; nothing changed then.
    fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FinishReport, FinishError>> + Send;

    /// Removes from the store those of `sessions` that are closed and
    /// belong to `router`'s fenced `incarnation` (this very session of each
    /// id), as [`finish`](Self::finish) would; returns how many it removed.
    ///
    /// A deletion calls it before `finish` with the sessions it saw close
    /// without leaving the store (confirmed by handle, or forced), in the
    /// order it walked them: a store may remove them here at less cost
    /// than `finish`'s own walk. [`MemoryStore`] does
    /// (in that order, which is memory order: a million sessions' walk of
    /// the index in hash order costs several times more). The default
    /// removes nothing and leaves them to `finish`, which must remove them
    /// either way.
    ///
    /// # Errors
    ///
    /// [`FinishError`] if the router is unknown, not fenced, in another
    /// incarnation, or already deleted; nothing was removed then.
    fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<Self::Payload>],
    ) -> impl Future<Output = Result<usize, FinishError>> + Send {
        let _ = (router, incarnation, sessions);
        std::future::ready(Ok(0))
    }

    /// Checks the router index against the session map and looks for
    /// orphans. It does not repair anything; see [`repair`](Self::repair).
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    fn audit(&self) -> impl Future<Output = Result<AuditReport, BackendError>> + Send;

    /// Counts each known router's sessions by state, for capacity planning
    /// and [`Stats`](crate::Stats). Routers whose last incarnation is
    /// deleted and that hold no session are left out.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    fn census(&self) -> impl Future<Output = Result<Vec<RouterCensus>, BackendError>> + Send;

    /// Repairs what an [`audit`](Self::audit) found. Each finding is checked
    /// again first (the store kept serving since the audit), and only what is
    /// still wrong is repaired:
    ///
    /// - a session missing from its router's index is indexed again if it
    ///   is open and its router holds its incarnation, and reclaimed as an
    ///   orphan otherwise;
    /// - an index entry missing from the session map is put back if its
    ///   session is open and the id is free, and dropped otherwise;
    /// - an orphan is closed with [`CloseReason::Reclaimed`] (if still open)
    ///   and removed;
    /// - a closed session left in the store is removed.
    ///
    /// Findings on a fenced router are left alone: its sessions belong to
    /// its deletion, whose `finish` removes them (and once the router is
    /// tombstoned, whatever the deletion missed is an orphan for the next
    /// repair). Sessions are closed outside the store's locks, and a session
    /// already closed is not closed again, so a repair racing a deletion
    /// never releases anything twice.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed; repairs made before
    /// the failure stay made.
    ///
    /// See the example on [`Repair`].
    fn repair(
        &self,
        findings: &AuditReport,
    ) -> impl Future<Output = Result<Vec<Repair>, BackendError>> + Send;
}
