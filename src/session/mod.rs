//! Sessions: the handle, its state machine and close notification.

mod beat;
mod close;
mod closed;
mod handle;
mod resource;
mod spec;
mod state;
mod token;
mod traffic;

#[cfg(all(test, session_lifecycle_loom))]
mod loom_tests;

pub(crate) use beat::{Estimate, TimeoutRule};
pub(crate) use close::{DeferredClose, release_contained};
pub use closed::{Closed, ClosedOwned};
pub use handle::Session;
pub use resource::{AttachError, Classed, Resource, ResourceClass};
pub use spec::NewSession;
pub(crate) use state::{CloseFrom, MAX_WATCHER, WatchRefused};
pub use state::{CloseOutcome, CloseReason, SessionState, Transition};
pub use token::SessionToken;
pub use traffic::Traffic;
