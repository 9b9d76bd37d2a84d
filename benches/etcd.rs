//! `EtcdStore` on a real etcd on loopback: deleting a router of 10k
//! sessions, and creating sessions; each next to a baseline in the same run.
//!
//! Needs `SESSION_LIFECYCLE_ETCD` (an endpoint; `scripts/etcd-env.sh` starts
//! one); without it the bench says so and measures nothing.
//!
//! - `etcd_delete_10k/router_deleter_confirmed`: [`RouterDeleter::delete`]
//!   of a router of 10,000 sessions whose router confirms every notice at
//!   once (the notifier closes each notified session through the store,
//!   concurrently, as the router's answers would arrive). Timed until the
//!   deletion returned: every session closed, written closed, deleted, the
//!   tombstone written.
//! - `etcd_delete_10k/router_deleter_forced`: the same router never
//!   answers; after a 10 ms wait every session is force-closed.
//! - `etcd_delete_10k/baseline_per_session`: the unbatched cleanup a
//!   controller without this crate does: for each session, one transaction
//!   that deletes it (record and pointer), one after the other.
//! - `etcd_create/{sequential,64_in_flight}`: creating 2,000 sessions with
//!   one create at a time, and with 64 creates in flight.
//!
//! `cargo bench --features etcd --bench etcd` (release; etcd running).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use session_lifecycle::etcd::EtcdStore;
use session_lifecycle::etcd::client::{Txn, TxnOp};
use session_lifecycle::{
    CloseReason, Incarnation, NewSession, NotifyError, RouterDeleter, RouterId, SessionId,
    SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::runtime::Runtime;

const ROUTER_SESSIONS: u64 = 10_000;
const CREATES: u64 = 2_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A router: with a store, it confirms every notified session at once
/// (closes them all through the store, concurrently); without, it never
/// answers.
struct Router(Option<EtcdStore>);

impl TerminationNotifier for Router {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        if let Some(store) = &self.0 {
            futures::future::join_all(
                batch
                    .sessions
                    .iter()
                    .map(|&key| store.close_exact(key, CloseReason::RouterDeleted)),
            )
            .await;
        }
        Ok(())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn ids(n: u64) -> u64 {
    NEXT_ID.fetch_add(n, Ordering::Relaxed)
}

/// A router of `n` sessions, created 64 at a time.
async fn router_of(store: &EtcdStore, n: u64) -> (RouterId, Incarnation) {
    let router = RouterId::new(ids(1));
    let incarnation = store.register_router(router).await.expect("register");
    let first = ids(n);
    futures::stream::iter(first..first + n)
        .map(|id| store.create(NewSession::new(SessionId::new(id), router, incarnation)))
        .buffer_unordered(64)
        .for_each(|created| {
            created.expect("create");
            async {}
        })
        .await;
    (router, incarnation)
}

fn bench(c: &mut Criterion) {
    let Ok(endpoint) = std::env::var("SESSION_LIFECYCLE_ETCD") else {
        eprintln!("etcd bench DID NOT RUN: set SESSION_LIFECYCLE_ETCD (scripts/etcd-env.sh)");
        return;
    };
    let rt = runtime();
    let prefix = format!(
        "/session-lifecycle-bench/{}/",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let store: EtcdStore = rt
        .block_on(
            EtcdStore::builder()
                .endpoint(&endpoint)
                .prefix(&prefix)
                .connect(),
        )
        .expect("etcd is reachable");
    let store = Arc::new(store);
    let confirmed = RouterDeleter::builder()
        .batch_size(1_000)
        .confirm_timeout(Duration::from_secs(30))
        .build(Arc::clone(&store), Router(Some((*store).clone())))
        .expect("valid settings");
    let forced = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(10))
        .retries(0)
        .build(Arc::clone(&store), Router(None))
        .expect("valid settings");

    let mut group = c.benchmark_group("etcd_delete_10k");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROUTER_SESSIONS));
    for (name, deleter, confirmed) in [
        ("router_deleter_confirmed", &confirmed, true),
        ("router_deleter_forced", &forced, false),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let (router, _) = router_of(&store, ROUTER_SESSIONS).await;
                        let started = Instant::now();
                        let outcome = deleter.delete(router).await.expect("deleted");
                        spent += started.elapsed();
                        let report = outcome.report().expect("a deletion");
                        let all = if confirmed {
                            report.confirmed
                        } else {
                            report.forced
                        };
                        assert_eq!(all, 10_000, "{report:?}");
                    }
                    spent
                })
            });
        });
    }
    group.bench_function("baseline_per_session", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut kv = store.client().kv_client();
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let (router, _) = router_of(&store, ROUTER_SESSIONS).await;
                    let sessions = store.sessions(router).await.expect("listed");
                    let started = Instant::now();
                    for session in &sessions {
                        let id = session.id().get();
                        let txn = Txn::new().and_then([
                            TxnOp::delete(
                                format!("{prefix}r/{:016x}/s/{id:016x}", router.get()),
                                None,
                            ),
                            TxnOp::delete(format!("{prefix}s/{id:016x}"), None),
                        ]);
                        kv.txn(txn).await.expect("deleted");
                    }
                    spent += started.elapsed();
                    assert_eq!(store.count(router).await.expect("counted"), 0);
                }
                spent
            })
        });
    });
    group.finish();

    let mut group = c.benchmark_group("etcd_create");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.throughput(Throughput::Elements(CREATES));
    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let (router, incarnation) = router_of(&store, 0).await;
                        let first = ids(CREATES);
                        let started = Instant::now();
                        futures::stream::iter(first..first + CREATES)
                            .map(|id| {
                                store.create(NewSession::new(
                                    SessionId::new(id),
                                    router,
                                    incarnation,
                                ))
                            })
                            .buffer_unordered(in_flight)
                            .for_each(|created| {
                                created.expect("create");
                                async {}
                            })
                            .await;
                        spent += started.elapsed();
                        // Cleared outside the clock.
                        forced.delete(router).await.expect("deleted");
                    }
                    spent
                })
            });
        });
    }
    group.finish();
    // The bench's keys go with it.
    let mut kv = store.client().kv_client();
    let _ = rt.block_on(kv.delete(
        prefix.clone(),
        Some(session_lifecycle::etcd::client::DeleteOptions::new().with_prefix()),
    ));
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
