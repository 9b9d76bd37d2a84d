//! `RouterDeleter`: the run, its bound (paused time), joining, resuming,
//! shutdown and errors.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, Script, ScriptedNotifier, SlowRelease, Subset, report_within,
    within,
};
use session_lifecycle::{
    Backoff, CloseReason, Event, EventBus, MemoryStore, NotifyError, RouterDeleter, RouterId,
    SessionStore, TerminationBatch, TerminationNotifier, deleter::DeleteError,
    deleter::DeleteOutcome,
};
use tokio::time::{Duration, Instant};

const R: RouterId = RouterId::new(7);

/// A router that confirms everything.
const OK: Notify = Notify::confirm_all();
/// A router that confirms the sessions with an even id.
const PARTIAL: Notify = Notify::Confirm(Subset::EvenIds);
/// A router that takes 300 ms, then confirms everything.
const SLOW: Notify = Notify::Slow {
    delay: Duration::from_millis(300),
    confirm: Subset::All,
};

fn deleter(
    store: &Arc<MemoryStore>,
    first: Notify,
    retries: Notify,
) -> RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>> {
    settings()
        .build(
            Arc::clone(store),
            ScriptedNotifier::new(Arc::clone(store), Script::by_round(first, retries)),
        )
        .expect("valid settings")
}

/// The settings of [`deleter`]: batches of 10, 1 s to notify, 2 s to
/// confirm, 2 retries.
fn settings() -> session_lifecycle::deleter::RouterDeleterBuilder {
    RouterDeleter::builder()
        .batch_size(10)
        .notify_timeout(Duration::from_secs(1))
        .confirm_timeout(Duration::from_secs(2))
        .backoff(
            Backoff::new()
                .retries(2)
                .delays(Duration::from_millis(500), Duration::from_secs(4)),
        )
}

#[tokio::test(start_paused = true)]
async fn a_cooperative_router_confirms_everything() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 25).await;
    let deleter = deleter(&store, OK, OK);
    let outcome = within(HOUR, deleter.delete(R)).await.unwrap();
    let report = outcome.report().unwrap().clone();
    assert_eq!(
        (
            report.sessions,
            report.confirmed,
            report.forced,
            report.already_closed
        ),
        (25, 25, 0, 0)
    );
    assert_eq!(
        (
            report.rounds,
            report.notify_attempts,
            report.notify_failures
        ),
        (1, 3, 0)
    );
    assert!(!report.resumed);
    assert_eq!(observed.count_reason(CloseReason::RouterDeleted), 25);
    assert_eq!(
        report.durations.total,
        Duration::ZERO,
        "nothing waited on a timer"
    );
    observed.assert_deleted(&*store).await;
    assert!(store.audit().await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_router_that_never_answers_is_forced_within_the_bound() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 25).await;
    let deleter = deleter(&store, Notify::Never, Notify::Never);
    let start = Instant::now();
    let report = report_within(HOUR, deleter.delete(R)).await;
    let elapsed = start.elapsed();
    // 3 rounds × (3 batches × 1 s notify timeout + 2 s confirm timeout),
    // plus two backoffs of 0.5–1 s and 1–2 s (jitter).
    assert!(
        elapsed >= Duration::from_millis(15_000 + 1_500),
        "{elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_millis(15_000 + 3_000),
        "{elapsed:?}"
    );
    assert!(
        elapsed <= deleter.max_wait(25),
        "{elapsed:?} > {:?}",
        deleter.max_wait(25)
    );
    assert_eq!((report.confirmed, report.forced), (0, 25));
    assert_eq!(
        (
            report.rounds,
            report.notify_attempts,
            report.notify_failures
        ),
        (3, 9, 9)
    );
    assert_eq!(observed.count_reason(CloseReason::Forced), 25);
    observed.assert_deleted(&*store).await;
}

/// A backoff's `max_duration` ends the re-notifications early, and
/// `max_wait` counts it: the bound shrinks and still holds.
#[tokio::test(start_paused = true)]
async fn a_capped_backoff_ends_the_rounds_early_within_a_smaller_bound() {
    let backoff = Backoff::new()
        .retries(10)
        .delays(Duration::from_secs(1), Duration::from_secs(1));
    let capped = backoff.max_duration(Duration::from_millis(2_500));
    let build = |store: &Arc<MemoryStore>, backoff| {
        RouterDeleter::builder()
            .notify_timeout(Duration::from_secs(1))
            .confirm_timeout(Duration::from_secs(1))
            .backoff(backoff)
            .build(
                Arc::clone(store),
                ScriptedNotifier::always(Arc::clone(store), Notify::Never),
            )
            .expect("valid settings")
    };
    let store = Arc::new(MemoryStore::new());
    let uncapped_bound = build(&store, backoff).max_wait(5);
    for _ in 0..20 {
        let store = Arc::new(MemoryStore::new());
        let observed = ObservedRouter::fill(&*store, R, 0, 5).await;
        let deleter = build(&store, capped);
        // 11 rounds of 2 s at most, jittered waits of 1–2 s capped at 2.5 s,
        // 1 ms per timer (3 per round, 1 per retry), and the steward's
        // pick-up of a held future (21 ms).
        assert_eq!(
            deleter.max_wait(5),
            Duration::from_millis(22_000 + 2_500 + 43 + 21)
        );
        assert!(deleter.max_wait(5) < uncapped_bound);
        let start = Instant::now();
        let report = report_within(HOUR, deleter.delete(R)).await;
        let elapsed = start.elapsed();
        assert!(elapsed <= deleter.max_wait(5), "{elapsed:?}");
        // At least one wait fits the cap, at most two: 2 or 3 rounds.
        assert!((2..=3).contains(&report.rounds), "{report:?}");
        assert_eq!(report.forced, 5);
        observed.assert_deleted(&*store).await;
    }
}

#[tokio::test(start_paused = true)]
async fn errors_and_panics_are_contained_and_forced() {
    for behaviour in [Notify::Error, Notify::Panic] {
        let store = Arc::new(MemoryStore::new());
        let observed = ObservedRouter::fill(&*store, R, 0, 5).await;
        let deleter = deleter(&store, behaviour, behaviour);
        let report = report_within(HOUR, deleter.delete(R)).await;
        assert_eq!(
            (report.forced, report.notify_failures),
            (5, 3),
            "{behaviour:?}"
        );
        observed.assert_deleted(&*store).await;
    }
}

#[tokio::test(start_paused = true)]
async fn stragglers_are_renotified_then_confirm() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 20).await;
    let deleter = deleter(&store, PARTIAL, OK);
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!((report.confirmed, report.forced, report.rounds), (20, 0, 2));
    // Round 1 carried only the 10 odd-numbered stragglers: one batch.
    assert_eq!(report.notify_attempts, 2 + 1);
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn partial_confirmation_forces_the_rest() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 20).await;
    let deleter = deleter(&store, PARTIAL, PARTIAL);
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!((report.confirmed, report.forced), (10, 10));
    assert_eq!(observed.count_reason(CloseReason::Forced), 10);
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn sessions_closed_before_the_run_count_as_already_closed() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 6).await;
    // Closed through the handle: still stored, already closed.
    assert!(observed.sessions[0].close(CloseReason::ClientClosed).won());
    assert!(observed.sessions[1].close(CloseReason::ClientClosed).won());
    let report = report_within(HOUR, deleter(&store, OK, OK).delete(R)).await;
    assert_eq!(
        (
            report.sessions,
            report.already_closed,
            report.confirmed,
            report.forced
        ),
        (6, 2, 4, 0)
    );
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_deletes_join_one_run() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 12).await;
    let deleter = deleter(&store, SLOW, SLOW);
    let callers: Vec<_> = (0..4).map(|_| tokio::spawn(deleter.delete(R))).collect();
    let mut reports = Vec::new();
    for caller in callers {
        reports.push(caller.await.unwrap().unwrap());
    }
    assert!(
        reports.windows(2).all(|pair| pair[0] == pair[1]),
        "all joiners get the same report"
    );
    let report = reports[0].report().unwrap();
    assert_eq!((report.confirmed, report.rounds), (12, 1));
    // The notifier saw one run: 2 batches, once.
    let notifier_calls = report.notify_attempts;
    assert_eq!(notifier_calls, 2);
    assert!(matches!(
        within(HOUR, deleter.delete(R)).await.unwrap(),
        DeleteOutcome::AlreadyDeleted { .. }
    ));
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn dropping_the_caller_does_not_stop_the_run() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 15).await;
    let deleter = deleter(&store, Notify::Never, OK);
    let dropped = tokio::time::timeout(Duration::from_millis(1_500), deleter.delete(R)).await;
    assert!(dropped.is_err(), "the first round is still running");
    assert_eq!(deleter.running(), 1);
    deleter.shutdown().await;
    assert_eq!(deleter.running(), 0);
    assert_eq!(observed.count_reason(CloseReason::RouterDeleted), 15);
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn a_fenced_router_is_resumed() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 8).await;
    // An earlier run fenced the router, marked some sessions and died.
    let snapshot = store.fence(R).await.unwrap();
    for session in &snapshot.sessions[..4] {
        assert!(session.begin_terminating().won());
    }
    let report = report_within(HOUR, deleter(&store, OK, OK).delete(R)).await;
    assert!(report.resumed);
    assert_eq!((report.sessions, report.confirmed), (8, 8));
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn unknown_and_already_deleted_routers() {
    let store = Arc::new(MemoryStore::new());
    let deleter = deleter(&store, OK, OK);
    assert!(
        matches!(within(HOUR, deleter.delete(RouterId::new(99))).await, Err(DeleteError::UnknownRouter(r)) if r == RouterId::new(99))
    );
    let observed = ObservedRouter::fill(&*store, R, 0, 3).await;
    assert!(matches!(
        within(HOUR, deleter.delete(R)).await.unwrap(),
        DeleteOutcome::Deleted(_)
    ));
    match within(HOUR, deleter.delete(R)).await.unwrap() {
        DeleteOutcome::AlreadyDeleted {
            router,
            incarnation,
        } => {
            assert_eq!((router, incarnation), (R, observed.incarnation));
        }
        other => panic!("expected AlreadyDeleted, got {other:?}"),
    }
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_refuses_new_deletions_and_waits_for_running_ones() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 4).await;
    let deleter = deleter(&store, Notify::Never, Notify::Never);
    let running = tokio::spawn(deleter.delete(R));
    tokio::task::yield_now().await;
    deleter.shutdown().await;
    assert!(
        running.is_finished(),
        "shutdown returned before the run ended"
    );
    let report = running.await.unwrap().unwrap().report().unwrap().clone();
    assert_eq!(report.forced, 4);
    let _ = ObservedRouter::fill(&*store, RouterId::new(8), 100, 1).await;
    assert!(matches!(
        within(HOUR, deleter.delete(RouterId::new(8))).await,
        Err(DeleteError::ShuttingDown)
    ));
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn notifications_are_paced() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 1_000).await;
    let notifier = ScriptedNotifier::always(Arc::clone(&store), OK);
    let deleter = RouterDeleter::builder()
        .batch_size(100)
        .notify_rate(200)
        .build(Arc::clone(&store), Arc::clone(&notifier))
        .expect("valid settings");
    let report = report_within(HOUR, deleter.delete(R)).await;
    // 10 batches of 100 at 200 sessions/s: the last leaves 4.5 s after the first.
    assert_eq!(report.durations.notify, Duration::from_millis(4_500));
    assert_eq!(notifier.call_count(), 10);
    observed.assert_deleted(&*store).await;
}

/// Confirms by closing each session from a plain OS thread, as a transport
/// thread of the controller would.
// Kept: it confirms from a plain OS thread; the kit's notifiers confirm on tokio tasks.
struct ThreadConfirm(Arc<MemoryStore>);

impl session_lifecycle::TerminationNotifier for ThreadConfirm {
    async fn notify(
        &self,
        batch: session_lifecycle::TerminationBatch,
    ) -> Result<(), session_lifecycle::NotifyError> {
        let store = Arc::clone(&self.0);
        std::thread::spawn(move || {
            for key in batch.sessions {
                let _ =
                    futures::executor::block_on(store.close_exact(key, CloseReason::RouterDeleted));
            }
        });
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_returns_only_after_in_flight_releases_finish() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let session = store
        .create(session_lifecycle::NewSession::new(
            session_lifecycle::SessionId::new(1),
            R,
            incarnation,
        ))
        .await
        .unwrap();
    // A slow release: it blocks its (confirming) thread until a timer task
    // opens the gate, well after the session counts as closed.
    let released = SlowRelease::attach(&session).open_after(Duration::from_millis(100));
    let deleter = RouterDeleter::new(Arc::clone(&store), ThreadConfirm(Arc::clone(&store)));
    let report = report_within(Duration::from_secs(60), deleter.delete(R)).await;
    assert_eq!(report.confirmed, 1);
    assert!(
        released.load(Ordering::SeqCst),
        "delete returned before the session's release finished"
    );
}

/// Answers a termination notice with clients hanging up: even ids close
/// as `ClientClosed`, odd ones are confirmed by the router (`RouterDeleted`).
// Kept: closing with a reason other than `RouterDeleted` is no kit script.
struct ClientsHangUp(Arc<MemoryStore>);

impl session_lifecycle::TerminationNotifier for ClientsHangUp {
    async fn notify(
        &self,
        batch: session_lifecycle::TerminationBatch,
    ) -> Result<(), session_lifecycle::NotifyError> {
        for key in batch.sessions {
            let reason = if key.id().get() % 2 == 0 {
                CloseReason::ClientClosed
            } else {
                CloseReason::RouterDeleted
            };
            let _ = self.0.close_exact(key, reason).await;
        }
        Ok(())
    }
}

/// Issue #17, item 7: `confirmed` counts the sessions closed with
/// `RouterDeleted`, as its documentation says; sessions whose clients hung
/// up meanwhile are `closed_otherwise`.
#[tokio::test(start_paused = true)]
async fn confirmed_counts_only_router_confirmations() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 10).await;
    let deleter = RouterDeleter::new(Arc::clone(&store), ClientsHangUp(Arc::clone(&store)));
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!(
        (
            report.confirmed,
            report.closed_otherwise,
            report.already_closed,
            report.forced
        ),
        (5, 5, 0, 0)
    );
    assert_eq!(observed.count_reason(CloseReason::ClientClosed), 5);
    observed.assert_deleted(&*store).await;
}

/// Issue #21.6: with `max_concurrent(2)`, five routers deleted at once run
/// two at a time, the rest waiting in the order asked (their routers still
/// live, counted as queued); all finish.
#[tokio::test(start_paused = true)]
async fn a_cap_on_concurrent_deletions_queues_the_rest_in_order() {
    use session_lifecycle::store::RouterStatus;
    use session_lifecycle::{
        Event, EventBus, NewSession, NotifyError, SessionId, TerminationBatch, TerminationNotifier,
    };

    /// Answers nothing until let go: holds each running deletion.
    struct Held(Arc<tokio::sync::Semaphore>);
    impl TerminationNotifier for Held {
        async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
            let _ = self.0.acquire().await.map(|permit| permit.forget());
            Ok(())
        }
    }
    let store = Arc::new(MemoryStore::new());
    let mut routers = Vec::new();
    for r in 1..=5u64 {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        let spec = NewSession::new(SessionId::new(r), router, incarnation);
        drop(store.create(spec).await.unwrap());
        routers.push(router);
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    let deleter = RouterDeleter::builder()
        .max_concurrent(2)
        .confirm_timeout(Duration::from_secs(1))
        .notify_timeout(Duration::from_secs(60))
        .retries(0)
        .events(bus)
        .build(Arc::clone(&store), Held(Arc::clone(&gate)))
        .unwrap();
    let mut deletions = Vec::new();
    for &router in &routers {
        deletions.push(tokio::spawn(deleter.delete(router)));
        tokio::task::yield_now().await;
    }
    // Until the three past the cap wait for a slot (each run is a task).
    within(HOUR, async {
        while deleter.queued() < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!((deleter.running(), deleter.queued()), (5, 3));
    let fenced = |store: &Arc<MemoryStore>, router| {
        let store = Arc::clone(store);
        async move {
            matches!(
                store.router_status(router).await.unwrap(),
                RouterStatus::Fenced(_)
            )
        }
    };
    let mut fenced_now = Vec::new();
    for &router in &routers {
        fenced_now.push(fenced(&store, router).await);
    }
    assert_eq!(fenced_now, [true, true, false, false, false]);

    gate.add_permits(1_000);
    for deletion in deletions {
        within(HOUR, deletion).await.unwrap().unwrap();
    }
    assert_eq!((deleter.running(), deleter.queued()), (0, 0));
    let order: Vec<RouterId> = std::iter::from_fn(|| events.try_recv())
        .filter_map(|event| match event {
            Event::RouterFenced { router, .. } => Some(router),
            _ => None,
        })
        .collect();
    assert_eq!(order, routers, "fenced in the order asked");
    let refused = RouterDeleter::builder()
        .max_concurrent(0)
        .build(Arc::clone(&store), Held(Arc::clone(&gate)))
        .unwrap_err();
    assert!(
        refused.to_string().ends_with("must be at least 1, got 0"),
        "{refused}"
    );
    let refused = RouterDeleter::builder()
        .max_concurrent(usize::MAX)
        .build(Arc::clone(&store), Held(gate))
        .unwrap_err();
    assert!(
        refused.to_string().contains(&format!(
            "must be at most {}",
            tokio::sync::Semaphore::MAX_PERMITS
        )),
        "{refused}"
    );
}

// ---------------------------------------------------------------------------
// Where a run runs

/// Confirms every notified session at once, through the store, and notes
/// the task each notice came in.
struct InTask {
    store: Arc<MemoryStore>,
    tasks: std::sync::Mutex<Vec<Option<tokio::task::Id>>>,
}

impl InTask {
    fn new(store: &Arc<MemoryStore>) -> Arc<Self> {
        Arc::new(Self {
            store: Arc::clone(store),
            tasks: std::sync::Mutex::default(),
        })
    }

    fn tasks(&self) -> Vec<Option<tokio::task::Id>> {
        self.tasks.lock().unwrap().clone()
    }
}

impl TerminationNotifier for InTask {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        self.tasks.lock().unwrap().push(tokio::task::try_id());
        for key in batch.sessions {
            let _ = self
                .store
                .close_exact(key, CloseReason::RouterDeleted)
                .await;
        }
        Ok(())
    }
}

/// The caller's own task drives its deletion: the notifier is called from
/// it, not from a task the deleter handed the run to.
#[tokio::test(start_paused = true)]
async fn the_callers_task_drives_its_deletion() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 25).await;
    let notifier = InTask::new(&store);
    let deleter = RouterDeleter::builder()
        .batch_size(10)
        .build(Arc::clone(&store), Arc::clone(&notifier))
        .expect("valid settings");
    let caller = tokio::spawn(async move {
        let outcome = deleter.delete(R).await;
        (tokio::task::id(), outcome)
    });
    let (caller, outcome) = within(HOUR, caller).await.unwrap();
    assert_eq!(outcome.unwrap().report().unwrap().confirmed, 25);
    assert_eq!(notifier.tasks(), vec![Some(caller); 3], "3 batches");
    observed.assert_deleted(&*store).await;
}

/// Calls made together share one run even when that run could end within
/// a single poll (confirmed inline, one batch): none of them finds the
/// router deleted already.
#[tokio::test(start_paused = true)]
async fn calls_made_together_share_a_run_that_ends_at_once() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 5).await;
    let notifier = InTask::new(&store);
    let deleter = RouterDeleter::new(Arc::clone(&store), Arc::clone(&notifier));
    let (first, second, third) = within(
        HOUR,
        futures::future::join3(
            deleter.delete(R),
            deleter.delete_incarnation(R, observed.incarnation),
            deleter.delete(R),
        ),
    )
    .await;
    let first = first.unwrap();
    assert_eq!(first.report().map(|r| r.confirmed), Some(5), "{first:?}");
    assert_eq!(second.unwrap(), first);
    assert_eq!(third.unwrap(), first);
    assert_eq!(notifier.tasks().len(), 1, "one run, one notice");
    observed.assert_deleted(&*store).await;
}

/// A caller that polls its deletion once and then holds the future without
/// polling it again does not hold the deletion up: the deleter's own task
/// drives it to its end, and the held future answers with its report.
#[tokio::test(start_paused = true)]
async fn a_deletion_polled_once_then_held_still_ends() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 30).await;
    let bus = EventBus::new(1024);
    let mut events = bus.subscribe();
    // Confirmations take a while: the run waits on them several times.
    let deleter = slow_deleter(&store, bus);
    let started = Instant::now();
    let mut held = std::pin::pin!(deleter.delete(R));
    assert!(futures::poll!(held.as_mut()).is_pending());
    let deleted = within(HOUR, deleted_report(&mut events, R)).await;
    assert_eq!(deleted.confirmed, 30, "{deleted:?}");
    // Started by the deleter's steward within two of its 10 ms ticks.
    let late = started.elapsed() - deleted.durations.total;
    assert!(late <= Duration::from_millis(20), "started {late:?} late");
    assert_eq!(deleter.running(), 0);
    observed.assert_deleted(&*store).await;
    let answer = within(HOUR, held).await.unwrap();
    assert_eq!(answer.report(), Some(&deleted));
}

/// The report of `router`'s deletion, from the bus.
async fn deleted_report(
    events: &mut session_lifecycle::events::Subscription,
    router: RouterId,
) -> session_lifecycle::DeletionReport {
    loop {
        match events.recv().await {
            Some(Event::RouterDeleted(report)) if report.router == router => break report,
            Some(_) => {}
            None => panic!("the bus closed"),
        }
    }
}

/// [`deleter`] with routers that confirm everything after 300 ms,
/// reporting on `bus`.
fn slow_deleter(
    store: &Arc<MemoryStore>,
    bus: EventBus,
) -> RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>> {
    settings()
        .events(bus)
        .build(
            Arc::clone(store),
            ScriptedNotifier::new(Arc::clone(store), Script::by_round(SLOW, SLOW)),
        )
        .expect("valid settings")
}

/// A caller that leaves while its deletion waits for confirmations hands
/// the run to the deleter at once: it ends when the same deletion awaited
/// to its end does, to the tick of the paused clock.
#[tokio::test(start_paused = true)]
async fn a_caller_leaving_mid_run_hands_it_over_at_once() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(1024);
    let mut events = bus.subscribe();
    let deleter = slow_deleter(&store, bus);
    let awaited = ObservedRouter::fill(&*store, RouterId::new(1), 0, 30).await;
    let left = ObservedRouter::fill(&*store, RouterId::new(2), 100, 30).await;
    let whole = report_within(HOUR, deleter.delete(awaited.router)).await;

    let started = Instant::now();
    let dropped = tokio::time::timeout(Duration::from_millis(50), deleter.delete(left.router));
    assert!(
        dropped.await.is_err(),
        "the run waits for its first answers"
    );
    let report = within(HOUR, deleted_report(&mut events, left.router)).await;
    assert_eq!(report.confirmed, 30, "{report:?}");
    assert_eq!(started.elapsed(), whole.durations.total, "{report:?}");
    awaited.assert_deleted(&*store).await;
    left.assert_deleted(&*store).await;
}

/// The deleter's own task, which drives the runs nobody drives, lives on
/// a runtime: once that runtime is gone, the next deletion brings it back
/// on its own, and a run its caller left still ends.
#[test]
fn a_deleter_outliving_its_runtime_still_drives_runs_left_by_their_callers() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(1024);
    let mut events = bus.subscribe();
    let deleter = slow_deleter(&store, bus);
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
    };
    let first = paused();
    first.block_on(async {
        let _ = store.register_router(RouterId::new(1)).await.unwrap();
        let report = report_within(HOUR, deleter.delete(RouterId::new(1))).await;
        assert_eq!(report.sessions, 0);
    });
    drop(first);

    paused().block_on(async {
        let left = ObservedRouter::fill(&*store, R, 0, 30).await;
        let dropped = tokio::time::timeout(Duration::from_millis(50), deleter.delete(R));
        assert!(
            dropped.await.is_err(),
            "the run waits for its first answers"
        );
        let report = within(HOUR, deleted_report(&mut events, R)).await;
        assert_eq!(report.confirmed, 30, "{report:?}");
        left.assert_deleted(&*store).await;
    });
}

/// A deleter that shut down leaves no task of its own behind: its
/// steward, which would otherwise stay a second for the next deletion,
/// leaves with the last run.
#[tokio::test(start_paused = true)]
async fn shutdown_leaves_no_task_of_the_deleter_behind() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    for id in 0..20 {
        let spec = session_lifecycle::NewSession::new(
            session_lifecycle::SessionId::new(id),
            R,
            incarnation,
        );
        drop(store.create(spec).await.unwrap());
    }
    let deleter = deleter(&store, OK, OK);
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = alive();
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!(report.confirmed, 20);
    let started = Instant::now();
    deleter.shutdown().await;
    assert_eq!(started.elapsed(), Duration::ZERO, "nothing to wait for");
    assert_eq!(alive(), before, "a task of the deleter is left");
}

/// A future dropped right after its first poll, before the deleter's
/// steward even looked at the run, still hands the run over at once.
#[tokio::test(start_paused = true)]
async fn a_future_dropped_after_its_first_poll_hands_the_run_over_at_once() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(1024);
    let mut events = bus.subscribe();
    let deleter = slow_deleter(&store, bus);
    // An earlier deletion: the steward runs, and ticks.
    let earlier = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
    let _ = report_within(HOUR, deleter.delete(earlier.router)).await;
    // Between two of the steward's ticks.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let left = ObservedRouter::fill(&*store, R, 100, 30).await;
    let started = Instant::now();
    let mut dropped = Box::pin(deleter.delete(R));
    assert!(futures::poll!(dropped.as_mut()).is_pending());
    drop(dropped);
    let report = within(HOUR, deleted_report(&mut events, R)).await;
    assert_eq!(report.confirmed, 30, "{report:?}");
    assert_eq!(started.elapsed(), report.durations.total, "started late");
    left.assert_deleted(&*store).await;
}
