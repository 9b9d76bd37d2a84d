//! Router holds: while a router is held (disconnected, in its grace
//! period), none of its sessions is convicted.
//!
//! # Deadlock safety
//!
//! `Shared::held` is a leaf lock: a `Reconciler` takes it under its own
//! `graces` lock, and nothing is taken under it.

use std::sync::Arc;

use super::{LivenessMonitor, Prober, Shared};
use crate::id::RouterId;
use crate::store::SessionStore;

/// What a [`Reconciler`](crate::Reconciler) needs of a monitor, without its
/// type parameters.
pub(crate) trait RouterHold: Send + Sync + 'static {
    fn hold(&self, router: RouterId);
    fn release(&self, router: RouterId);
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

impl<S: SessionStore, Pr: Prober> RouterHold for Holds<S, Pr> {
    fn hold(&self, router: RouterId) {
        *self.0.held.lock().entry(router).or_default() += 1;
    }

    fn release(&self, router: RouterId) {
        let mut held = self.0.held.lock();
        if let Some(holds) = held.get_mut(&router) {
            *holds = holds.saturating_sub(1);
            if *holds == 0 {
                held.remove(&router);
            }
        }
    }
}
