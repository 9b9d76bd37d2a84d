//! The demo controller on the in-memory store.
//!
//! Registers routers, opens sessions on them from concurrent tasks, closes
//! some as clients leave, deletes one router by hand (fence, close, finish),
//! shows that creates on it are refused, audits the store and prints counts.
//! Exits non-zero if the audit finds anything.
//!
//! `cargo run --release --example controller`

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::{CloseReason, MemoryStore, NewSession, RouterId, SessionId, SessionStore};

const ROUTERS: u64 = 10;
const SESSIONS_PER_ROUTER: u64 = 10_000;

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let store = Arc::new(MemoryStore::new());
    let released = Arc::new(AtomicUsize::new(0));

    let mut incarnations = Vec::new();
    for r in 0..ROUTERS {
        incarnations.push(store.register_router(RouterId::new(r)).await?);
    }

    // One task per router opens its sessions; every third client leaves.
    let mut tasks = Vec::new();
    for (r, incarnation) in incarnations.iter().copied().enumerate() {
        let (store, released) = (Arc::clone(&store), Arc::clone(&released));
        tasks.push(tokio::spawn(async move {
            let router = RouterId::new(r as u64);
            let mut closed = 0;
            for i in 0..SESSIONS_PER_ROUTER {
                let id = SessionId::new(r as u64 * SESSIONS_PER_ROUTER + i);
                let session = store
                    .create(NewSession::new(id, router, incarnation))
                    .await?;
                session.record_in(512);
                let released = Arc::clone(&released);
                session.attach(move |_| {
                    released.fetch_add(1, Ordering::Relaxed);
                })?;
                if i % 3 == 0 {
                    let _ = store.close(id, CloseReason::ClientClosed).await?;
                    closed += 1;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(closed)
        }));
    }
    let mut client_closed = 0;
    for task in tasks {
        client_closed += task.await?.map_err(|e| e.to_string())?;
    }
    let created = ROUTERS * SESSIONS_PER_ROUTER;
    println!("routers registered:      {ROUTERS}");
    println!("sessions created:        {created}");
    println!("closed by clients:       {client_closed}");
    println!("sessions in the store:   {}", store.len());

    // Delete router 0: fence, ask its sessions to terminate, close them as
    // the router confirms, then finish.
    let router = RouterId::new(0);
    let snapshot = store.fence(router).await?;
    let fenced = snapshot.sessions.len();
    for session in &snapshot.sessions {
        let _ = session.begin_terminating();
    }
    for session in &snapshot.sessions {
        let _ = store
            .close(session.id(), CloseReason::RouterDeleted)
            .await?;
    }
    let finish = store.finish(router, snapshot.incarnation).await?;
    let refused = store
        .create(NewSession::new(
            SessionId::new(u64::MAX),
            router,
            snapshot.incarnation,
        ))
        .await
        .is_err();
    println!(
        "router-0 deleted:        {fenced} sessions closed, {} left for finish",
        finish.closed
    );
    println!(
        "create on router-0:      {}",
        if refused { "refused" } else { "ACCEPTED" }
    );

    let audit = store.audit().await?;
    let expected_released = client_closed as usize + fenced;
    println!(
        "resources released:      {} (expected {expected_released})",
        released.load(Ordering::Relaxed)
    );
    println!("sessions in the store:   {}", store.len());
    println!(
        "audit:                   zombies = {}, index disagreements = {}",
        audit.zombies(),
        audit.missing_from_index.len() + audit.missing_from_map.len()
    );
    let ok = audit.is_clean() && refused && released.load(Ordering::Relaxed) == expected_released;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
