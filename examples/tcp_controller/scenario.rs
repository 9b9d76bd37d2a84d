//! The loopback scenario: a controller and its routers over real TCP.
//!
//! Routers get roles by id: 1 is *steady* (confirms everything), 2 is
//! *mute* (heartbeats and answers probes, but never confirms a
//! termination), 3 is *flaky* (drops its connection and comes back), 4 is
//! *quiet* (never heartbeats, only answers probes, and some of its clients
//! are dead), and any further router is a steady bystander. The scenario:
//!
//! 1. every router connects, is registered, and opens its sessions;
//! 2. the flaky router drops its connection (its grace period starts),
//!    loses a few sessions and picks up one the controller never heard of,
//!    then reconnects and is reconciled: the lost sessions are closed, the
//!    unknown one is dropped, the grace period is cancelled;
//! 3. the steady and the mute router are deleted at once: every steady
//!    session is confirmed over the wire, every mute one is forced; a
//!    session the mute router opens afterwards is refused;
//! 4. the quiet router's dead sessions are reaped by the liveness monitor,
//!    its live ones kept alive by probe answers alone;
//! 5. the controller restarts: its store and pieces are dropped and built
//!    again on the same address, and the routers that are not deleted
//!    reconnect, reporting their sessions with their tokens; the new
//!    controller adopts every one its key signed (restart adoption) and
//!    rejects one the flaky router made up meanwhile: no client session
//!    is lost;
//! 6. everything shuts down and both stores are audited.
//!
//! Progress is awaited on the crate's [`EventBus`] (the monitor's and the
//! reconciler's events) and on the deletions' reports, never by sleeping.

// Paths relative to this file, so it can be included from a test too.
#[path = "controller.rs"]
mod controller;
#[path = "links.rs"]
mod links;
#[path = "observer.rs"]
mod observer;
#[path = "protocol.rs"]
mod protocol;
#[path = "router.rs"]
mod router;
#[path = "summary.rs"]
pub mod summary;

use std::collections::BTreeSet;
use std::error::Error;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use session_lifecycle::{
    EventBus, MemoryStore, RouterId, Session, SessionId, SessionStore, deleter::DeleteOutcome,
    deleter::DeletionReport, reconcile::ReconcileSummary, store::AuditReport,
};
use tokio::time::{Duration, Instant};

use controller::{Controller, Settings, WireStats};
use observer::Observer;
use router::{Behaviour, RouterHandle};
use summary::{Closes, Counts, Summary};

/// Session ids of router `r` are `r * ID_SPACE + i`.
const ID_SPACE: u64 = 1_000_000;

/// The scenario's size and timing.
#[derive(Clone, Debug)]
pub struct Config {
    /// Routers; at least 4 (steady, mute, flaky, quiet), the rest are
    /// bystanders.
    pub routers: usize,
    /// Sessions each router opens.
    pub sessions_per_router: usize,
    /// Sessions the flaky router loses while disconnected.
    pub forgotten: usize,
    /// Dead sessions on the quiet router.
    pub dead: usize,
    /// How often routers heartbeat.
    pub heartbeat: Duration,
    /// How long a deletion waits for confirmations per round.
    pub confirm_timeout: Duration,
    /// How long a probe waits for its answer.
    pub probe_timeout: Duration,
    /// How long a disconnected router has to come back.
    pub grace: Duration,
    /// The longest any step may take before the scenario fails.
    pub step_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            routers: 4,
            sessions_per_router: 200,
            forgotten: 5,
            dead: 10,
            heartbeat: Duration::from_millis(50),
            confirm_timeout: Duration::from_millis(300),
            probe_timeout: Duration::from_millis(150),
            grace: Duration::from_secs(3),
            step_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    fn check(&self) -> Result<(), ScenarioError> {
        let sessions = self.sessions_per_router;
        if self.routers < 4 {
            return Err(ScenarioError::Config("at least 4 routers are needed"));
        }
        if sessions == 0 || sessions as u64 >= ID_SPACE - 1 {
            return Err(ScenarioError::Config("sessions per router: 1 to 999,998"));
        }
        if self.forgotten > sessions || self.dead > sessions {
            return Err(ScenarioError::Config(
                "forgotten and dead sessions cannot exceed the sessions per router",
            ));
        }
        Ok(())
    }

    fn settings(&self) -> Settings {
        Settings {
            heartbeat: self.heartbeat,
            confirm_timeout: self.confirm_timeout,
            probe_timeout: self.probe_timeout,
            grace: self.grace,
            // Any key: the restarted controller gets the same one.
            token_key: 0x5e55_1075_ca7e_c0de,
        }
    }

    /// The ids router `router` opens.
    fn ids(&self, router: RouterId) -> Range<u64> {
        let first = router.get() * ID_SPACE;
        first..first + self.sessions_per_router as u64
    }
}

/// Runs the scenario on the current tokio runtime.
///
/// # Errors
///
/// A step that fails or takes longer than [`Config::step_timeout`]: the
/// error names it.
pub async fn run(config: Config) -> Result<Summary, Box<dyn Error + Send + Sync>> {
    config.check()?;
    let started = Instant::now();
    let within = config.step_timeout;
    // Only the monitor and the reconciler publish: a few events per router,
    // whatever the number of sessions.
    let bus = EventBus::new(1_024);
    let mut observer = Observer::spawn(&bus);
    let store = Arc::new(MemoryStore::new());
    let (controller, addr) =
        Controller::start(Arc::clone(&store), &bus, config.settings(), None).await?;
    let cast = step(
        "the routers' connections",
        within,
        Cast::connect(addr, &config),
    )
    .await?;

    let (opened, refused) = step("the sessions' opening", within, cast.open_all(&config)).await?;
    let (reconciliation, reconciled) = cast.flaky_reconnects(&config, &mut observer).await?;
    let (steady, mute) = step("the deletions", within, cast.delete(&controller)).await?;
    // The mute router is deleted: nothing can be opened on it any more.
    let late_id = config.ids(cast.mute.id()).end;
    let late = step("the late opening", within, cast.mute.open(vec![late_id])).await?;
    observer
        .until("the dead sessions' reaping", within, |seen| {
            (seen.reaped >= config.dead).then_some(())
        })
        .await?;

    let probes = controller.monitor().stats().probes;
    let restart = cast
        .restart(&config, (controller, store), addr, &bus, &mut observer)
        .await?;

    let Restart {
        controller,
        store,
        before,
        adopted,
        rejected,
        lost,
    } = restart;
    controller.shutdown().await;
    cast.stop().await;
    let audit = store.audit().await?;
    let wire = before.wire.plus(controller.wire_stats());
    let (seen, events_lagged) = observer.finish().await?;
    Ok(Summary {
        counts: Counts {
            routers: config.routers,
            opened,
            refused: refused + late.refused,
            confirmed: steady.confirmed,
            confirmations: wire.confirmations,
            forced: mute.forced,
            reconciled_closed: reconciled.closed,
            reconciled_dropped: reconciliation.drop.len(),
            grace_cancelled: seen.reconciled.iter().filter(|s| s.grace_cancelled).count(),
            grace_expired: seen.lost,
            reaped: seen.reaped,
            adopted,
            adoption_rejected: rejected,
            lost,
            closes: before.closes.plus(controller.closes()),
            remaining: store.len(),
            zombies: before.audit.zombies() + audit.zombies(),
            audit_clean: before.audit.is_clean() && audit.is_clean(),
            events_lagged,
        },
        probes,
        probe_answers: wire.probe_answers,
        elapsed: started.elapsed(),
    })
}

/// Runs one step of the scenario, for at most `within`.
async fn step<T, E: Into<Box<dyn Error + Send + Sync>>>(
    what: &'static str,
    within: Duration,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, Box<dyn Error + Send + Sync>> {
    match tokio::time::timeout(within, step).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => Err(ScenarioError::Timeout(what).into()),
    }
}

/// The routers, by role.
struct Cast {
    steady: RouterHandle,
    mute: RouterHandle,
    flaky: RouterHandle,
    quiet: RouterHandle,
    bystanders: Vec<RouterHandle>,
}

impl Cast {
    async fn connect(
        addr: SocketAddr,
        config: &Config,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let confirming = Behaviour {
            confirms: true,
            heartbeats: true,
            dead: BTreeSet::new(),
        };
        let mute = Behaviour {
            confirms: false,
            ..confirming.clone()
        };
        let quiet_id = RouterId::new(4);
        let quiet = Behaviour {
            heartbeats: false,
            // The last ones opened: every live session is suspected no later
            // than the dead, so each is probed before the dead are reaped.
            dead: config.ids(quiet_id).rev().take(config.dead).collect(),
            ..confirming.clone()
        };
        let join = |id: u64, behaviour: Behaviour| {
            RouterHandle::connect(addr, RouterId::new(id), behaviour, config.heartbeat)
        };
        let mut bystanders = Vec::new();
        for id in 5..=config.routers as u64 {
            bystanders.push(join(id, confirming.clone()).await?);
        }
        Ok(Self {
            steady: join(1, confirming.clone()).await?,
            mute: join(2, mute).await?,
            flaky: join(3, confirming).await?,
            quiet: join(quiet_id.get(), quiet).await?,
            bystanders,
        })
    }

    /// The routers that are not deleted.
    fn live(&self) -> impl Iterator<Item = &RouterHandle> {
        [&self.flaky, &self.quiet]
            .into_iter()
            .chain(&self.bystanders)
    }

    fn all(&self) -> impl Iterator<Item = &RouterHandle> {
        [&self.steady, &self.mute, &self.flaky, &self.quiet]
            .into_iter()
            .chain(&self.bystanders)
    }

    /// Every router opens its sessions, all at once; returns how many were
    /// opened and refused.
    async fn open_all(
        &self,
        config: &Config,
    ) -> Result<(usize, usize), Box<dyn Error + Send + Sync>> {
        let opens = self
            .all()
            .map(|router| router.open(config.ids(router.id()).collect()));
        let answers = futures::future::try_join_all(opens).await?;
        Ok(answers.iter().fold((0, 0), |(opened, refused), answer| {
            (opened + answer.opened, refused + answer.refused)
        }))
    }

    /// The flaky router drops its connection, loses `forgotten` sessions,
    /// picks up an unknown one, and reconnects once its grace period has
    /// started; returns the controller's answer and the reconciliation.
    async fn flaky_reconnects(
        &self,
        config: &Config,
        observer: &mut Observer,
    ) -> Result<(router::Reconciliation, ReconcileSummary), Box<dyn Error + Send + Sync>> {
        let (flaky, within) = (self.flaky.id(), config.step_timeout);
        let unknown = config.ids(flaky).start + ID_SPACE - 1;
        let disconnect = self.flaky.disconnect(config.forgotten, vec![unknown]);
        let forgotten = step("the flaky router's disconnect", within, disconnect).await?;
        observer
            .until("the flaky router's grace period", within, |seen| {
                seen.disconnected.contains(&flaky).then_some(())
            })
            .await?;
        let answer = step("the flaky router's return", within, self.flaky.reconnect()).await?;
        let summary = observer
            .until("the flaky router's reconciliation", within, |seen| {
                seen.reconciled.iter().find(|s| s.router == flaky).copied()
            })
            .await?;
        if answer.closed != forgotten || answer.drop != [unknown] {
            return Err(ScenarioError::Unexpected(format!(
                "the flaky router forgot {} sessions and made up 1, but the \
                 reconciliation closed {} and told it to drop {}",
                forgotten.len(),
                answer.closed.len(),
                answer.drop.len()
            ))
            .into());
        }
        Ok((answer, summary))
    }

    /// Deletes the steady and the mute router at once.
    async fn delete(
        &self,
        controller: &Controller,
    ) -> Result<(DeletionReport, DeletionReport), Box<dyn Error + Send + Sync>> {
        let deleter = controller.deleter();
        let (steady, mute) = tokio::try_join!(
            deleter.delete(self.steady.id()),
            deleter.delete(self.mute.id())
        )?;
        Ok((report(steady)?, report(mute)?))
    }

    /// The controller restarts: stopped and dropped with its store, built
    /// again over a fresh store on the same address; the routers that are
    /// not deleted reconnect, and their sessions are adopted. The flaky
    /// router made up one session meanwhile, with no token: it must be
    /// rejected. (Deleted routers do not come back: a real controller
    /// refuses them by their revoked enrollment, which it keeps in its
    /// configuration, not in the session store.)
    async fn restart(
        &self,
        config: &Config,
        (controller, store): (Controller, Arc<MemoryStore>),
        addr: SocketAddr,
        bus: &EventBus,
        observer: &mut Observer,
    ) -> Result<Restart, Box<dyn Error + Send + Sync>> {
        let within = config.step_timeout;
        // What the clients hold through the controller: each open session
        // of a router that is not deleted.
        let held_before = held(&store, self.live()).await?;
        controller.shutdown().await;
        let before = Before {
            closes: controller.closes(),
            wire: controller.wire_stats(),
            audit: store.audit().await?,
        };
        // The old controller's process ends: everything it held is gone.
        drop((controller, store));

        let earlier = observer
            .until("the reconciliations so far", within, |seen| {
                Some(seen.reconciled.len())
            })
            .await?;
        let store = Arc::new(MemoryStore::new());
        let (controller, _) =
            Controller::start(Arc::clone(&store), bus, config.settings(), Some(addr)).await?;
        let made_up = config.ids(self.flaky.id()).start + ID_SPACE - 2;
        let flaky = self.flaky.disconnect(0, vec![made_up]);
        step("the flaky router's made-up session", within, flaky).await?;
        let returns = futures::future::try_join_all(self.live().map(RouterHandle::reconnect));
        let answers = step("the routers' return", within, returns).await?;
        let returning = answers.len();
        let (adopted, rejected) = observer
            .until("the adoptions", within, |seen| {
                let new = &seen.reconciled[earlier..];
                (new.len() >= returning).then(|| {
                    new.iter()
                        .fold((0, 0), |(a, r), s| (a + s.adopted, r + s.rejected))
                })
            })
            .await?;
        let held_after = held(&store, self.live()).await?;
        let dropped: Vec<u64> = answers.iter().flat_map(|a| a.drop.clone()).collect();
        if dropped != [made_up] {
            return Err(ScenarioError::Unexpected(format!(
                "after the restart, the routers were told to drop {} sessions, \
                 not only the made-up session {made_up}",
                dropped.len()
            ))
            .into());
        }
        Ok(Restart {
            controller,
            store,
            before,
            adopted,
            rejected,
            lost: held_before.difference(&held_after).count(),
        })
    }

    async fn stop(self) {
        for router in [self.steady, self.mute, self.flaky, self.quiet]
            .into_iter()
            .chain(self.bystanders)
        {
            router.stop().await;
        }
    }
}

/// The open sessions `store` holds for `routers`.
async fn held(
    store: &MemoryStore,
    routers: impl Iterator<Item = &RouterHandle>,
) -> Result<BTreeSet<SessionId>, Box<dyn Error + Send + Sync>> {
    let mut held = BTreeSet::new();
    for router in routers {
        let sessions = store.sessions(router.id()).await?;
        held.extend(sessions.iter().filter(|s| !s.is_closed()).map(Session::id));
    }
    Ok(held)
}

/// What the controller's restart did.
struct Restart {
    /// The new controller and its store.
    controller: Controller,
    store: Arc<MemoryStore>,
    /// What the old controller counted.
    before: Before,
    /// Sessions adopted and rejected by the new controller.
    adopted: usize,
    rejected: usize,
    /// Sessions the old controller held for the live routers that the new
    /// one does not.
    lost: usize,
}

/// What the controller counted before its restart.
struct Before {
    closes: Closes,
    wire: WireStats,
    audit: AuditReport,
}

fn report(outcome: DeleteOutcome) -> Result<DeletionReport, ScenarioError> {
    match outcome {
        DeleteOutcome::Deleted(report) => Ok(report),
        DeleteOutcome::AlreadyDeleted { router, .. } => Err(ScenarioError::Unexpected(format!(
            "{router} was deleted before its deletion"
        ))),
    }
}

/// Why the scenario failed.
#[derive(Debug)]
enum ScenarioError {
    Config(&'static str),
    Timeout(&'static str),
    Unexpected(String),
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(what) => write!(f, "bad configuration: {what}"),
            Self::Timeout(what) => write!(f, "timed out waiting for {what}"),
            Self::Unexpected(what) => f.write_str(what),
        }
    }
}

impl Error for ScenarioError {}
