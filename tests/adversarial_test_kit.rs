//! An adversarial downstream user of the test kit (feature `test-util`):
//! correct stores of our own that the kit must accept (wrappers of a
//! `MemoryStore` that await, yield or sleep on tokio's clock around every
//! call, or list sessions in another allowed order), stores each broken in
//! exactly one documented way that the kit piece claiming to catch it must
//! catch, the checker on states reached by legal racing operations, the
//! scripted fakes under misuse, and the strategies' promises.
//! Only the public API, as a downstream crate.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use session_lifecycle::test_util::conformance::{
    Backend, Boxed, ForcedReleases, MemoryBackend, StressSizes, deleter_stress,
    store_follows_the_model,
};
use session_lifecycle::test_util::model::{ModelState, Op, OpKind, OpWeights, Space};
use session_lifecycle::test_util::strategy::ops;
use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, Script, ScriptedNotifier, Subset, Violation,
    report_within, run_paused, within,
};
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, RouterDeleter, RouterId, Session, SessionId,
    SessionKey, SessionStore, session::CloseOutcome, store::AuditReport, store::BackendError,
    store::CreateError, store::FenceError, store::FenceSnapshot, store::FinishError,
    store::FinishReport, store::RegisterError, store::Repair, store::RouterCensus,
    store::RouterError, store::RouterStatus, store::SessionError,
};

/// How a wrapper waits around each call of the store it wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delay {
    None,
    /// `tokio::task::yield_now()` before and after.
    Yield,
    /// `tokio::time::sleep(1 ms)` before and after (tokio's clock).
    Sleep,
    /// `tokio::time::sleep(1 s)` before and after: a slow (remote-like)
    /// store on the paused clock.
    SlowSleep,
}

/// The one documented rule a wrapper breaks, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// `create` accepts a stale incarnation (rewrites it to the live one).
    StaleCreate,
    /// `close_exact` closes whatever session holds the key's id.
    CloseExactById,
    /// `fence` drops one session from its snapshot.
    PartialFence,
    /// `fence` lists one session twice in its snapshot (a paginated
    /// listing that read a page twice).
    DuplicateFence,
    /// `sessions` keeps listing sessions it created once they are closed.
    ListClosed,
    /// `finish` forgets to drop its sessions from the listing, `count` and
    /// `get` (its audit, reading another structure, does not see them).
    KeepAfterFinish,
}

/// A store of our own around a `MemoryStore`.
struct Wrapped {
    inner: MemoryStore,
    delay: Delay,
    bug: Bug,
    created: Mutex<Vec<Session>>,
    ghosts: Mutex<Vec<Session>>,
}

impl Wrapped {
    fn new(delay: Delay, bug: Bug) -> Self {
        Self {
            inner: MemoryStore::new(),
            delay,
            bug,
            created: Mutex::new(Vec::new()),
            ghosts: Mutex::new(Vec::new()),
        }
    }

    async fn pause(&self) {
        match self.delay {
            Delay::None => {}
            Delay::Yield => tokio::task::yield_now().await,
            Delay::Sleep => tokio::time::sleep(Duration::from_millis(1)).await,
            Delay::SlowSleep => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }

    fn partial(&self, snapshot: &mut FenceSnapshot<()>) {
        if self.bug == Bug::PartialFence {
            snapshot.sessions.pop();
        }
        if self.bug == Bug::DuplicateFence
            && let Some(first) = snapshot.sessions.first().cloned()
        {
            snapshot.sessions.push(first);
        }
    }
}

impl SessionStore for Wrapped {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.pause().await;
        let r = self.inner.register_router(router).await;
        self.pause().await;
        r
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.pause().await;
        let r = self.inner.router_status(router).await;
        self.pause().await;
        r
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        self.pause().await;
        let mut spec = spec;
        if self.bug == Bug::StaleCreate
            && let Ok(RouterStatus::Live(live)) = self.inner.router_status(spec.router()).await
            && live != spec.incarnation()
        {
            spec = NewSession::new(spec.id(), spec.router(), live);
        }
        let r = self.inner.create(spec).await;
        if let Ok(session) = &r {
            self.created.lock().unwrap().push(session.clone());
        }
        self.pause().await;
        r
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        self.pause().await;
        let mut r = self.inner.get(id).await;
        if let Ok(None) = r {
            let ghosts = self.ghosts.lock().unwrap();
            r = Ok(ghosts.iter().find(|g| g.id() == id).cloned());
        }
        self.pause().await;
        r
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.pause().await;
        let r = self.inner.close(id, reason).await;
        self.pause().await;
        r
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.pause().await;
        let r = if self.bug == Bug::CloseExactById {
            self.inner.close(key.id(), reason).await
        } else {
            self.inner.close_exact(key, reason).await
        };
        self.pause().await;
        r
    }
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        self.pause().await;
        let r = self.inner.remove(id).await;
        self.pause().await;
        r
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, SessionError> {
        self.pause().await;
        let r = self.inner.remove_exact(key).await;
        self.pause().await;
        r
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session>, RouterError> {
        self.pause().await;
        let mut listed = self.inner.sessions(router).await?;
        // "in no particular order": another allowed order.
        listed.reverse();
        listed.extend(
            self.ghosts
                .lock()
                .unwrap()
                .iter()
                .filter(|g| g.router() == router)
                .cloned(),
        );
        if self.bug == Bug::ListClosed {
            let created = self.created.lock().unwrap().clone();
            for s in created {
                if s.router() == router
                    && s.is_closed()
                    && !listed.iter().any(|l| Session::ptr_eq(l, &s))
                {
                    listed.push(s);
                }
            }
        }
        self.pause().await;
        Ok(listed)
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.pause().await;
        let ghosts = self
            .ghosts
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.router() == router)
            .count();
        let r = self.inner.count(router).await.map(|n| n + ghosts);
        self.pause().await;
        r
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.pause().await;
        let mut r = self.inner.fence(router).await;
        if let Ok(snapshot) = &mut r {
            self.partial(snapshot);
        }
        self.pause().await;
        r
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        self.pause().await;
        let mut r = self.inner.fence_incarnation(router, incarnation).await;
        if let Ok(snapshot) = &mut r {
            self.partial(snapshot);
        }
        self.pause().await;
        r
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.pause().await;
        let before = if self.bug == Bug::KeepAfterFinish {
            self.inner.sessions(router).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let r = self.inner.finish(router, incarnation).await;
        if r.is_ok() {
            self.ghosts.lock().unwrap().extend(before);
        }
        self.pause().await;
        r
    }
    async fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session],
    ) -> Result<usize, FinishError> {
        self.pause().await;
        let r = self
            .inner
            .unlink_closed(router, incarnation, sessions)
            .await;
        self.pause().await;
        r
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.pause().await;
        let r = self.inner.audit().await;
        self.pause().await;
        r
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.pause().await;
        let mut r = self.inner.census().await;
        if let Ok(census) = &mut r {
            census.reverse();
        }
        self.pause().await;
        r
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.pause().await;
        let r = self.inner.repair(findings).await;
        self.pause().await;
        r
    }
}

/// Backends for the conformance suite: a delay and a bug.
macro_rules! backend {
    ($name:ident, $delay:expr, $bug:expr, $store_time:expr) => {
        #[derive(Default)]
        struct $name;
        impl Backend for $name {
            type Store = Wrapped;
            const NAME: &'static str = stringify!($name);
            const PAUSED_TIME: bool = true;
            const STORE_TIME: Duration = $store_time;
            async fn fresh(&self) -> Arc<Wrapped> {
                Arc::new(Wrapped::new($delay, $bug))
            }
        }
    };
}

backend!(Yielding, Delay::Yield, Bug::None, Duration::ZERO);
// Every call of a deletion takes 2 ms of the store's own (paused) time: a
// deletion of at most 12 sessions makes far fewer than 500 calls.
backend!(Sleeping, Delay::Sleep, Bug::None, Duration::from_secs(1));
// 2 s per call; a deletion of at most 12 sessions makes far fewer than
// 1,800 calls.
backend!(
    SlowSleeping,
    Delay::SlowSleep,
    Bug::None,
    Duration::from_secs(3_600)
);
backend!(StaleCreates, Delay::None, Bug::StaleCreate, Duration::ZERO);
backend!(ClosesById, Delay::None, Bug::CloseExactById, Duration::ZERO);
backend!(
    PartialFences,
    Delay::None,
    Bug::PartialFence,
    Duration::ZERO
);
backend!(
    DuplicateFences,
    Delay::None,
    Bug::DuplicateFence,
    Duration::ZERO
);

/// Runs `f` on a thread of its own; `Ok` if it returned, `Err` with the
/// panic message if it panicked. Fails the test if it takes over `limit`.
fn on_thread(limit: Duration, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(result.map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        }));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("not finished within {limit:?}"))
}

/// `store_follows_the_model::<B>(cases)` on its own thread, failing if it
/// takes more than a minute (a hang is a failure, not a stuck suite).
fn follows_the_model_within_a_minute<B: Backend + Default + Send + 'static>(cases: u32) {
    on_thread(Duration::from_secs(60), move || {
        store_follows_the_model::<B>(cases)
    })
    .unwrap();
}

// ---------------------------------------------------------------------------
// (1) False positives: correct stores of our own must pass the suite.

/// A correct store that yields to the scheduler before and after every call
/// (and lists sessions and the census in reverse order) follows the model.
#[test]
fn a_yielding_wrapper_of_memory_store_follows_the_model() {
    follows_the_model_within_a_minute::<Yielding>(24);
}

/// A correct store whose every call takes 1 ms of tokio's (paused) clock
/// before and after follows the model, with `STORE_TIME` covering its calls.
#[test]
fn a_sleeping_wrapper_of_memory_store_follows_the_model() {
    follows_the_model_within_a_minute::<Sleeping>(24);
}

/// A correct store whose calls each take 2 s of tokio's paused clock (a
/// remote store's round trips), with `STORE_TIME` an hour: `Backend`
/// documents `STORE_TIME` as the only allowance a slow store needs.
#[test]
fn a_slow_sleeping_wrapper_of_memory_store_follows_the_model() {
    follows_the_model_within_a_minute::<SlowSleeping>(24);
}

/// The same sleeping store erased into a `BoxStore`.
#[test]
fn a_boxed_sleeping_wrapper_follows_the_model() {
    follows_the_model_within_a_minute::<Boxed<Sleeping>>(16);
}

/// Runs `deleter_stress` on a multi-thread runtime of its own thread,
/// bounded.
fn stress<B: Backend>(
    backend: B,
    sizes: StressSizes,
    releases: ForcedReleases,
) -> Result<(), String> {
    on_thread(Duration::from_secs(80), move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(60),
                deleter_stress(&backend, sizes, releases),
            )
            .await
            .expect("the stress run ends within 60 s");
        });
    })
}

/// The deleter stress test on a correct store of our own that yields
/// around every call (forced releases inline).
#[test]
fn the_deleter_stress_accepts_a_yielding_wrapper() {
    // Big enough that the scenario's never-confirmed ids (multiples of 50)
    // cannot all be closed by its closers first: see
    // `the_deleter_stress_accepts_small_sizes_on_memory_store`.
    let sizes = StressSizes {
        routers: 6,
        sessions_per_router: 500,
        creators: 2,
        rounds: 1,
    };
    stress(Yielding, sizes, ForcedReleases::Inline).unwrap();
}

/// The deleter stress test on a correct store of our own whose calls take
/// 1 ms each way on tokio's clock (forced releases through a small queue).
#[test]
fn the_deleter_stress_accepts_a_sleeping_wrapper() {
    let sizes = StressSizes {
        routers: 6,
        sessions_per_router: 200,
        creators: 2,
        rounds: 1,
    };
    let releases = ForcedReleases::ReclaimQueue {
        capacity: 4,
        workers: 2,
    };
    stress(Sleeping, sizes, releases).unwrap();
}

/// `deleter_stress` documents no lower bound on `StressSizes` (all fields
/// public, "How big a stress run is"): a small run on the crate's own
/// `MemoryStore` must pass, not blame the store.
#[test]
fn the_deleter_stress_accepts_small_sizes_on_memory_store() {
    let sizes = StressSizes {
        routers: 4,
        sessions_per_router: 30,
        creators: 1,
        // Each round races; ten rounds make the outcome certain.
        rounds: 10,
    };
    stress(MemoryBackend, sizes, ForcedReleases::Inline).unwrap();
}

/// The checker over a yielding, reordering store through a whole deletion:
/// clean at every quiescent step.
#[test]
fn the_checker_accepts_a_yielding_store_through_a_deletion() {
    run_paused(within(HOUR, async {
        let store = Arc::new(Wrapped::new(Delay::Yield, Bug::None));
        let checker = InvariantChecker::new();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        checker.track_router(router);
        for id in 0..6 {
            let s = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
            checker.track(&s);
        }
        checker.assert(&*store).await;
        let closed = store
            .close(SessionId::new(3), CloseReason::ClientClosed)
            .await;
        assert!(closed.unwrap().won());
        checker.assert(&*store).await;
        let snapshot = store.fence(router).await.unwrap();
        assert_eq!(snapshot.sessions.len(), 5);
        checker.assert(&*store).await;
        let notifier =
            ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::EvenIds));
        let deleter = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(1))
            .retries(1)
            .build(Arc::clone(&store), notifier)
            .unwrap();
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert!(report.resumed);
        assert_eq!(report.sessions, 5);
        checker.assert(&*store).await;
        // A new life of the router, the same ids.
        let next = store.register_router(router).await.unwrap();
        assert!(next > incarnation);
        for id in 0..3 {
            store
                .create(NewSession::new(SessionId::new(id), router, next))
                .await
                .unwrap();
        }
        checker.assert(&*store).await;
    }));
}

// ---------------------------------------------------------------------------
// (2) False negatives: each store broken in one documented way is caught.

/// Runs the model test on `B` (2,000 cases): it must fail, and its message
/// must name the backend.
fn model_test_fails<B: Backend + Default + 'static>(name: &str, bug: &str) {
    let failure = on_thread(Duration::from_secs(80), || {
        store_follows_the_model::<B>(2_000);
    });
    let message = failure.expect_err(&format!("a store {bug} passed the suite"));
    assert!(message.contains(name), "{message}");
}

/// `create` must refuse a stale incarnation (I2: "no session can be created
/// on it or on any older incarnation of it").
#[test]
fn the_model_test_catches_a_store_that_accepts_stale_incarnations() {
    model_test_fails::<StaleCreates>("StaleCreates", "creating on stale incarnations");
}

/// `close_exact` must leave a later session reusing the id alone (I9).
#[test]
fn the_model_test_catches_a_store_whose_close_exact_closes_by_id() {
    model_test_fails::<ClosesById>("ClosesById", "closing by id in close_exact");
}

/// `fence` must snapshot every session of the router.
#[test]
fn the_model_test_catches_a_store_whose_fence_snapshot_is_partial() {
    model_test_fails::<PartialFences>("PartialFences", "with partial fence snapshots");
}

/// `fence` must list each session once: a deletion counts (and notifies)
/// what the snapshot lists.
#[test]
fn the_model_test_catches_a_store_whose_fence_snapshot_lists_a_session_twice() {
    model_test_fails::<DuplicateFences>("DuplicateFences", "listing a session twice");
}

/// A store that keeps listing a closed (removed) session is caught by the
/// checker's I7 look: the listing disagrees with `count` and `get`.
#[test]
fn the_checker_catches_a_store_listing_closed_sessions() {
    run_paused(within(HOUR, async {
        let store = Wrapped::new(Delay::None, Bug::ListClosed);
        let checker = InvariantChecker::new();
        let router = RouterId::new(2);
        let incarnation = store.register_router(router).await.unwrap();
        for id in 1..=2 {
            store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
        }
        checker.assert(&store).await;
        let closed = store
            .close(SessionId::new(1), CloseReason::ClientClosed)
            .await;
        assert!(closed.unwrap().won());
        let report = checker.check(&store).await;
        assert!(
            report.violations.iter().any(|v| matches!(
                v,
                Violation::CountMismatch { router: r, count: 1, listed: 2 } if *r == router
            )),
            "{report}"
        );
        assert!(
            report.violations.iter().any(|v| matches!(
                v,
                Violation::IndexedButMissing { session, .. } if *session == SessionId::new(1)
            )),
            "{report}"
        );
    }));
}

/// The checker promises to find "I1 zombies: sessions stored for a router
/// that is unknown, deleted or in another incarnation". A store that lists
/// (and counts, and `get`s) a session under a router it reports `Deleted`
/// holds a zombie, whatever its own audit says.
#[test]
fn the_checker_catches_a_session_listed_under_a_deleted_router() {
    run_paused(within(HOUR, async {
        let store = Wrapped::new(Delay::None, Bug::KeepAfterFinish);
        let checker = InvariantChecker::new();
        let router = RouterId::new(3);
        let incarnation = store.register_router(router).await.unwrap();
        store
            .create(NewSession::new(SessionId::new(1), router, incarnation))
            .await
            .unwrap();
        checker.assert(&store).await;
        let _ = store.fence(router).await.unwrap();
        checker.assert(&store).await;
        store.finish(router, incarnation).await.unwrap();
        assert_eq!(
            store.router_status(router).await.unwrap(),
            RouterStatus::Deleted(incarnation)
        );
        assert_eq!(store.count(router).await.unwrap(), 1);
        let report = checker.check(&store).await;
        assert!(
            !report.is_clean(),
            "a zombie of a deleted router passed: {report}"
        );
    }));
}

// ---------------------------------------------------------------------------
// (3) The checker on states reached by legal racing operations.

/// Many tasks create and close sessions on a multi-thread runtime while the
/// router is deleted; once everything settled, the checker (which saw the
/// router live before) finds nothing wrong, and every handle is closed.
#[test]
fn the_checker_is_clean_after_creates_and_closes_race_a_deletion() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let store = Arc::new(MemoryStore::new());
            let checker = InvariantChecker::new();
            let router = RouterId::new(7);
            let incarnation = store.register_router(router).await.unwrap();
            checker.track_router(router);
            checker.assert(&*store).await;
            let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
            let deleter = RouterDeleter::builder()
                .confirm_timeout(Duration::from_millis(200))
                .retries(1)
                .build(Arc::clone(&store), notifier)
                .unwrap();
            let mut tasks = Vec::new();
            for t in 0..4u64 {
                let store = Arc::clone(&store);
                tasks.push(tokio::spawn(async move {
                    let mut made = Vec::new();
                    for i in 0..100 {
                        let id = SessionId::new(t * 1_000 + i);
                        if let Ok(s) = store.create(NewSession::new(id, router, incarnation)).await
                        {
                            made.push(s);
                        }
                        if i % 3 == 0 {
                            let _ = store.close(id, CloseReason::ClientClosed).await;
                        }
                        tokio::task::yield_now().await;
                    }
                    made
                }));
            }
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            let report = deleter.delete(router).await.unwrap();
            assert!(report.report().is_some());
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.unwrap());
            }
            for s in &all {
                checker.track(s);
            }
            checker.assert(&*store).await;
            assert!(all.iter().all(Session::is_closed));
            assert_eq!(store.count(router).await.unwrap(), 0);
        })
        .await
        .expect("the race settles within 30 s");
    });
}

// ---------------------------------------------------------------------------
// (4) The scripted fakes, misused.

/// A `Script::calls` list shorter than the calls made: the rest get `then`,
/// and the log records each behaviour in order. A `Never` is bounded by the
/// deleter's notify timeout.
#[test]
fn an_exhausted_call_script_falls_back_to_then() {
    run_paused(within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        for id in 0..3 {
            store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
        }
        let script = Script::calls([Notify::Error, Notify::Never], Notify::confirm_all());
        let notifier = ScriptedNotifier::new(Arc::clone(&store), script);
        let deleter = RouterDeleter::builder()
            .notify_timeout(Duration::from_secs(1))
            .confirm_timeout(Duration::from_secs(1))
            .retries(4)
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .unwrap();
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(report.sessions, 3);
        let calls = notifier.calls();
        assert!(calls.len() >= 3, "{calls:?}");
        assert_eq!(calls[0].behaviour, Notify::Error);
        assert_eq!(calls[1].behaviour, Notify::Never);
        assert!(
            calls[2..]
                .iter()
                .all(|c| c.behaviour == Notify::confirm_all())
        );
        assert_eq!(report.confirmed + report.forced, 3, "{report:?}");
        assert_eq!(store.count(router).await.unwrap(), 0);
    }));
}

/// A `Later` confirmation that lands after its deletion ended (the session
/// was force-closed), once the id was reused in the router's next life,
/// must not close the new session (I9: identity, not id). The fakes'
/// `confirm` acts by key.
#[test]
fn a_late_scripted_confirmation_never_closes_a_reused_id() {
    run_paused(within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let id = SessionId::new(4);
        let first = store.register_router(router).await.unwrap();
        let old = store
            .create(NewSession::new(id, router, first))
            .await
            .unwrap();
        let notifier = ScriptedNotifier::always(
            Arc::clone(&store),
            Notify::Later {
                delay: Duration::from_secs(600),
                confirm: Subset::All,
            },
        );
        let deleter = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(1))
            .retries(0)
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .unwrap();
        let report = report_within(Duration::from_secs(300), deleter.delete(router)).await;
        assert_eq!(report.forced, 1, "{report:?}");
        assert!(old.is_closed());
        let second = store.register_router(router).await.unwrap();
        let new = store
            .create(NewSession::new(id, router, second))
            .await
            .unwrap();
        // Let the paused clock run past the late confirmations.
        tokio::time::sleep(Duration::from_secs(1_200)).await;
        assert!(notifier.call_count() >= 1);
        assert!(!new.is_closed(), "a late confirmation closed the reused id");
        assert!(store.get(id).await.unwrap().is_some());
    }));
}

// ---------------------------------------------------------------------------
// (5) Strategies: only valid input, as documented.

/// `ops` draws ids inside its `Space`, only the kinds with a weight, and a
/// reconnect report sorted without duplicates.
#[test]
fn ops_draw_only_weighted_kinds_inside_their_space() {
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let weights = OpWeights::none()
        .with(OpKind::Create, 3)
        .with(OpKind::Reconnect, 1)
        .with(OpKind::Confirm, 1);
    runner
        .run(&ops(Space::new(2, 5), &weights, 1..30), |ops| {
            for op in &ops {
                match op {
                    Op::Create {
                        session, router, ..
                    } => {
                        prop_assert!(session.get() < 5 && router.get() < 2, "{op:?}");
                    }
                    Op::Confirm { session, .. } => prop_assert!(session.get() < 5, "{op:?}"),
                    Op::Reconnect { router, report, .. } => {
                        prop_assert!(router.get() < 2, "{op:?}");
                        prop_assert!(report.windows(2).all(|w| w[0] < w[1]), "{op:?}");
                        prop_assert!(report.iter().all(|s| s.get() < 5), "{op:?}");
                    }
                    other => prop_assert!(false, "unweighted kind drawn: {other:?}"),
                }
            }
            let mut model = ModelState::default();
            for op in &ops {
                model.apply(op);
            }
            Ok(())
        })
        .unwrap();
}

/// The model never stores more sessions than the space has ids, whatever
/// the sequence (every kind).
#[test]
fn the_model_never_stores_more_sessions_than_ids() {
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &ops(Space::new(3, 4), &OpWeights::everything(), 1..60),
            |ops| {
                let mut model = ModelState::default();
                for op in &ops {
                    model.apply(op);
                    prop_assert!(model.stored_count() <= 4, "after {op:?}");
                    for (router, _) in model.routers() {
                        prop_assert!(router.get() < 3);
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------
// (6) ObservedRouter: I1 after a deletion, on legal runs.

/// I1 asks that each session of the deleted router be `Closed`; a session
/// the controller's liveness monitor reaped (`LivenessTimeout`) before the
/// deletion is closed, released once, and gone from the store.
#[test]
fn observed_router_accepts_a_session_reaped_before_the_deletion() {
    run_paused(within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let observed = ObservedRouter::fill(&*store, router, 0, 3).await;
        let reaped = store
            .close(SessionId::new(1), CloseReason::LivenessTimeout)
            .await
            .unwrap();
        assert!(reaped.won());
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(report.sessions, 2);
        observed.assert_deleted(&*store).await;
    }));
}

/// Once the deletion returned, the id of a deleted session is free: a new
/// session with that id on another router is not "one of its sessions"
/// (I9: identity, not id), so I1 of the deleted router still holds.
#[test]
fn observed_router_is_not_fooled_by_a_reused_id_on_another_router() {
    run_paused(within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let observed = ObservedRouter::fill(&*store, router, 0, 3).await;
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(report.confirmed, 3);
        let other = RouterId::new(2);
        let incarnation = store.register_router(other).await.unwrap();
        let reused = store
            .create(NewSession::new(SessionId::new(0), other, incarnation))
            .await
            .unwrap();
        assert!(!reused.is_closed());
        observed.assert_deleted(&*store).await;
    }));
}
