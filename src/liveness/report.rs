//! What the liveness monitor reports: events, statistics and errors.

use tokio::time::Duration;

use super::probe::ProbeError;
use crate::id::{RouterId, SessionId};

/// Something the liveness monitor found, from
/// [`LivenessMonitor::subscribe`](crate::LivenessMonitor::subscribe).
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
///     LivenessEvent, LivenessMonitor, MemoryStore, NewSession, NoProbe, RouterId,
///     SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
/// let mut events = monitor.subscribe();
///
/// let dead =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// monitor.watch(&dead)?; // and it never heartbeats
/// loop {
///     match events.recv().await? {
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

/// A snapshot of the monitor's counters, from
/// [`LivenessMonitor::stats`](crate::LivenessMonitor::stats).
///
/// Each field is read on its own: the snapshot is not a consistent cut.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     LivenessMonitor, MemoryStore, NewSession, NoProbe, RouterId, SessionId,
///     SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
/// let dead =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// monitor.watch(&dead)?;
/// tokio::time::sleep(Duration::from_secs(30)).await;
///
/// let stats = monitor.stats();
/// assert_eq!((stats.suspected, stats.spared, stats.reaped), (1, 0, 1));
/// assert!(stats.probes >= 1 && stats.probe_errors == 0);
/// assert_eq!(stats.stalls, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LivenessStats {
    /// Sessions watched now. A session closed by someone else leaves the
    /// monitor at once (no heartbeat, probe or reap touches it again) but
    /// is counted here until its timer entry comes up, within one timeout.
    pub watched: u64,
    /// Sessions suspect now (being probed).
    pub suspects: u64,
    /// Sessions that became suspect, in total.
    pub suspected: u64,
    /// Suspects that answered (a probe answer or a heartbeat) and went back
    /// to being watched.
    pub spared: u64,
    /// Sessions closed for missing every probe round.
    pub reaped: u64,
    /// Probe calls made (one per router and round).
    pub probes: u64,
    /// Probe calls that failed: an error, a timeout or a panic.
    pub probe_errors: u64,
    /// Heartbeats ignored: unknown, closed or unwatched sessions, or after
    /// shutdown.
    pub ignored_heartbeats: u64,
    /// Timer entries the monitor looked at (re-armed or convicted): its
    /// work grows with these, not with heartbeats.
    pub timer_fires: u64,
    /// Times the local-health guard extended every deadline.
    pub stalls: u64,
}

/// Why a heartbeat was ignored. Counted in
/// [`LivenessStats::ignored_heartbeats`].
///
/// Heartbeats race closes and deletions, so an error here is routine: log
/// it at debug level and move on.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     HeartbeatError, LivenessMonitor, MemoryStore, NewSession, NoProbe, RouterId,
///     SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
/// let session =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
///
/// // Not watched yet.
/// assert!(matches!(monitor.heartbeat(&session), Err(HeartbeatError::NotWatched(_))));
/// // An id off the wire that the store does not hold.
/// match monitor.heartbeat_id(SessionId::new(99)).await {
///     Err(HeartbeatError::UnknownSession(id)) => assert_eq!(id, SessionId::new(99)),
///     other => panic!("unexpected {other:?}"),
/// }
/// assert_eq!(monitor.stats().ignored_heartbeats, 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeartbeatError {
    /// The store holds no session with this id.
    #[error("heartbeat for unknown {0}")]
    UnknownSession(SessionId),
    /// The session is closed.
    #[error("heartbeat for closed {0}")]
    Closed(SessionId),
    /// This monitor does not watch the session.
    #[error("heartbeat for {0}, which this monitor does not watch")]
    NotWatched(SessionId),
    /// The monitor was shut down.
    #[error("heartbeat after the liveness monitor shut down")]
    ShutDown,
    /// The store's backend failed looking the id up.
    #[error("heartbeat for {id} not recorded: {error}")]
    Store {
        /// The session.
        id: SessionId,
        /// The backend's error.
        error: crate::BackendError,
    },
}

/// Why a session could not be watched.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, LivenessMonitor, MemoryStore, NewSession, NoProbe, RouterId,
///     SessionId, SessionStore, WatchError,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
/// let session =
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
///
/// monitor.watch(&session)?;
/// assert_eq!(monitor.watch(&session), Err(WatchError::AlreadyWatched(session.id())));
///
/// let _ = session.close(CloseReason::ClientClosed);
/// let late =
///     store.create(NewSession::new(SessionId::new(2), router, incarnation)).await?;
/// let _ = late.close(CloseReason::ClientClosed);
/// assert_eq!(monitor.watch(&late), Err(WatchError::Closed(late.id())));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The session is closed.
    #[error("{0} is closed")]
    Closed(SessionId),
    /// A monitor (this one or another) watches it already.
    #[error("{0} is watched already")]
    AlreadyWatched(SessionId),
    /// The monitor was shut down.
    #[error("the liveness monitor is shut down")]
    ShutDown,
}
