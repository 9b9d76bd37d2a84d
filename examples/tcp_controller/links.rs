//! The controller's side of each router link: which connection serves a
//! router, the probes awaiting answers, and the crate's two traits over
//! them ([`WireNotifier`], [`WireProber`]).
//!
//! # Deadlock safety
//!
//! `Links::routers` and `Links::probes` are plain mutexes, never held
//! together nor across an `.await`. Each router's slot is an async mutex,
//! held across the handshake of a (re)connection and across the
//! `router_disconnected` call of a connection that ended, so the two are
//! serialised per router: a reconnection that overtakes the old
//! connection's end is not undone by it. No other lock of the example is
//! taken under it (the crate's own locks are never held across its
//! `.await`s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use session_lifecycle::{
    MemoryStore, NotifyError, ProbeBatch, ProbeError, Prober, Reconciler, RouterId, SessionId,
    TerminationBatch, TerminationNotifier,
};
use tokio::sync::{mpsc, oneshot};

use super::protocol::ControllerFrame;

/// Where a connection's frames go: its writer task.
pub(crate) type Outbound = mpsc::UnboundedSender<ControllerFrame>;

/// The live connection of a router.
pub(crate) struct Link {
    pub(crate) connection: u64,
    pub(crate) outbound: Outbound,
}

/// A router's link, if it is connected.
pub(crate) type Slot = Arc<tokio::sync::Mutex<Option<Link>>>;

/// Which connection serves each router, and the probes awaiting answers.
#[derive(Default)]
pub(crate) struct Links {
    routers: Mutex<HashMap<RouterId, Slot>>,
    probes: Mutex<HashMap<u64, Probing>>,
    next_probe: AtomicU64,
    pub(crate) probe_answers: AtomicUsize,
}

/// A probe awaiting its answer.
struct Probing {
    router: RouterId,
    answer: oneshot::Sender<Vec<u64>>,
}

impl Links {
    /// The router's slot, created empty on first use.
    pub(crate) fn slot(&self, router: RouterId) -> Slot {
        let mut routers = self.routers.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(routers.entry(router).or_default())
    }

    /// Where to send frames for `router`, if it is connected.
    async fn outbound(&self, router: RouterId) -> Option<Outbound> {
        let slot = self.slot(router);
        let link = slot.lock().await;
        link.as_ref().map(|link| link.outbound.clone())
    }

    /// Unlinks `connection` from `router` if it still serves it, and starts
    /// the router's grace period.
    pub(crate) async fn unlink(
        &self,
        router: RouterId,
        connection: u64,
        reconciler: &Reconciler<MemoryStore>,
    ) {
        let slot = self.slot(router);
        let mut link = slot.lock().await;
        if link
            .as_ref()
            .is_none_or(|link| link.connection != connection)
        {
            return; // a newer connection serves the router
        }
        *link = None;
        // A deleted (or deleting) router has no grace period: `NotLive` is
        // the expected answer then, and there is nobody to tell otherwise.
        let _ = reconciler.router_disconnected(router).await;
    }

    /// Registers a probe of `router`; the answer arrives through
    /// [`answer`](Self::answer).
    fn expect(self: &Arc<Self>, router: RouterId) -> (PendingProbe, oneshot::Receiver<Vec<u64>>) {
        let round = self.next_probe.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.probes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(round, Probing { router, answer });
        let pending = PendingProbe {
            links: Arc::clone(self),
            round,
        };
        (pending, answered)
    }

    /// Hands a probe answer to the probe awaiting it, if any (it may have
    /// timed out) and if `router` is the one probed.
    pub(crate) fn answer(&self, router: RouterId, round: u64, ids: Vec<u64>) {
        let probing = {
            let mut probes = self.probes.lock().unwrap_or_else(PoisonError::into_inner);
            if probes.get(&round).is_some_and(|p| p.router == router) {
                probes.remove(&round)
            } else {
                None
            }
        };
        if let Some(probing) = probing {
            self.probe_answers.fetch_add(ids.len(), Ordering::Relaxed);
            let _ = probing.answer.send(ids);
        }
    }
}

/// Forgets its probe when dropped: answered, failed, or timed out by the
/// monitor.
struct PendingProbe {
    links: Arc<Links>,
    round: u64,
}

impl Drop for PendingProbe {
    fn drop(&mut self) {
        let mut probes = self
            .links
            .probes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        probes.remove(&self.round);
    }
}

/// Sends `Terminate` frames on the router's connection.
pub(crate) struct WireNotifier(pub(crate) Arc<Links>);

impl TerminationNotifier for WireNotifier {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let outbound = self
            .0
            .outbound(batch.router)
            .await
            .ok_or_else(|| NotifyError::msg(format!("{} is not connected", batch.router)))?;
        let ids = batch.sessions.iter().map(|key| key.id().get()).collect();
        outbound
            .send(ControllerFrame::Terminate { ids })
            .map_err(|_| NotifyError::msg(format!("{}'s connection closed", batch.router)))
    }
}

/// Sends `Probe` frames on the router's connection and awaits the answer.
pub(crate) struct WireProber(pub(crate) Arc<Links>);

impl Prober for WireProber {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        let router = batch.router;
        let outbound = self
            .0
            .outbound(router)
            .await
            .ok_or_else(|| ProbeError::msg(format!("{router} is not connected")))?;
        let (pending, answered) = self.0.expect(router);
        let ids = batch.sessions.iter().map(|id| id.get()).collect();
        outbound
            .send(ControllerFrame::Probe {
                round: pending.round,
                ids,
            })
            .map_err(|_| ProbeError::msg(format!("{router}'s connection closed")))?;
        // The sender lives in `probes` until the answer or `pending`'s drop.
        let alive = answered
            .await
            .map_err(|_| ProbeError::msg("probe abandoned"))?;
        Ok(alive.into_iter().map(SessionId::new).collect())
    }
}
