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
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use session_lifecycle::{
    ///     CloseReason, Incarnation, NewSession, Resource, RouterId, SessionId,
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
    /// }
    ///
    /// let pool = Arc::new(Mutex::new(Vec::new()));
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// session.attach(Port { number: 4000, pool: Arc::clone(&pool) })?;
    /// let _ = session.close(CloseReason::ClientClosed);
    /// assert_eq!(*pool.lock().unwrap(), vec![4000]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn release(self: Box<Self>, reason: CloseReason);

    /// How urgent releasing this resource is when the release goes through a
    /// [`ReclaimQueue`](crate::ReclaimQueue) (a force-close, a reap, a
    /// sweep): critical resources of every session are released before
    /// high ones, and so on. [`ResourceClass::Normal`] unless overridden;
    /// wrap a closure in [`Classed`] to give it another class.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{CloseReason, Resource, ResourceClass};
    ///
    /// /// Kernel state held for the session: its leak harms the router.
    /// struct Conntrack(u32);
    ///
    /// impl Resource for Conntrack {
    ///     fn release(self: Box<Self>, _reason: CloseReason) { /* delete entry self.0 */ }
    ///     fn class(&self) -> ResourceClass {
    ///         ResourceClass::Critical
    ///     }
    /// }
    ///
    /// assert_eq!(Conntrack(7).class(), ResourceClass::Critical);
    /// assert_eq!((|_: CloseReason| {}).class(), ResourceClass::Normal);
    /// ```
    fn class(&self) -> ResourceClass {
        ResourceClass::Normal
    }

    /// Whether a queued close releases this resource at once, in the closing
    /// caller, instead of queueing it: for releases that are trivial and
    /// cannot fail (a counter, a wake-up). `false` unless overridden.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use session_lifecycle::{CloseReason, Resource};
    ///
    /// /// Counts the sessions open: decremented at the close, never queued.
    /// struct OpenSessions(Arc<AtomicUsize>);
    ///
    /// impl Resource for OpenSessions {
    ///     fn release(self: Box<Self>, _reason: CloseReason) {
    ///         self.0.fetch_sub(1, Ordering::Relaxed);
    ///     }
    ///     fn release_inline(&self) -> bool {
    ///         true
    ///     }
    /// }
    ///
    /// assert!(OpenSessions(Arc::new(AtomicUsize::new(1))).release_inline());
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ResourceClass;
    ///
    /// for (rank, class) in ResourceClass::ALL.into_iter().enumerate() {
    ///     assert_eq!(class.rank() as usize, rank);
    /// }
    /// ```
    pub const ALL: [ResourceClass; 4] = [Self::Critical, Self::High, Self::Normal, Self::Low];

    /// The class's rank in urgency: 0 for `Critical` up to 3 for `Low`.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::ResourceClass;
    ///
    /// assert_eq!(ResourceClass::Critical.rank(), 0);
    /// assert_eq!(ResourceClass::Low.rank(), 3);
    /// ```
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
    /// `resource`, released with the urgency of `class`.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{session::Classed, CloseReason, Resource, ResourceClass};
    ///
    /// let cache_entry = Classed::new(ResourceClass::Low, |_: CloseReason| {});
    /// assert_eq!(cache_entry.class(), ResourceClass::Low);
    /// ```
    pub fn new(class: ResourceClass, resource: R) -> Self {
        Self { class, resource }
    }

    /// The wrapped resource.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::{session::Classed, CloseReason, ResourceClass};
    ///
    /// let port = Classed::new(ResourceClass::High, |reason: CloseReason| {
    ///     println!("port freed: {reason}");
    /// });
    /// let release = port.into_inner(); // the closure, without its class
    /// release(CloseReason::Forced);
    /// ```
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
    /// Returns the resource that was not attached.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use session_lifecycle::{CloseReason, Incarnation, NewSession, RouterId, SessionId};
    ///
    /// let session =
    ///     NewSession::new(SessionId::new(1), RouterId::new(1), Incarnation::new(1))
    ///         .into_session();
    /// let _ = session.close(CloseReason::Shutdown);
    ///
    /// let freed = Arc::new(AtomicBool::new(false));
    /// let flag = Arc::clone(&freed);
    /// let error = session
    ///     .attach(move |_: CloseReason| flag.store(true, Ordering::SeqCst))
    ///     .unwrap_err();
    /// error.into_inner()(CloseReason::Shutdown);
    /// assert!(freed.load(Ordering::SeqCst));
    /// ```
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
