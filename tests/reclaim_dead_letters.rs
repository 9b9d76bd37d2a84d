//! Dead letters (issue #21.5): a reclamation that fails for good is kept
//! with its task, counted as outstanding by class, re-driven on demand,
//! bounded, and handed back at shutdown; nothing is dropped silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use session_lifecycle::reclaim::{
    ClassCounts, DefaultPolicy, ReclaimError, ReclaimEvent, ReclaimTask, RetrySchedule,
};
use session_lifecycle::test_util::{HOUR, within};
use session_lifecycle::{Event, EventBus, ReclaimQueue, ResourceClass, RouterId, SessionId};
use tokio::time::Duration;

/// No retries: a failure is final at once.
fn no_retries() -> DefaultPolicy {
    DefaultPolicy::default().retry_schedule(RetrySchedule::none())
}

/// A task of `class` that fails while `broken` is set, counting its runs.
fn release(
    id: u64,
    class: ResourceClass,
    broken: &Arc<AtomicBool>,
) -> (ReclaimTask, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let (seen, broken) = (Arc::clone(&runs), Arc::clone(broken));
    let task = ReclaimTask::new(SessionId::new(id), RouterId::new(1), move || {
        seen.fetch_add(1, Ordering::SeqCst);
        let broken = broken.load(Ordering::SeqCst);
        async move {
            if broken {
                Err(ReclaimError::transient("router unreachable"))
            } else {
                Ok(())
            }
        }
    })
    .class(class);
    (task, runs)
}

/// Pushes a task of `class` per id that fails for good, each run to its
/// end before the next is pushed.
async fn fail_each(queue: &ReclaimQueue, ids: std::ops::RangeInclusive<u64>, class: ResourceClass) {
    let broken = Arc::new(AtomicBool::new(true));
    for id in ids {
        queue.push(release(id, class, &broken).0).await.unwrap();
        within(HOUR, queue.idle()).await;
    }
}

fn reclaim_events(events: &mut session_lifecycle::events::Subscription) -> Vec<ReclaimEvent> {
    let mut all = Vec::new();
    while let Some(event) = events.try_recv() {
        if let Event::Reclaim(event) = event {
            all.push(event);
        }
    }
    all
}

#[tokio::test(start_paused = true)]
async fn a_task_that_fails_for_good_is_kept_counted_and_redriven() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let queue = ReclaimQueue::builder()
        .policy(no_retries())
        .events(bus)
        .build()
        .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let mut runs = Vec::new();
    for (id, class) in [(1, ResourceClass::High), (2, ResourceClass::Low)] {
        let (task, count) = release(id, class, &broken);
        runs.push(count);
        queue.push(task).await.unwrap();
    }
    let (fine, _) = release(
        3,
        ResourceClass::Critical,
        &Arc::new(AtomicBool::new(false)),
    );
    queue.push(fine).await.unwrap();
    within(HOUR, queue.idle()).await;

    let stats = queue.stats();
    assert_eq!((stats.failed, stats.completed), (2, 1));
    assert_eq!((stats.dead_letters, stats.dead_lettered), (2, 2));
    assert_eq!(
        stats.outstanding,
        ClassCounts {
            high: 1,
            low: 1,
            ..ClassCounts::default()
        }
    );
    let letters = queue.dead_letters();
    assert_eq!(
        letters.iter().map(|l| l.task.session).collect::<Vec<_>>(),
        [SessionId::new(1), SessionId::new(2)]
    );
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(
        letters[0].error.to_string(),
        "release failed: router unreachable"
    );
    let failed = reclaim_events(&mut events)
        .into_iter()
        .filter(|e| matches!(e, ReclaimEvent::ReclaimFailed { .. }))
        .count();
    assert_eq!(failed, 2);

    // Still broken: a re-drive runs them again, and they come back.
    assert_eq!(queue.redrive().await, 2);
    within(HOUR, queue.idle()).await;
    assert_eq!(queue.stats().dead_letters, 2);
    assert_eq!(queue.stats().outstanding.total(), 2);

    // Fixed: the next re-drive empties the store and the gauges.
    broken.store(false, Ordering::SeqCst);
    assert_eq!(queue.redrive().await, 2);
    within(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(stats.outstanding, ClassCounts::default());
    assert_eq!((stats.redriven, stats.completed), (4, 3));
    assert_eq!(stats.pushed, 3, "a re-drive is not a new push");
    for count in runs {
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn the_store_is_bounded_and_says_what_it_dropped() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let queue = ReclaimQueue::builder()
        .policy(no_retries())
        .dead_letters(2)
        .workers(1)
        .events(bus)
        .build()
        .unwrap();
    fail_each(&queue, 1..=3, ResourceClass::Normal).await;
    let stats = queue.stats();
    assert_eq!((stats.dead_letters, stats.dead_letters_dropped), (2, 1));
    assert_eq!(stats.outstanding.normal, 2, "the dropped one is gone");
    let kept: Vec<_> = queue
        .dead_letters()
        .iter()
        .map(|l| l.task.session)
        .collect();
    assert_eq!(
        kept,
        [SessionId::new(2), SessionId::new(3)],
        "oldest dropped"
    );
    let dropped: Vec<_> = reclaim_events(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            ReclaimEvent::DeadLetterDropped { task } => Some(task.session),
            _ => None,
        })
        .collect();
    assert_eq!(dropped, [SessionId::new(1)]);
}

#[tokio::test(start_paused = true)]
async fn with_no_store_a_failed_task_is_dropped_as_before() {
    let queue = ReclaimQueue::builder()
        .policy(no_retries())
        .dead_letters(0)
        .build()
        .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    queue
        .push(release(1, ResourceClass::High, &broken).0)
        .await
        .unwrap();
    within(HOUR, queue.idle()).await;
    let stats = queue.stats();
    assert_eq!((stats.failed, stats.dead_letters), (1, 0));
    assert_eq!(stats.outstanding.total(), 0);
    assert_eq!(queue.redrive().await, 0);
}

/// A re-drive waiting for room loses no letter when it is cancelled; the
/// shutdown hands the letters back and the gauges return to zero.
#[tokio::test(start_paused = true)]
async fn a_cancelled_redrive_loses_nothing_and_shutdown_hands_letters_back() {
    let queue = ReclaimQueue::builder()
        .policy(no_retries())
        .capacity(1)
        .workers(1)
        .build()
        .unwrap();
    fail_each(&queue, 1..=3, ResourceClass::Low).await;
    assert_eq!(queue.stats().dead_letters, 3);
    // No room: the queue is paused and full.
    queue.pause();
    let (filler, _) = release(9, ResourceClass::Low, &Arc::new(AtomicBool::new(false)));
    queue.push(filler).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), queue.redrive()).await;
    assert!(waited.is_err(), "the re-drive waits for room");
    assert_eq!(queue.stats().dead_letters, 3, "nothing lost by the cancel");
    assert_eq!(queue.stats().outstanding.low, 4);

    let report = queue.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.dead_letters.len(), 3);
    let stats = queue.stats();
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(stats.outstanding.total(), 0, "{stats:?}");
    assert_eq!(queue.redrive().await, 0, "shut down");
}

/// The outstanding count never drifts: tasks completing on other workers
/// while their push is still returning are counted out after they were
/// counted in (a race the leak bench found: 2 of 100,000 stayed counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outstanding_returns_to_zero_under_concurrent_pushes() {
    let queue = ReclaimQueue::builder()
        .capacity(64)
        .workers(2)
        .build()
        .unwrap();
    let tasks: u64 = 200_000;
    let producers: Vec<_> = (0..2u64)
        .map(|p| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in (p..tasks).step_by(2) {
                    let task = ReclaimTask::new(SessionId::new(i), RouterId::new(1), || async {
                        Ok::<(), ReclaimError>(())
                    })
                    .class(ResourceClass::ALL[(i % 4) as usize]);
                    queue.push(task).await.unwrap();
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    queue.idle().await;
    let stats = queue.stats();
    assert_eq!(stats.completed, tasks);
    assert_eq!(stats.outstanding, ClassCounts::default(), "{stats:?}");
}

/// A policy whose `priority` takes a while once `slow` is set (and says
/// so in `entered`): it runs while a re-drive holds a letter out, and
/// widens that window.
struct SlowPriority {
    slow: Arc<AtomicBool>,
    entered: Arc<AtomicBool>,
}

impl session_lifecycle::reclaim::ReclaimPolicy for SlowPriority {
    fn priority(
        &self,
        task: &session_lifecycle::reclaim::TaskInfo,
    ) -> session_lifecycle::reclaim::Priority {
        if self.slow.load(Ordering::SeqCst) {
            self.entered.store(true, Ordering::SeqCst);
            // Slow user code, on the re-drive's own thread.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        session_lifecycle::reclaim::ReclaimPolicy::priority(&no_retries(), task)
    }

    fn retry_schedule(&self, task: &session_lifecycle::reclaim::TaskInfo) -> RetrySchedule {
        session_lifecycle::reclaim::ReclaimPolicy::retry_schedule(&no_retries(), task)
    }
}

/// A re-drive racing the shutdown, on two threads: every letter ends in
/// exactly one place, run by the queue or handed back by the shutdown
/// (before, a letter the re-drive held out could miss the report).
#[test]
fn a_redrive_racing_the_shutdown_loses_no_letter() {
    const LETTERS: u64 = 16;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        for round in 0..100 {
            let slow = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicBool::new(false));
            let queue = ReclaimQueue::builder()
                .policy(SlowPriority {
                    slow: Arc::clone(&slow),
                    entered: Arc::clone(&entered),
                })
                .build()
                .unwrap();
            let broken = Arc::new(AtomicBool::new(true));
            let mut runs = Vec::new();
            for id in 1..=LETTERS {
                let (task, count) = release(id, ResourceClass::Normal, &broken);
                runs.push(count);
                queue.push(task).await.unwrap();
            }
            within(HOUR, queue.idle()).await;
            assert_eq!(queue.dead_letters().len() as u64, LETTERS);
            broken.store(false, Ordering::SeqCst);
            slow.store(true, Ordering::SeqCst);
            // On a thread of its own: the queue's workers, on the runtime's,
            // are free to stop at once.
            let redrive = std::thread::spawn({
                let queue = queue.clone();
                move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap()
                        .block_on(queue.redrive())
                }
            });
            // Every other round, shut down once the re-drive holds a letter
            // out (inside the policy); the others, whenever it comes.
            if round % 2 == 0 {
                while !entered.load(Ordering::SeqCst) {
                    tokio::task::yield_now().await;
                }
            }
            let report = queue.shutdown(Duration::from_secs(5)).await;
            let redriven = redrive.join().unwrap();
            // Each letter ran a second time (re-driven and drained) or was
            // handed back, never both, never neither.
            let ran_again = runs
                .iter()
                .filter(|runs| runs.load(Ordering::SeqCst) == 2)
                .count() as u64;
            let handed_back = (report.dead_letters.len() + report.left.len()) as u64;
            assert_eq!(
                ran_again + handed_back,
                LETTERS,
                "round {round}: {redriven} re-driven, {ran_again} ran again, {handed_back} handed back"
            );
            assert!(queue.dead_letters().is_empty(), "round {round}: a letter stayed behind");
        }
    });
}
