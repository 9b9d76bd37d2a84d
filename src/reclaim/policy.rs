//! Reclamation policies: priority, retry schedule, long-lived threshold.

use tokio::time::Duration;

use crate::backoff::Backoff;
use crate::events::TaskInfo;

/// How urgent a task is, as the delay after which it is due: the queue
/// always runs the task due first (earliest `pushed at + delay`, ties in
/// push order).
///
/// A delay is a priority that ages: a task with a long delay is overtaken
/// only by tasks pushed less than its delay (minus theirs) after it, never
/// starved by a constant stream of urgent work.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::reclaim::Priority;
///
/// let soon = Priority::due_in(Duration::from_millis(10));
/// assert!(Priority::URGENT < soon);
/// assert_eq!(soon.delay(), Duration::from_millis(10));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(Duration);

impl Priority {
    /// Due at once: the most urgent priority. See the example on [`Priority`].
    pub const URGENT: Priority = Priority(Duration::ZERO);

    /// Due `delay` after the task is pushed. See the example on [`Priority`].
    #[must_use]
    pub const fn due_in(delay: Duration) -> Self {
        Self(delay)
    }

    /// The delay after which the task is due. See the example on [`Priority`].
    #[must_use]
    pub const fn delay(self) -> Duration {
        self.0
    }
}

/// When and how often a failing task is retried: a [`Backoff`] between
/// attempts, and a timeout per attempt.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{Backoff, reclaim::RetrySchedule};
///
/// let backoff = Backoff::new()
///     .retries(5)
///     .delays(Duration::from_millis(50), Duration::from_secs(2));
/// let schedule = RetrySchedule::new(backoff).attempt_timeout(Duration::from_secs(1));
/// assert_eq!(schedule.max_attempts(), 6);
/// assert!(schedule.longest_total() >= Duration::from_secs(6));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[must_use]
pub struct RetrySchedule {
    backoff: Backoff,
    attempt_timeout: Duration,
}

impl Default for RetrySchedule {
    /// 3 retries, delays from 100 ms doubling up to 5 s, with jitter, and
    /// 10 s per attempt.
    fn default() -> Self {
        Self::new(Backoff::new())
    }
}

impl RetrySchedule {
    /// Retries after the delays of `backoff` (as many as its
    /// [`retries`](Backoff::retries)), 10 s per attempt. Settings
    /// [`Backoff::validate`] refuses are clamped (see [`Backoff::iter`]).
    ///
    /// See the example on [`RetrySchedule`].
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempt_timeout: Duration::from_secs(10),
        }
    }

    /// No retry: the first failure is final.
    pub fn none() -> Self {
        Self::new(Backoff::new().retries(0))
    }

    /// Sets the longest one attempt may wait; a late attempt counts as a
    /// retryable failure ([`ReclaimErrorKind::TimedOut`](crate::ReclaimErrorKind::TimedOut)).
    /// The clock starts when the attempt's first poll returns pending (an
    /// attempt that finishes at once sets no timer; work done inside one
    /// poll cannot be interrupted anyway).
    ///
    /// See the example on [`RetrySchedule`].
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The most attempts a task gets: retries + 1, saturating (a
    /// [`max_duration`](Backoff::max_duration) may end them sooner).
    ///
    /// See the example on [`RetrySchedule`].
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.backoff.max_retries().saturating_add(1)
    }

    /// The per-attempt timeout.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// The longest a task can take from its first attempt to its final
    /// outcome: every attempt timing out, plus the backoff's delays at
    /// their longest ([`Backoff::longest_total`]), plus one millisecond
    /// per timer. Saturates. See the example on [`RetrySchedule`].
    #[must_use]
    pub fn longest_total(&self) -> Duration {
        let attempts = self.max_attempts();
        self.attempt_timeout
            .saturating_mul(attempts)
            .saturating_add(self.backoff.longest_total())
            .saturating_add(Duration::from_millis(1).saturating_mul(attempts.saturating_mul(2)))
    }
}

/// How a [`ReclaimQueue`](crate::ReclaimQueue) orders, retries and watches
/// its work. Replace [`DefaultPolicy`] to change any of it.
///
/// The queue calls the policy outside its locks; a policy that panics in a
/// worker is contained (the default schedule is used instead).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{
///     reclaim::Priority, reclaim::ReclaimPolicy, ResourceClass, reclaim::RetrySchedule, reclaim::TaskInfo,
/// };
///
/// /// Strict classes and no traffic bonus; tokens never retried.
/// struct Strict;
///
/// impl ReclaimPolicy for Strict {
///     fn priority(&self, task: &TaskInfo) -> Priority {
///         Priority::due_in(Duration::from_secs(60) * task.class.rank())
///     }
///     fn retry_schedule(&self, task: &TaskInfo) -> RetrySchedule {
///         if task.class == ResourceClass::Critical { RetrySchedule::none() } else { RetrySchedule::default() }
///     }
/// }
/// ```
pub trait ReclaimPolicy: Send + Sync + 'static {
    /// The priority of a task, computed once when it is pushed.
    ///
    /// See the example on [`ReclaimPolicy`].
    fn priority(&self, task: &TaskInfo) -> Priority;

    /// The retry schedule of a task, asked at most once per task, when it
    /// is first needed: when an attempt does not finish at its first poll
    /// (its timeout) or fails (its backoff). A task that succeeds at once
    /// never asks.
    ///
    /// See the example on [`ReclaimPolicy`].
    fn retry_schedule(&self, _task: &TaskInfo) -> RetrySchedule {
        RetrySchedule::default()
    }

    /// Sessions older than this are reported once each as long-lived by
    /// [`ReclaimQueue::check_long_lived`](crate::ReclaimQueue::check_long_lived);
    /// `None` turns the check off. 24 hours unless overridden.
    fn long_lived_threshold(&self) -> Option<Duration> {
        Some(Duration::from_secs(24 * 3600))
    }
}

/// The default [`ReclaimPolicy`]: resource class first, then traffic, with
/// aging.
///
/// A task of class rank `r` (0 for critical up to 3 for low) and traffic `t`
/// bytes is due after
/// `r × spacing + spacing / 2 × (1 − log2(1 + t) / 64)` (the logarithm in
/// fixed point, within 2^-18: the delay is within 30 ns per second of
/// spacing of the exact formula): classes are `spacing` apart, and traffic moves a task up to half a spacing earlier
/// within its class (busier sessions first). Tasks pushed together come out
/// class by class, busiest first.
///
/// **Starvation bound.** No task waits behind a task pushed more than its own
/// delay after it: a low task is never overtaken by work pushed more than
/// `3.5 × spacing` later (3.5 s with the default spacing of 1 s), however
/// much critical work keeps arriving.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     reclaim::DefaultPolicy, reclaim::ReclaimPolicy, ResourceClass, RouterId, SessionId, reclaim::TaskInfo,
/// };
///
/// let policy = DefaultPolicy::default();
/// let task = |class, traffic| TaskInfo::new(SessionId::new(1), RouterId::new(1), class, traffic);
/// let critical = policy.priority(&task(ResourceClass::Critical, 0));
/// let busy_high = policy.priority(&task(ResourceClass::High, 1 << 40));
/// let idle_high = policy.priority(&task(ResourceClass::High, 0));
/// assert!(critical < busy_high && busy_high < idle_high);
/// assert!(policy.priority(&task(ResourceClass::Low, 0)).delay() <= policy.max_delay());
/// ```
#[derive(Clone, Debug)]
pub struct DefaultPolicy {
    spacing: Duration,
    retry: RetrySchedule,
    long_lived: Option<Duration>,
}

/// Largest class spacing accepted; larger ones are clamped.
const MAX_SPACING: Duration = Duration::from_secs(24 * 3600);

impl Default for DefaultPolicy {
    fn default() -> Self {
        Self {
            spacing: Duration::from_secs(1),
            retry: RetrySchedule::default(),
            long_lived: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl DefaultPolicy {
    /// Sets how far apart the classes are (default 1 s, at most one day):
    /// how long a less urgent task waits before it overtakes newer, more
    /// urgent ones.
    #[must_use]
    pub fn class_spacing(mut self, spacing: Duration) -> Self {
        self.spacing = spacing.min(MAX_SPACING);
        self
    }

    /// Sets the retry schedule of every task.
    #[must_use]
    pub fn retry_schedule(mut self, schedule: RetrySchedule) -> Self {
        self.retry = schedule;
        self
    }

    /// Sets the long-lived threshold (`None`: no check).
    #[must_use]
    pub fn long_lived_threshold(mut self, threshold: Option<Duration>) -> Self {
        self.long_lived = threshold;
        self
    }

    /// The longest delay this policy gives a task (a low task of no
    /// traffic): `3.5 × spacing`, the starvation bound. See the example on [`DefaultPolicy`].
    #[must_use]
    pub fn max_delay(&self) -> Duration {
        self.spacing.saturating_mul(3) + self.spacing / 2
    }
}

impl ReclaimPolicy for DefaultPolicy {
    fn priority(&self, task: &TaskInfo) -> Priority {
        // In whole nanoseconds: the spacing is at most a day (8.64e13 ns),
        // so `3 × spacing + spacing / 2` fits a `u64` with room to spare,
        // and integer and float casts are cheaper than `Duration`'s
        // normalising arithmetic.
        let spacing = u64::try_from(self.spacing.as_nanos()).unwrap_or(u64::MAX >> 3);
        let half = spacing / 2;
        // half × (1 − log2(1 + t) / 64), log2 in 32-bit fixed point.
        let busy = u128::from(half) * u128::from(log2_q32(task.traffic));
        let within = half.saturating_sub(u64::try_from(busy >> 38).unwrap_or(u64::MAX));
        let delay = spacing
            .saturating_mul(u64::from(task.class.rank()))
            .saturating_add(within);
        Priority::due_in(Duration::from_nanos(delay))
    }

    fn retry_schedule(&self, _task: &TaskInfo) -> RetrySchedule {
        self.retry
    }

    fn long_lived_threshold(&self) -> Option<Duration> {
        self.long_lived
    }
}

/// log2(1 + `t`) in 32-bit fixed point (`64 << 32` for `u64::MAX`),
/// within 2^-18 of the exact value: the leading bit's position, plus the
/// logarithm of the next 8 bits from a table, interpolated linearly on the
/// 32 bits after them. A few integer operations instead of a float
/// logarithm (a library call), and exact at every power of two.
fn log2_q32(t: u64) -> u64 {
    let Some(x) = t.checked_add(1) else {
        return 64 << 32;
    };
    let exponent = 63 - x.leading_zeros();
    // `x` normalised: its leading 1 at bit 63.
    let mantissa = x << (63 - exponent);
    let index = usize::try_from((mantissa >> 55) & 0xff).unwrap_or(0);
    let weight = (mantissa >> 23) & 0xffff_ffff;
    let (low, high) = (LOG2_TABLE[index], LOG2_TABLE[index + 1]);
    let fraction = low + (((high - low) * weight) >> 32);
    (u64::from(exponent) << 32) + fraction
}

/// `LOG2_TABLE[i]` = log2(1 + i / 256) in 32-bit fixed point.
static LOG2_TABLE: [u64; 257] = {
    let mut table = [0; 257];
    let mut i = 0;
    while i < 257 {
        table[i] = log2_fraction((1 << 62) + ((i as u128) << 54));
        i += 1;
    }
    table
};

/// log2(`m` / 2^62) in 32-bit fixed point, for `m` in [2^62, 2^63]: one
/// bit per squaring (compile time only).
const fn log2_fraction(mut m: u128) -> u64 {
    const ONE: u128 = 1 << 62;
    if m >= 2 * ONE {
        return 1 << 32;
    }
    let mut fraction = 0;
    let mut bit = 1 << 31;
    while bit > 0 {
        m = (m * m) >> 62;
        if m >= 2 * ONE {
            m >>= 1;
            fraction |= bit;
        }
        bit >>= 1;
    }
    fraction
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::log2_q32;

    /// The fixed-point logarithm stays within 2^-18 of the float one, is
    /// exact at powers of two and never decreases with the traffic.
    #[test]
    fn the_fixed_point_log2_is_close_exact_at_powers_of_two_and_monotone() {
        let q32 = |t: u64| log2_q32(t) as f64 / (1u64 << 32) as f64;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut samples: Vec<u64> = (0..64).flat_map(|k| [1u64 << k, (1u64 << k) - 1]).collect();
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            samples.push(state >> (state % 64));
        }
        samples.extend([0, 1, 2, 3, u64::MAX - 1, u64::MAX]);
        for &t in &samples {
            let exact = (t as f64 + 1.0).log2();
            assert!((q32(t) - exact).abs() < 1.0 / f64::from(1 << 18), "t = {t}");
        }
        for k in 0..64 {
            assert_eq!(log2_q32((1u64 << k) - 1), k << 32);
        }
        assert_eq!(log2_q32(u64::MAX), 64 << 32);
        samples.sort_unstable();
        assert!(samples.windows(2).all(|w| log2_q32(w[0]) <= log2_q32(w[1])));
    }
}
