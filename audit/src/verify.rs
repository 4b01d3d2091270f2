//! [`verify`]: recompute every hash and link, check checkpoint signatures, and compare the chain with
//! signed checkpoints (from the store and, above all, from an outside sink).

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::error::Result;
use crate::key::{TrustedKey, verify_checkpoint_signature};
use crate::model::{Checkpoint, Entry, GENESIS_PREV};
use crate::store::{AuditStore, read_all};

/// One thing wrong with the log. [`fmt::Display`] gives the human message, saying what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The entry's content does not match its own hash: it was edited in place.
    EntryEdited {
        seq: u64,
        stored_hash: String,
        computed_hash: String,
    },
    /// Seq jumps from `after_seq` to `next_seq`: the entries between were removed.
    EntriesMissing { after_seq: u64, next_seq: u64 },
    /// `prev` is not the previous entry's hash (or not [`GENESIS_PREV`] for seq 1).
    BrokenLink {
        seq: u64,
        expected_prev: String,
        found_prev: String,
    },
    /// The entry is stored after one with a higher seq.
    OutOfOrder { seq: u64, after_seq: u64 },
    /// The same seq is stored more than once.
    Duplicate { seq: u64 },
    /// An entry with seq 0 (seqs start at 1).
    InvalidSeq { seq: u64 },
    /// A checkpoint names a key that is not among the trusted keys.
    CheckpointUnknownKey { seq: u64, key_id: String },
    /// A checkpoint's signature does not verify with its key.
    CheckpointBadSignature { seq: u64, key_id: String },
    /// A valid checkpoint covers `checkpoint_seq`, but the log ends at `last_seq`.
    Truncated { last_seq: u64, checkpoint_seq: u64 },
    /// A valid checkpoint records another hash for entry `seq` than the stored one.
    Rewritten {
        seq: u64,
        checkpoint_hash: String,
        stored_hash: String,
    },
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::EntryEdited {
                seq,
                stored_hash,
                computed_hash,
            } => write!(
                f,
                "entry {seq} was edited: its content hashes to {} but it records {}. Compare it with the copy \
                 in the audit sink (JSON-lines file or syslog) to see what changed, and find out who could \
                 write to the store",
                short(computed_hash),
                short(stored_hash)
            ),
            Problem::EntriesMissing { after_seq, next_seq } => {
                let first = after_seq + 1;
                let last = next_seq.saturating_sub(1);
                let which = if first == last {
                    format!("entry {first} is")
                } else {
                    format!("entries {first}..={last} are")
                };
                write!(
                    f,
                    "{which} missing (seq jumps from {after_seq} to {next_seq}): removed from the store. Recover \
                     them from the audit sink and find out who could write to the store"
                )
            }
            Problem::BrokenLink { seq: 1, found_prev, .. } => write!(
                f,
                "entry 1 does not start the chain (prev is {}, not 64 zeros): the beginning of the log was \
                 replaced. Compare the first entries with the audit sink",
                short(found_prev)
            ),
            Problem::BrokenLink {
                seq,
                expected_prev,
                found_prev,
            } => write!(
                f,
                "entry {seq} does not link to entry {} (its prev {} is not that entry's hash {}): entry {} was \
                 rewritten with a recomputed hash, or entries were removed and renumbered. Compare both with the \
                 audit sink",
                seq.saturating_sub(1),
                short(found_prev),
                short(expected_prev),
                seq.saturating_sub(1)
            ),
            Problem::OutOfOrder { seq, after_seq } => write!(
                f,
                "entry {seq} is stored after entry {after_seq}: entries were reordered in the store. Check the \
                 store's keys against the seq inside each entry"
            ),
            Problem::Duplicate { seq } => write!(
                f,
                "seq {seq} is stored more than once: an entry was copied or replayed into the store. Keep the \
                 one that matches the audit sink"
            ),
            Problem::InvalidSeq { seq } => write!(
                f,
                "an entry with seq {seq} is stored, but seqs start at 1: it was inserted by hand. Check it against \
                 the audit sink and remove it"
            ),
            Problem::CheckpointUnknownKey { seq, key_id } => write!(
                f,
                "the checkpoint for seq {seq} is signed by key {key_id}, which is not trusted: pass that \
                 coordinator key's public key (e.g. the key in use before a rotation), or treat the checkpoint \
                 as forged"
            ),
            Problem::CheckpointBadSignature { seq, key_id } => write!(
                f,
                "the checkpoint for seq {seq} (key {key_id}) has an invalid signature: it was forged or altered. \
                 Do not trust it, and find out who wrote it into the sink or store"
            ),
            Problem::Truncated {
                last_seq,
                checkpoint_seq,
            } => write!(
                f,
                "the log was truncated after seq {last_seq}: a signed checkpoint covers seq {checkpoint_seq}, so \
                 entries {}..={checkpoint_seq} were removed. Recover them from the audit sink and find out who \
                 could write to the store",
                last_seq + 1
            ),
            Problem::Rewritten {
                seq,
                checkpoint_hash,
                stored_hash,
            } => write!(
                f,
                "history was rewritten at or before seq {seq}: a signed checkpoint records hash {} for entry \
                 {seq}, the store has {}. Find the first entry that differs from the audit sink and restore from \
                 the sink or a backup",
                short(checkpoint_hash),
                short(stored_hash)
            ),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No problems.
    pub ok: bool,
    pub entries_checked: usize,
    /// Highest seq in the log (0 when empty).
    pub last_seq: u64,
    /// Distinct checkpoints examined.
    pub checkpoints_checked: usize,
    /// Highest seq covered by a checkpoint with a valid signature; entries after it are protected by the
    /// chain only.
    pub last_checkpoint_seq: Option<u64>,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok {
            write!(
                f,
                "audit log OK: {} entries (last seq {}), {} checkpoints",
                self.entries_checked, self.last_seq, self.checkpoints_checked
            )?;
            match self.last_checkpoint_seq {
                Some(s) => write!(f, ", signed through seq {s}"),
                None => write!(
                    f,
                    ", none signed yet: truncation cannot be detected until a checkpoint exists"
                ),
            }
        } else {
            write!(
                f,
                "audit log FAILED verification ({} entries checked, last seq {}): {} problem(s)",
                self.entries_checked,
                self.last_seq,
                self.problems.len()
            )?;
            for p in &self.problems {
                write!(f, "\n  - {p}")?;
            }
            Ok(())
        }
    }
}

/// Verifies a log.
///
/// `entries` are the whole log in stored order (from seq 1); `checkpoints` may mix those from the store
/// and those read back from a sink (duplicates are fine); `public_keys` are the trusted
/// `(key_id, Ed25519 public key)` pairs. Reports every edited entry, gap, broken link, reordering and
/// duplicate, every checkpoint with an unknown key or bad signature, truncation past a valid checkpoint,
/// and every valid checkpoint whose hash differs from the stored entry.
pub fn verify(entries: &[Entry], checkpoints: &[Checkpoint], public_keys: &[TrustedKey]) -> Report {
    let mut problems = Vec::new();

    for e in entries {
        let computed = e.computed_hash();
        if computed != e.hash {
            problems.push(Problem::EntryEdited {
                seq: e.seq,
                stored_hash: e.hash.clone(),
                computed_hash: computed,
            });
        }
    }
    for pair in entries.windows(2) {
        if pair[1].seq < pair[0].seq {
            problems.push(Problem::OutOfOrder {
                seq: pair[1].seq,
                after_seq: pair[0].seq,
            });
        }
    }

    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.seq); // stable: the first stored copy of a duplicate stays first
    let mut by_seq: HashMap<u64, &Entry> = HashMap::new();
    let mut prev: Option<&Entry> = None;
    for e in sorted {
        if e.seq == 0 {
            problems.push(Problem::InvalidSeq { seq: 0 });
            continue;
        }
        if by_seq.contains_key(&e.seq) {
            if !problems.contains(&Problem::Duplicate { seq: e.seq }) {
                problems.push(Problem::Duplicate { seq: e.seq });
            }
            continue;
        }
        by_seq.insert(e.seq, e);
        let (expected_prev, expected_seq) = match prev {
            None => (GENESIS_PREV, 1),
            Some(p) => (p.hash.as_str(), p.seq + 1),
        };
        if e.seq > expected_seq {
            problems.push(Problem::EntriesMissing {
                after_seq: expected_seq - 1,
                next_seq: e.seq,
            });
        } else if e.prev != expected_prev {
            problems.push(Problem::BrokenLink {
                seq: e.seq,
                expected_prev: expected_prev.to_string(),
                found_prev: e.prev.clone(),
            });
        }
        prev = Some(e);
    }
    let last_seq = prev.map_or(0, |p| p.seq);

    let keys: HashMap<&str, &[u8; 32]> = public_keys.iter().map(|(id, k)| (id.as_str(), k)).collect();
    let mut seen: HashSet<&Checkpoint> = HashSet::new();
    let mut truncated_to: Option<u64> = None;
    let mut last_checkpoint_seq: Option<u64> = None;
    let mut rewritten: HashSet<u64> = HashSet::new();
    for cp in checkpoints {
        if !seen.insert(cp) {
            continue;
        }
        let Some(key) = keys.get(cp.key_id.as_str()) else {
            problems.push(Problem::CheckpointUnknownKey {
                seq: cp.seq,
                key_id: cp.key_id.clone(),
            });
            continue;
        };
        if !verify_checkpoint_signature(cp, &key[..]) {
            problems.push(Problem::CheckpointBadSignature {
                seq: cp.seq,
                key_id: cp.key_id.clone(),
            });
            continue;
        }
        last_checkpoint_seq = last_checkpoint_seq.max(Some(cp.seq));
        if cp.seq > last_seq {
            truncated_to = truncated_to.max(Some(cp.seq));
        } else if let Some(e) = by_seq.get(&cp.seq)
            && e.hash != cp.hash
            && rewritten.insert(cp.seq)
        {
            problems.push(Problem::Rewritten {
                seq: cp.seq,
                checkpoint_hash: cp.hash.clone(),
                stored_hash: e.hash.clone(),
            });
        }
        // A checkpoint inside a gap: the gap is already reported.
    }
    if let Some(checkpoint_seq) = truncated_to {
        problems.push(Problem::Truncated {
            last_seq,
            checkpoint_seq,
        });
    }

    Report {
        ok: problems.is_empty(),
        entries_checked: entries.len(),
        last_seq,
        checkpoints_checked: seen.len(),
        last_checkpoint_seq,
        problems,
    }
}

/// Reads every entry and checkpoint of `store` and verifies them together with `extra_checkpoints`
/// (e.g. [`read_sink_checkpoints`](crate::read_sink_checkpoints) of the outside sink).
pub fn verify_store(
    store: &dyn AuditStore,
    extra_checkpoints: &[Checkpoint],
    public_keys: &[TrustedKey],
) -> Result<Report> {
    let entries = read_all(store, 1000)?;
    let mut checkpoints = store.checkpoints()?;
    checkpoints.extend_from_slice(extra_checkpoints);
    Ok(verify(&entries, &checkpoints, public_keys))
}
