//! A single-level timing wheel with lazy re-arm, shared by the liveness
//! monitor (heartbeat deadlines) and the expiry monitor (expiries).
//!
//! # Invariants
//!
//! - An entry inserted for tick `t` sits in slot `t mod N` and is handed
//!   out by [`Wheel::advance`] at tick `t` at the latest (earlier only when its
//!   deadline lies beyond the wheel's span; the caller re-arms it then).
//! - Every slot is handed out once per pass, in tick order.
//!
//! Entries carry no deadline: the caller computes it from the session when
//! the entry comes up, so a heartbeat or an extended expiry never touches
//! the wheel.
//!
//! A wheel whose entries can go stale long before they come up (the expiry
//! monitor's: a session closed otherwise hours before its expiry) is
//! [swept](Wheel::sweep) a few slots at a time, on a cursor of its own.

/// The wheel: `N` slots of one tick each, `N` a power of two.
#[derive(Debug)]
pub(crate) struct Wheel<T> {
    slots: Box<[Vec<T>]>,
    /// The last tick handed out.
    cursor: u64,
    /// The next slot [`Wheel::sweep`] looks at.
    swept: usize,
}

impl<T> Wheel<T> {
    /// A wheel of `slots` slots (a power of two, at least 2).
    pub(crate) fn new(slots: u64) -> Self {
        let slots = usize::try_from(slots.next_power_of_two().max(2)).unwrap_or(1 << 16);
        Self {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            cursor: 0,
            swept: 0,
        }
    }

    fn span(&self) -> u64 {
        self.slots.len() as u64
    }

    fn index(&self, tick: u64) -> usize {
        // Lossless: the mask keeps the value below `slots.len()`.
        #[allow(clippy::cast_possible_truncation)]
        let index = (tick & (self.span() - 1)) as usize;
        index
    }

    /// Files `entry` for `tick`: past ticks go to the next one, ticks
    /// beyond the span to its last slot.
    pub(crate) fn insert(&mut self, entry: T, tick: u64) {
        let tick = tick.clamp(self.cursor + 1, self.cursor + self.span() - 1);
        let index = self.index(tick);
        self.slots[index].push(entry);
    }

    /// Moves the wheel to `now` and returns the ticks whose slots are due,
    /// to be emptied with [`take`](Self::take) in order. After a jump of
    /// more than the span, each slot comes up once.
    pub(crate) fn advance(&mut self, now: u64) -> std::ops::RangeInclusive<u64> {
        let from = (self.cursor + 1).max(now.saturating_sub(self.span() - 1));
        self.cursor = self.cursor.max(now);
        from..=now
    }

    /// Takes the entries of `tick`'s slot. The slot's memory goes with
    /// them: the slot is not used again for a whole turn of the wheel.
    pub(crate) fn take(&mut self, tick: u64) -> Vec<T> {
        let index = self.index(tick);
        std::mem::take(&mut self.slots[index])
    }

    /// Every entry, slot by slot.
    pub(crate) fn into_entries(self) -> impl Iterator<Item = T> {
        self.slots.into_vec().into_iter().flatten()
    }

    /// Looks at the next `slots` slots after the last sweep (wrapping; at
    /// most one turn) and moves the entries `keep` refuses into `gone`, for
    /// the caller to drop (an entry's drop may be user code): returns how
    /// many went. A slot left empty gives its memory back. Calls of `N / k`
    /// slots sweep every entry once per `k` calls.
    pub(crate) fn sweep(
        &mut self,
        slots: usize,
        mut keep: impl FnMut(&T) -> bool,
        gone: &mut Vec<T>,
    ) -> usize {
        let before = gone.len();
        let span = self.slots.len();
        for _ in 0..slots.min(span) {
            let slot = &mut self.slots[self.swept];
            self.swept = (self.swept + 1) % span;
            let mut at = 0;
            while at < slot.len() {
                if keep(&slot[at]) {
                    at += 1;
                } else {
                    gone.push(slot.swap_remove(at));
                }
            }
            if slot.is_empty() {
                *slot = Vec::new();
            }
        }
        gone.len() - before
    }
}

impl<T> crate::contain::Holds for Wheel<T> {
    type Item = T;
    fn take_into(&mut self, out: &mut Vec<T>) {
        for slot in &mut self.slots {
            out.append(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_up_at_their_tick_and_far_ones_at_the_span() {
        let mut wheel = Wheel::new(8);
        wheel.insert("a", 3);
        wheel.insert("past", 0);
        wheel.insert("far", 100);
        let mut seen = Vec::new();
        for now in 1..=10 {
            for tick in wheel.advance(now) {
                seen.extend(wheel.take(tick).into_iter().map(|e| (tick, e)));
            }
        }
        assert_eq!(seen, [(1, "past"), (3, "a"), (7, "far")]);
    }

    #[test]
    fn sweeps_walk_the_slots_in_turn_and_drop_only_refused_entries() {
        let mut wheel = Wheel::new(8);
        for tick in 1..=7 {
            wheel.insert(tick, tick);
            wheel.insert(tick + 100, tick);
        }
        // Slots 0, 1 and 2 (ticks 1 and 2 have entries): the big ones go.
        let mut gone = Vec::new();
        assert_eq!(wheel.sweep(3, |e| *e < 100, &mut gone), 2);
        assert_eq!(gone, [101, 102]);
        assert_eq!(wheel.take(1), [1]);
        assert_eq!(wheel.take(3), [3, 103], "not swept yet");
        // The rest of the turn and round again: at most one turn a call.
        assert_eq!(wheel.sweep(100, |e| *e < 100, &mut gone), 4);
        assert_eq!(wheel.sweep(8, |e| *e < 100, &mut gone), 0);
        assert_eq!(gone.len(), 6);
        let left: Vec<u64> = (4..=7).flat_map(|t| wheel.take(t)).collect();
        assert_eq!(left, [4, 5, 6, 7]);
    }

    #[test]
    fn a_jump_beyond_the_span_hands_out_each_slot_once() {
        let mut wheel = Wheel::new(4);
        for tick in 1..=3 {
            wheel.insert(tick, tick);
        }
        let due: Vec<u64> = wheel.advance(50).collect();
        assert_eq!(due, [47, 48, 49, 50]);
        let mut seen: Vec<u64> = due.into_iter().flat_map(|t| wheel.take(t)).collect();
        seen.sort_unstable();
        assert_eq!(seen, [1, 2, 3]);
        wheel.insert(9, 10); // in the past now: next tick
        assert_eq!(
            wheel
                .advance(51)
                .flat_map(|t| wheel.take(t))
                .collect::<Vec<_>>(),
            [9]
        );
    }
}
