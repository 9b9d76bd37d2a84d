//! Corruptions and faults a test injects into a [`MemoryStore`] on purpose
//! (test-util).

use std::sync::atomic::Ordering;

use super::store::MemoryStore;
use crate::id::{Incarnation, SessionId};
use crate::session::Session;
use crate::store::error::CreateErrorKind;
use crate::store::report::RouterStatus;

/// A way to break a [`MemoryStore`]'s invariants behind its API, to test
/// that [`SessionStore::audit`](crate::SessionStore::audit) finds it and
/// [`AuditSweeper`](crate::AuditSweeper) repairs it. Test-only.
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     store::Corruption, Incarnation, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.create(NewSession::new(SessionId::new(1), router, incarnation)).await?;
///
/// store.corrupt(Corruption::Unindex(SessionId::new(1)));
/// // A session of a router that never existed: an orphan.
/// let stray = NewSession::new(SessionId::new(2), RouterId::new(99), Incarnation::new(1));
/// store.corrupt(Corruption::Inject(stray.into_session()));
///
/// let findings = store.audit().await?;
/// assert_eq!(findings.missing_from_index, vec![SessionId::new(1)]);
/// assert_eq!(findings.orphans, vec![SessionId::new(2)]);
/// let _ = store.repair(&findings).await?;
/// assert!(store.audit().await?.is_clean());
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Debug)]
#[non_exhaustive]
pub enum Corruption<P> {
    /// Removes the session from its router's index only.
    Unindex(SessionId),
    /// Removes the session from the session map only.
    DropFromMap(SessionId),
    /// Puts a session into the session map only, bypassing every check
    /// (an orphan if its router does not hold its incarnation).
    Inject(Session<P>),
}

/// A fault [`MemoryStore::inject_fault`] makes the store commit on
/// purpose, to prove that a test suite catches it. Test-only.
///
/// # Example
///
/// ```
/// use session_lifecycle::{store::Fault, MemoryStore, NewSession, RouterId, SessionId, SessionStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let _ = store.fence(router).await?;
///
/// store.inject_fault(Fault::SkipFence);
/// // Broken on purpose: a create on a fenced router (invariant I2).
/// assert!(store.create(NewSession::new(SessionId::new(1), router, incarnation)).await.is_ok());
///
/// store.clear_faults();
/// assert!(store.create(NewSession::new(SessionId::new(2), router, incarnation)).await.is_err());
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// `create` ignores a fence: a router's fenced incarnation admits
    /// sessions as if it were live (deleted incarnations still refuse).
    SkipFence,
}

impl<P> MemoryStore<P> {
    /// Makes the store commit `fault` from now on. Test-only: it breaks
    /// the store's invariants. See [`Fault`].
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn inject_fault(&self, fault: Fault) {
        match fault {
            // Relaxed: a test sets it between steps; no data rides on it.
            Fault::SkipFence => self.skip_fence.store(true, Ordering::Relaxed),
        }
    }

    /// Stops every injected fault. See [`Fault`].
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn clear_faults(&self) {
        self.skip_fence.store(false, Ordering::Relaxed);
    }

    /// With [`Fault::SkipFence`], admits a create the fence refused.
    pub(super) fn skip_fence(
        &self,
        status: RouterStatus,
        requested: Incarnation,
        refused: CreateErrorKind,
    ) -> Result<(), CreateErrorKind> {
        match status {
            RouterStatus::Fenced(fenced)
                if fenced == requested && self.skip_fence.load(Ordering::Relaxed) =>
            {
                Ok(())
            }
            _ => Err(refused),
        }
    }
    /// Applies `corruption`. Test-only: it breaks the store's invariants.
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn corrupt(&self, corruption: Corruption<P>) {
        match corruption {
            Corruption::Unindex(id) => {
                let router = self.get_now(id).map(|session| session.router());
                let removed = router
                    .and_then(|router| self.routers.get(&router))
                    .and_then(|entry| entry.lock().index_mut().remove(&id));
                // After the guards: it may be the session's last handle.
                drop(removed);
            }
            Corruption::DropFromMap(id) => {
                self.sessions.remove(&id);
            }
            Corruption::Inject(session) => {
                self.sessions.insert(session.id(), session);
            }
        }
    }
}
