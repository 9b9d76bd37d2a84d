//! Liveness: adaptive heartbeat timeouts, probing of suspects, and reaping
//! of dead sessions.
//!
//! # Invariants
//!
//! - A session is watched by at most one monitor: its state word carries
//!   the monitor's tag, set by [`LivenessMonitor::watch`]. No two
//!   monitors of a process share a tag (see `tag`). A tag is replaced only
//!   once its monitor is gone for good (its tasks, which hold its
//!   `tag::Lease`, all ended): then nothing of it acts on the session, and
//!   another monitor may watch it.
//! - A watched, active session is in exactly one place: the `incoming`
//!   list, the wheel (owned by the monitor task), a router's pending
//!   suspects, or its probe driver's round. Closed and terminating sessions
//!   leave wherever they are next looked at.
//! - The clock only moves forward: the monitor task raises it each tick
//!   (`fetch_max`); its top bit, once set, says the monitor stopped. It is
//!   set by `shutdown` and, however the monitor task ends (its runtime
//!   may drop it), before the task lets its `tag::Lease` go.
//! - A session's heard time is in its watching monitor's clock; one ahead
//!   of that clock (written through a monitor it was taken over from) is
//!   brought down to it when the session is next filed.
//! - The monitor task ticks only while a session is watched (or the
//!   partition guard holds). With none, it rests (`idle`) until `watch`
//!   wakes it: `watch` raises the clock itself first (nothing else reads
//!   it while none is watched; the time on the runtime's clock, which a
//!   caller outside the runtime must enter to read), counts the session
//!   in, then wakes the task if it rests, and the task's next tick counts
//!   as late from the clock the watch raised (a stall right after the
//!   watch is caught as any other). The task says it rests, then looks at
//!   the count (both sides `SeqCst`): either it sees the session, or
//!   `watch` sees it resting and wakes it (a `Notify` permit, kept if it
//!   is not waiting yet). So an unused monitor costs no timer, even on a
//!   paused clock.
//!
//! # Deadlock safety
//!
//! Four locks, `incoming`, `suspects`, `held` and `partition`, never two
//! held together, never across an `.await` or while user code (the
//! prober, the store) runs.
//! `held` is a leaf: a `Reconciler` may take it under its own `graces`
//! lock, and nothing is taken under it.

mod config;
mod counters;
mod holds;
mod partition;
mod probe;
mod report;
mod tag;
mod task;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::LivenessMonitorBuilder;
pub use probe::{NoProbe, ProbeBatch, Prober};
pub use report::{HeartbeatError, LivenessStats, WatchError};

pub use crate::events::{LivenessEvent, ProbeError};

use crate::build::BuildError;
use crate::contain::LetGo;
use crate::id::{RouterId, SessionId};
use crate::session::{Estimate, Session, WatchRefused};
use crate::store::{MemoryStore, SessionStore};
use config::{Config, millis};
use counters::Counters;
use holds::Holds;
pub(crate) use holds::RouterHold;
use partition::Votes;
use probe::{Group, Suspect};

/// Set in the clock once the monitor stops.
const STOPPED: u64 = 1 << 63;

/// Finds dead ("zombie") sessions quickly without convicting live ones.
///
/// - **Heartbeats** ([`heartbeat`](Self::heartbeat)) are a few atomic
///   operations on state the session already holds: no lock, no
///   allocation, no timer work. [`heartbeat_id`](Self::heartbeat_id) takes
///   an id off the wire (one store look-up more).
/// - **Adaptive timeouts.** Each session's timeout follows its own
///   heartbeat inter-arrival, RFC 6298 style: smoothed mean and mean
///   deviation (α = 1/8, β = 1/4); timeout = mean + max(granularity,
///   4 × deviation) + pause allowance, clamped to the configured range. A
///   session that slows down gradually widens its own timeout; one that
///   speeds up narrows it, but no faster than time passes: a heartbeat
///   never brings a deadline closer.
/// - **One task, one timer wheel, lazy re-arm.** Each session has one wheel
///   entry; when it comes up, a session heard since is re-filed at its new
///   deadline, one not heard becomes suspect. The monitor's work grows with
///   timeouts, not heartbeats. A session closed otherwise (its router
///   deleted, say) leaves when it is next looked at: the monitor holds its
///   handle, and so its payload, until its entry comes up or, for a
///   suspect, its probe round ends; within
///   [`reap_bound`](Self::reap_bound) of its timeout (at most the upper
///   end of [`timeout_range`](LivenessMonitorBuilder::timeout_range), 60 s
///   by default) after the close.
///   The task ticks (every [`granularity`](LivenessMonitorBuilder::granularity))
///   only while a session is watched: a monitor with none rests, with no
///   timer, until the next [`watch`](Self::watch).
/// - **Probes.** Suspects are probed through your [`Prober`], one call per
///   router and round; an answer (or a heartbeat) before the probe timeout
///   spares the session. After `1 + probe_retries` silent rounds, with
///   backoff between them (cut short when the router has new suspects:
///   they are probed at once, with the others), the session is reaped:
///   closed with
///   [`CloseReason::LivenessTimeout`](crate::CloseReason::LivenessTimeout),
///   its resources released through the
///   [`ReclaimQueue`](crate::ReclaimQueue) if one is configured, and removed
///   from the store. [`reap_bound`](Self::reap_bound) bounds how long that
///   takes.
/// - **Local-health guard.** If the monitor's own tick runs late by more
///   than the pause allowance (the controller was paused or starved), it
///   extends every deadline by the stall instead of convicting anyone.
/// - **Partition guard.** If more than a share of the watched routers goes
///   silent together (the controller's own network failed, most likely),
///   it reaps nobody until they are heard again, with
///   [`Event::PartitionSuspected`](crate::Event::PartitionSuspected) and [`Event::PartitionEnded`](crate::Event::PartitionEnded) on the
///   bus; see [`partition_guard`](LivenessMonitorBuilder::partition_guard).
///
/// Events ([`Event::Liveness`](crate::Event::Liveness) on the bus given to
/// [`events`](LivenessMonitorBuilder::events)) come per router, and say when
/// a whole router went silent.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{
///     CloseReason, LivenessMonitor, MemoryStore, NewSession, liveness::NoProbe, RouterId, SessionId,
///     SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
///
/// let alive = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let dead = store.create(NewSession::new(SessionId::new(2), router, incarnation)).await?;
/// monitor.watch(&alive)?;
/// monitor.watch(&dead)?;
///
/// // `alive` heartbeats every second; `dead` never does.
/// for _ in 0..20 {
///     tokio::time::sleep(Duration::from_secs(1)).await;
///     monitor.heartbeat(&alive)?;
/// }
/// assert_eq!(dead.close_reason(), Some(CloseReason::LivenessTimeout));
/// assert!(!alive.is_closed());
/// assert!(store.get(dead.id()).await?.is_none()); // removed from the store
/// assert_eq!(monitor.stats().reaped, 1);
/// # Ok(())
/// # }
/// ```
pub struct LivenessMonitor<S: SessionStore, Pr> {
    shared: Arc<Shared<S, Pr>>,
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

struct Shared<S: SessionStore, Pr> {
    store: Arc<S>,
    prober: Pr,
    config: Config,
    /// This monitor's tag in the state words of the sessions it watches.
    tag: u64,
    epoch: Instant,
    /// Milliseconds since `epoch`, raised each tick; `STOPPED` once stopped.
    clock: AtomicU64,
    /// The end of the last stall: sessions count as heard then at least.
    amnesty: AtomicU64,
    /// Sessions to file in the wheel: new watches and spared suspects.
    incoming: LetGo<Mutex<Vec<Session<S::Payload>>>>,
    /// The monitor task rests: no session is watched, and it has no
    /// timer until `watch` wakes it (`wake`).
    idle: AtomicBool,
    wake: Notify,
    /// The monitor's runtime: `watch` reads the time on its clock (a
    /// caller outside the runtime would read the real one, which a paused
    /// clock is not).
    runtime: Handle,
    suspects: LetGo<Mutex<HashMap<RouterId, Group<S::Payload>>>>,
    /// Routers whose sessions are not convicted for now (a disconnected
    /// router in its grace period), with how many holds each has.
    held: Mutex<HashMap<RouterId, holds::RouterHolds>>,
    /// The partition guard: each router's watched and suspect sessions,
    /// and whether the guard holds.
    partition: Mutex<Votes>,
    /// Notified when the partition guard engages or lifts.
    partition_change: Notify,
    counters: Counters,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl<S: SessionStore, Pr> Clone for LivenessMonitor<S, Pr> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            _owner: Arc::clone(&self._owner),
        }
    }
}

impl<S: SessionStore, Pr> fmt::Debug for LivenessMonitor<S, Pr> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LivenessMonitor")
            .field("config", &self.shared.config)
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

impl LivenessMonitor<MemoryStore, NoProbe> {
    /// A builder to configure the monitor, for any store and prober.
    /// See the example on [`LivenessMonitor`].
    pub fn builder() -> LivenessMonitorBuilder {
        LivenessMonitorBuilder::new()
    }
}

impl<S: SessionStore, Pr: Prober> LivenessMonitor<S, Pr> {
    fn start(store: Arc<S>, prober: Pr, config: Config) -> Result<Self, BuildError> {
        let runtime = crate::build::timed_runtime().ok_or(BuildError::NoRuntime {
            piece: config::PIECE,
        })?;
        let lease = tag::lease()?;
        let tag = lease.tag();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            store,
            prober,
            config,
            tag,
            epoch: Instant::now(),
            clock: AtomicU64::new(0),
            amnesty: AtomicU64::new(0),
            incoming: LetGo::new(Mutex::new(Vec::new()), "liveness monitor"),
            idle: AtomicBool::new(false),
            wake: Notify::new(),
            runtime: runtime.clone(),
            suspects: LetGo::new(Mutex::new(HashMap::new()), "liveness monitor"),
            held: Mutex::new(HashMap::new()),
            partition: Mutex::new(Votes::default()),
            partition_change: Notify::new(),
            counters: Counters::default(),
            stop: stop.clone(),
            tracker: TaskTracker::new(),
        });
        shared.tracker.spawn_on(
            task::run(
                Arc::clone(&shared),
                task::Stopping(Arc::clone(&shared), lease),
            ),
            &runtime,
        );
        Ok(Self {
            shared,
            _owner: Arc::new(Owner(stop)),
        })
    }

    /// Starts watching `session`: from now on it must heartbeat (or answer
    /// probes) within its timeout. Its estimate starts from the configured
    /// heartbeat interval. See the example on [`LivenessMonitor`].
    ///
    /// # Errors
    ///
    /// [`WatchError`] if the session is closed, already watched (by this
    /// monitor, or another one whose tasks still run: once a monitor's
    /// [`shutdown`](Self::shutdown) returned, its sessions may be watched
    /// again), or this monitor is shut down.
    pub fn watch(&self, session: &Session<S::Payload>) -> Result<(), WatchError> {
        let shared = &*self.shared;
        if shared.stopped() {
            return Err(WatchError::ShutDown);
        }
        session
            .watch(shared.tag, tag::gone)
            .map_err(|refused| match refused {
                WatchRefused::Closed => WatchError::Closed(session.id()),
                WatchRefused::Watched => WatchError::AlreadyWatched(session.id()),
            })?;
        // SeqCst: see the module's invariants.
        if shared.idle.load(Ordering::SeqCst) {
            // The clock stood still while the task rested.
            shared.raise_clock_now();
        }
        session
            .beat()
            .reset(shared.now(), Estimate::initial(shared.config.interval));
        shared.counters.watched.fetch_add(1, Ordering::SeqCst);
        shared.tally(|votes, now| votes.watch(session.router(), now));
        shared.incoming.lock().push(session.clone());
        if shared.idle.load(Ordering::SeqCst) {
            shared.raise_clock_now();
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// Records a heartbeat of `session`: a few atomic operations, no lock,
    /// no allocation, no timer work. See the example on [`LivenessMonitor`].
    ///
    /// # Errors
    ///
    /// [`HeartbeatError`] for a closed session, one this monitor does not
    /// watch, or after shutdown; the heartbeat is counted in
    /// [`LivenessStats::ignored_heartbeats`] and changes nothing.
    #[inline]
    pub fn heartbeat(&self, session: &Session<S::Payload>) -> Result<(), HeartbeatError> {
        let shared = &*self.shared;
        let (tag, state) = session.watcher();
        // Relaxed: the clock orders nothing; one tick of staleness is the
        // granularity the estimate allows for.
        let clock = shared.clock.load(Ordering::Relaxed);
        if tag != shared.tag || state.is_closed() || clock & STOPPED != 0 {
            return Err(shared.ignore(session.id(), tag, state));
        }
        session.beat().record(clock, &shared.config.rule);
        Ok(())
    }

    /// Records a heartbeat of the session with this id, looked up in the
    /// store: for controllers that receive ids off the wire. On a
    /// [`MemoryStore`] the look-up never waits.
    ///
    /// # Errors
    ///
    /// As [`heartbeat`](Self::heartbeat), plus
    /// [`HeartbeatError::UnknownSession`] if the store holds no such session
    /// and [`HeartbeatError::Store`] if its backend failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the heartbeat is recorded, or not, in one step after the
    /// look-up.
    pub async fn heartbeat_id(&self, id: SessionId) -> Result<(), HeartbeatError> {
        match self.shared.store.get(id).await {
            Ok(Some(session)) => {
                let heard = self.heartbeat(&session);
                // Its last handle, maybe (removed meanwhile): the payload's
                // `Drop` is user code.
                crate::contain::drop_each_logged([session], "heartbeat");
                heard
            }
            Ok(None) => Err(self.shared.ignored(HeartbeatError::UnknownSession(id))),
            Err(error) => Err(self.shared.ignored(HeartbeatError::Store { id, error })),
        }
    }

    /// The session's current timeout, if this monitor watches it and it is
    /// open: its deadline is this long after it was last heard.
    #[must_use]
    pub fn timeout(&self, session: &Session<S::Payload>) -> Option<Duration> {
        let (tag, state) = session.watcher();
        (tag == self.shared.tag && !state.is_closed()).then(|| {
            let timeout = session.beat().estimate().timeout(&self.shared.config.rule);
            Duration::from_millis(timeout)
        })
    }

    /// The longest from a session's last heartbeat to its reap, for a
    /// session whose timeout is `timeout` after that heartbeat (see
    /// [`timeout`](Self::timeout)), if nothing answers for it. The sum of:
    ///
    /// - the timeout, and one tick for the timer wheel to convict;
    /// - one probe timeout, for the round in flight for its router when it
    ///   became suspect (a backoff in progress is cut short);
    /// - `1 + probe_retries` rounds of one probe timeout each;
    /// - the `probe_retries` backoff delays between them, each with its
    ///   largest jitter (see
    ///   [`probe_backoff`](LivenessMonitorBuilder::probe_backoff); its
    ///   `max_duration` caps one run of the schedule, which starts over
    ///   when new suspects join, so it is not counted);
    /// - a millisecond per timer, tokio's resolution.
    ///
    /// It holds for every configuration the builder accepts: a heartbeat
    /// never brings a session's deadline closer (its timeout shrinks no
    /// faster than time passes), and no suspect waits out another one's
    /// backoff. It does not count time the monitor spends waiting on
    /// others: the store (each probe round lists the router's sessions,
    /// each reap closes and removes; a [`MemoryStore`] answers at once)
    /// and a full reclaim queue, if one is configured. After a stall the
    /// local-health guard caught, it runs from the end of the stall
    /// instead of the last heartbeat. While the partition guard holds,
    /// nobody is reaped; after it lifts, the bound runs from the lift
    /// (see [`partition_guard`](LivenessMonitorBuilder::partition_guard)).
    /// The partition guard never delays a reap otherwise: with the silent
    /// share at or below its threshold, the bound holds as stated.
    /// Saturates at [`Duration::MAX`].
    #[must_use]
    pub fn reap_bound(&self, timeout: Duration) -> Duration {
        self.shared.config.reap_bound(timeout)
    }

    /// A snapshot of the monitor's counters. See the example on
    /// [`LivenessMonitor`].
    #[must_use]
    pub fn stats(&self) -> LivenessStats {
        self.shared.stats()
    }

    /// Holds `router`, in every incarnation: while held, none of its
    /// sessions is convicted. A
    /// session whose deadline passes counts as heard at that moment and
    /// gets a whole timeout more, and suspects already being probed are
    /// spared at their next look. For a router that disconnected and may
    /// come back (its grace period): give the monitor to
    /// [`ReconcilerBuilder::liveness`](crate::ReconcilerBuilder::liveness)
    /// and the reconciler holds and releases it for you.
    ///
    /// Holds nest: each `hold_router` needs its own
    /// [`release_router`](Self::release_router).
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{LivenessMonitor, MemoryStore, liveness::NoProbe, RouterId};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor =
    ///     LivenessMonitor::builder().build(Arc::new(MemoryStore::new()), NoProbe)?;
    /// let router = RouterId::new(4);
    /// monitor.hold_router(router); // it disconnected
    /// assert!(monitor.is_held(router));
    /// monitor.release_router(router); // it is back
    /// assert!(!monitor.is_held(router));
    /// # Ok(())
    /// # }
    /// ```
    pub fn hold_router(&self, router: RouterId) {
        Holds(Arc::clone(&self.shared)).change(router, None, true);
    }

    /// Releases one hold of `router` (see
    /// [`hold_router`](Self::hold_router)); its sessions are judged by their
    /// heartbeats again once no hold is left. Releasing a router that is not
    /// held does nothing.
    ///
    /// See the example on [`hold_router`](Self::hold_router).
    pub fn release_router(&self, router: RouterId) {
        Holds(Arc::clone(&self.shared)).change(router, None, false);
    }

    /// Whether `router` is held now: by [`hold_router`](Self::hold_router),
    /// or in one of its incarnations by a
    /// [`Reconciler`](crate::Reconciler)'s grace period (which holds only
    /// the sessions of the incarnation that disconnected).
    ///
    /// See the example on [`hold_router`](Self::hold_router).
    #[must_use]
    pub fn is_held(&self, router: RouterId) -> bool {
        self.shared.held.lock().contains_key(&router)
    }

    /// Stops the monitor: no more heartbeats, probes or reaps; probe rounds
    /// in flight are dropped (their suspects stay open). Returns when the
    /// monitor's tasks have ended; from then on another monitor may watch
    /// the sessions this one watched (a replacement with new settings, say).
    /// Dropping every handle stops it too (its tasks end soon after).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the monitor is stopped once this is first polled;
    /// dropping the future stops only the waiting.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{
    ///     LivenessMonitor, MemoryStore, NewSession, liveness::NoProbe, RouterId, SessionId,
    ///     SessionStore, liveness::WatchError,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Arc::new(MemoryStore::new());
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let monitor = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
    /// let session =
    ///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
    /// monitor.watch(&session)?;
    ///
    /// monitor.shutdown().await;
    /// assert!(monitor.heartbeat(&session).is_err());
    /// let late =
    ///     store.create(NewSession::new(SessionId::new(2), router, incarnation)).await?;
    /// assert_eq!(monitor.watch(&late), Err(WatchError::ShutDown));
    /// assert!(!session.is_closed()); // nobody is reaped after shutdown
    ///
    /// // A replacement monitor takes the session over.
    /// let replacement = LivenessMonitor::builder().build(Arc::clone(&store), NoProbe)?;
    /// replacement.watch(&session)?;
    /// assert!(replacement.heartbeat(&session).is_ok());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        self.shared.clock.fetch_or(STOPPED, Ordering::Relaxed);
        self.shared.stop.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}
