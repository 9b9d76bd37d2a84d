//! Sessions: the handle, its state machine and close notification.

mod close;
mod estimator;
mod expiry;
mod handle;
mod resource;
mod spec;
mod state;
mod token;
mod traffic;
mod wait;

#[cfg(all(test, session_lifecycle_loom))]
mod loom_tests;

pub(crate) use close::{DeferredClose, release_contained, wake_contained};
pub(crate) use estimator::{Estimate, TimeoutRule};
pub use expiry::ExpiryError;
pub(crate) use expiry::ExpirySnapshot;
pub use handle::Session;
pub use resource::{AttachError, Classed, Resource, ResourceClass};
pub use spec::NewSession;
pub(crate) use state::{CloseFrom, MAX_WATCHER, WatchRefused};
pub use state::{CloseOutcome, CloseReason, SessionState, Transition};
pub use token::SessionToken;
pub use traffic::Traffic;
pub use wait::{WaitForClose, WaitForCloseOwned};
