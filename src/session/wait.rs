//! Close-notification futures.
//!
//! # Invariants
//!
//! A waiter checks `COMPLETE` and registers its waker in one critical section
//! of the session's lock; the closer sets `COMPLETE` and takes every waker in
//! one critical section of the same lock. So a waiter either sees the close
//! or is woken by it: no wake-up is lost. A waiter that leaves before the
//! close clears its own slot, so a cancelled wait leaks nothing.
//!
//! # Deadlock safety
//!
//! The only lock is the session's (see `handle.rs`). No waker code runs
//! under it: a waiter clones its waker before taking it, and the waker it
//! does not keep (or the one it replaced, or the one a leaving waiter takes
//! out) drops after it; the closer wakes the wakers after it too. Dropping
//! a waker may drop a task and the session handles it holds, whose
//! payloads' `Drop` may call back into this very session.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::handle::{Inner, Session};
use super::state::CloseReason;

/// Future returned by [`Session::closed`]: resolves with the close reason once
/// the session's close has completed. See the example on [`Session::closed`].
#[must_use = "futures do nothing unless polled"]
pub struct WaitForClose<'a, P> {
    session: &'a Session<P>,
    slot: Option<usize>,
}

/// Future returned by [`Session::closed_owned`]: the `'static` variant of
/// [`WaitForClose`].
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     session::WaitForCloseOwned, CloseReason, Incarnation, NewSession, RouterId, SessionId,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// // Owned futures can be stored and spawned: one cleanup task per session.
/// let waiter: WaitForCloseOwned<()> = session.closed_owned();
/// let cleanup = tokio::spawn(async move {
///     let reason = waiter.await;
///     println!("session closed: {reason}");
///     reason
/// });
/// let _ = session.close(CloseReason::RouterDeleted);
/// assert_eq!(cleanup.await?, CloseReason::RouterDeleted);
/// # Ok(())
/// # }
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct WaitForCloseOwned<P> {
    session: Session<P>,
    slot: Option<usize>,
}

impl<'a, P> WaitForClose<'a, P> {
    pub(super) fn new(session: &'a Session<P>) -> Self {
        Self {
            session,
            slot: None,
        }
    }
}

impl<P> WaitForCloseOwned<P> {
    pub(super) fn new(session: Session<P>) -> Self {
        Self {
            session,
            slot: None,
        }
    }
}

impl<P> Future for WaitForClose<'_, P> {
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let this = self.get_mut();
        poll_closed(&this.session.inner, &mut this.slot, cx)
    }
}

impl<P> Future for WaitForCloseOwned<P> {
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let this = self.get_mut();
        poll_closed(&this.session.inner, &mut this.slot, cx)
    }
}

impl<P> Drop for WaitForClose<'_, P> {
    fn drop(&mut self) {
        leave(&self.session.inner, &mut self.slot);
    }
}

impl<P> Drop for WaitForCloseOwned<P> {
    fn drop(&mut self) {
        leave(&self.session.inner, &mut self.slot);
    }
}

impl<P> fmt::Debug for WaitForClose<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitForClose")
            .field("session", &self.session.id())
            .finish_non_exhaustive()
    }
}

impl<P> fmt::Debug for WaitForCloseOwned<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitForCloseOwned")
            .field("session", &self.session.id())
            .finish_non_exhaustive()
    }
}

fn poll_closed<P>(
    inner: &Inner<P>,
    slot: &mut Option<usize>,
    cx: &mut Context<'_>,
) -> Poll<CloseReason> {
    // Fast path without the lock; `completed` is an Acquire load.
    if let Some(reason) = inner.word.completed() {
        // The closer emptied the waiter list: the slot is gone with it.
        *slot = None;
        return Poll::Ready(reason);
    }
    // Cloned before the lock and the unused waker dropped after it: a
    // waker's clone and drop are user code (dropping the last waker of a
    // task drops the task, and whatever session handles it holds).
    let waker = cx.waker().clone();
    let (poll, unused) = register(inner, slot, waker);
    drop(unused);
    poll
}

/// The locked part of [`poll_closed`]: registers `waker` in the waiter's
/// slot unless the close completed; returns the waker that is not kept
/// (the one given, or the one it replaced) for the caller to drop after the
/// lock.
fn register<P>(
    inner: &Inner<P>,
    slot: &mut Option<usize>,
    waker: Waker,
) -> (Poll<CloseReason>, Option<Waker>) {
    let mut shared = inner.shared.lock();
    if let Some(reason) = inner.word.completed() {
        *slot = None;
        return (Poll::Ready(reason), Some(waker));
    }
    let waiters = &mut shared.waiters;
    match slot.and_then(|index| waiters.get_mut(index)) {
        // `will_wake` compares pointers only: no user code.
        Some(Some(registered)) if registered.will_wake(&waker) => (Poll::Pending, Some(waker)),
        Some(Some(registered)) => (Poll::Pending, Some(std::mem::replace(registered, waker))),
        _ => {
            // Reuse a slot freed by a cancelled waiter, so a session's list
            // never grows past its peak number of concurrent waiters.
            let index = match waiters.iter().position(Option::is_none) {
                Some(index) => index,
                None => {
                    waiters.push(None);
                    waiters.len() - 1
                }
            };
            waiters[index] = Some(waker);
            *slot = Some(index);
            (Poll::Pending, None)
        }
    }
}

/// Unregisters a waiter that leaves before the close completes.
fn leave<P>(inner: &Inner<P>, slot: &mut Option<usize>) {
    let Some(index) = slot.take() else { return };
    let left = {
        let mut shared = inner.shared.lock();
        // After the close completed the list is empty and stays empty, so
        // this finds nothing; before, the slot is this waiter's own.
        let left = shared.waiters.get_mut(index).and_then(Option::take);
        while matches!(shared.waiters.last(), Some(None)) {
            shared.waiters.pop();
        }
        left
    };
    // After the lock, as in `poll_closed`.
    drop(left);
}
