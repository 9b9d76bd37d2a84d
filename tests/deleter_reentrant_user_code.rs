//! A review of the deleter (stop 34), kept as a regression suite: payload `Drop`s and resource releases that call back
//! into the store and the deleter (create on the router, re-register it,
//! close its other sessions, start and drop deletions of it, confirm kept
//! confirmations) during concurrent deletions on a multi-thread runtime.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use session_lifecycle::deleter::{Confirmations, DeleteOutcome};
use session_lifecycle::{
    Backoff, CloseReason, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId,
    RouterStatus, Session, SessionId, SessionStore, TerminationBatch, TerminationNotifier,
};

type Store = MemoryStore<Payload>;
type Deleter = RouterDeleter<Store, Arc<Routers>>;

#[derive(Default)]
struct Ctx {
    store: OnceLock<Weak<Store>>,
    deleter: OnceLock<Deleter>,
    kept: Mutex<Vec<Arc<Confirmations>>>,
    created: Mutex<Vec<(Session<Payload>, Arc<AtomicUsize>)>>,
    next_id: AtomicUsize,
    drops: AtomicUsize,
    stop: AtomicBool,
}

impl Ctx {
    fn store(&self) -> Option<Arc<Store>> {
        self.store.get()?.upgrade()
    }

    /// Calls back into everything for `router`.
    fn call_back(self: &Arc<Self>, router: RouterId, reentry: bool) {
        let Some(store) = self.store() else { return };
        let _ = now(store.count(router));
        let _ = now(store.sessions(router));
        let status = now(store.router_status(router));
        if let Ok(RouterStatus::Deleted(_)) = status
            && !self.stop.load(Ordering::Relaxed)
        {
            let _ = now(store.register_router(router));
        }
        if let Ok(RouterStatus::Live(incarnation) | RouterStatus::Fenced(incarnation)) = status
            && reentry
            && !self.stop.load(Ordering::Relaxed)
        {
            // A create on the router from inside its own close.
            let id =
                SessionId::new(10_000 + (self.next_id.fetch_add(1, Ordering::Relaxed) % 40) as u64);
            let spec =
                NewSession::new(id, router, incarnation).payload(Payload(Arc::clone(self), router));
            if let Ok(session) = now(store.create(spec)) {
                let _ = track(self, session);
            }
        }
        // Close another session of the router by key.
        if let Ok(sessions) = now(store.sessions(router))
            && let Some(other) = sessions.first()
        {
            let _ = now(store.close_exact(other.key(), CloseReason::ClientClosed));
        }
        // Kept confirmations, of any router and deletion.
        let kept: Vec<_> = self
            .kept
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take(3)
            .cloned()
            .collect();
        for confirm in kept {
            confirm.confirm_all();
        }
        // Start a deletion of the router and drop it after one poll.
        if let Some(deleter) = self.deleter.get()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = deleter.delete(router).now_or_never();
            let _ = deleter.running();
            let _ = deleter.deleting();
        }
    }
}

struct Payload(Arc<Ctx>, RouterId);

impl Drop for Payload {
    fn drop(&mut self) {
        self.0.drops.fetch_add(1, Ordering::Relaxed);
        self.0.call_back(self.1, false);
    }
}

fn track(ctx: &Arc<Ctx>, session: Session<Payload>) -> Session<Payload> {
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    let back = Arc::clone(ctx);
    let router = session.router();
    if session
        .attach(move |_: CloseReason| {
            counter.fetch_add(1, Ordering::SeqCst);
            back.call_back(router, true);
        })
        .is_err()
    {
        released.store(1, Ordering::SeqCst);
    }
    ctx.created
        .lock()
        .unwrap()
        .push((session.clone(), released));
    session
}

struct Routers {
    ctx: Arc<Ctx>,
}

impl TerminationNotifier for Routers {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        let confirm = Arc::new(confirm);
        self.ctx.kept.lock().unwrap().push(Arc::clone(&confirm));
        match batch.round % 3 {
            0 => {
                // Confirm half inline: releases run in the run's own poll.
                for i in (0..confirm.len()).step_by(2) {
                    confirm.confirm(i);
                }
            }
            1 => {
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    confirm.confirm_keys(batch.sessions.iter().copied());
                });
            }
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn user_code_calling_back_during_concurrent_deletions() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            eprintln!("WATCHDOG: hang (deadlock?)");
            std::process::abort();
        }
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let ctx = Arc::new(Ctx::default());
    runtime.block_on(async {
        let store: Arc<Store> = Arc::new(MemoryStore::builder().build().unwrap());
        ctx.store.set(Arc::downgrade(&store)).ok();
        let deleter: Deleter = RouterDeleter::builder()
            .batch_size(4)
            .max_concurrent(2)
            .confirm_timeout(Duration::from_millis(10))
            .notify_timeout(Duration::from_millis(20))
            .backoff(
                Backoff::new()
                    .retries(1)
                    .delays(Duration::from_millis(2), Duration::from_millis(4)),
            )
            .build(
                Arc::clone(&store),
                Arc::new(Routers {
                    ctx: Arc::clone(&ctx),
                }),
            )
            .unwrap();
        ctx.deleter.set(deleter.clone()).ok();
        for round in 0..40u64 {
            let mut tasks = Vec::new();
            for r in 0..5u64 {
                let router = RouterId::new(r);
                let incarnation = match store.register_router(router).await {
                    Ok(incarnation) => incarnation,
                    Err(_) => match store.router_status(router).await.unwrap() {
                        RouterStatus::Live(incarnation) => incarnation,
                        _ => continue,
                    },
                };
                for i in 0..12u64 {
                    let id = SessionId::new(r * 100 + (i + round) % 30);
                    let spec = NewSession::new(id, router, incarnation)
                        .payload(Payload(Arc::clone(&ctx), router));
                    if let Ok(session) = store.create(spec).await {
                        let _ = track(&ctx, session);
                    }
                }
                let deleter = deleter.clone();
                tasks.push(tokio::spawn(async move { deleter.delete(router).await }));
            }
            for task in tasks {
                match task.await.unwrap() {
                    Ok(DeleteOutcome::Deleted(report)) => {
                        let sum = report.confirmed
                            + report.already_closed
                            + report.closed_otherwise
                            + report.forced;
                        assert_eq!(sum, report.sessions, "{report:?}");
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        ctx.stop.store(true, Ordering::Relaxed);
        for r in 0..5u64 {
            let _ = deleter.delete(RouterId::new(r)).await.unwrap();
        }
        deleter.shutdown().await;
        let audit = store.audit().await.unwrap();
        assert!(audit.is_clean(), "{audit:?}");
        for r in 0..5u64 {
            let status = store.router_status(RouterId::new(r)).await.unwrap();
            assert!(matches!(status, RouterStatus::Deleted(_)), "{status:?}");
        }
        assert_eq!(store.len(), 0);
        let created = ctx.created.lock().unwrap();
        for (session, released) in created.iter() {
            assert!(session.is_closed(), "zombie {session:?}");
            assert_eq!(released.load(Ordering::SeqCst), 1, "{session:?}");
        }
        eprintln!(
            "{} sessions, {} payload drops so far",
            created.len(),
            ctx.drops.load(Ordering::Relaxed)
        );
    });
    drop(runtime);
    // Break the cycles (payloads hold the context).
    ctx.kept.lock().unwrap().clear();
    ctx.created.lock().unwrap().clear();
    let _ = tx.send(());
}

/// A memory store's call, resolved in its first poll.
fn now<F: std::future::Future>(f: F) -> F::Output {
    f.now_or_never().expect("the memory store answers at once")
}
