//! Stress on a multi-thread runtime: 20 routers × 2,000 sessions of a
//! `MemoryStore`; tasks keep creating sessions on every router and closing
//! random ones while half the routers are deleted concurrently, some by two
//! racing deletes. The notifier confirms late (spawned, random delay) and
//! loses some notices. Afterwards: no session of a deleted router in the
//! store, all of them closed, every resource released exactly once, every
//! create that started after its router's deletion returned refused; live
//! routers untouched; the store's invariants hold. The scenario is the
//! kit's (`session_lifecycle::test_util::conformance::deleter_stress`).
//!
//! `SESSION_LIFECYCLE_SOAK=200 cargo test --release --test deleter_stress`
//! runs it 200 times.

use session_lifecycle::test_util::conformance::{
    Boxed, ForcedReleases, MemoryBackend, StressSizes, deleter_stress,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_half_the_routers_under_load_leaves_no_zombie() {
    deleter_stress(
        &MemoryBackend,
        StressSizes::memory(),
        ForcedReleases::Inline,
    )
    .await;
}

/// The same with forced sessions' resources released through a small
/// `ReclaimQueue` (capacity 64: the deleters wait on its backpressure).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_releases_through_a_reclaim_queue_leave_no_zombie() {
    let releases = ForcedReleases::ReclaimQueue {
        capacity: 64,
        workers: 2,
    };
    deleter_stress(&MemoryBackend, StressSizes::memory(), releases).await;
}

/// The scenario on `MemoryStore`s erased into `BoxStore`s, smaller (8
/// routers × 500 sessions, 2 creators): every call of the deleters,
/// creators and notifier through a boxed future, from many threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_boxed_store_under_load_leaves_no_zombie() {
    let sizes = StressSizes {
        routers: 8,
        sessions_per_router: 500,
        creators: 2,
        ..StressSizes::memory()
    };
    deleter_stress(&Boxed(MemoryBackend), sizes, ForcedReleases::Inline).await;
}
