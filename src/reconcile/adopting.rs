//! Restart adoption: [`Reconciler::reconcile_adopting`], a reconciliation
//! whose unknown sessions are offered to an [`Adopter`] instead of being
//! dropped.
//!
//! # Invariants
//!
//! - Adopted sessions are created against the incarnation the call is for,
//!   which is checked live right before each chunk's decisions and again
//!   right after them; the store's create refuses a router fenced,
//!   deleted or registered again since (I2), and such a refusal is a
//!   rejection ([`RejectReason::NotCreated`]), never a session on a fenced
//!   router.
//! - Each reported id is offered at most once (the first report of an id
//!   wins), so an id is never both adopted and in the drop list.
//!
//! # Deadlock safety
//!
//! No lock: the adopter's `adopt` and `adopted`, and the drop of what it
//! returns, run on the reconciling task between store calls, with no lock
//! of the crate held.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use foldhash::fast::RandomState;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::time::Duration;
use tracing::Instrument;

use super::adopt::{Adopter, Adoption, ReportedSession};
use super::diff::Pass;
use super::reconciler::Reconciler;
use super::report::{ReconcileError, ReconcileReport, RejectReason, Rejection};
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{NewSession, SessionToken};
use crate::store::{CreateErrorKind, SessionStore};

/// What an adopter decided on one session: the parts of the session to
/// create, or why not.
/// An accepted session's payload, token and time left (as reported).
type Decision<P> = Result<(P, Option<SessionToken>, Option<Duration>), RejectReason>;

impl<S: SessionStore> Reconciler<S> {
    /// Reconciles a router's report as [`reconcile`](Self::reconcile)
    /// does, and offers each reported session the store does not know to
    /// `adopter` instead of telling the router to drop it: restart
    /// adoption.
    ///
    /// A controller on a store that does not survive it
    /// ([`MemoryStore`](crate::MemoryStore)) loses every session when it
    /// restarts; reconciled plainly, each router would then be told to drop
    /// every session, an outage of the whole network for a routine upgrade.
    /// Reconciled with adoption, each session a router reports with what
    /// vouches for it ([`ReportedSession`]: token, owner, expiry, your own
    /// data) is offered to your [`Adopter`]. Those it accepts are created in
    /// the store under the router's current incarnation (`incarnation`,
    /// checked live) with the payload and token it gives, and are
    /// [`adopted`](super::Adopter::adopted) (watch them in your liveness
    /// monitor there); the rest are in the report's `drop`, as unknown
    /// sessions are in a plain `reconcile`, and in its `rejected`, with
    /// why. Everything else (matched, closed, foreign, missing sessions)
    /// goes as in a plain `reconcile`.
    ///
    /// Adopt while the store may have lost sessions (the first
    /// reconciliation of each router after a restart), and reconcile
    /// plainly otherwise: a session the controller closed on purpose (a
    /// reaped or deleted session whose router did not hear of it) is
    /// unknown to the store too, and only an adopter that refuses its token
    /// keeps it closed.
    ///
    /// The first report of an id is the one offered; later reports of the
    /// same id are ignored. Decisions run up to
    /// [`adopt_concurrency`](crate::ReconcilerBuilder::adopt_concurrency)
    /// at once, each bounded by
    /// [`adopt_timeout`](crate::ReconcilerBuilder::adopt_timeout); a panic
    /// is a rejection. A create the store refuses (the id taken meanwhile,
    /// the router fenced, deleted or registered again meanwhile) is a
    /// rejection too ([`RejectReason::NotCreated`]).
    ///
    /// See the example on [`Adopter`].
    ///
    /// # Errors
    ///
    /// As [`reconcile`](Self::reconcile): [`ReconcileError::StaleIncarnation`],
    /// [`ReconcileError::NotLive`] (also when the router's deletion starts
    /// while the adopter decides: nothing of that chunk is created),
    /// [`ReconcileError::UnknownRouter`] (register the router first: after a
    /// restart, the store knows nothing), [`ReconcileError::Store`] if the
    /// backend failed (a create included). Sessions adopted or closed
    /// before an error stay so.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops between two store calls or while the
    /// adopter decides (its decisions in flight are dropped): every
    /// reported session is adopted or not, every held one closed and
    /// removed or untouched. An adopted session stays in the store, and the
    /// next reconciliation of the router, which reports it, matches it.
    pub async fn reconcile_adopting<I, A>(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        reported: I,
        adopter: &A,
    ) -> Result<ReconcileReport, ReconcileError>
    where
        I: IntoIterator<Item = ReportedSession<A::Data>>,
        A: Adopter<S::Payload>,
    {
        let span = tracing::info_span!("reconcile", %router, %incarnation, adopting = true);
        let mut offers: HashMap<SessionId, ReportedSession<A::Data>, RandomState> =
            HashMap::default();
        for session in reported {
            offers.entry(session.id).or_insert(session);
        }
        let ids = offers.keys().copied().collect();
        async {
            let mut pass = self.begin(router, incarnation, ids).await?;
            self.adopt(&mut pass, offers, adopter).await?;
            self.finish(pass).await
        }
        .instrument(span)
        .await
    }

    /// The adoption step: offers the pass's unknown sessions to `adopter`,
    /// chunk by chunk, and creates those it accepts.
    async fn adopt<A: Adopter<S::Payload>>(
        &self,
        pass: &mut Pass<S::Payload>,
        mut offers: HashMap<SessionId, ReportedSession<A::Data>, RandomState>,
        adopter: &A,
    ) -> Result<(), ReconcileError> {
        let (router, incarnation) = (pass.summary.router, pass.summary.incarnation);
        let config = &self.inner.config;
        let unknown = std::mem::take(&mut pass.unknown);
        for chunk in unknown.chunks(config.chunk) {
            self.next_chunk(router, incarnation, &mut pass.summary)
                .await?;
            let offered: Vec<_> = chunk.iter().filter_map(|id| offers.remove(id)).collect();
            let decisions = self.decide_all(adopter, router, offered).await;
            // The decisions may have taken a while: a router whose deletion
            // started meanwhile gets nothing of this chunk.
            self.check_live(router, incarnation).await?;
            for (id, decision) in decisions {
                match decision {
                    Ok((payload, token, expires_in)) => {
                        let spec = AdoptedSpec {
                            id,
                            payload,
                            token,
                            expires_in,
                        };
                        self.create_adopted(pass, adopter, spec).await?;
                    }
                    Err(reason) => reject(pass, id, reason),
                }
            }
        }
        Ok(())
    }

    /// Asks `adopter` about each of `offered`, up to `adopt_concurrency` at
    /// once; the decisions in `offered`'s order, so the report stays sorted.
    async fn decide_all<A: Adopter<S::Payload>>(
        &self,
        adopter: &A,
        router: RouterId,
        offered: Vec<ReportedSession<A::Data>>,
    ) -> Vec<(SessionId, Decision<S::Payload>)> {
        // A hand-driven queue rather than stream combinators: their
        // closures would make the caller's future not `Send` for some
        // borrows (rust-lang/rust#64552), and a controller spawns it.
        let config = &self.inner.config;
        let mut decisions = Vec::with_capacity(offered.len());
        let mut offered = offered.into_iter();
        let mut deciding = FuturesOrdered::new();
        loop {
            while deciding.len() < config.adopt_concurrency {
                let Some(reported) = offered.next() else {
                    break;
                };
                deciding.push_back(decide(adopter, router, reported, config.adopt_timeout));
            }
            match deciding.next().await {
                Some(decision) => decisions.push(decision),
                None => return decisions,
            }
        }
    }

    /// Creates an accepted session under the pass's incarnation; a create
    /// the store refuses is a rejection, a backend failure an error.
    async fn create_adopted<A: Adopter<S::Payload>>(
        &self,
        pass: &mut Pass<S::Payload>,
        adopter: &A,
        adopted: AdoptedSpec<S::Payload>,
    ) -> Result<(), ReconcileError> {
        let (router, incarnation) = (pass.summary.router, pass.summary.incarnation);
        let AdoptedSpec {
            id,
            payload,
            token,
            expires_in,
        } = adopted;
        let mut spec = NewSession::new(id, router, incarnation).payload(payload);
        if let Some(token) = token {
            spec = spec.token(token);
        }
        // The expiry the router reports, counted from now on this clock.
        if let Some(left) = expires_in {
            spec = spec.expires_in(left);
        }
        match self.inner.store.create(spec).await {
            Ok(session) => {
                tracing::trace!(session = %id, "session adopted");
                pass.summary.adopted += 1;
                pass.adopted.push(id);
                // User code, outside any lock; its panic costs only itself.
                let hooked = crate::contain::contain(|| adopter.adopted(&session));
                if hooked.is_none() {
                    tracing::warn!(session = %id, "the adopter panicked in `adopted`; the session stays adopted");
                }
                Ok(())
            }
            Err(error) => match error.kind() {
                CreateErrorKind::Backend(backend) => Err(backend.clone().into()),
                kind => {
                    reject(pass, id, RejectReason::NotCreated(kind.clone()));
                    Ok(())
                }
            },
        }
    }
}

/// Asks `adopter` about one session, containing its panic and bounding its
/// time.
async fn decide<P, A: Adopter<P>>(
    adopter: &A,
    router: RouterId,
    reported: ReportedSession<A::Data>,
    timeout: Duration,
) -> (SessionId, Decision<P>) {
    let id = reported.id;
    (id, decide_one(adopter, router, reported, timeout).await)
}

async fn decide_one<P, A: Adopter<P>>(
    adopter: &A,
    router: RouterId,
    reported: ReportedSession<A::Data>,
    timeout: Duration,
) -> Decision<P> {
    let expires_in = reported.expires_in;
    // Both the call (an adopter may build its future eagerly) and the
    // future's polls may panic.
    let decided = match std::panic::catch_unwind(AssertUnwindSafe(|| {
        adopter.adopt(router, reported)
    })) {
        Ok(deciding) => {
            match tokio::time::timeout(timeout, AssertUnwindSafe(deciding).catch_unwind()).await {
                Ok(decided) => decided,
                Err(_elapsed) => return Err(RejectReason::TimedOut),
            }
        }
        Err(panic) => Err(panic),
    };
    match decided {
        Ok(Adoption::Accept { payload, token }) => Ok((payload, token, expires_in)),
        Ok(Adoption::Reject { reason }) => Err(RejectReason::Refused(reason)),
        Err(panic) => {
            crate::contain::dispose(panic);
            Err(RejectReason::Panicked)
        }
    }
}

/// What an accepted session is created with.
struct AdoptedSpec<P> {
    id: SessionId,
    payload: P,
    token: Option<SessionToken>,
    expires_in: Option<Duration>,
}

/// Records a rejection: counted, reported, and dropped by the router.
fn reject<P>(pass: &mut Pass<P>, id: SessionId, reason: RejectReason) {
    tracing::debug!(session = %id, %reason, "session not adopted");
    pass.summary.rejected += 1;
    pass.drop.push(id);
    pass.rejected.push(Rejection { id, reason });
}
