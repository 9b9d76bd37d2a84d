//! Configuration of the liveness monitor and the bounds it implies.

use std::sync::Arc;

use tokio::time::Duration;

use super::LivenessMonitor;
use super::partition::GuardConfig;
use super::probe::Prober;
use crate::backoff::Backoff;
use crate::budget::NotificationBudget;
use crate::build::{BuildError, wired};
use crate::events::EventBus;
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
    /// The most suspects one probe call names.
    pub(crate) probe_batch: usize,
    /// The waits between a suspect's probe rounds; its retries are the
    /// rounds after the first.
    pub(crate) backoff: Backoff,
    pub(crate) reclaim: Option<ReclaimQueue>,
    pub(crate) bus: Option<EventBus>,
    pub(crate) guard: GuardConfig,
    /// The routers' notification budget, shared with other sources.
    pub(crate) budget: Option<NotificationBudget>,
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

    /// How many more probe rounds a suspect gets after its first.
    pub(crate) fn probe_retries(&self) -> u32 {
        self.backoff.max_retries()
    }

    /// See [`LivenessMonitor::reap_bound`].
    pub(crate) fn reap_bound(&self, timeout: Duration) -> Duration {
        let rounds = self.probe_retries().saturating_add(1);
        // The wheel convicts within a tick of the deadline; a round already
        // in flight for the router ends within a probe timeout; then the
        // suspect's own rounds, with a backoff between each two.
        let total = timeout
            .saturating_add(self.tick())
            .saturating_add(self.probe_timeout.saturating_mul(rounds.saturating_add(1)))
            // The driver starts the schedule over when new suspects join:
            // a `max_duration` caps each run, not a suspect's waits.
            .saturating_add(self.backoff.longest_uncapped());
        // Timer granularity: tokio fires timers on whole milliseconds; one
        // millisecond per timer (the tick, and per round the probe timeout
        // and the backoff).
        let timers = rounds.saturating_add(1).saturating_mul(2).saturating_add(1);
        total.saturating_add(Duration::from_millis(u64::from(timers)))
    }
}

/// The piece `build` errors name.
pub(super) const PIECE: &str = "LivenessMonitor";

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
    probe_batch: usize,
    probe_retries: u32,
    /// `None`: from the probe timeout, with `probe_retries`.
    probe_backoff: Option<Backoff>,
    reclaim: Option<ReclaimQueue>,
    bus: Option<EventBus>,
    budget: Option<NotificationBudget>,
    partition_guard: bool,
    partition_share: f64,
    /// `None`: the probing phase, `reap_bound(0)`.
    partition_window: Option<Duration>,
    partition_min_routers: usize,
    partition_max_hold: Option<Duration>,
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
            probe_batch: 10_000,
            probe_retries: 2,
            probe_backoff: None,
            reclaim: None,
            bus: None,
            budget: None,
            partition_guard: true,
            partition_share: 0.5,
            partition_window: None,
            partition_min_routers: 4,
            partition_max_hold: Some(Duration::from_secs(5 * 60)),
        }
    }
}

impl LivenessMonitorBuilder {
    /// A builder with the defaults: heartbeat interval 1 s, timeout within
    /// [1 s, 60 s], pause allowance 1 s, granularity 50 ms, probe timeout
    /// 1 s, 2 probe retries, probe backoff from 0.5 s up to 4 s without
    /// jitter (half the probe timeout up to four), no reclaim queue, and
    /// the partition guard on (see
    /// [`partition_guard`](Self::partition_guard) for its defaults).
    pub fn new() -> Self {
        Self::default()
    }

    /// The first setting given that [`Lifecycle`](crate::Lifecycle) wires
    /// itself, if any.
    pub(crate) fn wired(&self) -> Option<&'static str> {
        wired([
            ("events", self.bus.is_some()),
            ("reclaim_queue", self.reclaim.is_some()),
            ("notification_budget", self.budget.is_some()),
        ])
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

    /// The most suspects one [`ProbeBatch`](crate::ProbeBatch) names
    /// (default 10,000; at least 1, checked by `build`). A round with more
    /// suspects on one router (a big router gone silent) is split into
    /// calls of at most this many, made at once and waited for within the
    /// same probe timeout, so no call carries an unbounded list.
    pub fn probe_batch_max(mut self, suspects: usize) -> Self {
        self.probe_batch = suspects;
        self
    }

    /// How many more probe rounds a suspect gets after the first before it
    /// is reaped. Any number; [`reap_bound`](LivenessMonitor::reap_bound)
    /// grows by a probe timeout and a backoff delay for each (and saturates
    /// at [`Duration::MAX`]). Shorthand for the
    /// [`probe_backoff`](Self::probe_backoff)'s
    /// [`retries`](Backoff::retries): the later of the two calls wins.
    ///
    /// See the example on [`LivenessMonitorBuilder`].
    pub fn probe_retries(mut self, retries: u32) -> Self {
        self.probe_retries = retries;
        self.probe_backoff = self.probe_backoff.map(|backoff| backoff.retries(retries));
        self
    }

    /// The waits between a suspect's failed probe round and its next one,
    /// and how many rounds follow its first (the backoff's
    /// [`retries`](Backoff::retries), as [`probe_retries`](Self::probe_retries)
    /// sets them: the later of the two calls wins). New suspects of the
    /// router do not wait: they cut the wait short, and every suspect of
    /// the router is probed in their round, and the schedule starts over.
    /// A [`max_duration`](Backoff::max_duration) caps the waits of one run
    /// of the schedule: once it is spent, the remaining rounds follow at
    /// once. Checked by [`build`](Self::build) ([`Backoff::validate`]).
    ///
    /// By default: 2 retries, from half the probe timeout doubling up to
    /// four probe timeouts (at most 1 day), without jitter. Jitter keeps
    /// routers whose sessions fell silent together from being probed in
    /// step.
    ///
    /// [`reap_bound`](LivenessMonitor::reap_bound) counts every delay at
    /// its longest, without the `max_duration` (a suspect's waits may span
    /// several runs of the schedule).
    pub fn probe_backoff(mut self, backoff: Backoff) -> Self {
        self.probe_retries = backoff.max_retries();
        self.probe_backoff = Some(backoff);
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

    /// Takes every probe call out of `budget`, each router's budget shared
    /// with the other sources that use it (the deleter's termination
    /// notices, your own messages): see
    /// [`NotificationBudget`](crate::NotificationBudget).
    ///
    /// A call waits for its router's budget within the probe timeout; one
    /// that cannot be sent by then counts as unanswered (a failed probe
    /// round), so [`reap_bound`](crate::LivenessMonitor::reap_bound) still
    /// holds. Leave the probes room in the budget: a slow but live session
    /// is spared by its probe's answer, not by a probe that was not sent.
    /// Default: no budget.
    pub fn notification_budget(mut self, budget: NotificationBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Turns the **partition guard** on or off (default: on).
    ///
    /// If the controller's own network fails, every router goes silent at
    /// once, and reaping them all would close every session of a healthy
    /// fleet. So when more than [`partition_share`](Self::partition_share)
    /// of the watched routers went silent within
    /// [`partition_window`](Self::partition_window) (a router is silent
    /// when every session the monitor watches on it is suspect, or when
    /// none of its sessions was heard for longer than the timeout of its
    /// fastest suspect: its probe driver looks each round), and at
    /// least [`partition_min_routers`](Self::partition_min_routers) routers
    /// are watched, the guard engages: it publishes
    /// [`Event::PartitionSuspected`](crate::Event::PartitionSuspected) and
    /// reaps nobody while it holds. Suspects are still probed, once per two
    /// probe timeouts, and no round counts against them (nor is reported
    /// as a [`ProbeFailed`](crate::LivenessEvent::ProbeFailed)). Once the
    /// silent share is back at the threshold or below (heartbeats and
    /// answers spare the suspects; drivers look at least once per two probe
    /// timeouts), it lifts with
    /// [`Event::PartitionEnded`](crate::Event::PartitionEnded), and every
    /// session starts over as after a stall: it counts as heard at the
    /// lift, so a session still silent is reaped within
    /// [`reap_bound`](LivenessMonitor::reap_bound) of its timeout, counted
    /// from the lift, and none is reaped for rounds it failed before. A
    /// hold that reaches [`partition_max_hold`](Self::partition_max_hold)
    /// ends too (see there).
    ///
    /// A single dead router, or a few, are reaped as usual, within
    /// [`reap_bound`](LivenessMonitor::reap_bound): the guard only looks
    /// at the share of silent routers, and never delays a reap otherwise.
    /// Routers the reconciler holds (see
    /// [`hold_router`](LivenessMonitor::hold_router)) are never silent.
    ///
    /// The guard engages at the latest when a reap is due, so it needs the
    /// probing phase ([`reap_bound`](LivenessMonitor::reap_bound) of a zero
    /// timeout, about `1 + probe_retries` probe timeouts and their
    /// backoffs) to outlast the spread of the routers' silences (about a
    /// heartbeat interval). With 0 probe retries and a probe timeout
    /// shorter than the heartbeat interval, the first sessions of a
    /// partition may be reaped before it engages.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{LivenessMonitor, MemoryStore, liveness::NoProbe};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor = LivenessMonitor::builder()
    ///     .partition_share(0.3) // more than 30 % of the routers silent
    ///     .partition_window(Duration::from_secs(10)) // within 10 s
    ///     .partition_min_routers(10) // and at least 10 routers watched
    ///     .partition_max_hold(Some(Duration::from_secs(600))) // for 10 min at most
    ///     .build(Arc::new(MemoryStore::new()), NoProbe)?;
    /// assert!(!monitor.stats().partition_suspected);
    ///
    /// // Off: every silent session is reaped, however many there are.
    /// let _unguarded = LivenessMonitor::builder()
    ///     .partition_guard(false)
    ///     .build(Arc::new(MemoryStore::new()), NoProbe)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn partition_guard(mut self, enabled: bool) -> Self {
        self.partition_guard = enabled;
        self
    }

    /// The guard engages when **more than** this share of the watched
    /// routers went silent together. Within (0, 1), checked by
    /// [`build`](Self::build); default 0.5: a partition silences every
    /// router, while real router deaths rarely take half the fleet at
    /// once. Routers, not sessions, vote: one big router's death is one
    /// failure, however many sessions it had (the events report sessions
    /// too).
    ///
    /// See the example on [`partition_guard`](Self::partition_guard).
    pub fn partition_share(mut self, share: f64) -> Self {
        self.partition_share = share;
        self
    }

    /// Only routers that went silent within this long of each other count
    /// to engage the guard (once it holds, every silent router counts
    /// until it is heard). Within [granularity, 1 day]. By default the
    /// probing phase, [`reap_bound`](LivenessMonitor::reap_bound) of a
    /// zero timeout: a router silent longer than that was being reaped
    /// alone, not silenced with the others.
    ///
    /// See the example on [`partition_guard`](Self::partition_guard).
    pub fn partition_window(mut self, window: Duration) -> Self {
        self.partition_window = Some(window);
        self
    }

    /// With fewer watched routers than this, the guard never engages:
    /// default 4, so a controller of 1 to 3 routers reaps a dead router as
    /// usual (with so few, one death is "most of the fleet"). Any number;
    /// 0 and 1 mean always.
    ///
    /// See the example on [`partition_guard`](Self::partition_guard).
    pub fn partition_min_routers(mut self, routers: usize) -> Self {
        self.partition_min_routers = routers;
        self
    }

    /// The longest the guard holds (default 5 minutes; `None`: until the
    /// routers are heard). A silence that outlasts it is a real mass death
    /// (a region's routers lost together), not a partition: the guard
    /// lifts with `expired: true` and convictions resume where they were
    /// (probe rounds count again; no fresh start), so a session still
    /// silent is reaped within [`reap_bound`](LivenessMonitor::reap_bound)
    /// of its timeout from then, and the guard stays off until the silent
    /// share drops back to the threshold or below. Without a maximum, such sessions stay open until their
    /// routers are deleted or lost (the reconciler's grace period), and the
    /// guard holds meanwhile ([`LivenessStats::partition_suspected`](super::LivenessStats::partition_suspected)
    /// says so). Within (0, 1 day].
    ///
    /// See the example on [`partition_guard`](Self::partition_guard).
    pub fn partition_max_hold(mut self, max: Option<Duration>) -> Self {
        self.partition_max_hold = max;
        self
    }

    /// Builds the monitor and starts its task on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] names the setting out of range,
    /// [`BuildError::NoRuntime`] says there is no runtime (or no time driver
    /// in it), and
    /// [`BuildError::Exhausted`] that the process has built so many monitors
    /// (2⁴⁸ − 1) that a new one could not be told apart from an old one.
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
        let backoff = self.probe_backoff.unwrap_or_else(|| {
            Backoff::new()
                .retries(self.probe_retries)
                .delays(
                    self.probe_timeout / 2,
                    self.probe_timeout.saturating_mul(4).min(MAX_SETTING),
                )
                .jitter(false)
        });
        backoff.check_for(PIECE, "probe_backoff")?;
        if self.probe_batch == 0 {
            return refuse(
                "probe_batch_max",
                String::from("must be at least 1 suspect"),
            );
        }
        let share = self.partition_share;
        if !(share > 0.0 && share < 1.0) {
            return refuse(
                "partition_share",
                format!("must be within (0, 1), got {share}"),
            );
        }
        if let Some(window) = self.partition_window
            && !within(window)
        {
            return refuse(
                "partition_window",
                format!("must be within [granularity, 1 day], got {window:?}"),
            );
        }
        if let Some(max) = self.partition_max_hold
            && (max.is_zero() || max > MAX_SETTING)
        {
            return refuse(
                "partition_max_hold",
                format!("must be within (0, 1 day], got {max:?}"),
            );
        }
        let mut config = Config {
            interval: millis(self.interval),
            rule: TimeoutRule {
                granularity: millis(granularity).max(1),
                pause_allowance: millis(self.pause_allowance),
                min: millis(self.min_timeout),
                max: millis(self.max_timeout),
            },
            probe_timeout: self.probe_timeout,
            probe_batch: self.probe_batch,
            backoff,
            reclaim: self.reclaim,
            bus: self.bus,
            budget: self.budget,
            guard: GuardConfig {
                enabled: self.partition_guard,
                share,
                window: self.partition_window.map_or(0, millis),
                min_routers: self.partition_min_routers,
                max_hold: self.partition_max_hold.map(millis),
            },
        };
        if self.partition_window.is_none() {
            config.guard.window = millis(config.reap_bound(Duration::ZERO));
        }
        Ok(config)
    }
}

/// Whole milliseconds of `d`, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
