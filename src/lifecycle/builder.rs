//! [`LifecycleBuilder`]: builds every piece of a [`Lifecycle`], wired
//! together.

use std::fmt;
use std::sync::Arc;

use super::Lifecycle;
use crate::budget::NotificationBudget;
use crate::build::BuildError;
use crate::deleter::{RouterDeleter, RouterDeleterBuilder, TerminationNotifier};
use crate::events::EventBus;
use crate::expiry::{ExpiryMonitor, ExpiryMonitorBuilder};
use crate::liveness::{LivenessMonitor, LivenessMonitorBuilder, NoProbe, Prober};
use crate::reclaim::{ReclaimQueue, ReclaimQueueBuilder};
use crate::reconcile::{Reconciler, ReconcilerBuilder};
use crate::store::SessionStore;
use crate::sweeper::{AuditSweeper, AuditSweeperBuilder};
/// Builder of a [`Lifecycle`]: the store, the notifier, the prober, and
/// each piece's own builder.
///
/// `build` wires every piece: it sets `events` (the one bus) and
/// `reclaim_queue` (the one queue) on each piece's builder, and
/// `liveness` (the one monitor) on the reconciler's. Leave those unset on
/// the builders you give it; `build` refuses one that has any, naming it,
/// rather than replace it behind your back. Everything else you set on a
/// piece's builder is kept.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     AuditSweeper, EventBus, Lifecycle, LivenessMonitor, MemoryStore, liveness::NoProbe, NotifyError,
///     ReclaimQueue, Reconciler, RouterDeleter, TerminationBatch, TerminationNotifier,
/// };
///
/// struct Wire;
/// impl TerminationNotifier for Wire {
///     async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> { Ok(()) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The store publishes on the same bus: one subscription sees everything.
/// let bus = EventBus::new(16_384);
/// let store = Arc::new(MemoryStore::builder().events(bus.clone()).build::<()>()?);
/// let lifecycle = Lifecycle::builder(store, Wire)
///     .prober(NoProbe)
///     .events(bus)
///     .reclaim(ReclaimQueue::builder().workers(4))
///     .deleter(RouterDeleter::builder().retries(2))
///     .liveness(LivenessMonitor::builder().heartbeat_interval(Duration::from_secs(5)))
///     .reconciler(Reconciler::builder().grace_period(Duration::from_secs(60)))
///     .sweeper(AuditSweeper::builder().interval(Duration::from_secs(300)))
///     .build()?;
/// assert_eq!(lifecycle.reclaim().stats().workers, 4);
///
/// // A piece wired by hand is refused, not silently rewired.
/// let refused = Lifecycle::builder(Arc::clone(lifecycle.store()), Wire)
///     .deleter(RouterDeleter::builder().events(EventBus::default()))
///     .build();
/// assert_eq!(refused.unwrap_err().refused_setting(), Some("deleter"));
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct LifecycleBuilder<S, N, Pr = NoProbe> {
    store: Arc<S>,
    notifier: N,
    prober: Pr,
    events: Option<EventBus>,
    reclaim: ReclaimQueueBuilder,
    deleter: RouterDeleterBuilder,
    liveness: LivenessMonitorBuilder,
    reconciler: ReconcilerBuilder,
    expiry: ExpiryMonitorBuilder,
    sweeper: Option<AuditSweeperBuilder>,
    budget: Option<NotificationBudget>,
}

impl<S: SessionStore, N: TerminationNotifier> Lifecycle<S, N> {
    /// A builder over `store`, notifying routers through `notifier`, with
    /// every piece's defaults, no prober ([`NoProbe`]) and a new
    /// [`EventBus`].
    ///
    /// See the example on [`Lifecycle`].
    pub fn builder(store: Arc<S>, notifier: N) -> LifecycleBuilder<S, N> {
        LifecycleBuilder {
            store,
            notifier,
            prober: NoProbe,
            events: None,
            reclaim: ReclaimQueue::builder(),
            deleter: RouterDeleter::builder(),
            liveness: LivenessMonitor::builder(),
            reconciler: Reconciler::builder(),
            expiry: ExpiryMonitor::builder(),
            sweeper: Some(AuditSweeper::builder()),
            budget: None,
        }
    }
}

impl<S, N, Pr> LifecycleBuilder<S, N, Pr> {
    /// Probes the liveness monitor's suspects through `prober`.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn prober<P: Prober>(self, prober: P) -> LifecycleBuilder<S, N, P> {
        LifecycleBuilder {
            store: self.store,
            notifier: self.notifier,
            prober,
            events: self.events,
            reclaim: self.reclaim,
            deleter: self.deleter,
            liveness: self.liveness,
            reconciler: self.reconciler,
            expiry: self.expiry,
            sweeper: self.sweeper,
            budget: self.budget,
        }
    }

    /// Every piece publishes on `bus` (default: a new
    /// [`EventBus::default`]). Give it the bus your store publishes on
    /// ([`MemoryStoreBuilder::events`](crate::MemoryStoreBuilder::events))
    /// to see the sessions' own events on the same subscription.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// The reclaim queue's settings.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn reclaim(mut self, queue: ReclaimQueueBuilder) -> Self {
        self.reclaim = queue;
        self
    }

    /// The deleter's settings.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn deleter(mut self, deleter: RouterDeleterBuilder) -> Self {
        self.deleter = deleter;
        self
    }

    /// The liveness monitor's settings.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn liveness(mut self, monitor: LivenessMonitorBuilder) -> Self {
        self.liveness = monitor;
        self
    }

    /// The reconciler's settings.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn reconciler(mut self, reconciler: ReconcilerBuilder) -> Self {
        self.reconciler = reconciler;
        self
    }

    /// The expiry monitor's settings (its tick, its warning lead).
    ///
    /// See the example on [`Lifecycle::create`].
    pub fn expiry(mut self, monitor: ExpiryMonitorBuilder) -> Self {
        self.expiry = monitor;
        self
    }

    /// The audit sweeper's settings.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn sweeper(mut self, sweeper: AuditSweeperBuilder) -> Self {
        self.sweeper = Some(sweeper);
        self
    }

    /// One notification budget per router for the deleter's termination
    /// notices and the liveness monitor's probes together (default: none);
    /// [`Lifecycle::notification_budget`] hands it back for your own
    /// messages to routers. See [`NotificationBudget`]. Like the bus and the
    /// queue, it is wired here: a piece builder given to this one that sets
    /// its own is refused by `build`.
    ///
    /// # Example
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use session_lifecycle::{Lifecycle, MemoryStore, NotificationBudget, NotifyError, TerminationBatch, TerminationNotifier};
    /// # struct Routers;
    /// # impl TerminationNotifier for Routers {
    /// #     async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> { Ok(()) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let budget = NotificationBudget::builder().rate(20_000).burst(5_000).build()?;
    /// let lifecycle = Lifecycle::builder(Arc::new(MemoryStore::new()), Routers)
    ///     .notification_budget(budget)
    ///     .build()?;
    /// assert!(lifecycle.notification_budget().is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub fn notification_budget(mut self, budget: NotificationBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No audit sweeper: for a store audited elsewhere (another controller
    /// sweeping a shared store), or audited on demand.
    ///
    /// See the example on [`Lifecycle::stats`].
    pub fn without_sweeper(mut self) -> Self {
        self.sweeper = None;
        self
    }
}

impl<S: SessionStore, N: TerminationNotifier, Pr: Prober> LifecycleBuilder<S, N, Pr> {
    /// Builds every piece, wired together, and starts their tasks on the
    /// current tokio runtime: build it on the runtime that runs the
    /// controller. The pieces' tasks (the monitors, the sweeper, the
    /// reclaim queue's workers, grace timers) run only while that runtime
    /// is driven: a runtime left idle (a `block_on` that returned, its
    /// runtime kept) runs none of them, and deletions would wait for the
    /// queue's releases for ever. If the runtime is dropped, the deleter
    /// and the reclaim queue go on on the next runtime they are used from;
    /// the monitors stop (and refuse new work).
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] naming this builder's method (`"deleter"`,
    /// `"reconciler"`, ...) for a piece builder that sets what `Lifecycle`
    /// wires itself, or whatever error a piece's own `build` returns (the
    /// setting it refused, [`BuildError::NoRuntime`] outside a runtime or on
    /// one without its time driver).
    /// Nothing keeps running after an error.
    ///
    /// See the example on [`LifecycleBuilder`].
    pub fn build(self) -> Result<Lifecycle<S, N, Pr>, BuildError> {
        self.check_wiring()?;
        let Self {
            store,
            notifier,
            prober,
            events,
            reclaim,
            deleter,
            liveness,
            reconciler,
            expiry,
            sweeper,
            budget,
        } = self;
        let events = events.unwrap_or_default();
        let (deleter, liveness) = match &budget {
            Some(budget) => (
                deleter.notification_budget(budget.clone()),
                liveness.notification_budget(budget.clone()),
            ),
            None => (deleter, liveness),
        };
        let reclaim = reclaim.events(events.clone()).build()?;
        let deleter = deleter
            .events(events.clone())
            .reclaim_queue(reclaim.clone())
            .build(Arc::clone(&store), notifier)?;
        let liveness = liveness
            .events(events.clone())
            .reclaim_queue(reclaim.clone())
            .build(Arc::clone(&store), prober)?;
        let reconciler = reconciler
            .events(events.clone())
            .reclaim_queue(reclaim.clone())
            .liveness(&liveness)
            .build(Arc::clone(&store))?;
        let expiry = expiry
            .events(events.clone())
            .reclaim_queue(reclaim.clone())
            .build(Arc::clone(&store))?;
        let sweeper = sweeper
            .map(|sweeper| {
                sweeper
                    .events(events.clone())
                    .reclaim_queue(reclaim.clone())
                    .build(Arc::clone(&store))
            })
            .transpose()?;
        Ok(Lifecycle {
            store,
            events,
            reclaim,
            deleter,
            liveness,
            reconciler,
            expiry,
            sweeper,
            budget,
        })
    }

    /// Refuses a piece builder that sets what `build` wires.
    fn check_wiring(&self) -> Result<(), BuildError> {
        let pieces = [
            ("reclaim", self.reclaim.wired()),
            ("deleter", self.deleter.wired()),
            ("liveness", self.liveness.wired()),
            ("reconciler", self.reconciler.wired()),
            ("expiry", self.expiry.wired()),
            (
                "sweeper",
                self.sweeper.as_ref().and_then(AuditSweeperBuilder::wired),
            ),
        ];
        match pieces
            .into_iter()
            .find_map(|(piece, wired)| Some((piece, wired?)))
        {
            None => Ok(()),
            Some((piece, wired)) => Err(BuildError::setting(
                "Lifecycle",
                piece,
                format_args!("sets `{wired}`, which Lifecycle wires itself: leave it unset"),
            )),
        }
    }
}

impl<S, N, Pr> fmt::Debug for LifecycleBuilder<S, N, Pr> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LifecycleBuilder")
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
