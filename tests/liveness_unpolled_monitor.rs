//! A monitor whose task ended with its runtime (before or after its first
//! poll) refuses heartbeats and watches, and another monitor may take its
//! sessions over (a review of stop 33; "before" failed: it accepted them).

use std::sync::Arc;

use session_lifecycle::liveness::{HeartbeatError, NoProbe, WatchError};
use session_lifecycle::{
    LivenessMonitor, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
};

/// `polled`: whether the runtime ran the monitor's task before it went.
fn monitor_after_its_runtime_went(polled: bool) {
    let store = Arc::new(MemoryStore::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let monitor = rt.block_on(async {
        let monitor = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        if polled {
            tokio::task::yield_now().await;
        }
        monitor
    });
    // The runtime the monitor was built on goes away (a controller that
    // rebuilds its runtime; the handle lives on).
    drop(rt);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let session = store
            .create(NewSession::new(SessionId::new(1), router, incarnation))
            .await
            .unwrap();
        // Its tasks are gone: nothing would ever file, probe or reap the
        // session. It must say so (WatchError::ShutDown), not take it.
        let watched = monitor.watch(&session);
        let beat = monitor.heartbeat(&session);
        // And another monitor may take the session (the dead one's lease
        // is gone) -- while the dead one still accepts its heartbeats.
        let replacement = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        let taken = replacement.watch(&session);
        assert!(
            matches!(
                (&watched, &beat, &taken),
                (
                    Err(WatchError::ShutDown),
                    Err(HeartbeatError::ShutDown),
                    Ok(())
                )
            ),
            "polled before the runtime went: {polled}: watch {watched:?}, heartbeat {beat:?}, \
             replacement's watch {taken:?}"
        );
        replacement.shutdown().await;
    });
}

/// Control: the run task was polled once before the runtime went.
#[test]
fn a_monitor_whose_runtime_went_after_its_task_ran_refuses() {
    monitor_after_its_runtime_went(true);
}

/// The run task's future was dropped unpolled with its runtime: the
/// `Stopped` guard is a local of `run` (src/liveness/mod.rs), created only
/// on the first poll, so STOPPED is never set; the lease (a captured
/// parameter) is dropped all the same.
#[test]
fn a_monitor_whose_runtime_went_before_its_task_ran_refuses() {
    monitor_after_its_runtime_went(false);
}
