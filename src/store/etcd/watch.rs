//! The watch that keeps this controller's handles in step with etcd: a
//! session closed or removed by any controller closes the handle here.
//!
//! # Invariants
//!
//! - `Progress::applied` is the revision up to which every event was applied
//!   to the cache; the watch resumes from the revision after it, so a
//!   reconnect loses nothing. A watch whose start was compacted away re-lists
//!   the cached sessions instead (a compacted watch re-lists).
//! - A handle loaded from a read at revision `r` misses no later change:
//!   every change of a record while loads are in flight is remembered in
//!   `Progress::misses`, and a load that finds its id there with a later
//!   revision (or a re-list in progress) reads the record again once its
//!   handle is cached.
//!
//! # Deadlock safety
//!
//! The `progress` mutex is taken before any cache shard, never after, and
//! nothing else is taken under it. No user code runs under either: handles
//! are closed after both are released (closing runs user resources), and a
//! cache entry the watch removes leaves with its handle, dropped after them
//! too (it may be the session's last, whose payload's `Drop` is user code).

use std::collections::HashMap;
use std::sync::Weak;

use etcd_client::{EventType, WatchClient, WatchOptions, WatchResponse};
use tokio_util::sync::CancellationToken;

use super::keys::{KeyKind, decode_head, prefix_end};
use super::writer::backoff;
use super::{EtcdPayload, Shared};
use crate::id::SessionId;
use crate::session::CloseReason;

/// How far the watch got, and what loads in flight must know.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Every event up to this revision was applied.
    pub(super) applied: i64,
    /// Loads of records in flight.
    pub(super) loads: usize,
    /// Ids changed while loads were in flight, with the revision of their
    /// last change.
    pub(super) misses: HashMap<SessionId, i64>,
    /// A re-list is running: every load checks its record again.
    pub(super) relisting: bool,
    /// Too many misses were remembered: every load in flight checks its
    /// record again (until no load is in flight).
    pub(super) overflowed: bool,
    /// The revision of the last re-list: a read older than it may have
    /// missed a change the compacted watch never delivered.
    pub(super) relisted_at: i64,
}

/// At most this many misses are remembered (then `overflowed`).
const MAX_MISSES: usize = 65_536;

impl Progress {
    /// Whether a handle loaded from a read of `id` at `revision` may have
    /// missed a change, and must read its record again.
    pub(super) fn stale(&self, id: SessionId, revision: i64) -> bool {
        self.relisting
            || self.overflowed
            || revision < self.relisted_at
            || self.misses.get(&id).is_some_and(|&at| at > revision)
    }

    /// Remembers a change of `id` at `revision`, if loads are in flight.
    fn remember(&mut self, id: SessionId, revision: i64) {
        if self.loads == 0 || self.overflowed {
            return;
        }
        if self.misses.len() >= MAX_MISSES {
            self.misses.clear();
            self.overflowed = true;
            return;
        }
        self.misses.insert(id, revision);
    }

    /// One load fewer in flight.
    pub(super) fn end_load(&mut self) {
        self.loads = self.loads.saturating_sub(1);
        if self.loads == 0 {
            self.misses.clear();
            self.overflowed = false;
        }
    }
}

/// Watches the store's keys until `stop`, or until the store is gone.
pub(super) async fn run<P: EtcdPayload>(
    shared: Weak<Shared<P>>,
    mut client: WatchClient,
    prefix: Vec<u8>,
    stop: CancellationToken,
    mut suspended: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let Some(from) = shared
            .upgrade()
            .map(|shared| shared.progress.lock().applied + 1)
        else {
            return;
        };
        let options = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(from)
            .with_progress_notify();
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = client.watch(prefix.clone(), Some(options)) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, "etcd watch failed to start; retrying");
                if !pause(&stop, failures).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                _ = suspended.wait_for(|suspended| *suspended) => None,
                message = stream.message() => Some(message),
            };
            let Some(message) = message else {
                // Suspended (a test hook): disconnected until resumed, then
                // the watch resumes from the last revision applied.
                drop(stream);
                tokio::select! {
                    () = stop.cancelled() => return,
                    resumed = suspended.wait_for(|suspended| !*suspended) => {
                        if resumed.is_err() {
                            return;
                        }
                    }
                }
                break;
            };
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match message {
                Ok(Some(response)) if response.canceled() => {
                    let compacted = response.compact_revision();
                    if compacted > 0 {
                        tracing::info!(compacted, "etcd watch compacted; re-listing");
                        relist(&shared, &stop).await;
                    } else {
                        tracing::warn!(reason = response.cancel_reason(), "etcd watch canceled");
                    }
                    break;
                }
                Ok(Some(response)) => {
                    failures = 0;
                    shared.apply(&response);
                }
                Ok(None) | Err(_) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(?message, "etcd watch ended; resuming");
                    drop(shared);
                    if !pause(&stop, failures).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// Sleeps the backoff for `failures`; `false` if stopped meanwhile.
async fn pause(stop: &CancellationToken, failures: u32) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(backoff(failures)) => true,
    }
}

/// Checks every cached handle against etcd, then resumes after the revision
/// read. Retries until it succeeds or the store stops.
async fn relist<P: EtcdPayload>(shared: &Shared<P>, stop: &CancellationToken) {
    shared.progress.lock().relisting = true;
    let mut failures = 0u32;
    loop {
        match shared.recheck_cached().await {
            Ok(revision) => {
                let mut progress = shared.progress.lock();
                progress.applied = progress.applied.max(revision);
                progress.relisted_at = progress.relisted_at.max(revision);
                progress.relisting = false;
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, "re-listing after a compacted watch failed; retrying");
                if !pause(stop, failures).await {
                    return;
                }
            }
        }
    }
}

impl<P: EtcdPayload> Shared<P> {
    /// Applies one watch response to the cached handles.
    fn apply(&self, response: &WatchResponse) {
        let mut closes = Vec::new();
        {
            let mut progress = self.progress.lock();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                if let Some(KeyKind::Record(_, id)) = self.keys.parse(kv.key()) {
                    match event.event_type() {
                        EventType::Put => match decode_head(kv.value()) {
                            Ok(head) => {
                                if let Some(reason) = head.closed {
                                    let created = kv.create_revision();
                                    if let Some(cached) =
                                        self.cache.get(&id).filter(|c| c.created == created)
                                    {
                                        closes.push((cached.session.clone(), created, reason));
                                    }
                                }
                            }
                            Err(error) => {
                                tracing::warn!(%error, %id, "undecodable session record");
                            }
                        },
                        EventType::Delete => {
                            let removed = self.cache.remove_if(&id, |_, c| c.created < revision);
                            if let Some((_, cached)) = removed {
                                closes.push((
                                    cached.session,
                                    cached.created,
                                    CloseReason::Reclaimed,
                                ));
                            }
                        }
                    }
                    // Remembered even when a cached handle took it: a load
                    // in flight may hold another handle of the same record.
                    progress.remember(id, revision);
                }
                progress.applied = progress.applied.max(revision);
            }
            if response.events().is_empty() && !response.created() {
                // A progress notification: every event up to the header's
                // revision was sent.
                if let Some(header) = response.header() {
                    progress.applied = progress.applied.max(header.revision());
                }
            }
        }
        for (session, created, reason) in closes {
            self.close_quietly(&session, created, reason);
        }
    }
}
