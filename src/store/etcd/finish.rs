//! `finish`: deleting a fenced router's sessions, page by page, and the
//! tombstone.
//!
//! # Invariants
//!
//! - Every key of the router's record range in the store's key format is
//!   deleted, readable or not (an unreadable record is counted in
//!   [`FinishReport::unreadable`]); a key in the range that is not in the
//!   key format belongs to someone else (another store's prefix may nest in
//!   this one's): it is counted in [`FinishReport::foreign`], never deleted,
//!   never waited for.
//! - Listings read keys and revisions only, each at the revision of a read
//!   that found the router fenced in the incarnation: a call that comes
//!   late (the incarnation finished and the router registered again
//!   meanwhile) lists the incarnation's records as they were, never the new
//!   incarnation's (record keys carry no incarnation), and so closes no
//!   handle of the new life. Each deletion transaction is guarded on the
//!   router still being fenced in the incarnation, each record on being the
//!   one listed, its pointer on being created with it.
//! - The tombstone is written only while the router is still fenced in the
//!   incarnation, after a listing that found nothing but foreign keys: no
//!   record of the incarnation is left behind (creates are refused once
//!   fenced, so none can appear after that listing). It is not guarded on
//!   the range: a foreign key created meanwhile (another store nested in
//!   this one's prefix, busy) must not keep the router fenced.
//! - Every request is safe to repeat and is retried on the store's
//!   schedule; a transaction etcd refuses as too big is split in halves.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use futures::StreamExt;

use super::error::{Refusal, refusal};
use super::keys::{self, KeyKind, decode, prefix_end};
use super::txn::{CONTENTION, PAGE};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::{Incarnation, RouterId};
use crate::session::CloseReason;
use crate::store::error::FinishError;
use crate::store::report::{FinishReport, RouterStatus};
use crate::store::rules::check_finishable;

/// What became of one deletion transaction.
enum Deleted {
    /// The router is no longer fenced in the incarnation.
    NotFenced,
    /// The records it deleted, as they were.
    Records(Vec<KeyValue>),
}

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
        let end = prefix_end(&prefix);
        let mut report = FinishReport::new(router, incarnation);
        // A tombstone attempt whose answer was lost may have landed.
        let mut tombstone_sent = false;
        for _ in 0..CONTENTION {
            // The keys left (keys and revisions only), listed at a revision
            // where the router is fenced in the incarnation: every record
            // of the range then is the incarnation's.
            let (status, at) = shared.status_at(router).await?;
            if tombstone_sent && status == Some(RouterStatus::Deleted(incarnation)) {
                return Ok(report); // an earlier attempt of this call landed
            }
            check(status)?;
            let (kvs, _) = shared
                .list(prefix.clone(), end.clone(), Some(at), true)
                .await?;
            let (ours, foreign): (Vec<KeyValue>, Vec<KeyValue>) = kvs
                .into_iter()
                .partition(|kv| matches!(shared.keys.parse(kv.key()), Some(KeyKind::Record(r, _)) if r == router));
            if ours.is_empty() {
                report.foreign = foreign.len();
                if !foreign.is_empty() {
                    tracing::warn!(
                        %router,
                        keys = foreign.len(),
                        "foreign keys in the router's range left alone"
                    );
                }
                // Nothing of the incarnation left: the tombstone, guarded
                // on the fence (no record of ours can be created under it).
                let txn = Txn::new()
                    .when([Compare::value(
                        key.clone(),
                        CompareOp::Equal,
                        fenced.clone(),
                    )])
                    .and_then([TxnOp::put(
                        key.clone(),
                        keys::router_value(RouterStatus::Deleted(incarnation)),
                        None,
                    )]);
                let mut attempts = 0u32;
                let response = shared
                    .retry
                    .run("tombstone router", || {
                        attempts += 1;
                        let mut kv = shared.kv();
                        let txn = txn.clone();
                        async move { kv.txn(txn).await }
                    })
                    .await?;
                tombstone_sent |= attempts > 1;
                if response.succeeded() {
                    return Ok(report);
                }
                continue; // the router changed under it: look again (above)
            }
            for page in ours.chunks(PAGE as usize) {
                self.delete_listed(router, &key, &fenced, page, &mut report)
                    .await?;
            }
        }
        Err(EtcdError::contention(&prefix).into())
    }

    /// Closes this controller's handles of the listed records, deletes the
    /// records, and counts what was deleted.
    async fn delete_listed(
        &self,
        router: RouterId,
        key: &[u8],
        fenced: &[u8],
        page: &[KeyValue],
        report: &mut FinishReport,
    ) -> Result<(), FinishError> {
        let shared = &self.shared;
        // This controller's open handles are closed here (the close is
        // written too, guarded: if a deletion below fails, etcd still
        // learns it); `handled` says which closes this call won.
        let mut handled = std::collections::HashMap::new();
        for kv in page {
            let Some(KeyKind::Record(_, id)) = shared.keys.parse(kv.key()) else {
                continue;
            };
            let created = kv.create_revision();
            let cached = shared.cache.get(&id).filter(|c| c.created == created);
            if let Some(session) = cached.map(|c| c.session.clone()) {
                handled.insert(id, session.close(CloseReason::Reclaimed).won());
            }
        }
        for deleted in self.delete_page(key, fenced, page).await? {
            let Deleted::Records(records) = deleted else {
                // No longer fenced in this incarnation: the caller says why.
                return Ok(());
            };
            for record in records {
                report.removed += 1;
                let Some(KeyKind::Record(_, id)) = shared.keys.parse(record.key()) else {
                    continue;
                };
                // Closed by this call: a handle here whose close it won, or
                // a record no handle here holds, still open when deleted.
                // Read whole, as `audit` does: a record of another payload
                // type is as unreadable here as garbage.
                // The decoded payload is let go inside the catch (its
                // `Drop` is user code).
                let decoded = crate::contain::contain(|| {
                    decode::<P>(record.value()).map(|decoded| decoded.closed.is_none())
                });
                let open = match decoded {
                    Some(Ok(open)) => open,
                    // Readable; its payload's `Drop` panicked (logged).
                    None => super::keys::decode_head(record.value())
                        .map_or(true, |head| head.closed.is_none()),
                    Some(Err(error)) => {
                        report.unreadable += 1;
                        tracing::warn!(%router, %id, %error, "deleted an unreadable session record");
                        continue;
                    }
                };
                let won = handled.get(&id).copied().unwrap_or(open);
                report.closed += usize::from(won);
                let created = record.create_revision();
                shared.uncache(id, created);
            }
        }
        Ok(())
    }

    /// Deletes the listed records of a fenced router, and their pointers, in
    /// transactions within etcd's `max_txn_ops`, several in flight. Each
    /// transaction is guarded on the router still being fenced in the
    /// incarnation (`fenced` at `key`); each record is deleted only if it is
    /// still the one listed (its `create_revision`), and its pointer only if
    /// it was created with it, so a removal racing `finish` and a new life
    /// of the id elsewhere are left alone. A transaction etcd refuses as
    /// such (a smaller `--max-txn-ops` than configured) is split in halves.
    async fn delete_page(
        &self,
        key: &[u8],
        fenced: &[u8],
        kvs: &[KeyValue],
    ) -> Result<Vec<Deleted>, EtcdError> {
        let shared = &self.shared;
        let chunks: Vec<Vec<KeyValue>> = kvs
            .chunks(shared.limits.deletes_per_txn())
            .map(<[KeyValue]>::to_vec)
            .collect();
        let results: Vec<Result<Vec<Deleted>, EtcdError>> = futures::stream::iter(chunks)
            .map(|chunk| async move { self.delete_chunk(key, fenced, &chunk).await })
            .buffer_unordered(shared.concurrency)
            .collect()
            .await;
        let mut out = Vec::new();
        for result in results {
            out.extend(result?);
        }
        Ok(out)
    }

    /// One chunk of [`delete_page`](Self::delete_page), split while etcd
    /// refuses it as too many operations.
    async fn delete_chunk(
        &self,
        key: &[u8],
        fenced: &[u8],
        chunk: &[KeyValue],
    ) -> Result<Vec<Deleted>, EtcdError> {
        let mut pending = vec![chunk];
        let mut out = Vec::new();
        while let Some(chunk) = pending.pop() {
            if chunk.is_empty() {
                continue;
            }
            let txn = Txn::new()
                .when([Compare::value(key, CompareOp::Equal, fenced)])
                .and_then(self.deletions(chunk));
            match self.shared.txn("delete sessions", txn).await {
                Ok(response) => out.push(deleted(&response)),
                Err(EtcdError::Request { source, .. })
                    if chunk.len() > 1 && refusal(&source) == Some(Refusal::Invalid) =>
                {
                    tracing::debug!(%source, records = chunk.len(), "etcd refused a deletion; splitting it");
                    let (left, right) = chunk.split_at(chunk.len() / 2);
                    pending.push(right);
                    pending.push(left);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(out)
    }

    /// The guarded deletion of each listed record and of its pointer.
    fn deletions(&self, chunk: &[KeyValue]) -> Vec<TxnOp> {
        let keys = &self.shared.keys;
        chunk
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
                let pointer = match keys.parse(kv.key()) {
                    Some(KeyKind::Record(_, id)) => {
                        Some(guarded_pointer_delete(keys.pointer(id), created))
                    }
                    _ => None,
                };
                std::iter::once(record).chain(pointer)
            })
            .collect()
    }
}

/// The deletion of a session's pointer, if it was created with the record
/// created at `created`.
fn guarded_pointer_delete(pointer: Vec<u8>, created: i64) -> TxnOp {
    TxnOp::txn(
        Txn::new()
            .when([Compare::create_revision(
                pointer.clone(),
                CompareOp::Equal,
                created,
            )])
            .and_then([TxnOp::delete(pointer, None)]),
    )
}

/// The records a deletion transaction deleted, as they were: from the
/// nested transactions whose guard held.
fn deleted(response: &TxnResponse) -> Deleted {
    if !response.succeeded() {
        return Deleted::NotFenced;
    }
    let records = response
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
    Deleted::Records(records)
}
