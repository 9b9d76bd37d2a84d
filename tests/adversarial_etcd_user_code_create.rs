//! Review of stop 35 (contained drops, etcd): the store's `create`
//! replaces a cached older life of the id (deleted by another controller,
//! the watch not caught up yet) and let the old handle go by plain drop
//! glue after closing it. When that was the last handle, its payload's
//! `Drop` (user code) ran there uncontained and the panic escaped
//! `create`.
#![cfg(all(feature = "etcd", feature = "test-util"))]

mod etcd_support;

use std::sync::atomic::Ordering;

use etcd_support::{ARMED, Armed, FIRED, endpoints, store_on_suite, unique_prefix};
use futures::FutureExt;
use session_lifecycle::etcd::EtcdStore;
use session_lifecycle::{NewSession, RouterId, SessionId, SessionStore};

async fn store(prefix: &str) -> EtcdStore<Armed> {
    store_on_suite(prefix).await
}

const R: RouterId = RouterId::new(21);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_create_replacing_a_stale_cached_life_contains_its_payload_drop() {
    if endpoints().is_none() {
        return;
    }
    let prefix = unique_prefix("rv-diff-create-previous");
    let a = store(&prefix).await;
    let b = store(&prefix).await;
    let incarnation = a.register_router(R).await.unwrap();
    let id = SessionId::new(1);
    // Controller A creates the session; its client lets the handle go:
    // A's cache holds the last one.
    drop(
        a.create(NewSession::new(id, R, incarnation).payload(Armed(1)))
            .await
            .unwrap(),
    );
    // A's watch falls behind (a slow link, say).
    let suspended = a.suspend_watch();
    // Controller B removes the session (its record and pointer).
    let on_b = b.get(id).await.unwrap().expect("B reads it");
    let removed = b.remove(id).await.expect("B removes it");
    drop((on_b, removed));
    // A's client creates the id again: A's cache still holds the old life.
    ARMED.store(1, Ordering::SeqCst);
    let created = std::panic::AssertUnwindSafe(
        a.create(NewSession::new(id, R, incarnation).payload(Armed(2))),
    )
    .catch_unwind()
    .await;
    ARMED.store(0, Ordering::SeqCst);
    drop(suspended);
    let fired = FIRED.load(Ordering::SeqCst);
    let created = created.unwrap_or_else(|_| {
        panic!(
            "the old life's payload Drop (fired {fired}) panicked out of `create`: \
             the new session was created in etcd, its caller got a panic"
        )
    });
    let session = created.expect("created");
    assert_eq!(fired, 1, "the old life's payload was let go (its Drop ran)");
    drop(session);
}
