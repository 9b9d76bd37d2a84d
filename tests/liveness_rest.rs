//! The liveness monitor rests while nothing is watched (no timer), and
//! wakes at the next `watch`: adversarial tests of everything that reads
//! its clock after a rest (heartbeats by handle and by id, probes, holds,
//! the partition guard, a `Lifecycle` idle for days), of the local-health
//! guard around a wake-up (a stall right after the waking watch, on the
//! paused clock and on the real one), of watches from plain threads (on a
//! paused runtime, they read the runtime's clock), and of `watch` and
//! `shutdown` racing the rest from several threads. Written as a review of
//! the change that made the monitor rest; three of them failed against
//! its first version.
//!
//! Waits for a count to settle (`watched` reaching 0) poll the stats on the
//! paused clock, bounded with `within`: the monitor has no event for a
//! session leaving it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use session_lifecycle::test_util::{
    HOUR, Notify, Probe, ScriptedNotifier, ScriptedProber, Subset, within,
};
use session_lifecycle::{
    CloseReason, Event, EventBus, Lifecycle, LivenessMonitor, MemoryStore, NewSession, ProbeBatch,
    ProbeError, Prober, RouterId, Session, SessionId, SessionStore, events::Subscription,
    liveness::LivenessEvent, liveness::LivenessMonitorBuilder, liveness::NoProbe,
    liveness::WatchError,
};
use tokio::time::{Duration, Instant};

type Monitor<Pr> = LivenessMonitor<MemoryStore, Pr>;

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);

/// Routers `routers` with `per_router` sessions each, ids `router * 1000 + i`.
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

fn listened(builder: LivenessMonitorBuilder) -> (LivenessMonitorBuilder, Subscription) {
    let bus = EventBus::new(65_536);
    let events = bus.subscribe();
    (builder.events(bus), events)
}

fn drain(events: &mut Subscription) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(event) = events.try_recv() {
        out.push(event);
    }
    assert_eq!(events.lagged(), 0, "lost events");
    out
}

fn stalls(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Liveness(LivenessEvent::MonitorStalled { .. })))
        .count()
}

fn suspects(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Liveness(LivenessEvent::SessionSuspect { .. })))
        .count()
}

fn parks() -> u64 {
    tokio::runtime::Handle::current()
        .metrics()
        .worker_park_count(0)
}

/// Asserts the monitor rests: a paused day costs a handful of parks.
async fn assert_rests(what: &str) {
    tokio::time::sleep(SECOND).await;
    let before = parks();
    tokio::time::sleep(DAY).await;
    let parked = parks() - before;
    assert!(parked <= 20, "{what}: parked {parked} times a day");
}

/// Heartbeats `session` every `every` until refused.
fn beating<Pr: Prober>(
    monitor: &Monitor<Pr>,
    session: &Session,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
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

// ---------------------------------------------------------------------
// The local-health guard around a rest.
// ---------------------------------------------------------------------

/// The controller stalls 30 s right after a watch that woke a resting
/// monitor (nothing runs: the same `advance` the crate's own stall tests
/// use). The session heartbeats every second once the stall is over. The
/// local-health guard should see the stall and convict nobody, as it does
/// for a monitor that was ticking (control below).
#[tokio::test(start_paused = true)]
async fn a_stall_right_after_a_watch_that_wakes_a_resting_monitor_is_caught() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 1).await;
    let prober = ScriptedProber::always(Probe::nobody());
    let (builder, mut events) = listened(LivenessMonitor::builder());
    let monitor = builder
        .build(Arc::clone(&store), Arc::clone(&prober))
        .unwrap();
    assert_rests("unused").await;

    let session = &all[0];
    monitor.watch(session).unwrap();
    tokio::time::advance(Duration::from_secs(30)).await; // the stall
    let beat = beating(&monitor, session, SECOND);
    monitor.heartbeat(session).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stats = monitor.stats();
    let seen = drain(&mut events);
    assert!(!session.is_closed());
    assert_eq!(
        (stats.stalls, stats.suspected, prober.call_count()),
        (1, 0, 0),
        "a live session was convicted after a stall the guard missed: {stats:?} \
         (stall events {}, suspect events {})",
        stalls(&seen),
        suspects(&seen),
    );
    monitor.shutdown().await;
    beat.await.unwrap();
}

/// Control: the same stall right after the same watch, on a monitor that
/// was ticking (another session watched and heartbeating).
#[tokio::test(start_paused = true)]
async fn control_a_stall_right_after_a_watch_on_a_ticking_monitor_is_caught() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 1).await;
    let prober = ScriptedProber::always(Probe::nobody());
    let (builder, mut events) = listened(LivenessMonitor::builder());
    let monitor = builder
        .build(Arc::clone(&store), Arc::clone(&prober))
        .unwrap();
    monitor.watch(&all[1]).unwrap();
    let other = beating(&monitor, &all[1], SECOND);
    tokio::time::sleep(Duration::from_secs(60)).await;

    let session = &all[0];
    monitor.watch(session).unwrap();
    tokio::time::advance(Duration::from_secs(30)).await; // the stall
    let beat = beating(&monitor, session, SECOND);
    monitor.heartbeat(session).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stats = monitor.stats();
    let seen = drain(&mut events);
    assert!(!session.is_closed());
    assert_eq!(
        (stats.stalls, stats.suspected, prober.call_count()),
        (1, 0, 0),
        "{stats:?} (stall events {}, suspect events {})",
        stalls(&seen),
        suspects(&seen),
    );
    monitor.shutdown().await;
    beat.await.unwrap();
    other.await.unwrap();
}

/// Real time, current-thread runtime: the runtime thread blocks 1.5 s
/// (`std::thread::sleep`) right after a watch that woke a resting
/// monitor; the session heartbeats every 20 ms from then on. Pause
/// allowance 200 ms, timeout at first 500 ms.
fn blocked_after_watch(resting: bool) -> (u64, u64, u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let all = open(&store, 0..2, 1).await;
        let monitor = LivenessMonitor::builder()
            .granularity(Duration::from_millis(10))
            .heartbeat_interval(Duration::from_millis(100))
            .timeout_range(Duration::from_millis(100), Duration::from_secs(2))
            .pause_allowance(Duration::from_millis(200))
            .probe_timeout(Duration::from_millis(100))
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        let other = if resting {
            None
        } else {
            monitor.watch(&all[1]).unwrap();
            Some(beating(&monitor, &all[1], Duration::from_millis(20)))
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let session = &all[0];
        monitor.watch(session).unwrap();
        std::thread::sleep(Duration::from_millis(1_500)); // the runtime is blocked
        let _ = monitor.heartbeat(session);
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = monitor.heartbeat(session);
        }
        let stats = monitor.stats();
        monitor.shutdown().await;
        if let Some(other) = other {
            other.await.unwrap();
        }
        (stats.stalls, stats.suspected, stats.reaped)
    })
}

#[test]
fn a_blocked_runtime_right_after_a_watch_that_wakes_a_resting_monitor_is_caught() {
    let (stalls, suspected, reaped) = blocked_after_watch(true);
    assert_eq!(
        (stalls, suspected, reaped),
        (1, 0, 0),
        "resting monitor: stalls {stalls}, suspected {suspected}, reaped {reaped}"
    );
}

#[test]
fn control_a_blocked_runtime_right_after_a_watch_on_a_ticking_monitor_is_caught() {
    let (stalls, suspected, reaped) = blocked_after_watch(false);
    assert_eq!(
        (stalls, suspected, reaped),
        (1, 0, 0),
        "ticking monitor: stalls {stalls}, suspected {suspected}, reaped {reaped}"
    );
}

/// After a long rest, the wake-up itself is no stall: nothing is
/// reported, nobody is convicted.
#[tokio::test(start_paused = true)]
async fn waking_from_a_long_rest_is_no_stall() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..3, 2).await;
    let (builder, mut events) = listened(LivenessMonitor::builder());
    let monitor = builder.build(Arc::clone(&store), NoProbe).unwrap();
    for round in 0..3 {
        tokio::time::sleep(DAY * 3).await;
        let session = &all[round * 2];
        monitor.watch(session).unwrap();
        monitor.watch(&all[round * 2 + 1]).unwrap();
        let beat = beating(&monitor, session, SECOND);
        tokio::time::sleep(Duration::from_secs(30)).await;
        // The second stops at once: reaped; the first is stopped later.
        within(HOUR, all[round * 2 + 1].closed()).await;
        let _ = session.close(CloseReason::ClientClosed);
        beat.await.unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(monitor.stats().watched, 0, "round {round}");
    }
    let stats = monitor.stats();
    let seen = drain(&mut events);
    assert_eq!(stalls(&seen), 0, "{stats:?}");
    assert_eq!(
        (stats.stalls, stats.suspected, stats.reaped),
        (0, 3, 3),
        "{stats:?}"
    );
    monitor.shutdown().await;
}

// ---------------------------------------------------------------------
// Readers of the clock after a rest.
// ---------------------------------------------------------------------

/// A plain thread (no runtime context) watches a session after the
/// monitor rested a paused day; the session heartbeats every second from
/// the runtime. It must not be convicted from a stale clock.
#[tokio::test(start_paused = true)]
async fn a_watch_from_a_plain_thread_after_a_long_rest_starts_at_the_watch() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 1).await;
    let prober = ScriptedProber::always(Probe::nobody());
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), Arc::clone(&prober))
        .unwrap();
    assert_rests("unused").await;
    let session = all[0].clone();
    let (m, s) = (monitor.clone(), session.clone());
    std::thread::spawn(move || m.watch(&s).unwrap())
        .join()
        .unwrap();
    let beat = beating(&monitor, &session, SECOND);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let stats = monitor.stats();
    assert_eq!(
        (stats.suspected, prober.call_count(), stats.stalls),
        (0, 0, 0),
        "convicted from a stale clock (or a stall reported for the rest): {stats:?}"
    );
    assert!(!session.is_closed());
    monitor.shutdown().await;
    beat.await.unwrap();
}

/// A prober that answers for sessions while `answer` is set.
struct Switch(Arc<AtomicBool>);

impl Prober for Switch {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        Ok(if self.0.load(Ordering::SeqCst) {
            batch.sessions
        } else {
            Vec::new()
        })
    }
}

/// After a rest of days, a silent session whose router answers probes is
/// spared again and again (probe answers refresh it at the clock), never
/// reaped; once the answers stop it is reaped within its bound.
#[tokio::test(start_paused = true)]
async fn probe_answers_after_a_long_rest_spare_the_session() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 2).await;
    let answer = Arc::new(AtomicBool::new(true));
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), Switch(Arc::clone(&answer)))
        .unwrap();
    // A session lives and is reaped, then the monitor rests for days.
    monitor.watch(&all[1]).unwrap();
    answer.store(false, Ordering::SeqCst);
    within(HOUR, all[1].closed()).await;
    assert_rests("after the first session").await;
    tokio::time::sleep(DAY * 5).await;

    answer.store(true, Ordering::SeqCst);
    let session = &all[0];
    monitor.watch(session).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let stats = monitor.stats();
    assert!(!session.is_closed(), "{stats:?}");
    assert!(stats.spared >= 10, "{stats:?}");
    answer.store(false, Ordering::SeqCst);
    let bound = monitor.reap_bound(monitor.timeout(session).unwrap());
    // The last answer was at most one probing phase ago.
    reaped_within(session, Instant::now(), bound).await;
    assert_eq!(monitor.stats().watched, 0);
    monitor.shutdown().await;
}

/// A router held (`hold_router`) before and during a rest of days: a
/// session of it watched after the rest is not convicted while held, and
/// once released it is reaped within its bound from the release.
#[tokio::test(start_paused = true)]
async fn a_hold_across_a_long_rest_spares_then_the_release_reaps_in_bound() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 1).await;
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let router = RouterId::new(0);
    monitor.hold_router(router);
    assert_rests("held, nothing watched").await;
    let session = &all[0];
    monitor.watch(session).unwrap();
    tokio::time::sleep(Duration::from_secs(3_600)).await;
    let stats = monitor.stats();
    assert!(!session.is_closed(), "{stats:?}");
    assert_eq!(stats.suspected, 0, "{stats:?}");
    monitor.release_router(router);
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(session).unwrap());
    reaped_within(session, since, bound).await;
    monitor.shutdown().await;
}

/// `heartbeat_id` after a rest, for a session watched after it: keeps it.
#[tokio::test(start_paused = true)]
async fn heartbeats_by_id_after_a_long_rest_keep_the_session() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 1).await;
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    tokio::time::sleep(DAY * 2).await;
    let session = &all[0];
    monitor.watch(session).unwrap();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        monitor.heartbeat_id(session.id()).await.unwrap();
    }
    let stats = monitor.stats();
    assert_eq!((stats.suspected, stats.watched), (0, 1), "{stats:?}");
    // Steady 900 ms: the estimate converged near it.
    let timeout = monitor.timeout(session).unwrap();
    assert!(timeout < Duration::from_secs(3), "{timeout:?}");
    monitor.shutdown().await;
}

// ---------------------------------------------------------------------
// The last session leaving while another is watched.
// ---------------------------------------------------------------------

/// Each time the last session is reaped, the next is watched as soon as
/// the reap event arrives (the driver may still run, the monitor may be
/// about to rest). Each new one heartbeats 20 s, is never suspected, then
/// goes silent and is reaped within its bound.
#[tokio::test(start_paused = true)]
async fn a_session_watched_as_the_last_one_is_reaped_is_judged_from_its_watch() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 6).await;
    let (builder, mut events) = listened(LivenessMonitor::builder());
    let monitor = builder.build(Arc::clone(&store), NoProbe).unwrap();
    monitor.watch(&all[0]).unwrap();
    for (i, session) in all.iter().enumerate().skip(1) {
        // Wait for the reap of the previous one.
        within(HOUR, async {
            loop {
                match events.recv().await {
                    Some(Event::Liveness(LivenessEvent::SessionReaped { .. })) => break,
                    Some(_) => {}
                    None => panic!("bus closed"),
                }
            }
        })
        .await;
        if i % 2 == 0 {
            tokio::time::sleep(DAY).await; // and rest, every other time
        }
        monitor.watch(session).unwrap();
        let before = monitor.stats().suspected;
        for _ in 0..20 {
            monitor.heartbeat(session).unwrap();
            tokio::time::sleep(SECOND).await;
        }
        monitor.heartbeat(session).unwrap();
        let stats = monitor.stats();
        assert_eq!(stats.suspected, before, "{i}: {stats:?}");
        let since = Instant::now();
        let bound = monitor.reap_bound(monitor.timeout(session).unwrap());
        reaped_within(session, since, bound).await;
    }
    assert_eq!(monitor.stats().reaped, all.len() as u64);
    monitor.shutdown().await;
}

/// A prober that watches the next session (re-entrant) in the last round
/// of the only suspect: the monitor must not rest with it watched.
struct WatchInRound {
    monitor: OnceLock<Monitor<Arc<WatchInRound>>>,
    next: Vec<Session>,
    at: AtomicUsize,
}

impl Prober for WatchInRound {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        if batch.round == 3 {
            let i = self.at.fetch_add(1, Ordering::SeqCst);
            if let (Some(monitor), Some(next)) = (self.monitor.get(), self.next.get(i)) {
                monitor.watch(next).unwrap();
            }
        }
        Ok(Vec::new())
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_watched_by_the_prober_in_the_last_round_is_reaped_in_bound() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 5).await;
    let prober = Arc::new(WatchInRound {
        monitor: OnceLock::new(),
        next: all[1..].to_vec(),
        at: AtomicUsize::new(0),
    });
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), Arc::clone(&prober))
        .unwrap();
    let _ = prober.monitor.set(monitor.clone());
    monitor.watch(&all[0]).unwrap();
    let timeout = monitor.timeout(&all[0]).unwrap();
    let bound = monitor.reap_bound(timeout);
    within(HOUR, all[0].closed()).await;
    for session in &all[1..] {
        // Watched at most a bound before the previous reap; reaped in bound
        // of its own watch.
        within(bound * 2, session.closed()).await;
    }
    assert_eq!(monitor.stats().reaped, 5);
    assert_eq!(monitor.stats().watched, 0);
    drop(prober);
    monitor.shutdown().await;
}

// ---------------------------------------------------------------------
// Sessions closed otherwise; then new watches.
// ---------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn sessions_closed_otherwise_leave_then_the_monitor_rests_and_wakes() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..3, 3).await;
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    for s in &all {
        monitor.watch(s).unwrap();
    }
    let beats: Vec<_> = all.iter().map(|s| beating(&monitor, s, SECOND)).collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Closed by the store, by the session itself, and by a router loss.
    for s in &all[0..3] {
        let _ = store
            .close(s.id(), CloseReason::RouterDeleted)
            .await
            .unwrap();
    }
    for s in &all[3..6] {
        let _ = s.close(CloseReason::ClientClosed);
    }
    for s in &all[6..9] {
        let _ = store
            .close(s.id(), CloseReason::ClientClosed)
            .await
            .unwrap();
    }
    for beat in beats {
        beat.await.unwrap();
    }
    // They leave when their wheel entries come up (within the max timeout).
    within(Duration::from_secs(120), async {
        while monitor.stats().watched != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(monitor.stats().suspected, 0);
    assert_rests("after the closes").await;
    let fresh = open(&store, 5..6, 2).await;
    monitor.watch(&fresh[0]).unwrap();
    monitor.watch(&fresh[1]).unwrap();
    let beat = beating(&monitor, &fresh[0], SECOND);
    let since = Instant::now();
    let bound = monitor.reap_bound(monitor.timeout(&fresh[1]).unwrap());
    reaped_within(&fresh[1], since, bound).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!fresh[0].is_closed());
    assert_eq!(monitor.stats().suspected, 1);
    monitor.shutdown().await;
    beat.await.unwrap();
}

// ---------------------------------------------------------------------
// The partition guard around a rest.
// ---------------------------------------------------------------------

async fn next_partition_event(events: &mut Subscription, limit: Duration) -> Event {
    within(limit, async {
        loop {
            match events.recv().await {
                Some(e @ (Event::PartitionSuspected { .. } | Event::PartitionEnded { .. })) => {
                    break e;
                }
                Some(_) => {}
                None => panic!("bus closed"),
            }
        }
    })
    .await
}

/// Eight routers go silent together (a partition): the guard holds. Then
/// every session is closed by the store (the routers deleted) while it
/// holds: it lifts, the monitor rests. Days later eight new routers go
/// silent together: the guard engages again, and lifts at its maximum.
#[tokio::test(start_paused = true)]
async fn sessions_closed_while_the_guard_holds_lift_it_and_it_works_after_a_rest() {
    let store = Arc::new(MemoryStore::new());
    let silent = open(&store, 0..8, 2).await;
    let (builder, mut events) =
        listened(LivenessMonitor::builder().partition_max_hold(Some(Duration::from_secs(600))));
    let monitor = builder.build(Arc::clone(&store), NoProbe).unwrap();
    for s in &silent {
        monitor.watch(s).unwrap();
    }
    let e = next_partition_event(&mut events, Duration::from_secs(60)).await;
    assert!(matches!(e, Event::PartitionSuspected { .. }), "{e:?}");
    assert!(monitor.stats().partition_suspected);
    tokio::time::sleep(Duration::from_secs(30)).await;
    for s in &silent {
        let _ = store
            .close(s.id(), CloseReason::RouterDeleted)
            .await
            .unwrap();
    }
    let e = next_partition_event(&mut events, Duration::from_secs(60)).await;
    assert!(
        matches!(e, Event::PartitionEnded { expired: false, .. }),
        "{e:?}"
    );
    let stats = monitor.stats();
    assert!(!stats.partition_suspected, "{stats:?}");
    assert_eq!(
        (stats.watched, stats.suspects, stats.reaped),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_rests("after the partition").await;

    // Again, days later, with new routers.
    let again = open(&store, 20..28, 2).await;
    for s in &again {
        monitor.watch(s).unwrap();
    }
    let e = next_partition_event(&mut events, Duration::from_secs(60)).await;
    assert!(matches!(e, Event::PartitionSuspected { .. }), "{e:?}");
    let e = next_partition_event(&mut events, Duration::from_secs(700)).await;
    assert!(
        matches!(e, Event::PartitionEnded { expired: true, .. }),
        "{e:?}"
    );
    // Convictions resume: all reaped, then the monitor rests.
    for s in &again {
        within(Duration::from_secs(120), s.closed()).await;
    }
    within(Duration::from_secs(60), async {
        while monitor.stats().watched != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stats = monitor.stats();
    assert!(!stats.partition_suspected, "{stats:?}");
    assert_eq!(stats.partitions, 2, "{stats:?}");
    assert_rests("after the expired hold").await;

    // And a third partition after that rest: the guard is armed again.
    let third = open(&store, 40..48, 1).await;
    for s in &third {
        monitor.watch(s).unwrap();
    }
    let e = next_partition_event(&mut events, Duration::from_secs(60)).await;
    assert!(matches!(e, Event::PartitionSuspected { .. }), "{e:?}");
    assert!(third.iter().all(|s| !s.is_closed()));
    monitor.shutdown().await;
}

/// The guard holds with no maximum; every silent session is then closed
/// by its router's deletion in one go from the prober (during a paced
/// round). The guard lifts, `PartitionEnded` comes, the stats say so.
#[tokio::test(start_paused = true)]
async fn a_guard_without_maximum_lifts_when_the_last_routers_go() {
    let store = Arc::new(MemoryStore::new());
    let silent = open(&store, 0..6, 3).await;
    let (builder, mut events) = listened(LivenessMonitor::builder().partition_max_hold(None));
    let monitor = builder.build(Arc::clone(&store), NoProbe).unwrap();
    for s in &silent {
        monitor.watch(s).unwrap();
    }
    let e = next_partition_event(&mut events, Duration::from_secs(60)).await;
    assert!(matches!(e, Event::PartitionSuspected { .. }), "{e:?}");
    tokio::time::sleep(DAY).await;
    assert!(monitor.stats().partition_suspected);
    assert!(silent.iter().all(|s| !s.is_closed()));
    for s in &silent {
        let _ = s.close(CloseReason::RouterDeleted);
    }
    let e = next_partition_event(&mut events, Duration::from_secs(60)).await;
    assert!(matches!(e, Event::PartitionEnded { .. }), "{e:?}");
    within(Duration::from_secs(60), async {
        while monitor.stats().watched != 0 || monitor.stats().partition_suspected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_rests("after the lift").await;
    // One silent router alone later: reaped within its bound.
    let late = open(&store, 30..31, 1).await;
    monitor.watch(&late[0]).unwrap();
    let bound = monitor.reap_bound(monitor.timeout(&late[0]).unwrap());
    reaped_within(&late[0], Instant::now(), bound).await;
    monitor.shutdown().await;
}

// ---------------------------------------------------------------------
// Races on a multi-thread runtime (real time).
// ---------------------------------------------------------------------

fn fast() -> LivenessMonitorBuilder {
    LivenessMonitor::builder()
        .granularity(Duration::from_millis(1))
        .heartbeat_interval(Duration::from_millis(2))
        .timeout_range(Duration::from_millis(2), Duration::from_millis(5))
        // Well above a loaded machine's scheduling delays: a tick later than
        // this counts as a stall, and a probe round during one does not
        // count, so with 2 ms the sessions could wait for ever.
        .pause_allowance(Duration::from_millis(20))
        .probe_retries(0)
        .probe_timeout(Duration::from_millis(2))
        .partition_guard(false)
}

/// Four plain threads watch 100 sessions each, with random gaps of 0 to
/// 3 ms (so the monitor keeps going to rest and waking); each session
/// stays silent and must be reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_from_many_threads_racing_the_rest_are_never_lost() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..4, 100).await;
    let monitor = fast().build(Arc::clone(&store), NoProbe).unwrap();
    let mut threads = Vec::new();
    for t in 0..4usize {
        let (monitor, mine) = (monitor.clone(), all[t * 100..(t + 1) * 100].to_vec());
        threads.push(std::thread::spawn(move || {
            let mut seed = t as u64 + 1;
            for s in &mine {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                monitor.watch(s).unwrap();
                let gap = (seed >> 33) % 4;
                if gap > 0 {
                    std::thread::sleep(Duration::from_millis(gap));
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let lost = tokio::time::timeout(Duration::from_secs(20), async {
        for s in &all {
            s.closed().await;
        }
    })
    .await;
    let open_left = all.iter().filter(|s| !s.is_closed()).count();
    assert!(
        lost.is_ok(),
        "{open_left} sessions never reaped: {:?}",
        monitor.stats()
    );
    // The count follows the close (and the store's remove).
    tokio::time::timeout(Duration::from_secs(10), async {
        while monitor.stats().watched != 0 || monitor.stats().reaped != 400 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), monitor.shutdown())
        .await
        .expect("shutdown hung");
}

/// Watches one at a time, each right as the previous one is reaped (the
/// monitor goes to rest in between), from a plain thread, 300 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_right_after_each_reap_from_a_plain_thread_is_never_lost() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..3, 100).await;
    let monitor = fast().build(Arc::clone(&store), NoProbe).unwrap();
    let (m, sessions) = (monitor.clone(), all.clone());
    let runtime = tokio::runtime::Handle::current();
    let thread = std::thread::spawn(move || {
        for (i, s) in sessions.iter().enumerate() {
            m.watch(s).unwrap();
            // Awaits the reap from the plain thread, on the runtime's clock.
            let reaped = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), s.closed()).await
            });
            if reaped.is_err() {
                return Err(format!("session {i} never reaped: {:?}", m.stats()));
            }
        }
        Ok(())
    });
    let result = tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    result.unwrap();
    tokio::time::timeout(Duration::from_secs(10), monitor.shutdown())
        .await
        .expect("shutdown hung");
}

/// `shutdown` races a rest and watches from plain threads: it returns,
/// later watches are refused, and nothing is reaped after it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_racing_a_rest_and_watches_returns_and_refuses_later_watches() {
    for round in 0..50u64 {
        let store = Arc::new(MemoryStore::new());
        let all = open(&store, round * 10..round * 10 + 2, 20).await;
        let monitor = fast().build(Arc::clone(&store), NoProbe).unwrap();
        let go = Arc::new(std::sync::Barrier::new(3));
        let mut threads = Vec::new();
        for t in 0..2usize {
            let (m, mine, go) = (
                monitor.clone(),
                all[t * 20..(t + 1) * 20].to_vec(),
                Arc::clone(&go),
            );
            threads.push(std::thread::spawn(move || {
                go.wait();
                let mut refused = false;
                for s in &mine {
                    match m.watch(s) {
                        Ok(()) => assert!(!refused, "a watch accepted after a refusal"),
                        Err(WatchError::ShutDown) => refused = true,
                        Err(e) => panic!("{e:?}"),
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }));
        }
        let shutter = monitor.clone();
        let waiter = go.clone();
        let stop = tokio::spawn(async move {
            tokio::task::spawn_blocking(move || waiter.wait())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(round % 5)).await;
            shutter.shutdown().await;
        });
        tokio::time::timeout(Duration::from_secs(10), stop)
            .await
            .unwrap_or_else(|_| panic!("round {round}: shutdown hung"))
            .unwrap();
        for t in threads {
            t.join().unwrap();
        }
        let fresh = open(&store, 900 + round..901 + round, 1).await;
        assert_eq!(monitor.watch(&fresh[0]), Err(WatchError::ShutDown));
        let reaped = monitor.stats().reaped;
        let closed = all.iter().filter(|s| s.is_closed()).count();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            monitor.stats().reaped,
            reaped,
            "round {round}: reaped after shutdown"
        );
        assert_eq!(all.iter().filter(|s| s.is_closed()).count(), closed);
        let stats = monitor.stats();
        assert_eq!((stats.watched, stats.suspects), (0, 0), "{stats:?}");
    }
}

// ---------------------------------------------------------------------
// A Lifecycle idle for paused days, then used.
// ---------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_lifecycle_idle_for_days_then_used_judges_from_the_watch() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::All));
    let bus = EventBus::new(65_536);
    let mut events = bus.subscribe();
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .events(bus)
        .build()
        .unwrap();
    tokio::time::sleep(DAY * 3).await;
    let all = open(&store, 0..1, 2).await;
    let (alive, dead) = (&all[0], &all[1]);
    let liveness = lifecycle.liveness();
    liveness.watch(alive).unwrap();
    liveness.watch(dead).unwrap();
    let since = Instant::now();
    let bound = liveness.reap_bound(liveness.timeout(dead).unwrap());
    let beat = beating(liveness, alive, SECOND);
    reaped_within(dead, since, bound).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let stats = liveness.stats();
    assert!(!alive.is_closed(), "{stats:?}");
    assert_eq!(
        (stats.suspected, stats.reaped, stats.stalls),
        (1, 1, 0),
        "{stats:?}"
    );
    let seen = drain(&mut events);
    assert_eq!(stalls(&seen), 0);
    // Idle again for days, then a deletion of the router.
    let _ = alive.close(CloseReason::ClientClosed);
    beat.await.unwrap();
    tokio::time::sleep(DAY * 2).await;
    let more = open(&store, 1..2, 3).await;
    for s in &more {
        liveness.watch(s).unwrap();
    }
    let beats: Vec<_> = more.iter().map(|s| beating(liveness, s, SECOND)).collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(liveness.stats().suspected, 1);
    let report = within(HOUR, lifecycle.deleter().delete(RouterId::new(1)))
        .await
        .unwrap();
    assert_eq!(report.report().unwrap().sessions, 3);
    for beat in beats {
        beat.await.unwrap();
    }
    within(Duration::from_secs(120), async {
        while liveness.stats().watched != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    within(HOUR, lifecycle.shutdown(HOUR)).await;
}

/// Two plain threads, each in turn: wait until nothing is watched (the
/// monitor goes to rest), watch a session and heartbeat it at once and
/// every 5 ms for 150 ms (its timeout starts at 20 + 40 + 50 ms), then
/// close it. Nobody may be convicted: heartbeats racing the wake-up count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_racing_the_wake_up_from_plain_threads_count() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..2, 15).await;
    let monitor = LivenessMonitor::builder()
        .granularity(Duration::from_millis(1))
        .heartbeat_interval(Duration::from_millis(20))
        .timeout_range(Duration::from_millis(20), Duration::from_millis(200))
        .pause_allowance(Duration::from_millis(50))
        .probe_timeout(Duration::from_millis(20))
        .partition_guard(false)
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let mut threads = Vec::new();
    for t in 0..2usize {
        let (m, mine) = (monitor.clone(), all[t * 15..(t + 1) * 15].to_vec());
        threads.push(std::thread::spawn(move || {
            // Sessions whose thread was descheduled for as long as the
            // shortest timeout (a loaded machine): silent clients, which
            // the monitor may rightly suspect.
            let mut silent = 0usize;
            for s in &mine {
                let start = std::time::Instant::now();
                while m.stats().watched != 0 && start.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_micros(100));
                }
                m.watch(s).unwrap();
                let start = std::time::Instant::now();
                let mut last = start;
                let mut longest = Duration::ZERO;
                while start.elapsed() < Duration::from_millis(150) {
                    m.heartbeat(s).unwrap();
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                    std::thread::sleep(Duration::from_millis(5));
                }
                longest = longest.max(last.elapsed());
                let _ = s.close(CloseReason::ClientClosed);
                silent += usize::from(longest >= Duration::from_millis(20));
            }
            silent
        }));
    }
    let mut silent = 0;
    for t in threads {
        silent += tokio::task::spawn_blocking(move || t.join().unwrap())
            .await
            .unwrap();
    }
    let stats = monitor.stats();
    assert!(
        stats.suspected <= silent as u64 && stats.reaped <= silent as u64,
        "{silent} sessions silent for a timeout; {stats:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), monitor.shutdown())
        .await
        .expect("shutdown hung");
}

/// A resting monitor shuts down at once, refuses watches after, and its
/// stats say nothing is watched.
#[tokio::test(start_paused = true)]
async fn shutdown_of_a_resting_monitor_returns_and_refuses_watches() {
    let store = Arc::new(MemoryStore::new());
    let all = open(&store, 0..1, 2).await;
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    monitor.watch(&all[0]).unwrap();
    within(HOUR, all[0].closed()).await;
    assert_rests("after the reap").await;
    let started = Instant::now();
    within(SECOND, monitor.shutdown()).await;
    assert!(started.elapsed() < SECOND);
    assert_eq!(monitor.watch(&all[1]), Err(WatchError::ShutDown));
    let stats = monitor.stats();
    assert_eq!((stats.watched, stats.reaped), (0, 1), "{stats:?}");
}
