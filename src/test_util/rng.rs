//! A small deterministic generator for simulations.

/// A deterministic pseudo-random generator (splitmix64) for simulated
/// routers and clients: the same seed gives the same run.
///
/// Not for anything secret. Strategies (see [`strategy`](super::strategy))
/// are the way to draw test inputs that proptest can shrink; `SimRng` is for
/// the noise inside a scenario (a random delay, a lost answer).
///
/// # Example
///
/// ```
/// use session_lifecycle::test_util::SimRng;
///
/// let mut a = SimRng::new(7);
/// let mut b = SimRng::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator seeded with `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// A value in `0..bound`; 0 if `bound` is 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64().checked_rem(bound).unwrap_or(0)
    }

    /// `true` with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u16) -> bool {
        self.below(1_000) < u64::from(per_mille)
    }
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

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
