//! Session expiry (issue #21, item 3): the `ExpiryMonitor` closes a
//! tracked session with `CloseReason::Expired` within one tick of its
//! expiry, through the common close path, after one `SessionExpiringSoon`
//! warning; extensions postpone it; one task and one wheel for all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use session_lifecycle::expiry::{ExpiryError, ExpiryMonitorBuilder, TrackError};
use session_lifecycle::lifecycle::Piece;
use session_lifecycle::{
    CloseReason, Event, EventBus, ExpiryMonitor, Incarnation, Lifecycle, MemoryStore, NewSession,
    NotifyError, ReclaimQueue, RouterId, Session, SessionId, SessionState, SessionStore,
    TerminationBatch, TerminationNotifier,
};
use tokio::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(100);

struct Fixture {
    store: Arc<MemoryStore>,
    router: RouterId,
    incarnation: Incarnation,
    events: session_lifecycle::events::Subscription,
    monitor: ExpiryMonitor<MemoryStore>,
    /// Every release: the session and when it ran.
    released: Arc<Mutex<Vec<(SessionId, Instant)>>>,
}

async fn fixture(builder: ExpiryMonitorBuilder) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::new(1 << 16);
    let events = bus.subscribe();
    let monitor = builder
        .tick(TICK)
        .events(bus)
        .build(Arc::clone(&store))
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    Fixture {
        store,
        router,
        incarnation,
        events,
        monitor,
        released: Arc::default(),
    }
}

impl Fixture {
    /// Creates session `id` expiring at `at` (or never), with a resource
    /// that records its release, and tracks it if it has an expiry.
    async fn open(&self, id: u64, at: Option<Instant>) -> Session {
        let mut spec = NewSession::new(SessionId::new(id), self.router, self.incarnation);
        if let Some(at) = at {
            spec = spec.expires_at(at);
        }
        let session = self.store.create(spec).await.unwrap();
        let released = Arc::clone(&self.released);
        let sid = session.id();
        session
            .attach(move |_: CloseReason| released.lock().unwrap().push((sid, Instant::now())))
            .unwrap();
        if at.is_some() {
            self.monitor.track(&session).unwrap();
        }
        session
    }

    fn releases_of(&self, id: SessionId) -> Vec<Instant> {
        let released = self.released.lock().unwrap();
        released
            .iter()
            .filter(|(s, _)| *s == id)
            .map(|(_, at)| *at)
            .collect()
    }

    /// The `SessionExpiringSoon` warnings received so far, with when.
    fn warnings(&mut self) -> Vec<(SessionId, Instant)> {
        let mut seen = Vec::new();
        while let Some(event) = self.events.try_recv() {
            if let Event::SessionExpiringSoon {
                session,
                expires_at,
                ..
            } = event
            {
                seen.push((session, expires_at));
            }
        }
        seen
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_expires_at_its_deadline_within_one_tick() {
    let f = fixture(ExpiryMonitor::builder()).await;
    let start = Instant::now();
    // Off the tick grid on purpose: it closes at the next tick, not before.
    let deadline = start + Duration::from_millis(10_050);
    let session = f.open(1, Some(deadline)).await;
    assert_eq!(session.expires_at(), Some(deadline));

    assert_eq!(session.closed().await, CloseReason::Expired);
    let released = f.releases_of(session.id());
    assert_eq!(released.len(), 1, "released exactly once");
    assert!(
        released[0] >= deadline && released[0] <= deadline + TICK,
        "closed {:?} after the start, expiry at {:?}",
        released[0] - start,
        deadline - start
    );
    assert!(
        f.store.get(session.id()).await.unwrap().is_none(),
        "removed"
    );
    let stats = f.monitor.stats();
    assert_eq!((stats.expired, stats.tracked), (1, 0));
    // Later ticks release nothing more.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(f.releases_of(session.id()).len(), 1);
    assert_eq!(
        session.extend_expiry(start + Duration::from_secs(99)),
        Err(ExpiryError::Expired(session.id()))
    );
}

#[tokio::test(start_paused = true)]
async fn expiring_soon_is_published_once_warn_before_ahead() {
    let warn = Duration::from_secs(3);
    let mut f = fixture(ExpiryMonitor::builder().warn_before(warn)).await;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(10);
    let session = f.open(1, Some(deadline)).await;

    let Some(Event::SessionExpiringSoon {
        session: id,
        router,
        incarnation,
        expires_at,
    }) = f.events.recv().await
    else {
        panic!("expected the warning first");
    };
    assert_eq!(Instant::now(), deadline - warn, "warned warn_before ahead");
    assert_eq!(
        (id, router, incarnation),
        (session.id(), f.router, f.incarnation)
    );
    assert_eq!(expires_at, deadline);
    assert!(!session.is_closed());
    assert_eq!(session.closed().await, CloseReason::Expired);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(f.warnings().is_empty(), "one warning per expiry");
    assert_eq!(f.monitor.stats().warned, 1);
}

/// A lead longer than the wheel's turn (16,384 ticks): the entry comes up
/// several times inside the warning window, and warns once.
#[tokio::test(start_paused = true)]
async fn a_warning_lead_longer_than_the_wheel_warns_once() {
    let store = Arc::new(MemoryStore::new());
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let monitor = ExpiryMonitor::builder()
        .tick(Duration::from_millis(1))
        .warn_before(Duration::from_secs(30))
        .events(bus)
        .build(Arc::clone(&store))
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let at = Instant::now() + Duration::from_secs(40);
    let spec = NewSession::new(SessionId::new(1), router, incarnation).expires_at(at);
    let session = store.create(spec).await.unwrap();
    monitor.track(&session).unwrap();
    assert_eq!(session.closed().await, CloseReason::Expired);
    let mut warnings = 0;
    while let Some(event) = events.try_recv() {
        warnings += usize::from(matches!(event, Event::SessionExpiringSoon { .. }));
    }
    assert_eq!(warnings, 1);
    assert!(
        monitor.stats().timer_fires >= 3,
        "re-filed inside the window"
    );
}

#[tokio::test(start_paused = true)]
async fn a_session_tracked_inside_its_warning_lead_is_warned_at_once_and_a_due_one_not_at_all() {
    let mut f = fixture(ExpiryMonitor::builder().warn_before(Duration::from_secs(60))).await;
    let start = Instant::now();
    let soon = f.open(1, Some(start + Duration::from_secs(5))).await;
    let due = f.open(2, Some(start - Duration::from_secs(1))).await;
    tokio::time::sleep(TICK).await;
    assert_eq!(f.warnings(), [(soon.id(), start + Duration::from_secs(5))]);
    assert_eq!(due.closed().await, CloseReason::Expired);
    assert!(
        Instant::now() <= start + TICK,
        "a due session closes at the next tick"
    );
    assert_eq!(soon.closed().await, CloseReason::Expired);
    assert!(f.warnings().is_empty());
}

#[tokio::test(start_paused = true)]
async fn extending_before_the_deadline_postpones_the_close_and_rearms_the_warning() {
    let warn = Duration::from_secs(2);
    let mut f = fixture(ExpiryMonitor::builder().warn_before(warn)).await;
    let start = Instant::now();
    let first = start + Duration::from_secs(10);
    let session = f.open(1, Some(first)).await;

    tokio::time::sleep_until(first - warn + TICK).await;
    assert_eq!(f.warnings(), [(session.id(), first)]);
    // Refreshed after the warning: ten more seconds.
    let second = start + Duration::from_secs(20);
    assert_eq!(session.extend_expiry(second), Ok(()));
    // An earlier expiry changes nothing: extensions never shorten.
    assert_eq!(
        session.extend_expiry(start + Duration::from_secs(12)),
        Ok(())
    );
    assert_eq!(session.expires_at(), Some(second));

    tokio::time::sleep_until(first + Duration::from_secs(1)).await;
    assert!(!session.is_closed(), "postponed");
    assert!(f.warnings().is_empty(), "no warning for the old expiry");
    tokio::time::sleep_until(second - warn + TICK).await;
    assert_eq!(
        f.warnings(),
        [(session.id(), second)],
        "re-armed for the new expiry"
    );
    assert_eq!(session.closed().await, CloseReason::Expired);
    let released = f.releases_of(session.id());
    assert_eq!(released.len(), 1);
    assert!(released[0] >= second && released[0] <= second + TICK);
    assert_eq!(f.monitor.stats().warned, 2);
}

#[tokio::test(start_paused = true)]
async fn a_cleared_expiry_never_fires() {
    let mut f = fixture(ExpiryMonitor::builder().warn_before(Duration::from_secs(1))).await;
    let start = Instant::now();
    let session = f.open(1, Some(start + Duration::from_secs(5))).await;
    assert_eq!(session.clear_expiry(), Ok(()));
    assert_eq!(session.expires_at(), None);
    // Nothing brings an expiry back.
    assert_eq!(
        session.extend_expiry(start + Duration::from_secs(6)),
        Ok(())
    );
    assert_eq!(session.expires_at(), None);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!session.is_closed());
    assert!(f.warnings().is_empty());
    assert_eq!(f.monitor.stats().tracked, 0, "it left the wheel");
}

#[tokio::test(start_paused = true)]
async fn a_session_closed_otherwise_is_not_touched() {
    let mut f = fixture(ExpiryMonitor::builder().warn_before(Duration::from_secs(1))).await;
    let start = Instant::now();
    let closed = f.open(1, Some(start + Duration::from_secs(5))).await;
    let marked = f.open(2, Some(start + Duration::from_secs(5))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        f.store
            .close(closed.id(), CloseReason::ClientClosed)
            .await
            .unwrap()
            .won()
    );
    // Its router's deletion marked it: the deletion owns its close.
    assert!(marked.begin_terminating().won());
    assert_eq!(
        closed.extend_expiry(start + Duration::from_secs(9)),
        Err(ExpiryError::Closed(closed.id()))
    );

    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(closed.close_reason(), Some(CloseReason::ClientClosed));
    assert_eq!(f.releases_of(closed.id()).len(), 1);
    assert_eq!(
        marked.state(),
        SessionState::Terminating,
        "left to its deletion"
    );
    assert!(f.releases_of(marked.id()).is_empty());
    assert!(f.warnings().is_empty(), "no warning for either");
    let stats = f.monitor.stats();
    assert_eq!((stats.expired, stats.tracked), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_new_session_reusing_the_id_is_not_closed_by_the_old_expiry() {
    let f = fixture(ExpiryMonitor::builder()).await;
    let start = Instant::now();
    let old = f.open(7, Some(start + Duration::from_secs(5))).await;
    // A client's close through the store also removes it.
    assert!(
        f.store
            .close(old.id(), CloseReason::ClientClosed)
            .await
            .unwrap()
            .won()
    );
    assert!(f.store.get(old.id()).await.unwrap().is_none());
    // The id comes back with a later expiry, and once without any.
    let new = f.open(7, Some(start + Duration::from_secs(50))).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!new.is_closed(), "the old expiry closed the new session");
    assert!(
        f.store
            .get(new.id())
            .await
            .unwrap()
            .is_some_and(|s| Session::ptr_eq(&s, &new))
    );
    assert_eq!(new.closed().await, CloseReason::Expired);
    assert!(Instant::now() >= start + Duration::from_secs(50));

    // Expired while a new session takes its id: the removal is by key.
    let doomed = f.open(8, Some(start + Duration::from_secs(60))).await;
    let survivor = NewSession::new(SessionId::new(8), f.router, f.incarnation);
    tokio::time::sleep_until(start + Duration::from_secs(59)).await;
    assert!(doomed.close(CloseReason::ClientClosed).won()); // left in the store
    f.store.remove_exact(doomed.key()).await.unwrap();
    let survivor = f.store.create(survivor).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!survivor.is_closed());
    assert!(f.store.get(SessionId::new(8)).await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_spread_expiries_expire_on_time_on_one_task() {
    const SESSIONS: u64 = 10_000;
    let f = fixture(ExpiryMonitor::builder().warn_before(Duration::from_secs(5))).await;
    let start = Instant::now();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut sessions = Vec::new();
    for id in 0..SESSIONS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Anywhere in the next 100 s, to the millisecond.
        let at = start + Duration::from_millis(1 + seed % 100_000);
        sessions.push((f.open(id, Some(at)).await, at));
    }
    let mut most_tasks = 0;
    for _ in 0..204 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        most_tasks = most_tasks.max(alive);
    }
    // The monitor's task, plus one close task in a tick with expiries.
    assert!(
        most_tasks <= tasks_before + 1,
        "{most_tasks} tasks alive with {tasks_before} before: a task per session?"
    );
    for (session, at) in &sessions {
        assert_eq!(session.close_reason(), Some(CloseReason::Expired));
        let released = f.releases_of(session.id());
        assert_eq!(
            released.len(),
            1,
            "{} released {} times",
            session.id(),
            released.len()
        );
        assert!(
            released[0] >= *at && released[0] <= *at + TICK,
            "{} expired {:?} after its expiry",
            session.id(),
            released[0].saturating_duration_since(*at)
        );
    }
    assert!(f.store.is_empty());
    let stats = f.monitor.stats();
    assert_eq!(
        (stats.expired, stats.warned, stats.tracked),
        (SESSIONS, SESSIONS, 0)
    );
    // Lazy re-arm: an entry comes up at its warning and at its expiry, and
    // a far one once per turn of the wheel on its way; never per tick.
    assert!(
        stats.timer_fires <= 3 * SESSIONS,
        "{} timer fires",
        stats.timer_fires
    );
}

#[tokio::test(start_paused = true)]
async fn resources_go_through_the_reclaim_queue_once() {
    let queue = ReclaimQueue::builder().build().unwrap();
    let f = fixture(ExpiryMonitor::builder().reclaim_queue(queue.clone())).await;
    let start = Instant::now();
    let session = f.open(1, Some(start + Duration::from_secs(1))).await;
    assert_eq!(session.closed().await, CloseReason::Expired);
    assert_eq!(f.releases_of(session.id()).len(), 1);
    assert_eq!(queue.stats().completed, 1, "released by the queue");
    assert!(f.store.get(session.id()).await.unwrap().is_none());
}

/// Extensions race the monitor on two worker threads (real time, 1 ms
/// ticks): an `Ok` extension is honoured (the session does not close
/// before it), an `Expired` answer means the session closes as expired,
/// and nothing is released twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_racing_the_expiry_are_decided_once() {
    const SESSIONS: u64 = 400;
    let store = Arc::new(MemoryStore::new());
    let monitor = ExpiryMonitor::builder()
        .tick(Duration::from_millis(1))
        .build(Arc::clone(&store))
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let released: Arc<Mutex<Vec<(SessionId, Instant)>>> = Arc::default();
    let start = Instant::now();
    let mut sessions = Vec::new();
    for id in 0..SESSIONS {
        let at = start + Duration::from_millis(2 + id % 20);
        let spec = NewSession::new(SessionId::new(id), router, incarnation).expires_at(at);
        let session = store.create(spec).await.unwrap();
        let released = Arc::clone(&released);
        session
            .attach(move |_: CloseReason| {
                released
                    .lock()
                    .unwrap()
                    .push((SessionId::new(id), Instant::now()))
            })
            .unwrap();
        monitor.track(&session).unwrap();
        sessions.push(session);
    }
    let extender = {
        let sessions = sessions.clone();
        tokio::task::spawn_blocking(move || {
            // Per session: the last expiry an extension was granted, and
            // whether one was refused as too late.
            let mut granted = vec![None; sessions.len()];
            let mut refused = vec![false; sessions.len()];
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            let (least, most) = (
                Instant::now() + Duration::from_millis(50),
                Instant::now() + Duration::from_secs(5),
            );
            // Until some extensions came too late (and the race was run).
            while Instant::now() < least || (!refused.contains(&true) && Instant::now() < most) {
                for (i, session) in sessions.iter().enumerate() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Each round extends about one session in eight.
                    if refused[i] || !seed.is_multiple_of(8) {
                        continue;
                    }
                    // Just ahead of the monitor's next ticks, or just behind.
                    let at = Instant::now() + Duration::from_micros(seed % 2_000);
                    match session.extend_expiry(at) {
                        Ok(()) => granted[i] = Some(at),
                        Err(ExpiryError::Expired(_)) => refused[i] = true,
                        Err(error) => panic!("unexpected {error}"),
                    }
                }
            }
            (granted, refused)
        })
    };
    let (granted, refused) = extender.await.unwrap();
    for (i, session) in sessions.iter().enumerate() {
        assert_eq!(session.closed().await, CloseReason::Expired);
        let releases: Vec<Instant> = released
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| *s == session.id())
            .map(|(_, at)| *at)
            .collect();
        assert_eq!(
            releases.len(),
            1,
            "{} released {} times",
            session.id(),
            releases.len()
        );
        if let Some(granted) = granted[i] {
            assert!(
                releases[0] >= granted,
                "{} closed {:?} before the expiry it was granted",
                session.id(),
                granted - releases[0]
            );
        }
        if refused[i] {
            assert_eq!(
                session.extend_expiry(Instant::now() + Duration::from_secs(1)),
                Err(ExpiryError::Expired(session.id()))
            );
        }
    }
    assert!(
        refused.iter().any(|&r| r),
        "no extension came too late: no race was run"
    );
    // Waits for the close tasks: they count and remove after the release.
    monitor.shutdown().await;
    assert_eq!(monitor.stats().expired, SESSIONS);
    assert!(store.is_empty());
}

/// A release that calls back into the store and the monitor (it opens and
/// tracks a replacement session) runs outside every lock: no deadlock.
#[test]
fn a_release_that_calls_back_into_the_store_and_the_monitor_does_not_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let f = fixture(ExpiryMonitor::builder()).await;
            let start = Instant::now();
            let session = f.open(1, Some(start + Duration::from_secs(1))).await;
            let (store, monitor) = (Arc::clone(&f.store), f.monitor.clone());
            let (router, incarnation) = (f.router, f.incarnation);
            let reopened = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&reopened);
            session
                .attach(move |_: CloseReason| {
                    let _ = store.get(SessionId::new(1)).now_or_never();
                    let spec = NewSession::new(SessionId::new(2), router, incarnation)
                        .expires_at(start + Duration::from_secs(2));
                    let replacement = store.create(spec).now_or_never().unwrap().unwrap();
                    monitor.track(&replacement).unwrap();
                    let _ = monitor.stats();
                    counter.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            assert_eq!(session.closed().await, CloseReason::Expired);
            assert_eq!(reopened.load(Ordering::SeqCst), 1);
            let replacement = f.store.get(SessionId::new(2)).await.unwrap().unwrap();
            assert_eq!(replacement.closed().await, CloseReason::Expired);
        });
        let _ = done.send(());
    });
    match finished.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(()) => runner.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("deadlock: a release that called back into the store or monitor never returned")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn track_refuses_what_it_cannot_expire() {
    let f = fixture(ExpiryMonitor::builder()).await;
    let start = Instant::now();
    let forever = f.open(1, None).await;
    assert_eq!(
        f.monitor.track(&forever),
        Err(TrackError::NoExpiry(forever.id()))
    );
    let tracked = f.open(2, Some(start + Duration::from_secs(5))).await;
    assert_eq!(
        f.monitor.track(&tracked),
        Err(TrackError::AlreadyTracked(tracked.id()))
    );
    // One monitor per session: another refuses it too.
    let other = ExpiryMonitor::builder()
        .build(Arc::clone(&f.store))
        .unwrap();
    assert_eq!(
        other.track(&tracked),
        Err(TrackError::AlreadyTracked(tracked.id()))
    );
    let closed = NewSession::new(SessionId::new(3), f.router, f.incarnation)
        .expires_at(start + Duration::from_secs(5))
        .into_session();
    let _ = closed.close(CloseReason::ClientClosed);
    assert_eq!(
        f.monitor.track(&closed),
        Err(TrackError::Closed(closed.id()))
    );

    f.monitor.shutdown().await;
    let late = NewSession::new(SessionId::new(4), f.router, f.incarnation)
        .expires_at(start)
        .into_session();
    assert_eq!(f.monitor.track(&late), Err(TrackError::ShutDown));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!tracked.is_closed(), "nothing expires after shutdown");
}

#[tokio::test]
async fn the_tick_is_checked_by_build() {
    let store = Arc::new(MemoryStore::new());
    for tick in [
        Duration::ZERO,
        Duration::from_micros(999),
        Duration::from_secs(61),
    ] {
        let refused = ExpiryMonitor::builder()
            .tick(tick)
            .build(Arc::clone(&store));
        assert_eq!(
            refused.unwrap_err().refused_setting(),
            Some("tick"),
            "{tick:?}"
        );
    }
    for tick in [Duration::from_millis(1), Duration::from_secs(60)] {
        assert!(
            ExpiryMonitor::builder()
                .tick(tick)
                .build(Arc::clone(&store))
                .is_ok()
        );
    }
}

struct Wire;

impl TerminationNotifier for Wire {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn lifecycle_create_tracks_sessions_with_an_expiry_and_shuts_the_monitor_down() {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Wire)
        .expiry(
            ExpiryMonitor::builder()
                .tick(TICK)
                .warn_before(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    let mut events = lifecycle.subscribe();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let start = Instant::now();
    let spec = |id| NewSession::new(SessionId::new(id), router, incarnation);
    let expiring = lifecycle
        .create(spec(1).expires_at(start + Duration::from_secs(5)))
        .await
        .unwrap();
    let forever = lifecycle.create(spec(2)).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    expiring
        .attach(move |_: CloseReason| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    assert_eq!(lifecycle.expiry().stats().tracked, 1);

    assert_eq!(expiring.closed().await, CloseReason::Expired);
    assert_eq!(released.load(Ordering::SeqCst), 1);
    assert!(
        lifecycle.reclaim().stats().completed >= 1,
        "released through the one queue"
    );
    let mut warned = 0;
    while let Some(event) = events.try_recv() {
        if let Event::SessionExpiringSoon { session, .. } = event {
            assert_eq!(session, expiring.id());
            warned += 1;
        }
    }
    assert_eq!(warned, 1, "warned on the lifecycle's bus");
    let stats = lifecycle.stats().await.unwrap();
    assert_eq!(
        stats.expiry.map(|e| (e.expired, e.warned, e.tracked)),
        Some((1, 1, 0))
    );
    assert!(!forever.is_closed());

    let late = lifecycle
        .create(spec(3).expires_at(start + Duration::from_secs(10)))
        .await
        .unwrap();
    let report = lifecycle.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert!(!report.still_running.contains(&Piece::Expiry));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!late.is_closed(), "nothing expires after shutdown");

    let refused = Lifecycle::builder(Arc::clone(&store), Wire)
        .expiry(ExpiryMonitor::builder().events(EventBus::default()))
        .build();
    assert_eq!(refused.unwrap_err().refused_setting(), Some("expiry"));
}

#[test]
fn expired_is_a_forced_close_with_its_own_label() {
    assert!(CloseReason::Expired.is_forced());
    assert_eq!(CloseReason::Expired.as_str(), "expired");
    assert_eq!(CloseReason::Expired.to_string(), "expired");
    let session =
        NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1)).into_session();
    assert!(session.close(CloseReason::Expired).won());
    assert_eq!(session.close_reason(), Some(CloseReason::Expired));
}

/// A payload that counts its drops and says when the last expected one
/// came.
struct Dropped {
    left: Arc<AtomicUsize>,
    all: Arc<tokio::sync::Notify>,
}

impl Drop for Dropped {
    fn drop(&mut self) {
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.all.notify_one();
        }
    }
}

/// A deleted router's sessions had hour-long expiries: the monitor lets
/// their handles go (and so their payloads) within a minute and a tick of
/// the deletion, not when the wheel comes round to them 27 minutes later;
/// it keeps the sessions still to expire, and they expire on time.
#[tokio::test(start_paused = true)]
async fn a_deleted_routers_sessions_are_let_go_within_a_minute_not_at_their_expiry() {
    let store = Arc::new(MemoryStore::<Dropped>::default());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Wire)
        .deleter(
            session_lifecycle::RouterDeleter::builder()
                .confirm_timeout(Duration::from_millis(100))
                .retries(0),
        )
        .expiry(ExpiryMonitor::builder().tick(TICK))
        .build()
        .unwrap();
    let (deleted, kept) = (RouterId::new(1), RouterId::new(2));
    // Counted down by the deleted router's payloads only.
    let left = Arc::new(AtomicUsize::new(200));
    let all = Arc::new(tokio::sync::Notify::new());
    let kept_left = Arc::new(AtomicUsize::new(200));
    let start = Instant::now();
    let mut survivors = Vec::new();
    for router in [deleted, kept] {
        let incarnation = store.register_router(router).await.unwrap();
        for i in 0..200 {
            let id = SessionId::new(router.get() * 1_000 + i);
            let counter = if router == deleted { &left } else { &kept_left };
            let payload = Dropped {
                left: Arc::clone(counter),
                all: Arc::clone(&all),
            };
            let ttl = if router == deleted { 3_600 } else { 600 };
            let spec = NewSession::new(id, router, incarnation)
                .payload(payload)
                .expires_in(Duration::from_secs(ttl));
            let session = lifecycle.create(spec).await.unwrap();
            if router == kept {
                survivors.push(session);
            }
        }
    }
    // Spread the deleted router's entries over the wheel's turn first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(lifecycle.expiry().stats().tracked, 400);

    let outcome = lifecycle.deleter().delete(deleted).await.unwrap();
    let report = outcome.report().expect("deleted by this call");
    assert_eq!(report.forced, 200, "{report:?}");
    let deleted_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), all.notified())
        .await
        .expect("the deleted sessions' payloads are still held");
    let held = Instant::now() - deleted_at;
    assert!(
        held <= Duration::from_secs(60) + TICK,
        "held {held:?} after the deletion"
    );
    assert_eq!(lifecycle.expiry().stats().tracked, 200, "the kept router's");
    assert!(survivors.iter().all(|s| !s.is_closed()));

    // The kept router's sessions were swept past many times: they still
    // expire, on time.
    let all_closed = futures::future::join_all(survivors.iter().map(Session::closed));
    let reasons = tokio::time::timeout(Duration::from_secs(700), all_closed)
        .await
        .expect("a kept session was swept out and never expired");
    assert!(reasons.iter().all(|r| *r == CloseReason::Expired));
    let expired = Instant::now() - start;
    assert!(
        expired >= Duration::from_secs(600) && expired <= Duration::from_secs(600) + TICK,
        "expired {expired:?} after the start"
    );
    let stats = lifecycle.expiry().stats();
    assert_eq!((stats.expired, stats.tracked), (200, 0));
}
