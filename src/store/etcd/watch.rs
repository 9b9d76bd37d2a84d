//! The watch that keeps this controller's handles in step with etcd: a
//! session closed or removed by any controller closes the handle here.
//!
//! # Invariants
//!
//! - `Progress::applied` is the revision up to which every event was applied
//!   to the cache; the watch resumes from the revision after it, so a
//!   reconnect loses nothing. A watch whose start was compacted away re-lists
//!   the cached sessions instead (a compacted watch re-lists).
//! - The watch asks etcd to fragment big responses (a catch-up of many big
//!   records in one message went past the client's 64 MiB decode limit,
//!   and the watch resumed into the same message for ever). A fragment may
//!   end inside a revision, so the last revision of a response counts as
//!   applied only once a later one (or a progress notification) shows it
//!   whole; events applied twice after a reconnect change nothing. A
//!   response the client still cannot decode has the watch re-list and
//!   resume from the revision read, as a compacted watch does.
//! - A handle loaded from a read at revision `r` misses no later change:
//!   every change of a record while loads are in flight is remembered in
//!   `Progress::misses`, and a load that finds its id there with a later
//!   revision (or a re-list in progress) reads the record again once its
//!   handle is cached; if that read does not complete (etcd unreachable,
//!   the caller's future dropped), the handle is owed to the watch, which
//!   reads it again (`Shared::owed`).
//!
//! - User code the watch runs (a payload's `Drop` with the last handle of a
//!   closed session, its `decode` in a re-list) cannot end it: each close
//!   is contained on its own, and a panic anywhere else has `supervise`
//!   re-list and watch again.
//!
//! # Deadlock safety
//!
//! The `progress` mutex is taken before any cache shard, never after, and
//! nothing else is taken under it. No user code runs under either: handles
//! are closed after both are released (closing runs user resources), and a
//! cache entry the watch removes leaves with its handle, dropped after them
//! too (it may be the session's last, whose payload's `Drop` is user code).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use etcd_client::{EventType, WatchClient, WatchOptions, WatchResponse};
use futures::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::error::{Refusal, refusal};
use super::keys::{KeyKind, decode_head, prefix_end};
use super::retry::Delays;
use super::shared::Cached;
use super::{EtcdPayload, Shared};
use crate::id::SessionId;
use crate::session::CloseReason;

/// How far the watch got, and what loads in flight must know.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Every event up to this revision was applied.
    pub(super) applied: i64,
    /// Loads of records in flight, counted by the revision applied when
    /// each began (a load reads at that revision or later).
    loads: BTreeMap<i64, usize>,
    /// Changes of records while loads were in flight, in revision order
    /// (the order the watch delivers them).
    changes: VecDeque<(i64, SessionId)>,
    /// The last change of each id in `changes`.
    misses: HashMap<SessionId, i64>,
    /// Changes up to this revision were forgotten to bound the memory: a
    /// load that read before it checks its record again.
    forgotten: i64,
    /// A re-list is running: every load checks its record again.
    pub(super) relisting: bool,
    /// The revision of the last re-list: a read older than it may have
    /// missed a change the compacted watch never delivered.
    pub(super) relisted_at: i64,
}

/// At most this many changes are remembered; older ones are forgotten
/// (loads that read before them check again), never all at once.
const MAX_MISSES: usize = 65_536;

impl Progress {
    pub(super) fn new(applied: i64) -> Self {
        Self {
            applied,
            ..Self::default()
        }
    }

    /// Whether a handle loaded from a read of `id` at `revision` may have
    /// missed a change, and must read its record again.
    pub(super) fn stale(&self, id: SessionId, revision: i64) -> bool {
        self.relisting
            || revision < self.relisted_at
            || revision < self.forgotten
            || self.misses.get(&id).is_some_and(|&at| at > revision)
    }

    /// One load more in flight; returns what [`end_load`](Self::end_load)
    /// needs.
    pub(super) fn begin_load(&mut self) -> i64 {
        *self.loads.entry(self.applied).or_default() += 1;
        self.applied
    }

    /// One load fewer in flight (begun when `began` was applied).
    pub(super) fn end_load(&mut self, began: i64) {
        if let Some(count) = self.loads.get_mut(&began) {
            *count -= 1;
            if *count == 0 {
                self.loads.remove(&began);
            }
        }
        self.prune();
    }

    /// Forgets the changes no load in flight can have missed: every load
    /// reads at the revision applied when it began or later, so a change
    /// at or before the oldest such revision is in every read.
    fn prune(&mut self) {
        let Some((&oldest, _)) = self.loads.first_key_value() else {
            self.changes.clear();
            self.misses.clear();
            return;
        };
        while let Some(&(revision, id)) = self.changes.front() {
            if revision > oldest {
                break;
            }
            self.changes.pop_front();
            self.misses.remove_if_at(id, revision);
        }
    }

    /// Remembers a change of `id` at `revision`, if loads are in flight.
    fn remember(&mut self, id: SessionId, revision: i64) {
        if self.loads.is_empty() {
            return;
        }
        self.prune();
        if self.changes.len() >= MAX_MISSES
            && let Some((oldest, old)) = self.changes.pop_front()
        {
            self.forgotten = self.forgotten.max(oldest);
            self.misses.remove_if_at(old, oldest);
        }
        self.changes.push_back((revision, id));
        self.misses.insert(id, revision);
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.changes.len()
    }
}

/// Removing a miss only if it is still the change being forgotten.
trait RemoveIfAt {
    fn remove_if_at(&mut self, id: SessionId, revision: i64);
}

impl RemoveIfAt for HashMap<SessionId, i64> {
    fn remove_if_at(&mut self, id: SessionId, revision: i64) {
        if self.get(&id) == Some(&revision) {
            self.remove(&id);
        }
    }
}

/// Watches the store's keys until `stop`, or until the store is gone; after
/// a panic (user code the watch ran: a payload's `decode` or `Drop`) it
/// re-lists and watches again, for a watch that died would leave this
/// controller's handles open for good.
pub(super) async fn supervise<P: EtcdPayload>(
    shared: Weak<Shared<P>>,
    owed_added: Arc<Notify>,
    client: WatchClient,
    prefix: Vec<u8>,
    stop: CancellationToken,
    suspended: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let Some(delays) = shared.upgrade().map(|shared| shared.retry.delays()) else {
            return;
        };
        let watched = AssertUnwindSafe(run(
            shared.clone(),
            &owed_added,
            client.clone(),
            prefix.clone(),
            stop.clone(),
            suspended.clone(),
            delays,
        ))
        .catch_unwind()
        .await;
        match watched {
            Ok(()) => return,
            Err(panic) => crate::contain::dispose(panic),
        }
        tracing::error!(
            "the etcd watch panicked in user code it ran; re-listing, then watching again"
        );
        let Some(mut delays) = shared.upgrade().map(|shared| shared.retry.delays()) else {
            return;
        };
        // Not at once: a payload that panics every time is retried at the
        // store's retry pace.
        if !pause(&stop, &mut delays).await {
            return;
        }
        relist(&shared, &stop, &mut delays).await;
    }
}

/// Watches the store's keys until `stop`, or until the store is gone.
async fn run<P: EtcdPayload>(
    shared: Weak<Shared<P>>,
    owed_added: &Notify,
    mut client: WatchClient,
    prefix: Vec<u8>,
    stop: CancellationToken,
    mut suspended: tokio::sync::watch::Receiver<bool>,
    mut delays: Delays,
) {
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
            .with_progress_notify()
            .with_fragment();
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = client.watch(prefix.clone(), Some(options)) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "etcd watch failed to start; retrying");
                if !pause(&stop, &mut delays).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let woke = tokio::select! {
                () = stop.cancelled() => return,
                _ = suspended.wait_for(|suspended| *suspended) => Woke::Suspended,
                () = owed_added.notified() => Woke::Owed,
                message = stream.message() => Woke::Message(message),
            };
            let message = match woke {
                Woke::Message(message) => message,
                Woke::Suspended => {
                    // A test hook: disconnected until resumed, then the
                    // watch resumes from the last revision applied.
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
                }
                Woke::Owed => {
                    // Handles that may have missed a change could not be
                    // read again by their load: read them here (the
                    // stream's next messages wait meanwhile).
                    if !settle_owed(&shared, &stop, &mut delays).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(strong) = shared.upgrade() else {
                return;
            };
            match message {
                Ok(Some(response)) if response.canceled() => {
                    let compacted = response.compact_revision();
                    drop(strong);
                    if compacted > 0 {
                        tracing::info!(compacted, "etcd watch compacted; re-listing");
                        relist(&shared, &stop, &mut delays).await;
                    } else {
                        tracing::warn!(reason = response.cancel_reason(), "etcd watch canceled");
                        // No leader on its member, say: try again, later.
                        if !pause(&stop, &mut delays).await {
                            return;
                        }
                    }
                    break;
                }
                Ok(Some(response)) => {
                    delays.reset();
                    strong.apply(&response);
                }
                Err(error) if matches!(refusal(&error), Some(Refusal::TooLarge)) => {
                    // A message past the client's decode limit: resuming
                    // would read it again. Re-list, then resume after.
                    tracing::warn!(%error, "etcd watch message too big; re-listing");
                    drop(strong);
                    relist(&shared, &stop, &mut delays).await;
                    break;
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(?message, "etcd watch ended; resuming");
                    drop(strong);
                    if !pause(&stop, &mut delays).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// What woke the watch.
enum Woke {
    /// A test holds the watch disconnected.
    Suspended,
    /// Handles are owed a read ([`Shared::owed`]).
    Owed,
    /// etcd's next message.
    Message(Result<Option<WatchResponse>, etcd_client::Error>),
}

/// Sleeps the next delay of the store's retry schedule; `false` if stopped
/// meanwhile.
async fn pause(stop: &CancellationToken, delays: &mut Delays) -> bool {
    let delay = delays.next_delay();
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Reads again the handles owed to the watch ([`Shared::owed`]); those it
/// could not read stay owed, and it paces itself on the retry schedule
/// before the watch goes on. `false` if the store stopped or is gone.
async fn settle_owed<P: EtcdPayload>(
    shared: &Weak<Shared<P>>,
    stop: &CancellationToken,
    delays: &mut Delays,
) -> bool {
    let Some(strong) = shared.upgrade() else {
        return false;
    };
    let owed = std::mem::take(&mut *strong.owed.lock());
    // `recheck_or_owe` owes them again if this attempt fails, or panics in
    // user code (a payload's `Drop`), or this task is dropped meanwhile.
    let settled = AssertUnwindSafe(strong.recheck_or_owe(owed))
        .catch_unwind()
        .await;
    drop(strong);
    match settled {
        Ok(Ok(())) => {
            delays.reset();
            true
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "reading owed handles again failed; retrying");
            pause(stop, delays).await
        }
        Err(panic) => {
            crate::contain::dispose(panic);
            tracing::error!("reading owed handles again panicked in user code; retrying");
            pause(stop, delays).await
        }
    }
}

/// Checks every cached handle against etcd, then resumes after the revision
/// read. Retries until it succeeds, the store stops or is gone: it holds the
/// store only during an attempt (each bounded by the request timeout), so a
/// store dropped while etcd does not answer lets go of its handles. A panic
/// in user code an attempt ran (a payload's `Drop`) fails that attempt.
async fn relist<P: EtcdPayload>(
    shared: &Weak<Shared<P>>,
    stop: &CancellationToken,
    delays: &mut Delays,
) {
    let Some(strong) = shared.upgrade() else {
        return;
    };
    strong.progress.lock().relisting = true;
    drop(strong);
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let attempt = AssertUnwindSafe(strong.recheck_cached())
            .catch_unwind()
            .await;
        match attempt {
            Ok(Ok(revision)) => {
                let mut progress = strong.progress.lock();
                progress.applied = progress.applied.max(revision);
                progress.relisted_at = progress.relisted_at.max(revision);
                progress.relisting = false;
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "re-listing the cached sessions failed; retrying");
            }
            Err(panic) => {
                crate::contain::dispose(panic);
                tracing::error!("re-listing the cached sessions panicked in user code; retrying");
            }
        }
        drop(strong);
        if !pause(stop, delays).await {
            return;
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
                if let Some(KeyKind::Record(router, id)) = self.keys.parse(kv.key()) {
                    // That very record: the id on that router, created then.
                    let this = |c: &Cached<P>| c.session.router() == router;
                    match event.event_type() {
                        EventType::Put => match decode_head(kv.value()) {
                            Ok(head) => {
                                if let Some(reason) = head.closed {
                                    let created = kv.create_revision();
                                    if let Some(cached) = self
                                        .cache
                                        .get(&id)
                                        .filter(|c| this(c) && c.created == created)
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
                            let removed = self
                                .cache
                                .remove_if(&id, |_, c| this(c) && c.created < revision);
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
                // Every revision before this one came whole (a fragment
                // may end inside this one).
                progress.applied = progress.applied.max(revision - 1);
            }
            if response.events().is_empty() && !response.created() {
                // A progress notification: every event up to the header's
                // revision was sent.
                if let Some(header) = response.header() {
                    progress.applied = progress.applied.max(header.revision());
                }
            }
        }
        self.close_all_quietly(closes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_are_forgotten_as_loads_end_and_memory_stays_bounded() {
        let mut progress = Progress::new(10);
        let id = SessionId::new(1);
        // No load in flight: nothing remembered.
        progress.remember(id, 11);
        assert_eq!(progress.remembered(), 0);
        let first = progress.begin_load();
        progress.remember(id, 12);
        progress.applied = 12;
        let second = progress.begin_load();
        progress.remember(SessionId::new(2), 13);
        assert!(progress.stale(id, 11), "a read before the change");
        assert!(!progress.stale(id, 12));
        // The first load ends: the change at 12 is in every read left.
        progress.end_load(first);
        assert_eq!(progress.remembered(), 1);
        assert!(!progress.stale(id, 11));
        progress.end_load(second);
        assert_eq!(progress.remembered(), 0);

        // Loads always in flight: a constant stream of changes never
        // fills the memory past its bound, and only loads older than what
        // was forgotten check again (no cliff).
        let mut at = 100;
        let mut load = progress.begin_load();
        for n in 0..(3 * MAX_MISSES as u64) {
            at += 1;
            progress.applied = at;
            progress.remember(SessionId::new(n), at);
            if n % 256 == 0 {
                let next = progress.begin_load();
                progress.end_load(load);
                load = next;
            }
            assert!(progress.remembered() <= MAX_MISSES);
        }
        assert!(!progress.stale(SessionId::new(u64::MAX), at));
        assert_eq!(progress.forgotten, 0, "loads ended before the bound");
        // One load that never ends: the oldest changes are forgotten, and
        // only reads before them are stale.
        let _stuck = progress.begin_load();
        for n in 0..(MAX_MISSES as u64 + 10) {
            at += 1;
            progress.applied = at;
            progress.remember(SessionId::new(n), at);
        }
        assert_eq!(progress.remembered(), MAX_MISSES);
        assert!(progress.forgotten > 0);
        assert!(progress.stale(SessionId::new(u64::MAX), progress.forgotten - 1));
        assert!(!progress.stale(SessionId::new(u64::MAX), at));
    }
}
