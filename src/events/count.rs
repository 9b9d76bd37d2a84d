//! Counting events in the `metrics` facade (feature `metrics`): each event
//! is counted where it is published, so the counters agree with the event
//! stream.

use super::{Event, LivenessEvent, ReclaimEvent};

/// Counts `event`, a panic of the recorder contained.
pub(crate) fn record(event: &Event) {
    crate::metrics::contained(|| count(event));
}

fn count(event: &Event) {
    match event {
        Event::SessionCreated { .. } => {
            crate::metrics::counter!("session_lifecycle_sessions_created_total").increment(1);
        }
        Event::SessionTerminating { .. } => {
            crate::metrics::counter!("session_lifecycle_sessions_terminating_total").increment(1);
        }
        // Counted by the close itself: see `closed`.
        Event::SessionClosed { .. } => {}
        // A resumed deletion fences again what was fenced already.
        Event::RouterFenced { resumed, .. } => {
            if !resumed {
                crate::metrics::counter!("session_lifecycle_routers_fenced_total").increment(1);
            }
        }
        Event::RouterDeleted(report) => {
            crate::metrics::counter!("session_lifecycle_routers_deleted_total").increment(1);
            for (outcome, count) in [
                ("confirmed", report.confirmed),
                ("forced", report.forced),
                ("already_closed", report.already_closed),
            ] {
                crate::metrics::counter!("session_lifecycle_deleted_sessions_total", "outcome" => outcome)
                    .increment(count as u64);
            }
            crate::metrics::histogram!("session_lifecycle_deletion_duration_seconds")
                .record(report.durations.total.as_secs_f64());
        }
        Event::RouterDisconnected { .. } => {
            crate::metrics::counter!("session_lifecycle_routers_disconnected_total").increment(1);
        }
        Event::RouterLost { .. } => {
            crate::metrics::counter!("session_lifecycle_routers_lost_total").increment(1);
        }
        Event::Reconciled(summary) => {
            crate::metrics::counter!("session_lifecycle_reconciliations_total").increment(1);
            // Adopted sessions are unknown but kept, not dropped.
            let dropped = (summary.unknown - summary.adopted.min(summary.unknown))
                + summary.closed_reported
                + summary.foreign;
            for (result, count) in [
                ("matched", summary.matched),
                ("dropped", dropped),
                ("adopted", summary.adopted),
                ("closed", summary.closed),
            ] {
                crate::metrics::counter!("session_lifecycle_reconciled_sessions_total", "result" => result)
                    .increment(count as u64);
            }
            if summary.rejected > 0 {
                crate::metrics::counter!("session_lifecycle_adoptions_rejected_total")
                    .increment(summary.rejected as u64);
            }
            crate::metrics::histogram!("session_lifecycle_reconcile_duration_seconds")
                .record(summary.duration.as_secs_f64());
        }
        Event::Repaired(repair) => {
            crate::metrics::counter!("session_lifecycle_repairs_total", "action" => repair.action.as_str())
                .increment(1);
        }
        Event::SessionExpiringSoon { .. } => {
            crate::metrics::counter!("session_lifecycle_sessions_expiring_soon_total").increment(1);
        }
        Event::Liveness(event) => liveness(event),
        Event::Reclaim(event) => reclaim(event),
        Event::PartitionSuspected { .. } => {
            crate::metrics::counter!("session_lifecycle_partitions_suspected_total").increment(1);
        }
        Event::PartitionEnded {
            lasted, expired, ..
        } => {
            let end = if *expired { "expired" } else { "lifted" };
            crate::metrics::counter!("session_lifecycle_partitions_ended_total", "end" => end)
                .increment(1);
            crate::metrics::histogram!("session_lifecycle_partition_duration_seconds")
                .record(lasted.as_secs_f64());
        }
    }
}

fn liveness(event: &LivenessEvent) {
    match event {
        LivenessEvent::SessionSuspect { sessions, .. } => {
            crate::metrics::counter!("session_lifecycle_suspect_sessions_total")
                .increment(sessions.len() as u64);
        }
        LivenessEvent::ProbeFailed { .. } => {
            crate::metrics::counter!("session_lifecycle_probe_failures_total").increment(1);
        }
        LivenessEvent::SessionReaped { sessions, .. } => {
            crate::metrics::counter!("session_lifecycle_reaped_sessions_total")
                .increment(sessions.len() as u64);
        }
        LivenessEvent::MonitorStalled { .. } => {
            crate::metrics::counter!("session_lifecycle_monitor_stalls_total").increment(1);
        }
    }
}

fn reclaim(event: &ReclaimEvent) {
    match event {
        ReclaimEvent::ReclaimRetried { .. } => {
            crate::metrics::counter!("session_lifecycle_reclaim_retries_total").increment(1);
        }
        ReclaimEvent::ReclaimFailed { .. } => {
            crate::metrics::counter!("session_lifecycle_reclaim_failures_total").increment(1);
        }
        ReclaimEvent::LongLivedSession { .. } => {
            crate::metrics::counter!("session_lifecycle_long_lived_sessions_total").increment(1);
        }
        ReclaimEvent::DeadLetterDropped { .. } => {
            crate::metrics::counter!("session_lifecycle_dead_letters_dropped_total").increment(1);
        }
    }
}
