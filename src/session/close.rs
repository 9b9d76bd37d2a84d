//! Closing a session: the winner's side of a close (take the resources and
//! the token, release the resources, mark the close complete and wake the
//! waiters), inline or deferred through a reclamation queue.
//!
//! These keep the invariants and the lock discipline of the handle
//! (`handle.rs`, `# Invariants` and `# Deadlock safety`).

use super::handle::Session;
use super::resource::{Resource, ResourceClass, Resources};
use super::state::{CloseFrom, CloseOutcome, CloseReason};
use crate::contain::contain;
use crate::id::{RouterId, SessionId};

impl<P> Session<P> {
    /// Closes the session (from `Active` or `Terminating`) with `reason`.
    ///
    /// Exactly one caller wins the close and gets [`CloseOutcome::Closed`];
    /// that caller wipes the token, releases the attached resources (in
    /// reverse order of attachment, outside every lock) and then wakes every
    /// close waiter. Other callers get [`CloseOutcome::AlreadyClosed`] with
    /// the winner's reason, at once.
    ///
    /// This closes the handle only; a session closed this way stays in its
    /// store until it is removed. [`SessionStore::close`](crate::SessionStore::close)
    /// closes and removes in one call.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{
    ///     session::CloseOutcome, CloseReason, Incarnation, NewSession, RouterId, SessionId,
    /// };
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.attach(|reason: CloseReason| println!("port freed: {reason}"))?;
    ///
    /// // The router confirmed; the port is freed here, once.
    /// assert_eq!(session.close(CloseReason::RouterDeleted), CloseOutcome::Closed);
    /// // A late force-close loses and learns the winner's reason.
    /// assert_eq!(
    ///     session.close(CloseReason::Forced),
    ///     CloseOutcome::AlreadyClosed { reason: CloseReason::RouterDeleted }
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn close(&self, reason: CloseReason) -> CloseOutcome {
        let outcome = self.inner.word.close(reason);
        if outcome.won() {
            #[cfg(feature = "metrics")]
            crate::metrics::closed(reason.as_str());
            self.complete_close(reason);
        }
        outcome
    }

    /// Closes the session as [`close`](Self::close) does, without counting
    /// the close in the metrics: for a store that builds the handle of a
    /// session closed elsewhere under its own locks (nothing attached, no
    /// waiter, so the close runs no user code) and counts it after them.
    #[cfg(feature = "etcd")]
    pub(crate) fn close_unrecorded(&self, reason: CloseReason) -> CloseOutcome {
        let outcome = self.inner.word.close(reason);
        if outcome.won() {
            self.complete_close(reason);
        }
        outcome
    }

    fn complete_close(&self, reason: CloseReason) {
        // One critical section when nothing is attached (most sessions a
        // deletion closes): take the token, mark the close complete and
        // take the waiters at once.
        let (resources, token, waiters) = {
            let mut shared = self.inner.shared.lock();
            let token = shared.token.take();
            if shared.resources.is_empty() {
                self.inner.word.mark_complete();
                (None, token, std::mem::take(&mut shared.waiters))
            } else {
                let resources = std::mem::take(&mut shared.resources);
                (Some(resources), token, Vec::new())
            }
        };
        // `SessionToken` zeroizes its bytes on drop: here, unless a
        // `with_token` reader still runs (then when it returns).
        drop(token);
        match resources {
            None => wake_all(waiters, self.id()),
            Some(resources) => {
                for resource in resources.into_release_order() {
                    self.release_contained(resource, reason);
                }
                self.finish_close();
            }
        }
    }

    /// Takes the resources out and wipes the token; only the caller that
    /// won the close calls it.
    fn take_resources(&self) -> Resources {
        let (resources, token) = {
            let mut shared = self.inner.shared.lock();
            (std::mem::take(&mut shared.resources), shared.token.take())
        };
        // `SessionToken` zeroizes its bytes on drop: here, unless a
        // `with_token` reader still runs (then when it returns).
        drop(token);
        resources
    }

    /// Releases one resource, containing a panic; `false` if it panicked.
    fn release_contained(&self, resource: Box<dyn Resource>, reason: CloseReason) -> bool {
        release_contained(resource, reason, self.id(), self.router())
    }

    /// Marks the close complete and wakes every waiter.
    fn finish_close(&self) {
        let waiters = {
            let mut shared = self.inner.shared.lock();
            self.inner.word.mark_complete();
            std::mem::take(&mut shared.waiters)
        };
        wake_all(waiters, self.id());
    }

    /// Closes the session with `reason` but hands its resources back,
    /// grouped by class, for the caller to release later (through a
    /// reclamation queue); resources that ask to be released inline are
    /// released here. The token is wiped at once. The close completes (its
    /// waiters wake) when the last clone of the returned `completion` drops.
    ///
    /// `Err` with the outcome if another caller closed the session first.
    pub(crate) fn close_deferred(&self, reason: CloseReason) -> Result<DeferredClose, CloseOutcome>
    where
        P: Send + Sync + 'static,
    {
        let outcome = self.inner.word.close(reason);
        if !outcome.won() {
            return Err(outcome);
        }
        Ok(self.defer_release(reason))
    }

    /// [`close_deferred`](Self::close_deferred) from the states `from`
    /// allows: `None` if another caller closed the session first, or, for
    /// [`CloseFrom::Active`], if it is `Terminating` (its deletion's).
    pub(crate) fn close_deferred_from(
        &self,
        reason: CloseReason,
        from: CloseFrom,
    ) -> Option<DeferredClose>
    where
        P: Send + Sync + 'static,
    {
        self.won_from(reason, from)
            .then(|| self.defer_release(reason))
    }

    /// Closes the session, as [`close`](Self::close) does, from the states
    /// `from` allows; `true` if this call closed it.
    pub(crate) fn close_from(&self, reason: CloseReason, from: CloseFrom) -> bool {
        let won = self.won_from(reason, from);
        if won {
            #[cfg(feature = "metrics")]
            crate::metrics::closed(reason.as_str());
            self.complete_close(reason);
        }
        won
    }

    /// Moves the state word to `Closed` from the states `from` allows;
    /// `true` if this call did.
    fn won_from(&self, reason: CloseReason, from: CloseFrom) -> bool {
        match from {
            CloseFrom::Open => self.inner.word.close(reason).won(),
            CloseFrom::Active => self.inner.word.close_active(reason),
        }
    }

    /// The winner's side of a deferred close: groups the resources by class.
    fn defer_release(&self, reason: CloseReason) -> DeferredClose
    where
        P: Send + Sync + 'static,
    {
        #[cfg(feature = "metrics")]
        crate::metrics::closed(reason.as_str());
        let resources = self.take_resources();
        let mut groups: Vec<(ResourceClass, Vec<Box<dyn Resource>>)> = Vec::new();
        for resource in resources.into_release_order() {
            // `release_inline` and `class` are user code too, called after
            // the close was won: a panic in either is contained (the
            // resource queued, under `Critical` if `class` panicked), or
            // the close would never complete.
            let inline = contain(|| resource.release_inline()).unwrap_or_else(|| {
                tracing::error!(session = %self.id(), router = %self.router(),
                    "a session resource panicked in `release_inline`; the panic was contained");
                false
            });
            if inline {
                self.release_contained(resource, reason);
                continue;
            }
            let class = contain(|| resource.class()).unwrap_or_else(|| {
                tracing::error!(session = %self.id(), router = %self.router(),
                    "a session resource panicked in `class`; the panic was contained, the resource released as critical");
                ResourceClass::Critical
            });
            match groups.iter_mut().find(|(c, _)| *c == class) {
                Some((_, group)) => group.push(resource),
                None => groups.push((class, vec![resource])),
            }
        }
        groups.sort_by_key(|(class, _)| class.rank());
        DeferredClose {
            reason,
            groups,
            completion: std::sync::Arc::new(CompleteOnDrop(self.clone())),
        }
    }
}

/// Releases one resource, containing a panic; `false` if it panicked.
pub(crate) fn release_contained(
    resource: Box<dyn Resource>,
    reason: CloseReason,
    session: SessionId,
    router: RouterId,
) -> bool {
    let released = contain(|| resource.release(reason)).is_some();
    if !released {
        tracing::error!(%session, %router,
            "a session resource panicked while being released; the panic was contained");
    }
    released
}

/// A close whose resources are released later: see
/// [`Session::close_deferred`].
pub(crate) struct DeferredClose {
    pub(crate) reason: CloseReason,
    /// The resources by class, most urgent first; within a class, last
    /// attached first.
    pub(crate) groups: Vec<(ResourceClass, Vec<Box<dyn Resource>>)>,
    /// Completes the close when its last clone drops.
    pub(crate) completion: std::sync::Arc<dyn Send + Sync>,
}

/// Completes a deferred close when dropped.
struct CompleteOnDrop<P>(Session<P>);

impl<P> Drop for CompleteOnDrop<P> {
    fn drop(&mut self) {
        self.0.finish_close();
    }
}

/// Wakes every waiter taken out of a session (outside its lock: a waker is
/// user code). A waker that panics is contained, as a resource's release
/// is: the other waiters are still woken, and the close completes.
fn wake_all(waiters: Vec<Option<std::task::Waker>>, session: SessionId) {
    if waiters.is_empty() {
        return;
    }
    for waker in waiters.into_iter().flatten() {
        if !wake_contained(waker) {
            tracing::error!(%session, "a close waiter's waker panicked; the panic was contained");
        }
    }
}

/// Wakes `waker` (user code), a panic contained: `false` if it panicked.
/// For lists of waiters, whose others must still be woken.
pub(crate) fn wake_contained(waker: std::task::Waker) -> bool {
    contain(|| waker.wake()).is_some()
}
