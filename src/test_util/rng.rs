//! A hash for deterministic decisions in simulations.
//!
//! For a random sequence (a delay, a lost answer drawn one after the
//! other) use a seeded `fastrand::Rng` (`fastrand::Rng::with_seed(seed)`);
//! for test inputs that proptest can shrink, [`strategy`](super::strategy).

/// splitmix64's finalizer: scatters `value` over all 64 bits. A pure
/// function of its input, so a decision drawn from it (which session a
/// simulated router loses in which round) does not depend on timing.
///
/// # Example
///
/// ```
/// use session_lifecycle::test_util::mix;
///
/// assert_eq!(mix(1), mix(1));
/// assert_ne!(mix(1), mix(2));
/// ```
#[must_use]
pub fn mix(value: u64) -> u64 {
    let mut z = value;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
