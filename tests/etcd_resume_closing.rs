//! A resumed deletion on `EtcdStore` waits for a close still releasing
//! (I1), as on `MemoryStore` (`adversarial_runtimes_and_resume.rs`): a
//! duplicate confirmation by key removed the record while the client's
//! close still released, and a second deleter's fence did not list it (a
//! second review round of stop 34; failed before its fix). Runs when
//! `SESSION_LIFECYCLE_ETCD` is set (scripts/etcd-env.sh).
//!
//! And the same wait must not hold the crate's own removals: the pieces
//! (expiry, liveness reaps, reconcile) remove the sessions they closed
//! through the reclaim queue, whose releases may wait (a paused queue);
//! with the wait in removals too, `Lifecycle::shutdown` spent its whole
//! deadline on an expiry close in hand (a third review round; failed
//! before its fix). Removals (`remove`, `remove_exact`) do not wait, but
//! leave the record to a task that deletes it once that close completes:
//! a removal during a deletion reopened the hole (a fourth round).
#![cfg(feature = "etcd")]

mod etcd_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use etcd_support::{endpoints, unique_prefix};
use session_lifecycle::etcd::EtcdStore;
use session_lifecycle::{
    CloseReason, Lifecycle, MemoryStore, NewSession, NotifyError, Resource, ResourceClass,
    RouterDeleter, RouterId, RouterStatus, SessionId, SessionStore, TerminationBatch,
    TerminationNotifier,
};

struct Silent;

impl TerminationNotifier for Silent {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// Silent too, but says it was called (the router is fenced by then).
struct Told(Arc<tokio::sync::Notify>);

impl TerminationNotifier for Told {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        self.0.notify_one();
        Ok(())
    }
}

/// As `a_second_deleter_waits_for_a_close_still_releasing` (memory store,
/// fixed in b957f3e), on `EtcdStore`: a client's close of a fenced
/// router's session is still releasing; a duplicate confirmation by key
/// removes its record; a second deleter (same store, same process) resumes
/// the deletion. Its listing is etcd's records, without that session, so
/// it returns while the release has not run (I1).
#[test]
fn etcd_a_second_deleter_waits_for_a_close_still_releasing() {
    let Some(endpoints) = endpoints() else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let router = RouterId::new(1);
    let released = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (gate, gate_rx) = mpsc::channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let (store, slow, sessions) = runtime.block_on(async {
        let store: Arc<EtcdStore<()>> = Arc::new(
            EtcdStore::builder()
                .endpoints(endpoints.iter().cloned())
                .prefix(unique_prefix("rv-e-resume"))
                .connect()
                .await
                .unwrap(),
        );
        let incarnation = store.register_router(router).await.unwrap();
        let mut sessions = Vec::new();
        for id in 0..3 {
            sessions.push(
                store
                    .create(NewSession::new(SessionId::new(id), router, incarnation))
                    .await
                    .unwrap(),
            );
        }
        let counter = Arc::clone(&released);
        sessions[0]
            .attach(move |_: CloseReason| {
                let _ = entered_tx.send(());
                let _ = gate_rx.lock().unwrap().recv();
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        (store, sessions[0].clone(), sessions)
    });
    let told = Arc::new(tokio::sync::Notify::new());
    let first = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(60))
        .build(Arc::clone(&store), Told(Arc::clone(&told)))
        .unwrap();
    // Quick to give up on a silent router (no renotification): without
    // waiting for the closing session, it returns well before the release
    // is let go.
    let second = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(50))
        .backoff(session_lifecycle::Backoff::new().retries(0))
        .build(Arc::clone(&store), Silent)
        .unwrap();
    runtime.block_on(async {
        // Detached: it fences, tells the router (never answered) and waits.
        drop(tokio::spawn(first.delete(router)));
        told.notified().await;
        assert!(matches!(
            store.router_status(router).await.unwrap(),
            RouterStatus::Fenced(_)
        ));
    });
    // The client's close: its release blocks (on a thread of its own).
    let key = slow.key();
    let closer = {
        let store = Arc::clone(&store);
        let handle = handle.clone();
        std::thread::spawn(move || {
            let _ = handle.block_on(store.close_exact(key, CloseReason::ClientClosed));
        })
    };
    entered.recv().unwrap();
    // A duplicate confirmation by key, on a task of its own: it loses the
    // close. It removed the record at once (before the fix); now it waits
    // for the close to complete first. Given 200 ms to do the former (a
    // timing window, real clock: the store is a real etcd).
    let mut duplicate = runtime.spawn({
        let store = Arc::clone(&store);
        async move {
            let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
        }
    });
    let (outcome, released_then, complete, duplicated) = runtime.block_on(async {
        let duplicated = tokio::time::timeout(Duration::from_millis(200), &mut duplicate)
            .await
            .is_ok();
        // The release is let go 300 ms into the second deletion, which
        // must wait for it (it ends in about 50 ms otherwise).
        let opener = gate.clone();
        drop(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = opener.send(());
        }));
        let outcome = tokio::time::timeout(Duration::from_secs(30), second.delete(router)).await;
        let complete = futures::FutureExt::now_or_never(slow.closed()).is_some();
        (
            outcome,
            released.load(Ordering::SeqCst),
            complete,
            duplicated,
        )
    });
    let _ = gate.send(());
    closer.join().unwrap();
    if !duplicated {
        runtime.block_on(duplicate).unwrap();
    }
    let outcome = outcome
        .expect("the second deletion returned")
        .expect("deleted");
    assert!(sessions.iter().all(|s| s.is_closed()));
    assert_eq!(
        (released_then, complete),
        (1, true),
        "delete returned ({outcome:?}) while a session's release had not run (I1)"
    );
}

/// Queued (not inline); says when its close was won (its `class` is read
/// right after, in the closing task).
struct Queued {
    closing: Arc<tokio::sync::Notify>,
    released: Arc<AtomicUsize>,
}

impl Resource for Queued {
    fn release(self: Box<Self>, _reason: CloseReason) {
        self.released.fetch_add(1, Ordering::SeqCst);
    }
    fn class(&self) -> ResourceClass {
        self.closing.notify_one();
        ResourceClass::Normal
    }
}

async fn scenario<S: SessionStore<Payload = ()>>(store: Arc<S>) -> String {
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Silent)
        .without_sweeper()
        .build()
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    lifecycle.reclaim().pause(); // a maintenance window
    let closing = Arc::new(tokio::sync::Notify::new());
    let released = Arc::new(AtomicUsize::new(0));
    let session = lifecycle
        .create(
            NewSession::new(SessionId::new(1), router, incarnation)
                .expires_in(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    session
        .attach(Queued {
            closing: Arc::clone(&closing),
            released: Arc::clone(&released),
        })
        .unwrap();
    // The expiry monitor closes it (its release queued to the paused queue).
    tokio::time::timeout(Duration::from_secs(10), closing.notified())
        .await
        .expect("the expiry monitor closes the session");
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        lifecycle.shutdown(Duration::from_secs(2)),
    )
    .await
    .expect("shutdown returns");
    format!(
        "complete={} still_running={:?} reclaim_left={} released={}",
        report.is_complete(),
        report.still_running,
        report.reclaim.left.len(),
        released.load(Ordering::SeqCst)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_control_shutdown_completes() {
    let out = scenario(Arc::new(MemoryStore::new())).await;
    assert_eq!(
        out, "complete=true still_running=[] reclaim_left=0 released=1",
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lifecycle_shutdown_with_a_paused_queue_completes() {
    let Some(endpoints) = endpoints() else { return };
    let store: Arc<EtcdStore<()>> = Arc::new(
        EtcdStore::builder()
            .endpoints(endpoints.iter().cloned())
            .prefix(unique_prefix("rv-g-shutdown"))
            .connect()
            .await
            .unwrap(),
    );
    let out = scenario(store).await;
    assert_eq!(
        out, "complete=true still_running=[] reclaim_left=0 released=1",
        "{out}"
    );
}

/// A removal by key of a session whose close (a client's, its release
/// blocked) is still running, during a deletion; a second deleter resumes
/// it. Returns the releases counted when the resumed deletion returned.
fn remove_scenario<S: SessionStore<Payload = ()> + 'static>(
    make: impl std::future::Future<Output = Arc<S>>,
) -> Option<usize> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let router = RouterId::new(1);
    let released = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (gate, gate_rx) = mpsc::channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let (store, slow) = runtime.block_on(async {
        let store = make.await;
        let incarnation = store.register_router(router).await.unwrap();
        let mut sessions = Vec::new();
        for id in 0..3 {
            sessions.push(
                store
                    .create(NewSession::new(SessionId::new(id), router, incarnation))
                    .await
                    .unwrap(),
            );
        }
        let counter = Arc::clone(&released);
        sessions[0]
            .attach(move |_: CloseReason| {
                let _ = entered_tx.send(());
                let _ = gate_rx.lock().unwrap().recv();
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        (store, sessions[0].clone())
    });
    let told = Arc::new(tokio::sync::Notify::new());
    let first = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(60))
        .build(Arc::clone(&store), Told(Arc::clone(&told)))
        .unwrap();
    let second = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(50))
        .backoff(session_lifecycle::Backoff::new().retries(0))
        .build(Arc::clone(&store), Silent)
        .unwrap();
    runtime.block_on(async {
        drop(tokio::spawn(first.delete(router)));
        told.notified().await;
    });
    // A client's close, its release blocked on the gate (thread of its own).
    let key = slow.key();
    let closer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let _ = handle.block_on(store.close_exact(key, CloseReason::ClientClosed));
        })
    };
    entered.recv().unwrap();
    // The controller removes the session by key (a duplicate confirmation
    // handled with `remove_exact`): the public removal path.
    let mut remove = runtime.spawn({
        let store = Arc::clone(&store);
        async move {
            let _ = store.remove_exact(key).await;
        }
    });
    let result = runtime.block_on(async {
        // Bounds, not waits for a condition: a removal that settles first
        // (the fix) is still waiting after them.
        let removed = tokio::time::timeout(Duration::from_secs(2), &mut remove)
            .await
            .is_ok();
        let resumed = tokio::time::timeout(Duration::from_secs(5), second.delete(router)).await;
        let then = released.load(Ordering::SeqCst);
        (removed, resumed.ok().map(|outcome| (outcome.is_ok(), then)))
    });
    let _ = gate.send(());
    closer.join().unwrap();
    if !result.0 {
        runtime.block_on(remove).unwrap();
    }
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), second.delete(router))
            .await
            .expect("the resumed deletion ends once the release ran")
            .expect("deleted");
    });
    result.1.map(|(ok, then)| {
        assert!(ok);
        then
    })
}

#[test]
fn memory_store_resumed_delete_waits_for_a_release_behind_a_remove() {
    let then = remove_scenario(async { Arc::new(MemoryStore::<()>::new()) });
    assert_ne!(then, Some(0), "delete returned before the release ran (I1)");
}

#[test]
fn etcd_resumed_delete_waits_for_a_release_behind_a_remove() {
    let Some(endpoints) = endpoints() else { return };
    let then = remove_scenario(async move {
        Arc::new(
            EtcdStore::<()>::builder()
                .endpoints(endpoints.iter().cloned())
                .prefix(unique_prefix("rv-h-remove"))
                .connect()
                .await
                .unwrap(),
        )
    });
    assert_ne!(then, Some(0), "delete returned before the release ran (I1)");
}
