//! Adversarial tests of the `Reconciler`: odd reports, clients and
//! deletions racing a reconciliation, adopters that misbehave or re-enter,
//! grace periods racing deletions, reconnects and shutdown. Paused time
//! throughout; every wait is bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use session_lifecycle::reconcile::{
    Adopter, Adoption, ReconcileError, RejectReason, ReportedSession, adopt_fn,
};
use session_lifecycle::session::CloseOutcome;
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, CreateErrorKind, FenceError, FenceSnapshot,
    FinishError, FinishReport, RegisterError, Repair, RouterCensus, RouterError, RouterStatus,
    SessionError,
};
use session_lifecycle::test_util::{
    InvariantChecker, Notify, ScriptedNotifier, router_lost, within,
};
use session_lifecycle::{
    CloseReason, EventBus, Incarnation, MemoryStore, NewSession, ReclaimQueue, Reconciler,
    RouterDeleter, RouterId, Session, SessionId, SessionKey, SessionStore,
};
use tokio::sync::Notify as Signal;
use tokio::time::Duration;

const R: RouterId = RouterId::new(1);
const OTHER: RouterId = RouterId::new(2);
const LIMIT: Duration = Duration::from_secs(3600);

fn ids(range: impl IntoIterator<Item = u64>) -> Vec<SessionId> {
    range.into_iter().map(SessionId::new).collect()
}

/// Counts the releases of each session's resource, by session key.
#[derive(Default, Clone)]
struct Releases(Arc<parking_lot::Mutex<HashMap<SessionKey, usize>>>);

impl Releases {
    /// Attaches a queued (not inline) resource to `session` that counts its
    /// release.
    fn attach(&self, session: &Session) {
        let key = session.key();
        self.0.lock().insert(key, 0);
        let counts = Arc::clone(&self.0);
        session
            .attach(move |_: CloseReason| {
                *counts.lock().entry(key).or_insert(0) += 1;
            })
            .unwrap_or_else(|_| panic!("attach to an open session"));
    }

    fn of(&self, session: &Session) -> usize {
        self.0.lock().get(&session.key()).copied().unwrap_or(0)
    }

    /// Every closed session released once, every open one never.
    fn assert_exact(&self, sessions: &[Session]) {
        for session in sessions {
            let expected = usize::from(session.is_closed());
            assert_eq!(
                self.of(session),
                expected,
                "{:?} ({:?}) released {} times",
                session.key(),
                session.state(),
                self.of(session)
            );
        }
    }
}

/// Creates sessions `range` on `router` in `incarnation`, each with a
/// counted resource.
async fn fill(
    store: &MemoryStore,
    router: RouterId,
    incarnation: Incarnation,
    range: impl IntoIterator<Item = u64>,
    releases: &Releases,
) -> Vec<Session> {
    let mut sessions = Vec::new();
    for id in range {
        let session = store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
        releases.attach(&session);
        sessions.push(session);
    }
    sessions
}

fn deleter(
    store: &Arc<MemoryStore>,
) -> RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>> {
    RouterDeleter::new(
        Arc::clone(store),
        ScriptedNotifier::always(Arc::clone(store), Notify::confirm_all()),
    )
}

/// A report with duplicates, ids of another router and an unknown id:
/// duplicates count once, the other router's sessions are dropped and never
/// touched, only the missing sessions of this router are closed, each
/// released once.
#[tokio::test(start_paused = true)]
async fn duplicates_and_other_routers_ids_are_dropped_and_left_alone() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let mine = store.register_router(R).await.unwrap();
    let theirs = store.register_router(OTHER).await.unwrap();
    let a = fill(&store, R, mine, 1..=5, &releases).await;
    let b = fill(&store, OTHER, theirs, 100..=102, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .chunk_size(2)
        .build(Arc::clone(&store))
        .unwrap();

    let report = [1, 1, 2, 2, 100, 101, 100, 50, 3, 3];
    let report = within(LIMIT, reconciler.reconcile(R, mine, ids(report)))
        .await
        .unwrap();

    assert_eq!(report.summary.reported, 6, "{report:?}");
    assert_eq!(report.summary.foreign, 2, "{report:?}");
    assert_eq!(report.drop, ids([50, 100, 101]));
    assert_eq!(report.closed, ids([4, 5]));
    assert!(
        b.iter().all(|s| !s.is_closed()),
        "another router's sessions"
    );
    assert_eq!(store.count(OTHER).await.unwrap(), 3);
    assert_eq!(store.count(R).await.unwrap(), 3);
    releases.assert_exact(&a);
    releases.assert_exact(&b);
    checker.assert(&*store).await;
}

/// A report naming an incarnation that is not the live one (the old life
/// after a delete and re-register, or a forged future one) changes nothing:
/// the new life's sessions, which reuse the old ids, stay open and its
/// grace period keeps running.
#[tokio::test(start_paused = true)]
async fn stale_or_future_incarnation_changes_nothing_not_even_the_grace() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let old = store.register_router(R).await.unwrap();
    let first = fill(&store, R, old, 1..=3, &releases).await;
    within(LIMIT, deleter(&store).delete(R)).await.unwrap();
    let new = store.register_router(R).await.unwrap();
    assert_ne!(old, new);
    let second = fill(&store, R, new, 1..=3, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .build(Arc::clone(&store))
        .unwrap();
    let deadline = reconciler.router_disconnected(R).await.unwrap();

    let stale = reconciler.reconcile(R, old, ids([])).await;
    assert!(
        matches!(stale, Err(ReconcileError::StaleIncarnation { .. })),
        "{stale:?}"
    );
    let future = Incarnation::new(new.get() + 7);
    let forged = reconciler.reconcile(R, future, ids([])).await;
    assert!(
        matches!(forged, Err(ReconcileError::StaleIncarnation { .. })),
        "{forged:?}"
    );
    let adopt_all = adopt_fn(|_, _: ReportedSession| Adoption::accept(()));
    let stale_adopt = reconciler
        .reconcile_adopting(
            R,
            old,
            [ReportedSession::new(SessionId::new(9))],
            &adopt_all,
        )
        .await;
    assert!(
        matches!(stale_adopt, Err(ReconcileError::StaleIncarnation { .. })),
        "{stale_adopt:?}"
    );
    assert!(store.get(SessionId::new(9)).await.unwrap().is_none());
    assert_eq!(reconciler.grace_deadline(R), Some(deadline), "grace kept");
    assert!(second.iter().all(|s| !s.is_closed()));
    assert!(first.iter().all(Session::is_closed));
    releases.assert_exact(&first);
    releases.assert_exact(&second);

    // The live one cancels it.
    let report = reconciler.reconcile(R, new, ids(1..=3)).await.unwrap();
    assert!(report.summary.grace_cancelled);
    assert_eq!(reconciler.in_grace(), 0);
    checker.assert(&*store).await;
}

/// A user's store that can park a caller right after `router_status` or
/// right after listing a router's sessions, so a client acts meanwhile,
/// and fail either read a number of times (a backend losing its leader
/// for a moment).
#[derive(Default)]
struct Gated {
    inner: MemoryStore,
    on_status: AtomicBool,
    after_listing: AtomicBool,
    arrived: Signal,
    release: Signal,
    failed_statuses: AtomicUsize,
    failed_listings: AtomicUsize,
}

impl Gated {
    async fn park(&self, gate: &AtomicBool) {
        if gate.swap(false, Ordering::SeqCst) {
            self.arrived.notify_one();
            self.release.notified().await;
        }
    }

    /// `Err` (a backend error) while `failures` is above zero, taking one.
    fn fail(failures: &AtomicUsize) -> Result<(), RouterError> {
        match failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(_) => Err(RouterError::Backend(BackendError::new(
                std::io::Error::other("leader lost"),
            ))),
            Err(_) => Ok(()),
        }
    }
}

impl SessionStore for Gated {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        Self::fail(&self.failed_statuses)?;
        let status = self.inner.router_status(router).await;
        self.park(&self.on_status).await;
        status
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        self.inner.get(id).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close(id, reason).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(key, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, SessionError> {
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session>, RouterError> {
        Self::fail(&self.failed_listings)?;
        let listed = self.inner.sessions(router).await;
        self.park(&self.after_listing).await;
        listed
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence_incarnation(router, incarnation).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.inner.finish(router, incarnation).await
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.inner.audit().await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.inner.census().await
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.inner.repair(findings).await
    }
}

/// I9: while a reconciliation runs (after it listed the router), a client
/// closes sessions 3 and 4 and creates new sessions reusing both ids. The
/// reconciliation, which decided on the old sessions, must leave the new
/// ones open and stored, and release nothing twice.
#[tokio::test(start_paused = true)]
async fn ids_reused_while_a_reconcile_runs_are_never_touched() {
    let store = Arc::new(Gated::default());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let old = fill(&store.inner, R, incarnation, 1..=4, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .chunk_size(1)
        .reclaim_queue(ReclaimQueue::builder().build().unwrap())
        .build(Arc::clone(&store))
        .unwrap();

    store.after_listing.store(true, Ordering::SeqCst);
    let running = tokio::spawn({
        let reconciler = reconciler.clone();
        async move { reconciler.reconcile(R, incarnation, ids([1, 2])).await }
    });
    within(LIMIT, store.arrived.notified()).await;
    // The client: old 3 and 4 closed and gone, the ids reused at once.
    for id in [3, 4] {
        let _ = store
            .close(SessionId::new(id), CloseReason::ClientClosed)
            .await
            .unwrap();
    }
    let new = fill(&store.inner, R, incarnation, 3..=4, &releases).await;
    store.release.notify_one();
    let report = within(LIMIT, running).await.unwrap().unwrap();

    assert!(report.closed.is_empty(), "{report:?}");
    for session in &new {
        assert!(
            !session.is_closed(),
            "{:?} closed by an old decision",
            session.key()
        );
        let stored = store
            .get(session.id())
            .await
            .unwrap()
            .expect("still stored");
        assert!(Session::ptr_eq(&stored, session));
    }
    releases.assert_exact(&old);
    releases.assert_exact(&new);
    checker.assert(&*store).await;
}

/// `reconcile`'s documentation: "Sessions created after the call started,
/// at a later instant of tokio's clock, ... are never closed for missing
/// from the report." A client creates one while the call checks the
/// router (before it lists the router's sessions), a nanosecond later.
#[tokio::test(start_paused = true)]
async fn a_session_created_after_the_call_started_is_not_closed() {
    let store = Arc::new(Gated::default());
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let _held = fill(&store.inner, R, incarnation, 1..=2, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();

    store.on_status.store(true, Ordering::SeqCst);
    let running = tokio::spawn({
        let reconciler = reconciler.clone();
        async move { reconciler.reconcile(R, incarnation, ids([1, 2])).await }
    });
    within(LIMIT, store.arrived.notified()).await;
    tokio::time::advance(Duration::from_nanos(1)).await;
    let young = fill(&store.inner, R, incarnation, [9], &releases).await;
    store.release.notify_one();
    let report = within(LIMIT, running).await.unwrap().unwrap();

    assert!(
        !young[0].is_closed(),
        "created after the call started, closed: {report:?}"
    );
    assert!(report.closed.is_empty(), "{report:?}");
}

/// An adopter that re-enters the store and the reconciler while it
/// decides: a nested plain reconcile of the same router, a client create
/// taking the offered id, a disconnect, reads. No deadlock; the report
/// stays consistent; the invariants hold.
struct Reentrant {
    store: Arc<MemoryStore>,
    reconciler: Reconciler<MemoryStore>,
    incarnation: Incarnation,
}

impl Adopter<()> for Reentrant {
    type Data = ();

    async fn adopt(&self, router: RouterId, reported: ReportedSession) -> Adoption<()> {
        match reported.id.get() {
            10 => {
                let nested = self
                    .reconciler
                    .reconcile(router, self.incarnation, ids(1..=3))
                    .await;
                assert!(nested.is_ok(), "{nested:?}");
                Adoption::accept(())
            }
            11 => {
                let spec = NewSession::new(reported.id, router, self.incarnation);
                self.store.create(spec).await.unwrap();
                Adoption::accept(())
            }
            12 => {
                let _ = self.reconciler.router_disconnected(router).await.unwrap();
                let _ = self.store.sessions(router).await.unwrap();
                Adoption::accept(())
            }
            _ => Adoption::accept(()),
        }
    }

    fn adopted(&self, session: &Session) {
        // Re-enters the reconciler synchronously too.
        let _ = self.reconciler.in_grace();
        let _ = self.reconciler.grace_deadline(session.router());
    }
}

/// See [`Reentrant`].
#[tokio::test(start_paused = true)]
async fn an_adopter_reentering_the_store_and_the_reconciler_does_not_deadlock() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let held = fill(&store, R, incarnation, 1..=3, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .chunk_size(2)
        .adopt_concurrency(3)
        .build(Arc::clone(&store))
        .unwrap();
    let adopter = Reentrant {
        store: Arc::clone(&store),
        reconciler: reconciler.clone(),
        incarnation,
    };

    let reported = (1..=3)
        .chain(10..=14)
        .map(|id| ReportedSession::new(SessionId::new(id)));
    let report = within(
        LIMIT,
        reconciler.reconcile_adopting(R, incarnation, reported, &adopter),
    )
    .await
    .unwrap();

    assert_eq!(report.adopted, ids([10, 12, 13, 14]), "{report:?}");
    assert_eq!(report.drop, ids([11]));
    assert_eq!(
        report.rejected[0].reason,
        RejectReason::NotCreated(CreateErrorKind::DuplicateSession(SessionId::new(11)))
    );
    assert!(held.iter().all(|s| !s.is_closed()));
    assert_eq!(store.count(R).await.unwrap(), 8);
    assert_eq!(reconciler.in_grace(), 1, "the adopter's own disconnect");
    releases.assert_exact(&held);
    checker.assert(&*store).await;
}

/// An adopter that deletes the router while deciding on the third chunk
/// (I2): what it adopted before is the deletion's (closed, released once,
/// gone), nothing is created after the fence, and the call says NotLive.
/// Then the same with the router deleted and registered again: nothing
/// attaches to the new incarnation.
#[tokio::test(start_paused = true)]
async fn adoption_racing_the_routers_deletion_attaches_nothing() {
    for reregister in [false, true] {
        let store = Arc::new(MemoryStore::new());
        let checker = InvariantChecker::new();
        checker.track_router(R);
        let releases = Releases::default();
        let incarnation = store.register_router(R).await.unwrap();
        let reconciler = Reconciler::builder()
            .chunk_size(2)
            .adopt_concurrency(1)
            .build(Arc::clone(&store))
            .unwrap();
        let deleter = deleter(&store);
        let adopted = Arc::new(parking_lot::Mutex::new(Vec::<Session>::new()));
        let deletes = AtomicUsize::new(0);
        let adopter = AdoptThenDelete {
            store: Arc::clone(&store),
            deleter: deleter.clone(),
            releases: releases.clone(),
            adopted: Arc::clone(&adopted),
            deletes: &deletes,
            reregister,
        };

        let reported = (1..=10).map(|id| ReportedSession::new(SessionId::new(id)));
        let outcome = within(
            LIMIT,
            reconciler.reconcile_adopting(R, incarnation, reported, &adopter),
        )
        .await;

        if reregister {
            assert!(
                matches!(outcome, Err(ReconcileError::StaleIncarnation { .. })),
                "{outcome:?}"
            );
        } else {
            assert!(
                matches!(outcome, Err(ReconcileError::NotLive { .. })),
                "{outcome:?}"
            );
        }
        assert_eq!(deletes.load(Ordering::SeqCst), 1);
        let adopted = adopted.lock().clone();
        assert_eq!(adopted.len(), 4, "the first two chunks");
        for session in &adopted {
            assert_eq!(session.close_reason(), Some(CloseReason::RouterDeleted));
        }
        releases.assert_exact(&adopted);
        assert!(store.is_empty(), "nothing after the fence");
        checker.assert(&*store).await;
    }
}

/// Adopts everything; on session 5 deletes the router (and registers it
/// again if `reregister`) before accepting.
struct AdoptThenDelete<'a> {
    store: Arc<MemoryStore>,
    deleter: RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>>,
    releases: Releases,
    adopted: Arc<parking_lot::Mutex<Vec<Session>>>,
    deletes: &'a AtomicUsize,
    reregister: bool,
}

impl Adopter<()> for AdoptThenDelete<'_> {
    type Data = ();

    async fn adopt(&self, router: RouterId, reported: ReportedSession) -> Adoption<()> {
        if reported.id.get() == 5 {
            self.deletes.fetch_add(1, Ordering::SeqCst);
            self.deleter.delete(router).await.unwrap();
            if self.reregister {
                self.store.register_router(router).await.unwrap();
            }
        }
        Adoption::accept(())
    }

    fn adopted(&self, session: &Session) {
        self.releases.attach(session);
        self.adopted.lock().push(session.clone());
    }
}

/// Adopters that hang forever, panic, or accept the same id twice (it is
/// reported twice): every decision is bounded, each id is offered once,
/// and a later plain reconcile matches what was adopted.
#[tokio::test(start_paused = true)]
async fn hanging_and_panicking_adopters_are_bounded_on_a_big_report() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder()
        .chunk_size(64)
        .adopt_concurrency(8)
        .adopt_timeout(Duration::from_secs(1))
        .build(Arc::clone(&store))
        .unwrap();
    let offers = AtomicUsize::new(0);
    let adopter = Unruly { offers: &offers };

    // 2,000 ids, each reported twice.
    let reported = (1..=2_000)
        .chain(1..=2_000)
        .map(|id| ReportedSession::new(SessionId::new(id)));
    let started = tokio::time::Instant::now();
    let report = within(
        LIMIT,
        reconciler.reconcile_adopting(R, incarnation, reported, &adopter),
    )
    .await
    .unwrap();

    assert_eq!(offers.load(Ordering::SeqCst), 2_000, "each id offered once");
    assert_eq!(report.summary.reported, 2_000);
    let hung = (1..=2_000).filter(|id| id % 7 == 0).count();
    let panicked = (1..=2_000).filter(|id| id % 7 != 0 && id % 11 == 0).count();
    let timed_out = report
        .rejected
        .iter()
        .filter(|r| r.reason == RejectReason::TimedOut)
        .count();
    let panics = report
        .rejected
        .iter()
        .filter(|r| r.reason == RejectReason::Panicked)
        .count();
    assert_eq!((timed_out, panics), (hung, panicked));
    assert_eq!(report.adopted.len(), 2_000 - hung - panicked);
    assert_eq!(report.drop.len(), hung + panicked);
    // Bounded: 2000 / 8 rounds of at most one timeout each, at most.
    assert!(started.elapsed() <= Duration::from_secs(2_000 / 8 + 1));
    assert_eq!(store.count(R).await.unwrap(), report.adopted.len());

    tokio::time::advance(Duration::from_secs(1)).await;
    let again = reconciler
        .reconcile(R, incarnation, report.adopted.clone())
        .await
        .unwrap();
    assert_eq!(again.summary.matched, report.adopted.len());
    assert!(again.closed.is_empty() && again.drop.is_empty());
    checker.assert(&*store).await;
}

/// Hangs on multiples of 7, panics on multiples of 11, accepts the rest.
struct Unruly<'a> {
    offers: &'a AtomicUsize,
}

impl Adopter<()> for Unruly<'_> {
    type Data = ();

    async fn adopt(&self, _router: RouterId, reported: ReportedSession) -> Adoption<()> {
        self.offers.fetch_add(1, Ordering::SeqCst);
        let id = reported.id.get();
        if id % 7 == 0 {
            std::future::pending::<()>().await;
        }
        assert!(id % 11 != 0, "adopter panics on {id}");
        Adoption::accept(())
    }
}

/// A grace period expiring chunk by chunk (resources through a reclaim
/// queue) while the router's deletion starts: once `delete` returns, I1
/// holds: every session closed and gone, each resource released exactly
/// once.
#[tokio::test(start_paused = true)]
async fn a_grace_expiry_racing_the_deletion_releases_everything_once() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    checker.track_router(R);
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let sessions = fill(&store, R, incarnation, 1..=40, &releases).await;
    let bus = EventBus::new(1_024);
    let mut events = bus.subscribe();
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .chunk_size(4)
        .events(bus)
        .reclaim_queue(ReclaimQueue::builder().build().unwrap())
        .build(Arc::clone(&store))
        .unwrap();
    let deleter = deleter(&store);

    reconciler.router_disconnected(R).await.unwrap();
    // The expiry closes its first chunk...
    within(LIMIT, sessions[0].closed()).await;
    // ...and the deletion starts meanwhile.
    within(LIMIT, deleter.delete(R)).await.unwrap();

    assert!(store.is_empty());
    for session in &sessions {
        assert!(session.is_closed(), "{:?}", session.key());
    }
    releases.assert_exact(&sessions);
    let lost = sessions
        .iter()
        .filter(|s| s.close_reason() == Some(CloseReason::RouterLost))
        .count();
    assert!((4..40).contains(&lost), "{lost} lost to the expiry");
    let announced = within(LIMIT, router_lost(&mut events, R)).await;
    assert_eq!(announced, lost, "RouterLost counts the sessions it closed");
    within(LIMIT, reconciler.shutdown()).await;
    assert_eq!(reconciler.in_grace(), 0);
    checker.assert(&*store).await;
}

/// A plain reconcile closing missing sessions chunk by chunk while the
/// router's deletion starts: the call stops with NotLive, and once
/// `delete` returns every session is closed and gone, each resource
/// released once.
#[tokio::test(start_paused = true)]
async fn a_reconcile_racing_the_deletion_releases_everything_once() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    checker.track_router(R);
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let sessions = fill(&store, R, incarnation, 1..=30, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .chunk_size(3)
        .reclaim_queue(ReclaimQueue::builder().build().unwrap())
        .build(Arc::clone(&store))
        .unwrap();
    let deleter = deleter(&store);

    let running = tokio::spawn({
        let reconciler = reconciler.clone();
        async move { reconciler.reconcile(R, incarnation, ids([])).await }
    });
    within(LIMIT, sessions[0].closed()).await;
    within(LIMIT, deleter.delete(R)).await.unwrap();
    let outcome = within(LIMIT, running).await.unwrap();

    assert!(
        matches!(outcome, Err(ReconcileError::NotLive { .. })),
        "{outcome:?}"
    );
    assert!(store.is_empty());
    assert!(sessions.iter().all(Session::is_closed));
    releases.assert_exact(&sessions);
    checker.assert(&*store).await;
}

/// `router_disconnected` twice keeps one deadline; after a deletion and a
/// re-registration, a disconnect of the new incarnation replaces the old
/// period, and the old deadline passing closes nothing of the new life.
#[tokio::test(start_paused = true)]
async fn disconnects_twice_and_for_a_new_incarnation() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let old = store.register_router(R).await.unwrap();
    let first = fill(&store, R, old, 1..=3, &releases).await;
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .build(Arc::clone(&store))
        .unwrap();

    let deadline = reconciler.router_disconnected(R).await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(reconciler.router_disconnected(R).await.unwrap(), deadline);
    assert_eq!(reconciler.in_grace(), 1);

    within(LIMIT, deleter(&store).delete(R)).await.unwrap();
    let new = store.register_router(R).await.unwrap();
    let second = fill(&store, R, new, 1..=3, &releases).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let new_deadline = reconciler.router_disconnected(R).await.unwrap();
    assert!(new_deadline > deadline);
    assert_eq!(reconciler.in_grace(), 1);

    // Past the old deadline: the new life is untouched.
    tokio::time::sleep_until(deadline + Duration::from_secs(1)).await;
    assert!(second.iter().all(|s| !s.is_closed()));
    assert_eq!(reconciler.grace_deadline(R), Some(new_deadline));
    // At the new one, it is lost.
    for session in &second {
        assert_eq!(
            within(LIMIT, session.closed()).await,
            CloseReason::RouterLost
        );
    }
    assert!(
        first
            .iter()
            .all(|s| s.close_reason() == Some(CloseReason::RouterDeleted))
    );
    within(LIMIT, async {
        while reconciler.in_grace() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(store.count(R).await.unwrap(), 0);
    releases.assert_exact(&first);
    releases.assert_exact(&second);
    checker.assert(&*store).await;
}

/// `shutdown` while a grace expiry closes chunk by chunk and a reconnect
/// reconciles: the expiry stops, every session is either closed and gone
/// or open and stored, no resource is released twice, and no new grace
/// period can start.
#[tokio::test(start_paused = true)]
async fn shutdown_racing_an_expiry_and_a_reconcile() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let sessions = fill(&store, R, incarnation, 1..=40, &releases).await;
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .chunk_size(2)
        .reclaim_queue(ReclaimQueue::builder().build().unwrap())
        .build(Arc::clone(&store))
        .unwrap();

    reconciler.router_disconnected(R).await.unwrap();
    within(LIMIT, sessions[0].closed()).await;
    let (_, reconciled) = within(
        LIMIT,
        futures::future::join(
            reconciler.shutdown(),
            reconciler.reconcile(R, incarnation, ids(1..=40)),
        ),
    )
    .await;
    let reconciled = reconciled.unwrap();

    assert_eq!(reconciler.in_grace(), 0);
    let lost = sessions.iter().filter(|s| s.is_closed()).count();
    assert!(
        (2..40).contains(&lost),
        "{lost} lost: the expiry did not stop"
    );
    for session in &sessions {
        let stored = store.get(session.id()).await.unwrap().is_some();
        assert_eq!(stored, !session.is_closed(), "{:?}", session.key());
    }
    assert_eq!(
        reconciled.summary.matched + reconciled.summary.closed_reported,
        40 - reconciled.summary.unknown
    );
    let refused = reconciler.router_disconnected(R).await;
    assert!(
        matches!(refused, Err(ReconcileError::ShutDown)),
        "{refused:?}"
    );
    releases.assert_exact(&sessions);
    checker.assert(&*store).await;
}

/// Dropping a reconcile half-way (cancel safety): every session is either
/// untouched, or closed (and removed, or removed by the next
/// reconciliation); resources released once.
#[tokio::test(start_paused = true)]
async fn a_reconcile_dropped_half_way_leaves_nothing_half_done() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let sessions = fill(&store, R, incarnation, 1..=30, &releases).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder()
        .chunk_size(3)
        .reclaim_queue(ReclaimQueue::builder().build().unwrap())
        .build(Arc::clone(&store))
        .unwrap();

    let running = tokio::spawn({
        let reconciler = reconciler.clone();
        async move { reconciler.reconcile(R, incarnation, ids(1..=10)).await }
    });
    within(LIMIT, sessions[10].closed()).await;
    running.abort();
    assert!(within(LIMIT, running).await.unwrap_err().is_cancelled());

    let closed: Vec<_> = sessions.iter().filter(|s| s.is_closed()).collect();
    assert!(!closed.is_empty() && closed.len() < 20, "{}", closed.len());
    for session in &sessions[..10] {
        assert!(
            !session.is_closed(),
            "reported, closed: {:?}",
            session.key()
        );
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let next = reconciler
        .reconcile(R, incarnation, ids(1..=10))
        .await
        .unwrap();
    assert_eq!(next.closed.len() + closed.len(), 20, "{next:?}");
    assert_eq!(store.count(R).await.unwrap(), 10);
    for session in &sessions {
        let stored = store.get(session.id()).await.unwrap().is_some();
        assert_eq!(stored, !session.is_closed(), "{:?}", session.key());
    }
    within(LIMIT, async {
        for session in &sessions[10..] {
            session.closed().await;
        }
    })
    .await;
    releases.assert_exact(&sessions);
    checker.assert(&*store).await;
}

/// I9 in the grace expiry: while it closes a lost router chunk by chunk, a
/// client closes session 20 and reuses its id at once. The expiry, which
/// listed the old session, never touches the new one.
#[tokio::test(start_paused = true)]
async fn a_grace_expiry_never_closes_an_id_reused_meanwhile() {
    let store = Arc::new(MemoryStore::new());
    let checker = InvariantChecker::new();
    let releases = Releases::default();
    let incarnation = store.register_router(R).await.unwrap();
    let old = fill(&store, R, incarnation, 1..=20, &releases).await;
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .chunk_size(2)
        .reclaim_queue(ReclaimQueue::builder().build().unwrap())
        .build(Arc::clone(&store))
        .unwrap();

    reconciler.router_disconnected(R).await.unwrap();
    within(LIMIT, old[0].closed()).await;
    assert!(!old[19].is_closed(), "the expiry is still running");
    let _ = store
        .close(SessionId::new(20), CloseReason::ClientClosed)
        .await
        .unwrap();
    let new = fill(&store, R, incarnation, [20], &releases).await;
    within(LIMIT, async {
        while reconciler.in_grace() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    assert!(
        !new[0].is_closed(),
        "the reused id was closed by the expiry"
    );
    assert!(Session::ptr_eq(
        &store.get(SessionId::new(20)).await.unwrap().unwrap(),
        &new[0]
    ));
    assert_eq!(old[19].close_reason(), Some(CloseReason::ClientClosed));
    assert!(
        old[..19]
            .iter()
            .all(|s| s.close_reason() == Some(CloseReason::RouterLost))
    );
    within(LIMIT, async {
        for session in &old {
            session.closed().await;
        }
    })
    .await;
    releases.assert_exact(&old);
    releases.assert_exact(&new);
    checker.assert(&*store).await;
}

/// A disconnect of the router's old life whose status read lands before
/// the router is deleted and registered again, and whose grace entry lands
/// after the new life's own disconnect, must not replace the new life's
/// grace period: the new life's sessions are still lost at its end
/// (`router_disconnected`: "its sessions are closed with RouterLost when
/// the period ends").
#[tokio::test(start_paused = true)]
async fn a_stale_disconnect_does_not_replace_the_new_lifes_grace() {
    let store = Arc::new(Gated::default());
    let releases = Releases::default();
    let old = store.register_router(R).await.unwrap();
    let _first = fill(&store.inner, R, old, 1..=2, &releases).await;
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .build(Arc::clone(&store))
        .unwrap();

    // The old connection's disconnect reads the status, and stalls.
    store.on_status.store(true, Ordering::SeqCst);
    let stale = tokio::spawn({
        let reconciler = reconciler.clone();
        async move { reconciler.router_disconnected(R).await }
    });
    within(LIMIT, store.arrived.notified()).await;
    // Meanwhile: deleted, registered again, its new connection drops.
    let deleter = RouterDeleter::new(
        Arc::clone(&store),
        ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
    );
    within(LIMIT, deleter.delete(R)).await.unwrap();
    let new = store.register_router(R).await.unwrap();
    let second = fill(&store.inner, R, new, 1..=2, &releases).await;
    let deadline = reconciler.router_disconnected(R).await.unwrap();
    // A second later, the stale disconnect finishes.
    tokio::time::advance(Duration::from_secs(1)).await;
    store.release.notify_one();
    let outcome = within(LIMIT, stale).await.unwrap();
    println!("the stale disconnect returned {outcome:?}");

    assert_eq!(
        reconciler.grace_deadline(R),
        Some(deadline),
        "the new life's grace period was replaced"
    );
    for session in &second {
        assert_eq!(
            within(LIMIT, session.closed()).await,
            CloseReason::RouterLost
        );
    }
}

/// Router `R` registered in `store` with session 1, and a reconciler of a
/// 30 s grace period (publishing on `events`, if given) that has seen `R`
/// disconnect.
async fn one_session_in_grace<St: SessionStore<Payload = ()>>(
    store: &Arc<St>,
    events: Option<EventBus>,
) -> (Incarnation, Session, Reconciler<St>) {
    let incarnation = store.register_router(R).await.unwrap();
    let session = store
        .create(NewSession::new(SessionId::new(1), R, incarnation))
        .await
        .unwrap();
    let mut builder = Reconciler::builder().grace_period(Duration::from_secs(30));
    if let Some(bus) = events {
        builder = builder.events(bus);
    }
    let reconciler = builder.build(Arc::clone(store)).unwrap();
    reconciler.router_disconnected(R).await.unwrap();
    (incarnation, session, reconciler)
}

/// I5: a grace period ends while the backend fails the router's listing
/// (then its status) a few times. The expiry gave up at the first error
/// (a log line only), took the router out of grace and published nothing:
/// the lost router's sessions stayed open for ever. It retries until the
/// store answers.
#[tokio::test(start_paused = true)]
async fn a_grace_expiry_retries_store_reads_that_fail() {
    for (listings, statuses) in [(1, 0), (5, 0), (0, 1), (2, 3)] {
        let store = Arc::new(Gated::default());
        let bus = EventBus::new(64);
        let mut events = bus.subscribe();
        let (_, session, reconciler) = one_session_in_grace(&store, Some(bus)).await;
        store.failed_listings.store(listings, Ordering::SeqCst);
        store.failed_statuses.store(statuses, Ordering::SeqCst);
        let failures = (listings, statuses);
        assert_eq!(
            within(LIMIT, session.closed()).await,
            CloseReason::RouterLost,
            "{failures:?}"
        );
        let lost = within(LIMIT, router_lost(&mut events, R)).await;
        assert_eq!(lost, 1, "{failures:?}");
        assert_eq!(reconciler.in_grace(), 0, "{failures:?}");
        assert_eq!(store.failed_listings.load(Ordering::SeqCst), 0);
        assert_eq!(store.failed_statuses.load(Ordering::SeqCst), 0);
    }
}

/// A reconnect while the expiry waits to retry a failed read stops it at
/// once: the reconciliation does not wait out the backoff, and nothing is
/// closed.
#[tokio::test(start_paused = true)]
async fn a_reconnect_stops_a_grace_expiry_waiting_to_retry() {
    let store = Arc::new(Gated::default());
    let (incarnation, session, reconciler) = one_session_in_grace(&store, None).await;
    store.failed_listings.store(usize::MAX, Ordering::SeqCst); // down for good
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(reconciler.in_grace(), 1, "still retrying");
    store.failed_listings.store(0, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let report = reconciler
        .reconcile(R, incarnation, ids([1]))
        .await
        .unwrap();
    assert!(report.summary.grace_cancelled);
    assert_eq!(started.elapsed(), Duration::ZERO, "waited for a backoff");
    assert_eq!(reconciler.in_grace(), 0);
    assert!(!session.is_closed());
    // The expiry's task left its wait at the cancel: a shutdown waits for
    // no backoff either.
    let stopping = tokio::time::Instant::now();
    within(LIMIT, reconciler.shutdown()).await;
    assert_eq!(
        stopping.elapsed(),
        Duration::ZERO,
        "the task waited out its backoff"
    );
}

/// The grace timer is a task on the runtime `router_disconnected` ran on.
/// When that runtime went away (before or after the task first ran), the
/// entry stayed: the router counted as in grace for ever, and a later
/// disconnect on a live runtime got the dead period's deadline back and
/// started no timer. Now the period ends with its task, and the next
/// disconnect starts one.
#[test]
fn a_grace_timer_lost_with_its_runtime_is_started_again() {
    for polled in [false, true] {
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let store = Arc::new(MemoryStore::new());
        let first = paused();
        let (reconciler, session) = first.block_on(async {
            let (_, session, reconciler) = one_session_in_grace(&store, None).await;
            if polled {
                tokio::task::yield_now().await;
            }
            (reconciler, session)
        });
        drop(first); // the controller's runtime is replaced

        paused().block_on(async {
            let before = tokio::time::Instant::now();
            let deadline = reconciler.router_disconnected(R).await.unwrap();
            assert_eq!(
                deadline,
                before + Duration::from_secs(30),
                "polled: {polled}"
            );
            assert_eq!(
                within(LIMIT, session.closed()).await,
                CloseReason::RouterLost,
                "polled: {polled}"
            );
            assert_eq!(reconciler.in_grace(), 0);
            assert!(store.is_empty());
        });
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// A controller handles a router's disconnect on a runtime that goes away
/// before the grace timer's task first runs (a short-lived runtime, a
/// runtime being replaced). The task never builds its `PeriodEnd`: the
/// entry stays, the router counts as in grace for ever and its liveness
/// hold is never released, so its silent sessions are neither closed by
/// the grace period nor reaped by the monitor, unless the same router
/// happened to disconnect or reconcile again. The period now ends with its
/// task's future, polled or not.
#[test]
fn a_grace_period_whose_task_never_ran_releases_the_router() {
    let main = paused_runtime();
    let store = Arc::new(MemoryStore::new());
    let (monitor, reconciler, session) = main.block_on(async {
        let incarnation = store.register_router(R).await.unwrap();
        let session = store
            .create(NewSession::new(SessionId::new(1), R, incarnation))
            .await
            .unwrap();
        let monitor = session_lifecycle::LivenessMonitor::builder()
            .build(Arc::clone(&store), session_lifecycle::liveness::NoProbe)
            .unwrap();
        monitor.watch(&session).unwrap();
        let reconciler = Reconciler::builder()
            .grace_period(Duration::from_secs(30))
            .liveness(&monitor)
            .build(Arc::clone(&store))
            .unwrap();
        (monitor, reconciler, session)
    });
    // The disconnect, handled on a runtime that then goes away.
    let short = paused_runtime();
    short.block_on(reconciler.router_disconnected(R)).unwrap();
    drop(short);

    main.block_on(async {
        let closed = tokio::time::timeout(LIMIT, session.closed()).await;
        let (in_grace, held) = (reconciler.in_grace(), monitor.is_held(R));
        assert!(
            closed.is_ok(),
            "after an hour the silent session of a router whose period has no \
             task is still open: in_grace {in_grace}, held {held}, {:?}",
            monitor.stats()
        );
    });
}

/// Where a [`DisconnectOnDrop`] sends what `router_disconnected` answered.
type Answer = std::sync::mpsc::Sender<Result<tokio::time::Instant, ReconcileError>>;

/// Calls `router_disconnected` when dropped: a task's future that the
/// runtime drops as it shuts down.
struct DisconnectOnDrop(Option<(Reconciler<MemoryStore>, Answer)>);

impl Drop for DisconnectOnDrop {
    fn drop(&mut self) {
        use futures::FutureExt;
        if let Some((reconciler, answer)) = self.0.take() {
            let answered = reconciler.router_disconnected(R).now_or_never();
            let _ = answer.send(answered.expect("a MemoryStore answers at once"));
        }
    }
}

/// A disconnect handled on a runtime shutting down: its spawn drops the
/// timer's task unrun, under the reconciler's lock. It must neither
/// deadlock nor leave a period with no task: `NoRuntime`, nothing in grace.
#[test]
fn a_disconnect_on_a_runtime_shutting_down_starts_no_period() {
    let store = Arc::new(MemoryStore::new());
    let main = paused_runtime();
    let (reconciler, session) = main.block_on(async {
        let incarnation = store.register_router(R).await.unwrap();
        let session = store
            .create(NewSession::new(SessionId::new(1), R, incarnation))
            .await
            .unwrap();
        let reconciler = Reconciler::builder()
            .grace_period(Duration::from_secs(30))
            .build(Arc::clone(&store))
            .unwrap();
        (reconciler, session)
    });
    let (answer, answered) = std::sync::mpsc::channel();
    let going = paused_runtime();
    going.block_on(async {
        let on_drop = DisconnectOnDrop(Some((reconciler.clone(), answer)));
        drop(tokio::spawn(async move {
            let _on_drop = on_drop;
            std::future::pending::<()>().await;
        }));
        tokio::task::yield_now().await;
    });
    drop(going);
    let answer = answered
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the disconnect answered");
    assert!(
        matches!(answer, Err(ReconcileError::NoRuntime)),
        "{answer:?}"
    );
    assert_eq!(reconciler.in_grace(), 0);
    main.block_on(async {
        // A disconnect on a live runtime starts a period as usual.
        reconciler.router_disconnected(R).await.unwrap();
        assert_eq!(
            within(LIMIT, session.closed()).await,
            CloseReason::RouterLost
        );
    });
}

/// A disconnect on a runtime built without its time driver: the timer
/// cannot be made. The grace timer's task used to be spawned all the same
/// and die on its first poll (a `RouterDisconnected` published for a
/// period that never ran, or, as the task raced the filing on a
/// multi-thread runtime, `NoRuntime`): now always `NoRuntime`, at once.
#[test]
fn a_disconnect_on_a_runtime_without_timers_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bus = EventBus::new(16);
        let mut events = bus.subscribe();
        let reconciler = Reconciler::builder()
            .events(bus)
            .build(Arc::clone(&store))
            .unwrap();
        store.register_router(R).await.unwrap();
        let answer = reconciler.router_disconnected(R).await;
        assert!(
            matches!(answer, Err(ReconcileError::NoRuntime)),
            "{answer:?}"
        );
        assert_eq!(reconciler.in_grace(), 0);
        assert!(events.try_recv().is_none(), "no period, no event");
    });
}
