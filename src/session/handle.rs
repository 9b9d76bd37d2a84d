//! The session handle.
//!
//! # Invariants
//!
//! - The state word (see `state.rs`) is the single source of truth for the
//!   session's state; the `shared` mutex never holds state of its own.
//! - Resources and the token are taken out of `shared` exactly once, by the
//!   caller that won the close, and nothing is added after the close.
//! - `COMPLETE` is set under the `shared` lock, and a waiter registers its
//!   waker under the same lock after checking `COMPLETE`: no wake-up is lost.
//!
//! # Deadlock safety
//!
//! The session has one lock, `shared`. It is never held while user code
//! runs: resources are released, wakers woken, cloned and dropped (see
//! `wait.rs`), the token's reader run ([`Session::with_token`] clones the
//! token's `Arc` under it and reads after), and anything taken out of it
//! dropped, after it is released. Stores may hold their own locks while
//! taking it; it never takes theirs.

use std::fmt;
use std::task::Waker;

use tokio::time::{Duration, Instant};

use super::estimator::Beat;
use super::expiry::{ExpirySnapshot, ExpiryWord};
use super::resource::{AttachError, Resource, Resources};
use super::state::{CloseReason, SessionState, StateWord, Transition, WatchRefused};
use super::token::SessionToken;
use super::traffic::{Traffic, TrafficCounters};
use super::wait::{WaitForClose, WaitForCloseOwned};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::loom::{Arc, Mutex};

/// A session bound to a router: a cheap cloneable handle.
///
/// Clones share one session. The handle carries the session's identity, its
/// router and router incarnation, its state machine, traffic counters, secret
/// token, user payload `P`, and the resources attached to it.
///
/// Stores create sessions (see [`SessionStore::create`](crate::SessionStore::create));
/// [`NewSession::into_session`](crate::NewSession::into_session) builds a
/// handle directly for store implementations and tests.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     CloseReason, Incarnation, NewSession, RouterId, SessionId, SessionState,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let session = NewSession::new(SessionId::new(1), RouterId::new(9), Incarnation::new(1))
///     .token(b"secret".to_vec())
///     .into_session();
/// session.record_in(1500);
/// assert!(session.with_token(|t| t == Some(b"secret".as_slice())));
///
/// let waiter = session.clone();
/// let wait = tokio::spawn(async move { waiter.closed().await });
///
/// assert!(session.begin_terminating().won());
/// assert!(session.close(CloseReason::RouterDeleted).won());
/// assert_eq!(wait.await.unwrap(), CloseReason::RouterDeleted);
/// assert_eq!(session.state(), SessionState::Closed);
/// assert!(session.with_token(|t| t.is_none())); // wiped on close
/// assert_eq!(session.traffic().bytes_in, 1500);
/// # }
/// ```
pub struct Session<P = ()> {
    pub(super) inner: Arc<Inner<P>>,
}

pub(super) struct Inner<P> {
    id: SessionId,
    /// Which life of `id` this is (see [`SessionKey`]).
    generation: u64,
    router: RouterId,
    incarnation: Incarnation,
    created_at: Instant,
    pub(super) word: StateWord,
    traffic: TrafficCounters,
    beat: Beat,
    pub(super) expiry: ExpiryWord,
    pub(super) shared: Mutex<Shared>,
    payload: P,
}

/// What the session's lock guards.
#[derive(Default)]
pub(super) struct Shared {
    /// Wakers of pending close waiters; a waiter's slot index is stable until
    /// the waiter leaves. Emptied (taken) when the close completes.
    pub(super) waiters: Vec<Option<Waker>>,
    pub(super) resources: Resources,
    /// Shared with a [`Session::with_token`] reader that is running: the
    /// bytes are zeroized when the last holder drops them.
    pub(super) token: Option<std::sync::Arc<SessionToken>>,
}

impl<P> Clone for Session<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P> fmt::Debug for Session<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("router", &self.inner.router)
            .field("incarnation", &self.inner.incarnation)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl<P> Session<P> {
    /// A new `Active` session, created now on tokio's clock: see
    /// [`NewSession::into_session_with_generation`].
    #[inline]
    pub(super) fn new(
        id: SessionId,
        generation: u64,
        router: RouterId,
        incarnation: Incarnation,
        token: Option<SessionToken>,
        expires_at: Option<Instant>,
        payload: P,
    ) -> Self {
        let created_at = Instant::now();
        Session {
            inner: Arc::new(Inner {
                id,
                generation,
                router,
                incarnation,
                created_at,
                word: StateWord::new(),
                traffic: TrafficCounters::default(),
                beat: Beat::default(),
                expiry: ExpiryWord::new(created_at, expires_at),
                shared: Mutex::new(Shared {
                    token: token.map(std::sync::Arc::new),
                    ..Shared::default()
                }),
                payload,
            }),
        }
    }

    /// The session's id.
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.inner.id
    }

    /// Which life of its id the session is: the id and the generation its
    /// store gave it. Store operations that take the key
    /// ([`SessionStore::close_exact`](crate::SessionStore::close_exact),
    /// [`SessionStore::remove_exact`](crate::SessionStore::remove_exact))
    /// never touch a later session that reuses the id.
    #[must_use]
    pub fn key(&self) -> SessionKey {
        SessionKey::new(self.inner.id, self.inner.generation)
    }

    /// The router the session is bound to.
    #[must_use]
    pub fn router(&self) -> RouterId {
        self.inner.router
    }

    /// The incarnation of the router the session was created against.
    #[must_use]
    pub fn incarnation(&self) -> Incarnation {
        self.inner.incarnation
    }

    /// When the session was created, on tokio's clock.
    #[must_use]
    pub fn created_at(&self) -> Instant {
        self.inner.created_at
    }

    /// How long the session has existed, on tokio's clock.
    #[must_use]
    pub fn age(&self) -> Duration {
        self.inner.created_at.elapsed()
    }

    /// The user payload given at creation.
    #[must_use]
    pub fn payload(&self) -> &P {
        &self.inner.payload
    }

    /// The session's current state.
    #[must_use]
    pub fn state(&self) -> SessionState {
        self.inner.word.state()
    }

    /// Returns `true` once the session is closed.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.state().is_closed()
    }

    /// Where the session lives in memory: sorting by it makes a pass over
    /// many sessions walk memory in order.
    pub(crate) fn address(&self) -> usize {
        Arc::as_ptr(&self.inner).addr()
    }

    /// Returns `true` once a close has completed its side effects (what
    /// [`Session::closed`] waits for).
    pub(crate) fn is_close_complete(&self) -> bool {
        self.inner.word.completed().is_some()
    }

    /// The session's heartbeat state.
    pub(crate) fn beat(&self) -> &Beat {
        &self.inner.beat
    }

    /// Tags the session as watched by the liveness monitor `tag`, taking
    /// over the tag of a monitor `gone` says is gone.
    pub(crate) fn watch(&self, tag: u64, gone: impl Fn(u64) -> bool) -> Result<(), WatchRefused> {
        self.inner.word.watch(tag, gone)
    }

    /// The tag of the monitor watching the session (0: none) and its state.
    pub(crate) fn watcher(&self) -> (u64, SessionState) {
        self.inner.word.watcher()
    }

    /// The session's expiry word, as one read.
    pub(crate) fn expiry(&self) -> ExpirySnapshot {
        self.inner.expiry.snapshot()
    }

    /// Marks the session tracked by an expiry monitor; `true` for the one
    /// caller that did.
    pub(crate) fn track_expiry(&self) -> bool {
        self.inner.expiry.track()
    }

    /// Lets another expiry monitor track the session: the one that
    /// tracked it stopped.
    pub(crate) fn untrack_expiry(&self) {
        self.inner.expiry.untrack();
    }

    /// Marks the session expired if its expiry is still `seen`.
    pub(crate) fn expire(&self, seen: ExpirySnapshot) -> bool {
        self.inner.expiry.expire(seen)
    }

    /// Flags the session as reported long-lived; `true` for the one caller
    /// that set the flag, so each session is reported once.
    pub(crate) fn flag_long_lived(&self) -> bool {
        self.inner.word.flag_long_lived()
    }

    /// The reason the session was closed, or `None` while it is open.
    #[must_use]
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.word.reason()
    }

    /// Moves the session from `Active` to `Terminating`.
    /// See the example on [`Session`].
    ///
    /// Exactly one caller wins; the others learn the state they found. A
    /// session that is already `Terminating` or `Closed` is left as it is.
    pub fn begin_terminating(&self) -> Transition {
        self.inner.word.begin_terminating()
    }

    /// Waits until the session is closed and its close has completed
    /// (resources released, token wiped); resolves with the close reason.
    ///
    /// Level-triggered: ready at once if the session is already closed. Any
    /// number of waiters may wait at once; a waker that panics when woken is
    /// contained (logged), and the other waiters are still woken.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future before it resolves unregisters it and
    /// leaves the session untouched.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// let waiter = session.clone();
    /// let wait = tokio::spawn(async move { waiter.closed().await });
    /// let _ = session.close(CloseReason::ClientClosed);
    /// assert_eq!(wait.await?, CloseReason::ClientClosed);
    ///
    /// // Level-triggered: a closed session's wait is ready at once.
    /// assert_eq!(session.closed().await, CloseReason::ClientClosed);
    /// # Ok(())
    /// # }
    /// ```
    pub fn closed(&self) -> WaitForClose<'_, P> {
        WaitForClose::new(self)
    }

    /// Like [`closed`](Self::closed), but the future owns a handle and is
    /// `'static`, for spawning or storing.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`closed`](Self::closed).
    pub fn closed_owned(&self) -> WaitForCloseOwned<P> {
        WaitForCloseOwned::new(self.clone())
    }

    /// Attaches a resource to be released exactly once when the session
    /// closes.
    ///
    /// # Errors
    ///
    /// [`AttachError`] hands the resource back if the session is already
    /// closed; the caller then releases it itself.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     CloseReason, session::Classed, Incarnation, NewSession, RouterId, SessionId,
    ///     ResourceClass,
    /// };
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.attach(|_: CloseReason| println!("buffer freed"))?;
    /// session.attach(Classed::new(ResourceClass::High, |_: CloseReason| {
    ///     println!("port freed")
    /// }))?;
    ///
    /// // Released in reverse order of attachment: the port, then the buffer.
    /// let _ = session.close(CloseReason::ClientClosed);
    /// assert!(session.attach(|_: CloseReason| {}).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn attach<R: Resource>(&self, resource: R) -> Result<(), AttachError<R>> {
        let mut shared = self.inner.shared.lock();
        // Read under the lock: a closer takes the resources under the same
        // lock after its compare-exchange, so either it takes this one or
        // this read sees `Closed`.
        if self.inner.word.state().is_closed() {
            return Err(AttachError(resource));
        }
        shared.resources.push(Box::new(resource));
        Ok(())
    }

    /// Runs `f` on the session's token: `None` if it has none or once the
    /// session is closed (the token is wiped then).
    /// See the example on [`Session`].
    ///
    /// `f` runs outside every lock: it may call back into the session or its
    /// store, even close the session. A close while `f` runs takes the token
    /// from the session at once, but `f` still sees the bytes until it
    /// returns; they are zeroized then.
    pub fn with_token<R>(&self, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        // Shared under the lock, read after it; dropped after `f` returns.
        let token = self.inner.shared.lock().token.clone();
        f(token.as_deref().map(SessionToken::as_bytes))
    }

    /// Counts one packet of `bytes` received from the client (the byte
    /// count saturates at `u64::MAX`).
    /// See the example on [`Session`].
    pub fn record_in(&self, bytes: u64) {
        self.inner.traffic.record_in(bytes);
    }

    /// Counts one packet of `bytes` sent to the client (the byte count
    /// saturates at `u64::MAX`).
    pub fn record_out(&self, bytes: u64) {
        self.inner.traffic.record_out(bytes);
    }

    /// A snapshot of the traffic counters (not a consistent cut across them).
    /// See the example on [`Session`].
    #[must_use]
    pub fn traffic(&self) -> Traffic {
        self.inner.traffic.snapshot()
    }

    /// Returns `true` when both handles are the same session (not merely the
    /// same id).
    #[must_use]
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }
}
