//! The one error every builder of the crate returns.
//!
//! Every builder follows one convention: its setters take any value and
//! never panic; `build()` checks the settings and returns [`BuildError`] for
//! the first one the piece cannot honour (a bound it could not keep, a size
//! that would allocate absurdly), or when the piece needs a tokio runtime
//! to run its tasks and there is none.

use std::fmt;

/// Why a builder refused to build.
///
/// # Example
///
/// ```
/// use session_lifecycle::{BuildError, MemoryStore};
///
/// let refused = MemoryStore::builder().shard_amount(3).build::<()>();
/// match refused {
///     Err(BuildError::Setting { setting, .. }) => assert_eq!(setting, "shard_amount"),
///     other => panic!("unexpected {other:?}"),
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting the piece cannot honour.
    #[error("{piece}: `{setting}` {problem}")]
    Setting {
        /// The piece being built (`"RouterDeleter"`, `"MemoryStore"`, ...).
        piece: &'static str,
        /// The builder method that took the setting.
        setting: &'static str,
        /// What is wrong with it, with the value given.
        problem: String,
    },
    /// The piece runs tasks with timers, and `build` was called outside a
    /// tokio runtime, or on one built without its time driver (tokio's
    /// `enable_time`, or `enable_all`).
    #[error(
        "{piece} runs tasks with timers: build it inside a tokio runtime with its time driver enabled"
    )]
    NoRuntime {
        /// The piece being built.
        piece: &'static str,
    },
    /// Something the piece takes one of per instance, unique within the
    /// process, is used up (the liveness monitor's identities: 2^48 - 1 of
    /// them).
    #[error("{piece}: every {what} of the process is taken")]
    Exhausted {
        /// The piece being built.
        piece: &'static str,
        /// What ran out.
        what: &'static str,
    },
}

impl BuildError {
    /// A refused setting: `problem` says what is wrong, with the value.
    pub(crate) fn setting(
        piece: &'static str,
        setting: &'static str,
        problem: impl fmt::Display,
    ) -> Self {
        Self::Setting {
            piece,
            setting,
            problem: problem.to_string(),
        }
    }

    /// The builder method whose setting was refused, if a setting was.
    #[must_use]
    pub fn refused_setting(&self) -> Option<&'static str> {
        match self {
            Self::Setting { setting, .. } => Some(setting),
            Self::NoRuntime { .. } | Self::Exhausted { .. } => None,
        }
    }
}

/// Refuses `value` for `setting` unless it is within `1..=max`.
pub(crate) fn check_count(
    piece: &'static str,
    setting: &'static str,
    value: usize,
    max: usize,
) -> Result<usize, BuildError> {
    if value == 0 {
        Err(BuildError::setting(
            piece,
            setting,
            format_args!("must be at least 1, got 0"),
        ))
    } else if value > max {
        Err(BuildError::setting(
            piece,
            setting,
            format_args!("must be at most {max}, got {value}"),
        ))
    } else {
        Ok(value)
    }
}

/// The first of `settings` (a builder method's name, and whether it was
/// called) that was called: for the settings `Lifecycle` wires itself.
pub(crate) fn wired<const N: usize>(settings: [(&'static str, bool); N]) -> Option<&'static str> {
    settings
        .into_iter()
        .find_map(|(setting, given)| given.then_some(setting))
}

/// The current tokio runtime, if there is one and it has its time driver:
/// every piece that runs tasks also sets deadlines. `None` otherwise
/// (tokio panics making a timer on a runtime built without its time
/// driver; the panic is contained here, so the caller can refuse with its
/// `NoRuntime` instead of leaving tasks that die on their first poll).
///
/// The probe's answer is remembered per thread for the last runtime
/// probed: a runtime without timers runs the panic hook once per thread,
/// not at every call (a deletion's entry, a reclaim queue's revival).
pub(crate) fn timed_runtime() -> Option<tokio::runtime::Handle> {
    use std::cell::Cell;
    thread_local! {
        static PROBED: Cell<Option<(tokio::runtime::Id, bool)>> = const { Cell::new(None) };
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let id = runtime.id();
    let timed = match PROBED.get() {
        Some((probed, timed)) if probed == id => timed,
        _ => {
            let timed = crate::contain::contain(|| {
                drop(tokio::time::sleep(tokio::time::Duration::ZERO));
            })
            .is_some();
            PROBED.set(Some((id, timed)));
            timed
        }
    };
    timed.then_some(runtime)
}
