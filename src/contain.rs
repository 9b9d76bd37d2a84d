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
pub(crate) fn drop_each<T>(values: impl IntoIterator<Item = T>) -> usize {
    values
        .into_iter()
        .map(|value| contain(move || drop(value)))
        .filter(Option::is_none)
        .count()
}

/// [`drop_each`], logging the panics as `what`'s.
pub(crate) fn drop_each_logged<T>(values: impl IntoIterator<Item = T>, what: &str) {
    let panicked = drop_each(values);
    if panicked > 0 {
        tracing::error!(
            panicked,
            "{what}: a session payload's Drop panicked; the panic was contained"
        );
    }
}
