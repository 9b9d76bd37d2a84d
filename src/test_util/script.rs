//! Scripts: what a fake does on each call.

use std::fmt;
use std::sync::Arc;

use crate::{RouterId, SessionId, SessionKey};

use super::rng::mix;

/// Which sessions of a call a fake router answers for (confirms a
/// termination of, or answers a probe for).
///
/// Every choice is a pure function of the session id and the call's round,
/// so a run does not depend on timing.
///
/// # Example
///
/// ```
/// use session_lifecycle::SessionId;
/// use session_lifecycle::test_util::Subset;
///
/// assert!(Subset::EvenIds.contains(SessionId::new(4), 0));
/// assert!(!Subset::EvenIds.contains(SessionId::new(5), 0));
/// // Ids divisible by 10 never answer:
/// let most = Subset::Filter(|id, _round| id.get() % 10 != 0);
/// assert!(!most.contains(SessionId::new(20), 3));
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Subset {
    /// Every session.
    All,
    /// No session.
    None,
    /// Sessions with an even id.
    EvenIds,
    /// Sessions with an odd id.
    OddIds,
    /// Each session with probability `per_mille / 1000`, drawn afresh for
    /// each round from `seed`, the id and the round.
    PerMille {
        /// Out of 1,000.
        per_mille: u16,
        /// Seeds the draw.
        seed: u64,
    },
    /// Sessions for which the function returns `true`, given the id and the
    /// call's round.
    Filter(fn(SessionId, u32) -> bool),
}

impl PartialEq for Subset {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::All, Self::All)
            | (Self::None, Self::None)
            | (Self::EvenIds, Self::EvenIds)
            | (Self::OddIds, Self::OddIds) => true,
            (
                Self::PerMille { per_mille, seed },
                Self::PerMille {
                    per_mille: other_per_mille,
                    seed: other_seed,
                },
            ) => (per_mille, seed) == (other_per_mille, other_seed),
            // The same function (by address: two copies of one function may
            // compare unequal, never two different functions equal).
            (Self::Filter(a), Self::Filter(b)) => std::ptr::fn_addr_eq(*a, *b),
            _ => false,
        }
    }
}

impl Eq for Subset {}

impl Subset {
    /// Whether the subset holds `id` in `round`.
    #[must_use]
    pub fn contains(&self, id: SessionId, round: u32) -> bool {
        match *self {
            Self::All => true,
            Self::None => false,
            Self::EvenIds => id.get().is_multiple_of(2),
            Self::OddIds => id.get() % 2 == 1,
            Self::PerMille { per_mille, seed } => {
                let draw = mix(seed ^ mix(id.get()) ^ mix(u64::from(round).wrapping_add(1)));
                draw % 1_000 < u64::from(per_mille)
            }
            Self::Filter(keep) => keep(id, round),
        }
    }

    /// The ids of `ids` the subset holds in `round`.
    pub fn pick(&self, ids: &[SessionId], round: u32) -> Vec<SessionId> {
        ids.iter()
            .copied()
            .filter(|&id| self.contains(id, round))
            .collect()
    }

    /// The keys of `keys` whose ids the subset holds in `round`.
    #[must_use]
    pub fn pick_keys(&self, keys: &[SessionKey], round: u32) -> Vec<SessionKey> {
        keys.iter()
            .copied()
            .filter(|key| self.contains(key.id(), round))
            .collect()
    }
}

/// One call to a fake, as its script sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Call {
    /// Calls made before this one on the same fake.
    pub index: u64,
    /// The router of the call.
    pub router: RouterId,
    /// The call's round (the batch's `round`).
    pub round: u32,
    /// Whether this is a first round: round 0 of a deletion's notices,
    /// round 1 of a router's probing.
    pub first_round: bool,
}

/// What a fake does on each call: always the same, a list of behaviours
/// for the first calls then one for the rest, one for first rounds and one
/// for retries, or a function of the [`Call`].
///
/// Scripts are also drawn by proptest: see
/// [`strategy::script`](super::strategy::script).
///
/// # Example
///
/// ```
/// use session_lifecycle::RouterId;
/// use session_lifecycle::test_util::{Call, Notify, Script};
///
/// // Fails the first two calls, then confirms everything.
/// let script = Script::calls([Notify::Error, Notify::Error], Notify::confirm_all());
/// let call = |index| Call::notice(index, RouterId::new(1), 0);
/// assert_eq!(script.pick(call(1)), Notify::Error);
/// assert_eq!(script.pick(call(2)), Notify::confirm_all());
/// ```
pub struct Script<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Always(B),
    Calls { calls: Vec<B>, then: B },
    Rounds { first: B, later: B },
    Fn(Arc<dyn Fn(Call) -> B + Send + Sync>),
}

impl Call {
    /// A notifier's call: its first round is round 0.
    #[must_use]
    pub fn notice(index: u64, router: RouterId, round: u32) -> Self {
        Self {
            index,
            router,
            round,
            first_round: round == 0,
        }
    }

    /// A prober's call: its first round is round 1.
    #[must_use]
    pub fn probe(index: u64, router: RouterId, round: u32) -> Self {
        Self {
            index,
            router,
            round,
            first_round: round <= 1,
        }
    }
}

impl<B: Clone> Script<B> {
    /// The same behaviour on every call.
    #[must_use]
    pub fn always(behaviour: B) -> Self {
        Self {
            kind: Kind::Always(behaviour),
        }
    }

    /// `calls` for the first calls, in order, then `then` for every later
    /// call.
    #[must_use]
    pub fn calls(calls: impl IntoIterator<Item = B>, then: B) -> Self {
        Self {
            kind: Kind::Calls {
                calls: calls.into_iter().collect(),
                then,
            },
        }
    }

    /// `first` for a first round's calls, `later` for retries.
    #[must_use]
    pub fn by_round(first: B, later: B) -> Self {
        Self {
            kind: Kind::Rounds { first, later },
        }
    }

    /// The behaviour `pick` returns for each call.
    #[must_use]
    pub fn from_fn(pick: impl Fn(Call) -> B + Send + Sync + 'static) -> Self {
        Self {
            kind: Kind::Fn(Arc::new(pick)),
        }
    }

    /// The behaviour for `call`.
    #[must_use]
    pub fn pick(&self, call: Call) -> B {
        match &self.kind {
            Kind::Always(behaviour) => behaviour.clone(),
            Kind::Calls { calls, then } => usize::try_from(call.index)
                .ok()
                .and_then(|index| calls.get(index))
                .unwrap_or(then)
                .clone(),
            Kind::Rounds { first, later } => {
                if call.first_round {
                    first.clone()
                } else {
                    later.clone()
                }
            }
            Kind::Fn(pick) => pick(call),
        }
    }
}

impl<B: Clone> Clone for Script<B> {
    fn clone(&self) -> Self {
        let kind = match &self.kind {
            Kind::Always(b) => Kind::Always(b.clone()),
            Kind::Calls { calls, then } => Kind::Calls {
                calls: calls.clone(),
                then: then.clone(),
            },
            Kind::Rounds { first, later } => Kind::Rounds {
                first: first.clone(),
                later: later.clone(),
            },
            Kind::Fn(pick) => Kind::Fn(Arc::clone(pick)),
        };
        Self { kind }
    }
}

impl<B: fmt::Debug> fmt::Debug for Script<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Always(b) => f.debug_tuple("Script::always").field(b).finish(),
            Kind::Calls { calls, then } => f
                .debug_struct("Script::calls")
                .field("calls", calls)
                .field("then", then)
                .finish(),
            Kind::Rounds { first, later } => f
                .debug_struct("Script::by_round")
                .field("first", first)
                .field("later", later)
                .finish(),
            Kind::Fn(_) => f.write_str("Script::from_fn(..)"),
        }
    }
}
