//! `Lifecycle`: a controller wired in ten lines, and its ordered shutdown
//! (paused time).
#![cfg(feature = "test-util")]

use std::collections::BTreeSet;
use std::sync::Arc;

use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, Probe, ScriptedNotifier, ScriptedProber,
    Subset, within,
};
use session_lifecycle::{
    AuditSweeper, BuildError, CloseReason, Event, EventBus, Lifecycle, LivenessMonitor,
    MemoryStore, NewSession, ReclaimQueue, Reconciler, RouterDeleter, RouterId, SessionId,
    SessionStore, deleter::DeleteError, lifecycle::Piece, liveness::WatchError,
    reclaim::ReclaimError, reclaim::ReclaimTask, reconcile::ReconcileError, store::RepairAction,
};
use tokio::time::{Duration, Instant};

type Notifier = Arc<ScriptedNotifier<MemoryStore>>;

/// A lifecycle with every default over a fresh store, notifying through
/// `notify`.
fn wired(notify: Notify) -> (Arc<MemoryStore>, Lifecycle<MemoryStore, Notifier>) {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), notify);
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .build()
        .expect("default settings");
    (store, lifecycle)
}

/// A release task that finishes at once.
fn quick(id: u64) -> ReclaimTask {
    ReclaimTask::new(SessionId::new(id), RouterId::new(9), || async {
        Ok::<(), ReclaimError>(())
    })
}

#[tokio::test(start_paused = true)]
async fn a_controller_wired_in_ten_lines_creates_heartbeats_deletes_reconciles_and_sweeps() {
    // The wiring: one builder, every piece's settings, nothing by hand.
    let bus = EventBus::new(4_096);
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build::<()>()
            .unwrap(),
    );
    // Routers confirm even ids only; odd ones are forced, released by the queue.
    let routers = ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::EvenIds));
    let lifecycle = Lifecycle::builder(Arc::clone(&store), routers)
        .prober(ScriptedProber::always(Probe::nobody()))
        .events(bus)
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .liveness(LivenessMonitor::builder().heartbeat_interval(Duration::from_secs(1)))
        .reconciler(Reconciler::builder().grace_period(Duration::from_secs(30)))
        .sweeper(AuditSweeper::builder().interval(Duration::from_secs(600)))
        .build()
        .unwrap();
    let mut events = lifecycle.subscribe();
    let checker = InvariantChecker::new();

    // Create: router 1's sessions, deleted below; router 2's, watched.
    let doomed = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
    let watched = ObservedRouter::fill(&*store, RouterId::new(2), 100, 2).await;
    let (alive, dead) = (&watched.sessions[0], &watched.sessions[1]);
    for session in doomed.sessions.iter().chain(&watched.sessions) {
        checker.track(session);
    }
    lifecycle.liveness().watch(alive).unwrap();
    lifecycle.liveness().watch(dead).unwrap();
    checker.assert(&*store).await;

    // Heartbeat: `alive` beats, `dead` is reaped, through the queue.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        lifecycle.liveness().heartbeat(alive).unwrap();
    }
    assert_eq!(dead.close_reason(), Some(CloseReason::LivenessTimeout));
    assert!(!alive.is_closed());
    assert_eq!(
        lifecycle.reclaim().stats().completed,
        1,
        "the reap's release"
    );
    checker.assert(&*store).await;

    // Delete: 5 confirmed, 5 forced and released by the queue.
    let report = lifecycle.deleter().delete(doomed.router).await.unwrap();
    let report = report.report().unwrap();
    assert_eq!((report.confirmed, report.forced), (5, 5));
    lifecycle.reclaim().idle().await;
    assert_eq!(lifecycle.reclaim().stats().completed, 1 + 5);
    checker.assert(&*store).await;
    doomed.assert_deleted(&*store).await;

    // Reconcile: router 3 reports one of its three sessions and a ghost.
    let reconnecting = ObservedRouter::fill(&*store, RouterId::new(3), 200, 3).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reported = [SessionId::new(200), SessionId::new(999)];
    let reconciled = lifecycle
        .reconciler()
        .reconcile(reconnecting.router, reconnecting.incarnation, reported)
        .await
        .unwrap();
    assert_eq!(reconciled.drop, [SessionId::new(999)]);
    assert_eq!(reconciled.closed.len(), 2);
    lifecycle.reclaim().idle().await;
    assert_eq!(lifecycle.reclaim().stats().completed, 1 + 5 + 2);

    // Disconnect: the reconciler holds the router in the monitor.
    lifecycle
        .reconciler()
        .router_disconnected(watched.router)
        .await
        .unwrap();
    assert!(lifecycle.liveness().is_held(watched.router));

    // Sweep: a session closed through its handle only is removed when seen twice.
    let _ = reconnecting.sessions[0].close(CloseReason::ClientClosed);
    let sweeper = lifecycle.sweeper().unwrap();
    let _ = sweeper.sweep().await.unwrap();
    let swept = sweeper.sweep().await.unwrap();
    assert_eq!(swept.repairs.len(), 1);
    assert_eq!(swept.repairs[0].action, RepairAction::ClosedRemoved);
    checker.assert(&*store).await;

    // One subscription saw every piece, and the store, on the one bus.
    let mut seen = BTreeSet::new();
    while let Some(event) = events.try_recv() {
        seen.insert(match event {
            Event::SessionCreated { .. } => "created",
            Event::RouterDeleted(_) => "deleted",
            Event::Liveness(_) => "liveness",
            Event::Reconciled(_) => "reconciled",
            Event::RouterDisconnected { .. } => "disconnected",
            Event::Repaired(_) => "repaired",
            _ => continue,
        });
    }
    let expected = [
        "created",
        "deleted",
        "disconnected",
        "liveness",
        "reconciled",
        "repaired",
    ];
    assert_eq!(seen, BTreeSet::from(expected));
    let stats = lifecycle.stats().await.unwrap();
    assert_eq!(stats.deletions_in_flight, Some(0));
    assert_eq!(stats.routers_in_grace, Some(1));
    assert_eq!(stats.liveness.map(|liveness| liveness.reaped), Some(1));
    assert_eq!(stats.sweeper.map(|sweeper| sweeper.repairs), Some(1));
    assert_eq!(stats.reclaim.map(|reclaim| reclaim.completed), Some(8));

    // Shut down: nothing left; the router in grace keeps its sessions.
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(10))).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    assert_eq!(shutdown.graces_stopped, 1);
    assert!(!alive.is_closed());
    checker.assert(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_deletion_stuck_on_a_notifier_that_never_answers() {
    let (store, lifecycle) = wired(Notify::Never);
    let deaf = ObservedRouter::fill(&*store, RouterId::new(1), 0, 20).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(deaf.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }

    let started = Instant::now();
    let shutdown = lifecycle.shutdown(Duration::from_secs(2)).await;
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "cut at the deadline"
    );
    assert_eq!(shutdown.deletions, [deaf.router]);
    assert_eq!(shutdown.still_running, [Piece::Deleter]);
    assert!(shutdown.reclaim.left.is_empty() && shutdown.reclaim.interrupted.is_empty());
    assert!(!shutdown.is_complete());

    // The run goes on in its task and ends within its bound: I1 holds,
    // each resource released once (in the deleter: the queue is shut).
    let bound = lifecycle.deleter().max_wait(deaf.sessions.len());
    let outcome = within(bound, deletion).await.unwrap().unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(20));
    deaf.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_hands_back_the_reclaim_work_it_could_not_run() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let lifecycle = Lifecycle::builder(store, notifier)
        .reclaim(ReclaimQueue::builder().workers(1))
        .build()
        .unwrap();
    let queue = lifecycle.reclaim();
    // A release whose backend never answers holds the only worker.
    let hangs = ReclaimTask::new(SessionId::new(1), RouterId::new(9), || {
        std::future::pending::<Result<(), ReclaimError>>()
    });
    queue.push(hangs).await.unwrap();
    tokio::task::yield_now().await;
    for id in 2..5 {
        queue.push(quick(id)).await.unwrap();
    }

    let started = Instant::now();
    let shutdown = lifecycle.shutdown(Duration::from_secs(1)).await;
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert!(shutdown.deletions.is_empty() && shutdown.still_running.is_empty());
    assert!(!shutdown.reclaim.drained);
    let interrupted: Vec<_> = shutdown
        .reclaim
        .interrupted
        .iter()
        .map(|t| t.session)
        .collect();
    assert_eq!(interrupted, [SessionId::new(1)]);
    let left: Vec<_> = shutdown
        .reclaim
        .left
        .iter()
        .map(|t| t.info().session)
        .collect();
    assert_eq!(left, [2, 3, 4].map(SessionId::new));
    assert!(!shutdown.is_complete());
    // Handed back, not lost: the caller runs them.
    for mut task in shutdown.reclaim.left {
        task.run_once().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_clean_shutdown_reports_nothing_left_and_every_piece_refuses_new_work() {
    let (store, lifecycle) = wired(Notify::confirm_all());
    let deleted = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
    let _ = lifecycle.deleter().delete(deleted.router).await.unwrap();
    let kept = ObservedRouter::fill(&*store, RouterId::new(2), 100, 3).await;
    lifecycle.liveness().watch(&kept.sessions[0]).unwrap();

    let started = Instant::now();
    let shutdown = lifecycle.shutdown(HOUR).await;
    assert_eq!(started.elapsed(), Duration::ZERO, "nothing to wait for");
    assert!(shutdown.is_complete(), "{shutdown:?}");
    assert!(shutdown.reclaim.drained);
    assert_eq!(shutdown.graces_stopped, 0);
    deleted.assert_deleted(&*store).await;

    // Every piece is stopped for new work.
    let refused = lifecycle.deleter().delete(kept.router).await;
    assert!(
        matches!(refused, Err(DeleteError::ShuttingDown)),
        "{refused:?}"
    );
    let refused = lifecycle
        .reconciler()
        .router_disconnected(kept.router)
        .await;
    assert!(
        matches!(refused, Err(ReconcileError::ShutDown)),
        "{refused:?}"
    );
    assert_eq!(
        lifecycle.liveness().watch(&kept.sessions[1]),
        Err(WatchError::ShutDown)
    );
    assert!(lifecycle.reclaim().push(quick(1)).await.is_err());
    tokio::time::sleep(HOUR).await;
    let sweeps = lifecycle.sweeper().unwrap().stats().sweeps;
    assert_eq!(sweeps, 0, "no periodic sweep after shutdown");
    // Nobody was reaped or closed after shutdown.
    assert!(kept.sessions.iter().all(|session| !session.is_closed()));
}

#[tokio::test(start_paused = true)]
async fn the_queue_drains_last_so_a_deletion_finishing_in_the_shutdown_releases_through_it() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Error);
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .build()
        .unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 50).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }

    // The deletion forces its sessions during the shutdown, a second in.
    let shutdown = lifecycle.shutdown(Duration::from_secs(10)).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    let stats = lifecycle.reclaim().stats();
    assert_eq!(
        stats.completed, 50,
        "forced releases ran in the queue, not inline"
    );
    let outcome = deletion.await.unwrap().unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(50));
    router.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn a_grace_expiry_held_up_by_a_full_queue_is_reported_still_running() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    // A paused queue of one slot: the expiry's second release waits for room.
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .reclaim(ReclaimQueue::builder().capacity(1).paused(true))
        .reconciler(Reconciler::builder().grace_period(Duration::from_secs(1)))
        .build()
        .unwrap();
    let lost = ObservedRouter::fill(&*store, RouterId::new(1), 0, 3).await;
    lifecycle
        .reconciler()
        .router_disconnected(lost.router)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        lost.sessions.iter().all(|session| session.is_closed()),
        "expiry closed them"
    );

    let started = Instant::now();
    let shutdown = lifecycle.shutdown(Duration::from_secs(1)).await;
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(shutdown.still_running, [Piece::Reconciler]);
    assert!(shutdown.deletions.is_empty());
    assert_eq!(
        shutdown.reclaim.left.len(),
        1,
        "the queued release is handed back"
    );
    drop(shutdown); // dropping a handed-back release runs it
    // Nothing released twice or lost: every counter ends at one.
    let released = |observed: &ObservedRouter| -> Vec<usize> {
        let load = |count: &Arc<std::sync::atomic::AtomicUsize>| {
            count.load(std::sync::atomic::Ordering::SeqCst)
        };
        observed.releases.iter().map(load).collect()
    };
    assert_eq!(released(&lost), [1, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_shutdown_leaves_the_pieces_refusing_work_and_a_second_call_finishes() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .deleter(
            RouterDeleter::builder()
                .notify_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .build()
        .unwrap();
    let deaf = ObservedRouter::fill(&*store, RouterId::new(1), 0, 5).await;
    let other = store.register_router(RouterId::new(2)).await.unwrap();
    let deletion = tokio::spawn(lifecycle.deleter().delete(deaf.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }

    // The caller gives up on the shutdown after a second.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), lifecycle.shutdown(HOUR)).await;
    assert!(gave_up.is_err());
    let refused = lifecycle.deleter().delete(RouterId::new(2)).await;
    assert!(
        matches!(refused, Err(DeleteError::ShuttingDown)),
        "{refused:?}"
    );
    let spec = NewSession::new(SessionId::new(50), RouterId::new(2), other);
    let late = store.create(spec).await.unwrap();
    assert_eq!(lifecycle.liveness().watch(&late), Err(WatchError::ShutDown));
    // The queue was not reached: it still takes work.
    lifecycle.reclaim().push(quick(7)).await.unwrap();

    // A second call waits for the deletion and drains the queue.
    let shutdown = within(HOUR, lifecycle.shutdown(HOUR)).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    assert_eq!(lifecycle.reclaim().stats().completed, 1 + 5);
    assert!(deletion.await.unwrap().is_ok());
    deaf.assert_deleted(&*store).await;
}

#[tokio::test]
async fn build_refuses_a_piece_wired_by_hand_and_passes_on_a_piece_refusal() {
    let store = Arc::new(MemoryStore::new());
    let builder = || {
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        Lifecycle::builder(Arc::clone(&store), notifier)
    };
    let bus = EventBus::default;
    let queue = || ReclaimQueue::builder().build().unwrap();
    let monitor = LivenessMonitor::builder()
        .build(
            Arc::clone(&store),
            ScriptedProber::always(Probe::everyone()),
        )
        .unwrap();
    let refusals = [
        (
            "reclaim",
            builder()
                .reclaim(ReclaimQueue::builder().events(bus()))
                .build(),
        ),
        (
            "deleter",
            builder()
                .deleter(RouterDeleter::builder().reclaim_queue(queue()))
                .build(),
        ),
        (
            "liveness",
            builder()
                .liveness(LivenessMonitor::builder().events(bus()))
                .build(),
        ),
        (
            "reconciler",
            builder()
                .reconciler(Reconciler::builder().liveness(&monitor))
                .build(),
        ),
        (
            "sweeper",
            builder()
                .sweeper(AuditSweeper::builder().reclaim_queue(queue()))
                .build(),
        ),
    ];
    for (piece, built) in refusals {
        let refused = built.unwrap_err();
        assert_eq!(refused.refused_setting(), Some(piece), "{refused}");
    }
    let refused = builder()
        .deleter(RouterDeleter::builder().batch_size(0))
        .build();
    assert_eq!(refused.unwrap_err().refused_setting(), Some("batch_size"));
    // Without a sweeper, a sweeper's wiring does not matter: there is none.
    let built = builder()
        .sweeper(AuditSweeper::builder().events(bus()))
        .without_sweeper()
        .build();
    assert!(built.unwrap().sweeper().is_none());
}

#[test]
fn build_outside_a_runtime_is_an_error_not_a_panic() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let built = Lifecycle::builder(store, notifier).build();
    assert!(
        matches!(built, Err(BuildError::NoRuntime { .. })),
        "{built:?}"
    );
}

/// A payload that counts down its drops and says when the last came.
struct Dropped {
    left: Arc<std::sync::atomic::AtomicUsize>,
    all: Arc<tokio::sync::Notify>,
}

impl Drop for Dropped {
    fn drop(&mut self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.all.notify_one();
        }
    }
}

/// A router that never answers a probe; says when it was first asked.
struct Mute(Arc<tokio::sync::Notify>);

impl session_lifecycle::Prober for Mute {
    async fn probe(
        &self,
        _: session_lifecycle::liveness::ProbeBatch,
    ) -> Result<Vec<SessionId>, session_lifecycle::liveness::ProbeError> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// A controller deletes a router while the liveness monitor holds its
/// sessions (heartbeating ones in its wheel, silent ones in a probe round)
/// and the expiry monitor holds them all (hour-long expiries): once the
/// deletion returned and the controller dropped its handles, the pieces
/// let every payload go within the liveness bound and the expiry sweep's
/// minute, not when the hour (or the expiry wheel's 27-minute turn) comes.
#[tokio::test(start_paused = true)]
async fn after_a_deletion_no_piece_keeps_the_routers_sessions_alive() {
    let store = Arc::new(MemoryStore::<Dropped>::default());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::EvenIds));
    let probed = Arc::new(tokio::sync::Notify::new());
    let lifecycle = Arc::new(
        Lifecycle::builder(Arc::clone(&store), notifier)
            .prober(Mute(Arc::clone(&probed)))
            .deleter(
                RouterDeleter::builder()
                    .confirm_timeout(Duration::from_millis(100))
                    .retries(0),
            )
            .build()
            .expect("valid settings"),
    );
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(40));
    let all = Arc::new(tokio::sync::Notify::new());
    let mut beating = Vec::new();
    for i in 0..40 {
        let payload = Dropped {
            left: Arc::clone(&left),
            all: Arc::clone(&all),
        };
        let spec = NewSession::new(SessionId::new(i), router, incarnation)
            .payload(payload)
            .expires_in(HOUR);
        let session = lifecycle.create(spec).await.unwrap();
        lifecycle.liveness().watch(&session).unwrap();
        if i % 2 == 0 {
            beating.push(session.id());
        }
    }
    assert_eq!(lifecycle.expiry().stats().tracked, 40);
    // Half heartbeat by id (holding no handle), until their sessions go.
    let heart = Arc::clone(&lifecycle);
    let heartbeats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for &id in &beating {
                if heart.liveness().heartbeat_id(id).await.is_err() {
                    return;
                }
            }
        }
    });
    // The silent half are suspects, in a probe round that will not end
    // before its timeout.
    within(HOUR, probed.notified()).await;

    let outcome = lifecycle.deleter().delete(router).await.unwrap();
    let report = outcome.report().expect("deleted by this call");
    assert_eq!(report.confirmed + report.forced, 40, "{report:?}");
    let deleted_at = Instant::now();
    within(HOUR, heartbeats).await.unwrap();
    within(HOUR, all.notified()).await;
    let held = Instant::now() - deleted_at;
    let bound = lifecycle
        .liveness()
        .reap_bound(Duration::from_secs(60))
        .max(Duration::from_secs(60) + Duration::from_millis(100));
    assert!(
        held <= bound,
        "held {held:?} after the deletion (bound {bound:?})"
    );
    assert_eq!(lifecycle.expiry().stats().tracked, 0);
    assert_eq!(lifecycle.liveness().stats().reaped, 0, "the deletion's");
}

/// An idle controller costs next to no timer: a `Lifecycle` with every
/// default and nothing to do parks its runtime a few hundred times a
/// paused hour (the audit sweeper's sweep a minute, a few parks each: 224
/// measured), not a few times per liveness tick (198,000 an hour before
/// the monitor rested with nothing watched), so tests that let hours pass
/// stay fast.
#[tokio::test(start_paused = true)]
async fn an_idle_lifecycle_costs_next_to_no_timer() {
    let (_store, lifecycle) = wired(Notify::Confirm(Subset::All));
    tokio::task::yield_now().await;
    let parks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .worker_park_count(0)
    };
    let before = parks();
    tokio::time::sleep(HOUR).await;
    let idle = parks() - before;
    assert!(
        idle <= 1_000,
        "an idle lifecycle parked {idle} times an hour"
    );
    within(HOUR, lifecycle.shutdown(HOUR)).await;
}
