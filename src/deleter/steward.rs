//! The deleter's steward: one task that holds a waiter of every run and
//! drives the runs nobody else drives.
//!
//! A run is driven by the callers that await it (see `drive`). Someone must
//! drive it when they stop: a caller that dropped its future, or holds it
//! without polling it. The steward does, for every run of its deleter,
//! without a task per run (spawning one, and waking it at every wake of the
//! run, cost a 1k-session deletion a tenth of its time). A caller's future
//! dropped before the end rings it, and it takes that run over at once.
//! Otherwise it looks at the runs it holds every [`TICK`]: it takes over a
//! run that a wake left unclaimed and idle for a whole tick (nobody polled
//! it since the last look), and sleeps on a run that waits for a wake (the
//! wake then rings it, and it looks again a tick later), so a run that
//! waits for hours costs it no timer. A run taken over has the steward as
//! one of its waiters, woken with them, to its end. The steward leaves
//! when it has held no run for [`LINGER`], and the next run spawns it
//! again.
//!
//! A deleter has one steward per runtime its runs start on (`Stewards`),
//! and each run goes to the steward of its own runtime: a steward whose
//! runtime is gone, or is not being driven (a current-thread runtime
//! outside `block_on`), holds only runs started there, never a run of a
//! runtime that is still running.
//!
//! # Invariants
//!
//! - Every run is handed to the steward of the runtime it starts on as it
//!   starts (`adopt`). If that steward does not run (none yet, it left, or
//!   its task was dropped with its runtime), `adopt` spawns it; if it runs
//!   but does not tick, `adopt` rings it.
//! - A run the steward holds and nobody drives is driven by it within two
//!   ticks: a wake sets the run's `unclaimed`, a poll that takes it counts
//!   in its claims, and a wake of a run the steward sleeps on rings it; a
//!   run idle, unclaimed and with the same claims as a tick ago has nobody
//!   polling it.
//! - The steward's task owns what it holds: dropped with its runtime, it
//!   drops the runs it held and those waiting in its inbox (a run whose
//!   runtime is gone ends with it, and the next `delete` starts afresh).
//!   It holds no token of the deleter's tracker: `shutdown` waits for the
//!   runs themselves, then has the steward leave at once (`close`: it
//!   waits at most [`CLOSE_WAIT`] for that, as the steward's runtime may
//!   not be running); a deleter dropped has it leave without waiting.
//!
//! # Deadlock safety
//!
//! The registry of stewards (`Stewards`) is locked to find or add a
//! runtime's steward and hand it a run; under it, and only there, a
//! steward's inbox (held only to move runs in or out and to read or set
//! whether the steward runs and ticks) and the run's slot for the
//! steward's waker (`SharedRun::watch`) are locked, each alone. No lock is
//! held while a run is polled or dropped, nor while a steward is spawned,
//! rung or waited for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Wake, Waker};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::runtime::{self, Handle};
use tokio::time::{Duration, Instant};

use super::drive::SharedRun;

/// How often the steward looks at the runs it holds.
const TICK: Duration = Duration::from_millis(10);

/// The longest a run that nobody drives waits for the steward to take it
/// over (two ticks, see the invariants), with a millisecond of timer
/// slack; counted in [`RouterDeleter::max_wait`](super::RouterDeleter::max_wait).
pub(super) const TAKEOVER: Duration = TICK
    .saturating_mul(2)
    .saturating_add(Duration::from_millis(1));

/// How long the steward stays once it holds no run: deletions one after
/// another share one task.
const LINGER: Duration = Duration::from_secs(1);

/// How long `shutdown` waits for the steward to leave.
const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// The stewards of one deleter, one per runtime its runs started on.
#[derive(Default)]
pub(super) struct Stewards {
    /// Those that run, and those that left (each forgotten at the next
    /// run of another runtime).
    all: Mutex<Vec<Arc<Steward>>>,
}

impl Stewards {
    /// Hands a starting run to the steward of `runtime`, the runtime it
    /// starts on, spawning it there if it does not run.
    pub(super) fn adopt(&self, run: SharedRun, runtime: &Handle) {
        let id = runtime.id();
        let (steward, spawn, ring) = {
            let mut all = self.all.lock();
            all.retain(|steward| steward.runtime == id || steward.runs());
            let steward = match all.iter().find(|steward| steward.runtime == id) {
                Some(steward) => Arc::clone(steward),
                None => {
                    let steward = Arc::new(Steward::new(id));
                    all.push(Arc::clone(&steward));
                    steward
                }
            };
            // Handed over under the registry's lock: a steward found here
            // is not forgotten before it holds the run. Rung from now on
            // when a caller leaves, even before the task picks the run up.
            run.watch(&Waker::from(Arc::clone(&steward.bell)));
            let (spawn, ring) = steward.push(run);
            (steward, spawn, ring)
        };
        if ring {
            steward.bell.0.notify_one();
        }
        if spawn {
            steward.spawn(runtime);
        }
    }

    /// Has every steward leave once it holds no run, and waits (at most
    /// [`CLOSE_WAIT`]) until they left.
    pub(super) async fn close(&self) {
        let all = self.all.lock().clone();
        futures::future::join_all(all.iter().map(|steward| steward.close())).await;
    }

    /// Has every steward leave once it holds no run, without waiting.
    pub(super) fn shut(&self) {
        let all = self.all.lock().clone();
        for steward in &all {
            steward.shut();
        }
    }
}

/// The steward of one deleter on one runtime.
pub(super) struct Steward {
    /// The runtime whose runs it holds, and that its task runs on.
    runtime: runtime::Id,
    inbox: Mutex<Inbox>,
    /// Rung to have the task look at its runs: a run's wake while it
    /// sleeps on it, a caller leaving, a run handed over while it does not
    /// tick, the deleter shutting down. Keeps one ring for a task that is
    /// not waiting yet.
    bell: Arc<Bell>,
    /// The deleter shuts down (or is gone): leave as soon as no run is
    /// held, without lingering.
    closed: AtomicBool,
    /// Told when the task leaves.
    gone: tokio::sync::Notify,
}

#[derive(Default)]
struct Bell(tokio::sync::Notify);

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

#[derive(Default)]
struct Inbox {
    /// Runs handed over and not yet picked up by the task.
    runs: Vec<SharedRun>,
    /// A steward task runs (or is spawned and not yet dropped).
    running: bool,
    /// The task looks at its inbox at its next tick: `adopt` need not
    /// ring.
    ticking: bool,
}

impl Steward {
    fn new(runtime: runtime::Id) -> Self {
        Self {
            runtime,
            inbox: Mutex::default(),
            bell: Arc::default(),
            closed: AtomicBool::new(false),
            gone: tokio::sync::Notify::new(),
        }
    }

    /// Whether its task runs (or is spawned and not yet dropped).
    fn runs(&self) -> bool {
        self.inbox.lock().running
    }

    /// Puts a starting run in the inbox. Returns whether the task does not
    /// run (the caller spawns it), and whether it runs without ticking
    /// (the caller rings it).
    fn push(&self, run: SharedRun) -> (bool, bool) {
        let mut inbox = self.inbox.lock();
        inbox.runs.push(run);
        let spawn = !std::mem::replace(&mut inbox.running, true);
        if spawn {
            inbox.ticking = true;
        }
        (spawn, !spawn && !inbox.ticking)
    }

    /// Spawns the task on `runtime`, under no lock: a runtime that is
    /// shutting down drops the task at once, and its guard takes the
    /// inbox's lock.
    fn spawn(self: Arc<Self>, runtime: &Handle) {
        let mut leaving = Leaving {
            steward: self,
            armed: true,
        };
        drop(runtime.spawn(async move {
            let steward = Arc::clone(&leaving.steward);
            steward.serve(&mut leaving).await;
        }));
    }

    /// Has the task leave once it holds no run, and waits (at most
    /// [`CLOSE_WAIT`]: its runtime may not be running) until it left.
    pub(super) async fn close(&self) {
        self.shut();
        let gone = self.gone.notified();
        tokio::pin!(gone);
        gone.as_mut().enable();
        if self.inbox.lock().running {
            let _ = tokio::time::timeout(CLOSE_WAIT, gone).await;
        }
    }

    /// Has the task leave once it holds no run, without waiting.
    pub(super) fn shut(&self) {
        self.closed.store(true, Ordering::Release);
        self.bell.0.notify_one();
    }

    /// The runs handed over since the last call.
    fn take_new(&self) -> Vec<SharedRun> {
        std::mem::take(&mut self.inbox.lock().runs)
    }

    /// Leaves if nothing was handed over meanwhile (a later `adopt` then
    /// spawns a new steward); `false` if something was.
    fn leave_if_idle(&self, leaving: &mut Leaving) -> bool {
        let mut inbox = self.inbox.lock();
        if inbox.runs.is_empty() {
            inbox.running = false;
            leaving.armed = false;
            true
        } else {
            false
        }
    }

    /// The steward's task.
    async fn serve(&self, leaving: &mut Leaving) {
        let mut watched: Vec<Watched> = Vec::new();
        // Runs taken over, driven as one of their waiters.
        let mut driven = FuturesUnordered::new();
        let mut next_tick: Option<Instant> = None;
        let mut idle_since = Instant::now();
        loop {
            let ticked = next_tick.is_some_and(|tick| Instant::now() >= tick);
            if ticked {
                next_tick = None;
            }
            for run in self.take_new() {
                watched.push(Watched {
                    seen: run.claims(),
                    run,
                    asleep: false,
                    fresh: true,
                });
            }
            let mut i = 0;
            while let Some(run) = watched.get_mut(i) {
                match run.look(ticked) {
                    Look::Done => drop(watched.swap_remove(i)),
                    Look::TakeOver => {
                        let Watched { run, .. } = watched.swap_remove(i);
                        driven.push(async move { drop(run.await) });
                    }
                    Look::Keep => i += 1,
                }
            }
            let awake = watched.iter().any(|run| !run.asleep);
            if watched.is_empty() && driven.is_empty() {
                let done = self.closed.load(Ordering::Acquire)
                    || Instant::now().duration_since(idle_since) >= LINGER;
                if done && self.leave_if_idle(leaving) {
                    return;
                }
            } else {
                idle_since = Instant::now();
            }
            // Ticks while a run is awake, and while lingering (new runs
            // are picked up at ticks); otherwise only a wake brings it back.
            let ticking = awake || (watched.is_empty() && driven.is_empty());
            if !ticking {
                // Not a tick that was due while it slept: the next look
                // is a whole tick after the next ring.
                next_tick = None;
            } else if next_tick.is_none() {
                next_tick = Some(Instant::now() + TICK);
            }
            if !self.wait_for_rings(ticking) {
                continue;
            }
            let tick = next_tick;
            tokio::select! {
                Some(()) = driven.next(), if !driven.is_empty() => {}
                () = sleep_until_some(tick) => {}
                () = self.bell.0.notified() => {}
            }
        }
    }

    /// Records whether the steward ticks, for `adopt` to ring if not;
    /// `false` if runs were handed over meanwhile (look again first).
    fn wait_for_rings(&self, ticking: bool) -> bool {
        let mut inbox = self.inbox.lock();
        if !inbox.runs.is_empty() {
            return false;
        }
        inbox.ticking = ticking;
        true
    }
}

/// Sleeps until `tick`, or forever without one.
async fn sleep_until_some(tick: Option<Instant>) {
    match tick {
        Some(tick) => tokio::time::sleep_until(tick).await,
        None => std::future::pending().await,
    }
}

/// A run the steward holds and does not drive.
struct Watched {
    run: SharedRun,
    /// Its claims at the last tick.
    seen: u64,
    /// The steward sleeps on it: the run waits for a wake, and the wake
    /// wakes the steward too.
    asleep: bool,
    /// Picked up since the last tick: its first look is at the next one,
    /// its callers having had a whole tick to poll it.
    fresh: bool,
}

/// What the steward does with a run it holds.
enum Look {
    Done,
    TakeOver,
    Keep,
}

impl Watched {
    fn look(&mut self, ticked: bool) -> Look {
        let first = ticked && std::mem::take(&mut self.fresh);
        let ticked = ticked && !first;
        let run = &self.run;
        if run.is_done() {
            return Look::Done;
        }
        if run.abandoned() {
            return Look::TakeOver;
        }
        if self.asleep {
            if !run.woken() {
                return Look::Keep;
            }
            // Woken: give its callers a tick to answer.
            self.asleep = false;
            self.seen = run.claims();
            return Look::Keep;
        }
        if !ticked {
            if first {
                // Its first tick: from here its callers have had a whole
                // tick to poll it at the next one.
                self.seen = run.claims();
            }
            return Look::Keep;
        }
        match run.idle_since(self.seen) {
            // A wake nobody answered for a whole tick.
            Some(true) => Look::TakeOver,
            // Waiting for a wake: sleep on it.
            Some(false) if run.sleep_on() => {
                self.asleep = true;
                Look::Keep
            }
            _ => {
                self.seen = run.claims();
                Look::Keep
            }
        }
    }
}

/// Owned by the steward's task from its spawn: when the task is dropped
/// before it left (its runtime shut down), no steward runs any more, and
/// what was handed over and not picked up goes with it.
struct Leaving {
    steward: Arc<Steward>,
    /// Cleared when the task leaves on its own (idle): a new steward may
    /// run by the time this drops.
    armed: bool,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        if self.armed {
            let orphans = {
                let mut inbox = self.steward.inbox.lock();
                inbox.running = false;
                std::mem::take(&mut inbox.runs)
            };
            drop(orphans);
        }
        self.steward.gone.notify_waiters();
    }
}
