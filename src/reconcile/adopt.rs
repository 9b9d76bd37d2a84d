//! Restart adoption's vocabulary: what a router reports of a session
//! ([`ReportedSession`]), the user's decision on it ([`Adoption`]), and the
//! trait that decides ([`Adopter`], or a closure through [`adopt_fn`]).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use tokio::time::Duration;

use crate::id::{RouterId, SessionId};
use crate::session::{Session, SessionToken};

/// A session as a router reports it when it (re)connects: its id and what
/// an [`Adopter`] needs to decide whether the controller should take it
/// back (the token the controller issued, the identity it was issued to,
/// how long it has left, and any data of your protocol in `data`).
///
/// Only the id matters to the reconciliation; the rest is for the adopter,
/// which receives the whole report of each session the store does not
/// know. The token is a [`SessionToken`]: wiped from memory when dropped.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::{SessionId, reconcile::ReportedSession};
///
/// let reported = ReportedSession::new(SessionId::new(7))
///     .with_token(b"t0k3n".to_vec())
///     .with_owner("alice")
///     .with_expires_in(Duration::from_secs(600))
///     .with_data(42_u32);
/// assert_eq!(reported.owner.as_deref(), Some("alice"));
/// assert!(!reported.is_expired());
/// assert_eq!(reported.data, 42);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ReportedSession<T = ()> {
    /// The session's id.
    pub id: SessionId,
    /// The token the router holds for the session, if it reports one.
    pub token: Option<SessionToken>,
    /// The identity the session belongs to (the client's, as the router
    /// knows it), if it reports one.
    pub owner: Option<String>,
    /// How long the session has left, as the router counts it when it
    /// reports (relative: the router's clock and the controller's need not
    /// agree). `Some(Duration::ZERO)`: expired. `None`: no expiry.
    pub expires_in: Option<Duration>,
    /// Anything else your protocol reports for the session.
    pub data: T,
}

impl ReportedSession<()> {
    /// A reported session with only its id. See the example on
    /// [`ReportedSession`].
    #[must_use]
    pub fn new(id: SessionId) -> Self {
        Self {
            id,
            token: None,
            owner: None,
            expires_in: None,
            data: (),
        }
    }
}

impl<T> ReportedSession<T> {
    /// Sets the token. See the example on [`ReportedSession`].
    #[must_use]
    pub fn with_token(mut self, token: impl Into<SessionToken>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the owner. See the example on [`ReportedSession`].
    #[must_use]
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Sets how long the session has left. See the example on
    /// [`ReportedSession`].
    #[must_use]
    pub fn with_expires_in(mut self, left: Duration) -> Self {
        self.expires_in = Some(left);
        self
    }

    /// Sets the data of your protocol. See the example on
    /// [`ReportedSession`].
    #[must_use]
    pub fn with_data<U>(self, data: U) -> ReportedSession<U> {
        ReportedSession {
            id: self.id,
            token: self.token,
            owner: self.owner,
            expires_in: self.expires_in,
            data,
        }
    }

    /// `true` if the router reports that the session has no time left.
    #[must_use]
    pub fn is_expired(&self) -> bool {
        self.expires_in == Some(Duration::ZERO)
    }
}

impl<T: fmt::Debug> fmt::Debug for ReportedSession<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token's own `Debug` shows its length, never its bytes.
        f.debug_struct("ReportedSession")
            .field("id", &self.id)
            .field("token", &self.token)
            .field("owner", &self.owner)
            .field("expires_in", &self.expires_in)
            .field("data", &self.data)
            .finish()
    }
}

/// An [`Adopter`]'s decision on one reported session.
///
/// # Example
///
/// ```
/// use session_lifecycle::reconcile::Adoption;
///
/// let accepted = Adoption::accept("client-a").token(b"t0k3n".to_vec());
/// assert!(accepted.is_accepted());
/// let refused: Adoption<&str> = Adoption::reject("bad token");
/// assert!(!refused.is_accepted());
/// ```
#[derive(Debug)]
pub enum Adoption<P = ()> {
    /// Adopt the session: create it in the store, under the router's
    /// current incarnation, with this payload and token.
    Accept {
        /// The session's payload.
        payload: P,
        /// The session's token (usually the one the router reported).
        token: Option<SessionToken>,
    },
    /// Do not adopt it: the router is told to drop it.
    Reject {
        /// Why, for the report ([`RejectReason::Refused`](super::RejectReason::Refused)).
        reason: Cow<'static, str>,
    },
}

impl<P> Adoption<P> {
    /// Adopts the session with `payload` and no token. See the example on
    /// [`Adoption`].
    #[must_use]
    pub fn accept(payload: P) -> Self {
        Self::Accept {
            payload,
            token: None,
        }
    }

    /// Sets the token of an accepted session (a rejection stays as it is).
    /// See the example on [`Adoption`].
    #[must_use]
    pub fn token(self, token: impl Into<SessionToken>) -> Self {
        match self {
            Self::Accept { payload, .. } => Self::Accept {
                payload,
                token: Some(token.into()),
            },
            reject @ Self::Reject { .. } => reject,
        }
    }

    /// Refuses the session, saying why. See the example on [`Adoption`].
    #[must_use]
    pub fn reject(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::Reject {
            reason: reason.into(),
        }
    }

    /// `true` for [`Adoption::Accept`].
    #[must_use]
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accept { .. })
    }
}

/// Decides whether a reconnecting router's sessions that the store does
/// not know are adopted: your code, called by
/// [`Reconciler::reconcile_adopting`](crate::Reconciler::reconcile_adopting)
/// once per such session.
///
/// Check what a forged or stale report cannot pass: the token (a signature
/// of the controller over the session id, router and owner; a look-up in
/// your authentication service), the owner, the expiry. A session the
/// controller closed on purpose is unknown to the store too: refuse tokens
/// you revoked, or adopt only while the store may have lost sessions (see
/// [`reconcile_adopting`](crate::Reconciler::reconcile_adopting)).
///
/// The crate never calls it under a lock: it may call back into the store.
/// A panic is contained (the session is rejected with
/// [`RejectReason::Panicked`](super::RejectReason::Panicked)); a decision
/// slower than [`adopt_timeout`](crate::ReconcilerBuilder::adopt_timeout)
/// is a rejection ([`RejectReason::TimedOut`](super::RejectReason::TimedOut)).
/// Up to [`adopt_concurrency`](crate::ReconcilerBuilder::adopt_concurrency)
/// decisions run at once, on the reconciling task.
///
/// For a decision that needs no `.await`, [`adopt_fn`] wraps a closure.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     MemoryStore, Reconciler, RouterId, Session, SessionId, SessionStore,
///     reconcile::{Adopter, Adoption, RejectReason, ReportedSession},
/// };
///
/// /// Adopts sessions whose token its signing key vouches for.
/// struct Tokens;
///
/// impl Adopter<String> for Tokens {
///     type Data = ();
///
///     async fn adopt(&self, router: RouterId, reported: ReportedSession) -> Adoption<String> {
///         let Some(owner) = reported.owner else {
///             return Adoption::reject("no owner");
///         };
///         let expected = format!("{router}/{}/{owner}", reported.id);
///         match reported.token {
///             _ if reported.expires_in.is_some_and(|left| left.is_zero()) => {
///                 Adoption::reject("expired")
///             }
///             Some(token) if token.as_bytes() == expected.as_bytes() => {
///                 Adoption::Accept { payload: owner, token: Some(token) }
///             }
///             _ => Adoption::reject("bad token"),
///         }
///     }
///
///     fn adopted(&self, _session: &Session<String>) {
///         // Watch it in the liveness monitor, attach its resources, ...
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The controller restarted: a fresh store, the router registered again.
/// let store = Arc::new(MemoryStore::<String>::default());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
///
/// // Its Hello reports two sessions; one token is forged.
/// let good = ReportedSession::new(SessionId::new(1))
///     .with_owner("alice")
///     .with_token(b"router-1/session-1/alice".to_vec());
/// let forged = ReportedSession::new(SessionId::new(2))
///     .with_owner("mallory")
///     .with_token(b"let me in".to_vec());
/// let report = reconciler
///     .reconcile_adopting(router, incarnation, [good, forged], &Tokens)
///     .await?;
///
/// assert_eq!(report.adopted, vec![SessionId::new(1)]);
/// assert_eq!(report.drop, vec![SessionId::new(2)]);
/// assert_eq!(report.rejected[0].reason, RejectReason::Refused("bad token".into()));
/// let adopted = store.get(SessionId::new(1)).await?.expect("adopted");
/// assert_eq!(adopted.incarnation(), incarnation);
/// assert_eq!(adopted.payload(), "alice");
/// # Ok(())
/// # }
/// ```
pub trait Adopter<P>: Send + Sync {
    /// What your protocol reports for a session beyond the id, token, owner
    /// and expiry ([`ReportedSession::data`]); `()` if nothing.
    type Data: Send;

    /// Decides on `reported`, a session `router` holds and the store does
    /// not know. See the example on [`Adopter`].
    fn adopt(
        &self,
        router: RouterId,
        reported: ReportedSession<Self::Data>,
    ) -> impl Future<Output = Adoption<P>> + Send;

    /// Called with each session once it is adopted (created in the store),
    /// outside any lock: the place to watch it in the
    /// [`LivenessMonitor`](crate::LivenessMonitor), attach its
    /// [`Resource`](crate::Resource)s, index it in your own maps. A session
    /// reported with [`expires_in`](ReportedSession::expires_in) is created
    /// with that expiry (from now): track it in your
    /// [`ExpiryMonitor`](crate::ExpiryMonitor) here
    /// (`lifecycle.expiry().track(session)`), or it never expires. Does
    /// nothing by default. A panic is contained (logged; the session stays
    /// adopted).
    fn adopted(&self, session: &Session<P>) {
        let _ = session;
    }
}

/// An [`Adopter`] made of a closure: [`adopt_fn`].
pub struct AdoptFn<F, T> {
    decide: F,
    _data: PhantomData<fn(T)>,
}

impl<F, T> fmt::Debug for AdoptFn<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdoptFn").finish_non_exhaustive()
    }
}

/// An [`Adopter`] that decides with `decide`, a closure that needs no
/// `.await` (and does nothing more once a session is adopted).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     MemoryStore, Reconciler, RouterId, SessionId, SessionStore,
///     reconcile::{Adoption, ReportedSession, adopt_fn},
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
///
/// // Adopts what has not expired.
/// let unexpired = adopt_fn(|_router, reported: ReportedSession| {
///     if reported.is_expired() { Adoption::reject("expired") } else { Adoption::accept(()) }
/// });
/// let reported = [ReportedSession::new(SessionId::new(1))];
/// let report = reconciler.reconcile_adopting(router, incarnation, reported, &unexpired).await?;
/// assert_eq!(report.summary.adopted, 1);
/// # Ok(())
/// # }
/// ```
pub fn adopt_fn<T, P, F>(decide: F) -> AdoptFn<F, T>
where
    F: Fn(RouterId, ReportedSession<T>) -> Adoption<P> + Send + Sync,
{
    AdoptFn {
        decide,
        _data: PhantomData,
    }
}

impl<T, P, F> Adopter<P> for AdoptFn<F, T>
where
    T: Send,
    P: Send,
    F: Fn(RouterId, ReportedSession<T>) -> Adoption<P> + Send + Sync,
{
    type Data = T;

    fn adopt(
        &self,
        router: RouterId,
        reported: ReportedSession<T>,
    ) -> impl Future<Output = Adoption<P>> + Send {
        std::future::ready((self.decide)(router, reported))
    }
}
