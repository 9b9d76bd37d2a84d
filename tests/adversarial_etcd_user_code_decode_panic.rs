//! Review of the etcd store (stop 35): a payload `decode` (user code) that
//! panics was not contained. The store contains a `decode` that returns an
//! error (the record is "unreadable": left out of listings and the fence's
//! snapshot, an error for `get`, deleted by `finish`, I10: "a record it
//! cannot read is reported and still deleted, never a reason for a router
//! to stay fenced"), but `Shared::load` (cache.rs) and `keys::decode`
//! call `P::decode` bare: a record on which it panics (a payload written by
//! another controller version, say, and a `decode` that slices
//! `bytes[..8]`) makes every fence of its router panic, so the deleter's
//! run ends `Interrupted` each time and the router stays fenced for good;
//! `get`, `sessions` and `audit` let the panic out to their caller.
#![cfg(feature = "etcd")]

mod etcd_support;

use std::sync::Arc;

use etcd_support::{endpoints, store_on_suite as store, unique_prefix};
use futures::FutureExt;
use session_lifecycle::etcd::{EtcdPayload, EtcdStore};
use session_lifecycle::store::RouterStatus;
use session_lifecycle::{
    NewSession, NotifyError, RouterDeleter, RouterId, SessionId, SessionStore, TerminationBatch,
    TerminationNotifier,
};
use std::panic::AssertUnwindSafe;
use tokio::time::{Duration, timeout};

/// A payload of 8 bytes whose `decode` assumes it has 8 (slices, unwraps):
/// it panics on any other record (a careless but common decoder).
struct Strict(u64);

impl EtcdPayload for Strict {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Strict(u64::from_be_bytes(bytes[..8].try_into().unwrap())))
    }
}

const R: RouterId = RouterId::new(9);

/// Controller `old` (payload `Vec<u8>`) writes session 5 with a 3-byte
/// payload; controller `new` (payload `Strict`) holds session 1 of its own.
async fn mixed(prefix: &str) -> (EtcdStore<Vec<u8>>, EtcdStore<Strict>) {
    let old: EtcdStore<Vec<u8>> = store(prefix).await;
    let new: EtcdStore<Strict> = store(prefix).await;
    let incarnation = new.register_router(R).await.unwrap();
    let mine = NewSession::new(SessionId::new(1), R, incarnation).payload(Strict(1));
    drop(new.create(mine).await.unwrap());
    let theirs = NewSession::new(SessionId::new(5), R, incarnation).payload(vec![1, 2, 3]);
    drop(old.create(theirs).await.unwrap());
    old.flush().await.unwrap();
    (old, new)
}

struct Deaf;

impl TerminationNotifier for Deaf {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// I10: the record `new` cannot read must not keep the router fenced.
/// Each `delete` by `new` panics in its fence (`load` -> `P::decode`),
/// caught by the deleter as `Interrupted`: the router is never deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_decode_that_panics_never_keeps_a_router_fenced() {
    if endpoints().is_none() {
        return;
    }
    let prefix = unique_prefix("rv-etcd2-decode-panic");
    let (_old, new) = mixed(&prefix).await;
    let new = Arc::new(new);
    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(200))
        .retries(0)
        .build(Arc::clone(&new), Arc::new(Deaf))
        .expect("valid settings");
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let outcome = timeout(Duration::from_secs(5), deleter.delete(R))
            .await
            .expect("the deletion ends");
        let done = outcome.is_ok();
        outcomes.push(format!("{outcome:?}"));
        if done {
            break;
        }
    }
    let status = new.router_status(R).await.unwrap();
    assert!(
        matches!(status, RouterStatus::Deleted(_)),
        "three deletions of the router failed ({outcomes:?}); it stays {status:?} \
         because `decode` panics on one record"
    );
}

/// `get`, `sessions` and `audit` on `new`: a record `decode` cannot read
/// is an error (`get`), left out (`sessions`), reported (`audit`); a
/// `decode` that panics on it should be no different, but the panic
/// escapes each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_reads_of_a_record_whose_decode_panics_do_not_panic() {
    if endpoints().is_none() {
        return;
    }
    let prefix = unique_prefix("rv-etcd2-decode-reads");
    let (_old, new) = mixed(&prefix).await;
    let got = AssertUnwindSafe(new.get(SessionId::new(5)))
        .catch_unwind()
        .await;
    let listed = AssertUnwindSafe(new.sessions(R)).catch_unwind().await;
    let audited = AssertUnwindSafe(new.audit()).catch_unwind().await;
    let escaped: Vec<&str> = [
        ("get", got.is_err()),
        ("sessions", listed.is_err()),
        ("audit", audited.is_err()),
    ]
    .into_iter()
    .filter_map(|(what, panicked)| panicked.then_some(what))
    .collect();
    assert!(
        escaped.is_empty(),
        "a panic of `EtcdPayload::decode` escaped {escaped:?}"
    );
    assert!(
        got.unwrap().is_err(),
        "get of an unreadable record is an error"
    );
    assert_eq!(
        listed.unwrap().unwrap().len(),
        1,
        "the unreadable record left out"
    );
}
