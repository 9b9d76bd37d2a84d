//! An adversarial user of the session handle: racing transitions, re-entrant
//! resources and wakers, close waiters under churn, tokens under a racing
//! close, traffic counters under contention and extreme `NewSession` inputs.
//!
//! Every thread test runs under a real-time watchdog (`bounded`), so a hang
//! fails instead of blocking the suite.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration as StdDuration;

use session_lifecycle::session::{CloseOutcome, Transition};
use session_lifecycle::{
    CloseReason, Incarnation, NewSession, RouterId, Session, SessionId, SessionState,
};
use tokio::time::{Duration, Instant};

/// How long a scenario may run before it counts as hung.
const WATCHDOG: StdDuration = StdDuration::from_secs(20);

const REASONS: [CloseReason; 8] = [
    CloseReason::ClientClosed,
    CloseReason::RouterDeleted,
    CloseReason::LivenessTimeout,
    CloseReason::Forced,
    CloseReason::Reclaimed,
    CloseReason::RouterLost,
    CloseReason::Shutdown,
    CloseReason::Expired,
];

/// Runs `scenario` on a thread of its own; fails if it does not finish
/// within [`WATCHDOG`], and re-raises its panic if it panicked.
fn bounded<T: Send + 'static>(name: &str, scenario: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, finished) = mpsc::channel();
    let runner = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = done.send(scenario());
        })
        .expect("a thread for the scenario");
    match finished.recv_timeout(WATCHDOG) {
        Ok(output) => {
            runner.join().expect("the scenario finished");
            output
        }
        Err(RecvTimeoutError::Timeout) => panic!("{name}: hung for {WATCHDOG:?}"),
        Err(RecvTimeoutError::Disconnected) => match runner.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the scenario sends before it ends"),
        },
    }
}

fn session(id: u64) -> Session {
    NewSession::new(SessionId::new(id), RouterId::new(7), Incarnation::new(1)).into_session()
}

/// A waker that counts its wake-ups and runs `on_wake` on each.
struct CountingWaker {
    woken: AtomicUsize,
    on_wake: Box<dyn Fn() + Send + Sync>,
}

impl CountingWaker {
    fn new(on_wake: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            woken: AtomicUsize::new(0),
            on_wake: Box::new(on_wake),
        })
    }

    fn woken(&self) -> usize {
        self.woken.load(Ordering::SeqCst)
    }
}

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.fetch_add(1, Ordering::SeqCst);
        (self.on_wake)();
    }
}

/// Polls `future` once with `waker`.
fn poll_once<F: Future + Unpin>(future: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(future).poll(&mut Context::from_waker(waker))
}

// ---------------------------------------------------------------------------
// Racing transitions

/// What one racing thread saw.
#[derive(Default)]
struct Seen {
    terminating_won: usize,
    closed_won: Vec<CloseReason>,
    lost_to: Vec<CloseReason>,
    attached: usize,
    handed_back: usize,
}

#[test]
fn racing_closes_terminations_and_attaches_have_one_winner_and_release_each_resource_once() {
    bounded("racing transitions", || {
        const THREADS: usize = 8;
        const ROUNDS: u64 = 300;
        for round in 0..ROUNDS {
            let s = session(round);
            // Each resource records the reason it was released with, under its index.
            let released: Arc<Mutex<Vec<(usize, CloseReason)>>> = Arc::default();
            let next = Arc::new(AtomicUsize::new(0));
            let barrier = Arc::new(Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let s = s.clone();
                    let released = Arc::clone(&released);
                    let next = Arc::clone(&next);
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        let mut seen = Seen::default();
                        barrier.wait();
                        for step in 0..6 {
                            match (t + step) % 3 {
                                0 => {
                                    if s.begin_terminating().won() {
                                        seen.terminating_won += 1;
                                    }
                                }
                                1 => match s.close(REASONS[(t + step) % REASONS.len()]) {
                                    CloseOutcome::Closed => {
                                        seen.closed_won.push(REASONS[(t + step) % REASONS.len()]);
                                    }
                                    CloseOutcome::AlreadyClosed { reason } => {
                                        seen.lost_to.push(reason);
                                    }
                                },
                                _ => {
                                    let index = next.fetch_add(1, Ordering::SeqCst);
                                    let released = Arc::clone(&released);
                                    let resource = move |reason: CloseReason| {
                                        released.lock().unwrap().push((index, reason));
                                    };
                                    match s.attach(resource) {
                                        Ok(()) => seen.attached += 1,
                                        Err(back) => {
                                            // Handed back: never released by the session.
                                            drop(back.into_inner());
                                            seen.handed_back += 1;
                                        }
                                    }
                                }
                            }
                        }
                        seen
                    })
                })
                .collect();
            let seen: Vec<Seen> = threads.into_iter().map(|t| t.join().unwrap()).collect();

            let winners: Vec<CloseReason> =
                seen.iter().flat_map(|s| s.closed_won.clone()).collect();
            assert_eq!(winners.len(), 1, "round {round}: exactly one close wins");
            let winner = winners[0];
            assert!(
                seen.iter().map(|s| s.terminating_won).sum::<usize>() <= 1,
                "round {round}: at most one begin_terminating wins"
            );
            for reason in seen.iter().flat_map(|s| s.lost_to.iter()) {
                assert_eq!(
                    *reason, winner,
                    "round {round}: a loser learns the winner's reason"
                );
            }
            assert_eq!(s.state(), SessionState::Closed);
            assert_eq!(s.close_reason(), Some(winner));

            let attached: usize = seen.iter().map(|s| s.attached).sum();
            let handed_back: usize = seen.iter().map(|s| s.handed_back).sum();
            assert_eq!(attached + handed_back, next.load(Ordering::SeqCst));
            let released = released.lock().unwrap();
            assert_eq!(
                released.len(),
                attached,
                "round {round}: every attached resource released, none handed back released"
            );
            let distinct: HashSet<usize> = released.iter().map(|(i, _)| *i).collect();
            assert_eq!(
                distinct.len(),
                attached,
                "round {round}: released once each"
            );
            assert!(
                released.iter().all(|(_, reason)| *reason == winner),
                "round {round}: released with the winner's reason"
            );
        }
    });
}

#[test]
fn observers_never_see_the_state_go_backwards_nor_closed_without_its_reason() {
    bounded("monotonic observers", || {
        const ROUNDS: u64 = 300;
        for round in 0..ROUNDS {
            let s = session(round);
            let stop = Arc::new(AtomicBool::new(false));
            let barrier = Arc::new(Barrier::new(4));
            let observers: Vec<_> = (0..2)
                .map(|_| {
                    let s = s.clone();
                    let stop = Arc::clone(&stop);
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        barrier.wait();
                        let rank = |state| match state {
                            SessionState::Active => 0,
                            SessionState::Terminating => 1,
                            SessionState::Closed => 2,
                        };
                        let mut last = 0;
                        let mut reason_seen: Option<CloseReason> = None;
                        loop {
                            let done = stop.load(Ordering::SeqCst);
                            let state = s.state();
                            assert!(rank(state) >= last, "{state:?} after rank {last}");
                            last = rank(state);
                            if state.is_closed() {
                                let reason = s.close_reason();
                                assert!(reason.is_some(), "Closed without a reason");
                                if let Some(before) = reason_seen {
                                    assert_eq!(reason, Some(before), "the reason changed");
                                }
                                reason_seen = reason;
                                assert!(s.is_closed());
                            }
                            if done {
                                return last;
                            }
                        }
                    })
                })
                .collect();
            let movers: Vec<_> = (0..2)
                .map(|t| {
                    let s = s.clone();
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        barrier.wait();
                        let _ = s.begin_terminating();
                        let _ = s.close(REASONS[(round as usize + t) % REASONS.len()]);
                        let _ = s.begin_terminating();
                    })
                })
                .collect();
            for mover in movers {
                mover.join().unwrap();
            }
            stop.store(true, Ordering::SeqCst);
            for observer in observers {
                assert_eq!(observer.join().unwrap(), 2, "the observer saw the close");
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Re-entrant resources

#[test]
fn a_release_that_reenters_its_session_sees_it_closed_and_cannot_add_to_it() {
    bounded("re-entrant release", || {
        let s = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .token(b"secret".to_vec())
            .into_session();
        let late_released = Arc::new(AtomicUsize::new(0));
        let report: Arc<Mutex<Vec<String>>> = Arc::default();
        // A waiter registered from inside the release, kept for later.
        let parked: Arc<Mutex<Option<session_lifecycle::session::WaitForCloseOwned<()>>>> =
            Arc::default();
        let waker = CountingWaker::new(|| {});
        {
            let me = s.clone();
            let late_released = Arc::clone(&late_released);
            let report = Arc::clone(&report);
            let parked = Arc::clone(&parked);
            let waker = Waker::from(Arc::clone(&waker));
            s.attach(move |reason: CloseReason| {
                let mut r = report.lock().unwrap();
                r.push(format!("state {:?}", me.state()));
                r.push(format!("reason {:?}", me.close_reason()));
                r.push(format!("begin {:?}", me.begin_terminating()));
                r.push(format!("close {:?}", me.close(CloseReason::Forced)));
                r.push(format!(
                    "token {:?}",
                    me.with_token(|t| t.map(<[u8]>::to_vec))
                ));
                let late = Arc::clone(&late_released);
                match me.attach(move |_: CloseReason| {
                    late.fetch_add(1, Ordering::SeqCst);
                }) {
                    Ok(()) => r.push("attach ok".into()),
                    Err(back) => {
                        r.push("attach refused".into());
                        (back.into_inner())(reason);
                    }
                }
                me.record_in(10);
                let mut wait = me.closed_owned();
                r.push(format!("poll {:?}", poll_once(&mut wait, &waker)));
                *parked.lock().unwrap() = Some(wait);
            })
            .unwrap();
        }
        assert_eq!(s.close(CloseReason::ClientClosed), CloseOutcome::Closed);
        let report = report.lock().unwrap().clone();
        assert_eq!(
            report,
            vec![
                "state Closed".to_owned(),
                "reason Some(ClientClosed)".to_owned(),
                format!(
                    "begin {:?}",
                    Transition::Lost {
                        current: SessionState::Closed
                    }
                ),
                format!(
                    "close {:?}",
                    CloseOutcome::AlreadyClosed {
                        reason: CloseReason::ClientClosed
                    }
                ),
                "token None".to_owned(),
                "attach refused".to_owned(),
                // The close has not completed while its resources are released.
                "poll Pending".to_owned(),
            ]
        );
        assert_eq!(
            late_released.load(Ordering::SeqCst),
            1,
            "handed back, released by us"
        );
        assert_eq!(
            waker.woken(),
            1,
            "the waiter registered mid-close was woken"
        );
        let mut wait = parked.lock().unwrap().take().unwrap();
        assert_eq!(
            poll_once(&mut wait, &Waker::noop().clone()),
            Poll::Ready(CloseReason::ClientClosed)
        );
        assert_eq!(s.traffic().bytes_in, 10);
    });
}

#[test]
fn panicking_and_reentrant_releases_racing_closers_still_release_everything_once() {
    bounded("panicking releases", || {
        const ROUNDS: u64 = 100;
        const THREADS: usize = 6;
        for round in 0..ROUNDS {
            let s = session(round);
            let released = Arc::new(AtomicUsize::new(0));
            for i in 0..10 {
                let released = Arc::clone(&released);
                let me = s.clone();
                s.attach(move |_: CloseReason| {
                    released.fetch_add(1, Ordering::SeqCst);
                    if i % 3 == 0 {
                        // Re-enter, then panic: contained.
                        let _ = me.close(CloseReason::Shutdown);
                        panic!("release {i} panics on purpose");
                    }
                })
                .unwrap();
            }
            let waker = CountingWaker::new(|| {});
            let mut wait = s.closed_owned();
            assert!(poll_once(&mut wait, &Waker::from(Arc::clone(&waker))).is_pending());
            let barrier = Arc::new(Barrier::new(THREADS));
            let closers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let s = s.clone();
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        barrier.wait();
                        s.close(REASONS[t % REASONS.len()]).won()
                    })
                })
                .collect();
            let wins = closers
                .into_iter()
                .map(|c| c.join().expect("a close never panics"))
                .filter(|won| *won)
                .count();
            assert_eq!(wins, 1, "round {round}");
            assert_eq!(released.load(Ordering::SeqCst), 10, "round {round}");
            assert_eq!(waker.woken(), 1, "round {round}: the waiter woke once");
            let reason = s.close_reason().unwrap();
            assert_eq!(poll_once(&mut wait, Waker::noop()), Poll::Ready(reason));
        }
    });
}

#[test]
fn a_release_may_drop_the_last_other_handle_and_a_registered_waiter() {
    bounded("release drops handles", || {
        let s = session(1);
        let waker = CountingWaker::new(|| {});
        // A registered waiter and a clone of the session, owned by the resource.
        let mut wait = s.closed_owned();
        assert!(poll_once(&mut wait, &Waker::from(Arc::clone(&waker))).is_pending());
        let clone = s.clone();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dropped);
        s.attach(move |_: CloseReason| {
            drop(wait); // leaves the waiter list from inside the close
            drop(clone);
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap();
        // A second waiter that stays.
        let stays = CountingWaker::new(|| {});
        let mut wait2 = s.closed_owned();
        assert!(poll_once(&mut wait2, &Waker::from(Arc::clone(&stays))).is_pending());
        assert!(s.close(CloseReason::Reclaimed).won());
        assert!(dropped.load(Ordering::SeqCst));
        assert_eq!(waker.woken(), 0, "the waiter that left is not woken");
        assert_eq!(stays.woken(), 1, "the waiter that stayed is woken");
        assert_eq!(
            poll_once(&mut wait2, Waker::noop()),
            Poll::Ready(CloseReason::Reclaimed)
        );
    });
}

// ---------------------------------------------------------------------------
// Close waiters

#[test]
fn a_waker_that_reenters_the_session_on_wake_is_fine() {
    bounded("re-entrant waker", || {
        let s = NewSession::new(SessionId::new(3), RouterId::new(3), Incarnation::new(3))
            .token(b"t".to_vec())
            .into_session();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let me = s.clone();
        let log = Arc::clone(&seen);
        let waker = CountingWaker::new(move || {
            let mut log = log.lock().unwrap();
            log.push(format!("{:?}", me.close(CloseReason::Forced)));
            log.push(format!("{}", me.attach(|_: CloseReason| {}).is_err()));
            let mut fresh = me.closed();
            log.push(format!("{:?}", poll_once(&mut fresh, Waker::noop())));
            log.push(format!("{}", me.with_token(|t| t.is_none())));
        });
        let mut wait = s.closed();
        assert!(poll_once(&mut wait, &Waker::from(Arc::clone(&waker))).is_pending());
        assert!(s.close(CloseReason::RouterLost).won());
        assert_eq!(waker.woken(), 1);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                format!(
                    "{:?}",
                    CloseOutcome::AlreadyClosed {
                        reason: CloseReason::RouterLost
                    }
                ),
                "true".to_owned(),
                format!("{:?}", Poll::Ready(CloseReason::RouterLost)),
                "true".to_owned(),
            ]
        );
        assert_eq!(
            poll_once(&mut wait, Waker::noop()),
            Poll::Ready(CloseReason::RouterLost)
        );
    });
}

#[test]
fn a_panicking_waker_does_not_cost_the_other_waiters_their_wake_up() {
    bounded("panicking waker", || {
        let s = session(4);
        let bad = CountingWaker::new(|| panic!("this waker panics on purpose"));
        let good = CountingWaker::new(|| {});
        let mut first = s.closed_owned();
        assert!(poll_once(&mut first, &Waker::from(Arc::clone(&bad))).is_pending());
        let mut second = s.closed_owned();
        assert!(poll_once(&mut second, &Waker::from(Arc::clone(&good))).is_pending());
        let closer = s.clone();
        let close = thread::spawn(move || closer.close(CloseReason::ClientClosed)).join();
        assert_eq!(bad.woken(), 1);
        assert_eq!(
            good.woken(),
            1,
            "a waiter missed its wake-up because another waiter's waker panicked \
             (close returned {close:?})"
        );
    });
}

#[test]
fn waiters_before_during_and_after_the_close_on_many_tasks_all_resolve_after_the_releases() {
    bounded("waiters on tasks", || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for round in 0..50u64 {
                let s = session(round);
                let released = Arc::new(AtomicUsize::new(0));
                for _ in 0..5 {
                    let released = Arc::clone(&released);
                    s.attach(move |_: CloseReason| {
                        released.fetch_add(1, Ordering::SeqCst);
                    })
                    .unwrap();
                }
                let spawn_waiter = |s: &Session| {
                    let waiter = s.closed_owned();
                    let released = Arc::clone(&released);
                    tokio::spawn(async move {
                        let reason = waiter.await;
                        (reason, released.load(Ordering::SeqCst))
                    })
                };
                let before: Vec<_> = (0..20).map(|_| spawn_waiter(&s)).collect();
                // Waiters that are dropped mid-way, some polled, some not.
                let abandoned: Vec<_> = (0..20).map(|_| spawn_waiter(&s)).collect();
                tokio::task::yield_now().await;
                for task in &abandoned {
                    task.abort();
                }
                let closer = {
                    let s = s.clone();
                    tokio::task::spawn_blocking(move || s.close(CloseReason::Expired))
                };
                let during: Vec<_> = (0..20).map(|_| spawn_waiter(&s)).collect();
                assert!(closer.await.unwrap().won());
                let after: Vec<_> = (0..5).map(|_| spawn_waiter(&s)).collect();
                for task in before.into_iter().chain(during).chain(after) {
                    let (reason, released_then) = task.await.unwrap();
                    assert_eq!(reason, CloseReason::Expired, "round {round}");
                    assert_eq!(released_then, 5, "round {round}: woke before the releases");
                }
                for task in abandoned {
                    match task.await {
                        Ok((reason, _)) => assert_eq!(reason, CloseReason::Expired),
                        Err(error) => assert!(error.is_cancelled()),
                    }
                }
                assert_eq!(s.closed().await, CloseReason::Expired);
            }
        });
    });
}

// ---------------------------------------------------------------------------
// Tokens

#[test]
fn a_token_reader_racing_the_close_sees_the_whole_token_or_none() {
    bounded("token readers", || {
        const ROUNDS: u64 = 200;
        let secret: Vec<u8> = (0..4096u32).map(|i| (i % 251 + 1) as u8).collect();
        for round in 0..ROUNDS {
            let s = NewSession::new(SessionId::new(round), RouterId::new(1), Incarnation::new(1))
                .token(secret.clone())
                .into_session();
            let barrier = Arc::new(Barrier::new(5));
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    let s = s.clone();
                    let secret = secret.clone();
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        barrier.wait();
                        let mut saw_none = false;
                        for _ in 0..50 {
                            s.with_token(|t| match t {
                                Some(bytes) => {
                                    assert!(!saw_none, "the token came back after the close");
                                    // Read twice: the close may land between the reads.
                                    assert_eq!(bytes, secret.as_slice());
                                    thread::yield_now();
                                    assert_eq!(bytes, secret.as_slice(), "wiped under a reader");
                                }
                                None => saw_none = true,
                            });
                        }
                    })
                })
                .collect();
            barrier.wait();
            assert!(s.close(CloseReason::ClientClosed).won());
            for reader in readers {
                reader.join().unwrap();
            }
            assert!(
                s.with_token(|t| t.is_none()),
                "round {round}: wiped on close"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Traffic

#[test]
fn traffic_counters_lose_no_update_under_contention() {
    bounded("traffic contention", || {
        const THREADS: u64 = 8;
        const PACKETS: u64 = 20_000;
        let s = session(1);
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = s.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    for i in 0..PACKETS {
                        s.record_in(t + 1);
                        s.record_out(i % 3);
                        if i == PACKETS / 2 && t == 0 {
                            let _ = s.close(CloseReason::ClientClosed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let traffic = s.traffic();
        assert_eq!(traffic.packets_in, THREADS * PACKETS);
        assert_eq!(traffic.packets_out, THREADS * PACKETS);
        assert_eq!(traffic.bytes_in, PACKETS * (1..=THREADS).sum::<u64>());
        let out_per_thread: u64 = (0..PACKETS).map(|i| i % 3).sum();
        assert_eq!(traffic.bytes_out, THREADS * out_per_thread);
        assert_eq!(traffic.total_bytes(), traffic.bytes_in + traffic.bytes_out);
    });
}

#[test]
fn huge_packets_never_panic_and_byte_counters_never_go_down() {
    bounded("huge packets", || {
        let s = session(1);
        s.record_in(u64::MAX);
        s.record_out(u64::MAX);
        let first = s.traffic();
        assert_eq!(first.total_bytes(), u64::MAX, "documented to saturate");
        s.record_in(u64::MAX);
        s.record_in(1);
        s.record_out(2);
        let second = s.traffic();
        assert_eq!(second.packets_in, 3);
        assert_eq!(second.packets_out, 2);
        assert!(
            second.bytes_in >= first.bytes_in && second.bytes_out >= first.bytes_out,
            "a byte counter went down: {first:?} then {second:?}"
        );
        assert!(second.total_bytes() >= first.total_bytes());
    });
}

// ---------------------------------------------------------------------------
// NewSession with extreme inputs

#[test]
fn extreme_ids_tokens_and_expiries_build_working_sessions() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        for raw in [0, 1, u64::MAX] {
            let s = NewSession::new(
                SessionId::new(raw),
                RouterId::new(raw),
                Incarnation::new(raw),
            )
            .token(Vec::new())
            .payload(vec![0u8; 1 << 20])
            .expires_in(Duration::MAX)
            .into_session();
            assert_eq!(s.id().get(), raw);
            assert_eq!(s.router().get(), raw);
            assert_eq!(s.incarnation().get(), raw);
            assert_eq!(s.expires_at(), None, "a ttl past the clock: no expiry");
            assert!(
                s.with_token(|t| t == Some(&[][..])),
                "an empty token is a token"
            );
            assert_eq!(s.payload().len(), 1 << 20);
            assert!(s.close(CloseReason::ClientClosed).won());
            assert!(s.with_token(|t| t.is_none()));
        }
        for generation in [0, u64::MAX] {
            let s = NewSession::new(
                SessionId::new(u64::MAX),
                RouterId::new(1),
                Incarnation::new(1),
            )
            .into_session_with_generation(generation);
            assert_eq!(s.key().id(), SessionId::new(u64::MAX));
        }

        // A 16 MiB token is kept whole and wiped on close.
        let big = vec![0xA5u8; 16 << 20];
        let s = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .token(big.clone())
            .into_session();
        assert!(s.with_token(|t| t == Some(big.as_slice())));
        assert!(s.close(CloseReason::Forced).won());
        assert!(s.with_token(|t| t.is_none()));

        // An expiry before creation reads as the creation; one absurdly far
        // away as none; extensions past the clock are accepted, never panic.
        let now = Instant::now();
        let early = NewSession::new(SessionId::new(2), RouterId::new(1), Incarnation::new(1))
            .expires_at(now - Duration::from_secs(5))
            .into_session();
        assert_eq!(early.expires_at(), Some(early.created_at()));
        let far = now + Duration::from_secs(200 * 365 * 24 * 3600);
        let never = NewSession::new(SessionId::new(3), RouterId::new(1), Incarnation::new(1))
            .expires_at(far)
            .into_session();
        assert_eq!(never.expires_at(), None, "more than 146 years: never");
        let s = NewSession::new(SessionId::new(4), RouterId::new(1), Incarnation::new(1))
            .expires_in(Duration::from_secs(1))
            .into_session();
        assert!(s.extend_expiry(far).is_ok());
        assert_eq!(s.expires_at(), None);
        assert!(s.extend_expiry(now + Duration::from_secs(2)).is_ok());
        assert_eq!(s.expires_at(), None, "never is final");
        assert!(s.close(CloseReason::ClientClosed).won());
        assert!(s.extend_expiry(far).is_err(), "closed: a typed error");
    });
}

#[test]
fn sessions_built_on_many_threads_have_distinct_keys() {
    bounded("distinct keys", || {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 5_000;
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    (0..PER_THREAD)
                        .map(|_| session(42).key())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut keys = HashSet::new();
        for t in threads {
            for key in t.join().unwrap() {
                assert!(keys.insert(key), "two sessions share the key {key:?}");
            }
        }
        assert_eq!(keys.len(), THREADS * PER_THREAD);
    });
}

#[test]
fn racing_extensions_only_ever_move_the_expiry_later() {
    bounded("racing extensions", || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let now = Instant::now();
        let s = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
            .expires_at(now + Duration::from_secs(1))
            .into_session();
        const THREADS: u64 = 6;
        let barrier = Arc::new(Barrier::new(THREADS as usize + 1));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = s.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    for i in 0..2_000u64 {
                        let at = now + Duration::from_millis((i * 7 + t * 13) % 10_000);
                        s.extend_expiry(at).unwrap();
                        assert!(s.expires_at().unwrap() >= at, "Ok means at least `at`");
                    }
                })
            })
            .collect();
        barrier.wait();
        let mut last = s.expires_at().unwrap();
        while threads.iter().any(|t| !t.is_finished()) {
            let at = s.expires_at().unwrap();
            assert!(at >= last, "the expiry moved earlier");
            last = at;
            thread::yield_now();
        }
        for t in threads {
            t.join().unwrap();
        }
        let max = (0..THREADS)
            .flat_map(|t| (0..2_000u64).map(move |i| (i * 7 + t * 13) % 10_000))
            .max()
            .unwrap();
        assert_eq!(s.expires_at(), Some(now + Duration::from_millis(max)));
    });
}

#[test]
fn a_waiter_repolled_with_new_wakers_while_the_close_lands_wakes_its_last_waker() {
    bounded("waker replacement", || {
        const ROUNDS: u64 = 300;
        for round in 0..ROUNDS {
            let s = session(round);
            let barrier = Arc::new(Barrier::new(2));
            let poller = {
                let s = s.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    let mut wait = s.closed_owned();
                    barrier.wait();
                    let mut last: Option<Arc<CountingWaker>> = None;
                    for _ in 0..200 {
                        let waker = CountingWaker::new(|| {});
                        match poll_once(&mut wait, &Waker::from(Arc::clone(&waker))) {
                            Poll::Pending => last = Some(waker),
                            Poll::Ready(reason) => return (Some(reason), None, wait),
                        }
                    }
                    // The waiter is handed back, not dropped: a dropped waiter
                    // leaves and is rightly never woken.
                    (None, last, wait)
                })
            };
            barrier.wait();
            assert!(s.close(CloseReason::Shutdown).won());
            let (ready, last, _wait) = poller.join().unwrap();
            match (ready, last) {
                (Some(reason), _) => assert_eq!(reason, CloseReason::Shutdown),
                (None, Some(waker)) => assert_eq!(
                    waker.woken(),
                    1,
                    "round {round}: the last waker given to a pending poll was not woken"
                ),
                (None, None) => unreachable!("200 polls give a result"),
            }
        }
    });
}
