//! The expiry monitor: one task, one timer wheel, lazy re-arm.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{Config, ExpiryMonitorBuilder, PIECE, WHEEL_SLOTS};
use super::report::{Counters, ExpiryStats, TrackError};
use crate::build::BuildError;
use crate::closing::close_and_remove;
use crate::events::{Event, emit};
use crate::session::{CloseFrom, CloseReason, ExpirySnapshot, Session, SessionState};
use crate::store::{MemoryStore, SessionStore};
use crate::wheel::Wheel;

/// Closes sessions when their expiry comes.
///
/// A session may carry an absolute expiry on tokio's clock
/// ([`NewSession::expires_at`](crate::NewSession::expires_at), for example
/// its API session's), moved later by
/// [`Session::extend_expiry`] (one atomic compare-exchange on the session).
/// Once [`track`](Self::track)ed (or created through
/// [`Lifecycle::create`](crate::Lifecycle::create), which tracks sessions
/// with an expiry):
///
/// - **One task, one timer wheel, lazy re-arm.** No timer per session:
///   each session has one wheel entry that carries no deadline. When it
///   comes up, the task reads the session's expiry again: extended, it is
///   re-filed; within [`warn_before`](ExpiryMonitorBuilder::warn_before)
///   and not yet warned for this expiry, one
///   [`Event::SessionExpiringSoon`] is published and it is re-filed at its
///   expiry; due, it is closed. Extending costs the monitor nothing until
///   the old expiry comes up.
/// - **Closed through the common close path**, with
///   [`CloseReason::Expired`]: resources released exactly once, through
///   the [`ReclaimQueue`](crate::ReclaimQueue) if one is configured, and
///   the session removed from the store (by key: a new session that
///   reuses its id is not touched). A session closed by anything else, or
///   marked `Terminating` by its router's deletion, is left alone and
///   leaves the wheel.
/// - **Extend vs expire is decided once.** The task marks a due session
///   expired with a compare-exchange against the expiry it read: an
///   extension that lands first wins (the session lives on), one that
///   comes after gets [`ExpiryError::Expired`](crate::session::ExpiryError::Expired).
/// - **Within one tick:** a session closes within one
///   [`tick`](ExpiryMonitorBuilder::tick) after its expiry (plus the time
///   its close takes), never before.
/// - **Warnings re-arm on extension:** a session warned and then extended
///   is warned again before its new expiry (`warn_before` ahead of it, or
///   when its old expiry comes up if the new one is closer than that).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     CloseReason, Event, EventBus, ExpiryMonitor, MemoryStore, NewSession, RouterId, SessionId,
///     SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let bus = EventBus::default();
/// let mut events = bus.subscribe();
/// let monitor = ExpiryMonitor::builder()
///     .warn_before(Duration::from_secs(10))
///     .events(bus)
///     .build(Arc::clone(&store))?;
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
///
/// let spec = NewSession::new(SessionId::new(1), router, incarnation)
///     .expires_in(Duration::from_secs(60));
/// let session = store.create(spec).await?;
/// monitor.track(&session)?;
///
/// let Some(Event::SessionExpiringSoon { session: id, .. }) = events.recv().await else {
///     unreachable!("only the monitor publishes on this bus");
/// };
/// assert_eq!(id, session.id()); // 10 s before its expiry
/// assert_eq!(session.closed().await, CloseReason::Expired);
/// assert!(store.get(session.id()).await?.is_none()); // removed from the store
/// assert_eq!((monitor.stats().expired, monitor.stats().warned), (1, 1));
/// # Ok(())
/// # }
/// ```
pub struct ExpiryMonitor<S: SessionStore> {
    shared: Arc<Shared<S>>,
    _owner: Arc<Owner>,
}

/// Stops the monitor when the last handle drops.
#[derive(Debug)]
struct Owner(CancellationToken);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

struct Shared<S: SessionStore> {
    store: Arc<S>,
    config: Config,
    /// Tick 0 of the wheel.
    epoch: Instant,
    /// Sessions to file in the wheel.
    incoming: Mutex<Vec<Session<S::Payload>>>,
    /// Wakes the task, idle while it holds nothing, when sessions come in.
    arrival: Notify,
    stopped: AtomicBool,
    counters: Counters,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// A session in the wheel, and the expiry it was warned for, if any.
struct Entry<P> {
    session: Session<P>,
    warned: Option<ExpirySnapshot>,
}

/// What one pass over the due entries found.
struct Pass<P> {
    due: Vec<Session<P>>,
    warnings: Vec<Event>,
    fires: usize,
}

impl<S: SessionStore> Clone for ExpiryMonitor<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            _owner: Arc::clone(&self._owner),
        }
    }
}

impl<S: SessionStore> fmt::Debug for ExpiryMonitor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpiryMonitor")
            .field("config", &self.shared.config)
            .field("stats", &self.shared.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl ExpiryMonitor<MemoryStore> {
    /// A builder to configure the monitor, for any store.
    /// See the example on [`ExpiryMonitorBuilder`].
    pub fn builder() -> ExpiryMonitorBuilder {
        ExpiryMonitorBuilder::new()
    }
}

impl<S: SessionStore> ExpiryMonitor<S> {
    pub(super) fn start(store: Arc<S>, config: Config) -> Result<Self, BuildError> {
        let runtime = Handle::try_current().map_err(|_| BuildError::NoRuntime { piece: PIECE })?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            store,
            config,
            epoch: Instant::now(),
            incoming: Mutex::new(Vec::new()),
            arrival: Notify::new(),
            stopped: AtomicBool::new(false),
            counters: Counters::default(),
            stop: stop.clone(),
            tracker: TaskTracker::new(),
        });
        shared.tracker.spawn_on(run(Arc::clone(&shared)), &runtime);
        Ok(Self {
            shared,
            _owner: Arc::new(Owner(stop)),
        })
    }

    /// Starts tracking `session`'s expiry: the monitor closes it when its
    /// expiry comes, after a warning. No timer is created: the session is
    /// handed to the monitor's task, which files it in its wheel at its
    /// next tick. A session already due closes at that tick.
    ///
    /// [`Lifecycle::create`](crate::Lifecycle::create) tracks the sessions
    /// it creates with an expiry.
    ///
    /// # Errors
    ///
    /// [`TrackError`] if the session is closed, has no expiry, is tracked
    /// already (by this or another monitor), or the monitor is shut down.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     ExpiryMonitor, Incarnation, NewSession, RouterId, SessionId, expiry::TrackError,
    /// };
    /// use session_lifecycle::MemoryStore;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor = ExpiryMonitor::builder().build(Arc::new(MemoryStore::new()))?;
    /// let spec = |id| NewSession::new(SessionId::new(id), RouterId::new(1), Incarnation::new(1));
    ///
    /// let session = spec(1).expires_in(Duration::from_secs(60)).into_session();
    /// monitor.track(&session)?;
    /// assert_eq!(monitor.track(&session), Err(TrackError::AlreadyTracked(session.id())));
    /// let forever = spec(2).into_session();
    /// assert_eq!(monitor.track(&forever), Err(TrackError::NoExpiry(forever.id())));
    /// # Ok(())
    /// # }
    /// ```
    pub fn track(&self, session: &Session<S::Payload>) -> Result<(), TrackError> {
        let shared = &*self.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(TrackError::ShutDown);
        }
        if session.is_closed() {
            return Err(TrackError::Closed(session.id()));
        }
        if session.expires_at().is_none() {
            return Err(TrackError::NoExpiry(session.id()));
        }
        if !session.track_expiry() {
            return Err(TrackError::AlreadyTracked(session.id()));
        }
        Counters::add(&shared.counters.tracked, 1);
        let first = {
            let mut incoming = shared.incoming.lock();
            incoming.push(session.clone());
            incoming.len() == 1
        };
        if first {
            // Outside the lock. A permit is kept if the task is not
            // waiting yet: no wake-up is lost.
            shared.arrival.notify_one();
        }
        Ok(())
    }

    /// The monitor's counters. See the example on [`ExpiryMonitor`].
    #[must_use]
    pub fn stats(&self) -> ExpiryStats {
        self.shared.counters.snapshot()
    }

    /// Stops the monitor: no session is tracked or expired from now on
    /// (the sessions it tracked keep their expiry and stay open); closes
    /// already decided finish first.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the monitor stays stopped; the closes in hand finish
    /// in their task.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{
    ///     ExpiryMonitor, Incarnation, MemoryStore, NewSession, RouterId, SessionId,
    ///     expiry::TrackError,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor = ExpiryMonitor::builder().build(Arc::new(MemoryStore::new()))?;
    /// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///     .expires_in(Duration::from_secs(1))
    ///     .into_session();
    /// monitor.track(&session)?;
    /// monitor.shutdown().await;
    /// tokio::time::sleep(Duration::from_secs(5)).await;
    /// assert!(!session.is_closed()); // nobody expires after shutdown
    /// assert_eq!(monitor.track(&session), Err(TrackError::ShutDown));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.stop.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

/// The monitor task: sleeps until the next tick while it holds sessions
/// (until one comes in otherwise), then looks at the entries that came up
/// and files the incoming sessions.
async fn run<S: SessionStore>(shared: Arc<Shared<S>>) {
    // Built at the first session: a monitor nobody uses costs no wheel.
    let mut wheel: Option<Wheel<Entry<S::Payload>>> = None;
    let mut held = 0usize;
    let mut now_tick = 0u64;
    loop {
        let woke = if held == 0 {
            shared.idle().await
        } else {
            shared.sleep(shared.instant_of(now_tick.saturating_add(1))).await
        };
        if !woke {
            break;
        }
        now_tick = shared.tick_of(Instant::now());
        let wheel = wheel.get_or_insert_with(|| Wheel::new(WHEEL_SLOTS));
        let mut pass = Pass {
            due: Vec::new(),
            warnings: Vec::new(),
            fires: 0,
        };
        for tick in wheel.advance(now_tick) {
            let entries = wheel.take(tick);
            pass.fires += entries.len();
            held -= entries.len();
            for entry in entries {
                held += shared.file(wheel, entry, now_tick, &mut pass);
            }
        }
        let incoming = std::mem::take(&mut *shared.incoming.lock());
        for session in incoming {
            let entry = Entry {
                session,
                warned: None,
            };
            held += shared.file(wheel, entry, now_tick, &mut pass);
        }
        shared.finish(pass);
    }
}

impl<S: SessionStore> Shared<S> {
    /// Files `entry` in the wheel (returns 1), or lets it leave (0): due,
    /// closed, terminating or cleared.
    fn file(
        &self,
        wheel: &mut Wheel<Entry<S::Payload>>,
        mut entry: Entry<S::Payload>,
        now_tick: u64,
        pass: &mut Pass<S::Payload>,
    ) -> usize {
        loop {
            let session = &entry.session;
            let seen = session.expiry();
            let at = seen.at(session.created_at());
            let (Some(at), SessionState::Active, false) = (at, session.state(), seen.is_expired())
            else {
                self.counters.leave(1);
                return 0;
            };
            let expiry_tick = self.tick_after(at);
            if now_tick >= expiry_tick {
                if session.expire(seen) {
                    self.counters.leave(1);
                    pass.due.push(entry.session);
                    return 0;
                }
                // Extended since it was read: look again.
                continue;
            }
            let warn = !self.config.warn_before.is_zero() && entry.warned != Some(seen);
            let tick = if warn {
                let warn_tick = at
                    .checked_sub(self.config.warn_before)
                    .map_or(0, |from| self.tick_of(from));
                if now_tick >= warn_tick {
                    pass.warnings.push(Event::SessionExpiringSoon {
                        session: session.id(),
                        router: session.router(),
                        incarnation: session.incarnation(),
                        expires_at: at,
                    });
                    entry.warned = Some(seen);
                    expiry_tick
                } else {
                    warn_tick
                }
            } else {
                expiry_tick
            };
            wheel.insert(entry, tick);
            return 1;
        }
    }

    /// Publishes the pass's warnings and hands its due sessions to a
    /// close task (one per tick with expiries, never one per session).
    fn finish(self: &Arc<Self>, pass: Pass<S::Payload>) {
        let Pass {
            due,
            warnings,
            fires,
        } = pass;
        Counters::add(&self.counters.timer_fires, fires);
        Counters::add(&self.counters.warned, warnings.len());
        for warning in warnings {
            emit(self.config.bus.as_ref(), || warning);
        }
        if !due.is_empty() {
            let shared = Arc::clone(self);
            self.tracker.spawn(async move { shared.expire(due).await });
        }
    }

    /// Closes the sessions found due with [`CloseReason::Expired`]
    /// (resources through the reclaim queue if there is one) and removes
    /// them from the store. One that closed or was marked `Terminating`
    /// since is left to whoever did it.
    async fn expire(&self, due: Vec<Session<S::Payload>>) {
        let closed = close_and_remove(
            &*self.store,
            self.config.reclaim.as_ref(),
            &due,
            CloseReason::Expired,
            CloseFrom::Active,
        )
        .await;
        Counters::add(&self.counters.expired, closed.len());
        tracing::debug!(expired = closed.len(), due = due.len(), "sessions expired");
    }

    /// Waits until sessions come in; `false` if the monitor stopped first.
    async fn idle(&self) -> bool {
        if !self.incoming.lock().is_empty() {
            return !self.stop.is_cancelled();
        }
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = self.arrival.notified() => true,
        }
    }

    /// Sleeps until `until`; `false` if the monitor stopped first.
    async fn sleep(&self, until: Instant) -> bool {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep_until(until) => true,
        }
    }

    fn tick_nanos(&self) -> u128 {
        self.config.tick.as_nanos().max(1)
    }

    /// The tick `at` falls in (ticks start at the epoch).
    fn tick_of(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos / self.tick_nanos()).unwrap_or(u64::MAX)
    }

    /// The first tick that starts at or after `at`: an expiry's.
    fn tick_after(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos.div_ceil(self.tick_nanos())).unwrap_or(u64::MAX)
    }

    /// When `tick` starts.
    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick).saturating_mul(self.tick_nanos());
        let since = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        // Past what the clock holds: ticks come from `now`, so never in
        // practice; a tick from now keeps the loop going.
        self.epoch
            .checked_add(since)
            .unwrap_or_else(|| Instant::now() + self.config.tick)
    }
}
