//! The session state machine packed into one atomic word.
//!
//! # Invariants
//!
//! - The state only moves `Active → Terminating → Closed` or
//!   `Active → Closed`; every move is one compare-exchange, so exactly one
//!   caller wins it.
//! - The close reason is written by the same compare-exchange that moves the
//!   state to `Closed`, so a reader never sees `Closed` without its reason.
//! - `COMPLETE` is set only after `Closed`, by the caller that won the close,
//!   once the session's resources are released and its token wiped.

use std::fmt;

use crate::loom::{AtomicU64, Ordering};

const STATE_MASK: u64 = 0b11;
const ACTIVE: u64 = 0;
const TERMINATING: u64 = 1;
const CLOSED: u64 = 2;
/// Set once the close has finished its side effects.
const COMPLETE: u64 = 1 << 2;
/// Set once the session was reported long-lived; survives every transition.
const LONG_LIVED: u64 = 1 << 3;
const REASON_SHIFT: u32 = 8;
const REASON_MASK: u64 = 0xFF;
/// The tag of the liveness monitor watching the session (0: none), in bits
/// 16–63; set once, survives every transition.
const WATCHER_SHIFT: u32 = 16;
const WATCHER_MASK: u64 = MAX_WATCHER << WATCHER_SHIFT;
/// The bits a close carries over from the open state.
const KEPT_ON_CLOSE: u64 = LONG_LIVED | WATCHER_MASK;

/// The largest monitor tag the state word holds: 48 bits, enough for a
/// million monitors a second for eight years.
pub(crate) const MAX_WATCHER: u64 = (1 << 48) - 1;

/// Where a session is in its life.
///
/// A session only moves forward: `Active → Terminating → Closed`, or
/// `Active → Closed`. `Closed` is final.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     CloseReason, Incarnation, NewSession, RouterId, SessionId, SessionState,
/// };
///
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// assert_eq!(session.state(), SessionState::Active);
/// assert!(session.begin_terminating().won());
/// assert_eq!(session.state(), SessionState::Terminating);
/// assert!(session.close(CloseReason::RouterDeleted).won());
/// assert!(session.state().is_closed());
/// assert_eq!(session.state().to_string(), "closed");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// The session is open and carrying traffic.
    Active,
    /// The session's router is being deleted; the session was asked to close
    /// and is waiting for its router or client to confirm.
    Terminating,
    /// The session is closed; see its [`CloseReason`].
    Closed,
}

impl SessionState {
    /// Returns `true` for [`SessionState::Closed`].
    #[must_use]
    pub const fn is_closed(self) -> bool {
        matches!(self, Self::Closed)
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Terminating => "terminating",
            Self::Closed => "closed",
        })
    }
}

/// Why a session was closed.
///
/// # Example
///
/// ```
/// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
///
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// let _ = session.close(CloseReason::Forced);
/// match session.close_reason() {
///     Some(reason) if reason.is_forced() => println!("controller closed it: {reason}"),
///     Some(reason) => println!("peer closed it: {reason}"),
///     None => println!("still open"),
/// }
/// assert!(CloseReason::Forced.is_forced());
/// assert!(!CloseReason::ClientClosed.is_forced());
/// assert_eq!(CloseReason::Forced.to_string(), "forced after deadline");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client or its router closed the session normally.
    ClientClosed,
    /// The session's router is being deleted and the close was confirmed.
    RouterDeleted,
    /// The session stopped answering heartbeats and probes.
    LivenessTimeout,
    /// The session did not confirm termination before the deadline and its
    /// retries, and was closed by the controller.
    Forced,
    /// The session was reclaimed by the controller (an orphan or a session
    /// left behind by an interrupted operation).
    Reclaimed,
    /// The session's router stayed disconnected past its grace period.
    RouterLost,
    /// The controller is shutting down.
    Shutdown,
    /// The session reached its expiry (see
    /// [`NewSession::expires_at`](crate::NewSession::expires_at)) and its
    /// [`ExpiryMonitor`](crate::ExpiryMonitor) closed it.
    Expired,
}

impl CloseReason {
    /// Returns `true` when the controller closed the session without its
    /// peer confirming: [`Forced`](Self::Forced),
    /// [`LivenessTimeout`](Self::LivenessTimeout),
    /// [`Reclaimed`](Self::Reclaimed), [`RouterLost`](Self::RouterLost),
    /// [`Shutdown`](Self::Shutdown) and [`Expired`](Self::Expired).
    ///
    /// An expiry is a planned end, but still the controller's decision: the
    /// session's router and client did not ask for the close, and learn of
    /// it from the controller (or from a reconciliation).
    #[must_use]
    pub const fn is_forced(self) -> bool {
        !matches!(self, Self::ClientClosed | Self::RouterDeleted)
    }

    const fn code(self) -> u8 {
        match self {
            Self::ClientClosed => 1,
            Self::RouterDeleted => 2,
            Self::LivenessTimeout => 3,
            Self::Forced => 4,
            Self::Reclaimed => 5,
            Self::RouterLost => 6,
            Self::Shutdown => 7,
            Self::Expired => 8,
        }
    }

    /// The reason as one byte, for stores that persist it.
    #[cfg(feature = "etcd")]
    pub(crate) const fn wire_code(self) -> u8 {
        self.code()
    }

    /// The reason [`wire_code`](Self::wire_code) encoded, if `code` is one.
    #[cfg(feature = "etcd")]
    pub(crate) fn try_from_code(code: u8) -> Option<Self> {
        (1..=8)
            .contains(&code)
            .then(|| Self::from_code(u64::from(code)))
    }

    fn from_code(code: u64) -> Self {
        match code {
            1 => Self::ClientClosed,
            2 => Self::RouterDeleted,
            3 => Self::LivenessTimeout,
            5 => Self::Reclaimed,
            6 => Self::RouterLost,
            7 => Self::Shutdown,
            8 => Self::Expired,
            // Only `code()` writes reason bits, so 4 is the one value left;
            // decoding stays total instead of panicking on the impossible.
            _ => Self::Forced,
        }
    }
}

impl CloseReason {
    /// The reason as a short `snake_case` label (`"client_closed"`,
    /// `"router_deleted"`, ...): stable, for metric labels and logs.
    ///
    /// ```
    /// use session_lifecycle::CloseReason;
    ///
    /// assert_eq!(CloseReason::RouterDeleted.as_str(), "router_deleted");
    /// ```
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::RouterDeleted => "router_deleted",
            Self::LivenessTimeout => "liveness_timeout",
            Self::Forced => "forced",
            Self::Reclaimed => "reclaimed",
            Self::RouterLost => "router_lost",
            Self::Shutdown => "shutdown",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClientClosed => "client closed",
            Self::RouterDeleted => "router deleted",
            Self::LivenessTimeout => "liveness timeout",
            Self::Forced => "forced after deadline",
            Self::Reclaimed => "reclaimed",
            Self::RouterLost => "router lost",
            Self::Shutdown => "shutdown",
            Self::Expired => "expired",
        })
    }
}

/// Which sessions a close may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseFrom {
    /// Any open session (`Active` or `Terminating`): the deletion's own
    /// force-close, and orphans, which no deletion owns.
    Open,
    /// Only `Active` sessions: paths that run beside a possible deletion
    /// (reconciliation, grace expiry, reaping) leave a `Terminating`
    /// session to the deletion that marked it.
    Active,
}

/// The outcome of [`Session::begin_terminating`](crate::Session::begin_terminating):
/// whether this caller moved the session, and if not, where it was.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     Incarnation, NewSession, RouterId, SessionId, SessionState, session::Transition,
/// };
///
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// assert_eq!(session.begin_terminating(), Transition::Won);
/// // A second caller loses and learns where the session is.
/// match session.begin_terminating() {
///     Transition::Won => unreachable!("only one caller wins"),
///     Transition::Lost { current } => assert_eq!(current, SessionState::Terminating),
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the outcome says whether this caller won the transition"]
pub enum Transition {
    /// This caller moved the session to the new state.
    Won,
    /// The session was not in a state the transition starts from; it is in
    /// `current` and this caller changed nothing.
    Lost {
        /// The state the session was found in.
        current: SessionState,
    },
}

impl Transition {
    /// Returns `true` when this caller won the transition.
    #[must_use]
    pub const fn won(self) -> bool {
        matches!(self, Self::Won)
    }
}

/// The outcome of closing a session.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     session::CloseOutcome, CloseReason, Incarnation, NewSession, RouterId, SessionId,
/// };
///
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// assert_eq!(session.close(CloseReason::ClientClosed), CloseOutcome::Closed);
/// // The client and a deletion race: the second close changes nothing.
/// match session.close(CloseReason::Forced) {
///     CloseOutcome::Closed => unreachable!("closed already"),
///     CloseOutcome::AlreadyClosed { reason } => {
///         assert_eq!(reason, CloseReason::ClientClosed)
///     }
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the outcome says whether this caller closed the session"]
pub enum CloseOutcome {
    /// This caller closed the session with its reason; it ran the release of
    /// the session's resources.
    Closed,
    /// The session was already closed by another caller, for `reason`; this
    /// call changed nothing.
    AlreadyClosed {
        /// The reason given by the caller that won the close.
        reason: CloseReason,
    },
}

impl CloseOutcome {
    /// Returns `true` when this caller closed the session.
    #[must_use]
    pub const fn won(self) -> bool {
        matches!(self, Self::Closed)
    }
}

/// The atomic state word: state in bits 0–1, `COMPLETE` in bit 2,
/// `LONG_LIVED` in bit 3, the close reason's code in bits 8–15, the
/// watching monitor's tag in bits 16–63.
#[derive(Debug)]
pub(crate) struct StateWord(AtomicU64);

impl StateWord {
    pub(crate) fn new() -> Self {
        Self(AtomicU64::new(ACTIVE))
    }

    pub(crate) fn state(&self) -> SessionState {
        // Acquire pairs with the AcqRel of the transitions, so a caller that
        // sees `Closed` also sees what the closer wrote before closing.
        decode_state(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn reason(&self) -> Option<CloseReason> {
        // Acquire: same pairing as `state`.
        decode_reason(self.0.load(Ordering::Acquire))
    }

    /// `Some(reason)` once the close has completed its side effects.
    pub(crate) fn completed(&self) -> Option<CloseReason> {
        // Acquire pairs with the Release in `mark_complete`: a waiter that
        // sees COMPLETE also sees the released resources and wiped token.
        let word = self.0.load(Ordering::Acquire);
        if word & COMPLETE == 0 {
            None
        } else {
            decode_reason(word)
        }
    }

    pub(crate) fn begin_terminating(&self) -> Transition {
        // Relaxed first guess; the compare-exchange below re-reads.
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            if current & STATE_MASK != ACTIVE {
                return Transition::Lost {
                    current: decode_state(current),
                };
            }
            // AcqRel on success orders this transition with every other one;
            // Acquire on failure so the reported state is current. The
            // `LONG_LIVED` flag is carried over.
            match self.0.compare_exchange_weak(
                current,
                (current & !STATE_MASK) | TERMINATING,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Transition::Won,
                Err(word) => current = word,
            }
        }
    }

    /// Moves an open session to `Closed` with `reason`; `Closed` means this
    /// caller won and must complete the close.
    pub(crate) fn close(&self, reason: CloseReason) -> CloseOutcome {
        let closed = CLOSED | (u64::from(reason.code()) << REASON_SHIFT);
        // Relaxed first guess; the compare-exchange below re-reads.
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            if current & STATE_MASK == CLOSED {
                return CloseOutcome::AlreadyClosed {
                    reason: CloseReason::from_code((current >> REASON_SHIFT) & REASON_MASK),
                };
            }
            // AcqRel on success: publishes everything the closer did before
            // and sees everything earlier transitions published. Acquire on
            // failure for the reason read above.
            match self.0.compare_exchange_weak(
                current,
                closed | (current & KEPT_ON_CLOSE),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return CloseOutcome::Closed,
                Err(word) => current = word,
            }
        }
    }

    /// Closes the word only if it is `Active`; `true` if this call closed it.
    /// A `Terminating` session belongs to its deletion and is left alone.
    pub(crate) fn close_active(&self, reason: CloseReason) -> bool {
        let closed = CLOSED | (u64::from(reason.code()) << REASON_SHIFT);
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            if current & STATE_MASK != ACTIVE {
                return false;
            }
            // Orderings as in `close`.
            match self.0.compare_exchange_weak(
                current,
                closed | (current & KEPT_ON_CLOSE),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(word) => current = word,
            }
        }
    }

    /// Sets the long-lived flag; `true` for the one caller that set it.
    pub(crate) fn flag_long_lived(&self) -> bool {
        // Relaxed: the flag orders nothing else.
        self.0.fetch_or(LONG_LIVED, Ordering::Relaxed) & LONG_LIVED == 0
    }

    /// Tags the session as watched by the monitor `tag`, within
    /// `1..=MAX_WATCHER` (bits beyond are dropped). A tag already there is
    /// taken over if `gone` says its monitor is gone for good.
    pub(crate) fn watch(&self, tag: u64, gone: impl Fn(u64) -> bool) -> Result<(), WatchRefused> {
        debug_assert!((1..=MAX_WATCHER).contains(&tag), "monitor tag {tag}");
        let tag = (tag & MAX_WATCHER) << WATCHER_SHIFT;
        // Relaxed first guess; the compare-exchange below re-reads.
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            if current & STATE_MASK == CLOSED {
                return Err(WatchRefused::Closed);
            }
            let watcher = current & WATCHER_MASK;
            if watcher != 0 && (watcher == tag || !gone(watcher >> WATCHER_SHIFT)) {
                return Err(WatchRefused::Watched);
            }
            // Release on success, paired with the Acquire of `watcher`: a
            // heartbeat that sees the tag sees what the watcher did before.
            // The watcher writes the initial liveness state right after; a
            // heartbeat racing that write is overwritten, which is harmless.
            match self.0.compare_exchange_weak(
                current,
                (current & !WATCHER_MASK) | tag,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(word) => current = word,
            }
        }
    }

    /// The tag of the watching monitor (0: none) and the state, from one
    /// load.
    pub(crate) fn watcher(&self) -> (u64, SessionState) {
        // Acquire pairs with the Release of `watch`.
        let word = self.0.load(Ordering::Acquire);
        (word >> WATCHER_SHIFT, decode_state(word))
    }

    /// Marks the close complete; only the caller that won `close` calls it.
    pub(crate) fn mark_complete(&self) {
        // Release: publishes the released resources and wiped token to any
        // waiter that Acquire-loads COMPLETE.
        self.0.fetch_or(COMPLETE, Ordering::Release);
    }
}

/// Why a session could not be watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WatchRefused {
    /// The session is closed.
    Closed,
    /// A monitor watches it already.
    Watched,
}

fn decode_state(word: u64) -> SessionState {
    match word & STATE_MASK {
        ACTIVE => SessionState::Active,
        TERMINATING => SessionState::Terminating,
        _ => SessionState::Closed,
    }
}

fn decode_reason(word: u64) -> Option<CloseReason> {
    (word & STATE_MASK == CLOSED)
        .then(|| CloseReason::from_code((word >> REASON_SHIFT) & REASON_MASK))
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_long_lived_flag_is_set_once_and_survives_every_transition() {
        let word = StateWord::new();
        assert!(word.flag_long_lived());
        assert!(!word.flag_long_lived(), "a second caller does not set it");
        assert!(word.begin_terminating().won());
        assert_eq!(word.state(), SessionState::Terminating);
        assert!(word.close(CloseReason::Forced).won());
        word.mark_complete();
        assert_eq!(word.state(), SessionState::Closed);
        assert_eq!(word.completed(), Some(CloseReason::Forced));
        assert!(!word.flag_long_lived(), "the flag outlived the transitions");

        // The flag does not block or fake a transition.
        let word = StateWord::new();
        assert!(word.flag_long_lived());
        assert_eq!(word.state(), SessionState::Active);
        assert!(word.close(CloseReason::ClientClosed).won());
        assert!(
            word.begin_terminating()
                == Transition::Lost {
                    current: SessionState::Closed
                }
        );
        assert_eq!(word.reason(), Some(CloseReason::ClientClosed));
    }

    #[test]
    fn the_watcher_tag_is_set_once_per_monitor_and_survives_every_transition() {
        let word = StateWord::new();
        assert_eq!(word.watcher(), (0, SessionState::Active));
        assert_eq!(word.watch(7, |_| false), Ok(()));
        assert_eq!(word.watch(8, |_| false), Err(WatchRefused::Watched));
        // Its own tag is never taken over, gone or not.
        assert_eq!(word.watch(7, |_| true), Err(WatchRefused::Watched));
        assert!(word.flag_long_lived());
        assert!(word.begin_terminating().won());
        assert_eq!(word.watcher(), (7, SessionState::Terminating));
        assert!(word.close(CloseReason::LivenessTimeout).won());
        word.mark_complete();
        assert_eq!(word.watcher(), (7, SessionState::Closed));
        assert_eq!(word.completed(), Some(CloseReason::LivenessTimeout));
        assert!(!word.flag_long_lived());

        let word = StateWord::new();
        assert!(word.close(CloseReason::ClientClosed).won());
        assert_eq!(word.watch(3, |_| true), Err(WatchRefused::Closed));
        assert_eq!(word.watcher(), (0, SessionState::Closed));
        // The widest tag leaves the state, flags and reason alone.
        let word = StateWord::new();
        assert_eq!(word.watch(MAX_WATCHER, |_| false), Ok(()));
        assert_eq!(word.watcher(), (MAX_WATCHER, SessionState::Active));
        assert!(word.close(CloseReason::ClientClosed).won());
        word.mark_complete();
        assert_eq!(word.reason(), Some(CloseReason::ClientClosed));
        assert_eq!(word.completed(), Some(CloseReason::ClientClosed));
        assert!(word.flag_long_lived());
        assert_eq!(word.watcher(), (MAX_WATCHER, SessionState::Closed));
        // A gone monitor's tag is taken over, the rest of the word kept.
        let word = StateWord::new();
        assert_eq!(word.watch(7, |_| false), Ok(()));
        assert!(word.begin_terminating().won());
        assert_eq!(word.watch(9, |gone| gone == 7), Ok(()));
        assert_eq!(word.watcher(), (9, SessionState::Terminating));
        assert_eq!(word.watch(11, |gone| gone == 7), Err(WatchRefused::Watched));
        // Tags past 16 bits are kept whole (they once wrapped at 65,535).
        let word = StateWord::new();
        assert_eq!(word.watch(1 << 16, |_| false), Ok(()));
        assert_eq!(word.watcher(), (1 << 16, SessionState::Active));
    }
}
