//! Configuration of the liveness monitor and the bounds it implies.

use std::sync::Arc;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Duration;

use super::LivenessMonitor;
use super::probe::Prober;
use crate::build::{BuildError, check_count};
use crate::event::EventBus;
use crate::reclaim::ReclaimQueue;
use crate::session::TimeoutRule;
use crate::store::SessionStore;

/// The longest any duration setting may be.
const MAX_SETTING: Duration = Duration::from_secs(24 * 60 * 60);
/// The finest and coarsest monitor tick.
const GRANULARITY: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(1));
/// Timer wheel sizes, in slots (powers of two).
const WHEEL_SLOTS: (u64, u64) = (64, 1 << 16);

/// The validated settings, in the monitor's units (milliseconds).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) interval: u64,
    pub(crate) rule: TimeoutRule,
    pub(crate) probe_timeout: Duration,
    pub(crate) probe_retries: u32,
    pub(crate) backoff: ProbeBackoff,
    pub(crate) events: usize,
    pub(crate) reclaim: Option<ReclaimQueue>,
    pub(crate) bus: Option<EventBus>,
}

impl Config {
    /// The monitor's tick: its clock's resolution and the timer wheel's
    /// slot width.
    pub(crate) fn tick(&self) -> Duration {
        Duration::from_millis(self.rule.granularity)
    }

    /// Slots of the timer wheel: enough to cover the maximum timeout, so
    /// an entry is looked at once per timeout, not more.
    pub(crate) fn wheel_slots(&self) -> u64 {
        (self.rule.max.div_ceil(self.rule.granularity) + 2)
            .next_power_of_two()
            .clamp(WHEEL_SLOTS.0, WHEEL_SLOTS.1)
    }

    /// See [`LivenessMonitor::reap_bound`].
    pub(crate) fn reap_bound(&self, timeout: Duration) -> Duration {
        let rounds = self.probe_retries.saturating_add(1);
        // The wheel convicts within a tick of the deadline; a round already
        // in flight for the router ends within a probe timeout; then the
        // suspect's own rounds, with a backoff between each two.
        let total = timeout
            .saturating_add(self.tick())
            .saturating_add(self.probe_timeout.saturating_mul(rounds.saturating_add(1)))
            .saturating_add(self.backoff.longest_total());
        // Timer granularity: tokio fires timers on whole milliseconds; one
        // millisecond per timer (the tick, and per round the probe timeout
        // and the backoff).
        let timers = rounds.saturating_add(1).saturating_mul(2).saturating_add(1);
        total.saturating_add(Duration::from_millis(u64::from(timers)))
    }
}

/// The waits between a router's probe rounds: exponential from `min`,
/// doubling up to `max`, one after each of a suspect's first
/// `probe_retries` failed rounds, each plus a random jitter of up to one
/// more delay if configured.
///
/// One value serves the probe driver, which sleeps
/// [`delays`](Self::delays), and the bound, which adds up the longest
/// they can be: both come from the same backon builder, so they cannot
/// drift apart.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProbeBackoff {
    /// The delays without jitter. backon draws each jitter on top of its
    /// delay and never feeds it into the next one, so these are the
    /// jittered schedule's base delays too.
    exact: ExponentialBuilder,
    max: Duration,
    retries: u32,
    jitter: bool,
}

/// Delays [`ProbeBackoff::longest_total`] adds up one by one; every later
/// one counts as the largest: no delay exceeds it, and one that doubles
/// from a nanosecond reaches four days (the longest default) in 49 steps.
const SUMMED_DELAYS: u32 = 64;

impl ProbeBackoff {
    fn new(min: Duration, max: Duration, retries: u32, jitter: bool) -> Self {
        Self {
            exact: ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_factor(2.0)
                .with_max_times(usize::try_from(retries).unwrap_or(usize::MAX)),
            max,
            retries,
            jitter,
        }
    }

    /// The driver's waits, in order: the first after a suspect's first
    /// failed round.
    pub(crate) fn delays(&self) -> ExponentialBackoff {
        if self.jitter {
            self.exact.with_jitter().build()
        } else {
            self.exact.build()
        }
    }

    /// The longest the driver's wait can be for a base `delay`: backon's
    /// jitter is `delay.mul_f32(r)` with `r` in [0, 1), which its `f32`
    /// arithmetic keeps at or below `delay.mul_f32(1.0)`.
    fn longest(&self, delay: Duration) -> Duration {
        if !self.jitter {
            return delay;
        }
        let jitter = Duration::try_from_secs_f32(delay.as_secs_f32()).unwrap_or(Duration::MAX);
        delay.saturating_add(jitter)
    }

    /// The longest all `probe_retries` waits can add up to. Saturates.
    fn longest_total(&self) -> Duration {
        let summed = self
            .exact
            .build()
            .take(SUMMED_DELAYS as usize)
            .fold(Duration::ZERO, |total, delay| {
                total.saturating_add(self.longest(delay))
            });
        let rest = self.retries.saturating_sub(SUMMED_DELAYS);
        summed.saturating_add(self.longest(self.max).saturating_mul(rest))
    }
}

/// The piece `build` errors name.
pub(super) const PIECE: &str = "LivenessMonitor";
/// The largest event capacity: the channel allocates it up front.
const MAX_EVENTS: usize = 1 << 20;

/// Builder of a [`LivenessMonitor`].
///
/// Every duration is checked by [`build`](Self::build), which returns a
/// [`BuildError`] instead of panicking.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     EventBus, LivenessMonitor, MemoryStore, ProbeBatch, ProbeError, Prober,
///     ReclaimQueue, SessionId,
/// };
///
/// struct Wire;
/// impl Prober for Wire {
///     async fn probe(&self, _: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
///         Ok(Vec::new()) // answers come back as heartbeats
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let monitor = LivenessMonitor::builder()
///     .heartbeat_interval(Duration::from_secs(5))
///     .timeout_range(Duration::from_secs(5), Duration::from_secs(120))
///     .pause_allowance(Duration::from_secs(2))
///     .probe_timeout(Duration::from_secs(2))
///     .probe_retries(3)
///     .granularity(Duration::from_millis(100))
///     .event_capacity(4_096)
///     .reclaim_queue(ReclaimQueue::builder().build()?)
///     .events(EventBus::default())
///     .build(Arc::new(MemoryStore::new()), Wire)?;
/// assert!(monitor.reap_bound(Duration::from_secs(10)) > Duration::from_secs(18));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct LivenessMonitorBuilder {
    interval: Duration,
    min_timeout: Duration,
    max_timeout: Duration,
    pause_allowance: Duration,
    granularity: Duration,
    probe_timeout: Duration,
    probe_retries: u32,
    /// `None`: from the probe timeout.
    probe_backoff: Option<(Duration, Duration)>,
    probe_jitter: bool,
    events: usize,
    reclaim: Option<ReclaimQueue>,
    bus: Option<EventBus>,
}

impl Default for LivenessMonitorBuilder {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            min_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(60),
            pause_allowance: Duration::from_secs(1),
            granularity: Duration::from_millis(50),
            probe_timeout: Duration::from_secs(1),
            probe_retries: 2,
            probe_backoff: None,
            probe_jitter: false,
            events: 1_024,
            reclaim: None,
            bus: None,
        }
    }
}

impl LivenessMonitorBuilder {
    /// A builder with the defaults: heartbeat interval 1 s, timeout within
    /// [1 s, 60 s], pause allowance 1 s, granularity 50 ms, probe timeout
    /// 1 s, 2 probe retries, probe backoff from 0.5 s up to 4 s without
    /// jitter (half the probe timeout up to four), 1,024 buffered events,
    /// no reclaim queue.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{LivenessMonitorBuilder, MemoryStore, NoProbe};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor =
    ///     LivenessMonitorBuilder::new().build(Arc::new(MemoryStore::new()), NoProbe)?;
    /// assert_eq!(monitor.stats().watched, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// How often sessions are expected to heartbeat: the estimate every
    /// newly watched session starts from. Within [granularity, 1 day].
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The range every session's timeout is clamped to. `min ≤ max`, both
    /// within [granularity, 1 day].
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn timeout_range(mut self, min: Duration, max: Duration) -> Self {
        self.min_timeout = min;
        self.max_timeout = max;
        self
    }

    /// Added to every timeout: how long the controller itself may stall
    /// (a pause, a slow disk) without convicting anyone. A monitor tick
    /// late by more than this extends every deadline instead (the
    /// local-health guard). At most 1 day.
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn pause_allowance(mut self, allowance: Duration) -> Self {
        self.pause_allowance = allowance;
        self
    }

    /// The monitor's tick: the resolution of heartbeat times and the
    /// granularity floor of the timeout (RFC 6298's G). Within
    /// [1 ms, 1 s]; whole milliseconds.
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn granularity(mut self, granularity: Duration) -> Self {
        self.granularity = granularity;
        self
    }

    /// How long a probe round waits for answers. Within (0, 1 day].
    ///
    /// Counts `probe_retries + 2` times in
    /// [`reap_bound`](LivenessMonitor::reap_bound): a suspect's own rounds,
    /// and the round in flight for its router when it became suspect.
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// How many more probe rounds a suspect gets after the first before it
    /// is reaped. Any number; [`reap_bound`](LivenessMonitor::reap_bound)
    /// grows by a probe timeout and a backoff delay for each (and saturates
    /// at [`Duration::MAX`]).
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn probe_retries(mut self, retries: u32) -> Self {
        self.probe_retries = retries;
        self
    }

    /// The wait between a suspect's failed probe round and its next one:
    /// `min` after its first, doubling after each, up to `max`. New
    /// suspects of the router do not wait: they cut the wait short, and
    /// every suspect of the router is probed in their round. `min ≤ max`,
    /// both at most 1 day; zero probes again at once. By default half the
    /// probe timeout, up to four probe timeouts.
    ///
    /// All `probe_retries` delays count in
    /// [`reap_bound`](LivenessMonitor::reap_bound), each with its largest
    /// jitter (see [`probe_jitter`](Self::probe_jitter)).
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{LivenessMonitor, MemoryStore, NoProbe};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor = LivenessMonitor::builder()
    ///     .granularity(Duration::from_millis(10))
    ///     .timeout_range(Duration::from_secs(3), Duration::from_secs(3))
    ///     .pause_allowance(Duration::ZERO)
    ///     .probe_timeout(Duration::from_secs(1))
    ///     .probe_retries(3)
    ///     .probe_backoff(Duration::from_millis(500), Duration::from_secs(1))
    ///     .build(Arc::new(MemoryStore::new()), NoProbe)?;
    /// // 3 s timeout, a 10 ms tick, 1 s for a round in flight, 4 rounds of
    /// // 1 s, waits of 0.5 s, 1 s and 1 s, and 1 ms per timer (11).
    /// assert_eq!(
    ///     monitor.reap_bound(Duration::from_secs(3)),
    ///     Duration::from_millis(3_000 + 10 + 1_000 + 4_000 + 2_500 + 11)
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn probe_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.probe_backoff = Some((min, max));
        self
    }

    /// Adds to each backoff delay a random jitter of up to one more delay,
    /// so that routers whose sessions fell silent together are not probed
    /// in step. Off by default. With jitter,
    /// [`reap_bound`](LivenessMonitor::reap_bound) counts each delay
    /// twice.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{LivenessMonitor, MemoryStore, NoProbe};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let exact = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
    /// let jittered = LivenessMonitor::builder()
    ///     .probe_jitter(true)
    ///     .build(Arc::clone(&store), NoProbe)?;
    /// // Two retries: waits of 0.5 s and 1 s by default, each up to doubled.
    /// let timeout = Duration::from_secs(5);
    /// assert_eq!(
    ///     jittered.reap_bound(timeout) - exact.reap_bound(timeout),
    ///     Duration::from_millis(1_500)
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn probe_jitter(mut self, jitter: bool) -> Self {
        self.probe_jitter = jitter;
        self
    }

    /// How many events a subscriber may fall behind before it misses some.
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.events = events;
        self
    }

    /// Releases reaped sessions' resources through `queue` (by class, then
    /// traffic) instead of inline in the monitor.
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn reclaim_queue(mut self, queue: ReclaimQueue) -> Self {
        self.reclaim = Some(queue);
        self
    }

    /// Also publishes every [`LivenessEvent`](crate::LivenessEvent) on
    /// `bus`, as [`Event::Liveness`](crate::Event::Liveness).
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn events(mut self, bus: EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Builds the monitor and starts its task on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] names the setting out of range,
    /// [`BuildError::NoRuntime`] says there is no runtime, and
    /// [`BuildError::Exhausted`] that the process has built so many monitors
    /// (2⁴⁸ − 1) that a new one could not be told apart from an old one.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{LivenessMonitor, MemoryStore, NoProbe};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let built = LivenessMonitor::builder()
    ///     .timeout_range(Duration::from_secs(60), Duration::from_secs(5)) // min above max
    ///     .build(Arc::clone(&store), NoProbe);
    /// assert_eq!(built.unwrap_err().refused_setting(), Some("timeout_range"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn build<S, Pr>(
        self,
        store: Arc<S>,
        prober: Pr,
    ) -> Result<LivenessMonitor<S, Pr>, BuildError>
    where
        S: SessionStore,
        Pr: Prober,
    {
        let config = self.validate()?;
        LivenessMonitor::start(store, prober, config)
    }

    fn validate(self) -> Result<Config, BuildError> {
        let refuse = |setting, problem: String| Err(BuildError::setting(PIECE, setting, problem));
        let (finest, coarsest) = GRANULARITY;
        if self.granularity < finest || self.granularity > coarsest {
            return refuse(
                "granularity",
                format!("must be within [1ms, 1s], got {:?}", self.granularity),
            );
        }
        let granularity = self.granularity;
        let within = |d: Duration| d >= granularity && d <= MAX_SETTING;
        if !within(self.interval) {
            return refuse(
                "heartbeat_interval",
                format!(
                    "must be within [granularity, 1 day], got {:?}",
                    self.interval
                ),
            );
        }
        if !within(self.min_timeout)
            || !within(self.max_timeout)
            || self.min_timeout > self.max_timeout
        {
            return refuse(
                "timeout_range",
                format!(
                    "must be a range within [granularity, 1 day], got [{:?}, {:?}]",
                    self.min_timeout, self.max_timeout
                ),
            );
        }
        if self.pause_allowance > MAX_SETTING {
            return refuse(
                "pause_allowance",
                format!("must be at most 1 day, got {:?}", self.pause_allowance),
            );
        }
        if self.probe_timeout.is_zero() || self.probe_timeout > MAX_SETTING {
            return refuse(
                "probe_timeout",
                format!("must be within (0, 1 day], got {:?}", self.probe_timeout),
            );
        }
        let (backoff_min, backoff_max) = match self.probe_backoff {
            Some((min, max)) if min > max || max > MAX_SETTING => {
                return refuse(
                    "probe_backoff",
                    format!("must be a range within 1 day, got [{min:?}, {max:?}]"),
                );
            }
            Some(range) => range,
            None => (self.probe_timeout / 2, self.probe_timeout.saturating_mul(4)),
        };
        let events = check_count(PIECE, "event_capacity", self.events, MAX_EVENTS)?;
        Ok(Config {
            interval: millis(self.interval),
            rule: TimeoutRule {
                granularity: millis(granularity).max(1),
                pause_allowance: millis(self.pause_allowance),
                min: millis(self.min_timeout),
                max: millis(self.max_timeout),
            },
            probe_timeout: self.probe_timeout,
            probe_retries: self.probe_retries,
            backoff: ProbeBackoff::new(
                backoff_min,
                backoff_max,
                self.probe_retries,
                self.probe_jitter,
            ),
            events,
            reclaim: self.reclaim,
            bus: self.bus,
        })
    }
}

/// Whole milliseconds of `d`, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::*;

    const DAY: Duration = MAX_SETTING;

    /// The bound adds up the longest waits the driver's own schedule can
    /// draw: every jittered delay backon draws stays within it.
    #[test]
    fn jittered_delays_never_exceed_the_longest_the_bound_counts() {
        let ms = Duration::from_millis;
        for (min, max) in [
            (ms(500), ms(4_000)),
            (ms(3), ms(7)),
            (ms(1), DAY),
            (DAY / 3, DAY),
            (DAY, DAY),
            (Duration::from_nanos(1), ms(1)),
        ] {
            let backoff = ProbeBackoff::new(min, max, 6, true);
            let exact: Vec<_> = backoff.exact.build().collect();
            assert_eq!(exact.len(), 6);
            let longest: Vec<_> = exact.iter().map(|&d| backoff.longest(d)).collect();
            for _ in 0..2_000 {
                let drawn: Vec<_> = backoff.delays().collect();
                assert_eq!(drawn.len(), 6);
                for ((drawn, base), longest) in drawn.iter().zip(&exact).zip(&longest) {
                    assert!(
                        base <= drawn && drawn <= longest,
                        "{drawn:?} ∉ [{base:?}, {longest:?}]"
                    );
                }
            }
            assert_eq!(backoff.longest_total(), longest.iter().sum::<Duration>());
        }
    }

    #[test]
    fn the_longest_total_covers_any_number_of_retries() {
        let ms = Duration::from_millis;
        let exact = ProbeBackoff::new(ms(500), ms(4_000), 100, false);
        // 0.5 + 1 + 2 s, then 97 waits of 4 s.
        assert_eq!(exact.longest_total(), ms(3_500 + 97 * 4_000));
        let jittered = ProbeBackoff::new(ms(500), ms(4_000), 100, true);
        assert_eq!(jittered.longest_total(), ms(2 * (3_500 + 97 * 4_000)));
        assert_eq!(
            ProbeBackoff::new(ms(0), ms(0), u32::MAX, true).longest_total(),
            Duration::ZERO
        );
        let huge = ProbeBackoff::new(DAY, DAY, u32::MAX, true);
        assert_eq!(
            huge.longest_total(),
            DAY.saturating_mul(2).saturating_mul(u32::MAX)
        );
        assert_eq!(
            ProbeBackoff::new(ms(1), ms(1), 0, true).longest_total(),
            Duration::ZERO
        );
    }
}
