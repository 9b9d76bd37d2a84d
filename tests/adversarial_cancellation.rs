//! Adversarial cancellation suite (issue #17), written as a controller
//! author would, with the public API and the test kit only.
//!
//! Each cancellable future is polled 0, 1, 2, … times and then dropped, at
//! every poll point until it completes by itself (so the suite follows the
//! code: a new await point is a new case). After each drop: nothing was
//! released twice, no session is half closed, the store's invariants hold
//! (`InvariantChecker`), and a fresh call succeeds. For `delete` (I6) the
//! deletion goes on without its caller, a second call joins or finds it
//! done, and the whole stays within `max_wait`; a deletion cut by its
//! runtime shutting down is resumed on a new runtime.
//!
//! The store answers after a round trip: `RoundTrip` yields before and
//! after each call, so every store call is two poll points, one of them
//! after the call took effect and before its caller saw the answer.
//!
//! `SESSION_LIFECYCLE_SOAK=n` repeats every enumeration `n` times.

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use futures::FutureExt;
use session_lifecycle::test_util::conformance::soak_rounds;
use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, Script, ScriptedNotifier, Subset,
    paused_runtime, within,
};
use session_lifecycle::{
    AuditSweeper, Backoff, CloseReason, Incarnation, LivenessMonitor, MemoryStore, NewSession,
    ReclaimQueue, Reconciler, ResourceClass, RouterDeleter, RouterId, Session, SessionId,
    SessionKey, SessionState, SessionStore, deleter::DeleteOutcome, liveness::NoProbe,
    reclaim::ReclaimError, reclaim::ReclaimTask, session::Classed, session::CloseOutcome,
    store::AuditReport, store::BackendError, store::Corruption, store::CreateError,
    store::FenceError, store::FenceSnapshot, store::FinishError, store::FinishReport,
    store::RegisterError, store::Repair, store::RouterCensus, store::RouterError,
    store::RouterStatus, store::SessionError,
};
use tokio::sync::Semaphore;
use tokio::time::{Duration, Instant};

const R: RouterId = RouterId::new(1);
/// A router the store never heard of: its sessions are orphans.
const GONE: RouterId = RouterId::new(9);
/// A future still pending after this many polls hangs.
const MAX_POLLS: usize = 20_000;
/// Untimed work on top of `max_wait`: none takes time on a paused clock.
const SLACK: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------

/// A `MemoryStore` behind a round trip: every call yields once before it
/// reaches the store and once after, as a remote store's would.
// Kept: the kit has no store wrapper; this one only adds poll points.
#[derive(Debug, Default)]
struct RoundTrip(MemoryStore);

async fn round_trip<T>(call: impl Future<Output = T>) -> T {
    tokio::task::yield_now().await;
    let answer = call.await;
    tokio::task::yield_now().await;
    answer
}

impl SessionStore for RoundTrip {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        round_trip(self.0.register_router(router)).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        round_trip(self.0.router_status(router)).await
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        round_trip(self.0.create(spec)).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        round_trip(self.0.get(id)).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        round_trip(self.0.close(id, reason)).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        round_trip(self.0.remove(id)).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        round_trip(self.0.close_exact(key, reason)).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, SessionError> {
        round_trip(self.0.remove_exact(key)).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session>, RouterError> {
        round_trip(self.0.sessions(router)).await
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        round_trip(self.0.count(router)).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        round_trip(self.0.fence(router)).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        round_trip(self.0.fence_incarnation(router, incarnation)).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        round_trip(self.0.finish(router, incarnation)).await
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        round_trip(self.0.audit()).await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        round_trip(self.0.census()).await
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        round_trip(self.0.repair(findings)).await
    }
}

/// Polls `future` up to `polls` times, awaiting `between()` after each poll
/// that left it pending (other tasks run, the clock may move); drops it
/// then. Its output, if it completed.
async fn poll_then_drop<F, B>(
    future: F,
    polls: usize,
    mut between: impl FnMut() -> B,
) -> Option<F::Output>
where
    F: Future,
    B: Future<Output = ()>,
{
    let mut future = pin!(future);
    for _ in 0..polls {
        if let Poll::Ready(output) = futures::poll!(future.as_mut()) {
            return Some(output);
        }
        between().await;
    }
    None
}

/// Runs `case(polls)` for polls = 0, 1, 2, … until a case's future
/// completed within its polls (the case returns `true`); returns how many
/// poll points there were. Repeated `SESSION_LIFECYCLE_SOAK` times.
async fn every_poll_point<C: Future<Output = bool>>(mut case: impl FnMut(usize) -> C) -> usize {
    let mut points = 0;
    for _ in 0..soak_rounds(1) {
        points = 0;
        loop {
            if case(points).await {
                break;
            }
            points += 1;
            assert!(points < MAX_POLLS, "still pending after {MAX_POLLS} polls");
        }
    }
    points
}

/// Whether `session`'s close is complete: closed, resources released,
/// waiters woken (a closed session whose close is not complete is half
/// closed).
fn close_complete(session: &Session) -> bool {
    session.closed().now_or_never().is_some()
}

/// A critical resource on each session of `observed`, beside the kit's
/// counter (of the normal class): a close that releases one class and
/// loses the other shows.
fn attach_critical(observed: &ObservedRouter) -> Vec<Arc<AtomicUsize>> {
    let attach = |session: &Session| {
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        let critical = Classed::new(ResourceClass::Critical, move |_: CloseReason| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        session.attach(critical).expect("an open session");
        count
    };
    observed.sessions.iter().map(attach).collect()
}

/// Each session is open and unreleased, or closed (with `reason`, if
/// given), complete and each of its resources released exactly once.
fn assert_whole(
    observed: &ObservedRouter,
    critical: &[Arc<AtomicUsize>],
    reason: Option<CloseReason>,
    label: &str,
) {
    let sessions = observed.sessions.iter().zip(&observed.releases);
    for ((session, normal), critical) in sessions.zip(critical) {
        let released = [normal, critical].map(|count| count.load(Ordering::SeqCst));
        match session.state() {
            SessionState::Closed => {
                let closed_with = session.close_reason();
                assert!(
                    reason.is_none() || closed_with == reason,
                    "{label}: {session:?}"
                );
                assert!(close_complete(session), "{label}: {session:?} half closed");
                assert_eq!(
                    released,
                    [1, 1],
                    "{label}: {session:?} released (normal, critical)"
                );
            }
            state => assert_eq!(
                released,
                [0, 0],
                "{label}: {session:?} is {state}, released"
            ),
        }
    }
}

fn track(checker: &InvariantChecker, observed: &ObservedRouter) {
    for session in &observed.sessions {
        checker.track(session);
    }
    checker.track_router(observed.router);
}

/// A reclaim queue that makes closes wait: room for two tasks, one worker.
fn narrow_queue() -> ReclaimQueue {
    ReclaimQueue::builder()
        .capacity(2)
        .workers(1)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// RouterDeleter::delete
// ---------------------------------------------------------------------------

const SESSIONS: u64 = 12;

type Deleter = RouterDeleter<RoundTrip, Arc<ScriptedNotifier<RoundTrip>>>;

/// Round 0: the first batch confirms the even ids after 150 ms, the second
/// fails. Round 1 confirms ids divisible by 3; round 2 never answers; the
/// rest is forced through a narrow reclaim queue.
fn scripted_deleter(store: &Arc<RoundTrip>, queue: Option<ReclaimQueue>) -> Deleter {
    let slow_even = Notify::Slow {
        delay: Duration::from_millis(150),
        confirm: Subset::EvenIds,
    };
    let thirds = Notify::Confirm(Subset::Filter(|id, _| id.get() % 3 == 0));
    let script = Script::calls([slow_even, Notify::Error, thirds], Notify::Never);
    let builder = RouterDeleter::builder()
        .batch_size(6)
        .notify_timeout(Duration::from_millis(300))
        .confirm_timeout(Duration::from_millis(400))
        .backoff(
            Backoff::new()
                .retries(2)
                .delays(Duration::from_millis(100), Duration::from_millis(200)),
        );
    let builder = match queue {
        Some(queue) => builder.reclaim_queue(queue),
        None => builder,
    };
    builder
        .build(
            Arc::clone(store),
            ScriptedNotifier::new(Arc::clone(store), script),
        )
        .expect("valid settings")
}

/// One step of the run between two polls of its caller: 20 ms of clock,
/// then the other tasks run once.
async fn clock_step() {
    tokio::time::advance(Duration::from_millis(20)).await;
}

/// Drops the caller of `delete` (or of `delete_incarnation`) after `polls`
/// polls; then either a second call joins the run (even `polls`) or the
/// deleter drains it (odd): the deletion ends, whole, within its bound.
async fn delete_case(polls: usize, by_incarnation: bool) -> bool {
    let label = format!("delete (by incarnation: {by_incarnation}) dropped after {polls} polls");
    let store = Arc::new(RoundTrip::default());
    let checker = InvariantChecker::new();
    let observed = ObservedRouter::fill(&*store, R, 0, SESSIONS).await;
    let critical = attach_critical(&observed);
    track(&checker, &observed);
    let queue = narrow_queue();
    let deleter = scripted_deleter(&store, Some(queue.clone()));
    let bound = deleter.max_wait(SESSIONS as usize) + SLACK;
    let start = Instant::now();
    let delete = |deleter: &Deleter| {
        if by_incarnation {
            deleter.delete_incarnation(R, observed.incarnation).boxed()
        } else {
            deleter.delete(R).boxed()
        }
    };
    let first = poll_then_drop(delete(&deleter), polls, clock_step).await;
    let completed = first.is_some();
    if polls == 0 {
        // Never polled: nothing started.
        assert_eq!(deleter.running(), 0, "{label}");
        let status = store.router_status(R).await.unwrap();
        assert_eq!(status, RouterStatus::Live(observed.incarnation), "{label}");
        assert_whole(&observed, &critical, None, &label);
        assert!(observed.sessions.iter().all(|s| !s.is_closed()), "{label}");
    }
    let outcome = match first {
        Some(outcome) => outcome,
        None if polls.is_multiple_of(2) => within(bound, delete(&deleter)).await,
        None => {
            // Nobody waits: the deletion finishes on its own.
            within(bound, deleter.shutdown()).await;
            let status = store.router_status(R).await.unwrap();
            assert_eq!(
                status,
                RouterStatus::Deleted(observed.incarnation),
                "{label}"
            );
            let fresh = scripted_deleter(&store, None);
            within(bound, delete(&fresh)).await
        }
    };
    let elapsed = start.elapsed();
    assert!(
        elapsed <= bound,
        "{label}: took {elapsed:?}, bound {bound:?}"
    );
    match outcome.unwrap_or_else(|e| panic!("{label}: {e}")) {
        DeleteOutcome::Deleted(report) => {
            assert_eq!(report.incarnation, observed.incarnation, "{label}");
            assert!(!report.resumed, "{label}: joined, not resumed");
            let counted =
                report.confirmed + report.already_closed + report.closed_otherwise + report.forced;
            assert_eq!((counted, report.sessions), (12, 12), "{label}: {report:?}");
            assert_eq!(
                report.forced,
                observed.count_reason(CloseReason::Forced),
                "{label}"
            );
        }
        DeleteOutcome::AlreadyDeleted { incarnation, .. } => {
            assert!(
                !completed,
                "{label}: the first call answered AlreadyDeleted"
            );
            assert_eq!(incarnation, observed.incarnation, "{label}");
        }
    }
    assert_eq!(deleter.running(), 0, "{label}");
    // I1 when the call returned, the queue's releases included.
    assert!(
        critical.iter().all(|c| c.load(Ordering::SeqCst) == 1),
        "{label}"
    );
    observed.assert_deleted(&*store).await;
    checker.assert(&*store).await;
    completed
}

#[tokio::test(start_paused = true)]
async fn delete_dropped_at_every_poll_point_finishes_whole() {
    for by_incarnation in [false, true] {
        let points = every_poll_point(|polls| delete_case(polls, by_incarnation)).await;
        assert!(
            points > 50,
            "only {points} poll points: the case lost its teeth"
        );
    }
}

/// The deletion is cut at step `steps` by its runtime shutting down (the
/// run's task dies wherever it is); on a new runtime, `delete` resumes it
/// (or finds it done) and the router ends whole.
fn runtime_dropped_case(steps: usize) -> bool {
    let label = format!("runtime dropped after {steps} steps");
    let store = Arc::new(RoundTrip::default());
    let checker = InvariantChecker::new();
    let first = paused_runtime();
    let (deleter, (observed, critical), completed) = first.block_on(async {
        let observed = ObservedRouter::fill(&*store, R, 0, SESSIONS).await;
        let critical = attach_critical(&observed);
        track(&checker, &observed);
        let deleter = scripted_deleter(&store, None);
        let completed = poll_then_drop(deleter.delete(R), steps, clock_step)
            .await
            .is_some();
        (deleter, (observed, critical), completed)
    });
    drop(first);
    assert_eq!(deleter.running(), 0, "{label}: a dead run stays registered");

    paused_runtime().block_on(async {
        let status = store.router_status(R).await.unwrap();
        let outcome = within(HOUR, deleter.delete(R)).await;
        match outcome.unwrap_or_else(|e| panic!("{label}: {e}")) {
            DeleteOutcome::Deleted(report) => {
                assert!(!completed, "{label}: deleted twice");
                assert_eq!(report.incarnation, observed.incarnation, "{label}");
                // Resumed exactly when the dead run had fenced the router.
                let fenced = status == RouterStatus::Fenced(observed.incarnation);
                assert_eq!(report.resumed, fenced, "{label}: {status:?}");
                let counted = report.confirmed
                    + report.already_closed
                    + report.closed_otherwise
                    + report.forced;
                assert_eq!(counted, report.sessions, "{label}: {report:?}");
            }
            DeleteOutcome::AlreadyDeleted { incarnation, .. } => {
                assert_eq!(incarnation, observed.incarnation, "{label}");
            }
        }
        // The close waiters died with the first runtime: I1 without them.
        assert_eq!(store.count(R).await.unwrap(), 0, "{label}");
        assert_whole(&observed, &critical, None, &label);
        for session in &observed.sessions {
            assert!(session.is_closed(), "{label}: {session:?}");
            assert!(store.get(session.id()).await.unwrap().is_none(), "{label}");
        }
        checker.assert(&*store).await;
    });
    completed
}

#[test]
fn a_deletion_cut_by_its_runtime_at_every_step_is_resumed() {
    let mut points = 0;
    for _ in 0..soak_rounds(1) {
        points = (0..MAX_POLLS)
            .find(|&steps| runtime_dropped_case(steps))
            .expect("the deletion never completes");
    }
    assert!(points > 50, "only {points} steps");
}

// ---------------------------------------------------------------------------
// Reconciler::reconcile
// ---------------------------------------------------------------------------

/// The router reports ids 0..6 of its 12 sessions, and 3 it should drop;
/// the reconciler closes 6..12 in chunks of two through a narrow queue.
/// With `leftovers_removed`, the fresh reconciliation must also remove the
/// sessions the dropped one closed but left in the store.
async fn reconcile_case(polls: usize, leftovers_removed: bool) -> bool {
    let label = format!("reconcile dropped after {polls} polls");
    let store = Arc::new(RoundTrip::default());
    let checker = InvariantChecker::new();
    let observed = ObservedRouter::fill(&*store, R, 0, SESSIONS).await;
    let critical = attach_critical(&observed);
    track(&checker, &observed);
    // Older than the reconciliation: missing sessions are not spared.
    tokio::time::advance(Duration::from_secs(1)).await;
    let queue = narrow_queue();
    let reconciler = Reconciler::builder()
        .chunk_size(2)
        .reclaim_queue(queue.clone())
        .build(Arc::clone(&store))
        .expect("valid settings");
    let reported: Vec<SessionId> = (0..6).chain(100..103).map(SessionId::new).collect();
    let call = reconciler.reconcile(R, observed.incarnation, reported.clone());
    let completed = poll_then_drop(call, polls, tokio::task::yield_now)
        .await
        .is_some();
    within(HOUR, queue.idle()).await;
    assert_whole(&observed, &critical, Some(CloseReason::Reclaimed), &label);
    for session in &observed.sessions[..6] {
        assert_eq!(session.state(), SessionState::Active, "{label}: reported");
    }
    checker.assert(&*store).await;

    // A fresh reconciliation finishes the work.
    let report = within(
        HOUR,
        reconciler.reconcile(R, observed.incarnation, reported),
    )
    .await;
    let report = report.unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(report.drop.len(), 3, "{label}: {report:?}");
    within(HOUR, queue.idle()).await;
    assert_whole(&observed, &critical, Some(CloseReason::Reclaimed), &label);
    for session in &observed.sessions[6..] {
        assert!(session.is_closed(), "{label}: {session:?}");
        let stored = store.get(session.id()).await.unwrap();
        assert!(
            stored.is_none() || !leftovers_removed,
            "{label}: closed {session:?} still stored after a fresh reconcile"
        );
    }
    for session in store.sessions(R).await.unwrap() {
        let reported = session.id().get() < 6;
        assert!(reported || session.is_closed(), "{label}: {session:?}");
    }
    checker.assert(&*store).await;
    completed
}

#[tokio::test(start_paused = true)]
async fn reconcile_dropped_at_every_poll_point() {
    let points = every_poll_point(|polls| reconcile_case(polls, false)).await;
    assert!(points > 20, "only {points} poll points");
}

#[tokio::test(start_paused = true)]
async fn a_fresh_reconcile_removes_what_a_dropped_one_left_closed_in_the_store() {
    every_poll_point(|polls| reconcile_case(polls, true)).await;
}

// ---------------------------------------------------------------------------
// AuditSweeper::sweep
// ---------------------------------------------------------------------------

/// A store with findings of every kind: four orphans (sessions of a router
/// the store never knew, each with a counting resource), a session missing
/// from its router's index, an index entry without a session, and a closed
/// session left in the store. The sweep closes the orphans through a
/// narrow queue.
async fn sweep_case(polls: usize) -> bool {
    let label = format!("sweep dropped after {polls} polls");
    let store = Arc::new(RoundTrip::default());
    let checker = InvariantChecker::new();
    let live = ObservedRouter::fill(&*store, R, 0, 6).await;
    track(&checker, &live);
    let mut orphans = ObservedRouter {
        router: GONE,
        incarnation: Incarnation::new(999),
        sessions: Vec::new(),
        releases: Vec::new(),
        waiters: Vec::new(),
    };
    for id in 100..104 {
        let session = NewSession::new(SessionId::new(id), GONE, orphans.incarnation).into_session();
        store.0.corrupt(Corruption::Inject(session.clone()));
        orphans.observe(session);
    }
    let critical = attach_critical(&orphans);
    store.0.corrupt(Corruption::Unindex(SessionId::new(1)));
    store.0.corrupt(Corruption::DropFromMap(SessionId::new(2)));
    let _ = live.sessions[3].close(CloseReason::ClientClosed);

    let queue = narrow_queue();
    let sweeper = AuditSweeper::builder()
        .interval(HOUR * 24)
        .reclaim_queue(queue.clone())
        .build(Arc::clone(&store))
        .unwrap();
    let completed = poll_then_drop(sweeper.sweep(), polls, tokio::task::yield_now)
        .await
        .is_some();
    within(HOUR, queue.idle()).await;
    assert_whole(&orphans, &critical, Some(CloseReason::Reclaimed), &label);

    // Fresh sweeps repair the rest (a closed session is removed once two
    // sweeps saw it).
    for _ in 0..2 {
        let swept = within(HOUR, sweeper.sweep()).await;
        swept.unwrap_or_else(|e| panic!("{label}: {e}"));
    }
    within(HOUR, queue.idle()).await;
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{label}: {audit:?}");
    assert_whole(&orphans, &critical, Some(CloseReason::Reclaimed), &label);
    assert!(orphans.sessions.iter().all(Session::is_closed), "{label}");
    for session in &orphans.sessions {
        checker.track(session);
    }
    checker.assert(&*store).await;
    sweeper.shutdown().await;
    completed
}

#[tokio::test(start_paused = true)]
async fn sweep_dropped_at_every_poll_point() {
    let points = every_poll_point(sweep_case).await;
    assert!(points > 10, "only {points} poll points");
}

// ---------------------------------------------------------------------------
// ReclaimQueue::push and close_session on a full queue
// ---------------------------------------------------------------------------

/// Counts runs of a reclaim task's work and drops of the task.
#[derive(Default)]
struct Counted {
    runs: AtomicUsize,
    drops: AtomicUsize,
}

struct DropCount(Arc<Counted>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// A task whose work counts itself, then waits for a permit of `gate`.
fn gated_task(id: u64, counted: &Arc<Counted>, gate: &Arc<Semaphore>) -> ReclaimTask {
    let (guard, gate) = (DropCount(Arc::clone(counted)), Arc::clone(gate));
    ReclaimTask::new(SessionId::new(id), R, move || {
        guard.0.runs.fetch_add(1, Ordering::SeqCst);
        let gate = Arc::clone(&gate);
        async move {
            let _permit = gate.acquire().await;
            Ok::<(), ReclaimError>(())
        }
    })
}

/// The queue (room for one, one worker) is full: the worker holds a task
/// waiting on the gate, and one task waits in the queue. A push is polled
/// `polls` times; the gate opens after the third poll, so the push
/// completes at some poll.
async fn push_case(polls: usize) -> bool {
    let label = format!("push dropped after {polls} polls");
    let queue = ReclaimQueue::builder()
        .capacity(1)
        .workers(1)
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (busy, waiting, pushed) = (
        Arc::new(Counted::default()),
        Arc::new(Counted::default()),
        Arc::new(Counted::default()),
    );
    queue.push(gated_task(1, &busy, &gate)).await.unwrap();
    while busy.runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await; // the worker takes it
    }
    queue.push(gated_task(2, &waiting, &gate)).await.unwrap();
    let mut polled = 0;
    let push = queue.push(gated_task(3, &pushed, &gate));
    let outcome = poll_then_drop(push, polls, || {
        polled += 1;
        if polled == 3 {
            gate.add_permits(1_000);
        }
        tokio::task::yield_now()
    })
    .await;
    gate.add_permits(1_000);
    within(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert_eq!((stats.depth, stats.in_flight), (0, 0), "{label}: {stats:?}");
    for (name, counted) in [("busy", &busy), ("waiting", &waiting)] {
        assert_eq!(counted.runs.load(Ordering::SeqCst), 1, "{label}: {name}");
    }
    // Pushed: ran once. Dropped with the push: never ran, dropped once.
    let runs = pushed.runs.load(Ordering::SeqCst);
    match &outcome {
        Some(Ok(())) => assert_eq!(runs, 1, "{label}"),
        Some(Err(error)) => panic!("{label}: {error}"),
        None => assert_eq!(runs, 0, "{label}: a dropped push ran"),
    }
    assert_eq!(pushed.drops.load(Ordering::SeqCst), 1, "{label}");
    // No permit leaked: the queue takes one task again, and only one.
    queue.pause();
    let again = Arc::new(Counted::default());
    let fresh = within(HOUR, queue.push(gated_task(4, &again, &gate))).await;
    assert!(fresh.is_ok(), "{label}");
    assert!(
        queue.try_push(gated_task(5, &again, &gate)).is_err(),
        "{label}: over capacity"
    );
    queue.resume();
    within(HOUR, queue.idle()).await;
    assert_eq!(again.runs.load(Ordering::SeqCst), 1, "{label}");
    outcome.is_some()
}

#[tokio::test(start_paused = true)]
async fn push_on_a_full_queue_dropped_at_every_poll_point() {
    let points = every_poll_point(push_case).await;
    assert!(points >= 3, "only {points} poll points");
}

/// `close_session` of a session with a resource of each class, on a full
/// queue: dropped mid-way, the resources it had not queued are released at
/// once, and each resource exactly once.
async fn close_session_case(polls: usize) -> bool {
    let label = format!("close_session dropped after {polls} polls");
    let queue = ReclaimQueue::builder()
        .capacity(1)
        .workers(1)
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let busy = Arc::new(Counted::default());
    queue.push(gated_task(1, &busy, &gate)).await.unwrap();
    while busy.runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    queue.push(gated_task(2, &busy, &gate)).await.unwrap();

    let session = NewSession::new(SessionId::new(7), R, Incarnation::new(1)).into_session();
    let classes = [
        ResourceClass::Low,
        ResourceClass::Normal,
        ResourceClass::High,
        ResourceClass::Critical,
    ];
    let released: Vec<Arc<AtomicUsize>> = classes
        .iter()
        .map(|&class| {
            let count = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&count);
            let resource = Classed::new(class, move |_: CloseReason| {
                counter.fetch_add(1, Ordering::SeqCst);
            });
            session.attach(resource).unwrap();
            count
        })
        .collect();
    let waiter = tokio::spawn(session.closed_owned());
    let mut polled = 0;
    let close = queue.close_session(&session, CloseReason::Forced);
    let outcome = poll_then_drop(close, polls, || {
        polled += 1;
        if polled == 4 {
            gate.add_permits(1_000);
        }
        tokio::task::yield_now()
    })
    .await;
    gate.add_permits(1_000);
    within(HOUR, queue.idle()).await;
    if polls > 0 {
        assert!(
            session.is_closed(),
            "{label}: polled once, the session is closed"
        );
        assert_eq!(
            within(HOUR, waiter).await.unwrap(),
            CloseReason::Forced,
            "{label}"
        );
        assert!(close_complete(&session), "{label}: half closed");
        let times: Vec<_> = released.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(times, [1; 4], "{label}: releases of {classes:?}");
    } else {
        assert!(!session.is_closed(), "{label}: never polled, still open");
        waiter.abort();
    }
    if let Some(outcome) = outcome {
        assert_eq!(outcome, CloseOutcome::Closed, "{label}");
    }
    // A fresh close finds it closed, or closes it.
    let again = within(HOUR, queue.close_session(&session, CloseReason::Reclaimed)).await;
    assert_eq!(again.won(), polls == 0, "{label}: {again:?}");
    within(HOUR, queue.idle()).await;
    assert!(
        released.iter().all(|c| c.load(Ordering::SeqCst) == 1),
        "{label}"
    );
    outcome.is_some()
}

#[tokio::test(start_paused = true)]
async fn close_session_on_a_full_queue_dropped_at_every_poll_point() {
    let points = every_poll_point(close_session_case).await;
    assert!(points >= 4, "only {points} poll points");
}

// ---------------------------------------------------------------------------
// Session::closed, Session::closed_owned
// ---------------------------------------------------------------------------

/// A waiter is dropped after `polls` polls while the session is closed
/// through a gated queue (closed after the 2nd poll, complete after the
/// 4th): the other waiters still wake, with the reason, and a fresh waiter
/// resolves at once.
async fn closed_case(polls: usize, owned: bool) -> bool {
    let label = format!("closed (owned: {owned}) dropped after {polls} polls");
    let queue = ReclaimQueue::builder().workers(1).build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let session = NewSession::new(SessionId::new(7), R, Incarnation::new(1)).into_session();
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    session
        .attach(move |_: CloseReason| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    // The worker is busy until the gate opens: the release waits behind it.
    let busy = Arc::new(Counted::default());
    queue.push(gated_task(1, &busy, &gate)).await.unwrap();
    let before = tokio::spawn(session.closed_owned());
    let polled = Cell::new(0);
    let step = || {
        polled.set(polled.get() + 1);
        if polled.get() == 2 {
            let (queue, session) = (queue.clone(), session.clone());
            drop(tokio::spawn(async move {
                queue
                    .close_session(&session, CloseReason::ClientClosed)
                    .await
            }));
        }
        if polled.get() == 4 {
            gate.add_permits(1_000);
        }
        tokio::task::yield_now()
    };
    // Whether the release had run when the waiter under test woke.
    let woke_released = Cell::new(false);
    let woken = |reason| {
        woke_released.set(released.load(Ordering::SeqCst) == 1);
        reason
    };
    let outcome = if owned {
        poll_then_drop(session.closed_owned().map(woken), polls, &step).await
    } else {
        poll_then_drop(session.closed().map(woken), polls, &step).await
    };
    // Whatever the drop point, the close goes on.
    while polled.get() < 4 {
        step().await;
    }
    let after = tokio::spawn(session.closed_owned());
    within(HOUR, queue.idle()).await;
    for waiter in [before, after] {
        let reason = within(HOUR, waiter).await.unwrap();
        assert_eq!(reason, CloseReason::ClientClosed, "{label}");
    }
    assert_eq!(
        session.closed().now_or_never(),
        Some(CloseReason::ClientClosed),
        "{label}"
    );
    assert_eq!(released.load(Ordering::SeqCst), 1, "{label}");
    if let Some(reason) = outcome {
        assert_eq!(reason, CloseReason::ClientClosed, "{label}");
        assert!(woke_released.get(), "{label}: woke before the release ran");
    }
    outcome.is_some()
}

#[tokio::test(start_paused = true)]
async fn close_waiters_dropped_at_every_poll_point() {
    for owned in [false, true] {
        let points = every_poll_point(|polls| closed_case(polls, owned)).await;
        assert!(points >= 4, "owned: {owned}: only {points} poll points");
    }
}

// ---------------------------------------------------------------------------
// LivenessMonitor::heartbeat_id
// ---------------------------------------------------------------------------

/// A heartbeat by id, through the round-trip store, dropped after `polls`
/// polls: recorded or not, the monitor is unharmed and a fresh heartbeat is
/// recorded; nothing is ignored, nobody reaped.
async fn heartbeat_case(polls: usize) -> bool {
    let label = format!("heartbeat_id dropped after {polls} polls");
    let store = Arc::new(RoundTrip::default());
    let incarnation = store.register_router(R).await.unwrap();
    let spec = NewSession::new(SessionId::new(1), R, incarnation);
    let session = store.create(spec).await.unwrap();
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    monitor.watch(&session).unwrap();
    let outcome = poll_then_drop(
        monitor.heartbeat_id(session.id()),
        polls,
        tokio::task::yield_now,
    )
    .await;
    if let Some(outcome) = outcome.as_ref() {
        assert!(outcome.is_ok(), "{label}: {outcome:?}");
    }
    within(HOUR, monitor.heartbeat_id(session.id()))
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let stats = monitor.stats();
    assert_eq!(
        (stats.ignored_heartbeats, stats.reaped),
        (0, 0),
        "{label}: {stats:?}"
    );
    assert_eq!(session.state(), SessionState::Active, "{label}");
    monitor.shutdown().await;
    outcome.is_some()
}

#[tokio::test(start_paused = true)]
async fn heartbeat_id_dropped_at_every_poll_point() {
    let points = every_poll_point(heartbeat_case).await;
    assert!(points >= 2, "only {points} poll points");
}
