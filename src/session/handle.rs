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
//! `closed.rs`), the token's reader run ([`Session::with_token`] clones the
//! token's `Arc` under it and reads after), and anything taken out of it
//! dropped, after it is released. Stores may hold their own locks while
//! taking it; it never takes theirs.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::task::Waker;

use tokio::time::{Duration, Instant};

use super::beat::Beat;
use super::closed::{Closed, ClosedOwned};
use super::resource::{AttachError, Resource, ResourceClass, Resources};
use super::state::{
    CloseFrom, CloseOutcome, CloseReason, SessionState, StateWord, Transition, WatchRefused,
};
use super::token::SessionToken;
use super::traffic::{Traffic, TrafficCounters};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::loom::{Arc, Mutex};

/// A session bound to a router: a cheap cloneable handle.
///
/// Clones share one session. The handle carries the session's identity, its
/// router and router incarnation, its state machine, traffic counters, secret
/// token, user payload `P`, and the resources attached to it.
///
/// Stores create sessions (see [`SessionStore::create`](crate::SessionStore::create));
/// [`NewSession::into_session`] builds a handle directly for store
/// implementations and tests.
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
    pub(super) shared: Mutex<Shared>,
    payload: P,
}

/// What the session's lock guards.
#[derive(Default)]
pub(super) struct Shared {
    /// Wakers of pending close waiters; a waiter's slot index is stable until
    /// the waiter leaves. Emptied (taken) when the close completes.
    pub(super) waiters: Vec<Option<Waker>>,
    resources: Resources,
    /// Shared with a [`Session::with_token`] reader that is running: the
    /// bytes are zeroized when the last holder drops them.
    token: Option<std::sync::Arc<SessionToken>>,
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
    /// The session's id.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(7), RouterId::new(2), Incarnation::new(3))
    ///         .into_session();
    /// assert_eq!(session.id(), SessionId::new(7));
    /// ```
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.inner.id
    }

    /// Which life of its id the session is: the id and the generation its
    /// store gave it. Store operations that take the key
    /// ([`SessionStore::close_exact`](crate::SessionStore::close_exact),
    /// [`SessionStore::remove_exact`](crate::SessionStore::remove_exact))
    /// never touch a later session that reuses the id.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let new = || NewSession::new(SessionId::new(7), RouterId::new(2), Incarnation::new(3));
    /// let (first, second) = (new().into_session(), new().into_session());
    /// assert_eq!(first.key().id(), second.key().id());
    /// assert_ne!(first.key(), second.key());
    /// ```
    #[must_use]
    pub fn key(&self) -> SessionKey {
        SessionKey::new(self.inner.id, self.inner.generation)
    }

    /// The router the session is bound to.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(7), RouterId::new(2), Incarnation::new(3))
    ///         .into_session();
    /// assert_eq!(session.router(), RouterId::new(2));
    /// ```
    #[must_use]
    pub fn router(&self) -> RouterId {
        self.inner.router
    }

    /// The incarnation of the router the session was created against.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(7), RouterId::new(2), Incarnation::new(3))
    ///         .into_session();
    /// assert_eq!(session.incarnation(), Incarnation::new(3));
    /// ```
    #[must_use]
    pub fn incarnation(&self) -> Incarnation {
        self.inner.incarnation
    }

    /// When the session was created, on tokio's clock.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// tokio::time::advance(Duration::from_secs(5)).await;
    /// assert_eq!(session.created_at().elapsed(), Duration::from_secs(5));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn created_at(&self) -> Instant {
        self.inner.created_at
    }

    /// How long the session has existed, on tokio's clock.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// tokio::time::advance(Duration::from_secs(90)).await;
    /// assert_eq!(session.age(), Duration::from_secs(90));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn age(&self) -> Duration {
        self.inner.created_at.elapsed()
    }

    /// The user payload given at creation.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// /// What the controller keeps about the client.
    /// struct Client {
    ///     name: &'static str,
    /// }
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .payload(Client { name: "alice" })
    ///         .into_session();
    /// assert_eq!(session.payload().name, "alice");
    /// ```
    #[must_use]
    pub fn payload(&self) -> &P {
        &self.inner.payload
    }

    /// The session's current state.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId, SessionState};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// assert_eq!(session.state(), SessionState::Active);
    /// ```
    #[must_use]
    pub fn state(&self) -> SessionState {
        self.inner.word.state()
    }

    /// Returns `true` once the session is closed.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// assert!(!session.is_closed());
    /// let _ = session.close(CloseReason::ClientClosed);
    /// assert!(session.is_closed());
    /// ```
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

    /// Tags the session as watched by the liveness monitor `tag`.
    pub(crate) fn watch(&self, tag: u64) -> Result<(), WatchRefused> {
        self.inner.word.watch(tag)
    }

    /// The tag of the monitor watching the session (0: none) and its state.
    pub(crate) fn watcher(&self) -> (u64, SessionState) {
        self.inner.word.watcher()
    }

    /// Flags the session as reported long-lived; `true` for the one caller
    /// that set the flag, so each session is reported once.
    pub(crate) fn flag_long_lived(&self) -> bool {
        self.inner.word.flag_long_lived()
    }

    /// The reason the session was closed, or `None` while it is open.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// assert_eq!(session.close_reason(), None);
    /// let _ = session.close(CloseReason::LivenessTimeout);
    /// assert_eq!(session.close_reason(), Some(CloseReason::LivenessTimeout));
    /// ```
    #[must_use]
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.word.reason()
    }

    /// Moves the session from `Active` to `Terminating`.
    ///
    /// Exactly one caller wins; the others learn the state they found. A
    /// session that is already `Terminating` or `Closed` is left as it is.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     CloseReason, Incarnation, NewSession, RouterId, SessionId, SessionState,
    ///     Transition,
    /// };
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// // A deletion marks the session, then waits for its router to confirm.
    /// assert!(session.begin_terminating().won());
    /// assert_eq!(session.state(), SessionState::Terminating);
    ///
    /// // A session closed first is not marked.
    /// let _ = session.close(CloseReason::RouterDeleted);
    /// assert_eq!(
    ///     session.begin_terminating(),
    ///     Transition::Lost { current: SessionState::Closed }
    /// );
    /// ```
    pub fn begin_terminating(&self) -> Transition {
        self.inner.word.begin_terminating()
    }

    /// Closes the session (from `Active` or `Terminating`) with `reason`.
    ///
    /// Exactly one caller wins the close and gets [`CloseOutcome::Closed`];
    /// that caller wipes the token, releases the attached resources (in
    /// reverse order of attachment, outside every lock) and then wakes every
    /// close waiter. Other callers get [`CloseOutcome::AlreadyClosed`] with
    /// the winner's reason, at once.
    ///
    /// This closes the handle only; a session closed this way stays in its
    /// store until it is removed. [`SessionStore::close`](crate::SessionStore::close)
    /// closes and removes in one call.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     CloseOutcome, CloseReason, Incarnation, NewSession, RouterId, SessionId,
    /// };
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.attach(|reason: CloseReason| println!("port freed: {reason}"))?;
    ///
    /// // The router confirmed; the port is freed here, once.
    /// assert_eq!(session.close(CloseReason::RouterDeleted), CloseOutcome::Closed);
    /// // A late force-close loses and learns the winner's reason.
    /// assert_eq!(
    ///     session.close(CloseReason::Forced),
    ///     CloseOutcome::AlreadyClosed { reason: CloseReason::RouterDeleted }
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn close(&self, reason: CloseReason) -> CloseOutcome {
        let outcome = self.inner.word.close(reason);
        if outcome.won() {
            #[cfg(feature = "metrics")]
            crate::metrics::closed(reason);
            self.complete_close(reason);
        }
        outcome
    }

    /// Closes the session as [`close`](Self::close) does, without counting
    /// the close in the metrics: for a store that builds the handle of a
    /// session closed elsewhere under its own locks (nothing attached, no
    /// waiter, so the close runs no user code) and counts it after them.
    #[cfg(feature = "etcd")]
    pub(crate) fn close_unrecorded(&self, reason: CloseReason) -> CloseOutcome {
        let outcome = self.inner.word.close(reason);
        if outcome.won() {
            self.complete_close(reason);
        }
        outcome
    }

    fn complete_close(&self, reason: CloseReason) {
        let resources = self.take_resources();
        for resource in resources.into_release_order() {
            self.release_contained(resource, reason);
        }
        self.finish_close();
    }

    /// Takes the resources out and wipes the token; only the caller that
    /// won the close calls it.
    fn take_resources(&self) -> Resources {
        let (resources, token) = {
            let mut shared = self.inner.shared.lock();
            (std::mem::take(&mut shared.resources), shared.token.take())
        };
        // `SessionToken` zeroizes its bytes on drop: here, unless a
        // `with_token` reader still runs (then when it returns).
        drop(token);
        resources
    }

    /// Releases one resource, containing a panic; `false` if it panicked.
    fn release_contained(&self, resource: Box<dyn Resource>, reason: CloseReason) -> bool {
        release_contained(resource, reason, self.inner.id, self.inner.router)
    }

    /// Marks the close complete and wakes every waiter.
    fn finish_close(&self) {
        let waiters = {
            let mut shared = self.inner.shared.lock();
            self.inner.word.mark_complete();
            std::mem::take(&mut shared.waiters)
        };
        for waker in waiters.into_iter().flatten() {
            waker.wake();
        }
    }

    /// Closes the session with `reason` but hands its resources back,
    /// grouped by class, for the caller to release later (through a
    /// reclamation queue); resources that ask to be released inline are
    /// released here. The token is wiped at once. The close completes (its
    /// waiters wake) when the last clone of the returned `completion` drops.
    ///
    /// `Err` with the outcome if another caller closed the session first.
    pub(crate) fn close_deferred(&self, reason: CloseReason) -> Result<DeferredClose, CloseOutcome>
    where
        P: Send + Sync + 'static,
    {
        let outcome = self.inner.word.close(reason);
        if !outcome.won() {
            return Err(outcome);
        }
        Ok(self.defer_release(reason))
    }

    /// [`close_deferred`](Self::close_deferred) from the states `from`
    /// allows: `None` if another caller closed the session first, or, for
    /// [`CloseFrom::Active`], if it is `Terminating` (its deletion's).
    pub(crate) fn close_deferred_from(
        &self,
        reason: CloseReason,
        from: CloseFrom,
    ) -> Option<DeferredClose>
    where
        P: Send + Sync + 'static,
    {
        self.won_from(reason, from)
            .then(|| self.defer_release(reason))
    }

    /// Closes the session, as [`close`](Self::close) does, from the states
    /// `from` allows; `true` if this call closed it.
    pub(crate) fn close_from(&self, reason: CloseReason, from: CloseFrom) -> bool {
        let won = self.won_from(reason, from);
        if won {
            #[cfg(feature = "metrics")]
            crate::metrics::closed(reason);
            self.complete_close(reason);
        }
        won
    }

    /// Moves the state word to `Closed` from the states `from` allows;
    /// `true` if this call did.
    fn won_from(&self, reason: CloseReason, from: CloseFrom) -> bool {
        match from {
            CloseFrom::Open => self.inner.word.close(reason).won(),
            CloseFrom::Active => self.inner.word.close_active(reason),
        }
    }

    /// The winner's side of a deferred close: groups the resources by class.
    fn defer_release(&self, reason: CloseReason) -> DeferredClose
    where
        P: Send + Sync + 'static,
    {
        #[cfg(feature = "metrics")]
        crate::metrics::closed(reason);
        let resources = self.take_resources();
        let mut groups: Vec<(ResourceClass, Vec<Box<dyn Resource>>)> = Vec::new();
        for resource in resources.into_release_order() {
            if resource.release_inline() {
                self.release_contained(resource, reason);
                continue;
            }
            let class = resource.class();
            match groups.iter_mut().find(|(c, _)| *c == class) {
                Some((_, group)) => group.push(resource),
                None => groups.push((class, vec![resource])),
            }
        }
        groups.sort_by_key(|(class, _)| class.rank());
        DeferredClose {
            reason,
            groups,
            completion: std::sync::Arc::new(CompleteOnDrop(self.clone())),
        }
    }

    /// Waits until the session is closed and its close has completed
    /// (resources released, token wiped); resolves with the close reason.
    ///
    /// Level-triggered: ready at once if the session is already closed. Any
    /// number of waiters may wait at once.
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
    pub fn closed(&self) -> Closed<'_, P> {
        Closed::new(self)
    }

    /// Like [`closed`](Self::closed), but the future owns a handle and is
    /// `'static`, for spawning or storing.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`closed`](Self::closed).
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
    /// let wait = tokio::spawn(session.closed_owned());
    /// let _ = session.close(CloseReason::RouterLost);
    /// assert_eq!(wait.await?, CloseReason::RouterLost);
    /// # Ok(())
    /// # }
    /// ```
    pub fn closed_owned(&self) -> ClosedOwned<P> {
        ClosedOwned::new(self.clone())
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
    ///     CloseReason, Classed, Incarnation, NewSession, RouterId, SessionId,
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
    ///
    /// `f` runs outside every lock: it may call back into the session or its
    /// store, even close the session. A close while `f` runs takes the token
    /// from the session at once, but `f` still sees the bytes until it
    /// returns; they are zeroized then.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .token(b"s3cret".to_vec())
    ///         .into_session();
    /// // Check a client's credential without copying the secret out.
    /// assert!(session.with_token(|token| token == Some(b"s3cret".as_slice())));
    ///
    /// let _ = session.close(CloseReason::ClientClosed);
    /// assert!(session.with_token(|token| token.is_none())); // wiped
    /// ```
    pub fn with_token<R>(&self, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        // Shared under the lock, read after it; dropped after `f` returns.
        let token = self.inner.shared.lock().token.clone();
        f(token.as_deref().map(SessionToken::as_bytes))
    }

    /// Counts one packet of `bytes` received from the client.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.record_in(1_500);
    /// session.record_in(40);
    /// assert_eq!(session.traffic().bytes_in, 1_540);
    /// assert_eq!(session.traffic().packets_in, 2);
    /// ```
    pub fn record_in(&self, bytes: u64) {
        self.inner.traffic.record_in(bytes);
    }

    /// Counts one packet of `bytes` sent to the client.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.record_out(1_500);
    /// assert_eq!(
    ///     (session.traffic().bytes_out, session.traffic().packets_out),
    ///     (1_500, 1)
    /// );
    /// ```
    pub fn record_out(&self, bytes: u64) {
        self.inner.traffic.record_out(bytes);
    }

    /// A snapshot of the traffic counters (not a consistent cut across them).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.record_in(100);
    /// session.record_out(400);
    /// assert_eq!(session.traffic().total_bytes(), 500);
    /// ```
    #[must_use]
    pub fn traffic(&self) -> Traffic {
        self.inner.traffic.snapshot()
    }

    /// Returns `true` when both handles are the same session (not merely the
    /// same id).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId, Session};
    ///
    /// let spec =
    ///     || NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1));
    /// let session = spec().into_session();
    /// let other = spec().into_session();
    /// assert!(Session::ptr_eq(&session, &session.clone()));
    /// assert!(!Session::ptr_eq(&session, &other)); // same id, another session
    /// ```
    #[must_use]
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }
}

/// Releases one resource, containing a panic; `false` if it panicked.
pub(crate) fn release_contained(
    resource: Box<dyn Resource>,
    reason: CloseReason,
    session: SessionId,
    router: RouterId,
) -> bool {
    let released = catch_unwind(AssertUnwindSafe(|| resource.release(reason))).is_ok();
    if !released {
        tracing::error!(%session, %router,
            "a session resource panicked while being released; the panic was contained");
    }
    released
}

/// A close whose resources are released later: see
/// [`Session::close_deferred`].
pub(crate) struct DeferredClose {
    pub(crate) reason: CloseReason,
    /// The resources by class, most urgent first; within a class, last
    /// attached first.
    pub(crate) groups: Vec<(ResourceClass, Vec<Box<dyn Resource>>)>,
    /// Completes the close when its last clone drops.
    pub(crate) completion: std::sync::Arc<dyn Send + Sync>,
}

/// Completes a deferred close when dropped.
struct CompleteOnDrop<P>(Session<P>);

impl<P> Drop for CompleteOnDrop<P> {
    fn drop(&mut self) {
        self.0.finish_close();
    }
}

/// The description of a session to create.
///
/// # Example
///
/// ```
/// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
///
/// let spec = NewSession::new(SessionId::new(1), RouterId::new(2), Incarnation::new(3))
///     .token(b"t0k3n".to_vec())
///     .payload("client-a");
/// assert_eq!(spec.router(), RouterId::new(2));
/// ```
pub struct NewSession<P = ()> {
    id: SessionId,
    router: RouterId,
    incarnation: Incarnation,
    token: Option<SessionToken>,
    payload: P,
}

impl NewSession<()> {
    /// A session `id` on `router`, created against the router's
    /// `incarnation`, without token or payload.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let router = RouterId::new(1);
    /// let incarnation = store.register_router(router).await?;
    /// let spec = NewSession::new(SessionId::new(1), router, incarnation);
    /// let session = store.create(spec).await?;
    /// assert_eq!(session.incarnation(), incarnation);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn new(id: SessionId, router: RouterId, incarnation: Incarnation) -> Self {
        Self {
            id,
            router,
            incarnation,
            token: None,
            payload: (),
        }
    }
}

impl<P> NewSession<P> {
    /// Sets the session's secret token.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .token(&b"k3y"[..])
    ///         .into_session();
    /// assert_eq!(session.with_token(|token| token.map(<[u8]>::len)), Some(3));
    /// ```
    #[must_use]
    pub fn token(mut self, token: impl Into<SessionToken>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the user payload.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let spec = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///     .payload(String::from("client-a"));
    /// assert_eq!(spec.into_session().payload(), "client-a");
    /// ```
    #[must_use]
    pub fn payload<Q>(self, payload: Q) -> NewSession<Q> {
        NewSession {
            id: self.id,
            router: self.router,
            incarnation: self.incarnation,
            token: self.token,
            payload,
        }
    }

    /// The session id.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let spec =
    ///     NewSession::new(SessionId::new(1), RouterId::new(2), Incarnation::new(3));
    /// assert_eq!(spec.id(), SessionId::new(1));
    /// ```
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The router.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let spec =
    ///     NewSession::new(SessionId::new(1), RouterId::new(2), Incarnation::new(3));
    /// assert_eq!(spec.router(), RouterId::new(2));
    /// ```
    #[must_use]
    pub fn router(&self) -> RouterId {
        self.router
    }

    /// The router incarnation the session is created against.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let spec =
    ///     NewSession::new(SessionId::new(1), RouterId::new(2), Incarnation::new(3));
    /// assert_eq!(spec.incarnation(), Incarnation::new(3));
    /// ```
    #[must_use]
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The token, for a store that persists it.
    #[cfg(feature = "etcd")]
    pub(crate) fn token_bytes(&self) -> Option<&[u8]> {
        self.token.as_ref().map(SessionToken::as_bytes)
    }

    /// The payload, for a store that persists it.
    #[cfg(feature = "etcd")]
    pub(crate) fn payload_ref(&self) -> &P {
        &self.payload
    }

    /// Builds the session handle, `Active`, created now on tokio's clock,
    /// with a generation unique within the process (see [`SessionKey`]).
    ///
    /// Stores call this once they accepted the session; a session built here
    /// belongs to no store.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId, SessionState};
    ///
    /// // A store implementation, once it accepted the session:
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// assert_eq!(session.state(), SessionState::Active);
    /// ```
    #[must_use]
    pub fn into_session(self) -> Session<P> {
        self.into_session_with_generation(next_generation())
    }

    /// Builds the session handle as [`into_session`](Self::into_session)
    /// does, with the generation the store chose: a store shared by several
    /// processes uses one its backend hands out (a revision, a sequence),
    /// so that every process agrees on each session's [`SessionKey`]. The
    /// store must never give two sessions of one id the same generation.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId, SessionKey};
    ///
    /// // The backend's revision that created the session's record:
    /// let revision = 4_711;
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session_with_generation(revision);
    /// assert_eq!(session.key(), SessionKey::new(SessionId::new(1), revision));
    /// ```
    #[must_use]
    pub fn into_session_with_generation(self, generation: u64) -> Session<P> {
        Session {
            inner: Arc::new(Inner {
                id: self.id,
                generation,
                router: self.router,
                incarnation: self.incarnation,
                created_at: Instant::now(),
                word: StateWord::new(),
                traffic: TrafficCounters::default(),
                beat: Beat::default(),
                shared: Mutex::new(Shared {
                    token: self.token.map(std::sync::Arc::new),
                    ..Shared::default()
                }),
                payload: self.payload,
            }),
        }
    }
}

impl<P> fmt::Debug for NewSession<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewSession")
            .field("id", &self.id)
            .field("router", &self.router)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

/// A generation no other session built by [`NewSession::into_session`] in
/// this process has. Each thread takes blocks of generations from one
/// counter, so creates on many threads do not contend on it.
fn next_generation() -> u64 {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Generations a thread takes at a time.
    const BLOCK: u64 = 1024;
    /// The next block's first generation; 0 is never handed out.
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(BLOCK);
    thread_local! {
        /// The next generation of this thread's block, and its end.
        static LOCAL: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    // Relaxed: uniqueness needs only the atomicity of the add. 2^64
    // generations are not exhausted by any process.
    let block = || NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
    LOCAL
        .try_with(|local| {
            let (mut next, mut end) = local.get();
            if next == end {
                next = block();
                end = next.wrapping_add(BLOCK);
            }
            local.set((next.wrapping_add(1), end));
            next
        })
        // A thread whose locals are being destroyed uses a block of its own.
        .unwrap_or_else(|_| block())
}
