//! A router full of observable sessions, and the check that its deletion
//! left nothing behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::task::JoinHandle;
use tokio::time::Duration;

use crate::{
    CloseReason, Event, Incarnation, NewSession, RouterId, RouterStatus, Session, SessionId,
    SessionStore, Subscription,
};

/// A router's sessions, each with a resource that counts its releases and
/// a task waiting for its close: what invariant I1 talks about, made
/// observable.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{MemoryStore, RouterDeleter, RouterId};
/// use session_lifecycle::test_util::{HOUR, Notify, ObservedRouter, ScriptedNotifier, report_within, run_paused};
///
/// run_paused(async {
///     let store = Arc::new(MemoryStore::new());
///     let observed = ObservedRouter::fill(&*store, RouterId::new(1), 0, 100).await;
///     let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::confirm_all());
///     let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
///     let report = report_within(HOUR, deleter.delete(RouterId::new(1))).await;
///     assert_eq!(report.confirmed, 100);
///     observed.assert_deleted(&*store).await; // I1
/// });
/// ```
#[derive(Debug)]
pub struct ObservedRouter<P = ()> {
    /// The router.
    pub router: RouterId,
    /// The incarnation it was registered with.
    pub incarnation: Incarnation,
    /// Its sessions, in creation order.
    pub sessions: Vec<Session<P>>,
    /// How many times each session's resource was released, by position.
    pub releases: Vec<Arc<AtomicUsize>>,
    /// A task per session that ends with its close reason, by position.
    pub waiters: Vec<JoinHandle<CloseReason>>,
}

impl<P: Default + Send + Sync + 'static> ObservedRouter<P> {
    /// Registers `router` in `store` and creates `count` sessions on it
    /// with ids from `first_id`, each with a counting resource and a close
    /// waiter. Call it inside a tokio runtime.
    ///
    /// # Panics
    ///
    /// If the router cannot be registered or a session cannot be created,
    /// or if the ids would go past `u64::MAX` (`first_id + count - 1`
    /// overflows).
    pub async fn fill<S>(store: &S, router: RouterId, first_id: u64, count: u64) -> Self
    where
        S: SessionStore<Payload = P>,
    {
        let incarnation = store
            .register_router(router)
            .await
            .unwrap_or_else(|error| panic!("cannot register {router}: {error}"));
        let mut observed = Self {
            router,
            incarnation,
            sessions: Vec::new(),
            releases: Vec::new(),
            waiters: Vec::new(),
        };
        let last = count.checked_sub(1).map(|rest| {
            first_id
                .checked_add(rest)
                .unwrap_or_else(|| panic!("{count} session ids from {first_id} go past u64::MAX"))
        });
        for id in last.into_iter().flat_map(|last| first_id..=last) {
            let spec =
                NewSession::new(SessionId::new(id), router, incarnation).payload(P::default());
            let session = store
                .create(spec)
                .await
                .unwrap_or_else(|error| panic!("cannot create session {id}: {error}"));
            observed.observe(session);
        }
        observed
    }

    /// Adds `session` to the observed ones: attaches a counting resource and
    /// starts a close waiter. A session already closed gets its resource
    /// released here, once.
    pub fn observe(&mut self, session: Session<P>) {
        let (released, _) = attach_counter(&session);
        self.waiters.push(tokio::spawn(session.closed_owned()));
        self.releases.push(released);
        self.sessions.push(session);
    }
}

impl<P> ObservedRouter<P> {
    /// How many of the sessions closed with `reason`.
    #[must_use]
    pub fn count_reason(&self, reason: CloseReason) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.close_reason() == Some(reason))
            .count()
    }

    /// Asserts I1 after the router's deletion returned: the store holds the
    /// incarnation as deleted and none of its sessions (a session of
    /// another router or incarnation reusing an id is not one of them:
    /// compared by [`SessionKey`](crate::SessionKey)), every session is
    /// closed (with any reason: by the router, by force, by its client, or
    /// by whatever closed it before the deletion), every resource was
    /// released exactly once, and every close waiter woke within a second.
    ///
    /// # Panics
    ///
    /// On the first of these that does not hold, naming it.
    pub async fn assert_deleted<S>(self, store: &S)
    where
        S: SessionStore<Payload = P>,
    {
        let status = store.router_status(self.router).await;
        assert!(
            matches!(status, Ok(RouterStatus::Deleted(i)) if i == self.incarnation),
            "I1: {} should be deleted in {}, is {status:?}",
            self.router,
            self.incarnation
        );
        let count = store.count(self.router).await;
        assert!(
            matches!(count, Ok(0)),
            "I1: {} still holds sessions: {count:?}",
            self.router
        );
        for session in &self.sessions {
            assert!(session.is_closed(), "I1: {session:?} is not closed");
            let stored = store.get(session.id()).await;
            // Another life of the id may hold it now (I9).
            assert!(
                matches!(&stored, Ok(found) if found.as_ref().is_none_or(|s| s.key() != session.key())),
                "I1: {session:?} still stored: {stored:?}"
            );
        }
        for (session, released) in self.sessions.iter().zip(&self.releases) {
            let times = released.load(Ordering::SeqCst);
            assert_eq!(
                times, 1,
                "I1: {session:?}'s resource released {times} times"
            );
        }
        for (session, waiter) in self.sessions.iter().zip(self.waiters) {
            match tokio::time::timeout(Duration::from_secs(1), waiter).await {
                Ok(Ok(reason)) => assert_eq!(
                    session.close_reason(),
                    Some(reason),
                    "{session:?}'s close waiter woke with another reason"
                ),
                Ok(Err(error)) => panic!("{session:?}'s close waiter failed: {error}"),
                Err(_) => panic!("I1: {session:?}'s close waiter did not wake"),
            }
        }
    }
}

/// Attaches a resource counting its releases to `session`; returns the
/// count and whether it was attached. A session already closed (by a
/// racing deletion) hands the resource back, and it is released here,
/// once, so the count still says 1.
pub(super) fn attach_counter<P>(session: &Session<P>) -> (Arc<AtomicUsize>, bool) {
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    let count = move |_: CloseReason| {
        counter.fetch_add(1, Ordering::SeqCst);
    };
    match session.attach(count) {
        Ok(()) => (released, true),
        Err(back) => {
            (back.into_inner())(CloseReason::Forced);
            (released, false)
        }
    }
}

/// Waits for `events` to say that `router` was lost (its grace period
/// ended: [`Event::RouterLost`]) and returns how many sessions that
/// closed. Other events are skipped. Bound it with
/// [`within`](super::within).
///
/// # Panics
///
/// If the event bus closes first (every sender dropped).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use session_lifecycle::{EventBus, MemoryStore, Reconciler, RouterId};
/// use session_lifecycle::test_util::{HOUR, ObservedRouter, router_lost, run_paused, within};
///
/// run_paused(async {
///     let store = Arc::new(MemoryStore::new());
///     let router = RouterId::new(1);
///     let observed = ObservedRouter::fill(&*store, router, 0, 3).await;
///     let bus = EventBus::default();
///     let mut events = bus.subscribe();
///     let reconciler = Reconciler::builder()
///         .grace_period(Duration::from_secs(30))
///         .events(bus)
///         .build(Arc::clone(&store)).unwrap();
///     reconciler.router_disconnected(router).await.unwrap();
///
///     // The paused clock jumps to the end of the grace period.
///     assert_eq!(within(HOUR, router_lost(&mut events, router)).await, 3);
///     assert!(observed.sessions.iter().all(|s| s.is_closed()));
/// });
/// ```
pub async fn router_lost(events: &mut Subscription, router: RouterId) -> usize {
    loop {
        match events.recv().await {
            Some(Event::RouterLost {
                router: lost,
                closed,
                ..
            }) if lost == router => return closed,
            Some(_) => {}
            None => panic!("the event bus closed before {router} was lost"),
        }
    }
}
