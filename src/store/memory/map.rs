//! The session map: every session of the store by id, in shards that each
//! sit under their own lock.
//!
//! A dashmap does the same for the routers' entries; the sessions have a
//! map of their own for one operation dashmap offers only through its
//! unstable raw API: removing many sessions (a slice of a deleted router's)
//! under one lock per shard. Removals under one lock run back to back with
//! no atomic operation between them, so the processor overlaps their cache
//! misses; one lock per removal (an atomic read-modify-write, a full
//! barrier) makes each wait for the one before.
//!
//! # Invariants
//!
//! - A session id lives in the shard its hash picks, always the same one:
//!   bits 57 down of the hash, under the 7 the shard's own table uses as
//!   tags (as dashmap does).
//!
//! # Deadlock safety
//!
//! One lock per shard; a caller holds at most one shard's at a time (the
//! batch removal takes them one after another). What a method removes is
//! handed back to the caller, to drop after its guards, except in
//! [`SessionMap::remove_these`], whose caller holds every session it
//! removes (so no drop there is a session's last). No user code runs
//! under a shard's lock: the store's lock order is written in `store.rs`.

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use parking_lot::{RwLock, RwLockWriteGuard};

use super::builder::MAX_SHARDS;
use crate::id::SessionId;
use crate::session::Session;

/// One shard's table.
pub(super) type Table<P> = HashMap<SessionId, Session<P>, RandomState>;

/// A shard on cache lines of its own: two threads working in two shards
/// never write to one line.
#[repr(align(128))]
struct Shard<P>(RwLock<Table<P>>);

/// Sessions by id, sharded.
pub(super) struct SessionMap<P> {
    shards: Box<[Shard<P>]>,
    /// The hash's right shift that leaves a shard's number.
    shift: u32,
    hasher: RandomState,
}

impl<P> SessionMap<P> {
    /// A map of `shards` shards (rounded up to a power of two, at least 2),
    /// or of dashmap's default with `None`: four per thread of the machine.
    pub(super) fn new(shards: Option<usize>) -> Self {
        let shards = shards
            .unwrap_or_else(default_shards)
            .clamp(2, MAX_SHARDS)
            .next_power_of_two();
        let hasher = RandomState::default();
        Self {
            shards: (0..shards)
                .map(|_| Shard(RwLock::new(HashMap::with_hasher(hasher.clone()))))
                .collect(),
            shift: u64::BITS - shards.trailing_zeros(),
            hasher,
        }
    }

    fn shard_of(&self, id: SessionId) -> usize {
        let hash = self.hasher.hash_one(id);
        // Lossless: the shift leaves fewer bits than the shard count has.
        #[allow(clippy::cast_possible_truncation)]
        let shard = ((hash << 7) >> self.shift) as usize;
        shard
    }

    fn table(&self, id: SessionId) -> &RwLock<Table<P>> {
        // In range: `shard_of` is below the (power of two) shard count.
        &self.shards[self.shard_of(id) & (self.shards.len() - 1)].0
    }

    /// The number of sessions (each shard read in turn: not a snapshot).
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.0.read().len()).sum()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.shards.iter().all(|shard| shard.0.read().is_empty())
    }

    /// A handle of the session `id`.
    #[inline]
    pub(super) fn get(&self, id: SessionId) -> Option<Session<P>> {
        self.table(id).read().get(&id).cloned()
    }

    /// A handle of the session `id`, if `keep` says so.
    #[inline]
    pub(super) fn get_if(
        &self,
        id: SessionId,
        keep: impl FnOnce(&Session<P>) -> bool,
    ) -> Option<Session<P>> {
        self.table(id)
            .read()
            .get(&id)
            .filter(|stored| keep(stored))
            .cloned()
    }

    /// Whether the map holds this very session.
    #[inline]
    pub(super) fn holds(&self, session: &Session<P>) -> bool {
        self.table(session.id())
            .read()
            .get(&session.id())
            .is_some_and(|stored| Session::ptr_eq(stored, session))
    }

    /// The shard of `id`, locked for writing: for an insert that checks
    /// first (its `entry`).
    pub(super) fn write(&self, id: SessionId) -> RwLockWriteGuard<'_, Table<P>> {
        self.table(id).write()
    }

    /// Removes this very session; what it removed, to drop after the
    /// caller's guards.
    #[inline]
    pub(super) fn remove_exact(&self, session: &Session<P>) -> Option<Session<P>> {
        let mut table = self.table(session.id()).write();
        take_exact(&mut table, session)
    }

    /// Removes whatever session `id` names; what it removed.
    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn remove(&self, id: SessionId) -> Option<Session<P>> {
        self.table(id).write().remove(&id)
    }

    /// Puts `session` in, in place of whatever held its id; what it
    /// replaced.
    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn insert(&self, session: Session<P>) -> Option<Session<P>> {
        let id = session.id();
        self.table(id).write().insert(id, session)
    }

    /// Removes each of `sessions` the map holds (this very session of its
    /// id), one lock per shard; returns how many it removed. The caller
    /// holds every one of them: the map's copies drop here, none a
    /// session's last handle.
    pub(super) fn remove_these<'a>(&self, sessions: impl Iterator<Item = &'a Session<P>>) -> usize
    where
        P: 'a,
    {
        // Grouped by shard with a counting sort: a slice's sessions, then
        // each shard's in turn under its lock.
        let mut keyed: Vec<(usize, &Session<P>)> = sessions
            .map(|session| (self.shard_of(session.id()), session))
            .collect();
        let mut starts = vec![0usize; self.shards.len() + 1];
        for &(shard, _) in &keyed {
            starts[shard + 1] += 1;
        }
        for shard in 1..starts.len() {
            starts[shard] += starts[shard - 1];
        }
        let mut grouped: Vec<Option<&Session<P>>> = vec![None; keyed.len()];
        let mut next = starts.clone();
        for (shard, session) in keyed.drain(..) {
            grouped[next[shard]] = Some(session);
            next[shard] += 1;
        }
        let mut removed = Vec::with_capacity(grouped.len());
        for (shard, bounds) in starts.windows(2).enumerate() {
            let [from, to] = [bounds[0], bounds[1]];
            if from == to {
                continue;
            }
            let mut table = self.shards[shard].0.write();
            removed.extend(
                grouped[from..to]
                    .iter()
                    .flatten()
                    .filter_map(|session| take_exact(&mut table, session)),
            );
        }
        // After the shard locks, so that the finds above ran back to back:
        // not the last handles (the caller holds each session).
        let count = removed.len();
        drop(removed);
        count
    }

    /// Handles of every session, a shard at a time (not a snapshot): for
    /// the audit, which must not take a router's lock under a shard's.
    pub(super) fn handles(&self) -> Vec<Session<P>> {
        let mut handles = Vec::new();
        for shard in &*self.shards {
            handles.extend(shard.0.read().values().cloned());
        }
        handles
    }

    /// Gives each shard's spare capacity back, one shard at a time.
    pub(super) fn shrink_to_fit(&self) {
        for shard in &*self.shards {
            shard.0.write().shrink_to_fit();
        }
    }
}

/// Takes this very session out of `table`. A look-up, then the removal
/// (on a line the look-up just read): `HashMap::entry` would make room for
/// an id it does not find, and may grow the table on a removal.
#[inline]
fn take_exact<P>(table: &mut Table<P>, session: &Session<P>) -> Option<Session<P>> {
    let id = session.id();
    if table
        .get(&id)
        .is_some_and(|stored| Session::ptr_eq(stored, session))
    {
        table.remove(&id)
    } else {
        None
    }
}

/// Dashmap's default: four shards per thread of the machine, a power of
/// two.
fn default_shards() -> usize {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    (threads * 4).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::SessionMap;
    use crate::id::{Incarnation, RouterId, SessionId};
    use crate::session::{NewSession, Session};

    fn session(id: u64) -> Session {
        NewSession::new(SessionId::new(id), RouterId::new(1), Incarnation::new(1)).into_session()
    }

    #[test]
    fn a_batch_removal_takes_only_the_very_sessions_given() {
        let map = SessionMap::new(Some(4));
        let sessions: Vec<Session> = (0..1_000).map(session).collect();
        for session in &sessions {
            assert!(map.insert(session.clone()).is_none());
        }
        // Id 3 now names another session: the batch's id-3 handle is stale.
        let reused = session(3);
        let _ = map.insert(reused.clone());
        let removed = map.remove_these(sessions.iter().filter(|s| s.id().get() % 3 == 0));
        assert_eq!(removed, 333, "334 given, one of them replaced");
        assert_eq!(map.len(), 1_000 - 333);
        assert!(map.holds(&reused));
        for session in &sessions {
            let gone = session.id().get() % 3 == 0;
            assert_eq!(map.holds(session), !gone);
        }
        // Again: nothing left to remove.
        assert_eq!(
            map.remove_these(sessions.iter().filter(|s| s.id().get() % 3 == 0)),
            0
        );
        assert_eq!(map.handles().len(), map.len());
    }

    #[test]
    fn every_shard_is_used_and_an_id_stays_in_its_shard() {
        let map = SessionMap::<()>::new(Some(8));
        let mut seen = [0usize; 8];
        for id in 0..4_096 {
            let shard = map.shard_of(SessionId::new(id));
            assert_eq!(shard, map.shard_of(SessionId::new(id)));
            seen[shard] += 1;
        }
        assert!(seen.iter().all(|&n| n > 300), "{seen:?}");
    }
}
