//! Configuration of the expiry monitor.

use std::sync::Arc;

use tokio::time::Duration;

use super::ExpiryMonitor;
use crate::build::{BuildError, wired};
use crate::events::EventBus;
use crate::reclaim::ReclaimQueue;
use crate::store::SessionStore;

/// The finest and coarsest tick.
const TICK: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(60));
/// Timer wheel slots: an expiry farther than this many ticks is looked at
/// once per turn of the wheel on its way.
pub(super) const WHEEL_SLOTS: u64 = 1 << 14;
/// How often the wheel is swept of sessions that closed (or were marked
/// or cleared) before their expiry came up: the longest the monitor keeps
/// such a session's handle, beyond one tick.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Config {
    /// Slots swept per tick: the whole wheel once per [`SWEEP_EVERY`] (or
    /// per tick, for ticks that long).
    pub(super) fn sweep_slots(&self) -> usize {
        let ticks = (SWEEP_EVERY.as_nanos() / self.tick.as_nanos().max(1)).max(1);
        let slots = u128::from(WHEEL_SLOTS).div_ceil(ticks);
        usize::try_from(slots).unwrap_or(usize::MAX)
    }
}

/// The piece `build` errors name.
pub(super) const PIECE: &str = "ExpiryMonitor";

/// The validated settings.
#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) tick: Duration,
    pub(super) warn_before: Duration,
    pub(super) reclaim: Option<ReclaimQueue>,
    pub(super) bus: Option<EventBus>,
}

/// Builder of an [`ExpiryMonitor`].
///
/// Setters never panic; [`build`](Self::build) checks the settings and
/// returns a [`BuildError`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{EventBus, ExpiryMonitor, MemoryStore, ReclaimQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let monitor = ExpiryMonitor::builder()
///     .tick(Duration::from_millis(250))
///     .warn_before(Duration::from_secs(300))
///     .reclaim_queue(ReclaimQueue::builder().build()?)
///     .events(EventBus::default())
///     .build(Arc::new(MemoryStore::new()))?;
/// assert_eq!(monitor.stats().tracked, 0);
///
/// let refused = ExpiryMonitor::builder().tick(Duration::ZERO).build(Arc::new(MemoryStore::new()));
/// assert_eq!(refused.unwrap_err().refused_setting(), Some("tick"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ExpiryMonitorBuilder {
    config: Config,
}

impl Default for ExpiryMonitorBuilder {
    fn default() -> Self {
        Self {
            config: Config {
                tick: Duration::from_millis(100),
                warn_before: Duration::from_secs(60),
                reclaim: None,
                bus: None,
            },
        }
    }
}

impl ExpiryMonitorBuilder {
    /// A builder with the defaults: a 100 ms tick, warnings 60 s ahead, no
    /// reclaim queue, no event bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first setting given that [`Lifecycle`](crate::Lifecycle) wires
    /// itself, if any.
    pub(crate) fn wired(&self) -> Option<&'static str> {
        wired([
            ("events", self.config.bus.is_some()),
            ("reclaim_queue", self.config.reclaim.is_some()),
        ])
    }

    /// The monitor's tick (default 100 ms): the timer wheel's slot width.
    /// A session closes within one tick after its expiry (and up to 1 ms
    /// more: tokio's timers fire on whole milliseconds, and the monitor's
    /// ticks start when it was built), never before. Within [1 ms, 60 s].
    ///
    /// See the example on [`ExpiryMonitorBuilder`].
    pub fn tick(mut self, tick: Duration) -> Self {
        self.config.tick = tick;
        self
    }

    /// How long before its expiry a session is warned, with one
    /// [`Event::SessionExpiringSoon`](crate::Event::SessionExpiringSoon)
    /// (default 60 s; [`Duration::ZERO`]: no warnings). The warning comes
    /// at most one tick earlier than that, and at most 1 ms later (tokio's
    /// timer resolution, as for the close: see [`tick`](Self::tick)),
    /// unless the session
    /// was tracked closer to its expiry (then at once) or already due
    /// (then none). An extension re-arms it (see
    /// [`ExpiryMonitor`]).
    ///
    /// See the example on [`ExpiryMonitorBuilder`].
    pub fn warn_before(mut self, lead: Duration) -> Self {
        self.config.warn_before = lead;
        self
    }

    /// Releases expired sessions' resources through `queue` (by class,
    /// then traffic) instead of inline in the monitor.
    ///
    /// See the example on [`ExpiryMonitorBuilder`].
    pub fn reclaim_queue(mut self, queue: ReclaimQueue) -> Self {
        self.config.reclaim = Some(queue);
        self
    }

    /// Publishes each
    /// [`Event::SessionExpiringSoon`](crate::Event::SessionExpiringSoon) on
    /// `bus`. (The close itself is the store's
    /// [`Event::SessionClosed`](crate::Event::SessionClosed), with
    /// [`CloseReason::Expired`](crate::CloseReason::Expired).)
    ///
    /// See the example on [`ExpiryMonitorBuilder`].
    pub fn events(mut self, bus: EventBus) -> Self {
        self.config.bus = Some(bus);
        self
    }

    /// Builds the monitor over `store` and starts its task on the current
    /// tokio runtime. The task stops at [`ExpiryMonitor::shutdown`], or
    /// once every handle of the monitor is dropped; it sleeps while no
    /// session is tracked.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] for a tick out of range,
    /// [`BuildError::NoRuntime`] outside a tokio runtime (or on one without
    /// its time driver).
    pub fn build<S: SessionStore>(self, store: Arc<S>) -> Result<ExpiryMonitor<S>, BuildError> {
        let (finest, coarsest) = TICK;
        let tick = self.config.tick;
        if tick < finest || tick > coarsest {
            return Err(BuildError::setting(
                PIECE,
                "tick",
                format_args!("must be within [1ms, 60s], got {tick:?}"),
            ));
        }
        ExpiryMonitor::start(store, self.config)
    }
}
