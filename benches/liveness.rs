//! `LivenessMonitor`: the cost of a heartbeat, and the monitor's own CPU,
//! each next to baselines written here and measured in the same group.
//!
//! - `heartbeat/handle`: [`LivenessMonitor::heartbeat`] on one watched
//!   session, next to (a) `Session::record_in` (the traffic counters every
//!   packet already pays: two relaxed `fetch_add`) and (b) the naive
//!   controller's `Mutex<HashMap<SessionId, Instant>>` insert of
//!   `Instant::now()`, one key of a map of 10k. In a loop this tight the
//!   monitor's clock (one 50 ms tick) seldom moves between two calls, so
//!   nearly every call is the "heard this tick already" path (one
//!   `fetch_max`); the estimate update (a compare-exchange) runs once a
//!   tick. The same holds in groups 2 and 3.
//! - `heartbeat/id`: [`LivenessMonitor::heartbeat_id`] (a store look-up,
//!   then the heartbeat) over ids cycling through 100k watched sessions,
//!   next to a `DashMap<SessionId, Instant>` insert over the same ids.
//! - `heartbeat/2 threads`: two threads, each heartbeating its own 10k
//!   sessions in turn; wall time per heartbeat. Baseline: the same two
//!   threads on one `Mutex<HashMap>` (as in (b)).
//! - `monitor/1M sessions at 1 Hz`: the monitor's own CPU with 1,000,000
//!   watched sessions (100 routers × 10k), each heartbeating once a second
//!   (a second thread heartbeats 10k of them every 10 ms). The monitor runs
//!   alone on a current-thread runtime on its own thread, whose CPU time is
//!   read from `/proc/thread-self/schedstat` on that thread. An iteration
//!   is a window of wall time; the reported time per iteration is the
//!   monitor's CPU time in it per second of wall time, so "10 ms" means 1 %
//!   of one core (see `monitor_cpu` for how criterion is driven). The
//!   percent of a core and the timer fires per second are printed too.
//!   Baseline: the design the issue rejects, one
//!   `tokio_util::time::DelayQueue` entry per session, owned by a task on
//!   the same kind of thread, reset on every heartbeat received (as an id)
//!   through a `tokio::sync::mpsc` channel (fixed timeout 3 s). Both run at
//!   1M: on the 2-core machine the baseline keeps up (its owner thread near
//!   40 % of a core, the heartbeat thread on schedule), so no smaller
//!   variant is needed. `--test` runs both at 10k sessions, one short
//!   window each, no warm-up.
//!
//! In groups 1–3 the monitor runs (ticking) on a one-worker runtime while
//! its heartbeats are measured, and is shut down before the baselines run.
//!
//! `cargo bench --bench liveness`; Linux only (`/proc/thread-self`).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use dashmap::DashMap;
use futures::FutureExt;
use parking_lot::Mutex;
use session_lifecycle::{
    LivenessMonitor, MemoryStore, NewSession, RouterId, Session, SessionId, SessionStore,
    liveness::NoProbe,
};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_util::time::DelayQueue;

type Monitor = LivenessMonitor<MemoryStore, NoProbe>;

/// Sessions in the map of the `Mutex<HashMap>` baseline of group 1.
const MAP_SESSIONS: u64 = 10_000;
/// Watched sessions whose ids `heartbeat/id` cycles through.
const ID_SESSIONS: u64 = 100_000;
/// Sessions per thread in `heartbeat/2 threads`.
const PER_THREAD: u64 = 10_000;
/// Watched sessions in `monitor/*` (and in `--test` mode).
const MONITOR_SESSIONS: u64 = 1_000_000;
const TEST_SESSIONS: u64 = 10_000;
/// Routers the sessions of `monitor/*` belong to.
const ROUTERS: u64 = 100;
/// The heartbeat thread of `monitor/*` heartbeats `1 / SLOTS` of the
/// sessions every `SLOT`: each once per `SLOTS × SLOT` = 1 s.
const SLOT: Duration = Duration::from_millis(10);
const SLOTS: u64 = 100;
/// Wall time of one iteration (window) of the monitor; a sample is two.
/// At the default settings and 1 Hz its timer entries settle to coming up
/// every 2 s (the timeout, 2.05–2.5 s, re-armed from the last heartbeat),
/// and all sessions were watched at once, so the fires bunch into one half
/// of each 2 s: a sample of a whole period sees the average. In one probe
/// run 0.5 s windows read anywhere from 0.15 % to 2.1 % of a core.
const MONITOR_WINDOW: Duration = Duration::from_secs(1);
/// The baseline resets an entry per heartbeat: its load is even.
const BASELINE_WINDOW: Duration = Duration::from_millis(500);
/// Windows in `--test` mode.
const TEST_WINDOW: Duration = Duration::from_millis(200);
/// Wait before measuring the monitor: the first timeouts (about 4 s, from
/// the initial estimate) come up within it.
const MONITOR_WARM_UP: Duration = Duration::from_secs(5);
/// Wait before measuring the baseline: every entry reset once.
const BASELINE_WARM_UP: Duration = Duration::from_secs(2);
/// The baseline's fixed timeout: three heartbeat intervals.
const BASELINE_TIMEOUT: Duration = Duration::from_secs(3);

fn now<F: std::future::Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("MemoryStore resolves without waiting")
}

/// A one-worker runtime for the monitor of groups 1–3: it ticks (the
/// clock moves, timeouts come up) while heartbeats are measured.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// `routers × per_router` sessions with ids `first..`, router by router.
fn sessions(store: &MemoryStore, first: u64, routers: u64, per_router: u64) -> Vec<Session> {
    let mut sessions = Vec::with_capacity((routers * per_router) as usize);
    for r in 0..routers {
        let router = RouterId::new(first + r);
        let incarnation = now(store.register_router(router)).expect("fresh router");
        for i in 0..per_router {
            let id = SessionId::new(first + r * per_router + i);
            let spec = NewSession::new(id, router, incarnation);
            sessions.push(now(store.create(spec)).expect("live router"));
        }
    }
    sessions
}

/// A running monitor (on `runtime`) watching `sessions`.
fn watched(runtime: &Runtime, store: &Arc<MemoryStore>, sessions: &[Session]) -> Monitor {
    let _enter = runtime.enter();
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(store), NoProbe)
        .expect("inside a runtime");
    for session in sessions {
        monitor.watch(session).expect("open, unwatched");
    }
    monitor
}

/// Shuts the monitor down, checking that no heartbeat was ignored (a
/// measured heartbeat that failed would have measured the wrong path).
fn finish(runtime: &Runtime, monitor: &Monitor) {
    assert_eq!(
        monitor.stats().ignored_heartbeats,
        0,
        "{:?}",
        monitor.stats()
    );
    runtime.block_on(monitor.shutdown());
}

/// The naive controller's table: last heartbeat per session id.
fn instant_map(ids: impl Iterator<Item = u64>) -> Mutex<HashMap<SessionId, Instant>> {
    let start = Instant::now();
    Mutex::new(ids.map(|i| (SessionId::new(i), start)).collect())
}

fn heartbeat_handle(c: &mut Criterion, runtime: &Runtime) {
    let mut group = c.benchmark_group("heartbeat/handle");
    group.throughput(Throughput::Elements(1));
    let store = Arc::new(MemoryStore::new());
    let session = sessions(&store, 0, 1, 1).remove(0);
    let monitor = watched(runtime, &store, std::slice::from_ref(&session));
    group.bench_function("liveness_monitor", |b| {
        b.iter(|| monitor.heartbeat(black_box(&session)));
    });
    finish(runtime, &monitor);

    group.bench_function("baseline_record_in", |b| {
        b.iter(|| session.record_in(black_box(100)));
    });

    let map = instant_map(0..MAP_SESSIONS);
    let id = SessionId::new(MAP_SESSIONS / 2);
    group.bench_function("baseline_mutex_hashmap", |b| {
        b.iter(|| map.lock().insert(black_box(id), Instant::now()));
    });
    group.finish();
}

/// The full heartbeat path: a 1 ms monitor tick and 100k sessions beaten
/// in turn, so (a pass taking longer than a tick) nearly every heartbeat
/// finds its session last heard in an earlier tick and updates the
/// estimate (a `fetch_max` and a compare-exchange). Baseline:
/// `record_in` on the same sessions in the same order (the same cache
/// misses).
fn heartbeat_handle_each_tick(c: &mut Criterion, runtime: &Runtime) {
    let mut group = c.benchmark_group("heartbeat/handle, 100k sessions, new tick");
    group.throughput(Throughput::Elements(1));
    let store = Arc::new(MemoryStore::new());
    let sessions = sessions(&store, 0, 10, ID_SESSIONS / 10);
    let monitor = {
        let _enter = runtime.enter();
        LivenessMonitor::builder()
            .granularity(Duration::from_millis(1))
            .build(Arc::clone(&store), NoProbe)
            .expect("inside a runtime")
    };
    for session in &sessions {
        monitor.watch(session).expect("open, unwatched");
    }
    let mut next = 0;
    group.bench_function("liveness_monitor", |b| {
        b.iter(|| {
            let i = cycle(&mut next, ID_SESSIONS).get() as usize;
            monitor.heartbeat(black_box(&sessions[i]))
        });
    });
    finish(runtime, &monitor);
    let mut next = 0;
    group.bench_function("baseline_record_in", |b| {
        b.iter(|| {
            let i = cycle(&mut next, ID_SESSIONS).get() as usize;
            sessions[i].record_in(black_box(100));
        });
    });
    group.finish();
}

/// The next id of `0..n`, in turn.
fn cycle(next: &mut u64, n: u64) -> SessionId {
    let id = SessionId::new(*next);
    *next += 1;
    if *next == n {
        *next = 0;
    }
    id
}

fn heartbeat_id(c: &mut Criterion, runtime: &Runtime) {
    let mut group = c.benchmark_group("heartbeat/id");
    group.throughput(Throughput::Elements(1));
    let store = Arc::new(MemoryStore::new());
    let sessions = sessions(&store, 0, 10, ID_SESSIONS / 10);
    let monitor = watched(runtime, &store, &sessions);
    let mut next = 0;
    group.bench_function("liveness_monitor", |b| {
        b.iter(|| {
            monitor
                .heartbeat_id(cycle(&mut next, ID_SESSIONS))
                .now_or_never()
        });
    });
    finish(runtime, &monitor);
    drop(sessions);

    let start = Instant::now();
    let map: DashMap<SessionId, Instant> = (0..ID_SESSIONS)
        .map(|i| (SessionId::new(i), start))
        .collect();
    let mut next = 0;
    group.bench_function("baseline_dashmap", |b| {
        b.iter(|| map.insert(cycle(&mut next, ID_SESSIONS), Instant::now()));
    });
    group.finish();
}

/// Runs `iters` heartbeats split over two threads, each calling `beat` on
/// its own `PER_THREAD` indexes in turn (thread `t` gets `t·PER_THREAD..`);
/// the wall time of the whole.
fn two_threads(iters: u64, beat: impl Fn(usize) + Sync) -> Duration {
    let per_thread = iters.div_ceil(2);
    let beat = &beat;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..2 {
            scope.spawn(move || {
                let first = (t * PER_THREAD) as usize;
                let mut i = 0;
                for _ in 0..per_thread {
                    beat(first + i);
                    i += 1;
                    if i == PER_THREAD as usize {
                        i = 0;
                    }
                }
            });
        }
    });
    start.elapsed()
}

fn heartbeat_two_threads(c: &mut Criterion, runtime: &Runtime) {
    let mut group = c.benchmark_group("heartbeat/2 threads");
    group.throughput(Throughput::Elements(1));
    let store = Arc::new(MemoryStore::new());
    let sessions = sessions(&store, 0, 2, PER_THREAD);
    let monitor = watched(runtime, &store, &sessions);
    group.bench_function("liveness_monitor", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |i| {
                let _ = black_box(monitor.heartbeat(&sessions[i]));
            })
        });
    });
    finish(runtime, &monitor);
    drop(sessions);

    let map = instant_map(0..2 * PER_THREAD);
    group.bench_function("baseline_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |i| {
                black_box(map.lock().insert(SessionId::new(i as u64), Instant::now()));
            })
        });
    });
    group.finish();
}

/// Nanoseconds the calling thread has been on a CPU: the first field of
/// `/proc/thread-self/schedstat`.
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("/proc/thread-self/schedstat (Linux)");
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .expect("schedstat starts with the time on CPU");
    Duration::from_nanos(ns)
}

/// Asks a runtime thread for its own CPU time: a task on that thread
/// ([`answer_cpu`]) reads it and replies.
struct CpuProbe(UnboundedSender<std::sync::mpsc::SyncSender<Duration>>);

impl CpuProbe {
    fn read(&self) -> Duration {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.0.send(reply).expect("runtime thread running");
        answer.recv().expect("an answer")
    }
}

/// Answers [`CpuProbe`] requests until every probe is dropped.
async fn answer_cpu(mut requests: UnboundedReceiver<std::sync::mpsc::SyncSender<Duration>>) {
    while let Some(reply) = requests.recv().await {
        let _ = reply.send(thread_cpu());
    }
}

/// A current-thread runtime (everything enabled) for a thread of its own.
fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Calls `beat(i)` for every `i < n` once per second, spread evenly: the
/// next `n / SLOTS` every `SLOT`, paced against the real-time schedule,
/// until `stop`. Returns how late against the schedule it ever ran.
fn pace(n: u64, stop: &AtomicBool, mut beat: impl FnMut(u64)) -> Duration {
    let chunk = n.div_ceil(SLOTS);
    let start = Instant::now();
    let mut latest = Duration::ZERO;
    let mut k: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = start + SLOT * k;
        let at = Instant::now();
        if due > at {
            std::thread::sleep(due - at);
        } else {
            latest = latest.max(at - due);
        }
        let slot = u64::from(k) % SLOTS;
        for i in slot * chunk..((slot + 1) * chunk).min(n) {
            beat(i);
        }
        k += 1;
    }
    latest
}

/// One design under load: its owner thread, the heartbeat thread, and
/// what was measured so far.
struct Rig {
    name: &'static str,
    sessions: u64,
    probe: CpuProbe,
    stop: Arc<AtomicBool>,
    pacer: JoinHandle<Duration>,
    owner: JoinHandle<String>,
    /// Timer work done so far: the monitor's timer fires, the baseline's
    /// resets.
    work: Box<dyn Fn() -> u64>,
    work_name: &'static str,
    window: Duration,
    cpu: Duration,
    wall: Duration,
    done: u64,
    /// The lowest and highest share of a core seen in one window.
    range: (f64, f64),
}

impl Rig {
    /// The monitor, default settings, on its own current-thread runtime.
    fn monitor(sessions: u64, test: bool) -> Self {
        let store = Arc::new(MemoryStore::new());
        let (ready, started) = std::sync::mpsc::channel();
        let owner = std::thread::Builder::new()
            .name("monitor".into())
            .spawn({
                let store = Arc::clone(&store);
                move || {
                    current_thread().block_on(async move {
                        let monitor = LivenessMonitor::builder()
                            .build(store, NoProbe)
                            .expect("inside a runtime");
                        let (probe, requests) = unbounded_channel();
                        ready
                            .send((monitor.clone(), CpuProbe(probe)))
                            .expect("bench waiting");
                        answer_cpu(requests).await;
                        let stats = monitor.stats();
                        monitor.shutdown().await;
                        format!("{stats:?}")
                    })
                }
            })
            .expect("a thread");
        let (monitor, probe) = started.recv().expect("monitor started");
        let all = self::sessions(&store, 0, ROUTERS, sessions / ROUTERS);
        for session in &all {
            monitor.watch(session).expect("open, unwatched");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pacer = std::thread::spawn({
            let (monitor, stop) = (monitor.clone(), Arc::clone(&stop));
            move || {
                pace(all.len() as u64, &stop, |i| {
                    let _ = monitor.heartbeat(&all[i as usize]);
                })
            }
        });
        Self::new(
            "liveness_monitor",
            sessions,
            probe,
            stop,
            pacer,
            owner,
            Box::new(move || monitor.stats().timer_fires),
            "timer fires",
            if test {
                (Duration::ZERO, TEST_WINDOW)
            } else {
                (MONITOR_WARM_UP, MONITOR_WINDOW)
            },
        )
    }

    /// The rejected design: a `DelayQueue` entry per session, reset on every
    /// heartbeat received through a channel, on its own current-thread
    /// runtime.
    fn delay_queue(sessions: u64, test: bool) -> Self {
        let (heartbeats, mut received) = unbounded_channel::<SessionId>();
        let resets = Arc::new(AtomicU64::new(0));
        let (ready, started) = std::sync::mpsc::channel();
        let owner = std::thread::Builder::new()
            .name("delay_queue".into())
            .spawn({
                let resets = Arc::clone(&resets);
                move || {
                    current_thread().block_on(async move {
                        let mut queue = DelayQueue::with_capacity(sessions as usize);
                        let mut keys = HashMap::with_capacity(sessions as usize);
                        for i in 0..sessions {
                            let id = SessionId::new(i);
                            keys.insert(id, queue.insert(id, BASELINE_TIMEOUT));
                        }
                        let (probe, requests) = unbounded_channel();
                        tokio::spawn(answer_cpu(requests));
                        ready.send(CpuProbe(probe)).expect("bench waiting");
                        let mut batch = Vec::with_capacity(1_024);
                        let mut expired = 0u64;
                        loop {
                            tokio::select! {
                                n = received.recv_many(&mut batch, 1_024) => {
                                    if n == 0 {
                                        break;
                                    }
                                    for id in batch.drain(..) {
                                        if let Some(key) = keys.get(&id) {
                                            queue.reset(key, BASELINE_TIMEOUT);
                                        }
                                    }
                                    resets.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Some(entry) = std::future::poll_fn(|cx| queue.poll_expired(cx)) => {
                                    keys.remove(entry.get_ref());
                                    expired += 1;
                                }
                            }
                        }
                        format!("expired: {expired}")
                    })
                }
            })
            .expect("a thread");
        let probe = started.recv().expect("owner started");
        let stop = Arc::new(AtomicBool::new(false));
        let pacer = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                pace(sessions, &stop, |i| {
                    heartbeats.send(SessionId::new(i)).expect("owner running");
                })
            }
        });
        Self::new(
            "baseline_delay_queue",
            sessions,
            probe,
            stop,
            pacer,
            owner,
            Box::new(move || resets.load(Ordering::Relaxed)),
            "resets",
            if test {
                (Duration::ZERO, TEST_WINDOW)
            } else {
                (BASELINE_WARM_UP, BASELINE_WINDOW)
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        sessions: u64,
        probe: CpuProbe,
        stop: Arc<AtomicBool>,
        pacer: JoinHandle<Duration>,
        owner: JoinHandle<String>,
        work: Box<dyn Fn() -> u64>,
        work_name: &'static str,
        (warm_up, window): (Duration, Duration),
    ) -> Self {
        std::thread::sleep(warm_up);
        Self {
            name,
            sessions,
            probe,
            stop,
            pacer,
            owner,
            work,
            work_name,
            window,
            cpu: Duration::ZERO,
            wall: Duration::ZERO,
            done: 0,
            range: (f64::INFINITY, 0.0),
        }
    }

    /// `iters` windows: the owner's CPU time per second of wall time in
    /// them, times `iters`.
    fn measure(&mut self, iters: u64) -> Duration {
        let windows = u32::try_from(iters).expect("a few windows");
        let (cpu, work, start) = (self.probe.read(), (self.work)(), Instant::now());
        std::thread::sleep(self.window * windows);
        let wall = start.elapsed();
        let cpu = self.probe.read() - cpu;
        self.done += (self.work)() - work;
        self.cpu += cpu;
        self.wall += wall;
        let share = cpu.as_secs_f64() / wall.as_secs_f64();
        self.range = (self.range.0.min(share), self.range.1.max(share));
        Duration::from_secs_f64(share * iters as f64)
    }

    /// Stops both threads and prints what was measured.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let late = self.pacer.join().expect("heartbeat thread");
        drop(self.probe);
        let owner = self.owner.join().expect("owner thread");
        let wall = self.wall.as_secs_f64();
        eprintln!(
            "{}: {} sessions: owner thread on CPU {:.2} % of one core \
             (calls of 1–2 × {:?}: {:.2}–{:.2} %), {:.0} {}/s, over {wall:.1} s measured; \
             heartbeat thread at most {late:?} behind schedule; {owner}",
            self.name,
            self.sessions,
            100.0 * self.cpu.as_secs_f64() / wall,
            self.window,
            100.0 * self.range.0,
            100.0 * self.range.1,
            self.done as f64 / wall,
            self.work_name,
        );
    }
}

fn monitor_cpu(c: &mut Criterion) {
    let test = std::env::args().any(|a| a == "--test");
    let sessions = if test {
        TEST_SESSIONS
    } else {
        MONITOR_SESSIONS
    };
    let mut group = c.benchmark_group("monitor/1M sessions at 1 Hz");
    // An iteration is one window of wall time (1 s for the monitor, 0.5 s
    // for the baseline); it returns the owner thread's CPU time per second
    // of wall in it. Criterion 0.8 sizes iteration counts by the WALL time
    // a call of the routine takes (`Bencher::iter_custom` times the call),
    // not by the time returned; statistics use the time returned. So: a
    // warm-up of 1 ms is one window (the rig warms up on its own before);
    // then 10 flat samples, and a measurement time of 15 windows makes
    // ceil(1.5) = 2 windows per sample (1 would print criterion's "unable
    // to complete" warning): 21 windows per design, ~21 s + ~7 s setup for
    // the monitor, ~11 s + ~3 s for the baseline.
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1));
    for (name, start, window) in [
        (
            "liveness_monitor",
            Rig::monitor as fn(u64, bool) -> Rig,
            MONITOR_WINDOW,
        ),
        ("baseline_delay_queue", Rig::delay_queue, BASELINE_WINDOW),
    ] {
        group.measurement_time(window * 15);
        let mut rig = None;
        group.bench_function(name, |b| {
            let rig = rig.get_or_insert_with(|| start(sessions, test));
            b.iter_custom(|iters| rig.measure(iters));
        });
        if let Some(rig) = rig {
            rig.finish();
        }
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let runtime = runtime();
    heartbeat_handle(&mut criterion, &runtime);
    heartbeat_handle_each_tick(&mut criterion, &runtime);
    heartbeat_id(&mut criterion, &runtime);
    heartbeat_two_threads(&mut criterion, &runtime);
    drop(runtime);
    monitor_cpu(&mut criterion);
    criterion.final_summary();
}
