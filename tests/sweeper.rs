//! The audit sweeper on a deliberately corrupted store (the `test-util`
//! hook), racing a deletion.
#![cfg(feature = "test-util")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::test_util::{
    Notify, ObservedRouter, Script, ScriptedNotifier, Subset, within,
};
use session_lifecycle::{
    AuditSweeper, Backoff, CloseReason, Event, EventBus, Incarnation, MemoryStore, NewSession,
    RouterDeleter, RouterId, Session, SessionId, SessionStore, store::Corruption,
    store::RepairAction,
};
use tokio::time::Duration;

/// A session built outside the store, with a counting resource: what a
/// buggy path (or a crash between two writes) could leave in the map.
fn stray(id: u64, router: RouterId, incarnation: Incarnation) -> (Session, Arc<AtomicUsize>) {
    let session = NewSession::new(SessionId::new(id), router, incarnation).into_session();
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    session
        .attach(move |reason: CloseReason| {
            assert_eq!(reason, CloseReason::Reclaimed);
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    (session, released)
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_repairs_a_corrupted_store_while_a_deletion_runs() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(1_024);
    let mut events = bus.subscribe();

    // Router 1 stays live and gets corrupted.
    let live = ObservedRouter::fill(&*store, RouterId::new(1), 0, 20).await;
    store.corrupt(Corruption::Unindex(SessionId::new(1)));
    store.corrupt(Corruption::DropFromMap(SessionId::new(2)));
    let _ = live.sessions[3].close(CloseReason::ClientClosed); // lingers in the store
    let _ = live.sessions[4].close(CloseReason::ClientClosed);
    store.corrupt(Corruption::DropFromMap(SessionId::new(4)));

    // Orphans: of a deleted router, of an unknown router, and of router 1's
    // older incarnation.
    let gone = RouterId::new(2);
    let gone_inc = store.register_router(gone).await.unwrap();
    store.fence(gone).await.unwrap();
    store.finish(gone, gone_inc).await.unwrap();
    let (orphan_deleted, rel_deleted) = stray(500, gone, gone_inc);
    let (orphan_unknown, rel_unknown) = stray(501, RouterId::new(77), gone_inc);
    let older = Incarnation::new(live.incarnation.get() - 1);
    let (orphan_older, rel_older) = stray(502, live.router, older);
    for orphan in [&orphan_deleted, &orphan_unknown, &orphan_older] {
        store.corrupt(Corruption::Inject(orphan.clone()));
    }

    // Router 3 is being deleted meanwhile: it confirms half its sessions
    // slowly and never the rest, so the sweep lands in its wait.
    let deleting = ObservedRouter::fill(&*store, RouterId::new(3), 1_000, 50).await;
    let notifier = ScriptedNotifier::new(
        Arc::clone(&store),
        Script::by_round(Notify::Confirm(Subset::EvenIds), Notify::Never),
    );
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(5))
        .notify_timeout(Duration::from_secs(1))
        .backoff(
            Backoff::new()
                .retries(1)
                .delays(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .build(Arc::clone(&store), notifier)
        .expect("valid settings");
    let deletion = tokio::spawn(deleter.delete(deleting.router));
    while deleter.running() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(deleter.running(), 1, "the deletion is in flight");

    let before = store.audit().await.unwrap();
    assert!(!before.is_consistent(), "{before:?}");
    let sweeper = AuditSweeper::builder()
        .events(bus.clone())
        .build(Arc::clone(&store))
        .unwrap();
    // Three sweeps back to back, all racing the deletion. A closed session
    // left in the store is removed on its second sighting; the third sweep
    // finds nothing left to do.
    let report = sweeper.sweep().await.unwrap();
    let second = sweeper.sweep().await.unwrap();
    let lingering: Vec<_> = second
        .repairs
        .iter()
        .map(|r| (r.session, r.action))
        .collect();
    assert_eq!(
        lingering,
        vec![(SessionId::new(3), RepairAction::ClosedRemoved)]
    );
    let third = sweeper.sweep().await.unwrap();
    assert!(third.repairs.is_empty(), "{third:?}");

    let repaired: HashSet<(u64, RepairAction)> = report
        .repairs
        .iter()
        .map(|r| (r.session.get(), r.action))
        .collect();
    let expected: HashSet<(u64, RepairAction)> = [
        (1, RepairAction::Reindexed),
        (2, RepairAction::Restored),
        (4, RepairAction::DroppedIndexEntry),
        (500, RepairAction::OrphanReclaimed),
        (501, RepairAction::OrphanReclaimed),
        (502, RepairAction::OrphanReclaimed),
    ]
    .into_iter()
    .collect();
    // Sessions of router 3 the router confirmed by closing through the
    // store are removed already; none of router 3's appears in a repair.
    assert_eq!(repaired, expected, "{report:?}");

    // Orphans closed once with `Reclaimed`, and gone.
    for (orphan, released) in [
        (&orphan_deleted, &rel_deleted),
        (&orphan_unknown, &rel_unknown),
        (&orphan_older, &rel_older),
    ] {
        assert_eq!(orphan.close_reason(), Some(CloseReason::Reclaimed));
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert!(store.get(orphan.id()).await.unwrap().is_none());
    }
    // Live router: repaired sessions open and reachable both ways.
    for id in [1, 2] {
        let held = store.get(SessionId::new(id)).await.unwrap().unwrap();
        assert!(!held.is_closed());
        assert!(
            store
                .sessions(live.router)
                .await
                .unwrap()
                .iter()
                .any(|s| s.id() == held.id())
        );
    }
    assert_eq!(store.count(live.router).await.unwrap(), 18);

    // The deletion finishes untouched: every resource released once.
    let outcome = within(Duration::from_secs(60), deletion)
        .await
        .unwrap()
        .unwrap();
    let report_d = outcome.report().unwrap();
    assert_eq!(report_d.sessions, 50);
    assert_eq!(report_d.confirmed + report_d.forced, 50, "{report_d:?}");
    deleting.assert_deleted(&*store).await;
    // Router 1: the two closed sessions released once, the rest untouched.
    for (at, released) in live.releases.iter().enumerate() {
        let expected = usize::from(at == 3 || at == 4);
        assert_eq!(released.load(Ordering::SeqCst), expected, "session {at}");
    }
    let after = store.audit().await.unwrap();
    assert!(after.is_clean(), "{after:?}");

    // One event per repair, in the sweep's order.
    let mut published = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Repaired(repair) = event {
            published.push(repair);
        }
    }
    let all: Vec<_> = report
        .repairs
        .iter()
        .chain(&second.repairs)
        .copied()
        .collect();
    assert_eq!(published, all);
    let stats = sweeper.stats();
    assert_eq!((stats.sweeps, stats.repairs, stats.failures), (3, 7, 0));
    assert_eq!(sweeper.last_report(), Some(third));
    sweeper.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_periodic_sweep_finds_an_orphan_on_its_own() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    let sweeper = AuditSweeper::builder()
        .interval(Duration::from_secs(10))
        .events(bus)
        .build(Arc::clone(&store))
        .unwrap();
    let (orphan, released) = stray(9, RouterId::new(5), Incarnation::new(1));
    store.corrupt(Corruption::Inject(orphan.clone()));

    let repair = within(Duration::from_secs(11), async {
        loop {
            if let Some(Event::Repaired(repair)) = events.recv().await {
                return repair;
            }
        }
    })
    .await;
    assert_eq!(repair.session, orphan.id());
    assert_eq!(repair.action, RepairAction::OrphanReclaimed);
    assert_eq!(released.load(Ordering::SeqCst), 1);
    assert!(store.is_empty());
    within(Duration::from_secs(1), sweeper.shutdown()).await;
    assert_eq!(sweeper.stats().sweeps, 1);
}

#[tokio::test(start_paused = true)]
async fn a_sweeper_needs_an_interval() {
    let store = Arc::new(MemoryStore::new());
    let built = AuditSweeper::builder()
        .interval(Duration::ZERO)
        .build(store);
    assert_eq!(built.unwrap_err().refused_setting(), Some("interval"));
}

#[tokio::test(start_paused = true)]
async fn a_sweep_leaves_a_fenced_routers_sessions_to_its_deletion() {
    let store = Arc::new(MemoryStore::new());
    let doomed = ObservedRouter::fill(&*store, RouterId::new(1), 0, 4).await;
    // The deletion's force phase, half-way: fenced, one session closed
    // through its handle, one missing from the index, none removed yet.
    let snapshot = store.fence(doomed.router).await.unwrap();
    assert_eq!(snapshot.sessions.len(), 4);
    let _ = doomed.sessions[0].close(CloseReason::Forced);
    store.corrupt(Corruption::Unindex(SessionId::new(1)));
    let sweeper = AuditSweeper::builder().build(Arc::clone(&store)).unwrap();
    let report = sweeper.sweep().await.unwrap();
    assert_eq!(report.audit.closed_in_store, vec![SessionId::new(0)]);
    assert!(report.repairs.is_empty(), "{report:?}");
    assert!(!doomed.sessions[1].is_closed());

    // `finish` removes what its index holds; the unindexed session is then
    // an orphan of a deleted router, and the next sweep reclaims it.
    let finished = store
        .finish(doomed.router, doomed.incarnation)
        .await
        .unwrap();
    assert_eq!(finished.removed, 3);
    let report = sweeper.sweep().await.unwrap();
    let repairs: Vec<_> = report
        .repairs
        .iter()
        .map(|r| (r.session, r.action))
        .collect();
    assert_eq!(
        repairs,
        vec![(SessionId::new(1), RepairAction::OrphanReclaimed)]
    );
    assert!(
        doomed
            .releases
            .iter()
            .all(|r| r.load(Ordering::SeqCst) == 1)
    );
    assert!(store.audit().await.unwrap().is_clean());
    sweeper.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_stops_the_periodic_sweeps() {
    let store = Arc::new(MemoryStore::new());
    let sweeper = AuditSweeper::builder()
        .interval(Duration::from_secs(10))
        .build(Arc::clone(&store))
        .unwrap();
    drop(sweeper);
    let (orphan, released) = stray(9, RouterId::new(5), Incarnation::new(1));
    store.corrupt(Corruption::Inject(orphan));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(released.load(Ordering::SeqCst), 0, "no sweep ran");
    assert_eq!(store.len(), 1);
    assert_eq!(Arc::strong_count(&store), 1, "the task let go of the store");
}

/// Issue #21.4: each sweep runs the reclaim queue's long-lived check over
/// every open session; a session past the threshold is reported once
/// (event and counter), counted by every sweep while it lives, and a
/// closed one is not counted. Without a queue there is no check.
#[tokio::test(start_paused = true)]
async fn each_sweep_reports_long_lived_sessions_once_and_counts_them() {
    use session_lifecycle::ReclaimQueue;
    use session_lifecycle::reclaim::{DefaultPolicy, ReclaimEvent};

    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    let hour = Duration::from_secs(3_600);
    let queue = ReclaimQueue::builder()
        .policy(DefaultPolicy::default().long_lived_threshold(Some(hour)))
        .events(bus.clone())
        .build()
        .unwrap();
    let sweeper = AuditSweeper::builder()
        .reclaim_queue(queue.clone())
        .events(bus)
        .build(Arc::clone(&store))
        .unwrap();
    let mut old = Vec::new();
    for r in 1..=2u64 {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        for i in 0..3 {
            let spec = NewSession::new(SessionId::new(r * 10 + i), router, incarnation);
            old.push(store.create(spec).await.unwrap());
        }
    }
    tokio::time::advance(hour).await;
    // A young one, on router 1.
    let young = NewSession::new(
        SessionId::new(99),
        RouterId::new(1),
        store
            .router_status(RouterId::new(1))
            .await
            .unwrap()
            .incarnation(),
    );
    let young = store.create(young).await.unwrap();

    let report = sweeper.sweep().await.unwrap();
    assert_eq!(report.long_lived, Some(6));
    let reported: HashSet<SessionId> = std::iter::from_fn(|| events.try_recv())
        .filter_map(|event| match event {
            Event::Reclaim(ReclaimEvent::LongLivedSession { session, age, .. }) => {
                assert!(age >= hour);
                Some(session)
            }
            _ => None,
        })
        .collect();
    assert_eq!(reported, old.iter().map(Session::id).collect());
    assert_eq!(queue.stats().long_lived, 6);

    // Reported once; still counted while open; a closed one is not, even
    // while it is still in the store (closed through its handle only).
    assert!(old[0].close(CloseReason::ClientClosed).won());
    let report = sweeper.sweep().await.unwrap();
    assert_eq!(report.long_lived, Some(5));
    assert_eq!(queue.stats().long_lived, 6, "nobody reported twice");
    assert!(young.age() < hour);

    // Without a queue, no check.
    let plain = AuditSweeper::builder().build(Arc::clone(&store)).unwrap();
    assert_eq!(plain.sweep().await.unwrap().long_lived, None);
}
