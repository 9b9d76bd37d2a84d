//! `finish`: deleting a fenced router's sessions, page by page, and the
//! tombstone.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};
use futures::StreamExt;

use super::keys::{self, KeyKind, decode_head, prefix_end};
use super::txn::PAGE;
use super::writer::MAX_TXN_OPS;
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::{Incarnation, RouterId};
use crate::session::CloseReason;
use crate::store::error::FinishError;
use crate::store::report::{FinishReport, RouterStatus};
use crate::store::rules::check_finishable;

impl<P: EtcdPayload> EtcdStore<P> {
    pub(super) async fn finish_router(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        let shared = &self.shared;
        let key = shared.keys.router(router);
        let fenced = keys::router_value(RouterStatus::Fenced(incarnation));
        let check = |status: Option<RouterStatus>| match status {
            None => Err(FinishError::UnknownRouter(router)),
            Some(status) => check_finishable(router, incarnation, status),
        };
        check(shared.status(router).await?)?;
        // The closes this controller made reach etcd first, with their
        // reasons, before the records go.
        shared.flush().await?;
        let prefix = shared.keys.records(router);
        let (mut removed, mut closed) = (0, 0);
        // Page by page: a linearizable read of the first 1,000 records left,
        // then their deletion; the router is fenced, so nothing new appears.
        loop {
            let options = GetOptions::new()
                .with_range(prefix_end(&prefix))
                .with_limit(PAGE);
            let kvs = shared
                .kv()
                .get(prefix.clone(), Some(options))
                .await
                .map_err(EtcdError::request("list sessions"))?
                .take_kvs();
            if kvs.is_empty() {
                break;
            }
            // This controller's open handles are closed here (the close is
            // written too, guarded: if a deletion below fails, etcd still
            // learns it); `handled` says which closes this call won.
            let mut handled = std::collections::HashMap::new();
            for kv in &kvs {
                let Some(KeyKind::Record(_, id)) = shared.keys.parse(kv.key()) else {
                    continue;
                };
                let created = kv.create_revision();
                let cached = shared.cache.get(&id).filter(|c| c.created == created);
                if let Some(session) = cached.map(|c| c.session.clone()) {
                    handled.insert(id, session.close(CloseReason::Reclaimed).won());
                }
            }
            for (deleted, kind) in self.delete_page(&key, &fenced, kvs).await? {
                let Some(deleted) = deleted else {
                    // No longer fenced in this incarnation: say why.
                    check(shared.status(router).await?)?;
                    continue;
                };
                removed += 1;
                // Closed by this call: a handle here whose close it won, or
                // a record no handle here holds, still open when deleted.
                let open = decode_head(deleted.value()).map_or(true, |h| h.closed.is_none());
                let won = match kind {
                    Some(KeyKind::Record(_, id)) => handled.get(&id).copied().unwrap_or(open),
                    _ => open,
                };
                closed += usize::from(won);
                if let Some(KeyKind::Record(_, id)) = kind {
                    let created = deleted.create_revision();
                    shared.cache.remove_if(&id, |_, c| c.created == created);
                }
            }
        }
        // Confirmed empty by a linearizable count, guarded on the fence:
        // then the tombstone.
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, fenced.clone()),
                Compare::create_revision(prefix.clone(), CompareOp::Equal, 0)
                    .with_range(prefix_end(&prefix)),
            ])
            .and_then([TxnOp::put(
                key.clone(),
                keys::router_value(RouterStatus::Deleted(incarnation)),
                None,
            )]);
        let response = shared
            .kv()
            .txn(txn)
            .await
            .map_err(EtcdError::request("tombstone router"))?;
        if !response.succeeded() {
            check(shared.status(router).await?)?;
            return Err(EtcdError::Contention {
                key: String::from_utf8_lossy(&prefix).into_owned(),
            }
            .into());
        }
        Ok(FinishReport {
            router,
            incarnation,
            removed,
            closed,
        })
    }
}

impl<P: EtcdPayload> EtcdStore<P> {
    /// Deletes the listed records of a fenced router, and their pointers, in
    /// transactions within etcd's [`MAX_TXN_OPS`], several in flight. Each
    /// transaction is guarded on the router still being fenced in the
    /// incarnation (`fenced` at `key`); each record is deleted only if it is
    /// still the one listed (its `create_revision`), and its pointer only if
    /// it was created with it, so a removal racing `finish` and a new life
    /// of the id elsewhere are left alone. Returns, per transaction, `None`
    /// if the router was no longer fenced, else the records it deleted as
    /// they were, with what their keys name.
    pub(super) async fn delete_page(
        &self,
        key: &[u8],
        fenced: &[u8],
        kvs: Vec<KeyValue>,
    ) -> Result<Vec<(Option<KeyValue>, Option<KeyKind>)>, EtcdError> {
        let shared = &self.shared;
        let mut out = Vec::with_capacity(kvs.len());
        // Two nested transactions per record; etcd counts a nested
        // transaction's operations against what its parent leaves of the
        // 128: 32 records (64 operations) per transaction.
        let pages: Vec<Vec<KeyValue>> = kvs
            .chunks(MAX_TXN_OPS / 4)
            .map(<[KeyValue]>::to_vec)
            .collect();
        let results: Vec<Result<Option<Vec<KeyValue>>, EtcdError>> = futures::stream::iter(pages)
            .map(|page| async move {
                let ops: Vec<TxnOp> = page
                    .iter()
                    .flat_map(|kv| {
                        let created = kv.create_revision();
                        // The record, if it is still this one.
                        let record = TxnOp::txn(
                            Txn::new()
                                .when([Compare::create_revision(
                                    kv.key(),
                                    CompareOp::Equal,
                                    created,
                                )])
                                .and_then([TxnOp::delete(
                                    kv.key(),
                                    Some(DeleteOptions::new().with_prev_key()),
                                )]),
                        );
                        // Its pointer, if created with it.
                        let pointer = match shared.keys.parse(kv.key()) {
                            Some(KeyKind::Record(_, id)) => {
                                let pointer = shared.keys.pointer(id);
                                Some(TxnOp::txn(
                                    Txn::new()
                                        .when([Compare::create_revision(
                                            pointer.clone(),
                                            CompareOp::Equal,
                                            created,
                                        )])
                                        .and_then([TxnOp::delete(pointer, None)]),
                                ))
                            }
                            _ => None,
                        };
                        std::iter::once(record).chain(pointer)
                    })
                    .collect();
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, fenced)])
                    .and_then(ops);
                let response = shared
                    .kv()
                    .txn(txn)
                    .await
                    .map_err(EtcdError::request("delete sessions"))?;
                if !response.succeeded() {
                    return Ok(None);
                }
                // The records deleted, as they were: from the nested
                // transactions whose guard held.
                let deleted = response
                    .op_responses()
                    .into_iter()
                    .filter_map(|op| match op {
                        TxnOpResponse::Txn(nested) if nested.succeeded() => Some(nested),
                        _ => None,
                    })
                    .flat_map(|nested| nested.op_responses())
                    .filter_map(|op| match op {
                        TxnOpResponse::Delete(mut delete) => Some(delete.take_prev_kvs()),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                Ok(Some(deleted))
            })
            .buffer_unordered(shared.concurrency)
            .collect()
            .await;
        for result in results {
            match result? {
                None => out.push((None, None)),
                Some(deleted) => out.extend(deleted.into_iter().map(|kv| {
                    let kind = shared.keys.parse(kv.key());
                    (Some(kv), kind)
                })),
            }
        }
        Ok(out)
    }
}
