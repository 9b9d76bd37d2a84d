//! Adversarial suite: several closers racing for the same sessions.
//!
//! A controller wires every piece through [`Lifecycle`] and lets them all
//! loose on the same sessions at once: a router deletion, the liveness
//! monitor reaping them (its prober panicking, hanging or answering for
//! nobody), the expiry monitor expiring them, the client's own `close`,
//! `close_exact` and `remove_exact`, a reconciliation and a restart
//! adoption of a router, and the audit sweeper, with the ids reused by
//! new sessions as soon as the old ones leave the store. Resources and
//! payloads call back into the store and the monitors while they run.
//!
//! After each scenario: every session closed once with one reason, every
//! resource released once, the pieces' counters equal to the closes they
//! won, the deletion report adding up, the store's `get`, `len`, `census`
//! and [`Stats`](session_lifecycle::Stats) agreeing with what it holds, the
//! [`InvariantChecker`] clean, the sessions reusing the ids untouched, and
//! every payload dropped within the documented bounds once the controller
//! let go of its handles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use futures::FutureExt;
use session_lifecycle::reconcile::{Adopter, Adoption, ReportedSession};
use session_lifecycle::session::Classed;
use session_lifecycle::test_util::{
    Call, HOUR, InvariantChecker, Notify, Probe, Script, ScriptedNotifier, ScriptedProber, Subset,
    within,
};
use session_lifecycle::{
    AuditSweeper, CloseReason, ExpiryMonitor, Lifecycle, LivenessMonitor, MemoryStore, NewSession,
    Reconciler, Resource, ResourceClass, RouterDeleter, RouterId, Session, SessionId, SessionState,
    SessionStore,
};
use tokio::time::{Duration, Instant};

type Store = MemoryStore<Payload>;
type Wired = Lifecycle<Store, Arc<ScriptedNotifier<Store>>, Arc<ScriptedProber>>;

// ---------------------------------------------------------------------------
// The controller's user code: payloads and resources that count and call back

/// Counts payload drops and wakes whoever waits for a number of them.
#[derive(Default)]
struct Drops {
    count: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Drops {
    fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` payloads dropped.
    async fn reach(&self, n: usize) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.get() >= n {
                return;
            }
            changed.await;
        }
    }
}

/// What the user code reaches: the store, weakly (the payloads live in it).
#[derive(Default)]
struct Reach {
    store: OnceLock<Weak<Store>>,
    drops: Drops,
    /// Calls back the payloads' `Drop`s made.
    drop_callbacks: AtomicUsize,
    /// Calls back the resources made.
    release_callbacks: AtomicUsize,
}

impl Reach {
    fn store(&self) -> Option<Arc<Store>> {
        self.store.get().and_then(Weak::upgrade)
    }
}

/// A session's payload: its `Drop` reads the store (every read a
/// `MemoryStore` answers at once) and counts itself.
struct Payload {
    id: SessionId,
    reach: Arc<Reach>,
}

impl Payload {
    fn new(id: SessionId, reach: &Arc<Reach>) -> Self {
        Self {
            id,
            reach: Arc::clone(reach),
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(store) = self.reach.store() {
            // Under a lock of the crate these would deadlock (I8).
            let _ = store.len();
            let held = store.get(self.id).now_or_never();
            let census = store.census().now_or_never();
            assert!(
                held.is_some() && census.is_some(),
                "a memory store answers at once"
            );
            drop(held);
            self.reach.drop_callbacks.fetch_add(1, Ordering::SeqCst);
        }
        self.reach.drops.count.fetch_add(1, Ordering::SeqCst);
        self.reach.drops.changed.notify_waiters();
    }
}

/// Every release of one session's resources, with its reason.
#[derive(Default)]
struct Releases {
    inline: Mutex<Vec<CloseReason>>,
    queued: Mutex<Vec<CloseReason>>,
}

impl Releases {
    fn counts(&self) -> (usize, usize) {
        (
            self.inline.lock().unwrap().len(),
            self.queued.lock().unwrap().len(),
        )
    }
}

/// A resource released inline, in whichever closer won: it calls back into
/// the store and the monitors about its own (closed) session.
struct InlineCallback {
    releases: Arc<Releases>,
    /// Its own session: a cycle the close breaks (it takes the resource).
    session: Arc<SessionCell>,
    lifecycle: Wired,
    reach: Arc<Reach>,
}

/// Where the inline resource finds its session (set after the attach).
#[derive(Default)]
struct SessionCell(OnceLock<Session<Payload>>);

impl Resource for InlineCallback {
    fn release(self: Box<Self>, reason: CloseReason) {
        self.releases.inline.lock().unwrap().push(reason);
        let Some(session) = self.session.0.get() else {
            return;
        };
        let lifecycle = &self.lifecycle;
        // Closed already: every piece refuses it.
        assert!(session.is_closed(), "released before its close");
        assert!(lifecycle.liveness().heartbeat(session).is_err());
        assert!(lifecycle.expiry().track(session).is_err());
        // Reads, and a duplicate close by key (which may unlink it first).
        let store = lifecycle.store();
        let _ = store.get(session.id()).now_or_never().expect("at once");
        let _ = store.census().now_or_never().expect("at once");
        let again = store
            .close_exact(session.key(), CloseReason::ClientClosed)
            .now_or_never()
            .expect("at once");
        if let Ok(outcome) = again {
            assert!(!outcome.won(), "a second close won: {outcome:?}");
        }
        self.reach.release_callbacks.fetch_add(1, Ordering::SeqCst);
    }

    fn release_inline(&self) -> bool {
        true
    }
}

/// Attaches the two resources (one inline calling back, one queued) and
/// returns their record.
fn attach_resources(
    session: &Session<Payload>,
    lifecycle: &Wired,
    reach: &Arc<Reach>,
) -> Arc<Releases> {
    let releases = Arc::new(Releases::default());
    let cell = Arc::new(SessionCell::default());
    let inline = InlineCallback {
        releases: Arc::clone(&releases),
        session: Arc::clone(&cell),
        lifecycle: lifecycle.clone(),
        reach: Arc::clone(reach),
    };
    let _ = cell.0.set(session.clone());
    session.attach(inline).expect("open");
    let record = Arc::clone(&releases);
    session
        .attach(Classed::new(
            ResourceClass::High,
            move |reason: CloseReason| {
                record.queued.lock().unwrap().push(reason);
            },
        ))
        .expect("open");
    releases
}

// ---------------------------------------------------------------------------
// Wiring

/// A liveness monitor that convicts within about two seconds of silence.
fn quick_liveness() -> session_lifecycle::liveness::LivenessMonitorBuilder {
    LivenessMonitor::builder()
        .heartbeat_interval(Duration::from_millis(500))
        .timeout_range(Duration::from_millis(500), Duration::from_secs(1))
        .pause_allowance(Duration::from_millis(100))
        .probe_timeout(Duration::from_millis(300))
        .probe_retries(1)
        .partition_guard(false)
}

/// Routers that confirm the even ids of a first notice 200 ms later, and
/// every id of a later one two seconds later (after the deletion ended:
/// late answers, by key).
fn late_routers(store: &Arc<Store>) -> Arc<ScriptedNotifier<Store>> {
    ScriptedNotifier::new(
        Arc::clone(store),
        Script::by_round(
            Notify::Later {
                delay: Duration::from_millis(200),
                confirm: Subset::EvenIds,
            },
            Notify::Later {
                delay: Duration::from_secs(2),
                confirm: Subset::All,
            },
        ),
    )
}

/// A prober that panics, hangs, fails or answers for nobody, by call.
fn unruly_prober() -> Arc<ScriptedProber> {
    ScriptedProber::new(Script::from_fn(|call: Call| match call.index % 4 {
        0 => Probe::Panic,
        1 => Probe::Never,
        2 => Probe::Error,
        _ => Probe::nobody(),
    }))
}

fn wire(store: &Arc<Store>) -> Wired {
    Lifecycle::builder(Arc::clone(store), late_routers(store))
        .prober(unruly_prober())
        .liveness(quick_liveness())
        .expiry(
            ExpiryMonitor::builder()
                .tick(Duration::from_millis(50))
                .warn_before(Duration::from_millis(200)),
        )
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_millis(500))
                .retries(1),
        )
        .reconciler(Reconciler::builder().spare_younger_than(Duration::from_millis(100)))
        .sweeper(AuditSweeper::builder().interval(Duration::from_millis(200)))
        .build()
        .expect("valid settings")
}

/// One session the test created, and what it saw of it.
struct Tracked {
    session: Session<Payload>,
    releases: Arc<Releases>,
}

/// Every close reason of `tracked`, counted.
fn tally<'a>(tracked: impl IntoIterator<Item = &'a Tracked>) -> HashMap<CloseReason, usize> {
    let mut reasons = HashMap::new();
    for t in tracked {
        let reason = t.session.close_reason().expect("closed");
        *reasons.entry(reason).or_default() += 1;
    }
    reasons
}

/// Waits until the store no longer holds `session` (its closer removes it
/// right after the close), bounded.
async fn gone_from_store(store: &Store, session: &Session<Payload>) {
    within(HOUR, async {
        loop {
            match store.get(session.id()).await.unwrap() {
                Some(held) if Session::ptr_eq(&held, session) => {}
                _ => return,
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// Adopts the ids from 900 on (sessions the store lost), refuses the rest
/// (sessions the controller closed on purpose); watches and tracks what it
/// adopts, so the monitors race for them too.
struct RestartAdopter {
    lifecycle: Wired,
    reach: Arc<Reach>,
    adopted: Mutex<Vec<(Session<Payload>, Arc<Releases>)>>,
}

impl Adopter<Payload> for RestartAdopter {
    type Data = ();

    async fn adopt(&self, _router: RouterId, reported: ReportedSession) -> Adoption<Payload> {
        if reported.id.get() < 900 {
            return Adoption::reject("closed on purpose");
        }
        Adoption::accept(Payload::new(reported.id, &self.reach))
    }

    fn adopted(&self, session: &Session<Payload>) {
        self.lifecycle.liveness().watch(session).expect("open");
        self.lifecycle
            .expiry()
            .track(session)
            .expect("has an expiry");
        let releases = attach_resources(session, &self.lifecycle, &self.reach);
        self.adopted
            .lock()
            .unwrap()
            .push((session.clone(), releases));
    }
}

// ---------------------------------------------------------------------------
// Scenarios

/// Plays every closer at once on paused time: router A is deleted while
/// the liveness monitor (its prober panicking, hanging, failing) reaps the
/// silent sessions, the expiry monitor expires them, the client closes a
/// fifth each by `close`, `close_exact` and `remove_exact`, router B is
/// reconciled (a third missing from its report) and then adopted after a
/// "restart" (new ids adopted with short expiries, old ones refused), the
/// sweeper sweeps every 200 ms, and the routers' late answers arrive after
/// the deletion ended. Every id is reused on router C as soon as its
/// session left the store. Resources and payloads call back into the store.
#[tokio::test(start_paused = true)]
async fn every_closer_at_once_closes_each_session_once_and_the_counts_add_up() {
    let reach = Arc::new(Reach::default());
    let store = Arc::new(Store::default());
    reach.store.set(Arc::downgrade(&store)).ok();
    let lifecycle = wire(&store);
    let checker = InvariantChecker::<Payload>::new();
    let (a, b, c) = (RouterId::new(1), RouterId::new(2), RouterId::new(3));
    let inc_a = store.register_router(a).await.unwrap();
    let inc_b = store.register_router(b).await.unwrap();
    let inc_c = store.register_router(c).await.unwrap();

    let mut tracked: Vec<Tracked> = Vec::new();
    for (router, incarnation, base) in [(a, inc_a, 0u64), (b, inc_b, 100)] {
        for i in 0..40u64 {
            let id = SessionId::new(base + i);
            // Expiries between 1.5 s and 3.25 s: right where the reaps fall.
            let ttl = Duration::from_millis(1_500 + (i % 8) * 250);
            let spec = NewSession::new(id, router, incarnation)
                .payload(Payload::new(id, &reach))
                .token(b"secret".to_vec())
                .expires_in(ttl);
            let session = lifecycle.create(spec).await.unwrap();
            lifecycle.liveness().watch(&session).unwrap();
            let releases = attach_resources(&session, &lifecycle, &reach);
            checker.track(&session);
            tracked.push(Tracked { session, releases });
        }
    }
    checker.assert(&*store).await;

    // A third heartbeat (by id, as off the wire) for a while, then stop.
    let beats = {
        let lifecycle = lifecycle.clone();
        let ids: Vec<SessionId> = tracked
            .iter()
            .map(|t| t.session.id())
            .filter(|id| id.get() % 3 == 0)
            .collect();
        tokio::spawn(async move {
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                for &id in &ids {
                    let _ = lifecycle.liveness().heartbeat_id(id).await;
                }
            }
        })
    };

    // The client closes a fifth each way, spread over 1.2 s .. 3.2 s.
    let mut client_wins = 0usize;
    let client = {
        let store = Arc::clone(&store);
        let picks: Vec<(u64, Session<Payload>)> = tracked
            .iter()
            .filter(|t| t.session.id().get() % 5 < 3)
            .map(|t| (t.session.id().get(), t.session.clone()))
            .collect();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut won = 0usize;
            let mut order = picks;
            order.sort_by_key(|(id, _)| (id * 37) % 2_000);
            for (id, session) in order {
                let at = started + Duration::from_millis(1_200 + (id * 37) % 2_000);
                tokio::time::sleep_until(at).await;
                let reason = CloseReason::ClientClosed;
                match id % 5 {
                    0 => {
                        // By id: only while the id is still this session's.
                        if let Some(held) = store.get(session.id()).await.unwrap()
                            && Session::ptr_eq(&held, &session)
                            && store.close(session.id(), reason).await.unwrap().won()
                        {
                            won += 1;
                        }
                    }
                    1 => {
                        if store
                            .close_exact(session.key(), reason)
                            .await
                            .is_ok_and(|outcome| outcome.won())
                        {
                            won += 1;
                        }
                    }
                    _ => {
                        // Closes with `Reclaimed` if still open.
                        let _ = store.remove_exact(session.key()).await;
                    }
                }
            }
            won
        })
    };

    // Reuse every id on router C once its session left the store.
    let mut reusers = Vec::new();
    for t in &tracked {
        let store = Arc::clone(&store);
        let session = t.session.clone();
        let reach = Arc::clone(&reach);
        reusers.push(tokio::spawn(async move {
            session.closed().await;
            gone_from_store(&store, &session).await;
            let id = session.id();
            drop(session);
            let spec = NewSession::new(id, c, inc_c).payload(Payload::new(id, &reach));
            let reused = store.create(spec).await.expect("the id is free");
            let released = Arc::new(AtomicUsize::new(0));
            let count = Arc::clone(&released);
            reused
                .attach(move |_: CloseReason| {
                    count.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            (reused, released)
        }));
    }

    // Router A is deleted at 1.8 s.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let deletion = tokio::spawn({
        let lifecycle = lifecycle.clone();
        async move { lifecycle.deleter().delete(a).await }
    });
    // Router B reconnects at 2.0 s, a third of its sessions missing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reported: Vec<SessionId> = (100..140)
        .filter(|i| i % 3 != 0)
        .map(SessionId::new)
        .collect();
    let reconciled = lifecycle.reconciler().reconcile(b, inc_b, &reported).await;
    let reconciled = reconciled.expect("router B is live");

    // The controller "restarts" at 2.6 s: router B reports its old ids and
    // new ones; the new ones are adopted with 100 ms left.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let adopter = RestartAdopter {
        lifecycle: lifecycle.clone(),
        reach: Arc::clone(&reach),
        adopted: Mutex::default(),
    };
    let report: Vec<ReportedSession> = (100..140)
        .chain(900..910)
        .map(|id| {
            ReportedSession::new(SessionId::new(id)).with_expires_in(Duration::from_millis(100))
        })
        .collect();
    let adopting = lifecycle
        .reconciler()
        .reconcile_adopting(b, inc_b, report, &adopter)
        .await
        .expect("router B is live");
    assert_eq!(adopting.adopted.len(), 10, "{adopting:?}");

    let outcome = within(HOUR, deletion).await.unwrap().expect("deleted");
    let deleted = outcome.report().expect("this call's run").clone();
    client_wins += within(HOUR, client).await.unwrap();
    within(HOUR, beats).await.unwrap();
    let mut reused = Vec::new();
    for reuser in reusers {
        reused.push(within(HOUR, reuser).await.unwrap());
    }
    let adopted: Vec<(Session<Payload>, Arc<Releases>)> =
        std::mem::take(&mut *adopter.adopted.lock().unwrap());
    for (session, _) in &adopted {
        within(HOUR, session.closed()).await;
        gone_from_store(&store, session).await;
    }
    // The late answers (2 s after the second notices) arrive.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Each session closed once, with one reason; each resource released once.
    for t in &tracked {
        let s = &t.session;
        assert_eq!(s.state(), SessionState::Closed, "{s:?}");
        assert_eq!(
            t.releases.counts(),
            (1, 1),
            "{s:?} released {:?}",
            t.releases.counts()
        );
        let reason = s.close_reason().unwrap();
        let inline = t.releases.inline.lock().unwrap().clone();
        let queued = t.releases.queued.lock().unwrap().clone();
        assert_eq!((inline, queued), (vec![reason], vec![reason]), "{s:?}");
        assert!(s.with_token(|token| token.is_none()), "token wiped");
        if s.router() == a {
            assert!(
                matches!(
                    reason,
                    CloseReason::RouterDeleted
                        | CloseReason::Forced
                        | CloseReason::ClientClosed
                        | CloseReason::Reclaimed
                        | CloseReason::LivenessTimeout
                        | CloseReason::Expired
                ),
                "{s:?}: {reason:?}"
            );
        } else {
            assert!(
                !matches!(reason, CloseReason::RouterDeleted | CloseReason::Forced),
                "router B's {s:?} closed by A's deletion: {reason:?}"
            );
        }
    }
    for (session, releases) in &adopted {
        assert!(session.is_closed(), "{session:?}");
        assert_eq!(releases.counts(), (1, 1), "adopted {session:?}");
    }

    // The pieces count what they won.
    let all = tracked.iter();
    let reasons = tally(all);
    let adopted_reasons: HashMap<CloseReason, usize> =
        adopted.iter().fold(HashMap::new(), |mut m, (s, _)| {
            *m.entry(s.close_reason().unwrap()).or_default() += 1;
            m
        });
    let count = |reason| {
        reasons.get(&reason).copied().unwrap_or(0)
            + adopted_reasons.get(&reason).copied().unwrap_or(0)
    };
    let liveness = lifecycle.liveness().stats();
    let expiry = lifecycle.expiry().stats();
    assert_eq!(
        liveness.reaped as usize,
        count(CloseReason::LivenessTimeout),
        "{reasons:?} {adopted_reasons:?} {liveness:?}"
    );
    assert_eq!(
        expiry.expired as usize,
        count(CloseReason::Expired),
        "{reasons:?} {adopted_reasons:?} {expiry:?}"
    );
    assert_eq!(client_wins, count(CloseReason::ClientClosed), "{reasons:?}");
    assert!(reconciled.closed.len() <= count(CloseReason::Reclaimed));
    for id in &reconciled.closed {
        let t = tracked.iter().find(|t| t.session.id() == *id).unwrap();
        assert_eq!(
            t.session.close_reason(),
            Some(CloseReason::Reclaimed),
            "{id}"
        );
    }

    // The deletion report adds up and matches the reasons of A's sessions.
    let of_a = tally(tracked.iter().filter(|t| t.session.router() == a));
    let a_count = |reason| of_a.get(&reason).copied().unwrap_or(0);
    assert_eq!(
        deleted.confirmed + deleted.forced + deleted.already_closed + deleted.closed_otherwise,
        deleted.sessions,
        "{deleted:?}"
    );
    assert!(deleted.sessions <= 40, "{deleted:?}");
    assert_eq!(
        deleted.confirmed,
        a_count(CloseReason::RouterDeleted),
        "{deleted:?} {of_a:?}"
    );
    assert_eq!(
        deleted.forced,
        a_count(CloseReason::Forced),
        "{deleted:?} {of_a:?}"
    );

    // The store holds exactly the sessions reusing the ids, all untouched.
    let expected = reused.len();
    assert_eq!(store.len(), expected);
    for (session, released) in &reused {
        assert_eq!(session.state(), SessionState::Active, "{session:?}");
        assert_eq!(released.load(Ordering::SeqCst), 0, "{session:?}");
        let held = store.get(session.id()).await.unwrap().expect("held");
        assert!(
            Session::ptr_eq(&held, session),
            "stale get for {}",
            session.id()
        );
    }
    for (session, _) in &adopted {
        assert!(store.get(session.id()).await.unwrap().is_none());
    }
    let stats = lifecycle.stats().await.unwrap();
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (expected, 0, 0),
        "{stats:?}"
    );
    let census = store.census().await.unwrap();
    let c_census = census.iter().find(|r| r.router == c).expect("router C");
    assert_eq!(c_census.active, expected);
    for router in census.iter().filter(|r| r.router != c) {
        assert_eq!(
            router.active + router.terminating + router.closed,
            0,
            "{router:?}"
        );
    }
    assert_eq!(store.count(b).await.unwrap(), 0);
    assert_eq!(
        lifecycle.stats().await.unwrap().deletions_in_flight,
        Some(0)
    );
    for t in &tracked {
        checker.track(&t.session);
    }
    for (session, _) in &reused {
        checker.track(session);
    }
    checker.assert(&*store).await;
    assert!(store.audit().await.unwrap().is_clean());

    // Every payload of a closed session drops once the controller lets go:
    // within the monitor's reap bound and the expiry sweep's minute.
    let closed_payloads = tracked.len() + adopted.len();
    drop(checker);
    drop(tracked);
    drop(adopted);
    drop(adopter);
    let let_go = Instant::now();
    let bound = lifecycle
        .liveness()
        .reap_bound(Duration::from_secs(1))
        .max(Duration::from_secs(60) + Duration::from_millis(50));
    within(
        bound + Duration::from_secs(1),
        reach.drops.reach(closed_payloads),
    )
    .await;
    assert!(let_go.elapsed() <= bound, "held {:?}", let_go.elapsed());
    assert_eq!(
        reach.drops.get(),
        closed_payloads,
        "a reused id's payload dropped"
    );
    assert!(reach.release_callbacks.load(Ordering::SeqCst) >= 90);
    assert!(reach.drop_callbacks.load(Ordering::SeqCst) >= closed_payloads);
    let stats = lifecycle.stats().await.unwrap();
    let live = stats.liveness.unwrap();
    assert_eq!((live.watched, live.suspects), (0, 0), "{live:?}");
    assert_eq!(stats.expiry.unwrap().tracked, 0);

    assert!(
        lifecycle
            .shutdown(Duration::from_secs(10))
            .await
            .is_complete()
    );
    drop(reused);
}

/// Wires every piece for real time, in milliseconds: a monitor convicting
/// within about 60 ms, 5 ms expiry ticks, 30 ms confirmation deadlines, a
/// sweep every 10 ms.
fn wire_fast(store: &Arc<Store>, routers: Script<Notify>, prober: Script<Probe>) -> Wired {
    Lifecycle::builder(
        Arc::clone(store),
        ScriptedNotifier::new(Arc::clone(store), routers),
    )
    .prober(ScriptedProber::new(prober))
    .liveness(
        LivenessMonitor::builder()
            .granularity(Duration::from_millis(2))
            .heartbeat_interval(Duration::from_millis(20))
            .timeout_range(Duration::from_millis(20), Duration::from_millis(40))
            .pause_allowance(Duration::from_millis(20))
            .probe_timeout(Duration::from_millis(10))
            .probe_retries(0)
            .partition_guard(false),
    )
    .expiry(
        ExpiryMonitor::builder()
            .tick(Duration::from_millis(5))
            .warn_before(Duration::ZERO),
    )
    .deleter(
        RouterDeleter::builder()
            .confirm_timeout(Duration::from_millis(30))
            .notify_timeout(Duration::from_millis(30))
            .retries(1),
    )
    .reconciler(Reconciler::builder().spare_younger_than(Duration::ZERO))
    .sweeper(AuditSweeper::builder().interval(Duration::from_millis(10)))
    .build()
    .expect("valid settings")
}

/// A cheap per-call mix (no randomness crate needed).
fn mix(n: u64) -> u64 {
    let mut x = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Plays the same race on a real two-thread runtime: two routers deleted
/// side by side (their notifier confirming half, erroring, or panicking),
/// one reconciled with a partial report, one left to the monitors; two
/// client tasks close by id, by key and remove by key at random; the
/// monitors reap (the prober panics on every other call) and expire; the
/// sweeper sweeps every 10 ms; ids reused on another router as they leave
/// the store. Then: each closed once, released once, counted once, the
/// store holding only the new lives, and every payload dropped once the
/// controller shut down and let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_closer_at_once_on_two_threads_closes_each_session_once() {
    let reach = Arc::new(Reach::default());
    let store = Arc::new(Store::default());
    reach.store.set(Arc::downgrade(&store)).ok();
    let routers = Script::from_fn(|call: Call| match (call.round, call.index % 3) {
        (0, 0) => Notify::Confirm(Subset::EvenIds),
        (0, 1) => Notify::Panic,
        _ => Notify::Error,
    });
    let prober = Script::from_fn(|call: Call| {
        if call.index.is_multiple_of(2) {
            Probe::Panic
        } else {
            Probe::nobody()
        }
    });
    let lifecycle = wire_fast(&store, routers, prober);
    let ids = [1, 2, 3, 4].map(RouterId::new);
    let reuse = RouterId::new(9);
    let mut incarnations = HashMap::new();
    for router in ids.into_iter().chain([reuse]) {
        incarnations.insert(router, store.register_router(router).await.unwrap());
    }

    let per_router = 80u64;
    let mut tracked: Vec<Tracked> = Vec::new();
    for (r, router) in ids.into_iter().enumerate() {
        for i in 0..per_router {
            let id = SessionId::new(r as u64 * 1_000 + i);
            let ttl = Duration::from_millis(40 + mix(id.get()) % 120);
            let spec = NewSession::new(id, router, incarnations[&router])
                .payload(Payload::new(id, &reach))
                .token(b"secret".to_vec())
                .expires_in(ttl);
            let session = lifecycle.create(spec).await.unwrap();
            lifecycle.liveness().watch(&session).unwrap();
            let releases = attach_resources(&session, &lifecycle, &reach);
            tracked.push(Tracked { session, releases });
        }
    }
    let total = tracked.len();

    // What the clients do to each session: close by id (0; its id is never
    // reused, or a close by id could land on the new life, the client's
    // own race), close by key (1), remove by key (2), nothing (else).
    let action = |id: SessionId| mix(id.get()) % 6;
    let inc_reuse = incarnations[&reuse];
    let mut reusers = Vec::new();
    for t in tracked.iter().filter(|t| action(t.session.id()) != 0) {
        let store = Arc::clone(&store);
        let session = t.session.clone();
        let reach = Arc::clone(&reach);
        reusers.push(tokio::spawn(async move {
            within(Duration::from_secs(10), session.closed()).await;
            within(Duration::from_secs(10), async {
                while store
                    .get(session.id())
                    .await
                    .unwrap()
                    .is_some_and(|held| Session::ptr_eq(&held, &session))
                {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            let id = session.id();
            drop(session);
            let spec = NewSession::new(id, reuse, inc_reuse).payload(Payload::new(id, &reach));
            store.create(spec).await.expect("the id is free")
        }));
    }

    let mut clients = Vec::new();
    for seed in 0..2u64 {
        let store = Arc::clone(&store);
        let sessions: Vec<Session<Payload>> = tracked
            .iter()
            .map(|t| t.session.clone())
            .filter(|s| s.id().get() % 2 == seed && action(s.id()) < 3)
            .collect();
        clients.push(tokio::spawn(async move {
            let mut won = 0usize;
            for (n, session) in sessions.iter().enumerate() {
                if n % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                let reason = CloseReason::ClientClosed;
                match mix(session.id().get()) % 6 {
                    0 => {
                        if store
                            .close(session.id(), reason)
                            .await
                            .is_ok_and(|o| o.won())
                        {
                            won += 1;
                        }
                    }
                    1 => {
                        if store
                            .close_exact(session.key(), reason)
                            .await
                            .is_ok_and(|o| o.won())
                        {
                            won += 1;
                        }
                    }
                    _ => {
                        let _ = store.remove_exact(session.key()).await;
                    }
                }
            }
            won
        }));
    }

    tokio::time::sleep(Duration::from_millis(30)).await;
    let deletions: Vec<_> = ids[..2]
        .iter()
        .map(|&router| {
            let lifecycle = lifecycle.clone();
            tokio::spawn(async move { lifecycle.deleter().delete(router).await })
        })
        .collect();
    let reported: Vec<SessionId> = (2_000..2_000 + per_router)
        .filter(|i| i % 2 == 0)
        .map(SessionId::new)
        .collect();
    let reconciled = lifecycle
        .reconciler()
        .reconcile(ids[2], incarnations[&ids[2]], &reported)
        .await
        .expect("router 3 is live");

    let mut reports = Vec::new();
    for deletion in deletions {
        let outcome = within(Duration::from_secs(10), deletion)
            .await
            .unwrap()
            .expect("deleted");
        reports.push(outcome.report().expect("this call's run").clone());
    }
    let mut client_wins = 0;
    for client in clients {
        client_wins += within(Duration::from_secs(10), client).await.unwrap();
    }
    let mut reused = Vec::new();
    for reuser in reusers {
        reused.push(within(Duration::from_secs(10), reuser).await.unwrap());
    }

    for t in &tracked {
        let s = &t.session;
        assert!(
            s.closed().now_or_never().is_some(),
            "close not complete: {s:?}"
        );
        let reason = s.close_reason().expect("closed");
        let inline = t.releases.inline.lock().unwrap().clone();
        let queued = t.releases.queued.lock().unwrap().clone();
        assert_eq!((inline, queued), (vec![reason], vec![reason]), "{s:?}");
        if !ids[..2].contains(&s.router()) {
            assert!(
                !matches!(reason, CloseReason::RouterDeleted | CloseReason::Forced),
                "{s:?} closed by another router's deletion: {reason:?}"
            );
        }
    }
    let reasons = tally(&tracked);
    let count = |reason| reasons.get(&reason).copied().unwrap_or(0);
    let stats = lifecycle.stats().await.unwrap();
    assert_eq!(
        stats.liveness.unwrap().reaped as usize,
        count(CloseReason::LivenessTimeout),
        "{reasons:?}"
    );
    assert_eq!(
        stats.expiry.unwrap().expired as usize,
        count(CloseReason::Expired),
        "{reasons:?}"
    );
    assert_eq!(client_wins, count(CloseReason::ClientClosed), "{reasons:?}");
    let (mut confirmed, mut forced) = (0, 0);
    for report in &reports {
        assert_eq!(
            report.confirmed + report.forced + report.already_closed + report.closed_otherwise,
            report.sessions,
            "{report:?}"
        );
        confirmed += report.confirmed;
        forced += report.forced;
    }
    assert_eq!(
        confirmed,
        count(CloseReason::RouterDeleted),
        "{reports:?} {reasons:?}"
    );
    assert_eq!(
        forced,
        count(CloseReason::Forced),
        "{reports:?} {reasons:?}"
    );
    for id in &reconciled.closed {
        let t = tracked.iter().find(|t| t.session.id() == *id).unwrap();
        assert_eq!(t.session.close_reason(), Some(CloseReason::Reclaimed));
    }

    // Only the new lives are stored, untouched.
    let lives = reused.len();
    assert_eq!(store.len(), lives);
    for session in &reused {
        assert_eq!(session.state(), SessionState::Active, "{session:?}");
        let held = store.get(session.id()).await.unwrap().expect("held");
        assert!(Session::ptr_eq(&held, session));
    }
    let stats = lifecycle.stats().await.unwrap();
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (lives, 0, 0),
        "{stats:?}"
    );
    assert_eq!(store.count(reuse).await.unwrap(), lives);
    let checker = InvariantChecker::<Payload>::new();
    for session in &reused {
        checker.track(session);
    }
    checker.assert(&*store).await;

    // The controller stops and lets go: every closed session's payload drops.
    let shutdown = within(
        Duration::from_secs(10),
        lifecycle.shutdown(Duration::from_secs(5)),
    )
    .await;
    assert!(shutdown.is_complete(), "{shutdown:?}");
    drop(checker);
    drop(tracked);
    drop(lifecycle);
    within(Duration::from_secs(5), reach.drops.reach(total)).await;
    assert_eq!(reach.drops.get(), total, "a new life's payload dropped");
    drop(reused);
}

/// Plays a router that disconnects (its grace period starts and the
/// reconciler holds it in the liveness monitor), is deleted during the
/// grace period, and comes back at once as a new incarnation whose
/// session reuses the old id and then goes silent. The old incarnation's
/// grace must not shield the new life: the silent session is reaped
/// within the monitor's `reap_bound` of its last heartbeat, and the old
/// grace's expiry closes nothing of the new life.
#[tokio::test(start_paused = true)]
async fn a_deleted_incarnations_grace_does_not_shield_the_next_life_from_reaping() {
    let reach = Arc::new(Reach::default());
    let store = Arc::new(Store::default());
    let lifecycle: Wired = Lifecycle::builder(
        Arc::clone(&store),
        ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
    )
    .prober(ScriptedProber::always(Probe::nobody()))
    .liveness(quick_liveness())
    .reconciler(Reconciler::builder().grace_period(Duration::from_secs(30)))
    .build()
    .expect("valid settings");
    let router = RouterId::new(1);
    let id = SessionId::new(7);
    let old_life = store.register_router(router).await.unwrap();
    let old = store
        .create(NewSession::new(id, router, old_life).payload(Payload::new(id, &reach)))
        .await
        .unwrap();
    lifecycle.liveness().watch(&old).unwrap();
    lifecycle.liveness().heartbeat(&old).unwrap();

    // It disconnects; the controller deletes it during its grace period.
    lifecycle
        .reconciler()
        .router_disconnected(router)
        .await
        .unwrap();
    assert!(lifecycle.liveness().is_held(router));
    let outcome = within(HOUR, lifecycle.deleter().delete(router))
        .await
        .unwrap();
    assert_eq!(outcome.report().map(|r| r.confirmed), Some(1));
    assert_eq!(old.close_reason(), Some(CloseReason::RouterDeleted));

    let in_grace_after_delete = lifecycle.reconciler().in_grace();
    let held_after_delete = lifecycle.liveness().is_held(router);

    // It comes back at once, as a new life reusing the id, and goes silent.
    let new_life = store.register_router(router).await.unwrap();
    assert!(new_life > old_life);
    let new = store
        .create(NewSession::new(id, router, new_life).payload(Payload::new(id, &reach)))
        .await
        .unwrap();
    lifecycle.liveness().watch(&new).unwrap();
    lifecycle.liveness().heartbeat(&new).unwrap();
    let heard = Instant::now();
    let timeout = lifecycle.liveness().timeout(&new).expect("watched");
    let bound = lifecycle.liveness().reap_bound(timeout);

    let reason = within(HOUR, new.closed()).await;
    let took = heard.elapsed();
    assert_eq!(reason, CloseReason::LivenessTimeout);
    assert!(
        took <= bound,
        "the new life's silent session was reaped after {took:?}, past its reap bound \
         {bound:?}: the deleted incarnation's grace hold shielded it (after the deletion: \
         in_grace = {in_grace_after_delete}, held = {held_after_delete})"
    );
    assert_eq!(lifecycle.liveness().stats().reaped, 1);
    assert!(store.get(id).await.unwrap().is_none());
}

/// Plays a deletion that starts on the very tick the router's sessions
/// expire, with routers that never answer (every notice hangs until its
/// timeout) and a client closing a few by key in the same instant: each
/// session is closed once, by the expiry, the client or the force pass,
/// and the expiry's count, the deletion report and the reasons agree.
#[tokio::test(start_paused = true)]
async fn a_deletion_starting_on_the_expiry_tick_shares_the_sessions_without_double_closes() {
    let reach = Arc::new(Reach::default());
    let store = Arc::new(Store::default());
    reach.store.set(Arc::downgrade(&store)).ok();
    let lifecycle: Wired = Lifecycle::builder(
        Arc::clone(&store),
        ScriptedNotifier::always(Arc::clone(&store), Notify::Never),
    )
    .prober(ScriptedProber::always(Probe::Never))
    .expiry(
        ExpiryMonitor::builder()
            .tick(Duration::from_millis(50))
            .warn_before(Duration::ZERO),
    )
    .deleter(
        RouterDeleter::builder()
            .notify_timeout(Duration::from_millis(50))
            .confirm_timeout(Duration::from_millis(100))
            .retries(0),
    )
    .build()
    .expect("valid settings");
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let expiry_at = Instant::now() + Duration::from_secs(1);
    let mut tracked = Vec::new();
    for i in 0..60u64 {
        let id = SessionId::new(i);
        // Half expire on the deletion's instant, half one tick later.
        let at = expiry_at + Duration::from_millis(50 * (i % 2));
        let spec = NewSession::new(id, router, incarnation)
            .payload(Payload::new(id, &reach))
            .expires_at(at);
        let session = lifecycle.create(spec).await.unwrap();
        let releases = attach_resources(&session, &lifecycle, &reach);
        tracked.push(Tracked { session, releases });
    }
    tokio::time::sleep_until(expiry_at).await;
    let mut client_wins = 0;
    for t in tracked.iter().filter(|t| t.session.id().get() % 7 == 0) {
        if store
            .close_exact(t.session.key(), CloseReason::ClientClosed)
            .await
            .is_ok_and(|o| o.won())
        {
            client_wins += 1;
        }
    }
    let outcome = within(HOUR, lifecycle.deleter().delete(router))
        .await
        .expect("deleted");
    let report = outcome.report().expect("this call's run").clone();
    // The expiry's close task may still be releasing through the queue.
    for t in &tracked {
        within(HOUR, t.session.closed()).await;
    }
    for t in &tracked {
        let reason = t.session.close_reason().unwrap();
        let inline = t.releases.inline.lock().unwrap().clone();
        let queued = t.releases.queued.lock().unwrap().clone();
        assert_eq!(
            (inline, queued),
            (vec![reason], vec![reason]),
            "{:?}",
            t.session
        );
    }
    let reasons = tally(&tracked);
    let count = |reason| reasons.get(&reason).copied().unwrap_or(0);
    assert_eq!(count(CloseReason::ClientClosed), client_wins);
    assert_eq!(
        lifecycle.expiry().stats().expired as usize,
        count(CloseReason::Expired),
        "{reasons:?}"
    );
    assert_eq!(
        report.forced,
        count(CloseReason::Forced),
        "{report:?} {reasons:?}"
    );
    assert_eq!(report.confirmed, 0, "{report:?}");
    assert_eq!(
        report.confirmed + report.forced + report.already_closed + report.closed_otherwise,
        report.sessions,
        "{report:?}"
    );
    assert_eq!(
        count(CloseReason::Forced) + count(CloseReason::Expired) + client_wins,
        tracked.len(),
        "{reasons:?}"
    );
    assert!(store.is_empty());
    let stats = lifecycle.stats().await.unwrap();
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (0, 0, 0)
    );
    let n = tracked.len();
    drop(tracked);
    within(Duration::from_secs(61), reach.drops.reach(n)).await;
    assert!(
        lifecycle
            .shutdown(Duration::from_secs(5))
            .await
            .is_complete()
    );
}
