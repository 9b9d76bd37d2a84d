//! A task that reads the event bus, so the scenario can await what
//! happened instead of sleeping.

use session_lifecycle::{
    Event, EventBus, RouterId, liveness::LivenessEvent, reconcile::ReconcileSummary,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use super::ScenarioError;

/// What was seen on the event bus so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    pub(crate) disconnected: Vec<RouterId>,
    pub(crate) reconciled: Vec<ReconcileSummary>,
    pub(crate) lost: usize,
    pub(crate) reaped: usize,
}

impl Seen {
    fn record(&mut self, event: &Event) {
        match event {
            Event::RouterDisconnected { router, .. } => self.disconnected.push(*router),
            Event::Reconciled(summary) => self.reconciled.push(*summary),
            Event::RouterLost { .. } => self.lost += 1,
            Event::Liveness(LivenessEvent::SessionReaped { sessions, .. }) => {
                self.reaped += sessions.len();
            }
            _ => {}
        }
    }
}

/// Reads the bus into a [`Seen`] the scenario can await.
pub(crate) struct Observer {
    seen: watch::Receiver<Seen>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<(Seen, u64)>,
}

impl Observer {
    /// Subscribes to `bus` now: nothing published later is missed (unless
    /// the observer lags, which [`finish`](Self::finish) reports).
    pub(crate) fn spawn(bus: &EventBus) -> Self {
        let mut events = bus.subscribe();
        let (publish, seen) = watch::channel(Seen::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    event = events.recv() => match event {
                        Some(event) => publish.send_modify(|seen| seen.record(&event)),
                        None => break,
                    },
                }
            }
            // Every publisher has stopped: read what is still buffered.
            while let Some(event) = events.try_recv() {
                publish.send_modify(|seen| seen.record(&event));
            }
            let seen = publish.borrow().clone();
            (seen, events.lagged())
        });
        Self { seen, stop, task }
    }

    /// Waits until `found` finds something in what was seen, for at most
    /// `within`; `what` names the wait in the error.
    pub(crate) async fn until<T>(
        &mut self,
        what: &'static str,
        within: Duration,
        mut found: impl FnMut(&Seen) -> Option<T>,
    ) -> Result<T, ScenarioError> {
        let deadline = Instant::now() + within;
        loop {
            let result = found(&self.seen.borrow_and_update());
            if let Some(result) = result {
                return Ok(result);
            }
            match tokio::time::timeout_at(deadline, self.seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ScenarioError::Unexpected(format!(
                        "the observer stopped before {what}"
                    )));
                }
                Err(_) => return Err(ScenarioError::Timeout(what)),
            }
        }
    }

    /// Stops the observer; call once every publisher has stopped. Returns
    /// all it saw and how many events it missed.
    pub(crate) async fn finish(self) -> Result<(Seen, u64), tokio::task::JoinError> {
        let _ = self.stop.send(());
        self.task.await
    }
}
