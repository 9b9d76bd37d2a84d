//! Reconciliation against a router's report, and the disconnect grace
//! period, under paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::test_util::{Notify, ObservedRouter, ScriptedNotifier, router_lost, within};
use session_lifecycle::{
    CloseReason, Event, EventBus, LivenessMonitor, MemoryStore, NewSession, Reconciler,
    RouterDeleter, RouterId, SessionId, SessionStore, liveness::NoProbe, reconcile::ReconcileError,
    store::RouterStatus,
};
use tokio::time::{Duration, Instant};

fn ids(range: impl IntoIterator<Item = u64>) -> Vec<SessionId> {
    range.into_iter().map(SessionId::new).collect()
}

#[tokio::test(start_paused = true)]
async fn a_report_is_reconciled_unknown_missing_closed_and_foreign() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    // Router 1 holds sessions 0..10; router 2 holds 100..102.
    let one = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
    let two = ObservedRouter::fill(&*store, RouterId::new(2), 100, 2).await;
    // Session 3 was closed on the controller through its handle (still in
    // the store), session 4 closed and removed.
    let _ = one.sessions[3].close(CloseReason::ClientClosed);
    let _ = store
        .close(SessionId::new(4), CloseReason::ClientClosed)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;

    let reconciler = Reconciler::builder()
        .chunk_size(3)
        .events(bus.clone())
        .build(Arc::clone(&store))
        .expect("valid settings");
    // The router holds 0, 1, 2 (fine), 3 and 4 (closed on the controller),
    // 50 (unknown), 100 (router 2's), and 2 twice; it lost 5..10.
    let reported = ids([0, 1, 2, 3, 4, 50, 100, 2]);
    let report = reconciler
        .reconcile(one.router, one.incarnation, reported)
        .await
        .unwrap();

    assert_eq!(report.drop, ids([3, 4, 50, 100]));
    assert_eq!(report.closed, ids(5..10));
    let summary = report.summary;
    assert_eq!(summary.reported, 7);
    assert_eq!(
        (
            summary.matched,
            summary.unknown,
            summary.closed_reported,
            summary.foreign
        ),
        (3, 2, 1, 1),
        "4 was removed, so it is unknown; 3 is closed; 100 is foreign"
    );
    assert_eq!((summary.closed, summary.spared), (5, 0));
    assert!(
        summary.chunks >= 4,
        "7 ids in chunks of 3, then 5 closes: {summary:?}"
    );
    assert!(!summary.grace_cancelled);

    // The missing sessions are closed once, with `Reclaimed`, and removed;
    // the matched ones are untouched, router 2 is untouched.
    for id in 5..10 {
        let at = usize::try_from(id).unwrap();
        assert_eq!(
            one.sessions[at].close_reason(),
            Some(CloseReason::Reclaimed)
        );
        assert_eq!(one.releases[at].load(Ordering::SeqCst), 1);
        assert!(store.get(SessionId::new(id)).await.unwrap().is_none());
    }
    for at in 0..3 {
        assert!(!one.sessions[at].is_closed());
    }
    assert!(two.sessions.iter().all(|s| !s.is_closed()));
    // Session 3, closed through its handle, is removed too.
    assert_eq!(summary.removed, 1);
    assert!(store.get(SessionId::new(3)).await.unwrap().is_none());
    assert_eq!(store.count(one.router).await.unwrap(), 3);

    match events.try_recv() {
        Some(Event::Reconciled(published)) => assert_eq!(published, summary),
        other => panic!("expected Reconciled, got {other:?}"),
    }

    // Reconciling again finds nothing more to close.
    // (A slice of ids works as well as owned ids.)
    let again = reconciler
        .reconcile(one.router, one.incarnation, &ids([0, 1, 2]))
        .await
        .unwrap();
    assert!(again.closed.is_empty() && again.drop.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stale_incarnation_report_is_rejected_and_changes_nothing() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let old = store.register_router(router).await.unwrap();
    store.fence(router).await.unwrap();
    store.finish(router, old).await.unwrap();
    let live = store.register_router(router).await.unwrap();
    store
        .create(NewSession::new(SessionId::new(1), router, live))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .build(Arc::clone(&store))
        .expect("valid settings");

    let stale = reconciler.reconcile(router, old, ids([7])).await;
    assert!(
        matches!(stale, Err(ReconcileError::StaleIncarnation { reported, current, .. })
            if reported == old && current == RouterStatus::Live(live)),
        "{stale:?}"
    );
    assert_eq!(store.len(), 1, "a stale report closes nothing");
    assert!(stale.unwrap_err().to_string().contains("reported"));

    // Fenced: the deleter's business.
    store.fence(router).await.unwrap();
    let fenced = reconciler.reconcile(router, live, ids([])).await;
    assert!(
        matches!(fenced, Err(ReconcileError::NotLive { .. })),
        "{fenced:?}"
    );
    assert_eq!(store.len(), 1);
    let unknown = reconciler.reconcile(RouterId::new(9), live, ids([])).await;
    assert!(matches!(unknown, Err(ReconcileError::UnknownRouter(_))));
}

#[tokio::test(start_paused = true)]
async fn sessions_younger_than_the_report_are_spared() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    store
        .create(NewSession::new(SessionId::new(1), router, incarnation))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    store
        .create(NewSession::new(SessionId::new(2), router, incarnation))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .spare_younger_than(Duration::from_secs(5))
        .build(Arc::clone(&store))
        .expect("valid settings");
    let report = reconciler
        .reconcile(router, incarnation, ids([]))
        .await
        .unwrap();
    assert_eq!(report.closed, ids([1]));
    assert_eq!(report.summary.spared, 1);
    assert!(store.get(SessionId::new(2)).await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_report_of_200k_sessions_is_handled_in_chunks() {
    const N: u64 = 200_000;
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    for id in 0..N {
        store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .chunk_size(4_096)
        .build(Arc::clone(&store))
        .expect("valid settings");
    // The router holds every even session and 1,000 the controller never
    // heard of.
    let reported = (0..N).step_by(2).chain(N..N + 1_000).map(SessionId::new);

    // Another task keeps using the store between chunks: no lock is held
    // across them.
    let creates = Arc::new(AtomicUsize::new(0));
    let side = {
        let (store, creates) = (Arc::clone(&store), Arc::clone(&creates));
        let other = RouterId::new(2);
        let other_inc = store.register_router(other).await.unwrap();
        tokio::spawn(async move {
            for id in 0..50u64 {
                store
                    .create(NewSession::new(
                        SessionId::new(10 * N + id),
                        other,
                        other_inc,
                    ))
                    .await
                    .unwrap();
                creates.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    let report = reconciler
        .reconcile(router, incarnation, reported)
        .await
        .unwrap();
    let summary = report.summary;
    assert_eq!(summary.reported, 101_000);
    assert_eq!(summary.matched, 100_000);
    assert_eq!(summary.unknown, 1_000);
    assert_eq!(summary.closed, 100_000);
    assert_eq!(report.drop.len(), 1_000);
    // 101,000 ids and 100,000 closes in chunks of 4,096.
    assert_eq!(
        summary.chunks,
        101_000usize.div_ceil(4_096) + 100_000usize.div_ceil(4_096)
    );
    assert!(
        creates.load(Ordering::SeqCst) > 0,
        "the other task ran while the report was reconciled"
    );
    side.await.unwrap();
    assert_eq!(store.count(router).await.unwrap(), 100_000);
    assert!(store.audit().await.unwrap().is_clean());
}

/// A router with `n` sessions and a reconciler with a 30 s grace period.
async fn disconnected_setup(
    n: u64,
) -> (
    Arc<MemoryStore>,
    ObservedRouter,
    Reconciler<MemoryStore>,
    session_lifecycle::events::Subscription,
) {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, RouterId::new(1), 0, n).await;
    let bus = EventBus::new(1_024);
    let events = bus.subscribe();
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .chunk_size(7)
        .events(bus)
        .build(Arc::clone(&store))
        .expect("valid settings");
    (store, observed, reconciler, events)
}

#[tokio::test(start_paused = true)]
async fn grace_expiry_closes_the_sessions_and_keeps_the_router() {
    let (store, observed, reconciler, mut events) = disconnected_setup(20).await;
    let started = Instant::now();
    let deadline = reconciler
        .router_disconnected(observed.router)
        .await
        .unwrap();
    assert_eq!(deadline, started + Duration::from_secs(30));
    // A second disconnect keeps the deadline.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        reconciler
            .router_disconnected(observed.router)
            .await
            .unwrap(),
        deadline
    );
    assert_eq!(reconciler.in_grace(), 1);

    // Nothing happens before the deadline.
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(observed.sessions.iter().all(|s| !s.is_closed()));

    // Then the router is lost: every session closed once, router kept.
    let lost = within(
        Duration::from_secs(5),
        router_lost(&mut events, observed.router),
    )
    .await;
    assert_eq!(lost, 20);
    assert!(Instant::now() >= deadline);
    assert_eq!(observed.count_reason(CloseReason::RouterLost), 20);
    assert!(
        observed
            .releases
            .iter()
            .all(|r| r.load(Ordering::SeqCst) == 1)
    );
    assert_eq!(store.count(observed.router).await.unwrap(), 0);
    assert_eq!(
        store.router_status(observed.router).await.unwrap(),
        RouterStatus::Live(observed.incarnation),
        "grace expiry does not delete the router"
    );
    assert_eq!(reconciler.in_grace(), 0);
}

#[tokio::test(start_paused = true)]
async fn reconnecting_within_grace_cancels_it_and_reconciles() {
    let (store, observed, reconciler, _events) = disconnected_setup(10).await;
    reconciler
        .router_disconnected(observed.router)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(29)).await;

    // Reconnects holding all but session 9.
    let report = reconciler
        .reconcile(observed.router, observed.incarnation, ids(0..9))
        .await
        .unwrap();
    assert!(report.summary.grace_cancelled);
    assert_eq!(report.closed, ids([9]));
    assert_eq!(reconciler.in_grace(), 0);

    // Long past the old deadline: nothing more is closed.
    tokio::time::advance(Duration::from_secs(120)).await;
    tokio::task::yield_now().await;
    assert_eq!(observed.count_reason(CloseReason::RouterLost), 0);
    assert!(observed.sessions[..9].iter().all(|s| !s.is_closed()));
    assert_eq!(store.count(observed.router).await.unwrap(), 9);
}

#[tokio::test(start_paused = true)]
async fn a_router_deleted_during_grace_is_left_to_the_deleter() {
    let (store, observed, reconciler, _events) = disconnected_setup(10).await;
    reconciler
        .router_disconnected(observed.router)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;

    // The router is deleted during its grace period; it never answers, so
    // the deleter force-closes everything after its deadline, which lies
    // past the grace period's end.
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(60))
        .notify_timeout(Duration::from_secs(1))
        .retries(0)
        .build(Arc::clone(&store), notifier)
        .expect("valid settings");
    let deletion = tokio::spawn(deleter.delete(observed.router));
    let report = within(Duration::from_secs(120), deletion)
        .await
        .unwrap()
        .unwrap();
    let report = report.report().unwrap().clone();
    assert_eq!(report.forced, 10, "{report:?}");
    // Grace expired in the middle of the deletion and closed nothing.
    assert_eq!(observed.count_reason(CloseReason::RouterLost), 0);
    assert_eq!(observed.count_reason(CloseReason::Forced), 10);
    assert_eq!(reconciler.in_grace(), 0);
    observed.assert_deleted(&*store).await;

    // A deleted router cannot start a grace period.
    let refused = reconciler.router_disconnected(RouterId::new(1)).await;
    assert!(
        matches!(refused, Err(ReconcileError::NotLive { .. })),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_grace_timers() {
    let (store, observed, reconciler, _events) = disconnected_setup(5).await;
    reconciler
        .router_disconnected(observed.router)
        .await
        .unwrap();
    within(Duration::from_secs(1), reconciler.shutdown()).await;
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(observed.sessions.iter().all(|s| !s.is_closed()));
    assert_eq!(store.len(), 5);
    let refused = reconciler.router_disconnected(observed.router).await;
    assert!(
        matches!(refused, Err(ReconcileError::ShutDown)),
        "{refused:?}"
    );
}

/// A monitored router that disconnects: with the reconciler holding it in
/// the monitor, its sessions wait out the grace period; without, they are
/// reaped as soon as their probes fail (the control case).
#[tokio::test(start_paused = true)]
async fn a_monitored_router_in_grace_is_not_reaped() {
    for hold in [true, false] {
        let store = Arc::new(MemoryStore::new());
        let observed = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(Duration::from_secs(1))
            .timeout_range(Duration::from_secs(1), Duration::from_secs(10))
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        for session in &observed.sessions {
            monitor.watch(session).unwrap();
        }
        let beat = |monitor: &LivenessMonitor<MemoryStore, NoProbe>| {
            for session in &observed.sessions {
                let _ = monitor.heartbeat(session);
            }
        };
        for _ in 0..5 {
            beat(&monitor);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut builder = Reconciler::builder().grace_period(Duration::from_secs(60));
        if hold {
            builder = builder.liveness(&monitor);
        }
        let reconciler = builder.build(Arc::clone(&store)).expect("valid settings");
        reconciler
            .router_disconnected(observed.router)
            .await
            .unwrap();
        assert_eq!(monitor.is_held(observed.router), hold);

        // Silent for 30 s: far past the reap bound, within the grace period.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let reaped = observed.count_reason(CloseReason::LivenessTimeout);
        if !hold {
            assert_eq!(reaped, 10, "the control case reaps");
            continue;
        }
        assert_eq!(reaped, 0);
        assert_eq!(monitor.stats().reaped, 0);

        // It reconnects: the hold ends, heartbeats resume, nobody is reaped.
        let report = reconciler
            .reconcile(
                observed.router,
                observed.incarnation,
                (0..10).map(SessionId::new),
            )
            .await
            .unwrap();
        assert!(report.summary.grace_cancelled);
        assert!(!monitor.is_held(observed.router));
        for _ in 0..30 {
            beat(&monitor);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(observed.sessions.iter().all(|s| !s.is_closed()));

        // Silent again, not held: now it is reaped.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(observed.count_reason(CloseReason::LivenessTimeout), 10);
        monitor.shutdown().await;
    }
}

/// Reconciliation and grace expiry close only `Active` sessions: one a
/// deletion (or the controller) marked `Terminating` is left alone.
#[tokio::test(start_paused = true)]
async fn terminating_sessions_are_left_to_their_deletion() {
    let (store, observed, reconciler, _events) = disconnected_setup(4).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(observed.sessions[0].begin_terminating().won());
    let report = reconciler
        .reconcile(observed.router, observed.incarnation, ids([]))
        .await
        .unwrap();
    assert_eq!(report.closed, ids([1, 2, 3]));
    assert!(!observed.sessions[0].is_closed());

    // The same for a grace expiry.
    let (store2, observed2, reconciler2, _events2) = disconnected_setup(4).await;
    assert!(observed2.sessions[3].begin_terminating().won());
    reconciler2
        .router_disconnected(observed2.router)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(observed2.count_reason(CloseReason::RouterLost), 3);
    assert!(!observed2.sessions[3].is_closed());
    assert_eq!(store2.count(observed2.router).await.unwrap(), 1);
    drop(store);
}

/// A reconnect while the expiry is closing sessions chunk by chunk stops
/// it: what the reconciliation kept stays open.
#[tokio::test(start_paused = true)]
async fn a_reconnect_stops_an_expiry_in_progress() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, RouterId::new(1), 0, 40).await;
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .chunk_size(1)
        .build(Arc::clone(&store))
        .expect("valid settings");
    reconciler
        .router_disconnected(observed.router)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    // Let the expiry close a few sessions, one chunk per yield.
    while observed.count_reason(CloseReason::RouterLost) < 3 {
        tokio::task::yield_now().await;
    }
    let report = reconciler
        .reconcile(observed.router, observed.incarnation, ids(0..40))
        .await
        .unwrap();
    assert!(report.summary.grace_cancelled);
    let lost = observed.count_reason(CloseReason::RouterLost);
    assert!(lost < 40, "the expiry was stopped");
    assert_eq!(report.drop.len(), lost, "the router drops what was lost");
    assert_eq!(report.summary.matched, 40 - lost);
    // Long after: the expiry never resumed.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(observed.count_reason(CloseReason::RouterLost), lost);
    assert_eq!(store.count(observed.router).await.unwrap(), 40 - lost);
    assert_eq!(reconciler.in_grace(), 0);
}

/// Issue #17, item 7: with the default `spare_younger_than` (zero), a
/// session created before the call (in the same instant of a paused clock)
/// and missing from the report is closed: only sessions created after the
/// call started are spared.
#[tokio::test(start_paused = true)]
async fn by_default_only_sessions_created_after_the_call_are_spared() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let lost = store
        .create(NewSession::new(SessionId::new(1), router, incarnation))
        .await
        .unwrap();
    let reconciler = Reconciler::builder()
        .build(Arc::clone(&store))
        .expect("valid settings");
    let report = reconciler
        .reconcile(router, incarnation, Vec::<SessionId>::new())
        .await
        .unwrap();
    assert_eq!((report.summary.closed, report.summary.spared), (1, 0));
    assert_eq!(lost.close_reason(), Some(CloseReason::Reclaimed));
    assert!(store.is_empty());
}
