//! Deletions and their reclaim queue across runtimes, and resumed runs
//! (a review of the deleter, stop 34). Each test failed before its fix.
//!
//! - A resumed deletion (its first run cut with its runtime, or a second
//!   deleter on the same store) skipped a session whose close was still
//!   releasing its resources (a client won the close, a duplicate
//!   confirmation unlinked it), and returned before that release ran (I1).
//! - A deleter wired with a reclaim queue outlives the runtime it was built
//!   on, but the queue's workers died with it: a deletion on a new runtime
//!   queued its forced releases to nobody and never returned (I4, I1).
//! - A run started on a current-thread runtime that was then left idle
//!   (its `block_on` timed out) and joined from another runtime waited for
//!   timers of the idle runtime for ever (I4).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use futures::FutureExt;
use session_lifecycle::deleter::DeleteOutcome;
use session_lifecycle::test_util::paused_runtime;
use session_lifecycle::{
    Backoff, CloseReason, MemoryStore, NewSession, NotifyError, ReclaimQueue, RouterDeleter,
    RouterId, RouterStatus, Session, SessionId, SessionStore, TerminationBatch,
    TerminationNotifier,
};

/// A router that never answers.
struct Silent;

impl TerminationNotifier for Silent {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

struct Slow {
    session: Session,
    released: Arc<AtomicUsize>,
    entered: mpsc::Receiver<()>,
    gate: mpsc::Sender<()>,
}

/// Creates 3 sessions on `router`; the first one's resource blocks its
/// release until the gate opens.
async fn fill(store: &MemoryStore, router: RouterId) -> (Slow, Vec<Session>) {
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
    let released = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered) = mpsc::channel();
    let (gate, gate_rx) = mpsc::channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let counter = Arc::clone(&released);
    sessions[0]
        .attach(move |_: CloseReason| {
            let _ = entered_tx.send(());
            let _ = gate_rx.lock().unwrap().recv();
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let slow = Slow {
        session: sessions[0].clone(),
        released,
        entered,
        gate,
    };
    (slow, sessions)
}

/// Lets the tasks run until `router` is fenced (its deletion started).
async fn until_fenced(store: &MemoryStore, router: RouterId) {
    while !matches!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Fenced(_)
    ) {
        tokio::task::yield_now().await;
    }
}

/// The client closes the slow session on one thread (its release blocks),
/// and a duplicate close by key lands on another: the second unlinks the
/// session from the fenced router while the first still releases.
fn close_twice(store: &Arc<MemoryStore>, slow: &Slow) -> std::thread::JoinHandle<()> {
    let key = slow.session.key();
    let closer = {
        let store = Arc::clone(store);
        std::thread::spawn(move || {
            let _ = store
                .close_exact(key, CloseReason::ClientClosed)
                .now_or_never()
                .unwrap();
        })
    };
    slow.entered.recv().unwrap();
    let _ = store
        .close_exact(key, CloseReason::RouterDeleted)
        .now_or_never()
        .unwrap();
    closer
}

/// The delete, with the slow release let go ten (paused) minutes in:
/// returns the outcome and the releases counted as it returned.
async fn delete_and_open<S: SessionStore, N: TerminationNotifier>(
    deleter: &RouterDeleter<S, N>,
    router: RouterId,
    slow: &Slow,
) -> (DeleteOutcome, usize, bool) {
    let gate = slow.gate.clone();
    let session = slow.session.clone();
    let opener = async move {
        tokio::time::sleep(Duration::from_secs(600)).await;
        // On a blocking thread: the paused clock does not jump meanwhile.
        tokio::task::spawn_blocking(move || {
            let _ = gate.send(());
            futures::executor::block_on(session.closed());
        })
        .await
        .unwrap();
    };
    let delete = async {
        let outcome = deleter.delete(router).await.unwrap();
        let complete = slow.session.closed().now_or_never().is_some();
        (outcome, slow.released.load(Ordering::SeqCst), complete)
    };
    let (returned, ()) = tokio::time::timeout(Duration::from_secs(3600), async {
        tokio::join!(delete, opener)
    })
    .await
    .expect("hung");
    returned
}

fn assert_whole_when_returned(
    sessions: &[Session],
    (outcome, released, complete): &(DeleteOutcome, usize, bool),
) {
    let report = outcome.report().expect("deleted");
    for session in sessions {
        assert!(session.is_closed(), "{session:?}");
    }
    // I1: once delete returns, every resource was released and every close
    // waiter can wake.
    assert_eq!(
        *released, 1,
        "delete returned ({report:?}) while a session's release had not run"
    );
    assert!(*complete, "close not complete when delete returned");
}

/// The first run is cut with its runtime; the same deleter resumes it on
/// a new runtime.
#[test]
fn a_resumed_deletion_waits_for_a_close_still_releasing() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(50))
        .build(Arc::clone(&store), Silent)
        .unwrap();
    let first = paused_runtime();
    let (slow, sessions) = first.block_on(async {
        let filled = fill(&store, router).await;
        drop(tokio::spawn(deleter.delete(router)));
        until_fenced(&store, router).await;
        filled
    });
    let closer = close_twice(&store, &slow);
    drop(first);

    let second = paused_runtime();
    let returned = second.block_on(delete_and_open(&deleter, router, &slow));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_whole_when_returned(&sessions, &returned)
    }));
    let _ = slow.gate.send(());
    closer.join().unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A second deleter (another piece of the controller on the same store)
/// deletes the router the first one is deleting.
#[test]
fn a_second_deleter_waits_for_a_close_still_releasing() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let runtime = paused_runtime();
    let (slow, sessions, outcome, closer) = runtime.block_on(async {
        let first = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(600))
            .build(Arc::clone(&store), Silent)
            .unwrap();
        let second = RouterDeleter::builder()
            .confirm_timeout(Duration::from_millis(50))
            .build(Arc::clone(&store), Silent)
            .unwrap();
        let (slow, sessions) = fill(&store, router).await;
        let _first = tokio::spawn(first.delete(router));
        until_fenced(&store, router).await;
        let closer = close_twice(&store, &slow);
        let returned = delete_and_open(&second, router, &slow).await;
        (slow, sessions, returned, closer)
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_whole_when_returned(&sessions, &outcome)
    }));
    let _ = slow.gate.send(());
    closer.join().unwrap();
    drop(runtime);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The first runtime ends (the controller's runtime restarted); the
/// deleter, documented to outlive its runtime, deletes a silent router on
/// a new one: its sessions must be forced and released within max_wait.
#[test]
fn a_deleter_with_a_queue_deletes_on_a_new_runtime() {
    let store = Arc::new(MemoryStore::new());
    let first = paused_runtime();
    let deleter = first.block_on(async {
        let queue = ReclaimQueue::builder().workers(1).build().unwrap();
        RouterDeleter::builder()
            .confirm_timeout(Duration::from_millis(100))
            .reclaim_queue(queue)
            .build(Arc::clone(&store), Silent)
            .unwrap()
    });
    drop(first);

    let second = paused_runtime();
    second.block_on(async {
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let released = Arc::new(AtomicUsize::new(0));
        let mut sessions = Vec::new();
        for id in 0..4 {
            let session = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
            let counter = Arc::clone(&released);
            session
                .attach(move |_: CloseReason| {
                    counter.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            sessions.push(session);
        }
        let bound = deleter.max_wait(4) + Duration::from_secs(60);
        let outcome = tokio::time::timeout(bound, deleter.delete(router)).await;
        assert!(
            outcome.is_ok(),
            "the deletion hung past max_wait + 60 s: {} of 4 released, {} sessions closed",
            released.load(Ordering::SeqCst),
            sessions.iter().filter(|s| s.is_closed()).count()
        );
        assert_eq!(released.load(Ordering::SeqCst), 4);
    });
}

/// The queue alone: tasks left waiting when its runtime ended run once a
/// push on another runtime brings workers back; a shut-down queue is not
/// revived.
#[test]
fn a_queue_whose_runtime_ended_runs_its_tasks_on_the_next_one() {
    use session_lifecycle::reclaim::{ReclaimError, ReclaimTask};

    let ran = Arc::new(AtomicUsize::new(0));
    let task = |id: u64| {
        let ran = Arc::clone(&ran);
        ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
            ran.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), ReclaimError>(()) }
        })
    };
    let first = paused_runtime();
    let queue = first.block_on(async {
        let queue = ReclaimQueue::builder()
            .workers(2)
            .paused(true)
            .build()
            .unwrap();
        queue.push(task(1)).await.unwrap();
        queue.push(task(2)).await.unwrap();
        queue
    });
    drop(first);
    assert_eq!(ran.load(Ordering::SeqCst), 0);

    let second = paused_runtime();
    second.block_on(async {
        queue.resume();
        queue.push(task(3)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(3600), queue.idle())
            .await
            .expect("the tasks ran on the new runtime's workers");
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        let stats = queue.stats();
        assert_eq!(
            (stats.completed, stats.outstanding.total()),
            (3, 0),
            "{stats:?}"
        );
        let report = queue.shutdown(Duration::from_secs(1)).await;
        assert!(report.drained, "{report:?}");
        assert!(queue.try_push(task(4)).is_err(), "shut down: not revived");
    });
}

#[test]
fn a_run_of_an_idle_runtime_joined_from_another_ends_within_max_wait() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(100))
        .notify_timeout(Duration::from_millis(100))
        .backoff(
            Backoff::new()
                .retries(1)
                .delays(Duration::from_millis(10), Duration::from_millis(10)),
        )
        .build(Arc::clone(&store), Silent)
        .unwrap();
    // A: a sync API's runtime, `block_on(timeout(delete))` that timed out.
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        let incarnation = store.register_router(router).await.unwrap();
        for id in 0..3 {
            store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
        }
        let cut = tokio::time::timeout(Duration::from_millis(50), deleter.delete(router)).await;
        assert!(cut.is_err());
        assert!(matches!(
            store.router_status(router).await.unwrap(),
            RouterStatus::Fenced(_)
        ));
    });
    // B: another runtime (A is alive but idle) asks again.
    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bound = deleter.max_wait(3) + Duration::from_secs(2);
    let outcome =
        second.block_on(async { tokio::time::timeout(bound, deleter.delete(router)).await });
    assert!(
        outcome.is_ok(),
        "the deletion did not end within max_wait + 2 s ({bound:?}): router {:?}, running {}",
        futures::FutureExt::now_or_never(store.router_status(router)),
        deleter.running()
    );
    drop(first);
}
