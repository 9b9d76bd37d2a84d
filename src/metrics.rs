//! The crate's metrics, through the [`metrics`] facade (feature `metrics`).
//!
//! The recorder installed is user code: a panic in it is contained here
//! (the metric is lost, and nothing else), or a close counted before it
//! completes would never complete, and a background task counting an
//! event would end.
//!
//! A leaf: it imports nothing from the crate but [`contain`](crate::contain). Events are counted where
//! they are published (`events::count`), closes by the session's state
//! machine itself (`closed`: every close counts, whatever closed it and
//! whether or not a store publishes events, at no memory cost per session),
//! gauges by `Stats` as it collects them. No metric is labelled by session
//! or router id: labels are closed sets (close reasons, outcomes, repair
//! actions).

pub(crate) use metrics::{counter, gauge as labelled_gauge, histogram};

/// Counts a close, by its reason's label; called by the caller that won it.
pub(crate) fn closed(reason: &'static str) {
    contained(|| {
        counter!("session_lifecycle_sessions_closed_total", "reason" => reason).increment(1);
    });
}

/// Counts events a subscriber missed.
pub(crate) fn lagged(missed: u64) {
    contained(|| counter!("session_lifecycle_events_lagged_total").increment(missed));
}

/// Sets a gauge without labels.
pub(crate) fn gauge(name: &'static str, value: impl TryInto<u64>) {
    let value = value.try_into().unwrap_or(u64::MAX);
    contained(|| metrics::gauge!(name).set(value as f64));
}

/// Runs `record` (the recorder: user code), a panic contained and logged.
pub(crate) fn contained(record: impl FnOnce()) {
    if crate::contain::contain(record).is_none() {
        tracing::error!("the metrics recorder panicked; the panic was contained");
    }
}
