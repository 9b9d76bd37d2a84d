//! What the reclaim queue reports: [`ReclaimEvent`], the [`TaskInfo`] of a task and its [`ReclaimError`].

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use tokio::time::Duration;

use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::ResourceClass;

/// Something a [`ReclaimQueue`](crate::ReclaimQueue) reports, as
/// [`Event::Reclaim`](crate::Event::Reclaim) on the bus given to
/// [`ReclaimQueueBuilder::events`](crate::ReclaimQueueBuilder::events).
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     reclaim::DefaultPolicy, Event, EventBus, reclaim::ReclaimError, reclaim::ReclaimEvent, ReclaimQueue, reclaim::ReclaimTask,
///     reclaim::RetrySchedule, RouterId, SessionId, Backoff,
/// };
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy =
///     DefaultPolicy::default().retry_schedule(RetrySchedule::new(Backoff::new().retries(1)));
/// let bus = EventBus::default();
/// let mut events = bus.subscribe();
/// let queue = ReclaimQueue::builder().policy(policy).events(bus).build()?;
///
/// // The router keeps refusing: retried once, then reported failed.
/// let refused = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
///     Err::<(), _>(ReclaimError::transient("router refused"))
/// });
/// queue.push(refused).await?;
///
/// match events.recv().await {
///     Some(Event::Reclaim(ReclaimEvent::ReclaimRetried { attempt, delay, .. })) => {
///         assert_eq!(attempt, 1);
///         assert!(!delay.is_zero());
///     }
///     other => panic!("unexpected {other:?}"),
/// }
/// match events.recv().await {
///     Some(Event::Reclaim(ReclaimEvent::ReclaimFailed { task, attempts, error })) => {
///         assert_eq!((task.session, attempts), (SessionId::new(1), 2));
///         assert!(error.is_retryable()); // it failed for good only for lack of retries
///     }
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ReclaimEvent {
    /// An attempt failed and the task will run again after `delay`.
    ReclaimRetried {
        /// The task.
        task: TaskInfo,
        /// The attempt that failed, from 1.
        attempt: u32,
        /// Why it failed.
        error: ReclaimError,
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// A task failed for good: its last attempt failed, it failed
    /// permanently, it panicked, or shutdown interrupted it. A task that
    /// can run again and was not interrupted is kept as a dead letter (see
    /// `ReclaimQueue::redrive`).
    ReclaimFailed {
        /// The task.
        task: TaskInfo,
        /// How many attempts ran.
        attempts: u32,
        /// The last error.
        error: ReclaimError,
    },
    /// The dead-letter store was full: its oldest letter, this task, was
    /// dropped (never re-driven). Each is also logged at error level and
    /// counted in `ReclaimStats::dead_letters_dropped`.
    DeadLetterDropped {
        /// The task dropped.
        task: TaskInfo,
    },
    /// A session lived longer than the policy's threshold; reported once per
    /// session.
    LongLivedSession {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation the session belongs to.
        incarnation: Incarnation,
        /// The session's age when found.
        age: Duration,
    },
}
/// What identifies a reclamation task and orders it: its session and router,
/// its resource class, and the session's traffic when it was queued.
///
/// Events about a task carry its `TaskInfo`.
///
/// # Example
///
/// ```
/// use session_lifecycle::{ResourceClass, RouterId, SessionId, reclaim::TaskInfo};
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
    /// The session's age when queued (zero if not given): a policy may
    /// order by it, or retry old sessions' releases differently.
    pub age: Duration,
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
            age: Duration::ZERO,
        }
    }

    /// The same task with the session's `age`.
    #[must_use]
    pub const fn with_age(mut self, age: Duration) -> Self {
        self.age = age;
        self
    }
}

/// Why one attempt of a reclamation task failed.
///
/// Cheap to clone: events carry it.
///
/// # Example
///
/// ```
/// use session_lifecycle::{reclaim::ReclaimError, reclaim::ReclaimErrorKind};
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
/// use session_lifecycle::{Event, EventBus, reclaim::ReclaimErrorKind, reclaim::ReclaimEvent, ReclaimQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = EventBus::default();
/// let mut events = bus.subscribe();
/// let queue = ReclaimQueue::builder().events(bus).build()?;
/// let alerts = tokio::spawn(async move {
///     while let Some(event) = events.recv().await {
///         if let Event::Reclaim(ReclaimEvent::ReclaimFailed { task, error, .. }) = event {
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
/// drop(queue); // the alert loop ends with the queue, the bus's last holder
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
    /// passed; the attempt was dropped. Also a task that never started,
    /// taken out of the queue by a shutdown whose future was dropped
    /// before it handed the task back.
    Interrupted,
}

impl ReclaimError {
    /// A failure worth retrying. See the example on [`ReclaimError`].
    pub fn transient(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::new(ReclaimErrorKind::Transient, error)
    }

    /// A failure that retrying cannot fix. See the example on [`ReclaimError`].
    pub fn permanent(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::new(ReclaimErrorKind::Permanent, error)
    }

    pub(crate) fn new(
        kind: ReclaimErrorKind,
        error: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            source: Arc::from(error.into()),
        }
    }

    pub(crate) fn panicked(payload: Box<dyn Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| String::from("a non-string panic payload"));
        crate::contain::dispose(payload);
        Self::new(ReclaimErrorKind::Panicked, message)
    }

    pub(crate) fn timed_out(limit: Duration) -> Self {
        Self::new(
            ReclaimErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
    }

    /// The kind of failure. See the example on [`ReclaimError`].
    #[must_use]
    pub fn kind(&self) -> ReclaimErrorKind {
        self.kind
    }

    /// Whether the queue retries after this error: for
    /// [`ReclaimErrorKind::Transient`] and [`ReclaimErrorKind::TimedOut`].
    /// See the example on [`ReclaimError`].
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
        write!(f, "{what}: {}", Shown(&*self.source))
    }
}

/// The user's error, formatted with a panic in its `Display` (user code)
/// contained: a worker logs it, a subscriber formats it.
struct Shown<'a>(&'a (dyn StdError + Send + Sync));

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = crate::contain::contain(|| {
            use std::fmt::Write as _;
            let mut text = String::new();
            write!(text, "{}", self.0).map(|()| text)
        });
        match text {
            Some(Ok(text)) => f.write_str(&text),
            Some(Err(error)) => Err(error),
            None => f.write_str("<the error's Display panicked>"),
        }
    }
}

impl fmt::Debug for ReclaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimError")
            .field("kind", &self.kind)
            .field("source", &format_args!("{}", Shown(&*self.source)))
            .finish()
    }
}

/// The user's error is dropped with its panic contained: its `Drop` is
/// user code, and a reclaim worker (or an event's last holder) drops the
/// last clone.
impl Drop for ReclaimError {
    fn drop(&mut self) {
        // Not the last clone (the common case): a decrement, no user code.
        // `strong_count` alone cannot tell who drops last when clones go
        // on two threads at once, so the last one is swapped out and
        // dropped inside the catch whatever the count said.
        let source = std::mem::replace(&mut self.source, dropped_source());
        crate::contain::contain(move || drop(source));
    }
}

/// What a dropped [`ReclaimError`] holds in its last instant: one shared
/// value, no allocation per drop.
fn dropped_source() -> Arc<dyn StdError + Send + Sync> {
    static DROPPED: std::sync::LazyLock<Arc<dyn StdError + Send + Sync>> =
        std::sync::LazyLock::new(|| Arc::from(Box::<dyn StdError + Send + Sync>::from("dropped")));
    Arc::clone(&DROPPED)
}

impl StdError for ReclaimError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}
