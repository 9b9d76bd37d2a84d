//! Monitor identities: the tag a monitor writes into the state word of
//! each session it watches, and compares on every heartbeat.
//!
//! # Invariants
//!
//! - No tag is handed out twice in a process: the counter only grows, and
//!   stops (a build error) instead of wrapping once the state word's
//!   48 bits are used up.
//! - 0 is never handed out: it means "unwatched".

use std::sync::atomic::{AtomicU64, Ordering};

use crate::build::BuildError;
use crate::session::MAX_WATCHER;

/// The last tag handed out in this process.
static LAST: AtomicU64 = AtomicU64::new(0);

/// A tag no monitor of this process had.
///
/// # Errors
///
/// [`BuildError::Exhausted`] once every tag was handed
/// out.
pub(super) fn next() -> Result<u64, BuildError> {
    after(&LAST).ok_or(BuildError::Exhausted {
        piece: super::config::PIECE,
        what: "monitor identity",
    })
}

/// The tag after `last`, which it becomes; `None` (and `last` stays) past
/// [`MAX_WATCHER`].
fn after(last: &AtomicU64) -> Option<u64> {
    // Relaxed: the compare-exchange gives each tag to one caller; the
    // counter orders nothing else.
    last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tag| {
        tag.checked_add(1).filter(|next| *next <= MAX_WATCHER)
    })
    .ok()
    .map(|tag| tag + 1)
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::*;

    #[test]
    fn tags_start_at_one_and_never_wrap() {
        let last = AtomicU64::new(0);
        assert_eq!(after(&last), Some(1));
        assert_eq!(after(&last), Some(2));

        // Past 16 bits, where tags used to repeat, they keep counting.
        let last = AtomicU64::new(u64::from(u16::MAX) - 1);
        assert_eq!(after(&last), Some(u64::from(u16::MAX)));
        assert_eq!(after(&last), Some(1 << 16));

        // The last tag the state word holds, then a typed refusal, for good.
        let last = AtomicU64::new(MAX_WATCHER - 1);
        assert_eq!(after(&last), Some(MAX_WATCHER));
        assert_eq!(after(&last), None);
        assert_eq!(after(&last), None);
        assert_eq!(last.load(Ordering::Relaxed), MAX_WATCHER);
    }

    #[test]
    fn the_process_counter_hands_out_distinct_tags() {
        let first = next().unwrap();
        let second = next().unwrap();
        assert!(first >= 1 && second > first && second <= MAX_WATCHER);
    }
}
