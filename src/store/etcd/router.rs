//! Router and session operations: register, create, close, remove, fence.

use dashmap::mapref::entry::Entry;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::keys;
use super::shared::Cached;
use super::txn::{CONTENTION, generation, live_in, revision_of, router_status, txn_get};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session};
use crate::store::error::{
    BackendError, CreateError, CreateErrorKind, FenceError, RegisterError, SessionError,
};
use crate::store::report::{FenceSnapshot, RouterStatus};
use crate::store::rules::{FenceStep, admits, fence_step};

impl<P: EtcdPayload> EtcdStore<P> {
    pub(super) async fn register(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        let key = self.shared.keys.router(router);
        for _ in 0..CONTENTION {
            let status = self.shared.status(router).await?;
            let guard = match status {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
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
                Some(RouterStatus::Deleted(incarnation)) => Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    keys::router_value(RouterStatus::Deleted(incarnation)),
                ),
            };
            let txn =
                Txn::new()
                    .when([guard])
                    .and_then([TxnOp::put(key.clone(), keys::LIVE, None)]);
            let response = self
                .shared
                .kv()
                .txn(txn)
                .await
                .map_err(EtcdError::request("register router"))?;
            if response.succeeded() {
                return keys::incarnation(revision_of(&response))
                    .ok_or_else(|| EtcdError::corrupt(&key, "no revision in the answer").into());
            }
        }
        Err(EtcdError::Contention {
            key: String::from_utf8_lossy(&key).into_owned(),
        }
        .into())
    }

    pub(super) async fn create_session(
        &self,
        spec: NewSession<P>,
    ) -> Result<Session<P>, CreateError<P>> {
        let shared = &self.shared;
        let (router, id, incarnation) = (spec.router(), spec.id(), spec.incarnation());
        let mut payload = Vec::new();
        spec.payload_ref().encode(&mut payload);
        let value = keys::encode_open(incarnation, spec.token_bytes(), &payload);
        if value.len() > shared.max_record {
            let error = EtcdError::TooLarge {
                bytes: value.len(),
                limit: shared.max_record,
            };
            return Err(CreateError::new(backend_kind(error), spec));
        }
        let router_key = shared.keys.router(router);
        let pointer = shared.keys.pointer(id);
        let record = shared.keys.record(router, id);
        // A create is a load too: what changes the record before the handle
        // is cached must not be missed.
        let _loads = shared.begin_loads();
        let txn = Txn::new()
            .when({
                let [live, at] = live_in(&router_key, incarnation);
                [
                    live,
                    at,
                    Compare::create_revision(pointer.clone(), CompareOp::Equal, 0),
                ]
            })
            .and_then([
                TxnOp::put(pointer.clone(), router.get().to_be_bytes(), None),
                TxnOp::put(record, value, None),
            ])
            .or_else([TxnOp::get(router_key, None), TxnOp::get(pointer, None)]);
        let response = match shared.kv().txn(txn).await {
            Ok(response) => response,
            Err(error) => {
                let kind = backend_kind(EtcdError::request("create session")(error));
                return Err(CreateError::new(kind, spec));
            }
        };
        if !response.succeeded() {
            let responses = response.op_responses();
            let kind = match txn_get(&responses, 0).map(router_status) {
                None => CreateErrorKind::UnknownRouter(router),
                Some(Err(error)) => backend_kind(error),
                Some(Ok(status)) => match admits(status, router, incarnation) {
                    Err(kind) => kind,
                    Ok(()) => CreateErrorKind::DuplicateSession(id),
                },
            };
            return Err(CreateError::new(kind, spec));
        }
        let created = revision_of(&response);
        let session = spec.into_session_with_generation(generation(created));
        let hook = shared.hook(router, id, incarnation, created, payload.into());
        let _ = session.attach(hook); // new, so open
        let (session, previous, recheck) = {
            let progress = shared.progress.lock();
            let (session, previous) = match shared.cache.entry(id) {
                // A listing racing this create adopted the record first:
                // one handle per record, so that one.
                Entry::Occupied(entry) if entry.get().created == created => {
                    (entry.get().session.clone(), None)
                }
                // A later life of the id is cached: this record was removed
                // by another controller already.
                Entry::Occupied(entry) if entry.get().created > created => {
                    (session.clone(), Some((session, created)))
                }
                Entry::Occupied(mut entry) => {
                    let cached = Cached {
                        session: session.clone(),
                        created,
                    };
                    let previous = std::mem::replace(entry.get_mut(), cached);
                    (session, Some((previous.session, previous.created)))
                }
                Entry::Vacant(entry) => {
                    entry.insert(Cached {
                        session: session.clone(),
                        created,
                    });
                    (session, None)
                }
            };
            let changed = progress.stale(id, created);
            (session, previous, changed)
        };
        if let Some((previous, created)) = previous {
            shared.close_quietly(&previous, created, CloseReason::Reclaimed);
        }
        if recheck {
            // Changed since it was created (by another controller): the
            // handle catches up now. It exists either way.
            if let Err(error) = shared.recheck(vec![(router, id, created)]).await {
                tracing::warn!(%error, %id, "could not re-read a session changed while it was created");
            }
        }
        Ok(session)
    }

    /// Closes the handle of `id` (only if it is the life `key` names) and
    /// deletes its record.
    pub(super) async fn close_session(
        &self,
        id: SessionId,
        key: Option<SessionKey>,
        reason: CloseReason,
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
        let removed = self.shared.remove_record(&session).await?;
        Ok((session, outcome, removed))
    }

    pub(super) async fn remove_session(
        &self,
        id: SessionId,
        key: Option<SessionKey>,
    ) -> Result<Session<P>, SessionError> {
        match self.close_session(id, key, CloseReason::Reclaimed).await? {
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
                    let response = self
                        .shared
                        .kv()
                        .txn(txn)
                        .await
                        .map_err(EtcdError::request("fence router"))?;
                    if !response.succeeded() {
                        continue; // fenced or re-registered meanwhile: look again
                    }
                    (incarnation, true)
                }
            };
            // Read after the fence: every session created before it is in
            // the listing, unless closed and removed since (I2).
            let sessions = self.shared.router_sessions(router).await?;
            return Ok(FenceSnapshot {
                router,
                incarnation,
                newly_fenced,
                sessions,
            });
        }
        Err(EtcdError::Contention {
            key: String::from_utf8_lossy(&key).into_owned(),
        }
        .into())
    }
}

pub(super) fn backend_kind(error: EtcdError) -> CreateErrorKind {
    CreateErrorKind::Backend(BackendError::new(error))
}
