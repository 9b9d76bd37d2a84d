//! Model-based property test of `MemoryStore` with a `RouterDeleter`, a
//! `LivenessMonitor` and a `Reconciler` (proptest-state-machine), through
//! the kit's conformance suite (`session_lifecycle::test_util::conformance`,
//! which describes the operations and the checks).
//!
//! `PROPTEST_CASES=5000 cargo test --test store_model` runs a bigger search.

use session_lifecycle::test_util::conformance::{MemoryBackend, store_follows_the_model};

/// 1,000 cases unless `PROPTEST_CASES` says otherwise.
#[test]
fn memory_store_follows_the_model() {
    store_follows_the_model::<MemoryBackend>(1_000);
}
