//! Adversarial suite, part one: user code that calls back into the store.
//!
//! Written as a user would, with the public API only. A session's payload
//! (its `Drop`), a resource attached to it (`Resource::release`) and a close
//! waiter (a hand-made `Waker`: its `wake`, and its `Drop`) each call the
//! store synchronously (`count`, `sessions`, `census`, `get`, the session's
//! own lock through `with_token`, `close` of another session, `create` of
//! another session) on every path of the crate that can run them: the
//! audit and the sweeper racing removals, `repair` of every finding kind,
//! `fence` + `finish`, `close` / `close_exact` / `remove` / `remove_exact`,
//! `create` over a stale index entry, reconciliation and grace expiry,
//! liveness reaping, both ends of a router deletion, the reclaim queue,
//! and dropping the store. On each path the test drops its own handles
//! first, so the crate drops the last one (but `remove`, which hands the
//! last one back). A token reader closing its own session, and (feature
//! `metrics`) a metrics recorder, call back too.
//!
//! `sessions`, `census`, `count`, `get` and `fence` run no user code and
//! drop no handle of their own (what they copy under a lock cannot become
//! a session's last handle before the lock is released): they are the
//! calls the user code makes, on every path.
//!
//! Invariant I8 says none of that user code runs under a lock of the
//! crate. If some did, the call back would wait for the lock its own
//! thread holds, for ever: each scenario runs on a thread of its own, and a
//! watchdog fails the test when it has not finished within [`DEADLOCK`] of
//! real time. Counters prove the user code did run on the path, so that no
//! test passes without exercising what it names.
//!
//! `EtcdStore` is not covered: its calls wait for the network, so user
//! code cannot call it synchronously.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Context;
use std::thread;

use futures::FutureExt;
use futures::task::{ArcWake, noop_waker_ref, waker};
use session_lifecycle::test_util::conformance::soak_rounds;
use session_lifecycle::test_util::{
    HOUR, Notify, Probe, ScriptedNotifier, ScriptedProber, paused_runtime, report_within, within,
};
use session_lifecycle::{
    AuditSweeper, CloseReason, Incarnation, LivenessMonitor, MemoryStore, NewSession, ReclaimQueue,
    Reconciler, Resource, RouterDeleter, RouterId, Session, SessionId, SessionStore,
    session::WaitForCloseOwned, store::Corruption, store::RepairAction, store::RouterStatus,
};
use tokio::time::Duration;

type Store = MemoryStore<Payload>;

/// How long a scenario may take in real time before it counts as
/// deadlocked. Each takes well under a second; the margin is for a loaded
/// machine.
const DEADLOCK: std::time::Duration = std::time::Duration::from_secs(30);

/// Sessions removed per round of a race, and rounds tried (at most) before
/// the race counts as never won.
const RACE_SESSIONS: u64 = 1_000;
const RACE_ROUNDS: u64 = 50;

/// Ids of the sessions the call backs close and create.
const VICTIMS: u64 = 900_000;
const SPARES: u64 = 1_000_000;
/// How many sessions the call backs create, at most, per scenario.
const SPARE_BUDGET: u64 = 64;

// ---------------------------------------------------------------------------
// The user code

/// What the user code reaches when it calls back (the store, weakly: the
/// payloads live in it), and counts of what ran.
struct Reach {
    store: OnceLock<Weak<Store>>,
    /// Sessions of no interest the call backs close, one each.
    victims: Mutex<Vec<SessionId>>,
    spares: AtomicU64,
    /// One more call back, set by a scenario (to reach a reconciler).
    extra: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    drops: AtomicUsize,
    releases: AtomicUsize,
    wakes: AtomicUsize,
    waker_drops: AtomicUsize,
    /// Call backs that found the store.
    calls: AtomicUsize,
    /// Payloads dropped on a racing reader's thread.
    racer_drops: AtomicUsize,
    changed: tokio::sync::watch::Sender<()>,
}

/// A snapshot of what ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    drops: usize,
    releases: usize,
    wakes: usize,
    waker_drops: usize,
    calls: usize,
}

impl Counts {
    /// What ran between `self` and `later`.
    fn delta(self, later: Counts) -> Counts {
        Counts {
            drops: later.drops - self.drops,
            releases: later.releases - self.releases,
            wakes: later.wakes - self.wakes,
            waker_drops: later.waker_drops - self.waker_drops,
            calls: later.calls - self.calls,
        }
    }
}

thread_local! {
    /// Set on the thread of a racing reader.
    static RACER: Cell<bool> = const { Cell::new(false) };
}

impl Reach {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            store: OnceLock::new(),
            victims: Mutex::new(Vec::new()),
            spares: AtomicU64::new(SPARES),
            extra: Mutex::new(None),
            drops: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            wakes: AtomicUsize::new(0),
            waker_drops: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            racer_drops: AtomicUsize::new(0),
            changed: tokio::sync::watch::channel(()).0,
        })
    }

    fn counts(&self) -> Counts {
        Counts {
            drops: self.drops.load(Ordering::SeqCst),
            releases: self.releases.load(Ordering::SeqCst),
            wakes: self.wakes.load(Ordering::SeqCst),
            waker_drops: self.waker_drops.load(Ordering::SeqCst),
            calls: self.calls.load(Ordering::SeqCst),
        }
    }

    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.send_replace(());
    }

    /// Waits (paused time) until `n` payloads were dropped since `before`;
    /// returns what ran since `before`.
    async fn until_dropped(&self, before: Counts, n: usize) -> Counts {
        let mut changes = self.changed.subscribe();
        let dropped = changes.wait_for(|()| before.delta(self.counts()).drops >= n);
        within(HOUR, dropped)
            .await
            .expect("the reach outlives its subscription");
        before.delta(self.counts())
    }

    fn set_extra(&self, extra: Option<Arc<dyn Fn() + Send + Sync>>) {
        *self.extra.lock().unwrap() = extra;
    }

    /// The user code: calls the store synchronously, as a user's `Drop`,
    /// `release` or `wake` may. `own` is the session the code belongs to.
    fn call_back(&self, router: RouterId, own: SessionId) {
        let Some(store) = self.store.get().and_then(Weak::upgrade) else {
            return; // the store is being dropped
        };
        let _ = now(store.count(router));
        drop(now(store.sessions(router)));
        let _ = now(store.census());
        if let Some(session) = now(store.get(own)).expect("a memory store never fails") {
            // The session's own lock.
            session.with_token(|_| ());
        }
        let victim = self.victims.lock().unwrap().pop();
        if let Some(victim) = victim {
            let _ = now(store.close(victim, CloseReason::ClientClosed));
        }
        if let Ok(RouterStatus::Live(incarnation)) = now(store.router_status(router)) {
            let spare = self.spares.fetch_add(1, Ordering::SeqCst);
            if spare < SPARES + SPARE_BUDGET {
                let spec = NewSession::new(SessionId::new(spare), router, incarnation);
                let _ = now(store.create(spec.payload(Payload::inert())));
            }
        }
        let extra = self.extra.lock().unwrap().clone();
        if let Some(extra) = extra {
            extra();
        }
        self.bump(&self.calls);
    }
}

/// A store call, which a `MemoryStore` answers without waiting.
fn now<F: Future>(call: F) -> F::Output {
    call.now_or_never()
        .expect("a MemoryStore call resolves at once")
}

/// The sessions' payload: its `Drop` calls back into the store.
struct Payload {
    reach: Option<Arc<Reach>>,
    router: RouterId,
    id: SessionId,
}

impl Payload {
    /// A payload that does nothing (the call backs' own sessions).
    fn inert() -> Self {
        Self {
            reach: None,
            router: RouterId::new(0),
            id: SessionId::new(0),
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(reach) = self.reach.take() {
            if RACER.get() {
                reach.racer_drops.fetch_add(1, Ordering::SeqCst);
            }
            reach.call_back(self.router, self.id);
            reach.bump(&reach.drops);
        }
    }
}

/// A resource whose release calls back into the store.
struct Release {
    reach: Arc<Reach>,
    router: RouterId,
    id: SessionId,
}

impl Resource for Release {
    fn release(self: Box<Self>, _reason: CloseReason) {
        self.reach.call_back(self.router, self.id);
        self.reach.bump(&self.reach.releases);
    }
}

/// A close waiter polled by hand: a task owning its `closed_owned()`
/// future. Its `wake` calls back into the store, then polls the future to
/// its end and drops it (and with it, perhaps, the session's last handle).
struct Waiter {
    reach: Arc<Reach>,
    router: RouterId,
    id: SessionId,
    state: Mutex<Option<(Session<Payload>, WaitForCloseOwned<Payload>)>>,
}

impl Waiter {
    /// Registers a waiter on `session`; it holds handles of its own until
    /// it is woken.
    fn register(reach: &Arc<Reach>, session: &Session<Payload>) {
        let mut wait = session.closed_owned();
        let waiter = Arc::new(Waiter {
            reach: Arc::clone(reach),
            router: session.router(),
            id: session.id(),
            state: Mutex::new(None),
        });
        let waker = waker(Arc::clone(&waiter));
        assert!(
            wait.poll_unpin(&mut Context::from_waker(&waker))
                .is_pending()
        );
        *waiter.state.lock().unwrap() = Some((session.clone(), wait));
    }
}

impl ArcWake for Waiter {
    fn wake_by_ref(this: &Arc<Self>) {
        this.reach.call_back(this.router, this.id);
        let state = this.state.lock().unwrap().take();
        if let Some((session, mut wait)) = state {
            // The session's own lock, then the wait's end.
            session.with_token(|_| ());
            let ended = wait.poll_unpin(&mut Context::from_waker(noop_waker_ref()));
            assert!(ended.is_ready(), "woken before the close completed");
        }
        this.reach.bump(&this.reach.wakes);
    }
}

/// A waker whose `Drop` calls back into the store: the drop of a task's
/// last waker runs the task's destructors.
struct DropCalls {
    reach: Arc<Reach>,
    router: RouterId,
    id: SessionId,
}

impl ArcWake for DropCalls {
    fn wake_by_ref(_this: &Arc<Self>) {}
}

impl Drop for DropCalls {
    fn drop(&mut self) {
        self.reach.call_back(self.router, self.id);
        self.reach.bump(&self.reach.waker_drops);
    }
}

// ---------------------------------------------------------------------------
// Scenarios

/// A store with one router, its reach, and sessions of no interest for
/// the call backs to close.
struct Fixture {
    reach: Arc<Reach>,
    store: Arc<Store>,
    router: RouterId,
    incarnation: Incarnation,
}

impl Fixture {
    fn new() -> Self {
        let store = Arc::new(Store::default());
        let reach = Reach::new();
        assert!(reach.store.set(Arc::downgrade(&store)).is_ok());
        let router = RouterId::new(1);
        let incarnation = now(store.register_router(router)).unwrap();
        let fixture = Self {
            reach,
            store,
            router,
            incarnation,
        };
        for id in VICTIMS..VICTIMS + 16 {
            let spec = NewSession::new(SessionId::new(id), router, incarnation);
            drop(now(fixture.store.create(spec.payload(Payload::inert()))).unwrap());
            fixture
                .reach
                .victims
                .lock()
                .unwrap()
                .push(SessionId::new(id));
        }
        fixture
    }

    /// A session of `router` whose payload calls back, not in any store.
    fn spec(&self, id: u64, router: RouterId, incarnation: Incarnation) -> NewSession<Payload> {
        let payload = Payload {
            reach: Some(Arc::clone(&self.reach)),
            router,
            id: SessionId::new(id),
        };
        NewSession::new(SessionId::new(id), router, incarnation).payload(payload)
    }

    /// Creates session `id` on the fixture's router with a calling-back
    /// payload, resource and (if `waiter`) close waiter.
    fn create(&self, id: u64, waiter: bool) -> Session<Payload> {
        let spec = self.spec(id, self.router, self.incarnation);
        let session = now(self.store.create(spec)).expect("created");
        self.arm(&session, waiter);
        session
    }

    /// Attaches the calling-back resource and, if `waiter`, a waiter.
    fn arm(&self, session: &Session<Payload>, waiter: bool) {
        let release = Release {
            reach: Arc::clone(&self.reach),
            router: session.router(),
            id: session.id(),
        };
        assert!(session.attach(release).is_ok());
        if waiter {
            Waiter::register(&self.reach, session);
        }
    }

    /// Creates `n` armed sessions from `first` and keeps no handle.
    fn fill(&self, first: u64, n: u64) {
        for id in first..first + n {
            drop(self.create(id, true));
        }
    }
}

/// Runs `scenario` on a thread of its own; fails if it does not finish
/// within [`DEADLOCK`] (user code waiting for a lock its own thread holds).
fn no_deadlock<T: Send + 'static>(name: &str, scenario: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, finished) = mpsc::channel();
    let runner = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = done.send(scenario());
        })
        .expect("a thread for the scenario");
    match finished.recv_timeout(DEADLOCK) {
        Ok(output) => {
            runner.join().expect("the scenario finished");
            output
        }
        Err(RecvTimeoutError::Timeout) => panic!(
            "{name}: deadlock: not finished within {DEADLOCK:?} \
             (user code called back into the store under one of its locks)"
        ),
        Err(RecvTimeoutError::Disconnected) => match runner.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the scenario sends before it ends"),
        },
    }
}

/// [`no_deadlock`] for an async scenario, on a paused-time runtime.
fn no_deadlock_async<F, Fut>(name: &str, scenario: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    no_deadlock(name, move || paused_runtime().block_on(scenario()));
}

// ---------------------------------------------------------------------------
// Races: a reader's copy of a handle becomes the last one

/// What a racing reader calls, again and again.
#[derive(Clone, Copy, Debug)]
enum Reader {
    Audit,
    Sweep,
}

/// Removes sessions while `reader` runs in a loop on another thread, until
/// a payload was dropped on the reader's thread (its copy was the last
/// handle), or under `SESSION_LIFECYCLE_SOAK` for that many rounds.
///
/// Not deterministic (no user code runs between the audit's copy and its
/// check, where the removal must land), but not close: the removals' own
/// call backs are slow, and the reader's copies hold the last handle of
/// most of the sessions of the first round.
fn race(reader: Reader) {
    no_deadlock(&format!("{reader:?} racing removals"), move || {
        let soak = soak_rounds(0);
        let rounds = if soak == 0 { RACE_ROUNDS } else { soak };
        let fixture = Fixture::new();
        for round in 0..rounds {
            let first = round * RACE_SESSIONS;
            fixture.fill(first, RACE_SESSIONS);
            let stop = AtomicBool::new(false);
            thread::scope(|scope| {
                scope.spawn(|| read_until(reader, &fixture.store, &stop));
                // Stops the reader however this thread leaves the scope.
                let _stop = StopOnDrop(&stop);
                for id in first..first + RACE_SESSIONS {
                    // A sweep may remove it first (a finding of the moment).
                    drop(now(fixture.store.remove(SessionId::new(id))));
                }
            });
            if soak == 0 && fixture.reach.racer_drops.load(Ordering::SeqCst) > 0 {
                break;
            }
        }
        let won = fixture.reach.racer_drops.load(Ordering::SeqCst);
        assert!(
            won > 0,
            "in {rounds} rounds the {reader:?} never held a last handle: the race proved nothing"
        );
    });
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn read_until(reader: Reader, store: &Arc<Store>, stop: &AtomicBool) {
    RACER.set(true);
    match reader {
        Reader::Audit => {
            while !stop.load(Ordering::SeqCst) {
                let _ = now(store.audit()).expect("a memory store never fails");
            }
        }
        Reader::Sweep => paused_runtime().block_on(async {
            let sweeper = AuditSweeper::builder()
                .build(Arc::clone(store))
                .expect("a sweeper");
            while !stop.load(Ordering::SeqCst) {
                let _ = sweeper.sweep().await.expect("a memory store never fails");
            }
        }),
    }
    RACER.set(false);
}

#[test]
fn the_audit_racing_removals_drops_last_handles_outside_its_locks() {
    race(Reader::Audit);
}

#[test]
fn the_sweeper_racing_removals_drops_last_handles_outside_its_locks() {
    race(Reader::Sweep);
}

// ---------------------------------------------------------------------------
// The store's own paths

#[test]
fn repairing_every_finding_kind_runs_user_code_outside_the_locks() {
    no_deadlock("repair", || {
        let fixture = Fixture::new();
        let store = &fixture.store;
        // 1: closed, and in the index only: its entry is dropped.
        let dropped = fixture.create(1, false);
        store.corrupt(Corruption::DropFromMap(dropped.id()));
        let _ = dropped.close(CloseReason::ClientClosed);
        drop(dropped);
        // 2: open, in the index only: put back in the map.
        drop(fixture.create(2, true));
        store.corrupt(Corruption::DropFromMap(SessionId::new(2)));
        // 3: open, in the map only: indexed again.
        drop(fixture.create(3, true));
        store.corrupt(Corruption::Unindex(SessionId::new(3)));
        // 4: closed, in the map only: removed.
        let unindexed = fixture.create(4, false);
        let _ = unindexed.close(CloseReason::ClientClosed);
        store.corrupt(Corruption::Unindex(unindexed.id()));
        drop(unindexed);
        // 5: of a router that never existed: reclaimed.
        let stray = fixture
            .spec(5, RouterId::new(99), fixture.incarnation)
            .into_session();
        fixture.arm(&stray, true);
        store.corrupt(Corruption::Inject(stray));
        // 6: closed through its handle, left in the store: removed.
        let closed = fixture.create(6, false);
        let _ = closed.close(CloseReason::ClientClosed);
        drop(closed);

        let findings = now(store.audit()).unwrap();
        let ids = |ids: &[u64]| ids.iter().copied().map(SessionId::new).collect::<Vec<_>>();
        let sorted = |mut ids: Vec<SessionId>| {
            ids.sort_unstable();
            ids
        };
        let indexed_only = findings.missing_from_map.iter().map(|f| f.1).collect();
        assert_eq!(sorted(indexed_only), ids(&[1, 2]));
        assert_eq!(sorted(findings.missing_from_index.clone()), ids(&[3, 4]));
        assert_eq!(findings.orphans, ids(&[5]));
        assert_eq!(sorted(findings.closed_in_store.clone()), ids(&[4, 6]));

        let before = fixture.reach.counts();
        let repairs = now(store.repair(&findings)).unwrap();
        let ran = before.delta(fixture.reach.counts());
        let mut actions: Vec<_> = repairs.iter().map(|r| (r.session, r.action)).collect();
        actions.sort_by_key(|(id, _)| *id);
        use RepairAction::*;
        let expected = [
            DroppedIndexEntry,
            Restored,
            Reindexed,
            ClosedRemoved,
            OrphanReclaimed,
            ClosedRemoved,
        ];
        assert_eq!(
            actions,
            ids(&[1, 2, 3, 4, 5, 6])
                .into_iter()
                .zip(expected)
                .collect::<Vec<_>>()
        );
        // The repair dropped the last handles of 1, 4, 5 and 6, and closed
        // 5 (its resource and its waiter).
        assert_eq!((ran.drops, ran.releases, ran.wakes), (4, 1, 1), "{ran:?}");
        assert!(ran.calls >= 6);
        assert!(now(store.audit()).unwrap().is_clean());
        for id in [2, 3] {
            assert!(now(store.get(SessionId::new(id))).unwrap().is_some());
        }
    });
}

#[test]
fn fence_then_finish_runs_user_code_outside_the_locks() {
    no_deadlock("fence and finish", || {
        let fixture = Fixture::new();
        let (store, router) = (&fixture.store, fixture.router);
        fixture.fill(0, 8);
        let snapshot = now(store.fence(router)).unwrap();
        assert_eq!(snapshot.sessions.len(), 8 + 16);
        drop(snapshot);

        let before = fixture.reach.counts();
        let report = now(store.finish(router, fixture.incarnation)).unwrap();
        let ran = before.delta(fixture.reach.counts());
        // (The call backs closed some of the 16 others first.)
        assert!(report.removed >= 8, "{report:?}");
        assert_eq!((ran.drops, ran.releases, ran.wakes), (8, 8, 8), "{ran:?}");
        assert!(ran.calls >= 24);
    });
}

#[test]
fn closing_and_removing_by_id_and_by_key_run_user_code_outside_the_locks() {
    no_deadlock("close, close_exact, remove, remove_exact", || {
        let fixture = Fixture::new();
        let store = &fixture.store;
        let key = |id| fixture.create(id, true).key(); // the handle is dropped at once
        let (one, two, three, four) = (key(1), key(2), key(3), key(4));

        let before = fixture.reach.counts();
        let _ = now(store.close(one.id(), CloseReason::ClientClosed)).unwrap();
        let _ = now(store.close_exact(two, CloseReason::ClientClosed)).unwrap();
        let ran = before.delta(fixture.reach.counts());
        // The store dropped the last handles itself.
        assert_eq!((ran.drops, ran.releases, ran.wakes), (2, 2, 2), "{ran:?}");

        let before = fixture.reach.counts();
        let removed = [
            now(store.remove(three.id())).unwrap(),
            now(store.remove_exact(four)).unwrap(),
        ];
        let ran = before.delta(fixture.reach.counts());
        // `remove` hands the last handle back: its payload drops with it.
        assert_eq!((ran.drops, ran.releases, ran.wakes), (0, 2, 2), "{ran:?}");
        drop(removed);
        assert_eq!(before.delta(fixture.reach.counts()).drops, 2);
    });
}

/// Session `7` twice: the map holds a later life `A`, the index still the
/// earlier `B`, whose last handle is the index's.
fn two_lives(fixture: &Fixture) -> Session<Payload> {
    drop(fixture.create(7, false)); // B
    fixture
        .store
        .corrupt(Corruption::DropFromMap(SessionId::new(7)));
    let later = fixture
        .spec(7, fixture.router, fixture.incarnation)
        .into_session();
    fixture.arm(&later, false);
    fixture.store.corrupt(Corruption::Inject(later.clone()));
    later
}

#[test]
fn closing_a_session_leaves_another_life_of_its_id_in_the_index() {
    no_deadlock("close with another life indexed", || {
        let fixture = Fixture::new();
        let store = &fixture.store;
        drop(two_lives(&fixture));

        let before = fixture.reach.counts();
        let _ = now(store.close(SessionId::new(7), CloseReason::ClientClosed)).unwrap();
        let ran = before.delta(fixture.reach.counts());
        // Only A closed and dropped; B's entry is not A's to remove.
        assert_eq!((ran.drops, ran.releases), (1, 1), "{ran:?}");
        let findings = now(store.audit()).unwrap();
        assert_eq!(
            findings.missing_from_map,
            vec![(fixture.router, SessionId::new(7))]
        );

        let before = fixture.reach.counts();
        let _ = now(store.repair(&findings)).unwrap();
        // B comes back (open, it belongs): nothing dropped.
        assert_eq!(before.delta(fixture.reach.counts()).drops, 0);
        assert!(now(store.audit()).unwrap().is_clean());
    });
}

#[test]
fn creating_over_a_stale_index_entry_drops_it_outside_the_locks() {
    no_deadlock("create over a stale index entry", || {
        let fixture = Fixture::new();
        let store = &fixture.store;
        drop(fixture.create(9, false));
        store.corrupt(Corruption::DropFromMap(SessionId::new(9)));

        let before = fixture.reach.counts();
        let spec = fixture.spec(9, fixture.router, fixture.incarnation);
        let session = now(store.create(spec)).expect("the map had lost the id");
        let ran = before.delta(fixture.reach.counts());
        // The index's old entry was its session's last handle.
        assert_eq!((ran.drops, ran.releases), (1, 0), "{ran:?}");
        assert!(ran.calls >= 1);
        drop(session);
        assert!(now(store.audit()).unwrap().is_clean());
    });
}

#[test]
fn corrupting_the_index_drops_what_it_removed_outside_the_locks() {
    no_deadlock("corrupt Unindex", || {
        let fixture = Fixture::new();
        drop(two_lives(&fixture));
        let before = fixture.reach.counts();
        fixture
            .store
            .corrupt(Corruption::Unindex(SessionId::new(7)));
        assert_eq!(before.delta(fixture.reach.counts()).drops, 1);
    });
}

#[test]
fn dropping_the_store_drops_every_payload() {
    no_deadlock("drop the store", || {
        let fixture = Fixture::new();
        for id in 0..8 {
            // No waiter: a waiter and its open session hold each other.
            drop(fixture.create(id, false));
        }
        let Fixture { reach, store, .. } = fixture;
        let before = reach.counts();
        drop(store);
        let ran = before.delta(reach.counts());
        // The payloads found the store gone; nothing was released.
        assert_eq!((ran.drops, ran.releases, ran.calls), (8, 0, 0), "{ran:?}");
    });
}

// ---------------------------------------------------------------------------
// The session's own lock

#[test]
fn close_waiters_drop_replaced_and_abandoned_wakers_outside_the_session_lock() {
    no_deadlock("close waiters' wakers", || {
        let fixture = Fixture::new();
        let session = fixture.create(1, false);
        let calling_waker = || {
            waker(Arc::new(DropCalls {
                reach: Arc::clone(&fixture.reach),
                router: session.router(),
                id: session.id(),
            }))
        };
        let mut wait = session.closed();
        // A waits; then the task moves to B: A's last clone is dropped.
        let first = calling_waker();
        assert!(
            wait.poll_unpin(&mut Context::from_waker(&first))
                .is_pending()
        );
        drop(first);
        let second = calling_waker();
        assert!(
            wait.poll_unpin(&mut Context::from_waker(&second))
                .is_pending()
        );
        drop(second);
        assert_eq!(fixture.reach.counts().waker_drops, 1);
        // The wait is abandoned: B's last clone is dropped.
        drop(wait);
        assert_eq!(fixture.reach.counts().waker_drops, 2);
        assert!(fixture.reach.counts().calls >= 2);
        assert!(!session.is_closed());
    });
}

#[test]
fn a_token_reader_may_close_its_own_session() {
    no_deadlock("with_token", || {
        let fixture = Fixture::new();
        let spec = fixture.spec(1, fixture.router, fixture.incarnation);
        let session = now(fixture.store.create(spec.token(b"s3cret".to_vec()))).unwrap();
        fixture.arm(&session, true);
        let store = &fixture.store;
        let seen = session.with_token(|token| {
            let _ = now(store.close(SessionId::new(1), CloseReason::ClientClosed)).unwrap();
            token.map(<[u8]>::to_vec)
        });
        // The reader saw the token to its end; the close wiped it.
        assert_eq!(seen.as_deref(), Some(&b"s3cret"[..]));
        assert!(session.with_token(|token| token.is_none()));
        let ran = fixture.reach.counts();
        assert_eq!((ran.releases, ran.wakes), (1, 1), "{ran:?}");
    });
}

// ---------------------------------------------------------------------------
// The pieces around the store

#[test]
fn reconciling_and_grace_expiry_run_user_code_outside_the_locks() {
    no_deadlock_async("reconcile and grace expiry", || async {
        let fixture = Fixture::new();
        let store = &fixture.store;
        let lost = RouterId::new(2);
        let lost_incarnation = now(store.register_router(lost)).unwrap();
        fixture.fill(0, 8);
        for id in 100..108 {
            let spec = fixture.spec(id, lost, lost_incarnation);
            let session = now(store.create(spec)).unwrap();
            fixture.arm(&session, true);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let reconciler = reached_reconciler(&fixture, lost);

        // The router reports none of its sessions: all eight are closed.
        let before = fixture.reach.counts();
        let no_ids: [SessionId; 0] = [];
        let report = reconciler
            .reconcile(fixture.router, fixture.incarnation, no_ids)
            .await
            .unwrap();
        assert!(report.closed.len() >= 8);
        let ran = before.delta(fixture.reach.counts());
        assert_eq!((ran.drops, ran.releases, ran.wakes), (8, 8, 8), "{ran:?}");

        // The other router disconnects and never comes back.
        let before = fixture.reach.counts();
        let _ = reconciler.router_disconnected(lost).await.unwrap();
        let ran = fixture.reach.until_dropped(before, 8).await;
        assert_eq!((ran.releases, ran.wakes), (8, 8), "{ran:?}");
        fixture.reach.set_extra(None);
        reconciler.shutdown().await;
    });
}

/// A reconciler (grace period 30 s) the user code calls too, about
/// `router`; the caller ends it with `set_extra(None)` (it holds the store).
fn reached_reconciler(fixture: &Fixture, router: RouterId) -> Reconciler<Store> {
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(30))
        .build(Arc::clone(&fixture.store))
        .expect("valid settings");
    let reached = reconciler.clone();
    fixture.reach.set_extra(Some(Arc::new(move || {
        let _ = reached.in_grace();
        let _ = reached.grace_deadline(router);
    })));
    reconciler
}

#[test]
fn liveness_reaping_runs_user_code_outside_the_locks() {
    no_deadlock_async("liveness reaping", || async {
        let fixture = Fixture::new();
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(Duration::from_secs(1))
            .probe_timeout(Duration::from_secs(1))
            .probe_retries(0)
            .build(
                Arc::clone(&fixture.store),
                ScriptedProber::always(Probe::Never),
            )
            .expect("a monitor");
        for id in 0..8 {
            monitor.watch(&fixture.create(id, true)).unwrap();
        }
        let before = fixture.reach.counts();
        let ran = fixture.reach.until_dropped(before, 8).await;
        assert_eq!((ran.releases, ran.wakes), (8, 8), "{ran:?}");
        monitor.shutdown().await;
    });
}

/// Deletes the fixture's router of 8 calling-back sessions through a
/// notifier that answers `answer`.
fn delete_router(name: &'static str, answer: Notify) {
    no_deadlock_async(name, move || async move {
        let fixture = Fixture::new();
        fixture.fill(0, 8);
        let notifier = ScriptedNotifier::always(Arc::clone(&fixture.store), answer);
        let deleter = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(1))
            .retries(0)
            .build(Arc::clone(&fixture.store), notifier)
            .expect("valid settings");
        let before = fixture.reach.counts();
        let report = report_within(HOUR, deleter.delete(fixture.router)).await;
        // The run dropped the last handles before it answered.
        let ran = before.delta(fixture.reach.counts());
        assert_eq!((ran.drops, ran.releases, ran.wakes), (8, 8, 8), "{ran:?}");
        // (The call backs closed some of the 16 others first.)
        match answer {
            Notify::Never => assert!(report.forced >= 8, "{report:?}"),
            _ => assert!(report.confirmed >= 8, "{report:?}"),
        }
    });
}

#[test]
fn a_deletion_its_router_confirms_runs_user_code_outside_the_locks() {
    delete_router("delete (confirmed)", Notify::confirm_all());
}

#[test]
fn a_forced_deletion_runs_user_code_outside_the_locks() {
    delete_router("delete (forced)", Notify::Never);
}

#[test]
fn the_reclaim_queue_releases_and_completes_closes_outside_the_locks() {
    no_deadlock_async("reclaim queue", || async {
        let fixture = Fixture::new();
        let queue = ReclaimQueue::builder().workers(2).build().expect("a queue");
        // Orphans (of a router that never existed): the sweeper closes them
        // through the queue, whose workers release their resources and
        // complete their closes (wake their waiters, drop their handles).
        for id in 0..8 {
            let stray = fixture
                .spec(id, RouterId::new(99), fixture.incarnation)
                .into_session();
            fixture.arm(&stray, true);
            fixture.store.corrupt(Corruption::Inject(stray));
        }
        let sweeper = AuditSweeper::builder()
            .reclaim_queue(queue.clone())
            .build(Arc::clone(&fixture.store))
            .expect("a sweeper");
        let before = fixture.reach.counts();
        let report = sweeper.sweep().await.unwrap();
        assert_eq!(report.repairs.len(), 8, "{report:?}");
        let ran = fixture.reach.until_dropped(before, 8).await;
        assert_eq!((ran.releases, ran.wakes), (8, 8), "{ran:?}");
        assert_eq!(queue.stats().completed, 8);
        sweeper.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// The metrics recorder (feature `metrics`)

/// A metrics recorder is user code too: this one calls back into the store
/// (and the reconciler) whenever the crate records anything.
#[cfg(feature = "metrics")]
mod recorder {
    use std::collections::BTreeSet;

    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use super::*;

    thread_local! {
        /// Set while the recorder calls back: what the call back records
        /// is not called back for again.
        static CALLING_BACK: Cell<bool> = const { Cell::new(false) };
    }

    struct CallingBack {
        reach: Arc<Reach>,
        router: RouterId,
        seen: Mutex<BTreeSet<String>>,
    }

    impl CallingBack {
        fn call_back(&self, key: &Key) {
            self.seen.lock().unwrap().insert(key.name().to_owned());
            if CALLING_BACK.replace(true) {
                return;
            }
            self.reach.call_back(self.router, SessionId::new(0));
            CALLING_BACK.set(false);
        }
    }

    impl Recorder for CallingBack {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.call_back(key);
            Counter::noop()
        }

        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.call_back(key);
            Gauge::noop()
        }

        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.call_back(key);
            Histogram::noop()
        }
    }

    #[test]
    fn the_metrics_recorder_may_call_back_on_every_path() {
        no_deadlock("metrics recorder", || {
            let fixture = Fixture::new();
            let recorder = CallingBack {
                reach: Arc::clone(&fixture.reach),
                router: fixture.router,
                seen: Mutex::new(BTreeSet::new()),
            };
            metrics::with_local_recorder(&recorder, || {
                paused_runtime().block_on(record_everything(&fixture));
            });
            let seen = recorder.seen.into_inner().unwrap();
            for name in [
                "session_lifecycle_sessions_created_total",
                "session_lifecycle_sessions_closed_total",
                "session_lifecycle_routers_disconnected_total",
                "session_lifecycle_routers_lost_total",
                "session_lifecycle_routers_deleted_total",
                "session_lifecycle_repairs_total",
            ] {
                assert!(seen.contains(name), "{name} not recorded: {seen:?}");
            }
            assert!(fixture.reach.counts().calls > 10);
        });
    }

    /// Creates, closes, disconnects a router past its grace period, deletes
    /// one, and repairs an orphan.
    async fn record_everything(fixture: &Fixture) {
        let store = &fixture.store;
        fixture.fill(0, 4);
        let _ = now(store.close(SessionId::new(0), CloseReason::ClientClosed)).unwrap();

        let reconciler = reached_reconciler(fixture, fixture.router);
        let before = fixture.reach.counts();
        let _ = reconciler
            .router_disconnected(fixture.router)
            .await
            .unwrap();
        fixture.reach.until_dropped(before, 3).await;
        fixture.reach.set_extra(None);
        reconciler.shutdown().await;

        let notifier = ScriptedNotifier::always(Arc::clone(store), Notify::confirm_all());
        let deleter = RouterDeleter::new(Arc::clone(store), notifier);
        let _ = report_within(HOUR, deleter.delete(fixture.router)).await;

        let stray = fixture
            .spec(50, RouterId::new(99), fixture.incarnation)
            .into_session();
        store.corrupt(Corruption::Inject(stray));
        let sweeper = AuditSweeper::builder()
            .build(Arc::clone(store))
            .expect("a sweeper");
        assert_eq!(sweeper.sweep().await.unwrap().repairs.len(), 1);
    }
}
