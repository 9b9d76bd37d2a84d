//! [`ReconcileReport`], the outcome of a reconciliation, and
//! [`ReconcileError`].

use crate::events::ReconcileSummary;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::store::{BackendError, RouterError, RouterStatus};

/// The outcome of [`Reconciler::reconcile`](crate::Reconciler::reconcile).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let kept =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let lost =
///     store.create(NewSession::new(SessionId::new(2), router, incarnation)).await?;
///
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
/// let report =
///     reconciler.reconcile(router, incarnation, [kept.id(), SessionId::new(7)]).await?;
/// // Tell the router to drop what the controller does not hold...
/// assert_eq!(report.drop, vec![SessionId::new(7)]);
/// // ...and the sessions the router lost were closed here.
/// assert_eq!(report.closed, vec![lost.id()]);
/// assert!(lost.is_closed() && !kept.is_closed());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// The counts.
    pub summary: ReconcileSummary,
    /// Sessions the router should drop: reported, but unknown to the
    /// controller, closed, or of another router or incarnation. Sorted.
    pub drop: Vec<SessionId>,
    /// Sessions the router no longer holds, closed on the controller by this
    /// call. Sorted.
    pub closed: Vec<SessionId>,
}

/// Why a reconciliation or a grace period was refused.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     Incarnation, MemoryStore, reconcile::ReconcileError, Reconciler, RouterId, store::RouterStatus,
///     SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
///
/// // A report from an older life of the router is refused, and changes nothing.
/// let stale =
///     reconciler.reconcile(router, Incarnation::new(0), Vec::<SessionId>::new()).await;
/// match stale {
///     Err(ReconcileError::StaleIncarnation { current, .. }) => {
///         assert_eq!(current, RouterStatus::Live(incarnation));
///     }
///     other => panic!("unexpected {other:?}"),
/// }
///
/// // Once its deletion started, the router's sessions belong to the deleter.
/// let _ = store.fence(router).await?;
/// let late = reconciler.reconcile(router, incarnation, Vec::<SessionId>::new()).await;
/// assert!(matches!(late, Err(ReconcileError::NotLive { .. })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The store does not know the router.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The router reported from an incarnation that is not its live one: a
    /// stale report (the router was deleted and registered again since, or
    /// the report is older than its deletion). Nothing was changed.
    #[error("{router} reported {reported}, but the store has it {current:?}")]
    StaleIncarnation {
        /// The router.
        router: RouterId,
        /// The incarnation the report names.
        reported: Incarnation,
        /// The router's status in the store.
        current: RouterStatus,
    },
    /// The router's deletion has started (or finished); its sessions belong
    /// to the deleter.
    #[error("{router} is being deleted or deleted ({status:?})")]
    NotLive {
        /// The router.
        router: RouterId,
        /// Its status in the store.
        status: RouterStatus,
    },
    /// No tokio runtime to run the grace timer on.
    #[error("no tokio runtime: router_disconnected must be called within one")]
    NoRuntime,
    /// The reconciler was shut down.
    #[error("the reconciler is shut down")]
    ShutDown,
    /// The store's backend failed.
    #[error(transparent)]
    Store(#[from] BackendError),
}

impl From<RouterError> for ReconcileError {
    fn from(error: RouterError) -> Self {
        match error {
            RouterError::UnknownRouter(router) => Self::UnknownRouter(router),
            RouterError::Backend(error) => Self::Store(error),
        }
    }
}
