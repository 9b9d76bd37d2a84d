//! `EtcdStore` against a real etcd server.
//!
//! The endpoint comes from `SESSION_LIFECYCLE_ETCD` (`scripts/test-etcd.sh`
//! starts a throwaway etcd and sets it). Without it every test here prints
//! that it did not run and passes, unless `SESSION_LIFECYCLE_ETCD_REQUIRED`
//! is set (as `.ci/run` does), which turns a missing endpoint into a failure.
//! Each test works under its own key prefix, so they run in parallel on one
//! etcd (`SESSION_LIFECYCLE_ETCD` may name several endpoints, comma-separated:
//! a cluster). The `own_etcd_*` test starts its own etcd (the `etcd` binary,
//! or `SESSION_LIFECYCLE_ETCD_BIN`, on ports chosen at run time) so it can
//! stop and restart it.
#![cfg(feature = "etcd")]

mod etcd_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_support::{Cluster, unique_prefix};
use session_lifecycle::etcd::client::{GetOptions, Txn, TxnOp};
use session_lifecycle::etcd::{EtcdError, EtcdStore};
use session_lifecycle::test_util::conformance::{
    Backend, ForcedReleases, StressSizes, deleter_stress, soak_rounds, store_follows_the_model,
};
use session_lifecycle::test_util::{Notify, ScriptedNotifier, Subset};
use session_lifecycle::{
    CloseReason, Incarnation, NewSession, RouterDeleter, RouterId, Session, SessionId,
    SessionState, SessionStore, deleter::DeleteOutcome, store::CreateErrorKind, store::FenceError,
    store::RepairAction, store::RouterStatus,
};
use tokio::time::{Duration, timeout};

/// The etcd endpoints, comma-separated, or `None` (after saying so) when
/// the tests cannot run.
fn endpoint() -> Option<String> {
    etcd_support::endpoints().map(|endpoints| endpoints.join(","))
}

async fn store_at<P: session_lifecycle::etcd::EtcdPayload>(
    endpoint: &str,
    prefix: &str,
) -> EtcdStore<P> {
    EtcdStore::builder()
        .endpoints(endpoint.split(',').map(str::to_owned))
        .prefix(prefix)
        .request_timeout(Duration::from_secs(5))
        .write_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("etcd is reachable")
}

/// Waits (bounded) for a session handle to close.
async fn closed_within(session: &Session<impl Sized>, limit: Duration) -> Option<CloseReason> {
    timeout(limit, session.closed()).await.ok()?;
    session.close_reason()
}

const WAIT: Duration = Duration::from_secs(10);

/// Two controllers (two stores) on one fresh prefix, with router 1
/// registered through the first; `None` when the tests cannot run.
async fn two_controllers<P: session_lifecycle::etcd::EtcdPayload>(
    test: &str,
) -> Option<(EtcdStore<P>, EtcdStore<P>, String, Incarnation)> {
    let endpoint = endpoint()?;
    let prefix = unique_prefix(test);
    let a = store_at(&endpoint, &prefix).await;
    let b = store_at(&endpoint, &prefix).await;
    let incarnation = a.register_router(RouterId::new(1)).await.unwrap();
    Some((a, b, prefix, incarnation))
}

/// Creates sessions `ids` on `router` through `store`, in order.
async fn fill<P: session_lifecycle::etcd::EtcdPayload + Default>(
    store: &EtcdStore<P>,
    router: RouterId,
    incarnation: session_lifecycle::Incarnation,
    ids: std::ops::RangeInclusive<u64>,
) -> Vec<Session<P>> {
    let mut sessions = Vec::new();
    for id in ids {
        let spec = NewSession::new(SessionId::new(id), router, incarnation).payload(P::default());
        sessions.push(store.create(spec).await.expect("created"));
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_fence_finish_follow_the_store_contract() {
    let Some(endpoint) = endpoint() else { return };
    let store: EtcdStore = store_at(&endpoint, &unique_prefix("contract")).await;
    let router = RouterId::new(7);

    // Unknown router.
    let refused = store
        .create(NewSession::new(SessionId::new(1), router, 1.into()))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), &CreateErrorKind::UnknownRouter(router));
    assert!(store.router_status(router).await.is_err());

    let first = store.register_router(router).await.unwrap();
    assert_eq!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Live(first)
    );
    assert!(store.register_router(router).await.is_err());

    let sessions = fill(&store, router, first, 1..=5).await;
    assert_eq!(store.count(router).await.unwrap(), 5);
    // Duplicate id, stale incarnation.
    let duplicate = store
        .create(NewSession::new(SessionId::new(3), router, first))
        .await
        .unwrap_err();
    assert_eq!(
        duplicate.kind(),
        &CreateErrorKind::DuplicateSession(SessionId::new(3))
    );
    let stale = store
        .create(NewSession::new(
            SessionId::new(9),
            router,
            (first.get() - 1).into(),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(stale.kind(), CreateErrorKind::StaleIncarnation { live: Some(l), .. } if *l == first)
    );
    // The store hands out one handle per session.
    let got = store.get(SessionId::new(2)).await.unwrap().unwrap();
    assert!(Session::ptr_eq(&got, &sessions[1]));
    assert!(store.get(SessionId::new(99)).await.unwrap().is_none());

    // A client close removes; a handle close stays until removed.
    let outcome = store
        .close(SessionId::new(1), CloseReason::ClientClosed)
        .await
        .unwrap();
    assert!(outcome.won());
    assert!(sessions[0].is_closed());
    assert!(store.get(SessionId::new(1)).await.unwrap().is_none());
    let _ = sessions[1].close(CloseReason::LivenessTimeout);
    store.flush().await.unwrap();
    let audit = store.audit().await.unwrap();
    assert!(audit.is_consistent(), "{audit:?}");
    assert_eq!(audit.closed_in_store, vec![SessionId::new(2)]);
    let census = store.census().await.unwrap();
    assert_eq!((census[0].active, census[0].closed), (3, 1));

    // Fence: a snapshot of the 4 left, then no create (I2).
    let snapshot = store.fence(router).await.unwrap();
    assert!(snapshot.newly_fenced);
    assert_eq!(snapshot.sessions.len(), 4);
    let late = store
        .create(NewSession::new(SessionId::new(10), router, first))
        .await
        .unwrap_err();
    assert!(matches!(late.kind(), CreateErrorKind::Fenced { .. }));
    assert!(matches!(
        store.register_router(router).await,
        Err(session_lifecycle::RegisterError::Deleting { .. })
    ));
    let again = store.fence(router).await.unwrap();
    assert!(!again.newly_fenced);

    let report = store.finish(router, first).await.unwrap();
    assert_eq!((report.removed, report.closed), (4, 3));
    assert!(sessions.iter().all(Session::is_closed));
    assert_eq!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Deleted(first)
    );
    assert!(matches!(
        store.fence(router).await,
        Err(FenceError::AlreadyDeleted { .. })
    ));
    assert_eq!(store.count(router).await.unwrap(), 0);
    assert!(store.audit().await.unwrap().is_clean());
    assert_eq!(store.cached(), 0);

    // A new life: a larger incarnation; the old one is refused.
    let second = store.register_router(router).await.unwrap();
    assert!(second > first);
    let old = store
        .create(NewSession::new(SessionId::new(11), router, first))
        .await
        .unwrap_err();
    assert!(matches!(
        old.kind(),
        CreateErrorKind::StaleIncarnation { .. }
    ));
    let reused = store
        .create(NewSession::new(SessionId::new(3), router, second))
        .await
        .unwrap();
    assert_eq!(reused.incarnation(), second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_token_are_shared_between_controllers() {
    let Some((a, b, _, incarnation)) = two_controllers::<String>("payload").await else {
        return;
    };
    let router = RouterId::new(1);
    let spec = NewSession::new(SessionId::new(1), router, incarnation)
        .token(b"s3cret".to_vec())
        .payload(String::from("alice"));
    let _ = a.create(spec).await.unwrap();
    let seen = b.get(SessionId::new(1)).await.unwrap().unwrap();
    assert_eq!(seen.payload(), "alice");
    assert!(seen.with_token(|token| token == Some(b"s3cret".as_slice())));
    assert_eq!(seen.incarnation(), incarnation);
    assert_eq!(
        b.router_status(router).await.unwrap(),
        RouterStatus::Live(incarnation)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_by_any_controller_resolves_closed_on_every_handle() {
    let Some((a, b, _, incarnation)) = two_controllers::<()>("cross").await else {
        return;
    };
    let router = RouterId::new(1);
    let on_a = fill(&a, router, incarnation, 1..=3).await;
    let on_b = b.sessions(router).await.unwrap();
    assert_eq!(on_b.len(), 3);
    let b_of = |id: u64| on_b.iter().find(|s| s.id().get() == id).unwrap().clone();

    // A closes a handle: B's handle closes with the same reason.
    let _ = on_a[0].close(CloseReason::LivenessTimeout);
    assert_eq!(
        closed_within(&b_of(1), WAIT).await,
        Some(CloseReason::LivenessTimeout)
    );
    // B closes through its store: A's handle closes, the session is gone.
    let _ = b
        .close(SessionId::new(2), CloseReason::ClientClosed)
        .await
        .unwrap();
    assert_eq!(
        closed_within(&on_a[1], WAIT).await,
        Some(CloseReason::ClientClosed)
    );
    assert!(a.get(SessionId::new(2)).await.unwrap().is_none());
    // B removes: A's handle closes (reclaimed).
    let _ = b.remove(SessionId::new(3)).await.unwrap();
    assert_eq!(
        closed_within(&on_a[2], WAIT).await,
        Some(CloseReason::Reclaimed)
    );
    assert_eq!(a.count(router).await.unwrap(), 1); // the closed one, not removed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deleter_drives_a_deletion_on_etcd_with_no_zombie() {
    let Some(endpoint) = endpoint() else { return };
    let prefix = unique_prefix("deleter");
    let store = Arc::new(store_at::<()>(&endpoint, &prefix).await);
    let router = RouterId::new(3);
    let incarnation = store.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let sessions = fill(&store, router, incarnation, 1..=300).await;
    for session in &sessions {
        let released = Arc::clone(&released);
        session
            .attach(move |_: CloseReason| {
                released.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
    }
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::EvenIds));
    let deleter = RouterDeleter::builder()
        .batch_size(64)
        .confirm_timeout(Duration::from_millis(300))
        .retries(1)
        .build(Arc::clone(&store), Arc::clone(&notifier))
        .expect("valid settings");
    let outcome = timeout(Duration::from_secs(30), deleter.delete(router))
        .await
        .unwrap()
        .unwrap();
    let DeleteOutcome::Deleted(report) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(report.sessions, 300);
    assert_eq!(report.confirmed, 150);
    assert_eq!(report.forced, 150);
    // I1: every session closed, every resource released once, none stored.
    assert!(sessions.iter().all(Session::is_closed));
    assert_eq!(released.load(Ordering::SeqCst), 300);
    for session in &sessions {
        let expected = if session.id().get() % 2 == 0 {
            CloseReason::RouterDeleted
        } else {
            CloseReason::Forced
        };
        assert_eq!(session.close_reason(), Some(expected));
    }
    assert_eq!(store.count(router).await.unwrap(), 0);
    assert_eq!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Deleted(incarnation)
    );
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!(audit.sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_fenced_by_a_dead_controller_is_resumed_by_another() {
    let Some(endpoint) = endpoint() else { return };
    let prefix = unique_prefix("resume");
    let router = RouterId::new(5);
    let b = Arc::new(store_at::<()>(&endpoint, &prefix).await);
    let (incarnation, a_handles) = {
        let a: EtcdStore = store_at(&endpoint, &prefix).await;
        let incarnation = a.register_router(router).await.unwrap();
        let handles = fill(&a, router, incarnation, 1..=40).await;
        // A fences and marks (as its deleter would), then dies.
        let snapshot = a.fence(router).await.unwrap();
        assert!(snapshot.newly_fenced);
        for session in &snapshot.sessions {
            let _ = session.begin_terminating();
        }
        (incarnation, handles)
    }; // A is dropped here

    // Creates through B after A's fence are refused (I2).
    let late = b
        .create(NewSession::new(SessionId::new(100), router, incarnation))
        .await
        .unwrap_err();
    assert!(
        matches!(late.kind(), CreateErrorKind::Fenced { .. }),
        "{late:?}"
    );

    let deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(200))
        .retries(0)
        .build(
            Arc::clone(&b),
            ScriptedNotifier::always(Arc::clone(&b), Notify::Confirm(Subset::EvenIds)),
        )
        .expect("valid settings");
    let outcome = timeout(Duration::from_secs(30), deleter.delete(router))
        .await
        .unwrap()
        .unwrap();
    let DeleteOutcome::Deleted(report) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(report.resumed);
    assert_eq!(report.sessions, 40);
    assert_eq!((report.confirmed, report.forced), (20, 20));
    assert_eq!(
        b.router_status(router).await.unwrap(),
        RouterStatus::Deleted(incarnation)
    );
    assert_eq!(b.count(router).await.unwrap(), 0);
    assert!(b.audit().await.unwrap().is_clean());
    // A's store is gone, and its watch with it: the handles A still holds
    // are not told about B's deletion (they stay as A's deleter left them).
    assert!(
        a_handles
            .iter()
            .all(|s| s.state() == SessionState::Terminating)
    );
    let again = b
        .create(NewSession::new(SessionId::new(101), router, incarnation))
        .await
        .unwrap_err();
    assert!(matches!(
        again.kind(),
        CreateErrorKind::RouterDeleted { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_and_repair_fixes_a_corrupted_store() {
    let Some(endpoint) = endpoint() else { return };
    let prefix = unique_prefix("repair");
    let store: EtcdStore = store_at(&endpoint, &prefix).await;
    let client = store.client().clone();
    let (live, gone) = (RouterId::new(1), RouterId::new(2));
    let incarnation = store.register_router(live).await.unwrap();
    let old = store.register_router(gone).await.unwrap();
    let _ = fill(&store, live, incarnation, 1..=6).await;
    let orphan = store
        .create(NewSession::new(SessionId::new(20), gone, old))
        .await
        .unwrap();
    let _ = store.fence(gone).await.unwrap();
    let _ = store.finish(gone, old).await.unwrap();
    assert!(orphan.is_closed());
    assert!(store.audit().await.unwrap().is_clean());

    let handle_2 = store.get(SessionId::new(2)).await.unwrap().unwrap();
    let key = |suffix: String| format!("{prefix}{suffix}");
    let record = |router: u64, id: u64| key(format!("r/{router:016x}/s/{id:016x}"));
    let pointer = |id: u64| key(format!("s/{id:016x}"));
    let mut kv = client.kv_client();
    // 1: a record whose pointer is lost (restored).
    kv.delete(pointer(1), None).await.unwrap();
    // 2: a pointer whose record is lost (the id is released).
    kv.delete(record(1, 2), None).await.unwrap();
    // 3: a record under the deleted router (an orphan), with its pointer.
    let value = kv.get(record(1, 3), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    let _ = kv
        .txn(Txn::new().and_then([
            TxnOp::put(record(2, 30), value, None),
            TxnOp::put(pointer(30), 2u64.to_be_bytes(), None),
        ]))
        .await
        .unwrap();
    // 4: a closed session left in the store.
    let closed = store.get(SessionId::new(4)).await.unwrap().unwrap();
    let _ = closed.close(CloseReason::ClientClosed);
    store.flush().await.unwrap();

    let findings = store.audit().await.unwrap();
    assert_eq!(findings.missing_from_map, vec![(live, SessionId::new(1))]);
    assert_eq!(findings.missing_from_index, vec![SessionId::new(2)]);
    assert_eq!(findings.orphans, vec![SessionId::new(30)]);
    assert_eq!(findings.closed_in_store, vec![SessionId::new(4)]);
    // The watch saw record 2 go: its handle is closed already.
    assert_eq!(
        closed_within(&handle_2, WAIT).await,
        Some(CloseReason::Reclaimed)
    );

    let mut repairs = store.repair(&findings).await.unwrap();
    repairs.sort_by_key(|r| r.session);
    let actions: Vec<_> = repairs
        .iter()
        .map(|r| (r.session.get(), r.action))
        .collect();
    assert_eq!(
        actions,
        vec![
            (1, RepairAction::Restored),
            (2, RepairAction::OrphanReclaimed),
            (4, RepairAction::ClosedRemoved),
            (30, RepairAction::OrphanReclaimed),
        ]
    );
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!(store.count(live).await.unwrap(), 4); // 1, 3, 5, 6
    // A second repair of the same findings changes nothing.
    assert!(store.repair(&findings).await.unwrap().is_empty());
}

/// On an etcd of its own: a compaction is global, and would cut off the
/// watches of the tests running beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_compacted_watch_relists_and_closes_what_it_missed() {
    if endpoint().is_none() {
        return;
    }
    let etcd = Cluster::start("compact", 1, &[]).await;
    let endpoint = etcd.endpoints().join(",");
    let prefix = unique_prefix("compact");
    let a: EtcdStore = store_at(&endpoint, &prefix).await;
    let b: EtcdStore = store_at(&endpoint, &prefix).await;
    let incarnation = a.register_router(RouterId::new(1)).await.unwrap();
    let router = RouterId::new(1);
    let _ = fill(&a, router, incarnation, 1..=3).await;
    let on_b = b.sessions(router).await.unwrap();
    let suspended = b.suspend_watch();
    // While B's watch is away: one session closed, one removed, then
    // everything before now compacted.
    let _ = a
        .get(SessionId::new(1))
        .await
        .unwrap()
        .unwrap()
        .close(CloseReason::ClientClosed);
    a.flush().await.unwrap();
    let _ = a.remove(SessionId::new(2)).await.unwrap();
    let mut kv = a.client().kv_client();
    let revision = kv
        .get(
            format!("{prefix}x"),
            Some(GetOptions::new().with_count_only()),
        )
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    kv.compact(revision, None).await.unwrap();
    drop(suspended);

    let by_id = |id: u64| on_b.iter().find(|s| s.id().get() == id).unwrap();
    assert_eq!(
        closed_within(by_id(1), WAIT).await,
        Some(CloseReason::ClientClosed)
    );
    assert_eq!(
        closed_within(by_id(2), WAIT).await,
        Some(CloseReason::Reclaimed)
    );
    assert!(!by_id(3).is_closed());
    // And the watch works again after the re-list.
    let _ = a
        .close(SessionId::new(3), CloseReason::RouterLost)
        .await
        .unwrap();
    assert_eq!(
        closed_within(by_id(3), WAIT).await,
        Some(CloseReason::RouterLost)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_a_typed_error() {
    if endpoint().is_none() {
        return;
    }
    // Nothing listens on port 9 of loopback.
    let error = EtcdStore::builder()
        .endpoint("http://127.0.0.1:9")
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_millis(500))
        .retry_deadline(Duration::from_millis(500))
        .connect::<()>()
        .await
        .unwrap_err();
    assert!(matches!(error, EtcdError::Connect { .. }), "{error}");
    assert!(error.to_string().contains("127.0.0.1:9"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_write_never_touches_a_later_life_of_the_id() {
    let Some((a, b, prefix, first)) = two_controllers::<()>("lives").await else {
        return;
    };
    let router = RouterId::new(1);
    let old = a
        .create(NewSession::new(SessionId::new(1), router, first))
        .await
        .unwrap();
    // While A does not hear etcd, B removes the session and creates a new
    // life of its id.
    let deaf = a.suspend_watch();
    let _ = b.remove(SessionId::new(1)).await.unwrap();
    let new = b
        .create(NewSession::new(SessionId::new(1), router, first))
        .await
        .unwrap();
    // A's stale handle closes now: its write must not land on the new life.
    let _ = old.close(CloseReason::ClientClosed);
    a.flush().await.unwrap();
    drop(deaf);
    let mut kv = b.client().kv_client();
    let record = format!("{prefix}r/{:016x}/s/{:016x}", router.get(), 1);
    let stored = kv.get(record, None).await.unwrap();
    let value = stored.kvs()[0].value();
    assert_eq!(value[1], 0, "the new life's record is still open");
    assert!(!new.is_closed());
    let on_b = b.get(SessionId::new(1)).await.unwrap().unwrap();
    assert!(Session::ptr_eq(&on_b, &new));
    assert!(b.audit().await.unwrap().is_clean());
}

/// etcd killed and restarted under two controllers (an etcd of the test's
/// own, on ports chosen at run time, so suites can run side by side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_restarting_mid_run_gives_errors_then_catches_up() {
    if endpoint().is_none() {
        return;
    }
    let mut etcd = Cluster::start("restart", 1, &[]).await;
    let url = etcd.members[0].url();
    let prefix = unique_prefix("fault");
    let connect = || {
        EtcdStore::builder()
            .endpoint(&url)
            .prefix(&prefix)
            .request_timeout(Duration::from_millis(800))
            .connect_timeout(Duration::from_millis(800))
            .retry_deadline(Duration::from_secs(1))
            .write_timeout(Duration::from_millis(800))
            .connect::<()>()
    };
    let a = connect().await.unwrap();
    let b = connect().await.unwrap();
    let router = RouterId::new(1);
    let incarnation = a.register_router(router).await.unwrap();
    let sessions = fill(&a, router, incarnation, 1..=4).await;
    let on_b = b.sessions(router).await.unwrap();

    etcd.members[0].kill();
    // Typed errors, nothing half-applied.
    let refused = a
        .create(NewSession::new(SessionId::new(9), router, incarnation))
        .await
        .unwrap_err();
    assert!(
        matches!(refused.kind(), CreateErrorKind::Backend(_)),
        "{refused:?}"
    );
    assert!(a.count(router).await.is_err());
    assert!(a.fence(router).await.is_err());
    // A close made while etcd is down is kept and retried.
    let _ = sessions[0].close(CloseReason::ClientClosed);
    let pending = a.flush().await.unwrap_err();
    assert!(
        matches!(pending, EtcdError::WritePending { .. }),
        "{pending}"
    );

    etcd.members[0].start();
    etcd.wait_for_leader(Duration::from_secs(30)).await;
    // The queued close lands; B's watch reconnects and sees it.
    timeout(WAIT, async { while a.flush().await.is_err() {} })
        .await
        .unwrap();
    let on_b_1 = on_b.iter().find(|s| s.id().get() == 1).unwrap();
    assert_eq!(
        closed_within(on_b_1, WAIT).await,
        Some(CloseReason::ClientClosed)
    );
    assert_eq!(a.count(router).await.unwrap(), 4);
    let created = a
        .create(NewSession::new(SessionId::new(9), router, incarnation))
        .await
        .unwrap();
    assert!(!created.is_closed());
    let audit = a.audit().await.unwrap();
    assert!(audit.is_consistent(), "{audit:?}");
}

/// The kit's conformance suites on etcd: a fresh prefix per store.
#[derive(Default)]
struct EtcdBackend;

impl Backend for EtcdBackend {
    type Store = EtcdStore;
    const NAME: &'static str = "EtcdStore";
    const PAUSED_TIME: bool = false;
    // A few dozen round trips per deletion, on a loaded machine, maybe to
    // a cluster whose members share one disk.
    const STORE_TIME: Duration = Duration::from_secs(10);

    async fn fresh(&self) -> Arc<EtcdStore> {
        let endpoint = std::env::var("SESSION_LIFECYCLE_ETCD").expect("checked by the test");
        Arc::new(store_at(&endpoint, &unique_prefix("suite")).await)
    }
}

/// The model-based property test `tests/store_model.rs` runs on
/// `MemoryStore` (1,000 cases there), here on etcd: 128 cases by default,
/// `PROPTEST_CASES` for more.
#[test]
fn etcd_store_follows_the_model() {
    if endpoint().is_some() {
        store_follows_the_model::<EtcdBackend>(128);
    }
}

/// The deleter stress test of `tests/deleter_stress.rs`, smaller: 6 routers
/// of 200 sessions, 4 creators (`SESSION_LIFECYCLE_SOAK` rounds).
fn etcd_sizes() -> StressSizes {
    StressSizes {
        routers: 6,
        sessions_per_router: 200,
        creators: 4,
        rounds: soak_rounds(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_deleter_stress_leaves_no_zombie() {
    if endpoint().is_none() {
        return;
    }
    deleter_stress(&EtcdBackend, etcd_sizes(), ForcedReleases::Inline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_deleter_stress_through_a_reclaim_queue_leaves_no_zombie() {
    if endpoint().is_none() {
        return;
    }
    let releases = ForcedReleases::ReclaimQueue {
        capacity: 256,
        workers: 2,
    };
    deleter_stress(&EtcdBackend, etcd_sizes(), releases).await;
}

/// Closes of records near the size limit, more than fit in one request,
/// and two lives of one id closed together: the writer splits its
/// transactions to fit etcd's limits and never stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_fits_etcd_limits_and_never_stalls() {
    let Some((a, b, _, incarnation)) = two_controllers::<String>("limits").await else {
        return;
    };
    let router = RouterId::new(1);
    let big = "x".repeat(16_000); // just under the default record limit
    let mut sessions = Vec::new();
    for id in 1..=130 {
        let spec = NewSession::new(SessionId::new(id), router, incarnation).payload(big.clone());
        sessions.push(a.create(spec).await.unwrap());
    }
    // Two lives of id 1000 closed in one batch: same record key.
    let x = SessionId::new(1000);
    let spec = NewSession::new(x, router, incarnation).payload(String::new());
    let old = a.create(spec).await.unwrap();
    let deaf = a.suspend_watch();
    let _ = b.remove(x).await.unwrap();
    let spec = NewSession::new(x, router, incarnation).payload(String::new());
    let _ = b.create(spec).await.unwrap();
    for session in &sessions {
        let _ = session.close(CloseReason::LivenessTimeout);
    }
    let _ = old.close(CloseReason::ClientClosed);
    let new = a.get(x).await.unwrap().unwrap();
    assert!(!Session::ptr_eq(&new, &old));
    let _ = new.close(CloseReason::ClientClosed);
    drop(deaf);
    a.flush().await.unwrap();
    let stats = a.writer_stats();
    assert_eq!((stats.closes, stats.refused), (132, 0), "{stats:?}");
    let census = b.census().await.unwrap();
    assert_eq!((census[0].active, census[0].closed), (0, 131), "{census:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_session_another_controller_removed_is_unknown() {
    let Some((a, b, _, incarnation)) = two_controllers::<()>("gone").await else {
        return;
    };
    let router = RouterId::new(1);
    let _ = fill(&a, router, incarnation, 1..=1).await;
    let deaf = a.suspend_watch(); // A has not heard yet
    let _ = b.remove(SessionId::new(1)).await.unwrap();
    let second = a.remove(SessionId::new(1)).await;
    drop(deaf);
    assert!(
        matches!(
            second,
            Err(session_lifecycle::SessionError::UnknownSession(_))
        ),
        "{:?}",
        second.map(|s| s.id())
    );
}

/// While one controller finishes (or fences) router 1, another removes
/// some of its sessions and creates their ids again on router 2: the
/// finish leaves router 2's pointers alone, and no snapshot of router 1
/// holds a session of router 2. Timing-dependent: each run exercises the
/// race on the sessions that happen to be moved while the listing or the
/// deletion is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_reused_on_another_router_during_a_deletion_are_left_alone() {
    let Some((a, b, _, first)) = two_controllers::<()>("reuse").await else {
        return;
    };
    let (a, b) = (Arc::new(a), Arc::new(b));
    let (doomed, other) = (RouterId::new(1), RouterId::new(2));
    let second = a.register_router(other).await.unwrap();
    const N: u64 = 2_000;
    let creates: Vec<_> = (1..=N)
        .map(|id| {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                a.create(NewSession::new(SessionId::new(id), doomed, first))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for create in creates {
        let _ = create.await.unwrap();
    }
    let deletion = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            let snapshot = a.fence(doomed).await.unwrap();
            let foreign: Vec<_> = snapshot
                .sessions
                .iter()
                .filter(|s| s.router() != doomed)
                .map(Session::id)
                .collect();
            (foreign, a.finish(doomed, first).await.unwrap())
        })
    };
    let mut reused = Vec::new();
    for id in (N - 300..=N).rev().map(SessionId::new) {
        if deletion.is_finished() {
            break;
        }
        // `remove` succeeds only if B (not the finish) removed it.
        if b.remove(id).await.is_ok() && b.create(NewSession::new(id, other, second)).await.is_ok()
        {
            reused.push(id);
        }
    }
    let (foreign, report) = deletion.await.unwrap();
    assert!(foreign.is_empty(), "router 1's snapshot holds {foreign:?}");
    assert_eq!(report.removed + reused.len(), N as usize, "{report:?}");
    let audit = b.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!(b.count(other).await.unwrap(), reused.len());
    let fresh: EtcdStore = store_at(&endpoint().unwrap(), b.prefix()).await;
    for &id in &reused {
        assert!(
            fresh.get(id).await.unwrap().is_some(),
            "{id} lost its pointer"
        );
    }
}

/// A closed session left in the store, removed, and its id used again by a
/// session closed through its handle too: a finding about the first life
/// never removes the second's record, and the sweeper waits for a second
/// sighting of that very life (I9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_closed_record_is_repaired_by_its_life_not_its_id() {
    let Some((store, _other, _prefix, incarnation)) = two_controllers::<()>("closed-lives").await
    else {
        return;
    };
    let store = Arc::new(store);
    let router = RouterId::new(1);
    let id = SessionId::new(4);
    let sweeper = session_lifecycle::AuditSweeper::builder()
        .interval(Duration::from_secs(3600))
        .build(Arc::clone(&store))
        .unwrap();

    let first = store
        .create(NewSession::new(id, router, incarnation))
        .await
        .unwrap();
    let _ = first.close(CloseReason::ClientClosed);
    store.flush().await.unwrap();
    let old_findings = store.audit().await.unwrap();
    assert_eq!(old_findings.closed_in_store, vec![id]);
    // The sweeper sees the first life once.
    assert!(sweeper.sweep().await.unwrap().repairs.is_empty());

    // The first life's record goes; a second life of the id is closed
    // through its handle and lingers.
    let _ = store.remove(id).await.unwrap();
    let second = store
        .create(NewSession::new(id, router, incarnation))
        .await
        .unwrap();
    assert!(!Session::ptr_eq(&first, &second));
    let _ = second.close(CloseReason::ClientClosed);
    store.flush().await.unwrap();

    // A repair of the first life's finding leaves the second's record.
    assert!(store.repair(&old_findings).await.unwrap().is_empty());
    assert_eq!(store.audit().await.unwrap().closed_in_store, vec![id]);
    // The sweeper sees the second life for the first time: it waits.
    assert!(sweeper.sweep().await.unwrap().repairs.is_empty());
    assert_eq!(store.audit().await.unwrap().closed_in_store, vec![id]);
    // Seen twice: removed.
    let repairs = sweeper.sweep().await.unwrap().repairs;
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(repairs[0].session, id);
    assert_eq!(repairs[0].action, RepairAction::ClosedRemoved);
    assert!(store.audit().await.unwrap().is_clean());
    sweeper.shutdown().await;
}
