//! Adversarial suite for `RouterDeleter` (issue #17), written as a
//! controller author would, with the public API and the test kit only.
//!
//! - The controller loop of item 1 on a multi-thread runtime: register a
//!   router, create a session, delete the router, again and again, waiting
//!   from a task, from `block_in_place`, for several routers at once, racing
//!   another task's delete, racing `delete_incarnation` of the old and the
//!   new life. Every deletion answers for the life just registered.
//! - `delete_incarnation`: late and duplicated requests, newer-than-any
//!   incarnations, joins with itself and with `delete`.
//! - Misbehaving notifiers: late confirmations from spawned tasks after the
//!   ids were reused, futures dropped mid-way, errors, hangs, panics (in the
//!   future and before it), clients closing instead of confirming, and calls
//!   back into the deleter (the same router, another one, `running`,
//!   `delete_incarnation`, `shutdown`). Each deletion stays within
//!   `max_wait` (I4), leaves nothing behind (I1, `ObservedRouter`), keeps the
//!   store's invariants (`InvariantChecker`), and its report adds up.
//!
//! `SESSION_LIFECYCLE_SOAK=n` repeats the loops `n` times as long.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures::FutureExt;
use session_lifecycle::test_util::conformance::soak_rounds;
use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, Script, ScriptedNotifier, Subset,
    report_within, within,
};
use session_lifecycle::{
    Backoff, CloseReason, Incarnation, MemoryStore, NewSession, NotifyError, RouterDeleter,
    RouterId, Session, SessionId, SessionKey, SessionState, SessionStore, TerminationBatch,
    TerminationNotifier, deleter::DeleteError, deleter::DeleteOutcome, deleter::DeletionReport,
    deleter::RouterDeleterBuilder, store::RouterStatus,
};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Duration;

const R: RouterId = RouterId::new(1);
const OTHER: RouterId = RouterId::new(2);
/// Sessions per router in the notifier scenarios: two batches of four.
const SESSIONS: u64 = 8;
/// Untimed work on top of `max_wait`: none takes time on a paused clock.
const SLACK: Duration = Duration::from_millis(10);
/// Iterations of each controller loop (times `SESSION_LIFECYCLE_SOAK`). On
/// the code before the fix of item 1 (797d467), every loop below met a
/// stale run within its first ~600 iterations (most within 20), in well
/// under a second; 2,000 leaves a margin and takes about 0.2 s each.
const LOOP: u64 = 2_000;
/// A real-clock watchdog for the multi-thread loops: a hang fails.
const WATCHDOG: Duration = Duration::from_secs(120);

type Kit = ScriptedNotifier<MemoryStore>;

fn iterations() -> u64 {
    LOOP * soak_rounds(1)
}

// ---------------------------------------------------------------------------
// Item 1: register, create, delete, in a loop on a multi-thread runtime.
// ---------------------------------------------------------------------------

/// One life of a router: its incarnation and the session created in it.
struct Life {
    router: RouterId,
    incarnation: Incarnation,
    session: Session,
}

/// A controller whose routers confirm every termination at once.
fn confirming(store: &Arc<MemoryStore>) -> RouterDeleter<MemoryStore, Arc<Kit>> {
    let routers = ScriptedNotifier::always(Arc::clone(store), Notify::confirm_all());
    RouterDeleter::new(Arc::clone(store), routers)
}

/// Registers `router` again (it must succeed: its last life was deleted)
/// and creates session `id` on it.
async fn new_life(store: &MemoryStore, router: RouterId, id: u64, round: u64) -> Life {
    let incarnation = store
        .register_router(router)
        .await
        .unwrap_or_else(|e| panic!("round {round}: {router} cannot be registered again: {e}"));
    let session = store
        .create(NewSession::new(SessionId::new(id), router, incarnation))
        .await
        .unwrap_or_else(|e| panic!("round {round}: create on {router} failed: {e}"));
    Life {
        router,
        incarnation,
        session,
    }
}

/// What the controller relies on once `delete(router)` returned: the
/// report is this life's, its session is closed and gone, the router is
/// deleted in this incarnation; and, if given, `running()` read right
/// after the return was 0.
async fn assert_life_deleted(
    store: &MemoryStore,
    life: &Life,
    outcome: Result<DeleteOutcome, DeleteError>,
    running: Option<usize>,
    round: u64,
) -> DeletionReport {
    let label = format!("round {round}: {} in {}", life.router, life.incarnation);
    let state = life.session.state();
    let report = match outcome {
        Ok(DeleteOutcome::Deleted(report)) => report,
        other => panic!("{label}: delete returned {other:?}; the session is {state}"),
    };
    assert_eq!(
        report.incarnation, life.incarnation,
        "{label}: another incarnation's report; the session is {state}"
    );
    assert_eq!(state, SessionState::Closed, "{label}: session left open");
    if let Some(running) = running {
        assert_eq!(running, 0, "{label}: running() right after delete returned");
    }
    let stored = store.get(life.session.id()).await.unwrap();
    assert!(stored.is_none(), "{label}: session still stored");
    // Deleted in this incarnation, or a later life has begun since (a
    // racing task registered the router again).
    let status = store.router_status(life.router).await.unwrap();
    assert!(
        status == RouterStatus::Deleted(life.incarnation)
            || status.incarnation() > life.incarnation,
        "{label}: the router is {status:?}"
    );
    report
}

/// The loop of item 1 with the caller awaiting each deletion in the test's
/// own task (the runtime's `block_on` thread, the run on a worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_awaiting_each_deletion_in_the_callers_task() {
    let store = Arc::new(MemoryStore::new());
    let deleter = confirming(&store);
    within(WATCHDOG, async {
        for round in 0..iterations() {
            let life = new_life(&store, R, 1, round).await;
            let outcome = deleter.delete(R).await;
            let running = deleter.running();
            assert_life_deleted(&store, &life, outcome, Some(running), round).await;
        }
    })
    .await;
}

/// The same loop in a spawned task (on a worker, as the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_awaiting_each_deletion_in_a_spawned_task() {
    let store = Arc::new(MemoryStore::new());
    let deleter = confirming(&store);
    let controller = tokio::spawn(async move {
        for round in 0..iterations() {
            let life = new_life(&store, R, 1, round).await;
            let outcome = deleter.delete(R).await;
            let running = deleter.running();
            assert_life_deleted(&store, &life, outcome, Some(running), round).await;
        }
    });
    within(WATCHDOG, controller).await.unwrap();
}

/// The same loop blocking a worker on each deletion with `block_in_place`
/// and `Handle::block_on`, as synchronous controller code does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_blocking_on_each_deletion_from_inside_the_runtime() {
    let store = Arc::new(MemoryStore::new());
    let deleter = confirming(&store);
    let controller = tokio::spawn(async move {
        let runtime = Handle::current();
        for round in 0..iterations() {
            let life = new_life(&store, R, 1, round).await;
            let (outcome, running) = tokio::task::block_in_place(|| {
                let outcome = runtime.block_on(deleter.delete(R));
                (outcome, deleter.running())
            });
            assert_life_deleted(&store, &life, outcome, Some(running), round).await;
        }
    });
    within(WATCHDOG, controller).await.unwrap();
}

/// Several routers, each looping in its own task (half of them awaiting,
/// half blocking), one deleter for all: `running()` may count the other
/// routers' runs, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_on_several_routers_in_parallel() {
    const ROUTERS: u64 = 4;
    let store = Arc::new(MemoryStore::new());
    let deleter = confirming(&store);
    let loops: Vec<_> = (1..=ROUTERS)
        .map(|r| {
            let (store, deleter) = (Arc::clone(&store), deleter.clone());
            tokio::spawn(async move {
                let router = RouterId::new(r);
                let runtime = Handle::current();
                for round in 0..iterations() / 2 {
                    let life = new_life(&store, router, r, round).await;
                    let outcome = if r % 2 == 0 {
                        deleter.delete(router).await
                    } else {
                        tokio::task::block_in_place(|| runtime.block_on(deleter.delete(router)))
                    };
                    let running = deleter.running();
                    assert!(running < ROUTERS as usize, "{router}: {running} runs");
                    assert_life_deleted(&store, &life, outcome, None, round).await;
                }
            })
        })
        .collect();
    within(WATCHDOG, async {
        for controller in loops {
            controller.await.unwrap();
        }
    })
    .await;
    assert_eq!(deleter.running(), 0);
}

/// Two controller tasks on one deleter: one deletes the router's current
/// life while the other waits to register the router again, creates a
/// session in the new life and deletes it. Each gets its own life's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_races_another_tasks_register_and_delete() {
    let store = Arc::new(MemoryStore::new());
    let deleter = confirming(&store);
    let mut life = new_life(&store, R, 1, 0).await;
    for round in 0..iterations() {
        let first = {
            let (store, deleter) = (Arc::clone(&store), deleter.clone());
            tokio::spawn(async move {
                let outcome = deleter.delete(R).await;
                assert_life_deleted(&store, &life, outcome, None, round).await;
            })
        };
        let second = {
            let (store, deleter) = (Arc::clone(&store), deleter.clone());
            tokio::spawn(async move {
                let incarnation = loop {
                    match store.register_router(R).await {
                        Ok(incarnation) => break incarnation,
                        // The first task's deletion is not finished yet.
                        Err(_) => tokio::task::yield_now().await,
                    }
                };
                let session = store
                    .create(NewSession::new(SessionId::new(2), R, incarnation))
                    .await
                    .unwrap();
                let life = Life {
                    router: R,
                    incarnation,
                    session,
                };
                let outcome = deleter.delete(R).await;
                let running = deleter.running();
                assert_life_deleted(&store, &life, outcome, Some(running), round).await;
            })
        };
        within(WATCHDOG, async {
            first.await.unwrap();
            second.await.unwrap();
        })
        .await;
        life = new_life(&store, R, 1, round).await;
    }
}

/// A late `delete_incarnation` of the router's previous life, `delete` of
/// the router, and `delete_incarnation` of its new life, racing on a
/// multi-thread runtime: the late one deletes nothing, the other two answer
/// with the new life's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_races_delete_incarnation_of_the_old_and_the_new_life() {
    let store = Arc::new(MemoryStore::new());
    let deleter = confirming(&store);
    let mut old = new_life(&store, R, 1, 0).await.incarnation;
    let first = deleter.delete(R).await.unwrap();
    assert!(first.report().is_some());
    for round in 0..iterations() / 2 {
        let life = Arc::new(new_life(&store, R, 1, round).await);
        let late = tokio::spawn(deleter.delete_incarnation(R, old));
        let current = tokio::spawn(deleter.delete(R));
        let exact = tokio::spawn(deleter.delete_incarnation(R, life.incarnation));
        let (late, current, exact) = within(WATCHDOG, async {
            (
                late.await.unwrap(),
                current.await.unwrap(),
                exact.await.unwrap(),
            )
        })
        .await;
        let label = format!("round {round}");
        let expected = DeleteOutcome::AlreadyDeleted {
            router: R,
            incarnation: old,
        };
        assert_eq!(late.unwrap(), expected, "{label}: the late request");
        // Both name the new life: the same report if they overlapped; the
        // one that came after the other's run ended learns it is deleted.
        let reports: Vec<DeletionReport> = [current, exact]
            .into_iter()
            .filter_map(|outcome| match outcome.unwrap() {
                DeleteOutcome::Deleted(report) => Some(report),
                DeleteOutcome::AlreadyDeleted { incarnation, .. } => {
                    assert_eq!(incarnation, life.incarnation, "{label}");
                    None
                }
            })
            .collect();
        let first = reports.first().cloned().expect("one of them deleted it");
        assert!(reports.iter().all(|r| *r == first), "{label}: {reports:?}");
        assert_life_deleted(
            &store,
            &life,
            Ok(DeleteOutcome::Deleted(first)),
            None,
            round,
        )
        .await;
        assert_eq!(deleter.running(), 0, "{label}");
        old = life.incarnation;
    }
}

/// Two controllers on one store with a first life of `R`: A's routers
/// never answer its first notice (then confirm), B's confirm at once.
async fn stale_run_setup() -> (
    Arc<MemoryStore>,
    Life,
    RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>>,
    RouterDeleter<MemoryStore, Arc<Kit>>,
) {
    let store = Arc::new(MemoryStore::new());
    let first = new_life(&store, R, 1, 0).await;
    let hanging = ScriptedNotifier::new(
        Arc::clone(&store),
        Script::calls([Notify::Never], Notify::confirm_all()),
    );
    let a = builder()
        .build(Arc::clone(&store), hanging)
        .expect("valid settings");
    let b = confirming(&store);
    (store, first, a, b)
}

/// Two controllers, each with its own deleter on one store, delete the
/// same life; the second one's routers answer, the first one's hang. The
/// second controller registers the router again, creates a session and
/// asks the first controller to delete the router: it must delete the new
/// life, not answer with the first life's report (its own run of the first
/// life is still waiting on its notifier).
#[tokio::test(start_paused = true)]
async fn a_controller_never_answers_for_a_life_another_controller_finished() {
    let (store, first, a, b) = stale_run_setup().await;
    let mut a_first = tokio::spawn(a.delete(R));
    tokio::task::yield_now().await; // A's run fences and notifies: hangs
    let b_first = report_within(HOUR, b.delete(R)).await;
    assert_eq!(b_first.incarnation, first.incarnation);
    assert!(
        poll_once(&mut a_first).await.is_none(),
        "A's run still waits"
    );

    let second = new_life(&store, R, 2, 1).await;
    let outcome = within(HOUR, a.delete(R)).await;
    assert_life_deleted(&store, &second, outcome, None, 1).await;
    let a_first = within(HOUR, a_first).await.unwrap();
    assert_eq!(
        a_first.unwrap().report().unwrap().incarnation,
        first.incarnation
    );
}

/// The same, but the first controller's caller gives up while its deleter
/// waits out the stale run: the new life is deleted all the same (the
/// deletion started at the call's first poll).
#[tokio::test(start_paused = true)]
async fn a_delete_dropped_while_a_stale_run_ends_still_deletes_the_new_life() {
    let (store, first, a, b) = stale_run_setup().await;
    let a_first = tokio::spawn(a.delete(R));
    tokio::task::yield_now().await; // A's run fences and notifies: hangs
    let b_first = report_within(HOUR, b.delete(R)).await;
    assert_eq!(b_first.incarnation, first.incarnation);

    let second = new_life(&store, R, 2, 1).await;
    let mut given_up = Box::pin(a.delete(R));
    assert!(futures::poll!(given_up.as_mut()).is_pending());
    drop(given_up);
    // A's stale run ends within its bound; then A deletes the new life.
    let a_first = within(HOUR, a_first).await.unwrap();
    assert_eq!(
        a_first.unwrap().report().unwrap().incarnation,
        first.incarnation
    );
    within(HOUR, a.shutdown()).await;
    assert!(second.session.is_closed());
    assert_eq!(
        store.router_status(R).await.unwrap(),
        RouterStatus::Deleted(second.incarnation)
    );
}

/// Polls a spawned task once (yielding first so it runs); `Some` if done.
async fn poll_once<T>(task: &mut JoinHandle<T>) -> Option<T> {
    tokio::task::yield_now().await;
    match futures::poll!(task) {
        Poll::Ready(output) => Some(output.unwrap()),
        Poll::Pending => None,
    }
}

// ---------------------------------------------------------------------------
// delete_incarnation
// ---------------------------------------------------------------------------

/// The deleter of the notifier scenarios: batches of 4, 1 s per notice,
/// 2 s for confirmations, 2 retries after 0.5–2 s.
fn builder() -> RouterDeleterBuilder {
    RouterDeleter::builder()
        .batch_size(4)
        .notify_timeout(Duration::from_secs(1))
        .confirm_timeout(Duration::from_secs(2))
        .backoff(
            Backoff::new()
                .retries(2)
                .delays(Duration::from_millis(500), Duration::from_secs(2)),
        )
}

/// Fills `router` with `SESSIONS` observed sessions from id `first`, all
/// tracked by `checker`, and checks the store.
async fn fill(
    store: &MemoryStore,
    checker: &InvariantChecker,
    router: RouterId,
    first: u64,
) -> ObservedRouter {
    let observed = ObservedRouter::fill(store, router, first, SESSIONS).await;
    for session in &observed.sessions {
        checker.track(session);
    }
    checker.track_router(router);
    checker.assert(store).await;
    observed
}

/// The router's previous life, deleted, and its new life, filled.
async fn two_lives(
    store: &Arc<MemoryStore>,
    checker: &InvariantChecker,
) -> (Incarnation, ObservedRouter) {
    let old = fill(store, checker, R, 0).await;
    let deleter = confirming(store);
    let incarnation = old.incarnation;
    let report = report_within(HOUR, deleter.delete_incarnation(R, incarnation)).await;
    assert_eq!(report.incarnation, incarnation);
    old.assert_deleted(&**store).await;
    (incarnation, fill(store, checker, R, 100).await)
}

/// The new life is untouched: live, every session active and stored.
async fn assert_untouched(store: &MemoryStore, checker: &InvariantChecker, life: &ObservedRouter) {
    let status = store.router_status(life.router).await.unwrap();
    assert_eq!(status, RouterStatus::Live(life.incarnation));
    for session in &life.sessions {
        assert_eq!(session.state(), SessionState::Active, "{session:?}");
        assert!(store.get(session.id()).await.unwrap().is_some());
    }
    checker.assert(store).await;
}

#[tokio::test(start_paused = true)]
async fn a_late_or_duplicated_request_never_touches_the_next_life() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let (old, new) = two_lives(&store, &checker).await;
    // Slow to answer: the new life's deletion below stays fenced a while.
    let slow = Notify::Slow {
        delay: Duration::from_millis(100),
        confirm: Subset::All,
    };
    let routers = ScriptedNotifier::always(Arc::clone(&store), slow);
    let deleter = builder()
        .build(Arc::clone(&store), routers)
        .expect("valid settings");
    let already = DeleteOutcome::AlreadyDeleted {
        router: R,
        incarnation: old,
    };
    // Once, twice, and many at once.
    for _ in 0..2 {
        let late = within(HOUR, deleter.delete_incarnation(R, old)).await;
        assert_eq!(late.unwrap(), already);
    }
    let copies: Vec<_> = (0..5)
        .map(|_| tokio::spawn(deleter.delete_incarnation(R, old)))
        .collect();
    for copy in copies {
        assert_eq!(within(HOUR, copy).await.unwrap().unwrap(), already);
    }
    assert_eq!(deleter.running(), 0);
    assert_untouched(&store, &checker, &new).await;
    // The new life's own deletion is not disturbed by a late one arriving
    // in the middle of it.
    let mut current = pin!(deleter.delete_incarnation(R, new.incarnation));
    // The first poll yields; the second drives the run to its first
    // (slow) notice.
    assert!(futures::poll!(current.as_mut()).is_pending());
    assert!(futures::poll!(current.as_mut()).is_pending());
    let status = store.router_status(R).await.unwrap();
    assert_eq!(status, RouterStatus::Fenced(new.incarnation));
    let late = within(HOUR, deleter.delete_incarnation(R, old)).await;
    assert_eq!(late.unwrap(), already);
    let report = report_within(HOUR, current).await;
    assert_eq!(report.incarnation, new.incarnation);
    new.assert_deleted(&*store).await;
    checker.assert(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn an_incarnation_newer_than_any_is_a_mismatch_and_fences_nothing() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let (_, life) = two_lives(&store, &checker).await;
    let deleter = confirming(&store);
    let newer = Incarnation::new(life.incarnation.get() + 1_000);
    let outcome = within(HOUR, deleter.delete_incarnation(R, newer)).await;
    match outcome {
        Err(DeleteError::IncarnationMismatch {
            router,
            requested,
            current,
        }) => assert_eq!((router, requested, current), (R, newer, life.incarnation)),
        other => panic!("expected IncarnationMismatch, got {other:?}"),
    }
    assert_untouched(&store, &checker, &life).await;
    // The same once the router is deleted, and for a router never seen.
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!(report.incarnation, life.incarnation);
    let outcome = within(HOUR, deleter.delete_incarnation(R, newer)).await;
    assert!(
        matches!(outcome, Err(DeleteError::IncarnationMismatch { .. })),
        "{outcome:?}"
    );
    let unknown = within(HOUR, deleter.delete_incarnation(OTHER, newer)).await;
    assert!(
        matches!(unknown, Err(DeleteError::UnknownRouter(r)) if r == OTHER),
        "{unknown:?}"
    );
    life.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_delete_incarnation_calls_share_one_run() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let life = fill(&store, &checker, R, 0).await;
    let routers = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let deleter = RouterDeleter::new(Arc::clone(&store), Arc::clone(&routers));
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(deleter.delete_incarnation(R, life.incarnation)))
        .collect();
    let mut reports = Vec::new();
    for call in calls {
        reports.push(within(HOUR, call).await.unwrap().unwrap());
    }
    assert!(reports.iter().all(|r| r == &reports[0]), "{reports:?}");
    assert_eq!(reports[0].report().unwrap().incarnation, life.incarnation);
    assert_eq!(routers.call_count(), 1, "one run, one notice");
    life.assert_deleted(&*store).await;
    checker.assert(&*store).await;
}

/// Which call starts the run, and whether the other arrives before or
/// after the run fenced the router.
#[derive(Clone, Copy, Debug)]
enum Order {
    DeleteFirst,
    IncarnationFirst,
}

async fn delete_and_delete_incarnation(order: Order, after_fence: bool) {
    let label = format!("{order:?}, second call after the fence: {after_fence}");
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let life = fill(&store, &checker, R, 0).await;
    // Slow to answer: the run stays fenced a while.
    let slow = Notify::Slow {
        delay: Duration::from_millis(100),
        confirm: Subset::All,
    };
    let routers = ScriptedNotifier::always(Arc::clone(&store), slow);
    let deleter = builder()
        .build(Arc::clone(&store), Arc::clone(&routers))
        .expect("valid settings");
    let by_router = deleter.delete(R).boxed();
    let by_incarnation = deleter.delete_incarnation(R, life.incarnation).boxed();
    let (mut first, second) = match order {
        Order::DeleteFirst => (by_router, by_incarnation),
        Order::IncarnationFirst => (by_incarnation, by_router),
    };
    // The first poll starts the run (and yields); it has not fenced yet.
    assert!(futures::poll!(&mut first).is_pending());
    if after_fence {
        // The second drives it to its first (slow) notice.
        assert!(futures::poll!(&mut first).is_pending());
        let status = store.router_status(R).await.unwrap();
        assert_eq!(status, RouterStatus::Fenced(life.incarnation), "{label}");
    }
    let (first, second) = within(HOUR, futures::future::join(first, second)).await;
    let first = first.unwrap_or_else(|e| panic!("{label}: {e}"));
    let second = second.unwrap_or_else(|e| panic!("{label}: {e}"));
    let report = first
        .report()
        .unwrap_or_else(|| panic!("{label}: {first:?}"));
    assert_eq!(first, second, "{label}: both calls delete this life");
    let attempts = report.notify_attempts as usize;
    assert_eq!(routers.call_count(), attempts, "{label}: one run");
    life.assert_deleted(&*store).await;
    checker.assert(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn delete_and_delete_incarnation_joined_after_the_fence_give_one_report() {
    for order in [Order::DeleteFirst, Order::IncarnationFirst] {
        delete_and_delete_incarnation(order, true).await;
    }
}

#[tokio::test(start_paused = true)]
async fn delete_incarnation_arriving_before_the_fence_of_a_delete_gives_its_report() {
    delete_and_delete_incarnation(Order::DeleteFirst, false).await;
}

#[tokio::test(start_paused = true)]
async fn delete_arriving_before_the_fence_of_a_delete_incarnation_gives_its_report() {
    delete_and_delete_incarnation(Order::IncarnationFirst, false).await;
}

/// The deterministic form of the race above: a late request for the old
/// life starts a run; `delete` of the router arrives before that run looked
/// at the store. It must delete the new life.
#[tokio::test(start_paused = true)]
async fn delete_never_joins_a_late_request_for_the_previous_life() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let (old, new) = two_lives(&store, &checker).await;
    let deleter = confirming(&store);
    let mut late = pin!(deleter.delete_incarnation(R, old));
    assert!(futures::poll!(late.as_mut()).is_pending());
    let outcome = within(HOUR, deleter.delete(R)).await;
    let state = new.sessions[0].state();
    let report = match outcome {
        Ok(DeleteOutcome::Deleted(report)) => report,
        other => panic!("delete({R}) answered {other:?}; the new life's sessions are {state}"),
    };
    assert_eq!(report.incarnation, new.incarnation);
    let late = within(HOUR, late).await.unwrap();
    assert_eq!(
        late,
        DeleteOutcome::AlreadyDeleted {
            router: R,
            incarnation: old
        }
    );
    new.assert_deleted(&*store).await;
    checker.assert(&*store).await;
}

// ---------------------------------------------------------------------------
// Misbehaving notifiers: the kit's scripts.
// ---------------------------------------------------------------------------

/// The report's counts add up, and match what the sessions saw.
fn assert_adds_up(report: &DeletionReport, observed: &ObservedRouter, label: &str) {
    assert_eq!(report.sessions, observed.sessions.len(), "{label}");
    assert_eq!(
        report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
        report.sessions,
        "{label}: {report:?}"
    );
    assert_eq!(
        report.confirmed,
        observed.count_reason(CloseReason::RouterDeleted),
        "{label}: confirmed counts RouterDeleted closes only"
    );
    assert_eq!(
        report.forced,
        observed.count_reason(CloseReason::Forced),
        "{label}"
    );
}

/// Deletes `observed`'s router within its bound (I4), then checks the
/// report, I1 and the store's invariants.
async fn delete_checked<N: TerminationNotifier>(
    deleter: &RouterDeleter<MemoryStore, N>,
    store: &MemoryStore,
    checker: &InvariantChecker,
    observed: ObservedRouter,
    label: &str,
) -> DeletionReport {
    let bound = deleter.max_wait(observed.sessions.len()) + SLACK;
    let report = report_within(bound, deleter.delete(observed.router)).await;
    assert_eq!(report.incarnation, observed.incarnation, "{label}");
    assert_adds_up(&report, &observed, label);
    assert_eq!(deleter.running(), 0, "{label}");
    observed.assert_deleted(store).await;
    checker.assert(store).await;
    report
}

/// Runs one scripted router's deletion; returns its report.
async fn scripted(script: Script<Notify>) -> DeletionReport {
    let label = format!("{script:?}");
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let observed = fill(&store, &checker, R, 0).await;
    let routers = ScriptedNotifier::new(Arc::clone(&store), script);
    let deleter = builder()
        .build(Arc::clone(&store), routers)
        .expect("valid settings");
    delete_checked(&deleter, &store, &checker, observed, &label).await
}

#[tokio::test(start_paused = true)]
async fn scripted_misbehaviours_are_bounded_and_add_up() {
    let n = SESSIONS as usize;
    let late = |delay, confirm| Notify::Later { delay, confirm };
    // Confirmations from spawned tasks, within the deadline.
    let r = scripted(Script::always(late(
        Duration::from_millis(1_500),
        Subset::All,
    )))
    .await;
    assert_eq!((r.confirmed, r.forced, r.rounds), (n, 0, 1));
    // Errors, hangs, panics: every notice fails, everything is forced.
    for failing in [Notify::Error, Notify::Never, Notify::Panic] {
        let r = scripted(Script::always(failing)).await;
        assert_eq!((r.confirmed, r.forced), (0, n), "{failing:?}");
        assert_eq!((r.rounds, r.notify_attempts), (3, 6), "{failing:?}");
        assert_eq!(r.notify_failures, r.notify_attempts, "{failing:?}");
    }
    // A transport slower than the notice timeout: dropped mid-way, before
    // it confirms anything.
    let slow = Notify::Slow {
        delay: Duration::from_secs(5),
        confirm: Subset::All,
    };
    let r = scripted(Script::always(slow)).await;
    assert_eq!((r.confirmed, r.forced, r.notify_failures), (0, n, 6));
    // Every failure once, then the even ids, then everything.
    let mixed = Script::calls(
        [
            Notify::Panic,
            Notify::Never,
            Notify::Confirm(Subset::EvenIds),
        ],
        Notify::confirm_all(),
    );
    let r = scripted(mixed).await;
    assert_eq!((r.confirmed, r.forced), (n, 0));
    // Late beyond every deadline: forced (their confirmations land later
    // and change nothing; see the test below).
    let r = scripted(Script::always(late(HOUR, Subset::All))).await;
    assert_eq!((r.confirmed, r.forced), (0, n));
}

/// Late confirmations, from the router's own tasks, land after the
/// deletion forced the sessions and the ids went to new sessions (on
/// another router, and on the router's next life). The notifier confirms by
/// key, as documented: the new sessions stay active.
#[tokio::test(start_paused = true)]
async fn late_confirmations_never_close_the_sessions_that_reuse_the_ids() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let old = fill(&store, &checker, R, 0).await;
    let delay = Duration::from_secs(600);
    let routers = ScriptedNotifier::new(
        Arc::clone(&store),
        Script::always(Notify::Later {
            delay,
            confirm: Subset::All,
        }),
    );
    let deleter = builder()
        .build(Arc::clone(&store), Arc::clone(&routers))
        .expect("valid settings");
    assert!(deleter.max_wait(old.sessions.len()) < delay);
    let report = delete_checked(&deleter, &store, &checker, old, "late").await;
    assert_eq!(report.forced, SESSIONS as usize);

    // The ids again: half on another router, half on the router's next life.
    let half = SESSIONS / 2;
    let elsewhere = fill_ids(&store, &checker, OTHER, 0..half).await;
    let next_life = fill_ids(&store, &checker, R, half..SESSIONS).await;
    tokio::time::sleep(delay * 2).await; // every late confirmation lands
    assert_eq!(routers.notices_of(SessionId::new(0)), 3, "3 rounds");
    for session in elsewhere.iter().chain(&next_life) {
        assert_eq!(session.state(), SessionState::Active, "{session:?}");
        assert!(store.get(session.id()).await.unwrap().is_some());
    }
    checker.assert(&*store).await;
}

/// Registers `router` and creates sessions with `ids` on it, tracked.
async fn fill_ids(
    store: &MemoryStore,
    checker: &InvariantChecker,
    router: RouterId,
    ids: std::ops::Range<u64>,
) -> Vec<Session> {
    let incarnation = store.register_router(router).await.unwrap();
    let mut sessions = Vec::new();
    for id in ids {
        let spec = NewSession::new(SessionId::new(id), router, incarnation);
        let session = store.create(spec).await.unwrap();
        checker.track(&session);
        sessions.push(session);
    }
    checker.assert(store).await;
    sessions
}

// ---------------------------------------------------------------------------
// Misbehaving notifiers no script expresses.
// ---------------------------------------------------------------------------

/// What an unruly router does with a notice.
#[derive(Clone, Copy, Debug)]
enum Unruly {
    /// Confirms the first half of the batch, then never returns.
    ConfirmHalfThenHang,
    /// Confirms the first half of the batch, then panics.
    ConfirmHalfThenPanic,
    /// Panics in `notify` itself, before a future exists.
    PanicBeforeFuture,
    /// Its clients hang up first: every session closes as `ClientClosed`.
    ClientsClose,
}

/// A router misbehaving as told.
// Kept: no kit script confirms part of a batch and then hangs or panics,
// panics before returning a future, or closes with another reason.
struct UnrulyRouter {
    store: Arc<MemoryStore>,
    how: Unruly,
}

async fn close_keys(store: &MemoryStore, keys: &[SessionKey], reason: CloseReason) {
    for &key in keys {
        let _ = store.close_exact(key, reason).await;
    }
}

impl TerminationNotifier for UnrulyRouter {
    fn notify(
        &self,
        batch: TerminationBatch,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send {
        if let Unruly::PanicBeforeFuture = self.how {
            panic!("router bug before any future");
        }
        let (store, how) = (Arc::clone(&self.store), self.how);
        async move {
            let half = &batch.sessions[..batch.sessions.len().div_ceil(2)];
            match how {
                Unruly::ConfirmHalfThenHang => {
                    close_keys(&store, half, CloseReason::RouterDeleted).await;
                    std::future::pending().await
                }
                Unruly::ConfirmHalfThenPanic => {
                    close_keys(&store, half, CloseReason::RouterDeleted).await;
                    panic!("router bug after confirming half");
                }
                Unruly::ClientsClose => {
                    close_keys(&store, &batch.sessions, CloseReason::ClientClosed).await;
                    Ok(())
                }
                Unruly::PanicBeforeFuture => unreachable!("panicked before"),
            }
        }
    }
}

async fn unruly(how: Unruly) -> DeletionReport {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let observed = fill(&store, &checker, R, 0).await;
    let router = UnrulyRouter {
        store: Arc::clone(&store),
        how,
    };
    let deleter = builder()
        .build(Arc::clone(&store), router)
        .expect("valid settings");
    delete_checked(&deleter, &store, &checker, observed, &format!("{how:?}")).await
}

#[tokio::test(start_paused = true)]
async fn partial_confirmations_then_a_hang_or_a_panic_are_counted_and_contained() {
    for how in [Unruly::ConfirmHalfThenHang, Unruly::ConfirmHalfThenPanic] {
        let r = unruly(how).await;
        // 8 sessions: 4 confirmed in round 0, 2 in round 1, 1 in round 2.
        assert_eq!((r.confirmed, r.forced, r.rounds), (7, 1, 3), "{how:?}");
        assert_eq!(r.notify_failures, r.notify_attempts, "{how:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_before_the_future_is_contained() {
    let r = unruly(Unruly::PanicBeforeFuture).await;
    assert_eq!((r.confirmed, r.forced), (0, SESSIONS as usize));
    assert_eq!((r.notify_attempts, r.notify_failures), (6, 6));
}

#[tokio::test(start_paused = true)]
async fn sessions_closed_by_their_clients_are_not_confirmations() {
    let r = unruly(Unruly::ClientsClose).await;
    assert_eq!(
        (r.confirmed, r.closed_otherwise, r.forced, r.rounds),
        (0, SESSIONS as usize, 0, 1)
    );
}

// ---------------------------------------------------------------------------
// Notifiers that call back into the deleter.
// ---------------------------------------------------------------------------

type Reentrant = RouterDeleter<MemoryStore, Arc<CallsBack>>;

/// What a notice for the router makes the notifier do, after it confirmed
/// the batch.
#[derive(Clone, Copy, Debug)]
enum Back {
    /// Deletes the same router again and awaits it.
    AwaitDeleteSame,
    /// Deletes the same router again from a task, left running.
    SpawnDeleteSame,
    /// Deletes `router` and awaits it.
    AwaitDelete(RouterId),
    /// Reads `running()`.
    Running,
    /// `delete_incarnation` of this incarnation, of `older`, and of one
    /// newer than any, each from a task.
    DeleteIncarnations { older: Incarnation },
    /// Shuts the deleter down and awaits it.
    AwaitShutdown,
    /// Shuts the deleter down from a task.
    SpawnShutdown,
}

/// A router that confirms every notice and then calls back into its own
/// deleter, as a controller's notifier may.
// Kept: scripts cannot reach the deleter that calls them.
struct CallsBack {
    store: Arc<MemoryStore>,
    /// Its deleter, until the test detaches it (a cycle otherwise).
    deleter: Mutex<Option<Reentrant>>,
    /// What a notice for each router does.
    actions: Vec<(RouterId, Back)>,
    /// What the awaited nested calls returned, if they did.
    returned: Mutex<Vec<String>>,
    /// Nested calls left running.
    spawned: Mutex<Vec<JoinHandle<Result<DeleteOutcome, DeleteError>>>>,
}

impl CallsBack {
    fn new(store: &Arc<MemoryStore>, actions: Vec<(RouterId, Back)>) -> (Reentrant, Arc<Self>) {
        let routers = Arc::new(Self {
            store: Arc::clone(store),
            deleter: Mutex::new(None),
            actions,
            returned: Mutex::new(Vec::new()),
            spawned: Mutex::new(Vec::new()),
        });
        let deleter = builder()
            .build(Arc::clone(store), Arc::clone(&routers))
            .expect("valid settings");
        *routers.deleter.lock().unwrap() = Some(deleter.clone());
        (deleter, routers)
    }

    fn returned(&self) -> Vec<String> {
        self.returned.lock().unwrap().clone()
    }

    /// The nested calls left running, awaited.
    async fn spawned(&self) -> Vec<Result<DeleteOutcome, DeleteError>> {
        let spawned = std::mem::take(&mut *self.spawned.lock().unwrap());
        let mut outcomes = Vec::new();
        for call in spawned {
            outcomes.push(within(HOUR, call).await.unwrap());
        }
        outcomes
    }

    fn detach(&self) {
        drop(self.deleter.lock().unwrap().take());
    }

    fn spawn(
        &self,
        call: impl Future<Output = Result<DeleteOutcome, DeleteError>> + Send + 'static,
    ) {
        self.spawned.lock().unwrap().push(tokio::spawn(call));
    }
}

impl TerminationNotifier for CallsBack {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        close_keys(&self.store, &batch.sessions, CloseReason::RouterDeleted).await;
        let Some(deleter) = self.deleter.lock().unwrap().clone() else {
            return Ok(());
        };
        let action = self.actions.iter().find(|(r, _)| *r == batch.router);
        let Some(&(_, action)) = action else {
            return Ok(());
        };
        let returned = match action {
            Back::AwaitDeleteSame => Some(format!("{:?}", deleter.delete(batch.router).await)),
            Back::AwaitDelete(router) => Some(format!("{:?}", deleter.delete(router).await)),
            Back::Running => Some(format!("running {}", deleter.running())),
            Back::AwaitShutdown => {
                deleter.shutdown().await;
                Some(String::from("shut down"))
            }
            Back::SpawnDeleteSame => {
                self.spawn(deleter.delete(batch.router));
                // Lets it reach the deleter while the run waits on us.
                tokio::task::yield_now().await;
                None
            }
            Back::DeleteIncarnations { older } => {
                let newer = Incarnation::new(u64::MAX);
                for incarnation in [batch.incarnation, older, newer] {
                    self.spawn(deleter.delete_incarnation(batch.router, incarnation));
                }
                tokio::task::yield_now().await;
                None
            }
            Back::SpawnShutdown => {
                self.spawn(async move {
                    deleter.shutdown().await;
                    Err(DeleteError::ShuttingDown)
                });
                None
            }
        };
        if let Some(returned) = returned {
            self.returned.lock().unwrap().push(returned);
        }
        Ok(())
    }
}

/// A store with `R` (and `OTHER`) filled, and a deleter whose notifier
/// calls back as `actions` say.
struct Scene {
    store: Arc<MemoryStore>,
    checker: InvariantChecker,
    r: ObservedRouter,
    other: ObservedRouter,
    deleter: Reentrant,
    routers: Arc<CallsBack>,
}

async fn scene(actions: Vec<(RouterId, Back)>) -> Scene {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let r = fill(&store, &checker, R, 0).await;
    let other = fill(&store, &checker, OTHER, 100).await;
    let (deleter, routers) = CallsBack::new(&store, actions);
    Scene {
        store,
        checker,
        r,
        other,
        deleter,
        routers,
    }
}

/// Awaiting a delete of its own router from `notify` waits on the very run
/// that waits on `notify`: the notice timeout cuts it, the nested call is
/// dropped without returning, and the deletion ends within its bound.
#[tokio::test(start_paused = true)]
async fn a_notifier_awaiting_a_delete_of_its_own_router_is_cut_by_the_notice_timeout() {
    let s = scene(vec![(R, Back::AwaitDeleteSame)]).await;
    let report = delete_checked(&s.deleter, &s.store, &s.checker, s.r, "own").await;
    assert_eq!((report.confirmed, report.rounds), (SESSIONS as usize, 1));
    assert_eq!((report.notify_attempts, report.notify_failures), (2, 2));
    assert_eq!(s.routers.returned(), Vec::<String>::new());
    s.routers.detach();
}

/// From a task instead, the nested delete joins the run: the same report.
#[tokio::test(start_paused = true)]
async fn a_notifier_spawning_a_delete_of_its_own_router_gets_the_same_report() {
    let s = scene(vec![(R, Back::SpawnDeleteSame)]).await;
    let report = delete_checked(&s.deleter, &s.store, &s.checker, s.r, "own").await;
    assert_eq!(report.notify_failures, 0);
    let nested = s.routers.spawned().await;
    assert_eq!(nested.len(), 2, "one per batch");
    for outcome in nested {
        assert_eq!(outcome.unwrap().report(), Some(&report));
    }
    s.routers.detach();
}

#[tokio::test(start_paused = true)]
async fn a_notifier_deleting_another_router_and_awaiting_it() {
    let s = scene(vec![(R, Back::AwaitDelete(OTHER))]).await;
    let other = s.other.incarnation;
    let report = delete_checked(&s.deleter, &s.store, &s.checker, s.r, "other").await;
    assert_eq!(
        (report.confirmed, report.notify_failures),
        (SESSIONS as usize, 0)
    );
    let returned = s.routers.returned();
    assert_eq!(returned.len(), 2, "{returned:?}");
    assert!(
        returned[0].contains("Deleted(DeletionReport"),
        "{returned:?}"
    );
    assert!(
        returned[0].contains(&format!("incarnation: {other:?}")),
        "{returned:?}"
    );
    assert!(returned[1].contains("AlreadyDeleted"), "{returned:?}");
    s.other.assert_deleted(&*s.store).await;
    s.checker.assert(&*s.store).await;
    s.routers.detach();
}

/// Two routers whose notifiers each delete the other and await it: a cycle
/// of waits, cut by the notice timeouts; both deletions end in bound.
#[tokio::test(start_paused = true)]
async fn notifiers_deleting_each_others_routers_do_not_deadlock() {
    let s = scene(vec![
        (R, Back::AwaitDelete(OTHER)),
        (OTHER, Back::AwaitDelete(R)),
    ])
    .await;
    let bound = s.deleter.max_wait(SESSIONS as usize) + SLACK;
    let other = within(bound, s.deleter.delete(OTHER));
    let report = delete_checked(&s.deleter, &s.store, &s.checker, s.r, "cycle").await;
    assert_eq!(report.confirmed, SESSIONS as usize);
    let other = other.await.unwrap();
    assert!(
        matches!(&other, DeleteOutcome::Deleted(r) if r.confirmed == SESSIONS as usize)
            || matches!(other, DeleteOutcome::AlreadyDeleted { .. }),
        "{other:?}"
    );
    s.other.assert_deleted(&*s.store).await;
    s.checker.assert(&*s.store).await;
    s.routers.detach();
}

#[tokio::test(start_paused = true)]
async fn a_notifier_reading_running_sees_its_own_run() {
    let s = scene(vec![(R, Back::Running)]).await;
    delete_checked(&s.deleter, &s.store, &s.checker, s.r, "running").await;
    assert_eq!(s.routers.returned(), ["running 1", "running 1"]);
    s.routers.detach();
}

/// From `notify`: `delete_incarnation` of the incarnation being deleted
/// joins the run; of an older one is answered at once; of one newer than
/// any is a mismatch once the run ended.
#[tokio::test(start_paused = true)]
async fn a_notifier_calling_delete_incarnation() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let (older, life) = two_lives(&store, &checker).await;
    let (deleter, routers) = CallsBack::new(&store, vec![(R, Back::DeleteIncarnations { older })]);
    let report = delete_checked(&deleter, &store, &checker, life, "nested").await;
    let nested = routers.spawned().await;
    assert_eq!(nested.len(), 6, "three per batch");
    for outcomes in nested.chunks(3) {
        assert_eq!(outcomes[0].as_ref().unwrap().report(), Some(&report));
        let already = DeleteOutcome::AlreadyDeleted {
            router: R,
            incarnation: older,
        };
        assert_eq!(outcomes[1].as_ref().unwrap(), &already);
        match &outcomes[2] {
            Err(DeleteError::IncarnationMismatch { current, .. }) => {
                assert_eq!(*current, report.incarnation);
            }
            other => panic!("expected IncarnationMismatch, got {other:?}"),
        }
    }
    routers.detach();
}

/// `shutdown` awaited from `notify` waits for the run that waits on
/// `notify`: cut by the notice timeout. The deletion ends; the deleter
/// stays shut.
#[tokio::test(start_paused = true)]
async fn a_notifier_awaiting_shutdown_of_its_deleter() {
    let s = scene(vec![(R, Back::AwaitShutdown)]).await;
    let report = delete_checked(&s.deleter, &s.store, &s.checker, s.r, "shutdown").await;
    assert_eq!(
        (report.confirmed, report.notify_failures),
        (SESSIONS as usize, 2)
    );
    assert_eq!(s.routers.returned(), Vec::<String>::new());
    assert_shut(&s.deleter).await;
    s.routers.detach();
}

#[tokio::test(start_paused = true)]
async fn a_notifier_spawning_shutdown_of_its_deleter() {
    let s = scene(vec![(R, Back::SpawnShutdown)]).await;
    let report = delete_checked(&s.deleter, &s.store, &s.checker, s.r, "shutdown").await;
    assert_eq!(
        (report.confirmed, report.notify_failures),
        (SESSIONS as usize, 0)
    );
    assert_eq!(
        s.routers.spawned().await.len(),
        2,
        "both shutdowns returned"
    );
    assert_shut(&s.deleter).await;
    s.routers.detach();
}

async fn assert_shut(deleter: &Reentrant) {
    let refused = within(HOUR, deleter.delete(OTHER)).await;
    assert!(
        matches!(refused, Err(DeleteError::ShuttingDown)),
        "{refused:?}"
    );
    within(HOUR, deleter.shutdown()).await;
    assert_eq!(deleter.running(), 0);
}
