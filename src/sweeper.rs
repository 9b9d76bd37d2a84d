//! The audit sweeper: a periodic audit of the store, and the repair of what
//! it finds.
//!
//! # Invariants
//!
//! - One sweep runs at a time (`running` is held across the sweep; it is a
//!   tokio mutex, the only lock of the module held across an `.await`, and
//!   no other lock is taken under it).
//! - A sweep closes only orphans, which no deletion owns: a fenced router
//!   holds its incarnation, so its sessions are never orphans, and an orphan
//!   stays one (incarnations never repeat). Every close goes through the
//!   session's state machine, which releases resources once, whoever else
//!   closes the session at the same time.
//!
//! # Deadlock safety
//!
//! `running` (async) is taken first and alone; the `last` report mutex is
//! taken only to store or copy a report, never across an `.await`.

use std::collections::HashSet;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::build::{BuildError, wired};
use crate::closing::close_all;
use crate::contain::LetGo;
use crate::events::{Event, EventBus, emit};
use crate::id::SessionKey;
use crate::reclaim::ReclaimQueue;
use crate::session::{CloseFrom, CloseReason, Session};
use crate::store::{AuditReport, BackendError, Repair, RouterError, RouterStatus, SessionStore};

/// Audits the store periodically and repairs what it finds.
///
/// Each sweep runs [`SessionStore::audit`], closes the orphans it reports
/// (sessions whose router is gone, deleted, or in a newer incarnation) with
/// [`CloseReason::Reclaimed`], their resources through the reclaim queue if
/// one is configured, and calls [`SessionStore::repair`], which re-checks
/// and fixes each finding: index/map disagreements, orphans, and closed
/// sessions left in the store (removed once two sweeps in a row saw them,
/// so a close whose removal is on its way is not counted as a repair).
/// Each repair is logged and published as an
/// [`Event::Repaired`].
///
/// With a reclaim queue, each sweep also runs the queue's long-lived check
/// ([`ReclaimQueue::check_long_lived`]) over every open session, router by
/// router: each session older than the policy's threshold is reported
/// once, [`SweepReport::long_lived`] counts those there now, and so does
/// the `session_lifecycle_long_lived_sessions` gauge (feature `metrics`).
///
/// A sweep never races a deletion into a double release: sessions of a
/// fenced router are never orphans, and every close goes through the
/// session's state machine, which releases resources exactly once.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use tokio::time::Duration;
/// use session_lifecycle::{AuditSweeper, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let sweeper = AuditSweeper::builder()
///     .interval(Duration::from_secs(60))
///     .build(Arc::clone(&store))?;
///
/// let report = sweeper.sweep().await?; // one sweep now, besides the periodic ones
/// assert!(report.audit.is_clean() && report.repairs.is_empty());
/// sweeper.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct AuditSweeper<S> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    store: Arc<S>,
    config: Config,
    running: tokio::sync::Mutex<()>,
    last: Mutex<Option<SweepReport>>,
    /// Closed sessions the last sweep saw in the store: one is removed only
    /// when two sweeps in a row see it, so a close whose removal is on its
    /// way (a reconciliation, a reap, a client's `close`) is not taken for a
    /// leftover.
    lingering: Mutex<HashSet<SessionKey>>,
    counters: Counters,
    stop: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Clone, Debug)]
struct Config {
    interval: Duration,
    reclaim: Option<ReclaimQueue>,
    events: Option<EventBus>,
}

#[derive(Debug, Default)]
struct Counters {
    sweeps: AtomicU64,
    findings: AtomicU64,
    repairs: AtomicU64,
    failures: AtomicU64,
}

/// Builder of an [`AuditSweeper`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{AuditSweeper, EventBus, MemoryStore, ReclaimQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let sweeper = AuditSweeper::builder()
///     .interval(Duration::from_secs(300))
///     .reclaim_queue(ReclaimQueue::builder().build()?)
///     .events(EventBus::default())
///     .build(store)?;
/// assert_eq!(sweeper.stats().sweeps, 0); // the first sweep runs in five minutes
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct AuditSweeperBuilder {
    config: Config,
}

/// What one sweep found and repaired. See the example on [`AuditSweeper::sweep`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// The audit the sweep started from.
    pub audit: AuditReport,
    /// What was repaired (findings fixed meanwhile by the store's own work
    /// are not repeated here).
    pub repairs: Vec<Repair>,
    /// How long the sweep took, on tokio's clock.
    pub duration: Duration,
    /// Open sessions older than the reclaim queue policy's
    /// [`long_lived_threshold`](crate::reclaim::ReclaimPolicy::long_lived_threshold)
    /// found by this sweep (each reported once ever by a
    /// [`ReclaimEvent::LongLivedSession`](crate::reclaim::ReclaimEvent::LongLivedSession));
    /// `None` without a reclaim queue or with the check turned off.
    pub long_lived: Option<usize>,
}

/// A snapshot of an [`AuditSweeper`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweeperStats {
    /// Sweeps run.
    pub sweeps: u64,
    /// Findings the audits reported, summed over sweeps.
    pub findings: u64,
    /// Repairs made.
    pub repairs: u64,
    /// Sweeps that failed: the store's backend failed, or a periodic
    /// sweep panicked in user code (a payload's `Drop` run by a repair).
    pub failures: u64,
}

impl AuditSweeper<()> {
    /// A builder with the defaults: a sweep every 60 s, no reclaim queue,
    /// no event bus. See the example on [`AuditSweeper`].
    pub fn builder() -> AuditSweeperBuilder {
        AuditSweeperBuilder {
            config: Config {
                interval: Duration::from_secs(60),
                reclaim: None,
                events: None,
            },
        }
    }
}

impl AuditSweeperBuilder {
    /// The first setting given that [`Lifecycle`](crate::Lifecycle) wires
    /// itself, if any.
    pub(crate) fn wired(&self) -> Option<&'static str> {
        wired([
            ("events", self.config.events.is_some()),
            ("reclaim_queue", self.config.reclaim.is_some()),
        ])
    }

    /// Time between the end of a sweep and the start of the next (default
    /// 60 s). An audit walks the whole store, so keep it in minutes for
    /// millions of sessions.
    ///
    /// See the example on [`AuditSweeperBuilder`].
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// Releases the resources of the orphans it closes through `queue`.
    ///
    /// See the example on [`AuditSweeperBuilder`].
    pub fn reclaim_queue(mut self, queue: ReclaimQueue) -> Self {
        self.config.reclaim = Some(queue);
        self
    }

    /// Publishes an [`Event::Repaired`] per repair on `bus`.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.config.events = Some(bus);
        self
    }

    /// Builds the sweeper over `store` and starts its periodic task on the
    /// current tokio runtime; the first sweep runs one interval from now.
    /// The task stops at [`AuditSweeper::shutdown`], or once every handle of
    /// the sweeper is dropped.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime (or on one without
    /// its time driver),
    /// [`BuildError::Setting`] for a zero interval.
    pub fn build<S: SessionStore>(self, store: Arc<S>) -> Result<AuditSweeper<S>, BuildError> {
        const PIECE: &str = "AuditSweeper";
        if self.config.interval.is_zero() {
            return Err(BuildError::setting(PIECE, "interval", "must be above zero"));
        }
        let runtime =
            crate::build::timed_runtime().ok_or(BuildError::NoRuntime { piece: PIECE })?;
        let sweeper = AuditSweeper {
            inner: Arc::new(Inner {
                store,
                config: self.config,
                running: tokio::sync::Mutex::new(()),
                last: Mutex::new(None),
                lingering: Mutex::new(HashSet::new()),
                counters: Counters::default(),
                stop: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        };
        // The task holds the sweeper weakly: dropping every handle stops it.
        let (inner, stop) = (Arc::downgrade(&sweeper.inner), sweeper.inner.stop.clone());
        let interval = sweeper.inner.config.interval;
        drop(
            sweeper
                .inner
                .tracker
                .spawn_on(run(inner, stop, interval), &runtime),
        );
        sweeper.inner.tracker.close();
        Ok(sweeper)
    }
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        // The last handle is gone: the periodic task stops.
        self.stop.cancel();
    }
}

impl<S> Clone for AuditSweeper<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> fmt::Debug for AuditSweeper<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSweeper")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<S> AuditSweeper<S> {
    /// The sweeper's counters.
    #[must_use]
    pub fn stats(&self) -> SweeperStats {
        let c = &self.inner.counters;
        SweeperStats {
            sweeps: c.sweeps.load(Ordering::Relaxed),
            findings: c.findings.load(Ordering::Relaxed),
            repairs: c.repairs.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    /// The report of the last sweep that completed.
    #[must_use]
    pub fn last_report(&self) -> Option<SweepReport> {
        self.inner.last.lock().clone()
    }

    /// Stops the periodic sweeps; a sweep in progress finishes first.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the sweeper stays stopped.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use session_lifecycle::{AuditSweeper, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sweeper = AuditSweeper::builder().build(Arc::new(MemoryStore::new()))?;
    /// sweeper.shutdown().await;
    /// tokio::time::sleep(Duration::from_secs(3_600)).await;
    /// assert_eq!(sweeper.stats().sweeps, 0); // no periodic sweep any more
    /// let _ = sweeper.sweep().await?; // sweeping on demand still works
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tracker.wait().await;
    }
}

impl<S: SessionStore> AuditSweeper<S> {
    /// Runs one sweep now (waiting for one in progress to finish first).
    ///
    /// # Errors
    ///
    /// [`BackendError`] if the store's backend failed; repairs made before
    /// the failure stay made.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the sweep between two store calls; what it
    /// repaired stays repaired, and the next sweep finds the rest.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{AuditSweeper, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sweeper = AuditSweeper::builder().build(Arc::new(MemoryStore::new()))?;
    /// // After an incident, sweep at once instead of waiting for the next period.
    /// let report = sweeper.sweep().await?;
    /// assert!(report.repairs.is_empty());
    /// assert_eq!(sweeper.stats().sweeps, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn sweep(&self) -> Result<SweepReport, BackendError> {
        let _running = self.inner.running.lock().await;
        let sweep = self.inner.counters.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("sweep", sweep);
        let result = self.sweep_once().instrument(span).await;
        match &result {
            Ok(report) => *self.inner.last.lock() = Some(report.clone()),
            Err(error) => {
                self.inner.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sweep, %error, "audit sweep failed");
            }
        }
        result
    }

    /// `audit` with only the closed sessions the previous sweep saw too
    /// (the same lives, by key, when the store gives keys; by id
    /// otherwise); remembers this sweep's for the next.
    fn second_sighting(&self, audit: &AuditReport) -> AuditReport {
        let lives = audit.closed_lives();
        let keyed = lives.is_some();
        // Without keys, every life of an id is generation 0 here.
        let keys: Vec<SessionKey> = match lives {
            Some(lives) => lives.to_vec(),
            None => {
                let unkeyed = |&id| SessionKey::new(id, 0);
                audit.closed_in_store.iter().map(unkeyed).collect()
            }
        };
        let seen_before = {
            let mut lingering = self.inner.lingering.lock();
            std::mem::replace(&mut *lingering, keys.iter().copied().collect())
        };
        let mut findings = audit.clone();
        let again: Vec<SessionKey> = keys
            .into_iter()
            .filter(|key| seen_before.contains(key))
            .collect();
        findings.closed_in_store = again.iter().map(|key| key.id()).collect();
        findings.closed_keys = if keyed { again } else { Vec::new() };
        findings
    }

    /// Runs the reclaim queue's long-lived check over every open session
    /// of the store, one router at a time (yielding between routers);
    /// returns how many are past the threshold and sets the
    /// `session_lifecycle_long_lived_sessions` gauge.
    async fn check_long_lived(&self) -> Result<Option<usize>, BackendError> {
        let Some(queue) = self.inner.config.reclaim.as_ref() else {
            return Ok(None);
        };
        if !queue.watches_long_lived() {
            return Ok(None); // turned off by the policy
        }
        let store = &*self.inner.store;
        let mut current = 0;
        for router in store.census().await? {
            if router.active + router.terminating == 0 {
                continue;
            }
            let sessions = match store.sessions(router.router).await {
                Ok(sessions) => sessions,
                Err(RouterError::UnknownRouter(_)) => continue, // gone meanwhile
                Err(RouterError::Backend(error)) => return Err(error),
            };
            current += queue.long_lived(&sessions).map_or(0, |found| found.current);
            // The handles drop here, outside every lock of the crate, each
            // payload's `Drop` contained (a client may have removed one
            // meanwhile, its last handle here).
            crate::contain::drop_each_logged(sessions, "audit sweeper");
            tokio::task::yield_now().await;
        }
        #[cfg(feature = "metrics")]
        crate::metrics::gauge("session_lifecycle_long_lived_sessions", current);
        Ok(Some(current))
    }

    async fn sweep_once(&self) -> Result<SweepReport, BackendError> {
        let started = Instant::now();
        let store = &*self.inner.store;
        let long_lived = self.check_long_lived().await?;
        let audit = store.audit().await?;
        let findings = audit.missing_from_map.len()
            + audit.missing_from_index.len()
            + audit.orphans.len()
            + audit.closed_in_store.len()
            + audit.unreadable.len();
        let counters = &self.inner.counters;
        counters
            .findings
            .fetch_add(findings as u64, Ordering::Relaxed);
        if findings == 0 {
            tracing::debug!(sessions = audit.sessions, "audit clean");
            // No closed session seen: the next sweep's are first sightings.
            self.inner.lingering.lock().clear();
            return Ok(SweepReport {
                audit,
                repairs: Vec::new(),
                duration: started.elapsed(),
                long_lived,
            });
        }
        // Orphans are closed here, so that their resources go through the
        // reclaim queue; the store's repair then removes them.
        // Let go each with its payload's `Drop` contained, also on an
        // error or this future dropped.
        let mut orphans: LetGo<Vec<Session<S::Payload>>> =
            LetGo::new(Vec::with_capacity(audit.orphans.len()), "audit sweeper");
        for &id in &audit.orphans {
            // The id may have been removed and reused since the audit: close
            // only a session that is itself an orphan.
            if let Some(session) = store.get(id).await? {
                match belongs(store, &session).await {
                    Ok(false) => orphans.push(session),
                    belongs => {
                        // Its last handle, maybe: the payload's `Drop` is
                        // user code.
                        crate::contain::drop_each_logged([session], "audit sweeper");
                        belongs?;
                    }
                }
            }
        }
        let closed = close_all(
            self.inner.config.reclaim.as_ref(),
            &orphans,
            CloseReason::Reclaimed,
            CloseFrom::Open,
        )
        .await;
        drop(orphans);
        let repairs = store.repair(&self.second_sighting(&audit)).await?;
        counters
            .repairs
            .fetch_add(repairs.len() as u64, Ordering::Relaxed);
        for repair in &repairs {
            tracing::warn!(
                router = %repair.router,
                incarnation = %repair.incarnation,
                session = %repair.session,
                action = %repair.action,
                "store repaired"
            );
            emit(self.inner.config.events.as_ref(), || {
                Event::Repaired(*repair)
            });
        }
        tracing::info!(
            findings,
            repairs = repairs.len(),
            orphans_closed = closed.len(),
            "audit sweep repaired the store"
        );
        Ok(SweepReport {
            audit,
            repairs,
            duration: started.elapsed(),
            long_lived,
        })
    }
}

/// The periodic task: a sweep every `interval`, until shut down or until
/// every handle of the sweeper is gone.
async fn run<S: SessionStore>(inner: Weak<Inner<S>>, stop: CancellationToken, interval: Duration) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let sweeper = AuditSweeper { inner };
        // The periodic sweep logs its own failure. A panic (a payload's
        // `Drop` run by the store's repair, a store's own) ends that sweep,
        // not the task: it counts as a failed sweep.
        let swept = AssertUnwindSafe(sweeper.sweep()).catch_unwind().await;
        if let Err(panic) = swept {
            crate::contain::dispose(panic);
            sweeper
                .inner
                .counters
                .failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("an audit sweep panicked in user code; the next sweep runs on time");
        }
    }
}

/// Whether `session`'s router holds its incarnation (live or fenced): only
/// then is the session not an orphan.
async fn belongs<S: SessionStore>(
    store: &S,
    session: &Session<S::Payload>,
) -> Result<bool, BackendError> {
    match store.router_status(session.router()).await {
        Ok(RouterStatus::Live(current) | RouterStatus::Fenced(current)) => {
            Ok(current == session.incarnation())
        }
        Ok(RouterStatus::Deleted(_)) | Err(RouterError::UnknownRouter(_)) => Ok(false),
        Err(RouterError::Backend(error)) => Err(error),
    }
}
