//! Review of stop 35 (user code the crate runs): a grace expiry held its
//! `closing` lock (a tokio mutex of the crate) across a chunk's closes and
//! removals: the user's store (`remove_exact`) ran under it.
#![cfg(feature = "test-util")]

mod user_code_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use session_lifecycle::test_util::within;
use session_lifecycle::{CloseReason, NewSession, Reconciler, SessionId, SessionStore};
use tokio::time::Duration;
use user_code_support::{R, Wrap};

const HOUR: Duration = Duration::from_secs(3_600);

/// The user's store, on a removal, has the router reconciled (say its
/// router-sync layer asks for a reconciliation whenever a session of a
/// router is removed) and waits for it. The reconciliation cancels the
/// grace period and waits for the chunk in flight (`closing`), which waits
/// for the store: neither ever ends.
#[tokio::test(start_paused = true)]
async fn a_store_calling_back_from_a_grace_expirys_removal_does_not_deadlock() {
    let store: Arc<Wrap<()>> = Arc::new(Wrap::default());
    let incarnation = store.register_router(R).await.unwrap();
    let reconciler = Reconciler::builder()
        .grace_period(Duration::from_secs(1))
        .build(Arc::clone(&store))
        .unwrap();
    let session = store
        .create(NewSession::new(SessionId::new(1), R, incarnation))
        .await
        .unwrap();
    let called_back = Arc::new(AtomicUsize::new(0));
    {
        let reconciler = reconciler.clone();
        let called_back = Arc::clone(&called_back);
        *store.on_remove.lock() = Some(Box::new(move |_key| {
            let reconciler = reconciler.clone();
            let called_back = Arc::clone(&called_back);
            async move {
                if called_back.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = reconciler
                        .reconcile(R, incarnation, Vec::<SessionId>::new())
                        .await;
                }
            }
            .boxed()
        }));
    }
    reconciler.router_disconnected(R).await.unwrap();
    assert_eq!(
        within(HOUR, session.closed()).await,
        CloseReason::RouterLost
    );
    // The removal (and the reconciliation it waits for) ends: `shutdown`
    // waits for an expiry still running.
    within(HOUR, reconciler.shutdown()).await;
    assert!(store.inner.get(SessionId::new(1)).await.unwrap().is_none());
    // The expiry's removal called back, and so did the reconciliation's
    // own removal of the session it found closed and still stored.
    assert_eq!(called_back.load(Ordering::SeqCst), 2);
    *store.on_remove.lock() = None; // the cycle store → hook → reconciler
}
