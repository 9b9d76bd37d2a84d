//! Sessions: the handle, its state machine and close notification.

mod beat;
mod closed;
mod handle;
mod resource;
mod state;
mod token;
mod traffic;

#[cfg(all(test, session_lifecycle_loom))]
mod loom_tests;

pub(crate) use beat::{Estimate, TimeoutRule};
pub use closed::{Closed, ClosedOwned};
pub(crate) use handle::{DeferredClose, release_contained};
pub use handle::{NewSession, Session};
pub use resource::{AttachError, Classed, Resource, ResourceClass};
pub(crate) use state::{CloseFrom, MAX_WATCHER, WatchRefused};
pub use state::{CloseOutcome, CloseReason, SessionState, Transition};
pub use token::SessionToken;
pub use traffic::Traffic;
