//! User code that panics where the crate did not contain it (a review of
//! stop 33): a resource's `class()`, a panic payload whose own `Drop`
//! panics, and payload `Drop`s run by background tasks (the expiry
//! monitor, the audit sweeper, a grace expiry, the liveness monitor and
//! its probe drivers).
//! Each test failed before its fix. Paused time; every wait is bounded.
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use session_lifecycle::liveness::NoProbe;
use session_lifecycle::session::CloseOutcome;
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, CreateErrorKind, FenceError, FenceSnapshot,
    FinishError, FinishReport, RegisterError, Repair, RouterCensus, RouterError, RouterStatus,
    SessionError,
};
use session_lifecycle::test_util::{router_lost, within};
use session_lifecycle::{
    AuditSweeper, CloseReason, Event, EventBus, ExpiryMonitor, Incarnation, Lifecycle,
    LivenessEvent, LivenessMonitor, MemoryStore, NewSession, NotifyError, Reconciler, Resource,
    ResourceClass, RouterDeleter, RouterId, Session, SessionId, SessionKey, SessionState,
    SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::sync::Notify as Signal;
use tokio::time::Duration;

const HOUR: Duration = Duration::from_secs(3_600);
const R: RouterId = RouterId::new(1);

/// A payload whose `Drop` panics while armed.
#[derive(Debug, Default)]
struct Bomb(AtomicBool);

impl Bomb {
    fn armed() -> Self {
        Self(AtomicBool::new(true))
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0.load(Ordering::SeqCst) && !std::thread::panicking() {
            panic!("a payload's Drop panicked");
        }
    }
}

/// A store of `Bomb` sessions with router `R` registered.
async fn bomb_store() -> (Arc<MemoryStore<Bomb>>, Incarnation) {
    let store: Arc<MemoryStore<Bomb>> = Arc::new(MemoryStore::default());
    let incarnation = store.register_router(R).await.unwrap();
    (store, incarnation)
}

fn spec(id: u64, incarnation: Incarnation, armed: bool) -> NewSession<Bomb> {
    let payload = if armed {
        Bomb::armed()
    } else {
        Bomb::default()
    };
    NewSession::new(SessionId::new(id), R, incarnation).payload(payload)
}

/// A router that takes notices and never confirms: every deletion forces.
struct Deaf;

impl TerminationNotifier for Deaf {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// Counts its release.
struct Counted(Arc<AtomicUsize>);

impl Resource for Counted {
    fn release(self: Box<Self>, _: CloseReason) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A resource whose `class()` (`in_class`) or `release_inline()` (user
/// code, like `release`) panics; counts its releases.
struct Panicky {
    released: Arc<AtomicUsize>,
    in_class: bool,
}

impl Resource for Panicky {
    fn release(self: Box<Self>, _: CloseReason) {
        self.released.fetch_add(1, Ordering::SeqCst);
    }
    fn class(&self) -> ResourceClass {
        assert!(!self.in_class, "class() of a user resource panicked");
        ResourceClass::Normal
    }
    fn release_inline(&self) -> bool {
        assert!(
            self.in_class,
            "release_inline() of a user resource panicked"
        );
        false
    }
}

/// A deletion forces a session through the reclaim queue, which asks each
/// resource its class and whether to release it inline: both are user
/// code. A panic in either was not contained: the session stayed `Closed`
/// but never complete (waiters never woken, the other resource never
/// released), the deletion failed, and the next one hung.
#[tokio::test(start_paused = true)]
async fn a_resource_whose_class_or_inline_flag_panics_in_a_forced_close_still_completes_it() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Deaf)
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_secs(1))
                .retries(0),
        )
        .without_sweeper()
        .build()
        .unwrap();
    let incarnation = store.register_router(R).await.unwrap();
    let session = store
        .create(NewSession::new(SessionId::new(1), R, incarnation))
        .await
        .unwrap();
    let (good, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    session.attach(Counted(Arc::clone(&good))).unwrap();
    for in_class in [true, false] {
        let released = Arc::clone(&bad);
        session.attach(Panicky { released, in_class }).unwrap();
    }

    let deleted = within(HOUR, lifecycle.deleter().delete(R)).await;
    let report = deleted.expect("the deletion ends");
    assert_eq!(report.report().map(|r| r.forced), Some(1), "{report:?}");
    within(HOUR, session.closed()).await;
    within(HOUR, lifecycle.reclaim().idle()).await;
    assert_eq!(
        good.load(Ordering::SeqCst),
        1,
        "the other resource released once"
    );
    assert_eq!(
        bad.load(Ordering::SeqCst),
        2,
        "both misbehaving resources released"
    );
    assert!(store.is_empty());
    assert!(
        within(HOUR, lifecycle.deleter().delete(R))
            .await
            .unwrap()
            .report()
            .is_none(),
        "deleted already"
    );
}

/// A panic payload whose own `Drop` panics (`std::panic::panic_any`).
struct DropBomb;

impl Drop for DropBomb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the panic payload's Drop panicked");
        }
    }
}

/// A release that panics with a payload whose `Drop` panics: the crate
/// dropped that payload outside its `catch_unwind`, so the second panic
/// escaped `Session::close`, the other resource was never released and
/// `closed()` never resolved.
#[tokio::test(start_paused = true)]
async fn a_release_panicking_with_a_panicking_payload_is_still_contained() {
    let session = NewSession::new(SessionId::new(1), R, Incarnation::new(1)).into_session();
    let good = Arc::new(AtomicUsize::new(0));
    session.attach(Counted(Arc::clone(&good))).unwrap();
    session
        .attach(|_: CloseReason| std::panic::panic_any(DropBomb))
        .unwrap();
    let closer = session.clone();
    let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        closer.close(CloseReason::ClientClosed)
    }));
    assert!(closed.is_ok(), "the close itself panicked");
    assert_eq!(good.load(Ordering::SeqCst), 1);
    assert_eq!(
        within(HOUR, session.closed()).await,
        CloseReason::ClientClosed
    );
}

/// The expiry monitor holds the last handle of a session the client closed
/// and removed; its payload's `Drop` panics when the monitor lets it go.
/// That killed the monitor's task: no other session ever expired.
#[tokio::test(start_paused = true)]
async fn a_payload_drop_panicking_in_the_expiry_monitor_leaves_the_others_expiring() {
    let (store, incarnation) = bomb_store().await;
    let monitor = ExpiryMonitor::builder().build(Arc::clone(&store)).unwrap();
    let bomb = store
        .create(spec(1, incarnation, true).expires_in(HOUR))
        .await
        .unwrap();
    let victim = store
        .create(spec(2, incarnation, false).expires_in(Duration::from_secs(600)))
        .await
        .unwrap();
    monitor.track(&bomb).unwrap();
    monitor.track(&victim).unwrap();
    let _ = store
        .close(bomb.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    drop(bomb); // the monitor's wheel holds the last handle: its sweep drops it

    assert_eq!(
        within(HOUR, victim.closed()).await,
        CloseReason::Expired,
        "{:?}",
        monitor.stats()
    );
    assert!(monitor.track(&victim).is_err(), "closed: not tracked again");
    let later = store
        .create(spec(3, incarnation, false).expires_in(Duration::from_secs(60)))
        .await
        .unwrap();
    monitor.track(&later).expect("the monitor still runs");
    assert_eq!(within(HOUR, later.closed()).await, CloseReason::Expired);
}

/// The periodic sweep removes a closed session left in the store; the
/// repair drops its last handle and the payload's `Drop` panics. That
/// ended the periodic task for good.
#[tokio::test(start_paused = true)]
async fn a_payload_drop_panicking_in_a_periodic_sweep_ends_that_sweep_only() {
    let (store, incarnation) = bomb_store().await;
    let session = store.create(spec(1, incarnation, true)).await.unwrap();
    let _ = session.close(CloseReason::ClientClosed); // left in the store
    drop(session);
    let sweeper = AuditSweeper::builder()
        .interval(Duration::from_secs(60))
        .build(Arc::clone(&store))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60 * 10 + 1)).await;
    let stats = sweeper.stats();
    assert_eq!(stats.sweeps, 10, "{stats:?}");
    assert_eq!(stats.failures, 1, "the sweep that panicked: {stats:?}");
    assert!(store.is_empty(), "the second sighting removed it");
}

/// A grace expiry closes the router's sessions and drops the last handle
/// of one whose payload's `Drop` panics: the task died before it took its
/// entry out, the router stayed "in grace" for ever, and a later
/// disconnect got the stale deadline back and started no timer.
#[tokio::test(start_paused = true)]
async fn a_payload_drop_panicking_in_a_grace_expiry_ends_the_period_cleanly() {
    let (store, incarnation) = bomb_store().await;
    drop(store.create(spec(1, incarnation, true)).await.unwrap());
    let bus = EventBus::new(16);
    let mut events = bus.subscribe();
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .events(bus)
        .build(Arc::clone(&store))
        .unwrap();
    reconciler.router_disconnected(R).await.unwrap();
    assert_eq!(within(HOUR, router_lost(&mut events, R)).await, 1);
    assert!(
        store.is_empty(),
        "the expiry closed and removed the session"
    );
    assert_eq!(reconciler.in_grace(), 0);

    // The router reconnects without reporting, a client opens a session,
    // and the router drops again: a new period, which closes it.
    let later = store.create(spec(2, incarnation, false)).await.unwrap();
    let before = tokio::time::Instant::now();
    let deadline = reconciler.router_disconnected(R).await.unwrap();
    assert_eq!(deadline, before + Duration::from_secs(30));
    assert_eq!(within(HOUR, later.closed()).await, CloseReason::RouterLost);
    assert_eq!(reconciler.in_grace(), 0);
}

/// The liveness monitor holds the last handle of a session the client
/// closed and removed; its payload's `Drop` panics when the monitor lets
/// it go. The monitor must go on reaping the others.
#[tokio::test(start_paused = true)]
async fn a_payload_drop_panicking_in_the_liveness_monitor_leaves_the_others_watched() {
    let (store, incarnation) = bomb_store().await;
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let bomb = store.create(spec(1, incarnation, true)).await.unwrap();
    let silent = store.create(spec(2, incarnation, false)).await.unwrap();
    monitor.watch(&bomb).unwrap();
    monitor.watch(&silent).unwrap();
    let _ = store
        .close(bomb.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    drop(bomb); // the monitor holds the last handle

    // Session 2 never beats: the monitor reaps it.
    let reason = within(HOUR, silent.closed()).await;
    assert_eq!(silent.state(), SessionState::Closed, "{reason:?}");
    // And it still watches new sessions.
    let later = store.create(spec(3, incarnation, false)).await.unwrap();
    monitor.watch(&later).expect("the monitor still runs");
    within(HOUR, later.closed()).await;
}

/// The same in a probe driver: a silent session is a suspect in its
/// router's rounds when the client closes and removes it, and the driver
/// drops the last handle. The driver must live on: a session of the same
/// router that falls silent later is still probed and reaped.
#[tokio::test(start_paused = true)]
async fn a_payload_drop_panicking_in_a_probe_driver_leaves_the_router_probed() {
    let (store, incarnation) = bomb_store().await;
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    let monitor = LivenessMonitor::builder()
        .probe_retries(3)
        .events(bus)
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let bomb = store.create(spec(1, incarnation, true)).await.unwrap();
    monitor.watch(&bomb).unwrap();
    // Suspected: it is in the driver's rounds now.
    within(HOUR, async {
        while !matches!(
            events.recv().await,
            Some(Event::Liveness(LivenessEvent::ProbeFailed { .. }))
        ) {}
    })
    .await;
    let _ = store
        .close(bomb.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    drop(bomb); // the driver holds the last handle

    let later = store.create(spec(2, incarnation, false)).await.unwrap();
    monitor.watch(&later).expect("the monitor still runs");
    assert_eq!(
        within(HOUR, later.closed()).await,
        CloseReason::LivenessTimeout,
        "{:?}",
        monitor.stats()
    );
}

/// A user's store (a remote one, say) whose `sessions` can await after it
/// built the listing's handles: a client acts meanwhile.
struct Parking<P> {
    inner: MemoryStore<P>,
    park_listing: AtomicBool,
    arrived: Signal,
    release: Signal,
    /// The next `remove_exact` panics (a store's own bug).
    panic_remove: AtomicBool,
    /// The next call of `sessions` panics before it returns its future.
    panic_listing_call: AtomicBool,
}

impl<P> Default for Parking<P> {
    fn default() -> Self {
        Self {
            inner: MemoryStore::default(),
            park_listing: AtomicBool::new(false),
            panic_remove: AtomicBool::new(false),
            panic_listing_call: AtomicBool::new(false),
            arrived: Signal::new(),
            release: Signal::new(),
        }
    }
}

impl<P: Send + Sync + 'static> SessionStore for Parking<P> {
    type Payload = P;

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session<P>>, BackendError> {
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
    async fn remove(&self, id: SessionId) -> Result<Session<P>, SessionError> {
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session<P>, SessionError> {
        if self.panic_remove.swap(false, Ordering::SeqCst) {
            panic!("the store's remove panicked");
        }
        self.inner.remove_exact(key).await
    }
    fn sessions(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Vec<Session<P>>, RouterError>> + Send {
        // In the call, before any future exists: a store's own bug.
        if self.panic_listing_call.swap(false, Ordering::SeqCst) {
            panic!("the store's sessions() panicked before returning its future");
        }
        async move {
            let listed = self.inner.sessions(router).await;
            if self.park_listing.swap(false, Ordering::SeqCst) {
                self.arrived.notify_one();
                self.release.notified().await;
            }
            listed
        }
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<P>, FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<P>, FenceError> {
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

/// A probe driver lists its router's sessions at each round. A session the
/// client closed and removed while the listing was in flight (a store that
/// awaits after it built the listing) has its last handle there: its
/// payload's `Drop` panicked in the driver, which died with `driving` still
/// set, and no session of that router was ever probed or reaped again.
#[tokio::test(start_paused = true)]
async fn a_payload_drop_panicking_in_a_probe_drivers_listing_leaves_the_router_probed() {
    let store = Arc::new(Parking::<Bomb>::default());
    let incarnation = store.register_router(R).await.unwrap();
    let bus = EventBus::new(64);
    let mut events = bus.subscribe();
    let monitor = LivenessMonitor::builder()
        .probe_retries(3)
        .events(bus)
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    // Not watched: only the store (and then the driver's listing) holds it.
    let bystander = store.create(spec(2, incarnation, true)).await.unwrap();
    let suspect = store.create(spec(1, incarnation, false)).await.unwrap();
    store.park_listing.store(true, Ordering::SeqCst);
    monitor.watch(&suspect).unwrap();
    // The driver of R's first round lists R's sessions and waits there.
    within(HOUR, store.arrived.notified()).await;
    let _ = store
        .close(bystander.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    drop(bystander); // the driver's listing holds the last handle
    store.release.notify_one();

    let later = store.create(spec(3, incarnation, false)).await.unwrap();
    monitor.watch(&later).expect("the monitor still runs");
    let reaped = tokio::time::timeout(HOUR, later.closed()).await;
    let mut probed_later = false;
    while let Some(event) = events.try_recv() {
        if let Event::Liveness(LivenessEvent::ProbeFailed { sessions, .. }) = event
            && sessions.contains(&later.id())
        {
            probed_later = true;
        }
    }
    assert_eq!(
        reaped.ok(),
        Some(CloseReason::LivenessTimeout),
        "a silent session of R never reaped (probed: {probed_later}); {:?}",
        monitor.stats()
    );
}

/// A store whose removal panics while a probe driver reaps (`remove`), or
/// whose `sessions` call panics while the driver lists the router
/// (`list`): the driver lives on to reap the router's next silent session
/// (a reaped session's removal is left to the audit sweeper).
#[tokio::test(start_paused = true)]
async fn a_store_panicking_in_a_probe_driver_leaves_the_router_probed() {
    for list in [false, true] {
        store_panicking_in_a_probe_driver(list).await;
    }
}

async fn store_panicking_in_a_probe_driver(list: bool) {
    let store = Arc::new(Parking::<()>::default());
    let incarnation = store.register_router(R).await.unwrap();
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let first = store
        .create(NewSession::new(SessionId::new(1), R, incarnation))
        .await
        .unwrap();
    let panics = if list {
        &store.panic_listing_call
    } else {
        &store.panic_remove
    };
    panics.store(true, Ordering::SeqCst);
    monitor.watch(&first).unwrap();
    assert_eq!(
        within(HOUR, first.closed()).await,
        CloseReason::LivenessTimeout
    );
    assert!(
        !panics.load(Ordering::SeqCst),
        "the store panicked (list: {list})"
    );

    let later = store
        .create(NewSession::new(SessionId::new(2), R, incarnation))
        .await
        .unwrap();
    monitor.watch(&later).expect("the monitor still runs");
    assert_eq!(
        within(HOUR, later.closed()).await,
        CloseReason::LivenessTimeout,
        "{:?}",
        monitor.stats()
    );
    assert_eq!(monitor.stats().reaped, 2);
}

/// A payload that counts its drops and panics in `Drop` when `armed`.
struct Loud {
    armed: bool,
    drops: Arc<AtomicUsize>,
}

impl Drop for Loud {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
        // No `!std::thread::panicking()` guard: a drop run while another
        // unwinds panics too (and aborts the process), as a careless
        // payload's would.
        if self.armed {
            panic!("a payload's Drop panicked");
        }
    }
}

/// Ten sessions on `R`, three of them `Loud` payloads that panic when
/// dropped; the caller keeps no handle. Returns the store, the incarnation
/// and the drop counter.
async fn loud_router() -> (Arc<MemoryStore<Loud>>, Incarnation, Arc<AtomicUsize>) {
    let store: Arc<MemoryStore<Loud>> = Arc::new(MemoryStore::default());
    let incarnation = store.register_router(R).await.unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    for id in 0..10 {
        let payload = Loud {
            armed: matches!(id, 2 | 5 | 7),
            drops: Arc::clone(&drops),
        };
        let spec = NewSession::new(SessionId::new(id), R, incarnation).payload(payload);
        drop(store.create(spec).await.unwrap());
    }
    (store, incarnation, drops)
}

/// A deletion holds the last handles of its sessions and drops them at its
/// end. A payload `Drop` that panicked there ended a deletion whose work
/// was done `Interrupted` (its report lost: the next call said
/// `AlreadyDeleted`), and a second one in the same slice panicked while
/// unwinding: the process aborted.
#[tokio::test(start_paused = true)]
async fn payload_drops_panicking_at_a_deletions_end_leave_its_report() {
    let (store, _, drops) = loud_router().await;
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .build(Arc::clone(&store), Deaf)
        .unwrap();
    let outcome = within(HOUR, deleter.delete(R)).await;
    let report = outcome
        .expect("the deletion's work is done: a payload's panic is contained")
        .report()
        .cloned()
        .expect("this call ran the deletion");
    assert_eq!((report.sessions, report.forced), (10, 10), "{report:?}");
    assert_eq!(drops.load(Ordering::SeqCst), 10, "every payload dropped");
    assert_eq!(store.sessions(R).await.unwrap().len(), 0);
    assert!(store.audit().await.unwrap().is_clean());
}

/// `finish` called by hand (a controller's own deletion flow) drops the
/// router's index, which holds the sessions' last handles: payload `Drop`s
/// that panicked there escaped the store's `finish` (the second one, in
/// the same slice, aborted the process).
#[tokio::test(start_paused = true)]
async fn payload_drops_panicking_in_a_stores_finish_are_contained() {
    let (store, incarnation, drops) = loud_router().await;
    let snapshot = store.fence_incarnation(R, incarnation).await.unwrap();
    drop(snapshot);
    let finished = store.finish(R, incarnation).await.expect("finished");
    assert_eq!(finished.closed, 10, "{finished:?}");
    assert_eq!(drops.load(Ordering::SeqCst), 10, "every payload dropped");
    assert!(store.audit().await.unwrap().is_clean());
    let late = NewSession::new(SessionId::new(11), R, incarnation).payload(Loud {
        armed: false,
        drops: Arc::clone(&drops),
    });
    let refused = store
        .create(late)
        .await
        .expect_err("the incarnation is deleted");
    assert!(
        matches!(refused.kind(), CreateErrorKind::RouterDeleted { .. }),
        "{refused}"
    );
}

/// Sessions closed through their own handle stay in the store (closed)
/// until a deletion or a sweep removes them: the store's removal in
/// `finish` then drops their last handle.
#[tokio::test(start_paused = true)]
async fn payload_drops_panicking_when_a_deletion_removes_closed_sessions_are_contained() {
    let (store, _, drops) = loud_router().await;
    for id in [2, 5, 7] {
        let session = store.get(SessionId::new(id)).await.unwrap().unwrap();
        assert!(session.close(CloseReason::ClientClosed).won());
    }
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .build(Arc::clone(&store), Deaf)
        .unwrap();
    let outcome = within(HOUR, deleter.delete(R)).await;
    let report = outcome
        .expect("a payload's panic is contained")
        .report()
        .cloned()
        .expect("this call ran the deletion");
    assert_eq!(
        (report.sessions, report.already_closed, report.forced),
        (10, 3, 7),
        "{report:?}"
    );
    assert_eq!(drops.load(Ordering::SeqCst), 10, "every payload dropped");
    assert!(store.audit().await.unwrap().is_clean());
}

/// Two `Loud` payloads that panic when dropped, on sessions of `R`
/// created in `store` (returned with the drop counter; the caller holds
/// the only other handles).
async fn two_loud(
    store: &MemoryStore<Loud>,
    incarnation: Incarnation,
) -> (Vec<Session<Loud>>, Arc<AtomicUsize>) {
    let drops = Arc::new(AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for id in 1..=2 {
        let payload = Loud {
            armed: true,
            drops: Arc::clone(&drops),
        };
        let spec = NewSession::new(SessionId::new(id), R, incarnation).payload(payload);
        sessions.push(store.create(spec).await.unwrap());
    }
    (sessions, drops)
}

/// Review of stop 35: the liveness monitor's wheel held the last handles
/// of two watched sessions their clients closed and removed; the task
/// ending at `shutdown` dropped its wheel by drop glue, the second payload
/// panicked while the first unwound, and the process aborted.
#[tokio::test(start_paused = true)]
async fn payload_drops_panicking_as_the_liveness_monitor_shuts_down_are_contained() {
    let store: Arc<MemoryStore<Loud>> = Arc::new(MemoryStore::default());
    let incarnation = store.register_router(R).await.unwrap();
    let monitor = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    let (sessions, drops) = two_loud(&store, incarnation).await;
    for session in &sessions {
        monitor.watch(session).unwrap();
    }
    // A few ticks of the paused clock, the task running at each: it files
    // them in its wheel.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for session in sessions {
        let closed = store.close(session.id(), CloseReason::ClientClosed).await;
        assert!(closed.unwrap().won());
        // Its handle drops here: the wheel holds the last one.
    }
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    within(HOUR, monitor.shutdown()).await;
    assert_eq!(drops.load(Ordering::SeqCst), 2, "every payload dropped");
}

/// Never answers a probe; says when it is called.
struct Hangs(Arc<Signal>);

impl session_lifecycle::Prober for Hangs {
    async fn probe(
        &self,
        _: session_lifecycle::ProbeBatch,
    ) -> Result<Vec<SessionId>, session_lifecycle::ProbeError> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// Review of stop 35: as above, with the last handles in a probe driver's
/// round (the probe call hangs) when the monitor shuts down: the driver
/// returned with its round in a plain `Vec`, and the process aborted.
#[tokio::test(start_paused = true)]
async fn payload_drops_panicking_as_a_probe_driver_ends_are_contained() {
    let store: Arc<MemoryStore<Loud>> = Arc::new(MemoryStore::default());
    let incarnation = store.register_router(R).await.unwrap();
    let called = Arc::new(Signal::new());
    let monitor = LivenessMonitor::builder()
        .probe_timeout(HOUR)
        .build(Arc::clone(&store), Hangs(Arc::clone(&called)))
        .unwrap();
    let (sessions, drops) = two_loud(&store, incarnation).await;
    for session in &sessions {
        monitor.watch(session).unwrap();
    }
    // Both fall silent and are probed together; the call hangs.
    within(HOUR, called.notified()).await;
    for session in sessions {
        let closed = store.close(session.id(), CloseReason::ClientClosed).await;
        assert!(closed.unwrap().won());
    }
    assert_eq!(drops.load(Ordering::SeqCst), 0, "the round holds them");
    within(HOUR, monitor.shutdown()).await;
    assert_eq!(drops.load(Ordering::SeqCst), 2, "every payload dropped");
}

/// Review of stop 35: a reconciliation closes and removes a session its
/// router no longer reports and holds its last handle; the payload's
/// `Drop` panicking made `reconcile()` panic after its work was done, the
/// report (with the id the router must drop) lost; two aborted the
/// process.
#[tokio::test(start_paused = true)]
async fn payload_drops_panicking_in_a_reconciliation_leave_its_report() {
    let store: Arc<MemoryStore<Loud>> = Arc::new(MemoryStore::default());
    let incarnation = store.register_router(R).await.unwrap();
    let (sessions, drops) = two_loud(&store, incarnation).await;
    let kept = NewSession::new(SessionId::new(3), R, incarnation).payload(Loud {
        armed: false,
        drops: Arc::clone(&drops),
    });
    let kept = store.create(kept).await.unwrap();
    let reconciler = Reconciler::builder().build(Arc::clone(&store)).unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(sessions); // the store holds the only handles of sessions 1 and 2

    // The router reports session 3 and an id the store does not know (4):
    // 1 and 2 are closed and removed, and the router must drop 4.
    let report = within(
        HOUR,
        reconciler.reconcile(R, incarnation, [SessionId::new(3), SessionId::new(4)]),
    )
    .await
    .expect("reconciled");
    assert_eq!(report.drop, [SessionId::new(4)]);
    assert_eq!(report.summary.closed, 2, "{:?}", report.summary);
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both payloads dropped");
    assert!(store.get(SessionId::new(1)).await.unwrap().is_none());
    assert_eq!(kept.state(), SessionState::Active);
}
