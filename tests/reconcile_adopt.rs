//! Restart adoption (`Reconciler::reconcile_adopting`): a controller that
//! restarted with a fresh store takes back the sessions its routers report
//! with a valid token, and tells them to drop the rest; under paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use session_lifecycle::liveness::NoProbe;
use session_lifecycle::reconcile::{
    Adopter, Adoption, ReconcileError, RejectReason, Rejection, ReportedSession, adopt_fn,
};
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, CreateErrorKind, FenceError, FenceSnapshot,
    FinishError, FinishReport, RegisterError, Repair, RouterCensus, RouterError, RouterStatus,
    SessionError,
};
use session_lifecycle::test_util::{Notify, ScriptedNotifier};
use session_lifecycle::{
    CloseReason, Event, EventBus, Incarnation, Lifecycle, LivenessMonitor, MemoryStore, NewSession,
    Reconciler, RouterDeleter, RouterId, Session, SessionId, SessionKey, SessionStore,
    session::CloseOutcome,
};
use tokio::sync::Notify as Signal;
use tokio::time::{Duration, Instant};

const R: RouterId = RouterId::new(1);

fn ids(range: impl IntoIterator<Item = u64>) -> Vec<SessionId> {
    range.into_iter().map(SessionId::new).collect()
}

/// The token the controller issued for session `id` of `owner`.
fn token(id: u64, owner: &str) -> Vec<u8> {
    format!("{id}:{owner}").into_bytes()
}

/// A session as the router reports it, with a valid token.
fn valid(id: u64, owner: &str) -> ReportedSession {
    ReportedSession::new(SessionId::new(id))
        .with_owner(owner)
        .with_token(token(id, owner))
        .with_expires_in(Duration::from_secs(600))
}

/// A controller that restarted: a fresh store, the router registered again.
async fn restarted() -> (Arc<MemoryStore<String>>, Incarnation) {
    let store = Arc::new(MemoryStore::<String>::default());
    let incarnation = store.register_router(R).await.unwrap();
    (store, incarnation)
}

/// Adopts a session whose token the controller issued for its id and its
/// reported owner, and that has not expired; the payload is the owner.
#[derive(Default)]
struct Tokens {
    offered: AtomicUsize,
    adopted: AtomicUsize,
}

impl Tokens {
    fn decide(&self, reported: ReportedSession) -> Adoption<String> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        if reported.is_expired() {
            return Adoption::reject("expired");
        }
        let Some(token) = reported.token else {
            return Adoption::reject("no token");
        };
        let text = String::from_utf8_lossy(token.as_bytes()).into_owned();
        let Some((id, owner)) = text.split_once(':') else {
            return Adoption::reject("bad token");
        };
        if id != reported.id.get().to_string() {
            return Adoption::reject("bad token");
        }
        if reported.owner.as_deref() != Some(owner) {
            return Adoption::reject("wrong owner");
        }
        Adoption::Accept {
            payload: owner.to_owned(),
            token: Some(token),
        }
    }
}

impl Adopter<String> for Tokens {
    type Data = ();

    async fn adopt(&self, _router: RouterId, reported: ReportedSession) -> Adoption<String> {
        self.decide(reported)
    }

    fn adopted(&self, session: &Session<String>) {
        assert!(!session.is_closed());
        self.adopted.fetch_add(1, Ordering::Relaxed);
    }
}

fn refused(id: u64, reason: &'static str) -> (SessionId, RejectReason) {
    (SessionId::new(id), RejectReason::Refused(reason.into()))
}

fn reasons(rejected: &[Rejection]) -> Vec<(SessionId, RejectReason)> {
    rejected.iter().map(|r| (r.id, r.reason.clone())).collect()
}

#[tokio::test(start_paused = true)]
async fn a_restarted_controller_adopts_the_valid_sessions_and_drops_the_rest() {
    let (store, incarnation) = restarted().await;
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    let reconciler = Reconciler::builder()
        .chunk_size(3)
        .adopt_concurrency(2)
        .events(bus)
        .build(Arc::clone(&store))
        .unwrap();
    let adopter = Tokens::default();
    // The router's Hello: ten sessions with valid tokens, then a forged
    // token, an expired session, a token of another owner, no token.
    let mut reported: Vec<ReportedSession> = (1..=10).map(|id| valid(id, "alice")).collect();
    reported.push(valid(11, "alice").with_token(b"forged".to_vec()));
    reported.push(valid(12, "alice").with_expires_in(Duration::ZERO));
    reported.push(valid(13, "alice").with_owner("bob"));
    reported.push(ReportedSession::new(SessionId::new(14)).with_owner("alice"));

    let report = reconciler
        .reconcile_adopting(R, incarnation, reported, &adopter)
        .await
        .unwrap();

    assert_eq!(report.adopted, ids(1..=10));
    assert_eq!(report.drop, ids(11..=14));
    assert!(report.closed.is_empty());
    assert_eq!(
        reasons(&report.rejected),
        vec![
            refused(11, "bad token"),
            refused(12, "expired"),
            refused(13, "wrong owner"),
            refused(14, "no token"),
        ]
    );
    let summary = report.summary;
    assert_eq!(
        (
            summary.reported,
            summary.matched,
            summary.unknown,
            summary.adopted,
            summary.rejected
        ),
        (14, 0, 14, 10, 4)
    );
    assert!(report.rejected.iter().all(|r| r.reason.is_refused()));
    assert_eq!(adopter.offered.load(Ordering::Relaxed), 14);
    assert_eq!(adopter.adopted.load(Ordering::Relaxed), 10);
    // Each adopted session is in the store, under the new incarnation,
    // with its payload and token; nothing else is.
    assert_eq!(store.count(R).await.unwrap(), 10);
    assert_eq!(store.len(), 10);
    for id in 1..=10 {
        let session = store.get(SessionId::new(id)).await.unwrap().unwrap();
        assert_eq!((session.router(), session.incarnation()), (R, incarnation));
        assert_eq!(session.payload(), "alice");
        let expected = token(id, "alice");
        assert!(session.with_token(|t| t == Some(expected.as_slice())));
    }
    assert!(store.audit().await.unwrap().is_clean());
    let published = loop {
        match events.try_recv() {
            Some(Event::Reconciled(summary)) => break summary,
            Some(_) => {}
            None => panic!("no Reconciled event"),
        }
    };
    assert_eq!(published, summary);

    // They are normal sessions: the router's next report matches them.
    let again = reconciler
        .reconcile(R, incarnation, ids(1..=10))
        .await
        .unwrap();
    assert_eq!(again.summary.matched, 10);
    assert!(again.drop.is_empty() && again.closed.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_plain_reconcile_still_drops_unknown_sessions() {
    let (store, incarnation) = restarted().await;
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();

    let report = reconciler
        .reconcile(R, incarnation, ids(1..=5))
        .await
        .unwrap();

    assert_eq!(report.drop, ids(1..=5));
    assert!(report.adopted.is_empty() && report.rejected.is_empty());
    assert_eq!(report.summary.unknown, 5);
    assert_eq!((report.summary.adopted, report.summary.rejected), (0, 0));
    assert!(store.is_empty());
}

#[tokio::test(start_paused = true)]
async fn adoption_leaves_the_rest_of_the_reconciliation_as_it_was() {
    let store = Arc::new(MemoryStore::<String>::default());
    let incarnation = store.register_router(R).await.unwrap();
    for id in 1..=3 {
        let spec = NewSession::new(SessionId::new(id), R, incarnation).payload(String::new());
        let _ = store.create(spec).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();

    // The router holds 1 and 2 (known), 9 (valid, unknown) and lost 3.
    let reported = [valid(1, "alice"), valid(2, "alice"), valid(9, "carol")];
    let adopter = Tokens::default();
    let report = reconciler
        .reconcile_adopting(R, incarnation, reported, &adopter)
        .await
        .unwrap();

    assert_eq!(report.adopted, ids([9]));
    assert_eq!(report.closed, ids([3]));
    assert!(report.drop.is_empty());
    assert_eq!(report.summary.matched, 2);
    // Known sessions are not offered.
    assert_eq!(adopter.offered.load(Ordering::Relaxed), 1);
    let carol = store.get(SessionId::new(9)).await.unwrap().unwrap();
    assert_eq!(carol.payload(), "carol");
}

/// Panics on session 2 while deciding, on session 3 as it is called (an
/// adopter building its future eagerly), and in `adopted` for session 4.
struct Panicky;

impl Adopter<()> for Panicky {
    type Data = ();

    #[allow(clippy::manual_async_fn)]
    fn adopt(
        &self,
        _router: RouterId,
        reported: ReportedSession,
    ) -> impl Future<Output = Adoption> + Send {
        assert_ne!(reported.id.get(), 3, "eager panic");
        async move {
            assert_ne!(reported.id.get(), 2, "panic while deciding");
            Adoption::accept(())
        }
    }

    fn adopted(&self, session: &Session) {
        assert_ne!(session.id().get(), 4, "panic once adopted");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_adopter_is_contained_and_its_sessions_rejected() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let reported = (1..=5).map(|id| ReportedSession::new(SessionId::new(id)));

    let report = reconciler
        .reconcile_adopting(R, incarnation, reported, &Panicky)
        .await
        .unwrap();

    assert_eq!(report.adopted, ids([1, 4, 5]));
    assert_eq!(report.drop, ids([2, 3]));
    assert_eq!(
        reasons(&report.rejected),
        vec![
            (SessionId::new(2), RejectReason::Panicked),
            (SessionId::new(3), RejectReason::Panicked),
        ]
    );
    assert!(!report.rejected[0].reason.is_refused());
    // A panic in `adopted` leaves the session adopted.
    assert!(store.get(SessionId::new(4)).await.unwrap().is_some());
    assert_eq!(store.count(R).await.unwrap(), 3);
}

/// Takes `slow` to decide on session 2; at most `max` decisions seen at once.
struct Slow {
    slow: Duration,
    running: AtomicUsize,
    max: AtomicUsize,
}

impl Adopter<()> for Slow {
    type Data = ();

    async fn adopt(&self, _router: RouterId, reported: ReportedSession) -> Adoption {
        let now = self.running.fetch_add(1, Ordering::Relaxed) + 1;
        self.max.fetch_max(now, Ordering::Relaxed);
        let wait = if reported.id.get() == 2 {
            self.slow
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(wait).await;
        self.running.fetch_sub(1, Ordering::Relaxed);
        Adoption::accept(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_adopter_is_bounded_by_the_timeout_and_the_concurrency() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder()
        .adopt_timeout(Duration::from_secs(3))
        .adopt_concurrency(4)
        .build(Arc::clone(&store))
        .unwrap();
    let adopter = Slow {
        slow: Duration::from_secs(3_600),
        running: AtomicUsize::new(0),
        max: AtomicUsize::new(0),
    };
    let reported = (1..=8).map(|id| ReportedSession::new(SessionId::new(id)));

    let started = Instant::now();
    let report = reconciler
        .reconcile_adopting(R, incarnation, reported, &adopter)
        .await
        .unwrap();

    assert_eq!(report.adopted, ids([1, 3, 4, 5, 6, 7, 8]));
    assert_eq!(
        reasons(&report.rejected),
        vec![(SessionId::new(2), RejectReason::TimedOut)]
    );
    assert_eq!(adopter.max.load(Ordering::Relaxed), 4);
    // Four at a time: 1 s for the first three, 2 s for the rest in the
    // order they finish, the slow one cut at 3 s.
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// Fences the router on its first decision, as a deletion starting while
/// the adopter decides would.
struct FencingAdopter {
    store: Arc<MemoryStore>,
    fenced: AtomicBool,
}

impl Adopter<()> for FencingAdopter {
    type Data = ();

    async fn adopt(&self, router: RouterId, _reported: ReportedSession) -> Adoption {
        if !self.fenced.swap(true, Ordering::Relaxed) {
            // No lock is held: calling back into the store is fine.
            let _ = self.store.fence(router).await.unwrap();
        }
        Adoption::accept(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_router_fenced_while_the_adopter_decides_gets_no_session() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    // One chunk: the check right after the decisions is the one that
    // stops it (the store would refuse each create too).
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let adopter = FencingAdopter {
        store: Arc::clone(&store),
        fenced: AtomicBool::new(false),
    };
    let reported = (1..=5).map(|id| ReportedSession::new(SessionId::new(id)));

    let refused = reconciler
        .reconcile_adopting(R, incarnation, reported, &adopter)
        .await;

    assert!(
        matches!(refused, Err(ReconcileError::NotLive { router: R, .. })),
        "{refused:?}"
    );
    assert_eq!(store.count(R).await.unwrap(), 0);
    assert!(store.is_empty());
}

/// Waits for `release` before each decision, telling `arrived` first.
struct Waiting {
    arrived: Signal,
    release: Signal,
}

impl Adopter<()> for Waiting {
    type Data = ();

    async fn adopt(&self, _router: RouterId, _reported: ReportedSession) -> Adoption {
        self.arrived.notify_one();
        self.release.notified().await;
        Adoption::accept(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_router_deleted_while_the_adopter_decides_gets_no_session() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder()
        .adopt_timeout(Duration::from_secs(3_600))
        .adopt_concurrency(1)
        .build(Arc::clone(&store))
        .unwrap();
    let deleter = RouterDeleter::builder()
        .build(
            Arc::clone(&store),
            ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
        )
        .unwrap();
    let adopter = Arc::new(Waiting {
        arrived: Signal::new(),
        release: Signal::new(),
    });

    let adopting = {
        let (reconciler, adopter) = (reconciler.clone(), Arc::clone(&adopter));
        tokio::spawn(async move {
            let reported = (1..=3).map(|id| ReportedSession::new(SessionId::new(id)));
            reconciler
                .reconcile_adopting(R, incarnation, reported, &*adopter)
                .await
        })
    };
    adopter.arrived.notified().await;
    let deleted = deleter.delete(R).await.unwrap();
    assert!(deleted.report().is_some());
    adopter.release.notify_one();
    let outcome = adopting.await.unwrap();

    assert!(
        matches!(outcome, Err(ReconcileError::NotLive { .. })),
        "{outcome:?}"
    );
    assert!(store.is_empty(), "no session created after the fence");
    assert!(matches!(
        store.router_status(R).await.unwrap(),
        RouterStatus::Deleted(_)
    ));
}

/// A user's store that fences the router right before a create, once
/// armed: the fence lands between the reconciler's last check and its
/// create, where only the store itself can refuse.
#[derive(Default)]
struct FenceBeforeCreate {
    inner: MemoryStore,
    armed: AtomicBool,
}

impl SessionStore for FenceBeforeCreate {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        if self.armed.swap(false, Ordering::Relaxed) {
            let _ = self.inner.fence(spec.router()).await;
        }
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
        self.inner.sessions(router).await
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

#[tokio::test(start_paused = true)]
async fn a_create_the_store_refuses_after_a_fence_is_reported_as_a_rejection() {
    let store = Arc::new(FenceBeforeCreate::default());
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let accept_all = adopt_fn(|_, _: ReportedSession| Adoption::accept(()));
    store.armed.store(true, Ordering::Relaxed);

    let report = reconciler
        .reconcile_adopting(
            R,
            incarnation,
            (1..=3).map(|id| ReportedSession::new(SessionId::new(id))),
            &accept_all,
        )
        .await
        .unwrap();

    assert!(report.adopted.is_empty());
    assert_eq!(report.drop, ids(1..=3));
    let fenced = RejectReason::NotCreated(CreateErrorKind::Fenced {
        router: R,
        incarnation,
    });
    assert_eq!(
        reasons(&report.rejected),
        ids(1..=3)
            .into_iter()
            .map(|id| (id, fenced.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!((report.summary.adopted, report.summary.rejected), (0, 3));
    assert_eq!(store.count(R).await.unwrap(), 0);
}

/// Creates session `taken` on the store as a client would, before
/// accepting it.
struct Taker {
    store: Arc<MemoryStore>,
    taken: SessionId,
    incarnation: Incarnation,
}

impl Adopter<()> for Taker {
    type Data = ();

    async fn adopt(&self, router: RouterId, reported: ReportedSession) -> Adoption {
        if reported.id == self.taken {
            let spec = NewSession::new(self.taken, router, self.incarnation);
            let _ = self.store.create(spec).await.unwrap();
        }
        Adoption::accept(())
    }
}

#[tokio::test(start_paused = true)]
async fn an_id_taken_while_the_adopter_decides_is_not_adopted() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let taken = SessionId::new(2);
    let adopter = Taker {
        store: Arc::clone(&store),
        taken,
        incarnation,
    };

    let report = reconciler
        .reconcile_adopting(
            R,
            incarnation,
            (1..=3).map(|id| ReportedSession::new(SessionId::new(id))),
            &adopter,
        )
        .await
        .unwrap();

    assert_eq!(report.adopted, ids([1, 3]));
    assert_eq!(report.drop, vec![taken]);
    assert_eq!(
        reasons(&report.rejected),
        vec![(
            taken,
            RejectReason::NotCreated(CreateErrorKind::DuplicateSession(taken))
        )]
    );
    // The client's session is untouched.
    let client = store.get(taken).await.unwrap().unwrap();
    assert!(!client.is_closed());
    assert_eq!(store.count(R).await.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_id_reported_twice_is_offered_once() {
    let (store, incarnation) = restarted().await;
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let adopter = Tokens::default();
    // Session 1: valid first, forged second; session 2: forged first.
    let reported = [
        valid(1, "alice"),
        valid(1, "alice").with_token(b"forged".to_vec()),
        valid(2, "alice").with_token(b"forged".to_vec()),
        valid(2, "alice"),
    ];

    let report = reconciler
        .reconcile_adopting(R, incarnation, reported, &adopter)
        .await
        .unwrap();

    assert_eq!(adopter.offered.load(Ordering::Relaxed), 2);
    assert_eq!(report.summary.reported, 2);
    assert_eq!(report.adopted, ids([1]));
    assert_eq!(report.drop, ids([2]));
    assert_eq!(store.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stale_report_adopts_nothing() {
    let (store, incarnation) = restarted().await;
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let adopter = Tokens::default();
    let stale = Incarnation::new(incarnation.get() + 7);

    let refused = reconciler
        .reconcile_adopting(R, stale, [valid(1, "alice")], &adopter)
        .await;

    assert!(
        matches!(refused, Err(ReconcileError::StaleIncarnation { .. })),
        "{refused:?}"
    );
    assert_eq!(adopter.offered.load(Ordering::Relaxed), 0);
    assert!(store.is_empty());
}

#[test]
fn an_adoption_concurrency_of_zero_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let refused = Reconciler::builder().adopt_concurrency(0).build(store);
    assert_eq!(
        refused.unwrap_err().refused_setting(),
        Some("adopt_concurrency")
    );
}

/// Adopts everything and watches it in the liveness monitor.
struct Watching(LivenessMonitor<MemoryStore, NoProbe>);

impl Adopter<()> for Watching {
    type Data = ();

    async fn adopt(&self, _router: RouterId, _reported: ReportedSession) -> Adoption {
        Adoption::accept(())
    }

    fn adopted(&self, session: &Session) {
        self.0.watch(session).unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn adopted_sessions_are_normal_sessions_watched_and_reaped_by_the_monitor() {
    let store = Arc::new(MemoryStore::new());
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
        .build()
        .unwrap();
    let incarnation = store.register_router(R).await.unwrap();
    let adopter = Watching(lifecycle.liveness().clone());

    let report = lifecycle
        .reconciler()
        .reconcile_adopting(
            R,
            incarnation,
            (1..=3).map(|id| ReportedSession::new(SessionId::new(id))),
            &adopter,
        )
        .await
        .unwrap();
    assert_eq!(report.adopted, ids(1..=3));
    assert_eq!(lifecycle.liveness().stats().watched, 3);

    // Their clients never heartbeat (and nobody answers probes): reaped.
    let session = store.get(SessionId::new(1)).await.unwrap().unwrap();
    let bound = lifecycle.liveness().reap_bound(Duration::from_secs(3_600));
    tokio::time::timeout(bound, session.closed()).await.unwrap();
    assert_eq!(session.close_reason(), Some(CloseReason::LivenessTimeout));
    assert!(
        lifecycle
            .shutdown(Duration::from_secs(10))
            .await
            .is_complete()
    );
}

/// A session adopted with the time its router says it has left carries that
/// expiry, from the adoption on: an expiry monitor the `adopted` hook hands
/// it to closes it then (an API session outliving the restart still ends).
#[tokio::test(start_paused = true)]
async fn an_adopted_session_keeps_the_expiry_its_router_reports() {
    use session_lifecycle::{CloseReason, ExpiryMonitor};

    let (store, incarnation) = restarted().await;
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    let monitor = ExpiryMonitor::builder()
        .build(Arc::clone(&store))
        .expect("valid settings");
    let adopter = session_lifecycle::reconcile::adopt_fn(|_, reported: ReportedSession| {
        Adoption::accept(reported.owner.unwrap_or_default())
    });
    let start = Instant::now();
    let reported = [
        valid(1, "alice"),
        ReportedSession::new(SessionId::new(2)).with_owner("bob"),
    ];
    let report = reconciler
        .reconcile_adopting(R, incarnation, reported, &adopter)
        .await
        .unwrap();
    assert_eq!(report.adopted, ids(1..=2));
    let expiring = store
        .get(SessionId::new(1))
        .await
        .unwrap()
        .expect("adopted");
    let forever = store
        .get(SessionId::new(2))
        .await
        .unwrap()
        .expect("adopted");
    assert_eq!(
        expiring.expires_at(),
        Some(start + Duration::from_secs(600))
    );
    assert_eq!(forever.expires_at(), None);
    monitor.track(&expiring).expect("tracked");
    tokio::time::timeout(Duration::from_secs(601), expiring.closed())
        .await
        .expect("expired on time");
    assert_eq!(expiring.close_reason(), Some(CloseReason::Expired));
    assert!(!forever.is_closed());
    monitor.shutdown().await;
}
