//! `NotificationBudget`: one budget per router, shared by every source
//! (paused time).

use std::sync::Arc;

use session_lifecycle::test_util::{Notify, ScriptedNotifier};
use session_lifecycle::{
    Backoff, MemoryStore, NewSession, NotificationBudget, RouterDeleter, RouterId, SessionId,
    SessionStore,
};
use tokio::time::{Duration, Instant};

fn budget(rate: u32, burst: u32) -> NotificationBudget {
    NotificationBudget::builder()
        .rate(rate)
        .burst(burst)
        .build()
        .expect("valid budget")
}

#[tokio::test(start_paused = true)]
async fn two_sources_share_one_routers_budget_and_other_routers_have_their_own() {
    let budget = budget(100, 50);
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let start = Instant::now();
    // Two sources at once on router `a`: 50 + 100 + 100 sessions.
    let first = tokio::spawn({
        let budget = budget.clone();
        async move {
            budget.acquire(a, 50).await;
            budget.acquire(a, 100).await;
            Instant::now()
        }
    });
    tokio::task::yield_now().await;
    let second = tokio::spawn({
        let budget = budget.clone();
        async move {
            budget.acquire(a, 100).await;
            Instant::now()
        }
    });
    // Router `b` is not held up by `a`'s debt.
    budget.acquire(b, 50).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    // 250 sessions at 100/s with 50 of burst: the last goes at 2 s, not
    // before, whoever asked for it.
    let last = first.max(second) - start;
    assert_eq!(last, Duration::from_secs(2), "{first:?} {second:?}");
    let stats = budget.stats();
    assert_eq!((stats.granted, stats.delayed, stats.refused), (4, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn requests_for_one_router_are_served_in_the_order_they_asked() {
    let budget = budget(10, 1);
    let router = RouterId::new(1);
    let start = Instant::now();
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (budget, order) = (budget.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            budget.acquire(router, 1).await;
            order.lock().push(i);
        }));
        // Each asks after the one before.
        tokio::task::yield_now().await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
    // One at once, then one every 100 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(400));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_had_by_its_deadline_takes_nothing() {
    let budget = budget(100, 100);
    let router = RouterId::new(1);
    budget.acquire(router, 100).await;
    let start = Instant::now();
    let refused = budget
        .acquire_by(router, 100, start + Duration::from_millis(500))
        .await
        .expect_err("100 more sessions come at 1 s");
    assert_eq!(refused.wait, Duration::from_secs(1));
    assert_eq!(start.elapsed(), Duration::ZERO, "refused at once");
    // Nothing was taken: 50 fit by 500 ms.
    budget
        .acquire_by(router, 50, start + Duration::from_millis(500))
        .await
        .expect("50 sessions at 500 ms");
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    assert_eq!(budget.stats().refused, 1);
}

#[tokio::test(start_paused = true)]
async fn routers_with_a_full_budget_are_forgotten() {
    let budget = budget(1_000, 1);
    for r in 0..10_000 {
        budget.acquire(RouterId::new(r), 1).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for r in 0..200 {
        budget.acquire(RouterId::new(100_000 + r), 1).await;
    }
    // Routers whose debt is paid are forgotten (at least once a second).
    let stats = budget.stats();
    assert_eq!(stats.routers_in_debt, 200, "{stats:?}");
    assert!(stats.routers <= 400, "{stats:?}");
}

#[test]
fn settings_out_of_range_are_refused_by_name() {
    let rate = NotificationBudget::builder().rate(0).build().unwrap_err();
    assert_eq!(rate.refused_setting(), Some("rate"));
    let burst = NotificationBudget::builder().burst(0).build().unwrap_err();
    assert_eq!(burst.refused_setting(), Some("burst"));
}

async fn router_with(store: &MemoryStore, router: RouterId, n: u64) {
    let incarnation = store.register_router(router).await.expect("fresh router");
    for i in 0..n {
        let spec = NewSession::new(SessionId::new(router.get() << 32 | i), router, incarnation);
        drop(store.create(spec).await.expect("live router"));
    }
}

fn deleter(
    store: &Arc<MemoryStore>,
    budget: &NotificationBudget,
) -> RouterDeleter<MemoryStore, Arc<ScriptedNotifier<MemoryStore>>> {
    RouterDeleter::builder()
        .batch_size(100)
        .confirm_timeout(Duration::from_secs(2))
        .backoff(
            Backoff::new()
                .retries(1)
                .delays(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .notification_budget(budget.clone())
        .build(
            Arc::clone(store),
            ScriptedNotifier::always(Arc::clone(store), Notify::confirm_all()),
        )
        .expect("valid settings")
}

#[tokio::test(start_paused = true)]
async fn a_deletion_waits_for_the_budget_other_sources_used() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    router_with(&store, router, 300).await;
    let budget = budget(200, 100);
    // Another source (probes, the controller's own messages) took the
    // router's burst and half a second more.
    budget.acquire(router, 200).await;
    let start = Instant::now();
    let deleter = deleter(&store, &budget);
    let report = deleter
        .delete(router)
        .await
        .expect("deleted")
        .report()
        .cloned()
        .expect("a report");
    assert_eq!(report.confirmed, 300, "{report:?}");
    assert_eq!(report.notify_failures, 0, "{report:?}");
    // The other source's 200 went at once (100) and at 0.5 s (100 more),
    // when this deletion starts. Its 3 batches of 100 go at 200 a second
    // after those: at 1, 1.5 and 2 s, 1.5 s into the deletion.
    assert_eq!(start.elapsed(), Duration::from_millis(1_500), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_deletion_never_waits_for_budget_past_its_bound() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    router_with(&store, router, 1_000).await;
    // 50 sessions a second: 1,000 would take 20 s, past the rounds'
    // deadlines.
    let budget = budget(50, 100);
    let deleter = deleter(&store, &budget);
    let bound = deleter.max_wait(1_000);
    let start = Instant::now();
    let report = deleter
        .delete(router)
        .await
        .expect("deleted")
        .report()
        .cloned()
        .expect("a report");
    assert!(
        start.elapsed() <= bound,
        "{:?} > {bound:?}",
        start.elapsed()
    );
    // What the budget let through was confirmed; the batches it could not
    // send by a round's deadline failed, and their sessions were forced.
    assert!(report.notify_failures > 0, "{report:?}");
    assert_eq!(report.confirmed + report.forced, 1_000, "{report:?}");
    assert!(report.confirmed >= 30, "{report:?}");
    assert!(budget.stats().refused > 0);
    assert_eq!(store.count(router).await.ok(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn probes_the_budget_cannot_send_in_time_count_as_unanswered_within_the_bound() {
    use session_lifecycle::LivenessMonitor;
    use session_lifecycle::test_util::{Probe, ScriptedProber};

    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    router_with(&store, router, 3).await;
    // The controller's own messages put the router 100 s in debt (the
    // budget is taken at the first poll; the sender then waits its turn).
    let budget = budget(10, 10);
    let sender = tokio::spawn({
        let budget = budget.clone();
        async move { budget.acquire(router, 1_000).await }
    });
    tokio::task::yield_now().await;
    let prober = ScriptedProber::always(Probe::everyone());
    let monitor = LivenessMonitor::builder()
        .heartbeat_interval(Duration::from_secs(1))
        .timeout_range(Duration::from_secs(1), Duration::from_secs(5))
        .notification_budget(budget.clone())
        .build(Arc::clone(&store), Arc::clone(&prober))
        .expect("valid settings");
    let sessions = store.sessions(router).await.expect("known router");
    let start = Instant::now();
    for session in &sessions {
        monitor.watch(session).expect("watched");
    }
    // Nobody heartbeats, and no probe can be sent: they are reaped, within
    // the bound, though the prober would have answered.
    let bound = monitor.reap_bound(Duration::from_secs(5));
    for session in &sessions {
        tokio::time::timeout(bound, session.closed())
            .await
            .expect("reaped within the bound");
    }
    assert!(start.elapsed() <= bound);
    assert_eq!(prober.call_count(), 0, "a probe went past the budget");
    assert!(budget.stats().refused > 0);
    sender.abort();
}

#[tokio::test(start_paused = true)]
async fn a_lifecycle_gives_its_budget_to_the_deleter_and_the_monitor() {
    use session_lifecycle::Lifecycle;

    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    router_with(&store, router, 250).await;
    let budget = budget(1_000, 100);
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Arc::clone(&notifier))
        .deleter(RouterDeleter::builder().batch_size(50))
        .notification_budget(budget.clone())
        .build()
        .expect("valid settings");
    assert!(lifecycle.notification_budget().is_some());
    let start = Instant::now();
    lifecycle.deleter().delete(router).await.expect("deleted");
    // 250 sessions at 1,000/s with a burst of 100: 150 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(150));
    assert_eq!(budget.stats().granted, 5);

    // A piece that brings its own budget is refused: there is one.
    let refused = Lifecycle::builder(Arc::clone(&store), notifier)
        .liveness(session_lifecycle::LivenessMonitor::builder().notification_budget(budget.clone()))
        .notification_budget(budget)
        .build()
        .expect_err("two budgets");
    assert_eq!(refused.refused_setting(), Some("liveness"));
    assert!(
        lifecycle
            .shutdown(Duration::from_secs(5))
            .await
            .is_complete()
    );
}

/// A rate that does not divide a second still grants a full burst at
/// once, in one request or in several, and never more than
/// `burst + rate × span`: the budget keeps exact fractions of a
/// nanosecond, not a rounded cost per session.
#[tokio::test(start_paused = true)]
async fn a_rate_that_does_not_divide_a_second_grants_the_burst_at_once_and_no_more() {
    let router = RouterId::new(1);
    let now = Instant::now();
    // Three requests of one at 3 a second, burst 3: all at once.
    let budget = NotificationBudget::builder()
        .rate(3)
        .burst(3)
        .build()
        .unwrap();
    for n in 0..3 {
        assert_eq!(
            budget.acquire_by(router, 1, now).await,
            Ok(()),
            "request {n}"
        );
    }
    // The fourth waits a third of a second (rounded up to the nanosecond).
    let refused = budget.acquire_by(router, 1, now).await.unwrap_err();
    assert_eq!(refused.wait, Duration::from_nanos(333_333_334));
    // One request of the whole burst at 3 a second, burst 10: at once.
    let budget = NotificationBudget::builder()
        .rate(3)
        .burst(10)
        .build()
        .unwrap();
    assert_eq!(budget.acquire_by(router, 10, now).await, Ok(()));
    // 600 M a second, burst 1: 6,000,001 sessions take at least 10 ms.
    let budget = NotificationBudget::builder()
        .rate(600_000_000)
        .burst(1)
        .build()
        .unwrap();
    for _ in 0..6 {
        budget.acquire(router, 1_000_000).await;
    }
    budget.acquire(router, 1).await;
    let took = Instant::now() - now;
    // Each wait ends on tokio's next millisecond.
    assert!(
        took >= Duration::from_millis(10) && took <= Duration::from_millis(17),
        "{took:?}"
    );
}
