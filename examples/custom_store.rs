//! A `SessionStore` of your own: `AuditedStore` wraps a `MemoryStore`,
//! counts every call by method, logs the router-wide ones, and waits a
//! millisecond on each, standing in for a round trip to a remote backend
//! (etcd, a database). A `RouterDeleter` then deletes a router through it:
//! most sessions confirm, a tenth never do and are forced. The example checks
//! that the deletion completes, that every resource was released once, and
//! that `audit()` is clean, then prints how often each method was called.
//!
//! `cargo run --example custom_store`

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use futures::future::join_all;
use session_lifecycle::{
    Backoff, CloseReason, Incarnation, MemoryStore, NewSession, NotifyError, RouterDeleter,
    RouterId, Session, SessionId, SessionKey, SessionStore, Stats, TerminationBatch,
    TerminationNotifier, session::CloseOutcome, store::AuditReport, store::BackendError,
    store::CreateError, store::FenceError, store::FenceSnapshot, store::FinishError,
    store::FinishReport, store::RegisterError, store::Repair, store::RouterCensus,
    store::RouterError, store::RouterStatus, store::SessionError,
};
use tokio::time::Duration;

/// Every method of [`SessionStore`], to count calls by.
#[derive(Clone, Copy, Debug)]
enum Method {
    RegisterRouter,
    RouterStatus,
    Create,
    Get,
    Close,
    Remove,
    Sessions,
    Count,
    Fence,
    Finish,
    Audit,
    Census,
    Repair,
}

impl Method {
    const ALL: [Method; 13] = [
        Self::RegisterRouter,
        Self::RouterStatus,
        Self::Create,
        Self::Get,
        Self::Close,
        Self::Remove,
        Self::Sessions,
        Self::Count,
        Self::Fence,
        Self::Finish,
        Self::Audit,
        Self::Census,
        Self::Repair,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::RegisterRouter => "register_router",
            Self::RouterStatus => "router_status",
            Self::Create => "create",
            Self::Get => "get",
            Self::Close => "close",
            Self::Remove => "remove",
            Self::Sessions => "sessions",
            Self::Count => "count",
            Self::Fence => "fence",
            Self::Finish => "finish",
            Self::Audit => "audit",
            Self::Census => "census",
            Self::Repair => "repair",
        }
    }
}

/// A store that delegates to a [`MemoryStore`], counting each call and
/// paying a fixed latency first.
///
/// Delegation keeps every guarantee the trait asks for (the fence, the
/// incarnations, index consistency) because the inner store keeps them. A
/// store that talks to a real backend must keep them itself: `fence` in
/// particular has to stop creates and take the snapshot in one atomic step
/// (a transaction comparing the router's revision), or a session created
/// between the two escapes the deletion.
struct AuditedStore<P = ()> {
    inner: MemoryStore<P>,
    latency: Duration,
    calls: [AtomicU64; Method::ALL.len()],
}

impl<P> AuditedStore<P> {
    fn new(inner: MemoryStore<P>, latency: Duration) -> Self {
        Self {
            inner,
            latency,
            calls: Default::default(),
        }
    }

    /// Counts the call, then waits as a network round trip would. The
    /// count comes first so a call cancelled during the wait still shows.
    async fn round_trip(&self, method: Method) {
        self.calls[method as usize].fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.latency).await;
    }

    fn calls(&self, method: Method) -> u64 {
        self.calls[method as usize].load(Ordering::Relaxed)
    }
}

/// Router-wide calls are few and worth a log line each; per-session calls
/// (`create`, `get`, `close`, `remove`) come by the thousand and are only
/// counted.
fn log(line: std::fmt::Arguments<'_>) {
    println!("  store: {line}");
}

impl<P: Send + Sync + 'static> SessionStore for AuditedStore<P> {
    type Payload = P;

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.round_trip(Method::RegisterRouter).await;
        let incarnation = self.inner.register_router(router).await?;
        log(format_args!("register_router({router}) -> {incarnation}"));
        Ok(incarnation)
    }

    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.round_trip(Method::RouterStatus).await;
        self.inner.router_status(router).await
    }

    async fn create(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        self.round_trip(Method::Create).await;
        self.inner.create(spec).await
    }

    async fn get(&self, id: SessionId) -> Result<Option<Session<P>>, BackendError> {
        self.round_trip(Method::Get).await;
        self.inner.get(id).await
    }

    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.round_trip(Method::Close).await;
        self.inner.close(id, reason).await
    }

    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.round_trip(Method::Close).await;
        self.inner.close_exact(key, reason).await
    }

    async fn remove(&self, id: SessionId) -> Result<Session<P>, SessionError> {
        self.round_trip(Method::Remove).await;
        self.inner.remove(id).await
    }

    async fn remove_exact(&self, key: SessionKey) -> Result<Session<P>, SessionError> {
        self.round_trip(Method::Remove).await;
        self.inner.remove_exact(key).await
    }

    async fn sessions(&self, router: RouterId) -> Result<Vec<Session<P>>, RouterError> {
        self.round_trip(Method::Sessions).await;
        self.inner.sessions(router).await
    }

    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.round_trip(Method::Count).await;
        self.inner.count(router).await
    }

    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<P>, FenceError> {
        self.round_trip(Method::Fence).await;
        let snapshot = self.inner.fence(router).await?;
        log(format_args!(
            "fence({router}) -> {} sessions, newly fenced: {}",
            snapshot.sessions.len(),
            snapshot.newly_fenced
        ));
        Ok(snapshot)
    }

    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        self.round_trip(Method::Fence).await;
        let snapshot = self.inner.fence_incarnation(router, incarnation).await?;
        log(format_args!(
            "fence_incarnation({router}, {incarnation}) -> {} sessions",
            snapshot.sessions.len(),
        ));
        Ok(snapshot)
    }

    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.round_trip(Method::Finish).await;
        let report = self.inner.finish(router, incarnation).await?;
        log(format_args!(
            "finish({router}, {incarnation}) -> removed {}, closed {}",
            report.removed, report.closed
        ));
        Ok(report)
    }

    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.round_trip(Method::Audit).await;
        let report = self.inner.audit().await?;
        log(format_args!(
            "audit() -> {} sessions, clean: {}",
            report.sessions,
            report.is_clean()
        ));
        Ok(report)
    }

    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.round_trip(Method::Census).await;
        self.inner.census().await
    }

    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.round_trip(Method::Repair).await;
        let repairs = self.inner.repair(findings).await?;
        log(format_args!("repair() -> {} repairs", repairs.len()));
        Ok(repairs)
    }
}

/// The routers: each terminated session is confirmed a moment later, by
/// closing it in the store, except one in ten whose confirmation is lost.
struct Routers {
    store: Arc<AuditedStore>,
}

fn confirmation_lost(id: SessionId) -> bool {
    id.get().is_multiple_of(10)
}

impl TerminationNotifier for Routers {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            // Concurrently: with a remote store, one round trip after the
            // other would outlast the confirmation deadline.
            let confirmations = batch
                .sessions
                .into_iter()
                .filter(|key| !confirmation_lost(key.id()))
                .map(|key| store.close_exact(key, CloseReason::RouterDeleted));
            join_all(confirmations).await;
        });
        Ok(())
    }
}

const DELETED: RouterId = RouterId::new(1);
const KEPT: RouterId = RouterId::new(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let store = Arc::new(AuditedStore::new(
        MemoryStore::new(),
        Duration::from_millis(1),
    ));
    let attached = Arc::new(AtomicUsize::new(0));
    let released = Arc::new(AtomicUsize::new(0));

    println!("setting up two routers");
    for (router, sessions) in [(DELETED, 0..200), (KEPT, 1_000..1_050)] {
        let incarnation = store.register_router(router).await?;
        for id in sessions {
            let session = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await?;
            let released = Arc::clone(&released);
            session.attach(move |_: CloseReason| {
                released.fetch_add(1, Ordering::Relaxed);
            })?;
            attached.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Some clients leave on their own before the deletion.
    for id in (0..200).step_by(7) {
        let _ = store
            .close(SessionId::new(id), CloseReason::ClientClosed)
            .await?;
    }

    let deleter = RouterDeleter::builder()
        .batch_size(64)
        .notify_timeout(Duration::from_millis(500))
        .confirm_timeout(Duration::from_millis(300))
        .backoff(
            Backoff::new()
                .retries(1)
                .delays(Duration::from_millis(50), Duration::from_millis(100)),
        )
        .build(
            Arc::clone(&store),
            Routers {
                store: Arc::clone(&store),
            },
        )
        .expect("valid settings");
    let on_router = store.count(DELETED).await?;
    println!(
        "deleting {DELETED} ({on_router} sessions, bound {:?})",
        deleter.max_wait(on_router)
    );
    let outcome = deleter.delete(DELETED).await?;
    let report = outcome.report().ok_or("the router was already deleted")?;
    println!(
        "deleted {} ({}): {} sessions, {} confirmed, {} forced, {} rounds, {:?}",
        report.router,
        report.incarnation,
        report.sessions,
        report.confirmed,
        report.forced,
        report.rounds,
        report.durations.total
    );

    let audit = store.audit().await?;
    let stats = Stats::collect(&*store).await?;
    for census in &stats.routers {
        println!(
            "  {}: {:?}, {} active",
            census.router, census.status, census.active
        );
    }
    let kept = stats.router(KEPT).map_or(0, RouterCensus::sessions);
    let (attached, released) = (
        attached.load(Ordering::Relaxed),
        released.load(Ordering::Relaxed),
    );
    println!("resources: {attached} attached, {released} released, {kept} still held by {KEPT}");

    println!("calls per method:");
    for method in Method::ALL {
        println!("  {:<16}{:>5}", method.name(), store.calls(method));
    }

    if !audit.is_clean() {
        return Err(format!("audit found problems: {audit:?}").into());
    }
    if released + kept != attached {
        return Err("a resource of a deleted session was not released exactly once".into());
    }
    println!("audit clean; every session of {DELETED} closed and released once");
    Ok(())
}
