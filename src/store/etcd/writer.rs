//! The background writer: closes made on this controller's handles, and
//! removals, written to etcd in batched, guarded transactions.
//!
//! # Invariants
//!
//! - Writes leave in the order they were queued: a session's close is
//!   written before its removal (a batch writes every close before any
//!   removal), so other controllers see the reason before the deletion.
//! - Every write is guarded by the record's `create_revision`: a close or
//!   removal queued for one life of a session id never touches a later
//!   session that reuses the id, and never brings a deleted record back.
//! - A write is retried (on the store's jittered backoff) until etcd
//!   applied it or its record is gone. Transactions stay under etcd's
//!   request limits (`max_txn_ops`, 1 MiB, no key twice); a transaction
//!   etcd still refuses as
//!   such is split, and a single write it refuses is given up, logged and
//!   counted (`WriterStats::refused`): the only write ever dropped.
//!
//! # Deadlock safety
//!
//! The writer takes no lock; it owns its queue's receiver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::error::refusal;
use super::retry::{Delays, Retry};
use super::txn::{Limits, MAX_TXN_BYTES};

/// What the writer does, in queue order.
pub(super) enum Write {
    /// Mark a record closed.
    Close(CloseWrite),
    /// Delete a record and its pointer.
    Remove(RemoveWrite),
    /// Answer once everything queued before is written.
    Flush(oneshot::Sender<()>),
}

pub(super) struct CloseWrite {
    pub(super) record: Vec<u8>,
    pub(super) created: i64,
    pub(super) value: Vec<u8>,
}

pub(super) struct RemoveWrite {
    pub(super) record: Vec<u8>,
    pub(super) pointer: Vec<u8>,
    pub(super) created: i64,
    /// Told whether this removal deleted the record (`false`: it was gone).
    pub(super) done: Option<oneshot::Sender<bool>>,
}

/// Counters of the writer, read by `EtcdStore::writer_stats`.
#[derive(Debug, Default)]
pub(super) struct WriterCounters {
    pub(super) closes: AtomicU64,
    pub(super) removes: AtomicU64,
    pub(super) transactions: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) refused: AtomicU64,
}

/// Writes what arrives on `queue` until every sender is gone.
pub(super) async fn run(
    kv: KvClient,
    mut queue: mpsc::UnboundedReceiver<Write>,
    concurrency: usize,
    limits: Limits,
    retry: Retry,
    counters: Arc<WriterCounters>,
) {
    const MAX_BATCH: usize = 8192;
    let writer = Writer {
        kv,
        concurrency: concurrency.max(1),
        max_txn_ops: limits.max_txn_ops,
        retry,
        counters,
    };
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut closes = Vec::new();
        let mut removes = Vec::new();
        let mut flushes = Vec::new();
        for write in batch {
            match write {
                Write::Close(close) => closes.push(close),
                Write::Remove(remove) => removes.push(remove),
                Write::Flush(done) => flushes.push(done),
            }
        }
        writer.write(closes, &writer.counters.closes).await;
        writer.write(removes, &writer.counters.removes).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
}

struct Writer {
    kv: KvClient,
    concurrency: usize,
    max_txn_ops: usize,
    retry: Retry,
    counters: Arc<WriterCounters>,
}

/// A write guarded on its record's `create_revision`.
trait Guarded {
    /// The operations of one write.
    const OPS: usize;
    fn record(&self) -> &[u8];
    fn created(&self) -> i64;
    /// The bytes the write puts in a request.
    fn bytes(&self) -> usize;
    /// The operations that make the write.
    fn ops(&self) -> impl Iterator<Item = TxnOp>;
    /// Called once: `true` if written, `false` if the record was gone.
    fn done(self, written: bool);
}

impl Guarded for CloseWrite {
    const OPS: usize = 1;

    fn record(&self) -> &[u8] {
        &self.record
    }

    fn created(&self) -> i64 {
        self.created
    }

    fn bytes(&self) -> usize {
        2 * self.record.len() + self.value.len()
    }

    fn ops(&self) -> impl Iterator<Item = TxnOp> {
        std::iter::once(TxnOp::put(self.record.clone(), self.value.clone(), None))
    }

    fn done(self, _written: bool) {}
}

impl Guarded for RemoveWrite {
    const OPS: usize = 2;

    fn record(&self) -> &[u8] {
        &self.record
    }

    fn created(&self) -> i64 {
        self.created
    }

    fn bytes(&self) -> usize {
        3 * self.record.len() + self.pointer.len()
    }

    fn ops(&self) -> impl Iterator<Item = TxnOp> {
        [
            TxnOp::delete(self.record.clone(), None),
            TxnOp::delete(self.pointer.clone(), None),
        ]
        .into_iter()
    }

    fn done(self, written: bool) {
        if let Some(done) = self.done {
            let _ = done.send(written);
        }
    }
}

impl Writer {
    /// Writes `writes` in transactions (see [`batches`]), several in flight.
    async fn write<W: Guarded>(&self, writes: Vec<W>, counter: &AtomicU64) {
        if writes.is_empty() {
            return;
        }
        let count = writes.len() as u64;
        let per_txn = (self.max_txn_ops / W::OPS).max(1);
        futures::stream::iter(batches(writes, per_txn))
            .for_each_concurrent(self.concurrency, |chunk| self.chunk(chunk))
            .await;
        counter.fetch_add(count, Ordering::Relaxed);
    }

    /// Writes one chunk, retrying until etcd took it; writes whose record
    /// is gone (removed, or their router finished) are dropped from it. A
    /// chunk etcd refuses as such (too large, say) is split in halves; a
    /// single write it refuses is reported and given up.
    async fn chunk<W: Guarded>(&self, chunk: Vec<W>) {
        let mut pending = vec![chunk];
        let mut delays = self.retry.delays();
        while let Some(mut chunk) = pending.pop() {
            if chunk.is_empty() {
                continue;
            }
            let guards: Vec<Compare> = chunk
                .iter()
                .map(|w| Compare::create_revision(w.record(), CompareOp::Equal, w.created()))
                .collect();
            let ops: Vec<TxnOp> = chunk.iter().flat_map(Guarded::ops).collect();
            let txn = Txn::new()
                .when(guards)
                .and_then(ops)
                .or_else(probes(chunk.iter().map(Guarded::record)));
            match self.send(txn, &mut delays).await {
                Sent::Applied => {
                    for write in chunk {
                        write.done(true);
                    }
                }
                Sent::Guarded(current) => {
                    let mut left = Vec::with_capacity(chunk.len());
                    for (write, created) in chunk.into_iter().zip(current) {
                        if created == Some(write.created()) {
                            left.push(write);
                        } else {
                            write.done(false);
                        }
                    }
                    pending.push(left);
                }
                Sent::Retry => pending.push(chunk),
                Sent::Refused(error) if chunk.len() > 1 => {
                    tracing::debug!(%error, writes = chunk.len(), "etcd refused a batch; splitting it");
                    let half = chunk.split_off(chunk.len() / 2);
                    pending.push(half);
                    pending.push(chunk);
                }
                Sent::Refused(error) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    let record = String::from_utf8_lossy(chunk[0].record()).into_owned();
                    tracing::error!(%error, %record, "etcd refuses this write; giving it up");
                    for write in chunk {
                        write.done(false);
                    }
                }
            }
        }
    }

    /// Sends one guarded transaction; on a transient failure, sleeps the
    /// backoff first and says to retry.
    async fn send(&self, txn: Txn, delays: &mut Delays) -> Sent {
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        match self.kv.clone().txn(txn).await {
            Ok(response) if response.succeeded() => Sent::Applied,
            Ok(response) => Sent::Guarded(
                response
                    .op_responses()
                    .into_iter()
                    .map(|op| match op {
                        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.create_revision()),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(error) if refusal(&error).is_some() => Sent::Refused(error),
            Err(error) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                let delay = delays.next_delay();
                tracing::warn!(%error, ?delay, "etcd write failed; retrying");
                tokio::time::sleep(delay).await;
                Sent::Retry
            }
        }
    }
}

/// What became of one transaction.
enum Sent {
    Applied,
    /// The guard failed: each record's current `create_revision` (`None`:
    /// gone).
    Guarded(Vec<Option<i64>>),
    /// A transient failure (etcd unreachable, no leader): try again.
    Retry,
    /// etcd refuses this request as such: sending it again cannot succeed.
    Refused(etcd_client::Error),
}

/// Splits `writes` into transactions of at most `per_txn` writes and
/// [`MAX_TXN_BYTES`], never two writes of one key in a transaction (etcd
/// refuses duplicate keys), keeping their order.
fn batches<W: Guarded>(writes: Vec<W>, per_txn: usize) -> Vec<Vec<W>> {
    let mut batches: Vec<Vec<W>> = Vec::new();
    let mut keys = std::collections::HashSet::new();
    let mut bytes = 0;
    for write in writes {
        let full = batches.last().is_none_or(|batch| {
            batch.len() >= per_txn
                || bytes + write.bytes() > MAX_TXN_BYTES
                || keys.contains(write.record())
        });
        if full {
            batches.push(Vec::new());
            keys.clear();
            bytes = 0;
        }
        keys.insert(write.record().to_vec());
        bytes += write.bytes();
        if let Some(batch) = batches.last_mut() {
            batch.push(write);
        }
    }
    batches
}

/// The failure branch of a guarded write: each record, keys only.
fn probes<'a>(records: impl Iterator<Item = &'a [u8]>) -> Vec<TxnOp> {
    records
        .map(|record| TxnOp::get(record, Some(GetOptions::new().with_keys_only())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(id: u8, bytes: usize) -> CloseWrite {
        CloseWrite {
            record: vec![id],
            created: 1,
            value: vec![0; bytes],
        }
    }

    #[test]
    fn batches_keep_order_and_respect_count_bytes_and_keys() {
        let ids = |batches: &[Vec<CloseWrite>]| -> Vec<Vec<u8>> {
            batches
                .iter()
                .map(|b| b.iter().map(|c| c.record[0]).collect())
                .collect()
        };
        // Count: 128 per transaction.
        let many: Vec<_> = (0..=200).map(|i| close((i % 250) as u8, 1)).collect();
        let split = batches(many, 128);
        assert_eq!(
            split.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![128, 73]
        );
        // Bytes: three 400 KiB closes do not fit in one request.
        let big = batches(
            vec![
                close(1, 400 << 10),
                close(2, 400 << 10),
                close(3, 400 << 10),
            ],
            128,
        );
        assert_eq!(ids(&big), vec![vec![1, 2], vec![3]]);
        // Keys: two writes of one record never share a transaction.
        let twice = batches(
            vec![close(1, 1), close(2, 1), close(1, 1), close(3, 1)],
            128,
        );
        assert_eq!(ids(&twice), vec![vec![1, 2], vec![1, 3]]);
        assert!(batches(Vec::<CloseWrite>::new(), 128).is_empty());
    }
}
