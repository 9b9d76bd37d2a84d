//! One deletion run: fence → mark → notify/wait rounds → force → finish.
//!
//! # Invariants
//!
//! - Every session of the snapshot is either already closed when marked, or
//!   tracked; a round ends when every tracked session's close completed
//!   (checked by a scan, waiting on one open session at a time, from the
//!   last notified back) or at its deadline. Nothing is attached to a
//!   session to track it: no allocation per session.
//! - Every pass over the sessions (sort, mark, notify, wait, force, the
//!   final drop) yields to the runtime between slices of `SLICE` sessions
//!   (and between notification batches): a 1M-session deletion never
//!   holds a worker for long.
//! - Every timer wait is bounded by the configuration (`Config::max_wait`),
//!   and every notifier call by `notify_timeout`; a notifier panic is caught.
//! - The run closes every tracked session before it calls `finish`, and
//!   awaits each close's completion, so when it returns all resources are
//!   released and all waiters woken (I1). A round that saw every tracked
//!   close complete (`settled`) leaves the force pass nothing to do.
//! - The tracked handles are shared only with the batches' `Confirmations`,
//!   weakly: a confirmation holds them while it closes sessions (never
//!   while it waits for a key from the caller's iterator), and closes
//!   only a session of its own batch, by handle (I9).
//!
//! # Deadlock safety
//!
//! The run takes no lock of its own: it reads session states, and waits
//! on one session's close at a time. A confirmation by handle closes its
//! session in the confirming caller's context, with nothing of the run
//! held.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use backon::Retryable;
use futures::FutureExt;
use tokio::time::{Duration, Instant};
use tracing::Instrument;

use super::RunState;
use super::config::Config;
use super::confirm::{Confirmable, Confirmations, Positions, Tracked};
use super::notifier::{TerminationBatch, TerminationNotifier};
use super::order;
use super::report::{DeleteError, DeleteOutcome};
use crate::closing::close_all;
use crate::contain::{LetGo, drop_each, drop_each_logged, log_drop_panics};
use crate::events::{DeletionReport, PhaseDurations};
use crate::events::{Event, emit};
use crate::id::{Incarnation, RouterId, SessionKey};
use crate::session::{CloseFrom, CloseReason, Session, Transition};
use crate::slices::{SCAN_SLICE, SLICE, drop_in_slices, due, free_vec, pause, scan_due};
use crate::store::{FenceError, FinishError, SessionStore};

/// Runs the deletion of `router` to its end.
pub(super) async fn delete_router<S, N>(
    store: &S,
    notifier: &N,
    config: &Config,
    router: RouterId,
    state: &RunState,
) -> Result<DeleteOutcome, DeleteError>
where
    S: SessionStore,
    N: TerminationNotifier,
{
    let span = tracing::info_span!(
        "delete_router",
        %router,
        incarnation = tracing::field::Empty
    );
    async move {
        let started = Instant::now();
        let fenced = store
            .fence_incarnation(router, state.target())
            .instrument(tracing::debug_span!("fence"))
            .await;
        let snapshot = match fenced {
            Ok(snapshot) => snapshot,
            Err(FenceError::AlreadyDeleted { incarnation, .. }) => {
                return Ok(DeleteOutcome::AlreadyDeleted {
                    router,
                    incarnation,
                });
            }
            Err(error) => return Err(DeleteError::from_fence(router, error)),
        };
        state.fenced();
        tracing::Span::current()
            .record("incarnation", tracing::field::display(snapshot.incarnation));
        emit(config.events.as_ref(), || Event::RouterFenced {
            router,
            incarnation: snapshot.incarnation,
            sessions: snapshot.sessions.len(),
            resumed: !snapshot.newly_fenced,
        });
        let mut report = DeletionReport {
            router,
            incarnation: snapshot.incarnation,
            resumed: !snapshot.newly_fenced,
            sessions: snapshot.sessions.len(),
            confirmed: 0,
            already_closed: 0,
            closed_otherwise: 0,
            forced: 0,
            rounds: 0,
            notify_attempts: 0,
            notify_failures: 0,
            durations: PhaseDurations::default(),
        };
        report.durations.fence = started.elapsed();
        let run = Run {
            notifier,
            config,
            router,
            incarnation: snapshot.incarnation,
            tracked: Arc::default(),
            first_round: Vec::with_capacity(snapshot.sessions.len()),
            closing: LetGo::new(Vec::new(), "router deletion"),
            rounds: AtomicU32::new(0),
            settled: AtomicBool::new(false),
            attempts: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            notify_nanos: AtomicU64::new(0),
        };
        run.execute(store, snapshot.sessions, report, started).await
    }
    .instrument(span)
    .await
}

struct Run<'a, N, P> {
    notifier: &'a N,
    config: &'a Config,
    router: RouterId,
    incarnation: Incarnation,
    /// Shared only with the batches' [`Confirmations`], which hold it
    /// weakly (a confirmation holds it while it closes sessions).
    tracked: Arc<Tracked<P>>,
    /// Keys of `tracked`, collected while marking, in its order: the first
    /// round sends them without another pass over the sessions' memory.
    first_round: Vec<SessionKey>,
    /// Sessions found closed but with their close still in flight (the
    /// last handle of one removed meanwhile, maybe: let go each with its
    /// payload's `Drop` contained, on an early return too).
    closing: LetGo<Vec<Session<P>>>,
    rounds: AtomicU32,
    /// A round saw every tracked session's close complete: nothing is left
    /// to force or wait for among them.
    settled: AtomicBool,
    attempts: AtomicU32,
    failures: AtomicU32,
    notify_nanos: AtomicU64,
}

/// Not every session confirmed within a round.
#[derive(Debug)]
struct Unconfirmed(usize);

impl<N: TerminationNotifier, P: Send + Sync + 'static> Run<'_, N, P> {
    async fn execute<S: SessionStore<Payload = P>>(
        mut self,
        store: &S,
        sessions: Vec<Session<P>>,
        mut report: DeletionReport,
        started: Instant,
    ) -> Result<DeleteOutcome, DeleteError> {
        tracing::info!(
            sessions = report.sessions,
            resumed = report.resumed,
            "router fenced"
        );
        let phase = Instant::now();
        let (already_closed, strays) = self
            .mark(sessions)
            .instrument(tracing::debug_span!("mark"))
            .await;
        report.already_closed = already_closed;
        report.sessions -= strays;
        report.durations.mark = phase.elapsed();

        let phase = Instant::now();
        let config = self.config;
        let this = &self;
        let _ = (move || this.round())
            .retry(config.backoff)
            // Timers on the runtime that polls the run (see `timer`).
            .sleep(|delay| crate::timer::sleep_until_here(after(delay)))
            .notify(|Unconfirmed(open), delay| {
                tracing::debug!(
                    open,
                    ?delay,
                    "sessions unconfirmed; notifying again after backoff"
                );
            })
            .instrument(tracing::debug_span!("notify_and_wait"))
            .await;
        let notify = Duration::from_nanos(self.notify_nanos.load(Ordering::Relaxed));
        report.durations.notify = notify;
        report.durations.wait = phase.elapsed().saturating_sub(notify);
        report.rounds = self.rounds.load(Ordering::Relaxed);
        report.notify_attempts = self.attempts.load(Ordering::Relaxed);
        report.notify_failures = self.failures.load(Ordering::Relaxed);

        let phase = Instant::now();
        report.forced = self
            .force_close()
            .instrument(tracing::debug_span!("force_close"))
            .await;
        report.durations.force = phase.elapsed();

        let phase = Instant::now();
        self.unlink_closed(store, report.forced).await;
        let finished = store
            .finish(self.router, self.incarnation)
            .instrument(tracing::debug_span!("finish"))
            .await;
        match finished {
            // Sessions the snapshot missed (a store that lists lazily)
            // closed by `finish`, and records it removed unread (another
            // controller's version or payload type), count as forced.
            Ok(finished) => {
                // Saturating: a store's counts are not trusted to be sane.
                let missed = finished.closed.saturating_add(finished.unreadable);
                report.sessions = report.sessions.saturating_add(missed);
                report.forced = report.forced.saturating_add(missed);
            }
            // Another deleter (or the controller) finished this very
            // incarnation first, and the router may since have been
            // registered again or forgotten: this incarnation is deleted.
            Err(
                FinishError::AlreadyDeleted { .. }
                | FinishError::IncarnationMismatch { .. }
                | FinishError::UnknownRouter(_),
            ) => {
                tracing::info!("the incarnation was finished by another caller");
            }
            Err(error) => return Err(DeleteError::from_finish(self.router, error)),
        }
        report.durations.finish = phase.elapsed();
        // The handles go before the clock stops, a slice at a time.
        // A payload's `Drop` that panics is contained (the deletion's work
        // is done): logged, and the report is returned.
        let mut panicked = 0;
        report.confirmed = match Arc::try_unwrap(std::mem::take(&mut self.tracked)) {
            Ok(mut tracked) => {
                let sessions = std::mem::take(&mut tracked.sessions);
                let (confirmed, drops) = count_confirmed_and_drop(sessions).await;
                panicked += drops;
                confirmed
            }
            // A confirmation is closing sessions with the handles (closed
            // already, as every tracked one): count, and leave the last
            // drop to it.
            Err(shared) => count_confirmed(&shared.sessions).await,
        };
        free_vec(std::mem::take(&mut self.first_round));
        panicked += drop_in_slices(std::mem::take(&mut *self.closing).into_iter()).await;
        log_drop_panics(panicked, "router deletion");
        let accounted = report
            .already_closed
            .saturating_add(report.forced)
            .saturating_add(report.confirmed);
        debug_assert!(accounted <= report.sessions);
        report.closed_otherwise = report.sessions.saturating_sub(accounted);
        report.durations.total = started.elapsed();
        tracing::info!(
            confirmed = report.confirmed,
            forced = report.forced,
            already_closed = report.already_closed,
            rounds = report.rounds,
            "router deleted"
        );
        emit(self.config.events.as_ref(), || {
            Event::RouterDeleted(report.clone())
        });
        Ok(DeleteOutcome::Deleted(report))
    }

    /// Marks every open session `Terminating` and tracks it; returns how
    /// many were already closed.
    /// Marks the snapshot's sessions terminating and tracks them; returns
    /// how many were closed already, and how many were strays (of another
    /// router or incarnation: a store that broke its contract listed them)
    /// left alone.
    async fn mark(&mut self, sessions: Vec<Session<P>>) -> (usize, usize) {
        // Every later pass (notify, confirm, force) follows this order.
        let mut sessions = order::by_address(sessions).await;
        // Let go each with its payload's `Drop` contained if the run is
        // dropped at a pause (its runtime gone): a client may have removed
        // a session meanwhile, its last handle here.
        let mut tracked = LetGo::new(Vec::with_capacity(sessions.len()), "router deletion");
        let mut already_closed = 0;
        let mut strays = 0;
        let bus = self.config.events.as_ref();
        let mut rest = LetGo::new(sessions.drain(..), "router deletion");
        for (step, session) in rest.by_ref().enumerate() {
            if due(step) {
                pause().await;
            }
            if session.router() != self.router || session.incarnation() != self.incarnation {
                strays += 1;
                // Its last handle, maybe: the payload's `Drop` is user code.
                drop_each_logged([session], "router deletion");
                continue;
            }
            let marked = session.begin_terminating();
            match marked {
                // `Terminating` already: an earlier run marked it; resume.
                Transition::Won
                | Transition::Lost {
                    current: crate::SessionState::Terminating,
                } => {
                    if marked.won() {
                        tracing::trace!(session = %session.id(), "session terminating");
                        emit(bus, || Event::SessionTerminating {
                            session: session.id(),
                            router: self.router,
                            incarnation: session.incarnation(),
                        });
                    }
                    self.first_round.push(session.key());
                    tracked.push(session);
                }
                Transition::Lost { .. } => {
                    already_closed += 1;
                    // Closed by someone else, who may still be releasing
                    // its resources: the run waits for that too (I1).
                    if session.is_close_complete() {
                        // Removed from the store since the snapshot, maybe:
                        // this is its last handle, and the payload's `Drop`
                        // user code.
                        drop_each_logged([session], "router deletion");
                    } else {
                        self.closing.push(session);
                    }
                }
            }
        }
        drop(rest);
        free_vec(sessions);
        self.tracked = Arc::new(Tracked::new(std::mem::take(&mut *tracked)));
        tracing::debug!(
            tracked = self.tracked.len(),
            already_closed,
            "sessions marked terminating"
        );
        if strays > 0 {
            tracing::warn!(
                strays,
                "the store's fence snapshot listed sessions of another router or incarnation; left alone"
            );
        }
        (already_closed, strays)
    }

    /// Lets the store remove the sessions closed here without leaving it
    /// (confirmed by handle, or forced) in this run's order, memory order,
    /// before `finish` walks its own index. Sessions confirmed through the
    /// store left it already: with none of the others, nothing to do.
    async fn unlink_closed<S: SessionStore<Payload = P>>(&self, store: &S, forced: usize) {
        let by_handle = self.tracked.by_handle.load(Ordering::Relaxed);
        if by_handle == 0 && forced == 0 {
            return;
        }
        let unlinked = store
            .unlink_closed(self.router, self.incarnation, &self.tracked)
            .await;
        // `finish` removes whatever is left, and reports what fails.
        if let Err(error) = unlinked {
            tracing::debug!(%error, "closed sessions left to finish");
        }
    }

    /// One round: notify the sessions still open, then wait for them.
    async fn round(&self) -> Result<(), Unconfirmed> {
        // Rounds run one after another: a plain load, then the increment
        // once this round sends something.
        let round = self.rounds.load(Ordering::Relaxed);
        let later;
        let open = if round == 0 {
            Open::First(&self.first_round)
        } else {
            later = self.still_open().await;
            Open::Later(&later)
        };
        if open.len() == 0 {
            return Ok(());
        }
        self.rounds.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        self.notify(open, round).await;
        let spent = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.notify_nanos.fetch_add(spent, Ordering::Relaxed);
        let deadline = after(self.config.confirm_timeout);
        match self.all_closed_by(deadline).await {
            0 => {
                self.settled.store(true, Ordering::Relaxed);
                Ok(())
            }
            open => Err(Unconfirmed(open)),
        }
    }

    /// Where the tracked sessions still open are in `tracked`.
    async fn still_open(&self) -> Vec<usize> {
        let mut open = Vec::new();
        for (step, slice) in self.tracked.chunks(SLICE).enumerate() {
            if step > 0 {
                pause().await;
            }
            let first = step * SLICE;
            open.extend(
                slice
                    .iter()
                    .enumerate()
                    .filter(|(_, session)| !session.is_closed())
                    .map(|(at, _)| first + at),
            );
        }
        open
    }

    /// Waits until every tracked session's close completed, or `deadline`;
    /// returns how many are still open.
    ///
    /// From the last notified session back: routers confirm mostly in the
    /// order they were told, so once the last one closed the scan finds
    /// the others closed too, and the run is woken about once a round.
    async fn all_closed_by(&self, deadline: Instant) -> usize {
        let all = async {
            for (step, session) in self.tracked.iter().rev().enumerate() {
                if scan_due(step) {
                    pause().await;
                }
                if !session.is_close_complete() {
                    session.closed().await;
                }
            }
        };
        match crate::timer::timeout_at_here(deadline, all).await {
            Ok(()) => 0,
            Err(_elapsed) => self.still_open().await.len(),
        }
    }

    /// Sends `open` in paced batches; each call is bounded and contained.
    async fn notify(&self, open: Open<'_>, round: u32) {
        let start = Instant::now();
        // Budget is waited for up to the round's confirmation deadline.
        let budget_deadline = after(self.config.confirm_timeout);
        let target: std::sync::Weak<dyn Confirmable> = Arc::downgrade(&self.tracked) as _;
        let size = self.config.batch_size;
        let mut sent = 0usize;
        for first in (0..open.len()).step_by(size) {
            let len = size.min(open.len() - first);
            if sent > 0 {
                // Between two batches: the notifier may have confirmed a
                // whole batch inline.
                pause().await;
            }
            if let Some(rate) = self.config.notify_rate {
                let due = Duration::try_from_secs_f64(sent as f64 / f64::from(rate.get()))
                    .unwrap_or(FAR_FUTURE);
                crate::timer::sleep_until_here(
                    start.checked_add(due).unwrap_or_else(|| after(due)),
                )
                .await;
            }
            sent += len;
            bump(&self.attempts);
            if let Some(budget) = &self.config.budget
                && let Err(exhausted) = budget.acquire_by(self.router, len, budget_deadline).await
            {
                bump(&self.failures);
                tracing::warn!(round, sessions = len, %exhausted, "termination notice skipped");
                continue;
            }
            let (sessions, positions) = open.batch(&self.tracked, first, len);
            let batch = TerminationBatch {
                router: self.router,
                incarnation: self.incarnation,
                sessions,
                round,
            };
            let confirm = Confirmations::new(target.clone(), positions);
            // `notify_with` itself, not only its future, may panic: call it
            // inside the guarded future.
            let call = AssertUnwindSafe(async { self.notifier.notify_with(batch, confirm).await })
                .catch_unwind();
            let notify_deadline = after(self.config.notify_timeout);
            let failure = match crate::timer::timeout_at_here(notify_deadline, call).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(error))) => Some(error.to_string()),
                Ok(Err(panic)) => {
                    crate::contain::dispose(panic);
                    Some(String::from("the notifier panicked"))
                }
                Err(_elapsed) => Some(String::from("the notifier timed out")),
            };
            if let Some(failure) = failure {
                bump(&self.failures);
                tracing::warn!(round, sessions = len, %failure, "termination notice failed");
            }
        }
    }

    /// Force-closes what is still open and waits until every tracked close
    /// has completed; returns how many this run forced.
    async fn force_close(&self) -> usize {
        // Every tracked close completed (the last round saw them all):
        // only closes won by other callers before the marking may be left.
        let tracked: &[Session<P>] = if self.settled.load(Ordering::Relaxed) {
            &[]
        } else {
            &self.tracked
        };
        // The closes are won here; with a reclaim queue, resources are
        // released by the queue, by class (critical ones of every session
        // of a slice first: the queue orders what is waiting by priority).
        let mut forced = 0;
        for (step, slice) in tracked.chunks(SLICE).enumerate() {
            if step > 0 {
                pause().await;
            }
            let queue = self.config.reclaim.as_ref();
            forced += close_all(queue, slice, CloseReason::Forced, CloseFrom::Open)
                .await
                .len();
        }
        if forced > 0 {
            tracing::warn!(forced, "force-closed sessions that did not confirm in time");
        }
        // Closes won by other callers, or queued, may still be releasing.
        for (step, session) in tracked.iter().chain(self.closing.iter()).enumerate() {
            if scan_due(step) {
                pause().await;
            }
            if !session.is_close_complete() {
                session.closed().await;
            }
        }
        forced
    }
}

/// The sessions a round notifies.
#[derive(Clone, Copy)]
enum Open<'a> {
    /// The first round: every tracked session, by its key.
    First(&'a [SessionKey]),
    /// A later one: those still open, by their place in `tracked`.
    Later(&'a [usize]),
}

impl Open<'_> {
    fn len(self) -> usize {
        match self {
            Self::First(keys) => keys.len(),
            Self::Later(positions) => positions.len(),
        }
    }

    /// The keys and places of the batch of `len` sessions from `first`.
    fn batch<P>(
        self,
        tracked: &[Session<P>],
        first: usize,
        len: usize,
    ) -> (Vec<SessionKey>, Positions) {
        let end = first.saturating_add(len);
        match self {
            Self::First(keys) => (
                keys.get(first..end).unwrap_or_default().to_vec(),
                Positions::Range { start: first, len },
            ),
            Self::Later(positions) => {
                let chunk = positions.get(first..end).unwrap_or_default();
                let keys = chunk
                    .iter()
                    .filter_map(|&at| tracked.get(at).map(Session::key))
                    .collect();
                (keys, Positions::List(chunk.into()))
            }
        }
    }
}

/// How many of `tracked` were confirmed (closed with `RouterDeleted`),
/// dropping them a slice at a time: dropping the last handle frees the
/// session and runs its payload's `Drop`, part of the deletion's work.
/// Also returns how many of those drops panicked (contained).
async fn count_confirmed_and_drop<P: Send + Sync + 'static>(
    mut tracked: Vec<Session<P>>,
) -> (usize, usize) {
    let (mut confirmed, mut panicked) = (0, 0);
    while !tracked.is_empty() {
        let from = tracked.len().saturating_sub(SLICE);
        let slice = tracked.drain(from..).inspect(|session| {
            confirmed += usize::from(confirmed_by_router(session));
        });
        panicked += drop_each(slice);
        if !tracked.is_empty() {
            pause().await;
        }
    }
    free_vec(tracked);
    (confirmed, panicked)
}

/// How many of `tracked` were confirmed, in read-only slices.
async fn count_confirmed<P>(tracked: &[Session<P>]) -> usize {
    let mut confirmed = 0;
    for (step, slice) in tracked.chunks(SCAN_SLICE).enumerate() {
        if step > 0 {
            pause().await;
        }
        confirmed += slice.iter().filter(|s| confirmed_by_router(s)).count();
    }
    confirmed
}

/// Confirmed means closed as its router confirms: with that reason.
fn confirmed_by_router<P>(session: &Session<P>) -> bool {
    session.close_reason() == Some(CloseReason::RouterDeleted)
}

/// Far enough not to matter (as tokio's own far future): what a deadline
/// past `Instant`'s range means.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// The instant `delay` from now, saturating far in the future.
fn after(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Adds one to a report counter, saturating.
fn bump(counter: &AtomicU32) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
}
