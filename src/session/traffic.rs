//! Per-session traffic counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a session's traffic counters.
///
/// # Example
///
/// ```
/// use session_lifecycle::{Incarnation, NewSession, RouterId, SessionId, session::Traffic};
///
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// session.record_in(1_200);
/// session.record_out(300);
/// let traffic: Traffic = session.traffic();
/// assert_eq!((traffic.bytes_in, traffic.packets_in), (1_200, 1));
/// assert_eq!((traffic.bytes_out, traffic.packets_out), (300, 1));
/// assert_eq!(traffic.total_bytes(), 1_500);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes received from the session's client.
    pub bytes_in: u64,
    /// Bytes sent to the session's client.
    pub bytes_out: u64,
    /// Packets received from the session's client.
    pub packets_in: u64,
    /// Packets sent to the session's client.
    pub packets_out: u64,
}

impl Traffic {
    /// Bytes in both directions, saturating at `u64::MAX`.
    #[must_use]
    pub const fn total_bytes(&self) -> u64 {
        self.bytes_in.saturating_add(self.bytes_out)
    }
}

/// The live counters: relaxed atomics, bumped without a lock (bytes with
/// one `fetch_add` far from `u64::MAX` and a saturating compare-exchange
/// near it; packets with one `fetch_add`). They order nothing else and need
/// no more.
#[derive(Debug, Default)]
pub(crate) struct TrafficCounters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    packets_in: AtomicU64,
    packets_out: AtomicU64,
}

impl TrafficCounters {
    pub(crate) fn record_in(&self, bytes: u64) {
        add_saturating(&self.bytes_in, bytes);
        // Relaxed: statistics only. (2^64 packets are not sent.)
        self.packets_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_out(&self, bytes: u64) {
        add_saturating(&self.bytes_out, bytes);
        // Relaxed: statistics only. (2^64 packets are not sent.)
        self.packets_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Traffic {
        // Relaxed: a snapshot is not a consistent cut across the counters.
        Traffic {
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            packets_in: self.packets_in.load(Ordering::Relaxed),
            packets_out: self.packets_out.load(Ordering::Relaxed),
        }
    }
}

/// Adds `bytes` to `counter`, saturating at `u64::MAX`: a counter never goes
/// down, whatever a caller records.
fn add_saturating(counter: &AtomicU64, bytes: u64) {
    // Relaxed: statistics only. Far from the top, one `fetch_add`: below
    // 2^63, adds of under 2^32 each cannot wrap unless 2^31 of them race.
    if bytes <= FAST_ADD_MAX && counter.load(Ordering::Relaxed) < FAST_BELOW {
        counter.fetch_add(bytes, Ordering::Relaxed);
        return;
    }
    // Near the top (or a huge add): compare-exchange. The closure always
    // answers, so the update cannot fail.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        Some(now.saturating_add(bytes))
    });
}

/// The largest add [`add_saturating`] makes with a plain `fetch_add`.
const FAST_ADD_MAX: u64 = u32::MAX as u64;
/// Below this count, [`add_saturating`] may use a plain `fetch_add`.
const FAST_BELOW: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_saturate_across_the_fast_path_boundaries() {
        let counter = AtomicU64::new(FAST_BELOW - 1);
        add_saturating(&counter, FAST_ADD_MAX); // fast: lands past 2^63
        assert_eq!(
            counter.load(Ordering::Relaxed),
            FAST_BELOW - 1 + FAST_ADD_MAX
        );
        add_saturating(&counter, FAST_ADD_MAX + 1); // a huge add: compare-exchange
        assert_eq!(
            counter.load(Ordering::Relaxed),
            FAST_BELOW + 2 * FAST_ADD_MAX
        );
        counter.store(u64::MAX - 3, Ordering::Relaxed);
        add_saturating(&counter, 2);
        assert_eq!(counter.load(Ordering::Relaxed), u64::MAX - 1);
        add_saturating(&counter, 2);
        assert_eq!(counter.load(Ordering::Relaxed), u64::MAX);
        add_saturating(&counter, 0);
        add_saturating(&counter, u64::MAX);
        assert_eq!(counter.load(Ordering::Relaxed), u64::MAX);
    }

    #[test]
    fn racing_adds_near_the_top_saturate_and_never_go_down() {
        let counter = std::sync::Arc::new(AtomicU64::new(u64::MAX - (1 << 40)));
        let adders: Vec<_> = (0..4)
            .map(|_| {
                let counter = std::sync::Arc::clone(&counter);
                std::thread::spawn(move || {
                    let mut last = 0;
                    for _ in 0..2_000 {
                        add_saturating(&counter, FAST_ADD_MAX);
                        let now = counter.load(Ordering::Relaxed);
                        assert!(now >= last, "went down from {last} to {now}");
                        last = now;
                    }
                })
            })
            .collect();
        for adder in adders {
            adder.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), u64::MAX);
    }
}
