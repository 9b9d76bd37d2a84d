//! The one retry schedule of the crate, and the bound it implies.
//!
//! Every wait between two tries (the deleter's re-notifications, the
//! liveness monitor's probe rounds, the reclaim queue's retries) is a
//! [`Backoff`]. The delays come from one `backon` builder, and so does the
//! bound the callers add up ([`Backoff::longest_total`]): the schedule and
//! its bound cannot drift apart.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Duration;

use crate::build::BuildError;

/// The longest delay a [`Backoff`] accepts.
const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest `max_duration` used: far above any real cap, and far enough
/// below [`Duration::MAX`] that backon's running total cannot overflow.
const MAX_TOTAL: Duration = Duration::from_secs(u64::MAX / 4);
/// Delays [`Backoff::longest_total`] adds up one by one; every later one
/// counts as the largest unless the schedule already stopped changing. One
/// that doubles from a nanosecond reaches a day in 47 steps.
const SUMMED_DELAYS: usize = 64;

/// An exponential backoff on `backon`: `retries` delays, the first `min`,
/// each next one `factor` times the last, up to `max`; each plus a random
/// jitter of up to one more delay if on; all of them together at most
/// `max_duration` if set (a delay that would pass it ends the schedule).
///
/// backon computes each delay in `f32` seconds, so delays that are not a
/// binary fraction of a second come out off by nanoseconds; the bound
/// counts the delays backon computes.
///
/// A `Backoff` is a value: its setters take anything and never panic;
/// [`validate`](Self::validate) (which every builder taking one calls)
/// refuses settings out of range. A schedule drawn from settings out of
/// range uses them clamped into range.
///
/// Defaults: 3 retries, from 100 ms doubling up to 5 s, with jitter, no
/// `max_duration`.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::Backoff;
///
/// let backoff = Backoff::new()
///     .retries(4)
///     .delays(Duration::from_millis(125), Duration::from_millis(500))
///     .jitter(false);
/// let delays: Vec<_> = backoff.iter().map(|d| d.as_millis()).collect();
/// assert_eq!(delays, [125, 250, 500, 500]);
/// assert_eq!(backoff.longest_total(), Duration::from_millis(1_375));
///
/// // With jitter, each delay can be up to twice as long; a cap bounds the sum.
/// let capped = backoff.jitter(true).max_duration(Duration::from_millis(2_000));
/// assert!(capped.iter().sum::<Duration>() <= Duration::from_millis(2_000));
/// assert_eq!(capped.longest_total(), Duration::from_millis(2_000));
/// ```
///
/// With `backon`'s [`Retryable`](backon::Retryable) (a `Backoff` is a
/// [`BackoffBuilder`]):
///
/// ```
/// use std::time::Duration;
/// use backon::Retryable;
/// use session_lifecycle::Backoff;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let backoff = Backoff::new().max_duration(Duration::from_secs(30));
/// let mut calls = 0;
/// let answer = (|| {
///     calls += 1;
///     let ok = calls == 3;
///     async move { if ok { Ok(42) } else { Err("busy") } }
/// })
/// .retry(backoff)
/// .sleep(tokio::time::sleep)
/// .await;
/// assert_eq!(answer, Ok(42));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[must_use]
pub struct Backoff {
    min: Duration,
    max: Duration,
    factor: f32,
    retries: u32,
    jitter: bool,
    max_duration: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
            factor: 2.0,
            retries: 3,
            jitter: true,
            max_duration: None,
        }
    }
}

impl Backoff {
    /// The default backoff; see [`Backoff`].
    pub fn new() -> Self {
        Self::default()
    }

    /// How many delays the schedule has: how many times a failed try is
    /// tried again (any number; 0: never).
    ///
    /// See the example on [`Backoff`].
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The first delay and the largest one: `min ≤ max ≤ 1 day`, checked
    /// by [`validate`](Self::validate). A first delay of zero stays zero.
    ///
    /// See the example on [`Backoff`].
    pub fn delays(mut self, min: Duration, max: Duration) -> Self {
        self.min = min;
        self.max = max;
        self
    }

    /// How much each delay grows on the last (default 2; finite and at
    /// least 1, checked by [`validate`](Self::validate); 1 keeps the delay
    /// constant).
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// Adds to each delay a random jitter of up to one more delay, so that
    /// callers failing together do not retry in step (on by default).
    /// [`longest_total`](Self::longest_total) counts each delay twice.
    ///
    /// See the example on [`Backoff`].
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Caps the delays in total, jitter included: the schedule ends before
    /// a delay that would take the sum past `total` (backon's
    /// `total_delay`). `None` (the default) caps nothing.
    ///
    /// See the example on [`Backoff`].
    pub fn max_duration(mut self, total: impl Into<Option<Duration>>) -> Self {
        self.max_duration = total.into();
        self
    }

    /// How many delays the schedule has at most (a `max_duration` may end
    /// it sooner).
    #[must_use]
    pub fn max_retries(&self) -> u32 {
        self.retries
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] naming `delays` (a minimum above the
    /// maximum, or a maximum above 1 day) or `factor` (below 1, or not
    /// finite).
    pub fn validate(&self) -> Result<(), BuildError> {
        self.check("Backoff", None)
    }

    /// Checks the settings for `piece`'s builder method `setting`.
    pub(crate) fn check_for(
        &self,
        piece: &'static str,
        setting: &'static str,
    ) -> Result<(), BuildError> {
        self.check(piece, Some(setting))
    }

    /// Refuses settings out of range: as the `Backoff`'s own setter's, or,
    /// given `within`, as that builder method's.
    fn check(&self, piece: &'static str, within: Option<&'static str>) -> Result<(), BuildError> {
        let refuse = |setting: &'static str, problem: String| match within {
            None => Err(BuildError::setting(piece, setting, problem)),
            Some(outer) => Err(BuildError::setting(
                piece,
                outer,
                format_args!("`{setting}` {problem}"),
            )),
        };
        let (min, max) = (self.min, self.max);
        if min > max || max > MAX_DELAY {
            return refuse(
                "delays",
                format!("must be a range within 1 day, got [{min:?}, {max:?}]"),
            );
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return refuse(
                "factor",
                format!("must be finite and at least 1, got {}", self.factor),
            );
        }
        Ok(())
    }

    /// A fresh run of the schedule's delays (jitter drawn anew), in order:
    /// the first is the wait after the first failed try.
    ///
    /// Settings [`validate`](Self::validate) refuses are clamped: the
    /// delays into [0, 1 day] with `min ≤ max`, the factor to 1 if below
    /// or not finite.
    ///
    /// See the example on [`Backoff`].
    pub fn iter(&self) -> ExponentialBackoff {
        let exact = self.exact().with_total_delay(self.cap());
        if self.jitter {
            exact.with_jitter().build()
        } else {
            exact.build()
        }
    }

    /// The longest all delays of one run can add up to, whatever the
    /// jitter draws: each delay at its largest jitter, the sum at most
    /// `max_duration`. Saturates at [`Duration::MAX`].
    #[must_use]
    pub fn longest_total(&self) -> Duration {
        let total = self.longest_uncapped();
        self.cap().map_or(total, |cap| total.min(cap))
    }

    /// The longest the first `retries` delays can add up to without the
    /// `max_duration` cap: a bound for a caller that starts the schedule
    /// over and keeps waiting (the cap holds for one run only), as long as
    /// each of its waits is at most the delay of the same rank in one run.
    pub(crate) fn longest_uncapped(&self) -> Duration {
        let mut summed = Duration::ZERO;
        let (mut last, mut steady) = (None, false);
        for delay in self.exact().build().take(SUMMED_DELAYS) {
            summed = summed.saturating_add(self.longest(delay));
            steady = last == Some(delay);
            last = Some(delay);
        }
        // A delay that stopped changing stays (each is a function of the
        // last alone); one still growing counts as the largest.
        let rest = self.retries.saturating_sub(SUMMED_DELAYS as u32);
        let later = if steady {
            last.unwrap_or_default()
        } else {
            self.clamped().1
        };
        summed.saturating_add(self.longest(later).saturating_mul(rest))
    }

    /// The longest a drawn delay can be for a base `delay`: backon's
    /// jitter is `delay.mul_f32(r)` with `r` in [0, 1), which its `f32`
    /// arithmetic keeps at or below `delay.mul_f32(1.0)`. backon never
    /// feeds a jitter into the next delay, so the base delays are those of
    /// the schedule without jitter.
    fn longest(&self, delay: Duration) -> Duration {
        if !self.jitter {
            return delay;
        }
        let jitter = Duration::try_from_secs_f32(delay.as_secs_f32()).unwrap_or(Duration::MAX);
        delay.saturating_add(jitter)
    }

    /// The delays without jitter or cap, from the clamped settings.
    fn exact(&self) -> ExponentialBuilder {
        let (min, max) = self.clamped();
        let factor = if self.factor.is_finite() && self.factor >= 1.0 {
            self.factor
        } else {
            1.0
        };
        ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(factor)
            .with_max_times(usize::try_from(self.retries).unwrap_or(usize::MAX))
    }

    /// `min` and `max` clamped into range.
    fn clamped(&self) -> (Duration, Duration) {
        let max = self.max.min(MAX_DELAY);
        (self.min.min(max), max)
    }

    fn cap(&self) -> Option<Duration> {
        self.max_duration.map(|cap| cap.min(MAX_TOTAL))
    }
}

/// For backon's [`Retryable`](backon::Retryable): `.retry(backoff)`.
impl BackoffBuilder for Backoff {
    type Backoff = ExponentialBackoff;

    fn build(self) -> ExponentialBackoff {
        self.iter()
    }
}

impl BackoffBuilder for &Backoff {
    type Backoff = ExponentialBackoff;

    fn build(self) -> ExponentialBackoff {
        self.iter()
    }
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::*;

    const DAY: Duration = MAX_DELAY;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Every delay backon draws stays within the longest the bound counts
    /// for it, and every run sums to at most the bound.
    #[test]
    fn jittered_delays_never_exceed_the_longest_the_bound_counts() {
        for (min, max, factor) in [
            (ms(500), ms(4_000), 2.0),
            (ms(3), ms(7), 2.0),
            (ms(100), ms(5_000), 1.5),
            (ms(1), DAY, 2.0),
            (DAY / 3, DAY, 2.0),
            (DAY, DAY, 2.0),
            (Duration::from_nanos(1), ms(1), 3.0),
        ] {
            let backoff = Backoff::new()
                .delays(min, max)
                .factor(factor)
                .retries(6)
                .jitter(true);
            let exact: Vec<_> = backoff.jitter(false).iter().collect();
            assert_eq!(exact.len(), 6);
            let longest: Vec<_> = exact.iter().map(|&d| backoff.longest(d)).collect();
            for _ in 0..2_000 {
                let drawn: Vec<_> = backoff.iter().collect();
                assert_eq!(drawn.len(), 6);
                for ((drawn, base), longest) in drawn.iter().zip(&exact).zip(&longest) {
                    assert!(
                        base <= drawn && drawn <= longest,
                        "{drawn:?} ∉ [{base:?}, {longest:?}]"
                    );
                }
                assert!(drawn.iter().sum::<Duration>() <= backoff.longest_total());
            }
            assert_eq!(backoff.longest_total(), longest.iter().sum::<Duration>());
        }
    }

    #[test]
    fn the_longest_total_covers_any_number_of_retries() {
        let exact = Backoff::new()
            .delays(ms(500), ms(4_000))
            .retries(100)
            .jitter(false);
        // 0.5 + 1 + 2 s, then 97 waits of 4 s.
        assert_eq!(exact.longest_total(), ms(3_500 + 97 * 4_000));
        assert_eq!(
            exact.jitter(true).longest_total(),
            ms(2 * (3_500 + 97 * 4_000))
        );
        let zero = Backoff::new().delays(ms(0), ms(1_000)).retries(u32::MAX);
        assert_eq!(zero.longest_total(), Duration::ZERO, "zero stays zero");
        let steady = Backoff::new()
            .delays(ms(10), ms(1_000))
            .factor(1.0)
            .retries(1_000)
            .jitter(false);
        assert_eq!(steady.longest_total(), ms(10_000), "constant delays");
        let slow = Backoff::new()
            .delays(ms(1), DAY)
            .factor(1.01)
            .retries(1_000)
            .jitter(false);
        let drawn: Duration = slow.iter().sum();
        assert!(drawn <= slow.longest_total(), "a slowly growing schedule");
        let huge = Backoff::new().delays(DAY, DAY).retries(u32::MAX);
        assert_eq!(
            huge.longest_total(),
            DAY.saturating_mul(2).saturating_mul(u32::MAX)
        );
    }

    #[test]
    fn max_duration_caps_the_total_and_ends_the_schedule() {
        let backoff = Backoff::new()
            .delays(ms(100), ms(1_000))
            .retries(50)
            .max_duration(ms(2_000));
        assert_eq!(backoff.longest_total(), ms(2_000));
        for _ in 0..2_000 {
            let drawn: Vec<_> = backoff.iter().collect();
            assert!(drawn.len() < 50, "the cap ends the schedule early");
            assert!(drawn.iter().sum::<Duration>() <= ms(2_000));
        }
        // A cap above the sum changes nothing (delays exact in `f32`).
        let loose = backoff
            .delays(ms(125), ms(1_000))
            .retries(2)
            .max_duration(DAY);
        assert_eq!(loose.longest_total(), ms(2 * (125 + 250)));
        assert_eq!(loose.iter().count(), 2);
        // A zero cap leaves no delay to wait.
        assert_eq!(backoff.max_duration(Duration::ZERO).iter().count(), 0);
        assert_eq!(
            backoff.max_duration(Duration::ZERO).longest_total(),
            Duration::ZERO
        );
        // Removed again.
        assert_eq!(backoff.max_duration(None).iter().count(), 50);
    }

    #[test]
    fn zero_retries_is_no_delay_at_all() {
        let none = Backoff::new().retries(0);
        assert_eq!(none.iter().next(), None);
        assert_eq!(none.longest_total(), Duration::ZERO);
        assert_eq!(none.max_retries(), 0);
        assert!(none.validate().is_ok());
    }

    #[test]
    fn invalid_settings_are_errors_and_are_clamped_when_drawn() {
        let refused = |backoff: Backoff| backoff.validate().unwrap_err().refused_setting();
        assert_eq!(refused(Backoff::new().delays(ms(2), ms(1))), Some("delays"));
        assert_eq!(
            refused(Backoff::new().delays(ms(0), DAY + ms(1))),
            Some("delays")
        );
        assert_eq!(
            refused(Backoff::new().delays(Duration::MAX, Duration::MAX)),
            Some("delays")
        );
        for factor in [0.5, -1.0, f32::NAN, f32::INFINITY] {
            assert_eq!(refused(Backoff::new().factor(factor)), Some("factor"));
        }
        for ok in [
            Backoff::new().delays(DAY, DAY),
            Backoff::new().delays(ms(0), ms(0)),
            Backoff::new().factor(1.0).max_duration(Duration::MAX),
        ] {
            assert!(ok.validate().is_ok(), "{ok:?}");
        }
        // Within a builder, the error names the builder's method.
        let error = Backoff::new()
            .factor(0.0)
            .check_for("RouterDeleter", "backoff")
            .unwrap_err();
        assert_eq!(error.refused_setting(), Some("backoff"));
        assert!(error.to_string().contains("`factor`"), "{error}");

        // Drawn anyway: clamped, never a panic, and still within the bound.
        for backoff in [
            Backoff::new().delays(Duration::MAX, Duration::MAX),
            Backoff::new().delays(ms(2_000), ms(1_000)),
            Backoff::new()
                .delays(DAY, Duration::MAX)
                .factor(f32::NAN)
                .max_duration(Duration::MAX),
        ] {
            let drawn: Vec<_> = backoff.iter().collect();
            assert_eq!(drawn.len(), 3);
            assert!(drawn.iter().all(|&d| d <= 2 * DAY));
            assert!(drawn.iter().sum::<Duration>() <= backoff.longest_total());
        }
    }
}
