//! [`InvariantChecker`] and the one-off checks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use futures::FutureExt;
use parking_lot::Mutex;

use crate::{
    CloseReason, Incarnation, RouterError, RouterId, RouterStatus, Session, SessionId, SessionKey,
    SessionState, SessionStore,
};

use super::violation::{InvariantReport, Violation};

/// Checks a store's invariants, remembering what it saw between checks.
///
/// One check looks at every router the store reports (its
/// [`census`](SessionStore::census) and every router seen before), every
/// session the store holds, and every handle the checker was given or saw
/// before, and finds:
///
/// - **I1** zombies: sessions stored for a router that is unknown, deleted
///   or in another incarnation; open handles of a deleted incarnation;
///   sessions a deletion closed (a check saw them stored on the fenced
///   incarnation) whose close is not complete once the router is deleted;
///   closed sessions still holding their token.
/// - **I2** sessions of a fenced incarnation that were not in the store at
///   the first check that saw the fence (created after it), and router
///   statuses that went backwards (a smaller incarnation, or `Fenced →
///   Live`, `Deleted → Fenced`).
/// - **I3** states that went backwards, close reasons that changed, and
///   sessions that read `Closed` without a reason.
/// - **I7** the router index against the session map
///   ([`SessionStore::audit`]), each router's count against its listing,
///   and each listed session against [`SessionStore::get`].
///
/// A store call that fails is reported as [`Violation::StoreFailed`]: the
/// report is then not clean, since the check could not look everywhere.
///
/// # Using it well
///
/// - Check after every step of a test: what happened between two checks is
///   only seen through its effects. A session created after a fence in the
///   same step as the fence is not told apart from one created before it,
///   so the fence check needs steps that leave a router fenced (a deletion
///   interrupted after its fence,
///   [`Op::Fence`](crate::test_util::model::Op::Fence)).
/// - Check a quiescent store: between steps, with no task changing it. The
///   check reads the store in several calls (the audit, each router's
///   listing, its count, each session), and a change between two of them
///   can look like an index disagreement. With a store whose handles hear
///   of changes asynchronously (an `EtcdStore` shared by controllers), let
///   the changes arrive first.
/// - The checker keeps every handle it saw, to check them after they left
///   the store: use one checker per test case.
/// - I4 (bounded deletion), I5 (nothing dropped) and I6 (cancel safety) are
///   properties of runs, not of a store's state: see
///   [`report_within`](crate::test_util::report_within) and the deleter's
///   [`max_wait`](crate::RouterDeleter::max_wait).
///
/// # Deadlock safety
///
/// One lock, the checker's memory, never held across an `.await`: a check
/// reads the store first, then takes the lock to compare.
///
/// # Example
///
/// ```
/// use session_lifecycle::{MemoryStore, NewSession, RouterId, SessionId, SessionStore};
/// use session_lifecycle::test_util::{InvariantChecker, run_paused};
///
/// run_paused(async {
///     let store = MemoryStore::new();
///     let checker = InvariantChecker::new();
///     let router = RouterId::new(1);
///     let incarnation = store.register_router(router).await.unwrap();
///     let session = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await.unwrap();
///     checker.track(&session);
///     checker.assert(&store).await;
///
///     let _ = store.fence(router).await.unwrap();
///     store.finish(router, incarnation).await.unwrap();
///     let report = checker.check(&store).await;
///     assert!(report.is_clean(), "{report}");
///     assert!(session.is_closed());
/// });
/// ```
pub struct InvariantChecker<P = ()> {
    memory: Mutex<Memory<P>>,
}

/// What the checker remembers between checks.
#[derive(Debug)]
struct Memory<P> {
    routers: BTreeMap<RouterId, Option<Seen>>,
    handles: HashMap<SessionId, Vec<Handle<P>>>,
}

/// A router as the previous check saw it.
#[derive(Debug)]
struct Seen {
    status: RouterStatus,
    /// The sessions the store held for the fenced incarnation when a check
    /// first saw the fence.
    fenced_with: Option<BTreeSet<SessionKey>>,
}

/// A session handle and what the previous check saw of it.
#[derive(Debug)]
struct Handle<P> {
    session: Session<P>,
    state: SessionState,
    reason: Option<CloseReason>,
    /// A check saw it stored on its router's fenced incarnation: its close
    /// belongs to that deletion, which waits for it to complete.
    fenced: bool,
}

/// What one check read of a router.
struct Observed<P> {
    router: RouterId,
    status: RouterStatus,
    listed: Vec<Session<P>>,
}

impl<P> Default for InvariantChecker<P> {
    fn default() -> Self {
        Self {
            memory: Mutex::new(Memory {
                routers: BTreeMap::new(),
                handles: HashMap::new(),
            }),
        }
    }
}

impl<P> fmt::Debug for InvariantChecker<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let memory = self.memory.lock();
        f.debug_struct("InvariantChecker")
            .field("routers", &memory.routers.len())
            .field(
                "handles",
                &memory.handles.values().map(Vec::len).sum::<usize>(),
            )
            .finish()
    }
}

impl<P: Send + Sync + 'static> InvariantChecker<P> {
    /// A checker that has seen nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `session` from now on, including after it left the store: a
    /// handle your controller holds, or one the store gave back.
    pub fn track(&self, session: &Session<P>) {
        self.memory.lock().track(session);
    }

    /// Checks `router` from now on, even once the store stops reporting it
    /// (a deleted router with no session).
    pub fn track_router(&self, router: RouterId) {
        self.memory.lock().routers.entry(router).or_insert(None);
    }

    /// Checks the store and every tracked handle; see the type's
    /// documentation for what is checked.
    ///
    /// The store is read first, without the checker's lock; what was read
    /// is then compared with the checker's memory under it. Checks of one
    /// checker should not overlap (each compares with the one before).
    pub async fn check<S>(&self, store: &S) -> InvariantReport
    where
        S: SessionStore<Payload = P>,
    {
        let mut report = InvariantReport::default();
        let mut found = Vec::new();
        let mut seen = Vec::new();
        read_audit(store, &mut report, &mut found, &mut seen).await;
        let mut routers: BTreeSet<RouterId> = self.memory.lock().routers.keys().copied().collect();
        match store.census().await {
            Ok(census) => routers.extend(census.iter().map(|router| router.router)),
            Err(error) => found.push(failed("census", error)),
        }
        routers.extend(seen.iter().map(Session::router));
        let mut observed = Vec::new();
        for router in routers {
            if let Some(o) = read_router(store, router, &mut found).await {
                observed.push(o);
            }
        }
        report.routers = observed.len();
        listed_zombies(&observed, &mut found);
        let mut memory = self.memory.lock();
        for session in seen.iter().chain(observed.iter().flat_map(|o| &o.listed)) {
            memory.track(session);
        }
        let mut statuses = BTreeMap::new();
        for o in observed {
            memory.compare_router(&o, &mut found);
            statuses.insert(o.router, o.status);
        }
        memory.check_handles(&statuses, &mut report, &mut found);
        drop(memory);
        found.sort_by_key(Violation::invariant);
        report.violations = found;
        report
    }

    /// Checks the store and panics with the report if any invariant is
    /// broken.
    ///
    /// The panic is raised inside the returned future, so the test harness
    /// shows a location in this crate; the message ends with `checked at`
    /// and the line that called `assert`. For a failure reported at your
    /// own line, [`check`](Self::check) and assert on the report:
    /// `assert!(report.is_clean(), "{report}")`.
    ///
    /// # Panics
    ///
    /// If the check finds a violation.
    #[track_caller]
    pub fn assert<'a, S>(&'a self, store: &'a S) -> impl Future<Output = ()> + 'a
    where
        S: SessionStore<Payload = P>,
    {
        let caller = std::panic::Location::caller();
        async move {
            let report = self.check(store).await;
            assert!(report.is_clean(), "{report}\n(checked at {caller})");
        }
    }
}

/// I7 and zombies, through the store's own audit; the zombies' handles go
/// to `seen`.
async fn read_audit<S: SessionStore>(
    store: &S,
    report: &mut InvariantReport,
    found: &mut Vec<Violation>,
    seen: &mut Vec<Session<S::Payload>>,
) {
    let audit = match store.audit().await {
        Ok(audit) => audit,
        Err(error) => return found.push(failed("audit", error)),
    };
    report.sessions = audit.sessions;
    for &(router, session) in &audit.missing_from_map {
        found.push(Violation::IndexedButMissing { router, session });
    }
    for &session in &audit.missing_from_index {
        found.push(Violation::NotIndexed { session });
    }
    for &id in &audit.orphans {
        match store.get(id).await {
            Ok(Some(session)) => {
                let status = match store.router_status(session.router()).await {
                    Ok(status) => Some(status),
                    Err(RouterError::UnknownRouter(_)) => None,
                    Err(error) => {
                        found.push(failed("router_status", error));
                        None
                    }
                };
                found.push(Violation::Zombie {
                    session: id,
                    router: session.router(),
                    incarnation: session.incarnation(),
                    status,
                });
                seen.push(session);
            }
            // Gone since the audit: removed, not a zombie any more.
            Ok(None) => {}
            Err(error) => found.push(failed("get", error)),
        }
    }
}

/// I1 through the listings: a session a router still lists in an
/// incarnation that ended (deleted, or older than the current one) is a
/// zombie, whatever the store's own audit says. Each is reported once.
fn listed_zombies<P>(observed: &[Observed<P>], found: &mut Vec<Violation>) {
    let mut reported: BTreeSet<SessionId> = found
        .iter()
        .filter_map(|violation| match violation {
            Violation::Zombie { session, .. } => Some(*session),
            _ => None,
        })
        .collect();
    for o in observed {
        for session in &o.listed {
            if ended(o.status, session.incarnation()) && reported.insert(session.id()) {
                found.push(Violation::Zombie {
                    session: session.id(),
                    router: o.router,
                    incarnation: session.incarnation(),
                    status: Some(o.status),
                });
            }
        }
    }
}

/// One router: its status, its count against its listing, and each listed
/// session against `get`. `None` if the store does not know the router
/// (never registered, or its tombstone was evicted).
async fn read_router<S: SessionStore>(
    store: &S,
    router: RouterId,
    found: &mut Vec<Violation>,
) -> Option<Observed<S::Payload>> {
    let status = match store.router_status(router).await {
        Ok(status) => status,
        // Never registered (a tracked id), or its tombstone was evicted.
        Err(RouterError::UnknownRouter(_)) => return None,
        Err(error) => {
            found.push(failed("router_status", error));
            return None;
        }
    };
    // A router the check cannot list is left out, and the checker's memory
    // of it stays as it was: a partial look must not become the baseline
    // of the next check.
    let mut listed = match store.sessions(router).await {
        Ok(listed) => listed,
        Err(error) => {
            found.push(failed("sessions", error));
            return None;
        }
    };
    match store.count(router).await {
        Ok(count) if count != listed.len() => found.push(Violation::CountMismatch {
            router,
            count,
            listed: listed.len(),
        }),
        Ok(_) => {}
        Err(error) => found.push(failed("count", error)),
    }
    let mut refreshed = Vec::new();
    for session in &listed {
        match store.get(session.id()).await {
            // The very handle, and of this router: a session listed under
            // another router is misfiled, whatever the map says.
            Ok(Some(stored)) if Session::ptr_eq(&stored, session) && stored.router() == router => {}
            // Another handle of the same record (a remote store's cache
            // refreshed): the same session.
            Ok(Some(stored)) if stored.router() == router => refreshed.push(stored),
            Ok(_) => found.push(Violation::IndexedButMissing {
                router,
                session: session.id(),
            }),
            Err(error) => found.push(failed("get", error)),
        }
    }
    listed.extend(refreshed);
    Some(Observed {
        router,
        status,
        listed,
    })
}

impl<P> Memory<P> {
    fn track(&mut self, session: &Session<P>) {
        let handles = self.handles.entry(session.id()).or_default();
        if !handles.iter().any(|h| Session::ptr_eq(&h.session, session)) {
            handles.push(Handle {
                session: session.clone(),
                state: session.state(),
                reason: session.close_reason(),
                fenced: false,
            });
        }
        self.routers.entry(session.router()).or_insert(None);
    }

    /// Marks the handles of `listed` as part of a fenced incarnation's
    /// deletion.
    fn mark_fenced(&mut self, listed: &[Session<P>]) {
        for session in listed {
            if let Some(handles) = self.handles.get_mut(&session.id()) {
                for handle in handles.iter_mut() {
                    if Session::ptr_eq(&handle.session, session) {
                        handle.fenced = true;
                    }
                }
            }
        }
    }

    /// I2 for one router: its status did not go back, and nothing joined
    /// a fenced incarnation.
    fn compare_router(&mut self, observed: &Observed<P>, found: &mut Vec<Violation>) {
        let Observed {
            router,
            status,
            listed,
        } = observed;
        let (router, status) = (*router, *status);
        let previous = self.routers.get_mut(&router).and_then(Option::take);
        if let Some(seen) = &previous
            && rank_status(status) < rank_status(seen.status)
        {
            found.push(Violation::RouterWentBack {
                router,
                was: seen.status,
                now: status,
            });
        }
        let fenced_with = match status {
            RouterStatus::Fenced(incarnation) => {
                let of_fence: Vec<Session<P>> = listed
                    .iter()
                    .filter(|s| s.incarnation() == incarnation)
                    .cloned()
                    .collect();
                self.mark_fenced(&of_fence);
                // Keys, not ids: a session created after the fence that
                // reuses the id of one from before it is a new session (I9).
                let of_fence: BTreeSet<SessionKey> = of_fence.iter().map(Session::key).collect();
                match previous {
                    Some(Seen {
                        status: RouterStatus::Fenced(was),
                        fenced_with: Some(at_fence),
                    }) if was == incarnation => {
                        for key in of_fence.difference(&at_fence) {
                            found.push(Violation::CreatedAfterFence {
                                session: key.id(),
                                router,
                                incarnation,
                            });
                        }
                        Some(at_fence)
                    }
                    // The first check to see this fence: what the store holds
                    // now is what the fence snapshot could hold.
                    _ => Some(of_fence),
                }
            }
            _ => None,
        };
        self.routers.insert(
            router,
            Some(Seen {
                status,
                fenced_with,
            }),
        );
    }

    /// I1 and I3 on every handle seen.
    fn check_handles(
        &mut self,
        statuses: &BTreeMap<RouterId, RouterStatus>,
        report: &mut InvariantReport,
        found: &mut Vec<Violation>,
    ) {
        for handle in self.handles.values_mut().flatten() {
            report.handles += 1;
            let session = &handle.session;
            let id = session.id();
            let (state, reason) = (session.state(), session.close_reason());
            if rank_state(state) < rank_state(handle.state) {
                found.push(Violation::StateWentBack {
                    session: id,
                    was: handle.state,
                    now: state,
                });
            }
            if let Some(was) = handle.reason
                && reason != Some(was)
            {
                found.push(Violation::ReasonChanged {
                    session: id,
                    was,
                    now: reason,
                });
            }
            // The reason is written by the move to `Closed`, and read after
            // the state: `Closed` without a reason is never a race. (A reason
            // with an older state read can be: a close in between.)
            if state == SessionState::Closed && reason.is_none() {
                found.push(Violation::StateWithoutReason {
                    session: id,
                    state,
                    reason,
                });
            }
            let complete = session.closed().now_or_never().is_some();
            if complete && session.with_token(|token| token.is_some()) {
                found.push(Violation::TokenNotWiped { session: id });
            }
            let deleted = statuses
                .get(&session.router())
                .is_some_and(|status| ended(*status, session.incarnation()));
            if deleted && state != SessionState::Closed {
                found.push(Violation::OpenAfterDeletion {
                    session: id,
                    router: session.router(),
                    incarnation: session.incarnation(),
                    state,
                });
            } else if deleted && handle.fenced && !complete {
                found.push(Violation::CloseIncomplete { session: id });
            }
            (handle.state, handle.reason) = (state, reason);
        }
    }
}

/// Whether `incarnation` of a router with `status` was deleted: it is the
/// deleted one, or an older one.
fn ended(status: RouterStatus, incarnation: Incarnation) -> bool {
    match status {
        RouterStatus::Deleted(deleted) => incarnation <= deleted,
        RouterStatus::Live(current) | RouterStatus::Fenced(current) => incarnation < current,
    }
}

fn rank_state(state: SessionState) -> u8 {
    match state {
        SessionState::Active => 0,
        SessionState::Terminating => 1,
        SessionState::Closed => 2,
    }
}

/// Orders a router's statuses: by incarnation, then by phase.
fn rank_status(status: RouterStatus) -> (Incarnation, u8) {
    match status {
        RouterStatus::Live(i) => (i, 0),
        RouterStatus::Fenced(i) => (i, 1),
        RouterStatus::Deleted(i) => (i, 2),
    }
}

fn failed(call: &'static str, error: impl fmt::Display) -> Violation {
    Violation::StoreFailed {
        call,
        error: error.to_string(),
    }
}

/// Checks `store` once with a fresh [`InvariantChecker`]: everything a
/// single look can see (zombies, the index, state words, router statuses
/// are not compared with earlier ones). Use a checker kept across steps to
/// also catch what only history shows (creates after a fence, states going
/// back).
///
/// # Example
///
/// ```
/// use session_lifecycle::{store::Corruption, MemoryStore, NewSession, RouterId, SessionId, SessionStore};
/// use session_lifecycle::test_util::{check_invariants, run_paused};
///
/// run_paused(async {
///     let store = MemoryStore::new();
///     let router = RouterId::new(1);
///     let incarnation = store.register_router(router).await.unwrap();
///     store.create(NewSession::new(SessionId::new(1), router, incarnation)).await.unwrap();
///     assert!(check_invariants(&store).await.is_clean());
///
///     store.corrupt(Corruption::Unindex(SessionId::new(1)));
///     let report = check_invariants(&store).await;
///     assert_eq!(report.of("I7").count(), 1, "{report}");
/// });
/// ```
pub async fn check_invariants<S: SessionStore>(store: &S) -> InvariantReport {
    InvariantChecker::new().check(store).await
}

/// Checks `store` once (as [`check_invariants`]) and panics with the report
/// of every violation if any invariant is broken.
///
/// # Panics
///
/// If an invariant is broken; the message lists every violation.
///
/// # Example
///
/// ```
/// use session_lifecycle::{MemoryStore, RouterId, SessionStore};
/// use session_lifecycle::test_util::{assert_invariants, run_paused};
///
/// run_paused(async {
///     let store = MemoryStore::new();
///     store.register_router(RouterId::new(1)).await.unwrap();
///     assert_invariants(&store).await;
/// });
/// ```
#[track_caller]
pub fn assert_invariants<S: SessionStore>(store: &S) -> impl Future<Output = ()> + '_ {
    let caller = std::panic::Location::caller();
    async move {
        let report = check_invariants(store).await;
        assert!(report.is_clean(), "{report}\n(checked at {caller})");
    }
}

#[cfg(test)]
mod tests {
    //! What only history shows, which no public API can break: a state or
    //! a router status going back.

    use super::*;
    use crate::{NewSession, SessionId};

    fn memory_with(
        session: &Session,
        state: SessionState,
        reason: Option<CloseReason>,
    ) -> Memory<()> {
        let mut memory = Memory {
            routers: BTreeMap::new(),
            handles: HashMap::new(),
        };
        memory.handles.insert(
            session.id(),
            vec![Handle {
                session: session.clone(),
                state,
                reason,
                fenced: false,
            }],
        );
        memory
    }

    #[test]
    fn a_state_going_back_and_a_reason_changing_are_reported() {
        let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .into_session();
        let mut found = Vec::new();
        let mut report = InvariantReport::default();
        // Seen closed before; active now.
        let mut memory = memory_with(&session, SessionState::Closed, Some(CloseReason::Forced));
        memory.check_handles(&BTreeMap::new(), &mut report, &mut found);
        assert_eq!(
            found,
            vec![
                Violation::StateWentBack {
                    session: session.id(),
                    was: SessionState::Closed,
                    now: SessionState::Active,
                },
                Violation::ReasonChanged {
                    session: session.id(),
                    was: CloseReason::Forced,
                    now: None,
                },
            ]
        );
        // The memory moved on: the next check compares with what it saw.
        found.clear();
        memory.check_handles(&BTreeMap::new(), &mut report, &mut found);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_router_status_going_back_is_reported() {
        let router = RouterId::new(1);
        let mut memory = Memory::<()> {
            routers: BTreeMap::new(),
            handles: HashMap::new(),
        };
        let mut found = Vec::new();
        let observe = |status| Observed {
            router,
            status,
            listed: Vec::new(),
        };
        memory.compare_router(
            &observe(RouterStatus::Fenced(Incarnation::new(2))),
            &mut found,
        );
        memory.compare_router(
            &observe(RouterStatus::Deleted(Incarnation::new(2))),
            &mut found,
        );
        memory.compare_router(
            &observe(RouterStatus::Live(Incarnation::new(3))),
            &mut found,
        );
        assert!(found.is_empty(), "{found:?}");
        memory.compare_router(
            &observe(RouterStatus::Live(Incarnation::new(2))),
            &mut found,
        );
        assert_eq!(
            found,
            vec![Violation::RouterWentBack {
                router,
                was: RouterStatus::Live(Incarnation::new(3)),
                now: RouterStatus::Live(Incarnation::new(2)),
            }]
        );
    }
}
