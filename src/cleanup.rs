//! Closing sessions on the controller's side, shared by every path that
//! does it (force-close, reaping, reconciliation, grace expiry, sweeps).

use crate::id::SessionId;
use crate::reclaim::ReclaimQueue;
use crate::session::{CloseFrom, CloseReason, Session};
use crate::store::SessionStore;

/// Closes each session of `sessions` that `from` allows with `reason`, its
/// resources through `queue` if there is one (critical ones of every
/// session first), inline otherwise. Returns the ids this call closed, in
/// the given order: a session another caller closed (or marked) first is
/// left to that caller.
pub(crate) async fn close_all<P>(
    queue: Option<&ReclaimQueue>,
    sessions: &[Session<P>],
    reason: CloseReason,
    from: CloseFrom,
) -> Vec<SessionId>
where
    P: Send + Sync + 'static,
{
    match queue {
        Some(queue) => queue.close_sessions(sessions, reason, from).await,
        // A close won here completes before it returns.
        None => sessions
            .iter()
            .filter(|session| session.close_from(reason, from))
            .map(Session::id)
            .collect(),
    }
}

/// Removes `session` from `store`, unless the store's entry for its id is
/// another session (the id was reused). Failures are logged: the session is
/// closed already, and the audit sweeper removes what is left.
pub(crate) async fn remove_if_same<S: SessionStore>(store: &S, session: &Session<S::Payload>) {
    let id = session.id();
    match store.get(id).await {
        Ok(Some(held)) if held.same(session) => {
            if let Err(error) = store.remove(id).await {
                tracing::debug!(%id, %error, "closed session already removed");
            }
        }
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(%id, %error, "closed session left in the store: backend failed");
        }
    }
}
