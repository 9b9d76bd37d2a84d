//! Adversarial suite: a controller's own `SessionStore`, written against
//! the trait's documented contract only.
//!
//! `MinimalStore` wraps a `MemoryStore` through its public API and
//! implements only the required methods: `unlink_closed` (the trait's one
//! provided method) keeps its default, which "removes nothing and leaves
//! them to `finish`, which must remove them either way". Each call can take
//! time on tokio's clock and yield (a remote backend), `sessions` and the
//! fence snapshot can come in another order ("in no particular order"),
//! and `finish` can fail with `BackendErrorKind::Unavailable` ("A write the
//! store may repeat (a fence, a finish, a repair) may or may not have
//! applied, and calling it again is safe"). The crate's pieces must keep
//! I1 and I9 over it, directly and behind `BoxStore`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use session_lifecycle::store::BackendErrorKind;
use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, ScriptedNotifier, Subset, report_within, within,
};
use session_lifecycle::{
    BoxStore, CloseReason, DeleteError, DeleteOutcome, ExpiryMonitor, Incarnation, Lifecycle,
    LivenessMonitor, MemoryStore, NewSession, Reconciler, RouterDeleter, RouterId, Session,
    SessionId, SessionKey, SessionState, SessionStore, liveness::NoProbe, session::CloseOutcome,
    store::AuditReport, store::BackendError, store::CreateError, store::FenceError,
    store::FenceSnapshot, store::FinishError, store::FinishReport, store::RegisterError,
    store::Repair, store::RouterCensus, store::RouterError, store::RouterStatus,
    store::SessionError,
};
use tokio::time::Duration;

/// How `finish` fails before it reaches the inner store, or after.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FinishFault {
    /// Fails without applying.
    Before,
    /// Applies, then reports the failure (the answer was lost).
    After,
}

#[derive(Debug)]
struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("backend unreachable")
    }
}

impl std::error::Error for Unreachable {}

/// A user's store: only the required methods, over a `MemoryStore`.
struct MinimalStore {
    inner: MemoryStore,
    latency: Duration,
    reverse: AtomicBool,
    finish_failures: AtomicU32,
    finish_fault: FinishFault,
    /// Extra time each close and removal takes (a slow write).
    slow_writes: Duration,
}

impl MinimalStore {
    fn new(latency: Duration) -> Self {
        Self {
            inner: MemoryStore::new(),
            latency,
            reverse: AtomicBool::new(false),
            finish_failures: AtomicU32::new(0),
            finish_fault: FinishFault::Before,
            slow_writes: Duration::ZERO,
        }
    }

    fn reversed(self) -> Self {
        self.reverse.store(true, Ordering::SeqCst);
        self
    }

    fn failing_finish(mut self, times: u32, fault: FinishFault) -> Self {
        self.finish_failures.store(times, Ordering::SeqCst);
        self.finish_fault = fault;
        self
    }

    fn slow_writes(mut self, by: Duration) -> Self {
        self.slow_writes = by;
        self
    }

    async fn write(&self) {
        self.trip().await;
        if !self.slow_writes.is_zero() {
            tokio::time::sleep(self.slow_writes).await;
        }
    }

    /// A round trip: yields, and takes `latency` on tokio's clock.
    async fn trip(&self) {
        tokio::task::yield_now().await;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    fn order(&self, mut sessions: Vec<Session>) -> Vec<Session> {
        if self.reverse.load(Ordering::SeqCst) {
            sessions.reverse();
        }
        sessions
    }

    fn take_finish_failure(&self) -> bool {
        self.finish_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn unavailable() -> BackendError {
    BackendError::with_kind(BackendErrorKind::Unavailable, Unreachable)
}

impl SessionStore for MinimalStore {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.trip().await;
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.trip().await;
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        self.trip().await;
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        self.trip().await;
        self.inner.get(id).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.write().await;
        self.inner.close(id, reason).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.write().await;
        self.inner.close_exact(key, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        self.write().await;
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, SessionError> {
        self.write().await;
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session>, RouterError> {
        self.trip().await;
        Ok(self.order(self.inner.sessions(router).await?))
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.trip().await;
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.trip().await;
        let mut snapshot = self.inner.fence(router).await?;
        snapshot.sessions = self.order(std::mem::take(&mut snapshot.sessions));
        Ok(snapshot)
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        self.trip().await;
        let mut snapshot = self.inner.fence_incarnation(router, incarnation).await?;
        snapshot.sessions = self.order(std::mem::take(&mut snapshot.sessions));
        Ok(snapshot)
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.trip().await;
        if self.take_finish_failure() {
            if self.finish_fault == FinishFault::After {
                let _ = self.inner.finish(router, incarnation).await;
            }
            return Err(FinishError::Backend(unavailable()));
        }
        self.inner.finish(router, incarnation).await
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.trip().await;
        self.inner.audit().await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.trip().await;
        self.inner.census().await
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.trip().await;
        self.inner.repair(findings).await
    }
}

const R: RouterId = RouterId::new(1);
const N: u64 = 300;
const LIMIT: Duration = Duration::from_secs(600);
const MS: Duration = Duration::from_millis(1);

fn deleter<S: SessionStore<Payload = ()>>(
    store: Arc<S>,
    confirm: Notify,
    by_handle: bool,
) -> RouterDeleter<S, Arc<ScriptedNotifier<S>>> {
    let notifier = if by_handle {
        ScriptedNotifier::by_handle(
            Arc::clone(&store),
            session_lifecycle::test_util::Script::always(confirm),
        )
    } else {
        ScriptedNotifier::always(Arc::clone(&store), confirm)
    };
    RouterDeleter::builder()
        .batch_size(64)
        .confirm_timeout(Duration::from_secs(1))
        .retries(1)
        .build(store, notifier)
        .expect("valid settings")
}

async fn assert_clean<S: SessionStore>(store: &S) {
    let audit = store.audit().await.expect("audit");
    assert!(audit.is_clean(), "I7: {audit:?}");
}

/// I1 for `observed` (see `ObservedRouter::assert_deleted`), then I7.
async fn deleted_and_clean<S: SessionStore<Payload = ()>>(observed: ObservedRouter, store: &S) {
    observed.assert_deleted(store).await;
    assert_clean(store).await;
}

/// Half the sessions confirm through the store (by key), half are forced;
/// the default `unlink_closed` leaves every one of them to `finish`.
#[tokio::test(start_paused = true)]
async fn minimal_store_deletion_keeps_i1() {
    within(LIMIT, async {
        let store = Arc::new(MinimalStore::new(MS));
        let observed = ObservedRouter::fill(&*store, R, 0, N).await;
        let d = deleter(Arc::clone(&store), Notify::Confirm(Subset::EvenIds), false);
        let report = report_within(HOUR, d.delete(R)).await;
        assert_eq!(report.sessions, N as usize);
        assert_eq!(
            report.confirmed + report.forced + report.closed_otherwise,
            N as usize
        );
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}

/// Confirmations by handle never leave the store on their own: with the
/// default `unlink_closed`, `finish` must remove them.
#[tokio::test(start_paused = true)]
async fn minimal_store_confirmed_by_handle_keeps_i1() {
    within(LIMIT, async {
        let store = Arc::new(MinimalStore::new(MS).reversed());
        let observed = ObservedRouter::fill(&*store, R, 0, N).await;
        let d = deleter(Arc::clone(&store), Notify::Confirm(Subset::OddIds), true);
        let report = report_within(HOUR, d.delete(R)).await;
        assert_eq!(report.sessions, N as usize);
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}

/// The same store, type-erased behind `BoxStore`, with late confirmations
/// from the router's own task.
#[tokio::test(start_paused = true)]
async fn boxed_minimal_store_deletion_keeps_i1() {
    within(LIMIT, async {
        let store = Arc::new(BoxStore::new(MinimalStore::new(MS).reversed()));
        let observed = ObservedRouter::fill(&*store, R, 0, N).await;
        let d = deleter(
            Arc::clone(&store),
            Notify::Later {
                delay: Duration::from_millis(200),
                confirm: Subset::PerMille {
                    per_mille: 700,
                    seed: 7,
                },
            },
            false,
        );
        let report = report_within(HOUR, d.delete(R)).await;
        assert_eq!(report.sessions, N as usize);
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}

/// A router confirms long after it was forced, once its ids went to new
/// sessions on another router: through a slow, reordering custom store
/// behind `BoxStore`, the late confirmations touch none of them (I9).
#[tokio::test(start_paused = true)]
async fn late_confirmations_through_a_slow_boxed_store_leave_reused_ids_alone() {
    within(LIMIT, async {
        let store = Arc::new(BoxStore::new(MinimalStore::new(MS).reversed()));
        let observed = ObservedRouter::fill(&*store, R, 0, 50).await;
        let late = Duration::from_secs(120);
        let d = deleter(
            Arc::clone(&store),
            Notify::Later {
                delay: late,
                confirm: Subset::All,
            },
            false,
        );
        let report = report_within(HOUR, d.delete(R)).await;
        assert_eq!(report.forced, 50);
        observed.assert_deleted(&*store).await;
        let other = RouterId::new(2);
        let incarnation = store.register_router(other).await.unwrap();
        let mut fresh = Vec::new();
        for id in 0..50 {
            fresh.push(
                store
                    .create(NewSession::new(SessionId::new(id), other, incarnation))
                    .await
                    .unwrap(),
            );
        }
        // Every late confirmation lands (two rounds were sent).
        tokio::time::sleep(late * 3).await;
        for session in &fresh {
            assert_eq!(session.state(), SessionState::Active, "I9: {session:?}");
            let stored = store.get(session.id()).await.unwrap().expect("kept");
            assert!(Session::ptr_eq(&stored, session), "I9: {session:?}");
        }
        assert_eq!(store.count(other).await.unwrap(), 50);
        assert_clean(&*store).await;
    })
    .await;
}

/// `finish` fails with `Unavailable` once (`fault`), the routers confirming
/// `confirmed` (by handle or by key): the first `delete` reports the store
/// error (the router still fenced if nothing applied), and a second call
/// answers as `resumed` says; I1 holds.
async fn finish_fails_once_then_resumes(
    fault: FinishFault,
    (confirmed, by_handle): (Subset, bool),
    resumed: fn(&Result<DeleteOutcome, DeleteError>) -> bool,
) {
    within(LIMIT, async {
        let store = Arc::new(MinimalStore::new(MS).failing_finish(1, fault));
        let observed = ObservedRouter::fill(&*store, R, 0, N).await;
        let d = deleter(Arc::clone(&store), Notify::Confirm(confirmed), by_handle);
        // "[`DeleteError::Store`] if the store's backend failed ... the
        // router stays fenced and another call resumes it."
        let first = within(HOUR, d.delete(R)).await;
        assert!(matches!(first, Err(DeleteError::Store { .. })), "{first:?}");
        if matches!(fault, FinishFault::Before) {
            assert!(
                matches!(store.router_status(R).await, Ok(RouterStatus::Fenced(_))),
                "the router stays fenced after a store error"
            );
        }
        let second = within(HOUR, d.delete(R)).await;
        assert!(resumed(&second), "resume failed: {second:?}");
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}

/// `finish` fails before applying: a second call resumes the deletion.
#[tokio::test(start_paused = true)]
async fn transient_finish_failure_then_resume_keeps_i1() {
    finish_fails_once_then_resumes(FinishFault::Before, (Subset::EvenIds, true), |second| {
        matches!(second, Ok(DeleteOutcome::Deleted(_)))
    })
    .await;
}

/// `finish` applies but its answer is lost (`Unavailable`, "may or may not
/// have applied"): a second call sees the router deleted.
#[tokio::test(start_paused = true)]
async fn finish_applied_but_answer_lost_then_resume_keeps_i1() {
    finish_fails_once_then_resumes(FinishFault::After, (Subset::OddIds, false), |second| {
        matches!(second, Ok(DeleteOutcome::AlreadyDeleted { .. }))
    })
    .await;
}

/// Liveness reaping through the minimal store behind `BoxStore`: every
/// silent session closed, removed, released once.
#[tokio::test(start_paused = true)]
async fn liveness_reaps_through_a_boxed_minimal_store() {
    within(LIMIT, async {
        let store = Arc::new(BoxStore::new(MinimalStore::new(MS).reversed()));
        let observed = ObservedRouter::fill(&*store, R, 0, 40).await;
        let monitor = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        for session in &observed.sessions {
            monitor.watch(session).unwrap();
        }
        while monitor.stats().reaped < 40 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        while store.count(R).await.unwrap() > 0 {
            tokio::time::sleep(MS).await;
        }
        for (session, released) in observed.sessions.iter().zip(&observed.releases) {
            assert_eq!(session.close_reason(), Some(CloseReason::LivenessTimeout));
            assert_eq!(released.load(Ordering::SeqCst), 1, "{session:?}");
        }
        assert_clean(&*store).await;
    })
    .await;
}

/// Reconciliation against a router that reports half its sessions, over a
/// store listing them in reverse: exactly the unreported ones go.
#[tokio::test(start_paused = true)]
async fn reconcile_through_a_reordering_store_closes_exactly_the_missing() {
    within(LIMIT, async {
        let store = Arc::new(MinimalStore::new(MS).reversed());
        let observed = ObservedRouter::fill(&*store, R, 0, 100).await;
        let reconciler = Reconciler::builder()
            .build(Arc::clone(&store))
            .expect("valid settings");
        let reported: Vec<SessionId> = (0..100)
            .filter(|i| i % 2 == 0)
            .map(SessionId::new)
            .collect();
        let report = reconciler
            .reconcile(R, observed.incarnation, reported)
            .await
            .unwrap();
        let mut closed = report.closed.clone();
        closed.sort();
        let expected: Vec<SessionId> = (0..100)
            .filter(|i| i % 2 == 1)
            .map(SessionId::new)
            .collect();
        assert_eq!(closed, expected);
        for (session, released) in observed.sessions.iter().zip(&observed.releases) {
            let odd = session.id().get() % 2 == 1;
            assert_eq!(session.is_closed(), odd, "{session:?}");
            assert_eq!(
                released.load(Ordering::SeqCst),
                usize::from(odd),
                "{session:?}"
            );
        }
        assert_eq!(store.count(R).await.unwrap(), 50);
        assert_clean(&*store).await;
    })
    .await;
}

/// The expiry monitor closes a session and removes it through a store whose
/// writes are slow; meanwhile the client's id goes to a new session. The
/// removal must act on the expired session only ("removed from the store
/// (by key: a new session that reuses its id is not touched)").
#[tokio::test(start_paused = true)]
async fn expiry_through_a_slow_store_leaves_a_reused_id_alone() {
    within(LIMIT, async {
        let store = Arc::new(MinimalStore::new(MS).slow_writes(Duration::from_secs(5)));
        let incarnation = store.register_router(R).await.unwrap();
        let id = SessionId::new(42);
        let old = store
            .create(NewSession::new(id, R, incarnation).expires_in(Duration::from_secs(10)))
            .await
            .unwrap();
        let monitor = ExpiryMonitor::builder()
            .build(Arc::clone(&store))
            .expect("valid settings");
        monitor.track(&old).unwrap();
        old.closed().await;
        assert_eq!(old.close_reason(), Some(CloseReason::Expired));
        // Straight at the backend, while the monitor's write is in flight:
        // the client's own close removes the old session, a new one takes
        // the id.
        let _ = store.inner.close(id, CloseReason::ClientClosed).await;
        let new = store
            .inner
            .create(NewSession::new(id, R, incarnation))
            .await
            .expect("the id is free");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(new.state(), SessionState::Active, "I9: {new:?} was closed");
        let stored = store.inner.get(id).await.unwrap().expect("I9: new removed");
        assert!(Session::ptr_eq(&stored, &new));
        assert_clean(&*store).await;
    })
    .await;
}

/// The caller of `delete` gives up halfway (its future dropped) over a slow
/// boxed store; the run goes on, and another call returns its outcome
/// with I1 (I6).
#[tokio::test(start_paused = true)]
async fn dropped_delete_over_a_slow_boxed_store_still_ends_with_i1() {
    within(LIMIT, async {
        let store = Arc::new(BoxStore::new(
            MinimalStore::new(MS).slow_writes(Duration::from_millis(3)),
        ));
        let observed = ObservedRouter::fill(&*store, R, 0, N).await;
        let d = deleter(
            Arc::clone(&store),
            Notify::Slow {
                delay: Duration::from_millis(100),
                confirm: Subset::EvenIds,
            },
            false,
        );
        let dropped = tokio::time::timeout(Duration::from_millis(150), d.delete(R)).await;
        assert!(dropped.is_err(), "the deletion should still be running");
        let outcome = within(HOUR, d.delete(R)).await.expect("deleted");
        assert!(matches!(outcome, DeleteOutcome::Deleted(_)), "{outcome:?}");
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}

/// `Lifecycle` over the boxed minimal store: sessions created through it
/// with an expiry are deleted with their router; the router comes back and
/// its new sessions reuse the ids; when the old expiries come up, the
/// expiry monitor touches none of the new sessions (I1, I9).
#[tokio::test(start_paused = true)]
async fn lifecycle_over_a_boxed_minimal_store_deletes_then_spares_reused_ids() {
    within(LIMIT, async {
        let store = Arc::new(BoxStore::new(
            MinimalStore::new(MS).reversed().slow_writes(MS),
        ));
        let notifier =
            ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::OddIds));
        let lifecycle = Lifecycle::builder(Arc::clone(&store), notifier)
            .deleter(
                RouterDeleter::builder()
                    .confirm_timeout(Duration::from_secs(1))
                    .retries(1),
            )
            .build()
            .expect("valid settings");
        let incarnation = store.register_router(R).await.unwrap();
        let mut observed = ObservedRouter {
            router: R,
            incarnation,
            sessions: Vec::new(),
            releases: Vec::new(),
            waiters: Vec::new(),
        };
        for id in 0..100 {
            let spec = NewSession::new(SessionId::new(id), R, incarnation)
                .expires_in(Duration::from_secs(30));
            observed.observe(lifecycle.create(spec).await.unwrap());
        }
        let report = report_within(HOUR, lifecycle.deleter().delete(R)).await;
        assert_eq!(report.sessions, 100);
        observed.assert_deleted(&*store).await;

        let again = store.register_router(R).await.unwrap();
        assert!(again > incarnation);
        let mut fresh = Vec::new();
        for id in 0..100 {
            let spec = NewSession::new(SessionId::new(id), R, again)
                .expires_in(Duration::from_secs(3_600));
            fresh.push(lifecycle.create(spec).await.unwrap());
        }
        // The old expiries (and the minute sweep) come and go.
        tokio::time::sleep(Duration::from_secs(180)).await;
        for session in &fresh {
            assert_eq!(session.state(), SessionState::Active, "I9: {session:?}");
            let stored = store.get(session.id()).await.unwrap().expect("kept");
            assert!(Session::ptr_eq(&stored, session), "I9: {session:?}");
        }
        assert_eq!(store.count(R).await.unwrap(), 100);
        assert_clean(&*store).await;
        let _ = lifecycle.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

/// Clients keep creating sessions on the router while it is deleted through
/// a slow store (every call yields and takes time): every create that
/// succeeded is part of the deletion (I1), and none succeeds once the
/// deletion returned (I2).
#[tokio::test(start_paused = true)]
async fn creates_racing_a_deletion_through_a_slow_store_leave_no_zombie() {
    within(LIMIT, async {
        let store = Arc::new(MinimalStore::new(MS).reversed());
        let mut observed = ObservedRouter::fill(&*store, R, 0, 50).await;
        let incarnation = observed.incarnation;
        let creators: Vec<_> = (0..8u64)
            .map(|task| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut made = Vec::new();
                    for step in 0..100u64 {
                        let id = SessionId::new(1_000 + task * 1_000 + step);
                        match store.create(NewSession::new(id, R, incarnation)).await {
                            Ok(session) => made.push(session),
                            Err(_) => break,
                        }
                    }
                    made
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = deleter(Arc::clone(&store), Notify::Confirm(Subset::EvenIds), false);
        let _report = report_within(HOUR, d.delete(R)).await;
        let late = store
            .create(NewSession::new(SessionId::new(999_999), R, incarnation))
            .await;
        assert!(late.is_err(), "I2: created after the deletion: {late:?}");
        for creator in creators {
            for session in creator.await.unwrap() {
                observed.observe(session);
            }
        }
        assert!(observed.sessions.len() > 50, "no create raced the deletion");
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}

/// Liveness reaping and reconciliation run against a router while its
/// deletion waits for confirmations that never come, all through a slow
/// boxed store: whoever closes each session, it is closed once, released
/// once, and gone when `delete` returns (I1, I3).
#[tokio::test(start_paused = true)]
async fn reaping_and_reconciling_during_a_deletion_through_a_slow_store_keep_i1() {
    within(LIMIT, async {
        let store = Arc::new(BoxStore::new(
            MinimalStore::new(MS).reversed().slow_writes(MS),
        ));
        let observed = ObservedRouter::fill(&*store, R, 0, 100).await;
        let monitor = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        for session in &observed.sessions[..50] {
            monitor.watch(session).unwrap();
        }
        let reconciler = Reconciler::builder()
            .build(Arc::clone(&store))
            .expect("valid settings");
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::None));
        let d = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(120))
            .retries(0)
            .build(Arc::clone(&store), notifier)
            .expect("valid settings");
        let deletion = tokio::spawn({
            let d = d.clone();
            async move { d.delete(R).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The router reports only its first 75 sessions.
        let reported: Vec<SessionId> = (0..75).map(SessionId::new).collect();
        let _ = reconciler
            .reconcile(R, observed.incarnation, reported)
            .await;
        let outcome = within(HOUR, deletion).await.unwrap().expect("deleted");
        assert!(matches!(outcome, DeleteOutcome::Deleted(_)), "{outcome:?}");
        deleted_and_clean(observed, &*store).await;
    })
    .await;
}
