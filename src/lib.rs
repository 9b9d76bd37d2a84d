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
//!   the order, the retries or the long-lived threshold. Give it to the
//!   deleter ([`RouterDeleterBuilder::reclaim_queue`]) and forced sessions'
//!   resources are released through it, critical first.
//! - [`LivenessMonitor`]: finds dead sessions without convicting live ones.
//!   [`LivenessMonitor::heartbeat`] is a few atomic operations on the
//!   session; each session's timeout adapts to its own heartbeat
//!   inter-arrival (RFC 6298 style); one task and one timer wheel look at
//!   each session once per timeout; suspects are probed through your
//!   [`Prober`], one call per router and round, and reaped
//!   ([`CloseReason::LivenessTimeout`]) after the last silent round, within
//!   [`LivenessMonitor::reap_bound`]. If the controller itself stalls, the
//!   monitor extends deadlines instead of convicting anyone.
//! - [`Reconciler`]: the backstop when a router cannot confirm anything.
//!   [`Reconciler::reconcile`] compares what a (re)connected router reports
//!   with the store, in chunks: it lists what the router should drop and
//!   closes what the router no longer holds; a stale incarnation's report is
//!   refused ([`ReconcileError::StaleIncarnation`]).
//!   [`Reconciler::router_disconnected`] starts a grace period: a short
//!   disconnect is not a deletion; at its expiry the router's sessions close
//!   ([`CloseReason::RouterLost`]) and the router stays registered.
//! - [`AuditSweeper`]: audits the store periodically and repairs what it
//!   finds ([`SessionStore::repair`]): index/map disagreements, orphans,
//!   closed sessions left behind. It never touches a deletion's sessions.
//! - Observability: every piece publishes [`Event`]s on an [`EventBus`] you
//!   give it (`events(bus)` on each builder); [`Stats::collect`] counts
//!   sessions per router and adds each piece's counters; `tracing` spans
//!   cover each deletion, reconciliation, grace expiry and sweep; the
//!   `metrics` feature feeds the `metrics` facade.
//!
//! # Which piece when
//!
//! A controller keeping sessions in one process uses a [`MemoryStore`], a
//! [`RouterDeleter`] for router deletions, and a [`ReclaimQueue`] if
//! releasing resources is slow or must be ordered. Add a [`LivenessMonitor`]
//! if clients or routers can die silently, a [`Reconciler`] if routers
//! reconnect (and for disconnect grace), and an [`AuditSweeper`] as the last
//! line of defence. Give them all one [`EventBus`] to watch cleanup happen.
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
//! use session_lifecycle::{
//!     CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionState, SessionStore,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemoryStore::new();
//! let router = RouterId::new(1);
//! let incarnation = store.register_router(router).await?;
//!
//! // A client connects through the router.
//! let spec = NewSession::new(SessionId::new(100), router, incarnation).token(b"secret".to_vec());
//! let session = store.create(spec).await?;
//! session.attach(|reason: CloseReason| println!("port released: {reason}"))?;
//!
//! // Somebody waits for the session to end.
//! let waiter = tokio::spawn(session.closed_owned());
//!
//! // The router is deleted: fence it, then close what it held. (In a
//! // controller, `RouterDeleter` runs these steps, with deadlines, retries
//! // and force-close.)
//! let snapshot = store.fence(router).await?;
//! for session in &snapshot.sessions {
//!     let _ = session.begin_terminating();
//! }
//! let _ = store.close(session.id(), CloseReason::RouterDeleted).await?;
//! store.finish(router, incarnation).await?;
//!
//! assert_eq!(waiter.await?, CloseReason::RouterDeleted);
//! assert_eq!(session.state(), SessionState::Closed);
//! assert!(store.create(NewSession::new(SessionId::new(101), router, incarnation)).await.is_err());
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
//! reclaim task returned must not call back into the store. Each module
//! with locks documents its lock order under `# Deadlock safety`. The state word and close notification are
//! model-checked with loom:
//! `RUSTFLAGS="--cfg session_lifecycle_loom" cargo test --lib --release loom`.
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

mod build;
mod cleanup;
mod deleter;
mod event;
mod id;
mod liveness;
mod loom;
mod message;
#[cfg(feature = "metrics")]
mod metrics;
mod reclaim;
mod reconcile;
mod session;
mod stats;
mod store;
mod sweeper;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;

pub use build::BuildError;
pub use deleter::{
    DeleteError, DeleteOutcome, DeletionReport, NotifyError, PhaseDurations, RouterDeleter,
    RouterDeleterBuilder, TerminationBatch, TerminationNotifier,
};
pub use event::{Event, EventBus, EventStats, Subscription};
pub use id::{Incarnation, RouterId, SessionId, SessionKey};
pub use liveness::{
    HeartbeatError, LivenessEvent, LivenessMonitor, LivenessMonitorBuilder, LivenessStats, NoProbe,
    ProbeBatch, ProbeError, Prober, WatchError,
};
pub use reclaim::{
    DefaultPolicy, Priority, PushError, Reclaim, ReclaimError, ReclaimErrorKind, ReclaimEvent,
    ReclaimPolicy, ReclaimQueue, ReclaimQueueBuilder, ReclaimStats, ReclaimTask, RetrySchedule,
    ShutdownReport, TaskInfo, TryPushError,
};
pub use reconcile::{
    ReconcileError, ReconcileReport, ReconcileSummary, Reconciler, ReconcilerBuilder,
};
pub use session::{
    AttachError, Classed, CloseOutcome, CloseReason, Closed, ClosedOwned, NewSession, Resource,
    ResourceClass, Session, SessionState, SessionToken, Traffic, Transition,
};
pub use stats::Stats;

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
pub use store::{
    AuditReport, BackendError, BackendErrorKind, BoxStore, CreateError, CreateErrorKind,
    FenceError, FenceSnapshot, FinishError, FinishReport, MemoryStore, MemoryStoreBuilder,
    RegisterError, Repair, RepairAction, RouterCensus, RouterError, RouterStatus, SessionError,
    SessionStore,
};
#[cfg(any(test, feature = "test-util"))]
pub use store::{Corruption, Fault};
pub use sweeper::{AuditSweeper, AuditSweeperBuilder, SweepReport, SweeperStats};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
