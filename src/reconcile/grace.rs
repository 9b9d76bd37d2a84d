//! The disconnect grace period: a disconnected router's timer, its expiry,
//! and its cancel by a reconciliation.
//!
//! # Invariants
//!
//! - A router has at most one grace entry in `graces`, and whoever removes
//!   it (the expiry's task when it ends, however it ends: its expiry done,
//!   a panic, its runtime gone; a reconciliation, a new disconnect of a
//!   newer incarnation, or shutdown) releases the router's liveness hold,
//!   exactly once. The task's `PeriodEnd` is part of its future from the
//!   spawn, so an entry never outlives its task.
//! - The entry holds its timer's abort handle from the start (the task is
//!   spawned under the lock). A timer still sleeping is aborted; once the
//!   expiry closes sessions (`started`), it is only stopped between
//!   chunks, never cut half-way, and a reconciliation that cancels it waits
//!   for the chunk in flight, so the two never close the same router's
//!   sessions side by side.
//! - An expiry never gives up on a store read that fails: it retries, with
//!   a backoff, until the store answers or the period is stopped (I5).
//!
//! # Deadlock safety
//!
//! Two locks. `graces` (sync) is held only to look up, insert or remove an
//! entry, and never across an `.await`. Under it, the crate may spawn the
//! timer task (its future, dropped before the disconnect filed its entry,
//! as a spawn on a runtime shutting down drops it at once, takes no lock:
//! it marks the period dropped and the disconnect files nothing; after
//! that its `PeriodEnd` takes `graces` when the task ends, unless the
//! period was stopped: every stop, under `graces` or after the entry left
//! it, cancels the period's token before it aborts the task), publish
//! `RouterDisconnected` (the bus's lock is a leaf) and take the liveness
//! monitor's `held` map (a leaf): so a hold is in place before any cancel
//! or expiry can release it. An expiry's `closing` (a tokio mutex) is held
//! across the closes of one chunk (the reclaim queue's room awaited, the
//! resources released inline: synchronous user code, which cannot wait for
//! it), never while `graces` is held, and is the only lock then; the
//! chunk's removals from the store (user code that may await a
//! reconciliation, which waits for `closing`) run after it.
//!
//! No user code runs under `graces`: the entries hold no session, the
//! expiry's handles live in its task, and `RouterDisconnected` is counted
//! in the metrics after the lock. Two things stay under it, inside tokio's
//! send: the wakers of the subscriptions waiting in `recv` (a task's
//! waker only schedules it; a hand-written waker must not call back into
//! the reconciler from `wake`), and, publishing into a full ring, the drop
//! of the oldest event a lagging subscriber has not read: if that was the
//! last holder of an error a prober or reclaim task returned, the error's
//! `Drop` runs there (see `MemoryStoreBuilder::events`); it must not call
//! back into the reconciler.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::reconciler::Reconciler;
use super::report::ReconcileError;
use crate::closing::remove_all;
use crate::events::{Event, emit, send_unrecorded};
use crate::id::{Incarnation, RouterId};
use crate::session::{CloseReason, Session, SessionState};
use crate::store::{RouterError, RouterStatus, SessionStore};

pub(super) struct Grace {
    incarnation: Incarnation,
    epoch: u64,
    deadline: Instant,
    task: AbortHandle,
    /// Shared with the period's task from its start.
    expiry: Arc<Expiry>,
    /// Set (under `graces`) once the expiry started closing sessions: from
    /// then on it is stopped between chunks, never aborted half-way.
    started: bool,
}

/// A grace period's expiry, closing a router's sessions chunk by chunk.
#[derive(Default)]
struct Expiry {
    /// Cancelled by a cancel (a reconnect), a newer incarnation's period or
    /// a shutdown, always after the period's entry left `graces`: no chunk
    /// starts after, a retry's wait ends, and the task's end leaves
    /// `graces` alone.
    stop: CancellationToken,
    /// Held while a chunk closes: a cancel waits on it, so a reconciliation
    /// never runs beside the closes of a chunk of the expiry it cancelled
    /// (it may beside their removals from the store: closed sessions, which
    /// it removes too if it comes first).
    closing: tokio::sync::Mutex<()>,
    /// Who takes the period's entry out if its task's future is dropped:
    /// `UNFILED` until the disconnect that spawned it filed its entry
    /// (`FILED`, under `graces`); a future dropped before that (a spawn on
    /// a runtime shutting down drops it at once, under `graces`) marks it
    /// `DROPPED` and takes no lock, and the disconnect files nothing.
    filed: AtomicU8,
}

const UNFILED: u8 = 0;
const FILED: u8 = 1;
const DROPPED: u8 = 2;

/// Stops a grace period whose entry left `graces`: aborts its timer while
/// it sleeps, or stops its expiry between chunks once it closes sessions.
fn stop(grace: Grace) {
    grace.expiry.stop.cancel();
    if !grace.started {
        grace.task.abort();
    }
}

/// The end of a grace period's task, owned by its future from the spawn:
/// however the task ends (at the end of its expiry, in a panic, dropped
/// with its runtime before or after it first ran), unless the period was
/// stopped (its entry gone already) or never filed, it takes the period's
/// entry out of `graces` and releases the liveness hold: a router is never
/// left "in grace" with no task behind it.
struct PeriodEnd<S: SessionStore> {
    reconciler: Reconciler<S>,
    router: RouterId,
    incarnation: Incarnation,
    epoch: u64,
    expiry: Arc<Expiry>,
}

impl<S: SessionStore> Drop for PeriodEnd<S> {
    fn drop(&mut self) {
        // Stopped: whoever stopped it took the entry out and released the
        // hold (and may hold `graces` now: not taken here).
        if self.expiry.stop.is_cancelled() {
            return;
        }
        // Dropped before its disconnect filed it (that disconnect holds
        // `graces`, and files nothing once it sees `DROPPED`).
        let filed = &self.expiry.filed;
        if filed
            .compare_exchange(UNFILED, DROPPED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return;
        }
        if std::thread::panicking() {
            tracing::error!(router = %self.router, incarnation = %self.incarnation,
                "a grace expiry panicked; the router's grace period ended");
        }
        let mut graces = self.reconciler.inner.graces.lock();
        if graces
            .get(&self.router)
            .is_some_and(|g| g.epoch == self.epoch)
        {
            graces.remove(&self.router);
            // Under the lock, as the hold was taken: see `# Deadlock safety`.
            self.reconciler.release(self.router, self.incarnation);
        }
    }
}

/// The longest delay between two tries of a grace expiry's store reads,
/// before jitter (which adds up to as much again).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// How long a grace expiry waits before each retry of a store read that
/// failed: from 100 ms doubling to [`MAX_RETRY_DELAY`], each plus a random
/// jitter of up to one more delay (so at most 60 s), for as long as the
/// store fails.
fn retry_delays() -> impl Iterator<Item = Duration> {
    crate::Backoff::new()
        .retries(64)
        .delays(Duration::from_millis(100), MAX_RETRY_DELAY)
        .iter()
        .chain(std::iter::repeat(MAX_RETRY_DELAY))
}

/// Far enough not to matter: what a grace period past `Instant`'s range
/// means.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

impl<S: SessionStore> Reconciler<S> {
    /// Routers in their grace period now.
    ///
    /// A router deleted during its grace period still counts until the
    /// period's deadline: the period then ends and closes nothing (the
    /// deletion closed the sessions).
    ///
    /// See the example on [`router_disconnected`](Self::router_disconnected).
    #[must_use]
    pub fn in_grace(&self) -> usize {
        self.inner.graces.lock().len()
    }

    /// When `router`'s grace period ends, if it is in one (as for
    /// [`in_grace`](Self::in_grace), also after the router's deletion,
    /// until that deadline).
    ///
    /// See the example on [`router_disconnected`](Self::router_disconnected).
    #[must_use]
    pub fn grace_deadline(&self, router: RouterId) -> Option<Instant> {
        self.inner.graces.lock().get(&router).map(|g| g.deadline)
    }

    /// Starts `router`'s grace period: unless a
    /// [`reconcile`](Self::reconcile) of the router comes first, its
    /// sessions are closed with [`CloseReason::RouterLost`] when the period
    /// ends. Returns the deadline. A router already in its grace period
    /// keeps its deadline.
    ///
    /// Handle one router's disconnects and reconnects in order (one task
    /// per router connection, or a per-router lock): a `router_disconnected`
    /// for an old connection that runs after the new connection's
    /// `reconcile` starts a grace period that would close the reconnected
    /// router's sessions at its end.
    ///
    /// # Errors
    ///
    /// [`ReconcileError::NotLive`] if the router's deletion started (the
    /// deleter handles its sessions; also when the router was deleted and
    /// registered again during the call, and the new incarnation's grace
    /// period runs: that one is left as it is),
    /// [`ReconcileError::UnknownRouter`],
    /// [`ReconcileError::NoRuntime`] outside a tokio runtime (or on one
    /// built without its time driver, or shutting down, which drops the
    /// period's timer unrun),
    /// [`ReconcileError::ShutDown`] after [`shutdown`](Self::shutdown), and
    /// [`ReconcileError::Store`] if the backend failed.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     CloseReason, MemoryStore, NewSession, Reconciler, RouterId, SessionId,
    ///     SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let reconciler = Reconciler::builder()
    ///     .grace_period(Duration::from_secs(30))
    ///     .build(Arc::clone(&store))?;
    ///
    /// let deadline = reconciler.router_disconnected(router).await?;
    /// assert_eq!(reconciler.in_grace(), 1);
    /// assert_eq!(reconciler.grace_deadline(router), Some(deadline));
    ///
    /// // It does not come back: at the deadline its sessions close; it stays registered.
    /// assert_eq!(session.closed().await, CloseReason::RouterLost);
    /// assert_eq!(reconciler.in_grace(), 0);
    /// assert!(store.router_status(router).await.is_ok());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn router_disconnected(&self, router: RouterId) -> Result<Instant, ReconcileError> {
        let incarnation = match self.inner.store.router_status(router).await? {
            RouterStatus::Live(incarnation) => incarnation,
            status => return Err(ReconcileError::NotLive { router, status }),
        };
        let runtime = Handle::try_current().map_err(|_| ReconcileError::NoRuntime)?;
        let grace = self.inner.config.grace;
        let now = Instant::now();
        let deadline = now
            .checked_add(grace)
            .or_else(|| now.checked_add(FAR_FUTURE))
            .unwrap_or(now);
        // The timer, made here: tokio panics making one on a runtime built
        // without its time driver, which must be this call's `NoRuntime`,
        // not a task that dies on its first poll.
        let timer = crate::contain::contain(|| tokio::time::sleep_until(deadline))
            .ok_or(ReconcileError::NoRuntime)?;
        let mut graces = self.inner.graces.lock();
        if self.inner.tracker.is_closed() {
            return Err(ReconcileError::ShutDown);
        }
        if let Some(running) = graces.get(&router) {
            if running.incarnation == incarnation {
                return Ok(running.deadline);
            }
            if running.incarnation > incarnation {
                // The router was deleted and registered again since its
                // status was read: this disconnect is the old life's, and
                // the new life's period stays.
                return Err(ReconcileError::NotLive {
                    router,
                    status: RouterStatus::Deleted(incarnation),
                });
            }
        }
        let epoch = self.inner.epochs.fetch_add(1, Ordering::Relaxed);
        // Spawned under the lock (the task's future, dropped before its
        // entry is filed, takes no lock: see `PeriodEnd`): its entry holds
        // its abort handle from the start.
        let expiry = Arc::new(Expiry::default());
        let end = PeriodEnd {
            reconciler: self.clone(),
            router,
            incarnation,
            epoch,
            expiry: Arc::clone(&expiry),
        };
        let task = self
            .inner
            .tracker
            .spawn_on(async move { end.expire(timer).await }, &runtime);
        if expiry
            .filed
            .compare_exchange(UNFILED, FILED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // The runtime is shutting down: it dropped the task unrun.
            return Err(ReconcileError::NoRuntime);
        }
        tracing::info!(%router, %incarnation, ?grace, "router disconnected; grace period started");
        // Published under the lock, before the timer can take it: `RouterLost`
        // cannot overtake it. Counted in the metrics after the lock (the
        // recorder is user code).
        let disconnected = || Event::RouterDisconnected {
            router,
            incarnation,
            grace,
        };
        send_unrecorded(self.inner.config.events.as_ref(), disconnected);
        let replaced = graces.insert(
            router,
            Grace {
                incarnation,
                epoch,
                deadline,
                task: task.abort_handle(),
                expiry,
                started: false,
            },
        );
        match replaced {
            // An older incarnation's period ends: its hold goes to this one.
            Some(old) => {
                self.release(router, old.incarnation);
                stop(old);
                self.hold(router, incarnation);
            }
            None => self.hold(router, incarnation),
        }
        drop(graces);
        #[cfg(feature = "metrics")]
        crate::events::record(disconnected);
        Ok(deadline)
    }

    /// Ends the router's grace period, whatever its incarnation (an older
    /// one's is stale), and waits for a chunk its expiry may be closing;
    /// `true` if there was one for `incarnation`.
    pub(super) async fn cancel_grace(&self, router: RouterId, incarnation: Incarnation) -> bool {
        let Some(grace) = self.inner.graces.lock().remove(&router) else {
            return false;
        };
        let matched = grace.incarnation == incarnation;
        let expiry = grace.started.then(|| Arc::clone(&grace.expiry));
        self.release(router, grace.incarnation);
        stop(grace);
        if let Some(expiry) = expiry {
            // The chunk in flight finishes; none starts after.
            drop(expiry.closing.lock().await);
        }
        matched
    }

    fn hold(&self, router: RouterId, incarnation: Incarnation) {
        if let Some(monitor) = &self.inner.config.liveness {
            monitor.hold(router, incarnation);
        }
    }

    fn release(&self, router: RouterId, incarnation: Incarnation) {
        if let Some(monitor) = &self.inner.config.liveness {
            monitor.release(router, incarnation);
        }
    }
}

impl<S: SessionStore> PeriodEnd<S> {
    /// The period's task: sleeps until its deadline (`timer`), then closes
    /// the router's sessions unless the period was cancelled. Takes the
    /// entry out when it ends, however it ends (`self` drops then).
    async fn expire(self, timer: tokio::time::Sleep) {
        let (router, incarnation, epoch) = (self.router, self.incarnation, self.epoch);
        let reconciler = &self.reconciler;
        timer.await;
        {
            let mut graces = reconciler.inner.graces.lock();
            let Some(grace) = graces.get_mut(&router).filter(|g| g.epoch == epoch) else {
                return; // cancelled
            };
            grace.started = true;
        }
        let span = tracing::info_span!("grace_expired", %router, %incarnation);
        let closed = reconciler
            .close_lost(router, incarnation, &self.expiry)
            .instrument(span)
            .await;
        if let Some(closed) = closed {
            emit(reconciler.inner.config.events.as_ref(), || {
                Event::RouterLost {
                    router,
                    incarnation,
                    closed,
                }
            });
        }
    }
}

impl<S: SessionStore> Reconciler<S> {
    /// Reads the store with `read` until it answers: a backend error is
    /// retried (I5: the expiry is not given up), after a wait from
    /// [`retry_delays`]; `None` once the expiry is stopped (a reconnect, a
    /// shutdown), also during a wait.
    async fn until_answered<T, F>(
        expiry: &Expiry,
        what: &str,
        mut read: impl FnMut() -> F,
    ) -> Option<Result<T, RouterError>>
    where
        F: Future<Output = Result<T, RouterError>>,
    {
        let mut delays = retry_delays();
        loop {
            if expiry.stop.is_cancelled() {
                return None;
            }
            match read().await {
                Err(RouterError::Backend(error)) => {
                    tracing::warn!(%error, "grace expiry: {what} failed; retrying");
                }
                answered => return Some(answered),
            }
            let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
            tokio::select! {
                () = expiry.stop.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Whether `router` is live in `incarnation`, asked until the store
    /// answers; `None` if the expiry was stopped meanwhile.
    async fn still_live(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        expiry: &Expiry,
    ) -> Option<bool> {
        let store = &*self.inner.store;
        let status = Self::until_answered(expiry, "reading the router's status", || {
            store.router_status(router)
        })
        .await?;
        match status {
            Ok(RouterStatus::Live(live)) if live == incarnation => Some(true),
            status => {
                tracing::info!(
                    ?status,
                    "router no longer live; its sessions are left to the deleter"
                );
                Some(false)
            }
        }
    }

    /// Closes the sessions of a router whose grace period expired, chunk by
    /// chunk while it stays live in `incarnation` and the expiry is not
    /// stopped; how many, or `None` if the router was not live (left to its
    /// deletion) or the expiry was stopped before closing anything. A store
    /// read that fails is retried until the store answers or the expiry is
    /// stopped; the handles the expiry lets go drop with their payloads'
    /// panics contained.
    async fn close_lost(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        expiry: &Expiry,
    ) -> Option<usize> {
        let store = &*self.inner.store;
        let listed = Self::until_answered(expiry, "listing the router's sessions", || {
            store.sessions(router)
        })
        .await?;
        let Ok(held) = listed else {
            tracing::info!("router gone; its sessions are left to the deleter");
            return None;
        };
        let (open, others): (Vec<_>, Vec<_>) = held
            .into_iter()
            .partition(|s| s.incarnation() == incarnation && s.state() == SessionState::Active);
        crate::contain::drop_each_logged(others, "grace expiry");
        // Let go each with its payload's `Drop` contained, also if this
        // task is dropped with its runtime while it closes them.
        let mut open = crate::contain::LetGo::new(open, "grace expiry");
        open.sort_unstable_by_key(Session::id);
        let closed = self.close_chunks(router, incarnation, expiry, &open).await;
        drop(open);
        if let Some(closed) = closed {
            tracing::warn!(closed, "grace period expired; router's sessions closed");
        }
        closed
    }

    /// The chunks of [`close_lost`](Self::close_lost).
    async fn close_chunks(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        expiry: &Expiry,
        open: &[Session<S::Payload>],
    ) -> Option<usize> {
        if open.is_empty() {
            // Nothing to close: lost all the same, if still live.
            let live = self.still_live(router, incarnation, expiry).await?;
            return live.then_some(0);
        }
        let mut closed = None;
        for (number, chunk) in open.chunks(self.inner.config.chunk).enumerate() {
            if number > 0 {
                // Between chunks only: a small router closes in one go.
                tokio::task::yield_now().await;
            }
            // Asked before the chunk's lock: a retry's wait never holds up a
            // cancel.
            match self.still_live(router, incarnation, expiry).await {
                Some(true) => {}
                Some(false) | None => break,
            }
            let closing = expiry.closing.lock().await;
            if expiry.stop.is_cancelled() {
                tracing::info!("grace expiry stopped: the router reconnected or shutdown");
                break;
            }
            let now = self.close_only(chunk, CloseReason::RouterLost).await;
            // The closes are done: a cancel waiting for the chunk goes on.
            // The removals (the store: user code, which may itself wait for
            // a reconciliation of this router, and so for `closing`) run
            // after the lock.
            drop(closing);
            remove_all(&*self.inner.store, &now).await;
            closed = Some(closed.unwrap_or(0) + now.len());
        }
        closed
    }

    /// Stops every grace timer (their routers keep their sessions) and
    /// refuses new ones; waits for an expiry that is running to finish.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     MemoryStore, NewSession, reconcile::ReconcileError, Reconciler, RouterId, SessionId,
    ///     SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
    /// let _ = reconciler.router_disconnected(router).await?;
    ///
    /// reconciler.shutdown().await;
    /// assert_eq!(reconciler.in_grace(), 0);
    /// assert!(!session.is_closed()); // the router keeps its sessions
    /// let refused = reconciler.router_disconnected(router).await;
    /// assert!(matches!(refused, Err(ReconcileError::ShutDown)));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        let stopped: Vec<_> = {
            let mut graces = self.inner.graces.lock();
            self.inner.tracker.close();
            graces.drain().collect()
        };
        for (router, grace) in stopped {
            self.release(router, grace.incarnation);
            stop(grace);
        }
        self.inner.tracker.wait().await;
    }
}
