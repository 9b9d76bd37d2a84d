//! `RouterDeleter` against faults outside the notifier's future: a notifier
//! that panics before returning one, deadlines past the clock's range, a
//! close already in flight when the run starts, a run whose runtime dies,
//! no runtime at all, and an incarnation finished by someone else.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, Script, ScriptedNotifier, SlowRelease, paused_runtime,
    report_within,
};
use session_lifecycle::{
    Backoff, CloseReason, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
    SessionStore, TerminationBatch, TerminationNotifier, deleter::DeleteError, store::RouterStatus,
};
use tokio::time::Duration;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

const R: RouterId = RouterId::new(3);

/// Panics in `notify` itself, before any future exists.
// Kept: the kit's `Notify::Panic` panics inside the returned future, not before.
struct PanicsEagerly;

impl TerminationNotifier for PanicsEagerly {
    #[allow(clippy::manual_async_fn)]
    fn notify(
        &self,
        _batch: TerminationBatch,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send {
        panic!("notifier bug");
        #[allow(unreachable_code)]
        async {
            Ok(())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_notifier_that_panics_before_its_future_is_contained() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 5).await;
    let deleter = RouterDeleter::builder()
        .retries(1)
        .build(Arc::clone(&store), PanicsEagerly)
        .expect("valid settings");
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!((report.forced, report.notify_failures), (5, 2));
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn deadlines_past_the_clock_range_do_not_break_the_run() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 5).await;
    let deleter = RouterDeleter::builder()
        .notify_timeout(Duration::MAX)
        .confirm_timeout(Duration::MAX)
        .backoff(Backoff::new().retries(u32::MAX).delays(DAY, DAY))
        .build(
            Arc::clone(&store),
            ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
        )
        .expect("valid settings");
    assert_eq!(deleter.max_wait(5), Duration::MAX);
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!(report.confirmed, 5);
    observed.assert_deleted(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_in_flight_when_the_run_starts_is_awaited() {
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let session = store
        .create(NewSession::new(SessionId::new(1), R, incarnation))
        .await
        .unwrap();
    // The client closes the session on its own thread; the release blocks
    // until the gate opens, so the close is won but not complete.
    let slow = SlowRelease::attach(&session);
    let closer = {
        let session = session.clone();
        std::thread::spawn(move || session.close(CloseReason::ClientClosed))
    };
    let closing = session.closed_owned();
    while !session.is_closed() {
        tokio::task::yield_now().await;
    }
    let released = slow.open_after(Duration::from_millis(100));
    let deleter = RouterDeleter::new(
        Arc::clone(&store),
        ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
    );
    let report = report_within(Duration::from_secs(60), deleter.delete(R)).await;
    assert_eq!((report.sessions, report.already_closed), (1, 1));
    assert!(
        released.load(Ordering::SeqCst),
        "delete returned while a close of one of its sessions was releasing"
    );
    assert_eq!(closing.await, CloseReason::ClientClosed);
    assert!(closer.join().unwrap().won());
}

#[test]
fn a_run_whose_runtime_died_is_resumed_on_another() {
    let store = Arc::new(MemoryStore::new());
    let paused = paused_runtime;
    let first = paused();
    let (deleter, observed) = first.block_on(async {
        let observed = ObservedRouter::fill(&*store, R, 0, 4).await;
        let deleter = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(10))
            .build(
                Arc::clone(&store),
                ScriptedNotifier::new(
                    Arc::clone(&store),
                    Script::by_round(Notify::Never, Notify::confirm_all()),
                ),
            )
            .expect("valid settings");
        // Start the run and let it get as far as the first notification.
        let started = tokio::time::timeout(Duration::from_secs(2), deleter.delete(R)).await;
        assert!(started.is_err(), "the run cannot finish in 2 s");
        assert_eq!(deleter.running(), 1);
        (deleter, observed)
    });
    drop(first); // the run's task dies with its runtime
    assert_eq!(deleter.running(), 0, "a dead run stays registered");

    let second = paused();
    second.block_on(async {
        assert_eq!(
            store.router_status(R).await.unwrap(),
            RouterStatus::Fenced(observed.incarnation)
        );
        // The retry behaviour of the notifier confirms.
        let report = report_within(HOUR, deleter.delete(R)).await;
        assert!(report.resumed);
        assert_eq!(report.sessions, 4);
        let store = Arc::clone(&store);
        // The waiters of `observed` belonged to the dead runtime: check I1
        // without them.
        assert_eq!(store.count(R).await.unwrap(), 0);
        for (session, released) in observed.sessions.iter().zip(&observed.releases) {
            assert!(session.is_closed());
            assert_eq!(released.load(Ordering::SeqCst), 1);
        }
    });
}

#[test]
fn polling_delete_outside_a_runtime_is_a_typed_error() {
    let store = Arc::new(MemoryStore::new());
    let deleter = RouterDeleter::new(
        Arc::clone(&store),
        ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all()),
    );
    let result = futures::executor::block_on(deleter.delete(R));
    assert!(matches!(result, Err(DeleteError::NoRuntime)), "{result:?}");
    assert_eq!(deleter.running(), 0);
}

/// Finishes the incarnation itself and registers the router again, as a
/// second controller would, then confirms nothing.
// Kept: it races the deleter through the store (finish, re-register), which no kit script does.
struct FinishesFirst(Arc<MemoryStore>);

impl TerminationNotifier for FinishesFirst {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        self.0
            .finish(batch.router, batch.incarnation)
            .await
            .map_err(NotifyError::new)?;
        self.0
            .register_router(batch.router)
            .await
            .map_err(NotifyError::new)?;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn an_incarnation_finished_by_someone_else_counts_as_deleted() {
    let store = Arc::new(MemoryStore::new());
    let observed = ObservedRouter::fill(&*store, R, 0, 3).await;
    let deleter = RouterDeleter::new(Arc::clone(&store), FinishesFirst(Arc::clone(&store)));
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!(report.incarnation, observed.incarnation);
    // Closed by the other controller's finish: for another reason than a
    // confirmation.
    assert_eq!((report.confirmed, report.closed_otherwise), (0, 3));
    assert_eq!(
        report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
        3
    );
    // The new incarnation is live and was not touched.
    match store.router_status(R).await.unwrap() {
        RouterStatus::Live(current) => assert!(current > observed.incarnation),
        other => panic!("{other:?}"),
    }
    for session in &observed.sessions {
        assert!(session.is_closed());
        assert!(store.get(session.id()).await.unwrap().is_none());
    }
}
