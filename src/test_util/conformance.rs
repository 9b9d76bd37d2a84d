//! The crate's own conformance suites, for any [`SessionStore`]: the
//! model-based test of a store with a deleter, a liveness monitor and a
//! reconciler against [`ModelState`], and the deleter stress test.
//!
//! A store of your own passes them if it keeps the trait's contract: make
//! a [`Backend`] for it and call [`store_follows_the_model`] and
//! [`deleter_stress`] from your tests, as this crate does for
//! [`MemoryStore`] and its etcd store. [`Boxed`] and [`Shared`] run a
//! backend's stores behind a [`BoxStore`] or an `Arc`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures::FutureExt;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use tokio::runtime::Runtime;
use tokio::time::Duration;

use super::fakes::{Notify, ScriptedNotifier};
use super::invariants::InvariantChecker;
use super::model::{ModelState, Op, Phase, StoreModel};
use super::observe::router_lost;
use super::runtime::{HOUR, paused_runtime};
use super::script::Subset;
use crate::{
    Backoff, BoxStore, CloseReason, CreateErrorKind, DeleteError, DeleteOutcome, EventBus,
    FenceError, FinishError, HeartbeatError, Incarnation, LivenessMonitor, MemoryStore, NewSession,
    NoProbe, ReconcileError, Reconciler, RegisterError, RouterDeleter, RouterId, RouterStatus,
    Session, SessionError, SessionId, SessionKey, SessionState, SessionStore, Subscription,
};

pub use super::stress::{ForcedReleases, StressSizes, deleter_stress, soak_rounds};

/// A store under test: how to make a fresh, empty one, and which clock it
/// works with.
///
/// The model test needs the store to remember its deleted routers (their
/// tombstones) for the few routers a case uses (3): a store that already
/// forgot one answers `UnknownRouter` where the model expects it deleted.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::MemoryStore;
/// use session_lifecycle::test_util::conformance::{Backend, store_follows_the_model};
///
/// /// A store with a shard layout of its own, under the suite.
/// #[derive(Default)]
/// struct FourShards;
///
/// impl Backend for FourShards {
///     type Store = MemoryStore;
///     const NAME: &'static str = "MemoryStore(4 shards)";
///     const PAUSED_TIME: bool = true;
///
///     async fn fresh(&self) -> Arc<MemoryStore> {
///         Arc::new(MemoryStore::builder().shard_amount(4).build().unwrap())
///     }
/// }
///
/// store_follows_the_model::<FourShards>(16);
/// ```
pub trait Backend: Send + Sync + 'static {
    /// The store.
    type Store: SessionStore<Payload = ()>;
    /// A short name for messages.
    const NAME: &'static str;
    /// `true` if the store works under tokio's paused clock (an in-process
    /// store); `false` for a store that talks to a server and needs real
    /// time.
    const PAUSED_TIME: bool;
    /// `true` if every call of the store resolves on its first poll
    /// ([`MemoryStore`]): the model test then asserts it on every call.
    const RESOLVES_AT_ONCE: bool = false;
    /// How long the store's own calls may add to a deletion on top of the
    /// deleter's timers ([`max_wait`](RouterDeleter::max_wait) leaves out
    /// work that does not wait): zero for an in-process store; for a store
    /// on a server, its round trips (a replicated one's included).
    const STORE_TIME: Duration = Duration::ZERO;
    /// A fresh, empty store, isolated from every other store this backend
    /// made. Called inside the test's runtime.
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

/// Backend `B`'s stores erased into a [`BoxStore`]: the suites run on a
/// store chosen at run time, every call through a boxed future. Works for
/// any backend, so a store of your own can be checked behind a `BoxStore`
/// as well.
///
/// # Example
///
/// ```
/// use session_lifecycle::test_util::conformance::{Boxed, MemoryBackend, store_follows_the_model};
///
/// store_follows_the_model::<Boxed<MemoryBackend>>(16);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Boxed<B>(pub B);

impl<B: Backend> Backend for Boxed<B> {
    type Store = BoxStore;
    const NAME: &'static str = "BoxStore";
    const PAUSED_TIME: bool = B::PAUSED_TIME;
    const RESOLVES_AT_ONCE: bool = B::RESOLVES_AT_ONCE;
    const STORE_TIME: Duration = B::STORE_TIME;

    async fn fresh(&self) -> Arc<BoxStore> {
        Arc::new(BoxStore::new(self.0.fresh().await))
    }
}

/// Backend `B`'s stores behind an `Arc`, through the [`SessionStore`]
/// implementation for `Arc<S>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shared<B>(pub B);

impl<B: Backend> Backend for Shared<B> {
    type Store = Arc<B::Store>;
    const NAME: &'static str = "Arc";
    const PAUSED_TIME: bool = B::PAUSED_TIME;
    const RESOLVES_AT_ONCE: bool = B::RESOLVES_AT_ONCE;
    const STORE_TIME: Duration = B::STORE_TIME;

    async fn fresh(&self) -> Arc<Arc<B::Store>> {
        Arc::new(self.0.fresh().await)
    }
}

/// Runs the model test on stores of backend `B`: `cases` random sequences
/// of 1 to 47 [`Op`]s (every kind, [`StoreModel`]'s default weights), each
/// on a fresh `B::default()`, a fresh store and a runtime of its own
/// (paused if `B::PAUSED_TIME`). `PROPTEST_CASES` overrides `cases`.
///
/// After every step it checks that each call's result is the one the model
/// predicts, that the counts, router statuses and handle states match the
/// model, and runs an [`InvariantChecker`] (I1, I2, I3, I7). Deletions run
/// with a notifier confirming the even ids only, so both confirmations
/// and forced closes happen, and must end within the deleter's
/// [`max_wait`](RouterDeleter::max_wait) plus `B::STORE_TIME` (I4).
///
/// Failures persist to the proptest regression file next to the calling
/// test file (`tests/store_model.rs` → `tests/store_model.proptest-regressions`).
///
/// # Panics
///
/// With the shrunk failing sequence, if the store breaks the model.
#[track_caller]
pub fn store_follows_the_model<B: Backend + Default>(cases: u32) {
    let source_file = std::panic::Location::caller().file();
    let cases = super::strategy::cases(cases);
    let config = Config {
        cases,
        source_file: Some(source_file),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(
        &StoreModel::<super::model::DefaultConfig>::sequential_strategy(1..48),
        |(initial_state, transitions, seen_counter)| {
            ModelTest::<B>::test_sequential(
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

/// The system under test of one case. Fields drop in order: the store and
/// everything that runs on the runtime go before it.
struct Sut<B: Backend> {
    store: Arc<B::Store>,
    deleter: RouterDeleter<B::Store, Arc<ScriptedNotifier<B::Store>>>,
    monitor: LivenessMonitor<B::Store, NoProbe>,
    reconciler: Reconciler<B::Store>,
    events: Subscription,
    checker: InvariantChecker,
    /// The model as of the previous step: the expected outcomes come from it.
    before: ModelState,
    /// The incarnation the store handed out for each life of each router:
    /// `lives[&router][life - 1]`.
    lives: HashMap<RouterId, Vec<Incarnation>>,
    /// How many stale incarnations were made up so far (picks among the
    /// kinds of stale incarnation in turn).
    stale_picks: usize,
    /// The latest handle per id, as in the model.
    handles: HashMap<SessionId, Session>,
    /// Every handle created.
    all: Vec<Session>,
    /// The backend that made the store, kept as long as the store.
    _backend: B,
    runtime: Runtime,
}

impl<B: Backend> Sut<B> {
    fn new(backend: B) -> Self {
        let runtime = if B::PAUSED_TIME {
            paused_runtime()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds")
        };
        let store = runtime.block_on(backend.fresh());
        let _context = runtime.enter();
        let notifier =
            ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::EvenIds));
        let deleter = RouterDeleter::builder().batch_size(4).retries(1);
        let (deleter, grace) = if B::PAUSED_TIME {
            // Paused clock: long timeouts cost nothing.
            (
                deleter.confirm_timeout(Duration::from_secs(1)),
                Duration::from_secs(1),
            )
        } else {
            // Real time: keep a case fast. The notifier confirms before it
            // returns, so the notify timeout keeps its (generous) default.
            let deleter = deleter.confirm_timeout(Duration::from_millis(50)).backoff(
                Backoff::new()
                    .retries(1)
                    .delays(Duration::from_millis(10), Duration::from_millis(20)),
            );
            (deleter, Duration::from_millis(20))
        };
        // The scripted notifier confirms inside its call, one store call a
        // session: a slow store's calls must fit in the notify timeout (the
        // default 5 s, plus what `STORE_TIME` allows the store), or
        // confirmed sessions are forced.
        let deleter = deleter
            .notify_timeout(Duration::from_secs(5).saturating_add(B::STORE_TIME))
            .build(Arc::clone(&store), notifier)
            .expect("valid settings");
        // Timeouts of a day: the model has no clock, so no session may be
        // reaped; heartbeats are checked for their answers.
        let day = Duration::from_secs(86_400);
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(day)
            .timeout_range(day, day)
            .granularity(Duration::from_secs(1))
            .build(Arc::clone(&store), NoProbe)
            .expect("the monitor's settings are in range");
        let bus = EventBus::default();
        let events = bus.subscribe();
        let reconciler = Reconciler::builder()
            .grace_period(grace)
            .events(bus)
            .build(Arc::clone(&store))
            .expect("valid settings");
        Self {
            store,
            deleter,
            monitor,
            reconciler,
            events,
            checker: InvariantChecker::new(),
            before: ModelState::default(),
            lives: HashMap::new(),
            stale_picks: 0,
            handles: HashMap::new(),
            all: Vec::new(),
            _backend: backend,
            runtime,
        }
    }

    /// Runs a store call to its end on the case's runtime (asserting it did
    /// not wait, for a store that never does).
    fn run<F: Future>(&self, future: F) -> F::Output {
        if B::RESOLVES_AT_ONCE {
            let _context = self.runtime.enter();
            future
                .now_or_never()
                .unwrap_or_else(|| panic!("{} resolves without waiting", B::NAME))
        } else {
            // A call that never ends fails the case instead of hanging it.
            let limit = Self::limit();
            self.runtime
                .block_on(async { tokio::time::timeout(limit, future).await })
                .unwrap_or_else(|_| {
                    panic!("{}: a store call did not end within {limit:?}", B::NAME)
                })
        }
    }

    /// The incarnation a step names for `router`, as of the model `m`: its
    /// current one, or (`stale`) one that is certainly not live: an earlier
    /// life's, or the current one minus 1.
    fn incarnation(&mut self, m: &ModelState, router: RouterId, stale: bool) -> Incarnation {
        let Some(r) = m.router(router) else {
            // Unknown router: any incarnation is refused the same way.
            return Incarnation::new(u64::from(!stale));
        };
        let lives = &self.lives[&router];
        let current = lives[r.life - 1];
        if !stale {
            return current;
        }
        let earlier = &lives[..r.life - 1];
        let pick = self.stale_picks % (earlier.len() + 1);
        self.stale_picks += 1;
        earlier
            .get(pick)
            .copied()
            .unwrap_or_else(|| Incarnation::new(current.get() - 1))
    }

    /// The incarnation the store handed out for the router's life in `m`.
    fn current(&self, m: &ModelState, router: RouterId) -> Incarnation {
        self.lives[&router][m.router(router).map_or(1, |r| r.life) - 1]
    }

    /// A bound for a step that waits: at once on a paused clock, a while in
    /// real time.
    fn limit() -> Duration {
        let base = if B::PAUSED_TIME {
            HOUR
        } else {
            Duration::from_secs(120)
        };
        base.saturating_add(B::STORE_TIME)
    }
}

/// The model test on stores of backend `B`.
struct ModelTest<B>(PhantomData<B>);

impl<B: Backend + Default> StateMachineTest for ModelTest<B> {
    type SystemUnderTest = Sut<B>;
    type Reference = StoreModel;

    fn init_test(_: &ModelState) -> Sut<B> {
        Sut::new(B::default())
    }

    fn apply(mut sut: Sut<B>, after: &ModelState, op: Op) -> Sut<B> {
        let before = std::mem::replace(&mut sut.before, after.clone());
        let store = Arc::clone(&sut.store);
        match op.clone() {
            Op::Register(router) => register(&mut sut, &before, after, router),
            Op::Create {
                session,
                router,
                stale,
            } => {
                create(&mut sut, &before, session, router, stale);
            }
            Op::Heartbeat(id) => {
                let result = sut.run(sut.monitor.heartbeat_id(id));
                match before.session(id).filter(|s| s.stored) {
                    None => assert!(
                        matches!(result, Err(HeartbeatError::UnknownSession(_))),
                        "{result:?}"
                    ),
                    Some(s) if s.state == SessionState::Closed => {
                        assert!(
                            matches!(result, Err(HeartbeatError::Closed(_))),
                            "{result:?}"
                        );
                    }
                    Some(_) => assert!(result.is_ok(), "{op:?}: {result:?}"),
                }
            }
            Op::Close { session, reason } => {
                let result = sut.run(store.close(session, reason));
                match before.session(session).filter(|s| s.stored) {
                    None => assert!(result.is_err()),
                    Some(s) => assert_eq!(result.unwrap().won(), s.state != SessionState::Closed),
                }
            }
            Op::CloseHandle(id) => {
                if let Some(handle) = sut.handles.get(&id) {
                    let won = handle.close(crate::CloseReason::ClientClosed).won();
                    assert_eq!(
                        won,
                        before.session(id).map(|s| s.state) != Some(SessionState::Closed)
                    );
                }
            }
            Op::Terminate(id) => {
                if let Some(handle) = sut.handles.get(&id) {
                    let won = handle.begin_terminating().won();
                    assert_eq!(
                        won,
                        before.session(id).map(|s| s.state) == Some(SessionState::Active)
                    );
                }
            }
            Op::Remove(id) => {
                let result = sut.run(store.remove(id));
                assert_eq!(result.is_ok(), before.is_stored(id));
                if let Ok(session) = result {
                    assert!(session.is_closed(), "a session left the store open");
                }
            }
            Op::Fence(router) => fence(&sut, &before, router),
            Op::Delete(router) => delete(&sut, &before, router, None),
            Op::DeleteIncarnation { router, stale } => {
                let incarnation = sut.incarnation(&before, router, stale);
                delete(&sut, &before, router, Some((incarnation, stale)));
            }
            Op::Confirm { session, stale } => confirm(&sut, &before, session, stale),
            Op::Finish { router, stale } => finish(&mut sut, &before, router, stale),
            Op::Disconnect(router) => disconnect(&mut sut, &before, router),
            Op::Reconnect {
                router,
                report,
                stale,
            } => {
                reconnect(&mut sut, &before, router, &report, stale);
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut<B>, m: &ModelState) {
        let store = &sut.store;
        let audit = sut.run(store.audit()).unwrap();
        assert_eq!(audit.sessions, m.stored_count(), "session count");
        for (router, r) in m.routers() {
            let status = sut.run(store.router_status(router)).unwrap();
            let incarnation = sut.current(m, router);
            let expected = match r.phase {
                Phase::Live => RouterStatus::Live(incarnation),
                Phase::Fenced => RouterStatus::Fenced(incarnation),
                Phase::Deleted => RouterStatus::Deleted(incarnation),
            };
            assert_eq!(status, expected);
            assert_eq!(
                sut.run(store.count(router)).unwrap(),
                m.stored_of(router).len(),
                "count of {router}"
            );
        }
        // Every latest handle agrees with the model.
        for (id, handle) in &sut.handles {
            assert_eq!(
                Some(handle.state()),
                m.session(*id).map(|s| s.state),
                "state of {id}"
            );
        }
        let lingering: BTreeSet<SessionId> = audit.closed_in_store.iter().copied().collect();
        let expected: BTreeSet<SessionId> = m
            .sessions()
            .filter(|(_, s)| s.stored && s.state == SessionState::Closed)
            .map(|(id, _)| id)
            .collect();
        assert_eq!(lingering, expected, "closed sessions left in the store");
        let report = sut.run(sut.checker.check(&**store));
        assert!(report.is_clean(), "{report}");
        // Sessions replaced by a newer one of the same id are closed.
        for handle in &sut.all {
            let latest = sut
                .handles
                .get(&handle.id())
                .is_some_and(|l| Session::ptr_eq(l, handle));
            assert!(
                latest || handle.is_closed(),
                "an older session of a reused id is open: {handle:?}"
            );
        }
    }
}

fn register<B: Backend>(
    sut: &mut Sut<B>,
    before: &ModelState,
    after: &ModelState,
    router: RouterId,
) {
    let result = sut.run(sut.store.register_router(router));
    match before.router(router).map(|r| r.phase) {
        None | Some(Phase::Deleted) => {
            let incarnation = result.unwrap();
            let lives = sut.lives.entry(router).or_default();
            assert_eq!(Some(lives.len() + 1), after.router(router).map(|r| r.life));
            if let Some(&last) = lives.last() {
                assert!(
                    incarnation > last,
                    "{router} registered again with {incarnation}, not above {last}"
                );
            }
            assert!(
                incarnation.get() >= 1,
                "{incarnation}: the model needs incarnations >= 1"
            );
            lives.push(incarnation);
            sut.checker.track_router(router);
        }
        Some(Phase::Live) => {
            assert!(
                matches!(result, Err(RegisterError::AlreadyRegistered { .. })),
                "{result:?}"
            );
        }
        Some(Phase::Fenced) => assert!(
            matches!(result, Err(RegisterError::Deleting { .. })),
            "{result:?}"
        ),
    }
}

fn create<B: Backend>(
    sut: &mut Sut<B>,
    before: &ModelState,
    id: SessionId,
    router: RouterId,
    stale: bool,
) {
    let incarnation = sut.incarnation(before, router, stale);
    let result = sut.run(sut.store.create(NewSession::new(id, router, incarnation)));
    let expected = match before.router(router) {
        None => Some(CreateErrorKind::UnknownRouter(router)),
        Some(r) if stale => Some(CreateErrorKind::StaleIncarnation {
            router,
            requested: incarnation,
            live: (r.phase == Phase::Live).then(|| sut.current(before, router)),
        }),
        Some(r) if r.phase == Phase::Fenced => Some(CreateErrorKind::Fenced {
            router,
            incarnation,
        }),
        Some(r) if r.phase == Phase::Deleted => Some(CreateErrorKind::RouterDeleted {
            router,
            incarnation,
        }),
        Some(_) if before.is_stored(id) => Some(CreateErrorKind::DuplicateSession(id)),
        Some(_) => None,
    };
    match result {
        Ok(session) => {
            assert!(
                expected.is_none(),
                "create of {id} on {router} accepted against the model"
            );
            assert_eq!(session.incarnation(), incarnation);
            sut.monitor
                .watch(&session)
                .expect("a new session can be watched");
            sut.checker.track(&session);
            sut.all.push(session.clone());
            sut.handles.insert(id, session);
        }
        Err(err) => assert_eq!(
            Some(err.kind().clone()),
            expected,
            "create of {id} on {router}"
        ),
    }
}

fn fence<B: Backend>(sut: &Sut<B>, before: &ModelState, router: RouterId) {
    let result = sut.run(sut.store.fence(router));
    match before.router(router).map(|r| r.phase) {
        None => assert!(matches!(result, Err(FenceError::UnknownRouter(_)))),
        Some(Phase::Deleted) => assert!(matches!(result, Err(FenceError::AlreadyDeleted { .. }))),
        Some(phase) => {
            let snapshot = result.unwrap();
            assert_eq!(snapshot.newly_fenced, phase == Phase::Live);
            assert_eq!(snapshot.incarnation, sut.current(before, router));
            let ids: BTreeSet<SessionId> = snapshot.sessions.iter().map(Session::id).collect();
            assert_eq!(ids, before.stored_of(router), "fence snapshot");
            assert_eq!(
                ids.len(),
                snapshot.sessions.len(),
                "the fence snapshot lists a session twice"
            );
        }
    }
}

/// A router's confirmation by key: of the id's current session, or (stale)
/// of an earlier one, which must close nothing.
fn confirm<B: Backend>(sut: &Sut<B>, before: &ModelState, id: SessionId, stale: bool) {
    let current = sut.handles.get(&id).filter(|_| before.is_stored(id));
    let key = if stale {
        // The latest earlier session with this id, or a life that never was.
        sut.all
            .iter()
            .rev()
            .filter(|s| s.id() == id && current.is_none_or(|c| !Session::ptr_eq(c, s)))
            .map(Session::key)
            .next()
            .unwrap_or(SessionKey::new(id, u64::MAX))
    } else {
        match sut.handles.get(&id) {
            Some(handle) => handle.key(),
            None => SessionKey::new(id, u64::MAX),
        }
    };
    let result = sut.run(sut.store.close_exact(key, CloseReason::RouterDeleted));
    match before.session(id).filter(|s| s.stored && !stale) {
        None => assert!(
            matches!(result, Err(SessionError::UnknownSession(_))),
            "a confirmation of {key} closed {id}'s current session: {result:?}"
        ),
        Some(s) => assert_eq!(result.unwrap().won(), s.state != SessionState::Closed),
    }
}

/// `delete`, or `delete_incarnation` of `target` (stale or not).
fn delete<B: Backend>(
    sut: &Sut<B>,
    before: &ModelState,
    router: RouterId,
    target: Option<(Incarnation, bool)>,
) {
    let started = sut.runtime.block_on(async { tokio::time::Instant::now() });
    let deletion = match target {
        None => sut.deleter.delete(router).left_future(),
        Some((incarnation, _)) => sut
            .deleter
            .delete_incarnation(router, incarnation)
            .right_future(),
    };
    let result = sut
        .runtime
        .block_on(async { tokio::time::timeout(Sut::<B>::limit(), deletion).await })
        .expect("I4: the deletion finishes within its bound");
    let waited = sut.runtime.block_on(async move { started.elapsed() });
    match before.router(router).map(|r| r.phase) {
        None => assert!(matches!(result, Err(DeleteError::UnknownRouter(_)))),
        Some(_) if matches!(target, Some((_, true))) => {
            assert!(
                matches!((&result, target), (Ok(DeleteOutcome::AlreadyDeleted { incarnation, .. }), Some((stale, _)))
                    if *incarnation == stale),
                "a stale deletion of {router} ({target:?}): {result:?}"
            );
        }
        Some(Phase::Deleted) => assert!(
            matches!(result, Ok(DeleteOutcome::AlreadyDeleted { incarnation, .. })
                if incarnation == sut.current(before, router)),
            "{result:?}"
        ),
        Some(phase) => {
            let outcome = result.unwrap();
            let report = outcome.report().unwrap();
            let stored = before.stored_of(router);
            let closed = |id: &&SessionId| {
                before.session(**id).map(|s| s.state) == Some(SessionState::Closed)
            };
            let already = stored.iter().filter(closed).count();
            let forced = stored
                .iter()
                .filter(|id| !closed(id) && id.get() % 2 == 1)
                .count();
            assert_eq!(report.incarnation, sut.current(before, router));
            assert_eq!(report.resumed, phase == Phase::Fenced);
            assert_eq!(
                (report.sessions, report.already_closed, report.forced),
                (stored.len(), already, forced)
            );
            assert_eq!(
                report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
                report.sessions
            );
            assert!(
                waited <= sut.deleter.max_wait(stored.len()) + B::STORE_TIME,
                "I4: {waited:?}"
            );
        }
    }
}

fn finish<B: Backend>(sut: &mut Sut<B>, before: &ModelState, router: RouterId, stale: bool) {
    let incarnation = sut.incarnation(before, router, stale);
    let result = sut.run(sut.store.finish(router, incarnation));
    match before.router(router).map(|r| r.phase) {
        None => assert!(matches!(result, Err(FinishError::UnknownRouter(_)))),
        Some(_) if stale => assert!(
            matches!(result, Err(FinishError::IncarnationMismatch { .. })),
            "finish of {router} with {incarnation}: {result:?}"
        ),
        Some(Phase::Live) => assert!(matches!(result, Err(FinishError::NotFenced { .. }))),
        Some(Phase::Deleted) => assert!(matches!(result, Err(FinishError::AlreadyDeleted { .. }))),
        Some(Phase::Fenced) => {
            let report = result.unwrap();
            let stored = before.stored_of(router);
            let open = stored
                .iter()
                .filter(|id| before.session(**id).map(|s| s.state) != Some(SessionState::Closed))
                .count();
            assert_eq!((report.removed, report.closed), (stored.len(), open));
            assert_eq!(report.incarnation, incarnation);
        }
    }
}

/// The router goes away past its grace period: the step waits for the
/// reconciler's `RouterLost` event (the clock jumps to it when paused).
fn disconnect<B: Backend>(sut: &mut Sut<B>, before: &ModelState, router: RouterId) {
    let result = sut
        .runtime
        .block_on(sut.reconciler.router_disconnected(router));
    match before.router(router).map(|r| r.phase) {
        None => assert!(
            matches!(result, Err(ReconcileError::UnknownRouter(_))),
            "{result:?}"
        ),
        Some(Phase::Live) => {
            result.expect("a live router's grace period starts");
            let events = &mut sut.events;
            sut.runtime
                .block_on(async {
                    tokio::time::timeout(Sut::<B>::limit(), router_lost(events, router)).await
                })
                .expect("the grace period ends");
        }
        Some(_) => assert!(
            matches!(result, Err(ReconcileError::NotLive { .. })),
            "{result:?}"
        ),
    }
}

fn reconnect<B: Backend>(
    sut: &mut Sut<B>,
    before: &ModelState,
    router: RouterId,
    reported: &[SessionId],
    stale: bool,
) {
    let incarnation = sut.incarnation(before, router, stale);
    // No clock step: sessions created before the call, in the same instant
    // of a paused clock, are not spared (only later ones are).
    let result = sut
        .runtime
        .block_on(sut.reconciler.reconcile(router, incarnation, reported));
    match before.router(router).map(|r| r.phase) {
        None => assert!(
            matches!(result, Err(ReconcileError::UnknownRouter(_))),
            "{result:?}"
        ),
        Some(_) if stale => assert!(
            matches!(result, Err(ReconcileError::StaleIncarnation { .. })),
            "{result:?}"
        ),
        Some(Phase::Live) => {
            let report = result.expect("a live router reconciles");
            let lost: Vec<SessionId> = before
                .active_of(router)
                .into_iter()
                .filter(|id| !reported.contains(id))
                .collect();
            let held = |id: &SessionId| {
                before.session(*id).is_some_and(|s| {
                    s.stored && s.router == router && s.state != SessionState::Closed
                })
            };
            let drop: Vec<SessionId> = reported.iter().copied().filter(|id| !held(id)).collect();
            assert_eq!(
                report.closed, lost,
                "sessions closed for missing from the report"
            );
            let mut dropped = report.drop.clone();
            dropped.sort_unstable();
            assert_eq!(dropped, drop, "sessions the router must drop");
        }
        Some(_) => assert!(
            matches!(result, Err(ReconcileError::NotLive { .. })),
            "{result:?}"
        ),
    }
}
