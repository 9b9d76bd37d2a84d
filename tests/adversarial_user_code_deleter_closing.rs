//! Review of stop 35 (user code the crate runs): a deletion's `closing`
//! sessions (closed by someone else, their close still in flight when
//! marked) were held in a plain `Vec` of the run; a `finish` that failed
//! returned early and dropped them by drop glue.
#![cfg(feature = "test-util")]

mod user_code_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::test_util::within;
use session_lifecycle::{
    CloseReason, NewSession, ReclaimQueue, RouterDeleter, SessionId, SessionStore,
};
use tokio::time::Duration;
use user_code_support::{Deaf, Loud, R, Wrap, in_child, loud};

const HOUR: Duration = Duration::from_secs(3_600);

/// Two sessions the client closed through a paused reclaim queue (closed,
/// releases queued) and let go; the router is deleted meanwhile: the run
/// keeps them in `closing` and waits for their closes. The store's
/// `finish` does its work (dropping the store's handles) and then answers
/// a backend error (its reply lost): the run returns early, and its
/// `closing` handles (the last ones) drop by glue. The first payload panic
/// unwinds the run (caught by the driver as `Interrupted`), the second
/// aborts the process.
#[tokio::test(start_paused = true)]
#[ignore = "run in a child process by the test below"]
async fn scenario_deleter_closing_dropped_on_finish_error() {
    let store: Arc<Wrap<Loud>> = Arc::new(Wrap::default());
    let incarnation = store.register_router(R).await.unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let queue = ReclaimQueue::builder().paused(true).build().unwrap();
    for id in 1..=2 {
        let spec = NewSession::new(SessionId::new(id), R, incarnation).payload(loud(true, &drops));
        let session = store.create(spec).await.unwrap();
        session.attach(|_: CloseReason| {}).unwrap();
        assert!(
            queue
                .close_session(&session, CloseReason::ClientClosed)
                .await
                .won()
        );
        // The client lets its handle go.
    }
    store.fail_finish.store(true, Ordering::SeqCst);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .build(Arc::clone(&store), Deaf)
        .unwrap();
    let deleting = tokio::spawn(deleter.delete(R));
    // The run marks them and waits for their closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    queue.resume();
    let outcome = within(HOUR, deleting).await.expect("the deletion's task");
    eprintln!("outcome: {outcome:?}");
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both payloads dropped");
    let error = outcome.expect_err("finish failed");
    assert!(
        error.to_string().contains("lost") || format!("{error:?}").contains("Lost"),
        "the store's error is reported, not `Interrupted`: {error:?}"
    );
}

#[test]
fn deleter_closing_dropped_on_finish_error_is_contained() {
    in_child("scenario_deleter_closing_dropped_on_finish_error");
}

/// As above with one payload that panics: no abort, but the run's panic
/// replaces its outcome: the store's error is lost, the caller is told
/// `Interrupted`.
#[tokio::test(start_paused = true)]
async fn one_payload_panic_in_a_deletions_closing_replaces_its_outcome() {
    let store: Arc<Wrap<Loud>> = Arc::new(Wrap::default());
    let incarnation = store.register_router(R).await.unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let queue = ReclaimQueue::builder().paused(true).build().unwrap();
    for id in 1..=2 {
        let spec =
            NewSession::new(SessionId::new(id), R, incarnation).payload(loud(id == 1, &drops));
        let session = store.create(spec).await.unwrap();
        session.attach(|_: CloseReason| {}).unwrap();
        assert!(
            queue
                .close_session(&session, CloseReason::ClientClosed)
                .await
                .won()
        );
    }
    store.fail_finish.store(true, Ordering::SeqCst);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .build(Arc::clone(&store), Deaf)
        .unwrap();
    let deleting = tokio::spawn(deleter.delete(R));
    tokio::time::sleep(Duration::from_millis(100)).await;
    queue.resume();
    let outcome = within(HOUR, deleting).await.expect("the deletion's task");
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both payloads dropped");
    let error = outcome.expect_err("finish failed");
    assert!(
        format!("{error:?}").contains("Lost"),
        "the store's error is reported, not the payload's panic: {error:?}"
    );
}
