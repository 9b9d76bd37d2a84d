//! The reclaim queue against user values it holds and counts it shows (a
//! review of the queue, stop 34). Each test failed before its fix.
//!
//! - A task's error is user code too: `ReclaimError` keeps the user's
//!   error value (`Arc<dyn Error>`), whose `Drop` runs wherever the last
//!   clone goes. The queue dropped it under its `dead` lock (an evicted
//!   letter; the letters a shutdown takes), and a panic in it ended a
//!   worker (the retry's event, a final failure with no dead-letter
//!   store): the task was lost and the counts leaked.
//! - `stats().outstanding` must never miss a task (dead.rs: "counted in
//!   both for a moment, never in neither"): it read the queue's half,
//!   let `state` go, then read the letters' half, and a `redrive` moving a
//!   letter in between was counted in neither.
#![cfg(feature = "test-util")]

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;

use parking_lot::Mutex;
use session_lifecycle::reclaim::{DefaultPolicy, ReclaimError, ReclaimTask, RetrySchedule};
use session_lifecycle::test_util::{HOUR, within};
use session_lifecycle::{Backoff, ReclaimQueue, ResourceClass, RouterId, SessionId};
use tokio::time::Duration;

type Slot = Arc<Mutex<Option<ReclaimQueue>>>;

/// A user's error whose `Drop` looks at the queue (say, to log its depth).
struct LooksAtQueue(Slot);

impl fmt::Debug for LooksAtQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LooksAtQueue")
    }
}
impl fmt::Display for LooksAtQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("router unreachable")
    }
}
impl std::error::Error for LooksAtQueue {}
impl Drop for LooksAtQueue {
    fn drop(&mut self) {
        let queue = self.0.lock().clone();
        if let Some(queue) = queue {
            let _ = queue.stats();
            let _ = queue.dead_letters();
        }
    }
}

fn failing(id: u64, slot: &Slot) -> ReclaimTask {
    let slot = Arc::clone(slot);
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        let error = ReclaimError::permanent(LooksAtQueue(Arc::clone(&slot)));
        async move { Err::<(), _>(error) }
    })
}

/// Runs `scenario` on a thread of its own (paused clock); fails if it has
/// not finished after `secs` of real time (a deadlock never finishes).
fn finishes<F>(secs: u64, scenario: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(scenario());
        let _ = done.send(());
    });
    // A deadlock detector, not a wait for progress: the scenario takes
    // milliseconds of real time when it works.
    assert!(
        finished.recv_timeout(Duration::from_secs(secs)).is_ok(),
        "the scenario deadlocked: the user's error Drop ran under the queue's `dead` lock"
    );
}

// An evicted dead letter's error is dropped inside `bury`'s critical
// section (`dead.letters.pop_front().map(|letter| letter.task)`).
#[test]
fn an_evicted_dead_letters_error_is_not_dropped_under_the_dead_lock() {
    finishes(20, || async {
        let slot: Slot = Arc::default();
        let queue = ReclaimQueue::builder()
            .workers(1)
            .dead_letters(1)
            .policy(DefaultPolicy::default().retry_schedule(RetrySchedule::none()))
            .build()
            .unwrap();
        *slot.lock() = Some(queue.clone());
        queue.push(failing(1, &slot)).await.unwrap();
        tokio::time::timeout(HOUR, queue.idle()).await.unwrap();
        queue.push(failing(2, &slot)).await.unwrap(); // evicts letter 1
        tokio::time::timeout(HOUR, queue.idle()).await.unwrap();
        *slot.lock() = None;
    });
}

// `shutdown` takes the dead letters with `take_all`, whose
// `drain(..).map(|letter| letter.task)` drops every error under the lock.
#[test]
fn a_shutdown_does_not_drop_the_letters_errors_under_the_dead_lock() {
    finishes(20, || async {
        let slot: Slot = Arc::default();
        let queue = ReclaimQueue::builder()
            .workers(1)
            .policy(DefaultPolicy::default().retry_schedule(RetrySchedule::none()))
            .build()
            .unwrap();
        *slot.lock() = Some(queue.clone());
        queue.push(failing(1, &slot)).await.unwrap();
        tokio::time::timeout(HOUR, queue.idle()).await.unwrap();
        let report = queue.shutdown(Duration::from_secs(5)).await;
        assert_eq!(report.dead_letters.len(), 1);
        *slot.lock() = None;
    });
}

/// A user's error whose `Drop` panics (once).
struct PanicsOnDrop(Arc<AtomicBool>);

impl fmt::Debug for PanicsOnDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanicsOnDrop")
    }
}
impl fmt::Display for PanicsOnDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("flaky router")
    }
}
impl std::error::Error for PanicsOnDrop {}
impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.0.swap(true, Ordering::SeqCst) {
            panic!("the user's error panicked in Drop");
        }
    }
}

// A task whose first attempt fails with such an error, then succeeds.
// The retry's event is built and dropped in the worker (`publish`), the
// error's last clone with it: the panic ends the worker. The task is then
// neither retried nor dead-lettered (reported "interrupted by the
// shutdown deadline", with no shutdown), and with one worker nothing runs
// again: `idle()` never resolves.
#[tokio::test(start_paused = true)]
async fn an_errors_panicking_drop_does_not_end_the_worker_or_lose_the_task() {
    let policy = DefaultPolicy::default().retry_schedule(RetrySchedule::new(
        Backoff::new()
            .retries(3)
            .delays(Duration::from_millis(10), Duration::from_millis(10)),
    ));
    let queue = ReclaimQueue::builder()
        .workers(1)
        .policy(policy)
        .build()
        .unwrap();
    let panicked = Arc::new(AtomicBool::new(false));
    let (attempts, later) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let flaky = {
        let (attempts, panicked) = (Arc::clone(&attempts), Arc::clone(&panicked));
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
            let error = ReclaimError::transient(PanicsOnDrop(Arc::clone(&panicked)));
            async move { if first { Err(error) } else { Ok(()) } }
        })
        .class(ResourceClass::Critical)
    };
    let after = {
        let later = Arc::clone(&later);
        ReclaimTask::new(SessionId::new(2), RouterId::new(1), move || {
            later.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), ReclaimError>(()) }
        })
        .class(ResourceClass::Low)
    };
    queue.push(flaky).await.unwrap();
    queue.push(after).await.unwrap();
    let idle = tokio::time::timeout(HOUR, queue.idle()).await;
    let stats = queue.stats();
    eprintln!("stats after an hour: {stats:?}");
    assert!(
        idle.is_ok(),
        "idle() never resolved: a worker died; {stats:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "task 1 retried once");
    assert_eq!(later.load(Ordering::SeqCst), 1, "task 2 ran");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
}

// Same with no dead-letter store: the final error is dropped at the end
// of `bury`, in the worker, uncontained.
#[tokio::test(start_paused = true)]
async fn a_final_errors_panicking_drop_does_not_end_the_worker() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .dead_letters(0)
        .policy(DefaultPolicy::default().retry_schedule(RetrySchedule::none()))
        .build()
        .unwrap();
    let panicked = Arc::new(AtomicBool::new(false));
    let later = Arc::new(AtomicU32::new(0));
    let bad = {
        let panicked = Arc::clone(&panicked);
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            let error = ReclaimError::permanent(PanicsOnDrop(Arc::clone(&panicked)));
            async move { Err::<(), _>(error) }
        })
        .class(ResourceClass::Critical)
    };
    let after = {
        let later = Arc::clone(&later);
        ReclaimTask::new(SessionId::new(2), RouterId::new(1), move || {
            later.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), ReclaimError>(()) }
        })
        .class(ResourceClass::Low)
    };
    queue.push(bad).await.unwrap();
    queue.push(after).await.unwrap();
    let idle = tokio::time::timeout(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert!(
        idle.is_ok(),
        "idle() never resolved: a worker died; {stats:?}"
    );
    assert_eq!(later.load(Ordering::SeqCst), 1, "task 2 ran");
    assert_eq!(
        (stats.in_flight, stats.outstanding.total()),
        (0, 0),
        "{stats:?}"
    );
}

/// Tasks that always fail for good: each is always waiting, running or a
/// dead letter, so `outstanding.total()` is never below their number.
#[test]
fn outstanding_never_misses_a_letter_being_redriven() {
    const TASKS: u64 = 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (low, reads) = runtime.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(2)
            .policy(DefaultPolicy::default().retry_schedule(RetrySchedule::none()))
            .build()
            .unwrap();
        for id in 0..TASKS {
            let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), || async {
                Err::<(), _>(ReclaimError::permanent("never"))
            });
            queue.push(task).await.unwrap();
        }
        within(HOUR, queue.idle()).await;
        assert_eq!(queue.stats().outstanding.total(), TASKS);
        let stop = Arc::new(AtomicBool::new(false));
        let lowest = Arc::new(AtomicU64::new(u64::MAX));
        let reads = Arc::new(AtomicU64::new(0));
        let watcher = std::thread::spawn({
            let (queue, stop, lowest, reads) = (
                queue.clone(),
                Arc::clone(&stop),
                Arc::clone(&lowest),
                Arc::clone(&reads),
            );
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let total = queue.stats().outstanding.total();
                    lowest.fetch_min(total, Ordering::Relaxed);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Re-drive them over and over: each round trip is waiting →
        // running → dead letter → waiting.
        for _ in 0..5_000 {
            queue.redrive().await;
            within(HOUR, queue.idle()).await;
            if lowest.load(Ordering::Relaxed) < TASKS {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
        let _ = queue.shutdown(HOUR).await;
        (
            lowest.load(Ordering::Relaxed),
            reads.load(Ordering::Relaxed),
        )
    });
    assert!(
        low >= TASKS,
        "stats().outstanding.total() read {low} while {TASKS} tasks were outstanding \
         ({reads} reads)"
    );
}
