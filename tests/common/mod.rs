//! Shared test kit: a scripted notifier and a router full of observable
//! sessions.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use session_lifecycle::{
    CloseReason, DeleteError, DeleteOutcome, DeletionReport, Incarnation, MemoryStore, NewSession,
    NotifyError, RouterId, Session, SessionId, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::task::JoinHandle;
use tokio::time::Duration;

/// What the scripted notifier does with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Confirms every session of the batch, then returns `Ok`.
    Ok,
    /// Confirms the sessions with an even id, then returns `Ok`.
    Partial,
    /// Returns an error, confirming nothing.
    Error,
    /// Sleeps 300 ms, then confirms every session and returns `Ok`.
    Slow,
    /// Never returns.
    Never,
    /// Panics.
    Panic,
}

pub const BEHAVIOURS: [Behaviour; 6] = [
    Behaviour::Ok,
    Behaviour::Partial,
    Behaviour::Error,
    Behaviour::Slow,
    Behaviour::Never,
    Behaviour::Panic,
];

/// A notifier that behaves as scripted on the first round and on retries,
/// confirming through the store as a router's answers would.
pub struct Scripted {
    pub store: Arc<MemoryStore>,
    pub first: Behaviour,
    pub retries: Behaviour,
    pub calls: AtomicU32,
}

impl Scripted {
    pub fn new(store: Arc<MemoryStore>, first: Behaviour, retries: Behaviour) -> Self {
        Self {
            store,
            first,
            retries,
            calls: AtomicU32::new(0),
        }
    }

    async fn confirm(&self, ids: impl Iterator<Item = SessionId>) {
        for id in ids {
            let _ = self.store.close(id, CloseReason::RouterDeleted).await;
        }
    }
}

impl TerminationNotifier for Scripted {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let behaviour = if batch.round == 0 {
            self.first
        } else {
            self.retries
        };
        match behaviour {
            Behaviour::Ok => self.confirm(batch.sessions.into_iter()).await,
            Behaviour::Partial => {
                self.confirm(batch.sessions.into_iter().filter(|id| id.get() % 2 == 0))
                    .await;
            }
            Behaviour::Error => return Err(NotifyError::msg("router unreachable")),
            Behaviour::Slow => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.confirm(batch.sessions.into_iter()).await;
            }
            Behaviour::Never => std::future::pending::<()>().await,
            Behaviour::Panic => panic!("scripted notifier panic"),
        }
        Ok(())
    }
}

/// A router's sessions, each with a counting resource and a close waiter.
pub struct Observed {
    pub router: RouterId,
    pub incarnation: Incarnation,
    pub sessions: Vec<Session>,
    pub releases: Vec<Arc<AtomicUsize>>,
    pub waiters: Vec<JoinHandle<CloseReason>>,
}

pub async fn observed_router(
    store: &MemoryStore,
    router: RouterId,
    first_id: u64,
    n: u64,
) -> Observed {
    let incarnation = store.register_router(router).await.unwrap();
    let mut observed = Observed {
        router,
        incarnation,
        sessions: Vec::new(),
        releases: Vec::new(),
        waiters: Vec::new(),
    };
    for id in first_id..first_id + n {
        let session = store
            .create(NewSession::new(SessionId::new(id), router, incarnation))
            .await
            .unwrap();
        let released = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&released);
        session
            .attach(move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        observed.waiters.push(tokio::spawn(session.closed_owned()));
        observed.releases.push(released);
        observed.sessions.push(session);
    }
    observed
}

impl Observed {
    /// I1: nothing of the router in the store, every session closed, every
    /// resource released exactly once, every waiter woken.
    pub async fn assert_deleted(self, store: &MemoryStore) {
        assert_eq!(
            store.router_status(self.router).await.unwrap(),
            session_lifecycle::RouterStatus::Deleted(self.incarnation)
        );
        assert_eq!(store.count(self.router).await.unwrap(), 0);
        for session in &self.sessions {
            assert!(session.is_closed(), "{session:?} is not closed");
            assert!(
                store.get(session.id()).await.unwrap().is_none(),
                "{session:?} still stored"
            );
        }
        for released in &self.releases {
            assert_eq!(released.load(Ordering::SeqCst), 1, "resource released once");
        }
        for waiter in self.waiters {
            let reason = tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .expect("a close waiter did not wake")
                .unwrap();
            assert!(
                matches!(
                    reason,
                    CloseReason::RouterDeleted | CloseReason::Forced | CloseReason::ClientClosed
                ),
                "{reason}"
            );
        }
    }

    pub fn count_reason(&self, reason: CloseReason) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.close_reason() == Some(reason))
            .count()
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`:
/// a broken run shows up as a failure, not as a hung test. Under paused
/// time the limit costs nothing, the clock jumps to it.
pub async fn within<F: std::future::Future>(limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("not finished within {limit:?}"),
    }
}

/// A generous bound for a paused-time delete: far beyond any deadline +
/// retry schedule used by the tests.
pub const HOUR: Duration = Duration::from_secs(3_600);

/// Runs a deletion to its end within `limit` and returns its report;
/// fails the test on any other outcome.
pub async fn report_within<F>(limit: Duration, delete: F) -> DeletionReport
where
    F: std::future::Future<Output = Result<DeleteOutcome, DeleteError>>,
{
    match within(limit, delete).await {
        Ok(DeleteOutcome::Deleted(report)) => report,
        other => panic!("expected a deletion report, got {other:?}"),
    }
}

/// A scripted notifier confirming through `store`.
pub fn scripted(store: &Arc<MemoryStore>, first: Behaviour, retries: Behaviour) -> Arc<Scripted> {
    Arc::new(Scripted::new(Arc::clone(store), first, retries))
}

/// A resource whose release blocks its thread until the gate opens: a close
/// that is won (the session reads `Closed`) but not yet complete.
pub struct SlowRelease {
    gate: std::sync::mpsc::Sender<()>,
    /// Set once the release has run.
    pub released: Arc<std::sync::atomic::AtomicBool>,
}

impl SlowRelease {
    /// Attaches a slow release to `session`.
    pub fn attach(session: &Session) -> Self {
        let (gate, wait) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::clone(&released);
        session
            .attach(move |_| {
                let _ = wait.recv();
                done.store(true, Ordering::SeqCst);
            })
            .unwrap();
        Self { gate, released }
    }

    /// Opens the gate `delay` from now, from a timer task; returns the flag
    /// telling whether the release has run.
    pub fn open_after(self, delay: Duration) -> Arc<std::sync::atomic::AtomicBool> {
        let Self { gate, released } = self;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = gate.send(());
        });
        released
    }
}

/// What the recording prober answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Nobody answers.
    Nobody,
    /// Every probed session answers in the call's result.
    Everyone,
    /// Each probed session answers with probability `per_mille / 1000`
    /// (deterministic: a xorshift seeded per prober).
    Some { per_mille: u64 },
}

/// A prober that records every call and answers as told.
pub struct RecordingProber {
    pub answer: Answer,
    pub calls: parking_lot::Mutex<Vec<session_lifecycle::ProbeBatch>>,
    rng: parking_lot::Mutex<Rng>,
}

impl RecordingProber {
    pub fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer,
            calls: parking_lot::Mutex::new(Vec::new()),
            rng: parking_lot::Mutex::new(Rng::new(0x5eed)),
        })
    }

    /// Calls made for `router`, with how many sessions each carried.
    pub fn calls_for(&self, router: RouterId) -> Vec<usize> {
        self.calls
            .lock()
            .iter()
            .filter(|batch| batch.router == router)
            .map(|batch| batch.sessions.len())
            .collect()
    }
}

impl session_lifecycle::Prober for RecordingProber {
    async fn probe(
        &self,
        batch: session_lifecycle::ProbeBatch,
    ) -> Result<Vec<SessionId>, session_lifecycle::ProbeError> {
        self.calls.lock().push(batch.clone());
        Ok(match self.answer {
            Answer::Nobody => Vec::new(),
            Answer::Everyone => batch.sessions,
            Answer::Some { per_mille } => {
                let mut rng = self.rng.lock();
                batch
                    .sessions
                    .into_iter()
                    .filter(|_| rng.below(1_000) < per_mille)
                    .collect()
            }
        })
    }
}

/// A small deterministic xorshift generator for simulations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}
