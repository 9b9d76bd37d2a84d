//! Reads: the revision, listings, a router's status and sessions, one
//! session's handle; and a handle's removal through the writer.

use etcd_client::{GetOptions, KeyValue};
use tokio::sync::oneshot;

use super::keys::{KeyKind, prefix_end, successor};
use super::shared::Shared;
use super::txn::{CONTENTION, PAGE, parse_pointer, router_status};
use super::writer::{RemoveWrite, Write};
use super::{EtcdError, EtcdPayload};
use crate::id::{RouterId, SessionId};
use crate::session::Session;
use crate::store::error::BackendErrorKind;
use crate::store::report::RouterStatus;

impl<P: EtcdPayload> Shared<P> {
    /// The store's current revision.
    pub(super) async fn revision(&self) -> Result<i64, EtcdError> {
        let response = self
            .get(
                "read revision",
                self.keys.router(RouterId::new(0)),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(response.header().map_or(0, |header| header.revision()))
    }

    /// Every key in `[start, end)`, read page by page at one revision (the
    /// first page's unless `at` is given). Returns the keys and the revision.
    ///
    /// A page holds at most [`PAGE`] keys and, when values are read, as
    /// many records as fit in 16 MiB at the configured `max_record`; a page
    /// etcd still finds too large (records written by a store configured
    /// larger) is read again in halves.
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
        let mut limit = if keys_only { PAGE } else { self.limits.page };
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            if keys_only {
                options = options.with_keys_only();
            }
            let mut response = match self.get("list", from.clone(), Some(options)).await {
                Ok(response) => response,
                Err(error) if error.kind() == BackendErrorKind::TooLarge && limit > 1 => {
                    limit = (limit / 2).max(1);
                    tracing::debug!(limit, "a page of records was too large; reading less");
                    continue;
                }
                Err(error) => return Err(error),
            };
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
        Ok(self.status_at(router).await?.0)
    }

    /// The router's status, and the revision it was read at (a listing at
    /// that revision sees the router's range as it was in that status).
    pub(super) async fn status_at(
        &self,
        router: RouterId,
    ) -> Result<(Option<RouterStatus>, i64), EtcdError> {
        let response = self
            .get("read router", self.keys.router(router), None)
            .await?;
        let revision = response.header().map_or(0, |header| header.revision());
        let status = response.kvs().first().map(router_status).transpose()?;
        Ok((status, revision))
    }

    /// The handles of every record of `router`, read at one revision.
    ///
    /// A record this controller cannot read (another payload type or
    /// record version) and a key in the router's range that is not in the
    /// store's key format (another store's) are left out and logged: a
    /// listing never fails on them (`audit` reports them; `finish` deletes
    /// the unreadable records and leaves foreign keys alone).
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
        let mut loaded = Vec::with_capacity(kvs.len());
        let (mut unreadable, mut foreign) = (0usize, 0usize);
        for kv in &kvs {
            match self.keys.parse(kv.key()) {
                Some(KeyKind::Record(owner, _)) if owner == router => match self.load(kv) {
                    Ok(record) => loaded.push(record),
                    Err(error) => {
                        unreadable += 1;
                        tracing::warn!(%error, "unreadable session record left out of a listing");
                    }
                },
                _ => foreign += 1,
            }
        }
        if unreadable + foreign > 0 {
            tracing::warn!(
                %router,
                unreadable,
                foreign,
                "keys of the router's range left out of its listing"
            );
        }
        let mut recheck = Vec::new();
        let sessions = self.adopt(loaded, revision, &mut recheck);
        self.recheck_or_owe(recheck).await?;
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
                .get("read session pointer", pointer.clone(), None)
                .await?;
            let Some(kv) = response.kvs().first() else {
                if let Some(created) = stale {
                    self.uncache(id, created);
                }
                return Ok(None);
            };
            let router = parse_pointer(kv)?;
            let pointer_revision = kv.mod_revision();
            let response = self
                .get("read session", self.keys.record(router, id), None)
                .await?;
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
            self.recheck_or_owe(recheck).await?;
            // Left out: a later life is cached, which is the id's session.
            return Ok(adopted.or_else(|| self.cache.get(&id).map(|c| c.session.clone())));
        }
        Err(EtcdError::contention(&pointer))
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
        self.uncache(id, created);
        Ok(removed)
    }
}
