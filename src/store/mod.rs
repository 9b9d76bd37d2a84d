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
/// [`MemoryStore`] answers every call without waiting. Implementations keep
/// these guarantees, which the rest of the crate relies on:
///
/// - **Fence (I2).** Once [`fence`](Self::fence) returned for a router, every
///   [`create`](Self::create) on that router, or on any older incarnation of
///   it, fails; and every session created before is in the fence's snapshot
///   or already closed and removed.
/// - **Incarnations.** [`register_router`](Self::register_router) hands out a
///   larger incarnation each time a router id is registered after deletion;
///   a session names the incarnation it is created against and is refused
///   unless that incarnation is live.
/// - **Index consistency (I7).** The router→sessions index and the session
///   map agree; [`audit`](Self::audit) checks it.
/// - **Cleanup lives in the store.** [`close`](Self::close) closes and
///   removes; [`finish`](Self::finish) closes whatever is left of a fenced
///   router before it tombstones the incarnation, whatever path got there.
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
/// # Ok(())
/// # }
/// ```
pub trait SessionStore: Send + Sync + 'static {
    /// The user payload each session carries.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// /// Works with any store whose sessions carry the client's name.
    /// async fn client_name<S>(store: &S, id: SessionId) -> Option<String>
    /// where
    ///     S: SessionStore<Payload = String>,
    /// {
    ///     let session = store.get(id).await.ok()??;
    ///     Some(session.payload().clone())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store: MemoryStore<String> = MemoryStore::default();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let spec = NewSession::new(SessionId::new(1), router, incarnation)
    ///     .payload("alice".to_owned());
    /// let _ = store.create(spec).await?;
    /// assert_eq!(client_name(&store, SessionId::new(1)).await.as_deref(), Some("alice"));
    /// # Ok(())
    /// # }
    /// ```
    type Payload: Send + Sync + 'static;

    /// Registers a router and returns its new incarnation.
    ///
    /// A router whose previous incarnation was deleted gets a larger one.
    ///
    /// # Errors
    ///
    /// [`RegisterError::AlreadyRegistered`] if the router is live,
    /// [`RegisterError::Deleting`] while it is fenced.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, RouterId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ = store.fence(router).await?;
    /// let _ = store.finish(router, incarnation).await?;
    ///
    /// // The router comes back after its deletion: a new life.
    /// let again = store.register_router(router).await?;
    /// assert!(again > incarnation);
    /// # Ok(())
    /// # }
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, RouterId, store::RouterStatus, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// assert_eq!(store.router_status(router).await?, RouterStatus::Live(incarnation));
    /// assert!(store.router_status(RouterId::new(2)).await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    fn router_status(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<RouterStatus, RouterError>> + Send;

    /// Creates a session, if its router is live in the session's incarnation.
    ///
    /// # Errors
    ///
    /// [`CreateError`] says why (unknown router, stale incarnation, fenced or
    /// deleted router, duplicate id) and hands the description back; nothing
    /// changed in the store.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let spec = NewSession::new(SessionId::new(1), router, incarnation)
    ///     .token(b"t0k3n".to_vec());
    /// let session = store.create(spec).await?;
    /// assert_eq!(session.router(), router);
    /// # Ok(())
    /// # }
    /// ```
    fn create(
        &self,
        spec: NewSession<Self::Payload>,
    ) -> impl Future<Output = Result<Session<Self::Payload>, CreateError<Self::Payload>>> + Send;

    /// The session with this id, if the store holds it.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let created =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let found = store.get(SessionId::new(1)).await?.expect("held");
    /// assert_eq!(found.id(), created.id());
    /// assert!(store.get(SessionId::new(2)).await?.is_none());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    fn get(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<Session<Self::Payload>>, BackendError>> + Send;

    /// Closes the session with `reason` and removes it from the store.
    ///
    /// Closing a session that is already closed is not an error: the outcome
    /// says this caller lost the race, and the session is still removed.
    ///
    /// The close acts on whichever session holds `id` when it runs. For a
    /// message that may arrive late or twice (a router's confirmation, a
    /// retry), use [`close_exact`](Self::close_exact) with the session's
    /// [`SessionKey`]: a later session that reuses the id is not touched.
    ///
    /// # Errors
    ///
    /// [`SessionError::UnknownSession`] if the store does not hold the id.
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
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// // The client hung up.
    /// let outcome = store.close(session.id(), CloseReason::ClientClosed).await?;
    /// assert!(outcome.won());
    /// assert!(session.is_closed());
    /// assert!(store.get(session.id()).await?.is_none());
    /// # Ok(())
    /// # }
    /// ```
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
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let removed = store.remove(SessionId::new(1)).await?;
    /// // No session leaves the store open.
    /// assert_eq!(removed.close_reason(), Some(CloseReason::Reclaimed));
    /// assert!(store.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    fn remove(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Session<Self::Payload>, SessionError>> + Send;

    /// Closes the session whose [`SessionKey`] is `key` with `reason` and
    /// removes it from the store, if the store holds that very session. A
    /// later session holding the same id (the id was reused) is left alone.
    ///
    /// This is the close for anything that may arrive late or twice: a
    /// router's confirmation of a [`TerminationBatch`](crate::TerminationBatch)
    /// (which carries the keys), a retried message, a cleanup that looked
    /// the session up earlier. [`close`](Self::close) acts on whatever
    /// session holds the id when it runs.
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
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
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

    /// Removes the session whose [`SessionKey`] is `key` from the store and
    /// returns it, if the store holds that very session; closes it first
    /// with [`CloseReason::Reclaimed`] if it is open. A later session
    /// holding the same id is left alone.
    ///
    /// # Errors
    ///
    /// [`SessionError::UnknownSession`] if the store holds no session with
    /// this key, [`SessionError::Backend`] if the backend failed.
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
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let removed = store.remove_exact(session.key()).await?;
    /// assert_eq!(removed.close_reason(), Some(CloseReason::Reclaimed));
    /// assert!(store.remove_exact(session.key()).await.is_err()); // gone
    /// # Ok(())
    /// # }
    /// ```
    fn remove_exact(
        &self,
        key: SessionKey,
    ) -> impl Future<Output = Result<Session<Self::Payload>, SessionError>> + Send;

    /// The sessions the store holds for the router, in no particular order.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// for id in 1..=3 {
    ///     let _ = store
    ///         .create(NewSession::new(SessionId::new(id), router, incarnation))
    ///         .await?;
    /// }
    /// let mut ids: Vec<_> =
    ///     store.sessions(router).await?.iter().map(|s| s.id()).collect();
    /// ids.sort();
    /// assert_eq!(ids, [1, 2, 3].map(SessionId::new));
    /// # Ok(())
    /// # }
    /// ```
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
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// assert_eq!(store.count(router).await?, 0);
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// assert_eq!(store.count(router).await?, 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`RouterError::UnknownRouter`] if the store does not know the router.
    fn count(&self, router: RouterId) -> impl Future<Output = Result<usize, RouterError>> + Send;

    /// Fences the router: atomically stops every creation on it and returns
    /// a snapshot of its sessions.
    ///
    /// Fencing a router that is already fenced returns a fresh snapshot
    /// (with [`FenceSnapshot::newly_fenced`] false): this is how an
    /// interrupted deletion resumes.
    ///
    /// # Errors
    ///
    /// [`FenceError::UnknownRouter`], or [`FenceError::AlreadyDeleted`] if the
    /// router's last incarnation is deleted.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// let snapshot = store.fence(router).await?;
    /// assert_eq!(snapshot.sessions.len(), 1);
    /// // No session can be created on the router any more (invariant I2).
    /// let late =
    ///     store.create(NewSession::new(SessionId::new(2), router, incarnation)).await;
    /// assert!(late.is_err());
    /// # Ok(())
    /// # }
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{store::FenceError, MemoryStore, RouterId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let old = store.register_router(router).await?;
    /// let _ = store.fence_incarnation(router, old).await?;
    /// let _ = store.finish(router, old).await?;
    /// let new = store.register_router(router).await?;
    ///
    /// // A late request to delete the old life leaves the new one alone.
    /// let late = store.fence_incarnation(router, old).await;
    /// assert!(matches!(late, Err(FenceError::AlreadyDeleted { incarnation, .. }) if incarnation == old));
    /// assert_eq!(store.router_status(router).await?, session_lifecycle::RouterStatus::Live(new));
    /// # Ok(())
    /// # }
    /// ```
    fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FenceSnapshot<Self::Payload>, FenceError>> + Send;

    /// Finishes the deletion of a fenced router incarnation: closes (with
    /// [`CloseReason::Reclaimed`]) any session still open, removes every
    /// session of the router, and tombstones the incarnation.
    ///
    /// # Errors
    ///
    /// [`FinishError`] if the router is unknown, not fenced, in another
    /// incarnation, or already deleted; nothing changed then.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     MemoryStore, NewSession, RouterId, store::RouterStatus, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let _ = store.fence(router).await?;
    ///
    /// let report = store.finish(router, incarnation).await?;
    /// assert_eq!(report.removed, 1);
    /// assert_eq!(store.router_status(router).await?, RouterStatus::Deleted(incarnation));
    /// # Ok(())
    /// # }
    /// ```
    fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FinishReport, FinishError>> + Send;

    /// Checks the router index against the session map and looks for
    /// orphans. It does not repair anything.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// let report = store.audit().await?;
    /// assert!(report.is_clean(), "{report:?}");
    /// assert_eq!(report.sessions, 1);
    /// # Ok(())
    /// # }
    /// ```
    fn audit(&self) -> impl Future<Output = Result<AuditReport, BackendError>> + Send;

    /// Counts each known router's sessions by state, for capacity planning
    /// and [`Stats`](crate::Stats). Routers whose last incarnation is
    /// deleted and that hold no session are left out.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// let census = store.census().await?;
    /// assert_eq!(census.len(), 1);
    /// assert_eq!((census[0].router, census[0].active), (router, 1));
    /// # Ok(())
    /// # }
    /// ```
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
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let _ = session.close(CloseReason::ClientClosed); // closed, not removed
    ///
    /// let findings = store.audit().await?;
    /// assert!(!findings.is_clean());
    /// let repairs = store.repair(&findings).await?;
    /// assert_eq!(repairs.len(), 1);
    /// assert!(store.audit().await?.is_clean());
    /// # Ok(())
    /// # }
    /// ```
    fn repair(
        &self,
        findings: &AuditReport,
    ) -> impl Future<Output = Result<Vec<Repair>, BackendError>> + Send;
}
