//! Adversarial suite: session ids reused while a cleanup is under way, as a
//! controller sees them when its store is remote and slow.
//!
//! The store here wraps a `MemoryStore` the way a user's store over a remote
//! backend would, and can hold one call at its door (`Gate`) until the test
//! lets it through: the test then reuses the id in between, exactly where a
//! slow network would let it happen. Every cleanup path (liveness reaping,
//! reconciliation, grace expiry, a router's late confirmation) must act on
//! the session it meant, never on the new session holding its id.
//!
//! `SESSION_LIFECYCLE_SOAK=n` repeats each scenario `n` times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use session_lifecycle::test_util::conformance::soak_rounds;
use session_lifecycle::test_util::{
    HOUR, Notify, ScriptedNotifier, Subset, report_within, run_paused, within,
};
use session_lifecycle::{
    CloseReason, Incarnation, LivenessMonitor, MemoryStore, NewSession, Reconciler, RouterDeleter,
    RouterId, Session, SessionId, SessionKey, SessionState, SessionStore, liveness::NoProbe,
    session::CloseOutcome, store::AuditReport, store::BackendError, store::CreateError,
    store::FenceError, store::FenceSnapshot, store::FinishError, store::FinishReport,
    store::RegisterError, store::Repair, store::RouterCensus, store::RouterError,
    store::RouterStatus, store::SessionError,
};
use tokio::sync::{Notify as Signal, Semaphore};
use tokio::time::Duration;

/// A door one call can be held at: armed, the next removal (by id or key)
/// signals that it arrived and waits until the test opens the door.
struct Gate {
    armed: AtomicBool,
    arrived: Signal,
    open: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            armed: AtomicBool::new(false),
            arrived: Signal::new(),
            open: Semaphore::new(0),
        }
    }
}

impl Gate {
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Holds the caller here if the gate is armed (once).
    async fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.arrived.notify_one();
            self.open.acquire().await.expect("never closed").forget();
        }
    }

    /// Waits until a call is held at the gate.
    async fn arrived(&self) {
        self.arrived.notified().await;
    }

    fn open(&self) {
        self.open.add_permits(1);
    }
}

/// A user's store over a slow backend: a `MemoryStore` behind a `Gate` on
/// its removals (the call a cleanup makes last).
#[derive(Default)]
struct SlowStore {
    inner: MemoryStore,
    gate: Gate,
}

impl SessionStore for SlowStore {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
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
        self.gate.pass().await;
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, SessionError> {
        self.gate.pass().await;
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

const R: RouterId = RouterId::new(1);
const ID: SessionId = SessionId::new(42);

/// A store with router `R` and one session `ID` on it.
async fn one_session() -> (Arc<SlowStore>, Incarnation, Session) {
    let store = Arc::new(SlowStore::default());
    let incarnation = store.register_router(R).await.unwrap();
    let session = store
        .create(NewSession::new(ID, R, incarnation))
        .await
        .unwrap();
    (store, incarnation, session)
}

/// While a cleanup of `old` is held at the store's door, the client's own
/// close removes `old` and a new session takes its id; then the cleanup
/// goes on. Returns the new session.
async fn reuse_while_held(store: &SlowStore, old: &Session, incarnation: Incarnation) -> Session {
    store.gate.arrived().await;
    assert!(old.is_closed(), "the cleanup closes before it removes");
    // The client hangs up: its close finds the session closed and removes it.
    let _ = store.close(ID, CloseReason::ClientClosed).await.unwrap();
    let new = store
        .create(NewSession::new(ID, R, incarnation))
        .await
        .expect("the id is free again");
    store.gate.open();
    new
}

/// The new session holding the id is untouched: open, and the one stored.
async fn assert_untouched(store: &SlowStore, new: &Session) {
    assert_eq!(new.state(), SessionState::Active, "{new:?} was closed");
    let stored = store.get(ID).await.unwrap().expect("the new session stays");
    assert!(Session::ptr_eq(&stored, new));
}

#[test]
fn reaping_never_removes_a_session_that_reused_the_id() {
    for _ in 0..soak_rounds(1) {
        run_paused(async {
            let (store, incarnation, old) = one_session().await;
            let monitor = LivenessMonitor::builder()
                .build(Arc::clone(&store), NoProbe)
                .unwrap();
            monitor.watch(&old).unwrap();
            store.gate.arm();
            // The session never heartbeats: the monitor reaps it, and its
            // removal is held.
            let new = within(HOUR, reuse_while_held(&store, &old, incarnation)).await;
            assert_eq!(old.close_reason(), Some(CloseReason::LivenessTimeout));
            within(HOUR, async {
                while monitor.stats().reaped == 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            assert_untouched(&store, &new).await;
        });
    }
}

#[test]
fn reconciliation_never_removes_a_session_that_reused_the_id() {
    for _ in 0..soak_rounds(1) {
        run_paused(async {
            let (store, incarnation, old) = one_session().await;
            let reconciler = Reconciler::builder()
                .build(Arc::clone(&store))
                .expect("valid settings");
            store.gate.arm();
            // The router reports nothing: `old` is closed as lost.
            let reconcile = tokio::spawn({
                let reconciler = reconciler.clone();
                async move {
                    reconciler
                        .reconcile(R, incarnation, Vec::<SessionId>::new())
                        .await
                }
            });
            let new = within(HOUR, reuse_while_held(&store, &old, incarnation)).await;
            let report = reconcile.await.unwrap().unwrap();
            assert_eq!(report.closed, vec![ID]);
            assert_eq!(old.close_reason(), Some(CloseReason::Reclaimed));
            assert_untouched(&store, &new).await;
        });
    }
}

#[test]
fn grace_expiry_never_removes_a_session_that_reused_the_id() {
    for _ in 0..soak_rounds(1) {
        run_paused(async {
            let (store, incarnation, old) = one_session().await;
            let reconciler = Reconciler::builder()
                .grace_period(Duration::from_secs(5))
                .build(Arc::clone(&store))
                .expect("valid settings");
            store.gate.arm();
            reconciler.router_disconnected(R).await.unwrap();
            // The grace period expires: `old` is closed as lost.
            let new = within(HOUR, reuse_while_held(&store, &old, incarnation)).await;
            assert_eq!(old.close_reason(), Some(CloseReason::RouterLost));
            within(HOUR, async {
                while reconciler.grace_deadline(R).is_some() {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            assert_untouched(&store, &new).await;
        });
    }
}

#[test]
fn a_late_confirmation_never_closes_a_session_that_reused_the_id() {
    for _ in 0..soak_rounds(1) {
        run_paused(async {
            let store = Arc::new(MemoryStore::new());
            let incarnation = store.register_router(R).await.unwrap();
            let old = store
                .create(NewSession::new(ID, R, incarnation))
                .await
                .unwrap();
            // The router confirms, but only after the deletion gave up on it.
            let late = Duration::from_secs(60);
            let notifier = ScriptedNotifier::always(
                Arc::clone(&store),
                Notify::Later {
                    delay: late,
                    confirm: Subset::All,
                },
            );
            let deleter = RouterDeleter::builder()
                .confirm_timeout(Duration::from_secs(1))
                .retries(0)
                .build(Arc::clone(&store), notifier)
                .expect("valid settings");
            let report = report_within(HOUR, deleter.delete(R)).await;
            assert_eq!(report.forced, 1);
            assert_eq!(old.close_reason(), Some(CloseReason::Forced));
            // The id goes to a client on another router.
            let other = RouterId::new(2);
            let other_incarnation = store.register_router(other).await.unwrap();
            let new = store
                .create(NewSession::new(ID, other, other_incarnation))
                .await
                .unwrap();
            // The late confirmation lands (its timer is the only one left).
            tokio::time::sleep(late).await;
            assert_eq!(new.state(), SessionState::Active, "{new:?} was closed");
            let stored = store.get(ID).await.unwrap().expect("the new session stays");
            assert!(Session::ptr_eq(&stored, &new));
        });
    }
}

/// The store operations themselves: by key, only that very life of the id.
#[test]
fn close_and_remove_by_key_act_on_that_life_only() {
    run_paused(async {
        let (store, incarnation, old) = one_session().await;
        let key = old.key();
        let _ = store.close(ID, CloseReason::ClientClosed).await.unwrap();
        let new = store
            .create(NewSession::new(ID, R, incarnation))
            .await
            .unwrap();
        assert_ne!(new.key(), key);
        assert!(matches!(
            store.close_exact(key, CloseReason::RouterDeleted).await,
            Err(SessionError::UnknownSession(id)) if id == ID
        ));
        assert!(matches!(
            store.remove_exact(key).await,
            Err(SessionError::UnknownSession(id)) if id == ID
        ));
        assert_untouched(&store, &new).await;
        // The new life's own key works.
        assert!(
            store
                .close_exact(new.key(), CloseReason::ClientClosed)
                .await
                .unwrap()
                .won()
        );
        assert!(store.get(ID).await.unwrap().is_none());
    });
}
