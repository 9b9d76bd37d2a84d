//! The crate's metrics, through the [`metrics`] facade (feature `metrics`).
//!
//! Every event is counted where it is published (see `event::emit`), so
//! the counters agree with the event stream, with one exception: closes are
//! counted by the session's state machine itself (`closed`), so every close
//! counts, whatever closed it and whether or not a store publishes events,
//! at no memory cost per session. No metric is labelled by
//! session or router id: labels are closed sets (close reasons, outcomes,
//! repair actions).

use metrics::{counter, histogram};

use crate::event::Event;
use crate::liveness::LivenessEvent;
use crate::reclaim::ReclaimEvent;
use crate::session::CloseReason;
use crate::stats::Stats;

/// Counts `event`.
pub(crate) fn record(event: &Event) {
    match event {
        Event::SessionCreated { .. } => {
            counter!("session_lifecycle_sessions_created_total").increment(1);
        }
        Event::SessionTerminating { .. } => {
            counter!("session_lifecycle_sessions_terminating_total").increment(1);
        }
        // Counted by the close itself: see `closed`.
        Event::SessionClosed { .. } => {}
        // A resumed deletion fences again what was fenced already.
        Event::RouterFenced { resumed, .. } => {
            if !resumed {
                counter!("session_lifecycle_routers_fenced_total").increment(1);
            }
        }
        Event::RouterDeleted(report) => {
            counter!("session_lifecycle_routers_deleted_total").increment(1);
            for (outcome, count) in [
                ("confirmed", report.confirmed),
                ("forced", report.forced),
                ("already_closed", report.already_closed),
            ] {
                counter!("session_lifecycle_deleted_sessions_total", "outcome" => outcome)
                    .increment(count as u64);
            }
            histogram!("session_lifecycle_deletion_duration_seconds")
                .record(report.durations.total.as_secs_f64());
        }
        Event::RouterDisconnected { .. } => {
            counter!("session_lifecycle_routers_disconnected_total").increment(1);
        }
        Event::RouterLost { .. } => {
            counter!("session_lifecycle_routers_lost_total").increment(1);
        }
        Event::Reconciled(summary) => {
            counter!("session_lifecycle_reconciliations_total").increment(1);
            let dropped = summary.unknown + summary.closed_reported + summary.foreign;
            for (result, count) in [
                ("matched", summary.matched),
                ("dropped", dropped),
                ("closed", summary.closed),
            ] {
                counter!("session_lifecycle_reconciled_sessions_total", "result" => result)
                    .increment(count as u64);
            }
            histogram!("session_lifecycle_reconcile_duration_seconds")
                .record(summary.duration.as_secs_f64());
        }
        Event::Repaired(repair) => {
            counter!("session_lifecycle_repairs_total", "action" => repair.action.as_str())
                .increment(1);
        }
        Event::Liveness(event) => liveness(event),
        Event::Reclaim(event) => reclaim(event),
    }
}

fn liveness(event: &LivenessEvent) {
    match event {
        LivenessEvent::SessionSuspect { sessions, .. } => {
            counter!("session_lifecycle_suspect_sessions_total").increment(sessions.len() as u64);
        }
        LivenessEvent::ProbeFailed { .. } => {
            counter!("session_lifecycle_probe_failures_total").increment(1);
        }
        LivenessEvent::SessionReaped { sessions, .. } => {
            counter!("session_lifecycle_reaped_sessions_total").increment(sessions.len() as u64);
        }
        LivenessEvent::MonitorStalled { .. } => {
            counter!("session_lifecycle_monitor_stalls_total").increment(1);
        }
    }
}

fn reclaim(event: &ReclaimEvent) {
    match event {
        ReclaimEvent::ReclaimRetried { .. } => {
            counter!("session_lifecycle_reclaim_retries_total").increment(1);
        }
        ReclaimEvent::ReclaimFailed { .. } => {
            counter!("session_lifecycle_reclaim_failures_total").increment(1);
        }
        ReclaimEvent::LongLivedSession { .. } => {
            counter!("session_lifecycle_long_lived_sessions_total").increment(1);
        }
    }
}

/// Counts a close; called by the caller that won it.
pub(crate) fn closed(reason: CloseReason) {
    counter!("session_lifecycle_sessions_closed_total", "reason" => reason_label(reason))
        .increment(1);
}

/// Counts events a subscriber missed.
pub(crate) fn lagged(missed: u64) {
    counter!("session_lifecycle_events_lagged_total").increment(missed);
}

/// Sets the session gauges from a census.
pub(crate) fn sessions(stats: &Stats) {
    for (state, count) in [
        ("active", stats.active),
        ("terminating", stats.terminating),
        ("closed", stats.closed_in_store),
    ] {
        metrics::gauge!("session_lifecycle_sessions", "state" => state).set(count as f64);
    }
    gauge("session_lifecycle_routers", stats.routers.len());
}

/// Sets a gauge without labels.
pub(crate) fn gauge(name: &'static str, value: impl TryInto<u64>) {
    let value = value.try_into().unwrap_or(u64::MAX);
    metrics::gauge!(name).set(value as f64);
}

fn reason_label(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::ClientClosed => "client_closed",
        CloseReason::RouterDeleted => "router_deleted",
        CloseReason::LivenessTimeout => "liveness_timeout",
        CloseReason::Forced => "forced",
        CloseReason::Reclaimed => "reclaimed",
        CloseReason::RouterLost => "router_lost",
        CloseReason::Shutdown => "shutdown",
    }
}
