//! Leak regression (issue #21.5): a churn of session releases where 1 % of
//! them fail once, through the `ReclaimQueue` (failures kept as dead
//! letters, then re-driven) and through the original fire-and-forget
//! design (one spawned task per release, a failure logged and dropped).
//!
//! Each release frees one "port" of a shared pool; a failed release frees
//! nothing. The bench prints how many ports are still taken at the end of
//! each design, and the queue's outstanding count by class, and fails if
//! the queue's design leaks any.
//!
//! `cargo bench --bench leak` (100,000 releases); `-- --test` (CI) runs
//! 10,000.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use session_lifecycle::reclaim::{DefaultPolicy, ReclaimError, ReclaimTask};
use session_lifecycle::{ReclaimQueue, ResourceClass, RouterId, SessionId};
use tokio::time::Instant;

/// One release in a hundred fails, once.
const FAILING_EVERY: u64 = 100;

/// The pool of ports: taken when a session opens, freed by its release.
#[derive(Default)]
struct Ports {
    taken: AtomicU64,
}

/// The release of session `id`'s port: fails its first attempt if `id` is
/// one of the 1 % (a router that refused the withdrawal, say).
fn release(
    id: u64,
    ports: &Arc<Ports>,
) -> impl FnMut() -> futures::future::Ready<Result<(), ReclaimError>> + Send + 'static {
    let ports = Arc::clone(ports);
    let mut attempts = 0u32;
    move || {
        attempts += 1;
        if id.is_multiple_of(FAILING_EVERY) && attempts == 1 {
            return futures::future::ready(Err(ReclaimError::permanent(
                "router refused the withdrawal",
            )));
        }
        ports.taken.fetch_sub(1, Ordering::Relaxed);
        futures::future::ready(Ok(()))
    }
}

fn class(id: u64) -> ResourceClass {
    ResourceClass::ALL[(id % 4) as usize]
}

/// The queue: every release queued, the failures kept and re-driven.
async fn through_the_queue(sessions: u64) -> (u64, u64, u64, std::time::Duration) {
    let ports = Arc::new(Ports::default());
    let queue = ReclaimQueue::builder()
        .policy(DefaultPolicy::default())
        .capacity(4_096)
        .build()
        .expect("inside a runtime");
    let started = Instant::now();
    for id in 0..sessions {
        ports.taken.fetch_add(1, Ordering::Relaxed);
        let task = ReclaimTask::new(
            SessionId::new(id),
            RouterId::new(id % 64),
            release(id, &ports),
        )
        .class(class(id));
        queue.push(task).await.expect("queue open");
    }
    queue.idle().await;
    let leaked_before = ports.taken.load(Ordering::Relaxed);
    let dead = queue.stats().dead_letters as u64;
    queue.redrive().await;
    queue.idle().await;
    let elapsed = started.elapsed();
    let stats = queue.stats();
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
    (
        leaked_before,
        dead,
        ports.taken.load(Ordering::Relaxed),
        elapsed,
    )
}

/// The original design: a task spawned per release, a failure dropped.
async fn fire_and_forget(sessions: u64) -> (u64, std::time::Duration) {
    let ports = Arc::new(Ports::default());
    let running = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    for id in 0..sessions {
        ports.taken.fetch_add(1, Ordering::Relaxed);
        running.fetch_add(1, Ordering::SeqCst);
        let mut work = release(id, &ports);
        let (running, done) = (Arc::clone(&running), Arc::clone(&done));
        drop(tokio::spawn(async move {
            if let Err(error) = work().await {
                // Logged, and that is all: the port stays taken.
                std::hint::black_box(error);
            }
            if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                done.notify_one();
            }
        }));
    }
    while running.load(Ordering::SeqCst) > 0 {
        done.notified().await;
    }
    (ports.taken.load(Ordering::Relaxed), started.elapsed())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    if std::env::args().any(|a| a == "--list") {
        println!("leak: bench");
        return;
    }
    let sessions = if quick { 10_000 } else { 100_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("a runtime");
    let (before, dead, after, queue_time) = runtime.block_on(through_the_queue(sessions));
    let (leaked, spawn_time) = runtime.block_on(fire_and_forget(sessions));
    let failing = sessions.div_ceil(FAILING_EVERY);
    println!("{sessions} releases, {failing} failing once (1 %):");
    println!("| design | ports still taken | time |");
    println!("| --- | --- | --- |");
    println!("| ReclaimQueue, before re-drive | {before} ({dead} dead letters) | |");
    println!("| ReclaimQueue, after `redrive()` | {after} | {queue_time:.2?} |");
    println!("| fire-and-forget (spawn per release) | {leaked} | {spawn_time:.2?} |");
    assert_eq!(after, 0, "the queue's design leaked ports");
    assert_eq!(
        leaked, failing,
        "the fire-and-forget design leaks each failure"
    );
}
