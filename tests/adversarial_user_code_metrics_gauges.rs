//! Review of stop 35 (a contained metrics recorder): the labelled gauges
//! that `Stats::from_census` and `with_reclaim_queue` set were not
//! contained: a recorder panic there escaped `Stats::collect` and
//! `Lifecycle::stats`, while the same panic on an unlabelled gauge was
//! contained.
#![cfg(all(feature = "test-util", feature = "metrics"))]

use std::sync::Arc;

use futures::FutureExt;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use session_lifecycle::{MemoryStore, RouterId, SessionStore, Stats};

/// Panics registering the gauge named `.0`.
struct PanicsOn(&'static str);

impl Recorder for PanicsOn {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() == self.0 {
            panic!("the metrics recorder panicked on {}", self.0);
        }
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn collect_under(recorder: &PanicsOn) -> bool {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let store = Arc::new(MemoryStore::<()>::new());
                store.register_router(RouterId::new(1)).await.unwrap();
                std::panic::AssertUnwindSafe(Stats::collect(&*store))
                    .catch_unwind()
                    .await
                    .is_ok()
            })
    })
}

#[test]
fn an_unlabelled_gauge_panic_is_contained() {
    assert!(collect_under(&PanicsOn("session_lifecycle_routers")));
}

#[test]
fn a_labelled_gauge_panic_is_contained_too() {
    assert!(
        collect_under(&PanicsOn("session_lifecycle_sessions")),
        "the recorder's panic on the labelled gauge escaped Stats::collect"
    );
}
