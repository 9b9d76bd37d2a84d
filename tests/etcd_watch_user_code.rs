//! The etcd watch and user code it runs (a review of stop 33's watch
//! supervisor; the two `own_etcd_a_*`/`own_etcd_two_*` tests failed
//! before): a payload `Drop` panicking while the watch re-lists after a
//! compaction (twice: the supervisor's own re-list was not contained, and
//! the watch died for good), and a store dropped while it re-lists against
//! a hung etcd (the re-list held the store until etcd answered).
#![cfg(feature = "etcd")]

mod etcd_support;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_client::GetOptions;
use etcd_support::{Calm, Cluster, decode_u64, encode_u64, endpoints, unique_prefix};
use session_lifecycle::etcd::{EtcdPayload, EtcdStore};
use session_lifecycle::{CloseReason, NewSession, RouterId, SessionId, SessionStore};
use tokio::sync::Notify;
use tokio::time::{Duration, timeout};

const WAIT: Duration = Duration::from_secs(15);

/// Panics left to fire in `Brittle`'s `Drop` (ids below 100 only).
static BRITTLE_ARMED: AtomicUsize = AtomicUsize::new(0);
/// How many `Brittle` drops panicked.
static BRITTLE_FIRED: AtomicUsize = AtomicUsize::new(0);
/// How many `Brittle` payloads of ids at or above 100 were dropped.
static KEPT_DROPPED: AtomicUsize = AtomicUsize::new(0);

/// When set, `Brittle`'s panicking `Drop` hangs (SIGSTOP) this etcd first.
static HANG_ON_PANIC: Mutex<Option<Cluster>> = Mutex::new(None);

/// A payload whose `Drop` panics while armed (ids < 100).
struct Brittle(u64);

impl Drop for Brittle {
    fn drop(&mut self) {
        if self.0 >= 100 {
            KEPT_DROPPED.fetch_add(1, Ordering::SeqCst);
            DROPPED.notify_waiters();
            return;
        }
        if BRITTLE_ARMED
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            BRITTLE_FIRED.fetch_add(1, Ordering::SeqCst);
            DROPPED.notify_waiters();
            if let Some(cluster) = &*HANG_ON_PANIC.lock().unwrap() {
                // The next re-list finds etcd hung.
                cluster.members[0].pause();
            }
            panic!("payload {}'s drop panics", self.0);
        }
        DROPPED.notify_waiters();
    }
}

impl EtcdPayload for Brittle {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_u64(self.0, out);
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        decode_u64(bytes).map(Brittle)
    }
}

/// Compacts etcd's history up to now (through `store`'s client).
async fn compact_now<P: EtcdPayload>(store: &EtcdStore<P>, prefix: &str) {
    let mut kv = store.client().kv_client();
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
}

/// The tests share the statics above: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Notified at each `Brittle` drop.
static DROPPED: Notify = Notify::const_new();

/// Whether `cond` holds within `limit`, looked at after each `Brittle` drop.
async fn holds_within(limit: Duration, cond: impl Fn() -> bool) -> bool {
    timeout(limit, async {
        loop {
            let dropped = DROPPED.notified();
            tokio::pin!(dropped);
            dropped.as_mut().enable();
            if cond() {
                return;
            }
            dropped.await;
        }
    })
    .await
    .is_ok()
}

/// Awaits `cond` (see [`holds_within`]), failing after [`WAIT`].
async fn until(what: &str, cond: impl Fn() -> bool) {
    assert!(holds_within(WAIT, cond).await, "{what}");
}

/// The module docs of the watch: "User code the watch runs (a payload's
/// `Drop` with the last handle of a closed session ...) cannot end it".
/// Two sessions removed while B's watch is away, then compacted: B's
/// re-list drops the last handle of each. The first panic (in the re-list
/// `run` does) is caught by `supervise`; the second happens in the re-list
/// `supervise` itself runs, outside `catch_unwind`: the watch task dies,
/// and no close by another controller reaches B's handles again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_two_drops_panicking_in_a_relist_do_not_end_the_watch() {
    if endpoints().is_none() {
        return;
    }
    drops_panicking_in_a_relist(2).await;
}

/// Control: one drop panics (in the re-list `run` does, caught by
/// `supervise`, whose own re-list then succeeds): the watch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_control_one_drop_panicking_in_a_relist() {
    if endpoints().is_none() {
        return;
    }
    drops_panicking_in_a_relist(1).await;
}

async fn drops_panicking_in_a_relist(panics: usize) {
    let _serial = SERIAL.lock().await;
    BRITTLE_FIRED.store(0, Ordering::SeqCst);
    let etcd = Cluster::start("rv2-relist", 1, &[]).await;
    let prefix = unique_prefix("rv2-relist");
    let connect = |p: String| {
        let eps = etcd.endpoints();
        async move { EtcdStore::builder().endpoints(eps).prefix(p) }
    };
    let a: EtcdStore<Calm> = connect(prefix.clone()).await.connect().await.unwrap();
    let b: EtcdStore<Brittle> = connect(prefix.clone()).await.connect().await.unwrap();
    let router = RouterId::new(1);
    let incarnation = a.register_router(router).await.unwrap();
    for id in [1u64, 2, 100] {
        let spec = NewSession::new(SessionId::new(id), router, incarnation).payload(Calm(id));
        let _ = a.create(spec).await.unwrap();
    }
    // B keeps only session 100's handle: its cache holds the last of 1, 2.
    let kept = b
        .sessions(router)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id() == SessionId::new(100))
        .unwrap();
    assert_eq!(b.cached(), 3);

    let suspended = b.suspend_watch();
    let _ = a.remove(SessionId::new(1)).await.unwrap();
    let _ = a.remove(SessionId::new(2)).await.unwrap();
    compact_now(&a, &prefix).await;
    BRITTLE_ARMED.store(panics, Ordering::SeqCst);
    drop(suspended);
    until("the drops ran in B's re-lists", || {
        BRITTLE_FIRED.load(Ordering::SeqCst) == panics
    })
    .await;

    // Does B's watch still run?
    let _ = a
        .close(SessionId::new(100), CloseReason::ClientClosed)
        .await
        .unwrap();
    assert!(
        timeout(WAIT, kept.closed()).await.is_ok(),
        "a close on A never reached B's handle within {WAIT:?}: B's watch is dead"
    );
}

/// The store dropped while the watch re-lists: its background work should
/// stop (`Shared`'s `Drop` cancels it) and its cached handles go. After a
/// panic in the re-list `run` does (one payload's `Drop`), `supervise`
/// re-lists holding a strong `Arc<Shared>` (`strong`) and retries until
/// `stop`, which only `Shared`'s `Drop` cancels: while etcd does not answer,
/// the dropped store lives on, retrying for ever, holding every cached
/// handle (session 100's payload is never dropped).
/// `panic_first`: etcd is hung by the panicking `Drop` (so the supervisor's
/// re-list finds it hung); `false` is the control: no panic, etcd hung by
/// the test before the store is dropped.
async fn dropped_store_while_etcd_hangs(panic_first: bool) {
    let _serial = SERIAL.lock().await;
    let etcd = Cluster::start("rv2-leak", 1, &[]).await;
    let prefix = unique_prefix("rv2-leak");
    let eps = etcd.endpoints();
    let a: EtcdStore<Calm> = EtcdStore::builder()
        .endpoints(eps.clone())
        .prefix(prefix.clone())
        .connect()
        .await
        .unwrap();
    let b: EtcdStore<Brittle> = EtcdStore::builder()
        .endpoints(eps)
        .prefix(prefix.clone())
        .request_timeout(Duration::from_millis(500))
        .retry_deadline(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let router = RouterId::new(1);
    let incarnation = a.register_router(router).await.unwrap();
    for id in [1u64, 100] {
        let spec = NewSession::new(SessionId::new(id), router, incarnation).payload(Calm(id));
        let _ = a.create(spec).await.unwrap();
    }
    let kept = b
        .sessions(router)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id() == SessionId::new(100))
        .unwrap();
    KEPT_DROPPED.store(0, Ordering::SeqCst);
    BRITTLE_FIRED.store(0, Ordering::SeqCst);
    let suspended = b.suspend_watch();
    let _ = a.remove(SessionId::new(1)).await.unwrap();
    compact_now(&a, &prefix).await;
    drop(a);
    *HANG_ON_PANIC.lock().unwrap() = Some(etcd);
    if panic_first {
        BRITTLE_ARMED.store(1, Ordering::SeqCst);
        drop(suspended);
        until("the drop ran in B's re-list", || {
            BRITTLE_FIRED.load(Ordering::SeqCst) == 1
        })
        .await;
    } else {
        drop(suspended);
        until("B's re-list let session 1 go", || b.cached() == 1).await;
        HANG_ON_PANIC.lock().unwrap().as_ref().unwrap().members[0].pause();
    }
    // The controller lets the store go, and every handle of it.
    drop(kept);
    drop(b);
    let kept_dropped = || KEPT_DROPPED.load(Ordering::SeqCst) > 0;
    let gone = holds_within(Duration::from_secs(10), kept_dropped).await;
    let etcd = HANG_ON_PANIC.lock().unwrap().take().unwrap();
    etcd.members[0].resume();
    if !gone {
        // Does it go once etcd answers again?
        let later = holds_within(Duration::from_secs(10), kept_dropped).await;
        panic!(
            "the dropped store's cached handle lived on for 10 s while etcd hung \
             (released once etcd answered again: {later})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_a_store_dropped_while_its_supervisor_relists_lets_go() {
    if endpoints().is_none() {
        return;
    }
    dropped_store_while_etcd_hangs(true).await;
}

/// The control: no panic, etcd hung, the store dropped: it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_control_a_store_dropped_while_etcd_hangs_lets_go() {
    if endpoints().is_none() {
        return;
    }
    dropped_store_while_etcd_hangs(false).await;
}

/// Control of the control: no drop panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_etcd_control_no_drop_panicking_in_a_relist() {
    if endpoints().is_none() {
        return;
    }
    drops_panicking_in_a_relist(0).await;
}
