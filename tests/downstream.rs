//! A controller's own test suite, written as a downstream user writes it:
//! only the crate's public API and its `test-util` feature (in a
//! controller's `Cargo.toml`: `session-lifecycle = { version = "…",
//! features = ["test-util"] }` under `[dev-dependencies]`).
//!
//! `Controller` below is the user's code: it keeps sessions whose payload
//! is the client's name in a `MemoryStore`, deletes routers with a
//! `RouterDeleter`, watches clients with a `LivenessMonitor` and handles
//! router disconnects with a `Reconciler`. The suite drives it with
//! operation sequences drawn by the kit's reference model
//! (`proptest-state-machine`), compares it with the model after every
//! step, and checks the crate's invariants after every step with an
//! `InvariantChecker`. The same suite, on a store with a fault injected,
//! must fail and shrink the fault to the three steps that show it.
//!
//! 1,000 cases by default; `PROPTEST_CASES=20000 cargo test --test
//! downstream` runs more.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use session_lifecycle::test_util::model::{
    ModelConfig, ModelState, Op, OpKind, OpWeights, Phase, StoreModel,
};
use session_lifecycle::test_util::strategy::{cases, notify, script, session_spec};
use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, Probe, Script, ScriptedNotifier,
    ScriptedProber, Subset, paused_runtime, report_within, router_lost, run_paused, within,
};
use session_lifecycle::{
    CloseReason, EventBus, Incarnation, LivenessMonitor, MemoryStore, NewSession, Reconciler,
    RouterDeleter, RouterId, Session, SessionId, SessionKey, SessionState, SessionStore,
    deleter::DeleteOutcome, events::Subscription, store::Fault,
};
use tokio::runtime::Runtime;
use tokio::time::Duration;

type Store = MemoryStore<String>;

/// The controller under test.
struct Controller {
    store: Arc<Store>,
    deleter: RouterDeleter<Store, Arc<ScriptedNotifier<Store>>>,
    monitor: LivenessMonitor<Store, Arc<ScriptedProber>>,
    reconciler: Reconciler<Store>,
    /// The reconciler's events: a router is lost when its grace ends.
    events: Subscription,
    /// The incarnation this controller last registered each router with.
    incarnations: HashMap<RouterId, Incarnation>,
    /// The latest session of each client.
    clients: HashMap<SessionId, Session<String>>,
    /// The key of each client's session before its latest: what a late
    /// confirmation from a router names.
    earlier: HashMap<SessionId, SessionKey>,
}

impl Controller {
    /// Builds the controller, on a store with `fault` injected if any; call
    /// it inside a runtime.
    fn new(fault: Option<Fault>) -> Self {
        let store = Arc::new(MemoryStore::default());
        if let Some(fault) = fault {
            store.inject_fault(fault);
        }
        // The routers answer in every way a real one can: some confirm,
        // some are slow, some fail, hang or panic.
        let routers = Script::from_fn(|call| match call.index % 5 {
            0 => Notify::Confirm(Subset::PerMille {
                per_mille: 700,
                seed: call.index,
            }),
            1 => Notify::Slow {
                delay: Duration::from_millis(20),
                confirm: Subset::All,
            },
            2 => Notify::Error,
            3 => Notify::Never,
            _ => Notify::Panic,
        });
        let deleter = RouterDeleter::builder()
            .batch_size(4)
            .notify_timeout(Duration::from_millis(100))
            .confirm_timeout(Duration::from_millis(200))
            .retries(1)
            .build(
                Arc::clone(&store),
                ScriptedNotifier::new(Arc::clone(&store), routers),
            )
            .expect("valid settings");
        // Clients never time out within a test: heartbeats are checked for
        // their answers only.
        let day = Duration::from_secs(86_400);
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(day)
            .timeout_range(day, day)
            .build(Arc::clone(&store), ScriptedProber::always(Probe::nobody()))
            .expect("monitor settings in range");
        let bus = EventBus::default();
        let events = bus.subscribe();
        let reconciler = Reconciler::builder()
            .grace_period(Duration::from_secs(5))
            .events(bus)
            .build(Arc::clone(&store))
            .expect("valid settings");
        Self {
            store,
            deleter,
            monitor,
            reconciler,
            events,
            incarnations: HashMap::new(),
            clients: HashMap::new(),
            earlier: HashMap::new(),
        }
    }

    async fn router_connected(&mut self, router: RouterId) {
        if let Ok(incarnation) = self.store.register_router(router).await {
            self.incarnations.insert(router, incarnation);
        }
    }

    /// A client connects; `stale` plays a message from an older connection
    /// of the router.
    async fn client_connected(&mut self, id: SessionId, router: RouterId, stale: bool) -> bool {
        let known = self.incarnations.get(&router).copied();
        let incarnation = match known {
            Some(incarnation) if stale => Incarnation::new(incarnation.get() - 1),
            Some(incarnation) => incarnation,
            None => Incarnation::new(1),
        };
        let spec = NewSession::new(id, router, incarnation).payload(format!("client-{id}"));
        match self.store.create(spec).await {
            Ok(session) => {
                self.monitor
                    .watch(&session)
                    .expect("a new session is watched");
                if let Some(replaced) = self.clients.insert(id, session) {
                    self.earlier.insert(id, replaced.key());
                }
                true
            }
            Err(_) => false,
        }
    }

    /// A deletion that stopped right after its fence: the controller
    /// restarted. The next `delete_router` resumes it.
    async fn deletion_interrupted(&self, router: RouterId) {
        let _ = self.store.fence(router).await;
    }

    async fn delete_router(&self, router: RouterId) -> bool {
        let bound = self
            .deleter
            .max_wait(self.store.count(router).await.unwrap_or(0));
        match within(bound + Duration::from_secs(1), self.deleter.delete(router)).await {
            Ok(DeleteOutcome::Deleted(_) | DeleteOutcome::AlreadyDeleted { .. }) => true,
            Err(_) => false,
        }
    }

    /// A deletion request for one incarnation of the router; `stale` plays
    /// a late or duplicated request about its previous life. `true` if the
    /// deleter answered, and a stale request deleted nothing.
    async fn delete_incarnation(&self, router: RouterId, stale: bool) -> bool {
        let Some(&incarnation) = self.incarnations.get(&router) else {
            return false;
        };
        let target = if stale {
            Incarnation::new(incarnation.get() - 1)
        } else {
            incarnation
        };
        let bound = self
            .deleter
            .max_wait(self.store.count(router).await.unwrap_or(0));
        let deletion = self.deleter.delete_incarnation(router, target);
        match within(bound + Duration::from_secs(1), deletion).await {
            Ok(DeleteOutcome::AlreadyDeleted { incarnation, .. }) => incarnation == target,
            Ok(DeleteOutcome::Deleted(report)) => !stale && report.incarnation == target,
            Err(_) => false,
        }
    }

    /// A router confirms a client's session closed, by its key; `stale`
    /// plays a late or duplicated confirmation about the client's previous
    /// session. `true` if a session was closed or found closed.
    async fn router_confirmed(&self, id: SessionId, stale: bool) -> bool {
        let key = if stale {
            self.earlier.get(&id).copied()
        } else {
            self.clients.get(&id).map(Session::key)
        };
        let Some(key) = key else {
            return false;
        };
        let confirmed = self.store.close_exact(key, CloseReason::RouterDeleted);
        confirmed.await.is_ok()
    }

    /// The router's connection dropped and it does not come back: its
    /// clients are lost at the end of the grace period.
    async fn router_gone(&mut self, router: RouterId) -> bool {
        if self.reconciler.router_disconnected(router).await.is_err() {
            return false;
        }
        within(HOUR, router_lost(&mut self.events, router)).await;
        true
    }

    async fn router_reconnected(&self, router: RouterId, report: &[SessionId], stale: bool) {
        let Some(&incarnation) = self.incarnations.get(&router) else {
            return;
        };
        let incarnation = if stale {
            Incarnation::new(incarnation.get() - 1)
        } else {
            incarnation
        };
        let _ = self.reconciler.reconcile(router, incarnation, report).await;
    }
}

/// What this controller does: registers, clients, heartbeats, hang-ups,
/// deletions (some interrupted after their fence), disconnects and
/// reconnects, over 3 routers and 12 client ids.
struct ControllerOps;

impl ModelConfig for ControllerOps {
    fn weights() -> OpWeights {
        OpWeights::controller().with(OpKind::Fence, 1)
    }
}

/// The system under test: the controller, a checker, and the runtime they
/// run on (dropped last).
struct Sut {
    controller: Controller,
    checker: InvariantChecker<String>,
    /// The model before the step being applied.
    before: ModelState,
    runtime: Runtime,
}

/// The suite; `FAULTY` runs it on a store that skips its fence.
struct ControllerTest<const FAULTY: bool>;

impl<const FAULTY: bool> StateMachineTest for ControllerTest<FAULTY> {
    type SystemUnderTest = Sut;
    type Reference = StoreModel<ControllerOps>;

    fn init_test(_: &ModelState) -> Sut {
        let runtime = paused_runtime();
        let fault = FAULTY.then_some(Fault::SkipFence);
        let controller = runtime.block_on(async { Controller::new(fault) });
        Sut {
            controller,
            checker: InvariantChecker::new(),
            before: ModelState::default(),
            runtime,
        }
    }

    fn apply(mut sut: Sut, after: &ModelState, op: Op) -> Sut {
        let before = std::mem::replace(&mut sut.before, after.clone());
        let Sut {
            controller,
            checker,
            runtime,
            ..
        } = &mut sut;
        runtime.block_on(async {
            // What the controller answered, against what the model says it
            // should have; compared once the invariants are checked.
            let answered = match &op {
                Op::Register(router) => {
                    controller.router_connected(*router).await;
                    None
                }
                &Op::Create {
                    session,
                    router,
                    stale,
                } => {
                    let created = controller.client_connected(session, router, stale).await;
                    let live = before
                        .router(router)
                        .is_some_and(|r| r.phase == Phase::Live);
                    let expected = live && !stale && !before.is_stored(session);
                    Some((created, expected))
                }
                Op::Heartbeat(id) => {
                    let heard = controller.monitor.heartbeat_id(*id).await.is_ok();
                    let open = before
                        .session(*id)
                        .is_some_and(|s| s.stored && s.state != SessionState::Closed);
                    Some((heard, open))
                }
                Op::Close { session, reason } => {
                    let _ = controller.store.close(*session, *reason).await;
                    None
                }
                Op::Fence(router) => {
                    controller.deletion_interrupted(*router).await;
                    None
                }
                Op::Delete(router) => {
                    let deleted = controller.delete_router(*router).await;
                    Some((deleted, before.router(*router).is_some()))
                }
                &Op::DeleteIncarnation { router, stale } => {
                    let answered = controller.delete_incarnation(router, stale).await;
                    Some((answered, before.router(router).is_some()))
                }
                &Op::Confirm { session, stale } => {
                    let confirmed = controller.router_confirmed(session, stale).await;
                    Some((confirmed, !stale && before.is_stored(session)))
                }
                Op::Disconnect(router) => {
                    let lost = controller.router_gone(*router).await;
                    let live = before
                        .router(*router)
                        .is_some_and(|r| r.phase == Phase::Live);
                    Some((lost, live))
                }
                Op::Reconnect {
                    router,
                    report,
                    stale,
                } => {
                    controller.router_reconnected(*router, report, *stale).await;
                    None
                }
                other => panic!("{other:?} is not drawn by OpWeights::controller()"),
            };
            // The crate's invariants after every step, with what the checker
            // saw before...
            for client in controller.clients.values() {
                checker.track(client);
            }
            checker.assert(&*controller.store).await;
            // ...then the controller's answer against the model.
            if let Some((answered, expected)) = answered {
                assert_eq!(answered, expected, "{op:?}");
            }
        });
        sut
    }

    /// The controller's state against the model (the crate's invariants
    /// were checked in `apply`, before the controller's answer).
    fn check_invariants(sut: &Sut, model: &ModelState) {
        let Sut {
            controller,
            runtime,
            ..
        } = sut;
        runtime.block_on(async {
            for (router, r) in model.routers() {
                let count = controller.store.count(router).await.unwrap();
                assert_eq!(count, model.stored_of(router).len(), "sessions of {router}");
                if r.phase == Phase::Deleted {
                    assert_eq!(count, 0);
                }
            }
            for (id, client) in &controller.clients {
                let expected = model.session(*id).map(|s| s.state);
                assert_eq!(Some(client.state()), expected, "{id}");
                assert_eq!(client.payload(), &format!("client-{id}"));
            }
        });
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases(1_000),
        // Shrunk failures are printed; keep the crate's tree clean.
        failure_persistence: None,
        .. Config::default()
    })]

    /// Any sequence of controller operations keeps I1, I2, I3 and I7 after
    /// every step, and the controller agrees with the model.
    #[test]
    fn the_controller_keeps_the_invariants(sequential 1..40 => ControllerTest<false>);
}

proptest! {
    #![proptest_config(Config {
        cases: cases(1_000) / 4,
        failure_persistence: None,
        .. Config::default()
    })]

    /// Whatever the routers answer (any script of confirmations, by key or
    /// by handle, delays, errors, hangs and panics), a deletion of a router full of clients
    /// with traffic and payloads ends in time (I4) and leaves nothing
    /// behind (I1).
    #[test]
    fn deleting_a_router_ends_clean_whatever_the_router_does(
        routers in script(notify(), 6),
        clients in proptest::collection::vec(session_spec(1, 1_000, "[a-z]{1,8}"), 1..40),
        by_handle in any::<bool>(),
    ) {
        run_paused(async {
            let store = Arc::new(MemoryStore::<String>::default());
            let router = RouterId::new(0);
            let mut observed = ObservedRouter::fill(&*store, router, 1_000, 0).await;
            for client in &clients {
                if let Ok(session) = store.create(client.new_session(observed.incarnation)).await {
                    client.record_traffic(&session);
                    observed.observe(session);
                }
            }
            // The router's answers come by key through the store, or
            // through each batch's `Confirmations`.
            let notifier = if by_handle {
                ScriptedNotifier::by_handle(Arc::clone(&store), routers)
            } else {
                ScriptedNotifier::new(Arc::clone(&store), routers)
            };
            let deleter = RouterDeleter::builder()
                .confirm_timeout(Duration::from_millis(500))
                .build(Arc::clone(&store), Arc::clone(&notifier)).expect("valid settings");
            let bound = deleter.max_wait(observed.sessions.len());
            let report = report_within(bound + Duration::from_millis(10), deleter.delete(router)).await;
            assert_eq!(report.sessions, observed.sessions.len());
            for session in &observed.sessions {
                assert!(notifier.notices_of(session.id()) >= 1, "{session:?} never notified");
            }
            observed.assert_deleted(&*store).await;
            InvariantChecker::new().assert(&*store).await;
        });
    }
}

/// The same suite finds a store that lets creates through a fence, and
/// shrinks it to the steps that show it: the suite has teeth.
#[test]
fn the_suite_catches_a_store_that_skips_its_fence() {
    let config = Config {
        cases: cases(1_000),
        failure_persistence: None,
        ..Config::default()
    };
    // A fixed seed: shrinking takes random paths, and about one run in
    // twenty used to stop with an unrelated step left before the three.
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(config.clone(), rng);
    let result = runner.run(
        &StoreModel::<ControllerOps>::sequential_strategy(1..40),
        |(initial, ops, seen)| {
            ControllerTest::<true>::test_sequential(config.clone(), initial, ops, seen);
            Ok(())
        },
    );
    let Err(TestError::Fail(reason, (_, shrunk, _))) = result else {
        panic!("the fault was not found: {result:?}");
    };
    eprintln!("shrunk counterexample: {shrunk:#?}\n{reason}");
    assert!(reason.to_string().contains("after its fence"), "{reason}");
    // A router, its interrupted deletion, a client on it: the last three
    // steps (and, on some shrinking paths, one unrelated step before).
    assert!((3..=4).contains(&shrunk.len()), "{shrunk:?}");
    let last = &shrunk[shrunk.len() - 3..];
    assert!(
        matches!(
            (&last[0], &last[1], &last[2]),
            (Op::Register(a), Op::Fence(b), Op::Create { router: c, stale: false, .. })
                if a == b && b == c
        ),
        "{shrunk:?}"
    );
}

/// The reference model alone, through `proptest-state-machine`'s own
/// strategy: a stored session's router holds it in that very life, and is
/// not deleted.
#[test]
fn the_model_stores_sessions_only_on_their_routers_current_life() {
    let mut runner = TestRunner::new(Config::with_cases(64));
    runner
        .run(
            &StoreModel::<ControllerOps>::sequential_strategy(1..40),
            |(mut model, ops, _)| {
                for op in &ops {
                    model.apply(op);
                    for (id, s) in model.sessions() {
                        let router = model.router(s.router).expect("a session's router is known");
                        prop_assert!(
                            !s.stored || (router.phase != Phase::Deleted && s.life == router.life),
                            "{id}"
                        );
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}
