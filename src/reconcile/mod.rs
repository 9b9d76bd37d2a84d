//! Reconciliation against what a router reports, and the disconnect grace
//! period.
//!
//! - `reconciler`: [`Reconciler`], its configuration, and the close both
//!   paths share;
//! - `builder`: [`ReconcilerBuilder`];
//! - `diff`: the reconciliation proper, the store against a router's report;
//! - `grace`: the disconnect grace period and its expiry;
//! - `report`: [`ReconcileReport`] and [`ReconcileError`].

mod builder;
mod diff;
mod grace;
mod reconciler;
mod report;

pub use builder::ReconcilerBuilder;
pub use reconciler::Reconciler;
pub use report::{ReconcileError, ReconcileReport};

pub use crate::events::ReconcileSummary;
