//! The wire protocol between the controller and its routers.
//!
//! Each frame is a length-delimited block (tokio-util's
//! [`LengthDelimitedCodec`]: a 4-byte big-endian length, then the body)
//! whose body is one JSON-encoded frame. Frames are typed by direction:
//! [`RouterFrame`] goes from a router to the controller, [`ControllerFrame`]
//! the other way, so neither side can send what only the other may.
//!
//! A connection opens with a handshake: the router sends
//! [`RouterFrame::Hello`]; the controller answers [`ControllerFrame::Welcome`]
//! (first connection: the router is registered and learns its incarnation),
//! [`ControllerFrame::Reconciled`] (reconnection: the sessions the router
//! reported were reconciled, or adopted by a controller that restarted;
//! the router learns its incarnation again), or
//! [`ControllerFrame::Rejected`] and closes. The controller sends nothing
//! else on the connection before that answer.
//!
//! Session ids travel as plain `u64`s; each session's token, issued by the
//! controller when it opens the session, as bytes.

use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use futures::SinkExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder, FramedWrite, LengthDelimitedCodec};

/// A frame a router sends to the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
pub(crate) enum RouterFrame {
    /// Opens every connection: who the router is and, when it reconnects,
    /// its incarnation and every session it still holds.
    Hello {
        router: u64,
        /// `None` on the first connection: the controller registers the
        /// router and answers with its incarnation.
        incarnation: Option<u64>,
        sessions: Vec<HeldSession>,
    },
    /// A client asks to open a session through the router.
    OpenSession { id: u64 },
    /// These sessions are alive.
    Heartbeat { ids: Vec<u64> },
    /// The answer to [`ControllerFrame::Probe`]: the probed sessions that
    /// are alive.
    ProbeAnswer { round: u64, ids: Vec<u64> },
    /// These sessions are closed on the router: the confirmation of a
    /// [`ControllerFrame::Terminate`], or a client leaving.
    Closed { ids: Vec<u64> },
}

/// A session a router reports in its [`RouterFrame::Hello`]: its id and
/// the token the controller issued for it (empty if it has none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HeldSession {
    pub(crate) id: u64,
    pub(crate) token: Vec<u8>,
}

/// A frame the controller sends to a router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
pub(crate) enum ControllerFrame {
    /// Handshake answer to a first connection.
    Welcome { incarnation: u64 },
    /// Handshake answer to a reconnection: the router's incarnation (a new
    /// one if the controller restarted and registered it again), the
    /// sessions the router must drop (unknown to the controller and not
    /// adopted, or closed there) and those the controller closed because
    /// the router no longer reported them.
    Reconciled {
        incarnation: u64,
        drop: Vec<u64>,
        closed: Vec<u64>,
    },
    /// Handshake refused; the controller closes the connection.
    Rejected { reason: String },
    /// The session asked for is open; `token` vouches for it, should the
    /// router ever report it to a controller that restarted.
    SessionOpened { id: u64, token: Vec<u8> },
    /// The session asked for was refused (its router is fenced or deleted,
    /// the id is taken, ...).
    SessionRefused { id: u64, reason: String },
    /// Are these sessions alive? `round` is unique per controller; the
    /// router echoes it in its [`RouterFrame::ProbeAnswer`].
    Probe { round: u64, ids: Vec<u64> },
    /// Close these sessions and confirm with [`RouterFrame::Closed`].
    Terminate { ids: Vec<u64> },
}

/// What went wrong on a connection.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The socket or the length-delimited framing failed.
    Io(io::Error),
    /// A frame's body was not a valid frame.
    Json(serde_json::Error),
    /// The peer closed the connection.
    Closed,
    /// The peer broke the protocol.
    Protocol(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(error) => write!(f, "connection failed: {error}"),
            Self::Json(error) => write!(f, "malformed frame: {error}"),
            Self::Closed => f.write_str("connection closed by the peer"),
            Self::Protocol(what) => write!(f, "protocol violation: {what}"),
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(error) => Some(error),
            Self::Json(error) => Some(error),
            Self::Closed | Self::Protocol(_) => None,
        }
    }
}

impl From<io::Error> for WireError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

impl From<serde_json::Error> for WireError {
    fn from(error: serde_json::Error) -> Self {
        Self::Json(error)
    }
}

/// Length-delimited JSON frames: decodes `In`, encodes `Out`.
pub(crate) struct JsonCodec<In, Out> {
    frames: LengthDelimitedCodec,
    _frames: PhantomData<fn(Out) -> In>,
}

impl<In, Out> JsonCodec<In, Out> {
    pub(crate) fn new() -> Self {
        Self {
            frames: LengthDelimitedCodec::new(),
            _frames: PhantomData,
        }
    }
}

impl<In: DeserializeOwned, Out> Decoder for JsonCodec<In, Out> {
    type Item = In;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, WireError> {
        match self.frames.decode(src)? {
            Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for JsonCodec<In, Out> {
    type Error = WireError;

    fn encode(&mut self, frame: Out, dst: &mut BytesMut) -> Result<(), WireError> {
        let body = serde_json::to_vec(&frame)?;
        self.frames.encode(Bytes::from(body), dst)?;
        Ok(())
    }
}

/// Writes the frames of `outbound` to the socket until the channel closes,
/// the socket fails or `stop` completes; flushes whenever the channel runs
/// dry, so a burst goes out in few writes. Dropping the sink at the end
/// shuts the socket's write side: the peer reads end-of-stream.
pub(crate) async fn write_frames<In, Out: Serialize>(
    mut sink: FramedWrite<OwnedWriteHalf, JsonCodec<In, Out>>,
    mut outbound: mpsc::UnboundedReceiver<Out>,
    stop: impl Future<Output = ()>,
) -> Result<(), WireError> {
    tokio::pin!(stop);
    loop {
        let frame = tokio::select! {
            biased;
            () = &mut stop => return Ok(()),
            frame = outbound.recv() => frame,
        };
        let Some(frame) = frame else {
            return Ok(());
        };
        sink.feed(frame).await?;
        if outbound.is_empty() {
            sink.flush().await?;
        }
    }
}
