//! The cancellation matrix: every combination of notifier behaviour on the
//! first round and on the retries, with the caller's future dropped at each
//! phase of the run. After each case, I1 holds, the run stayed within its
//! bound, and the report's counts add up and match what the sessions saw.

use std::sync::Arc;

use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, Script, ScriptedNotifier, Subset, within,
};
use session_lifecycle::{CloseReason, MemoryStore, RouterDeleter, RouterId};
use tokio::time::{Duration, Instant};

/// What the router does with a notice, on the first round and on the
/// retries: confirms everything, confirms the even ids, fails, takes 300 ms
/// then confirms everything, never answers, panics.
const BEHAVIOURS: [Notify; 6] = [
    Notify::confirm_all(),
    Notify::Confirm(Subset::EvenIds),
    Notify::Error,
    Notify::Slow {
        delay: Duration::from_millis(300),
        confirm: Subset::All,
    },
    Notify::Never,
    Notify::Panic,
];

/// When the caller drops its future, on the paused clock. With 2 batches
/// per round, 1 s notify timeout, 2 s confirm timeout and 0.5–1 s first
/// backoff, these fall: at the first poll, inside the first notify call,
/// inside the confirmation wait, inside the backoff or second round, and
/// never.
const DROP_POINTS: [Option<Duration>; 5] = [
    Some(Duration::ZERO),
    Some(Duration::from_millis(500)),
    Some(Duration::from_millis(2_500)),
    Some(Duration::from_millis(4_300)),
    None,
];

const SESSIONS: u64 = 16;

async fn case(first: Notify, retries: Notify, drop_at: Option<Duration>, keep_joiner: bool) {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let observed = ObservedRouter::fill(&*store, router, 0, SESSIONS).await;
    // A client closes one session itself before the deletion.
    let _ = observed.sessions[3].close(CloseReason::ClientClosed);
    let deleter = RouterDeleter::builder()
        .batch_size(8)
        .notify_timeout(Duration::from_secs(1))
        .confirm_timeout(Duration::from_secs(2))
        .retries(2)
        .retry_backoff(Duration::from_millis(500), Duration::from_secs(2))
        .build(
            Arc::clone(&store),
            ScriptedNotifier::new(Arc::clone(&store), Script::by_round(first, retries)),
        )
        .expect("valid settings");
    let start = Instant::now();
    let caller = deleter.delete(router);
    let joiner = keep_joiner.then(|| tokio::spawn(deleter.delete(router)));
    let outcome = match drop_at {
        Some(at) => {
            let dropped = tokio::time::timeout(at, caller).await;
            dropped.ok()
        }
        None => Some(within(HOUR, caller).await),
    };
    within(HOUR, deleter.shutdown()).await;
    let elapsed = start.elapsed();
    let label = format!("{first:?}/{retries:?}, drop at {drop_at:?}");
    assert!(
        elapsed <= deleter.max_wait(SESSIONS as usize),
        "{label}: took {elapsed:?}"
    );
    assert_eq!(deleter.running(), 0, "{label}");

    let report = match (joiner, outcome) {
        (Some(joiner), _) => Some(joiner.await.unwrap()),
        (None, Some(outcome)) => Some(outcome),
        (None, None) => None,
    };
    if let Some(outcome) = report {
        let outcome = outcome.unwrap_or_else(|e| panic!("{label}: {e}"));
        let report = outcome
            .report()
            .unwrap_or_else(|| panic!("{label}: no report"));
        assert_eq!(report.sessions, SESSIONS as usize, "{label}");
        assert_eq!(
            report.confirmed + report.already_closed + report.closed_otherwise + report.forced,
            report.sessions,
            "{label}"
        );
        assert_eq!(report.already_closed, 1, "{label}");
        assert_eq!(
            report.forced,
            observed.count_reason(CloseReason::Forced),
            "{label}"
        );
        assert_eq!(
            report.confirmed,
            observed.count_reason(CloseReason::RouterDeleted),
            "{label}"
        );
        let failing = |b: Notify| matches!(b, Notify::Error | Notify::Never | Notify::Panic);
        if failing(first) && failing(retries) {
            assert_eq!(report.forced, SESSIONS as usize - 1, "{label}");
        }
        if first == Notify::confirm_all() {
            assert_eq!((report.forced, report.rounds), (0, 1), "{label}");
        }
    }
    observed.assert_deleted(&*store).await;
}

#[tokio::test(start_paused = true)]
async fn every_behaviour_every_drop_point() {
    let mut cases = 0;
    for first in BEHAVIOURS {
        for retries in BEHAVIOURS {
            for (i, drop_at) in DROP_POINTS.into_iter().enumerate() {
                // A run that breaks its bound fails here instead of hanging.
                tokio::time::timeout(
                    Duration::from_secs(600),
                    case(first, retries, drop_at, i % 2 == 0),
                )
                .await
                .unwrap_or_else(|_| panic!("{first:?}/{retries:?}/{drop_at:?} did not finish"));
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 6 * 6 * 5);
}
