//! `MemoryStore` through the `SessionStore` trait: every operation and error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, RouterId, SessionId, SessionState,
    SessionStore, session::CloseOutcome, store::CreateErrorKind, store::FenceError,
    store::FinishError, store::RegisterError, store::RouterError, store::RouterStatus,
    store::SessionError,
};

const R: RouterId = RouterId::new(1);

fn spec(id: u64, incarnation: Incarnation) -> NewSession {
    NewSession::new(SessionId::new(id), R, incarnation)
}

/// The raw ids `R` lists, sorted.
async fn listed_ids(store: &MemoryStore) -> Vec<u64> {
    let mut ids: Vec<u64> = store
        .sessions(R)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id().get())
        .collect();
    ids.sort_unstable();
    ids
}

async fn store_with_router() -> (MemoryStore, Incarnation) {
    let store = MemoryStore::new();
    let incarnation = store.register_router(R).await.unwrap();
    (store, incarnation)
}

#[tokio::test]
async fn register_gives_a_live_incarnation() {
    let (store, incarnation) = store_with_router().await;
    assert_eq!(
        store.router_status(R).await.unwrap(),
        RouterStatus::Live(incarnation)
    );
    match store.register_router(R).await {
        Err(RegisterError::AlreadyRegistered {
            router,
            incarnation: live,
        }) => {
            assert_eq!((router, live), (R, incarnation));
        }
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
}

#[tokio::test]
async fn create_get_count_and_list() {
    let (store, incarnation) = store_with_router().await;
    for id in 0..5 {
        store.create(spec(id, incarnation)).await.unwrap();
    }
    assert_eq!(store.count(R).await.unwrap(), 5);
    assert_eq!(listed_ids(&store).await, vec![0, 1, 2, 3, 4]);
    let got = store.get(SessionId::new(3)).await.unwrap().unwrap();
    assert_eq!(got.state(), SessionState::Active);
    assert!(store.get(SessionId::new(99)).await.unwrap().is_none());
    assert_eq!(store.len(), 5);
}

#[tokio::test]
async fn create_on_an_unknown_router_is_refused_and_handed_back() {
    let store = MemoryStore::new();
    let err = store
        .create(spec(1, Incarnation::new(1)).token(b"t".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), CreateErrorKind::UnknownRouter(R));
    assert!(
        err.to_string()
            .starts_with("session not created: router-1 is not registered")
    );
    let back = err.into_spec();
    assert_eq!(back.id(), SessionId::new(1));
    assert!(store.is_empty());
}

#[tokio::test]
async fn create_with_a_stale_incarnation_is_refused() {
    let (store, incarnation) = store_with_router().await;
    let stale = Incarnation::new(incarnation.get() + 100);
    let err = store.create(spec(1, stale)).await.unwrap_err();
    assert_eq!(
        *err.kind(),
        CreateErrorKind::StaleIncarnation {
            router: R,
            requested: stale,
            live: Some(incarnation)
        }
    );
    assert!(store.is_empty());
}

#[tokio::test]
async fn duplicate_ids_are_refused_and_change_nothing() {
    let (store, incarnation) = store_with_router().await;
    let first = store.create(spec(7, incarnation)).await.unwrap();
    let err = store.create(spec(7, incarnation)).await.unwrap_err();
    assert_eq!(
        *err.kind(),
        CreateErrorKind::DuplicateSession(SessionId::new(7))
    );
    let stored = store.get(SessionId::new(7)).await.unwrap().unwrap();
    assert!(session_lifecycle::Session::ptr_eq(&first, &stored));
    assert_eq!(store.count(R).await.unwrap(), 1);
}

#[tokio::test]
async fn fence_refuses_every_later_create() {
    let (store, incarnation) = store_with_router().await;
    store.create(spec(1, incarnation)).await.unwrap();
    let snapshot = store.fence(R).await.unwrap();
    assert!(snapshot.newly_fenced);
    assert_eq!(snapshot.incarnation, incarnation);
    assert_eq!(snapshot.sessions.len(), 1);
    assert_eq!(
        store.router_status(R).await.unwrap(),
        RouterStatus::Fenced(incarnation)
    );
    let err = store.create(spec(2, incarnation)).await.unwrap_err();
    assert_eq!(
        *err.kind(),
        CreateErrorKind::Fenced {
            router: R,
            incarnation
        }
    );
    match store.register_router(R).await {
        Err(RegisterError::Deleting { .. }) => {}
        other => panic!("expected Deleting, got {other:?}"),
    }
}

#[tokio::test]
async fn fencing_again_resumes_with_a_fresh_snapshot() {
    let (store, incarnation) = store_with_router().await;
    for id in 0..3 {
        store.create(spec(id, incarnation)).await.unwrap();
    }
    store.fence(R).await.unwrap();
    let _ = store
        .close(SessionId::new(0), CloseReason::RouterDeleted)
        .await
        .unwrap();
    let again = store.fence(R).await.unwrap();
    assert!(!again.newly_fenced);
    assert_eq!(again.sessions.len(), 2);
}

#[tokio::test]
async fn close_closes_and_removes() {
    let (store, incarnation) = store_with_router().await;
    let session = store.create(spec(1, incarnation)).await.unwrap();
    assert_eq!(
        store
            .close(session.id(), CloseReason::ClientClosed)
            .await
            .unwrap(),
        CloseOutcome::Closed
    );
    assert_eq!(session.close_reason(), Some(CloseReason::ClientClosed));
    assert!(store.get(session.id()).await.unwrap().is_none());
    assert_eq!(store.count(R).await.unwrap(), 0);
    match store.close(session.id(), CloseReason::Forced).await {
        Err(SessionError::UnknownSession(id)) => assert_eq!(id, session.id()),
        other => panic!("expected UnknownSession, got {other:?}"),
    }
}

#[tokio::test]
async fn closing_a_handle_closed_session_reports_the_lost_race_and_removes_it() {
    let (store, incarnation) = store_with_router().await;
    let session = store.create(spec(1, incarnation)).await.unwrap();
    assert!(session.close(CloseReason::ClientClosed).won());
    let audit = store.audit().await.unwrap();
    assert!(audit.is_consistent());
    assert_eq!(audit.closed_in_store, vec![session.id()]);
    assert_eq!(
        store
            .close(session.id(), CloseReason::Forced)
            .await
            .unwrap(),
        CloseOutcome::AlreadyClosed {
            reason: CloseReason::ClientClosed
        }
    );
    assert!(store.is_empty());
    assert!(store.audit().await.unwrap().is_clean());
}

#[tokio::test]
async fn remove_closes_an_open_session_first() {
    let (store, incarnation) = store_with_router().await;
    let session = store.create(spec(1, incarnation)).await.unwrap();
    let removed = store.remove(session.id()).await.unwrap();
    assert_eq!(removed.close_reason(), Some(CloseReason::Reclaimed));
    assert!(store.is_empty());
    assert!(matches!(
        store.remove(session.id()).await,
        Err(SessionError::UnknownSession(_))
    ));
}

#[tokio::test]
async fn a_reused_id_is_not_unlinked_by_the_old_handle() {
    let (store, incarnation) = store_with_router().await;
    let old = store.create(spec(1, incarnation)).await.unwrap();
    let _ = store
        .close(old.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    let new = store.create(spec(1, incarnation)).await.unwrap();
    // Closing the old handle again through the store would find the new one
    // by id; the old handle itself is already closed and must not matter.
    assert!(!old.close(CloseReason::Forced).won());
    assert_eq!(new.state(), SessionState::Active);
    assert_eq!(store.count(R).await.unwrap(), 1);
    assert!(store.audit().await.unwrap().is_clean());
}

#[tokio::test]
async fn finish_closes_what_is_left_removes_all_and_tombstones() {
    let (store, incarnation) = store_with_router().await;
    let released = Arc::new(AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for id in 0..4 {
        let session = store.create(spec(id, incarnation)).await.unwrap();
        let released = Arc::clone(&released);
        session
            .attach(move |_| {
                released.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        sessions.push(session);
    }
    store.fence(R).await.unwrap();
    assert!(sessions[0].close(CloseReason::RouterDeleted).won()); // confirmed, still stored
    let _ = store
        .close(sessions[1].id(), CloseReason::RouterDeleted)
        .await
        .unwrap(); // confirmed and removed
    let report = store.finish(R, incarnation).await.unwrap();
    assert_eq!((report.removed, report.closed), (3, 2));
    assert!(sessions.iter().all(|s| s.is_closed()));
    assert_eq!(released.load(Ordering::SeqCst), 4);
    assert!(store.is_empty());
    assert_eq!(
        store.router_status(R).await.unwrap(),
        RouterStatus::Deleted(incarnation)
    );
    assert!(store.audit().await.unwrap().is_clean());
}

#[tokio::test]
async fn finish_errors_change_nothing() {
    let (store, incarnation) = store_with_router().await;
    store.create(spec(1, incarnation)).await.unwrap();
    assert!(matches!(
        store.finish(R, incarnation).await,
        Err(FinishError::NotFenced { .. })
    ));
    assert!(matches!(
        store.finish(RouterId::new(9), incarnation).await,
        Err(FinishError::UnknownRouter(_))
    ));
    store.fence(R).await.unwrap();
    let other = Incarnation::new(incarnation.get() + 1);
    assert!(matches!(
        store.finish(R, other).await,
        Err(FinishError::IncarnationMismatch { requested, current, .. }) if requested == other && current == incarnation
    ));
    assert_eq!(store.count(R).await.unwrap(), 1);
    store.finish(R, incarnation).await.unwrap();
    assert!(matches!(
        store.finish(R, incarnation).await,
        Err(FinishError::AlreadyDeleted { .. })
    ));
}

#[tokio::test]
async fn a_deleted_router_refuses_creates_and_fences() {
    let (store, incarnation) = store_with_router().await;
    store.fence(R).await.unwrap();
    store.finish(R, incarnation).await.unwrap();
    let err = store.create(spec(1, incarnation)).await.unwrap_err();
    assert_eq!(
        *err.kind(),
        CreateErrorKind::RouterDeleted {
            router: R,
            incarnation
        }
    );
    assert!(matches!(
        store.fence(R).await,
        Err(FenceError::AlreadyDeleted { .. })
    ));
    assert!(matches!(
        store.fence(RouterId::new(9)).await,
        Err(FenceError::UnknownRouter(_))
    ));
}

#[tokio::test]
async fn re_registering_gives_a_newer_incarnation_and_refuses_the_old() {
    let (store, old) = store_with_router().await;
    store.fence(R).await.unwrap();
    store.finish(R, old).await.unwrap();
    let new = store.register_router(R).await.unwrap();
    assert!(new > old);
    let err = store.create(spec(1, old)).await.unwrap_err();
    assert_eq!(
        *err.kind(),
        CreateErrorKind::StaleIncarnation {
            router: R,
            requested: old,
            live: Some(new)
        }
    );
    store.create(spec(1, new)).await.unwrap();
}

#[tokio::test]
async fn tombstones_are_bounded_and_old_incarnations_stay_refused() {
    let store = MemoryStore::builder()
        .tombstone_capacity(2)
        .build::<()>()
        .expect("valid settings");
    let mut deleted = Vec::new();
    for raw in 0..5 {
        let router = RouterId::new(raw);
        let incarnation = store.register_router(router).await.unwrap();
        store.fence(router).await.unwrap();
        store.finish(router, incarnation).await.unwrap();
        deleted.push((router, incarnation));
    }
    assert_eq!(store.router_count(), 2);
    let (router, incarnation) = deleted[0];
    assert!(matches!(
        store.router_status(router).await,
        Err(RouterError::UnknownRouter(_))
    ));
    let err = store
        .create(NewSession::new(SessionId::new(1), router, incarnation))
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), CreateErrorKind::UnknownRouter(router));
    // Registering the evicted id again still moves forward.
    let again = store.register_router(router).await.unwrap();
    assert!(deleted.iter().all(|(_, old)| again > *old));
    // A tombstone of a re-registered router is not evicted from under it.
    let (router, incarnation) = deleted[4];
    let fresh = store.register_router(router).await.unwrap();
    assert!(fresh > incarnation);
    let r9 = RouterId::new(9);
    let i9 = store.register_router(r9).await.unwrap();
    store.fence(r9).await.unwrap();
    store.finish(r9, i9).await.unwrap();
    assert_eq!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Live(fresh)
    );
}

#[tokio::test]
async fn router_lookups_of_unknown_routers_fail() {
    let store = MemoryStore::new();
    let unknown = RouterId::new(42);
    assert!(
        matches!(store.count(unknown).await, Err(RouterError::UnknownRouter(r)) if r == unknown)
    );
    assert!(matches!(
        store.sessions(unknown).await,
        Err(RouterError::UnknownRouter(_))
    ));
    assert!(matches!(
        store.router_status(unknown).await,
        Err(RouterError::UnknownRouter(_))
    ));
    assert_eq!(
        RouterError::UnknownRouter(unknown).to_string(),
        "router-42 is not registered"
    );
}

#[tokio::test]
async fn a_resource_may_call_back_into_the_store() {
    // Closing runs resources outside the store's locks: no deadlock.
    let store = Arc::new(MemoryStore::new());
    let incarnation = store.register_router(R).await.unwrap();
    let session = store.create(spec(1, incarnation)).await.unwrap();
    let inner = Arc::clone(&store);
    session
        .attach(move |_| {
            assert_eq!(inner.len(), 1);
            assert!(inner.router_count() >= 1);
        })
        .unwrap();
    let _ = store
        .close(session.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    store.fence(R).await.unwrap();
    store.finish(R, incarnation).await.unwrap();
}

/// A fenced router's sessions closed through the store leave the store at
/// once (get, count, listings, the audit, the id free for a new session
/// elsewhere) even though the router's index keeps their entries until
/// `finish` (issue #20: a deletion's confirmations skip the index work);
/// one closed by its handle only stays until `finish` removes it.
#[tokio::test]
async fn a_fenced_routers_closed_sessions_leave_the_store_at_once() {
    let (store, incarnation) = store_with_router().await;
    let other = RouterId::new(2);
    let elsewhere = store.register_router(other).await.unwrap();
    let mut handles = Vec::new();
    for id in 1..=4 {
        handles.push(store.create(spec(id, incarnation)).await.unwrap());
    }
    let snapshot = store.fence(R).await.unwrap();
    assert_eq!(snapshot.sessions.len(), 4);

    // Confirmed through the store (by key, by id, removed).
    let closed = store
        .close_exact(handles[0].key(), CloseReason::RouterDeleted)
        .await
        .unwrap();
    assert_eq!(closed, CloseOutcome::Closed);
    let closed = store
        .close(SessionId::new(2), CloseReason::RouterDeleted)
        .await
        .unwrap();
    assert_eq!(closed, CloseOutcome::Closed);
    store.remove(SessionId::new(3)).await.unwrap();
    // Closed by its handle only: still in the store until `finish`.
    let _ = handles[3].close(CloseReason::Forced);

    for id in 1..=3 {
        assert!(store.get(SessionId::new(id)).await.unwrap().is_none());
    }
    assert!(store.get(SessionId::new(4)).await.unwrap().is_some());
    assert_eq!(store.count(R).await.unwrap(), 1);
    let listed = store.sessions(R).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id()).collect::<Vec<_>>(),
        [SessionId::new(4)]
    );
    let audit = store.audit().await.unwrap();
    assert!(audit.missing_from_map.is_empty(), "{audit:?}");
    assert!(audit.missing_from_index.is_empty(), "{audit:?}");
    // A resumed fence lists what is still in the store.
    let resumed = store.fence(R).await.unwrap();
    assert_eq!(
        resumed.sessions.iter().map(|s| s.id()).collect::<Vec<_>>(),
        [SessionId::new(4)]
    );
    // The ids of the sessions that left are free while R is still fenced.
    let reused = NewSession::new(SessionId::new(1), other, elsewhere);
    store.create(reused).await.unwrap();

    let report = store.finish(R, incarnation).await.unwrap();
    assert_eq!((report.removed, report.closed), (1, 0), "{report:?}");
    assert_eq!(store.count(R).await.unwrap(), 0);
    assert!(store.get(SessionId::new(4)).await.unwrap().is_none());
    assert_eq!(
        store
            .get(SessionId::new(1))
            .await
            .unwrap()
            .unwrap()
            .router(),
        other
    );
    assert!(store.audit().await.unwrap().is_clean());
}

#[tokio::test]
async fn unlink_closed_removes_only_closed_sessions_of_the_fenced_incarnation() {
    let (store, incarnation) = store_with_router().await;
    let mut sessions = Vec::new();
    for id in 0..10 {
        sessions.push(store.create(spec(id, incarnation)).await.unwrap());
    }
    // Live router: refused, nothing removed.
    assert!(matches!(
        store.unlink_closed(R, incarnation, &sessions).await,
        Err(FinishError::NotFenced { .. })
    ));
    let snapshot = store.fence(R).await.unwrap();
    assert_eq!(snapshot.sessions.len(), 10);
    // Half closed without leaving the store (as by handle, or forced).
    for session in &sessions[..5] {
        assert_eq!(session.close(CloseReason::Forced), CloseOutcome::Closed);
    }
    // Another router's session holding none of these ids, and a stranger
    // with a foreign incarnation: never removed through this router.
    let other = RouterId::new(2);
    let other_incarnation = store.register_router(other).await.unwrap();
    let foreign = store
        .create(NewSession::new(
            SessionId::new(100),
            other,
            other_incarnation,
        ))
        .await
        .unwrap();
    // Fenced too: its closed sessions may stay until its own `finish`.
    let _ = store.fence(other).await.unwrap();
    assert_eq!(foreign.close(CloseReason::Forced), CloseOutcome::Closed);
    let mut given = sessions.clone();
    given.push(foreign.clone());
    assert_eq!(
        store.unlink_closed(R, incarnation, &given).await.unwrap(),
        5
    );
    // Again: nothing left to remove.
    assert_eq!(
        store.unlink_closed(R, incarnation, &given).await.unwrap(),
        0
    );
    assert_eq!(store.count(R).await.unwrap(), 5);
    for session in &sessions[..5] {
        assert!(store.get(session.id()).await.unwrap().is_none());
    }
    for session in &sessions[5..] {
        assert!(store.get(session.id()).await.unwrap().is_some());
    }
    assert!(store.get(foreign.id()).await.unwrap().is_some());
    // Index and map agree (I7); only the other router's closed session is
    // still in the store, for its own deletion to remove.
    let audit = store.audit().await.unwrap();
    assert!(audit.missing_from_map.is_empty(), "{audit:?}");
    assert!(audit.missing_from_index.is_empty(), "{audit:?}");
    assert!(audit.orphans.is_empty(), "{audit:?}");
    assert_eq!(audit.closed_in_store, [foreign.id()], "{audit:?}");
    // `finish` closes and removes the rest; the count stays right.
    let report = store.finish(R, incarnation).await.unwrap();
    assert_eq!((report.closed, report.removed), (5, 5));
    assert_eq!(store.count(R).await.unwrap(), 0);
    // A deleted incarnation: refused.
    assert!(
        store
            .unlink_closed(R, incarnation, &sessions)
            .await
            .is_err()
    );
}

/// Ids the session map's hash keeps together (blocks of eight consecutive
/// ids) or that differ only where a weak hash would not look (the top
/// bits, the edges of `u64`): each is its own session, found, refused as a
/// duplicate and closed on its own.
#[tokio::test]
async fn ids_in_blocks_in_the_top_bits_and_at_the_edges_are_kept_apart() {
    let (store, incarnation) = store_with_router().await;
    let mut ids: Vec<u64> = (0..4_096).collect();
    ids.extend((u64::MAX - 63)..=u64::MAX);
    ids.extend((1..64_u64).flat_map(|top| (0..8).map(move |place| top << 58 | place)));
    ids.extend((512..1_024_u64).map(|k| k << 3));
    ids.sort_unstable();
    ids.dedup();
    for &id in &ids {
        store.create(spec(id, incarnation)).await.unwrap();
    }
    assert_eq!(store.len(), ids.len());
    for &id in &ids {
        let err = store.create(spec(id, incarnation)).await.unwrap_err();
        assert_eq!(
            *err.kind(),
            CreateErrorKind::DuplicateSession(SessionId::new(id))
        );
        let got = store.get(SessionId::new(id)).await.unwrap().unwrap();
        assert_eq!(got.id(), SessionId::new(id));
    }
    // Close every other id: their neighbours in the block stay, alone.
    for &id in ids.iter().step_by(2) {
        let outcome = store
            .close(SessionId::new(id), CloseReason::ClientClosed)
            .await;
        assert_eq!(outcome.unwrap(), CloseOutcome::Closed, "id {id}");
    }
    for (n, &id) in ids.iter().enumerate() {
        let got = store.get(SessionId::new(id)).await.unwrap();
        assert_eq!(
            got.map(|s| s.id()),
            (n % 2 == 1).then_some(SessionId::new(id)),
            "id {id}"
        );
    }
    assert_eq!(store.count(R).await.unwrap(), ids.len() / 2);
    let kept: Vec<u64> = ids.iter().copied().skip(1).step_by(2).collect();
    assert_eq!(listed_ids(&store).await, kept);
}
