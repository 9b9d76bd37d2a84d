//! What a deletion returns.

use tokio::time::Duration;

use crate::id::{Incarnation, RouterId};
use crate::store::{BackendError, FenceError, FinishError, RouterError};

/// How a [`RouterDeleter::delete`](crate::RouterDeleter::delete) ended.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     DeleteOutcome, MemoryStore, NotifyError, RouterDeleter, RouterId, SessionStore,
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
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{DeleteOutcome, Incarnation, RouterId};
    ///
    /// let outcome = DeleteOutcome::AlreadyDeleted {
    ///     router: RouterId::new(1),
    ///     incarnation: Incarnation::new(1),
    /// };
    /// assert!(outcome.report().is_none());
    /// ```
    #[must_use]
    pub fn report(&self) -> Option<&DeletionReport> {
        match self {
            Self::Deleted(report) => Some(report),
            Self::AlreadyDeleted { .. } => None,
        }
    }
}

/// What one deletion did. The session counts add up:
/// `confirmed + already_closed + closed_otherwise + forced == sessions`.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId,
///     SessionId, SessionStore, TerminationBatch, TerminationNotifier,
/// };
///
/// /// A router that confirms only even session ids.
/// struct Picky(Arc<MemoryStore>);
///
/// impl TerminationNotifier for Picky {
///     async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
///         for key in batch.sessions.into_iter().filter(|key| key.id().get() % 2 == 0) {
///             let _ = self.0.close_exact(key, CloseReason::RouterDeleted).await;
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let mut sessions = Vec::new();
/// for id in 1..=3 {
///     sessions.push(
///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?,
///     );
/// }
/// let _ = sessions[0].close(CloseReason::ClientClosed); // closed before the deletion
///
/// let deleter = RouterDeleter::builder()
///     .retries(0)
///     .build(Arc::clone(&store), Picky(Arc::clone(&store)))?;
/// let outcome = deleter.delete(router).await?;
/// let report = outcome.report().expect("the deletion ran");
/// assert_eq!(report.sessions, 3);
/// assert_eq!((report.already_closed, report.confirmed, report.forced), (1, 1, 1));
/// assert_eq!((report.rounds, report.notify_attempts, report.notify_failures), (1, 1, 0));
/// assert!(!report.resumed);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Sessions that closed with
    /// [`CloseReason::RouterDeleted`](crate::CloseReason::RouterDeleted)
    /// after being marked `Terminating`: their router confirmed.
    pub confirmed: usize,
    /// Sessions already closed when the deletion reached them.
    pub already_closed: usize,
    /// Sessions that closed for another reason while the deletion waited
    /// for confirmations: their client hung up, the liveness monitor reaped
    /// them, another controller forced them.
    pub closed_otherwise: usize,
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
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
///     SessionStore, TerminationBatch, TerminationNotifier,
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
/// let _ = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let deleter = RouterDeleter::builder()
///     .confirm_timeout(Duration::from_secs(2))
///     .retries(0)
///     .build(Arc::clone(&store), Silent)?;
///
/// let outcome = deleter.delete(router).await?;
/// let durations = outcome.report().expect("the deletion ran").durations;
/// // Nobody confirmed: the run waited out the confirmation timeout.
/// assert!(durations.wait >= Duration::from_secs(2));
/// assert!(durations.total >= durations.wait + durations.force);
/// # Ok(())
/// # }
/// ```
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
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     DeleteError, MemoryStore, NotifyError, RouterDeleter, RouterId, TerminationBatch,
///     TerminationNotifier,
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
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let deleter = RouterDeleter::new(Arc::new(MemoryStore::new()), Silent);
/// match deleter.delete(RouterId::new(9)).await {
///     Err(DeleteError::UnknownRouter(router)) => assert_eq!(router, RouterId::new(9)),
///     other => panic!("unexpected {other:?}"),
/// }
///
/// deleter.shutdown().await;
/// match deleter.delete(RouterId::new(9)).await {
///     Err(DeleteError::ShuttingDown) => {}
///     // A store failure or an interrupted run leaves the router fenced: retry.
///     Err(DeleteError::Store { .. } | DeleteError::Interrupted(_)) => {}
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok(())
/// # }
/// ```
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
    #[error("store failed while deleting {router}: {source}")]
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
