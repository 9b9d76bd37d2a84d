//! `LivenessMonitor::reap_bound` is a bound (issue #17, item 4): under
//! paused time, every session that falls silent is reaped no later than
//! `reap_bound(timeout)` after its last heartbeat, `timeout` being its
//! timeout then, whatever the prober does (nobody answers, it hangs, it
//! errors, it answers after the probe timeout), for every retry count,
//! also when the session becomes suspect while its router's probe driver
//! sleeps between the rounds of older suspects.

use std::sync::Arc;

use proptest::prelude::*;
use session_lifecycle::test_util::strategy::cases;
use session_lifecycle::test_util::{HOUR, Probe, ScriptedProber, Subset, run_paused, within};
use session_lifecycle::{
    Backoff, CloseReason, LivenessMonitor, MemoryStore, NewSession, Prober, RouterId, Session,
    SessionId, SessionStore,
};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

type Monitor<Pr> = LivenessMonitor<MemoryStore, Pr>;

const SECOND: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a session's reap went: from its last heartbeat to its reap, and
/// the bound the monitor gave for it then.
#[derive(Debug)]
struct Reap {
    session: SessionId,
    took: Duration,
    bound: Duration,
}

/// Heartbeats `session` after each of `gaps`, then falls silent and
/// awaits the reap. `None` if the session was reaped while it still
/// heartbeated (its gaps were too long for it to be measured).
fn silent_after<Pr: Prober>(
    monitor: &Monitor<Pr>,
    session: &Session,
    gaps: Vec<Duration>,
) -> JoinHandle<Option<Reap>> {
    let (monitor, session) = (monitor.clone(), session.clone());
    tokio::spawn(async move {
        for gap in gaps {
            tokio::time::sleep(gap).await;
            monitor.heartbeat(&session).ok()?;
        }
        let last = Instant::now();
        let bound = monitor.reap_bound(monitor.timeout(&session)?);
        let reason = within(bound.saturating_add(HOUR), session.closed()).await;
        assert_eq!(reason, CloseReason::LivenessTimeout);
        Some(Reap {
            session: session.id(),
            took: last.elapsed(),
            bound,
        })
    })
}

/// Creates sessions `ids` on `router`.
async fn create(store: &MemoryStore, router: RouterId, ids: &[u64]) -> Vec<Session> {
    let incarnation = store.register_router(router).await.unwrap();
    let mut sessions = Vec::new();
    for &id in ids {
        let spec = NewSession::new(SessionId::new(id), router, incarnation);
        sessions.push(store.create(spec).await.unwrap());
    }
    sessions
}

/// Awaits every reap and checks it against its bound.
async fn assert_within_bounds(what: &str, reaps: Vec<JoinHandle<Option<Reap>>>) -> usize {
    let mut measured = 0;
    for reap in reaps {
        let Some(reap) = reap.await.unwrap() else {
            continue;
        };
        measured += 1;
        assert!(
            reap.took <= reap.bound,
            "{what}: {} reaped {:?} after its last heartbeat, bound {:?}",
            reap.session,
            reap.took,
            reap.bound
        );
    }
    measured
}

/// What the prober does: nobody answers, it hangs, it errors, it answers
/// after the probe timeout.
fn silent_probers() -> [Probe; 4] {
    [
        Probe::nobody(),
        Probe::Never,
        Probe::Error,
        Probe::Slow {
            delay: PROBE_TIMEOUT * 3,
            answer: Subset::All,
        },
    ]
}

/// Router `k` has two sessions: the first falls silent at 20 s, the
/// second `k` half-seconds later, so across routers the second one
/// becomes suspect at every point of the first one's probe rounds and
/// backoffs.
#[tokio::test(start_paused = true)]
async fn a_session_falling_silent_while_its_router_is_probed_is_reaped_within_the_bound() {
    const ROUTERS: u64 = 60;
    for retries in 0..=6 {
        for probe in silent_probers() {
            let store = Arc::new(MemoryStore::new());
            // Every router dies here, most of them within one probing
            // phase: a mass death the partition guard would hold (see
            // tests/liveness_partition.rs). This test is about the bound.
            let monitor = LivenessMonitor::builder()
                .probe_timeout(PROBE_TIMEOUT)
                .probe_retries(retries)
                .partition_guard(false)
                .build(Arc::clone(&store), ScriptedProber::always(probe))
                .unwrap();
            let mut reaps = Vec::new();
            for k in 0..ROUTERS {
                let router = RouterId::new(k);
                let [first, second] =
                    <[Session; 2]>::try_from(create(&store, router, &[2 * k, 2 * k + 1]).await)
                        .unwrap();
                monitor.watch(&first).unwrap();
                monitor.watch(&second).unwrap();
                // Last heartbeats at 20 s and at 20 s + k × 0.5 s.
                let odd = Duration::from_millis(500 * (k % 2));
                let later: Vec<_> = std::iter::once(SECOND + odd)
                    .chain(std::iter::repeat_n(SECOND, 19 + k as usize / 2))
                    .collect();
                reaps.push(silent_after(&monitor, &first, vec![SECOND; 20]));
                reaps.push(silent_after(&monitor, &second, later));
            }
            let what = format!("{retries} retries, prober {probe:?}");
            let measured = assert_within_bounds(&what, reaps).await;
            assert_eq!(measured, 2 * ROUTERS as usize, "{what}");
            let stats = monitor.stats();
            assert_eq!((stats.reaped, stats.stalls), (2 * ROUTERS, 0), "{what}");
        }
    }
}

/// Sessions configured for 10 s heartbeats that send one every 100 ms:
/// their estimates shrink from a 31 s timeout towards a second while they
/// live; once silent, each is reaped within the bound of the timeout it
/// has then.
#[tokio::test(start_paused = true)]
async fn a_session_heartbeating_faster_than_configured_is_reaped_within_the_bound() {
    for retries in [0, 2, 6] {
        let store = Arc::new(MemoryStore::new());
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(10 * SECOND)
            .probe_retries(retries)
            .build(Arc::clone(&store), ScriptedProber::always(Probe::nobody()))
            .unwrap();
        let sessions = create(&store, RouterId::new(1), &[1, 2, 3]).await;
        let reaps = sessions
            .iter()
            .zip([20, 40, 80])
            .map(|(session, seconds)| {
                monitor.watch(session).unwrap();
                let beats = seconds * 10;
                silent_after(&monitor, session, vec![Duration::from_millis(100); beats])
            })
            .collect();
        let what = format!("{retries} retries, 100 ms heartbeats, 10 s configured");
        assert_eq!(assert_within_bounds(&what, reaps).await, 3, "{what}");
    }
}

/// A configuration the builder accepts, sessions that heartbeat at random
/// then fall silent, and a prober that never spares anyone.
#[derive(Clone, Debug)]
struct Case {
    granularity: u64,
    interval: u64,
    timeouts: (u64, u64),
    pause_allowance: u64,
    probe_timeout: u64,
    retries: u32,
    backoff: (u64, u64),
    jitter: bool,
    factor: f32,
    /// The backoff's `max_duration`, if any.
    cap: Option<u64>,
    probe: Probe,
    /// Per router, per session: the gaps between its heartbeats, as
    /// fractions (‰) of the longest gap that cannot convict it.
    routers: Vec<Vec<Vec<u16>>>,
}

impl Case {
    fn builder(&self) -> session_lifecycle::liveness::LivenessMonitorBuilder {
        let ms = Duration::from_millis;
        LivenessMonitor::builder()
            .granularity(ms(self.granularity))
            .heartbeat_interval(ms(self.interval))
            .timeout_range(ms(self.timeouts.0), ms(self.timeouts.1))
            .pause_allowance(ms(self.pause_allowance))
            .probe_timeout(ms(self.probe_timeout))
            .probe_backoff(
                Backoff::new()
                    .retries(self.retries)
                    .delays(ms(self.backoff.0), ms(self.backoff.1))
                    .jitter(self.jitter)
                    .factor(self.factor)
                    .max_duration(self.cap.map(ms)),
            )
    }

    /// The gaps of one session: each at most the minimum timeout less two
    /// ticks (the clock's lag and the wheel's), so that no gap convicts.
    fn gaps(&self, fractions: &[u16]) -> Vec<Duration> {
        let longest = self.timeouts.0.saturating_sub(2 * self.granularity).max(1);
        fractions
            .iter()
            .map(|&f| Duration::from_millis((longest * u64::from(f) / 1_000).max(1)))
            .collect()
    }
}

fn case() -> impl Strategy<Value = Case> {
    let probe = prop_oneof![
        Just(Probe::nobody()),
        Just(Probe::Never),
        Just(Probe::Error),
        (1..=5_000u64).prop_map(|late| Probe::Slow {
            // Set relative to the probe timeout below.
            delay: Duration::from_millis(late),
            answer: Subset::All,
        }),
    ];
    let sessions = prop::collection::vec(prop::collection::vec(0..=1_000u16, 0..=24), 1..=4);
    (
        (20..=250u64, 0..=4_000u64, 0..=4_000u64, 0..=20_000u64),
        (0..=2_000u64, 1..=3_000u64, 0..=6u32),
        (
            0..=3_000u64,
            0..=6_000u64,
            any::<bool>(),
            prop::sample::select(vec![1.0f32, 1.5, 2.0, 3.0]),
            prop::option::of(0..=8_000u64),
        ),
        probe,
        prop::collection::vec(sessions, 1..=2),
    )
        .prop_map(
            |(
                (granularity, interval, min, span),
                (pause, probe_timeout, retries),
                (bmin, bspan, jitter, factor, cap),
                probe,
                routers,
            )| {
                let probe = match probe {
                    // Answers always come after the probe timeout.
                    Probe::Slow { delay, answer } => Probe::Slow {
                        delay: delay + Duration::from_millis(probe_timeout),
                        answer,
                    },
                    other => other,
                };
                Case {
                    granularity,
                    interval: granularity + interval,
                    timeouts: (granularity + min, granularity + min + span),
                    pause_allowance: pause,
                    probe_timeout,
                    retries,
                    backoff: (bmin, bmin + bspan),
                    jitter,
                    factor,
                    cap,
                    probe,
                    routers,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Over random accepted configurations (tick, interval, timeouts,
    /// pause allowance, probe timeout, 0 to 6 retries, backoff range,
    /// factor, jitter and total cap), sessions heartbeating at random then falling silent at
    /// random times, on one or two routers, with a prober that never
    /// spares anyone: each is reaped within `reap_bound` of its timeout
    /// after its last heartbeat.
    #[test]
    fn every_accepted_configuration_reaps_within_the_bound(case in case()) {
        run_paused(async {
            let store = Arc::new(MemoryStore::new());
            let monitor = case
                .builder()
                .build(Arc::clone(&store), ScriptedProber::always(case.probe))
                .unwrap();
            let mut reaps = Vec::new();
            let mut id = 0;
            for (r, sessions) in case.routers.iter().enumerate() {
                let ids: Vec<u64> = (id..id + sessions.len() as u64).collect();
                id += sessions.len() as u64;
                let created = create(&store, RouterId::new(r as u64), &ids).await;
                for (session, fractions) in created.iter().zip(sessions) {
                    monitor.watch(session).unwrap();
                    reaps.push(silent_after(&monitor, session, case.gaps(fractions)));
                }
            }
            let measured = assert_within_bounds(&format!("{case:?}"), reaps).await;
            let stats = monitor.stats();
            assert_eq!(stats.stalls, 0);
            assert_eq!(stats.reaped as usize, measured, "{stats:?}");
        });
    }
}
