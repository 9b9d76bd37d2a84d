//! One wiring point for every piece, and one ordered shutdown: [`Lifecycle`].
//!
//! # Invariants
//!
//! - Every piece publishes on the one bus and releases through the one
//!   queue; the reconciler holds routers in the one monitor. `build`
//!   refuses a piece builder already wired elsewhere, so no piece talks to
//!   a bus or queue the shutdown does not drain.
//! - The queue shuts down after every other piece stopped or the deadline
//!   passed: each of them pushes releases into it.
//!
//! - `builder`: [`LifecycleBuilder`], which builds and wires the pieces;
//! - `shutdown`: what [`Lifecycle::shutdown`] reports.

mod builder;
mod shutdown;

pub use builder::LifecycleBuilder;
use shutdown::stop_within;
pub use shutdown::{LifecycleShutdown, Piece};

use std::fmt;
use std::sync::Arc;

use tokio::time::{Duration, Instant};

use crate::budget::NotificationBudget;
use crate::deleter::{RouterDeleter, TerminationNotifier};
use crate::events::{EventBus, Subscription};
use crate::expiry::ExpiryMonitor;
use crate::liveness::{LivenessMonitor, NoProbe, Prober};
use crate::reclaim::ReclaimQueue;
use crate::reconcile::Reconciler;
use crate::session::{NewSession, Session};
use crate::stats::Stats;
use crate::store::{BackendError, CreateError, SessionStore};
use crate::sweeper::AuditSweeper;

/// Every piece a controller needs, built over one store and wired
/// together, with one ordered [`shutdown`](Self::shutdown).
///
/// [`Lifecycle::builder`] takes the store and your
/// [`TerminationNotifier`] (and, if you have one, your [`Prober`] and each
/// piece's builder) and builds:
///
/// - one [`EventBus`] every piece publishes on ([`subscribe`](Self::subscribe));
/// - one [`ReclaimQueue`] through which every piece releases what the
///   sessions it closes held;
/// - a [`RouterDeleter`] notifying through your notifier;
/// - a [`LivenessMonitor`] probing through your prober;
/// - a [`Reconciler`] that holds a disconnected router in the monitor for
///   its grace period;
/// - an [`ExpiryMonitor`] closing sessions at their expiry (it costs
///   nothing until a session is tracked: [`create`](Self::create) tracks
///   those created with one);
/// - an [`AuditSweeper`], unless you opt out.
///
/// Use each piece through its accessor, with its own API. The pieces stay
/// usable alone, for a controller that wants only some of them. Handles
/// are cheap to clone and share the pieces.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     CloseReason, Lifecycle, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId,
///     SessionId, SessionStore, TerminationBatch, TerminationNotifier,
/// };
///
/// /// Your routers (here each confirms at once, as the router's answer would).
/// struct Routers(Arc<MemoryStore>);
///
/// impl TerminationNotifier for Routers {
///     async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
///         for key in batch.sessions {
///             let _ = self.0.close_exact(key, CloseReason::RouterDeleted).await;
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let lifecycle = Lifecycle::builder(Arc::clone(&store), Routers(Arc::clone(&store)))
///     .deleter(RouterDeleter::builder().confirm_timeout(Duration::from_secs(5)))
///     .build()?;
///
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let session = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// lifecycle.liveness().watch(&session)?;
/// lifecycle.liveness().heartbeat(&session)?;
///
/// let deleted = lifecycle.deleter().delete(router).await?;
/// assert_eq!(deleted.report().map(|report| report.confirmed), Some(1));
/// assert!(lifecycle.shutdown(Duration::from_secs(10)).await.is_complete());
/// # Ok(())
/// # }
/// ```
pub struct Lifecycle<S: SessionStore, N, Pr = NoProbe> {
    store: Arc<S>,
    events: EventBus,
    reclaim: ReclaimQueue,
    deleter: RouterDeleter<S, N>,
    liveness: LivenessMonitor<S, Pr>,
    reconciler: Reconciler<S>,
    expiry: ExpiryMonitor<S>,
    sweeper: Option<AuditSweeper<S>>,
    budget: Option<NotificationBudget>,
}

impl<S: SessionStore, N: TerminationNotifier, Pr: Prober> Lifecycle<S, N, Pr> {
    /// The store every piece works on.
    ///
    /// See the example on [`LifecycleBuilder`].
    #[must_use]
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The bus every piece publishes on.
    ///
    /// See the example on [`stats`](Self::stats).
    #[must_use]
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Subscribes to every piece's events from now on
    /// ([`EventBus::subscribe`]).
    ///
    /// See the example on [`stats`](Self::stats).
    #[must_use]
    pub fn subscribe(&self) -> Subscription {
        self.events.subscribe()
    }

    /// The reclaim queue every piece releases through.
    ///
    /// See the example on [`LifecycleBuilder`].
    #[must_use]
    pub fn reclaim(&self) -> &ReclaimQueue {
        &self.reclaim
    }

    /// The deleter.
    ///
    /// See the example on [`Lifecycle`].
    #[must_use]
    pub fn deleter(&self) -> &RouterDeleter<S, N> {
        &self.deleter
    }

    /// The liveness monitor.
    ///
    /// See the example on [`Lifecycle`].
    #[must_use]
    pub fn liveness(&self) -> &LivenessMonitor<S, Pr> {
        &self.liveness
    }

    /// The reconciler; a router in its grace period is held in the
    /// [`liveness`](Self::liveness) monitor. After a restart, reconcile
    /// with [`Reconciler::reconcile_adopting`]; the sessions it adopts are
    /// not watched by the monitor until your
    /// [`Adopter::adopted`](crate::reconcile::Adopter::adopted) watches
    /// them (as for any session you create: the monitor watches only what
    /// you give it).
    ///
    /// See the example on [`shutdown`](Self::shutdown).
    #[must_use]
    pub fn reconciler(&self) -> &Reconciler<S> {
        &self.reconciler
    }

    /// The expiry monitor: [`create`](Self::create) tracks the sessions
    /// it creates with an expiry; track others with
    /// [`ExpiryMonitor::track`].
    ///
    /// See the example on [`create`](Self::create).
    #[must_use]
    pub fn expiry(&self) -> &ExpiryMonitor<S> {
        &self.expiry
    }

    /// Creates a session in the store ([`SessionStore::create`]) and, if
    /// it has an expiry ([`NewSession::expires_at`]), tracks it in the
    /// [`expiry`](Self::expiry) monitor: it closes with
    /// [`CloseReason::Expired`](crate::CloseReason::Expired) then, after an
    /// [`Event::SessionExpiringSoon`](crate::Event::SessionExpiringSoon)
    /// warning. Sessions created in the store directly are not tracked
    /// unless given to [`ExpiryMonitor::track`].
    ///
    /// A session created after [`shutdown`](Self::shutdown) is not
    /// tracked: it keeps its expiry, and nothing closes it then. The same
    /// once the expiry monitor stopped with its runtime (the `Lifecycle`
    /// built on a runtime that went away), logged as a warning; a
    /// controller that outlives its runtime tracks such sessions in a
    /// monitor of its new runtime ([`ExpiryMonitor::track`] answers
    /// [`TrackError::ShutDown`](crate::expiry::TrackError::ShutDown) on a
    /// stopped one).
    ///
    /// # Errors
    ///
    /// The store's [`CreateError`], which hands the spec back.
    ///
    /// # Cancel safety
    ///
    /// As the store's `create`: once the session is created it is tracked
    /// in the same poll.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     CloseReason, ExpiryMonitor, Lifecycle, MemoryStore, NewSession, NotifyError, RouterId,
    ///     SessionId, SessionStore, TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// struct Wire;
    /// impl TerminationNotifier for Wire {
    ///     async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> { Ok(()) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let lifecycle = Lifecycle::builder(Arc::clone(&store), Wire)
    ///     .expiry(ExpiryMonitor::builder().warn_before(Duration::from_secs(30)))
    ///     .build()?;
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    ///
    /// // Its API session expires in an hour.
    /// let spec = NewSession::new(SessionId::new(1), router, incarnation)
    ///     .expires_in(Duration::from_secs(3_600));
    /// let session = lifecycle.create(spec).await?;
    /// assert_eq!(lifecycle.expiry().stats().tracked, 1);
    ///
    /// assert_eq!(session.closed().await, CloseReason::Expired);
    /// assert_eq!(lifecycle.stats().await?.expiry.map(|e| e.expired), Some(1));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create(
        &self,
        spec: NewSession<S::Payload>,
    ) -> Result<Session<S::Payload>, CreateError<S::Payload>> {
        let session = self.store.create(spec).await?;
        if session.expires_at().is_some()
            && let Err(error) = self.expiry.track(&session)
        {
            if session.is_closed() {
                tracing::debug!(session = %session.id(), %error, "created session not tracked");
            } else {
                // A shutdown, or the monitor stopped with its runtime.
                tracing::warn!(session = %session.id(), %error,
                    "created session's expiry not tracked: the expiry monitor stopped");
            }
        }
        Ok(session)
    }

    /// The audit sweeper, unless built
    /// [`without_sweeper`](LifecycleBuilder::without_sweeper).
    ///
    /// See the example on [`stats`](Self::stats).
    #[must_use]
    pub fn sweeper(&self) -> Option<&AuditSweeper<S>> {
        self.sweeper.as_ref()
    }

    /// The notification budget the deleter and the liveness monitor share,
    /// if one was given: take your own messages to routers out of it too.
    ///
    /// See the example on [`LifecycleBuilder::notification_budget`].
    #[must_use]
    pub fn notification_budget(&self) -> Option<&NotificationBudget> {
        self.budget.as_ref()
    }

    /// [`Stats::collect`] of the store, with every piece's counters added.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     Event, Lifecycle, MemoryStore, NotifyError, RouterId, SessionStore,
    ///     TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// struct Wire;
    /// impl TerminationNotifier for Wire {
    ///     async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> { Ok(()) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let lifecycle =
    ///     Lifecycle::builder(Arc::new(MemoryStore::new()), Wire).without_sweeper().build()?;
    /// let mut events = lifecycle.subscribe();
    /// let router = RouterId::new(1);
    /// let _ = lifecycle.store().register_router(router).await?;
    /// let _ = lifecycle.deleter().delete(router).await?;
    /// assert!(matches!(events.recv().await, Some(Event::RouterFenced { .. })));
    ///
    /// let stats = lifecycle.stats().await?;
    /// assert_eq!(stats.deletions_in_flight, Some(0));
    /// assert_eq!(stats.events.map(|events| events.subscribers), Some(1));
    /// assert!(stats.sweeper.is_none() && lifecycle.sweeper().is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stats(&self) -> Result<Stats, BackendError> {
        let stats = Stats::collect(&*self.store)
            .await?
            .with_deleter(&self.deleter)
            .with_reclaim_queue(&self.reclaim)
            .with_liveness(&self.liveness)
            .with_reconciler(&self.reconciler)
            .with_expiry(&self.expiry)
            .with_events(&self.events);
        Ok(match &self.sweeper {
            Some(sweeper) => stats.with_sweeper(sweeper),
            None => stats,
        })
    }

    /// Shuts every piece down, in order, within `deadline` from now, and
    /// reports what it could not finish:
    ///
    /// 1. **No new work.** At the first poll, every piece but the queue
    ///    stops taking work: new deletions are refused
    ///    ([`DeleteError::ShuttingDown`](crate::DeleteError::ShuttingDown)),
    ///    grace timers stop (their routers keep their sessions: the
    ///    controller is going away, not the router), the monitor stops
    ///    convicting, the expiry monitor stops expiring (sessions keep
    ///    their expiry and stay open), the sweeper stops sweeping. The
    ///    reconciler's `router_disconnected` is refused
    ///    ([`ReconcileError::ShutDown`](crate::reconcile::ReconcileError::ShutDown));
    ///    its [`reconcile`](crate::Reconciler::reconcile) still answers a
    ///    router that reconnects (it closes and removes the sessions the
    ///    router no longer has, each resource released once), so a
    ///    controller still handling reconnections while it shuts down
    ///    keeps the store true.
    /// 2. **Work in hand.** Running deletions finish (each within its
    ///    [`max_wait`](RouterDeleter::max_wait)), as do a grace expiry's
    ///    chunk, a sweep, the monitor's tasks, the closes of sessions that
    ///    expired, side by side, until the
    ///    deadline. What is still running then is reported, not waited for.
    /// 3. **The queue last,** with what is left of the deadline: every
    ///    piece above pushes releases into it (a deletion's force phase
    ///    included), so it drains only once they stopped. What it did not
    ///    run is handed back in the report.
    ///
    /// Time is tokio's clock. Calling it again does nothing more than
    /// report what is still running.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops only the waiting: the pieces refuse new
    /// work from the first poll on and end what they hold in their own
    /// tasks. If the queue's shutdown had begun, the queue keeps draining
    /// without a deadline, or, past its deadline, reports each task it
    /// took out and had not handed back as failed (see
    /// [`ReclaimQueue::shutdown`]); if not, it stays open until a later
    /// call.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     Lifecycle, MemoryStore, NewSession, NotifyError, RouterId, SessionId, SessionStore,
    ///     TerminationBatch, TerminationNotifier,
    /// };
    ///
    /// /// A router that takes termination notices and never confirms.
    /// struct Deaf;
    /// impl TerminationNotifier for Deaf {
    ///     async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> { Ok(()) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf).build()?;
    /// let (deaf, away) = (RouterId::new(1), RouterId::new(2));
    /// let incarnation = store.register_router(deaf).await?;
    /// let _ = store.create(NewSession::new(SessionId::new(1), deaf, incarnation)).await?;
    /// let _ = store.register_router(away).await?;
    /// let _ = lifecycle.reconciler().router_disconnected(away).await?;
    /// // The deletion waits for confirmations (10 s by default) that never come.
    /// let deletion = tokio::spawn(lifecycle.deleter().delete(deaf));
    /// tokio::task::yield_now().await;
    ///
    /// let report = lifecycle.shutdown(Duration::from_secs(1)).await;
    /// assert_eq!(report.deletions, [deaf]); // left fenced if the process stops now
    /// assert_eq!(report.graces_stopped, 1);
    /// assert!(!report.is_complete());
    /// // It goes on in the background meanwhile, and ends within its bound.
    /// assert!(deletion.await?.is_ok());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self, deadline: Duration) -> LifecycleShutdown {
        let started = Instant::now();
        let graces_stopped = self.reconciler.in_grace();
        let sweeper = async {
            match &self.sweeper {
                Some(sweeper) => stop_within(deadline, Piece::Sweeper, sweeper.shutdown()).await,
                None => None,
            }
        };
        // Joined: each piece is told to stop at its first poll, in this order.
        let (deleter, reconciler, liveness, expiry, sweeper) = tokio::join!(
            stop_within(deadline, Piece::Deleter, self.deleter.shutdown()),
            stop_within(deadline, Piece::Reconciler, self.reconciler.shutdown()),
            stop_within(deadline, Piece::Liveness, self.liveness.shutdown()),
            stop_within(deadline, Piece::Expiry, self.expiry.shutdown()),
            sweeper,
        );
        let deletions = match deleter {
            Some(_) => self.deleter.deleting(),
            None => Vec::new(),
        };
        let left = deadline.saturating_sub(started.elapsed());
        let reclaim = self.reclaim.shutdown(left).await;
        LifecycleShutdown {
            deletions,
            still_running: [deleter, reconciler, liveness, expiry, sweeper]
                .into_iter()
                .flatten()
                .collect(),
            graces_stopped,
            reclaim,
        }
    }
}

impl<S: SessionStore, N, Pr> Clone for Lifecycle<S, N, Pr> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            events: self.events.clone(),
            reclaim: self.reclaim.clone(),
            deleter: self.deleter.clone(),
            liveness: self.liveness.clone(),
            reconciler: self.reconciler.clone(),
            expiry: self.expiry.clone(),
            sweeper: self.sweeper.clone(),
            budget: self.budget.clone(),
        }
    }
}

impl<S: SessionStore, N, Pr> fmt::Debug for Lifecycle<S, N, Pr> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle")
            .field("events", &self.events)
            .field("reclaim", &self.reclaim)
            .field("deleter", &self.deleter)
            .field("liveness", &self.liveness)
            .field("reconciler", &self.reconciler)
            .field("expiry", &self.expiry)
            .field("sweeper", &self.sweeper)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}
