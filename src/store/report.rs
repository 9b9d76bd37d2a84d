//! Plain data returned by the store.

use std::fmt;

use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::Session;

/// A router's phase in the store, with the incarnation it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouterStatus {
    /// Registered; sessions may be created in this incarnation.
    Live(Incarnation),
    /// Its deletion has started; no session can be created.
    Fenced(Incarnation),
    /// This incarnation was deleted (a tombstone).
    Deleted(Incarnation),
}

impl RouterStatus {
    /// The incarnation the status applies to.
    #[must_use]
    pub const fn incarnation(self) -> Incarnation {
        match self {
            Self::Live(incarnation) | Self::Fenced(incarnation) | Self::Deleted(incarnation) => {
                incarnation
            }
        }
    }
}

/// What [`SessionStore::fence`](crate::SessionStore::fence) returns: the
/// fenced incarnation and the sessions the router held at the fence.
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
/// let _ = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
///
/// let snapshot = store.fence(router).await?;
/// assert!(snapshot.newly_fenced);
/// assert_eq!(snapshot.incarnation, incarnation);
/// for session in &snapshot.sessions {
///     let _ = session.begin_terminating(); // then notify the router
/// }
///
/// // Fencing again (an interrupted deletion resuming) takes a fresh snapshot.
/// let resumed = store.fence(router).await?;
/// assert!(!resumed.newly_fenced);
/// assert_eq!(resumed.sessions.len(), 1);
/// # Ok(())
/// # }
/// ```
#[non_exhaustive]
pub struct FenceSnapshot<P> {
    /// The router.
    pub router: RouterId,
    /// The fenced incarnation.
    pub incarnation: Incarnation,
    /// `true` if this call fenced the router, `false` if it was fenced
    /// already (an earlier deletion did not finish).
    pub newly_fenced: bool,
    /// The router's sessions at the fence, each once, in no particular
    /// order.
    pub sessions: Vec<Session<P>>,
}

impl<P> FenceSnapshot<P> {
    /// A snapshot of `router` fenced in `incarnation` with its `sessions`;
    /// for store implementations (the fields are public, the struct is
    /// `#[non_exhaustive]`).
    ///
    /// ```
    /// use session_lifecycle::store::FenceSnapshot;
    /// use session_lifecycle::{Incarnation, RouterId, Session};
    ///
    /// let snapshot: FenceSnapshot<()> =
    ///     FenceSnapshot::new(RouterId::new(1), Incarnation::new(3), true, Vec::<Session>::new());
    /// assert!(snapshot.newly_fenced && snapshot.sessions.is_empty());
    /// ```
    #[must_use]
    pub fn new(
        router: RouterId,
        incarnation: Incarnation,
        newly_fenced: bool,
        sessions: Vec<Session<P>>,
    ) -> Self {
        Self {
            router,
            incarnation,
            newly_fenced,
            sessions,
        }
    }
}

impl<P> fmt::Debug for FenceSnapshot<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceSnapshot")
            .field("router", &self.router)
            .field("incarnation", &self.incarnation)
            .field("newly_fenced", &self.newly_fenced)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

/// What [`SessionStore::finish`](crate::SessionStore::finish) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FinishReport {
    /// The router.
    pub router: RouterId,
    /// The incarnation now tombstoned.
    pub incarnation: Incarnation,
    /// Sessions removed from the store.
    pub removed: usize,
    /// Of those, sessions that were still open and that `finish` closed
    /// with [`CloseReason::Reclaimed`](crate::CloseReason::Reclaimed).
    pub closed: usize,
    /// Of those removed, records the store could not read (written by
    /// another record version or payload type): removed all the same,
    /// counted neither open nor closed. Always 0 for
    /// [`MemoryStore`](crate::MemoryStore).
    pub unreadable: usize,
    /// Keys in the router's range that are not the store's (another store
    /// nested under its prefix): left alone, not counted in `removed`.
    /// Always 0 for [`MemoryStore`](crate::MemoryStore).
    pub foreign: usize,
}

impl FinishReport {
    /// A report of `router`'s `incarnation` tombstoned, with every count 0;
    /// for store implementations, which set the counts (the fields are
    /// public, the struct is `#[non_exhaustive]`).
    ///
    /// ```
    /// use session_lifecycle::store::FinishReport;
    /// use session_lifecycle::{Incarnation, RouterId};
    ///
    /// let mut report = FinishReport::new(RouterId::new(1), Incarnation::new(3));
    /// report.removed = 2;
    /// report.closed = 1;
    /// assert_eq!((report.unreadable, report.foreign), (0, 0));
    /// ```
    #[must_use]
    pub const fn new(router: RouterId, incarnation: Incarnation) -> Self {
        Self {
            router,
            incarnation,
            removed: 0,
            closed: 0,
            unreadable: 0,
            foreign: 0,
        }
    }
}

/// What [`SessionStore::audit`](crate::SessionStore::audit) found.
///
/// An audit walks the store while it keeps serving; each finding was
/// re-checked under the router's lock, so it was true at some instant, but
/// the report is not one consistent cut of the whole store.
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
/// // Closed through its handle: still in the store.
/// let _ = session.close(CloseReason::ClientClosed);
///
/// let report = store.audit().await?;
/// assert_eq!((report.routers, report.sessions), (1, 1));
/// assert_eq!(report.closed_in_store, vec![session.id()]);
/// assert!(report.is_consistent() && !report.is_clean());
/// assert_eq!(report.zombies(), 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct AuditReport {
    /// Routers the store knows, tombstones included.
    pub routers: usize,
    /// Sessions in the session map.
    pub sessions: usize,
    /// Index entries with no matching session in the map (I7 broken).
    pub missing_from_map: Vec<(RouterId, SessionId)>,
    /// Sessions in the map missing from their router's index (I7 broken).
    pub missing_from_index: Vec<SessionId>,
    /// Sessions whose router is unknown, deleted, or in another incarnation:
    /// zombies.
    pub orphans: Vec<SessionId>,
    /// Closed sessions still in the store: closed through their handle and
    /// not removed yet. Not a fault by itself (a deletion removes them), but
    /// they hold memory until removed.
    pub closed_in_store: Vec<SessionId>,
    /// The keys of `closed_in_store`, in its order, from a store that
    /// knows them ([`MemoryStore`](crate::MemoryStore), and `EtcdStore`:
    /// the generation of a record's handle); empty otherwise.
    /// With them the sweeper and the repair act on that very life of each
    /// id, never on a session that reused it since (I9).
    pub(crate) closed_keys: Vec<SessionKey>,
    /// Keys of a remote store holding values it cannot read (written by
    /// another record version or payload type, or by hand): data the store
    /// cannot account for (I7 unproven). [`repair`](crate::SessionStore::repair)
    /// removes those that are certainly dead; a router's deletion removes
    /// its own. Always empty for [`MemoryStore`](crate::MemoryStore).
    pub unreadable: Vec<String>,
    /// Keys under a remote store's prefix that are not in its key format
    /// (another store's prefix may nest inside this one's): reported only,
    /// never touched, not a fault of this store. Always empty for
    /// [`MemoryStore`](crate::MemoryStore).
    pub foreign: Vec<String>,
}

impl AuditReport {
    /// The keys of `closed_in_store`, in its order, if the store gave one
    /// for each (the sweeper and the repairs go by key then, by id
    /// otherwise).
    pub(crate) fn closed_lives(&self) -> Option<&[SessionKey]> {
        let keyed = self.closed_keys.len() == self.closed_in_store.len()
            && self
                .closed_keys
                .iter()
                .zip(&self.closed_in_store)
                .all(|(key, &id)| key.id() == id);
        keyed.then_some(self.closed_keys.as_slice())
    }
}

/// Compares the public fields only: the keys a store adds for the sweeper
/// are not part of what the report says.
impl PartialEq for AuditReport {
    fn eq(&self, other: &Self) -> bool {
        self.routers == other.routers
            && self.sessions == other.sessions
            && self.missing_from_map == other.missing_from_map
            && self.missing_from_index == other.missing_from_index
            && self.orphans == other.orphans
            && self.closed_in_store == other.closed_in_store
            && self.unreadable == other.unreadable
            && self.foreign == other.foreign
    }
}

impl Eq for AuditReport {}

impl fmt::Debug for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditReport")
            .field("routers", &self.routers)
            .field("sessions", &self.sessions)
            .field("missing_from_map", &self.missing_from_map)
            .field("missing_from_index", &self.missing_from_index)
            .field("orphans", &self.orphans)
            .field("closed_in_store", &self.closed_in_store)
            .field("unreadable", &self.unreadable)
            .field("foreign", &self.foreign)
            .finish()
    }
}

impl AuditReport {
    /// `true` when the index and map agree, there are no orphans and no
    /// unreadable keys (foreign keys are not this store's). See the example on [`AuditReport`].
    #[must_use]
    pub fn is_consistent(&self) -> bool {
        self.missing_from_map.is_empty()
            && self.missing_from_index.is_empty()
            && self.orphans.is_empty()
            && self.unreadable.is_empty()
    }

    /// `true` when consistent and no closed session lingers in the store.
    /// See the example on [`AuditReport`].
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.is_consistent() && self.closed_in_store.is_empty()
    }

    /// The number of zombie sessions: orphans of a deleted or unknown router.
    #[must_use]
    pub fn zombies(&self) -> usize {
        self.orphans.len()
    }
}

/// One router's sessions by state, from
/// [`SessionStore::census`](crate::SessionStore::census).
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     MemoryStore, NewSession, RouterId, store::RouterStatus, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// for id in 1..=3 {
///     let _ =
///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
/// let _ = store.fence(router).await?.sessions[0].begin_terminating();
///
/// let census = store.census().await?;
/// let entry = &census[0];
/// assert_eq!(entry.status, RouterStatus::Fenced(incarnation));
/// assert_eq!((entry.active, entry.terminating, entry.closed), (2, 1, 0));
/// assert_eq!(entry.sessions(), 3);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterCensus {
    /// The router.
    pub router: RouterId,
    /// Its phase and incarnation.
    pub status: RouterStatus,
    /// Its sessions in the store that are `Active`.
    pub active: usize,
    /// Its sessions in the store that are `Terminating`.
    pub terminating: usize,
    /// Its sessions still in the store though `Closed` (closed through
    /// their handle, not removed yet).
    pub closed: usize,
}

impl RouterCensus {
    /// A census entry with no session; for store implementations.
    /// See the example on [`RouterCensus`].
    #[must_use]
    pub const fn new(router: RouterId, status: RouterStatus) -> Self {
        Self {
            router,
            status,
            active: 0,
            terminating: 0,
            closed: 0,
        }
    }

    /// All of the router's sessions in the store. See the example on [`RouterCensus`].
    #[must_use]
    pub const fn sessions(&self) -> usize {
        self.active + self.terminating + self.closed
    }
}
