//! The demo controller on the in-memory store.
//!
//! Registers routers, opens sessions on them from concurrent tasks, closes
//! some as clients leave, deletes three routers at once with a
//! `RouterDeleter` (one of them dead, so its sessions are forced), shows that
//! creates on them are refused, then watches the remaining sessions with a
//! `LivenessMonitor` while 2 % of them are dead (no heartbeat, no probe
//! answer) until those are reaped, audits the store and prints counts.
//! Exits non-zero if the audit finds anything.
//!
//! `cargo run --release --example controller`

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::{
    CloseReason, LivenessMonitor, MemoryStore, NewSession, NotifyError, ProbeBatch, ProbeError,
    Prober, RouterDeleter, RouterId, Session, SessionId, SessionStore, TerminationBatch,
    TerminationNotifier,
};
use tokio::time::Duration;

/// Stands in for the routers: a live router confirms each notified session
/// a moment later (the confirmation closes the session in the store); the
/// dead one never answers.
struct Routers {
    store: Arc<MemoryStore>,
    dead: RouterId,
}

impl TerminationNotifier for Routers {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        if batch.router == self.dead {
            return Err(NotifyError::msg(format!("{} is unreachable", batch.router)));
        }
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            for id in batch.sessions {
                let _ = store.close(id, CloseReason::RouterDeleted).await;
            }
        });
        Ok(())
    }
}

/// The routers' answers to probes: every session answers but the dead.
struct Probes;

impl Prober for Probes {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        Ok(batch
            .sessions
            .into_iter()
            .filter(|id| !is_dead(*id))
            .collect())
    }
}

/// 2 % of the sessions are dead: their clients vanished without a word.
fn is_dead(id: SessionId) -> bool {
    id.get() % 50 == 0
}

/// Watches `sessions` while the live ones heartbeat every 100 ms, until the
/// dead ones are reaped; returns (dead, reaped, live sessions convicted).
async fn liveness(
    store: &Arc<MemoryStore>,
    sessions: Vec<Session>,
) -> Result<(usize, u64, usize), Box<dyn std::error::Error>> {
    let heartbeat = Duration::from_millis(100);
    let monitor = LivenessMonitor::builder()
        .heartbeat_interval(heartbeat)
        .granularity(Duration::from_millis(10))
        .timeout_range(heartbeat, Duration::from_secs(5))
        .pause_allowance(heartbeat)
        .probe_timeout(heartbeat)
        .build(Arc::clone(store), Probes)?;
    for session in &sessions {
        monitor.watch(session)?;
    }
    let (dead, live): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|s| is_dead(s.id()));
    let beating = {
        let (monitor, live) = (monitor.clone(), live.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(heartbeat);
            loop {
                every.tick().await;
                for session in &live {
                    let _ = monitor.heartbeat(session);
                }
            }
        })
    };
    let bound = monitor.reap_bound(Duration::from_secs(5));
    for session in &dead {
        tokio::time::timeout(bound, session.closed()).await?;
    }
    // Keep beating a little longer: nobody alive is convicted.
    tokio::time::sleep(heartbeat * 5).await;
    beating.abort();
    let convicted = live.iter().filter(|s| s.is_closed()).count();
    let reaped = monitor.stats().reaped;
    monitor.shutdown().await;
    Ok((dead.len(), reaped, convicted))
}

const ROUTERS: u64 = 10;
const SESSIONS_PER_ROUTER: u64 = 10_000;

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let store = Arc::new(MemoryStore::new());
    let released = Arc::new(AtomicUsize::new(0));

    let mut incarnations = Vec::new();
    for r in 0..ROUTERS {
        incarnations.push(store.register_router(RouterId::new(r)).await?);
    }

    // One task per router opens its sessions; every third client leaves.
    let mut tasks = Vec::new();
    for (r, incarnation) in incarnations.iter().copied().enumerate() {
        let (store, released) = (Arc::clone(&store), Arc::clone(&released));
        tasks.push(tokio::spawn(async move {
            let router = RouterId::new(r as u64);
            let mut closed = 0;
            for i in 0..SESSIONS_PER_ROUTER {
                let id = SessionId::new(r as u64 * SESSIONS_PER_ROUTER + i);
                let session = store
                    .create(NewSession::new(id, router, incarnation))
                    .await?;
                session.record_in(512);
                let released = Arc::clone(&released);
                session.attach(move |_| {
                    released.fetch_add(1, Ordering::Relaxed);
                })?;
                if i % 3 == 0 {
                    let _ = store.close(id, CloseReason::ClientClosed).await?;
                    closed += 1;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(closed)
        }));
    }
    let mut client_closed = 0;
    for task in tasks {
        client_closed += task.await?.map_err(|e| e.to_string())?;
    }
    let created = ROUTERS * SESSIONS_PER_ROUTER;
    println!("routers registered:      {ROUTERS}");
    println!("sessions created:        {created}");
    println!("closed by clients:       {client_closed}");
    println!("sessions in the store:   {}", store.len());

    // Delete routers 0, 1 and 2 at once. Routers 0 and 1 answer the
    // termination notices; router 2 is dead and never answers, so its
    // sessions are forced after the deadline and one retry.
    let deleter = RouterDeleter::builder()
        .batch_size(1_000)
        .confirm_timeout(Duration::from_millis(200))
        .retries(1)
        .retry_backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build(
            Arc::clone(&store),
            Routers {
                store: Arc::clone(&store),
                dead: RouterId::new(2),
            },
        );
    let deletions: Vec<_> = (0..3)
        .map(|r| tokio::spawn(deleter.delete(RouterId::new(r))))
        .collect();
    let mut deleted_sessions = 0;
    let mut refused = true;
    for (r, deletion) in deletions.into_iter().enumerate() {
        let router = RouterId::new(r as u64);
        let outcome = deletion.await??;
        let Some(report) = outcome.report() else {
            return Err(format!("{router} was already deleted").into());
        };
        deleted_sessions += report.sessions;
        println!(
            "{router} deleted:        {} sessions: {} confirmed, {} forced, {} rounds, {:?}",
            report.sessions, report.confirmed, report.forced, report.rounds, report.durations.total
        );
        refused &= store
            .create(NewSession::new(
                SessionId::new(u64::MAX),
                router,
                incarnations[r],
            ))
            .await
            .is_err();
    }
    deleter.shutdown().await;
    println!(
        "creates on deleted:      {}",
        if refused { "refused" } else { "ACCEPTED" }
    );

    let mut remaining = Vec::new();
    for r in 3..ROUTERS {
        remaining.extend(store.sessions(RouterId::new(r)).await?);
    }
    let watched = remaining.len();
    let started = tokio::time::Instant::now();
    let (dead, reaped, convicted) = liveness(&store, remaining).await?;
    println!("liveness watched:        {watched} sessions, {dead} of them dead");
    println!(
        "dead sessions reaped:    {reaped} in {:?}, live sessions convicted: {convicted}",
        started.elapsed()
    );

    let audit = store.audit().await?;
    let expected_released = client_closed as usize + deleted_sessions + dead;
    println!(
        "resources released:      {} (expected {expected_released})",
        released.load(Ordering::Relaxed)
    );
    println!("sessions in the store:   {}", store.len());
    println!(
        "audit:                   zombies = {}, index disagreements = {}",
        audit.zombies(),
        audit.missing_from_index.len() + audit.missing_from_map.len()
    );
    let ok = audit.is_clean()
        && refused
        && released.load(Ordering::Relaxed) == expected_released
        && reaped == dead as u64
        && convicted == 0;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
