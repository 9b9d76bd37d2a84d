//! Creates: each `create` is one guarded transaction of its own in etcd's
//! eyes (the router live in the session's incarnation, the id free), but
//! concurrent creates share a round trip: the create task sends them as
//! nested transactions of one request, each with its own guards and its own
//! outcome.
//!
//! # Invariants
//!
//! - A create never applies twice: it is sent again only after a look at
//!   etcd found it did not land (its pointer absent), and its guard (the id
//!   free) makes a late landing of the first attempt and the second
//!   exclusive. A create whose outcome stays unknown is answered with
//!   [`EtcdError::OutcomeUnknown`], never as created or refused.
//! - A request holds at most `creates_per_txn` creates, at most
//!   [`MAX_TXN_BYTES`], and no key twice; one etcd refuses as such (a
//!   smaller `--max-txn-ops` than configured) is split in halves.
//! - The task holds no lock; it owns its queue's receiver, and at most
//!   `concurrency` requests are in flight: creates queued meanwhile share
//!   the next request.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::mapref::entry::Entry;
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::error::{copy_error, refusal, unsent};
use super::keys;
use super::retry::Retry;
use super::shared::Cached;
use super::txn::{Limits, MAX_TXN_BYTES, generation, live_in, revision_of, router_status};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::{Incarnation, RouterId};
use crate::session::{CloseReason, NewSession, Session};
use crate::store::error::{CreateError, CreateErrorKind};
use crate::store::rules::admits;

/// One create, queued for the create task.
pub(super) struct CreateRequest {
    router_key: Vec<u8>,
    pointer: Vec<u8>,
    record: Vec<u8>,
    incarnation: Incarnation,
    router: RouterId,
    value: Vec<u8>,
    answer: oneshot::Sender<CreateAnswer>,
}

/// What became of a create.
enum CreateAnswer {
    /// Created at this revision.
    Created(i64),
    /// A guard failed: the router's state key (if any), and whether the id
    /// is taken.
    Refused { router: Option<KeyValue> },
    /// Failed; nothing applied, or [`EtcdError::OutcomeUnknown`].
    Failed(EtcdError),
}

/// Counters of the create task, read by `EtcdStore::stats`.
#[derive(Debug, Default)]
pub(super) struct CreateCounters {
    pub(super) creates: AtomicU64,
    pub(super) transactions: AtomicU64,
    pub(super) unknown: AtomicU64,
}

impl CreateRequest {
    /// The bytes the create puts in a request.
    fn bytes(&self) -> usize {
        self.value.len() + 3 * self.pointer.len() + 2 * self.router_key.len() + self.record.len()
    }

    /// The create's nested transaction.
    fn txn(&self) -> TxnOp {
        let [live, at] = live_in(&self.router_key, self.incarnation);
        TxnOp::txn(
            Txn::new()
                .when([
                    live,
                    at,
                    Compare::create_revision(self.pointer.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(self.pointer.clone(), self.router.get().to_be_bytes(), None),
                    TxnOp::put(self.record.clone(), self.value.clone(), None),
                ])
                .or_else([TxnOp::get(self.router_key.clone(), Some(GetOptions::new()))]),
        )
    }
}

/// Sends what arrives on `queue` until every sender is gone.
pub(super) async fn run(
    kv: KvClient,
    mut queue: mpsc::UnboundedReceiver<CreateRequest>,
    concurrency: usize,
    limits: Limits,
    retry: Retry,
    counters: Arc<CreateCounters>,
) {
    let creator = Arc::new(Creator {
        kv,
        retry,
        counters,
    });
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let per_txn = limits.creates_per_txn();
    // Creates that did not fit a request (too many bytes, or their id
    // already in it): the next request's first.
    let mut held: VecDeque<CreateRequest> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(request) => request,
            None => match queue.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        // A free slot first: creates queued while every slot is busy share
        // the next request.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut keys = HashSet::new();
        keys.insert(first.pointer.clone());
        let mut bytes = first.bytes();
        let mut group = vec![first];
        let mut deferred = VecDeque::new();
        while group.len() < per_txn && deferred.len() < per_txn {
            let next = match held.pop_front() {
                Some(request) => request,
                None => match queue.try_recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            if bytes + next.bytes() > MAX_TXN_BYTES || keys.contains(&next.pointer) {
                deferred.push_back(next);
                continue;
            }
            keys.insert(next.pointer.clone());
            bytes += next.bytes();
            group.push(next);
        }
        // In queue order: what was deferred first.
        deferred.append(&mut held);
        held = deferred;
        let creator = Arc::clone(&creator);
        tokio::spawn(async move {
            creator.send(group).await;
            drop(slot);
        });
    }
}

struct Creator {
    kv: KvClient,
    retry: Retry,
    counters: Arc<CreateCounters>,
}

impl Creator {
    /// Sends one group until each create has its outcome.
    async fn send(&self, group: Vec<CreateRequest>) {
        let give_up = Instant::now() + self.retry.deadline();
        let mut delays = self.retry.delays();
        // Groups to send, with whether an earlier attempt of theirs may
        // have landed.
        let mut pending = vec![(group, false)];
        while let Some((group, uncertain)) = pending.pop() {
            if group.is_empty() {
                continue;
            }
            let txn = Txn::new().and_then(group.iter().map(CreateRequest::txn).collect::<Vec<_>>());
            self.counters.transactions.fetch_add(1, Ordering::Relaxed);
            let error = match self.kv.clone().txn(txn).await {
                Ok(response) => {
                    let revision = revision_of(&response);
                    for (request, op) in group.into_iter().zip(response.op_responses()) {
                        self.answer(request, outcome(op, revision), uncertain);
                    }
                    continue;
                }
                Err(error) => error,
            };
            if refusal(&error).is_some() {
                if group.len() > 1 {
                    tracing::debug!(%error, creates = group.len(), "etcd refused a group of creates; splitting it");
                    let mut left = group;
                    let right = left.split_off(left.len() / 2);
                    pending.push((right, uncertain));
                    pending.push((left, uncertain));
                } else {
                    for request in group {
                        let failed = EtcdError::request("create session")(copy_error(&error));
                        self.answer(request, CreateAnswer::Failed(failed), uncertain);
                    }
                }
                continue;
            }
            // A transient failure: the creates may have landed.
            let uncertain = uncertain || !unsent(&error);
            let landed = if uncertain {
                self.landed(&group).await
            } else {
                Ok(vec![false; group.len()])
            };
            let late = Instant::now() >= give_up;
            let mut again = Vec::new();
            match landed {
                Ok(landed) => {
                    for (request, landed) in group.into_iter().zip(landed) {
                        if landed || late {
                            let failed = unknown_or(uncertain, &error);
                            self.answer(request, CreateAnswer::Failed(failed), uncertain);
                        } else {
                            again.push(request);
                        }
                    }
                }
                Err(_) => {
                    for request in group {
                        let failed = unknown_or(uncertain, &error);
                        self.answer(request, CreateAnswer::Failed(failed), uncertain);
                    }
                }
            }
            if !again.is_empty() {
                tracing::debug!(%error, creates = again.len(), "creates did not land; sending them again");
                tokio::time::sleep(delays.next_delay()).await;
                pending.push((again, uncertain));
            }
        }
    }

    /// Whether each create's pointer exists now (a linearizable read).
    async fn landed(&self, group: &[CreateRequest]) -> Result<Vec<bool>, EtcdError> {
        let gets: Vec<TxnOp> = group
            .iter()
            .map(|r| TxnOp::get(r.pointer.clone(), Some(GetOptions::new().with_count_only())))
            .collect();
        let response = self
            .retry
            .run("look for a create", || {
                let mut kv = self.kv.clone();
                let txn = Txn::new().and_then(gets.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(response
            .op_responses()
            .into_iter()
            .map(|op| matches!(op, TxnOpResponse::Get(get) if get.count() > 0))
            .collect())
    }

    fn answer(&self, request: CreateRequest, answer: CreateAnswer, uncertain: bool) {
        let answer = match answer {
            // Refused after an attempt that may have landed: that attempt
            // may be what took the id.
            CreateAnswer::Refused { .. } if uncertain => {
                CreateAnswer::Failed(EtcdError::OutcomeUnknown {
                    operation: "create session",
                    source: etcd_client::Error::EndpointError(
                        "an earlier attempt may have created the session".into(),
                    ),
                })
            }
            answer => answer,
        };
        match &answer {
            CreateAnswer::Created(_) => {
                self.counters.creates.fetch_add(1, Ordering::Relaxed);
            }
            CreateAnswer::Failed(EtcdError::OutcomeUnknown { .. }) => {
                self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // The caller may be gone (its future dropped).
        let _ = request.answer.send(answer);
    }
}

fn unknown_or(uncertain: bool, error: &etcd_client::Error) -> EtcdError {
    let source = copy_error(error);
    if uncertain {
        EtcdError::OutcomeUnknown {
            operation: "create session",
            source,
        }
    } else {
        EtcdError::request("create session")(source)
    }
}

/// The outcome of one create's nested transaction.
fn outcome(op: TxnOpResponse, revision: i64) -> CreateAnswer {
    match op {
        TxnOpResponse::Txn(nested) if nested.succeeded() => CreateAnswer::Created(revision),
        TxnOpResponse::Txn(nested) => {
            let router = nested.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                _ => None,
            });
            CreateAnswer::Refused { router }
        }
        _ => CreateAnswer::Refused { router: None },
    }
}

impl<P: EtcdPayload> EtcdStore<P> {
    pub(super) async fn create_session(
        &self,
        spec: NewSession<P>,
    ) -> Result<Session<P>, CreateError<P>> {
        let shared = &self.shared;
        let (router, id, incarnation) = (spec.router(), spec.id(), spec.incarnation());
        let mut payload = Vec::new();
        spec.payload_ref().encode(&mut payload);
        let value = keys::encode_open(incarnation, spec.token_bytes(), &payload);
        if value.len() > shared.limits.max_record {
            let error = EtcdError::TooLarge {
                bytes: value.len(),
                limit: shared.limits.max_record,
            };
            return Err(CreateError::new(error.into(), spec));
        }
        // A create is a load too: what changes the record before the handle
        // is cached must not be missed.
        let _loads = shared.begin_loads();
        let (answer, answered) = oneshot::channel();
        let request = CreateRequest {
            router_key: shared.keys.router(router),
            pointer: shared.keys.pointer(id),
            record: shared.keys.record(router, id),
            incarnation,
            router,
            value,
            answer,
        };
        let answer = match shared.creates.send(request) {
            Ok(()) => answered.await.ok(),
            Err(_) => None,
        };
        let created = match answer {
            Some(CreateAnswer::Created(revision)) => revision,
            Some(CreateAnswer::Refused { router: state }) => {
                let kind = match state.as_ref().map(router_status) {
                    None => CreateErrorKind::UnknownRouter(router),
                    Some(Err(error)) => error.into(),
                    Some(Ok(status)) => match admits(status, router, incarnation) {
                        Err(kind) => kind,
                        Ok(()) => CreateErrorKind::DuplicateSession(id),
                    },
                };
                return Err(CreateError::new(kind, spec));
            }
            Some(CreateAnswer::Failed(error)) => return Err(CreateError::new(error.into(), spec)),
            // The create task is gone (the runtime is shutting down).
            None => {
                let error = EtcdError::request("create session")(
                    etcd_client::Error::EndpointError("the store's create task stopped".into()),
                );
                return Err(CreateError::new(error.into(), spec));
            }
        };
        let session = spec.into_session_with_generation(generation(created));
        let hook = shared.hook(router, id, incarnation, created, payload.into());
        let _ = session.attach(hook); // new, so open
        let mut unused = None;
        let (session, previous, recheck) = {
            let progress = shared.progress.lock();
            let (session, previous) = match shared.cache.entry(id) {
                // A listing racing this create adopted the record first:
                // one handle per record, so that one.
                Entry::Occupied(entry) if entry.get().created == created => {
                    // The handle made here goes unused: dropped after the
                    // lock (its payload's `Drop` is user code).
                    unused = Some(session);
                    (entry.get().session.clone(), None)
                }
                // A later life of the id is cached: this record was removed
                // by another controller already.
                Entry::Occupied(entry) if entry.get().created > created => {
                    (session.clone(), Some((session, created)))
                }
                Entry::Occupied(mut entry) => {
                    let cached = Cached {
                        session: session.clone(),
                        created,
                    };
                    let previous = std::mem::replace(entry.get_mut(), cached);
                    (session, Some((previous.session, previous.created)))
                }
                Entry::Vacant(entry) => {
                    entry.insert(Cached {
                        session: session.clone(),
                        created,
                    });
                    (session, None)
                }
            };
            let changed = progress.stale(id, created);
            (session, previous, changed)
        };
        // Either may be a session's last handle: its payload's `Drop` is
        // user code, contained.
        crate::contain::drop_each_logged(unused, "etcd create");
        if let Some((previous, created)) = previous {
            shared.close_all_quietly(vec![(previous, created, CloseReason::Reclaimed)]);
        }
        if recheck {
            // Changed since it was created (by another controller): the
            // handle catches up now. It exists either way.
            if let Err(error) = shared.recheck_or_owe(vec![(router, id, created)]).await {
                tracing::warn!(%error, %id, "could not re-read a session changed while it was created");
            }
        }
        Ok(session)
    }
}
