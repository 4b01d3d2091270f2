//! [`Store`] on etcd v3 (the `etcd-client` crate, tonic underneath).
//!
//! * **Namespace**: every key is stored under [`EtcdOptions::prefix`] (default `nimbus/`), so several
//!   coordinator fleets or other programs can share one etcd. Callers never see the prefix.
//! * **Sync over async**: [`Store`] is synchronous (called from `spawn_blocking` threads or plain threads).
//!   `EtcdStore` owns a small dedicated tokio runtime (one worker thread) that runs the client; every call is
//!   spawned onto that runtime and the calling thread waits on a std channel. So a call never needs, enters or
//!   blocks the caller's runtime: it works from plain threads, from `spawn_blocking`, and does not panic or
//!   deadlock even when (wrongly) made from an async task. Dropping the store shuts the runtime down in the
//!   background, which is allowed anywhere.
//! * **Transactions**: one [`Txn`] is one etcd `Txn`: [`Compare::Equals`] is a value compare (which etcd fails
//!   for a missing key, like sled), [`Compare::Absent`] is `create_revision == 0`, [`Compare::Present`] is
//!   `create_revision > 0`; the ops run in the success branch, the failure branch is empty. etcd refuses
//!   two writes to one key in a txn, so ops are collapsed per key first (the last op on a key wins, which is
//!   what applying them in order gives). Limits are checked before sending ([`EtcdOptions::max_txn_ops`],
//!   [`EtcdOptions::max_request_bytes`], mirroring etcd's `--max-txn-ops` and `--max-request-bytes`).
//!   An error from `txn` (e.g. a timeout) is ambiguous, as with etcd itself: the transaction may have been
//!   applied. It is never retried here.
//! * **Scans** are paginated ([`EtcdOptions::page_size`] keys per request, continuing from the last key +
//!   `\0`) at the revision of the first page, so a scan is one consistent snapshot. A page larger than the
//!   client's 4 MiB response limit is retried with half the page size.
//! * **Durability**: etcd acknowledges a write only after a quorum committed it to its WAL, so
//!   [`Store::flush`] is a no-op.
//! * **Leases and watches** are used only by `crate::leader` (leader election), which runs its task on this
//!   store's runtime and client (`runtime_handle`, `client`).
//! * **Reconnects**: the client's channel reconnects by itself; while etcd is down calls fail with
//!   [`StoreError::Backend`] saying that etcd is unreachable, and succeed again once it is back.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    SortOrder, SortTarget, TlsOptions, Txn as EtcdTxn, TxnOp,
};

use super::{Compare, KeyValue, Op, Store, StoreError, Txn};

/// etcd 3.4's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// etcd 3.4's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// Keys per range request of a scan.
pub const DEFAULT_PAGE_SIZE: i64 = 1000;
/// Default key namespace.
pub const DEFAULT_PREFIX: &str = "nimbus/";

/// Bytes of protobuf framing counted per compare/op on top of its key and value (generous).
const PER_ITEM_OVERHEAD: usize = 32;

/// Client TLS material, all PEM. Required for production; without it the connection is plain HTTP/2.
#[derive(Clone)]
pub struct EtcdTls {
    /// CA certificate(s) that signed etcd's server certificates.
    pub ca_pem: Vec<u8>,
    /// This coordinator's client certificate (chain).
    pub client_cert_pem: Vec<u8>,
    /// The private key of `client_cert_pem`. Secret: never logged.
    pub client_key_pem: Vec<u8>,
    /// Name to verify the server certificate against, when it differs from the endpoint host.
    pub domain_name: Option<String>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("client_cert_pem", &format_args!("{} bytes", self.client_cert_pem.len()))
            .field("client_key_pem", &"<redacted>")
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `https://host:port` (or `http://` for tests without TLS). At least one.
    pub endpoints: Vec<String>,
    /// Client TLS; `None` means a plain connection, which is only for tests.
    pub tls: Option<EtcdTls>,
    /// Namespace prepended to every key (default [`DEFAULT_PREFIX`]).
    pub prefix: String,
    /// Timeout to establish a connection (and for the reachability check in [`EtcdStore::connect`]).
    pub connect_timeout: Duration,
    /// Timeout of every request.
    pub request_timeout: Duration,
    /// The cluster's `--max-txn-ops` (compares and ops are each limited by it).
    pub max_txn_ops: usize,
    /// The cluster's `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// Keys per range request of a scan.
    pub page_size: i64,
}

impl EtcdOptions {
    /// Options for `endpoints` with defaults: no TLS, prefix `nimbus/`, 5 s connect and 10 s request
    /// timeouts, etcd 3.4's default limits.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            page_size: DEFAULT_PAGE_SIZE,
        }
    }

    /// Sets the key namespace.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets client TLS.
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// A [`Store`] in an etcd v3 cluster, under a key prefix.
pub struct EtcdStore {
    // `Option` so that `Drop` can move it out and shut it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: Vec<u8>,
    endpoints: String,
    request_timeout: Duration,
    max_txn_ops: usize,
    max_request_bytes: usize,
    page_size: i64,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers (one read within `connect_timeout`).
    pub fn connect(opts: EtcdOptions) -> Result<EtcdStore, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(backend(
                "no etcd endpoints given; set etcd_endpoints (e.g. https://10.0.0.5:2379)",
            ));
        }
        if opts.max_txn_ops == 0 || opts.page_size <= 0 {
            return Err(backend(
                "etcd max_txn_ops and page_size must be at least 1; fix the etcd options",
            ));
        }
        let endpoints = opts.endpoints.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nimbus-etcd")
            .enable_all()
            .build()
            .map_err(|e| {
                backend(format!(
                    "cannot start the etcd client runtime: {e}; check thread limits"
                ))
            })?;

        let mut connect = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some(tls) = &opts.tls {
            let mut t = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .identity(Identity::from_pem(&tls.client_cert_pem, &tls.client_key_pem));
            if let Some(d) = &tls.domain_name {
                t = t.domain_name(d.clone());
            }
            connect = connect.with_tls(t);
        }

        let eps = opts.endpoints.clone();
        let probe_timeout = opts.connect_timeout + opts.request_timeout;
        let client = run_on(
            &runtime,
            async move {
                let mut client = Client::connect(eps, Some(connect)).await?;
                // The channel is lazy: prove that etcd answers before returning.
                client
                    .get(b"\0".to_vec(), Some(GetOptions::new().with_keys_only().with_limit(1)))
                    .await?;
                Ok::<Client, etcd_client::Error>(client)
            },
            probe_timeout,
        )
        .and_then(|r| r.map_err(|e| classify(&endpoints, "connect", &e)))?;
        tracing::info!(endpoints = %endpoints, prefix = %opts.prefix, tls = opts.tls.is_some(), "connected to etcd");
        Ok(EtcdStore {
            runtime: Some(runtime),
            client,
            prefix: opts.prefix.into_bytes(),
            endpoints,
            request_timeout: opts.request_timeout,
            max_txn_ops: opts.max_txn_ops,
            max_request_bytes: opts.max_request_bytes,
            page_size: opts.page_size,
        })
    }

    /// The key namespace.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// A handle of the store's own runtime, for background work on the same connection (leader election);
    /// `None` while the store is being dropped.
    pub(crate) fn runtime_handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|rt| rt.handle().clone())
    }

    /// A clone of the client (cheap: one shared channel).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// The endpoints, comma-separated, for messages.
    pub(crate) fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The timeout of one request.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub(crate) fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1) and returns its id: keys put with it vanish when it
    /// is not renewed ([`EtcdStore::renew_lease`]) within the TTL — the replica registry and session keys.
    pub fn grant_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut client = self.client.clone();
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        self.run("etcd lease grant", async move {
            Ok(client.lease_grant(secs, None).await?.id())
        })
    }

    /// Renews `lease` once. `Ok(false)` when etcd no longer knows it (expired or revoked: its keys are gone).
    pub fn renew_lease(&self, lease: i64) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        self.run("etcd lease keep-alive", async move {
            // Opening the keep-alive stream renews once and reads etcd's answer: a lease etcd no longer knows
            // comes back as "lease not found" (reading the stream again would wait for an answer never sent).
            match client.lease_keep_alive(lease).await {
                Ok(_) => Ok(true),
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Revokes `lease` (its keys are deleted at once). Errors are returned, a lease etcd no longer knows is not
    /// one.
    pub fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.run("etcd lease revoke", async move {
            match client.lease_revoke(lease).await {
                Ok(_) => Ok(()),
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Puts `key` bound to `lease` (deleted when the lease ends).
    pub fn put_leased(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let k = self.full_key(key);
        self.run("etcd put", async move {
            client.put(k, value, Some(PutOptions::new().with_lease(lease))).await?;
            Ok(())
        })
    }

    /// Puts `key` bound to `lease` unless the key exists. Returns whether it was put.
    pub fn put_leased_if_absent(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let k = self.full_key(key);
        self.run("etcd put", async move {
            let txn = EtcdTxn::new()
                .when([EtcdCompare::create_revision(k.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(k, value, Some(PutOptions::new().with_lease(lease)))]);
            Ok(client.txn(txn).await?.succeeded())
        })
    }

    /// A cheap fingerprint of everything under `prefix`: (number of keys, highest modification revision). It
    /// changes when a key there is created, changed or deleted (deletion lowers the count), so a poller reads
    /// the whole prefix only after a change.
    pub fn fingerprint(&self, prefix: &[u8]) -> Result<(i64, i64), StoreError> {
        let mut client = self.client.clone();
        let full = self.full_key(prefix);
        self.run("etcd fingerprint", async move {
            let end = prefix_end(&full);
            let count = client
                .get(
                    full.clone(),
                    Some(GetOptions::new().with_range(end.clone()).with_count_only()),
                )
                .await?
                .count();
            let newest = client
                .get(
                    full,
                    Some(
                        GetOptions::new()
                            .with_range(end)
                            .with_keys_only()
                            .with_limit(1)
                            .with_sort(SortTarget::Mod, SortOrder::Descend),
                    ),
                )
                .await?;
            let rev = newest.kvs().first().map_or(0, |kv| kv.mod_revision());
            Ok((count, rev))
        })
    }

    /// Runs `fut` on the store's runtime and waits for it (with a margin over the request timeout).
    fn run<T, F>(&self, what: &str, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| backend("etcd store is shutting down; retry on a new connection"))?;
        // Generous: a scan is many requests, each bounded by the client's own timeout.
        let overall = self.request_timeout.saturating_mul(4) + Duration::from_secs(5);
        run_on(rt, fut, overall)
            .map_err(|e| StoreError::Backend(format!("{what}: {e}")))?
            .map_err(|e| classify(&self.endpoints, what, &e))
    }

    fn check_limits(&self, compares: usize, ops: &[Op], bytes: usize) -> Result<(), StoreError> {
        if compares > self.max_txn_ops || ops.len() > self.max_txn_ops {
            return Err(backend(format!(
                "transaction too big for etcd: {compares} compares and {} writes, but etcd allows at most {} of \
                 each per transaction (--max-txn-ops); split the change into smaller transactions, or raise \
                 --max-txn-ops on every etcd member and max_txn_ops here",
                ops.len(),
                self.max_txn_ops
            )));
        }
        if bytes > self.max_request_bytes {
            return Err(backend(format!(
                "transaction too big for etcd: about {bytes} bytes, but etcd accepts requests of at most {} \
                 bytes (--max-request-bytes); store smaller values, or raise --max-request-bytes on every \
                 etcd member and max_request_bytes here",
                self.max_request_bytes
            )));
        }
        Ok(())
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client.clone();
        let k = self.full_key(key);
        self.run("etcd get", async move {
            let mut resp = client.get(k, None).await?;
            Ok(resp.take_kvs().into_iter().next().map(|kv| kv.into_key_value().1))
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut client = self.client.clone();
        let full = self.full_key(prefix);
        let strip = self.prefix.len();
        let page_size = self.page_size;
        self.run("etcd scan", async move {
            let end = prefix_end(&full);
            // An empty key is not allowed; "\0" is the smallest key.
            let mut start = if full.is_empty() { vec![0] } else { full };
            let mut limit = page_size;
            let mut revision = 0;
            let mut out = Vec::new();
            loop {
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(limit)
                    .with_revision(revision);
                let mut resp = match client.get(start.clone(), Some(opts)).await {
                    Ok(r) => r,
                    Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange && limit > 1 => {
                        // The page exceeded the client's response size limit: ask for fewer keys.
                        limit = (limit / 2).max(1);
                        tracing::debug!(limit, "etcd scan page too large, halving");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if revision == 0 {
                    revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                }
                let more = resp.more();
                let kvs = resp.take_kvs();
                let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else {
                    break;
                };
                out.extend(kvs.into_iter().map(|kv| {
                    let (mut k, v) = kv.into_key_value();
                    k.drain(..strip.min(k.len()));
                    (k, v)
                }));
                if !more {
                    break;
                }
                start = last;
                start.push(0);
            }
            Ok(out)
        })
    }

    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let ops = collapse_ops(txn.ops);
        let mut bytes = 0usize;
        let mut compares = Vec::with_capacity(txn.compares.len());
        for c in &txn.compares {
            let (k, extra) = match c {
                Compare::Equals(k, v) => (k, v.len()),
                Compare::Absent(k) | Compare::Present(k) => (k, 0),
            };
            bytes += self.prefix.len() + k.len() + extra + PER_ITEM_OVERHEAD;
            let fk = self.full_key(k);
            compares.push(match c {
                Compare::Equals(_, v) => EtcdCompare::value(fk, CompareOp::Equal, v.clone()),
                Compare::Absent(_) => EtcdCompare::create_revision(fk, CompareOp::Equal, 0),
                Compare::Present(_) => EtcdCompare::create_revision(fk, CompareOp::Greater, 0),
            });
        }
        for op in &ops {
            bytes += self.prefix.len()
                + PER_ITEM_OVERHEAD
                + match op {
                    Op::Put(k, v) => k.len() + v.len(),
                    Op::Delete(k) => k.len(),
                };
        }
        self.check_limits(compares.len(), &ops, bytes)?;
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(self.full_key(&k), v, None),
                Op::Delete(k) => TxnOp::delete(self.full_key(&k), None),
            })
            .collect();
        let etxn = EtcdTxn::new().when(compares).and_then(then);
        let mut client = self.client.clone();
        self.run("etcd transaction", async move {
            let resp = client.txn(etxn).await?;
            Ok(resp.succeeded())
        })
    }

    /// A no-op: etcd acknowledges a write only once a quorum has it in its write-ahead log.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Spawns `fut` on `rt` and waits (on a std channel, so from any thread) at most `timeout`.
fn run_on<T, F>(rt: &tokio::runtime::Runtime, fut: F, timeout: Duration) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let handle = rt.spawn(async move {
        // The receiver may have given up (timeout): nothing to do then.
        let _ = tx.send(fut.await);
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            handle.abort();
            Err(backend(format!(
                "etcd did not answer within {timeout:?}; check etcd_endpoints and TLS, and that etcd has a leader"
            )))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(backend(
            "the etcd client task ended without an answer (runtime shutting down); retry",
        )),
    }
}

/// The last op on each key wins; etcd refuses duplicate keys in one transaction.
fn collapse_ops(ops: Vec<Op>) -> Vec<Op> {
    let mut last: HashMap<Vec<u8>, usize> = HashMap::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let k = match op {
            Op::Put(k, _) | Op::Delete(k) => k.clone(),
        };
        last.insert(k, i);
    }
    ops.into_iter()
        .enumerate()
        .filter(|(i, op)| {
            let k = match op {
                Op::Put(k, _) | Op::Delete(k) => k,
            };
            last.get(k) == Some(i)
        })
        .map(|(_, op)| op)
        .collect()
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end for a prefix);
/// `[0]` (all keys from the start key) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn backend(msg: impl Into<String>) -> StoreError {
    StoreError::Backend(msg.into())
}

/// Maps a client error to a [`StoreError`] that says what failed and what to do.
pub(crate) fn classify(endpoints: &str, what: &str, e: &etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    let msg = match e {
        E::TransportError(_) | E::IoError(_) => format!(
            "{what}: etcd at {endpoints} is unreachable ({e}); check etcd_endpoints and TLS (CA, client \
             certificate) and that etcd is running"
        ),
        E::InvalidUri(_) | E::InvalidArgs(_) | E::EndpointError(_) => format!(
            "{what}: invalid etcd configuration for {endpoints} ({e}); endpoints look like \
             https://host:2379 (http:// only without TLS)"
        ),
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => format!(
                "{what}: etcd at {endpoints} is unreachable or has no leader ({}); check etcd_endpoints and \
                 TLS, and etcd's health (etcdctl endpoint health)",
                s.message()
            ),
            Code::PermissionDenied | Code::Unauthenticated => format!(
                "{what}: etcd at {endpoints} refused access ({}); check the client certificate and etcd's \
                 RBAC for the key prefix",
                s.message()
            ),
            Code::InvalidArgument if s.message().contains("too many operations") => format!(
                "{what}: etcd refused the transaction ({}); split it, or raise --max-txn-ops on every etcd \
                 member and max_txn_ops here",
                s.message()
            ),
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
                if s.message().contains("too large") || s.message().contains("larger than max") =>
            {
                format!(
                    "{what}: etcd refused the request size ({}); store smaller values or raise \
                     --max-request-bytes on every etcd member and max_request_bytes here",
                    s.message()
                )
            }
            _ => format!("{what}: etcd at {endpoints} returned {:?}: {}", s.code(), s.message()),
        },
        other => format!("{what}: etcd client error at {endpoints}: {other}"),
    };
    StoreError::Backend(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_non_ff_byte() {
        assert_eq!(prefix_end(b"nimbus/"), b"nimbus0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn collapse_keeps_last_op_per_key_in_order() {
        let ops = vec![
            Op::Put(b"k".to_vec(), b"1".to_vec()),
            Op::Put(b"a".to_vec(), b"x".to_vec()),
            Op::Delete(b"k".to_vec()),
            Op::Put(b"b".to_vec(), b"y".to_vec()),
            Op::Put(b"a".to_vec(), b"z".to_vec()),
        ];
        assert_eq!(
            collapse_ops(ops),
            vec![
                Op::Delete(b"k".to_vec()),
                Op::Put(b"b".to_vec(), b"y".to_vec()),
                Op::Put(b"a".to_vec(), b"z".to_vec()),
            ]
        );
    }

    #[test]
    fn tls_debug_hides_the_key() {
        let t = EtcdTls {
            ca_pem: b"ca".to_vec(),
            client_cert_pem: b"cert".to_vec(),
            client_key_pem: b"SECRET-KEY".to_vec(),
            domain_name: None,
        };
        let s = format!("{t:?}");
        assert!(!s.contains("SECRET"), "{s}");
        assert!(s.contains("redacted"), "{s}");
    }

    #[test]
    fn connect_without_endpoints_says_what_to_set() {
        let err = EtcdStore::connect(EtcdOptions::new(Vec::<String>::new())).unwrap_err();
        assert!(err.to_string().contains("set etcd_endpoints"), "{err}");
    }
}
