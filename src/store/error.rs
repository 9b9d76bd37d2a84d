//! Errors of the store operations, one small enum per operation.

use std::fmt;
use std::sync::Arc;

use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::NewSession;

/// A failure of a store's backend (a remote store unreachable, a timeout).
/// [`MemoryStore`](crate::MemoryStore) never returns it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("store backend failed: {0}")]
pub struct BackendError(Arc<dyn std::error::Error + Send + Sync>);

impl BackendError {
    /// Wraps the backend's own error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
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
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BackendError {}

/// Error of [`SessionStore::create`](crate::SessionStore::create): why, and
/// the rejected session description, handed back unchanged.
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

    /// Returns the rejected session description.
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
    /// The router's last incarnation was already deleted.
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
