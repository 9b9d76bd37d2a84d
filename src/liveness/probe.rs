//! Probing suspects: the controller's `Prober`, and the per-router rounds.
//!
//! # Invariants
//!
//! - A router has at most one probe driver at a time: `Group::driving` is
//!   set under the `suspects` lock by whoever spawns it and cleared under
//!   the same lock by the driver when it leaves with nothing pending.
//! - A suspect is held by exactly one place: the monitor's wheel, a
//!   router's pending list, or its driver's round.
//! - A driver in its backoff wakes when suspects are handed to its group:
//!   it registers for `Group::arrival` before it looks at `pending`, and
//!   the monitor notifies after it added to `pending`.
//!
//! # Deadlock safety
//!
//! One lock, `Shared::suspects`, held only to move suspects in or out of a
//! group; never across an `.await` or a call into user code, nor while the
//! driver is woken.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use super::Shared;
use crate::closing::{close_all, remove_all};
use crate::contain::LetGo;
use crate::events::{LivenessEvent, ProbeError};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseFrom, CloseReason, Session, SessionState};
use crate::store::SessionStore;

/// Asks routers whether sessions are alive.
///
/// The controller implements it, typically by sending one "are these
/// sessions alive?" frame to the router. One call carries every suspect of
/// one router in a round. A session counts as alive if its id is in the
/// returned list, or if it is heard (a
/// [`heartbeat`](crate::LivenessMonitor::heartbeat)) before the round's
/// probe timeout: answers may come back either way.
///
/// The monitor protects itself from the prober: a call that errors, hangs
/// past the probe timeout or panics is a round nobody answered (reported in
/// [`LivenessEvent::ProbeFailed`]).
///
/// # Example
///
/// ```
/// use session_lifecycle::{ProbeBatch, ProbeError, Prober, SessionId};
///
/// struct Wire; // your connection registry
///
/// impl Prober for Wire {
///     async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
///         // Send one probe frame to batch.router; its answers arrive later
///         // as heartbeats. A request/response transport returns them here.
///         let _ = (batch.router, batch.sessions.len());
///         Ok(Vec::new())
///     }
/// }
/// ```
pub trait Prober: Send + Sync + 'static {
    /// Probes the sessions of `batch`; returns those that answered.
    ///
    /// See the example on [`Prober`].
    fn probe(
        &self,
        batch: ProbeBatch,
    ) -> impl Future<Output = Result<Vec<SessionId>, ProbeError>> + Send;
}

impl<Pr: Prober> Prober for Arc<Pr> {
    fn probe(
        &self,
        batch: ProbeBatch,
    ) -> impl Future<Output = Result<Vec<SessionId>, ProbeError>> + Send {
        (**self).probe(batch)
    }
}

/// A prober that asks nobody: suspects are spared only by a heartbeat
/// before their probe rounds run out. For controllers whose routers have
/// no probe message. See the example on [`LivenessMonitor`](crate::LivenessMonitor).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProbe;

impl Prober for NoProbe {
    async fn probe(&self, _batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        Ok(Vec::new())
    }
}

/// One probe call: suspects of one router. See the example on [`Prober`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeBatch {
    /// The router to ask.
    pub router: RouterId,
    /// The incarnation of the router the first suspect belongs to.
    pub incarnation: Incarnation,
    /// The suspects, in no particular order.
    pub sessions: Vec<SessionId>,
    /// The round of the router's probing, from 1.
    pub round: u32,
}

/// A session that missed its deadline.
pub(super) struct Suspect<P> {
    pub(super) session: Session<P>,
    /// When it was last heard, as the monitor convicted it.
    pub(super) heard: u64,
    /// Probe rounds it failed.
    pub(super) failed: u32,
}

/// A router's suspects waiting for its driver.
pub(super) struct Group<P> {
    pub(super) pending: Vec<Suspect<P>>,
    pub(super) driving: bool,
    /// Wakes the driver from its backoff when suspects are added.
    pub(super) arrival: Arc<Notify>,
}

impl<P> crate::contain::Holds for Group<P> {
    type Item = Suspect<P>;
    fn take_into(&mut self, out: &mut Vec<Suspect<P>>) {
        out.append(&mut self.pending);
    }
}

impl<P> Default for Group<P> {
    fn default() -> Self {
        Self {
            pending: Vec::new(),
            driving: false,
            arrival: Arc::new(Notify::new()),
        }
    }
}

/// What became of a suspect when looked at again.
enum Verdict {
    /// Still silent and open: keep probing.
    Silent,
    /// Heard since: back to the wheel.
    Answered,
    /// Closed or terminating: it leaves the monitor.
    Gone,
}

/// Probes `router`'s suspects in rounds until none is left: each round is
/// one call with every suspect, then a wait until the probe timeout (unless
/// all answered). Sessions that fail `1 + retries` rounds are reaped.
/// Between rounds the driver backs off, unless new suspects came (they are
/// probed at once, with everyone), or until they come (`arrival`).
///
/// So a suspect waits at most for the round in flight before its first
/// round, and between its own rounds no longer than the backoff gives its
/// failed rounds: the schedule starts over whenever new suspects join a
/// round, and its delays only grow.
///
/// While the partition guard holds, rounds go on once per two probe
/// timeouts and count against nobody, and nobody is reaped; once it lifts,
/// every suspect goes back to the wheel and starts over (once a hold
/// expires, rounds count again where they were).
pub(super) async fn drive<S: SessionStore, Pr: Prober>(
    shared: Arc<Shared<S, Pr>>,
    router: RouterId,
    arrival: Arc<Notify>,
    // Held, not read: the monitor's tag stays live while a driver runs.
    _lease: Arc<super::tag::Lease>,
) {
    // The suspects in the driver's hands, let go each with its payload's
    // `Drop` contained however the driver ends (a shutdown, its runtime
    // gone): a client may have closed and removed one, its last handle
    // here.
    let mut round: LetGo<Vec<Suspect<S::Payload>>> = LetGo::new(Vec::new(), "liveness monitor");
    let mut rounds = 0u32;
    let mut backoff = shared.config.backoff.iter();
    let mut guard = shared.partition_state().0;
    loop {
        let Some(mut fresh) = shared.take_pending(router, round.is_empty()) else {
            return;
        };
        let (changes, start_over) = shared.partition_state();
        if std::mem::replace(&mut guard, changes) != changes && start_over == Some(true) {
            // The partition guard lifted: everyone starts over. (After a
            // hold that expired, rounds count again where they were.)
            round.append(&mut fresh);
            shared.start_over(router, std::mem::take(&mut *round));
            continue;
        }
        // Suspects heard since they were convicted go back to the wheel
        // unprobed; closed ones leave.
        shared.keep_only(&mut round);
        shared.keep_only(&mut fresh);
        let fresh_ids: Vec<SessionId> = fresh.iter().map(|s| s.session.id()).collect();
        round.extend(fresh);
        if round.is_empty() {
            continue;
        }
        let view = shared.open_watched(router).await;
        if let Some((_, latest)) = view {
            shared.mark_quiet(router, &round, latest);
        }
        let watched = view.map(|(watched, _)| watched);
        let silent = |n: usize| watched.is_some_and(|w| w > 0 && n >= w);
        if !fresh_ids.is_empty() {
            backoff = shared.config.backoff.iter();
            tracing::debug!(%router, suspects = fresh_ids.len(), "sessions missed their heartbeat deadline");
            shared.emit(LivenessEvent::SessionSuspect {
                router,
                sessions: fresh_ids,
                router_silent: silent(round.len()),
            });
        }
        rounds = rounds.saturating_add(1);
        let stalls = shared.stall_count();
        let Some((error, woke_late)) = shared.probe_round(router, rounds, &round).await else {
            return; // shut down
        };
        if woke_late || shared.stall_count() != stalls {
            // The controller stalled during the round (the monitor's tick
            // saw it, or the round's own end came late: its deadline can
            // come before the next tick): answers may have been held up;
            // the round does not count against anyone.
            continue;
        }
        let (changes, start_over) = shared.partition_state();
        let holds = start_over.is_none();
        if changes != guard || holds {
            // The partition guard held during the round: it counts against
            // nobody. Those heard meanwhile are spared, which lifts it.
            shared.keep_only(&mut round);
            if holds && !round.is_empty() && !shared.pace_hold().await {
                return;
            }
            continue;
        }
        let mut failed = Vec::new();
        let mut dead = Vec::new();
        let retries = shared.config.probe_retries();
        shared.keep_only(&mut round);
        for mut suspect in std::mem::take(&mut *round) {
            suspect.failed = suspect.failed.saturating_add(1);
            failed.push(suspect.session.id());
            if suspect.failed > retries {
                dead.push(suspect);
            } else {
                round.push(suspect);
            }
        }
        if !failed.is_empty() {
            shared.emit(LivenessEvent::ProbeFailed {
                router,
                router_silent: silent(failed.len()),
                sessions: failed,
                round: rounds,
                error,
            });
        }
        if !dead.is_empty() && shared.judge_partition(shared.now()) {
            // Too many routers went silent together: the guard engaged.
            // They wait for it to end with the others, then start over.
            round.append(&mut dead);
        }
        if !dead.is_empty() {
            let router_silent = silent(dead.len());
            let dead = dead.into_iter().map(|suspect| suspect.session).collect();
            shared.reap(router, dead, router_silent).await;
        }
        if round.is_empty() {
            continue;
        }
        // Registered before the look at `pending`: suspects handed over
        // after it wake the wait.
        let arrived = arrival.notified();
        if !shared.has_pending(router) {
            // `None` only once the backoff's `max_duration` is spent: a
            // survivor failed at least as many rounds as delays were drawn
            // since the schedule started over, and at most `retries`, the
            // schedule's length. Then the next round follows at once.
            let delay = backoff.next().unwrap_or_default();
            if !shared.back_off(Instant::now() + delay, arrived).await {
                return;
            }
        }
    }
}

impl<S: SessionStore, Pr: Prober> Shared<S, Pr> {
    /// Takes the router's pending suspects; `None` (and the driver leaves)
    /// when there are none and the driver holds none either.
    fn take_pending(&self, router: RouterId, idle: bool) -> Option<Vec<Suspect<S::Payload>>> {
        {
            let mut groups = self.suspects.lock();
            let group = groups.entry(router).or_default();
            if !(group.pending.is_empty() && idle) {
                return Some(std::mem::take(&mut group.pending));
            }
            groups.remove(&router);
        }
        // No suspect left: the router is not silent (for the guard).
        self.tally(|votes, now| votes.mark(router, false, now));
        None
    }

    /// Sleeps until `until`, or until new suspects `arrived`; `false` if
    /// the monitor stopped first.
    async fn back_off(&self, until: Instant, arrived: Notified<'_>) -> bool {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = arrived => true,
            () = tokio::time::sleep_until(until) => true,
        }
    }

    fn has_pending(&self, router: RouterId) -> bool {
        self.suspects
            .lock()
            .get(&router)
            .is_some_and(|group| !group.pending.is_empty())
    }

    /// [`keep`](Self::keep) over `suspects`, in order; the handles of
    /// those not kept drop here, each panic of a payload's `Drop`
    /// contained (a driver outlives it).
    pub(super) fn keep_only(&self, suspects: &mut Vec<Suspect<S::Payload>>) {
        let (kept, left): (Vec<_>, Vec<_>) = std::mem::take(suspects)
            .into_iter()
            .partition(|suspect| self.keep(suspect));
        *suspects = kept;
        crate::contain::drop_each_logged(left, "liveness monitor");
    }

    /// Looks at a suspect again: `true` to keep it. Sends answered ones
    /// back to the wheel and lets gone ones leave.
    pub(super) fn keep(&self, suspect: &Suspect<S::Payload>) -> bool {
        let session = &suspect.session;
        if self.is_held(session.router(), session.incarnation()) {
            // Its router is held (disconnected, in its grace period): spared.
            suspect.session.beat().refresh(self.now());
        }
        match self.verdict(suspect) {
            Verdict::Silent => true,
            Verdict::Answered => {
                self.counters.spare();
                let router = suspect.session.router();
                self.tally(|votes, now| votes.unsuspect(router, 1, now));
                self.incoming.lock().push(suspect.session.clone());
                false
            }
            Verdict::Gone => {
                self.counters.unsuspect();
                self.counters.leave();
                let router = suspect.session.router();
                self.tally(|votes, now| votes.leave(router, 1, true, now));
                false
            }
        }
    }

    fn verdict(&self, suspect: &Suspect<S::Payload>) -> Verdict {
        let (_, state) = suspect.session.watcher();
        if state != SessionState::Active {
            Verdict::Gone
        } else if suspect.session.beat().heard() > suspect.heard {
            Verdict::Answered
        } else {
            Verdict::Silent
        }
    }

    /// How many open sessions of the router this monitor watches, and when
    /// the last of them was heard, from the store; `None` if the store
    /// could not say.
    ///
    /// The listing may hold the last handle of a session closed and removed
    /// meanwhile: the handles drop one by one, a payload's `Drop` that
    /// panics contained (and a store that panics counts as one that could
    /// not say), so the driver outlives both.
    async fn open_watched(&self, router: RouterId) -> Option<(usize, u64)> {
        // `sessions` itself, not only its future, may panic.
        let listed = AssertUnwindSafe(async { self.store.sessions(router).await })
            .catch_unwind()
            .await;
        let sessions = match listed {
            Ok(Ok(sessions)) => sessions,
            Ok(Err(_)) => return None,
            Err(panic) => {
                crate::contain::dispose(panic);
                tracing::error!(%router, "the store panicked listing a router's sessions; contained");
                return None;
            }
        };
        let watched = sessions
            .iter()
            .filter(|s| s.watcher() == (self.tag, SessionState::Active));
        let view = watched.fold((0, 0), |(count, latest), session| {
            (count + 1, latest.max(session.beat().heard()))
        });
        crate::contain::drop_each_logged(sessions, "liveness monitor");
        Some(view)
    }

    /// One probe call with every suspect of `round`, then the wait for
    /// answers. `None` if the monitor shut down; otherwise the call's error,
    /// if it failed, and whether the round ended later past its deadline
    /// than the pause allowance (the controller stalled).
    async fn probe_round(
        &self,
        router: RouterId,
        number: u32,
        round: &[Suspect<S::Payload>],
    ) -> Option<(Option<super::ProbeError>, bool)> {
        let deadline = Instant::now() + self.config.probe_timeout;
        // A big round is split into calls of at most `probe_batch` suspects,
        // made at once and bounded by the one deadline.
        let calls = round.chunks(self.config.probe_batch.max(1)).map(|chunk| {
            let batch = ProbeBatch {
                router,
                incarnation: chunk
                    .first()
                    .map_or(Incarnation::new(0), |s| s.session.incarnation()),
                sessions: chunk.iter().map(|s| s.session.id()).collect(),
                round: number,
            };
            self.counters.probe();
            // `probe` itself, not only its future, may panic.
            let call =
                AssertUnwindSafe(async move { self.prober.probe(batch).await }).catch_unwind();
            async move {
                // The router's budget, if any, within the probe's deadline.
                if let Some(budget) = &self.config.budget
                    && let Err(exhausted) = budget.acquire_by(router, chunk.len(), deadline).await
                {
                    return Some(ProbeError::msg(exhausted.to_string()));
                }
                match tokio::time::timeout_at(deadline, call).await {
                    Ok(Ok(Ok(alive))) => {
                        let now = self.now();
                        // A set: a big batch answered in full stays linear.
                        let alive: std::collections::HashSet<SessionId> =
                            alive.into_iter().collect();
                        for suspect in chunk {
                            if alive.contains(&suspect.session.id()) {
                                suspect.session.beat().refresh(now);
                            }
                        }
                        None
                    }
                    Ok(Ok(Err(error))) => Some(error),
                    Ok(Err(panic)) => {
                        crate::contain::dispose(panic);
                        Some(ProbeError::msg("the prober panicked"))
                    }
                    Err(_elapsed) => Some(ProbeError::msg("no answer within the probe timeout")),
                }
            }
        });
        let outcomes = tokio::select! {
            biased;
            () = self.stop.cancelled() => return None,
            outcomes = futures::future::join_all(calls) => outcomes,
        };
        let error = outcomes.into_iter().flatten().next();
        if let Some(error) = &error {
            self.counters.probe_error();
            tracing::debug!(%router, %error, "probe call failed");
        }
        // Answers may still come as heartbeats until the probe timeout.
        let all_answered = round
            .iter()
            .all(|s| !matches!(self.verdict(s), Verdict::Silent));
        if !all_answered && !self.sleep(deadline).await {
            return None;
        }
        let late = Instant::now().saturating_duration_since(deadline);
        Some((
            error,
            super::millis(late) > self.config.rule.pause_allowance,
        ))
    }

    /// Closes the dead suspects with `LivenessTimeout` (resources through
    /// the reclaim queue if there is one) and removes them from the store.
    /// Their handles drop at the end, each panic of a payload's `Drop`
    /// contained.
    async fn reap(&self, router: RouterId, dead: Vec<Session<S::Payload>>, router_silent: bool) {
        // Also if the driver is dropped while it closes them.
        let dead = LetGo::new(dead, "liveness monitor");
        self.reap_closing(router, &dead, router_silent).await;
    }

    async fn reap_closing(
        &self,
        router: RouterId,
        dead: &[Session<S::Payload>],
        router_silent: bool,
    ) {
        let reason = CloseReason::LivenessTimeout;
        // A session its router's deletion marked meanwhile is the deletion's.
        let closed = close_all(
            self.config.reclaim.as_ref(),
            dead,
            reason,
            CloseFrom::Active,
        )
        .await;
        // The store is user code: a panic removing them ends the removals
        // (the audit sweeper removes closed sessions left), not the driver.
        let removed = AssertUnwindSafe(remove_all(&*self.store, &closed))
            .catch_unwind()
            .await;
        if let Err(panic) = removed {
            crate::contain::dispose(panic);
            tracing::error!(%router, "the store panicked removing reaped sessions; contained");
        }
        for _ in dead {
            self.counters.unsuspect();
            self.counters.leave();
        }
        self.tally(|votes, now| votes.leave(router, dead.len(), true, now));
        if closed.is_empty() {
            return;
        }
        self.counters.reaped(closed.len());
        tracing::info!(%router, reaped = closed.len(), router_silent, "reaped sessions that answered no probe");
        self.emit(LivenessEvent::SessionReaped {
            router,
            sessions: closed.into_iter().map(SessionKey::id).collect(),
            router_silent,
        });
    }
}
