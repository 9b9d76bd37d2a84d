//! What the expiry monitor reports: statistics and errors.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::id::SessionId;

/// A snapshot of an [`ExpiryMonitor`](super::ExpiryMonitor)'s counters,
/// from [`ExpiryMonitor::stats`](super::ExpiryMonitor::stats).
///
/// Each field is read on its own: the snapshot is not a consistent cut.
///
/// # Example
///
/// See [`ExpiryMonitor`](super::ExpiryMonitor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExpiryStats {
    /// Sessions tracked now. A session closed by someone else (or whose
    /// expiry was cleared) is counted, and its handle held, until its timer
    /// entry comes up (at its warning or expiry) or the monitor's sweep
    /// passes it: within a minute and a tick (the sweep's period, or the
    /// tick if longer). 0 once the monitor is shut down
    /// ([`shutdown`](super::ExpiryMonitor::shutdown)).
    pub tracked: u64,
    /// Sessions the monitor closed with
    /// [`CloseReason::Expired`](crate::CloseReason::Expired).
    pub expired: u64,
    /// [`Event::SessionExpiringSoon`](crate::Event::SessionExpiringSoon)
    /// warnings given (counted whether or not anybody listens).
    pub warned: u64,
    /// Timer entries the monitor looked at (re-filed, warned or expired):
    /// its work grows with these, not with extensions.
    pub timer_fires: u64,
}

/// Why [`ExpiryMonitor::track`](super::ExpiryMonitor::track) refused a
/// session.
///
/// # Example
///
/// See [`ExpiryMonitor::track`](super::ExpiryMonitor::track).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// The session is closed.
    #[error("{0} is closed")]
    Closed(SessionId),
    /// The session has no expiry: it never expires, and never gets one
    /// (expiries only move later; see
    /// [`Session::extend_expiry`](crate::Session::extend_expiry)).
    #[error("{0} has no expiry")]
    NoExpiry(SessionId),
    /// A monitor (this one or another) tracks it already.
    #[error("{0} is tracked already")]
    AlreadyTracked(SessionId),
    /// The monitor was shut down.
    #[error("the expiry monitor is shut down")]
    ShutDown,
}

/// The monitor's counters; relaxed atomics, statistics only.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) tracked: AtomicU64,
    pub(super) expired: AtomicU64,
    pub(super) warned: AtomicU64,
    pub(super) timer_fires: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(super) fn leave(&self, n: usize) {
        self.tracked.fetch_sub(n as u64, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> ExpiryStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ExpiryStats {
            tracked: get(&self.tracked),
            expired: get(&self.expired),
            warned: get(&self.warned),
            timer_fires: get(&self.timer_fires),
        }
    }
}
