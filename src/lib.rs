//! Router-bound session lifecycle for network controllers.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms), allow(dead_code))))]

mod id;
mod loom;
mod session;
mod store;

pub use id::{Incarnation, RouterId, SessionId};
pub use session::{
    AttachError, CloseOutcome, CloseReason, Closed, ClosedOwned, NewSession, Resource, Session,
    SessionState, SessionToken, Traffic, Transition,
};
pub use store::{
    AuditReport, BackendError, CreateError, CreateErrorKind, FenceError, FenceSnapshot,
    FinishError, FinishReport, MemoryStore, MemoryStoreBuilder, RegisterError, RouterError,
    RouterStatus, SessionError, SessionStore,
};
