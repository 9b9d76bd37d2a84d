//! The liveness monitor as a controller replaces it and stalls during its
//! probe rounds (a review of stop 33; the first four tests failed before).
//!
//! - A monitor that shut down (or whose runtime went away) lets another
//!   watch its sessions: they could never be watched again, so never reaped.
//! - A stall whose end comes after a probe round's deadline but before the
//!   monitor's next tick does not count the round against anyone: with
//!   `probe_retries(0)`, a session that answered every probe was reaped.

use std::sync::Arc;

use session_lifecycle::liveness::NoProbe;
use session_lifecycle::{
    CloseReason, LivenessMonitor, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
};
use tokio::time::{Duration, Instant};

/// A controller replaces its liveness monitor (shutdown, then a new one,
/// e.g. to change its settings). The first says it watches nothing any
/// more (`stats().watched == 0`), and `AlreadyWatched` means "a monitor
/// (this one or another) watches it already": the new monitor must be able
/// to watch the sessions, or they are never reaped (zombies).
#[tokio::test(start_paused = true)]
async fn a_replacement_monitor_can_watch_the_sessions_of_a_shut_down_one() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let session = store
        .create(NewSession::new(SessionId::new(1), router, incarnation))
        .await
        .unwrap();
    let first = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    first.watch(&session).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.heartbeat(&session).unwrap();
    first.shutdown().await;
    assert_eq!(
        first.stats().watched,
        0,
        "the first monitor watches nothing"
    );
    drop(first);

    let second = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    assert_eq!(
        second.watch(&session),
        Ok(()),
        "no monitor watches the session, yet it cannot be watched again: it is never reaped"
    );
    let since = Instant::now();
    let bound = second.reap_bound(second.timeout(&session).unwrap());
    let reason = tokio::time::timeout(bound, session.closed()).await;
    assert_eq!(
        reason,
        Ok(CloseReason::LivenessTimeout),
        "not reaped within {bound:?} of {since:?}"
    );
}

use session_lifecycle::liveness::LivenessMonitorBuilder;
use session_lifecycle::test_util::{HOUR, within};
use session_lifecycle::{ProbeBatch, ProbeError, Prober, Session};

/// A prober whose answers come back as heartbeats by id on a wire (as
/// the `Prober` docs describe).
struct Wire(tokio::sync::mpsc::UnboundedSender<Vec<SessionId>>);

impl Prober for Wire {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        self.0
            .send(batch.sessions)
            .map_err(|_| ProbeError::msg("wire gone"))?;
        Ok(Vec::new())
    }
}

async fn open(store: &MemoryStore, router: u64, n: u64) -> Vec<Session> {
    let router = RouterId::new(router);
    let incarnation = store.register_router(router).await.unwrap();
    let mut all = Vec::new();
    for i in 0..n {
        all.push(
            store
                .create(NewSession::new(SessionId::new(i), router, incarnation))
                .await
                .unwrap(),
        );
    }
    all
}

/// The controller stalls (the runtime jumps 10 s, far beyond the 1 s
/// pause allowance) right after each probe call is sent, before the
/// router's answer is read; session 0 answers every probe at once,
/// session 1 never. Docs: "If the monitor's own tick runs late by more
/// than the pause allowance (the controller was paused or starved), it
/// extends every deadline by the stall instead of convicting anyone", and
/// a round the controller stalled in "does not count against anyone". So
/// session 0 is never reaped; session 1 is.
async fn stalls_during_probe_rounds(
    builder: LivenessMonitorBuilder,
    freeze_at: u64,
    answer_at: u64,
) {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0, 2).await;
    let (frames, mut wire) = tokio::sync::mpsc::unbounded_channel();
    let monitor = builder.build(Arc::clone(&store), Wire(frames)).unwrap();
    for s in &all {
        monitor.watch(s).unwrap();
    }
    let answering = monitor.clone();
    // The controller's frame handler: answers read off the socket are
    // handed to it over a channel (two hops, as a real reader does).
    let (handed, mut handler) = tokio::sync::mpsc::unbounded_channel::<SessionId>();
    let handler = tokio::spawn(async move {
        while let Some(id) = handler.recv().await {
            let _ = answering.heartbeat_id(id).await;
        }
    });
    let answers = tokio::spawn(async move {
        let mut stalls = 0;
        while let Some(ids) = wire.recv().await {
            if stalls < 20 {
                stalls += 1;
                // `freeze_at` ms after the probe the controller freezes for 10 s.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(freeze_at)).await;
                    tokio::time::advance(Duration::from_secs(10)).await;
                });
            }
            // The router answers `answer_at` ms after the probe (in the socket
            // during the freeze; read once the controller runs again).
            tokio::time::sleep(Duration::from_millis(answer_at)).await;
            for id in ids.into_iter().filter(|id| id.get() == 0) {
                let _ = handed.send(id);
            }
        }
    });
    within(HOUR, all[1].closed()).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let stats = monitor.stats();
    assert!(stats.stalls >= 1, "{stats:?}");
    assert!(
        !all[0].is_closed(),
        "a session answering every probe was reaped in a round the controller stalled in: {stats:?}"
    );
    assert_eq!(stats.reaped, 1, "{stats:?}");
    monitor.shutdown().await;
    answers.abort();
    handler.abort();
}

/// Control: the default granularity (50 ms) passes.
#[tokio::test(start_paused = true)]
async fn control_stalls_during_probe_rounds_default_granularity() {
    stalls_during_probe_rounds(LivenessMonitor::builder().probe_retries(0), 50, 100).await;
}

/// The same with a coarse tick (1 s, which `granularity` accepts) and a
/// probe timeout shorter than the tick.
#[tokio::test(start_paused = true)]
async fn stalls_during_probe_rounds_coarse_granularity() {
    stalls_during_probe_rounds(
        LivenessMonitor::builder()
            .granularity(Duration::from_secs(1))
            .probe_timeout(Duration::from_millis(500))
            .probe_retries(0),
        50,
        100,
    )
    .await;
}

/// The default settings (50 ms tick, 1 s probe timeout, 0 retries): the
/// controller freezes 10 ms before the probe timeout, the answer is in the
/// socket 5 ms before it.
#[tokio::test(start_paused = true)]
async fn stalls_just_before_the_probe_timeout_default_settings() {
    stalls_during_probe_rounds(LivenessMonitor::builder().probe_retries(0), 990, 995).await;
}

/// A probe timeout that is not a multiple of the tick (1025 ms; 50 ms
/// tick): the controller freezes at 1010 ms, after the last tick before
/// the timeout; the answer is in the socket at 1015 ms.
#[tokio::test(start_paused = true)]
async fn stalls_after_the_last_tick_before_the_probe_timeout() {
    stalls_during_probe_rounds(
        LivenessMonitor::builder()
            .probe_timeout(Duration::from_millis(1025))
            .probe_retries(0),
        1010,
        1015,
    )
    .await;
}

/// With the default 2 retries: three rounds, each frozen after its last tick.
#[tokio::test(start_paused = true)]
async fn stalls_after_the_last_tick_before_the_probe_timeout_default_retries() {
    stalls_during_probe_rounds(
        LivenessMonitor::builder().probe_timeout(Duration::from_millis(1025)),
        1010,
        1015,
    )
    .await;
}

/// Calls back into the monitor and the store from a `Drop`.
struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

type Cell = Arc<std::sync::OnceLock<(LivenessMonitor<MemoryStore, Hanging>, Session, Session)>>;

/// A prober that hangs forever; its future, when dropped, watches a new
/// session and heartbeats another through the monitor (re-entrancy, I8).
struct Hanging {
    cell: Cell,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

impl Prober for Hanging {
    async fn probe(&self, _batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        let cell = Arc::clone(&self.cell);
        let dropped = Arc::clone(&self.dropped);
        let _guard = OnDrop(Some(Box::new(move || {
            if let Some((monitor, fresh, other)) = cell.get() {
                let _ = monitor.watch(fresh);
                let _ = monitor.heartbeat(other);
                let _ = monitor.stats();
                let _ = monitor.timeout(other);
            }
            dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })));
        std::future::pending::<()>().await;
        unreachable!()
    }
}

/// Dropping the monitor's runtime while a probe hangs: the probe future
/// is dropped with the runtime and calls back into the monitor; no
/// panic, and the sessions the monitor held are let go (nothing leaked).
#[test]
fn dropping_the_runtime_mid_probe_with_a_reentrant_probe_drop() {
    for shutdown_first in [false, true] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let cell: Cell = Arc::default();
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (store, probed, weak) = rt.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let all = open(&store, 0, 3).await;
            let monitor = LivenessMonitor::builder()
                .build(
                    Arc::clone(&store),
                    Hanging {
                        cell: Arc::clone(&cell),
                        dropped: Arc::clone(&dropped),
                    },
                )
                .unwrap();
            monitor.watch(&all[0]).unwrap();
            monitor.watch(&all[1]).unwrap();
            let _ = cell.set((monitor.clone(), all[2].clone(), all[1].clone()));
            // all[0] falls silent and is probed; all[1] heartbeats.
            let probed = within(HOUR, async {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    monitor.heartbeat(&all[1]).unwrap();
                    if monitor.stats().probes > 0 {
                        break monitor.stats();
                    }
                }
            })
            .await;
            if shutdown_first {
                within(HOUR, monitor.shutdown()).await;
            }
            (store, probed, all[0].clone())
        });
        assert!(probed.suspects >= 1, "{probed:?}");
        drop(rt);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The monitor handle in the cell keeps it; drop it too.
        drop(cell);
        assert!(!weak.is_closed(), "nobody reaps after the runtime went");
        // The monitor's tasks went with its runtime: a monitor on another
        // runtime takes its sessions over.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let replacement = LivenessMonitor::builder()
                .build(Arc::clone(&store), NoProbe)
                .unwrap();
            assert_eq!(replacement.watch(&weak), Ok(()));
            replacement.shutdown().await;
        });
    }
}

use session_lifecycle::{NotifyError, RouterDeleter, TerminationBatch, TerminationNotifier};

struct Confirm(Arc<MemoryStore>);

impl TerminationNotifier for Confirm {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        for key in batch.sessions {
            let _ = self.0.close_exact(key, CloseReason::RouterDeleted).await;
        }
        Ok(())
    }
}

/// Churn: 6 routers × 20 sessions; a third beat, a third fall silent, a
/// third are closed by their clients at random; two routers are deleted
/// while their silent sessions are being probed; some ids are reused.
/// At the end every counter adds up: nothing watched, nothing suspect,
/// `reaped` = the sessions closed with `LivenessTimeout`, and
/// `suspected` ≥ `spared + reaped`.
#[tokio::test(start_paused = true)]
async fn counters_add_up_after_churn_deletions_and_reuse() {
    let store = Arc::new(MemoryStore::new());
    let bus = session_lifecycle::EventBus::new(1 << 12);
    let mut events = bus.subscribe();
    let monitor = LivenessMonitor::builder()
        .partition_min_routers(100)
        .events(bus)
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let deleter = RouterDeleter::new(Arc::clone(&store), Confirm(Arc::clone(&store)));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut all = Vec::new();
    let mut tasks = Vec::new();
    for r in 0..6u64 {
        let router = RouterId::new(r);
        let inc = store.register_router(router).await.unwrap();
        for i in 0..20u64 {
            let s = store
                .create(NewSession::new(SessionId::new(r * 100 + i), router, inc))
                .await
                .unwrap();
            monitor.watch(&s).unwrap();
            let kind = rand() % 3;
            let beats = rand() % 30;
            let (m, s2, st) = (monitor.clone(), s.clone(), Arc::clone(&store));
            tasks.push(tokio::spawn(async move {
                for _ in 0..beats {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    let _ = m.heartbeat(&s2);
                }
                match kind {
                    0 => loop {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        if m.heartbeat(&s2).is_err() {
                            break;
                        }
                    },
                    1 => {} // silent from now on
                    _ => {
                        let _ = st.close_exact(s2.key(), CloseReason::ClientClosed).await;
                        // Reuse the id at once, watched again.
                        if let Ok(n) = st
                            .create(NewSession::new(s2.id(), s2.router(), s2.incarnation()))
                            .await
                        {
                            let _ = m.watch(&n);
                            let _ = st.close_exact(n.key(), CloseReason::ClientClosed).await;
                        }
                    }
                }
            }));
            all.push(s);
        }
    }
    // Delete routers 0 and 1 while their silent sessions are probed.
    within(HOUR, async {
        while !matches!(
            events.recv().await,
            Some(session_lifecycle::Event::Liveness(
                session_lifecycle::LivenessEvent::SessionSuspect { .. }
            ))
        ) {}
    })
    .await;
    let _ = within(HOUR, deleter.delete(RouterId::new(0))).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let _ = within(HOUR, deleter.delete(RouterId::new(1))).await;
    // Stop the live ones: close every remaining open session's client
    // after 40 s; all then leave the monitor.
    tokio::time::sleep(Duration::from_secs(40)).await;
    for s in &all {
        let _ = store.close_exact(s.key(), CloseReason::ClientClosed).await;
    }
    for t in tasks {
        within(HOUR, t).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(120)).await;
    let stats = monitor.stats();
    let reaped = all
        .iter()
        .filter(|s| s.close_reason() == Some(CloseReason::LivenessTimeout))
        .count() as u64;
    assert_eq!(stats.watched, 0, "{stats:?}");
    assert_eq!(stats.suspects, 0, "{stats:?}");
    assert_eq!(stats.reaped, reaped, "{stats:?}");
    assert!(stats.suspected >= stats.spared + stats.reaped, "{stats:?}");
    assert!(reaped > 0 && stats.partitions == 0, "{stats:?}");
    assert!(store.audit().await.unwrap().is_clean());
}

/// Extreme but accepted settings: build quickly, and `reap_bound`
/// saturates instead of panicking.
#[tokio::test(start_paused = true)]
async fn extreme_accepted_settings_build_and_bound() {
    let day = Duration::from_secs(86_400);
    let started = std::time::Instant::now();
    let monitor = LivenessMonitor::builder()
        .granularity(Duration::from_millis(1))
        .heartbeat_interval(day)
        .timeout_range(Duration::from_millis(1), day)
        .pause_allowance(day)
        .probe_timeout(day)
        .probe_retries(u32::MAX)
        .probe_batch_max(usize::MAX)
        .partition_window(day)
        .partition_max_hold(Some(day))
        .build(Arc::new(MemoryStore::new()), NoProbe)
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(monitor.reap_bound(Duration::MAX), Duration::MAX);
    assert!(monitor.reap_bound(Duration::ZERO) >= day);
    let store = Arc::new(MemoryStore::new());
    let s = open(&store, 0, 1).await;
    let m2 = LivenessMonitor::builder()
        .granularity(Duration::from_millis(1))
        .timeout_range(Duration::from_millis(1), Duration::from_millis(1))
        .heartbeat_interval(Duration::from_millis(1))
        .pause_allowance(Duration::ZERO)
        .probe_timeout(Duration::from_millis(1))
        .probe_retries(0)
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    m2.watch(&s[0]).unwrap();
    let bound = m2.reap_bound(m2.timeout(&s[0]).unwrap());
    let since = Instant::now();
    within(HOUR, s[0].closed()).await;
    assert!(
        since.elapsed() <= bound,
        "{:?} > {bound:?}",
        since.elapsed()
    );
}
