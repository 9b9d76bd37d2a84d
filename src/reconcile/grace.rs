//! The disconnect grace period: a disconnected router's timer, its expiry,
//! and its cancel by a reconciliation.
//!
//! # Invariants
//!
//! - A router has at most one grace entry in `graces`, and whoever removes
//!   it (the expiry at its end, a reconciliation, a new disconnect of a
//!   newer incarnation, or shutdown) releases the router's liveness hold,
//!   exactly once.
//! - The entry holds its timer's abort handle from the start (the task is
//!   spawned under the lock). A timer still sleeping is aborted; once the
//!   expiry closes sessions (`expiry` set), it is only stopped between
//!   chunks, never cut half-way, and a reconciliation that cancels it waits
//!   for the chunk in flight, so the two never close the same router's
//!   sessions side by side.
//!
//! # Deadlock safety
//!
//! Two locks. `graces` (sync) is held only to look up, insert or remove an
//! entry, and never across an `.await`. Under it, the crate may spawn the
//! timer task (its future takes no lock when dropped), publish
//! `RouterDisconnected` (the bus's lock is a leaf) and take the liveness
//! monitor's `held` map (a leaf): so a hold is in place before any cancel
//! or expiry can release it. An expiry's `closing` (a tokio mutex) is held
//! across the awaits of one chunk, never while `graces` is held, and is the
//! only lock then.
//!
//! No user code runs under `graces`: the entries hold no session, the
//! expiry's handles live in its task, and `RouterDisconnected` is counted
//! in the metrics after the lock. One thing stays under it, inside tokio:
//! publishing into a full ring drops the oldest event a lagging subscriber
//! has not read, and if that was the last holder of an error a prober or
//! reclaim task returned, the error's `Drop` runs there (see
//! `MemoryStoreBuilder::events`); it must not call back into the
//! reconciler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tracing::Instrument;

use super::reconciler::Reconciler;
use super::report::ReconcileError;
use crate::events::{Event, emit, send_unrecorded};
use crate::id::{Incarnation, RouterId};
use crate::session::{CloseReason, Session, SessionState};
use crate::store::{RouterStatus, SessionStore};

pub(super) struct Grace {
    incarnation: Incarnation,
    epoch: u64,
    deadline: Instant,
    task: AbortHandle,
    /// Set once the expiry started closing sessions: from then on it is
    /// stopped between chunks, never aborted half-way.
    expiry: Option<Arc<Expiry>>,
}

/// An expiry closing a router's sessions, chunk by chunk.
#[derive(Default)]
struct Expiry {
    /// Raised by a cancel (a reconnect) or a shutdown: no chunk starts after.
    stop: AtomicBool,
    /// Held while a chunk closes: a cancel waits on it, so a reconciliation
    /// never runs beside a chunk of the expiry it cancelled.
    closing: tokio::sync::Mutex<()>,
}

/// Stops a grace period's timer: aborts it while it sleeps, or stops its
/// expiry between chunks once it closes sessions.
fn stop(grace: Grace) {
    match grace.expiry {
        Some(expiry) => expiry.stop.store(true, Ordering::Release),
        None => grace.task.abort(),
    }
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
    /// [`ReconcileError::NoRuntime`] outside a tokio runtime,
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
        tracing::info!(%router, %incarnation, ?grace, "router disconnected; grace period started");
        // Published before the timer exists: `RouterLost` cannot overtake it.
        // Counted in the metrics after the lock (the recorder is user code).
        let disconnected = || Event::RouterDisconnected {
            router,
            incarnation,
            grace,
        };
        send_unrecorded(self.inner.config.events.as_ref(), disconnected);
        let epoch = self.inner.epochs.fetch_add(1, Ordering::Relaxed);
        // Spawned under the lock (the task's future takes no lock when it is
        // dropped): its entry holds its abort handle from the start.
        let this = self.clone();
        let task = self.inner.tracker.spawn_on(
            async move { this.expire(router, incarnation, epoch, deadline).await },
            &runtime,
        );
        let replaced = graces.insert(
            router,
            Grace {
                incarnation,
                epoch,
                deadline,
                task: task.abort_handle(),
                expiry: None,
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
        let expiry = grace.expiry.clone();
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

    async fn expire(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        epoch: u64,
        deadline: Instant,
    ) {
        tokio::time::sleep_until(deadline).await;
        let expiry = {
            let mut graces = self.inner.graces.lock();
            let Some(grace) = graces.get_mut(&router).filter(|g| g.epoch == epoch) else {
                return; // cancelled
            };
            Arc::clone(grace.expiry.get_or_insert_with(Arc::default))
        };
        let span = tracing::info_span!("grace_expired", %router, %incarnation);
        let closed = self
            .close_lost(router, incarnation, &expiry)
            .instrument(span)
            .await;
        if let Some(closed) = closed {
            emit(self.inner.config.events.as_ref(), || Event::RouterLost {
                router,
                incarnation,
                closed,
            });
        }
        let mut graces = self.inner.graces.lock();
        if graces.get(&router).is_some_and(|g| g.epoch == epoch) {
            graces.remove(&router);
            // Under the lock, as the hold was taken: see `# Deadlock safety`.
            self.release(router, incarnation);
        }
    }

    /// Closes the sessions of a router whose grace period expired, chunk by
    /// chunk while it stays live in `incarnation` and the expiry is not
    /// stopped; how many, or `None` if the router was not live (left to its
    /// deletion) or the expiry was stopped before closing anything.
    async fn close_lost(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        expiry: &Expiry,
    ) -> Option<usize> {
        let held = match self.inner.store.sessions(router).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, "grace expired but the router's sessions could not be listed");
                return None;
            }
        };
        let mut open: Vec<_> = held
            .into_iter()
            .filter(|s| s.incarnation() == incarnation && s.state() == SessionState::Active)
            .collect();
        open.sort_unstable_by_key(Session::id);
        let mut closed = None;
        for (number, chunk) in open.chunks(self.inner.config.chunk).enumerate() {
            if number > 0 {
                // Between chunks only: a small router closes in one go.
                tokio::task::yield_now().await;
            }
            let _closing = expiry.closing.lock().await;
            if expiry.stop.load(Ordering::Acquire) {
                tracing::info!("grace expiry stopped: the router reconnected or shutdown");
                break;
            }
            match self.inner.store.router_status(router).await {
                Ok(RouterStatus::Live(live)) if live == incarnation => {}
                Ok(status) => {
                    tracing::info!(
                        ?status,
                        "router no longer live; its sessions are left to the deleter"
                    );
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "grace expiry stopped: router status unknown");
                    break;
                }
            }
            let now = self
                .close_and_remove(chunk, CloseReason::RouterLost)
                .await
                .len();
            closed = Some(closed.unwrap_or(0) + now);
        }
        if open.is_empty() {
            // Nothing to close: lost all the same, if still live.
            let live = matches!(self.inner.store.router_status(router).await,
                Ok(RouterStatus::Live(live)) if live == incarnation);
            closed = live.then_some(0);
        }
        if let Some(closed) = closed {
            tracing::warn!(closed, "grace period expired; router's sessions closed");
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
