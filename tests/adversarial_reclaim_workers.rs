//! Adversarial tests of the reclaim queue's workers and shutdown, from a
//! review after its rewrite for speed (issue #20), as misbehaving users
//! would write them: tasks (and attempts) whose `Drop` panics, tasks that
//! push follow-ups as they run, a backlog on one thread, a policy that
//! panics or returns extreme values, threads of pushes and retries racing
//! `shutdown`, pushes dropped while they wait, re-entrant `Drop`s, aging
//! under a flood, every handle dropped, and the workers' runtime gone
//! before `shutdown`. Every task pushed runs once, is handed back, or is
//! reported; none is lost. Six of them failed before the fixes of stop 31
//! (a panicking `Drop` killed a worker, and `shutdown` then reported the
//! queue drained while tasks waited; a worker held its thread through a
//! whole backlog).
#![cfg(feature = "test-util")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use session_lifecycle::reclaim::{
    DefaultPolicy, Priority, PushError, ReclaimError, ReclaimPolicy, ReclaimTask, RetrySchedule,
    ShutdownReport, TaskInfo, TryPushError,
};
use session_lifecycle::{Backoff, ReclaimQueue, ResourceClass, RouterId, SessionId};
use tokio::time::Duration;

type Ran = Arc<Mutex<BTreeMap<u64, u32>>>;

/// A task that succeeds at once, counted in `ran` under its id.
fn counted(id: u64, ran: &Ran) -> ReclaimTask {
    let ran = Arc::clone(ran);
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        *ran.lock().entry(id).or_default() += 1;
        async { Ok::<(), ReclaimError>(()) }
    })
}

fn patient() -> DefaultPolicy {
    DefaultPolicy::default()
        .retry_schedule(RetrySchedule::none().attempt_timeout(Duration::from_secs(24 * 3600)))
}

/// Panics when dropped (unless already unwinding).
struct PanicOnDrop(&'static str);
impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("{}", self.0);
        }
    }
}

fn ids(report: &ShutdownReport) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
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

/// Pushes `bomb` (a task whose `Drop` panics somewhere) and then tasks
/// `others` into the paused `queue`, resumes it, and checks that the queue
/// goes idle and that each of `others` ran once, was handed back by
/// `shutdown`, or was dead-lettered: the worker survived the panic.
async fn survives(queue: ReclaimQueue, bomb: ReclaimTask, others: &[u64]) {
    let ran: Ran = Arc::default();
    queue
        .push(bomb.class(ResourceClass::Critical))
        .await
        .unwrap();
    for &id in others {
        queue.push(counted(id, &ran)).await.unwrap();
    }
    queue.resume();
    let idle = tokio::time::timeout(Duration::from_secs(60), queue.idle()).await;
    let stats = queue.stats();
    let report = queue.shutdown(Duration::from_secs(60)).await;
    let ran = ran.lock().clone();
    let (left, interrupted, dead) = ids(&report);
    let seen = format!(
        "idle: {}; stats: {stats:?}; ran: {ran:?}; report: drained={} left={left:?} \
         interrupted={interrupted:?} dead={dead:?}",
        idle.is_ok(),
        report.drained
    );
    for &id in others {
        let accounted = u32::from(left.contains(&id))
            + ran.get(&id).copied().unwrap_or(0)
            + u32::from(dead.contains(&id));
        assert_eq!(accounted, 1, "task {id} lost or duplicated; {seen}");
    }
    assert!(idle.is_ok(), "idle() never resolved; {seen}");
}

// ---------------------------------------------------------------------------
// A task whose closure (captured state) panics when dropped, after it
// succeeded. The queue contains panics of `reclaim` and of its future;
// the worker drops the task after it ran. Does the queue go on?
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn a_task_whose_drop_panics_does_not_kill_the_worker_or_lose_later_tasks() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(8)
        .paused(true)
        .policy(patient())
        .build()
        .unwrap();
    let guard = PanicOnDrop("task state panicked in Drop");
    let bomb = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
        let _keep = &guard;
        async { Ok::<(), ReclaimError>(()) }
    });
    survives(queue, bomb, &[2, 3]).await;
}

// ---------------------------------------------------------------------------
// An attempt that hangs and whose future panics when the timeout drops it.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn an_attempt_whose_future_panics_when_timed_out_does_not_kill_the_worker() {
    let policy = DefaultPolicy::default()
        .retry_schedule(RetrySchedule::none().attempt_timeout(Duration::from_secs(1)));
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(8)
        .paused(true)
        .policy(policy)
        .build()
        .unwrap();
    let hangs = ReclaimTask::new(SessionId::new(1), RouterId::new(1), || {
        let guard = PanicOnDrop("attempt future panicked in Drop");
        async move {
            let _keep = &guard;
            std::future::pending::<Result<(), ReclaimError>>().await
        }
    });
    survives(queue, hangs, &[2, 3]).await;
}

// ---------------------------------------------------------------------------
// A permanently failing task, no dead-letter store: the worker drops it,
// and its Drop panics.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn a_failed_task_dropped_with_no_dead_letter_store_whose_drop_panics() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(8)
        .dead_letters(0)
        .paused(true)
        .policy(patient())
        .build()
        .unwrap();
    let guard = PanicOnDrop("failed task panicked in Drop");
    let bomb = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
        let _keep = &guard;
        async { Err::<(), _>(ReclaimError::permanent("gone")) }
    });
    survives(queue, bomb, &[2]).await;
}

// ---------------------------------------------------------------------------
// Workers must yield to the runtime. A task that queues a follow-up task
// (try_push, synchronously, as its attempt runs) makes a chain; on a
// current-thread runtime, nobody else (timers, other tasks, shutdown)
// runs until the worker yields.
// ---------------------------------------------------------------------------
fn chain_link(queue: &ReclaimQueue, id: u64, max: u64, links: &Arc<AtomicU64>) -> ReclaimTask {
    let (queue, links) = (queue.clone(), Arc::clone(links));
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        links.fetch_add(1, Ordering::SeqCst);
        if id < max {
            let next = chain_link(&queue, id + 1, max, &links);
            let _ = queue.try_push(next);
        }
        async { Ok::<(), ReclaimError>(()) }
    })
}

#[tokio::test(flavor = "current_thread")]
async fn a_worker_running_a_chain_of_instant_tasks_yields_to_the_runtime() {
    const MAX: u64 = 200_000;
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(4)
        .build()
        .unwrap();
    let links = Arc::new(AtomicU64::new(0));
    queue
        .push(chain_link(&queue, 0, MAX, &links))
        .await
        .unwrap();
    // Let the worker run; come back as soon as the runtime lets us.
    tokio::task::yield_now().await;
    let seen = links.load(Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(60), queue.idle()).await;
    let report = queue.shutdown(Duration::from_secs(10)).await;
    drop(report);
    eprintln!(
        "links run before the test task ran again: {seen} (of {})",
        MAX + 1
    );
    assert!(
        seen < 10_000,
        "the worker ran {seen} tasks in one poll without yielding to the runtime"
    );
}

// ---------------------------------------------------------------------------
// A policy that panics in every method, or gives extreme values.
// ---------------------------------------------------------------------------
struct Wild {
    calls: AtomicU32,
}
impl ReclaimPolicy for Wild {
    fn priority(&self, task: &TaskInfo) -> Priority {
        match task.session.get() % 4 {
            0 => panic!("priority exploded"),
            1 => Priority::due_in(Duration::MAX),
            2 => Priority::URGENT,
            _ => Priority::due_in(Duration::from_nanos(u64::MAX)),
        }
    }
    fn retry_schedule(&self, task: &TaskInfo) -> RetrySchedule {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match task.session.get() % 3 {
            0 => panic!("retry schedule exploded"),
            1 => RetrySchedule::new(
                Backoff::new()
                    .retries(2)
                    .delays(Duration::ZERO, Duration::ZERO)
                    .factor(f32::NAN)
                    .jitter(true),
            )
            .attempt_timeout(Duration::ZERO),
            _ => RetrySchedule::new(
                Backoff::new()
                    .retries(2)
                    .delays(Duration::MAX, Duration::MAX)
                    .factor(f32::INFINITY)
                    .max_duration(Duration::from_secs(5)),
            )
            .attempt_timeout(Duration::MAX),
        }
    }
    fn long_lived_threshold(&self) -> Option<Duration> {
        panic!("threshold exploded")
    }
}

#[tokio::test(start_paused = true)]
async fn a_wild_policy_loses_no_task_and_runs_none_twice() {
    let queue = ReclaimQueue::builder()
        .workers(2)
        .capacity(4)
        .policy(Wild {
            calls: AtomicU32::new(0),
        })
        .build()
        .unwrap();
    let runs: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let succeeded: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    for id in 0..48u64 {
        let (runs, succeeded) = (Arc::clone(&runs), Arc::clone(&succeeded));
        let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
            let (runs, succeeded) = (Arc::clone(&runs), Arc::clone(&succeeded));
            let attempt = {
                let mut runs = runs.lock();
                let n = runs.entry(id).or_default();
                *n += 1;
                *n
            };
            async move {
                // Fail the first attempt transiently (pending first).
                tokio::task::yield_now().await;
                if attempt == 1 && id % 2 == 0 {
                    return Err(ReclaimError::transient("first try fails"));
                }
                *succeeded.lock().entry(id).or_default() += 1;
                Ok(())
            }
        });
        tokio::time::timeout(Duration::from_secs(3600), queue.push(task))
            .await
            .expect("push")
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(3600), queue.idle())
        .await
        .expect("idle");
    let report = queue.shutdown(Duration::from_secs(60)).await;
    let stats = queue.stats();
    let (left, interrupted, dead) = ids(&report);
    let succeeded = succeeded.lock().clone();
    eprintln!("stats {stats:?} left {left:?} int {interrupted:?} dead {dead:?}");
    for id in 0..48u64 {
        let ok = succeeded.get(&id).copied().unwrap_or(0);
        assert!(ok <= 1, "task {id} succeeded {ok} times");
        let accounted = ok + u32::from(left.contains(&id)) + u32::from(dead.contains(&id));
        assert_eq!(
            accounted, 1,
            "task {id}: ok {ok}, left {left:?} dead {dead:?}"
        );
    }
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
}

// ---------------------------------------------------------------------------
// A task retried forever with no delay must not keep shutdown from
// returning by its deadline.
// ---------------------------------------------------------------------------
// Real clock: under a paused clock a task retried with zero delays keeps
// the runtime busy, so the clock never auto-advances (a test artefact).
#[tokio::test(flavor = "current_thread")]
async fn an_endlessly_retried_task_is_interrupted_at_the_shutdown_deadline() {
    let policy = DefaultPolicy::default().retry_schedule(
        RetrySchedule::new(
            Backoff::new()
                .retries(u32::MAX)
                .delays(Duration::ZERO, Duration::ZERO)
                .jitter(false),
        )
        .attempt_timeout(Duration::from_secs(1)),
    );
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(4)
        .policy(policy)
        .build()
        .unwrap();
    let ran: Ran = Arc::default();
    let attempts = Arc::new(AtomicU64::new(0));
    let spin = {
        let attempts = Arc::clone(&attempts);
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(ReclaimError::transient("never")) }
        })
        .class(ResourceClass::Critical)
    };
    queue.push(spin).await.unwrap();
    queue
        .push(counted(2, &ran).class(ResourceClass::Low))
        .await
        .unwrap();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        queue.shutdown(Duration::from_millis(100)),
    )
    .await
    .expect("shutdown returned");
    let (left, interrupted, dead) = ids(&report);
    eprintln!(
        "attempts {} left {left:?} interrupted {interrupted:?} dead {dead:?}",
        attempts.load(Ordering::SeqCst)
    );
    assert!(!report.drained);
    assert_eq!(interrupted, vec![1]);
    assert_eq!(left, vec![2]);
}

// ---------------------------------------------------------------------------
// Shutdown racing pushes and retries on real threads: each task ends
// exactly once (succeeded, handed back, dead letter, interrupted), pushes
// after shutdown are refused with the typed error.
// ---------------------------------------------------------------------------
#[test]
fn shutdown_racing_threads_of_pushes_and_retries_accounts_for_each_task_once() {
    for round in 0..6u64 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let queue = runtime.block_on(async {
            ReclaimQueue::builder()
                .workers(3)
                .capacity(1 + round as usize % 3)
                .policy(
                    DefaultPolicy::default()
                        .class_spacing(Duration::from_micros(50))
                        .retry_schedule(
                            RetrySchedule::new(
                                Backoff::new()
                                    .retries(2)
                                    .delays(Duration::from_micros(100), Duration::from_millis(1))
                                    .jitter(false),
                            )
                            .attempt_timeout(Duration::from_millis(5)),
                        ),
                )
                .build()
                .unwrap()
        });
        const PER: u64 = 300;
        const THREADS: u64 = 4;
        let succeeded: Arc<Vec<AtomicU32>> =
            Arc::new((0..PER * THREADS).map(|_| AtomicU32::new(0)).collect());
        let refused: Arc<Vec<AtomicU32>> =
            Arc::new((0..PER * THREADS).map(|_| AtomicU32::new(0)).collect());
        let dropped_unrun = Arc::new(AtomicUsize::new(0));
        let made = Arc::clone(&succeeded);
        let make = move |id: u64| {
            let succeeded = Arc::clone(&made);
            let mut attempt = 0u32;
            ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
                attempt += 1;
                let succeeded = Arc::clone(&succeeded);
                let attempt = attempt;
                async move {
                    match id % 6 {
                        0 => Err(ReclaimError::permanent("perm")),
                        1 if attempt < 2 => Err(ReclaimError::transient("flaky")),
                        2 => panic!("boom {id}"),
                        3 => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            succeeded[id as usize].fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        }
                        4 if attempt < 3 => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            // Times out first, unless the worker was polled
                            // after both timers were due (a loaded machine):
                            // then the sleep is seen done first.
                            succeeded[id as usize].fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        }
                        _ => {
                            succeeded[id as usize].fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        }
                    }
                }
            })
            .class(ResourceClass::ALL[(id % 4) as usize])
            .traffic(id * 977)
        };
        let started = Arc::new(std::sync::Barrier::new(THREADS as usize + 1));
        let producers: Vec<_> = (0..THREADS)
            .map(|t| {
                let queue = queue.clone();
                let handle = runtime.handle().clone();
                let refused = Arc::clone(&refused);
                let started = Arc::clone(&started);
                let make = make.clone();
                let _ = &dropped_unrun;
                std::thread::spawn(move || {
                    started.wait();
                    for i in 0..PER {
                        let id = t * PER + i;
                        let task = make(id);
                        let outcome = if i % 2 == 0 {
                            handle
                                .block_on(queue.push(task))
                                .map_err(PushError::into_task)
                        } else {
                            match queue.try_push(task) {
                                Ok(()) => Ok(()),
                                Err(TryPushError::Full(task)) => handle
                                    .block_on(queue.push(task))
                                    .map_err(PushError::into_task),
                                Err(TryPushError::ShutDown(task)) => Err(task),
                            }
                        };
                        if let Err(task) = outcome {
                            assert_eq!(task.info().session.get(), id);
                            refused[id as usize].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        started.wait();
        std::thread::sleep(std::time::Duration::from_millis(1 + round * 3));
        let report = runtime.block_on(queue.shutdown(Duration::from_millis(round * 4)));
        for producer in producers {
            producer.join().unwrap();
        }
        // A push after shutdown is refused with the typed error.
        let late = make(0);
        match queue.try_push(late) {
            Err(TryPushError::ShutDown(_)) => {}
            other => panic!("late try_push: {other:?}"),
        }
        let late = runtime.block_on(queue.push(make(1)));
        assert!(late.is_err());
        let (left, interrupted, dead) = ids(&report);
        let stats = queue.stats();
        let mut problems = Vec::new();
        for id in 0..PER * THREADS {
            let s = succeeded[id as usize].load(Ordering::SeqCst);
            let r = refused[id as usize].load(Ordering::SeqCst);
            let l = left.iter().filter(|&&x| x == id).count() as u32;
            let i = interrupted.iter().filter(|&&x| x == id).count() as u32;
            let d = dead.iter().filter(|&&x| x == id).count() as u32;
            // Tasks that fail for good (perm, panics) are dead letters or
            // (if failed during the drain) dead letters handed back.
            let failed_for_good = id % 6 == 0 || id % 6 == 2;
            let total = s + r + l + i + d;
            let ok = if failed_for_good {
                s == 0 && total == 1
            } else {
                total == 1 && d == 0
            };
            if !ok {
                problems.push((id, s, r, l, i, d));
            }
        }
        assert!(
            problems.is_empty(),
            "round {round}: (id, succeeded, refused, left, interrupted, dead): {problems:?}\n{stats:?}"
        );
        assert_eq!(stats.outstanding.total(), 0, "round {round}: {stats:?}");
        drop(report);
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// Cancel safety: a push dropped while waiting for room drops its task
// (never runs it) and leaves the bound as it was.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn a_push_dropped_while_waiting_drops_its_task_and_leaves_the_queue_as_it_was() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(1)
        .paused(true)
        .policy(patient())
        .build()
        .unwrap();
    let ran: Ran = Arc::default();
    queue.push(counted(1, &ran)).await.unwrap();
    for id in 2..6 {
        let waited =
            tokio::time::timeout(Duration::from_millis(5), queue.push(counted(id, &ran))).await;
        assert!(waited.is_err());
    }
    // A push woken and then dropped before it runs.
    let woken = {
        let queue = queue.clone();
        let ran = Arc::clone(&ran);
        tokio::spawn(async move { queue.push(counted(6, &ran)).await })
    };
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    queue.resume();
    woken.abort();
    let _ = woken.await;
    tokio::time::timeout(Duration::from_secs(60), queue.idle())
        .await
        .expect("idle");
    // The bound is intact: exactly `capacity` pushes fit while paused.
    queue.pause();
    queue.try_push(counted(7, &ran)).unwrap();
    assert!(matches!(
        queue.try_push(counted(8, &ran)),
        Err(TryPushError::Full(_))
    ));
    queue.resume();
    tokio::time::timeout(Duration::from_secs(60), queue.idle())
        .await
        .expect("idle");
    let ran = ran.lock().clone();
    let stats = queue.stats();
    eprintln!("{ran:?} {stats:?}");
    assert_eq!(ran.get(&1), Some(&1));
    for id in 2..6 {
        assert_eq!(ran.get(&id), None, "dropped push {id} ran");
    }
    assert!(ran.get(&6).copied().unwrap_or(0) <= 1);
    assert_eq!(ran.get(&7), Some(&1));
    assert_eq!(stats.outstanding.total(), 0);
}

// ---------------------------------------------------------------------------
// A task whose Drop re-enters its queue (try_push, stats, dead_letters)
//  both when a worker drops it after running, and when a shutdown
//  hands it back.
// ---------------------------------------------------------------------------
struct ReenterOnDrop {
    queue: ReclaimQueue,
    ran: Ran,
    pushed_back: Arc<AtomicU32>,
    refused: Arc<AtomicU32>,
    child: u64,
}
impl Drop for ReenterOnDrop {
    fn drop(&mut self) {
        let _ = self.queue.stats();
        let _ = self.queue.dead_letters();
        let _ = format!("{:?}", self.queue);
        match self.queue.try_push(counted(self.child, &self.ran)) {
            Ok(()) => {
                self.pushed_back.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_whose_drop_re_enters_the_queue_does_not_deadlock() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(2)
        .policy(patient())
        .build()
        .unwrap();
    let ran: Ran = Arc::default();
    let pushed_back = Arc::new(AtomicU32::new(0));
    let refused = Arc::new(AtomicU32::new(0));
    for id in 0..4u64 {
        let state = ReenterOnDrop {
            queue: queue.clone(),
            ran: Arc::clone(&ran),
            pushed_back: Arc::clone(&pushed_back),
            refused: Arc::clone(&refused),
            child: 100 + id,
        };
        let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
            let _keep = &state;
            async move {
                if id == 3 {
                    return Err(ReclaimError::permanent("dead letter"));
                }
                Ok::<(), ReclaimError>(())
            }
        });
        tokio::time::timeout(Duration::from_secs(10), queue.push(task))
            .await
            .expect("push")
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), queue.idle())
        .await
        .expect("idle");
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        queue.shutdown(Duration::from_secs(10)),
    )
    .await
    .expect("shutdown");
    // The dead letter (task 3) is handed back; drop it: its Drop is refused.
    assert_eq!(report.dead_letters.len(), 1);
    drop(report);
    eprintln!(
        "pushed back {} refused {} ran {:?}",
        pushed_back.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
        ran.lock()
    );
    assert_eq!(
        pushed_back.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst),
        4
    );
    // The dead letter's Drop after shutdown is refused; a Drop while a push
    // waits for room may be refused too (the freed slot is the waiting
    // push's). Every child that got in ran once.
    assert!(refused.load(Ordering::SeqCst) >= 1);
    let children = ran
        .lock()
        .range(100..)
        .map(|(_, &runs)| runs)
        .collect::<Vec<_>>();
    assert_eq!(children.len() as u32, pushed_back.load(Ordering::SeqCst));
    assert!(children.iter().all(|&runs| runs == 1), "{children:?}");
}

// ---------------------------------------------------------------------------
// Aging: a flood of critical work (every slot refilled at once) must not
//  overtake a low task by more than the documented bound.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn a_low_task_is_overtaken_only_by_work_pushed_within_its_delay() {
    let spacing = Duration::from_millis(100);
    let policy = DefaultPolicy::default().class_spacing(spacing);
    let bound = policy.max_delay();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(64)
        .policy(policy)
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    // Ids: pushed-at (ms since start) in the id.
    let order: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
    let task = |id: u64, class: ResourceClass, order: &Arc<Mutex<Vec<(u64, Duration)>>>| {
        let order = Arc::clone(order);
        let pushed = start.elapsed();
        ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
            let order = Arc::clone(&order);
            async move {
                order.lock().push((id, pushed));
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<(), ReclaimError>(())
            }
        })
        .class(class)
        .traffic(u64::MAX)
    };
    // Fill, then the low task, then keep the queue full of critical work.
    for id in 0..32 {
        queue
            .push(task(id, ResourceClass::Critical, &order))
            .await
            .unwrap();
    }
    let low_at = start.elapsed();
    queue
        .push(task(999_999, ResourceClass::Low, &order).traffic(0))
        .await
        .unwrap();
    let mut id = 1_000;
    while start.elapsed() < Duration::from_secs(5) {
        tokio::time::timeout(
            Duration::from_secs(60),
            queue.push(task(id, ResourceClass::Critical, &order)),
        )
        .await
        .expect("push")
        .unwrap();
        id += 1;
        if id % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let _ = queue.shutdown(Duration::ZERO).await;
    let order = order.lock().clone();
    let low = order
        .iter()
        .position(|(id, _)| *id == 999_999)
        .expect("the low task ran");
    let late: Vec<_> = order[..low]
        .iter()
        .filter(|(_, pushed)| *pushed > low_at + bound)
        .collect();
    eprintln!(
        "low ran at position {low} of {}; bound {bound:?}",
        order.len()
    );
    assert!(
        late.is_empty(),
        "overtaken by work pushed past the bound: {late:?}"
    );
}

// ---------------------------------------------------------------------------
// Every handle dropped with tasks waiting and running: the workers
//  finish every queued task.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn dropping_every_handle_runs_every_queued_task_once() {
    let queue = ReclaimQueue::builder()
        .workers(2)
        .capacity(16)
        .policy(patient())
        .build()
        .unwrap();
    let done = Arc::new(tokio::sync::Semaphore::new(0));
    let per: Arc<Vec<AtomicU32>> = Arc::new((0..16).map(|_| AtomicU32::new(0)).collect());
    for id in 0..16u64 {
        let (done, per) = (Arc::clone(&done), Arc::clone(&per));
        queue
            .push(ReclaimTask::new(
                SessionId::new(id),
                RouterId::new(1),
                move || {
                    let (done, per) = (Arc::clone(&done), Arc::clone(&per));
                    async move {
                        tokio::time::sleep(Duration::from_millis(10 * (id % 3))).await;
                        per[id as usize].fetch_add(1, Ordering::SeqCst);
                        done.add_permits(1);
                        Ok::<(), ReclaimError>(())
                    }
                },
            ))
            .await
            .unwrap();
    }
    tokio::task::yield_now().await;
    drop(queue);
    let all = done.acquire_many(16);
    let _ = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("all ran");
    for id in 0..16 {
        assert_eq!(per[id].load(Ordering::SeqCst), 1, "task {id}");
    }
}

// ---------------------------------------------------------------------------
// Without any re-entrancy: a backlog of instant tasks is run in one poll
//  of the worker; nothing else on its runtime thread runs meanwhile.
// ---------------------------------------------------------------------------
#[tokio::test(flavor = "current_thread")]
async fn a_worker_draining_a_backlog_yields_to_the_runtime() {
    const N: u64 = 50_000;
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(N as usize)
        .paused(true)
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    for id in 0..N {
        let done = Arc::clone(&done);
        queue
            .try_push(ReclaimTask::new(
                SessionId::new(id),
                RouterId::new(1),
                move || {
                    done.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<(), ReclaimError>(()) }
                },
            ))
            .unwrap();
    }
    queue.resume();
    tokio::task::yield_now().await;
    let seen = done.load(Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(60), queue.idle())
        .await
        .expect("idle");
    eprintln!("tasks run before the test task ran again: {seen} of {N}");
    assert!(
        seen < N,
        "the worker ran all {seen} tasks in one poll without yielding"
    );
}

// ---------------------------------------------------------------------------
// The runtime that runs the workers shuts down with tasks waiting and
//  one mid-attempt; a shutdown called afterwards (another runtime) must
//  hand the waiting tasks back, not report `drained` with them gone.
// ---------------------------------------------------------------------------
#[test]
fn a_shutdown_after_the_workers_runtime_is_gone_hands_back_the_waiting_tasks() {
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ran: Ran = Arc::default();
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let queue = first.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .capacity(8)
            .policy(patient())
            .build()
            .unwrap();
        let started2 = Arc::clone(&started);
        let hangs = ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            started2.add_permits(1);
            std::future::pending::<Result<(), ReclaimError>>()
        })
        .class(ResourceClass::Critical);
        queue.push(hangs).await.unwrap();
        for id in 2..5 {
            queue
                .push(counted(id, &ran).class(ResourceClass::Low))
                .await
                .unwrap();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), started.acquire())
            .await
            .expect("the first task started");
        queue
    });
    first.shutdown_timeout(std::time::Duration::from_secs(5));
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats_before = queue.stats();
    let report = second.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            queue.shutdown(Duration::from_millis(50)),
        )
        .await
        .expect("shutdown returns")
    });
    let (left, interrupted, dead) = ids(&report);
    let ran = ran.lock().clone();
    eprintln!(
        "before: {stats_before:?}\nreport: drained={} left={left:?} interrupted={interrupted:?} dead={dead:?}; ran {ran:?}; after: {:?}",
        report.drained,
        queue.stats()
    );
    for id in 2..5 {
        let accounted = u32::from(left.contains(&id)) + ran.get(&id).copied().unwrap_or(0);
        assert_eq!(accounted, 1, "task {id} neither ran nor was handed back");
    }
    assert!(!report.drained, "reported drained with tasks never run");
}

// ---------------------------------------------------------------------------
// Waiting pushes are served in the order they came: a slot freed while one
// waits is its, not a later push's.
// ---------------------------------------------------------------------------

/// A task that records its id in `order` when it runs.
fn ordered(id: u64, order: &Arc<Mutex<Vec<u64>>>) -> ReclaimTask {
    let order = Arc::clone(order);
    ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        order.lock().push(id);
        async { Ok::<(), ReclaimError>(()) }
    })
}

/// Pushes `first` into the full-at-one `queue`, then spawns a push of task
/// 2 (recording in `order`) and lets it find the queue full and wait.
async fn first_then_a_waiting_push(
    queue: &ReclaimQueue,
    first: ReclaimTask,
    order: &Arc<Mutex<Vec<u64>>>,
) -> tokio::task::JoinHandle<Result<(), PushError>> {
    queue.push(first).await.unwrap();
    let waiting = {
        let (queue, order) = (queue.clone(), Arc::clone(order));
        tokio::spawn(async move { queue.push(ordered(2, &order)).await })
    };
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    waiting
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_slot_freed_while_a_push_waits_goes_to_that_push_not_to_a_later_try_push() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(1)
        .paused(true)
        .policy(patient())
        .build()
        .unwrap();
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    // The first task, when it runs (its slot freed as the worker took it,
    // the waiting push woken but not yet polled), tries to push a
    // follow-up: there is no room for it, the slot is the waiting push's.
    let intruder = Arc::new(Mutex::new(None));
    let first = {
        let (queue, order, intruder) = (queue.clone(), Arc::clone(&order), Arc::clone(&intruder));
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            order.lock().push(1);
            let pushed = queue.try_push(ordered(3, &order));
            *intruder.lock() = Some(match pushed {
                Ok(()) => "queued",
                Err(TryPushError::Full(_)) => "full",
                Err(TryPushError::ShutDown(_)) => "shut down",
            });
            async { Ok::<(), ReclaimError>(()) }
        })
    };
    let waiter = first_then_a_waiting_push(&queue, first, &order).await;
    assert!(!waiter.is_finished());
    queue.resume();
    waiter.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(60), queue.idle())
        .await
        .expect("idle");
    assert_eq!(
        *intruder.lock(),
        Some("full"),
        "a later try_push took the waiting push's slot"
    );
    assert_eq!(*order.lock(), [1, 2]);
}

/// Pushes waiting in line: the first is woken with the freed slot and
/// dropped before it runs, the second dropped unwoken; the slot goes on to
/// the third, in order, and afterwards exactly `capacity` tasks fit again.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn waiting_pushes_dropped_woken_or_not_pass_their_slot_on_in_order() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(2)
        .paused(true)
        .policy(patient())
        .build()
        .unwrap();
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    queue.push(ordered(1, &order)).await.unwrap();
    queue.push(ordered(2, &order)).await.unwrap();
    let mut waiting = Vec::new();
    for id in 3..=6 {
        let (queue, order) = (queue.clone(), Arc::clone(&order));
        waiting.push(tokio::spawn(async move {
            queue.push(ordered(id, &order)).await
        }));
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }
    // Both slots given (the worker takes 1 and 2): they go to 3 and 4;
    // 3 is dropped after it was given one, 4 before.
    waiting[1].abort();
    queue.resume();
    waiting[0].abort();
    let mut waiting = waiting.into_iter();
    for (id, handle) in (3..=6).zip(&mut waiting) {
        let outcome = handle.await;
        match id {
            3 | 4 => assert!(outcome.map_or(true, |pushed| pushed.is_ok())),
            _ => outcome.unwrap().unwrap(),
        }
    }
    tokio::time::timeout(Duration::from_secs(60), queue.idle())
        .await
        .expect("idle");
    let ran = order.lock().clone();
    assert_eq!(ran[..2], [1, 2]);
    assert!(ran.ends_with(&[5, 6]), "{ran:?}");
    // The bound is intact: exactly `capacity` tasks fit while paused.
    queue.pause();
    queue.try_push(ordered(7, &order)).unwrap();
    queue.try_push(ordered(8, &order)).unwrap();
    assert!(matches!(
        queue.try_push(ordered(9, &order)),
        Err(TryPushError::Full(_))
    ));
    assert_eq!(queue.stats().depth, 2);
}

/// Threads of pushes, many given up while they wait (a timeout drops
/// them, some just as a slot is handed to them), beside `try_push`es:
/// every push that returned `Ok` ran once, none given up ran, and
/// afterwards exactly `capacity` tasks fit again (no slot lost or made up
/// by the line of waiting pushes).
#[test]
fn pushes_given_up_while_waiting_in_line_lose_no_slot_and_make_none_up() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        const CAPACITY: usize = 8;
        let queue = ReclaimQueue::builder()
            .workers(2)
            .capacity(CAPACITY)
            .policy(patient())
            .build()
            .unwrap();
        let ran: Ran = Arc::default();
        let producers = (0..4u64)
            .map(|producer| {
                let (queue, ran) = (queue.clone(), Arc::clone(&ran));
                tokio::spawn(async move {
                    let mut accepted = Vec::new();
                    for n in 0..1_500u64 {
                        let id = producer * 1_000_000 + n;
                        let task = counted(id, &ran);
                        let ok = match n % 3 {
                            0 => queue.try_push(task).is_ok(),
                            1 => {
                                let wait = Duration::from_micros(n % 50);
                                matches!(
                                    tokio::time::timeout(wait, queue.push(task)).await,
                                    Ok(Ok(()))
                                )
                            }
                            _ => queue.push(task).await.is_ok(),
                        };
                        if ok {
                            accepted.push(id);
                        }
                    }
                    accepted
                })
            })
            .collect::<Vec<_>>();
        let mut accepted = Vec::new();
        for producer in producers {
            accepted.extend(producer.await.unwrap());
        }
        tokio::time::timeout(Duration::from_secs(60), queue.idle())
            .await
            .expect("idle");
        let ran = ran.lock().clone();
        assert_eq!(
            ran.len(),
            accepted.len(),
            "a task ran that was not accepted, or one was lost"
        );
        for id in &accepted {
            assert_eq!(ran.get(id), Some(&1), "task {id}");
        }
        queue.pause();
        let spare: Ran = Arc::default();
        for id in 0..CAPACITY as u64 {
            assert!(
                queue.try_push(counted(id, &spare)).is_ok(),
                "slot {id} lost"
            );
        }
        assert!(
            matches!(
                queue.try_push(counted(99, &spare)),
                Err(TryPushError::Full(_))
            ),
            "a slot made up"
        );
        queue.resume();
        queue.shutdown(Duration::from_secs(30)).await;
        assert_eq!(spare.lock().len(), CAPACITY);
    });
}

/// Two producers pushing into a small queue on a runtime's two threads,
/// as fast as a worker frees slots: no push is left waiting while the
/// queue has room. (A first version of the line counted a push in before
/// it was in the semaphore's line: a slot freed in between went to the
/// other producer's next push, and the first push waited for ever.)
#[test]
fn producers_racing_for_freed_slots_are_never_left_waiting() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .capacity(4)
            .policy(patient())
            .build()
            .unwrap();
        let done = Arc::new(AtomicU64::new(0));
        for round in 0..40u64 {
            let producers = (0..2u64)
                .map(|p| {
                    let (queue, done) = (queue.clone(), Arc::clone(&done));
                    tokio::spawn(async move {
                        for n in 0..2_000 {
                            let done = Arc::clone(&done);
                            let id = round * 1_000_000 + p * 100_000 + n;
                            let task =
                                ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
                                    done.fetch_add(1, Ordering::Relaxed);
                                    async { Ok::<(), ReclaimError>(()) }
                                });
                            queue.push(task).await.unwrap();
                        }
                    })
                })
                .collect::<Vec<_>>();
            let finished = tokio::time::timeout(Duration::from_secs(30), async {
                for producer in producers {
                    producer.await.unwrap();
                }
            })
            .await;
            assert!(
                finished.is_ok(),
                "round {round}: a push waits for ever; {:?}",
                queue.stats()
            );
            tokio::time::timeout(Duration::from_secs(30), queue.idle())
                .await
                .expect("idle");
        }
        assert_eq!(done.load(Ordering::Relaxed), 40 * 4_000);
    });
}

/// A task pushing a follow-up into its own full queue while another push
/// waits, as `push` documents it (with `try_push`, or `push` in a task of
/// its own; awaiting `push` inside the task would wait for a slot only the
/// busy worker frees): everything runs, nothing hangs.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_task_pushing_a_follow_up_while_a_push_waits_as_documented_does_not_stall() {
    for spawned in [false, true] {
        let queue = ReclaimQueue::builder()
            .workers(1)
            .capacity(1)
            .paused(true)
            .policy(patient())
            .build()
            .unwrap();
        let order: Arc<Mutex<Vec<u64>>> = Arc::default();
        let first = {
            let (queue, order) = (queue.clone(), Arc::clone(&order));
            ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
                order.lock().push(1);
                let follow_up = ordered(11, &order);
                if spawned {
                    let queue = queue.clone();
                    drop(tokio::spawn(async move { queue.push(follow_up).await }));
                } else if let Err(TryPushError::Full(follow_up)) = queue.try_push(follow_up) {
                    // Full: queued later, from a task of its own.
                    let queue = queue.clone();
                    drop(tokio::spawn(async move { queue.push(follow_up).await }));
                }
                async { Ok::<(), ReclaimError>(()) }
            })
        };
        let waiting = first_then_a_waiting_push(&queue, first, &order).await;
        queue.resume();
        waiting.await.unwrap().unwrap();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(Duration::from_secs(60), queue.idle())
            .await
            .expect("idle");
        assert_eq!(*order.lock(), [1, 2, 11], "spawned {spawned}");
    }
}

/// A push from a task that spent tokio's cooperative budget (here, on 128
/// ready messages) waits in line like any other: it keeps its place, and a
/// later `try_push` does not take its slot. Before the push got in line
/// first and out of the budget, a tokio older than 1.54 (which the crate
/// accepts) returned its first poll of the line unqueued: it counted in,
/// a `try_push` took its slot, and it waited for ever with the queue
/// empty. (With the pinned tokio the same gap was open between threads.)
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_push_from_a_task_out_of_coop_budget_keeps_its_place_in_line() {
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(128)
        .paused(true)
        .policy(patient())
        .build()
        .unwrap();
    let ran: Ran = Arc::default();
    let intruder = Arc::new(Mutex::new(None));
    let first = {
        let (queue, ran, intruder) = (queue.clone(), Arc::clone(&ran), Arc::clone(&intruder));
        ReclaimTask::new(SessionId::new(1), RouterId::new(1), move || {
            *ran.lock().entry(1).or_default() += 1;
            *intruder.lock() = Some(queue.try_push(counted(1_000, &ran)).is_ok());
            async { Ok::<(), ReclaimError>(()) }
        })
    };
    queue.push(first).await.unwrap();
    // The worker looks and sleeps: woken by `resume`, it runs after the
    // producer filled the queue.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    // A burst of 128 requests, ready at once: ids 2..=129.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    for id in 2..=129 {
        tx.send(id).unwrap();
    }
    drop(tx);
    let producer = {
        let (queue, ran) = (queue.clone(), Arc::clone(&ran));
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                queue.push(counted(id, &ran)).await?;
            }
            Ok::<(), PushError>(())
        })
    };
    queue.resume();
    let served = tokio::time::timeout(Duration::from_secs(3_600), producer).await;
    assert!(
        matches!(served, Ok(Ok(Ok(())))),
        "the producer's last push was not served in an hour: {:?}",
        queue.stats()
    );
    assert_eq!(
        *intruder.lock(),
        Some(false),
        "a later try_push took a waiting push's slot"
    );
    tokio::time::timeout(Duration::from_secs(3_600), queue.idle())
        .await
        .expect("idle");
    let ran = ran.lock().clone();
    assert_eq!(ran.len(), 129);
    assert!(ran.values().all(|&n| n == 1));
}

/// A worker yields to the runtime between tasks (tokio's cooperative
/// budget) with the next task already taken; a shutdown whose deadline
/// passes right then stops it there: that task is reported interrupted,
/// not lost. (Before, it was dropped with the worker, in no list.)
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_task_taken_as_its_worker_yields_is_reported_when_a_shutdown_stops_it() {
    const TASKS: u64 = 1_000;
    let queue = ReclaimQueue::builder()
        .workers(1)
        .capacity(TASKS as usize)
        .paused(true)
        .build()
        .unwrap();
    let ran: Ran = Arc::default();
    for id in 0..TASKS {
        queue.push(counted(id, &ran)).await.unwrap();
    }
    queue.resume();
    // The worker runs until its budget is spent, then yields holding the
    // next task.
    tokio::task::yield_now().await;
    let report = queue.shutdown(Duration::ZERO).await;
    let (left, interrupted, dead) = ids(&report);
    let ran = ran.lock().clone();
    assert!(dead.is_empty());
    let mut accounted: Vec<u64> = ran.keys().copied().chain(left).chain(interrupted).collect();
    accounted.sort_unstable();
    assert_eq!(
        accounted,
        (0..TASKS).collect::<Vec<_>>(),
        "ran {}, left {}, interrupted {:?}",
        ran.len(),
        report.left.len(),
        report.interrupted
    );
    assert!(ran.values().all(|&runs| runs == 1));
    assert_eq!(queue.stats().outstanding.total(), 0);
}
