//! The reconciliation proper: what a router reports against what the store
//! holds, chunk by chunk.
//!
//! A pass runs in three steps: [`Reconciler::begin`] checks the router,
//! cancels its grace period and sorts the reported ids into matched, to
//! drop, and unknown; the caller settles the unknown ones (dropped by
//! `reconcile`, offered for adoption by `reconcile_adopting`); and
//! [`Reconciler::finish`] closes what the router no longer holds.

use std::borrow::Borrow;
use std::collections::HashSet;

use foldhash::fast::RandomState;
use tokio::time::{Duration, Instant};
use tracing::Instrument;

use super::reconciler::Reconciler;
use super::report::{ReconcileError, ReconcileReport, Rejection};
use crate::contain::{LetGo, drop_each_logged};
use crate::events::ReconcileSummary;
use crate::events::{Event, emit};
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, Session, SessionState};
use crate::store::{RouterStatus, SessionError, SessionStore};

/// A reconciliation in progress, between its steps.
pub(super) struct Pass<P> {
    pub(super) started: Instant,
    pub(super) summary: ReconcileSummary,
    /// The ids the router reported, deduplicated.
    pub(super) reported: HashSet<SessionId, RandomState>,
    /// What the store held for the router when the call started (let go
    /// each with its payload's `Drop` contained: a client may remove a
    /// session meanwhile, leaving its last handle here).
    pub(super) held: LetGo<Vec<Session<P>>>,
    /// Reported ids the router must drop (closed, foreign; the unknown ones
    /// once settled).
    pub(super) drop: Vec<SessionId>,
    /// Reported ids the store does not know, sorted; counted in
    /// `summary.unknown`.
    pub(super) unknown: Vec<SessionId>,
    /// Unknown ids adopted into the store, sorted.
    pub(super) adopted: Vec<SessionId>,
    /// Unknown ids offered for adoption and refused, sorted by id.
    pub(super) rejected: Vec<Rejection>,
}

impl<S: SessionStore> Reconciler<S> {
    /// Reconciles `reported`, the sessions `router` says it holds in
    /// `incarnation`, against the store: see the type's documentation.
    /// Cancels the router's grace period, if it is in one. See the example on [`Reconciler`].
    ///
    /// `reported` is any iterator of ids or of references to ids (a
    /// `Vec<SessionId>`, a `&[SessionId]`, a decoder's iterator). Duplicate
    /// ids in the report count once. Sessions created after the
    /// call started, at a later instant of tokio's clock (or younger than
    /// [`spare_younger_than`](crate::ReconcilerBuilder::spare_younger_than)), are
    /// never closed for missing from the report. One created in the very
    /// instant the call starts counts as older (on a paused clock, advance
    /// it between the two). Reported sessions the
    /// store does not know are to be dropped by the router; to offer them
    /// for adoption instead (a controller that restarted and lost its
    /// store), see [`reconcile_adopting`](Self::reconcile_adopting).
    ///
    /// # Errors
    ///
    /// [`ReconcileError::StaleIncarnation`] for a report from an incarnation
    /// that is not the router's live one, [`ReconcileError::NotLive`] if the
    /// router's deletion started (before the call or during it: the call
    /// stops at the next chunk), [`ReconcileError::UnknownRouter`], and
    /// [`ReconcileError::Store`] if the backend failed. Sessions closed
    /// before an error stay closed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops between two store calls: every session is
    /// either untouched or closed and removed (a closed session the store
    /// still holds is removed by the next reconciliation or sweep).
    pub async fn reconcile<I>(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        reported: I,
    ) -> Result<ReconcileReport, ReconcileError>
    where
        I: IntoIterator,
        I::Item: Borrow<SessionId>,
    {
        let span = tracing::info_span!("reconcile", %router, %incarnation);
        let reported = reported.into_iter().map(|id| *id.borrow()).collect();
        async {
            let mut pass = self.begin(router, incarnation, reported).await?;
            let unknown = std::mem::take(&mut pass.unknown);
            pass.drop.extend(unknown);
            self.finish(pass).await
        }
        .instrument(span)
        .await
    }

    /// The first step of a pass: checks the router, cancels its grace
    /// period, lists what the store holds, and sorts the reported ids.
    pub(super) async fn begin(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        reported: HashSet<SessionId, RandomState>,
    ) -> Result<Pass<S::Payload>, ReconcileError> {
        let started = Instant::now();
        let store = &*self.inner.store;
        self.check_live(router, incarnation).await?;
        let grace_cancelled = self.cancel_grace(router, incarnation).await;
        let summary = ReconcileSummary {
            router,
            incarnation,
            reported: reported.len(),
            matched: 0,
            unknown: 0,
            closed_reported: 0,
            foreign: 0,
            adopted: 0,
            rejected: 0,
            closed: 0,
            spared: 0,
            removed: 0,
            grace_cancelled,
            chunks: 0,
            duration: Duration::ZERO,
        };
        // What the store holds now: a session created after this listing is
        // not in it, so it is never closed for missing from the report.
        let held = store.sessions(router).await?;
        let mut pass = Pass {
            started,
            summary,
            reported,
            held: LetGo::new(held, "reconcile"),
            drop: Vec::new(),
            unknown: Vec::new(),
            adopted: Vec::new(),
            rejected: Vec::new(),
        };

        // What the router holds, against the store.
        let mut ids: Vec<SessionId> = pass.reported.iter().copied().collect();
        ids.sort_unstable();
        for chunk in ids.chunks(self.inner.config.chunk) {
            self.next_chunk(router, incarnation, &mut pass.summary)
                .await?;
            for &id in chunk {
                let Some(session) = store.get(id).await? else {
                    pass.summary.unknown += 1;
                    pass.unknown.push(id);
                    continue;
                };
                let foreign = session.router() != router || session.incarnation() != incarnation;
                let closed = session.is_closed();
                // Its last handle, maybe (removed meanwhile): the payload's
                // `Drop` is user code.
                drop_each_logged([session], "reconcile");
                if foreign {
                    pass.summary.foreign += 1;
                } else if closed {
                    pass.summary.closed_reported += 1;
                } else {
                    pass.summary.matched += 1;
                    continue;
                }
                tracing::trace!(session = %id, "router holds a session it should drop");
                pass.drop.push(id);
            }
        }
        Ok(pass)
    }

    /// The last step of a pass: closes what the router no longer holds,
    /// removes what was closed but left in the store, and reports.
    pub(super) async fn finish(
        &self,
        pass: Pass<S::Payload>,
    ) -> Result<ReconcileReport, ReconcileError> {
        let Pass {
            started,
            mut summary,
            reported,
            mut held,
            mut drop,
            unknown: _,
            adopted,
            rejected,
        } = pass;
        let (router, incarnation) = (summary.router, summary.incarnation);
        let store = &*self.inner.store;
        let config = &self.inner.config;
        drop.sort_unstable();
        // What the store held that the router no longer does. Younger than
        // `spare_younger_than` means created after `cutoff`; `None`: the age
        // reaches back past the clock's start, so every session is young
        // enough to be spared.
        let cutoff = started.checked_sub(config.spare_younger_than);
        // The handles go each with its payload's `Drop` contained, also
        // on an early return or this future dropped: the reconciliation
        // may hold the last of a session it removed (user code's panic
        // there must not cost the report, nor two abort the process).
        let mut missing = LetGo::new(Vec::new(), "reconcile");
        let mut lingering = LetGo::new(Vec::new(), "reconcile");
        let mut left = LetGo::new(Vec::new(), "reconcile");
        for session in std::mem::take(&mut *held) {
            if session.incarnation() != incarnation {
                left.push(session);
            } else if session.is_closed() {
                // Closed on the controller but still stored (through its
                // handle, or by a reconciliation dropped half-way).
                lingering.push(session);
            } else if session.state() != SessionState::Active || reported.contains(&session.id()) {
                left.push(session);
            } else if cutoff.is_none_or(|cutoff| session.created_at() > cutoff) {
                summary.spared += 1;
                left.push(session);
            } else {
                missing.push(session);
            }
        }
        std::mem::drop(left);
        missing.sort_unstable_by_key(Session::id);
        let mut closed = Vec::new();
        for chunk in missing.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut summary).await?;
            closed.extend(self.close_and_remove(chunk, CloseReason::Reclaimed).await);
        }
        summary.closed = closed.len();
        for chunk in lingering.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut summary).await?;
            for session in chunk {
                // By key: a session that reused the id meanwhile stays.
                match store.remove_exact(session.key()).await {
                    Ok(_) => summary.removed += 1,
                    Err(SessionError::Backend(error)) => return Err(error.into()),
                    // Removed meanwhile.
                    Err(_) => {}
                }
            }
        }
        summary.duration = started.elapsed();
        tracing::info!(
            reported = summary.reported,
            matched = summary.matched,
            dropped = drop.len(),
            adopted = summary.adopted,
            closed = summary.closed,
            "router reconciled"
        );
        emit(config.events.as_ref(), || Event::Reconciled(summary));
        Ok(ReconcileReport {
            summary,
            drop,
            closed,
            adopted,
            rejected,
        })
    }

    /// Counts a chunk; from the second on, yields to the runtime and checks
    /// that the router is still live.
    pub(super) async fn next_chunk(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        summary: &mut ReconcileSummary,
    ) -> Result<(), ReconcileError> {
        summary.chunks += 1;
        if summary.chunks > 1 {
            tokio::task::yield_now().await;
        }
        // Right before each chunk, the first included: a router fenced since
        // the call started is its deletion's.
        self.check_live(router, incarnation).await
    }

    pub(super) async fn check_live(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<(), ReconcileError> {
        match self.inner.store.router_status(router).await? {
            RouterStatus::Live(live) if live == incarnation => Ok(()),
            status @ (RouterStatus::Fenced(current) | RouterStatus::Deleted(current))
                if current == incarnation =>
            {
                Err(ReconcileError::NotLive { router, status })
            }
            current => Err(ReconcileError::StaleIncarnation {
                router,
                reported: incarnation,
                current,
            }),
        }
    }
}
