//! A resource whose release waits for a gate: a close that is won but not
//! yet complete, held open for as long as a test needs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use tokio::time::Duration;

use crate::{CloseReason, Session};

/// A resource whose release blocks the closing thread until its gate
/// opens: between the close's win (the session reads closed) and the
/// gate, the close is in flight, not complete. For tests of code that must
/// wait for a close to complete, not merely to be won (`Session::closed`,
/// a deletion returning only after its sessions' releases ran).
///
/// The release blocks the thread that closes the session, so close it
/// from a thread that may block: a plain OS thread, or a worker of a
/// multi-thread runtime while another worker opens the gate. On a
/// current-thread runtime a close on the runtime's thread would block the
/// very timer meant to open the gate.
///
/// Dropping the `SlowRelease` without opening it opens the gate too: a
/// forgotten gate never blocks a thread for good.
///
/// # Example
///
/// ```
/// use std::sync::atomic::Ordering;
/// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
/// use session_lifecycle::test_util::SlowRelease;
///
/// let session =
///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///         .into_session();
/// let slow = SlowRelease::attach(&session);
/// let closer = {
///     let session = session.clone();
///     std::thread::spawn(move || session.close(CloseReason::ClientClosed))
/// };
/// while !session.is_closed() {
///     std::thread::yield_now();
/// }
/// // Won, but its release is still waiting for the gate.
/// assert!(!slow.is_released());
///
/// let released = slow.open();
/// assert!(closer.join().unwrap().won()); // the close completes
/// assert!(released.load(Ordering::SeqCst));
/// ```
#[derive(Debug)]
pub struct SlowRelease {
    gate: mpsc::Sender<()>,
    released: Arc<AtomicBool>,
}

impl SlowRelease {
    /// Attaches a release to `session` that waits for the gate, then sets
    /// the released flag.
    ///
    /// # Panics
    ///
    /// If `session` is already closed (nothing can be attached to it).
    pub fn attach<P>(session: &Session<P>) -> Self {
        let (gate, wait) = mpsc::channel::<()>();
        let released = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&released);
        let release = move |_: CloseReason| {
            // An error means the gate was dropped: open as well.
            let _ = wait.recv();
            done.store(true, Ordering::SeqCst);
        };
        if session.attach(release).is_err() {
            panic!("SlowRelease::attach: {session:?} is already closed");
        }
        Self { gate, released }
    }

    /// Whether the release has run (the gate opened and the closing thread
    /// went on).
    #[must_use]
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Opens the gate now; returns the flag set once the release has run.
    #[must_use = "the flag tells when the release has run"]
    pub fn open(self) -> Arc<AtomicBool> {
        let Self { gate, released } = self;
        // An error means the release already ran or can no longer run (its
        // session was dropped unclosed): nothing to open.
        let _ = gate.send(());
        released
    }

    /// Opens the gate `delay` from now, from a task of the current tokio
    /// runtime; returns the flag set once the release has run.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::atomic::Ordering;
    /// use std::time::Duration;
    /// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
    /// use session_lifecycle::test_util::SlowRelease;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() {
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// let released = SlowRelease::attach(&session).open_after(Duration::from_millis(50));
    /// let closer = session.clone();
    /// std::thread::spawn(move || closer.close(CloseReason::ClientClosed));
    /// // `closed` resolves once the close completed: after the release.
    /// assert_eq!(session.closed().await, CloseReason::ClientClosed);
    /// assert!(released.load(Ordering::SeqCst));
    /// # }
    /// ```
    #[must_use = "the flag tells when the release has run"]
    pub fn open_after(self, delay: Duration) -> Arc<AtomicBool> {
        let Self { gate, released } = self;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = gate.send(());
        });
        released
    }
}
