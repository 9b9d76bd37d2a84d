//! Adversarial tests of session expiry, from a controller author's side:
//! extensions and clears racing the monitor from many tasks, deletions
//! racing expiries, id reuse across router incarnations, far, zero and past
//! expiries, many expiries in one tick, shutdown and what follows it,
//! reentrant user code, and the monitor's statistics.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use session_lifecycle::expiry::{ExpiryError, ExpiryMonitorBuilder, TrackError};
use session_lifecycle::store::RouterStatus;
use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, ScriptedNotifier, report_within, within,
};
use session_lifecycle::{
    CloseReason, Event, EventBus, ExpiryMonitor, Incarnation, MemoryStore, NewSession,
    RouterDeleter, RouterId, Session, SessionId, SessionState, SessionStore,
};
use tokio::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(100);
/// The documented bound: one tick, plus 1 ms of tokio's timer resolution.
const LATE: Duration = Duration::from_millis(101);

/// A store with router `router` registered, and a monitor of tick `TICK`
/// on it, set up further by `settings`.
async fn setup(
    router: u64,
    settings: impl FnOnce(ExpiryMonitorBuilder) -> ExpiryMonitorBuilder,
) -> (
    Arc<MemoryStore>,
    ExpiryMonitor<MemoryStore>,
    RouterId,
    Incarnation,
) {
    let store = Arc::new(MemoryStore::new());
    let monitor = settings(ExpiryMonitor::builder().tick(TICK))
        .build(Arc::clone(&store))
        .unwrap();
    let router = RouterId::new(router);
    let incarnation = store.register_router(router).await.unwrap();
    (store, monitor, router, incarnation)
}

/// A tiny deterministic generator (xorshift).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Attaches a resource recording each release of `session` (when it ran).
fn record_releases<P>(session: &Session<P>, log: &Arc<Mutex<Vec<Instant>>>) {
    let log = Arc::clone(log);
    session
        .attach(move |_: CloseReason| log.lock().unwrap().push(Instant::now()))
        .unwrap();
}

/// Many tasks extend (and some clear) the expiries of 200 sessions while
/// they come due. Each session closes at most one tick (and 1 ms) after
/// the latest expiry it was granted, never before it, exactly once; a
/// cleared one never closes.
#[tokio::test(start_paused = true)]
async fn concurrent_extensions_close_within_a_tick_of_the_latest_expiry_granted() {
    const SESSIONS: usize = 200;
    const TASKS: u64 = 8;
    within(HOUR, async {
        let (store, monitor, router, incarnation) =
            setup(1, |b| b.warn_before(Duration::ZERO)).await;
        let start = Instant::now();
        let mut sessions = Vec::new();
        let mut logs = Vec::new();
        for id in 0..SESSIONS {
            let at = start + Duration::from_millis(500 + 37 * id as u64 % 1_500);
            let spec =
                NewSession::new(SessionId::new(id as u64), router, incarnation).expires_at(at);
            let session = store.create(spec).await.unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            record_releases(&session, &log);
            monitor.track(&session).unwrap();
            sessions.push(session);
            logs.push(log);
        }
        // Per session: the latest expiry granted (None: cleared).
        let granted: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(
            sessions.iter().map(|s| s.expires_at()).collect(),
        ));
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let sessions = sessions.clone();
            let granted = Arc::clone(&granted);
            let refused = Arc::clone(&refused);
            tasks.push(tokio::spawn(async move {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (task + 1);
                let until = start + Duration::from_secs(6);
                while Instant::now() < until {
                    let i = (next(&mut seed) % SESSIONS as u64) as usize;
                    let session = &sessions[i];
                    let roll = next(&mut seed) % 1_000;
                    if roll < 5 && i.is_multiple_of(10) {
                        if session.clear_expiry().is_ok() {
                            granted.lock().unwrap()[i] = None;
                        }
                    } else {
                        // Just ahead of now, or shortening (changes nothing).
                        let at = if roll < 300 {
                            Instant::now() - Duration::from_millis(roll)
                        } else {
                            Instant::now() + Duration::from_millis(roll % 400)
                        };
                        match session.extend_expiry(at) {
                            Ok(()) => {
                                let mut granted = granted.lock().unwrap();
                                if let Some(slot) = granted[i].as_mut() {
                                    *slot = (*slot).max(at);
                                }
                                assert!(
                                    session.expires_at() >= Some(at)
                                        || session.expires_at().is_none(),
                                    "an Ok extension left the expiry before it"
                                );
                            }
                            Err(ExpiryError::Expired(_) | ExpiryError::Closed(_)) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(other) => panic!("unexpected {other:?}"),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1 + next(&mut seed) % 7)).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(
            refused.load(Ordering::Relaxed) > 0,
            "no extension came too late"
        );
        let granted = granted.lock().unwrap().clone();
        let mut expired = 0;
        for (i, session) in sessions.iter().enumerate() {
            match granted[i] {
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    assert!(
                        !session.is_closed(),
                        "{} closed after its expiry was cleared",
                        session.id()
                    );
                    assert!(logs[i].lock().unwrap().is_empty());
                }
                Some(latest) => {
                    assert_eq!(session.closed().await, CloseReason::Expired);
                    expired += 1;
                    let releases = logs[i].lock().unwrap().clone();
                    assert_eq!(releases.len(), 1, "{} released {releases:?}", session.id());
                    let final_at = session.expires_at().unwrap();
                    assert_eq!(
                        final_at,
                        latest,
                        "{}: the expiry in force is not the latest granted",
                        session.id()
                    );
                    assert!(
                        releases[0] >= latest,
                        "{} closed {:?} before the latest expiry granted",
                        session.id(),
                        latest - releases[0]
                    );
                    assert!(
                        releases[0] <= latest + LATE,
                        "{} closed {:?} after its latest expiry: more than a tick and 1 ms",
                        session.id(),
                        releases[0] - latest
                    );
                }
            }
        }
        // Let the close tasks finish their removals.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = monitor.stats();
        assert_eq!(stats.expired, expired as u64);
        let cleared = granted.iter().filter(|g| g.is_none()).count();
        assert!(
            cleared > 0,
            "no expiry was cleared: the clear race was not run"
        );
        assert!(stats.tracked <= cleared as u64, "{stats:?}");
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert_eq!(
            monitor.stats().tracked,
            0,
            "cleared ones not let go by the sweep"
        );
        assert_eq!(store.len(), cleared);
    })
    .await;
}

/// A router deleted just before, at and just after its sessions' common
/// expiry: every session closes once, is released once, leaves the store
/// (I1); the deletion report and the monitor's `expired` add up to the
/// sessions there were.
#[tokio::test(start_paused = true)]
async fn a_deletion_racing_the_expiry_closes_each_session_once_and_counts_add_up() {
    const SESSIONS: u64 = 300;
    for offset_ms in [-150i64, -100, -1, 0, 1, 50, 99, 100, 101] {
        within(HOUR, async {
            let (store, monitor, router, incarnation) = setup(1, |b| b).await;
            let start = Instant::now();
            let expiry = start + Duration::from_millis(1_050);
            let mut observed = ObservedRouter {
                router,
                incarnation,
                sessions: Vec::new(),
                releases: Vec::new(),
                waiters: Vec::new(),
            };
            for id in 0..SESSIONS {
                let spec =
                    NewSession::new(SessionId::new(id), router, incarnation).expires_at(expiry);
                let session = store.create(spec).await.unwrap();
                monitor.track(&session).unwrap();
                observed.observe(session);
            }
            let at = if offset_ms < 0 {
                expiry - Duration::from_millis(offset_ms.unsigned_abs())
            } else {
                expiry + Duration::from_millis(offset_ms.unsigned_abs())
            };
            tokio::time::sleep_until(at).await;
            let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
            let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
            let report = report_within(HOUR, deleter.delete(router)).await;
            let sessions = observed.sessions.clone();
            let releases: Vec<usize> = observed
                .releases
                .iter()
                .map(|r| r.load(Ordering::SeqCst))
                .collect();
            // I1, by hand: the kit's `assert_deleted` expects no expiries.
            assert!(
                matches!(store.router_status(router).await, Ok(RouterStatus::Deleted(i)) if i == incarnation),
                "offset {offset_ms}: router not deleted"
            );
            assert!(matches!(store.count(router).await, Ok(0)));
            for (session, waiter) in sessions.iter().zip(observed.waiters) {
                assert!(session.is_closed(), "offset {offset_ms}: {session:?} not closed");
                assert!(
                    matches!(store.get(session.id()).await, Ok(None)),
                    "offset {offset_ms}: {session:?} still stored"
                );
                let reason = tokio::time::timeout(Duration::from_secs(1), waiter)
                    .await
                    .expect("a close waiter did not wake")
                    .unwrap();
                assert!(matches!(
                    reason,
                    CloseReason::RouterDeleted | CloseReason::Forced | CloseReason::Expired
                ));
            }
            for (session, released) in sessions.iter().zip(&releases) {
                assert_eq!(
                    *released,
                    1,
                    "offset {offset_ms}: {} released {released} times",
                    session.id()
                );
            }
            // The close tasks are done once the monitor is shut down.
            monitor.shutdown().await;
            let count = |reason| {
                sessions
                    .iter()
                    .filter(|s| s.close_reason() == Some(reason))
                    .count()
            };
            let expired = count(CloseReason::Expired);
            assert_eq!(
                monitor.stats().expired,
                expired as u64,
                "offset {offset_ms}: the monitor's count"
            );
            assert!(report.sessions <= SESSIONS as usize);
            assert_eq!(
                report.sessions,
                report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
                "offset {offset_ms}: {report:?}"
            );
            assert_eq!(
                expired,
                SESSIONS as usize - report.sessions
                    + report.already_closed
                    + report.closed_otherwise,
                "offset {offset_ms}: expired sessions vs the report {report:?}"
            );
            assert_eq!(
                count(CloseReason::RouterDeleted) + count(CloseReason::Forced),
                report.confirmed + report.forced,
                "offset {offset_ms}: {report:?}"
            );
            if offset_ms < 0 {
                assert_eq!(expired, 0, "offset {offset_ms}: expired before the expiry");
            }
            if offset_ms >= 101 {
                assert_eq!(
                    expired, SESSIONS as usize,
                    "offset {offset_ms}: not expired within a tick"
                );
            }
        })
        .await;
    }
}

/// I9: a router deleted and re-registered; its session ids come back in
/// the new incarnation. The old lives' expiries (earlier) must not touch
/// the new lives; each new life expires at its own expiry.
#[tokio::test(start_paused = true)]
async fn old_lives_expiries_never_close_new_lives_of_their_ids() {
    within(HOUR, async {
        let (store, monitor, router, old_incarnation) = setup(9, |b| b).await;
        let start = Instant::now();
        let mut old = Vec::new();
        for id in 0..50 {
            let spec = NewSession::new(SessionId::new(id), router, old_incarnation)
                .expires_at(start + Duration::from_secs(10));
            let session = store.create(spec).await.unwrap();
            monitor.track(&session).unwrap();
            old.push(session);
        }
        // Another id's old life is closed by its client and removed.
        let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
        let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
        report_within(HOUR, deleter.delete(router)).await;
        let new_incarnation = store.register_router(router).await.unwrap();
        assert_ne!(new_incarnation, old_incarnation);
        let mut new = Vec::new();
        for id in 0..50 {
            let mut spec = NewSession::new(SessionId::new(id), router, new_incarnation);
            if id % 2 == 0 {
                spec = spec.expires_at(start + Duration::from_secs(30));
            }
            let session = store.create(spec).await.unwrap();
            if id % 2 == 0 {
                monitor.track(&session).unwrap();
            }
            new.push(session);
        }
        tokio::time::sleep_until(start + Duration::from_secs(29)).await;
        for session in &new {
            assert!(
                !session.is_closed(),
                "{}'s new life closed by the old expiry",
                session.id()
            );
            let stored = store.get(session.id()).await.unwrap().unwrap();
            assert!(Session::ptr_eq(&stored, session));
        }
        for session in &old {
            assert_eq!(session.close_reason(), Some(CloseReason::RouterDeleted));
        }
        for session in new.iter().step_by(2) {
            assert_eq!(session.closed().await, CloseReason::Expired);
            assert!(Instant::now() >= start + Duration::from_secs(30));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.len(), 25, "the sessions without expiry stay");
        assert_eq!(monitor.stats().expired, 25);
        assert!(new.iter().skip(1).step_by(2).all(|s| !s.is_closed()));
    })
    .await;
}

/// Zero, past, far (beyond a turn of the wheel) and unrepresentable
/// expiries: no panic, zero and past close at once but never before the
/// expiry, a far one within a tick of it, with few timer fires.
#[tokio::test(start_paused = true)]
async fn zero_past_far_and_unrepresentable_expiries() {
    within(4 * HOUR, async {
        let (store, monitor, router, incarnation) =
            setup(1, |b| b.warn_before(Duration::from_secs(60))).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        let spec = |id| NewSession::new(SessionId::new(id), router, incarnation);

        // Duration::MAX cannot be represented: no expiry, not a panic.
        let never = store
            .create(spec(1).expires_in(Duration::MAX))
            .await
            .unwrap();
        assert_eq!(never.expires_at(), None);
        assert_eq!(monitor.track(&never), Err(TrackError::NoExpiry(never.id())));

        let zero = store
            .create(spec(2).expires_in(Duration::ZERO))
            .await
            .unwrap();
        let past = store
            .create(spec(3).expires_at(start - Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(
            past.expires_at(),
            Some(past.created_at()),
            "documented: reads as its creation"
        );
        let far_at = start + Duration::from_secs(3 * 3_600 + 7);
        let far = store.create(spec(4).expires_at(far_at)).await.unwrap();
        let logs: Vec<_> = (0..3).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
        for (session, log) in [&zero, &past, &far].into_iter().zip(&logs) {
            record_releases(session, log);
            monitor.track(session).unwrap();
        }
        assert_eq!(zero.closed().await, CloseReason::Expired);
        assert_eq!(past.closed().await, CloseReason::Expired);
        for log in &logs[..2] {
            let at = log.lock().unwrap().clone();
            assert_eq!(at.len(), 1);
            assert!(
                at[0] >= start && at[0] <= start + LATE,
                "{:?}",
                at[0] - start
            );
        }
        // An extension past the wheel's turn, well before the old expiry.
        tokio::time::sleep(Duration::from_secs(3_600)).await;
        let farther = far_at + Duration::from_secs(1_800);
        far.extend_expiry(farther).unwrap();
        assert_eq!(far.closed().await, CloseReason::Expired);
        let at = logs[2].lock().unwrap().clone();
        assert_eq!(at.len(), 1);
        assert!(
            at[0] >= farther && at[0] <= farther + LATE,
            "{:?}",
            at[0].checked_duration_since(farther)
        );
        let stats = monitor.stats();
        assert_eq!((stats.expired, stats.warned), (3, 1), "{stats:?}");
        // A few turns of the wheel (27 minutes each) and the warning: not
        // one fire per tick.
        assert!(stats.timer_fires < 30, "{stats:?}");
        // Extending to past the word's range: never expires.
        let huge = store
            .create(spec(5).expires_in(Duration::from_secs(60)))
            .await
            .unwrap();
        monitor.track(&huge).unwrap();
        huge.extend_expiry(Instant::now() + Duration::from_secs(200 * 365 * 86_400))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!huge.is_closed());
    })
    .await;
}

/// 100,000 sessions expiring in the same tick: every one closes within the
/// tick, once, leaves the store; the counters agree.
#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_sessions_expire_in_one_tick() {
    const SESSIONS: u64 = 100_000;
    within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let bus = EventBus::new(1 << 18);
        let mut events = bus.subscribe();
        let monitor = ExpiryMonitor::builder()
            .tick(TICK)
            .warn_before(Duration::from_secs(1))
            .events(bus)
            .build(Arc::clone(&store))
            .unwrap();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let start = Instant::now();
        let expiry = start + Duration::from_millis(5_030);
        let released = Arc::new(AtomicUsize::new(0));
        let latest = Arc::new(Mutex::new(start));
        let mut sessions = Vec::with_capacity(SESSIONS as usize);
        for id in 0..SESSIONS {
            let spec = NewSession::new(SessionId::new(id), router, incarnation).expires_at(expiry);
            let session = store.create(spec).await.unwrap();
            let (released, latest) = (Arc::clone(&released), Arc::clone(&latest));
            session
                .attach(move |_: CloseReason| {
                    released.fetch_add(1, Ordering::Relaxed);
                    let mut latest = latest.lock().unwrap();
                    *latest = (*latest).max(Instant::now());
                })
                .unwrap();
            monitor.track(&session).unwrap();
            sessions.push(session);
        }
        assert_eq!(monitor.stats().tracked, SESSIONS);
        for session in &sessions {
            assert_eq!(session.closed().await, CloseReason::Expired);
        }
        let closed_by = *latest.lock().unwrap();
        assert!(
            closed_by >= expiry && closed_by <= expiry + LATE,
            "{:?}",
            closed_by - expiry
        );
        tokio::time::sleep(TICK).await;
        assert_eq!(released.load(Ordering::Relaxed), SESSIONS as usize);
        assert!(store.is_empty());
        let stats = monitor.stats();
        assert_eq!(
            (stats.tracked, stats.expired, stats.warned),
            (0, SESSIONS, SESSIONS)
        );
        let mut warned = std::collections::HashSet::new();
        while let Some(event) = events.try_recv() {
            if let Event::SessionExpiringSoon { session, .. } = event {
                assert!(warned.insert(session), "{session} warned twice");
            }
        }
        assert_eq!(warned.len(), SESSIONS as usize);
    })
    .await;
}

/// Warnings: one per expiry, none for a session closed or marked first,
/// none for one already due, and none published after its close.
#[tokio::test(start_paused = true)]
async fn warnings_come_once_before_the_close_and_never_for_sessions_gone_first() {
    within(HOUR, async {
        let store = Arc::new(MemoryStore::new());
        let bus = EventBus::new(1 << 10);
        let mut events = bus.subscribe();
        let monitor = ExpiryMonitor::builder()
            .tick(TICK)
            .warn_before(Duration::from_secs(5))
            .events(bus)
            .build(Arc::clone(&store))
            .unwrap();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let start = Instant::now();
        let open = |id: u64, secs: u64| {
            let store = Arc::clone(&store);
            let monitor = monitor.clone();
            async move {
                let spec = NewSession::new(SessionId::new(id), router, incarnation)
                    .expires_at(start + Duration::from_secs(secs));
                let session = store.create(spec).await.unwrap();
                monitor.track(&session).unwrap();
                session
            }
        };
        let expiring = open(1, 20).await;
        let closed_first = open(2, 20).await;
        let marked_first = open(3, 20).await;
        let due = store
            .create(
                NewSession::new(SessionId::new(4), router, incarnation)
                    .expires_at(start - Duration::from_secs(1)),
            )
            .await
            .unwrap();
        monitor.track(&due).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(closed_first.close(CloseReason::ClientClosed).won());
        assert!(marked_first.begin_terminating().won());
        let warned: Arc<Mutex<Vec<(SessionId, Instant, bool)>>> = Arc::default();
        let watcher = {
            let (expiring, warned) = (expiring.clone(), Arc::clone(&warned));
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if let Event::SessionExpiringSoon { session, .. } = event {
                        let closed = expiring.is_closed();
                        warned
                            .lock()
                            .unwrap()
                            .push((session, Instant::now(), closed));
                    }
                }
            })
        };
        assert_eq!(expiring.closed().await, CloseReason::Expired);
        tokio::time::sleep(Duration::from_secs(30)).await;
        watcher.abort();
        let warned = warned.lock().unwrap().clone();
        assert_eq!(warned.len(), 1, "{warned:?}");
        let (session, at, after_close) = warned[0];
        assert_eq!(session, expiring.id());
        assert!(!after_close, "warned after the close");
        let lead = start + Duration::from_secs(15);
        assert!(
            at >= lead - TICK && at <= lead + LATE,
            "warned at {:?}",
            at - start
        );
        assert_eq!(marked_first.state(), SessionState::Terminating);
        assert_eq!(closed_first.close_reason(), Some(CloseReason::ClientClosed));
        assert_eq!(due.close_reason(), Some(CloseReason::Expired));
    })
    .await;
}

/// After shutdown: typed errors, no panic, nothing expires, stats say 0;
/// shutting down twice and from clones is fine; the sessions it tracked
/// stay open with their expiry and can still be extended.
#[tokio::test(start_paused = true)]
async fn operations_after_shutdown_are_typed_and_expire_nothing() {
    within(HOUR, async {
        let (store, monitor, router, incarnation) = setup(1, |b| b).await;
        let start = Instant::now();
        let mut pending = Vec::new();
        for id in 0..100 {
            let spec = NewSession::new(SessionId::new(id), router, incarnation)
                .expires_at(start + Duration::from_millis(100 * id));
            let session = store.create(spec).await.unwrap();
            monitor.track(&session).unwrap();
            pending.push(session);
        }
        tokio::time::sleep(Duration::from_millis(2_050)).await;
        let clone = monitor.clone();
        let (a, b) = tokio::join!(monitor.shutdown(), clone.shutdown());
        let ((), ()) = (a, b);
        let expired_then = monitor.stats().expired;
        assert_eq!(monitor.stats().tracked, 0);
        let closed_then: Vec<bool> = pending.iter().map(Session::is_closed).collect();
        assert_eq!(
            closed_then.iter().filter(|c| **c).count() as u64,
            expired_then,
            "closes decided before the shutdown finish first"
        );
        let late = NewSession::new(SessionId::new(1_000), router, incarnation)
            .expires_in(Duration::ZERO)
            .into_session();
        assert_eq!(monitor.track(&late), Err(TrackError::ShutDown));
        assert_eq!(clone.track(&pending[99]), Err(TrackError::ShutDown));
        tokio::time::sleep(Duration::from_secs(30)).await;
        for (session, was) in pending.iter().zip(&closed_then) {
            assert_eq!(
                session.is_closed(),
                *was,
                "{} changed after shutdown",
                session.id()
            );
            if !was {
                assert!(session.expires_at().is_some(), "keeps its expiry");
                assert_eq!(
                    session.extend_expiry(Instant::now() + Duration::from_secs(1)),
                    Ok(())
                );
            }
        }
        assert_eq!(monitor.stats().expired, expired_then);
        monitor.shutdown().await;
        let _ = format!("{monitor:?}");
    })
    .await;
}

/// `shutdown` says "no session is tracked ... from now on (the sessions it
/// tracked keep their expiry and stay open)", and `AlreadyTracked` means "a
/// monitor (this one or another) tracks it already". A controller that
/// replaces a shut-down monitor must be able to hand it its sessions.
#[tokio::test(start_paused = true)]
async fn a_replacement_monitor_can_track_the_sessions_of_a_shut_down_one() {
    within(HOUR, async {
        let (store, first, router, incarnation) = setup(1, |b| b).await;
        let start = Instant::now();
        let spec = NewSession::new(SessionId::new(1), router, incarnation)
            .expires_at(start + Duration::from_secs(10));
        let session = store.create(spec).await.unwrap();
        first.track(&session).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        first.shutdown().await;
        assert_eq!(first.stats().tracked, 0, "the first monitor tracks nothing");

        let second = ExpiryMonitor::builder()
            .tick(TICK)
            .build(Arc::clone(&store))
            .unwrap();
        assert_eq!(
            second.track(&session),
            Ok(()),
            "no monitor tracks the session, yet it cannot be tracked again: it never expires"
        );
        assert_eq!(session.closed().await, CloseReason::Expired);
    })
    .await;
}

/// A payload whose `Drop` calls back into the monitor and the store.
struct Reentrant {
    on_drop: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Drop for Reentrant {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

/// User code run by expiry closes and by the monitor letting handles go
/// (payload `Drop`, `Resource::release`) calls back into the monitor and
/// the store, including `shutdown`: no deadlock (I8). Its own thread, with
/// a real-time watchdog.
#[test]
fn reentrant_user_code_from_expiry_closes_and_sweeps_does_not_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        session_lifecycle::test_util::run_paused(within(HOUR, async {
            let store: Arc<MemoryStore<Reentrant>> = Arc::new(MemoryStore::default());
            let monitor = ExpiryMonitor::builder()
                .tick(TICK)
                .build(Arc::clone(&store))
                .unwrap();
            let router = RouterId::new(1);
            let incarnation = store.register_router(router).await.unwrap();
            let start = Instant::now();
            let callbacks = Arc::new(AtomicUsize::new(0));
            let next_id = Arc::new(AtomicU64::new(1_000));
            let callback: Arc<dyn Fn() + Send + Sync> = {
                let (store, monitor) = (Arc::clone(&store), monitor.clone());
                let (callbacks, next_id) = (Arc::clone(&callbacks), Arc::clone(&next_id));
                Arc::new(move || {
                    let _ = monitor.stats();
                    let _ = store.get(SessionId::new(1)).now_or_never();
                    let _ = store.len();
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    let spec = NewSession::new(SessionId::new(id), router, incarnation)
                        .payload(Reentrant { on_drop: None })
                        .expires_in(Duration::from_secs(1));
                    if let Some(Ok(session)) = store.create(spec).now_or_never() {
                        let _ = monitor.track(&session);
                        let _ = store
                            .close(session.id(), CloseReason::ClientClosed)
                            .now_or_never();
                    }
                    callbacks.fetch_add(1, Ordering::SeqCst);
                })
            };
            let mut sessions = Vec::new();
            for id in 0..20 {
                let spec = NewSession::new(SessionId::new(id), router, incarnation)
                    .payload(Reentrant {
                        on_drop: Some(Arc::clone(&callback)),
                    })
                    .expires_at(start + Duration::from_secs(if id < 10 { 2 } else { 3_600 }));
                let session = store.create(spec).await.unwrap();
                let (store2, monitor2) = (Arc::clone(&store), monitor.clone());
                let cb = Arc::clone(&callback);
                session
                    .attach(move |_: CloseReason| {
                        let _ = store2.get(SessionId::new(id)).now_or_never();
                        let _ = monitor2.stats();
                        cb();
                    })
                    .unwrap();
                monitor.track(&session).unwrap();
                sessions.push(session);
            }
            // Closed otherwise: let go by the sweep, in the monitor task.
            for session in &sessions[10..] {
                let outcome = store
                    .close(session.id(), CloseReason::ClientClosed)
                    .await
                    .unwrap();
                assert!(outcome.won());
            }
            let expiring: Vec<_> = sessions.drain(..10).collect();
            drop(sessions);
            for session in &expiring {
                assert_eq!(session.closed().await, CloseReason::Expired);
            }
            drop(expiring);
            tokio::time::sleep(Duration::from_secs(2 * 60)).await;
            // A release that shuts the monitor down from inside a close.
            let spec = NewSession::new(SessionId::new(99), router, incarnation)
                .payload(Reentrant { on_drop: None })
                .expires_in(Duration::from_secs(1));
            let last = store.create(spec).await.unwrap();
            let shut = Arc::new(AtomicBool::new(false));
            {
                let (monitor, shut) = (monitor.clone(), Arc::clone(&shut));
                last.attach(move |_: CloseReason| {
                    let _ = monitor.shutdown().now_or_never();
                    shut.store(true, Ordering::SeqCst);
                })
                .unwrap();
            }
            monitor.track(&last).unwrap();
            assert_eq!(last.closed().await, CloseReason::Expired);
            monitor.shutdown().await;
            assert!(shut.load(Ordering::SeqCst));
            // 10 releases + 10 payload drops of expired ones + 10 releases
            // and 10 payload drops of those closed otherwise.
            assert!(
                callbacks.load(Ordering::SeqCst) >= 40,
                "callbacks: {}",
                callbacks.load(Ordering::SeqCst)
            );
        }));
        let _ = done.send(());
    });
    match finished.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(()) => runner.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("deadlock: user code calling back from an expiry close never returned")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// Stats under concurrent tracking on worker threads (real time, 1 ms
/// ticks, sessions already due or closed): `tracked` never exceeds what was
/// tracked (an underflow would read near `u64::MAX`), and every session
/// not closed by its tracker expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracked_never_exceeds_what_was_tracked_under_concurrent_tracking() {
    const PER_THREAD: u64 = 20_000;
    const THREADS: u64 = 3;
    tokio::time::timeout(Duration::from_secs(30), async {
        let store = Arc::new(MemoryStore::new());
        let monitor = ExpiryMonitor::builder()
            .tick(Duration::from_millis(1))
            .build(Arc::clone(&store))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(AtomicU64::new(0));
        let poller = {
            let (monitor, stop, worst) = (monitor.clone(), Arc::clone(&stop), Arc::clone(&worst));
            tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    worst.fetch_max(monitor.stats().tracked, Ordering::Relaxed);
                }
            })
        };
        let mut trackers = Vec::new();
        for thread in 0..THREADS {
            let monitor = monitor.clone();
            trackers.push(tokio::task::spawn_blocking(move || {
                let mut expiring = Vec::new();
                for i in 0..PER_THREAD {
                    let id = thread * PER_THREAD + i;
                    let session =
                        NewSession::new(SessionId::new(id), RouterId::new(1), Incarnation::new(1))
                            .expires_in(Duration::ZERO)
                            .into_session();
                    monitor.track(&session).unwrap();
                    if i % 2 == 0 {
                        let _ = session.close(CloseReason::ClientClosed);
                    } else {
                        expiring.push(session);
                    }
                }
                expiring
            }));
        }
        let mut expiring = Vec::new();
        for tracker in trackers {
            expiring.extend(tracker.await.unwrap());
        }
        // The sessions not closed here are due at once: the monitor closes
        // each (awaited, no polling).
        for session in &expiring {
            assert_eq!(session.closed().await, CloseReason::Expired);
        }
        // `expired` counts once the close tasks are done: shutdown waits.
        monitor.shutdown().await;
        stop.store(true, Ordering::Relaxed);
        poller.await.unwrap();
        let worst = worst.load(Ordering::Relaxed);
        assert!(
            worst <= THREADS * PER_THREAD,
            "stats().tracked read {worst}, more than the {} sessions ever tracked",
            THREADS * PER_THREAD
        );
        // A session closed by its tracker may have expired first.
        let expired = monitor.stats().expired;
        assert!(
            (THREADS * PER_THREAD / 2..=THREADS * PER_THREAD).contains(&expired),
            "{expired}"
        );
    })
    .await
    .expect("not finished within 30 s");
}

/// Extensions cost the monitor nothing until the old expiry comes up: a
/// hundred thousand of them on one session (and as many refused
/// shortenings) add no timer fires beyond the re-files at the expiries
/// that came up.
#[tokio::test(start_paused = true)]
async fn a_flood_of_extensions_costs_the_monitor_only_the_expiries_that_came_up() {
    within(HOUR, async {
        let (store, monitor, router, incarnation) =
            setup(1, |b| b.warn_before(Duration::ZERO)).await;
        let start = Instant::now();
        let spec = NewSession::new(SessionId::new(1), router, incarnation)
            .expires_at(start + Duration::from_secs(1));
        let session = store.create(spec).await.unwrap();
        monitor.track(&session).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..100_000u64 {
            session
                .extend_expiry(start + Duration::from_secs(1) + Duration::from_micros(i * 50))
                .unwrap();
            session.extend_expiry(start).unwrap(); // earlier: changes nothing
        }
        let last = start + Duration::from_secs(1) + Duration::from_micros(99_999 * 50);
        assert_eq!(session.expires_at(), Some(last));
        assert_eq!(session.closed().await, CloseReason::Expired);
        assert!(Instant::now() >= last && Instant::now() <= last + LATE);
        let stats = monitor.stats();
        // Filed at 1 s, re-filed once at the last expiry: a couple of fires.
        assert!(stats.timer_fires <= 3, "{stats:?}");
        assert_eq!((stats.expired, stats.tracked), (1, 0));
    })
    .await;
}

/// Many threads race to track the same sessions on two monitors: exactly
/// one `Ok` per session, every other call `AlreadyTracked`; each session
/// closes once, and the two monitors' counters add up to the sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_tracks_on_two_monitors_track_each_session_exactly_once() {
    const SESSIONS: u64 = 2_000;
    tokio::time::timeout(Duration::from_secs(30), async {
        let store = Arc::new(MemoryStore::new());
        let monitors: Vec<_> = (0..2)
            .map(|_| {
                ExpiryMonitor::builder()
                    .tick(Duration::from_millis(1))
                    .build(Arc::clone(&store))
                    .unwrap()
            })
            .collect();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let mut sessions = Vec::new();
        let released = Arc::new(AtomicUsize::new(0));
        for id in 0..SESSIONS {
            let spec = NewSession::new(SessionId::new(id), router, incarnation)
                .expires_in(Duration::from_millis(20 + id % 30));
            let session = store.create(spec).await.unwrap();
            let released = Arc::clone(&released);
            session
                .attach(move |_: CloseReason| {
                    released.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            sessions.push(session);
        }
        let oks = Arc::new(AtomicUsize::new(0));
        let mut racers = Vec::new();
        for racer in 0..6usize {
            let (sessions, oks) = (sessions.clone(), Arc::clone(&oks));
            let monitor = monitors[racer % 2].clone();
            racers.push(tokio::task::spawn_blocking(move || {
                for session in &sessions {
                    match monitor.track(session) {
                        Ok(()) => {
                            oks.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(TrackError::AlreadyTracked(id)) => assert_eq!(id, session.id()),
                        // Tracked by another racer and expired already (a
                        // descheduled racer came after its 20-49 ms).
                        Err(TrackError::Closed(id)) => {
                            assert_eq!(id, session.id());
                            assert!(session.is_closed());
                        }
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
        for racer in racers {
            racer.await.unwrap();
        }
        assert_eq!(oks.load(Ordering::SeqCst), SESSIONS as usize);
        for session in &sessions {
            assert_eq!(session.closed().await, CloseReason::Expired);
        }
        for monitor in &monitors {
            monitor.shutdown().await;
        }
        let expired: u64 = monitors.iter().map(|m| m.stats().expired).sum();
        assert_eq!(expired, SESSIONS);
        assert_eq!(released.load(Ordering::SeqCst), SESSIONS as usize);
        assert!(store.is_empty());
    })
    .await
    .expect("not finished within 30 s");
}
