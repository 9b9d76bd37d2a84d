//! The demo controller on the in-memory store: the README's main job.
//!
//! A simulated overlay controller, by default 100 routers × 5,000 sessions:
//!
//! 0. **Wire.** One `Lifecycle` builds every piece over the store, wired
//!    together: the reclaim queue, the `RouterDeleter`, the
//!    `LivenessMonitor`, the reconciler and the `AuditSweeper`, all on one
//!    event bus.
//! 1. **Open.** Tasks open every session (each with a resource that counts
//!    its release) and the liveness monitor watches them all.
//! 2. **Heartbeats and dead sessions.** Two tasks heartbeat the live
//!    sessions; 2 % of the sessions are dead (no heartbeat, no probe answer)
//!    and are found and reaped through the probes.
//! 3. **Partition.** The controller's own network fails for a few seconds
//!    (`--partition-ms`): no heartbeat arrives, no probe is answered. The
//!    monitor's partition guard sees every router fall silent together,
//!    reaps nobody, and lifts once the heartbeats are back.
//! 4. **Deletions under load.** A fifth of the routers are deleted at once
//!    by the deleter, while churn tasks keep creating and closing
//!    sessions on the other routers and keep trying to create sessions on
//!    the routers being deleted. The routers' notifier loses 1 % of the
//!    termination notices and confirms the rest after random delays; one
//!    router never answers, so its sessions are forced.
//!    Each deleted router's routes are then withdrawn through the reclaim
//!    queue; every tenth router refuses the first withdrawal for good, so
//!    its task waits as a dead letter until `redrive()` queues it again.
//!    Meanwhile 1 % of the sessions on the other routers reach the expiry
//!    their API session gave them (half of them extended once) and are
//!    closed by the expiry monitor, after an `ExpiringSoon` warning.
//! 5. **Check.** `Lifecycle::shutdown` (nothing may be left), a sweep and
//!    `audit()`: zombies must be 0,
//!    every closed session must have released its resource exactly once,
//!    and no create may have succeeded on a deleted router.
//! 6. **Restart adoption.** A controller restarted with a fresh store gets
//!    one surviving router's report of its open sessions (plus one that
//!    expired) and adopts them with `Reconciler::reconcile_adopting`: every
//!    open session adopted, the expired one rejected, none lost.
//!
//! The summary lists sessions created, routers deleted, confirmed vs forced
//! closes, dead sessions found, sessions expired, the partition guard
//! (triggered, lifted, reaped during the partition), the audit, deletion
//! latency p50/p99 and peak memory. The exit code is non-zero if any check fails.
//!
//! ```sh
//! cargo run --release --example controller
//! cargo run --release --example controller -- --routers 20 --sessions 50000
//! cargo run --release --example controller -- --help
//! ```

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use session_lifecycle::{
    Backoff, CloseReason, Event, EventBus, ExpiryMonitor, Lifecycle, LivenessMonitor, MemoryStore,
    NewSession, NotifyError, ProbeBatch, ProbeError, Prober, ReclaimQueue, Reconciler,
    ResourceClass, RouterDeleter, RouterId, Session, SessionId, SessionKey, SessionStore,
    TerminationBatch, TerminationNotifier,
    deleter::Confirmations,
    reclaim::ReclaimError,
    reclaim::ReclaimTask,
    reconcile::{Adoption, ReportedSession, adopt_fn},
};
use tokio::task::JoinSet;
use tokio::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The demo controller on the in-memory store.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Routers registered.
    #[arg(long, default_value_t = 100)]
    routers: u64,
    /// Sessions opened per router.
    #[arg(long, default_value_t = 5_000)]
    sessions: u64,
    /// One session in this many is dead (default: 2 %).
    #[arg(long, default_value_t = 50)]
    dead_one_in: u64,
    /// Percentage of routers deleted under load.
    #[arg(long, default_value_t = 20)]
    delete_percent: u64,
    /// Percentage of termination notices the routers lose.
    #[arg(long, default_value_t = 1.0)]
    loss_percent: f64,
    /// Heartbeat interval, in milliseconds.
    #[arg(long, default_value_t = 250)]
    heartbeat_ms: u64,
    /// How long the controller's network is cut in the partition phase, in
    /// milliseconds (0, or fewer than 4 routers, the partition guard's
    /// minimum: no partition phase).
    #[arg(long, default_value_t = 3_000)]
    partition_ms: u64,
    /// Seed of the simulation's randomness.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// One session in this many (live, on a router that is not deleted)
    /// has an expiry during the run (default: 1 %).
    #[arg(long, default_value_t = 100)]
    expire_one_in: u64,
}

impl Args {
    fn is_dead(&self, id: SessionId) -> bool {
        id.get() < self.routers * self.sessions && id.get().is_multiple_of(self.dead_one_in.max(1))
    }

    /// When session `id` of `router` expires, if it does: 2 to 4 s into the
    /// run, for 1 in `expire_one_in` live sessions of routers not deleted.
    fn expiry(&self, id: SessionId, router: RouterId, started: Instant) -> Option<Instant> {
        let chosen = id.get() % self.expire_one_in.max(1) == 1
            && !self.is_dead(id)
            && !self.doomed().contains(&router);
        chosen.then(|| started + Duration::from_millis(2_000 + id.get() * 7_919 % 2_000))
    }

    /// The routers to delete: every k-th, the first of them never answers.
    fn doomed(&self) -> Vec<RouterId> {
        let count = (self.routers * self.delete_percent / 100).clamp(1, self.routers);
        let step = (self.routers / count).max(1);
        (0..count).map(|i| RouterId::new(i * step)).collect()
    }
}

/// A small deterministic generator (splitmix64): the demo needs no crate
/// for its dice.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `true` with probability `percent` / 100.
    fn chance(&mut self, percent: f64) -> bool {
        ((self.next() % 1_000_000) as f64) < percent * 10_000.0
    }
}

/// Stands in for the routers answering termination notices: each notice
/// is lost with the configured probability; the rest are confirmed after a
/// random delay of up to 50 ms, through the batch's `Confirmations` (by
/// handle: no lookup in the store), or by key through the store for a
/// batch sent without them. The mute router never answers.
struct Routers {
    store: Arc<MemoryStore>,
    mute: RouterId,
    loss_percent: f64,
    seed: AtomicU64,
    lost: AtomicUsize,
}

impl Routers {
    /// Answers `batch` in four groups, each after its own delay.
    fn answer(&self, batch: TerminationBatch, handles: Option<Arc<Confirmations>>) {
        if batch.router == self.mute {
            // Accepted by the network, never answered.
            return;
        }
        let mut dice = Dice(self.seed.fetch_add(1, Ordering::Relaxed));
        let mut groups: [Vec<SessionKey>; 4] = Default::default();
        for key in batch.sessions {
            if dice.chance(self.loss_percent) {
                self.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            groups[(dice.next() % 4) as usize].push(key);
        }
        for group in groups {
            let store = Arc::clone(&self.store);
            let handles = handles.clone();
            let delay = Duration::from_millis(1 + dice.next() % 50);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // By handle or by key: a confirmation that lands after the
                // session was forced and its id reused closes nothing.
                match handles {
                    Some(handles) => drop(handles.confirm_keys(group)),
                    None => {
                        for key in group {
                            let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
                        }
                    }
                }
            });
        }
    }
}

impl TerminationNotifier for Routers {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        self.answer(batch, None);
        Ok(())
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> Result<(), NotifyError> {
        self.answer(batch, Some(Arc::new(confirm)));
        Ok(())
    }
}

/// The routers' answers to liveness probes: every session answers but the
/// dead ones; nothing answers while the controller's network is cut.
struct Probes {
    args: Args,
    partitioned: Arc<AtomicBool>,
}

impl Prober for Probes {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        if self.partitioned.load(Ordering::Relaxed) {
            // Lost on the way: the probe timeout ends the call.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(batch
            .sessions
            .into_iter()
            .filter(|id| !self.args.is_dead(*id))
            .collect())
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
fn bar(len: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(message);
    if std::io::stderr().is_terminal() {
        if let Ok(style) = ProgressStyle::with_template("{msg:24} [{bar:40}] {pos}/{len} {elapsed}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

/// What the run counted.
#[derive(Default)]
struct Counts {
    created: AtomicUsize,
    client_closed: AtomicUsize,
    released: Arc<AtomicUsize>,
    refused_on_deleted: AtomicUsize,
    accepted_on_deleted: AtomicUsize,
}

impl Counts {
    /// Opens a session with a resource counting its release.
    async fn open(&self, store: &MemoryStore, spec: NewSession) -> Result<Session, BoxError> {
        let session = store.create(spec).await?;
        session.record_in(512);
        let released = Arc::clone(&self.released);
        session.attach(move |_: CloseReason| {
            released.fetch_add(1, Ordering::Relaxed);
        })?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(session)
    }
}

/// Peak resident memory of the process, from `/proc/self/status`.
fn peak_memory() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(format!("{:.1} MiB", kib as f64 / 1024.0))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let args = Args::parse();
    if args.routers == 0 || args.sessions == 0 {
        return Err("--routers and --sessions must be above zero".into());
    }
    let started = Instant::now();
    let store = Arc::new(MemoryStore::new());
    let counts = Arc::new(Counts::default());
    let heartbeat = Duration::from_millis(args.heartbeat_ms.max(10));
    let doomed = args.doomed();
    let mute = doomed[0];
    let routers = Arc::new(Routers {
        store: Arc::clone(&store),
        mute,
        loss_percent: args.loss_percent,
        seed: AtomicU64::new(args.seed),
        lost: AtomicUsize::new(0),
    });

    // 0. Wire every piece through one builder.
    let partitioned = Arc::new(AtomicBool::new(false));
    let lifecycle = Lifecycle::builder(Arc::clone(&store), Arc::clone(&routers))
        .prober(Probes {
            args: args.clone(),
            partitioned: Arc::clone(&partitioned),
        })
        // Room for the burst of a fifth of the routers deleted at once
        // (about one `SessionTerminating` per session); what a slow reader
        // still misses is counted, not lost silently.
        .events(EventBus::new(1 << 18))
        .reclaim(ReclaimQueue::builder().workers(2))
        .liveness(
            LivenessMonitor::builder()
                .heartbeat_interval(heartbeat)
                .granularity(Duration::from_millis(10))
                .timeout_range(heartbeat, Duration::from_secs(10))
                .pause_allowance(heartbeat)
                .probe_timeout(heartbeat)
                .probe_retries(1),
        )
        // Expiring sessions are warned a second ahead.
        .expiry(ExpiryMonitor::builder().warn_before(Duration::from_secs(1)))
        .deleter(
            RouterDeleter::builder()
                .batch_size(1_000)
                .confirm_timeout(Duration::from_millis(500))
                .backoff(
                    Backoff::new()
                        .retries(2)
                        .delays(Duration::from_millis(50), Duration::from_millis(200)),
                ),
        )
        .build()?;
    let (stop_watching, stop) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch_events(lifecycle.subscribe(), stop));

    // 1. Open: one task per router.
    let mut incarnations = Vec::new();
    for r in 0..args.routers {
        incarnations.push(store.register_router(RouterId::new(r)).await?);
    }
    let total = args.routers * args.sessions;
    let opening = bar(total, "opening sessions");
    let mut tasks = JoinSet::new();
    for (r, incarnation) in incarnations.iter().copied().enumerate() {
        let (store, counts, opening) = (Arc::clone(&store), Arc::clone(&counts), opening.clone());
        let (args, expiry) = (args.clone(), lifecycle.expiry().clone());
        let per_router = args.sessions;
        tasks.spawn(async move {
            let router = RouterId::new(r as u64);
            let mut sessions = Vec::with_capacity(per_router as usize);
            for i in 0..per_router {
                let id = SessionId::new(r as u64 * per_router + i);
                let mut spec = NewSession::new(id, router, incarnation);
                let expires_at = args.expiry(id, router, started);
                if let Some(at) = expires_at {
                    spec = spec.expires_at(at);
                }
                let session = counts.open(&store, spec).await?;
                if expires_at.is_some() {
                    // Its API session was refreshed: half of them once.
                    if id.get().is_multiple_of(2) {
                        session.extend_expiry(started + Duration::from_secs(4))?;
                    }
                    expiry.track(&session)?;
                }
                sessions.push(session);
                if i % 1_024 == 0 {
                    opening.inc(1_024.min(per_router - i));
                    tokio::task::yield_now().await;
                }
            }
            Ok::<_, BoxError>(sessions)
        });
    }
    let mut sessions = Vec::with_capacity(total as usize);
    while let Some(opened) = tasks.join_next().await {
        sessions.extend(opened??);
    }
    opening.finish_and_clear();
    let opened_in = started.elapsed();

    // 2. Heartbeats and dead sessions.
    let monitor = lifecycle.liveness();
    for session in &sessions {
        monitor.watch(session)?;
    }
    let expiring: Vec<Session> = sessions
        .iter()
        .filter(|s| s.expires_at().is_some())
        .cloned()
        .collect();
    let (dead, live): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|s| args.is_dead(s.id()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut beating = JoinSet::new();
    let half = live.len() / 2;
    for part in [live[..half].to_vec(), live[half..].to_vec()] {
        let (monitor, stop) = (monitor.clone(), Arc::clone(&stop));
        let partitioned = Arc::clone(&partitioned);
        beating.spawn(async move {
            let mut every = tokio::time::interval(heartbeat);
            let mut part = part;
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                if partitioned.load(Ordering::Relaxed) {
                    continue; // nothing gets through
                }
                // Sessions of deleted routers leave as they close.
                part.retain(|session| monitor.heartbeat(session).is_ok());
                tokio::task::yield_now().await;
            }
        });
    }
    let liveness_started = Instant::now();
    let reaping = bar(dead.len() as u64, "reaping dead sessions");
    let bound = monitor.reap_bound(Duration::from_secs(10));
    for session in &dead {
        tokio::time::timeout(bound, session.closed()).await?;
        reaping.inc(1);
    }
    reaping.finish_and_clear();
    let reaped_in = liveness_started.elapsed();

    // 3. A controller-side partition: every router falls silent at once.
    // With fewer than 4 routers (the guard's default minimum) a partition
    // cannot be told from their deaths: no partition phase then.
    let cut = Duration::from_millis(args.partition_ms);
    let partitioning = args.routers >= 4 && !cut.is_zero();
    let partition = if partitioning {
        partition(monitor, &partitioned, cut).await?
    } else {
        Partition::default()
    };

    // 4. Deletions under load.
    let next_id = Arc::new(AtomicU64::new(total));
    let mut churn = JoinSet::new();
    for worker in 0..2u64 {
        let (store, counts, stop, next_id) = (
            Arc::clone(&store),
            Arc::clone(&counts),
            Arc::clone(&stop),
            Arc::clone(&next_id),
        );
        let (args, doomed, incarnations) = (args.clone(), doomed.clone(), incarnations.clone());
        churn.spawn(async move {
            let mut dice = Dice(args.seed ^ worker);
            while !stop.load(Ordering::Relaxed) {
                let r = dice.next() % args.routers;
                let router = RouterId::new(r);
                let id = SessionId::new(next_id.fetch_add(1, Ordering::Relaxed));
                let spec = NewSession::new(id, router, incarnations[r as usize]);
                match counts.open(&store, spec).await {
                    Ok(_) => {
                        tokio::task::yield_now().await;
                        // A deletion may have closed it meanwhile.
                        if store
                            .close(id, CloseReason::ClientClosed)
                            .await
                            .is_ok_and(|outcome| outcome.won())
                        {
                            counts.client_closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) if doomed.contains(&router) => {
                        counts.refused_on_deleted.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                    Err(error) => return Err(error),
                }
            }
            Ok::<_, BoxError>(())
        });
    }
    let deleting = bar(doomed.len() as u64, "deleting routers");
    let deletions_started = Instant::now();
    let mut deletions = JoinSet::new();
    for &router in &doomed {
        let delete = lifecycle.deleter().delete(router);
        deletions.spawn(async move { (router, delete.await) });
    }
    let mut latencies = Vec::new();
    let (mut deleted, mut confirmed, mut forced, mut already_closed) = (0, 0, 0, 0);
    let mut mute_forced = 0;
    while let Some(joined) = deletions.join_next().await {
        let (router, outcome) = joined?;
        let outcome = outcome?;
        let report = outcome
            .report()
            .ok_or_else(|| format!("{router} was already deleted"))?;
        deleted += 1;
        confirmed += report.confirmed;
        forced += report.forced;
        already_closed += report.already_closed;
        if router == mute {
            mute_forced = report.forced;
        }
        latencies.push(report.durations.total);
        deleting.inc(1);
    }
    deleting.finish_and_clear();
    let deleted_in = deletions_started.elapsed();
    // Each deleted router's routes are withdrawn through the reclaim queue
    // (a user task); every tenth router refuses the first withdrawal for
    // good, so its task becomes a dead letter until it is re-driven.
    let withdrawn = Arc::new(AtomicUsize::new(0));
    for (&router, r) in doomed.iter().zip(0u64..) {
        let withdrawn = Arc::clone(&withdrawn);
        let mut refused = r.is_multiple_of(10);
        let task = ReclaimTask::new(SessionId::new(0), router, move || {
            let refuse = std::mem::take(&mut refused);
            if !refuse {
                withdrawn.fetch_add(1, Ordering::Relaxed);
            }
            async move {
                if refuse {
                    Err(ReclaimError::permanent("router refused the withdrawal"))
                } else {
                    Ok(())
                }
            }
        })
        .class(ResourceClass::High);
        if lifecycle.reclaim().push(task).await.is_err() {
            return Err("the reclaim queue shut down".into());
        }
    }
    lifecycle.reclaim().idle().await;
    let dead_letters = lifecycle.reclaim().stats().dead_letters;
    let redriven = lifecycle.reclaim().redrive().await;
    lifecycle.reclaim().idle().await;
    let dead_letters_after = lifecycle.reclaim().stats().dead_letters;
    let outstanding = lifecycle.reclaim().stats().outstanding.total();
    // A create on a deleted router after its deletion: must be refused.
    for (&router, r) in doomed.iter().zip(0..) {
        let incarnation = incarnations[router.get() as usize];
        let late = NewSession::new(SessionId::new(u64::MAX - r), router, incarnation);
        match store.create(late).await {
            Ok(_) => counts.accepted_on_deleted.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.refused_on_deleted.fetch_add(1, Ordering::Relaxed),
        };
    }

    // Sessions whose expiry is still to come close by then.
    let last_expiry = expiring.iter().filter_map(Session::expires_at).max();
    for session in &expiring {
        let within = last_expiry.unwrap_or_else(Instant::now) + Duration::from_secs(1);
        let _ = tokio::time::timeout_at(within, session.closed()).await;
    }
    let all_expired = expiring
        .iter()
        .all(|s| s.close_reason() == Some(CloseReason::Expired));

    // 5. Wind down and check.
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = churn.join_next().await {
        done??;
    }
    while let Some(done) = beating.join_next().await {
        done?;
    }
    let live_convicted = live
        .iter()
        .filter(|s| s.close_reason() == Some(CloseReason::LivenessTimeout))
        .count();
    let liveness = monitor.stats();
    // In order: no new work, what the pieces hold, the queue drained last.
    let shutdown = lifecycle.shutdown(Duration::from_secs(10)).await;
    // After the shutdown: the expiry monitor's closes have all finished.
    let expiry = lifecycle.expiry().stats();
    // One sweep on demand (the sweeper's periodic task has stopped).
    let sweeper = lifecycle.sweeper().ok_or("built with a sweeper")?;
    let sweep = sweeper.sweep().await?;
    let audit = store.audit().await?;
    let stats = lifecycle.stats().await?;
    let survivor = (0..args.routers)
        .map(RouterId::new)
        .find(|router| !doomed.contains(router))
        .unwrap_or(mute);
    let adoption = restart_adoption(&store, survivor).await?;
    let created = counts.created.load(Ordering::Relaxed);
    let open_now = store.len();
    let released = counts.released.load(Ordering::Relaxed);
    let closed = created - open_now;
    latencies.sort_unstable();
    let doomed_sessions: usize = doomed.len() * args.sessions as usize;

    println!("routers registered:      {}", args.routers);
    println!(
        "sessions created:        {created} ({total} opened in {opened_in:.2?}, the rest by churn)"
    );
    println!(
        "closed by clients:       {}",
        counts.client_closed.load(Ordering::Relaxed)
    );
    println!(
        "dead sessions found:     {} of {} reaped in {reaped_in:.2?} (probes: {}, live convicted: {live_convicted})",
        liveness.reaped,
        dead.len(),
        liveness.probes
    );
    println!(
        "expired:                 {} (warned {}) of {} given an expiry",
        expiry.expired,
        expiry.warned,
        expiring.len()
    );
    println!(
        "routers deleted:         {deleted} of {} in {deleted_in:.2?} ({doomed_sessions} initial sessions, plus churn)",
        doomed.len()
    );
    println!(
        "deletion closes:         {confirmed} confirmed, {forced} forced ({mute_forced} on the mute {mute}), {already_closed} already closed"
    );
    println!(
        "notices lost:            {}",
        routers.lost.load(Ordering::Relaxed)
    );
    println!(
        "deletion latency:        p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "creates on deleted:      {} refused, {} accepted after deletion",
        counts.refused_on_deleted.load(Ordering::Relaxed),
        counts.accepted_on_deleted.load(Ordering::Relaxed)
    );
    println!("resources released:      {released} (closed sessions: {closed})");
    println!(
        "reclaim queue:           drained = {}, left = {}",
        shutdown.reclaim.drained,
        shutdown.reclaim.left.len()
    );
    println!(
        "dead letters:            {dead_letters} kept, {redriven} re-driven, {dead_letters_after} after re-drive; {outstanding} tasks outstanding; routes withdrawn on {} of {} deleted routers",
        withdrawn.load(Ordering::Relaxed),
        doomed.len()
    );
    let _ = stop_watching.send(());
    let seen = watcher.await?;
    let lagged = lifecycle.events().stats().lagged;
    println!(
        "events:                  {} router fenced, {} terminating, {} deleted, {} reaped, {} repaired; {lagged} missed (lag)",
        seen.fenced, seen.terminating, seen.deleted, seen.reaped, seen.repaired
    );
    if partitioning {
        println!(
            "partition guard:         triggered {}, lifted {}, reaped during partition {} ({cut:.2?} cut, lifted {:.2?} after the heal)",
            seen.partitions_suspected,
            seen.partitions_ended,
            partition.reaped,
            partition.lifted_after
        );
    } else {
        println!("partition guard:         no partition phase (fewer than 4 routers, or no cut)");
    }
    println!(
        "sessions in the store:   {open_now} ({} active, {} terminating) on {} routers",
        stats.active,
        stats.terminating,
        stats.routers.len()
    );
    println!(
        "audit:                   zombies = {}, index disagreements = {}, repairs = {}",
        audit.zombies(),
        audit.missing_from_index.len() + audit.missing_from_map.len(),
        sweep.repairs.len()
    );
    println!(
        "restart adoption:        {} sessions adopted of {} held by {survivor}, {} rejected (expired), {} lost",
        adoption.adopted, adoption.held, adoption.rejected, adoption.lost
    );
    println!(
        "peak memory:             {}",
        peak_memory().unwrap_or_else(|| "n/a".into())
    );
    println!("total time:              {:.2?}", started.elapsed());

    let checks = [
        ("audit clean", audit.is_clean() && sweep.repairs.is_empty()),
        (
            "no create accepted on a deleted router",
            counts.accepted_on_deleted.load(Ordering::Relaxed) == 0,
        ),
        ("every close released its resource once", released == closed),
        (
            "every dead session reaped",
            liveness.reaped == dead.len() as u64,
        ),
        ("no live session convicted", live_convicted == 0),
        (
            "every session given an expiry expired, once",
            all_expired && expiry.expired == expiring.len() as u64,
        ),
        (
            "the partition guard triggered and lifted once, nobody reaped during it",
            partition.reaped == 0
                && !liveness.partition_suspected
                && [
                    partition.triggered,
                    seen.partitions_suspected,
                    seen.partitions_ended,
                ] == [u64::from(partitioning); 3],
        ),
        ("every doomed router deleted", deleted == doomed.len()),
        (
            "the mute router's sessions forced",
            mute_forced >= args.sessions as usize - dead_on(&args, mute),
        ),
        ("the reclaim queue drained", shutdown.reclaim.drained),
        (
            "no dead letter left after the re-drive, nothing outstanding",
            dead_letters_after == 0
                && outstanding == 0
                && withdrawn.load(Ordering::Relaxed) == doomed.len(),
        ),
        ("nothing left at shutdown", shutdown.is_complete()),
        (
            "a restarted controller adopts every open session, rejects the expired one",
            adoption.adopted == adoption.held && adoption.rejected == 1 && adoption.lost == 0,
        ),
    ];
    let mut ok = true;
    for (check, passed) in checks {
        if !passed {
            eprintln!("FAILED: {check}");
            ok = false;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the event subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    fenced: usize,
    terminating: usize,
    deleted: usize,
    reaped: usize,
    repaired: usize,
    partitions_suspected: u64,
    partitions_ended: u64,
}

/// Counts the events of the run until told to stop, then counts what is
/// still buffered.
async fn watch_events(
    mut events: session_lifecycle::events::Subscription,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Seen {
    let mut seen = Seen::default();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = &mut stop => break,
        };
        match event {
            Some(event) => seen.count(event),
            None => return seen,
        }
    }
    while let Some(event) = events.try_recv() {
        seen.count(event);
    }
    seen
}

impl Seen {
    fn count(&mut self, event: Event) {
        match event {
            Event::RouterFenced { .. } => self.fenced += 1,
            Event::SessionTerminating { .. } => self.terminating += 1,
            Event::RouterDeleted(_) => self.deleted += 1,
            Event::Liveness(session_lifecycle::LivenessEvent::SessionReaped {
                sessions, ..
            }) => self.reaped += sessions.len(),
            Event::Repaired(_) => self.repaired += 1,
            Event::PartitionSuspected { .. } => self.partitions_suspected += 1,
            Event::PartitionEnded { .. } => self.partitions_ended += 1,
            _ => {}
        }
    }
}

/// How the partition phase went.
#[derive(Default)]
struct Partition {
    /// Times the guard engaged during the phase.
    triggered: u64,
    /// Sessions reaped from the cut until the guard lifted.
    reaped: u64,
    /// From the heal to the lift.
    lifted_after: Duration,
}

/// Cuts the controller's network for `cut` (no heartbeat arrives, no probe
/// is answered), heals it, and waits until the partition guard lifted.
async fn partition(
    monitor: &LivenessMonitor<MemoryStore, Probes>,
    partitioned: &AtomicBool,
    cut: Duration,
) -> Result<Partition, BoxError> {
    let before = monitor.stats();
    partitioned.store(true, Ordering::Relaxed);
    tokio::time::sleep(cut).await;
    partitioned.store(false, Ordering::Relaxed);
    let healed = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(10));
    while monitor.stats().partition_suspected {
        if healed.elapsed() > Duration::from_secs(30) {
            return Err("the partition guard did not lift within 30 s of the heal".into());
        }
        every.tick().await;
    }
    let after = monitor.stats();
    Ok(Partition {
        triggered: after.partitions - before.partitions,
        reaped: after.reaped - before.reaped,
        lifted_after: healed.elapsed(),
    })
}

/// Dead sessions among the initial sessions of `router` (reaped before the
/// deletion, so not forced by it).
fn dead_on(args: &Args, router: RouterId) -> usize {
    let first = router.get() * args.sessions;
    (first..first + args.sessions)
        .filter(|&id| args.is_dead(SessionId::new(id)))
        .count()
}

/// What the restart adoption did.
struct Adopted {
    held: usize,
    adopted: usize,
    rejected: usize,
    lost: usize,
}

/// A controller restarted with a fresh store: `router` reconnects and
/// reports the open sessions it holds in `store` (the old controller's),
/// with one more that expired meanwhile; the new controller's reconciler
/// adopts what has not expired.
async fn restart_adoption(store: &MemoryStore, router: RouterId) -> Result<Adopted, BoxError> {
    let held: Vec<SessionId> = store
        .sessions(router)
        .await?
        .iter()
        .filter(|session| !session.is_closed())
        .map(Session::id)
        .collect();
    let restarted = Arc::new(MemoryStore::new());
    let incarnation = restarted.register_router(router).await?;
    let reconciler = Reconciler::builder().build(Arc::clone(&restarted))?;
    let left = Duration::from_secs(3_600);
    let reported = held
        .iter()
        .map(|&id| ReportedSession::new(id).with_expires_in(left))
        .chain([ReportedSession::new(SessionId::new(u64::MAX)).with_expires_in(Duration::ZERO)]);
    let unexpired = adopt_fn(|_router, reported: ReportedSession| {
        if reported.is_expired() {
            Adoption::reject("expired")
        } else {
            Adoption::accept(())
        }
    });
    let report = reconciler
        .reconcile_adopting(router, incarnation, reported, &unexpired)
        .await?;
    let mut lost = 0;
    for &id in &held {
        if restarted.get(id).await?.is_none() {
            lost += 1;
        }
    }
    Ok(Adopted {
        held: held.len(),
        adopted: report.summary.adopted,
        rejected: report.summary.rejected,
        lost,
    })
}
