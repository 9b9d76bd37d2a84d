//! Stores chosen at run time: [`BoxStore`], and [`SessionStore`] for
//! `Arc<S>`.
//!
//! [`SessionStore`]'s methods return `impl Future`, so the trait cannot be
//! a trait object. [`DynStore`] is its object-safe twin (every method
//! returns a boxed future), implemented for every store; [`BoxStore`] holds
//! one behind an `Arc` and implements [`SessionStore`] again by delegating.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{
    AuditReport, BackendError, CreateError, FenceError, FenceSnapshot, FinishError, FinishReport,
    RegisterError, Repair, RouterCensus, RouterError, RouterStatus, SessionError, SessionStore,
};
use crate::id::{Incarnation, RouterId, SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session};

/// A [`SessionStore`] whose type is chosen at run time: any store with
/// payload `P`, behind one type.
///
/// A controller that picks its backend at start-up ([`MemoryStore`] in
/// tests and on one node, `etcd::EtcdStore` (feature `etcd`) when several
/// controllers share the sessions) builds the store once, erases it with [`BoxStore::new`], and
/// hands the same `BoxStore<P>` to every piece: [`RouterDeleter`],
/// [`LivenessMonitor`], [`Reconciler`] and the rest are then the same types
/// whichever store runs. An `EtcdStore<P>` needs a payload that implements
/// `etcd::EtcdPayload`; its arm reads
/// `BoxStore::new(EtcdStore::builder().endpoint(url).connect::<P>().await?)`.
///
/// `BoxStore` is an `Arc` inside: cloning it is cheap and every clone is
/// the same store. To keep calling methods of the concrete store (such as
/// `EtcdStore::flush` or [`MemoryStore::len`]), erase an
/// `Arc` of it, which is a [`SessionStore`] too:
/// `BoxStore::new(Arc::clone(&store))`.
///
/// # Cost
///
/// Every call allocates its future on the heap (one allocation, freed when
/// the future completes or is dropped) and goes through a virtual call.
/// Against a remote store's round trip that is nothing; on
/// [`MemoryStore`], whose calls take a few hundred nanoseconds, a create
/// plus a close through a `BoxStore` took about a tenth longer (some 40 ns
/// on one thread) than on the store itself (`benches/store.rs`,
/// `create_close/box_store`). Code that knows its store at compile time
/// keeps using it directly.
///
/// Cancel safety, errors and panics are the inner store's: a `BoxStore`
/// adds none.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
///
/// use session_lifecycle::{
///     store::BoxStore, MemoryStore, NewSession, RouterDeleter, RouterId, SessionId, SessionStore,
///     TerminationBatch, TerminationNotifier, NotifyError,
/// };
///
/// /// Where the sessions live, from the controller's configuration.
/// enum Backend {
///     Memory,
///     // Etcd(String), with the `etcd` feature (the arm below).
/// }
///
/// async fn open(backend: Backend) -> Result<BoxStore<String>, Box<dyn std::error::Error>> {
///     Ok(match backend {
///         Backend::Memory => BoxStore::new(MemoryStore::<String>::default()),
///         // Backend::Etcd(url) => BoxStore::new(
///         //     EtcdStore::builder().endpoint(url).connect::<String>().await?,
///         // ),
///     })
/// }
///
/// struct Routers;
///
/// impl TerminationNotifier for Routers {
///     async fn notify(&self, _batch: TerminationBatch) -> Result<(), NotifyError> {
///         Ok(()) // unconfirmed sessions are forced at the deadline
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(open(Backend::Memory).await?);
/// // One deleter type, whichever store runs.
/// let deleter: RouterDeleter<BoxStore<String>, Routers> =
///     RouterDeleter::new(Arc::clone(&store), Routers);
///
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let spec = NewSession::new(SessionId::new(1), router, incarnation).payload("alice".into());
/// let session = store.create(spec).await?;
/// let report = deleter.delete(router).await?.report().cloned().expect("deleted now");
/// assert_eq!(report.forced, 1);
/// assert!(session.is_closed());
/// # Ok(())
/// # }
/// ```
///
/// [`MemoryStore`]: crate::MemoryStore
/// [`MemoryStore::len`]: crate::MemoryStore::len
/// [`RouterDeleter`]: crate::RouterDeleter
/// [`LivenessMonitor`]: crate::LivenessMonitor
/// [`Reconciler`]: crate::Reconciler
pub struct BoxStore<P = ()> {
    inner: Arc<dyn DynStore<P>>,
}

impl<P: Send + Sync + 'static> BoxStore<P> {
    /// Erases `store`'s type. See the example on [`BoxStore`].
    #[must_use]
    pub fn new<S: SessionStore<Payload = P>>(store: S) -> Self {
        Self {
            inner: Arc::new(store),
        }
    }
}

impl<P> Clone for BoxStore<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P: 'static> fmt::Debug for BoxStore<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoxStore")
            .field(&format_args!("{}", self.inner.store_name()))
            .finish()
    }
}

/// [`SessionStore`] with boxed futures: object safe. Implemented for every
/// store; only [`BoxStore`] names it.
trait DynStore<P>: Send + Sync + 'static {
    fn store_name(&self) -> &'static str;
    fn register_router(
        &self,
        router: RouterId,
    ) -> BoxFuture<'_, Result<Incarnation, RegisterError>>;
    fn router_status(&self, router: RouterId) -> BoxFuture<'_, Result<RouterStatus, RouterError>>;
    fn create(&self, spec: NewSession<P>) -> BoxFuture<'_, Result<Session<P>, CreateError<P>>>;
    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<Session<P>>, BackendError>>;
    fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> BoxFuture<'_, Result<CloseOutcome, SessionError>>;
    fn remove(&self, id: SessionId) -> BoxFuture<'_, Result<Session<P>, SessionError>>;
    fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> BoxFuture<'_, Result<CloseOutcome, SessionError>>;
    fn remove_exact(&self, key: SessionKey) -> BoxFuture<'_, Result<Session<P>, SessionError>>;
    fn sessions(&self, router: RouterId) -> BoxFuture<'_, Result<Vec<Session<P>>, RouterError>>;
    fn count(&self, router: RouterId) -> BoxFuture<'_, Result<usize, RouterError>>;
    fn fence(&self, router: RouterId) -> BoxFuture<'_, Result<FenceSnapshot<P>, FenceError>>;
    fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> BoxFuture<'_, Result<FenceSnapshot<P>, FenceError>>;
    fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> BoxFuture<'_, Result<FinishReport, FinishError>>;
    fn unlink_closed<'a>(
        &'a self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &'a [Session<P>],
    ) -> BoxFuture<'a, Result<usize, FinishError>>;
    fn audit(&self) -> BoxFuture<'_, Result<AuditReport, BackendError>>;
    fn census(&self) -> BoxFuture<'_, Result<Vec<RouterCensus>, BackendError>>;
    fn repair<'a>(
        &'a self,
        findings: &'a AuditReport,
    ) -> BoxFuture<'a, Result<Vec<Repair>, BackendError>>;
}

impl<S: SessionStore> DynStore<S::Payload> for S {
    fn store_name(&self) -> &'static str {
        std::any::type_name::<S>()
    }

    fn register_router(
        &self,
        router: RouterId,
    ) -> BoxFuture<'_, Result<Incarnation, RegisterError>> {
        Box::pin(SessionStore::register_router(self, router))
    }

    fn router_status(&self, router: RouterId) -> BoxFuture<'_, Result<RouterStatus, RouterError>> {
        Box::pin(SessionStore::router_status(self, router))
    }

    fn create(
        &self,
        spec: NewSession<S::Payload>,
    ) -> BoxFuture<'_, Result<Session<S::Payload>, CreateError<S::Payload>>> {
        Box::pin(SessionStore::create(self, spec))
    }

    fn get(
        &self,
        id: SessionId,
    ) -> BoxFuture<'_, Result<Option<Session<S::Payload>>, BackendError>> {
        Box::pin(SessionStore::get(self, id))
    }

    fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> BoxFuture<'_, Result<CloseOutcome, SessionError>> {
        Box::pin(SessionStore::close(self, id, reason))
    }

    fn remove(&self, id: SessionId) -> BoxFuture<'_, Result<Session<S::Payload>, SessionError>> {
        Box::pin(SessionStore::remove(self, id))
    }

    fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> BoxFuture<'_, Result<CloseOutcome, SessionError>> {
        Box::pin(SessionStore::close_exact(self, key, reason))
    }

    fn remove_exact(
        &self,
        key: SessionKey,
    ) -> BoxFuture<'_, Result<Session<S::Payload>, SessionError>> {
        Box::pin(SessionStore::remove_exact(self, key))
    }

    fn sessions(
        &self,
        router: RouterId,
    ) -> BoxFuture<'_, Result<Vec<Session<S::Payload>>, RouterError>> {
        Box::pin(SessionStore::sessions(self, router))
    }

    fn count(&self, router: RouterId) -> BoxFuture<'_, Result<usize, RouterError>> {
        Box::pin(SessionStore::count(self, router))
    }

    fn fence(
        &self,
        router: RouterId,
    ) -> BoxFuture<'_, Result<FenceSnapshot<S::Payload>, FenceError>> {
        Box::pin(SessionStore::fence(self, router))
    }

    fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> BoxFuture<'_, Result<FenceSnapshot<S::Payload>, FenceError>> {
        Box::pin(SessionStore::fence_incarnation(self, router, incarnation))
    }

    fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> BoxFuture<'_, Result<FinishReport, FinishError>> {
        Box::pin(SessionStore::finish(self, router, incarnation))
    }

    fn unlink_closed<'a>(
        &'a self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &'a [Session<S::Payload>],
    ) -> BoxFuture<'a, Result<usize, FinishError>> {
        Box::pin(SessionStore::unlink_closed(
            self,
            router,
            incarnation,
            sessions,
        ))
    }

    fn audit(&self) -> BoxFuture<'_, Result<AuditReport, BackendError>> {
        Box::pin(SessionStore::audit(self))
    }

    fn census(&self) -> BoxFuture<'_, Result<Vec<RouterCensus>, BackendError>> {
        Box::pin(SessionStore::census(self))
    }

    fn repair<'a>(
        &'a self,
        findings: &'a AuditReport,
    ) -> BoxFuture<'a, Result<Vec<Repair>, BackendError>> {
        Box::pin(SessionStore::repair(self, findings))
    }
}

impl<P: Send + Sync + 'static> SessionStore for BoxStore<P> {
    type Payload = P;

    fn register_router(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Incarnation, RegisterError>> + Send {
        self.inner.register_router(router)
    }

    fn router_status(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<RouterStatus, RouterError>> + Send {
        self.inner.router_status(router)
    }

    fn create(
        &self,
        spec: NewSession<P>,
    ) -> impl Future<Output = Result<Session<P>, CreateError<P>>> + Send {
        self.inner.create(spec)
    }

    fn get(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<Session<P>>, BackendError>> + Send {
        self.inner.get(id)
    }

    fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> impl Future<Output = Result<CloseOutcome, SessionError>> + Send {
        self.inner.close(id, reason)
    }

    fn remove(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Session<P>, SessionError>> + Send {
        self.inner.remove(id)
    }

    fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> impl Future<Output = Result<CloseOutcome, SessionError>> + Send {
        self.inner.close_exact(key, reason)
    }

    fn remove_exact(
        &self,
        key: SessionKey,
    ) -> impl Future<Output = Result<Session<P>, SessionError>> + Send {
        self.inner.remove_exact(key)
    }

    fn sessions(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Vec<Session<P>>, RouterError>> + Send {
        self.inner.sessions(router)
    }

    fn count(&self, router: RouterId) -> impl Future<Output = Result<usize, RouterError>> + Send {
        self.inner.count(router)
    }

    fn fence(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<FenceSnapshot<P>, FenceError>> + Send {
        self.inner.fence(router)
    }

    fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FenceSnapshot<P>, FenceError>> + Send {
        self.inner.fence_incarnation(router, incarnation)
    }

    fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FinishReport, FinishError>> + Send {
        self.inner.finish(router, incarnation)
    }

    // `async`: as `repair`.
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

    fn audit(&self) -> impl Future<Output = Result<AuditReport, BackendError>> + Send {
        self.inner.audit()
    }

    fn census(&self) -> impl Future<Output = Result<Vec<RouterCensus>, BackendError>> + Send {
        self.inner.census()
    }

    // `async`: the boxed future has one lifetime for both borrows, the
    // trait's future one for each.
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.inner.repair(findings).await
    }
}

/// A shared store is a store: `Arc<S>` delegates every call to `S`, without
/// boxing. This lets a store kept in an `Arc` for its own methods be handed
/// where a [`SessionStore`] is taken by value, such as [`BoxStore::new`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use session_lifecycle::{MemoryStore, RouterId, SessionStore};
///
/// async fn routers<S: SessionStore>(store: S) -> usize {
///     store.census().await.map_or(0, |census| census.len())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// store.register_router(RouterId::new(1)).await?;
/// assert_eq!(routers(Arc::clone(&store)).await, 1);
/// # Ok(())
/// # }
/// ```
impl<S: SessionStore> SessionStore for Arc<S> {
    type Payload = S::Payload;

    fn register_router(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Incarnation, RegisterError>> + Send {
        S::register_router(self, router)
    }

    fn router_status(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<RouterStatus, RouterError>> + Send {
        S::router_status(self, router)
    }

    fn create(
        &self,
        spec: NewSession<S::Payload>,
    ) -> impl Future<Output = Result<Session<S::Payload>, CreateError<S::Payload>>> + Send {
        S::create(self, spec)
    }

    fn get(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<Session<S::Payload>>, BackendError>> + Send {
        S::get(self, id)
    }

    fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> impl Future<Output = Result<CloseOutcome, SessionError>> + Send {
        S::close(self, id, reason)
    }

    fn remove(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Session<S::Payload>, SessionError>> + Send {
        S::remove(self, id)
    }

    fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> impl Future<Output = Result<CloseOutcome, SessionError>> + Send {
        S::close_exact(self, key, reason)
    }

    fn remove_exact(
        &self,
        key: SessionKey,
    ) -> impl Future<Output = Result<Session<S::Payload>, SessionError>> + Send {
        S::remove_exact(self, key)
    }

    fn sessions(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<Vec<Session<S::Payload>>, RouterError>> + Send {
        S::sessions(self, router)
    }

    fn count(&self, router: RouterId) -> impl Future<Output = Result<usize, RouterError>> + Send {
        S::count(self, router)
    }

    fn fence(
        &self,
        router: RouterId,
    ) -> impl Future<Output = Result<FenceSnapshot<S::Payload>, FenceError>> + Send {
        S::fence(self, router)
    }

    fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FenceSnapshot<S::Payload>, FenceError>> + Send {
        S::fence_incarnation(self, router, incarnation)
    }

    fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> impl Future<Output = Result<FinishReport, FinishError>> + Send {
        S::finish(self, router, incarnation)
    }

    fn unlink_closed(
        &self,
        router: RouterId,
        incarnation: Incarnation,
        sessions: &[Session<S::Payload>],
    ) -> impl Future<Output = Result<usize, FinishError>> + Send {
        S::unlink_closed(self, router, incarnation, sessions)
    }

    fn audit(&self) -> impl Future<Output = Result<AuditReport, BackendError>> + Send {
        S::audit(self)
    }

    fn census(&self) -> impl Future<Output = Result<Vec<RouterCensus>, BackendError>> + Send {
        S::census(self)
    }

    fn repair(
        &self,
        findings: &AuditReport,
    ) -> impl Future<Output = Result<Vec<Repair>, BackendError>> + Send {
        S::repair(self, findings)
    }
}
