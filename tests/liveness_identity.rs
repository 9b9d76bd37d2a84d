//! Monitor identity never repeats within a process (issue #17, item 5):
//! a monitor built after 65,535 others does not take heartbeats for a
//! session another monitor watches. The only test in this binary, so no
//! other test builds monitors while it counts them.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::test_util::run_paused;
use session_lifecycle::{
    LivenessMonitor, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
    liveness::HeartbeatError, liveness::NoProbe, liveness::WatchError,
};

/// More monitors than a 16-bit tag can tell apart.
const LATER_MONITORS: u32 = 1 << 16;

#[test]
fn a_monitor_built_after_65_535_others_ignores_sessions_it_does_not_watch() {
    run_paused(async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let session = store
            .create(NewSession::new(SessionId::new(1), router, incarnation))
            .await
            .unwrap();
        let watching = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        watching.watch(&session).unwrap();

        for built in 1..=LATER_MONITORS {
            let other = LivenessMonitor::builder()
                // Small: the smallest wheel.
                .granularity(Duration::from_secs(1))
                .build(Arc::clone(&store), NoProbe)
                .unwrap();
            assert!(
                matches!(other.heartbeat(&session), Err(HeartbeatError::NotWatched(id)) if id == session.id()),
                "monitor #{built} built after the watching one took its session's heartbeat"
            );
            assert_eq!(other.timeout(&session), None, "monitor #{built}");
            assert_eq!(
                other.watch(&session),
                Err(WatchError::AlreadyWatched(session.id())),
                "monitor #{built}"
            );
            assert_eq!(other.stats().ignored_heartbeats, 1, "monitor #{built}");
            // Dropping the handle stops the monitor; its task ends (and
            // frees what it holds) once it runs.
            drop(other);
            tokio::task::yield_now().await;
        }
        watching.heartbeat(&session).unwrap();
        assert_eq!(watching.stats().ignored_heartbeats, 0);
    });
}
