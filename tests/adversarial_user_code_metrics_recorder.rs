//! Review of stop 35 (feature `metrics`): the metrics recorder is user
//! code; a panic in it was not contained. `Session::close`/`close_from`
//! record the close after the state word moved to `Closed` and before the
//! close completes: a recorder that panicked there left the session
//! `Closed` for ever incomplete (resources never released, `closed()`
//! never resolved), and killed the background task that closed it.
#![cfg(all(feature = "test-util", feature = "metrics"))]

mod user_code_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use session_lifecycle::test_util::within;
use session_lifecycle::{
    CloseReason, ExpiryMonitor, MemoryStore, NewSession, SessionId, SessionStore,
};
use tokio::time::Duration;
use user_code_support::{R, paused_runtime};

const HOUR: Duration = Duration::from_secs(3_600);

/// Panics once, registering the closes counter.
struct PanicsOnce(AtomicBool);

impl Recorder for PanicsOnce {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == "session_lifecycle_sessions_closed_total"
            && self.0.swap(false, Ordering::SeqCst)
        {
            panic!("the metrics recorder panicked");
        }
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The expiry monitor's close task closes an expired session; the
/// recorder panics as the close is counted.
#[test]
fn a_recorder_panic_in_an_expiry_close_leaves_the_close_complete() {
    let recorder = PanicsOnce(AtomicBool::new(true));
    metrics::with_local_recorder(&recorder, || {
        paused_runtime().block_on(async {
            let store = Arc::new(MemoryStore::new());
            let incarnation = store.register_router(R).await.unwrap();
            let monitor = ExpiryMonitor::builder().build(Arc::clone(&store)).unwrap();
            let released = Arc::new(AtomicUsize::new(0));
            let spec = NewSession::new(SessionId::new(1), R, incarnation)
                .expires_in(Duration::from_secs(1));
            let session = store.create(spec).await.unwrap();
            let counter = Arc::clone(&released);
            session
                .attach(move |_: CloseReason| {
                    counter.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            monitor.track(&session).unwrap();
            assert_eq!(within(HOUR, session.closed()).await, CloseReason::Expired);
            assert_eq!(released.load(Ordering::SeqCst), 1, "its resource released");
            assert!(
                store.get(SessionId::new(1)).await.unwrap().is_none(),
                "removed from the store"
            );
        });
    });
}
