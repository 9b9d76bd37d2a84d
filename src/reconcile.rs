//! Reconciliation against what a router reports, and the disconnect grace
//! period.
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
//! - Reconciliation, grace expiry and reaping close only `Active` sessions of
//!   the router's live incarnation (a compare-exchange from `Active`), and
//!   re-check that the router is live right before each chunk: a session
//!   its deletion marked `Terminating` is the deletion's alone.
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

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::build::{BuildError, check_count};
use crate::cleanup::close_and_remove;
use crate::event::{Event, EventBus, emit, send_unrecorded};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::liveness::{LivenessMonitor, Prober, RouterHold};
use crate::reclaim::ReclaimQueue;
use crate::session::{CloseFrom, CloseReason, Session, SessionState};
use crate::store::{BackendError, RouterError, RouterStatus, SessionError, SessionStore};

/// Reconciles what routers report against the store, and gives
/// disconnected routers a grace period.
///
/// - [`reconcile`](Self::reconcile): a router (re)connected and reported
///   the sessions it holds. The outcome lists what the router should drop
///   (sessions the controller does not know, has closed, or that belong to
///   another router or incarnation), and the sessions the router no longer
///   holds are closed on the controller
///   ([`CloseReason::Reclaimed`]) and removed. Reports of any size are
///   handled in chunks, with no lock held across chunks.
/// - [`router_disconnected`](Self::router_disconnected): starts the
///   router's grace period. A reconciliation within it cancels it; at its
///   expiry the router's sessions are closed ([`CloseReason::RouterLost`])
///   and removed, and the router itself stays registered. A router whose
///   deletion starts meanwhile is left to the deleter.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// for id in 1..=3 {
///     store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
///
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
/// // The router reconnects holding sessions 1, 2 and 9: 9 is unknown, 3 is gone.
/// let ids = [1, 2, 9].map(SessionId::new);
/// let report = reconciler.reconcile(router, incarnation, ids).await?;
/// assert_eq!(report.drop, vec![SessionId::new(9)]);
/// assert_eq!(report.closed, vec![SessionId::new(3)]);
/// assert_eq!(store.len(), 2);
/// # Ok(())
/// # }
/// ```
pub struct Reconciler<S: SessionStore> {
    inner: Arc<Inner<S>>,
}

struct Inner<S: SessionStore> {
    store: Arc<S>,
    config: Config,
    graces: Mutex<HashMap<RouterId, Grace>>,
    epochs: AtomicU64,
    tracker: TaskTracker,
}

#[derive(Clone)]
struct Config {
    grace: Duration,
    chunk: usize,
    spare_younger_than: Duration,
    reclaim: Option<ReclaimQueue>,
    events: Option<EventBus>,
    liveness: Option<Arc<dyn RouterHold>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("grace", &self.grace)
            .field("chunk", &self.chunk)
            .field("spare_younger_than", &self.spare_younger_than)
            .field("reclaim", &self.reclaim.is_some())
            .field("events", &self.events.is_some())
            .field("liveness", &self.liveness.is_some())
            .finish()
    }
}

struct Grace {
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

/// Builder of a [`Reconciler`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     EventBus, LivenessMonitor, MemoryStore, NoProbe, ReclaimQueue, Reconciler,
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

impl Reconciler<crate::MemoryStore> {
    /// A builder with the defaults: a grace period of 30 s, chunks of 4,096
    /// sessions, no session spared for its youth, no reclaim queue, no
    /// event bus.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{MemoryStore, Reconciler};
    ///
    /// let reconciler = Reconciler::builder().build(Arc::new(MemoryStore::new())).unwrap();
    /// assert_eq!(reconciler.in_grace(), 0);
    /// ```
    pub fn builder() -> ReconcilerBuilder {
        ReconcilerBuilder {
            config: Config {
                grace: Duration::from_secs(30),
                chunk: 4_096,
                spare_younger_than: Duration::ZERO,
                reclaim: None,
                events: None,
                liveness: None,
            },
        }
    }
}

impl ReconcilerBuilder {
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
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let reconciler = Reconciler::builder()
    ///     .spare_younger_than(Duration::from_secs(5))
    ///     .build(Arc::clone(&store))?;
    ///
    /// // Created just before the router took its report: not in it, but spared.
    /// let young =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let report =
    ///     reconciler.reconcile(router, incarnation, Vec::<SessionId>::new()).await?;
    /// assert_eq!(report.summary.spared, 1);
    /// assert!(!young.is_closed());
    /// # Ok(())
    /// # }
    /// ```
    pub fn spare_younger_than(mut self, age: Duration) -> Self {
        self.config.spare_younger_than = age;
        self
    }

    /// Releases the resources of the sessions it closes through `queue`.
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn reclaim_queue(mut self, queue: ReclaimQueue) -> Self {
        self.config.reclaim = Some(queue);
        self
    }

    /// Holds a router in `monitor` for as long as its grace period lasts
    /// ([`LivenessMonitor::hold_router`]): a disconnected router cannot
    /// carry heartbeats or probe answers, and its sessions must not be
    /// reaped before the grace period decides their fate. Without it, a
    /// monitored router's sessions are reaped as soon as their probes fail.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     LivenessMonitor, MemoryStore, NoProbe, Reconciler, RouterId, SessionId,
    ///     SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
    /// let reconciler = Reconciler::builder().liveness(&monitor).build(Arc::clone(&store))?;
    ///
    /// let _ = reconciler.router_disconnected(router).await?;
    /// assert!(monitor.is_held(router)); // no reaping during the grace period
    /// // It is back: the reconciliation ends the grace period and the hold.
    /// let _ = reconciler.reconcile(router, incarnation, Vec::<SessionId>::new()).await?;
    /// assert!(!monitor.is_held(router));
    /// # Ok(())
    /// # }
    /// ```
    pub fn liveness<S: SessionStore, Pr: Prober>(
        mut self,
        monitor: &LivenessMonitor<S, Pr>,
    ) -> Self {
        self.config.liveness = Some(monitor.holds());
        self
    }

    /// Publishes [`Event::Reconciled`], [`Event::RouterDisconnected`] and
    /// [`Event::RouterLost`] on `bus`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     Event, EventBus, MemoryStore, Reconciler, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let bus = EventBus::default();
    /// let mut events = bus.subscribe();
    /// let reconciler = Reconciler::builder().events(bus).build(Arc::clone(&store))?;
    ///
    /// let _ = reconciler.reconcile(router, incarnation, [SessionId::new(9)]).await?;
    /// match events.try_recv() {
    ///     Some(Event::Reconciled(summary)) => assert_eq!(summary.unknown, 1),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn events(mut self, bus: EventBus) -> Self {
        self.config.events = Some(bus);
        self
    }

    /// Builds the reconciler over `store`.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] for a chunk size of 0.
    ///
    /// See the example on [`ReconcilerBuilder`].
    pub fn build<S: SessionStore>(self, store: Arc<S>) -> Result<Reconciler<S>, BuildError> {
        check_count("Reconciler", "chunk_size", self.config.chunk, usize::MAX)?;
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

/// What a reconciliation found and did, in counts; carried by
/// [`Event::Reconciled`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let other = RouterId::new(2);
/// let other_incarnation = store.register_router(other).await?;
/// for id in 1..=3 {
///     let _ =
///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
/// let _ =
///     store.create(NewSession::new(SessionId::new(4), other, other_incarnation)).await?;
/// let _ = store.close(SessionId::new(3), CloseReason::ClientClosed).await?;
///
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
/// // The router holds 1 and 3 (closed since), 4 (another router's) and 9 (unknown).
/// let ids = [1, 3, 4, 9].map(SessionId::new);
/// let summary = reconciler.reconcile(router, incarnation, ids).await?.summary;
/// assert_eq!((summary.reported, summary.matched), (4, 1));
/// assert_eq!((summary.unknown, summary.foreign), (2, 1)); // 3 is gone from the store
/// assert_eq!(summary.closed, 1); // 2: the controller held it, the router no longer does
/// assert!(!summary.grace_cancelled);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileSummary {
    /// The router.
    pub router: RouterId,
    /// Its live incarnation.
    pub incarnation: Incarnation,
    /// Distinct session ids the router reported.
    pub reported: usize,
    /// Reported sessions the controller holds open for this router and
    /// incarnation.
    pub matched: usize,
    /// Reported sessions the controller does not know.
    pub unknown: usize,
    /// Reported sessions the controller closed already.
    pub closed_reported: usize,
    /// Reported sessions of another router or another incarnation.
    pub foreign: usize,
    /// Sessions the controller held that the router no longer holds, closed
    /// by this call.
    pub closed: usize,
    /// Sessions missing from the report spared because they are younger
    /// than the configured age.
    pub spared: usize,
    /// Sessions of this incarnation closed already but still in the store
    /// (closed through their handles, or by a call dropped half-way),
    /// removed by this call.
    pub removed: usize,
    /// Whether the call cancelled the router's grace period.
    pub grace_cancelled: bool,
    /// Chunks handled.
    pub chunks: usize,
    /// How long the call took, on tokio's clock.
    pub duration: Duration,
}

/// The outcome of [`Reconciler::reconcile`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let kept =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let lost =
///     store.create(NewSession::new(SessionId::new(2), router, incarnation)).await?;
///
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
/// let report =
///     reconciler.reconcile(router, incarnation, [kept.id(), SessionId::new(7)]).await?;
/// // Tell the router to drop what the controller does not hold...
/// assert_eq!(report.drop, vec![SessionId::new(7)]);
/// // ...and the sessions the router lost were closed here.
/// assert_eq!(report.closed, vec![lost.id()]);
/// assert!(lost.is_closed() && !kept.is_closed());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// The counts.
    pub summary: ReconcileSummary,
    /// Sessions the router should drop: reported, but unknown to the
    /// controller, closed, or of another router or incarnation. Sorted.
    pub drop: Vec<SessionId>,
    /// Sessions the router no longer holds, closed on the controller by this
    /// call. Sorted.
    pub closed: Vec<SessionId>,
}

/// Why a reconciliation or a grace period was refused.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     Incarnation, MemoryStore, ReconcileError, Reconciler, RouterId, RouterStatus,
///     SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
///
/// // A report from an older life of the router is refused, and changes nothing.
/// let stale =
///     reconciler.reconcile(router, Incarnation::new(0), Vec::<SessionId>::new()).await;
/// match stale {
///     Err(ReconcileError::StaleIncarnation { current, .. }) => {
///         assert_eq!(current, RouterStatus::Live(incarnation));
///     }
///     other => panic!("unexpected {other:?}"),
/// }
///
/// // Once its deletion started, the router's sessions belong to the deleter.
/// let _ = store.fence(router).await?;
/// let late = reconciler.reconcile(router, incarnation, Vec::<SessionId>::new()).await;
/// assert!(matches!(late, Err(ReconcileError::NotLive { .. })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The store does not know the router.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The router reported from an incarnation that is not its live one: a
    /// stale report (the router was deleted and registered again since, or
    /// the report is older than its deletion). Nothing was changed.
    #[error("{router} reported {reported}, but the store has it {current:?}")]
    StaleIncarnation {
        /// The router.
        router: RouterId,
        /// The incarnation the report names.
        reported: Incarnation,
        /// The router's status in the store.
        current: RouterStatus,
    },
    /// The router's deletion has started (or finished); its sessions belong
    /// to the deleter.
    #[error("{router} is being deleted or deleted ({status:?})")]
    NotLive {
        /// The router.
        router: RouterId,
        /// Its status in the store.
        status: RouterStatus,
    },
    /// No tokio runtime to run the grace timer on.
    #[error("no tokio runtime: router_disconnected must be called within one")]
    NoRuntime,
    /// The reconciler was shut down.
    #[error("the reconciler is shut down")]
    ShutDown,
    /// The store's backend failed.
    #[error(transparent)]
    Store(#[from] BackendError),
}

impl From<RouterError> for ReconcileError {
    fn from(error: RouterError) -> Self {
        match error {
            RouterError::UnknownRouter(router) => Self::UnknownRouter(router),
            RouterError::Backend(error) => Self::Store(error),
        }
    }
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

impl<S: SessionStore> Clone for Reconciler<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: SessionStore> fmt::Debug for Reconciler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.inner.config)
            .field("in_grace", &self.in_grace())
            .finish_non_exhaustive()
    }
}

impl<S: SessionStore> Reconciler<S> {
    /// The store it works on.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{MemoryStore, Reconciler};
    ///
    /// let store = Arc::new(MemoryStore::new());
    /// let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    /// assert!(Arc::ptr_eq(reconciler.store(), &store));
    /// ```
    #[must_use]
    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    /// Routers in their grace period now.
    ///
    /// See the example on [`router_disconnected`](Self::router_disconnected).
    #[must_use]
    pub fn in_grace(&self) -> usize {
        self.inner.graces.lock().len()
    }

    /// When `router`'s grace period ends, if it is in one.
    ///
    /// See the example on [`router_disconnected`](Self::router_disconnected).
    #[must_use]
    pub fn grace_deadline(&self, router: RouterId) -> Option<Instant> {
        self.inner.graces.lock().get(&router).map(|g| g.deadline)
    }

    /// Reconciles `reported`, the sessions `router` says it holds in
    /// `incarnation`, against the store: see the type's documentation.
    /// Cancels the router's grace period, if it is in one.
    ///
    /// `reported` is any iterator of ids or of references to ids (a
    /// `Vec<SessionId>`, a `&[SessionId]`, a decoder's iterator). Duplicate
    /// ids in the report count once. Sessions created after the
    /// call started (or younger than
    /// [`spare_younger_than`](ReconcilerBuilder::spare_younger_than)) are
    /// never closed for missing from the report.
    ///
    /// # Errors
    ///
    /// [`ReconcileError::StaleIncarnation`] for a report from an incarnation
    /// that is not the router's live one, [`ReconcileError::NotLive`] if the
    /// router's deletion started (before the call or during it: the call
    /// stops at the next chunk), [`ReconcileError::UnknownRouter`], and
    /// [`ReconcileError::Store`] if the backend failed. Sessions closed
    /// before an error stay closed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops between two store calls: every session is
    /// either untouched or closed and removed (a closed session the store
    /// still holds is removed by the next reconciliation or sweep).
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
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
    ///
    /// // The router reconnects: it decodes its report and sends it, any size.
    /// let decoded: Vec<u64> = vec![1];
    /// let report = reconciler
    ///     .reconcile(router, incarnation, decoded.iter().map(|&raw| SessionId::new(raw)))
    ///     .await?;
    /// assert!(report.drop.is_empty() && report.closed.is_empty());
    /// assert!(!session.is_closed());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reconcile<I>(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        reported: I,
    ) -> Result<ReconcileReport, ReconcileError>
    where
        I: IntoIterator,
        I::Item: Borrow<SessionId>,
    {
        let span = tracing::info_span!("reconcile", %router, %incarnation);
        let reported = reported.into_iter().map(|id| *id.borrow()).collect();
        self.reconcile_inner(router, incarnation, reported)
            .instrument(span)
            .await
    }

    async fn reconcile_inner(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        reported: HashSet<SessionId, RandomState>,
    ) -> Result<ReconcileReport, ReconcileError> {
        let started = Instant::now();
        let store = &*self.inner.store;
        let config = &self.inner.config;
        self.check_live(router, incarnation).await?;
        let grace_cancelled = self.cancel_grace(router, incarnation).await;
        let mut summary = ReconcileSummary {
            router,
            incarnation,
            reported: reported.len(),
            matched: 0,
            unknown: 0,
            closed_reported: 0,
            foreign: 0,
            closed: 0,
            spared: 0,
            removed: 0,
            grace_cancelled,
            chunks: 0,
            duration: Duration::ZERO,
        };
        let mut drop = Vec::new();
        // What the store holds now: a session created after this listing is
        // not in it, so it is never closed for missing from the report.
        let held = store.sessions(router).await?;

        // What the router holds, against the store.
        let mut ids: Vec<SessionId> = reported.iter().copied().collect();
        ids.sort_unstable();
        for chunk in ids.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut summary).await?;
            for &id in chunk {
                match store.get(id).await? {
                    None => summary.unknown += 1,
                    Some(session)
                        if session.router() != router || session.incarnation() != incarnation =>
                    {
                        summary.foreign += 1;
                    }
                    Some(session) if session.is_closed() => summary.closed_reported += 1,
                    Some(_) => {
                        summary.matched += 1;
                        continue;
                    }
                }
                tracing::trace!(session = %id, "router holds a session it should drop");
                drop.push(id);
            }
        }

        // What the store held that the router no longer does. Younger than
        // `spare_younger_than` means created after `cutoff`; `None`: the age
        // reaches back past the clock's start, so every session is young
        // enough to be spared.
        let cutoff = started.checked_sub(config.spare_younger_than);
        let mut missing: Vec<Session<S::Payload>> = Vec::new();
        let mut lingering: Vec<Session<S::Payload>> = Vec::new();
        for session in held {
            if session.incarnation() != incarnation {
                continue;
            }
            if session.is_closed() {
                // Closed on the controller but still stored (through its
                // handle, or by a reconciliation dropped half-way).
                lingering.push(session);
                continue;
            }
            if session.state() != SessionState::Active || reported.contains(&session.id()) {
                continue;
            }
            if cutoff.is_none_or(|cutoff| session.created_at() > cutoff) {
                summary.spared += 1;
            } else {
                missing.push(session);
            }
        }
        missing.sort_unstable_by_key(Session::id);
        let mut closed = Vec::new();
        for chunk in missing.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut summary).await?;
            closed.extend(self.close_and_remove(chunk, CloseReason::Reclaimed).await);
        }
        summary.closed = closed.len();
        for chunk in lingering.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut summary).await?;
            for session in chunk {
                // By key: a session that reused the id meanwhile stays.
                match store.remove_exact(session.key()).await {
                    Ok(_) => summary.removed += 1,
                    Err(SessionError::Backend(error)) => return Err(error.into()),
                    // Removed meanwhile.
                    Err(_) => {}
                }
            }
        }
        summary.duration = started.elapsed();
        tracing::info!(
            reported = summary.reported,
            matched = summary.matched,
            dropped = drop.len(),
            closed = summary.closed,
            "router reconciled"
        );
        emit(config.events.as_ref(), || Event::Reconciled(summary));
        Ok(ReconcileReport {
            summary,
            drop,
            closed,
        })
    }

    /// Counts a chunk; from the second on, yields to the runtime and checks
    /// that the router is still live.
    async fn next_chunk(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        summary: &mut ReconcileSummary,
    ) -> Result<(), ReconcileError> {
        summary.chunks += 1;
        if summary.chunks > 1 {
            tokio::task::yield_now().await;
        }
        // Right before each chunk, the first included: a router fenced since
        // the call started is its deletion's.
        self.check_live(router, incarnation).await
    }

    async fn check_live(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<(), ReconcileError> {
        match self.inner.store.router_status(router).await? {
            RouterStatus::Live(live) if live == incarnation => Ok(()),
            status @ (RouterStatus::Fenced(current) | RouterStatus::Deleted(current))
                if current == incarnation =>
            {
                Err(ReconcileError::NotLive { router, status })
            }
            current => Err(ReconcileError::StaleIncarnation {
                router,
                reported: incarnation,
                current,
            }),
        }
    }

    /// Closes the open sessions of `sessions` (resources through the reclaim
    /// queue if there is one) and removes them from the store; returns the
    /// ids this call closed.
    async fn close_and_remove(
        &self,
        sessions: &[Session<S::Payload>],
        reason: CloseReason,
    ) -> Vec<SessionId> {
        // Only `Active` sessions: one its router's deletion marked meanwhile
        // is the deletion's alone.
        let closed = close_and_remove(
            &*self.inner.store,
            self.inner.config.reclaim.as_ref(),
            sessions,
            reason,
            CloseFrom::Active,
        )
        .await;
        if tracing::enabled!(tracing::Level::TRACE) {
            for key in &closed {
                tracing::trace!(session = %key, %reason, "session closed");
            }
        }
        closed.into_iter().map(SessionKey::id).collect()
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
    /// deleter handles its sessions), [`ReconcileError::UnknownRouter`],
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
        if let Some(running) = graces.get(&router)
            && running.incarnation == incarnation
        {
            return Ok(running.deadline);
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
            // An older incarnation's period: its hold carries over.
            Some(old) => stop(old),
            None => self.hold(router),
        }
        drop(graces);
        #[cfg(feature = "metrics")]
        crate::event::record(disconnected);
        Ok(deadline)
    }

    /// Ends the router's grace period, whatever its incarnation (an older
    /// one's is stale), and waits for a chunk its expiry may be closing;
    /// `true` if there was one for `incarnation`.
    async fn cancel_grace(&self, router: RouterId, incarnation: Incarnation) -> bool {
        let Some(grace) = self.inner.graces.lock().remove(&router) else {
            return false;
        };
        let matched = grace.incarnation == incarnation;
        let expiry = grace.expiry.clone();
        stop(grace);
        self.release(router);
        if let Some(expiry) = expiry {
            // The chunk in flight finishes; none starts after.
            drop(expiry.closing.lock().await);
        }
        matched
    }

    fn hold(&self, router: RouterId) {
        if let Some(monitor) = &self.inner.config.liveness {
            monitor.hold(router);
        }
    }

    fn release(&self, router: RouterId) {
        if let Some(monitor) = &self.inner.config.liveness {
            monitor.release(router);
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
            self.release(router);
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
    ///     MemoryStore, NewSession, ReconcileError, Reconciler, RouterId, SessionId,
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
            stop(grace);
            self.release(router);
        }
        self.inner.tracker.wait().await;
    }
}
