//! The partition guard: when more than a share of the watched routers goes
//! silent together, the monitor suspects its own network, not the routers,
//! and reaps nobody until they are heard again.
//!
//! # Invariants
//!
//! - `Votes::tallies` holds a router while the monitor has a session of it
//!   (watched or suspect); `watched_routers` counts the routers with a
//!   watched session, `silent_routers` those of them that are silent. Both
//!   change only with a tally, under the one lock.
//! - The guard moves between "armed", "holding" and (after a hold that
//!   expired) "disarmed" only in [`Votes::judge`], under the lock: each
//!   trigger and each end happens once, and its event is published by the
//!   caller that made it, after the lock.
//! - A router counts as silent while every session the monitor watches on
//!   it is suspect (`all_since`, kept with the tally), or while its probe
//!   driver finds it quiet (`quiet_since`): no session of it heard for
//!   longer than its fastest suspect's timeout, checked each round, until
//!   a round finds one heard or the driver leaves (no suspect left). The
//!   second sees a router whose slow sessions are not due yet.
//!
//! # Deadlock safety
//!
//! One lock, `Shared::partition`, a leaf: nothing is taken under it, it is
//! never held across an `.await`, and no user code (the prober, the store,
//! an event subscriber) runs under it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;

use tokio::time::{Duration, Instant};

use super::{Prober, Shared, Suspect};
use crate::events::Event;
use crate::id::RouterId;
use crate::store::SessionStore;

/// The guard's validated settings, in the monitor's units (milliseconds).
#[derive(Clone, Debug)]
pub(crate) struct GuardConfig {
    pub(crate) enabled: bool,
    /// Engages when more than this share of the watched routers is silent.
    pub(crate) share: f64,
    /// Only routers that went silent within this long count to engage.
    pub(crate) window: u64,
    /// Below this many watched routers the guard never engages.
    pub(crate) min_routers: usize,
    /// The longest a hold lasts, if bounded.
    pub(crate) max_hold: Option<u64>,
}

/// One router's sessions, as the guard counts them.
#[derive(Debug, Default)]
struct Tally {
    /// Sessions the monitor watches, suspects included.
    watched: usize,
    /// Of them, those suspect now.
    suspects: usize,
    /// Since when every watched session is suspect, while they are.
    all_since: Option<u64>,
    /// Since when its probe driver finds it quiet, while it does.
    quiet_since: Option<u64>,
}

impl Tally {
    fn all_suspect(&self) -> bool {
        self.watched > 0 && self.suspects >= self.watched
    }

    fn is_silent(&self) -> bool {
        self.watched > 0 && (self.all_suspect() || self.quiet_since.is_some())
    }

    /// Since when it is silent, if it is.
    fn silent_since(&self) -> Option<u64> {
        if !self.is_silent() {
            return None;
        }
        match (self.all_since, self.quiet_since) {
            (Some(all), Some(quiet)) => Some(all.min(quiet)),
            (all, quiet) => all.or(quiet),
        }
    }
}

/// The guard's state: every router's tally and whether the guard holds.
#[derive(Debug)]
pub(super) struct Votes {
    tallies: HashMap<RouterId, Tally>,
    /// Routers no longer watched (their sessions closed or were reaped),
    /// with when they left, until the window passes: they still count
    /// among the routers watched within it, so a fleet whose routers die
    /// one after another is not judged by its last few.
    departed: HashMap<RouterId, u64>,
    /// `departed` in the order they left; entries a router overwrote or
    /// withdrew by coming back are skipped.
    departures: VecDeque<(u64, RouterId)>,
    watched_routers: usize,
    silent_routers: usize,
    watched_sessions: usize,
    suspect_sessions: usize,
    /// Since when the guard holds, if it does.
    holding: Option<u64>,
    /// How many times the guard engaged or ended.
    changes: u64,
    /// The last hold ended at its maximum, not with the routers heard.
    expired: bool,
    /// `false` after a hold expired, until the silent share drops back:
    /// a mass death outlasting `max_hold` is reaped, not held again.
    armed: bool,
}

impl Default for Votes {
    fn default() -> Self {
        Self {
            tallies: HashMap::new(),
            departed: HashMap::new(),
            departures: VecDeque::new(),
            watched_routers: 0,
            silent_routers: 0,
            watched_sessions: 0,
            suspect_sessions: 0,
            holding: None,
            changes: 0,
            expired: false,
            armed: true,
        }
    }
}

impl Votes {
    /// A session of `router` is watched.
    pub(super) fn watch(&mut self, router: RouterId, now: u64) {
        self.watched_sessions += 1;
        self.adjust(router, now, |tally| tally.watched += 1);
    }

    /// A session of `router` missed its deadline.
    pub(super) fn suspect(&mut self, router: RouterId, now: u64) {
        self.suspect_sessions += 1;
        self.adjust(router, now, |tally| tally.suspects += 1);
    }

    /// `n` suspects of `router` were heard, or start over after a hold.
    pub(super) fn unsuspect(&mut self, router: RouterId, n: usize, now: u64) {
        self.suspect_sessions = self.suspect_sessions.saturating_sub(n);
        self.adjust(router, now, |tally| {
            tally.suspects = tally.suspects.saturating_sub(n);
        });
    }

    /// `n` sessions of `router` left the monitor (closed, reaped), suspect
    /// ones if `suspects`.
    pub(super) fn leave(&mut self, router: RouterId, n: usize, suspects: bool, now: u64) {
        self.watched_sessions = self.watched_sessions.saturating_sub(n);
        if suspects {
            self.suspect_sessions = self.suspect_sessions.saturating_sub(n);
        }
        self.adjust(router, now, |tally| {
            tally.watched = tally.watched.saturating_sub(n);
            if suspects {
                tally.suspects = tally.suspects.saturating_sub(n);
            }
        });
    }

    /// The router's probe driver found it quiet (no session heard for
    /// longer than its fastest suspect's timeout), or not.
    pub(super) fn mark(&mut self, router: RouterId, quiet: bool, now: u64) {
        if !self.tallies.contains_key(&router) {
            return; // nothing of it is watched: no vote
        }
        self.adjust(router, now, |tally| {
            if !quiet {
                tally.quiet_since = None;
            } else if tally.quiet_since.is_none() {
                tally.quiet_since = Some(now);
            }
        });
    }

    fn adjust(&mut self, router: RouterId, now: u64, change: impl FnOnce(&mut Tally)) {
        let tally = self.tallies.entry(router).or_default();
        let (was_watched, was_silent) = (tally.watched > 0, tally.is_silent());
        change(tally);
        if !tally.all_suspect() {
            tally.all_since = None;
        } else if tally.all_since.is_none() {
            tally.all_since = Some(now);
        }
        let (watched, silent) = (tally.watched > 0, tally.is_silent());
        if tally.watched == 0 && tally.suspects == 0 {
            self.tallies.remove(&router);
        }
        let step = |count: &mut usize, before: bool, after: bool| match (before, after) {
            (false, true) => *count += 1,
            (true, false) => *count = count.saturating_sub(1),
            _ => {}
        };
        step(&mut self.watched_routers, was_watched, watched);
        step(&mut self.silent_routers, was_silent, silent);
        if was_watched && !watched {
            self.departed.insert(router, now);
            self.departures.push_back((now, router));
        } else if watched && !was_watched {
            self.departed.remove(&router);
        }
    }

    /// Forgets the routers that left longer than `window` ago.
    fn forget_departed(&mut self, now: u64, window: u64) {
        while let Some(&(left, router)) = self.departures.front() {
            if now.saturating_sub(left) <= window {
                break;
            }
            self.departures.pop_front();
            if self.departed.get(&router) == Some(&left) {
                self.departed.remove(&router);
            }
        }
    }

    /// Whether the guard holds now.
    pub(super) fn holds(&self) -> bool {
        self.holding.is_some()
    }

    /// How many times the guard changed, and whether suspects start over
    /// now: `None` while it holds, `Some(true)` after a lift, `Some(false)`
    /// after a hold that expired (convictions resume where they were).
    pub(super) fn state(&self) -> (u64, Option<bool>) {
        (self.changes, (!self.holds()).then_some(!self.expired))
    }

    /// Engages or lifts the guard as the tallies say at `now`; returns the
    /// event of the change, if there was one. Cheap unless more than the
    /// share is silent (then it looks at every silent router once).
    pub(super) fn judge(&mut self, now: u64, config: &GuardConfig) -> Option<Event> {
        self.forget_departed(now, config.window);
        // The routers watched within the window: now, or until they left.
        let voters = self.watched_routers + self.departed.len();
        let over = |silent: usize| silent as f64 > config.share * voters as f64;
        let watched = self.watched_routers;
        if let Some(since) = self.holding {
            let lasted = now.saturating_sub(since);
            let expired = config.max_hold.is_some_and(|max| lasted >= max);
            if over(self.silent_routers) && watched >= config.min_routers && !expired {
                return None;
            }
            self.holding = None;
            self.changes += 1;
            self.expired = expired;
            self.armed = !expired;
            return Some(Event::PartitionEnded {
                silent_routers: self.silent_routers,
                watched_routers: watched,
                suspect_sessions: self.suspect_sessions,
                watched_sessions: self.watched_sessions,
                lasted: Duration::from_millis(lasted),
                expired,
            });
        }
        if !over(self.silent_routers) {
            self.armed = true;
            return None;
        }
        if !config.enabled || !self.armed || watched < config.min_routers.max(1) {
            return None;
        }
        let recent = self
            .tallies
            .values()
            .filter_map(Tally::silent_since)
            .filter(|since| now.saturating_sub(*since) <= config.window)
            .count();
        if !over(recent) {
            return None;
        }
        self.holding = Some(now);
        self.changes += 1;
        Some(Event::PartitionSuspected {
            silent_routers: recent,
            watched_routers: watched,
            suspect_sessions: self.suspect_sessions,
            watched_sessions: self.watched_sessions,
        })
    }
}

impl<S: SessionStore, Pr: Prober> Shared<S, Pr> {
    /// Changes the guard's tallies.
    pub(super) fn tally(&self, change: impl FnOnce(&mut Votes, u64)) {
        let now = self.now();
        change(&mut self.partition.lock(), now);
    }

    /// How many times the guard changed, and whether suspects start over
    /// (see `Votes::state`). Read under the lock: a driver that sees a lift
    /// sees its amnesty too.
    pub(super) fn partition_state(&self) -> (u64, Option<bool>) {
        self.partition.lock().state()
    }

    /// Engages or lifts the guard as the tallies say now, and publishes the
    /// change; `true` if it holds. Asked each tick, and before each reap.
    pub(super) fn judge_partition(&self, now: u64) -> bool {
        let (change, holds) = {
            let mut votes = self.partition.lock();
            let change = votes.judge(now, &self.config.guard);
            // Relaxed: statistics; drivers read the state under the lock.
            match &change {
                Some(Event::PartitionSuspected { .. }) => {
                    self.counters.partitions.fetch_add(1, Ordering::Relaxed);
                }
                Some(Event::PartitionEnded { expired, .. }) => {
                    if !expired {
                        // Everyone counts as heard at the lift, before a
                        // driver can see it and hand its suspects back.
                        self.amnesty.fetch_max(now, Ordering::Relaxed);
                    }
                    self.counters
                        .partitions_ended
                        .fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            (change, votes.holds())
        };
        if let Some(event) = change {
            self.partition_changed(event);
        }
        holds
    }

    #[cold]
    fn partition_changed(&self, event: Event) {
        if let Event::PartitionSuspected {
            silent_routers,
            watched_routers,
            ..
        } = &event
        {
            tracing::warn!(
                silent_routers,
                watched_routers,
                "routers went silent together; partition suspected, reaping nobody"
            );
        } else if let Event::PartitionEnded {
            silent_routers,
            lasted,
            expired,
            ..
        } = &event
        {
            tracing::warn!(silent_routers, ?lasted, expired, "partition guard lifted");
        }
        // Wakes drivers pacing their rounds through the hold.
        self.partition_change.notify_waiters();
        crate::events::emit(self.config.bus.as_ref(), || event);
    }

    /// Marks `router` quiet for the guard if none of its sessions was heard
    /// (its `latest`, from the store) for longer than the shortest timeout
    /// of its suspects in `round`: had that session been the fast one, it
    /// would be suspect too.
    pub(super) fn mark_quiet(&self, router: RouterId, round: &[Suspect<S::Payload>], latest: u64) {
        let rule = &self.config.rule;
        let shortest = round
            .iter()
            .map(|suspect| suspect.session.beat().estimate().timeout(rule))
            .min();
        // Relaxed: see `stalled`; after a stall everyone counts as heard.
        let latest = latest.max(self.amnesty.load(Ordering::Relaxed));
        let quiet = shortest.is_some_and(|timeout| self.now().saturating_sub(latest) > timeout);
        self.tally(|votes, now| votes.mark(router, quiet, now));
    }

    /// While the guard holds, a driver waits a probe timeout between
    /// rounds, or until the guard changes; `false` if the monitor stopped.
    pub(super) async fn pace_hold(&self) -> bool {
        // Registered before the look: a lift after it wakes the wait.
        let changed = self.partition_change.notified();
        if self.partition_state().1.is_some() {
            return true;
        }
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = changed => true,
            () = tokio::time::sleep_until(Instant::now() + self.config.probe_timeout) => true,
        }
    }

    /// After the guard lifted, a driver hands its suspects back to the
    /// wheel: each starts over, heard at the lift at the latest.
    pub(super) fn start_over(&self, router: RouterId, suspects: Vec<Suspect<S::Payload>>) {
        let mut back = Vec::new();
        let mut left = Vec::new();
        for suspect in suspects {
            if self.keep(&suspect) {
                self.counters.unsuspect();
                back.push(suspect.session);
            } else {
                left.push(suspect);
            }
        }
        crate::contain::drop_each_logged(left, "liveness monitor");
        if back.is_empty() {
            return;
        }
        self.tally(|votes, now| votes.unsuspect(router, back.len(), now));
        self.incoming.lock().extend(back);
    }
}

#[cfg(all(test, not(session_lifecycle_loom)))]
mod tests {
    use super::*;

    fn config() -> GuardConfig {
        GuardConfig {
            enabled: true,
            share: 0.5,
            window: 1_000,
            min_routers: 4,
            max_hold: Some(10_000),
        }
    }

    /// `routers` routers of one watched session each.
    fn votes(routers: u64) -> Votes {
        let mut votes = Votes::default();
        for r in 0..routers {
            votes.watch(RouterId::new(r), 0);
        }
        votes
    }

    #[test]
    fn more_than_the_share_silent_within_the_window_engages_then_lifts() {
        let (config, mut votes) = (config(), votes(10));
        for r in 0..5 {
            votes.mark(RouterId::new(r), true, 100);
        }
        assert!(
            votes.judge(100, &config).is_none(),
            "half is not more than half"
        );
        votes.mark(RouterId::new(5), true, 200);
        let engaged = votes.judge(200, &config);
        assert!(matches!(
            engaged,
            Some(Event::PartitionSuspected {
                silent_routers: 6,
                watched_routers: 10,
                ..
            })
        ));
        assert!(votes.holds());
        votes.mark(RouterId::new(0), false, 300);
        let ended = votes.judge(300, &config);
        assert!(matches!(
            ended,
            Some(Event::PartitionEnded {
                silent_routers: 5,
                expired: false,
                ..
            })
        ));
        assert!(!votes.holds());
    }

    #[test]
    fn silences_older_than_the_window_do_not_engage_it() {
        let (config, mut votes) = (config(), votes(10));
        for r in 0..3 {
            votes.mark(RouterId::new(r), true, 0);
        }
        for r in 3..6 {
            votes.mark(RouterId::new(r), true, 5_000);
        }
        assert!(votes.judge(5_000, &config).is_none());
    }

    #[test]
    fn routers_that_left_within_the_window_still_count_among_the_watched() {
        let (config, mut votes) = (config(), votes(8));
        // Four died one after another and were reaped.
        for r in 0..4 {
            votes.leave(RouterId::new(r), 1, false, 100 * r);
        }
        // Three of the last four go silent: three of eight, not of four.
        for r in 4..7 {
            votes.mark(RouterId::new(r), true, 400);
        }
        assert!(votes.judge(500, &config).is_none());
        // Once the window passed since they left, they no longer count:
        // three of four.
        assert!(votes.judge(1_301, &config).is_some());
    }

    #[test]
    fn few_routers_never_engage_it() {
        let (config, mut votes) = (config(), votes(3));
        for r in 0..3 {
            votes.mark(RouterId::new(r), true, 0);
        }
        assert!(votes.judge(0, &config).is_none());
    }

    #[test]
    fn an_expired_hold_stays_off_until_the_share_drops() {
        let (config, mut votes) = (config(), votes(4));
        for r in 0..4 {
            votes.mark(RouterId::new(r), true, 0);
        }
        assert!(votes.judge(0, &config).is_some());
        assert!(votes.judge(9_999, &config).is_none());
        let expired = votes.judge(10_000, &config);
        assert!(matches!(
            expired,
            Some(Event::PartitionEnded { expired: true, .. })
        ));
        // One is heard and falls silent again at once: not held again.
        votes.mark(RouterId::new(0), false, 10_000);
        votes.mark(RouterId::new(0), true, 10_001);
        assert!(votes.judge(10_001, &config).is_none());
        // The fleet recovers, then goes silent together: held again.
        for r in 0..4 {
            votes.mark(RouterId::new(r), false, 20_000);
        }
        assert!(votes.judge(20_000, &config).is_none());
        for r in 0..4 {
            votes.mark(RouterId::new(r), true, 20_001);
        }
        assert!(votes.judge(20_001, &config).is_some());
    }

    #[test]
    fn routers_leaving_are_forgotten_and_unwatched_ones_never_vote() {
        let mut votes = Votes::default();
        let router = RouterId::new(1);
        votes.watch(router, 0);
        votes.watch(router, 0);
        votes.suspect(router, 0);
        assert_eq!((votes.watched_routers, votes.silent_routers), (1, 0));
        votes.mark(router, true, 0);
        assert_eq!((votes.watched_routers, votes.silent_routers), (1, 1));
        votes.mark(router, false, 0);
        votes.suspect(router, 0);
        assert_eq!(votes.silent_routers, 1, "every session suspect");
        assert_eq!((votes.watched_sessions, votes.suspect_sessions), (2, 2));
        votes.leave(router, 2, true, 0);
        assert_eq!((votes.watched_routers, votes.silent_routers), (0, 0));
        assert_eq!((votes.watched_sessions, votes.suspect_sessions), (0, 0));
        assert!(votes.tallies.is_empty());
        // A mark for a router nobody watches changes nothing.
        votes.mark(RouterId::new(2), true, 0);
        assert_eq!((votes.watched_routers, votes.silent_routers), (0, 0));
        assert!(votes.tallies.is_empty());
    }
}
