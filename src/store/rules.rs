//! The rules every store applies to a router's status, shared by the
//! in-memory and the etcd store so both answer alike.

use super::error::{CreateErrorKind, FinishError};
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
