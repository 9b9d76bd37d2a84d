//! Resources attached to a session and released exactly once when it closes.

use std::fmt;

use super::CloseReason;

/// Something a session holds that must be released when the session closes:
/// a port, a buffer, a routing or policy-cache entry.
///
/// Attach it with [`Session::attach`](crate::Session::attach). Whichever path
/// closes the session (the client, a deletion, a liveness timeout, a
/// reclamation), the caller that wins the close calls `release` once, in
/// reverse order of attachment. A `release` that panics is contained: the
/// other resources are still released and the close still completes.
///
/// Closures `FnOnce(CloseReason)` are resources:
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
///
/// let released = Arc::new(AtomicUsize::new(0));
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// let counter = Arc::clone(&released);
/// session
///     .attach(move |_reason: CloseReason| {
///         counter.fetch_add(1, Ordering::SeqCst);
///     })
///     .unwrap();
/// let _ = session.close(CloseReason::ClientClosed);
/// let _ = session.close(CloseReason::Forced);
/// assert_eq!(released.load(Ordering::SeqCst), 1);
/// ```
pub trait Resource: Send + 'static {
    /// Releases the resource. Called at most once, by the caller that closed
    /// the session, outside every lock of the crate.
    fn release(self: Box<Self>, reason: CloseReason);
}

impl<F> Resource for F
where
    F: FnOnce(CloseReason) + Send + 'static,
{
    fn release(self: Box<Self>, reason: CloseReason) {
        (*self)(reason);
    }
}

/// A resource could not be attached because the session is already closed;
/// the resource is handed back so the caller can release it.
#[derive(thiserror::Error)]
#[error("session is closed: resource not attached")]
pub struct AttachError<R>(pub R);

impl<R> AttachError<R> {
    /// Returns the resource that was not attached.
    pub fn into_inner(self) -> R {
        self.0
    }
}

impl<R> fmt::Debug for AttachError<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AttachError").finish_non_exhaustive()
    }
}

/// The resources of one session: most sessions hold none or one, so the
/// first is kept inline and a vector is allocated only for a second.
#[derive(Default)]
pub(super) enum Resources {
    #[default]
    None,
    One(Box<dyn Resource>),
    Many(Vec<Box<dyn Resource>>),
}

impl Resources {
    pub(super) fn push(&mut self, resource: Box<dyn Resource>) {
        *self = match std::mem::take(self) {
            Resources::None => Resources::One(resource),
            Resources::One(first) => Resources::Many(vec![first, resource]),
            Resources::Many(mut all) => {
                all.push(resource);
                Resources::Many(all)
            }
        };
    }

    /// The resources, last attached first: the order they are released in.
    pub(super) fn into_release_order(self) -> impl Iterator<Item = Box<dyn Resource>> {
        let (one, many) = match self {
            Resources::None => (None, Vec::new()),
            Resources::One(first) => (Some(first), Vec::new()),
            Resources::Many(all) => (None, all),
        };
        one.into_iter().chain(many.into_iter().rev())
    }
}
