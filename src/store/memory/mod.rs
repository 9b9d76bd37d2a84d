//! The in-memory store, [`MemoryStore`].
//!
//! - `store`: the type, its fields' invariants and lock order, and its
//!   [`SessionStore`](super::SessionStore) implementation;
//! - `builder`: [`MemoryStoreBuilder`];
//! - `hash`: the session map's hasher, which keeps ids numbered together
//!   in one block of the map;
//! - `index`: a router's entry and its session index;
//! - `routers`: register, fence, finish, tombstones;
//! - `sessions`: create, get, close, remove;
//! - `audit`: audit, census, repair;
//! - `fault`: corruptions and faults injected on purpose (test-util).

mod audit;
mod builder;
#[cfg(any(test, feature = "test-util"))]
mod fault;
mod hash;
mod index;
mod routers;
mod sessions;
mod store;

pub use builder::MemoryStoreBuilder;
#[cfg(any(test, feature = "test-util"))]
pub use fault::{Corruption, Fault};
pub use store::MemoryStore;
