//! The reference model: what a store, a deleter and a reconciler must do,
//! written as plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;

use proptest::prelude::*;
use proptest_state_machine::ReferenceStateMachine;

use crate::{CloseReason, RouterId, SessionId, SessionState};

/// One operation of a test sequence, in a controller's words.
///
/// `stale` operations name an incarnation that is certainly not the
/// router's live one (an earlier life's, or one below the current): the
/// system under test picks it, the model only knows it is stale.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Register the router (a new life after its deletion).
    Register(RouterId),
    /// Create a session on the router, in its current incarnation or a
    /// stale one.
    Create {
        /// The session.
        session: SessionId,
        /// Its router.
        router: RouterId,
        /// Whether to use a stale incarnation.
        stale: bool,
    },
    /// A heartbeat for the session id, as off the wire.
    Heartbeat(SessionId),
    /// Close the session through the store.
    Close {
        /// The session.
        session: SessionId,
        /// Why.
        reason: CloseReason,
    },
    /// Close the latest handle of the session directly, leaving it in the
    /// store (a client that hung up, seen by the data plane).
    CloseHandle(SessionId),
    /// Mark the latest handle of the session `Terminating`.
    Terminate(SessionId),
    /// Remove the session from the store.
    Remove(SessionId),
    /// Fence the router: a deletion's first step, alone (a controller that
    /// stopped right after it; a later [`Op::Delete`] resumes it).
    Fence(RouterId),
    /// Finish the router's deletion (a deletion's last step, alone).
    Finish {
        /// The router.
        router: RouterId,
        /// Whether to name a stale incarnation.
        stale: bool,
    },
    /// Delete the router, to the end.
    Delete(RouterId),
    /// A request to delete one incarnation of the router, to the end
    /// ([`RouterDeleter::delete_incarnation`](crate::RouterDeleter::delete_incarnation)).
    /// A stale request (late or duplicated: it names an earlier life)
    /// deletes nothing.
    DeleteIncarnation {
        /// The router.
        router: RouterId,
        /// Whether the request names a stale incarnation.
        stale: bool,
    },
    /// A router's confirmation that the session closed, by its key
    /// ([`SessionStore::close_exact`](crate::SessionStore::close_exact)
    /// with [`CloseReason::RouterDeleted`]). A stale confirmation (late or
    /// duplicated: about an earlier session that had the id) closes
    /// nothing.
    Confirm {
        /// The session.
        session: SessionId,
        /// Whether the confirmation is about an earlier life of the id.
        stale: bool,
    },
    /// The router disconnects and stays away past its grace period.
    Disconnect(RouterId),
    /// The router (re)connects and reports the sessions it holds: every
    /// stored `Active` session of it that the report leaves out is closed,
    /// and its sessions closed already (through their handles) are removed.
    Reconnect {
        /// The router.
        router: RouterId,
        /// The sessions it reports.
        report: Vec<SessionId>,
        /// Whether it reports from a stale incarnation.
        stale: bool,
    },
}

/// The kinds of [`Op`], to weigh them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum OpKind {
    /// [`Op::Register`].
    Register,
    /// [`Op::Create`].
    Create,
    /// [`Op::Heartbeat`].
    Heartbeat,
    /// [`Op::Close`].
    Close,
    /// [`Op::CloseHandle`].
    CloseHandle,
    /// [`Op::Terminate`].
    Terminate,
    /// [`Op::Remove`].
    Remove,
    /// [`Op::Fence`].
    Fence,
    /// [`Op::Finish`].
    Finish,
    /// [`Op::Delete`].
    Delete,
    /// [`Op::DeleteIncarnation`].
    DeleteIncarnation,
    /// [`Op::Confirm`].
    Confirm,
    /// [`Op::Disconnect`].
    Disconnect,
    /// [`Op::Reconnect`].
    Reconnect,
}

impl OpKind {
    /// Every kind.
    pub const ALL: [OpKind; 14] = [
        Self::Register,
        Self::Create,
        Self::Heartbeat,
        Self::Close,
        Self::CloseHandle,
        Self::Terminate,
        Self::Remove,
        Self::Fence,
        Self::Finish,
        Self::Delete,
        Self::DeleteIncarnation,
        Self::Confirm,
        Self::Disconnect,
        Self::Reconnect,
    ];
}

/// How often each kind of operation is drawn, relative to the others.
///
/// # Example
///
/// ```
/// use session_lifecycle::test_util::model::{OpKind, OpWeights};
///
/// // What a controller does, with deletions twice as often.
/// let weights = OpWeights::controller().with(OpKind::Delete, 4);
/// assert_eq!(weights.weight(OpKind::Delete), 4);
/// assert_eq!(weights.weight(OpKind::Fence), 0);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpWeights {
    weights: BTreeMap<OpKind, u32>,
}

impl OpWeights {
    /// No operation at all; add kinds with [`with`](Self::with).
    #[must_use]
    pub fn none() -> Self {
        Self {
            weights: BTreeMap::new(),
        }
    }

    /// What a controller does: register, create, heartbeat, close, a
    /// router's confirmation (current or stale), delete, delete one
    /// incarnation (current or stale), disconnect, reconnect (weights 2, 6,
    /// 2, 3, 1, 2, 1, 1, 1).
    #[must_use]
    pub fn controller() -> Self {
        Self::none()
            .with(OpKind::Register, 2)
            .with(OpKind::Create, 6)
            .with(OpKind::Heartbeat, 2)
            .with(OpKind::Close, 3)
            .with(OpKind::Confirm, 1)
            .with(OpKind::Delete, 2)
            .with(OpKind::DeleteIncarnation, 1)
            .with(OpKind::Disconnect, 1)
            .with(OpKind::Reconnect, 1)
    }

    /// Every operation, the store's single steps (fence, finish, remove,
    /// handle closes) included: the crate's own model test.
    #[must_use]
    pub fn everything() -> Self {
        Self::controller()
            .with(OpKind::Close, 2)
            .with(OpKind::CloseHandle, 1)
            .with(OpKind::Terminate, 1)
            .with(OpKind::Remove, 1)
            .with(OpKind::Fence, 2)
            .with(OpKind::Finish, 2)
    }

    /// Sets `kind`'s weight (0 leaves it out).
    #[must_use]
    pub fn with(mut self, kind: OpKind, weight: u32) -> Self {
        self.weights.insert(kind, weight);
        self
    }

    /// `kind`'s weight.
    #[must_use]
    pub fn weight(&self, kind: OpKind) -> u32 {
        self.weights.get(&kind).copied().unwrap_or(0)
    }
}

impl Default for OpWeights {
    /// [`OpWeights::everything`].
    fn default() -> Self {
        Self::everything()
    }
}

/// The ids operations draw from: small, so they collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Space {
    /// Router ids `0..routers`.
    pub routers: u64,
    /// Session ids `0..sessions`.
    pub sessions: u64,
}

impl Space {
    /// `routers` routers and `sessions` session ids (each at least 1).
    #[must_use]
    pub fn new(routers: u64, sessions: u64) -> Self {
        Self {
            routers: routers.max(1),
            sessions: sessions.max(1),
        }
    }
}

impl Default for Space {
    /// 3 routers, 12 session ids.
    fn default() -> Self {
        Self::new(3, 12)
    }
}

/// Where a router is in one life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Registered; sessions may be created.
    Live,
    /// Its deletion started.
    Fenced,
    /// Deleted.
    Deleted,
}

/// A router in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterModel {
    /// Its phase.
    pub phase: Phase,
    /// Which life this is: 1 after its first registration, 2 after its
    /// first deletion and registration again, ...
    pub life: usize,
}

/// The latest session created with an id, in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionModel {
    /// Its router.
    pub router: RouterId,
    /// The router's life it was created in.
    pub life: usize,
    /// Its state.
    pub state: SessionState,
    /// Whether the store holds it.
    pub stored: bool,
}

/// The model's state: routers and the latest session of each id.
///
/// [`apply`](Self::apply) is the specification: what each [`Op`] does when
/// the system under test is correct. A test runs the same op on its system
/// and compares.
///
/// # Example
///
/// ```
/// use session_lifecycle::{RouterId, SessionId, SessionState};
/// use session_lifecycle::test_util::model::{ModelState, Op, Phase};
///
/// let mut model = ModelState::default();
/// let (router, session) = (RouterId::new(0), SessionId::new(1));
/// model.apply(&Op::Register(router));
/// model.apply(&Op::Create { session, router, stale: false });
/// model.apply(&Op::Fence(router));
/// // Refused after the fence (I2): the model does not change.
/// model.apply(&Op::Create { session: SessionId::new(2), router, stale: false });
/// assert_eq!(model.stored_of(router).len(), 1);
///
/// model.apply(&Op::Delete(router));
/// assert_eq!(model.router(router).unwrap().phase, Phase::Deleted);
/// assert_eq!(model.session(session).unwrap().state, SessionState::Closed);
/// assert!(model.stored_of(router).is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelState {
    routers: BTreeMap<RouterId, RouterModel>,
    sessions: BTreeMap<SessionId, SessionModel>,
}

impl ModelState {
    /// The router, if it was ever registered.
    #[must_use]
    pub fn router(&self, router: RouterId) -> Option<&RouterModel> {
        self.routers.get(&router)
    }

    /// Every router ever registered.
    pub fn routers(&self) -> impl Iterator<Item = (RouterId, &RouterModel)> {
        self.routers.iter().map(|(id, r)| (*id, r))
    }

    /// The latest session created with the id, if any.
    #[must_use]
    pub fn session(&self, session: SessionId) -> Option<&SessionModel> {
        self.sessions.get(&session)
    }

    /// The latest session of every id ever created.
    pub fn sessions(&self) -> impl Iterator<Item = (SessionId, &SessionModel)> {
        self.sessions.iter().map(|(id, s)| (*id, s))
    }

    /// Whether the store holds a session with the id.
    #[must_use]
    pub fn is_stored(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| s.stored)
    }

    /// The sessions the store holds for the router.
    #[must_use]
    pub fn stored_of(&self, router: RouterId) -> BTreeSet<SessionId> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.stored && s.router == router)
            .map(|(id, _)| *id)
            .collect()
    }

    /// How many sessions the store holds.
    #[must_use]
    pub fn stored_count(&self) -> usize {
        self.sessions.values().filter(|s| s.stored).count()
    }

    fn phase(&self, router: RouterId) -> Option<Phase> {
        self.routers.get(&router).map(|r| r.phase)
    }

    /// Applies `op` as a correct system does.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Register(router) => self.register(*router),
            &Op::Create {
                session,
                router,
                stale,
            } => {
                let live = self.routers.get(&router).filter(|r| r.phase == Phase::Live);
                if let Some(&RouterModel { life, .. }) = live
                    && !stale
                    && !self.is_stored(session)
                {
                    self.sessions.insert(
                        session,
                        SessionModel {
                            router,
                            life,
                            state: SessionState::Active,
                            stored: true,
                        },
                    );
                }
            }
            Op::Heartbeat(_) => {}
            Op::Close { session, .. }
            | Op::Remove(session)
            | Op::Confirm {
                session,
                stale: false,
            } => {
                if let Some(s) = self.sessions.get_mut(session).filter(|s| s.stored) {
                    s.state = SessionState::Closed;
                    s.stored = false;
                }
            }
            Op::CloseHandle(session) => {
                if let Some(s) = self.sessions.get_mut(session) {
                    s.state = SessionState::Closed;
                }
            }
            Op::Terminate(session) => {
                if let Some(s) = self
                    .sessions
                    .get_mut(session)
                    .filter(|s| s.state == SessionState::Active)
                {
                    s.state = SessionState::Terminating;
                }
            }
            Op::Fence(router) => {
                if let Some(r) = self
                    .routers
                    .get_mut(router)
                    .filter(|r| r.phase == Phase::Live)
                {
                    r.phase = Phase::Fenced;
                }
            }
            Op::Delete(router)
            | Op::DeleteIncarnation {
                router,
                stale: false,
            } => {
                if matches!(self.phase(*router), Some(Phase::Live | Phase::Fenced)) {
                    self.delete(*router);
                }
            }
            // Late or duplicated: about an earlier life, which is gone.
            Op::Confirm { stale: true, .. } | Op::DeleteIncarnation { stale: true, .. } => {}
            &Op::Finish { router, stale } => {
                if !stale && self.phase(router) == Some(Phase::Fenced) {
                    self.delete(router);
                }
            }
            Op::Disconnect(router) => {
                if self.phase(*router) == Some(Phase::Live) {
                    let lost = self.active_of(*router);
                    self.close_all(&lost);
                }
            }
            Op::Reconnect {
                router,
                report,
                stale,
            } => {
                if !stale && self.phase(*router) == Some(Phase::Live) {
                    let lost: Vec<SessionId> = self
                        .active_of(*router)
                        .into_iter()
                        .filter(|id| !report.contains(id))
                        .collect();
                    self.close_all(&lost);
                    // Sessions closed through their handles leave the store.
                    let closed: Vec<SessionId> = self
                        .stored_of(*router)
                        .into_iter()
                        .filter(|id| self.sessions[id].state == SessionState::Closed)
                        .collect();
                    self.close_all(&closed);
                }
            }
        }
    }

    fn register(&mut self, router: RouterId) {
        match self.routers.get_mut(&router) {
            None => {
                self.routers.insert(
                    router,
                    RouterModel {
                        phase: Phase::Live,
                        life: 1,
                    },
                );
            }
            Some(r) if r.phase == Phase::Deleted => {
                r.phase = Phase::Live;
                r.life += 1;
            }
            Some(_) => {}
        }
    }

    /// The router's incarnation ends: every stored session of it is closed
    /// and gone.
    fn delete(&mut self, router: RouterId) {
        if let Some(r) = self.routers.get_mut(&router) {
            r.phase = Phase::Deleted;
        }
        let gone: Vec<SessionId> = self.stored_of(router).into_iter().collect();
        self.close_all(&gone);
    }

    /// The stored `Active` sessions of the router, by id.
    #[must_use]
    pub fn active_of(&self, router: RouterId) -> Vec<SessionId> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.stored && s.router == router && s.state == SessionState::Active)
            .map(|(id, _)| *id)
            .collect()
    }

    fn close_all(&mut self, ids: &[SessionId]) {
        for id in ids {
            if let Some(s) = self.sessions.get_mut(id) {
                s.state = SessionState::Closed;
                s.stored = false;
            }
        }
    }
}

/// The ids and weights a [`StoreModel`] draws its operations with.
///
/// # Example
///
/// ```
/// use session_lifecycle::test_util::model::{ModelConfig, OpKind, OpWeights, Space, StoreModel};
///
/// /// Two routers, deletions and reconnects only.
/// struct Churn;
///
/// impl ModelConfig for Churn {
///     fn space() -> Space {
///         Space::new(2, 8)
///     }
///     fn weights() -> OpWeights {
///         OpWeights::none()
///             .with(OpKind::Register, 1)
///             .with(OpKind::Create, 4)
///             .with(OpKind::Delete, 1)
///             .with(OpKind::Reconnect, 1)
///     }
/// }
///
/// type ChurnModel = StoreModel<Churn>;
/// ```
pub trait ModelConfig: 'static {
    /// The ids drawn from.
    fn space() -> Space {
        Space::default()
    }

    /// How often each operation is drawn.
    fn weights() -> OpWeights {
        OpWeights::default()
    }
}

/// The default configuration: [`Space::default`], [`OpWeights::everything`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultConfig;

impl ModelConfig for DefaultConfig {}

/// The reference state machine for `proptest-state-machine`: starts from an
/// empty [`ModelState`], draws [`Op`]s with `C`'s space and weights, and
/// applies them with [`ModelState::apply`]. Every op is allowed in every
/// state (an op a correct system refuses leaves the model as it is), so
/// shrinking may drop any step.
///
/// Pair it with your `StateMachineTest`: see the guide in
/// [`test_util`](super).
#[derive(Debug)]
pub struct StoreModel<C = DefaultConfig>(PhantomData<C>);

impl<C: ModelConfig> ReferenceStateMachine for StoreModel<C> {
    type State = ModelState;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<ModelState> {
        Just(ModelState::default()).boxed()
    }

    fn transitions(_: &ModelState) -> BoxedStrategy<Op> {
        super::strategy::op(C::space(), &C::weights()).boxed()
    }

    fn apply(mut state: ModelState, op: &Op) -> ModelState {
        state.apply(op);
        state
    }
}
