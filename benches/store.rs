//! `MemoryStore` throughput and footprint.
//!
//! - `create_close/*`: one create + one close (through the `SessionStore`
//!   trait) per element, on 1 and 2 threads, next to the same on a
//!   `MemoryStore` erased into a `BoxStore` (`box_store`: what the boxed
//!   calls cost) and a baseline written here: the same store shape behind
//!   one global mutex.
//! - Bytes per session: measured with a counting global allocator at 1M
//!   sessions (1,000 routers × 1,000 sessions) and printed before the
//!   criterion groups run.
//!
//! `cargo bench --bench store`

use std::alloc::System;
use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cap::Cap;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use futures::FutureExt;
use parking_lot::Mutex;
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, RouterId, Session, SessionId, SessionStore,
    store::BoxStore,
};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

fn now<F: std::future::Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("MemoryStore resolves without waiting")
}

/// The baseline: the same data behind one global mutex.
#[derive(Default)]
struct GlobalMutexStore {
    inner: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    sessions: HashMap<SessionId, Session>,
    index: HashMap<RouterId, HashSet<SessionId>>,
}

impl GlobalMutexStore {
    fn register(&self, router: RouterId) {
        self.inner.lock().index.insert(router, HashSet::new());
    }

    fn create(&self, id: SessionId, router: RouterId) -> Session {
        let session = NewSession::new(id, router, Incarnation::new(1)).into_session();
        let mut inner = self.inner.lock();
        if let Some(index) = inner.index.get_mut(&router) {
            index.insert(id);
        }
        inner.sessions.insert(id, session.clone());
        session
    }

    fn close(&self, id: SessionId) {
        let session = self.inner.lock().sessions.get(&id).cloned();
        if let Some(session) = session {
            let _ = session.close(CloseReason::ClientClosed);
            let mut inner = self.inner.lock();
            inner.sessions.remove(&id);
            if let Some(index) = inner.index.get_mut(&session.router()) {
                index.remove(&id);
            }
        }
    }
}

trait Cycle: Send + Sync {
    fn setup(&self, router: RouterId) -> Incarnation;
    fn create(&self, id: SessionId, router: RouterId, incarnation: Incarnation);
    fn cycle(&self, id: SessionId, router: RouterId, incarnation: Incarnation);
}

/// Any store through the `SessionStore` trait: `MemoryStore`, and the same
/// erased into a `BoxStore`.
impl<S: SessionStore<Payload = ()>> Cycle for S {
    fn setup(&self, router: RouterId) -> Incarnation {
        now(self.register_router(router)).expect("fresh router")
    }

    fn create(&self, id: SessionId, router: RouterId, incarnation: Incarnation) {
        let spec = NewSession::new(id, router, incarnation);
        black_box(now(SessionStore::create(self, spec)).expect("live router"));
    }

    fn cycle(&self, id: SessionId, router: RouterId, incarnation: Incarnation) {
        Cycle::create(self, id, router, incarnation);
        let _ = now(self.close(id, CloseReason::ClientClosed));
    }
}

impl Cycle for GlobalMutexStore {
    fn setup(&self, router: RouterId) -> Incarnation {
        self.register(router);
        Incarnation::new(1)
    }

    fn create(&self, id: SessionId, router: RouterId, _: Incarnation) {
        black_box(GlobalMutexStore::create(self, id, router));
    }

    fn cycle(&self, id: SessionId, router: RouterId, incarnation: Incarnation) {
        Cycle::create(self, id, router, incarnation);
        self.close(id);
    }
}

/// Runs `iters` cycles split over `threads` threads, each on its own router
/// with a few background sessions so the maps are not trivially empty.
fn run<S: Cycle + 'static>(store: &Arc<S>, threads: u64, iters: u64, ids: &AtomicU64) -> Duration {
    let per_thread = iters.div_ceil(threads);
    let routers: Vec<_> = (0..threads)
        .map(|_| {
            let router = RouterId::new(ids.fetch_add(1, Ordering::Relaxed));
            (router, store.setup(router))
        })
        .collect();
    let base = ids.fetch_add(iters + threads, Ordering::Relaxed);
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for (t, (router, incarnation)) in routers.into_iter().enumerate() {
            let store = Arc::clone(store);
            scope.spawn(move || {
                let first = base + t as u64 * per_thread;
                for i in 0..per_thread {
                    store.cycle(SessionId::new(first + i), router, incarnation);
                }
            });
        }
    });
    start.elapsed()
}

fn create_close(c: &mut Criterion) {
    let mut group = c.benchmark_group("create_close");
    group.throughput(Throughput::Elements(1));
    let ids = AtomicU64::new(1 << 40);
    for threads in [1u64, 2] {
        let store = Arc::new(MemoryStore::new());
        prefill(&*store, 100_000);
        group.bench_function(BenchmarkId::new("memory_store", threads), |b| {
            b.iter_custom(|iters| run(&store, threads, iters, &ids));
        });
        // The same kind of store behind a `BoxStore`: a boxed future and a
        // virtual call per store call.
        let boxed = Arc::new(BoxStore::new(MemoryStore::new()));
        prefill(&*boxed, 100_000);
        group.bench_function(BenchmarkId::new("box_store", threads), |b| {
            b.iter_custom(|iters| run(&boxed, threads, iters, &ids));
        });
        let baseline = Arc::new(GlobalMutexStore::default());
        prefill(&*baseline, 100_000);
        group.bench_function(BenchmarkId::new("baseline_global_mutex", threads), |b| {
            b.iter_custom(|iters| run(&baseline, threads, iters, &ids));
        });
    }
    group.finish();
}

fn prefill<S: Cycle>(store: &S, sessions: u64) {
    for r in 0..100 {
        let router = RouterId::new(r);
        let incarnation = store.setup(router);
        for i in 0..sessions / 100 {
            let id = SessionId::new(r * 1_000_000 + i);
            store.create(id, router, incarnation);
        }
    }
}

/// Bytes per session at `routers × per_router` sessions, and what is left
/// once they are all closed.
fn footprint(routers: u64, per_router: u64) {
    let store = MemoryStore::new();
    let before = ALLOC.allocated();
    let mut incarnations = Vec::new();
    for r in 0..routers {
        incarnations.push(now(store.register_router(RouterId::new(r))).expect("fresh router"));
    }
    let after_routers = ALLOC.allocated();
    for r in 0..routers {
        for i in 0..per_router {
            let id = SessionId::new(r * per_router + i);
            let spec = NewSession::new(id, RouterId::new(r), incarnations[r as usize]);
            drop(now(SessionStore::create(&store, spec)).expect("live router"));
        }
    }
    let total = routers * per_router;
    let with_sessions = ALLOC.allocated();
    for id in 0..total {
        let _ = now(store.close(SessionId::new(id), CloseReason::ClientClosed));
    }
    store.shrink_to_fit();
    let after_close = ALLOC.allocated();
    println!(
        "footprint: {total} sessions on {routers} routers: {:.1} bytes/session \
         (routers: {} bytes; after closing all and shrink_to_fit: {} bytes above the empty store)",
        (with_sessions - after_routers) as f64 / total as f64,
        after_routers - before,
        after_close.saturating_sub(before),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = create_close
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    if !quick {
        footprint(1_000, 1_000);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
