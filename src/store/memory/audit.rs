//! The audit (index against map, map against index), the census, and the
//! repairs of what an audit found.

use std::collections::HashMap;

use dashmap::mapref::entry::Entry;

use super::index::unindex;
use super::store::MemoryStore;
use crate::events::{Repair, RepairAction};
use crate::id::{RouterId, SessionId};
use crate::session::{CloseReason, Session, SessionState};
use crate::store::report::{AuditReport, RouterCensus, RouterStatus};

impl<P> MemoryStore<P> {
    pub(super) fn audit_now(&self) -> AuditReport {
        let mut report = AuditReport {
            routers: self.routers.len(),
            sessions: self.sessions.len(),
            ..AuditReport::default()
        };
        // Index → map, router by router under each router's lock.
        for entry in self.routers.iter() {
            let router = *entry.key();
            let slot = entry.value().lock();
            for (id, indexed) in slot.index.iter() {
                // A fenced router's closed entries wait for its `finish`.
                if slot.keeps_departed() && indexed.is_closed() && !self.holds(indexed) {
                    continue;
                }
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
                    report.closed_keys.push(session.key());
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

    pub(super) fn census_now(&self) -> Vec<RouterCensus> {
        let mut census = Vec::new();
        for entry in self.routers.iter() {
            let slot = entry.value().lock();
            if matches!(slot.status, RouterStatus::Deleted(_)) && slot.index.is_empty() {
                continue;
            }
            let mut counts = RouterCensus::new(*entry.key(), slot.status);
            // A fenced router's entries whose sessions left the store wait
            // for its `finish`: not counted (as in `len` and the listings).
            let departed = slot.departed > 0;
            for session in slot.index.values() {
                match session.state() {
                    SessionState::Closed if departed && !self.holds(session) => {}
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

    pub(super) fn repair_now(&self, findings: &AuditReport) -> Vec<Repair> {
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
        // By key when the findings carry keys: a session that reused the
        // id since is not this finding.
        let lives = findings.closed_lives();
        for (n, &id) in findings.closed_in_store.iter().enumerate() {
            let stored = match lives.and_then(|lives| lives.get(n)) {
                Some(&key) => self.get_exact(key),
                None => self.get_now(id),
            };
            if let Some(stored) = stored.filter(Session::is_closed) {
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
            drop(unindex(slot.index_mut(), &indexed));
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
                slot.index_mut().insert(id, stored.clone());
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
                (unindex(slot.index_mut(), session), unmap())
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
    pub(super) fn holds(&self, session: &Session<P>) -> bool {
        self.sessions
            .get(&session.id())
            .is_some_and(|stored| Session::ptr_eq(&stored, session))
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

#[cfg(test)]
mod tests {
    //! The audit must see each kind of corruption; these corrupt the store
    //! behind its API, which only code inside the module can do.

    use super::*;
    use crate::id::Incarnation;
    use crate::session::NewSession;

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
            .index_mut()
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
        futures::executor::block_on(crate::SessionStore::fence(&store, router)).unwrap();
        futures::executor::block_on(crate::SessionStore::finish(&store, router, incarnation))
            .unwrap();
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
