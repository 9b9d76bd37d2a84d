//! One snapshot of everything an operator watches.

use crate::deleter::{RouterDeleter, TerminationNotifier};
use crate::events::{EventBus, EventStats};
use crate::expiry::{ExpiryMonitor, ExpiryStats};
use crate::liveness::{LivenessMonitor, LivenessStats, Prober};
use crate::reclaim::{ReclaimQueue, ReclaimStats};
use crate::reconcile::Reconciler;
use crate::store::{BackendError, RouterCensus, SessionStore};
use crate::sweeper::{AuditSweeper, SweeperStats};

/// A snapshot of the sessions, per router and in total, and of each piece
/// you add to it: deletions in flight, the reclaim queue, the liveness
/// monitor, routers in their grace period, the expiry monitor, the
/// sweeper, the event bus.
///
/// [`Stats::collect`] counts the store's sessions router by router
/// ([`SessionStore::census`]: one pass over every session, each router
/// under its own lock, so take it every few seconds, not per request); the
/// `with_*` methods add the pieces' counters, which are cheap. With the
/// `metrics` feature, each call also sets the crate's gauges.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     MemoryStore, NewSession, RouterId, SessionId, SessionStore, Stats,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// for id in 0..3 {
///     store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
/// let marked = store.get(SessionId::new(0)).await?.unwrap().begin_terminating();
/// assert!(marked.won());
///
/// let stats = Stats::collect(&store).await?;
/// assert_eq!((stats.active, stats.terminating), (2, 1));
/// assert_eq!(stats.routers[0].router, router);
/// assert_eq!(stats.routers[0].active, 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Each router's sessions by state, by router id.
    pub routers: Vec<RouterCensus>,
    /// `Active` sessions in the store.
    pub active: usize,
    /// `Terminating` sessions in the store.
    pub terminating: usize,
    /// Closed sessions not removed from the store yet.
    pub closed_in_store: usize,
    /// Deletions running, if a deleter was added.
    pub deletions_in_flight: Option<usize>,
    /// The reclaim queue's counters (depth, in flight, failures), if added.
    pub reclaim: Option<ReclaimStats>,
    /// The liveness monitor's counters (watched, suspects, reaped), if added.
    pub liveness: Option<LivenessStats>,
    /// Routers in their disconnect grace period, if a reconciler was added.
    pub routers_in_grace: Option<usize>,
    /// The expiry monitor's counters (tracked, expired, warned), if added.
    pub expiry: Option<ExpiryStats>,
    /// The audit sweeper's counters, if added.
    pub sweeper: Option<SweeperStats>,
    /// The event bus's counters (subscribers, lag), if added.
    pub events: Option<EventStats>,
}

impl Stats {
    /// Counts the sessions of `store`, per router and in total.
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{MemoryStore, Stats};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// // Every few seconds, from a task of its own:
    /// let mut ticks = tokio::time::interval(Duration::from_secs(5));
    /// ticks.tick().await;
    /// let stats = Stats::collect(&store).await?;
    /// println!("{} active, {} terminating", stats.active, stats.terminating);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn collect<S: SessionStore>(store: &S) -> Result<Self, BackendError> {
        Ok(Self::from_census(store.census().await?))
    }

    pub(crate) fn from_census(mut routers: Vec<RouterCensus>) -> Self {
        routers.sort_unstable_by_key(|census| census.router);
        let mut stats = Self::default();
        for router in &routers {
            stats.active += router.active;
            stats.terminating += router.terminating;
            stats.closed_in_store += router.closed;
        }
        stats.routers = routers;
        #[cfg(feature = "metrics")]
        for (state, count) in [
            ("active", stats.active),
            ("terminating", stats.terminating),
            ("closed", stats.closed_in_store),
        ] {
            crate::metrics::contained(|| {
                crate::metrics::labelled_gauge!("session_lifecycle_sessions", "state" => state)
                    .set(count as f64);
            });
        }
        #[cfg(feature = "metrics")]
        crate::metrics::gauge("session_lifecycle_routers", stats.routers.len());
        stats
    }

    /// Adds the deletions `deleter` is running.
    #[must_use]
    pub fn with_deleter<S: SessionStore, N: TerminationNotifier>(
        mut self,
        deleter: &RouterDeleter<S, N>,
    ) -> Self {
        let running = deleter.running();
        #[cfg(feature = "metrics")]
        crate::metrics::gauge("session_lifecycle_deletions_in_flight", running);
        self.deletions_in_flight = Some(running);
        self
    }

    /// Adds the counters of `queue`.
    #[must_use]
    pub fn with_reclaim_queue(mut self, queue: &ReclaimQueue) -> Self {
        let stats = queue.stats();
        #[cfg(feature = "metrics")]
        {
            crate::metrics::gauge("session_lifecycle_reclaim_queue_depth", stats.depth);
            crate::metrics::gauge("session_lifecycle_reclaim_in_flight", stats.in_flight);
            crate::metrics::gauge("session_lifecycle_reclaim_dead_letters", stats.dead_letters);
            for (class, outstanding) in [
                ("critical", stats.outstanding.critical),
                ("high", stats.outstanding.high),
                ("normal", stats.outstanding.normal),
                ("low", stats.outstanding.low),
            ] {
                crate::metrics::contained(|| {
                    crate::metrics::labelled_gauge!(
                        "session_lifecycle_reclaim_outstanding",
                        "class" => class
                    )
                    .set(outstanding as f64);
                });
            }
        }
        self.reclaim = Some(stats);
        self
    }

    /// Adds the counters of `monitor`.
    #[must_use]
    pub fn with_liveness<S: SessionStore, Pr: Prober>(
        mut self,
        monitor: &LivenessMonitor<S, Pr>,
    ) -> Self {
        let stats = monitor.stats();
        #[cfg(feature = "metrics")]
        {
            crate::metrics::gauge("session_lifecycle_watched_sessions", stats.watched);
            crate::metrics::gauge("session_lifecycle_suspect_sessions", stats.suspects);
            crate::metrics::gauge(
                "session_lifecycle_partition_suspected",
                u64::from(stats.partition_suspected),
            );
        }
        self.liveness = Some(stats);
        self
    }

    /// Adds the routers `reconciler` holds in their grace period.
    #[must_use]
    pub fn with_reconciler<S: SessionStore>(mut self, reconciler: &Reconciler<S>) -> Self {
        let in_grace = reconciler.in_grace();
        #[cfg(feature = "metrics")]
        crate::metrics::gauge("session_lifecycle_routers_in_grace", in_grace);
        self.routers_in_grace = Some(in_grace);
        self
    }

    /// Adds the counters of the expiry `monitor`.
    #[must_use]
    pub fn with_expiry<S: SessionStore>(mut self, monitor: &ExpiryMonitor<S>) -> Self {
        let stats = monitor.stats();
        // Expired sessions are counted by their close
        // (`session_lifecycle_sessions_closed_total{reason="expired"}`),
        // warnings by their event.
        #[cfg(feature = "metrics")]
        crate::metrics::gauge("session_lifecycle_expiry_tracked_sessions", stats.tracked);
        self.expiry = Some(stats);
        self
    }

    /// Adds the counters of `sweeper`.
    #[must_use]
    pub fn with_sweeper<S>(mut self, sweeper: &AuditSweeper<S>) -> Self {
        self.sweeper = Some(sweeper.stats());
        self
    }

    /// Adds the counters of `bus`.
    #[must_use]
    pub fn with_events(mut self, bus: &EventBus) -> Self {
        self.events = Some(bus.stats());
        self
    }

    /// The census entry of `router`, if the store knows it.
    #[must_use]
    pub fn router(&self, router: crate::RouterId) -> Option<&RouterCensus> {
        self.routers
            .binary_search_by_key(&router, |census| census.router)
            .ok()
            .and_then(|at| self.routers.get(at))
    }
}
