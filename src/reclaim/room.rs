//! [`Room`]: the queue's bound, the free slots and the pushes waiting for
//! one.
//!
//! Counted under the queue's `state` lock, which a push and a pop take
//! anyway: taking or freeing a slot costs no atomic of its own while no
//! push waits. Pushes that find no room wait in line on a semaphore with
//! no permits of its own (`Shared::handoff`, a fair FIFO semaphore): a
//! slot freed while pushes wait becomes a permit there and goes to the
//! push that has waited longest, never to a later push.
//!
//! # Invariants
//!
//! - Every slot is in exactly one place: free (`free`), a permit of
//!   `handoff` (given to a waiting push, or left by one that went away),
//!   on its way there (counted off `waiting`, not yet added), or taken (a
//!   waiting task, or reserved by a push or a `redrive` about to insert).
//! - `waiting` is never below the number of pushes waiting on `handoff`
//!   less the permits on their way to it: a push gets in line on
//!   `handoff` first, then counts itself in under the lock, looking at the
//!   free slots once more; a slot given back while `waiting` is above
//!   0 claims one and becomes a permit; a push that stops waiting
//!   unserved (dropped) counts itself out if `waiting` is above 0 (if a
//!   slot claimed it meanwhile, that slot's permit serves the next push in
//!   line, or stays free in `handoff`). So a waiting push is never left
//!   without a slot coming, and `free` grows only when no push waits
//!   unserved: a fresh push takes a free slot only when no push waits, or
//!   a permit nobody waits for.
//!
//! # Deadlock safety
//!
//! No lock of its own: counted under `state`. `handoff`'s own lock is a
//! leaf: `try_acquire` under `state` calls nothing back; `add_permits`
//! (which wakes a waiting push) and `close` come after `state` is
//! released.

use std::pin::pin;
use std::task::Poll;

use tokio::sync::SemaphorePermit;

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
    /// Slots that tasks put back by a worker that went away hold without
    /// having taken one (the queue was full): the next slots given back
    /// pay them first, so the queue holds at most its capacity again.
    owed: usize,
    /// Pushes registered with `freed`, not yet claimed by a wake-up.
    pub(super) waiting: usize,
}

impl Room {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            free: capacity,
            owed: 0,
            waiting: 0,
        }
    }

    /// Takes a slot if one is free.
    pub(super) fn take(&mut self) -> bool {
        let free = self.free > 0;
        self.free -= usize::from(free);
        free
    }

    /// Gives `slots` back; returns how many of them go to waiting pushes,
    /// as permits of `handoff` to add after the lock.
    #[must_use]
    pub(super) fn give(&mut self, slots: usize) -> usize {
        let paid = slots.min(self.owed);
        self.owed -= paid;
        let slots = slots - paid;
        let claimed = slots.min(self.waiting);
        self.waiting -= claimed;
        self.free += slots - claimed;
        claimed
    }

    /// Takes a slot for a task put back: a free one, or one owed.
    pub(super) fn take_or_owe(&mut self) {
        if !self.take() {
            self.owed += 1;
        }
    }

    /// Counts out a push that stopped waiting before it was served.
    fn leave(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }
}

impl Shared {
    /// Takes a slot if one is free now: a free one, or a permit of
    /// `handoff` that no waiting push took. Under the `state` lock.
    pub(super) fn take_now(&self, room: &mut Room) -> bool {
        room.take()
            || self
                .handoff
                .try_acquire()
                .map(SemaphorePermit::forget)
                .is_ok()
    }

    /// Takes a slot, waiting in line for one; fails only once closed.
    ///
    /// Cancel-safe: dropped while waiting, it takes nothing, and a slot
    /// already handed to it goes on to the next push in line.
    pub(super) async fn reserve(&self) -> Result<(), NoRoom> {
        {
            let mut state = self.state.lock();
            if state.closed {
                return Err(NoRoom::Closed);
            }
            if self.take_now(&mut state.room) {
                return Ok(());
            }
        }
        // In line first, counted in after: a slot given from the moment it
        // is counted goes to the line, where it is in already (counted in
        // before it, the slot could become a free permit first, and a
        // later push take it, leaving this one waiting uncounted for
        // ever). Out of tokio's cooperative budget, a first poll would not
        // get in line.
        let mut served = pin!(tokio::task::unconstrained(self.handoff.acquire()));
        let mut in_line = match futures::poll!(served.as_mut()) {
            Poll::Ready(Ok(permit)) => {
                permit.forget();
                return Ok(());
            }
            Poll::Ready(Err(_)) => return Err(NoRoom::Closed),
            Poll::Pending => {
                let looked = {
                    let mut state = self.state.lock();
                    if state.closed {
                        Some(Err(NoRoom::Closed))
                    } else if state.room.take() {
                        // A slot freed since it looked.
                        Some(Ok(()))
                    } else {
                        state.room.waiting += 1;
                        None
                    }
                };
                if let Some(looked) = looked {
                    // Its place in line goes after the lock (anything
                    // handed to it there passes on, waking a push).
                    return looked;
                }
                InLine(Some(self))
            }
        };
        let served = served.await;
        in_line.0 = None;
        match served {
            Ok(permit) => {
                permit.forget();
                Ok(())
            }
            // Closed: `close` counted every waiting push out.
            Err(_) => Err(NoRoom::Closed),
        }
    }

    /// Gives back a slot taken by [`reserve`](Self::reserve) and not used.
    pub(super) fn give_back_reserved(&self) {
        let claimed = self.state.lock().room.give(1);
        self.wake_pushers(claimed);
    }
}

/// A push waiting in line; counted out of `waiting` if it drops unserved.
struct InLine<'a>(Option<&'a Shared>);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        if let Some(shared) = self.0 {
            shared.state.lock().room.leave();
        }
    }
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::Room;

    #[test]
    fn slots_given_back_go_to_waiting_pushes_first_then_free() {
        let mut room = Room::new(2);
        assert!(room.take());
        assert!(room.take());
        assert!(!room.take());
        room.waiting = 1;
        // One of the two goes to the waiting push (a permit), one is free.
        assert_eq!(room.give(2), 1);
        assert_eq!(room.waiting, 0);
        assert_eq!(room.give(0), 0);
        assert!(room.take());
        assert!(!room.take());
        room.waiting = 2;
        room.leave();
        room.leave();
        room.leave();
        assert_eq!(room.waiting, 0);
        assert_eq!(room.give(1), 0);
        assert!(room.take());
    }

    #[test]
    fn a_task_put_back_into_a_full_queue_owes_its_slot() {
        let mut room = Room::new(1);
        assert!(room.take());
        // Put back with no slot free: owed, paid by the next slot given.
        room.take_or_owe();
        room.waiting = 1;
        assert_eq!(room.give(1), 0, "the slot pays the debt, not the push");
        assert!(!room.take());
        assert_eq!(room.give(1), 1, "then slots go to the waiting push");
        assert_eq!(room.give(1), 0);
        assert!(room.take());
        assert!(!room.take(), "capacity 1 again");
    }
}
