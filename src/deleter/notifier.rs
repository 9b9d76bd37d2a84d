//! The controller's side of termination: telling routers to close sessions.

use std::future::Future;
use std::sync::Arc;

use super::confirm::Confirmations;
use crate::id::{Incarnation, RouterId, SessionKey};
use crate::transport_error::transport_error;

/// Tells a router (and through it, clients) to close sessions.
///
/// The controller implements it, typically by sending one message per call
/// to the router. Calls are batched: one call carries up to the deleter's
/// batch size of sessions, all of one router. The router's confirmations do
/// not come back through this trait: the controller closes each confirmed
/// session when the confirmation arrives (through the store, or the batch's
/// [`Confirmations`]), and the deleter sees the sessions close.
///
/// # Confirming
///
/// Confirm with [`SessionStore::close_exact`](crate::SessionStore::close_exact),
/// the session's [`SessionKey`] (from [`TerminationBatch::sessions`]) and
/// [`CloseReason::RouterDeleted`](crate::CloseReason::RouterDeleted): a
/// confirmation can arrive late (after the deletion forced the session and
/// the id was given to a new session) or twice, and a close by key never
/// touches another session holding the id. Keep each batch's keys until the
/// router answers (or send the generation along and read it back).
/// [`SessionStore::close`](crate::SessionStore::close) by id would close
/// whatever session holds the id when the confirmation lands. The reason
/// matters too: [`DeletionReport::confirmed`](crate::DeletionReport::confirmed)
/// counts sessions closed with `RouterDeleted`.
///
/// # Confirming by handle
///
/// The deleter calls [`notify_with`](Self::notify_with), which also hands
/// over a [`Confirmations`] for the batch: confirming through it closes the
/// very sessions of the batch without looking their keys up in the store
/// (the fastest way, and no id can be mistaken for another). Its default
/// drops the `Confirmations` and calls [`notify`](Self::notify), so a
/// notifier that confirms by key implements `notify` only; one that
/// confirms by handle implements both (`notify` for batches sent without
/// a `Confirmations`, as a test or another caller may).
///
/// The deleter protects itself from the notifier: a call that errors, hangs
/// past [`RouterDeleterBuilder::notify_timeout`](crate::RouterDeleterBuilder::notify_timeout)
/// or panics is counted as a failed attempt, and the sessions it carried are
/// notified again on the next round, then force-closed.
///
/// # Example
///
/// ```
/// use session_lifecycle::{NotifyError, TerminationBatch, TerminationNotifier};
///
/// struct Wire; // your connection registry
///
/// impl TerminationNotifier for Wire {
///     async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
///         // Send one "terminate these sessions" frame to batch.router here.
///         let _ = (batch.router, batch.sessions.len());
///         Ok(())
///     }
/// }
/// ```
pub trait TerminationNotifier: Send + Sync + 'static {
    /// Asks the router to close the sessions of `batch`.
    ///
    /// `Ok` means the request was sent, not that any session closed.
    ///
    /// See the example on [`TerminationNotifier`].
    fn notify(
        &self,
        batch: TerminationBatch,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send;

    /// Asks the router to close the sessions of `batch`, with `confirm` to
    /// confirm them by handle as the router answers (see
    /// [Confirming by handle](TerminationNotifier#confirming-by-handle)).
    /// What the deleter calls.
    ///
    /// The default drops `confirm` and calls [`notify`](Self::notify).
    ///
    /// See the example on [`Confirmations`].
    fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send {
        drop(confirm);
        self.notify(batch)
    }
}

impl<N: TerminationNotifier> TerminationNotifier for Arc<N> {
    fn notify(
        &self,
        batch: TerminationBatch,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send {
        (**self).notify(batch)
    }

    fn notify_with(
        &self,
        batch: TerminationBatch,
        confirm: Confirmations,
    ) -> impl Future<Output = Result<(), NotifyError>> + Send {
        (**self).notify_with(batch, confirm)
    }
}

/// One notification: sessions of one router to terminate.
/// See the example on [`TerminationNotifier`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminationBatch {
    /// The router being deleted.
    pub router: RouterId,
    /// Its incarnation being deleted.
    pub incarnation: Incarnation,
    /// The sessions to terminate, in no particular order; at most the
    /// configured batch size. Send their ids to the router; confirm each
    /// with [`SessionStore::close_exact`](crate::SessionStore::close_exact)
    /// and its key (see [Confirming](TerminationNotifier#confirming)), or
    /// through the batch's [`Confirmations`] when it came with one.
    pub sessions: Vec<SessionKey>,
    /// The notification round: 0 for the first notification, 1.. for
    /// re-notifications of sessions that did not confirm.
    pub round: u32,
}

transport_error!(
    /// A notification could not be sent.
    ///
    /// # Example
    ///
    /// ```
    /// use std::io;
    /// use session_lifecycle::NotifyError;
    ///
    /// // The transport's own error (then the source), or a message.
    /// let broken = NotifyError::new(io::Error::from(io::ErrorKind::BrokenPipe));
    /// assert_eq!(broken.to_string(), "termination notice not sent");
    /// let cause = std::error::Error::source(&broken).map(ToString::to_string);
    /// assert_eq!(cause.as_deref(), Some("broken pipe"));
    /// let offline = NotifyError::msg("router-1 is not connected");
    /// assert_eq!(
    ///     offline.to_string(),
    ///     "termination notice not sent: router-1 is not connected"
    /// );
    /// ```
    NotifyError,
    "termination notice not sent"
);
