//! `EtcdStore` on a real etcd (a single node or a cluster): deleting a
//! router of 100,000 sessions, and creating sessions; each next to a
//! baseline in the same run.
//!
//! Needs `SESSION_LIFECYCLE_ETCD` (endpoints, comma-separated;
//! `scripts/etcd-env.sh` starts one etcd, `scripts/etcd-cluster.sh` three);
//! without it the bench says so and measures nothing. In test mode
//! (`-- --test`, as CI runs it) the router holds 2,000 sessions and 2,000
//! are created; `SESSION_LIFECYCLE_BENCH_SESSIONS` sets the router's size.
//!
//! - `etcd_delete_100k/router_deleter_forced`: [`RouterDeleter::delete`] of
//!   a router of 100,000 sessions whose router never answers; after a 10 ms
//!   wait every session is force-closed, written closed, deleted (32 per
//!   transaction, 4 transactions in flight), the tombstone written.
//! - `etcd_delete_100k/baseline_per_session`: the cleanup a controller
//!   without this crate does: one transaction per session that deletes it
//!   (record and pointer), 256 in flight.
//! - `etcd_create/grouped_256_in_flight`: 10,000 creates with 256 in flight;
//!   concurrent creates share transactions (`create_batch`, default 64).
//! - `etcd_create/one_per_txn_256_in_flight`: the same with
//!   `create_batch(1)`: one transaction per create (the store before issue
//!   #18).
//!
//! With `SESSION_LIFECYCLE_BENCH_FLAT=1` it first creates 200,000 sessions
//! (256 in flight) on one router and prints the rate of each 20,000: the
//! watch's change memory must not make creates slower as they go.
//!
//! `cargo bench --features etcd --bench etcd` (release; etcd running).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use session_lifecycle::etcd::EtcdStore;
use session_lifecycle::etcd::client::{DeleteOptions, Txn, TxnOp};
use session_lifecycle::{
    Incarnation, NewSession, NotifyError, RouterDeleter, RouterId, SessionId, SessionStore,
    TerminationBatch, TerminationNotifier,
};
use tokio::runtime::Runtime;

const CREATES: u64 = 10_000;
const IN_FLIGHT: usize = 256;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A router that never answers.
struct Silent;

impl TerminationNotifier for Silent {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn ids(n: u64) -> u64 {
    NEXT_ID.fetch_add(n, Ordering::Relaxed)
}

/// Creates `n` sessions on `router`, `IN_FLIGHT` at a time.
async fn create_many(store: &EtcdStore, router: RouterId, incarnation: Incarnation, n: u64) {
    let first = ids(n);
    futures::stream::iter(first..first + n)
        .map(|id| store.create(NewSession::new(SessionId::new(id), router, incarnation)))
        .buffer_unordered(IN_FLIGHT)
        .for_each(|created| {
            created.expect("create");
            async {}
        })
        .await;
}

/// A new router of `n` sessions.
async fn router_of(store: &EtcdStore, n: u64) -> (RouterId, Incarnation) {
    let router = RouterId::new(ids(1));
    let incarnation = store.register_router(router).await.expect("register");
    create_many(store, router, incarnation, n).await;
    (router, incarnation)
}

async fn connect(endpoints: &str, prefix: &str, create_batch: usize) -> EtcdStore {
    EtcdStore::builder()
        .endpoints(endpoints.split(',').map(str::to_owned))
        .prefix(prefix)
        .create_batch(create_batch)
        // Three members on one shared disk stall now and then: patience,
        // so that a slow answer is measured, not an error.
        .request_timeout(Duration::from_secs(30))
        .retry_deadline(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(120))
        .connect()
        .await
        .expect("etcd is reachable")
}

/// 200,000 creates on one router, the rate of each 20,000 printed; returns
/// the router.
fn flat(rt: &Runtime, store: &EtcdStore) -> RouterId {
    rt.block_on(async {
        let (router, incarnation) = router_of(store, 0).await;
        println!("etcd_create_200k_flat (creates/s per 20,000, 256 in flight):");
        let mut rates = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            create_many(store, router, incarnation, 20_000).await;
            rates.push(20_000.0 / started.elapsed().as_secs_f64());
        }
        let line: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!("  {}", line.join(" "));
        let stats = store.stats();
        println!(
            "  rechecks {} over {} creates in {} transactions",
            stats.rechecks, stats.creates, stats.create_transactions
        );
        router
    })
}

fn bench(c: &mut Criterion) {
    let Ok(endpoints) = std::env::var("SESSION_LIFECYCLE_ETCD") else {
        eprintln!("etcd bench DID NOT RUN: set SESSION_LIFECYCLE_ETCD (scripts/etcd-env.sh)");
        return;
    };
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let router_sessions: u64 = std::env::var("SESSION_LIFECYCLE_BENCH_SESSIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if test_mode { 2_000 } else { 100_000 });
    let creates = if test_mode { 2_000 } else { CREATES };
    let rt = runtime();
    let prefix = format!(
        "/session-lifecycle-bench/{}/",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let store = Arc::new(rt.block_on(connect(&endpoints, &prefix, 64)));
    let one_per_txn = Arc::new(rt.block_on(connect(&endpoints, &prefix, 1)));
    let forced = RouterDeleter::builder()
        .confirm_timeout(Duration::from_millis(10))
        .retries(0)
        .build(Arc::clone(&store), Silent)
        .expect("valid settings");
    if std::env::var_os("SESSION_LIFECYCLE_BENCH_FLAT").is_some() {
        let router = flat(&rt, &store);
        rt.block_on(forced.delete(router)).expect("deleted");
    }

    let mut group = c.benchmark_group(format!("etcd_delete_{}k", router_sessions / 1000));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.throughput(Throughput::Elements(router_sessions));
    group.bench_function("router_deleter_forced", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let (router, _) = router_of(&store, router_sessions).await;
                    let started = Instant::now();
                    let outcome = forced.delete(router).await.expect("deleted");
                    spent += started.elapsed();
                    let report = outcome.report().expect("a deletion");
                    assert_eq!(report.forced as u64, router_sessions, "{report:?}");
                }
                spent
            })
        });
    });
    group.bench_function("baseline_per_session", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let kv = store.client().kv_client();
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let (router, _) = router_of(&store, router_sessions).await;
                    let sessions = store.sessions(router).await.expect("listed");
                    let keys: Vec<(String, String)> = sessions
                        .iter()
                        .map(|session| {
                            let id = session.id().get();
                            (
                                format!("{prefix}r/{:016x}/s/{id:016x}", router.get()),
                                format!("{prefix}s/{id:016x}"),
                            )
                        })
                        .collect();
                    drop(sessions);
                    let started = Instant::now();
                    futures::stream::iter(keys)
                        .map(|(record, pointer)| {
                            let mut kv = kv.clone();
                            async move {
                                let txn = Txn::new().and_then([
                                    TxnOp::delete(record, None),
                                    TxnOp::delete(pointer, None),
                                ]);
                                kv.txn(txn).await.expect("deleted");
                            }
                        })
                        .buffer_unordered(IN_FLIGHT)
                        .for_each(|()| async {})
                        .await;
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
    group.warm_up_time(Duration::from_millis(1));
    group.throughput(Throughput::Elements(creates));
    for (name, store) in [
        ("grouped_256_in_flight", &store),
        ("one_per_txn_256_in_flight", &one_per_txn),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let (router, incarnation) = router_of(store, 0).await;
                        let started = Instant::now();
                        create_many(store, router, incarnation, creates).await;
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
    let _ = rt.block_on(kv.delete(prefix.clone(), Some(DeleteOptions::new().with_prefix())));
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
