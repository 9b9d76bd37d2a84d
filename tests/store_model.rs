//! Model-based property test of `MemoryStore` and `RouterDeleter`
//! (proptest-state-machine), through the store-generic harness in
//! `tests/suite` (which describes the steps and the checks).
//!
//! `PROPTEST_CASES=5000 cargo test --test store_model` runs a bigger search.

mod suite;

use suite::MemoryBackend;

/// 1,000 cases (about a second in a debug build) unless `PROPTEST_CASES`
/// says otherwise.
#[test]
fn memory_store_follows_the_model() {
    suite::store_follows_the_model::<MemoryBackend>(1_000);
}
