//! [`AuditLog`]: appends records to the chain, ships them to the sinks and signs checkpoints.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{AuditError, Result};
use crate::key::AuditKey;
use crate::model::{Checkpoint, Entry, GENESIS_PREV, Record};
use crate::sink::Sink;
use crate::store::AuditStore;

/// How many times [`AuditLog::append`] re-reads the head after losing the compare-and-swap.
pub const MAX_APPEND_ATTEMPTS: u32 = 1000;

/// When to sign checkpoints. Either, both or neither (then only [`AuditLog::checkpoint_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// After this many entries past the last checkpoint. Default 100.
    pub every_entries: Option<u64>,
    /// When [`AuditLog::maybe_checkpoint`] is called at least this long after the last checkpoint and
    /// there are new entries. Default 60 s.
    pub every: Option<Duration>,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_entries: Some(100),
            every: Some(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct LastCheckpoint {
    seq: u64,
    at_unix_ms: u64,
}

/// The audit log of one coordinator process. Share it (`Arc<AuditLog>`) between request handlers;
/// appends from one process are serialised locally, and appends from several processes sharing one
/// store are ordered by the store's compare-and-swap.
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
    key: AuditKey,
    sinks: Vec<Box<dyn Sink>>,
    policy: CheckpointPolicy,
    append_lock: Mutex<()>,
    /// `None` until read from the store.
    last_checkpoint: Mutex<Option<LastCheckpoint>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("key", &self.key)
            .field("sinks", &self.sinks.len())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// A log over `store`, signing checkpoints with `key` and shipping to `sinks`.
    pub fn new(
        store: Arc<dyn AuditStore>,
        key: AuditKey,
        sinks: Vec<Box<dyn Sink>>,
        policy: CheckpointPolicy,
    ) -> AuditLog {
        AuditLog {
            store,
            key,
            sinks,
            policy,
            append_lock: Mutex::new(()),
            last_checkpoint: Mutex::new(None),
        }
    }

    /// The store (for listing and verifying).
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// The signing key (its public half is what verifiers need).
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// Appends a record: validates it, assigns seq/prev/hash against the current head, stores it with
    /// compare-and-swap (re-reading the head after a conflict), ships it to every sink, and signs a
    /// checkpoint when the entry-count policy says so (a checkpoint failure is logged, not returned: the
    /// entry is stored).
    pub fn append(&self, record: Record) -> Result<Entry> {
        record.validate()?;
        let entry = {
            let _local = self.append_lock.lock().unwrap_or_else(|p| p.into_inner());
            let entry = self.append_cas(record)?;
            for sink in &self.sinks {
                sink.emit_entry(&entry);
            }
            entry
        };
        if let Some(n) = self.policy.every_entries
            && let Err(error) = self.checkpoint_if_count_due(entry.seq, n)
        {
            tracing::warn!(%error, seq = entry.seq, "audit: checkpoint after append failed");
        }
        Ok(entry)
    }

    fn checkpoint_if_count_due(&self, seq: u64, every_entries: u64) -> Result<()> {
        if seq.saturating_sub(self.last_checkpoint()?.seq) >= every_entries.max(1) {
            self.checkpoint_now()?;
        }
        Ok(())
    }

    fn append_cas(&self, record: Record) -> Result<Entry> {
        for attempt in 0..MAX_APPEND_ATTEMPTS {
            let head = self.store.head()?;
            let (expected, prev) = match &head {
                Some(h) => {
                    if h.computed_hash() != h.hash {
                        tracing::error!(
                            seq = h.seq,
                            "audit: the head entry's hash does not match its content; \
                            the store may have been edited: run `nimbusctl audit verify`"
                        );
                    }
                    (Some(h.seq), h.hash.clone())
                }
                None => (None, GENESIS_PREV.to_string()),
            };
            let seq = expected.unwrap_or(0) + 1;
            let entry = Entry::seal(seq, now_unix_ms(SystemTime::now()), prev, record.clone());
            if self.store.append(expected, &entry)? {
                tracing::debug!(seq, action = %entry.action, "audit: appended");
                return Ok(entry);
            }
            tracing::debug!(seq, attempt, "audit: lost the append race; retrying");
            if attempt > 8 {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                std::thread::yield_now();
            }
        }
        Err(AuditError::Contention {
            attempts: MAX_APPEND_ATTEMPTS,
        })
    }

    /// Signs a checkpoint of the current head now, ships it to every sink (first: the outside copy is
    /// the one that matters), then stores it. `None` when the log is empty.
    pub fn checkpoint_now(&self) -> Result<Option<Checkpoint>> {
        self.checkpoint_at(SystemTime::now())
    }

    /// For the caller's timer: signs a checkpoint if the time policy is set, `now` is at least that long
    /// after the last checkpoint, and entries were appended since. Returns the checkpoint made, if any.
    pub fn maybe_checkpoint(&self, now: SystemTime) -> Result<Option<Checkpoint>> {
        let Some(every) = self.policy.every else {
            return Ok(None);
        };
        let Some(head) = self.store.head()? else {
            return Ok(None);
        };
        let last = self.last_checkpoint()?;
        if head.seq <= last.seq {
            return Ok(None);
        }
        let due = last.seq == 0
            || now_unix_ms(now).saturating_sub(last.at_unix_ms) >= u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        if !due {
            return Ok(None);
        }
        self.checkpoint_at(now)
    }

    fn checkpoint_at(&self, now: SystemTime) -> Result<Option<Checkpoint>> {
        let Some(head) = self.store.head()? else {
            return Ok(None);
        };
        let cp = self.key.sign_checkpoint(head.seq, &head.hash, now_unix_ms(now));
        for sink in &self.sinks {
            sink.emit_checkpoint(&cp);
        }
        {
            let mut last = self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|l| l.seq <= cp.seq) {
                *last = Some(LastCheckpoint {
                    seq: cp.seq,
                    at_unix_ms: cp.at_unix_ms,
                });
            }
        }
        self.store.put_checkpoint(&cp)?;
        tracing::info!(seq = cp.seq, key_id = %cp.key_id, "audit: checkpoint signed");
        Ok(Some(cp))
    }

    fn last_checkpoint(&self) -> Result<LastCheckpoint> {
        let mut guard = self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = *guard {
            return Ok(l);
        }
        let l = match self.store.last_checkpoint()? {
            Some(c) => LastCheckpoint {
                seq: c.seq,
                at_unix_ms: c.at_unix_ms,
            },
            None => LastCheckpoint { seq: 0, at_unix_ms: 0 },
        };
        *guard = Some(l);
        Ok(l)
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn now_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
