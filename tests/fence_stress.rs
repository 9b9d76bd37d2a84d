//! Stress: tasks create sessions on a router while another task fences it.
//! Every create that returned `Ok` is in the fence snapshot (none is left
//! outside), and every create that started after the fence returned fails.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use session_lifecycle::{
    MemoryStore, NewSession, RouterId, SessionId, SessionStore, store::CreateErrorKind,
};

const ROUNDS: u64 = 40;
const CREATORS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_create_escapes_the_fence() {
    let store = Arc::new(MemoryStore::new());
    let next_id = Arc::new(AtomicU64::new(0));
    for round in 0..ROUNDS {
        let router = RouterId::new(round);
        let incarnation = store.register_router(router).await.unwrap();
        let fenced = Arc::new(AtomicBool::new(false));
        let creators: Vec<_> = (0..CREATORS)
            .map(|_| {
                let (store, next_id, fenced) = (store.clone(), next_id.clone(), fenced.clone());
                tokio::spawn(async move {
                    let mut accepted = Vec::new();
                    let mut refused_after_fence = 0u64;
                    for i in 0u32.. {
                        // Read before the create starts: if the fence had
                        // already returned, this create must fail.
                        let after_fence = fenced.load(Ordering::SeqCst);
                        let id = SessionId::new(next_id.fetch_add(1, Ordering::Relaxed));
                        match store.create(NewSession::new(id, router, incarnation)).await {
                            Ok(_) => {
                                assert!(!after_fence, "{id} created after the fence returned");
                                accepted.push(id);
                            }
                            Err(err) => {
                                assert!(
                                    matches!(err.kind(), CreateErrorKind::Fenced { .. }),
                                    "{err}"
                                );
                                refused_after_fence += 1;
                                if refused_after_fence > 50 {
                                    break;
                                }
                            }
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    accepted
                })
            })
            .collect();
        // Let the creators get going, then fence mid-stream.
        while store.count(router).await.unwrap() < 200 + (round as usize % 7) * 100 {
            tokio::task::yield_now().await;
        }
        let snapshot = store.fence(router).await.unwrap();
        fenced.store(true, Ordering::SeqCst);
        let in_snapshot: HashSet<SessionId> = snapshot.sessions.iter().map(|s| s.id()).collect();
        let mut accepted = 0;
        for creator in creators {
            for id in creator.await.unwrap() {
                assert!(
                    in_snapshot.contains(&id),
                    "{id} was created but is not in the snapshot"
                );
                accepted += 1;
            }
        }
        assert_eq!(
            accepted,
            in_snapshot.len(),
            "the snapshot holds only accepted creates"
        );
        assert_eq!(store.count(router).await.unwrap(), accepted);
        let late = store
            .create(NewSession::new(
                SessionId::new(u64::MAX),
                router,
                incarnation,
            ))
            .await;
        assert!(late.is_err());
        store.finish(router, incarnation).await.unwrap();
    }
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert!(store.is_empty());
}
