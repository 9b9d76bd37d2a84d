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
//! - The binary heap orders small keys only; each key names the slot of
//!   `tasks` that holds its task, and a slot is free (`None`, listed in
//!   `free`) exactly when no key names it. Sifting moves 24-byte keys, not
//!   tasks.
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
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

use super::dead::{DeadLetters, Outstanding};
use super::policy::{Priority, ReclaimPolicy};
use super::room::Room;
use super::task::ReclaimTask;
use crate::events::EventBus;
use crate::events::TaskInfo;

pub(super) struct Shared {
    pub(super) heap: Mutex<Heap>,
    /// The free slots.
    pub(super) room: Room,
    pub(super) capacity: usize,
    pub(super) workers: usize,
    /// Wakes workers: one per push, all on resume and close.
    pub(super) work: Notify,
    /// Wakes `idle` waiters when the last running task ends.
    pub(super) idle: Notify,
    /// How many `idle` calls wait: the last task's end wakes them only if
    /// some do.
    pub(super) idle_waiters: AtomicUsize,
    pub(super) policy: Arc<dyn ReclaimPolicy>,
    pub(super) epoch: Instant,
    pub(super) paused: AtomicBool,
    /// Set under `heap` when the queue stops taking tasks.
    pub(super) closed: AtomicBool,
    /// Workers exit at once (a shutdown deadline passed).
    pub(super) stop: AtomicBool,
    pub(super) counters: Counters,
    /// Tasks that failed for good, kept for a re-drive.
    pub(super) dead: Mutex<DeadLetters>,
    /// Tasks outstanding by class, and the dead-letter counters.
    pub(super) outstanding: Outstanding,
    pub(super) bus: Option<EventBus>,
    pub(super) tracker: TaskTracker,
    pub(super) aborts: Mutex<Vec<AbortHandle>>,
    pub(super) interrupted: Mutex<Vec<TaskInfo>>,
}

#[derive(Default)]
pub(super) struct Heap {
    entries: BinaryHeap<Entry>,
    /// The waiting tasks, by slot; `None` for a free slot.
    tasks: Vec<Option<ReclaimTask>>,
    /// Free slots of `tasks`.
    free: Vec<usize>,
    pub(super) seq: u64,
    pub(super) peak: usize,
}

impl Heap {
    /// How many tasks wait.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn push(&mut self, due: u64, task: ReclaimTask) {
        let slot = match self.free.pop() {
            Some(slot) if slot < self.tasks.len() => {
                self.tasks[slot] = Some(task);
                slot
            }
            _ => {
                self.tasks.push(Some(task));
                self.tasks.len() - 1
            }
        };
        let seq = self.seq;
        self.seq += 1;
        self.entries.push(Entry { due, seq, slot });
        self.peak = self.peak.max(self.entries.len());
    }

    fn pop(&mut self) -> Option<ReclaimTask> {
        while let Some(entry) = self.entries.pop() {
            let task = self.tasks.get_mut(entry.slot).and_then(Option::take);
            self.free.push(entry.slot);
            if task.is_some() {
                return task;
            }
        }
        None
    }

    /// Every waiting task, due first, leaving the heap empty.
    pub(super) fn take_all(&mut self) -> Vec<ReclaimTask> {
        let mut all = Vec::with_capacity(self.entries.len());
        while let Some(task) = self.pop() {
            all.push(task);
        }
        all
    }
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

/// A waiting task's key: due time (nanoseconds after the queue's epoch)
/// and push sequence, and the slot of `Heap::tasks` holding the task.
struct Entry {
    due: u64,
    seq: u64,
    slot: usize,
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
    /// Inserts an accepted task (its slot already taken); hands it back
    /// (and frees the slot) if the queue closed meanwhile. A `fresh` task
    /// is counted as pushed and outstanding; a re-driven one already is.
    pub(super) fn insert(&self, task: ReclaimTask, fresh: bool) -> Result<(), ReclaimTask> {
        let info = task.info();
        let class = info.class;
        // User code: outside the lock, contained.
        let priority = catch_unwind(AssertUnwindSafe(|| self.policy.priority(&info)))
            .unwrap_or(Priority::URGENT);
        let since = Instant::now().saturating_duration_since(self.epoch);
        let due = duration_nanos(since).saturating_add(duration_nanos(priority.delay()));
        // Counted before a worker can see it: its completion may come
        // before this call returns.
        if fresh {
            self.outstanding.add(class);
        }
        {
            let mut heap = self.heap.lock();
            if self.closed.load(Ordering::SeqCst) {
                drop(heap);
                if fresh {
                    self.outstanding.remove(class, 1);
                }
                self.room.give(1);
                return Err(task);
            }
            heap.push(due, task);
        }
        if fresh {
            self.counters.pushed.fetch_add(1, Ordering::Relaxed);
        }
        self.work.notify_one();
        Ok(())
    }

    /// Takes the task due first, freeing its slot.
    pub(super) fn pop(&self) -> Option<ReclaimTask> {
        let task = {
            let mut heap = self.heap.lock();
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let task = heap.pop()?;
            // Counted before the lock drops: `is_idle` never sees a task
            // that is neither waiting nor running.
            self.counters.in_flight.fetch_add(1, Ordering::SeqCst);
            task
        };
        self.room.give(1);
        Some(task)
    }

    pub(super) fn is_idle(&self) -> bool {
        let heap = self.heap.lock();
        heap.len() == 0 && self.counters.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Stops taking tasks; workers drain and exit.
    pub(super) fn close(&self) {
        {
            let _heap = self.heap.lock();
            self.closed.store(true, Ordering::SeqCst);
        }
        self.room.close();
        self.work.notify_waiters();
    }
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
