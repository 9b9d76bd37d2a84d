//! What [`Lifecycle::shutdown`](super::Lifecycle::shutdown) could not
//! finish, and the pieces it names.

use std::fmt;

use tokio::time::Duration;

#[cfg(doc)]
use super::Lifecycle;
use crate::id::RouterId;
use crate::reclaim::ShutdownReport;
#[cfg(doc)]
use crate::{AuditSweeper, LivenessMonitor, Reconciler, RouterDeleter, expiry::ExpiryMonitor};

/// A piece of a [`Lifecycle`], as its shutdown report names it.
///
/// See the example on [`Lifecycle::shutdown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Piece {
    /// The [`RouterDeleter`]: deletions were running.
    Deleter,
    /// The [`Reconciler`]: a grace expiry was closing sessions.
    Reconciler,
    /// The [`LivenessMonitor`]: probe rounds or reaps were ending.
    Liveness,
    /// The [`AuditSweeper`]: a sweep was running.
    Sweeper,
    /// The [`ExpiryMonitor`]: expired sessions were closing.
    Expiry,
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deleter => "deleter",
            Self::Reconciler => "reconciler",
            Self::Liveness => "liveness monitor",
            Self::Sweeper => "audit sweeper",
            Self::Expiry => "expiry monitor",
        })
    }
}

/// What [`Lifecycle::shutdown`] could not finish within its deadline.
///
/// See the example on [`Lifecycle::shutdown`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct LifecycleShutdown {
    /// Routers whose deletion was still running at the deadline. Each run
    /// goes on in its task while the runtime lives; if the process stops
    /// first, the router stays fenced and the next
    /// [`delete`](RouterDeleter::delete) of it resumes the deletion.
    pub deletions: Vec<RouterId>,
    /// Pieces whose work in hand was still running at the deadline. Each
    /// refuses new work and ends the rest in its own tasks.
    pub still_running: Vec<Piece>,
    /// Routers whose grace period was stopped: they keep their sessions.
    pub graces_stopped: usize,
    /// The reclaim queue's shutdown: the tasks it handed back unstarted
    /// (run, persist or drop them: a dropped release task releases its
    /// resources at once), those interrupted while running, and its dead
    /// letters (tasks that failed for good and were not re-driven).
    pub reclaim: ShutdownReport,
}

impl LifecycleShutdown {
    /// `true` if nothing was left in hand: no deletion running, every
    /// piece stopped, and the reclaim queue handed nothing back (no task
    /// left, interrupted or kept as a dead letter). (Stopped grace
    /// periods are not unfinished work: the routers keep their sessions.)
    ///
    /// A task that failed for good is here only as a dead letter. One the
    /// queue kept no dead letter of (built with `dead_letters(0)`, or past
    /// its dead-letter capacity) was reported when it failed (a
    /// [`ReclaimFailed`](crate::ReclaimEvent::ReclaimFailed) event and the
    /// queue's [`stats`](crate::ReclaimQueue::stats): `failed`,
    /// `dead_letters_dropped`), not here: `true` does not mean every task
    /// succeeded.
    ///
    /// See the example on [`Lifecycle::shutdown`].
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.deletions.is_empty()
            && self.still_running.is_empty()
            && self.reclaim.left.is_empty()
            && self.reclaim.interrupted.is_empty()
            && self.reclaim.dead_letters.is_empty()
    }
}

/// Awaits `shutdown`, a piece's, for at most `deadline`; names the piece
/// if it had not stopped by then.
pub(super) async fn stop_within(
    deadline: Duration,
    piece: Piece,
    shutdown: impl Future<Output = ()>,
) -> Option<Piece> {
    let stopped = tokio::time::timeout(deadline, shutdown).await.is_ok();
    (!stopped).then_some(piece)
}
