//! What a deletion reports: [`DeletionReport`] and its [`PhaseDurations`].

use tokio::time::Duration;

use crate::id::{Incarnation, RouterId};

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
    /// Sessions of the router at the fence, and those the store's `finish`
    /// closed or removed unread (records another controller's version or
    /// payload type wrote, on a shared backend: see
    /// [`FinishReport::unreadable`](crate::FinishReport::unreadable)).
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
    /// after the last round, or closed (or removed unread) by the store
    /// when it finished.
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
#[non_exhaustive]
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
