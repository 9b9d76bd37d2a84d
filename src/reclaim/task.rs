//! Reclamation tasks: what a [`ReclaimQueue`](super::ReclaimQueue) runs.

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::time::Duration;

use crate::id::{RouterId, SessionId};
use crate::session::{
    CloseReason, DeferredClose, Resource, ResourceClass, Session, release_contained,
};

/// What identifies a reclamation task and orders it: its session and router,
/// its resource class, and the session's traffic when it was queued.
///
/// Events about a task carry its `TaskInfo`.
///
/// # Example
///
/// ```
/// use session_lifecycle::{ResourceClass, RouterId, SessionId, TaskInfo};
///
/// let info = TaskInfo::new(SessionId::new(7), RouterId::new(1), ResourceClass::High, 4096);
/// assert_eq!(info.class, ResourceClass::High);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct TaskInfo {
    /// The session whose resources the task releases.
    pub session: SessionId,
    /// The session's router.
    pub router: RouterId,
    /// The class of the resources released.
    pub class: ResourceClass,
    /// The session's traffic in bytes (both directions) when queued.
    pub traffic: u64,
}

impl TaskInfo {
    /// The description of a task.
    ///
    /// See the example on [`TaskInfo`].
    #[must_use]
    pub const fn new(
        session: SessionId,
        router: RouterId,
        class: ResourceClass,
        traffic: u64,
    ) -> Self {
        Self {
            session,
            router,
            class,
            traffic,
        }
    }
}

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
/// use session_lifecycle::{ReclaimError, ReclaimTask, RouterId, SessionId};
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
    /// Starts one attempt.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use futures::future::BoxFuture;
    /// use session_lifecycle::{Reclaim, ReclaimError, ReclaimTask, RouterId, SessionId};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// /// Gives a port back to the router's pool.
    /// struct FreePort {
    ///     port: u16,
    ///     pool: Arc<Mutex<Vec<u16>>>,
    /// }
    ///
    /// impl Reclaim for FreePort {
    ///     fn reclaim(&mut self) -> BoxFuture<'static, Result<(), ReclaimError>> {
    ///         let (port, pool) = (self.port, Arc::clone(&self.pool));
    ///         Box::pin(async move {
    ///             pool.lock()
    ///                 .map_err(|_| ReclaimError::permanent("port pool poisoned"))?
    ///                 .push(port);
    ///             Ok(())
    ///         })
    ///     }
    /// }
    ///
    /// let pool = Arc::new(Mutex::new(Vec::new()));
    /// let mut task = ReclaimTask::new(
    ///     SessionId::new(1),
    ///     RouterId::new(1),
    ///     FreePort { port: 4000, pool: Arc::clone(&pool) },
    /// );
    /// task.run_once().await?;
    /// assert_eq!(*pool.lock().unwrap(), vec![4000]);
    /// # Ok(())
    /// # }
    /// ```
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
///     Incarnation, NewSession, ReclaimError, ReclaimQueue, ReclaimTask, ResourceClass,
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
    work: Work,
}

pub(super) enum Work {
    User(Box<dyn Reclaim>),
    Release(ReleaseGroup),
}

impl ReclaimTask {
    /// A task releasing something of `session` on `router`, of class
    /// [`ResourceClass::Normal`] and zero traffic until set.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimTask, ResourceClass, RouterId, SessionId,
    /// };
    ///
    /// let task = ReclaimTask::new(SessionId::new(7), RouterId::new(1), || async {
    ///     Ok::<(), ReclaimError>(())
    /// });
    /// assert_eq!(task.info().class, ResourceClass::Normal);
    /// assert_eq!(task.info().traffic, 0);
    /// ```
    pub fn new(session: SessionId, router: RouterId, work: impl Reclaim) -> Self {
        Self {
            info: TaskInfo::new(session, router, ResourceClass::Normal, 0),
            work: Work::User(Box::new(work)),
        }
    }

    /// A task releasing something of `session`, with the session's router
    /// and its traffic so far.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     Incarnation, NewSession, ReclaimError, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(7), RouterId::new(2), Incarnation::new(1))
    ///         .into_session();
    /// session.record_out(1_000);
    /// let task =
    ///     ReclaimTask::for_session(&session, || async { Ok::<(), ReclaimError>(()) });
    /// assert_eq!(
    ///     (task.info().session, task.info().router),
    ///     (SessionId::new(7), RouterId::new(2))
    /// );
    /// assert_eq!(task.info().traffic, 1_000);
    /// ```
    pub fn for_session<P>(session: &Session<P>, work: impl Reclaim) -> Self {
        Self::new(session.id(), session.router(), work).traffic(session.traffic().total_bytes())
    }

    /// Sets the class of what the task releases.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimTask, ResourceClass, RouterId, SessionId,
    /// };
    ///
    /// let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
    ///     Ok::<(), ReclaimError>(())
    /// })
    /// .class(ResourceClass::Critical);
    /// assert_eq!(task.info().class, ResourceClass::Critical);
    /// ```
    #[must_use]
    pub fn class(mut self, class: ResourceClass) -> Self {
        self.info.class = class;
        self
    }

    /// Sets the session's traffic in bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{ReclaimError, ReclaimTask, RouterId, SessionId};
    ///
    /// let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
    ///     Ok::<(), ReclaimError>(())
    /// })
    /// .traffic(1 << 30); // a busy session: released first within its class
    /// assert_eq!(task.info().traffic, 1 << 30);
    /// ```
    #[must_use]
    pub fn traffic(mut self, bytes: u64) -> Self {
        self.info.traffic = bytes;
        self
    }

    /// The task's identity and ordering inputs.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimTask, ResourceClass, RouterId, SessionId, TaskInfo,
    /// };
    ///
    /// let task = ReclaimTask::new(SessionId::new(1), RouterId::new(2), || async {
    ///     Ok::<(), ReclaimError>(())
    /// });
    /// let expected =
    ///     TaskInfo::new(SessionId::new(1), RouterId::new(2), ResourceClass::Normal, 0);
    /// assert_eq!(task.info(), expected);
    /// ```
    #[must_use]
    pub fn info(&self) -> TaskInfo {
        self.info
    }

    /// Runs one attempt now, outside any queue: for a task a queue handed
    /// back. A panic is contained and returned as
    /// [`ReclaimErrorKind::Panicked`].
    ///
    /// # Errors
    ///
    /// The attempt's error.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     ReclaimError, ReclaimErrorKind, ReclaimTask, RouterId, SessionId,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
    ///     Err::<(), _>(ReclaimError::transient("router busy"))
    /// });
    /// let error = task.run_once().await.unwrap_err();
    /// assert_eq!(error.kind(), ReclaimErrorKind::Transient);
    ///
    /// let mut panicky = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
    ///     let ports: Vec<u16> = Vec::new();
    ///     let _ = ports[0]; // a bug: the panic is contained
    ///     Ok::<(), ReclaimError>(())
    /// });
    /// assert_eq!(
    ///     panicky.run_once().await.unwrap_err().kind(),
    ///     ReclaimErrorKind::Panicked
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run_once(&mut self) -> Result<(), ReclaimError> {
        self.attempt(None).await
    }

    /// One attempt, panics contained, bounded by `timeout` when given.
    pub(super) async fn attempt(&mut self, timeout: Option<Duration>) -> Result<(), ReclaimError> {
        let work = match &mut self.work {
            Work::Release(group) => return group.release(),
            Work::User(work) => work,
        };
        // `reclaim` itself, not only its future, may panic.
        let future =
            catch_unwind(AssertUnwindSafe(|| work.reclaim())).map_err(ReclaimError::panicked)?;
        let guarded = AssertUnwindSafe(future).catch_unwind();
        let outcome = match timeout {
            Some(limit) => tokio::time::timeout(limit, guarded)
                .await
                .map_err(|_elapsed| ReclaimError::timed_out(limit))?,
            None => guarded.await,
        };
        outcome.map_err(ReclaimError::panicked)?
    }
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
    groups
        .into_iter()
        .map(move |(class, resources)| ReclaimTask {
            info: TaskInfo::new(id, router, class, traffic),
            work: Work::Release(ReleaseGroup {
                resources,
                reason,
                session: id,
                router,
                _completion: Arc::clone(&completion),
            }),
        })
        .collect()
}

/// Why one attempt of a reclamation task failed.
///
/// Cheap to clone: events carry it.
///
/// # Example
///
/// ```
/// use session_lifecycle::{ReclaimError, ReclaimErrorKind};
///
/// let error = ReclaimError::transient("port table busy");
/// assert!(error.is_retryable());
/// assert_eq!(error.kind(), ReclaimErrorKind::Transient);
/// assert_eq!(error.to_string(), "release failed: port table busy");
/// assert!(!ReclaimError::permanent("no such port").is_retryable());
/// ```
#[derive(Clone)]
pub struct ReclaimError {
    kind: ReclaimErrorKind,
    source: Arc<dyn StdError + Send + Sync>,
}

/// The kind of a [`ReclaimError`].
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{ReclaimErrorKind, ReclaimEvent, ReclaimQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = ReclaimQueue::builder().build()?;
/// let mut events = queue.subscribe();
/// let alerts = tokio::spawn(async move {
///     while let Ok(event) = events.recv().await {
///         if let ReclaimEvent::ReclaimFailed { task, error, .. } = event {
///             match error.kind() {
///                 ReclaimErrorKind::Panicked => {
///                     eprintln!("bug: release of {task:?} panicked")
///                 }
///                 ReclaimErrorKind::Interrupted => {
///                     eprintln!("shutdown cut {task:?} short")
///                 }
///                 _ => eprintln!("release of {task:?} failed: {error}"),
///             }
///         }
///     }
/// });
/// let _ = queue.shutdown(Duration::from_secs(1)).await;
/// drop(queue); // the alert loop ends with the queue
/// alerts.await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReclaimErrorKind {
    /// The attempt failed and may succeed later: retried.
    Transient,
    /// The attempt failed for good: not retried.
    Permanent,
    /// The attempt panicked; the panic was contained. Not retried: the work
    /// may have been left half done.
    Panicked,
    /// The attempt did not finish within the policy's attempt timeout:
    /// retried.
    TimedOut,
    /// The queue shut down while the task was running and its deadline
    /// passed; the attempt was dropped.
    Interrupted,
}

impl ReclaimError {
    /// A failure worth retrying.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ReclaimError;
    ///
    /// let busy = std::io::Error::new(std::io::ErrorKind::WouldBlock, "port table locked");
    /// let error = ReclaimError::transient(busy);
    /// assert!(error.is_retryable());
    /// assert_eq!(error.to_string(), "release failed: port table locked");
    /// ```
    pub fn transient(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::new(ReclaimErrorKind::Transient, error)
    }

    /// A failure that retrying cannot fix.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{ReclaimError, ReclaimErrorKind};
    ///
    /// let error = ReclaimError::permanent(format!("no port {} on the router", 4000));
    /// assert_eq!(error.kind(), ReclaimErrorKind::Permanent);
    /// assert!(!error.is_retryable());
    /// ```
    pub fn permanent(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::new(ReclaimErrorKind::Permanent, error)
    }

    pub(super) fn new(
        kind: ReclaimErrorKind,
        error: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            source: Arc::from(error.into()),
        }
    }

    pub(super) fn panicked(payload: Box<dyn Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| String::from("a non-string panic payload"));
        Self::new(ReclaimErrorKind::Panicked, message)
    }

    pub(super) fn timed_out(limit: Duration) -> Self {
        Self::new(
            ReclaimErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
    }

    /// The kind of failure.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{ReclaimError, ReclaimErrorKind};
    ///
    /// assert_eq!(ReclaimError::transient("busy").kind(), ReclaimErrorKind::Transient);
    /// ```
    #[must_use]
    pub fn kind(&self) -> ReclaimErrorKind {
        self.kind
    }

    /// Whether the queue retries after this error: for
    /// [`ReclaimErrorKind::Transient`] and [`ReclaimErrorKind::TimedOut`].
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ReclaimError;
    ///
    /// assert!(ReclaimError::transient("busy").is_retryable());
    /// assert!(!ReclaimError::permanent("gone").is_retryable());
    /// ```
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ReclaimErrorKind::Transient | ReclaimErrorKind::TimedOut
        )
    }
}

impl fmt::Display for ReclaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ReclaimErrorKind::Transient => "release failed",
            ReclaimErrorKind::Permanent => "release failed permanently",
            ReclaimErrorKind::Panicked => "release panicked",
            ReclaimErrorKind::TimedOut => "release timed out",
            ReclaimErrorKind::Interrupted => "release interrupted by shutdown",
        };
        write!(f, "{what}: {}", self.source)
    }
}

impl fmt::Debug for ReclaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimError")
            .field("kind", &self.kind)
            .field("source", &format_args!("{}", self.source))
            .finish()
    }
}

impl StdError for ReclaimError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}
