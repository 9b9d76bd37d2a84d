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
//!
//! See `links.rs` for how connections are tied to routers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use session_lifecycle::{
    Backoff, CloseReason, EventBus, Incarnation, LivenessMonitor, MemoryStore, NewSession,
    Reconciler, RouterDeleter, RouterId, SessionId, SessionState, SessionStore,
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
use super::protocol::{ControllerFrame, JsonCodec, RouterFrame, WireError, write_frames};
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
}

/// The controller's counters of what came over the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WireStats {
    /// Sessions closed by a router's `Closed` frame.
    pub(crate) confirmations: usize,
    /// Session ids that answered a probe.
    pub(crate) probe_answers: usize,
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
    next_connection: AtomicU64,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Controller {
    /// Builds the controller's pieces over `store`, the monitor and the
    /// reconciler publishing on `bus`, and listens on an ephemeral loopback
    /// port.
    pub(crate) async fn start(
        store: Arc<MemoryStore>,
        bus: &EventBus,
        settings: Settings,
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
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
        sessions: &[u64],
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
                let incarnation = Incarnation::new(incarnation);
                let reported = sessions.iter().map(|&id| SessionId::new(id));
                let report = shared
                    .reconciler
                    .reconcile(router, incarnation, reported)
                    .await
                    .map_err(|error| error.to_string())?;
                let answer = ControllerFrame::Reconciled {
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
        let spec = NewSession::new(SessionId::new(id), router, incarnation);
        match self.shared.store.create(spec).await {
            Ok(session) => {
                let closes = Arc::clone(&self.shared.closes);
                // Both are refused only if the session closed meanwhile,
                // which nothing does before it is answered.
                let _ = session.attach(move |reason| {
                    closes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record(reason);
                });
                let _ = self.shared.monitor.watch(&session);
                ControllerFrame::SessionOpened { id }
            }
            Err(error) => ControllerFrame::SessionRefused {
                id,
                reason: error.to_string(),
            },
        }
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
