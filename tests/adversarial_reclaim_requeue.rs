//! The reclaim queue's put-back tasks and revived workers, a third review
//! round of stop 34. Each test failed before its fix: a full queue whose
//! workers were gone never revived them (a push only revived after it got
//! room); a task put back into a queue whose last handle was gone, or
//! waiting when the handle and then the runtime went, was lost unreported;
//! a put-back racing a shutdown landed in the stopped queue, lost.
//! Paused clock where possible; real clock only with bounded hang
//! detectors (`HANG`), no sleeps waiting for conditions.
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;

use session_lifecycle::Backoff;
use session_lifecycle::reclaim::{
    DefaultPolicy, Priority, ReclaimError, ReclaimPolicy, ReclaimTask, RetrySchedule,
};
use session_lifecycle::test_util::paused_runtime;
use session_lifecycle::{
    Event, EventBus, ReclaimEvent, ReclaimQueue, RouterId, SessionId, TaskInfo,
};
use tokio::time::Duration;

const HANG: Duration = Duration::from_secs(10);

fn quick(id: u64) -> ReclaimTask {
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
        Ok::<(), ReclaimError>(())
    })
}

fn failed_sessions(events: &mut session_lifecycle::Subscription) -> Vec<SessionId> {
    let mut failed = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(ReclaimEvent::ReclaimFailed { task, .. }) = event {
            failed.push(task.session);
        }
    }
    failed
}

/// A task that fails once (transient), then succeeds; counts attempts.
fn flaky(id: u64, attempts: &Arc<AtomicU32>) -> ReclaimTask {
    let counted = Arc::clone(attempts);
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                Err(ReclaimError::transient("router busy"))
            } else {
                Ok(())
            }
        }
    })
}

fn one_second_backoff() -> DefaultPolicy {
    DefaultPolicy::default().retry_schedule(RetrySchedule::new(
        Backoff::new()
            .retries(3)
            .jitter(false)
            .delays(Duration::from_secs(1), Duration::from_secs(1)),
    ))
}

/// The workers are revived only after a successful insertion. A queue that
/// is full when its workers' runtime goes away never gets them back: `push`
/// waits for room that only a worker can free (for ever), `try_push` says
/// `Full` for ever, although the docs promise that "the next push from
/// another runtime spawns new workers there".
#[test]
fn a_push_into_a_full_queue_whose_workers_are_gone_revives_them() {
    let first = paused_runtime();
    let queue = first.block_on(async {
        let queue = ReclaimQueue::builder()
            .capacity(1)
            .workers(1)
            .paused(true)
            .build()
            .unwrap();
        queue.push(quick(1)).await.unwrap();
        queue
    });
    // The controller restarts its runtime; the queue (full) is kept.
    drop(first);

    let second = paused_runtime();
    second.block_on(async {
        queue.resume();
        assert!(
            matches!(
                queue.try_push(quick(2)),
                Err(session_lifecycle::reclaim::TryPushError::Full(_))
            ),
            "full, as expected"
        );
        let pushed = tokio::time::timeout(Duration::from_secs(3600), queue.push(quick(3))).await;
        let stats = queue.stats();
        assert!(
            pushed.is_ok(),
            "push waited an hour for room nobody frees (no worker revived): {stats:?}"
        );
    });
}

/// The last handle is dropped while the worker holds a task in its retry
/// backoff (the queue closes and drains, so `Owner::drop` reports
/// nothing), then the runtime goes away: the worker's future is dropped
/// and `Running::drop` puts the task back into the closed queue, where no
/// worker will ever run it and nobody reports it. It is dropped with the
/// queue: neither run nor reported failed (I5).
#[test]
fn a_task_requeued_into_a_dropped_queue_is_reported() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let attempts = Arc::new(AtomicU32::new(0));
    let first = paused_runtime();
    first.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .policy(one_second_backoff())
            .events(bus)
            .build()
            .unwrap();
        queue.push(flaky(1, &attempts)).await.unwrap();
        loop {
            match events.recv().await {
                Some(Event::Reclaim(ReclaimEvent::ReclaimRetried { .. })) => break,
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
        // The last handle goes; the worker still holds task 1 (backoff).
        drop(queue);
    });
    // The runtime goes away before the backoff ends.
    drop(first);

    let ran_again = attempts.load(Ordering::SeqCst) > 1;
    let failed = failed_sessions(&mut events);
    assert!(
        ran_again || failed == vec![SessionId::new(1)],
        "task 1 was neither run again nor reported failed (attempts {}, failed {failed:?})",
        attempts.load(Ordering::SeqCst)
    );
}

/// A policy whose `priority` blocks (a slow lookup, a lock) on its second
/// call for session 1, once released by the test: `Running::drop` checks
/// `stopped()` and then calls `requeue`, which asks the policy before it
/// takes the lock. A shutdown that passes its deadline in between stops
/// the queue and returns; the task is then pushed into the stopped queue's
/// heap: not handed back, not reported interrupted, never run.
struct SlowSecondPriority {
    calls: AtomicU32,
    entered: std::sync::Mutex<mpsc::Sender<()>>,
    release: std::sync::Mutex<mpsc::Receiver<()>>,
    armed: AtomicBool,
}

impl ReclaimPolicy for SlowSecondPriority {
    fn priority(&self, task: &TaskInfo) -> Priority {
        if task.session == SessionId::new(1)
            && self.calls.fetch_add(1, Ordering::SeqCst) == 1
            && self.armed.load(Ordering::SeqCst)
        {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv_timeout(HANG);
        }
        Priority::URGENT
    }

    fn retry_schedule(&self, _: &TaskInfo) -> RetrySchedule {
        RetrySchedule::new(
            Backoff::new()
                .retries(3)
                .jitter(false)
                .delays(Duration::from_secs(60), Duration::from_secs(60)),
        )
    }
}

#[test]
fn a_requeue_racing_a_shutdown_does_not_lose_the_task() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let (entered_tx, entered) = mpsc::channel();
    let (release_tx, release) = mpsc::channel();
    let policy = SlowSecondPriority {
        calls: AtomicU32::new(0),
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release),
        armed: AtomicBool::new(true),
    };
    let attempts = Arc::new(AtomicU32::new(0));
    // The workers' runtime, on a thread of its own (dropped there).
    let (queue_tx, queue_rx) = mpsc::channel();
    let (drop_tx, drop_rx) = mpsc::channel::<()>();
    let bus2 = bus.clone();
    let attempts2 = Arc::clone(&attempts);
    let owner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut events = bus2.subscribe();
        runtime.block_on(async {
            let queue = ReclaimQueue::builder()
                .workers(1)
                .policy(policy)
                .events(bus2)
                .build()
                .unwrap();
            queue.push(flaky(1, &attempts2)).await.unwrap();
            loop {
                match tokio::time::timeout(HANG, events.recv()).await {
                    Ok(Some(Event::Reclaim(ReclaimEvent::ReclaimRetried { .. }))) => break,
                    Ok(Some(_)) => {}
                    other => panic!("no retry: {other:?}"),
                }
            }
            queue_tx.send(queue).unwrap();
        });
        drop_rx.recv_timeout(HANG).unwrap();
        // The runtime goes away while the worker is in its 60 s backoff:
        // `Running::drop` -> not stopped -> `requeue` -> policy blocks.
        drop(runtime);
    });
    let queue = queue_rx.recv_timeout(HANG).unwrap();
    drop_tx.send(()).unwrap();
    entered
        .recv_timeout(HANG)
        .expect("requeue asked the policy");

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = second.block_on(async {
        tokio::time::timeout(HANG, queue.shutdown(Duration::from_millis(20)))
            .await
            .expect("shutdown returned")
    });
    // The requeue goes on, after the shutdown returned.
    release_tx.send(()).unwrap();
    owner.join().unwrap();

    let failed = failed_sessions(&mut events);
    let handed_back = report
        .left
        .iter()
        .any(|task| task.info().session == SessionId::new(1));
    let stats = queue.stats();
    assert!(
        handed_back
            || report
                .interrupted
                .iter()
                .any(|task| task.session == SessionId::new(1))
            || failed.contains(&SessionId::new(1)),
        "task 1 was neither handed back nor reported: report {report:?}, failed {failed:?}, \
         stats after {stats:?}"
    );
}

/// The same gap without a requeue: `Owner::drop` reports what waits only
/// if no worker is alive at that moment. Dropping the last handle first
/// and the workers' runtime second (a struct holding both, dropped in
/// field order; a `block_on` that returned, so the workers never got to
/// drain) loses every waiting task: nothing runs them, nothing reports
/// them.
#[test]
fn tasks_waiting_when_the_handle_then_the_runtime_go_are_reported() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let ran = Arc::new(AtomicBool::new(false));
    let first = paused_runtime();
    let queue = first.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .paused(true)
            .events(bus)
            .build()
            .unwrap();
        let ran = Arc::clone(&ran);
        let task = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            ran.store(true, Ordering::SeqCst);
            async { Ok::<(), ReclaimError>(()) }
        });
        queue.push(task).await.unwrap();
        queue
    });
    // The handle first (the worker is alive: nothing reported), then the
    // runtime (the worker dies without having drained).
    drop(queue);
    drop(first);

    let failed = failed_sessions(&mut events);
    assert!(
        ran.load(Ordering::SeqCst) || failed == vec![SessionId::new(1)],
        "task 1 was neither run nor reported failed (failed {failed:?})"
    );
}
