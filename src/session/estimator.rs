//! Per-session heartbeat state: when the session was last heard, and its
//! smoothed heartbeat inter-arrival, in 16 bytes.
//!
//! # Invariants
//!
//! - `heard` only grows (`fetch_max`): two racing heartbeats never move it
//!   back, and each one takes the sample from its own predecessor.
//! - `estimate` is replaced by one compare-exchange per sample, so racing
//!   samples are each applied once.
//! - A heartbeat never brings the deadline (`heard` + timeout) closer: the
//!   monitor files each session in its wheel at its deadline and looks at
//!   it again only then, so a deadline that moved closer would be missed.
//!   A sample that would shrink the timeout faster than time passes raises
//!   the deviation instead, just enough.
//!
//! Times are milliseconds on the watching monitor's clock (see
//! `liveness::Clock`); the session itself does not know the monitor.

use std::sync::atomic::{AtomicU64, Ordering};

/// The liveness state every session carries; zero until a monitor watches
/// the session.
#[derive(Debug, Default)]
pub(crate) struct Beat {
    /// When the session was last heard, in monitor milliseconds.
    heard: AtomicU64,
    /// The packed [`Estimate`].
    estimate: AtomicU64,
}

impl Beat {
    /// Starts watching: heard `now`, with the initial estimate.
    pub(crate) fn reset(&self, now: u64, estimate: Estimate) {
        // Relaxed: the watcher tag's Release/Acquire publishes these.
        self.heard.store(now, Ordering::Relaxed);
        self.estimate.store(estimate.pack(), Ordering::Relaxed);
    }

    /// Records a heartbeat at `now` and feeds the inter-arrival since the
    /// previous one (capped at the largest timeout) to the estimate, keeping
    /// the deadline where it was if the new timeout would end sooner. A
    /// heartbeat in the same millisecond as the previous one only counts as
    /// heard.
    pub(crate) fn record(&self, now: u64, rule: &TimeoutRule) {
        // Relaxed: liveness times order nothing else; the monitor reads
        // them with Relaxed loads and tolerates a stale value by one tick.
        let previous = self.heard.fetch_max(now, Ordering::Relaxed);
        if now <= previous {
            return;
        }
        let sample = (now - previous).min(rule.max);
        let mut current = self.estimate.load(Ordering::Relaxed);
        loop {
            let before = Estimate::unpack(current);
            let deadline = previous.saturating_add(before.timeout(rule));
            let next = before
                .update(sample)
                .at_least(deadline.saturating_sub(now), rule)
                .pack();
            match self.estimate.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Records `now` as heard without taking a sample: a probe answer says
    /// the session is alive, not how often it heartbeats.
    pub(crate) fn refresh(&self, now: u64) {
        // Relaxed: as in `record`.
        self.heard.fetch_max(now, Ordering::Relaxed);
    }

    /// When the session was last heard, brought down to `now` if it is
    /// later (a heartbeat through the monitor this one took the session
    /// over from, racing the takeover, wrote that monitor's clock).
    pub(crate) fn heard_by(&self, now: u64) -> u64 {
        let heard = self.heard();
        if heard <= now {
            return heard;
        }
        // Relaxed: as in `record`.
        self.heard.fetch_min(now, Ordering::Relaxed);
        now
    }

    pub(crate) fn heard(&self) -> u64 {
        // Relaxed: as in `record`.
        self.heard.load(Ordering::Relaxed)
    }

    pub(crate) fn estimate(&self) -> Estimate {
        // Relaxed: as in `record`.
        Estimate::unpack(self.estimate.load(Ordering::Relaxed))
    }
}

/// The smoothed heartbeat inter-arrival, RFC 6298 style, in fixed point:
/// the mean scaled by 8 and the mean deviation scaled by 4, in
/// milliseconds, so the updates with α = 1/8 and β = 1/4 are shifts (as in
/// Van Jacobson's TCP code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Estimate {
    mean_x8: u32,
    deviation_x4: u32,
}

/// What turns an estimate into a timeout, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimeoutRule {
    pub(crate) granularity: u64,
    pub(crate) pause_allowance: u64,
    pub(crate) min: u64,
    pub(crate) max: u64,
}

impl Estimate {
    /// The first estimate, from the expected heartbeat interval: mean =
    /// interval, deviation = interval / 2 (RFC 6298, section 2.2).
    pub(crate) fn initial(interval: u64) -> Self {
        Self {
            mean_x8: saturate(interval.saturating_mul(8)),
            deviation_x4: saturate(interval.saturating_mul(2)),
        }
    }

    /// Feeds one inter-arrival `sample` (milliseconds):
    /// `deviation ← ¾·deviation + ¼·|mean − sample|`, then
    /// `mean ← ⅞·mean + ⅛·sample`.
    #[must_use]
    pub(crate) fn update(self, sample: u64) -> Self {
        let mean_x8 = u64::from(self.mean_x8);
        let deviation_x4 = u64::from(self.deviation_x4);
        let mean = mean_x8 >> 3;
        let error = sample.abs_diff(mean);
        Self {
            mean_x8: saturate(mean_x8 - mean + sample),
            deviation_x4: saturate(deviation_x4 - (deviation_x4 >> 2) + error),
        }
    }

    /// This estimate, its deviation raised if need be so that its timeout
    /// is at least `timeout` (at most `rule.max`).
    #[must_use]
    fn at_least(self, timeout: u64, rule: &TimeoutRule) -> Self {
        if self.timeout(rule) >= timeout {
            return self;
        }
        // Not reached with `mean + pause allowance ≥ timeout`: the timeout
        // is that at least, or clamped to a maximum above `timeout`.
        let mean = u64::from(self.mean_x8) >> 3;
        Self {
            deviation_x4: saturate(
                timeout.saturating_sub(mean.saturating_add(rule.pause_allowance)),
            ),
            ..self
        }
    }

    /// The timeout: `mean + max(granularity, 4·deviation) + pause
    /// allowance`, clamped to `[min, max]`.
    pub(crate) fn timeout(self, rule: &TimeoutRule) -> u64 {
        let mean = u64::from(self.mean_x8) >> 3;
        let spread = rule.granularity.max(u64::from(self.deviation_x4));
        mean.saturating_add(spread)
            .saturating_add(rule.pause_allowance)
            .clamp(rule.min, rule.max.max(rule.min))
    }

    fn pack(self) -> u64 {
        (u64::from(self.mean_x8) << 32) | u64::from(self.deviation_x4)
    }

    fn unpack(word: u64) -> Self {
        Self {
            mean_x8: saturate(word >> 32),
            deviation_x4: saturate(word & u64::from(u32::MAX)),
        }
    }
}

fn saturate(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const RULE: TimeoutRule = TimeoutRule {
        granularity: 50,
        pause_allowance: 1_000,
        min: 1_000,
        max: 60_000,
    };

    #[test]
    fn a_heard_time_ahead_of_the_watching_clock_is_brought_down_to_it() {
        let beat = Beat::default();
        beat.reset(100, Estimate::initial(1_000));
        // Another monitor's clock, an hour ahead, written by a late heartbeat.
        beat.record(3_600_000, &RULE);
        assert_eq!(beat.heard_by(250), 250);
        assert_eq!(beat.heard(), 250);
        // Heartbeats count again from there.
        beat.record(300, &RULE);
        assert_eq!(beat.heard_by(400), 300);
    }

    #[test]
    fn a_steady_heartbeat_converges_to_its_interval() {
        let mut estimate = Estimate::initial(1_000);
        assert_eq!(estimate.timeout(&RULE), 1_000 + 2_000 + 1_000);
        for _ in 0..200 {
            estimate = estimate.update(1_000);
        }
        // The deviation decays to zero; the granularity floor stays.
        assert_eq!(estimate.timeout(&RULE), 1_000 + 50 + 1_000);
    }

    #[test]
    fn beats_record_samples_and_refreshes_do_not() {
        let beat = Beat::default();
        beat.reset(10_000, Estimate::initial(1_000));
        beat.record(12_000, &RULE);
        assert_eq!(beat.heard(), 12_000);
        assert_eq!(beat.estimate(), Estimate::initial(1_000).update(2_000));
        let before = beat.estimate();
        beat.refresh(20_000);
        beat.record(20_000, &RULE); // same millisecond: no sample
        beat.record(19_000, &RULE); // late racer: no sample, heard stays
        assert_eq!((beat.heard(), beat.estimate()), (20_000, before));
        beat.record(u64::MAX, &RULE); // huge gap: capped sample
        assert_eq!(beat.estimate(), before.update(60_000));
    }

    #[test]
    fn heartbeats_faster_than_expected_shrink_the_timeout_no_faster_than_time_passes() {
        // Expected every 10 s, heard every 100 ms.
        let beat = Beat::default();
        beat.reset(0, Estimate::initial(10_000));
        let mut plain = Estimate::initial(10_000);
        let deadline = |beat: &Beat| beat.heard() + beat.estimate().timeout(&RULE);
        let mut last = deadline(&beat);
        let (mut plain_last, mut closer) = (last, 0);
        for now in (100..=120_000).step_by(100) {
            beat.record(now, &RULE);
            assert!(
                deadline(&beat) >= last,
                "at {now} ms the deadline moved closer"
            );
            last = deadline(&beat);
            // The estimate alone moves it closer, again and again.
            plain = plain.update(100);
            closer += usize::from(now + plain.timeout(&RULE) < plain_last);
            plain_last = now + plain.timeout(&RULE);
        }
        assert!(closer > 10, "{closer}");
        // It converges all the same.
        assert_eq!(beat.estimate().timeout(&RULE), 100 + 50 + 1_000);
    }

    fn rules() -> impl Strategy<Value = TimeoutRule> {
        (
            1..=1_000u64,
            prop_oneof![Just(0u64), 0..=5_000u64],
            prop_oneof![1..=10u64, 1..=10_000u64],
            0..=100_000u64,
        )
            .prop_map(|(granularity, pause_allowance, min, span)| TimeoutRule {
                granularity,
                pause_allowance,
                min,
                max: min + span,
            })
    }

    fn samples() -> impl Strategy<Value = (u64, Vec<u64>)> {
        (
            1..=120_000u64,
            prop::collection::vec(
                prop_oneof![0..=3_000u64, 0..=200_000u64, Just(u64::MAX)],
                1..200,
            ),
        )
    }

    proptest! {
        /// The fixed-point estimator follows RFC 6298's formulas (α = 1/8,
        /// β = 1/4, K = 4, computed exactly in `f64`) to within rounding.
        #[test]
        fn the_estimate_follows_rfc_6298(
            interval in 1..=60_000u64,
            gaps in prop::collection::vec(1..=60_000u64, 1..100),
        ) {
            let rule = TimeoutRule { granularity: 1, pause_allowance: 0, min: 1, max: 1_000_000 };
            let mut estimate = Estimate::initial(interval);
            let (mut srtt, mut rttvar) = (interval as f64, interval as f64 / 2.0);
            for gap in gaps {
                estimate = estimate.update(gap);
                rttvar = 0.75 * rttvar + 0.25 * (srtt - gap as f64).abs();
                srtt = 0.875 * srtt + 0.125 * gap as f64;
                let exact = srtt + (4.0 * rttvar).max(1.0);
                let got = estimate.timeout(&rule) as f64;
                // Rounding: the mean is floored (error in [-1, 1) ms) and the
                // deviation's error e obeys e' ∈ ¾e + (-2, 3), so stays
                // within (-8, 12) ms.
                prop_assert!((got - exact).abs() < 13.0, "{got} vs RFC 6298 {exact}");
            }
        }

        /// For any heartbeat sequence, no heartbeat brings the deadline
        /// (last heard + timeout) closer: the monitor's wheel, which looks
        /// at a session again only at the deadline it was filed for, never
        /// convicts late.
        #[test]
        fn a_heartbeat_never_brings_the_deadline_closer(
            (interval, gaps) in samples(),
            rule in rules(),
        ) {
            let beat = Beat::default();
            beat.reset(0, Estimate::initial(interval));
            let deadline = |beat: &Beat| beat.heard().saturating_add(beat.estimate().timeout(&rule));
            let mut now = 0u64;
            for gap in gaps {
                let before = deadline(&beat);
                now = now.saturating_add(gap);
                beat.record(now, &rule);
                prop_assert!(deadline(&beat) >= before, "{} before {before}", deadline(&beat));
            }
        }

        /// For any heartbeat sequence the timeout stays within [min, max]
        /// and never falls below the last inter-arrival that did not
        /// convict (one that arrived within the timeout in force).
        #[test]
        fn the_timeout_is_clamped_and_covers_the_last_accepted_gap(
            (interval, gaps) in samples(),
            rule in rules(),
        ) {
            let beat = Beat::default();
            beat.reset(0, Estimate::initial(interval));
            let mut now = 0u64;
            for gap in gaps {
                let before = beat.estimate().timeout(&rule);
                let next = now.saturating_add(gap);
                let gap = next - now;
                now = next;
                beat.record(now, &rule);
                let after = beat.estimate().timeout(&rule);
                prop_assert!((rule.min..=rule.max).contains(&after), "{after} outside");
                if gap > 0 && gap <= before {
                    prop_assert!(after >= gap, "timeout {after} below accepted gap {gap}");
                }
            }
        }
    }
}
