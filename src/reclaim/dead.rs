//! Dead letters: tasks that failed for good, kept (bounded) with the task
//! itself so that nothing they were to release is forgotten, and queued
//! again on demand ([`ReclaimQueue::redrive`]); and the count of tasks
//! outstanding by class, where a leak shows as a number that grows.
//!
//! # Invariants
//!
//! - A task the queue accepted is, until it completes, exactly one of:
//!   waiting, running, or a dead letter; the outstanding count covers all
//!   three: waiting and running under the queue's `state` lock, letters
//!   (and letters a `redrive` holds out) here, by class. It leaves the
//!   count when it completes, when its dead letter is evicted (the store
//!   full), when a shutdown hands it back, or when a shutdown deadline
//!   interrupts it. Moving between the two halves, a task is counted in
//!   both for a moment, never in neither: `bury` counts a letter in
//!   before its worker counts the task out, a `redrive` counts a letter
//!   out after its insertion counted it in.
//! - Only tasks that can run again are kept: a task releasing a session's
//!   resources released each of them at its attempt, and holding it would
//!   hold the session's close open (I1 waits for it).
//! - At most `capacity` dead letters are kept; a new one past that evicts
//!   the oldest (counted, logged and published).
//! - A re-drive queues only the letters there when it started, each after
//!   it got room in the queue, taking the letter and inserting it without
//!   an `.await` between: a cancelled re-drive loses no letter.
//!
//! # Deadlock safety
//!
//! The `dead` lock is never held across an `.await`, and nothing takes
//! another lock while holding it. Lock order: `state`, then `dead`, taken
//! together only by [`ReclaimQueue::stats`] (so that a letter a `redrive`
//! moves is never counted in neither half); everywhere else `dead` is
//! taken alone. Nothing of the user runs under it: an evicted letter, and
//! the letters a shutdown takes, are dropped after it is released (a task
//! that releases session resources releases them when dropped, and a
//! letter's error is the user's value: user code).

use std::collections::VecDeque;

use super::heap::{Shared, rank};
use super::queue::ReclaimQueue;
use super::report::{ClassCounts, DeadLetter};
use super::task::ReclaimTask;
use crate::events::{ReclaimError, ReclaimEvent};
use crate::session::ResourceClass;

/// The kept dead letters, oldest first, and their counts.
pub(super) struct DeadLetters {
    letters: VecDeque<Letter>,
    capacity: usize,
    /// Letters a `redrive` took out and has not yet queued or put back:
    /// a shutdown waits for them before it takes the rest (each is out for
    /// a few instructions, no `.await`).
    in_flight: usize,
    /// Letters kept or held out by a `redrive`, by class rank: their part
    /// of the outstanding tasks.
    by_class: [u64; 4],
    /// Tasks kept as dead letters since the queue was built.
    pub(super) buried: u64,
    /// Dead letters queued again.
    pub(super) redriven: u64,
    /// Dead letters dropped because the store was full.
    pub(super) evicted: u64,
}

pub(super) struct Letter {
    task: ReclaimTask,
    attempts: u32,
    error: ReclaimError,
}

/// The tasks of `letters`, taken out of the `dead` lock: their errors
/// (user values, whose `Drop` is user code) are dropped here.
pub(super) fn into_tasks(letters: Vec<Letter>) -> Vec<ReclaimTask> {
    letters.into_iter().map(|letter| letter.task).collect()
}

impl DeadLetters {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            letters: VecDeque::new(),
            capacity,
            in_flight: 0,
            by_class: [0; 4],
            buried: 0,
            redriven: 0,
            evicted: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.letters.len()
    }

    /// Every letter, oldest first, leaving none (counted out). The caller
    /// drops them (with their errors: user code) after the lock, through
    /// [`into_tasks`].
    pub(super) fn take_all(&mut self) -> Vec<Letter> {
        let letters: Vec<Letter> = self.letters.drain(..).collect();
        for letter in &letters {
            self.count_out(letter.task.info().class);
        }
        letters
    }

    /// Every letter, once no `redrive` holds one out; `None` while one
    /// does.
    pub(super) fn take_all_settled(&mut self) -> Option<Vec<Letter>> {
        (self.in_flight == 0).then(|| self.take_all())
    }

    fn count_out(&mut self, class: ResourceClass) {
        let slot = &mut self.by_class[rank(class)];
        *slot = slot.saturating_sub(1);
    }

    /// The outstanding tasks: the queue's waiting and running ones
    /// (`queued`, by class rank) plus these letters.
    pub(super) fn outstanding(&self, queued: [u64; 4]) -> ClassCounts {
        let count = |class| {
            let rank = rank(class);
            queued[rank].saturating_add(self.by_class[rank])
        };
        ClassCounts {
            critical: count(ResourceClass::Critical),
            high: count(ResourceClass::High),
            normal: count(ResourceClass::Normal),
            low: count(ResourceClass::Low),
        }
    }
}

impl Shared {
    /// Keeps `task`, which failed for good, as a dead letter (evicting the
    /// oldest past the capacity). With a capacity of 0, or for a task that
    /// cannot run again (a session's resource release: each resource was
    /// released once, and dropping the task completes the session's
    /// close), the task is dropped. Either way the worker counts the task
    /// out of the queue's own tasks when it ends.
    pub(super) fn bury(&self, task: ReclaimTask, attempts: u32, error: ReclaimError) {
        let (dropped, evicted) = {
            let mut dead = self.dead.lock();
            if dead.capacity == 0 || !task.can_run_again() {
                (Some(task), None)
            } else {
                dead.by_class[rank(task.info().class)] += 1;
                dead.buried += 1;
                dead.letters.push_back(Letter {
                    task,
                    attempts,
                    error,
                });
                // The whole letter leaves the lock: its error is user code.
                let evicted = if dead.letters.len() > dead.capacity {
                    dead.letters.pop_front()
                } else {
                    None
                };
                if let Some(letter) = &evicted {
                    dead.count_out(letter.task.info().class);
                    dead.evicted += 1;
                }
                (None, evicted)
            }
        };
        if let Some(letter) = &evicted {
            let info = letter.task.info();
            tracing::error!(task = ?info,
                "dead-letter store full; the oldest dead letter is dropped");
            self.publish(ReclaimEvent::DeadLetterDropped { task: info });
        }
        // Outside the lock: dropping a task may release resources, and
        // the evicted letter's error is the user's (user code, its panic
        // contained: the worker goes on).
        super::task::drop_contained((dropped, evicted));
    }
}

impl ReclaimQueue {
    /// The tasks that failed for good and are kept for a re-drive, oldest
    /// first (at most the builder's
    /// [`dead_letters`](super::ReclaimQueueBuilder::dead_letters) capacity).
    ///
    /// See the example on [`redrive`](Self::redrive).
    #[must_use]
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.shared
            .dead
            .lock()
            .letters
            .iter()
            .map(|letter| DeadLetter {
                task: letter.task.info(),
                attempts: letter.attempts,
                error: letter.error.clone(),
            })
            .collect()
    }

    /// Queues every dead letter kept when the call starts again, oldest
    /// first, each with a fresh round of attempts; waits for room like
    /// [`push`](Self::push). Returns how many were queued: fewer than were
    /// kept only if the queue shut down meanwhile (the rest stay dead
    /// letters, and [`shutdown`](Self::shutdown) hands them back).
    ///
    /// Call it once whatever made the tasks fail is fixed (a router back,
    /// a dependency restored), or periodically.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a letter leaves the store only when it is queued.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use session_lifecycle::{
    ///     reclaim::{ReclaimError, RetrySchedule, DefaultPolicy, ReclaimTask},
    ///     ReclaimQueue, ResourceClass, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // No retries: a failure is final at once.
    /// let policy = DefaultPolicy::default().retry_schedule(RetrySchedule::none());
    /// let queue = ReclaimQueue::builder().policy(policy).build()?;
    /// let router_up = Arc::new(AtomicBool::new(false));
    /// let up = Arc::clone(&router_up);
    /// let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
    ///     let up = up.load(Ordering::SeqCst);
    ///     async move {
    ///         if up { Ok(()) } else { Err(ReclaimError::transient("router unreachable")) }
    ///     }
    /// })
    /// .class(ResourceClass::High);
    /// queue.push(task).await?;
    /// queue.idle().await;
    ///
    /// // Failed for good, but kept: the leak is a number that does not go away.
    /// assert_eq!(queue.dead_letters().len(), 1);
    /// assert_eq!(queue.stats().outstanding.high, 1);
    ///
    /// router_up.store(true, Ordering::SeqCst);
    /// assert_eq!(queue.redrive().await, 1);
    /// queue.idle().await;
    /// assert!(queue.dead_letters().is_empty());
    /// assert_eq!(queue.stats().outstanding.total(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn redrive(&self) -> usize {
        let shared = &self.shared;
        // Before it waits for room (see `push`).
        shared.revive();
        let kept = shared.dead.lock().len();
        let mut queued = 0;
        for _ in 0..kept {
            if shared.reserve().await.is_err() {
                break;
            }
            // Taken and inserted with no `.await` between; held out
            // meanwhile (still counted outstanding here), so a shutdown
            // never takes the letters without it.
            let letter = {
                let mut dead = shared.dead.lock();
                let letter = dead.letters.pop_front();
                dead.in_flight += usize::from(letter.is_some());
                letter
            };
            let Some(letter) = letter else {
                shared.give_back_reserved();
                break;
            };
            let info = letter.task.info();
            let priority = shared.priority(&info);
            let inserted = shared.insert(letter.task, priority, false);
            let mut dead = shared.dead.lock();
            dead.in_flight -= 1;
            match inserted {
                Ok(()) => {
                    // Counted by the queue from its insertion on.
                    dead.count_out(info.class);
                    dead.redriven += 1;
                    queued += 1;
                }
                Err(task) => {
                    // Shut down meanwhile: it stays a dead letter.
                    dead.letters.push_front(Letter {
                        task,
                        attempts: letter.attempts,
                        error: letter.error,
                    });
                    break;
                }
            }
            drop(dead);
        }
        if queued > 0 {
            tracing::info!(queued, "dead letters queued again");
        }
        queued
    }
}
