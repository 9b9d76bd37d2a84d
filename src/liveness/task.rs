//! The monitor's task ([`run`]) and the work it shares with the probe
//! drivers and the monitor's handle: the clock, filing sessions in the
//! wheel, handing suspects over, resting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::{Duration, Instant};

use super::config::millis;
use super::probe::{self, Suspect};
use super::{HeartbeatError, LivenessEvent, LivenessStats, Prober, STOPPED, Shared, tag};
use crate::contain::LetGo;
use crate::events::Event;
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{Session, SessionState};
use crate::store::SessionStore;
use crate::wheel::Wheel;

/// The monitor task: each tick, raise the clock, check its own health,
/// file incoming sessions, and look at the entries that came up.
///
/// It holds the monitor's tag lease in `stopping` (as each probe driver
/// holds it): once they are all gone, other monitors may watch this one's
/// sessions.
pub(super) async fn run<S: SessionStore, Pr: Prober>(
    shared: Arc<Shared<S, Pr>>,
    stopping: Stopping<S, Pr>,
) {
    let lease = &stopping.1;
    let granularity = shared.config.rule.granularity;
    // The handles in the task's hands, let go each with its payload's
    // `Drop` contained however the task ends (a shutdown, its runtime
    // gone): a client may have closed and removed a session, its last
    // handle here.
    let mut wheel = LetGo::new(Wheel::new(shared.config.wheel_slots()), "liveness monitor");
    let mut convicted: LetGo<HashMap<RouterId, Vec<Suspect<S::Payload>>>> =
        LetGo::new(HashMap::new(), "liveness monitor");
    let mut next = shared.epoch + shared.config.tick();
    while shared.sleep(next).await {
        let now = Instant::now();
        let now_ms = shared.raise_clock(now);
        let late = now.saturating_duration_since(next);
        if millis(late) > shared.config.rule.pause_allowance {
            shared.stalled(now_ms, late);
        }
        let incoming = std::mem::take(&mut *shared.incoming.lock());
        // Handles of sessions no longer active, let go at the end of the
        // tick (a payload's `Drop` that panics must not end the task).
        let mut left = Vec::new();
        for session in incoming {
            shared.file(&mut wheel, session, now_ms, &mut convicted, &mut left);
        }
        let mut fires = 0u64;
        for tick in wheel.advance(now_ms / granularity) {
            let due = wheel.take(tick);
            fires += due.len() as u64;
            for session in due {
                shared.file(&mut wheel, session, now_ms, &mut convicted, &mut left);
            }
        }
        crate::contain::drop_each_logged(left, "liveness monitor");
        shared
            .counters
            .timer_fires
            .fetch_add(fires, Ordering::Relaxed);
        for (router, suspects) in convicted.drain() {
            shared.hand_over(router, suspects, lease);
        }
        if !shared.judge_partition(now_ms) && shared.rests() {
            if !shared.rest().await {
                break;
            }
            // Woken by a watch: tick at once, late by as long as the task
            // took to run since the watch raised the clock (a stall there
            // is one like any other).
            next = shared.epoch + Duration::from_millis(shared.now());
            continue;
        }
        let next_tick = (now_ms / granularity).saturating_add(1);
        next = shared.epoch + Duration::from_millis(next_tick.saturating_mul(granularity));
    }
}

/// Sets `STOPPED` in the clock when dropped.
/// The monitor task's hold on its tag: however the task ends (its runtime
/// may drop it, even before its first poll), the monitor says it stopped
/// before its lease goes, so heartbeats and watches through its handles are
/// refused from then on.
pub(super) struct Stopping<S: SessionStore, Pr>(
    pub(super) Arc<Shared<S, Pr>>,
    pub(super) Arc<tag::Lease>,
);

impl<S: SessionStore, Pr> Drop for Stopping<S, Pr> {
    fn drop(&mut self) {
        // The fields (the lease among them) drop after this.
        self.0.clock.fetch_or(STOPPED, Ordering::Relaxed);
    }
}

impl<S: SessionStore, Pr> Shared<S, Pr> {
    /// The counters; once stopping, nothing is watched, probed or held
    /// back by the partition guard any more.
    pub(super) fn stats(&self) -> LivenessStats {
        let mut stats = self.counters.snapshot();
        // Relaxed: as in `heartbeat`.
        if self.clock.load(Ordering::Relaxed) & STOPPED != 0 {
            stats.watched = 0;
            stats.suspects = 0;
            stats.partition_suspected = false;
        }
        stats
    }
}

impl<S: SessionStore, Pr: Prober> Shared<S, Pr> {
    pub(super) fn stopped(&self) -> bool {
        // Relaxed: as in `heartbeat`.
        self.clock.load(Ordering::Relaxed) & STOPPED != 0
    }

    /// The clock, in milliseconds since the epoch.
    pub(super) fn now(&self) -> u64 {
        // Relaxed: as in `heartbeat`.
        self.clock.load(Ordering::Relaxed) & !STOPPED
    }

    pub(super) fn raise_clock(&self, now: Instant) -> u64 {
        let ms = millis(now.saturating_duration_since(self.epoch)).min(STOPPED - 1);
        // Relaxed: as in `heartbeat`. `fetch_max` keeps `STOPPED`.
        self.clock.fetch_max(ms, Ordering::Relaxed);
        ms
    }

    /// Raises the clock to the time on the monitor's runtime's clock, from
    /// any thread.
    pub(super) fn raise_clock_now(&self) {
        let _runtime = self.runtime.enter();
        self.raise_clock(Instant::now());
    }

    /// The local-health guard: the tick ran `late`; everyone counts as
    /// heard now.
    #[cold]
    pub(super) fn stalled(&self, now: u64, late: Duration) {
        // Relaxed: read by the monitor task and the drivers, which only
        // need it eventually; the stall counter tells drivers a round was
        // disturbed.
        self.amnesty.fetch_max(now, Ordering::Relaxed);
        self.counters.stalls.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(?late, "liveness monitor stalled; extending every deadline");
        self.emit(LivenessEvent::MonitorStalled { late_by: late });
    }

    pub(super) fn stall_count(&self) -> u64 {
        self.counters.stalls.load(Ordering::Relaxed)
    }

    /// Files a session in the wheel at its deadline, convicts it if the
    /// deadline has passed, or lets it leave (into `left`, for the caller
    /// to drop) if it is no longer active.
    pub(super) fn file(
        &self,
        wheel: &mut Wheel<Session<S::Payload>>,
        session: Session<S::Payload>,
        now: u64,
        convicted: &mut HashMap<RouterId, Vec<Suspect<S::Payload>>>,
        left: &mut Vec<Session<S::Payload>>,
    ) {
        if session.watcher().1 != SessionState::Active {
            self.counters.leave();
            self.tally(|votes, now| votes.leave(session.router(), 1, false, now));
            left.push(session);
            return;
        }
        let beat = session.beat();
        // At most now: a heartbeat recorded through a monitor this one took
        // the session over from, racing the takeover, wrote that monitor's
        // clock, which may run ahead of this one's.
        let heard = beat.heard_by(now);
        // Relaxed: see `stalled`.
        let from = heard.max(self.amnesty.load(Ordering::Relaxed));
        let deadline = from.saturating_add(beat.estimate().timeout(&self.config.rule));
        if deadline >= now {
            wheel.insert(session, deadline.div_ceil(self.config.rule.granularity));
            return;
        }
        if self.is_held(session.router(), session.incarnation()) {
            // Counts as heard now: a held router's sessions wait out the
            // hold, then get a whole timeout.
            beat.refresh(now);
            let deadline = now.saturating_add(beat.estimate().timeout(&self.config.rule));
            wheel.insert(session, deadline.div_ceil(self.config.rule.granularity));
            return;
        }
        self.counters.suspect();
        self.tally(|votes, now| votes.suspect(session.router(), now));
        convicted
            .entry(session.router())
            .or_default()
            .push(Suspect {
                session,
                heard,
                failed: 0,
            });
    }

    /// Whether the sessions of `router` in `incarnation` are held; only
    /// asked on the way to a conviction.
    pub(super) fn is_held(&self, router: RouterId, incarnation: Incarnation) -> bool {
        self.held
            .lock()
            .get(&router)
            .is_some_and(|holds| holds.covers(incarnation))
    }

    /// Gives a router's new suspects to its probe driver, starting one if
    /// none runs.
    pub(super) fn hand_over(
        self: &Arc<Self>,
        router: RouterId,
        suspects: Vec<Suspect<S::Payload>>,
        lease: &Arc<tag::Lease>,
    ) {
        let (start, arrival) = {
            let mut groups = self.suspects.lock();
            let group = groups.entry(router).or_default();
            group.pending.extend(suspects);
            let start = !std::mem::replace(&mut group.driving, true);
            (start, Arc::clone(&group.arrival))
        };
        if start {
            self.tracker.spawn(probe::drive(
                Arc::clone(self),
                router,
                arrival,
                Arc::clone(lease),
            ));
        } else {
            // Outside the lock: it wakes the driver's task. Cuts its backoff
            // short, if it is in one.
            arrival.notify_waiters();
        }
    }

    /// Says the task rests if no session is watched; `false` (and it
    /// does not rest) if one is.
    pub(super) fn rests(&self) -> bool {
        // SeqCst: see the module's invariants.
        self.idle.store(true, Ordering::SeqCst);
        if self.counters.watched.load(Ordering::SeqCst) == 0 {
            return true;
        }
        self.idle.store(false, Ordering::SeqCst);
        false
    }

    /// Rests until a session is watched; `false` if the monitor stopped
    /// first.
    pub(super) async fn rest(&self) -> bool {
        let woken = tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = self.wake.notified() => true,
        };
        self.idle.store(false, Ordering::SeqCst);
        woken
    }

    /// Sleeps until `until`; `false` if the monitor stopped first.
    pub(super) async fn sleep(&self, until: Instant) -> bool {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep_until(until) => true,
        }
    }

    pub(super) fn emit(&self, event: LivenessEvent) {
        crate::events::emit(self.config.bus.as_ref(), || Event::Liveness(event));
    }

    #[cold]
    pub(super) fn ignore(&self, id: SessionId, tag: u64, state: SessionState) -> HeartbeatError {
        self.ignored(if self.stopped() {
            HeartbeatError::ShutDown
        } else if state.is_closed() {
            HeartbeatError::Closed(id)
        } else {
            debug_assert_ne!(tag, self.tag);
            HeartbeatError::NotWatched(id)
        })
    }

    #[cold]
    pub(super) fn ignored(&self, error: HeartbeatError) -> HeartbeatError {
        self.counters.ignored.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(%error, "heartbeat ignored");
        error
    }
}
