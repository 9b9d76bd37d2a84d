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
/// `release` is synchronous and may run inside a task of your runtime (the
/// caller's close, a deletion, the reclaim queue's worker): it must not
/// block on a future (`block_on` panics there, and the panic is contained
/// but the work is lost). To reach the store from it, hand the work to a
/// task (`tokio::spawn`), or, on a [`MemoryStore`](crate::MemoryStore),
/// whose operations never wait, take the answer at once with
/// [`FutureExt::now_or_never`](futures::FutureExt::now_or_never).
///
/// Closures `FnOnce(CloseReason)` are resources (see [`Session::attach`](crate::Session::attach));
/// a type implements the trait to choose its class or inline release:
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use session_lifecycle::{
///     CloseReason, Incarnation, NewSession, Resource, ResourceClass, RouterId, SessionId,
/// };
///
/// /// A port taken from the router's pool, given back on close.
/// struct Port {
///     number: u16,
///     pool: Arc<Mutex<Vec<u16>>>,
/// }
///
/// impl Resource for Port {
///     fn release(self: Box<Self>, _reason: CloseReason) {
///         self.pool.lock().unwrap().push(self.number);
///     }
///     fn class(&self) -> ResourceClass {
///         ResourceClass::High // scarce: released before normal resources
///     }
/// }
///
/// let pool = Arc::new(Mutex::new(Vec::new()));
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// session.attach(Port { number: 4000, pool: Arc::clone(&pool) })?;
/// let _ = session.close(CloseReason::ClientClosed);
/// let _ = session.close(CloseReason::Forced); // released once only
/// assert_eq!(*pool.lock().unwrap(), vec![4000]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Resource: Send + 'static {
    /// Releases the resource. Called at most once, by the caller that closed
    /// the session, outside every lock of the crate. See the example on [`Resource`].
    fn release(self: Box<Self>, reason: CloseReason);

    /// How urgent releasing this resource is when the release goes through a
    /// [`ReclaimQueue`](crate::ReclaimQueue) (a force-close, a reap, a
    /// sweep): critical resources of every session are released before
    /// high ones, and so on. [`ResourceClass::Normal`] unless overridden;
    /// wrap a closure in [`Classed`] to give it another class. See the example on [`Resource`].
    fn class(&self) -> ResourceClass {
        ResourceClass::Normal
    }

    /// Whether a queued close releases this resource at once, in the closing
    /// caller, instead of queueing it: for releases that are trivial and
    /// cannot fail (a counter, a wake-up). `false` unless overridden.
    fn release_inline(&self) -> bool {
        false
    }
}

impl<F> Resource for F
where
    F: FnOnce(CloseReason) + Send + 'static,
{
    fn release(self: Box<Self>, reason: CloseReason) {
        (*self)(reason);
    }
}

/// The class of a resource or of a reclamation task: what is released first
/// when releases queue up. Ordered `Low < Normal < High < Critical`.
///
/// # Example
///
/// ```
/// use session_lifecycle::ResourceClass;
///
/// assert!(ResourceClass::Critical > ResourceClass::High);
/// assert_eq!(ResourceClass::default(), ResourceClass::Normal);
/// assert_eq!(ResourceClass::ALL[0], ResourceClass::Critical);
/// assert_eq!(ResourceClass::High.to_string(), "high");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceClass {
    /// Cheap to hold a while longer (a policy-cache entry, statistics).
    Low,
    /// Most resources (buffers, routing-cache entries).
    #[default]
    Normal,
    /// Scarce resources other sessions wait for (ports, bandwidth).
    High,
    /// Resources whose leak harms the system (kernel state, credentials,
    /// exclusive locks held on the router's behalf).
    Critical,
}

impl ResourceClass {
    /// Every class, most urgent first.
    pub const ALL: [ResourceClass; 4] = [Self::Critical, Self::High, Self::Normal, Self::Low];

    /// The class's rank in urgency: 0 for `Critical` up to 3 for `Low`.
    #[must_use]
    pub const fn rank(self) -> u32 {
        match self {
            Self::Critical => 0,
            Self::High => 1,
            Self::Normal => 2,
            Self::Low => 3,
        }
    }
}

impl fmt::Display for ResourceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        })
    }
}

/// A resource with an explicit [`ResourceClass`].
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     session::Classed, CloseReason, Incarnation, NewSession, Resource, ResourceClass, RouterId,
///     SessionId,
/// };
///
/// let port = Classed::new(ResourceClass::Critical, |_reason: CloseReason| { /* free the port */ });
/// assert_eq!(port.class(), ResourceClass::Critical);
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1)).into_session();
/// session.attach(port).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Classed<R> {
    class: ResourceClass,
    resource: R,
}

impl<R: Resource> Classed<R> {
    /// `resource`, released with the urgency of `class`. See the example on [`Classed`].
    pub fn new(class: ResourceClass, resource: R) -> Self {
        Self { class, resource }
    }

    /// The wrapped resource. See the example on [`AttachError`].
    pub fn into_inner(self) -> R {
        self.resource
    }
}

impl<R: Resource> Resource for Classed<R> {
    fn release(self: Box<Self>, reason: CloseReason) {
        Box::new(self.resource).release(reason);
    }

    fn class(&self) -> ResourceClass {
        self.class
    }

    fn release_inline(&self) -> bool {
        self.resource.release_inline()
    }
}

/// A resource could not be attached because the session is already closed;
/// the resource is handed back so the caller can release it.
///
/// # Example
///
/// ```
/// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
///
/// let session = NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
///     .into_session();
/// let _ = session.close(CloseReason::ClientClosed);
///
/// let port = |reason: CloseReason| println!("port 4000 freed: {reason}");
/// match session.attach(port) {
///     Ok(()) => unreachable!("the session is closed"),
///     Err(error) => {
///         assert_eq!(error.to_string(), "session is closed: resource not attached");
///         // Too late to attach: release it here instead.
///         (error.into_inner())(CloseReason::ClientClosed);
///     }
/// }
/// ```
#[derive(thiserror::Error)]
#[error("session is closed: resource not attached")]
pub struct AttachError<R>(pub R);

impl<R> AttachError<R> {
    /// Returns the resource that was not attached. See the example on [`AttachError`].
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

    pub(super) fn is_empty(&self) -> bool {
        matches!(self, Resources::None)
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
