//! A review of the deleter (stop 34), kept as a regression suite: multi-thread runtime dropped under many running
//! deletions (confirmations in flight, kept, late, by key and by
//! handle), creators and re-registrations racing; the same deleter then
//! deletes everything again on a new runtime.
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::deleter::{Confirmations, DeleteOutcome};
use session_lifecycle::test_util::mix;
use session_lifecycle::{
    Backoff, CloseReason, DeletionReport, MemoryStore, NewSession, NotifyError, RouterDeleter,
    RouterId, RouterStatus, Session, SessionId, SessionKey, SessionStore, TerminationBatch,
    TerminationNotifier,
};

#[derive(Default)]
struct Book {
    created: Mutex<HashMap<SessionKey, (Session, Arc<AtomicUsize>)>>,
    kept: Mutex<Vec<Arc<Confirmations>>>,
    keys: Mutex<Vec<SessionKey>>,
}

struct Late {
    store: Arc<MemoryStore>,
    book: Arc<Book>,
    seed: AtomicU64,
}

impl TerminationNotifier for Late {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            for key in batch.sessions {
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
        let r = mix(self.seed.fetch_add(1, Ordering::Relaxed));
        self.book
            .keys
            .lock()
            .unwrap()
            .extend(batch.sessions.iter().copied());
        let confirm = Arc::new(confirm);
        self.book.kept.lock().unwrap().push(Arc::clone(&confirm));
        let store = Arc::clone(&self.store);
        let delay = Duration::from_millis(r % 30);
        match r % 4 {
            0 => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    confirm.confirm_keys(batch.sessions.iter().copied());
                });
            }
            1 => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    for key in &batch.sessions {
                        let _ = store.close_exact(*key, CloseReason::RouterDeleted).await;
                    }
                });
            }
            2 => {
                // Half now, by index.
                for i in (0..confirm.len()).step_by(2) {
                    confirm.confirm(i);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

type Deleter = RouterDeleter<MemoryStore, Arc<Late>>;

async fn create_some(store: &MemoryStore, book: &Book, router: RouterId, seed: u64, n: u64) {
    let Ok(RouterStatus::Live(incarnation)) = store.router_status(router).await else {
        return;
    };
    for i in 0..n {
        let id = SessionId::new(mix(seed + i) % 60);
        if let Ok(session) = store.create(NewSession::new(id, router, incarnation)).await {
            let released = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&released);
            if session
                .attach(move |_: CloseReason| {
                    counter.fetch_add(1, Ordering::SeqCst);
                })
                .is_err()
            {
                released.store(1, Ordering::SeqCst);
            }
            book.created
                .lock()
                .unwrap()
                .insert(session.key(), (session, released));
        }
    }
}

fn case(seed: u64) {
    const ROUTERS: u64 = 6;
    let store = Arc::new(MemoryStore::new());
    let book = Arc::new(Book::default());
    let notifier = Arc::new(Late {
        store: Arc::clone(&store),
        book: Arc::clone(&book),
        seed: AtomicU64::new(seed),
    });
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let deleter: Deleter = first.block_on(async {
        let deleter = RouterDeleter::builder()
            .batch_size(3)
            .max_concurrent(2)
            .confirm_timeout(Duration::from_millis(20))
            .notify_timeout(Duration::from_millis(20))
            .backoff(
                Backoff::new()
                    .retries(2)
                    .delays(Duration::from_millis(3), Duration::from_millis(10)),
            )
            .build(Arc::clone(&store), Arc::clone(&notifier))
            .unwrap();
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            store.register_router(router).await.unwrap();
            create_some(&store, &book, router, seed * 100 + r, 20).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            let (deleter, store, book, stop) = (
                deleter.clone(),
                Arc::clone(&store),
                Arc::clone(&book),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let d = deleter.delete(router);
                    if (seed + i).is_multiple_of(2) {
                        drop(tokio::spawn(d));
                    } else {
                        let _ = tokio::time::timeout(Duration::from_millis(mix(seed + i) % 25), d)
                            .await;
                    }
                    if let Ok(RouterStatus::Deleted(_)) = store.router_status(router).await {
                        let _ = store.register_router(router).await;
                    }
                    create_some(&store, &book, router, seed * 1000 + i * 10 + r, 5).await;
                    tokio::task::yield_now().await;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(20 + mix(seed) % 150)).await;
        stop.store(true, Ordering::Relaxed);
        deleter
    });
    // Cut: every task (runs, stewards, notifier tasks) dropped mid-flight.
    drop(first);

    let second = session_lifecycle::test_util::paused_runtime();
    second.block_on(async {
        let hour = Duration::from_secs(3600);
        // Kept confirmations of the dead runs are dead.
        let kept: Vec<_> = book.kept.lock().unwrap().drain(..).collect();
        let keys: Vec<_> = book.keys.lock().unwrap().clone();
        for confirm in &kept {
            assert_eq!(
                confirm.confirm_all(),
                0,
                "seed {seed}: a dead run's confirmation closed"
            );
            assert_eq!(confirm.confirm_keys(keys.iter().copied()), 0, "seed {seed}");
        }
        let mut reports: Vec<DeletionReport> = Vec::new();
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            let outcome = tokio::time::timeout(hour, deleter.delete(router))
                .await
                .unwrap_or_else(|_| panic!("seed {seed}: the resumed deletion hung"))
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            if let DeleteOutcome::Deleted(report) = outcome {
                let sum = report.confirmed
                    + report.already_closed
                    + report.closed_otherwise
                    + report.forced;
                assert_eq!(sum, report.sessions, "seed {seed}: {report:?}");
                reports.push(report);
            }
        }
        eprintln!(
            "seed {seed}: resumed {:?}",
            reports
                .iter()
                .map(|r| (
                    r.resumed,
                    r.sessions,
                    r.confirmed,
                    r.already_closed,
                    r.forced
                ))
                .collect::<Vec<_>>()
        );
        // Kept confirmations still hammered while new lives are deleted.
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            store.register_router(router).await.unwrap();
            create_some(&store, &book, router, seed * 7 + r, 10).await;
        }
        for confirm in &kept {
            assert_eq!(confirm.confirm_keys(keys.iter().copied()), 0, "seed {seed}");
        }
        for r in 0..ROUTERS {
            let outcome = tokio::time::timeout(hour, deleter.delete(RouterId::new(r)))
                .await
                .expect("hung")
                .unwrap();
            assert!(outcome.report().is_some());
        }
        tokio::time::timeout(hour, deleter.shutdown())
            .await
            .expect("shutdown hung");
        let audit = store.audit().await.unwrap();
        assert!(audit.is_clean(), "seed {seed}: {audit:?}");
        assert_eq!(store.len(), 0, "seed {seed}: sessions left");
        for (session, released) in book.created.lock().unwrap().values() {
            assert!(session.is_closed(), "seed {seed}: zombie {session:?}");
            assert_eq!(
                released.load(Ordering::SeqCst),
                1,
                "seed {seed}: {session:?}"
            );
        }
        for r in 0..ROUTERS {
            let router = RouterId::new(r);
            let status = store.router_status(router).await.unwrap();
            assert!(matches!(status, RouterStatus::Deleted(_)), "{status:?}");
        }
    });
}

#[test]
fn a_multi_thread_runtime_cut_under_many_deletions_then_resumed() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            eprintln!("WATCHDOG: hang");
            std::process::abort();
        }
    });
    for seed in 0..40 {
        case(seed);
    }
    let _ = tx.send(());
}
