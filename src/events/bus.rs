//! The bus: [`EventBus`], [`Subscription`], and how pieces publish.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::Event;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, Resource};

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventStats {
    /// Events each subscriber can fall behind before it misses some: the
    /// capacity the bus was built with, rounded up to a power of two.
    pub capacity: usize,
    /// Live subscriptions.
    pub subscribers: usize,
    /// Events sent to at least one subscriber.
    pub published: u64,
    /// Events subscribers missed because they fell behind, summed over
    /// subscribers.
    pub lagged: u64,
}

/// The most events a subscriber may fall behind, [`EventBus::new`]'s
/// largest capacity.
const MAX_CAPACITY: usize = 1 << 20;

impl EventBus {
    /// A bus whose subscribers may each fall `capacity` events behind
    /// (at least 1, at most 2^20: a capacity outside is clamped; rounded
    /// up to a power of two, as tokio's broadcast channel does, and
    /// [`EventStats::capacity`] reports the rounded figure) before they
    /// miss some. The channel's slots are allocated up front, about
    /// 200 bytes each: 2^20 slots take about 200 MiB. See the example on
    /// [`EventBus`].
    ///
    /// Every clone of the bus keeps the channel open, including the close
    /// hook a store with a bus attaches to each session it creates: a
    /// subscription ends once the bus's clones are gone and those sessions
    /// are closed or dropped.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        // tokio's channel allocates every slot up front: 2^30 of them
        // (about 220 GB) aborted the process. A million is more than any
        // use.
        let capacity = capacity.clamp(1, MAX_CAPACITY).next_power_of_two();
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

    /// Subscribes to every event published from now on. See the example on [`EventBus`].
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
        super::count::record(&event);
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
    super::count::record(&make());
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
    /// counted. See the example on [`Subscription`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future loses no event.
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
