//! The liveness monitor's counters, behind [`LivenessStats`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::report::LivenessStats;

/// The monitor's counters; relaxed atomics, statistics only.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) watched: AtomicU64,
    pub(super) suspects: AtomicU64,
    pub(super) suspected: AtomicU64,
    pub(super) spared: AtomicU64,
    pub(super) reaped: AtomicU64,
    pub(super) probes: AtomicU64,
    pub(super) probe_errors: AtomicU64,
    pub(super) ignored: AtomicU64,
    pub(super) timer_fires: AtomicU64,
    pub(super) stalls: AtomicU64,
    /// Times the partition guard engaged, and ended: it holds while they
    /// differ (statistics: drivers ask the guard itself).
    pub(super) partitions: AtomicU64,
    pub(super) partitions_ended: AtomicU64,
}

impl Counters {
    pub(super) fn suspect(&self) {
        self.suspects.fetch_add(1, Ordering::Relaxed);
        self.suspected.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn unsuspect(&self) {
        self.suspects.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn spare(&self) {
        self.unsuspect();
        self.spared.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn leave(&self) {
        self.watched.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn probe(&self) {
        self.probes.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn probe_error(&self) {
        self.probe_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn reaped(&self, n: usize) {
        self.reaped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether the partition guard holds now.
    pub(super) fn partition_holds(&self) -> bool {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        get(&self.partitions) != get(&self.partitions_ended)
    }

    pub(super) fn snapshot(&self) -> LivenessStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LivenessStats {
            watched: get(&self.watched),
            suspects: get(&self.suspects),
            suspected: get(&self.suspected),
            spared: get(&self.spared),
            reaped: get(&self.reaped),
            probes: get(&self.probes),
            probe_errors: get(&self.probe_errors),
            ignored_heartbeats: get(&self.ignored),
            timer_fires: get(&self.timer_fires),
            stalls: get(&self.stalls),
            partition_suspected: self.partition_holds(),
            partitions: get(&self.partitions),
        }
    }
}
