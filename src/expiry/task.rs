//! The expiry monitor's task: one timer wheel, lazy re-arm, and the
//! closes of the sessions it finds due.
//!
//! # Invariants
//!
//! - `held` counts the entries in the wheel; the task sleeps on `arrival`
//!   only when it is zero and `incoming` is empty (a `track` after the
//!   check leaves a permit: no wake-up is lost).
//! - An entry is placed against one read of its session's expiry; it is
//!   expired only by a compare-exchange against that read, so an extension
//!   that lands in between sends it back to be placed again.
//! - Due sessions of one tick are closed by one task on the tracker, never
//!   one per session; shutdown waits for them.
//! - Each pass also sweeps `Config::sweep_slots` slots a tick it moved
//!   (the whole wheel once per `SWEEP_EVERY`): a session that closed,
//!   was marked `Terminating` or had its expiry cleared leaves the wheel
//!   then, not when its expiry comes up (up to a turn of the wheel, 27
//!   minutes at the default tick, later). `held` and `tracked` count it out.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::{Duration, Instant};

use super::config::WHEEL_SLOTS;
use super::monitor::Shared;
use super::report::Counters;
use crate::closing::close_and_remove;
use crate::events::{Event, emit};
use crate::session::{CloseFrom, CloseReason, ExpirySnapshot, Session, SessionState};
use crate::store::SessionStore;
use crate::wheel::Wheel;

/// A session in the wheel, and the expiry it was warned for, if any.
struct Entry<P> {
    session: Session<P>,
    warned: Option<ExpirySnapshot>,
}

/// Where [`Shared::place`] put an entry.
enum Placed<P> {
    /// In the wheel, at this tick.
    At(Entry<P>, u64),
    /// Out of the wheel: due (and expired by this pass: its session is in
    /// the pass's `due`), or closed, terminating or cleared (its session in
    /// the pass's `left`).
    Gone,
    /// Extended since its expiry was read: to be placed again.
    Extended(Entry<P>),
}

/// What one pass over the due entries found.
struct Pass<P> {
    due: Vec<Session<P>>,
    /// Handles let go by this pass, dropped at its end, each panic
    /// contained: one may be its session's last, and run the payload's
    /// `Drop` (user code) in the monitor's task.
    left: Vec<Session<P>>,
    warnings: Vec<Event>,
    fires: usize,
}

/// The monitor task's future. Its `Hands` are made here, owned by the
/// future from the spawn: a task dropped before its first poll (its
/// runtime gone at once) stops the monitor too.
pub(super) fn task<S: SessionStore>(shared: Arc<Shared<S>>) -> impl Future<Output = ()> + Send
where
    S::Payload: Send + Sync,
{
    let hands = Hands {
        shared: Arc::clone(&shared),
        // Built at the first session: a monitor nobody uses costs no wheel.
        wheel: None,
    };
    run(shared, hands)
}

/// The monitor task: sleeps until the next tick while it holds sessions
/// (until one comes in otherwise), then looks at the entries that came up
/// and files the incoming sessions.
async fn run<S: SessionStore>(shared: Arc<Shared<S>>, mut hands: Hands<S>) {
    let mut held = 0usize;
    let mut now_tick = 0u64;
    let sweep_slots = shared.config.sweep_slots();
    loop {
        let woke = if held == 0 {
            shared.idle().await
        } else {
            shared
                .sleep(shared.instant_of(now_tick.saturating_add(1)))
                .await
        };
        if !woke {
            break;
        }
        now_tick = shared.tick_of(Instant::now());
        let wheel = hands.wheel.get_or_insert_with(|| Wheel::new(WHEEL_SLOTS));
        let mut pass = Pass {
            due: Vec::new(),
            left: Vec::new(),
            warnings: Vec::new(),
            fires: 0,
        };
        let due = wheel.advance(now_tick);
        let moved = if due.is_empty() {
            0
        } else {
            usize::try_from(due.end() - due.start() + 1).unwrap_or(usize::MAX)
        };
        for tick in due {
            let entries = wheel.take(tick);
            pass.fires += entries.len();
            held -= entries.len();
            for entry in entries {
                held += shared.file(wheel, entry, now_tick, &mut pass);
            }
        }
        // Sessions closed otherwise: their handles (and payloads) go at the
        // end of the pass.
        let mut swept = Vec::new();
        let gone = wheel.sweep(
            sweep_slots.saturating_mul(moved),
            |entry| Shared::<S>::keeps(&entry.session),
            &mut swept,
        );
        pass.left
            .extend(swept.into_iter().map(|entry| entry.session));
        held -= gone;
        shared.counters.leave(gone);
        let incoming = std::mem::take(&mut *shared.incoming.lock());
        for session in incoming {
            let entry = Entry {
                session,
                warned: None,
            };
            held += shared.file(wheel, entry, now_tick, &mut pass);
        }
        shared.finish(pass);
    }
}

/// The sessions in the task's hands: its wheel, and those tracked but not
/// filed yet. When the task ends (a shutdown, the monitor's last handle
/// dropped, or its runtime going away), the monitor refuses tracks from
/// then on, and each session still in its hands is let go untracked: it
/// keeps its expiry and another monitor may track it.
struct Hands<S: SessionStore> {
    shared: Arc<Shared<S>>,
    wheel: Option<Wheel<Entry<S::Payload>>>,
}

impl<S: SessionStore> Drop for Hands<S> {
    fn drop(&mut self) {
        let incoming = {
            // Under `incoming`, as `shutdown` does: no track lands after.
            let mut incoming = self.shared.incoming.lock();
            self.shared.stopped.store(true, Ordering::Release);
            std::mem::take(&mut *incoming)
        };
        let wheel = self.wheel.take().into_iter().flat_map(Wheel::into_entries);
        // No lock held: dropping a handle may run a payload's `Drop`
        // (each contained: every other session is still untracked).
        let sessions = wheel.map(|entry| entry.session).chain(incoming);
        let untracked = sessions.inspect(|session| session.untrack_expiry());
        crate::contain::drop_each_logged(untracked, "expiry monitor");
    }
}

impl<S: SessionStore> Shared<S> {
    /// Files `entry` in the wheel (returns 1), or lets it leave (0): due,
    /// closed, terminating or cleared.
    fn file(
        &self,
        wheel: &mut Wheel<Entry<S::Payload>>,
        mut entry: Entry<S::Payload>,
        now_tick: u64,
        pass: &mut Pass<S::Payload>,
    ) -> usize {
        loop {
            let seen = entry.session.expiry();
            match self.place(entry, seen, now_tick, pass) {
                Placed::At(entry, tick) => {
                    wheel.insert(entry, tick);
                    return 1;
                }
                Placed::Gone => return 0,
                // Extended since it was read: look again.
                Placed::Extended(again) => entry = again,
            }
        }
    }

    /// Whether a swept entry stays in the wheel: its session is still
    /// `Active` with an expiry to come (the monitor's own decisions aside,
    /// which take the entry out first).
    fn keeps(session: &Session<S::Payload>) -> bool {
        let seen = session.expiry();
        session.state() == SessionState::Active
            && seen.at(session.created_at()).is_some()
            && !seen.is_expired()
    }

    /// Where `entry` goes, its session's expiry read as `seen`: a tick of
    /// the wheel, or out (into `pass.due` if this call expired it, with a
    /// compare-exchange against `seen`); back to the caller if an
    /// extension landed since `seen` was read.
    fn place(
        &self,
        mut entry: Entry<S::Payload>,
        seen: ExpirySnapshot,
        now_tick: u64,
        pass: &mut Pass<S::Payload>,
    ) -> Placed<S::Payload> {
        let session = &entry.session;
        let at = seen.at(session.created_at());
        let (Some(at), SessionState::Active, false) = (at, session.state(), seen.is_expired())
        else {
            self.counters.leave(1);
            pass.left.push(entry.session);
            return Placed::Gone;
        };
        let expiry_tick = self.tick_after(at);
        if now_tick >= expiry_tick {
            if !session.expire(seen) {
                return Placed::Extended(entry);
            }
            self.counters.leave(1);
            pass.due.push(entry.session);
            return Placed::Gone;
        }
        if self.config.warn_before.is_zero() || entry.warned == Some(seen) {
            return Placed::At(entry, expiry_tick);
        }
        let warn_tick = at
            .checked_sub(self.config.warn_before)
            .map_or(0, |from| self.tick_of(from));
        if now_tick < warn_tick {
            return Placed::At(entry, warn_tick);
        }
        pass.warnings.push(Event::SessionExpiringSoon {
            session: session.id(),
            router: session.router(),
            incarnation: session.incarnation(),
            expires_at: at,
        });
        entry.warned = Some(seen);
        Placed::At(entry, expiry_tick)
    }

    /// Publishes the pass's warnings and hands its due sessions to a
    /// close task (one per tick with expiries, never one per session).
    fn finish(self: &Arc<Self>, pass: Pass<S::Payload>) {
        let Pass {
            due,
            left,
            warnings,
            fires,
        } = pass;
        crate::contain::drop_each_logged(left, "expiry monitor");
        Counters::add(&self.counters.timer_fires, fires);
        Counters::add(&self.counters.warned, warnings.len());
        for warning in warnings {
            emit(self.config.bus.as_ref(), || warning);
        }
        if !due.is_empty() {
            let shared = Arc::clone(self);
            self.tracker.spawn(async move { shared.expire(due).await });
        }
    }

    /// Closes the sessions found due with [`CloseReason::Expired`]
    /// (resources through the reclaim queue if there is one) and removes
    /// them from the store. One that closed or was marked `Terminating`
    /// since is left to whoever did it.
    async fn expire(&self, due: Vec<Session<S::Payload>>) {
        // Let go each with its payload's `Drop` contained, also if this
        // task is dropped with its runtime while it closes them.
        let due = crate::contain::LetGo::new(due, "expiry monitor");
        let closed = close_and_remove(
            &*self.store,
            self.config.reclaim.as_ref(),
            &due,
            CloseReason::Expired,
            CloseFrom::Active,
        )
        .await;
        Counters::add(&self.counters.expired, closed.len());
        tracing::debug!(expired = closed.len(), due = due.len(), "sessions expired");
    }

    /// Waits until sessions come in; `false` if the monitor stopped first.
    async fn idle(&self) -> bool {
        if !self.incoming.lock().is_empty() {
            return !self.stop.is_cancelled();
        }
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = self.arrival.notified() => true,
        }
    }

    /// Sleeps until `until`; `false` if the monitor stopped first.
    async fn sleep(&self, until: Instant) -> bool {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep_until(until) => true,
        }
    }

    fn tick_nanos(&self) -> u128 {
        self.config.tick.as_nanos().max(1)
    }

    /// The tick `at` falls in (ticks start at the epoch).
    fn tick_of(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos / self.tick_nanos()).unwrap_or(u64::MAX)
    }

    /// The first tick that starts at or after `at`: an expiry's.
    fn tick_after(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos.div_ceil(self.tick_nanos())).unwrap_or(u64::MAX)
    }

    /// When `tick` starts.
    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick).saturating_mul(self.tick_nanos());
        let since = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        // Past what the clock holds: ticks come from `now`, so never in
        // practice; a tick from now keeps the loop going.
        self.epoch
            .checked_add(since)
            .unwrap_or_else(|| Instant::now() + self.config.tick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expiry::ExpiryMonitor;
    use crate::id::{Incarnation, RouterId, SessionId};
    use crate::session::NewSession;
    use crate::store::MemoryStore;

    fn pass() -> Pass<()> {
        Pass {
            due: Vec::new(),
            left: Vec::new(),
            warnings: Vec::new(),
            fires: 0,
        }
    }

    /// The window the monitor task cannot be caught in from outside: an
    /// extension between its read of the expiry and its decision.
    #[tokio::test(start_paused = true)]
    async fn an_extension_after_the_read_sends_the_entry_back_instead_of_expiring_it() {
        let monitor = ExpiryMonitor::builder()
            .build(Arc::new(MemoryStore::new()))
            .unwrap();
        let shared = &monitor.shared;
        let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .expires_in(Duration::from_secs(1))
            .into_session();
        tokio::time::advance(Duration::from_secs(2)).await;
        let now_tick = shared.tick_of(Instant::now());
        let entry = |session: &Session<()>| Entry {
            session: session.clone(),
            warned: None,
        };

        let stale = session.expiry(); // due
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(session.extend_expiry(later), Ok(()));
        let mut found = pass();
        let placed = shared.place(entry(&session), stale, now_tick, &mut found);
        assert!(
            matches!(placed, Placed::Extended(_)),
            "expired against a stale read"
        );
        assert!(found.due.is_empty());
        assert_eq!(session.extend_expiry(later), Ok(()), "not marked expired");

        // Placed again against a fresh read: filed at its warning.
        let placed = shared.place(entry(&session), session.expiry(), now_tick, &mut found);
        let Placed::At(_, tick) = placed else {
            panic!("not filed");
        };
        assert!(tick > now_tick);
        // And with a read that is still current, a due session expires.
        let due = NewSession::new(SessionId::new(2), RouterId::new(1), Incarnation::new(1))
            .expires_in(Duration::ZERO)
            .into_session();
        let placed = shared.place(entry(&due), due.expiry(), now_tick, &mut found);
        assert!(matches!(placed, Placed::Gone));
        assert_eq!(found.due.len(), 1);
        assert!(due.extend_expiry(later).is_err());
    }

    /// A deletion that marks the session between the task's decision and
    /// the close keeps it: the expiry closes only `Active` sessions.
    #[tokio::test(start_paused = true)]
    async fn a_session_marked_terminating_after_it_was_found_due_is_left_to_its_deletion() {
        let store = Arc::new(MemoryStore::new());
        let monitor = ExpiryMonitor::builder().build(Arc::clone(&store)).unwrap();
        let router = RouterId::new(1);
        let incarnation = crate::SessionStore::register_router(&*store, router)
            .await
            .unwrap();
        let spec =
            NewSession::new(SessionId::new(1), router, incarnation).expires_in(Duration::ZERO);
        let session = crate::SessionStore::create(&*store, spec).await.unwrap();
        let released = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&released);
        session
            .attach(move |_: CloseReason| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
            .unwrap();
        let shared = &monitor.shared;
        let mut found = pass();
        let entry = Entry {
            session: session.clone(),
            warned: None,
        };
        let placed = shared.place(
            entry,
            session.expiry(),
            shared.tick_of(Instant::now()),
            &mut found,
        );
        assert!(matches!(placed, Placed::Gone) && found.due.len() == 1);
        assert!(
            session.begin_terminating().won(),
            "its router's deletion marks it"
        );
        shared.expire(found.due).await;
        assert_eq!(session.state(), SessionState::Terminating);
        assert_eq!(released.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(monitor.stats().expired, 0);
        assert!(
            crate::SessionStore::get(&*store, session.id())
                .await
                .unwrap()
                .is_some()
        );
    }
}
