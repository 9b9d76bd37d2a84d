//! A session's absolute expiry, packed in one atomic word.
//!
//! # Invariants
//!
//! - The expiry only moves later: every change is one compare-exchange to
//!   the larger of the old and the new value, so racing extensions keep the
//!   latest, and a monitor that filed the session at its expiry never finds
//!   it due earlier than filed (its wheel has lazy re-arm: the entry comes
//!   up at the old expiry and is re-filed at the new one).
//! - "No expiry" is the largest value: clearing is an extension to never,
//!   and a session without an expiry never gets one.
//! - `EXPIRED` is set once, by the one monitor that tracks the session,
//!   with a compare-exchange from the value it found due: an extension
//!   either lands before it (the compare-exchange fails, the monitor
//!   re-reads) or sees `EXPIRED` and reports that it came too late. Nothing
//!   changes the word after `EXPIRED`.
//! - `TRACKED` is set by the monitor that tracks the session, and cleared
//!   only by that monitor's task when it ends with the session still in
//!   its hands (never after it expired it): one monitor at a time.
//!
//! Times are nanoseconds after the session's creation (`created_at`, on
//! tokio's clock): no process-wide base instant, so runtimes with paused
//! clocks far apart share nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::{Duration, Instant};

use super::handle::Session;
use crate::id::SessionId;

/// Set once the tracking monitor decided the session expired.
const EXPIRED: u64 = 1 << 63;
/// Set once a monitor tracks the session.
const TRACKED: u64 = 1 << 62;
/// The expiry's bits: nanoseconds after creation (146 years).
const AT_MASK: u64 = TRACKED - 1;
/// No expiry: the largest expiry, so "only later" makes it final.
const NEVER: u64 = AT_MASK;

/// The expiry word: nanoseconds after creation in bits 0–61 (`NEVER`: no
/// expiry), `TRACKED` in bit 62, `EXPIRED` in bit 63.
#[derive(Debug)]
pub(crate) struct ExpiryWord(AtomicU64);

/// One read of the word: what a monitor compares against when it expires
/// the session, and what a warning was given for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExpirySnapshot(u64);

/// Why an expiry could not be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExpiryRefused {
    /// The session expired first (its monitor decided so).
    Expired,
}

/// Why [`Session::extend_expiry`] or [`Session::clear_expiry`] changed
/// nothing.
///
/// # Example
///
/// See [`Session::extend_expiry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExpiryError {
    /// The session's expiry came first: the
    /// [`ExpiryMonitor`](crate::ExpiryMonitor) tracking it decided
    /// it expired, and it is closing (or closed) with
    /// [`CloseReason::Expired`](crate::CloseReason::Expired), unless a
    /// deletion of its router had marked it already.
    #[error("{0} expired already")]
    Expired(SessionId),
    /// The session is closed.
    #[error("{0} is closed")]
    Closed(SessionId),
}

/// A session's expiry.
impl<P> Session<P> {
    /// When the session expires, on tokio's clock; `None` if it never
    /// does. Set at creation ([`NewSession::expires_at`](crate::NewSession::expires_at)),
    /// moved later by [`extend_expiry`](Self::extend_expiry). Kept to the
    /// nanosecond; an expiry before the session's creation reads as its
    /// creation (due at once).
    ///
    /// See the example on [`extend_expiry`](Self::extend_expiry).
    #[must_use]
    pub fn expires_at(&self) -> Option<Instant> {
        self.inner.expiry.snapshot().at(self.created_at())
    }

    /// Moves the session's expiry to `at`, if that is later than the
    /// expiry in force; an earlier `at` changes nothing (use
    /// [`expires_at`](Self::expires_at) to see which one holds). A session
    /// without an expiry keeps none: it never expires.
    ///
    /// One compare-exchange on the session (retried only when another
    /// extension or the expiry itself races it); no lock, no allocation,
    /// no timer work. The [`ExpiryMonitor`](crate::ExpiryMonitor)
    /// finds the new expiry when the old one comes up.
    ///
    /// Extensions only move the expiry later so that the monitor, which
    /// looks at a session again only when its filed time comes, can never
    /// miss one: an expiry brought closer would fire late.
    ///
    /// # Errors
    ///
    /// [`ExpiryError::Expired`] if the session's monitor decided it expired
    /// before this call (the close is on its way: the extension came too
    /// late, and it changed nothing); [`ExpiryError::Closed`] if the
    /// session is closed. An `Ok` means the expiry is at least `at` and the
    /// monitor has not expired the session: it will not before `at`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let now = tokio::time::Instant::now();
    /// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///     .expires_at(now + Duration::from_secs(60))
    ///     .into_session();
    /// // Its API session was refreshed: one more hour.
    /// session.extend_expiry(now + Duration::from_secs(3_600))?;
    /// assert_eq!(session.expires_at(), Some(now + Duration::from_secs(3_600)));
    /// // An earlier expiry changes nothing.
    /// session.extend_expiry(now + Duration::from_secs(10))?;
    /// assert_eq!(session.expires_at(), Some(now + Duration::from_secs(3_600)));
    /// session.clear_expiry()?;
    /// assert_eq!(session.expires_at(), None);
    /// # Ok(())
    /// # }
    /// ```
    pub fn extend_expiry(&self, at: Instant) -> Result<(), ExpiryError> {
        self.change_expiry(Some(at))
    }

    /// Takes the session's expiry away: it never expires. The last
    /// extension there is (an expiry never comes back).
    ///
    /// # Errors
    ///
    /// As [`extend_expiry`](Self::extend_expiry).
    ///
    /// See the example on [`extend_expiry`](Self::extend_expiry).
    pub fn clear_expiry(&self) -> Result<(), ExpiryError> {
        self.change_expiry(None)
    }

    fn change_expiry(&self, at: Option<Instant>) -> Result<(), ExpiryError> {
        let expired = ExpiryError::Expired(self.id());
        if self.is_closed() {
            // Read after the state: a monitor sets `EXPIRED` before its
            // close, which the state's Acquire load makes visible here.
            return Err(if self.inner.expiry.snapshot().is_expired() {
                expired
            } else {
                ExpiryError::Closed(self.id())
            });
        }
        self.inner
            .expiry
            .extend(self.created_at(), at)
            .map_err(|ExpiryRefused::Expired| expired)
    }
}

impl ExpiryWord {
    /// The word of a session created at `created_at`, expiring at `at`.
    pub(crate) fn new(created_at: Instant, at: Option<Instant>) -> Self {
        Self(AtomicU64::new(encode(created_at, at)))
    }

    pub(crate) fn snapshot(&self) -> ExpirySnapshot {
        // Acquire pairs with the AcqRel of `extend` and `expire`; the word
        // orders nothing else, but a reader sees a settled value.
        ExpirySnapshot(self.0.load(Ordering::Acquire))
    }

    /// Moves the expiry to `at` (`None`: never) if that is later.
    pub(crate) fn extend(
        &self,
        created_at: Instant,
        at: Option<Instant>,
    ) -> Result<(), ExpiryRefused> {
        let wanted = encode(created_at, at);
        // Relaxed first guess; the compare-exchange below re-reads.
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            if current & EXPIRED != 0 {
                return Err(ExpiryRefused::Expired);
            }
            if wanted <= current & AT_MASK {
                return Ok(());
            }
            // AcqRel on success orders the extension with the monitor's
            // `expire`; Acquire on failure sees `EXPIRED` if it won.
            match self.0.compare_exchange_weak(
                current,
                (current & !AT_MASK) | wanted,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(word) => current = word,
            }
        }
    }

    /// Sets `TRACKED`; `true` for the one caller that set it.
    pub(crate) fn track(&self) -> bool {
        // Relaxed: the flag orders nothing else.
        self.0.fetch_or(TRACKED, Ordering::Relaxed) & TRACKED == 0
    }

    /// Clears `TRACKED`: the monitor that set it stopped before the
    /// session came due, and another may track it.
    pub(crate) fn untrack(&self) {
        self.0.fetch_and(!TRACKED, Ordering::Relaxed);
    }

    /// Marks the session expired if its expiry is still `seen`; `false`
    /// if an extension landed since (re-read it).
    pub(crate) fn expire(&self, seen: ExpirySnapshot) -> bool {
        // AcqRel: see `extend`. Strong: a spurious failure would re-file a
        // due session for a tick.
        self.0
            .compare_exchange(
                seen.0,
                seen.0 | EXPIRED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

impl ExpirySnapshot {
    /// The expiry, `None` if the session never expires.
    pub(crate) fn at(self, created_at: Instant) -> Option<Instant> {
        let nanos = self.0 & AT_MASK;
        if nanos == NEVER {
            return None;
        }
        created_at.checked_add(Duration::from_nanos(nanos))
    }

    /// Whether the tracking monitor expired the session.
    pub(crate) fn is_expired(self) -> bool {
        self.0 & EXPIRED != 0
    }
}

/// `at` as nanoseconds after `created_at`: an instant before the creation
/// is the creation itself (already due), one past the word's range is
/// never.
fn encode(created_at: Instant, at: Option<Instant>) -> u64 {
    at.map_or(NEVER, |at| {
        let nanos = at.saturating_duration_since(created_at).as_nanos();
        u64::try_from(nanos).map_or(NEVER, |nanos| nanos.min(NEVER))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_only_moves_later_and_never_is_final() {
        let created = Instant::now();
        let at = |secs| Some(created + Duration::from_secs(secs));
        let word = ExpiryWord::new(created, at(10));
        assert_eq!(word.snapshot().at(created), at(10));
        assert_eq!(word.extend(created, at(5)), Ok(()));
        assert_eq!(word.snapshot().at(created), at(10), "never shortened");
        assert_eq!(word.extend(created, at(20)), Ok(()));
        assert_eq!(word.snapshot().at(created), at(20));
        assert!(word.track());
        assert!(!word.track());
        assert_eq!(word.extend(created, None), Ok(()));
        assert_eq!(word.snapshot().at(created), None);
        assert_ne!(word.snapshot().0 & TRACKED, 0, "the flag outlives changes");
        assert_eq!(word.extend(created, at(30)), Ok(()));
        assert_eq!(word.snapshot().at(created), None, "never is final");
        // Before creation: already due.
        let early = ExpiryWord::new(created, Some(created - Duration::from_secs(1)));
        assert_eq!(early.snapshot().at(created), Some(created));
    }

    #[test]
    fn an_extension_after_the_expiry_is_refused_and_one_before_it_wins() {
        let created = Instant::now();
        let word = ExpiryWord::new(created, Some(created + Duration::from_secs(1)));
        let seen = word.snapshot();
        assert_eq!(
            word.extend(created, Some(created + Duration::from_secs(2))),
            Ok(())
        );
        assert!(!word.expire(seen), "an extension landed since the read");
        let seen = word.snapshot();
        assert!(word.expire(seen));
        assert!(word.snapshot().is_expired());
        assert_eq!(
            word.extend(created, Some(created + Duration::from_secs(9))),
            Err(ExpiryRefused::Expired)
        );
        assert_eq!(word.extend(created, None), Err(ExpiryRefused::Expired));
    }
}
