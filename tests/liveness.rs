//! The liveness monitor under paused time: reaping within the configured
//! bound, no false convictions (drift, jitter and loss, stalls, probe
//! answers), batched probes per router, and bad input.

use std::sync::Arc;

use session_lifecycle::test_util::{Probe, Script, ScriptedProber, Subset, mix, within};
use session_lifecycle::{
    Backoff, BuildError, CloseReason, Event, EventBus, LivenessMonitor, MemoryStore, NewSession,
    Prober, ReclaimQueue, ResourceClass, RouterId, Session, SessionId, SessionStore,
    events::Subscription, liveness::HeartbeatError, liveness::LivenessEvent,
    liveness::LivenessMonitorBuilder, liveness::NoProbe, liveness::WatchError, session::Classed,
};
use tokio::time::{Duration, Instant};

type Monitor<Pr> = LivenessMonitor<MemoryStore, Pr>;

const SECOND: Duration = Duration::from_secs(1);

/// A store with `routers` routers of `per_router` sessions each, ids
/// `router * 1000 + i`.
async fn sessions(store: &MemoryStore, routers: u64, per_router: u64) -> Vec<Session> {
    let mut all = Vec::new();
    for r in 0..routers {
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

fn monitor<Pr: Prober>(
    builder: LivenessMonitorBuilder,
    store: &Arc<MemoryStore>,
    prober: Pr,
    watched: &[Session],
) -> Monitor<Pr> {
    let monitor = builder.build(Arc::clone(store), prober).unwrap();
    for session in watched {
        monitor.watch(session).unwrap();
    }
    monitor
}

/// A store of `routers × per_router` sessions, all watched by a monitor
/// from `builder` whose recording prober answers as told.
async fn recorded(
    builder: LivenessMonitorBuilder,
    routers: u64,
    per_router: u64,
    answer: Probe,
) -> (
    Arc<MemoryStore>,
    Vec<Session>,
    Arc<ScriptedProber>,
    Monitor<Arc<ScriptedProber>>,
) {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, routers, per_router).await;
    let prober = ScriptedProber::always(answer);
    let monitor = monitor(builder, &store, Arc::clone(&prober), &all);
    (store, all, prober, monitor)
}

/// Heartbeats `session` after each gap `gaps` yields, from a task; a
/// `None` gap is a lost heartbeat (the time passes, nothing is sent).
fn heartbeat_task<Pr: Prober>(
    monitor: &Monitor<Pr>,
    session: &Session,
    gaps: impl Iterator<Item = Option<Duration>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (monitor, session) = (monitor.clone(), session.clone());
    tokio::spawn(async move {
        for gap in gaps {
            let sent = gap.is_some();
            tokio::time::sleep(gap.unwrap_or(SECOND)).await;
            if sent && monitor.heartbeat(&session).is_err() {
                return;
            }
        }
    })
}

/// `builder` publishing on a bus of its own, and a subscription to it.
fn listened(builder: LivenessMonitorBuilder) -> (LivenessMonitorBuilder, Subscription) {
    let bus = EventBus::default();
    let events = bus.subscribe();
    (builder.events(bus), events)
}

/// The monitor's events received so far.
fn drain(events: &mut Subscription) -> Vec<LivenessEvent> {
    let mut out = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Liveness(event) = event {
            out.push(event);
        }
    }
    assert_eq!(events.lagged(), 0, "lost events");
    out
}

#[tokio::test(start_paused = true)]
async fn a_silent_session_is_reaped_within_the_configured_bound() {
    let (builder, mut events) = listened(LivenessMonitor::builder());
    let (store, all, prober, monitor) = recorded(builder, 1, 1, Probe::nobody()).await;
    let session = &all[0];

    for _ in 0..30 {
        tokio::time::sleep(SECOND).await;
        monitor.heartbeat(session).unwrap();
    }
    let silent_since = Instant::now();
    let timeout = monitor.timeout(session).unwrap();
    let bound = monitor.reap_bound(timeout);
    // Steady 1 s heartbeats: mean 1 s, the 50 ms granularity floor, and
    // the 1 s pause allowance.
    assert_eq!(timeout, Duration::from_millis(2_050));

    let reason = within(bound * 2, session.closed()).await;
    let took = silent_since.elapsed();
    assert_eq!(reason, CloseReason::LivenessTimeout);
    assert!(took <= bound, "reaped after {took:?}, bound {bound:?}");
    // Not before its timeout and its three silent probe rounds.
    assert!(took >= timeout + 3 * SECOND, "reaped early, after {took:?}");
    assert!(store.get(session.id()).await.unwrap().is_none());
    let stats = monitor.stats();
    assert_eq!((stats.reaped, stats.suspected, stats.probes), (1, 1, 3));
    assert_eq!((stats.watched, stats.suspects), (0, 0));
    assert_eq!(prober.calls_for(RouterId::new(0)), [1, 1, 1]);

    let events = drain(&mut events);
    assert!(
        matches!(
            &events[..],
            [
                LivenessEvent::SessionSuspect { sessions: s, router_silent: true, .. },
                LivenessEvent::ProbeFailed { round: 1, error: None, .. },
                LivenessEvent::ProbeFailed { round: 2, .. },
                LivenessEvent::ProbeFailed { round: 3, .. },
                LivenessEvent::SessionReaped { sessions: r, router_silent: true, .. },
            ] if s == &[session.id()] && r == &[session.id()]
        ),
        "{events:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_interval_drifting_from_one_to_five_seconds_is_never_suspected() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 1, 10).await;
    let monitor = monitor(LivenessMonitor::builder(), &store, NoProbe, &all);
    let tasks: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, session)| {
            // Phases differ per session; the interval grows 20 ms a beat
            // from 1 s to 5 s, then stays at 5 s.
            let phase = Duration::from_millis(97 * i as u64);
            let gaps = std::iter::once(Some(phase))
                .chain((0..=200).map(|k| Some(Duration::from_millis(1_000 + 20 * k))))
                .chain(std::iter::repeat_n(Some(5 * SECOND), 100));
            heartbeat_task(&monitor, session, gaps)
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = monitor.stats();
    assert_eq!((stats.suspected, stats.reaped), (0, 0), "{stats:?}");
    assert!(all.iter().all(|s| !s.is_closed()));
    assert!(monitor.timeout(&all[0]).unwrap() > 5 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn jitter_and_loss_over_an_hour_reap_nobody() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 4, 25).await;
    // Live routers answer probes, and lose 1 % of those answers too: each
    // answer drawn afresh on every call.
    let prober = ScriptedProber::new(Script::from_fn(|call| {
        Probe::Answer(Subset::PerMille {
            per_mille: 990,
            seed: mix(0x5eed ^ call.index),
        })
    }));
    let monitor = monitor(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all,
    );
    let mut lost = 0;
    let tasks: Vec<_> = all
        .iter()
        .map(|session| {
            let mut rng = fastrand::Rng::with_seed(session.id().get() + 1);
            // One hour of heartbeats 1 s ± 30 % apart; 1 % are lost.
            let gaps: Vec<_> = (0..3_600)
                .map(|_| {
                    let gap = Duration::from_millis(rng.u64(700..=1_300));
                    (rng.u32(..100) != 0).then_some(gap)
                })
                .collect();
            lost += gaps.iter().filter(|g| g.is_none()).count();
            heartbeat_task(&monitor, session, gaps.into_iter())
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = monitor.stats();
    assert!(lost > 3_000, "the run lost only {lost} heartbeats");
    assert_eq!(stats.reaped, 0, "{stats:?}");
    assert!(all.iter().all(|s| !s.is_closed()));
    // Suspects happen (two losses in a row) and are all spared by probes.
    assert_eq!(stats.suspected, stats.spared + stats.suspects, "{stats:?}");
    println!("{stats:?}, {lost} heartbeats lost");
}

/// `stall` long, nothing runs: neither the monitor nor the heartbeats.
async fn stall(stall: Duration) {
    tokio::time::advance(stall).await;
}

async fn run_with_stall(
    allowance: Duration,
    stalled: Duration,
) -> session_lifecycle::liveness::LivenessStats {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 2, 25).await;
    let (builder, mut events) = listened(LivenessMonitor::builder().pause_allowance(allowance));
    let monitor = monitor(builder, &store, NoProbe, &all);
    let tasks: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, session)| {
            let phase = Duration::from_millis(37 * i as u64);
            let gaps = std::iter::once(Some(phase)).chain(std::iter::repeat_n(Some(SECOND), 60));
            heartbeat_task(&monitor, session, gaps)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30_500)).await;
    stall(stalled).await;
    for task in tasks {
        task.await.unwrap();
    }
    let stats = monitor.stats();
    let events = drain(&mut events);
    let stalls = events
        .iter()
        .filter(|e| matches!(e, LivenessEvent::MonitorStalled { late_by } if *late_by >= stalled))
        .count();
    assert_eq!(stalls as u64, stats.stalls, "{events:?}");
    stats
}

#[tokio::test(start_paused = true)]
async fn stalls_of_the_controller_convict_nobody() {
    // As long as the pause allowance: the timeouts absorb it. Longer: the
    // local-health guard extends every deadline instead.
    for (stalled, guarded) in [(3 * SECOND, 0), (10 * SECOND, 1)] {
        let stats = run_with_stall(3 * SECOND, stalled).await;
        let got = (stats.suspected, stats.reaped, stats.stalls);
        assert_eq!(got, (0, 0, guarded), "{stalled:?}: {stats:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_answering_probes_is_never_reaped() {
    let (_, all, _, monitor) = recorded(LivenessMonitor::builder(), 1, 3, Probe::everyone()).await;
    // No heartbeat at all for ten minutes: only probe answers.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(all.iter().all(|s| !s.is_closed()));
    let stats = monitor.stats();
    assert_eq!(stats.reaped, 0);
    assert!(stats.spared >= 3 * 10, "{stats:?}");
    assert_eq!(stats.suspected, stats.spared + stats.suspects);
    // Answers do not feed the estimate: the timeout stays what the
    // heartbeat interval set.
    assert_eq!(monitor.timeout(&all[0]), Some(Duration::from_secs(4)));
}

/// Answers arrive later, as heartbeats by id, like frames off the wire.
// Kept: the kit's probers answer in the call's result, which does not feed the estimate.
struct Wire(tokio::sync::mpsc::UnboundedSender<Vec<SessionId>>);

impl Prober for Wire {
    async fn probe(
        &self,
        batch: session_lifecycle::ProbeBatch,
    ) -> Result<Vec<SessionId>, session_lifecycle::ProbeError> {
        self.0
            .send(batch.sessions)
            .map_err(|_| session_lifecycle::ProbeError::msg("router gone"))?;
        Ok(Vec::new())
    }
}

#[tokio::test(start_paused = true)]
async fn answers_arriving_as_heartbeats_before_the_probe_timeout_spare_the_session() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 1, 2).await;
    let (frames, mut wire) = tokio::sync::mpsc::unbounded_channel();
    let monitor = monitor(LivenessMonitor::builder(), &store, Wire(frames), &all);
    let answering = monitor.clone();
    tokio::spawn(async move {
        while let Some(ids) = wire.recv().await {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Only session 0 answers.
            for id in ids.into_iter().filter(|id| id.get() == 0) {
                answering.heartbeat_id(id).await.unwrap();
            }
        }
    });
    within(Duration::from_secs(60), all[1].closed()).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(!all[0].is_closed());
    let stats = monitor.stats();
    assert_eq!(stats.reaped, 1);
    // Answers by heartbeat feed the estimate: the long gaps widen session
    // 0's timeout, so it is suspected less and less often.
    assert!(stats.spared >= 3, "{stats:?}");
    assert!(monitor.timeout(&all[0]).unwrap() > Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn a_silent_router_is_probed_once_per_round_not_once_per_session() {
    let (builder, mut events) = listened(LivenessMonitor::builder());
    let (_, all, prober, monitor) = recorded(builder, 2, 50, Probe::nobody()).await;
    let tasks: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, session)| {
            // Router 0 goes silent after 20 s, router 1 beats for 60 s.
            let beats = if session.router() == RouterId::new(0) {
                20
            } else {
                60
            };
            let phase = Duration::from_millis(19 * (i as u64 % 50));
            let gaps = std::iter::once(Some(phase)).chain(std::iter::repeat_n(Some(SECOND), beats));
            heartbeat_task(&monitor, session, gaps)
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (dead, alive) = all.split_at(50);
    assert!(
        dead.iter()
            .all(|s| s.close_reason() == Some(CloseReason::LivenessTimeout))
    );
    assert!(alive.iter().all(|s| !s.is_closed()));
    let calls = prober.calls_for(RouterId::new(0));
    // One call per round: the first suspects' rounds, plus one more for
    // the stragglers that went suspect while the first round ran.
    assert!(calls.len() <= 3 + 1, "{calls:?}");
    assert_eq!(calls.iter().max(), Some(&50), "{calls:?}");
    assert!(prober.calls_for(RouterId::new(1)).is_empty());

    let events = drain(&mut events);
    let (suspects, reaped) = events.iter().fold((0, 0), |(s, r), e| match e {
        LivenessEvent::SessionSuspect { sessions, .. } => (s + sessions.len(), r),
        LivenessEvent::SessionReaped { sessions, .. } => (s, r + sessions.len()),
        _ => (s, r),
    });
    assert_eq!(suspects, 50);
    assert!(
        events.iter().any(|e| matches!(
            e,
            LivenessEvent::ProbeFailed { sessions, router_silent: true, .. } if sessions.len() == 50
        )),
        "{events:#?}"
    );
    assert_eq!(reaped, 50);
    assert!(events.iter().all(|e| match e {
        LivenessEvent::SessionSuspect { router, .. }
        | LivenessEvent::ProbeFailed { router, .. }
        | LivenessEvent::SessionReaped { router, .. } => *router == RouterId::new(0),
        _ => true,
    }));
    assert_eq!(monitor.stats().watched, 50);
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_counted_and_ignored_and_closed_sessions_leave_at_once() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 1, 3).await;
    let unwatched = &all[2];
    let prober = ScriptedProber::always(Probe::nobody());
    let monitor = monitor(
        LivenessMonitor::builder(),
        &store,
        Arc::clone(&prober),
        &all[..2],
    );

    assert!(matches!(
        monitor.heartbeat_id(SessionId::new(999)).await,
        Err(HeartbeatError::UnknownSession(id)) if id.get() == 999
    ));
    assert!(matches!(
        monitor.heartbeat(unwatched),
        Err(HeartbeatError::NotWatched(_))
    ));
    assert_eq!(
        monitor.watch(&all[0]),
        Err(WatchError::AlreadyWatched(all[0].id()))
    );
    let other = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    assert_eq!(
        other.watch(&all[0]),
        Err(WatchError::AlreadyWatched(all[0].id()))
    );
    assert!(matches!(
        other.heartbeat(&all[0]),
        Err(HeartbeatError::NotWatched(_))
    ));

    // A session closed by someone else: no probe, no reap, heartbeats
    // refused at once.
    let _ = store
        .close(all[1].id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    assert!(matches!(
        monitor.heartbeat(&all[1]),
        Err(HeartbeatError::Closed(_))
    ));
    assert!(matches!(
        monitor.heartbeat_id(all[1].id()).await,
        Err(HeartbeatError::UnknownSession(_))
    ));
    assert_eq!(monitor.watch(&all[1]), Err(WatchError::Closed(all[1].id())));
    for _ in 0..120 {
        tokio::time::sleep(SECOND).await;
        monitor.heartbeat(&all[0]).unwrap();
    }
    assert_eq!(prober.call_count(), 0);
    let stats = monitor.stats();
    assert_eq!((stats.suspected, stats.reaped), (0, 0));
    assert_eq!(stats.watched, 1, "the closed session left");
    // Unknown id, unwatched, closed, closed by id (removed from the store).
    assert_eq!(stats.ignored_heartbeats, 4);
    assert_eq!(other.stats().ignored_heartbeats, 1);
    assert_eq!(all[1].close_reason(), Some(CloseReason::ClientClosed));

    monitor.shutdown().await;
    assert!(matches!(
        monitor.heartbeat(&all[0]),
        Err(HeartbeatError::ShutDown)
    ));
    assert_eq!(monitor.watch(unwatched), Err(WatchError::ShutDown));
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!all[0].is_closed(), "a stopped monitor reaps nobody");
}

#[tokio::test(start_paused = true)]
async fn reaped_resources_go_through_the_reclaim_queue_once() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 1, 4).await;
    let released = Arc::new(parking_lot::Mutex::new(Vec::new()));
    for session in &all {
        for class in [ResourceClass::Low, ResourceClass::Critical] {
            let (released, id) = (Arc::clone(&released), session.id());
            session
                .attach(Classed::new(class, move |reason: CloseReason| {
                    released.lock().push((id, class, reason));
                }))
                .unwrap();
        }
    }
    let queue = ReclaimQueue::builder().build().unwrap();
    let builder = LivenessMonitor::builder().reclaim_queue(queue.clone());
    let monitor = monitor(builder, &store, NoProbe, &all);
    for session in &all {
        within(Duration::from_secs(60), session.closed()).await;
    }
    let released = released.lock().clone();
    assert_eq!(released.len(), 8, "{released:?}");
    assert!(
        released
            .iter()
            .all(|(_, _, r)| *r == CloseReason::LivenessTimeout)
    );
    // All four went suspect together: critical resources of all first.
    assert!(
        released[..4]
            .iter()
            .all(|(_, c, _)| *c == ResourceClass::Critical),
        "{released:?}"
    );
    assert_eq!(queue.stats().completed, 2 * 4);
    assert_eq!(monitor.stats().reaped, 4);
    assert!(store.is_empty());
}

#[tokio::test]
async fn settings_out_of_range_are_build_errors() {
    let store = Arc::new(MemoryStore::new());
    let refused = |builder: LivenessMonitorBuilder| {
        builder
            .build(Arc::clone(&store), NoProbe)
            .err()
            .and_then(|error| error.refused_setting())
    };
    let ms = Duration::from_millis;
    let day = Duration::from_secs(86_400);
    let cases = [
        (
            LivenessMonitor::builder().granularity(Duration::ZERO),
            "granularity",
        ),
        (
            LivenessMonitor::builder().timeout_range(ms(5_000), ms(1_000)),
            "timeout_range",
        ),
        (
            LivenessMonitor::builder().heartbeat_interval(ms(10)),
            "heartbeat_interval",
        ),
        (
            LivenessMonitor::builder().probe_timeout(Duration::ZERO),
            "probe_timeout",
        ),
        (
            LivenessMonitor::builder().pause_allowance(Duration::MAX),
            "pause_allowance",
        ),
        (
            LivenessMonitor::builder().probe_backoff(Backoff::new().delays(ms(2_000), ms(1_000))),
            "probe_backoff",
        ),
        (
            LivenessMonitor::builder().probe_backoff(Backoff::new().delays(ms(0), day + ms(1))),
            "probe_backoff",
        ),
    ];
    for (builder, setting) in cases {
        assert_eq!(refused(builder), Some(setting));
    }
    let backoff =
        |min, max| LivenessMonitor::builder().probe_backoff(Backoff::new().delays(min, max));
    assert!(refused(backoff(day, day)).is_none());
    assert!(refused(backoff(ms(0), ms(0))).is_none());
    // The longest probe timeout's default backoff (up to four of them) is
    // kept within a day.
    assert!(refused(LivenessMonitor::builder().probe_timeout(day)).is_none());
    assert!(refused(LivenessMonitor::builder()).is_none());
    let outside = std::thread::spawn(|| {
        LivenessMonitor::builder()
            .build(Arc::new(MemoryStore::new()), NoProbe)
            .err()
    });
    assert_eq!(
        outside.join().unwrap(),
        Some(BuildError::NoRuntime {
            piece: "LivenessMonitor"
        })
    );
}

/// `reap_bound` is the documented sum, term by term: the timeout, one tick,
/// one probe timeout for the round in flight, `1 + retries` rounds, every
/// backoff delay at its longest, and a millisecond per timer.
#[tokio::test]
async fn reap_bound_adds_up_its_terms() {
    let backoff = Backoff::new()
        .retries(3)
        .delays(Duration::from_millis(500), SECOND)
        .jitter(false);
    let monitor = LivenessMonitor::builder()
        .granularity(Duration::from_millis(10))
        .timeout_range(3 * SECOND, 3 * SECOND)
        .pause_allowance(Duration::ZERO)
        .probe_timeout(SECOND)
        .probe_backoff(backoff)
        .build(Arc::new(MemoryStore::new()), NoProbe)
        .unwrap();
    // 3 s timeout, a 10 ms tick, 1 s for a round in flight, 4 rounds of
    // 1 s, waits of 0.5 s, 1 s and 1 s, and 1 ms per timer (11).
    assert_eq!(
        monitor.reap_bound(3 * SECOND),
        Duration::from_millis(3_000 + 10 + 1_000 + 4_000 + 2_500 + 11)
    );
}

/// Issue #21.6: a silent router's round is split into probe calls of at
/// most `probe_batch_max` suspects; every suspect is still probed and
/// reaped within `reap_bound`.
#[tokio::test(start_paused = true)]
async fn a_big_silent_router_is_probed_in_capped_batches() {
    let builder = LivenessMonitor::builder().probe_batch_max(8);
    let (_, all, prober, monitor) = recorded(builder, 1, 50, Probe::nobody()).await;
    // Never heard: each session's timeout is its first one.
    let bound = monitor.reap_bound(monitor.timeout(&all[0]).unwrap());
    let started = Instant::now();
    for session in &all {
        within(bound, session.closed()).await;
    }
    assert!(started.elapsed() <= bound);
    assert!(
        all.iter()
            .all(|s| s.close_reason() == Some(CloseReason::LivenessTimeout))
    );
    let calls = prober.calls_for(RouterId::new(0));
    assert!(calls.iter().all(|&size| size <= 8), "{calls:?}");
    // The first round alone names all 50, in 7 calls.
    assert!(calls.iter().sum::<usize>() >= 50, "{calls:?}");
    assert!(
        LivenessMonitor::builder()
            .probe_batch_max(0)
            .build(Arc::new(MemoryStore::new()), NoProbe)
            .is_err()
    );
}

/// Times the current-thread runtime parked: each timer of the monitor's
/// that fires is one (a day-long sleep alone takes a few, one per level
/// of tokio's timer wheel).
fn parks() -> u64 {
    tokio::runtime::Handle::current()
        .metrics()
        .worker_park_count(0)
}

/// A monitor with nothing to watch rests: a paused day costs it no timer
/// (its runtime parked 4,752,000 times a day before, 11 s of real time in
/// a debug build: tests on a paused clock crawled). A session watched after
/// the rest starts from the time of its watch, not from the clock the
/// monitor last raised: it is not convicted at once, keeps its estimate
/// while it heartbeats, and is reaped within the bound once it stops; then
/// the monitor rests again.
#[tokio::test(start_paused = true)]
async fn an_unused_monitor_rests_and_wakes_on_a_watch() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 1, 1).await;
    let monitor = monitor(LivenessMonitor::builder(), &store, NoProbe, &[]);
    tokio::task::yield_now().await;
    let before = parks();
    tokio::time::sleep(Duration::from_secs(86_400)).await;
    let resting = parks() - before;
    assert!(
        resting <= 20,
        "an unused monitor parked {resting} times a day"
    );

    let session = &all[0];
    monitor.watch(session).unwrap();
    for _ in 0..30 {
        tokio::time::sleep(SECOND).await;
        monitor.heartbeat(session).unwrap();
    }
    assert_eq!(
        monitor.stats().suspected,
        0,
        "convicted from the stale clock"
    );
    assert_eq!(monitor.timeout(session), Some(Duration::from_millis(2_050)));
    let silent_since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(session).unwrap());
    let reason = within(bound * 2, session.closed()).await;
    assert_eq!(reason, CloseReason::LivenessTimeout);
    assert!(silent_since.elapsed() <= bound);
    assert_eq!(monitor.stats().watched, 0);

    // Resting again once the last session left.
    tokio::time::sleep(SECOND).await;
    let before = parks();
    tokio::time::sleep(Duration::from_secs(86_400)).await;
    let resting = parks() - before;
    assert!(
        resting <= 20,
        "the monitor parked {resting} times a day after its last session"
    );
}

/// A watch racing the monitor's decision to rest is never lost: sessions
/// watched from another thread, each right after the last one left, are
/// all reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_racing_the_monitor_going_to_rest_are_not_lost() {
    let store = Arc::new(MemoryStore::new());
    let all = sessions(&store, 1, 100).await;
    let monitor = monitor(
        LivenessMonitor::builder()
            .granularity(Duration::from_millis(1))
            .heartbeat_interval(Duration::from_millis(1))
            .timeout_range(Duration::from_millis(1), Duration::from_millis(2))
            // Not zero: on a loaded machine every tick would then count as a
            // stall of the controller, and no probe round would count.
            .pause_allowance(Duration::from_millis(20))
            .probe_retries(0)
            .probe_timeout(Duration::from_millis(1))
            .partition_guard(false),
        &store,
        NoProbe,
        &[],
    );
    for session in &all {
        monitor.watch(session).unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(10), session.closed())
            .await
            .unwrap_or_else(|_| panic!("a watched session is never reaped: {:?}", monitor.stats()));
        assert_eq!(reason, CloseReason::LivenessTimeout);
    }
    // The last reap is counted once its close returned: `shutdown` waits
    // for the probe driver that reaped it.
    tokio::time::timeout(Duration::from_secs(10), monitor.shutdown())
        .await
        .expect("shutdown hangs");
    assert_eq!(monitor.stats().reaped, 100);
}
