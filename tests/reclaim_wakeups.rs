//! ReclaimQueue wake-ups: workers and waiting pushes are woken only when
//! they sleep, and never left asleep with work or room waiting: each push
//! wakes a sleeping worker while any sleeps, `resume` wakes them all, a
//! push cancelled after its wake-up passes it on, and racing producers,
//! cancellations and `idle` waiters lose none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;
use session_lifecycle::test_util::{HOUR, within};
use session_lifecycle::{
    ReclaimQueue, ResourceClass, RouterId, SessionId, reclaim::DefaultPolicy,
    reclaim::ReclaimError, reclaim::ReclaimTask, reclaim::RetrySchedule,
};
use tokio::sync::Barrier;
use tokio::task::AbortHandle;
use tokio::time::Duration;

fn noop(id: u64) -> ReclaimTask {
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
        Ok::<(), ReclaimError>(())
    })
}

/// A task that finishes only once `barrier` has every party: the tasks
/// can finish only if that many workers run them at once.
fn meeting(id: u64, barrier: &Arc<Barrier>) -> ReclaimTask {
    let barrier = Arc::clone(barrier);
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        let barrier = Arc::clone(&barrier);
        async move {
            barrier.wait().await;
            Ok::<(), ReclaimError>(())
        }
    })
}

/// No retry, and attempts that may take all day: a task waiting for a
/// worker that never wakes hangs instead of timing out and retrying.
fn patient() -> DefaultPolicy {
    DefaultPolicy::default()
        .retry_schedule(RetrySchedule::none().attempt_timeout(Duration::from_secs(24 * 3_600)))
}

/// Every worker asleep; each push wakes one more while any sleeps, so
/// four tasks that must run at once on four workers all finish.
#[tokio::test(start_paused = true)]
async fn each_push_wakes_a_sleeping_worker_while_any_sleeps() {
    const WORKERS: u64 = 4;
    let queue = ReclaimQueue::builder()
        .workers(4)
        .policy(patient())
        .build()
        .unwrap();
    // Let every worker find the queue empty and go to sleep.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    let barrier = Arc::new(Barrier::new(WORKERS as usize));
    for id in 0..WORKERS {
        queue.push(meeting(id, &barrier)).await.unwrap();
    }
    within(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert_eq!((stats.completed, stats.failed), (WORKERS, 0));
}

/// Pushes while paused wake nobody; `resume` wakes every sleeping worker.
#[tokio::test(start_paused = true)]
async fn resume_wakes_every_sleeping_worker() {
    const WORKERS: u64 = 4;
    let queue = ReclaimQueue::builder()
        .workers(4)
        .policy(patient())
        .paused(true)
        .build()
        .unwrap();
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    let barrier = Arc::new(Barrier::new(WORKERS as usize));
    for id in 0..WORKERS {
        queue.push(meeting(id, &barrier)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(queue.stats().in_flight, 0, "paused: nothing starts");
    queue.resume();
    within(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert_eq!((stats.completed, stats.failed), (WORKERS, 0));
}

/// Two pushes wait for room; the first is woken, then dropped before it
/// runs: its wake-up goes on to the second, which gets the slot.
#[tokio::test(start_paused = true)]
async fn a_push_dropped_after_its_wake_up_passes_it_on() {
    let queue = ReclaimQueue::builder()
        .capacity(1)
        .paused(true)
        .build()
        .unwrap();
    // Task 0 holds the only slot. A worker frees the slot when it takes
    // task 0 (waking the first push) and then runs it: task 0 drops the
    // first push before that push can run.
    let first_push: Arc<Mutex<Option<AbortHandle>>> = Arc::default();
    let abort = Arc::clone(&first_push);
    queue
        .try_push(ReclaimTask::new(
            SessionId::new(0),
            RouterId::new(1),
            move || {
                if let Some(first) = abort.lock().take() {
                    first.abort();
                }
                async { Ok::<(), ReclaimError>(()) }
            },
        ))
        .unwrap();
    let first = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(noop(1)).await }
    });
    *first_push.lock() = Some(first.abort_handle());
    let second = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(noop(2)).await }
    });
    // Both wait for room.
    tokio::task::yield_now().await;
    assert!(!first.is_finished() && !second.is_finished());
    queue.resume();
    within(HOUR, second).await.unwrap().unwrap();
    assert!(within(HOUR, first).await.unwrap_err().is_cancelled());
    within(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert_eq!((stats.pushed, stats.completed), (2, 2));
    assert_eq!(stats.outstanding.total(), 0);
}

/// Producers on two threads against a queue of 2 slots and 2 workers,
/// some pushes given up while they wait and pushed again, `idle` waiters
/// coming and going: every task runs exactly once and nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_producers_cancellations_and_idle_waiters_lose_no_wake_up() {
    const PRODUCERS: u64 = 8;
    const EACH: u64 = 300;
    let queue = ReclaimQueue::builder()
        .capacity(2)
        .workers(2)
        .build()
        .unwrap();
    let runs: Arc<Vec<AtomicU32>> =
        Arc::new((0..PRODUCERS * EACH).map(|_| AtomicU32::new(0)).collect());
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (queue, runs) = (queue.clone(), Arc::clone(&runs));
        producers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let id = p * EACH + i;
                let task = |runs: &Arc<Vec<AtomicU32>>| {
                    let runs = Arc::clone(runs);
                    ReclaimTask::new(SessionId::new(id), RouterId::new(p), move || {
                        runs[id as usize].fetch_add(1, Ordering::SeqCst);
                        async {
                            tokio::task::yield_now().await;
                            Ok::<(), ReclaimError>(())
                        }
                    })
                    .class(ResourceClass::ALL[(id % 4) as usize])
                };
                if i % 7 == 0 {
                    // Given up at once if it has to wait (the task is
                    // dropped with the future).
                    let _ = tokio::time::timeout(Duration::ZERO, queue.push(noop(id))).await;
                }
                if i % 50 == 0 {
                    let _ = tokio::time::timeout(Duration::from_micros(50), queue.idle()).await;
                }
                queue.push(task(&runs)).await.unwrap();
            }
        }));
    }
    for producer in producers {
        within(Duration::from_secs(60), producer).await.unwrap();
    }
    within(Duration::from_secs(60), queue.idle()).await;
    let stats = queue.stats();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.depth, 0);
    assert_eq!(stats.outstanding.total(), 0);
    assert_eq!(stats.completed, stats.pushed);
    assert!(runs.iter().all(|n| n.load(Ordering::SeqCst) == 1));
}
