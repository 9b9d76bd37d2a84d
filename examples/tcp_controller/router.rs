//! A simulated router: one task holding one TCP connection to the
//! controller, driven by the scenario through a [`RouterHandle`].
//!
//! The router holds the sessions the controller opened for it (with the
//! token the controller issued for each), heartbeats them, answers probes
//! for the live ones, and confirms terminations, as its [`Behaviour`]
//! says. It can drop its connection and come back, to the same controller
//! or to one that restarted, reporting the sessions whose clients it still
//! serves, with their tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use futures::StreamExt;
use session_lifecycle::RouterId;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Duration, MissedTickBehavior};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::protocol::{
    ControllerFrame, HeldSession, JsonCodec, RouterFrame, WireError, write_frames,
};

type Codec = JsonCodec<ControllerFrame, RouterFrame>;

/// How a router behaves.
#[derive(Clone, Debug)]
pub(crate) struct Behaviour {
    /// Confirms `Terminate` frames with `Closed` (a mute router does not).
    pub(crate) confirms: bool,
    /// Sends heartbeats (a quiet router only answers probes).
    pub(crate) heartbeats: bool,
    /// Sessions whose clients vanished: never heartbeated, never answered.
    pub(crate) dead: BTreeSet<u64>,
}

/// How an `open` went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Opened {
    pub(crate) opened: usize,
    pub(crate) refused: usize,
}

/// The controller's answer to a reconnection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reconciliation {
    /// What the router was told to drop.
    pub(crate) drop: Vec<u64>,
    /// What the controller closed because the router did not report it.
    pub(crate) closed: Vec<u64>,
}

enum Command {
    Open {
        ids: Vec<u64>,
        done: oneshot::Sender<Opened>,
    },
    Disconnect {
        forget: usize,
        unknown: Vec<u64>,
        done: oneshot::Sender<Vec<u64>>,
    },
    Reconnect {
        done: oneshot::Sender<Result<Reconciliation, WireError>>,
    },
}

/// The scenario's handle on a router task.
pub(crate) struct RouterHandle {
    id: RouterId,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl RouterHandle {
    /// Connects to the controller at `addr`, is registered, and starts the
    /// router's task.
    pub(crate) async fn connect(
        addr: SocketAddr,
        id: RouterId,
        behaviour: Behaviour,
        heartbeat: Duration,
    ) -> Result<Self, WireError> {
        let hello = RouterFrame::Hello {
            router: id.get(),
            incarnation: None,
            sessions: Vec::new(),
        };
        let (link, answer) = Link::open(addr, hello).await?;
        let ControllerFrame::Welcome { incarnation } = answer else {
            return Err(WireError::Protocol(format!(
                "expected welcome, got {answer:?}"
            )));
        };
        let router = Router {
            id,
            addr,
            incarnation,
            behaviour,
            held: BTreeMap::new(),
            link: Some(link),
            opening: None,
        };
        let (commands, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(router.run(received, heartbeat));
        Ok(Self { id, commands, task })
    }

    pub(crate) fn id(&self) -> RouterId {
        self.id
    }

    /// Asks the controller to open sessions `ids`; returns when each was
    /// answered.
    pub(crate) async fn open(&self, ids: Vec<u64>) -> Result<Opened, WireError> {
        self.ask(|done| Command::Open { ids, done }).await
    }

    /// Drops the connection; meanwhile `forget` sessions end on the router
    /// (returned) and it picks up the `unknown` ones (with no token).
    pub(crate) async fn disconnect(
        &self,
        forget: usize,
        unknown: Vec<u64>,
    ) -> Result<Vec<u64>, WireError> {
        self.ask(|done| Command::Disconnect {
            forget,
            unknown,
            done,
        })
        .await
    }

    /// Reconnects, reporting the sessions whose clients the router still
    /// serves (its dead clients' sessions left out), with their tokens.
    pub(crate) async fn reconnect(&self) -> Result<Reconciliation, WireError> {
        self.ask(|done| Command::Reconnect { done }).await?
    }

    /// Stops the router's task and closes its connection.
    pub(crate) async fn stop(self) {
        drop(self.commands);
        // The task only ends by returning; a panic would be a bug in it,
        // and is the test harness's to report.
        let _ = self.task.await;
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, WireError> {
        let (done, answer) = oneshot::channel();
        self.commands
            .send(command(done))
            .map_err(|_| WireError::Closed)?;
        answer.await.map_err(|_| WireError::Closed)
    }
}

/// A connection to the controller.
struct Link {
    inbound: FramedRead<OwnedReadHalf, Codec>,
    outbound: mpsc::UnboundedSender<RouterFrame>,
}

impl Link {
    /// Connects, sends `hello`, and returns the controller's answer.
    async fn open(
        addr: SocketAddr,
        hello: RouterFrame,
    ) -> Result<(Self, ControllerFrame), WireError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let (outbound, queued) = mpsc::unbounded_channel();
        // Ends when `outbound` drops, closing the write side.
        tokio::spawn(write_frames(
            FramedWrite::new(write, Codec::new()),
            queued,
            std::future::pending(),
        ));
        let mut link = Self {
            inbound: FramedRead::new(read, Codec::new()),
            outbound,
        };
        link.send(hello);
        match link.inbound.next().await {
            Some(Ok(ControllerFrame::Rejected { reason })) => {
                Err(WireError::Protocol(format!("rejected: {reason}")))
            }
            Some(Ok(answer)) => Ok((link, answer)),
            Some(Err(error)) => Err(error),
            None => Err(WireError::Closed),
        }
    }

    fn send(&self, frame: RouterFrame) {
        // A dead writer shows up as the end of `inbound`.
        let _ = self.outbound.send(frame);
    }
}

/// An `open` waiting for its answers.
struct Opening {
    waiting: usize,
    result: Opened,
    done: oneshot::Sender<Opened>,
}

struct Router {
    id: RouterId,
    addr: SocketAddr,
    incarnation: u64,
    behaviour: Behaviour,
    /// Each session's id and token.
    held: BTreeMap<u64, Vec<u8>>,
    link: Option<Link>,
    opening: Option<Opening>,
}

impl Router {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, heartbeat: Duration) {
        let mut beat = tokio::time::interval(heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                frame = next_frame(&mut self.link) => match frame {
                    Some(Ok(frame)) => self.frame(frame),
                    // The controller went away; the scenario decides what
                    // comes next.
                    Some(Err(_)) | None => self.link = None,
                },
                _ = beat.tick(), if self.behaviour.heartbeats => self.heartbeat(),
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Open { ids, done } => self.open(ids, done),
            Command::Disconnect {
                forget,
                unknown,
                done,
            } => {
                // Dropping the link ends its writer, which closes the socket.
                self.link = None;
                let forgotten: Vec<u64> = self.held.keys().copied().take(forget).collect();
                for id in &forgotten {
                    self.held.remove(id);
                }
                self.held
                    .extend(unknown.into_iter().map(|id| (id, Vec::new())));
                let _ = done.send(forgotten);
            }
            Command::Reconnect { done } => {
                let _ = done.send(self.reconnect().await);
            }
        }
    }

    fn open(&mut self, ids: Vec<u64>, done: oneshot::Sender<Opened>) {
        let Some(link) = &self.link else {
            let _ = done.send(Opened {
                opened: 0,
                refused: ids.len(),
            });
            return;
        };
        if ids.is_empty() || self.opening.is_some() {
            let _ = done.send(Opened::default());
            return;
        }
        self.opening = Some(Opening {
            waiting: ids.len(),
            result: Opened::default(),
            done,
        });
        for id in ids {
            link.send(RouterFrame::OpenSession { id });
        }
    }

    async fn reconnect(&mut self) -> Result<Reconciliation, WireError> {
        let sessions = self
            .held
            .iter()
            .filter(|(id, _)| self.alive(**id))
            .map(|(&id, token)| HeldSession {
                id,
                token: token.clone(),
            })
            .collect();
        let hello = RouterFrame::Hello {
            router: self.id.get(),
            incarnation: Some(self.incarnation),
            sessions,
        };
        let (link, answer) = Link::open(self.addr, hello).await?;
        let ControllerFrame::Reconciled {
            incarnation,
            drop,
            closed,
        } = answer
        else {
            return Err(WireError::Protocol(format!(
                "expected reconciled, got {answer:?}"
            )));
        };
        // A controller that restarted registered the router again.
        self.incarnation = incarnation;
        for id in drop.iter().chain(&closed) {
            self.held.remove(id);
        }
        self.link = Some(link);
        Ok(Reconciliation { drop, closed })
    }

    fn frame(&mut self, frame: ControllerFrame) {
        match frame {
            ControllerFrame::SessionOpened { id, token } => {
                self.held.insert(id, token);
                self.answered(|result| result.opened += 1);
            }
            ControllerFrame::SessionRefused { .. } => self.answered(|result| result.refused += 1),
            ControllerFrame::Probe { round, ids } => {
                let ids = ids.into_iter().filter(|id| self.alive(*id)).collect();
                self.send(RouterFrame::ProbeAnswer { round, ids });
            }
            ControllerFrame::Terminate { ids } if self.behaviour.confirms => {
                for id in &ids {
                    self.held.remove(id);
                }
                self.send(RouterFrame::Closed { ids });
            }
            // A mute router ignores terminations; handshake answers after
            // the handshake mean nothing.
            ControllerFrame::Terminate { .. }
            | ControllerFrame::Welcome { .. }
            | ControllerFrame::Reconciled { .. }
            | ControllerFrame::Rejected { .. } => {}
        }
    }

    fn answered(&mut self, count: impl FnOnce(&mut Opened)) {
        let Some(opening) = &mut self.opening else {
            return;
        };
        count(&mut opening.result);
        opening.waiting = opening.waiting.saturating_sub(1);
        if opening.waiting == 0
            && let Some(opening) = self.opening.take()
        {
            let _ = opening.done.send(opening.result);
        }
    }

    fn heartbeat(&self) {
        let ids: Vec<u64> = self
            .held
            .keys()
            .copied()
            .filter(|id| self.alive(*id))
            .collect();
        if !ids.is_empty() {
            self.send(RouterFrame::Heartbeat { ids });
        }
    }

    fn alive(&self, id: u64) -> bool {
        self.held.contains_key(&id) && !self.behaviour.dead.contains(&id)
    }

    fn send(&self, frame: RouterFrame) {
        if let Some(link) = &self.link {
            link.send(frame);
        }
    }
}

/// The link's next frame; never ready while there is no link.
async fn next_frame(link: &mut Option<Link>) -> Option<Result<ControllerFrame, WireError>> {
    match link {
        Some(link) => link.inbound.next().await,
        None => std::future::pending().await,
    }
}
