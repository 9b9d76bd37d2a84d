//! A controller running every piece at once through one `Lifecycle`, shut
//! down in order within one deadline.
//!
//! Four routers carry 200 sessions each while a scripted workload runs:
//! dead clients are reaped, a careless code path closes sessions without
//! removing them (the sweeper does), router 0 is deleted, legacy router 3
//! disconnects into its grace period, and deaf router 2, which never
//! confirms a termination, starts being deleted. On ctrl-c, or after 2 s,
//! the controller stops its own work and calls `Lifecycle::shutdown`:
//!
//! 1. every piece stops taking new work at once: no deletion starts, the
//!    grace timer stops (router 3 keeps its sessions: the controller goes
//!    away, not the router), the monitor stops convicting, the sweeper
//!    stops sweeping;
//! 2. what they hold finishes within the deadline: here the deaf router's
//!    deletion forces its sessions, releasing them through the queue;
//! 3. the reclaim queue drains last, with what is left of the deadline,
//!    since every piece above pushes releases into it.
//!
//! It prints the report (what could not finish), closes what is left, and
//! checks that the store is empty and clean and every resource was
//! released exactly once.
//!
//! `cargo run --example graceful_shutdown`

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::{
    AuditSweeper, Backoff, CloseReason, Event, Lifecycle, LivenessMonitor, MemoryStore, NewSession,
    NotifyError, ProbeBatch, ProbeError, Prober, Reconciler, ResourceClass, RouterDeleter,
    RouterId, SessionId, SessionStore, TerminationBatch, TerminationNotifier, events::Subscription,
    session::Classed,
};
use tokio::time::{Duration, Instant};

type BoxError = Box<dyn Error + Send + Sync>;

const DELETED: RouterId = RouterId::new(0);
/// Some of its sessions are closed through their handles only.
const CARELESS: RouterId = RouterId::new(1);
/// Takes termination notices but never confirms: its deletion forces.
const DEAF: RouterId = RouterId::new(2);
/// Predates heartbeats: not watched; its grace period covers it.
const LEGACY: RouterId = RouterId::new(3);
const HEARTBEAT: Duration = Duration::from_millis(100);

/// Routers confirm each termination 10 ms later, but the deaf one.
struct Routers(Arc<MemoryStore>);

impl TerminationNotifier for Routers {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        if batch.router != DEAF {
            let store = Arc::clone(&self.0);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                for key in batch.sessions {
                    let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
                }
            });
        }
        Ok(())
    }
}

/// Routers vouch for every live client.
struct Probes;

impl Prober for Probes {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        Ok(batch
            .sessions
            .into_iter()
            .filter(|&id| !is_dead(id))
            .collect())
    }
}

/// One client in forty vanished without a word.
fn is_dead(id: SessionId) -> bool {
    id.get() % 40 == 7
}

type Controller = Lifecycle<MemoryStore, Routers, Probes>;

/// The one wiring point: each piece's settings, nothing wired by hand.
fn wire() -> Result<Controller, BoxError> {
    let store = Arc::new(MemoryStore::new());
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Routers(store))
        .prober(Probes)
        .deleter(
            RouterDeleter::builder()
                .confirm_timeout(Duration::from_millis(400))
                .backoff(
                    Backoff::new()
                        .retries(1)
                        .delays(Duration::from_millis(200), Duration::from_millis(400)),
                ),
        )
        .liveness(
            LivenessMonitor::builder()
                .heartbeat_interval(HEARTBEAT)
                .granularity(Duration::from_millis(10))
                .timeout_range(Duration::from_millis(300), Duration::from_secs(2))
                .probe_timeout(HEARTBEAT)
                .probe_retries(1),
        )
        .reconciler(Reconciler::builder().grace_period(Duration::from_secs(30)))
        .sweeper(AuditSweeper::builder().interval(Duration::from_millis(300)))
        .build()?;
    Ok(lifecycle)
}

/// Opens 200 sessions on each router, each holding a port (critical) and a
/// buffer (normal) that count their releases; watches all but the legacy
/// router's.
async fn open(c: &Controller, released: &Arc<AtomicUsize>) -> Result<usize, BoxError> {
    let mut attached = 0;
    for router in [DELETED, CARELESS, DEAF, LEGACY] {
        let incarnation = c.store().register_router(router).await?;
        for id in router.get() * 1_000..router.get() * 1_000 + 200 {
            let spec = NewSession::new(SessionId::new(id), router, incarnation);
            let session = c.store().create(spec).await?;
            for class in [ResourceClass::Critical, ResourceClass::Normal] {
                let released = Arc::clone(released);
                session.attach(Classed::new(class, move |_: CloseReason| {
                    released.fetch_add(1, Ordering::Relaxed);
                }))?;
                attached += 1;
            }
            if router != LEGACY {
                c.liveness().watch(&session)?;
            }
        }
    }
    Ok(attached)
}

/// The scripted workload: careless closes, two deletions, a disconnect.
async fn script(c: Controller, start: Instant) -> Result<(), BoxError> {
    let at = |millis| tokio::time::sleep_until(start + Duration::from_millis(millis));
    let now = || format!("[{:.2}s]", start.elapsed().as_secs_f64());
    for session in c.store().sessions(CARELESS).await?.iter().step_by(10) {
        let _ = session.close(CloseReason::ClientClosed);
    }
    at(300).await;
    let deleted = c.deleter().delete(DELETED).await?;
    let forced = deleted.report().map_or(0, |report| report.forced);
    println!("{} {DELETED} deleted, {forced} forced", now());
    at(1_000).await;
    c.reconciler().router_disconnected(LEGACY).await?;
    println!("{} {LEGACY} disconnected: in its grace period", now());
    at(1_200).await;
    println!("{} deleting {DEAF}, which never confirms", now());
    c.deleter().delete(DEAF).await?;
    Ok(())
}

/// Heartbeats of every live client of the watched routers.
async fn heartbeats(c: Controller) {
    let mut every = tokio::time::interval(HEARTBEAT);
    loop {
        every.tick().await;
        for router in [DELETED, CARELESS, DEAF] {
            for session in c.store().sessions(router).await.unwrap_or_default() {
                if !is_dead(session.id()) {
                    let _ = c.liveness().heartbeat(&session);
                }
            }
        }
    }
}

/// Counts events by kind, printing deletions, until told to stop (every
/// piece holds the bus, so the stream never ends by itself).
async fn listen(
    mut events: Subscription,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    start: Instant,
) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    let mut record = |event: Event| {
        let kind = match event {
            Event::RouterDeleted(report) => {
                let at = start.elapsed().as_secs_f64();
                println!("[{at:.2}s]   event: {} deleted", report.router);
                "router deleted"
            }
            Event::Repaired(_) => "sweeper repairs",
            Event::Liveness(_) => "liveness",
            Event::SessionTerminating { .. } => "session terminating",
            _ => "other",
        };
        *counts.entry(kind).or_insert(0) += 1;
    };
    while let Some(event) = tokio::select! { event = events.recv() => event, _ = &mut stop => None }
    {
        record(event);
    }
    while let Some(event) = events.try_recv() {
        record(event);
    }
    counts
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let start = Instant::now();
    let now = || format!("[{:.2}s]", start.elapsed().as_secs_f64());
    let c = wire()?;
    let (stop_listening, stop) = tokio::sync::oneshot::channel();
    let listener = tokio::spawn(listen(c.subscribe(), stop, start));
    let released = Arc::new(AtomicUsize::new(0));
    let attached = open(&c, &released).await?;
    println!("{} 4 routers, {} sessions", now(), c.store().len());
    let work = tokio::spawn(script(c.clone(), start));
    let beats = tokio::spawn(heartbeats(c.clone()));

    tokio::select! {
        signal = tokio::signal::ctrl_c() => signal?,
        () = tokio::time::sleep(Duration::from_secs(2)) => {}
    }
    let stats = c.stats().await?;
    println!(
        "{} shutting down: {} active, {} terminating, {:?} deletions running, {:?} routers in grace",
        now(),
        stats.active,
        stats.terminating,
        stats.deletions_in_flight,
        stats.routers_in_grace
    );
    // The controller's own work stops first; a deletion it started belongs
    // to the deleter, so aborting the script does not stop it.
    work.abort();
    if let Ok(result) = work.await {
        result?;
    }
    // One call, in order. Heartbeats keep coming until the monitor stopped,
    // or it would convict live sessions while the others finish.
    let report = c.shutdown(Duration::from_secs(5)).await;
    beats.abort();
    println!(
        "{} shut down: deletions left running {:?}, pieces still running {:?}, {} grace period(s) stopped",
        now(),
        report.deletions,
        report.still_running,
        report.graces_stopped
    );
    let queue = &report.reclaim;
    println!(
        "{}   reclaim queue drained: {}, {} handed back, {} interrupted; {} releases ran in it",
        now(),
        queue.drained,
        queue.left.len(),
        queue.interrupted.len(),
        c.reclaim().stats().completed
    );

    // Close what is left: nothing else closes sessions now, and the queue
    // is shut, so their releases run here (as handed-back tasks would).
    let mut closed = 0;
    for census in c.store().census().await? {
        for session in c.store().sessions(census.router).await? {
            closed += usize::from(session.close(CloseReason::Shutdown).won());
            c.store().remove_exact(session.key()).await?;
        }
    }
    println!("{} closed the {closed} sessions left", now());
    let _ = stop_listening.send(());
    println!("events: {:?}", listener.await?);

    let audit = c.store().audit().await?;
    let released = released.load(Ordering::Relaxed);
    println!(
        "store: {} sessions, audit clean: {}; resources: {attached} attached, {released} released",
        c.store().len(),
        audit.is_clean()
    );
    if !report.is_complete() || !audit.is_clean() || !c.store().is_empty() {
        return Err(format!("shutdown left work or the store unclean: {audit:?}").into());
    }
    if attached != released {
        return Err("a resource was not released exactly once".into());
    }
    Ok(())
}
