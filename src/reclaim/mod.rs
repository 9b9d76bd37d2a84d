//! The reclamation queue: releases resources by priority, with retries, and
//! never drops work (I5).
//!
//! # Invariants
//!
//! - Every accepted task is run by a worker, handed back by `shutdown`, or
//!   (running when a shutdown deadline passed) reported failed as
//!   interrupted. A task is accepted only under the `heap` lock while the
//!   queue is open, and `close` sets `closed` under the same lock, so no task
//!   enters after the workers can decide to exit.
//! - At most `capacity` tasks wait: a push holds one permit of `permits`
//!   from before it enters until a worker takes it out.
//! - Entries are ordered by `(due, seq)`, both fixed at push: the order is a
//!   strict total order, so a pop returns the task due first, oldest first.
//!
//! # Deadlock safety
//!
//! One lock, `heap`, held only to insert, remove or count entries, never
//! across an `.await` nor while user code (policy, task) runs. The
//! `interrupted` list has its own lock, taken alone.

mod policy;
mod report;
mod task;

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore, TryAcquireError, broadcast};
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

pub use policy::{DefaultPolicy, Priority, ReclaimPolicy, RetrySchedule};
pub use report::{PushError, ReclaimEvent, ReclaimStats, ShutdownReport, TryPushError};

use task::release_tasks;
pub use task::{Reclaim, ReclaimError, ReclaimErrorKind, ReclaimTask, TaskInfo};

use crate::build::{BuildError, check_count};
use crate::event::{Event, EventBus};
use crate::id::SessionKey;
use crate::session::{CloseFrom, CloseOutcome, CloseReason, Session};

/// A bounded priority queue of reclamation work, run by worker tasks.
///
/// When sessions are force-closed, reaped or swept, releasing what they held
/// (ports, buffers, routing and policy-cache entries, tokens) is queued
/// here. The queue:
///
/// - **orders** by the [`ReclaimPolicy`]: with [`DefaultPolicy`], resource
///   class first (critical → low), then traffic (busier sessions first),
///   with aging, so a low task is never starved by a stream of urgent ones
///   (see [`DefaultPolicy`] for the bound);
/// - is **bounded**: [`push`](Self::push) waits while `capacity` tasks wait
///   (backpressure), [`try_push`](Self::try_push) hands the task back;
/// - **never drops work**: a failing attempt is retried on the policy's
///   [`RetrySchedule`] (exponential backoff with jitter, through `backon`),
///   and a task that fails for good (last attempt, permanent error, panic)
///   is reported by a [`ReclaimEvent::ReclaimFailed`], a `tracing` error and
///   the [`failed`](ReclaimStats::failed) count;
/// - **warns** once per session about sessions older than the policy's
///   threshold ([`check_long_lived`](Self::check_long_lived));
/// - **shuts down** draining within a deadline and hands back what was left
///   ([`shutdown`](Self::shutdown)). Dropping every handle closes the queue
///   too; the workers then finish every queued task and exit.
///
/// A worker runs one task at a time and sleeps a failing task's backoff
/// itself; more workers keep other work moving meanwhile.
///
/// Handles are cheap to clone and share one queue.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use session_lifecycle::{
///     ReclaimError, ReclaimQueue, ReclaimTask, ResourceClass, RouterId, SessionId,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder().capacity(1024).workers(2).build()?;
/// let released = Arc::new(AtomicU32::new(0));
/// for id in 0..10 {
///     let released = Arc::clone(&released);
///     let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
///         let released = Arc::clone(&released);
///         async move {
///             released.fetch_add(1, Ordering::SeqCst);
///             Ok::<(), ReclaimError>(())
///         }
///     })
///     .class(ResourceClass::High);
///     queue.push(task).await?;
/// }
/// let report = queue.shutdown(std::time::Duration::from_secs(5)).await;
/// assert!(report.drained && report.left.is_empty());
/// assert_eq!(released.load(Ordering::SeqCst), 10);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ReclaimQueue {
    shared: Arc<Shared>,
    /// Closes the queue when the last handle drops (workers hold `shared`
    /// only).
    _owner: Arc<Owner>,
}

struct Shared {
    heap: Mutex<Heap>,
    /// One permit per free slot.
    permits: Semaphore,
    capacity: usize,
    workers: usize,
    /// Wakes workers: one per push, all on resume and close.
    work: Notify,
    /// Wakes `idle` waiters when the last running task ends.
    idle: Notify,
    policy: Arc<dyn ReclaimPolicy>,
    epoch: Instant,
    paused: AtomicBool,
    /// Set under `heap` when the queue stops taking tasks.
    closed: AtomicBool,
    /// Workers exit at once (a shutdown deadline passed).
    stop: AtomicBool,
    counters: Counters,
    events: broadcast::Sender<ReclaimEvent>,
    bus: Option<EventBus>,
    tracker: TaskTracker,
    aborts: Mutex<Vec<AbortHandle>>,
    interrupted: Mutex<Vec<TaskInfo>>,
}

#[derive(Default)]
struct Heap {
    entries: BinaryHeap<Entry>,
    seq: u64,
    peak: usize,
}

#[derive(Default)]
struct Counters {
    pushed: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    long_lived: AtomicU64,
    in_flight: AtomicUsize,
}

/// A waiting task and its key: due time (nanoseconds after the queue's
/// epoch) and push sequence.
struct Entry {
    due: u64,
    seq: u64,
    task: ReclaimTask,
}

impl Entry {
    fn key(&self) -> (u64, u64) {
        (self.due, self.seq)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed: `BinaryHeap` is a max-heap and the smallest key goes first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.key().cmp(&self.key())
    }
}

struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Builder of a [`ReclaimQueue`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{DefaultPolicy, EventBus, ReclaimQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder()
///     .capacity(10_000)
///     .workers(4)
///     .policy(DefaultPolicy::default().class_spacing(Duration::from_millis(500)))
///     .event_capacity(4_096)
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
    events: usize,
    bus: Option<EventBus>,
    paused: bool,
}

impl fmt::Debug for ReclaimQueueBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimQueueBuilder")
            .field("capacity", &self.capacity)
            .field("workers", &self.workers)
            .field("events", &self.events)
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl Default for ReclaimQueueBuilder {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            workers: 2,
            policy: Arc::new(DefaultPolicy::default()),
            events: 1_024,
            bus: None,
            paused: false,
        }
    }
}

/// The most worker tasks a queue runs.
const MAX_WORKERS: usize = 1_024;
/// The largest event capacity: the channel allocates it up front.
const MAX_EVENTS: usize = 1 << 20;

impl ReclaimQueueBuilder {
    /// The most tasks waiting at once (default 65,536; at least 1). Memory
    /// is bounded by `capacity` waiting tasks plus one running task per
    /// worker.
    ///
    /// See the example on [`ReclaimQueueBuilder`].
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
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

    /// How many events a subscriber may fall behind before it misses some
    /// (default 1,024; 1 to 1,048,576, allocated up front; see
    /// [`ReclaimQueue::subscribe`]).
    ///
    /// See the example on [`ReclaimQueueBuilder`].
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.events = events;
        self
    }

    /// Also publishes every [`ReclaimEvent`] on `bus`, as
    /// [`Event::Reclaim`].
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     Event, EventBus, ReclaimError, ReclaimEvent, ReclaimQueue, ReclaimTask,
    ///     RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::default();
    /// let mut events = bus.subscribe();
    /// let queue = ReclaimQueue::builder().events(bus).build()?;
    ///
    /// let gone = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
    ///     Err::<(), _>(ReclaimError::permanent("no such port"))
    /// });
    /// queue.push(gone).await?;
    /// queue.idle().await;
    /// assert!(matches!(
    ///     events.try_recv(),
    ///     Some(Event::Reclaim(ReclaimEvent::ReclaimFailed { .. }))
    /// ));
    /// # Ok(())
    /// # }
    /// ```
    pub fn events(mut self, bus: EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Starts the queue with its workers paused (see
    /// [`ReclaimQueue::pause`]).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// // Paused: fill the queue first, then let the policy order all of it.
    /// let queue = ReclaimQueue::builder().paused(true).build()?;
    /// for id in 0..10 {
    ///     queue.push(task(id)).await?;
    /// }
    /// assert_eq!(queue.stats().depth, 10);
    /// queue.resume();
    /// queue.idle().await;
    /// assert_eq!(queue.stats().completed, 10);
    /// # Ok(())
    /// # }
    /// ```
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// Builds the queue and spawns its workers on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime;
    /// [`BuildError::Setting`] for a capacity of 0 or above tokio's semaphore
    /// limit, workers outside 1 to 1,024, or an event capacity outside 1 to
    /// 2^20.
    ///
    /// See the example on [`ReclaimQueueBuilder`].
    pub fn build(self) -> Result<ReclaimQueue, BuildError> {
        const PIECE: &str = "ReclaimQueue";
        let capacity = check_count(PIECE, "capacity", self.capacity, Semaphore::MAX_PERMITS)?;
        let workers = check_count(PIECE, "workers", self.workers, MAX_WORKERS)?;
        let events = check_count(PIECE, "event_capacity", self.events, MAX_EVENTS)?;
        let runtime = Handle::try_current().map_err(|_| BuildError::NoRuntime { piece: PIECE })?;
        let (events, _) = broadcast::channel(events);
        let shared = Arc::new(Shared {
            heap: Mutex::new(Heap::default()),
            permits: Semaphore::new(capacity),
            capacity,
            workers,
            work: Notify::new(),
            idle: Notify::new(),
            policy: self.policy,
            epoch: Instant::now(),
            paused: AtomicBool::new(self.paused),
            closed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            events,
            bus: self.bus,
            tracker: TaskTracker::new(),
            aborts: Mutex::new(Vec::with_capacity(workers)),
            interrupted: Mutex::new(Vec::new()),
        });
        for _ in 0..workers {
            let worker = shared
                .tracker
                .spawn_on(Arc::clone(&shared).work_loop(), &runtime);
            shared.aborts.lock().push(worker.abort_handle());
        }
        Ok(ReclaimQueue {
            _owner: Arc::new(Owner(Arc::clone(&shared))),
            shared,
        })
    }
}

impl fmt::Debug for ReclaimQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimQueue")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ReclaimQueue {
    /// A builder: capacity, workers, policy.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ReclaimQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let queue = ReclaimQueue::builder().workers(8).build()?;
    /// assert_eq!(queue.stats().workers, 8);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> ReclaimQueueBuilder {
        ReclaimQueueBuilder::default()
    }

    /// Queues `task`, waiting while the queue is full.
    ///
    /// # Errors
    ///
    /// [`PushError`] hands the task back if the queue is shut down (before
    /// or while waiting).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it resolves drops the task with it (a
    /// task releasing session resources then releases them at once) and
    /// leaves the queue as it was.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// let queue = ReclaimQueue::builder().capacity(1).paused(true).build()?;
    /// queue.push(task(1)).await?;
    ///
    /// // Full: the second push waits for room (backpressure), here up to a second.
    /// let waited =
    ///     tokio::time::timeout(Duration::from_secs(1), queue.push(task(2))).await;
    /// assert!(waited.is_err());
    ///
    /// queue.resume();
    /// queue.push(task(3)).await?; // room again once a worker took the first
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push(&self, task: ReclaimTask) -> Result<(), PushError> {
        let permit = match self.shared.permits.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(PushError(task)),
            Err(TryAcquireError::NoPermits) => match self.shared.permits.acquire().await {
                Ok(permit) => permit,
                Err(_closed) => return Err(PushError(task)),
            },
        };
        permit.forget();
        self.shared.insert(task).map_err(PushError)
    }

    /// Queues `task` if there is room now.
    ///
    /// # Errors
    ///
    /// [`TryPushError::Full`] or [`TryPushError::ShutDown`], handing the task
    /// back.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// let queue = ReclaimQueue::builder().capacity(1).paused(true).build()?;
    /// queue.try_push(task(1))?;
    /// // Full: the task comes back at once instead of waiting.
    /// let back = queue.try_push(task(2)).unwrap_err().into_task();
    /// assert_eq!(back.info().session, SessionId::new(2));
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_push(&self, task: ReclaimTask) -> Result<(), TryPushError> {
        match self.shared.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.shared.insert(task).map_err(TryPushError::ShutDown)
            }
            Err(TryAcquireError::NoPermits) => Err(TryPushError::Full(task)),
            Err(TryAcquireError::Closed) => Err(TryPushError::ShutDown(task)),
        }
    }

    /// Closes `session` with `reason` and queues the release of its
    /// attached resources: one task per [`ResourceClass`](crate::ResourceClass)
    /// present, most urgent first, carrying the session's traffic. The token
    /// is wiped at once; resources that ask for it
    /// ([`Resource::release_inline`](crate::Resource::release_inline)) are
    /// released at once. [`Session::closed`] resolves when every queued
    /// release has run (or failed and been reported).
    ///
    /// Returns [`CloseOutcome::AlreadyClosed`], queueing nothing, if the
    /// session was closed already. On a shut-down queue the resources are
    /// released in the caller instead: never lost.
    ///
    /// # Cancel safety
    ///
    /// Once polled, the session is closed; dropping the future before it
    /// resolves releases the resources not yet queued at once.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     Classed, CloseReason, Incarnation, NewSession, ReclaimQueue, ResourceClass,
    ///     RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let queue = ReclaimQueue::builder().build()?;
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.attach(|_: CloseReason| { /* free a buffer */ })?;
    /// session.attach(Classed::new(
    ///     ResourceClass::Critical,
    ///     |_: CloseReason| { /* drop kernel state */ },
    /// ))?;
    ///
    /// let outcome = queue.close_session(&session, CloseReason::Forced).await;
    /// assert!(outcome.won());
    /// // The close completes once every queued release ran: one task per class.
    /// assert_eq!(session.closed().await, CloseReason::Forced);
    /// assert_eq!(queue.stats().completed, 2);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn close_session<P>(&self, session: &Session<P>, reason: CloseReason) -> CloseOutcome
    where
        P: Send + Sync + 'static,
    {
        match session.close_deferred(reason) {
            Ok(deferred) => {
                for task in release_tasks(session, deferred) {
                    self.push_or_release(task).await;
                }
                CloseOutcome::Closed
            }
            Err(outcome) => outcome,
        }
    }

    /// Closes every open session of `sessions` with `reason` first, then
    /// queues their releases, the most urgent class of all sessions first
    /// (within a class, in the order given). Returns the ids of the
    /// sessions this call closed.
    pub(crate) async fn close_sessions<P>(
        &self,
        sessions: &[Session<P>],
        reason: CloseReason,
        from: CloseFrom,
    ) -> Vec<SessionKey>
    where
        P: Send + Sync + 'static,
    {
        let mut closed = Vec::new();
        let mut queued = Vec::new();
        for session in sessions {
            if let Some(deferred) = session.close_deferred_from(reason, from) {
                closed.push(session.key());
                queued.extend(release_tasks(session, deferred));
            }
        }
        // Stable: within a class, sessions keep the given order.
        queued.sort_by_key(|task| task.info().class.rank());
        for task in queued {
            self.push_or_release(task).await;
        }
        closed
    }

    /// Queues a task of [`close_session`](Self::close_session) or, on a
    /// shut-down queue, drops it (which releases its resources at once).
    pub(crate) async fn push_or_release(&self, task: ReclaimTask) {
        if let Err(PushError(task)) = self.push(task).await {
            tracing::debug!(task = ?task.info(), "reclaim queue shut down; releasing in the caller");
            drop(task);
        }
    }

    /// Reports every session of `sessions` that is open and older than the
    /// policy's [`long_lived_threshold`](ReclaimPolicy::long_lived_threshold)
    /// with one [`ReclaimEvent::LongLivedSession`], once per session however
    /// often it is checked (the session remembers it was reported). Returns
    /// how many were reported by this call.
    ///
    /// Call it from a periodic task over the sessions you want watched (for
    /// example each router's [`SessionStore::sessions`](crate::SessionStore::sessions)).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     DefaultPolicy, Incarnation, NewSession, ReclaimEvent, ReclaimQueue, RouterId,
    ///     SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hour = Duration::from_secs(3_600);
    /// let policy = DefaultPolicy::default().long_lived_threshold(Some(hour));
    /// let queue = ReclaimQueue::builder().policy(policy).build()?;
    /// let mut events = queue.subscribe();
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    ///
    /// tokio::time::advance(2 * hour).await;
    /// assert_eq!(queue.check_long_lived([&session]), 1);
    /// assert_eq!(queue.check_long_lived([&session]), 0); // reported once
    /// match events.recv().await? {
    ///     ReclaimEvent::LongLivedSession { session: id, age, .. } => {
    ///         assert_eq!(id, session.id());
    ///         assert!(age >= hour);
    ///     }
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn check_long_lived<'a, P: 'a>(
        &self,
        sessions: impl IntoIterator<Item = &'a Session<P>>,
    ) -> usize {
        let policy = &self.shared.policy;
        let Ok(Some(threshold)) = catch_unwind(AssertUnwindSafe(|| policy.long_lived_threshold()))
        else {
            return 0;
        };
        let mut reported = 0;
        for session in sessions {
            let age = session.age();
            if age >= threshold && !session.is_closed() && session.flag_long_lived() {
                reported += 1;
                tracing::warn!(session = %session.id(), router = %session.router(), ?age,
                    "long-lived session");
                self.shared.publish(ReclaimEvent::LongLivedSession {
                    session: session.id(),
                    router: session.router(),
                    incarnation: session.incarnation(),
                    age,
                });
            }
        }
        self.shared
            .counters
            .long_lived
            .fetch_add(reported as u64, Ordering::Relaxed);
        reported
    }

    /// Subscribes to the queue's events from now on.
    ///
    /// A subscriber that falls more than the builder's
    /// [`event_capacity`](ReclaimQueueBuilder::event_capacity) behind misses
    /// the oldest events and learns how many from
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged);
    /// failures are also counted in [`stats`](Self::stats) and logged
    /// through `tracing`, so none goes unnoticed.
    ///
    /// # Example
    ///
    /// ```
    /// use tokio::sync::broadcast::error::RecvError;
    /// use session_lifecycle::{ReclaimEvent, ReclaimQueue};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let queue = ReclaimQueue::builder().build()?;
    /// let mut events = queue.subscribe();
    /// tokio::spawn(async move {
    ///     loop {
    ///         match events.recv().await {
    ///             Ok(ReclaimEvent::ReclaimFailed { task, error, .. }) => {
    ///                 eprintln!("release of {task:?} failed: {error}");
    ///             }
    ///             Ok(_) => {}
    ///             Err(RecvError::Lagged(missed)) => {
    ///                 eprintln!("missed {missed} reclaim events")
    ///             }
    ///             Err(RecvError::Closed) => break, // the queue is gone
    ///         }
    ///     }
    /// });
    /// # Ok(())
    /// # }
    /// ```
    pub fn subscribe(&self) -> broadcast::Receiver<ReclaimEvent> {
        self.shared.events.subscribe()
    }

    /// Stops the workers from starting tasks (tasks running go on); pushes
    /// still queue. For maintenance windows and deterministic tests. Has no
    /// effect once the queue is closed: a closed queue always drains.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// let queue = ReclaimQueue::builder().build()?;
    /// queue.pause(); // a maintenance window: releases wait
    /// queue.push(task(1)).await?;
    /// tokio::task::yield_now().await;
    /// assert_eq!(queue.stats().depth, 1);
    ///
    /// queue.resume();
    /// queue.idle().await;
    /// assert_eq!(queue.stats().completed, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
    }

    /// Lets the workers start tasks again.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// let queue = ReclaimQueue::builder().paused(true).build()?;
    /// queue.push(task(1)).await?;
    /// queue.resume();
    /// queue.idle().await;
    /// assert!(!queue.stats().paused);
    /// assert_eq!(queue.stats().completed, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        self.shared.work.notify_waiters();
    }

    /// A snapshot of the queue's counters.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ReclaimQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let queue = ReclaimQueue::builder().capacity(512).build()?;
    /// let stats = queue.stats();
    /// assert_eq!((stats.capacity, stats.depth, stats.in_flight), (512, 0, 0));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn stats(&self) -> ReclaimStats {
        let shared = &self.shared;
        let (depth, peak_depth) = {
            let heap = shared.heap.lock();
            (heap.entries.len(), heap.peak)
        };
        let counters = &shared.counters;
        ReclaimStats {
            capacity: shared.capacity,
            depth,
            peak_depth,
            in_flight: counters.in_flight.load(Ordering::Relaxed),
            pushed: counters.pushed.load(Ordering::Relaxed),
            completed: counters.completed.load(Ordering::Relaxed),
            retried: counters.retried.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            long_lived: counters.long_lived.load(Ordering::Relaxed),
            workers: shared.workers,
            paused: shared.paused.load(Ordering::Relaxed) && !shared.closed.load(Ordering::Relaxed),
            closed: shared.closed.load(Ordering::Relaxed),
        }
    }

    /// Waits until no task waits or runs (new pushes may arrive right
    /// after). Workers must not be paused for this to resolve.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only observes.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// let queue = ReclaimQueue::builder().build()?;
    /// for id in 0..100 {
    ///     queue.push(task(id)).await?;
    /// }
    /// queue.idle().await; // e.g. before taking a snapshot in a test
    /// assert_eq!(queue.stats().completed, 100);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Stops taking tasks, lets the workers drain the queue until
    /// `deadline` from now, then stops them. Returns whether everything
    /// drained, the tasks left unstarted (handed back), and those
    /// interrupted while running. Paused workers are resumed to drain.
    ///
    /// Pushes waiting for room get their tasks back ([`PushError`]).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the queue closed and the workers
    /// draining without a deadline.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimQueue, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let task = |id| {
    ///     ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
    ///         Ok::<(), ReclaimError>(())
    ///     })
    /// };
    /// let queue = ReclaimQueue::builder().build()?;
    /// queue.push(task(1)).await?;
    ///
    /// let report = queue.shutdown(Duration::from_secs(5)).await;
    /// assert!(report.drained && report.left.is_empty() && report.interrupted.is_empty());
    /// assert!(queue.stats().closed);
    /// assert!(queue.push(task(2)).await.is_err()); // no new work
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let shared = &self.shared;
        shared.close();
        shared.tracker.close();
        let drained = tokio::time::timeout(deadline, shared.tracker.wait())
            .await
            .is_ok();
        let mut left = Vec::new();
        if !drained {
            shared.stop.store(true, Ordering::SeqCst);
            left = std::mem::take(&mut shared.heap.lock().entries)
                .into_sorted_vec()
                .into_iter()
                .rev()
                .map(|entry| entry.task)
                .collect();
            shared.permits.add_permits(left.len());
            for worker in shared.aborts.lock().iter() {
                worker.abort();
            }
            shared.work.notify_waiters();
            shared.tracker.wait().await;
        }
        let interrupted = std::mem::take(&mut *shared.interrupted.lock());
        if !left.is_empty() || !interrupted.is_empty() {
            tracing::warn!(
                left = left.len(),
                interrupted = interrupted.len(),
                "reclaim queue shut down before draining"
            );
        }
        ShutdownReport {
            drained,
            left,
            interrupted,
        }
    }
}

impl Shared {
    /// Inserts an accepted task (its permit already taken); hands it back
    /// if the queue closed meanwhile.
    fn insert(&self, task: ReclaimTask) -> Result<(), ReclaimTask> {
        // User code: outside the lock, contained.
        let priority = catch_unwind(AssertUnwindSafe(|| self.policy.priority(&task.info())))
            .unwrap_or(Priority::URGENT);
        let since = Instant::now().saturating_duration_since(self.epoch);
        let due = duration_nanos(since).saturating_add(duration_nanos(priority.delay()));
        {
            let mut heap = self.heap.lock();
            if self.closed.load(Ordering::SeqCst) {
                drop(heap);
                self.permits.add_permits(1);
                return Err(task);
            }
            let seq = heap.seq;
            heap.seq += 1;
            heap.entries.push(Entry { due, seq, task });
            heap.peak = heap.peak.max(heap.entries.len());
        }
        self.counters.pushed.fetch_add(1, Ordering::Relaxed);
        self.work.notify_one();
        Ok(())
    }

    /// Takes the task due first, freeing its slot.
    fn pop(&self) -> Option<ReclaimTask> {
        let entry = {
            let mut heap = self.heap.lock();
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let entry = heap.entries.pop()?;
            // Counted before the lock drops: `is_idle` never sees a task
            // that is neither waiting nor running.
            self.counters.in_flight.fetch_add(1, Ordering::SeqCst);
            entry
        };
        self.permits.add_permits(1);
        Some(entry.task)
    }

    fn is_idle(&self) -> bool {
        let heap = self.heap.lock();
        heap.entries.is_empty() && self.counters.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Stops taking tasks; workers drain and exit.
    fn close(&self) {
        {
            let _heap = self.heap.lock();
            self.closed.store(true, Ordering::SeqCst);
        }
        self.permits.close();
        self.work.notify_waiters();
    }

    async fn work_loop(self: Arc<Self>) {
        loop {
            // Fast path: work waiting, no registration with `work`.
            if let Some(task) = self.next_task() {
                self.execute(task).await;
                continue;
            }
            let notified = self.work.notified();
            tokio::pin!(notified);
            // Registered before checking again: a push, resume or close
            // between the check and the await still wakes this worker.
            notified.as_mut().enable();
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Some(task) = self.next_task() {
                self.execute(task).await;
                continue;
            }
            if self.closed.load(Ordering::SeqCst) {
                // Closed and empty: nothing can enter any more.
                return;
            }
            notified.await;
        }
    }

    /// The next task to run, unless paused (before the close) or stopped.
    fn next_task(&self) -> Option<ReclaimTask> {
        if self.paused.load(Ordering::SeqCst) && !self.closed.load(Ordering::SeqCst) {
            return None;
        }
        self.pop()
    }

    /// Runs `task` with retries to its final outcome.
    async fn execute(&self, mut task: ReclaimTask) {
        let info = task.info();
        let mut running = Running {
            shared: self,
            info,
            attempts: 0,
            done: false,
        };
        let schedule = catch_unwind(AssertUnwindSafe(|| self.policy.retry_schedule(&info)))
            .unwrap_or_default();
        let mut backoff = schedule.backoff();
        loop {
            running.attempts = running.attempts.saturating_add(1);
            let error = match task.attempt(Some(schedule.timeout())).await {
                Ok(()) => {
                    self.counters.completed.fetch_add(1, Ordering::Relaxed);
                    running.done = true;
                    return;
                }
                Err(error) => error,
            };
            let delay = if error.is_retryable() {
                backoff.next()
            } else {
                None
            };
            let Some(delay) = delay else {
                running.done = true;
                self.fail(info, running.attempts, error);
                return;
            };
            self.counters.retried.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(task = ?info, attempt = running.attempts, %error, ?delay,
                "reclamation failed; retrying after backoff");
            self.publish(ReclaimEvent::ReclaimRetried {
                task: info,
                attempt: running.attempts,
                error,
                delay,
            });
            tokio::time::sleep(delay).await;
        }
    }

    fn fail(&self, task: TaskInfo, attempts: u32, error: ReclaimError) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(?task, attempts, %error, "reclamation failed");
        self.publish(ReclaimEvent::ReclaimFailed {
            task,
            attempts,
            error,
        });
    }

    /// Sends `event` to the queue's subscribers and to the event bus.
    fn publish(&self, event: ReclaimEvent) {
        crate::event::emit(self.bus.as_ref(), || Event::Reclaim(event.clone()));
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }
}

/// A task a worker is running. Dropped before `done` (its worker aborted by
/// a shutdown deadline), it reports the task interrupted.
struct Running<'a> {
    shared: &'a Shared,
    info: TaskInfo,
    attempts: u32,
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let shared = self.shared;
        if !self.done {
            shared.interrupted.lock().push(self.info);
            shared.fail(
                self.info,
                self.attempts,
                ReclaimError::new(
                    ReclaimErrorKind::Interrupted,
                    "the queue's shutdown deadline passed",
                ),
            );
        }
        if shared.counters.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            shared.idle.notify_waiters();
        }
    }
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
