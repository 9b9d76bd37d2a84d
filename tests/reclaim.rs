//! ReclaimQueue behaviour: retries and failure events, panics, timeouts,
//! custom policies, long-lived warnings, shutdown, backpressure, and the
//! deleter's force-close path. Time is paused: every wait is on tokio's
//! clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;
use session_lifecycle::{
    Backoff, BuildError, CloseReason, Event, EventBus, MemoryStore, NewSession, ReclaimQueue,
    ResourceClass, RouterDeleter, RouterId, SessionId, SessionStore, events::Subscription,
    reclaim::DefaultPolicy, reclaim::Priority, reclaim::ReclaimError, reclaim::ReclaimErrorKind,
    reclaim::ReclaimEvent, reclaim::ReclaimPolicy, reclaim::ReclaimTask, reclaim::RetrySchedule,
    reclaim::TaskInfo, reclaim::TryPushError, session::Classed, session::CloseOutcome,
};
use tokio::time::{Duration, Instant};

use session_lifecycle::test_util::{HOUR, Notify, ScriptedNotifier, within};

/// The order in which tasks ran, by session id.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u64>>>);

impl Log {
    fn task(&self, id: u64) -> ReclaimTask {
        let log = self.clone();
        ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
            let log = log.clone();
            async move {
                log.0.lock().push(id);
                Ok::<(), ReclaimError>(())
            }
        })
    }

    fn ran(&self) -> Vec<u64> {
        self.0.lock().clone()
    }
}

/// A task failing its first `failures` attempts with `error`, then
/// succeeding; counts attempts.
fn flaky(id: u64, failures: u32, error: fn() -> ReclaimError) -> (ReclaimTask, Arc<AtomicU32>) {
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&attempts);
    let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move { if n < failures { Err(error()) } else { Ok(()) } }
    });
    (task, attempts)
}

fn quick_retries(retries: u32) -> DefaultPolicy {
    DefaultPolicy::default().retry_schedule(
        RetrySchedule::new(
            Backoff::new()
                .retries(retries)
                .delays(Duration::from_millis(10), Duration::from_millis(40))
                .jitter(false),
        )
        .attempt_timeout(Duration::from_secs(1)),
    )
}

/// A bus for the queue's events, and a subscription taken before anything
/// is published on it.
fn bus() -> (EventBus, Subscription) {
    let bus = EventBus::default();
    let events = bus.subscribe();
    (bus, events)
}

/// The queue's events received so far.
fn drain(events: &mut Subscription) -> Vec<ReclaimEvent> {
    let mut all = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(event) = event {
            all.push(event);
        }
    }
    all
}

async fn settle(queue: &ReclaimQueue) {
    within(HOUR, queue.idle()).await;
}

#[tokio::test(start_paused = true)]
async fn retries_with_backoff_then_reports_failure() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .policy(quick_retries(2))
        .events(bus)
        .build()
        .unwrap();
    let (task, attempts) = flaky(7, u32::MAX, || ReclaimError::transient("port table busy"));
    let started = Instant::now();
    queue.push(task).await.unwrap();
    settle(&queue).await;

    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    // Backoff 10 ms then 20 ms, no jitter.
    assert_eq!(started.elapsed(), Duration::from_millis(30));
    let events = drain(&mut events);
    assert_eq!(events.len(), 3, "{events:?}");
    for (i, event) in events[..2].iter().enumerate() {
        let ReclaimEvent::ReclaimRetried {
            task,
            attempt,
            error,
            delay,
        } = event
        else {
            panic!("expected a retry, got {event:?}");
        };
        assert_eq!(task.session, SessionId::new(7));
        assert_eq!(*attempt, i as u32 + 1);
        assert_eq!(error.kind(), ReclaimErrorKind::Transient);
        assert_eq!(*delay, Duration::from_millis(10 << i));
    }
    let ReclaimEvent::ReclaimFailed {
        task,
        attempts,
        error,
    } = &events[2]
    else {
        panic!("expected a failure, got {:?}", events[2]);
    };
    assert_eq!(
        (task.session, task.router),
        (SessionId::new(7), RouterId::new(1))
    );
    assert_eq!(*attempts, 3);
    assert_eq!(error.to_string(), "release failed: port table busy");
    let stats = queue.stats();
    assert_eq!((stats.retried, stats.failed, stats.completed), (2, 1, 0));
    assert_eq!((stats.depth, stats.in_flight), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_retried_task_that_succeeds_is_not_a_failure() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .policy(quick_retries(3))
        .events(bus)
        .build()
        .unwrap();
    let (task, attempts) = flaky(1, 2, || ReclaimError::transient("busy"));
    queue.push(task).await.unwrap();
    settle(&queue).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let stats = queue.stats();
    assert_eq!((stats.retried, stats.failed, stats.completed), (2, 0, 1));
    assert!(
        drain(&mut events)
            .iter()
            .all(|e| matches!(e, ReclaimEvent::ReclaimRetried { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_not_retried() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .policy(quick_retries(5))
        .events(bus)
        .build()
        .unwrap();
    let (task, attempts) = flaky(1, u32::MAX, || ReclaimError::permanent("no such port"));
    queue.push(task).await.unwrap();
    settle(&queue).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    let events = drain(&mut events);
    assert!(matches!(
        &events[..],
        [ReclaimEvent::ReclaimFailed { attempts: 1, error, .. }]
            if error.kind() == ReclaimErrorKind::Permanent
    ));
}

#[tokio::test(start_paused = true)]
async fn panics_are_contained_reported_and_the_worker_goes_on() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .policy(quick_retries(3))
        .events(bus)
        .build()
        .unwrap();
    // Panics when called, and panics inside its future.
    let call = ReclaimTask::new(
        SessionId::new(1),
        RouterId::new(1),
        || -> std::future::Ready<Result<(), ReclaimError>> { panic!("release exploded") },
    );
    let future = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
        panic!("release future exploded");
        #[allow(unreachable_code)]
        Ok::<(), ReclaimError>(())
    });
    let log = Log::default();
    queue.push(call).await.unwrap();
    queue.push(future).await.unwrap();
    queue.push(log.task(3)).await.unwrap();
    settle(&queue).await;

    assert_eq!(log.ran(), [3], "the worker survived both panics");
    let failed: Vec<_> = drain(&mut events)
        .into_iter()
        .map(|event| match event {
            ReclaimEvent::ReclaimFailed {
                task,
                attempts,
                error,
            } => {
                assert_eq!(attempts, 1, "a panic is not retried");
                assert_eq!(error.kind(), ReclaimErrorKind::Panicked);
                (task.session.get(), error.to_string())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        failed,
        [
            (1, String::from("release panicked: release exploded")),
            (2, String::from("release panicked: release future exploded")),
        ]
    );
    assert_eq!(queue.stats().failed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_attempt_times_out_and_the_task_ends_within_its_schedule() {
    let schedule = RetrySchedule::new(
        Backoff::new()
            .retries(2)
            .delays(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .attempt_timeout(Duration::from_secs(2));
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .policy(DefaultPolicy::default().retry_schedule(schedule))
        .events(bus)
        .build()
        .unwrap();
    let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || {
        std::future::pending::<Result<(), ReclaimError>>()
    });
    let started = Instant::now();
    queue.push(task).await.unwrap();
    settle(&queue).await;
    assert!(started.elapsed() <= schedule.longest_total());
    assert!(started.elapsed() >= Duration::from_secs(6));
    let events = drain(&mut events);
    assert!(matches!(
        events.last(),
        Some(ReclaimEvent::ReclaimFailed { attempts: 3, error, .. })
            if error.kind() == ReclaimErrorKind::TimedOut
    ));
}

/// Low first, tokens never retried, a one-hour long-lived threshold.
struct Inverted {
    retries_seen: Arc<AtomicU32>,
}

impl ReclaimPolicy for Inverted {
    fn priority(&self, task: &TaskInfo) -> Priority {
        Priority::due_in(Duration::from_secs(3 - u64::from(task.class.rank())))
    }

    fn retry_schedule(&self, _task: &TaskInfo) -> RetrySchedule {
        self.retries_seen.fetch_add(1, Ordering::SeqCst);
        RetrySchedule::none()
    }

    fn long_lived_threshold(&self) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_orders_retries_and_thresholds() {
    let asked = Arc::new(AtomicU32::new(0));
    let queue = ReclaimQueue::builder()
        .workers(1)
        .paused(true)
        .policy(Inverted {
            retries_seen: Arc::clone(&asked),
        })
        .build()
        .unwrap();
    let log = Log::default();
    for (id, class) in ResourceClass::ALL.into_iter().enumerate() {
        queue.push(log.task(id as u64).class(class)).await.unwrap();
    }
    let (failing, attempts) = flaky(9, u32::MAX, || ReclaimError::transient("busy"));
    queue
        .push(failing.class(ResourceClass::Critical))
        .await
        .unwrap();
    assert_eq!(queue.stats().depth, 5);
    queue.resume();
    settle(&queue).await;
    // Low (id 3) first, critical (id 0) last: the policy's order.
    assert_eq!(log.ran(), [3, 2, 1, 0]);
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "RetrySchedule::none()");
    // Asked only for the task that needed it (its attempt failed); the
    // four that succeeded at once never needed a timeout or a backoff.
    assert_eq!(asked.load(Ordering::SeqCst), 1);

    let session = NewSession::new(SessionId::new(1), RouterId::new(1), 1.into()).into_session();
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(queue.check_long_lived([&session]), 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(queue.check_long_lived([&session]), 1);
}

#[tokio::test(start_paused = true)]
async fn long_lived_sessions_are_reported_once_each() {
    let policy = DefaultPolicy::default().long_lived_threshold(Some(Duration::from_secs(600)));
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .policy(policy)
        .events(bus)
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let router = RouterId::new(4);
    let incarnation = store.register_router(router).await.unwrap();
    for id in 0..3 {
        store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(300)).await;
    store
        .create(NewSession::new(SessionId::new(3), router, incarnation))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(301)).await;
    // Session 2 closes: closed sessions are not reported.
    let _ = store
        .close(SessionId::new(2), CloseReason::ClientClosed)
        .await
        .unwrap();

    let mut reported = 0;
    for _check in 0..7 {
        let sessions = store.sessions(router).await.unwrap();
        reported += queue.check_long_lived(&sessions);
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    // Checks at 601 s, 661 s, … 961 s: sessions 0 and 1 at the first;
    // session 3 (created at 300 s) at the one at 901 s, and never again.
    assert_eq!(reported, 3);
    let mut found: Vec<_> = drain(&mut events)
        .into_iter()
        .map(|event| match event {
            ReclaimEvent::LongLivedSession {
                session,
                router: r,
                incarnation: i,
                age,
            } => {
                assert_eq!((r, i), (router, incarnation));
                assert!(age >= Duration::from_secs(600));
                session.get()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    found.sort_unstable();
    assert_eq!(found, [0, 1, 3]);
    assert_eq!(queue.stats().long_lived, 3);

    let off = ReclaimQueue::builder()
        .policy(DefaultPolicy::default().long_lived_threshold(None))
        .build()
        .unwrap();
    let sessions = store.sessions(router).await.unwrap();
    assert_eq!(off.check_long_lived(&sessions), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_within_its_deadline() {
    let queue = ReclaimQueue::builder().workers(2).build().unwrap();
    let log = Log::default();
    for id in 0..100 {
        queue.push(log.task(id)).await.unwrap();
    }
    let report = within(HOUR, queue.shutdown(Duration::from_secs(1))).await;
    assert!(report.drained);
    assert!(report.left.is_empty() && report.interrupted.is_empty());
    let mut ran = log.ran();
    ran.sort_unstable();
    assert_eq!(ran, (0..100).collect::<Vec<_>>());
    // Closed: later pushes hand their task back.
    let err = queue.push(log.task(100)).await.unwrap_err();
    assert_eq!(err.into_task().info().session, SessionId::new(100));
    assert!(matches!(
        queue.try_push(log.task(101)),
        Err(TryPushError::ShutDown(_))
    ));
    assert!(queue.stats().closed);
}

#[tokio::test(start_paused = true)]
async fn shutdown_hands_back_what_it_could_not_run() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(4)
        .events(bus)
        .build()
        .unwrap();
    // Each task takes 10 s; the deadline allows 25 s.
    let slow = |id: u64| {
        ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<(), ReclaimError>(())
        })
    };
    for id in 0..5 {
        queue.push(slow(id)).await.unwrap();
    }
    // The queue is full (one running, four waiting): this push waits, and
    // gets its task back when the shutdown closes the queue.
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(slow(99)).await }
    });
    tokio::task::yield_now().await;
    let report = within(HOUR, queue.shutdown(Duration::from_secs(25))).await;
    assert!(!report.drained);
    let left: Vec<_> = report.left.iter().map(|t| t.info().session.get()).collect();
    assert_eq!(left, [3, 4], "handed back in the order they would have run");
    let interrupted: Vec<_> = report.interrupted.iter().map(|t| t.session.get()).collect();
    assert_eq!(interrupted, [2]);
    let back = waiting.await.unwrap().unwrap_err().into_task();
    assert_eq!(back.info().session, SessionId::new(99));
    let events = drain(&mut events);
    assert!(matches!(
        &events[..],
        [ReclaimEvent::ReclaimFailed { task, error, .. }]
            if task.session == SessionId::new(2) && error.kind() == ReclaimErrorKind::Interrupted
    ));
    let stats = queue.stats();
    assert_eq!((stats.completed, stats.failed, stats.in_flight), (2, 1, 0));
    // A handed-back task can still be run by its caller.
    let mut task = report.left.into_iter().next().unwrap();
    within(HOUR, task.run_once()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_pushes_back() {
    let queue = ReclaimQueue::builder()
        .capacity(2)
        .paused(true)
        .build()
        .unwrap();
    let log = Log::default();
    queue.try_push(log.task(0)).unwrap();
    queue.push(log.task(1)).await.unwrap();
    let refused = queue.try_push(log.task(2)).unwrap_err();
    assert!(matches!(refused, TryPushError::Full(_)));
    assert_eq!(refused.into_task().info().session, SessionId::new(2));
    // `push` waits for room: it finishes only once the workers run.
    let pushing = tokio::spawn({
        let queue = queue.clone();
        let task = log.task(3);
        async move { queue.push(task).await }
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!pushing.is_finished());
    assert_eq!(queue.stats().depth, 2);
    queue.resume();
    within(HOUR, pushing).await.unwrap().unwrap();
    settle(&queue).await;
    assert_eq!(log.ran().len(), 3);
    assert_eq!(queue.stats().peak_depth, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_capacity_from_many_producers_runs_each_task_once() {
    const CAPACITY: usize = 64;
    const PRODUCERS: u64 = 8;
    const EACH: u64 = 80; // 8 × 80 = 640 = 10 × capacity
    let queue = ReclaimQueue::builder()
        .capacity(CAPACITY)
        .workers(3)
        .build()
        .unwrap();
    let runs: Arc<Vec<AtomicU32>> =
        Arc::new((0..PRODUCERS * EACH).map(|_| AtomicU32::new(0)).collect());
    let over = Arc::new(AtomicU32::new(0));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let queue = queue.clone();
        let runs = Arc::clone(&runs);
        let over = Arc::clone(&over);
        producers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let id = p * EACH + i;
                let (runs, over, probe) = (Arc::clone(&runs), Arc::clone(&over), queue.clone());
                let task = ReclaimTask::new(SessionId::new(id), RouterId::new(p), move || {
                    runs[id as usize].fetch_add(1, Ordering::SeqCst);
                    if probe.stats().depth > CAPACITY {
                        over.fetch_add(1, Ordering::SeqCst);
                    }
                    async {
                        tokio::task::yield_now().await;
                        Ok::<(), ReclaimError>(())
                    }
                })
                .class(ResourceClass::ALL[(id % 4) as usize])
                .traffic(id * 977);
                queue.push(task).await.unwrap();
            }
        }));
    }
    for producer in producers {
        within(Duration::from_secs(60), producer).await.unwrap();
    }
    within(Duration::from_secs(60), queue.idle()).await;
    assert!(
        runs.iter().all(|n| n.load(Ordering::SeqCst) == 1),
        "every task ran exactly once"
    );
    assert_eq!(over.load(Ordering::SeqCst), 0);
    let stats = queue.stats();
    assert!(
        stats.peak_depth <= CAPACITY,
        "peak {} > capacity",
        stats.peak_depth
    );
    assert_eq!(stats.pushed, PRODUCERS * EACH);
    assert_eq!(stats.completed, PRODUCERS * EACH);
}

#[tokio::test(start_paused = true)]
async fn close_session_releases_through_the_queue_most_urgent_first() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .paused(true)
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let session = NewSession::new(SessionId::new(5), RouterId::new(1), 1.into())
        .token(b"secret".to_vec())
        .into_session();
    session.record_in(1000);
    for (name, class) in [
        ("cache", ResourceClass::Low),
        ("port", ResourceClass::Critical),
        ("buffer", ResourceClass::Normal),
        ("route", ResourceClass::Normal),
    ] {
        let order = Arc::clone(&order);
        session
            .attach(Classed::new(class, move |reason: CloseReason| {
                assert_eq!(reason, CloseReason::LivenessTimeout);
                order.lock().push(name);
            }))
            .unwrap();
    }
    let waiter = tokio::spawn(session.closed_owned());
    let outcome = queue
        .close_session(&session, CloseReason::LivenessTimeout)
        .await;
    assert_eq!(outcome, CloseOutcome::Closed);
    assert!(session.is_closed());
    assert!(session.with_token(|t| t.is_none()), "token wiped at once");
    // One task per class present.
    assert_eq!(queue.stats().depth, 3);
    tokio::task::yield_now().await;
    assert!(
        !waiter.is_finished(),
        "the close completes once the queue released everything"
    );
    assert!(matches!(
        queue.close_session(&session, CloseReason::Forced).await,
        CloseOutcome::AlreadyClosed {
            reason: CloseReason::LivenessTimeout
        }
    ));
    queue.resume();
    assert_eq!(
        within(HOUR, waiter).await.unwrap(),
        CloseReason::LivenessTimeout
    );
    // Classes most urgent first; within a class, last attached first.
    assert_eq!(*order.lock(), ["port", "route", "buffer", "cache"]);
}

#[tokio::test(start_paused = true)]
async fn releases_never_get_lost_when_the_queue_is_gone() {
    let released = Arc::new(AtomicU32::new(0));
    let attach = |session: &session_lifecycle::Session| {
        let released = Arc::clone(&released);
        session
            .attach(move |_: CloseReason| {
                released.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
    };
    // Builds a session with the counting resource and closes it through
    // `queue`.
    let closed_through = |queue: ReclaimQueue, id: u64| {
        let session =
            NewSession::new(SessionId::new(id), RouterId::new(1), 1.into()).into_session();
        attach(&session);
        async move {
            assert!(
                queue
                    .close_session(&session, CloseReason::Forced)
                    .await
                    .won()
            );
            (queue, session)
        }
    };

    // A shut-down queue: the release runs in the caller.
    let queue = ReclaimQueue::builder().build().unwrap();
    let _ = queue.shutdown(Duration::from_secs(1)).await;
    let (_queue, session) = closed_through(queue, 1).await;
    assert_eq!(released.load(Ordering::SeqCst), 1);
    within(HOUR, session.closed()).await;

    // Tasks handed back by a shutdown release when dropped.
    let queue = ReclaimQueue::builder().paused(true).build().unwrap();
    let (queue, session) = closed_through(queue, 2).await;
    // No time to drain: the task is handed back (or interrupted).
    let report = queue.shutdown(Duration::ZERO).await;
    let left = report.left.len() + report.interrupted.len();
    drop(report);
    assert_eq!(left, 1);
    assert_eq!(released.load(Ordering::SeqCst), 2);
    within(HOUR, session.closed()).await;

    // Dropping every handle drains the queue.
    let queue = ReclaimQueue::builder().paused(true).build().unwrap();
    let (queue, session) = closed_through(queue, 3).await;
    drop(queue);
    within(HOUR, session.closed()).await;
    assert_eq!(released.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn the_deleter_releases_forced_sessions_through_the_queue_critical_first() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    for id in 0..50u64 {
        let session = store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
        session.record_out(id * 100);
        for class in [ResourceClass::Low, ResourceClass::Critical] {
            let order = Arc::clone(&order);
            session
                .attach(Classed::new(class, move |reason: CloseReason| {
                    assert_eq!(reason, CloseReason::Forced);
                    order.lock().push((class, id));
                }))
                .unwrap();
        }
        if id == 7 {
            session
                .attach(Classed::new(ResourceClass::High, |_: CloseReason| {
                    panic!("driver bug")
                }))
                .unwrap();
        }
    }
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(256)
        .events(bus)
        .build()
        .unwrap();
    // The only worker is busy for 9 s, long after the sessions are forced
    // (at 1.1 s): the deletion must wait for the queue, not return with its
    // releases queued.
    queue
        .push(ReclaimTask::new(SessionId::new(999), router, || async {
            tokio::time::sleep(Duration::from_secs(9)).await;
            Ok::<(), ReclaimError>(())
        }))
        .await
        .unwrap();
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
    let started = Instant::now();
    let deleter = RouterDeleter::builder()
        .notify_timeout(Duration::from_millis(100))
        .confirm_timeout(Duration::from_secs(1))
        .retries(0)
        .reclaim_queue(queue.clone())
        .build(Arc::clone(&store), notifier)
        .expect("valid settings");
    let report = within(HOUR, deleter.delete(router)).await.unwrap();
    let report = report.report().unwrap();
    assert_eq!((report.sessions, report.forced), (50, 50));

    // I1: by the time delete returns, everything was released once.
    assert!(started.elapsed() >= Duration::from_secs(9));
    assert!(store.is_empty());
    let order = order.lock().clone();
    assert_eq!(order.len(), 100);
    let first_low = order
        .iter()
        .position(|(class, _)| *class == ResourceClass::Low)
        .unwrap();
    assert_eq!(
        first_low, 50,
        "every critical resource before any low one: {order:?}"
    );
    let stats = queue.stats();
    assert_eq!(
        (stats.pushed, stats.failed, stats.depth, stats.in_flight),
        (102, 1, 0, 0)
    );
    // The panicking resource is reported; the others of its session ran.
    let failures: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|event| match event {
            ReclaimEvent::ReclaimFailed { task, error, .. } => Some((task, error.kind())),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0.session, SessionId::new(7));
    assert_eq!(failures[0].0.class, ResourceClass::High);
    assert_eq!(failures[0].0.traffic, 700);
    assert_eq!(failures[0].1, ReclaimErrorKind::Panicked);
}

#[test]
fn building_needs_a_runtime_a_capacity_and_a_worker() {
    assert_eq!(
        ReclaimQueue::builder().build().unwrap_err(),
        BuildError::NoRuntime {
            piece: "ReclaimQueue"
        }
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let refused = |builder: session_lifecycle::reclaim::ReclaimQueueBuilder| {
            builder.build().unwrap_err().refused_setting()
        };
        assert_eq!(
            refused(ReclaimQueue::builder().capacity(0)),
            Some("capacity")
        );
        assert_eq!(refused(ReclaimQueue::builder().workers(0)), Some("workers"));
        assert_eq!(
            refused(ReclaimQueue::builder().capacity(usize::MAX)),
            Some("capacity")
        );
        assert!(ReclaimQueue::builder().capacity(1 << 40).build().is_ok());
    });
}

/// Issue #21.4: a task's `TaskInfo` carries the session's age, for the
/// policy to use: set by `for_session`, by `close_session`'s release
/// tasks, and by hand; zero when not given.
#[tokio::test(start_paused = true)]
async fn a_policy_sees_the_sessions_age() {
    struct OldestFirst(Arc<Mutex<Vec<Duration>>>);
    impl ReclaimPolicy for OldestFirst {
        fn priority(&self, task: &TaskInfo) -> Priority {
            self.0.lock().push(task.age);
            Priority::due_in(Duration::from_secs(3_600).saturating_sub(task.age))
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let queue = ReclaimQueue::builder()
        .policy(OldestFirst(Arc::clone(&seen)))
        .build()
        .unwrap();
    let session = NewSession::new(SessionId::new(1), RouterId::new(1), 1.into()).into_session();
    session.attach(|_: CloseReason| {}).unwrap();
    tokio::time::advance(Duration::from_secs(90)).await;

    let task = ReclaimTask::for_session(&session, || async { Ok::<(), ReclaimError>(()) });
    assert_eq!(task.info().age, Duration::from_secs(90));
    queue.push(task).await.unwrap();
    let by_hand = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
        Ok::<(), ReclaimError>(())
    });
    assert_eq!(by_hand.info().age, Duration::ZERO);
    queue
        .push(by_hand.age(Duration::from_secs(5)))
        .await
        .unwrap();
    let _ = queue.close_session(&session, CloseReason::Forced).await;
    settle(&queue).await;
    assert_eq!(
        *seen.lock(),
        [
            Duration::from_secs(90),
            Duration::from_secs(5),
            Duration::from_secs(90)
        ]
    );
}
