//! The `metrics` feature: a scripted scenario recorded by a debugging
//! recorder, without any event bus.
//!
//! One test only: the recorder is installed globally, for this whole test
//! binary.
#![cfg(feature = "metrics")]

use std::sync::Arc;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use session_lifecycle::reconcile::{Adoption, ReportedSession, adopt_fn};
use session_lifecycle::test_util::{
    HOUR, Notify, ScriptedNotifier, Subset, paused_runtime, report_within,
};
use session_lifecycle::{
    CloseReason, Event, EventBus, LivenessMonitor, MemoryStore, NewSession, Reconciler,
    RouterDeleter, RouterId, SessionId, SessionStore, Stats, liveness::NoProbe,
};
use tokio::time::Duration;

const R: RouterId = RouterId::new(9);

/// One recorded metric: name, labels, value.
type Metric = (String, Vec<(String, String)>, DebugValue);

fn find<'a>(metrics: &'a [Metric], name: &str, labels: &[(&str, &str)]) -> &'a DebugValue {
    let matching: Vec<&Metric> = metrics
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .collect();
    match matching.as_slice() {
        [(_, _, value)] => value,
        [] => panic!("no metric {name}{labels:?} in {metrics:#?}"),
        _ => panic!("several metrics {name}{labels:?}: {matching:#?}"),
    }
}

fn counter(metrics: &[Metric], name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(metrics, name, labels) {
        DebugValue::Counter(value) => *value,
        other => panic!("{name}{labels:?} is not a counter: {other:?}"),
    }
}

#[test]
fn a_scripted_scenario_is_recorded_without_an_event_bus() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let runtime = paused_runtime();
    let partition = runtime.block_on(partition_held_until_it_expires());
    let report = runtime.block_on(async {
        // No event bus anywhere: the metrics must not need one.
        let store = Arc::new(MemoryStore::new());
        let incarnation = store.register_router(R).await.unwrap();
        for id in 0..10 {
            store
                .create(NewSession::new(SessionId::new(id), R, incarnation))
                .await
                .unwrap();
        }
        for id in 0..2 {
            assert!(
                store
                    .close(SessionId::new(id), CloseReason::ClientClosed)
                    .await
                    .unwrap()
                    .won()
            );
        }
        // Confirms 2..7 (5 sessions), ignores 7, 8, 9 (forced).
        let notifier = ScriptedNotifier::always(
            Arc::clone(&store),
            Notify::Confirm(Subset::Filter(|id, _round| id.get() < 7)),
        );
        let deleter = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(1))
            .retries(0)
            .build(Arc::clone(&store), notifier)
            .expect("valid settings");
        let report = report_within(HOUR, deleter.delete(R)).await;
        // Restart adoption on another router: session 100 adopted (then
        // closed by its client), 101 rejected.
        let other = RouterId::new(10);
        let incarnation = store.register_router(other).await.unwrap();
        let reconciler = Reconciler::builder()
            .build(Arc::clone(&store))
            .expect("valid settings");
        let adopter = adopt_fn(|_, reported: ReportedSession| {
            if reported.id.get() == 100 {
                Adoption::accept(())
            } else {
                Adoption::reject("bad token")
            }
        });
        let reported = [100, 101].map(|id| ReportedSession::new(SessionId::new(id)));
        let adoption = reconciler
            .reconcile_adopting(other, incarnation, reported, &adopter)
            .await
            .unwrap();
        assert_eq!(
            (adoption.summary.adopted, adoption.summary.rejected),
            (1, 1)
        );
        let _ = store
            .close(SessionId::new(100), CloseReason::ClientClosed)
            .await
            .unwrap();
        let stats = Stats::collect(&*store).await.unwrap();
        assert_eq!(
            (stats.active, stats.terminating, stats.closed_in_store),
            (0, 0, 0)
        );
        report
    });
    assert_eq!(
        (
            report.sessions,
            report.confirmed,
            report.forced,
            report.already_closed
        ),
        (8, 5, 3, 0)
    );

    let metrics: Vec<Metric> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _unit, _description, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|label| (label.key().to_owned(), label.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect();

    for (name, labels, _) in &metrics {
        assert!(
            name.starts_with("session_lifecycle_"),
            "{name} is not in the crate's namespace"
        );
        for (label, _) in labels {
            assert!(
                label != "session" && label != "router",
                "{name} is labelled by {label}"
            );
        }
    }

    // 4 in the partition scenario, 10 in the deletion's, 1 adopted.
    assert_eq!(
        counter(&metrics, "session_lifecycle_sessions_created_total", &[]),
        15
    );
    assert_eq!(
        counter(
            &metrics,
            "session_lifecycle_partitions_suspected_total",
            &[]
        ),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "session_lifecycle_partitions_ended_total",
            &[("end", "expired")]
        ),
        1
    );
    match find(
        &metrics,
        "session_lifecycle_partition_duration_seconds",
        &[],
    ) {
        DebugValue::Histogram(samples) => {
            assert_eq!(samples.len(), 1, "{samples:?}");
            // Expired at the first tick (50 ms) at or past the maximum.
            let held = samples[0].into_inner();
            let max = partition.as_secs_f64();
            assert!(held >= max && held <= max + 0.05, "{held}");
        }
        other => panic!("the partition duration is not a histogram: {other:?}"),
    }
    // Set while the guard held.
    match find(&metrics, "session_lifecycle_partition_suspected", &[]) {
        DebugValue::Gauge(value) => assert_eq!(value.into_inner(), 1.0),
        other => panic!("partition_suspected is not a gauge: {other:?}"),
    }
    for (reason, count) in [("client_closed", 3), ("router_deleted", 5), ("forced", 3)] {
        assert_eq!(
            counter(
                &metrics,
                "session_lifecycle_sessions_closed_total",
                &[("reason", reason)]
            ),
            count,
            "sessions closed with reason {reason}"
        );
    }
    assert_eq!(
        counter(&metrics, "session_lifecycle_routers_deleted_total", &[]),
        1
    );
    assert_eq!(
        counter(&metrics, "session_lifecycle_routers_fenced_total", &[]),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "session_lifecycle_sessions_terminating_total",
            &[]
        ),
        8
    );
    for (outcome, count) in [("confirmed", 5), ("forced", 3), ("already_closed", 0)] {
        assert_eq!(
            counter(
                &metrics,
                "session_lifecycle_deleted_sessions_total",
                &[("outcome", outcome)]
            ),
            count,
            "deleted sessions with outcome {outcome}"
        );
    }
    assert_eq!(
        counter(&metrics, "session_lifecycle_reconciliations_total", &[]),
        1
    );
    // The adopted session is not counted as dropped.
    for (result, count) in [
        ("matched", 0),
        ("dropped", 1),
        ("adopted", 1),
        ("closed", 0),
    ] {
        assert_eq!(
            counter(
                &metrics,
                "session_lifecycle_reconciled_sessions_total",
                &[("result", result)]
            ),
            count,
            "reconciled sessions with result {result}"
        );
    }
    assert_eq!(
        counter(&metrics, "session_lifecycle_adoptions_rejected_total", &[]),
        1
    );
    match find(&metrics, "session_lifecycle_deletion_duration_seconds", &[]) {
        DebugValue::Histogram(samples) => {
            assert_eq!(samples.len(), 1, "{samples:?}");
            assert_eq!(
                samples[0].into_inner(),
                report.durations.total.as_secs_f64()
            );
        }
        other => panic!("the deletion duration is not a histogram: {other:?}"),
    }
    for state in ["active", "terminating", "closed"] {
        match find(&metrics, "session_lifecycle_sessions", &[("state", state)]) {
            DebugValue::Gauge(value) => assert_eq!(value.into_inner(), 0.0, "{state}"),
            other => panic!("sessions{{state={state}}} is not a gauge: {other:?}"),
        }
    }
    // Nobody subscribed to anything: nothing lagged.
    assert!(
        !metrics
            .iter()
            .any(|(name, _, _)| name == "session_lifecycle_events_lagged_total")
    );
}

/// Four routers whose sessions never heartbeat: the partition guard holds,
/// then expires after 10 s and they are reaped. Returns how long it held.
async fn partition_held_until_it_expires() -> Duration {
    let store = Arc::new(MemoryStore::new());
    let max_hold = Duration::from_secs(10);
    let bus = EventBus::new(1024);
    let mut events = bus.subscribe();
    let monitor = LivenessMonitor::builder()
        .partition_max_hold(Some(max_hold))
        .events(bus)
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let mut sessions = Vec::new();
    for r in 10..14 {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        let session = store
            .create(NewSession::new(SessionId::new(r), router, incarnation))
            .await
            .unwrap();
        monitor.watch(&session).unwrap();
        sessions.push(session);
    }
    // The guard engages: its event is published once it holds.
    tokio::time::timeout(HOUR, async {
        while !matches!(events.recv().await, Some(Event::PartitionSuspected { .. })) {}
    })
    .await
    .expect("the partition guard engages");
    assert!(monitor.stats().partition_suspected);
    let _ = Stats::default().with_liveness(&monitor);
    for session in &sessions {
        tokio::time::timeout(HOUR, session.closed()).await.unwrap();
    }
    assert_eq!(monitor.stats().partitions, 1);
    max_hold
}
