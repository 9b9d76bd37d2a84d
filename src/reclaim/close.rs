//! Closing sessions through the queue, and shutting the queue down.

use tokio::time::{Duration, Instant};

use super::heap::Shared;
use super::queue::ReclaimQueue;
use super::report::{PushError, ShutdownReport};
use super::task::{ReclaimTask, release_tasks};
use crate::events::{ReclaimError, ReclaimErrorKind};
use crate::id::SessionKey;
use crate::session::{CloseFrom, CloseOutcome, CloseReason, Session};

impl ReclaimQueue {
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
    ///     session::Classed, CloseReason, Incarnation, NewSession, ReclaimQueue, ResourceClass,
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
    /// (within a class, in the order given). Returns the keys of the
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

    /// Stops taking tasks, lets the workers drain the queue until
    /// `deadline` from now, then stops them. Returns whether everything
    /// drained, the tasks left unstarted (handed back), and those
    /// interrupted while running. Paused workers are resumed to drain.
    /// See the example on [`ShutdownReport`].
    ///
    /// Pushes waiting for room get their tasks back ([`PushError`]).
    ///
    /// A worker blocked in a synchronous call past the deadline (a
    /// [`Resource::release`](crate::Resource::release) that blocks its
    /// thread, a task's future that never yields) cannot be aborted: 100 ms
    /// after the deadline its task is reported interrupted (in
    /// [`ShutdownReport::interrupted`] and a
    /// [`ReclaimFailed`](crate::ReclaimEvent::ReclaimFailed)) and counted
    /// out, and the call returns; the call goes on in that thread, and the
    /// task's end is not counted again. Tokio drives a runtime's timers
    /// from its idle workers, so such a worker can also hold every timer of
    /// its runtime, this call's deadline included: await the shutdown on
    /// another runtime (or a thread of its own) if releases may block.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before the deadline leaves the queue closed and
    /// the workers draining without a deadline. Dropping it after the
    /// deadline (the workers stopped) reports each task it took out and
    /// had not handed back yet as failed, with a
    /// [`ReclaimFailed`](crate::ReclaimEvent::ReclaimFailed) of kind
    /// [`Interrupted`](crate::ReclaimErrorKind::Interrupted), and drops it
    /// (a task releasing session resources releases them when dropped):
    /// nothing goes unreported.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let started = Instant::now();
        let shared = &self.shared;
        shared.close();
        shared.tracker.close();
        let timely = tokio::time::timeout(deadline, shared.tracker.wait())
            .await
            .is_ok();
        let mut left = Unreported {
            shared,
            tasks: Vec::new(),
        };
        if !timely {
            // Taken under the lock, dropped by the caller: a task's `Drop`
            // may release resources (user code).
            left.tasks = shared.stop();
            for worker in shared.aborts.lock().iter().flatten() {
                worker.abort();
            }
            // An aborted worker ends at its next `.await`; one blocked in a
            // synchronous call (a `release` that blocks its thread) never
            // reaches one: its task is written off and reported
            // interrupted, and the shutdown does not wait for it.
            if tokio::time::timeout(ABORTED_WORKERS_END, shared.tracker.wait())
                .await
                .is_err()
            {
                for (info, attempts) in shared.write_off_running() {
                    tracing::error!(task = ?info,
                        "a reclaim worker is blocked in a synchronous call past the shutdown deadline; its task is reported interrupted");
                    shared.interrupted.lock().push(info);
                    shared.fail(
                        info,
                        attempts,
                        ReclaimError::new(
                            ReclaimErrorKind::Interrupted,
                            "the queue's shutdown deadline passed while its worker was blocked in it",
                        ),
                    );
                }
            }
        } else {
            // Every worker ended in time; one that ended without draining
            // (it panicked, or its runtime went away) left tasks waiting:
            // they are handed back, not lost.
            left.tasks = shared.stop_if_left();
        }
        // Not drained if this call or a concurrent one stopped the workers.
        let drained = timely && !shared.stopped();
        // Dead letters are handed back as well: the queue runs nothing more.
        // A `redrive` holding one out puts it back (the queue is closed) once
        // the policy's `priority` returned, with no `.await` between: wait
        // for it, within the deadline (past it, such a letter stays in the
        // queue's dead letters, listed by `dead_letters()`).
        let give_up = started.checked_add(deadline);
        let dead_letters = loop {
            let expired = give_up.is_some_and(|give_up| Instant::now() >= give_up);
            let taken = {
                let mut dead = shared.dead.lock();
                match dead.take_all_settled() {
                    Some(letters) => Some(letters),
                    None if expired => Some(dead.take_all()),
                    None => None,
                }
            };
            if let Some(letters) = taken {
                // After the lock: the letters' errors are user values.
                break super::dead::into_tasks(letters);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let interrupted = std::mem::take(&mut *shared.interrupted.lock());
        if !left.tasks.is_empty() || !interrupted.is_empty() || !dead_letters.is_empty() {
            tracing::warn!(
                left = left.tasks.len(),
                interrupted = interrupted.len(),
                dead_letters = dead_letters.len(),
                "reclaim queue shut down with work not done"
            );
        }
        ShutdownReport {
            drained,
            left: left.hand_back(),
            interrupted,
            dead_letters,
        }
    }
}

/// How long a shutdown past its deadline waits for the workers it aborted
/// to end before it writes off the tasks of those that did not (blocked in
/// a synchronous call): an aborted worker that can end does so at once.
const ABORTED_WORKERS_END: Duration = Duration::from_millis(100);

/// Tasks a shutdown took out of the queue: reported as failed
/// (`Interrupted`) if its future is dropped before it hands them back.
struct Unreported<'a> {
    shared: &'a Shared,
    tasks: Vec<ReclaimTask>,
}

impl Unreported<'_> {
    fn hand_back(mut self) -> Vec<ReclaimTask> {
        std::mem::take(&mut self.tasks)
    }
}

impl Drop for Unreported<'_> {
    fn drop(&mut self) {
        for task in std::mem::take(&mut self.tasks) {
            let error = ReclaimError::new(
                ReclaimErrorKind::Interrupted,
                "the queue's shutdown was dropped before it handed this task back",
            );
            self.shared.fail(task.info(), 0, error);
            // Outside every lock: a task releasing session resources
            // releases them as it drops.
            drop(task);
        }
    }
}
