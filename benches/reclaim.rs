//! Push+pop throughput of the `ReclaimQueue` next to two baselines written
//! here.
//!
//! Every variant pushes `N` no-op reclamation tasks of mixed classes and
//! traffic and is timed until a worker has run the last of them (each task
//! popped and run once: a push+pop pair).
//!
//! - `reclaim_queue`: [`ReclaimQueue::push`], priority order, bounded.
//! - `baseline_mpsc`: a bounded `tokio::sync::mpsc` channel (FIFO, no
//!   priority, no retries) drained by worker tasks: the cost floor of a
//!   plain bounded queue.
//! - `baseline_spawn`: the original design's fire-and-forget: one
//!   `tokio::spawn` per task, unbounded.
//!
//! Groups: `one_thread` (a current-thread runtime, one producer, one
//! worker) and `two_producers` (a 2-thread runtime, two producers, two
//! workers).
//!
//! `cargo bench --bench reclaim`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use session_lifecycle::{
    ReclaimQueue, ResourceClass, RouterId, SessionId, reclaim::ReclaimError, reclaim::ReclaimTask,
};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, mpsc};

/// Tasks per measured iteration.
const N: usize = 10_000;
const CAPACITY: usize = 4_096;

fn task(i: usize) -> ReclaimTask {
    ReclaimTask::new(SessionId::new(i as u64), RouterId::new(1), || async {
        Ok::<(), ReclaimError>(())
    })
    .class(ResourceClass::ALL[i % 4])
    .traffic((i as u64).wrapping_mul(2_654_435_761) % 1_000_000)
}

/// Counts finished tasks; wakes the timer at `N`.
#[derive(Default)]
struct Done {
    count: AtomicUsize,
    all: Notify,
}

impl Done {
    fn one(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == N {
            self.all.notify_one();
        }
    }

    async fn wait(&self) {
        while self.count.load(Ordering::Acquire) < N {
            self.all.notified().await;
        }
        self.count.store(0, Ordering::Release);
    }
}

async fn produce_queue(queue: &ReclaimQueue, producers: usize) {
    let mut handles = Vec::new();
    for p in 0..producers {
        let queue = queue.clone();
        handles.push(tokio::spawn(async move {
            for i in (p..N).step_by(producers) {
                queue.push(task(i)).await.expect("queue open");
            }
        }));
    }
    for handle in handles {
        handle.await.expect("producer");
    }
    queue.idle().await;
}

async fn produce_mpsc(sender: &mpsc::Sender<ReclaimTask>, done: &Done, producers: usize) {
    let mut handles = Vec::new();
    for p in 0..producers {
        let sender = sender.clone();
        handles.push(tokio::spawn(async move {
            for i in (p..N).step_by(producers) {
                sender.send(task(i)).await.expect("receiver open");
            }
        }));
    }
    for handle in handles {
        handle.await.expect("producer");
    }
    done.wait().await;
}

async fn produce_spawn(done: &Arc<Done>, producers: usize) {
    let mut handles = Vec::new();
    for p in 0..producers {
        let done = Arc::clone(done);
        handles.push(tokio::spawn(async move {
            for i in (p..N).step_by(producers) {
                let done = Arc::clone(&done);
                let mut task = task(i);
                drop(tokio::spawn(async move {
                    let _ = task.run_once().await;
                    done.one();
                }));
            }
        }));
    }
    for handle in handles {
        handle.await.expect("producer");
    }
    done.wait().await;
}

fn group(
    criterion: &mut Criterion,
    name: &str,
    runtime: &Runtime,
    producers: usize,
    workers: usize,
) {
    let mut group = criterion.benchmark_group(name);
    group.throughput(Throughput::Elements(N as u64));

    let queue = runtime.block_on(async {
        ReclaimQueue::builder()
            .capacity(CAPACITY)
            .workers(workers)
            .build()
            .expect("inside a runtime")
    });
    group.bench_function("reclaim_queue", |b| {
        b.to_async(runtime)
            .iter(|| produce_queue(&queue, producers));
    });

    let done = Arc::new(Done::default());
    let (sender, receiver) = mpsc::channel::<ReclaimTask>(CAPACITY);
    if workers == 1 {
        // One worker owns the receiver: no lock.
        let done = Arc::clone(&done);
        let mut receiver = receiver;
        runtime.spawn(async move {
            while let Some(mut task) = receiver.recv().await {
                let _ = task.run_once().await;
                done.one();
            }
        });
    } else {
        // Several workers share it (an `mpsc` receiver is single-consumer).
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..workers {
            let (receiver, done) = (Arc::clone(&receiver), Arc::clone(&done));
            runtime.spawn(async move {
                loop {
                    let next = receiver.lock().await.recv().await;
                    let Some(mut task) = next else { return };
                    let _ = task.run_once().await;
                    done.one();
                }
            });
        }
    }
    group.bench_function("baseline_mpsc", |b| {
        b.to_async(runtime)
            .iter(|| produce_mpsc(&sender, &done, producers));
    });

    let done = Arc::new(Done::default());
    group.bench_function("baseline_spawn", |b| {
        b.to_async(runtime).iter(|| produce_spawn(&done, producers));
    });
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let one = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    group(&mut criterion, "one_thread", &one, 1, 1);
    let two = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("a runtime");
    group(&mut criterion, "two_producers", &two, 2, 2);
    criterion.final_summary();
}
