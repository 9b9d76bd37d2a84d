//! Memory per monitored session, measured with a counting global
//! allocator. The only test in this binary, so no other test allocates
//! while it measures.

use std::alloc::System;
use std::sync::Arc;

use cap::Cap;
use futures::FutureExt;
use session_lifecycle::test_util::paused_runtime;
use session_lifecycle::{
    LivenessMonitor, MemoryStore, NewSession, RouterId, SessionId, SessionStore, liveness::NoProbe,
};
use tokio::time::Duration;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const ROUTERS: u64 = 100;
const PER_ROUTER: u64 = 2_000;
/// The heartbeat state every session carries inside its handle (two
/// 64-bit words), allocated with the session, so not seen below.
const IN_SESSION: f64 = 16.0;
/// The budget of issue #5.
const MAX_BYTES_PER_SESSION: f64 = 32.0;

#[test]
fn a_monitored_session_costs_at_most_32_bytes_of_monitor_state() {
    let runtime = paused_runtime();
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let mut sessions = Vec::new();
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            let incarnation = store
                .register_router(router)
                .now_or_never()
                .unwrap()
                .unwrap();
            for i in 0..PER_ROUTER {
                let spec = NewSession::new(SessionId::new(r * PER_ROUTER + i), router, incarnation);
                sessions.push(store.create(spec).now_or_never().unwrap().unwrap());
            }
        }
        let start = ALLOC.allocated();
        let monitor = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        for session in &sessions {
            monitor.watch(session).unwrap();
        }
        // A minute of 1 Hz heartbeats, spread over ten phases a second, so
        // the wheel reaches its steady state after the burst of watches.
        for _ in 0..60 {
            for phase in sessions.chunks(sessions.len() / 10) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for session in phase {
                    monitor.heartbeat(session).unwrap();
                }
            }
        }
        let stats = monitor.stats();
        assert_eq!((stats.watched, stats.suspected), (ROUTERS * PER_ROUTER, 0));
        let total = (ROUTERS * PER_ROUTER) as f64;
        let outside = ALLOC.allocated().saturating_sub(start) as f64 / total;
        let per_session = outside + IN_SESSION;
        println!(
            "monitor state: {per_session:.1} bytes per session ({outside:.1} outside the handle)"
        );
        assert!(
            per_session <= MAX_BYTES_PER_SESSION,
            "{per_session:.1} bytes per session"
        );
        drop(monitor);
    });
}
