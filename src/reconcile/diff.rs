//! The reconciliation proper: what a router reports against what the store
//! holds, chunk by chunk.

use std::borrow::Borrow;
use std::collections::HashSet;

use foldhash::fast::RandomState;
use tokio::time::{Duration, Instant};
use tracing::Instrument;

use super::reconciler::Reconciler;
use super::report::{ReconcileError, ReconcileReport};
use crate::events::ReconcileSummary;
use crate::events::{Event, emit};
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, Session, SessionState};
use crate::store::{RouterStatus, SessionError, SessionStore};

impl<S: SessionStore> Reconciler<S> {
    /// Reconciles `reported`, the sessions `router` says it holds in
    /// `incarnation`, against the store: see the type's documentation.
    /// Cancels the router's grace period, if it is in one. See the example on [`Reconciler`].
    ///
    /// `reported` is any iterator of ids or of references to ids (a
    /// `Vec<SessionId>`, a `&[SessionId]`, a decoder's iterator). Duplicate
    /// ids in the report count once. Sessions created after the
    /// call started (or younger than
    /// [`spare_younger_than`](crate::ReconcilerBuilder::spare_younger_than)) are
    /// never closed for missing from the report.
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
        self.reconcile_inner(router, incarnation, reported)
            .instrument(span)
            .await
    }

    async fn reconcile_inner(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        reported: HashSet<SessionId, RandomState>,
    ) -> Result<ReconcileReport, ReconcileError> {
        let started = Instant::now();
        let store = &*self.inner.store;
        let config = &self.inner.config;
        self.check_live(router, incarnation).await?;
        let grace_cancelled = self.cancel_grace(router, incarnation).await;
        let mut summary = ReconcileSummary {
            router,
            incarnation,
            reported: reported.len(),
            matched: 0,
            unknown: 0,
            closed_reported: 0,
            foreign: 0,
            closed: 0,
            spared: 0,
            removed: 0,
            grace_cancelled,
            chunks: 0,
            duration: Duration::ZERO,
        };
        let mut drop = Vec::new();
        // What the store holds now: a session created after this listing is
        // not in it, so it is never closed for missing from the report.
        let held = store.sessions(router).await?;

        // What the router holds, against the store.
        let mut ids: Vec<SessionId> = reported.iter().copied().collect();
        ids.sort_unstable();
        for chunk in ids.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut summary).await?;
            for &id in chunk {
                match store.get(id).await? {
                    None => summary.unknown += 1,
                    Some(session)
                        if session.router() != router || session.incarnation() != incarnation =>
                    {
                        summary.foreign += 1;
                    }
                    Some(session) if session.is_closed() => summary.closed_reported += 1,
                    Some(_) => {
                        summary.matched += 1;
                        continue;
                    }
                }
                tracing::trace!(session = %id, "router holds a session it should drop");
                drop.push(id);
            }
        }

        // What the store held that the router no longer does. Younger than
        // `spare_younger_than` means created after `cutoff`; `None`: the age
        // reaches back past the clock's start, so every session is young
        // enough to be spared.
        let cutoff = started.checked_sub(config.spare_younger_than);
        let mut missing: Vec<Session<S::Payload>> = Vec::new();
        let mut lingering: Vec<Session<S::Payload>> = Vec::new();
        for session in held {
            if session.incarnation() != incarnation {
                continue;
            }
            if session.is_closed() {
                // Closed on the controller but still stored (through its
                // handle, or by a reconciliation dropped half-way).
                lingering.push(session);
                continue;
            }
            if session.state() != SessionState::Active || reported.contains(&session.id()) {
                continue;
            }
            if cutoff.is_none_or(|cutoff| session.created_at() > cutoff) {
                summary.spared += 1;
            } else {
                missing.push(session);
            }
        }
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
            closed = summary.closed,
            "router reconciled"
        );
        emit(config.events.as_ref(), || Event::Reconciled(summary));
        Ok(ReconcileReport {
            summary,
            drop,
            closed,
        })
    }

    /// Counts a chunk; from the second on, yields to the runtime and checks
    /// that the router is still live.
    async fn next_chunk(
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

    async fn check_live(
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
