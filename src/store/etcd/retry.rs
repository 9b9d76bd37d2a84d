//! [`Retry`]: the one retry schedule of the store. Every etcd request that
//! is safe to repeat, the writer's writes and the watch's reconnects back
//! off on it: the crate's [`Backoff`], exponential with jitter.
//!
//! # Invariants
//!
//! - A request is repeated only while it failed transiently (etcd
//!   unreachable, no leader, timed out), never when etcd refused it as such
//!   (too large, too many operations): sending that again cannot succeed.
//! - [`Retry::run`] stops retrying once the deadline passed since its first
//!   attempt: a call takes at most about the deadline plus one request
//!   timeout plus one delay. The writer and the watch use [`Retry::delays`],
//!   which never ends: their work is not dropped.
//! - Every request is bounded by the client's request timeout, so a hung
//!   etcd member costs one timeout, then the balancer's next member.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use backon::{ExponentialBackoff, Retryable};
use tokio::time::{Duration, Instant};

use super::EtcdError;
use super::error::refusal;
use crate::backoff::Backoff;

/// The first delay after a failure.
const MIN_DELAY: Duration = Duration::from_millis(25);

/// The longest delay between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// The store's retry schedule.
#[derive(Clone, Debug)]
pub(super) struct Retry {
    /// How long after its first attempt a request is no longer repeated.
    deadline: Duration,
    /// Attempts that failed and were repeated (for `EtcdStore::stats`).
    retried: Arc<AtomicU64>,
}

impl Retry {
    pub(super) fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            retried: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(super) fn deadline(&self) -> Duration {
        self.deadline
    }

    /// How many attempts failed and were repeated.
    pub(super) fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// The schedule: the crate's [`Backoff`], exponential from 25 ms to
    /// 1 s, jittered, as many retries as a `u32` counts (the deadline or the
    /// caller ends it first).
    fn builder() -> Backoff {
        Backoff::new()
            .retries(u32::MAX)
            .delays(MIN_DELAY, MAX_DELAY)
            .factor(2.0)
            .jitter(true)
    }

    /// Delays for a loop that never gives up (the writer, the watch).
    pub(super) fn delays(&self) -> Delays {
        Delays {
            backoff: Self::builder().iter(),
            retried: Arc::clone(&self.retried),
        }
    }

    /// Runs `attempt` until it succeeds, fails as such, or the deadline
    /// passed; a request safe to repeat only.
    ///
    /// # Errors
    ///
    /// [`EtcdError::Request`] with the last failure.
    pub(super) async fn run<T, F, Fut>(
        &self,
        operation: &'static str,
        attempt: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let give_up = Instant::now() + self.deadline;
        attempt
            .retry(Self::builder())
            .sleep(tokio::time::sleep)
            .when(|error| refusal(error).is_none() && Instant::now() < give_up)
            .notify(|error, delay| {
                self.retried.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, ?delay, operation, "etcd request failed; retrying");
            })
            .await
            .map_err(EtcdError::request(operation))
    }
}

/// The delays of [`Retry::delays`]: a failure's next delay.
pub(super) struct Delays {
    backoff: ExponentialBackoff,
    retried: Arc<AtomicU64>,
}

impl Delays {
    /// The delay before the next attempt (counted as a retry).
    pub(super) fn next_delay(&mut self) -> Duration {
        self.retried.fetch_add(1, Ordering::Relaxed);
        self.backoff.next().unwrap_or(MAX_DELAY)
    }

    /// After a success: the next failure starts from the shortest delay.
    pub(super) fn reset(&mut self) {
        self.backoff = Retry::builder().iter();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_stay_capped() {
        let retry = Retry::new(Duration::from_secs(1));
        let mut delays = retry.delays();
        let first = delays.next_delay();
        assert!(first >= MIN_DELAY && first <= 2 * MIN_DELAY, "{first:?}");
        for _ in 0..40 {
            // Jitter adds up to one more delay.
            assert!(delays.next_delay() <= 2 * MAX_DELAY);
        }
        delays.reset();
        assert!(delays.next_delay() <= 2 * MIN_DELAY);
        assert_eq!(retry.retried(), 42);
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_the_deadline_and_never_repeats_a_refusal() {
        let retry = Retry::new(Duration::from_secs(2));
        let started = Instant::now();
        let mut attempts = 0u32;
        let result: Result<(), EtcdError> = retry
            .run("test", || {
                attempts += 1;
                async { Err(etcd_client::Error::WatchError("down".into())) }
            })
            .await;
        assert!(matches!(result, Err(EtcdError::Request { .. })));
        let spent = started.elapsed();
        assert!(spent >= Duration::from_secs(2), "{spent:?}");
        assert!(spent <= Duration::from_secs(2) + 2 * MAX_DELAY, "{spent:?}");
        assert!(attempts > 3, "{attempts}");

        let mut attempts = 0u32;
        let refused: Result<(), EtcdError> = retry
            .run("test", || {
                attempts += 1;
                async { Err(etcd_client::Error::InvalidArgs("no".into())) }
            })
            .await;
        assert!(refused.is_err());
        assert_eq!(attempts, 1);
    }
}
