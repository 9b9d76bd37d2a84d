//! What a deletion returns.

use tokio::time::Duration;

use crate::id::{Incarnation, RouterId};
use crate::store::{BackendError, FenceError, FinishError};

/// How a [`RouterDeleter::delete`](crate::RouterDeleter::delete) ended.
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

/// What one deletion did. The session counts add up:
/// `confirmed + already_closed + forced == sessions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletionReport {
    /// The router.
    pub router: RouterId,
    /// The deleted incarnation.
    pub incarnation: Incarnation,
    /// `true` if the router was already fenced by an earlier run that did
    /// not finish, and this run resumed it.
    pub resumed: bool,
    /// Sessions of the router at the fence.
    pub sessions: usize,
    /// Sessions that closed after being marked `Terminating` (confirmed by
    /// their router or client), before any force.
    pub confirmed: usize,
    /// Sessions already closed when the deletion reached them.
    pub already_closed: usize,
    /// Sessions force-closed ([`CloseReason::Forced`](crate::CloseReason::Forced))
    /// after the last round, or closed by the store when it finished.
    pub forced: usize,
    /// Notification rounds run (the first one plus re-notifications).
    pub rounds: u32,
    /// Notification calls made.
    pub notify_attempts: u32,
    /// Notification calls that errored, timed out or panicked.
    pub notify_failures: u32,
    /// Time spent in each phase, on tokio's clock.
    pub durations: PhaseDurations,
}

/// Time spent in each phase of a deletion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseDurations {
    /// Fencing the router and taking the snapshot.
    pub fence: Duration,
    /// Marking the sessions `Terminating`.
    pub mark: Duration,
    /// Sending notifications, over all rounds, pacing included.
    pub notify: Duration,
    /// Waiting for confirmations and backing off between rounds.
    pub wait: Duration,
    /// Force-closing what did not confirm.
    pub force: Duration,
    /// Removing the sessions and tombstoning the incarnation.
    pub finish: Duration,
    /// The whole run.
    pub total: Duration,
}

/// Error of [`RouterDeleter::delete`](crate::RouterDeleter::delete).
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
    /// spawned.
    #[error("deletion needs a tokio runtime to run on; poll `delete` inside one")]
    NoRuntime,
    /// The run stopped before finishing (its runtime shut down, or the run
    /// itself failed unexpectedly). The router stays fenced: calling
    /// `delete` again resumes the deletion.
    #[error("deletion of {0} was interrupted; the router stays fenced, delete again to resume")]
    Interrupted(RouterId),
    /// The store's backend failed. The router stays fenced if the fence was
    /// taken: calling `delete` again resumes the deletion.
    #[error("store failed while deleting {router}: {source}")]
    Store {
        /// The router.
        router: RouterId,
        /// The backend's error.
        source: BackendError,
    },
}

impl DeleteError {
    pub(crate) fn from_fence(router: RouterId, error: FenceError) -> Self {
        match error {
            FenceError::Backend(source) => Self::Store { router, source },
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
