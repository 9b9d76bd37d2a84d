//! A liveness monitor taken over by another (a review of stop 33's
//! takeover): a monitor whose runtime was dropped accepted heartbeats
//! through its handles, and one racing the takeover wrote its clock (an
//! hour ahead) into a session the replacement watched, which was then not
//! reaped within the replacement's `reap_bound` (failed before).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::liveness::NoProbe;
use session_lifecycle::{
    CloseReason, LivenessMonitor, MemoryStore, NewSession, RouterId, Session, SessionId,
    SessionStore,
};
use tokio::time::Duration;

fn paused_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// The old monitor's runtime is dropped (its tasks with it: its tag is
/// "gone"), and a replacement takes its sessions over while the
/// controller's heartbeat path still calls the old handle. A heartbeat the
/// old monitor accepts must never land on a session the new one watches:
/// it would write the old monitor's clock (an hour on) into it, and a dead
/// session would not be reaped within the new monitor's `reap_bound`.
#[test]
fn a_heartbeat_to_a_monitor_whose_runtime_died_never_counts_for_its_replacement() {
    takeover_race(true);
}

/// Control: the same without the old handle's heartbeats; all are reaped.
#[test]
fn control_takeover_without_heartbeats_reaps_all() {
    takeover_race(false);
}

fn takeover_race(beat: bool) {
    const N: u64 = 20_000;
    let rt1 = paused_rt();
    let (store, old, sessions) = rt1.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let old = LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap();
        // The old monitor has run for an hour: its clock reads ~3.6e6 ms.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let mut sessions = Vec::new();
        for id in 0..N {
            let s = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
            old.watch(&s).unwrap();
            sessions.push(s);
        }
        tokio::task::yield_now().await;
        (store, old, sessions)
    });
    drop(rt1); // the old monitor's tasks go with its runtime

    let rt2 = paused_rt();
    let new = rt2.block_on(async {
        LivenessMonitor::builder()
            .build(Arc::clone(&store), NoProbe)
            .unwrap()
    });
    let sessions: Arc<Vec<Session>> = Arc::new(sessions);
    let progress = Arc::new(AtomicUsize::new(0));
    // The heartbeat path, still on the old handle: beats session i until
    // the takeover of i is done.
    let beater = {
        let (sessions, progress, old) = (Arc::clone(&sessions), Arc::clone(&progress), old.clone());
        std::thread::spawn(move || {
            let mut accepted_after = 0usize;
            for i in 0..sessions.len() {
                while progress.load(Ordering::Acquire) <= i {
                    if beat {
                        let _ = old.heartbeat(&sessions[i]);
                    }
                }
                // After the takeover of i, the old handle must refuse.
                if old.heartbeat(&sessions[i]).is_ok() {
                    accepted_after += 1;
                }
            }
            accepted_after
        })
    };
    {
        let _enter = rt2.enter();
        for (i, s) in sessions.iter().enumerate() {
            // Give the beater a moment on this session.
            for _ in 0..50 {
                std::hint::spin_loop();
            }
            new.watch(s).expect("the old monitor is gone: takeover");
            progress.store(i + 1, Ordering::Release);
        }
    }
    let accepted_after = beater.join().unwrap();
    assert_eq!(accepted_after, 0);
    // Nobody heartbeats any more: every session must be reaped within the
    // new monitor's bound.
    let unreaped = rt2.block_on(async {
        let bound = new.reap_bound(new.timeout(&sessions[0]).unwrap_or(Duration::from_secs(60)));
        let bound = bound.max(new.reap_bound(Duration::from_secs(60)));
        tokio::time::sleep(bound + Duration::from_secs(1)).await;
        sessions
            .iter()
            .filter(|s| s.close_reason() != Some(CloseReason::LivenessTimeout))
            .count()
    });
    assert_eq!(
        unreaped, 0,
        "{unreaped} of {N} silent sessions not reaped within the new monitor's reap bound: \
         the old monitor's heartbeat landed after the takeover's reset"
    );
}

/// A prober that never answers (its future hangs); says when it is called.
struct Hang(Arc<tokio::sync::Notify>);

impl session_lifecycle::Prober for Hang {
    async fn probe(
        &self,
        _batch: session_lifecycle::ProbeBatch,
    ) -> Result<Vec<SessionId>, session_lifecycle::ProbeError> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// The old monitor's handle is dropped (not shut down) while its driver
/// has the session in a probe round: a replacement is refused until the
/// old tasks ended, then takes over, and only it reaps.
#[tokio::test(start_paused = true)]
async fn a_dropped_monitor_mid_round_is_taken_over_only_once_its_tasks_ended() {
    let store = Arc::new(MemoryStore::new());
    let router = RouterId::new(1);
    let incarnation = store.register_router(router).await.unwrap();
    let s = store
        .create(NewSession::new(SessionId::new(1), router, incarnation))
        .await
        .unwrap();
    let probed = Arc::new(tokio::sync::Notify::new());
    let old = LivenessMonitor::builder()
        .build(Arc::clone(&store), Hang(Arc::clone(&probed)))
        .unwrap();
    old.watch(&s).unwrap();
    let clone = old.clone();
    tokio::time::timeout(Duration::from_secs(3600), probed.notified())
        .await
        .unwrap();
    assert!(old.stats().probes > 0);
    drop(old);
    let new = LivenessMonitor::builder()
        .build(Arc::clone(&store), NoProbe)
        .unwrap();
    // A clone still holds the old monitor: it runs.
    tokio::task::yield_now().await;
    assert!(new.watch(&s).is_err(), "the old monitor still runs");
    drop(clone);
    // Its driver is in its round: refused before its tasks ran.
    assert!(new.watch(&s).is_err(), "the old driver holds the session");
    let mut tries = 0;
    while new.watch(&s).is_err() {
        tries += 1;
        assert!(tries < 1000, "never taken over");
        tokio::task::yield_now().await;
    }
    let bound = new.reap_bound(new.timeout(&s).unwrap());
    let reason = tokio::time::timeout(bound, s.closed()).await;
    assert_eq!(reason, Ok(CloseReason::LivenessTimeout));
    assert_eq!(new.stats().reaped, 1);
}
