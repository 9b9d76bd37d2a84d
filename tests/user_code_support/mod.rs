//! Shared pieces of the `adversarial_user_code_*` tests: a payload whose `Drop` panics, a
//! user's store wrapping a `MemoryStore` with hooks, and a runner for
//! scenarios that may abort the process (run in a child process).
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use session_lifecycle::session::CloseOutcome;
use session_lifecycle::store::{
    AuditReport, BackendError, CreateError, FenceError, FenceSnapshot, FinishError, FinishReport,
    RegisterError, Repair, RouterCensus, RouterError, RouterStatus, SessionError,
};
use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, NotifyError, RouterId, Session, SessionId,
    SessionKey, SessionStore, TerminationBatch, TerminationNotifier,
};
use tokio::sync::Notify as Signal;

pub const R: RouterId = RouterId::new(1);

/// Counts its drops; panics in `Drop` when armed, even while another panic
/// unwinds (a careless user's payload).
#[derive(Debug)]
pub struct Loud {
    pub armed: bool,
    pub drops: Arc<AtomicUsize>,
}

impl Drop for Loud {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
        if self.armed {
            panic!("a payload's Drop panicked");
        }
    }
}

pub fn loud(armed: bool, drops: &Arc<AtomicUsize>) -> Loud {
    Loud {
        armed,
        drops: Arc::clone(drops),
    }
}

/// A router that takes notices and never confirms.
pub struct Deaf;

impl TerminationNotifier for Deaf {
    async fn notify(&self, _: TerminationBatch) -> Result<(), NotifyError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the reply was lost")]
pub struct Lost;

/// What `Wrap::remove_exact` awaits first.
pub type RemoveHook =
    Box<dyn Fn(SessionKey) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A user's store (a remote one, say) around a `MemoryStore`, with hooks.
pub struct Wrap<P> {
    pub inner: MemoryStore<P>,
    /// `finish` does its work, then answers a backend error (the reply
    /// was lost).
    pub fail_finish: AtomicBool,
    /// `remove_exact` of this id (0: none) parks until `release`.
    pub park_remove_of: AtomicU64,
    /// The next `get` parks after it fetched the handle, until `release`.
    pub park_get: AtomicBool,
    /// The next `sessions` parks after it listed, until `release`.
    pub park_sessions: AtomicBool,
    /// `remove_exact` calls `on_remove` (then parks nothing).
    pub on_remove: parking_lot::Mutex<Option<RemoveHook>>,
    pub arrived: Signal,
    pub release: Signal,
}

impl<P> Default for Wrap<P> {
    fn default() -> Self {
        Self {
            inner: MemoryStore::default(),
            fail_finish: AtomicBool::new(false),
            park_remove_of: AtomicU64::new(0),
            park_get: AtomicBool::new(false),
            park_sessions: AtomicBool::new(false),
            on_remove: parking_lot::Mutex::new(None),
            arrived: Signal::new(),
            release: Signal::new(),
        }
    }
}

impl<P: Send + Sync + 'static> SessionStore for Wrap<P> {
    type Payload = P;

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session<P>>, BackendError> {
        let got = self.inner.get(id).await;
        if self.park_get.swap(false, Ordering::SeqCst) {
            self.arrived.notify_one();
            self.release.notified().await;
        }
        got
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close(id, reason).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(key, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session<P>, SessionError> {
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session<P>, SessionError> {
        let hook = self.on_remove.lock().as_ref().map(|hook| hook(key));
        if let Some(hook) = hook {
            hook.await;
        }
        if self.park_remove_of.load(Ordering::SeqCst) == key.id().get() {
            self.arrived.notify_one();
            self.release.notified().await;
        }
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session<P>>, RouterError> {
        let listed = self.inner.sessions(router).await;
        if self.park_sessions.swap(false, Ordering::SeqCst) {
            self.arrived.notify_one();
            self.release.notified().await;
        }
        listed
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        self.inner.count(router).await
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<P>, FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<P>, FenceError> {
        self.inner.fence_incarnation(router, incarnation).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        let finished = self.inner.finish(router, incarnation).await;
        if self.fail_finish.load(Ordering::SeqCst) {
            return Err(FinishError::Backend(BackendError::new(Lost)));
        }
        finished
    }
    async fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<P>],
    ) -> Result<usize, FinishError> {
        self.inner
            .unlink_closed(router, incarnation, sessions)
            .await
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.inner.audit().await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.inner.census().await
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.inner.repair(findings).await
    }
}

/// Runs the `#[ignore]`d test `inner` of this test binary in a child
/// process (a scenario that may abort the process) and fails, with its
/// output, unless it passed.
pub fn in_child(inner: &str) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            inner,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The panics' messages, not their backtraces.
    let keep = |line: &&str| {
        [
            "panicked",
            "Drop",
            "abort",
            "destructor",
            "outcome",
            "assert",
            "left:",
            "right:",
            "not finished",
            "scenario",
        ]
        .iter()
        .any(|word| line.contains(word))
            && !line.trim_start().starts_with(|c: char| c.is_ascii_digit())
    };
    let stderr: Vec<&str> = stderr.lines().filter(keep).collect();
    let stderr = stderr.join("\n");
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the scenario `{inner}` failed: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
}

/// A current-thread runtime with paused time, for scenarios that drop it.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}
