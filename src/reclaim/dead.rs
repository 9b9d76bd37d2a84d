//! Dead letters: tasks that failed for good, kept (bounded) with the task
//! itself so that nothing they were to release is forgotten, and queued
//! again on demand ([`ReclaimQueue::redrive`]); and the count of tasks
//! outstanding by class, where a leak shows as a number that grows.
//!
//! # Invariants
//!
//! - A task the queue accepted is, until it completes, exactly one of:
//!   waiting, running, or a dead letter; `outstanding` counts it (by class)
//!   over all three. It leaves the count when it completes, when its dead
//!   letter is evicted (the store full), when a shutdown hands it back, or
//!   when a shutdown deadline interrupts it.
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
//! The `dead` lock is taken alone: never with the heap lock, never across
//! an `.await`. An evicted task is dropped after it is released (a task
//! that releases session resources releases them when dropped: user code).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use super::heap::Shared;
use super::queue::ReclaimQueue;
use super::report::{ClassCounts, DeadLetter};
use super::task::ReclaimTask;
use crate::events::{ReclaimError, ReclaimEvent};
use crate::session::ResourceClass;

/// The kept dead letters, oldest first.
pub(super) struct DeadLetters {
    letters: VecDeque<Letter>,
    capacity: usize,
    /// Letters a `redrive` took out and has not yet queued or put back:
    /// a shutdown waits for them before it takes the rest (each is out for
    /// a few instructions, no `.await`).
    in_flight: usize,
}

struct Letter {
    task: ReclaimTask,
    attempts: u32,
    error: ReclaimError,
}

impl DeadLetters {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            letters: VecDeque::new(),
            capacity,
            in_flight: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.letters.len()
    }

    /// Every letter's task, oldest first, leaving none.
    pub(super) fn take_all(&mut self) -> Vec<ReclaimTask> {
        self.letters.drain(..).map(|letter| letter.task).collect()
    }

    /// Every letter, once no `redrive` holds one out; `None` while one
    /// does.
    pub(super) fn take_all_settled(&mut self) -> Option<Vec<ReclaimTask>> {
        (self.in_flight == 0).then(|| self.take_all())
    }
}

/// Tasks outstanding by class, and the dead-letter counters.
#[derive(Debug, Default)]
pub(super) struct Outstanding {
    by_class: [AtomicU64; 4],
    pub(super) dead_lettered: AtomicU64,
    pub(super) redriven: AtomicU64,
    pub(super) evicted: AtomicU64,
}

impl Outstanding {
    pub(super) fn add(&self, class: ResourceClass) {
        self.slot(class).fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn remove(&self, class: ResourceClass, tasks: u64) {
        // A task is counted in before any worker can see it (`insert`), so
        // its count out comes later in this counter's order: no underflow.
        self.slot(class).fetch_sub(tasks, Ordering::Relaxed);
    }

    fn slot(&self, class: ResourceClass) -> &AtomicU64 {
        let rank = usize::try_from(class.rank()).unwrap_or(0);
        &self.by_class[rank.min(self.by_class.len() - 1)]
    }

    pub(super) fn snapshot(&self) -> ClassCounts {
        let read = |class| self.slot(class).load(Ordering::Relaxed);
        ClassCounts {
            critical: read(ResourceClass::Critical),
            high: read(ResourceClass::High),
            normal: read(ResourceClass::Normal),
            low: read(ResourceClass::Low),
        }
    }
}

impl Shared {
    /// Keeps `task`, which failed for good, as a dead letter (evicting the
    /// oldest past the capacity). With a capacity of 0, or for a task that
    /// cannot run again (a session's resource release: each resource was
    /// released once, and dropping the task completes the session's
    /// close), the task is dropped.
    pub(super) fn bury(&self, task: ReclaimTask, attempts: u32, error: ReclaimError) {
        let (dropped, evicted) = {
            let mut dead = self.dead.lock();
            if dead.capacity == 0 || !task.can_run_again() {
                (Some(task), None)
            } else {
                dead.letters.push_back(Letter {
                    task,
                    attempts,
                    error,
                });
                let evicted = if dead.letters.len() > dead.capacity {
                    dead.letters.pop_front().map(|letter| letter.task)
                } else {
                    None
                };
                (None, evicted)
            }
        };
        if dropped.is_none() {
            self.outstanding
                .dead_lettered
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(task) = &dropped {
            // Dead letters turned off: the task is dropped, as it fails.
            self.outstanding.remove(task.info().class, 1);
        }
        if let Some(task) = &evicted {
            let info = task.info();
            self.outstanding.remove(info.class, 1);
            self.outstanding.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::error!(task = ?info,
                "dead-letter store full; the oldest dead letter is dropped");
            self.publish(ReclaimEvent::DeadLetterDropped { task: info });
        }
        // Outside the lock: dropping a task may release resources.
        drop((dropped, evicted));
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
        let kept = shared.dead.lock().len();
        let mut queued = 0;
        for _ in 0..kept {
            if shared.room.take().await.is_err() {
                break;
            }
            // Taken and inserted with no `.await` between; counted out
            // meanwhile, so a shutdown never takes the letters without it.
            let letter = {
                let mut dead = shared.dead.lock();
                let letter = dead.letters.pop_front();
                dead.in_flight += usize::from(letter.is_some());
                letter
            };
            let Some(letter) = letter else {
                shared.room.give(1);
                break;
            };
            let inserted = shared.insert(letter.task, false);
            let mut dead = shared.dead.lock();
            dead.in_flight -= 1;
            match inserted {
                Ok(()) => queued += 1,
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
        shared
            .outstanding
            .redriven
            .fetch_add(queued as u64, Ordering::Relaxed);
        if queued > 0 {
            tracing::info!(queued, "dead letters queued again");
        }
        queued
    }
}
