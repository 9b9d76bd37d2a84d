//! proptest strategies: ids, sessions, fake behaviours and scripts, and
//! whole operation sequences.

use proptest::collection::vec;
use proptest::prelude::*;
use tokio::time::Duration;

use super::fakes::{Notify, Probe};
use super::model::{Op, OpKind, OpWeights, Space};
use super::script::{Script, Subset};
use crate::{CloseReason, Incarnation, NewSession, RouterId, Session, SessionId};

/// How many cases a property test runs: `PROPTEST_CASES` if set (for a
/// longer search: `PROPTEST_CASES=20000 cargo test`), `default` otherwise.
///
/// # Example
///
/// ```
/// use proptest::test_runner::Config;
/// use session_lifecycle::test_util::strategy::cases;
///
/// let config = Config { cases: cases(1_000), ..Config::default() };
/// assert!(config.cases > 0);
/// ```
#[must_use]
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default)
}

/// Router ids `0..routers`: a small space, so operations collide.
///
/// # Example
///
/// ```
/// use proptest::prelude::*;
/// use session_lifecycle::test_util::strategy::router_id;
///
/// proptest!(|(router in router_id(4))| assert!(router.get() < 4));
/// ```
pub fn router_id(routers: u64) -> impl Strategy<Value = RouterId> + Clone {
    (0..routers.max(1)).prop_map(RouterId::new)
}

/// Session ids `0..sessions`: a small space, so ids get reused.
pub fn session_id(sessions: u64) -> impl Strategy<Value = SessionId> + Clone {
    (0..sessions.max(1)).prop_map(SessionId::new)
}

/// Any close reason a controller gives.
pub fn close_reason() -> impl Strategy<Value = CloseReason> + Clone {
    prop_oneof![
        Just(CloseReason::ClientClosed),
        Just(CloseReason::RouterDeleted),
        Just(CloseReason::Forced),
        Just(CloseReason::LivenessTimeout),
        Just(CloseReason::RouterLost),
        Just(CloseReason::Reclaimed),
    ]
}

/// A session to create: its id, router, token, payload and the traffic it
/// will carry.
///
/// # Example
///
/// ```
/// use proptest::prelude::*;
/// use session_lifecycle::test_util::strategy::session_spec;
/// use session_lifecycle::{Incarnation, SessionId};
///
/// proptest!(|(spec in session_spec(3, 100, any::<String>()))| {
///     let session = spec.new_session(Incarnation::new(1)).into_session();
///     spec.record_traffic(&session);
///     assert_eq!(session.traffic().bytes_in, spec.traffic_in.iter().sum::<u64>());
///     assert!(session.id() < SessionId::new(100));
/// });
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionSpec<P> {
    /// The session's id.
    pub id: SessionId,
    /// Its router.
    pub router: RouterId,
    /// Its secret token (may be empty).
    pub token: Vec<u8>,
    /// Its payload.
    pub payload: P,
    /// Packet sizes received from the client.
    pub traffic_in: Vec<u64>,
    /// Packet sizes sent to the client.
    pub traffic_out: Vec<u64>,
}

impl<P: Clone> SessionSpec<P> {
    /// The description to create it with, in `incarnation` of its router.
    #[must_use]
    pub fn new_session(&self, incarnation: Incarnation) -> NewSession<P> {
        NewSession::new(self.id, self.router, incarnation)
            .token(self.token.clone())
            .payload(self.payload.clone())
    }

    /// Counts the spec's packets on `session`.
    pub fn record_traffic<Q>(&self, session: &Session<Q>) {
        for &bytes in &self.traffic_in {
            session.record_in(bytes);
        }
        for &bytes in &self.traffic_out {
            session.record_out(bytes);
        }
    }
}

/// Sessions on routers `0..routers` with ids `0..sessions`, a token of up
/// to 32 bytes, a payload drawn from `payload`, and up to 8 packets each
/// way of up to 64 KiB.
pub fn session_spec<P: std::fmt::Debug + Clone>(
    routers: u64,
    sessions: u64,
    payload: impl Strategy<Value = P>,
) -> impl Strategy<Value = SessionSpec<P>> {
    let packets = || vec(0..65_536u64, 0..8);
    (
        session_id(sessions),
        router_id(routers),
        vec(any::<u8>(), 0..32),
        payload,
        packets(),
        packets(),
    )
        .prop_map(
            |(id, router, token, payload, traffic_in, traffic_out)| SessionSpec {
                id,
                router,
                token,
                payload,
                traffic_in,
                traffic_out,
            },
        )
}

/// Which sessions a fake answers for: all, none, the even or odd ids, or a
/// share drawn per round.
pub fn subset() -> impl Strategy<Value = Subset> + Clone {
    prop_oneof![
        3 => Just(Subset::All),
        1 => Just(Subset::None),
        1 => Just(Subset::EvenIds),
        1 => Just(Subset::OddIds),
        2 => (0..=1_000u16, any::<u64>())
            .prop_map(|(per_mille, seed)| Subset::PerMille { per_mille, seed }),
    ]
}

fn delay() -> impl Strategy<Value = Duration> + Clone {
    (1..2_000u64).prop_map(Duration::from_millis)
}

/// Any notifier behaviour: confirm (a subset), slow, later, error, never,
/// panic.
pub fn notify() -> impl Strategy<Value = Notify> + Clone {
    prop_oneof![
        4 => subset().prop_map(Notify::Confirm),
        1 => (delay(), subset()).prop_map(|(delay, confirm)| Notify::Slow { delay, confirm }),
        1 => (delay(), subset()).prop_map(|(delay, confirm)| Notify::Later { delay, confirm }),
        1 => Just(Notify::Error),
        1 => Just(Notify::Never),
        1 => Just(Notify::Panic),
    ]
}

/// Any prober behaviour: answer (a subset), slow, error, never, panic.
pub fn probe() -> impl Strategy<Value = Probe> + Clone {
    prop_oneof![
        4 => subset().prop_map(Probe::Answer),
        1 => (delay(), subset()).prop_map(|(delay, answer)| Probe::Slow { delay, answer }),
        1 => Just(Probe::Error),
        1 => Just(Probe::Never),
        1 => Just(Probe::Panic),
    ]
}

/// A script of up to `calls` behaviours drawn from `behaviour` for the
/// first calls, then one more for every later call.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use proptest::prelude::*;
/// use session_lifecycle::{MemoryStore, RouterDeleter, RouterId};
/// use session_lifecycle::test_util::{HOUR, ObservedRouter, ScriptedNotifier, report_within, run_paused};
/// use session_lifecycle::test_util::strategy::{notify, script};
///
/// proptest!(ProptestConfig::with_cases(16), |(script in script(notify(), 4))| {
///     run_paused(async {
///         let store = Arc::new(MemoryStore::new());
///         let observed = ObservedRouter::fill(&*store, RouterId::new(1), 0, 10).await;
///         let notifier = ScriptedNotifier::new(Arc::clone(&store), script);
///         let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
///         // Whatever the router does, the deletion ends (I4) and leaves nothing (I1).
///         report_within(HOUR, deleter.delete(RouterId::new(1))).await;
///         observed.assert_deleted(&*store).await;
///     });
/// });
/// ```
pub fn script<B, St>(behaviour: St, calls: usize) -> impl Strategy<Value = Script<B>>
where
    B: Clone + std::fmt::Debug,
    St: Strategy<Value = B> + Clone,
{
    (vec(behaviour.clone(), 0..=calls), behaviour)
        .prop_map(|(calls, then)| Script::calls(calls, then))
}

/// One operation, drawn with `weights` over the ids of `space`.
///
/// Creates name a stale incarnation 15% of the time, finishes 20%, and
/// reconnects 15%; a reconnect reports up to `space.sessions` ids. If every
/// weight is 0, only registrations are drawn.
pub fn op(space: Space, weights: &OpWeights) -> impl Strategy<Value = Op> + Clone + use<> {
    let router = router_id(space.routers);
    let session = session_id(space.sessions);
    let stale = |p: f64| proptest::bool::weighted(p);
    let mut arms: Vec<(u32, BoxedStrategy<Op>)> = Vec::new();
    for kind in OpKind::ALL {
        let weight = weights.weight(kind);
        if weight == 0 {
            continue;
        }
        let arm = match kind {
            OpKind::Register => router.clone().prop_map(Op::Register).boxed(),
            OpKind::Create => (session.clone(), router.clone(), stale(0.15))
                .prop_map(|(session, router, stale)| Op::Create {
                    session,
                    router,
                    stale,
                })
                .boxed(),
            OpKind::Heartbeat => session.clone().prop_map(Op::Heartbeat).boxed(),
            OpKind::Close => (session.clone(), close_reason())
                .prop_map(|(session, reason)| Op::Close { session, reason })
                .boxed(),
            OpKind::CloseHandle => session.clone().prop_map(Op::CloseHandle).boxed(),
            OpKind::Terminate => session.clone().prop_map(Op::Terminate).boxed(),
            OpKind::Remove => session.clone().prop_map(Op::Remove).boxed(),
            OpKind::Fence => router.clone().prop_map(Op::Fence).boxed(),
            OpKind::Finish => (router.clone(), stale(0.2))
                .prop_map(|(router, stale)| Op::Finish { router, stale })
                .boxed(),
            OpKind::Delete => router.clone().prop_map(Op::Delete).boxed(),
            OpKind::DeleteIncarnation => (router.clone(), stale(0.3))
                .prop_map(|(router, stale)| Op::DeleteIncarnation { router, stale })
                .boxed(),
            OpKind::Confirm => (session.clone(), stale(0.3))
                .prop_map(|(session, stale)| Op::Confirm { session, stale })
                .boxed(),
            OpKind::Disconnect => router.clone().prop_map(Op::Disconnect).boxed(),
            OpKind::Reconnect => {
                let ids = usize::try_from(space.sessions).unwrap_or(usize::MAX);
                (
                    router.clone(),
                    vec(session.clone(), 0..=ids.min(64)),
                    stale(0.15),
                )
                    .prop_map(|(router, mut report, stale)| {
                        report.sort_unstable();
                        report.dedup();
                        Op::Reconnect {
                            router,
                            report,
                            stale,
                        }
                    })
                    .boxed()
            }
        };
        arms.push((weight, arm));
    }
    if arms.is_empty() {
        arms.push((1, router.prop_map(Op::Register).boxed()));
    }
    // proptest needs the weights' sum to fit a `u32`: scale big ones down,
    // keeping each at least 1.
    let total: u64 = arms.iter().map(|(weight, _)| u64::from(*weight)).sum();
    if total > u64::from(u32::MAX) {
        let divisor = total.div_ceil(u64::from(u32::MAX) / 2);
        for (weight, _) in &mut arms {
            *weight = u32::try_from(u64::from(*weight) / divisor)
                .unwrap_or(u32::MAX)
                .max(1);
        }
    }
    proptest::strategy::Union::new_weighted(arms)
}

/// A sequence of `len` operations (a range), each drawn by [`op`].
///
/// # Panics
///
/// If `len` is empty (`5..5`), as proptest's `vec` does.
///
/// # Example
///
/// ```
/// use proptest::prelude::*;
/// use session_lifecycle::test_util::model::{ModelState, OpWeights, Space};
/// use session_lifecycle::test_util::strategy::ops;
///
/// proptest!(|(ops in ops(Space::default(), &OpWeights::controller(), 1..32))| {
///     let mut model = ModelState::default();
///     for op in &ops {
///         model.apply(op);
///     }
///     prop_assert!(model.stored_count() <= 12);
/// });
/// ```
pub fn ops(
    space: Space,
    weights: &OpWeights,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Op>> + use<> {
    vec(op(space, weights), len)
}
