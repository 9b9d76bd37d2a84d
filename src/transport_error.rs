//! `transport_error!`, the errors that wrap a transport's error: the
//! controller's notifier and prober hand back whatever their transport
//! failed with.

/// Declares `$name`, a cheaply cloneable error wrapping any
/// `std::error::Error`, its `source` (displayed as `"$prefix"`), or a
/// message (displayed as `"$prefix: <message>"`, no source).
macro_rules! transport_error {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone)]
        pub struct $name(std::sync::Arc<dyn std::error::Error + Send + Sync>);

        impl $name {
            /// Wraps the transport's error.
            ///
            /// See the example on the type.
            pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
                Self(std::sync::Arc::new(error))
            }

            /// An error with a message only.
            ///
            /// See the example on the type.
            pub fn msg(message: impl Into<String>) -> Self {
                Self(std::sync::Arc::new($crate::transport_error::Message(message.into())))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_tuple(stringify!($name))
                    .field(&self.0.to_string())
                    .finish()
            }
        }

        /// The prefix, and the message of an error made with `msg`. An
        /// error made with `new` is the [`source`](std::error::Error::source)
        /// instead, so that a report walking the chain prints it once.
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.0.downcast_ref::<$crate::transport_error::Message>() {
                    Some(message) => write!(f, concat!($prefix, ": {}"), message),
                    None => f.write_str($prefix),
                }
            }
        }

        impl std::error::Error for $name {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                if self.0.is::<$crate::transport_error::Message>() {
                    None
                } else {
                    Some(&*self.0)
                }
            }
        }
    };
}

pub(crate) use transport_error;

/// An error that is only a message.
#[derive(Debug)]
pub(crate) struct Message(pub(crate) String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}
