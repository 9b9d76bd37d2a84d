//! Adversarial tests of `EtcdStore` + `RouterDeleter` under faults the
//! other etcd suites do not play: keys under the prefix that only look like
//! the store's own, stores with nested prefixes, a controller killed in the
//! middle of `finish` while the leader dies, and impaired links to single
//! members.
//!
//! Every test starts etcd processes of its own (ports chosen at run time,
//! temporary directories, killed and removed on drop), so each is named
//! `own_etcd_*`. Like the other etcd suites, they run only when
//! `SESSION_LIFECYCLE_ETCD` is set (any etcd: the tests do not use it), and
//! print that they did not run and pass otherwise, unless
//! `SESSION_LIFECYCLE_ETCD_REQUIRED` is set.
#![cfg(feature = "etcd")]

mod etcd_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use etcd_support::{Calm, Cluster, Link, Proxy, decode_u64, encode_u64, endpoints, unique_prefix};
use futures::StreamExt;
use session_lifecycle::deleter::{DeleteOutcome, DeletionReport};
use session_lifecycle::etcd::{EtcdPayload, EtcdStore, EtcdStoreBuilder};
use session_lifecycle::session::CloseOutcome;
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, CreateErrorKind, FenceError, FenceSnapshot,
    FinishError, FinishReport, RegisterError, Repair, RouterCensus, RouterError, RouterStatus,
    SessionError,
};
use session_lifecycle::{
    CloseReason, Incarnation, NewSession, NotifyError, RouterDeleter, RouterId, Session, SessionId,
    SessionKey, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Duration, timeout};

const WAIT: Duration = Duration::from_secs(15);

/// A store on `endpoints` under `prefix`, with the test's settings.
async fn store_on<P: EtcdPayload>(
    endpoints: &[String],
    prefix: &str,
    tune: impl FnOnce(EtcdStoreBuilder) -> EtcdStoreBuilder,
) -> EtcdStore<P> {
    let builder = EtcdStore::builder()
        .endpoints(endpoints.iter().cloned())
        .prefix(prefix);
    timeout(WAIT, tune(builder).connect())
        .await
        .expect("connect returns")
        .expect("etcd is reachable")
}

/// Settings for a cluster that loses members: short timeouts, a retry
/// deadline that outlasts an election.
fn resilient(builder: EtcdStoreBuilder) -> EtcdStoreBuilder {
    builder
        .request_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .keep_alive(Duration::from_secs(5), Duration::from_secs(2))
        .retry_deadline(Duration::from_secs(20))
        .write_timeout(Duration::from_secs(20))
        .member_check(Duration::from_millis(200))
}

/// Routers that never answer; tells `notified` each time it is called.
struct Silent(Arc<Notify>);

impl TerminationNotifier for Silent {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        self.0.notify_one();
        Ok(())
    }
}

/// A deleter whose routers never answer: every session is forced.
fn forcing<S: SessionStore>(store: &Arc<S>, notified: &Arc<Notify>) -> RouterDeleter<S, Silent> {
    RouterDeleter::builder()
        .batch_size(100)
        .confirm_timeout(Duration::from_millis(100))
        .retries(0)
        .build(Arc::clone(store), Silent(Arc::clone(notified)))
        .expect("valid settings")
}

fn deleted(outcome: DeleteOutcome) -> DeletionReport {
    match outcome {
        DeleteOutcome::Deleted(report) => report,
        other => panic!("not deleted: {other:?}"),
    }
}

/// Creates sessions `ids` on `router`, each with a resource counting its
/// releases in `released`.
async fn populate(
    store: &EtcdStore,
    router: RouterId,
    incarnation: Incarnation,
    ids: impl IntoIterator<Item = u64>,
    released: &Arc<AtomicUsize>,
) -> Vec<Session> {
    futures::stream::iter(ids)
        .map(|id| store.create(NewSession::new(SessionId::new(id), router, incarnation)))
        .buffer_unordered(32)
        .map(|created| {
            let session = created.expect("created");
            let released = Arc::clone(released);
            assert!(
                session
                    .attach(move |_: CloseReason| {
                        released.fetch_add(1, Ordering::SeqCst);
                    })
                    .is_ok(),
                "attached"
            );
            session
        })
        .collect()
        .await
}

/// I1 on the handles this controller holds, and on etcd.
async fn assert_gone(
    store: &EtcdStore,
    router: RouterId,
    incarnation: Incarnation,
    handles: &[Session],
    released: &AtomicUsize,
) {
    assert_eq!(
        store.router_status(router).await.unwrap(),
        RouterStatus::Deleted(incarnation)
    );
    assert_eq!(store.sessions(router).await.unwrap().len(), 0);
    for session in handles {
        assert!(session.is_closed(), "{} left open", session.id());
        timeout(WAIT, session.closed())
            .await
            .expect("every close waiter wakes");
        assert!(
            store.get(session.id()).await.unwrap().is_none(),
            "{} still in the store",
            session.id()
        );
    }
    assert_eq!(
        released.load(Ordering::SeqCst),
        handles.len(),
        "every resource released exactly once"
    );
    // I2: nothing attaches to the deleted incarnation.
    let refused = store
        .create(NewSession::new(
            SessionId::new(u64::MAX - 1),
            router,
            incarnation,
        ))
        .await
        .expect_err("a create on a deleted router is refused");
    assert!(
        !matches!(refused.kind(), CreateErrorKind::Backend(_)),
        "refused for the wrong reason: {refused}"
    );
}

async fn exists(store: &EtcdStore, key: &str) -> bool {
    let mut kv = store.client().kv_client();
    !kv.get(key, None).await.unwrap().kvs().is_empty()
}

/// Keys planted in a router's record range that are not in the store's key
/// format, though Rust's `u64::from_str_radix` reads them as hex ids: a
/// leading `+` and uppercase digits (the format is 16 lowercase hex
/// digits). They are another store's: the deletion of the router must
/// report them as foreign and leave them alone (I10), and finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_look_alike_keys_in_a_routers_range_are_foreign() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("adv-lookalike", 1, &[]).await;
    let prefix = unique_prefix("lookalike");
    let store = Arc::new(store_on::<()>(&etcd.endpoints(), &prefix, |b| b).await);
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let handles = populate(&store, router, incarnation, 1..=5, &released).await;
    let planted = [
        format!("{prefix}r/{:016x}/s/+00000000000000a", router.get()),
        format!("{prefix}r/{:016x}/s/00000000000000AB", router.get()),
    ];
    let mut kv = store.client().kv_client();
    for key in &planted {
        kv.put(key.as_str(), "another store's key", None)
            .await
            .unwrap();
    }
    let audit = store.audit().await.unwrap();

    let notified = Arc::new(Notify::new());
    let report = deleted(
        timeout(WAIT, forcing(&store, &notified).delete(router))
            .await
            .expect("the deletion finishes")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 5, "{report:?}");
    assert_gone(&store, router, incarnation, &handles, &released).await;
    let survivors: Vec<bool> =
        futures::future::join_all(planted.iter().map(|k| exists(&store, k))).await;
    assert_eq!(
        survivors,
        [true, true],
        "foreign keys {planted:?} deleted with the router (I10: never deleted)"
    );
    for key in &planted {
        assert!(
            audit.foreign.contains(key),
            "{key} not reported as foreign: {audit:?}"
        );
    }
}

/// A store whose prefix is another's `r/<router>/` would write its session
/// pointers (`A r/<router 2>/s/<id>`) in the outer store's record format:
/// `connect` refuses such a prefix. Another writer (or a store of an older
/// version) still puts and deletes such a key by hand while A's own
/// session 10, on A's router 1, is live: A's handle of it must stay open
/// and its resource unreleased (I9, I10: a key of another router never
/// acts on this store's sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_foreign_key_for_our_id_on_another_router_never_closes_ours() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("adv-nested-watch", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("nested-watch");
    let nested = format!("{prefix}r/{:016x}/", 2);
    let refused = EtcdStore::builder()
        .endpoints(endpoints.iter().cloned())
        .prefix(nested.as_str())
        .connect::<()>()
        .await
        .expect_err("a prefix nested in a router's range is refused");
    assert!(
        refused.to_string().contains("prefix"),
        "refused for another reason: {refused}"
    );
    let a: EtcdStore = store_on(&endpoints, &prefix, |b| b).await;
    let witness: EtcdStore = store_on(&endpoints, &prefix, |b| b).await;

    let router = RouterId::new(1);
    let incarnation = a.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let ours = populate(&a, router, incarnation, [10, 11], &released).await;
    let (ten, eleven) = (&ours[0], &ours[1]);
    let (ten, eleven) = if ten.id() == SessionId::new(10) {
        (ten, eleven)
    } else {
        (eleven, ten)
    };

    // Session 10's key in the range of router 2 (which A does not have),
    // written and deleted by someone else.
    let foreign = format!("{nested}s/{:016x}", 10);
    let mut kv = witness.client().kv_client();
    kv.put(foreign.as_str(), "another writer's key", None)
        .await
        .unwrap();
    kv.delete(foreign.as_str(), None).await.unwrap();

    // A sentinel after the deletion: once A's watch closed A's handle of
    // session 11 (closed through another controller), it applied every
    // earlier event, the foreign deletion included.
    let _ = witness
        .close(SessionId::new(11), CloseReason::ClientClosed)
        .await
        .unwrap();
    timeout(WAIT, eleven.closed())
        .await
        .expect("A's watch delivers the sentinel");

    assert!(
        !ten.is_closed(),
        "A's live session 10 was closed ({:?}) by another router's key for id 10",
        ten.close_reason()
    );
    assert_eq!(released.load(Ordering::SeqCst), 1, "only 11's resource");
    assert_eq!(
        witness
            .get(SessionId::new(10))
            .await
            .unwrap()
            .map(|s| s.is_closed()),
        Some(false),
        "session 10 is live in etcd"
    );
}

/// A key in the record format of a router this store never registered
/// (another writer's, under A's `r/<router 2>/`): A's audit reports it and
/// A's repair leaves it alone (I10: a key the store cannot account for is
/// removed only when it is certainly its own and dead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_repair_never_deletes_a_record_of_a_router_it_does_not_know() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("adv-nested-repair", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("nested-repair");
    let a: EtcdStore = store_on(&endpoints, &prefix, |b| b).await;
    let foreign = format!("{prefix}r/{:016x}/s/{:016x}", 2, 12);
    let mut kv = a.client().kv_client();
    kv.put(foreign.as_str(), "r/0000000000000007", None)
        .await
        .unwrap();

    let findings = a.audit().await.unwrap();
    assert!(
        findings.unreadable.contains(&foreign) || findings.foreign.contains(&foreign),
        "{foreign} not reported: {findings:?}"
    );
    let repairs = a.repair(&findings).await.unwrap();
    assert!(repairs.is_empty(), "{repairs:?}");
    assert!(exists(&a, &foreign).await, "A's repair deleted {foreign}");
}

/// Two stores with nested prefixes, B's inside the record range of A's
/// router 1 (`A r/<1>/s/nested/`): A deletes router 1 while B keeps
/// working there. B's keys are foreign to A: reported, never deleted,
/// never blocking; B's router, sessions and audit are untouched, and B
/// then deletes its own router cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_store_nested_in_a_routers_range_survives_its_deletion() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("adv-nested-range", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("nested-range");
    let router = RouterId::new(1);
    let nested = format!("{prefix}r/{:016x}/s/nested/", router.get());
    let a = Arc::new(store_on::<()>(&endpoints, &prefix, |b| b).await);
    let b = Arc::new(store_on::<()>(&endpoints, &nested, |b| b).await);
    let incarnation = a.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let ours = populate(&a, router, incarnation, 1..=50, &released).await;
    // B uses the same router and session ids in its own namespace.
    let b_incarnation = b.register_router(router).await.unwrap();
    let b_released = Arc::new(AtomicUsize::new(0));
    let theirs = populate(&b, router, b_incarnation, 1..=50, &b_released).await;

    let notified = Arc::new(Notify::new());
    let report = deleted(
        timeout(WAIT, forcing(&a, &notified).delete(router))
            .await
            .expect("A's deletion finishes past B's keys")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 50, "{report:?}");
    assert_gone(&a, router, incarnation, &ours, &released).await;
    assert!(theirs.iter().all(|s| !s.is_closed()), "B's sessions closed");
    assert_eq!(b_released.load(Ordering::SeqCst), 0);
    assert_eq!(b.count(router).await.unwrap(), 50);
    assert!(matches!(
        b.router_status(router).await.unwrap(),
        RouterStatus::Live(_)
    ));
    assert!(b.audit().await.unwrap().is_clean());
    let audit = a.audit().await.unwrap();
    assert!(audit.is_consistent(), "{audit:?}");
    assert!(!audit.foreign.is_empty(), "B's keys reported: {audit:?}");

    let report = deleted(
        timeout(WAIT, forcing(&b, &notified).delete(router))
            .await
            .expect("B's deletion finishes")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 50, "{report:?}");
    assert_gone(&b, router, b_incarnation, &theirs, &b_released).await;
    assert!(b.audit().await.unwrap().is_clean());
}

/// A `SessionStore` that delegates to an `EtcdStore`, and holds every
/// `finish` at a gate after saying so: the test acts at the very start of
/// the deletion's last phase.
struct Gated {
    inner: Arc<EtcdStore>,
    finishing: mpsc::UnboundedSender<()>,
    gate: watch::Receiver<bool>,
}

impl SessionStore for Gated {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession<()>) -> Result<Session<()>, CreateError<()>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session<()>>, BackendError> {
        self.inner.get(id).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close(id, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session<()>, SessionError> {
        self.inner.remove(id).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(key, reason).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session<()>, SessionError> {
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session<()>>, RouterError> {
        self.inner.sessions(router).await
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence_incarnation(router, incarnation).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        let _ = self.finishing.send(());
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        self.inner.finish(router, incarnation).await
    }
    async fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<()>],
    ) -> Result<usize, FinishError> {
        self.inner
            .unlink_closed(router, incarnation, sessions)
            .await
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.inner.audit().await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.inner.census().await
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.inner.repair(findings).await
    }
}

/// A 3-member cluster; controller A (a runtime of its own: a process)
/// deletes a router of 600 sessions. As A's `finish` starts, the leader is
/// SIGKILLed, and 300 ms into the election A's whole runtime is shut down
/// (the controller dies mid-finish). Controller B, on the same prefix,
/// resumes the deletion with 2 of 3 members: it finishes within its bound,
/// no session is left, B's handles are closed and their resources released
/// once, creates on the fenced router are refused throughout, and B keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_controller_dying_mid_finish_as_the_leader_dies_is_resumed() {
    if endpoints().is_none() {
        return;
    }
    let mut cluster = Cluster::start("adv-dying", 3, &[]).await;
    let endpoints = cluster.endpoints();
    let prefix = unique_prefix("dying");
    let b = Arc::new(store_on::<()>(&endpoints, &prefix, resilient).await);
    let router = RouterId::new(1);
    let incarnation = b.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let mine = populate(&b, router, incarnation, 1..=300, &released).await;

    // Controller A, in a runtime of its own, creates the other half and
    // deletes the router.
    let a_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (finishing, mut started) = mpsc::unbounded_channel();
    let (gate, gated) = watch::channel(false);
    let a_endpoints = endpoints.clone();
    let a_prefix = prefix.clone();
    let a_run = a_runtime.spawn(async move {
        let a = Arc::new(store_on::<()>(&a_endpoints, &a_prefix, resilient).await);
        let a_released = Arc::new(AtomicUsize::new(0));
        let _theirs = populate(&a, router, incarnation, 301..=600, &a_released).await;
        let store = Arc::new(Gated {
            inner: a,
            finishing,
            gate: gated,
        });
        let notified = Arc::new(Notify::new());
        forcing(&store, &notified).delete(router).await
    });
    timeout(Duration::from_secs(30), started.recv())
        .await
        .expect("A reaches finish")
        .expect("A is running");
    // Fenced: nothing attaches any more (I2).
    let refused = b
        .create(NewSession::new(SessionId::new(10_000), router, incarnation))
        .await
        .expect_err("a create on a fenced router is refused");
    assert!(
        matches!(refused.kind(), CreateErrorKind::Fenced { .. }),
        "{refused}"
    );
    let leader = cluster.wait_for_leader(WAIT).await;
    cluster.members[leader].kill();
    gate.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_runtime.shutdown_background();
    assert!(
        timeout(WAIT, a_run).await.expect("A is gone").is_err(),
        "A's deletion was cut off"
    );

    let started = tokio::time::Instant::now();
    let notified = Arc::new(Notify::new());
    let outcome = timeout(
        Duration::from_secs(40),
        forcing(&b, &notified).delete(router),
    )
    .await
    .expect("B resumes and finishes the deletion with 2 of 3 members")
    .expect("deleted");
    let took = started.elapsed();
    match outcome {
        DeleteOutcome::Deleted(report) => {
            assert_eq!(report.incarnation, incarnation);
            assert!(report.resumed, "{report:?}");
        }
        other => panic!("A could not have finished: {other:?}"),
    }
    eprintln!("resumed deletion took {took:?}");
    assert_eq!(b.count(router).await.unwrap(), 0);
    assert_gone(&b, router, incarnation, &mine, &released).await;
    let audit = timeout(WAIT, b.audit()).await.unwrap().unwrap();
    assert!(audit.is_consistent(), "{audit:?}");
    // B keeps serving on two members.
    let next = RouterId::new(2);
    let next_incarnation = b.register_router(next).await.unwrap();
    let _ = b
        .create(NewSession::new(SessionId::new(1), next, next_incarnation))
        .await
        .expect("the id of a deleted session is free again");
    assert_eq!(b.count(next).await.unwrap(), 1);
}

/// A 3-member cluster reached through one proxy per member; mid-deletion
/// the link to one member starts swallowing every answer (requests land,
/// nothing comes back) and the link to another gets slow; then the
/// swallowing link is cut and the slow one swallows. etcd itself is
/// healthy: the deletion finishes within its bound, I1 holds, and the
/// store keeps serving reads and creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_impaired_links_to_single_members_never_stall_a_deletion() {
    if endpoints().is_none() {
        return;
    }
    let cluster = Cluster::start("adv-links", 3, &[]).await;
    let mut proxies = Vec::new();
    for member in &cluster.members {
        proxies.push(Proxy::start(&[member.url()]).await);
    }
    let through: Vec<String> = proxies.iter().flat_map(Proxy::endpoints).collect();
    let prefix = unique_prefix("links");
    let store = Arc::new(store_on::<()>(&through, &prefix, resilient).await);
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let handles = populate(&store, router, incarnation, 1..=400, &released).await;

    let notified = Arc::new(Notify::new());
    let deleter = forcing(&store, &notified);
    let deletion = tokio::spawn(deleter.delete(router));
    timeout(WAIT, notified.notified()).await.expect("notified");
    proxies[0].set(Link::SwallowAnswers);
    proxies[1].set(Link::Delay(Duration::from_millis(30)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxies[0].set(Link::Cut);
    proxies[1].set(Link::SwallowAnswers);
    let report = deleted(
        timeout(Duration::from_secs(40), deletion)
            .await
            .expect("the deletion finishes past the impaired links")
            .unwrap()
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 400, "{report:?}");
    assert_gone(&store, router, incarnation, &handles, &released).await;
    // Still serving, with one good link left.
    let next = RouterId::new(2);
    let next_incarnation = timeout(WAIT, store.register_router(next))
        .await
        .expect("register returns")
        .expect("registered");
    timeout(
        WAIT,
        store.create(NewSession::new(SessionId::new(1), next, next_incarnation)),
    )
    .await
    .expect("create returns")
    .expect("created");
    assert_eq!(store.count(next).await.unwrap(), 1);
    for proxy in &proxies {
        proxy.set(Link::Pass);
    }
    let audit = timeout(WAIT, store.audit()).await.unwrap().unwrap();
    assert!(audit.is_consistent(), "{audit:?}");
}

/// Id reuse across incarnations on etcd, with two controllers: A deletes
/// router 1 (sessions 1..=20) while B holds handles of them; B registers
/// router 1 again and creates ids 1..=20 anew. A's late, repeated
/// `delete_incarnation` of the old incarnation answers `AlreadyDeleted` and
/// touches none of the new lives (I9); B's old handles closed through the
/// watch, its new ones stay open; a create naming the old incarnation is
/// refused (I2); the new incarnation then deletes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_ids_reused_across_incarnations_are_never_touched_by_a_late_delete() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("adv-reuse", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("reuse");
    let a = Arc::new(store_on::<()>(&endpoints, &prefix, |b| b).await);
    let b = Arc::new(store_on::<()>(&endpoints, &prefix, |b| b).await);
    let router = RouterId::new(1);
    let old = a.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let first = populate(&a, router, old, 1..=20, &released).await;
    let b_old = b.sessions(router).await.unwrap();
    assert_eq!(b_old.len(), 20);

    let notified = Arc::new(Notify::new());
    let on_a = forcing(&a, &notified);
    let report = deleted(
        timeout(WAIT, on_a.delete(router))
            .await
            .expect("the deletion finishes")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 20, "{report:?}");
    assert_gone(&a, router, old, &first, &released).await;
    for session in &b_old {
        timeout(WAIT, session.closed())
            .await
            .expect("B's handles of the old lives close through the watch");
    }

    let new = b.register_router(router).await.unwrap();
    assert!(new > old, "incarnations grow: {old} then {new}");
    let new_released = Arc::new(AtomicUsize::new(0));
    let second = populate(&b, router, new, 1..=20, &new_released).await;
    for _ in 0..2 {
        match timeout(WAIT, on_a.delete_incarnation(router, old))
            .await
            .expect("a late delete returns")
            .expect("answered")
        {
            DeleteOutcome::AlreadyDeleted { incarnation, .. } => assert_eq!(incarnation, old),
            other => panic!("a late delete of {old} acted: {other:?}"),
        }
    }
    let stale = b
        .create(NewSession::new(SessionId::new(100), router, old))
        .await
        .expect_err("a create naming the old incarnation is refused");
    assert!(
        !matches!(stale.kind(), CreateErrorKind::Backend(_)),
        "{stale}"
    );
    assert_eq!(
        a.router_status(router).await.unwrap(),
        RouterStatus::Live(new)
    );
    assert_eq!(a.count(router).await.unwrap(), 20);
    assert!(second.iter().all(|s| !s.is_closed()), "a new life closed");
    assert_eq!(new_released.load(Ordering::SeqCst), 0);
    for session in &second {
        let seen = a.get(session.id()).await.unwrap().expect("in the store");
        assert_eq!(
            seen.key(),
            session.key(),
            "both controllers see the new life"
        );
        assert!(!seen.is_closed());
    }
    assert_eq!(
        released.load(Ordering::SeqCst),
        20,
        "old lives released once"
    );

    let report = deleted(
        timeout(WAIT, forcing(&b, &notified).delete_incarnation(router, new))
            .await
            .expect("the new incarnation's deletion finishes")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 20, "{report:?}");
    assert_gone(&b, router, new, &second, &new_released).await;
    assert!(a.audit().await.unwrap().is_clean());
}

/// Deletes `router` of `a` (its sessions `ours`) while foreign `workers`
/// write keys in its range (counting them in `written`, until `stop`): the
/// first attempt must delete it, and the foreign keys stay. It deletes once
/// they wrote 100 keys.
#[allow(clippy::too_many_arguments)]
async fn delete_beside_foreign_writers(
    a: &Arc<EtcdStore>,
    router: RouterId,
    incarnation: Incarnation,
    ours: &[Session],
    released: &AtomicUsize,
    written: &watch::Sender<u64>,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<()>>,
) {
    timeout(WAIT, written.subscribe().wait_for(|n| *n >= 100))
        .await
        .expect("the foreign writers write")
        .expect("the counter lives");
    let notified = Arc::new(Notify::new());
    let deleter = forcing(a, &notified);
    let outcome = timeout(Duration::from_secs(15), deleter.delete(router))
        .await
        .expect("delete returns");
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let status = a.router_status(router).await.unwrap();
    let outcome = outcome.unwrap_or_else(|error| {
        panic!(
            "the deletion of {router} failed beside foreign writers: {error} ({:?}); router {status:?}, \
             {} foreign keys written",
            std::error::Error::source(&error).map(ToString::to_string),
            *written.borrow()
        )
    });
    assert_eq!(deleted(outcome).sessions, ours.len());
    assert_gone(a, router, incarnation, ours, released).await;
}

/// I10 (found by a review of stop 32; failed before): "A key in its range
/// that is not in its own key format is foreign (another store's prefix
/// may nest inside this one's): reported, never deleted, never blocking."
/// An `EtcdStore` B nested in A's router 1 range keeps creating sessions
/// on its own router while A deletes router 1. A's deletion failed with
/// `contention`, again at every retry, router 1 fenced: the tombstone was
/// guarded on no key of the range created since the last listing,
/// foreign keys included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_a_busy_nested_store_never_keeps_a_router_fenced() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv-nested-busy", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("nested-busy");
    let router = RouterId::new(1);
    let nested = format!("{prefix}r/{:016x}/s/nested/", router.get());
    let a = Arc::new(store_on::<()>(&endpoints, &prefix, |b| b).await);
    let b = Arc::new(store_on::<()>(&endpoints, &nested, |b| b).await);
    let incarnation = a.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let ours = populate(&a, router, incarnation, 1..=50, &released).await;

    let b_router = RouterId::new(9);
    let b_incarnation = b.register_router(b_router).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    let written = Arc::new(watch::Sender::new(0u64));
    let workers = (0..64)
        .map(|_| {
            let (b, stop, next, written) = (
                Arc::clone(&b),
                Arc::clone(&stop),
                Arc::clone(&next),
                Arc::clone(&written),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let id = SessionId::new(next.fetch_add(1, Ordering::Relaxed));
                    if b.create(NewSession::new(id, b_router, b_incarnation))
                        .await
                        .is_ok()
                    {
                        written.send_modify(|n| *n += 1);
                    }
                }
            })
        })
        .collect();
    delete_beside_foreign_writers(
        &a,
        router,
        incarnation,
        &ours,
        &released,
        &written,
        &stop,
        workers,
    )
    .await;
}

/// I10 (review of stop 32; failed before). The same with a plain foreign
/// writer (another program whose prefix nests in router 1's range): 16
/// writers putting new keys there, about 2,000 puts/s on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_a_busy_foreign_writer_never_keeps_a_router_fenced() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv-foreign-busy", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("foreign-busy");
    let router = RouterId::new(1);
    let nested = format!("{prefix}r/{:016x}/s/other-app/", router.get());
    let a = Arc::new(store_on::<()>(&endpoints, &prefix, |b| b).await);
    let incarnation = a.register_router(router).await.unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let ours = populate(&a, router, incarnation, 1..=50, &released).await;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(watch::Sender::new(0u64));
    let workers = (0..16u64)
        .map(|worker| {
            let (stop, written, nested) = (Arc::clone(&stop), Arc::clone(&written), nested.clone());
            let mut kv = a.client().kv_client();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("{nested}{worker}/{n}");
                    if kv.put(key.as_str(), "theirs", None).await.is_ok() {
                        written.send_modify(|n| *n += 1);
                    }
                }
            })
        })
        .collect();
    delete_beside_foreign_writers(
        &a,
        router,
        incarnation,
        &ours,
        &released,
        &written,
        &stop,
        workers,
    )
    .await;
}

/// Review of stop 32 (failed before). Cross-controller closes (the store's docs: "a close or
/// removal by any controller reaches the other controllers' handles
/// through a watch"; I1 for the other controllers' handles) after a short
/// link cut during which another controller wrote 90 records of 900 kB
/// (each within the `max_record` the builder accepts): A's watch resumes
/// from its last revision, etcd answers the catch-up in one ~81 MB
/// message, above the 64 MiB the watch decodes; the watch fails and
/// resumes from the same revision for ever (about 7 times a second, each
/// time etcd reads and sends it again). The watch now asks for fragments
/// (and re-lists on a message it cannot decode).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_a_watch_catching_up_past_big_records_still_closes_handles() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv-watch-big", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let proxy = Proxy::start(&endpoints).await;
    let prefix = unique_prefix("watch-big");
    let big = |b: EtcdStoreBuilder| {
        b.max_record(1 << 20)
            .request_timeout(Duration::from_secs(5))
            .retry_deadline(Duration::from_secs(10))
    };
    let a = Arc::new(store_on::<Vec<u8>>(&proxy.endpoints(), &prefix, big).await);
    let b = Arc::new(store_on::<Vec<u8>>(&endpoints, &prefix, big).await);
    let router = RouterId::new(1);
    let incarnation = b.register_router(router).await.unwrap();
    for id in 1..=3 {
        let _ = b
            .create(NewSession::new(SessionId::new(id), router, incarnation).payload(vec![1]))
            .await
            .unwrap();
    }
    let on_a = a.sessions(router).await.unwrap();
    assert_eq!(on_a.len(), 3);

    // A's link is cut for a moment while B writes 90 records of 900 kB
    // (81 MB) on another router.
    proxy.set(Link::Cut);
    let other = RouterId::new(2);
    let other_incarnation = b.register_router(other).await.unwrap();
    futures::stream::iter(100..190u64)
        .map(|id| {
            b.create(
                NewSession::new(SessionId::new(id), other, other_incarnation)
                    .payload(vec![id as u8; 900_000]),
            )
        })
        .buffer_unordered(8)
        .for_each(|created| {
            created.expect("created");
            async {}
        })
        .await;
    proxy.set(Link::Pass);

    // B deletes router 1: A's handles of its sessions must close.
    let notified = Arc::new(Notify::new());
    let report = deleted(
        timeout(WAIT, forcing(&b, &notified).delete(router))
            .await
            .expect("B's deletion finishes")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 3);
    assert_eq!(a.count(router).await.unwrap(), 0, "A reads etcd fine");
    for session in &on_a {
        timeout(Duration::from_secs(20), session.closed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "A's handle of {} stays open after B deleted its router (A's watch never caught up); \
                     A's store stats {:?}",
                    session.id(),
                    a.stats()
                )
            });
    }
}

/// A watch message the client cannot decode (one record past its 64 MiB
/// limit: fragments split a response only between events) makes the watch
/// re-list and resume after it; resuming into it would read it again for
/// ever, and closes by other controllers would never reach the handles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_watch_message_past_the_decode_limit_is_skipped_by_a_re_list() {
    if endpoints().is_none() {
        return;
    }
    // etcd refuses requests past 1.5 MiB unless told otherwise.
    let etcd = Cluster::start("rv-watch-huge", 1, &["--max-request-bytes=80000000"]).await;
    let endpoints = etcd.endpoints();
    let prefix = unique_prefix("watch-huge");
    let quick = |b: EtcdStoreBuilder| {
        b.request_timeout(Duration::from_secs(10))
            .retry_deadline(Duration::from_secs(10))
    };
    let a = Arc::new(store_on::<()>(&endpoints, &prefix, quick).await);
    let b = Arc::new(store_on::<()>(&endpoints, &prefix, quick).await);
    let router = RouterId::new(1);
    let incarnation = b.register_router(router).await.unwrap();
    for id in 1..=3 {
        let _ = b
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
    }
    let on_a = a.sessions(router).await.unwrap();
    assert_eq!(on_a.len(), 3);

    // Another program writes one 65 MiB value inside the range A watches.
    let mut raw = session_lifecycle::etcd::client::Client::connect(&endpoints, None)
        .await
        .expect("a raw client")
        .kv_client()
        .max_encoding_message_size(100 << 20);
    let foreign = format!("{prefix}r/zz-foreign-huge");
    raw.put(foreign.as_bytes(), vec![7u8; 65 << 20], None)
        .await
        .expect("etcd takes the huge value");

    // B deletes router 1: A's handles of its sessions must close.
    let notified = Arc::new(Notify::new());
    let report = deleted(
        timeout(WAIT, forcing(&b, &notified).delete(router))
            .await
            .expect("B's deletion finishes")
            .expect("deleted"),
    );
    assert_eq!(report.sessions, 3);
    for session in &on_a {
        timeout(Duration::from_secs(20), session.closed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "A's handle of {} stays open after B deleted its router (A's watch is stuck \
                     on the message it cannot decode); A's store stats {:?}",
                    session.id(),
                    a.stats()
                )
            });
    }
    // A still serves, and its watch moved on: a later close by B reaches A.
    let later = b
        .create(NewSession::new(
            SessionId::new(9),
            RouterId::new(2),
            b.register_router(RouterId::new(2)).await.unwrap(),
        ))
        .await
        .unwrap();
    let on_a_later = a
        .get(later.id())
        .await
        .unwrap()
        .expect("A reads the new session");
    let _ = b
        .close(later.id(), CloseReason::ClientClosed)
        .await
        .unwrap();
    timeout(Duration::from_secs(20), on_a_later.closed())
        .await
        .expect("a close after the huge message reaches A");
}

/// Whether `Touchy(7)`'s `Drop` is to panic (once).
static TOUCHY_ARMED: AtomicBool = AtomicBool::new(false);
/// Notified as `Touchy(7)`'s `Drop` panics.
static TOUCHY_FIRED: Notify = Notify::const_new();

/// A payload whose `Drop` panics once (for session 7), as user code may.
struct Touchy(u64);

impl Drop for Touchy {
    fn drop(&mut self) {
        if self.0 == 7 && TOUCHY_ARMED.swap(false, Ordering::SeqCst) {
            TOUCHY_FIRED.notify_one();
            panic!("payload 7's drop panics");
        }
    }
}

impl EtcdPayload for Touchy {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_u64(self.0, out);
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        decode_u64(bytes).map(Touchy)
    }
}

/// I1 across controllers (review of stop 33; failed before): controller
/// B's watch drops B's last handle of a session A's deletion removed, and
/// that payload's `Drop` panics. The panic ended B's watch for good: from
/// then on no close by another controller reached B's handles, and B's own
/// deletion of another router left B's handle of its session open. The
/// watch now contains each close's user code, and runs again (after a
/// re-list) if anything else in it panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_payload_drop_panicking_in_the_watch_does_not_end_it() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv-touchy", 1, &[]).await;
    let prefix = unique_prefix("touchy");
    let a = Arc::new(store_on::<Calm>(&etcd.endpoints(), &prefix, |b| b).await);
    let b = Arc::new(store_on::<Touchy>(&etcd.endpoints(), &prefix, |b| b).await);
    let router = RouterId::new(1);
    let incarnation = a.register_router(router).await.unwrap();
    for id in 1..=20u64 {
        let spec = NewSession::new(SessionId::new(id), router, incarnation).payload(Calm(id));
        let _ = a.create(spec).await.unwrap();
    }
    // B holds every handle but session 7's: its cache has that one's last.
    let on_b: Vec<_> = b
        .sessions(router)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.id() != SessionId::new(7))
        .collect();
    assert_eq!((on_b.len(), b.cached()), (19, 20));
    TOUCHY_ARMED.store(true, Ordering::SeqCst);
    let notified = Arc::new(Notify::new());
    let _ = deleted(
        timeout(WAIT, forcing(&a, &notified).delete(router))
            .await
            .expect("A's deletion ends")
            .expect("deleted"),
    );
    timeout(WAIT, TOUCHY_FIRED.notified())
        .await
        .expect("B's watch dropped session 7's last handle");
    for session in &on_b {
        timeout(WAIT, session.closed())
            .await
            .expect("B's handles close");
    }

    // A close on A still reaches B's handle, and B's own deletion of
    // another router leaves none of B's handles open (I1).
    let next = RouterId::new(2);
    let next_incarnation = a.register_router(next).await.unwrap();
    let s = a
        .create(NewSession::new(SessionId::new(100), next, next_incarnation).payload(Calm(100)))
        .await
        .unwrap();
    let t = a
        .create(NewSession::new(SessionId::new(101), next, next_incarnation).payload(Calm(101)))
        .await
        .unwrap();
    let s_on_b = b.get(s.id()).await.unwrap().expect("B reads it");
    let t_on_b = b.get(t.id()).await.unwrap().expect("B reads it");
    let _ = a.close(s.id(), CloseReason::ClientClosed).await.unwrap();
    timeout(WAIT, s_on_b.closed())
        .await
        .expect("a close on A reaches B's handle after the panic");
    let _ = deleted(
        timeout(WAIT, forcing(&b, &notified).delete(next))
            .await
            .expect("B's deletion ends")
            .expect("deleted"),
    );
    assert!(
        t_on_b.is_closed(),
        "B's handle of router 2's session is open after B deleted it"
    );
    timeout(WAIT, t.closed())
        .await
        .expect("A's handle closes through A's watch");
}

/// I10, the deleter's report (review of stop 33; failed before): a rolling
/// upgrade (A with payload `()`, B with `String` on one prefix). A deletes
/// a router holding 10 sessions of each: the 10 it cannot read are not in
/// its fence snapshot, and `finish` removes them unread; the report and the
/// `RouterDeleted` event left them out (10 sessions where 20 went).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_sessions_removed_unread_are_in_the_deletion_report() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv-mixed", 1, &[]).await;
    let prefix = unique_prefix("mixed");
    let a = Arc::new(store_on::<()>(&etcd.endpoints(), &prefix, |b| b).await);
    let b = Arc::new(store_on::<String>(&etcd.endpoints(), &prefix, |b| b).await);
    let router = RouterId::new(1);
    let incarnation = a.register_router(router).await.unwrap();
    for id in 1..=10u64 {
        let _ = a
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
    }
    let mut theirs = Vec::new();
    for id in 11..=20u64 {
        let spec =
            NewSession::new(SessionId::new(id), router, incarnation).payload(format!("s{id}"));
        theirs.push(b.create(spec).await.unwrap());
    }
    assert_eq!(a.count(router).await.unwrap(), 20);
    let notified = Arc::new(Notify::new());
    let report = deleted(
        timeout(WAIT, forcing(&a, &notified).delete(router))
            .await
            .expect("the deletion ends")
            .expect("deleted"),
    );
    assert_eq!(a.count(router).await.unwrap(), 0, "all 20 removed");
    for session in &theirs {
        timeout(WAIT, session.closed())
            .await
            .expect("B's handles close");
    }
    assert_eq!(
        (report.sessions, report.forced),
        (20, 20),
        "the deletion removed 20 sessions of the router: {report:?}"
    );
}
