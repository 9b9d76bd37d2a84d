//! What an invariant check finds: [`Violation`] and [`InvariantReport`].

use std::fmt;

use crate::{CloseReason, Incarnation, RouterId, RouterStatus, SessionId, SessionState};

/// One broken invariant, as an [`InvariantChecker`](super::InvariantChecker)
/// found it.
///
/// Its `Display` is one line, prefixed by the invariant's number.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// I1: the store holds a session whose router is unknown, deleted, or
    /// in another incarnation: a zombie.
    Zombie {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// The router's status, if the store knows the router.
        status: Option<RouterStatus>,
    },
    /// I1: a session of a deleted incarnation is open.
    OpenAfterDeletion {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// Its deleted incarnation.
        incarnation: Incarnation,
        /// Its state.
        state: SessionState,
    },
    /// I1: a session its router's deletion closed (a check saw it stored
    /// on the fenced incarnation) is closed but its close is not complete
    /// after the deletion: a close waiter would still wait.
    CloseIncomplete {
        /// The session.
        session: SessionId,
    },
    /// I1: a closed session still holds its secret token.
    TokenNotWiped {
        /// The session.
        session: SessionId,
    },
    /// I2: a session of a fenced incarnation that was not in the store
    /// when the checker first saw the fence: created after it.
    CreatedAfterFence {
        /// The session.
        session: SessionId,
        /// The fenced router.
        router: RouterId,
        /// The fenced incarnation.
        incarnation: Incarnation,
    },
    /// I2: a router's status went backwards: a smaller incarnation, or an
    /// earlier phase (`Deleted → Fenced → Live`) in the same one.
    RouterWentBack {
        /// The router.
        router: RouterId,
        /// Its status at the previous check.
        was: RouterStatus,
        /// Its status now.
        now: RouterStatus,
    },
    /// I3: a session's state went backwards.
    StateWentBack {
        /// The session.
        session: SessionId,
        /// Its state at the previous check.
        was: SessionState,
        /// Its state now.
        now: SessionState,
    },
    /// I3: a closed session's close reason changed.
    ReasonChanged {
        /// The session.
        session: SessionId,
        /// Its reason at the previous check.
        was: CloseReason,
        /// Its reason now.
        now: Option<CloseReason>,
    },
    /// I3: a session reads `Closed` without a close reason.
    StateWithoutReason {
        /// The session.
        session: SessionId,
        /// Its state.
        state: SessionState,
        /// Its close reason.
        reason: Option<CloseReason>,
    },
    /// I7: a router's index names a session the session map does not hold
    /// (or holds for another router).
    IndexedButMissing {
        /// The router.
        router: RouterId,
        /// The session.
        session: SessionId,
    },
    /// I7: the session map holds a session its router's index does not.
    NotIndexed {
        /// The session.
        session: SessionId,
    },
    /// I7: the store's count of a router's sessions and its listing of
    /// them disagree.
    CountMismatch {
        /// The router.
        router: RouterId,
        /// What [`SessionStore::count`](crate::SessionStore::count) says.
        count: usize,
        /// How many [`SessionStore::sessions`](crate::SessionStore::sessions) lists.
        listed: usize,
    },
    /// The check could not run: a store call failed.
    StoreFailed {
        /// The call.
        call: &'static str,
        /// Its error.
        error: String,
    },
}

impl Violation {
    /// The invariant it breaks: `"I1"`, `"I2"`, `"I3"` or `"I7"` (or
    /// `"store"` if the check could not run).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::SessionId;
    /// use session_lifecycle::test_util::Violation;
    ///
    /// let v = Violation::NotIndexed { session: SessionId::new(3) };
    /// assert_eq!(v.invariant(), "I7");
    /// assert_eq!(v.to_string(), "I7 index: session-3 is in the session map but not in its router's index");
    /// ```
    #[must_use]
    pub fn invariant(&self) -> &'static str {
        match self {
            Self::Zombie { .. }
            | Self::OpenAfterDeletion { .. }
            | Self::CloseIncomplete { .. }
            | Self::TokenNotWiped { .. } => "I1",
            Self::CreatedAfterFence { .. } | Self::RouterWentBack { .. } => "I2",
            Self::StateWentBack { .. }
            | Self::ReasonChanged { .. }
            | Self::StateWithoutReason { .. } => "I3",
            Self::IndexedButMissing { .. }
            | Self::NotIndexed { .. }
            | Self::CountMismatch { .. } => "I7",
            Self::StoreFailed { .. } => "store",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zombie {
                session,
                router,
                incarnation,
                status,
            } => {
                write!(
                    f,
                    "I1 zombie: {session} of {router} in {incarnation} is stored, "
                )?;
                match status {
                    Some(status) => write!(f, "but the router is {status:?}"),
                    None => write!(f, "but the store does not know the router"),
                }
            }
            Self::OpenAfterDeletion {
                session,
                router,
                incarnation,
                state,
            } => write!(
                f,
                "I1 zombie: {session} is {state} though {incarnation} of {router} was deleted"
            ),
            Self::CloseIncomplete { session } => write!(
                f,
                "I1 close: {session} of a deleted router is closed but its close waiters would still wait"
            ),
            Self::TokenNotWiped { session } => {
                write!(f, "I1 close: {session} is closed but still holds its token")
            }
            Self::CreatedAfterFence {
                session,
                router,
                incarnation,
            } => write!(
                f,
                "I2 fence: {session} was created on {router} in {incarnation} after its fence"
            ),
            Self::RouterWentBack { router, was, now } => {
                write!(f, "I2 fence: {router} went back from {was:?} to {now:?}")
            }
            Self::StateWentBack { session, was, now } => {
                write!(f, "I3 monotonic: {session} went back from {was} to {now}")
            }
            Self::ReasonChanged { session, was, now } => write!(
                f,
                "I3 monotonic: {session}'s close reason changed from {was} to {now:?}"
            ),
            Self::StateWithoutReason {
                session,
                state,
                reason,
            } => write!(
                f,
                "I3 monotonic: {session} is {state} with close reason {reason:?}"
            ),
            Self::IndexedButMissing { router, session } => write!(
                f,
                "I7 index: {router}'s index names {session}, which the session map does not hold for it"
            ),
            Self::NotIndexed { session } => write!(
                f,
                "I7 index: {session} is in the session map but not in its router's index"
            ),
            Self::CountMismatch {
                router,
                count,
                listed,
            } => write!(
                f,
                "I7 index: {router} counts {count} sessions but lists {listed}"
            ),
            Self::StoreFailed { call, error } => {
                write!(f, "store: {call} failed, the check is incomplete: {error}")
            }
        }
    }
}

/// What one check found: how much it looked at, and every violation.
///
/// Its `Display` lists every violation, one per line, and is what
/// [`assert_invariants`](super::assert_invariants) panics with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvariantReport {
    /// Routers checked.
    pub routers: usize,
    /// Sessions the store holds.
    pub sessions: usize,
    /// Session handles checked, the stored ones included.
    pub handles: usize,
    /// Every violation found, grouped by invariant.
    pub violations: Vec<Violation>,
}

impl InvariantReport {
    /// `true` if no invariant is broken.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations of invariant `name` (`"I1"`, `"I2"`, ...).
    pub fn of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Violation> {
        self.violations
            .iter()
            .filter(move |v| v.invariant() == name)
    }

    /// Panics with the report if it is not clean.
    ///
    /// # Panics
    ///
    /// If any invariant is broken.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "{self}");
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} invariant violation(s) in {} router(s), {} stored session(s), {} handle(s)",
            self.violations.len(),
            self.routers,
            self.sessions,
            self.handles
        )?;
        for violation in &self.violations {
            write!(f, "\n  - {violation}")?;
        }
        Ok(())
    }
}
