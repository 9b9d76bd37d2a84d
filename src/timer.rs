//! Timers that follow the runtime polling them.
//!
//! A deletion's run is one future shared by its callers, polled by
//! whichever of them is awake, from whatever runtime each awaits it on. A
//! tokio timer belongs to the runtime it was made on, whose time driver
//! fires it: made on a current-thread runtime that a caller then left idle
//! (its `block_on` returned after a timeout), it never fires, and a caller
//! on another runtime that joins the run would wait for it for ever.
//! [`Deadline`] is made again on the runtime polling it whenever that is
//! another one than it was made on.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Id};
use tokio::time::{Instant, Sleep, sleep_until};

/// `sleep_until(deadline)`, on the runtime that polls it.
pub(crate) struct Deadline {
    deadline: Instant,
    sleep: Pin<Box<Sleep>>,
    /// The runtime `sleep` was made on.
    runtime: Option<Id>,
}

impl Deadline {
    /// A timer for `deadline`, made on the current runtime.
    ///
    /// # Panics
    ///
    /// As `sleep_until`, outside a runtime or on one without its time
    /// driver: callers check for one first (a deletion returns
    /// `NoRuntime` before it starts).
    pub(crate) fn at(deadline: Instant) -> Self {
        Self {
            deadline,
            sleep: Box::pin(sleep_until(deadline)),
            runtime: current(),
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
        if polling.is_some() && polling != self.runtime {
            // Made again here: the old runtime may never fire it.
            self.sleep = Box::pin(sleep_until(self.deadline));
            self.runtime = polling;
        }
        self.sleep.as_mut().poll(cx)
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
