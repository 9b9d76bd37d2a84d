//! The test kit (feature `test-util`) as a controller engineer uses it to
//! test their own store (a review of stop 33; each test failed before):
//! the invariant checker told sessions apart by id at a fence (F1) and
//! passed a session listed under another router (F7); `ObservedRouter::fill`
//! near `u64::MAX` made fewer sessions than asked (F2); the model test hung
//! on a store call that never ends (F3) and forced confirmed sessions of a
//! slow store whatever its `STORE_TIME` (F4); `deleter_stress` with no
//! creator failed (F5); `ops` panicked on big weights (F6).

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use session_lifecycle::test_util::conformance::{
    Backend, ForcedReleases, MemoryBackend, StressSizes, deleter_stress, store_follows_the_model,
};
use session_lifecycle::test_util::model::{OpKind, OpWeights, Space};
use session_lifecycle::test_util::strategy::ops;
use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, ScriptedNotifier, Violation, report_within,
    run_paused, within,
};
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, RouterDeleter, RouterId, Session, SessionId,
    SessionKey, SessionStore, session::CloseOutcome, store::AuditReport, store::BackendError,
    store::CreateError, store::CreateErrorKind, store::Fault, store::FenceError,
    store::FenceSnapshot, store::FinishError, store::FinishReport, store::RegisterError,
    store::Repair, store::RouterCensus, store::RouterError, store::RouterStatus,
    store::SessionError,
};

// ---------------------------------------------------------------------------
// Helpers

/// Runs `f` on a thread of its own: `Ok` if it returned, `Err(message)` if
/// it panicked, `Err("HUNG")` if it did not end within `limit` (the thread
/// is left behind).
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
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(_) => Err("HUNG".to_owned()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// `audit` never resolves (a lock leaked in the user's store).
    AuditHangs,
    /// `sessions(router)` also lists the sessions of router 0 when asked
    /// for another router, and `count` counts them: an index that files
    /// router 0's sessions under every router.
    MisfiledUnderEveryRouter,
    /// `create` lets one create through a fence (once per store).
    OneMoreCreateAfterFence,
    /// `sessions` and `count` both leave out the highest id of a router
    /// holding two or more sessions (consistent with each other).
    OmitOne,
}

/// A user's store around a `MemoryStore`: optionally sleeps `delay` of
/// tokio's clock before and after every call; keeps the trait's default
/// `unlink_closed`.
struct Wrapped {
    inner: MemoryStore,
    delay: Duration,
    bug: Bug,
    leaked: AtomicBool,
}

impl Wrapped {
    fn new(delay: Duration, bug: Bug) -> Self {
        Self {
            inner: MemoryStore::new(),
            delay,
            bug,
            leaked: AtomicBool::new(false),
        }
    }
    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
    async fn misfiled(&self, router: RouterId) -> Vec<Session> {
        if self.bug == Bug::MisfiledUnderEveryRouter && router != RouterId::new(0) {
            self.inner
                .sessions(RouterId::new(0))
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
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
        let mut r = self.inner.create(spec).await;
        if self.bug == Bug::OneMoreCreateAfterFence
            && let Err(err) = &r
            && matches!(err.kind(), CreateErrorKind::Fenced { .. })
            && !self.leaked.swap(true, Ordering::SeqCst)
        {
            let spec = r.unwrap_err().into_spec();
            self.inner.inject_fault(Fault::SkipFence);
            r = self.inner.create(spec).await;
            self.inner.clear_faults();
        }
        self.pause().await;
        r
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        self.pause().await;
        let r = self.inner.get(id).await;
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
        let r = self.inner.close_exact(key, reason).await;
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
        let mut r = self.inner.sessions(router).await;
        if let Ok(listed) = &mut r {
            listed.extend(self.misfiled(router).await);
            if self.bug == Bug::OmitOne && listed.len() >= 2 {
                let max = listed.iter().map(Session::id).max().unwrap();
                listed.retain(|s| s.id() != max);
            }
        }
        self.pause().await;
        r
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.pause().await;
        let extra = self.misfiled(router).await.len();
        let r = self.inner.count(router).await.map(|n| n + extra).map(|n| {
            if self.bug == Bug::OmitOne && n >= 2 {
                n - 1
            } else {
                n
            }
        });
        self.pause().await;
        r
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.pause().await;
        let r = self.inner.fence(router).await;
        self.pause().await;
        r
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        self.pause().await;
        let r = self.inner.fence_incarnation(router, incarnation).await;
        self.pause().await;
        r
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.pause().await;
        let r = self.inner.finish(router, incarnation).await;
        self.pause().await;
        r
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        if self.bug == Bug::AuditHangs {
            std::future::pending::<()>().await;
        }
        self.pause().await;
        let r = self.inner.audit().await;
        self.pause().await;
        r
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.pause().await;
        let r = self.inner.census().await;
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

// A correct store relying on the trait's default `unlink_closed`.
backend!(DefaultUnlink, Duration::ZERO, Bug::None, Duration::ZERO);
// A correct store whose every call takes 6 s of the paused clock (3 s
// before, 3 s after: a slow remote store, e.g. etcd during a leader
// election), STORE_TIME an hour, as `Backend::STORE_TIME` tells.
backend!(
    SixSecondCalls,
    Duration::from_millis(3_000),
    Bug::None,
    Duration::from_secs(3_600)
);
// A store whose `audit` never resolves.
backend!(
    HangingAudit,
    Duration::ZERO,
    Bug::AuditHangs,
    Duration::ZERO
);
backend!(
    LeakyFence,
    Duration::ZERO,
    Bug::OneMoreCreateAfterFence,
    Duration::ZERO
);
backend!(OmitsOne, Duration::ZERO, Bug::OmitOne, Duration::ZERO);

// ---------------------------------------------------------------------------
// F1: the checker's fence check compares ids, not sessions (I2 / I9).

/// `InvariantChecker` claims to find (I2) "sessions of a fenced incarnation
/// that were not in the store at the first check that saw the fence
/// (created after it)". After the fence (and a check seeing it), the
/// pre-fence session `s1` is closed and removed; then a store that lets
/// creates through a fence (`Fault::SkipFence`) admits a NEW session
/// reusing id 1. That new session was not in the store at the first check
/// that saw the fence: it must be reported.
#[test]
fn f1_checker_reports_a_session_created_after_the_fence_that_reuses_an_id() {
    run_paused(within(HOUR, async {
        let store = MemoryStore::new();
        let checker = InvariantChecker::new();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let id = SessionId::new(1);
        let before = store
            .create(NewSession::new(id, router, incarnation))
            .await
            .unwrap();
        checker.assert(&store).await;
        let _ = store.fence(router).await.unwrap();
        checker.assert(&store).await; // the first check that sees the fence
        assert!(
            store
                .close(id, CloseReason::ClientClosed)
                .await
                .unwrap()
                .won()
        );
        checker.assert(&store).await;

        store.inject_fault(Fault::SkipFence);
        let after = store
            .create(NewSession::new(id, router, incarnation))
            .await
            .expect("the broken store admits a create after the fence");
        assert!(!Session::ptr_eq(&before, &after));
        assert_ne!(before.key(), after.key());

        let report = checker.check(&store).await;
        assert!(
            report.violations.iter().any(
                |v| matches!(v, Violation::CreatedAfterFence { session, .. } if *session == id)
            ),
            "a session created after the fence (reusing a pre-fence id) was not reported: {report}"
        );
    }));
}

// ---------------------------------------------------------------------------
// F2: ObservedRouter::fill near u64::MAX creates fewer sessions than asked.

/// `fill` "creates `count` sessions on it with ids from `first_id`". Session
/// ids are any u64 (they arrive off the wire). From `u64::MAX - 1`, two
/// sessions fit (`u64::MAX - 1`, `u64::MAX`).
#[test]
fn f2_observed_router_fill_creates_count_sessions_up_to_u64_max() {
    run_paused(within(HOUR, async {
        let store = MemoryStore::new();

        let observed = ObservedRouter::<()>::fill(&store, RouterId::new(1), u64::MAX - 1, 2).await;
        assert_eq!(
            observed.sessions.len(),
            2,
            "fill(first_id = u64::MAX - 1, count = 2) created {:?}",
            observed
                .sessions
                .iter()
                .map(Session::id)
                .collect::<Vec<_>>()
        );
    }));
}

/// Same with first_id = u64::MAX, count = 1: nothing is created, and
/// `assert_deleted` then passes vacuously on an empty router.
#[test]
fn f2b_observed_router_fill_at_u64_max_creates_the_session() {
    run_paused(within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let observed = ObservedRouter::<()>::fill(&*store, router, u64::MAX, 1).await;
        assert_eq!(observed.sessions.len(), 1, "no session was created");
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(report.sessions, 1);
        observed.assert_deleted(&*store).await;
    }));
}

// ---------------------------------------------------------------------------
// F3: the model test hangs on a store call that never resolves.

/// The kit's stance is that a hang is a failure ("a broken run shows up as
/// a failure naming the bound, not as a hung test"). A user's store whose
/// `audit` never resolves (a leaked lock) makes `store_follows_the_model`
/// hang forever on its paused runtime instead of failing.
#[test]
fn f3_the_model_test_fails_rather_than_hangs_on_a_store_that_never_answers() {
    let result = on_thread(Duration::from_secs(30), || {
        store_follows_the_model::<HangingAudit>(4);
    });
    assert!(
        result.as_ref().err().map(String::as_str) != Some("HUNG"),
        "store_follows_the_model hung (30 s real time) instead of failing"
    );
    assert!(result.is_err(), "a store that never answers passed");
}

// ---------------------------------------------------------------------------
// F4: the model test's deleter deadlines ignore Backend::STORE_TIME.

/// `Backend::STORE_TIME`: "How long the store's own calls may add to a
/// deletion on top of the deleter's timers ... for a store on a server,
/// its round trips". A correct store whose calls take 6 s each (paused
/// clock, free), with STORE_TIME an hour, must pass. It fails: the suite's
/// deleter keeps the default 5 s notify timeout, so the scripted router's
/// confirmations (each a 6 s `close_exact`) are cut off and the even ids
/// it confirms are forced, against the suite's own expectation.
#[test]
fn f4_a_slow_correct_store_with_a_matching_store_time_follows_the_model() {
    on_thread(Duration::from_secs(300), || {
        store_follows_the_model::<SixSecondCalls>(64);
    })
    .unwrap();
}

// ---------------------------------------------------------------------------
// F5: deleter_stress with zero creators.

/// `StressSizes` documents no lower bound ("How big a stress run is"),
/// `deleter_stress` handles `routers: 0` ("nothing to run on"). With no
/// creator task, it waits for 200 refused creates that nobody makes and
/// fails after 60 s, blaming the store.
#[test]
fn f5_deleter_stress_accepts_zero_creators_on_memory_store() {
    let sizes = StressSizes {
        routers: 4,
        sessions_per_router: 100,
        creators: 0,
        rounds: 1,
    };
    let result = on_thread(Duration::from_secs(90), move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(deleter_stress(
            &MemoryBackend,
            sizes,
            ForcedReleases::Inline,
        ));
    });
    result.unwrap();
}

// ---------------------------------------------------------------------------
// F6: `op`/`ops` panic on large weights (no `# Panics` documented).

/// `OpWeights::with` takes any u32 ("relative to the others"); the module
/// docs say every kit function that may panic says so under `# Panics`.
/// `ops` has no such section, yet panics for weights summing past u32::MAX.
#[test]
fn f6_ops_accepts_any_u32_weights() {
    let weights = OpWeights::none()
        .with(OpKind::Create, u32::MAX)
        .with(OpKind::Register, 1);
    let result = std::panic::catch_unwind(|| {
        let _strategy = ops(Space::default(), &weights, 1..10);
    });
    assert!(result.is_ok(), "ops() panicked on u32 weights");
}

// ---------------------------------------------------------------------------
// F7: a session listed (and counted) under the wrong router passes the
// checker's I7 look.

/// The checker checks (I7) "the router index against the session map ...
/// each router's count against its listing, and each listed session
/// against `get`". A store whose index files router 0's session under
/// router 1 as well (listing and count agree with each other) holds a
/// session in router 1's index that the session map says belongs to
/// router 0. The checker reports a refreshed handle in that position as
/// `IndexedButMissing`, but not the very handle.
#[test]
fn f7_checker_reports_a_session_listed_under_another_router() {
    run_paused(within(HOUR, async {
        let store = Wrapped::new(Duration::ZERO, Bug::MisfiledUnderEveryRouter);
        let checker = InvariantChecker::new();
        let (r0, r1) = (RouterId::new(0), RouterId::new(1));
        // Router 1 first: its incarnation is not above router 0's, so the
        // misfiled session does not look like an older life of router 1.
        let _ = store.register_router(r1).await.unwrap();
        let i0 = store.register_router(r0).await.unwrap();
        let s = store
            .create(NewSession::new(SessionId::new(5), r0, i0))
            .await
            .unwrap();
        // Router 1 lists and counts router 0's session.
        let listed = store.sessions(r1).await.unwrap();
        assert!(listed.iter().any(|l| Session::ptr_eq(l, &s)));
        assert_eq!(store.count(r1).await.unwrap(), 1);
        let report = checker.check(&store).await;
        assert!(
            !report.is_clean(),
            "router-1 lists and counts router-0's session, yet the check is clean: {report}"
        );
    }));
}
