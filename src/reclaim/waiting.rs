//! [`Heap`]: the waiting tasks, due first.
//!
//! # Invariants
//!
//! - Entries are ordered by `(due, seq)`, both fixed at push: the order is a
//!   strict total order, so a pop returns the task due first, oldest first.
//! - The binary heap orders small keys only; each key names the slot of
//!   `tasks` that holds its task, and a slot is free (`None`, listed in
//!   `free`) exactly when no key names it. Sifting moves 24-byte keys, not
//!   tasks, and compares them as one `u128`.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;

use super::task::ReclaimTask;

/// The waiting tasks: a binary heap of keys over a slab of tasks.
#[derive(Default)]
pub(super) struct Heap {
    entries: BinaryHeap<Entry>,
    /// The waiting tasks, by slot; `None` for a free slot.
    tasks: Vec<Option<ReclaimTask>>,
    /// Free slots of `tasks`.
    free: Vec<usize>,
    seq: u64,
    /// The most tasks ever waiting at once.
    pub(super) peak: usize,
}

impl Heap {
    /// How many tasks wait.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn push(&mut self, due: u64, task: ReclaimTask) {
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

    pub(super) fn pop(&mut self) -> Option<ReclaimTask> {
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

/// A waiting task's key: due time (nanoseconds after the queue's epoch)
/// and push sequence, and the slot of `Heap::tasks` holding the task.
struct Entry {
    due: u64,
    seq: u64,
    slot: usize,
}

impl Entry {
    /// `(due, seq)` in one integer: one comparison.
    fn key(&self) -> u128 {
        (u128::from(self.due) << 64) | u128::from(self.seq)
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
