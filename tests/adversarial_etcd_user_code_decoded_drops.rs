//! Review of the etcd store (stop 35): a payload *decoded* by the store
//! (not the handle's own payload: a fresh copy `EtcdPayload::decode` made)
//! was let go by plain drop glue, its `Drop` (user code) uncontained:
//!
//! - `Shared::adopt` (cache.rs) pushes the records it does not make into
//!   handles (their id already cached: every listing of sessions this
//!   controller holds) into `discards` and lets them go with
//!   `drop(discards)`: two `Drop`s that panic abort the process (a panic
//!   while unwinding); one is let out of `sessions`, `get`, and the
//!   deleter's `fence` (the deletion ends `Interrupted`).
//! - `finish` (finish.rs, `delete_listed`) decodes every deleted record
//!   whole (`decode::<P>`) to learn whether it was open, and drops the
//!   payload it made: a `Drop` that panics ends the deletion
//!   `Interrupted`, its records gone, the router left fenced.
//!
//! A `MemoryStore` runs no such `Drop` at all in these paths.
#![cfg(feature = "etcd")]

mod etcd_support;
mod user_code_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_support::{ARMED, Armed, FIRED, endpoints, store_on_suite, unique_prefix};
use futures::FutureExt;
use session_lifecycle::etcd::EtcdStore;
use session_lifecycle::{
    NewSession, NotifyError, RouterDeleter, RouterId, SessionId, SessionStore, TerminationBatch,
    TerminationNotifier,
};
use tokio::time::{Duration, timeout};

/// The tests share the statics above: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn store(prefix: &str) -> EtcdStore<Armed> {
    store_on_suite(prefix).await
}

const R: RouterId = RouterId::new(7);

/// Two sessions created (so cached) on `store`; their handles.
async fn two_sessions(store: &EtcdStore<Armed>) -> Vec<session_lifecycle::Session<Armed>> {
    let incarnation = store.register_router(R).await.unwrap();
    let mut held = Vec::new();
    for id in [1u64, 2] {
        let spec = NewSession::new(SessionId::new(id), R, incarnation).payload(Armed(id));
        held.push(store.create(spec).await.unwrap());
    }
    held
}

/// The scenario run in a child process: a listing of two cached sessions
/// whose decoded copies' `Drop`s both panic. `drop(discards)` in `adopt`
/// runs the second while the first unwinds: the process aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by its parent test"]
async fn scenario_two_decoded_payload_drops_in_a_listing() {
    let prefix = unique_prefix("rv-etcd2-discards");
    let store = store(&prefix).await;
    let held = two_sessions(&store).await;
    ARMED.store(2, Ordering::SeqCst);
    let listed = std::panic::AssertUnwindSafe(store.sessions(R))
        .catch_unwind()
        .await;
    ARMED.store(0, Ordering::SeqCst);
    let listed = listed.expect("a payload's Drop panic escaped `sessions`");
    assert_eq!(listed.unwrap().len(), 2);
    drop(held);
}

#[test]
fn own_etcd_two_decoded_payload_drops_in_a_listing_do_not_abort() {
    if endpoints().is_none() {
        return;
    }
    user_code_support::in_child("scenario_two_decoded_payload_drops_in_a_listing");
}

/// A router that takes notices and never confirms (the deletion forces).
struct Deaf;

impl TerminationNotifier for Deaf {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// Arms `Armed` once, when it is first notified: after the fence, before
/// `finish`.
struct ArmOnNotice(AtomicUsize);

impl TerminationNotifier for ArmOnNotice {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        if self.0.swap(0, Ordering::SeqCst) > 0 {
            ARMED.store(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn deleter<N: TerminationNotifier>(
    store: &Arc<EtcdStore<Armed>>,
    notifier: N,
) -> RouterDeleter<EtcdStore<Armed>, Arc<N>> {
    RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(200))
        .retries(0)
        .build(Arc::clone(store), Arc::new(notifier))
        .expect("valid settings")
}

/// One decoded copy's `Drop` panics in the deleter's fence (`adopt`'s
/// `drop(discards)`): the deletion ends `Interrupted`, the router fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_payload_drop_panicking_in_the_fence_does_not_end_the_deletion() {
    if endpoints().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let prefix = unique_prefix("rv-etcd2-fence-drop");
    let store = Arc::new(store(&prefix).await);
    let held = two_sessions(&store).await;
    FIRED.store(0, Ordering::SeqCst);
    ARMED.store(1, Ordering::SeqCst);
    let deleter = deleter(&store, Deaf);
    let outcome = timeout(Duration::from_secs(15), deleter.delete(R))
        .await
        .expect("the deletion ends");
    ARMED.store(0, Ordering::SeqCst);
    assert_eq!(FIRED.load(Ordering::SeqCst), 1, "the armed Drop ran");
    let status = store.router_status(R).await.unwrap();
    assert!(
        outcome.is_ok(),
        "a payload's Drop panicking (contained elsewhere) ended the deletion: {outcome:?}; \
         the router is left {status:?}"
    );
    drop(held);
}

/// One decoded copy's `Drop` panics in `finish` (`delete_listed` decodes
/// each deleted record whole, then drops it): the deletion ends
/// `Interrupted` after deleting the records, the router left fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_payload_drop_panicking_in_finish_does_not_end_the_deletion() {
    if endpoints().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let prefix = unique_prefix("rv-etcd2-finish-drop");
    let store = Arc::new(store(&prefix).await);
    let held = two_sessions(&store).await;
    FIRED.store(0, Ordering::SeqCst);
    let deleter = deleter(&store, ArmOnNotice(AtomicUsize::new(1)));
    let outcome = timeout(Duration::from_secs(15), deleter.delete(R))
        .await
        .expect("the deletion ends");
    ARMED.store(0, Ordering::SeqCst);
    assert_eq!(FIRED.load(Ordering::SeqCst), 1, "the armed Drop ran");
    let status = store.router_status(R).await.unwrap();
    let left = store.count(R).await.unwrap();
    assert!(
        outcome.is_ok(),
        "a payload's Drop panicking in `finish` ended the deletion: {outcome:?}; \
         the router is left {status:?} with {left} records"
    );
    drop(held);
}
