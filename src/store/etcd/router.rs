//! Router and session operations: register, close, remove, fence.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use tokio::time::Instant;

use super::error::{refusal, unsent};
use super::keys;
use super::txn::{CONTENTION, live_in, revision_of, router_status, txn_get};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, Session};
use crate::store::error::{FenceError, RegisterError, SessionError};
use crate::store::report::{FenceSnapshot, RouterStatus};
use crate::store::rules::{FenceStep, fence_step};

impl<P: EtcdPayload> EtcdStore<P> {
    /// Registers the router: a put of `live` guarded on the state it
    /// replaces (first: no key at all), whose failure branch reads the
    /// state. It is sent again only while a look at etcd shows it did not
    /// land (the state is still the one guarded on), so it never applies
    /// twice; when the look cannot tell, the answer is
    /// [`EtcdError::OutcomeUnknown`].
    pub(super) async fn register(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        let shared = &self.shared;
        let key = shared.keys.router(router);
        let give_up = Instant::now() + shared.retry.deadline();
        let mut delays = shared.retry.delays();
        // The state the put is guarded on (`None`: no key).
        let mut replaces: Option<RouterStatus> = None;
        // The failure of an attempt that may have landed.
        let mut uncertain: Option<etcd_client::Error> = None;
        let mut contention = 0;
        while contention < CONTENTION {
            let guard = match replaces {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Some(status) => {
                    Compare::value(key.clone(), CompareOp::Equal, keys::router_value(status))
                }
            };
            let txn = Txn::new()
                .when([guard])
                .and_then([TxnOp::put(key.clone(), keys::LIVE, None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let status = match shared.kv().txn(txn).await {
                Ok(response) if response.succeeded() => {
                    return keys::incarnation(revision_of(&response)).ok_or_else(|| {
                        EtcdError::corrupt(&key, "no revision in the answer").into()
                    });
                }
                Ok(response) => {
                    contention += 1;
                    txn_get(&response.op_responses(), 0)
                        .map(router_status)
                        .transpose()?
                }
                Err(error) => {
                    let sent = !unsent(&error);
                    let (refused, late) = (refusal(&error).is_some(), Instant::now() >= give_up);
                    if refused || late {
                        let operation = "register router";
                        return Err(if sent && !refused || uncertain.is_some() {
                            EtcdError::OutcomeUnknown {
                                operation,
                                source: error,
                            }
                        } else {
                            EtcdError::Request {
                                operation,
                                source: error,
                            }
                        }
                        .into());
                    }
                    if sent {
                        uncertain = Some(error);
                    }
                    tokio::time::sleep(delays.next_delay()).await;
                    // Look: did it land?
                    match shared.status(router).await {
                        Ok(status) => status,
                        Err(error) => {
                            return Err(match uncertain {
                                Some(source) => EtcdError::OutcomeUnknown {
                                    operation: "register router",
                                    source,
                                },
                                None => error,
                            }
                            .into());
                        }
                    }
                }
            };
            replaces = match status {
                Some(RouterStatus::Live(_) | RouterStatus::Fenced(_)) if uncertain.is_some() => {
                    // Live now: this call's put, or another controller's.
                    return Err(EtcdError::OutcomeUnknown {
                        operation: "register router",
                        source: uncertain.unwrap_or_else(|| {
                            etcd_client::Error::EndpointError("answer lost".into())
                        }),
                    }
                    .into());
                }
                Some(RouterStatus::Live(incarnation)) => {
                    return Err(RegisterError::AlreadyRegistered {
                        router,
                        incarnation,
                    });
                }
                Some(RouterStatus::Fenced(incarnation)) => {
                    return Err(RegisterError::Deleting {
                        router,
                        incarnation,
                    });
                }
                status => status,
            };
        }
        Err(EtcdError::contention(&key).into())
    }

    /// Closes the handle of `id` (only if it is the life `key` names) and
    /// deletes its record. A close (`settle`) that finds the session
    /// closing by another caller, its release still running, waits for
    /// that close to complete first; a removal leaves the record to a task
    /// that deletes it then.
    pub(super) async fn close_session(
        &self,
        id: SessionId,
        key: Option<SessionKey>,
        reason: CloseReason,
        settle: bool,
    ) -> Result<(Session<P>, CloseOutcome, bool), SessionError> {
        let session = self
            .shared
            .handle(id)
            .await?
            .filter(|session| key.is_none_or(|key| session.key() == key))
            .ok_or(SessionError::UnknownSession(id))?;
        // The close is queued before the removal: other controllers see
        // the reason first.
        let outcome = session.close(reason);
        if !outcome.won() && !session.is_close_complete() {
            // Closed by another caller of this controller whose release
            // still runs (a client's slow resource, queued releases): the
            // record stays until that close completes, or a deletion
            // resumed meanwhile (another deleter, or the run's runtime
            // gone) would not list the session, and would return before
            // its release ran (I1).
            match tokio::runtime::Handle::try_current() {
                // A removal does not wait for it (the crate's own pieces
                // remove sessions whose releases a paused reclaim queue
                // may hold while the piece shuts down): the record goes in
                // a task of its own once the close completes.
                Ok(runtime) if !settle => {
                    let shared = Arc::clone(&self.shared);
                    let closing = session.clone();
                    drop(runtime.spawn(async move {
                        closing.closed().await;
                        if let Err(error) = shared.remove_record(&closing).await {
                            tracing::warn!(session = %closing.id(), %error,
                                "a removed session's record could not be deleted; the audit finds it");
                        }
                    }));
                    return Ok((session, outcome, true));
                }
                _ => {
                    session.closed().await;
                }
            }
        }
        let removed = self.shared.remove_record(&session).await?;
        Ok((session, outcome, removed))
    }

    pub(super) async fn remove_session(
        &self,
        id: SessionId,
        key: Option<SessionKey>,
    ) -> Result<Session<P>, SessionError> {
        match self
            .close_session(id, key, CloseReason::Reclaimed, false)
            .await?
        {
            (session, _, true) => Ok(session),
            // Removed by someone else first (this controller had not heard).
            (_, _, false) => Err(SessionError::UnknownSession(id)),
        }
    }

    pub(super) async fn fence_router(
        &self,
        router: RouterId,
        expected: Option<Incarnation>,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        let key = self.shared.keys.router(router);
        for _ in 0..CONTENTION {
            let status = self
                .shared
                .status(router)
                .await?
                .ok_or(FenceError::UnknownRouter(router))?;
            let (incarnation, newly_fenced) = match fence_step(router, status, expected)? {
                FenceStep::Resume(incarnation) => (incarnation, false),
                FenceStep::Fence(incarnation) => {
                    let txn = Txn::new()
                        .when(live_in(&key, incarnation))
                        .and_then([TxnOp::put(
                            key.clone(),
                            keys::router_value(RouterStatus::Fenced(incarnation)),
                            None,
                        )]);
                    // Guarded on the router live in the incarnation: safe
                    // to repeat (an attempt whose answer was lost and that
                    // landed makes the repeat find it fenced: resumed).
                    let response = self.shared.txn("fence router", txn).await?;
                    if !response.succeeded() {
                        continue; // fenced or re-registered meanwhile: look again
                    }
                    (incarnation, true)
                }
            };
            // Read after the fence: every session created before it is in
            // the listing, unless closed and removed since (I2). A call that
            // comes late (the incarnation finished and the router
            // registered again meanwhile) lists the new incarnation's
            // records too (record keys carry no incarnation): only the
            // fenced incarnation's are its snapshot.
            let mut sessions = self.shared.router_sessions(router).await?;
            sessions.retain(|session| session.incarnation() == incarnation);
            return Ok(FenceSnapshot {
                router,
                incarnation,
                newly_fenced,
                sessions,
            });
        }
        Err(EtcdError::contention(&key).into())
    }
}
