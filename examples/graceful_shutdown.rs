//! A controller running every piece at once, shut down in the right order.
//!
//! A `MemoryStore`, a `ReclaimQueue`, a `RouterDeleter`, a `LivenessMonitor`,
//! a `Reconciler` and an `AuditSweeper` share one `EventBus`. Five routers
//! carry 200 sessions each while a scripted workload runs: clients come and
//! go, dead clients are reaped, router 0 is deleted, router 1 drops off and
//! reconnects (and is reconciled), legacy router 4 disconnects into its grace
//! period, and deaf router 3, which never confirms a termination, starts
//! being deleted. On ctrl-c, or after 2 s, the controller shuts down step by
//! step and prints what each step reported; then it checks that the store
//! is empty and clean and that every resource was released exactly once.
//!
//! `cargo run --example graceful_shutdown`

use std::collections::{BTreeMap, HashSet};
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use session_lifecycle::{
    AuditSweeper, Classed, CloseReason, Event, EventBus, Incarnation, LivenessEvent,
    LivenessMonitor, MemoryStore, NewSession, NotifyError, ProbeBatch, ProbeError, Prober,
    ReclaimEvent, ReclaimQueue, Reconciler, ResourceClass, RouterDeleter, RouterId, Session,
    SessionId, SessionStore, Stats, Subscription, TerminationBatch, TerminationNotifier,
};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn Error + Send + Sync>;

/// Deleted early; it confirms every termination.
const DELETED: RouterId = RouterId::new(0);
/// Drops off for 100 ms, less than the monitor's smallest timeout (so none
/// of its sessions is even suspected), then reconnects and is reconciled.
const FLAKY: RouterId = RouterId::new(1);
/// Its clients come and go.
const CHURNING: RouterId = RouterId::new(2);
/// Takes termination frames but never confirms: its deletion forces.
const DEAF: RouterId = RouterId::new(3);
/// Predates heartbeats: its sessions are not watched, and only
/// reconciliation and its grace period cover them. (The sessions of a
/// watched router that stays away are reaped by the monitor once their
/// probes fail, grace period or not.)
const LEGACY: RouterId = RouterId::new(4);
const SESSIONS: u64 = 200;
const HEARTBEAT: Duration = Duration::from_millis(100);

/// What the routers' links look like from the controller.
#[derive(Default)]
struct Network {
    down: Mutex<HashSet<RouterId>>,
}

impl Network {
    fn is_up(&self, router: RouterId) -> bool {
        !self.down.lock().contains(&router)
    }
}

/// Termination frames: a connected router confirms each session 10 ms
/// later (closing it in the store); the deaf router never does.
struct Routers {
    store: Arc<MemoryStore>,
    network: Arc<Network>,
}

impl TerminationNotifier for Routers {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        if !self.network.is_up(batch.router) {
            return Err(NotifyError::msg(format!(
                "{} is not connected",
                batch.router
            )));
        }
        if batch.router != DEAF {
            let store = Arc::clone(&self.store);
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

/// Probe frames: a connected router vouches for every live client.
struct Probes(Arc<Network>);

impl Prober for Probes {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        if !self.0.is_up(batch.router) {
            return Err(ProbeError::msg(format!(
                "{} is not connected",
                batch.router
            )));
        }
        Ok(batch
            .sessions
            .into_iter()
            .filter(|id| !is_dead(*id))
            .collect())
    }
}

/// One client in forty vanished without a word: no heartbeat, no answer.
fn is_dead(id: SessionId) -> bool {
    id.get() % 40 == 7
}

/// Counts every resource attached and released: they must match at the end.
#[derive(Default)]
struct Ledger {
    attached: AtomicUsize,
    released: AtomicUsize,
}

struct Controller {
    store: Arc<MemoryStore>,
    queue: ReclaimQueue,
    deleter: RouterDeleter<MemoryStore, Routers>,
    monitor: LivenessMonitor<MemoryStore, Probes>,
    reconciler: Reconciler<MemoryStore>,
    sweeper: AuditSweeper<MemoryStore>,
    network: Arc<Network>,
    ledger: Arc<Ledger>,
    start: Instant,
}

impl Controller {
    fn start(bus: &EventBus) -> Result<Self, BoxError> {
        let store = Arc::new(
            MemoryStore::builder()
                .events(bus.clone())
                .build()
                .expect("valid settings"),
        );
        let network = Arc::new(Network::default());
        // Every piece that closes sessions releases their resources through
        // the one queue: critical ones first, whoever closed them.
        let queue = ReclaimQueue::builder().events(bus.clone()).build()?;
        let deleter = RouterDeleter::builder()
            .notify_timeout(Duration::from_millis(200))
            .confirm_timeout(Duration::from_millis(400))
            .retries(1)
            .retry_backoff(Duration::from_millis(200), Duration::from_millis(400))
            .reclaim_queue(queue.clone())
            .events(bus.clone())
            .build(
                Arc::clone(&store),
                Routers {
                    store: Arc::clone(&store),
                    network: Arc::clone(&network),
                },
            )
            .expect("valid settings");
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(HEARTBEAT)
            .granularity(Duration::from_millis(10))
            .timeout_range(Duration::from_millis(300), Duration::from_secs(2))
            .pause_allowance(HEARTBEAT)
            .probe_timeout(HEARTBEAT)
            .probe_retries(1)
            .reclaim_queue(queue.clone())
            .events(bus.clone())
            .build(Arc::clone(&store), Probes(Arc::clone(&network)))?;
        let reconciler = Reconciler::builder()
            .grace_period(Duration::from_secs(30))
            .reclaim_queue(queue.clone())
            .events(bus.clone())
            .build(Arc::clone(&store))
            .expect("valid settings");
        let sweeper = AuditSweeper::builder()
            .interval(Duration::from_millis(300))
            .reclaim_queue(queue.clone())
            .events(bus.clone())
            .build(Arc::clone(&store))?;
        Ok(Self {
            store,
            queue,
            deleter,
            monitor,
            reconciler,
            sweeper,
            network,
            ledger: Arc::default(),
            start: Instant::now(),
        })
    }

    /// Opens a session holding a port (critical) and a buffer (normal),
    /// watched by the monitor unless its router predates heartbeats.
    async fn open(
        &self,
        id: u64,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<(), BoxError> {
        let spec = NewSession::new(SessionId::new(id), router, incarnation);
        let session = self.store.create(spec).await?;
        for class in [ResourceClass::Critical, ResourceClass::Normal] {
            let ledger = Arc::clone(&self.ledger);
            session.attach(Classed::new(class, move |_: CloseReason| {
                ledger.released.fetch_add(1, Ordering::Relaxed);
            }))?;
            self.ledger.attached.fetch_add(1, Ordering::Relaxed);
        }
        if router != LEGACY {
            self.monitor.watch(&session)?;
        }
        Ok(())
    }

    fn elapsed(&self) -> String {
        format!("[{:.2}s]", self.start.elapsed().as_secs_f64())
    }

    async fn at(&self, millis: u64) {
        tokio::time::sleep_until(self.start + Duration::from_millis(millis)).await;
    }
}

/// The scripted part of the demo: deletions, a reconnect, a disconnect.
async fn script(c: Arc<Controller>, flaky: Incarnation) -> Result<(), BoxError> {
    c.at(300).await;
    let outcome = c.deleter.delete(DELETED).await?;
    if let Some(report) = outcome.report() {
        println!(
            "{} {DELETED} deleted: {} confirmed, {} forced",
            c.elapsed(),
            report.confirmed,
            report.forced
        );
    }

    c.at(800).await;
    c.network.down.lock().insert(FLAKY);
    c.at(900).await;
    c.network.down.lock().remove(&FLAKY);
    // Back, it reports what it holds: five clients left meanwhile, and it
    // holds two sessions the controller never heard of.
    let held = c.store.sessions(FLAKY).await?;
    let reported = held.iter().map(Session::id).skip(5);
    let ghosts = [9_001, 9_002].map(SessionId::new);
    let report = c
        .reconciler
        .reconcile(FLAKY, flaky, reported.chain(ghosts))
        .await?;
    println!(
        "{} {FLAKY} reconnected: {} to drop on the router, {} closed here",
        c.elapsed(),
        report.drop.len(),
        report.closed.len()
    );

    c.at(1_000).await;
    c.network.down.lock().insert(LEGACY);
    let deadline = c.reconciler.router_disconnected(LEGACY).await?;
    println!(
        "{} {LEGACY} disconnected; its grace period ends in {:?}",
        c.elapsed(),
        deadline.saturating_duration_since(Instant::now())
    );

    c.at(1_200).await;
    println!("{} deleting {DEAF}, which never confirms", c.elapsed());
    c.deleter.delete(DEAF).await?;
    Ok(())
}

/// Clients of the churning router: every 50 ms one leaves and one joins.
/// Every fourth leaver is closed through its handle only, as a careless code
/// path would: the sweeper removes it from the store.
async fn churn(c: Arc<Controller>, incarnation: Incarnation) -> Result<(), BoxError> {
    let base = CHURNING.get() * 1_000;
    let mut every = tokio::time::interval(Duration::from_millis(50));
    for n in 0.. {
        every.tick().await;
        if let Some(session) = c.store.get(SessionId::new(base + n)).await? {
            if n % 4 == 3 {
                let _ = session.close(CloseReason::ClientClosed);
            } else {
                let _ = c
                    .store
                    .close(session.id(), CloseReason::ClientClosed)
                    .await?;
            }
        }
        c.open(base + 500 + n, CHURNING, incarnation).await?;
    }
    Ok(())
}

/// Heartbeats, as they arrive from every connected router.
async fn heartbeats(c: Arc<Controller>) {
    let mut every = tokio::time::interval(HEARTBEAT);
    loop {
        every.tick().await;
        for router in [DELETED, FLAKY, CHURNING, DEAF] {
            if !c.network.is_up(router) {
                continue;
            }
            for session in c.store.sessions(router).await.unwrap_or_default() {
                if !is_dead(session.id()) {
                    let _ = c.monitor.heartbeat(&session);
                }
            }
        }
    }
}

/// Prints the events that matter to an operator and counts the rest.
async fn listen(
    mut events: Subscription,
    stop: CancellationToken,
    start: Instant,
) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    // Every piece holds a clone of the bus, so the stream does not end by
    // itself: the listener is stopped once they are all shut down.
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = stop.cancelled() => None,
        };
        let Some(event) = event else { break };
        record(&mut counts, &event, start);
    }
    // Whatever was published before the stop.
    while let Some(event) = events.try_recv() {
        record(&mut counts, &event, start);
    }
    counts
}

fn record(counts: &mut BTreeMap<&'static str, usize>, event: &Event, start: Instant) {
    let at = format!("[{:.2}s]", start.elapsed().as_secs_f64());
    let kind = match event {
        Event::SessionCreated { .. } => "session created",
        Event::SessionTerminating { .. } => "session terminating",
        Event::SessionClosed { .. } => "session closed",
        Event::RouterFenced { .. } => "router fenced",
        Event::RouterDeleted(report) => {
            println!(
                "{at}   event: {} deleted: {} sessions, {} confirmed, {} forced",
                report.router, report.sessions, report.confirmed, report.forced
            );
            "router deleted"
        }
        Event::RouterDisconnected { .. } => "router disconnected",
        Event::RouterLost { .. } => "router lost",
        Event::Reconciled(_) => "router reconciled",
        Event::Repaired(repair) => {
            println!(
                "{at}   event: sweeper repaired {} ({})",
                repair.session, repair.action
            );
            "repaired"
        }
        Event::Liveness(LivenessEvent::SessionReaped {
            router, sessions, ..
        }) => {
            println!(
                "{at}   event: {} dead sessions of {router} reaped",
                sessions.len()
            );
            "sessions reaped"
        }
        Event::Liveness(_) => "liveness (other)",
        Event::Reclaim(ReclaimEvent::ReclaimFailed { task, error, .. }) => {
            println!("{at}   event: release for {} failed: {error}", task.session);
            "reclaim failed"
        }
        Event::Reclaim(_) => "reclaim (other)",
        _ => "other",
    };
    *counts.entry(kind).or_default() += 1;
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let bus = EventBus::new(16_384);
    let stop_listening = CancellationToken::new();
    let c = Arc::new(Controller::start(&bus)?);
    let listener = tokio::spawn(listen(bus.subscribe(), stop_listening.clone(), c.start));

    let running = run(&c).await?;
    tokio::select! {
        signal = tokio::signal::ctrl_c() => {
            signal?;
            println!("{} ctrl-c: shutting down", c.elapsed());
        }
        () = tokio::time::sleep(Duration::from_secs(2)) => {
            println!("{} demo time is up: shutting down", c.elapsed());
        }
    }
    let stats = Stats::collect(&*c.store)
        .await?
        .with_deleter(&c.deleter)
        .with_reclaim_queue(&c.queue)
        .with_reconciler(&c.reconciler);
    println!(
        "{}   {} active, {} terminating, {} deletions running, {} routers in grace",
        c.elapsed(),
        stats.active,
        stats.terminating,
        stats.deletions_in_flight.unwrap_or(0),
        stats.routers_in_grace.unwrap_or(0)
    );
    shut_down(&c, running).await?;

    stop_listening.cancel();
    let counts = listener.await?;
    let events: Vec<String> = counts
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    println!("events: {}", events.join(", "));
    check(&c).await
}

/// The tasks of the demo, and how to stop them.
struct Running {
    /// Stops what brings new work: the script and the churning clients.
    new_work: CancellationToken,
    work: [JoinHandle<Option<Result<(), BoxError>>>; 2],
    /// Stops the heartbeats.
    beats: CancellationToken,
    heartbeats: JoinHandle<Option<()>>,
}

/// Opens the routers' sessions and starts the workload and the heartbeats.
async fn run(c: &Arc<Controller>) -> Result<Running, BoxError> {
    let mut incarnations = Vec::new();
    for router in [DELETED, FLAKY, CHURNING, DEAF, LEGACY] {
        let incarnation = c.store.register_router(router).await?;
        for id in router.get() * 1_000..router.get() * 1_000 + SESSIONS {
            c.open(id, router, incarnation).await?;
        }
        incarnations.push(incarnation);
    }
    println!("{} 5 routers, {} sessions", c.elapsed(), c.store.len());

    let new_work = CancellationToken::new();
    let work = [
        spawn_until(&new_work, script(Arc::clone(c), incarnations[1])),
        spawn_until(&new_work, churn(Arc::clone(c), incarnations[2])),
    ];
    // Heartbeats are not new work: they keep coming until the monitor is
    // stopped, or it would convict live sessions while the others drain.
    let beats = CancellationToken::new();
    let heartbeats = spawn_until(&beats, heartbeats(Arc::clone(c)));
    Ok(Running {
        new_work,
        work,
        beats,
        heartbeats,
    })
}

/// Shuts the controller down, from what brings work in to what drains it
/// last: each piece stops only once nothing still running needs it. The
/// deleter, the reconciler, the sweeper and the monitor all close sessions
/// and push their releases into the reclaim queue, so the queue goes last;
/// the monitor needs heartbeats, so they stop after it; and what is left
/// is closed only once no other piece can close it concurrently.
async fn shut_down(c: &Controller, running: Running) -> Result<(), BoxError> {
    // 1. Stop taking new work: no session opens and no deletion starts from
    //    here on. A deletion already running belongs to the deleter, so
    //    dropping the script's `delete` future does not stop it.
    running.new_work.cancel();
    for task in running.work {
        if let Some(Err(error)) = task.await? {
            return Err(error);
        }
    }
    println!("{} 1. new work stopped", c.elapsed());

    // 2. The deleter first: its running deletions must finish (a deletion
    //    cut short leaves its router fenced, half done), and their force
    //    phase pushes releases into the reclaim queue, which must still be
    //    open for them. The other pieces keep working meanwhile.
    let deleting = c.deleter.running();
    c.deleter.shutdown().await;
    println!(
        "{} 2. deleter shut down; waited for {deleting} running deletion(s)",
        c.elapsed()
    );

    // 3. The reconciler: its grace timers must not close sessions as
    //    "router lost" while the controller, not the router, goes away. An
    //    expiry already running finishes first.
    let in_grace = c.reconciler.in_grace();
    c.reconciler.shutdown().await;
    println!(
        "{} 3. reconciler shut down; {in_grace} grace timer(s) stopped, their routers keep their sessions",
        c.elapsed()
    );

    // 4. The sweeper: a sweep in progress finishes; none starts while what
    //    is left is being closed below.
    c.sweeper.shutdown().await;
    let sweeps = c.sweeper.stats();
    println!(
        "{} 4. sweeper shut down after {} sweeps: {} findings, {} repairs",
        c.elapsed(),
        sweeps.sweeps,
        sweeps.findings,
        sweeps.repairs
    );

    // 5. The monitor last of the four, then the heartbeats it listened to: until now it
    //    kept reaping dead sessions (through the queue) and sparing live
    //    ones. Suspects whose probe rounds it drops stay open, for step 6.
    c.monitor.shutdown().await;
    running.beats.cancel();
    running.heartbeats.await?;
    let liveness = c.monitor.stats();
    println!(
        "{} 5. monitor shut down: {} reaped, {} suspects left open",
        c.elapsed(),
        liveness.reaped,
        liveness.suspects
    );

    // 6. Close what is left. Nothing else closes sessions any more, so this
    //    is the only closer; releases go through the queue, critical first.
    let closed = close_remaining(c).await?;
    println!(
        "{} 6. closed {closed} remaining session(s) (reason: shutdown)",
        c.elapsed()
    );

    // 7. Drain the queue last: every piece above pushed releases into it.
    //    Shut down earlier, it would release those in the pushing caller,
    //    unordered and without retries.
    let report = c.queue.shutdown(Duration::from_secs(2)).await;
    println!(
        "{} 7. reclaim queue shut down: drained {}, {} handed back, {} interrupted",
        c.elapsed(),
        report.drained,
        report.left.len(),
        report.interrupted.len()
    );
    for mut task in report.left {
        // Handed back unstarted: one last attempt here.
        if let Err(error) = task.run_once().await {
            println!("   release for {} failed: {error}", task.info().session);
        }
    }

    Ok(())
}

/// Runs `work` on its own task until `stop` is cancelled.
fn spawn_until<F>(stop: &CancellationToken, work: F) -> JoinHandle<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => None,
            output = work => Some(output),
        }
    })
}

/// Closes every session still in the store, its resources through the
/// queue, and removes it.
async fn close_remaining(c: &Controller) -> Result<usize, BoxError> {
    let mut closed = 0;
    for census in c.store.census().await? {
        for session in c.store.sessions(census.router).await? {
            if c.queue
                .close_session(&session, CloseReason::Shutdown)
                .await
                .won()
            {
                closed += 1;
            }
            c.store.remove(session.id()).await?;
        }
    }
    Ok(closed)
}

async fn check(c: &Controller) -> Result<(), BoxError> {
    let audit = c.store.audit().await?;
    let attached = c.ledger.attached.load(Ordering::Relaxed);
    let released = c.ledger.released.load(Ordering::Relaxed);
    let queue = c.queue.stats();
    println!(
        "store: {} sessions, audit clean: {}; resources: {attached} attached, {released} released; queue: {} completed, {} failed",
        c.store.len(),
        audit.is_clean(),
        queue.completed,
        queue.failed
    );
    if !audit.is_clean() || !c.store.is_empty() {
        return Err(format!("the store is not empty and clean: {audit:?}").into());
    }
    if attached != released {
        return Err("a resource was not released exactly once".into());
    }
    Ok(())
}
