//! Closing sessions on the controller's side, shared by every path that
//! does it (force-close, reaping, reconciliation, grace expiry, sweeps).
//!
//! Every step acts on the sessions it was given, by handle or by
//! [`SessionKey`], never on whatever holds their ids when it runs: an id
//! reused by a new session while a cleanup is under way is left alone.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use crate::contain::drop_each_logged;
use crate::id::SessionKey;
use crate::reclaim::ReclaimQueue;
use crate::session::{CloseFrom, CloseReason, Session};
use crate::store::{SessionError, SessionStore};

/// Closes each session of `sessions` that `from` allows with `reason`, its
/// resources through `queue` if there is one (critical ones of every
/// session first), inline otherwise. Returns the keys of the sessions this
/// call closed, in the given order: a session another caller closed (or
/// marked) first is left to that caller.
pub(crate) async fn close_all<P>(
    queue: Option<&ReclaimQueue>,
    sessions: &[Session<P>],
    reason: CloseReason,
    from: CloseFrom,
) -> Vec<SessionKey>
where
    P: Send + Sync + 'static,
{
    match queue {
        Some(queue) => queue.close_sessions(sessions, reason, from).await,
        // A close won here completes before it returns.
        None => sessions
            .iter()
            .filter(|session| session.close_from(reason, from))
            .map(Session::key)
            .collect(),
    }
}

/// [`close_all`], then removes from `store` each session this call closed
/// (by key: a session that reused an id meanwhile stays). Returns the keys
/// of the sessions this call closed.
pub(crate) async fn close_and_remove<S: SessionStore>(
    store: &S,
    queue: Option<&ReclaimQueue>,
    sessions: &[Session<S::Payload>],
    reason: CloseReason,
    from: CloseFrom,
) -> Vec<SessionKey> {
    let closed = close_all(queue, sessions, reason, from).await;
    remove_all(store, &closed).await;
    closed
}

/// Removes from `store` each closed session of `closed` (by key).
/// Failures are logged, as in [`close_and_remove`].
pub(crate) async fn remove_all<S: SessionStore>(store: &S, closed: &[SessionKey]) {
    for &key in closed {
        remove_closed(store, key).await;
    }
}

/// Removes the closed session `key` from `store`. Failures are logged: the
/// session is closed already, and the audit sweeper removes what is left.
/// The store is user code (a wrapping store): a panic in it is contained
/// and logged too, and the removals that follow still run; so is one of
/// the removed handle's payload `Drop`.
async fn remove_closed<S: SessionStore>(store: &S, key: SessionKey) {
    let removed = AssertUnwindSafe(store.remove_exact(key))
        .catch_unwind()
        .await;
    match removed {
        Ok(Ok(session)) => drop_each_logged([session], "a closed session's removal"),
        // Gone already, or the id is another session's now: nothing to do.
        Ok(Err(SessionError::UnknownSession(_))) => {}
        Ok(Err(error)) => {
            tracing::warn!(session = %key, %error, "closed session left in the store: backend failed");
        }
        Err(panic) => {
            crate::contain::dispose(panic);
            tracing::error!(session = %key, "the store panicked removing a closed session; contained");
        }
    }
}
