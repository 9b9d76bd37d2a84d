//! [`ReconcileReport`], the outcome of a reconciliation, what an adoption
//! refused ([`Rejection`], [`RejectReason`]), and [`ReconcileError`].

use std::borrow::Cow;

use crate::events::ReconcileSummary;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::store::{BackendError, CreateErrorKind, RouterError, RouterStatus};

/// The outcome of [`Reconciler::reconcile`](crate::Reconciler::reconcile)
/// and [`Reconciler::reconcile_adopting`](crate::Reconciler::reconcile_adopting).
/// See the examples on [`Reconciler`](crate::Reconciler) and
/// [`Adopter`](super::Adopter).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// The counts.
    pub summary: ReconcileSummary,
    /// Sessions the router should drop: reported, but unknown to the
    /// controller (and not adopted), closed, or of another router or
    /// incarnation. Sorted.
    pub drop: Vec<SessionId>,
    /// Sessions the router no longer holds, closed on the controller by this
    /// call. Sorted.
    pub closed: Vec<SessionId>,
    /// Unknown sessions adopted: created in the store under the router's
    /// incarnation; the router keeps them. Sorted; empty for a plain
    /// `reconcile`.
    pub adopted: Vec<SessionId>,
    /// Unknown sessions offered for adoption and not adopted, with why;
    /// each is in [`drop`](Self::drop) too. Sorted by id; empty for a plain
    /// `reconcile`.
    pub rejected: Vec<Rejection>,
}

/// A reported session an adopting reconciliation did not adopt: the router
/// is told to drop it. See the example on [`Adopter`](super::Adopter).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejection {
    /// The session.
    pub id: SessionId,
    /// Why it was not adopted.
    pub reason: RejectReason,
}

/// Why a reported session was not adopted.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The adopter refused it, for this reason
    /// ([`Adoption::Reject`](super::Adoption::Reject)).
    #[error("refused: {0}")]
    Refused(Cow<'static, str>),
    /// The adopter panicked while deciding (the panic is contained).
    #[error("the adopter panicked")]
    Panicked,
    /// The adopter did not decide within
    /// [`adopt_timeout`](crate::ReconcilerBuilder::adopt_timeout).
    #[error("the adopter did not decide in time")]
    TimedOut,
    /// The adopter accepted it, and the store refused to create it: the id
    /// was taken meanwhile ([`CreateErrorKind::DuplicateSession`]), or the
    /// router was fenced, deleted or registered again meanwhile.
    #[error("not created: {0}")]
    NotCreated(CreateErrorKind),
}

impl RejectReason {
    /// `true` if the adopter itself refused the session (not its panic, its
    /// timeout, or the store).
    #[must_use]
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused(_))
    }
}

/// Why a reconciliation or a grace period was refused.
///
/// It is `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The store does not know the router.
    #[error("{0} is not registered")]
    UnknownRouter(RouterId),
    /// The router reported from an incarnation that is not its live one: a
    /// stale report (the router was deleted and registered again since, or
    /// the report is older than its deletion). Nothing was changed.
    #[error("{router} reported {reported}, but the store has it {current:?}")]
    StaleIncarnation {
        /// The router.
        router: RouterId,
        /// The incarnation the report names.
        reported: Incarnation,
        /// The router's status in the store.
        current: RouterStatus,
    },
    /// The router's deletion has started (or finished); its sessions belong
    /// to the deleter.
    #[error("{router} is being deleted or deleted ({status:?})")]
    NotLive {
        /// The router.
        router: RouterId,
        /// Its status in the store.
        status: RouterStatus,
    },
    /// No tokio runtime to run the grace timer on: called outside one, on
    /// one built without its time driver (`enable_time`), or on one
    /// shutting down (which dropped the timer's task unrun).
    #[error("no tokio runtime: router_disconnected must be called within one")]
    NoRuntime,
    /// The reconciler was shut down.
    #[error("the reconciler is shut down")]
    ShutDown,
    /// The store's backend failed.
    #[error(transparent)]
    Store(#[from] BackendError),
}

impl From<RouterError> for ReconcileError {
    fn from(error: RouterError) -> Self {
        match error {
            RouterError::UnknownRouter(router) => Self::UnknownRouter(router),
            RouterError::Backend(error) => Self::Store(error),
        }
    }
}
