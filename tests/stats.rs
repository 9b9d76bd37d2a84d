//! `Stats`: the census of a store per router and in total, and the
//! counters of the pieces added to it.

use std::sync::Arc;

use futures::FutureExt;
use session_lifecycle::test_util::{HOUR, Notify, ScriptedNotifier, report_within};
use session_lifecycle::{
    CloseReason, EventBus, MemoryStore, NewSession, ReclaimQueue, RouterDeleter, RouterId,
    SessionId, SessionStore, Stats, store::RouterStatus,
};
use tokio::time::Duration;

const A: RouterId = RouterId::new(1);
const B: RouterId = RouterId::new(2);

/// Creates `active + terminating + closed` sessions on `router` from
/// `first_id`: the first stay `Active`, the next are marked `Terminating`,
/// the last are closed through their handle (and stay in the store).
async fn populate(
    store: &MemoryStore,
    router: RouterId,
    first_id: u64,
    (active, terminating, closed): (u64, u64, u64),
) -> RouterStatus {
    let incarnation = store.register_router(router).await.unwrap();
    let mut id = first_id;
    for kind in [(0, active), (1, terminating), (2, closed)] {
        for _ in 0..kind.1 {
            let session = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
            match kind.0 {
                0 => {}
                1 => assert!(session.begin_terminating().won()),
                _ => assert!(session.close(CloseReason::ClientClosed).won()),
            }
            id += 1;
        }
    }
    RouterStatus::Live(incarnation)
}

#[tokio::test(start_paused = true)]
async fn collect_counts_per_router_and_in_total() {
    let store = Arc::new(MemoryStore::new());
    let a = populate(&store, A, 0, (4, 3, 2)).await;
    let b = populate(&store, B, 100, (1, 2, 5)).await;

    let stats = Stats::collect(&*store).await.unwrap();
    // A memory store's census never waits: a synchronous caller polls once.
    let now = Stats::collect(&*store).now_or_never();
    assert_eq!(now.map(Result::unwrap), Some(stats.clone()));
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (5, 5, 7)
    );
    assert_eq!(stats.routers.len(), 2);
    assert_eq!(stats.routers[0].router, A, "sorted by router id");
    assert_eq!(stats.routers[1].router, B, "sorted by router id");

    let census = stats.router(A).unwrap();
    assert_eq!(census.status, a);
    assert_eq!(
        (census.active, census.terminating, census.closed),
        (4, 3, 2)
    );
    let census = stats.router(B).unwrap();
    assert_eq!(census.status, b);
    assert_eq!(
        (census.active, census.terminating, census.closed),
        (1, 2, 5)
    );
    assert!(stats.router(RouterId::new(3)).is_none());

    // Nothing added yet.
    assert_eq!(stats.deletions_in_flight, None);
    assert_eq!(stats.reclaim, None);
    assert_eq!(stats.liveness, None);
    assert_eq!(stats.routers_in_grace, None);
    assert_eq!(stats.sweeper, None);
    assert_eq!(stats.events, None);
}

#[tokio::test(start_paused = true)]
async fn an_empty_store_counts_nothing() {
    let store = MemoryStore::new();
    let stats = Stats::collect(&store).await.unwrap();
    assert_eq!(stats, Stats::default());
}

#[tokio::test(start_paused = true)]
async fn the_pieces_fill_their_fields() {
    let bus = EventBus::new(256);
    let _listener = bus.subscribe();
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build()
            .expect("valid settings"),
    );
    populate(&store, A, 0, (4, 3, 2)).await;
    populate(&store, B, 100, (1, 2, 5)).await;
    let queue = ReclaimQueue::builder()
        .capacity(128)
        .workers(1)
        .build()
        .unwrap();
    // Never answers: the deletion runs until its confirmation timeout.
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .retries(0)
        .build(
            Arc::clone(&store),
            ScriptedNotifier::always(Arc::clone(&store), Notify::Never),
        )
        .expect("valid settings");

    let stats = Stats::collect(&*store)
        .await
        .unwrap()
        .with_deleter(&deleter)
        .with_reclaim_queue(&queue)
        .with_events(&bus);
    assert_eq!(stats.deletions_in_flight, Some(0));
    let reclaim = stats.reclaim.unwrap();
    assert_eq!(reclaim, queue.stats());
    assert_eq!(
        (
            reclaim.capacity,
            reclaim.depth,
            reclaim.in_flight,
            reclaim.workers
        ),
        (128, 0, 0, 1)
    );
    let events = stats.events.unwrap();
    assert_eq!(events, bus.stats());
    assert_eq!(
        (events.capacity, events.subscribers, events.lagged),
        (256, 1, 0)
    );
    // 17 sessions created and 7 closed through their handles.
    assert_eq!(events.published, 17 + 7);
    assert_eq!(stats.liveness, None);
    assert_eq!(stats.routers_in_grace, None);
    assert_eq!(stats.sweeper, None);

    // A deletion in flight is counted from its first poll.
    let mut delete = std::pin::pin!(deleter.delete(A));
    assert!(futures::poll!(delete.as_mut()).is_pending());
    let running = Stats::default().with_deleter(&deleter);
    assert_eq!(running.deletions_in_flight, Some(1));
    let report = report_within(HOUR, delete).await;
    assert_eq!(
        (report.sessions, report.already_closed, report.forced),
        (9, 2, 7)
    );
    let stats = Stats::collect(&*store)
        .await
        .unwrap()
        .with_deleter(&deleter);
    assert_eq!(stats.deletions_in_flight, Some(0));
    // A deleted router with no session left is not in the census.
    assert!(stats.router(A).is_none());
    assert_eq!(stats.routers.len(), 1);
    assert_eq!(
        (stats.active, stats.terminating, stats.closed_in_store),
        (1, 2, 5)
    );
}
