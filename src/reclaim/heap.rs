//! The queue's shared state: the heap of waiting tasks, the permits that
//! bound it, the counters.
//!
//! # Invariants
//!
//! - Every accepted task is run by a worker, handed back by `shutdown`, or
//!   (running when a shutdown deadline passed) reported failed as
//!   interrupted. A task is accepted only under the `heap` lock while the
//!   queue is open, and `close` sets `closed` under the same lock, so no task
//!   enters after the workers can decide to exit.
//! - At most `capacity` tasks wait: a push holds one permit of `permits`
//!   from before it enters until a worker takes it out.
//! - Entries are ordered by `(due, seq)`, both fixed at push: the order is a
//!   strict total order, so a pop returns the task due first, oldest first.
//!
//! # Deadlock safety
//!
//! One lock, `heap`, held only to insert, remove or count entries, never
//! across an `.await` nor while user code (policy, task) runs. The
//! `interrupted` list has its own lock, taken alone.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

use super::policy::{Priority, ReclaimPolicy};
use super::task::ReclaimTask;
use crate::events::EventBus;
use crate::events::TaskInfo;

pub(super) struct Shared {
    pub(super) heap: Mutex<Heap>,
    /// One permit per free slot.
    pub(super) permits: Semaphore,
    pub(super) capacity: usize,
    pub(super) workers: usize,
    /// Wakes workers: one per push, all on resume and close.
    pub(super) work: Notify,
    /// Wakes `idle` waiters when the last running task ends.
    pub(super) idle: Notify,
    pub(super) policy: Arc<dyn ReclaimPolicy>,
    pub(super) epoch: Instant,
    pub(super) paused: AtomicBool,
    /// Set under `heap` when the queue stops taking tasks.
    pub(super) closed: AtomicBool,
    /// Workers exit at once (a shutdown deadline passed).
    pub(super) stop: AtomicBool,
    pub(super) counters: Counters,
    pub(super) bus: Option<EventBus>,
    pub(super) tracker: TaskTracker,
    pub(super) aborts: Mutex<Vec<AbortHandle>>,
    pub(super) interrupted: Mutex<Vec<TaskInfo>>,
}

#[derive(Default)]
pub(super) struct Heap {
    pub(super) entries: BinaryHeap<Entry>,
    pub(super) seq: u64,
    pub(super) peak: usize,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) pushed: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) long_lived: AtomicU64,
    pub(super) in_flight: AtomicUsize,
}

/// A waiting task and its key: due time (nanoseconds after the queue's
/// epoch) and push sequence.
pub(super) struct Entry {
    due: u64,
    seq: u64,
    pub(super) task: ReclaimTask,
}

impl Entry {
    fn key(&self) -> (u64, u64) {
        (self.due, self.seq)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed: `BinaryHeap` is a max-heap and the smallest key goes first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.key().cmp(&self.key())
    }
}

impl Shared {
    /// Inserts an accepted task (its permit already taken); hands it back
    /// if the queue closed meanwhile.
    pub(super) fn insert(&self, task: ReclaimTask) -> Result<(), ReclaimTask> {
        // User code: outside the lock, contained.
        let priority = catch_unwind(AssertUnwindSafe(|| self.policy.priority(&task.info())))
            .unwrap_or(Priority::URGENT);
        let since = Instant::now().saturating_duration_since(self.epoch);
        let due = duration_nanos(since).saturating_add(duration_nanos(priority.delay()));
        {
            let mut heap = self.heap.lock();
            if self.closed.load(Ordering::SeqCst) {
                drop(heap);
                self.permits.add_permits(1);
                return Err(task);
            }
            let seq = heap.seq;
            heap.seq += 1;
            heap.entries.push(Entry { due, seq, task });
            heap.peak = heap.peak.max(heap.entries.len());
        }
        self.counters.pushed.fetch_add(1, Ordering::Relaxed);
        self.work.notify_one();
        Ok(())
    }

    /// Takes the task due first, freeing its slot.
    pub(super) fn pop(&self) -> Option<ReclaimTask> {
        let entry = {
            let mut heap = self.heap.lock();
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let entry = heap.entries.pop()?;
            // Counted before the lock drops: `is_idle` never sees a task
            // that is neither waiting nor running.
            self.counters.in_flight.fetch_add(1, Ordering::SeqCst);
            entry
        };
        self.permits.add_permits(1);
        Some(entry.task)
    }

    pub(super) fn is_idle(&self) -> bool {
        let heap = self.heap.lock();
        heap.entries.is_empty() && self.counters.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Stops taking tasks; workers drain and exit.
    pub(super) fn close(&self) {
        {
            let _heap = self.heap.lock();
            self.closed.store(true, Ordering::SeqCst);
        }
        self.permits.close();
        self.work.notify_waiters();
    }
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
