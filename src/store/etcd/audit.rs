//! `audit`, `census` and `repair`: the whole store read at one revision.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::keys::{KeyKind, decode_head, prefix_end};
use super::txn::{parse_pointer, router_status};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, SessionState};
use crate::store::report::{AuditReport, Repair, RepairAction, RouterStatus};
use crate::store::rules::holds;

/// Every router, record and pointer of the store, read at one revision.
pub(super) struct Scan {
    pub(super) routers: std::collections::BTreeMap<RouterId, RouterStatus>,
    pub(super) records: std::collections::BTreeMap<SessionId, ScannedRecord>,
    pub(super) pointers: std::collections::BTreeMap<SessionId, RouterId>,
    /// Keys that could not be read.
    pub(super) unreadable: usize,
}

#[derive(Clone, Copy)]
pub(super) struct ScannedRecord {
    pub(super) router: RouterId,
    pub(super) id: SessionId,
    pub(super) incarnation: Incarnation,
    pub(super) created: i64,
    pub(super) closed: Option<CloseReason>,
}

impl Scan {
    pub(super) fn audit(&self) -> AuditReport {
        let mut report = AuditReport {
            routers: self.routers.len(),
            sessions: self.pointers.len(),
            ..AuditReport::default()
        };
        for record in self.records.values() {
            if self.pointers.get(&record.id) != Some(&record.router) {
                report.missing_from_map.push((record.router, record.id));
            }
            let belongs = self
                .routers
                .get(&record.router)
                .is_some_and(|&status| holds(status, record.incarnation));
            if !belongs {
                report.orphans.push(record.id);
            }
            if record.closed.is_some() {
                report.closed_in_store.push(record.id);
            }
        }
        for (&id, &router) in &self.pointers {
            if self
                .records
                .get(&id)
                .is_none_or(|record| record.router != router)
            {
                report.missing_from_index.push(id);
            }
        }
        report
    }
}

impl<P: EtcdPayload> EtcdStore<P> {
    /// Reads the whole store at one revision.
    pub(super) async fn scan(&self) -> Result<Scan, EtcdError> {
        let shared = &self.shared;
        let routers = shared.keys.all_routers();
        let (kvs, revision) = shared
            .list(routers.clone(), prefix_end(&routers), None, false)
            .await?;
        let pointers = shared.keys.all_pointers();
        let (pointer_kvs, _) = shared
            .list(
                pointers.clone(),
                prefix_end(&pointers),
                Some(revision),
                false,
            )
            .await?;
        let mut scan = Scan {
            routers: std::collections::BTreeMap::new(),
            records: std::collections::BTreeMap::new(),
            pointers: std::collections::BTreeMap::new(),
            unreadable: 0,
        };
        for kv in kvs.iter().chain(&pointer_kvs) {
            match shared.keys.parse(kv.key()) {
                Some(KeyKind::Router(router)) => match router_status(kv) {
                    Ok(status) => {
                        scan.routers.insert(router, status);
                    }
                    Err(_) => scan.unreadable += 1,
                },
                Some(KeyKind::Record(router, id)) => match decode_head(kv.value()) {
                    Ok(head) => {
                        scan.records.insert(
                            id,
                            ScannedRecord {
                                router,
                                id,
                                incarnation: head.incarnation,
                                created: kv.create_revision(),
                                closed: head.closed,
                            },
                        );
                    }
                    Err(_) => scan.unreadable += 1,
                },
                Some(KeyKind::Pointer(id)) => match parse_pointer(kv) {
                    Ok(router) => {
                        scan.pointers.insert(id, router);
                    }
                    Err(_) => scan.unreadable += 1,
                },
                None => scan.unreadable += 1,
            }
        }
        if scan.unreadable > 0 {
            tracing::warn!(
                keys = scan.unreadable,
                "unreadable keys under the store's prefix"
            );
        }
        Ok(scan)
    }

    /// Whether this controller's handle of the record is `Terminating`.
    pub(super) fn terminating(&self, id: SessionId, created: i64) -> bool {
        self.shared
            .cache
            .get(&id)
            .is_some_and(|c| c.created == created && c.session.state() == SessionState::Terminating)
    }

    pub(super) async fn repair_findings(
        &self,
        findings: &AuditReport,
    ) -> Result<Vec<Repair>, EtcdError> {
        let shared = &self.shared;
        shared.flush().await?;
        // Checked again: the store kept serving since the audit.
        let scan = self.scan().await?;
        let now = scan.audit();
        let fenced =
            |router: RouterId| matches!(scan.routers.get(&router), Some(RouterStatus::Fenced(_)));
        let mut repairs = Vec::new();
        for &(router, id) in &findings.missing_from_map {
            if !now.missing_from_map.contains(&(router, id)) || fenced(router) {
                continue;
            }
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            let belongs = record.closed.is_none()
                && scan
                    .routers
                    .get(&router)
                    .is_some_and(|&status| holds(status, record.incarnation));
            let pointer = shared.keys.pointer(id);
            let record_key = shared.keys.record(router, id);
            if belongs && !scan.pointers.contains_key(&id) {
                // Put the pointer back, if still missing and the record is
                // still this one.
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(pointer.clone(), CompareOp::Equal, 0),
                        Compare::create_revision(record_key, CompareOp::Equal, record.created),
                    ])
                    .and_then([TxnOp::put(pointer, router.get().to_be_bytes(), None)]);
                if self.guarded("restore session pointer", txn).await? {
                    repairs.push(repaired(&record, RepairAction::Restored));
                }
                continue;
            }
            if self.evict(&record, false).await? {
                repairs.push(repaired(&record, RepairAction::DroppedIndexEntry));
            }
        }
        for &id in &findings.missing_from_index {
            if !now.missing_from_index.contains(&id) {
                continue;
            }
            let Some(&router) = scan.pointers.get(&id) else {
                continue;
            };
            if fenced(router) {
                continue;
            }
            // A pointer with no record: the session's data is gone, so the
            // id is released.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    shared.keys.record(router, id),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::delete(shared.keys.pointer(id), None)]);
            if self.guarded("drop dangling pointer", txn).await? {
                if let Some((_, cached)) = shared.cache.remove(&id) {
                    shared.close_quietly(&cached.session, cached.created, CloseReason::Reclaimed);
                }
                repairs.push(Repair {
                    session: id,
                    router,
                    incarnation: Incarnation::new(0),
                    action: RepairAction::OrphanReclaimed,
                });
            }
        }
        for &id in &findings.orphans {
            if !now.orphans.contains(&id) {
                continue; // not an orphan (any more)
            }
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            if self.evict(&record, true).await? {
                repairs.push(repaired(&record, RepairAction::OrphanReclaimed));
            }
        }
        for &id in &findings.closed_in_store {
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            if record.closed.is_none() || fenced(record.router) || now.orphans.contains(&id) {
                continue; // a deletion's `finish` or the orphan pass has it
            }
            if self.evict(&record, true).await? {
                repairs.push(repaired(&record, RepairAction::ClosedRemoved));
            }
        }
        Ok(repairs)
    }

    /// Closes (this controller's handle of) the record with `Reclaimed` and
    /// deletes it, and its pointer if `pointer` and it points here.
    pub(super) async fn evict(
        &self,
        record: &ScannedRecord,
        pointer: bool,
    ) -> Result<bool, EtcdError> {
        let shared = &self.shared;
        let cached = shared
            .cache
            .get(&record.id)
            .filter(|c| c.created == record.created)
            .map(|c| c.session.clone());
        if let Some(session) = &cached {
            // Written through the writer too: if the deletion below fails,
            // etcd still learns the session is closed.
            let _ = session.close(CloseReason::Reclaimed);
        }
        let record_key = shared.keys.record(record.router, record.id);
        let mut txn = Txn::new().when([Compare::create_revision(
            record_key.clone(),
            CompareOp::Equal,
            record.created,
        )]);
        let mut ops = vec![TxnOp::delete(record_key, None)];
        if pointer {
            // The pointer goes with the record if it was created with it.
            let pointer = shared.keys.pointer(record.id);
            ops.push(TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(
                        pointer.clone(),
                        CompareOp::Equal,
                        record.created,
                    )])
                    .and_then([TxnOp::delete(pointer, None)]),
            ));
        }
        txn = txn.and_then(ops);
        let deleted = self.guarded("reclaim session", txn).await?;
        if deleted {
            shared
                .cache
                .remove_if(&record.id, |_, c| c.created == record.created);
        }
        Ok(deleted)
    }

    /// Sends a guarded repair; `true` if its guard held.
    pub(super) async fn guarded(
        &self,
        operation: &'static str,
        txn: Txn,
    ) -> Result<bool, EtcdError> {
        let response = self
            .shared
            .kv()
            .txn(txn)
            .await
            .map_err(EtcdError::request(operation))?;
        Ok(response.succeeded())
    }
}

pub(super) fn repaired(record: &ScannedRecord, action: RepairAction) -> Repair {
    Repair {
        session: record.id,
        router: record.router,
        incarnation: record.incarnation,
        action,
    }
}
