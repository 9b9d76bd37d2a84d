//! loom models of the state word and close notification. Run with
//! `RUSTFLAGS="--cfg session_lifecycle_loom" cargo test --lib --release loom`.

use std::future::Future;
use std::task::{Context, Poll};

use loom::future::block_on;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

use crate::id::{Incarnation, RouterId, SessionId};
use crate::loom::Arc;
use crate::session::{CloseReason, NewSession, Session, SessionState, Transition};

fn session() -> Session {
    NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1)).into_session()
}

#[test]
fn loom_a_waiter_never_misses_the_close() {
    loom::model(|| {
        let s = session();
        let closer = s.clone();
        let t = thread::spawn(move || closer.close(CloseReason::Forced).won());
        // block_on parks until woken: a lost wake-up is a loom deadlock.
        assert_eq!(block_on(s.closed()), CloseReason::Forced);
        assert!(t.join().unwrap());
    });
}

#[test]
fn loom_an_owned_waiter_on_another_thread_wakes() {
    loom::model(|| {
        let s = session();
        let waiter = s.clone();
        let t = thread::spawn(move || block_on(waiter.closed_owned()));
        assert!(s.close(CloseReason::ClientClosed).won());
        assert_eq!(t.join().unwrap(), CloseReason::ClientClosed);
    });
}

#[test]
fn loom_exactly_one_closer_wins_and_releases_once() {
    loom::model(|| {
        let s = session();
        let released = Arc::new(AtomicUsize::new(0));
        let counter = released.clone();
        if s.attach(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .is_err()
        {
            unreachable!("a new session is open");
        }
        let other = s.clone();
        let t = thread::spawn(move || other.close(CloseReason::Forced).won());
        let here = s.close(CloseReason::ClientClosed).won();
        let there = t.join().unwrap();
        assert!(here ^ there, "exactly one closer wins");
        let reason = block_on(s.closed());
        assert_eq!(
            reason,
            if here {
                CloseReason::ClientClosed
            } else {
                CloseReason::Forced
            }
        );
        assert_eq!(released.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn loom_terminate_and_close_race_moves_forward_only() {
    loom::model(|| {
        let s = session();
        let other = s.clone();
        let t = thread::spawn(move || other.begin_terminating());
        // The close wins from Active and from Terminating alike; a
        // terminate that ran after it must have lost and seen Closed.
        assert!(s.close(CloseReason::Forced).won());
        if let Transition::Lost { current } = t.join().unwrap() {
            assert_eq!(current, SessionState::Closed);
        }
        assert_eq!(s.state(), SessionState::Closed);
        assert_eq!(s.close_reason(), Some(CloseReason::Forced));
    });
}

#[test]
fn loom_a_cancelled_waiter_leaves_no_registration() {
    loom::model(|| {
        let s = session();
        let closer = s.clone();
        let t = thread::spawn(move || {
            let _ = closer.close(CloseReason::Forced);
        });
        {
            let mut waiter = Box::pin(s.closed());
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            if let Poll::Ready(reason) = waiter.as_mut().poll(&mut cx) {
                assert_eq!(reason, CloseReason::Forced);
            }
            // Dropped here, racing the close.
        }
        t.join().unwrap();
        assert!(s.inner.shared.lock().waiters.is_empty());
        assert_eq!(block_on(s.closed()), CloseReason::Forced);
    });
}
