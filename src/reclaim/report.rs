//! What a reclaim queue reports: events, statistics, errors, shutdown.

use std::fmt;

use super::task::ReclaimTask;
use crate::events::{ReclaimError, TaskInfo};
use crate::session::ResourceClass;

/// A snapshot of a [`ReclaimQueue`](super::ReclaimQueue)'s counters.
///
/// Each field is read on its own: the snapshot is not a consistent cut.
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
    /// [`ReclaimEvent::ReclaimFailed`](crate::ReclaimEvent::ReclaimFailed)).
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
    /// Dead letters kept now: tasks that failed for good, waiting for
    /// [`ReclaimQueue::redrive`](super::ReclaimQueue::redrive).
    pub dead_letters: usize,
    /// Tasks kept as dead letters since the queue was built.
    pub dead_lettered: u64,
    /// Dead letters queued again by `redrive`.
    pub redriven: u64,
    /// Dead letters dropped because the store was full (each also a
    /// [`ReclaimEvent::DeadLetterDropped`](crate::reclaim::ReclaimEvent::DeadLetterDropped)).
    pub dead_letters_dropped: u64,
    /// Tasks accepted and not completed, by class: waiting, running or
    /// dead letters. A number that keeps growing is a leak.
    pub outstanding: ClassCounts,
}

/// A count per [`ResourceClass`].
///
/// # Example
///
/// ```
/// use session_lifecycle::{reclaim::ClassCounts, ResourceClass};
///
/// let counts = ClassCounts { high: 2, low: 1, ..ClassCounts::default() };
/// assert_eq!(counts.get(ResourceClass::High), 2);
/// assert_eq!(counts.total(), 3);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts {
    /// [`ResourceClass::Critical`].
    pub critical: u64,
    /// [`ResourceClass::High`].
    pub high: u64,
    /// [`ResourceClass::Normal`].
    pub normal: u64,
    /// [`ResourceClass::Low`].
    pub low: u64,
}

impl ClassCounts {
    /// The count of `class`.
    #[must_use]
    pub const fn get(&self, class: ResourceClass) -> u64 {
        match class {
            ResourceClass::Critical => self.critical,
            ResourceClass::High => self.high,
            ResourceClass::Normal => self.normal,
            ResourceClass::Low => self.low,
        }
    }

    /// The sum over every class.
    #[must_use]
    pub const fn total(&self) -> u64 {
        self.critical
            .saturating_add(self.high)
            .saturating_add(self.normal)
            .saturating_add(self.low)
    }
}

/// A task that failed for good and is kept for a re-drive: see
/// [`ReclaimQueue::dead_letters`](super::ReclaimQueue::dead_letters).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The task.
    pub task: TaskInfo,
    /// How many attempts ran before it was kept.
    pub attempts: u32,
    /// Its last error.
    pub error: ReclaimError,
}

/// What [`ReclaimQueue::shutdown`](super::ReclaimQueue::shutdown) leaves.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{reclaim::ReclaimError, ReclaimQueue, reclaim::ReclaimTask, RouterId, SessionId};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder().workers(1).build()?;
/// // A release that hangs (its router never answers), then one that would succeed.
/// let hangs = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || {
///     std::future::pending::<Result<(), ReclaimError>>()
/// });
/// let quick = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
///     Ok::<(), ReclaimError>(())
/// });
/// queue.push(hangs).await?;
/// queue.push(quick).await?;
///
/// let report = queue.shutdown(Duration::from_secs(1)).await;
/// assert!(!report.drained);
/// assert_eq!(report.interrupted[0].session, SessionId::new(1));
/// // What never started is handed back: run it here, persist it, or drop it.
/// for mut task in report.left {
///     task.run_once().await?;
/// }
/// # Ok(())
/// # }
/// ```
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
    /// reported by a [`ReclaimEvent::ReclaimFailed`](crate::ReclaimEvent::ReclaimFailed) of kind
    /// [`Interrupted`](crate::ReclaimErrorKind::Interrupted).
    pub interrupted: Vec<TaskInfo>,
    /// The dead letters still kept (tasks that failed for good and were
    /// not re-driven), handed back as `left` is.
    pub dead_letters: Vec<ReclaimTask>,
}

/// [`ReclaimQueue::push`](super::ReclaimQueue::push) failed because the
/// queue is shut down; the task is handed back.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{reclaim::ReclaimError, ReclaimQueue, reclaim::ReclaimTask, RouterId, SessionId};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder().build()?;
/// let _ = queue.shutdown(Duration::from_secs(1)).await;
///
/// let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
///     Ok::<(), ReclaimError>(())
/// });
/// let error = queue.push(task).await.unwrap_err();
/// assert_eq!(
///     error.to_string(),
///     "the reclaim queue is shut down; the task is handed back"
/// );
/// // Not lost: run it here instead.
/// error.into_task().run_once().await?;
/// # Ok(())
/// # }
/// ```
#[derive(thiserror::Error)]
#[error("the reclaim queue is shut down; the task is handed back")]
pub struct PushError(pub ReclaimTask);

impl PushError {
    /// The task that was not queued.
    ///
    /// See the example on [`PushError`].
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
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     reclaim::ReclaimError, ReclaimQueue, reclaim::ReclaimTask, RouterId, SessionId, reclaim::TryPushError,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder().capacity(1).paused(true).build()?;
/// let task = |id| {
///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
///         Ok::<(), ReclaimError>(())
///     })
/// };
/// queue.try_push(task(1))?;
/// match queue.try_push(task(2)) {
///     // Full: shed load, or wait for room with `push`.
///     Err(TryPushError::Full(task)) => {
///         queue.resume();
///         queue.push(task).await?;
///     }
///     Err(TryPushError::ShutDown(_)) => unreachable!("the queue is open"),
///     Ok(()) => unreachable!("the queue is full"),
/// }
/// queue.idle().await;
/// assert_eq!(queue.stats().completed, 2);
/// # Ok(())
/// # }
/// ```
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
