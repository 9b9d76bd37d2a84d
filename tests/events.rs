//! `EventBus`: the events of a router deletion in order, lag accounting,
//! and closes through a session's handle.

use std::collections::HashMap;
use std::sync::Arc;

use session_lifecycle::test_util::{HOUR, Notify, ScriptedNotifier, Subset, report_within};
use session_lifecycle::{
    CloseReason, Event, EventBus, MemoryStore, NewSession, RouterDeleter, RouterId, SessionId,
    SessionStore, events::Subscription,
};
use tokio::time::Duration;

const R: RouterId = RouterId::new(7);

/// Every event buffered in `events`, without waiting.
fn drain(events: &mut Subscription) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv()).collect()
}

/// What one session went through, as seen on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Created,
    Terminating,
    Closed(CloseReason),
}

#[tokio::test(start_paused = true)]
async fn a_deletion_publishes_every_transition_in_order() {
    const SESSIONS: u64 = 200;
    let bus = EventBus::new(65_536);
    let store = Arc::new(
        MemoryStore::builder()
            .events(bus.clone())
            .build()
            .expect("valid settings"),
    );
    // Confirms the even ids through the store and ignores the odd ones,
    // which are forced once the confirmation timeout passes.
    let notifier = ScriptedNotifier::always(Arc::clone(&store), Notify::Confirm(Subset::EvenIds));
    let deleter = RouterDeleter::builder()
        .events(bus.clone())
        .confirm_timeout(Duration::from_secs(1))
        .retries(0)
        .build(Arc::clone(&store), notifier)
        .expect("valid settings");

    let mut events = bus.subscribe();
    let incarnation = store.register_router(R).await.unwrap();
    for id in 0..SESSIONS {
        store
            .create(NewSession::new(SessionId::new(id), R, incarnation))
            .await
            .unwrap();
    }
    let report = report_within(HOUR, deleter.delete(R)).await;
    assert_eq!(
        (
            report.sessions,
            report.confirmed,
            report.forced,
            report.already_closed
        ),
        (200, 100, 100, 0)
    );

    let events = drain(&mut events);
    let mut steps: HashMap<SessionId, Vec<Step>> = HashMap::new();
    let mut fenced_at = Vec::new();
    let mut first_terminating = None;
    let mut deleted_at = Vec::new();
    let mut closed_by = HashMap::<CloseReason, usize>::new();
    for (at, event) in events.iter().enumerate() {
        match event {
            Event::SessionCreated {
                session,
                router,
                incarnation: inc,
            } => {
                assert_eq!((*router, *inc), (R, incarnation));
                steps.entry(*session).or_default().push(Step::Created);
            }
            Event::SessionTerminating {
                session,
                router,
                incarnation: inc,
            } => {
                assert_eq!((*router, *inc), (R, incarnation));
                first_terminating.get_or_insert(at);
                steps.entry(*session).or_default().push(Step::Terminating);
            }
            Event::SessionClosed {
                session,
                router,
                incarnation: inc,
                reason,
            } => {
                assert_eq!((*router, *inc), (R, incarnation));
                *closed_by.entry(*reason).or_default() += 1;
                steps
                    .entry(*session)
                    .or_default()
                    .push(Step::Closed(*reason));
            }
            Event::RouterFenced {
                router,
                incarnation: inc,
                sessions,
                resumed,
            } => {
                assert_eq!((*router, *inc), (R, incarnation));
                assert_eq!(*sessions, 200);
                assert!(!resumed);
                fenced_at.push(at);
            }
            Event::RouterDeleted(deleted) => {
                assert_eq!(deleted, &report);
                deleted_at.push(at);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }

    assert_eq!(steps.len(), 200);
    for id in 0..SESSIONS {
        let expected_reason = if id % 2 == 0 {
            CloseReason::RouterDeleted
        } else {
            CloseReason::Forced
        };
        assert_eq!(
            steps[&SessionId::new(id)],
            [
                Step::Created,
                Step::Terminating,
                Step::Closed(expected_reason)
            ],
            "session {id}"
        );
    }

    assert_eq!(fenced_at.len(), 1, "exactly one RouterFenced");
    let first_terminating = first_terminating.expect("SessionTerminating events");
    assert!(
        fenced_at[0] < first_terminating,
        "RouterFenced at {} after the first SessionTerminating at {first_terminating}",
        fenced_at[0]
    );
    assert_eq!(
        deleted_at,
        [events.len() - 1],
        "exactly one RouterDeleted, last"
    );
    let Some(Event::RouterDeleted(deleted)) = events.last() else {
        unreachable!()
    };
    assert_eq!(
        deleted.confirmed,
        closed_by[&CloseReason::RouterDeleted],
        "confirmed"
    );
    assert_eq!(deleted.forced, closed_by[&CloseReason::Forced], "forced");
    assert_eq!(closed_by.len(), 2, "{closed_by:?}");
    // 200 created + 200 terminating + 200 closed + fenced + deleted.
    assert_eq!(events.len(), 602);
    assert_eq!(bus.stats().lagged, 0);
    assert_eq!(bus.stats().published, 602);
}

#[tokio::test(start_paused = true)]
async fn a_lagging_subscriber_counts_what_it_missed_and_gets_the_newest() {
    const SESSIONS: u64 = 20;
    let bus = EventBus::new(4);
    let store = MemoryStore::builder()
        .events(bus.clone())
        .build::<()>()
        .expect("valid settings");
    let mut events = bus.subscribe();
    let incarnation = store.register_router(R).await.unwrap();
    for id in 0..SESSIONS {
        store
            .create(NewSession::new(SessionId::new(id), R, incarnation))
            .await
            .unwrap();
    }

    let received: Vec<SessionId> = drain(&mut events)
        .into_iter()
        .map(|event| match event {
            Event::SessionCreated { session, .. } => session,
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    let lagged = events.lagged();
    assert!(lagged > 0, "a subscriber of capacity 4 missed nothing");
    assert_eq!(bus.stats().lagged, lagged);
    assert_eq!(lagged + received.len() as u64, SESSIONS);
    assert!(!received.is_empty());
    let newest: Vec<SessionId> = (lagged..SESSIONS).map(SessionId::new).collect();
    assert_eq!(received, newest, "the newest events are kept");
    assert!(events.try_recv().is_none());
    assert_eq!(events.lagged(), lagged, "nothing more missed");
}

#[tokio::test(start_paused = true)]
async fn a_close_through_the_handle_is_published() {
    let bus = EventBus::new(64);
    let store = MemoryStore::builder()
        .events(bus.clone())
        .build::<()>()
        .expect("valid settings");
    let incarnation = store.register_router(R).await.unwrap();

    // Nobody listens: nothing is published.
    let unheard = store
        .create(NewSession::new(SessionId::new(1), R, incarnation))
        .await
        .unwrap();
    assert!(unheard.close(CloseReason::ClientClosed).won());
    assert_eq!(bus.stats().published, 0);
    assert_eq!(bus.stats().subscribers, 0);

    let mut events = bus.subscribe();
    assert_eq!(bus.stats().subscribers, 1);
    let session = store
        .create(NewSession::new(SessionId::new(2), R, incarnation))
        .await
        .unwrap();
    assert!(session.close(CloseReason::ClientClosed).won());
    // A second close loses and publishes nothing.
    assert!(!session.close(CloseReason::Forced).won());

    let events = drain(&mut events);
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::SessionCreated { session: created, .. },
                Event::SessionClosed {
                    session: closed,
                    router: R,
                    reason: CloseReason::ClientClosed,
                    incarnation: inc,
                },
            ] if *created == session.id() && *closed == session.id() && *inc == incarnation
        ),
        "{events:?}"
    );
    assert_eq!(bus.stats().published, 2);
    assert_eq!(bus.stats().lagged, 0);
    // Still in the store, closed.
    assert!(store.get(session.id()).await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_subscription_ends_when_every_bus_clone_is_gone() {
    let bus = EventBus::new(8);
    let mut events = bus.subscribe();
    let store = MemoryStore::builder()
        .events(bus.clone())
        .build::<()>()
        .expect("valid settings");
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    store
        .create(NewSession::new(SessionId::new(1), router, incarnation))
        .await
        .unwrap();
    drop((bus, store));
    // The buffered event first, then the end.
    assert!(matches!(
        events.recv().await,
        Some(Event::SessionCreated { .. })
    ));
    let end = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// A capacity past the largest is clamped to it (2^20 slots, about 200
/// MiB), not allocated: 2^30 slots (about 220 GB) aborted the process.
#[test]
fn a_huge_bus_capacity_is_clamped_to_one_that_can_be_allocated() {
    for asked in [usize::MAX, 1 << 30, (1 << 20) + 1] {
        let bus = EventBus::new(asked);
        assert_eq!(bus.stats().capacity, 1 << 20);
    }
    assert_eq!(EventBus::new(0).stats().capacity, 1);
}

/// tokio's channel rounds a capacity up to a power of two: the stats say
/// the lag a subscriber is really allowed (they said the number asked for:
/// a bus of 3 let a subscriber fall 4 behind and reported 3).
#[tokio::test]
async fn the_capacity_reported_is_the_lag_a_subscriber_is_allowed() {
    for (asked, allowed) in [(1, 1), (3, 4), (4, 4), (5, 8), (1_000, 1_024)] {
        let bus = EventBus::new(asked);
        assert_eq!(bus.stats().capacity, allowed, "asked {asked}");
        let mut events = bus.subscribe();
        let store = MemoryStore::builder()
            .events(bus.clone())
            .build::<()>()
            .unwrap();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        // One more event than allowed: exactly one missed.
        for id in 0..=allowed as u64 {
            let spec = NewSession::new(SessionId::new(id), router, incarnation);
            drop(store.create(spec).await.unwrap());
        }
        let read = drain(&mut events).len();
        assert_eq!((read, events.lagged()), (allowed, 1), "asked {asked}");
    }
}
