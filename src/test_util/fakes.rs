//! Scripted fakes of the two callbacks a controller writes: the
//! [`TerminationNotifier`] and the [`Prober`].
//!
//! # Deadlock safety
//!
//! Each fake has one lock, its call log, taken only to push or copy a
//! record and never across an `.await`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::time::{Duration, Instant};

use super::script::{Call, Script, Subset};
use crate::deleter::Confirmations;
use crate::{
    CloseReason, NotifyError, ProbeBatch, ProbeError, Prober, RouterId, SessionId, SessionKey,
    SessionStore, TerminationBatch, TerminationNotifier,
};

/// What a scripted router does with one termination notice.
///
/// A router confirms a termination by closing the session in the store with
/// [`CloseReason::RouterDeleted`], as a controller does when the router's
/// confirmation arrives. It closes by [`SessionKey`] (that very life of the
/// id, [`SessionStore::close_exact`], or by handle through the batch's
/// confirmations): a `Slow` or `Later` confirmation that lands after the
/// deletion ended closes nothing, not even a later session that reuses the
/// id.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use session_lifecycle::test_util::{Notify, Subset};
///
/// let flaky = [
///     Notify::confirm_all(),
///     Notify::Confirm(Subset::EvenIds),
///     Notify::Error,
///     Notify::Slow { delay: Duration::from_millis(300), confirm: Subset::All },
///     Notify::Later { delay: Duration::from_millis(20), confirm: Subset::All },
///     Notify::Never,
///     Notify::Panic,
/// ];
/// assert_eq!(flaky.len(), 7);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notify {
    /// Confirms the subset of the batch, then returns `Ok`.
    Confirm(Subset),
    /// Waits `delay`, confirms the subset, then returns `Ok`: a slow
    /// transport.
    Slow {
        /// How long the call takes.
        delay: Duration,
        /// What it confirms.
        confirm: Subset,
    },
    /// Returns `Ok` at once and confirms the subset `delay` later, from a
    /// task of its own: a router that answers asynchronously.
    Later {
        /// How long after the call the confirmations arrive.
        delay: Duration,
        /// What is confirmed.
        confirm: Subset,
    },
    /// Returns an error and confirms nothing.
    Error,
    /// Never returns.
    Never,
    /// Panics.
    Panic,
}

impl Notify {
    /// Confirms every session of the batch at once.
    #[must_use]
    pub const fn confirm_all() -> Self {
        Self::Confirm(Subset::All)
    }
}

/// What a scripted router does with one probe.
///
/// # Example
///
/// ```
/// use session_lifecycle::test_util::{Probe, Subset};
///
/// assert_eq!(Probe::everyone(), Probe::Answer(Subset::All));
/// assert_eq!(Probe::nobody(), Probe::Answer(Subset::None));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Probe {
    /// The subset of the probed sessions answers.
    Answer(Subset),
    /// Waits `delay`, then the subset answers.
    Slow {
        /// How long the call takes.
        delay: Duration,
        /// Who answers.
        answer: Subset,
    },
    /// The probe fails.
    Error,
    /// Never returns.
    Never,
    /// Panics.
    Panic,
}

impl Probe {
    /// Every probed session answers.
    #[must_use]
    pub const fn everyone() -> Self {
        Self::Answer(Subset::All)
    }

    /// No probed session answers.
    #[must_use]
    pub const fn nobody() -> Self {
        Self::Answer(Subset::None)
    }
}

/// One call a fake received, with the behaviour its script chose.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recorded<T, B> {
    /// What the fake was called with.
    pub batch: T,
    /// What it did.
    pub behaviour: B,
    /// When it was called (tokio's clock).
    pub at: Instant,
}

/// A notice a [`ScriptedNotifier`] received.
pub type NotifyCall = Recorded<TerminationBatch, Notify>;
/// A probe a [`ScriptedProber`] received.
pub type ProbeCall = Recorded<ProbeBatch, Probe>;

/// The call log both fakes keep.
#[derive(Debug)]
struct Log<T, B> {
    calls: Mutex<Vec<Recorded<T, B>>>,
    next: AtomicU64,
}

impl<T: Clone, B: Clone> Log<T, B> {
    fn new() -> Self {
        Self {
            calls: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }

    /// Numbers the call, asks the script, records both; returns the
    /// behaviour. Recorded before it runs: a call that panics or never
    /// returns is in the log too.
    fn record(&self, script: &Script<B>, batch: &T, call: impl FnOnce(u64) -> Call) -> B {
        // Relaxed: a counter; the log's lock orders the records.
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let behaviour = script.pick(call(index));
        self.calls.lock().push(Recorded {
            batch: batch.clone(),
            behaviour: behaviour.clone(),
            at: Instant::now(),
        });
        behaviour
    }

    fn snapshot(&self) -> Vec<Recorded<T, B>> {
        self.calls.lock().clone()
    }
}

/// A [`TerminationNotifier`] that behaves as its [`Script`] says on each
/// call, confirming through the store (or, made with
/// [`by_handle`](Self::by_handle), through the batch's
/// [`Confirmations`]), and records every call.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{MemoryStore, NewSession, RouterDeleter, RouterId, SessionId, SessionStore};
/// use session_lifecycle::test_util::{HOUR, Notify, Script, ScriptedNotifier, Subset, report_within, run_paused};
///
/// run_paused(async {
///     let store = Arc::new(MemoryStore::new());
///     let router = RouterId::new(1);
///     let incarnation = store.register_router(router).await.unwrap();
///     for id in 0..4 {
///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await.unwrap();
///     }
///     // The router confirms the even ids; the retries reach nobody.
///     let script = Script::by_round(Notify::Confirm(Subset::EvenIds), Notify::Error);
///     let notifier = ScriptedNotifier::new(Arc::clone(&store), script);
///     let deleter = RouterDeleter::new(Arc::clone(&store), Arc::clone(&notifier));
///     let report = report_within(HOUR, deleter.delete(router)).await;
///
///     assert_eq!((report.confirmed, report.forced), (2, 2));
///     assert_eq!(notifier.calls()[0].batch.round, 0);
///     assert!(notifier.call_count() > 1); // the odd ids were re-notified
/// });
/// ```
#[derive(Debug)]
pub struct ScriptedNotifier<S> {
    store: Arc<S>,
    script: Script<Notify>,
    log: Log<TerminationBatch, Notify>,
    by_handle: bool,
}

impl<S: SessionStore> ScriptedNotifier<S> {
    /// A notifier confirming through `store`, following `script`.
    #[must_use]
    pub fn new(store: Arc<S>, script: Script<Notify>) -> Arc<Self> {
        Arc::new(Self {
            store,
            script,
            log: Log::new(),
            by_handle: false,
        })
    }

    /// A notifier following `script` that confirms through each batch's
    /// [`Confirmations`] ([`Confirmations::confirm_key`], the sessions the
    /// script picks in the reverse of the batch's order), and through
    /// `store` when a batch comes without one.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use session_lifecycle::{MemoryStore, NewSession, RouterDeleter, RouterId, SessionId, SessionStore};
    /// use session_lifecycle::test_util::{HOUR, Notify, Script, ScriptedNotifier, Subset, report_within, run_paused};
    ///
    /// run_paused(async {
    ///     let store = Arc::new(MemoryStore::new());
    ///     let router = RouterId::new(1);
    ///     let incarnation = store.register_router(router).await.unwrap();
    ///     for id in 0..4 {
    ///         store.create(NewSession::new(SessionId::new(id), router, incarnation)).await.unwrap();
    ///     }
    ///     let notifier = ScriptedNotifier::by_handle(
    ///         Arc::clone(&store),
    ///         Script::always(Notify::Confirm(Subset::All)),
    ///     );
    ///     let deleter = RouterDeleter::new(Arc::clone(&store), notifier);
    ///     let report = report_within(HOUR, deleter.delete(router)).await;
    ///     assert_eq!(report.confirmed, 4);
    /// });
    /// ```
    #[must_use]
    pub fn by_handle(store: Arc<S>, script: Script<Notify>) -> Arc<Self> {
        Arc::new(Self {
            store,
            script,
            log: Log::new(),
            by_handle: true,
        })
    }

    /// A notifier that does `behaviour` on every call.
    #[must_use]
    pub fn always(store: Arc<S>, behaviour: Notify) -> Arc<Self> {
        Self::new(store, Script::always(behaviour))
    }

    /// Every call received so far, in order.
    #[must_use]
    pub fn calls(&self) -> Vec<NotifyCall> {
        self.log.snapshot()
    }

    /// How many calls were received so far.
    #[must_use]
    pub fn call_count(&self) -> usize {
        self.log.calls.lock().len()
    }

    /// How many notices named `id` so far.
    #[must_use]
    pub fn notices_of(&self, id: SessionId) -> usize {
        self.log
            .calls
            .lock()
            .iter()
            .filter(|call| call.batch.sessions.iter().any(|key| key.id() == id))
            .count()
    }
}

/// Closes each session with `RouterDeleted`, as a router's confirmation
/// would: by key (through the store, or the batch's [`Confirmations`]), so
/// a late confirmation never closes a later session that reuses the id.
async fn confirm<S: SessionStore>(
    store: &S,
    handles: Option<&Confirmations>,
    keys: Vec<SessionKey>,
) {
    // A session closed or removed meanwhile is not an error for a router.
    match handles {
        // Last first: the answers out of the batch's order take the lookup.
        Some(handles) => {
            for key in keys.into_iter().rev() {
                let _ = handles.confirm_key(key);
            }
        }
        None => {
            for key in keys {
                let _ = store.close_exact(key, CloseReason::RouterDeleted).await;
            }
        }
    }
}

impl<S: SessionStore> TerminationNotifier for ScriptedNotifier<S> {
    async fn notify(&self, batch: TerminationBatch) -> Result<(), NotifyError> {
        self.act(batch, None).await
    }

    async fn notify_with(
        &self,
        batch: TerminationBatch,
        handles: Confirmations,
    ) -> Result<(), NotifyError> {
        self.act(batch, self.by_handle.then_some(handles)).await
    }
}

impl<S: SessionStore> ScriptedNotifier<S> {
    /// Does what the script says for `batch`, confirming through `handles`
    /// if given.
    async fn act(
        &self,
        batch: TerminationBatch,
        handles: Option<Confirmations>,
    ) -> Result<(), NotifyError> {
        let behaviour = self.log.record(&self.script, &batch, |index| {
            Call::notice(index, batch.router, batch.round)
        });
        match behaviour {
            Notify::Confirm(subset) => {
                let keys = subset.pick_keys(&batch.sessions, batch.round);
                confirm(&*self.store, handles.as_ref(), keys).await;
            }
            Notify::Slow {
                delay,
                confirm: subset,
            } => {
                tokio::time::sleep(delay).await;
                let keys = subset.pick_keys(&batch.sessions, batch.round);
                confirm(&*self.store, handles.as_ref(), keys).await;
            }
            Notify::Later {
                delay,
                confirm: subset,
            } => {
                let keys = subset.pick_keys(&batch.sessions, batch.round);
                let store = Arc::clone(&self.store);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    confirm(&*store, handles.as_ref(), keys).await;
                });
            }
            Notify::Error => {
                return Err(NotifyError::msg(format!(
                    "scripted: {} unreachable",
                    batch.router
                )));
            }
            Notify::Never => std::future::pending::<()>().await,
            Notify::Panic => panic!("scripted notifier panics, as told"),
        }
        Ok(())
    }
}

/// A [`Prober`] that behaves as its [`Script`] says on each call and
/// records every call.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{CloseReason, LivenessMonitor, MemoryStore, NewSession, RouterId, SessionId, SessionStore};
/// use session_lifecycle::test_util::{Probe, ScriptedProber, run_paused};
///
/// run_paused(async {
///     let store = Arc::new(MemoryStore::new());
///     let router = RouterId::new(1);
///     let incarnation = store.register_router(router).await.unwrap();
///     let prober = ScriptedProber::always(Probe::nobody());
///     let monitor = LivenessMonitor::builder()
///         .build(Arc::clone(&store), Arc::clone(&prober))
///         .unwrap();
///     let silent = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await.unwrap();
///     monitor.watch(&silent).unwrap();
///
///     // Never a heartbeat, and nobody answers the probes: reaped.
///     assert_eq!(silent.closed().await, CloseReason::LivenessTimeout);
///     assert!(!prober.calls_for(router).is_empty());
/// });
/// ```
#[derive(Debug)]
pub struct ScriptedProber {
    script: Script<Probe>,
    log: Log<ProbeBatch, Probe>,
}

impl ScriptedProber {
    /// A prober following `script`.
    #[must_use]
    pub fn new(script: Script<Probe>) -> Arc<Self> {
        Arc::new(Self {
            script,
            log: Log::new(),
        })
    }

    /// A prober that does `behaviour` on every call.
    #[must_use]
    pub fn always(behaviour: Probe) -> Arc<Self> {
        Self::new(Script::always(behaviour))
    }

    /// Every call received so far, in order.
    #[must_use]
    pub fn calls(&self) -> Vec<ProbeCall> {
        self.log.snapshot()
    }

    /// How many calls were received so far.
    #[must_use]
    pub fn call_count(&self) -> usize {
        self.log.calls.lock().len()
    }

    /// The calls made for `router`, as how many sessions each probed.
    #[must_use]
    pub fn calls_for(&self, router: RouterId) -> Vec<usize> {
        self.log
            .calls
            .lock()
            .iter()
            .filter(|call| call.batch.router == router)
            .map(|call| call.batch.sessions.len())
            .collect()
    }
}

impl Prober for ScriptedProber {
    async fn probe(&self, batch: ProbeBatch) -> Result<Vec<SessionId>, ProbeError> {
        let behaviour = self.log.record(&self.script, &batch, |index| {
            Call::probe(index, batch.router, batch.round)
        });
        match behaviour {
            Probe::Answer(subset) => Ok(subset.pick(&batch.sessions, batch.round)),
            Probe::Slow { delay, answer } => {
                tokio::time::sleep(delay).await;
                Ok(answer.pick(&batch.sessions, batch.round))
            }
            Probe::Error => Err(ProbeError::msg(format!(
                "scripted: {} unreachable",
                batch.router
            ))),
            Probe::Never => std::future::pending().await,
            Probe::Panic => panic!("scripted prober panics, as told"),
        }
    }
}
