//! The reclamation queue: releases resources by priority, with retries, and
//! never drops work (I5).
//!
//! - `queue`: [`ReclaimQueue`], pushing and watching;
//! - `builder`: [`ReclaimQueueBuilder`];
//! - `heap`: the queue's shared state, with its invariants and lock;
//! - `waiting`: the waiting tasks in due order;
//! - `room`, `dead`: the bound and its waiting pushes, the dead letters;
//! - `worker`: the worker tasks, retries and failures;
//! - `close`: closing sessions through the queue, and shutdown;
//! - `policy`, `task`, `report`: the policy, the tasks, what the queue
//!   reports.

mod builder;
mod close;
mod dead;
mod heap;
mod policy;
mod queue;
mod report;
mod room;
mod task;
mod waiting;
mod worker;

pub use builder::ReclaimQueueBuilder;
pub use policy::{DefaultPolicy, Priority, ReclaimPolicy, RetrySchedule};
pub use queue::ReclaimQueue;
pub use report::{ClassCounts, DeadLetter, PushError, ReclaimStats, ShutdownReport, TryPushError};
pub use task::{Reclaim, ReclaimTask};

pub use crate::events::{ReclaimError, ReclaimErrorKind, ReclaimEvent, TaskInfo};
