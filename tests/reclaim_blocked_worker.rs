//! "Shuts down within its deadline" against a release that blocks its
//! thread (a blocking call to a router that never answers). A worker
//! blocked in a synchronous call cannot be aborted; the shutdown awaited
//! every aborted worker's end, so it never returned (a review of the
//! queue, stop 34). Now the blocked worker's task is written off: reported
//! interrupted, counted out once, and the shutdown returns.
//!
//! Real clock: a thread blocked for real cannot be simulated on the paused
//! clock (its current-thread runtime would block with it). The queue's
//! workers run on a multi-thread runtime; the test awaits on a runtime of
//! its own, as a controller's shutdown path may: tokio drives a runtime's
//! timers from its idle workers, and a worker blocked just after it drove
//! them can leave every timer of its runtime unfired until it returns (so
//! that a shutdown awaited there cannot return earlier, see
//! `ReclaimQueue::shutdown`). The 10 s bounds only detect a hang: each
//! step takes milliseconds when it works.
#![cfg(feature = "test-util")]

use std::sync::mpsc;

use session_lifecycle::reclaim::{ReclaimError, ReclaimTask};
use session_lifecycle::{
    CloseReason, Event, EventBus, Incarnation, NewSession, ReclaimErrorKind, ReclaimEvent,
    ReclaimQueue, RouterId, SessionId,
};
use tokio::time::Duration;

const HANG: Duration = Duration::from_secs(10);

/// Runs `test` on a current-thread runtime of its own, with `workers`
/// runtime worker threads for the queue it builds (`build` runs in their
/// runtime's context).
fn on_two_runtimes<B, T, F>(build: B, test: T)
where
    B: FnOnce() -> ReclaimQueue,
    T: FnOnce(ReclaimQueue) -> F,
    F: std::future::Future<Output = ()>,
{
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let queue = {
        let _context = workers.enter();
        build()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(test(queue));
    workers.shutdown_timeout(HANG);
}

#[test]
fn a_shutdown_returns_when_a_release_blocks_its_workers_thread() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let build = || {
        ReclaimQueue::builder()
            .workers(1)
            .events(bus)
            .build()
            .unwrap()
    };
    on_two_runtimes(build, |queue| async move {
        let (unblock, blocked) = mpsc::channel::<()>();
        let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
        let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .into_session();
        session
            .attach(move |_: CloseReason| {
                let _ = entered_tx.send(());
                // A blocking call to a router that never answers.
                let _ = blocked.recv();
            })
            .unwrap();
        let quick = ReclaimTask::new(SessionId::new(2), RouterId::new(1), || async {
            Ok::<(), ReclaimError>(())
        });
        assert!(
            queue
                .close_session(&session, CloseReason::Forced)
                .await
                .won()
        );
        queue.push(quick).await.unwrap();
        entered.await.unwrap();

        let report = tokio::time::timeout(HANG, queue.shutdown(Duration::from_millis(200))).await;
        let returned = report.is_ok();
        // Unblock the thread whatever happened, so the runtime can end.
        let _ = unblock.send(());
        let report =
            report.expect("shutdown(200 ms) never returned: it awaited the blocked worker");
        assert!(returned && !report.drained);
        assert_eq!(report.left.len(), 1, "the quick task is handed back");
        assert_eq!(report.interrupted.len(), 1, "{:?}", report.interrupted);
        assert_eq!(report.interrupted[0].session, SessionId::new(1));
        let stats = queue.stats();
        assert_eq!(
            (stats.in_flight, stats.outstanding.total()),
            (0, 0),
            "{stats:?}"
        );

        // Unblocked, the worker ends its task: the session's close completes,
        // and the task is not counted or reported a second time.
        let closed = tokio::time::timeout(HANG, session.closed()).await;
        assert_eq!(closed.expect("the close completes"), CloseReason::Forced);
        let mut failed = Vec::new();
        while let Some(event) = events.try_recv() {
            if let Event::Reclaim(ReclaimEvent::ReclaimFailed { task, error, .. }) = event {
                failed.push((task.session, error.kind()));
            }
        }
        assert_eq!(
            failed,
            vec![(SessionId::new(1), ReclaimErrorKind::Interrupted)]
        );
        let stats = queue.stats();
        assert_eq!(stats.failed, 1, "{stats:?}");
        assert_eq!(
            (stats.in_flight, stats.outstanding.total(), stats.completed),
            (0, 0, 0),
            "{stats:?}"
        );
    });
}

/// Two workers past the deadline: one blocked in the second attempt of a
/// retried task (written off, with its two attempts), one awaiting (ended
/// by its abort, reported by its worker). Each is reported once.
#[test]
fn a_blocked_retry_and_an_awaiting_task_are_each_reported_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use session_lifecycle::Backoff;
    use session_lifecycle::reclaim::{DefaultPolicy, RetrySchedule};

    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let policy = DefaultPolicy::default().retry_schedule(RetrySchedule::new(
        Backoff::new()
            .retries(3)
            .delays(Duration::from_millis(1), Duration::from_millis(1)),
    ));
    let build = || {
        ReclaimQueue::builder()
            .workers(2)
            .policy(policy)
            .events(bus)
            .build()
            .unwrap()
    };
    on_two_runtimes(build, |queue| async move {
        let (unblock, blocked) = mpsc::channel::<()>();
        let blocked = Arc::new(std::sync::Mutex::new(blocked));
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<&str>();
        let attempts = Arc::new(AtomicU32::new(0));
        let retried = {
            let (attempts, blocked, entered) = (Arc::clone(&attempts), blocked, entered_tx.clone());
            ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
                let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
                let (blocked, entered) = (Arc::clone(&blocked), entered.clone());
                async move {
                    if first {
                        return Err(ReclaimError::transient("router busy"));
                    }
                    let _ = entered.send("blocked");
                    // The second attempt blocks its thread.
                    let _ = blocked.lock().unwrap().recv();
                    Ok(())
                }
            })
        };
        let awaiting = ReclaimTask::new(SessionId::new(2), RouterId::new(1), move || {
            let entered = entered_tx.clone();
            async move {
                let _ = entered.send("awaiting");
                std::future::pending::<Result<(), ReclaimError>>().await
            }
        });
        queue.push(retried).await.unwrap();
        queue.push(awaiting).await.unwrap();
        let mut started = Vec::new();
        for _ in 0..2 {
            started.push(
                tokio::time::timeout(HANG, entered.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        started.sort_unstable();
        assert_eq!(started, ["awaiting", "blocked"]);

        let report = tokio::time::timeout(HANG, queue.shutdown(Duration::from_millis(200))).await;
        let _ = unblock.send(());
        let report = report.expect("shutdown never returned");
        let mut interrupted: Vec<_> = report.interrupted.iter().map(|t| t.session).collect();
        interrupted.sort_unstable();
        assert_eq!(interrupted, [SessionId::new(1), SessionId::new(2)]);
        let stats = queue.stats();
        assert_eq!(
            (stats.in_flight, stats.outstanding.total()),
            (0, 0),
            "{stats:?}"
        );

        let mut failed = Vec::new();
        while let Some(event) = events.try_recv() {
            if let Event::Reclaim(ReclaimEvent::ReclaimFailed {
                task,
                attempts,
                error,
            }) = event
            {
                assert_eq!(error.kind(), ReclaimErrorKind::Interrupted);
                failed.push((task.session, attempts));
            }
        }
        failed.sort_unstable();
        assert_eq!(failed, [(SessionId::new(1), 2), (SessionId::new(2), 1)]);
        assert_eq!(queue.stats().failed, 2);
    });
}
