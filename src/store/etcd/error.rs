//! [`EtcdError`], and its conversion into the store's error types.

use std::fmt;

use tokio::time::Duration;

use crate::store::error::{
    BackendError, FenceError, FinishError, RegisterError, RouterError, SessionError,
};

/// What went wrong talking to etcd. Store methods return it inside a
/// [`BackendError`] (its [`source`](std::error::Error::source)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// Connecting to etcd failed.
    #[error("cannot reach etcd at {endpoints:?}: {source}")]
    Connect {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A request failed (etcd unreachable, timed out, or refused it). The
    /// store changed nothing, or the whole transaction: never half of one.
    #[error("etcd request `{operation}` failed: {source}")]
    Request {
        /// What the store was doing.
        operation: &'static str,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A key of the store holds a value this crate cannot read.
    #[error("etcd key {key} holds an unreadable value: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why it cannot be read.
        reason: String,
    },
    /// A write is queued but etcd did not acknowledge it in time; the store
    /// keeps retrying it in the background.
    #[error(
        "etcd did not acknowledge the {what} within {waited:?}; it is retried in the background"
    )]
    WritePending {
        /// The write.
        what: &'static str,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Other controllers kept changing a key this call had to change.
    #[error("etcd key {key} kept changing under this call")]
    Contention {
        /// The key.
        key: String,
    },
    /// A session's token or payload is larger than etcd accepts.
    #[error("session record of {bytes} bytes is larger than the {limit} bytes allowed")]
    TooLarge {
        /// The record's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl EtcdError {
    pub(super) fn request(operation: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |source| Self::Request { operation, source }
    }

    pub(super) fn corrupt(key: &[u8], reason: impl fmt::Display) -> Self {
        Self::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        }
    }
}

impl From<EtcdError> for BackendError {
    fn from(error: EtcdError) -> Self {
        BackendError::new(error)
    }
}

macro_rules! backend_from_etcd {
    ($($error:ty),*) => {$(
        impl From<EtcdError> for $error {
            fn from(error: EtcdError) -> Self {
                Self::Backend(BackendError::new(error))
            }
        }
    )*};
}
backend_from_etcd!(
    RegisterError,
    RouterError,
    SessionError,
    FenceError,
    FinishError
);
