//! Every builder of the crate follows one convention: setters take any
//! value and never panic, `build()` refuses what the piece cannot honour
//! with a `BuildError` naming the setting, and nothing it accepts allocates
//! absurdly or panics later.
//!
//! The first test names the settings issue #17 found panicking or aborting;
//! the property test throws arbitrary settings at every builder.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use proptest::prelude::*;
use session_lifecycle::test_util::strategy::cases;
use session_lifecycle::test_util::{Notify, Probe, ScriptedNotifier, ScriptedProber};
use session_lifecycle::{
    AuditSweeper, Backoff, BuildError, LivenessMonitor, MemoryStore, ReclaimQueue, Reconciler,
    RouterDeleter, liveness::NoProbe,
};
use tokio::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime builds")
}

/// The setting `build` refused, or `None` if it built.
fn refused<T>(built: Result<T, BuildError>) -> Option<&'static str> {
    built.err().map(|error| {
        error
            .refused_setting()
            .unwrap_or_else(|| panic!("not a setting: {error}"))
    })
}

#[test]
fn settings_that_panicked_or_aborted_are_typed_errors() {
    let runtime = runtime();
    let _inside = runtime.enter();
    let store = Arc::new(MemoryStore::new());
    let deleter = || {
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        (RouterDeleter::builder(), notifier)
    };
    let (builder, notifier) = deleter();
    assert_eq!(
        refused(builder.batch_size(0).build(Arc::clone(&store), notifier)),
        Some("batch_size")
    );
    let (builder, notifier) = deleter();
    assert_eq!(
        refused(builder.notify_rate(0).build(Arc::clone(&store), notifier)),
        Some("notify_rate")
    );
    let (builder, notifier) = deleter();
    let backoff = Backoff::new().delays(Duration::from_secs(2), Duration::from_secs(1));
    assert_eq!(
        refused(builder.backoff(backoff).build(Arc::clone(&store), notifier)),
        Some("backoff")
    );
    let (builder, notifier) = deleter();
    let backoff = Backoff::new().delays(Duration::MAX, Duration::MAX);
    assert_eq!(
        refused(builder.backoff(backoff).build(Arc::clone(&store), notifier)),
        Some("backoff")
    );
    let (builder, notifier) = deleter();
    let backoff = Backoff::new().factor(f32::NAN);
    assert_eq!(
        refused(builder.backoff(backoff).build(Arc::clone(&store), notifier)),
        Some("backoff")
    );
    assert_eq!(
        refused(ReclaimQueue::builder().workers(usize::MAX).build()),
        Some("workers")
    );
    assert_eq!(
        refused(MemoryStore::builder().shard_amount(1 << 62).build::<()>()),
        Some("shard_amount")
    );
    assert_eq!(
        refused(MemoryStore::builder().shard_amount(48).build::<()>()),
        Some("shard_amount")
    );
    assert_eq!(
        refused(
            Reconciler::builder()
                .chunk_size(0)
                .build(Arc::clone(&store))
        ),
        Some("chunk_size")
    );
    assert_eq!(
        refused(
            AuditSweeper::builder()
                .interval(Duration::ZERO)
                .build(Arc::clone(&store))
        ),
        Some("interval")
    );
    // The errors say what is wrong and with what.
    let error = MemoryStore::builder()
        .shard_amount(3)
        .build::<()>()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "MemoryStore: `shard_amount` must be a power of two from 2 to 65536, got 3"
    );
}

#[test]
fn pieces_with_tasks_need_a_runtime() {
    let store = Arc::new(MemoryStore::new());
    let no_runtime = |built: Option<BuildError>| {
        assert!(
            matches!(built, Some(BuildError::NoRuntime { .. })),
            "{built:?}"
        );
    };
    no_runtime(ReclaimQueue::builder().build().err());
    no_runtime(
        LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .err(),
    );
    no_runtime(AuditSweeper::builder().build(Arc::clone(&store)).err());
}

/// On a runtime built without its time driver (no `enable_time`), the
/// pieces built and their tasks died on their first poll ("timers are
/// disabled"): a liveness monitor that took watches and never reaped, a
/// deletion that ended `Interrupted` with its router left fenced. Now the
/// builds and the deletion refuse with `NoRuntime`, having done nothing.
#[test]
fn a_runtime_without_its_time_driver_is_no_runtime() {
    use session_lifecycle::{
        DeleteError, ExpiryMonitor, Lifecycle, RouterId, RouterStatus, SessionStore,
    };

    let timeless = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime builds");
    let store = Arc::new(MemoryStore::new());
    let no_runtime = |built: Option<BuildError>| {
        assert!(
            matches!(built, Some(BuildError::NoRuntime { .. })),
            "{built:?}"
        );
    };
    timeless.block_on(async {
        no_runtime(ReclaimQueue::builder().build().err());
        no_runtime(
            LivenessMonitor::builder()
                .build(Arc::clone(&store), NoProbe)
                .err(),
        );
        no_runtime(AuditSweeper::builder().build(Arc::clone(&store)).err());
        no_runtime(ExpiryMonitor::builder().build(Arc::clone(&store)).err());
        no_runtime(
            Lifecycle::builder(
                Arc::clone(&store),
                ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
            )
            .build()
            .err(),
        );

        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let deleter = RouterDeleter::new(
            Arc::clone(&store),
            ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
        );
        let result = deleter.delete(router).await;
        assert!(matches!(result, Err(DeleteError::NoRuntime)), "{result:?}");
        assert_eq!(
            store.router_status(router).await.unwrap(),
            RouterStatus::Live(incarnation),
            "nothing was done: the router is not fenced"
        );
        assert_eq!(deleter.running(), 0);
    });
}

/// Any duration, from none to `Duration::MAX`, weighted to the extremes.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..=u64::MAX).prop_map(Duration::from_nanos),
        (0u64..100_000).prop_map(Duration::from_millis),
    ]
}

/// Any count, weighted to the extremes.
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0),
        Just(usize::MAX),
        Just(1 << 62),
        0usize..=4096,
        any::<usize>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    /// Whatever the settings, no builder panics: each builds or says which
    /// setting it refused.
    #[test]
    fn no_builder_panics_on_any_setting(
        sizes in proptest::collection::vec(count(), 4),
        durations in proptest::collection::vec(duration(), 12),
        rate in any::<u32>(),
        retries in prop_oneof![Just(0u32), Just(u32::MAX), 0u32..10],
        share in prop_oneof![any::<f64>(), Just(f64::NAN), Just(1.0), 0.0..=1.0f64],
    ) {
        let runtime = runtime();
        let _inside = runtime.enter();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let store = Arc::new(MemoryStore::new());
            let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
            let deleter = RouterDeleter::builder()
                .batch_size(sizes[0])
                .notify_rate(rate)
                .notify_timeout(durations[0])
                .confirm_timeout(durations[1])
                .backoff(Backoff::new().retries(retries).delays(durations[2], durations[3]))
                .build(Arc::clone(&store), notifier);
            if let Ok(deleter) = &deleter {
                let _ = deleter.max_wait(sizes[1]);
            }
            let queue = ReclaimQueue::builder()
                .capacity(sizes[1])
                .workers(sizes[2] % 64)
                .build();
            let monitor = LivenessMonitor::builder()
                .heartbeat_interval(durations[4])
                .timeout_range(durations[5], durations[6])
                .pause_allowance(durations[7])
                .probe_timeout(durations[8])
                .probe_backoff(Backoff::new().retries(retries % 8).delays(durations[9], durations[10]))
                .granularity(durations[11])
                .partition_share(share)
                .partition_window(durations[0])
                .partition_min_routers(sizes[3])
                .partition_max_hold(Some(durations[1]).filter(|_| rate % 2 == 0))
                .build(Arc::clone(&store), ScriptedProber::always(Probe::nobody()));
            if let Ok(monitor) = &monitor {
                let _ = monitor.reap_bound(durations[6]);
            }
            let reconciler = Reconciler::builder()
                .grace_period(durations[0])
                .chunk_size(sizes[3])
                .spare_younger_than(durations[1])
                .build(Arc::clone(&store));
            let sweeper = AuditSweeper::builder()
                .interval(durations[2])
                .build(Arc::clone(&store));
            let memory = MemoryStore::builder()
                .shard_amount(sizes[0])
                .tombstone_capacity(sizes[1])
                .build::<()>();
            [
                refused(deleter),
                refused(queue),
                refused(monitor),
                refused(reconciler),
                refused(sweeper),
                refused(memory),
            ]
        }));
        prop_assert!(outcome.is_ok(), "a builder panicked");
    }
}
