//! [`Reconciler`]: its state, its configuration, and the close that the
//! reconciliation and the grace expiry share.
//!
//! # Invariants
//!
//! - Reconciliation, grace expiry and reaping close only `Active` sessions of
//!   the router's live incarnation (a compare-exchange from `Active`), and
//!   re-check that the router is live right before each chunk: a session
//!   its deletion marked `Terminating` is the deletion's alone.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use tokio::time::Duration;
use tokio_util::task::TaskTracker;

use super::grace::Grace;
use crate::closing::{close_all, remove_all};
use crate::events::EventBus;
use crate::id::{RouterId, SessionId, SessionKey};
use crate::liveness::RouterHold;
use crate::reclaim::ReclaimQueue;
use crate::session::{CloseFrom, CloseReason, Session};
use crate::store::SessionStore;

/// Reconciles what routers report against the store, and gives
/// disconnected routers a grace period.
///
/// - [`reconcile`](Self::reconcile): a router (re)connected and reported
///   the sessions it holds. The outcome lists what the router should drop
///   (sessions the controller does not know, has closed, or that belong to
///   another router or incarnation), and the sessions the router no longer
///   holds are closed on the controller
///   ([`CloseReason::Reclaimed`]) and removed. Reports of any size are
///   handled in chunks, with no lock held across chunks.
/// - [`reconcile_adopting`](Self::reconcile_adopting): the same, for a
///   controller that restarted and lost its sessions (restart adoption):
///   the reported sessions the store does not know are offered to your
///   [`Adopter`](super::Adopter), and those it accepts are created in the
///   store under the router's current incarnation instead of being
///   dropped.
/// - [`router_disconnected`](Self::router_disconnected): starts the
///   router's grace period. A reconciliation within it cancels it; at its
///   expiry the router's sessions are closed ([`CloseReason::RouterLost`])
///   and removed, and the router itself stays registered. A router whose
///   deletion starts meanwhile is left to the deleter.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// for id in 1..=3 {
///     store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
///
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
/// // The router reconnects holding sessions 1, 2 and 9: 9 is unknown, 3 is gone.
/// let ids = [1, 2, 9].map(SessionId::new);
/// let report = reconciler.reconcile(router, incarnation, ids).await?;
/// assert_eq!(report.drop, vec![SessionId::new(9)]);
/// assert_eq!(report.closed, vec![SessionId::new(3)]);
/// assert_eq!(store.len(), 2);
/// # Ok(())
/// # }
/// ```
pub struct Reconciler<S> {
    pub(super) inner: Arc<Inner<S>>,
}

pub(super) struct Inner<S> {
    pub(super) store: Arc<S>,
    pub(super) config: Config,
    pub(super) graces: Mutex<HashMap<RouterId, Grace>>,
    pub(super) epochs: AtomicU64,
    pub(super) tracker: TaskTracker,
}

#[derive(Clone)]
pub(super) struct Config {
    pub(super) grace: Duration,
    pub(super) chunk: usize,
    pub(super) spare_younger_than: Duration,
    pub(super) adopt_timeout: Duration,
    pub(super) adopt_concurrency: usize,
    pub(super) reclaim: Option<ReclaimQueue>,
    pub(super) events: Option<EventBus>,
    pub(super) liveness: Option<Arc<dyn RouterHold>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("grace", &self.grace)
            .field("chunk", &self.chunk)
            .field("spare_younger_than", &self.spare_younger_than)
            .field("adopt_timeout", &self.adopt_timeout)
            .field("adopt_concurrency", &self.adopt_concurrency)
            .field("reclaim", &self.reclaim.is_some())
            .field("events", &self.events.is_some())
            .field("liveness", &self.liveness.is_some())
            .finish()
    }
}

impl<S> Clone for Reconciler<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: SessionStore> fmt::Debug for Reconciler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.inner.config)
            .field("in_grace", &self.in_grace())
            .finish_non_exhaustive()
    }
}

impl<S: SessionStore> Reconciler<S> {
    /// The store it works on.
    #[must_use]
    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    /// Closes the open sessions of `sessions` (resources through the reclaim
    /// queue if there is one) and removes them from the store; returns the
    /// ids this call closed.
    pub(super) async fn close_and_remove(
        &self,
        sessions: &[Session<S::Payload>],
        reason: CloseReason,
    ) -> Vec<SessionId> {
        let closed = self.close_only(sessions, reason).await;
        remove_all(&*self.inner.store, &closed).await;
        closed.into_iter().map(SessionKey::id).collect()
    }

    /// The first half of [`close_and_remove`](Self::close_and_remove): the
    /// closes, not the removals (the store's calls: user code a grace
    /// expiry runs after its chunk's lock). Returns the keys this call
    /// closed.
    pub(super) async fn close_only(
        &self,
        sessions: &[Session<S::Payload>],
        reason: CloseReason,
    ) -> Vec<SessionKey> {
        // Only `Active` sessions: one its router's deletion marked meanwhile
        // is the deletion's alone.
        let closed = close_all(
            self.inner.config.reclaim.as_ref(),
            sessions,
            reason,
            CloseFrom::Active,
        )
        .await;
        if tracing::enabled!(tracing::Level::TRACE) {
            for key in &closed {
                tracing::trace!(session = %key, %reason, "session closed");
            }
        }
        closed
    }
}
