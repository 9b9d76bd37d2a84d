//! Deletions joined across runtimes, and pieces whose runtime ended, a
//! second review round of stop 34 (of the timers that follow the runtime
//! polling a run). Each test failed before its fix: a joiner on a runtime
//! without timers, or outside any runtime, now answers `NoRuntime` (it
//! ended the run `Interrupted`, or hung); a joiner whose runtime is then
//! left idle no longer strands the caller on a running one; an expiry
//! monitor whose task never ran stops (and refuses tracks).
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use session_lifecycle::deleter::DeleteError;
use session_lifecycle::test_util::paused_runtime;
use session_lifecycle::{
    CloseReason, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, RouterStatus,
    SessionId, SessionStore, TerminationBatch, TerminationNotifier,
};

/// A router that never answers.
struct Silent;

impl TerminationNotifier for Silent {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

async fn fill(store: &MemoryStore, router: RouterId, n: u64) -> session_lifecycle::Incarnation {
    let incarnation = store.register_router(router).await.unwrap();
    for id in 0..n {
        let session = store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
        session.attach(|_: CloseReason| {}).unwrap();
    }
    incarnation
}

async fn until_fenced(store: &MemoryStore, router: RouterId) {
    while !matches!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Fenced(_)
    ) {
        tokio::task::yield_now().await;
    }
}

/// A caller on a runtime built without its time driver joins a running
/// deletion with `delete_incarnation`. `delete` there answers `NoRuntime`
/// ("Nothing was done"), and `delete_incarnation` documents the same
/// errors; instead the joiner polls the run, whose next timer panics on
/// that runtime, and the *whole run* ends `Interrupted`: the first
/// caller, on a healthy runtime, gets `Interrupted` too.
#[test]
fn a_joiner_on_a_runtime_without_timers_does_not_interrupt_the_run() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(1))
        .build(Arc::clone(&store), Silent)
        .unwrap();
    let first = paused_runtime();
    let (incarnation, caller) = first.block_on(async {
        let incarnation = fill(&store, router, 3).await;
        let caller = tokio::spawn(deleter.delete(router));
        until_fenced(&store, router).await;
        (incarnation, caller)
    });

    let untimed = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // For comparison: `delete` refuses there.
    assert!(matches!(
        untimed.block_on(deleter.delete(router)),
        Err(DeleteError::NoRuntime)
    ));
    let joined = untimed.block_on(deleter.delete_incarnation(router, incarnation));
    let theirs = first.block_on(caller).unwrap();
    assert!(
        theirs.is_ok(),
        "the first caller's deletion was interrupted by a joiner on a timerless runtime \
         (joiner got {joined:?}, first caller got {theirs:?})"
    );
    assert!(
        matches!(joined, Err(DeleteError::NoRuntime)),
        "joiner on a runtime without timers: {joined:?}"
    );
}

/// A caller outside any runtime (a sync API using
/// `futures::executor::block_on`) joins with `delete_incarnation` a run
/// started on a current-thread runtime now idle. The run's `Deadline`
/// sees no runtime and keeps the idle runtime's timer, which never fires:
/// the call hangs far past max_wait instead of answering `NoRuntime` (as
/// `delete` does there) or ending within its bound (I4).
#[test]
fn a_joiner_outside_any_runtime_neither_refuses_nor_hangs() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(100))
        .notify_timeout(Duration::from_millis(100))
        .build(Arc::clone(&store), Silent)
        .unwrap();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let incarnation = first.block_on(async {
        let incarnation = fill(&store, router, 3).await;
        let cut = tokio::time::timeout(Duration::from_millis(20), deleter.delete(router)).await;
        assert!(cut.is_err());
        until_fenced(&store, router).await;
        incarnation
    });
    let bound = deleter.max_wait(3) + Duration::from_secs(5);
    let (tx, rx) = mpsc::channel();
    let joining = deleter.delete_incarnation(router, incarnation);
    std::thread::spawn(move || {
        let _ = tx.send(futures::executor::block_on(joining));
    });
    let answer = rx.recv_timeout(bound);
    assert!(
        answer.is_ok(),
        "delete_incarnation polled outside any runtime hung past max_wait + 5 s ({bound:?})"
    );
    drop(first);
}

/// The mirror of the fixed case. A run started on a multi-thread runtime
/// A, awaited there by its caller, is joined by a task spawned on a
/// current-thread runtime B that is then left idle (a sync API's
/// `block_on` returned). B's poll re-made the run's confirm deadline on
/// B; B never fires it, nothing wakes the run on A, and the steward of A
/// sleeps on the run waiting for a wake: the caller on the healthy runtime
/// A waited for ever (I4). A `Deadline` now keeps its timer on every
/// runtime that polled it. Real clock (a multi-thread runtime and an idle
/// one); the bound only detects a hang.
#[test]
fn a_caller_on_a_running_runtime_is_not_stranded_by_a_joiner_on_an_idle_one() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(500))
        .notify_timeout(Duration::from_millis(100))
        .backoff(
            session_lifecycle::Backoff::new()
                .retries(1)
                .delays(Duration::from_millis(10), Duration::from_millis(10)),
        )
        .build(Arc::clone(&store), Silent)
        .unwrap();
    let busy = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (caller, sessions) = busy.block_on(async {
        fill(&store, router, 3).await;
        let sessions = store.sessions(router).await.unwrap();
        let caller = tokio::spawn(deleter.delete(router));
        // The run has notified and waits for confirmations (its deadline
        // is 500 ms away).
        while !sessions
            .iter()
            .all(|s| s.state() == session_lifecycle::SessionState::Terminating)
        {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        (caller, sessions)
    });
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    idle.block_on(async {
        drop(tokio::spawn(deleter.delete(router)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    });
    let bound = deleter.max_wait(3) + Duration::from_secs(3);
    let outcome = busy.block_on(async { tokio::time::timeout(bound, caller).await });
    assert!(
        outcome.is_ok(),
        "the caller on the running runtime hung past max_wait + 3 s ({bound:?}): {} of 3 closed",
        sessions.iter().filter(|s| s.is_closed()).count()
    );
    drop(idle);
}

/// A `Lifecycle` built on a runtime that then ended (a controller that
/// restarts its runtime and keeps its pieces). On the new runtime,
/// `Lifecycle::create` of a session with an expiry answered `Ok` and the
/// session was silently never expired (a debug log). Now documented and
/// observable: a warning, and the stopped monitor refuses tracks (the
/// monitor's task, dropped before its first poll, never stopped it).
#[test]
fn a_lifecycle_on_a_new_runtime_says_its_expiry_monitor_stopped() {
    use session_lifecycle::expiry::TrackError;
    use session_lifecycle::{ExpiryMonitor, Lifecycle};

    let store = Arc::new(MemoryStore::new());
    let first = paused_runtime();
    let lifecycle = first.block_on(async {
        Lifecycle::builder(Arc::clone(&store), Silent)
            .expiry(ExpiryMonitor::builder())
            .build()
            .unwrap()
    });
    drop(first);
    let second = paused_runtime();
    second.block_on(async {
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let session = lifecycle
            .create(
                NewSession::new(SessionId::new(1), router, incarnation)
                    .expires_in(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        // Documented: not tracked (a warning), and the monitor says it
        // stopped, so the controller can track it in a monitor of its own.
        assert_eq!(lifecycle.expiry().stats().tracked, 0);
        assert_eq!(
            lifecycle.expiry().track(&session),
            Err(TrackError::ShutDown)
        );
        let own = ExpiryMonitor::builder().build(Arc::clone(&store)).unwrap();
        own.track(&session).unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(3600), session.closed()).await;
        assert_eq!(closed.ok(), Some(session_lifecycle::CloseReason::Expired));
    });
}

/// `ExpiryMonitor::shutdown`'s docs: "A monitor whose runtime went away
/// ... stops the same way" (tracks then answer `ShutDown`). The stop is
/// set by a guard the task makes at its first poll: a monitor whose
/// runtime ended before its task first ran (built inside a `block_on` that
/// returned at once) never stops. `track` answers `Ok`, counts the
/// session as tracked, and nothing ever expires it.
#[test]
fn an_expiry_monitor_whose_runtime_ended_before_its_task_ran_refuses_tracks() {
    use session_lifecycle::expiry::TrackError;
    use session_lifecycle::{ExpiryMonitor, Incarnation};

    let first = paused_runtime();
    let monitor = first.block_on(async {
        ExpiryMonitor::builder()
            .build(Arc::new(MemoryStore::new()))
            .unwrap()
    });
    drop(first);
    let second = paused_runtime();
    second.block_on(async {
        let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .expires_in(Duration::from_secs(1))
            .into_session();
        let tracked = monitor.track(&session);
        assert_eq!(
            tracked,
            Err(TrackError::ShutDown),
            "track on a monitor whose runtime is gone (stats {:?})",
            monitor.stats()
        );
    });
}
