//! The liveness monitor on a two-thread runtime in real time: heartbeats
//! from two tasks, clients closing sessions while they are watched, dead
//! sessions reaped through a reclaim queue. Every resource is released
//! exactly once, by the right path, and no live session is convicted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use session_lifecycle::test_util::{Probe, ScriptedProber, Subset};
use session_lifecycle::{
    CloseReason, LivenessMonitor, MemoryStore, NewSession, ReclaimQueue, RouterId, Session,
    SessionId, SessionStore,
};
use tokio::time::Duration;

const ROUTERS: u64 = 20;
const PER_ROUTER: u64 = 500;
const BEAT: Duration = Duration::from_millis(20);
/// Heartbeat rounds each heartbeating task runs (2 s in all).
const ROUNDS: u32 = 100;

fn is_dead(id: SessionId) -> bool {
    id.get().is_multiple_of(10)
}

fn closed_by_client(id: SessionId) -> bool {
    id.get() % 10 == 5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_sessions_are_reaped_once_while_clients_close_and_live_ones_beat() {
    let store = Arc::new(MemoryStore::new());
    let queue = ReclaimQueue::builder().capacity(256).build().unwrap();
    let monitor = LivenessMonitor::builder()
        .heartbeat_interval(BEAT)
        .granularity(Duration::from_millis(5))
        .timeout_range(BEAT, Duration::from_secs(2))
        .pause_allowance(Duration::from_millis(50))
        .probe_timeout(BEAT)
        .reclaim_queue(queue.clone())
        // Live routers answer for every session but the dead ones.
        .build(
            Arc::clone(&store),
            ScriptedProber::always(Probe::Answer(Subset::Filter(|id, _round| !is_dead(id)))),
        )
        .unwrap();
    let mut sessions: Vec<(Session, Arc<AtomicU32>)> = Vec::new();
    for r in 0..ROUTERS {
        let router = RouterId::new(r);
        let incarnation = store.register_router(router).await.unwrap();
        for i in 0..PER_ROUTER {
            let id = SessionId::new(r * PER_ROUTER + i);
            let session = store
                .create(NewSession::new(id, router, incarnation))
                .await
                .unwrap();
            let releases = Arc::new(AtomicU32::new(0));
            let counted = Arc::clone(&releases);
            session
                .attach(move |_| {
                    counted.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            monitor.watch(&session).unwrap();
            sessions.push((session, releases));
        }
    }
    let beating: Vec<Session> = sessions
        .iter()
        .map(|(s, _)| s.clone())
        .filter(|s| !is_dead(s.id()))
        .collect();
    let halves: Vec<Vec<Session>> = beating
        .chunks(beating.len() / 2 + 1)
        .map(<[_]>::to_vec)
        .collect();
    let mut tasks = Vec::new();
    for half in halves {
        let monitor = monitor.clone();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(BEAT);
            for _ in 0..ROUNDS {
                every.tick().await;
                for session in &half {
                    // Fails only for the sessions clients closed.
                    let _ = monitor.heartbeat(session);
                }
            }
        }));
    }
    // Clients leave while their sessions are watched and beating.
    let clients = {
        let (store, leaving): (_, Vec<SessionId>) = (
            Arc::clone(&store),
            beating
                .iter()
                .map(Session::id)
                .filter(|id| closed_by_client(*id))
                .collect(),
        );
        tokio::spawn(async move {
            for chunk in leaving.chunks(50) {
                for id in chunk {
                    let _ = store.close(*id, CloseReason::ClientClosed).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let bound = monitor.reap_bound(Duration::from_secs(2));
    for (session, _) in sessions.iter().filter(|(s, _)| is_dead(s.id())) {
        tokio::time::timeout(bound, session.closed())
            .await
            .expect("a dead session reaped within the bound");
    }
    clients.await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    queue.idle().await;

    let dead = ROUTERS * PER_ROUTER / 10;
    for (session, releases) in &sessions {
        let id = session.id();
        let (reason, released) = (session.close_reason(), releases.load(Ordering::SeqCst));
        if is_dead(id) {
            assert_eq!(
                (reason, released),
                (Some(CloseReason::LivenessTimeout), 1),
                "{id}"
            );
            assert!(
                store.get(id).await.unwrap().is_none(),
                "{id} left in the store"
            );
        } else if closed_by_client(id) {
            assert_eq!(
                (reason, released),
                (Some(CloseReason::ClientClosed), 1),
                "{id}"
            );
        } else {
            assert_eq!((reason, released), (None, 0), "{id} convicted while alive");
        }
    }
    let stats = monitor.stats();
    assert_eq!(stats.reaped, dead, "{stats:?}");
    assert_eq!(queue.stats().completed, dead);
    assert!(store.audit().await.unwrap().is_clean());
    monitor.shutdown().await;
}
