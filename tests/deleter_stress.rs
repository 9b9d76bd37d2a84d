//! Stress on a multi-thread runtime: 20 routers × 2,000 sessions; tasks keep
//! creating sessions on every router and closing random ones while half the
//! routers are deleted concurrently, some by two racing deletes. The
//! notifier confirms late (spawned, random delay) and loses some notices.
//! Afterwards: no session of a deleted router in the store, all of them
//! closed, every resource released exactly once, every create that started
//! after its router's deletion returned refused; live routers untouched.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, NotifyError, ReclaimQueue, RouterDeleter,
    RouterId, Session, SessionId, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::time::Duration;

const ROUTERS: u64 = 20;
const PER_ROUTER: u64 = 2_000;
const CREATORS: u64 = 4;

/// Confirms each session later, from another task; never confirms ids
/// divisible by 50 and loses 1 in 20 of the others on each round.
struct LateRouter {
    store: Arc<MemoryStore>,
    seed: AtomicU64,
}

impl LateRouter {
    fn next(&self) -> u64 {
        // splitmix64: cheap, deterministic per run, good enough to scatter.
        let mut z = self
            .seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl TerminationNotifier for LateRouter {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let keep: Vec<SessionId> = batch
            .sessions
            .into_iter()
            // 1 in 50 never answers (forced); 1 in 20 of the rest is lost
            // per round (re-notified).
            .filter(|id| id.get() % 50 != 0 && self.next() % 20 != 0)
            .collect();
        let store = Arc::clone(&self.store);
        let delay = Duration::from_millis(self.next() % 40);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for id in keep {
                let _ = store.close(id, CloseReason::RouterDeleted).await;
            }
        });
        Ok(())
    }
}

struct Created {
    session: Session,
    released: Arc<AtomicUsize>,
}

/// How many times to run the scenario: once, or `SESSION_LIFECYCLE_SOAK`
/// times for a soak (`SESSION_LIFECYCLE_SOAK=200 cargo test --release
/// --test deleter_stress`).
fn rounds() -> u64 {
    std::env::var("SESSION_LIFECYCLE_SOAK")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_half_the_routers_under_load_leaves_no_zombie() {
    for round in 0..rounds() {
        one_round(round, None).await;
    }
}

/// The same with forced sessions' resources released through a small
/// `ReclaimQueue` (capacity 64: the deleters wait on its backpressure).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_releases_through_a_reclaim_queue_leave_no_zombie() {
    for round in 0..rounds() {
        let queue = ReclaimQueue::builder()
            .capacity(64)
            .workers(2)
            .build()
            .unwrap();
        let forced = one_round(round, Some(queue.clone())).await;
        let stats = queue.stats();
        assert_eq!(stats.pushed, forced as u64, "one task per forced session");
        assert_eq!((stats.completed, stats.failed), (stats.pushed, 0));
        assert_eq!((stats.depth, stats.in_flight), (0, 0));
        assert!(stats.peak_depth <= 64);
    }
}

/// Runs the scenario; returns how many sessions the deletions forced.
async fn one_round(round: u64, queue: Option<ReclaimQueue>) -> usize {
    let store = Arc::new(MemoryStore::new());
    let mut incarnations = HashMap::new();
    for r in 0..ROUTERS {
        incarnations.insert(
            RouterId::new(r),
            store.register_router(RouterId::new(r)).await.unwrap(),
        );
    }
    let created: Arc<Mutex<Vec<Created>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let deleted_flags: Arc<HashMap<RouterId, AtomicBool>> = Arc::new(
        (0..ROUTERS)
            .map(|r| (RouterId::new(r), AtomicBool::new(false)))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));

    // Fill each router to PER_ROUTER sessions.
    for r in 0..ROUTERS {
        for _ in 0..PER_ROUTER {
            let router = RouterId::new(r);
            create(&store, &created, &next_id, router, incarnations[&router])
                .await
                .unwrap();
        }
    }

    // Creators and closers keep going during the deletions.
    let mut load = Vec::new();
    let refused = Arc::new(AtomicU64::new(0));
    for c in 0..CREATORS {
        let refused = Arc::clone(&refused);
        let (store, created, next_id, flags, stop, incarnations) = (
            Arc::clone(&store),
            Arc::clone(&created),
            Arc::clone(&next_id),
            Arc::clone(&deleted_flags),
            Arc::clone(&stop),
            incarnations.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::SeqCst) {
                let router = RouterId::new(i % ROUTERS);
                let after_delete = flags[&router].load(Ordering::SeqCst);
                match create(&store, &created, &next_id, router, incarnations[&router]).await {
                    Ok(()) => assert!(
                        !after_delete,
                        "a create on {router} succeeded after its deletion returned"
                    ),
                    Err(()) => {
                        refused.fetch_add(u64::from(after_delete), Ordering::SeqCst);
                    }
                }
                // Close a random earlier session now and then.
                if i % 3 == 0 {
                    let victim = SessionId::new(
                        i.wrapping_mul(7919) % next_id.load(Ordering::Relaxed).max(1),
                    );
                    let _ = store.close(victim, CloseReason::ClientClosed).await;
                }
                i += CREATORS;
                if i % 32 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }

    let mut builder = RouterDeleter::builder();
    if let Some(queue) = queue {
        builder = builder.reclaim_queue(queue);
    }
    let deleter = builder
        .batch_size(250)
        .notify_timeout(Duration::from_millis(200))
        .confirm_timeout(Duration::from_millis(150))
        .retries(2)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(80))
        .build(
            Arc::clone(&store),
            LateRouter {
                store: Arc::clone(&store),
                seed: AtomicU64::new(7 + round),
            },
        );

    // Delete the even routers, all at once; routers 0, 4, 8 get a second,
    // racing delete.
    let mut deletes = Vec::new();
    for r in (0..ROUTERS).step_by(2) {
        let router = RouterId::new(r);
        let runs = if r % 4 == 0 && r <= 8 { 2 } else { 1 };
        for _ in 0..runs {
            let (deleter, flags) = (deleter.clone(), Arc::clone(&deleted_flags));
            deletes.push(tokio::spawn(async move {
                let outcome = tokio::time::timeout(Duration::from_secs(60), deleter.delete(router))
                    .await
                    .expect("delete finishes within its bound")
                    .unwrap();
                flags[&router].store(true, Ordering::SeqCst);
                (router, outcome)
            }));
        }
    }
    let mut reports = HashMap::new();
    for delete in deletes {
        let (router, outcome) = delete.await.unwrap();
        let report = outcome
            .report()
            .cloned()
            .expect("racing deletes join one run");
        assert_eq!(
            report.confirmed + report.already_closed + report.forced,
            report.sessions
        );
        if let Some(previous) = reports.insert(router, report.clone()) {
            assert_eq!(
                previous, report,
                "two deletes of {router} got different reports"
            );
        }
    }
    // Keep the load going past the deletions until creates on deleted
    // routers have been refused a good number of times, then stop it.
    tokio::time::timeout(Duration::from_secs(60), async {
        while refused.load(Ordering::SeqCst) < 200 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("creates on deleted routers were tried and refused");
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }

    // Late confirmations may still be in flight: they only close sessions
    // of deleted routers, all of which are closed already.
    let created = std::mem::take(&mut *created.lock());
    let mut on_deleted = 0;
    for Created { session, released } in created.iter() {
        let deleted = session.router().get() % 2 == 0;
        let stored = store
            .get(session.id())
            .await
            .unwrap()
            .is_some_and(|s| Session::ptr_eq(&s, session));
        if deleted {
            on_deleted += 1;
            assert!(
                session.is_closed(),
                "{session:?} of a deleted router is open"
            );
            assert!(!stored, "{session:?} of a deleted router is still stored");
            assert_eq!(
                released.load(Ordering::SeqCst),
                1,
                "{session:?}: resource released once"
            );
        } else {
            let expected = usize::from(session.is_closed());
            assert_eq!(released.load(Ordering::SeqCst), expected, "{session:?}");
            assert_eq!(stored, !session.is_closed(), "{session:?}");
        }
    }
    assert!(on_deleted >= (ROUTERS / 2 * PER_ROUTER) as usize);
    let forced: usize = reports.values().map(|report| report.forced).sum();
    assert!(forced > 0, "the force-close phase was not exercised");
    for r in (0..ROUTERS).step_by(2) {
        assert_eq!(store.count(RouterId::new(r)).await.unwrap(), 0);
    }
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    forced
}

async fn create(
    store: &MemoryStore,
    created: &Mutex<Vec<Created>>,
    next_id: &AtomicU64,
    router: RouterId,
    incarnation: Incarnation,
) -> Result<(), ()> {
    let id = SessionId::new(next_id.fetch_add(1, Ordering::Relaxed));
    let session = store
        .create(NewSession::new(id, router, incarnation))
        .await
        .map_err(|_| ())?;
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    // The session may already be closed by a racing deletion: then the
    // resource comes back and is released here, once.
    if let Err(back) = session.attach(move |_: CloseReason| {
        counter.fetch_add(1, Ordering::SeqCst);
    }) {
        (back.into_inner())(CloseReason::Forced);
    }
    created.lock().push(Created { session, released });
    Ok(())
}
