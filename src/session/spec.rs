//! [`NewSession`]: the description of a session to create.

use std::fmt;

use tokio::time::{Duration, Instant};

use super::handle::Session;
use super::token::SessionToken;
use crate::id::{Incarnation, RouterId, SessionId};

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
    expires_at: Option<Instant>,
    payload: P,
}

impl NewSession<()> {
    /// A session `id` on `router`, created against the router's
    /// `incarnation`, without token or payload. See the example on [`NewSession`].
    #[must_use]
    pub fn new(id: SessionId, router: RouterId, incarnation: Incarnation) -> Self {
        Self {
            id,
            router,
            incarnation,
            token: None,
            expires_at: None,
            payload: (),
        }
    }
}

impl<P> NewSession<P> {
    /// Sets the session's secret token. See the example on [`NewSession`].
    #[must_use]
    pub fn token(mut self, token: impl Into<SessionToken>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the user payload. See the example on [`NewSession`].
    #[must_use]
    pub fn payload<Q>(self, payload: Q) -> NewSession<Q> {
        NewSession {
            id: self.id,
            router: self.router,
            incarnation: self.incarnation,
            token: self.token,
            expires_at: self.expires_at,
            payload,
        }
    }

    /// Gives the session an absolute expiry on tokio's clock (for
    /// example its API session's): an
    /// [`ExpiryMonitor`](crate::ExpiryMonitor) that tracks it closes
    /// it then with [`CloseReason::Expired`](crate::CloseReason::Expired).
    /// [`Session::extend_expiry`] moves it later. Without one, the session
    /// never expires (nor does one more than 146 years after its creation).
    ///
    /// The expiry lives in the session's handle (8 bytes); stores do not
    /// persist it: with an `EtcdStore`, the controller that created the
    /// session tracks its expiry.
    ///
    /// [`Lifecycle::create`](crate::Lifecycle::create) tracks a session
    /// with an expiry; with a store used directly, give the session to
    /// [`ExpiryMonitor::track`](crate::ExpiryMonitor::track).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let at = tokio::time::Instant::now() + Duration::from_secs(3_600);
    /// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///     .expires_at(at)
    ///     .into_session();
    /// assert_eq!(session.expires_at(), Some(at));
    /// # }
    /// ```
    #[must_use]
    pub fn expires_at(mut self, at: Instant) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Gives the session an expiry `ttl` from now, on tokio's clock: as
    /// [`expires_at`](Self::expires_at)`(Instant::now() + ttl)` (saturating:
    /// a `ttl` past what the clock holds means no expiry).
    ///
    /// See the example on [`expires_at`](Self::expires_at).
    #[must_use]
    pub fn expires_in(mut self, ttl: Duration) -> Self {
        self.expires_at = Instant::now().checked_add(ttl);
        self
    }

    /// The session id.
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The router.
    #[must_use]
    pub fn router(&self) -> RouterId {
        self.router
    }

    /// The router incarnation the session is created against.
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
    /// with a generation unique within the process (see
    /// [`SessionKey`](crate::SessionKey)).
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
    /// so that every process agrees on each session's
    /// [`SessionKey`](crate::SessionKey). The store must never give two
    /// sessions of one id the same generation.
    #[must_use]
    pub fn into_session_with_generation(self, generation: u64) -> Session<P> {
        Session::new(
            self.id,
            generation,
            self.router,
            self.incarnation,
            self.token,
            self.expires_at,
            self.payload,
        )
    }
}

impl<P> fmt::Debug for NewSession<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewSession")
            .field("id", &self.id)
            .field("router", &self.router)
            .field("incarnation", &self.incarnation)
            .field("expires_at", &self.expires_at)
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
