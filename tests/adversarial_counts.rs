//! Adversarial suite: every number the crate reports must agree with the
//! truth when it is read, and after each operation ends.
//!
//! The truth is what the store holds, looked up session by session
//! (`get`, same handle), and each session's own state and close reason.
//! The numbers are the store's `len`, `count`, listing and `census`,
//! `Stats`, the deleter's `running` and `DeletionReport`, the
//! `RouterFenced` event, the liveness and expiry monitors' stats, the
//! reclaim queue's stats, and (one test, a recorder local to its thread)
//! the `metrics` counters and gauges.
//!
//! The moments: a `finish` dropped halfway through its slices, a deletion
//! held at `finish` by a store of the user's own, a deletion resumed after
//! its runtime was dropped, ids reused while the old router's deletion
//! waits, liveness probes and reaps racing a deletion, client closes
//! racing confirmations, and after `Lifecycle::shutdown`.
#![cfg(all(feature = "metrics", feature = "test-util"))]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use session_lifecycle::deleter::{Confirmations, DeletionReport};
use session_lifecycle::session::CloseOutcome;
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, FenceError, FenceSnapshot, FinishError, FinishReport,
    RegisterError, Repair, RouterCensus, RouterError, RouterStatus, SessionError,
};
use session_lifecycle::test_util::{HOUR, paused_runtime, within};
use session_lifecycle::{
    CloseReason, Event, EventBus, Incarnation, Lifecycle, LivenessMonitor, MemoryStore, NewSession,
    NotifyError, ProbeBatch, ProbeError, Prober, RouterDeleter, RouterId, Session, SessionId,
    SessionKey, SessionState, SessionStore, Stats, TerminationBatch, TerminationNotifier,
};
use tokio::sync::{Semaphore, watch};
use tokio::time::Duration;

/// More than two slices of 4,096: every sliced pass yields twice.
const SLICED: u64 = 10_000;

// ---------------------------------------------------------------------------
// The truth, and what the store says

/// What the store holds of `sessions` (by handle), by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    active: usize,
    terminating: usize,
    closed: usize,
}

impl Held {
    fn total(self) -> usize {
        self.active + self.terminating + self.closed
    }
}

async fn truth<S: SessionStore<Payload = ()>>(store: &S, sessions: &[Session]) -> Held {
    let mut held = Held::default();
    for session in sessions {
        let got = store.get(session.id()).await.expect("no backend");
        if !got.is_some_and(|got| Session::ptr_eq(&got, session)) {
            continue;
        }
        match session.state() {
            SessionState::Active => held.active += 1,
            SessionState::Terminating => held.terminating += 1,
            SessionState::Closed => held.closed += 1,
        }
    }
    held
}

/// Every way the store counts `router`'s sessions, against `sessions`
/// (all the router's, in this life): `count`, the listing, the census
/// entry, and `Stats` for the router.
async fn assert_router_counts<S: SessionStore<Payload = ()>>(
    store: &S,
    router: RouterId,
    sessions: &[Session],
    when: &str,
) -> Held {
    let held = truth(store, sessions).await;
    let count = store.count(router).await.expect("known router");
    let listed = store.sessions(router).await.expect("known router");
    let census = store.census().await.expect("no backend");
    let entry = census.iter().find(|c| c.router == router);
    let by_census = entry.map_or(Held::default(), |c| Held {
        active: c.active,
        terminating: c.terminating,
        closed: c.closed,
    });
    let stats = Stats::collect(store).await.expect("no backend");
    let by_stats = stats.router(router).map_or(Held::default(), |c| Held {
        active: c.active,
        terminating: c.terminating,
        closed: c.closed,
    });
    assert_eq!(count, held.total(), "{when}: count({router}) vs the store");
    assert_eq!(
        listed.len(),
        held.total(),
        "{when}: sessions({router}) vs the store"
    );
    assert!(
        listed
            .iter()
            .all(|s| sessions.iter().any(|own| Session::ptr_eq(own, s))),
        "{when}: the listing names a session that is not this router's"
    );
    assert_eq!(by_census, held, "{when}: census of {router} vs the store");
    assert_eq!(by_stats, held, "{when}: Stats of {router} vs the store");
    held
}

/// The report's counts against the sessions' own close reasons; the sum
/// the report documents.
fn assert_report_adds_up(report: &DeletionReport, when: &str) {
    assert_eq!(
        report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
        report.sessions,
        "{when}: confirmed + already_closed + closed_otherwise + forced == sessions: {report:?}"
    );
    let phases = report.durations.fence
        + report.durations.mark
        + report.durations.notify
        + report.durations.wait
        + report.durations.force
        + report.durations.finish;
    assert!(
        phases <= report.durations.total,
        "{when}: the phases outlast the whole run: {report:?}"
    );
}

fn by_reason(sessions: &[Session], reason: CloseReason) -> usize {
    sessions
        .iter()
        .filter(|s| s.close_reason() == Some(reason))
        .count()
}

// ---------------------------------------------------------------------------
// A user's store around `MemoryStore`, with `finish` held at a gate

struct Gated {
    inner: MemoryStore,
    gate: Semaphore,
    at_finish: watch::Sender<usize>,
}

impl Gated {
    fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            gate: Semaphore::new(0),
            at_finish: watch::Sender::new(0),
        }
    }

    async fn wait_at_finish(&self) {
        let mut at = self.at_finish.subscribe();
        within(HOUR, at.wait_for(|&n| n > 0))
            .await
            .expect("sender alive");
    }
}

impl SessionStore for Gated {
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
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        self.inner.remove(id).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(key, reason).await
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
        self.at_finish.send_modify(|n| *n += 1);
        self.gate.acquire().await.expect("gate open").forget();
        self.inner.finish(router, incarnation).await
    }
    async fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session],
    ) -> Result<usize, FinishError> {
        self.inner
            .unlink_closed(router, incarnation, sessions)
            .await
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

async fn fill<S: SessionStore<Payload = ()>>(
    store: &S,
    router: RouterId,
    ids: std::ops::Range<u64>,
) -> (Incarnation, Vec<Session>) {
    let incarnation = match store.router_status(router).await {
        Ok(RouterStatus::Live(incarnation)) => incarnation,
        _ => store.register_router(router).await.expect("registers"),
    };
    let mut sessions = Vec::new();
    for id in ids {
        sessions.push(
            store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .expect("created"),
        );
    }
    (incarnation, sessions)
}

fn report_of(
    outcome: Result<
        Result<session_lifecycle::deleter::DeleteOutcome, session_lifecycle::deleter::DeleteError>,
        tokio::task::JoinError,
    >,
) -> DeletionReport {
    match outcome {
        Ok(Ok(session_lifecycle::deleter::DeleteOutcome::Deleted(report))) => report,
        other => panic!("expected a deletion report, got {other:?}"),
    }
}

fn fenced_events(events: &mut session_lifecycle::events::Subscription) -> Vec<(usize, bool)> {
    let mut fenced = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::RouterFenced {
            sessions, resumed, ..
        } = event
        {
            fenced.push((sessions, resumed));
        }
    }
    fenced
}

// ---------------------------------------------------------------------------
// A finish dropped between its slices, then resumed

/// Plays a controller whose own deletion code calls `finish` and is
/// cancelled between two of its slices (a timeout around it), then calls
/// it again. Before the fence, after confirmations through the store and
/// through the handles, after every slice of the dropped finish and after
/// the resumed one, `len`, `count`, the listing, the census and `Stats`
/// must each say what the store holds.
#[tokio::test(start_paused = true)]
async fn a_finish_dropped_between_slices_and_resumed_keeps_every_count_true() {
    let store = MemoryStore::new();
    let router = RouterId::new(1);
    let (incarnation, sessions) = fill(&store, router, 0..SLICED).await;
    assert_router_counts(&store, router, &sessions, "created").await;
    let snapshot = store.fence(router).await.expect("fenced");
    assert_eq!(snapshot.sessions.len(), SLICED as usize);
    drop(snapshot);
    for session in &sessions[..2_500] {
        assert!(
            store
                .close_exact(session.key(), CloseReason::RouterDeleted)
                .await
                .expect("stored")
                .won()
        );
    }
    for session in &sessions[2_500..3_500] {
        assert!(session.close(CloseReason::RouterDeleted).won());
    }
    for session in &sessions[3_500..5_000] {
        assert!(session.begin_terminating().won());
    }
    let held = assert_router_counts(&store, router, &sessions, "fenced, confirmed").await;
    assert_eq!(
        held,
        Held {
            active: 5_000,
            terminating: 1_500,
            closed: 1_000
        }
    );
    assert_eq!(store.len(), held.total());

    let mut finish = Box::pin(store.finish(router, incarnation));
    let mut steps = 0;
    loop {
        match futures::poll!(finish.as_mut()) {
            Poll::Ready(result) => panic!("finish ended at its first polls: {result:?}"),
            Poll::Pending => {}
        }
        steps += 1;
        let held = assert_router_counts(&store, router, &sessions, "mid-finish").await;
        assert_eq!(store.len(), held.total(), "mid-finish: len");
        if held.total() < 7_500 && held.total() > 0 {
            break;
        }
        assert!(steps < 100, "finish never removed a slice");
    }
    drop(finish);
    let held = assert_router_counts(&store, router, &sessions, "finish dropped").await;
    assert_eq!(store.len(), held.total(), "finish dropped: len");
    assert_eq!(
        held.active + held.terminating,
        0,
        "the close pass ran first"
    );

    let report = within(HOUR, store.finish(router, incarnation))
        .await
        .expect("resumed finish");
    assert_eq!(
        report.removed,
        held.total(),
        "removed by the resumed finish"
    );
    assert_eq!(report.closed, 0, "closed by the resumed finish");
    assert_eq!(store.len(), 0);
    assert!(store.census().await.expect("no backend").is_empty());
    let stats = Stats::collect(&store).await.expect("no backend");
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (0, 0, 0)
    );
    assert!(store.audit().await.expect("no backend").is_clean());
}

// ---------------------------------------------------------------------------
// A deletion held at finish: client closes, confirmations both ways, reuse

/// What a notifier did, for the test to wait on.
struct Splitter {
    store: Arc<Gated>,
    calls: watch::Sender<usize>,
}

impl TerminationNotifier for Splitter {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        unreachable!("notify_with is overridden")
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        if batch.round == 0 {
            // Ids 0..30 through the store, 30..60 by handle (twice, and
            // the first third again: duplicate answers), 60..100 left.
            for key in batch.sessions.iter().filter(|k| k.id().get() < 30) {
                let _ = self
                    .store
                    .close_exact(*key, CloseReason::RouterDeleted)
                    .await;
            }
            let by_handle: Vec<SessionKey> = batch
                .sessions
                .iter()
                .copied()
                .filter(|k| k.id().get() < 60)
                .collect();
            let _ = confirm.confirm_keys(by_handle.iter().copied());
            assert_eq!(confirm.confirm_keys(by_handle), 0, "answered twice");
        }
        self.calls.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// Plays a controller whose store holds the deletion at `finish` while
/// clients hang up (some through the store, some racing a second closer
/// on the same session) and a new router reuses the ids of the sessions
/// that already left. At the gate and after: the store's counts for both
/// routers, `Stats` with the deleter (`deletions_in_flight`), and the
/// report and its `RouterFenced` event against the sessions' own close
/// reasons.
#[tokio::test(start_paused = true)]
async fn a_deletion_held_at_finish_counts_right_with_client_closes_and_reused_ids() {
    let store = Arc::new(Gated::new());
    let bus = EventBus::new(1 << 16);
    let mut events = bus.subscribe();
    let (old, new) = (RouterId::new(1), RouterId::new(2));
    let (_, sessions) = fill(&*store, old, 0..100).await;
    let notifier = Arc::new(Splitter {
        store: Arc::clone(&store),
        calls: watch::Sender::new(0),
    });
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(10))
        .retries(0)
        .events(bus.clone())
        .build(Arc::clone(&store), Arc::clone(&notifier))
        .expect("valid settings");
    let run = tokio::spawn(deleter.delete(old));
    let mut calls = notifier.calls.subscribe();
    within(HOUR, calls.wait_for(|&n| n > 0))
        .await
        .expect("alive");
    assert_router_counts(&*store, old, &sessions, "after the first batch").await;
    // Clients hang up during the wait: 60..70 through the store, and
    // 70..75 by two closers at once (the handle, then the store).
    for session in &sessions[60..70] {
        let _ = store
            .close(session.id(), CloseReason::ClientClosed)
            .await
            .expect("stored");
    }
    for session in &sessions[70..75] {
        assert!(session.close(CloseReason::ClientClosed).won());
        assert!(
            !store
                .close(session.id(), CloseReason::ClientClosed)
                .await
                .expect("stored")
                .won()
        );
    }
    assert_router_counts(&*store, old, &sessions, "clients closed").await;
    store.wait_at_finish().await;
    let held = assert_router_counts(&*store, old, &sessions, "held at finish").await;
    assert_eq!(
        held.active + held.terminating,
        0,
        "everything is closed before finish"
    );
    let stats = Stats::collect(&*store)
        .await
        .expect("no backend")
        .with_deleter(&deleter);
    assert_eq!(stats.deletions_in_flight, Some(1));
    assert_eq!(deleter.running(), 1);
    assert_eq!(deleter.deleting(), [old]);
    assert_eq!(stats.active + stats.terminating, 0);
    assert_eq!(stats.closed_in_store, held.closed);

    // The ids of the sessions that left the store live again on `new`.
    let mut gone = Vec::new();
    for session in &sessions {
        if store.get(session.id()).await.expect("no backend").is_none() {
            gone.push(session.id().get());
        }
    }
    assert!(!gone.is_empty());
    let incarnation = store.register_router(new).await.expect("registers");
    let mut reused = Vec::new();
    for &id in &gone {
        reused.push(
            store
                .create(NewSession::new(SessionId::new(id), new, incarnation))
                .await
                .expect("the id is free"),
        );
    }
    assert_router_counts(&*store, old, &sessions, "ids reused, old").await;
    assert_router_counts(&*store, new, &reused, "ids reused, new").await;

    store.gate.add_permits(1);
    let report = report_of(within(HOUR, run).await);
    assert_report_adds_up(&report, "held deletion");
    assert_eq!(report.sessions, 100);
    assert_eq!(
        report.confirmed,
        by_reason(&sessions, CloseReason::RouterDeleted),
        "{report:?}"
    );
    assert_eq!(report.confirmed, 60, "{report:?}");
    assert_eq!(report.forced, by_reason(&sessions, CloseReason::Forced));
    assert_eq!(report.closed_otherwise, 15, "{report:?}");
    assert_eq!(report.already_closed, 0);
    assert_eq!(fenced_events(&mut events), [(100, false)]);
    assert_eq!(deleter.running(), 0);
    let stats = Stats::collect(&*store)
        .await
        .expect("no backend")
        .with_deleter(&deleter);
    assert_eq!(stats.deletions_in_flight, Some(0));
    assert!(stats.router(old).is_none(), "{stats:?}");
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (reused.len(), 0, 0)
    );
    assert_router_counts(&*store, new, &reused, "after, new").await;
    assert_eq!(store.inner.len(), reused.len());
}

// ---------------------------------------------------------------------------
// A deletion resumed after its runtime was dropped

/// Confirms ids below 50 through the store in its first call, then (once
/// `all` is set) every session of later calls by handle.
struct Resumable {
    store: Arc<MemoryStore>,
    all: std::sync::atomic::AtomicBool,
    calls: watch::Sender<usize>,
}

impl TerminationNotifier for Resumable {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        unreachable!("notify_with is overridden")
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        if self.all.load(Ordering::SeqCst) {
            confirm.confirm_all();
        } else {
            for key in batch.sessions.iter().filter(|k| k.id().get() < 50) {
                let _ = self
                    .store
                    .close_exact(*key, CloseReason::RouterDeleted)
                    .await;
            }
            // 50..60 by handle: closed, still in the store.
            let keys = batch.sessions.iter().copied();
            let _ = confirm.confirm_keys(keys.filter(|k| (50..60).contains(&k.id().get())));
        }
        self.calls.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// Plays a controller whose runtime is dropped in the middle of a
/// deletion (half its sessions confirmed through the store, some by
/// handle), then resumes it on a new runtime. Between the runtimes the
/// store's counts and the deleter's `running` must say what is left; the
/// resumed run's report and its `RouterFenced` event must count the
/// sessions held at its fence, and add up.
#[test]
fn a_deletion_resumed_after_a_dropped_runtime_reports_what_was_left() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(7);
    let bus = EventBus::new(1 << 12);
    let mut events = bus.subscribe();
    let notifier = Arc::new(Resumable {
        store: Arc::clone(&store),
        all: std::sync::atomic::AtomicBool::new(false),
        calls: watch::Sender::new(0),
    });
    let first = paused_runtime();
    let (sessions, deleter) = first.block_on(async {
        let (_, sessions) = fill(&*store, router, 0..100).await;
        let deleter = RouterDeleter::builder()
            .confirm_timeout(HOUR)
            .retries(0)
            .events(bus.clone())
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .expect("valid settings");
        drop(tokio::spawn(deleter.delete(router)));
        let mut calls = notifier.calls.subscribe();
        within(HOUR, calls.wait_for(|&n| n > 0))
            .await
            .expect("alive");
        assert_eq!(deleter.running(), 1);
        (sessions, deleter)
    });
    drop(first);
    assert_eq!(deleter.running(), 0, "the run went with its runtime");
    assert!(deleter.deleting().is_empty());
    assert_eq!(fenced_events(&mut events), [(100, false)]);
    let runtime = paused_runtime();
    runtime.block_on(async {
        let held = assert_router_counts(&*store, router, &sessions, "between runtimes").await;
        assert_eq!(
            held,
            Held {
                active: 0,
                terminating: 40,
                closed: 10
            }
        );
        assert_eq!(store.len(), 50);
        notifier.all.store(true, Ordering::SeqCst);
        let report = report_of(within(HOUR, tokio::spawn(deleter.delete(router))).await);
        assert!(report.resumed);
        assert_report_adds_up(&report, "resumed");
        assert_eq!(
            (
                report.sessions,
                report.already_closed,
                report.confirmed,
                report.forced
            ),
            (50, 10, 40, 0),
            "{report:?}"
        );
        assert_eq!(fenced_events(&mut events), [(50, true)]);
        assert_eq!(deleter.running(), 0);
        assert!(store.is_empty());
        assert!(store.census().await.expect("no backend").is_empty());
    });
}

// ---------------------------------------------------------------------------
// Liveness probes and reaps racing a deletion

/// A prober whose routers never answer (each call hangs past the probe
/// timeout), counting its calls.
struct Hanging(AtomicUsize);

impl Prober for Hanging {
    async fn probe(&self, _batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// A notifier that never confirms.
struct Deaf;

impl TerminationNotifier for Deaf {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// Plays a controller whose sessions stop heartbeating on two routers:
/// the monitor suspects them and probes (the routers never answer), and
/// while the probe round is in flight the controller deletes one router
/// and a client closes a session of the other. Once the dust settles
/// (one reap bound later), the monitor's `watched`, `suspects` and
/// `partition_suspected` must be back to zero, `reaped` must be the
/// sessions closed for liveness (none counted twice), and the deletion's
/// report must add up against the close reasons.
#[tokio::test(start_paused = true)]
async fn liveness_counters_settle_to_the_truth_after_reaps_race_a_deletion() {
    let store = Arc::new(MemoryStore::new());
    let (deleted, reaped) = (RouterId::new(1), RouterId::new(2));
    let (_, doomed) = fill(&*store, deleted, 0..20).await;
    let (_, dying) = fill(&*store, reaped, 100..120).await;
    let prober = Arc::new(Hanging(AtomicUsize::new(0)));
    let monitor = LivenessMonitor::builder()
        .heartbeat_interval(Duration::from_secs(1))
        .timeout_range(Duration::from_secs(1), Duration::from_secs(5))
        .probe_timeout(Duration::from_secs(2))
        .probe_retries(1)
        .partition_guard(false)
        .build(Arc::clone(&store), Arc::clone(&prober))
        .expect("valid settings");
    for session in doomed.iter().chain(&dying) {
        monitor.watch(session).expect("watched");
    }
    assert_eq!(monitor.stats().watched, 40);
    // Wait until both routers are being probed.
    within(HOUR, async {
        while prober.0.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let stats = monitor.stats();
    assert_eq!((stats.watched, stats.suspects), (40, 40), "{stats:?}");
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .retries(0)
        .build(Arc::clone(&store), Deaf)
        .expect("valid settings");
    let run = tokio::spawn(deleter.delete(deleted));
    let _ = store
        .close(dying[0].id(), CloseReason::ClientClosed)
        .await
        .expect("stored");
    let report = report_of(within(HOUR, run).await);
    assert_report_adds_up(&report, "deletion racing probes");
    let bound = monitor.reap_bound(Duration::from_secs(5));
    tokio::time::sleep(bound + Duration::from_secs(1)).await;
    let stats = monitor.stats();
    let reaped_now = by_reason(&doomed, CloseReason::LivenessTimeout)
        + by_reason(&dying, CloseReason::LivenessTimeout);
    assert_eq!(reaped_now, 19, "every silent session of the live router");
    assert_eq!(stats.reaped, reaped_now as u64, "{stats:?}");
    assert_eq!(
        (stats.watched, stats.suspects, stats.partition_suspected),
        (0, 0, false),
        "nothing is watched any more: {stats:?}"
    );
    assert_eq!(report.forced, by_reason(&doomed, CloseReason::Forced));
    assert!(store.is_empty());
    let stats = Stats::collect(&*store)
        .await
        .expect("no backend")
        .with_liveness(&monitor);
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (0, 0, 0)
    );
}

// ---------------------------------------------------------------------------
// A `Lifecycle` deletion: every piece comes back to zero

/// Plays a controller on a `Lifecycle` whose sessions carry an expiry
/// (tracked by the expiry monitor), are watched and heartbeat, and hold
/// resources of two classes released through the reclaim queue; its
/// router is deleted and never confirms, so every session is forced
/// while a few clients hang up. Once each piece's documented delay has
/// passed (one reap bound for the liveness monitor, a minute and a tick
/// for the expiry monitor), `stats()` must count nothing left anywhere,
/// and the queue must have completed one release per class per session.
#[tokio::test(start_paused = true)]
async fn a_lifecycle_deletion_brings_every_piece_back_to_zero() {
    use session_lifecycle::ResourceClass;
    use session_lifecycle::session::Classed;
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_secs(2))
                .retries(1),
        )
        .liveness(
            LivenessMonitor::builder()
                .heartbeat_interval(Duration::from_secs(1))
                .timeout_range(Duration::from_secs(1), Duration::from_secs(5)),
        )
        .without_sweeper()
        .build()
        .expect("valid settings");
    let router = RouterId::new(4);
    let incarnation = store.register_router(router).await.expect("registers");
    let released = Arc::new(AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for id in 0..50 {
        let spec = NewSession::new(SessionId::new(id), router, incarnation)
            .expires_in(Duration::from_secs(3_600));
        let session = lifecycle.create(spec).await.expect("created");
        for class in [ResourceClass::Critical, ResourceClass::Low] {
            let released = Arc::clone(&released);
            session
                .attach(Classed::new(class, move |_: CloseReason| {
                    released.fetch_add(1, Ordering::SeqCst);
                }))
                .expect("open");
        }
        lifecycle.liveness().watch(&session).expect("watched");
        sessions.push(session);
    }
    let stats = lifecycle.stats().await.expect("no backend");
    assert_eq!(stats.expiry.map(|e| e.tracked), Some(50));
    assert_eq!(stats.liveness.map(|l| l.watched), Some(50));
    let beats = {
        let lifecycle = lifecycle.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            loop {
                for session in &sessions {
                    let _ = lifecycle.liveness().heartbeat(session);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let run = tokio::spawn(lifecycle.deleter().delete(router));
    tokio::task::yield_now().await;
    for session in &sessions[..5] {
        let _ = store
            .close(session.id(), CloseReason::ClientClosed)
            .await
            .expect("stored");
    }
    let report = report_of(within(HOUR, run).await);
    beats.abort();
    assert_report_adds_up(&report, "lifecycle deletion");
    assert_eq!(report.forced, by_reason(&sessions, CloseReason::Forced));
    assert_eq!(
        report.closed_otherwise + report.already_closed,
        by_reason(&sessions, CloseReason::ClientClosed)
    );
    for session in &sessions {
        within(HOUR, session.closed()).await;
    }
    assert_eq!(released.load(Ordering::SeqCst), 100, "each resource once");
    let bound = lifecycle.liveness().reap_bound(Duration::from_secs(5));
    tokio::time::sleep(bound.max(Duration::from_secs(61)) + Duration::from_secs(2)).await;
    let stats = lifecycle.stats().await.expect("no backend");
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (0, 0, 0)
    );
    assert!(stats.routers.is_empty(), "{:?}", stats.routers);
    assert_eq!(stats.deletions_in_flight, Some(0));
    let liveness = stats.liveness.expect("wired");
    assert_eq!(
        (liveness.watched, liveness.suspects, liveness.reaped),
        (0, 0, 0),
        "{liveness:?}"
    );
    let expiry = stats.expiry.expect("wired");
    assert_eq!((expiry.tracked, expiry.expired), (0, 0), "{expiry:?}");
    let reclaim = stats.reclaim.expect("wired");
    assert_eq!(
        (
            reclaim.depth,
            reclaim.in_flight,
            reclaim.outstanding.total()
        ),
        (0, 0, 0),
        "{reclaim:?}"
    );
    assert_eq!(reclaim.pushed, reclaim.completed, "{reclaim:?}");
    assert_eq!(reclaim.failed, 0);
}

// ---------------------------------------------------------------------------
// After `Lifecycle::shutdown`

/// Plays a controller that shuts its `Lifecycle` down while its watched
/// sessions are open, then (the controller's own code still running)
/// closes them through the store. `LivenessStats::watched` documents that
/// a session closed by someone else is counted only until its timer entry
/// comes up, within one timeout; with the monitor stopped, the number
/// must still come back to what it watches. Every other number of
/// `stats()` must say nothing is left.
#[tokio::test(start_paused = true)]
async fn after_lifecycle_shutdown_no_piece_counts_sessions_that_are_gone() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .liveness(
            LivenessMonitor::builder()
                .heartbeat_interval(Duration::from_secs(1))
                .timeout_range(Duration::from_secs(1), Duration::from_secs(5)),
        )
        .without_sweeper()
        .build()
        .expect("valid settings");
    let router = RouterId::new(3);
    let (_, sessions) = fill(&*store, router, 0..10).await;
    for session in &sessions {
        lifecycle.liveness().watch(session).expect("watched");
        lifecycle.liveness().heartbeat(session).expect("heard");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lifecycle.liveness().stats().watched, 10);
    let report = within(HOUR, lifecycle.shutdown(Duration::from_secs(5))).await;
    assert!(report.is_complete(), "{report:?}");
    for session in &sessions {
        let _ = store
            .close(session.id(), CloseReason::ClientClosed)
            .await
            .expect("stored");
    }
    let bound = lifecycle.liveness().reap_bound(Duration::from_secs(5));
    tokio::time::sleep(bound + Duration::from_secs(1)).await;
    let stats = within(HOUR, lifecycle.stats()).await.expect("no backend");
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (0, 0, 0)
    );
    assert_eq!(stats.deletions_in_flight, Some(0));
    assert_eq!(stats.routers_in_grace, Some(0));
    let reclaim = stats.reclaim.expect("wired");
    assert_eq!(
        (
            reclaim.depth,
            reclaim.in_flight,
            reclaim.outstanding.total()
        ),
        (0, 0, 0)
    );
    let liveness = stats.liveness.expect("wired");
    assert_eq!(
        (liveness.watched, liveness.suspects),
        (0, 0),
        "the stopped monitor holds none of the closed sessions: {liveness:?}"
    );
}

// ---------------------------------------------------------------------------
// Metrics

type Metric = (String, Vec<(String, String)>, DebugValue);

fn value(metrics: &[Metric], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| match v {
            DebugValue::Counter(c) => *c as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        })
}

/// What the recorder holds: the debugging snapshotter zeroes counters and
/// gauges as it reads them, so counters are summed here across reads, and
/// a gauge is read right after `Stats` set it.
struct Recorded {
    snapshotter: metrics_util::debugging::Snapshotter,
    counters: HashMap<(String, Vec<(String, String)>), u64>,
}

impl Recorded {
    fn read(&mut self) -> Vec<Metric> {
        let mut read = Vec::new();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let name = key.name().to_owned();
            let value = match value {
                DebugValue::Counter(n) => {
                    let total = self
                        .counters
                        .entry((name.clone(), labels.clone()))
                        .or_default();
                    *total += n;
                    DebugValue::Counter(*total)
                }
                other => other,
            };
            read.push((name, labels, value));
        }
        read
    }
}

/// Plays a controller recording the crate's metrics (a recorder local to
/// the test's thread, which runs its current-thread runtime) through a
/// deletion held at `finish`: sessions closed by two closers at once
/// (client and store, store and handle), confirmed twice, forced, and a
/// watched session reaped. Each close must count once under its reason;
/// the deletion's outcome counters must match its report; gauges set by
/// `Stats` mid-deletion must say what the store holds, and come back to 0
/// once everything is gone.
#[test]
fn metrics_count_each_close_once_and_gauges_return_to_zero() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded {
        snapshotter: recorder.snapshotter(),
        counters: HashMap::new(),
    };
    metrics::with_local_recorder(&recorder, || {
        paused_runtime().block_on(metrics_scenario(&mut recorded));
    });
}

async fn metrics_scenario(recorded: &mut Recorded) {
    let store = Arc::new(Gated::new());
    let router = RouterId::new(9);
    let (_, sessions) = fill(&*store, router, 0..100).await;
    // Two closers on 0..5: the handle wins, the store loses.
    for session in &sessions[0..5] {
        assert!(session.close(CloseReason::ClientClosed).won());
        let _ = store
            .close(session.id(), CloseReason::ClientClosed)
            .await
            .expect("stored");
    }
    let notifier = Arc::new(Splitter {
        store: Arc::clone(&store),
        calls: watch::Sender::new(0),
    });
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(10))
        .retries(0)
        .build(Arc::clone(&store), Arc::clone(&notifier))
        .expect("valid settings");
    let run = tokio::spawn(deleter.delete(router));
    store.wait_at_finish().await;
    let held = assert_router_counts(&*store, router, &sessions, "metrics, at finish").await;
    let _ = Stats::collect(&*store)
        .await
        .expect("no backend")
        .with_deleter(&deleter);
    let m = recorded.read();
    let gauge = |state| value(&m, "session_lifecycle_sessions", &[("state", state)]);
    assert_eq!(gauge("active"), Some(0.0));
    assert_eq!(gauge("terminating"), Some(0.0));
    assert_eq!(gauge("closed"), Some(held.closed as f64));
    assert_eq!(
        value(&m, "session_lifecycle_deletions_in_flight", &[]),
        Some(1.0)
    );
    store.gate.add_permits(1);
    let report = report_of(within(HOUR, run).await);
    assert_report_adds_up(&report, "metrics deletion");

    let m = recorded.read();
    let closed = |reason: CloseReason| {
        value(
            &m,
            "session_lifecycle_sessions_closed_total",
            &[("reason", reason.as_str())],
        )
        .unwrap_or(0.0) as usize
    };
    for reason in [
        CloseReason::ClientClosed,
        CloseReason::RouterDeleted,
        CloseReason::Forced,
        CloseReason::Reclaimed,
    ] {
        assert_eq!(
            closed(reason),
            by_reason(&sessions, reason),
            "closes counted under {reason}"
        );
    }
    let outcome = |o| {
        value(
            &m,
            "session_lifecycle_deleted_sessions_total",
            &[("outcome", o)],
        )
        .unwrap_or(0.0) as usize
    };
    assert_eq!(outcome("confirmed"), report.confirmed);
    assert_eq!(outcome("forced"), report.forced);
    assert_eq!(outcome("already_closed"), report.already_closed);
    assert_eq!(
        value(&m, "session_lifecycle_routers_fenced_total", &[]),
        Some(1.0)
    );

    // A watched session on another router, never heard: reaped once.
    let other = RouterId::new(10);
    let (_, lonely) = fill(&*store, other, 500..501).await;
    let monitor = LivenessMonitor::builder()
        .timeout_range(Duration::from_secs(1), Duration::from_secs(5))
        .build(Arc::clone(&store), session_lifecycle::liveness::NoProbe)
        .expect("valid settings");
    monitor.watch(&lonely[0]).expect("watched");
    assert_eq!(
        within(HOUR, lonely[0].closed()).await,
        CloseReason::LivenessTimeout
    );
    let bound = monitor.reap_bound(Duration::from_secs(5));
    tokio::time::sleep(bound).await;
    let _ = Stats::collect(&*store)
        .await
        .expect("no backend")
        .with_deleter(&deleter)
        .with_liveness(&monitor);
    let m = recorded.read();
    assert_eq!(
        value(
            &m,
            "session_lifecycle_sessions_closed_total",
            &[("reason", "liveness_timeout")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "session_lifecycle_reaped_sessions_total", &[]),
        Some(1.0)
    );
    for state in ["active", "terminating", "closed"] {
        assert_eq!(
            value(&m, "session_lifecycle_sessions", &[("state", state)]),
            Some(0.0),
            "sessions{{state={state}}} once everything is gone"
        );
    }
    for gauge in [
        "session_lifecycle_deletions_in_flight",
        "session_lifecycle_watched_sessions",
        "session_lifecycle_suspect_sessions",
        "session_lifecycle_partition_suspected",
    ] {
        assert_eq!(value(&m, gauge, &[]), Some(0.0), "{gauge} once all is gone");
    }
}
