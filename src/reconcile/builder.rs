//! [`ReconcilerBuilder`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use tokio::time::Duration;
use tokio_util::task::TaskTracker;

use super::reconciler::{Config, Inner, Reconciler};
use crate::build::{BuildError, check_count, wired};
use crate::events::EventBus;
use crate::liveness::{LivenessMonitor, Prober};
use crate::reclaim::ReclaimQueue;
use crate::store::SessionStore;

/// Builder of a [`Reconciler`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     EventBus, LivenessMonitor, MemoryStore, liveness::NoProbe, ReclaimQueue, Reconciler,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
/// let reconciler = Reconciler::builder()
///     .grace_period(Duration::from_secs(60))
///     .chunk_size(1_024)
///     .spare_younger_than(Duration::from_secs(2))
///     .adopt_timeout(Duration::from_secs(1))
///     .adopt_concurrency(32)
///     .reclaim_queue(ReclaimQueue::builder().build()?)
///     .liveness(&monitor)
///     .events(EventBus::default())
///     .build(Arc::clone(&store))?;
/// assert_eq!(reconciler.in_grace(), 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ReconcilerBuilder {
    config: Config,
}

impl Reconciler<()> {
    /// A builder with the defaults: a grace period of 30 s, chunks of 4,096
    /// sessions, no session spared for its youth, adoption decisions bounded
    /// by 5 s, 16 at once, no reclaim queue, no event bus. See the example on [`ReconcilerBuilder`].
    pub fn builder() -> ReconcilerBuilder {
        ReconcilerBuilder {
            config: Config {
                grace: Duration::from_secs(30),
                chunk: 4_096,
                spare_younger_than: Duration::ZERO,
                adopt_timeout: Duration::from_secs(5),
                adopt_concurrency: 16,
                reclaim: None,
                events: None,
                liveness: None,
            },
        }
    }
}

impl ReconcilerBuilder {
    /// The first setting given that [`Lifecycle`](crate::Lifecycle) wires
    /// itself, if any.
    pub(crate) fn wired(&self) -> Option<&'static str> {
        wired([
            ("events", self.config.events.is_some()),
            ("reclaim_queue", self.config.reclaim.is_some()),
            ("liveness", self.config.liveness.is_some()),
        ])
    }

    /// How long a disconnected router has to reconnect before its sessions
    /// are closed (default 30 s).
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.config.grace = grace;
        self
    }

    /// How many sessions are handled between two yields to the runtime
    /// (default 4,096; at least 1, checked by [`build`](Self::build)).
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn chunk_size(mut self, chunk: usize) -> Self {
        self.config.chunk = chunk;
        self
    }

    /// Sessions created less than `age` before a reconciliation started are
    /// never closed for missing from the report: the router may have taken
    /// its report before they reached it. Set it to the longest delay
    /// between a router taking its report and the controller receiving it
    /// (default zero: only sessions created after the call started are
    /// spared).
    pub fn spare_younger_than(mut self, age: Duration) -> Self {
        self.config.spare_younger_than = age;
        self
    }

    /// How long an [`Adopter`](super::Adopter) may take to decide on one
    /// session in [`reconcile_adopting`](Reconciler::reconcile_adopting)
    /// (default 5 s); a decision not made by then is a rejection
    /// ([`RejectReason::TimedOut`](super::RejectReason::TimedOut)). A
    /// decision ready at once is never timed out, even with a zero timeout.
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn adopt_timeout(mut self, timeout: Duration) -> Self {
        self.config.adopt_timeout = timeout;
        self
    }

    /// How many adoption decisions run at once, on the reconciling task
    /// (default 16; at least 1, checked by [`build`](Self::build)). A chunk
    /// of unknown sessions takes at most about `chunk_size / concurrency`
    /// times the [`adopt_timeout`](Self::adopt_timeout).
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn adopt_concurrency(mut self, concurrency: usize) -> Self {
        self.config.adopt_concurrency = concurrency;
        self
    }

    /// Releases the resources of the sessions it closes through `queue`.
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn reclaim_queue(mut self, queue: ReclaimQueue) -> Self {
        self.config.reclaim = Some(queue);
        self
    }

    /// Holds a router's sessions in `monitor` for as long as its grace
    /// period lasts (as [`LivenessMonitor::hold_router`] does, but only for
    /// the incarnation that disconnected: a later life of the router,
    /// after a deletion or a restart, is judged by its own heartbeats): a
    /// disconnected router cannot carry heartbeats or probe answers, and
    /// its sessions must not be reaped before the grace period decides
    /// their fate. Without it, a monitored router's sessions are reaped as
    /// soon as their probes fail.
    pub fn liveness<S: SessionStore, Pr: Prober>(
        mut self,
        monitor: &LivenessMonitor<S, Pr>,
    ) -> Self {
        self.config.liveness = Some(monitor.holds());
        self
    }

    /// Publishes [`Event::Reconciled`](crate::Event::Reconciled),
    /// [`Event::RouterDisconnected`](crate::Event::RouterDisconnected) and
    /// [`Event::RouterLost`](crate::Event::RouterLost) on `bus`.
    /// See the example on [`ReconcilerBuilder`].
    pub fn events(mut self, bus: EventBus) -> Self {
        self.config.events = Some(bus);
        self
    }

    /// Builds the reconciler over `store`.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] for a chunk size or an adoption concurrency
    /// of 0.
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn build<S: SessionStore>(self, store: Arc<S>) -> Result<Reconciler<S>, BuildError> {
        check_count("Reconciler", "chunk_size", self.config.chunk, usize::MAX)?;
        check_count(
            "Reconciler",
            "adopt_concurrency",
            self.config.adopt_concurrency,
            usize::MAX,
        )?;
        Ok(Reconciler {
            inner: Arc::new(Inner {
                store,
                config: self.config,
                graces: Mutex::new(HashMap::new()),
                epochs: AtomicU64::new(0),
                tracker: TaskTracker::new(),
            }),
        })
    }
}
