//! The controller: a TCP listener, one task per router connection, and the
//! crate's pieces wired to the wire.
//!
//! - Sessions live in a `MemoryStore`. `OpenSession` creates one, attaches
//!   a resource that counts its close by reason, and the `LivenessMonitor`
//!   watches it; `Heartbeat` feeds the monitor.
//! - The monitor's `Prober` sends a `Probe` frame and awaits the router's
//!   `ProbeAnswer` (the monitor times the call out).
//! - The `RouterDeleter`'s `TerminationNotifier` sends `Terminate` frames;
//!   the router's `Closed` frames close the sessions in the store, which is
//!   what the deleter waits for.
//! - A connection that ends starts the router's grace period
//!   (`Reconciler::router_disconnected`), during which the monitor holds
//!   the router; a reconnection's `Hello` is reconciled, which cancels it.
//! - Each session gets a token when it opens, signed with the controller's
//!   key (which, like a real controller's, outlives a restart). A
//!   controller that restarted does not know the routers that reconnect:
//!   it registers each again and reconciles its `Hello` with
//!   `Reconciler::reconcile_adopting`, adopting each session whose token
//!   it signed (restart adoption) and watching it as if it had opened it.
//!
//! See `links.rs` for how connections are tied to routers.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use session_lifecycle::reconcile::{Adopter, Adoption, ReconcileReport, ReportedSession};
use session_lifecycle::store::RouterError;
use session_lifecycle::{
    Backoff, CloseReason, EventBus, Incarnation, LivenessMonitor, MemoryStore, NewSession,
    Reconciler, RouterDeleter, RouterId, Session, SessionId, SessionState, SessionStore,
    session::CloseOutcome,
};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Duration;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::links::{Link, Links, Outbound, WireNotifier, WireProber};
use super::protocol::{
    ControllerFrame, HeldSession, JsonCodec, RouterFrame, WireError, write_frames,
};
use super::summary::Closes;

type Codec = JsonCodec<RouterFrame, ControllerFrame>;

/// The controller's timing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// How often routers heartbeat.
    pub(crate) heartbeat: Duration,
    /// How long a deletion waits for confirmations per round.
    pub(crate) confirm_timeout: Duration,
    /// How long a probe round waits for its answer.
    pub(crate) probe_timeout: Duration,
    /// How long a disconnected router has to come back.
    pub(crate) grace: Duration,
    /// The key the controller signs session tokens with; kept across a
    /// restart, as a real controller keeps its keys in its configuration.
    pub(crate) token_key: u64,
}

/// The controller's counters of what came over the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WireStats {
    /// Sessions closed by a router's `Closed` frame.
    pub(crate) confirmations: usize,
    /// Session ids that answered a probe.
    pub(crate) probe_answers: usize,
}

impl WireStats {
    /// The counts of both (a controller and its restarted successor).
    pub(crate) fn plus(self, other: Self) -> Self {
        Self {
            confirmations: self.confirmations + other.confirmations,
            probe_answers: self.probe_answers + other.probe_answers,
        }
    }
}

/// The running controller; cheap to clone.
#[derive(Clone)]
pub(crate) struct Controller {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<MemoryStore>,
    links: Arc<Links>,
    monitor: LivenessMonitor<MemoryStore, WireProber>,
    reconciler: Reconciler<MemoryStore>,
    deleter: RouterDeleter<MemoryStore, WireNotifier>,
    confirmations: AtomicUsize,
    closes: Arc<Mutex<Closes>>,
    token_key: u64,
    next_connection: AtomicU64,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Controller {
    /// Builds the controller's pieces over `store`, the monitor and the
    /// reconciler publishing on `bus`, and listens on `addr` (a restarted
    /// controller takes its old address) or an ephemeral loopback port.
    pub(crate) async fn start(
        store: Arc<MemoryStore>,
        bus: &EventBus,
        settings: Settings,
        addr: Option<SocketAddr>,
    ) -> Result<(Self, SocketAddr), Box<dyn std::error::Error + Send + Sync>> {
        let links = Arc::new(Links::default());
        let monitor = LivenessMonitor::builder()
            .heartbeat_interval(settings.heartbeat)
            .granularity(Duration::from_millis(10))
            .timeout_range(settings.heartbeat * 4, settings.heartbeat * 40)
            .pause_allowance(settings.heartbeat * 4)
            .probe_timeout(settings.probe_timeout)
            .probe_retries(2)
            .events(bus.clone())
            .build(Arc::clone(&store), WireProber(Arc::clone(&links)))?;
        // A router in its grace period carries no heartbeats: the monitor
        // holds it meanwhile instead of reaping its sessions.
        let reconciler = Reconciler::builder()
            .grace_period(settings.grace)
            .liveness(&monitor)
            .events(bus.clone())
            .build(Arc::clone(&store))
            .expect("valid settings");
        let deleter = RouterDeleter::builder()
            .batch_size(64)
            .notify_timeout(settings.confirm_timeout)
            .confirm_timeout(settings.confirm_timeout)
            .backoff(
                Backoff::new()
                    .retries(1)
                    .delays(settings.confirm_timeout / 4, settings.confirm_timeout / 2),
            )
            .build(Arc::clone(&store), WireNotifier(Arc::clone(&links)))
            .expect("valid settings");
        // Tokio sets `SO_REUSEADDR`: the old address is free again as soon
        // as the old controller's listener is closed.
        let listener = match addr {
            Some(addr) => TcpListener::bind(addr).await?,
            None => TcpListener::bind("127.0.0.1:0").await?,
        };
        let addr = listener.local_addr()?;
        let controller = Self {
            shared: Arc::new(Shared {
                store,
                links,
                monitor,
                reconciler,
                deleter,
                confirmations: AtomicUsize::new(0),
                closes: Arc::default(),
                token_key: settings.token_key,
                next_connection: AtomicU64::new(0),
                stop: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        };
        let accepting = controller.clone();
        controller
            .shared
            .tracker
            .spawn(async move { accepting.accept(listener).await });
        Ok((controller, addr))
    }

    /// The deleter of routers, notifying over the wire.
    pub(crate) fn deleter(&self) -> &RouterDeleter<MemoryStore, WireNotifier> {
        &self.shared.deleter
    }

    /// The liveness monitor, probing over the wire.
    pub(crate) fn monitor(&self) -> &LivenessMonitor<MemoryStore, WireProber> {
        &self.shared.monitor
    }

    /// What came over the wire so far.
    pub(crate) fn wire_stats(&self) -> WireStats {
        WireStats {
            confirmations: self.shared.confirmations.load(Ordering::Relaxed),
            probe_answers: self.shared.links.probe_answers.load(Ordering::Relaxed),
        }
    }

    /// Sessions closed so far, by reason.
    pub(crate) fn closes(&self) -> Closes {
        *self
            .shared
            .closes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the monitor, the grace timers and the deleter, then closes
    /// every connection without starting grace periods.
    pub(crate) async fn shutdown(&self) {
        let shared = &self.shared;
        shared.monitor.shutdown().await;
        shared.reconciler.shutdown().await;
        shared.deleter.shutdown().await;
        shared.stop.cancel();
        shared.tracker.close();
        shared.tracker.wait().await;
    }

    async fn accept(self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.shared.stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            // A failed accept (the peer gave up, no descriptors left) costs
            // that connection only.
            let Ok((stream, _peer)) = accepted else {
                continue;
            };
            let connection = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
            let serving = self.clone();
            self.shared
                .tracker
                .spawn(async move { serving.serve(stream, connection).await });
        }
    }

    /// Serves one router connection: the handshake, then its frames until
    /// it ends (which starts the router's grace period) or the controller
    /// stops.
    async fn serve(self, stream: TcpStream, connection: u64) {
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut inbound = FramedRead::new(read, Codec::new());
        let (outbound, queued) = mpsc::unbounded_channel();
        let stop = self.shared.stop.clone().cancelled_owned();
        self.shared.tracker.spawn(write_frames(
            FramedWrite::new(write, Codec::new()),
            queued,
            stop,
        ));
        let greeted = match self.next_frame(&mut inbound).await {
            Ok(Some(RouterFrame::Hello {
                router,
                incarnation,
                sessions,
            })) => {
                let router = RouterId::new(router);
                self.greet(router, incarnation, &sessions, connection, &outbound)
                    .await
                    .map(|incarnation| (router, incarnation))
            }
            Ok(Some(other)) => Err(format!("expected hello, got {other:?}")),
            Ok(None) | Err(_) => return,
        };
        let (router, incarnation) = match greeted {
            Ok(greeted) => greeted,
            Err(reason) => {
                let _ = outbound.send(ControllerFrame::Rejected { reason });
                return;
            }
        };
        while let Ok(Some(frame)) = self.next_frame(&mut inbound).await {
            if self
                .handle(router, incarnation, frame, &outbound)
                .await
                .is_err()
            {
                break;
            }
        }
        if !self.shared.stop.is_cancelled() {
            self.shared
                .links
                .unlink(router, connection, &self.shared.reconciler)
                .await;
        }
    }

    /// The next frame; `None` at the end of the stream or when the
    /// controller stops.
    async fn next_frame(
        &self,
        inbound: &mut FramedRead<OwnedReadHalf, Codec>,
    ) -> Result<Option<RouterFrame>, WireError> {
        tokio::select! {
            biased;
            () = self.shared.stop.cancelled() => Ok(None),
            frame = inbound.next() => frame.transpose(),
        }
    }

    /// The handshake: registers a new router, or reconciles a returning
    /// one, and links the connection to it. Returns the incarnation the
    /// connection serves, or why it is rejected.
    async fn greet(
        &self,
        router: RouterId,
        incarnation: Option<u64>,
        sessions: &[HeldSession],
        connection: u64,
        outbound: &Outbound,
    ) -> Result<Incarnation, String> {
        let shared = &self.shared;
        let slot = shared.links.slot(router);
        // Held until the answer is queued: nothing else reaches the router
        // before it.
        let mut link = slot.lock().await;
        let (incarnation, answer) = match incarnation {
            None => {
                let incarnation = shared
                    .store
                    .register_router(router)
                    .await
                    .map_err(|error| error.to_string())?;
                let answer = ControllerFrame::Welcome {
                    incarnation: incarnation.get(),
                };
                (incarnation, answer)
            }
            Some(incarnation) => {
                let (incarnation, report) = self.reconcile(router, incarnation, sessions).await?;
                let answer = ControllerFrame::Reconciled {
                    incarnation: incarnation.get(),
                    drop: report.drop.iter().map(|id| id.get()).collect(),
                    closed: report.closed.iter().map(|id| id.get()).collect(),
                };
                (incarnation, answer)
            }
        };
        *link = Some(Link {
            connection,
            outbound: outbound.clone(),
        });
        let _ = outbound.send(answer);
        Ok(incarnation)
    }

    /// Reconciles a returning router's `Hello`. A router the store does not
    /// know comes back to a controller that restarted: it is registered
    /// again and its sessions are offered for adoption (this controller is
    /// the [`Adopter`]); a known router is reconciled plainly, as a session
    /// the controller closed must stay closed.
    async fn reconcile(
        &self,
        router: RouterId,
        incarnation: u64,
        sessions: &[HeldSession],
    ) -> Result<(Incarnation, ReconcileReport), String> {
        let shared = &self.shared;
        let outcome = match shared.store.router_status(router).await {
            Err(RouterError::UnknownRouter(_)) => {
                let incarnation = shared
                    .store
                    .register_router(router)
                    .await
                    .map_err(|error| error.to_string())?;
                let reported = sessions.iter().map(|held| {
                    let reported = ReportedSession::new(SessionId::new(held.id));
                    if held.token.is_empty() {
                        reported
                    } else {
                        reported.with_token(held.token.clone())
                    }
                });
                shared
                    .reconciler
                    .reconcile_adopting(router, incarnation, reported, self)
                    .await
                    .map(|report| (incarnation, report))
            }
            _ => {
                let incarnation = Incarnation::new(incarnation);
                let reported = sessions.iter().map(|held| SessionId::new(held.id));
                shared
                    .reconciler
                    .reconcile(router, incarnation, reported)
                    .await
                    .map(|report| (incarnation, report))
            }
        };
        outcome.map_err(|error| error.to_string())
    }

    /// One frame of a greeted connection; an error ends the connection.
    async fn handle(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        frame: RouterFrame,
        outbound: &Outbound,
    ) -> Result<(), WireError> {
        match frame {
            RouterFrame::OpenSession { id } => {
                let answer = self.open(router, incarnation, id).await;
                let _ = outbound.send(answer);
            }
            RouterFrame::Heartbeat { ids } => {
                for id in ids {
                    // Heartbeats of sessions closed meanwhile are expected
                    // (and counted by the monitor as ignored).
                    let _ = self.shared.monitor.heartbeat_id(SessionId::new(id)).await;
                }
            }
            RouterFrame::ProbeAnswer { round, ids } => self.shared.links.answer(router, round, ids),
            RouterFrame::Closed { ids } => self.confirm(router, incarnation, ids).await,
            RouterFrame::Hello { .. } => {
                return Err(WireError::Protocol(String::from("hello after handshake")));
            }
        }
        Ok(())
    }

    async fn open(&self, router: RouterId, incarnation: Incarnation, id: u64) -> ControllerFrame {
        let token = sign(self.shared.token_key, router, id);
        let spec = NewSession::new(SessionId::new(id), router, incarnation).token(token.clone());
        match self.shared.store.create(spec).await {
            Ok(session) => {
                self.track(&session);
                ControllerFrame::SessionOpened { id, token }
            }
            Err(error) => ControllerFrame::SessionRefused {
                id,
                reason: error.to_string(),
            },
        }
    }

    /// Counts the session's close by reason and watches it in the monitor.
    fn track(&self, session: &Session) {
        let closes = Arc::clone(&self.shared.closes);
        // Both are refused only if the session closed meanwhile, which
        // nothing does before it is answered (or adopted).
        let _ = session.attach(move |reason| {
            closes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(reason);
        });
        let _ = self.shared.monitor.watch(session);
    }

    /// Closes the sessions `router` says it closed: a confirmation if they
    /// were terminating, a client leaving otherwise. Sessions of other
    /// routers or incarnations are left alone.
    async fn confirm(&self, router: RouterId, incarnation: Incarnation, ids: Vec<u64>) {
        let store = &self.shared.store;
        for id in ids.into_iter().map(SessionId::new) {
            let Ok(Some(session)) = store.get(id).await else {
                continue; // closed and removed already
            };
            if session.router() != router || session.incarnation() != incarnation {
                continue;
            }
            let reason = if session.state() == SessionState::Terminating {
                CloseReason::RouterDeleted
            } else {
                CloseReason::ClientClosed
            };
            // By key: if the id was given to a new session since the look
            // up, the new session is not closed.
            let closed = store.close_exact(session.key(), reason).await;
            if closed.is_ok_and(CloseOutcome::won) {
                self.shared.confirmations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Restart adoption: a session a returning router reports is adopted if
/// its token is the one this controller's key signs for it on that router.
impl Adopter<()> for Controller {
    type Data = ();

    async fn adopt(&self, router: RouterId, reported: ReportedSession) -> Adoption {
        let expected = sign(self.shared.token_key, router, reported.id.get());
        match reported.token {
            Some(token) if token.as_bytes() == expected.as_slice() => Adoption::Accept {
                payload: (),
                token: Some(token),
            },
            Some(_) => Adoption::reject("token not signed by this controller"),
            None => Adoption::reject("no token"),
        }
    }

    fn adopted(&self, session: &Session) {
        // As if this controller had opened it.
        self.track(session);
    }
}

/// The token of session `id` on `router`, signed with `key`. A stand-in
/// for a real signature (HMAC, a JWT): a keyed hash is enough for the
/// example's routers, which never forge on purpose.
fn sign(key: u64, router: RouterId, id: u64) -> Vec<u8> {
    let mut hasher = DefaultHasher::new();
    (key, router.get(), id).hash(&mut hasher);
    hasher.finish().to_be_bytes().to_vec()
}
