//! A deletion's timer kept at most four registrations, one per runtime
//! that polled it, and evicted the oldest: the one of the runtime the run
//! started on, typically the controller's main runtime, still driven. Four
//! joiners on runtimes then left idle (tasks spawned there, held, never
//! polled again) evicted it: nothing fired on the running runtime, the
//! steward slept on the run waiting for a wake, and the caller there hung
//! (I4). A third review round of stop 34; failed before its fix (none is
//! evicted now).
//! Real clock (a multi-thread runtime and idle ones); the bound only
//! detects a hang.
#![cfg(feature = "test-util")]

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{
    Backoff, CloseReason, MemoryStore, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
    SessionState, SessionStore, TerminationBatch, TerminationNotifier,
};

struct Silent;

impl TerminationNotifier for Silent {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

fn scenario(idle_joiners: usize) -> Result<(), String> {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(600))
        .notify_timeout(Duration::from_millis(100))
        .backoff(
            Backoff::new()
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
        let incarnation = store.register_router(router).await.unwrap();
        for id in 0..3 {
            let s = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
            s.attach(|_: CloseReason| {}).unwrap();
        }
        let sessions = store.sessions(router).await.unwrap();
        let caller = tokio::spawn(deleter.delete(router));
        while !sessions
            .iter()
            .all(|s| s.state() == SessionState::Terminating)
        {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        (caller, sessions)
    });
    // Joiners on runtimes then left idle: each task polls the run (its
    // confirm deadline is made again there) and is kept, unpolled.
    let mut idle = Vec::new();
    for _ in 0..idle_joiners {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            drop(tokio::spawn(deleter.delete(router)));
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        idle.push(rt);
    }
    let bound = deleter.max_wait(3) + Duration::from_secs(3);
    let outcome = busy.block_on(async { tokio::time::timeout(bound, caller).await });
    let closed = sessions.iter().filter(|s| s.is_closed()).count();
    drop(idle);
    match outcome {
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "{idle_joiners} idle joiners: the caller on the running runtime hung past \
             max_wait + 3 s ({bound:?}); {closed} of 3 closed"
        )),
    }
}

/// Control: three idle joiners (A's timer is kept) — the run ends.
#[test]
fn three_idle_joiners_do_not_strand_the_caller() {
    scenario(3).unwrap();
}

/// Four idle joiners evict the running runtime's timer: hang.
#[test]
fn four_idle_joiners_do_not_strand_the_caller() {
    scenario(4).unwrap();
}
