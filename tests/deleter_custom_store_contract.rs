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
}

impl SessionStore for Wrap {
    type Payload = ();
    async fn register_router(&self, r: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(r).await
    }
    async fn router_status(&self, r: RouterId) -> Result<RouterStatus, RouterError> {
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
/// The store's fence of a parent awaits its child's deletion.
fn cascade_on_fence(store: &Wrap, deleter: &Deleter, cascade: Vec<(RouterId, RouterId)>) {
    let d = deleter.clone();
    let _ = store.on_fence.set(Box::new(move |router| {
        let d = d.clone();
        let child = cascade.iter().find(|(p, _)| *p == router).map(|(_, c)| *c);
        Box::pin(async move {
            if let Some(child) = child {
                let _ = d.delete(child).await;
            }
        })
    }));
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
    let (entered, mut fences) = tokio::sync::mpsc::unbounded_channel();
    let (go, went) = tokio::sync::watch::channel(false);
    let d = deleter.clone();
    let _ = store.on_fence.set(Box::new(move |router| {
        let (d, entered, mut went) = (d.clone(), entered.clone(), went.clone());
        let child = [(r(1), r(11)), (r(2), r(12))]
            .into_iter()
            .find(|(p, _)| *p == router)
            .map(|(_, c)| c);
        Box::pin(async move {
            if let Some(child) = child {
                let _ = entered.send(router);
                let _ = went.wait_for(|go| *go).await;
                let _ = d.delete(child).await;
            }
        })
    }));
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
