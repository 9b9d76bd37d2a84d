//! Identifiers of routers, sessions and router incarnations.

use std::fmt;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            #[doc = concat!("Creates a `", stringify!($name), "` from its raw value.")]
            ///
            /// See the example on the type.
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// Returns the raw value.
            ///
            /// See the example on the type.
            #[must_use]
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $name {
            fn from(raw: u64) -> Self {
                Self(raw)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// Identifies a router (an edge router of the overlay network).
    ///
    /// Router ids are chosen by the controller and may be reused after the
    /// router is deleted; the [`Incarnation`] tells the lives of one id apart.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::RouterId;
    ///
    /// let router = RouterId::new(7);
    /// assert_eq!(router, RouterId::from(7));
    /// assert_eq!(router.get(), 7);
    /// assert_eq!(u64::from(router), 7);
    /// assert_eq!(router.to_string(), "router-7");
    /// ```
    RouterId,
    "router-"
);

id_type!(
    /// Identifies a session.
    ///
    /// Session ids are chosen by the controller (often they arrive off the
    /// wire); a store rejects an id that is already in use.
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::SessionId;
    ///
    /// let id = SessionId::new(42);
    /// assert_eq!(id.get(), 42);
    /// assert_eq!(SessionId::from(42), id);
    /// assert_eq!(id.to_string(), "session-42");
    /// ```
    SessionId,
    "session-"
);

id_type!(
    /// One life of a router id: handed out each time the router is registered.
    ///
    /// Incarnations only grow: registering a router again after it was deleted
    /// yields a larger incarnation, and nothing created against an older
    /// incarnation is accepted (invariant I2 of the crate docs).
    ///
    /// # Example
    ///
    /// ```
    /// use session_lifecycle::Incarnation;
    ///
    /// assert!(Incarnation::new(2) > Incarnation::from(1));
    /// assert_eq!(Incarnation::new(3).get(), 3);
    /// assert_eq!(Incarnation::from(3).to_string(), "incarnation-3");
    /// ```
    Incarnation,
    "incarnation-"
);

/// One life of a session id: the id and the generation its store gave the
/// session when it created it.
///
/// Ids can be reused: a session closes, and a later one is created with the
/// same id. A key tells the two apart. The store operations that take a key
/// ([`SessionStore::close_exact`](crate::SessionStore::close_exact),
/// [`SessionStore::remove_exact`](crate::SessionStore::remove_exact)) act
/// only on the session created with that generation, never on a later one
/// holding the same id: a late confirmation, a duplicated message or a slow
/// cleanup cannot close a newer session. [`Session::key`](crate::Session::key)
/// gives a session's key; a [`TerminationBatch`](crate::TerminationBatch)
/// carries the keys of the sessions it asks to close.
///
/// Generations are unique within a store (an [`EtcdStore`] uses the etcd
/// revision that created the session's record, so they are shared by every
/// controller on one etcd); they carry no order a caller should rely on.
///
/// [`EtcdStore`]: https://docs.rs/session-lifecycle/latest/session_lifecycle/etcd/struct.EtcdStore.html
///
/// # Example
///
/// ```
/// use session_lifecycle::{
///     CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let router = RouterId::new(1);
/// let incarnation = store.register_router(router).await?;
/// let id = SessionId::new(7);
/// let first = store.create(NewSession::new(id, router, incarnation)).await?;
/// let key = first.key();
/// let _ = store.close(id, CloseReason::ClientClosed).await?;
///
/// // The id is reused; a late message about the first session changes nothing.
/// let second = store.create(NewSession::new(id, router, incarnation)).await?;
/// assert!(store.close_exact(key, CloseReason::RouterDeleted).await.is_err());
/// assert!(!second.is_closed());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey {
    id: SessionId,
    generation: u64,
}

impl SessionKey {
    /// The key of the life `generation` of session `id` (as read back from
    /// a message that carried both).
    #[must_use]
    pub const fn new(id: SessionId, generation: u64) -> Self {
        Self { id, generation }
    }

    /// The session id.
    #[must_use]
    pub const fn id(self) -> SessionId {
        self.id
    }

    /// The generation: which life of the id.
    #[must_use]
    pub const fn generation(self) -> u64 {
        self.generation
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.id, self.generation)
    }
}
