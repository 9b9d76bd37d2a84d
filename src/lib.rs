//! Router-bound session lifecycle for network controllers.
//!
//! A controller of an overlay network keeps sessions that live on its
//! routers. This crate tracks them so that cleanup is strongly consistent:
//! when a router is deleted, each of its sessions ends `Closed`, its
//! resources are released exactly once, and nothing can attach to that
//! router again.
//!
//! # The pieces
//!
//! - [`Lifecycle`]: the front door. One builder takes your store, your
//!   [`TerminationNotifier`], your [`Prober`] and each piece's settings,
//!   builds the pieces below wired together (one [`EventBus`], one
//!   [`ReclaimQueue`] every piece releases through, the reconciler holding
//!   disconnected routers in the monitor), and shuts them down in order
//!   within one deadline, reporting what it could not finish
//!   ([`LifecycleShutdown`]). Every piece below is also usable alone.
//! - [`Session`]: a cheap cloneable handle with a lock-free state machine
//!   ([`SessionState`]: `Active → Terminating → Closed`), a close reason
//!   ([`CloseReason`]), close-notification futures ([`Session::closed`],
//!   [`Session::closed_owned`]), traffic counters, a secret token wiped on
//!   close, a user payload, and attached [`Resource`]s released exactly once.
//! - [`SessionStore`]: where sessions live, as a trait with async methods so
//!   a remote store can implement it. Routers are registered and get an
//!   [`Incarnation`]; sessions are created against it; [`SessionStore::fence`]
//!   stops creation on a router and snapshots its sessions;
//!   [`SessionStore::finish`] tombstones the incarnation;
//!   [`SessionStore::audit`] checks the index.
//! - [`MemoryStore`]: the default store, in memory: a sharded session map and
//!   a per-router entry under one small lock. [`BoxStore`] holds any store
//!   behind one type, for a controller that picks its store at start-up.
//! - [`RouterDeleter`]: deletes a router and cleans up every one of its
//!   sessions, and always finishes: fence, mark `Terminating`, notify your
//!   routers in paced batches through your [`TerminationNotifier`], wait for
//!   confirmations against a deadline, re-notify stragglers with backoff,
//!   force-close what is left, tombstone the incarnation; returns a
//!   [`DeletionReport`].
//! - [`ReclaimQueue`]: releases what closed sessions held, by priority
//!   ([`ResourceClass`] first, then traffic, with aging: see
//!   [`DefaultPolicy`]), bounded with backpressure, run by worker tasks,
//!   retried on a [`RetrySchedule`]; what fails for good is reported as a
//!   [`ReclaimEvent::ReclaimFailed`]. Replace the [`ReclaimPolicy`] to change
//!   the order, the retries or the long-lived threshold. Every piece that
//!   closes sessions releases their resources through it, critical first
//!   ([`Lifecycle`] wires it; alone, `reclaim_queue(queue)` on each
//!   builder, e.g. [`RouterDeleterBuilder::reclaim_queue`]).
//! - [`LivenessMonitor`]: finds dead sessions without convicting live ones.
//!   [`LivenessMonitor::heartbeat`] is a few atomic operations on the
//!   session; each session's timeout adapts to its own heartbeat
//!   inter-arrival (RFC 6298 style); one task and one timer wheel look at
//!   each session once per timeout; suspects are probed through your
//!   [`Prober`], one call per router and round, and reaped
//!   ([`CloseReason::LivenessTimeout`]) after the last silent round, within
//!   [`LivenessMonitor::reap_bound`]. If the controller itself stalls, the
//!   monitor extends deadlines instead of convicting anyone.
//! - [`ExpiryMonitor`]: closes sessions at their absolute expiry
//!   ([`NewSession::expires_at`], moved later by
//!   [`Session::extend_expiry`]) with [`CloseReason::Expired`], after an
//!   [`Event::SessionExpiringSoon`] warning; one task and one timer wheel
//!   with lazy re-arm for every session ([`Lifecycle::create`] tracks the
//!   sessions it creates with an expiry).
//! - [`NotificationBudget`]: one budget per router (a token bucket) shared
//!   by every source that sends it work: the deleter's notices, the
//!   monitor's probes, your own messages; neither piece waits for it past
//!   its time bound.
//! - [`Backoff`]: the one retry schedule (on `backon`), used by the
//!   deleter, the monitor and the queue; their bounds add up its
//!   [`Backoff::longest_total`].
//! - [`Reconciler`]: the backstop when a router cannot confirm anything.
//!   [`Reconciler::reconcile`] compares what a (re)connected router reports
//!   with the store, in chunks: it lists what the router should drop and
//!   closes what the router no longer holds; a stale incarnation's report is
//!   refused ([`ReconcileError::StaleIncarnation`]).
//!   [`Reconciler::reconcile_adopting`] is the same for a controller that
//!   restarted and lost its sessions: what the store does not know is
//!   offered to your [`reconcile::Adopter`] (token, owner, expiry) and
//!   created again if it accepts, instead of dropped.
//!   [`Reconciler::router_disconnected`] starts a grace period: a short
//!   disconnect is not a deletion; at its expiry the router's sessions close
//!   ([`CloseReason::RouterLost`]) and the router stays registered.
//! - [`AuditSweeper`]: audits the store periodically and repairs what it
//!   finds ([`SessionStore::repair`]): index/map disagreements, orphans,
//!   closed sessions left behind. It never touches a deletion's sessions.
//! - Observability: every piece publishes [`Event`]s on one [`EventBus`]
//!   ([`Lifecycle::subscribe`]; alone, `events(bus)` on each builder);
//!   [`Stats::collect`] counts sessions per router and adds each piece's
//!   counters ([`Lifecycle::stats`] adds them all); `tracing` spans
//!   cover each deletion, reconciliation, grace expiry and sweep; the
//!   `metrics` feature feeds the `metrics` facade.
//!
//! # Which piece when
//!
//! A controller builds one [`Lifecycle`] over its store (a [`MemoryStore`]
//! in one process, an `EtcdStore` shared by several) and reaches each piece
//! through it: [`deleter`](Lifecycle::deleter) when a router is deleted,
//! [`liveness`](Lifecycle::liveness) to watch and heartbeat sessions whose
//! clients or routers can die silently, [`reconciler`](Lifecycle::reconciler)
//! when a router reconnects or disconnects, the
//! [`sweeper`](Lifecycle::sweeper) as the last line of defence, and
//! [`shutdown`](Lifecycle::shutdown) when the controller stops. A piece it
//! does not use costs little (the monitor watches only what you give it; a
//! store audited elsewhere: [`LifecycleBuilder::without_sweeper`]). Build the
//! pieces by hand only to use some of them alone, for example a
//! [`RouterDeleter`] over a store in a tool that only deletes routers.
//!
//! # Cargo features
//!
//! - `metrics`: counters, gauges and histograms named `session_lifecycle_*`
//!   through the [`metrics`](https://docs.rs/metrics) facade (install any
//!   exporter). Never labelled by session or router id.
//! - `test-util`: the test kit, [`test_util`](test_util/index.html), for your controller's own
//!   property tests (strategies, scripted fakes, the reference model,
//!   invariant checks, a paused-time harness), and the hooks that break a
//!   store on purpose (`MemoryStore::corrupt`, `MemoryStore::inject_fault`).
//!   For `[dev-dependencies]` only.
//!
//! # Testing your controller
//!
//! With the `test-util` feature, [`test_util`](test_util/index.html) gives your test suite what
//! the crate's own tests use, and its documentation is the guide: how to
//! drive your controller with random operation sequences and check the
//! invariants below after every step, with a complete example.
//!
//! # Quick start
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use session_lifecycle::{
//!     CloseReason, Event, Lifecycle, MemoryStore, NewSession, NotifyError, RouterId,
//!     SessionId, SessionState, SessionStore, TerminationBatch, TerminationNotifier,
//! };
//!
//! /// Your routers. Here each confirms at once, as the router's answer would.
//! struct Routers(Arc<MemoryStore>);
//!
//! impl TerminationNotifier for Routers {
//!     async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
//!         // Send one "terminate these sessions" frame to batch.router; on its answer:
//!         for key in batch.sessions {
//!             let _ = self.0.close_exact(key, CloseReason::RouterDeleted).await;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(MemoryStore::new());
//! let lifecycle = Lifecycle::builder(Arc::clone(&store), Routers(Arc::clone(&store))).build()?;
//! let mut events = lifecycle.subscribe();
//!
//! let router = RouterId::new(1);
//! let incarnation = store.register_router(router).await?;
//! // A client connects through the router; its keepalives are heartbeats.
//! let spec = NewSession::new(SessionId::new(100), router, incarnation).token(b"secret".to_vec());
//! let session = store.create(spec).await?;
//! session.attach(|reason: CloseReason| println!("port released: {reason}"))?;
//! lifecycle.liveness().watch(&session)?;
//! lifecycle.liveness().heartbeat(&session)?;
//!
//! // The router is deleted: fenced, its sessions terminated, confirmed, removed.
//! let outcome = lifecycle.deleter().delete(router).await?;
//! assert_eq!(outcome.report().map(|report| report.confirmed), Some(1));
//! assert_eq!(session.state(), SessionState::Closed);
//! assert!(store.create(NewSession::new(SessionId::new(101), router, incarnation)).await.is_err());
//! assert!(matches!(events.try_recv(), Some(Event::RouterFenced { .. })));
//!
//! // The controller stops: every piece in order, nothing left.
//! assert!(lifecycle.shutdown(Duration::from_secs(10)).await.is_complete());
//! assert!(store.audit().await?.is_clean());
//! # Ok(())
//! # }
//! ```
//!
//! # Invariants
//!
//! These are the guarantees the crate is built and tested around:
//!
//! - **I1 No zombies.** Once [`RouterDeleter::delete`] returns, the store
//!   holds no session of that router, each of them is `Closed`, every close
//!   waiter has woken, and every resource was released exactly once.
//! - **I2 Fence.** From the moment a router's deletion starts (its fence), no
//!   session can be created on it or on any older incarnation of it.
//! - **I3 Monotonic state.** `Active → Terminating → Closed`, or
//!   `Active → Closed`; never backwards, `Closed` is final, and exactly one
//!   caller wins each transition and learns that it won.
//! - **I4 Bounded.** A deletion finishes within
//!   [`RouterDeleter::max_wait`] (the configured deadline, retries and
//!   backoff), whatever the notifier does: errors, hangs, panics or never
//!   answers.
//! - **I5 Nothing dropped.** Every task of a [`ReclaimQueue`] is run,
//!   retried, or reported failed by an event; under overload pushers wait
//!   (or get their task back from [`ReclaimQueue::try_push`]); the queue
//!   never holds more than its capacity; a shutdown hands back what it did
//!   not run.
//! - **I6 Cancel-safe and idempotent.** Dropping a `delete` future does not
//!   stop or corrupt the deletion; concurrent deletes of one router share one
//!   run; deleting a half-deleted router resumes it.
//! - **I7 Index consistency.** The router→sessions index and the session map
//!   always agree; [`SessionStore::audit`] checks it.
//!
//! Closing is complete when [`Session::closed`] resolves: the token is
//! wiped, every attached resource was released once, and every waiter woke.
//!
//! # Time
//!
//! All time goes through tokio's clock ([`tokio::time::Instant`]), so tests
//! run with paused time (`#[tokio::test(start_paused = true)]`).
//!
//! # Concurrency
//!
//! No lock of the crate is held across an `.await` or while user code runs
//! (a payload's `Drop`, resources, wakers, notifier, prober, the metrics
//! recorder), so each may call back into the store on every path
//! (`tests/adversarial_reentrant.rs` proves it for [`MemoryStore`]). One
//! exception is inside tokio's broadcast channel: publishing into a full
//! [`EventBus`] drops the oldest event a lagging subscriber has not read,
//! and two publications happen under a lock (see
//! [`MemoryStoreBuilder::events`]); the `Drop` of an error your prober or
//! reclaim task returned must not call back into the store.
//!
//! A panic in user code the crate runs is contained and logged
//! (`tracing::error!`): a payload's `Drop` when the crate lets a session's
//! last handle go, a resource's release, your store's removals in a
//! background piece, an `EtcdStore` payload's `decode` (feature `etcd`), the
//! metrics recorder. A background task goes on, a call still returns its
//! result, and two panics in a row never abort the process (a panic while
//! another unwinds would). Each module
//! with locks documents its lock order under `# Deadlock safety`. The state word and close notification are
//! model-checked with loom:
//! `RUSTFLAGS="--cfg session_lifecycle_loom" cargo test --lib --release --target-dir target/loom loom`
//! (its own target directory: the cfg rebuilds every dependency).
//!
//! # Stability
//!
//! The crate root holds the names a controller uses every day; the rest
//! lives in each piece's module ([`budget`], [`deleter`], [`events`], [`expiry`], [`lifecycle`],
//! [`liveness`], [`reclaim`], [`reconcile`], [`session`], [`store`],
//! [`sweeper`]). `#[non_exhaustive]` follows one rule: what a later
//! version may extend is non-exhaustive (every error, event, reason and
//! kind enum, and every report or stats struct with public fields), so
//! match it with a wildcard arm and read its fields by name; closed sets
//! whose exhaustive match is the point ([`SessionState`],
//! [`session::Transition`], [`session::CloseOutcome`],
//! [`deleter::DeleteOutcome`], [`store::RouterStatus`],
//! [`reclaim::TryPushError`], [`ResourceClass`]) and messages you build
//! yourself ([`TerminationBatch`], [`ProbeBatch`]) are not.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![doc(test(
    no_crate_inject,
    attr(deny(warnings, rust_2018_idioms), allow(dead_code))
))]

mod backoff;
pub mod budget;
mod build;
mod closing;
mod contain;
pub mod deleter;
pub mod events;
pub mod expiry;
mod id;
pub mod lifecycle;
pub mod liveness;
mod loom;
#[cfg(feature = "metrics")]
mod metrics;
pub mod reclaim;
pub mod reconcile;
pub mod session;
mod slices;
mod stats;
pub mod store;
pub mod sweeper;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;
mod timer;
mod transport_error;
mod wheel;

// The core: what a controller names every day. Everything else lives in
// its piece's module.
pub use backoff::Backoff;
pub use budget::NotificationBudget;
pub use build::BuildError;
pub use deleter::{NotifyError, RouterDeleter, TerminationBatch, TerminationNotifier};
pub use events::{Event, EventBus};
pub use expiry::ExpiryMonitor;
pub use id::{Incarnation, RouterId, SessionId, SessionKey};
pub use lifecycle::Lifecycle;
pub use liveness::{LivenessMonitor, ProbeBatch, ProbeError, Prober};
pub use reclaim::ReclaimQueue;
pub use reconcile::Reconciler;
pub use session::{CloseReason, NewSession, Resource, ResourceClass, Session, SessionState};
pub use stats::Stats;
pub use store::{MemoryStore, SessionStore};
pub use sweeper::AuditSweeper;

/// The session store on etcd (feature `etcd`): [`EtcdStore`](etcd::EtcdStore)
/// and what goes with it. The `etcd-client` crate it uses is re-exported as
/// [`etcd::client`], for a store's [`client`](etcd::EtcdStore::client).
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd {
    #[cfg(feature = "test-util")]
    pub use crate::store::etcd::WatchSuspension;
    pub use crate::store::etcd::{
        DEFAULT_PREFIX, EtcdError, EtcdPayload, EtcdStats, EtcdStore, EtcdStoreBuilder,
        MAX_RECORD_LIMIT, RecordError, WriterStats,
    };
    pub use etcd_client as client;
}

#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub use store::{Corruption, Fault};
/// The paths of 0.1 before the public surface was grouped into modules
/// (every name here is in its module, listed in the CHANGELOG). Hidden,
/// kept so that code written against the flat root still builds; removed
/// in the next breaking release.
#[doc(hidden)]
pub use {
    deleter::{DeleteError, DeleteOutcome, DeletionReport, PhaseDurations, RouterDeleterBuilder},
    events::{
        EventStats, LivenessEvent, ReclaimError, ReclaimErrorKind, ReclaimEvent, ReconcileSummary,
        Repair, RepairAction, Subscription, TaskInfo,
    },
    lifecycle::{LifecycleBuilder, LifecycleShutdown, Piece},
    liveness::{HeartbeatError, LivenessMonitorBuilder, LivenessStats, NoProbe, WatchError},
    reclaim::{
        DefaultPolicy, Priority, PushError, Reclaim, ReclaimPolicy, ReclaimQueueBuilder,
        ReclaimStats, ReclaimTask, RetrySchedule, ShutdownReport, TryPushError,
    },
    reconcile::{ReconcileError, ReconcileReport, ReconcilerBuilder},
    session::{
        AttachError, Classed, CloseOutcome, SessionToken, Traffic, Transition, WaitForClose,
        WaitForCloseOwned,
    },
    store::{
        AuditReport, BackendError, BackendErrorKind, BoxStore, CreateError, CreateErrorKind,
        FenceError, FenceSnapshot, FinishError, FinishReport, MemoryStoreBuilder, RegisterError,
        RouterCensus, RouterError, RouterStatus, SessionError,
    },
    sweeper::{AuditSweeperBuilder, SweepReport, SweeperStats},
};

/// The close future's earlier name (renamed during 0.1):
/// [`session::WaitForClose`].
#[doc(hidden)]
#[deprecated(note = "renamed `session::WaitForClose`")]
pub type Closed<'a, P> = session::WaitForClose<'a, P>;

/// The owned close future's earlier name (renamed during 0.1):
/// [`session::WaitForCloseOwned`].
#[doc(hidden)]
#[deprecated(note = "renamed `session::WaitForCloseOwned`")]
pub type ClosedOwned<P> = session::WaitForCloseOwned<P>;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
