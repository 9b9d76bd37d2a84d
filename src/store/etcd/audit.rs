//! `audit`, `census` and `repair`: the whole store read at one revision.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::keys::{KeyKind, decode, decode_head, prefix_end};
use super::txn::{generation, parse_pointer, router_status};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::events::{Repair, RepairAction};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseReason, SessionState};
use crate::store::report::{AuditReport, RouterStatus};
use crate::store::rules::holds;

/// Every router, record and pointer of the store, read at one revision.
pub(super) struct Scan {
    pub(super) routers: std::collections::BTreeMap<RouterId, RouterStatus>,
    pub(super) records: std::collections::BTreeMap<SessionId, ScannedRecord>,
    pub(super) pointers: std::collections::BTreeMap<SessionId, RouterId>,
    /// Keys in the store's format whose value could not be read.
    pub(super) unreadable: Vec<Unreadable>,
    /// Keys under the prefix that are not in the store's format.
    pub(super) foreign: Vec<Vec<u8>>,
}

/// A key of the store whose value could not be read.
#[derive(Clone)]
pub(super) struct Unreadable {
    pub(super) key: Vec<u8>,
    pub(super) kind: KeyKind,
    pub(super) created: i64,
    pub(super) modified: i64,
}

impl Unreadable {
    fn name(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }
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
                let key = SessionKey::new(record.id, generation(record.created));
                report.closed_keys.push(key);
            }
        }
        let unreadable_record = |id: SessionId, router: RouterId| {
            self.unreadable
                .iter()
                .any(|u| u.kind == KeyKind::Record(router, id))
        };
        for (&id, &router) in &self.pointers {
            if self
                .records
                .get(&id)
                .is_none_or(|record| record.router != router)
                // Its record is there, unreadable: reported as such.
                && !unreadable_record(id, router)
            {
                report.missing_from_index.push(id);
            }
        }
        report.unreadable = self.unreadable.iter().map(Unreadable::name).collect();
        report.foreign = self
            .foreign
            .iter()
            .map(|key| String::from_utf8_lossy(key).into_owned())
            .collect();
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
            unreadable: Vec::new(),
            foreign: Vec::new(),
        };
        for kv in kvs.iter().chain(&pointer_kvs) {
            let Some(kind) = shared.keys.parse(kv.key()) else {
                scan.foreign.push(kv.key().to_vec());
                continue;
            };
            let readable = match kind {
                KeyKind::Router(router) => router_status(kv)
                    .map(|status| {
                        scan.routers.insert(router, status);
                    })
                    .is_ok(),
                KeyKind::Record(router, id) => match decode_head(kv.value()) {
                    // The payload too: a record of another payload type is
                    // as unreadable to this controller as garbage.
                    Ok(head)
                        if crate::contain::contain(|| decode::<P>(kv.value()).is_ok())
                            .unwrap_or(true) =>
                    {
                        let record = ScannedRecord {
                            router,
                            id,
                            incarnation: head.incarnation,
                            created: kv.create_revision(),
                            closed: head.closed,
                        };
                        scan.records.insert(id, record);
                        true
                    }
                    _ => false,
                },
                KeyKind::Pointer(id) => parse_pointer(kv)
                    .map(|router| {
                        scan.pointers.insert(id, router);
                    })
                    .is_ok(),
            };
            if !readable {
                scan.unreadable.push(Unreadable {
                    key: kv.key().to_vec(),
                    kind,
                    created: kv.create_revision(),
                    modified: kv.mod_revision(),
                });
            }
        }
        if !scan.unreadable.is_empty() || !scan.foreign.is_empty() {
            tracing::warn!(
                unreadable = scan.unreadable.len(),
                foreign = scan.foreign.len(),
                "keys under the store's prefix it cannot account for"
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
                // Only a handle of that router: the id may live on another.
                if let Some((_, cached)) = shared
                    .cache
                    .remove_if(&id, |_, c| c.session.router() == router)
                {
                    // Closed and let go contained: it may be the last handle.
                    shared.close_all_quietly(vec![(
                        cached.session,
                        cached.created,
                        CloseReason::Reclaimed,
                    )]);
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
        // By key when the findings carry keys: a record of a session that
        // reused the id since is not this finding.
        let lives = findings.closed_lives();
        for (n, &id) in findings.closed_in_store.iter().enumerate() {
            let Some(record) = scan.records.get(&id).copied() else {
                continue;
            };
            let life = lives.and_then(|lives| lives.get(n));
            if life.is_some_and(|key| key.generation() != generation(record.created)) {
                continue; // another life of the id
            }
            if record.closed.is_none() || fenced(record.router) || now.orphans.contains(&id) {
                continue; // a deletion's `finish` or the orphan pass has it
            }
            if self.evict(&record, true).await? {
                repairs.push(repaired(&record, RepairAction::ClosedRemoved));
            }
        }
        self.repair_unreadable(findings, &scan, &mut repairs)
            .await?;
        Ok(repairs)
    }

    /// Removes the unreadable keys that are certainly dead: a record of a
    /// router this store deleted (with its pointer, if created with it),
    /// and a pointer of an id with no record. A record of a live or fenced
    /// router is left: a newer controller may read it, and the router's
    /// deletion removes it. A record of a router the store does not know
    /// is left too: it may be another writer's key. Router keys are left
    /// (reported only).
    async fn repair_unreadable(
        &self,
        findings: &AuditReport,
        scan: &Scan,
        repairs: &mut Vec<Repair>,
    ) -> Result<(), EtcdError> {
        let shared = &self.shared;
        for unreadable in &scan.unreadable {
            if !findings.unreadable.contains(&unreadable.name()) {
                continue;
            }
            let (router, id) = match unreadable.kind {
                KeyKind::Record(router, id) => {
                    // Of a router this store deleted. One it does not know
                    // may be another store's key (nested in this prefix):
                    // reported, never removed.
                    let dead = matches!(scan.routers.get(&router), Some(RouterStatus::Deleted(_)))
                        && !scan
                            .unreadable
                            .iter()
                            .any(|u| u.kind == KeyKind::Router(router));
                    if !dead {
                        continue;
                    }
                    (router, id)
                }
                KeyKind::Pointer(id) => {
                    let recorded = scan.records.contains_key(&id)
                        || scan
                            .unreadable
                            .iter()
                            .any(|u| matches!(u.kind, KeyKind::Record(_, other) if other == id));
                    if recorded {
                        continue;
                    }
                    (RouterId::new(0), id)
                }
                KeyKind::Router(_) => continue,
            };
            // Only the very value audited (its `mod_revision`).
            let mut ops = vec![TxnOp::delete(unreadable.key.clone(), None)];
            if let KeyKind::Record(..) = unreadable.kind {
                let pointer = shared.keys.pointer(id);
                ops.push(TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            pointer.clone(),
                            CompareOp::Equal,
                            unreadable.created,
                        )])
                        .and_then([TxnOp::delete(pointer, None)]),
                ));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    unreadable.key.clone(),
                    CompareOp::Equal,
                    unreadable.modified,
                )])
                .and_then(ops);
            if self.guarded("remove unreadable key", txn).await? {
                repairs.push(Repair {
                    session: id,
                    router,
                    incarnation: Incarnation::new(0),
                    action: RepairAction::UnreadableRemoved,
                });
            }
        }
        Ok(())
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
            shared.uncache(record.id, record.created);
        }
        // The last handle, maybe: the payload's `Drop` is user code.
        crate::contain::drop_each_logged(cached, "etcd repair");
        Ok(deleted)
    }

    /// Sends a guarded repair; `true` if its guard held.
    pub(super) async fn guarded(
        &self,
        operation: &'static str,
        txn: Txn,
    ) -> Result<bool, EtcdError> {
        Ok(self.shared.txn(operation, txn).await?.succeeded())
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
