//! Adversarial use of the `Lifecycle` facade: builds that fail half-way,
//! shutdowns raced, dropped mid-queue-drain and repeated, handles dropped
//! mid-deletion, work asked for after shutdown, and grace periods cut by a
//! shutdown (paused time).
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::expiry::{ExpiryMonitor, TrackError};
use session_lifecycle::reclaim::{ReclaimError, ReclaimTask};
use session_lifecycle::test_util::{HOUR, Notify, ObservedRouter, ScriptedNotifier, within};
use session_lifecycle::{
    BuildError, CloseReason, Event, EventBus, Lifecycle, LifecycleBuilder, LivenessMonitor,
    MemoryStore, NewSession, NotifyError, ReclaimQueue, Reconciler, RouterDeleter, RouterId,
    SessionId, SessionStore, TerminationBatch, TerminationNotifier, deleter::DeleteError,
};
use tokio::time::Duration;

/// A notifier that holds nothing of the store and never confirms.
struct Deaf;

impl TerminationNotifier for Deaf {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// A `Lifecycle` whose routers answer every notice with an error: each
/// deletion forces its sessions after `confirm_secs`, with no retry.
fn unanswered<P: Send + Sync + 'static>(
    store: &Arc<MemoryStore<P>>,
    confirm_secs: u64,
) -> LifecycleBuilder<MemoryStore<P>, Arc<ScriptedNotifier<MemoryStore<P>>>> {
    let notifier = ScriptedNotifier::always(Arc::clone(store), Notify::Error);
    Lifecycle::builder(Arc::clone(store), notifier).deleter(
        RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(confirm_secs))
            .retries(0),
    )
}

fn released(observed: &ObservedRouter) -> Vec<usize> {
    observed
        .releases
        .iter()
        .map(|count| count.load(Ordering::SeqCst))
        .collect()
}

/// Awaits every session's completed close (its resources released, by
/// the closer or through the queue), then checks each resource of
/// `observed` was released.
async fn all_released(observed: &ObservedRouter) {
    for session in &observed.sessions {
        session.closed().await;
    }
    let released = released(observed);
    assert!(!released.contains(&0), "closed, not released: {released:?}");
}

/// Every resource released, and still exactly once a minute later; I1.
async fn released_once_and_deleted(observed: ObservedRouter, store: &MemoryStore, sessions: usize) {
    within(HOUR, all_released(&observed)).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(released(&observed), vec![1; sessions]);
    observed.assert_deleted(store).await;
}

/// "Nothing keeps running after an error": the deleter, the liveness
/// monitor, the reconciler and the queue were built before the expiry
/// monitor refused its tick; none of them may keep a task (and with it the
/// store) alive.
#[tokio::test(start_paused = true)]
async fn a_build_refused_late_leaves_nothing_running() {
    let store = Arc::new(MemoryStore::new());
    within(HOUR, async {
        let refused = Lifecycle::builder(Arc::clone(&store), Deaf)
            .expiry(ExpiryMonitor::builder().tick(Duration::ZERO))
            .build();
        let error = refused.unwrap_err();
        assert_eq!(error.refused_setting(), Some("tick"), "{error}");
        // Let every aborted task unwind; then only this test holds the store.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "a piece built before the refusal still holds the store"
        );
    })
    .await;
}

/// A refused sweeper (the last piece built) leaves nothing running either.
#[tokio::test(start_paused = true)]
async fn a_build_refused_by_the_last_piece_leaves_nothing_running() {
    let store = Arc::new(MemoryStore::new());
    within(HOUR, async {
        let refused = Lifecycle::builder(Arc::clone(&store), Deaf)
            .sweeper(session_lifecycle::AuditSweeper::builder().events(EventBus::default()))
            .build();
        assert_eq!(refused.unwrap_err().refused_setting(), Some("sweeper"));
        tokio::task::yield_now().await;
        assert_eq!(Arc::strong_count(&store), 1);
    })
    .await;
}

/// Two shutdowns raced while a deletion forces its sessions through the
/// queue: both return, the deletion completes, every resource is released
/// exactly once (I1), nothing is handed back twice.
#[tokio::test(start_paused = true)]
async fn concurrent_shutdowns_both_return_and_release_each_resource_once() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = unanswered(&store, 1).build().unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 30).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }

    let (first, second) = within(HOUR, async {
        tokio::join!(
            lifecycle.shutdown(Duration::from_secs(10)),
            lifecycle.shutdown(Duration::from_secs(10)),
        )
    })
    .await;
    let handed_back = first.reclaim.left.len() + second.reclaim.left.len();
    drop((first, second)); // dropped handed-back tasks release at once
    let outcome = within(HOUR, deletion).await.unwrap().unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(30));
    within(HOUR, all_released(&router)).await;
    assert_eq!(released(&router), vec![1; 30], "handed back: {handed_back}");
    router.assert_deleted(&*store).await;
}

/// The shutdown future dropped while the queue drains a slow release,
/// then called again: the second call returns (no hang), and the release
/// runs exactly once.
#[tokio::test(start_paused = true)]
async fn a_shutdown_dropped_while_the_queue_drains_then_called_again_returns() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .reclaim(ReclaimQueue::builder().workers(1))
        .build()
        .unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ran);
    let slow = ReclaimTask::new(SessionId::new(1), RouterId::new(9), move || {
        let counter = Arc::clone(&counter);
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<(), ReclaimError>(())
        }
    });
    lifecycle.reclaim().push(slow).await.unwrap();
    tokio::task::yield_now().await;

    let gave_up = tokio::time::timeout(Duration::from_secs(1), lifecycle.shutdown(HOUR)).await;
    assert!(gave_up.is_err(), "the release takes ten seconds");
    let again = within(HOUR, lifecycle.shutdown(HOUR)).await;
    assert!(again.reclaim.left.is_empty(), "{again:?}");
    within(HOUR, async {
        while ran.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(ran.load(Ordering::SeqCst), 1, "ran exactly once");
    let stats = lifecycle.reclaim().stats();
    assert_eq!(stats.completed, 1, "{stats:?}");
}

/// Every `Lifecycle` handle dropped (no shutdown) while a deletion runs:
/// the run is owned by its task, so it completes and I1 holds, each
/// resource released exactly once, even though the queue's last handle is
/// gone from the controller's side.
#[tokio::test(start_paused = true)]
async fn dropping_the_lifecycle_mid_deletion_still_deletes_and_releases_once() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .deleter(
            RouterDeleter::builder()
                .notify_timeout(Duration::from_secs(1))
                .confirm_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .build()
        .unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 25).await;
    let bound = lifecycle.deleter().max_wait(25);
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }
    drop(lifecycle);

    let outcome = within(bound, deletion).await.unwrap().unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(25));
    released_once_and_deleted(router, &store, 25).await;
}

/// After shutdown: `create` still works but does not track ("nothing
/// closes it then"), `expiry().track` is a typed error, `delete` is
/// `ShuttingDown`, `stats` answers, and nothing panics or hangs.
#[tokio::test(start_paused = true)]
async fn after_shutdown_create_is_untracked_and_every_piece_answers_with_types() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .build()
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");

    let spec =
        NewSession::new(SessionId::new(1), router, incarnation).expires_in(Duration::from_secs(10));
    let session = within(HOUR, lifecycle.create(spec)).await.unwrap();
    assert_eq!(lifecycle.expiry().stats().tracked, 0);
    assert_eq!(
        lifecycle.expiry().track(&session),
        Err(TrackError::ShutDown)
    );
    tokio::time::sleep(HOUR).await;
    assert!(!session.is_closed(), "nothing expires after shutdown");

    let refused = within(HOUR, lifecycle.deleter().delete(router)).await;
    assert!(
        matches!(refused, Err(DeleteError::ShuttingDown)),
        "{refused:?}"
    );
    let stats = within(HOUR, lifecycle.stats()).await.unwrap();
    assert_eq!(stats.deletions_in_flight, Some(0));
    // The other pieces answer (typed results, no panic, no hang).
    let _ = lifecycle.liveness().heartbeat(&session);
    let _ = within(HOUR, lifecycle.liveness().heartbeat_id(session.id())).await;
    let _ = within(
        HOUR,
        lifecycle
            .reconciler()
            .reconcile(router, incarnation, [SessionId::new(1)]),
    )
    .await;
    let _ = within(HOUR, lifecycle.sweeper().unwrap().sweep()).await;
    assert!(!session.is_closed(), "reported by its router: kept");
    // A second shutdown reports nothing more.
    let again = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert!(again.is_complete(), "{again:?}");
}

/// Shutdown stops grace timers: "their routers keep their sessions", and
/// the liveness monitor stops convicting: a watched session of a router in
/// grace survives hours of silence after the shutdown.
#[tokio::test(start_paused = true)]
async fn a_router_in_grace_keeps_its_sessions_for_good_after_shutdown() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .reconciler(Reconciler::builder().grace_period(Duration::from_secs(30)))
        .liveness(LivenessMonitor::builder().heartbeat_interval(Duration::from_secs(1)))
        .build()
        .unwrap();
    let away = ObservedRouter::fill(&*store, RouterId::new(1), 0, 5).await;
    for session in &away.sessions {
        lifecycle.liveness().watch(session).unwrap();
    }
    lifecycle
        .reconciler()
        .router_disconnected(away.router)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;

    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert_eq!(shutdown.graces_stopped, 1, "{shutdown:?}");
    tokio::time::sleep(3 * HOUR).await;
    assert!(
        away.sessions.iter().all(|session| !session.is_closed()),
        "closed after shutdown: {:?}",
        away.sessions
            .iter()
            .map(|session| session.close_reason())
            .collect::<Vec<_>>()
    );
    assert_eq!(released(&away), vec![0; 5]);
    assert_eq!(store.count(away.router).await.unwrap(), 5);
}

/// A deletion finishing inside a shutdown publishes its events on the one
/// bus in order: the fence before the deletion's report.
#[tokio::test(start_paused = true)]
async fn a_deletion_finishing_in_the_shutdown_publishes_fence_then_report() {
    let bus = EventBus::new(4_096);
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build::<()>()
            .unwrap(),
    );
    let lifecycle = unanswered(&store, 1).events(bus).build().unwrap();
    let mut events = lifecycle.subscribe();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(30))).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    within(HOUR, deletion).await.unwrap().unwrap();

    let mut order = Vec::new();
    while let Some(event) = events.try_recv() {
        match event {
            Event::RouterFenced { .. } => order.push("fenced"),
            Event::RouterDeleted(_) => order.push("deleted"),
            _ => {}
        }
    }
    assert_eq!(order, ["fenced", "deleted"]);
    let reasons = router.count_reason(CloseReason::Forced);
    assert_eq!(reasons, 10);
    assert_eq!(released(&router), vec![1; 10]);
    router.assert_deleted(&*store).await;
}

/// Building outside a runtime is a typed error even with every piece set.
#[test]
fn build_outside_a_runtime_with_every_piece_set_is_a_typed_error() {
    let store = Arc::new(MemoryStore::new());
    let built = Lifecycle::builder(store, Deaf)
        .reconciler(Reconciler::builder().grace_period(Duration::from_secs(5)))
        .without_sweeper()
        .build();
    assert!(
        matches!(built, Err(BuildError::NoRuntime { .. })),
        "{built:?}"
    );
}

type ShutdownFn = Box<
    dyn Fn() -> std::pin::Pin<
            Box<dyn Future<Output = session_lifecycle::lifecycle::LifecycleShutdown> + Send>,
        > + Send
        + Sync,
>;

/// A notifier that, on its first call, shuts the whole lifecycle down from
/// inside `notify` (a controller whose "router gone" path stops the
/// process), then never confirms.
struct ShutsDown {
    hook: Arc<std::sync::OnceLock<ShutdownFn>>,
    calls: Arc<AtomicUsize>,
}

impl TerminationNotifier for ShutsDown {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(shutdown) = self.hook.get()
        {
            let _ = shutdown().await;
        }
        Ok(())
    }
}

/// I4 and I8 with the notifier re-entering the facade: `shutdown` called
/// from inside `notify` waits on the very deletion that waits on it. The
/// deletion must still end within its bound (the notify timeout cuts the
/// inner shutdown), with I1 holding.
#[tokio::test(start_paused = true)]
async fn a_notifier_that_shuts_the_lifecycle_down_from_inside_notify_cannot_wedge_it() {
    let store = Arc::new(MemoryStore::new());
    let hook: Arc<std::sync::OnceLock<ShutdownFn>> = Arc::new(std::sync::OnceLock::new());
    let notifier = ShutsDown {
        hook: Arc::clone(&hook),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .deleter(
            RouterDeleter::builder()
                .notify_timeout(Duration::from_secs(1))
                .confirm_timeout(Duration::from_secs(1))
                .retries(1),
        )
        .build()
        .unwrap();
    let inner = lifecycle.clone();
    let _ = hook.set(Box::new(move || {
        let inner = inner.clone();
        Box::pin(async move { inner.shutdown(HOUR).await })
    }));
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 8).await;
    let bound = lifecycle.deleter().max_wait(8);

    let outcome = within(bound, lifecycle.deleter().delete(router.router))
        .await
        .unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(8));
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert!(shutdown.deletions.is_empty(), "{shutdown:?}");
    drop(shutdown);
    released_once_and_deleted(router, &store, 8).await;
}

/// A router that never answers a probe; counts the rounds it was asked.
struct Mute(Arc<AtomicUsize>);

impl session_lifecycle::Prober for Mute {
    async fn probe(
        &self,
        _: session_lifecycle::liveness::ProbeBatch,
    ) -> Result<Vec<SessionId>, session_lifecycle::liveness::ProbeError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// "The monitor stops convicting" from the first poll of shutdown: silent
/// suspects in a probe round that never answers are not reaped afterwards,
/// however long the runtime lives; the shutdown returns by its deadline.
#[tokio::test(start_paused = true)]
async fn suspects_in_a_probe_round_at_shutdown_are_never_reaped_afterwards() {
    let store = Arc::new(MemoryStore::new());
    let probed = Arc::new(AtomicUsize::new(0));
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .prober(Mute(Arc::clone(&probed)))
        .liveness(LivenessMonitor::builder().heartbeat_interval(Duration::from_secs(1)))
        .build()
        .unwrap();
    let silent = ObservedRouter::fill(&*store, RouterId::new(1), 0, 6).await;
    for session in &silent.sessions {
        lifecycle.liveness().watch(session).unwrap();
    }
    within(HOUR, async {
        while probed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(silent.sessions.iter().all(|session| !session.is_closed()));

    let started = tokio::time::Instant::now();
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(2))).await;
    assert!(started.elapsed() <= Duration::from_secs(2), "{shutdown:?}");
    tokio::time::sleep(3 * HOUR).await;
    let reasons: Vec<_> = silent
        .sessions
        .iter()
        .map(|session| session.close_reason())
        .collect();
    assert_eq!(reasons, vec![None; 6], "convicted after shutdown");
    assert_eq!(lifecycle.liveness().stats().reaped, 0);
}

/// "Calling it again does nothing more than report what is still
/// running": a second shutdown does not stop the grace periods again.
#[tokio::test(start_paused = true)]
async fn a_second_shutdown_does_not_report_the_graces_stopped_again() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .build()
        .unwrap();
    let away = ObservedRouter::fill(&*store, RouterId::new(1), 0, 2).await;
    lifecycle
        .reconciler()
        .router_disconnected(away.router)
        .await
        .unwrap();
    let first = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert_eq!(first.graces_stopped, 1);
    let second = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert_eq!(second.graces_stopped, 0, "{second:?}");
    assert!(second.is_complete(), "{second:?}");
}

/// A deletion waiting behind `max_concurrent` when shutdown starts: its
/// caller is answered (no hang), and either the router was deleted (I1)
/// or it was never fenced ("the router stays live meanwhile").
#[tokio::test(start_paused = true)]
async fn a_deletion_queued_behind_the_cap_at_shutdown_is_answered_and_consistent() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .deleter(
            RouterDeleter::builder()
                .max_concurrent(1)
                .notify_timeout(Duration::from_secs(1))
                .confirm_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .build()
        .unwrap();
    let first = ObservedRouter::fill(&*store, RouterId::new(1), 0, 4).await;
    let queued = ObservedRouter::fill(&*store, RouterId::new(2), 100, 4).await;
    let running = tokio::spawn(lifecycle.deleter().delete(first.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }
    let waiting = tokio::spawn(lifecycle.deleter().delete(queued.router));
    while lifecycle.deleter().queued() == 0 {
        tokio::task::yield_now().await;
    }

    let shutdown = within(HOUR, lifecycle.shutdown(HOUR)).await;
    assert!(shutdown.deletions.is_empty(), "{shutdown:?}");
    drop(shutdown);
    within(HOUR, running).await.unwrap().unwrap();
    within(HOUR, all_released(&first)).await;
    first.assert_deleted(&*store).await;
    match within(HOUR, waiting).await.unwrap() {
        Ok(_) => {
            within(HOUR, all_released(&queued)).await;
            queued.assert_deleted(&*store).await;
        }
        Err(error) => {
            assert!(matches!(error, DeleteError::ShuttingDown), "{error:?}");
            let status = store.router_status(queued.router).await.unwrap();
            assert!(
                matches!(status, session_lifecycle::RouterStatus::Live(_)),
                "refused yet left {status:?}"
            );
            assert!(queued.sessions.iter().all(|session| !session.is_closed()));
        }
    }
}

/// The runtime dropped under a running deletion (the process's runtime
/// going away): dropping the Lifecycle afterwards does not panic, and a
/// new Lifecycle on the same store in a new runtime resumes the deletion
/// (the router stayed fenced), with I1: each resource released exactly once.
#[test]
fn the_runtime_dropped_mid_deletion_then_a_new_lifecycle_resumes_it() {
    let store = Arc::new(MemoryStore::new());
    let first = session_lifecycle::test_util::paused_runtime();
    let (lifecycle, router) = first.block_on(async {
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
        let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
            .build()
            .unwrap();
        let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 6).await;
        let _detached = tokio::spawn(lifecycle.deleter().delete(router.router));
        while lifecycle.deleter().running() == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        (lifecycle, router)
    });
    drop(first);
    drop(lifecycle);

    let second = session_lifecycle::test_util::paused_runtime();
    second.block_on(within(HOUR, async {
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
            .build()
            .unwrap();
        let outcome = lifecycle.deleter().delete(router.router).await.unwrap();
        assert!(outcome.report().is_some(), "{outcome:?}");
        let shutdown = lifecycle.shutdown(HOUR).await;
        assert!(shutdown.is_complete(), "{shutdown:?}");
        within(HOUR, all_released(&router)).await;
        assert_eq!(released(&router), vec![1; 6]);
        // I1 by hand: the kit's close waiters died with the first runtime.
        let status = store.router_status(router.router).await.unwrap();
        assert!(
            matches!(status, session_lifecycle::RouterStatus::Deleted(i) if i == router.incarnation),
            "{status:?}"
        );
        assert_eq!(store.count(router.router).await.unwrap(), 0);
        for session in &router.sessions {
            assert!(session.is_closed(), "{session:?}");
            assert!(store.get(session.id()).await.unwrap().is_none());
            // A close waiter started now wakes at once.
            within(Duration::from_secs(1), session.closed()).await;
        }
    }));
}

type Backref = Arc<std::sync::OnceLock<std::sync::Weak<MemoryStore<Reentrant>>>>;

/// A payload whose `Drop` reads the store synchronously (I8: "payload
/// `Drop` ... may call back into the store on every path").
#[derive(Default)]
struct Reentrant {
    store: Option<Backref>,
    router: u64,
    dropped: Option<Arc<AtomicUsize>>,
}

impl Drop for Reentrant {
    fn drop(&mut self) {
        let Some(store) = self.store.as_ref().and_then(|cell| cell.get()?.upgrade()) else {
            return;
        };
        let router = RouterId::new(self.router);
        let _ = futures::executor::block_on(store.count(router));
        let _ = futures::executor::block_on(store.router_status(router));
        let _ = futures::executor::block_on(store.audit());
        if let Some(dropped) = &self.dropped {
            dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// I8 through the facade during a shutdown: a deletion forced inside the
/// shutdown drops payloads whose `Drop` re-enters the store, and each
/// session's resource re-enters it on release. A lock held there would
/// deadlock the thread, so the scenario runs on its own thread, bounded in
/// real time.
#[test]
fn payload_drop_and_release_reentering_the_store_during_shutdown_do_not_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = session_lifecycle::test_util::paused_runtime();
        runtime.block_on(within(HOUR, async {
            let backref: Backref = Arc::new(std::sync::OnceLock::new());
            let store = Arc::new(MemoryStore::<Reentrant>::default());
            let _ = backref.set(Arc::downgrade(&store));
            let lifecycle = unanswered(&store, 1).build().unwrap();
            let router = RouterId::new(1);
            let incarnation = store.register_router(router).await.unwrap();
            let dropped = Arc::new(AtomicUsize::new(0));
            let releases = Arc::new(AtomicUsize::new(0));
            for id in 0..12 {
                let payload = Reentrant {
                    store: Some(Arc::clone(&backref)),
                    router: 1,
                    dropped: Some(Arc::clone(&dropped)),
                };
                let spec =
                    NewSession::new(SessionId::new(id), router, incarnation).payload(payload);
                let session = store.create(spec).await.unwrap();
                let (weak, count) = (Arc::downgrade(&store), Arc::clone(&releases));
                session
                    .attach(move |_: CloseReason| {
                        if let Some(store) = weak.upgrade() {
                            let _ = futures::executor::block_on(store.get(SessionId::new(id)));
                            let _ = futures::executor::block_on(store.count(router));
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                    })
                    .unwrap_or_else(|_| panic!("attach"));
                // The controller keeps no handle: the store's is the last.
            }
            let deletion = tokio::spawn(lifecycle.deleter().delete(router));
            while lifecycle.deleter().running() == 0 {
                tokio::task::yield_now().await;
            }
            let shutdown = lifecycle.shutdown(Duration::from_secs(30)).await;
            assert!(shutdown.is_complete(), "{shutdown:?}");
            let outcome = deletion.await.unwrap().unwrap();
            assert_eq!(outcome.report().map(|report| report.forced), Some(12));
            while releases.load(Ordering::SeqCst) < 12 || dropped.load(Ordering::SeqCst) < 12 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(releases.load(Ordering::SeqCst), 12, "released once each");
            assert_eq!(dropped.load(Ordering::SeqCst), 12, "dropped once each");
            assert_eq!(store.count(router).await.unwrap(), 0);
        }));
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("deadlocked (or panicked) re-entering the store from Drop/release");
}

/// The expiry monitor's closes in hand at shutdown, held up by a full
/// queue: reported still running, the queued release handed back, and
/// every expired session's resource released exactly once in the end.
#[tokio::test(start_paused = true)]
async fn expiry_closes_held_up_at_shutdown_release_each_resource_once() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .reclaim(ReclaimQueue::builder().capacity(1).paused(true))
        .build()
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let mut counts = Vec::new();
    let mut sessions = Vec::new();
    for id in 0..4 {
        let spec = NewSession::new(SessionId::new(id), router, incarnation)
            .expires_in(Duration::from_secs(1));
        let session = lifecycle.create(spec).await.unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        session
            .attach(move |_: CloseReason| {
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap_or_else(|_| panic!("attach"));
        counts.push(count);
        sessions.push(session);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sessions.iter().all(|session| session.is_closed()));

    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(1))).await;
    drop(shutdown);
    let load = |counts: &[Arc<AtomicUsize>]| -> Vec<usize> {
        counts.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    };
    within(HOUR, async {
        while load(&counts).contains(&0) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(load(&counts), vec![1; 4]);
    assert_eq!(
        store.count(router).await.unwrap(),
        0,
        "expired ones removed"
    );
}

/// Pieces wired elsewhere are refused for every piece the facade wires,
/// the expiry monitor and the shared notification budget included, naming
/// the piece.
#[tokio::test]
async fn build_refuses_expiry_and_budget_wiring_from_another_lifecycle() {
    let store = Arc::new(MemoryStore::new());
    let other = Lifecycle::builder(Arc::clone(&store), Deaf)
        .build()
        .unwrap();
    let budget = || {
        session_lifecycle::NotificationBudget::builder()
            .rate(100)
            .burst(10)
            .build()
            .unwrap()
    };
    let refused = [
        (
            "expiry",
            Lifecycle::builder(Arc::clone(&store), Deaf)
                .expiry(ExpiryMonitor::builder().events(other.events().clone()))
                .build(),
        ),
        (
            "expiry",
            Lifecycle::builder(Arc::clone(&store), Deaf)
                .expiry(ExpiryMonitor::builder().reclaim_queue(other.reclaim().clone()))
                .build(),
        ),
        (
            "liveness",
            Lifecycle::builder(Arc::clone(&store), Deaf)
                .liveness(LivenessMonitor::builder().reclaim_queue(other.reclaim().clone()))
                .build(),
        ),
        (
            "deleter",
            Lifecycle::builder(Arc::clone(&store), Deaf)
                .notification_budget(budget())
                .deleter(RouterDeleter::builder().notification_budget(budget()))
                .build(),
        ),
        (
            "liveness",
            Lifecycle::builder(Arc::clone(&store), Deaf)
                .liveness(LivenessMonitor::builder().notification_budget(budget()))
                .build(),
        ),
        (
            "reconciler",
            Lifecycle::builder(Arc::clone(&store), Deaf)
                .reconciler(Reconciler::builder().liveness(other.liveness()))
                .build(),
        ),
    ];
    for (piece, built) in refused {
        let error = built.unwrap_err();
        assert_eq!(error.refused_setting(), Some(piece), "{error}");
    }
}

/// `shutdown(Duration::MAX)` ("wait as long as it takes") with a deletion
/// and reclaim work in flight: no overflow panic, and it completes.
#[tokio::test(start_paused = true)]
async fn shutdown_with_an_unbounded_deadline_completes_without_overflow() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = unanswered(&store, 1).build().unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 5).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::MAX)).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    within(HOUR, deletion).await.unwrap().unwrap();
    assert_eq!(released(&router), vec![1; 5]);
    router.assert_deleted(&*store).await;
}

/// `shutdown(Duration::ZERO)` returns at once with work in hand; the
/// deletion goes on and ends with I1, each resource released once (the
/// queue is shut by then).
#[tokio::test(start_paused = true)]
async fn shutdown_with_a_zero_deadline_returns_at_once_and_loses_nothing() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = unanswered(&store, 1).build().unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 7).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }
    let mut events = lifecycle.subscribe();
    let started = tokio::time::Instant::now();
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::ZERO)).await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(shutdown.deletions, [router.router], "{shutdown:?}");
    drop(shutdown);
    let stats = within(HOUR, lifecycle.stats()).await.unwrap();
    assert_eq!(stats.deletions_in_flight, Some(1), "still running");
    within(HOUR, deletion).await.unwrap().unwrap();
    let stats = within(HOUR, lifecycle.stats()).await.unwrap();
    assert_eq!(stats.deletions_in_flight, Some(0));
    // The bus outlives the shutdown: the background run's report is seen.
    let mut reported = false;
    while let Some(event) = events.try_recv() {
        reported |=
            matches!(event, Event::RouterDeleted(ref report) if report.router == router.router);
    }
    assert!(
        reported,
        "the deletion's RouterDeleted event was not published"
    );
    released_once_and_deleted(router, &store, 7).await;
}

/// Sessions tracked for expiry before the shutdown "keep their expiry and
/// stay open": nothing closes them when it comes, nor releases their
/// resources.
#[tokio::test(start_paused = true)]
async fn sessions_tracked_for_expiry_before_shutdown_stay_open_after_it() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .build()
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for id in 0..5 {
        let spec = NewSession::new(SessionId::new(id), router, incarnation)
            .expires_in(Duration::from_secs(10 + id));
        let session = lifecycle.create(spec).await.unwrap();
        let counter = Arc::clone(&released);
        session
            .attach(move |_: CloseReason| {
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap_or_else(|_| panic!("attach"));
        sessions.push(session);
    }
    assert_eq!(lifecycle.expiry().stats().tracked, 5);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    tokio::time::sleep(2 * HOUR).await;
    assert!(sessions.iter().all(|session| !session.is_closed()));
    assert_eq!(released.load(Ordering::SeqCst), 0);
    assert_eq!(store.count(router).await.unwrap(), 5);
}

/// I4 with the shared budget: the controller drains the router's budget
/// through [`Lifecycle::notification_budget`] (its own messages) while a
/// deletion of that router runs, and a shutdown comes in the middle. The
/// deletion still ends within `max_wait`, with I1.
#[tokio::test(start_paused = true)]
async fn a_deletion_starved_of_budget_by_the_controller_still_ends_within_max_wait() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let budget = session_lifecycle::NotificationBudget::builder()
        .rate(1)
        .burst(1)
        .build()
        .unwrap();
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .notification_budget(budget)
        .deleter(
            RouterDeleter::builder()
                .batch_size(1)
                .confirm_timeout(Duration::from_secs(2))
                .retries(1),
        )
        .build()
        .unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 20).await;
    // The controller's own chatty messages to the router take its budget.
    let shared = lifecycle.notification_budget().unwrap().clone();
    let id = router.router;
    let hog = tokio::spawn(async move {
        loop {
            shared.acquire(id, 1).await;
        }
    });
    let bound = lifecycle.deleter().max_wait(20);
    let started = tokio::time::Instant::now();
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shutdown = within(HOUR, lifecycle.shutdown(HOUR)).await;
    let outcome = within(HOUR, deletion).await.unwrap().unwrap();
    let took = started.elapsed();
    hog.abort();
    assert!(
        took <= bound,
        "took {took:?}, bound {bound:?}: {shutdown:?}"
    );
    let report = outcome.report().unwrap();
    assert_eq!(report.confirmed + report.forced, 20, "{report:?}");
    within(HOUR, all_released(&router)).await;
    router.assert_deleted(&*store).await;
}

/// The shutdown future dropped while a deletion runs, then every handle
/// dropped with no second call: the queue was never shut, yet the
/// deletion's forced releases still run, each exactly once (I1, I5).
#[tokio::test(start_paused = true)]
async fn a_dropped_shutdown_then_a_dropped_lifecycle_still_releases_everything_once() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = unanswered(&store, 3).build().unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 9).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }
    let gave_up = tokio::time::timeout(Duration::from_secs(1), lifecycle.shutdown(HOUR)).await;
    assert!(
        gave_up.is_err(),
        "the deletion still waits for confirmations"
    );
    drop(lifecycle);

    let outcome = within(HOUR, deletion).await.unwrap().unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(9));
    released_once_and_deleted(router, &store, 9).await;
}
