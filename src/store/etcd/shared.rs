//! What the store shares with its watch and writer tasks, and the hook
//! that writes a handle's close to etcd.

use std::sync::Arc;

use dashmap::DashMap;
use etcd_client::{GetOptions, GetResponse, KvClient, Txn, TxnResponse};
use foldhash::fast::RandomState;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use super::create::{CreateCounters, CreateRequest};
use super::keys::{self, Keys};
use super::retry::Retry;
use super::txn::Limits;
use super::watch::Progress;
use super::writer::{CloseWrite, Write, WriterCounters};
use super::{EtcdError, EtcdPayload};
use crate::id::{Incarnation, RouterId, SessionId};
use crate::session::{CloseReason, Resource, Session};

/// What the store shares with its watch task.
pub(super) struct Shared<P> {
    pub(super) kv: KvClient,
    pub(super) keys: Keys,
    pub(super) cache: DashMap<SessionId, Cached<P>, RandomState>,
    pub(super) progress: Mutex<Progress>,
    pub(super) link: Arc<Link>,
    /// The create task's queue.
    pub(super) creates: mpsc::UnboundedSender<CreateRequest>,
    pub(super) counters: Arc<WriterCounters>,
    pub(super) create_counters: Arc<CreateCounters>,
    /// The member check's counters.
    pub(super) member_counters: Arc<super::members::MemberCounters>,
    /// Records read again by `recheck`.
    pub(super) rechecks: std::sync::atomic::AtomicU64,
    /// Cached handles that may have missed a change and could not be read
    /// again (etcd unreachable, or the caller's future dropped at it): the
    /// watch reads them again (`watch::settle_owed`), or such a handle
    /// would stay as it is for good, the change it missed applied already.
    pub(super) owed: Mutex<Vec<(RouterId, SessionId, i64)>>,
    /// Notified when `owed` gets handles.
    pub(super) owed_added: Arc<tokio::sync::Notify>,
    pub(super) stop: CancellationToken,
    pub(super) retry: Retry,
    /// `true` while a test holds the watch disconnected. Kept alive without
    /// `test-util` too: the watch stops when it is dropped.
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(super) suspend: tokio::sync::watch::Sender<bool>,
    pub(super) write_timeout: Duration,
    pub(super) concurrency: usize,
    pub(super) limits: Limits,
}

impl<P> Shared<P> {
    /// Hands the cached handles of `stale` to the watch to read again.
    pub(super) fn owe(&self, stale: Vec<(RouterId, SessionId, i64)>) {
        if stale.is_empty() {
            return;
        }
        tracing::debug!(
            handles = stale.len(),
            "handles that may have missed a change are read again by the watch"
        );
        self.owed.lock().extend(stale);
        self.owed_added.notify_one();
    }
}

impl<P> Drop for Shared<P> {
    fn drop(&mut self) {
        self.stop.cancel();
        // The cache may hold the last handle of a session: its payload's
        // `Drop` is user code, each contained.
        let cache = std::mem::take(&mut self.cache);
        crate::contain::drop_each_logged(
            cache.into_iter().map(|(_, cached)| cached.session),
            "etcd store",
        );
    }
}

/// A handle this controller holds, with the revision that created its
/// record (which life of the id it is).
pub(super) struct Cached<P> {
    pub(super) session: Session<P>,
    pub(super) created: i64,
}

/// What the close hooks of the handles need: the writer's queue, and the
/// ids being closed because etcd says so (no need to write those back).
pub(super) struct Link {
    pub(super) writes: mpsc::UnboundedSender<Write>,
    /// Ids (and the `create_revision` of the record) being closed because
    /// etcd says so.
    pub(super) quiet: DashMap<SessionId, i64, RandomState>,
}

/// Attached to every open handle: writes its close to etcd.
pub(super) struct WriteClose {
    pub(super) link: Arc<Link>,
    pub(super) id: SessionId,
    pub(super) record: Vec<u8>,
    pub(super) incarnation: Incarnation,
    pub(super) created: i64,
    pub(super) payload: Box<[u8]>,
}

impl Resource for WriteClose {
    fn release(self: Box<Self>, reason: CloseReason) {
        if self
            .link
            .quiet
            .get(&self.id)
            .is_some_and(|c| *c == self.created)
        {
            return; // closed because etcd says so
        }
        let value = keys::encode_closed(self.incarnation, reason, &self.payload);
        // Fails only once the writer is gone with the runtime: nothing left
        // to write with.
        let _ = self.link.writes.send(Write::Close(CloseWrite {
            record: self.record,
            created: self.created,
            value,
        }));
    }

    fn release_inline(&self) -> bool {
        true
    }
}

/// A record read from etcd and decoded, ready to become a handle.
pub(super) struct Loaded<P> {
    pub(super) router: RouterId,
    pub(super) id: SessionId,
    pub(super) created: i64,
    pub(super) record: keys::Record<P>,
    pub(super) payload: Box<[u8]>,
}

impl<P: EtcdPayload> Shared<P> {
    pub(super) fn kv(&self) -> KvClient {
        self.kv.clone()
    }

    /// A transaction that is safe to repeat, retried on [`Retry`].
    pub(super) async fn txn(
        &self,
        operation: &'static str,
        txn: Txn,
    ) -> Result<TxnResponse, EtcdError> {
        self.retry
            .run(operation, || {
                let mut kv = self.kv();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await
    }

    /// A read, retried on [`Retry`].
    pub(super) async fn get(
        &self,
        operation: &'static str,
        key: Vec<u8>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, EtcdError> {
        self.retry
            .run(operation, || {
                let mut kv = self.kv();
                let key = key.clone();
                let options = options.clone();
                async move { kv.get(key, options).await }
            })
            .await
    }

    pub(super) async fn flush(&self) -> Result<(), EtcdError> {
        let (done, flushed) = oneshot::channel();
        let _ = self.link.writes.send(Write::Flush(done));
        self.within("flush of queued closes", flushed).await?;
        Ok(())
    }

    /// Waits for the writer's answer, up to the write timeout.
    pub(super) async fn within<T>(
        &self,
        what: &'static str,
        answer: oneshot::Receiver<T>,
    ) -> Result<Option<T>, EtcdError> {
        match tokio::time::timeout(self.write_timeout, answer).await {
            Ok(answer) => Ok(answer.ok()),
            Err(_elapsed) => Err(EtcdError::WritePending {
                what,
                waited: self.write_timeout,
            }),
        }
    }

    /// Closes each handle as [`close_quietly`](Self::close_quietly) does,
    /// then lets it go. A payload's `Drop` (user code, run with the last
    /// handle) that panics is contained and logged: the other handles
    /// still close, and the watch that calls this keeps running.
    pub(super) fn close_all_quietly(&self, closes: Vec<(Session<P>, i64, CloseReason)>) {
        for (session, created, reason) in closes {
            let id = session.id();
            let closed = crate::contain::contain(|| {
                self.close_quietly(&session, created, reason);
                drop(session);
            });
            if closed.is_none() {
                tracing::error!(session = %id, "a session payload's Drop panicked; contained");
            }
        }
    }

    /// Closes the handle of the record created at `created` because etcd
    /// says it is closed or gone: not written back. `true` if this call
    /// closed it.
    /// Takes the cached handle of the record of `id` created at `created`
    /// out of the cache: closed (`Reclaimed`, not written back, as etcd no
    /// longer holds that record) and let go contained. A handle leaves the
    /// cache only closed: the one cached may be another handle of the same
    /// record than the caller's (a load adopted it after the watch took the
    /// caller's out), and left open it would be out of the watch's reach
    /// for good.
    pub(super) fn uncache(&self, id: SessionId, created: i64) {
        if let Some((_, cached)) = self.cache.remove_if(&id, |_, c| c.created == created) {
            self.close_all_quietly(vec![(cached.session, created, CloseReason::Reclaimed)]);
        }
    }

    pub(super) fn close_quietly(
        &self,
        session: &Session<P>,
        created: i64,
        reason: CloseReason,
    ) -> bool {
        if session.is_closed() {
            return false;
        }
        let id = session.id();
        self.link.quiet.insert(id, created);
        let won = session.close(reason).won();
        self.link.quiet.remove_if(&id, |_, c| *c == created);
        won
    }
}
