//! [`ReconcileSummary`]: what a reconciliation found and did, in counts.

use tokio::time::Duration;

use crate::id::{Incarnation, RouterId};

/// What a reconciliation found and did, in counts; carried by
/// [`Event::Reconciled`](crate::Event::Reconciled).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, Reconciler, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let other = RouterId::new(2);
/// let other_incarnation = store.register_router(other).await?;
/// for id in 1..=3 {
///     let _ =
///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await?;
/// }
/// let _ =
///     store.create(NewSession::new(SessionId::new(4), other, other_incarnation)).await?;
/// let _ = store.close(SessionId::new(3), CloseReason::ClientClosed).await?;
///
/// let reconciler = Reconciler::builder().build(Arc::clone(&store))?;
/// // The router holds 1 and 3 (closed since), 4 (another router's) and 9 (unknown).
/// let ids = [1, 3, 4, 9].map(SessionId::new);
/// let summary = reconciler.reconcile(router, incarnation, ids).await?.summary;
/// assert_eq!((summary.reported, summary.matched), (4, 1));
/// assert_eq!((summary.unknown, summary.foreign), (2, 1)); // 3 is gone from the store
/// assert_eq!(summary.closed, 1); // 2: the controller held it, the router no longer does
/// assert!(!summary.grace_cancelled);
/// # Ok(())
/// # }
/// ```
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
    /// Reported sessions the controller does not know.
    pub unknown: usize,
    /// Reported sessions the controller closed already.
    pub closed_reported: usize,
    /// Reported sessions of another router or another incarnation.
    pub foreign: usize,
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
