//! The expiry monitor: one task, one timer wheel, lazy re-arm.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{Config, ExpiryMonitorBuilder, PIECE};
use super::report::{Counters, ExpiryStats, TrackError};
use crate::build::BuildError;
use crate::session::Session;
use crate::store::{MemoryStore, SessionStore};

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
///   [`Event::SessionExpiringSoon`](crate::Event::SessionExpiringSoon) is published and it is re-filed at its
///   expiry; due, it is closed. Extending costs the monitor nothing until
///   the old expiry comes up.
/// - **Closed through the common close path**, with
///   [`CloseReason::Expired`](crate::CloseReason::Expired): resources released exactly once, through
///   the [`ReclaimQueue`](crate::ReclaimQueue) if one is configured, and
///   the session removed from the store (by key: a new session that
///   reuses its id is not touched). A session closed by anything else, or
///   marked `Terminating` by its router's deletion, is left alone and
///   leaves the wheel.
/// - **Holds a closed session's handle for at most about a minute.** The
///   task sweeps its whole wheel once a minute (a few slots a tick, on the
///   monitor's task), so a session that closed long before its expiry
///   (its router deleted, say) is let go within a minute and a tick, its
///   payload dropped then if nothing else holds it, and
///   [`stats().tracked`](ExpiryStats::tracked) no longer counts it. The
///   sweep reads each tracked session's state once a minute: about 40 ms
///   of one core a minute for a million tracked sessions.
/// - **Extend vs expire is decided once.** The task marks a due session
///   expired with a compare-exchange against the expiry it read: an
///   extension that lands first wins (the session lives on), one that
///   comes after gets [`ExpiryError::Expired`](crate::session::ExpiryError::Expired).
/// - **Within one tick:** a session closes within one
///   [`tick`](ExpiryMonitorBuilder::tick) after its expiry (plus up to
///   1 ms, tokio's timer resolution, and the time its close takes), never
///   before.
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
    pub(super) shared: Arc<Shared<S>>,
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

pub(super) struct Shared<S: SessionStore> {
    pub(super) store: Arc<S>,
    pub(super) config: Config,
    /// Tick 0 of the wheel.
    pub(super) epoch: Instant,
    /// Sessions to file in the wheel.
    pub(super) incoming: Mutex<Vec<Session<S::Payload>>>,
    /// Wakes the task, idle while it holds nothing, when sessions come in.
    pub(super) arrival: Notify,
    pub(super) stopped: AtomicBool,
    pub(super) counters: Counters,
    pub(super) stop: CancellationToken,
    pub(super) tracker: TaskTracker,
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
            .field("stats", &self.stats())
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
        let runtime =
            crate::build::timed_runtime().ok_or(BuildError::NoRuntime { piece: PIECE })?;
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
        shared
            .tracker
            .spawn_on(super::task::task(Arc::clone(&shared)), &runtime);
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
        let first = {
            // `shutdown` sets `stopped` under this lock: a track either
            // lands before the shutdown or says `ShutDown`, never `Ok`
            // after it. (The flag and the push run no user code.)
            let mut incoming = shared.incoming.lock();
            if shared.stopped.load(Ordering::Acquire) {
                return Err(TrackError::ShutDown);
            }
            if !session.track_expiry() {
                return Err(TrackError::AlreadyTracked(session.id()));
            }
            // Counted before the task can see it (and count it out).
            Counters::add(&shared.counters.tracked, 1);
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
        let mut stats = self.shared.counters.snapshot();
        if self.shared.stopped.load(Ordering::Acquire) {
            // Stopping or stopped: nothing is tracked any more.
            stats.tracked = 0;
        }
        stats
    }

    /// Stops the monitor: no session is tracked or expired from now on
    /// (the sessions it tracked keep their expiry and stay open, and
    /// another monitor may track them once this returns); closes already
    /// decided finish first. A monitor whose runtime went away, or whose
    /// last handle was dropped, stops the same way.
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
    /// let store = Arc::new(MemoryStore::new());
    /// let monitor = ExpiryMonitor::builder().build(Arc::clone(&store))?;
    /// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///     .expires_in(Duration::from_secs(1))
    ///     .into_session();
    /// monitor.track(&session)?;
    /// monitor.shutdown().await;
    /// tokio::time::sleep(Duration::from_secs(5)).await;
    /// assert!(!session.is_closed()); // nobody expires after shutdown
    /// assert_eq!(monitor.track(&session), Err(TrackError::ShutDown));
    ///
    /// // Another monitor takes it over.
    /// let next = ExpiryMonitor::builder().build(store)?;
    /// next.track(&session)?;
    /// tokio::time::sleep(Duration::from_secs(1)).await;
    /// assert!(session.is_closed());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        {
            // Under `incoming`: see `track`.
            let _incoming = self.shared.incoming.lock();
            self.shared.stopped.store(true, Ordering::Release);
        }
        self.shared.stop.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}
