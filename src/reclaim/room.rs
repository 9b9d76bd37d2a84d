//! [`Room`]: the queue's bound, the free slots and the pushes waiting for
//! one.
//!
//! A counter and a [`Notify`] instead of a semaphore: taking a slot is one
//! compare-and-swap, freeing one an add and a load, and the waiters are
//! woken only when there are some (a semaphore takes its waiters' lock on
//! every release).
//!
//! # Invariants
//!
//! - `free` never exceeds the capacity given back to it: a slot is taken
//!   by exactly one successful `try_take`/`take`, and given back once.
//! - No wake-up is lost. A waiter counts itself in `waiting` and enables
//!   its `Notified` before it looks at `free` again; a giver adds to
//!   `free` before it reads `waiting`. Both are `SeqCst`, so either the
//!   waiter sees the slot or the giver sees the waiter (and wakes one; a
//!   waiter woken for a slot someone else took looks again and waits).
//! - After `close`, every take fails and every waiter is woken.
//!
//! # Deadlock safety
//!
//! No lock: atomics and a `Notify`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

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
    free: AtomicUsize,
    waiting: AtomicUsize,
    freed: Notify,
    closed: AtomicBool,
}

impl Room {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            free: AtomicUsize::new(capacity),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Takes a slot if one is free now.
    pub(super) fn try_take(&self) -> Result<(), NoRoom> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(NoRoom::Closed);
        }
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |free| {
                free.checked_sub(1)
            })
            .map(drop)
            .map_err(|_| NoRoom::Full)
    }

    /// Takes a slot, waiting for one; fails only once closed.
    ///
    /// Cancel-safe: dropped while waiting, it takes nothing (a wake-up it
    /// received goes on to another waiter, as `Notify` does).
    pub(super) async fn take(&self) -> Result<(), NoRoom> {
        /// Counts a waiter until it returns or drops.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        match self.try_take() {
            Err(NoRoom::Full) => {}
            taken_or_closed => return taken_or_closed,
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_take() {
                Err(NoRoom::Full) => notified.await,
                taken_or_closed => return taken_or_closed,
            }
        }
    }

    /// Gives `slots` back, waking as many waiters.
    pub(super) fn give(&self, slots: usize) {
        if slots == 0 {
            return;
        }
        self.free.fetch_add(slots, Ordering::SeqCst);
        let waiting = self.waiting.load(Ordering::SeqCst);
        if waiting == 0 {
            return;
        }
        for _ in 0..slots.min(waiting) {
            self.freed.notify_one();
        }
    }

    /// Fails every take from now on and wakes every waiter.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.free.load(Ordering::SeqCst)
    }
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use std::sync::Arc;

    use super::{NoRoom, Room};

    #[tokio::test]
    async fn slots_are_taken_given_back_and_refused_once_closed() {
        let room = Room::new(2);
        assert_eq!(room.try_take(), Ok(()));
        assert_eq!(room.take().await, Ok(()));
        assert_eq!(room.try_take(), Err(NoRoom::Full));
        room.give(1);
        assert_eq!(room.free(), 1);
        assert_eq!(room.try_take(), Ok(()));
        room.close();
        room.give(2);
        assert_eq!(room.try_take(), Err(NoRoom::Closed));
        assert_eq!(room.take().await, Err(NoRoom::Closed));
    }

    /// Many takers on few slots, givers racing them on two threads: every
    /// taker gets a slot, none is woken late or lost, and the count ends
    /// where it began.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_takers_and_givers_lose_no_wake_up() {
        let room = Arc::new(Room::new(2));
        let mut takers = Vec::new();
        for _ in 0..64 {
            let room = Arc::clone(&room);
            takers.push(tokio::spawn(async move {
                for _ in 0..200 {
                    room.take().await.expect("open");
                    tokio::task::yield_now().await;
                    room.give(1);
                }
            }));
        }
        for taker in takers {
            tokio::time::timeout(std::time::Duration::from_secs(30), taker)
                .await
                .expect("no taker is left waiting")
                .expect("no panic");
        }
        assert_eq!(room.free(), 2);
    }

    /// A waiter dropped after it was woken passes the wake-up on.
    #[tokio::test]
    async fn a_cancelled_waiter_passes_its_wake_up_on() {
        let room = Arc::new(Room::new(1));
        room.try_take().expect("free");
        let first = {
            let room = Arc::clone(&room);
            tokio::spawn(async move { room.take().await })
        };
        let second = {
            let room = Arc::clone(&room);
            tokio::spawn(async move { room.take().await })
        };
        tokio::task::yield_now().await;
        first.abort();
        room.give(1);
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the second waiter gets the slot");
        assert_eq!(taken.expect("no panic"), Ok(()));
    }
}
