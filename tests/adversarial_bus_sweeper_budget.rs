//! Adversarial tests of the event bus, the audit sweeper and the
//! notification budget: misbehaving subscribers, sweeps racing deletions
//! and id reuse, and budgets at the edges their builder accepts.
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use session_lifecycle::test_util::{Notify, ScriptedNotifier, report_within, within};
use session_lifecycle::{
    AuditSweeper, Backoff, CloseReason, Event, EventBus, Incarnation, MemoryStore, NewSession,
    NotificationBudget, RouterDeleter, RouterId, Session, SessionId, SessionKey, SessionStore,
    store, store::Corruption, store::RepairAction,
};
use tokio::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3_600);

fn budget(rate: u32, burst: u32) -> NotificationBudget {
    NotificationBudget::builder()
        .rate(rate)
        .burst(burst)
        .build()
        .expect("accepted settings")
}

/// Every event of the bus that is buffered now.
fn drain(events: &mut session_lifecycle::events::Subscription) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv()).collect()
}

async fn fill(store: &MemoryStore, router: RouterId, first: u64, n: u64) -> Vec<Session> {
    let incarnation = store.register_router(router).await.expect("fresh router");
    let mut sessions = Vec::new();
    for id in first..first + n {
        let spec = NewSession::new(SessionId::new(id), router, incarnation);
        sessions.push(store.create(spec).await.expect("live router"));
    }
    sessions
}

// ---------------------------------------------------------------- budget

/// Plays a controller that configures a rate the builder accepts but that
/// does not divide a second into whole nanoseconds (600 M/s: 1.67 ns a
/// session). The documented budget is `burst` at once, then `rate` a
/// second: 6 M sessions past the burst must take 10 ms at least.
#[tokio::test(start_paused = true)]
async fn a_rate_that_does_not_divide_a_second_is_never_exceeded() {
    let rate = 600_000_000u32;
    let budget = budget(rate, 1);
    let router = RouterId::new(1);
    let sessions = 6_000_001usize;
    let start = Instant::now();
    within(HOUR, budget.acquire(router, sessions)).await;
    let took = start.elapsed();
    // (sessions - burst) / rate = 6,000,000 / 600,000,000 s = 10 ms.
    let least = Duration::from_millis(10);
    assert!(
        took >= least,
        "{sessions} sessions went out in {took:?} at {rate}/s with a burst of 1: \
         at least {least:?} expected"
    );
}

/// Plays a caller asking for more sessions than a `u32` holds at once
/// (`sessions` is a `usize`): a request larger than the burst waits for the
/// excess at the rate, so 5.3 billion sessions at 1 G/s take 5.3 s, and
/// the next request waits behind all of them.
#[tokio::test(start_paused = true)]
async fn a_request_past_u32_max_sessions_is_charged_in_full() {
    let budget = budget(1_000_000_000, 1); // exactly 1 ns a session
    let router = RouterId::new(2);
    let sessions = u32::MAX as usize + 1_000_000_000;
    let start = Instant::now();
    within(HOUR, budget.acquire(router, sessions)).await;
    within(HOUR, budget.acquire(router, 1)).await;
    let took = start.elapsed();
    // All but the burst at the rate: (sessions - 1) ns, then 1 ns more.
    let least = Duration::from_nanos(sessions as u64);
    assert!(
        took >= least,
        "{sessions} + 1 sessions went out in {took:?} at 1e9/s: at least {least:?} expected"
    );
}

/// Plays a caller at the exact edge of `acquire_by`: a request whose
/// budget comes exactly at its deadline is granted then; one a nanosecond
/// short is refused and takes nothing, so the next request is not delayed.
#[tokio::test(start_paused = true)]
async fn acquire_by_at_the_exact_deadline_is_granted_and_a_nanosecond_short_takes_nothing() {
    // 1,000 a second: 1 ms a session; burst 10.
    let budget = budget(1_000, 10);
    let router = RouterId::new(3);
    let start = Instant::now();
    within(HOUR, budget.acquire(router, 10)).await; // the burst, at once
    assert_eq!(start.elapsed(), Duration::ZERO);
    // 5 more come 5 ms from now: a deadline 1 ns short is refused.
    let short = start + Duration::from_millis(5) - Duration::from_nanos(1);
    let refused = within(HOUR, budget.acquire_by(router, 5, short))
        .await
        .expect_err("1 ns short of the budget");
    assert_eq!(refused.wait, Duration::from_millis(5));
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a refusal waits for nothing"
    );
    // Nothing was taken: the same 5 at the exact deadline.
    let exact = start + Duration::from_millis(5);
    within(HOUR, budget.acquire_by(router, 5, exact))
        .await
        .expect("granted at its deadline");
    assert_eq!(start.elapsed(), Duration::from_millis(5));
    let stats = budget.stats();
    assert_eq!((stats.granted, stats.refused), (2, 1), "{stats:?}");
}

/// Plays callers that give up: acquire futures dropped while they wait.
/// Documented: the budget is taken at the first poll and not given back,
/// so a later request waits as if it had been used, and the order holds.
#[tokio::test(start_paused = true)]
async fn a_dropped_acquire_keeps_its_budget_and_later_requests_queue_behind_it() {
    let budget = budget(100, 1); // 10 ms a session
    let router = RouterId::new(4);
    let start = Instant::now();
    budget.acquire(router, 1).await; // the burst
    {
        let waiting = budget.acquire(router, 50); // due at 500 ms
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
    } // dropped after its first poll
    // A future dropped before its first poll takes nothing.
    drop(budget.acquire(router, 1_000));
    within(HOUR, budget.acquire(router, 1)).await;
    assert_eq!(start.elapsed(), Duration::from_millis(510));
}

/// Plays a fleet: thousands of routers, each taking its whole burst at
/// once. One router's debt must never delay another, and paid-up routers
/// are forgotten.
#[tokio::test(start_paused = true)]
async fn thousands_of_routers_each_get_their_own_burst_at_once() {
    let budget = budget(10, 20);
    let start = Instant::now();
    for r in 0..5_000 {
        within(HOUR, budget.acquire(RouterId::new(r), 20)).await;
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(budget.stats().routers_in_debt, 5_000);
    // Router 0 is in debt: 1 more waits 100 ms; the others are unaffected.
    let r0 = tokio::spawn({
        let budget = budget.clone();
        async move { budget.acquire(RouterId::new(0), 1).await }
    });
    within(HOUR, r0).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(5)).await;
    within(HOUR, budget.acquire(RouterId::new(9_999), 1)).await; // triggers a sweep
    let stats = budget.stats();
    assert!(stats.routers <= 1, "{stats:?}");
}

/// Plays the tightest budget the builder accepts (1 session a second, a
/// burst of 1) shared by a deletion and another source that took an hour's
/// worth: the deletion must still end within `max_wait`, every session
/// closed, and the refusals counted.
#[tokio::test(start_paused = true)]
async fn a_deletion_on_an_exhausted_minimal_budget_ends_within_max_wait() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let sessions = fill(&store, router, 0, 250).await;
    let budget = budget(1, 1);
    // A probe storm took an hour of the router's budget.
    drop(budget.acquire(router, 3_600));
    let starved = budget.acquire(router, 3_600);
    tokio::pin!(starved);
    assert!(futures::poll!(starved.as_mut()).is_pending());
    let deleter = RouterDeleter::builder()
        .batch_size(10)
        .confirm_timeout(Duration::from_millis(300))
        .notify_timeout(Duration::from_millis(100))
        .backoff(
            Backoff::new()
                .retries(2)
                .delays(Duration::from_millis(50), Duration::from_millis(100)),
        )
        .notification_budget(budget.clone())
        .build(
            Arc::clone(&store),
            ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
        )
        .expect("accepted settings");
    let bound = deleter.max_wait(250);
    let start = Instant::now();
    let report = report_within(HOUR, deleter.delete(router)).await;
    let took = start.elapsed();
    assert!(took <= bound, "{took:?} > max_wait {bound:?}");
    assert_eq!(report.forced, 250, "{report:?}");
    assert!(sessions.iter().all(Session::is_closed));
    assert!(budget.stats().refused > 0);
    assert_eq!(store.count(router).await.ok(), Some(0));
}

// --------------------------------------------------------------- sweeper

/// Plays id reuse across sweeps: a closed session lingers (seen by sweep
/// 1), is then removed by its own path, and a new session reusing its id is
/// closed with its removal on its way. The sweeper documents that a closed
/// session is removed only once two sweeps in a row saw it; the new
/// session was seen by one sweep only and must be left to its own removal.
#[tokio::test(start_paused = true)]
async fn a_new_session_reusing_a_lingering_id_is_not_removed_on_its_first_sighting() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(1_024);
    let mut events = bus.subscribe();
    let sweeper = AuditSweeper::builder()
        .interval(HOUR)
        .events(bus.clone())
        .build(Arc::clone(&store))
        .expect("accepted settings");
    let router = RouterId::new(1);
    let old = fill(&store, router, 5, 1).await.remove(0);
    let incarnation = old.incarnation();
    let _ = old.close(CloseReason::ClientClosed); // lingers
    let first = within(HOUR, sweeper.sweep()).await.expect("swept");
    assert_eq!(first.audit.closed_in_store, vec![SessionId::new(5)]);
    assert!(first.repairs.is_empty(), "first sighting: {first:?}");

    // The old session's removal arrives; the id is reused at once.
    store.remove_exact(old.key()).await.expect("still stored");
    let new = store
        .create(NewSession::new(SessionId::new(5), router, incarnation))
        .await
        .expect("id free again");
    let _ = new.close(CloseReason::ClientClosed); // its removal is on its way

    let second = within(HOUR, sweeper.sweep()).await.expect("swept");
    assert!(
        second.repairs.is_empty(),
        "the new session was removed on its first sighting: {:?}",
        second.repairs
    );
    let held = store.get(SessionId::new(5)).await.unwrap();
    assert!(held.is_some_and(|held| Session::ptr_eq(&held, &new)));
    assert!(
        !drain(&mut events)
            .iter()
            .any(|event| matches!(event, Event::Repaired(_))),
        "a repair was published"
    );
    // Seen twice now: the third sweep removes it.
    let third = within(HOUR, sweeper.sweep()).await.expect("swept");
    assert_eq!(third.repairs.len(), 1, "{third:?}");
    assert_eq!(third.repairs[0].action, RepairAction::ClosedRemoved);
}

/// A store that wraps a [`MemoryStore`]: its `audit` can be held between
/// the audit and its answer (a slow backend: the store keeps serving
/// meanwhile), or answer with the public fields only (as a store outside
/// the crate builds it: no session keys), and its `remove_exact` can crash
/// half-way (the session leaves the map but not its router's index).
struct Wrapped {
    keyless_audit: std::sync::atomic::AtomicBool,
    inner: Arc<MemoryStore>,
    hold_audit: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::sync::oneshot::Receiver<()>,
        )>,
    >,
    half_removes: std::sync::atomic::AtomicBool,
}

impl Wrapped {
    fn new(inner: Arc<MemoryStore>) -> Self {
        Self {
            keyless_audit: std::sync::atomic::AtomicBool::new(false),
            inner,
            hold_audit: Mutex::new(None),
            half_removes: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Holds the next audit after it ran: the first receiver fires once it
    /// ran, and the audit answers once the second sender fires.
    fn hold_next_audit(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (audited, on_audit) = tokio::sync::oneshot::channel();
        let (resume, on_resume) = tokio::sync::oneshot::channel();
        *self.hold_audit.lock() = Some((audited, on_resume));
        (on_audit, resume)
    }
}

impl SessionStore for Wrapped {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, store::RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(
        &self,
        router: RouterId,
    ) -> Result<store::RouterStatus, store::RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession<()>) -> Result<Session, store::CreateError<()>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, store::BackendError> {
        self.inner.get(id).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<session_lifecycle::session::CloseOutcome, store::SessionError> {
        self.inner.close(id, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session, store::SessionError> {
        self.inner.remove(id).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<session_lifecycle::session::CloseOutcome, store::SessionError> {
        self.inner.close_exact(key, reason).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, store::SessionError> {
        if self.half_removes.load(Ordering::SeqCst) {
            // A crash between the two writes: closed, out of the map, still
            // indexed.
            let session = self
                .inner
                .get(key.id())
                .await?
                .filter(|session| session.key() == key)
                .ok_or(store::SessionError::UnknownSession(key.id()))?;
            let _ = session.close(CloseReason::Reclaimed);
            self.inner.corrupt(Corruption::DropFromMap(key.id()));
            return Ok(session);
        }
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session>, store::RouterError> {
        self.inner.sessions(router).await
    }
    async fn count(&self, router: RouterId) -> Result<usize, store::RouterError> {
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<store::FenceSnapshot<()>, store::FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<store::FenceSnapshot<()>, store::FenceError> {
        self.inner.fence_incarnation(router, incarnation).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<store::FinishReport, store::FinishError> {
        self.inner.finish(router, incarnation).await
    }
    async fn audit(&self) -> Result<store::AuditReport, store::BackendError> {
        let report = self.inner.audit().await?;
        let held = self.hold_audit.lock().take();
        if let Some((audited, resume)) = held {
            let _ = audited.send(());
            let _ = resume.await;
        }
        if self.keyless_audit.load(Ordering::SeqCst) {
            let mut public = store::AuditReport::default();
            public.routers = report.routers;
            public.sessions = report.sessions;
            public.missing_from_map = report.missing_from_map;
            public.missing_from_index = report.missing_from_index;
            public.orphans = report.orphans;
            public.closed_in_store = report.closed_in_store;
            public.unreadable = report.unreadable;
            return Ok(public);
        }
        Ok(report)
    }
    async fn census(&self) -> Result<Vec<store::RouterCensus>, store::BackendError> {
        self.inner.census().await
    }
    async fn repair(
        &self,
        findings: &store::AuditReport,
    ) -> Result<Vec<store::Repair>, store::BackendError> {
        self.inner.repair(findings).await
    }
}

/// A counter of releases, attached to `session`.
fn count_releases(session: &Session, releases: &Arc<AtomicUsize>) {
    let releases = Arc::clone(releases);
    session
        .attach(move |_: CloseReason| {
            releases.fetch_add(1, Ordering::SeqCst);
        })
        .expect("open session");
}

/// Plays a slow backend: the audit's answer is held while the store keeps
/// serving. Meanwhile the orphan it found is removed and its id reused by
/// a legitimate session, and the unindexed session it found is removed and
/// its id reused too. The sweep must touch neither new session.
#[tokio::test(start_paused = true)]
async fn a_stale_audit_never_touches_the_sessions_that_reused_its_findings_ids() {
    let memory = Arc::new(MemoryStore::new());
    let store = Arc::new(Wrapped::new(Arc::clone(&memory)));
    let bus = EventBus::new(1_024);
    let mut events = bus.subscribe();
    let sweeper = AuditSweeper::builder()
        .interval(HOUR)
        .events(bus.clone())
        .build(Arc::clone(&store))
        .expect("accepted settings");
    let router = RouterId::new(1);
    let live = fill(&memory, router, 1, 3).await;
    let incarnation = live[0].incarnation();
    // An orphan of a deleted router, and an unindexed session.
    let gone = RouterId::new(2);
    let gone_incarnation = memory.register_router(gone).await.unwrap();
    memory.fence(gone).await.unwrap();
    memory.finish(gone, gone_incarnation).await.unwrap();
    let orphan = NewSession::new(SessionId::new(7), gone, gone_incarnation).into_session();
    memory.corrupt(Corruption::Inject(orphan.clone()));
    memory.corrupt(Corruption::Unindex(SessionId::new(2)));

    let (audited, resume) = store.hold_next_audit();
    let sweep = tokio::spawn({
        let sweeper = sweeper.clone();
        async move { sweeper.sweep().await }
    });
    within(HOUR, audited).await.expect("audited");
    // While the audit's answer is on its way: both ids are freed and reused.
    memory.remove(SessionId::new(7)).await.expect("stored");
    memory.remove(SessionId::new(2)).await.expect("stored");
    let releases = Arc::new(AtomicUsize::new(0));
    let mut reused = Vec::new();
    for id in [7, 2] {
        let session = memory
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .expect("id free");
        count_releases(&session, &releases);
        reused.push(session);
    }
    resume.send(()).expect("audit waiting");
    let report = within(HOUR, sweep).await.unwrap().expect("swept");
    assert!(
        report.audit.orphans.contains(&SessionId::new(7)),
        "{report:?}"
    );
    assert!(
        report.audit.missing_from_index.contains(&SessionId::new(2)),
        "{report:?}"
    );
    assert!(
        report.repairs.is_empty(),
        "stale findings repaired: {:?}",
        report.repairs
    );
    for session in &reused {
        assert!(!session.is_closed(), "{:?} was closed", session.id());
        let held = memory.get(session.id()).await.unwrap();
        assert!(held.is_some_and(|held| Session::ptr_eq(&held, session)));
    }
    assert_eq!(releases.load(Ordering::SeqCst), 0);
    assert!(memory.audit().await.unwrap().is_clean());
    assert!(
        !drain(&mut events)
            .iter()
            .any(|event| matches!(event, Event::Repaired(_)))
    );
}

/// Plays a store whose `remove_exact` crashes between its two writes (the
/// session leaves the map, its index entry stays): a real inconsistency.
/// The sweeper must find and repair it, publish the repair, and release
/// nothing a second time.
#[tokio::test(start_paused = true)]
async fn a_half_done_remove_in_a_wrapping_store_is_repaired() {
    let memory = Arc::new(MemoryStore::new());
    let store = Arc::new(Wrapped::new(Arc::clone(&memory)));
    let bus = EventBus::new(1_024);
    let mut events = bus.subscribe();
    let sweeper = AuditSweeper::builder()
        .interval(HOUR)
        .events(bus.clone())
        .build(Arc::clone(&store))
        .expect("accepted settings");
    let router = RouterId::new(1);
    let sessions = fill(&memory, router, 1, 4).await;
    let releases = Arc::new(AtomicUsize::new(0));
    for session in &sessions {
        count_releases(session, &releases);
    }
    store.half_removes.store(true, Ordering::SeqCst);
    let _ = store.remove_exact(sessions[1].key()).await.expect("stored");
    store.half_removes.store(false, Ordering::SeqCst);
    assert_eq!(
        memory.audit().await.unwrap().missing_from_map,
        vec![(router, SessionId::new(2))]
    );
    let report = within(HOUR, sweeper.sweep()).await.expect("swept");
    assert_eq!(report.repairs.len(), 1, "{report:?}");
    assert_eq!(report.repairs[0].action, RepairAction::DroppedIndexEntry);
    assert_eq!(report.repairs[0].session, SessionId::new(2));
    assert!(memory.audit().await.unwrap().is_clean());
    assert_eq!(
        releases.load(Ordering::SeqCst),
        1,
        "released once, by the close"
    );
    assert_eq!(memory.count(router).await.unwrap(), 3);
    let repaired: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|event| match event {
            Event::Repaired(repair) => Some(repair),
            _ => None,
        })
        .collect();
    assert_eq!(repaired, report.repairs);
}

/// Plays sweeps racing a deletion: while the router is fenced and its
/// notices are in flight, one of its sessions loses its index entry and
/// another is closed by its client and lingers. Two sweeps in a row must
/// leave them to the deletion (nothing repaired, nothing `Reclaimed`); the
/// deletion ends with each resource released once, and a sweep after it
/// finds at most the orphan the corruption left and reclaims only that.
#[tokio::test(start_paused = true)]
async fn sweeps_during_a_deletion_leave_its_sessions_to_it() {
    let store = Arc::new(MemoryStore::new());
    let sweeper = AuditSweeper::builder()
        .interval(HOUR)
        .build(Arc::clone(&store))
        .expect("accepted settings");
    let router = RouterId::new(1);
    let sessions = fill(&store, router, 0, 20).await;
    let reasons = Arc::new(Mutex::new(HashMap::new()));
    for session in &sessions {
        let (reasons, id) = (Arc::clone(&reasons), session.id());
        session
            .attach(move |reason: CloseReason| {
                let mut reasons = reasons.lock();
                let (n, _) = reasons.get(&id).copied().unwrap_or((0, reason));
                reasons.insert(id, (n + 1, reason));
            })
            .expect("open");
    }
    let notifier = ScriptedNotifier::always(
        Arc::clone(&store),
        Notify::Slow {
            delay: Duration::from_secs(10),
            confirm: session_lifecycle::test_util::Subset::All,
        },
    );
    let deleter = RouterDeleter::builder()
        .notify_timeout(Duration::from_secs(20))
        .build(Arc::clone(&store), notifier)
        .expect("accepted settings");
    let deletion = tokio::spawn(deleter.delete(router));
    within(HOUR, async {
        while !matches!(
            store.router_status(router).await,
            Ok(store::RouterStatus::Fenced(_))
        ) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    store.corrupt(Corruption::Unindex(SessionId::new(3)));
    let _ = sessions[5].close(CloseReason::ClientClosed);
    for _ in 0..2 {
        let report = within(HOUR, sweeper.sweep()).await.expect("swept");
        assert!(report.repairs.is_empty(), "mid-deletion repair: {report:?}");
    }
    assert!(
        reasons
            .lock()
            .values()
            .all(|&(_, reason)| reason != CloseReason::Reclaimed),
        "a sweep closed a session of a deletion: {:?}",
        reasons.lock()
    );
    let outcome = within(HOUR, deletion).await.unwrap().expect("deleted");
    let report = outcome.report().cloned().expect("a report");
    assert_eq!(report.sessions, 20, "{report:?}");
    assert!(sessions.iter().all(Session::is_closed));
    let after = within(HOUR, sweeper.sweep()).await.expect("swept");
    assert!(
        after
            .repairs
            .iter()
            .all(|repair| repair.session == SessionId::new(3)),
        "{after:?}"
    );
    assert!(store.audit().await.unwrap().is_clean());
    let reasons = reasons.lock();
    assert_eq!(reasons.len(), 20);
    assert!(reasons.values().all(|&(n, _)| n == 1), "{reasons:?}");
    assert_eq!(reasons[&SessionId::new(5)].1, CloseReason::ClientClosed);
}

// ------------------------------------------------------------------- bus

/// A deleter over `store` whose notifier confirms everything.
fn confirming_deleter(
    store: &Arc<MemoryStore>,
    bus: &EventBus,
) -> RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>> {
    RouterDeleter::builder()
        .batch_size(7)
        .events(bus.clone())
        .build(
            Arc::clone(store),
            ScriptedNotifier::always(Arc::clone(store), Notify::confirm_all()),
        )
        .expect("accepted settings")
}

/// Plays subscribers that never read, on a bus of capacity 1, while a
/// deletion publishes a few hundred events: the deletion must not block,
/// and each subscriber's `lagged` must be exactly what it skipped (it gets
/// the newest event only), summed in the bus's stats.
#[tokio::test(start_paused = true)]
async fn capacity_one_never_reading_subscribers_count_exactly_what_they_skipped() {
    let bus = EventBus::new(1);
    let mut silent = bus.subscribe();
    let mut also_silent = bus.subscribe();
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build::<()>()
            .unwrap(),
    );
    let router = RouterId::new(1);
    let sessions = fill(&store, router, 0, 100).await;
    let deleter = confirming_deleter(&store, &bus);
    let report = report_within(HOUR, deleter.delete(router)).await;
    assert_eq!(report.confirmed, 100, "{report:?}");
    assert!(sessions.iter().all(Session::is_closed));
    let published = bus.stats().published;
    // 100 created, fenced, 100 terminating, 100 closed, deleted.
    assert!(published > 100 + 1 + 100 + 100, "{:?}", bus.stats());
    for subscription in [&mut silent, &mut also_silent] {
        let got = drain(subscription);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(matches!(got[0], Event::RouterDeleted(_)), "{got:?}");
        assert_eq!(subscription.lagged(), published - 1);
    }
    assert_eq!(bus.stats().lagged, 2 * (published - 1), "{:?}", bus.stats());
}

/// Plays a slow reader mixing `try_recv`, `recv` and a stream, on a small
/// bus: every read returns the oldest event it still has, in order, and
/// `lagged` counts exactly the ones overwritten.
#[tokio::test(start_paused = true)]
async fn a_slow_mixed_reader_sees_events_in_order_and_counts_each_skip_once() {
    let bus = EventBus::new(4);
    let mut events = bus.subscribe();
    let store = MemoryStore::builder()
        .events(bus.clone())
        .build::<()>()
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let created = |event: Option<Event>| match event {
        Some(Event::SessionCreated { session, .. }) => session.get(),
        other => panic!("unexpected {other:?}"),
    };
    for id in 0..10 {
        let _ = store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
    }
    // 10 published, 4 kept: 0..6 skipped.
    assert_eq!(created(events.try_recv()), 6);
    assert_eq!(events.lagged(), 6);
    assert_eq!(created(within(HOUR, events.recv()).await), 7);
    for id in 10..17 {
        let _ = store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
    }
    // Buffered: 8, 9, 10..=16 (9 events) in a ring of 4: 8..=12 skipped.
    assert_eq!(created(within(HOUR, events.recv()).await), 13);
    assert_eq!(events.lagged(), 11);
    let mut stream = Box::pin(events.into_stream());
    use futures::StreamExt;
    for want in 14..17 {
        assert_eq!(created(within(HOUR, stream.next()).await), want);
    }
    // Dropped mid-stream: the bus forgets it, and publishing goes on.
    drop(stream);
    assert_eq!(bus.stats().subscribers, 0);
    assert_eq!(bus.stats().lagged, 11);
    let _ = store
        .create(NewSession::new(SessionId::new(99), router, incarnation))
        .await
        .unwrap();
    assert_eq!(bus.stats().published, 17, "nobody listened to the last one");
}

/// A payload whose `Drop` subscribes to the bus and drops a subscription.
struct Resubscribing {
    bus: EventBus,
    kept: Arc<Mutex<Vec<session_lifecycle::events::Subscription>>>,
}

impl Drop for Resubscribing {
    fn drop(&mut self) {
        drop(self.bus.subscribe());
        self.kept.lock().push(self.bus.subscribe());
    }
}

/// Plays user code that subscribes from inside a resource's release and a
/// payload's `Drop` (both run during a deletion that publishes): nothing
/// deadlocks, the deletion ends, and a subscription made inside a release
/// sees the rest of the deletion in order, ending with `RouterDeleted`.
#[tokio::test(start_paused = true)]
async fn subscribing_from_a_release_and_a_payload_drop_during_a_deletion() {
    let bus = EventBus::new(4_096);
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build::<Resubscribing>()
            .unwrap(),
    );
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let from_release = Arc::new(Mutex::new(Vec::new()));
    let from_drop = Arc::new(Mutex::new(Vec::new()));
    for id in 0..30 {
        let payload = Resubscribing {
            bus: bus.clone(),
            kept: Arc::clone(&from_drop),
        };
        let spec = NewSession::new(SessionId::new(id), router, incarnation).payload(payload);
        let session = store.create(spec).await.unwrap();
        let (bus, kept) = (bus.clone(), Arc::clone(&from_release));
        session
            .attach(move |_: CloseReason| {
                drop(bus.subscribe());
                kept.lock().push(bus.subscribe());
            })
            .unwrap();
    }
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let deleter = RouterDeleter::builder()
        .events(bus.clone())
        .build(Arc::clone(&store), notifier)
        .unwrap();
    let report = report_within(HOUR, deleter.delete(router)).await;
    assert_eq!(report.confirmed, 30, "{report:?}");
    let mut from_release = std::mem::take(&mut *from_release.lock());
    assert_eq!(from_release.len(), 30);
    for subscription in &mut from_release {
        let got = drain(subscription);
        assert!(
            matches!(got.last(), Some(Event::RouterDeleted(_))),
            "{got:?}"
        );
        assert_eq!(subscription.lagged(), 0);
    }
    drop(from_release);
    drop(deleter);
    within(HOUR, async {
        while from_drop.lock().len() < 30 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(bus.stats().subscribers, 30, "{:?}", bus.stats());
}

/// Plays clients closing their sessions while their router is deleted
/// (some before the fence, some while notices are in flight, some through
/// the store, some through the handle): per session, `SessionCreated` comes
/// first, `SessionTerminating` (if any) before `SessionClosed`, exactly one
/// `SessionClosed`; per router, `RouterFenced` before any
/// `SessionTerminating` and `RouterDeleted` after every `SessionClosed`.
#[tokio::test(start_paused = true)]
async fn per_session_and_router_order_holds_with_clients_racing_a_deletion() {
    let bus = EventBus::new(65_536);
    let mut events = bus.subscribe();
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build::<()>()
            .unwrap(),
    );
    let router = RouterId::new(1);
    let sessions = fill(&store, router, 0, 200).await;
    let notifier = ScriptedNotifier::always(
        Arc::clone(&store),
        Notify::Later {
            delay: Duration::from_millis(40),
            confirm: session_lifecycle::test_util::Subset::All,
        },
    );
    let deleter = RouterDeleter::builder()
        .batch_size(16)
        .events(bus.clone())
        .build(Arc::clone(&store), notifier)
        .unwrap();
    for session in sessions.iter().step_by(7) {
        let _ = store.close(session.id(), CloseReason::ClientClosed).await;
    }
    let mut clients = Vec::new();
    for (n, session) in sessions.iter().enumerate().skip(3).step_by(5) {
        let (store, session) = (Arc::clone(&store), session.clone());
        clients.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(n as u64)).await;
            if n % 2 == 0 {
                let _ = store
                    .close_exact(session.key(), CloseReason::ClientClosed)
                    .await;
            } else {
                let _ = session.close(CloseReason::ClientClosed);
            }
        }));
    }
    let report = report_within(HOUR, deleter.delete(router)).await;
    assert_eq!(report.sessions + 29, 200, "{report:?}");
    for client in clients {
        within(HOUR, client).await.unwrap();
    }
    assert_eq!(events.lagged(), 0);
    // 0 created, 1 terminating, 2 closed.
    let mut seen: HashMap<u64, Vec<u8>> = HashMap::new();
    let (mut fenced, mut deleted) = (false, false);
    for event in drain(&mut events) {
        match event {
            Event::SessionCreated { session, .. } => {
                seen.entry(session.get()).or_default().push(0);
            }
            Event::SessionTerminating { session, .. } => {
                assert!(
                    fenced && !deleted,
                    "terminating {session:?} outside its deletion"
                );
                seen.entry(session.get()).or_default().push(1);
            }
            Event::SessionClosed { session, .. } => {
                assert!(!deleted, "closed {session:?} after RouterDeleted");
                seen.entry(session.get()).or_default().push(2);
            }
            Event::RouterFenced { .. } => fenced = true,
            Event::RouterDeleted(_) => deleted = true,
            _ => {}
        }
    }
    assert!(deleted);
    assert_eq!(seen.len(), 200);
    for (id, steps) in &seen {
        assert!(
            steps.as_slice() == [0, 1, 2] || steps.as_slice() == [0, 2],
            "session {id}: {steps:?}"
        );
    }
}

/// "Closed sessions left in the store (removed once two sweeps in a row
/// saw them)". With a store that gives no keys (matched by id), a clean
/// sweep in between did not forget what the sweep before it saw: id 5's
/// old life, seen by sweep 1 and then removed normally, made sweep 3 take
/// the new life of id 5, closed an instant before with its removal on its
/// way, for a second sighting, and remove it as a repair.
#[tokio::test(start_paused = true)]
async fn a_clean_sweep_in_between_resets_the_sightings() {
    let memory = Arc::new(MemoryStore::new());
    let store = Arc::new(Wrapped::new(Arc::clone(&memory)));
    store.keyless_audit.store(true, Ordering::SeqCst);
    let sweeper = AuditSweeper::builder()
        .interval(HOUR)
        .build(Arc::clone(&store))
        .expect("valid settings");
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let spec = || NewSession::new(SessionId::new(5), router, incarnation);

    let old = store.create(spec()).await.unwrap();
    let _ = old.close(CloseReason::ClientClosed); // its removal is on its way
    let first = within(HOUR, sweeper.sweep()).await.unwrap();
    assert_eq!(first.audit.closed_in_store, vec![SessionId::new(5)]);
    assert!(first.repairs.is_empty(), "first sighting");
    store.remove_exact(old.key()).await.unwrap(); // ... and lands
    let second = within(HOUR, sweeper.sweep()).await.unwrap();
    assert!(second.audit.is_clean());

    let new = store.create(spec()).await.unwrap();
    let _ = new.close(CloseReason::ClientClosed); // its removal is on its way
    let third = within(HOUR, sweeper.sweep()).await.unwrap();
    assert!(third.repairs.is_empty(), "{:?}", third.repairs);
    // Seen twice in a row now: removed.
    let fourth = within(HOUR, sweeper.sweep()).await.unwrap();
    assert_eq!(fourth.repairs.len(), 1, "{:?}", fourth.repairs);
    assert!(memory.is_empty());
}
