//! [`MemoryStoreBuilder`].

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

use dashmap::DashMap;
use foldhash::fast::RandomState;
use parking_lot::Mutex;

use super::hash::BlockHash;
use super::store::MemoryStore;
use crate::build::BuildError;
use crate::events::EventBus;

/// Default number of deleted router incarnations remembered.
const DEFAULT_TOMBSTONES: usize = 65_536;

/// Builder of a [`MemoryStore`].
///
/// # Example
///
/// ```
/// use session_lifecycle::{EventBus, MemoryStore};
///
/// let bus = EventBus::new(4_096);
/// // Sessions carry the client's name.
/// let store: MemoryStore<String> = MemoryStore::builder()
///     .tombstone_capacity(10_000)
///     .shard_amount(64)
///     .events(bus.clone())
///     .build().unwrap();
/// assert!(store.is_empty());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    tombstone_capacity: usize,
    shard_amount: Option<usize>,
    events: Option<EventBus>,
}

impl MemoryStoreBuilder {
    /// How many deleted router incarnations to remember (default 65,536).
    /// Past that, the oldest tombstone is forgotten and its router id becomes
    /// unknown; creates against it are still refused.
    pub fn tombstone_capacity(mut self, capacity: usize) -> Self {
        self.tombstone_capacity = capacity;
        self
    }

    /// The number of shards of the session and router maps (default: four
    /// per core, rounded up to a power of two). A power of two from 2 to
    /// 65,536, checked by [`build`](Self::build).
    pub fn shard_amount(mut self, shards: usize) -> Self {
        self.shard_amount = Some(shards);
        self
    }

    /// Publishes [`Event::SessionCreated`](crate::Event::SessionCreated) and
    /// [`Event::SessionClosed`](crate::Event::SessionClosed) of every session
    /// the store creates on `bus` (default: none).
    ///
    /// Each session then carries a small close hook (one allocation of 32
    /// bytes), released inline by its close whatever path closes it.
    ///
    /// Cost: while somebody subscribes, each create publishes under its
    /// router's lock (so the event comes before anyone can see the session),
    /// and creates on all routers then take turns on the bus's channel lock.
    /// Per-session events suit audits and tests; a controller creating
    /// sessions by the million on many threads listens to the router-level
    /// events of the other pieces instead.
    ///
    /// Publishing into a full ring drops the oldest event a lagging
    /// subscriber has not read, under the router's lock: if that event was
    /// the last holder of an error your prober or reclaim task returned
    /// ([`LivenessEvent::ProbeFailed`](crate::LivenessEvent::ProbeFailed),
    /// [`ReclaimEvent`](crate::ReclaimEvent)), the error's `Drop` runs there,
    /// and must not call back into the store. The same send wakes the
    /// subscriptions waiting in [`Subscription::recv`](crate::events::Subscription::recv)
    /// (tokio's channel wakes them inside it): a task's waker only
    /// schedules its task, but a hand-written waker must not call back into
    /// the store from `wake`.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// Builds the store, for sessions carrying a payload of type `P`.
    ///
    /// # Errors
    ///
    /// [`BuildError::Setting`] for a shard amount that is not a power of
    /// two from 2 to 65,536.
    pub fn build<P>(self) -> Result<MemoryStore<P>, BuildError> {
        let shards = self.shard_amount.map(check_shards).transpose()?;
        Ok(self.build_with(shards))
    }

    pub(super) fn build_with<P>(self, shards: Option<usize>) -> MemoryStore<P> {
        let (sessions, routers) = match shards {
            Some(shards) => (
                DashMap::with_hasher_and_shard_amount(BlockHash::default(), shards),
                DashMap::with_hasher_and_shard_amount(RandomState::default(), shards),
            ),
            None => (
                DashMap::with_hasher(BlockHash::default()),
                DashMap::with_hasher(RandomState::default()),
            ),
        };
        MemoryStore {
            sessions,
            routers,
            next_incarnation: AtomicU64::new(1),
            tombstones: Mutex::new(VecDeque::new()),
            tombstone_capacity: self.tombstone_capacity,
            events: self.events,
            #[cfg(any(test, feature = "test-util"))]
            skip_fence: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The most shards: each is a lock and a map, allocated up front.
const MAX_SHARDS: usize = 1 << 16;

/// Refuses a shard amount dashmap cannot take (a power of two above 1) or
/// that would allocate absurdly.
fn check_shards(shards: usize) -> Result<usize, BuildError> {
    if shards > 1 && shards.is_power_of_two() && shards <= MAX_SHARDS {
        Ok(shards)
    } else {
        Err(BuildError::setting(
            "MemoryStore",
            "shard_amount",
            format_args!("must be a power of two from 2 to {MAX_SHARDS}, got {shards}"),
        ))
    }
}

impl MemoryStore<()> {
    /// A builder to configure the store. See the example on [`MemoryStore`].
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            tombstone_capacity: DEFAULT_TOMBSTONES,
            shard_amount: None,
            events: None,
        }
    }
}
