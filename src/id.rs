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
