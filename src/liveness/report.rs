//! What the liveness monitor reports: events, statistics and errors.

use crate::id::SessionId;

/// A snapshot of the monitor's counters, from
/// [`LivenessMonitor::stats`](crate::LivenessMonitor::stats).
///
/// Each field is read on its own: the snapshot is not a consistent cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LivenessStats {
    /// Sessions watched now. A session closed by someone else leaves the
    /// monitor at once (no heartbeat, probe or reap touches it again) but
    /// is counted here until its timer entry comes up, within one timeout.
    /// 0 once the monitor is shut down.
    pub watched: u64,
    /// Sessions suspect now (being probed). 0 once the monitor is shut
    /// down.
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
    /// Whether the partition guard holds now: more than its share of the
    /// routers went silent together, and nobody is reaped (see
    /// [`LivenessMonitorBuilder::partition_guard`](crate::LivenessMonitorBuilder::partition_guard)).
    /// `false` once the monitor is shut down.
    pub partition_suspected: bool,
    /// Times the partition guard engaged
    /// ([`Event::PartitionSuspected`](crate::Event::PartitionSuspected)).
    pub partitions: u64,
}

/// Why a heartbeat was ignored. Counted in
/// [`LivenessStats::ignored_heartbeats`].
///
/// Heartbeats race closes and deletions, so an error here is routine: log
/// it at debug level and move on.
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
    /// The monitor was shut down, or its tasks ended (its runtime went
    /// away, or every handle was dropped).
    #[error("heartbeat after the liveness monitor shut down")]
    ShutDown,
    /// The store's backend failed looking the id up.
    #[error("heartbeat for {id} not recorded")]
    Store {
        /// The session.
        id: SessionId,
        /// The backend's error (the [`source`](std::error::Error::source)).
        #[source]
        error: crate::store::BackendError,
    },
}

/// Why a session could not be watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The session is closed.
    #[error("{0} is closed")]
    Closed(SessionId),
    /// A monitor (this one, or another whose tasks still run) watches it
    /// already.
    #[error("{0} is watched already")]
    AlreadyWatched(SessionId),
    /// The monitor was shut down, or its tasks ended (its runtime went
    /// away, or every handle was dropped).
    #[error("the liveness monitor is shut down")]
    ShutDown,
}
