//! Errors of the store operations, one small enum per operation.

use std::fmt;
use std::sync::Arc;

use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::NewSession;

/// A failure of a store's backend (a remote store unreachable, a timeout,
/// a write whose outcome is unknown). [`MemoryStore`](crate::MemoryStore)
/// never returns it.
///
/// Its [`kind`](Self::kind) says what the caller may do next; its
/// [`source`](std::error::Error::source) is the backend's own error (for
/// the `etcd` feature's `EtcdStore`, an `EtcdError`, whose own source is
/// the client's error).
///
/// # Example
///
/// ```
/// use std::error::Error as _;
/// use session_lifecycle::{store::BackendError, store::BackendErrorKind, store::SessionError};
///
/// // A remote store wraps its client's error; every store error converts from it.
/// let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "etcd did not answer");
/// let error = SessionError::from(BackendError::with_kind(BackendErrorKind::Unavailable, timeout));
/// assert!(matches!(&error, SessionError::Backend(e) if e.kind() == BackendErrorKind::Unavailable));
/// assert_eq!(error.to_string(), "store backend failed: unavailable");
/// assert_eq!(error.source().unwrap().to_string(), "etcd did not answer");
/// ```
#[derive(Clone)]
pub struct BackendError {
    /// One thin pointer: a `Result` carrying a store error stays as small as
    /// the success value allows (the heartbeat's hot path returns one).
    inner: Arc<BackendInner>,
}

struct BackendInner {
    kind: BackendErrorKind,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendError")
            .field("kind", &self.inner.kind)
            .field("error", &self.inner.error)
            .finish()
    }
}

/// What a [`BackendError`] means for the caller.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// # Example
///
/// ```
/// use session_lifecycle::store::BackendErrorKind;
///
/// /// Whether the same call may simply be made again.
/// fn call_again(kind: BackendErrorKind) -> bool {
///     match kind {
///         BackendErrorKind::Unavailable | BackendErrorKind::Contention => true,
///         BackendErrorKind::Pending => false, // it will land by itself
///         BackendErrorKind::OutcomeUnknown => false, // look first
///         _ => false,
///     }
/// }
///
/// assert!(call_again(BackendErrorKind::Unavailable));
/// assert_eq!(BackendErrorKind::OutcomeUnknown.to_string(), "outcome unknown");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The backend could not be reached, or did not answer within the
    /// store's retry deadline. A read changed nothing. A write the store
    /// may repeat (a fence, a finish, a repair) may or may not have
    /// applied, and calling it again is safe; a create or a registration
    /// that fails with this kind did not apply.
    Unavailable,
    /// A write is accepted and retried in the background until the backend
    /// takes it: it will land. Waiting again (a flush) tells when.
    Pending,
    /// A write that must never apply twice (a create, a registration) was
    /// sent, and whether it applied is unknown: look (get the session, read
    /// the router's status) before trying again.
    OutcomeUnknown,
    /// The request is larger than the backend accepts: nothing applied.
    TooLarge,
    /// The backend holds data this store cannot read (written by another
    /// version, another payload type, or by hand).
    Corrupt,
    /// Other writers kept changing what this call had to change: nothing
    /// applied; calling again is safe.
    Contention,
    /// The backend refused the request as such (a limit of its
    /// configuration, an invalid argument): calling again fails the same.
    Refused,
    /// Any other failure.
    Other,
}

impl BackendErrorKind {
    /// A short lowercase name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Pending => "write pending",
            Self::OutcomeUnknown => "outcome unknown",
            Self::TooLarge => "too large",
            Self::Corrupt => "unreadable data",
            Self::Contention => "contention",
            Self::Refused => "refused",
            Self::Other => "failed",
        }
    }
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BackendError {
    /// Wraps the backend's own error, of kind [`BackendErrorKind::Other`].
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::with_kind(BackendErrorKind::Other, error)
    }

    /// Wraps the backend's own error, saying what it means for the caller.
    pub fn with_kind(
        kind: BackendErrorKind,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(BackendInner {
                kind,
                error: Box::new(error),
            }),
        }
    }

    /// What the failure means for the caller.
    #[must_use]
    pub fn kind(&self) -> BackendErrorKind {
        self.inner.kind
    }

    /// The backend's own error (also the [`source`](std::error::Error::source)),
    /// to downcast to the backend's error type.
    #[must_use]
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.inner.error
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is the source, not repeated here.
        write!(f, "store backend failed: {}", self.inner.kind)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.inner.error)
    }
}

/// Error of [`SessionStore::register_router`](crate::SessionStore::register_router).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The router is registered and live; it keeps its incarnation.
    #[error("{router} is already registered as {incarnation}")]
    AlreadyRegistered {
        /// The router.
        router: RouterId,
        /// Its current, live incarnation.
        incarnation: Incarnation,
    },
    /// The router is being deleted; register it again once the deletion
    /// finished.
    #[error("{router} ({incarnation}) is being deleted")]
    Deleting {
        /// The router.
        router: RouterId,
        /// The incarnation being deleted.
        incarnation: Incarnation,
    },
    /// The store's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Why [`SessionStore::create`](crate::SessionStore::create) rejected a session.
/// See the example on [`CreateError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateErrorKind {
    /// The store knows no router with this id.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The session names an incarnation that is not the router's live one.
    #[error("{router} is not live in {requested}")]
    StaleIncarnation {
        /// The router.
        router: RouterId,
        /// The incarnation the session was created against.
        requested: Incarnation,
        /// The router's live incarnation, if it has one.
        live: Option<Incarnation>,
    },
    /// The router is fenced: its deletion has started.
    #[error("{router} ({incarnation}) is fenced for deletion")]
    Fenced {
        /// The router.
        router: RouterId,
        /// The fenced incarnation.
        incarnation: Incarnation,
    },
    /// The router incarnation was deleted.
    #[error("{router} ({incarnation}) was deleted")]
    RouterDeleted {
        /// The router.
        router: RouterId,
        /// The deleted incarnation.
        incarnation: Incarnation,
    },
    /// A session with this id already exists.
    #[error("{0} already exists")]
    DuplicateSession(SessionId),
    /// The store's backend failed.
    #[error(transparent)]
    Backend(BackendError),
}

impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for BackendError {}

/// Error of [`SessionStore::create`](crate::SessionStore::create): why, and
/// the rejected session description, handed back unchanged.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     store::CreateErrorKind, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.fence(router).await?;
///
/// let spec =
///     NewSession::new(SessionId::new(1), router, incarnation).token(b"t0k3n".to_vec());
/// let error = store.create(spec).await.unwrap_err();
/// assert!(matches!(error.kind(), CreateErrorKind::Fenced { .. }));
/// assert_eq!(
///     error.to_string(),
///     "session not created: router-1 (incarnation-1) is fenced for deletion"
/// );
/// // The description, token included, comes back to place the client elsewhere.
/// let spec = error.into_spec();
/// assert_eq!(spec.id(), SessionId::new(1));
/// # Ok(())
/// # }
/// ```
#[derive(thiserror::Error)]
#[error("session not created: {kind}")]
pub struct CreateError<P> {
    kind: CreateErrorKind,
    spec: NewSession<P>,
}

impl<P> CreateError<P> {
    /// Builds the error; for store implementations.
    pub fn new(kind: CreateErrorKind, spec: NewSession<P>) -> Self {
        Self { kind, spec }
    }

    /// Why the session was rejected.
    #[must_use]
    pub fn kind(&self) -> &CreateErrorKind {
        &self.kind
    }

    /// Returns the rejected session description. See the example on [`CreateError`].
    pub fn into_spec(self) -> NewSession<P> {
        self.spec
    }
}

impl<P> fmt::Debug for CreateError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateError")
            .field("kind", &self.kind)
            .field("spec", &self.spec)
            .finish()
    }
}

/// Error of [`SessionStore::close`](crate::SessionStore::close) and
/// [`SessionStore::remove`](crate::SessionStore::remove).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The store holds no session with this id.
    #[error("{0} is not in the store")]
    UnknownSession(SessionId),
    /// The store's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Error of the router look-ups: [`SessionStore::sessions`](crate::SessionStore::sessions),
/// [`SessionStore::count`](crate::SessionStore::count) and
/// [`SessionStore::router_status`](crate::SessionStore::router_status).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// The store knows no router with this id.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The store's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Error of [`SessionStore::fence`](crate::SessionStore::fence).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// The store knows no router with this id.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The router's last incarnation was already deleted (or, for
    /// [`fence_incarnation`](crate::SessionStore::fence_incarnation), the
    /// incarnation asked for is older than the router's: deleted before).
    #[error("{router} ({incarnation}) was already deleted")]
    AlreadyDeleted {
        /// The router.
        router: RouterId,
        /// The deleted incarnation.
        incarnation: Incarnation,
    },
    /// [`fence_incarnation`](crate::SessionStore::fence_incarnation) asked
    /// for an incarnation newer than any the router has had: nothing was
    /// fenced.
    #[error("{router} is in {current}, not {requested}")]
    IncarnationMismatch {
        /// The router.
        router: RouterId,
        /// The incarnation asked for.
        requested: Incarnation,
        /// The router's incarnation.
        current: Incarnation,
    },
    /// The store's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Error of [`SessionStore::finish`](crate::SessionStore::finish).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FinishError {
    /// The store knows no router with this id.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The router is live: only a fenced router can be finished.
    #[error("{router} ({incarnation}) is not fenced")]
    NotFenced {
        /// The router.
        router: RouterId,
        /// Its live incarnation.
        incarnation: Incarnation,
    },
    /// The router's current incarnation is not the one to finish.
    #[error("{router} is in {current}, not {requested}")]
    IncarnationMismatch {
        /// The router.
        router: RouterId,
        /// The incarnation asked for.
        requested: Incarnation,
        /// The router's current incarnation.
        current: Incarnation,
    },
    /// The incarnation was already deleted.
    #[error("{router} ({incarnation}) was already deleted")]
    AlreadyDeleted {
        /// The router.
        router: RouterId,
        /// The deleted incarnation.
        incarnation: Incarnation,
    },
    /// The store's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
