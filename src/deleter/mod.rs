//! Two-phase, strongly consistent router deletion.
//!
//! # Invariants
//!
//! - At most one run per router exists in a deleter at a time: `runs` maps
//!   the router to its run (the receiver of its result, and what the run
//!   fenced) while it runs, and concurrent callers join it.
//! - Every run deletes one incarnation, its target: `delete` reads the
//!   router's incarnation as the call begins, `delete_incarnation` is
//!   given it. A caller joins only a run of its own target; one that finds
//!   a run of another incarnation waits for that run's end and looks again
//!   (or, if that run fenced a newer incarnation, answers that its own is
//!   deleted already). So no caller is ever answered with another
//!   incarnation's report, whatever other deleters do to the router.
//! - A run leaves `runs` before it publishes its result: whoever sees the
//!   result and deletes again starts afresh.
//! - A run is driven by whoever awaits it (see `drive`): the caller that
//!   started it, in its own task, joiners, and the deleter's steward on
//!   the runtime the run started on (see `steward`), one task per runtime
//!   that holds every run started there and drives those nobody else
//!   does. So dropping the future of [`RouterDeleter::delete`], or
//!   holding it without polling it, only stops that caller's waiting; and
//!   the run makes no hop to another task while its caller awaits it.
//!
//! # Deadlock safety
//!
//! The deleter has one lock, `runs`, held only to look up, insert or remove
//! an entry, or to close the tracker. It is never held across an `.await`,
//! while another lock is taken, while a run is handed to the steward (which
//! may spawn it; a runtime shutting down drops the task at once), or while
//! a hold on a run is dropped (dropping the last drops the run, and its
//! entry takes `runs`).
//! The runs' own locks (`drive`) are never held while user code runs.

mod config;
mod confirm;
mod drive;
mod notifier;
mod order;
mod report;
mod run;
mod steward;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::events::{DeletionReport, PhaseDurations};
pub use config::RouterDeleterBuilder;
pub use confirm::Confirmations;
pub use notifier::{NotifyError, TerminationBatch, TerminationNotifier};
pub use report::{DeleteError, DeleteOutcome};

use crate::id::{Incarnation, RouterId};
use crate::store::SessionStore;
use config::Config;
use drive::{Driver, Outcome, SharedRun};

/// A run as `runs` holds it: weakly, so that a run nobody drives any more
/// (its runtime dropped it) ends, and leaves `runs`.
struct RunSlot {
    run: Weak<Driver>,
    state: Arc<RunState>,
}

/// What callers that would join a run need to know of it.
#[derive(Debug)]
pub(crate) struct RunState {
    /// The incarnation the run deletes (and fences, if it can).
    target: Incarnation,
    /// Set once the run fenced `target`: the router is known to have had it.
    fenced: AtomicBool,
    /// Cancelled once a deletion started from inside a running one (see
    /// [`IN_RUN`]) joins or waits for this run: past `max_concurrent`, it
    /// then takes no slot, as it might wait for one its caller holds.
    promoted: CancellationToken,
}

tokio::task_local! {
    /// Set while a run's work is polled: a deletion started from there
    /// (awaited in a store method, the notifier or a resource) is nested.
    static IN_RUN: ();
}

/// Whether the caller polls from inside a run's work.
fn nested() -> bool {
    IN_RUN.try_with(|()| ()).is_ok()
}

/// A run counted in [`RouterDeleter::queued`] while this lives.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn count(queued: &'a AtomicUsize) -> Self {
        queued.fetch_add(1, Ordering::Relaxed);
        Self(queued)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RunState {
    pub(crate) fn target(&self) -> Incarnation {
        self.target
    }

    pub(crate) fn fenced(&self) {
        // Release, paired with the Acquire in `join_or_start`.
        self.fenced.store(true, Ordering::Release);
    }

    /// A nested deletion waits for this run: it must not wait for a slot.
    fn promote(&self, nested: bool) {
        if nested {
            self.promoted.cancel();
        }
    }
}

/// What a caller does about the run it found.
enum Join {
    /// Drive this run to its end: it answers the caller.
    Run(SharedRun),
    /// Drive this run (of another incarnation) to its end, then look again.
    After(SharedRun),
    /// Answered without a run.
    Done(Outcome),
}

/// Deletes routers with strong consistency: when
/// [`delete`](Self::delete) returns, every session of the router is closed
/// and removed, its resources released once, and the router's incarnation is
/// tombstoned.
///
/// A run goes: fence the router (no more sessions on it) → mark each session
/// `Terminating` → notify the router in paced batches through the
/// [`TerminationNotifier`] → wait for confirmations (sessions closing) until
/// the confirmation timeout → re-notify the stragglers after each delay of
/// the [`Backoff`](crate::Backoff) → force-close what is left
/// ([`CloseReason::Forced`](crate::CloseReason::Forced)) → finish the router
/// in the store → [`DeletionReport`].
///
/// Guarantees:
///
/// - **Bounded (I4).** Whatever the notifier does (errors, hangs, panics,
///   never answers), a run waits at most [`max_wait`](Self::max_wait) on
///   timers.
/// - **Cancel-safe and idempotent (I6).** The caller's task drives the run
///   while it awaits it (no hand-off to another task: its sessions stay in
///   its cache), and a task of the deleter drives it whenever nobody else
///   does: dropping the caller's future, or holding it unpolled, does not
///   stop it.
///   Concurrent calls for one router join one run and all get its report. A
///   router left fenced by an interrupted run is resumed by the next call.
/// - **The right incarnation (I9).** A call is answered only with the
///   report of the incarnation it deleted, never an earlier one; with
///   [`delete_incarnation`](Self::delete_incarnation), a request that
///   arrives late or twice cannot delete the router's next life.
/// - **A good neighbour at any size.** Every pass over the sessions (the
///   address sort, marking, waiting, force-closing, dropping the handles,
///   and [`MemoryStore`](crate::MemoryStore)'s fence snapshot and `finish`)
///   yields to the runtime every 4,096 sessions, and between notification
///   batches: deleting a 1M-session router does not stall the heartbeats,
///   probes and deletions that share its worker.
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
///         for key in batch.sessions {
///             let _ = self.0.close_exact(key, CloseReason::RouterDeleted).await;
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
/// let deleter = RouterDeleter::builder().build(Arc::clone(&store), Router(Arc::clone(&store)))?;
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
    runs: Mutex<HashMap<RouterId, RunSlot>>,
    tracker: TaskTracker,
    /// One permit per run allowed at once (`max_concurrent`); tokio's
    /// semaphore is fair, so waiting runs start in order.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Runs waiting for a slot.
    queued: AtomicUsize,
    /// Drive the runs nobody else drives, one per runtime.
    stewards: steward::Stewards,
}

impl<S, N> Drop for Inner<S, N> {
    fn drop(&mut self) {
        // No run is left (each holds the deleter): the stewards leave.
        self.stewards.shut();
    }
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
    /// A builder to configure the deleter. See the example on [`RouterDeleter`].
    pub fn builder() -> RouterDeleterBuilder {
        RouterDeleterBuilder::new()
    }
}

impl<S: SessionStore, N: TerminationNotifier> RouterDeleter<S, N> {
    /// A deleter with the default configuration.
    pub fn new(store: Arc<S>, notifier: N) -> Self {
        Self::from_parts(store, notifier, Config::default())
    }

    fn from_parts(store: Arc<S>, notifier: N, config: Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                notifier,
                slots: config
                    .max_concurrent
                    .map(|cap| Arc::new(tokio::sync::Semaphore::new(cap))),
                config,
                runs: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
                queued: AtomicUsize::new(0),
                stewards: steward::Stewards::default(),
            }),
        }
    }

    /// The store the deleter works on.
    #[must_use]
    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    /// The longest a deletion of a router holding `sessions` sessions waits
    /// on timers, whatever the notifier does: per round (the first
    /// notification and each retry) one `notify_timeout` per batch, the
    /// pacing, and the `confirm_timeout`; plus the backoff's delays at their
    /// longest ([`Backoff::longest_total`](crate::Backoff::longest_total));
    /// plus one millisecond per timer for timer granularity; plus the
    /// deleter's pick-up of a deletion whose future is held without being
    /// polled (its background task takes such a run over within 20 ms,
    /// plus a millisecond of slack).
    /// Work that does not wait (fencing, marking, closing) comes on top and
    /// is proportional to `sessions`. Saturates at [`Duration::MAX`].
    ///
    /// A notifier that blocks its thread instead of awaiting (a synchronous
    /// call inside `notify`) cannot be timed out and is not covered.
    #[must_use]
    pub fn max_wait(&self, sessions: usize) -> Duration {
        self.inner.config.max_wait(sessions)
    }

    /// Number of deletions running now (those waiting for a slot under
    /// [`max_concurrent`](RouterDeleterBuilder::max_concurrent) included).
    #[must_use]
    pub fn running(&self) -> usize {
        self.inner.runs.lock().len()
    }

    /// Number of deletions waiting for a slot under
    /// [`max_concurrent`](RouterDeleterBuilder::max_concurrent): asked for,
    /// their routers not fenced yet.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// The routers whose deletion is running now, by id: what stays fenced
    /// if the process stops before they finish (a later `delete` resumes
    /// each).
    ///
    /// See the example on [`Lifecycle::shutdown`](crate::Lifecycle::shutdown),
    /// which reports them.
    #[must_use]
    pub fn deleting(&self) -> Vec<RouterId> {
        let mut routers: Vec<RouterId> = self.inner.runs.lock().keys().copied().collect();
        routers.sort_unstable();
        routers
    }

    /// Deletes `router`: see the type's documentation for the run.
    ///
    /// Deletes the incarnation the router has as the call begins (live, or
    /// left fenced by an interrupted run, which this call resumes; a router
    /// whose last incarnation is deleted answers
    /// [`DeleteOutcome::AlreadyDeleted`]), and answers with that
    /// incarnation's report, never another's: it is
    /// [`delete_incarnation`](Self::delete_incarnation) of the incarnation
    /// read from [`SessionStore::router_status`] first. Joins the run
    /// already going for that incarnation, if any; a run of another
    /// incarnation (one this deleter started before the router was deleted
    /// elsewhere and registered again) is waited for, not joined.
    ///
    /// # Errors
    ///
    /// [`DeleteError::UnknownRouter`] for a router the store does not know,
    /// [`DeleteError::ShuttingDown`] after [`shutdown`](Self::shutdown),
    /// [`DeleteError::Store`] if the store's backend failed, and
    /// [`DeleteError::Interrupted`] if the run stopped before its end; in the
    /// last two cases the router stays fenced and another call resumes it. A
    /// router already deleted is [`DeleteOutcome::AlreadyDeleted`], not an
    /// error, for as long as the store remembers it: a store forgets the
    /// oldest deleted routers past its tombstone capacity
    /// ([`MemoryStoreBuilder::tombstone_capacity`](crate::store::MemoryStoreBuilder::tombstone_capacity)),
    /// and then answers [`DeleteError::UnknownRouter`] for them. A
    /// controller that retries deletions treats both as done.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the deletion starts when this future is first polled
    /// (on the current tokio runtime) and from then on belongs to the
    /// deleter. Dropping the future stops only the waiting; the deletion
    /// goes on and finishes.
    ///
    /// # Where the run runs
    ///
    /// In the task that awaits this future: after the first poll (which
    /// yields once, so that calls made together join one run), the caller's
    /// own polls drive the deletion, with no hand-off to another task or
    /// thread. One task of the deleter, its steward, drives the runs no
    /// caller drives: a run whose future is dropped at once, and one whose
    /// future is held without being polled within 20 ms (two of the
    /// steward's 10 ms ticks), so a deletion never waits long for a
    /// caller. The deleter has a steward on each runtime its deletions
    /// start on: it spawns with the first deletion there, drives only
    /// deletions started there (so a runtime dropped, or not driven, stops
    /// no deletion of another runtime), and leaves after a second without
    /// any.
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
            // The incarnation the router has as the call begins is the one
            // this call deletes. A store that answers at once (in memory)
            // starts the run in this first poll; otherwise a task of the
            // deleter awaits the answer and starts (or joins) the run, so
            // the deletion goes on once this future was polled, even if
            // the caller is gone by the time the store answers.
            let runtime = crate::build::timed_runtime().ok_or(DeleteError::NoRuntime)?;
            // Read here, in the caller's task: the task below inherits no
            // task-local.
            let nested = nested();
            let store = Arc::clone(&this.inner.store);
            let mut status = Box::pin(async move { store.router_status(router).await });
            if let Poll::Ready(status) = futures::poll!(status.as_mut()) {
                return match status {
                    Ok(status) => this.delete_in(router, status.incarnation(), false).await,
                    // Shut down: the only thing left to do was join a run.
                    Err(_) if this.inner.tracker.is_closed() => Err(DeleteError::ShuttingDown),
                    Err(error) => Err(DeleteError::from_router(router, error)),
                };
            }
            // Under `runs`, where `shutdown` closes the tracker. A call made
            // after a shutdown began may still join a run, not start one.
            let (token, admitted) = {
                let _runs = this.inner.runs.lock();
                (this.inner.tracker.token(), !this.inner.tracker.is_closed())
            };
            let (answer, answered) = oneshot::channel();
            drop(runtime.spawn(async move {
                let _token = token;
                let outcome = match status.await {
                    Ok(status) => {
                        let target = status.incarnation();
                        let work = this.delete_in(router, target, admitted);
                        if nested {
                            IN_RUN.scope((), work).await
                        } else {
                            work.await
                        }
                    }
                    // Shut down: the only thing left to do was join a run.
                    Err(_) if !admitted => Err(DeleteError::ShuttingDown),
                    Err(error) => Err(DeleteError::from_router(router, error)),
                };
                let _ = answer.send(outcome);
            }));
            answered
                .await
                .unwrap_or(Err(DeleteError::Interrupted(router)))
        }
    }

    /// Deletes `router` as [`delete`](Self::delete) does, but only its
    /// incarnation `incarnation`: a request that arrives late or twice (after
    /// the router was deleted and registered again) deletes nothing and
    /// answers [`DeleteOutcome::AlreadyDeleted`] for `incarnation` (or
    /// [`DeleteError::UnknownRouter`] once the store forgot the router: see
    /// [`delete`](Self::delete)'s errors).
    ///
    /// Joins the run already going for this incarnation, if any, and
    /// resumes it if it was left fenced.
    ///
    /// # Errors
    ///
    /// As [`delete`](Self::delete), and
    /// [`DeleteError::IncarnationMismatch`] for an incarnation newer than
    /// any the router has had.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the run starts when this future is first polled and
    /// from then on belongs to the deleter; dropping the future stops only
    /// the waiting. The caller's task drives the run while it awaits it (see
    /// “Where the run runs” on [`delete`](Self::delete)).
    pub fn delete_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<DeleteOutcome, DeleteError>> + Send + 'static {
        self.delete_in(router, incarnation, false)
    }

    /// Deletes `router` in `target`; `admitted`: the caller holds a token
    /// of the tracker taken before any shutdown, so a run may start even if
    /// a shutdown began since (otherwise it may only join one).
    fn delete_in(
        &self,
        router: RouterId,
        target: Incarnation,
        admitted: bool,
    ) -> impl Future<Output = Result<DeleteOutcome, DeleteError>> + Send + 'static {
        let this = self.clone();
        async move {
            // Before it joins a run too: a caller's first poll drives the
            // run, on the caller's runtime (see `timer`), which must have
            // its time driver; outside one the run cannot be driven.
            crate::build::timed_runtime().ok_or(DeleteError::NoRuntime)?;
            let nested = nested();
            let other = match this.join_or_start(router, target, admitted, nested)? {
                Join::Run(run) => {
                    // A caller that joins wakes the run (after `runs`: the
                    // wake runs the waiters' wakers), so that it is polled
                    // on this caller's runtime: it may wait for a timer of
                    // a runtime nobody drives any more (its caller left it
                    // idle), made again here (see `timer`).
                    run.wake();
                    return run.await;
                }
                Join::Done(outcome) => return outcome,
                Join::After(other) => other,
            };
            // Another incarnation's run must end first. A task of the
            // deleter waits for it and then deletes `target`, so the
            // deletion goes on even if the caller leaves meanwhile.
            let runtime = crate::build::timed_runtime().ok_or(DeleteError::NoRuntime)?;
            let (token, admitted) = {
                let _runs = this.inner.runs.lock();
                let open = !this.inner.tracker.is_closed();
                (this.inner.tracker.token(), admitted || open)
            };
            let (answer, answered) = oneshot::channel();
            drop(runtime.spawn(async move {
                let _token = token;
                let _ = answer.send(this.after(router, target, admitted, nested, other).await);
            }));
            answered
                .await
                .unwrap_or(Err(DeleteError::Interrupted(router)))
        }
    }

    /// Waits for `other` (a run of another incarnation) to end, then
    /// deletes `router` in `target`.
    async fn after(
        &self,
        router: RouterId,
        target: Incarnation,
        admitted: bool,
        nested: bool,
        mut other: SharedRun,
    ) -> Result<DeleteOutcome, DeleteError> {
        loop {
            // Ends within its own bound; its end removed it from `runs`.
            let _ = (&mut other).await;
            match self.join_or_start(router, target, admitted, nested)? {
                Join::Run(run) => return run.await,
                Join::Done(outcome) => return outcome,
                Join::After(next) => other = next,
            }
        }
    }

    /// Finds the run that answers a deletion of `router` in `target`, or
    /// starts one; `nested`: the caller polls from inside a run's work.
    fn join_or_start(
        &self,
        router: RouterId,
        target: Incarnation,
        admitted: bool,
        nested: bool,
    ) -> Result<Join, DeleteError> {
        let mut runs = self.inner.runs.lock();
        // A run whose driver is gone (dropped with its runtime) is on its way
        // out of `runs`: it is not joined, a new run takes its place.
        if let Some((state, run)) = runs
            .get(&router)
            .and_then(|slot| Some((Arc::clone(&slot.state), slot.run.upgrade()?)))
        {
            // The joined run is handed out, never dropped under `runs`: the
            // last hold on a run drops it, and that takes `runs`.
            state.promote(nested);
            return Ok(if state.target == target {
                // This run deletes that very incarnation, finishing or not.
                Join::Run(SharedRun::join(run))
            } else if target < state.target && state.fenced.load(Ordering::Acquire) {
                drop(runs);
                drop(run);
                // The router had a newer life already: `target` is deleted.
                Join::Done(Ok(DeleteOutcome::AlreadyDeleted {
                    router,
                    incarnation: target,
                }))
            } else {
                // Another incarnation's run: its end tells.
                Join::After(SharedRun::join(run))
            });
        }
        // Checked under `runs`, where `shutdown` closes the tracker: no run
        // starts after a shutdown began, but for a `delete` admitted before.
        if !admitted && self.inner.tracker.is_closed() {
            return Err(DeleteError::ShuttingDown);
        }
        // Probed with its time driver by the caller, before `runs`.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| DeleteError::NoRuntime)?;
        let state = Arc::new(RunState {
            target,
            fenced: AtomicBool::new(false),
            promoted: CancellationToken::new(),
        });
        state.promote(nested);
        // Taken under `runs`: a `shutdown` that starts after this point
        // waits for the run. (An admitted caller's own token keeps the
        // tracker from emptying until this one is taken.)
        let token = self.inner.tracker.token();
        let entry = RunEntry {
            inner: Arc::clone(&self.inner),
            router,
            state: Arc::clone(&state),
        };
        let run = async move {
            let _token = token;
            let inner = Arc::clone(&entry.inner);
            // Past the cap: wait for a slot, in order, before anything;
            // unless a nested deletion waits for this run (it may hold a
            // slot itself).
            let _slot = match &inner.slots {
                Some(slots) if !entry.state.promoted.is_cancelled() => {
                    // Counted out on drop: this future may be dropped here
                    // (its runtime gone).
                    let _queued = Queued::count(&inner.queued);
                    tokio::select! {
                        biased;
                        () = entry.state.promoted.cancelled() => None,
                        slot = Arc::clone(slots).acquire_owned() => slot.ok(),
                    }
                }
                _ => None,
            };
            let work = run::delete_router(
                &*inner.store,
                &inner.notifier,
                &inner.config,
                router,
                &entry.state,
            );
            let outcome = IN_RUN.scope((), work).await;
            // Out of `runs` before the result is out: whoever sees the
            // result and deletes again starts afresh, and `running` no
            // longer counts this run.
            drop(entry);
            outcome
        };
        // The caller drives the run in its own task while it awaits it; the
        // steward, a task of the deleter, whenever nobody else does.
        let (run, steward) = SharedRun::start(router, Box::pin(run));
        runs.insert(
            router,
            RunSlot {
                run: run.downgrade(),
                state,
            },
        );
        drop(runs);
        // Outside the lock: the steward may be spawned (a runtime that is
        // shutting down drops it at once, and the run it was handed).
        self.inner.stewards.adopt(steward, &runtime);
        Ok(Join::Run(run))
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
    ///     deleter::DeleteError, MemoryStore, NotifyError, RouterDeleter, RouterId, SessionStore,
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
        // Every run ended: the stewards leave now rather than lingering.
        self.inner.stewards.close().await;
    }
}

/// A run's entry in `runs`, removed when the run ends, whether it
/// finished or was dropped with its runtime; a later `delete` then starts
/// afresh (and resumes the fenced router) instead of joining a dead run.
struct RunEntry<S, N> {
    inner: Arc<Inner<S, N>>,
    router: RouterId,
    state: Arc<RunState>,
}

impl<S, N> Drop for RunEntry<S, N> {
    fn drop(&mut self) {
        // The removed slot drops after the lock: nothing in it runs user
        // code, but nothing needs the lock for it either.
        let removed = {
            let mut runs = self.inner.runs.lock();
            if runs
                .get(&self.router)
                .is_some_and(|slot| Arc::ptr_eq(&slot.state, &self.state))
            {
                runs.remove(&self.router)
            } else {
                None
            }
        };
        drop(removed);
    }
}
