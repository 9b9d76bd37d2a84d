//! What a repair did: [`Repair`] and its [`RepairAction`].

use std::fmt;

use crate::id::{Incarnation, RouterId, SessionId};

/// One finding of an [`AuditReport`](crate::AuditReport) that
/// [`SessionStore::repair`](crate::SessionStore::repair) fixed.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, store::RepairAction, RouterId, SessionId,
///     SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let session =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let _ = session.close(CloseReason::ClientClosed); // left in the store
///
/// let findings = store.audit().await?;
/// let repairs = store.repair(&findings).await?;
/// let repair = repairs[0];
/// assert_eq!((repair.session, repair.router), (session.id(), router));
/// assert_eq!(repair.incarnation, incarnation);
/// assert_eq!(repair.action, RepairAction::ClosedRemoved);
/// assert!(store.audit().await?.is_clean());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Repair {
    /// The session concerned.
    pub session: SessionId,
    /// The router it names.
    pub router: RouterId,
    /// The router incarnation it names.
    pub incarnation: Incarnation,
    /// What was done.
    pub action: RepairAction,
}

impl Repair {
    /// A repair of `session` (of `router` in `incarnation`); for store
    /// implementations (the fields are public, the struct is
    /// `#[non_exhaustive]`).
    ///
    /// ```
    /// use session_lifecycle::store::{Repair, RepairAction};
    /// use session_lifecycle::{Incarnation, RouterId, SessionId};
    ///
    /// let repair = Repair::new(
    ///     SessionId::new(7),
    ///     RouterId::new(1),
    ///     Incarnation::new(3),
    ///     RepairAction::ClosedRemoved,
    /// );
    /// assert_eq!(repair.session, SessionId::new(7));
    /// ```
    #[must_use]
    pub const fn new(
        session: SessionId,
        router: RouterId,
        incarnation: Incarnation,
        action: RepairAction,
    ) -> Self {
        Self {
            session,
            router,
            incarnation,
            action,
        }
    }
}

/// What [`SessionStore::repair`](crate::SessionStore::repair) did about one
/// finding.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use session_lifecycle::{store::Repair, store::RepairAction};
///
/// /// Whether a repair points at a bug worth paging someone for.
/// fn alarming(repair: &Repair) -> bool {
///     match repair.action {
///         RepairAction::ClosedRemoved => false, // routine housekeeping
///         RepairAction::OrphanReclaimed => true,
///         _ => true, // the index and the map disagreed
///     }
/// }
///
/// assert_eq!(RepairAction::Reindexed.to_string(), "reindexed");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RepairAction {
    /// An open session of a live or fenced router was in the session map
    /// but missing from its router's index: it was indexed again.
    Reindexed,
    /// An open session of a live or fenced router was in its router's index
    /// but missing from the session map: it was put back in the map.
    Restored,
    /// An index entry whose session could not be restored (closed, or its
    /// id taken by another session) was dropped; the session was closed
    /// with [`CloseReason::Reclaimed`](crate::CloseReason::Reclaimed) if it
    /// was open.
    DroppedIndexEntry,
    /// An orphan (its router unknown, deleted, or in another incarnation)
    /// was closed with [`CloseReason::Reclaimed`](crate::CloseReason::Reclaimed)
    /// if still open, and removed.
    OrphanReclaimed,
    /// A closed session that lingered in the store was removed.
    ClosedRemoved,
    /// An unreadable key that was certainly dead (a record of a deleted or
    /// unknown router, with its pointer; a pointer with no record) was
    /// removed. Its session's incarnation is unknown (reported as 0).
    UnreadableRemoved,
}

impl RepairAction {
    /// A short snake-case name, as used in logs and metric labels.
    /// See the example on [`RepairAction`].
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Reindexed => "reindexed",
            Self::Restored => "restored",
            Self::DroppedIndexEntry => "dropped_index_entry",
            Self::OrphanReclaimed => "orphan_reclaimed",
            Self::ClosedRemoved => "closed_removed",
            Self::UnreadableRemoved => "unreadable_removed",
        }
    }
}

impl fmt::Display for RepairAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
