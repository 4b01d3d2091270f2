//! The coordinator's audit log: the `audit` crate wired to the state store, the config and the admin API.
//!
//! * [`KvAuditStore`] implements [`audit::AuditStore`] on the coordinator's [`Store`]: the head seq under
//!   [`audit::HEAD_KEY`], each entry as JSON under [`audit::entry_key`], each checkpoint under
//!   [`audit::checkpoint_key`]. An append is one transaction "head is still N (or absent) and entry N+1 is
//!   absent → put entry N+1, head = N+1", so concurrent appends never fork the chain and an entry is never
//!   overwritten.
//! * [`Auditor`] is what request handlers hold (`ctx.audit`): [`Auditor::record`] appends off the async
//!   threads and never fails the caller (a failure is logged and counted, see [`Auditor::failures`]).
//! * [`checkpoint_task`] signs a checkpoint when the time policy says so, and one at shutdown.
//! * [`list`] answers `ListAudit`.
//!
//! The signing key is `<data dir>/audit.key` (Ed25519 PKCS#8, mode 0600, created on first start).
//!
//! Invariant: nothing here puts a secret into a record; callers pass ids, names and counts only.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use audit::{AuditError, AuditKey, AuditLog, AuditStore, Checkpoint, CheckpointPolicy, Entry, Outcome, Record};
use tokio::sync::watch;

use crate::config::AuditSettings;
use crate::store::{Store, Txn};

/// Name of the audit signing key inside the data directory.
pub const KEY_FILE: &str = "audit.key";

/// Most entries one `ListAudit` answer carries. Default and maximum: 10 000.
pub const MAX_LIST: usize = 10_000;

/// How often [`checkpoint_task`] asks the log whether a time-based checkpoint is due (at most; a shorter
/// `audit_checkpoint_interval` is used as is). Default 5 s.
pub const CHECKPOINT_TICK: Duration = Duration::from_secs(5);

const ENTRY_PREFIX: &str = "audit/entry/";
const CHECKPOINT_PREFIX: &str = "audit/checkpoint/";

/// [`audit::AuditStore`] over the coordinator's key-value store (sled today, etcd-shaped).
pub struct KvAuditStore {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for KvAuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvAuditStore").finish_non_exhaustive()
    }
}

fn store_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> AuditError {
    audit::StoreError::with_source(format!("{what}: {e}"), e).into()
}

fn corrupt(key: &str, reason: impl std::fmt::Display) -> AuditError {
    audit::StoreError::new(format!(
        "stored audit record {key} is unreadable ({reason}); the store was damaged or edited: \
         run `nimbusctl audit verify` and restore the data directory from a backup"
    ))
    .into()
}

impl KvAuditStore {
    /// Wraps the coordinator's store (shared with `crate::state`; the `audit/` prefix is ours alone).
    pub fn new(store: Arc<dyn Store>) -> Self {
        KvAuditStore { store }
    }

    fn head_seq(&self) -> audit::Result<Option<u64>> {
        let Some(raw) = self
            .store
            .get(audit::HEAD_KEY.as_bytes())
            .map_err(|e| store_err("reading the audit head", e))?
        else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&raw);
        text.trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|e| corrupt(audit::HEAD_KEY, e))
    }

    fn parse<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> audit::Result<T> {
        serde_json::from_slice(value).map_err(|e| corrupt(&String::from_utf8_lossy(key), e))
    }
}

impl AuditStore for KvAuditStore {
    fn head(&self) -> audit::Result<Option<Entry>> {
        let Some(seq) = self.head_seq()? else {
            return Ok(None);
        };
        let key = audit::entry_key(seq);
        match self
            .store
            .get(key.as_bytes())
            .map_err(|e| store_err("reading the audit head entry", e))?
        {
            Some(v) => Self::parse(key.as_bytes(), &v).map(Some),
            None => Err(corrupt(
                &key,
                format!("the head says seq {seq} but that entry is missing"),
            )),
        }
    }

    fn append(&self, expected_head_seq: Option<u64>, entry: &Entry) -> audit::Result<bool> {
        let want = expected_head_seq.unwrap_or(0) + 1;
        if entry.seq != want {
            return Err(AuditError::StoreRejected {
                seq: entry.seq,
                reason: format!("the next seq after head {expected_head_seq:?} is {want}"),
            });
        }
        let key = audit::entry_key(entry.seq);
        let value = serde_json::to_vec(entry)?;
        let txn = match expected_head_seq {
            Some(h) => Txn::new().if_equals(audit::HEAD_KEY, h.to_string()),
            None => Txn::new().if_absent(audit::HEAD_KEY),
        }
        .if_absent(key.clone())
        .put(key.clone(), value)
        .put(audit::HEAD_KEY, entry.seq.to_string());
        if self
            .store
            .txn(txn)
            .map_err(|e| store_err("appending an audit entry", e))?
        {
            return Ok(true);
        }
        // Lost the race (the head moved), or an entry already sits past the head: never overwrite it.
        if self.head_seq()? == expected_head_seq {
            return Err(AuditError::StoreRejected {
                seq: entry.seq,
                reason: format!(
                    "{key} already exists past the head; the store was edited: run `nimbusctl audit verify`"
                ),
            });
        }
        Ok(false)
    }

    fn range(&self, from_seq: u64, limit: usize) -> audit::Result<Vec<Entry>> {
        let from = audit::entry_key(from_seq);
        let rows = self
            .store
            .scan_prefix(ENTRY_PREFIX.as_bytes())
            .map_err(|e| store_err("listing audit entries", e))?;
        rows.iter()
            .filter(|(k, _)| k.as_slice() >= from.as_bytes())
            .take(limit)
            .map(|(k, v)| Self::parse(k, v))
            .collect()
    }

    fn put_checkpoint(&self, checkpoint: &Checkpoint) -> audit::Result<()> {
        let value = serde_json::to_vec(checkpoint)?;
        self.store
            .txn(Txn::new().put(audit::checkpoint_key(checkpoint.seq), value))
            .map_err(|e| store_err("storing an audit checkpoint", e))?;
        Ok(())
    }

    fn checkpoints(&self) -> audit::Result<Vec<Checkpoint>> {
        self.store
            .scan_prefix(CHECKPOINT_PREFIX.as_bytes())
            .map_err(|e| store_err("listing audit checkpoints", e))?
            .iter()
            .map(|(k, v)| Self::parse(k, v))
            .collect()
    }
}

/// The audit log handle request handlers use (`ctx.audit`).
pub struct Auditor {
    log: Arc<AuditLog>,
    failures: AtomicU64,
    /// Where failed appends are also counted for Prometheus (`nimbus_audit_append_failures_total`).
    metrics: Option<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("log", &self.log)
            .field("failures", &self.failures())
            .finish()
    }
}

impl Auditor {
    /// Wraps a ready log (tests build one over [`audit::MemoryStore`] or a [`KvAuditStore`]).
    pub fn new(log: AuditLog) -> Auditor {
        Auditor {
            log: Arc::new(log),
            failures: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// Also counts failed appends in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Auditor {
        self.metrics = Some(metrics);
        self
    }

    /// Opens the log the configuration describes: the key `<data_dir>/audit.key` (created 0600 when
    /// missing), the chain in `store`, the JSON-lines file and syslog sinks, the checkpoint policy.
    pub fn open(settings: &AuditSettings, data_dir: &Path, store: Arc<dyn Store>) -> Result<Auditor, AuditError> {
        let key = AuditKey::load_or_create(&data_dir.join(KEY_FILE))?;
        let mut sinks: Vec<Box<dyn audit::Sink>> = Vec::new();
        if let Some(file) = &settings.file {
            sinks.push(Box::new(audit::JsonLinesFile::open(file.clone())?));
        }
        if settings.syslog {
            sinks.push(Box::new(audit::Syslog::connect(audit::SyslogConfig::default())?));
        }
        let policy = CheckpointPolicy {
            every_entries: Some(settings.checkpoint_entries.max(1)),
            every: Some(settings.checkpoint_interval),
        };
        tracing::info!(
            key_id = %key.key_id(), file = ?settings.file, syslog = settings.syslog,
            checkpoint_entries = settings.checkpoint_entries,
            checkpoint_interval = %humantime::format_duration(settings.checkpoint_interval),
            "audit log open"
        );
        let store: Arc<dyn AuditStore> = Arc::new(KvAuditStore::new(store));
        Ok(Auditor::new(AuditLog::new(store, key, sinks, policy)))
    }

    /// The underlying log (store, key).
    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    /// Appends `rec` off the async threads. Never fails the caller: the action it records has happened,
    /// so a failed append is logged (with what to do) and counted in [`Auditor::failures`].
    pub async fn record(&self, rec: Record) {
        let (action, target) = (rec.action.clone(), rec.target.clone());
        let log = Arc::clone(&self.log);
        let error = match tokio::task::spawn_blocking(move || log.append(rec)).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the append task failed: {e}"),
        };
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.audit_append_failed();
        }
        tracing::error!(
            %action, %target, %error,
            "audit entry NOT recorded (the action itself took effect); fix the cause, then run \
             `nimbusctl audit verify`: the log has no entry for this action"
        );
    }

    /// Records an enrollment made with join token `token_id`: who is `system:token:<id>` (the token is
    /// the credential), `target` e.g. `node/web-1`, `detail` ids and names only (never the token secret).
    pub async fn record_enrollment(
        &self,
        token_id: &str,
        from: impl Into<String>,
        target: impl Into<String>,
        result: Outcome,
        detail: serde_json::Value,
    ) {
        let rec = Record::new(
            audit::Principal::system(format!("token:{token_id}")),
            "node.enroll",
            target,
        )
        .with_from(from)
        .with_result(result)
        .with_detail(detail);
        self.record(rec).await;
    }

    /// Appends that could not be stored since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// How a refused or failed admin call is recorded: bad input and missing permission are `refused`, the
/// rest (internal errors, unavailable backends) `failed`, with the status message as the reason.
pub fn outcome_of_status(s: &tonic::Status) -> Outcome {
    use tonic::Code::*;
    match s.code() {
        Ok => Outcome::Ok,
        InvalidArgument | NotFound | AlreadyExists | PermissionDenied | FailedPrecondition | OutOfRange
        | Unauthenticated => Outcome::refused(s.message()),
        _ => Outcome::failed(s.message()),
    }
}

/// The outcome of an admin call's result (see [`outcome_of_status`]).
pub fn outcome_of<T>(r: &Result<T, tonic::Status>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(s) => outcome_of_status(s),
    }
}

/// Signs a checkpoint whenever the time policy says so (asked every [`CHECKPOINT_TICK`] or the configured
/// interval, whichever is shorter), and one for the last entries when `shutdown` fires.
pub async fn checkpoint_task(auditor: Arc<Auditor>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let tick = every.min(CHECKPOINT_TICK).max(Duration::from_millis(100));
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = timer.tick() => false,
            _ = shutdown.changed() => true,
        };
        let log = Arc::clone(&auditor.log);
        let r = tokio::task::spawn_blocking(move || {
            if stop {
                checkpoint_if_new(&log)
            } else {
                log.maybe_checkpoint(SystemTime::now())
            }
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(
                %error,
                "audit checkpoint not signed; truncation of recent entries is not detectable until one is: \
                 fix the cause (store, disk, sink)"
            ),
            Err(error) => tracing::error!(%error, "audit checkpoint task failed"),
        }
        if stop {
            return;
        }
    }
}

/// A checkpoint of the head unless the newest one already covers it.
fn checkpoint_if_new(log: &AuditLog) -> audit::Result<Option<Checkpoint>> {
    let Some(head) = log.store().head()? else {
        return Ok(None);
    };
    if log.store().last_checkpoint()?.is_some_and(|c| c.seq >= head.seq) {
        return Ok(None);
    }
    log.checkpoint_now()
}

/// The canonical JSON of an entry (hash included): what `ListAudit` sends, so a client can recompute the hash.
pub fn entry_json(e: &Entry) -> Result<Vec<u8>, AuditError> {
    Ok(audit::canonical_json(&serde_json::to_value(e)?).into_bytes())
}

/// `ListAudit`: entries with seq > `after_seq` and time ≥ `since_unix_ms`, at most `limit` (0 or more than
/// [`MAX_LIST`]: [`MAX_LIST`]), in stored order; every checkpoint; the public key; the head seq.
pub fn list(
    log: &AuditLog,
    since_unix_ms: u64,
    after_seq: u64,
    limit: u32,
) -> Result<nimbus_proto::ListAuditResponse, AuditError> {
    let limit = match usize::try_from(limit) {
        Ok(0) | Err(_) => MAX_LIST,
        Ok(n) => n.min(MAX_LIST),
    };
    let store = log.store();
    let head_seq = store.head()?.map_or(0, |h| h.seq);
    let entries = store
        .range(after_seq.saturating_add(1), usize::MAX)?
        .into_iter()
        .filter(|e| e.at_unix_ms >= since_unix_ms)
        .take(limit)
        .map(|e| entry_json(&e))
        .collect::<Result<Vec<_>, _>>()?;
    let checkpoints = store
        .checkpoints()?
        .iter()
        .map(|c| serde_json::to_vec(c).map_err(AuditError::from))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(nimbus_proto::ListAuditResponse {
        entries_json: entries,
        checkpoints_json: checkpoints,
        public_key: log.key().public_key_base64(),
        key_id: log.key().key_id().to_string(),
        head_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit::{Principal, read_all, verify};

    use crate::store::SledStore;

    fn sled(dir: &Path) -> Arc<dyn Store> {
        Arc::new(SledStore::open(dir).unwrap())
    }

    fn rec(i: usize) -> Record {
        Record::new(Principal::uid(0), "token.create", format!("token/t{i}"))
            .with_from("unix")
            .with_detail(serde_json::json!({ "uses": i }))
    }

    #[test]
    fn concurrent_appends_from_threads_never_fork_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = sled(dir.path());
        const THREADS: usize = 8;
        const EACH: usize = 25;
        // One AuditLog per thread: their local locks do not serialise each other, only the store's CAS does
        // (as with several coordinators on one store).
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    let log = AuditLog::new(
                        Arc::new(KvAuditStore::new(store)),
                        AuditKey::generate().unwrap(),
                        Vec::new(),
                        CheckpointPolicy {
                            every_entries: None,
                            every: None,
                        },
                    );
                    for i in 0..EACH {
                        log.append(rec(t * EACH + i)).unwrap();
                    }
                });
            }
        });
        let kv = KvAuditStore::new(store);
        let all = read_all(&kv, 7).unwrap();
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        let n = u64::try_from(THREADS * EACH).unwrap();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "seqs 1..=N without gaps or duplicates"
        );
        let report = verify(&all, &[], &[]);
        assert!(report.ok, "{report}");
        assert_eq!(kv.head().unwrap().unwrap().seq, n);
        let targets: std::collections::BTreeSet<_> = all.iter().map(|e| e.target.clone()).collect();
        assert_eq!(targets.len(), THREADS * EACH, "every record stored exactly once");
    }

    #[test]
    fn append_refuses_stale_heads_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let store = sled(dir.path());
        let kv = KvAuditStore::new(Arc::clone(&store));
        assert!(kv.head().unwrap().is_none());
        let e1 = Entry::seal(1, 1, audit::GENESIS_PREV, rec(1));
        assert!(kv.append(None, &e1).unwrap());
        assert!(!kv.append(None, &e1).unwrap(), "a stale (absent) head is a conflict");
        let e2 = Entry::seal(2, 2, e1.hash.clone(), rec(2));
        assert!(kv.append(Some(1), &e2).unwrap());
        assert!(!kv.append(Some(1), &e2).unwrap(), "a stale head is a conflict");
        assert!(matches!(
            kv.append(Some(2), &Entry::seal(5, 5, e2.hash.clone(), rec(5))),
            Err(AuditError::StoreRejected { seq: 5, .. })
        ));

        // An entry past the head (head rewound by hand) is never overwritten.
        store.txn(Txn::new().put(audit::HEAD_KEY, "1")).unwrap();
        let other = Entry::seal(2, 9, e1.hash.clone(), rec(9));
        assert!(matches!(
            kv.append(Some(1), &other),
            Err(AuditError::StoreRejected { seq: 2, .. })
        ));
        assert_eq!(kv.range(2, 10).unwrap(), vec![e2]);
    }

    #[test]
    fn range_and_checkpoints_round_trip_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = sled(dir.path());
        let key = AuditKey::generate().unwrap();
        let log = AuditLog::new(
            Arc::new(KvAuditStore::new(Arc::clone(&store))),
            key,
            Vec::new(),
            CheckpointPolicy {
                every_entries: Some(4),
                every: None,
            },
        );
        for i in 0..11 {
            log.append(rec(i)).unwrap();
        }
        let kv = KvAuditStore::new(store);
        let seqs: Vec<u64> = kv.range(9, 100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![9, 10, 11], "key order is seq order past 9 → 10");
        assert_eq!(kv.range(1, 3).unwrap().len(), 3);
        let cps: Vec<u64> = kv.checkpoints().unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(cps, vec![4, 8]);
        assert_eq!(kv.last_checkpoint().unwrap().unwrap().seq, 8);
        let report = audit::verify_store(&kv, &[], &[log.key().trusted()]).unwrap();
        assert!(report.ok, "{report}");
    }

    #[test]
    fn a_corrupt_record_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = sled(dir.path());
        store
            .txn(
                Txn::new()
                    .put(audit::HEAD_KEY, "1")
                    .put(audit::entry_key(1), "{not json"),
            )
            .unwrap();
        let err = KvAuditStore::new(Arc::clone(&store)).head().unwrap_err().to_string();
        assert!(
            err.contains("audit/entry/00000000000000000001") && err.contains("audit verify"),
            "{err}"
        );
        store.txn(Txn::new().put(audit::HEAD_KEY, "2")).unwrap();
        let err = KvAuditStore::new(store).head().unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    fn settings(file: Option<std::path::PathBuf>) -> AuditSettings {
        AuditSettings {
            file,
            syslog: false,
            checkpoint_interval: Duration::from_millis(100),
            checkpoint_entries: 1000,
        }
    }

    #[tokio::test]
    async fn auditor_records_lists_and_checkpoints_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let sink = dir.path().join("audit.jsonl");
        let store = sled(&dir.path().join("state"));
        let auditor = Arc::new(Auditor::open(&settings(Some(sink.clone())), dir.path(), store).unwrap());
        let key_file = dir.path().join(KEY_FILE);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "the audit key is private");

        for i in 0..3 {
            auditor.record(rec(i)).await;
        }
        auditor
            .record_enrollment(
                "abc123",
                "192.0.2.7:5000",
                "node/web-1",
                Outcome::Ok,
                serde_json::json!({"node_id": "n1"}),
            )
            .await;
        assert_eq!(auditor.failures(), 0);

        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(checkpoint_task(Arc::clone(&auditor), Duration::from_secs(3600), rx));
        tx.send(true).unwrap();
        task.await.unwrap();

        let r = list(auditor.log(), 0, 0, 0).unwrap();
        assert_eq!(r.head_seq, 4);
        assert_eq!(r.entries_json.len(), 4);
        assert_eq!(r.checkpoints_json.len(), 1, "one checkpoint at shutdown");
        let entries: Vec<Entry> = r
            .entries_json
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(entries[3].who, Principal::system("token:abc123"));
        assert_eq!(entries[3].action, "node.enroll");
        for (e, raw) in entries.iter().zip(&r.entries_json) {
            assert_eq!(e.computed_hash(), e.hash, "hash recomputes from the listed JSON");
            assert_eq!(raw, &entry_json(e).unwrap(), "listed bytes are canonical");
        }
        let cps: Vec<Checkpoint> = r
            .checkpoints_json
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        let pk = audit::decode_public_key(&r.public_key).unwrap();
        assert_eq!(audit::key_id(&pk), r.key_id);
        let report = verify(&entries, &cps, &[(r.key_id.clone(), pk)]);
        assert!(report.ok, "{report}");
        assert_eq!(report.last_checkpoint_seq, Some(4));

        // Filters: after_seq, limit, since.
        let r = list(auditor.log(), 0, 2, 1).unwrap();
        assert_eq!(r.entries_json.len(), 1);
        assert_eq!(serde_json::from_slice::<Entry>(&r.entries_json[0]).unwrap().seq, 3);
        let r = list(auditor.log(), u64::MAX, 0, 0).unwrap();
        assert!(r.entries_json.is_empty());
        assert_eq!(r.head_seq, 4, "the head whatever the filter");

        // The sink got every entry and the checkpoint: truncating the store is detectable from it.
        let outside = audit::read_sink_checkpoints(&sink).unwrap();
        assert_eq!(outside.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![4]);
        let report = verify(&entries[..2], &outside, &[(r.key_id.clone(), pk)]);
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, audit::Problem::Truncated { .. })),
            "{report}"
        );
    }

    #[tokio::test]
    async fn the_checkpoint_task_signs_on_its_timer() {
        let dir = tempfile::tempdir().unwrap();
        let store = sled(&dir.path().join("state"));
        let auditor = Arc::new(Auditor::open(&settings(None), dir.path(), store).unwrap());
        auditor.record(rec(1)).await;
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(checkpoint_task(Arc::clone(&auditor), Duration::from_millis(100), rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if !auditor.log().store().checkpoints().unwrap().is_empty() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no checkpoint within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tx.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(
            auditor.log().store().checkpoints().unwrap().len(),
            1,
            "nothing new at shutdown: no second checkpoint"
        );
    }

    #[test]
    fn statuses_map_to_refused_or_failed() {
        assert_eq!(
            outcome_of_status(&tonic::Status::invalid_argument("bad ttl")),
            Outcome::refused("bad ttl")
        );
        assert_eq!(
            outcome_of_status(&tonic::Status::internal("disk")),
            Outcome::failed("disk")
        );
        assert_eq!(outcome_of::<()>(&Ok(())), Outcome::Ok);
    }
}
