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
//! 5. everything shuts down and the store is audited.
//!
//! Progress is awaited on the crate's [`EventBus`] and on the deletions'
//! reports, never by sleeping.

#[path = "controller.rs"]
mod controller;
#[path = "protocol.rs"]
mod protocol;
#[path = "router.rs"]
mod router;

use std::collections::BTreeSet;
use std::error::Error;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use session_lifecycle::{
    CloseReason, DeleteOutcome, DeletionReport, Event, EventBus, LivenessEvent, MemoryStore,
    ReconcileSummary, RouterId, SessionStore,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use controller::{Controller, Settings};
use router::{Behaviour, RouterHandle};

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
        }
    }

    /// The ids router `router` opens.
    fn ids(&self, router: RouterId) -> Range<u64> {
        let first = router.get() * ID_SPACE;
        first..first + self.sessions_per_router as u64
    }
}

/// Sessions closed, by reason, as published on the event bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closes {
    /// Confirmed by their router during its deletion.
    pub router_deleted: usize,
    /// Forced at the end of a deletion.
    pub forced: usize,
    /// Closed by a reconciliation.
    pub reclaimed: usize,
    /// Reaped by the liveness monitor.
    pub liveness_timeout: usize,
    /// Closed at the end of a grace period.
    pub router_lost: usize,
    /// Any other reason.
    pub other: usize,
}

/// What the scenario counted.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Routers that took part.
    pub routers: usize,
    /// Sessions opened over the wire.
    pub opened: usize,
    /// Sessions refused over the wire (opened on a deleted router).
    pub refused: usize,
    /// The steady router's sessions confirmed in its deletion.
    pub confirmed: usize,
    /// Sessions closed by a `Closed` frame.
    pub confirmations: usize,
    /// The mute router's sessions forced in its deletion.
    pub forced: usize,
    /// Sessions the reconciliation closed (the flaky router lost them).
    pub reconciled_closed: usize,
    /// Sessions the flaky router was told to drop.
    pub reconciled_dropped: usize,
    /// Grace periods a reconciliation cancelled.
    pub grace_cancelled: usize,
    /// Grace periods that ran out.
    pub grace_expired: usize,
    /// Sessions reaped by the liveness monitor.
    pub reaped: usize,
    /// Sessions closed, by reason.
    pub closes: Closes,
    /// Sessions left in the store.
    pub remaining: usize,
    /// Zombies the final audit found.
    pub zombies: usize,
    /// Whether the final audit is clean.
    pub audit_clean: bool,
    /// Events the scenario's subscription missed.
    pub events_lagged: u64,
    /// Probe calls the monitor made (timing-dependent).
    pub probes: u64,
    /// Session ids that answered a probe (timing-dependent).
    pub probe_answers: usize,
    /// How long the scenario took.
    pub elapsed: Duration,
}

impl Summary {
    /// Compares every exact count with what `config` implies; returns the
    /// mismatches.
    pub fn check(&self, config: &Config) -> Result<(), String> {
        let sessions = config.sessions_per_router;
        let closes = Closes {
            router_deleted: sessions,
            forced: sessions,
            reclaimed: config.forgotten,
            liveness_timeout: config.dead,
            router_lost: 0,
            other: 0,
        };
        let remaining = (config.routers - 2) * sessions - config.forgotten - config.dead;
        let mut wrong = Vec::new();
        let mut expect = |what: &str, got: String, want: String| {
            if got != want {
                wrong.push(format!("{what}: {got}, expected {want}"));
            }
        };
        expect(
            "opened",
            self.opened.to_string(),
            (config.routers * sessions).to_string(),
        );
        expect("refused", self.refused.to_string(), 1.to_string());
        expect(
            "confirmed",
            self.confirmed.to_string(),
            sessions.to_string(),
        );
        expect(
            "confirmations",
            self.confirmations.to_string(),
            sessions.to_string(),
        );
        expect("forced", self.forced.to_string(), sessions.to_string());
        expect(
            "reconciled closed",
            self.reconciled_closed.to_string(),
            config.forgotten.to_string(),
        );
        expect(
            "reconciled dropped",
            self.reconciled_dropped.to_string(),
            1.to_string(),
        );
        expect(
            "grace cancelled",
            self.grace_cancelled.to_string(),
            1.to_string(),
        );
        expect(
            "grace expired",
            self.grace_expired.to_string(),
            0.to_string(),
        );
        expect("reaped", self.reaped.to_string(), config.dead.to_string());
        expect(
            "closes",
            format!("{:?}", self.closes),
            format!("{closes:?}"),
        );
        expect(
            "remaining",
            self.remaining.to_string(),
            remaining.to_string(),
        );
        expect("zombies", self.zombies.to_string(), 0.to_string());
        expect(
            "audit clean",
            self.audit_clean.to_string(),
            true.to_string(),
        );
        expect(
            "events lagged",
            self.events_lagged.to_string(),
            0.to_string(),
        );
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let closes = &self.closes;
        writeln!(f, "routers:                 {}", self.routers)?;
        writeln!(
            f,
            "sessions opened:         {} ({} refused after deletion)",
            self.opened, self.refused
        )?;
        writeln!(
            f,
            "steady router deleted:   {} confirmed over the wire ({} Closed ids)",
            self.confirmed, self.confirmations
        )?;
        writeln!(f, "mute router deleted:     {} forced", self.forced)?;
        writeln!(
            f,
            "flaky router reconciled: {} closed, {} dropped, grace cancelled {}, expired {}",
            self.reconciled_closed,
            self.reconciled_dropped,
            self.grace_cancelled,
            self.grace_expired
        )?;
        writeln!(
            f,
            "quiet router:            {} reaped; {} probes, {} probe answers",
            self.reaped, self.probes, self.probe_answers
        )?;
        writeln!(
            f,
            "closes by reason:        router-deleted {}, forced {}, reclaimed {}, liveness-timeout {}, router-lost {}, other {}",
            closes.router_deleted,
            closes.forced,
            closes.reclaimed,
            closes.liveness_timeout,
            closes.router_lost,
            closes.other
        )?;
        writeln!(f, "sessions in the store:   {}", self.remaining)?;
        writeln!(f, "events lagged:           {}", self.events_lagged)?;
        writeln!(
            f,
            "audit:                   {}, zombies = {}",
            if self.audit_clean {
                "clean"
            } else {
                "NOT CLEAN"
            },
            self.zombies
        )?;
        write!(f, "elapsed:                 {:?}", self.elapsed)
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
    let bus = EventBus::new(16_384);
    let mut observer = Observer::spawn(&bus);
    let store = Arc::new(MemoryStore::builder().events(bus.clone()).build::<()>());
    let (controller, addr) = Controller::start(Arc::clone(&store), &bus, config.settings()).await?;
    let cast = Cast::connect(addr, &config).await?;

    let (opened, refused) = cast.open_all(&config).await?;
    let (reconciliation, reconciled) = cast.flaky_reconnects(&config, &mut observer).await?;
    let (steady, mute) = cast.delete(&controller).await?;
    // The mute router is deleted: nothing can be opened on it any more.
    let late = cast.mute.open(vec![config.ids(cast.mute.id()).end]).await?;
    let reaped = observer
        .until("the dead sessions' reaping", config.step_timeout, |seen| {
            (seen.reaped >= config.dead).then_some(seen.reaped)
        })
        .await?;

    let probes = controller.monitor().stats().probes;
    controller.shutdown().await;
    cast.stop().await;
    let audit = store.audit().await?;
    let wire = controller.wire_stats();
    let (seen, events_lagged) = observer.finish().await?;
    Ok(Summary {
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
        reaped,
        closes: seen.closes,
        remaining: store.len(),
        zombies: audit.zombies(),
        audit_clean: audit.is_clean(),
        events_lagged,
        probes,
        probe_answers: wire.probe_answers,
        elapsed: started.elapsed(),
    })
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
    /// started.
    async fn flaky_reconnects(
        &self,
        config: &Config,
        observer: &mut Observer,
    ) -> Result<(router::Reconciliation, ReconcileSummary), Box<dyn Error + Send + Sync>> {
        let flaky = self.flaky.id();
        let unknown = config.ids(flaky).start + ID_SPACE - 1;
        let forgotten = self
            .flaky
            .disconnect(config.forgotten, vec![unknown])
            .await?;
        observer
            .until(
                "the flaky router's disconnect",
                config.step_timeout,
                |seen| seen.disconnected.contains(&flaky).then_some(()),
            )
            .await?;
        let answer = self.flaky.reconnect().await?;
        let summary = observer
            .until(
                "the flaky router's reconciliation",
                config.step_timeout,
                |seen| seen.reconciled.iter().find(|s| s.router == flaky).copied(),
            )
            .await?;
        if answer.closed != forgotten || answer.drop != [unknown] {
            return Err(ScenarioError::Unexpected(format!(
                "reconciliation closed {:?} and dropped {:?}; the router forgot {forgotten:?} and made up {unknown}",
                answer.closed, answer.drop
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

    async fn stop(self) {
        for router in [self.steady, self.mute, self.flaky, self.quiet]
            .into_iter()
            .chain(self.bystanders)
        {
            router.stop().await;
        }
    }
}

fn report(outcome: DeleteOutcome) -> Result<DeletionReport, ScenarioError> {
    match outcome {
        DeleteOutcome::Deleted(report) => Ok(report),
        other => Err(ScenarioError::Unexpected(format!(
            "a fresh router was already deleted: {other:?}"
        ))),
    }
}

/// What the scenario saw on the event bus so far.
#[derive(Clone, Debug, Default)]
struct Seen {
    disconnected: Vec<RouterId>,
    reconciled: Vec<ReconcileSummary>,
    lost: usize,
    reaped: usize,
    closes: Closes,
}

impl Seen {
    fn record(&mut self, event: &Event) {
        match event {
            Event::SessionClosed { reason, .. } => {
                let closes = &mut self.closes;
                *match reason {
                    CloseReason::RouterDeleted => &mut closes.router_deleted,
                    CloseReason::Forced => &mut closes.forced,
                    CloseReason::Reclaimed => &mut closes.reclaimed,
                    CloseReason::LivenessTimeout => &mut closes.liveness_timeout,
                    CloseReason::RouterLost => &mut closes.router_lost,
                    _ => &mut closes.other,
                } += 1;
            }
            Event::RouterDisconnected { router, .. } => self.disconnected.push(*router),
            Event::Reconciled(summary) => self.reconciled.push(*summary),
            Event::RouterLost { .. } => self.lost += 1,
            Event::Liveness(LivenessEvent::SessionReaped { sessions, .. }) => {
                self.reaped += sessions.len();
            }
            _ => {}
        }
    }
}

/// A task that reads the event bus into a [`Seen`] the scenario can await.
struct Observer {
    seen: watch::Receiver<Seen>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<(Seen, u64)>,
}

impl Observer {
    fn spawn(bus: &EventBus) -> Self {
        let mut events = bus.subscribe();
        let (publish, seen) = watch::channel(Seen::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    event = events.recv() => match event {
                        Some(event) => publish.send_modify(|seen| seen.record(&event)),
                        None => break,
                    },
                }
            }
            // Everything that publishes has stopped: read what is buffered.
            while let Some(event) = events.try_recv() {
                publish.send_modify(|seen| seen.record(&event));
            }
            let seen = publish.borrow().clone();
            (seen, events.lagged())
        });
        Self { seen, stop, task }
    }

    /// Waits until `found` finds something in what was seen, for at most
    /// `within`.
    async fn until<T>(
        &mut self,
        what: &'static str,
        within: Duration,
        mut found: impl FnMut(&Seen) -> Option<T>,
    ) -> Result<T, ScenarioError> {
        let deadline = Instant::now() + within;
        loop {
            let result = found(&self.seen.borrow_and_update());
            if let Some(result) = result {
                return Ok(result);
            }
            match tokio::time::timeout_at(deadline, self.seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ScenarioError::Unexpected(format!(
                        "the observer stopped before {what}"
                    )));
                }
                Err(_) => return Err(ScenarioError::Timeout(what)),
            }
        }
    }

    /// Stops the observer once every publisher has stopped; returns all it
    /// saw and how many events it missed.
    async fn finish(self) -> Result<(Seen, u64), tokio::task::JoinError> {
        let _ = self.stop.send(());
        self.task.await
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
