//! One stream of events for every lifecycle change of the crate.
//!
//! # Invariants
//!
//! - `subscribers` counts the live [`Subscription`]s; an event is built and
//!   sent only while it is above zero (or the `metrics` feature records it),
//!   so a bus nobody listens to costs one atomic load per event.
//! - `lagged` is the sum of the events every subscription missed, counted
//!   by the subscription when it notices.
//!
//! # Deadlock safety
//!
//! The bus has no lock of its own; tokio's broadcast channel takes its
//! internal lock for each send and receive. Components publish after
//! releasing their own locks, with two exceptions that order an event
//! before what their lock guards can be seen: the in-memory store sends
//! `SessionCreated` under its router lock, and the reconciler
//! `RouterDisconnected` under its `graces` lock (the broadcast lock is then
//! the last one taken). Both send with `send_unrecorded` and `record` the
//! event in the metrics after the lock, as the recorder is user code.
//!
//! The one piece of user code a send can run is the `Drop` of an event it
//! pushes out of a full ring (the oldest, unread by a lagging subscriber):
//! an event that was the last holder of an error a prober or reclaim task
//! returned drops that error there, under the publisher's lock in the two
//! cases above. The stores' and the reconciler's docs say so.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Duration;

use crate::deleter::DeletionReport;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::liveness::LivenessEvent;
use crate::reclaim::ReclaimEvent;
use crate::reconcile::ReconcileSummary;
use crate::session::{CloseReason, Resource};
use crate::store::Repair;

/// A lifecycle change, as published on an [`EventBus`].
///
/// Give the same bus to each piece you build
/// ([`MemoryStoreBuilder::events`](crate::MemoryStoreBuilder::events),
/// [`RouterDeleterBuilder::events`](crate::RouterDeleterBuilder::events),
/// [`ReclaimQueueBuilder::events`](crate::ReclaimQueueBuilder::events),
/// [`LivenessMonitorBuilder::events`](crate::LivenessMonitorBuilder::events),
/// [`ReconcilerBuilder::events`](crate::ReconcilerBuilder::events),
/// [`AuditSweeperBuilder::events`](crate::AuditSweeperBuilder::events)) and one
/// subscription sees them all, in the order each piece published them.
///
/// The events of one session come in the order of its transitions
/// (`SessionCreated`, then `SessionTerminating` if it was marked, then
/// `SessionClosed`), with one exception: a close that races the deleter's
/// marking (a client closing its session at the moment its router is
/// fenced) may be published just before the `SessionTerminating` of the mark
/// it beat by a hair.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, Event, EventBus, MemoryStore, NewSession, NotifyError, RouterDeleter,
///     RouterId, SessionId, SessionStore, TerminationBatch, TerminationNotifier,
/// };
///
/// /// A router that never confirms.
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
/// let bus = EventBus::new(1_024);
/// let mut events = bus.subscribe();
/// let store = Arc::new(MemoryStore::builder().events(bus.clone()).build::<()>()?);
/// let deleter =
///     RouterDeleter::builder().retries(0).events(bus).build(Arc::clone(&store), Silent)?;
///
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let _ = deleter.delete(router).await?;
///
/// let mut seen = Vec::new();
/// while let Some(event) = events.try_recv() {
///     match event {
///         Event::SessionCreated { .. } => seen.push("created"),
///         Event::RouterFenced { sessions, .. } => {
///             assert_eq!(sessions, 1);
///             seen.push("fenced");
///         }
///         Event::SessionTerminating { .. } => seen.push("terminating"),
///         Event::SessionClosed { reason, .. } => {
///             assert_eq!(reason, CloseReason::Forced); // nobody confirmed
///             seen.push("closed");
///         }
///         Event::RouterDeleted(report) => {
///             assert_eq!(report.forced, 1);
///             seen.push("deleted");
///         }
///         _ => {}
///     }
/// }
/// assert_eq!(seen, ["created", "fenced", "terminating", "closed", "deleted"]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A session was created (published by the store before the session
    /// becomes visible, so it comes before any other event of the session).
    SessionCreated {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
    },
    /// A deletion marked the session `Terminating`.
    SessionTerminating {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
    },
    /// The session closed, by whatever path (published by the store that
    /// created it, from the close itself).
    SessionClosed {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
        /// Why it closed.
        reason: CloseReason,
    },
    /// A deletion fenced the router: no session can be created on it any
    /// more.
    RouterFenced {
        /// The router.
        router: RouterId,
        /// The fenced incarnation.
        incarnation: Incarnation,
        /// Sessions in the fence's snapshot.
        sessions: usize,
        /// `true` if the router was fenced already (a resumed deletion).
        resumed: bool,
    },
    /// A deletion finished; the report says how each session ended.
    RouterDeleted(DeletionReport),
    /// A router disconnected and its grace period started.
    RouterDisconnected {
        /// The router.
        router: RouterId,
        /// Its live incarnation.
        incarnation: Incarnation,
        /// How long it has to reconnect.
        grace: Duration,
    },
    /// A router stayed disconnected past its grace period: its sessions were
    /// closed with [`CloseReason::RouterLost`]; the router was not deleted.
    RouterLost {
        /// The router.
        router: RouterId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// Sessions closed.
        closed: usize,
    },
    /// A router's report of its sessions was reconciled.
    Reconciled(ReconcileSummary),
    /// The audit sweeper repaired one finding.
    Repaired(Repair),
    /// Something the liveness monitor reported (suspect, probe failed,
    /// reaped, stall).
    Liveness(LivenessEvent),
    /// Something the reclaim queue reported (retried, failed, long-lived).
    Reclaim(ReclaimEvent),
}

/// The broadcast channel every piece of the crate can publish its
/// [`Event`]s to; cheap to clone (clones share one channel).
///
/// # Lag
///
/// Each subscription buffers up to the bus's capacity. A subscriber that
/// falls further behind misses the oldest events: its next
/// [`Subscription::recv`] skips them, and the number missed is counted in
/// [`Subscription::lagged`] and in [`EventStats::lagged`]. Per-session events
/// come at the rate sessions are created and closed, so size the capacity
/// for your bursts (a router deletion publishes about two events per
/// session), or listen only to what you need and keep up.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     Event, EventBus, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = EventBus::new(1024);
/// let mut events = bus.subscribe();
/// let store = MemoryStore::builder().events(bus.clone()).build::<()>()?;
///
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// store.create(NewSession::new(SessionId::new(7), router, incarnation)).await?;
///
/// match events.recv().await {
///     Some(Event::SessionCreated { session, .. }) => assert_eq!(session, SessionId::new(7)),
///     other => panic!("unexpected {other:?}"),
/// }
/// assert_eq!(bus.stats().lagged, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    shared: Arc<BusShared>,
}

/// The bus's counters, shared with its subscriptions (which must not hold
/// the sender: the channel closes when the last bus clone drops).
struct BusShared {
    capacity: usize,
    subscribers: AtomicUsize,
    published: AtomicU64,
    lagged: AtomicU64,
}

/// A snapshot of an [`EventBus`]'s counters.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     EventBus, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = EventBus::new(2);
/// let mut events = bus.subscribe();
/// let store = MemoryStore::builder().events(bus.clone()).build::<()>()?;
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// for id in 0..5 {
///     let _ =
///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
/// // The subscriber fell 3 events behind a bus of capacity 2.
/// assert!(events.try_recv().is_some());
///
/// let stats = bus.stats();
/// assert_eq!((stats.capacity, stats.subscribers), (2, 1));
/// assert_eq!((stats.published, stats.lagged), (5, 3));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventStats {
    /// Events each subscriber can fall behind before it misses some.
    pub capacity: usize,
    /// Live subscriptions.
    pub subscribers: usize,
    /// Events sent to at least one subscriber.
    pub published: u64,
    /// Events subscribers missed because they fell behind, summed over
    /// subscribers.
    pub lagged: u64,
}

impl EventBus {
    /// A bus whose subscribers may each fall `capacity` events behind
    /// (at least 1, at most 2^30) before they miss some. The channel's
    /// slots are allocated up front.
    ///
    /// Every clone of the bus keeps the channel open, including the close
    /// hook a store with a bus attaches to each session it creates: a
    /// subscription ends once the bus's clones are gone and those sessions
    /// are closed or dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::EventBus;
    ///
    /// assert_eq!(EventBus::new(4_096).stats().capacity, 4_096);
    /// assert_eq!(EventBus::new(0).stats().capacity, 1);
    /// ```
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        // tokio's channel allocates every slot up front (and refuses more
        // than `usize::MAX / 2`): a billion is more than any use.
        let capacity = capacity.clamp(1, 1 << 30);
        let (sender, _) = broadcast::channel(capacity);
        Self {
            sender,
            shared: Arc::new(BusShared {
                capacity,
                subscribers: AtomicUsize::new(0),
                published: AtomicU64::new(0),
                lagged: AtomicU64::new(0),
            }),
        }
    }

    /// Subscribes to every event published from now on.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::EventBus;
    ///
    /// let bus = EventBus::default();
    /// let events = bus.subscribe();
    /// assert_eq!(bus.stats().subscribers, 1);
    /// drop(events);
    /// assert_eq!(bus.stats().subscribers, 0); // nobody listens: events cost nothing
    /// ```
    #[must_use]
    pub fn subscribe(&self) -> Subscription {
        // Counted before the receiver exists: a publisher that sees zero
        // subscribers skips only events this subscription could not get.
        self.shared.subscribers.fetch_add(1, Ordering::AcqRel);
        Subscription {
            receiver: self.sender.subscribe(),
            shared: Arc::clone(&self.shared),
            lagged: 0,
        }
    }

    /// The bus's counters.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{EventBus, MemoryStore, RouterId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::default();
    /// let store = MemoryStore::builder().events(bus.clone()).build::<()>()?;
    /// let _ = store.register_router(RouterId::new(1)).await?;
    /// assert_eq!(bus.stats().published, 0); // no subscriber, nothing sent
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn stats(&self) -> EventStats {
        EventStats {
            capacity: self.shared.capacity,
            subscribers: self.shared.subscribers.load(Ordering::Acquire),
            published: self.shared.published.load(Ordering::Relaxed),
            lagged: self.shared.lagged.load(Ordering::Relaxed),
        }
    }

    /// `true` while somebody listens.
    pub(crate) fn listening(&self) -> bool {
        self.shared.subscribers.load(Ordering::Acquire) > 0
    }

    fn send(&self, event: Event) {
        if self.sender.send(event).is_ok() {
            self.shared.published.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for EventBus {
    /// A bus of capacity 1,024.
    fn default() -> Self {
        Self::new(1_024)
    }
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Publishes the event `make` builds to `bus` if anybody listens, and
/// records it in the `metrics` facade when that feature is on; builds
/// nothing otherwise.
pub(crate) fn emit(bus: Option<&EventBus>, make: impl FnOnce() -> Event) {
    let listening = bus.filter(|bus| bus.listening());
    if cfg!(feature = "metrics") || listening.is_some() {
        let event = make();
        #[cfg(feature = "metrics")]
        crate::metrics::record(&event);
        if let Some(bus) = listening {
            bus.send(event);
        }
    }
}

/// Publishes the event `make` builds to `bus` if anybody listens, without
/// recording it in the metrics: for a publisher that must send under its
/// own lock (so that the event comes before what the lock guards can be
/// seen) and then calls [`record`] after releasing it, because the metrics
/// recorder is user code.
pub(crate) fn send_unrecorded(bus: Option<&EventBus>, make: impl FnOnce() -> Event) {
    if let Some(bus) = bus.filter(|bus| bus.listening()) {
        bus.send(make());
    }
}

/// Records the event `make` builds in the `metrics` facade: the other half
/// of [`emit`], after [`send_unrecorded`].
#[cfg(feature = "metrics")]
pub(crate) fn record(make: impl FnOnce() -> Event) {
    crate::metrics::record(&make());
}

/// One subscriber's view of an [`EventBus`]: every event published after
/// [`EventBus::subscribe`], minus those it missed by falling behind (see
/// the bus's `# Lag`).
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     CloseReason, Event, EventBus, MemoryStore, NewSession, RouterId, SessionId,
///     SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = EventBus::default();
/// let mut events = bus.subscribe();
/// // A listener task: counts closes until every clone of the bus is gone.
/// let listener = tokio::spawn(async move {
///     let mut closed = 0;
///     while let Some(event) = events.recv().await {
///         if let Event::SessionClosed { .. } = event {
///             closed += 1;
///         }
///     }
///     closed
/// });
///
/// let store = MemoryStore::builder().events(bus).build::<()>()?;
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let session =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let _ = store.close(session.id(), CloseReason::ClientClosed).await?;
/// drop(store); // drops the last clone of the bus
///
/// assert_eq!(listener.await?, 1);
/// # Ok(())
/// # }
/// ```
pub struct Subscription {
    receiver: broadcast::Receiver<Event>,
    shared: Arc<BusShared>,
    lagged: u64,
}

impl Subscription {
    /// The next event; `None` once every clone of the bus is dropped and the
    /// buffered events are read. Events missed by lagging are skipped and
    /// counted.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future loses no event.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     Event, EventBus, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::default();
    /// let mut events = bus.subscribe();
    /// let store = MemoryStore::builder().events(bus).build::<()>()?;
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// match events.recv().await {
    ///     Some(Event::SessionCreated { session, .. }) => {
    ///         assert_eq!(session, SessionId::new(1))
    ///     }
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(RecvError::Lagged(missed)) => self.count_lag(missed),
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one is buffered, without waiting.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     EventBus, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::default();
    /// let mut events = bus.subscribe();
    /// assert!(events.try_recv().is_none());
    ///
    /// let store = MemoryStore::builder().events(bus).build::<()>()?;
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// assert!(events.try_recv().is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_recv(&mut self) -> Option<Event> {
        loop {
            match self.receiver.try_recv() {
                Ok(event) => return Some(event),
                Err(TryRecvError::Lagged(missed)) => self.count_lag(missed),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
            }
        }
    }

    /// The subscription as a [`Stream`](futures::Stream) of events, for
    /// stream combinators; it ends when every clone of the bus is dropped.
    /// Lag is skipped and counted as by [`recv`](Self::recv).
    ///
    /// # Example
    ///
    /// ```
    /// use futures::StreamExt;
    /// use session_lifecycle::{Event, EventBus, MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::new(64);
    /// let events = bus.subscribe().into_stream();
    /// let store = MemoryStore::builder().events(bus).build::<()>()?;
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// for id in 0..3 {
    ///     store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
    /// }
    /// drop(store); // the last clone of the bus: the stream ends after the buffered events
    ///
    /// let created = events
    ///     .filter(|event| std::future::ready(matches!(event, Event::SessionCreated { .. })))
    ///     .count()
    ///     .await;
    /// assert_eq!(created, 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_stream(self) -> impl futures::Stream<Item = Event> + Send + 'static {
        futures::stream::unfold(self, |mut subscription| async move {
            let event = subscription.recv().await?;
            Some((event, subscription))
        })
    }

    /// Events this subscription missed because it fell behind.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     EventBus, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::new(1);
    /// let mut events = bus.subscribe();
    /// let store = MemoryStore::builder().events(bus).build::<()>()?;
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// for id in 0..3 {
    ///     let _ = store
    ///         .create(NewSession::new(SessionId::new(id), router, incarnation))
    ///         .await?;
    /// }
    /// assert!(events.try_recv().is_some()); // the newest; two were missed
    /// assert_eq!(events.lagged(), 2);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    fn count_lag(&mut self, missed: u64) {
        self.lagged = self.lagged.saturating_add(missed);
        self.shared.lagged.fetch_add(missed, Ordering::Relaxed);
        tracing::warn!(missed, "event subscriber fell behind and missed events");
        #[cfg(feature = "metrics")]
        crate::metrics::lagged(missed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("buffered", &self.receiver.len())
            .field("lagged", &self.lagged)
            .finish()
    }
}

/// Attached by a store to each session it creates when it publishes events:
/// the session's close publishes `SessionClosed`.
pub(crate) struct CloseHook {
    pub(crate) bus: EventBus,
    pub(crate) session: SessionId,
    pub(crate) router: RouterId,
    pub(crate) incarnation: Incarnation,
}

impl Resource for CloseHook {
    fn release(self: Box<Self>, reason: CloseReason) {
        let CloseHook {
            bus,
            session,
            router,
            incarnation,
        } = *self;
        emit(Some(&bus), || Event::SessionClosed {
            session,
            router,
            incarnation,
            reason,
        });
    }

    /// Publishing is cheap and must happen at the close, not after a queue.
    fn release_inline(&self) -> bool {
        true
    }
}
