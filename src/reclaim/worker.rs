//! The worker tasks: each runs one task at a time, with retries, to its
//! final outcome.

use std::future::poll_fn;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use super::heap::{Ended, Next, Shared};
use super::task::{Attempt, ReclaimTask, drop_contained};
use crate::events::Event;
use crate::events::{ReclaimError, ReclaimErrorKind, ReclaimEvent, TaskInfo};

impl Shared {
    /// The loop of worker number `worker`.
    pub(super) async fn work_loop(self: Arc<Self>, worker: usize) {
        let mut ended = None;
        loop {
            // Fast path: work waiting, no registration with `work`. It
            // spends tokio's cooperative budget: a backlog (or tasks that
            // push follow-ups) does not hold the thread for ever.
            let mut task = match self.next(worker, ended.take(), None) {
                Next::Run(task) => {
                    let mut budget = pin!(tokio::task::coop::consume_budget());
                    if futures::poll!(budget.as_mut()).is_ready() {
                        // Budget left: no yield, nothing to hold.
                        task
                    } else {
                        // Held across the yield: a worker aborted there (a
                        // shutdown deadline) reports the task interrupted;
                        // one dropped with its runtime puts it back.
                        let mut held = Running::new(&self, worker, task, 0);
                        budget.await;
                        match held.release() {
                            Some(task) => task,
                            None => continue,
                        }
                    }
                }
                Next::Exit => return,
                Next::Sleep => {
                    // Registered under the lock, if there is still nothing
                    // to run: a push, resume or close after it wakes this
                    // worker.
                    let mut notified = pin!(self.work.notified());
                    match self.next(worker, None, Some(notified.as_mut())) {
                        Next::Run(task) => task,
                        Next::Exit => return,
                        Next::Sleep => {
                            notified.await;
                            continue;
                        }
                    }
                }
            };
            // Most tasks finish at their first poll, here: no retry state,
            // no guard, no timer for them.
            let first = poll_fn(|cx| Poll::Ready(task.start(cx))).await;
            ended = Some(match first {
                Attempt::Done(Ok(())) => {
                    let class = task.info().class;
                    drop_contained(task);
                    Ended {
                        class,
                        completed: true,
                    }
                }
                first => self.execute(worker, task, first).await,
            });
        }
    }

    /// Runs `task`, whose first attempt started as `first`, with retries
    /// to its final outcome.
    async fn execute(&self, worker: usize, task: ReclaimTask, first: Attempt) -> Ended {
        let info = task.info();
        let mut running = Running::new(self, worker, task, 1);
        // Asked of the policy only when needed (an attempt that does not
        // finish at its first poll needs the timeout, a failure the
        // backoff): most tasks succeed at once.
        let mut schedule = None;
        let mut schedule = move || {
            *schedule.get_or_insert_with(|| {
                crate::contain::contain(|| self.policy.retry_schedule(&info)).unwrap_or_default()
            })
        };
        let mut backoff = None;
        let mut first = Some(first);
        loop {
            let outcome = match first.take() {
                Some(Attempt::Done(outcome)) => outcome,
                Some(Attempt::Running(attempt)) => attempt.finish(Some(schedule().timeout())).await,
                None => {
                    running.attempts = running.attempts.saturating_add(1);
                    self.attempting(worker, running.attempts);
                    match running.task.as_mut() {
                        Some(task) => task.attempt(|| Some(schedule().timeout())).await,
                        // Never: the task leaves the guard only at the end.
                        None => Ok(()),
                    }
                }
            };
            // Written off by a shutdown while blocked in this attempt: its
            // end is not counted again (see `next`), nor failed or retried.
            if !self.settle(worker) {
                drop_contained(running.release());
                return Ended {
                    class: info.class,
                    completed: false,
                };
            }
            let error = match outcome {
                Ok(()) => {
                    drop_contained(running.release());
                    return Ended {
                        class: info.class,
                        completed: true,
                    };
                }
                Err(error) => error,
            };
            let delay = if error.is_retryable() {
                let schedule = schedule();
                backoff
                    .get_or_insert_with(|| {
                        if let Err(error) = schedule.backoff().validate() {
                            // Out-of-range settings are drawn clamped; say so.
                            tracing::warn!(task = ?info, %error,
                                "the policy's retry schedule is out of range; clamped");
                        }
                        schedule.backoff().iter()
                    })
                    .next()
            } else {
                None
            };
            let Some(delay) = delay else {
                let attempts = running.attempts;
                let task = running.release();
                self.fail(info, attempts, error.clone());
                if let Some(task) = task {
                    self.bury(task, attempts, error);
                }
                return Ended {
                    class: info.class,
                    completed: false,
                };
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

    pub(super) fn fail(&self, task: TaskInfo, attempts: u32, error: ReclaimError) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(?task, attempts, %error, "reclamation failed");
        self.publish(ReclaimEvent::ReclaimFailed {
            task,
            attempts,
            error,
        });
    }

    /// Publishes `event` on the event bus.
    pub(super) fn publish(&self, event: ReclaimEvent) {
        crate::events::emit(self.bus.as_ref(), || Event::Reclaim(event));
    }
}

/// A task a worker is running, held across its `.await`s. Dropped with
/// the task still in it (the worker's future dropped): a shutdown that
/// stopped the workers reports the task interrupted; otherwise (the
/// worker's runtime went away, the queue open) the task is put back to run
/// again, on a worker the next push brings back.
struct Running<'a> {
    shared: &'a Shared,
    worker: usize,
    info: TaskInfo,
    attempts: u32,
    task: Option<ReclaimTask>,
}

impl<'a> Running<'a> {
    fn new(shared: &'a Shared, worker: usize, task: ReclaimTask, attempts: u32) -> Self {
        Self {
            shared,
            worker,
            info: task.info(),
            attempts,
            task: Some(task),
        }
    }

    /// The task, out of the guard: the worker settles it itself.
    fn release(&mut self) -> Option<ReclaimTask> {
        self.task.take()
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        let shared = self.shared;
        if !shared.stopped() {
            // Not a shutdown's abort: the runtime went away. Back in the
            // queue, unless a shutdown wrote it off meanwhile.
            drop_contained(shared.requeue(self.worker, task, self.attempts));
            return;
        }
        // Counted out first; a shutdown that wrote the task off (its
        // worker blocked past the deadline) reported it already.
        if shared.interrupted(self.worker, self.info.class) {
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
        // A task releasing session resources releases them as it drops.
        drop_contained(task);
    }
}
