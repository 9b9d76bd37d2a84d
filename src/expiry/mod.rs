//! Session expiry: sessions that carry an absolute expiry (their API
//! session's, say) are closed with
//! [`CloseReason::Expired`](crate::CloseReason::Expired) when it comes, by
//! one [`ExpiryMonitor`] task over one timer wheel, with an
//! [`Event::SessionExpiringSoon`](crate::Event::SessionExpiringSoon)
//! warning ahead of it.
//!
//! # Invariants
//!
//! - A session is tracked by at most one monitor: its expiry word's
//!   `TRACKED` flag is set once, by [`ExpiryMonitor::track`].
//! - A tracked, active session with an expiry is in exactly one place:
//!   the `incoming` list or the wheel (owned by the monitor task), until
//!   the task decides it expired (it sets the word's `EXPIRED` flag with a
//!   compare-exchange against the expiry it read) and hands it to the
//!   close. Closed, terminating and cleared sessions leave the wheel when
//!   their entry comes up or the sweep passes their slot (the whole wheel
//!   once a minute), whichever is first.
//! - An entry never comes up after its session's expiry tick: expiries
//!   only move later, so an entry filed at the expiry it read is at worst
//!   early, and then re-filed.
//!
//! # Deadlock safety
//!
//! One lock, `incoming`, held only to push or take sessions (and, in
//! `shutdown`, to set `stopped`, so that no `track` succeeds after it); never across
//! an `.await` or while user code (the store, resources, the metrics
//! recorder, event subscribers) runs.

mod config;
mod monitor;
mod report;
mod task;

pub use config::ExpiryMonitorBuilder;
pub use monitor::ExpiryMonitor;
pub use report::{ExpiryStats, TrackError};

pub use crate::session::ExpiryError;
