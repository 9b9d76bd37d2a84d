//! Invariant checks on a store: what DESIGN's I1, I2, I3 and I7 say, as
//! seen from outside the store.
//!
//! - `violation`: [`Violation`] and [`InvariantReport`], what a check finds;
//! - `checker`: [`InvariantChecker`], which remembers between checks, and
//!   the one-off [`check_invariants`] and [`assert_invariants`].

mod checker;
mod violation;

pub use checker::{InvariantChecker, assert_invariants, check_invariants};
pub use violation::{InvariantReport, Violation};
