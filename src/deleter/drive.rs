//! A run driven by whoever awaits it: the caller that started it, in its
//! own task (no hand-off to another task, so no cross-thread wake-up and
//! the sessions stay in the caller's cache), everyone who joined it, and
//! the deleter's steward (`steward`), which holds a waiter of every run
//! and drives it when nobody else does.
//!
//! # Invariants
//!
//! - A run's future is polled by one waiter at a time: the poller takes it
//!   out of the cell (`Running`) and puts it back after its poll. Every
//!   waiter records its waker before it looks, and every wake of the run
//!   wakes them all. A waiter that finds the run `Running` waits for the
//!   next wake; if one came during that poll (so before it recorded
//!   itself), the poller wakes everyone again once it put the run back.
//!   No wake is lost, even if the poller's own caller is gone, or a
//!   waiter's waker panics (contained: the others are still woken).
//! - The steward's waiter is not polled (nor woken) until the steward
//!   takes the run over; meanwhile a wake reaches the steward only if it
//!   sleeps on the run (`watched`, set before it looks at `unclaimed`, a
//!   `SeqCst` fence on each side: either the wake finds the flag, or the
//!   steward finds the run woken), and a caller's waiter dropped before
//!   the end marks the run `abandoned` and rings the steward.
//! - A run is polled only when a wake asked for it (`unclaimed`: set by
//!   every wake of the run, and at its start; cleared by whoever takes the
//!   run to poll it). The other waiters woken by the same wake find it
//!   claimed and wait: a run that yields (`yield_now` is ready at its next
//!   poll, woken or not) lets the tasks queued behind it run first, as a
//!   task of its own would.
//! - Every waiter yields at its first poll (it wakes itself, and runs again
//!   after the tasks already queued): calls made together (one `join!`,
//!   tasks spawned together) all join the run before anyone drives it, and
//!   share its report.
//! - The steward holds its waiter until the run ends, so the run goes on
//!   from the first poll to its end whatever the callers do: a caller that
//!   dropped its future hands the run to the steward at once; one that
//!   holds it without polling it, within two of the steward's ticks.
//! - A run's future is dropped once it ends, by the waiter that saw it end,
//!   outside every lock; a panic while polling it ends it as
//!   [`DeleteError::Interrupted`]. The waker the run is polled with holds
//!   the waiters' wakers, not the run: a waker the run left behind (in a
//!   session's waiters, in a timer) keeps no dropped run alive.
//!
//! # Deadlock safety
//!
//! Three locks, never held together: the cell's (the run, or its
//! outcome), the waiters' (their wakers) and the steward's waker's. Each
//! is held only to move something in or out: never while the run is
//! polled or dropped, nor while a caller's waker is cloned, woken or
//! dropped (the steward's is the deleter's own, a `Notify` to ring,
//! cloned under its lock). So the run's user code (notifier, payloads,
//! resources) runs under no lock of the driver, and may join this very run
//! (it finds it `Running` and waits).

use std::future::Future;
use std::mem;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::loom::{AtomicBool, AtomicU64, Mutex, Ordering, fence};

use super::report::{DeleteError, DeleteOutcome};
use crate::id::RouterId;

/// What a run answers.
pub(super) type Outcome = Result<DeleteOutcome, DeleteError>;

/// A run's future.
pub(super) type RunFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// One waiter's hold on a run: awaiting it drives the run.
pub(super) struct SharedRun {
    driver: Arc<Driver>,
    /// This waiter's key among the wakers.
    key: u64,
    /// Polled before (the first poll only yields).
    polled: bool,
    /// The steward's waiter (see `steward`), not a caller's.
    steward: bool,
    /// Saw the run's outcome.
    finished: bool,
}

/// A run, shared by its waiters.
pub(super) struct Driver {
    router: RouterId,
    run: Mutex<Stage>,
    /// The waker the run is polled with: it wakes every waiter.
    waker: Waker,
    waiters: Arc<Waiters>,
    keys: AtomicU64,
}

/// The wakers of a run's waiters, one per waiter.
struct Waiters {
    wakers: Mutex<Vec<(u64, Waker)>>,
    /// The run was woken (or never polled) and nobody has taken it to poll
    /// it since.
    unclaimed: AtomicBool,
    /// How many times a waiter took the run to poll it.
    claims: AtomicU64,
    /// The steward's task, while it holds the run.
    watcher: Mutex<Option<Waker>>,
    /// The steward sleeps on this run: the next wake wakes it too.
    watched: AtomicBool,
    /// A caller left before the run ended.
    abandoned: AtomicBool,
}

enum Stage {
    /// Nobody polls it now.
    Idle(RunFuture),
    /// A waiter has taken it out to poll it.
    Running,
    /// It ended with this outcome.
    Done(Outcome),
}

impl SharedRun {
    /// Starts sharing `run`: the waiter of the caller who starts it, and
    /// the steward's, for the caller to hand over.
    pub(super) fn start(router: RouterId, run: RunFuture) -> (Self, Self) {
        let waiters = Arc::new(Waiters {
            wakers: Mutex::new(Vec::new()),
            unclaimed: AtomicBool::new(true),
            claims: AtomicU64::new(0),
            watcher: Mutex::new(None),
            watched: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
        });
        let driver = Arc::new(Driver {
            router,
            run: Mutex::new(Stage::Idle(run)),
            waker: Waker::from(Arc::clone(&waiters)),
            waiters,
            keys: AtomicU64::new(0),
        });
        let mut steward = Self::join(Arc::clone(&driver));
        steward.steward = true;
        (Self::join(driver), steward)
    }

    /// A new waiter of `driver`'s run.
    pub(super) fn join(driver: Arc<Driver>) -> Self {
        let key = driver.keys.fetch_add(1, Ordering::Relaxed);
        Self {
            driver,
            key,
            polled: false,
            steward: false,
            finished: false,
        }
    }

    /// The run, for others to join while it lasts.
    pub(super) fn downgrade(&self) -> std::sync::Weak<Driver> {
        Arc::downgrade(&self.driver)
    }

    /// How many times a waiter took the run to poll it so far.
    pub(super) fn claims(&self) -> u64 {
        self.driver.waiters.claims.load(Ordering::Relaxed)
    }

    /// Whether the run ended.
    pub(super) fn is_done(&self) -> bool {
        matches!(*self.driver.run.lock(), Stage::Done(_))
    }

    /// Whether the run is idle and has not been taken to be polled since
    /// [`claims`](Self::claims) was `seen`: `Some(true)` if a wake left it
    /// unclaimed (nobody drives it), `Some(false)` if it waits for a wake.
    pub(super) fn idle_since(&self, seen: u64) -> Option<bool> {
        let stage = self.driver.run.lock();
        (matches!(*stage, Stage::Idle(_)) && self.claims() == seen)
            .then(|| self.driver.waiters.unclaimed.load(Ordering::Acquire))
    }

    /// A caller left before the run ended.
    pub(super) fn abandoned(&self) -> bool {
        self.driver.waiters.abandoned.load(Ordering::Acquire)
    }

    /// Records the steward's task, woken when a caller leaves, and at the
    /// next wake of a run it [sleeps on](Self::sleep_on).
    pub(super) fn watch(&self, waker: &Waker) {
        let old = self.driver.waiters.watcher.lock().replace(waker.clone());
        drop(old);
    }

    /// Has the next wake of the run wake the steward too; `false` if one
    /// came already (the run is unclaimed), and the steward should look
    /// again.
    pub(super) fn sleep_on(&self) -> bool {
        let waiters = &self.driver.waiters;
        waiters.watched.store(true, Ordering::Release);
        // With the fence in `wake_all` (between its `unclaimed` and its
        // `watched`): either that wake sees this flag, or this load sees
        // its `unclaimed`.
        fence(Ordering::SeqCst);
        if waiters.unclaimed.load(Ordering::Acquire) {
            waiters.watched.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Whether a wake came since [`sleep_on`](Self::sleep_on).
    pub(super) fn woken(&self) -> bool {
        !self.driver.waiters.watched.load(Ordering::Acquire)
    }

    /// Records this waiter's waker (one per waiter), before it looks at
    /// the run: a wake from then on reaches it. A waker is cloned and
    /// dropped outside the lock (a waker is the executor's code).
    fn record(&self, waker: &Waker) {
        let wakers = &self.driver.waiters.wakers;
        let recorded =
            |wakers: &[(u64, Waker)]| wakers.iter().position(|(key, _)| *key == self.key);
        {
            let wakers = wakers.lock();
            if recorded(&wakers)
                .and_then(|at| wakers.get(at))
                .is_some_and(|(_, recorded)| recorded.will_wake(waker))
            {
                return;
            }
        }
        let mine = waker.clone();
        let replaced = {
            let mut wakers = wakers.lock();
            match recorded(&wakers).and_then(|at| wakers.get_mut(at)) {
                Some((_, old)) => Some(mem::replace(old, mine)),
                None => {
                    wakers.push((self.key, mine));
                    None
                }
            }
        };
        drop(replaced);
    }

    /// Wakes the run, as any wake of it does (a poll of it is asked for,
    /// and every waiter hears it). Under no lock: it wakes the waiters.
    pub(super) fn wake(&self) {
        self.driver.waiters.wake_all();
    }
}

impl Future for SharedRun {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        let driver = &*this.driver;
        if !this.polled {
            this.polled = true;
            if !matches!(*driver.run.lock(), Stage::Done(_)) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        // Recorded first: a wake while another waiter polls, or during this
        // waiter's own poll, has this one poll again.
        this.record(cx.waker());
        let unclaimed = &driver.waiters.unclaimed;
        let mut run = {
            let mut stage = driver.run.lock();
            match &*stage {
                Stage::Done(outcome) => {
                    this.finished = true;
                    return Poll::Ready(outcome.clone());
                }
                Stage::Running => return Poll::Pending,
                // Not woken since its last poll: polling it again now
                // would cut short a yield of the run (`yield_now` is ready
                // at its second poll, woken or not).
                Stage::Idle(_) if !unclaimed.load(Ordering::Acquire) => return Poll::Pending,
                Stage::Idle(_) => {}
            }
            unclaimed.store(false, Ordering::Release);
            driver.waiters.claims.fetch_add(1, Ordering::Relaxed);
            match mem::replace(&mut *stage, Stage::Running) {
                Stage::Idle(run) => run,
                // Matched above, under the same lock.
                other => {
                    *stage = other;
                    return Poll::Pending;
                }
            }
        };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run.as_mut().poll(&mut Context::from_waker(&driver.waker))
        }));
        let outcome = match polled {
            Ok(Poll::Pending) => {
                *driver.run.lock() = Stage::Idle(run);
                // Woken during this poll: a waiter that recorded itself
                // after that wake found the run `Running`, and waits for
                // another; this waiter, woken, may be gone before it polls.
                if unclaimed.load(Ordering::Acquire) {
                    driver.waiters.wake_all();
                }
                return Poll::Pending;
            }
            Ok(Poll::Ready(outcome)) => outcome,
            Err(panic) => {
                crate::contain::dispose(panic);
                Err(DeleteError::Interrupted(driver.router))
            }
        };
        // Whatever the run still holds drops here, under no lock.
        drop(run);
        *driver.run.lock() = Stage::Done(outcome.clone());
        driver.waiters.wake_all();
        this.finished = true;
        Poll::Ready(outcome)
    }
}

impl Drop for SharedRun {
    fn drop(&mut self) {
        let waker = {
            let mut wakers = self.driver.waiters.wakers.lock();
            let at = wakers.iter().position(|(key, _)| *key == self.key);
            at.map(|at| wakers.swap_remove(at))
        };
        drop(waker);
        // A caller leaving before the end: the steward drives the run on
        // at once (it would find it undriven only after a while).
        if !self.steward && !self.finished {
            let waiters = &self.driver.waiters;
            waiters.abandoned.store(true, Ordering::Release);
            waiters.wake_watcher();
        }
    }
}

impl Waiters {
    /// Wakes the steward's task, if it holds the run; under no lock.
    fn wake_watcher(&self) {
        let watcher = self.watcher.lock().clone();
        if let Some(watcher) = watcher {
            watcher.wake();
        }
    }

    /// Wakes every waiter recorded, under no lock; each records itself
    /// again when polled.
    fn wake_all(&self) {
        self.unclaimed.store(true, Ordering::Release);
        let wakers = mem::take(&mut *self.wakers.lock());
        for (_, waker) in wakers {
            // A waker is user code: one that panics is contained, and the
            // other waiters (and the steward) still hear the wake.
            if !crate::session::wake_contained(waker) {
                tracing::error!("a deletion's waiter's waker panicked; the panic was contained");
            }
        }
        // See `SharedRun::sleep_on`.
        fence(Ordering::SeqCst);
        if self.watched.swap(false, Ordering::AcqRel) {
            self.wake_watcher();
        }
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_all();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all();
    }
}

/// loom models of the driver: no wake-up is lost between the caller, a
/// joiner and the steward, whoever polls, a caller that leaves after
/// driving leaves the run to the steward, and a steward asleep on a run
/// hears its next wake. Run with
/// `RUSTFLAGS="--cfg session_lifecycle_loom" cargo test --lib --release loom`.
#[cfg(all(test, session_lifecycle_loom))]
mod loom_tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use loom::future::block_on;
    use loom::thread;

    use super::{Outcome, SharedRun};
    use crate::deleter::DeleteOutcome;
    use crate::id::{Incarnation, RouterId};
    use crate::loom::{AtomicBool, AtomicU64, Mutex, Ordering};

    const ROUTER: RouterId = RouterId::new(1);

    /// What the run answers.
    fn answer() -> Outcome {
        Ok(expected())
    }

    fn expected() -> DeleteOutcome {
        DeleteOutcome::AlreadyDeleted {
            router: ROUTER,
            incarnation: Incarnation::new(1),
        }
    }

    /// Pending until opened from another thread, as a run waiting for a
    /// confirmation is; counts its polls.
    struct Gate {
        open: AtomicBool,
        waker: Mutex<Option<Waker>>,
        polls: AtomicU64,
    }

    impl Gate {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                open: AtomicBool::new(false),
                waker: Mutex::new(None),
                polls: AtomicU64::new(0),
            })
        }

        fn open(&self) {
            self.open.store(true, Ordering::Release);
            let waker = self.waker.lock().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    struct Wait(Arc<Gate>);

    impl Future for Wait {
        type Output = Outcome;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
            self.0.polls.fetch_add(1, Ordering::Relaxed);
            *self.0.waker.lock() = Some(cx.waker().clone());
            if self.0.open.load(Ordering::Acquire) {
                Poll::Ready(answer())
            } else {
                Poll::Pending
            }
        }
    }

    /// Every interleaving with up to three preemptions: enough for a lost
    /// wake-up between two pollers and a waker (each step locks little),
    /// and within the CI's time.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    fn shared(gate: &Arc<Gate>) -> (SharedRun, SharedRun) {
        SharedRun::start(ROUTER, Box::pin(Wait(Arc::clone(gate))))
    }

    #[test]
    fn loom_the_caller_and_a_joiner_both_see_the_end() {
        model(|| {
            let gate = Gate::new();
            let (caller, steward) = shared(&gate);
            drop(steward);
            let joiner = SharedRun::join(Arc::clone(&caller.driver));
            let opener = Arc::clone(&gate);
            let opening = thread::spawn(move || opener.open());
            let joining = thread::spawn(move || block_on(joiner));
            // block_on parks until woken: a lost wake-up is a loom deadlock.
            assert_eq!(block_on(caller).ok(), Some(expected()));
            assert_eq!(joining.join().unwrap().ok(), Some(expected()));
            opening.join().unwrap();
        });
    }

    /// A waker that records that it was woken.
    struct Rung(AtomicBool);

    impl std::task::Wake for Rung {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn loom_a_steward_asleep_on_a_run_hears_its_next_wake() {
        model(|| {
            let gate = Gate::new();
            let (mut caller, steward) = shared(&gate);
            let rung = std::sync::Arc::new(Rung(AtomicBool::new(false)));
            steward.watch(&Waker::from(std::sync::Arc::clone(&rung)));
            // The caller drives the run until it waits for the gate.
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            for _ in 0..2 {
                assert!(Pin::new(&mut caller).poll(&mut cx).is_pending());
            }
            let opener = Arc::clone(&gate);
            let opening = thread::spawn(move || opener.open());
            // Either the steward sleeps on the run and the wake rings it,
            // or it sees the wake and does not sleep.
            let asleep = steward.sleep_on();
            opening.join().unwrap();
            assert!(!asleep || rung.0.load(Ordering::SeqCst));
        });
    }

    #[test]
    fn loom_the_steward_ends_a_run_its_caller_left() {
        model(|| {
            let gate = Gate::new();
            let (mut caller, steward) = shared(&gate);
            let steward = thread::spawn(move || block_on(steward));
            let opener = Arc::clone(&gate);
            let opening = thread::spawn(move || opener.open());
            // The caller polls twice (its first poll only yields), then
            // leaves: the steward alone ends the run.
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            for _ in 0..2 {
                if Pin::new(&mut caller).poll(&mut cx).is_ready() {
                    break;
                }
            }
            drop(caller);
            assert_eq!(steward.join().unwrap().ok(), Some(expected()));
            opening.join().unwrap();
            assert!(gate.polls.load(Ordering::Relaxed) >= 1);
        });
    }
}
