//! Adversarial configurations against I11 ("bounds are true") and I4
//! (a deletion ends within its deadline plus retries whatever the notifier
//! does): builder settings at their edges (zero, one, huge, `Duration::MAX`,
//! `u32::MAX` / `usize::MAX` batch sizes, a 1 ms tick with long timeouts, a
//! rate-1/burst-1 budget under a 1,000-session deletion), checked on paused
//! time: `build()` refuses with a typed error exactly the settings its
//! documentation says it refuses, or the documented bound holds (`max_wait`,
//! `reap_bound`, one expiry tick, the reclaim starvation bound), and no
//! accessor panics (overflow checks are on in tests).
//!
//! `PROPTEST_CASES=N` raises the number of cases of every property.

use std::sync::Arc;

use proptest::prelude::*;
use session_lifecycle::test_util::strategy::cases;
use session_lifecycle::test_util::{
    HOUR, Notify, Probe, ScriptedNotifier, ScriptedProber, Subset, paused_runtime, run_paused,
    within,
};
use session_lifecycle::{
    Backoff, BuildError, CloseReason, ExpiryMonitor, LivenessMonitor, MemoryStore, NewSession,
    NotificationBudget, ReclaimQueue, ResourceClass, RouterDeleter, RouterId, Session, SessionId,
    SessionStore, reclaim::DefaultPolicy, reclaim::ReclaimError, reclaim::ReclaimPolicy,
    reclaim::ReclaimTask, reclaim::RetrySchedule,
};
use tokio::time::{Duration, Instant};

const DAY: Duration = Duration::from_secs(24 * 3600);
const NS: Duration = Duration::from_nanos(1);
const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);

/// `default` cases (`PROPTEST_CASES` overrides), and no regression file
/// written next to this one: a failure prints its minimal input.
fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Registers `router` and creates sessions `ids` on it.
async fn create(store: &MemoryStore, router: RouterId, ids: std::ops::Range<u64>) -> Vec<Session> {
    let incarnation = store.register_router(router).await.unwrap();
    let mut sessions = Vec::new();
    for id in ids {
        let spec = NewSession::new(SessionId::new(id), router, incarnation);
        sessions.push(store.create(spec).await.unwrap());
    }
    sessions
}

// ---------------------------------------------------------------------------
// Accessors at the extremes.
// ---------------------------------------------------------------------------

/// `max_wait`, `reap_bound`, `longest_total` and `max_delay` saturate
/// instead of panicking on the most extreme settings each builder accepts,
/// and on the most extreme arguments.
#[tokio::test(start_paused = true)]
async fn accessors_saturate_on_extreme_accepted_settings() {
    let store = Arc::new(MemoryStore::new());
    let wild = Backoff::new()
        .retries(u32::MAX)
        .delays(NS, DAY)
        .factor(f32::MAX)
        .jitter(true);
    let budget = NotificationBudget::builder()
        .rate(1)
        .burst(1)
        .build()
        .unwrap();
    for batch in [1, u32::MAX as usize, usize::MAX] {
        for rate in [1, u32::MAX] {
            let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
            let deleter = RouterDeleter::builder()
                .batch_size(batch)
                .notify_rate(rate)
                .notify_timeout(Duration::MAX)
                .confirm_timeout(Duration::MAX)
                .backoff(wild)
                .notification_budget(budget.clone())
                .build(Arc::clone(&store), notifier)
                .unwrap();
            for sessions in [0, 1, u32::MAX as usize, usize::MAX] {
                let _ = deleter.max_wait(sessions);
            }
            assert_eq!(deleter.max_wait(usize::MAX), Duration::MAX);
        }
    }
    // The smallest settings: a bound, not a panic, and not zero.
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
    let tiny = RouterDeleter::builder()
        .batch_size(usize::MAX)
        .notify_timeout(Duration::ZERO)
        .confirm_timeout(Duration::ZERO)
        .backoff(
            Backoff::new()
                .retries(0)
                .delays(Duration::ZERO, Duration::ZERO),
        )
        .build(Arc::clone(&store), notifier)
        .unwrap();
    // Three timers of 1 ms slack each, and the pick-up of a held future
    // (21 ms).
    assert_eq!(tiny.max_wait(1), Duration::from_millis(24));
    let _ = tiny.max_wait(usize::MAX);

    for granularity in [MS, SECOND] {
        let monitor = LivenessMonitor::builder()
            .granularity(granularity)
            .heartbeat_interval(DAY)
            .timeout_range(granularity, DAY)
            .pause_allowance(DAY)
            .probe_timeout(DAY)
            .probe_batch_max(usize::MAX)
            .probe_backoff(wild.delays(DAY, DAY))
            .partition_min_routers(usize::MAX)
            .partition_max_hold(Some(DAY))
            .build(Arc::clone(&store), ScriptedProber::always(Probe::Never))
            .unwrap();
        assert_eq!(monitor.reap_bound(Duration::MAX), Duration::MAX);
        let _ = monitor.reap_bound(Duration::ZERO);
        monitor.shutdown().await;
    }

    let _ = wild.longest_total();
    let _ = wild.max_duration(Duration::MAX).longest_total();
    let schedule = RetrySchedule::new(wild).attempt_timeout(Duration::MAX);
    assert_eq!(schedule.longest_total(), Duration::MAX);
    assert_eq!(schedule.max_attempts(), u32::MAX);
    let policy = DefaultPolicy::default().class_spacing(Duration::MAX);
    assert_eq!(policy.max_delay(), DAY * 3 + DAY / 2);
}

/// The settings each builder documents as refused are refused with a typed
/// error naming the setting, never with a panic; the edges documented as
/// accepted are accepted.
#[tokio::test(start_paused = true)]
async fn builders_refuse_exactly_the_documented_edges() {
    let store = Arc::new(MemoryStore::new());
    let refused = |result: Result<(), BuildError>| result.unwrap_err().refused_setting();
    let budget = |rate, burst| {
        NotificationBudget::builder()
            .rate(rate)
            .burst(burst)
            .build()
            .map(drop)
    };
    assert_eq!(refused(budget(0, 1)), Some("rate"));
    assert_eq!(refused(budget(1_000_000_001, 1)), Some("rate"));
    assert_eq!(refused(budget(1, 0)), Some("burst"));
    budget(1, 1).unwrap();
    budget(1_000_000_000, u32::MAX).unwrap();

    let deleter = |builder: session_lifecycle::RouterDeleterBuilder| {
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
        builder.build(Arc::clone(&store), notifier).map(drop)
    };
    assert_eq!(
        refused(deleter(RouterDeleter::builder().batch_size(0))),
        Some("batch_size")
    );
    assert_eq!(
        refused(deleter(RouterDeleter::builder().notify_rate(0))),
        Some("notify_rate")
    );
    for bad in [
        Backoff::new().delays(SECOND, MS),
        Backoff::new().delays(MS, DAY + NS),
        Backoff::new().factor(0.5),
        Backoff::new().factor(f32::NAN),
        Backoff::new().factor(f32::INFINITY),
    ] {
        assert_eq!(
            refused(deleter(RouterDeleter::builder().backoff(bad))),
            Some("backoff")
        );
    }
    assert_eq!(
        refused(deleter(RouterDeleter::builder().max_concurrent(0))),
        Some("max_concurrent")
    );

    let monitor = |builder: session_lifecycle::liveness::LivenessMonitorBuilder| {
        builder
            .build(Arc::clone(&store), ScriptedProber::always(Probe::Never))
            .map(drop)
    };
    let lb = LivenessMonitor::builder;
    assert_eq!(
        refused(monitor(lb().granularity(MS - NS))),
        Some("granularity")
    );
    assert_eq!(
        refused(monitor(lb().granularity(SECOND + NS))),
        Some("granularity")
    );
    assert_eq!(
        refused(monitor(lb().probe_timeout(Duration::ZERO))),
        Some("probe_timeout")
    );
    assert_eq!(
        refused(monitor(lb().probe_timeout(DAY + NS))),
        Some("probe_timeout")
    );
    assert_eq!(
        refused(monitor(lb().timeout_range(DAY, DAY + NS))),
        Some("timeout_range")
    );
    assert_eq!(
        refused(monitor(lb().pause_allowance(Duration::MAX))),
        Some("pause_allowance")
    );
    assert_eq!(
        refused(monitor(lb().probe_batch_max(0))),
        Some("probe_batch_max")
    );
    for share in [0.0, 1.0, f64::NAN] {
        assert_eq!(
            refused(monitor(lb().partition_share(share))),
            Some("partition_share")
        );
    }
    monitor(lb().probe_timeout(NS).granularity(MS).timeout_range(MS, MS)).unwrap();

    let expiry = |tick| {
        ExpiryMonitor::builder()
            .tick(tick)
            .warn_before(Duration::MAX)
            .build(Arc::clone(&store))
            .map(drop)
    };
    assert_eq!(refused(expiry(MS - NS)), Some("tick"));
    assert_eq!(refused(expiry(Duration::from_secs(60) + NS)), Some("tick"));
    expiry(MS).unwrap();
    expiry(Duration::from_secs(60)).unwrap();

    let queue = |capacity, workers| {
        ReclaimQueue::builder()
            .capacity(capacity)
            .workers(workers)
            .build()
            .map(drop)
    };
    assert_eq!(refused(queue(0, 1)), Some("capacity"));
    assert_eq!(refused(queue(usize::MAX, 1)), Some("capacity"));
    assert_eq!(refused(queue(1, 0)), Some("workers"));
    assert_eq!(refused(queue(1, 1_025)), Some("workers"));
    queue(usize::MAX >> 3, 1_024).unwrap();
}

// ---------------------------------------------------------------------------
// Deleter: max_wait (I4, I11).
// ---------------------------------------------------------------------------

/// A deleter configuration at the edges, and what its router does.
#[derive(Clone, Debug)]
struct DeleterCase {
    batch_size: usize,
    notify_rate: Option<u32>,
    notify_timeout: Duration,
    confirm_timeout: Duration,
    retries: u32,
    delays: (Duration, Duration),
    factor: f32,
    jitter: bool,
    max_duration: Option<Duration>,
    /// Rate and burst of a notification budget, if any.
    budget: Option<(u32, u32)>,
    sessions: u64,
    notify: Notify,
}

impl DeleterCase {
    fn backoff(&self) -> Backoff {
        Backoff::new()
            .retries(self.retries)
            .delays(self.delays.0, self.delays.1)
            .factor(self.factor)
            .jitter(self.jitter)
            .max_duration(self.max_duration)
    }

    /// The setting `build` must refuse, per its documentation, if any.
    fn invalid(&self) -> Option<&'static str> {
        if self.batch_size == 0 {
            Some("batch_size")
        } else if self.notify_rate == Some(0) {
            Some("notify_rate")
        } else if self.backoff().validate().is_err() {
            Some("backoff")
        } else {
            None
        }
    }
}

fn edge_duration() -> impl Strategy<Value = Duration> {
    prop::sample::select(vec![
        Duration::ZERO,
        NS,
        MS - NS,
        MS,
        MS + NS,
        Duration::from_millis(333),
        SECOND,
        Duration::from_secs(7),
        DAY,
    ])
}

fn deleter_case() -> impl Strategy<Value = DeleterCase> {
    let notify = |timeout: Duration, confirm: Duration| {
        let late = timeout.saturating_add(confirm).saturating_add(SECOND);
        prop_oneof![
            Just(Notify::Never),
            Just(Notify::Error),
            Just(Notify::Panic),
            Just(Notify::Confirm(Subset::None)),
            Just(Notify::Confirm(Subset::All)),
            Just(Notify::Slow {
                delay: late,
                confirm: Subset::All
            }),
            Just(Notify::Later {
                delay: late,
                confirm: Subset::All
            }),
        ]
    };
    (
        (
            prop::sample::select(vec![0usize, 1, 2, 3, 1_000, u32::MAX as usize, usize::MAX]),
            prop::option::of(prop::sample::select(vec![0u32, 1, 3, 1_000, u32::MAX])),
            edge_duration(),
            edge_duration(),
        ),
        (
            prop_oneof![0..=3u32, Just(0u32)],
            edge_duration(),
            edge_duration(),
            prop::sample::select(vec![1.0f32, 2.0, 1e30, f32::MAX, 0.5, f32::NAN]),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![
                Duration::ZERO,
                NS,
                SECOND,
                DAY,
                Duration::MAX,
            ])),
        ),
        prop::option::of((
            prop::sample::select(vec![1u32, 3, 1_000_000_000]),
            prop::sample::select(vec![1u32, 2, u32::MAX]),
        )),
        0..=24u64,
    )
        .prop_flat_map(
            move |(
                (batch_size, notify_rate, notify_timeout, confirm_timeout),
                (retries, d0, d1, factor, jitter, max_duration),
                budget,
                sessions,
            )| {
                // Ordered mostly (an inverted range is a refusal to check).
                let delays = if d0 <= d1 || sessions % 5 == 0 {
                    (d0, d1)
                } else {
                    (d1, d0)
                };
                notify(notify_timeout, confirm_timeout).prop_map(move |notify| DeleterCase {
                    batch_size,
                    notify_rate,
                    notify_timeout,
                    confirm_timeout,
                    retries,
                    delays,
                    factor,
                    jitter,
                    max_duration,
                    budget,
                    sessions,
                    notify,
                })
            },
        )
}

/// Runs one deleter case: `build` refuses exactly the documented invalid
/// settings with a typed error; otherwise the deletion ends within
/// `max_wait(sessions)` and closes every session. `Err` describes a failure.
async fn deleter_case_holds(case: &DeleterCase) -> Result<(), String> {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let sessions = create(&store, router, 0..case.sessions).await;
    let notifier = ScriptedNotifier::always(Arc::clone(&store), case.notify);
    let mut builder = RouterDeleter::builder()
        .batch_size(case.batch_size)
        .notify_timeout(case.notify_timeout)
        .confirm_timeout(case.confirm_timeout)
        .backoff(case.backoff());
    if let Some(rate) = case.notify_rate {
        builder = builder.notify_rate(rate);
    }
    if let Some((rate, burst)) = case.budget {
        let budget = NotificationBudget::builder()
            .rate(rate)
            .burst(burst)
            .build()
            .map_err(|e| format!("budget refused: {e}"))?;
        builder = builder.notification_budget(budget);
    }
    let built = builder.build(Arc::clone(&store), notifier);
    let deleter = match (built, case.invalid()) {
        (Err(error), Some(setting)) => {
            return if error.refused_setting() == Some(setting) {
                Ok(())
            } else {
                Err(format!("refused {error} instead of `{setting}`"))
            };
        }
        (Err(error), None) => return Err(format!("refused an accepted setting: {error}")),
        (Ok(_), Some(setting)) => return Err(format!("accepted an invalid `{setting}`")),
        (Ok(deleter), None) => deleter,
    };
    let bound = deleter.max_wait(sessions.len());
    let start = Instant::now();
    let limit = bound.saturating_add(HOUR).min(DAY * 3650);
    let outcome = tokio::time::timeout(limit, deleter.delete(router))
        .await
        .map_err(|_| format!("not finished within {limit:?} (max_wait {bound:?})"))?
        .map_err(|e| format!("deletion failed: {e}"))?;
    let took = start.elapsed();
    if took > bound {
        return Err(format!("took {took:?} > max_wait {bound:?}"));
    }
    let report = outcome.report().ok_or("no report")?.clone();
    if report.sessions != sessions.len() || sessions.iter().any(|s| !s.is_closed()) {
        return Err(format!("sessions left open: {report:?}"));
    }
    if !store.is_empty() {
        return Err("store not empty".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    /// Over deleter settings at their edges (batch sizes 1 to `usize::MAX`,
    /// notify rates 1 to `u32::MAX`, timeouts from zero and one nanosecond
    /// to a day, 0 to 3 retries, backoffs with zero, sub-millisecond and
    /// day-long delays, factor up to `f32::MAX`, caps from zero to
    /// `Duration::MAX`, minimal and huge budgets) and a router that hangs,
    /// errors, panics, ignores, or answers after the deadline: `build`
    /// refuses exactly what its documentation refuses, and an accepted
    /// deletion ends within `max_wait(sessions)`, every session closed.
    #[test]
    fn every_accepted_deleter_configuration_ends_within_max_wait(case in deleter_case()) {
        let outcome = run_paused(deleter_case_holds(&case));
        prop_assert!(outcome.is_ok(), "{}: {case:?}", outcome.unwrap_err());
    }
}

/// A rate-1, burst-1 budget under a 1,000-session deletion, for every
/// batch size from one session a call to all in one, with and without
/// pacing, whatever the router does: the deletion still ends within
/// `max_wait(1_000)`, every session closed (most of them forced).
#[test]
fn a_thousand_sessions_on_a_rate_one_burst_one_budget_end_within_max_wait() {
    for batch_size in [1usize, 7, 1_000, usize::MAX] {
        for notify_rate in [None, Some(1u32), Some(u32::MAX)] {
            for notify in [
                Notify::Never,
                Notify::Error,
                Notify::Confirm(Subset::All),
                Notify::Later {
                    delay: HOUR,
                    confirm: Subset::All,
                },
            ] {
                let case = DeleterCase {
                    batch_size,
                    notify_rate,
                    notify_timeout: SECOND,
                    confirm_timeout: Duration::from_secs(10),
                    retries: 2,
                    delays: (Duration::from_millis(500), Duration::from_secs(4)),
                    factor: 2.0,
                    jitter: true,
                    max_duration: None,
                    budget: Some((1, 1)),
                    sessions: 1_000,
                    notify,
                };
                let outcome = run_paused(deleter_case_holds(&case));
                assert!(outcome.is_ok(), "{}: {case:?}", outcome.unwrap_err());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Liveness: reap_bound (I11).
// ---------------------------------------------------------------------------

/// A liveness configuration at the edges.
#[derive(Clone, Debug)]
struct LivenessCase {
    granularity: Duration,
    interval: Duration,
    timeouts: (Duration, Duration),
    pause_allowance: Duration,
    probe_timeout: Duration,
    probe_batch: usize,
    /// `None`: the default backoff, with this many retries.
    backoff: Result<Backoff, u32>,
    budget: Option<(u32, u32)>,
    probe: Probe,
    sessions: u64,
}

fn liveness_case() -> impl Strategy<Value = LivenessCase> {
    // A fine tick with short timeouts and probes, or a coarse one with
    // timeouts up to an hour and long probes: paused time still ticks the
    // monitor once per granularity. The last element scales the backoff.
    let timing = prop_oneof![
        (
            Just(MS),
            prop::sample::select(vec![MS, 2 * MS, Duration::from_millis(700)]),
            prop::sample::select(vec![MS, 3 * MS, Duration::from_millis(900)]),
            prop::sample::select(vec![Duration::ZERO, MS, Duration::from_millis(1_500)]),
            prop::sample::select(vec![Duration::ZERO, MS, Duration::from_millis(400)]),
            prop::sample::select(vec![
                NS,
                Duration::from_micros(999),
                MS,
                Duration::from_millis(50)
            ]),
            Just(Duration::from_millis(80)),
        ),
        (
            Just(SECOND),
            prop::sample::select(vec![SECOND, DAY]),
            prop::sample::select(vec![SECOND, Duration::from_secs(3)]),
            prop::sample::select(vec![Duration::ZERO, SECOND, Duration::from_secs(5), HOUR]),
            prop::sample::select(vec![Duration::ZERO, SECOND, DAY]),
            prop::sample::select(vec![NS, MS, SECOND, Duration::from_secs(600)]),
            Just(Duration::from_secs(900)),
        ),
    ];
    let backoff = prop_oneof![
        (0..=3u32).prop_map(|retries| (Err(retries), None)),
        (
            0..=3u32,
            prop::sample::select(vec![0u32, 1, 2]),
            prop::sample::select(vec![f32::MAX, 1.0, 3.0]),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![Duration::ZERO, NS, SECOND])),
        )
            .prop_map(|(retries, min, factor, jitter, cap)| {
                let backoff = Backoff::new()
                    .retries(retries)
                    .factor(factor)
                    .jitter(jitter)
                    .max_duration(cap);
                (Ok(backoff), Some(min))
            }),
    ];
    let probe = prop_oneof![
        Just(Probe::nobody()),
        Just(Probe::Never),
        Just(Probe::Error),
        Just(Probe::Panic),
        Just(Probe::Slow {
            delay: DAY * 2,
            answer: Subset::All
        }),
    ];
    (
        timing,
        prop::sample::select(vec![1usize, 2, usize::MAX]),
        backoff,
        prop::option::of(Just((1u32, 1u32))),
        probe,
        1..=4u64,
    )
        .prop_map(
            |(
                (granularity, interval, min, span, pause_allowance, probe_timeout, scale),
                probe_batch,
                (backoff, delays),
                budget,
                probe,
                sessions,
            )| {
                // Backoff delays from zero, a nanosecond, or `scale`, up to `scale`.
                let backoff = backoff.map(|b| match delays {
                    Some(0) => b.delays(Duration::ZERO, scale),
                    Some(1) => b.delays(NS, scale),
                    _ => b.delays(scale, scale),
                });
                LivenessCase {
                    granularity,
                    interval,
                    timeouts: (min, (min + span).min(DAY)),
                    pause_allowance,
                    probe_timeout,
                    probe_batch,
                    backoff,
                    budget,
                    probe,
                    sessions,
                }
            },
        )
}

/// Runs one liveness case: every silent session is reaped within
/// `reap_bound(timeout)` of when it was last heard.
async fn liveness_case_holds(case: &LivenessCase) -> Result<(), String> {
    let store = Arc::new(MemoryStore::new());
    let mut builder = LivenessMonitor::builder()
        .granularity(case.granularity)
        .heartbeat_interval(case.interval)
        .timeout_range(case.timeouts.0, case.timeouts.1)
        .pause_allowance(case.pause_allowance)
        .probe_timeout(case.probe_timeout)
        .probe_batch_max(case.probe_batch);
    builder = match case.backoff {
        Ok(backoff) => builder.probe_backoff(backoff),
        Err(retries) => builder.probe_retries(retries),
    };
    if let Some((rate, burst)) = case.budget {
        let budget = NotificationBudget::builder()
            .rate(rate)
            .burst(burst)
            .build()
            .unwrap();
        builder = builder.notification_budget(budget);
    }
    let monitor = builder
        .build(Arc::clone(&store), ScriptedProber::always(case.probe))
        .map_err(|e| format!("refused an accepted setting: {e}"))?;
    let sessions = create(&store, RouterId::new(1), 0..case.sessions).await;
    let mut reaps = Vec::new();
    for session in &sessions {
        monitor.watch(session).map_err(|e| e.to_string())?;
        let heard = Instant::now();
        let timeout = monitor.timeout(session).ok_or("no timeout")?;
        let bound = monitor.reap_bound(timeout);
        let session = session.clone();
        reaps.push(tokio::spawn(async move {
            let limit = bound.saturating_add(HOUR);
            let reason = tokio::time::timeout(limit, session.closed()).await;
            (session.id(), reason, heard.elapsed(), bound, timeout)
        }));
        // Watched at different points of the first one's probing.
        tokio::time::sleep(case.probe_timeout.min(case.granularity) * 3 / 2).await;
    }
    for reap in reaps {
        let (id, reason, took, bound, timeout) = reap.await.unwrap();
        match reason {
            Ok(CloseReason::LivenessTimeout) if took <= bound => {}
            other => {
                return Err(format!(
                    "{id}: {other:?} after {took:?}, reap_bound({timeout:?}) = {bound:?}"
                ));
            }
        }
    }
    monitor.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    /// Over liveness settings at their edges (a 1 ms tick with timeouts of
    /// one tick, a 1 s tick with timeouts up to a day, probe timeouts from
    /// a nanosecond to hours, one suspect per probe call, backoffs with
    /// factor `f32::MAX`, a rate-1/burst-1 budget) and a prober that never
    /// spares anyone: every silent session is reaped within
    /// `reap_bound(timeout)` of being watched.
    #[test]
    fn every_accepted_liveness_configuration_reaps_within_the_bound(case in liveness_case()) {
        let outcome = run_paused(liveness_case_holds(&case));
        prop_assert!(outcome.is_ok(), "{}: {case:?}", outcome.unwrap_err());
    }
}

// ---------------------------------------------------------------------------
// Expiry: one tick (I11).
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(48))]

    /// Over ticks from 1 ms to 60 s, expiries from already past to a day
    /// ahead (at tick edges, off by a nanosecond), and warnings from none
    /// to `Duration::MAX` ahead: a tracked session closes as expired within
    /// one tick (and 1 ms, tokio's timer resolution) after its expiry,
    /// never before.
    #[test]
    fn an_expiry_fires_within_one_tick_at_every_accepted_tick(
        tick in prop::sample::select(vec![MS, 7 * MS, Duration::from_millis(250), SECOND, Duration::from_secs(60)]),
        built_after in prop::sample::select(vec![Duration::ZERO, NS, Duration::from_micros(1_500)]),
        offset in prop::sample::select(vec![0i8, 1, 2, 3, 4, 5, 6]),
        warn_before in prop::sample::select(vec![Duration::ZERO, NS, MS, HOUR, Duration::MAX]),
    ) {
        let outcome = run_paused(async {
            // Off the millisecond grid, so that the monitor's epoch is too.
            tokio::time::advance(built_after).await;
            let store = Arc::new(MemoryStore::new());
            let monitor = ExpiryMonitor::builder()
                .tick(tick)
                .warn_before(warn_before)
                .build(Arc::clone(&store))
                .unwrap();
            let router = RouterId::new(1);
            let incarnation = store.register_router(router).await.unwrap();
            let now = Instant::now();
            // Short lead times with a fine tick; up to a day with a coarse one.
            let far = if tick >= SECOND { DAY } else { Duration::from_secs(5) };
            let at = match offset {
                0 => now,
                1 => now + NS,
                2 => now + tick - NS,
                3 => now + tick,
                4 => now + tick + NS,
                5 => now + far,
                _ => now.checked_sub(SECOND).unwrap_or(now),
            };
            let spec = NewSession::new(SessionId::new(1), router, incarnation).expires_at(at);
            let session = store.create(spec).await.unwrap();
            monitor.track(&session).unwrap();
            let reason = within(far + HOUR, session.closed()).await;
            let closed = Instant::now();
            monitor.shutdown().await;
            let from = at.max(now);
            // One tick, and up to 1 ms more: tokio's timer resolution.
            if reason != CloseReason::Expired || closed < at || closed > from + tick + MS {
                return Err(format!(
                    "{reason:?} at {:?} after tracking, expiry at {:?}, tick {tick:?}",
                    closed - now,
                    at.saturating_duration_since(now),
                ));
            }
            Ok(())
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

// ---------------------------------------------------------------------------
// Reclaim: the starvation bound (I11).
// ---------------------------------------------------------------------------

/// For class spacings from zero through a nanosecond to a day and
/// `Duration::MAX` (clamped), one worker, a low task pushed first and a
/// stream of critical work after it, for 5 × `max_delay`: no critical task
/// pushed more than `max_delay` after the low one runs before it.
#[test]
fn a_low_task_is_not_starved_past_the_aging_bound_at_any_spacing() {
    for spacing in [Duration::ZERO, NS, MS, SECOND, DAY, Duration::MAX] {
        let policy = DefaultPolicy::default().class_spacing(spacing);
        let bound = policy.max_delay();
        paused_runtime().block_on(async {
            let queue = ReclaimQueue::builder()
                .workers(1)
                .capacity(1_024)
                .paused(true)
                .policy(policy.clone())
                .build()
                .unwrap();
            let ran = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let task = |i: u64, class| {
                let ran = Arc::clone(&ran);
                ReclaimTask::new(SessionId::new(i), RouterId::new(1), move || {
                    ran.lock().push(i);
                    async { Ok::<(), ReclaimError>(()) }
                })
                .class(class)
            };
            let start = Instant::now();
            queue.push(task(0, ResourceClass::Low)).await.unwrap();
            let step = (bound / 20).max(NS);
            let mut pushed_at = vec![Duration::ZERO];
            for i in 1..=100u64 {
                tokio::time::advance(step).await;
                pushed_at.push(start.elapsed());
                queue
                    .push(task(i, ResourceClass::Critical).traffic(u64::MAX))
                    .await
                    .unwrap();
            }
            queue.resume();
            within(HOUR, queue.idle()).await;
            let ran = ran.lock().clone();
            let low = ran.iter().position(|&i| i == 0).unwrap();
            for &before in &ran[..low] {
                let at = pushed_at[usize::try_from(before).unwrap()];
                assert!(
                    at <= bound,
                    "spacing {spacing:?}: critical task pushed {at:?} after the low one ran first (bound {bound:?})"
                );
            }
            let _ = policy.priority(&ReclaimTask::new(
                SessionId::new(0),
                RouterId::new(1),
                || async { Ok::<(), ReclaimError>(()) },
            )
            .info());
        });
    }
}

/// The documented expiry bound ("a session closes within one tick after its
/// expiry, and up to 1 ms more") at a tick of 250 ms, for a monitor built
/// off tokio's millisecond timer grid (as it always is on a real clock):
/// the monitor's tick instants are `epoch + k × tick`, which tokio's timer
/// rounds up to the next millisecond.
#[test]
fn an_expiry_closes_within_one_tick_when_the_monitor_is_built_off_the_millisecond_grid() {
    let tick = Duration::from_millis(250);
    for built_after in [Duration::from_micros(1_500), Duration::from_micros(2_999)] {
        let (late, bound) = run_paused(async {
            tokio::time::advance(built_after).await;
            let store = Arc::new(MemoryStore::new());
            let monitor = ExpiryMonitor::builder()
                .tick(tick)
                .warn_before(Duration::ZERO)
                .build(Arc::clone(&store))
                .unwrap();
            let router = RouterId::new(1);
            let incarnation = store.register_router(router).await.unwrap();
            let at = Instant::now() + NS;
            let spec = NewSession::new(SessionId::new(1), router, incarnation).expires_at(at);
            let session = store.create(spec).await.unwrap();
            monitor.track(&session).unwrap();
            let reason = within(HOUR, session.closed()).await;
            assert_eq!(reason, CloseReason::Expired);
            (Instant::now() - at, tick + MS)
        });
        assert!(
            late <= bound,
            "built {built_after:?} after the runtime: closed {late:?} after its expiry, more than one tick and 1 ms ({bound:?})"
        );
    }
}

/// The documented warning bound ("the warning comes at most one tick
/// earlier than `warn_before`, and at most 1 ms later") for a monitor
/// built off the millisecond grid, with the warning instant just after a
/// tick starts.
#[test]
fn an_expiry_warning_is_never_later_than_warn_before_off_the_millisecond_grid() {
    let tick = Duration::from_millis(250);
    let warn_before = Duration::from_secs(10);
    let (late_by, when) = run_paused(async {
        tokio::time::advance(Duration::from_micros(1_500)).await;
        let store = Arc::new(MemoryStore::new());
        let bus = session_lifecycle::EventBus::new(64);
        let mut events = bus.subscribe();
        let monitor = ExpiryMonitor::builder()
            .tick(tick)
            .warn_before(warn_before)
            .events(bus)
            .build(Arc::clone(&store))
            .unwrap();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let epoch = Instant::now();
        // The warning is due 100 µs into tick 8.
        let at = epoch + tick * 8 + Duration::from_micros(100) + warn_before;
        let spec = NewSession::new(SessionId::new(1), router, incarnation).expires_at(at);
        let session = store.create(spec).await.unwrap();
        monitor.track(&session).unwrap();
        loop {
            match within(HOUR, events.recv()).await {
                Some(session_lifecycle::Event::SessionExpiringSoon { .. }) => break,
                Some(_) => {}
                None => panic!("the bus closed"),
            }
        }
        let now = Instant::now();
        (now.saturating_duration_since(at - warn_before), now - epoch)
    });
    assert!(
        late_by <= MS,
        "warned {late_by:?} after `warn_before` ahead of the expiry ({when:?} after tracking)"
    );
}

/// Partition-guard settings at their edges (`partition_min_routers` 0 and
/// 1, "always"; a share exactly reached, not passed; a window of one
/// tick): with the silent share at or below the threshold, the guard must
/// not delay a reap, so the dead routers' sessions are reaped within
/// `reap_bound` while the live routers keep heartbeating.
#[test]
fn a_silent_share_at_the_threshold_is_reaped_within_the_bound() {
    let cases: [(u64, u64, f64, usize, Option<Duration>); 6] = [
        (4, 2, 0.5, 4, None),
        (2, 1, 0.5, 0, None),
        (2, 1, 0.5, 1, Some(Duration::from_millis(50))),
        (3, 1, 1.0 / 3.0, 0, None),
        (10, 1, 0.1, 4, Some(DAY)),
        (10, 3, 0.3, 10, None),
    ];
    for (routers, dead, share, min_routers, window) in cases {
        let what = format!("{dead} of {routers} routers, share {share}, min {min_routers}");
        run_paused(async {
            let store = Arc::new(MemoryStore::new());
            let mut builder = LivenessMonitor::builder()
                .probe_timeout(SECOND)
                .probe_retries(1)
                .partition_share(share)
                .partition_min_routers(min_routers);
            if let Some(window) = window {
                builder = builder.partition_window(window);
            }
            let monitor = builder
                .build(Arc::clone(&store), ScriptedProber::always(Probe::nobody()))
                .unwrap();
            let mut beating = Vec::new();
            let mut reaps = Vec::new();
            for r in 0..routers {
                let sessions = create(&store, RouterId::new(r), r * 2..r * 2 + 2).await;
                for session in sessions {
                    monitor.watch(&session).unwrap();
                    if r < dead {
                        let bound = monitor.reap_bound(monitor.timeout(&session).unwrap());
                        let heard = Instant::now();
                        reaps.push(tokio::spawn(async move {
                            let reason = within(bound + HOUR, session.closed()).await;
                            (reason, heard.elapsed(), bound)
                        }));
                    } else {
                        let monitor = monitor.clone();
                        beating.push(tokio::spawn(async move {
                            loop {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                monitor.heartbeat(&session).unwrap();
                            }
                        }));
                    }
                }
            }
            for reap in reaps {
                let (reason, took, bound) = reap.await.unwrap();
                assert_eq!(reason, CloseReason::LivenessTimeout, "{what}");
                assert!(
                    took <= bound,
                    "{what}: reaped after {took:?}, bound {bound:?}"
                );
            }
            for task in beating {
                task.abort();
            }
            assert!(!monitor.stats().partition_suspected, "{what}");
            monitor.shutdown().await;
        });
    }
}
