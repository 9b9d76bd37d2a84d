//! Adversarial tests of the liveness monitor: identity races (id reuse,
//! two monitors, concurrent closes), hostile probers (re-entrant, panicking,
//! hanging, lying), heartbeat intervals that jump, stalls of the runtime,
//! partition-guard edges, router holds and shutdown racing everything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use session_lifecycle::test_util::{HOUR, Probe, Script, ScriptedProber, Subset, within};
use session_lifecycle::{
    CloseReason, Event, EventBus, LivenessMonitor, MemoryStore, NewSession, ProbeBatch, ProbeError,
    Prober, RouterId, Session, SessionId, SessionStore, liveness::HeartbeatError,
    liveness::LivenessMonitorBuilder, liveness::NoProbe, liveness::WatchError,
};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

type Monitor<Pr> = LivenessMonitor<MemoryStore, Pr>;

const SECOND: Duration = Duration::from_secs(1);

/// Registers `routers` routers with `per_router` sessions each, ids
/// `router * 1000 + i`.
async fn open(store: &MemoryStore, routers: std::ops::Range<u64>, per_router: u64) -> Vec<Session> {
    let mut all = Vec::new();
    for r in routers {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        for i in 0..per_router {
            let id = SessionId::new(r * 1_000 + i);
            all.push(
                store
                    .create(NewSession::new(id, router, incarnation))
                    .await
                    .unwrap(),
            );
        }
    }
    all
}

/// Builds a monitor from `builder` and watches `sessions`.
fn watched<Pr: Prober>(
    builder: LivenessMonitorBuilder,
    store: &Arc<MemoryStore>,
    prober: Pr,
    sessions: &[Session],
) -> Monitor<Pr> {
    let monitor = builder.build(Arc::clone(store), prober).unwrap();
    for session in sessions {
        monitor.watch(session).unwrap();
    }
    monitor
}

/// Heartbeats `session` every `every` until it is closed or the monitor
/// refuses, from a task.
fn beating<Pr: Prober>(
    monitor: &Monitor<Pr>,
    session: &Session,
    every: Duration,
) -> JoinHandle<()> {
    let (monitor, session) = (monitor.clone(), session.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if monitor.heartbeat(&session).is_err() {
                return;
            }
        }
    })
}

/// Waits for `session` to be closed by the monitor within `bound` from
/// `since`, and checks it was a liveness timeout.
async fn reaped_within(session: &Session, since: Instant, bound: Duration) {
    let reason = within(bound * 4 + SECOND, session.closed()).await;
    let took = since.elapsed();
    assert_eq!(reason, CloseReason::LivenessTimeout, "{:?}", session.id());
    assert!(
        took <= bound,
        "{:?} reaped after {took:?}, reap_bound {bound:?}",
        session.id()
    );
}

/// A second monitor refuses a session another one watches and ignores its
/// heartbeats; the first still reaps it within its bound.
#[tokio::test(start_paused = true)]
async fn a_session_watched_by_one_monitor_is_refused_by_another() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 1).await;
    let session = &all[0];
    let first = watched(LivenessMonitor::builder(), &store, NoProbe, &all);
    let second = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    assert_eq!(
        second.watch(session),
        Err(WatchError::AlreadyWatched(session.id()))
    );
    assert_eq!(
        first.watch(session),
        Err(WatchError::AlreadyWatched(session.id()))
    );
    let since = Instant::now();
    let bound = first.reap_bound(first.timeout(session).unwrap());
    // The second monitor's heartbeats must not keep it alive.
    let other = second.clone();
    let beats = {
        let session = session.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            while !session.is_closed() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match other.heartbeat(&session) {
                    Err(HeartbeatError::NotWatched(_)) => refused += 1,
                    Err(HeartbeatError::Closed(_)) => break,
                    other => panic!("second monitor took a heartbeat: {other:?}"),
                }
            }
            refused
        })
    };
    reaped_within(session, since, bound).await;
    assert!(beats.await.unwrap() > 5);
    assert_eq!(first.stats().reaped, 1);
    assert_eq!(second.stats().reaped, 0);
    assert_eq!(second.timeout(session), None);
}

/// Id reuse: heartbeats through the old life's handle are refused and do
/// not keep the new life alive; `heartbeat_id` acts on whatever life the
/// store holds (as documented), and once it stops, the new life is reaped
/// within its bound.
#[tokio::test(start_paused = true)]
async fn heartbeats_for_an_old_life_do_not_keep_a_reused_id_alive() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let id = SessionId::new(7);
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let old = store
        .create(NewSession::new(id, router, incarnation))
        .await
        .unwrap();
    monitor.watch(&old).unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _ = store.close(id, CloseReason::ClientClosed).await.unwrap();
    let new = store
        .create(NewSession::new(id, router, incarnation))
        .await
        .unwrap();
    monitor.watch(&new).unwrap();

    // The old life's handle keeps heartbeating: always refused.
    let refused = {
        let (monitor, old) = (monitor.clone(), old.clone());
        tokio::spawn(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                assert!(matches!(
                    monitor.heartbeat(&old),
                    Err(HeartbeatError::Closed(i)) if i == id
                ));
            }
        })
    };
    // For 20 s the new life heartbeats by id: alive.
    for _ in 0..20 {
        tokio::time::sleep(SECOND).await;
        monitor.heartbeat_id(id).await.unwrap();
    }
    assert!(!new.is_closed());
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(&new).unwrap());
    reaped_within(&new, since, bound).await;
    assert_eq!(old.close_reason(), Some(CloseReason::ClientClosed));
    assert!(matches!(
        monitor.heartbeat_id(id).await,
        Err(HeartbeatError::UnknownSession(i)) if i == id
    ));
    refused.await.unwrap();
    let stats = monitor.stats();
    assert_eq!(stats.reaped, 1, "{stats:?}");
    assert!(stats.ignored_heartbeats >= 200, "{stats:?}");
}

/// Sessions closed by someone else right after `watch`, and while they are
/// being probed, leave the monitor without a reap and keep their reason.
#[tokio::test(start_paused = true)]
async fn sessions_closed_while_watched_or_probed_are_never_reaped() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 4).await;
    let probed = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&probed);
    let prober = ScriptedProber::always(Probe::nobody());
    let monitor = watched(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all,
    );
    // Closed in the same instant as the watch.
    let _ = all[0].close(CloseReason::ClientClosed);
    let _ = store
        .close(all[1].id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    // Closed once their first probe call was made.
    let (a, b) = (all[4].clone(), all[5].clone());
    let closer = tokio::spawn(async move {
        while prober.calls_for(RouterId::new(1)).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.lock().unwrap().push(Instant::now());
        let _ = a.close(CloseReason::RouterDeleted);
        let _ = b.close(CloseReason::Reclaimed);
    });
    within(HOUR, closer).await.unwrap();
    assert_eq!(probed.lock().unwrap().len(), 1);
    // Everything else is silent: reaped.
    for session in [&all[2], &all[3], &all[6], &all[7]] {
        within(Duration::from_secs(60), session.closed()).await;
    }
    tokio::time::sleep(Duration::from_secs(120)).await;
    let reasons: Vec<_> = all.iter().map(|s| s.close_reason().unwrap()).collect();
    use CloseReason::*;
    assert_eq!(
        reasons,
        [
            ClientClosed,
            ClientClosed,
            LivenessTimeout,
            LivenessTimeout,
            RouterDeleted,
            Reclaimed,
            LivenessTimeout,
            LivenessTimeout
        ]
    );
    let stats = monitor.stats();
    assert_eq!(
        (stats.reaped, stats.watched, stats.suspects),
        (4, 0, 0),
        "{stats:?}"
    );
}

/// A prober that calls back into the monitor from inside `probe`: answers
/// by `heartbeat_id` for even ids, watches a new session, holds and
/// releases a router, reads stats. No deadlock; odd ids are reaped within
/// their bound, even ids never.
struct Reentrant {
    monitor: OnceLock<Monitor<Arc<Reentrant>>>,
    store: Arc<MemoryStore>,
    next: std::sync::atomic::AtomicU64,
}

impl Prober for Reentrant {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        let monitor = self.monitor.get().expect("set").clone();
        let _ = monitor.stats();
        monitor.hold_router(RouterId::new(99));
        for id in &batch.sessions {
            if id.get() % 2 == 0 {
                monitor.heartbeat_id(*id).await.unwrap();
            }
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fresh = self
            .store
            .create(NewSession::new(
                SessionId::new(50_000 + n),
                batch.router,
                batch.incarnation,
            ))
            .await
            .map_err(|e| ProbeError::msg(e.to_string()))?;
        monitor.watch(&fresh).unwrap();
        let _ = fresh.close(CloseReason::ClientClosed);
        monitor.release_router(RouterId::new(99));
        Ok(Vec::new())
    }
}

/// See [`Reentrant`].
#[tokio::test(start_paused = true)]
async fn a_prober_reentering_the_monitor_neither_deadlocks_nor_misjudges() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 4).await;
    let prober = Arc::new(Reentrant {
        monitor: OnceLock::new(),
        store: Arc::clone(&store),
        next: 0.into(),
    });
    let monitor = watched(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all,
    );
    assert!(prober.monitor.set(monitor.clone()).is_ok());
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(&all[0]).unwrap());
    for odd in all.iter().filter(|s| s.id().get() % 2 == 1) {
        reaped_within(odd, since, bound).await;
    }
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(
        all.iter()
            .filter(|s| s.id().get() % 2 == 0)
            .all(|s| !s.is_closed())
    );
    assert!(!monitor.is_held(RouterId::new(99)));
    let stats = monitor.stats();
    assert_eq!(stats.reaped, 4, "{stats:?}");
    assert!(stats.spared >= 4 * 3, "{stats:?}");
    within(SECOND, monitor.shutdown()).await;
}

/// A prober that shuts the monitor down from inside `probe` does not hang
/// it: the call is dropped with the round, and shutdown completes.
struct ShutsDown(OnceLock<Monitor<Arc<ShutsDown>>>);

impl Prober for ShutsDown {
    async fn probe(&self, _batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        let monitor = self.0.get().expect("set").clone();
        monitor.shutdown().await;
        Ok(Vec::new())
    }
}

/// See [`ShutsDown`].
#[tokio::test(start_paused = true)]
async fn a_prober_shutting_the_monitor_down_does_not_deadlock() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 2).await;
    let prober = Arc::new(ShutsDown(OnceLock::new()));
    let monitor = watched(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all,
    );
    assert!(prober.0.set(monitor.clone()).is_ok());
    // Wait until the probe has shut the monitor down.
    within(Duration::from_secs(30), async {
        while monitor.heartbeat(&all[0]).is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    within(SECOND, monitor.shutdown()).await;
    tokio::time::sleep(HOUR).await;
    assert!(all.iter().all(|s| !s.is_closed()), "reaped after shutdown");
    assert!(matches!(
        monitor.heartbeat(&all[1]),
        Err(HeartbeatError::ShutDown)
    ));
}

/// A lying, panicking, hanging prober: router 1's calls panic, hang, fail,
/// or answer with router 2's ids, unknown ids and duplicates, never its own;
/// router 2's calls answer every one of its suspects twice. Router 1's
/// sessions are reaped within their bound; router 2's never.
#[tokio::test(start_paused = true)]
async fn a_hostile_prober_neither_spares_the_dead_nor_convicts_the_answered() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 1..3, 5).await;
    struct Hostile(std::sync::atomic::AtomicU64);
    impl Prober for Hostile {
        async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
            let call = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if batch.router == RouterId::new(2) {
                let mut twice = batch.sessions.clone();
                twice.extend(batch.sessions);
                return Ok(twice);
            }
            match call % 4 {
                0 => panic!("prober panics on purpose"),
                1 => std::future::pending().await,
                2 => Err(ProbeError::msg("router 1 unreachable")),
                _ => {
                    // Ids of router 2, unknown ids, and duplicates of them.
                    let mut lies: Vec<_> = (2_000..2_005).map(SessionId::new).collect();
                    lies.extend((0..5).map(|i| SessionId::new(77_000 + i)));
                    lies.extend(lies.clone());
                    Ok(lies)
                }
            }
        }
    }
    let monitor = watched(
        LivenessMonitor::builder().probe_retries(3),
        &store,
        Hostile(0.into()),
        &all,
    );
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(&all[0]).unwrap());
    for dead in &all[..5] {
        reaped_within(dead, since, bound).await;
    }
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(all[5..].iter().all(|s| !s.is_closed()));
    let stats = monitor.stats();
    assert_eq!(stats.reaped, 5, "{stats:?}");
    assert!(stats.probe_errors >= 3, "{stats:?}");
}

/// Heartbeats that start fast (100 ms), then slow down by 10 % a beat up
/// to 40 s (a 400-fold slowdown, gradual as documented): the adaptive
/// timeout widens in step and the session is never even suspected. A
/// second session slows by 3 % a beat; a third jumps once to a gap just
/// inside the timeout in force, then stays there.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_slowing_gradually_from_100_ms_to_40_s_is_never_suspected() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 3).await;
    let monitor = watched(LivenessMonitor::builder(), &store, NoProbe, &all);
    let done = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, session)| {
            let (monitor, session) = (monitor.clone(), session.clone());
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    monitor.heartbeat(&session).unwrap();
                }
                let mut gap = Duration::from_millis(100);
                if i == 2 {
                    // The timeout in force, less two ticks for the clock's
                    // staleness: accepted, then kept.
                    gap = monitor.timeout(&session).unwrap() - Duration::from_millis(100);
                }
                for _ in 0..250 {
                    gap = match i {
                        0 => (gap * 11 / 10).min(Duration::from_secs(40)),
                        1 => (gap * 103 / 100).min(Duration::from_secs(40)),
                        _ => gap,
                    };
                    tokio::time::sleep(gap).await;
                    monitor.heartbeat(&session).unwrap();
                }
                // Keeps its last gap until every session is done.
                let last = gap;
                while !done.load(Ordering::Relaxed) {
                    tokio::time::sleep(gap).await;
                    monitor.heartbeat(&session).unwrap();
                }
                last
            })
        })
        .collect();
    // Session 0 takes longest: about 2 h of paused time.
    within(HOUR * 3, async {
        while monitor.timeout(&all[0]).unwrap() < Duration::from_secs(40) {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    })
    .await;
    tokio::time::sleep(HOUR * 2).await;
    // Judged while everyone still heartbeats.
    let stats = monitor.stats();
    assert_eq!((stats.suspected, stats.reaped), (0, 0), "{stats:?}");
    assert!(all.iter().all(|s| !s.is_closed()));
    assert!(monitor.timeout(&all[0]).unwrap() > Duration::from_secs(40));
    done.store(true, Ordering::Relaxed);
    for (i, task) in tasks.into_iter().enumerate() {
        let last = task.await.unwrap();
        if i < 2 {
            assert_eq!(last, Duration::from_secs(40), "session {i}");
        }
    }
}

/// A prober whose answers come back as heartbeats by id, 300 ms after the
/// call, on a wire: and the controller stalls (the runtime jumps 10 s)
/// after every probe call is sent, before the answer. The local-health
/// guard must not count those rounds: a session answering every probe is
/// never reaped.
struct Wire(tokio::sync::mpsc::UnboundedSender<Vec<SessionId>>);

impl Prober for Wire {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        self.0
            .send(batch.sessions)
            .map_err(|_| ProbeError::msg("wire gone"))?;
        Ok(Vec::new())
    }
}

/// See [`Wire`].
#[tokio::test(start_paused = true)]
async fn a_stall_during_every_probe_round_never_convicts_a_session_that_answers() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 2).await;
    let (frames, mut wire) = tokio::sync::mpsc::unbounded_channel();
    let monitor = watched(LivenessMonitor::builder(), &store, Wire(frames), &all);
    let answering = monitor.clone();
    let answers = tokio::spawn(async move {
        let mut stalls = 0;
        while let Some(ids) = wire.recv().await {
            if stalls < 20 {
                stalls += 1;
                tokio::time::advance(Duration::from_secs(10)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            // Only session 0 answers.
            for id in ids.into_iter().filter(|id| id.get() == 0) {
                let _ = answering.heartbeat_id(id).await;
            }
        }
    });
    within(HOUR, all[1].closed()).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let stats = monitor.stats();
    assert!(
        !all[0].is_closed(),
        "an answering session was reaped: {stats:?}"
    );
    assert_eq!(stats.reaped, 1, "{stats:?}");
    assert!(stats.stalls >= 1, "{stats:?}");
    monitor.shutdown().await;
    answers.abort();
}

/// The runtime stalls 30 s in one jump while sessions heartbeat every
/// second and a dead one is being probed: no live session is convicted,
/// and the dead one is reaped within its bound counted from the end of
/// the stall.
#[tokio::test(start_paused = true)]
async fn a_stall_in_one_jump_convicts_nobody_and_the_dead_are_reaped_after_it() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 5).await;
    let monitor = watched(LivenessMonitor::builder(), &store, NoProbe, &all);
    let dead = &all[0];
    let beats: Vec<_> = all[1..]
        .iter()
        .map(|s| beating(&monitor, s, SECOND))
        .collect();
    // Into the dead session's probe rounds.
    within(HOUR, async {
        while monitor.stats().suspects == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(!dead.is_closed());
    let bound = monitor.reap_bound(monitor.timeout(dead).unwrap());
    tokio::time::advance(Duration::from_secs(30)).await;
    let since = Instant::now();
    reaped_within(dead, since, bound).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let stats = monitor.stats();
    assert!(all[1..].iter().all(|s| !s.is_closed()), "{stats:?}");
    assert_eq!((stats.reaped, stats.suspected), (1, 1), "{stats:?}");
    assert!(stats.stalls >= 1, "{stats:?}");
    monitor.shutdown().await;
    for beat in beats {
        beat.await.unwrap();
    }
}

/// Four routers go silent together (a partition): the guard holds and
/// reaps nobody. Then six healthy routers join: the silent share drops to
/// 4/10, at the threshold or below; the guard lifts, and the silent
/// sessions are reaped within their bound counted from the lift.
#[tokio::test(start_paused = true)]
async fn routers_joining_while_the_guard_holds_lift_it_then_the_silent_are_reaped() {
    let store = Arc::new(MemoryStore::new());
    let silent = open(&store, 0..4, 2).await;
    let healthy = open(&store, 10..16, 2).await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let monitor = watched(
        LivenessMonitor::builder().events(bus).partition_share(0.4),
        &store,
        NoProbe,
        &silent,
    );
    let timeout = monitor.timeout(&silent[0]).unwrap();
    let engaged = within(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Some(Event::PartitionSuspected { .. }) => break,
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
    });
    engaged.await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        silent.iter().all(|s| !s.is_closed()),
        "reaped during the hold"
    );
    // Exactly at the share once they join: 4 of 10 is not more than 0.4.
    for session in &healthy {
        monitor.watch(session).unwrap();
    }
    let beats: Vec<_> = healthy
        .iter()
        .map(|s| beating(&monitor, s, SECOND))
        .collect();
    let lifted = within(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Some(Event::PartitionEnded { expired, .. }) => break expired,
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
    })
    .await;
    assert!(!lifted, "lifted by the share, not by expiry");
    let since = Instant::now();
    let bound = monitor.reap_bound(timeout);
    for session in &silent {
        reaped_within(session, since, bound).await;
    }
    assert!(healthy.iter().all(|s| !s.is_closed()));
    monitor.shutdown().await;
    for beat in beats {
        beat.await.unwrap();
    }
}

/// `hold_router` taken while a suspect is in its last probe round spares it
/// for as long as the hold lasts; after `release_router` the still silent
/// session is reaped within its bound counted from the release.
#[tokio::test(start_paused = true)]
async fn a_hold_spares_a_suspect_mid_probe_and_its_release_reaps_within_the_bound() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 1).await;
    let session = &all[0];
    let prober = ScriptedProber::new(Script::always(Probe::Slow {
        delay: Duration::from_millis(900),
        answer: Subset::None,
    }));
    let monitor = watched(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all,
    );
    let router = RouterId::new(0);
    within(HOUR, async {
        while prober.calls_for(router).len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // In the third (last) round.
    monitor.hold_router(router);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!session.is_closed(), "reaped while its router was held");
    monitor.release_router(router);
    assert!(!monitor.is_held(router));
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(session).unwrap());
    reaped_within(session, since, bound).await;
}

/// Shutdown racing a hanging probe round, heartbeats and watches: it
/// returns at once, nothing is reaped after it, every later call is
/// refused, and a second shutdown is harmless.
#[tokio::test(start_paused = true)]
async fn shutdown_racing_a_hanging_round_and_heartbeats_stops_everything() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 3).await;
    let prober = ScriptedProber::always(Probe::Never);
    let monitor = watched(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all,
    );
    let beats: Vec<_> = all[3..]
        .iter()
        .map(|s| beating(&monitor, s, SECOND))
        .collect();
    within(HOUR, async {
        while prober.calls_for(RouterId::new(0)).len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let late = store
        .create(NewSession::new(
            SessionId::new(900),
            RouterId::new(1),
            all[3].incarnation(),
        ))
        .await
        .unwrap();
    // A watch racing the shutdown: accepted before it, or refused after.
    let racer = {
        let monitor = monitor.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            monitor.watch(&late)
        })
    };
    within(SECOND, monitor.shutdown()).await;
    within(SECOND, monitor.shutdown()).await;
    assert!(matches!(
        racer.await.unwrap(),
        Ok(()) | Err(WatchError::ShutDown)
    ));
    for beat in beats {
        within(SECOND * 2, beat).await.unwrap();
    }
    tokio::time::sleep(HOUR).await;
    assert!(all.iter().all(|s| !s.is_closed()), "reaped after shutdown");
    assert!(matches!(
        monitor.heartbeat(&all[3]),
        Err(HeartbeatError::ShutDown)
    ));
    let stats = monitor.stats();
    assert_eq!(
        (stats.watched, stats.suspects, stats.reaped),
        (0, 0, 0),
        "{stats:?}"
    );
}

/// Five of eight routers go silent together: the guard holds. Then three of
/// the silent routers are deleted (their sessions closed by someone else):
/// two silent of eight voters is at the share or below, so the guard lifts
/// and the two still silent routers are reaped within their bound counted
/// from the lift, while the deleted sessions keep their own reason.
#[tokio::test(start_paused = true)]
async fn silent_routers_leaving_while_the_guard_holds_lift_it() {
    let store = Arc::new(MemoryStore::new());
    let silent = open(&store, 0..5, 2).await;
    let healthy = open(&store, 10..13, 2).await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let all: Vec<_> = silent.iter().chain(&healthy).cloned().collect();
    let monitor = watched(
        LivenessMonitor::builder().events(bus),
        &store,
        NoProbe,
        &all,
    );
    let beats: Vec<_> = healthy
        .iter()
        .map(|s| beating(&monitor, s, SECOND))
        .collect();
    let timeout = monitor.timeout(&silent[0]).unwrap();
    within(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Some(Event::PartitionSuspected { .. }) => break,
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        silent.iter().all(|s| !s.is_closed()),
        "reaped during the hold"
    );
    // Routers 0, 1 and 2 are deleted.
    for session in &silent[..6] {
        let _ = store
            .close(session.id(), CloseReason::RouterDeleted)
            .await
            .unwrap();
    }
    let expired = within(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Some(Event::PartitionEnded { expired, .. }) => break expired,
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
    })
    .await;
    assert!(!expired, "lifted by the share, not by expiry");
    let since = Instant::now();
    let bound = monitor.reap_bound(timeout);
    for session in &silent[6..] {
        reaped_within(session, since, bound).await;
    }
    assert!(
        silent[..6]
            .iter()
            .all(|s| s.close_reason() == Some(CloseReason::RouterDeleted))
    );
    assert!(healthy.iter().all(|s| !s.is_closed()));
    monitor.shutdown().await;
    for beat in beats {
        beat.await.unwrap();
    }
}

/// A round split into one-suspect calls (`probe_batch_max(1)`) where the
/// calls for odd ids hang and those for even ids answer: the hanging calls
/// neither hold up nor void the answers, evens are never reaped, odds are
/// reaped within their bound.
#[tokio::test(start_paused = true)]
async fn hanging_calls_of_a_split_round_do_not_void_the_answered_ones() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 6).await;
    struct Split;
    impl Prober for Split {
        async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
            assert_eq!(batch.sessions.len(), 1);
            if batch.sessions[0].get() % 2 == 1 {
                std::future::pending::<()>().await;
            }
            Ok(batch.sessions)
        }
    }
    let monitor = watched(
        LivenessMonitor::builder().probe_batch_max(1),
        &store,
        Split,
        &all,
    );
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(&all[0]).unwrap());
    for odd in all.iter().filter(|s| s.id().get() % 2 == 1) {
        reaped_within(odd, since, bound).await;
    }
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        all.iter()
            .filter(|s| s.id().get() % 2 == 0)
            .all(|s| !s.is_closed())
    );
    let stats = monitor.stats();
    assert_eq!(stats.reaped, 3, "{stats:?}");
}
