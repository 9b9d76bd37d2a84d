//! The reclaim queue's blocked workers and lost runtimes, a second review
//! round of stop 34 (of the write-off of blocked workers and the workers'
//! revival). Each test failed before its fix.
//!
//! - A task written off by a shutdown (its worker blocked past the
//!   deadline) that then failed was reported a second time, retried, or
//!   buried after the shutdown took the dead letters.
//! - A task a worker was running (in its backoff) when the runtime went
//!   away was reported failed ("shutdown deadline passed", with no
//!   shutdown) and lost: it now waits again and runs on a revived worker.
//! - A worker blocked on a runtime that was shut down kept the others from
//!   being revived: workers are revived by number.
//! - Each push from a runtime without timers ran the panic hook (the time
//!   driver probe): the probe's answer is remembered.
//! - A user error whose `Display` panicked ended the worker.
//!
//! Real clock only where a thread is blocked for real; bounded hang
//! detectors (`HANG`), no waits for conditions.
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;

use session_lifecycle::Backoff;
use session_lifecycle::reclaim::{DefaultPolicy, ReclaimError, ReclaimTask, RetrySchedule};
use session_lifecycle::test_util::paused_runtime;
use session_lifecycle::{
    Event, EventBus, ReclaimErrorKind, ReclaimEvent, ReclaimQueue, RouterId, SessionId,
};
use tokio::time::Duration;

const HANG: Duration = Duration::from_secs(10);

fn failed_events(
    events: &mut session_lifecycle::Subscription,
) -> Vec<(SessionId, ReclaimErrorKind)> {
    let mut failed = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(ReclaimEvent::ReclaimFailed { task, error, .. }) = event {
            failed.push((task.session, error.kind()));
        }
    }
    failed
}

/// A task written off by a shutdown (its worker blocked past the deadline)
/// whose blocked attempt then returns a final error: the worker reports
/// and counts it failed a second time, and buries it as a dead letter in
/// the shut-down queue (after the shutdown took the dead letters).
#[test]
fn a_written_off_task_that_then_fails_is_not_failed_again() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let queue = {
        let _context = workers.enter();
        ReclaimQueue::builder()
            .workers(1)
            .policy(DefaultPolicy::default().retry_schedule(RetrySchedule::none()))
            .events(bus)
            .build()
            .unwrap()
    };
    let (unblock, blocked) = mpsc::channel::<()>();
    let blocked = Arc::new(std::sync::Mutex::new(blocked));
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
        let (blocked, entered) = (Arc::clone(&blocked), entered_tx.clone());
        async move {
            let _ = entered.send(());
            // A blocking call to a router that answers "no" late.
            let _ = blocked.lock().unwrap().recv();
            Err(ReclaimError::permanent("router refused"))
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        queue.push(task).await.unwrap();
        tokio::time::timeout(HANG, entered.recv())
            .await
            .unwrap()
            .unwrap();
        let report = tokio::time::timeout(HANG, queue.shutdown(Duration::from_millis(50))).await;
        (report, queue.stats().failed)
    });
    let _ = unblock.send(());
    let (report, failed_at_return) = report;
    let report = report.expect("shutdown never returned");
    assert_eq!(report.interrupted.len(), 1, "{report:?}");
    assert_eq!(failed_at_return, 1);
    // The worker thread ends its poll (the attempt's end) before this returns.
    workers.shutdown_timeout(HANG);

    let stats = queue.stats();
    let failed = failed_events(&mut events);
    assert_eq!(
        failed,
        vec![(SessionId::new(1), ReclaimErrorKind::Interrupted)],
        "one task, reported failed once; stats {stats:?}"
    );
    assert_eq!(stats.failed, 1, "{stats:?}");
    assert_eq!(
        (stats.dead_letters, stats.outstanding.total()),
        (0, 0),
        "a task counted out by the shutdown is a dead letter of the shut-down queue: {stats:?}"
    );
}

/// The same with a retryable error and retries left: a retry is counted
/// and published for a task the shutdown already reported failed.
#[test]
fn a_written_off_task_is_not_retried() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let policy = DefaultPolicy::default().retry_schedule(RetrySchedule::new(
        Backoff::new()
            .retries(3)
            .delays(Duration::from_millis(1), Duration::from_millis(1)),
    ));
    let queue = {
        let _context = workers.enter();
        ReclaimQueue::builder()
            .workers(1)
            .policy(policy)
            .events(bus)
            .build()
            .unwrap()
    };
    let (unblock, blocked) = mpsc::channel::<()>();
    let blocked = Arc::new(std::sync::Mutex::new(blocked));
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
        let (blocked, entered) = (Arc::clone(&blocked), entered_tx.clone());
        async move {
            let _ = entered.send(());
            let _ = blocked.lock().unwrap().recv();
            Err(ReclaimError::transient("router busy"))
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        queue.push(task).await.unwrap();
        tokio::time::timeout(HANG, entered.recv())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(HANG, queue.shutdown(Duration::from_millis(50))).await
    });
    let _ = unblock.send(());
    report.expect("shutdown never returned");
    workers.shutdown_timeout(HANG);

    let mut retried = 0;
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(ReclaimEvent::ReclaimRetried { .. }) = event {
            retried += 1;
        }
    }
    let stats = queue.stats();
    assert_eq!((retried, stats.retried), (0, 0), "{stats:?}");
}

/// The queue outlives its runtime (workers come back on the next push),
/// but a task a worker held when the runtime ended (here waiting out its
/// retry backoff) is reported failed as `Interrupted` by "the queue's
/// shutdown deadline" with no shutdown, never runs again although it can
/// (not re-queued, not a dead letter), and a later shutdown that drained
/// everything lists it as interrupted.
#[test]
fn a_task_in_backoff_when_the_runtime_ends_is_not_lost() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let attempts = Arc::new(AtomicU32::new(0));
    let policy = DefaultPolicy::default().retry_schedule(RetrySchedule::new(
        Backoff::new()
            .retries(3)
            .jitter(false)
            .delays(Duration::from_secs(1), Duration::from_secs(1)),
    ));
    let first = paused_runtime();
    let queue = first.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .policy(policy)
            .events(bus)
            .build()
            .unwrap();
        let counted = Arc::clone(&attempts);
        let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err(ReclaimError::transient("router busy"))
                } else {
                    Ok(())
                }
            }
        });
        queue.push(task).await.unwrap();
        // The worker is in its 1 s backoff once the retry is published.
        loop {
            match events.recv().await {
                Some(Event::Reclaim(ReclaimEvent::ReclaimRetried { .. })) => break,
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
        queue
    });
    drop(first);

    let second = paused_runtime();
    second.block_on(async {
        let quick = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
            Ok::<(), ReclaimError>(())
        });
        queue.push(quick).await.unwrap();
        tokio::time::timeout(Duration::from_secs(3600), queue.idle())
            .await
            .expect("idle");
        let failed = failed_events(&mut events);
        let stats = queue.stats();
        let letters = queue.dead_letters().len();
        let report = queue.shutdown(Duration::from_secs(1)).await;
        assert!(
            failed.is_empty()
                && stats.failed == 0
                && (attempts.load(Ordering::SeqCst) > 1 || letters == 1),
            "the open queue lost task 1 (attempts {}, dead letters {letters}): failed {failed:?}, {stats:?}",
            attempts.load(Ordering::SeqCst)
        );
        assert!(
            report.drained && report.interrupted.is_empty(),
            "{report:?}"
        );
    });
}

/// A subscriber that formats every field of every event (as a fmt layer
/// does), on the thread where it is the default.
struct Formatting;

impl tracing::Subscriber for Formatting {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fmt(String);
        impl tracing::field::Visit for Fmt {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0 += &format!("{field}={value:?} ");
            }
        }
        let mut line = Fmt(String::new());
        event.record(&mut line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The task's own error, whose `Display` panics (user code, like its
/// `Drop`, which the queue now contains).
#[derive(Debug)]
struct Rude;

impl std::fmt::Display for Rude {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("Rude::fmt")
    }
}

impl std::error::Error for Rude {}

/// A worker formats the user's error in `fail`'s `tracing::error!`
/// outside any catch: with a subscriber that formats fields, the panic
/// ends the worker, the task is neither counted out nor buried, `running`
/// stays at 1 and `idle()` never resolves.
#[test]
fn a_panicking_error_display_does_not_end_the_worker() {
    let _subscriber = tracing::subscriber::set_default(Formatting);
    let runtime = paused_runtime();
    runtime.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .policy(DefaultPolicy::default().retry_schedule(RetrySchedule::none()))
            .build()
            .unwrap();
        let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || async {
            Err(ReclaimError::permanent(Rude))
        });
        queue.push(task).await.unwrap();
        let idle = tokio::time::timeout(Duration::from_secs(3600), queue.idle()).await;
        let stats = queue.stats();
        assert!(idle.is_ok(), "idle() never resolved: {stats:?}");
        assert_eq!(
            (stats.in_flight, stats.failed, stats.dead_letters),
            (0, 1, 1),
            "{stats:?}"
        );
    });
}

/// `timed_runtime` probes the time driver by panicking (contained): the
/// process's panic hook runs at each probe. `revive` probes at every
/// insertion while the workers are gone, so each push made in the
/// context of a runtime without its time driver is a panic (a crash
/// report, or the process aborted under `panic = "abort"`).
#[test]
fn pushes_from_a_runtime_without_timers_do_not_panic() {
    use std::cell::Cell;
    thread_local!(static PANICS: Cell<usize> = const { Cell::new(0) });
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.with(|panics| panics.set(panics.get() + 1));
        previous(info);
    }));
    let first = paused_runtime();
    let queue = first.block_on(async { ReclaimQueue::builder().workers(1).build().unwrap() });
    drop(first);
    let untimed = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = PANICS.with(Cell::get);
    untimed.block_on(async {
        for id in 0..10 {
            let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
                Ok::<(), ReclaimError>(())
            });
            queue.try_push(task).unwrap();
        }
    });
    // The probe for the time driver runs once on this thread for this
    // runtime (its answer is remembered), not at every push.
    assert_eq!(
        PANICS.with(Cell::get) - before,
        1,
        "panics (hook runs) for 10 pushes"
    );
}

/// The workers' runtime is shut down (`shutdown_timeout`, as a
/// controller restarting its runtime does) while one worker is blocked in
/// a synchronous release: the other worker ended with the runtime, but the
/// blocked one still counts in `alive`, so no push on the new runtime
/// brings workers back and nothing runs while the call blocks (for ever,
/// for a router that never answers).
#[test]
fn a_worker_blocked_on_a_dead_runtime_does_not_stall_the_queue() {
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let queue = {
        let _context = workers.enter();
        ReclaimQueue::builder().workers(2).build().unwrap()
    };
    let (unblock, blocked) = mpsc::channel::<()>();
    let blocked = Arc::new(std::sync::Mutex::new(blocked));
    let (entered_tx, entered) = mpsc::channel::<()>();
    let blocking = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
        let (blocked, entered) = (Arc::clone(&blocked), entered_tx.clone());
        async move {
            let _ = entered.send(());
            let _ = blocked.lock().unwrap().recv();
            Ok(())
        }
    });
    queue.try_push(blocking).unwrap();
    entered
        .recv_timeout(HANG)
        .expect("the blocking task started");
    // Returns once the runtime dropped what it could (the idle worker),
    // after 100 ms at most of waiting for the blocked thread.
    workers.shutdown_timeout(Duration::from_millis(100));

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ran = second.block_on(async {
        let (ran_tx, ran) = tokio::sync::oneshot::channel::<()>();
        let ran_tx = std::sync::Mutex::new(Some(ran_tx));
        let quick = ReclaimTask::new(SessionId::new(2), RouterId::new(1), move || {
            if let Some(ran) = ran_tx.lock().unwrap().take() {
                let _ = ran.send(());
            }
            async { Ok::<(), ReclaimError>(()) }
        });
        queue.push(quick).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), ran).await
    });
    let _ = unblock.send(());
    assert!(
        ran.is_ok(),
        "the task pushed on the new runtime never ran: {:?}",
        queue.stats()
    );
}
