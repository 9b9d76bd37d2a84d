//! A router's entry in the store: its status and its session index.

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::RandomState;
use parking_lot::Mutex;

use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::Session;
use crate::store::error::CreateErrorKind;
use crate::store::report::RouterStatus;
use crate::store::rules::{admits, holds};

/// A router's entry: everything "check the fence + add to the index" reads
/// and writes, under one lock.
pub(super) type RouterEntry<P> = Mutex<RouterSlot<P>>;

pub(super) struct RouterSlot<P> {
    pub(super) status: RouterStatus,
    /// The router's sessions, as handles: listing or fencing a router reads
    /// only this, never the session map.
    ///
    /// A fenced router's entries stay when their sessions leave the map
    /// (closed, so removed): its `finish` drops the whole index, so a
    /// deletion's confirmations skip the index work. `departed` counts
    /// them; listings and the count leave them out.
    ///
    /// Owned while the router is live; shared once fenced: a fence hands
    /// out a clone of the `Arc` (the index as it froze it, for a snapshot
    /// built outside the lock in slices), and a fenced router's index is
    /// not written to again (an audit repair that does copies it first).
    pub(super) index: IndexCell<P>,
    /// Entries of this fenced router's index whose sessions left the map.
    pub(super) departed: usize,
}

pub(super) type SessionIndex<P> = HashMap<SessionId, Session<P>, RandomState>;

/// A router's index: owned (creates and closes write to it with no atomic
/// operation), or shared with fence snapshots (copied on write).
pub(super) enum IndexCell<P> {
    Owned(SessionIndex<P>),
    Shared(Arc<SessionIndex<P>>),
}

impl<P> Default for IndexCell<P> {
    fn default() -> Self {
        Self::Owned(HashMap::default())
    }
}

impl<P> std::ops::Deref for IndexCell<P> {
    type Target = SessionIndex<P>;

    fn deref(&self) -> &SessionIndex<P> {
        match self {
            Self::Owned(index) => index,
            Self::Shared(index) => index,
        }
    }
}

impl<P> IndexCell<P> {
    /// The index, to write to: a copy if a snapshot still shares it.
    pub(super) fn get_mut(&mut self) -> &mut SessionIndex<P> {
        match self {
            Self::Owned(index) => index,
            Self::Shared(index) => Arc::make_mut(index),
        }
    }

    /// The index as it is now, shared from here on.
    pub(super) fn share(&mut self) -> Arc<SessionIndex<P>> {
        let shared = match std::mem::take(self) {
            Self::Owned(index) => Arc::new(index),
            Self::Shared(index) => index,
        };
        *self = Self::Shared(Arc::clone(&shared));
        shared
    }

    /// The index itself, unless a snapshot still shares it.
    pub(super) fn into_owned(self) -> Option<SessionIndex<P>> {
        match self {
            Self::Owned(index) => Some(index),
            Self::Shared(index) => Arc::try_unwrap(index).ok(),
        }
    }
}

/// Removes `session`'s entry from `index` if it is this very session (a
/// later session reusing the id keeps its entry); returns what it removed,
/// for the caller to drop after its guards.
#[inline]
pub(super) fn unindex<P>(index: &mut SessionIndex<P>, session: &Session<P>) -> Option<Session<P>> {
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
pub(super) fn handles<P>(index: &SessionIndex<P>) -> Vec<Session<P>> {
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
    pub(super) fn live(incarnation: Incarnation) -> Self {
        Self {
            status: RouterStatus::Live(incarnation),
            index: IndexCell::default(),
            departed: 0,
        }
    }

    /// The index, to write to: a copy if a fence snapshot still shares it
    /// (only an audit repair writes to a fenced router's index).
    pub(super) fn index_mut(&mut self) -> &mut SessionIndex<P> {
        self.index.get_mut()
    }

    /// Whether entries whose sessions left the map may still be indexed.
    pub(super) fn keeps_departed(&self) -> bool {
        matches!(self.status, RouterStatus::Fenced(_))
    }

    /// How many sessions of the index are in the store.
    pub(super) fn len(&self) -> usize {
        self.index.len().saturating_sub(self.departed)
    }

    /// Handles of the sessions of the index that are in the store, `held`
    /// telling for a fenced router's entries (closed ones may have left);
    /// call with the router's lock held.
    pub(super) fn handles(&self, held: impl Fn(&Session<P>) -> bool) -> Vec<Session<P>> {
        if self.departed == 0 {
            return handles(&self.index);
        }
        if self.len() == 0 {
            return Vec::new();
        }
        self.index
            .values()
            .filter(|session| !session.is_closed() || held(session))
            .cloned()
            .collect()
    }

    /// Whether a session may be created in `requested`.
    pub(super) fn admits(
        &self,
        router: RouterId,
        requested: Incarnation,
    ) -> Result<(), CreateErrorKind> {
        admits(self.status, router, requested)
    }

    /// Whether a stored session of `incarnation` belongs here: the router is
    /// live or fenced in that very incarnation.
    pub(super) fn status_holds(&self, incarnation: Incarnation) -> bool {
        holds(self.status, incarnation)
    }
}
