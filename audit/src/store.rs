//! Where entries and checkpoints live: the [`AuditStore`] trait the coordinator implements on its KV
//! store, the suggested key layout, and [`MemoryStore`] for tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::{AuditError, Result, StoreError};
use crate::model::{Checkpoint, Entry};

/// Suggested KV key of entry `seq`: `audit/entry/<seq:020>` (zero-padded so key order is seq order).
pub fn entry_key(seq: u64) -> String {
    format!("audit/entry/{seq:020}")
}

/// Suggested KV key of the checkpoint for entry `seq`: `audit/checkpoint/<seq:020>`.
pub fn checkpoint_key(seq: u64) -> String {
    format!("audit/checkpoint/{seq:020}")
}

/// Suggested KV key holding the head seq (decimal), the compare-and-swap target of [`AuditStore::append`].
pub const HEAD_KEY: &str = "audit/head";

/// Storage for the audit chain.
///
/// A KV implementation (etcd-shaped): keep the head seq under [`HEAD_KEY`] and each entry as its JSON
/// under [`entry_key`]; `append` is one transaction "if `HEAD_KEY` == expected (or is absent when
/// `expected_head_seq` is `None`) then put `entry_key(seq)` and set `HEAD_KEY` = seq", returning `false`
/// when the comparison fails.
pub trait AuditStore: Send + Sync {
    /// The entry with the highest seq, if any.
    fn head(&self) -> Result<Option<Entry>>;

    /// Stores `entry` (whose seq is `expected_head_seq + 1`, or 1) if the head is still
    /// `expected_head_seq`. `Ok(false)` means another writer got there first: re-read the head and retry.
    fn append(&self, expected_head_seq: Option<u64>, entry: &Entry) -> Result<bool>;

    /// Up to `limit` entries with seq ≥ `from_seq`, in seq order (as stored: a verifier must see a
    /// missing or out-of-place entry as it is).
    fn range(&self, from_seq: u64, limit: usize) -> Result<Vec<Entry>>;

    /// Stores a checkpoint (idempotent per seq).
    fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()>;

    /// All stored checkpoints in seq order.
    fn checkpoints(&self) -> Result<Vec<Checkpoint>>;

    /// The latest stored checkpoint. Override when listing all of them is costly.
    fn last_checkpoint(&self) -> Result<Option<Checkpoint>> {
        Ok(self.checkpoints()?.into_iter().max_by_key(|c| c.seq))
    }
}

/// Every entry of `store`, read in pages of `page` entries.
pub fn read_all(store: &dyn AuditStore, page: usize) -> Result<Vec<Entry>> {
    let page = page.max(1);
    let mut out: Vec<Entry> = Vec::new();
    let mut from = 1;
    loop {
        let batch = store.range(from, page)?;
        // Continue after the highest seq seen: a tampered, out-of-order page must neither loop forever
        // nor hide the entries after it.
        let Some(max) = batch.iter().map(|e| e.seq).max() else {
            break;
        };
        let next = max.saturating_add(1);
        let short = batch.len() < page;
        out.extend(batch);
        if short || next <= from {
            break;
        }
        from = next;
    }
    Ok(out)
}

/// An in-memory [`AuditStore`], for tests and tools.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    entries: BTreeMap<u64, Entry>,
    checkpoints: BTreeMap<u64, Checkpoint>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryInner>> {
        self.inner
            .lock()
            .map_err(|_| StoreError::new("memory store lock poisoned by a panicked writer").into())
    }
}

impl AuditStore for MemoryStore {
    fn head(&self) -> Result<Option<Entry>> {
        Ok(self.lock()?.entries.values().next_back().cloned())
    }

    fn append(&self, expected_head_seq: Option<u64>, entry: &Entry) -> Result<bool> {
        let mut inner = self.lock()?;
        let head = inner.entries.keys().next_back().copied();
        if head != expected_head_seq {
            return Ok(false);
        }
        let want = expected_head_seq.unwrap_or(0) + 1;
        if entry.seq != want {
            return Err(AuditError::StoreRejected {
                seq: entry.seq,
                reason: format!("the next seq after head {expected_head_seq:?} is {want}"),
            });
        }
        inner.entries.insert(entry.seq, entry.clone());
        Ok(true)
    }

    fn range(&self, from_seq: u64, limit: usize) -> Result<Vec<Entry>> {
        Ok(self
            .lock()?
            .entries
            .range(from_seq..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        self.lock()?.checkpoints.insert(checkpoint.seq, checkpoint.clone());
        Ok(())
    }

    fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        Ok(self.lock()?.checkpoints.values().cloned().collect())
    }

    fn last_checkpoint(&self) -> Result<Option<Checkpoint>> {
        Ok(self.lock()?.checkpoints.values().next_back().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GENESIS_PREV, Principal, Record};

    fn entry(seq: u64, prev: &str) -> Entry {
        Entry::seal(seq, seq, prev, Record::new(Principal::uid(0), "x", "y"))
    }

    #[test]
    fn memory_store_appends_only_on_the_expected_head() {
        let s = MemoryStore::new();
        let e1 = entry(1, GENESIS_PREV);
        assert!(s.append(None, &e1).unwrap());
        assert!(!s.append(None, &e1).unwrap(), "stale head must be a conflict");
        let e2 = entry(2, &e1.hash);
        assert!(s.append(Some(1), &e2).unwrap());
        assert!(matches!(
            s.append(Some(2), &entry(5, &e2.hash)),
            Err(AuditError::StoreRejected { seq: 5, .. })
        ));
        assert_eq!(s.head().unwrap().unwrap().seq, 2);
        assert_eq!(s.range(2, 10).unwrap(), vec![e2]);
    }

    #[test]
    fn read_all_pages_through_everything() {
        let s = MemoryStore::new();
        let mut prev = GENESIS_PREV.to_string();
        for seq in 1..=7 {
            let e = entry(seq, &prev);
            prev = e.hash.clone();
            assert!(s.append(if seq == 1 { None } else { Some(seq - 1) }, &e).unwrap());
        }
        let all = read_all(&s, 3).unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
    }

    #[test]
    fn suggested_keys_sort_by_seq() {
        assert_eq!(entry_key(42), "audit/entry/00000000000000000042");
        assert!(entry_key(9) < entry_key(10));
        assert_eq!(checkpoint_key(1), "audit/checkpoint/00000000000000000001");
    }
}
