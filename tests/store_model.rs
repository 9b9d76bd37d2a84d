//! Model-based property test of `MemoryStore` and `RouterDeleter`
//! (proptest-state-machine).
//!
//! Random sequences of register / create / close / terminate / remove /
//! fence / finish / delete / re-register run against the store and against
//! a simple reference model. Deletions run on a paused current-thread
//! runtime with a notifier that confirms only even session ids, so both
//! confirmations and forced closes happen. After every step: the results
//! match the model, every create after a fence failed (I2), no session moved
//! backwards (I3), the index and the map agree (I7), the counts match the
//! model, and no session of a deleted incarnation is open or stored (I1).
//!
//! `PROPTEST_CASES=5000 cargo test --test store_model` runs a bigger search.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::FutureExt;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use session_lifecycle::{
    CloseReason, CreateErrorKind, DeleteError, DeleteOutcome, FenceError, FinishError, Incarnation,
    MemoryStore, NewSession, NotifyError, RegisterError, RouterDeleter, RouterId, RouterStatus,
    Session, SessionId, SessionState, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::time::Duration;

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
    incarnation: u64,
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
    next_incarnation: u64,
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

    fn incarnation(&self, router: u64, stale: bool) -> u64 {
        let current = self.routers.get(&router).map_or(1, |r| r.incarnation);
        if stale {
            current.wrapping_sub(1)
        } else {
            current
        }
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
            Step::Register(r) => {
                if m.routers.get(&r).is_none_or(|r| r.phase == Phase::Deleted) {
                    m.routers.insert(
                        r,
                        RouterModel {
                            phase: Phase::Live,
                            incarnation: m.next_incarnation,
                        },
                    );
                    m.next_incarnation += 1;
                }
            }
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
struct EvenConfirm(Arc<MemoryStore>);

impl TerminationNotifier for EvenConfirm {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        for id in batch.sessions.into_iter().filter(|id| id.get() % 2 == 0) {
            let _ = self.0.close(id, CloseReason::RouterDeleted).await;
        }
        Ok(())
    }
}

struct Sut {
    store: Arc<MemoryStore>,
    runtime: tokio::runtime::Runtime,
    deleter: RouterDeleter<MemoryStore, EvenConfirm>,
    /// The model as of the previous step: the expected outcomes come from it.
    before: Model,
    /// The latest handle per id, as in the model.
    handles: HashMap<u64, Session>,
    /// Every handle ever created, with the last state and reason seen (I3).
    all: Vec<(Session, SessionState, Option<CloseReason>)>,
}

fn now<F: std::future::Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("MemoryStore resolves without waiting")
}

fn rank(state: SessionState) -> u8 {
    match state {
        SessionState::Active => 0,
        SessionState::Terminating => 1,
        SessionState::Closed => 2,
    }
}

struct StoreTest;

impl StateMachineTest for StoreTest {
    type SystemUnderTest = Sut;
    type Reference = Reference;

    fn init_test(_: &Model) -> Sut {
        let store = Arc::new(MemoryStore::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let deleter = RouterDeleter::builder()
            .batch_size(4)
            .confirm_timeout(Duration::from_secs(1))
            .retries(1)
            .build(Arc::clone(&store), EvenConfirm(Arc::clone(&store)));
        Sut {
            store,
            runtime,
            deleter,
            before: empty_model(),
            handles: HashMap::new(),
            all: Vec::new(),
        }
    }

    fn apply(mut sut: Sut, after: &Model, step: Step) -> Sut {
        let before = std::mem::replace(&mut sut.before, after.clone());
        let store = &sut.store;
        match step {
            Step::Register(r) => {
                let result = now(store.register_router(RouterId::new(r)));
                match before.routers.get(&r).map(|r| r.phase) {
                    None | Some(Phase::Deleted) => {
                        assert_eq!(result.unwrap().get(), after.routers[&r].incarnation);
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
                let incarnation = Incarnation::new(before.incarnation(router, stale));
                let spec = NewSession::new(SessionId::new(id), RouterId::new(router), incarnation);
                let result = now(store.create(spec));
                let expected = match before.routers.get(&router) {
                    None => Some(CreateErrorKind::UnknownRouter(RouterId::new(router))),
                    Some(r) if stale => Some(CreateErrorKind::StaleIncarnation {
                        router: RouterId::new(router),
                        requested: incarnation,
                        live: (r.phase == Phase::Live).then_some(Incarnation::new(r.incarnation)),
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
                        sut.all.push((session.clone(), SessionState::Active, None));
                        sut.handles.insert(id, session);
                    }
                    Err(err) => assert_eq!(Some(err.kind().clone()), expected, "{step:?}"),
                }
            }
            Step::Close { id, reason } => {
                let result = now(store.close(SessionId::new(id), reason));
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
                let result = now(store.remove(SessionId::new(id)));
                assert_eq!(result.is_ok(), before.stored(id));
                if let Ok(session) = result {
                    assert!(session.is_closed(), "a session left the store open");
                }
            }
            Step::Fence(r) => {
                let result = now(store.fence(RouterId::new(r)));
                match before.routers.get(&r).map(|r| r.phase) {
                    None => assert!(matches!(result, Err(FenceError::UnknownRouter(_)))),
                    Some(Phase::Deleted) => {
                        assert!(matches!(result, Err(FenceError::AlreadyDeleted { .. })))
                    }
                    Some(phase) => {
                        let snapshot = result.unwrap();
                        assert_eq!(snapshot.newly_fenced, phase == Phase::Live);
                        let ids: BTreeSet<u64> =
                            snapshot.sessions.iter().map(|s| s.id().get()).collect();
                        assert_eq!(ids, before.stored_of(r), "fence snapshot");
                    }
                }
            }
            Step::Delete(router) => {
                let started = sut.runtime.block_on(async { tokio::time::Instant::now() });
                let result = sut
                    .runtime
                    .block_on(async {
                        tokio::time::timeout(
                            Duration::from_secs(3_600),
                            sut.deleter.delete(RouterId::new(router)),
                        )
                        .await
                    })
                    .expect("delete finishes within its bound");
                let waited = sut.runtime.block_on(async move { started.elapsed() });
                match before.routers.get(&router).map(|r| r.phase) {
                    None => assert!(matches!(result, Err(DeleteError::UnknownRouter(_)))),
                    Some(Phase::Deleted) => {
                        assert!(
                            matches!(result, Ok(DeleteOutcome::AlreadyDeleted { .. })),
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
                let incarnation = Incarnation::new(before.incarnation(router, stale));
                let result = now(store.finish(RouterId::new(router), incarnation));
                match before.routers.get(&router).map(|r| r.phase) {
                    None => assert!(matches!(result, Err(FinishError::UnknownRouter(_)))),
                    Some(_) if stale => assert!(matches!(
                        result,
                        Err(FinishError::IncarnationMismatch { .. })
                    )),
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

    fn check_invariants(sut: &Sut, m: &Model) {
        let store = &sut.store;
        // Counts and router phases match the model.
        let stored = m.sessions.values().filter(|s| s.stored).count();
        assert_eq!(store.len(), stored, "session count");
        for (r, router) in &m.routers {
            let id = RouterId::new(*r);
            let status = now(store.router_status(id)).unwrap();
            let incarnation = Incarnation::new(router.incarnation);
            let expected = match router.phase {
                Phase::Live => RouterStatus::Live(incarnation),
                Phase::Fenced => RouterStatus::Fenced(incarnation),
                Phase::Deleted => RouterStatus::Deleted(incarnation),
            };
            assert_eq!(status, expected);
            assert_eq!(
                now(store.count(id)).unwrap(),
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
        // I7 and no orphans; the lingering closed sessions are the model's.
        let audit = now(store.audit()).unwrap();
        assert!(audit.is_consistent(), "{audit:?}");
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
            let status = now(store.router_status(handle.router())).unwrap();
            if status == RouterStatus::Deleted(handle.incarnation()) {
                assert!(
                    handle.is_closed(),
                    "I1: {handle:?} of a deleted router is open"
                );
                let stored = now(store.get(handle.id())).unwrap();
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

fn empty_model() -> Model {
    Model {
        routers: BTreeMap::new(),
        sessions: BTreeMap::new(),
        next_incarnation: 1,
    }
}

/// 1,000 cases (about a second in a debug build) unless `PROPTEST_CASES`
/// says otherwise.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(1_000)
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
    #[test]
    fn memory_store_follows_the_model(sequential 1..48 => StoreTest);
}
