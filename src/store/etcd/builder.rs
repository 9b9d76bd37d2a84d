//! [`EtcdStoreBuilder`]: the store's configuration, and connecting.

use std::sync::Arc;

use dashmap::DashMap;
use etcd_client::{Client, ConnectOptions, GetOptions};
use foldhash::fast::RandomState;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::shared::{Link, Shared};
use super::txn::MAX_ANSWER;
use super::watch::{self, Progress};
use super::writer::{self, WriterCounters};
use super::{EtcdError, EtcdPayload, EtcdStore};
use crate::id::RouterId;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/session-lifecycle/";

/// Builds an [`EtcdStore`]; see [`EtcdStore::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct EtcdStoreBuilder {
    endpoints: Vec<String>,
    prefix: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    write_timeout: Duration,
    concurrency: usize,
    max_record: usize,
}

impl EtcdStoreBuilder {
    /// The key prefix every key of the store lives under (default
    /// [`DEFAULT_PREFIX`]). Stores with different prefixes on one etcd are
    /// independent; controllers that share sessions use the same prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one etcd request may take before it fails with
    /// [`EtcdError::Request`] (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long `close`, `remove` and `finish` wait for the background
    /// writer before they return [`EtcdError::WritePending`] (default 10 s).
    /// The write is not dropped: it is retried until etcd takes it.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// How many transactions a deletion or the writer keeps in flight at
    /// once (default 4).
    pub fn concurrency(mut self, transactions: usize) -> Self {
        self.concurrency = transactions.max(1);
        self
    }

    /// The largest session record (token plus payload plus 15 bytes) that
    /// `create` accepts (default 16 KiB). Listings read 1,000 records per
    /// request, and the store accepts answers of up to 64 MiB, so keep
    /// records small: a session's bulky state belongs elsewhere.
    pub fn max_record(mut self, bytes: usize) -> Self {
        self.max_record = bytes;
        self
    }

    /// Connects to etcd, reads the current revision and starts the store's
    /// watch and writer tasks on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`EtcdError::Connect`] if etcd cannot be reached.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    pub async fn connect<P: EtcdPayload>(self) -> Result<EtcdStore<P>, EtcdError> {
        let options = ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout);
        let connect_error = |source| EtcdError::Connect {
            endpoints: self.endpoints.clone(),
            source,
        };
        let client = Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(connect_error)?;
        let keys = Keys::new(&self.prefix);
        let mut kv = client.kv_client().max_decoding_message_size(MAX_ANSWER);
        let response = kv
            .get(
                keys.router(RouterId::new(0)),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(connect_error)?;
        let revision = response.header().map_or(0, |header| header.revision());
        let (writes, queue) = mpsc::unbounded_channel();
        let counters = Arc::new(WriterCounters::default());
        tokio::spawn(writer::run(
            kv.clone(),
            queue,
            self.concurrency,
            Arc::clone(&counters),
        ));
        let stop = CancellationToken::new();
        let (suspend, suspended) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            suspend,
            kv,
            keys,
            cache: DashMap::with_hasher(RandomState::default()),
            progress: Mutex::new(Progress {
                applied: revision,
                ..Progress::default()
            }),
            link: Arc::new(Link {
                writes,
                quiet: DashMap::with_hasher(RandomState::default()),
            }),
            counters,
            stop: stop.clone(),
            write_timeout: self.write_timeout,
            concurrency: self.concurrency,
            max_record: self.max_record,
        });
        tokio::spawn(watch::run(
            Arc::downgrade(&shared),
            client.watch_client().max_decoding_message_size(MAX_ANSWER),
            shared.keys.all_routers(),
            stop,
            suspended,
        ));
        Ok(EtcdStore { shared, client })
    }

    /// Adds an endpoint (`http://host:port`).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }
}

impl EtcdStore<()> {
    /// A builder with no endpoint yet, the default prefix and timeouts.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use session_lifecycle::etcd::EtcdStore;
    /// use tokio::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store: EtcdStore<String> = EtcdStore::builder()
    ///     .endpoint("http://etcd-0:2379")
    ///     .endpoint("http://etcd-1:2379")
    ///     .request_timeout(Duration::from_secs(2))
    ///     .connect()
    ///     .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> EtcdStoreBuilder {
        EtcdStoreBuilder {
            endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            concurrency: 4,
            max_record: 16 << 10,
        }
    }
}
