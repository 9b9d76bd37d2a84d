//! A controller's wrapper around `MemoryStore` driving `RouterDeleter`
//! (a review of stop 33; each test failed before):
//!
//! - a store method awaiting the deletion of another router (a cascade to
//!   child routers) hung for ever past `max_concurrent`: the nested
//!   deletion waited for a slot its own caller held;
//! - a `finish` report with an absurd count overflowed (a panic in debug
//!   builds, answered `Interrupted` for a deleted router);
//! - a fence snapshot listing another router's session had it force-closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use session_lifecycle::test_util::{Notify, ObservedRouter, ScriptedNotifier};
use session_lifecycle::{
    CloseReason, DeleteOutcome, Incarnation, MemoryStore, NewSession, RouterDeleter, RouterId,
    Session, SessionId, SessionKey, SessionStore, session::CloseOutcome, store::AuditReport,
    store::BackendError, store::CreateError, store::FenceError, store::FenceSnapshot,
    store::FinishError, store::FinishReport, store::RegisterError, store::Repair,
    store::RouterCensus, store::RouterError, store::RouterStatus, store::SessionError,
};
use tokio::time::Duration;

type Hook = Box<dyn Fn(RouterId) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A wrapper: a hook run inside `fence_incarnation` (a cascade to child
/// routers), a miscounting `finish`, extra sessions in the snapshot.
#[derive(Default)]
struct Wrap {
    inner: MemoryStore,
    on_fence: OnceLock<Hook>,
    finish_closed: Option<usize>,
    extra_in_snapshot: Mutex<Option<Session>>,
    /// `router_status` is not ready at the first poll (a networked store).
    slow_status: bool,
}

impl SessionStore for Wrap {
    type Payload = ();
    async fn register_router(&self, r: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(r).await
    }
    async fn router_status(&self, r: RouterId) -> Result<RouterStatus, RouterError> {
        if self.slow_status {
            tokio::task::yield_now().await;
        }
        self.inner.router_status(r).await
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        self.inner.get(id).await
    }
    async fn close(&self, id: SessionId, why: CloseReason) -> Result<CloseOutcome, SessionError> {
        self.inner.close(id, why).await
    }
    async fn close_exact(
        &self,
        k: SessionKey,
        why: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(k, why).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, k: SessionKey) -> Result<Session, SessionError> {
        self.inner.remove_exact(k).await
    }
    async fn sessions(&self, r: RouterId) -> Result<Vec<Session>, RouterError> {
        self.inner.sessions(r).await
    }
    async fn count(&self, r: RouterId) -> Result<usize, RouterError> {
        self.inner.count(r).await
    }
    async fn fence(&self, r: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence(r).await
    }
    async fn fence_incarnation(
        &self,
        r: RouterId,
        i: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        if let Some(hook) = self.on_fence.get() {
            hook(r).await;
        }
        let mut snapshot = self.inner.fence_incarnation(r, i).await?;
        if let Some(extra) = self.extra_in_snapshot.lock().unwrap().clone() {
            snapshot.sessions.push(extra);
        }
        Ok(snapshot)
    }
    async fn finish(&self, r: RouterId, i: Incarnation) -> Result<FinishReport, FinishError> {
        let mut report = self.inner.finish(r, i).await?;
        if let Some(closed) = self.finish_closed {
            report.closed = closed;
        }
        Ok(report)
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.inner.audit().await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.inner.census().await
    }
    async fn repair(&self, f: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.inner.repair(f).await
    }
}

type Deleter = RouterDeleter<Wrap, Arc<ScriptedNotifier<Wrap>>>;

fn deleter(store: &Arc<Wrap>, confirm: Notify, cap: Option<usize>) -> Deleter {
    let notifier = ScriptedNotifier::always(Arc::clone(store), confirm);
    let mut builder = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .retries(1);
    if let Some(cap) = cap {
        builder = builder.max_concurrent(cap);
    }
    builder.build(Arc::clone(store), notifier).unwrap()
}

/// The store's `fence` of each router in `cascade` awaits the deletion of
/// its child ("awaiting the deletion of another router is fine").
fn cascade_on_fence(store: &Wrap, deleter: &Deleter, cascade: Vec<(RouterId, RouterId)>) {
    let cascade = cascade.into_iter().map(|(p, c)| (p, Some(c))).collect();
    drop(gated_cascade_on_fence(store, deleter, cascade, true));
}

/// Where a gated cascade's fences report (`fences`), and what lets them
/// go on (`go`).
struct Gate {
    fences: tokio::sync::mpsc::UnboundedReceiver<RouterId>,
    go: tokio::sync::watch::Sender<bool>,
}

/// The store's `fence` of each parent in `cascade` reports to the gate,
/// waits until it is open (at once if `open`), then awaits the deletion
/// of its child, if it has one.
fn gated_cascade_on_fence(
    store: &Wrap,
    deleter: &Deleter,
    cascade: Vec<(RouterId, Option<RouterId>)>,
    open: bool,
) -> Gate {
    let (entered, fences) = tokio::sync::mpsc::unbounded_channel();
    let (go, went) = tokio::sync::watch::channel(open);
    let d = deleter.clone();
    let _ = store.on_fence.set(Box::new(move |router| {
        let (d, entered, mut went) = (d.clone(), entered.clone(), went.clone());
        let parent = cascade.iter().find(|(p, _)| *p == router).map(|(_, c)| *c);
        Box::pin(async move {
            let Some(child) = parent else {
                return;
            };
            let _ = entered.send(router);
            let _ = went.wait_for(|go| *go).await;
            if let Some(child) = child {
                let _ = d.delete(child).await;
            }
        })
    }));
    Gate { fences, go }
}

// --- Finding 1: max_concurrent + a store awaiting another router's deletion

#[tokio::test(start_paused = true)]
async fn a_store_cascading_to_a_child_deletion_finishes_past_max_concurrent_1() {
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let store = Arc::new(Wrap::default());
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let ob = ObservedRouter::fill(&*store, b, 100, 4).await;
    let deleter = deleter(&store, Notify::confirm_all(), Some(1));
    cascade_on_fence(&store, &deleter, vec![(a, b)]);
    let limit = deleter.max_wait(8) * 4 + Duration::from_secs(3600);
    let outcome = tokio::time::timeout(limit, deleter.delete(a)).await;
    assert!(
        outcome.is_ok(),
        "delete(A) hangs: running {}, queued {}",
        deleter.running(),
        deleter.queued()
    );
    oa.assert_deleted(&*store).await;
    ob.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn parents_cascading_to_children_finish_past_max_concurrent_2() {
    let r = RouterId::new;
    let store = Arc::new(Wrap::default());
    let mut all = Vec::new();
    for (i, router) in [r(1), r(2), r(11), r(12)].into_iter().enumerate() {
        all.push(ObservedRouter::fill(&*store, router, i as u64 * 100, 4).await);
    }
    let deleter = deleter(&store, Notify::confirm_all(), Some(2));
    cascade_on_fence(&store, &deleter, vec![(r(1), r(11)), (r(2), r(12))]);
    let limit = deleter.max_wait(4) * 8 + Duration::from_secs(3600);
    let both = tokio::time::timeout(limit, async {
        tokio::join!(deleter.delete(r(1)), deleter.delete(r(2)))
    })
    .await;
    assert!(
        both.is_ok(),
        "mass deletion hangs: running {}, queued {}",
        deleter.running(),
        deleter.queued()
    );
    for o in all {
        o.assert_deleted(&*store).await;
    }
}

// --- Finding 2: a miscounting finish report panics the run

#[tokio::test(start_paused = true)]
async fn an_absurd_finish_count_saturates_and_the_router_is_deleted() {
    let a = RouterId::new(1);
    let store = Arc::new(Wrap {
        finish_closed: Some(usize::MAX),
        ..Wrap::default()
    });
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let deleter = deleter(&store, Notify::confirm_all(), None);
    let outcome = deleter.delete(a).await;
    let status = store.router_status(a).await;
    assert!(
        matches!(outcome, Ok(DeleteOutcome::Deleted(_))),
        "delete answered {outcome:?} while the router is {status:?}"
    );
    oa.assert_deleted(&*store).await;
}

// --- Note (hardening): a snapshot listing another router's session

#[tokio::test(start_paused = true)]
async fn a_snapshot_listing_another_routers_session_leaves_it_alone() {
    let (a, c) = (RouterId::new(1), RouterId::new(3));
    let store = Arc::new(Wrap::default());
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let oc = ObservedRouter::fill(&*store, c, 100, 1).await;
    let foreign = oc.sessions[0].clone();
    *store.extra_in_snapshot.lock().unwrap() = Some(foreign.clone());
    let deleter = deleter(
        &store,
        Notify::Confirm(session_lifecycle::test_util::Subset::None),
        None,
    );
    let _ = deleter.delete(a).await;
    oa.assert_deleted(&*store).await;
    assert!(
        !foreign.is_closed(),
        "deleting A closed C's {foreign:?}: {:?}",
        foreign.close_reason()
    );
}

/// The children's deletions wait for a slot while their parents (holding
/// both slots) are in their store's fence, which then awaits them: a nested
/// caller joining a waiting run lets it go without a slot.
#[tokio::test(start_paused = true)]
async fn children_waiting_for_a_slot_are_let_go_when_their_parents_await_them() {
    let r = RouterId::new;
    let store = Arc::new(Wrap::default());
    let mut all = Vec::new();
    for (i, router) in [r(1), r(2), r(11), r(12)].into_iter().enumerate() {
        all.push(ObservedRouter::fill(&*store, router, i as u64 * 100, 4).await);
    }
    let deleter = deleter(&store, Notify::confirm_all(), Some(2));
    let cascade = vec![(r(1), Some(r(11))), (r(2), Some(r(12)))];
    let Gate { mut fences, go } = gated_cascade_on_fence(&store, &deleter, cascade, false);
    let limit = deleter.max_wait(4) * 8 + Duration::from_secs(3600);
    let parents = [r(1), r(2)].map(|p| tokio::spawn(deleter.delete(p)));
    for _ in 0..2 {
        fences.recv().await.expect("a parent fences");
    }
    let children = [r(11), r(12)].map(|c| tokio::spawn(deleter.delete(c)));
    tokio::task::yield_now().await;
    assert_eq!(
        (deleter.running(), deleter.queued()),
        (4, 2),
        "the children wait for a slot"
    );
    go.send_replace(true);
    let all_four = tokio::time::timeout(limit, async {
        let mut outcomes = Vec::new();
        for run in parents.into_iter().chain(children) {
            outcomes.push(run.await.unwrap());
        }
        outcomes
    })
    .await;
    assert!(
        all_four.is_ok(),
        "the deletions hang: running {}, queued {}",
        deleter.running(),
        deleter.queued()
    );
    for outcome in all_four.unwrap() {
        assert!(
            matches!(outcome, Ok(DeleteOutcome::Deleted(_))),
            "{outcome:?}"
        );
    }
    for o in all {
        o.assert_deleted(&*store).await;
    }
}

/// The cap still holds for deletions that are not nested: two at most run
/// at once, the others queue.
#[tokio::test(start_paused = true)]
async fn deletions_that_are_not_nested_still_wait_for_a_slot() {
    let store = Arc::new(Wrap::default());
    let mut all = Vec::new();
    for i in 0..4u64 {
        all.push(ObservedRouter::fill(&*store, RouterId::new(i + 1), i * 100, 4).await);
    }
    // Confirms nothing: each run lasts its confirm timeout.
    let deleter = deleter(
        &store,
        Notify::Confirm(session_lifecycle::test_util::Subset::None),
        Some(2),
    );
    let runs: Vec<_> = (1..=4u64)
        .map(|i| tokio::spawn(deleter.delete(RouterId::new(i))))
        .collect();
    tokio::task::yield_now().await;
    assert_eq!((deleter.running(), deleter.queued()), (4, 2));
    for run in runs {
        assert!(matches!(run.await.unwrap(), Ok(DeleteOutcome::Deleted(_))));
    }
    for o in all {
        o.assert_deleted(&*store).await;
    }
}

/// A networked store (its `router_status` is not ready at the first poll)
/// whose fence of a parent awaits `delete(child)`: the documented cascade.
/// `max_concurrent(1)`: the nested deletion must take no slot.
#[tokio::test(start_paused = true)]
async fn nested_delete_on_a_store_that_answers_later_takes_no_slot() {
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let store = Arc::new(Wrap {
        slow_status: true,
        ..Wrap::default()
    });
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let ob = ObservedRouter::fill(&*store, b, 100, 4).await;
    let deleter = deleter(&store, Notify::confirm_all(), Some(1));
    cascade_on_fence(&store, &deleter, vec![(a, b)]);
    delete_parent_with_its_child(&deleter, &store, a, [oa, ob]).await;
}

/// `queued()` counts runs waiting for a slot. A run waiting for one whose
/// runtime is dropped is gone (`running()` forgets it): `queued()` must too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_run_dropped_with_its_runtime_is_counted_out_of_queued() {
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let store = Arc::new(Wrap::default());
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let _ob = ObservedRouter::fill(&*store, b, 100, 4).await;
    let deleter = deleter(&store, Notify::confirm_all(), Some(1));
    // A's fence waits for `go`: A holds the only slot meanwhile.
    let Gate { mut fences, go } = gated_cascade_on_fence(&store, &deleter, vec![(a, None)], false);
    let first = tokio::spawn(deleter.delete(a));
    fences.recv().await.expect("A fences");
    // B's deletion starts on a runtime of its own, queues, and the runtime
    // is dropped with it.
    let d = deleter.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _held = tokio::spawn(d.delete(b));
            for _ in 0..1000 {
                if d.queued() == 1 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(d.queued(), 1, "B waits for a slot");
        });
        drop(rt);
    })
    .join()
    .unwrap();
    go.send_replace(true);
    let outcome = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("A ends")
        .unwrap();
    assert!(
        matches!(outcome, Ok(DeleteOutcome::Deleted(_))),
        "{outcome:?}"
    );
    oa.assert_deleted(&*store).await;
    // A's run left the count before its answer; B's went with its runtime.
    assert_eq!(
        (deleter.running(), deleter.queued()),
        (0, 0),
        "nothing runs or waits any more"
    );
}

/// A nested `delete(B)` (from A's fence, A holding the only slot) finds a
/// run of B's previous incarnation waiting for a slot: it must be let go,
/// and B's current incarnation deleted after it.
#[tokio::test(start_paused = true)]
async fn nested_delete_behind_a_queued_run_of_another_incarnation() {
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let store = Arc::new(Wrap::default());
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let ob1 = ObservedRouter::fill(&*store, b, 100, 4).await;
    let old = ob1.incarnation;
    let deleter = deleter(&store, Notify::confirm_all(), Some(1));
    assert!(matches!(
        deleter.delete(b).await,
        Ok(DeleteOutcome::Deleted(_))
    ));
    ob1.assert_deleted(&*store).await;
    let ob2 = ObservedRouter::fill(&*store, b, 200, 4).await;
    let Gate { mut fences, go } =
        gated_cascade_on_fence(&store, &deleter, vec![(a, Some(b))], false);
    let parent = tokio::spawn(deleter.delete(a));
    fences.recv().await.expect("A fences");
    // A late, duplicate request for B's old life: queued behind A.
    let late = tokio::spawn(deleter.delete_incarnation(b, old));
    tokio::task::yield_now().await;
    assert_eq!(deleter.queued(), 1);
    go.send_replace(true);
    let limit = deleter.max_wait(8) * 8 + Duration::from_secs(3600);
    let both = tokio::time::timeout(limit, async { (parent.await, late.await) }).await;
    assert!(
        both.is_ok(),
        "hangs: running {}, queued {}",
        deleter.running(),
        deleter.queued()
    );
    oa.assert_deleted(&*store).await;
    ob2.assert_deleted(&*store).await;
}

/// The notifier of a parent router awaits its child's deletion (a cascade
/// from the notifier, as `max_concurrent`'s docs allow), on a store whose
/// `router_status` is not ready at the first poll.
struct CascadingNotifier {
    store: Arc<Wrap>,
    deleter: OnceLock<RouterDeleter<Wrap, Arc<CascadingNotifier>>>,
}

impl session_lifecycle::TerminationNotifier for CascadingNotifier {
    async fn notify(
        &self,
        batch: session_lifecycle::TerminationBatch,
    ) -> Result<(), session_lifecycle::NotifyError> {
        if batch.router == RouterId::new(1)
            && let Some(d) = self.deleter.get()
        {
            let _ = d.delete(RouterId::new(2)).await;
        }
        for key in batch.sessions {
            let _ = self
                .store
                .close_exact(key, CloseReason::RouterDeleted)
                .await;
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn nested_delete_from_the_notifier_on_a_store_that_answers_later() {
    notifier_cascade(true).await;
}

/// Control: the same on a store that answers at once.
#[tokio::test(start_paused = true)]
async fn control_nested_delete_from_the_notifier_on_a_store_that_answers_at_once() {
    notifier_cascade(false).await;
}

async fn notifier_cascade(slow_status: bool) {
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let store = Arc::new(Wrap {
        slow_status,
        ..Wrap::default()
    });
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let ob = ObservedRouter::fill(&*store, b, 100, 4).await;
    let notifier = Arc::new(CascadingNotifier {
        store: Arc::clone(&store),
        deleter: OnceLock::new(),
    });
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .retries(1)
        .max_concurrent(1)
        .build(Arc::clone(&store), Arc::clone(&notifier))
        .unwrap();
    let _ = notifier.deleter.set(deleter.clone());
    delete_parent_with_its_child(&deleter, &store, a, [oa, ob]).await;
}

/// A shutdown while a parent (holding the only slot) waits to cascade to a
/// child whose own deletion is queued: the child is promoted, both end,
/// and the shutdown returns.
#[tokio::test(start_paused = true)]
async fn shutdown_with_a_promoted_child() {
    let (a, b) = (RouterId::new(1), RouterId::new(2));
    let store = Arc::new(Wrap::default());
    let oa = ObservedRouter::fill(&*store, a, 0, 4).await;
    let ob = ObservedRouter::fill(&*store, b, 100, 4).await;
    let deleter = deleter(&store, Notify::confirm_all(), Some(1));
    let Gate { mut fences, go } =
        gated_cascade_on_fence(&store, &deleter, vec![(a, Some(b))], false);
    let parent = tokio::spawn(deleter.delete(a));
    fences.recv().await.expect("A fences");
    let child = tokio::spawn(deleter.delete(b));
    tokio::task::yield_now().await;
    assert_eq!((deleter.running(), deleter.queued()), (2, 1));
    let shutdown = tokio::spawn({
        let d = deleter.clone();
        async move { d.shutdown().await }
    });
    tokio::task::yield_now().await;
    go.send_replace(true);
    let limit = deleter.max_wait(8) * 8 + Duration::from_secs(3600);
    let all = tokio::time::timeout(limit, async {
        (
            parent.await.unwrap(),
            child.await.unwrap(),
            shutdown.await.unwrap(),
        )
    })
    .await
    .expect("everything ends");
    assert!(
        matches!(all.0, Ok(DeleteOutcome::Deleted(_))),
        "{:?}",
        all.0
    );
    assert!(
        matches!(all.1, Ok(DeleteOutcome::Deleted(_))),
        "{:?}",
        all.1
    );
    assert_eq!((deleter.running(), deleter.queued()), (0, 0));
    oa.assert_deleted(&*store).await;
    ob.assert_deleted(&*store).await;
}

/// Deletes `parent` (whose deletion cascades to its child's), with a hang
/// detector; both routers end deleted, and the nested deletion took no
/// slot: it ended inside the parent's notify, which then confirmed the
/// parent's 4 sessions, none forced.
async fn delete_parent_with_its_child<N: session_lifecycle::TerminationNotifier>(
    deleter: &RouterDeleter<Wrap, N>,
    store: &Wrap,
    parent: RouterId,
    routers: [ObservedRouter<()>; 2],
) {
    let limit = deleter.max_wait(8) * 4 + Duration::from_secs(3600);
    let outcome = tokio::time::timeout(limit, deleter.delete(parent)).await;
    assert!(
        outcome.is_ok(),
        "delete(A) hangs: running {}, queued {}",
        deleter.running(),
        deleter.queued()
    );
    let outcome = outcome.unwrap();
    let report = outcome.as_ref().ok().and_then(|o| o.report()).cloned();
    for router in routers {
        router.assert_deleted(store).await;
    }
    let report = report.expect("A deleted");
    assert_eq!(
        (report.confirmed, report.forced),
        (4, 0),
        "A's notify waited for a slot its own run held, until notify_timeout: {report:?}"
    );
}
