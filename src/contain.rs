//! User code run with its panic contained, the panic's payload included.
//!
//! `catch_unwind(..).is_ok()` drops the payload of a caught panic in the
//! caller, outside the catch; a payload is any value (`panic_any`), and a
//! payload whose own `Drop` panics would escape there. These helpers drop
//! it inside a second catch, and forget whatever that one catches: a few
//! bytes leaked in a case no sane program reaches, never a panic let out.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f` (user code); `None` if it panicked. The panic's payload is
/// disposed of here (see [`dispose`]).
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) => {
            dispose(payload);
            None
        }
    }
}

/// Drops a caught panic's payload; if its `Drop` panics, that second
/// payload is forgotten.
pub(crate) fn dispose(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(|| drop(payload))) {
        std::mem::forget(again);
    }
}

/// Drops each of `values` (session handles, whose last drop runs the
/// payload's `Drop`: user code), each panic contained; returns how many
/// panicked. A background task that lets handles go this way outlives a
/// payload whose `Drop` panics.
///
/// One catch for the whole run while no drop panics (no cost per value on
/// a deletion's hot path); after a panic the rest are dropped in a new
/// one. Each value is taken from the iterator before it is dropped, so a
/// drop that panics leaves the iterator where it was.
pub(crate) fn drop_each<T>(values: impl IntoIterator<Item = T>) -> usize {
    let mut values = values.into_iter();
    let mut panicked = 0;
    while let Err(payload) = catch_unwind(AssertUnwindSafe(|| {
        for value in values.by_ref() {
            drop(value);
        }
    })) {
        dispose(payload);
        panicked += 1;
    }
    panicked
}

/// [`drop_each`], logging the panics as `what`'s.
pub(crate) fn drop_each_logged<T>(values: impl IntoIterator<Item = T>, what: &str) {
    log_drop_panics(drop_each(values), what);
}

/// Logs that `panicked` payload `Drop`s panicked (contained) in `what`;
/// nothing if none did.
pub(crate) fn log_drop_panics(panicked: usize, what: &str) {
    #[cold]
    #[inline(never)]
    fn log(panicked: usize, what: &str) {
        tracing::error!(
            panicked,
            "{what}: a session payload's Drop panicked; the panic was contained"
        );
    }
    if panicked > 0 {
        log(panicked, what);
    }
}

/// What a [`LetGo`] may hold: a collection that hands out what it holds.
pub(crate) trait Holds {
    /// What it holds: values whose drop may run user code.
    type Item;
    /// Moves everything it holds to `out`.
    fn take_into(&mut self, out: &mut Vec<Self::Item>);
}

impl<T> Holds for Vec<T> {
    type Item = T;
    fn take_into(&mut self, out: &mut Vec<T>) {
        out.append(self);
    }
}

/// What a drain has not handed out yet (a loop over it left early: an
/// `.await` in it where its future was dropped).
impl<T> Holds for std::vec::Drain<'_, T> {
    type Item = T;
    fn take_into(&mut self, out: &mut Vec<T>) {
        out.extend(self.by_ref());
    }
}

impl<K, V: Holds, H> Holds for std::collections::HashMap<K, V, H> {
    type Item = V::Item;
    fn take_into(&mut self, out: &mut Vec<V::Item>) {
        for (_, mut held) in self.drain() {
            held.take_into(out);
        }
    }
}

impl<T: Holds> Holds for parking_lot::Mutex<T> {
    type Item = T::Item;
    fn take_into(&mut self, out: &mut Vec<T::Item>) {
        self.get_mut().take_into(out);
    }
}

/// Holds values whose drop may run user code (session handles: the last
/// one runs the payload's `Drop`), and lets them go as [`drop_each`] does,
/// each panic contained and logged as `what`'s, however it is itself let
/// go: at the end of its scope, on an early return or a `?`, or with a
/// task's future dropped by its runtime. Plain drop glue would let the
/// first panic out, and abort the process at the second (a panic while
/// unwinding).
pub(crate) struct LetGo<T: Holds> {
    held: T,
    what: &'static str,
}

impl<T: Holds> LetGo<T> {
    pub(crate) fn new(held: T, what: &'static str) -> Self {
        Self { held, what }
    }
}

impl<T: Holds> std::ops::Deref for LetGo<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.held
    }
}

impl<T: Holds> std::ops::DerefMut for LetGo<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.held
    }
}

impl<T: Holds> Drop for LetGo<T> {
    fn drop(&mut self) {
        let mut held = Vec::new();
        self.held.take_into(&mut held);
        drop_each_logged(held, self.what);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{LetGo, drop_each};

    /// Counts its drops; panics in `Drop` when `armed`, even while another
    /// panic unwinds (a careless user's payload).
    pub(crate) struct Loud {
        pub(crate) armed: bool,
        pub(crate) drops: Arc<AtomicUsize>,
    }

    impl Drop for Loud {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
            assert!(!self.armed, "a payload's Drop panicked");
        }
    }

    pub(crate) fn louds(n: usize, armed: &[usize], drops: &Arc<AtomicUsize>) -> Vec<Loud> {
        (0..n)
            .map(|i| Loud {
                armed: armed.contains(&i),
                drops: Arc::clone(drops),
            })
            .collect()
    }

    #[test]
    fn drop_each_drops_every_value_and_counts_the_panics() {
        let drops = Arc::new(AtomicUsize::new(0));
        let panicked = drop_each(louds(10, &[0, 4, 5, 9], &drops));
        assert_eq!(panicked, 4);
        assert_eq!(drops.load(Ordering::SeqCst), 10);
        assert_eq!(drop_each(louds(3, &[], &drops)), 0);
        assert_eq!(drops.load(Ordering::SeqCst), 13);
    }

    #[test]
    fn let_go_drops_what_it_holds_each_panic_contained() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut map = std::collections::HashMap::new();
        map.insert(1, louds(3, &[0, 2], &drops));
        map.insert(2, louds(2, &[1], &drops));
        drop(LetGo::new(parking_lot::Mutex::new(map), "test"));
        assert_eq!(drops.load(Ordering::SeqCst), 5);
        // Let go by an unwinding panic: the others still drop, and the
        // process does not abort.
        let unwound = std::panic::catch_unwind(|| {
            let _held = LetGo::new(louds(4, &[1, 3], &drops), "test");
            panic!("the owner's own panic");
        });
        assert!(unwound.is_err());
        assert_eq!(drops.load(Ordering::SeqCst), 9);
    }
}
