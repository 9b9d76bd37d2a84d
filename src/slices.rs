//! Long passes in slices.
//!
//! A pass over a router's sessions (a deletion's marking, waiting and
//! forcing, a fence's snapshot, a `finish`) may touch a million of them.
//! Each yields to the runtime between slices of [`SLICE`] sessions, so that
//! no task holds a runtime worker for more than a fraction of a
//! millisecond at a time, whatever the router's size: a 1M-session
//! deletion never stalls the heartbeats, probes and other deletions that
//! share its worker.

/// Sessions a pass handles between two yields: a few hundred microseconds
/// of the slowest pass (a `finish` removing sessions from the map).
pub(crate) const SLICE: usize = 4096;

/// Lets the runtime run other tasks (and its I/O and timer drivers) before
/// the pass goes on. Outside a tokio runtime there is nobody to yield to,
/// and it returns at once: a `MemoryStore` call polled by hand still
/// resolves at the first poll.
pub(crate) async fn pause() {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::yield_now().await;
    }
}

/// Sessions a read-only scan (a state load each) checks between two
/// yields: each yield may move the task to another worker, so cheap passes
/// take longer slices.
pub(crate) const SCAN_SLICE: usize = 8 * SLICE;

/// Whether a pass is at the start of a new slice (and should [`pause`]
/// first) when about to take `step`: `if due(step) { pause().await }`
/// costs a compare per step, a call only once a slice.
#[inline]
pub(crate) fn due(step: usize) -> bool {
    step > 0 && step.is_multiple_of(SLICE)
}

/// [`due`] for a read-only scan: every [`SCAN_SLICE`] steps.
#[inline]
pub(crate) fn scan_due(step: usize) -> bool {
    step > 0 && step.is_multiple_of(SCAN_SLICE)
}

/// Drops what `items` yields a slice at a time, pausing in between:
/// dropping a session's last handle frees it (and runs its payload's
/// `Drop`, user code: one that panics is contained, and the rest are still
/// dropped). Returns how many drops panicked.
pub(crate) async fn drop_in_slices<I: Iterator>(items: I) -> usize {
    let mut items = items.peekable();
    let mut panicked = 0;
    loop {
        panicked += crate::contain::drop_each(items.by_ref().take(SLICE));
        if items.peek().is_none() {
            return panicked;
        }
        pause().await;
    }
}

/// Buffers at least this big are freed off the runtime's workers.
const BIG: usize = 1 << 20;

/// Frees `buffer`, an emptied collection of `bytes` bytes, on the
/// runtime's blocking pool if it is big: giving tens of megabytes back to
/// the system takes milliseconds. `buffer` must hold nothing whose `Drop`
/// is user code.
pub(crate) fn free_off_worker<T: Send + 'static>(buffer: T, bytes: usize) {
    if bytes >= BIG
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        // Detached: nothing waits for a free. On a runtime shutting down
        // the closure is dropped unrun, which frees the buffer there.
        drop(runtime.spawn_blocking(move || drop(buffer)));
        return;
    }
    drop(buffer);
}

/// [`free_off_worker`] for an emptied `Vec`.
pub(crate) fn free_vec<T: Send + 'static>(items: Vec<T>) {
    let bytes = items.capacity().saturating_mul(std::mem::size_of::<T>());
    free_off_worker(items, bytes);
}
