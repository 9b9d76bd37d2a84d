//! Two controllers on one etcd prefix, one of them late (a slow link):
//! a `finish`, `fence_incarnation` or `delete_incarnation` of a router's
//! old incarnation that reaches etcd after the incarnation was finished
//! and the router registered again must not touch the new incarnation's
//! sessions (I9). Three of these failed before stop 32 (the late call
//! listed the router's range at the current revision: record keys carry
//! no incarnation). Also churn with cut links, suspended watches,
//! compactions and fragmented catch-ups: every handle ends as etcd holds
//! its record. Written by a review of stop 32.
//!
//! Each test starts its own etcd (`own_etcd_*`); they run only when
//! `SESSION_LIFECYCLE_ETCD` is set (any value), like the other etcd
//! suites.
#![cfg(feature = "etcd")]

mod etcd_support;

use std::sync::Arc;

use etcd_support::{Cluster, Link, Proxy, endpoints, unique_prefix};
use session_lifecycle::etcd::{EtcdStore, EtcdStoreBuilder};
use session_lifecycle::store::RouterStatus;
use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId, SessionStore};
use tokio::time::{Duration, timeout};

const WAIT: Duration = Duration::from_secs(60);

async fn store_on(
    endpoints: &[String],
    prefix: &str,
    tune: impl FnOnce(EtcdStoreBuilder) -> EtcdStoreBuilder,
) -> EtcdStore {
    let builder = EtcdStore::builder()
        .endpoints(endpoints.iter().cloned())
        .prefix(prefix);
    timeout(WAIT, tune(builder).connect())
        .await
        .expect("connect returns")
        .expect("etcd is reachable")
}

/// A slow link: long timeouts, no keep-alive pings to speak of.
fn slow(builder: EtcdStoreBuilder) -> EtcdStoreBuilder {
    builder
        .request_timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(30))
        .keep_alive(Duration::from_secs(600), Duration::from_secs(60))
        .retry_deadline(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
}

/// One round of a late call on `router`: B registers it and fences it
/// (`old`); A's link is then slowed to a second a message and A starts
/// `late(old)`; meanwhile B finishes `old`, registers the router again
/// (`new`), and A creates five sessions in `new`. Returns `old`, `new`,
/// A's handles of the new sessions and the late call's answer, with A's
/// link restored.
async fn late_round<T: Send + 'static>(
    a: &Arc<EtcdStore>,
    b: &Arc<EtcdStore>,
    proxy: &Proxy,
    router: RouterId,
    late: impl FnOnce(Incarnation) -> tokio::task::JoinHandle<T>,
) -> (Incarnation, Incarnation, Vec<session_lifecycle::Session>, T) {
    let delay = Duration::from_millis(1000);
    let old = b.register_router(router).await.unwrap();
    let _ = b.fence_incarnation(router, old).await.unwrap();
    // Settle A's connection before slowing it.
    assert_eq!(
        a.router_status(router).await.unwrap(),
        RouterStatus::Fenced(old)
    );
    proxy.set(Link::Delay(delay));
    let late = late(old);
    // Timing injection (not a wait for a condition): A's status read
    // reaches etcd after one delay, its listing after about three.
    tokio::time::sleep(delay * 3 / 2).await;
    b.finish(router, old)
        .await
        .expect("B finishes the old incarnation");
    let new = b.register_router(router).await.unwrap();
    let creates: Vec<_> = (1..=5u64)
        .map(|id| {
            let a = Arc::clone(a);
            tokio::spawn(async move {
                a.create(NewSession::new(
                    SessionId::new(router.get() * 100 + id),
                    router,
                    new,
                ))
                .await
            })
        })
        .collect();
    let mut handles = Vec::new();
    for create in creates {
        handles.push(
            timeout(WAIT, create)
                .await
                .expect("create returns")
                .unwrap()
                .expect("created in the new incarnation"),
        );
    }
    let answer = timeout(WAIT, late)
        .await
        .expect("the late call returns")
        .unwrap();
    proxy.set(Link::Pass);
    (old, new, handles, answer)
}

/// I9 ("every cleanup acts on *this* session, never on whatever holds its
/// id now; a delete answers only for the incarnation it deleted") and
/// `SessionStore::finish`'s docs ("FinishError if the router is ... in
/// another incarnation, or already deleted; nothing changed then").
///
/// Controller A runs `finish(router, old)` over a slow link. Between A's
/// status check (which sees `Fenced(old)`) and A's listing of the router's
/// records, controller B finishes the old incarnation itself, registers
/// the router again and A creates sessions in the new incarnation. A's
/// listing finds the new incarnation's records (the record key carries no
/// incarnation), and `delete_listed` closes A's handles of them and writes
/// their closes to etcd before its fenced-guarded deletion finds the
/// router no longer fenced. The late `finish` of the old incarnation
/// returns an error, yet it closed every session of the router's new,
/// live incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_a_late_finish_of_an_old_incarnation_never_closes_the_new_ones() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv2-late-finish", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let proxy = Proxy::start(&endpoints).await;
    let prefix = unique_prefix("late-finish");
    let a = Arc::new(store_on(&proxy.endpoints(), &prefix, slow).await);
    let b = Arc::new(store_on(&endpoints, &prefix, |b| b).await);
    let mut hits = 0;
    for attempt in 1..=3u64 {
        let router = RouterId::new(attempt);
        let (_, new, handles, answer) = late_round(&a, &b, &proxy, router, |old| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.finish(router, old).await })
        })
        .await;
        a.flush().await.unwrap();

        assert_eq!(
            b.router_status(router).await.unwrap(),
            RouterStatus::Live(new)
        );
        let closed_here: Vec<_> = handles
            .iter()
            .filter(|s| s.is_closed())
            .map(|s| (s.id(), s.close_reason()))
            .collect();
        let mut closed_in_etcd = Vec::new();
        for session in &handles {
            let seen = b.get(session.id()).await.unwrap().expect("still in etcd");
            if seen.is_closed() {
                closed_in_etcd.push(seen.id());
            }
        }
        eprintln!(
            "attempt {attempt}: late finish answered {answer:?}; A's new handles closed: \
             {closed_here:?}; closed in etcd: {closed_in_etcd:?}"
        );
        if !closed_here.is_empty() || !closed_in_etcd.is_empty() {
            hits += 1;
        }
    }
    assert_eq!(
        hits, 0,
        "a late finish of an old incarnation closed sessions of the router's new live incarnation"
    );
}

type Handle = session_lifecycle::Session<Vec<u8>>;

/// A tiny deterministic generator (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn churn_tune(builder: EtcdStoreBuilder) -> EtcdStoreBuilder {
    builder
        .max_record(100 << 10)
        .request_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .retry_deadline(Duration::from_secs(10))
        .write_timeout(Duration::from_secs(3))
}

/// The watch changes of 6ae086e under churn: two controllers on one
/// prefix (A through a proxy whose link is cut and restored, its watch
/// suspended now and then, etcd compacted while A is away), big records
/// (etcd's request limit 256 KiB, so catch-ups come in fragments, and
/// writer batches of closes make revisions with many big events), ids
/// closed, removed and created again by both. At the end every handle A
/// ever got must be open iff etcd holds its record, with its create
/// revision, and no close reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_churn_with_cut_links_leaves_every_handle_as_etcd_holds_it() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv2-churn", 1, &["--max-request-bytes", "262144"]).await;
    let endpoints = etcd.endpoints();
    let proxy = Arc::new(Proxy::start(&endpoints).await);
    let prefix = unique_prefix("churn");
    let a: Arc<EtcdStore<Vec<u8>>> = Arc::new({
        let builder = churn_tune(
            EtcdStore::builder()
                .endpoints(proxy.endpoints())
                .prefix(&prefix),
        );
        builder.connect().await.unwrap()
    });
    let b: Arc<EtcdStore<Vec<u8>>> = Arc::new(
        churn_tune(
            EtcdStore::builder()
                .endpoints(endpoints.clone())
                .prefix(&prefix),
        )
        .connect()
        .await
        .unwrap(),
    );
    let router = RouterId::new(7);
    let incarnation = Arc::new(std::sync::Mutex::new(
        b.register_router(router).await.unwrap(),
    ));
    let ids = 24u64;
    let seen: Arc<std::sync::Mutex<Vec<Handle>>> = Arc::default();
    let until = tokio::time::Instant::now() + Duration::from_secs(25);

    // A's link: cut and restored; A's watch suspended now and then; etcd
    // compacted while A is away.
    let links = tokio::spawn({
        let proxy = Arc::clone(&proxy);
        let a = Arc::clone(&a);
        let b = Arc::clone(&b);
        async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            while tokio::time::Instant::now() < until {
                let away = Duration::from_millis(200 + rng.below(800));
                match rng.below(3) {
                    0 => {
                        proxy.set(Link::Cut);
                        tokio::time::sleep(away).await;
                        proxy.set(Link::Pass);
                    }
                    1 => {
                        let held = a.suspend_watch();
                        tokio::time::sleep(away).await;
                        if rng.below(2) == 0 {
                            let mut kv = b.client().kv_client();
                            let revision = kv
                                .get("x", None)
                                .await
                                .unwrap()
                                .header()
                                .unwrap()
                                .revision();
                            let _ = kv.compact(revision, None).await;
                        }
                        drop(held);
                    }
                    _ => {
                        proxy.set(Link::Delay(Duration::from_millis(rng.below(30))));
                        tokio::time::sleep(away).await;
                        proxy.set(Link::Pass);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
            }
            proxy.set(Link::Pass);
        }
    });

    // Churn on B (direct) and A (through the link).
    let worker = |store: Arc<EtcdStore<Vec<u8>>>, seed: u64, keep: bool| {
        let seen = Arc::clone(&seen);
        let incarnation = Arc::clone(&incarnation);
        tokio::spawn(async move {
            let mut rng = Rng(seed);
            while tokio::time::Instant::now() < until {
                let id = SessionId::new(1 + rng.below(ids));
                match rng.below(if keep { 6 } else { 7 }) {
                    6 => {
                        // B deletes the router's incarnation (big
                        // multi-event revisions) and registers it again.
                        if rng.below(4) == 0 {
                            let current = *incarnation.lock().unwrap();
                            if store.fence_incarnation(router, current).await.is_ok()
                                && store.finish(router, current).await.is_ok()
                                && let Ok(new) = store.register_router(router).await
                            {
                                *incarnation.lock().unwrap() = new;
                            }
                        }
                    }
                    0 | 1 => {
                        let incarnation = *incarnation.lock().unwrap();
                        let size = 20_000 + rng.below(60_000) as usize;
                        let spec = NewSession::new(id, router, incarnation)
                            .payload(vec![seed as u8; size]);
                        if let Ok(Ok(session)) =
                            timeout(Duration::from_secs(20), store.create(spec)).await
                            && keep
                        {
                            seen.lock().unwrap().push(session);
                        }
                    }
                    2 => {
                        // A burst of closes: one writer batch, one revision.
                        let burst: Vec<_> = (0..1 + rng.below(6))
                            .map(|_| SessionId::new(1 + rng.below(ids)))
                            .collect();
                        let closes = burst.into_iter().map(|id| {
                            let store = Arc::clone(&store);
                            async move {
                                let _ = timeout(
                                    Duration::from_secs(20),
                                    store.close(id, session_lifecycle::CloseReason::Expired),
                                )
                                .await;
                            }
                        });
                        futures::future::join_all(closes).await;
                    }
                    3 => {
                        let _ = timeout(Duration::from_secs(20), store.remove(id)).await;
                    }
                    4 => {
                        if let Ok(Ok(Some(session))) =
                            timeout(Duration::from_secs(20), store.get(id)).await
                            && keep
                        {
                            seen.lock().unwrap().push(session);
                        }
                    }
                    _ => {
                        if let Ok(Ok(sessions)) =
                            timeout(Duration::from_secs(20), store.sessions(router)).await
                            && keep
                        {
                            seen.lock().unwrap().extend(sessions);
                        }
                    }
                }
            }
        })
    };
    let workers = vec![
        worker(Arc::clone(&b), 0x1234_5678_9abc_def1, false),
        worker(Arc::clone(&b), 0x0fed_cba9_8765_4321, false),
        worker(Arc::clone(&a), 0x5555_aaaa_3333_cccc, true),
        worker(Arc::clone(&a), 0x7777_1111_2222_9999, true),
    ];
    for task in workers {
        timeout(Duration::from_secs(120), task)
            .await
            .expect("a worker ends")
            .unwrap();
    }
    links.await.unwrap();
    proxy.set(Link::Pass);
    let _ = timeout(WAIT, a.flush()).await;
    let _ = timeout(WAIT, b.flush()).await;

    // The truth: a fresh controller reads etcd.
    let c: EtcdStore<Vec<u8>> = churn_tune(
        EtcdStore::builder()
            .endpoints(endpoints.clone())
            .prefix(&prefix),
    )
    .connect()
    .await
    .unwrap();
    let handles: Vec<Handle> = seen.lock().unwrap().clone();
    let mut truth = std::collections::HashMap::new();
    for id in 1..=ids {
        let id = SessionId::new(id);
        let current = c.get(id).await.unwrap();
        truth.insert(id, current.filter(|s| !s.is_closed()).map(|s| s.key()));
    }
    // A's watch catches up (bounded): every handle as etcd holds it.
    let wrong = |handles: &[Handle]| -> Vec<String> {
        handles
            .iter()
            .filter(|h| h.is_closed() == (truth[&h.id()] == Some(h.key())))
            .map(|h| {
                format!(
                    "{:?} closed={} ({:?}); etcd open life {:?}",
                    h.key(),
                    h.is_closed(),
                    h.close_reason(),
                    truth[&h.id()]
                )
            })
            .collect()
    };
    let settled = timeout(Duration::from_secs(30), async {
        loop {
            if wrong(&handles).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let stats = a.stats();
    eprintln!("handles checked: {}; A's stats {stats:?}", handles.len());
    assert!(
        settled.is_ok(),
        "A's handles disagree with etcd after the churn: {:#?}",
        wrong(&handles)
    );
    assert!(c.audit().await.unwrap().is_clean());
}

/// I2/I9 and `fence_incarnation`'s docs ("a request that names an older
/// incarnation fences nothing, so a delayed or duplicated deletion can
/// never fence the router's newer life"; the snapshot holds the
/// incarnation's sessions). A resumes the fence of the old incarnation
/// over a slow link; between its status read (`Fenced(old)`: resume) and
/// its listing, B finishes the old incarnation, registers the router again
/// and A creates sessions in the new one: A's snapshot of the *old*
/// incarnation holds the new incarnation's live sessions, which a
/// `RouterDeleter` then terminates or forces closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_a_late_fence_snapshot_of_an_old_incarnation_holds_no_new_session() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv2-late-fence", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let proxy = Proxy::start(&endpoints).await;
    let prefix = unique_prefix("late-fence");
    let a = Arc::new(store_on(&proxy.endpoints(), &prefix, slow).await);
    let b = Arc::new(store_on(&endpoints, &prefix, |b| b).await);
    let mut wrong = Vec::new();
    for attempt in 1..=3u64 {
        let router = RouterId::new(attempt);
        let (old, new, _, answer) = late_round(&a, &b, &proxy, router, |old| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.fence_incarnation(router, old).await })
        })
        .await;
        match answer {
            Ok(snapshot) => {
                let foreign: Vec<_> = snapshot
                    .sessions
                    .iter()
                    .filter(|s| s.incarnation() != old)
                    .map(|s| (s.id(), s.incarnation()))
                    .collect();
                eprintln!(
                    "attempt {attempt}: snapshot of {:?} holds {} sessions, of other incarnations: {foreign:?}",
                    snapshot.incarnation,
                    snapshot.sessions.len()
                );
                if !foreign.is_empty() {
                    wrong.push((attempt, old, new, foreign));
                }
            }
            Err(error) => eprintln!("attempt {attempt}: late fence answered {error:?}"),
        }
    }
    assert!(
        wrong.is_empty(),
        "a fence snapshot of an old incarnation held the new incarnation's sessions: {wrong:?}"
    );
}

/// Routers that never answer.
struct Silent;

impl session_lifecycle::TerminationNotifier for Silent {
    async fn notify(
        &self,
        _batch: session_lifecycle::TerminationBatch,
    ) -> Result<(), session_lifecycle::NotifyError> {
        Ok(())
    }
}

/// The user-level consequence of the two above: controller A's
/// `RouterDeleter` resumes the deletion of the router's old incarnation
/// (`delete_incarnation(router, old)`, the documented way to never touch a
/// newer life) over a slow link while B finishes it and the router comes
/// back; A's sessions of the new, live incarnation end closed (here and in
/// etcd). I9: "a delete answers only for the incarnation it deleted".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_a_late_delete_incarnation_never_closes_the_routers_new_life() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv2-late-delete", 1, &[]).await;
    let endpoints = etcd.endpoints();
    let proxy = Proxy::start(&endpoints).await;
    let prefix = unique_prefix("late-delete");
    let a = Arc::new(store_on(&proxy.endpoints(), &prefix, slow).await);
    let b = Arc::new(store_on(&endpoints, &prefix, |b| b).await);
    let deleter = session_lifecycle::RouterDeleter::builder()
        .batch_size(100)
        .confirm_timeout(Duration::from_millis(100))
        .retries(0)
        .build(Arc::clone(&a), Silent)
        .expect("valid settings");
    let mut wrong = Vec::new();
    for attempt in 1..=3u64 {
        let router = RouterId::new(attempt);
        let (_, new, handles, answer) = late_round(&a, &b, &proxy, router, |old| {
            let deleter = deleter.clone();
            tokio::spawn(async move { deleter.delete_incarnation(router, old).await })
        })
        .await;
        a.flush().await.unwrap();
        let mut closed = Vec::new();
        for session in &handles {
            let seen = b.get(session.id()).await.unwrap().expect("still in etcd");
            if session.is_closed() || seen.is_closed() {
                closed.push((session.id(), session.close_reason(), seen.close_reason()));
            }
        }
        eprintln!(
            "attempt {attempt}: late delete answered {answer:?}; new lives closed: {closed:?}"
        );
        assert_eq!(
            b.router_status(router).await.unwrap(),
            RouterStatus::Live(new)
        );
        if !closed.is_empty() {
            wrong.push((attempt, closed));
        }
    }
    assert!(
        wrong.is_empty(),
        "a late delete of an old incarnation closed the router's new live sessions: {wrong:?}"
    );
}

/// The watch's applied lag at fragment boundaries: each round B closes
/// (one writer batch: one revision of many big events, fragmented by an
/// etcd whose request limit is 256 KiB) or removes and re-creates the ids
/// A holds, while A's link is slow and then cut mid-catch-up and
/// restored. A's handles must end as etcd holds the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_etcd_cuts_inside_fragmented_revisions_leave_handles_as_etcd_holds_them() {
    if endpoints().is_none() {
        return;
    }
    let etcd = Cluster::start("rv2-fragments", 1, &["--max-request-bytes", "262144"]).await;
    let endpoints = etcd.endpoints();
    let proxy = Proxy::start(&endpoints).await;
    let prefix = unique_prefix("fragments");
    let a: EtcdStore<Vec<u8>> = churn_tune(
        EtcdStore::builder()
            .endpoints(proxy.endpoints())
            .prefix(&prefix),
    )
    .connect()
    .await
    .unwrap();
    let b: Arc<EtcdStore<Vec<u8>>> = Arc::new(
        churn_tune(
            EtcdStore::builder()
                .endpoints(endpoints.clone())
                .prefix(&prefix),
        )
        .concurrency(1)
        .connect()
        .await
        .unwrap(),
    );
    let router = RouterId::new(3);
    let incarnation = b.register_router(router).await.unwrap();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut all: Vec<Handle> = Vec::new();
    for round in 0..20u64 {
        let ids: Vec<SessionId> = (1..=10).map(SessionId::new).collect();
        for &id in &ids {
            let _ = b
                .create(NewSession::new(id, router, incarnation).payload(vec![round as u8; 90_000]))
                .await;
        }
        let held = timeout(WAIT, a.sessions(router)).await.unwrap().unwrap();
        all.extend(held.iter().cloned());
        proxy.set(Link::Delay(Duration::from_millis(5)));
        match round % 3 {
            0 => {
                let closes = ids.iter().map(|&id| {
                    let b = Arc::clone(&b);
                    async move { b.close(id, session_lifecycle::CloseReason::Expired).await }
                });
                futures::future::join_all(closes).await;
            }
            1 => {
                let removes = ids.iter().map(|&id| {
                    let b = Arc::clone(&b);
                    async move { b.remove(id).await }
                });
                futures::future::join_all(removes).await;
            }
            _ => {
                for &id in ids.iter().step_by(2) {
                    let _ = b.remove(id).await;
                    let _ = b
                        .create(NewSession::new(id, router, incarnation).payload(vec![7; 90_000]))
                        .await;
                    let _ = b.close(id, session_lifecycle::CloseReason::Expired).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
        proxy.set(Link::Cut);
        tokio::time::sleep(Duration::from_millis(50 + rng.below(200))).await;
        proxy.set(Link::Pass);
        // Clear what is left for the next round.
        for &id in &ids {
            let _ = b.remove(id).await;
        }
    }
    b.flush().await.unwrap();
    let c: EtcdStore<Vec<u8>> = churn_tune(
        EtcdStore::builder()
            .endpoints(endpoints.clone())
            .prefix(&prefix),
    )
    .connect()
    .await
    .unwrap();
    let mut truth = std::collections::HashMap::new();
    for id in 1..=10 {
        let id = SessionId::new(id);
        let current = c.get(id).await.unwrap();
        truth.insert(id, current.filter(|s| !s.is_closed()).map(|s| s.key()));
    }
    let wrong = |handles: &[Handle]| -> Vec<String> {
        handles
            .iter()
            .filter(|h| h.is_closed() == (truth[&h.id()] == Some(h.key())))
            .map(|h| {
                format!(
                    "{:?} closed={} etcd open life {:?}",
                    h.key(),
                    h.is_closed(),
                    truth[&h.id()]
                )
            })
            .collect()
    };
    let settled = timeout(Duration::from_secs(30), async {
        loop {
            if wrong(&all).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    eprintln!("handles checked: {}; A's stats {:?}", all.len(), a.stats());
    // Did etcd split revisions across messages? A raw fragmented watch.
    let mut watch = c.client().watch_client();
    let end = {
        let mut e = prefix.clone().into_bytes();
        let last = e.pop().unwrap();
        e.push(last + 1);
        e
    };
    let mut stream = watch
        .watch(
            prefix.clone(),
            Some(
                session_lifecycle::etcd::client::WatchOptions::new()
                    .with_range(end)
                    .with_start_revision(1)
                    .with_fragment(),
            ),
        )
        .await
        .unwrap();
    let now = c
        .client()
        .kv_client()
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (mut split, mut messages, mut last) = (0, 0, (0i64, 0i64));
    while let Ok(Ok(Some(response))) = timeout(Duration::from_secs(2), stream.message()).await {
        let events = response.events();
        if let (Some(first), Some(end)) = (events.first(), events.last()) {
            messages += 1;
            let first_rev = first.kv().unwrap().mod_revision();
            if first_rev == last.1 {
                split += 1;
            }
            last = (first_rev, end.kv().unwrap().mod_revision());
            if last.1 >= now {
                break;
            }
        }
    }
    eprintln!("raw fragmented watch: {messages} messages, {split} revisions split across messages");
    assert!(
        settled.is_ok(),
        "A's handles disagree with etcd: {:#?}",
        wrong(&all)
    );
}
