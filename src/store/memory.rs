//! The in-memory store.
//!
//! # Invariants
//!
//! - Under a router's entry lock, the router's index and the session map's
//!   sessions of that router agree exactly: a session is inserted into both,
//!   and removed from both, inside one critical section of that lock.
//! - A session is inserted only while its router is `Live` in the session's
//!   incarnation; checking that and inserting is one critical section, so
//!   once `fence` set `Fenced` no session can be added (I2).
//! - Incarnations come from one store-wide counter, so they never repeat,
//!   even after a tombstone is evicted.
//!
//! # Deadlock safety
//!
//! Locks are taken in this order, never the reverse:
//!
//! 1. the `tombstones` mutex, released before anything below is taken;
//! 2. a `routers` dashmap shard;
//! 3. a router entry's mutex;
//! 4. a `sessions` dashmap shard;
//! 5. under 3 and 4, by `create` only, each alone: the event bus's
//!    broadcast lock (tokio's, to publish `SessionCreated` so that the event
//!    comes before anybody can see the session), then the new session's own
//!    lock (to attach its close hook; nobody else has the session yet).
//!
//! No user code runs under any of them (I8), so payloads, resources and
//! wakers may call back into the store on every path:
//!
//! - no session is closed under a guard: closing runs its resources;
//! - no handle that may be its session's last is dropped under a guard
//!   (that runs the payload's `Drop`): whatever a map or an index hands
//!   back, and the audit's copies, drop after the guards. A handle dropped
//!   under one is a copy of a handle the caller still holds (`finish`
//!   drops the map's copies while it holds the index's);
//! - the metrics recorder is called after the guards (`create` records its
//!   `SessionCreated` once they are released).
//!
//! One thing stays under 3 and 4, inside tokio: publishing `SessionCreated`
//! into a full ring drops the oldest event a lagging subscriber has not
//! read. If that is the last clone of a `ProbeFailed` or `Reclaim*` event,
//! the `Drop` of the error your prober or reclaim task returned runs there;
//! such an error's `Drop` must not call back into the store. (Publishing
//! after the guards would break the promise that `SessionCreated` comes
//! before anybody can see the session.)
//!
//! Iterating `sessions` (shard guards held) never takes a router lock: the
//! audit copies the handles out first, and `repair` looks each session up
//! on its own before it takes the session's router lock. No guard lives
//! across an `.await`; the async trait methods only wrap the synchronous
//! ones.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use foldhash::fast::RandomState;
use parking_lot::Mutex;

use super::SessionStore;
use super::error::{
    BackendError, CreateError, CreateErrorKind, FenceError, FinishError, RegisterError,
    RouterError, SessionError,
};
use super::report::{
    AuditReport, FenceSnapshot, FinishReport, Repair, RepairAction, RouterCensus, RouterStatus,
};
use super::rules::{FenceStep, admits, check_finishable, fence_step, holds};
use crate::build::BuildError;
use crate::event::{CloseHook, Event, EventBus, send_unrecorded};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session, SessionState};
use crate::stats::Stats;

/// Default number of deleted router incarnations remembered.
const DEFAULT_TOMBSTONES: usize = 65_536;

/// The default [`SessionStore`]: sessions in memory, in one process.
///
/// Sessions live in a sharded map (dashmap); each router has an entry under
/// its own small lock holding its phase, incarnation and session index, so
/// creating a session on one router never waits for another router.
/// Deleted incarnations are remembered as tombstones, bounded in number by
/// [`MemoryStoreBuilder::tombstone_capacity`]; when one is evicted, the
/// router id becomes unknown again, and creates against the old incarnation
/// are still refused because incarnations never repeat.
///
/// Every method of [`SessionStore`] resolves without waiting.
///
/// # Example
///
/// ```
/// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store: MemoryStore<&'static str> = MemoryStore::builder().tombstone_capacity(1024).build()?;
/// let router = RouterId::new(3);
/// let incarnation = store.register_router(router).await?;
/// let spec = NewSession::new(SessionId::new(1), router, incarnation).payload("alice");
/// let session = store.create(spec).await?;
/// assert_eq!(*session.payload(), "alice");
/// assert_eq!(store.len(), 1);
/// # Ok(())
/// # }
/// ```
pub struct MemoryStore<P = ()> {
    sessions: DashMap<SessionId, Session<P>, RandomState>,
    routers: DashMap<RouterId, RouterEntry<P>, RandomState>,
    next_incarnation: AtomicU64,
    tombstones: Mutex<VecDeque<(RouterId, Incarnation)>>,
    tombstone_capacity: usize,
    events: Option<EventBus>,
    /// [`Fault::SkipFence`] injected (test-util only).
    #[cfg(any(test, feature = "test-util"))]
    skip_fence: std::sync::atomic::AtomicBool,
}

/// A router's entry: everything "check the fence + add to the index" reads
/// and writes, under one lock.
type RouterEntry<P> = Mutex<RouterSlot<P>>;

struct RouterSlot<P> {
    status: RouterStatus,
    /// The router's sessions, as handles: listing or fencing a router reads
    /// only this, never the session map.
    index: SessionIndex<P>,
}

type SessionIndex<P> = HashMap<SessionId, Session<P>, RandomState>;

/// Builder of a [`MemoryStore`].
///
/// # Example
///
/// ```
/// use session_lifecycle::{EventBus, MemoryStore};
///
/// let bus = EventBus::new(4_096);
/// // Sessions carry the client's name.
/// let store: MemoryStore<String> = MemoryStore::builder()
///     .tombstone_capacity(10_000)
///     .shard_amount(64)
///     .events(bus.clone())
///     .build().unwrap();
/// assert!(store.is_empty());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    tombstone_capacity: usize,
    shard_amount: Option<usize>,
    events: Option<EventBus>,
}

impl MemoryStoreBuilder {
    /// How many deleted router incarnations to remember (default 65,536).
    /// Past that, the oldest tombstone is forgotten and its router id becomes
    /// unknown; creates against it are still refused.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, RouterId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::builder().tombstone_capacity(1).build::<()>()?;
    /// for raw in 1..=2 {
    ///     let router = RouterId::new(raw);
    ///     let incarnation = store.register_router(router).await?;
    ///     let _ = store.fence(router).await?;
    ///     let _ = store.finish(router, incarnation).await?;
    /// }
    /// // Only the last deletion is remembered.
    /// assert!(store.router_status(RouterId::new(1)).await.is_err());
    /// assert!(store.router_status(RouterId::new(2)).await.is_ok());
    /// # Ok(())
    /// # }
    /// ```
    pub fn tombstone_capacity(mut self, capacity: usize) -> Self {
        self.tombstone_capacity = capacity;
        self
    }

    /// The number of shards of the session and router maps (default: four
    /// per core, rounded up to a power of two). A power of two from 2 to
    /// 65,536, checked by [`build`](Self::build).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::MemoryStore;
    ///
    /// let store = MemoryStore::builder().shard_amount(256).build::<()>().unwrap();
    /// assert!(store.is_empty());
    /// ```
    pub fn shard_amount(mut self, shards: usize) -> Self {
        self.shard_amount = Some(shards);
        self
    }

    /// Publishes [`Event::SessionCreated`] and [`Event::SessionClosed`] of
    /// every session the store creates on `bus` (default: none).
    ///
    /// Each session then carries a small close hook (one allocation of 32
    /// bytes), released inline by its close whatever path closes it.
    ///
    /// Cost: while somebody subscribes, each create publishes under its
    /// router's lock (so the event comes before anyone can see the session),
    /// and creates on all routers then take turns on the bus's channel lock.
    /// Per-session events suit audits and tests; a controller creating
    /// sessions by the million on many threads listens to the router-level
    /// events of the other pieces instead.
    ///
    /// Publishing into a full ring drops the oldest event a lagging
    /// subscriber has not read, under the router's lock: if that event was
    /// the last holder of an error your prober or reclaim task returned
    /// ([`LivenessEvent::ProbeFailed`](crate::LivenessEvent::ProbeFailed),
    /// [`ReclaimEvent`](crate::ReclaimEvent)), the error's `Drop` runs there,
    /// and must not call back into the store.
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
    /// let bus = EventBus::new(64);
    /// let mut events = bus.subscribe();
    /// let store = MemoryStore::builder().events(bus).build::<()>()?;
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// let _ = session.close(CloseReason::ClientClosed);
    ///
    /// assert!(matches!(events.try_recv(), Some(Event::SessionCreated { .. })));
    /// match events.try_recv() {
    ///     Some(Event::SessionClosed { reason, .. }) => {
    ///         assert_eq!(reason, CloseReason::ClientClosed)
    ///     }
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// Builds the store, for sessions carrying a payload of type `P`.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] for a shard amount that is not a power of
    /// two from 2 to 65,536.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::MemoryStore;
    ///
    /// #[derive(Debug)]
    /// struct Client {
    ///     name: String,
    /// }
    ///
    /// let store: MemoryStore<Client> = MemoryStore::builder().build()?;
    /// assert_eq!(store.len(), 0);
    /// # Ok::<(), session_lifecycle::BuildError>(())
    /// ```
    pub fn build<P>(self) -> Result<MemoryStore<P>, BuildError> {
        let shards = self.shard_amount.map(check_shards).transpose()?;
        Ok(self.build_with(shards))
    }

    fn build_with<P>(self, shards: Option<usize>) -> MemoryStore<P> {
        let (sessions, routers) = match shards {
            Some(shards) => (
                DashMap::with_hasher_and_shard_amount(RandomState::default(), shards),
                DashMap::with_hasher_and_shard_amount(RandomState::default(), shards),
            ),
            None => (
                DashMap::with_hasher(RandomState::default()),
                DashMap::with_hasher(RandomState::default()),
            ),
        };
        MemoryStore {
            sessions,
            routers,
            next_incarnation: AtomicU64::new(1),
            tombstones: Mutex::new(VecDeque::new()),
            tombstone_capacity: self.tombstone_capacity,
            events: self.events,
            #[cfg(any(test, feature = "test-util"))]
            skip_fence: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl<P> Default for MemoryStore<P> {
    fn default() -> Self {
        MemoryStore::builder().build_with(None)
    }
}

/// The most shards: each is a lock and a map, allocated up front.
const MAX_SHARDS: usize = 1 << 16;

/// Refuses a shard amount dashmap cannot take (a power of two above 1) or
/// that would allocate absurdly.
fn check_shards(shards: usize) -> Result<usize, BuildError> {
    if shards > 1 && shards.is_power_of_two() && shards <= MAX_SHARDS {
        Ok(shards)
    } else {
        Err(BuildError::setting(
            "MemoryStore",
            "shard_amount",
            format_args!("must be a power of two from 2 to {MAX_SHARDS}, got {shards}"),
        ))
    }
}

impl<P> fmt::Debug for MemoryStore<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("sessions", &self.sessions.len())
            .field("routers", &self.routers.len())
            .finish_non_exhaustive()
    }
}

impl MemoryStore<()> {
    /// A store with default settings, for sessions without payload.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::MemoryStore;
    ///
    /// let store = MemoryStore::new();
    /// assert!(store.is_empty());
    /// // With a payload: `MemoryStore::<MyPayload>::default()` or the builder.
    /// let named: MemoryStore<String> = MemoryStore::default();
    /// assert!(named.is_empty());
    /// ```
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder to configure the store.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::MemoryStore;
    ///
    /// let store: MemoryStore<u32> =
    ///     MemoryStore::builder().tombstone_capacity(1_024).build().unwrap();
    /// assert!(store.is_empty());
    /// ```
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            tombstone_capacity: DEFAULT_TOMBSTONES,
            shard_amount: None,
            events: None,
        }
    }
}

impl<P> MemoryStore<P> {
    /// The number of sessions in the store.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// for id in 0..3 {
    ///     let _ = store
    ///         .create(NewSession::new(SessionId::new(id), router, incarnation))
    ///         .await?;
    /// }
    /// assert_eq!(store.len(), 3);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// `true` when the store holds no session.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// assert!(!store.is_empty());
    /// let _ = store.close(session.id(), CloseReason::ClientClosed).await?;
    /// assert!(store.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Gives memory back to the allocator after many sessions were removed.
    ///
    /// Router indexes shrink by themselves as they empty; the session map
    /// keeps its capacity until this is called. It locks each shard of the
    /// map in turn, so call it off the hot path (after a large deletion).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// for id in 0..10_000 {
    ///     let _ = store
    ///         .create(NewSession::new(SessionId::new(id), router, incarnation))
    ///         .await?;
    /// }
    /// let _ = store.fence(router).await?;
    /// let _ = store.finish(router, incarnation).await?; // removes all 10,000
    /// store.shrink_to_fit();
    /// assert!(store.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn shrink_to_fit(&self) {
        self.sessions.shrink_to_fit();
    }

    /// Counts the sessions per router and in total: [`Stats::collect`] on
    /// this store, without the `.await`. One pass over every session, each
    /// router under its own lock.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// // No `.await`: usable from a synchronous metrics callback.
    /// let stats = store.stats();
    /// assert_eq!(stats.active, 1);
    /// assert_eq!(stats.router(router).map(|census| census.active), Some(1));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats::from_census(self.census_now())
    }

    /// The number of routers the store knows, tombstones included.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, RouterId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ = store.fence(router).await?;
    /// let _ = store.finish(router, incarnation).await?;
    /// assert_eq!(store.router_count(), 1); // its tombstone
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn router_count(&self) -> usize {
        self.routers.len()
    }

    fn register_router_now(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        match self.routers.entry(router) {
            Entry::Vacant(vacant) => {
                let incarnation = self.new_incarnation();
                vacant.insert(Mutex::new(RouterSlot::live(incarnation)));
                Ok(incarnation)
            }
            Entry::Occupied(occupied) => {
                let mut slot = occupied.get().lock();
                match slot.status {
                    RouterStatus::Live(incarnation) => Err(RegisterError::AlreadyRegistered {
                        router,
                        incarnation,
                    }),
                    RouterStatus::Fenced(incarnation) => Err(RegisterError::Deleting {
                        router,
                        incarnation,
                    }),
                    RouterStatus::Deleted(_) => {
                        let incarnation = self.new_incarnation();
                        let old = std::mem::replace(&mut *slot, RouterSlot::live(incarnation));
                        drop(slot);
                        drop(occupied);
                        // A deleted router's index is empty (its `finish`
                        // took it); dropped after the guards all the same.
                        drop(old);
                        Ok(incarnation)
                    }
                }
            }
        }
    }

    fn new_incarnation(&self) -> Incarnation {
        // Relaxed: uniqueness needs only the atomicity of the increment; the
        // incarnation is published under the router's lock.
        Incarnation::new(self.next_incarnation.fetch_add(1, Ordering::Relaxed))
    }

    fn router_status_now(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(RouterError::UnknownRouter(router))?;
        let status = entry.lock().status;
        Ok(status)
    }

    fn create_now(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        let mut displaced = None;
        let created = self.insert_new(spec, &mut displaced);
        // After the guards: a handle the index held for an id the map had
        // lost may be its session's last, and its payload's `Drop` is user
        // code; so is the metrics recorder.
        drop(displaced);
        #[cfg(feature = "metrics")]
        if let Ok(session) = &created {
            crate::event::record(|| created_event(session));
        }
        created
    }

    /// The checks and inserts of `create`, under the router's lock; an index
    /// entry the new session displaced is handed out in `displaced`.
    fn insert_new(
        &self,
        spec: NewSession<P>,
        displaced: &mut Option<Session<P>>,
    ) -> Result<Session<P>, CreateError<P>> {
        let router = spec.router();
        let Some(entry) = self.routers.get(&router) else {
            return Err(CreateError::new(
                CreateErrorKind::UnknownRouter(router),
                spec,
            ));
        };
        let mut slot = entry.lock();
        let admitted = slot.admits(router, spec.incarnation());
        #[cfg(any(test, feature = "test-util"))]
        let admitted =
            admitted.or_else(|kind| self.skip_fence(slot.status, spec.incarnation(), kind));
        if let Err(kind) = admitted {
            return Err(CreateError::new(kind, spec));
        }
        match self.sessions.entry(spec.id()) {
            Entry::Occupied(_) => {
                let kind = CreateErrorKind::DuplicateSession(spec.id());
                Err(CreateError::new(kind, spec))
            }
            Entry::Vacant(vacant) => {
                let session = spec.into_session();
                self.announce(&session);
                *displaced = slot.index.insert(session.id(), session.clone());
                vacant.insert(session.clone());
                Ok(session)
            }
        }
    }

    fn get_now(&self, id: SessionId) -> Option<Session<P>> {
        self.sessions.get(&id).map(|session| session.clone())
    }

    /// Removes `session` from the map and its router's index if the map
    /// still holds this very session; `true` if it did.
    fn unlink(&self, session: &Session<P>) -> bool {
        let Some(entry) = self.routers.get(&session.router()) else {
            return false;
        };
        let mut slot = entry.lock();
        // Checking the map under the router lock keeps a reused id safe: only
        // this session's own entry is removed, from both places at once.
        let unmapped = self
            .sessions
            .remove_if(&session.id(), |_, stored| Session::ptr_eq(stored, session));
        let unindexed = match unmapped {
            Some(_) => unindex(&mut slot.index, session),
            None => None,
        };
        drop(slot);
        drop(entry);
        // What was removed drops after the guards: see `# Deadlock safety`.
        let removed = unmapped.is_some();
        drop((unmapped, unindexed));
        removed
    }

    /// The session with this key, if the map holds that very life of the id.
    fn get_exact(&self, key: SessionKey) -> Option<Session<P>> {
        self.sessions
            .get(&key.id())
            .filter(|session| session.value().key() == key)
            .map(|session| session.clone())
    }

    /// Closes `session` (outside every lock: closing runs its resources)
    /// and unlinks this very session.
    fn close_held(
        &self,
        session: Option<Session<P>>,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        let session = session.ok_or(SessionError::UnknownSession(id))?;
        let outcome = session.close(reason);
        self.unlink(&session);
        Ok(outcome)
    }

    /// Closes `session` with `Reclaimed` if open, and unlinks it; the
    /// session if this call unlinked it.
    fn remove_held(
        &self,
        session: Option<Session<P>>,
        id: SessionId,
    ) -> Result<Session<P>, SessionError> {
        let session = session.ok_or(SessionError::UnknownSession(id))?;
        // Close before unlinking, so no session is ever out of the store and
        // still open; losing the close to another caller is fine.
        let _ = session.close(CloseReason::Reclaimed);
        if self.unlink(&session) {
            Ok(session)
        } else {
            Err(SessionError::UnknownSession(id))
        }
    }

    fn sessions_now(&self, router: RouterId) -> Result<Vec<Session<P>>, RouterError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(RouterError::UnknownRouter(router))?;
        let slot = entry.lock();
        Ok(handles(&slot.index))
    }

    fn count_now(&self, router: RouterId) -> Result<usize, RouterError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(RouterError::UnknownRouter(router))?;
        let count = entry.lock().index.len();
        Ok(count)
    }

    fn fence_now(
        &self,
        router: RouterId,
        expected: Option<Incarnation>,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(FenceError::UnknownRouter(router))?;
        let mut slot = entry.lock();
        let (incarnation, newly_fenced) = match fence_step(router, slot.status, expected)? {
            FenceStep::Fence(incarnation) => {
                slot.status = RouterStatus::Fenced(incarnation);
                (incarnation, true)
            }
            FenceStep::Resume(incarnation) => (incarnation, false),
        };
        Ok(FenceSnapshot {
            router,
            incarnation,
            newly_fenced,
            sessions: handles(&slot.index),
        })
    }

    fn finish_now(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        // Close what is still open outside every lock (closing runs user
        // resources). The router is fenced, so its index can only shrink
        // between here and the removal below.
        let open = {
            let entry = self
                .routers
                .get(&router)
                .ok_or(FinishError::UnknownRouter(router))?;
            let slot = entry.lock();
            check_finishable(router, incarnation, slot.status)?;
            handles(&slot.index)
        };
        let closed = open
            .iter()
            .filter(|session| session.close(CloseReason::Reclaimed).won())
            .count();
        // The handles come out of the lock and drop after it: dropping the
        // last handle of a session runs its payload's `Drop`, user code.
        let removed = {
            let entry = self
                .routers
                .get(&router)
                .ok_or(FinishError::UnknownRouter(router))?;
            let mut slot = entry.lock();
            check_finishable(router, incarnation, slot.status)?;
            slot.status = RouterStatus::Deleted(incarnation);
            let index = std::mem::take(&mut slot.index);
            for (id, indexed) in &index {
                // The map's copy drops here, under the lock: `index` holds
                // this very session, so it is never the last handle.
                self.sessions
                    .remove_if(id, |_, stored| Session::ptr_eq(stored, indexed));
            }
            index
        };
        self.remember_tombstone(router, incarnation);
        Ok(FinishReport {
            router,
            incarnation,
            removed: removed.len(),
            closed,
            unreadable: 0,
            foreign: 0,
        })
    }

    fn remember_tombstone(&self, router: RouterId, incarnation: Incarnation) {
        let evicted: Vec<_> = {
            let mut tombstones = self.tombstones.lock();
            tombstones.push_back((router, incarnation));
            let excess = tombstones.len().saturating_sub(self.tombstone_capacity);
            tombstones.drain(..excess).collect()
        };
        for (router, incarnation) in evicted {
            // Only if the router was not registered again since.
            self.routers.remove_if(&router, |_, entry| {
                entry.lock().status == RouterStatus::Deleted(incarnation)
            });
        }
    }

    fn audit_now(&self) -> AuditReport {
        let mut report = AuditReport {
            routers: self.routers.len(),
            sessions: self.sessions.len(),
            ..AuditReport::default()
        };
        // Index → map, router by router under each router's lock.
        for entry in self.routers.iter() {
            let router = *entry.key();
            let slot = entry.value().lock();
            for (id, indexed) in &slot.index {
                if !self.holds(indexed) {
                    report.missing_from_map.push((router, *id));
                } else if indexed.router() != router || !slot.status_holds(indexed.incarnation()) {
                    report.orphans.push(*id);
                }
            }
        }
        // Map → index: copy the handles out first (a router lock must not be
        // taken under a session shard guard), then re-check each under its
        // router's lock, where map and index agree exactly.
        let mut by_router: HashMap<RouterId, Vec<Session<P>>> = HashMap::new();
        for stored in self.sessions.iter() {
            by_router
                .entry(stored.router())
                .or_default()
                .push(stored.clone());
        }
        for (router, sessions) in &by_router {
            let entry = self.routers.get(router);
            let slot = entry.as_ref().map(|entry| entry.lock());
            for session in sessions {
                if !self.holds(session) {
                    continue; // removed meanwhile
                }
                if session.is_closed() {
                    report.closed_in_store.push(session.id());
                }
                match &slot {
                    None => report.orphans.push(session.id()),
                    Some(slot) => {
                        let indexed = slot.index.get(&session.id());
                        if !indexed.is_some_and(|indexed| Session::ptr_eq(indexed, session)) {
                            report.missing_from_index.push(session.id());
                        }
                        if !slot.status_holds(session.incarnation()) {
                            report.orphans.push(session.id());
                        }
                    }
                }
            }
        }
        // The copies drop after every guard: a session removed since it was
        // copied may have no other handle left, and its payload's `Drop` is
        // user code.
        drop(by_router);
        report.orphans.sort_unstable();
        report.orphans.dedup();
        report
    }

    /// Publishes the creation of `session`, before anybody else can see it,
    /// and hooks its close to the event bus. The caller records the event
    /// in the metrics once its guards are released.
    fn announce(&self, session: &Session<P>) {
        let (id, router, incarnation) = (session.id(), session.router(), session.incarnation());
        send_unrecorded(self.events.as_ref(), || created_event(session));
        if let Some(bus) = &self.events {
            let hook = CloseHook {
                bus: bus.clone(),
                session: id,
                router,
                incarnation,
            };
            // A new session is open: the attach cannot be refused.
            let _ = session.attach(hook);
        }
    }

    fn census_now(&self) -> Vec<RouterCensus> {
        let mut census = Vec::new();
        for entry in self.routers.iter() {
            let slot = entry.value().lock();
            if matches!(slot.status, RouterStatus::Deleted(_)) && slot.index.is_empty() {
                continue;
            }
            let mut counts = RouterCensus::new(*entry.key(), slot.status);
            for session in slot.index.values() {
                match session.state() {
                    SessionState::Active => counts.active += 1,
                    SessionState::Terminating => counts.terminating += 1,
                    SessionState::Closed => counts.closed += 1,
                }
            }
            census.push(counts);
        }
        census.sort_unstable_by_key(|counts| counts.router);
        census
    }

    fn repair_now(&self, findings: &AuditReport) -> Vec<Repair> {
        let mut repairs = Vec::new();
        for &(router, id) in &findings.missing_from_map {
            self.repair_index_entry(router, id, &mut repairs);
        }
        for &id in &findings.missing_from_index {
            self.repair_unindexed(id, &mut repairs);
        }
        for &id in &findings.orphans {
            let Some(stored) = self.get_now(id) else {
                continue; // removed meanwhile
            };
            if self.belongs(&stored) {
                continue; // not an orphan (any more): the audit raced a change
            }
            self.evict(&stored, RepairAction::OrphanReclaimed, &mut repairs);
        }
        for &id in &findings.closed_in_store {
            if let Some(stored) = self.get_now(id).filter(Session::is_closed) {
                if self.deleting(stored.router()) {
                    continue; // the deletion's `finish` removes it
                }
                self.evict(&stored, RepairAction::ClosedRemoved, &mut repairs);
            }
        }
        repairs
    }

    /// An index entry of `router` whose session is not in the map: put the
    /// session back if it still belongs, drop the entry otherwise.
    fn repair_index_entry(&self, router: RouterId, id: SessionId, repairs: &mut Vec<Repair>) {
        let dropped = {
            let Some(entry) = self.routers.get(&router) else {
                return;
            };
            let mut slot = entry.lock();
            if matches!(slot.status, RouterStatus::Fenced(_)) {
                return; // the deletion's `finish` handles the index
            }
            let Some(indexed) = slot.index.get(&id).cloned() else {
                return; // removed meanwhile
            };
            if self.holds(&indexed) {
                return; // repaired meanwhile
            }
            let belongs = !indexed.is_closed()
                && indexed.router() == router
                && slot.status_holds(indexed.incarnation());
            if belongs && let Entry::Vacant(vacant) = self.sessions.entry(id) {
                vacant.insert(indexed.clone());
                repairs.push(repair(&indexed, RepairAction::Restored));
                return;
            }
            // Dropped under the lock, but never the last handle: `indexed`
            // is a clone of this very entry.
            drop(unindex(&mut slot.index, &indexed));
            repairs.push(repair(&indexed, RepairAction::DroppedIndexEntry));
            indexed
        };
        // Outside every lock: closing runs the session's resources.
        let _ = dropped.close(CloseReason::Reclaimed);
    }

    /// A session in the map missing from its router's index: index it if it
    /// belongs, evict it otherwise.
    fn repair_unindexed(&self, id: SessionId, repairs: &mut Vec<Repair>) {
        let Some(stored) = self.get_now(id) else {
            return;
        };
        if let Some(entry) = self.routers.get(&stored.router()) {
            let mut slot = entry.lock();
            if matches!(slot.status, RouterStatus::Fenced(current) if current == stored.incarnation())
            {
                // A session of a router being deleted: once the deletion's
                // `finish` tombstones the router, it is an orphan, and the
                // next sweep reclaims it.
                return;
            }
            if !self.holds(&stored)
                || slot
                    .index
                    .get(&id)
                    .is_some_and(|indexed| Session::ptr_eq(indexed, &stored))
            {
                return; // removed or repaired meanwhile
            }
            if !stored.is_closed()
                && slot.status_holds(stored.incarnation())
                && !slot.index.contains_key(&id)
            {
                slot.index.insert(id, stored.clone());
                repairs.push(repair(&stored, RepairAction::Reindexed));
                return;
            }
        }
        let action = if self.belongs(&stored) {
            RepairAction::ClosedRemoved
        } else {
            RepairAction::OrphanReclaimed
        };
        self.evict(&stored, action, repairs);
    }

    /// Whether `router` is fenced: its deletion runs, and its sessions are
    /// the deletion's alone.
    fn deleting(&self, router: RouterId) -> bool {
        self.routers
            .get(&router)
            .is_some_and(|entry| matches!(entry.lock().status, RouterStatus::Fenced(_)))
    }

    /// Whether the router `session` names holds its incarnation (live or
    /// fenced): only then is the session not an orphan.
    fn belongs(&self, session: &Session<P>) -> bool {
        self.routers
            .get(&session.router())
            .is_some_and(|entry| entry.lock().status_holds(session.incarnation()))
    }

    /// Closes `session` (if open) and removes it from the map and from any
    /// index holding it.
    fn evict(&self, session: &Session<P>, action: RepairAction, repairs: &mut Vec<Repair>) {
        let _ = session.close(CloseReason::Reclaimed);
        let id = session.id();
        let unmap = || {
            self.sessions
                .remove_if(&id, |_, stored| Session::ptr_eq(stored, session))
        };
        let (unindexed, unmapped) = match self.routers.get(&session.router()) {
            Some(entry) => {
                let mut slot = entry.lock();
                (unindex(&mut slot.index, session), unmap())
            }
            None => (None, unmap()),
        };
        if unmapped.is_some() {
            repairs.push(repair(session, action));
        }
        // After the guards, as everything removed: see `# Deadlock safety`.
        drop((unindexed, unmapped));
    }

    /// `true` if the map holds this very session.
    fn holds(&self, session: &Session<P>) -> bool {
        self.sessions
            .get(&session.id())
            .is_some_and(|stored| Session::ptr_eq(&stored, session))
    }
}

fn created_event<P>(session: &Session<P>) -> Event {
    Event::SessionCreated {
        session: session.id(),
        router: session.router(),
        incarnation: session.incarnation(),
    }
}

fn repair<P>(session: &Session<P>, action: RepairAction) -> Repair {
    Repair {
        session: session.id(),
        router: session.router(),
        incarnation: session.incarnation(),
        action,
    }
}

/// Removes `session`'s entry from `index` if it is this very session (a
/// later session reusing the id keeps its entry); returns what it removed,
/// for the caller to drop after its guards.
fn unindex<P>(index: &mut SessionIndex<P>, session: &Session<P>) -> Option<Session<P>> {
    let id = session.id();
    if !index
        .get(&id)
        .is_some_and(|indexed| Session::ptr_eq(indexed, session))
    {
        return None;
    }
    let removed = index.remove(&id);
    shrink_if_sparse(index);
    removed
}

/// Handles of the indexed sessions; call with the router's lock held.
fn handles<P>(index: &SessionIndex<P>) -> Vec<Session<P>> {
    index.values().cloned().collect()
}

/// Gives back an index's memory once it is mostly empty; halving at a
/// quarter full keeps the cost amortised O(1) per removal.
fn shrink_if_sparse<P>(index: &mut SessionIndex<P>) {
    if index.capacity() > 16 && index.len() * 4 < index.capacity() {
        index.shrink_to(index.len() * 2);
    }
}

impl<P> RouterSlot<P> {
    fn live(incarnation: Incarnation) -> Self {
        Self {
            status: RouterStatus::Live(incarnation),
            index: HashMap::default(),
        }
    }

    /// Whether a session may be created in `requested`.
    fn admits(&self, router: RouterId, requested: Incarnation) -> Result<(), CreateErrorKind> {
        admits(self.status, router, requested)
    }

    /// Whether a stored session of `incarnation` belongs here: the router is
    /// live or fenced in that very incarnation.
    fn status_holds(&self, incarnation: Incarnation) -> bool {
        holds(self.status, incarnation)
    }
}

impl<P: Send + Sync + 'static> SessionStore for MemoryStore<P> {
    type Payload = P;

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.register_router_now(router)
    }

    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.router_status_now(router)
    }

    async fn create(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        self.create_now(spec)
    }

    async fn get(&self, id: SessionId) -> Result<Option<Session<P>>, BackendError> {
        Ok(self.get_now(id))
    }

    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.close_held(self.get_now(id), id, reason)
    }

    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.close_held(self.get_exact(key), key.id(), reason)
    }

    async fn remove(&self, id: SessionId) -> Result<Session<P>, SessionError> {
        self.remove_held(self.get_now(id), id)
    }

    async fn remove_exact(&self, key: SessionKey) -> Result<Session<P>, SessionError> {
        self.remove_held(self.get_exact(key), key.id())
    }

    async fn sessions(&self, router: RouterId) -> Result<Vec<Session<P>>, RouterError> {
        self.sessions_now(router)
    }

    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.count_now(router)
    }

    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<P>, FenceError> {
        self.fence_now(router, None)
    }

    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        self.fence_now(router, Some(incarnation))
    }

    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.finish_now(router, incarnation)
    }

    async fn audit(&self) -> Result<AuditReport, BackendError> {
        Ok(self.audit_now())
    }

    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        Ok(self.census_now())
    }

    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        Ok(self.repair_now(findings))
    }
}

/// A way to break a [`MemoryStore`]'s invariants behind its API, to test
/// that [`SessionStore::audit`] finds it and
/// [`AuditSweeper`](crate::AuditSweeper) repairs it. Test-only.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     Corruption, Incarnation, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
///
/// store.corrupt(Corruption::Unindex(SessionId::new(1)));
/// // A session of a router that never existed: an orphan.
/// let stray = NewSession::new(SessionId::new(2), RouterId::new(99), Incarnation::new(1));
/// store.corrupt(Corruption::Inject(stray.into_session()));
///
/// let findings = store.audit().await?;
/// assert_eq!(findings.missing_from_index, vec![SessionId::new(1)]);
/// assert_eq!(findings.orphans, vec![SessionId::new(2)]);
/// let _ = store.repair(&findings).await?;
/// assert!(store.audit().await?.is_clean());
/// # Ok(())
/// # }
/// ```
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Debug)]
#[non_exhaustive]
pub enum Corruption<P> {
    /// Removes the session from its router's index only.
    Unindex(SessionId),
    /// Removes the session from the session map only.
    DropFromMap(SessionId),
    /// Puts a session into the session map only, bypassing every check
    /// (an orphan if its router does not hold its incarnation).
    Inject(Session<P>),
}

/// A fault [`MemoryStore::inject_fault`] makes the store commit on
/// purpose, to prove that a test suite catches it. Test-only.
///
/// # Example
///
/// ```
/// use session_lifecycle::{Fault, MemoryStore, NewSession, RouterId, SessionId, SessionStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.fence(router).await?;
///
/// store.inject_fault(Fault::SkipFence);
/// // Broken on purpose: a create on a fenced router (invariant I2).
/// assert!(store.create(NewSession::new(SessionId::new(1), router, incarnation)).await.is_ok());
///
/// store.clear_faults();
/// assert!(store.create(NewSession::new(SessionId::new(2), router, incarnation)).await.is_err());
/// # Ok(())
/// # }
/// ```
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// `create` ignores a fence: a router's fenced incarnation admits
    /// sessions as if it were live (deleted incarnations still refuse).
    SkipFence,
}

#[cfg(any(test, feature = "test-util"))]
impl<P> MemoryStore<P> {
    /// Makes the store commit `fault` from now on. Test-only: it breaks
    /// the store's invariants. See [`Fault`].
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn inject_fault(&self, fault: Fault) {
        match fault {
            // Relaxed: a test sets it between steps; no data rides on it.
            Fault::SkipFence => self.skip_fence.store(true, Ordering::Relaxed),
        }
    }

    /// Stops every injected fault. See [`Fault`].
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn clear_faults(&self) {
        self.skip_fence.store(false, Ordering::Relaxed);
    }

    /// With [`Fault::SkipFence`], admits a create the fence refused.
    fn skip_fence(
        &self,
        status: RouterStatus,
        requested: Incarnation,
        refused: CreateErrorKind,
    ) -> Result<(), CreateErrorKind> {
        match status {
            RouterStatus::Fenced(fenced)
                if fenced == requested && self.skip_fence.load(Ordering::Relaxed) =>
            {
                Ok(())
            }
            _ => Err(refused),
        }
    }
    /// Applies `corruption`. Test-only: it breaks the store's invariants.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     Corruption, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let _ =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    ///
    /// store.corrupt(Corruption::DropFromMap(SessionId::new(1)));
    /// let findings = store.audit().await?;
    /// assert_eq!(findings.missing_from_map, vec![(router, SessionId::new(1))]);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn corrupt(&self, corruption: Corruption<P>) {
        match corruption {
            Corruption::Unindex(id) => {
                let router = self.get_now(id).map(|session| session.router());
                let removed = router
                    .and_then(|router| self.routers.get(&router))
                    .and_then(|entry| entry.lock().index.remove(&id));
                // After the guards: it may be the session's last handle.
                drop(removed);
            }
            Corruption::DropFromMap(id) => {
                self.sessions.remove(&id);
            }
            Corruption::Inject(session) => {
                self.sessions.insert(session.id(), session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The audit must see each kind of corruption; these corrupt the store
    //! behind its API, which only code inside the module can do.

    use super::*;

    fn store_with_sessions(n: u64) -> (MemoryStore, RouterId, Incarnation) {
        let store = MemoryStore::new();
        let router = RouterId::new(1);
        let incarnation = store.register_router_now(router).unwrap();
        for id in 0..n {
            store
                .create_now(NewSession::new(SessionId::new(id), router, incarnation))
                .unwrap();
        }
        (store, router, incarnation)
    }

    #[test]
    fn a_clean_store_audits_clean() {
        let (store, _, _) = store_with_sessions(10);
        let report = store.audit_now();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!((report.routers, report.sessions), (1, 10));
    }

    #[test]
    fn audit_finds_a_session_missing_from_the_index() {
        let (store, router, _) = store_with_sessions(3);
        store
            .routers
            .get(&router)
            .unwrap()
            .lock()
            .index
            .remove(&SessionId::new(1));
        let report = store.audit_now();
        assert_eq!(report.missing_from_index, vec![SessionId::new(1)]);
        assert!(!report.is_consistent());
    }

    #[test]
    fn audit_finds_an_index_entry_missing_from_the_map() {
        let (store, router, _) = store_with_sessions(3);
        store.sessions.remove(&SessionId::new(2));
        let report = store.audit_now();
        assert_eq!(report.missing_from_map, vec![(router, SessionId::new(2))]);
    }

    #[test]
    fn audit_finds_orphans_of_deleted_and_unknown_routers() {
        let (store, router, incarnation) = store_with_sessions(0);
        store.fence_now(router, None).unwrap();
        store.finish_now(router, incarnation).unwrap();
        let zombie = NewSession::new(SessionId::new(7), router, incarnation).into_session();
        store.sessions.insert(zombie.id(), zombie);
        let stray =
            NewSession::new(SessionId::new(8), RouterId::new(99), incarnation).into_session();
        store.sessions.insert(stray.id(), stray);
        let report = store.audit_now();
        assert_eq!(report.orphans, vec![SessionId::new(7), SessionId::new(8)]);
        assert_eq!(report.zombies(), 2);
    }
}
