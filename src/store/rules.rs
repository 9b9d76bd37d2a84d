//! The rules every store applies to a router's status, shared by the
//! in-memory and the etcd store so both answer alike.

use super::error::{CreateErrorKind, FenceError, FinishError};
use super::report::RouterStatus;
use crate::id::{Incarnation, RouterId};

/// Whether a session may be created in `requested`.
pub(super) fn admits(
    status: RouterStatus,
    router: RouterId,
    requested: Incarnation,
) -> Result<(), CreateErrorKind> {
    match status {
        RouterStatus::Live(live) if live == requested => Ok(()),
        RouterStatus::Fenced(fenced) if fenced == requested => Err(CreateErrorKind::Fenced {
            router,
            incarnation: fenced,
        }),
        RouterStatus::Deleted(deleted) if deleted == requested => {
            Err(CreateErrorKind::RouterDeleted {
                router,
                incarnation: deleted,
            })
        }
        RouterStatus::Live(live) => Err(CreateErrorKind::StaleIncarnation {
            router,
            requested,
            live: Some(live),
        }),
        RouterStatus::Fenced(_) | RouterStatus::Deleted(_) => {
            Err(CreateErrorKind::StaleIncarnation {
                router,
                requested,
                live: None,
            })
        }
    }
}

/// Whether a router in `status` holds sessions of `incarnation`: live or
/// fenced in it.
pub(super) fn holds(status: RouterStatus, incarnation: Incarnation) -> bool {
    matches!(status,
        RouterStatus::Live(current) | RouterStatus::Fenced(current) if current == incarnation)
}

/// Whether `finish(router, requested)` may go on with the router in `status`.
pub(super) fn check_finishable(
    router: RouterId,
    requested: Incarnation,
    status: RouterStatus,
) -> Result<(), FinishError> {
    match status {
        RouterStatus::Fenced(current) if current == requested => Ok(()),
        RouterStatus::Deleted(current) if current == requested => {
            Err(FinishError::AlreadyDeleted {
                router,
                incarnation: current,
            })
        }
        RouterStatus::Live(current) if current == requested => Err(FinishError::NotFenced {
            router,
            incarnation: current,
        }),
        other => Err(FinishError::IncarnationMismatch {
            router,
            requested,
            current: other.incarnation(),
        }),
    }
}

/// What fencing a router in `status` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FenceStep {
    /// The router is live in this incarnation: fence it.
    Fence(Incarnation),
    /// Fenced already (an interrupted deletion): resume it.
    Resume(Incarnation),
}

/// What `fence` (with `expected: None`) or `fence_incarnation` (with the
/// incarnation to delete) does to a router in `status`.
///
/// An expected incarnation older than the router's is deleted already: a
/// delayed or duplicated request never fences a newer life of the router.
pub(super) fn fence_step(
    router: RouterId,
    status: RouterStatus,
    expected: Option<Incarnation>,
) -> Result<FenceStep, FenceError> {
    let current = status.incarnation();
    match expected {
        Some(expected) if expected < current => {
            return Err(FenceError::AlreadyDeleted {
                router,
                incarnation: expected,
            });
        }
        Some(expected) if expected > current => {
            return Err(FenceError::IncarnationMismatch {
                router,
                requested: expected,
                current,
            });
        }
        _ => {}
    }
    match status {
        RouterStatus::Live(incarnation) => Ok(FenceStep::Fence(incarnation)),
        RouterStatus::Fenced(incarnation) => Ok(FenceStep::Resume(incarnation)),
        RouterStatus::Deleted(incarnation) => Err(FenceError::AlreadyDeleted {
            router,
            incarnation,
        }),
    }
}
