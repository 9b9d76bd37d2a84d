//! The paused-time harness: deterministic runtimes for tests.

use std::future::Future;

use tokio::runtime::Runtime;
use tokio::time::Duration;

use crate::{DeleteError, DeleteOutcome, DeletionReport};

/// A bound for a paused-time wait that costs nothing: far beyond any
/// deadline, retry schedule or grace period a test configures. Under paused
/// time, a run that hangs waiting (every task idle: a lost wake-up, a
/// future that never resolves) reaches it at once and fails, instead of
/// hanging the test. A task that never waits (a `yield_now` loop polling a
/// flag, say) keeps the paused clock from moving: no timer, this one
/// included, fires then; await a condition instead of spinning on one.
pub const HOUR: Duration = Duration::from_secs(3_600);

/// A current-thread runtime with tokio's clock paused and every driver
/// enabled: timers fire in order, and the clock jumps to the next timer
/// whenever every task waits, so a run is deterministic and takes no real
/// time.
///
/// # Panics
///
/// If the runtime cannot be built (the OS refused its resources).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::test_util::paused_runtime;
///
/// let runtime = paused_runtime();
/// let slept = runtime.block_on(async {
///     let start = tokio::time::Instant::now();
///     tokio::time::sleep(Duration::from_secs(3_600)).await; // instant
///     start.elapsed()
/// });
/// assert_eq!(slept, Duration::from_secs(3_600));
/// ```
#[must_use]
pub fn paused_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds")
}

/// Runs `scenario` to its end on a fresh [`paused_runtime`] and returns its
/// output. Tasks it spawned and left running are dropped with the runtime.
///
/// # Panics
///
/// If the runtime cannot be built, or if `scenario` panics.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{MemoryStore, RouterDeleter, RouterId, SessionStore};
/// use session_lifecycle::test_util::{Notify, ScriptedNotifier, run_paused};
///
/// let report = run_paused(async {
///     let store = Arc::new(MemoryStore::new());
///     let router = RouterId::new(1);
///     store.register_router(router).await.unwrap();
///     // A router that never answers: the deletion force-closes after its
///     // deadline, which the paused clock reaches at once.
///     let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Never);
///     let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
///     deleter.delete(router).await
/// });
/// assert!(report.unwrap().report().is_some());
/// ```
pub fn run_paused<F: Future>(scenario: F) -> F::Output {
    paused_runtime().block_on(scenario)
}

/// Awaits `future`, panicking if it takes longer than `limit`: a broken run
/// shows up as a failure naming the bound, not as a hung test. Under paused
/// time the limit costs nothing; the clock jumps to it, once every task
/// waits (a task spinning on `yield_now` keeps it from moving: see
/// [`HOUR`]).
///
/// # Panics
///
/// If `limit` passes first.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::test_util::{run_paused, within};
///
/// let answer = run_paused(within(Duration::from_secs(1), async { 42 }));
/// assert_eq!(answer, 42);
/// ```
#[track_caller]
pub fn within<F: Future>(limit: Duration, future: F) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(limit, future).await {
            Ok(output) => output,
            Err(_) => panic!("not finished within {limit:?} (awaited at {caller})"),
        }
    }
}

/// Runs a deletion within `limit` and returns its report; panics on any
/// other outcome (an error, a router already deleted, or the limit).
///
/// # Panics
///
/// If the deletion does not end with a report within `limit`.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{MemoryStore, RouterDeleter, RouterId, SessionStore};
/// use session_lifecycle::test_util::{HOUR, Notify, ScriptedNotifier, report_within, run_paused};
///
/// run_paused(async {
///     let store = Arc::new(MemoryStore::new());
///     store.register_router(RouterId::new(1)).await.unwrap();
///     let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
///     let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
///     let report = report_within(HOUR, deleter.delete(RouterId::new(1))).await;
///     assert_eq!(report.sessions, 0);
/// });
/// ```
#[track_caller]
pub fn report_within<F>(limit: Duration, delete: F) -> impl Future<Output = DeletionReport>
where
    F: Future<Output = Result<DeleteOutcome, DeleteError>>,
{
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(limit, delete).await {
            Ok(Ok(DeleteOutcome::Deleted(report))) => report,
            Ok(other) => panic!("expected a deletion report, got {other:?} (at {caller})"),
            Err(_) => panic!("deletion not finished within {limit:?} (at {caller})"),
        }
    }
}
