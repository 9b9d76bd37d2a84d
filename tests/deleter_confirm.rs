//! Confirmation by handle: a notifier confirming through each batch's
//! `Confirmations` instead of the store.
//!
//! Every deletion here must still end with I1 (nothing of the router left,
//! every session closed, resources released once), and a confirmation must
//! act only on the very sessions of its batch (I9): late, duplicate, out of
//! order, out of range, from another task, or racing the force pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use session_lifecycle::deleter::Confirmations;
use session_lifecycle::test_util::{
    HOUR, InvariantChecker, Notify, ObservedRouter, Script, ScriptedNotifier, Subset,
    report_within, run_paused,
};
use session_lifecycle::{
    CloseReason, MemoryStore, NewSession, NotifyError, Resource, RouterDeleter, RouterId, Session,
    SessionId, SessionState, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::time::Duration;

/// How the test notifier answers a batch through its `Confirmations`.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// `confirm_all`, inside `notify_with`.
    All,
    /// `confirm_key` for each key, last first.
    KeysReversed,
    /// `confirm_keys` with every key, in the batch's order.
    KeysAtOnce,
    /// `confirm(index)` for each index, then the same again.
    IndexesTwice,
    /// `confirm_all` from a task spawned per batch.
    AllFromTask,
    /// Nothing on round 0; `confirm_all` on later rounds.
    SecondRound,
    /// Nothing: the `Confirmations` are kept for later.
    Keep,
}

/// A notifier that confirms only through `Confirmations`, and keeps what
/// it was given.
struct Handles {
    answer: Answer,
    /// Every batch's `Confirmations`, with `Answer::Keep`.
    kept: Mutex<Vec<(TerminationBatch, Confirmations)>>,
    /// What the confirmations returned: how many closed.
    closed: AtomicUsize,
    /// Calls of `notify` (without `Confirmations`): the deleter never makes one.
    plain_calls: AtomicUsize,
}

impl Handles {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer,
            kept: Mutex::new(Vec::new()),
            closed: AtomicUsize::new(0),
            plain_calls: AtomicUsize::new(0),
        })
    }
}

impl TerminationNotifier for Handles {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        self.plain_calls.fetch_add(1, Ordering::SeqCst);
        Err(NotifyError::msg("this notifier confirms by handle only"))
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        assert_eq!(confirm.len(), batch.sessions.len());
        assert!(!confirm.is_empty());
        let closed = match self.answer {
            Answer::All => confirm.confirm_all(),
            Answer::KeysReversed => batch
                .sessions
                .iter()
                .rev()
                .filter(|&&key| confirm.confirm_key(key))
                .count(),
            Answer::KeysAtOnce => confirm.confirm_keys(batch.sessions.iter().copied()),
            Answer::IndexesTwice => {
                let first = (0..confirm.len()).filter(|&i| confirm.confirm(i)).count();
                let again = (0..confirm.len()).filter(|&i| confirm.confirm(i)).count();
                assert_eq!(again, 0, "a second confirmation closed something");
                assert!(!confirm.confirm(confirm.len()), "out of the batch");
                assert!(!confirm.confirm(usize::MAX), "out of the batch");
                first
            }
            Answer::AllFromTask => {
                tokio::spawn(async move { confirm.confirm_all() });
                0
            }
            Answer::SecondRound if batch.round == 0 => 0,
            Answer::SecondRound => confirm.confirm_all(),
            Answer::Keep => {
                self.kept.lock().push((batch, confirm));
                0
            }
        };
        self.closed.fetch_add(closed, Ordering::SeqCst);
        Ok(())
    }
}

async fn fill(store: &MemoryStore, router: RouterId, n: u64) -> Vec<Session> {
    let incarnation = store.register_router(router).await.expect("fresh router");
    let mut sessions = Vec::new();
    for i in 0..n {
        let id = SessionId::new(router.get() * 1_000_000 + i);
        let spec = NewSession::new(id, router, incarnation);
        sessions.push(store.create(spec).await.expect("live router"));
    }
    sessions
}

fn deleter(
    store: &Arc<MemoryStore>,
    notifier: &Arc<Handles>,
) -> RouterDeleter<MemoryStore, Arc<Handles>> {
    RouterDeleter::builder()
        .batch_size(64)
        .confirm_timeout(Duration::from_secs(1))
        .retries(2)
        .build(Arc::clone(store), Arc::clone(notifier))
        .expect("valid settings")
}

/// Deletes a 1,000-session router answered as `answer` says; checks I1 and
/// returns the report.
async fn delete_answered(answer: Answer) -> session_lifecycle::DeletionReport {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let sessions = fill(&store, router, 1_000).await;
    let notifier = Handles::new(answer);
    let report = report_within(HOUR, deleter(&store, &notifier).delete(router)).await;
    assert_eq!(report.sessions, 1_000);
    for session in &sessions {
        assert_eq!(session.state(), SessionState::Closed);
        assert!(
            matches!(store.get(session.id()).await, Ok(None)),
            "{session:?} left"
        );
    }
    assert_eq!(store.count(router).await.expect("tombstoned"), 0);
    assert_eq!(notifier.plain_calls.load(Ordering::SeqCst), 0);
    InvariantChecker::new().assert(&*store).await;
    report
}

#[test]
fn every_way_of_confirming_by_handle_confirms_every_session() {
    run_paused(async {
        for answer in [
            Answer::All,
            Answer::KeysReversed,
            Answer::KeysAtOnce,
            Answer::IndexesTwice,
            Answer::AllFromTask,
        ] {
            let report = delete_answered(answer).await;
            assert_eq!(
                (report.confirmed, report.forced, report.rounds),
                (1_000, 0, 1),
                "{answer:?}: {report:?}"
            );
        }
    });
}

#[test]
fn a_re_notification_carries_confirmations_of_the_sessions_still_open() {
    run_paused(async {
        let report = delete_answered(Answer::SecondRound).await;
        assert_eq!(
            (report.confirmed, report.forced, report.rounds),
            (1_000, 0, 2),
            "{report:?}"
        );
    });
}

#[test]
fn kept_confirmations_close_nothing_once_the_deletion_is_over_and_hold_no_session() {
    run_paused(async {
        let store = Arc::new(MemoryStore::<DropCount>::default());
        let router = RouterId::new(2);
        let incarnation = store.register_router(router).await.expect("fresh router");
        let dropped = Arc::new(AtomicUsize::new(0));
        for i in 0..100 {
            let payload = DropCount(Arc::clone(&dropped));
            let spec = NewSession::new(SessionId::new(i), router, incarnation).payload(payload);
            drop(store.create(spec).await.expect("live router"));
        }
        let notifier = Handles::new(Answer::Keep);
        let deleter = RouterDeleter::builder()
            .batch_size(64)
            .confirm_timeout(Duration::from_millis(100))
            .retries(0)
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .expect("valid settings");
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!((report.confirmed, report.forced), (0, 100), "{report:?}");
        // Every session was freed, though the notifier keeps every batch's
        // `Confirmations`.
        assert_eq!(dropped.load(Ordering::SeqCst), 100);
        let kept = std::mem::take(&mut *notifier.kept.lock());
        assert_eq!(kept.len(), 2);

        // The ids are reused on the router's next life; late answers to the
        // old batches must not touch the new sessions.
        let incarnation = store.register_router(router).await.expect("deleted");
        let mut new = Vec::new();
        for i in 0..100 {
            let payload = DropCount(Arc::clone(&dropped));
            let spec = NewSession::new(SessionId::new(i), router, incarnation).payload(payload);
            new.push(store.create(spec).await.expect("live router"));
        }
        for (batch, confirm) in &kept {
            assert_eq!(confirm.confirm_all(), 0);
            for (index, &key) in batch.sessions.iter().enumerate() {
                assert!(!confirm.confirm_key(key));
                assert!(!confirm.confirm(index));
                assert_eq!(confirm.confirm_keys([key]), 0);
            }
            assert!(format!("{confirm:?}").contains("deletion_running: false"));
        }
        for session in &new {
            assert_eq!(session.state(), SessionState::Active, "{session:?}");
        }
    });
}

#[test]
fn a_confirmation_by_handle_never_closes_a_session_reusing_the_id() {
    run_paused(async {
        // The router of the deletion confirms nothing at first; meanwhile the
        // controller closes one of its sessions itself, removes it, and the
        // id is reused on another router; then the router answers.
        let store = Arc::new(MemoryStore::new());
        let (deleted, other) = (RouterId::new(3), RouterId::new(4));
        let sessions = fill(&store, deleted, 10).await;
        let other_incarnation = store.register_router(other).await.expect("fresh router");
        let notifier = Handles::new(Answer::Keep);
        let deleter = deleter(&store, &notifier);
        let run = tokio::spawn({
            let deleter = deleter.clone();
            async move { deleter.delete(deleted).await }
        });
        while notifier.kept.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        let victim = &sessions[0];
        let removed = store
            .remove_exact(victim.key())
            .await
            .expect("in the store");
        assert_eq!(removed.close_reason(), Some(CloseReason::Reclaimed));
        let reuse = store
            .create(NewSession::new(victim.id(), other, other_incarnation))
            .await
            .expect("the id is free again");
        let (batch, confirm) = notifier.kept.lock().pop().expect("one batch");
        assert_eq!(confirm.confirm_all(), 9);
        assert!(!confirm.confirm_key(victim.key()));
        assert!(
            !confirm.confirm_key(reuse.key()),
            "not a session of the batch"
        );
        assert_eq!(reuse.state(), SessionState::Active);
        drop((batch, confirm));
        let report = run.await.expect("no panic").expect("deleted");
        let report = report.report().expect("deleted by this run").clone();
        assert_eq!((report.confirmed, report.forced), (9, 0), "{report:?}");
        assert_eq!(reuse.state(), SessionState::Active);
        assert!(matches!(store.get(reuse.id()).await, Ok(Some(_))));
    });
}

#[test]
fn confirmations_racing_the_force_pass_close_each_session_once() {
    // Real threads: a confirming thread and the deleter's force pass.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        for round in 0..20_u64 {
            let store = Arc::new(MemoryStore::new());
            let router = RouterId::new(10 + round);
            let released = Arc::new(AtomicUsize::new(0));
            let sessions = fill(&store, router, 512).await;
            for session in &sessions {
                session.attach(Count(Arc::clone(&released))).expect("open");
            }
            let notifier = Handles::new(Answer::Keep);
            let deleter = RouterDeleter::builder()
                .batch_size(128)
                .confirm_timeout(Duration::from_millis(1))
                .retries(0)
                .build(Arc::clone(&store), Arc::clone(&notifier))
                .expect("valid settings");
            let run = tokio::spawn({
                let deleter = deleter.clone();
                async move { deleter.delete(router).await }
            });
            while notifier.kept.lock().len() < 4 {
                tokio::task::yield_now().await;
            }
            let kept = std::mem::take(&mut *notifier.kept.lock());
            let confirmer = std::thread::spawn(move || {
                kept.iter()
                    .map(|(_, confirm)| confirm.confirm_all())
                    .sum::<usize>()
            });
            let outcome = run.await.expect("no panic").expect("deleted");
            let report = outcome.report().expect("deleted").clone();
            let confirmed = confirmer.join().expect("no panic");
            assert_eq!(report.confirmed, confirmed, "{report:?}");
            assert_eq!(report.confirmed + report.forced, 512, "{report:?}");
            assert_eq!(released.load(Ordering::SeqCst), 512, "released once each");
            for session in &sessions {
                assert_eq!(session.state(), SessionState::Closed);
            }
            InvariantChecker::new().assert(&*store).await;
        }
    });
}

/// Keys from a router's answers as they arrive, as a channel's iterator
/// gives them: it says nothing of what is ready (`size_hint` (0, None)),
/// and once its keys are out it waits for `more` (telling `waiting`).
struct AnswerStream {
    keys: std::vec::IntoIter<session_lifecycle::SessionKey>,
    waiting: Option<tokio::sync::oneshot::Sender<()>>,
    more: std::sync::mpsc::Receiver<()>,
}

impl Iterator for AnswerStream {
    type Item = session_lifecycle::SessionKey;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(key) = self.keys.next() {
            return Some(key);
        }
        if let Some(waiting) = self.waiting.take() {
            let _ = waiting.send(());
        }
        // The router's connection stays open: no key, no end, until told.
        let _ = self.more.recv();
        None
    }
}

#[test]
fn a_confirmation_waiting_for_keys_does_not_keep_the_deleted_sessions_alive() {
    // Real threads: the confirming thread blocks in the key iterator.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::<DropCount>::default());
        let router = RouterId::new(30);
        let incarnation = store.register_router(router).await.expect("fresh router");
        let dropped = Arc::new(AtomicUsize::new(0));
        for i in 0..100 {
            let payload = DropCount(Arc::clone(&dropped));
            let spec = NewSession::new(SessionId::new(i), router, incarnation).payload(payload);
            drop(store.create(spec).await.expect("live router"));
        }
        let notifier = Handles::new(Answer::Keep);
        let deleter = RouterDeleter::builder()
            .batch_size(128)
            .confirm_timeout(Duration::from_secs(3_600))
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .expect("valid settings");
        let run = tokio::spawn({
            let deleter = deleter.clone();
            async move { deleter.delete(router).await }
        });
        while notifier.kept.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        let (batch, confirm) = notifier.kept.lock().pop().expect("one batch");
        let (waiting, waited) = tokio::sync::oneshot::channel();
        let (more, stream) = std::sync::mpsc::channel();
        let answers = AnswerStream {
            keys: batch.sessions.into_iter(),
            waiting: Some(waiting),
            more: stream,
        };
        let confirmer = std::thread::spawn(move || confirm.confirm_keys(answers));
        let outcome = run.await.expect("no panic").expect("deleted");
        let report = outcome.report().expect("deleted").clone();
        assert_eq!((report.confirmed, report.forced), (100, 0), "{report:?}");
        waited.await.expect("the stream ran dry");
        // The confirming call still runs, waiting for a key: it holds none
        // of the deleted sessions.
        assert_eq!(dropped.load(Ordering::SeqCst), 100);
        more.send(()).expect("the stream waits");
        assert_eq!(confirmer.join().expect("no panic"), 100);
    });
}

#[test]
fn a_resource_calling_back_into_the_store_while_confirmed_does_not_deadlock() {
    run_paused(async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(5);
        let sessions = fill(&store, router, 200).await;
        let neighbour = RouterId::new(6);
        let neighbours = fill(&store, neighbour, 3).await;
        let notifier = Handles::new(Answer::All);
        let deleter = deleter(&store, &notifier);
        let calls = Arc::new(AtomicUsize::new(0));
        for session in &sessions {
            session
                .attach(Reenter {
                    store: Arc::clone(&store),
                    router,
                    calls: Arc::clone(&calls),
                })
                .expect("open");
        }
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(report.confirmed, 200, "{report:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 200);
        // The deleter and the store still serve the next deletion.
        let report = report_within(HOUR, deleter.delete(neighbour)).await;
        assert_eq!(report.confirmed, 3);
        drop(neighbours);
        InvariantChecker::new().assert(&*store).await;
    });
}

#[test]
fn a_notifier_with_only_notify_is_still_called_through_the_default() {
    run_paused(async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(7);
        let observed = ObservedRouter::fill(&*store, router, 0, 300).await;
        let notifier = ScriptedNotifier::new(
            Arc::clone(&store),
            Script::always(Notify::Confirm(Subset::All)),
        );
        let deleter = RouterDeleter::new(Arc::clone(&store), Arc::clone(&notifier));
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(report.confirmed, 300);
        observed.assert_deleted(&*store).await;
    });
}

#[test]
fn the_scripted_notifier_confirms_by_handle_out_of_order() {
    run_paused(async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(8);
        let observed = ObservedRouter::fill(&*store, router, 0, 500).await;
        let notifier = ScriptedNotifier::by_handle(
            Arc::clone(&store),
            Script::by_round(
                Notify::Confirm(Subset::EvenIds),
                Notify::Confirm(Subset::All),
            ),
        );
        let deleter = RouterDeleter::builder()
            .batch_size(100)
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .expect("valid settings");
        let report = report_within(HOUR, deleter.delete(router)).await;
        assert_eq!(
            (report.confirmed, report.forced, report.rounds),
            (500, 0, 2)
        );
        observed.assert_deleted(&*store).await;
        InvariantChecker::new().assert(&*store).await;
    });
}

/// A payload counting its drops: when the session's memory is freed.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A resource counting its releases.
struct Count(Arc<AtomicUsize>);

impl Resource for Count {
    fn release(self: Box<Self>, _reason: CloseReason) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A resource whose release reads the store back (its own router's count
/// and status) while the confirmation that closes it runs.
struct Reenter {
    store: Arc<MemoryStore>,
    router: RouterId,
    calls: Arc<AtomicUsize>,
}

impl Resource for Reenter {
    fn release(self: Box<Self>, reason: CloseReason) {
        assert_eq!(reason, CloseReason::RouterDeleted);
        let store = Arc::clone(&self.store);
        let router = self.router;
        // Every store call of a `MemoryStore` resolves at its first poll.
        let count = futures::executor::block_on(store.count(router));
        assert!(count.is_ok());
        let status = futures::executor::block_on(store.router_status(router));
        assert!(status.is_ok());
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}
