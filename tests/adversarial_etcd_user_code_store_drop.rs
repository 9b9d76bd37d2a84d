//! Review of the etcd store (stop 35): the handle cache
//! (`Shared::cache`, a `DashMap<SessionId, Cached<P>>`) is let go by plain
//! drop glue when the last `Arc<Shared>` goes (`impl Drop for Shared`
//! only cancels the tasks). The cache holds the last handle of every
//! session the controller no longer holds elsewhere: each such handle's
//! payload `Drop` (user code) runs there, uncontained, and two that panic
//! abort the process (a panic while unwinding), whoever drops the store:
//! the controller at shutdown, or a background task of the store that
//! held the last `Arc<Shared>` (the removal task `close_session` spawns,
//! the watch while it applies a response).
#![cfg(feature = "etcd")]

mod etcd_support;
mod user_code_support;

use std::sync::atomic::Ordering;

use etcd_support::{ARMED, Armed, FIRED, endpoints, store_on_suite, unique_prefix};
use futures::FutureExt;
use session_lifecycle::etcd::EtcdStore;
use session_lifecycle::{CloseReason, NewSession, RouterId, SessionId, SessionStore};
use tokio::time::Duration;

async fn store(prefix: &str) -> EtcdStore<Armed> {
    store_on_suite(prefix).await
}

const R: RouterId = RouterId::new(11);

/// Sessions `ids` created on `store`, their handles let go at once: the
/// cache holds the last handle of each.
async fn cached_only(store: &EtcdStore<Armed>, ids: &[u64]) {
    let incarnation = match store.register_router(R).await {
        Ok(incarnation) => incarnation,
        Err(_) => match store.router_status(R).await.unwrap() {
            session_lifecycle::store::RouterStatus::Live(incarnation) => incarnation,
            other => panic!("{other:?}"),
        },
    };
    for &id in ids {
        let spec = NewSession::new(SessionId::new(id), R, incarnation).payload(Armed(id));
        drop(store.create(spec).await.unwrap());
    }
    assert_eq!(store.cached(), ids.len());
}

/// The controller drops its store (a shutdown) while the cache holds the
/// last handles of two sessions whose payloads' `Drop`s panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by its parent test"]
async fn scenario_store_dropped_with_two_panicking_payloads_cached() {
    let prefix = unique_prefix("rv-etcd2-store-drop");
    let store = store(&prefix).await;
    cached_only(&store, &[1, 2]).await;
    ARMED.store(2, Ordering::SeqCst);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(store)));
    ARMED.store(0, Ordering::SeqCst);
    assert!(
        dropped.is_ok(),
        "a payload's Drop panic escaped the store's drop"
    );
    assert_eq!(FIRED.load(Ordering::SeqCst), 2);
}

#[test]
fn own_etcd_dropping_the_store_with_panicking_cached_payloads_does_not_abort() {
    if endpoints().is_none() {
        return;
    }
    user_code_support::in_child("scenario_store_dropped_with_two_panicking_payloads_cached");
}

/// The same, in the store's own background task: `remove` of a session
/// whose close by another caller is still releasing spawns a task that
/// holds an `Arc<Shared>` until the release ends; the controller drops its
/// store meanwhile; that task lets the cache go, in a runtime worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by its parent test"]
async fn scenario_removal_task_lets_the_cache_go() {
    let prefix = unique_prefix("rv-etcd2-task-drop");
    let store = store(&prefix).await;
    cached_only(&store, &[100, 1, 2]).await;
    let slow = store.get(SessionId::new(100)).await.unwrap().unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    slow.attach(move |_: CloseReason| {
        let _ = released.recv();
    })
    .unwrap();
    // Another caller's close, its release still running.
    let closer = {
        let slow = slow.clone();
        std::thread::spawn(move || slow.close(CloseReason::ClientClosed))
    };
    while !slow.is_closed() {
        std::thread::yield_now();
    }
    // Returns at once; the record goes in a task once the close completes.
    let removed = store.remove(SessionId::new(100)).await.unwrap();
    drop(removed);
    drop(slow);
    drop(store); // the removal task holds the last `Arc<Shared>` now
    ARMED.store(2, Ordering::SeqCst);
    release.send(()).unwrap();
    let _ = closer.join().unwrap();
    // The task ends: it lets the cache (the last handles of 1 and 2) go.
    for _ in 0..100 {
        if FIRED.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    ARMED.store(0, Ordering::SeqCst);
    assert_eq!(
        FIRED.load(Ordering::SeqCst),
        2,
        "the cached payloads were dropped"
    );
}

#[test]
fn own_etcd_a_store_task_letting_the_cache_go_does_not_abort() {
    if endpoints().is_none() {
        return;
    }
    user_code_support::in_child("scenario_removal_task_lets_the_cache_go");
}

/// The same family, one handle: `get` of a session whose cached handle is
/// closed reads etcd, finds the record gone, and removes the cache entry
/// (`reads.rs`, `handle`: `self.cache.remove_if(..)`), the entry dropped
/// by plain glue: the last handle's payload `Drop` panics out of `get`
/// (which should answer `Ok(None)`), where every other path of the store
/// contains it (`close_all_quietly`). B's watch is held away so that the
/// removal by A reaches B through `get` first (a lagging watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_get_letting_a_stale_cached_handle_go_does_not_panic() {
    if endpoints().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let prefix = unique_prefix("rv-etcd2-stale-get");
    let a: EtcdStore<etcd_support::Calm> = EtcdStore::builder()
        .endpoints(endpoints().unwrap())
        .prefix(prefix.clone())
        .connect()
        .await
        .unwrap();
    let b = store(&prefix).await;
    let incarnation = b.register_router(R).await.unwrap();
    let spec = NewSession::new(SessionId::new(1), R, incarnation).payload(Armed(1));
    let session = b.create(spec).await.unwrap();
    let _ = session.close(CloseReason::ClientClosed);
    b.flush().await.unwrap();
    drop(session); // B's cache holds the last handle, closed
    let suspended = b.suspend_watch();
    drop(a.remove(SessionId::new(1)).await.unwrap());
    FIRED.store(0, Ordering::SeqCst);
    ARMED.store(1, Ordering::SeqCst);
    let got = std::panic::AssertUnwindSafe(b.get(SessionId::new(1)))
        .catch_unwind()
        .await;
    ARMED.store(0, Ordering::SeqCst);
    drop(suspended);
    assert_eq!(
        FIRED.load(Ordering::SeqCst),
        1,
        "the last handle was let go"
    );
    let got = got.expect("a payload's Drop panic escaped `get`");
    assert!(
        matches!(got, Ok(None)),
        "{:?}",
        got.map(|s| s.map(|s| s.id()))
    );
}

/// The in-process tests share the statics above: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
