//! [`ReclaimQueue`]: pushing tasks, pausing, watching.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::builder::ReclaimQueueBuilder;
use super::heap::Shared;
use super::report::{PushError, ReclaimStats, TryPushError};
use super::room::NoRoom;
use super::task::ReclaimTask;
use crate::events::ReclaimEvent;
use crate::session::Session;

/// A bounded priority queue of reclamation work, run by worker tasks.
///
/// When sessions are force-closed, reaped or swept, releasing what they held
/// (ports, buffers, routing and policy-cache entries, tokens) is queued
/// here. The queue:
///
/// - **orders** by the [`ReclaimPolicy`](super::ReclaimPolicy): with
///   [`DefaultPolicy`](super::DefaultPolicy), resource class first
///   (critical → low), then traffic (busier sessions first), with aging, so
///   a low task is never starved by a stream of urgent ones (see
///   [`DefaultPolicy`](super::DefaultPolicy) for the bound);
/// - is **bounded**: [`push`](Self::push) waits while `capacity` tasks wait
///   (backpressure), [`try_push`](Self::try_push) hands the task back;
/// - **never drops work**: a failing attempt is retried on the policy's
///   [`RetrySchedule`](super::RetrySchedule) (exponential backoff with
///   jitter, through `backon`), and a task that fails for good (last
///   attempt, permanent error, panic) is reported by a
///   [`ReclaimEvent::ReclaimFailed`], a `tracing` error and the
///   [`failed`](ReclaimStats::failed) count;
/// - **warns** once per session about sessions older than the policy's
///   threshold ([`check_long_lived`](Self::check_long_lived));
/// - **shuts down** draining within a deadline and hands back what was left
///   ([`shutdown`](Self::shutdown)). Dropping every handle closes the queue
///   too; the workers then finish every queued task and exit.
///
/// A worker runs one task at a time and sleeps a failing task's backoff
/// itself; more workers keep other work moving meanwhile. The workers run
/// on the runtime the queue was built on; if that runtime goes away while
/// the queue is open (a controller that restarts its runtime, keeping its
/// deleter), the next push from another runtime spawns new workers there,
/// and the tasks left waiting run (a task a worker was running when its
/// runtime went away waits again, and runs from a fresh attempt). If every
/// handle is dropped while no worker is left, each task still waiting is
/// reported failed ([`Interrupted`](crate::ReclaimErrorKind::Interrupted)),
/// but for a session's releases, which release as they drop. A runtime
/// that is kept but left idle (a `block_on` that returned) runs nothing:
/// build the queue on a runtime that runs as long as it is used.
///
/// Handles are cheap to clone and share one queue.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use session_lifecycle::{
///     reclaim::ReclaimError, ReclaimQueue, reclaim::ReclaimTask, ResourceClass, RouterId, SessionId,
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
    pub(super) shared: Arc<Shared>,
    /// Closes the queue when the last handle drops (workers hold `shared`
    /// only).
    pub(super) _owner: Arc<Owner>,
}

pub(super) struct Owner(pub(super) Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        let shared = &self.0;
        shared.close();
        // The workers drain what waits and exit; with none left (their
        // runtime gone, now or later), nothing is dropped unreported.
        shared.orphan();
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
    /// A builder: capacity, workers, policy. See the example on [`ReclaimQueue`].
    pub fn builder() -> ReclaimQueueBuilder {
        ReclaimQueueBuilder::default()
    }

    /// Queues `task`, waiting while the queue is full.
    ///
    /// Pushes waiting for room are served in the order they came: a slot
    /// freed while pushes wait goes to the one that has waited longest,
    /// and no later push (nor a [`try_push`](Self::try_push)) takes a slot
    /// while one waits.
    ///
    /// A task must not await `push` into its own queue (a follow-up pushed
    /// as it runs): when the queue is full, only a worker taking a task
    /// frees a slot, the slot goes to the pushes already waiting, and with
    /// every worker inside such a task nothing frees one again: the queue
    /// stalls until the attempts time out. Push follow-ups with
    /// [`try_push`](Self::try_push) (handling `Full`), or from a task of
    /// their own (`tokio::spawn`), as a consumer of a bounded channel does
    /// when it sends into that channel.
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
    ///     reclaim::ReclaimError, ReclaimQueue, reclaim::ReclaimTask, RouterId, SessionId,
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
        let shared = &self.shared;
        // Asked once, before any wait: a task's priority is fixed at push.
        let priority = shared.priority(&task.info());
        let task = match shared.try_insert(task, priority) {
            Ok(()) => return Ok(()),
            Err((task, NoRoom::Closed)) => return Err(PushError(task)),
            Err((task, NoRoom::Full)) => task,
        };
        // Full: wait for a slot, then enter with no `.await` between (the
        // due time counts from then).
        if shared.reserve().await.is_err() {
            return Err(PushError(task));
        }
        shared.insert(task, priority, true).map_err(PushError)
    }

    /// Queues `task` if there is room now.
    ///
    /// # Errors
    ///
    /// [`TryPushError::Full`] or [`TryPushError::ShutDown`], handing the task
    /// back.
    pub fn try_push(&self, task: ReclaimTask) -> Result<(), TryPushError> {
        let priority = self.shared.priority(&task.info());
        match self.shared.try_insert(task, priority) {
            Ok(()) => Ok(()),
            Err((task, NoRoom::Closed)) => Err(TryPushError::ShutDown(task)),
            Err((task, NoRoom::Full)) => Err(TryPushError::Full(task)),
        }
    }

    /// Reports every session of `sessions` that is open and older than the
    /// policy's [`long_lived_threshold`](super::ReclaimPolicy::long_lived_threshold)
    /// with one [`ReclaimEvent::LongLivedSession`] (on the bus given to
    /// [`events`](ReclaimQueueBuilder::events)), once per session however
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
    ///     reclaim::DefaultPolicy, Event, EventBus, Incarnation, NewSession, reclaim::ReclaimEvent, ReclaimQueue,
    ///     RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hour = Duration::from_secs(3_600);
    /// let policy = DefaultPolicy::default().long_lived_threshold(Some(hour));
    /// let bus = EventBus::default();
    /// let mut events = bus.subscribe();
    /// let queue = ReclaimQueue::builder().policy(policy).events(bus).build()?;
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    ///
    /// tokio::time::advance(2 * hour).await;
    /// assert_eq!(queue.check_long_lived([&session]), 1);
    /// assert_eq!(queue.check_long_lived([&session]), 0); // reported once
    /// match events.try_recv() {
    ///     Some(Event::Reclaim(ReclaimEvent::LongLivedSession { session: id, age, .. })) => {
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
        self.long_lived(sessions).map_or(0, |found| found.reported)
    }

    /// Whether the policy's long-lived check is on.
    pub(crate) fn watches_long_lived(&self) -> bool {
        let policy = &self.shared.policy;
        matches!(
            crate::contain::contain(|| policy.long_lived_threshold()),
            Some(Some(_))
        )
    }

    /// The check of [`check_long_lived`](Self::check_long_lived), also
    /// counting every open session past the threshold (reported now or
    /// before); `None` if the policy turns the check off.
    pub(crate) fn long_lived<'a, P: 'a>(
        &self,
        sessions: impl IntoIterator<Item = &'a Session<P>>,
    ) -> Option<LongLived> {
        let policy = &self.shared.policy;
        let Some(Some(threshold)) = crate::contain::contain(|| policy.long_lived_threshold())
        else {
            return None;
        };
        let mut reported = 0;
        let mut current = 0;
        for session in sessions {
            let age = session.age();
            if age < threshold || session.is_closed() {
                continue;
            }
            current += 1;
            if session.flag_long_lived() {
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
        Some(LongLived { reported, current })
    }

    /// Stops the workers from starting tasks (tasks running go on); pushes
    /// still queue. For maintenance windows and deterministic tests. Has no
    /// effect once the queue is closed: a closed queue always drains.
    /// See the example on [`push`](Self::push).
    pub fn pause(&self) {
        self.shared.set_paused(true);
    }

    /// Lets the workers start tasks again. See the example on [`push`](Self::push).
    pub fn resume(&self) {
        self.shared.set_paused(false);
        self.shared.revive();
    }

    /// A snapshot of the queue's counters.
    #[must_use]
    pub fn stats(&self) -> ReclaimStats {
        let shared = &self.shared;
        let state = shared.state.lock();
        let (depth, peak_depth, in_flight) = (state.heap.len(), state.heap.peak, state.running);
        let (pushed, completed, outstanding) = (state.pushed, state.completed, state.outstanding);
        let (paused, closed) = (state.paused && !state.closed, state.closed);
        // `dead` before `state` is let go (the lock order is `state`, then
        // `dead`): a letter a `redrive` moves in between would be counted
        // in neither half.
        let dead = shared.dead.lock();
        drop(state);
        let outstanding = dead.outstanding(outstanding);
        let counters = &shared.counters;
        ReclaimStats {
            capacity: shared.capacity,
            depth,
            peak_depth,
            in_flight,
            pushed,
            completed,
            retried: counters.retried.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            long_lived: counters.long_lived.load(Ordering::Relaxed),
            workers: shared.workers,
            paused,
            closed,
            dead_letters: dead.len(),
            dead_lettered: dead.buried,
            redriven: dead.redriven,
            dead_letters_dropped: dead.evicted,
            outstanding,
        }
    }

    /// Waits until no task waits or runs (new pushes may arrive right
    /// after). Workers must not be paused for this to resolve.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only observes.
    pub async fn idle(&self) {
        /// Counts this call among the waiters until it returns or drops.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.shared.idle_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.shared.idle_waiters);
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
}

/// What one long-lived check found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LongLived {
    /// Sessions reported by this check (never before).
    pub(crate) reported: usize,
    /// Open sessions past the threshold, reported now or before.
    pub(crate) current: usize,
}
