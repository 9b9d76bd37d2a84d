//! What a deletion returns.

use crate::events::DeletionReport;
use crate::id::{Incarnation, RouterId};
use crate::store::{BackendError, FenceError, FinishError, RouterError};

/// How a [`RouterDeleter::delete`](crate::RouterDeleter::delete) ended.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     deleter::DeleteOutcome, MemoryStore, NotifyError, RouterDeleter, RouterId, SessionStore,
///     TerminationBatch, TerminationNotifier,
/// };
///
/// /// A router that never confirms: its sessions are force-closed.
/// struct Silent;
///
/// impl TerminationNotifier for Silent {
///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let deleter = RouterDeleter::new(Arc::clone(&store), Silent);
///
/// let outcome = deleter.delete(router).await?;
/// assert!(matches!(outcome, DeleteOutcome::Deleted(_)));
/// // Deleting again is not an error: the outcome says it was done already.
/// match deleter.delete(router).await? {
///     DeleteOutcome::AlreadyDeleted { incarnation: deleted, .. } => {
///         assert_eq!(deleted, incarnation)
///     }
///     DeleteOutcome::Deleted(_) => unreachable!("deleted once"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The deletion ran (or was joined) and finished.
    Deleted(DeletionReport),
    /// The router's last incarnation had already been deleted; nothing was
    /// done. Not a failure.
    AlreadyDeleted {
        /// The router.
        router: RouterId,
        /// Its deleted incarnation.
        incarnation: Incarnation,
    },
}

impl DeleteOutcome {
    /// The report, if this call's deletion ran.
    #[must_use]
    pub fn report(&self) -> Option<&DeletionReport> {
        match self {
            Self::Deleted(report) => Some(report),
            Self::AlreadyDeleted { .. } => None,
        }
    }
}

/// Error of [`RouterDeleter::delete`](crate::RouterDeleter::delete).
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeleteError {
    /// The store knows no router with this id.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The deleter is shutting down and takes no new deletion.
    #[error("the router deleter is shutting down")]
    ShuttingDown,
    /// `delete` was polled outside a tokio runtime, where the run cannot be
    /// spawned, or on one built without its time driver (tokio's
    /// `enable_time`, or `enable_all`), where its deadlines cannot be set.
    /// Nothing was done: the router is not fenced.
    #[error(
        "deletion needs a tokio runtime with its time driver to run on; poll `delete` inside one"
    )]
    NoRuntime,
    /// The run stopped before finishing (its runtime shut down, or the run
    /// itself failed unexpectedly). The router stays fenced: calling
    /// `delete` again resumes the deletion.
    #[error("deletion of {0} was interrupted; the router stays fenced, delete again to resume")]
    Interrupted(RouterId),
    /// [`delete_incarnation`](crate::RouterDeleter::delete_incarnation)
    /// named an incarnation newer than any the router has had; nothing was
    /// fenced.
    #[error("{router} is in {current}, not {requested}")]
    IncarnationMismatch {
        /// The router.
        router: RouterId,
        /// The incarnation asked for.
        requested: Incarnation,
        /// The router's incarnation.
        current: Incarnation,
    },
    /// The store's backend failed. The router stays fenced if the fence was
    /// taken: calling `delete` again resumes the deletion.
    #[error("store failed while deleting {router}")]
    Store {
        /// The router.
        router: RouterId,
        /// The backend's error.
        source: BackendError,
    },
}

impl DeleteError {
    pub(crate) fn from_router(router: RouterId, error: RouterError) -> Self {
        match error {
            RouterError::Backend(source) => Self::Store { router, source },
            // `RouterError` is non-exhaustive; every other kind says the
            // store does not know the router.
            _ => Self::UnknownRouter(router),
        }
    }

    pub(crate) fn from_fence(router: RouterId, error: FenceError) -> Self {
        match error {
            FenceError::Backend(source) => Self::Store { router, source },
            FenceError::IncarnationMismatch {
                requested, current, ..
            } => Self::IncarnationMismatch {
                router,
                requested,
                current,
            },
            // `AlreadyDeleted` is an outcome, handled by the run.
            FenceError::UnknownRouter(_) | FenceError::AlreadyDeleted { .. } => {
                Self::UnknownRouter(router)
            }
        }
    }

    pub(crate) fn from_finish(router: RouterId, error: FinishError) -> Self {
        match error {
            FinishError::Backend(source) => Self::Store { router, source },
            _ => Self::Interrupted(router),
        }
    }
}
