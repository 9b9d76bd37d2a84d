//! The worker tasks: each runs one task at a time, with retries, to its
//! final outcome.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::heap::Shared;
use super::task::ReclaimTask;
use crate::events::Event;
use crate::events::{ReclaimError, ReclaimErrorKind, ReclaimEvent, TaskInfo};

impl Shared {
    pub(super) async fn work_loop(self: Arc<Self>) {
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
        // Asked of the policy only when needed (an attempt that does not
        // finish at its first poll needs the timeout, a failure the
        // backoff): most tasks succeed at once.
        let mut schedule = None;
        let mut schedule = move || {
            *schedule.get_or_insert_with(|| {
                catch_unwind(AssertUnwindSafe(|| self.policy.retry_schedule(&info)))
                    .unwrap_or_default()
            })
        };
        let mut backoff = None;
        loop {
            running.attempts = running.attempts.saturating_add(1);
            let error = match task.attempt(|| Some(schedule().timeout())).await {
                Ok(()) => {
                    self.counters.completed.fetch_add(1, Ordering::Relaxed);
                    self.outstanding.remove(info.class, 1);
                    running.done = true;
                    return;
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
                running.done = true;
                self.fail(info, running.attempts, error.clone());
                self.bury(task, running.attempts, error);
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

    /// Publishes `event` on the event bus.
    pub(super) fn publish(&self, event: ReclaimEvent) {
        crate::events::emit(self.bus.as_ref(), || Event::Reclaim(event));
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
            shared.outstanding.remove(self.info.class, 1);
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
        // SeqCst, as `idle`'s count of waiters: either this sees a waiter
        // or the waiter sees nothing in flight.
        if shared.counters.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && shared.idle_waiters.load(Ordering::SeqCst) > 0
        {
            shared.idle.notify_waiters();
        }
    }
}
