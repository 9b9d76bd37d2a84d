//! Model-based property test of `MemoryStore` with a `RouterDeleter`, a
//! `LivenessMonitor` and a `Reconciler` (proptest-state-machine), through
//! the kit's conformance suite (`session_lifecycle::test_util::conformance`,
//! which describes the operations and the checks).
//!
//! `PROPTEST_CASES=5000 cargo test --test store_model` runs a bigger search.

use session_lifecycle::test_util::conformance::{
    Boxed, MemoryBackend, Shared, store_follows_the_model,
};

/// 1,000 cases unless `PROPTEST_CASES` says otherwise.
#[test]
fn memory_store_follows_the_model() {
    store_follows_the_model::<MemoryBackend>(1_000);
}

/// The same on a `MemoryStore` erased into a `BoxStore` (every call through
/// a boxed future). The delegation is the same code for every method and
/// store, so fewer cases: 200 unless `PROPTEST_CASES` says otherwise.
#[test]
fn boxed_memory_store_follows_the_model() {
    store_follows_the_model::<Boxed<MemoryBackend>>(200);
}

/// The same on an `Arc<MemoryStore>` (the `SessionStore` implementation for
/// `Arc<S>`): 100 cases unless `PROPTEST_CASES` says otherwise.
#[test]
fn shared_memory_store_follows_the_model() {
    store_follows_the_model::<Shared<MemoryBackend>>(100);
}
