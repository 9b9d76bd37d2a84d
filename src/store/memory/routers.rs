//! Router operations: register, status, listing, fence, finish, and the
//! tombstones of deleted incarnations.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;
use parking_lot::Mutex;

use super::index::{RouterSlot, SessionIndex};
use super::store::MemoryStore;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, Session};
use crate::slices::{SLICE, drop_in_slices, due, free_off_worker, pause};
use crate::store::error::{FenceError, FinishError, RegisterError, RouterError};
use crate::store::report::{FenceSnapshot, FinishReport, RouterStatus};
use crate::store::rules::{FenceStep, check_finishable, fence_step};

impl<P> MemoryStore<P> {
    pub(super) fn register_router_now(
        &self,
        router: RouterId,
    ) -> Result<Incarnation, RegisterError> {
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

    pub(super) fn router_status_now(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(RouterError::UnknownRouter(router))?;
        let status = entry.lock().status;
        Ok(status)
    }

    pub(super) fn sessions_now(&self, router: RouterId) -> Result<Vec<Session<P>>, RouterError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(RouterError::UnknownRouter(router))?;
        let slot = entry.lock();
        Ok(slot.handles(|session| self.holds(session)))
    }

    pub(super) fn count_now(&self, router: RouterId) -> Result<usize, RouterError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(RouterError::UnknownRouter(router))?;
        let count = entry.lock().len();
        Ok(count)
    }

    /// Fences `router` (if `expected` is its live incarnation, or any with
    /// `None`) and snapshots its sessions. The fence is one critical
    /// section; the snapshot is built after it, in slices, from the index
    /// as the fence froze it (a fenced router's index is not written to).
    pub(super) async fn fence_in_slices(
        &self,
        router: RouterId,
        expected: Option<Incarnation>,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        let (mut snapshot, index, resumed_with_departed) = {
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
            let snapshot = FenceSnapshot {
                router,
                incarnation,
                newly_fenced,
                sessions: Vec::new(),
            };
            (snapshot, slot.index.share(), slot.departed > 0)
        };
        let mut sessions = Vec::with_capacity(index.len());
        for (step, session) in index.values().enumerate() {
            if due(step) {
                pause().await;
            }
            // Entries whose sessions had left the map at the fence (an
            // earlier run's confirmations) are not the router's any more,
            // once their close completed: one still releasing its resources
            // (its close won by a client whose release is slow, and a later
            // confirmation of it unlinked it) is listed, so that the run
            // waits for it (I1).
            if !resumed_with_departed || !session.is_close_complete() || self.holds(session) {
                sessions.push(session.clone());
            }
        }
        snapshot.sessions = sessions;
        Ok(snapshot)
    }

    /// Closes what is still open, removes the router's sessions from the
    /// map and tombstones the incarnation, in slices.
    ///
    /// Each step leaves the store consistent, so a `finish` dropped halfway
    /// is resumed by the next one: the closes (outside every lock: closing
    /// runs user resources), then the removals, a slice per critical
    /// section of the router's lock, each counted in `departed` as a
    /// confirmation's is, then the tombstone, one critical section.
    pub(super) async fn finish_in_slices(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError>
    where
        P: Send + Sync + 'static,
    {
        // Fenced: the index is frozen, and a clone of it can be walked
        // outside the lock.
        let (index, all_departed) = self.finishable_index(router, incarnation)?;
        let (mut closed, mut removed) = (0, 0);
        // Every session left the map already (each confirmed through the
        // store): nothing to close or remove.
        if !all_departed {
            for (step, session) in index.values().enumerate() {
                if due(step) {
                    pause().await;
                }
                if !session.is_closed() && session.close(CloseReason::Reclaimed).won() {
                    closed += 1;
                }
            }
            let mut entries = index.iter();
            for step in 0.. {
                let slice: Vec<_> = entries.by_ref().take(SLICE).collect();
                if slice.is_empty() {
                    break;
                }
                if step > 0 {
                    pause().await;
                }
                let entries = slice.iter().map(|&(&id, session)| (id, session));
                removed += self.unmap_fenced(router, incarnation, entries)?;
            }
        }
        drop(index);
        let index = {
            let entry = self
                .routers
                .get(&router)
                .ok_or(FinishError::UnknownRouter(router))?;
            let mut slot = entry.lock();
            check_finishable(router, incarnation, slot.status)?;
            slot.status = RouterStatus::Deleted(incarnation);
            slot.departed = 0;
            std::mem::take(&mut slot.index)
        };
        // Before the index is dropped: a `finish` dropped while it drops the
        // index has still recorded its tombstone.
        self.remember_tombstone(router, incarnation);
        // After the guards: the index may hold sessions' last handles.
        if let Some(mut index) = index.into_owned() {
            let panicked = drop_in_slices(index.drain()).await;
            crate::contain::log_drop_panics(panicked, "finish");
            let bytes = index
                .capacity()
                .saturating_mul(std::mem::size_of::<(SessionId, Session<P>)>());
            free_off_worker(index, bytes);
        }
        Ok(FinishReport {
            router,
            incarnation,
            removed,
            closed,
            unreadable: 0,
            foreign: 0,
        })
    }

    /// The index of `router`, which must be fenced in `incarnation`, and
    /// whether all its sessions left the map.
    fn finishable_index(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<(Arc<SessionIndex<P>>, bool), FinishError> {
        let entry = self
            .routers
            .get(&router)
            .ok_or(FinishError::UnknownRouter(router))?;
        let mut slot = entry.lock();
        check_finishable(router, incarnation, slot.status)?;
        Ok((slot.index.share(), slot.len() == 0))
    }

    /// Removes from the map the closed sessions of fenced `router` given,
    /// in their order, a slice per critical section of the router's lock;
    /// returns how many it removed. See `SessionStore::unlink_closed`.
    pub(super) async fn unlink_closed_in_slices(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<P>],
    ) -> Result<usize, FinishError> {
        let mut removed = 0;
        for (step, slice) in sessions.chunks(SLICE).enumerate() {
            if step > 0 {
                pause().await;
            }
            let closed = slice
                .iter()
                .filter(|session| {
                    session.router() == router
                        && session.incarnation() == incarnation
                        && session.is_closed()
                })
                .map(|session| (session.id(), session));
            removed += self.unmap_fenced(router, incarnation, closed)?;
        }
        Ok(removed)
    }

    /// Removes from the map the sessions of `entries` it still holds (this
    /// very session of each id), under the router's lock, counting them as
    /// departed; returns how many it removed.
    fn unmap_fenced<'a>(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        entries: impl Iterator<Item = (SessionId, &'a Session<P>)>,
    ) -> Result<usize, FinishError>
    where
        P: 'a,
    {
        let entry = self
            .routers
            .get(&router)
            .ok_or(FinishError::UnknownRouter(router))?;
        let mut slot = entry.lock();
        check_finishable(router, incarnation, slot.status)?;
        let mut removed = 0;
        for (id, indexed) in entries {
            // The map's copy drops here, under the lock: the caller holds
            // this very session, so it is not the last handle.
            if self
                .sessions
                .remove_if(&id, |_, stored| Session::ptr_eq(stored, indexed))
                .is_some()
            {
                removed += 1;
            }
        }
        slot.departed += removed;
        Ok(removed)
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
}
