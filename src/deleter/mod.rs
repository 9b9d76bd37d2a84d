//! Two-phase, strongly consistent router deletion.
//!
//! # Invariants
//!
//! - At most one run per router exists in a deleter at a time: `runs` maps
//!   the router to the receiver of its run's result while it runs, and
//!   concurrent callers join it.
//! - A run is owned by a task of `tracker`, never by a caller: dropping the
//!   future of [`RouterDeleter::delete`] only stops waiting.
//!
//! # Deadlock safety
//!
//! The deleter has one lock, `runs`, held only to look up, insert or remove
//! an entry, or to close the tracker. It is never held across an `.await`,
//! while another lock is taken, or while a run's task is spawned (a runtime
//! shutting down drops the task at once, and dropping it takes `runs`).

mod config;
mod notifier;
mod report;
mod run;

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Duration;
use tokio_util::task::TaskTracker;

pub use config::RouterDeleterBuilder;
pub use notifier::{NotifyError, TerminationBatch, TerminationNotifier};
pub use report::{DeleteError, DeleteOutcome, DeletionReport, PhaseDurations};

use crate::id::RouterId;
use crate::store::SessionStore;
use config::Config;

type RunResult = Option<Result<DeleteOutcome, DeleteError>>;

/// Deletes routers with strong consistency: when
/// [`delete`](Self::delete) returns, every session of the router is closed
/// and removed, its resources released once, and the router's incarnation is
/// tombstoned.
///
/// A run goes: fence the router (no more sessions on it) → mark each session
/// `Terminating` → notify the router in paced batches through the
/// [`TerminationNotifier`] → wait for confirmations (sessions closing) until
/// the confirmation timeout → re-notify the stragglers with exponential
/// backoff and jitter → force-close what is left
/// ([`CloseReason::Forced`](crate::CloseReason::Forced)) → finish the router
/// in the store → [`DeletionReport`].
///
/// Guarantees:
///
/// - **Bounded (I4).** Whatever the notifier does (errors, hangs, panics,
///   never answers), a run waits at most [`max_wait`](Self::max_wait) on
///   timers.
/// - **Cancel-safe and idempotent (I6).** The run belongs to a task the
///   deleter tracks; dropping the caller's future does not stop it.
///   Concurrent calls for one router join one run and all get its report. A
///   router left fenced by an interrupted run is resumed by the next call.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
///     SessionStore, TerminationBatch, TerminationNotifier,
/// };
///
/// /// Confirms at once, as a well-behaved router would.
/// struct Router(Arc<MemoryStore>);
///
/// impl TerminationNotifier for Router {
///     async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
///         for id in batch.sessions {
///             let _ = self.0.close(id, CloseReason::RouterDeleted).await;
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// for id in 0..100 {
///     store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
///
/// let deleter = RouterDeleter::builder().build(Arc::clone(&store), Router(Arc::clone(&store)));
/// let outcome = deleter.delete(router).await?;
/// let report = outcome.report().unwrap();
/// assert_eq!((report.sessions, report.confirmed, report.forced), (100, 100, 0));
/// assert!(store.is_empty());
/// # Ok(())
/// # }
/// ```
pub struct RouterDeleter<S, N> {
    inner: Arc<Inner<S, N>>,
}

struct Inner<S, N> {
    store: Arc<S>,
    notifier: N,
    config: Config,
    runs: Mutex<HashMap<RouterId, watch::Receiver<RunResult>>>,
    tracker: TaskTracker,
}

impl<S, N> Clone for RouterDeleter<S, N> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S, N> fmt::Debug for RouterDeleter<S, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterDeleter")
            .field("config", &self.inner.config)
            .field("running", &self.inner.runs.lock().len())
            .finish_non_exhaustive()
    }
}

impl RouterDeleter<(), ()> {
    /// A builder to configure the deleter.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     MemoryStore, NotifyError, RouterDeleter, TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let deleter = RouterDeleter::builder()
    ///     .confirm_timeout(Duration::from_secs(30))
    ///     .build(Arc::new(MemoryStore::new()), Silent);
    /// assert_eq!(deleter.running(), 0);
    /// ```
    pub fn builder() -> RouterDeleterBuilder {
        RouterDeleterBuilder::new()
    }
}

impl<S: SessionStore, N: TerminationNotifier> RouterDeleter<S, N> {
    /// A deleter with the default configuration.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     MemoryStore, NotifyError, RouterDeleter, TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let deleter = RouterDeleter::new(Arc::new(MemoryStore::new()), Silent);
    /// assert_eq!(deleter.running(), 0);
    /// ```
    pub fn new(store: Arc<S>, notifier: N) -> Self {
        Self::from_parts(store, notifier, Config::default())
    }

    fn from_parts(store: Arc<S>, notifier: N, config: Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                notifier,
                config,
                runs: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The store the deleter works on.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     MemoryStore, NotifyError, RouterDeleter, TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let store = Arc::new(MemoryStore::new());
    /// let deleter = RouterDeleter::new(Arc::clone(&store), Silent);
    /// assert!(Arc::ptr_eq(deleter.store(), &store));
    /// ```
    #[must_use]
    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    /// The longest a deletion of a router holding `sessions` sessions waits
    /// on timers, whatever the notifier does: per round (the first
    /// notification and each retry) one `notify_timeout` per batch, the
    /// pacing, and the `confirm_timeout`; plus each backoff delay with its
    /// maximal jitter; plus one millisecond per timer for timer granularity.
    /// Work that does not wait (fencing, marking, closing) comes on top and
    /// is proportional to `sessions`. Saturates at [`Duration::MAX`].
    ///
    /// A notifier that blocks its thread instead of awaiting (a synchronous
    /// call inside `notify`) cannot be timed out and is not covered.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     MemoryStore, NotifyError, RouterDeleter, RouterId, SessionStore,
    ///     TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let _ = store.register_router(router).await?;
    /// let deleter = RouterDeleter::new(Arc::clone(&store), Silent);
    ///
    /// // Alert if a deletion runs past its bound (plus slack for the untimed work).
    /// let sessions = store.count(router).await?;
    /// let bound = deleter.max_wait(sessions) + Duration::from_secs(1);
    /// let outcome = tokio::time::timeout(bound, deleter.delete(router)).await;
    /// assert!(outcome.is_ok(), "deletion of {router} overran its bound");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn max_wait(&self, sessions: usize) -> Duration {
        self.inner.config.max_wait(sessions)
    }

    /// Number of deletions running now.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
    ///     SessionStore, TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let deleter = RouterDeleter::new(Arc::clone(&store), Silent);
    ///
    /// let deletion = tokio::spawn(deleter.delete(router));
    /// tokio::task::yield_now().await; // it starts, then waits for a confirmation
    /// assert_eq!(deleter.running(), 1);
    /// let _ = deletion.await??;
    /// assert_eq!(deleter.running(), 0);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn running(&self) -> usize {
        self.inner.runs.lock().len()
    }

    /// Deletes `router`: see the type's documentation for the run.
    ///
    /// Joins the run already going for this router, if any, and resumes a
    /// router left fenced by an interrupted run.
    ///
    /// # Errors
    ///
    /// [`DeleteError::UnknownRouter`] for a router the store does not know,
    /// [`DeleteError::ShuttingDown`] after [`shutdown`](Self::shutdown),
    /// [`DeleteError::Store`] if the store's backend failed, and
    /// [`DeleteError::Interrupted`] if the run stopped before its end; in the
    /// last two cases the router stays fenced and another call resumes it. A
    /// router already deleted is [`DeleteOutcome::AlreadyDeleted`], not an
    /// error.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the run starts when this future is first polled (on the
    /// current tokio runtime) and from then on belongs to the deleter.
    /// Dropping the future stops only the waiting; the deletion goes on and
    /// finishes.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
    ///     SessionStore, TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let deleter = RouterDeleter::new(Arc::clone(&store), Silent);
    ///
    /// // Two callers delete the same router: they share one run and one report.
    /// let (first, second) = tokio::join!(deleter.delete(router), deleter.delete(router));
    /// assert_eq!(first?, second?);
    /// assert!(store.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn delete(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<DeleteOutcome, DeleteError>> + Send + 'static {
        let this = self.clone();
        async move {
            let mut result = this.join_or_start(router)?;
            match result.wait_for(Option::is_some).await {
                Ok(outcome) => outcome
                    .clone()
                    .unwrap_or(Err(DeleteError::Interrupted(router))),
                Err(_closed) => Err(DeleteError::Interrupted(router)),
            }
        }
    }

    fn join_or_start(&self, router: RouterId) -> Result<watch::Receiver<RunResult>, DeleteError> {
        let mut runs = self.inner.runs.lock();
        if let Some(running) = runs.get(&router) {
            return Ok(running.clone());
        }
        // Checked under `runs`, where `shutdown` closes the tracker: no run
        // starts after a shutdown began.
        if self.inner.tracker.is_closed() {
            return Err(DeleteError::ShuttingDown);
        }
        let runtime = Handle::try_current().map_err(|_| DeleteError::NoRuntime)?;
        let (done, result) = watch::channel(None);
        runs.insert(router, result.clone());
        // Taken under `runs`: a `shutdown` that starts after this point
        // waits for the run.
        let token = self.inner.tracker.token();
        drop(runs);
        // Spawned outside the lock: a runtime that is shutting down drops
        // the task at once, and `RunEntry::drop` takes `runs`.
        let entry = RunEntry {
            inner: Arc::clone(&self.inner),
            router,
            result: result.clone(),
        };
        drop(runtime.spawn(async move {
            let _token = token;
            let inner = &entry.inner;
            let run = run::delete_router(&*inner.store, &inner.notifier, &inner.config, router);
            let outcome = AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or(Err(DeleteError::Interrupted(router)));
            done.send_replace(Some(outcome));
            // `entry` drops here, removing the run from `runs`.
        }));
        Ok(result)
    }

    /// Stops taking new deletions and waits until the running ones finish
    /// (each within its bound).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future stops only the waiting; the deleter
    /// stays shut for new deletions.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     DeleteError, MemoryStore, NotifyError, RouterDeleter, RouterId, SessionStore,
    ///     TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that never confirms: its sessions are force-closed.
    /// struct Silent;
    ///
    /// impl TerminationNotifier for Silent {
    ///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let _ = store.register_router(router).await?;
    /// let deleter = RouterDeleter::new(Arc::clone(&store), Silent);
    /// let deletion = tokio::spawn(deleter.delete(router));
    /// tokio::task::yield_now().await;
    ///
    /// deleter.shutdown().await; // waits for the running deletion
    /// assert!(deletion.await?.is_ok());
    /// assert!(matches!(deleter.delete(router).await, Err(DeleteError::ShuttingDown)));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        {
            let _runs = self.inner.runs.lock();
            self.inner.tracker.close();
        }
        self.inner.tracker.wait().await;
    }
}

/// A run's entry in `runs`, removed when the run's task ends, whether it
/// finished or was dropped with its runtime; a later `delete` then starts
/// afresh (and resumes the fenced router) instead of joining a dead run.
struct RunEntry<S, N> {
    inner: Arc<Inner<S, N>>,
    router: RouterId,
    result: watch::Receiver<RunResult>,
}

impl<S, N> Drop for RunEntry<S, N> {
    fn drop(&mut self) {
        let mut runs = self.inner.runs.lock();
        if runs
            .get(&self.router)
            .is_some_and(|entry| entry.same_channel(&self.result))
        {
            runs.remove(&self.router);
        }
    }
}
