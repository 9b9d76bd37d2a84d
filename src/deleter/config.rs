//! Configuration of the deleter and the bound it implies.

use std::num::NonZeroU32;
use std::sync::Arc;

use tokio::time::Duration;

use super::RouterDeleter;
use super::notifier::TerminationNotifier;
use crate::backoff::Backoff;
use crate::budget::NotificationBudget;
use crate::build::{BuildError, check_count, wired};
use crate::events::EventBus;
use crate::reclaim::ReclaimQueue;
use crate::store::SessionStore;

/// The settings of a [`RouterDeleter`], with their defaults.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) batch_size: usize,
    pub(crate) notify_rate: Option<NonZeroU32>,
    pub(crate) notify_timeout: Duration,
    pub(crate) confirm_timeout: Duration,
    /// The waits between notification rounds; its retries are the rounds
    /// after the first.
    pub(crate) backoff: Backoff,
    /// Where forced sessions' resources are released, if anywhere.
    pub(crate) reclaim: Option<ReclaimQueue>,
    /// Where the run publishes its events, if anywhere.
    pub(crate) events: Option<EventBus>,
    /// The most runs at once (`None`: no cap); the rest wait, in order.
    pub(crate) max_concurrent: Option<usize>,
    /// The routers' notification budget, shared with other sources.
    pub(crate) budget: Option<NotificationBudget>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            notify_rate: None,
            notify_timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(10),
            backoff: default_backoff(),
            reclaim: None,
            events: None,
            max_concurrent: None,
            budget: None,
        }
    }
}

/// The deleter's default backoff: 3 retries, from 500 ms doubling up to
/// 10 s, with jitter.
fn default_backoff() -> Backoff {
    Backoff::new()
        .retries(3)
        .delays(Duration::from_millis(500), Duration::from_secs(10))
}

impl Config {
    /// The longest a deletion of `sessions` sessions can wait on timers,
    /// whatever the notifier does; see [`RouterDeleter::max_wait`].
    pub(crate) fn max_wait(&self, sessions: usize) -> Duration {
        let batches = u32::try_from(sessions.div_ceil(self.batch_size)).unwrap_or(u32::MAX);
        let pacing = self.notify_rate.map_or(Duration::ZERO, |rate| {
            Duration::try_from_secs_f64(sessions as f64 / f64::from(rate.get()))
                .unwrap_or(Duration::MAX)
        });
        // Waiting for the notification budget ends at the round's
        // confirmation deadline (a batch it cannot send by then is skipped).
        let budget = if self.budget.is_some() {
            self.confirm_timeout
        } else {
            Duration::ZERO
        };
        let round = self
            .notify_timeout
            .saturating_mul(batches)
            .saturating_add(pacing)
            .saturating_add(budget)
            .saturating_add(self.confirm_timeout);
        // A `max_duration` may end the backoff early: fewer rounds, never
        // more.
        let retries = self.backoff.max_retries();
        let rounds = retries.saturating_add(1);
        let total = round
            .saturating_mul(rounds)
            .saturating_add(self.backoff.longest_total());
        // Timer granularity: tokio fires timers on whole milliseconds, and
        // backon computes delays in `f32`; one millisecond of slack per
        // timer covers both (per round: a timeout and a pacing sleep per
        // batch, and the confirmation deadline; per retry: the backoff).
        let timers = batches
            .saturating_mul(2)
            .saturating_add(1)
            .saturating_mul(rounds)
            .saturating_add(retries);
        // A run whose caller holds its future unpolled is taken over by
        // the steward within two of its ticks: once, as it is a waiter of
        // the run to its end from then on.
        total
            .saturating_add(TIMER_SLACK.saturating_mul(timers))
            .saturating_add(super::steward::TAKEOVER)
    }
}

/// Slack per timer in [`Config::max_wait`].
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Builder of a [`RouterDeleter`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     Backoff, EventBus, MemoryStore, NotifyError, ReclaimQueue, RouterDeleter,
///     TerminationBatch, TerminationNotifier,
/// };
///
/// struct Wire;
/// impl TerminationNotifier for Wire {
///     async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> { Ok(()) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let deleter = RouterDeleter::builder()
///     .batch_size(500)
///     .notify_rate(20_000)
///     .notify_timeout(Duration::from_secs(2))
///     .confirm_timeout(Duration::from_secs(5))
///     .backoff(Backoff::new().retries(2).delays(Duration::from_millis(250), Duration::from_secs(4)))
///     .reclaim_queue(ReclaimQueue::builder().build()?)
///     .events(EventBus::default())
///     .build(store, Wire)?;
/// assert!(deleter.max_wait(10_000) > Duration::from_secs(5));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct RouterDeleterBuilder {
    config: Config,
    /// As given; checked by `build`.
    notify_rate: Option<u32>,
}

impl RouterDeleterBuilder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The first setting given that [`Lifecycle`](crate::Lifecycle) wires
    /// itself, if any.
    pub(crate) fn wired(&self) -> Option<&'static str> {
        wired([
            ("events", self.config.events.is_some()),
            ("reclaim_queue", self.config.reclaim.is_some()),
            ("notification_budget", self.config.budget.is_some()),
        ])
    }

    /// The most deletions that run at once (default: no cap; at least 1,
    /// checked by [`build`](Self::build)). A deletion past the cap waits,
    /// in the order the deletions were asked for, before it fences its
    /// router (the router stays live meanwhile); it counts in
    /// [`running`](super::RouterDeleter::running) and in
    /// [`queued`](super::RouterDeleter::queued), and a second `delete` of
    /// the same router joins it. A mass deletion (a region's routers at
    /// once) then holds at most this many routers' sessions in flight.
    ///
    /// One exception: a deletion started from inside a running one (of any
    /// deleter: first polled in a store method, the notifier or a
    /// resource's release, as a cascade to child routers does) takes no
    /// slot, nor does a run such a deletion joins or waits for, even if it
    /// is dropped before the end: awaited there, it would wait for a slot
    /// its own caller holds, for ever once every slot is held so. Such
    /// deletions run beyond the cap. One spawned (`tokio::spawn`) instead
    /// waits for a slot as any, so do not await its `JoinHandle` from
    /// inside a run: once every slot is held by runs doing so, none moves
    /// again (from a notifier, until its notify timeout).
    pub fn max_concurrent(mut self, deletions: usize) -> Self {
        self.config.max_concurrent = Some(deletions);
        self
    }

    /// Sessions per notification call (default 1,000; at least 1, checked
    /// by [`build`](Self::build)).
    ///
    /// See the example on [`RouterDeleterBuilder`].
    pub fn batch_size(mut self, size: usize) -> Self {
        self.config.batch_size = size;
        self
    }

    /// At most this many sessions notified per second, so deleting a huge
    /// router does not flood the controller or the router (default: no
    /// limit; at least 1, checked by [`build`](Self::build)).
    ///
    /// See the example on [`RouterDeleterBuilder`].
    pub fn notify_rate(mut self, sessions_per_second: u32) -> Self {
        self.notify_rate = Some(sessions_per_second);
        self
    }

    /// Takes every notification batch out of `budget`, each router's
    /// budget shared with the other sources that use it (the liveness
    /// monitor's probes, your own messages): see [`NotificationBudget`].
    ///
    /// A batch waits for its router's budget up to the round's confirmation
    /// deadline; one that cannot be sent by then is skipped (a failed
    /// notice: its sessions are notified again next round, or forced), so
    /// [`max_wait`](RouterDeleter::max_wait) still bounds the run (it adds
    /// one confirmation timeout a round). Default: no budget.
    pub fn notification_budget(mut self, budget: NotificationBudget) -> Self {
        self.config.budget = Some(budget);
        self
    }

    /// How long one notification call may take before it counts as failed
    /// (default 5 s).
    ///
    /// See the example on [`RouterDeleterBuilder`].
    pub fn notify_timeout(mut self, timeout: Duration) -> Self {
        self.config.notify_timeout = timeout;
        self
    }

    /// How long to wait for confirmations after each notification round
    /// (default 10 s).
    ///
    /// See the example on [`RouterDeleterBuilder`].
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.config.confirm_timeout = timeout;
        self
    }

    /// How many times to re-notify the sessions that did not confirm before
    /// force-closing them (default 3): shorthand for the
    /// [`backoff`](Self::backoff)'s [`retries`](Backoff::retries), so the
    /// later of the two calls wins.
    pub fn retries(mut self, retries: u32) -> Self {
        self.config.backoff = self.config.backoff.retries(retries);
        self
    }

    /// The waits between notification rounds, and how many rounds follow
    /// the first (its [`retries`](Backoff::retries)). By default 3
    /// retries, from 500 ms doubling up to 10 s, with jitter. Checked by
    /// [`build`](Self::build) ([`Backoff::validate`]).
    /// [`RouterDeleter::max_wait`] counts every delay at its longest
    /// ([`Backoff::longest_total`]); a
    /// [`max_duration`](Backoff::max_duration) caps them in total, and
    /// the rounds with them.
    ///
    /// See the example on [`RouterDeleterBuilder`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Releases the resources of force-closed sessions through `queue`
    /// instead of in the deleter: every forced session is closed first, then
    /// its resources are queued class by class, critical ones of every
    /// session first (see [`ReclaimQueue::close_session`]). The deletion
    /// still returns only once every release ran or was reported failed, so
    /// its force phase also waits for the queue (backpressure included) on
    /// top of [`RouterDeleter::max_wait`]; a paused queue holds deletions in
    /// that phase until it is resumed.
    pub fn reclaim_queue(mut self, queue: ReclaimQueue) -> Self {
        self.config.reclaim = Some(queue);
        self
    }

    /// Publishes [`Event::RouterFenced`](crate::Event::RouterFenced),
    /// [`Event::SessionTerminating`](crate::Event::SessionTerminating) for
    /// each session a run marks, and
    /// [`Event::RouterDeleted`](crate::Event::RouterDeleted) with the run's
    /// report on `bus`.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.config.events = Some(bus);
        self
    }

    /// Builds the deleter over `store`, notifying through `notifier`.
    ///
    /// The deleter spawns each run on the tokio runtime that first polls
    /// [`RouterDeleter::delete`].
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] for a batch size or a notify rate of 0, or a
    /// backoff [`Backoff::validate`] refuses.
    ///
    /// See the example on [`RouterDeleterBuilder`].
    pub fn build<S: SessionStore, N: TerminationNotifier>(
        mut self,
        store: Arc<S>,
        notifier: N,
    ) -> Result<RouterDeleter<S, N>, BuildError> {
        const PIECE: &str = "RouterDeleter";
        check_count(PIECE, "batch_size", self.config.batch_size, usize::MAX)?;
        if let Some(rate) = self.notify_rate {
            self.config.notify_rate = Some(NonZeroU32::new(rate).ok_or_else(|| {
                BuildError::setting(
                    PIECE,
                    "notify_rate",
                    "must be at least 1 session per second",
                )
            })?);
        }
        self.config.backoff.check_for(PIECE, "backoff")?;
        if let Some(cap) = self.config.max_concurrent {
            check_count(
                PIECE,
                "max_concurrent",
                cap,
                tokio::sync::Semaphore::MAX_PERMITS,
            )?;
        }
        Ok(RouterDeleter::from_parts(store, notifier, self.config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_wait_adds_up_the_schedule() {
        let config = Config {
            batch_size: 10,
            notify_rate: None,
            notify_timeout: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(2),
            backoff: Backoff::new()
                .retries(2)
                .delays(Duration::from_millis(500), Duration::from_secs(4)),
            reclaim: None,
            events: None,
            max_concurrent: None,
            budget: None,
        };
        // 3 rounds × (3 batches × 1 s + 2 s) + backoffs (0.5 s and 1 s, each
        // doubled for jitter) + 1 ms × (3 rounds × 7 timers + 2 retries)
        // + the steward's pick-up of a held future (21 ms).
        assert_eq!(
            config.max_wait(25),
            Duration::from_millis(15_000 + 3_000 + 23 + 21)
        );
    }

    #[test]
    fn max_wait_of_a_zero_backoff_adds_no_delay_and_returns_at_once() {
        let config = Config {
            backoff: Backoff::new()
                .retries(u32::MAX)
                .delays(Duration::ZERO, Duration::from_secs(1)),
            ..Config::default()
        };
        let no_backoff = Config {
            backoff: config.backoff.delays(Duration::ZERO, Duration::ZERO),
            ..config.clone()
        };
        // Delays that start at zero stay zero: none is counted.
        assert_eq!(config.max_wait(10), no_backoff.max_wait(10));
    }

    #[test]
    fn max_wait_saturates_on_extreme_settings() {
        let config = Config {
            batch_size: 1,
            notify_rate: NonZeroU32::new(1),
            notify_timeout: Duration::MAX,
            confirm_timeout: Duration::MAX,
            backoff: Backoff::new()
                .retries(u32::MAX)
                .delays(Duration::from_nanos(1), Duration::from_secs(86_400)),
            reclaim: None,
            events: None,
            max_concurrent: None,
            budget: None,
        };
        assert_eq!(config.max_wait(usize::MAX), Duration::MAX);
        assert_eq!(
            Config::default().max_wait(0),
            Duration::from_millis(47_000 + 7 + 21)
        );
    }
}
