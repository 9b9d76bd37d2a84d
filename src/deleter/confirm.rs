//! Confirmation by handle: a termination batch's sessions, closed as their
//! router confirms them without a lookup in the store.
//!
//! # Invariants
//!
//! - A [`Confirmations`] closes only the very sessions of its batch (by
//!   handle: a later session holding one of their ids is never touched),
//!   only with [`CloseReason::RouterDeleted`], and only while the deletion
//!   that sent it runs: it holds the run's handles weakly, so keeping one
//!   keeps no session alive, and holds them strongly only while it closes
//!   sessions, never while the caller's key iterator (user code, which
//!   may wait) runs, unless that iterator says its next key is ready.
//! - A confirmation after the session closed otherwise (forced, confirmed
//!   twice, closed by the client) changes nothing.
//!
//! # Deadlock safety
//!
//! No lock: closing runs the session's resources and wakes its waiters in
//! the caller's context, with nothing of the crate held.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, Weak};

use crate::contain::drop_each_logged;
use crate::id::SessionKey;
use crate::session::{CloseReason, Session};

/// Confirms the sessions of one [`TerminationBatch`] by handle, as their
/// router answers.
///
/// Handed to [`TerminationNotifier::notify_with`] with each batch; the
/// sessions are those of [`TerminationBatch::sessions`], in the same order
/// (index `i` is `batch.sessions[i]`). Confirming through it closes the
/// session with [`CloseReason::RouterDeleted`] directly: no lookup of the
/// key in the store, and no way to touch another session that reuses the
/// id. The session is closed at once (the deletion sees the confirmation,
/// its waiters wake and its resources are released in the call) and leaves
/// the store before the deletion returns, with the others: until then the
/// store still lists it, closed, and its id is not free for a new session.
///
/// It holds the deletion's sessions weakly: once the deletion is over
/// (every session confirmed or forced), confirming does nothing and
/// returns `false` / `0`, and keeping a `Confirmations` keeps no session
/// alive. Keep it until the router answers, drop it when it will not.
///
/// `Send + Sync`: confirm from the task that reads the router's answers,
/// or share it behind an `Arc`.
///
/// # Example
///
/// ```
/// use session_lifecycle::deleter::Confirmations;
/// use session_lifecycle::{NotifyError, TerminationBatch, TerminationNotifier};
///
/// struct Wire; // your connection registry
///
/// impl TerminationNotifier for Wire {
///     async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
///         // Without a `Confirmations`: confirm with `close_exact` and the keys.
///         let _ = batch;
///         Ok(())
///     }
///
///     async fn notify_with(
///         &self,
///         batch: TerminationBatch,
///         confirm: Confirmations,
///     ) -> Result<(), NotifyError> {
///         // Send one "terminate these sessions" frame here, keep `confirm`
///         // with the frame's sequence number, and when the router answers:
///         let answered_all = true;
///         if answered_all {
///             confirm.confirm_all();
///         } else if let Some(&key) = batch.sessions.first() {
///             confirm.confirm_key(key); // one session, as the router names it
///         }
///         Ok(())
///     }
/// }
/// ```
///
/// [`TerminationBatch`]: super::TerminationBatch
/// [`TerminationBatch::sessions`]: super::TerminationBatch::sessions
/// [`TerminationNotifier::notify_with`]: super::TerminationNotifier::notify_with
pub struct Confirmations {
    target: Weak<dyn Confirmable>,
    positions: Positions,
    /// Where the next confirmation by key is looked for first: routers
    /// answer mostly in the order they were told.
    cursor: AtomicUsize,
    /// The batch's keys, sorted, with their index: built at the first
    /// confirmation by key that arrives out of order.
    by_key: OnceLock<Box<[(SessionKey, usize)]>>,
}

/// Where a batch's sessions are among the deletion's.
pub(super) enum Positions {
    /// A run of them: the first notification.
    Range { start: usize, len: usize },
    /// These ones: a re-notification of those still open.
    List(Box<[usize]>),
}

impl Positions {
    fn len(&self) -> usize {
        match self {
            Self::Range { len, .. } => *len,
            Self::List(list) => list.len(),
        }
    }

    fn get(&self, index: usize) -> Option<usize> {
        match self {
            Self::Range { start, len } => (index < *len).then(|| start + index),
            Self::List(list) => list.get(index).copied(),
        }
    }
}

/// A deletion's sessions, whatever their payload type.
pub(super) trait Confirmable: Send + Sync {
    /// Closes the session at `position` as confirmed, if its key is `key`
    /// (any, with `None`).
    fn confirm(&self, position: usize, key: Option<SessionKey>) -> Confirmed;

    /// The key of the session at `position`.
    fn key(&self, position: usize) -> Option<SessionKey>;

    /// Records that one call closed `closed` sessions.
    fn closed_by_handle(&self, closed: usize);
}

/// What one confirmation did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Confirmed {
    /// This call closed the session.
    Closed,
    /// The session was closed already.
    AlreadyClosed,
    /// The session there has another key (or there is none).
    Elsewhere,
}

/// A deletion's tracked sessions, and how many were confirmed by handle.
pub(super) struct Tracked<P> {
    pub(super) sessions: Vec<Session<P>>,
    /// Closes won through a [`Confirmations`]: sessions closed without
    /// leaving the store.
    pub(super) by_handle: AtomicUsize,
}

impl<P> std::ops::Deref for Tracked<P> {
    type Target = [Session<P>];

    fn deref(&self) -> &[Session<P>] {
        &self.sessions
    }
}

impl<P> Tracked<P> {
    pub(super) fn new(sessions: Vec<Session<P>>) -> Self {
        Self {
            sessions,
            by_handle: AtomicUsize::new(0),
        }
    }
}

/// The last holder drops the sessions (their last handles, maybe: the
/// payloads' `Drop`s are user code) with each panic contained: a
/// confirmation that outlives its deletion by an instant may be that
/// holder, in the caller's context.
impl<P> Drop for Tracked<P> {
    fn drop(&mut self) {
        if !self.sessions.is_empty() {
            drop_each_logged(self.sessions.drain(..), "a deletion's sessions");
        }
    }
}

impl<P> Default for Tracked<P> {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl<P: Send + Sync + 'static> Confirmable for Tracked<P> {
    fn confirm(&self, position: usize, key: Option<SessionKey>) -> Confirmed {
        let Some(session) = self.sessions.get(position) else {
            return Confirmed::Elsewhere;
        };
        if key.is_some_and(|key| key != session.key()) {
            Confirmed::Elsewhere
        } else if !session.is_closed() && session.close(CloseReason::RouterDeleted).won() {
            Confirmed::Closed
        } else {
            Confirmed::AlreadyClosed
        }
    }

    fn key(&self, position: usize) -> Option<SessionKey> {
        self.sessions.get(position).map(Session::key)
    }

    fn closed_by_handle(&self, closed: usize) {
        // Once a call, not once a session: confirming threads share it.
        if closed > 0 {
            self.by_handle.fetch_add(closed, Ordering::Relaxed);
        }
    }
}

impl Confirmations {
    pub(super) fn new(target: Weak<dyn Confirmable>, positions: Positions) -> Self {
        Self {
            target,
            positions,
            cursor: AtomicUsize::new(0),
            by_key: OnceLock::new(),
        }
    }

    /// How many sessions the batch carries.
    ///
    /// ```
    /// # use session_lifecycle::deleter::Confirmations;
    /// fn answered(confirm: &Confirmations, closed: &[usize]) -> bool {
    ///     closed.len() == confirm.len()
    /// }
    /// # let _ = answered;
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the batch carries no session (never, for a batch the
    /// deleter sent).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.positions.len() == 0
    }

    /// Confirms the session at `index` of the batch (`batch.sessions[index]`);
    /// `true` if this call closed it, `false` if it was closed already,
    /// `index` is out of the batch, or the deletion is over.
    ///
    /// ```
    /// # use session_lifecycle::deleter::Confirmations;
    /// // The router answered with the indexes of the frame's entries.
    /// fn on_answer(confirm: &Confirmations, indexes: &[usize]) -> usize {
    ///     indexes.iter().filter(|&&i| confirm.confirm(i)).count()
    /// }
    /// # let _ = on_answer;
    /// ```
    pub fn confirm(&self, index: usize) -> bool {
        let Some(position) = self.positions.get(index) else {
            return false;
        };
        self.target.upgrade().is_some_and(|target| {
            let closed = target.confirm(position, None) == Confirmed::Closed;
            target.closed_by_handle(usize::from(closed));
            closed
        })
    }

    /// Confirms the session of the batch whose key is `key`; `true` if this
    /// call closed it, `false` if it was closed already, is not in the
    /// batch, or the deletion is over.
    ///
    /// Answers in the order of the batch cost one comparison each; others
    /// a binary search (the batch's keys are sorted once, at the first).
    ///
    /// ```
    /// # use session_lifecycle::deleter::Confirmations;
    /// # use session_lifecycle::SessionKey;
    /// fn on_closed(confirm: &Confirmations, key: SessionKey) {
    ///     if !confirm.confirm_key(key) {
    ///         // Closed already (forced, or a duplicate answer): nothing to do.
    ///     }
    /// }
    /// # let _ = on_closed;
    /// ```
    pub fn confirm_key(&self, key: SessionKey) -> bool {
        self.target.upgrade().is_some_and(|target| {
            let closed = self.confirm_key_in(&*target, key);
            target.closed_by_handle(usize::from(closed));
            closed
        })
    }

    /// Confirms the sessions of the batch whose keys are `keys` (an answer
    /// naming several); returns how many this call closed. As
    /// [`confirm_key`](Self::confirm_key) for each, in one call; it stops
    /// early once the deletion is over.
    ///
    /// `keys` may wait for its next key (a channel's receiving iterator,
    /// fed by the router's answers as they come): the deletion's sessions
    /// are held only while the iterator says more keys are ready (the
    /// lower bound of its [`size_hint`](Iterator::size_hint) is above
    /// zero, as for a `Vec`'s or a slice's), so a call waiting for keys
    /// never keeps a finished deletion's sessions alive, and the keys of
    /// a collection still take one look-up of the deletion for them all.
    ///
    /// ```
    /// # use session_lifecycle::deleter::Confirmations;
    /// # use session_lifecycle::SessionKey;
    /// // The router's answer lists the sessions it closed.
    /// fn on_answer(confirm: &Confirmations, closed: &[SessionKey]) -> usize {
    ///     confirm.confirm_keys(closed.iter().copied())
    /// }
    /// # let _ = on_answer;
    /// ```
    pub fn confirm_keys(&self, keys: impl IntoIterator<Item = SessionKey>) -> usize {
        let mut keys = keys.into_iter();
        let mut closed = 0;
        // The next key is asked for without the sessions held, unless the
        // iterator says it has it (an iterator is user code, and may wait).
        while let Some(key) = keys.next() {
            let Some(target) = self.target.upgrade() else {
                break;
            };
            let mut run = usize::from(self.confirm_key_in(&*target, key));
            while keys.size_hint().0 > 0 {
                let Some(key) = keys.next() else {
                    break;
                };
                run += usize::from(self.confirm_key_in(&*target, key));
            }
            target.closed_by_handle(run);
            closed += run;
        }
        closed
    }

    /// Confirms every session of the batch; returns how many this call
    /// closed (0 once the deletion is over).
    ///
    /// ```
    /// # use session_lifecycle::deleter::Confirmations;
    /// // The router answered "all of frame 7 closed".
    /// fn on_frame_done(confirm: Confirmations) {
    ///     let _closed = confirm.confirm_all();
    /// }
    /// # let _ = on_frame_done;
    /// ```
    pub fn confirm_all(&self) -> usize {
        let Some(target) = self.target.upgrade() else {
            return 0;
        };
        let closed = (0..self.positions.len())
            .filter_map(|index| self.positions.get(index))
            .filter(|&position| target.confirm(position, None) == Confirmed::Closed)
            .count();
        target.closed_by_handle(closed);
        closed
    }

    /// [`confirm_key`](Self::confirm_key) with the deletion's sessions.
    fn confirm_key_in(&self, target: &dyn Confirmable, key: SessionKey) -> bool {
        let hint = self.cursor.load(Ordering::Relaxed);
        let mut confirmed = self
            .positions
            .get(hint)
            .map_or(Confirmed::Elsewhere, |position| {
                target.confirm(position, Some(key))
            });
        let mut index = hint;
        if confirmed == Confirmed::Elsewhere {
            let Some(found) = self.index_of(target, key) else {
                return false;
            };
            index = found;
            confirmed = self
                .positions
                .get(found)
                .map_or(Confirmed::Elsewhere, |position| {
                    target.confirm(position, None)
                });
        }
        self.cursor
            .store(index.saturating_add(1), Ordering::Relaxed);
        confirmed == Confirmed::Closed
    }

    /// The index in the batch of the session whose key is `key`.
    fn index_of(&self, target: &dyn Confirmable, key: SessionKey) -> Option<usize> {
        let sorted = self.by_key.get_or_init(|| {
            let mut keys: Vec<(SessionKey, usize)> = (0..self.positions.len())
                .filter_map(|index| {
                    let position = self.positions.get(index)?;
                    Some((target.key(position)?, index))
                })
                .collect();
            keys.sort_unstable();
            keys.into_boxed_slice()
        });
        sorted
            .binary_search_by(|(probe, _)| probe.cmp(&key))
            .ok()
            .and_then(|found| sorted.get(found))
            .map(|&(_, index)| index)
    }
}

impl fmt::Debug for Confirmations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confirmations")
            .field("len", &self.len())
            .field("deletion_running", &(self.target.strong_count() > 0))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::Tracked;
    use crate::contain::tests::louds;
    use crate::{Incarnation, NewSession, RouterId, SessionId};

    /// The last holder of a deletion's sessions may be a confirmation in
    /// the caller's context: payload `Drop`s that panic there are
    /// contained (two in one `Vec` would abort the process).
    #[test]
    fn tracked_sessions_are_dropped_with_their_panics_contained() {
        let drops = Arc::new(AtomicUsize::new(0));
        let sessions = louds(6, &[1, 2, 5], &drops)
            .into_iter()
            .enumerate()
            .map(|(i, loud)| {
                NewSession::new(
                    SessionId::new(i as u64),
                    RouterId::new(1),
                    Incarnation::new(1),
                )
                .payload(loud)
                .into_session()
            })
            .collect();
        drop(Tracked::new(sessions));
        assert_eq!(drops.load(Ordering::SeqCst), 6);
    }
}
