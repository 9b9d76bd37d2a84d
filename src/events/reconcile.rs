//! What a reconciliation reports: [`ReconcileSummary`].

use tokio::time::Duration;

use crate::id::{Incarnation, RouterId};

/// What a reconciliation found and did, in counts; carried by
/// [`Event::Reconciled`](super::Event::Reconciled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileSummary {
    /// The router.
    pub router: RouterId,
    /// Its live incarnation.
    pub incarnation: Incarnation,
    /// Distinct session ids the router reported.
    pub reported: usize,
    /// Reported sessions the controller holds open for this router and
    /// incarnation.
    pub matched: usize,
    /// Reported sessions the controller does not know (adopted ones
    /// included: see [`adopted`](Self::adopted)).
    pub unknown: usize,
    /// Reported sessions the controller closed already.
    pub closed_reported: usize,
    /// Reported sessions of another router or another incarnation.
    pub foreign: usize,
    /// Unknown sessions adopted: offered to the adopter of
    /// [`Reconciler::reconcile_adopting`](crate::Reconciler::reconcile_adopting),
    /// accepted, and created in the store under the router's incarnation.
    /// Always 0 for a plain `reconcile`. In an adopting call,
    /// `adopted + rejected == unknown`.
    pub adopted: usize,
    /// Unknown sessions offered for adoption and not adopted (refused by the
    /// adopter, its panic or timeout, or a create the store refused): the
    /// router is told to drop them. Always 0 for a plain `reconcile`.
    pub rejected: usize,
    /// Sessions the controller held that the router no longer holds, closed
    /// by this call.
    pub closed: usize,
    /// Sessions missing from the report spared because they are younger
    /// than the configured age.
    pub spared: usize,
    /// Sessions of this incarnation closed already but still in the store
    /// (closed through their handles, or by a call dropped half-way),
    /// removed by this call.
    pub removed: usize,
    /// Whether the call cancelled the router's grace period.
    pub grace_cancelled: bool,
    /// Chunks handled.
    pub chunks: usize,
    /// How long the call took, on tokio's clock.
    pub duration: Duration,
}
