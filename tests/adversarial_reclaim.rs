//! Adversarial use of the reclaim queue and of the shutdown paths: releases
//! that fail, time out, panic, hang or re-enter the queue; shutdowns raced,
//! doubled, cut short, dropped or called from inside a task; every task
//! counted by hand against `stats()`, the events and the `ShutdownReport`
//! (paused time).
#![cfg(feature = "test-util")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use parking_lot::Mutex;
use session_lifecycle::events::Subscription;
use session_lifecycle::reclaim::{
    DefaultPolicy, PushError, ReclaimError, ReclaimErrorKind, ReclaimEvent, ReclaimTask,
    RetrySchedule, ShutdownReport, TryPushError,
};
use session_lifecycle::session::Classed;
use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, ScriptedNotifier, paused_runtime, within,
};
use session_lifecycle::{
    Backoff, CloseReason, Event, EventBus, Lifecycle, MemoryStore, NewSession, ReclaimQueue,
    ResourceClass, RouterDeleter, RouterId, Session, SessionId,
};
use tokio::time::{Duration, Instant};

/// Retries after 10 ms, 20 ms, … (no jitter), `retries` times; each attempt
/// may take a second.
fn quick_retries(retries: u32) -> DefaultPolicy {
    DefaultPolicy::default().retry_schedule(
        RetrySchedule::new(
            Backoff::new()
                .retries(retries)
                .delays(Duration::from_millis(10), Duration::from_secs(1))
                .jitter(false),
        )
        .attempt_timeout(Duration::from_secs(1)),
    )
}

/// No retry, and attempts that may take all day.
fn patient() -> DefaultPolicy {
    DefaultPolicy::default()
        .retry_schedule(RetrySchedule::none().attempt_timeout(Duration::from_secs(24 * 3600)))
}

fn bus() -> (EventBus, Subscription) {
    let bus = EventBus::new(1 << 16);
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

/// The sessions of the `ReclaimFailed` events among `events`, by kind.
fn failures(events: &[ReclaimEvent]) -> Vec<(u64, ReclaimErrorKind)> {
    events
        .iter()
        .filter_map(|event| match event {
            ReclaimEvent::ReclaimFailed { task, error, .. } => {
                Some((task.session.get(), error.kind()))
            }
            _ => None,
        })
        .collect()
}

/// A task that never finishes an attempt (its backend never answers).
fn hangs(id: u64) -> ReclaimTask {
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), || {
        std::future::pending::<Result<(), ReclaimError>>()
    })
}

/// A task that succeeds at once, counted in `ran` under its id.
fn counted(id: u64, ran: &Arc<Mutex<BTreeMap<u64, u32>>>) -> ReclaimTask {
    let ran = Arc::clone(ran);
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        *ran.lock().entry(id).or_default() += 1;
        async { Ok::<(), ReclaimError>(()) }
    })
}

/// The session ids of a report's tasks: left, interrupted, dead letters.
fn report_ids(report: &ShutdownReport) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    (
        report.left.iter().map(|t| t.info().session.get()).collect(),
        report.interrupted.iter().map(|t| t.session.get()).collect(),
        report
            .dead_letters
            .iter()
            .map(|t| t.info().session.get())
            .collect(),
    )
}

/// How a task of the mixed workload behaves, by `id % 7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Succeeds at its first poll.
    Instant,
    /// Succeeds after 30 ms.
    Slow,
    /// Fails transiently twice, then succeeds.
    Flaky,
    /// Fails permanently.
    Permanent,
    /// `reclaim` itself panics.
    PanicsAtStart,
    /// Its future panics after 5 ms.
    PanicsLater,
    /// Never answers: every attempt times out.
    Hangs,
}

fn kind(id: u64) -> Kind {
    [
        Kind::Instant,
        Kind::Slow,
        Kind::Flaky,
        Kind::Permanent,
        Kind::PanicsAtStart,
        Kind::PanicsLater,
        Kind::Hangs,
    ][(id % 7) as usize]
}

/// A task of the mixed workload; `succeeded` counts successful attempts by
/// id.
fn mixed(id: u64, succeeded: &Arc<Mutex<BTreeMap<u64, u32>>>) -> ReclaimTask {
    let succeeded = Arc::clone(succeeded);
    let mut attempts = 0u32;
    let class = ResourceClass::ALL[(id % 4) as usize];
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        attempts += 1;
        let attempt = attempts;
        let succeeded = Arc::clone(&succeeded);
        let kind = kind(id);
        if kind == Kind::PanicsAtStart {
            panic!("release {id} panicked before returning its future");
        }
        async move {
            let outcome = match kind {
                Kind::Instant => Ok(()),
                Kind::Slow => {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok(())
                }
                Kind::Flaky if attempt <= 2 => Err(ReclaimError::transient("busy")),
                Kind::Flaky => Ok(()),
                Kind::Permanent => Err(ReclaimError::permanent("no such port")),
                Kind::PanicsAtStart => unreachable!(),
                Kind::PanicsLater => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    panic!("release {id} panicked while running");
                }
                Kind::Hangs => std::future::pending().await,
            };
            if outcome.is_ok() {
                *succeeded.lock().entry(id).or_default() += 1;
            }
            outcome
        }
    })
    .class(class)
    .traffic(id * 1_000)
}

/// Pushes `count` tasks of the mixed workload from 4 producers into
/// `queue`, then shuts it down with `deadline` at `cut` (or once idle),
/// and checks that every task ended exactly once: succeeded, dead letter,
/// handed back unstarted, interrupted, or refused to its pusher.
async fn mixed_workload_is_accounted(count: u64, cut: Option<Duration>, deadline: Duration) {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(3)
        .capacity(4)
        .policy(
            DefaultPolicy::default()
                .class_spacing(Duration::from_millis(5))
                .retry_schedule(
                    RetrySchedule::new(
                        Backoff::new()
                            .retries(2)
                            .delays(Duration::from_millis(10), Duration::from_secs(1))
                            .jitter(false),
                    )
                    .attempt_timeout(Duration::from_millis(200)),
                ),
        )
        .events(bus)
        .build()
        .unwrap();
    let succeeded: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let refused: Arc<Mutex<Vec<u64>>> = Arc::default();
    let producers: Vec<_> = (0..4u64)
        .map(|p| {
            let (queue, succeeded, refused) =
                (queue.clone(), Arc::clone(&succeeded), Arc::clone(&refused));
            tokio::spawn(async move {
                for id in (p..count).step_by(4) {
                    if let Err(PushError(task)) = queue.push(mixed(id, &succeeded)).await {
                        refused.lock().push(task.info().session.get());
                    }
                }
            })
        })
        .collect();
    match cut {
        Some(cut) => tokio::time::sleep(cut).await,
        None => {
            for producer in producers {
                within(HOUR, producer).await.unwrap();
            }
            within(HOUR, queue.idle()).await;
        }
    }
    let report = within(HOUR, queue.shutdown(deadline)).await;
    // Producers still waiting for room get their tasks back.
    within(HOUR, async {
        while refused.lock().len() + queue.stats().pushed as usize != count as usize {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let (left, interrupted, dead) = report_ids(&report);
    let succeeded = succeeded.lock().clone();
    let refused = refused.lock().clone();
    let mut seen: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (id, runs) in &succeeded {
        assert_eq!(*runs, 1, "task {id} succeeded {runs} times");
        seen.entry(*id).or_default().push("succeeded");
    }
    for (ids, place) in [
        (&left, "left"),
        (&interrupted, "interrupted"),
        (&dead, "dead letter"),
        (&refused, "refused"),
    ] {
        for id in ids {
            seen.entry(*id).or_default().push(place);
        }
    }
    for id in 0..count {
        let places = seen.get(&id).cloned().unwrap_or_default();
        assert_eq!(
            places.len(),
            1,
            "task {id} ({:?}) ended in {places:?}",
            kind(id)
        );
    }
    // Failures (dead letters and interruptions) each have one event.
    let events = drain(&mut events);
    let failed = failures(&events);
    let mut failed_ids: Vec<u64> = failed.iter().map(|(id, _)| *id).collect();
    failed_ids.sort_unstable();
    let mut expected: Vec<u64> = dead.iter().chain(&interrupted).copied().collect();
    expected.sort_unstable();
    assert_eq!(failed_ids, expected, "one ReclaimFailed per failed task");
    for (id, kind) in &failed {
        if interrupted.contains(id) {
            assert_eq!(*kind, ReclaimErrorKind::Interrupted);
        }
    }
    let retried = events
        .iter()
        .filter(|event| matches!(event, ReclaimEvent::ReclaimRetried { .. }))
        .count() as u64;
    let stats = queue.stats();
    if cut.is_some() {
        // The cut did cut: work was handed back or interrupted.
        assert!(!report.drained);
        assert!(!(left.is_empty() && interrupted.is_empty() && refused.is_empty()));
    }
    assert_eq!(stats.pushed, count - refused.len() as u64);
    assert_eq!(stats.completed, succeeded.len() as u64);
    assert_eq!(stats.failed, failed.len() as u64);
    assert_eq!(stats.retried, retried);
    assert_eq!(stats.dead_lettered, dead.len() as u64);
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
    assert_eq!(
        (stats.depth, stats.in_flight, stats.dead_letters),
        (0, 0, 0)
    );
    assert!(stats.peak_depth <= 4);
}

/// A mixed workload (instant, slow, flaky, permanent, panicking before and
/// after the first poll, hanging) pushed by racing producers into a small
/// queue and drained: each task ends exactly once, and the counters,
/// events and report agree with a count made by hand.
#[tokio::test(start_paused = true)]
async fn a_mixed_workload_drained_ends_each_task_exactly_once() {
    mixed_workload_is_accounted(70, None, HOUR).await;
}

/// The same workload cut short: shutdown with a tiny deadline while pushes
/// wait for room, attempts run and failed tasks sleep their backoff.
#[tokio::test(start_paused = true)]
async fn a_mixed_workload_cut_by_a_tiny_deadline_ends_each_task_exactly_once() {
    mixed_workload_is_accounted(
        70,
        Some(Duration::from_millis(95)),
        Duration::from_millis(7),
    )
    .await;
}

/// The same workload cut by a zero deadline, right at the start.
#[tokio::test(start_paused = true)]
async fn a_mixed_workload_cut_by_a_zero_deadline_ends_each_task_exactly_once() {
    mixed_workload_is_accounted(70, Some(Duration::from_millis(1)), Duration::ZERO).await;
}

/// The caller bounds `shutdown` by the deadline it gives it
/// (`timeout(d, queue.shutdown(d))`): the future is dropped just after the
/// queue's own deadline stopped the workers and took the waiting tasks.
/// Documented: dropping the future leaves the queue draining; I5: nothing
/// silently discarded. The tasks that waited must run, or be reported.
#[tokio::test(start_paused = true)]
async fn a_shutdown_future_dropped_at_its_deadline_loses_no_waiting_task() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .policy(patient())
        .events(bus)
        .build()
        .unwrap();
    queue.push(hangs(1)).await.unwrap();
    tokio::task::yield_now().await;
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    for id in 2..=4 {
        queue.push(counted(id, &ran)).await.unwrap();
    }

    let deadline = Duration::from_secs(1);
    let first = tokio::time::timeout(deadline, queue.shutdown(deadline)).await;
    let mut reported: BTreeSet<u64> = BTreeSet::new();
    if let Ok(report) = &first {
        let (left, interrupted, dead) = report_ids(report);
        reported.extend(left.into_iter().chain(interrupted).chain(dead));
    }
    // Whatever is still running goes on; a second call reports the rest.
    let second = within(HOUR, queue.shutdown(HOUR)).await;
    let (left, interrupted, dead) = report_ids(&second);
    reported.extend(left.into_iter().chain(interrupted).chain(dead));
    reported.extend(failures(&drain(&mut events)).into_iter().map(|(id, _)| id));

    let ran = ran.lock().clone();
    let stats = queue.stats();
    for id in 1..=4 {
        assert!(
            ran.contains_key(&id) || reported.contains(&id),
            "task {id} neither ran nor was reported (ran {ran:?}, reported {reported:?}, \
             first shutdown dropped: {}, stats {stats:?})",
            first.is_err()
        );
    }
}

/// A release task calls `shutdown` on its own queue: the shutdown's deadline
/// passes (its own worker cannot finish), it stops the workers, and aborts
/// the very worker running it. The tasks that waited must still run or be
/// reported (I5).
#[tokio::test(start_paused = true)]
async fn a_shutdown_called_from_inside_a_task_loses_no_waiting_task() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .policy(patient())
        .events(bus)
        .build()
        .unwrap();
    let inner: Arc<Mutex<Option<ShutdownReport>>> = Arc::default();
    let suicidal = {
        let (queue, inner) = (queue.clone(), Arc::clone(&inner));
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            let (queue, inner) = (queue.clone(), Arc::clone(&inner));
            async move {
                // Lets the other tasks be queued first.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let report = queue.shutdown(Duration::from_millis(100)).await;
                *inner.lock() = Some(report);
                Ok::<(), ReclaimError>(())
            }
        })
    };
    queue.push(suicidal).await.unwrap();
    tokio::task::yield_now().await;
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    for id in 2..=4 {
        queue.push(counted(id, &ran)).await.unwrap();
    }

    // Wait for the queue to be closed and nothing to run any more.
    within(HOUR, async {
        while !(queue.stats().closed && queue.stats().in_flight == 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut reported: BTreeSet<u64> = BTreeSet::new();
    if let Some(report) = inner.lock().take() {
        let (left, interrupted, dead) = report_ids(&report);
        reported.extend(left.into_iter().chain(interrupted).chain(dead));
    }
    let outer = within(HOUR, queue.shutdown(HOUR)).await;
    let (left, interrupted, dead) = report_ids(&outer);
    reported.extend(left.into_iter().chain(interrupted).chain(dead));
    reported.extend(failures(&drain(&mut events)).into_iter().map(|(id, _)| id));
    let ran = ran.lock().clone();
    for id in 2..=4 {
        assert!(
            ran.contains_key(&id) || reported.contains(&id),
            "task {id} neither ran nor was reported (ran {ran:?}, reported {reported:?}, \
             stats {:?})",
            queue.stats()
        );
    }
}

/// An `idle()` call waits while tasks wait; a zero-deadline shutdown takes
/// them all back before any worker ran: no task waits or runs any more, so
/// the waiter must wake (no lost wake-up).
#[tokio::test(start_paused = true)]
async fn an_idle_waiter_wakes_when_a_shutdown_takes_the_waiting_tasks_back() {
    let queue = ReclaimQueue::builder().workers(1).build().unwrap();
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    for id in 1..=3 {
        queue.push(counted(id, &ran)).await.unwrap();
    }
    let mut idle = Box::pin(queue.idle());
    assert!(futures::poll!(idle.as_mut()).is_pending());

    let report = queue.shutdown(Duration::ZERO).await;
    let (left, interrupted, _) = report_ids(&report);
    assert_eq!(left.len() + ran.lock().len(), 3, "{left:?} {interrupted:?}");
    let stats = queue.stats();
    assert_eq!((stats.depth, stats.in_flight), (0, 0));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), idle)
            .await
            .is_ok(),
        "idle() never woke though nothing waits or runs (left {left:?})"
    );
}

/// Two shutdowns at once, one with a zero deadline and one patient, while
/// tasks hang, fail, wait for room and sleep their backoff: between them
/// the two reports account for every task exactly once.
#[tokio::test(start_paused = true)]
async fn two_concurrent_shutdowns_account_for_each_task_once_between_them() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(2)
        .capacity(3)
        .policy(quick_retries(5))
        .events(bus)
        .build()
        .unwrap();
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    queue.push(hangs(1)).await.unwrap();
    let failing = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
        Err::<(), _>(ReclaimError::transient("down"))
    });
    queue.push(failing).await.unwrap();
    tokio::task::yield_now().await;
    for id in 3..=5 {
        queue.push(counted(id, &ran)).await.unwrap();
    }
    // A pusher waiting for room.
    let waiting = {
        let (queue, ran) = (queue.clone(), Arc::clone(&ran));
        tokio::spawn(async move { queue.push(counted(6, &ran)).await.err() })
    };
    tokio::task::yield_now().await;

    let (a, b) = tokio::join!(queue.shutdown(Duration::ZERO), queue.shutdown(HOUR));
    let refused = within(HOUR, waiting).await.unwrap();
    let mut places: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (name, report) in [("zero", &a), ("patient", &b)] {
        let (left, interrupted, dead) = report_ids(report);
        for (ids, what) in [(left, "left"), (interrupted, "interrupted"), (dead, "dead")] {
            for id in ids {
                places.entry(id).or_default().push(format!("{name}:{what}"));
            }
        }
    }
    for (id, runs) in ran.lock().iter() {
        assert_eq!(*runs, 1);
        places.entry(*id).or_default().push("ran".into());
    }
    if let Some(PushError(task)) = refused {
        places
            .entry(task.info().session.get())
            .or_default()
            .push("refused".into());
    }
    for id in 1..=6 {
        let at = places.get(&id).cloned().unwrap_or_default();
        assert_eq!(at.len(), 1, "task {id} ended in {at:?}");
    }
    let stats = queue.stats();
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
    let failed = failures(&drain(&mut events));
    assert_eq!(stats.failed, failed.len() as u64);
    assert_eq!(
        (a.drained, b.drained),
        (false, false),
        "a report says drained though the other call stopped the workers with \
         work in hand: zero {a:?}, patient {b:?}"
    );
}

/// Releases queued by `close_session` into a full, slow queue: the closers
/// wait for room (never drop), each resource is released exactly once —
/// including resources that panic, close another session, or push into
/// the same queue from inside their release — and every close completes.
#[tokio::test(start_paused = true)]
async fn session_releases_into_a_full_slow_queue_wait_and_run_once() {
    let (bus, mut events) = bus();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(2)
        .events(bus)
        .build()
        .unwrap();
    let released: Arc<Vec<AtomicU32>> = Arc::new((0..64).map(|_| AtomicU32::new(0)).collect());
    let children = Arc::new(AtomicU32::new(0));
    let sessions: Vec<Session> = (0..30u64)
        .map(|id| NewSession::new(SessionId::new(id), RouterId::new(1), 1.into()).into_session())
        .collect();
    // Sessions 30.. are closed from inside other sessions' releases.
    let victims: Vec<Session> = (30..40u64)
        .map(|id| {
            let session =
                NewSession::new(SessionId::new(id), RouterId::new(1), 1.into()).into_session();
            let released = Arc::clone(&released);
            session
                .attach(move |_: CloseReason| {
                    released[id as usize].fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            session
        })
        .collect();
    for (i, session) in sessions.iter().enumerate() {
        let id = session.id().get();
        let counter = Arc::clone(&released);
        session
            .attach(Classed::new(ResourceClass::Low, move |_: CloseReason| {
                counter[id as usize].fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
        match i % 3 {
            0 => session
                .attach(Classed::new(ResourceClass::Critical, |_: CloseReason| {
                    panic!("kernel state already gone")
                }))
                .unwrap(),
            1 => {
                let victim = victims[i / 3].clone();
                session
                    .attach(Classed::new(ResourceClass::High, move |_: CloseReason| {
                        let _ = victim.close(CloseReason::Forced);
                    }))
                    .unwrap();
            }
            _ => {
                let (queue, children) = (queue.clone(), Arc::clone(&children));
                session
                    .attach(move |_: CloseReason| {
                        let counted = Arc::clone(&children);
                        let child = ReclaimTask::new(
                            SessionId::new(1_000 + id),
                            RouterId::new(1),
                            move || {
                                counted.fetch_add(1, Ordering::SeqCst);
                                async { Ok::<(), ReclaimError>(()) }
                            },
                        );
                        // Full or not, the child is run: here if refused.
                        if let Err(
                            TryPushError::Full(mut task) | TryPushError::ShutDown(mut task),
                        ) = queue.try_push(child)
                        {
                            futures::executor::block_on(task.run_once()).unwrap();
                        }
                    })
                    .unwrap();
            }
        }
    }
    // Slow user work keeps the only worker busy.
    for id in 100..104 {
        let slow = ReclaimTask::new(SessionId::new(id), RouterId::new(2), || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<(), ReclaimError>(())
        });
        queue.push(slow).await.unwrap();
    }
    let closers: Vec<_> = sessions
        .iter()
        .map(|session| {
            let (queue, session) = (queue.clone(), session.clone());
            tokio::spawn(async move { queue.close_session(&session, CloseReason::Forced).await })
        })
        .collect();
    for closer in closers {
        assert!(within(HOUR, closer).await.unwrap().won());
    }
    for session in sessions.iter().chain(&victims) {
        within(HOUR, session.closed()).await;
    }
    within(HOUR, queue.idle()).await;
    for id in 0..40 {
        assert_eq!(released[id].load(Ordering::SeqCst), 1, "session {id}");
    }
    assert_eq!(children.load(Ordering::SeqCst), 10);
    let stats = queue.stats();
    assert!(stats.peak_depth <= 2, "{stats:?}");
    let panicked = failures(&drain(&mut events))
        .into_iter()
        .filter(|(_, kind)| *kind == ReclaimErrorKind::Panicked)
        .count();
    assert_eq!(
        panicked, 10,
        "one failure event per panicking release group"
    );
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
    let report = queue.shutdown(HOUR).await;
    assert!(report.drained && report.left.is_empty() && report.dead_letters.is_empty());
}

/// A task that pushes children into its own full queue (waiting for room)
/// and closes a session through the queue from inside its attempt: with a
/// second worker draining, nothing deadlocks and every child and release
/// runs exactly once.
#[tokio::test(start_paused = true)]
async fn a_task_re_entering_its_full_queue_waits_and_everything_runs_once() {
    let queue = ReclaimQueue::builder()
        .workers(2)
        .capacity(1)
        .policy(patient())
        .build()
        .unwrap();
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let released = Arc::new(AtomicUsize::new(0));
    let session = NewSession::new(SessionId::new(500), RouterId::new(1), 1.into()).into_session();
    for class in ResourceClass::ALL {
        let released = Arc::clone(&released);
        session
            .attach(Classed::new(class, move |_: CloseReason| {
                released.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
    }
    let parent = {
        let (queue, ran, session) = (queue.clone(), Arc::clone(&ran), session.clone());
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            let (queue, ran, session) = (queue.clone(), Arc::clone(&ran), session.clone());
            async move {
                for id in 10..30 {
                    queue
                        .push(counted(id, &ran))
                        .await
                        .map_err(|_| ReclaimError::permanent("queue shut"))?;
                }
                let _ = queue.close_session(&session, CloseReason::Reclaimed).await;
                Ok(())
            }
        })
    };
    queue.push(parent).await.unwrap();
    within(Duration::from_secs(60), session.closed()).await;
    within(Duration::from_secs(60), queue.idle()).await;
    let ran = ran.lock().clone();
    assert_eq!(ran.len(), 20, "{ran:?}");
    assert!(ran.values().all(|&runs| runs == 1));
    assert_eq!(released.load(Ordering::SeqCst), 4);
    let stats = queue.stats();
    assert_eq!(stats.completed, 1 + 20 + 4);
    assert_eq!((stats.failed, stats.outstanding.total()), (0, 0));
}

/// Retries follow the documented schedule: a backoff capped by
/// `max_duration` ends before the delay that would pass the cap, and the
/// task ends within `RetrySchedule::longest_total` of its first attempt,
/// timeouts and transient errors alike.
#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_backoffs_total_cap_within_the_longest_total() {
    let (bus, mut events) = bus();
    let schedule = RetrySchedule::new(
        Backoff::new()
            .retries(10)
            .delays(Duration::from_secs(1), Duration::from_secs(1))
            .factor(1.0)
            .jitter(false)
            .max_duration(Duration::from_millis(3_500)),
    )
    .attempt_timeout(Duration::from_millis(300));
    let queue = ReclaimQueue::builder()
        .policy(DefaultPolicy::default().retry_schedule(schedule))
        .events(bus)
        .build()
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let task = {
        let attempts = Arc::clone(&attempts);
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n.is_multiple_of(2) {
                    std::future::pending::<()>().await;
                }
                Err::<(), _>(ReclaimError::transient("refused"))
            }
        })
    };
    let started = Instant::now();
    queue.push(task).await.unwrap();
    within(HOUR, queue.idle()).await;
    assert!(started.elapsed() <= schedule.longest_total());
    // 1 s + 1 s + 1 s fit under 3.5 s; a fourth delay would pass it.
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    let events = drain(&mut events);
    let delays: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            ReclaimEvent::ReclaimRetried { delay, error, .. } => Some((*delay, error.kind())),
            _ => None,
        })
        .collect();
    assert_eq!(
        delays,
        [
            (Duration::from_secs(1), ReclaimErrorKind::TimedOut),
            (Duration::from_secs(1), ReclaimErrorKind::Transient),
            (Duration::from_secs(1), ReclaimErrorKind::TimedOut),
        ]
    );
    match events.last() {
        Some(ReclaimEvent::ReclaimFailed {
            attempts, error, ..
        }) => assert_eq!((*attempts, error.kind()), (4, ReclaimErrorKind::Transient)),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(queue.dead_letters().len(), 1);
}

/// `Lifecycle::shutdown` with a tiny deadline while a deletion's force
/// phase waits for room in a full queue whose only worker is stuck: the
/// deletion is reported still running, the queue's work is handed back or
/// reported interrupted, and every forced session's resource is released
/// exactly once (in the deleter, the queue being shut) — I1 and I5.
#[tokio::test(start_paused = true)]
async fn a_lifecycle_shutdown_cutting_a_deletion_blocked_on_a_full_queue_loses_nothing() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Error);
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .reclaim(
            ReclaimQueue::builder()
                .workers(1)
                .capacity(1)
                .policy(patient()),
        )
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .build()
        .unwrap();
    let mut events = lifecycle.subscribe();
    let queue = lifecycle.reclaim().clone();
    queue.push(hangs(900)).await.unwrap();
    tokio::task::yield_now().await;
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    queue.push(counted(901, &ran)).await.unwrap();
    let router = ObservedRouter::fill(&*store, RouterId::new(1), 0, 8).await;
    let deletion = tokio::spawn(lifecycle.deleter().delete(router.router));
    while lifecycle.deleter().running() == 0 {
        tokio::task::yield_now().await;
    }

    let shutdown = within(HOUR, lifecycle.shutdown(Duration::from_millis(1_500))).await;
    let (left, interrupted, _) = report_ids(&shutdown.reclaim);
    assert_eq!(interrupted, [900]);
    assert_eq!(left, [901]);
    assert!(!shutdown.is_complete());
    let outcome = within(HOUR, deletion).await.unwrap().unwrap();
    assert_eq!(outcome.report().map(|report| report.forced), Some(8));
    router.assert_deleted(&*store).await;
    let mut failed = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(ReclaimEvent::ReclaimFailed { task, error, .. }) = event {
            failed.push((task.session.get(), error.kind()));
        }
    }
    assert_eq!(failed, [(900, ReclaimErrorKind::Interrupted)]);
    assert!(ran.lock().is_empty());
}

/// The tokio runtime is dropped mid-work: a release hangs in the only
/// worker, session releases and user tasks wait. Each resource is still
/// released exactly once (when the last queue handle drops), every close
/// completes, and the hanging task is reported failed by an event.
#[test]
fn dropping_the_runtime_mid_work_releases_each_resource_once() {
    let runtime = paused_runtime();
    let (bus, mut events) = bus();
    let released = Arc::new(AtomicU32::new(0));
    let (queue, sessions) = runtime.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .capacity(64)
            .policy(patient())
            .events(bus)
            .build()
            .unwrap();
        queue.push(hangs(1)).await.unwrap();
        tokio::task::yield_now().await;
        let mut sessions = Vec::new();
        for id in 10..20u64 {
            let session =
                NewSession::new(SessionId::new(id), RouterId::new(1), 1.into()).into_session();
            for class in [ResourceClass::Critical, ResourceClass::Low] {
                let released = Arc::clone(&released);
                session
                    .attach(Classed::new(class, move |_: CloseReason| {
                        released.fetch_add(1, Ordering::SeqCst);
                    }))
                    .unwrap();
            }
            assert!(
                queue
                    .close_session(&session, CloseReason::Forced)
                    .await
                    .won()
            );
            sessions.push(session);
        }
        assert_eq!(queue.stats().depth, 20);
        (queue, sessions)
    });
    drop(runtime);
    assert_eq!(released.load(Ordering::SeqCst), 0, "still queued");
    drop(queue);
    assert_eq!(released.load(Ordering::SeqCst), 20);
    for session in &sessions {
        assert!(session.is_closed());
        let waited = futures::executor::block_on(futures::future::select(
            Box::pin(session.closed()),
            futures::future::ready(()),
        ));
        assert!(
            matches!(waited, futures::future::Either::Left(_)),
            "the close of {} never completed",
            session.id()
        );
    }
    assert_eq!(
        failures(&drain(&mut events)),
        [(1, ReclaimErrorKind::Interrupted)]
    );
}

/// `Lifecycle::shutdown` bounded by the caller with the deadline it gives
/// it: dropped just after the queue's deadline stopped the workers.
/// Documented: "If the queue's shutdown had begun, the queue keeps
/// draining without a deadline"; I5: nothing silently discarded.
#[tokio::test(start_paused = true)]
async fn a_lifecycle_shutdown_dropped_at_its_deadline_loses_no_queued_task() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .reclaim(ReclaimQueue::builder().workers(1).policy(patient()))
        .build()
        .unwrap();
    let mut events = lifecycle.subscribe();
    let queue = lifecycle.reclaim().clone();
    queue.push(hangs(1)).await.unwrap();
    tokio::task::yield_now().await;
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    for id in 2..=4 {
        queue.push(counted(id, &ran)).await.unwrap();
    }

    let deadline = Duration::from_secs(1);
    let first = tokio::time::timeout(deadline, lifecycle.shutdown(deadline)).await;
    let mut reported: BTreeSet<u64> = BTreeSet::new();
    if let Ok(report) = &first {
        let (left, interrupted, dead) = report_ids(&report.reclaim);
        reported.extend(left.into_iter().chain(interrupted).chain(dead));
    }
    let second = within(HOUR, lifecycle.shutdown(HOUR)).await;
    let (left, interrupted, dead) = report_ids(&second.reclaim);
    reported.extend(left.into_iter().chain(interrupted).chain(dead));
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(ReclaimEvent::ReclaimFailed { task, .. }) = event {
            reported.insert(task.session.get());
        }
    }
    let ran = ran.lock().clone();
    for id in 1..=4 {
        assert!(
            ran.contains_key(&id) || reported.contains(&id),
            "task {id} neither ran nor was reported (ran {ran:?}, reported {reported:?}, \
             first shutdown dropped: {}, stats {:?})",
            first.is_err(),
            queue.stats()
        );
    }
}
