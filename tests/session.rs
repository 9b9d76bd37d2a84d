//! The session handle: transitions, close notification, resources, token.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::{
    CloseReason, Incarnation, NewSession, RouterId, Session, SessionId, SessionState,
    session::CloseOutcome, session::Transition,
};
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready_eq};

fn session() -> Session {
    NewSession::new(SessionId::new(1), RouterId::new(2), Incarnation::new(3)).into_session()
}

#[test]
fn a_new_session_is_active_with_its_identity() {
    let s = session();
    assert_eq!(s.state(), SessionState::Active);
    assert_eq!(s.id(), SessionId::new(1));
    assert_eq!(s.router(), RouterId::new(2));
    assert_eq!(s.incarnation(), Incarnation::new(3));
    assert_eq!(s.close_reason(), None);
    assert!(!s.is_closed());
}

#[test]
fn active_terminating_closed() {
    let s = session();
    assert_eq!(s.begin_terminating(), Transition::Won);
    assert_eq!(s.state(), SessionState::Terminating);
    assert_eq!(
        s.begin_terminating(),
        Transition::Lost {
            current: SessionState::Terminating
        }
    );
    assert_eq!(s.close(CloseReason::RouterDeleted), CloseOutcome::Closed);
    assert_eq!(s.state(), SessionState::Closed);
    assert_eq!(s.close_reason(), Some(CloseReason::RouterDeleted));
}

#[test]
fn active_closed_directly() {
    let s = session();
    assert!(s.close(CloseReason::ClientClosed).won());
    assert_eq!(s.state(), SessionState::Closed);
}

#[test]
fn closed_is_final() {
    let s = session();
    assert!(s.close(CloseReason::LivenessTimeout).won());
    assert_eq!(
        s.begin_terminating(),
        Transition::Lost {
            current: SessionState::Closed
        }
    );
    assert_eq!(
        s.close(CloseReason::Forced),
        CloseOutcome::AlreadyClosed {
            reason: CloseReason::LivenessTimeout
        }
    );
    assert_eq!(s.state(), SessionState::Closed);
    assert_eq!(s.close_reason(), Some(CloseReason::LivenessTimeout));
}

#[test]
fn every_close_reason_round_trips() {
    for reason in [
        CloseReason::ClientClosed,
        CloseReason::RouterDeleted,
        CloseReason::LivenessTimeout,
        CloseReason::Forced,
        CloseReason::Reclaimed,
        CloseReason::RouterLost,
        CloseReason::Shutdown,
        CloseReason::Expired,
    ] {
        let s = session();
        assert!(s.close(reason).won());
        assert_eq!(s.close_reason(), Some(reason));
        assert_eq!(
            reason.is_forced(),
            !matches!(
                reason,
                CloseReason::ClientClosed | CloseReason::RouterDeleted
            )
        );
    }
}

#[test]
fn exactly_one_thread_wins_each_transition() {
    for _ in 0..200 {
        let s = session();
        let terminating = AtomicUsize::new(0);
        let closing = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    if s.begin_terminating().won() {
                        terminating.fetch_add(1, Ordering::SeqCst);
                    }
                    if s.close(CloseReason::ClientClosed).won() {
                        closing.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(terminating.load(Ordering::SeqCst) <= 1);
        assert_eq!(closing.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn a_waiter_created_before_close_wakes() {
    let s = session();
    let mut waiter = task::spawn(s.closed());
    assert_pending!(waiter.poll());
    assert!(!waiter.is_woken());
    assert!(s.close(CloseReason::Forced).won());
    assert!(waiter.is_woken());
    assert_ready_eq!(waiter.poll(), CloseReason::Forced);
}

#[test]
fn a_waiter_created_after_close_is_ready_at_once() {
    let s = session();
    assert!(s.close(CloseReason::Shutdown).won());
    let mut waiter = task::spawn(s.closed());
    assert_ready_eq!(waiter.poll(), CloseReason::Shutdown);
    let mut owned = task::spawn(s.closed_owned());
    assert_ready_eq!(owned.poll(), CloseReason::Shutdown);
}

#[test]
fn many_waiters_all_wake() {
    let s = session();
    let mut waiters: Vec<_> = (0..16).map(|_| task::spawn(s.closed_owned())).collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }
    assert!(s.close(CloseReason::ClientClosed).won());
    for waiter in &mut waiters {
        assert!(waiter.is_woken());
        assert_ready_eq!(waiter.poll(), CloseReason::ClientClosed);
    }
}

#[test]
fn a_dropped_owned_waiter_leaks_nothing() {
    // The payload is dropped only when the last handle is: a waiter that
    // leaked its handle would keep it alive.
    let payload = Arc::new(());
    let s = NewSession::new(SessionId::new(1), RouterId::new(2), Incarnation::new(3))
        .payload(Arc::clone(&payload))
        .into_session();
    for _ in 0..100 {
        let mut waiter = task::spawn(s.closed_owned());
        assert_pending!(waiter.poll());
        drop(waiter);
    }
    let mut survivor = task::spawn(s.closed());
    assert_pending!(survivor.poll());
    let mut other = task::spawn(s.closed());
    assert_pending!(other.poll());
    drop(other);
    assert!(s.close(CloseReason::ClientClosed).won());
    assert!(survivor.is_woken());
    assert_ready_eq!(survivor.poll(), CloseReason::ClientClosed);
    drop(survivor);
    drop(s);
    assert_eq!(
        Arc::strong_count(&payload),
        1,
        "a waiter kept the session alive"
    );
}

#[test]
fn a_dropped_waiter_frees_its_waker() {
    // A waker that counts its clones alive: a leaked registration keeps one.
    let s = session();
    let alive = Arc::new(());
    for _ in 0..50 {
        let waker = futures::task::waker(Arc::new(CountingWaker(Arc::clone(&alive))));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fut = Box::pin(s.closed());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(fut);
        drop(waker);
    }
    assert_eq!(
        Arc::strong_count(&alive),
        1,
        "a cancelled waiter kept its waker"
    );
}

struct CountingWaker(#[allow(dead_code)] Arc<()>);

impl futures::task::ArcWake for CountingWaker {
    fn wake_by_ref(_: &Arc<Self>) {}
}

use std::future::Future;

#[test]
fn a_repolled_waiter_keeps_one_registration() {
    let s = session();
    let mut waiter = task::spawn(s.closed());
    for _ in 0..10 {
        assert_pending!(waiter.poll());
    }
    assert!(s.close(CloseReason::Forced).won());
    assert_ready_eq!(waiter.poll(), CloseReason::Forced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_waiters_resolve_across_tasks() {
    let s = session();
    let handles: Vec<_> = (0..8).map(|_| tokio::spawn(s.closed_owned())).collect();
    tokio::task::yield_now().await;
    assert!(s.close(CloseReason::RouterDeleted).won());
    for handle in handles {
        assert_eq!(handle.await.unwrap(), CloseReason::RouterDeleted);
    }
}

#[test]
fn resources_are_released_once_in_reverse_order() {
    // 0, 1, 2 and 3 resources: the inline first one and the spilled rest.
    for n in 0..=3 {
        let s = session();
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        for i in 0..n {
            let log = Arc::clone(&log);
            s.attach(move |reason| log.lock().push((i, reason)))
                .unwrap();
        }
        assert!(s.close(CloseReason::Forced).won());
        let _ = s.close(CloseReason::ClientClosed);
        let expected: Vec<_> = (0..n).rev().map(|i| (i, CloseReason::Forced)).collect();
        assert_eq!(*log.lock(), expected, "{n} resources");
    }
}

#[test]
fn resources_are_released_once_under_racing_closes() {
    for _ in 0..200 {
        let s = session();
        let released = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let released = Arc::clone(&released);
            s.attach(move |_| {
                released.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        std::thread::scope(|scope| {
            for reason in [
                CloseReason::Forced,
                CloseReason::ClientClosed,
                CloseReason::Reclaimed,
            ] {
                let s = &s;
                scope.spawn(move || {
                    let _ = s.close(reason);
                });
            }
        });
        assert_eq!(released.load(Ordering::SeqCst), 4);
    }
}

#[test]
fn attaching_to_a_closed_session_hands_the_resource_back() {
    let s = session();
    assert!(s.close(CloseReason::ClientClosed).won());
    let err = s.attach(|_| {}).unwrap_err();
    let _resource = err.into_inner();
}

#[test]
fn a_panicking_resource_is_contained() {
    let s = session();
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    s.attach(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    s.attach(|_| panic!("resource release failed")).unwrap();
    let mut waiter = task::spawn(s.closed());
    assert_pending!(waiter.poll());
    assert!(s.close(CloseReason::Forced).won());
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "the other resource was still released"
    );
    assert_ready_eq!(waiter.poll(), CloseReason::Forced);
}

#[test]
fn the_token_is_wiped_on_close() {
    let s = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
        .token(b"hunter2".to_vec())
        .into_session();
    assert_eq!(
        s.with_token(|t| t.map(<[u8]>::to_vec)),
        Some(b"hunter2".to_vec())
    );
    assert!(s.close(CloseReason::ClientClosed).won());
    assert!(s.with_token(|t| t.is_none()));
}

#[test]
fn waiters_wake_only_after_resources_are_released() {
    let s = session();
    let observed = Arc::new(AtomicUsize::new(0));
    let probe = s.clone();
    let seen = Arc::clone(&observed);
    s.attach(move |_| {
        // Inside the release the close is not complete: a waiter polled now
        // stays pending.
        let mut waiter = task::spawn(probe.closed());
        if waiter.poll().is_pending() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(s.close(CloseReason::Forced).won());
    assert_eq!(observed.load(Ordering::SeqCst), 1);
}

#[test]
fn traffic_counters_add_up() {
    let s = session();
    s.record_in(100);
    s.record_in(50);
    s.record_out(10);
    let traffic = s.traffic();
    assert_eq!((traffic.bytes_in, traffic.packets_in), (150, 2));
    assert_eq!((traffic.bytes_out, traffic.packets_out), (10, 1));
    assert_eq!(traffic.total_bytes(), 160);
}

#[tokio::test(start_paused = true)]
async fn created_at_follows_tokio_time() {
    let s = session();
    tokio::time::advance(std::time::Duration::from_secs(90)).await;
    assert_eq!(s.age(), std::time::Duration::from_secs(90));
}

#[test]
fn payload_and_debug() {
    let s = NewSession::new(SessionId::new(5), RouterId::new(6), Incarnation::new(7))
        .payload(String::from("tenant-a"))
        .into_session();
    assert_eq!(s.payload(), "tenant-a");
    let debug = format!("{s:?}");
    assert!(
        debug.contains("session-5") || debug.contains("SessionId(5)"),
        "{debug}"
    );
}
