//! One notification budget per router, shared by every source that sends
//! a router work about its sessions.
//!
//! # Invariants
//!
//! - Per router, a generic cell rate algorithm (GCRA, the token bucket as
//!   one instant): `due` is when the router's budget would be full again.
//!   Taking `n` sessions at `now` moves `due` to `max(due, now) + n /
//!   rate`, and may go ahead once `due − burst / rate ≤` the instant it
//!   goes. So over any span the router is sent at most `burst + rate ×
//!   span` sessions, by all sources together, in the order they asked.
//! - Exact: instants are kept in units of `1 / rate` nanoseconds since
//!   the budget was built (`u128`), so a session costs exactly 10⁹ units
//!   and the burst `burst × 10⁹`, whatever the rate and however many
//!   sessions a request asks for; only the instant a request may go is
//!   rounded, up, to the nanosecond.
//! - A router whose `due` has passed has a full budget and needs no entry:
//!   such entries are dropped when the map has doubled since the last
//!   sweep, and at least once a second (amortised O(1) per take).
//!
//! # Deadlock safety
//!
//! One lock, `routers`, held only to read and move one router's `due` (or
//! to sweep); never across an `.await`, and no user code runs under it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use tokio::time::{Duration, Instant};

use crate::build::BuildError;
use crate::id::RouterId;

/// How many sessions a second each router may be sent, by every source
/// together: the deleter's termination notices, the liveness monitor's
/// probes, and whatever your own code sends through
/// [`acquire`](Self::acquire).
///
/// A router that is deleted while a probe storm hits it, or that a
/// reconciliation tells to drop thousands of sessions, gets one stream of
/// work at the rate you set, not the sum of every source's own pacing.
/// Each router has its own budget (a token bucket of `burst` sessions,
/// refilled at `rate` a second); requests for one router are served in
/// the order they asked. Cloning is cheap and shares the budget: give one
/// to every piece (`RouterDeleterBuilder::notification_budget`,
/// `LivenessMonitorBuilder::notification_budget`, or
/// `LifecycleBuilder::notification_budget` for both).
///
/// Pieces that must keep a time bound never wait past it for budget: the
/// [`RouterDeleter`](crate::RouterDeleter) skips a batch it cannot send by
/// the round's confirmation deadline (counted as a failed notice; the
/// stragglers are notified again next round or forced).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{NotificationBudget, RouterId};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // 1,000 sessions a second per router, bursts of up to 500.
/// let budget = NotificationBudget::builder().rate(1_000).burst(500).build()?;
/// let router = RouterId::new(7);
///
/// let start = tokio::time::Instant::now();
/// budget.acquire(router, 500).await; // the burst: at once
/// budget.acquire(router, 1_000).await; // then at the rate: a second
/// assert_eq!(start.elapsed(), Duration::from_secs(1));
///
/// // Another router has its own budget.
/// budget.acquire(RouterId::new(8), 500).await;
/// assert_eq!(start.elapsed(), Duration::from_secs(1));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct NotificationBudget {
    shared: Arc<Shared>,
}

struct Shared {
    /// Sessions a second.
    rate: u32,
    /// Sessions a router with a full budget may be sent at once.
    burst: u32,
    /// Where the units of `Routers::due` start.
    epoch: Instant,
    routers: Mutex<Routers>,
    granted: AtomicU64,
    delayed: AtomicU64,
    refused: AtomicU64,
}

struct Routers {
    /// Each router's due instant, in units of `1 / rate` ns since `epoch`.
    due: HashMap<RouterId, u128, RandomState>,
    /// The map's size after the last sweep.
    swept: usize,
    /// When to sweep at the latest.
    next_sweep: Instant,
}

/// The budget a [`NotificationBudget`] could not grant by the deadline it
/// was given; nothing was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("notification budget of {router} exhausted: {sessions} sessions can be sent in {wait:?}")]
#[non_exhaustive]
pub struct BudgetExhausted {
    /// The router.
    pub router: RouterId,
    /// The sessions asked for.
    pub sessions: usize,
    /// How long from the request they could have been sent.
    pub wait: Duration,
}

/// Counters of a [`NotificationBudget`], since it was built. Not a
/// consistent cut: each field is read on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStats {
    /// Requests granted (at once or after a wait).
    pub granted: u64,
    /// Granted requests that had to wait for budget.
    pub delayed: u64,
    /// Requests refused because the budget could not be had by their
    /// deadline.
    pub refused: u64,
    /// Routers whose budget is not full now.
    pub routers_in_debt: usize,
    /// Routers the budget remembers (those in debt, and those paid up
    /// since its last sweep, at most a second ago or half the map).
    pub routers: usize,
}

impl NotificationBudget {
    /// A builder: 10,000 sessions a second per router, bursts of 10,000.
    pub fn builder() -> NotificationBudgetBuilder {
        NotificationBudgetBuilder::default()
    }

    /// Waits until `router` may be sent `sessions` more sessions' worth of
    /// work, and takes that budget. A request larger than the burst waits
    /// for the excess at the rate.
    ///
    /// # Cancel safety
    ///
    /// The budget is taken when the call is first polled; dropping the
    /// future while it waits does not give it back (later requests for the
    /// router wait as if it had been used).
    pub async fn acquire(&self, router: RouterId, sessions: usize) {
        if let Ok(at) = self.reserve(router, sessions, None) {
            wait_until(at).await;
        }
    }

    /// As [`acquire`](Self::acquire), but only if the budget can be had by
    /// `deadline`: otherwise returns at once, takes nothing, and says how
    /// long it would have taken.
    ///
    /// # Errors
    ///
    /// [`BudgetExhausted`] if `router`'s budget for `sessions` comes after
    /// `deadline`.
    ///
    /// # Cancel safety
    ///
    /// As for [`acquire`](Self::acquire).
    pub async fn acquire_by(
        &self,
        router: RouterId,
        sessions: usize,
        deadline: Instant,
    ) -> Result<(), BudgetExhausted> {
        let at = self.reserve(router, sessions, Some(deadline))?;
        wait_until(at).await;
        Ok(())
    }

    /// The budget's counters.
    #[must_use]
    pub fn stats(&self) -> BudgetStats {
        let shared = &self.shared;
        let now = Instant::now();
        let (routers_in_debt, routers) = {
            let routers = shared.routers.lock();
            let now = shared.units(now);
            let in_debt = routers.due.values().filter(|&&due| due > now).count();
            (in_debt, routers.due.len())
        };
        BudgetStats {
            granted: shared.granted.load(Ordering::Relaxed),
            delayed: shared.delayed.load(Ordering::Relaxed),
            refused: shared.refused.load(Ordering::Relaxed),
            routers_in_debt,
            routers,
        }
    }

    /// Takes the budget for `sessions` (unless it comes after `deadline`)
    /// and returns the instant they may go.
    fn reserve(
        &self,
        router: RouterId,
        sessions: usize,
        deadline: Option<Instant>,
    ) -> Result<Instant, BudgetExhausted> {
        let shared = &*self.shared;
        let cost = (sessions as u128).saturating_mul(PER_SESSION);
        let now = Instant::now();
        let now_units = shared.units(now);
        let mut routers = shared.routers.lock();
        let due = routers
            .due
            .get(&router)
            .copied()
            .unwrap_or(now_units)
            .max(now_units);
        let next = due.saturating_add(cost);
        let burst = u128::from(shared.burst) * PER_SESSION;
        let at = shared.instant(next.saturating_sub(burst).max(now_units), now);
        if deadline.is_some_and(|deadline| at > deadline) {
            drop(routers);
            shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(BudgetExhausted {
                router,
                sessions,
                wait: at - now,
            });
        }
        routers.due.insert(router, next);
        routers.sweep(now, now_units);
        drop(routers);
        shared.granted.fetch_add(1, Ordering::Relaxed);
        if at > now {
            shared.delayed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(at)
    }
}

/// Sleeps until `at`, unless it has come.
async fn wait_until(at: Instant) {
    if at > Instant::now() {
        // On the runtime that polls it: a deletion's run may be driven
        // from another runtime than the one it started on.
        crate::timer::sleep_until_here(at).await;
    }
}

impl Shared {
    /// `at` in units of `1 / rate` ns since the epoch.
    fn units(&self, at: Instant) -> u128 {
        at.saturating_duration_since(self.epoch).as_nanos() * u128::from(self.rate)
    }

    /// The instant `units` stands for, rounded up to the nanosecond; past
    /// what the clock holds (centuries of debt), [`FAR_FUTURE`] from `now`.
    fn instant(&self, units: u128, now: Instant) -> Instant {
        let nanos = units.div_ceil(u128::from(self.rate));
        u64::try_from(nanos)
            .ok()
            .and_then(|nanos| self.epoch.checked_add(Duration::from_nanos(nanos)))
            .or_else(|| now.checked_add(FAR_FUTURE))
            .unwrap_or(now)
    }
}

impl Routers {
    /// Forgets routers whose budget is full again: when the map doubled
    /// since the last sweep, and at most a second after it.
    fn sweep(&mut self, now: Instant, now_units: u128) {
        let grown = self.due.len() >= 64 && self.due.len() >= self.swept * 2;
        if grown || now >= self.next_sweep {
            self.due.retain(|_, due| *due > now_units);
            self.swept = self.due.len();
            self.next_sweep = now + SWEEP_EVERY;
        }
    }
}

/// How often the budget forgets paid-up routers, at least.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Longer than any wait that matters: what a debt past the clock's range
/// is rounded down to.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// What one session costs, in units of `1 / rate` ns: a second's worth of
/// nanoseconds.
const PER_SESSION: u128 = 1_000_000_000;

impl fmt::Debug for NotificationBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotificationBudget")
            .field("rate", &self.shared.rate)
            .field("burst", &self.shared.burst)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Builder of a [`NotificationBudget`]. Setters never panic;
/// [`build`](Self::build) checks the settings.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct NotificationBudgetBuilder {
    rate: u32,
    burst: u32,
}

impl Default for NotificationBudgetBuilder {
    fn default() -> Self {
        Self {
            rate: 10_000,
            burst: 10_000,
        }
    }
}

impl NotificationBudgetBuilder {
    /// Sessions a second each router may be sent (at least 1, at most
    /// 1,000,000,000). Default 10,000.
    pub fn rate(mut self, sessions_per_second: u32) -> Self {
        self.rate = sessions_per_second;
        self
    }

    /// Sessions a router with a full budget may be sent at once (at least
    /// 1). Default 10,000.
    pub fn burst(mut self, sessions: u32) -> Self {
        self.burst = sessions;
        self
    }

    /// Builds the budget.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] naming `rate` or `burst` if it is out of
    /// range.
    pub fn build(self) -> Result<NotificationBudget, BuildError> {
        const PIECE: &str = "NotificationBudget";
        if !(1..=1_000_000_000).contains(&self.rate) {
            let problem = format!(
                "must be within 1..=1000000000 sessions a second, not {}",
                self.rate
            );
            return Err(BuildError::setting(PIECE, "rate", problem));
        }
        if self.burst == 0 {
            return Err(BuildError::setting(
                PIECE,
                "burst",
                "must be at least 1 session",
            ));
        }
        Ok(NotificationBudget {
            shared: Arc::new(Shared {
                rate: self.rate,
                burst: self.burst,
                epoch: Instant::now(),
                routers: Mutex::new(Routers {
                    due: HashMap::default(),
                    swept: 0,
                    next_sweep: Instant::now() + SWEEP_EVERY,
                }),
                granted: AtomicU64::new(0),
                delayed: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        })
    }
}
