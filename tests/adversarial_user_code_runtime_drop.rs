//! Review of stop 35 (user code the crate runs): background tasks dropped
//! by their runtime while suspended at an `.await` held session handles in
//! plain `Vec`s. Each scenario runs in a child process: two payload
//! `Drop`s that panic in one drop glue abort it.
#![cfg(feature = "test-util")]

mod user_code_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::test_util::within;
use session_lifecycle::{ExpiryMonitor, NewSession, Reconciler, SessionId, SessionStore};
use tokio::time::Duration;
use user_code_support::{Loud, R, Wrap, in_child, loud, paused_runtime};

const HOUR: Duration = Duration::from_secs(3_600);

/// The expiry monitor's close task (`Shared::expire`) holds its `due`
/// sessions in a plain `Vec` across `close_and_remove`'s awaits. Sessions
/// 1 and 2 are removed (the store's handles gone; the client let go of
/// its own), and the store's removal of 3 is in flight when the runtime
/// goes: the task's future drops `due` by glue, holding the last handles
/// of 1 and 2.
#[test]
#[ignore = "run in a child process by the test below"]
fn scenario_expiry_close_task_dropped_with_its_runtime() {
    let runtime = paused_runtime();
    let drops = Arc::new(AtomicUsize::new(0));
    let kept = runtime.block_on(async {
        let store: Arc<Wrap<Loud>> = Arc::new(Wrap::default());
        let incarnation = store.register_router(R).await.unwrap();
        let monitor = ExpiryMonitor::builder().build(Arc::clone(&store)).unwrap();
        store.park_remove_of.store(3, Ordering::SeqCst);
        for id in 1..=3 {
            let spec = NewSession::new(SessionId::new(id), R, incarnation)
                .expires_in(Duration::from_secs(1))
                .payload(loud(id != 3, &drops));
            let session = store.create(spec).await.unwrap();
            monitor.track(&session).unwrap();
        }
        within(HOUR, store.arrived.notified()).await;
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        assert!(store.inner.get(SessionId::new(1)).await.unwrap().is_none());
        assert!(store.inner.get(SessionId::new(2)).await.unwrap().is_none());
        (store, monitor)
    });
    eprintln!("scenario: the close task is parked in the store; dropping the runtime");
    drop(runtime);
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both payloads dropped");
    drop(kept);
}

#[test]
fn expiry_close_task_dropped_with_its_runtime_contains_payload_panics() {
    in_child("scenario_expiry_close_task_dropped_with_its_runtime");
}

/// A grace expiry (`close_lost`) holds the router's open sessions in a
/// plain `Vec` (`open`) across `close_chunks`' awaits: as above, with the
/// removal of session 3 in flight when the runtime goes.
#[test]
#[ignore = "run in a child process by the test below"]
fn scenario_grace_expiry_dropped_with_its_runtime() {
    let runtime = paused_runtime();
    let drops = Arc::new(AtomicUsize::new(0));
    let kept = runtime.block_on(async {
        let store: Arc<Wrap<Loud>> = Arc::new(Wrap::default());
        let incarnation = store.register_router(R).await.unwrap();
        let reconciler = Reconciler::builder()
            .grace_period(Duration::from_secs(1))
            .build(Arc::clone(&store))
            .unwrap();
        store.park_remove_of.store(3, Ordering::SeqCst);
        for id in 1..=3 {
            let spec =
                NewSession::new(SessionId::new(id), R, incarnation).payload(loud(id != 3, &drops));
            drop(store.create(spec).await.unwrap());
        }
        reconciler.router_disconnected(R).await.unwrap();
        within(HOUR, store.arrived.notified()).await;
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        assert!(store.inner.get(SessionId::new(1)).await.unwrap().is_none());
        assert!(store.inner.get(SessionId::new(2)).await.unwrap().is_none());
        (store, reconciler)
    });
    eprintln!("scenario: the grace expiry is parked in the store; dropping the runtime");
    drop(runtime);
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both payloads dropped");
    drop(kept);
}

#[test]
fn grace_expiry_dropped_with_its_runtime_contains_payload_panics() {
    in_child("scenario_grace_expiry_dropped_with_its_runtime");
}
