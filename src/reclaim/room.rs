//! [`Room`]: the queue's bound, the free slots and the pushes waiting for
//! one.
//!
//! Counted under the queue's `state` lock, which a push and a pop take
//! anyway: taking or freeing a slot costs no atomic of its own, and a
//! waiting push is woken only when there is one (a semaphore takes its
//! waiters' lock on every release).
//!
//! # Invariants
//!
//! - `free` never exceeds the capacity given back to it: a slot is taken
//!   by exactly one successful `take` (a push, or a `reserve`) and given
//!   back once, when its task leaves the heap (or fails to enter it).
//! - `waiting` is never below the number of pushes registered with
//!   `freed` and not yet notified (see the wake-up invariant in `heap`): a
//!   slot given back while it is above 0 claims one and notifies it.
//!
//! # Deadlock safety
//!
//! No lock of its own: under `state`; notified after it is released.

use std::pin::pin;

use super::heap::Shared;

/// Why no slot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoRoom {
    /// Every slot is taken.
    Full,
    /// The queue is closed.
    Closed,
}

#[derive(Debug)]
pub(super) struct Room {
    free: usize,
    /// Pushes registered with `freed`, not yet claimed by a wake-up.
    pub(super) waiting: usize,
}

impl Room {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            free: capacity,
            waiting: 0,
        }
    }

    /// Takes a slot if one is free.
    pub(super) fn take(&mut self) -> bool {
        let free = self.free > 0;
        self.free -= usize::from(free);
        free
    }

    /// Gives `slots` back; returns how many waiting pushes to wake (after
    /// the lock).
    #[must_use]
    pub(super) fn give(&mut self, slots: usize) -> usize {
        self.free += slots;
        let claimed = slots.min(self.waiting);
        self.waiting -= claimed;
        claimed
    }
}

impl Shared {
    /// Takes a slot, waiting for one; fails only once closed.
    ///
    /// Cancel-safe: dropped while waiting, it takes nothing (a wake-up it
    /// received goes on to another waiter, as `Notify` does).
    pub(super) async fn reserve(&self) -> Result<(), NoRoom> {
        loop {
            let mut notified = pin!(self.freed.notified());
            {
                let mut state = self.state.lock();
                if state.closed {
                    return Err(NoRoom::Closed);
                }
                if state.room.take() {
                    return Ok(());
                }
                notified.as_mut().enable();
                state.room.waiting += 1;
            }
            notified.await;
        }
    }

    /// Gives back a slot taken by [`reserve`](Self::reserve) and not used.
    pub(super) fn give_back_reserved(&self) {
        let claimed = self.state.lock().room.give(1);
        self.wake_pushers(claimed);
    }
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::Room;

    #[test]
    fn slots_are_taken_and_given_back_waking_at_most_the_waiters() {
        let mut room = Room::new(2);
        assert!(room.take());
        assert!(room.take());
        assert!(!room.take());
        room.waiting = 1;
        assert_eq!(room.give(2), 1);
        assert_eq!(room.waiting, 0);
        assert_eq!(room.give(0), 0);
        assert!(room.take());
        assert!(room.take());
        assert!(!room.take());
    }
}
