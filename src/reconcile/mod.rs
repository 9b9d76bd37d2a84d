//! Reconciliation against what a router reports, and the disconnect grace
//! period.
//!
//! - `reconciler`: [`Reconciler`], its configuration, and the close both
//!   paths share;
//! - `adopt`: restart adoption's vocabulary: [`ReportedSession`],
//!   [`Adopter`], [`Adoption`], [`adopt_fn`];
//! - `adopting`: [`Reconciler::reconcile_adopting`], the adoption step of a
//!   reconciliation;
//! - `builder`: [`ReconcilerBuilder`];
//! - `diff`: the reconciliation proper, the store against a router's report;
//! - `grace`: the disconnect grace period and its expiry;
//! - `report`: [`ReconcileReport`], [`Rejection`] and [`ReconcileError`].

mod adopt;
mod adopting;
mod builder;
mod diff;
mod grace;
mod reconciler;
mod report;

pub use adopt::{AdoptFn, Adopter, Adoption, ReportedSession, adopt_fn};
pub use builder::ReconcilerBuilder;
pub use reconciler::Reconciler;
pub use report::{ReconcileError, ReconcileReport, RejectReason, Rejection};

pub use crate::events::ReconcileSummary;
