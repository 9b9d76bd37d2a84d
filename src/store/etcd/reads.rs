//! Reads: the revision, listings, a router's status and sessions, one
//! session's handle; and a handle's removal through the writer.

use etcd_client::{GetOptions, KeyValue};
use tokio::sync::oneshot;

use super::keys::{prefix_end, successor};
use super::shared::Shared;
use super::txn::{CONTENTION, PAGE, parse_pointer, router_status};
use super::writer::{RemoveWrite, Write};
use super::{EtcdError, EtcdPayload};
use crate::id::{RouterId, SessionId};
use crate::session::Session;
use crate::store::report::RouterStatus;

impl<P: EtcdPayload> Shared<P> {
    /// The store's current revision.
    pub(super) async fn revision(&self) -> Result<i64, EtcdError> {
        let response = self
            .kv()
            .get(
                self.keys.router(RouterId::new(0)),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(EtcdError::request("read revision"))?;
        Ok(response.header().map_or(0, |header| header.revision()))
    }

    /// Every key in `[start, end)`, read page by page at one revision (the
    /// first page's unless `at` is given). Returns the keys and the revision.
    pub(super) async fn list(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        at: Option<i64>,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut kvs = Vec::new();
        let mut from = start;
        let mut revision = at;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            if keys_only {
                options = options.with_keys_only();
            }
            let mut response = self
                .kv()
                .get(from, Some(options))
                .await
                .map_err(EtcdError::request("list"))?;
            if revision.is_none() {
                revision = response.header().map(|header| header.revision());
            }
            let more = response.more();
            let page = response.take_kvs();
            let Some(last) = page.last() else { break };
            from = successor(last.key());
            kvs.extend(page);
            if !more {
                break;
            }
        }
        Ok((kvs, revision.unwrap_or(0)))
    }

    /// The router's status (`None`: not registered).
    pub(super) async fn status(&self, router: RouterId) -> Result<Option<RouterStatus>, EtcdError> {
        let response = self
            .kv()
            .get(self.keys.router(router), None)
            .await
            .map_err(EtcdError::request("read router"))?;
        response.kvs().first().map(router_status).transpose()
    }

    /// The handles of every record of `router`, read at one revision.
    pub(super) async fn router_sessions(
        &self,
        router: RouterId,
    ) -> Result<Vec<Session<P>>, EtcdError> {
        // Read at the current revision, after the load is announced: every
        // change the watch applied before is in the read, every later one
        // is remembered for it. (A read at an older revision could miss a
        // change the watch applied before the load began.)
        let _loads = self.begin_loads();
        let prefix = self.keys.records(router);
        let end = prefix_end(&prefix);
        let (kvs, revision) = self.list(prefix, end, None, false).await?;
        let loaded = kvs
            .iter()
            .map(|kv| self.load(kv))
            .collect::<Result<Vec<_>, _>>()?;
        let mut recheck = Vec::new();
        let sessions = self.adopt(loaded, revision, &mut recheck);
        self.recheck(recheck).await?;
        Ok(sessions)
    }

    /// The handle of session `id`, read from etcd when not cached.
    pub(super) async fn handle(&self, id: SessionId) -> Result<Option<Session<P>>, EtcdError> {
        // An open handle is current (the watch closes it); a closed one may
        // belong to a record removed a moment ago: read etcd.
        let stale = match self.cache.get(&id) {
            Some(cached) if !cached.session.is_closed() => {
                return Ok(Some(cached.session.clone()));
            }
            Some(cached) => Some(cached.created),
            None => None,
        };
        let _loads = self.begin_loads();
        let pointer = self.keys.pointer(id);
        // Two reads (pointer, then record): if the session moved to another
        // router in between, read again.
        let mut last_pointer = None;
        for _ in 0..CONTENTION {
            let response = self
                .kv()
                .get(pointer.clone(), None)
                .await
                .map_err(EtcdError::request("read session pointer"))?;
            let Some(kv) = response.kvs().first() else {
                if let Some(created) = stale {
                    self.cache.remove_if(&id, |_, c| c.created == created);
                }
                return Ok(None);
            };
            let router = parse_pointer(kv)?;
            let pointer_revision = kv.mod_revision();
            let response = self
                .kv()
                .get(self.keys.record(router, id), None)
                .await
                .map_err(EtcdError::request("read session"))?;
            let revision = response.header().map_or(0, |header| header.revision());
            let Some(kv) = response.kvs().first() else {
                if last_pointer == Some(pointer_revision) {
                    return Ok(None); // a dangling pointer: `audit` reports it
                }
                // Moved or removed since the pointer was read: read again.
                last_pointer = Some(pointer_revision);
                continue;
            };
            let loaded = self.load(kv)?;
            let mut recheck = Vec::new();
            let adopted = self.adopt(vec![loaded], revision, &mut recheck).pop();
            self.recheck(recheck).await?;
            // Left out: a later life is cached, which is the id's session.
            return Ok(adopted.or_else(|| self.cache.get(&id).map(|c| c.session.clone())));
        }
        Err(EtcdError::Contention {
            key: String::from_utf8_lossy(&pointer).into_owned(),
        })
    }

    /// Deletes the record of a handle (closed already) and its pointer,
    /// through the writer, after the handle's close; `true` if this call
    /// deleted it.
    pub(super) async fn remove_record(&self, session: &Session<P>) -> Result<bool, EtcdError> {
        let id = session.id();
        let Some(created) = self
            .cache
            .get(&id)
            .filter(|c| Session::ptr_eq(&c.session, session))
            .map(|c| c.created)
        else {
            return Ok(false); // removed meanwhile (the watch saw it go)
        };
        let (done, removed) = oneshot::channel();
        let _ = self.link.writes.send(Write::Remove(RemoveWrite {
            record: self.keys.record(session.router(), id),
            pointer: self.keys.pointer(id),
            created,
            done: Some(done),
        }));
        let removed = self.within("removal", removed).await?.unwrap_or(false);
        self.cache.remove_if(&id, |_, c| c.created == created);
        Ok(removed)
    }
}
