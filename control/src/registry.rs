//! What the lease logic needs from etcd, behind a small trait.
//!
//! [`Registry`] is the whole interface: read the config, list the leases with the revision they
//! were read at, write a lease only if its key is absent (or unchanged since it was read),
//! renew an etcd lease once, delete a lease, and watch the leases from a revision on.
//! [`EtcdRegistry`] implements it over the etcd v3 API; the in-memory registry
//! (`memory_registry`, built for tests only) implements it with injectable faults, so
//! that the lease keeper and the watcher are tested deterministically without an etcd.
//!
//! Keys are handled as lease key *names* (`10.1.74.0-24`), relative to `<prefix>/subnets/`;
//! values are raw bytes. Parsing them is the caller's job, so that one malformed lease is
//! skipped without hiding the others.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::secret::Secret;
use crate::subnet::KeyPrefix;

/// One lease as stored: its key name, raw value and etcd bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawLease {
    /// The key name under `<prefix>/subnets/`, e.g. `10.1.74.0-24`.
    pub name: String,
    /// The value as stored (normally JSON).
    pub value: Vec<u8>,
    /// The etcd lease the key is attached to; 0 for a key without TTL (a reservation).
    pub etcd_lease: i64,
    /// The revision of the key's last modification.
    pub mod_revision: i64,
}

impl RawLease {
    /// A key without TTL: the subnet is reserved for its holder.
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
}

/// Every lease at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseSnapshot {
    /// The store revision the listing was read at; a watch from `revision + 1` misses nothing.
    pub revision: i64,
    /// The leases, in key order.
    pub leases: Vec<RawLease>,
    /// The ID of the etcd cluster that answered; 0 if unknown. Another ID means another
    /// cluster, whose revisions have nothing to do with the ones seen before.
    pub cluster_id: u64,
}

/// The condition under which [`Registry::write_lease`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist ("create if absent").
    Absent,
    /// The key must exist and be unmodified since this revision.
    ModRevision(i64),
}

/// A successful lease write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The etcd lease the key is now attached to; 0 when written without TTL.
    pub etcd_lease: i64,
    /// The TTL etcd granted (it may round a short one up); `None` without TTL.
    pub ttl: Option<Duration>,
    /// The revision of the write.
    pub revision: i64,
}

/// A change to the leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A lease was created or its value replaced.
    Put(RawLease),
    /// A lease was deleted or expired.
    Delete {
        /// The key name.
        name: String,
        /// The revision of the deletion.
        revision: i64,
    },
}

/// Why a watch ended. Either way the watcher takes a fresh snapshot and watches again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchBroken {
    /// The revision the watch needed has been compacted away.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
    /// The stream failed or was closed.
    Disconnected(String),
    /// The stream went silent and did not answer a progress request in time: the member may
    /// be frozen or cut off from its cluster. The next attempt goes to another member.
    Stalled(String),
}

/// What a watch yields next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    /// Changes that happened at `revision`, in order.
    Events {
        /// The store revision after these events.
        revision: i64,
        /// The changes.
        events: Vec<WatchEvent>,
    },
    /// The watch is over.
    Broken(WatchBroken),
}

/// A registry operation failed; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// The registry is unreachable (the in-memory registry's injected outage).
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The connection settings cannot work (bad TLS files, TLS with an http endpoint).
    #[error("etcd settings: {0}")]
    Settings(String),
}

/// The operations the lease keeper and the watcher need from the store of leases.
pub trait Registry: Clone + Send + Sync + 'static {
    /// The stream [`Registry::watch`] returns.
    type Watch: LeaseWatch;

    /// The key prefix, for log messages.
    fn prefix(&self) -> &KeyPrefix;

    /// The network config at `<prefix>/config`, `None` if there is none.
    fn config(&self) -> impl Future<Output = Result<Option<String>, RegistryError>> + Send;

    /// Every lease under `<prefix>/subnets/` and the revision they were read at.
    fn leases(&self) -> impl Future<Output = Result<LeaseSnapshot, RegistryError>> + Send;

    /// Write `value` at lease key `name` if `expect` holds, attached to a new etcd lease of
    /// `ttl` (`None`: no TTL). `Ok(None)` means the condition failed: another host won.
    fn write_lease(
        &self,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> impl Future<Output = Result<Option<Written>, RegistryError>> + Send;

    /// Renew etcd lease `etcd_lease` once. `Ok(None)` means it no longer exists (it expired or
    /// was revoked), `Ok(Some(ttl))` that it lives for `ttl` more.
    fn keep_alive(
        &self,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<Option<Duration>, RegistryError>> + Send;

    /// Delete lease key `name` if it is unmodified since `mod_revision`. `Ok(false)`: it changed.
    fn delete_lease(
        &self,
        name: &str,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Watch every lease from `from_revision` on.
    fn watch(
        &self,
        from_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;

    /// Every per-host record under `/weft.io<prefix>/hosts/` (names are lease key names) and
    /// the revision they were read at.
    fn host_records(&self) -> impl Future<Output = Result<LeaseSnapshot, RegistryError>> + Send;

    /// Write `value` at host record `name`, attached to etcd lease `etcd_lease` (0: none).
    /// `Ok(Some(revision))` when written, `Ok(None)` when that etcd lease no longer exists.
    fn put_host_record(
        &self,
        name: &str,
        value: &str,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<Option<i64>, RegistryError>> + Send;

    /// Delete host record `name` if it is unmodified since `mod_revision`. `Ok(false)`: it
    /// changed or is gone.
    fn delete_host_record(
        &self,
        name: &str,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Watch every host record from `from_revision` on.
    fn watch_host_records(
        &self,
        from_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;
}

/// A running watch on the leases.
pub trait LeaseWatch: Send + 'static {
    /// The next changes, or why the watch ended. After [`WatchItem::Broken`] the watch is done.
    fn next(&mut self) -> impl Future<Output = WatchItem> + Send;
}

// ---------------------------------------------------------------------------------------------
// etcd

/// TLS files for the connection to etcd (`--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed etcd's server certificate.
    pub ca: Option<PathBuf>,
    /// The client certificate.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub key: Option<PathBuf>,
}

/// How long a watch may stay silent before weftd asks etcd for a progress report.
pub const DEFAULT_WATCH_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How many keys one page of the lease listing asks for. A flannel lease is about 100 bytes
/// of key and value, so a page is about half a megabyte.
const PAGE_KEYS: i64 = 4096;

/// The largest message weftd accepts from etcd (gRPC's default is 4 MiB). A page of
/// [`PAGE_KEYS`] normal leases needs a fraction of it; a page full of junk values shrinks
/// until it fits, and etcd refuses values over its `--max-request-bytes` (1.5 MiB by default),
/// so even a page of one key fits. Watch responses carry one revision's events.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The largest lease value weftd reads. flannel writes 50 to 300 bytes; anything far larger
/// is junk, logged and treated as an unusable lease (its key still occupies the subnet).
pub const MAX_LEASE_VALUE_BYTES: usize = 64 << 10;

/// How to reach etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix.
    pub prefix: KeyPrefix,
    /// TLS files; `None` for plain connections.
    pub tls: Option<TlsFiles>,
    /// User name and password for etcd's authentication.
    pub credentials: Option<(String, Secret)>,
    /// How long one request (or connection attempt) may take; also how long a silent watch
    /// waits for the answer to a progress request before it counts as stalled.
    pub request_timeout: Duration,
    /// After this long without a message on a watch, ask etcd for a progress report.
    pub watch_check_interval: Duration,
}

impl EtcdSettings {
    /// Plain connections to `endpoints` with the default prefix.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: KeyPrefix::default(),
            tls: None,
            credentials: None,
            request_timeout: Duration::from_secs(5),
            watch_check_interval: DEFAULT_WATCH_CHECK_INTERVAL,
        }
    }
}

/// The registry over etcd's v3 API. It connects on first use and reconnects by itself, so it
/// can be created while etcd is down.
///
/// Requests go to one endpoint at a time; when one fails, the same request is tried on the next
/// endpoint, which then stays in use. (A balanced channel over all endpoints would fail every
/// request it sends to a dead one, and flannel's default endpoint list names
/// `http://127.0.0.1:4001`, which is rarely alive.)
#[derive(Clone)]
pub struct EtcdRegistry {
    endpoints: Arc<[String]>,
    /// For http:// endpoints.
    options: ConnectOptions,
    /// For https:// endpoints: the same with TLS.
    tls_options: Option<ConnectOptions>,
    prefix: KeyPrefix,
    request_timeout: Duration,
    watch_check_interval: Duration,
    /// One client per endpoint, connected on first use.
    clients: Arc<tokio::sync::Mutex<Vec<Option<Client>>>>,
    /// The endpoint that answered last.
    current: Arc<AtomicUsize>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// HTTP/2 pings on an idle connection, so that a dead etcd breaks a watch instead of leaving
/// it silent forever.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdRegistry {
    /// Check the settings and read the TLS files; no connection is made yet.
    pub fn new(settings: &EtcdSettings) -> Result<Self, RegistryError> {
        if settings.endpoints.is_empty() {
            return Err(RegistryError::Settings("no etcd endpoint given".to_owned()));
        }
        let mut options = ConnectOptions::new()
            .with_timeout(settings.request_timeout)
            .with_connect_timeout(settings.request_timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            // etcd's `hasleader`: a member cut off from its cluster refuses requests and
            // cancels watches instead of serving stale data or going silent.
            .with_require_leader(true);
        if let Some((user, password)) = &settings.credentials {
            options = options
                .with_user(user.clone(), password.expose())
                .with_auto_token_refresh(true);
        }
        let any_https = settings.endpoints.iter().any(|e| is_https(e));
        let tls_options = match &settings.tls {
            Some(_) if !any_https => {
                warn!(
                    "--etcd-cafile, --etcd-certfile and --etcd-keyfile are ignored: no etcd \
                     endpoint is https://"
                );
                None
            }
            Some(files) => Some(options.clone().with_tls(tls_options(files)?)),
            None if any_https => Some(options.clone().with_tls(tls_options(&TlsFiles::default())?)),
            None => None,
        };
        Ok(Self {
            endpoints: settings.endpoints.clone().into(),
            options,
            tls_options,
            prefix: settings.prefix.clone(),
            request_timeout: settings.request_timeout,
            watch_check_interval: settings.watch_check_interval,
            clients: Arc::new(tokio::sync::Mutex::new(vec![
                None;
                settings.endpoints.len()
            ])),
            current: Arc::default(),
        })
    }

    async fn client_at(&self, index: usize) -> Result<Client, etcd_client::Error> {
        let mut clients = self.clients.lock().await;
        if let Some(Some(client)) = clients.get(index) {
            return Ok(client.clone());
        }
        let endpoint = self
            .endpoints
            .get(index)
            .map(String::as_str)
            .unwrap_or_default();
        let options = match &self.tls_options {
            Some(tls) if is_https(endpoint) => tls.clone(),
            _ => self.options.clone(),
        };
        let client = Client::connect([endpoint], Some(options)).await?;
        if let Some(slot) = clients.get_mut(index) {
            *slot = Some(client.clone());
        }
        Ok(client)
    }

    /// Run `op` against the current endpoint, then against each other one until one succeeds.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send,
        T: Send,
    {
        let count = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for step in 0..count {
            let index = (first + step) % count;
            let result = match self.client_at(index).await {
                Ok(client) => op(client).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(value) => {
                    if step > 0 {
                        self.current.store(index, Ordering::Relaxed);
                        debug!(endpoint = %self.endpoints[index], "switched etcd endpoint");
                    }
                    return Ok(value);
                }
                Err(e) => {
                    if count > 1 {
                        debug!(endpoint = %self.endpoints[index], "etcd request failed: {e}");
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.map_or_else(
            || RegistryError::Settings("no etcd endpoint given".to_owned()),
            RegistryError::from,
        ))
    }

    fn subnets_dir(&self) -> String {
        self.prefix.subnets_dir()
    }

    /// Stop using endpoint `index` for now (its watch stalled): the next request starts with
    /// the following one, on a fresh connection when it comes back to this one.
    async fn skip_endpoint(&self, index: usize) {
        let count = self.endpoints.len();
        if count > 1 {
            let _ = self.current.compare_exchange(
                index,
                (index + 1) % count,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if let Some(slot) = self.clients.lock().await.get_mut(index) {
            *slot = None;
        }
    }
}

/// The lease stored in `kv`, a key under `dir`; `None` for a key outside it. A value larger
/// than [`MAX_LEASE_VALUE_BYTES`] is not kept: the lease is returned with an empty value,
/// which no reader accepts, and a warning says why.
fn raw_lease(dir: &str, kv: &etcd_client::KeyValue) -> Option<RawLease> {
    let name = kv.key().strip_prefix(dir.as_bytes())?;
    let name = String::from_utf8_lossy(name).into_owned();
    let value = if kv.value().len() > MAX_LEASE_VALUE_BYTES {
        warn!(
            lease = %name,
            bytes = kv.value().len(),
            "lease value is larger than {MAX_LEASE_VALUE_BYTES} bytes; not reading it (unusable lease)"
        );
        Vec::new()
    } else {
        kv.value().to_vec()
    };
    Some(RawLease {
        name,
        value,
        etcd_lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    })
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff: to the end of the keyspace.
    vec![0]
}

/// Whether `e` says a response was larger than the receive limit.
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("message length too large"))
}

/// Whether `e` says the revision asked for has been compacted.
fn compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

/// List every lease under `dir`, page by page, every page at the first page's revision, so
/// that the listing is one consistent snapshot however many leases there are. A page too
/// large for the receive limit is asked for again with fewer keys; a compaction during the
/// listing starts it again.
async fn list_leases(client: Client, dir: String) -> Result<LeaseSnapshot, etcd_client::Error> {
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let end = prefix_end(dir.as_bytes());
    let mut restarts = 0;
    'listing: loop {
        let mut snapshot = LeaseSnapshot::default();
        let mut from = dir.as_bytes().to_vec();
        let mut limit = PAGE_KEYS;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if snapshot.revision > 0 {
                options = options.with_revision(snapshot.revision);
            }
            let resp = match kv.get(from.clone(), Some(options)).await {
                Ok(resp) => resp,
                Err(e) if too_large(&e) && limit > 1 => {
                    limit = (limit / 4).max(1);
                    debug!(
                        limit,
                        "a page of leases is too large; asking for fewer keys"
                    );
                    continue;
                }
                Err(e) if compacted(&e) && snapshot.revision > 0 && restarts < 3 => {
                    restarts += 1;
                    debug!("the listing's revision was compacted; listing again");
                    continue 'listing;
                }
                Err(e) => return Err(e),
            };
            if snapshot.revision == 0 {
                snapshot.revision = header_revision(resp.header());
                snapshot.cluster_id = resp.header().map_or(0, |h| h.cluster_id());
            }
            snapshot
                .leases
                .extend(resp.kvs().iter().filter_map(|kv| raw_lease(&dir, kv)));
            // A page of junk shrank the pages; the next ones may be ordinary again.
            limit = PAGE_KEYS;
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(snapshot),
            }
        }
    }
}

fn is_https(endpoint: &str) -> bool {
    endpoint
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// TLS as flanneld sets it up: etcd's certificate is checked against `--etcd-cafile` when
/// given, else against the system's root certificates (as Go's TLS does).
fn tls_options(files: &TlsFiles) -> Result<etcd_client::TlsOptions, RegistryError> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map_err(|e| RegistryError::Settings(format!("cannot read {}: {e}", path.display())))
    };
    let mut tls = etcd_client::TlsOptions::new();
    tls = match &files.ca {
        Some(ca) => tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(RegistryError::Settings(
                "a client certificate needs both --etcd-certfile and --etcd-keyfile".to_owned(),
            ))
        }
    }
    Ok(tls)
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// etcd-client's message when a keep-alive finds the lease gone (TTL 0 in the response).
const LEASE_NOT_FOUND: &str = "lease not found";

impl Registry for EtcdRegistry {
    type Watch = EtcdWatch;

    fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    async fn config(&self) -> Result<Option<String>, RegistryError> {
        let key = self.prefix.config_key();
        self.call(|mut client| {
            let key = key.clone();
            async move {
                let resp = client.get(key, None).await?;
                Ok(resp
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
            }
        })
        .await
    }

    async fn leases(&self) -> Result<LeaseSnapshot, RegistryError> {
        let dir = self.subnets_dir();
        self.call(|client| list_leases(client, dir.clone())).await
    }

    async fn write_lease(
        &self,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<Option<Written>, RegistryError> {
        let key = self.prefix.lease_key(name);
        self.call(|client| write_lease_once(client, key.clone(), value.to_owned(), ttl, expect))
            .await
    }

    async fn keep_alive(&self, etcd_lease: i64) -> Result<Option<Duration>, RegistryError> {
        let timeout = self.request_timeout;
        self.call(|client| keep_alive_once(client, etcd_lease, timeout))
            .await
    }

    async fn delete_lease(&self, name: &str, mod_revision: i64) -> Result<bool, RegistryError> {
        let key = self.prefix.lease_key(name);
        self.call(|mut client| {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { Ok(client.txn(txn).await?.succeeded()) }
        })
        .await
    }

    async fn watch(&self, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        self.watch_dir(self.subnets_dir(), from_revision).await
    }

    async fn host_records(&self) -> Result<LeaseSnapshot, RegistryError> {
        let dir = self.prefix.hosts_dir();
        self.call(|client| list_leases(client, dir.clone())).await
    }

    async fn put_host_record(
        &self,
        name: &str,
        value: &str,
        etcd_lease: i64,
    ) -> Result<Option<i64>, RegistryError> {
        let key = self.prefix.host_record_key(name);
        let put = self
            .call(|mut client| {
                let (key, value) = (key.clone(), value.to_owned());
                let options = (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease));
                async move {
                    match client.put(key, value, options).await {
                        Ok(resp) => Ok(Some(header_revision(resp.header()))),
                        Err(e) if lease_not_found(&e) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        Ok(put)
    }

    async fn delete_host_record(
        &self,
        name: &str,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let key = self.prefix.host_record_key(name);
        self.call(|mut client| {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { Ok(client.txn(txn).await?.succeeded()) }
        })
        .await
    }

    async fn watch_host_records(&self, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        self.watch_dir(self.prefix.hosts_dir(), from_revision).await
    }
}

/// Whether `e` says that the etcd lease a put names does not exist (any more).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("requested lease not found"))
}

impl EtcdRegistry {
    /// A watch on every key under `dir` from `from_revision` on.
    async fn watch_dir(&self, dir: String, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        let timeout = self.request_timeout;
        let stream = self
            .call(|client| {
                let dir = dir.clone();
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from_revision);
                let mut watch_client = client
                    .watch_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES);
                async move {
                    // A frozen member accepts the connection and never answers.
                    tokio::time::timeout(timeout, watch_client.watch(dir, Some(options)))
                        .await
                        .map_err(|_| {
                            etcd_client::Error::WatchError(format!(
                                "no answer to the watch request within {timeout:?}"
                            ))
                        })?
                }
            })
            .await?;
        Ok(EtcdWatch {
            stream,
            registry: self.clone(),
            dir,
            endpoint: self.current.load(Ordering::Relaxed),
            from_revision,
            cluster_id: 0,
            last_heard: Instant::now(),
            progress_asked: None,
        })
    }
}

/// Grant an etcd lease (if `ttl`), then put `value` at `key` if `expect` holds.
async fn write_lease_once(
    mut client: Client,
    key: String,
    value: String,
    ttl: Option<Duration>,
    expect: Expect,
) -> Result<Option<Written>, etcd_client::Error> {
    let (etcd_lease, granted) = match ttl {
        Some(ttl) => {
            let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
            let grant = client.lease_grant(secs, None).await?;
            let granted = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0));
            (grant.id(), Some(granted))
        }
        None => (0, None),
    };
    let compare = match expect {
        Expect::Absent => Compare::version(key.clone(), CompareOp::Equal, 0),
        Expect::ModRevision(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
    };
    let put = TxnOp::put(
        key,
        value,
        (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease)),
    );
    let resp = client.txn(Txn::new().when([compare]).and_then([put])).await;
    let succeeded = resp.as_ref().is_ok_and(|r| r.succeeded());
    if etcd_lease != 0 && resp.as_ref().is_ok_and(|r| !r.succeeded()) {
        // The comparison failed, so nothing is attached to it. After an error the transaction
        // may still have committed: revoking would delete the key just written, so the lease
        // is left to expire.
        let _ = client.lease_revoke(etcd_lease).await;
    }
    let resp = resp?;
    Ok(succeeded.then(|| Written {
        etcd_lease,
        ttl: granted,
        revision: header_revision(resp.header()),
    }))
}

/// Renew `etcd_lease` once and learn its TTL; `None` if it no longer exists.
async fn keep_alive_once(
    mut client: Client,
    etcd_lease: i64,
    timeout: Duration,
) -> Result<Option<Duration>, etcd_client::Error> {
    let (mut keeper, mut stream) = match client.lease_keep_alive(etcd_lease).await {
        Ok(pair) => pair,
        Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg == LEASE_NOT_FOUND => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // `lease_keep_alive` renewed the lease once and kept the response to itself; a second
    // renewal on the same stream tells the TTL.
    keeper.keep_alive().await?;
    let resp = tokio::time::timeout(timeout, stream.message())
        .await
        .map_err(|_| {
            etcd_client::Error::LeaseKeepAliveError("keep-alive response timed out".to_owned())
        })??;
    match resp.map(|r| r.ttl()) {
        Some(ttl) if ttl > 0 => Ok(Some(Duration::from_secs(u64::try_from(ttl).unwrap_or(0)))),
        Some(_) => Ok(None),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream closed".to_owned(),
        )),
    }
}

/// A watch on etcd's leases.
///
/// A watch that stays silent for the registry's `watch_check_interval` asks etcd for a
/// progress report; if nothing arrives within the request timeout after that, the member is
/// frozen or cut off, and the watch ends as [`WatchBroken::Stalled`] so that the watcher
/// resyncs through another member. A response whose header shows a revision older than the
/// watch's start, or another cluster, ends the watch too: etcd lost its data, and the
/// resync's listing tells the watcher so.
pub struct EtcdWatch {
    stream: etcd_client::WatchStream,
    registry: EtcdRegistry,
    /// The directory watched, with its trailing slash.
    dir: String,
    /// The endpoint the watch runs on.
    endpoint: usize,
    from_revision: i64,
    cluster_id: u64,
    last_heard: Instant,
    progress_asked: Option<Instant>,
}

impl EtcdWatch {
    fn endpoint_name(&self) -> &str {
        self.registry
            .endpoints
            .get(self.endpoint)
            .map_or("?", String::as_str)
    }

    /// Why the header of a response shows that this is not the store the watch started on.
    fn header_mismatch(&mut self, header: Option<&etcd_client::ResponseHeader>) -> Option<String> {
        let header = header?;
        let cluster = header.cluster_id();
        if cluster != 0 {
            if self.cluster_id == 0 {
                self.cluster_id = cluster;
            } else if cluster != self.cluster_id {
                return Some(format!(
                    "etcd's cluster ID changed from {:x} to {cluster:x}",
                    self.cluster_id
                ));
            }
        }
        let revision = header.revision();
        // The store was at `from_revision - 1` or later when the watch began.
        (revision > 0 && revision < self.from_revision - 1).then(|| {
            format!(
                "etcd's revision went back to {revision}, before the watch's start at {}",
                self.from_revision
            )
        })
    }
}

impl LeaseWatch for EtcdWatch {
    async fn next(&mut self) -> WatchItem {
        let interval = self.registry.watch_check_interval;
        let answer_within = self.registry.request_timeout;
        loop {
            let wake = match self.progress_asked {
                Some(asked) => asked + answer_within,
                None => self.last_heard + interval,
            };
            let message = tokio::select! {
                message = self.stream.message() => message,
                () = tokio::time::sleep_until(wake) => {
                    if self.progress_asked.is_some() {
                        self.registry.skip_endpoint(self.endpoint).await;
                        return WatchItem::Broken(WatchBroken::Stalled(format!(
                            "etcd at {} sent nothing for {:?} and did not answer a progress request within {answer_within:?}",
                            self.endpoint_name(),
                            self.last_heard.elapsed()
                        )));
                    }
                    if let Err(e) = self.stream.request_progress().await {
                        return WatchItem::Broken(WatchBroken::Disconnected(e.to_string()));
                    }
                    self.progress_asked = Some(Instant::now());
                    continue;
                }
            };
            self.last_heard = Instant::now();
            self.progress_asked = None;
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return WatchItem::Broken(WatchBroken::Disconnected(
                        "watch stream closed".to_owned(),
                    ))
                }
                Err(e) => return WatchItem::Broken(WatchBroken::Disconnected(e.to_string())),
            };
            if let Some(why) = self.header_mismatch(resp.header()) {
                return WatchItem::Broken(WatchBroken::Disconnected(why));
            }
            if resp.compact_revision() > 0 {
                return WatchItem::Broken(WatchBroken::Compacted {
                    compact_revision: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                let reason = match resp.cancel_reason() {
                    "" => "watch canceled by etcd".to_owned(),
                    reason => format!("watch canceled by etcd: {reason}"),
                };
                return WatchItem::Broken(WatchBroken::Disconnected(reason));
            }
            if resp.events().is_empty() {
                // The creation notice or a progress report.
                continue;
            }
            let revision = header_revision(resp.header());
            let dir = &self.dir;
            let events = resp
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let lease = raw_lease(dir, kv)?;
                    Some(match event.event_type() {
                        EventType::Put => WatchEvent::Put(lease),
                        EventType::Delete => WatchEvent::Delete {
                            name: lease.name,
                            revision: kv.mod_revision(),
                        },
                    })
                })
                .collect();
            return WatchItem::Events { revision, events };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(
            prefix_end(b"/coreos.com/network/subnets/"),
            b"/coreos.com/network/subnets0"
        );
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }

    #[test]
    fn etcd_settings_never_show_the_password() {
        let mut settings = EtcdSettings::new(vec!["https://127.0.0.1:2379".to_owned()]);
        settings.credentials = Some(("flannel".to_owned(), Secret::new("s3cret-pw")));
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("flannel") && !shown.contains("s3cret-pw"),
            "{shown}"
        );
    }

    #[test]
    fn etcd_settings_are_checked_before_connecting() {
        let mut settings = EtcdSettings::new(vec![]);
        assert!(matches!(
            EtcdRegistry::new(&settings),
            Err(RegistryError::Settings(_))
        ));
        settings.endpoints = vec!["http://127.0.0.1:2379".to_owned()];
        assert!(EtcdRegistry::new(&settings).is_ok());
        // As with flanneld, TLS files are ignored (with a warning) when no endpoint is https.
        settings.tls = Some(TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        });
        assert!(EtcdRegistry::new(&settings).is_ok());
        settings.endpoints = vec!["https://127.0.0.1:2379".to_owned()];
        settings.tls = Some(TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        });
        let err = EtcdRegistry::new(&settings).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        settings.tls = Some(TlsFiles {
            cert: Some("/nonexistent/cert.pem".into()),
            ..TlsFiles::default()
        });
        let err = EtcdRegistry::new(&settings).unwrap_err().to_string();
        assert!(err.contains("--etcd-keyfile"), "{err}");
    }
}
