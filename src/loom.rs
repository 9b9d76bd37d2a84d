//! Synchronisation primitives of the session handle, swapped for loom's when
//! the crate is built with `RUSTFLAGS="--cfg session_lifecycle_loom"`.
//!
//! Only the session's state word and close notification, and the deleter's
//! run driver, go through this shim: those are the parts whose
//! interleavings loom explores.

#[cfg(session_lifecycle_loom)]
pub(crate) use loom::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering, fence},
};
#[cfg(not(session_lifecycle_loom))]
pub(crate) use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering, fence},
};

/// A mutex with parking_lot's poison-free `lock()`, over loom's mutex under
/// loom.
#[derive(Debug)]
pub(crate) struct Mutex<T>(
    #[cfg(not(session_lifecycle_loom))] parking_lot::Mutex<T>,
    #[cfg(session_lifecycle_loom)] loom::sync::Mutex<T>,
);

#[cfg(not(session_lifecycle_loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(session_lifecycle_loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(not(session_lifecycle_loom))]
        return Self(parking_lot::Mutex::new(value));
        #[cfg(session_lifecycle_loom)]
        return Self(loom::sync::Mutex::new(value));
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(session_lifecycle_loom))]
        return self.0.lock();
        // Poisoning cannot lose data here: every critical section of the
        // session leaves its state consistent before anything can panic.
        #[cfg(session_lifecycle_loom)]
        return self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}
