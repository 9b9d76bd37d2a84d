//! Deleting a router: `RouterDeleter` next to two baselines written here.
//!
//! Every variant deletes one router whose sessions are confirmed at once by
//! an in-process notifier (it closes each notified session through the
//! store, as a router's answer would), and is timed until every session of
//! the router is closed and gone from the store.
//!
//! - `router_deleter`: [`RouterDeleter::delete`] on a [`MemoryStore`], the
//!   router's answers confirmed by key through the store
//!   ([`SessionStore::close_exact`]).
//! - `router_deleter_by_handle`: the same, the answers confirmed through
//!   each batch's [`Confirmations`] ([`Confirmations::confirm_keys`] with
//!   the keys the router names: every key of the batch, in its order).
//! - `baseline_scan_spawn`: the original design. One `Mutex<HashMap>` of all
//!   sessions, scanned in full for the router's sessions, and one
//!   fire-and-forget task spawned per session to notify, close and remove
//!   it. The original returns before that work is done; here the clock
//!   stops when the last task has finished, so both sides do the same work.
//! - `baseline_sequential`: the write-up's loop on the same `MemoryStore`:
//!   list the router's sessions, mark them all terminating, notify them (in
//!   the same batches as the deleter), then await each session's close in
//!   turn; run as a task of its own, as the deleter ran its deletions until
//!   it ran them in the caller's task.
//! - `baseline_sequential_in_caller`: the same loop awaited in the caller's
//!   task, as the deleter's runs are now: no hand-off to a worker thread.
//!   The strictest baseline: the caller (the benchmark's `block_on`
//!   thread) created the sessions, so they are in its cache.
//! - `floor_hashmap_remove`: the floor, a plain `HashMap` remove loop of
//!   the router's session ids (no fence, notice or close).
//!
//! The deleter and the loop run with confirmations made inline (`_inline`:
//! inside `notify`) and from another task (`_from_task`: a task spawned
//! per batch, as a router's answers arriving on a connection would).
//!
//! Groups, together the cost-growth table of BENCHMARKS.md:
//!
//! - `delete/{1k,10k,100k,1m}`: a router of that many sessions, alone in
//!   the store;
//! - `delete_1k_among/{1k,10k,100k,1m}`: a 1k-session router in a store
//!   that also holds that many sessions of other routers (1,000 sessions
//!   each).
//!
//! After the groups, `longest_hold` deletes a 1M-session router (100k
//! under `--test`) on a current-thread runtime beside a task that yields
//! in a loop, and prints the longest time that task waited for its turn:
//! the longest the deletion held the runtime's only worker (the notifier's
//! own work on a batch of 1,000 included).
//!
//! `--test` (CI) runs each once and skips the 1M cases.
//!
//! `cargo bench --bench delete_router`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use parking_lot::Mutex;
use session_lifecycle::deleter::Confirmations;
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId,
    Session, SessionId, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

const BATCH: usize = 1_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("a tokio runtime")
}

/// Where a router's confirmations come from.
#[derive(Clone, Copy)]
enum Source {
    /// Inside `notify`, before it returns.
    Inline,
    /// From another task, spawned per batch: as a router's answers
    /// arriving on a connection's task would.
    Task,
}

/// Confirms every notified session at once, through the store (or the
/// batch's `Confirmations`, `by_handle`), inline or from another task.
struct Confirm {
    store: Arc<MemoryStore>,
    from: Source,
    by_handle: bool,
}

impl Confirm {
    fn new(store: &Arc<MemoryStore>, from: Source) -> Self {
        Self {
            store: Arc::clone(store),
            from,
            by_handle: false,
        }
    }

    fn by_handle(store: &Arc<MemoryStore>, from: Source) -> Self {
        Self {
            by_handle: true,
            ..Self::new(store, from)
        }
    }
}

impl TerminationNotifier for Confirm {
    async fn notify_with(
        &self,
        batch: TerminationBatch,
        handles: Confirmations,
    ) -> Result<(), NotifyError> {
        if !self.by_handle {
            return self.notify(batch).await;
        }
        let confirm = move || handles.confirm_keys(batch.sessions);
        match self.from {
            Source::Inline => drop(confirm()),
            Source::Task => drop(tokio::spawn(async move { confirm() })),
        }
        Ok(())
    }

    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let store = Arc::clone(&self.store);
        let confirm = async move {
            for key in batch.sessions {
                let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
            }
        };
        match self.from {
            Source::Inline => confirm.await,
            Source::Task => drop(tokio::spawn(confirm)),
        }
        Ok(())
    }
}

/// Hands out ids so that no two iterations share a router or a session.
#[derive(Default)]
struct Ids {
    routers: AtomicU64,
    sessions: AtomicU64,
}

impl Ids {
    fn router(&self) -> RouterId {
        RouterId::new(1 << 32 | self.routers.fetch_add(1, Ordering::Relaxed))
    }

    fn sessions(&self, n: u64) -> u64 {
        (1 << 40) + self.sessions.fetch_add(n, Ordering::Relaxed)
    }
}

/// Registers a fresh router with `n` sessions in `store`.
async fn fill(store: &MemoryStore, ids: &Ids, n: u64) -> RouterId {
    let router = ids.router();
    let incarnation = store.register_router(router).await.expect("fresh router");
    let first = ids.sessions(n);
    for i in 0..n {
        let spec = NewSession::new(SessionId::new(first + i), router, incarnation);
        drop(store.create(spec).await.expect("live router"));
    }
    router
}

/// `n` sessions on routers of 1,000 sessions each, never deleted.
async fn crowd(store: &MemoryStore, n: u64) {
    for r in 0..n.div_ceil(1_000) {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.expect("fresh router");
        for i in 0..1_000 {
            let spec = NewSession::new(SessionId::new(r * 1_000 + i), router, incarnation);
            drop(store.create(spec).await.expect("live router"));
        }
    }
}

fn deleter(store: &Arc<MemoryStore>, from: Source) -> RouterDeleter<MemoryStore, Confirm> {
    deleter_with(store, Confirm::new(store, from))
}

fn deleter_with(
    store: &Arc<MemoryStore>,
    notifier: Confirm,
) -> RouterDeleter<MemoryStore, Confirm> {
    RouterDeleter::builder()
        .batch_size(BATCH)
        .build(Arc::clone(store), notifier)
        .expect("valid settings")
}

/// Times `iters` deletions of fresh `n`-session routers in `store`,
/// confirmed by key (or by handle).
fn time_deleter(
    rt: &Runtime,
    store: &Arc<MemoryStore>,
    ids: &Ids,
    (n, from, by_handle): (u64, Source, bool),
    iters: u64,
) -> Duration {
    let notifier = if by_handle {
        Confirm::by_handle(store, from)
    } else {
        Confirm::new(store, from)
    };
    let deleter = deleter_with(store, notifier);
    rt.block_on(async {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            let router = fill(store, ids, n).await;
            let start = Instant::now();
            let outcome = deleter.delete(router).await.expect("router deleted");
            spent += start.elapsed();
            let report = outcome.report().expect("a fresh router is deleted");
            assert_eq!(report.confirmed as u64, n, "{report:?}");
            black_box(report);
        }
        spent
    })
}

/// How the benchmark's caller runs the sequential loop.
#[derive(Clone, Copy)]
enum Caller {
    /// As a task of its own, awaiting its end.
    Spawns,
    /// In its own task.
    Awaits,
}

/// Times `iters` runs of the write-up's sequential loop.
fn time_sequential(
    rt: &Runtime,
    store: &Arc<MemoryStore>,
    ids: &Ids,
    (n, from, caller): (u64, Source, Caller),
    iters: u64,
) -> Duration {
    let notifier = Arc::new(Confirm::new(store, from));
    rt.block_on(async {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            let router = fill(store, ids, n).await;
            let start = Instant::now();
            match caller {
                Caller::Spawns => {
                    let (store2, notifier2) = (Arc::clone(store), Arc::clone(&notifier));
                    tokio::spawn(async move { sequential(&store2, &notifier2, router).await })
                        .await
                        .expect("sequential loop");
                }
                Caller::Awaits => sequential(store, &notifier, router).await,
            }
            spent += start.elapsed();
            // Confirmed from another task, the last sessions may still be
            // on their way out of the store (closed before they are
            // removed) when the loop has seen them all closed.
            while store.count(router).await.expect("known router") > 0 {
                tokio::task::yield_now().await;
            }
        }
        spent
    })
}

/// The write-up's `DeleteRouter`: mark all, then wait for each in turn.
async fn sequential(store: &MemoryStore, notifier: &Confirm, router: RouterId) {
    let sessions = store.sessions(router).await.expect("known router");
    for session in &sessions {
        let _ = session.begin_terminating();
    }
    let incarnation = sessions
        .first()
        .map_or(Incarnation::new(0), Session::incarnation);
    for chunk in sessions.chunks(BATCH) {
        let batch = TerminationBatch {
            router,
            incarnation,
            sessions: chunk.iter().map(Session::key).collect(),
            round: 0,
        };
        let _ = notifier.notify(batch).await;
    }
    for session in &sessions {
        session.closed().await;
    }
}

/// The original design's store: every session in one locked map.
#[derive(Default)]
struct ScanStore {
    sessions: Mutex<HashMap<SessionId, Session>>,
}

impl ScanStore {
    fn fill(&self, ids: &Ids, n: u64) -> RouterId {
        let router = ids.router();
        let first = ids.sessions(n);
        let mut sessions = self.sessions.lock();
        for i in 0..n {
            let id = SessionId::new(first + i);
            let session = NewSession::new(id, router, Incarnation::new(1)).into_session();
            sessions.insert(id, session);
        }
        router
    }

    fn crowd(&self, n: u64) {
        let mut sessions = self.sessions.lock();
        for r in 0..n.div_ceil(1_000) {
            for i in 0..1_000 {
                let id = SessionId::new(r * 1_000 + i);
                let session = NewSession::new(id, RouterId::new(r), Incarnation::new(1));
                sessions.insert(id, session.into_session());
            }
        }
    }

    /// Closes and removes one session: what the router's answer does.
    fn confirm(&self, id: SessionId) {
        let session = self.sessions.lock().remove(&id);
        if let Some(session) = session {
            let _ = session.close(CloseReason::RouterDeleted);
        }
    }
}

/// The original `DeleteRouter`: scan everything, spawn cleanup per session.
fn scan_and_spawn(store: &Arc<ScanStore>, router: RouterId, done: &Arc<Countdown>) {
    let victims: Vec<SessionId> = store
        .sessions
        .lock()
        .values()
        .filter(|session| session.router() == router)
        .map(Session::id)
        .collect();
    done.add(victims.len());
    for id in victims {
        let (store, done) = (Arc::clone(store), Arc::clone(done));
        tokio::spawn(async move {
            store.confirm(id);
            done.one();
        });
    }
}

/// Lets the bench see when fire-and-forget work has finished.
#[derive(Default)]
struct Countdown {
    left: AtomicUsize,
    zero: Notify,
}

impl Countdown {
    fn add(&self, n: usize) {
        self.left.fetch_add(n, Ordering::AcqRel);
    }

    fn one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.zero.notify_waiters();
        }
    }

    async fn wait(&self) {
        loop {
            let zero = self.zero.notified();
            if self.left.load(Ordering::Acquire) == 0 {
                return;
            }
            zero.await;
        }
    }
}

fn time_scan_spawn(
    rt: &Runtime,
    store: &Arc<ScanStore>,
    ids: &Ids,
    n: u64,
    iters: u64,
) -> Duration {
    rt.block_on(async {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            let router = store.fill(ids, n);
            let done = Arc::new(Countdown::default());
            let start = Instant::now();
            scan_and_spawn(store, router, &done);
            done.wait().await;
            spent += start.elapsed();
        }
        spent
    })
}

/// The floor: `n` sessions removed from a plain `HashMap` by id and
/// dropped, nothing else (no fence, no notice, no close).
fn time_hashmap(ids: &Ids, n: u64, iters: u64) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let first = ids.sessions(n);
        let router = ids.router();
        let mut map: HashMap<SessionId, Session> = HashMap::with_capacity(n as usize);
        let mut victims = Vec::with_capacity(n as usize);
        for i in 0..n {
            let id = SessionId::new(first + i);
            map.insert(
                id,
                NewSession::new(id, router, Incarnation::new(1)).into_session(),
            );
            victims.push(id);
        }
        let start = Instant::now();
        for id in &victims {
            black_box(map.remove(id));
        }
        spent += start.elapsed();
    }
    spent
}

const SIZES: [(&str, u64); 4] = [
    ("1k", 1_000),
    ("10k", 10_000),
    ("100k", 100_000),
    ("1m", 1_000_000),
];

fn delete(c: &mut Criterion, quick: bool) {
    let rt = runtime();
    let ids = Ids::default();
    let mut group = c.benchmark_group("delete");
    group.sample_size(10);
    for (label, n) in SIZES {
        if quick && n > 100_000 {
            continue;
        }
        if n >= 100_000 {
            // Each iteration is long: one per sample.
            group.sampling_mode(SamplingMode::Flat);
        }
        group.throughput(Throughput::Elements(n));
        let store = Arc::new(MemoryStore::new());
        for (name, from) in [("inline", Source::Inline), ("from_task", Source::Task)] {
            group.bench_function(
                BenchmarkId::new(format!("router_deleter_{name}"), label),
                |b| {
                    b.iter_custom(|iters| time_deleter(&rt, &store, &ids, (n, from, false), iters));
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("router_deleter_by_handle_{name}"), label),
                |b| {
                    b.iter_custom(|iters| time_deleter(&rt, &store, &ids, (n, from, true), iters));
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("baseline_sequential_{name}"), label),
                |b| {
                    b.iter_custom(|iters| {
                        time_sequential(&rt, &store, &ids, (n, from, Caller::Spawns), iters)
                    });
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("baseline_sequential_in_caller_{name}"), label),
                |b| {
                    b.iter_custom(|iters| {
                        time_sequential(&rt, &store, &ids, (n, from, Caller::Awaits), iters)
                    });
                },
            );
        }
        group.bench_function(BenchmarkId::new("floor_hashmap_remove", label), |b| {
            b.iter_custom(|iters| time_hashmap(&ids, n, iters));
        });
        let scan = Arc::new(ScanStore::default());
        group.bench_function(BenchmarkId::new("baseline_scan_spawn", label), |b| {
            b.iter_custom(|iters| time_scan_spawn(&rt, &scan, &ids, n, iters));
        });
    }
    group.finish();
}

fn delete_1k_among(c: &mut Criterion, quick: bool) {
    let rt = runtime();
    let ids = Ids::default();
    let mut group = c.benchmark_group("delete_1k_among");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1_000));
    for (label, n) in SIZES {
        if quick && n > 100_000 {
            continue;
        }
        let store = Arc::new(MemoryStore::new());
        let scan = Arc::new(ScanStore::default());
        rt.block_on(crowd(&store, n));
        scan.crowd(n);
        group.bench_function(BenchmarkId::new("router_deleter", label), |b| {
            b.iter_custom(|iters| {
                time_deleter(&rt, &store, &ids, (1_000, Source::Inline, false), iters)
            });
        });
        group.bench_function(BenchmarkId::new("router_deleter_by_handle", label), |b| {
            b.iter_custom(|iters| {
                time_deleter(&rt, &store, &ids, (1_000, Source::Inline, true), iters)
            });
        });
        group.bench_function(BenchmarkId::new("baseline_sequential", label), |b| {
            b.iter_custom(|iters| {
                let how = (1_000, Source::Inline, Caller::Spawns);
                time_sequential(&rt, &store, &ids, how, iters)
            });
        });
        group.bench_function(
            BenchmarkId::new("baseline_sequential_in_caller", label),
            |b| {
                b.iter_custom(|iters| {
                    let how = (1_000, Source::Inline, Caller::Awaits);
                    time_sequential(&rt, &store, &ids, how, iters)
                });
            },
        );
        group.bench_function(BenchmarkId::new("baseline_scan_spawn", label), |b| {
            b.iter_custom(|iters| time_scan_spawn(&rt, &scan, &ids, 1_000, iters));
        });
    }
    group.finish();
}

/// The longest the deletion of an `n`-session router kept a task beside it
/// from running, on a one-thread runtime.
fn longest_hold(n: u64, from: Source) -> (Duration, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let router = fill(&store, &Ids::default(), n).await;
        let deleter = deleter(&store, from);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bystander = tokio::spawn({
            let done = Arc::clone(&done);
            async move {
                let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
                while !done.load(Ordering::Relaxed) {
                    tokio::task::yield_now().await;
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                }
                longest
            }
        });
        tokio::task::yield_now().await;
        let start = Instant::now();
        let outcome = deleter.delete(router).await.expect("router deleted");
        let total = start.elapsed();
        black_box(outcome);
        done.store(true, Ordering::Relaxed);
        (bystander.await.expect("bystander"), total)
    })
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args()
}

fn main() {
    // `--test` (CI) runs each bench once; skip the 1M cases there.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let mut criterion = config();
    delete(&mut criterion, quick);
    delete_1k_among(&mut criterion, quick);
    criterion.final_summary();
    let n = if quick { 100_000 } else { 1_000_000 };
    for (name, from) in [("inline", Source::Inline), ("from_task", Source::Task)] {
        let (longest, total) = longest_hold(n, from);
        println!(
            "longest_hold/{name}/{n}: {:.3} ms (deletion {:.1} ms)",
            longest.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
    }
}
