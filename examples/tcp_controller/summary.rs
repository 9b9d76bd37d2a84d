//! What the scenario counted, and what it should have.

use std::fmt;

use session_lifecycle::CloseReason;
use tokio::time::Duration;

use super::Config;

/// Sessions closed, by reason, as counted by a resource attached to each
/// session when it opens (released exactly once, whatever closes it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closes {
    /// Confirmed by their router during its deletion.
    pub router_deleted: usize,
    /// Forced at the end of a deletion.
    pub forced: usize,
    /// Closed by a reconciliation.
    pub reclaimed: usize,
    /// Reaped by the liveness monitor.
    pub liveness_timeout: usize,
    /// Closed at the end of a grace period.
    pub router_lost: usize,
    /// Any other reason.
    pub other: usize,
}

impl Closes {
    /// The counts of both.
    pub(crate) fn plus(self, other: Self) -> Self {
        Self {
            router_deleted: self.router_deleted + other.router_deleted,
            forced: self.forced + other.forced,
            reclaimed: self.reclaimed + other.reclaimed,
            liveness_timeout: self.liveness_timeout + other.liveness_timeout,
            router_lost: self.router_lost + other.router_lost,
            other: self.other + other.other,
        }
    }

    /// Counts one close.
    pub(crate) fn record(&mut self, reason: CloseReason) {
        *match reason {
            CloseReason::RouterDeleted => &mut self.router_deleted,
            CloseReason::Forced => &mut self.forced,
            CloseReason::Reclaimed => &mut self.reclaimed,
            CloseReason::LivenessTimeout => &mut self.liveness_timeout,
            CloseReason::RouterLost => &mut self.router_lost,
            _ => &mut self.other,
        } += 1;
    }
}

/// The counts a run must hit exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Routers that took part.
    pub routers: usize,
    /// Sessions opened over the wire.
    pub opened: usize,
    /// Sessions refused over the wire (opened on a deleted router).
    pub refused: usize,
    /// The steady router's sessions confirmed in its deletion.
    pub confirmed: usize,
    /// Sessions closed by a `Closed` frame.
    pub confirmations: usize,
    /// The mute router's sessions forced in its deletion.
    pub forced: usize,
    /// Sessions the reconciliation closed (the flaky router lost them).
    pub reconciled_closed: usize,
    /// Sessions the flaky router was told to drop.
    pub reconciled_dropped: usize,
    /// Grace periods a reconciliation cancelled.
    pub grace_cancelled: usize,
    /// Grace periods that ran out.
    pub grace_expired: usize,
    /// Sessions reaped by the liveness monitor.
    pub reaped: usize,
    /// Sessions the restarted controller adopted.
    pub adopted: usize,
    /// Sessions the restarted controller refused to adopt (made up).
    pub adoption_rejected: usize,
    /// Client sessions the restart lost: held before it, not after.
    pub lost: usize,
    /// Sessions closed, by reason.
    pub closes: Closes,
    /// Sessions left in the (restarted controller's) store.
    pub remaining: usize,
    /// Zombies the audits found (the old store's at the restart, the new
    /// one's at the end).
    pub zombies: usize,
    /// Whether both audits are clean.
    pub audit_clean: bool,
    /// Events the scenario's subscription missed.
    pub events_lagged: u64,
}

impl Counts {
    /// What a run with `config` must count.
    pub fn expected(config: &Config) -> Self {
        let sessions = config.sessions_per_router;
        Self {
            routers: config.routers,
            opened: config.routers * sessions,
            refused: 1,
            confirmed: sessions,
            confirmations: sessions,
            forced: sessions,
            reconciled_closed: config.forgotten,
            reconciled_dropped: 1,
            grace_cancelled: 1,
            grace_expired: 0,
            reaped: config.dead,
            // Every session of the routers still there, the flaky router's
            // made-up one refused.
            adopted: remaining(config),
            adoption_rejected: 1,
            lost: 0,
            closes: Closes {
                router_deleted: sessions,
                forced: sessions,
                reclaimed: config.forgotten,
                liveness_timeout: config.dead,
                router_lost: 0,
                other: 0,
            },
            remaining: remaining(config),
            zombies: 0,
            audit_clean: true,
            events_lagged: 0,
        }
    }
}

/// The sessions left once the steady and mute routers are gone, and the
/// flaky and quiet routers' lost and dead sessions closed.
fn remaining(config: &Config) -> usize {
    (config.routers - 2) * config.sessions_per_router - config.forgotten - config.dead
}

/// What the scenario counted: the exact counts, and a few that depend on
/// timing.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The counts a run must hit exactly.
    pub counts: Counts,
    /// Probe calls the monitor made.
    pub probes: u64,
    /// Session ids that answered a probe.
    pub probe_answers: usize,
    /// How long the scenario took.
    pub elapsed: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        let closes = &c.closes;
        let audit = if c.audit_clean { "clean" } else { "NOT CLEAN" };
        writeln!(f, "routers:                 {}", c.routers)?;
        writeln!(
            f,
            "sessions opened:         {} ({} refused)",
            c.opened, c.refused
        )?;
        writeln!(
            f,
            "steady router deleted:   {} confirmed ({} Closed ids over the wire)",
            c.confirmed, c.confirmations
        )?;
        writeln!(f, "mute router deleted:     {} forced", c.forced)?;
        writeln!(
            f,
            "flaky router reconciled: {} closed, {} dropped; grace cancelled {}, expired {}",
            c.reconciled_closed, c.reconciled_dropped, c.grace_cancelled, c.grace_expired
        )?;
        writeln!(
            f,
            "quiet router:            {} reaped ({} probes, {} probe answers)",
            c.reaped, self.probes, self.probe_answers
        )?;
        writeln!(
            f,
            "controller restarted:    {} sessions adopted, {} rejected, {} client sessions lost",
            c.adopted, c.adoption_rejected, c.lost
        )?;
        writeln!(
            f,
            "closed by reason:        router deleted {}, forced {}, reclaimed {}, \
             liveness timeout {}, router lost {}, other {}",
            closes.router_deleted,
            closes.forced,
            closes.reclaimed,
            closes.liveness_timeout,
            closes.router_lost,
            closes.other
        )?;
        writeln!(f, "sessions in the store:   {}", c.remaining)?;
        writeln!(f, "events lagged:           {}", c.events_lagged)?;
        writeln!(
            f,
            "audit:                   {audit}, zombies = {}",
            c.zombies
        )?;
        write!(f, "elapsed:                 {:?}", self.elapsed)
    }
}
