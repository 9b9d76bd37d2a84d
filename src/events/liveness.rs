//! What the liveness monitor reports: [`LivenessEvent`], and a prober's [`ProbeError`].

use tokio::time::Duration;

use crate::id::{RouterId, SessionId};
use crate::transport_error::transport_error;

/// Something the liveness monitor found, as
/// [`Event::Liveness`](crate::Event::Liveness) on the bus given to
/// [`LivenessMonitorBuilder::events`](crate::LivenessMonitorBuilder::events).
///
/// Events are per router: when a router dies, its sessions are reported
/// together, and `router_silent` says that every session the monitor
/// watched on that router is among them (one router problem, not N session
/// problems).
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     Event, EventBus, liveness::LivenessEvent, LivenessMonitor, MemoryStore, NewSession, liveness::NoProbe,
///     RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let bus = EventBus::default();
/// let mut events = bus.subscribe();
/// let monitor = LivenessMonitor::builder().events(bus).build(Arc::clone(&store), NoProbe)?;
///
/// let dead =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// monitor.watch(&dead)?; // and it never heartbeats
/// loop {
///     let Some(Event::Liveness(event)) = events.recv().await else {
///         unreachable!("only the monitor publishes on this bus");
///     };
///     match event {
///         LivenessEvent::SessionSuspect { router_silent, .. } => {
///             assert!(router_silent); // its only session: the whole router went quiet
///         }
///         LivenessEvent::ProbeFailed { round, error, .. } => {
///             println!("probe round {round} unanswered ({error:?})");
///         }
///         LivenessEvent::SessionReaped { sessions, .. } => {
///             assert_eq!(sessions, vec![dead.id()]);
///             break;
///         }
///         LivenessEvent::MonitorStalled { late_by } => {
///             println!("controller stalled {late_by:?}")
///         }
///         _ => {}
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum LivenessEvent {
    /// Sessions missed their heartbeat deadline and are about to be probed.
    SessionSuspect {
        /// Their router.
        router: RouterId,
        /// The sessions that became suspect since the router's last round.
        sessions: Vec<SessionId>,
        /// Every open session the monitor watches on the router is suspect.
        router_silent: bool,
    },
    /// A probe round ended with sessions that did not answer.
    ProbeFailed {
        /// Their router.
        router: RouterId,
        /// The sessions that did not answer.
        sessions: Vec<SessionId>,
        /// The round of the router's probing, from 1.
        round: u32,
        /// Why the probe call itself failed, if it did: the prober's error,
        /// a timeout, or a panic. `None` if the call succeeded and these
        /// sessions did not answer.
        error: Option<ProbeError>,
        /// Every open session the monitor watches on the router failed.
        router_silent: bool,
    },
    /// Sessions that failed every probe round were closed with
    /// [`CloseReason::LivenessTimeout`](crate::CloseReason::LivenessTimeout).
    SessionReaped {
        /// Their router.
        router: RouterId,
        /// The sessions closed by the monitor.
        sessions: Vec<SessionId>,
        /// Every open session the monitor watched on the router was reaped.
        router_silent: bool,
    },
    /// The monitor's tick ran late by more than the pause allowance (the
    /// controller stalled): every deadline was extended by the stall
    /// instead of convicting anyone.
    MonitorStalled {
        /// How late the tick ran.
        late_by: Duration,
    },
}

transport_error!(
    /// A probe call failed.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ProbeError;
    ///
    /// // The transport's error is the source; a message is part of the text.
    /// let reset =
    ///     ProbeError::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    /// assert_eq!(reset.to_string(), "probe failed");
    /// let cause = std::error::Error::source(&reset).map(ToString::to_string);
    /// assert_eq!(cause.as_deref(), Some("connection reset"));
    /// ```
    ProbeError,
    "probe failed"
);
