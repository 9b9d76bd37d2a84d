//! Every cleanup path at once, on two threads in real time: deletions,
//! continuous audit sweeps over a store that keeps getting orphans
//! injected, reconciliations, a grace period expiring, and clients closing
//! sessions through the store and through their handles. Every resource is
//! released exactly once, and the store ends clean.
//!
//! `SESSION_LIFECYCLE_SOAK=50 cargo test --release --features test-util --test cleanup_stress`
//! repeats the scenario 50 times (3 by default).
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use session_lifecycle::test_util::conformance::soak_rounds;
use session_lifecycle::test_util::{Notify, Script, ScriptedNotifier, Subset};
use session_lifecycle::{
    AuditSweeper, Backoff, CloseReason, Event, EventBus, Incarnation, MemoryStore, NewSession,
    Reconciler, RouterDeleter, RouterId, Session, SessionId, SessionStore, store::Corruption,
    store::RouterStatus,
};
use tokio::task::JoinSet;
use tokio::time::Duration;

const ROUTERS: u64 = 10;
const PER_ROUTER: u64 = 1_000;
/// Routers 0..4 are deleted, 4..7 reconciled, 7 lost after its grace
/// period; 8 and 9 only see client closes.
const DELETED: std::ops::Range<u64> = 0..4;
const RECONCILED: std::ops::Range<u64> = 4..7;
const LOST: u64 = 7;

/// A session and the number of times its resource was released.
struct Tracked {
    session: Session,
    released: Arc<AtomicUsize>,
}

fn track(session: Session) -> Tracked {
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    session
        .attach(move |_: CloseReason| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    Tracked { session, released }
}

async fn scenario(seed: u64) {
    let store = Arc::new(MemoryStore::new());
    let mut tracked = Vec::new();
    let mut incarnations = Vec::new();
    for r in 0..ROUTERS {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        incarnations.push(incarnation);
        for i in 0..PER_ROUTER {
            let id = SessionId::new(r * PER_ROUTER + i);
            let session = store
                .create(NewSession::new(id, router, incarnation))
                .await
                .unwrap();
            tracked.push(track(session));
        }
    }
    let tracked = Arc::new(tracked);
    let injected = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();

    // Sweeps, back to back, until the end.
    let sweeper = AuditSweeper::builder().build(Arc::clone(&store)).unwrap();
    {
        let (sweeper, stop) = (sweeper.clone(), Arc::clone(&stop));
        tasks.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                sweeper.sweep().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
    }
    // Orphans appear: sessions of unknown routers and of a stale
    // incarnation of a live router, put straight into the map.
    {
        let (store, injected, stop) =
            (Arc::clone(&store), Arc::clone(&injected), Arc::clone(&stop));
        tasks.spawn(async move {
            let mut next = 1_000_000u64;
            while !stop.load(Ordering::SeqCst) {
                let router = if next.is_multiple_of(2) {
                    RouterId::new(500)
                } else {
                    RouterId::new(9)
                };
                let session = NewSession::new(SessionId::new(next), router, Incarnation::new(0))
                    .into_session();
                let orphan = track(session);
                store.corrupt(Corruption::Inject(orphan.session.clone()));
                injected.lock().push(orphan);
                next += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    // Clients leave, through the store and through their handles.
    {
        let (store, tracked, stop) = (Arc::clone(&store), Arc::clone(&tracked), Arc::clone(&stop));
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            while !stop.load(Ordering::SeqCst) {
                let session = &tracked[rng.usize(..tracked.len())].session;
                if rng.bool() {
                    let _ = store.close(session.id(), CloseReason::ClientClosed).await;
                } else {
                    let _ = session.close(CloseReason::ClientClosed);
                }
                tokio::task::yield_now().await;
            }
        });
    }
    // Router 7 disconnects for good: its grace period expires mid-run.
    let bus = EventBus::new(64);
    let mut lost = bus.subscribe();
    let reconciler = Reconciler::builder()
        .events(bus)
        .grace_period(Duration::from_millis(50))
        .chunk_size(64)
        .build(Arc::clone(&store))
        .expect("valid settings");
    reconciler
        .router_disconnected(RouterId::new(LOST))
        .await
        .unwrap();
    // Routers 4..7 reconnect and report all but every tenth session.
    for r in RECONCILED {
        let (reconciler, incarnation) = (reconciler.clone(), incarnations[r as usize]);
        tasks.spawn(async move {
            let reported = (0..PER_ROUTER)
                .filter(|i| i % 10 != 0)
                .map(|i| SessionId::new(r * PER_ROUTER + i));
            reconciler
                .reconcile(RouterId::new(r), incarnation, reported)
                .await
                .unwrap();
        });
    }
    // Routers 0..4 are deleted; half the sessions confirm, half are forced.
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(50))
        .notify_timeout(Duration::from_millis(50))
        .backoff(
            Backoff::new()
                .retries(1)
                .delays(Duration::from_millis(5), Duration::from_millis(10)),
        )
        .build(
            Arc::clone(&store),
            ScriptedNotifier::new(
                Arc::clone(&store),
                Script::by_round(Notify::Confirm(Subset::EvenIds), Notify::Never),
            ),
        )
        .expect("valid settings");
    let mut deletions = JoinSet::new();
    for r in DELETED {
        deletions.spawn(deleter.delete(RouterId::new(r)));
    }
    while let Some(deleted) = deletions.join_next().await {
        deleted.unwrap().unwrap();
    }
    // Let the grace period expire under the load, then stop.
    // The first router lost must be router 7: no other one disconnects.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Event::RouterLost { router, .. }) = lost.recv().await {
                assert_eq!(router, RouterId::new(LOST));
                return;
            }
        }
    })
    .await
    .expect("the grace period expired and closed router 7's sessions");
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // Two sweeps: a closed session is removed on its second sighting.
    sweeper.sweep().await.unwrap();
    let last = sweeper.sweep().await.unwrap();
    sweeper.shutdown().await;
    reconciler.shutdown().await;

    // Every resource released exactly once if its session is closed, never
    // otherwise; orphans all reclaimed.
    for t in tracked.iter().chain(injected.lock().iter()) {
        let expected = usize::from(t.session.is_closed());
        assert_eq!(
            t.released.load(Ordering::SeqCst),
            expected,
            "{:?} ({:?})",
            t.session,
            t.session.close_reason()
        );
    }
    for orphan in injected.lock().iter() {
        assert!(orphan.session.is_closed(), "{:?}", orphan.session);
    }
    for r in DELETED {
        let router = RouterId::new(r);
        assert_eq!(
            store.router_status(router).await.unwrap(),
            RouterStatus::Deleted(incarnations[r as usize])
        );
        for t in &tracked[(r * PER_ROUTER) as usize..((r + 1) * PER_ROUTER) as usize] {
            assert!(t.session.is_closed());
            assert!(matches!(
                t.session.close_reason(),
                Some(CloseReason::RouterDeleted | CloseReason::Forced | CloseReason::ClientClosed)
            ));
        }
    }
    for t in &tracked[(LOST * PER_ROUTER) as usize..((LOST + 1) * PER_ROUTER) as usize] {
        assert!(matches!(
            t.session.close_reason(),
            Some(CloseReason::RouterLost | CloseReason::ClientClosed)
        ));
    }
    // Clean: nothing closed left behind, nothing orphaned, index and map
    // agree; what the last sweep repaired came from the last moments.
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?} (last sweep: {last:?})");
    let open = tracked.iter().filter(|t| !t.session.is_closed()).count();
    assert_eq!(store.len(), open);
}

#[test]
fn every_cleanup_path_at_once_releases_each_resource_once() {
    let rounds = soak_rounds(3);
    for round in 0..rounds {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), scenario(round))
                .await
                .unwrap_or_else(|_| panic!("round {round} did not finish within 60 s"));
        });
    }
}
