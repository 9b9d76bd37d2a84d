//! A deletion's sessions in memory order, sorted in slices.
//!
//! Every pass of a deletion (mark, notify, wait, force, the final drop)
//! walks its sessions in this order: walking a million sessions in address
//! order rather than in the store's hash order makes the deletion about
//! 1.7 times as fast. A comparison sort of a million handles takes tens of
//! milliseconds in one go: on a multi-thread runtime it runs on tokio's
//! blocking pool (`spawn_blocking`: the run may be driven by a caller's
//! task in any context, a `LocalSet` or a `block_on` among them, where
//! `block_in_place` would panic); on a current-thread runtime, a radix sort
//! on the address runs in passes that stop every [`SLICE`] sessions (it
//! costs more instructions than the comparison sort, so it is not used
//! where the other can run).
//!
//! # Invariants
//!
//! - The result holds exactly the given sessions (a permutation), ordered
//!   by address up to a page (from [`SORT_FROM`] sessions: fewer are left
//!   as they are); exact order is not needed, locality is.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::contain::LetGo;
use crate::session::Session;
use crate::slices::{SLICE, due, free_vec, pause};

/// Below this, no sort: a few thousand sessions sit in the core's cache
/// (about 1 MiB), whatever their order, and sorting them costs about 100
/// instructions a session (callgrind, 1k sessions), a third of their close.
const SORT_FROM: usize = SLICE;

/// Below this, one comparison sort (a few hundred microseconds at most).
const SORT_AT_ONCE: usize = 16 * 1024;

/// Bits of the address a radix pass sorts on: 2,048 buckets.
const DIGIT: u32 = 11;

/// Bits dropped from an address: sessions in one page need no order (they
/// share its TLB entry; the order within it matters little).
const PAGE: u32 = 6;

/// `sessions` in address order (as given if they are few).
///
/// Whatever it holds at a pause, it lets go each with its payload's `Drop`
/// contained if the run is dropped there (its runtime gone): a client may
/// have removed a session meanwhile, its last handle here.
pub(super) async fn by_address<P: Send + Sync + 'static>(
    mut sessions: Vec<Session<P>>,
) -> Vec<Session<P>> {
    if sessions.len() < SORT_FROM {
        return sessions;
    }
    if sessions.len() <= SORT_AT_ONCE {
        sessions.sort_unstable_by_key(Session::address);
        return sessions;
    }
    if on_many_workers() {
        return sort_off_runtime(sessions).await;
    }
    let mut sessions = LetGo::new(sessions, WHAT);
    let order = radix_order(&sessions).await;
    let mut slots: LetGo<Vec<Option<Session<P>>>> =
        LetGo::new(Vec::with_capacity(sessions.len()), WHAT);
    let mut rest = LetGo::new(sessions.drain(..), WHAT);
    for (step, session) in rest.by_ref().enumerate() {
        if due(step) {
            pause().await;
        }
        slots.push(Some(session));
    }
    drop(rest);
    free_vec(std::mem::take(&mut *sessions));
    let mut sorted = LetGo::new(Vec::with_capacity(slots.len()), WHAT);
    for (step, &index) in order.iter().enumerate() {
        if due(step) {
            pause().await;
        }
        if let Some(session) = slots.get_mut(index).and_then(Option::take) {
            sorted.push(session);
        }
    }
    // Every slot taken: nothing in them to drop.
    free_vec(std::mem::take(&mut *slots));
    free_vec(order);
    std::mem::take(&mut *sorted)
}

/// What lets the sessions go, in the logs.
const WHAT: &str = "router deletion";

/// `sessions` sorted on tokio's blocking pool, the fastest sort, off the
/// runtime's workers. They stay in reach of this run meanwhile: if the
/// pool does not run the sort (a runtime shutting down), they come back as
/// they were given (the order is for locality only); if this run is
/// dropped meanwhile, the sort's thread drops them, under no lock, each
/// payload's `Drop` contained.
async fn sort_off_runtime<P: Send + Sync + 'static>(sessions: Vec<Session<P>>) -> Vec<Session<P>> {
    let cell = Arc::new(LetGo::new(Mutex::new(sessions), WHAT));
    let sorting = Arc::clone(&cell);
    let sorted = tokio::task::spawn_blocking(move || {
        sorting.lock().sort_unstable_by_key(Session::address);
    })
    .await;
    if let Err(error) = sorted {
        tracing::debug!(%error, "sessions left in the store's order");
    }
    // The sort ended (or never began): nobody else holds the lock.
    std::mem::take(&mut *cell.lock())
}

/// Whether this runs on a multi-thread tokio runtime.
fn on_many_workers() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        matches!(
            runtime.runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        )
    })
}

/// The positions of `sessions` in address order: an LSD radix sort of
/// words holding an address's high bits over its position's.
async fn radix_order<P>(sessions: &[Session<P>]) -> Vec<usize> {
    let (mut low, mut high) = (usize::MAX, 0);
    for (step, session) in sessions.iter().enumerate() {
        if due(step) {
            pause().await;
        }
        low = low.min(session.address());
        high = high.max(session.address());
    }
    // From the start of the lowest page, so that keys fall on page bounds.
    let low = low >> PAGE << PAGE;
    let span = u64::try_from(high.saturating_sub(low)).unwrap_or(u64::MAX) >> PAGE;
    let position_bits = u64::BITS - (sessions.len() as u64).leading_zeros();
    let span_bits = u64::BITS - span.leading_zeros();
    // Addresses too far apart for one word: keep their high bits only.
    // At most two passes: a span wider than `2 × DIGIT` bits (sessions far
    // apart, in different allocator arenas) is sorted by its high bits
    // only, each bucket left in the given order.
    let key_bits = span_bits.min(2 * DIGIT).min(u64::BITS - position_bits);
    let shift = PAGE + (span_bits - key_bits);
    let mut words = Vec::with_capacity(sessions.len());
    for (step, session) in sessions.iter().enumerate() {
        if due(step) {
            pause().await;
        }
        let offset = u64::try_from(session.address() - low).unwrap_or(u64::MAX) >> shift;
        words.push(offset << position_bits | step as u64);
    }
    // Written in order, a slice at a time: the scatter below then lands on
    // memory already mapped (a fresh page faults on first touch, and a
    // scatter touches thousands of pages per slice).
    let mut spare = Vec::with_capacity(words.len());
    while spare.len() < words.len() {
        let fill = (words.len() - spare.len()).min(SLICE);
        spare.resize(spare.len() + fill, 0);
        pause().await;
    }
    let mut sorted_bits = 0;
    while sorted_bits < key_bits {
        radix_pass(&words, &mut spare, position_bits + sorted_bits).await;
        std::mem::swap(&mut words, &mut spare);
        sorted_bits += DIGIT;
    }
    free_vec(spare);
    let mask = (1u64 << position_bits) - 1;
    let mut order = Vec::with_capacity(words.len());
    for (step, &word) in words.iter().enumerate() {
        if due(step) {
            pause().await;
        }
        // Lossless: a position below `sessions.len()`.
        #[allow(clippy::cast_possible_truncation)]
        order.push((word & mask) as usize);
    }
    free_vec(words);
    order
}

/// One stable counting pass on the digit at bit `from`: `words` into
/// `out`.
async fn radix_pass(words: &[u64], out: &mut [u64], from: u32) {
    let digit = |word: u64| {
        // Lossless: masked to `DIGIT` bits.
        #[allow(clippy::cast_possible_truncation)]
        let digit = ((word >> from) & ((1 << DIGIT) - 1)) as usize;
        digit
    };
    let mut starts = vec![0usize; 1 << DIGIT];
    for (step, &word) in words.iter().enumerate() {
        if due(step) {
            pause().await;
        }
        starts[digit(word)] += 1;
    }
    let mut next = 0;
    for start in &mut starts {
        let count = *start;
        *start = next;
        next += count;
    }
    for (step, &word) in words.iter().enumerate() {
        if due(step) {
            pause().await;
        }
        let bucket = &mut starts[digit(word)];
        out[*bucket] = word;
        *bucket += 1;
    }
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::{PAGE, SORT_AT_ONCE, SORT_FROM, by_address};
    use crate::id::{Incarnation, RouterId, SessionId};
    use crate::session::{NewSession, Session};

    fn sessions(n: u64) -> Vec<Session> {
        (0..n)
            .map(|i| NewSession::new(SessionId::new(i), RouterId::new(1), Incarnation::new(1)))
            .map(NewSession::into_session)
            .collect()
    }

    #[test]
    fn a_big_router_comes_out_whole_and_in_address_order() {
        let mut given = sessions(SORT_AT_ONCE as u64 * 3 + 7);
        // Hash order, as a store lists them.
        given
            .sort_unstable_by_key(|session| session.id().get().wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let sorted = futures::executor::block_on(by_address(given.clone()));
        assert_eq!(sorted.len(), given.len());
        let lines: Vec<usize> = sorted.iter().map(|s| s.address() >> PAGE).collect();
        assert!(lines.is_sorted(), "not in address order");
        let mut ids: Vec<u64> = sorted.iter().map(|s| s.id().get()).collect();
        ids.sort_unstable();
        assert!(
            ids.iter().copied().eq(0..given.len() as u64),
            "not a permutation"
        );
    }

    #[test]
    fn a_mid_sized_router_is_sorted_at_once() {
        let mut given = sessions(SORT_FROM as u64 + 1);
        given.reverse();
        let sorted = futures::executor::block_on(by_address(given));
        assert!(sorted.iter().map(Session::address).is_sorted());
    }

    /// On a multi-thread runtime, from a `LocalSet` driven by `block_on`
    /// (where `block_in_place` panics): sorted off the runtime.
    #[test]
    fn a_big_router_awaited_in_a_local_set_is_sorted() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("a runtime");
        let mut given = sessions(SORT_AT_ONCE as u64 + 1);
        given.reverse();
        let local = tokio::task::LocalSet::new();
        let sorted = local.block_on(&runtime, async {
            tokio::task::spawn_local(by_address(given))
                .await
                .expect("no panic")
        });
        assert_eq!(sorted.len(), SORT_AT_ONCE + 1);
        assert!(sorted.iter().map(Session::address).is_sorted());
    }

    #[test]
    fn a_small_router_is_left_in_its_order() {
        let mut given = sessions(100);
        given.reverse();
        let keys: Vec<_> = given.iter().map(Session::key).collect();
        let kept = futures::executor::block_on(by_address(given));
        assert!(kept.iter().map(Session::key).eq(keys));
    }
}
