//! A big router's deletion shares its runtime worker: every long pass (the
//! fence's snapshot, the address sort, marking, waiting, forcing, the
//! store's `finish`, dropping the handles) yields between slices of 4,096
//! sessions, so other tasks on the same thread run all along.
//!
//! Each test runs on a current-thread runtime beside a task that counts
//! its own turns: a pass that never yielded would leave it one or two
//! turns for the whole deletion. (How long one slice takes is measured in
//! release mode by `benches/delete_router.rs`'s `longest_hold` line, not
//! here: a debug build's wall time says nothing.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use session_lifecycle::test_util::{Notify, ScriptedNotifier, Subset};
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, RouterDeleter, RouterId, SessionId,
    SessionStore,
};
use tokio::time::Duration;

/// Sessions of the router under test: 25 slices.
const N: u64 = 100_000;
/// Sessions per slice (the crate's `SLICE`).
const SLICE: u64 = 4_096;

/// A task that takes a turn, yields, and takes another, until stopped;
/// `turns` counts them, and `most` is the largest rise of `watched` seen
/// between two turns.
struct Bystander {
    turns: Arc<AtomicU64>,
    most: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    fn start() -> Self {
        Self::watching(Arc::new(AtomicU64::new(0)))
    }

    fn watching(watched: Arc<AtomicU64>) -> Self {
        let (turns, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let most = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (turns, stop, most) = (Arc::clone(&turns), Arc::clone(&stop), Arc::clone(&most));
            async move {
                let mut last = watched.load(Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    turns.fetch_add(1, Ordering::Relaxed);
                    let now = watched.load(Ordering::Relaxed);
                    most.fetch_max(now - last, Ordering::Relaxed);
                    last = now;
                    tokio::task::yield_now().await;
                }
            }
        });
        Self {
            turns,
            most,
            stop,
            task,
        }
    }

    /// Turns taken while `work` ran.
    async fn during<T>(&self, work: impl std::future::Future<Output = T>) -> (T, u64) {
        // Let the bystander start first.
        tokio::task::yield_now().await;
        let before = self.turns.load(Ordering::Relaxed);
        let out = work.await;
        (out, self.turns.load(Ordering::Relaxed) - before)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the bystander ran to its end");
    }
}

async fn router_with(store: &MemoryStore, router: RouterId, n: u64) -> Incarnation {
    let incarnation = store.register_router(router).await.expect("fresh router");
    for i in 0..n {
        let spec = NewSession::new(SessionId::new(router.get() << 32 | i), router, incarnation);
        drop(store.create(spec).await.expect("live router"));
    }
    incarnation
}

/// A deleter whose routers do as `behaviour` says, waiting `confirm` for
/// confirmations, without a second round.
fn deleter(
    store: &Arc<MemoryStore>,
    behaviour: Notify,
    confirm: Duration,
) -> RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>> {
    RouterDeleter::builder()
        .batch_size(1_000)
        .confirm_timeout(confirm)
        .backoff(session_lifecycle::Backoff::new().retries(0))
        .build(
            Arc::clone(store),
            ScriptedNotifier::always(Arc::clone(store), behaviour),
        )
        .expect("valid settings")
}

#[tokio::test(flavor = "current_thread")]
async fn a_big_deletion_lets_the_tasks_beside_it_run_every_slice() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    router_with(&store, router, N).await;
    let deleter = deleter(&store, Notify::confirm_all(), Duration::from_secs(60));
    let bystander = Bystander::start();
    let (outcome, turns) = bystander.during(deleter.delete(router)).await;
    bystander.stop().await;
    let report = outcome
        .expect("deleted")
        .report()
        .cloned()
        .expect("a report");
    assert_eq!(report.confirmed as u64, N, "{report:?}");
    assert_eq!(store.count(router).await.ok(), Some(0));
    // At least once a slice through the snapshot, the sort's passes, the
    // marking, the wait and the final drop; once a batch while notifying.
    let slices = N / SLICE;
    assert!(
        turns >= 5 * slices + N / 1_000,
        "the bystander ran {turns} times during a {N}-session deletion"
    );
}

// Real time: a bystander always ready to run keeps a paused clock from
// advancing to the confirmation deadline.
#[tokio::test(flavor = "current_thread")]
async fn forcing_a_big_silent_router_releases_a_slice_at_a_time() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(2);
    router_with(&store, router, N).await;
    // Every session holds a resource that counts its release.
    let released = Arc::new(AtomicU64::new(0));
    for session in store.sessions(router).await.expect("known router") {
        let released = Arc::clone(&released);
        session
            .attach(move |_: CloseReason| {
                released.fetch_add(1, Ordering::Relaxed);
            })
            .expect("open session");
    }
    let deleter = deleter(
        &store,
        Notify::Confirm(Subset::None),
        Duration::from_millis(50),
    );
    let bystander = Bystander::watching(Arc::clone(&released));
    let (outcome, _) = bystander.during(deleter.delete(router)).await;
    let most = bystander.most.load(Ordering::Relaxed);
    bystander.stop().await;
    let report = outcome
        .expect("deleted")
        .report()
        .cloned()
        .expect("a report");
    assert_eq!(report.forced as u64, N, "{report:?}");
    assert_eq!(released.load(Ordering::Relaxed), N);
    assert_eq!(store.count(router).await.ok(), Some(0));
    assert!(store.audit().await.expect("audit").is_consistent());
    // Two slices at most: tokio wakes yielded tasks in batches, so a
    // yielding pass may get two turns in a row.
    assert!(
        most <= 2 * SLICE,
        "{most} sessions force-closed between two turns of the bystander"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_memory_stores_fence_and_finish_run_in_slices() {
    let store = MemoryStore::new();
    let router = RouterId::new(3);
    let incarnation = router_with(&store, router, N).await;
    let bystander = Bystander::start();
    let (snapshot, fence_turns) = bystander.during(store.fence(router)).await;
    let snapshot = snapshot.expect("fenced");
    assert_eq!(snapshot.sessions.len() as u64, N);
    // A third of the sessions closed through the store, as confirmations.
    for session in snapshot.sessions.iter().step_by(3) {
        let _ = store
            .close_exact(session.key(), CloseReason::RouterDeleted)
            .await
            .expect("held");
    }
    let (finished, finish_turns) = bystander.during(store.finish(router, incarnation)).await;
    bystander.stop().await;
    let finished = finished.expect("finished");
    let confirmed = N.div_ceil(3);
    assert_eq!(finished.closed as u64, N - confirmed, "{finished:?}");
    assert_eq!(finished.removed as u64, N - confirmed, "{finished:?}");
    assert!(snapshot.sessions.iter().all(|session| session.is_closed()));
    for session in snapshot.sessions.iter().step_by(997) {
        assert!(store.get(session.id()).await.expect("readable").is_none());
    }
    assert!(store.audit().await.expect("audit").is_consistent());
    assert!(fence_turns >= N / SLICE, "fence: {fence_turns} turns");
    assert!(
        finish_turns >= 2 * (N / SLICE),
        "finish: {finish_turns} turns"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_finish_dropped_halfway_leaves_the_store_consistent_and_is_resumed() {
    let store = MemoryStore::new();
    let router = RouterId::new(4);
    let incarnation = router_with(&store, router, N).await;
    store.fence(router).await.expect("fenced");
    // Stop the finish after a few slices of its removals.
    let mut finish = Box::pin(store.finish(router, incarnation));
    for _ in 0..(N / SLICE + 5) {
        let polled = futures::poll!(finish.as_mut());
        assert!(
            polled.is_pending(),
            "a finish of {N} sessions ran in one go"
        );
    }
    drop(finish);
    let count = store.count(router).await.expect("known router");
    assert!(0 < count && count < N as usize, "{count} sessions left");
    assert!(store.audit().await.expect("audit").is_consistent());
    let finished = store.finish(router, incarnation).await.expect("resumed");
    assert_eq!(finished.removed, count, "{finished:?}");
    assert_eq!(store.count(router).await.ok(), Some(0));
    assert!(store.audit().await.expect("audit").is_consistent());
}
