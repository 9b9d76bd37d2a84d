//! The liveness monitor's partition guard, under paused time: a
//! controller-side partition reaps nobody, while dead routers (one among
//! many, most of a small fleet, or a mass death outlasting the maximum
//! hold) are still reaped within their bound.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use session_lifecycle::test_util::within;
use session_lifecycle::{
    BuildError, CloseReason, Event, EventBus, Lifecycle, LivenessMonitor, MemoryStore, NewSession,
    NotifyError, ProbeBatch, ProbeError, Prober, RouterId, Session, SessionId, SessionStore,
    TerminationBatch, TerminationNotifier, events::Subscription, liveness::LivenessMonitorBuilder,
};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);

type Monitor = LivenessMonitor<MemoryStore, Arc<Fleet>>;

/// The routers as the controller sees them: each heartbeats and answers
/// probes unless it is dead or the controller's own network is cut.
#[derive(Default)]
struct Fleet {
    /// The controller's network is down: nothing gets through, and probe
    /// calls hang until their timeout.
    partitioned: AtomicBool,
    /// Routers that neither heartbeat nor answer (their calls fail).
    dead: Mutex<HashSet<RouterId>>,
    /// Probe calls, per router.
    probes: Mutex<HashMap<RouterId, usize>>,
}

impl Fleet {
    fn reachable(&self, router: RouterId) -> bool {
        !self.partitioned.load(Ordering::Relaxed) && !self.dead.lock().unwrap().contains(&router)
    }

    fn partition(&self, cut: bool) {
        self.partitioned.store(cut, Ordering::Relaxed);
    }

    fn kill(&self, router: RouterId) {
        self.dead.lock().unwrap().insert(router);
    }

    fn revive(&self, router: RouterId) {
        self.dead.lock().unwrap().remove(&router);
    }

    fn probes_of(&self, router: RouterId) -> usize {
        self.probes
            .lock()
            .unwrap()
            .get(&router)
            .copied()
            .unwrap_or(0)
    }
}

impl Prober for Fleet {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        *self.probes.lock().unwrap().entry(batch.router).or_default() += 1;
        if self.partitioned.load(Ordering::Relaxed) {
            // Lost on the way: the monitor's probe timeout ends the call.
            std::future::pending::<()>().await;
        }
        if self.reachable(batch.router) {
            Ok(batch.sessions)
        } else {
            Err(ProbeError::msg("router unreachable"))
        }
    }
}

/// A notifier for `Lifecycle`; nothing is deleted here.
struct Quiet;

impl TerminationNotifier for Quiet {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// `routers × per_router` sessions, ids `router * 1000 + i`.
async fn open(store: &MemoryStore, routers: u64, per_router: u64) -> Vec<Session> {
    let mut all = Vec::new();
    for r in 0..routers {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        for i in 0..per_router {
            let id = SessionId::new(r * 1_000 + i);
            let new = NewSession::new(id, router, incarnation);
            all.push(store.create(new).await.unwrap());
        }
    }
    all
}

/// A monitor from `builder` publishing on a bus of its own, over
/// `routers × per_router` watched sessions.
async fn watched(
    builder: LivenessMonitorBuilder,
    routers: u64,
    per_router: u64,
) -> (Monitor, Vec<Session>, Arc<Fleet>, Subscription) {
    let store = Arc::new(MemoryStore::new());
    let fleet = Arc::new(Fleet::default());
    let bus = EventBus::new(1 << 16);
    let events = bus.subscribe();
    let monitor = builder
        .events(bus)
        .build(Arc::clone(&store), Arc::clone(&fleet))
        .unwrap();
    let sessions = open(&store, routers, per_router).await;
    for session in &sessions {
        monitor.watch(session).unwrap();
    }
    (monitor, sessions, fleet, events)
}

/// Every session of a reachable router heartbeats once a second.
fn heartbeats(monitor: &Monitor, sessions: &[Session], fleet: &Arc<Fleet>) -> JoinHandle<()> {
    heartbeats_every(monitor, sessions, fleet, SECOND)
}

/// Every session of a reachable router heartbeats once per `interval`.
fn heartbeats_every(
    monitor: &Monitor,
    sessions: &[Session],
    fleet: &Arc<Fleet>,
    interval: Duration,
) -> JoinHandle<()> {
    let (monitor, sessions, fleet) = (monitor.clone(), sessions.to_vec(), Arc::clone(fleet));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            for session in &sessions {
                if fleet.reachable(session.router()) {
                    let _ = monitor.heartbeat(session);
                }
            }
        }
    })
}

/// The next `PartitionSuspected` or `PartitionEnded` on the bus.
async fn partition_event(events: &mut Subscription) -> Event {
    loop {
        match events.recv().await {
            Some(event @ (Event::PartitionSuspected { .. } | Event::PartitionEnded { .. })) => {
                return event;
            }
            Some(_) => {}
            None => panic!("the bus closed"),
        }
    }
}

/// The partition events received so far.
fn partition_events(events: &mut Subscription) -> Vec<Event> {
    let mut seen = Vec::new();
    while let Some(event) = events.try_recv() {
        if matches!(
            event,
            Event::PartitionSuspected { .. } | Event::PartitionEnded { .. }
        ) {
            seen.push(event);
        }
    }
    assert_eq!(events.lagged(), 0, "lost events");
    seen
}

fn of(sessions: &[Session], router: RouterId) -> Vec<Session> {
    sessions
        .iter()
        .filter(|s| s.router() == router)
        .cloned()
        .collect()
}

/// The longest any of `sessions` may take to be reaped, from its last
/// heartbeat.
fn bound(monitor: &Monitor, sessions: &[Session]) -> Duration {
    sessions
        .iter()
        .filter_map(|s| monitor.timeout(s))
        .map(|timeout| monitor.reap_bound(timeout))
        .max()
        .unwrap()
}

/// Awaits the close of every session in `dead`: each by the monitor.
async fn reaped(dead: &[Session], limit: Duration) {
    for session in dead {
        let reason = within(limit, session.closed()).await;
        assert_eq!(reason, CloseReason::LivenessTimeout);
    }
}

#[tokio::test(start_paused = true)]
async fn a_controller_side_partition_of_30_s_reaps_nobody() {
    let store = Arc::new(MemoryStore::new());
    let fleet = Arc::new(Fleet::default());
    // Through `Lifecycle`, with the monitor's defaults: the guard is on.
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Quiet)
        .prober(Arc::clone(&fleet))
        .events(EventBus::new(1 << 16))
        .without_sweeper()
        .build()
        .unwrap();
    let monitor = lifecycle.liveness().clone();
    let mut events = lifecycle.subscribe();
    let sessions = open(&store, 100, 3).await;
    for session in &sessions {
        monitor.watch(session).unwrap();
    }
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;
    let bound = bound(&monitor, &sessions);

    // The controller's network fails: no heartbeat, no probe answer.
    let cut = Instant::now();
    fleet.partition(true);
    let suspected = within(bound, partition_event(&mut events)).await;
    let Event::PartitionSuspected {
        silent_routers,
        watched_routers,
        suspect_sessions,
        watched_sessions,
    } = suspected
    else {
        panic!("expected the guard to engage first, got {suspected:?}");
    };
    assert_eq!(watched_routers, 100);
    assert!(silent_routers > 50, "{silent_routers} silent routers");
    assert!(suspect_sessions > 150 && watched_sessions == 300);
    assert!(monitor.stats().partition_suspected);

    tokio::time::sleep_until(cut + 30 * SECOND).await;
    let stats = monitor.stats();
    assert!(stats.partition_suspected);
    assert_eq!(stats.reaped, 0);
    assert!(stats.probes > 100, "probes go on through the hold");
    assert!(sessions.iter().all(|s| !s.is_closed()));

    // It heals: the guard lifts once the routers are heard again.
    fleet.partition(false);
    let healed = Instant::now();
    let ended = within(bound, partition_event(&mut events)).await;
    let Event::PartitionEnded {
        silent_routers,
        lasted,
        expired,
        ..
    } = ended
    else {
        panic!("expected the guard to lift, got {ended:?}");
    };
    assert!(!expired);
    assert!(silent_routers <= 50);
    assert!(lasted >= 25 * SECOND && lasted <= 31 * SECOND, "{lasted:?}");
    assert!(
        healed.elapsed() <= 4 * SECOND,
        "lifted {:?} after",
        healed.elapsed()
    );

    // Everyone heartbeats again: nobody is reaped at the lift or after.
    tokio::time::sleep(bound * 3).await;
    beats.abort();
    let stats = monitor.stats();
    assert_eq!((stats.reaped, stats.partitions), (0, 1));
    assert!(!stats.partition_suspected);
    assert!(sessions.iter().all(|s| !s.is_closed()));
    assert_eq!(store.len(), 300);
    assert!(partition_events(&mut events).is_empty(), "it engaged again");
}

#[tokio::test(start_paused = true)]
async fn a_partition_reaps_nobody_when_routers_mix_fast_and_slow_sessions() {
    // Each router has a session heartbeating every second and one every
    // 30 s: the fast ones are due (and would be reaped) long before the
    // slow ones, so a router is silent before all its sessions are suspect.
    // (Configured for the slow ones: the fast ones' estimates shrink.)
    let builder = LivenessMonitor::builder().heartbeat_interval(30 * SECOND);
    let (monitor, sessions, fleet, mut events) = watched(builder, 50, 2).await;
    let (fast, slow): (Vec<Session>, Vec<Session>) = sessions
        .iter()
        .cloned()
        .partition(|s| s.id().get() % 1_000 == 0);
    let beats = [
        heartbeats_every(&monitor, &fast, &fleet, SECOND),
        heartbeats_every(&monitor, &slow, &fleet, 30 * SECOND),
    ];
    // The slow ones were heard a second ago, at 120 s.
    tokio::time::sleep(121 * SECOND).await;
    let (fast_timeout, slow_timeout) = (
        monitor.timeout(&fast[0]).unwrap(),
        monitor.timeout(&slow[0]).unwrap(),
    );
    let fast_bound = bound(&monitor, &fast);
    assert!(
        slow_timeout > fast_bound + SECOND,
        "the slow sessions ({slow_timeout:?}) are due after the fast ones are reaped ({fast_bound:?}, timeout {fast_timeout:?})"
    );

    fleet.partition(true);
    let engaged = within(fast_bound, partition_event(&mut events)).await;
    assert!(
        matches!(engaged, Event::PartitionSuspected { .. }),
        "{engaged:?}"
    );
    tokio::time::sleep(30 * SECOND).await;
    fleet.partition(false);
    let ended = within(fast_bound, partition_event(&mut events)).await;
    assert!(matches!(
        ended,
        Event::PartitionEnded { expired: false, .. }
    ));
    tokio::time::sleep(60 * SECOND).await;
    for beat in beats {
        beat.abort();
    }
    assert_eq!(monitor.stats().reaped, 0);
    assert!(sessions.iter().all(|s| !s.is_closed()));
}

#[tokio::test(start_paused = true)]
async fn one_dead_router_among_100_is_reaped_within_the_bound() {
    let (monitor, sessions, fleet, mut events) = watched(LivenessMonitor::builder(), 100, 3).await;
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;

    let router = RouterId::new(42);
    let dead = of(&sessions, router);
    let bound = bound(&monitor, &dead);
    // Its last heartbeat was at the latest now.
    let since = Instant::now();
    fleet.kill(router);
    reaped(&dead, bound * 2).await;
    let took = since.elapsed();
    assert!(took <= bound, "reaped after {took:?}, bound {bound:?}");

    tokio::time::sleep(bound).await;
    beats.abort();
    let stats = monitor.stats();
    assert_eq!((stats.reaped, stats.partitions), (3, 0));
    assert!(!stats.partition_suspected);
    assert_eq!(sessions.iter().filter(|s| s.is_closed()).count(), 3);
    assert!(partition_events(&mut events).is_empty());
}

#[tokio::test(start_paused = true)]
async fn below_the_minimum_router_count_dead_routers_are_reaped() {
    // Two of three routers die: more than half, but too few routers to
    // tell a partition from a death (the default minimum is 4).
    let (monitor, sessions, fleet, mut events) = watched(LivenessMonitor::builder(), 3, 2).await;
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;
    let dead: Vec<Session> = sessions
        .iter()
        .filter(|s| s.router() != RouterId::new(2))
        .cloned()
        .collect();
    let bound = bound(&monitor, &dead);
    let since = Instant::now();
    fleet.kill(RouterId::new(0));
    fleet.kill(RouterId::new(1));
    reaped(&dead, bound * 2).await;
    assert!(
        since.elapsed() <= bound,
        "reaped after {:?}",
        since.elapsed()
    );
    beats.abort();
    assert_eq!(monitor.stats().partitions, 0);
    assert!(partition_events(&mut events).is_empty());
    assert!(
        of(&sessions, RouterId::new(2))
            .iter()
            .all(|s| !s.is_closed())
    );

    // The only router of a controller dies: reaped.
    let (monitor, sessions, fleet, _) = watched(LivenessMonitor::builder(), 1, 2).await;
    tokio::time::sleep(5 * SECOND).await;
    fleet.kill(RouterId::new(0));
    reaped(&sessions, bound * 2).await;
    assert_eq!(monitor.stats().partitions, 0);
}

#[tokio::test(start_paused = true)]
async fn with_a_lower_minimum_the_same_small_fleet_is_held() {
    // The counterpart of the test above: the minimum is what keeps a small
    // fleet's deaths from looking like a partition.
    let builder = LivenessMonitor::builder().partition_min_routers(3);
    let (monitor, sessions, fleet, mut events) = watched(builder, 3, 2).await;
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;
    let bound = bound(&monitor, &sessions);
    fleet.kill(RouterId::new(0));
    fleet.kill(RouterId::new(1));
    let engaged = within(bound, partition_event(&mut events)).await;
    assert!(matches!(
        engaged,
        Event::PartitionSuspected {
            silent_routers: 2,
            watched_routers: 3,
            ..
        }
    ));
    tokio::time::sleep(bound * 2).await;
    beats.abort();
    assert!(sessions.iter().all(|s| !s.is_closed()));
}

#[tokio::test(start_paused = true)]
async fn a_silence_outlasting_the_maximum_hold_is_reaped_after_it() {
    let max_hold = 20 * SECOND;
    let builder = LivenessMonitor::builder().partition_max_hold(Some(max_hold));
    let (monitor, sessions, fleet, mut events) = watched(builder, 20, 2).await;
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;
    let bound = bound(&monitor, &sessions);

    // Every router dies for real: it looks like a partition at first.
    for r in 0..20 {
        fleet.kill(RouterId::new(r));
    }
    let engaged = within(bound, partition_event(&mut events)).await;
    assert!(matches!(engaged, Event::PartitionSuspected { .. }));
    let held = Instant::now();
    let ended = within(max_hold + 2 * SECOND, partition_event(&mut events)).await;
    let expired_at = Instant::now();
    let Event::PartitionEnded {
        expired, lasted, ..
    } = ended
    else {
        panic!("expected the hold to expire, got {ended:?}");
    };
    assert!(expired);
    assert!(lasted >= max_hold && held.elapsed() >= max_hold - SECOND);
    assert!(
        sessions.iter().all(|s| !s.is_closed()),
        "reaped during the hold"
    );

    // Convictions resume where they were: each is reaped within its bound
    // from the expiry. The guard does not engage again.
    reaped(&sessions, bound * 2).await;
    let took = expired_at.elapsed();
    assert!(
        took <= bound,
        "reaped {took:?} after the expiry, bound {bound:?}"
    );
    beats.abort();
    let stats = monitor.stats();
    assert_eq!((stats.partitions, stats.reaped), (1, 40));
    assert!(!stats.partition_suspected);
    assert!(partition_events(&mut events).is_empty(), "it engaged again");
}

#[tokio::test(start_paused = true)]
async fn a_suspect_whose_rounds_ran_out_in_the_hold_gets_a_fresh_chance_at_the_lift() {
    let (monitor, sessions, fleet, mut events) = watched(LivenessMonitor::builder(), 100, 2).await;
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;
    let bound = bound(&monitor, &sessions);
    let (late, lost) = (RouterId::new(0), RouterId::new(1));

    fleet.partition(true);
    let engaged = within(bound, partition_event(&mut events)).await;
    assert!(matches!(engaged, Event::PartitionSuspected { .. }));
    tokio::time::sleep(30 * SECOND).await;
    // Every router was probed for more rounds than a suspect has.
    let rounds = 1 + 2; // 1 + the default probe_retries
    assert!(fleet.probes_of(late) > rounds, "{}", fleet.probes_of(late));

    // The network heals, but router 0 answers only 3 s later (its link
    // comes back last), and router 1 is gone for good.
    fleet.kill(late);
    fleet.kill(lost);
    fleet.partition(false);
    let ended = within(bound, partition_event(&mut events)).await;
    assert!(matches!(
        ended,
        Event::PartitionEnded { expired: false, .. }
    ));
    let lifted = Instant::now();
    tokio::time::sleep(3 * SECOND).await;
    fleet.revive(late);
    let spared = of(&sessions, late);
    assert!(spared.iter().all(|s| !s.is_closed()), "reaped at the lift");

    // The lost router is reaped within its bound from the lift, no sooner
    // than a timeout and all its probe rounds (1 s each) after it: the
    // rounds it failed before were forgotten.
    let dead = of(&sessions, lost);
    reaped(&dead, bound * 2).await;
    let took = lifted.elapsed();
    assert!(
        took <= bound,
        "reaped {took:?} after the lift, bound {bound:?}"
    );
    let timeout = monitor.timeout(&sessions[0]).unwrap();
    let rounds = u32::try_from(rounds).unwrap();
    assert!(
        took >= timeout + SECOND * rounds,
        "reaped {took:?} after the lift"
    );

    tokio::time::sleep(bound).await;
    beats.abort();
    assert!(spared.iter().all(|s| !s.is_closed()));
    let stats = monitor.stats();
    assert_eq!((stats.reaped, stats.partitions), (2, 1));
    assert_eq!(sessions.iter().filter(|s| s.is_closed()).count(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_the_guard_a_partition_reaps_everyone() {
    let builder = LivenessMonitor::builder().partition_guard(false);
    let (monitor, sessions, fleet, mut events) = watched(builder, 10, 2).await;
    let beats = heartbeats(&monitor, &sessions, &fleet);
    tokio::time::sleep(10 * SECOND).await;
    let bound = bound(&monitor, &sessions);
    fleet.partition(true);
    reaped(&sessions, bound * 2).await;
    beats.abort();
    assert_eq!(monitor.stats().partitions, 0);
    assert!(partition_events(&mut events).is_empty());
}

#[tokio::test]
async fn partition_settings_out_of_range_are_build_errors() {
    let refused = |builder: LivenessMonitorBuilder| {
        let store = Arc::new(MemoryStore::new());
        match builder.build(store, Arc::new(Fleet::default())) {
            Err(error @ BuildError::Setting { .. }) => error.refused_setting(),
            other => panic!("expected a setting error, got {other:?}"),
        }
    };
    let builder = LivenessMonitor::builder;
    for share in [0.0, 1.0, -0.5, 2.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            refused(builder().partition_share(share)),
            Some("partition_share")
        );
    }
    for window in [Duration::ZERO, Duration::from_secs(2 * 24 * 3_600)] {
        assert_eq!(
            refused(builder().partition_window(window)),
            Some("partition_window")
        );
    }
    for max in [Duration::ZERO, Duration::from_secs(2 * 24 * 3_600)] {
        assert_eq!(
            refused(builder().partition_max_hold(Some(max))),
            Some("partition_max_hold")
        );
    }
    // The edges that are accepted.
    let store = Arc::new(MemoryStore::new());
    let accepted = builder()
        .partition_share(0.01)
        .partition_share(0.99)
        .partition_window(Duration::from_millis(50))
        .partition_min_routers(0)
        .partition_max_hold(None)
        .build(store, Arc::new(Fleet::default()));
    assert!(accepted.is_ok());
}
