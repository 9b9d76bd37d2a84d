//! The handle cache: records read from etcd become this controller's
//! handles, one per record, kept in step with what the watch reports.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use etcd_client::{KeyValue, Txn, TxnOp, TxnOpResponse};

use super::keys::{KeyKind, decode, decode_head};
use super::shared::{Cached, Loaded, Shared, WriteClose};
use super::txn::generation;
use super::{EtcdError, EtcdPayload};
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, NewSession, Session};

impl<P: EtcdPayload> Shared<P> {
    /// Decodes a record read from etcd.
    pub(super) fn load(&self, kv: &KeyValue) -> Result<Loaded<P>, EtcdError> {
        let Some(KeyKind::Record(router, id)) = self.keys.parse(kv.key()) else {
            return Err(EtcdError::corrupt(kv.key(), "not a session record key"));
        };
        let value = kv.value();
        let record = decode::<P>(value).map_err(|error| EtcdError::corrupt(kv.key(), error))?;
        let payload = decode_head(value)
            .map(|head| head.payload(value).into())
            .map_err(|error| EtcdError::corrupt(kv.key(), error))?;
        Ok(Loaded {
            router,
            id,
            created: kv.create_revision(),
            record,
            payload,
        })
    }

    /// The hook that writes the handle's close to etcd.
    pub(super) fn hook(
        &self,
        router: RouterId,
        id: SessionId,
        incarnation: Incarnation,
        created: i64,
        payload: Box<[u8]>,
    ) -> WriteClose {
        WriteClose {
            link: Arc::clone(&self.link),
            id,
            record: self.keys.record(router, id),
            incarnation,
            created,
            payload,
        }
    }

    /// Announces loads about to read records, so the watch remembers what
    /// changes meanwhile.
    pub(super) fn begin_loads(&self) -> LoadGuard<'_, P> {
        let began = self.progress.lock().begin_load();
        LoadGuard {
            shared: self,
            began,
        }
    }

    /// Turns records read at `revision` into this controller's handles,
    /// reusing the handles it holds; a record whose id has a later life
    /// cached is left out (it is gone). Records whose handle must be
    /// checked again (changed while loading) are pushed to `recheck`.
    pub(super) fn adopt(
        &self,
        loaded: Vec<Loaded<P>>,
        revision: i64,
        recheck: &mut Vec<(RouterId, SessionId, i64)>,
    ) -> Vec<Session<P>> {
        let mut sessions = Vec::with_capacity(loaded.len());
        let mut closes = Vec::new();
        // Records not adopted: dropped after the lock (a decoded payload's
        // `Drop` is user code).
        let mut discards = Vec::new();
        // Closes of handles built closed, counted after the guards (the
        // metrics recorder is user code).
        #[cfg(feature = "metrics")]
        let mut built_closed = Vec::new();
        {
            let progress = self.progress.lock();
            for loaded in loaded {
                let (id, created) = (loaded.id, loaded.created);
                let session = match self.cache.entry(id) {
                    Entry::Occupied(entry) if entry.get().created == created => {
                        let cached = entry.get().session.clone();
                        if let Some(reason) = loaded.record.closed {
                            closes.push((cached.clone(), created, reason));
                        }
                        discards.push(loaded);
                        cached
                    }
                    // A later life of the id is cached: the record read is
                    // gone already (and may have been another router's).
                    Entry::Occupied(entry) if entry.get().created > created => {
                        discards.push(loaded);
                        continue;
                    }
                    entry => {
                        let (session, closed) = self.materialize(loaded);
                        let open = closed.is_none();
                        #[cfg(feature = "metrics")]
                        built_closed.extend(closed);
                        let previous = match entry {
                            Entry::Occupied(mut entry) => Some(std::mem::replace(
                                entry.get_mut(),
                                Cached {
                                    session: session.clone(),
                                    created,
                                },
                            )),
                            Entry::Vacant(entry) => {
                                entry.insert(Cached {
                                    session: session.clone(),
                                    created,
                                });
                                None
                            }
                        };
                        if let Some(previous) = previous {
                            // An older life of the id, deleted since.
                            closes.push((
                                previous.session,
                                previous.created,
                                CloseReason::Reclaimed,
                            ));
                        }
                        let changed = progress.stale(id, revision);
                        if open && changed {
                            recheck.push((session.router(), id, created));
                        }
                        session
                    }
                };
                sessions.push(session);
            }
        }
        crate::contain::drop_each_logged(discards, "etcd store listing");
        #[cfg(feature = "metrics")]
        for reason in built_closed {
            crate::metrics::closed(reason.as_str());
        }
        self.close_all_quietly(closes);
        sessions
    }

    /// A handle for a loaded record, and the reason it was closed with if
    /// the record is closed. Called under the store's guards: it runs no
    /// user code (a closed record's handle is closed without counting it in
    /// the metrics; the caller counts it).
    pub(super) fn materialize(&self, loaded: Loaded<P>) -> (Session<P>, Option<CloseReason>) {
        let Loaded {
            router,
            id,
            created,
            record,
            payload,
        } = loaded;
        let mut spec = NewSession::new(id, router, record.incarnation).payload(record.payload);
        if let Some(token) = record.token {
            spec = spec.token(token);
        }
        let session = spec.into_session_with_generation(generation(created));
        match record.closed {
            Some(reason) => {
                // Nothing attached, nobody waits: the close runs no user code.
                let _ = session.close_unrecorded(reason);
                (session, Some(reason))
            }
            None => {
                let hook = self.hook(router, id, record.incarnation, created, payload);
                // A new handle is open: the attach cannot be refused.
                let _ = session.attach(hook);
                (session, None)
            }
        }
    }

    /// Reads again the records of handles that may have missed a change.
    pub(super) async fn recheck(
        &self,
        stale: Vec<(RouterId, SessionId, i64)>,
    ) -> Result<(), EtcdError> {
        // Records read whole: no more than a page of them per request.
        let per_txn = usize::try_from(self.limits.page)
            .unwrap_or(1)
            .min(self.limits.max_txn_ops)
            .min(64);
        self.rechecks
            .fetch_add(stale.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for chunk in stale.chunks(per_txn) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|&(router, id, _)| TxnOp::get(self.keys.record(router, id), None))
                    .collect::<Vec<_>>(),
            );
            let response = self.txn("recheck", txn).await?;
            for (&(_, id, created), op) in chunk.iter().zip(response.op_responses()) {
                let current = match op {
                    TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                    _ => None,
                };
                self.settle(id, created, current.as_ref());
            }
        }
        Ok(())
    }

    /// [`recheck`](Self::recheck); if it does not complete (an error, or
    /// the caller's future dropped at it), the handles are owed to the
    /// watch, which reads them again: they are cached already, and one
    /// that missed a change would otherwise stay as it is for good.
    pub(super) async fn recheck_or_owe(
        &self,
        stale: Vec<(RouterId, SessionId, i64)>,
    ) -> Result<(), EtcdError> {
        if stale.is_empty() {
            return Ok(());
        }
        let mut owed = Owed {
            shared: self,
            stale: stale.clone(),
        };
        let rechecked = self.recheck(stale).await;
        if rechecked.is_ok() {
            owed.stale.clear();
        }
        rechecked
    }

    /// Brings the cached handle of `(id, created)` in line with the record
    /// etcd holds now (`None`: no record).
    pub(super) fn settle(&self, id: SessionId, created: i64, current: Option<&KeyValue>) {
        let (session, reason) = match current {
            Some(kv) if kv.create_revision() == created => {
                let Ok(Some(reason)) = decode_head(kv.value()).map(|head| head.closed) else {
                    return; // open, as the handle (or unreadable: audit reports it)
                };
                let cached = self.cache.get(&id).filter(|c| c.created == created);
                let Some(session) = cached.map(|c| c.session.clone()) else {
                    return;
                };
                (session, reason)
            }
            _ => {
                // Gone, or another life of the id.
                let removed = self.cache.remove_if(&id, |_, c| c.created == created);
                let Some((_, cached)) = removed else { return };
                (cached.session, CloseReason::Reclaimed)
            }
        };
        // Contained: dropping what may be the last handle runs its
        // payload's `Drop` (user code), here possibly in the watch's task.
        self.close_all_quietly(vec![(session, created, reason)]);
    }

    /// After a compacted watch: checks every cached handle; returns the
    /// revision the check read at.
    pub(super) async fn recheck_cached(&self) -> Result<i64, EtcdError> {
        let cached: Vec<(RouterId, SessionId, i64)> = self
            .cache
            .iter()
            .map(|entry| (entry.session.router(), *entry.key(), entry.created))
            .collect();
        let revision = self.revision().await?;
        self.recheck(cached).await?;
        Ok(revision)
    }
}

/// A recheck not done yet: dropped before it is (`stale` not emptied),
/// its handles are owed to the watch.
struct Owed<'a, P> {
    shared: &'a Shared<P>,
    stale: Vec<(RouterId, SessionId, i64)>,
}

impl<P> Drop for Owed<'_, P> {
    fn drop(&mut self) {
        self.shared.owe(std::mem::take(&mut self.stale));
    }
}

/// Counts a load in flight while it lives.
pub(super) struct LoadGuard<'a, P> {
    shared: &'a Shared<P>,
    /// The revision applied when the load began.
    began: i64,
}

impl<P> Drop for LoadGuard<'_, P> {
    fn drop(&mut self) {
        self.shared.progress.lock().end_load(self.began);
    }
}
