//! A `ReclaimPolicy` of your own: `TenantTiers` releases what sessions of
//! gold tenants' routers held before silver, silver before bronze, and only
//! then by resource class and traffic (through the `DefaultPolicy` it
//! wraps); each tier has its own retry schedule.
//!
//! Thirteen tasks are queued on paused workers in the worst order (bronze
//! first, least urgent class first), then the single worker resumes and the
//! order the tasks ran in is printed and checked. Two flaky tasks show the
//! tiers' retry schedules: a gold one that fails twice and then succeeds,
//! and a bronze one that keeps failing and is reported failed after its one
//! retry.
//!
//! `cargo run --example custom_policy`

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;
use session_lifecycle::{
    Backoff, Event, EventBus, ReclaimQueue, ResourceClass, RouterId, SessionId,
    reclaim::DefaultPolicy, reclaim::Priority, reclaim::ReclaimError, reclaim::ReclaimEvent,
    reclaim::ReclaimPolicy, reclaim::ReclaimTask, reclaim::RetrySchedule, reclaim::TaskInfo,
};
use tokio::time::Duration;

/// What a tenant pays for, and so how soon its routers' resources come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Gold,
    Silver,
    Bronze,
}

impl Tier {
    fn rank(self) -> u32 {
        match self {
            Self::Gold => 0,
            Self::Silver => 1,
            Self::Bronze => 2,
        }
    }
}

/// Tier first, then what `DefaultPolicy` says (class, then traffic).
///
/// A priority is a delay after the push, so the order ages: tiers are
/// `tier_spacing` apart, more than the widest delay `DefaultPolicy` gives
/// within a tier, so tasks pushed together come out tier by tier; and a
/// bronze task is overtaken only by work pushed less than its own delay
/// (at most `2 × tier_spacing + 3.5 × class spacing`) after it, never
/// starved by a stream of gold work.
#[derive(Clone)]
struct TenantTiers {
    tiers: HashMap<RouterId, Tier>,
    within: DefaultPolicy,
    tier_spacing: Duration,
}

impl TenantTiers {
    fn new(tiers: HashMap<RouterId, Tier>, class_spacing: Duration) -> Self {
        let within = DefaultPolicy::default().class_spacing(class_spacing);
        // Anything above `within.max_delay()` keeps the tiers apart.
        let tier_spacing = within.max_delay() + class_spacing / 2;
        Self {
            tiers,
            within,
            tier_spacing,
        }
    }

    /// A router of no known tenant gets the least.
    fn tier(&self, router: RouterId) -> Tier {
        self.tiers.get(&router).copied().unwrap_or(Tier::Bronze)
    }
}

impl ReclaimPolicy for TenantTiers {
    fn priority(&self, task: &TaskInfo) -> Priority {
        let tier = self.tier_spacing * self.tier(task.router).rank();
        Priority::due_in(tier + self.within.priority(task).delay())
    }

    /// Gold retries often and fast (its resources are the ones customers
    /// wait for); bronze retries once and then leaves it to the failure
    /// event and an operator.
    fn retry_schedule(&self, task: &TaskInfo) -> RetrySchedule {
        match self.tier(task.router) {
            Tier::Gold => RetrySchedule::new(
                Backoff::new()
                    .retries(5)
                    .delays(Duration::from_millis(10), Duration::from_millis(160))
                    .jitter(false),
            )
            .attempt_timeout(Duration::from_secs(1)),
            Tier::Silver => RetrySchedule::default(),
            Tier::Bronze => RetrySchedule::new(
                Backoff::new()
                    .retries(1)
                    .delays(Duration::from_millis(50), Duration::from_millis(50))
                    .jitter(false),
            )
            .attempt_timeout(Duration::from_millis(250)),
        }
    }

    fn long_lived_threshold(&self) -> Option<Duration> {
        Some(Duration::from_secs(12 * 3600))
    }
}

const GOLD: RouterId = RouterId::new(10);
const SILVER: RouterId = RouterId::new(20);
const BRONZE: RouterId = RouterId::new(30);

/// The tasks in the order they started, first attempts only.
#[derive(Clone, Default)]
struct RunLog(Arc<Mutex<Vec<TaskInfo>>>);

impl RunLog {
    /// A task that logs its first attempt and fails its first `failures`
    /// attempts.
    fn task(&self, info: TaskInfo, failures: u32) -> ReclaimTask {
        let (log, attempts) = (self.clone(), Arc::new(AtomicU32::new(0)));
        ReclaimTask::new(info.session, info.router, move || {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst);
            if attempt == 0 {
                log.0.lock().push(info);
            }
            async move {
                if attempt < failures {
                    Err(ReclaimError::transient("port table locked"))
                } else {
                    Ok(())
                }
            }
        })
        .class(info.class)
        .traffic(info.traffic)
    }
}

/// The demo's tasks in push order: bronze first, low class first.
fn tasks() -> Vec<(TaskInfo, u32)> {
    let mut tasks = Vec::new();
    for (router, base) in [(BRONZE, 300), (SILVER, 200), (GOLD, 100)] {
        for class in ResourceClass::ALL.into_iter().rev() {
            let session = SessionId::new(base + u64::from(class.rank()) * 10);
            let failures = match (router, class) {
                (GOLD, ResourceClass::Critical) => 2,
                (BRONZE, ResourceClass::Low) => u32::MAX,
                _ => 0,
            };
            tasks.push((TaskInfo::new(session, router, class, 0), failures));
        }
    }
    // A busy gold session pushed last: it overtakes the idle one of its
    // class (DefaultPolicy's traffic rule), not the classes above it.
    let busy = TaskInfo::new(SessionId::new(121), GOLD, ResourceClass::Normal, 1 << 30);
    tasks.push((busy, 0));
    tasks
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let tiers = HashMap::from([
        (GOLD, Tier::Gold),
        (SILVER, Tier::Silver),
        (BRONZE, Tier::Bronze),
    ]);
    let policy = TenantTiers::new(tiers, Duration::from_millis(100));
    // One worker, paused while the tasks go in: the order they run in is
    // then the policy's alone, not the order they happened to arrive in.
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let queue = ReclaimQueue::builder()
        .workers(1)
        .paused(true)
        .policy(policy.clone())
        .events(bus)
        .build()?;

    let log = RunLog::default();
    let tasks = tasks();
    println!("pushed (workers paused):");
    for &(info, failures) in &tasks {
        println!("  {}", describe(&policy, &info));
        queue.push(log.task(info, failures)).await?;
    }
    println!("queue depth {}; resuming", queue.stats().depth);
    queue.resume();
    tokio::time::timeout(Duration::from_secs(5), queue.idle()).await?;

    let ran = log.0.lock().clone();
    println!("ran:");
    for info in &ran {
        println!("  {}", describe(&policy, info));
    }
    println!("events:");
    while let Some(Event::Reclaim(event)) = events.try_recv() {
        match event {
            ReclaimEvent::ReclaimRetried {
                task,
                attempt,
                error,
                delay,
            } => println!(
                "  {} attempt {attempt} failed ({error}); retry in {delay:?}",
                task.session
            ),
            ReclaimEvent::ReclaimFailed {
                task,
                attempts,
                error,
            } => println!(
                "  {} failed for good after {attempts} attempts ({error})",
                task.session
            ),
            other => println!("  {other:?}"),
        }
    }
    let stats = queue.stats();
    println!(
        "completed {}, retried {}, failed {}",
        stats.completed, stats.retried, stats.failed
    );
    let report = queue.shutdown(Duration::from_secs(1)).await;
    println!(
        "shutdown: drained {}, {} left",
        report.drained,
        report.left.len()
    );

    let mut expected: Vec<TaskInfo> = tasks.iter().map(|&(info, _)| info).collect();
    expected.sort_by_key(|info| {
        let tier = policy.tier(info.router);
        (tier, info.class.rank(), std::cmp::Reverse(info.traffic))
    });
    if ran != expected {
        return Err("the tasks did not run in tier, class, traffic order".into());
    }
    if (stats.completed, stats.retried, stats.failed) != (12, 3, 1) {
        return Err(format!("unexpected counts: {stats:?}").into());
    }
    println!("order checked: tier, then class, then traffic");
    Ok(())
}

fn describe(policy: &TenantTiers, info: &TaskInfo) -> String {
    let kind = format!("{:?}/{}", policy.tier(info.router), info.class);
    format!(
        "{} {kind:<15} traffic {:>10}  due after {:?}",
        info.session,
        info.traffic,
        policy.priority(info).delay()
    )
}
