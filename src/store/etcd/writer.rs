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
//! - A write is retried (with capped backoff) until etcd applied it or its
//!   record is gone; nothing queued is dropped while the store is alive.
//!
//! # Deadlock safety
//!
//! The writer takes no lock; it owns its queue's receiver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Duration;

/// At most this many operations in one transaction (etcd's default
/// `--max-txn-ops` is 128).
pub(super) const MAX_TXN_OPS: usize = 128;

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
}

/// Writes what arrives on `queue` until every sender is gone.
pub(super) async fn run(
    kv: KvClient,
    mut queue: mpsc::UnboundedReceiver<Write>,
    concurrency: usize,
    counters: Arc<WriterCounters>,
) {
    const MAX_BATCH: usize = 8192;
    let writer = Writer {
        kv,
        concurrency: concurrency.max(1),
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
    counters: Arc<WriterCounters>,
}

/// A write guarded on its record's `create_revision`.
trait Guarded {
    /// How many fit in one transaction.
    const PER_TXN: usize;
    fn record(&self) -> &[u8];
    fn created(&self) -> i64;
    /// The operations that make the write.
    fn ops(&self) -> impl Iterator<Item = TxnOp>;
    /// Called once: `true` if written, `false` if the record was gone.
    fn done(self, written: bool);
}

impl Guarded for CloseWrite {
    const PER_TXN: usize = MAX_TXN_OPS;

    fn record(&self) -> &[u8] {
        &self.record
    }

    fn created(&self) -> i64 {
        self.created
    }

    fn ops(&self) -> impl Iterator<Item = TxnOp> {
        std::iter::once(TxnOp::put(self.record.clone(), self.value.clone(), None))
    }

    fn done(self, _written: bool) {}
}

impl Guarded for RemoveWrite {
    const PER_TXN: usize = MAX_TXN_OPS / 2;

    fn record(&self) -> &[u8] {
        &self.record
    }

    fn created(&self) -> i64 {
        self.created
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
    /// Writes `writes` in transactions of `W::PER_TXN`, several in flight.
    async fn write<W: Guarded>(&self, writes: Vec<W>, counter: &AtomicU64) {
        if writes.is_empty() {
            return;
        }
        let count = writes.len() as u64;
        futures::stream::iter(chunked(writes, W::PER_TXN))
            .for_each_concurrent(self.concurrency, |chunk| self.chunk(chunk))
            .await;
        counter.fetch_add(count, Ordering::Relaxed);
    }

    /// Writes one chunk, retrying until etcd took it; writes whose record
    /// is gone (removed, or their router finished) are dropped from it.
    async fn chunk<W: Guarded>(&self, mut chunk: Vec<W>) {
        let mut failures = 0u32;
        while !chunk.is_empty() {
            let guards: Vec<Compare> = chunk
                .iter()
                .map(|w| Compare::create_revision(w.record(), CompareOp::Equal, w.created()))
                .collect();
            let ops: Vec<TxnOp> = chunk.iter().flat_map(Guarded::ops).collect();
            let txn = Txn::new()
                .when(guards)
                .and_then(ops)
                .or_else(probes(chunk.iter().map(Guarded::record)));
            match self.send(txn, &mut failures).await {
                Some(Ok(())) => {
                    for write in chunk {
                        write.done(true);
                    }
                    return;
                }
                Some(Err(current)) => {
                    let mut left = Vec::with_capacity(chunk.len());
                    for (write, created) in chunk.into_iter().zip(current) {
                        if created == Some(write.created()) {
                            left.push(write);
                        } else {
                            write.done(false);
                        }
                    }
                    chunk = left;
                }
                None => {}
            }
        }
    }

    /// Sends one guarded transaction. `Some(Ok)`: applied. `Some(Err)`: the
    /// guard failed, with each record's current `create_revision` (`None`:
    /// gone). `None`: etcd failed; the caller tries again after a backoff.
    async fn send(&self, txn: Txn, failures: &mut u32) -> Option<Result<(), Vec<Option<i64>>>> {
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        match self.kv.clone().txn(txn).await {
            Ok(response) if response.succeeded() => Some(Ok(())),
            Ok(response) => Some(Err(response
                .op_responses()
                .into_iter()
                .map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.create_revision()),
                    _ => None,
                })
                .collect())),
            Err(error) => {
                *failures = failures.saturating_add(1);
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(*failures);
                tracing::warn!(%error, ?delay, "etcd write failed; retrying");
                tokio::time::sleep(delay).await;
                None
            }
        }
    }
}

/// The failure branch of a guarded write: each record, keys only.
fn probes<'a>(records: impl Iterator<Item = &'a [u8]>) -> Vec<TxnOp> {
    records
        .map(|record| TxnOp::get(record, Some(GetOptions::new().with_keys_only())))
        .collect()
}

/// 50 ms doubling to 2 s.
pub(super) fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(6);
    Duration::from_millis(50 << exponent).min(Duration::from_secs(2))
}

fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut chunks = Vec::with_capacity(items.len().div_ceil(size));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(size).collect());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(40), Duration::from_secs(2));
    }

    #[test]
    fn chunks_keep_order_and_size() {
        let chunks = chunked((0..10).collect(), 4);
        assert_eq!(chunks, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        assert!(chunked(Vec::<u8>::new(), 4).is_empty());
    }
}
