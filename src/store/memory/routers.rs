//! Router operations: register, status, listing, fence, finish, and the
//! tombstones of deleted incarnations.

use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;
use parking_lot::Mutex;

use super::index::RouterSlot;
use super::store::MemoryStore;
use crate::id::{Incarnation, RouterId};
use crate::session::{CloseReason, Session};
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

    pub(super) fn fence_now(
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
            sessions: slot.handles(|session| self.holds(session)),
        })
    }

    pub(super) fn finish_now(
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
            slot.handles(|session| self.holds(session))
        };
        let closed = open
            .iter()
            .filter(|session| session.close(CloseReason::Reclaimed).won())
            .count();
        // The handles come out of the lock and drop after it: dropping the
        // last handle of a session runs its payload's `Drop`, user code.
        let (index, removed) = {
            let entry = self
                .routers
                .get(&router)
                .ok_or(FinishError::UnknownRouter(router))?;
            let mut slot = entry.lock();
            check_finishable(router, incarnation, slot.status)?;
            slot.status = RouterStatus::Deleted(incarnation);
            let index = std::mem::take(&mut slot.index);
            let departed = std::mem::take(&mut slot.departed);
            // The map's copies drop here, under the lock: `index` holds
            // these very sessions, so none is the last handle. Nothing to
            // look up when every entry's session has left the map already
            // (every session confirmed through the store).
            let removed = if departed >= index.len() {
                0
            } else {
                index
                    .iter()
                    .filter(|(id, indexed)| {
                        self.sessions
                            .remove_if(id, |_, stored| Session::ptr_eq(stored, indexed))
                            .is_some()
                    })
                    .count()
            };
            (index, removed)
        };
        // After the guards: the index may hold sessions' last handles.
        drop(index);
        self.remember_tombstone(router, incarnation);
        Ok(FinishReport {
            router,
            incarnation,
            removed,
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
}
