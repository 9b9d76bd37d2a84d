//! The vocabulary every piece speaks: one stream of [`Event`]s for every
//! lifecycle change, the [`EventBus`] that carries them, and the reports
//! and payloads they carry ([`DeletionReport`], [`LivenessEvent`],
//! [`ReclaimEvent`], [`ReconcileSummary`], [`Repair`], ...).
//!
//! # Layering
//!
//! This module sits under the engines: it imports only the ids, the
//! session types and the metrics facade. The deleter, the liveness
//! monitor, the reclaim queue, the reconciler, the sweeper and the stores
//! import it, never the other way round.
//!
//! # Invariants
//!
//! - `subscribers` counts the live [`Subscription`]s; an event is built and
//!   sent only while it is above zero (or the `metrics` feature records it),
//!   so a bus nobody listens to costs one atomic load per event.
//! - `lagged` is the sum of the events every subscription missed, counted
//!   by the subscription when it notices.
//!
//! # Deadlock safety
//!
//! The bus has no lock of its own; tokio's broadcast channel takes its
//! internal lock for each send and receive. Components publish after
//! releasing their own locks, with two exceptions that order an event
//! before what their lock guards can be seen: the in-memory store sends
//! `SessionCreated` under its router lock, and the reconciler
//! `RouterDisconnected` under its `graces` lock (the broadcast lock is then
//! the last one taken). Both send with `send_unrecorded` and `record` the
//! event in the metrics after the lock, as the recorder is user code.
//!
//! A send runs two pieces of code that are not the crate's, under the
//! publisher's lock in the two cases above:
//!
//! - the wakers of the subscriptions waiting in [`Subscription::recv`]:
//!   tokio's channel wakes them inside the send. A task's waker (tokio's,
//!   `futures`' executors') only schedules its task, which then runs
//!   outside every lock; a hand-written waker that calls back into the
//!   store from `wake` deadlocks a `create`. This is the one exception to
//!   "no user code under a lock of the crate", kept so that a session's
//!   `SessionCreated` comes before any other event of it;
//! - the `Drop` of an event it pushes out of a full ring (the oldest,
//!   unread by a lagging subscriber): an event that was the last holder of
//!   an error a prober or reclaim task returned drops that error there.
//!
//! The stores' and the reconciler's docs say so.

mod bus;
#[cfg(feature = "metrics")]
mod count;
mod deletion;
mod liveness;
mod reclaim;
mod reconcile;
mod repair;

#[cfg(feature = "metrics")]
pub(crate) use bus::record;
pub(crate) use bus::{CloseHook, emit, send_unrecorded};
pub use bus::{EventBus, EventStats, Subscription};
pub use deletion::{DeletionReport, PhaseDurations};
pub use liveness::{LivenessEvent, ProbeError};
pub use reclaim::{ReclaimError, ReclaimErrorKind, ReclaimEvent, TaskInfo};
pub use reconcile::ReconcileSummary;
pub use repair::{Repair, RepairAction};

use tokio::time::{Duration, Instant};

use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::CloseReason;

/// A lifecycle change, as published on an [`EventBus`].
///
/// Give the same bus to each piece you build
/// ([`MemoryStoreBuilder::events`](crate::MemoryStoreBuilder::events),
/// [`RouterDeleterBuilder::events`](crate::RouterDeleterBuilder::events),
/// [`ReclaimQueueBuilder::events`](crate::ReclaimQueueBuilder::events),
/// [`LivenessMonitorBuilder::events`](crate::LivenessMonitorBuilder::events),
/// [`ReconcilerBuilder::events`](crate::ReconcilerBuilder::events),
/// [`AuditSweeperBuilder::events`](crate::AuditSweeperBuilder::events),
/// the [`ExpiryMonitor`](crate::ExpiryMonitor)'s builder's `events`) and one
/// subscription sees them all, in the order each piece published them.
///
/// The events of one session come in the order of its transitions
/// (`SessionCreated`, then `SessionTerminating` if it was marked, then
/// `SessionClosed`), with one exception: a close that races the deleter's
/// marking (a client closing its session at the moment its router is
/// fenced) may be published just before the `SessionTerminating` of the mark
/// it beat by a hair.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, Event, EventBus, MemoryStore, NewSession, NotifyError, RouterDeleter,
///     RouterId, SessionId, SessionStore, TerminationBatch, TerminationNotifier,
/// };
///
/// /// A router that never confirms.
/// struct Silent;
///
/// impl TerminationNotifier for Silent {
///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = EventBus::new(1_024);
/// let mut events = bus.subscribe();
/// let store = Arc::new(MemoryStore::builder().events(bus.clone()).build::<()>()?);
/// let deleter =
///     RouterDeleter::builder().retries(0).events(bus).build(Arc::clone(&store), Silent)?;
///
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
/// let _ = deleter.delete(router).await?;
///
/// let mut seen = Vec::new();
/// while let Some(event) = events.try_recv() {
///     match event {
///         Event::SessionCreated { .. } => seen.push("created"),
///         Event::RouterFenced { sessions, .. } => {
///             assert_eq!(sessions, 1);
///             seen.push("fenced");
///         }
///         Event::SessionTerminating { .. } => seen.push("terminating"),
///         Event::SessionClosed { reason, .. } => {
///             assert_eq!(reason, CloseReason::Forced); // nobody confirmed
///             seen.push("closed");
///         }
///         Event::RouterDeleted(report) => {
///             assert_eq!(report.forced, 1);
///             seen.push("deleted");
///         }
///         _ => {}
///     }
/// }
/// assert_eq!(seen, ["created", "fenced", "terminating", "closed", "deleted"]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A session was created (published by the store before the session
    /// becomes visible, so it comes before any other event of the session).
    SessionCreated {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
    },
    /// A deletion marked the session `Terminating`.
    SessionTerminating {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
    },
    /// The session closed, by whatever path (published by the store that
    /// created it, from the close itself).
    SessionClosed {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
        /// Why it closed.
        reason: CloseReason,
    },
    /// A deletion fenced the router: no session can be created on it any
    /// more.
    RouterFenced {
        /// The router.
        router: RouterId,
        /// The fenced incarnation.
        incarnation: Incarnation,
        /// Sessions in the fence's snapshot.
        sessions: usize,
        /// `true` if the router was fenced already (a resumed deletion).
        resumed: bool,
    },
    /// A deletion finished; the report says how each session ended.
    RouterDeleted(DeletionReport),
    /// A router disconnected and its grace period started.
    RouterDisconnected {
        /// The router.
        router: RouterId,
        /// Its live incarnation.
        incarnation: Incarnation,
        /// How long it has to reconnect.
        grace: Duration,
    },
    /// A router stayed disconnected past its grace period: its sessions were
    /// closed with [`CloseReason::RouterLost`]; the router was not deleted.
    RouterLost {
        /// The router.
        router: RouterId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// Sessions closed.
        closed: usize,
    },
    /// A router's report of its sessions was reconciled.
    Reconciled(ReconcileSummary),
    /// The audit sweeper repaired one finding.
    Repaired(Repair),
    /// Something the liveness monitor reported (suspect, probe failed,
    /// reaped, stall).
    Liveness(LivenessEvent),
    /// Something the reclaim queue reported (retried, failed, long-lived).
    Reclaim(ReclaimEvent),
    /// A session's expiry is near: the [`ExpiryMonitor`](crate::ExpiryMonitor)
    /// tracking it closes it with [`CloseReason::Expired`] at `expires_at`
    /// unless it is extended ([`Session::extend_expiry`](crate::Session::extend_expiry))
    /// before. Published once per expiry, its monitor's `warn_before` ahead
    /// of it
    /// (within one tick; at once for a session tracked closer to its expiry
    /// than that, none for one tracked already due); an extension re-arms it.
    SessionExpiringSoon {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// The router incarnation it belongs to.
        incarnation: Incarnation,
        /// When it expires, on tokio's clock.
        expires_at: Instant,
    },
    /// The liveness monitor's partition guard engaged: more than its share
    /// of the watched routers went silent together, so the controller's
    /// own network is suspected, not the routers. Nobody is reaped until
    /// [`PartitionEnded`](Self::PartitionEnded).
    PartitionSuspected {
        /// Routers that went silent within the guard's window: every
        /// session the monitor watches on them is suspect, or none was
        /// heard for longer than their fastest suspect's timeout.
        silent_routers: usize,
        /// Routers with a session the monitor watches.
        watched_routers: usize,
        /// Sessions suspect now, on every router.
        suspect_sessions: usize,
        /// Sessions the monitor watches, suspects included.
        watched_sessions: usize,
    },
    /// The partition guard lifted: the silent share dropped back to its
    /// threshold or below (routers are heard again), or the hold reached
    /// its maximum. Either way a session still silent is reaped within
    /// [`reap_bound`](crate::LivenessMonitor::reap_bound) of its timeout,
    /// counted from now: after a lift every session starts over (it counts
    /// as heard now), after an expiry probe rounds count again.
    PartitionEnded {
        /// Routers still silent.
        silent_routers: usize,
        /// Routers with a session the monitor watches.
        watched_routers: usize,
        /// Sessions still suspect.
        suspect_sessions: usize,
        /// Sessions the monitor watches, suspects included.
        watched_sessions: usize,
        /// How long the guard held.
        lasted: Duration,
        /// `true` if the hold reached its maximum
        /// ([`partition_max_hold`](crate::LivenessMonitorBuilder::partition_max_hold))
        /// with the routers still silent: convictions resume, and the guard
        /// stays off until the silent share drops back.
        expired: bool,
    },
}
