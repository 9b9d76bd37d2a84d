//! The in-memory store's type and its [`SessionStore`] implementation.
//!
//! # Invariants
//!
//! - Under a router's entry lock, the router's index and the session map's
//!   sessions of that router agree exactly: a session is inserted into both,
//!   and removed from both, inside one critical section of that lock. One
//!   exception, a fenced router: a session removed from the map keeps its
//!   index entry (counted in `departed`) until `finish` drops the whole
//!   index, so a deletion's confirmations skip the index work; its count
//!   and listings leave such entries out, and the audit does not report
//!   them.
//! - A router's index is owned while the router is live (creates and
//!   closes touch no atomic for it) and shared (`Arc`, copied on write)
//!   from its fence on: a fence takes a clone under the lock and builds its
//!   snapshot from it after, in slices. A fenced index is not written to (creates are refused, a
//!   removal only counts `departed`), so that clone is the index as the
//!   fence left it; an audit repair that does write copies it first.
//! - `finish` works in steps that each leave the store consistent, so that
//!   a `finish` dropped halfway is resumed by the next: close what is open
//!   (outside every lock), remove the sessions from the map a slice per
//!   critical section (counted in `departed`, as confirmations are), then
//!   tombstone the incarnation in one critical section; the index it took
//!   is dropped after, a slice at a time.
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
//! Two things stay under 3 and 4, inside tokio, when `create` publishes
//! `SessionCreated` to a bus someone listens to (publishing after the
//! guards would break the promise that `SessionCreated` comes before
//! anybody can see the session):
//!
//! - tokio's channel wakes the subscriptions waiting in `recv` inside the
//!   send: their wakers run there. A task's waker (tokio's, `futures`'
//!   executors') only schedules the task; a hand-written waker must not
//!   call back into the store from `wake`;
//! - publishing into a full ring drops the oldest event a lagging
//!   subscriber has not read. If that is the last clone of a `ProbeFailed`
//!   or `Reclaim*` event, the `Drop` of the error your prober or reclaim
//!   task returned runs there; such an error's `Drop` must not call back
//!   into the store.
//!
//! Iterating `sessions` (shard guards held) never takes a router lock: the
//! audit copies the handles out first, and `repair` looks each session up
//! on its own before it takes the session's router lock. No guard lives
//! across an `.await`; the async trait methods only wrap the synchronous
//! ones.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::AtomicU64;

use dashmap::DashMap;
use foldhash::fast::RandomState;
use parking_lot::Mutex;

use super::hash::BlockHash;
use super::index::RouterEntry;
use crate::events::EventBus;
use crate::events::Repair;
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session};
use crate::store::SessionStore;
use crate::store::error::{
    BackendError, CreateError, FenceError, FinishError, RegisterError, RouterError, SessionError,
};
use crate::store::report::{AuditReport, FenceSnapshot, FinishReport, RouterCensus, RouterStatus};

/// The default [`SessionStore`]: sessions in memory, in one process.
///
/// Sessions live in a sharded map (dashmap); each router has an entry under
/// its own small lock holding its phase, incarnation and session index, so
/// creating a session on one router never waits for another router.
/// Deleted incarnations are remembered as tombstones, bounded in number by
/// [`MemoryStoreBuilder::tombstone_capacity`](super::MemoryStoreBuilder::tombstone_capacity);
/// when one is evicted, the router id becomes unknown again, and creates
/// against the old incarnation are still refused because incarnations never
/// repeat.
///
/// The session map hashes ids so that ids differing only in their lowest
/// three bits share one shard and one run of eight buckets (blocks of ids
/// are scattered by `foldhash`'s mix with random keys). Controllers that
/// number sessions with a counter therefore keep a router's sessions
/// together in the map, and deleting a small router from a store of
/// millions costs about what it costs alone; ids drawn at random hash as
/// well as with `foldhash`.
///
/// Every method of [`SessionStore`] resolves without waiting. `fence` and
/// `finish` of a router of more than 4,096 sessions yield to the tokio
/// runtime between slices of 4,096 (each yield is `Pending` once, woken at
/// once), so that a million-session router never holds a worker for long;
/// outside a tokio runtime they resolve at the first poll whatever the size.
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
    pub(super) sessions: DashMap<SessionId, Session<P>, BlockHash>,
    pub(super) routers: DashMap<RouterId, RouterEntry<P>, RandomState>,
    pub(super) next_incarnation: AtomicU64,
    pub(super) tombstones: Mutex<VecDeque<(RouterId, Incarnation)>>,
    pub(super) tombstone_capacity: usize,
    pub(super) events: Option<EventBus>,
    /// [`Fault::SkipFence`] injected (test-util only).
    #[cfg(any(test, feature = "test-util"))]
    pub(super) skip_fence: std::sync::atomic::AtomicBool,
}

impl<P> Default for MemoryStore<P> {
    fn default() -> Self {
        MemoryStore::builder().build_with(None)
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
    /// A store with default settings, for sessions without payload. With a
    /// payload type `P`: `MemoryStore::<P>::default()`, or
    /// [`MemoryStore::builder`] and `build::<P>()`.
    ///
    /// ```
    /// use session_lifecycle::MemoryStore;
    ///
    /// struct Client {
    ///     name: String,
    /// }
    /// let plain = MemoryStore::new();
    /// let with_payload = MemoryStore::<Client>::default();
    /// # let _ = (plain, with_payload);
    /// ```
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<P> MemoryStore<P> {
    /// The number of sessions in the store.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// `true` when the store holds no session.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Gives memory back to the allocator after many sessions were removed.
    ///
    /// Router indexes shrink by themselves as they empty; the session map
    /// keeps its capacity until this is called. It locks each shard of the
    /// map in turn, so call it off the hot path (after a large deletion).
    pub fn shrink_to_fit(&self) {
        self.sessions.shrink_to_fit();
    }

    /// The number of routers the store knows, tombstones included.
    #[must_use]
    pub fn router_count(&self) -> usize {
        self.routers.len()
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
        self.fence_in_slices(router, None).await
    }

    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        self.fence_in_slices(router, Some(incarnation)).await
    }

    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.finish_in_slices(router, incarnation).await
    }

    async fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<P>],
    ) -> Result<usize, FinishError> {
        self.unlink_closed_in_slices(router, incarnation, sessions)
            .await
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
