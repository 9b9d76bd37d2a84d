//! Router holds: while a router is held (disconnected, in its grace
//! period), none of its sessions is convicted.
//!
//! # Deadlock safety
//!
//! `Shared::held` is a leaf lock: a `Reconciler` takes it under its own
//! `graces` lock, and nothing is taken under it.

use std::sync::Arc;

use super::{LivenessMonitor, Prober, Shared};
use crate::id::{Incarnation, RouterId};
use crate::store::SessionStore;

/// What a [`Reconciler`](crate::Reconciler) needs of a monitor, without its
/// type parameters. A hold names the incarnation whose grace period it
/// is: the sessions of a later life of the router (after a deletion, or a
/// restart) are judged by their own heartbeats.
pub(crate) trait RouterHold: Send + Sync + 'static {
    fn hold(&self, router: RouterId, incarnation: Incarnation);
    fn release(&self, router: RouterId, incarnation: Incarnation);
}

/// A router's holds: those of every incarnation
/// ([`LivenessMonitor::hold_router`]) and those of one (a reconciler's).
#[derive(Debug, Default)]
pub(super) struct RouterHolds {
    all: usize,
    lives: Vec<(Incarnation, usize)>,
}

impl RouterHolds {
    /// Whether a session of `incarnation` is held.
    pub(super) fn covers(&self, incarnation: Incarnation) -> bool {
        self.all > 0 || self.lives.iter().any(|&(held, _)| held == incarnation)
    }

    fn is_empty(&self) -> bool {
        self.all == 0 && self.lives.is_empty()
    }
}

impl<S: SessionStore, Pr: Prober> LivenessMonitor<S, Pr> {
    /// The monitor's holds, without keeping the monitor running: the
    /// reconciler's reference does not count as a handle.
    pub(crate) fn holds(&self) -> Arc<dyn RouterHold> {
        Arc::new(Holds(Arc::clone(&self.shared)))
    }
}

/// A monitor's holds, as a `Reconciler` keeps them: the shared state, not a
/// handle (dropping every handle still stops the monitor).
pub(super) struct Holds<S: SessionStore, Pr>(pub(super) Arc<Shared<S, Pr>>);

impl<S: SessionStore, Pr: Prober> Holds<S, Pr> {
    /// Adds (`+1`) or takes away (`-1`) one hold of `router`, of every
    /// incarnation (`None`) or of one; taking away one that is not there
    /// does nothing.
    pub(super) fn change(&self, router: RouterId, incarnation: Option<Incarnation>, add: bool) {
        let mut held = self.0.held.lock();
        let holds = held.entry(router).or_default();
        match incarnation {
            None if add => holds.all += 1,
            None => holds.all = holds.all.saturating_sub(1),
            Some(incarnation) => {
                let at = holds.lives.iter().position(|&(i, _)| i == incarnation);
                match (at, add) {
                    (Some(at), true) => holds.lives[at].1 += 1,
                    (None, true) => holds.lives.push((incarnation, 1)),
                    (Some(at), false) => {
                        holds.lives[at].1 -= 1;
                        if holds.lives[at].1 == 0 {
                            holds.lives.swap_remove(at);
                        }
                    }
                    (None, false) => {}
                }
            }
        }
        if holds.is_empty() {
            held.remove(&router);
        }
    }
}

impl<S: SessionStore, Pr: Prober> RouterHold for Holds<S, Pr> {
    fn hold(&self, router: RouterId, incarnation: Incarnation) {
        self.change(router, Some(incarnation), true);
    }

    fn release(&self, router: RouterId, incarnation: Incarnation) {
        self.change(router, Some(incarnation), false);
    }
}
