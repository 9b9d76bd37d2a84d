//! One harness for every `SessionStore`: the model-based property test and
//! the deleter stress test, generic over a [`Backend`] that makes fresh
//! stores. `tests/store_model.rs` and `tests/deleter_stress.rs` run them on
//! `MemoryStore`; a store behind a feature (etcd) runs the same suites from
//! its own test file with a backend of its own.
//!
//! Not a test crate by itself: a test file includes it with `mod suite;`.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use futures::FutureExt;
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use session_lifecycle::{
    CloseReason, CreateErrorKind, DeleteError, DeleteOutcome, FenceError, FinishError, Incarnation,
    MemoryStore, NewSession, NotifyError, ReclaimQueue, RegisterError, RouterDeleter, RouterId,
    RouterStatus, Session, SessionId, SessionState, SessionStore, TerminationBatch,
    TerminationNotifier,
};
use tokio::runtime::Runtime;
use tokio::time::Duration;

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A store under test: how to make a fresh, empty one and which runtime it needs.
pub trait Backend: Send + Sync + 'static {
    type Store: SessionStore<Payload = ()>;
    /// A short name for messages.
    const NAME: &'static str;
    /// True if the store works with tokio's paused clock (MemoryStore); false
    /// for a store that talks to a real server (etcd) and needs real time.
    const PAUSED_TIME: bool;
    /// True if every call of the store resolves on its first poll, without
    /// waiting (MemoryStore): the model test then asserts it on each call.
    const RESOLVES_AT_ONCE: bool = false;
    /// A fresh, empty store, isolated from every other store this backend made
    /// (etcd: a new key prefix). Called inside the runtime.
    fn fresh(&self) -> impl Future<Output = Arc<Self::Store>> + Send;
}

/// The in-memory store.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryBackend;

impl Backend for MemoryBackend {
    type Store = MemoryStore;
    const NAME: &'static str = "MemoryStore";
    const PAUSED_TIME: bool = true;
    const RESOLVES_AT_ONCE: bool = true;

    async fn fresh(&self) -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new())
    }
}

// ---------------------------------------------------------------------------
// The model-based test (proptest-state-machine)
// ---------------------------------------------------------------------------
//
// Random sequences of register / create / close / terminate / remove /
// fence / finish / delete / re-register run against the store and against
// a simple reference model. Deletions run on the test's own current-thread
// runtime (paused clock if the backend allows it, short timeouts otherwise)
// with a notifier that confirms only even session ids, so both
// confirmations and forced closes happen. After every step: the results
// match the model, every create after a fence failed (I2), no session moved
// backwards (I3), the index and the map agree (I7), the counts match the
// model, and no session of a deleted incarnation is open or stored (I1).
//
// Incarnations are opaque: the model counts each router's lives
// (generations); the system under test records the incarnation the store
// handed out for each life and checks that a router's lives get strictly
// larger ones.

const ROUTERS: u64 = 3;
const IDS: u64 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Live,
    Fenced,
    Deleted,
}

#[derive(Clone, Debug)]
struct RouterModel {
    phase: Phase,
    /// Which life of the router this is: 1 for its first registration, 2
    /// after its first deletion and re-registration, ...
    generation: usize,
}

#[derive(Clone, Debug)]
struct SessionModel {
    router: u64,
    state: SessionState,
    stored: bool,
}

#[derive(Clone, Debug)]
struct Model {
    routers: BTreeMap<u64, RouterModel>,
    /// The latest session created with each id.
    sessions: BTreeMap<u64, SessionModel>,
}

#[derive(Clone, Debug)]
enum Step {
    Register(u64),
    Create { id: u64, router: u64, stale: bool },
    Close { id: u64, reason: CloseReason },
    CloseHandle { id: u64 },
    Terminate { id: u64 },
    Remove { id: u64 },
    Fence(u64),
    Finish { router: u64, stale: bool },
    Delete(u64),
}

impl Model {
    fn stored(&self, id: u64) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.stored)
    }

    /// The router's incarnation ends: every stored session of it is closed
    /// and gone.
    fn delete(&mut self, router: u64) {
        if let Some(r) = self.routers.get_mut(&router) {
            r.phase = Phase::Deleted;
        }
        for s in self
            .sessions
            .values_mut()
            .filter(|s| s.stored && s.router == router)
        {
            s.state = SessionState::Closed;
            s.stored = false;
        }
    }

    fn stored_of(&self, router: u64) -> BTreeSet<u64> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.stored && s.router == router)
            .map(|(id, _)| *id)
            .collect()
    }
}

fn empty_model() -> Model {
    Model {
        routers: BTreeMap::new(),
        sessions: BTreeMap::new(),
    }
}

struct Reference;

fn reason() -> impl Strategy<Value = CloseReason> {
    prop_oneof![
        Just(CloseReason::ClientClosed),
        Just(CloseReason::RouterDeleted),
        Just(CloseReason::Forced),
        Just(CloseReason::LivenessTimeout),
    ]
}

impl ReferenceStateMachine for Reference {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(empty_model()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Step> {
        let router = 0..ROUTERS;
        let id = 0..IDS;
        prop_oneof![
            2 => router.clone().prop_map(Step::Register),
            6 => (id.clone(), router.clone(), proptest::bool::weighted(0.15))
                .prop_map(|(id, router, stale)| Step::Create { id, router, stale }),
            2 => (id.clone(), reason()).prop_map(|(id, reason)| Step::Close { id, reason }),
            1 => id.clone().prop_map(|id| Step::CloseHandle { id }),
            1 => id.clone().prop_map(|id| Step::Terminate { id }),
            1 => id.prop_map(|id| Step::Remove { id }),
            2 => router.clone().prop_map(Step::Fence),
            2 => (router.clone(), proptest::bool::weighted(0.2))
                .prop_map(|(router, stale)| Step::Finish { router, stale }),
            2 => router.prop_map(Step::Delete),
        ]
        .boxed()
    }

    fn apply(mut m: Model, step: &Step) -> Model {
        match *step {
            Step::Register(r) => match m.routers.get_mut(&r) {
                None => {
                    m.routers.insert(
                        r,
                        RouterModel {
                            phase: Phase::Live,
                            generation: 1,
                        },
                    );
                }
                Some(router) if router.phase == Phase::Deleted => {
                    router.phase = Phase::Live;
                    router.generation += 1;
                }
                Some(_) => {}
            },
            Step::Create { id, router, stale } => {
                let live = m
                    .routers
                    .get(&router)
                    .is_some_and(|r| r.phase == Phase::Live);
                if live && !stale && !m.stored(id) {
                    m.sessions.insert(
                        id,
                        SessionModel {
                            router,
                            state: SessionState::Active,
                            stored: true,
                        },
                    );
                }
            }
            Step::Close { id, .. } | Step::Remove { id } => {
                if let Some(s) = m.sessions.get_mut(&id).filter(|s| s.stored) {
                    s.state = SessionState::Closed;
                    s.stored = false;
                }
            }
            Step::CloseHandle { id } => {
                if let Some(s) = m.sessions.get_mut(&id) {
                    s.state = SessionState::Closed;
                }
            }
            Step::Terminate { id } => {
                if let Some(s) = m
                    .sessions
                    .get_mut(&id)
                    .filter(|s| s.state == SessionState::Active)
                {
                    s.state = SessionState::Terminating;
                }
            }
            Step::Fence(r) => {
                if let Some(r) = m.routers.get_mut(&r).filter(|r| r.phase == Phase::Live) {
                    r.phase = Phase::Fenced;
                }
            }
            Step::Delete(router) => {
                if m.routers
                    .get(&router)
                    .is_some_and(|r| r.phase != Phase::Deleted)
                {
                    m.delete(router);
                }
            }
            Step::Finish { router, stale } => {
                if !stale
                    && m.routers
                        .get(&router)
                        .is_some_and(|r| r.phase == Phase::Fenced)
                {
                    m.delete(router);
                }
            }
        }
        m
    }
}

/// Confirms the sessions with an even id, as a router that lost the rest.
struct EvenConfirm<S>(Arc<S>);

impl<S: SessionStore> TerminationNotifier for EvenConfirm<S> {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        for id in batch.sessions.into_iter().filter(|id| id.get() % 2 == 0) {
            let _ = self.0.close(id, CloseReason::RouterDeleted).await;
        }
        Ok(())
    }
}

/// The system under test of one case. Fields drop in order: the store and
/// the handles go before the runtime they were made on.
struct Sut<B: Backend> {
    store: Arc<B::Store>,
    deleter: RouterDeleter<B::Store, EvenConfirm<B::Store>>,
    /// The model as of the previous step: the expected outcomes come from it.
    before: Model,
    /// The incarnation the store handed out for each life of each router:
    /// `lives[&router][generation - 1]`.
    lives: HashMap<u64, Vec<Incarnation>>,
    /// How many stale incarnations were made up so far (picks among the
    /// kinds of stale incarnation in turn).
    stale_picks: usize,
    /// The latest handle per id, as in the model.
    handles: HashMap<u64, Session>,
    /// Every handle ever created, with the last state and reason seen (I3).
    all: Vec<(Session, SessionState, Option<CloseReason>)>,
    /// The backend that made the store, kept as long as the store.
    backend: B,
    runtime: Runtime,
}

impl<B: Backend> Sut<B> {
    /// Runs a store call to its end on the case's runtime (asserting it did
    /// not wait, for a store that never does).
    fn run<F: Future>(&self, future: F) -> F::Output {
        if B::RESOLVES_AT_ONCE {
            let _context = self.runtime.enter();
            future
                .now_or_never()
                .unwrap_or_else(|| panic!("{} resolves without waiting", B::NAME))
        } else {
            self.runtime.block_on(future)
        }
    }

    /// The incarnation a step names for `router`, as of the model `m`: its
    /// current one, or (`stale`) one that is certainly not live: an earlier
    /// life's, or the current one minus 1.
    fn incarnation(&mut self, m: &Model, router: u64, stale: bool) -> Incarnation {
        let Some(r) = m.routers.get(&router) else {
            // Unknown router: any incarnation is refused the same way.
            return Incarnation::new(if stale { 0 } else { 1 });
        };
        let lives = &self.lives[&router];
        let current = lives[r.generation - 1];
        if !stale {
            return current;
        }
        let earlier = &lives[..r.generation - 1];
        let pick = self.stale_picks % (earlier.len() + 1);
        self.stale_picks += 1;
        earlier
            .get(pick)
            .copied()
            .unwrap_or_else(|| Incarnation::new(current.get() - 1))
    }

    /// The incarnation the store handed out for the router's life in `m`.
    fn current(&self, m: &Model, router: u64) -> Incarnation {
        self.lives[&router][m.routers[&router].generation - 1]
    }
}

fn rank(state: SessionState) -> u8 {
    match state {
        SessionState::Active => 0,
        SessionState::Terminating => 1,
        SessionState::Closed => 2,
    }
}

/// The model test on stores of backend `B` (a fresh `B::default()` and a
/// fresh store for each case).
struct StoreTest<B>(PhantomData<B>);

impl<B: Backend + Default> StateMachineTest for StoreTest<B> {
    type SystemUnderTest = Sut<B>;
    type Reference = Reference;

    fn init_test(_: &Model) -> Sut<B> {
        let runtime = if B::PAUSED_TIME {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .unwrap();
        let backend = B::default();
        let store = runtime.block_on(backend.fresh());
        let builder = RouterDeleter::builder().batch_size(4).retries(1);
        let builder = if B::PAUSED_TIME {
            // Paused clock: long timeouts cost nothing.
            builder.confirm_timeout(Duration::from_secs(1))
        } else {
            // Real time: keep a case fast. The notifier confirms before it
            // returns, so the notify timeout keeps its (generous) default.
            builder
                .confirm_timeout(Duration::from_millis(50))
                .retry_backoff(Duration::from_millis(10), Duration::from_millis(20))
        };
        let deleter = builder.build(Arc::clone(&store), EvenConfirm(Arc::clone(&store)));
        Sut {
            store,
            deleter,
            before: empty_model(),
            lives: HashMap::new(),
            stale_picks: 0,
            handles: HashMap::new(),
            all: Vec::new(),
            backend,
            runtime,
        }
    }

    fn apply(mut sut: Sut<B>, after: &Model, step: Step) -> Sut<B> {
        let before = std::mem::replace(&mut sut.before, after.clone());
        let store = Arc::clone(&sut.store);
        match step {
            Step::Register(r) => {
                let result = sut.run(store.register_router(RouterId::new(r)));
                match before.routers.get(&r).map(|r| r.phase) {
                    None | Some(Phase::Deleted) => {
                        let incarnation = result.unwrap();
                        let lives = sut.lives.entry(r).or_default();
                        assert_eq!(lives.len() + 1, after.routers[&r].generation);
                        if let Some(&last) = lives.last() {
                            assert!(
                                incarnation > last,
                                "router-{r} registered again with {incarnation}, not above {last}"
                            );
                        }
                        assert!(
                            incarnation.get() >= 1,
                            "{incarnation}: the model needs incarnations >= 1"
                        );
                        lives.push(incarnation);
                    }
                    Some(Phase::Live) => assert!(matches!(
                        result,
                        Err(RegisterError::AlreadyRegistered { .. })
                    )),
                    Some(Phase::Fenced) => {
                        assert!(matches!(result, Err(RegisterError::Deleting { .. })))
                    }
                }
            }
            Step::Create { id, router, stale } => {
                let incarnation = sut.incarnation(&before, router, stale);
                let spec = NewSession::new(SessionId::new(id), RouterId::new(router), incarnation);
                let result = sut.run(store.create(spec));
                let expected = match before.routers.get(&router) {
                    None => Some(CreateErrorKind::UnknownRouter(RouterId::new(router))),
                    Some(r) if stale => Some(CreateErrorKind::StaleIncarnation {
                        router: RouterId::new(router),
                        requested: incarnation,
                        live: (r.phase == Phase::Live).then(|| sut.current(&before, router)),
                    }),
                    Some(r) if r.phase == Phase::Fenced => Some(CreateErrorKind::Fenced {
                        router: RouterId::new(router),
                        incarnation,
                    }),
                    Some(r) if r.phase == Phase::Deleted => Some(CreateErrorKind::RouterDeleted {
                        router: RouterId::new(router),
                        incarnation,
                    }),
                    Some(_) if before.stored(id) => {
                        Some(CreateErrorKind::DuplicateSession(SessionId::new(id)))
                    }
                    Some(_) => None,
                };
                match result {
                    Ok(session) => {
                        assert!(
                            expected.is_none(),
                            "create accepted against the model: {step:?}"
                        );
                        assert_eq!(
                            before.routers[&router].phase,
                            Phase::Live,
                            "I2: created on a fenced router"
                        );
                        assert_eq!(session.incarnation(), incarnation, "{step:?}");
                        sut.all.push((session.clone(), SessionState::Active, None));
                        sut.handles.insert(id, session);
                    }
                    Err(err) => assert_eq!(Some(err.kind().clone()), expected, "{step:?}"),
                }
            }
            Step::Close { id, reason } => {
                let result = sut.run(store.close(SessionId::new(id), reason));
                match before.sessions.get(&id).filter(|s| s.stored) {
                    None => assert!(result.is_err()),
                    Some(s) => assert_eq!(result.unwrap().won(), s.state != SessionState::Closed),
                }
            }
            Step::CloseHandle { id } => {
                if let Some(handle) = sut.handles.get(&id) {
                    let won = handle.close(CloseReason::ClientClosed).won();
                    assert_eq!(won, before.sessions[&id].state != SessionState::Closed);
                }
            }
            Step::Terminate { id } => {
                if let Some(handle) = sut.handles.get(&id) {
                    let won = handle.begin_terminating().won();
                    assert_eq!(won, before.sessions[&id].state == SessionState::Active);
                }
            }
            Step::Remove { id } => {
                let result = sut.run(store.remove(SessionId::new(id)));
                assert_eq!(result.is_ok(), before.stored(id));
                if let Ok(session) = result {
                    assert!(session.is_closed(), "a session left the store open");
                }
            }
            Step::Fence(r) => {
                let result = sut.run(store.fence(RouterId::new(r)));
                match before.routers.get(&r).map(|r| r.phase) {
                    None => assert!(matches!(result, Err(FenceError::UnknownRouter(_)))),
                    Some(Phase::Deleted) => {
                        assert!(matches!(result, Err(FenceError::AlreadyDeleted { .. })))
                    }
                    Some(phase) => {
                        let snapshot = result.unwrap();
                        assert_eq!(snapshot.newly_fenced, phase == Phase::Live);
                        assert_eq!(snapshot.incarnation, sut.current(&before, r));
                        let ids: BTreeSet<u64> =
                            snapshot.sessions.iter().map(|s| s.id().get()).collect();
                        assert_eq!(ids, before.stored_of(r), "fence snapshot");
                    }
                }
            }
            Step::Delete(router) => {
                // A hung deletion fails the case: at once on a paused clock,
                // after a while in real time.
                let limit = if B::PAUSED_TIME {
                    Duration::from_secs(3_600)
                } else {
                    Duration::from_secs(120)
                };
                let started = sut.runtime.block_on(async { tokio::time::Instant::now() });
                let result = sut
                    .runtime
                    .block_on(async {
                        tokio::time::timeout(limit, sut.deleter.delete(RouterId::new(router))).await
                    })
                    .expect("delete finishes within its bound");
                let waited = sut.runtime.block_on(async move { started.elapsed() });
                match before.routers.get(&router).map(|r| r.phase) {
                    None => assert!(matches!(result, Err(DeleteError::UnknownRouter(_)))),
                    Some(Phase::Deleted) => {
                        assert!(
                            matches!(
                                result,
                                Ok(DeleteOutcome::AlreadyDeleted { incarnation, .. })
                                    if incarnation == sut.current(&before, router)
                            ),
                            "{result:?}"
                        );
                    }
                    Some(phase) => {
                        let outcome = result.unwrap();
                        let report = outcome.report().unwrap();
                        let stored = before.stored_of(router);
                        let closed = |id: &&u64| before.sessions[*id].state == SessionState::Closed;
                        let already = stored.iter().filter(closed).count();
                        let forced = stored
                            .iter()
                            .filter(|id| !closed(id) && *id % 2 == 1)
                            .count();
                        assert_eq!(report.incarnation, sut.current(&before, router));
                        assert_eq!(report.resumed, phase == Phase::Fenced);
                        assert_eq!(
                            (report.sessions, report.already_closed, report.forced),
                            (stored.len(), already, forced)
                        );
                        assert_eq!(
                            report.confirmed + report.already_closed + report.forced,
                            report.sessions
                        );
                        assert!(
                            waited <= sut.deleter.max_wait(stored.len()),
                            "I4: {waited:?}"
                        );
                    }
                }
            }
            Step::Finish { router, stale } => {
                let incarnation = sut.incarnation(&before, router, stale);
                let result = sut.run(store.finish(RouterId::new(router), incarnation));
                match before.routers.get(&router).map(|r| r.phase) {
                    None => assert!(matches!(result, Err(FinishError::UnknownRouter(_)))),
                    Some(_) if stale => assert!(
                        matches!(result, Err(FinishError::IncarnationMismatch { .. })),
                        "{step:?} with {incarnation}: {result:?}"
                    ),
                    Some(Phase::Live) => {
                        assert!(matches!(result, Err(FinishError::NotFenced { .. })))
                    }
                    Some(Phase::Deleted) => {
                        assert!(matches!(result, Err(FinishError::AlreadyDeleted { .. })))
                    }
                    Some(Phase::Fenced) => {
                        let report = result.unwrap();
                        let stored = before.stored_of(router);
                        let open = stored
                            .iter()
                            .filter(|id| before.sessions[id].state != SessionState::Closed)
                            .count();
                        assert_eq!((report.removed, report.closed), (stored.len(), open));
                        assert_eq!(report.incarnation, incarnation);
                    }
                }
            }
        }
        // I3: nothing moved backwards, and a close reason never changes.
        for (handle, state, reason) in &mut sut.all {
            let (now_state, now_reason) = (handle.state(), handle.close_reason());
            assert!(
                rank(now_state) >= rank(*state),
                "I3: {state:?} went back to {now_state:?}"
            );
            if reason.is_some() {
                assert_eq!(*reason, now_reason, "I3: the close reason changed");
            }
            (*state, *reason) = (now_state, now_reason);
        }
        sut
    }

    fn check_invariants(sut: &Sut<B>, m: &Model) {
        let store = &sut.store;
        // I7 and no orphans; the lingering closed sessions are the model's.
        let audit = sut.run(store.audit()).unwrap();
        assert!(audit.is_consistent(), "{audit:?}");
        // Counts and router phases match the model.
        let stored = m.sessions.values().filter(|s| s.stored).count();
        assert_eq!(audit.sessions, stored, "session count");
        for (r, router) in &m.routers {
            let id = RouterId::new(*r);
            let status = sut.run(store.router_status(id)).unwrap();
            let incarnation = sut.current(m, *r);
            let expected = match router.phase {
                Phase::Live => RouterStatus::Live(incarnation),
                Phase::Fenced => RouterStatus::Fenced(incarnation),
                Phase::Deleted => RouterStatus::Deleted(incarnation),
            };
            assert_eq!(status, expected);
            assert_eq!(
                sut.run(store.count(id)).unwrap(),
                m.stored_of(*r).len(),
                "count of {id}"
            );
        }
        // Every handle agrees with the model; retired ones are closed.
        for (id, handle) in &sut.handles {
            assert_eq!(
                handle.state(),
                m.sessions[id].state,
                "state of session {id}"
            );
        }
        let lingering: BTreeSet<u64> = audit.closed_in_store.iter().map(|id| id.get()).collect();
        let expected: BTreeSet<u64> = m
            .sessions
            .iter()
            .filter(|(_, s)| s.stored && s.state == SessionState::Closed)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(lingering, expected);
        // I1: no session of a deleted incarnation is open or stored.
        for (handle, _, _) in &sut.all {
            let status = sut.run(store.router_status(handle.router())).unwrap();
            if status == RouterStatus::Deleted(handle.incarnation()) {
                assert!(
                    handle.is_closed(),
                    "I1: {handle:?} of a deleted router is open"
                );
                let stored = sut.run(store.get(handle.id())).unwrap();
                assert!(
                    !stored.is_some_and(|s| Session::ptr_eq(&s, handle)),
                    "I1: {handle:?} still stored"
                );
            }
        }
        // Sessions replaced by a newer one of the same id are closed.
        let latest: Vec<&Session> = sut.handles.values().collect();
        for (handle, _, _) in &sut.all {
            if !latest.iter().any(|l| Session::ptr_eq(l, handle)) {
                assert!(
                    handle.is_closed(),
                    "an older session of a reused id is open"
                );
            }
        }
    }
}

/// Runs the model test on stores of backend `B`: `cases` random sequences
/// of 1 to 47 steps, each on a fresh `B::default()`, a fresh store and its
/// own runtime. `PROPTEST_CASES` overrides `cases`.
///
/// Failures persist to the proptest regression file next to the calling
/// test file (`tests/store_model.rs` → `tests/store_model.proptest-regressions`),
/// and the seeds there run first.
#[track_caller]
pub fn store_follows_the_model<B: Backend + Default>(cases: u32) {
    let source_file = std::panic::Location::caller().file();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(cases);
    let config = ProptestConfig {
        cases,
        source_file: Some(source_file),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(
        &Reference::sequential_strategy(1..48),
        |(initial_state, transitions, seen_counter)| {
            StoreTest::<B>::test_sequential(
                config.clone(),
                initial_state,
                transitions,
                seen_counter,
            );
            Ok(())
        },
    );
    if let Err(err) = result {
        panic!("{}: {err}\n{runner}", B::NAME);
    }
}

// ---------------------------------------------------------------------------
// The deleter stress test
// ---------------------------------------------------------------------------
//
// On a multi-thread runtime: tasks keep creating sessions on every router
// and closing random ones while half the routers (the even ones) are
// deleted concurrently, some by two racing deletes. The notifier confirms
// late (spawned, random delay) and loses some notices. Afterwards: no
// session of a deleted router in the store, all of them closed, every
// resource released exactly once, every create that started after its
// router's deletion returned refused; live routers untouched.

/// How big a stress run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StressSizes {
    /// Routers; the even ones are deleted.
    pub routers: u64,
    /// Sessions each router is filled with before the deletions.
    pub sessions_per_router: u64,
    /// Tasks creating and closing sessions during the deletions.
    pub creators: u64,
    /// How many times the whole scenario runs, each on a fresh store.
    pub rounds: u64,
}

impl StressSizes {
    /// The MemoryStore run: 20 routers × 2,000 sessions, 4 creators,
    /// [`soak_rounds`] rounds.
    pub fn memory() -> Self {
        Self {
            routers: 20,
            sessions_per_router: 2_000,
            creators: 4,
            rounds: soak_rounds(),
        }
    }
}

/// How many times to run the stress scenario: once, or
/// `SESSION_LIFECYCLE_SOAK` times for a soak (`SESSION_LIFECYCLE_SOAK=200
/// cargo test --release --test deleter_stress`).
pub fn soak_rounds() -> u64 {
    std::env::var("SESSION_LIFECYCLE_SOAK")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(1)
}

/// Where forced sessions' resources are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForcedReleases {
    /// By the deleter itself.
    Inline,
    /// Through a fresh `ReclaimQueue` of this capacity and this many workers
    /// each round (a small capacity makes the deleters wait on its
    /// backpressure). The queue's counters are checked after each round.
    ReclaimQueue { capacity: usize, workers: usize },
}

/// Runs the stress scenario `sizes.rounds` times, each on a fresh store of
/// `backend`. Call it from a multi-thread runtime.
pub async fn deleter_stress<B: Backend>(backend: &B, sizes: StressSizes, releases: ForcedReleases) {
    for round in 0..sizes.rounds {
        let store = backend.fresh().await;
        match releases {
            ForcedReleases::Inline => {
                let _ = one_round(store, sizes, round, None).await;
            }
            ForcedReleases::ReclaimQueue { capacity, workers } => {
                let queue = ReclaimQueue::builder()
                    .capacity(capacity)
                    .workers(workers)
                    .build()
                    .unwrap();
                let (forced, bare) = one_round(store, sizes, round, Some(queue.clone())).await;
                let stats = queue.stats();
                // One task per forced session that had a resource: a
                // session force-closed before its creator attached the
                // counting resource (`bare`) has nothing to queue.
                assert!(stats.pushed <= forced as u64, "{stats:?}, {forced} forced");
                assert!(
                    stats.pushed + bare as u64 >= forced as u64,
                    "{stats:?}, {forced} forced, {bare} bare"
                );
                assert_eq!((stats.completed, stats.failed), (stats.pushed, 0));
                assert_eq!((stats.depth, stats.in_flight), (0, 0));
                assert!(stats.peak_depth <= capacity);
            }
        }
    }
}

/// Confirms each session later, from another task; never confirms ids
/// divisible by 50 and loses 1 in 20 of the others on each round.
struct LateRouter<S> {
    store: Arc<S>,
    seed: AtomicU64,
}

impl<S> LateRouter<S> {
    fn next(&self) -> u64 {
        // splitmix64: cheap, deterministic per run, good enough to scatter.
        let mut z = self
            .seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl<S: SessionStore> TerminationNotifier for LateRouter<S> {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let keep: Vec<SessionId> = batch
            .sessions
            .into_iter()
            // 1 in 50 never answers (forced); 1 in 20 of the rest is lost
            // per round (re-notified).
            .filter(|id| id.get() % 50 != 0 && self.next() % 20 != 0)
            .collect();
        let store = Arc::clone(&self.store);
        let delay = Duration::from_millis(self.next() % 40);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for id in keep {
                let _ = store.close(id, CloseReason::RouterDeleted).await;
            }
        });
        Ok(())
    }
}

struct Created {
    session: Session,
    released: Arc<AtomicUsize>,
    /// Whether the counting resource was attached (a session closed before
    /// its creator attached it has nothing to queue).
    attached: bool,
}

/// Runs the scenario once; returns how many sessions the deletions forced,
/// and how many sessions were closed before their creator attached their
/// resource.
async fn one_round<S: SessionStore<Payload = ()>>(
    store: Arc<S>,
    sizes: StressSizes,
    round: u64,
    queue: Option<ReclaimQueue>,
) -> (usize, usize) {
    let StressSizes {
        routers,
        sessions_per_router,
        creators,
        ..
    } = sizes;
    let mut incarnations = HashMap::new();
    for r in 0..routers {
        incarnations.insert(
            RouterId::new(r),
            store.register_router(RouterId::new(r)).await.unwrap(),
        );
    }
    let created: Arc<Mutex<Vec<Created>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let deleted_flags: Arc<HashMap<RouterId, AtomicBool>> = Arc::new(
        (0..routers)
            .map(|r| (RouterId::new(r), AtomicBool::new(false)))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));

    // Fill each router to `sessions_per_router` sessions.
    for r in 0..routers {
        for _ in 0..sessions_per_router {
            let router = RouterId::new(r);
            create(&*store, &created, &next_id, router, incarnations[&router])
                .await
                .unwrap();
        }
    }

    // Creators and closers keep going during the deletions.
    let mut load = Vec::new();
    let refused = Arc::new(AtomicU64::new(0));
    for c in 0..creators {
        let refused = Arc::clone(&refused);
        let (store, created, next_id, flags, stop, incarnations) = (
            Arc::clone(&store),
            Arc::clone(&created),
            Arc::clone(&next_id),
            Arc::clone(&deleted_flags),
            Arc::clone(&stop),
            incarnations.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::SeqCst) {
                let router = RouterId::new(i % routers);
                let after_delete = flags[&router].load(Ordering::SeqCst);
                match create(&*store, &created, &next_id, router, incarnations[&router]).await {
                    Ok(()) => assert!(
                        !after_delete,
                        "a create on {router} succeeded after its deletion returned"
                    ),
                    Err(()) => {
                        refused.fetch_add(u64::from(after_delete), Ordering::SeqCst);
                    }
                }
                // Close a random earlier session now and then.
                if i % 3 == 0 {
                    let victim = SessionId::new(
                        i.wrapping_mul(7919) % next_id.load(Ordering::Relaxed).max(1),
                    );
                    let _ = store.close(victim, CloseReason::ClientClosed).await;
                }
                i += creators;
                if i % 32 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }

    let mut builder = RouterDeleter::builder();
    if let Some(queue) = queue {
        builder = builder.reclaim_queue(queue);
    }
    let deleter = builder
        .batch_size(250)
        .notify_timeout(Duration::from_millis(200))
        .confirm_timeout(Duration::from_millis(150))
        .retries(2)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(80))
        .build(
            Arc::clone(&store),
            LateRouter {
                store: Arc::clone(&store),
                seed: AtomicU64::new(7 + round),
            },
        );

    // Delete the even routers, all at once; routers 0, 4, 8 get a second,
    // racing delete.
    let mut deletes = Vec::new();
    for r in (0..routers).step_by(2) {
        let router = RouterId::new(r);
        let runs = if r % 4 == 0 && r <= 8 { 2 } else { 1 };
        for _ in 0..runs {
            let (deleter, flags) = (deleter.clone(), Arc::clone(&deleted_flags));
            deletes.push(tokio::spawn(async move {
                let outcome = tokio::time::timeout(Duration::from_secs(60), deleter.delete(router))
                    .await
                    .expect("delete finishes within its bound")
                    .unwrap();
                flags[&router].store(true, Ordering::SeqCst);
                (router, outcome)
            }));
        }
    }
    let mut reports = HashMap::new();
    for delete in deletes {
        let (router, outcome) = delete.await.unwrap();
        let report = outcome
            .report()
            .cloned()
            .expect("racing deletes join one run");
        assert_eq!(
            report.confirmed + report.already_closed + report.forced,
            report.sessions
        );
        if let Some(previous) = reports.insert(router, report.clone()) {
            assert_eq!(
                previous, report,
                "two deletes of {router} got different reports"
            );
        }
    }
    // Keep the load going past the deletions until creates on deleted
    // routers have been refused a good number of times, then stop it.
    tokio::time::timeout(Duration::from_secs(60), async {
        while refused.load(Ordering::SeqCst) < 200 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("creates on deleted routers were tried and refused");
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }

    // Late confirmations may still be in flight: they only close sessions
    // of deleted routers, all of which are closed already.
    let created = std::mem::take(&mut *created.lock());
    let mut on_deleted = 0;
    for Created {
        session, released, ..
    } in created.iter()
    {
        let deleted = session.router().get() % 2 == 0;
        let stored = store
            .get(session.id())
            .await
            .unwrap()
            .is_some_and(|s| Session::ptr_eq(&s, session));
        if deleted {
            on_deleted += 1;
            assert!(
                session.is_closed(),
                "{session:?} of a deleted router is open"
            );
            assert!(!stored, "{session:?} of a deleted router is still stored");
            assert_eq!(
                released.load(Ordering::SeqCst),
                1,
                "{session:?}: resource released once"
            );
        } else {
            let expected = usize::from(session.is_closed());
            assert_eq!(released.load(Ordering::SeqCst), expected, "{session:?}");
            assert_eq!(stored, !session.is_closed(), "{session:?}");
        }
    }
    // Every session the deleted routers were filled with, at least.
    let deleted_routers = routers.div_ceil(2);
    assert!(on_deleted >= (deleted_routers * sessions_per_router) as usize);
    let forced: usize = reports.values().map(|report| report.forced).sum();
    assert!(forced > 0, "the force-close phase was not exercised");
    for r in (0..routers).step_by(2) {
        assert_eq!(store.count(RouterId::new(r)).await.unwrap(), 0);
    }
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    // Closed before the resource was attached, or closed by the store
    // rather than the deleter: with a remote store, a create that raced
    // its router's whole deletion gets a handle of its own, which the
    // store closes (`Reclaimed`) once it sees the record gone; the
    // deleter forced another handle of that session, without the resource.
    let bare = created
        .iter()
        .filter(|c| !c.attached || c.session.close_reason() == Some(CloseReason::Reclaimed))
        .count();
    (forced, bare)
}

async fn create<S: SessionStore<Payload = ()>>(
    store: &S,
    created: &Mutex<Vec<Created>>,
    next_id: &AtomicU64,
    router: RouterId,
    incarnation: Incarnation,
) -> Result<(), ()> {
    let id = SessionId::new(next_id.fetch_add(1, Ordering::Relaxed));
    let session = store
        .create(NewSession::new(id, router, incarnation))
        .await
        .map_err(|_| ())?;
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    // The session may already be closed by a racing deletion: then the
    // resource comes back and is released here, once.
    let attached = match session.attach(move |_: CloseReason| {
        counter.fetch_add(1, Ordering::SeqCst);
    }) {
        Ok(()) => true,
        Err(back) => {
            (back.into_inner())(CloseReason::Forced);
            false
        }
    };
    created.lock().push(Created {
        session,
        released,
        attached,
    });
    Ok(())
}
