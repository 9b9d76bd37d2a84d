//! [`EtcdStore`]: the session store on etcd, for controllers that outgrow
//! one process.
//!
//! # Invariants
//!
//! - A session is created by one transaction guarded on its router's state
//!   key (`live`, at the incarnation's revision) and on its id being free;
//!   the fence is one transaction that turns `live` into `fenced`. etcd
//!   serializes both, so once the fence committed no create can (I2).
//! - A session's record and its pointer are written, and deleted, in the
//!   same transaction: the two agree (I7), which `audit` checks.
//! - Every write of an existing record is guarded by the record's
//!   `create_revision`, so no write meant for one life of a session id
//!   touches a later one, and none brings a deleted record back.
//! - Each controller holds at most one handle per session record (the
//!   cache; a `create` answered after its router's whole deletion is the
//!   one exception, see the type's docs); a close by any controller
//!   reaches it through the watch.
//! - `finish` deletes every key of the router's range in the store's key
//!   format, readable or not, in transactions within `max_txn_ops`, each
//!   guarded on the router still being fenced in the incarnation, each
//!   record on being the one listed and its pointer on being created with
//!   it; it writes the tombstone only when a final listing finds nothing
//!   but foreign keys (never deleted, never waited for). Every step can
//!   run again: a deletion whose controller died is resumed by another one.
//! - Every request that is safe to repeat is retried on one jittered
//!   schedule (`retry`) until a deadline; a create or a registration is
//!   sent again only after a look at etcd shows it did not land, so
//!   neither ever applies twice (I10).
//! - No request asks etcd for more than it answers: listings are paged by
//!   keys and by bytes, and a request etcd refuses as too large or as too
//!   many operations is split (I10, I11).
//!
//! # Deadlock safety
//!
//! Locks, in the order they may be taken: the watch's `progress` mutex,
//! then one `cache` shard (then, building a handle, the new handle's own
//! lock, which nobody else holds yet). Nothing else is taken under either,
//! and no guard is held across an `.await`. No user code runs under them
//! (I8): handles are closed (which runs user resources) after both are
//! released; nothing that may hold the last handle of a session or a
//! decoded payload (whose `Drop` is user code) is dropped under them (a
//! cache entry removed comes out of the shard with its handle, and records
//! not made into handles drop after the guards); and closes of handles
//! built closed are counted in the metrics after them.

mod audit;
mod builder;
mod cache;
mod create;
mod error;
mod finish;
mod keys;
mod members;
mod payload;
mod reads;
mod retry;
mod router;
mod shared;
mod store;
mod txn;
mod watch;
mod writer;

pub use builder::{DEFAULT_PREFIX, EtcdStoreBuilder, MAX_RECORD_LIMIT};
pub use error::EtcdError;
pub use keys::RecordError;
pub use payload::EtcdPayload;
use shared::Shared;
#[cfg(feature = "test-util")]
pub use store::WatchSuspension;
pub use store::{EtcdStats, EtcdStore, WriterStats};
