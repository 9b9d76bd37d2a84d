//! Monitor identities: the tag a monitor writes into the state word of
//! each session it watches, and compares on every heartbeat.
//!
//! # Invariants
//!
//! - No tag is handed out twice in a process: the counter only grows, and
//!   stops (a build error) instead of wrapping once the state word's
//!   48 bits are used up.
//! - 0 is never handed out: it means "unwatched".
//! - A tag is in `LIVE` while its [`Lease`] lives: the monitor's tasks hold
//!   it, so once it is gone (the monitor shut down, its last handle
//!   dropped and its tasks ended, or its runtime dropped them) nothing of
//!   the monitor acts on a session any more, and another monitor may take
//!   over the sessions that still carry the tag.
//!
//! # Deadlock safety
//!
//! `LIVE` is a leaf: nothing is taken under it, and it is never held while
//! user code runs.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

use crate::build::BuildError;
use crate::session::MAX_WATCHER;

/// The tags whose monitors may still act on the sessions they watch.
static LIVE: LazyLock<Mutex<HashSet<u64>>> = LazyLock::new(Mutex::default);

/// A monitor's tag, live until the last clone of its lease drops.
#[derive(Debug)]
pub(super) struct Lease(u64);

impl Lease {
    pub(super) fn tag(&self) -> u64 {
        self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        LIVE.lock().remove(&self.0);
    }
}

/// Whether the monitor that had `tag` is gone for good.
pub(super) fn gone(tag: u64) -> bool {
    !LIVE.lock().contains(&tag)
}

/// A tag no monitor of this process had, live until its lease drops.
///
/// # Errors
///
/// [`BuildError::Exhausted`] once every tag was handed
/// out.
pub(super) fn lease() -> Result<Arc<Lease>, BuildError> {
    let tag = next()?;
    LIVE.lock().insert(tag);
    Ok(Arc::new(Lease(tag)))
}

/// The last tag handed out in this process.
static LAST: AtomicU64 = AtomicU64::new(0);

/// A tag no monitor of this process had.
///
/// # Errors
///
/// [`BuildError::Exhausted`] once every tag was handed
/// out.
fn next() -> Result<u64, BuildError> {
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

    #[test]
    fn a_tag_is_live_while_its_lease_lives() {
        let lease = lease().unwrap();
        let tag = lease.tag();
        assert!(!gone(tag));
        let held = Arc::clone(&lease);
        drop(lease);
        assert!(!gone(tag), "a clone still holds it");
        drop(held);
        assert!(gone(tag));
    }
}
