//! The deleter stress test, for any store.
//!
//! On a multi-thread runtime: tasks keep creating sessions on every router
//! and closing random ones while half the routers (the even ones) are
//! deleted concurrently, some by two racing deletes. The notifier confirms
//! late (from a task of its own, after a random delay) and loses some
//! notices. Afterwards: no session of a deleted router in the store, all of
//! them closed, every resource released exactly once, every create that
//! started after its router's deletion returned refused; live routers
//! untouched; the store's invariants hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::time::Duration;

use super::conformance::Backend;
use super::fakes::{Notify, ScriptedNotifier};
use super::invariants::check_invariants;
use super::observe::attach_counter;
use super::rng::mix;
use super::script::{Script, Subset};
use crate::{
    Backoff, CloseReason, Incarnation, NewSession, ReclaimQueue, RouterDeleter, RouterId, Session,
    SessionId, SessionStore,
};

/// How big a stress run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StressSizes {
    /// Routers; the even ones are deleted.
    pub routers: u64,
    /// Sessions each router is filled with before the deletions.
    pub sessions_per_router: u64,
    /// Tasks creating and closing sessions during the deletions.
    pub creators: u64,
    /// How many times the whole scenario runs, each on a fresh store.
    pub rounds: u64,
}

impl StressSizes {
    /// The MemoryStore run: 20 routers × 2,000 sessions, 4 creators,
    /// [`soak_rounds`]`(1)` rounds.
    pub fn memory() -> Self {
        Self {
            routers: 20,
            sessions_per_router: 2_000,
            creators: 4,
            rounds: soak_rounds(1),
        }
    }
}

/// How many times to run a stress scenario: `SESSION_LIFECYCLE_SOAK` times
/// for a soak (`SESSION_LIFECYCLE_SOAK=200 cargo test --release --test
/// deleter_stress`), `default` times otherwise.
#[must_use]
pub fn soak_rounds(default: u64) -> u64 {
    std::env::var("SESSION_LIFECYCLE_SOAK")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(default)
}

/// Where forced sessions' resources are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForcedReleases {
    /// By the deleter itself.
    Inline,
    /// Through a fresh `ReclaimQueue` of this capacity and this many workers
    /// each round (a small capacity makes the deleters wait on its
    /// backpressure). The queue's counters are checked after each round.
    ReclaimQueue {
        /// The queue's capacity.
        capacity: usize,
        /// Its worker tasks.
        workers: usize,
    },
}

/// Runs the stress scenario `sizes.rounds` times, each on a fresh store of
/// `backend`. Call it from a multi-thread runtime.
pub async fn deleter_stress<B: Backend>(backend: &B, sizes: StressSizes, releases: ForcedReleases) {
    if sizes.routers == 0 {
        return; // nothing to run on
    }
    for round in 0..sizes.rounds {
        let store = backend.fresh().await;
        match releases {
            ForcedReleases::Inline => {
                let _ = one_round(store, sizes, round, None).await;
            }
            ForcedReleases::ReclaimQueue { capacity, workers } => {
                let queue = ReclaimQueue::builder()
                    .capacity(capacity)
                    .workers(workers)
                    .build()
                    .unwrap();
                let (forced, bare) = one_round(store, sizes, round, Some(queue.clone())).await;
                let stats = queue.stats();
                // One task per forced session that had a resource: a
                // session force-closed before its creator attached the
                // counting resource (`bare`) has nothing to queue.
                assert!(stats.pushed <= forced as u64, "{stats:?}, {forced} forced");
                assert!(
                    stats.pushed + bare as u64 >= forced as u64,
                    "{stats:?}, {forced} forced, {bare} bare"
                );
                assert_eq!((stats.completed, stats.failed), (stats.pushed, 0));
                assert_eq!((stats.depth, stats.in_flight), (0, 0));
                assert!(stats.peak_depth <= capacity);
            }
        }
    }
}

/// The simulated routers: each notice is answered later, from another
/// task, after 0 to 39 ms; ids divisible by 50 are never confirmed, and 1
/// in 20 of the others is lost in each round (re-notified), drawn from the
/// id and the round.
fn late_routers<S: SessionStore>(store: &Arc<S>, round: u64) -> Arc<ScriptedNotifier<S>> {
    let script = Script::from_fn(move |call| Notify::Later {
        delay: Duration::from_millis(mix(round ^ mix(call.index)) % 40),
        confirm: Subset::Filter(|id, round| {
            !id.get().is_multiple_of(50)
                && !mix(id.get() ^ mix(u64::from(round) + 7)).is_multiple_of(20)
        }),
    });
    ScriptedNotifier::new(Arc::clone(store), script)
}

struct Created {
    session: Session,
    released: Arc<AtomicUsize>,
    /// Whether the counting resource was attached (a session closed before
    /// its creator attached it has nothing to queue).
    attached: bool,
}

/// Runs the scenario once; returns how many sessions the deletions forced,
/// and how many sessions were closed before their creator attached their
/// resource.
async fn one_round<S: SessionStore<Payload = ()>>(
    store: Arc<S>,
    sizes: StressSizes,
    round: u64,
    queue: Option<ReclaimQueue>,
) -> (usize, usize) {
    let StressSizes {
        routers,
        sessions_per_router,
        creators,
        ..
    } = sizes;
    let mut incarnations = HashMap::new();
    for r in 0..routers {
        incarnations.insert(
            RouterId::new(r),
            store.register_router(RouterId::new(r)).await.unwrap(),
        );
    }
    let created: Arc<Mutex<Vec<Created>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let deleted_flags: Arc<HashMap<RouterId, AtomicBool>> = Arc::new(
        (0..routers)
            .map(|r| (RouterId::new(r), AtomicBool::new(false)))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));

    // Fill each router to `sessions_per_router` sessions.
    for r in 0..routers {
        for _ in 0..sessions_per_router {
            let router = RouterId::new(r);
            create(&*store, &created, &next_id, router, incarnations[&router])
                .await
                .unwrap();
        }
    }

    // Creators and closers keep going during the deletions.
    let mut load = Vec::new();
    let refused = Arc::new(AtomicU64::new(0));
    for c in 0..creators {
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
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let router = RouterId::new(i % routers);
                let after_delete = flags[&router].load(Ordering::SeqCst);
                match create(&*store, &created, &next_id, router, incarnations[&router]).await {
                    Ok(()) => assert!(
                        !after_delete,
                        "a create on {router} succeeded after its deletion returned"
                    ),
                    Err(()) => {
                        refused.fetch_add(u64::from(after_delete), Ordering::SeqCst);
                    }
                }
                // Close a random earlier session now and then; never one
                // the routers never confirm (ids divisible by 50): those
                // of a deleted router are left to the force-close phase,
                // so every round exercises it (router 0 holds id 0).
                if i % 3 == 0 {
                    let victim = i.wrapping_mul(7919) % next_id.load(Ordering::Relaxed).max(1);
                    if !victim.is_multiple_of(50) {
                        let victim = SessionId::new(victim);
                        let _ = store.close(victim, CloseReason::ClientClosed).await;
                    }
                }
                i += creators;
                rounds += 1;
                // Yields often, whatever `creators` is: a task that never
                // yields would also hold up the runtime's shutdown if the
                // test fails.
                if rounds.is_multiple_of(32) {
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
        .backoff(
            Backoff::new()
                .retries(2)
                .delays(Duration::from_millis(20), Duration::from_millis(80)),
        )
        .build(Arc::clone(&store), late_routers(&store, round))
        .expect("valid settings");

    // Delete the even routers, all at once; routers 0, 4, 8 get a second,
    // racing delete.
    let mut deletes = Vec::new();
    for r in (0..routers).step_by(2) {
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
            report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
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
    // (With no creator, nobody tries.)
    let tried = if sizes.creators == 0 { 0 } else { 200 };
    tokio::time::timeout(Duration::from_secs(60), async {
        while refused.load(Ordering::SeqCst) < tried {
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
    for Created {
        session, released, ..
    } in created.iter()
    {
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
    // Every session the deleted routers were filled with, at least.
    let deleted_routers = routers.div_ceil(2);
    assert!(on_deleted >= (deleted_routers * sessions_per_router) as usize);
    let forced: usize = reports.values().map(|report| report.forced).sum();
    if sessions_per_router > 0 {
        // Id 0, on router 0, deleted, never confirmed and never closed by
        // the load: forced.
        assert!(forced > 0, "the force-close phase was not exercised");
    }
    for r in (0..routers).step_by(2) {
        assert_eq!(store.count(RouterId::new(r)).await.unwrap(), 0);
    }
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    let report = check_invariants(&*store).await;
    assert!(report.is_clean(), "{report}");
    // Closed before the resource was attached, or closed by the store
    // rather than the deleter: with a remote store, a create that raced
    // its router's whole deletion gets a handle of its own, which the
    // store closes (`Reclaimed`) once it sees the record gone; the
    // deleter forced another handle of that session, without the resource.
    let bare = created
        .iter()
        .filter(|c| !c.attached || c.session.close_reason() == Some(CloseReason::Reclaimed))
        .count();
    (forced, bare)
}

async fn create<S: SessionStore<Payload = ()>>(
    store: &S,
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
    // The session may already be closed by a racing deletion: then the
    // resource is released at once, and is not queued anywhere.
    let (released, attached) = attach_counter(&session);
    created.lock().push(Created {
        session,
        released,
        attached,
    });
    Ok(())
}
