//! What a reclaim queue reports: events, statistics, errors, shutdown.

use std::fmt;

use tokio::time::Duration;

use super::task::{ReclaimError, ReclaimTask, TaskInfo};
use crate::id::{Incarnation, RouterId, SessionId};

/// Something a [`ReclaimQueue`](super::ReclaimQueue) reports; see
/// [`ReclaimQueue::subscribe`](super::ReclaimQueue::subscribe).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ReclaimEvent {
    /// An attempt failed and the task will run again after `delay`.
    ReclaimRetried {
        /// The task.
        task: TaskInfo,
        /// The attempt that failed, from 1.
        attempt: u32,
        /// Why it failed.
        error: ReclaimError,
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// A task failed for good: its last attempt failed, it failed
    /// permanently, it panicked, or shutdown interrupted it.
    ReclaimFailed {
        /// The task.
        task: TaskInfo,
        /// How many attempts ran.
        attempts: u32,
        /// The last error.
        error: ReclaimError,
    },
    /// A session lived longer than the policy's threshold; reported once per
    /// session.
    LongLivedSession {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation the session belongs to.
        incarnation: Incarnation,
        /// The session's age when found.
        age: Duration,
    },
}

/// A snapshot of a [`ReclaimQueue`](super::ReclaimQueue)'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReclaimStats {
    /// The most tasks the queue holds waiting.
    pub capacity: usize,
    /// Tasks waiting now.
    pub depth: usize,
    /// The most tasks ever waiting at once.
    pub peak_depth: usize,
    /// Tasks running now (at most one per worker).
    pub in_flight: usize,
    /// Tasks accepted since the queue was built.
    pub pushed: u64,
    /// Tasks that succeeded.
    pub completed: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Tasks that failed for good (each reported by a
    /// [`ReclaimEvent::ReclaimFailed`]).
    pub failed: u64,
    /// Sessions reported long-lived.
    pub long_lived: u64,
    /// Worker tasks.
    pub workers: usize,
    /// Whether the workers are paused.
    pub paused: bool,
    /// Whether the queue stopped taking tasks (shutdown, or every handle
    /// dropped).
    pub closed: bool,
}

/// What [`ReclaimQueue::shutdown`](super::ReclaimQueue::shutdown) leaves.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Whether every queued task finished before the deadline.
    pub drained: bool,
    /// Tasks that never started, handed back to the caller: run them
    /// ([`ReclaimTask::run_once`]), persist them, or drop them (a task
    /// releasing session resources releases them when dropped).
    pub left: Vec<ReclaimTask>,
    /// Tasks that were running when the deadline passed; each was also
    /// reported by a [`ReclaimEvent::ReclaimFailed`] of kind
    /// [`Interrupted`](crate::ReclaimErrorKind::Interrupted).
    pub interrupted: Vec<TaskInfo>,
}

/// [`ReclaimQueue::push`](super::ReclaimQueue::push) failed because the
/// queue is shut down; the task is handed back.
#[derive(thiserror::Error)]
#[error("the reclaim queue is shut down; the task is handed back")]
pub struct PushError(pub ReclaimTask);

impl PushError {
    /// The task that was not queued.
    pub fn into_task(self) -> ReclaimTask {
        self.0
    }
}

impl fmt::Debug for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PushError").field(&self.0.info()).finish()
    }
}

/// [`ReclaimQueue::try_push`](super::ReclaimQueue::try_push) did not queue
/// the task; it is handed back.
#[derive(thiserror::Error)]
pub enum TryPushError {
    /// The queue holds `capacity` tasks.
    #[error("the reclaim queue is full; the task is handed back")]
    Full(ReclaimTask),
    /// The queue is shut down.
    #[error("the reclaim queue is shut down; the task is handed back")]
    ShutDown(ReclaimTask),
}

impl TryPushError {
    /// The task that was not queued.
    pub fn into_task(self) -> ReclaimTask {
        match self {
            Self::Full(task) | Self::ShutDown(task) => task,
        }
    }
}

impl fmt::Debug for TryPushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, task) = match self {
            Self::Full(task) => ("Full", task),
            Self::ShutDown(task) => ("ShutDown", task),
        };
        f.debug_tuple(name).field(&task.info()).finish()
    }
}

/// A [`ReclaimQueue`](super::ReclaimQueue) could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `build` was called outside a tokio runtime, where no worker can run.
    #[error("no tokio runtime: build the reclaim queue inside one")]
    NoRuntime,
    /// A capacity of zero would block every push forever.
    #[error("the reclaim queue capacity must be at least 1")]
    ZeroCapacity,
    /// Zero workers would never run a task.
    #[error("the reclaim queue needs at least one worker")]
    ZeroWorkers,
}
