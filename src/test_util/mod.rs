//! The test kit (feature `test-util`): what the crate's own tests use, for
//! your controller's tests.
//!
//! # Testing your controller
//!
//! Your controller wires a store, a [`RouterDeleter`](crate::RouterDeleter),
//! maybe a [`LivenessMonitor`](crate::LivenessMonitor) and a
//! [`Reconciler`](crate::Reconciler), to your routers through a
//! [`TerminationNotifier`](crate::TerminationNotifier) and a
//! [`Prober`](crate::Prober). The crate keeps its invariants (see the
//! [crate documentation](crate#invariants)) when it is used as documented;
//! this kit lets your test suite prove that your controller does use it so,
//! under every interleaving of operations a property test can find.
//!
//! Enable it for tests only:
//!
//! ```toml
//! [dev-dependencies]
//! session-lifecycle = { version = "0.1", features = ["test-util"] }
//! proptest = "1"
//! proptest-state-machine = "0.9" # if you use the state-machine runner
//! ```
//!
//! ## What is in the kit
//!
//! | need | use |
//! | --- | --- |
//! | deterministic time | [`run_paused`], [`paused_runtime`]: a current-thread runtime whose clock jumps to the next timer; [`within`] and [`HOUR`] turn a hang into a failure |
//! | a router that answers as told | [`ScriptedNotifier`] and [`ScriptedProber`], following a [`Script`] of [`Notify`] / [`Probe`] behaviours (confirm a [`Subset`], slow, later, error, never, panic), recording every call |
//! | inputs | [`strategy`]: ids, [`SessionSpec`](strategy::SessionSpec)s with payload and traffic, behaviours, scripts, and operation sequences ([`strategy::ops`]) weighted by [`OpWeights`](model::OpWeights) |
//! | what should happen | [`model`]: [`ModelState::apply`](model::ModelState::apply) says what each [`Op`](model::Op) does; [`StoreModel`](model::StoreModel) is the same as a `proptest-state-machine` reference |
//! | did the invariants hold | [`InvariantChecker`] after every step (I1, I2, I3, I7, with memory of earlier steps), [`assert_invariants`] for a one-off look, [`ObservedRouter`] for I1 after a deletion |
//! | does my suite catch bugs | [`Fault`](crate::Fault) and [`Corruption`](crate::Corruption): a [`MemoryStore`](crate::MemoryStore) broken on purpose |
//! | my own store | [`conformance`]: the crate's model test and stress test, for any store behind a [`Backend`](conformance::Backend), also erased into a [`BoxStore`](crate::BoxStore) ([`Boxed`](conformance::Boxed)) |
//!
//! ## A complete test
//!
//! A small controller, driven by random operation sequences; after every
//! step it must agree with the model and keep the invariants. (The crate's
//! `tests/downstream.rs` is the same, bigger: a liveness monitor,
//! disconnects, reconnects, and the `proptest-state-machine` runner.)
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Arc;
//!
//! use proptest::prelude::*;
//! use session_lifecycle::test_util::model::{ModelState, Op, OpKind, OpWeights, Phase, Space};
//! use session_lifecycle::test_util::strategy::ops;
//! use session_lifecycle::test_util::{
//!     InvariantChecker, Notify, Script, ScriptedNotifier, Subset, run_paused,
//! };
//! use session_lifecycle::{
//!     Incarnation, MemoryStore, NewSession, RouterDeleter, RouterId, SessionStore,
//! };
//!
//! /// Your controller (here: the smallest one).
//! struct Controller {
//!     store: Arc<MemoryStore>,
//!     deleter: RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>>,
//!     incarnations: HashMap<RouterId, Incarnation>,
//! }
//!
//! impl Controller {
//!     fn new() -> Self {
//!         let store = Arc::new(MemoryStore::new());
//!         // Routers confirm the even ids; retries reach nobody: the rest
//!         // is force-closed at the deadline (no time passes: paused clock).
//!         let routers = Script::by_round(Notify::Confirm(Subset::EvenIds), Notify::Error);
//!         let notifier = ScriptedNotifier::new(Arc::clone(&store), routers);
//!         let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
//!         Self { store, deleter, incarnations: HashMap::new() }
//!     }
//!
//!     async fn handle(&mut self, op: &Op) {
//!         match op {
//!             Op::Register(router) => {
//!                 if let Ok(incarnation) = self.store.register_router(*router).await {
//!                     self.incarnations.insert(*router, incarnation);
//!                 }
//!             }
//!             Op::Create { session, router, stale } => {
//!                 if let Some(&current) = self.incarnations.get(router) {
//!                     // `stale`: a request from the router's previous life.
//!                     let incarnation =
//!                         if *stale { Incarnation::new(current.get() - 1) } else { current };
//!                     let _ = self.store.create(NewSession::new(*session, *router, incarnation)).await;
//!                 }
//!             }
//!             Op::Close { session, reason } => {
//!                 let _ = self.store.close(*session, *reason).await;
//!             }
//!             // A deletion that stopped right after its fence (the
//!             // controller restarted); the next `Delete` resumes it.
//!             Op::Fence(router) => {
//!                 let _ = self.store.fence(*router).await;
//!             }
//!             Op::Delete(router) => {
//!                 let _ = self.deleter.delete(*router).await;
//!             }
//!             _ => {}
//!         }
//!     }
//! }
//!
//! fn weights() -> OpWeights {
//!     OpWeights::none()
//!         .with(OpKind::Register, 2)
//!         .with(OpKind::Create, 6)
//!         .with(OpKind::Close, 2)
//!         .with(OpKind::Fence, 1)
//!         .with(OpKind::Delete, 2)
//! }
//!
//! proptest! {
//!     #![proptest_config(ProptestConfig::with_cases(64))]
//!     # /*
//!     #[test]
//!     # */
//!     fn the_controller_keeps_the_invariants(ops in ops(Space::default(), &weights(), 1..40)) {
//!         run_paused(async {
//!             let mut controller = Controller::new();
//!             let mut model = ModelState::default();
//!             let checker = InvariantChecker::new();
//!             for op in &ops {
//!                 controller.handle(op).await;
//!                 model.apply(op);
//!                 // The crate's invariants, remembering the steps before...
//!                 checker.assert(&*controller.store).await;
//!                 // ...and the controller against the model.
//!                 for (router, r) in model.routers() {
//!                     let count = controller.store.count(router).await.unwrap();
//!                     assert_eq!(count, model.stored_of(router).len(), "after {op:?}");
//!                     assert!(r.phase != Phase::Deleted || count == 0);
//!                 }
//!             }
//!         });
//!     }
//! }
//! # fn main() { the_controller_keeps_the_invariants(); }
//! ```
//!
//! ## Proving the suite has teeth
//!
//! A suite that cannot fail proves nothing. Run it once against a store
//! broken on purpose and see it fail:
//! [`MemoryStore::inject_fault`](crate::MemoryStore::inject_fault)`(`[`Fault::SkipFence`](crate::Fault::SkipFence)`)`
//! lets creates through a fence, and the checker reports the first session
//! created after one (`I2 fence: session-0 was created on router-0 in
//! incarnation-1 after its fence`); proptest shrinks the sequence, usually
//! to the three steps that show it (register, fence, create; a few seeds
//! in a thousand stop at four or five, another register or two in front). The example above
//! catches it because it draws [`Op::Fence`](model::Op::Fence): a suite
//! whose deletions always run to their end in one step never shows the
//! checker a fenced router. The crate's `tests/kit_catches_faults.rs` and
//! `tests/downstream.rs` run exactly this.
//!
//! ## Things to know
//!
//! - The checker sees the store between steps. Check after every step: a
//!   session created after a fence in the same step as the fence looks
//!   like one created before it.
//! - [`Reconciler::reconcile`](crate::Reconciler::reconcile) spares only
//!   sessions created at a later instant than its start: one created in
//!   the very instant it starts counts as older. On a paused clock, where
//!   a whole test shares one instant, advance the clock
//!   (`tokio::time::advance`) between creating a session meant to be
//!   spared and the call's start.
//! - A scripted router confirms by [`SessionKey`](crate::SessionKey), not
//!   by id: [`Notify::Slow`] and [`Notify::Later`] confirmations that
//!   arrive after the deletion ended close nothing, not even a later
//!   session reusing the id.
//! - Check a quiescent store (between steps), and use one checker per
//!   case: see [`InvariantChecker`].
//! - Everything here may panic: it is for tests, and a panic is how a test
//!   fails. Each function says when under `# Panics`.

pub mod conformance;
mod fakes;
mod invariants;
pub mod model;
mod observe;
mod release;
mod rng;
mod runtime;
mod script;
pub mod strategy;
mod stress;

pub use fakes::{Notify, NotifyCall, Probe, ProbeCall, Recorded, ScriptedNotifier, ScriptedProber};
pub use invariants::{
    InvariantChecker, InvariantReport, Violation, assert_invariants, check_invariants,
};
pub use observe::{ObservedRouter, router_lost};
pub use release::SlowRelease;
pub use rng::mix;
pub use runtime::{HOUR, paused_runtime, report_within, run_paused, within};
pub use script::{Call, Script, Subset};
