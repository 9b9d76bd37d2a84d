//! [`ReclaimQueueBuilder`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::dead::DeadLetters;
use super::heap::{Counters, Shared, State};
use super::policy::{DefaultPolicy, ReclaimPolicy};
use super::queue::{Owner, ReclaimQueue};
use crate::build::{BuildError, check_count, wired};
use crate::events::EventBus;

/// Builder of a [`ReclaimQueue`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{reclaim::DefaultPolicy, EventBus, ReclaimQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder()
///     .capacity(10_000)
///     .workers(4)
///     .policy(DefaultPolicy::default().class_spacing(Duration::from_millis(500)))
///     .events(EventBus::default())
///     .paused(false)
///     .build()?;
/// assert_eq!((queue.stats().capacity, queue.stats().workers), (10_000, 4));
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct ReclaimQueueBuilder {
    capacity: usize,
    workers: usize,
    policy: Arc<dyn ReclaimPolicy>,
    bus: Option<EventBus>,
    paused: bool,
    dead_letters: usize,
}

impl fmt::Debug for ReclaimQueueBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimQueueBuilder")
            .field("capacity", &self.capacity)
            .field("workers", &self.workers)
            .field("events", &self.bus.is_some())
            .field("paused", &self.paused)
            .field("dead_letters", &self.dead_letters)
            .finish_non_exhaustive()
    }
}

impl Default for ReclaimQueueBuilder {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            workers: 2,
            policy: Arc::new(DefaultPolicy::default()),
            bus: None,
            paused: false,
            dead_letters: 10_000,
        }
    }
}

/// The most worker tasks a queue runs.
const MAX_WORKERS: usize = 1_024;

/// The largest capacity (tokio's semaphore limit, which bounded it before).
const MAX_CAPACITY: usize = usize::MAX >> 3;

impl ReclaimQueueBuilder {
    /// The first setting given that [`Lifecycle`](crate::Lifecycle) wires
    /// itself, if any.
    pub(crate) fn wired(&self) -> Option<&'static str> {
        wired([("events", self.bus.is_some())])
    }

    /// The most tasks waiting at once (default 65,536; at least 1). Memory
    /// is bounded by `capacity` waiting tasks plus one running task per
    /// worker.
    ///
    /// See the example on [`ReclaimQueueBuilder`].
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// The most dead letters kept (default 10,000; 0 keeps none): tasks
    /// that failed for good, kept with the task itself until
    /// [`ReclaimQueue::redrive`] queues them again or
    /// [`ReclaimQueue::shutdown`] hands them back. Past this, the oldest is
    /// dropped, logged at error level and published as
    /// [`ReclaimEvent::DeadLetterDropped`](crate::reclaim::ReclaimEvent::DeadLetterDropped).
    pub fn dead_letters(mut self, capacity: usize) -> Self {
        self.dead_letters = capacity;
        self
    }

    /// How many worker tasks run tasks (default 2; 1 to 1,024).
    ///
    /// See the example on [`ReclaimQueueBuilder`].
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// The policy (default [`DefaultPolicy`]).
    ///
    /// See the example on [`ReclaimPolicy`] for a policy of your own.
    pub fn policy(mut self, policy: impl ReclaimPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Publishes every [`ReclaimEvent`](crate::ReclaimEvent) on `bus`, as
    /// [`Event::Reclaim`](crate::Event::Reclaim) (default: none).
    pub fn events(mut self, bus: EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Starts the queue with its workers paused (see
    /// [`ReclaimQueue::pause`]).
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// Builds the queue and spawns its workers on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime (or on one without
    /// its time driver);
    /// [`BuildError::Setting`] for a capacity of 0 or above `usize::MAX >> 3`, or workers outside 1 to 1,024.
    ///
    /// See the example on [`ReclaimQueueBuilder`].
    pub fn build(self) -> Result<ReclaimQueue, BuildError> {
        const PIECE: &str = "ReclaimQueue";
        let capacity = check_count(PIECE, "capacity", self.capacity, MAX_CAPACITY)?;
        let workers = check_count(PIECE, "workers", self.workers, MAX_WORKERS)?;
        let runtime =
            crate::build::timed_runtime().ok_or(BuildError::NoRuntime { piece: PIECE })?;
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            alive: AtomicUsize::new(0),
            state: Mutex::new(State::new(capacity, self.paused, workers)),
            capacity,
            workers,
            work: Notify::new(),
            handoff: Semaphore::new(0),
            idle: Notify::new(),
            idle_waiters: AtomicUsize::new(0),
            policy: self.policy,
            epoch: Instant::now(),
            counters: Counters::default(),
            dead: Mutex::new(DeadLetters::new(self.dead_letters)),
            bus: self.bus,
            tracker: TaskTracker::new(),
            aborts: Mutex::new(vec![None; workers]),
            interrupted: Mutex::new(Vec::new()),
        });
        let numbers: Vec<usize> = (0..workers).collect();
        shared.state.lock().claim(&numbers);
        shared
            .alive
            .store(workers, std::sync::atomic::Ordering::Release);
        shared.spawn_workers(&numbers, &runtime);
        Ok(ReclaimQueue {
            _owner: Arc::new(Owner(Arc::clone(&shared))),
            shared,
        })
    }
}
