//! Review of stop 35 (user code the crate runs): public async fns that
//! fetch a handle from the store themselves dropped it by plain glue: when
//! a client removed the session while the store's answer was in flight,
//! that handle is the last one, and its payload's `Drop` panic escaped the
//! crate's call.
#![cfg(feature = "test-util")]

mod user_code_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::liveness::NoProbe;
use session_lifecycle::test_util::within;
use session_lifecycle::{
    CloseReason, LivenessMonitor, NewSession, Reconciler, RouterId, SessionId, SessionStore,
};
use tokio::time::Duration;
use user_code_support::{Loud, R, Wrap, loud};

const HOUR: Duration = Duration::from_secs(3_600);

/// `LivenessMonitor::heartbeat_id` looks the session up in the store and
/// drops the handle it got at its end, by glue.
#[tokio::test(start_paused = true)]
async fn heartbeat_id_contains_the_payload_drop_of_a_handle_it_fetched() {
    let store: Arc<Wrap<Loud>> = Arc::new(Wrap::default());
    let incarnation = store.register_router(R).await.unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let spec = NewSession::new(SessionId::new(1), R, incarnation).payload(loud(true, &drops));
    // Not watched (yet): the monitor holds no handle of it.
    let session = store.create(spec).await.unwrap();

    store.park_get.store(true, Ordering::SeqCst);
    let beating = tokio::spawn({
        let monitor = monitor.clone();
        async move { monitor.heartbeat_id(SessionId::new(1)).await }
    });
    within(HOUR, store.arrived.notified()).await;
    // The client closes and removes it meanwhile, and lets its handle go.
    let _ = store
        .inner
        .close(SessionId::new(1), CloseReason::ClientClosed)
        .await;
    drop(store.inner.remove(SessionId::new(1)).await);
    drop(session);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "the call holds the last handle"
    );
    store.release.notify_one();
    let answered = within(HOUR, beating).await;
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert!(
        answered.is_ok(),
        "the payload's panic escaped heartbeat_id: {answered:?}"
    );
}

/// `Reconciler::reconcile` looks each reported id up in the store; a
/// reported id of another router's session (foreign) is not in the
/// pass's `held` listing, and the handle `get` returned drops at the end
/// of its match arm, by glue.
#[tokio::test(start_paused = true)]
async fn reconcile_contains_the_payload_drop_of_a_handle_it_fetched() {
    let store: Arc<Wrap<Loud>> = Arc::new(Wrap::default());
    let incarnation = store.register_router(R).await.unwrap();
    let other = RouterId::new(2);
    let other_incarnation = store.register_router(other).await.unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let spec =
        NewSession::new(SessionId::new(7), other, other_incarnation).payload(loud(true, &drops));
    let foreign = store.create(spec).await.unwrap();

    store.park_get.store(true, Ordering::SeqCst);
    let reconciling = tokio::spawn({
        let reconciler = reconciler.clone();
        async move {
            reconciler
                .reconcile(R, incarnation, [SessionId::new(7)])
                .await
        }
    });
    within(HOUR, store.arrived.notified()).await;
    let _ = store
        .inner
        .close(SessionId::new(7), CloseReason::ClientClosed)
        .await;
    drop(store.inner.remove(SessionId::new(7)).await);
    drop(foreign);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "the call holds the last handle"
    );
    store.release.notify_one();
    let answered = within(HOUR, reconciling).await;
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    let report = answered
        .expect("the payload's panic escaped reconcile")
        .expect("reconciled");
    assert_eq!(report.drop, [SessionId::new(7)], "the router must drop it");
}
