//! Reclamation tasks: what a [`ReclaimQueue`](super::ReclaimQueue) runs.

use std::any::Any;
use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::{BoxFuture, CatchUnwind};
use tokio::time::Duration;

use crate::events::{ReclaimError, ReclaimErrorKind, TaskInfo};
use crate::id::{RouterId, SessionId};
use crate::session::{
    CloseReason, DeferredClose, Resource, ResourceClass, Session, release_contained,
};

/// The work of a reclamation task: one attempt at releasing something. It
/// may fail ([`ReclaimError::transient`] is retried on the policy's
/// schedule), so it can run more than once.
///
/// Closures `FnMut() -> impl Future<Output = Result<(), ReclaimError>>` are
/// `Reclaim`; the future must own what it uses (`'static`), so clone handles
/// into it.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use session_lifecycle::{reclaim::ReclaimError, reclaim::ReclaimTask, RouterId, SessionId};
///
/// let ports = Arc::new(AtomicU32::new(1));
/// let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
///     let ports = Arc::clone(&ports);
///     async move {
///         ports.fetch_sub(1, Ordering::SeqCst);
///         Ok::<(), ReclaimError>(())
///     }
/// });
/// # let _ = task;
/// ```
pub trait Reclaim: Send + 'static {
    /// Starts one attempt. See the example on [`Reclaim`].
    fn reclaim(&mut self) -> BoxFuture<'static, Result<(), ReclaimError>>;
}

impl<F, Fut> Reclaim for F
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), ReclaimError>> + Send + 'static,
{
    fn reclaim(&mut self) -> BoxFuture<'static, Result<(), ReclaimError>> {
        Box::pin(self())
    }
}

/// A unit of reclamation work with its [`TaskInfo`].
///
/// Build one with [`ReclaimTask::new`] or [`ReclaimTask::for_session`] and
/// push it to a [`ReclaimQueue`](super::ReclaimQueue).
/// [`ReclaimQueue::close_session`](super::ReclaimQueue::close_session) builds
/// the tasks that release a session's attached resources; such a task, if
/// dropped unrun (handed back by a full or shut-down queue and then
/// dropped), releases its resources at once: it is never lost.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     Incarnation, NewSession, reclaim::ReclaimError, ReclaimQueue, reclaim::ReclaimTask, ResourceClass,
///     RouterId, SessionId,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// session.record_in(64 * 1024);
///
/// // Withdraw the session's routes from the router: scarce, so class High.
/// let task = ReclaimTask::for_session(&session, || async {
///     // ... call the router's API here ...
///     Ok::<(), ReclaimError>(())
/// })
/// .class(ResourceClass::High);
/// assert_eq!(task.info().traffic, 64 * 1024);
///
/// let queue = ReclaimQueue::builder().build()?;
/// queue.push(task).await?;
/// queue.idle().await;
/// assert_eq!(queue.stats().completed, 1);
/// # Ok(())
/// # }
/// ```
pub struct ReclaimTask {
    info: TaskInfo,
    /// One pointer for either kind of work: the task moves (push, heap,
    /// worker) in 64 bytes.
    work: Box<dyn Work>,
}

/// What a task runs: the caller's [`Reclaim`], or the release of a closed
/// session's resources.
trait Work: Send + 'static {
    /// Starts one attempt: its future, or its outcome if it ran at once.
    fn start(&mut self) -> Started;

    /// Whether another attempt could do anything.
    fn can_run_again(&self) -> bool;
}

/// An attempt just started.
enum Started {
    Future(BoxFuture<'static, Result<(), ReclaimError>>),
    /// It ran at once.
    Done(Result<(), ReclaimError>),
}

/// The caller's work.
struct User<R>(R);

impl<R: Reclaim> Work for User<R> {
    fn start(&mut self) -> Started {
        Started::Future(self.0.reclaim())
    }

    fn can_run_again(&self) -> bool {
        true
    }
}

impl ReclaimTask {
    /// A task releasing something of `session` on `router`, of class
    /// [`ResourceClass::Normal`] and zero traffic until set. See the example on [`Reclaim`].
    pub fn new(session: SessionId, router: RouterId, work: impl Reclaim) -> Self {
        Self {
            info: TaskInfo::new(session, router, ResourceClass::Normal, 0),
            work: Box::new(User(work)),
        }
    }

    /// A task releasing something of `session`, with the session's router
    /// and its traffic so far.
    pub fn for_session<P>(session: &Session<P>, work: impl Reclaim) -> Self {
        Self::new(session.id(), session.router(), work)
            .traffic(session.traffic().total_bytes())
            .age(session.age())
    }

    /// Sets the class of what the task releases. See the example on [`ReclaimTask`].
    #[must_use]
    pub fn class(mut self, class: ResourceClass) -> Self {
        self.info.class = class;
        self
    }

    /// Sets the session's traffic in bytes.
    #[must_use]
    pub fn traffic(mut self, bytes: u64) -> Self {
        self.info.traffic = bytes;
        self
    }

    /// Sets the session's age ([`TaskInfo::age`]).
    #[must_use]
    pub fn age(mut self, age: Duration) -> Self {
        self.info.age = age;
        self
    }

    /// Whether running it again could do anything: a task releasing a
    /// closed session's resources gave them up at its attempt (each
    /// resource is released once, panic or not), and it completes the
    /// session's close when dropped, so it is never kept.
    pub(super) fn can_run_again(&self) -> bool {
        self.work.can_run_again()
    }

    /// The task's identity and ordering inputs.
    #[must_use]
    pub fn info(&self) -> TaskInfo {
        self.info
    }

    /// Runs one attempt now, outside any queue: for a task a queue handed
    /// back. A panic is contained and returned as
    /// [`ReclaimErrorKind::Panicked`]. See the example on [`PushError`](super::PushError).
    ///
    /// # Errors
    ///
    /// The attempt's error.
    pub async fn run_once(&mut self) -> Result<(), ReclaimError> {
        self.attempt(|| None).await
    }

    /// One attempt, panics contained, bounded by `timeout()` when it gives
    /// one (asked only if the attempt does not finish at its first poll).
    pub(super) async fn attempt(
        &mut self,
        timeout: impl FnOnce() -> Option<Duration>,
    ) -> Result<(), ReclaimError> {
        match poll_fn(|cx| Poll::Ready(self.start(cx))).await {
            Attempt::Done(outcome) => outcome,
            Attempt::Running(running) => running.finish(timeout()).await,
        }
    }

    /// Starts one attempt and polls it once, panics contained: most
    /// attempts finish there, with no timer set and no future kept.
    pub(super) fn start(&mut self, cx: &mut Context<'_>) -> Attempt {
        // `reclaim` itself, not only its future, may panic.
        let future = match catch_unwind(AssertUnwindSafe(|| self.work.start())) {
            Ok(Started::Future(future)) => future,
            Ok(Started::Done(outcome)) => return Attempt::Done(outcome),
            Err(panic) => return Attempt::Done(Err(ReclaimError::panicked(panic))),
        };
        let mut guarded = AssertUnwindSafe(future).catch_unwind();
        match guarded.poll_unpin(cx) {
            Poll::Ready(outcome) => Attempt::Done(contained(outcome)),
            Poll::Pending => Attempt::Running(RunningAttempt(guarded)),
        }
    }
}

/// An attempt after its first poll.
pub(super) enum Attempt {
    /// It finished.
    Done(Result<(), ReclaimError>),
    /// It waits for something.
    Running(RunningAttempt),
}

/// An attempt that did not finish at its first poll.
pub(super) struct RunningAttempt(
    CatchUnwind<AssertUnwindSafe<BoxFuture<'static, Result<(), ReclaimError>>>>,
);

impl RunningAttempt {
    /// Runs the attempt to its end, bounded by `timeout` when given (the
    /// timer starts now).
    pub(super) async fn finish(self, timeout: Option<Duration>) -> Result<(), ReclaimError> {
        let mut attempt = self.0;
        let outcome = match timeout {
            Some(limit) => match tokio::time::timeout(limit, &mut attempt).await {
                Ok(outcome) => outcome,
                Err(_elapsed) => {
                    // The attempt given up is user code dropped mid-way.
                    drop_contained(attempt);
                    return Err(ReclaimError::timed_out(limit));
                }
            },
            None => (&mut attempt).await,
        };
        drop_contained(attempt);
        contained(outcome)
    }
}

/// Drops `value` (a task, an attempt: user code), a panic contained and
/// logged: a worker outlives the `Drop` of the work it ran.
pub(super) fn drop_contained<T>(value: T) {
    if crate::contain::contain(|| drop(value)).is_none() {
        tracing::error!("a reclamation task panicked when dropped; the panic was contained");
    }
}

/// An attempt's outcome, a panic made an error.
fn contained(
    outcome: Result<Result<(), ReclaimError>, Box<dyn Any + Send>>,
) -> Result<(), ReclaimError> {
    outcome.map_err(ReclaimError::panicked)?
}

impl fmt::Debug for ReclaimTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimTask")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The resources of one class of one closed session, released in one go.
/// Dropped unreleased, it releases them: a queued release is never lost.
pub(super) struct ReleaseGroup {
    resources: Vec<Box<dyn Resource>>,
    reason: CloseReason,
    session: SessionId,
    router: RouterId,
    /// Completes the session's close once every group of it is gone.
    _completion: Arc<dyn Send + Sync>,
}

impl ReleaseGroup {
    fn release(&mut self) -> Result<(), ReclaimError> {
        let mut panicked = 0usize;
        for resource in std::mem::take(&mut self.resources) {
            if !release_contained(resource, self.reason, self.session, self.router) {
                panicked += 1;
            }
        }
        if panicked == 0 {
            Ok(())
        } else {
            Err(ReclaimError::new(
                ReclaimErrorKind::Panicked,
                format!("{panicked} resource(s) panicked while being released"),
            ))
        }
    }
}

impl Work for ReleaseGroup {
    fn start(&mut self) -> Started {
        Started::Done(self.release())
    }

    /// Each resource was released at the first attempt, panic or not.
    fn can_run_again(&self) -> bool {
        false
    }
}

impl Drop for ReleaseGroup {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// The tasks releasing the resources of a session closed with
/// `close_deferred`: one per class, most urgent first. Built at once, not
/// lazily: a task dropped unrun still releases its resources, a bare
/// resource held by a lazy iterator across an `.await` would not.
pub(crate) fn release_tasks<P>(session: &Session<P>, deferred: DeferredClose) -> Vec<ReclaimTask> {
    let DeferredClose {
        reason,
        groups,
        completion,
    } = deferred;
    let (id, router) = (session.id(), session.router());
    let traffic = session.traffic().total_bytes();
    let age = session.age();
    groups
        .into_iter()
        .map(move |(class, resources)| ReclaimTask {
            info: TaskInfo::new(id, router, class, traffic).with_age(age),
            work: Box::new(ReleaseGroup {
                resources,
                reason,
                session: id,
                router,
                _completion: Arc::clone(&completion),
            }),
        })
        .collect()
}
