//! Memory per session, measured with a counting global allocator. The only
//! test in this binary, so no other test allocates while it measures.

use std::alloc::System;

use cap::Cap;
use futures::FutureExt;
use session_lifecycle::{CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionStore};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const ROUTERS: u64 = 200;
const PER_ROUTER: u64 = 1_000;
/// The budget of issue #2: sessions without payload.
const MAX_BYTES_PER_SESSION: f64 = 256.0;

#[test]
fn a_session_costs_at_most_256_bytes_and_memory_returns_after_close() {
    let store = MemoryStore::new();
    let mut incarnations = Vec::new();
    for r in 0..ROUTERS {
        let incarnation = store
            .register_router(RouterId::new(r))
            .now_or_never()
            .unwrap()
            .unwrap();
        incarnations.push(incarnation);
    }
    let start = ALLOC.allocated();
    for r in 0..ROUTERS {
        for i in 0..PER_ROUTER {
            let spec = NewSession::new(
                SessionId::new(r * PER_ROUTER + i),
                RouterId::new(r),
                incarnations[r as usize],
            );
            drop(store.create(spec).now_or_never().unwrap().unwrap());
        }
    }
    let total = ROUTERS * PER_ROUTER;
    let per_session = (ALLOC.allocated() - start) as f64 / total as f64;
    println!("{per_session:.1} bytes per session");
    assert!(
        per_session <= MAX_BYTES_PER_SESSION,
        "{per_session:.1} bytes per session"
    );
    for id in 0..total {
        let _ = store
            .close(SessionId::new(id), CloseReason::ClientClosed)
            .now_or_never()
            .unwrap()
            .unwrap();
    }
    store.shrink_to_fit();
    let left = ALLOC.allocated().saturating_sub(start);
    // What stays is the maps' minimum capacity (a small index per router),
    // not per-session memory: under one byte per session that was closed.
    assert!(
        left < total as usize,
        "{left} bytes left after closing {total} sessions"
    );
}
