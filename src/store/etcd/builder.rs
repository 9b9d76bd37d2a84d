//! [`EtcdStoreBuilder`]: the store's configuration, and connecting.

use std::sync::Arc;

use dashmap::DashMap;
use etcd_client::{Client, ConnectOptions, GetOptions};
use foldhash::fast::RandomState;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use super::create::{self, CreateCounters};
use super::keys::Keys;
use super::members::{self, MemberCounters};
use super::retry::Retry;
use super::shared::{Link, Shared};
use super::txn::{Limits, MAX_ANSWER};
use super::watch::{self, Progress};
use super::writer::{self, WriterCounters};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::RouterId;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/session-lifecycle/";

/// Builds an [`EtcdStore`]; see [`EtcdStore::builder`].
///
/// Setters never panic; [`connect`](Self::connect) checks the settings and
/// refuses what it cannot honour with [`EtcdError::InvalidConfig`].
#[derive(Clone, Debug)]
#[must_use]
pub struct EtcdStoreBuilder {
    endpoints: Vec<String>,
    prefix: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    keep_alive: (Duration, Duration),
    retry_deadline: Duration,
    write_timeout: Duration,
    concurrency: usize,
    max_record: usize,
    max_txn_ops: usize,
    create_batch: usize,
    member_check: Duration,
}

/// The largest `max_record` accepted: a create (record, pointer, keys and
/// guards) must stay under etcd's default request limit of 1.5 MiB
/// (`--max-request-bytes`).
pub const MAX_RECORD_LIMIT: usize = 1 << 20;

/// The fewest operations per transaction a store can work with (a create:
/// one nested transaction of three guards).
const MIN_TXN_OPS: usize = 4;

impl EtcdStoreBuilder {
    /// Adds an endpoint (`http://host:port`). Give every member of the
    /// cluster: requests are balanced over them, and retried on another
    /// when one fails.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// Adds several endpoints; see [`endpoint`](Self::endpoint).
    pub fn endpoints<I>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    /// The key prefix every key of the store lives under (default
    /// [`DEFAULT_PREFIX`]). Stores with different prefixes on one etcd are
    /// independent; controllers that share sessions use the same prefix.
    /// A prefix may nest inside another store's (that store reports this
    /// one's keys as foreign and never touches them), except one ending
    /// like a router's range of it, `…r/<16 lowercase hex digits>/`:
    /// [`connect`](Self::connect) refuses that with
    /// [`EtcdError::InvalidConfig`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one etcd request may take before it fails (default 5 s).
    /// A request that is safe to repeat is then retried, on any member.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long connecting to one member may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive of the connections to etcd: a ping every
    /// `interval`, and a connection whose ping is not answered within
    /// `timeout` is dropped and made again, so a hung member (and the watch
    /// on it) is left within `interval + timeout` (default 6 s and 3 s).
    /// etcd refuses pings more often than every 5 s
    /// (`--grpc-keepalive-min-time`): `connect` refuses a shorter interval.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = (interval, timeout);
        self
    }

    /// How long a request that is safe to repeat (every read, the fence,
    /// `finish`'s deletions, repairs) is retried after its first attempt
    /// failed, with jittered exponential backoff from 25 ms to 1 s (default
    /// 15 s). A call that fails after it returns an
    /// [`EtcdError::Request`]; it takes at most about this deadline plus
    /// one request timeout. Creates and registrations are never sent twice
    /// blindly: see [`EtcdStore`]'s *Faults*.
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// How long `close`, `remove` and `finish` wait for the background
    /// writer before they return [`EtcdError::WritePending`] (default 10 s).
    /// The write is not dropped: it is retried until etcd takes it.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// How many transactions a deletion, the writer, or the creates keep in
    /// flight at once (default 4; 0 counts as 1).
    pub fn concurrency(mut self, transactions: usize) -> Self {
        self.concurrency = transactions.max(1);
        self
    }

    /// The largest session record (token plus payload plus 15 bytes) that
    /// `create` accepts (default 16 KiB; at most [`MAX_RECORD_LIMIT`], which
    /// `connect` checks). Listings read as many records per request as fit
    /// in 16 MiB of records this size, so big records cost more requests,
    /// never a failure; still, a session's bulky state belongs elsewhere.
    pub fn max_record(mut self, bytes: usize) -> Self {
        self.max_record = bytes;
        self
    }

    /// The most operations etcd accepts in one transaction: its
    /// `--max-txn-ops` (default 128, etcd's default; at least 4, which
    /// `connect` checks). Transactions are sized to fit; one etcd refuses
    /// anyway (a smaller limit than configured) is split in halves.
    pub fn max_txn_ops(mut self, operations: usize) -> Self {
        self.max_txn_ops = operations;
        self
    }

    /// How many concurrent creates may share one transaction (default 64;
    /// 1 sends each create alone). Each create keeps its own guards (the
    /// router live in its incarnation, its id free) and gets its own
    /// outcome; only the round trip is shared.
    pub fn create_batch(mut self, creates: usize) -> Self {
        self.create_batch = creates.max(1);
        self
    }

    /// How often every member is asked, on its own connection, whether it
    /// answers a linearizable read within the request timeout (default
    /// 1 s; only with two endpoints or more). A member that does not (dead,
    /// frozen, or cut off from the leader) gets no requests until it
    /// answers again, unless no member answers; [`EtcdStats`] counts them.
    /// Without this a dead member, which refuses at once and so looks the
    /// least busy, drew a share of the requests that all failed and were
    /// retried.
    ///
    /// [`EtcdStats`]: super::EtcdStats
    pub fn member_check(mut self, interval: Duration) -> Self {
        self.member_check = interval;
        self
    }

    fn check(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::config("endpoint", "no endpoint given"));
        }
        if super::keys::nests_in_a_router_range(&self.prefix) {
            return Err(EtcdError::config(
                "prefix",
                format_args!(
                    "{:?} ends like a router's range of a store one level up (r/<16 hex digits>/): \
                     this store's keys would read as that store's sessions",
                    self.prefix
                ),
            ));
        }
        if self.max_record > MAX_RECORD_LIMIT {
            return Err(EtcdError::config(
                "max_record",
                format_args!(
                    "{} bytes is above {MAX_RECORD_LIMIT}: etcd refuses requests over 1.5 MiB",
                    self.max_record
                ),
            ));
        }
        if self.max_txn_ops < MIN_TXN_OPS {
            return Err(EtcdError::config(
                "max_txn_ops",
                format_args!(
                    "{} is below {MIN_TXN_OPS}, the operations of one create",
                    self.max_txn_ops
                ),
            ));
        }
        let (interval, timeout) = self.keep_alive;
        if interval < Duration::from_secs(5) || timeout.is_zero() {
            return Err(EtcdError::config(
                "keep_alive",
                "etcd refuses pings more often than every 5 s; the timeout must be positive",
            ));
        }
        for (setting, value) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("member_check", self.member_check),
        ] {
            if value.is_zero() {
                return Err(EtcdError::config(setting, "must be positive"));
            }
        }
        Ok(())
    }

    /// Connects to etcd, reads the current revision and starts the store's
    /// watch, writer and create tasks on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`EtcdError::InvalidConfig`] for a setting the store cannot honour;
    /// [`EtcdError::Connect`] if etcd cannot be reached (retried until the
    /// retry deadline).
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    pub async fn connect<P: EtcdPayload>(self) -> Result<EtcdStore<P>, EtcdError> {
        self.check()?;
        let (interval, timeout) = self.keep_alive;
        let options = ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(interval, timeout)
            // A member cut off from the others answers "no leader" at once
            // instead of serving a watch that never moves.
            .with_require_leader(true);
        let connect_error = |source| EtcdError::Connect {
            endpoints: self.endpoints.clone(),
            source,
        };
        let client = Client::connect(&self.endpoints, Some(options.clone()))
            .await
            .map_err(connect_error)?;
        let keys = Keys::new(&self.prefix);
        let kv = client.kv_client().max_decoding_message_size(MAX_ANSWER);
        let retry = Retry::new(self.retry_deadline);
        let probe = keys.router(RouterId::new(0));
        let stop = CancellationToken::new();
        // Stops the member check if connecting fails from here on.
        let stop_on_error = stop.clone().drop_guard();
        let member_counters = Arc::new(MemberCounters::default());
        if let Some(each) = members::members(&self.endpoints, &options)
            .await
            .map_err(connect_error)?
        {
            tokio::spawn(members::run(
                client.clone(),
                each,
                probe.clone(),
                self.member_check,
                self.request_timeout,
                stop.clone(),
                Arc::clone(&member_counters),
            ));
        }
        let response = retry
            .run("read revision", || {
                let mut kv = kv.clone();
                let probe = probe.clone();
                async move {
                    kv.get(probe, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await
            .map_err(|error| match error {
                EtcdError::Request { source, .. } => connect_error(source),
                other => other,
            })?;
        let revision = response.header().map_or(0, |header| header.revision());
        let limits = Limits::new(self.max_record, self.max_txn_ops, self.create_batch);
        let (writes, queue) = mpsc::unbounded_channel();
        let counters = Arc::new(WriterCounters::default());
        tokio::spawn(writer::run(
            kv.clone(),
            queue,
            self.concurrency,
            limits,
            retry.clone(),
            Arc::clone(&counters),
        ));
        let (creates, create_queue) = mpsc::unbounded_channel();
        let create_counters = Arc::new(CreateCounters::default());
        tokio::spawn(create::run(
            kv.clone(),
            create_queue,
            self.concurrency,
            limits,
            retry.clone(),
            Arc::clone(&create_counters),
        ));
        let (suspend, suspended) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            suspend,
            kv,
            keys,
            cache: DashMap::with_hasher(RandomState::default()),
            progress: Mutex::new(Progress::new(revision)),
            link: Arc::new(Link {
                writes,
                quiet: DashMap::with_hasher(RandomState::default()),
            }),
            creates,
            counters,
            create_counters,
            member_counters,
            rechecks: std::sync::atomic::AtomicU64::new(0),
            owed: Mutex::new(Vec::new()),
            owed_added: Arc::new(tokio::sync::Notify::new()),
            stop: stop.clone(),
            retry,
            write_timeout: self.write_timeout,
            concurrency: self.concurrency,
            limits,
        });
        tokio::spawn(watch::supervise(
            Arc::downgrade(&shared),
            Arc::clone(&shared.owed_added),
            client.watch_client().max_decoding_message_size(MAX_ANSWER),
            shared.keys.all_routers(),
            stop,
            suspended,
        ));
        stop_on_error.disarm();
        Ok(EtcdStore { shared, client })
    }
}

impl EtcdStore<()> {
    /// A builder with no endpoint yet, the default prefix and timeouts.
    pub fn builder() -> EtcdStoreBuilder {
        EtcdStoreBuilder {
            endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            keep_alive: (Duration::from_secs(6), Duration::from_secs(3)),
            retry_deadline: Duration::from_secs(15),
            write_timeout: Duration::from_secs(10),
            concurrency: 4,
            max_record: 16 << 10,
            max_txn_ops: 128,
            create_batch: 64,
            member_check: Duration::from_secs(1),
        }
    }
}
