//! A review of the deleter (stop 34), kept as a regression suite: many routers deleted concurrently on a multi-thread
//! runtime while creators keep creating on them and re-registering them,
//! ids reused across routers and incarnations, a notifier that misbehaves
//! in every way at once, and delete futures dropped at random points.
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::deleter::{Confirmations, DeleteOutcome};
use session_lifecycle::store::CreateErrorKind;
use session_lifecycle::test_util::mix;
use session_lifecycle::{
    Backoff, CloseReason, DeletionReport, Incarnation, MemoryStore, NewSession, NotifyError,
    RouterDeleter, RouterId, RouterStatus, Session, SessionId, SessionKey, SessionStore,
    TerminationBatch, TerminationNotifier,
};

const ROUTERS: u64 = 12;
const IDS: u64 = 150;

struct Rng(AtomicU64);
impl Rng {
    fn next(&self) -> u64 {
        mix(self.0.fetch_add(0x9E37_79B9, Ordering::Relaxed))
    }
}

/// A confirmation that confirms everything from its `Drop`.
struct ConfirmOnDrop(Confirmations);
impl Drop for ConfirmOnDrop {
    fn drop(&mut self) {
        let _ = self.0.confirm_all();
        let _ = self.0.confirm_all();
    }
}

#[derive(Default)]
struct Book {
    /// Every session created: (key) -> (session, releases).
    created: Mutex<HashMap<SessionKey, (Session, Arc<AtomicUsize>)>>,
    /// Keys ever notified (for wrong keys).
    history: Mutex<Vec<SessionKey>>,
    kept: Mutex<Vec<Arc<Confirmations>>>,
    reports: Mutex<Vec<DeletionReport>>,
    refused_ok: AtomicUsize,
}

struct Unruly {
    store: Arc<MemoryStore>,
    book: Arc<Book>,
    rng: Rng,
}

impl TerminationNotifier for Unruly {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let store = Arc::clone(&self.store);
        let delay = self.rng.next() % 40;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            for key in batch.sessions {
                let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
                let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
            }
        });
        Ok(())
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        let wrong: Vec<SessionKey> = {
            let mut history = self.book.history.lock().unwrap();
            let wrong = history.iter().rev().take(20).copied().collect();
            history.extend(batch.sessions.iter().copied());
            if history.len() > 5000 {
                history.drain(..2500);
            }
            wrong
        };
        let choice = self.rng.next() % 9;
        let delay = Duration::from_millis(self.rng.next() % 50);
        match choice {
            0 => {
                confirm.confirm_all();
                confirm.confirm_all();
            }
            1 => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    confirm.confirm_keys(wrong.iter().copied());
                    confirm.confirm_keys(batch.sessions.iter().copied());
                    confirm.confirm_keys(batch.sessions.iter().rev().copied());
                });
            }
            2 => {
                let store = Arc::clone(&self.store);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    for key in batch.sessions.iter().rev() {
                        let _ = store.close_exact(*key, CloseReason::RouterDeleted).await;
                    }
                    drop(confirm);
                });
            }
            3 => {
                self.book.kept.lock().unwrap().push(Arc::new(confirm));
            }
            4 => return Err(NotifyError::msg("down")),
            5 => {
                for i in (0..confirm.len()).step_by(2) {
                    confirm.confirm(i);
                }
                self.book.kept.lock().unwrap().push(Arc::new(confirm));
            }
            6 => {
                let held = ConfirmOnDrop(confirm);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    drop(held);
                });
            }
            7 => {
                // Hang past the notify timeout, then confirm late.
                let confirm = Arc::new(confirm);
                self.book.kept.lock().unwrap().push(Arc::clone(&confirm));
                tokio::time::sleep(Duration::from_millis(200)).await;
                confirm.confirm_all();
            }
            _ => {
                // Confirm a key of another batch (maybe another router or a
                // newer session reusing the id) through the store.
                let store = Arc::clone(&self.store);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    for key in &batch.sessions {
                        let _ = store.close_exact(*key, CloseReason::RouterDeleted).await;
                    }
                    confirm.confirm_all();
                });
            }
        }
        Ok(())
    }
}

type Deleter = RouterDeleter<MemoryStore, Arc<Unruly>>;

fn is_refusal(kind: &CreateErrorKind) -> bool {
    matches!(
        kind,
        CreateErrorKind::RouterDeleted { .. }
            | CreateErrorKind::StaleIncarnation { .. }
            | CreateErrorKind::UnknownRouter(_)
            | CreateErrorKind::Fenced { .. }
    )
}

async fn check_deleted(
    store: &MemoryStore,
    book: &Book,
    router: RouterId,
    incarnation: Incarnation,
) -> Result<(), String> {
    let sessions: Vec<(Session, Arc<AtomicUsize>)> = book
        .created
        .lock()
        .unwrap()
        .values()
        .filter(|(s, _)| s.router() == router && s.incarnation() == incarnation)
        .map(|(s, r)| (s.clone(), Arc::clone(r)))
        .collect();
    for (session, released) in &sessions {
        if !session.is_closed() {
            return Err(format!(
                "{router} {incarnation:?}: {session:?} still open after delete"
            ));
        }
        if let Some(stored) = store.get(session.id()).await.unwrap()
            && stored.key() == session.key()
        {
            return Err(format!(
                "{router} {incarnation:?}: {session:?} still in the store"
            ));
        }
        // Released exactly once (the close completed before delete returned).
        let n = released.load(Ordering::SeqCst);
        if n > 1 {
            return Err(format!("{session:?} released {n} times"));
        }
    }
    // A create on the deleted incarnation is refused with a typed error.
    let id = SessionId::new(1_000_000 + incarnation.get());
    match store.create(NewSession::new(id, router, incarnation)).await {
        Ok(s) => {
            return Err(format!(
                "create accepted on deleted {router} {incarnation:?}: {s:?}"
            ));
        }
        Err(e) if is_refusal(e.kind()) => {
            book.refused_ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => return Err(format!("unexpected refusal {e:?}")),
    }
    Ok(())
}

fn report_adds_up(report: &DeletionReport) -> Result<(), String> {
    let sum = report.confirmed + report.already_closed + report.closed_otherwise + report.forced;
    if sum != report.sessions {
        return Err(format!("report does not add up: {report:?}"));
    }
    Ok(())
}

async fn creator(
    store: Arc<MemoryStore>,
    book: Arc<Book>,
    router: RouterId,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let rng = Rng(AtomicU64::new(seed));
    while !stop.load(Ordering::Relaxed) {
        let status = match store.router_status(router).await {
            Ok(status) => status,
            Err(_) => {
                let _ = store.register_router(router).await;
                continue;
            }
        };
        match status {
            RouterStatus::Live(incarnation) => {
                let id = SessionId::new(rng.next() % IDS);
                match store.create(NewSession::new(id, router, incarnation)).await {
                    Ok(session) => {
                        let released = Arc::new(AtomicUsize::new(0));
                        let counter = Arc::clone(&released);
                        let attached = session
                            .attach(move |_: CloseReason| {
                                counter.fetch_add(1, Ordering::SeqCst);
                            })
                            .is_ok();
                        if !attached {
                            // Closed before the attach: counts as released once.
                            released.store(1, Ordering::SeqCst);
                        }
                        book.created
                            .lock()
                            .unwrap()
                            .insert(session.key(), (session.clone(), released));
                        if rng.next().is_multiple_of(5) {
                            let _ = store
                                .close_exact(session.key(), CloseReason::ClientClosed)
                                .await;
                        } else if rng.next().is_multiple_of(7) {
                            // Closed on the handle only: stays in the store.
                            let _ = session.close(CloseReason::ClientClosed);
                        }
                    }
                    Err(e) => {
                        if !is_refusal(e.kind())
                            && !matches!(e.kind(), CreateErrorKind::DuplicateSession(_))
                        {
                            panic!("unexpected create error {e:?}");
                        }
                    }
                }
            }
            RouterStatus::Fenced(_) => {}
            RouterStatus::Deleted(_) => {
                if rng.next().is_multiple_of(3) {
                    let _ = store.register_router(router).await;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

async fn deleting(
    deleter: Deleter,
    other: Option<Deleter>,
    book: Arc<Book>,
    router: RouterId,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Result<(), String> {
    let rng = Rng(AtomicU64::new(seed));
    let store = Arc::clone(deleter.store());
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.next() % 30)).await;
        let status = match store.router_status(router).await {
            Ok(status) => status,
            Err(_) => continue,
        };
        let incarnation = status.incarnation();
        let deleter = match &other {
            Some(other) if rng.next().is_multiple_of(2) => other.clone(),
            _ => deleter.clone(),
        };
        let case = rng.next() % 6;
        let outcome = match case {
            0 => {
                // Dropped after one poll, then asked again.
                let mut fut = Box::pin(deleter.delete(router));
                let _ = futures::poll!(fut.as_mut());
                drop(fut);
                tokio::task::yield_now().await;
                deleter.delete(router).await
            }
            1 => {
                // Spawned and detached; a second call joins or sees it done.
                drop(tokio::spawn(deleter.delete(router)));
                tokio::time::sleep(Duration::from_millis(rng.next() % 20)).await;
                deleter.delete_incarnation(router, incarnation).await
            }
            2 => {
                let (a, b) = tokio::join!(
                    deleter.delete(router),
                    deleter.delete_incarnation(router, incarnation)
                );
                match (&a, &b) {
                    (Ok(DeleteOutcome::Deleted(x)), Ok(DeleteOutcome::Deleted(y)))
                        if x.incarnation == y.incarnation && x != y =>
                    {
                        return Err(format!("joined calls answered differently: {x:?} vs {y:?}"));
                    }
                    _ => {}
                }
                b
            }
            3 => {
                // Dropped at a random point of the run, then resumed.
                let fut = deleter.delete_incarnation(router, incarnation);
                let cut = Duration::from_millis(rng.next() % 60);
                match tokio::time::timeout(cut, fut).await {
                    Ok(outcome) => outcome,
                    Err(_) => deleter.delete_incarnation(router, incarnation).await,
                }
            }
            4 => {
                // A stale request for an older life.
                if incarnation.get() > 1 {
                    let old = Incarnation::new(incarnation.get() - 1);
                    match deleter.delete_incarnation(router, old).await {
                        Ok(DeleteOutcome::Deleted(r)) if r.incarnation != old => {
                            return Err(format!("asked {old:?}, answered {r:?}"));
                        }
                        _ => {}
                    }
                }
                continue;
            }
            _ => deleter.delete(router).await,
        };
        match outcome {
            Ok(DeleteOutcome::Deleted(report)) => {
                if report.router != router {
                    return Err(format!("report of another router {report:?}"));
                }
                // `delete_incarnation` answers for the incarnation asked;
                // `delete(router)` for the one the router has when the call
                // begins: after the status was read, maybe a newer one
                // (detached deletions of earlier rounds and the creators'
                // re-registrations go on meanwhile), never an older one.
                let asked_exactly = matches!(case, 1..=3);
                let answered = if asked_exactly {
                    report.incarnation == incarnation
                } else {
                    report.incarnation >= incarnation
                };
                if matches!(status, RouterStatus::Live(_) | RouterStatus::Fenced(_)) && !answered {
                    return Err(format!(
                        "case {case}: asked for {incarnation:?}, got {report:?}"
                    ));
                }
                report_adds_up(&report)?;
                check_deleted(&store, &book, router, report.incarnation).await?;
                book.reports.lock().unwrap().push(report);
            }
            Ok(DeleteOutcome::AlreadyDeleted {
                incarnation: done, ..
            }) => {
                check_deleted(&store, &book, router, done).await?;
            }
            Err(e) => return Err(format!("delete failed: {e:?}")),
        }
    }
    Ok(())
}

fn watchdog(limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("WATCHDOG: hang detected after {limit:?}");
            std::process::abort();
        }
    });
    tx
}

#[test]
fn storm_of_deletions_creations_and_reregistrations() {
    storm(false);
}

/// Two deleters (two controllers' pieces) on one store, as a controller
/// with a `Lifecycle` and a standalone `RouterDeleter` would have.
#[test]
fn storm_with_two_deleters_on_one_store() {
    storm(true);
}

fn storm(two: bool) {
    let done = watchdog(Duration::from_secs(90));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let book = Arc::new(Book::default());
        let notifier = Arc::new(Unruly {
            store: Arc::clone(&store),
            book: Arc::clone(&book),
            rng: Rng(AtomicU64::new(7)),
        });
        let deleter: Deleter = RouterDeleter::builder()
            .batch_size(7)
            .confirm_timeout(Duration::from_millis(25))
            .notify_timeout(Duration::from_millis(30))
            .max_concurrent(3)
            .backoff(
                Backoff::new()
                    .retries(2)
                    .delays(Duration::from_millis(5), Duration::from_millis(15)),
            )
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .unwrap();
        for r in 0..ROUTERS {
            store.register_router(RouterId::new(r)).await.unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for r in 0..ROUTERS {
            for c in 0..2 {
                tasks.push(tokio::spawn(creator(
                    Arc::clone(&store),
                    Arc::clone(&book),
                    RouterId::new(r),
                    Arc::clone(&stop),
                    r * 100 + c,
                )));
            }
        }
        // A hammer confirming kept confirmations with keys of every batch.
        let hammer = {
            let book = Arc::clone(&book);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let rng = Rng(AtomicU64::new(99));
                while !stop.load(Ordering::Relaxed) {
                    let kept: Vec<_> = book.kept.lock().unwrap().clone();
                    let keys: Vec<_> = book
                        .history
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .take(50)
                        .copied()
                        .collect();
                    for confirm in kept.iter().filter(|_| rng.next().is_multiple_of(4)) {
                        confirm.confirm_keys(keys.iter().copied());
                        if rng.next().is_multiple_of(3) {
                            confirm.confirm_all();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        };
        let second: Option<Deleter> = two.then(|| {
            RouterDeleter::builder()
                .batch_size(5)
                .confirm_timeout(Duration::from_millis(15))
                .notify_timeout(Duration::from_millis(30))
                .backoff(
                    Backoff::new()
                        .retries(1)
                        .delays(Duration::from_millis(5), Duration::from_millis(5)),
                )
                .build(Arc::clone(&store), Arc::clone(&notifier))
                .unwrap()
        });
        let mut deleters = Vec::new();
        for r in 0..ROUTERS {
            deleters.push(tokio::spawn(deleting(
                deleter.clone(),
                second.clone(),
                Arc::clone(&book),
                RouterId::new(r),
                Arc::clone(&stop),
                r * 7919,
            )));
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        hammer.await.unwrap();
        for d in deleters {
            d.await.unwrap().unwrap();
        }
        // Delete every router one last time, then check everything.
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            let outcome = deleter.delete(router).await.unwrap();
            if let DeleteOutcome::Deleted(report) = &outcome {
                report_adds_up(report).unwrap();
            }
        }
        deleter.shutdown().await;
        if let Some(second) = &second {
            second.shutdown().await;
        }
        // Kept confirmations now confirm nothing.
        let kept: Vec<_> = book.kept.lock().unwrap().drain(..).collect();
        for confirm in &kept {
            assert_eq!(confirm.confirm_all(), 0);
        }
        drop(kept);
        let audit = store.audit().await.unwrap();
        assert!(audit.is_clean(), "{audit:?}");
        assert_eq!(store.len(), 0, "sessions left in the store");
        let created = book.created.lock().unwrap();
        let mut closed_by = HashMap::new();
        for (session, released) in created.values() {
            assert!(session.is_closed(), "zombie {session:?}");
            assert_eq!(released.load(Ordering::SeqCst), 1, "{session:?}");
            *closed_by
                .entry(format!("{:?}", session.close_reason()))
                .or_insert(0) += 1;
        }
        let reports = book.reports.lock().unwrap();
        let mut seen = std::collections::HashSet::new();
        for report in reports.iter() {
            if !seen.insert((report.router, report.incarnation)) {
                continue;
            }
            let of: Vec<&Session> = created
                .values()
                .map(|(s, _)| s)
                .filter(|s| s.router() == report.router && s.incarnation() == report.incarnation)
                .collect();
            let forced = of
                .iter()
                .filter(|s| s.close_reason() == Some(CloseReason::Forced))
                .count();
            let confirmed = of
                .iter()
                .filter(|s| s.close_reason() == Some(CloseReason::RouterDeleted))
                .count();
            assert_eq!(report.forced, forced, "forced count: {report:?}");
            assert_eq!(report.confirmed, confirmed, "confirmed count: {report:?}");
            assert!(
                report.sessions <= of.len(),
                "{report:?} vs {} created",
                of.len()
            );
        }
        eprintln!(
            "created {} sessions, {} reports, {} refusals checked, closed by {:?}",
            created.len(),
            reports.len(),
            book.refused_ok.load(Ordering::Relaxed),
            closed_by
        );
    });
    drop(runtime);
    let _ = done.send(());
}
