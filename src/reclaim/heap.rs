//! The queue's shared state: the heap of waiting tasks, the bound, the
//! counters and who sleeps, under one lock.
//!
//! # Invariants
//!
//! - Every accepted task is run by a worker, handed back by `shutdown`, or
//!   (running when a shutdown deadline passed) reported failed as
//!   interrupted. A task is accepted only under the `state` lock while the
//!   queue is open, and `close` sets `closed` under the same lock, so no task
//!   enters after the workers can decide to exit.
//! - The bound ([`Room`]): free slots, waiting tasks and slots reserved
//!   (by a `redrive` between `reserve` and `insert`) add up to the
//!   capacity.
//! - `running`, `outstanding`, `pushed` and `completed` change only under
//!   the lock, with the heap: a task is counted in `outstanding` from its
//!   insertion (a re-driven one moves there from the dead letters) to its
//!   end, in `running` from its pop to its end, so `is_idle` never sees a
//!   task that is neither waiting nor running. A worker counts a task's end
//!   in the same critical section as its next pop.
//! - The waiting tasks come out due first, oldest first ([`Heap`]).
//! - No wake-up is lost. A worker with nothing to run registers with
//!   `work` (`enable`) and counts itself (`asleep`) under the lock.
//!   Whoever makes work takes one from that count under the lock and
//!   notifies once, after the lock. So the count is never below the number
//!   of registered workers: when it is 0, nobody sleeps and nothing is
//!   notified (a busy worker is not woken per push). A count above it (a
//!   worker woken by `notify_waiters`) costs a spare wake-up at most: the
//!   worker looks again under the lock. `resume` and `close` reset the
//!   count under the lock and then wake every registered worker. A push
//!   finding no room waits in line for a slot handed to it (`handoff`, see
//!   [`Room`]); `close` closes the line.
//!
//! # Deadlock safety
//!
//! One lock, `state`, held only to insert, remove or count entries and to
//! register a waiter with a `Notify` (whose own lock is a leaf: it calls
//! nothing back), never across an `.await` nor while user code (policy,
//! task, waker) runs: every `notify_*` comes after the lock is released.
//! The `interrupted` and `aborts` locks are each taken alone; `dead` is
//! taken alone too, except by `stats`, which takes it while holding
//! `state` (the one order: `state`, then `dead`; nothing takes `state`
//! while holding `dead`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

use super::dead::DeadLetters;
use super::policy::{Priority, ReclaimPolicy};
use super::room::{NoRoom, Room};
use super::task::ReclaimTask;
use super::waiting::Heap;
use crate::events::EventBus;
use crate::events::TaskInfo;
use crate::session::ResourceClass;

pub(super) struct Shared {
    /// Itself, to spawn workers from a `&self` method.
    pub(super) me: Weak<Shared>,
    /// Workers whose task is alive (running or not yet polled): below
    /// `workers` once some ended with their runtime, when the next push
    /// spawns new ones under the missing numbers.
    pub(super) alive: AtomicUsize,
    pub(super) state: Mutex<State>,
    pub(super) capacity: usize,
    pub(super) workers: usize,
    /// Wakes sleeping workers: one per push that finds one asleep, all on
    /// resume and close.
    pub(super) work: Notify,
    /// Pushes waiting for room wait in line here for a slot freed while
    /// they wait (see [`Room`]); holds no permits otherwise.
    pub(super) handoff: Semaphore,
    /// Wakes `idle` waiters when the last running task ends.
    pub(super) idle: Notify,
    /// How many `idle` calls wait: the last task's end wakes them only if
    /// some do.
    pub(super) idle_waiters: AtomicUsize,
    pub(super) policy: Arc<dyn ReclaimPolicy>,
    pub(super) epoch: Instant,
    pub(super) counters: Counters,
    /// Tasks that failed for good, kept for a re-drive.
    pub(super) dead: Mutex<DeadLetters>,
    pub(super) bus: Option<EventBus>,
    pub(super) tracker: TaskTracker,
    /// Each worker number's abort handle, of its latest task.
    pub(super) aborts: Mutex<Vec<Option<AbortHandle>>>,
    pub(super) interrupted: Mutex<Vec<TaskInfo>>,
}

/// Worker number `1`'s task is alive while this is (owned by its
/// future from the spawn).
struct Alive(Arc<Shared>, usize);

impl Drop for Alive {
    fn drop(&mut self) {
        let Self(shared, number) = self;
        let orphans = {
            // Counted out under the lock, where the last handle's drop
            // looks: exactly one of the two sees both gone.
            let mut state = shared.state.lock();
            if let Some(live) = state.live.get_mut(*number) {
                *live = false;
            }
            let last = shared.alive.fetch_sub(1, Ordering::AcqRel) == 1;
            last && state.orphaned
        };
        if orphans {
            shared.report_orphans();
        }
    }
}

/// Everything that changes with the heap, under one lock.
pub(super) struct State {
    pub(super) heap: Heap,
    pub(super) room: Room,
    /// Tasks running now.
    pub(super) running: usize,
    /// Tasks accepted since the queue was built.
    pub(super) pushed: u64,
    /// Tasks that succeeded.
    pub(super) completed: u64,
    /// Waiting and running tasks by class rank (dead letters are counted
    /// by [`DeadLetters`]).
    pub(super) outstanding: [u64; 4],
    /// Workers registered with `work`, not yet claimed by a wake-up.
    pub(super) asleep: usize,
    pub(super) paused: bool,
    /// The queue stopped taking tasks.
    pub(super) closed: bool,
    /// Workers exit at once (a shutdown deadline passed).
    pub(super) stop: bool,
    /// What each worker runs, by worker number: a shutdown writes off the
    /// task of a worker that its abort could not end.
    pub(super) slots: Vec<Slot>,
    /// Every handle of the queue is gone (it is closed too).
    pub(super) orphaned: bool,
    /// Which worker numbers have a task alive (one that is blocked on a
    /// runtime that is gone keeps its number: a new worker never shares
    /// its slot).
    pub(super) live: Vec<bool>,
}

/// What a worker is running.
#[derive(Clone, Copy, Debug)]
pub(super) enum Slot {
    Idle,
    Running {
        info: TaskInfo,
        /// Attempts started, the one running included.
        attempts: u32,
    },
    /// Its attempt ended; the worker is settling the outcome (a failure, a
    /// retry's backoff), or sleeping the backoff: not written off (it
    /// reports the task itself, and an abort ends a backoff).
    Settling {
        info: TaskInfo,
    },
    /// Its task was reported interrupted and counted out by a shutdown
    /// while the worker was blocked in it (a synchronous call that never
    /// yields): the worker's own end of it is not counted again.
    WrittenOff,
}

impl State {
    pub(super) fn new(capacity: usize, paused: bool, workers: usize) -> Self {
        Self {
            heap: Heap::default(),
            room: Room::new(capacity),
            running: 0,
            pushed: 0,
            completed: 0,
            outstanding: [0; 4],
            asleep: 0,
            paused,
            closed: false,
            stop: false,
            slots: vec![Slot::Idle; workers],
            live: vec![false; workers],
            orphaned: false,
        }
    }

    /// Marks worker `numbers` live, before their tasks are spawned.
    pub(super) fn claim(&mut self, numbers: &[usize]) {
        for &number in numbers {
            if let Some(live) = self.live.get_mut(number) {
                *live = true;
            }
        }
    }

    /// Counts a task out of `outstanding` (it ended, or left the queue).
    pub(super) fn count_out(&mut self, class: ResourceClass) {
        // Counted in at insertion, under this lock: no underflow.
        let slot = &mut self.outstanding[rank(class)];
        *slot = slot.saturating_sub(1);
    }

    /// Sets what worker `worker` runs.
    pub(super) fn set_slot(&mut self, worker: usize, slot: Slot) {
        if let Some(at) = self.slots.get_mut(worker) {
            *at = slot;
        }
    }

    /// Claims one sleeping worker, if any, to notify after the lock.
    fn claim_worker(&mut self) -> bool {
        let asleep = self.asleep > 0;
        self.asleep -= usize::from(asleep);
        asleep
    }

    fn is_idle(&self) -> bool {
        self.heap.len() == 0 && self.running == 0
    }
}

/// The index of `class` in per-class arrays.
pub(super) fn rank(class: ResourceClass) -> usize {
    usize::try_from(class.rank()).map_or(3, |rank| rank.min(3))
}

/// The counters that change off the hot path.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) retried: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) long_lived: AtomicU64,
}

/// How a worker's last task ended, counted in its next critical section.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ended {
    pub(super) class: ResourceClass,
    pub(super) completed: bool,
}

/// What a worker does next.
pub(super) enum Next {
    Run(ReclaimTask),
    /// Nothing to run now: registered with `work` (if it was given).
    Sleep,
    Exit,
}

impl Shared {
    /// The policy's priority of a task. The policy is user code: called
    /// outside the lock, contained.
    pub(super) fn priority(&self, info: &TaskInfo) -> Priority {
        crate::contain::contain(|| self.policy.priority(info)).unwrap_or(Priority::URGENT)
    }

    /// The due time of a task of `priority` queued now, in nanoseconds
    /// after the epoch.
    fn due(&self, priority: Priority) -> u64 {
        let since = Instant::now().saturating_duration_since(self.epoch);
        duration_nanos(since).saturating_add(duration_nanos(priority.delay()))
    }

    /// Queues a fresh task if there is room now; hands it back otherwise,
    /// saying why.
    pub(super) fn try_insert(
        &self,
        task: ReclaimTask,
        priority: Priority,
    ) -> Result<(), (ReclaimTask, NoRoom)> {
        // Before it looks for room: a full queue whose workers are gone
        // would wait for ever for a slot only a worker frees.
        self.revive();
        let due = self.due(priority);
        let wake = {
            let mut state = self.state.lock();
            if state.closed {
                return Err((task, NoRoom::Closed));
            }
            if !self.take_now(&mut state.room) {
                return Err((task, NoRoom::Full));
            }
            self.enter(&mut state, due, task, true)
        };
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Inserts a task whose slot is reserved ([`reserve`](Self::reserve));
    /// hands it back (and frees the slot) if the queue closed meanwhile. A
    /// `fresh` task is counted as pushed; a re-driven one is not.
    pub(super) fn insert(
        &self,
        task: ReclaimTask,
        priority: Priority,
        fresh: bool,
    ) -> Result<(), ReclaimTask> {
        self.revive();
        let due = self.due(priority);
        let wake = {
            let mut state = self.state.lock();
            if state.closed {
                let claimed = state.room.give(1);
                drop(state);
                self.wake_pushers(claimed);
                return Err(task);
            }
            self.enter(&mut state, due, task, fresh)
        };
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Spawns workers `numbers` on `runtime`, claimed live (and counted
    /// in `alive`) by the caller; each one's abort handle replaces its
    /// number's earlier one (of a task that ended). Outside every lock: a
    /// runtime shutting down drops the task's future in the spawn.
    pub(super) fn spawn_workers(&self, numbers: &[usize], runtime: &Handle) {
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        for &number in numbers {
            // Owned by the task's future from the spawn: a task dropped
            // unpolled (its runtime gone) counts itself out too.
            let alive = Alive(Arc::clone(&shared), number);
            let worker = Arc::clone(&shared);
            let task = self.tracker.spawn_on(
                async move {
                    let _alive = alive;
                    worker.work_loop(number).await;
                },
                runtime,
            );
            if let Some(abort) = self.aborts.lock().get_mut(number) {
                *abort = Some(task.abort_handle());
            }
        }
    }

    /// The workers ended with their runtime (dropped, or shut down) while
    /// the queue is open: spawns new ones on the current runtime, if there
    /// is one with its time driver, so that what waits runs (a deleter
    /// outlives its runtime, and so do the queues it closes through). A
    /// load on the hot path; the rest only once every worker is gone.
    #[inline]
    pub(super) fn revive(&self) {
        if self.alive.load(Ordering::Acquire) < self.workers {
            self.revive_missing();
        }
    }

    /// [`revive`](Self::revive)'s work, once some worker is gone.
    #[cold]
    #[inline(never)]
    fn revive_missing(&self) {
        let Some(runtime) = crate::build::timed_runtime() else {
            return;
        };
        let numbers: Vec<usize> = {
            // Under the lock, where a shutdown closes the queue: none
            // revives a queue shut down (whose workers it stopped). The
            // numbers are claimed here: two pushes never spawn the same
            // one. (A dead worker counted in `asleep` costs a spare
            // notification at most.)
            let mut state = self.state.lock();
            if state.closed {
                return;
            }
            let numbers: Vec<usize> = (0..state.live.len())
                .filter(|&number| !state.live[number])
                .collect();
            state.claim(&numbers);
            self.alive.fetch_add(numbers.len(), Ordering::AcqRel);
            numbers
        };
        if numbers.is_empty() {
            return;
        }
        tracing::warn!(
            workers = numbers.len(),
            "reclaim queue workers ended with their runtime; new ones run on this one"
        );
        self.spawn_workers(&numbers, &runtime);
    }

    /// Puts `task` in the heap (its slot taken) and counts it; returns
    /// whether a sleeping worker is to be woken.
    fn enter(&self, state: &mut State, due: u64, task: ReclaimTask, fresh: bool) -> bool {
        state.outstanding[rank(task.info().class)] += 1;
        state.pushed += u64::from(fresh);
        state.heap.push(due, task);
        // Paused workers would only look and sleep again.
        (!state.paused || state.closed) && state.claim_worker()
    }

    /// Worker `worker`'s next step, counting how its last task `ended`
    /// first. Given `sleep`, a worker with nothing to run registers with
    /// `work` under the lock.
    pub(super) fn next(
        &self,
        worker: usize,
        ended: Option<Ended>,
        sleep: Option<Pin<&mut Notified<'_>>>,
    ) -> Next {
        let (next, woken_pushers, idle) = {
            let mut state = self.state.lock();
            if let Some(ended) = ended {
                // Written off by a shutdown: counted out there.
                if !matches!(state.slots.get(worker), Some(Slot::WrittenOff)) {
                    state.running -= 1;
                    state.count_out(ended.class);
                    state.completed += u64::from(ended.completed);
                }
                state.set_slot(worker, Slot::Idle);
            }
            let runnable = !state.stop && (!state.paused || state.closed);
            let next = match runnable.then(|| state.heap.pop()).flatten() {
                Some(task) => {
                    state.running += 1;
                    let info = task.info();
                    // Its first attempt starts next, with no `.await`
                    // between but a cooperative yield.
                    state.set_slot(worker, Slot::Running { info, attempts: 1 });
                    Next::Run(task)
                }
                None if state.stop || (state.closed && state.heap.len() == 0) => Next::Exit,
                None => {
                    if let Some(notified) = sleep {
                        notified.enable();
                        state.asleep += 1;
                    }
                    Next::Sleep
                }
            };
            let claimed = match next {
                Next::Run(_) => state.room.give(1),
                _ => 0,
            };
            let idle = ended.is_some() && state.is_idle();
            (next, claimed, idle)
        };
        self.wake_pushers(woken_pushers);
        // Relaxed is enough: an `idle` call counts itself before it takes
        // the lock to look, and this load comes after this lock.
        if idle && self.idle_waiters.load(Ordering::Relaxed) > 0 {
            self.idle.notify_waiters();
        }
        next
    }

    /// Counts out a task whose worker `worker` was aborted while running
    /// it; `false` if a shutdown wrote it off already (reported and counted
    /// out there).
    pub(super) fn interrupted(&self, worker: usize, class: ResourceClass) -> bool {
        let (counted, idle) = {
            let mut state = self.state.lock();
            let counted = !matches!(state.slots.get(worker), Some(Slot::WrittenOff));
            if counted {
                state.running -= 1;
                state.count_out(class);
            }
            state.set_slot(worker, Slot::Idle);
            (counted, state.is_idle())
        };
        if idle && self.idle_waiters.load(Ordering::Relaxed) > 0 {
            self.idle.notify_waiters();
        }
        counted
    }

    /// Puts back the task of worker `worker`, whose future was dropped while
    /// the queue's workers were not stopped (its runtime went away): it
    /// waits again, still counted outstanding, and runs from a fresh
    /// attempt on the worker the next push brings back (a shutdown hands
    /// it back instead). Hands the task back to be dropped if a shutdown
    /// wrote it off meanwhile (reported there).
    pub(super) fn requeue(
        &self,
        worker: usize,
        task: ReclaimTask,
        attempts: u32,
    ) -> Option<ReclaimTask> {
        let info = task.info();
        let priority = self.priority(&info);
        let due = self.due(priority);
        let mut state = self.state.lock();
        let written_off = matches!(state.slots.get(worker), Some(Slot::WrittenOff));
        state.set_slot(worker, Slot::Idle);
        if written_off {
            return Some(task);
        }
        if state.stop {
            // A shutdown stopped the workers meanwhile (and took what
            // waited): interrupted, as if its abort had dropped the worker.
            state.running -= 1;
            state.count_out(info.class);
            let idle = state.is_idle();
            drop(state);
            self.interrupted.lock().push(info);
            self.fail(
                info,
                attempts,
                crate::events::ReclaimError::new(
                    crate::events::ReclaimErrorKind::Interrupted,
                    "the queue's shutdown deadline passed",
                ),
            );
            if idle && self.idle_waiters.load(Ordering::Relaxed) > 0 {
                self.idle.notify_waiters();
            }
            return Some(task);
        }
        state.running -= 1;
        state.room.take_or_owe();
        state.heap.push(due, task);
        let wake = (!state.paused || state.closed) && state.claim_worker();
        drop(state);
        tracing::warn!("a reclaim worker went away with its runtime; its task waits again");
        if wake {
            self.work.notify_one();
        }
        None
    }

    /// Records that worker `worker` started attempt `attempts` of its task
    /// (a retry: off the hot path).
    pub(super) fn attempting(&self, worker: usize, attempts: u32) {
        let mut state = self.state.lock();
        if let Some(slot) = state.slots.get_mut(worker)
            && let Slot::Running { info, .. } | Slot::Settling { info } = *slot
        {
            *slot = Slot::Running { info, attempts };
        }
    }

    /// Worker `worker`'s attempt ended: `false` if a shutdown wrote its
    /// task off meanwhile (blocked in the attempt past the deadline), so
    /// the worker does nothing more with it (no failure, retry or dead
    /// letter: reported and counted out there). Otherwise the task is the
    /// worker's to settle, and no write-off takes it from now on.
    pub(super) fn settle(&self, worker: usize) -> bool {
        let mut state = self.state.lock();
        match state.slots.get(worker).copied() {
            Some(Slot::WrittenOff) => false,
            Some(Slot::Running { info, .. }) => {
                state.set_slot(worker, Slot::Settling { info });
                true
            }
            _ => true,
        }
    }

    /// Writes off the tasks of the workers still running one (blocked in a
    /// synchronous call that an abort cannot end): counted out, and
    /// returned with their attempts, to be reported interrupted. The
    /// workers' own ends of them are not counted again.
    pub(super) fn write_off_running(&self) -> Vec<(TaskInfo, u32)> {
        let (stuck, idle) = {
            let mut state = self.state.lock();
            let mut stuck = Vec::new();
            for worker in 0..state.slots.len() {
                if let Some(Slot::Running { info, attempts }) = state.slots.get(worker).copied() {
                    state.running -= 1;
                    state.count_out(info.class);
                    state.set_slot(worker, Slot::WrittenOff);
                    stuck.push((info, attempts));
                }
            }
            (stuck, state.is_idle())
        };
        if idle && self.idle_waiters.load(Ordering::Relaxed) > 0 {
            self.idle.notify_waiters();
        }
        stuck
    }

    /// Hands `claimed` slots to the pushes waiting in line (after the
    /// lock: it wakes them).
    pub(super) fn wake_pushers(&self, claimed: usize) {
        if claimed > 0 {
            self.handoff.add_permits(claimed);
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.state.lock().is_idle()
    }

    /// Stops taking tasks; workers drain and exit.
    pub(super) fn close(&self) {
        {
            let mut state = self.state.lock();
            state.closed = true;
            state.asleep = 0;
            state.room.waiting = 0;
        }
        self.handoff.close();
        self.work.notify_waiters();
    }

    /// Stops the workers and takes every waiting task, counted out.
    pub(super) fn stop(&self) -> Vec<ReclaimTask> {
        let (left, claimed, idle) = {
            let mut state = self.state.lock();
            state.stop = true;
            let left = state.heap.take_all();
            for task in &left {
                state.count_out(task.info().class);
            }
            let claimed = state.room.give(left.len());
            (left, claimed, state.is_idle())
        };
        self.wake_pushers(claimed);
        self.work.notify_waiters();
        // Nothing waits now; with nothing running either, `idle` would
        // otherwise wait for a task to end that never comes.
        if idle && self.idle_waiters.load(Ordering::Relaxed) > 0 {
            self.idle.notify_waiters();
        }
        left
    }

    /// The queue's last handle went; if no worker is left either, what
    /// waits is reported (see [`report_orphans`](Self::report_orphans)),
    /// else the last worker to end does it.
    pub(super) fn orphan(&self) {
        let none = {
            let mut state = self.state.lock();
            state.orphaned = true;
            self.alive.load(Ordering::Acquire) == 0
        };
        if none {
            self.report_orphans();
        }
    }

    /// Nothing will run what waits any more (no handle, no worker): each
    /// task still waiting is reported failed (`Interrupted`) and dropped;
    /// a session's releases release as they drop (their work done), and
    /// are not reported.
    pub(super) fn report_orphans(&self) {
        for task in self.stop_if_left() {
            if task.can_run_again() {
                self.fail(
                    task.info(),
                    0,
                    crate::events::ReclaimError::new(
                        crate::events::ReclaimErrorKind::Interrupted,
                        "the queue was dropped with no worker left to run this task",
                    ),
                );
            }
            super::task::drop_contained(task);
        }
    }

    /// As [`stop`](Self::stop) if tasks still wait (the workers ended
    /// without running them); nothing otherwise. Called once the queue is
    /// closed and its workers ended: nothing is pushed meanwhile.
    pub(super) fn stop_if_left(&self) -> Vec<ReclaimTask> {
        if self.state.lock().heap.len() == 0 {
            return Vec::new();
        }
        self.stop()
    }

    /// Whether a shutdown stopped the workers (cut the draining short).
    pub(super) fn stopped(&self) -> bool {
        self.state.lock().stop
    }

    /// Sets whether the workers may start tasks; resuming wakes them all.
    pub(super) fn set_paused(&self, paused: bool) {
        {
            let mut state = self.state.lock();
            state.paused = paused;
            if !paused {
                state.asleep = 0;
            }
        }
        if !paused {
            self.work.notify_waiters();
        }
    }
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
