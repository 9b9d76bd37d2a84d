//! [`ReconcileReport`], the outcome of a reconciliation, and
//! [`ReconcileError`].

use crate::events::ReconcileSummary;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::store::{BackendError, RouterError, RouterStatus};

/// The outcome of [`Reconciler::reconcile`](crate::Reconciler::reconcile).
/// See the example on [`Reconciler`](crate::Reconciler).
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
