//! Timers that follow the runtime polling them.
//!
//! A deletion's run is one future shared by its callers, polled by
//! whichever of them is awake, from whatever runtime each awaits it on. A
//! tokio timer belongs to the runtime it was made on, whose time driver
//! fires it: made on a current-thread runtime that a caller then left idle
//! (its `block_on` returned after a timeout), it never fires, and a caller
//! on another runtime that joins the run would wait for it for ever.
//! [`Deadline`] is made again on the runtime polling it whenever that is
//! another one than it was made on, and keeps the timers it made on the
//! others: whichever runtime is still driven fires its own (a joiner whose
//! runtime is then left idle strands nobody either).

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Id};
use tokio::time::{Instant, Sleep, sleep_until};

/// `sleep_until(deadline)`, on the runtime that polls it.
pub(crate) struct Deadline {
    deadline: Instant,
    /// A timer per runtime that polled it, in the order they first did:
    /// each one keeps the waker of its last poll registered with its
    /// runtime.
    timers: Vec<(Option<Id>, Pin<Box<Sleep>>)>,
}

impl Deadline {
    /// A timer for `deadline`, made on the current runtime.
    ///
    /// # Panics
    ///
    /// As `sleep_until`, outside a runtime or on one without its time
    /// driver: callers check for one first (a deletion returns
    /// `NoRuntime` before it starts or joins a run).
    pub(crate) fn at(deadline: Instant) -> Self {
        Self {
            deadline,
            timers: vec![(current(), Box::pin(sleep_until(deadline)))],
        }
    }
}

/// The current runtime's id, if there is one.
fn current() -> Option<Id> {
    Handle::try_current().ok().map(|runtime| runtime.id())
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let polling = current();
        let this = &mut *self;
        let at = match this
            .timers
            .iter()
            .position(|(runtime, _)| *runtime == polling)
        {
            Some(at) => at,
            // Polled outside any runtime: the latest timer (its runtime
            // may still fire it).
            None if polling.is_none() => this.timers.len().saturating_sub(1),
            None => {
                // Made here too; the others stay registered where they are
                // (none is dropped: which runtimes are still driven is not
                // known, and a run is polled from a handful at most).
                this.timers
                    .push((polling, Box::pin(sleep_until(this.deadline))));
                this.timers.len() - 1
            }
        };
        match this.timers.get_mut(at) {
            Some((_, timer)) => timer.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

/// Sleeps until `deadline` ([`Deadline`]).
pub(crate) async fn sleep_until_here(deadline: Instant) {
    Deadline::at(deadline).await;
}

/// `future`'s output, or `Err(())` once `deadline` passed first (the
/// future is polled first, as `tokio::time::timeout_at` does).
pub(crate) async fn timeout_at_here<F: Future>(
    deadline: Instant,
    future: F,
) -> Result<F::Output, ()> {
    let mut future = pin!(future);
    let mut timer = Deadline::at(deadline);
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(&mut timer).poll(cx).map(Err)
    })
    .await
}
