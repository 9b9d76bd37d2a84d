//! [`EtcdError`], and its conversion into the store's error types.

use std::fmt;

use tokio::time::Duration;

use crate::store::error::{
    BackendError, BackendErrorKind, CreateErrorKind, FenceError, FinishError, RegisterError,
    RouterError, SessionError,
};

/// What went wrong talking to etcd. Store methods return it inside a
/// [`BackendError`] (its [`source`](std::error::Error::source)), whose
/// [`kind`](BackendError::kind) is [`EtcdError::kind`]. A variant that
/// carries the client's error keeps it as its own source, not in its
/// message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// Connecting to etcd failed.
    #[error("cannot reach etcd at {endpoints:?}")]
    Connect {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A request failed: etcd was unreachable or did not answer until the
    /// retry deadline passed (it was retried, if safe to repeat), or it
    /// refused the request as such. etcd applies a transaction whole or not
    /// at all: never half of one.
    #[error("etcd request `{operation}` failed")]
    Request {
        /// What the store was doing.
        operation: &'static str,
        /// The client's error (the last one, if retried).
        source: etcd_client::Error,
    },
    /// A write that must never apply twice (a create, a registration) was
    /// sent, no answer came, and a look at etcd could not tell whether it
    /// applied: it was not sent again.
    #[error("etcd did not confirm `{operation}`; it may have applied")]
    OutcomeUnknown {
        /// The write.
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
    /// [`EtcdStoreBuilder::connect`](super::EtcdStoreBuilder::connect)
    /// refuses a setting it cannot honour.
    #[error("invalid EtcdStore setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting.
        setting: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

impl EtcdError {
    /// What the error means for the caller (the kind of the
    /// [`BackendError`] it becomes).
    #[must_use]
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            Self::Connect { .. } => BackendErrorKind::Unavailable,
            Self::Request { source, .. } => match refusal(source) {
                Some(Refusal::TooLarge) => BackendErrorKind::TooLarge,
                Some(Refusal::Invalid) => BackendErrorKind::Refused,
                None => BackendErrorKind::Unavailable,
            },
            Self::OutcomeUnknown { .. } => BackendErrorKind::OutcomeUnknown,
            Self::Corrupt { .. } => BackendErrorKind::Corrupt,
            Self::WritePending { .. } => BackendErrorKind::Pending,
            Self::Contention { .. } => BackendErrorKind::Contention,
            Self::TooLarge { .. } => BackendErrorKind::TooLarge,
            Self::InvalidConfig { .. } => BackendErrorKind::Refused,
        }
    }

    pub(super) fn request(operation: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |source| Self::Request { operation, source }
    }

    pub(super) fn corrupt(key: &[u8], reason: impl fmt::Display) -> Self {
        Self::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        }
    }

    pub(super) fn contention(key: &[u8]) -> Self {
        Self::Contention {
            key: String::from_utf8_lossy(key).into_owned(),
        }
    }

    pub(super) fn config(setting: &'static str, reason: impl fmt::Display) -> Self {
        Self::InvalidConfig {
            setting,
            reason: reason.to_string(),
        }
    }
}

/// Why etcd refused a request as such (sending it again cannot succeed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The request or its answer is larger than allowed.
    TooLarge,
    /// Too many operations, a duplicate key, an invalid argument.
    Invalid,
}

/// Whether etcd (or the client) refused the request itself, not failed to
/// serve it: `None` for a transient failure worth retrying.
pub(super) fn refusal(error: &etcd_client::Error) -> Option<Refusal> {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return match error {
            etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                Some(Refusal::Invalid)
            }
            _ => None,
        };
    };
    // gRPC codes (etcd-client does not re-export tonic's `Code`).
    const INVALID_ARGUMENT: i32 = 3;
    const PERMISSION_DENIED: i32 = 7;
    const RESOURCE_EXHAUSTED: i32 = 8;
    const FAILED_PRECONDITION: i32 = 9;
    const OUT_OF_RANGE: i32 = 11;
    const UNIMPLEMENTED: i32 = 12;
    const UNAUTHENTICATED: i32 = 16;
    match status.code() as i32 {
        // A compacted or future revision is out of range too.
        OUT_OF_RANGE if status.message().contains("revision") => Some(Refusal::Invalid),
        RESOURCE_EXHAUSTED | OUT_OF_RANGE => Some(Refusal::TooLarge),
        INVALID_ARGUMENT if status.message().contains("too large") => Some(Refusal::TooLarge),
        INVALID_ARGUMENT | FAILED_PRECONDITION | PERMISSION_DENIED | UNAUTHENTICATED
        | UNIMPLEMENTED => Some(Refusal::Invalid),
        _ => None,
    }
}

/// Whether the request certainly never reached etcd (no connection could
/// be made): sending it again cannot apply it twice.
pub(super) fn unsent(error: &etcd_client::Error) -> bool {
    const UNAVAILABLE: i32 = 14;
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            status.code() as i32 == UNAVAILABLE
                && (message.contains("tcp connect error")
                    || message.contains("error trying to connect")
                    || message.contains("Connection refused"))
        }
        _ => false,
    }
}

/// A copy of `error` for a second caller (the client's error is not
/// `Clone`): the same status, or the same message.
pub(super) fn copy_error(error: &etcd_client::Error) -> etcd_client::Error {
    match error {
        etcd_client::Error::GRpcStatus(status) => etcd_client::Error::GRpcStatus(status.clone()),
        other => etcd_client::Error::EndpointError(other.to_string()),
    }
}

impl From<EtcdError> for BackendError {
    fn from(error: EtcdError) -> Self {
        BackendError::with_kind(error.kind(), error)
    }
}

impl From<EtcdError> for CreateErrorKind {
    fn from(error: EtcdError) -> Self {
        CreateErrorKind::Backend(error.into())
    }
}

macro_rules! backend_from_etcd {
    ($($error:ty),*) => {$(
        impl From<EtcdError> for $error {
            fn from(error: EtcdError) -> Self {
                Self::Backend(error.into())
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
