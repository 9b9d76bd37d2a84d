//! Adversarial suite: confirmation by handle (`deleter::Confirmations`) and
//! `SessionStore::unlink_closed`, with deletions big enough to run in
//! slices (more than 4,096 sessions, so every pass yields in between).
//!
//! Written as a controller author would, with the public API only: a
//! notifier that keeps each batch's `Confirmations` and answers late,
//! twice, out of order, from other threads, after the deletion returned,
//! or while the router lives again with its ids reused; a store of the
//! user's own that wraps `MemoryStore` and does not forward
//! `unlink_closed` (or forwards it slowly, or fails it); resources and
//! payloads that call back into the store and into the confirmations; a
//! notifier that panics inside a confirmation, and a runtime dropped in
//! the middle of a deletion.
//!
//! After each deletion: every session closed with a reason the report
//! accounts for, each resource released exactly once, the store holding
//! none of the old sessions (and the store's own counts saying so),
//! sessions reusing the ids untouched, and every payload dropped once the
//! deletion returned and the test dropped its handles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use session_lifecycle::deleter::{Confirmations, DeletionReport};
use session_lifecycle::session::CloseOutcome;
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, FenceError, FenceSnapshot, FinishError, FinishReport,
    RegisterError, Repair, RouterCensus, RouterError, RouterStatus, SessionError,
};
use session_lifecycle::test_util::{HOUR, InvariantChecker, paused_runtime, within};
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId,
    Session, SessionId, SessionKey, SessionState, SessionStore, TerminationBatch,
    TerminationNotifier,
};
use tokio::sync::{Semaphore, watch};
use tokio::time::Duration;

/// Sessions of a deletion that runs in slices: more than two slices of
/// 4,096, so every pass over them yields twice.
const SLICED: u64 = 10_000;
/// Sessions per notification batch.
const BATCH: usize = 1_000;
/// A real-time bound for a multi-thread test's wait: a bug shows as a
/// failure naming it, not as a hang.
const REAL: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Payloads and resources that count

/// What a payload's `Drop` does besides counting, set by a test.
type OnDrop = Arc<dyn Fn(SessionId) + Send + Sync>;

/// A session's payload: counts its drops (the session's memory freed),
/// and may call back (`on_drop`).
struct Payload {
    id: SessionId,
    drops: Arc<AtomicUsize>,
    on_drop: Option<OnDrop>,
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(on_drop) = &self.on_drop {
            on_drop(self.id);
        }
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

type Store = MemoryStore<Payload>;

/// One life of a router: its sessions, each with a resource counting its
/// releases, and the count of its payloads dropped.
struct Life {
    router: RouterId,
    incarnation: Incarnation,
    sessions: Vec<Session<Payload>>,
    releases: Vec<Arc<AtomicUsize>>,
    drops: Arc<AtomicUsize>,
}

impl Life {
    /// Registers `router` in `store` and creates `count` sessions with ids
    /// from `first`, each with a counting resource; payloads call `on_drop`.
    async fn fill<S>(
        store: &S,
        router: RouterId,
        first: u64,
        count: u64,
        on_drop: Option<OnDrop>,
    ) -> Self
    where
        S: SessionStore<Payload = Payload>,
    {
        let incarnation = store.register_router(router).await.expect("registers");
        let drops = Arc::new(AtomicUsize::new(0));
        let mut life = Life {
            router,
            incarnation,
            sessions: Vec::with_capacity(count as usize),
            releases: Vec::with_capacity(count as usize),
            drops,
        };
        for id in first..first + count {
            let id = SessionId::new(id);
            let payload = Payload {
                id,
                drops: Arc::clone(&life.drops),
                on_drop: on_drop.clone(),
            };
            let spec = NewSession::new(id, router, incarnation).payload(payload);
            let session = store.create(spec).await.expect("a live router takes it");
            let released = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&released);
            session
                .attach(move |_: CloseReason| {
                    counter.fetch_add(1, Ordering::SeqCst);
                })
                .expect("open");
            life.sessions.push(session);
            life.releases.push(released);
        }
        life
    }

    fn keys(&self) -> Vec<SessionKey> {
        self.sessions.iter().map(Session::key).collect()
    }

    fn count_reason(&self, reason: CloseReason) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.close_reason() == Some(reason))
            .count()
    }

    /// Asserts that nothing of this life was touched: every session open
    /// and stored (this very session of its id), no resource released.
    async fn assert_untouched<S: SessionStore<Payload = Payload>>(&self, store: &S, label: &str) {
        for (session, released) in self.sessions.iter().zip(&self.releases) {
            assert_eq!(
                session.state(),
                SessionState::Active,
                "{label}: {session:?}"
            );
            assert_eq!(released.load(Ordering::SeqCst), 0, "{label}: {session:?}");
            let stored = store.get(session.id()).await.expect("no backend");
            assert!(
                stored.is_some_and(|stored| Session::ptr_eq(&stored, session)),
                "{label}: {session:?} is not the stored session of its id"
            );
        }
        let count = store.count(self.router).await.expect("known");
        assert_eq!(count, self.sessions.len(), "{label}: count");
    }

    /// Asserts I1 after this life's deletion returned with `report`: the
    /// incarnation deleted and fenced for good, every session closed with
    /// a reason the report accounts for, released exactly once, out of the
    /// store; then drops the handles and asserts every payload dropped.
    async fn assert_deleted<S>(self, store: &S, report: &DeletionReport, label: &str)
    where
        S: SessionStore<Payload = Payload>,
    {
        let status = store.router_status(self.router).await;
        assert!(
            matches!(status, Ok(RouterStatus::Deleted(i)) if i == self.incarnation),
            "{label}: status {status:?}"
        );
        assert_eq!(
            store.count(self.router).await.ok(),
            Some(0),
            "{label}: count"
        );
        assert!(
            store.sessions(self.router).await.expect("known").is_empty(),
            "{label}: listing"
        );
        self.assert_gone(store, report, label).await;
    }

    /// The part of [`assert_deleted`](Self::assert_deleted) that holds
    /// even once the router lives again: every session closed, released
    /// once, not the stored session of its id, no create on the deleted
    /// incarnation, the report adding up, every payload dropped.
    async fn assert_gone<S>(self, store: &S, report: &DeletionReport, label: &str)
    where
        S: SessionStore<Payload = Payload>,
    {
        let n = self.sessions.len();
        for (session, released) in self.sessions.iter().zip(&self.releases) {
            assert!(session.is_closed(), "{label}: {session:?} open");
            let times = released.load(Ordering::SeqCst);
            assert_eq!(times, 1, "{label}: {session:?} released {times} times");
            let stored = store.get(session.id()).await.expect("no backend");
            assert!(
                !stored.is_some_and(|stored| Session::ptr_eq(&stored, session)),
                "{label}: {session:?} still stored"
            );
        }
        // Nothing attaches to the deleted incarnation again.
        let late = NewSession::new(SessionId::new(u64::MAX - 1), self.router, self.incarnation);
        let late = late.payload(Payload {
            id: SessionId::new(u64::MAX - 1),
            drops: Arc::new(AtomicUsize::new(0)),
            on_drop: None,
        });
        assert!(
            store.create(late).await.is_err(),
            "{label}: created on a deleted life"
        );
        // The report accounts for every session.
        assert_eq!(report.sessions, n, "{label}: {report:?}");
        assert_eq!(
            report.confirmed,
            self.count_reason(CloseReason::RouterDeleted),
            "{label}: {report:?}"
        );
        assert_eq!(
            report.confirmed + report.forced + report.already_closed + report.closed_otherwise,
            n,
            "{label}: {report:?}"
        );
        let drops = Arc::clone(&self.drops);
        drop(self);
        assert_eq!(drops.load(Ordering::SeqCst), n, "{label}: payloads dropped");
    }
}

fn report_of(
    outcome: Result<
        session_lifecycle::deleter::DeleteOutcome,
        session_lifecycle::deleter::DeleteError,
    >,
) -> DeletionReport {
    match outcome {
        Ok(outcome) => outcome.report().expect("deleted by this run").clone(),
        Err(error) => panic!("deletion failed: {error}"),
    }
}

// ---------------------------------------------------------------------------
// A notifier that confirms by handle, and keeps what it was given

/// How a batch is answered, inline in `notify_with`; returns how many the
/// answer closed.
type Answer = Box<dyn Fn(&TerminationBatch, &Arc<Confirmations>) -> usize + Send + Sync>;

/// Confirms only through `Confirmations` (its `notify` refuses), and keeps
/// every batch with its `Confirmations` for later answers.
struct Keeper {
    answer: Answer,
    kept: Mutex<Vec<(TerminationBatch, Arc<Confirmations>)>>,
    /// Batches received so far.
    batches: watch::Sender<usize>,
    /// What the inline answers closed.
    closed: AtomicUsize,
    plain_calls: AtomicUsize,
}

impl Keeper {
    fn new(
        answer: impl Fn(&TerminationBatch, &Arc<Confirmations>) -> usize + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            answer: Box::new(answer),
            kept: Mutex::new(Vec::new()),
            batches: watch::Sender::new(0),
            closed: AtomicUsize::new(0),
            plain_calls: AtomicUsize::new(0),
        })
    }

    /// Never answers inline.
    fn silent() -> Arc<Self> {
        Self::new(|_, _| 0)
    }

    /// Waits until `n` batches were received.
    async fn wait_batches(&self, n: usize) {
        let mut batches = self.batches.subscribe();
        batches
            .wait_for(|&got| got >= n)
            .await
            .expect("keeper alive");
    }

    fn take(&self) -> Vec<(TerminationBatch, Arc<Confirmations>)> {
        std::mem::take(&mut *self.kept.lock())
    }

    fn kept(&self) -> Vec<(TerminationBatch, Arc<Confirmations>)> {
        self.kept.lock().clone()
    }
}

impl TerminationNotifier for Keeper {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        self.plain_calls.fetch_add(1, Ordering::SeqCst);
        Err(NotifyError::msg("confirms by handle only"))
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        assert_eq!(confirm.len(), batch.sessions.len());
        let confirm = Arc::new(confirm);
        self.kept.lock().push((batch.clone(), Arc::clone(&confirm)));
        self.batches.send_modify(|n| *n += 1);
        let closed = (self.answer)(&batch, &confirm);
        self.closed.fetch_add(closed, Ordering::SeqCst);
        Ok(())
    }
}

/// Every way of confirming, on every kept batch: each must close nothing
/// (the deletion that sent them is over). Returns what they closed.
fn hammer(kept: &[(TerminationBatch, Arc<Confirmations>)]) -> usize {
    let mut closed = 0;
    for (batch, confirm) in kept {
        closed += confirm.confirm_all();
        closed += confirm.confirm_keys(batch.sessions.iter().rev().copied());
        for (index, &key) in batch.sessions.iter().enumerate() {
            closed += usize::from(confirm.confirm_key(key));
            closed += usize::from(confirm.confirm(index));
        }
    }
    closed
}

fn deleter<S: SessionStore, N: TerminationNotifier>(
    store: &Arc<S>,
    notifier: N,
    confirm_timeout: Duration,
    retries: u32,
) -> RouterDeleter<S, N> {
    RouterDeleter::builder()
        .batch_size(BATCH)
        .confirm_timeout(confirm_timeout)
        .retries(retries)
        .build(Arc::clone(store), notifier)
        .expect("valid settings")
}

// ---------------------------------------------------------------------------
// A user's own store around `MemoryStore`

/// What the wrapper does with `unlink_closed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unlink {
    /// Not implemented: the trait's default (removes nothing).
    Default,
    /// Forwarded as is.
    Forward,
    /// Forwarded a slice at a time, with a timer and a yield in between.
    Slow,
    /// Forwards the first half, then fails.
    FailHalf,
}

/// A store of the user's own: a `MemoryStore` behind every call, with
/// `unlink_closed` as `unlink` says, and `finish` held at a gate when one
/// is set (signalling `at_finish` first).
struct Wrapped {
    inner: Store,
    unlink: Unlink,
    unlink_calls: AtomicUsize,
    gate: Option<Arc<Semaphore>>,
    at_finish: watch::Sender<usize>,
}

impl Wrapped {
    fn new(unlink: Unlink) -> Self {
        Self {
            inner: Store::default(),
            unlink,
            unlink_calls: AtomicUsize::new(0),
            gate: None,
            at_finish: watch::Sender::new(0),
        }
    }
}

impl SessionStore for Wrapped {
    type Payload = Payload;

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(
        &self,
        spec: NewSession<Payload>,
    ) -> Result<Session<Payload>, CreateError<Payload>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session<Payload>>, BackendError> {
        self.inner.get(id).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close(id, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session<Payload>, SessionError> {
        self.inner.remove(id).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(key, reason).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session<Payload>, SessionError> {
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session<Payload>>, RouterError> {
        self.inner.sessions(router).await
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<Payload>, FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<Payload>, FenceError> {
        self.inner.fence_incarnation(router, incarnation).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.at_finish.send_modify(|n| *n += 1);
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.inner.finish(router, incarnation).await
    }
    async fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<Payload>],
    ) -> Result<usize, FinishError> {
        self.unlink_calls.fetch_add(1, Ordering::SeqCst);
        match self.unlink {
            Unlink::Default => Ok(0),
            Unlink::Forward => {
                self.inner
                    .unlink_closed(router, incarnation, sessions)
                    .await
            }
            Unlink::Slow => {
                let mut removed = 0;
                for slice in sessions.chunks(777) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    tokio::task::yield_now().await;
                    removed += self.inner.unlink_closed(router, incarnation, slice).await?;
                }
                Ok(removed)
            }
            Unlink::FailHalf => {
                let half = &sessions[..sessions.len() / 2];
                self.inner.unlink_closed(router, incarnation, half).await?;
                Err(FinishError::Backend(BackendError::new(
                    std::io::Error::other("the backend went away"),
                )))
            }
        }
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

/// The store's own counts for `router`, each way it gives them: `count`,
/// the listing, the census, and the sessions of the router in the map.
async fn counts<S: SessionStore<Payload = Payload>>(
    store: &S,
    router: RouterId,
    life: &Life,
) -> (usize, usize, usize, usize) {
    let count = store.count(router).await.expect("known");
    let listed = store.sessions(router).await.expect("known").len();
    let census = store
        .census()
        .await
        .expect("no backend")
        .iter()
        .find(|census| census.router == router)
        .map_or(0, RouterCensus::sessions);
    let mut stored = 0;
    for session in &life.sessions {
        let got = store.get(session.id()).await.expect("no backend");
        stored += usize::from(got.is_some_and(|got| Session::ptr_eq(&got, session)));
    }
    (count, listed, census, stored)
}

// ---------------------------------------------------------------------------
// The store's counts while a deletion is between `unlink_closed` and `finish`

/// Plays a controller that watches its store (`count`, `sessions`,
/// `census`, which `Stats` reads) while a sliced deletion is about to
/// finish: half the batches were confirmed by handle, the other half
/// through the store (`close_exact`), and `unlink_closed` has removed the
/// handle-confirmed ones. Every way the store counts the router's
/// sessions must agree with what the store actually holds.
#[tokio::test(start_paused = true)]
async fn the_store_counts_agree_while_a_sliced_deletion_waits_to_finish() {
    let mut store = Wrapped::new(Unlink::Forward);
    let gate = Arc::new(Semaphore::new(0));
    store.gate = Some(Arc::clone(&gate));
    let store = Arc::new(store);
    let router = RouterId::new(1);
    let life = Life::fill(&*store, router, 0, SLICED, None).await;
    let by_store = Arc::clone(&store);
    let ordinal = AtomicUsize::new(0);
    let notifier = Keeper::new(move |batch, confirm| {
        if ordinal.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            confirm.confirm_all()
        } else {
            let store = Arc::clone(&by_store);
            let keys = batch.sessions.clone();
            // A store call of a `MemoryStore` resolves at its first poll.
            for key in keys {
                let closed =
                    futures::executor::block_on(store.close_exact(key, CloseReason::RouterDeleted));
                assert!(closed.expect("stored").won());
            }
            0
        }
    });
    let deleter = deleter(&store, Arc::clone(&notifier), HOUR, 0);
    let run = tokio::spawn(deleter.delete(router));
    let mut at_finish = store.at_finish.subscribe();
    within(HOUR, at_finish.wait_for(|&n| n > 0))
        .await
        .expect("alive");
    assert_eq!(store.unlink_calls.load(Ordering::SeqCst), 1);
    let (count, listed, census, stored) = counts(&*store, router, &life).await;
    assert_eq!(
        stored, 0,
        "unlink_closed and close_exact removed every session"
    );
    assert_eq!(
        (count, listed, census),
        (stored, stored, stored),
        "count, listing and census of a fenced router against what the store holds"
    );
    gate.add_permits(1);
    let report = report_of(within(HOUR, run).await.expect("no panic"));
    assert_eq!((report.confirmed, report.forced), (SLICED as usize, 0));
    life.assert_deleted(&*store, &report, "gated").await;
}

// ---------------------------------------------------------------------------
// A user's store that does not forward `unlink_closed`, or does it badly

/// Plays a user's own store for each way it may treat `unlink_closed`:
/// not implemented (the default no-op), forwarded, forwarded slowly with
/// timers and yields in between, or failing after doing half. A sliced
/// deletion whose notifier confirms half the batches by handle (keys out
/// of order, some twice) and leaves the rest to the force pass must end
/// the same each time: every session closed and removed exactly once, the
/// store empty of them, its counts right, the payloads freed.
#[tokio::test(start_paused = true)]
async fn every_unlink_closed_behaviour_ends_with_every_session_removed_once() {
    for (step, unlink) in [
        Unlink::Default,
        Unlink::Forward,
        Unlink::Slow,
        Unlink::FailHalf,
    ]
    .into_iter()
    .enumerate()
    {
        let store = Arc::new(Wrapped::new(unlink));
        let router = RouterId::new(10 + step as u64);
        let life = Life::fill(&*store, router, 0, SLICED, None).await;
        // A neighbour the deletion must leave alone.
        let neighbour =
            Life::fill(&*store, RouterId::new(100 + step as u64), SLICED, 50, None).await;
        let ordinal = AtomicUsize::new(0);
        let notifier = Keeper::new(move |batch, confirm| {
            // Every other batch of the first round, in the order sent.
            if batch.round > 0 || !ordinal.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                return 0;
            }
            let closed = confirm.confirm_keys(batch.sessions.iter().rev().copied());
            // The router answers twice.
            assert_eq!(confirm.confirm_keys(batch.sessions.iter().copied()), 0);
            closed
        });
        let deleter = deleter(&store, Arc::clone(&notifier), Duration::from_secs(1), 0);
        let report = report_of(within(HOUR, deleter.delete(router)).await);
        let label = format!("{unlink:?}");
        assert_eq!(
            (report.confirmed, report.forced),
            (SLICED as usize / 2, SLICED as usize / 2),
            "{label}: {report:?}"
        );
        assert_eq!(
            notifier.closed.load(Ordering::SeqCst),
            report.confirmed,
            "{label}"
        );
        assert_eq!(notifier.plain_calls.load(Ordering::SeqCst), 0, "{label}");
        assert_eq!(store.unlink_calls.load(Ordering::SeqCst), 1, "{label}");
        assert_eq!(
            life.count_reason(CloseReason::Forced),
            SLICED as usize / 2,
            "{label}"
        );
        assert_eq!(store.inner.len(), 50, "{label}: only the neighbour is left");
        let census = store.census().await.expect("no backend");
        let total: usize = census.iter().map(RouterCensus::sessions).sum();
        assert_eq!(total, 50, "{label}: {census:?}");
        drop(deleter);
        // Late answers to the kept batches change nothing.
        assert_eq!(hammer(&notifier.take()), 0, "{label}");
        life.assert_deleted(&*store, &report, &label).await;
        neighbour.assert_untouched(&*store, &label).await;
        InvariantChecker::new().assert(&*store).await;
    }
}

// ---------------------------------------------------------------------------
// Late answers, from other threads, while the router lives again

/// Plays a router that answers long after its deletion returned (every
/// session forced), from two OS threads at once, while the router was
/// registered again and its ids reused by new sessions, and again while
/// that new life is itself being deleted with its own confirmations. The
/// old answers must close nothing and release nothing of the new life; the
/// new life's deletion must be confirmed whole by its own answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_answers_from_threads_never_touch_the_next_life() {
    let store = Arc::new(Store::default());
    let router = RouterId::new(20);
    let old = Life::fill(&*store, router, 0, SLICED, None).await;
    let silent = Keeper::silent();
    let old_deleter = deleter(&store, Arc::clone(&silent), Duration::from_millis(20), 0);
    let outcome = tokio::time::timeout(REAL, old_deleter.delete(router)).await;
    let old_report = report_of(outcome.expect("within bound"));
    assert_eq!(
        (old_report.confirmed, old_report.forced),
        (0, SLICED as usize)
    );
    let kept = Arc::new(silent.take());
    assert_eq!(kept.len(), SLICED as usize / BATCH);
    old.assert_deleted(&*store, &old_report, "old life").await;

    // The next life reuses every id.
    let new = Life::fill(&*store, router, 0, SLICED, None).await;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || hammer(&kept))
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("no panic"), 0);
    }
    new.assert_untouched(&*store, "after late answers").await;

    // The new life's deletion: its own answers come from a thread, the old
    // ones from two others, all at once.
    let own = Keeper::silent();
    let new_deleter = deleter(&store, Arc::clone(&own), REAL, 0);
    let run = tokio::spawn(new_deleter.delete(router));
    tokio::time::timeout(REAL, own.wait_batches(SLICED as usize / BATCH))
        .await
        .expect("every batch sent");
    let own_kept = own.kept();
    let answers = std::thread::spawn(move || {
        own_kept
            .iter()
            .rev()
            .map(|(batch, confirm)| confirm.confirm_keys(batch.sessions.iter().rev().copied()))
            .sum::<usize>()
    });
    let stale: Vec<_> = (0..2)
        .map(|_| {
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || hammer(&kept))
        })
        .collect();
    let report = report_of(
        tokio::time::timeout(REAL, run)
            .await
            .expect("bounded")
            .expect("no panic"),
    );
    assert_eq!(answers.join().expect("no panic"), SLICED as usize);
    for thread in stale {
        assert_eq!(thread.join().expect("no panic"), 0);
    }
    assert_eq!(
        (report.confirmed, report.forced),
        (SLICED as usize, 0),
        "{report:?}"
    );
    assert_eq!(report.incarnation, new.incarnation);
    new.assert_deleted(&*store, &report, "new life").await;
    assert_eq!(hammer(&own.take()), 0);
    assert!(store.is_empty());
}

/// Plays a router whose answers race the force pass of a sliced deletion
/// from two OS threads: one answers every batch key by key, last first,
/// the other index by index and then with `confirm_all` (so every answer
/// arrives twice). Each session must be closed exactly once, by one of
/// them or by the force pass, and the report must say which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_answers_from_two_threads_racing_the_force_pass_close_each_session_once() {
    for round in 0..3_u64 {
        let store = Arc::new(Store::default());
        let router = RouterId::new(30 + round);
        let life = Life::fill(&*store, router, 0, SLICED, None).await;
        let keeper = Keeper::silent();
        let deleter = deleter(&store, Arc::clone(&keeper), Duration::from_millis(2), 0);
        let run = tokio::spawn(deleter.delete(router));
        tokio::time::timeout(REAL, keeper.wait_batches(SLICED as usize / BATCH))
            .await
            .expect("every batch sent");
        let kept = Arc::new(keeper.kept());
        let by_key = {
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || {
                kept.iter()
                    .map(|(batch, confirm)| {
                        batch
                            .sessions
                            .iter()
                            .rev()
                            .filter(|&&key| confirm.confirm_key(key))
                            .count()
                    })
                    .sum::<usize>()
            })
        };
        let by_index = {
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || {
                kept.iter()
                    .map(|(_, confirm)| {
                        (0..confirm.len()).filter(|&i| confirm.confirm(i)).count()
                            + confirm.confirm_all()
                    })
                    .sum::<usize>()
            })
        };
        let report = report_of(
            tokio::time::timeout(REAL, run)
                .await
                .expect("bounded")
                .expect("no panic"),
        );
        let answered = by_key.join().expect("no panic") + by_index.join().expect("no panic");
        assert_eq!(report.confirmed, answered, "{report:?}");
        assert_eq!(
            report.confirmed + report.forced,
            SLICED as usize,
            "{report:?}"
        );
        assert_eq!(life.count_reason(CloseReason::Forced), report.forced);
        drop(kept);
        life.assert_deleted(&*store, &report, &format!("round {round}"))
            .await;
        InvariantChecker::new().assert(&*store).await;
    }
}

// ---------------------------------------------------------------------------
// User code calling back during a confirmation by handle

/// Runs `scenario` on a thread of its own and fails if it has not ended
/// within `REAL` of real time: a deadlock shows as a failure.
fn no_deadlock(name: &str, scenario: impl FnOnce() + Send + 'static) {
    let (done, ended) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        scenario();
        let _ = done.send(());
    });
    match ended.recv_timeout(REAL) {
        Ok(()) => thread.join().expect("no panic"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let panic = thread
                .join()
                .expect_err("ended without a word: it panicked");
            std::panic::resume_unwind(panic);
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: not finished within {REAL:?}: deadlocked")
        }
    }
}

/// Plays a controller whose resources and payloads call back while a
/// confirmation by handle closes their session: a resource's release
/// reads the store, closes its own session through the store (it leaves
/// the store in the middle of the confirmation), confirms the next session
/// of its batch through the same `Confirmations` (re-entrant), and creates
/// a session on another router; each payload's `Drop` reads the store and
/// confirms its batch again. No deadlock, no panic, every resource
/// released once, every payload dropped once, nothing left in the store
/// but the new sessions.
#[test]
fn resources_and_payloads_reentering_the_store_and_the_confirmations() {
    no_deadlock("reentrant confirmation", || {
        paused_runtime().block_on(async {
            let store = Arc::new(Store::default());
            let router = RouterId::new(40);
            let elsewhere = RouterId::new(41);
            let elsewhere_incarnation = store.register_router(elsewhere).await.expect("fresh");
            // Each session's batch, by key, for the call backs.
            let batches: Arc<Mutex<HashMap<SessionKey, Arc<Confirmations>>>> = Arc::default();
            let weak: Weak<Store> = Arc::downgrade(&store);
            let reentered = Arc::new(AtomicUsize::new(0));
            let on_drop: OnDrop = {
                let (weak, batches, reentered) =
                    (weak.clone(), Arc::clone(&batches), Arc::clone(&reentered));
                Arc::new(move |id| {
                    if let Some(store) = weak.upgrade() {
                        let got = futures::executor::block_on(store.get(id)).expect("no backend");
                        assert!(
                            got.is_none(),
                            "a payload dropped while its session is stored"
                        );
                        let _ = futures::executor::block_on(store.count(router));
                    }
                    let confirms: Vec<_> = batches.lock().values().cloned().collect();
                    for confirm in confirms.iter().take(3) {
                        assert_eq!(confirm.confirm_all(), 0);
                    }
                    reentered.fetch_add(1, Ordering::SeqCst);
                })
            };
            let life = Life::fill(&*store, router, 0, SLICED, Some(on_drop)).await;
            let keys = life.keys();
            let created = Arc::new(AtomicUsize::new(0));
            for (at, session) in life.sessions.iter().enumerate() {
                let (weak, batches, created) =
                    (weak.clone(), Arc::clone(&batches), Arc::clone(&created));
                let own = session.key();
                let next = keys[(at + 1) % keys.len()];
                session
                    .attach(move |reason: CloseReason| {
                        assert_eq!(reason, CloseReason::RouterDeleted);
                        let store = weak.upgrade().expect("the store lives");
                        assert!(futures::executor::block_on(store.count(router)).is_ok());
                        let closed = futures::executor::block_on(
                            store.close_exact(own, CloseReason::Forced),
                        );
                        assert!(!closed.expect("still stored").won(), "closed already");
                        // Even ids confirm the next (odd) one: one step of
                        // re-entrance, not a chain through the router.
                        let confirm = if own.id().get().is_multiple_of(2) {
                            batches.lock().get(&next).cloned()
                        } else {
                            None
                        };
                        if let Some(confirm) = confirm {
                            let _ = confirm.confirm_key(next);
                        }
                        let id = SessionId::new(1_000_000 + own.id().get());
                        let spec = NewSession::new(id, elsewhere, elsewhere_incarnation).payload(
                            Payload {
                                id,
                                drops: Arc::new(AtomicUsize::new(0)),
                                on_drop: None,
                            },
                        );
                        if futures::executor::block_on(store.create(spec)).is_ok() {
                            created.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                    .expect("open");
            }
            let map = Arc::clone(&batches);
            let notifier = Keeper::new(move |batch, confirm| {
                {
                    let mut map = map.lock();
                    for &key in &batch.sessions {
                        map.insert(key, Arc::clone(confirm));
                    }
                }
                // The router names the even ids; each odd one is confirmed
                // by the call back of its even neighbour (or, if that one
                // is in a batch not sent yet, by the second round).
                if batch.round == 0 {
                    let even = batch
                        .sessions
                        .iter()
                        .filter(|key| key.id().get().is_multiple_of(2));
                    confirm.confirm_keys(even.copied())
                } else {
                    confirm.confirm_all()
                }
            });
            let deleter = deleter(&store, Arc::clone(&notifier), Duration::from_secs(1), 1);
            let report = report_of(within(HOUR, deleter.delete(router)).await);
            assert_eq!(
                report.forced, 0,
                "the call backs reached every session: {report:?}"
            );
            assert_eq!(report.confirmed, SLICED as usize, "{report:?}");
            assert_eq!(created.load(Ordering::SeqCst), SLICED as usize);
            assert_eq!(
                store.len(),
                SLICED as usize,
                "only the sessions made elsewhere"
            );
            batches.lock().clear();
            drop(notifier);
            life.assert_deleted(&*store, &report, "reentrant").await;
            assert_eq!(reentered.load(Ordering::SeqCst), SLICED as usize);
            InvariantChecker::new().assert(&*store).await;
        });
    });
}

// ---------------------------------------------------------------------------
// A notifier that panics inside a confirmation

/// Keys from a router's answer, with a decoder that panics half way.
/// `ready` says whether it tells `confirm_keys` its keys are ready (then
/// the deletion's sessions are held while it runs, and across the panic).
struct Garbled {
    keys: std::vec::IntoIter<SessionKey>,
    left_before_panic: usize,
    ready: bool,
}

impl Iterator for Garbled {
    type Item = SessionKey;

    fn next(&mut self) -> Option<SessionKey> {
        assert!(self.left_before_panic > 0, "a garbled answer");
        self.left_before_panic -= 1;
        self.keys.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.ready {
            self.keys.size_hint()
        } else {
            (0, None)
        }
    }
}

/// Plays a notifier that panics inside `notify_with`, in the middle of a
/// `confirm_keys` call whose key iterator panics after half the batch
/// (with and without saying its keys are ready). The panic must be
/// contained as a failed notice; the sessions it closed stay confirmed,
/// the others are confirmed in the second round; all are removed once.
#[tokio::test(start_paused = true)]
async fn a_panic_inside_confirm_keys_is_contained_and_counted() {
    for ready in [true, false] {
        let store = Arc::new(Store::default());
        let router = RouterId::new(if ready { 50 } else { 51 });
        let life = Life::fill(&*store, router, 0, SLICED, None).await;
        let notifier = Keeper::new(move |batch, confirm| {
            if batch.round > 0 {
                return confirm.confirm_all();
            }
            let half = batch.sessions.len() / 2;
            let garbled = Garbled {
                keys: batch.sessions.clone().into_iter(),
                left_before_panic: half,
                ready,
            };
            confirm.confirm_keys(garbled)
        });
        let deleter = deleter(&store, Arc::clone(&notifier), Duration::from_secs(1), 1);
        let report = report_of(within(HOUR, deleter.delete(router)).await);
        let batches = SLICED as usize / BATCH;
        assert_eq!(
            report.notify_failures as usize, batches,
            "{ready}: {report:?}"
        );
        assert_eq!(
            (report.confirmed, report.forced, report.rounds),
            (SLICED as usize, 0, 2)
        );
        // The second round carried only the half the panics left open.
        let second: usize = notifier
            .kept()
            .iter()
            .filter(|(batch, _)| batch.round == 1)
            .map(|(batch, _)| batch.sessions.len())
            .sum();
        assert_eq!(second, SLICED as usize / 2, "{ready}");
        assert_eq!(hammer(&notifier.take()), 0);
        life.assert_deleted(&*store, &report, &format!("ready {ready}"))
            .await;
        InvariantChecker::new().assert(&*store).await;
    }
}

// ---------------------------------------------------------------------------
// A runtime dropped in the middle of a deletion

/// Plays a controller whose runtime is dropped while a sliced deletion
/// waits for its router's answers (one batch in ten answered by handle),
/// with every batch's `Confirmations` kept outside. The kept confirmations
/// must be dead from then on (the run is gone), the store must hold every
/// session (the answered ones closed, the others terminating), and a
/// deleter on a new runtime must resume the deletion to its end, while
/// the dead confirmations are tried again from another thread.
#[test]
fn a_runtime_dropped_mid_deletion_leaves_the_kept_confirmations_dead_and_the_resume_whole() {
    let store = Arc::new(Store::default());
    let router = RouterId::new(60);
    let first = paused_runtime();
    let (life, kept) = first.block_on(async {
        let life = Life::fill(&*store, router, 0, SLICED, None).await;
        let ordinal = AtomicUsize::new(0);
        let keeper = Keeper::new(move |_, confirm| {
            if ordinal.fetch_add(1, Ordering::SeqCst) == 0 {
                confirm.confirm_all()
            } else {
                0
            }
        });
        let deleter = deleter(&store, Arc::clone(&keeper), 10 * HOUR, 0);
        drop(tokio::spawn(deleter.delete(router)));
        within(HOUR, keeper.wait_batches(SLICED as usize / BATCH)).await;
        assert_eq!(keeper.closed.load(Ordering::SeqCst), BATCH);
        (life, keeper.take())
    });
    drop(first);
    assert_eq!(hammer(&kept), 0, "the run is gone with its runtime");
    assert_eq!(store.len(), SLICED as usize, "nothing left the store");
    let closed = life.sessions.iter().filter(|s| s.is_closed()).count();
    let terminating = life
        .sessions
        .iter()
        .filter(|s| s.state() == SessionState::Terminating)
        .count();
    assert_eq!((closed, terminating), (BATCH, SLICED as usize - BATCH));

    let kept = Arc::new(kept);
    paused_runtime().block_on(async {
        let keeper = Keeper::new(|_, confirm| confirm.confirm_all());
        let deleter = deleter(&store, Arc::clone(&keeper), HOUR, 0);
        let stale = {
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || (0..3).map(|_| hammer(&kept)).sum::<usize>())
        };
        let report = report_of(within(HOUR, deleter.delete(router)).await);
        assert_eq!(stale.join().expect("no panic"), 0);
        assert!(report.resumed, "{report:?}");
        assert_eq!(
            (report.already_closed, report.confirmed, report.forced),
            (BATCH, SLICED as usize - BATCH, 0),
            "{report:?}"
        );
        // The first run's confirmations count as confirmed sessions: the
        // report's closed-before-the-run ones are those.
        let mut report = report;
        report.confirmed += report.already_closed;
        report.already_closed = 0;
        life.assert_deleted(&*store, &report, "resumed").await;
        InvariantChecker::new().assert(&*store).await;
    });
    assert!(store.is_empty());
}

// ---------------------------------------------------------------------------
// A confirmation that outlives its deletion

/// Keys of an answer whose iterator says a key is ready, then blocks its
/// thread in `next` until told (a decoder that waits for the rest of a
/// frame): `confirm_keys` holds the deletion's sessions all that time.
struct Stalling {
    keys: std::vec::IntoIter<SessionKey>,
    stall_after: usize,
    stalled: Option<std::sync::mpsc::Sender<()>>,
    resume: std::sync::mpsc::Receiver<()>,
}

impl Iterator for Stalling {
    type Item = SessionKey;

    fn next(&mut self) -> Option<SessionKey> {
        if self.stall_after == 0 {
            if let Some(stalled) = self.stalled.take() {
                let _ = stalled.send(());
                let _ = self.resume.recv();
            }
            return None;
        }
        self.stall_after -= 1;
        self.keys.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (1, None)
    }
}

/// Plays a router answer whose key iterator stalls its thread (saying a
/// key is ready) until after the deletion returned, then ends; the
/// payloads' `Drop`, which then runs on that thread as it lets the
/// sessions go, reads the store and confirms again. The deletion must not
/// wait for it (the rest is forced at its deadline), and every payload
/// must be dropped once the stalled call returns, without deadlock.
#[test]
fn a_stalled_key_iterator_outliving_the_deletion_frees_the_sessions_when_it_ends() {
    no_deadlock("stalled confirmation", || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let store = Arc::new(Store::default());
            let router = RouterId::new(70);
            let slot: Arc<Mutex<Option<Arc<Confirmations>>>> = Arc::default();
            let weak = Arc::downgrade(&store);
            let on_drop: OnDrop = {
                let slot = Arc::clone(&slot);
                Arc::new(move |id| {
                    if let Some(store) = weak.upgrade() {
                        let got = futures::executor::block_on(store.get(id)).expect("no backend");
                        assert!(got.is_none());
                    }
                    let confirm = slot.lock().clone();
                    if let Some(confirm) = confirm {
                        assert_eq!(confirm.confirm_all(), 0);
                    }
                })
            };
            let life = Life::fill(&*store, router, 0, SLICED, Some(on_drop)).await;
            let keeper = Keeper::silent();
            let deleter = deleter(&store, Arc::clone(&keeper), Duration::from_millis(50), 0);
            let run = tokio::spawn(deleter.delete(router));
            tokio::time::timeout(REAL, keeper.wait_batches(SLICED as usize / BATCH))
                .await
                .expect("every batch sent");
            let (batch, confirm) = keeper.kept().swap_remove(0);
            *slot.lock() = Some(Arc::clone(&confirm));
            let (stalled, on_stall) = std::sync::mpsc::channel();
            let (resume, resumed) = std::sync::mpsc::channel();
            let answers = Stalling {
                keys: batch.sessions.clone().into_iter(),
                stall_after: 10,
                stalled: Some(stalled),
                resume: resumed,
            };
            let confirmer = {
                let confirm = Arc::clone(&confirm);
                std::thread::spawn(move || confirm.confirm_keys(answers))
            };
            on_stall.recv_timeout(REAL).expect("the answer stalls");
            let report = report_of(
                tokio::time::timeout(REAL, run)
                    .await
                    .expect("bounded")
                    .expect("no panic"),
            );
            assert_eq!(
                (report.confirmed, report.forced),
                (10, SLICED as usize - 10)
            );
            drop(keeper);
            resume.send(()).expect("the confirmer waits");
            assert_eq!(confirmer.join().expect("no panic"), 10);
            assert_eq!(hammer(&[(batch, confirm)]), 0);
            *slot.lock() = None;
            life.assert_deleted(&*store, &report, "stalled").await;
            InvariantChecker::new().assert(&*store).await;
        });
    });
}

// ---------------------------------------------------------------------------
// The router registered again while its old deletion still lets go

/// Plays a controller that registers a router again the moment its
/// deletion has tombstoned it, while that sliced deletion is still
/// letting go of the old index and handles, reuses every id at once for
/// the new life, and answers the old batches again. The new sessions must
/// stay open, stored and unreleased; the old deletion's report must be
/// whole.
#[tokio::test(start_paused = true)]
async fn a_new_life_reusing_the_ids_during_the_old_deletions_last_slices_is_untouched() {
    let store = Arc::new(Store::default());
    let router = RouterId::new(80);
    let old = Life::fill(&*store, router, 0, SLICED, None).await;
    let keeper = Keeper::new(|_, confirm| confirm.confirm_all());
    let deleter = deleter(&store, Arc::clone(&keeper), HOUR, 0);
    let returned = Arc::new(AtomicBool::new(false));
    let racer = {
        let (store, returned, keeper) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&keeper),
        );
        tokio::spawn(async move {
            let incarnation = loop {
                match store.register_router(router).await {
                    Ok(incarnation) => break incarnation,
                    Err(_) => tokio::task::yield_now().await,
                }
            };
            let early = !returned.load(Ordering::SeqCst);
            let drops = Arc::new(AtomicUsize::new(0));
            let mut new = Life {
                router,
                incarnation,
                sessions: Vec::new(),
                releases: Vec::new(),
                drops,
            };
            for id in 0..SLICED {
                let id = SessionId::new(id);
                let payload = Payload {
                    id,
                    drops: Arc::clone(&new.drops),
                    on_drop: None,
                };
                let spec = NewSession::new(id, router, incarnation).payload(payload);
                let session = store.create(spec).await.expect("the id is free");
                let released = Arc::new(AtomicUsize::new(0));
                let counter = Arc::clone(&released);
                session
                    .attach(move |_: CloseReason| {
                        counter.fetch_add(1, Ordering::SeqCst);
                    })
                    .expect("open");
                new.sessions.push(session);
                new.releases.push(released);
                if id.get().is_multiple_of(1_000) {
                    assert_eq!(hammer(&keeper.kept()), 0);
                    tokio::task::yield_now().await;
                }
            }
            (new, early)
        })
    };
    let report = report_of(within(HOUR, deleter.delete(router)).await);
    returned.store(true, Ordering::SeqCst);
    let (new, early) = within(HOUR, racer).await.expect("no panic");
    assert!(early, "the new life began before the old deletion returned");
    assert_eq!(hammer(&keeper.take()), 0);
    assert_eq!((report.confirmed, report.forced), (SLICED as usize, 0));
    new.assert_untouched(&*store, "new life").await;
    assert_eq!(store.len(), SLICED as usize);
    old.assert_gone(&*store, &report, "old life").await;
    new.assert_untouched(&*store, "new life, at the end").await;
    InvariantChecker::new().assert(&*store).await;
}
