//! Two controllers sharing sessions through etcd (`EtcdStore`, feature
//! `etcd`), and a router deletion that outlives the controller that began it.
//!
//! Controllers A and B are two `EtcdStore<String>` clients on one fresh key
//! prefix; A runs on a tokio runtime of its own, so it can die:
//!
//! 1. A registers a router and creates `--sessions` sessions with a payload
//!    and a token; B lists them (`sessions(router)`) and sees both.
//! 2. A client closes a session through A: B's handle resolves `closed()`.
//! 3. A's `RouterDeleter` fences the router and notifies a router that never
//!    answers; right then A dies (its runtime shut down, its store dropped).
//!    A create through B on the fenced incarnation is refused.
//! 4. B's `RouterDeleter::delete` resumes the deletion (`report.resumed`) and
//!    finishes it; creates on the old incarnation are still refused, and B's
//!    `audit()` is clean.
//!
//! It prints each check and a summary (deletion report, timings), deletes the
//! keys under its prefix, and exits non-zero if a check fails, if no endpoint
//! is given (`--endpoint` or `SESSION_LIFECYCLE_ETCD`) or etcd is unreachable.
//!
//! ```sh
//! . scripts/etcd-env.sh && cargo run --example etcd_controllers --features etcd
//! cargo run --example etcd_controllers --features etcd -- --endpoint http://127.0.0.1:2379 --sessions 10000
//! ```

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use session_lifecycle::etcd::client::DeleteOptions;
use session_lifecycle::etcd::{EtcdError, EtcdStore};
use session_lifecycle::{
    CloseReason, Incarnation, NewSession, NotifyError, RouterDeleter, RouterId, Session, SessionId,
    SessionStore, TerminationBatch, TerminationNotifier, store::CreateErrorKind,
    store::RouterStatus,
};
use tokio::runtime::{Builder, Runtime};
use tokio::sync::Notify;
use tokio::time::{Duration, Instant, timeout};

/// Two controllers sharing sessions through etcd; one dies mid-deletion.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// etcd endpoints, `http://host:port`, comma-separated (every member of a
    /// cluster) [default: $SESSION_LIFECYCLE_ETCD].
    #[arg(long)]
    endpoint: Option<String>,
    /// Sessions A creates on the router (at least 2: one is closed by its client).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(2..))]
    sessions: u64,
}

type Store = EtcdStore<String>;
const ROUTER: RouterId = RouterId::new(1);
/// The longest any one step may take.
const WAIT: Duration = Duration::from_secs(10);

/// Prints the check if it holds, or returns it as the example's error.
macro_rules! check {
    ($ok:expr, $($what:tt)+) => {
        if $ok {
            println!("  ok: {}", format_args!($($what)+));
        } else {
            return Err(format!("check failed: {}", format_args!($($what)+)).into());
        }
    };
}

/// Session `id` on `ROUTER`, with payload `client-<id>` and token `token-<id>`.
fn spec(id: u64, incarnation: Incarnation) -> NewSession<String> {
    NewSession::new(SessionId::new(id), ROUTER, incarnation)
        .token(format!("token-{id}").into_bytes())
        .payload(format!("client-{id}"))
}

/// A's routers never answer. The first call tells `scenario` that A's
/// deletion is past its fence.
struct NeverAnswers(Arc<Notify>);

impl TerminationNotifier for NeverAnswers {
    async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// B's routers confirm every session they are told to terminate (closing it
/// in B's store), 64 at a time.
struct Confirm(Store);

impl TerminationNotifier for Confirm {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        let store = self.0.clone();
        tokio::spawn(async move {
            let close = |key| store.close_exact(key, CloseReason::RouterDeleted);
            stream::iter(batch.sessions)
                .for_each_concurrent(64, |key| async move { drop(close(key).await) })
                .await;
        });
        Ok(())
    }
}

/// Controller A's runtime: dropping it kills A's tasks at once, mid-step.
struct Doomed(Option<Runtime>);

impl Drop for Doomed {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

async fn connect(endpoint: String, prefix: String) -> Result<Store, EtcdError> {
    let builder = EtcdStore::builder()
        .endpoints(endpoint.split(',').map(str::to_owned))
        .prefix(prefix);
    builder.connect().await
}

async fn scenario(endpoint: &str, b: &Store, count: u64) -> Result<(), Box<dyn Error>> {
    let runtime = Builder::new_multi_thread().enable_all().build()?;
    let a_runtime = runtime.handle().clone();
    let doomed = Doomed(Some(runtime));
    let a = a_runtime.spawn(connect(endpoint.to_owned(), b.prefix().to_owned()));
    let a = Arc::new(a.await??);

    println!("1. A registers {ROUTER} and creates {count} sessions; B reads them");
    let incarnation = a.register_router(ROUTER).await?;
    let started = Instant::now();
    let on_a: Vec<Session<String>> = stream::iter(0..count)
        .map(|id| a.create(spec(id, incarnation)))
        .buffer_unordered(64)
        .try_collect()
        .await?;
    let created_in = started.elapsed();
    let started = Instant::now();
    let on_b = b.sessions(ROUTER).await?;
    let read_in = started.elapsed();
    check!(on_b.len() == on_a.len(), "B sees all {count} sessions");
    let intact = on_b.iter().all(|s| {
        let id = s.id().get();
        let token = format!("token-{id}").into_bytes();
        *s.payload() == format!("client-{id}") && s.with_token(|t| t == Some(&token[..]))
    });
    check!(intact, "B reads every payload and token A wrote");

    println!("2. a client closes session 0 through A");
    let first = b.get(SessionId::new(0)).await?;
    let first = first.ok_or("B has no session 0")?;
    let started = Instant::now();
    let outcome = a.close(first.id(), CloseReason::ClientClosed).await?;
    let closed = timeout(WAIT, first.closed()).await.is_ok();
    let close_seen_in = started.elapsed();
    let reason = first.close_reason();
    let ok = outcome.won() && closed && reason == Some(CloseReason::ClientClosed);
    check!(ok, "closed() resolved on B's handle: {reason:?}");

    println!("3. A's RouterDeleter fences {ROUTER}, then A dies");
    let fenced = Arc::new(Notify::new());
    let notifier = NeverAnswers(Arc::clone(&fenced));
    let a_deleter = RouterDeleter::builder()
        .build(Arc::clone(&a), notifier)
        .expect("valid settings");
    let started = Instant::now();
    drop(a_runtime.spawn(a_deleter.delete(ROUTER)));
    let notified = timeout(WAIT, fenced.notified()).await.is_ok();
    let a_fenced_in = started.elapsed();
    check!(notified, "A fenced {ROUTER} and notified its silent router");
    drop((doomed, a_deleter, a, on_a)); // A's deletion, watch and writer stop here
    let status = b.router_status(ROUTER).await?;
    let ok = status == RouterStatus::Fenced(incarnation);
    check!(ok, "B sees {status:?}");
    let late = b.create(spec(count, incarnation)).await;
    let refused = late.err().ok_or("B's create was accepted")?;
    let ok = matches!(refused.kind(), CreateErrorKind::Fenced { .. });
    check!(ok, "B's create is refused: {refused}");

    println!("4. B deletes {ROUTER}: it resumes A's deletion");
    let b_deleter = RouterDeleter::builder()
        .confirm_timeout(Duration::from_secs(5))
        .retries(1)
        .build(Arc::new(b.clone()), Confirm(b.clone()))
        .expect("valid settings");
    let bound = b_deleter.max_wait(on_b.len()) + WAIT;
    let outcome = timeout(bound, b_deleter.delete(ROUTER)).await??;
    let report = outcome.report().ok_or("the router was already deleted")?;
    check!(report.resumed, "B's deletion resumed the one A fenced");
    let left = report.sessions;
    check!(left + 1 == on_b.len(), "it found the {left} sessions left");
    let ok = on_b.iter().all(Session::is_closed);
    check!(ok, "every handle B holds is closed");
    let status = b.router_status(ROUTER).await?;
    let ok = status == RouterStatus::Deleted(incarnation);
    check!(ok, "B sees {status:?}");
    check!(b.count(ROUTER).await? == 0, "no session left in etcd");
    let late = b.create(spec(count + 1, incarnation)).await;
    let refused = late.err().ok_or("B's create was accepted")?;
    let ok = matches!(refused.kind(), CreateErrorKind::RouterDeleted { .. });
    check!(ok, "B's create is refused: {refused}");
    let audit = b.audit().await?;
    let ok = audit.is_clean() && audit.sessions == 0;
    check!(ok, "B's audit is clean");

    let (r, d) = (report, report.durations);
    println!("summary:");
    println!("  sessions   {count} created by A in {created_in:.1?}, read by B in {read_in:.1?}");
    println!("  close      A's close seen by B's handle after {close_seen_in:.1?}");
    println!("  A's death  A's deleter fenced {ROUTER} after {a_fenced_in:.1?}, then A died");
    println!(
        "  deletion   resumed {}: {} sessions, {} confirmed, {} forced, {} round(s)",
        r.resumed, r.sessions, r.confirmed, r.forced, r.rounds
    );
    println!(
        "  timings    fence {:.1?}, mark {:.1?}, notify {:.1?}, wait {:.1?}, force {:.1?}, finish {:.1?}, total {:.1?}",
        d.fence, d.mark, d.notify, d.wait, d.force, d.finish, d.total
    );
    println!("  audit      clean, {} sessions", audit.sessions);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let from_env = || std::env::var("SESSION_LIFECYCLE_ETCD").ok();
    let Some(endpoint) = args.endpoint.or_else(from_env).filter(|e| !e.is_empty()) else {
        eprintln!(
            "error: no etcd endpoint: pass --endpoint http://host:port or set \
             SESSION_LIFECYCLE_ETCD (`. scripts/etcd-env.sh` starts an etcd and sets it)"
        );
        return ExitCode::FAILURE;
    };
    let since_epoch = std::time::UNIX_EPOCH.elapsed().unwrap_or_default();
    let run = format!("{}-{}", std::process::id(), since_epoch.as_nanos());
    let prefix = format!("/session-lifecycle-example/etcd-controllers-{run}/");
    let b = match connect(endpoint.clone(), prefix).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: {error} (is etcd running at {endpoint}?)");
            return ExitCode::FAILURE;
        }
    };
    let result = scenario(&endpoint, &b, args.sessions).await;
    // Whatever happened above: delete this run's keys.
    let everything = Some(DeleteOptions::new().with_prefix());
    let deleted = b.client().kv_client().delete(b.prefix(), everything).await;
    let cleanup = deleted.map(|done| println!("  cleanup    {} key(s) deleted", done.deleted()));
    if let Err(error) = result.and(cleanup.map_err(|e| format!("cleanup failed: {e}").into())) {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
