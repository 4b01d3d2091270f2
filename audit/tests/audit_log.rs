//! Behaviour of the audit log end to end: append, sinks, checkpoints and tamper detection.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic there is a failed assertion

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use audit::{
    AuditKey, AuditLog, AuditStore, CheckpointPolicy, Entry, GENESIS_PREV, JsonLinesFile, MemoryStore, Outcome,
    Principal, Problem, Record, SinkLine, TrustedKey, read_all, read_sink, read_sink_checkpoints, verify, verify_store,
};
use serde_json::json;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<MemoryStore>,
    log: AuditLog,
    sink_path: PathBuf,
    trusted: Vec<TrustedKey>,
}

fn fixture(policy: CheckpointPolicy) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sink_path = dir.path().join("audit.jsonl");
    let key = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
    let trusted = vec![key.trusted()];
    let store = Arc::new(MemoryStore::new());
    let sink = JsonLinesFile::open(&sink_path).unwrap();
    let log = AuditLog::new(store.clone(), key, vec![Box::new(sink)], policy);
    Fixture {
        _dir: dir,
        store,
        log,
        sink_path,
        trusted,
    }
}

fn every(n: u64) -> CheckpointPolicy {
    CheckpointPolicy {
        every_entries: Some(n),
        every: None,
    }
}

fn record(i: u64) -> Record {
    Record::new(Principal::cert("CN=ops"), "node.accept", format!("node/n{i}"))
        .with_from("192.0.2.10:40000")
        .with_detail(json!({"node": format!("n{i}"), "attempt": i}))
}

fn append_n(log: &AuditLog, n: u64) -> Vec<Entry> {
    (1..=n).map(|i| log.append(record(i)).unwrap()).collect()
}

/// Recomputes hashes and links from `from_seq` on, as an attacker with store access would.
fn reseal_from(entries: &mut [Entry], from_seq: u64) {
    for i in 0..entries.len() {
        if entries[i].seq < from_seq {
            continue;
        }
        let prev = if i == 0 {
            GENESIS_PREV.to_string()
        } else {
            entries[i - 1].hash.clone()
        };
        entries[i].prev = prev;
        entries[i].hash = entries[i].computed_hash();
    }
}

fn sink_checkpoints(path: &Path) -> Vec<audit::Checkpoint> {
    read_sink_checkpoints(path).unwrap()
}

#[test]
fn appends_link_into_a_chain() {
    let f = fixture(CheckpointPolicy {
        every_entries: None,
        every: None,
    });
    let entries = append_n(&f.log, 5);
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(entries[0].prev, GENESIS_PREV);
    for pair in entries.windows(2) {
        assert_eq!(pair[1].prev, pair[0].hash);
    }
    for e in &entries {
        assert_eq!(e.hash, e.computed_hash());
        assert_eq!(e.hash.len(), 64);
    }
    assert_eq!(read_all(f.store.as_ref(), 2).unwrap(), entries);
    assert_eq!(f.store.head().unwrap().unwrap().seq, 5);
}

#[test]
fn clean_log_verifies() {
    let f = fixture(every(3));
    append_n(&f.log, 7);
    let report = verify_store(f.store.as_ref(), &sink_checkpoints(&f.sink_path), &f.trusted).unwrap();
    assert!(report.ok, "{report}");
    assert_eq!(report.entries_checked, 7);
    assert_eq!(report.last_seq, 7);
    assert_eq!(report.last_checkpoint_seq, Some(6));
    assert_eq!(
        report.checkpoints_checked, 2,
        "store and sink copies of a checkpoint count once"
    );
    assert!(report.problems.is_empty());
    assert!(report.to_string().starts_with("audit log OK"));
}

#[test]
fn editing_one_entry_reports_that_seq() {
    let f = fixture(every(100));
    let mut entries = append_n(&f.log, 6);
    entries[3].detail = json!({"node": "n4", "attempt": 999});
    let report = verify(&entries, &[], &f.trusted);
    assert!(!report.ok);
    assert_eq!(report.problems.len(), 1, "{report}");
    match &report.problems[0] {
        Problem::EntryEdited {
            seq,
            stored_hash,
            computed_hash,
        } => {
            assert_eq!(*seq, 4);
            assert_ne!(stored_hash, computed_hash);
        }
        other => panic!("{other:?}"),
    }
    assert!(report.to_string().contains("entry 4 was edited"), "{report}");
}

#[test]
fn editing_and_resealing_one_entry_breaks_the_next_link() {
    let f = fixture(every(100));
    let mut entries = append_n(&f.log, 6);
    entries[2].target = "node/other".into();
    entries[2].hash = entries[2].computed_hash();
    let report = verify(&entries, &[], &f.trusted);
    assert_eq!(report.problems.len(), 1, "{report}");
    assert!(
        matches!(report.problems[0], Problem::BrokenLink { seq: 4, .. }),
        "{report}"
    );
    assert!(report.to_string().contains("entry 3 was rewritten"), "{report}");
}

#[test]
fn removing_an_entry_in_the_middle_is_reported() {
    let f = fixture(every(100));
    let mut entries = append_n(&f.log, 6);
    entries.remove(2); // seq 3
    let report = verify(&entries, &[], &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::EntriesMissing {
            after_seq: 2,
            next_seq: 4
        }],
        "{report}"
    );
    assert!(report.to_string().contains("entry 3 is missing"), "{report}");

    // Removed and renumbered (seq fields and own hashes recomputed, prev left): the first renumbered
    // entry no longer links to the survivor before it.
    let mut renumbered = append_n(&fixture(every(100)).log, 6);
    renumbered.remove(2);
    for (i, e) in renumbered.iter_mut().enumerate() {
        e.seq = i as u64 + 1;
        e.hash = e.computed_hash();
    }
    let report = verify(&renumbered, &[], &f.trusted);
    assert!(
        matches!(report.problems[0], Problem::BrokenLink { seq: 3, .. }),
        "{report}"
    );
    assert!(
        report.problems.iter().all(|p| matches!(p, Problem::BrokenLink { .. })),
        "{report}"
    );
}

#[test]
fn removing_the_first_entry_is_reported() {
    let f = fixture(every(100));
    let entries = append_n(&f.log, 3);
    let report = verify(&entries[1..], &[], &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::EntriesMissing {
            after_seq: 0,
            next_seq: 2
        }]
    );
}

#[test]
fn reordering_is_reported() {
    let f = fixture(every(100));
    let mut entries = append_n(&f.log, 5);
    entries.swap(1, 2);
    let report = verify(&entries, &[], &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::OutOfOrder { seq: 2, after_seq: 3 }],
        "{report}"
    );

    let mut duplicated = append_n(&fixture(every(100)).log, 3);
    duplicated.push(duplicated[1].clone());
    let report = verify(&duplicated, &[], &f.trusted);
    assert!(report.problems.contains(&Problem::Duplicate { seq: 2 }), "{report}");
}

#[test]
fn truncating_the_tail_is_detected_with_the_sink_checkpoints() {
    let f = fixture(every(5));
    let entries = append_n(&f.log, 10);
    let from_sink = sink_checkpoints(&f.sink_path);
    assert_eq!(from_sink.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5, 10]);
    let truncated = &entries[..7];

    // The chain alone cannot tell: what is left is a valid chain.
    assert!(verify(truncated, &[], &f.trusted).ok);

    let report = verify(truncated, &from_sink, &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::Truncated {
            last_seq: 7,
            checkpoint_seq: 10
        }],
        "{report}"
    );
    assert!(report.to_string().contains("truncated after seq 7"), "{report}");

    // Everything removed.
    let report = verify(&[], &from_sink, &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::Truncated {
            last_seq: 0,
            checkpoint_seq: 10
        }]
    );
}

#[test]
fn consistent_rewrite_from_seq_k_is_detected_by_the_signed_checkpoints() {
    let f = fixture(every(5));
    let mut entries = append_n(&f.log, 10);
    entries[3].result = Outcome::refused("hidden");
    entries[3].detail = json!({"node": "n4", "attempt": 4, "note": "nothing to see"});
    reseal_from(&mut entries, 4);

    // Hashes and links are all consistent again.
    assert!(verify(&entries, &[], &f.trusted).ok);

    let from_sink = sink_checkpoints(&f.sink_path);
    let report = verify(&entries, &from_sink, &f.trusted);
    assert!(!report.ok);
    let rewritten: Vec<u64> = report
        .problems
        .iter()
        .map(|p| match p {
            Problem::Rewritten { seq, .. } => *seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(rewritten, vec![5, 10], "{report}");
    assert!(
        report.to_string().contains("history was rewritten at or before seq 5"),
        "{report}"
    );

    // A rewrite starting between two checkpoints is caught by the next one.
    let mut late = read_all(f.store.as_ref(), 100).unwrap();
    late[7].from = "203.0.113.9:1".into();
    reseal_from(&mut late, 8);
    let report = verify(&late, &from_sink, &f.trusted);
    assert_eq!(report.problems.len(), 1, "{report}");
    assert!(
        matches!(report.problems[0], Problem::Rewritten { seq: 10, .. }),
        "{report}"
    );
}

#[test]
fn bad_signature_and_unknown_key_are_reported() {
    let f = fixture(every(2));
    let entries = append_n(&f.log, 4);
    let mut cps = sink_checkpoints(&f.sink_path);
    assert_eq!(cps.len(), 2);

    // A forged checkpoint: hash changed, signature kept.
    cps[0].hash = entries[0].hash.clone();
    let report = verify(&entries, &cps, &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::CheckpointBadSignature {
            seq: 2,
            key_id: cps[0].key_id.clone()
        }]
    );
    assert!(report.to_string().contains("invalid signature"), "{report}");

    // Signed by a key nobody trusts.
    let stranger = AuditKey::generate().unwrap();
    let foreign = stranger.sign_checkpoint(4, &entries[3].hash, 1);
    let report = verify(&entries, std::slice::from_ref(&foreign), &f.trusted);
    assert_eq!(
        report.problems,
        vec![Problem::CheckpointUnknownKey {
            seq: 4,
            key_id: stranger.key_id().to_string()
        }]
    );
    // Trusting it (e.g. the key before a rotation) makes it count.
    let mut both = f.trusted.clone();
    both.push(stranger.trusted());
    assert!(verify(&entries, &[foreign], &both).ok);

    // A right key id with the wrong public key: the signature fails.
    let wrong = vec![(f.trusted[0].0.clone(), stranger.public_key())];
    let report = verify(&entries, &sink_checkpoints(&f.sink_path), &wrong);
    assert!(
        report
            .problems
            .iter()
            .all(|p| matches!(p, Problem::CheckpointBadSignature { .. })),
        "{report}"
    );
}

#[test]
fn concurrent_appends_on_one_store_never_duplicate_a_seq() {
    let store = Arc::new(MemoryStore::new());
    // Two writers (e.g. two coordinator processes) sharing the store: ordering comes from the CAS alone.
    let keys = [AuditKey::generate().unwrap(), AuditKey::generate().unwrap()];
    let trusted: Vec<TrustedKey> = keys.iter().map(|k| k.trusted()).collect();
    let logs: Vec<Arc<AuditLog>> = keys
        .into_iter()
        .map(|k| Arc::new(AuditLog::new(store.clone(), k, vec![], every(25))))
        .collect();
    let per_thread = 200;
    let handles: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(t, log)| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|i| log.append(record(t as u64 * 1000 + i)).unwrap().seq)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // And two threads on one AuditLog.
    let shared = logs[0].clone();
    let extra = std::thread::spawn(move || {
        (0..50)
            .map(|i| shared.append(record(i)).unwrap().seq)
            .collect::<Vec<_>>()
    });
    let mut seqs: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    seqs.extend(extra.join().unwrap());
    seqs.sort_unstable();
    let total = 2 * per_thread + 50;
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "every seq handed out exactly once"
    );

    let report = verify_store(store.as_ref(), &[], &trusted).unwrap();
    assert!(report.ok, "{report}");
    assert_eq!(report.last_seq, total);
    assert!(report.checkpoints_checked > 0);
}

#[test]
fn sink_file_is_0640_and_every_line_parses() {
    let f = fixture(every(2));
    let entries = append_n(&f.log, 5);
    f.log.checkpoint_now().unwrap().unwrap();
    let mode = std::fs::metadata(&f.sink_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    let text = std::fs::read_to_string(&f.sink_path).unwrap();
    assert!(text.ends_with('\n'));
    let mut kinds = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        kinds.push(v["type"].as_str().unwrap().to_string());
    }
    assert_eq!(
        kinds,
        [
            "entry",
            "entry",
            "checkpoint",
            "entry",
            "entry",
            "checkpoint",
            "entry",
            "checkpoint"
        ]
    );

    let lines = read_sink(&f.sink_path).unwrap();
    let from_sink: Vec<Entry> = lines
        .into_iter()
        .filter_map(|l| match l {
            SinkLine::Entry(e) => Some(e),
            SinkLine::Checkpoint(_) => None,
        })
        .collect();
    assert_eq!(from_sink, entries, "the sink holds a full copy of the chain");
}

#[test]
fn detail_is_stored_verbatim_so_callers_must_never_put_secrets_in_it() {
    // The library does not scrub `detail`: whatever is passed is stored and shipped. Callers record ids,
    // never token values or keys.
    let f = fixture(every(100));
    let detail = json!({"token_id": "tok-42", "looks_like_a_secret": "nbt_0123456789abcdef"});
    let e = f.log.append(record(1).with_detail(detail.clone())).unwrap();
    assert_eq!(e.detail, detail);
    assert_eq!(f.store.head().unwrap().unwrap().detail, detail);
    assert!(
        std::fs::read_to_string(&f.sink_path)
            .unwrap()
            .contains("nbt_0123456789abcdef")
    );
}

#[test]
fn checkpoints_follow_the_entry_count_and_the_timer() {
    let f = fixture(every(3));
    append_n(&f.log, 7);
    let seqs: Vec<u64> = f.store.checkpoints().unwrap().iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![3, 6]);

    let f = fixture(CheckpointPolicy {
        every_entries: None,
        every: Some(Duration::from_secs(60)),
    });
    let t0 = SystemTime::now();
    assert_eq!(f.log.maybe_checkpoint(t0).unwrap(), None, "empty log: nothing to sign");
    append_n(&f.log, 3);
    assert_eq!(
        f.log.maybe_checkpoint(t0).unwrap().unwrap().seq,
        3,
        "first checkpoint is due at once"
    );
    assert_eq!(
        f.log.maybe_checkpoint(t0 + Duration::from_secs(120)).unwrap(),
        None,
        "no new entries"
    );
    f.log.append(record(4)).unwrap();
    assert_eq!(
        f.log.maybe_checkpoint(t0 + Duration::from_secs(10)).unwrap(),
        None,
        "not yet due"
    );
    let cp = f.log.maybe_checkpoint(t0 + Duration::from_secs(61)).unwrap().unwrap();
    assert_eq!(cp.seq, 4);
    assert_eq!(
        sink_checkpoints(&f.sink_path).len(),
        2,
        "timer checkpoints reach the sink"
    );
}

#[test]
fn empty_log_checkpoint_and_verify() {
    let f = fixture(every(1));
    assert_eq!(f.log.checkpoint_now().unwrap(), None);
    let report = verify_store(f.store.as_ref(), &[], &f.trusted).unwrap();
    assert!(report.ok);
    assert_eq!(report.last_seq, 0);
    assert!(report.to_string().contains("none signed yet"), "{report}");
}

#[test]
fn a_failing_sink_never_fails_an_append() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("logs");
    std::fs::create_dir(&sub).unwrap();
    let sink = JsonLinesFile::open(sub.join("audit.jsonl")).unwrap();
    let store = Arc::new(MemoryStore::new());
    let log = AuditLog::new(
        store.clone(),
        AuditKey::generate().unwrap(),
        vec![Box::new(sink)],
        every(1),
    );
    std::fs::remove_dir_all(&sub).unwrap();
    let e = log.append(record(1)).unwrap();
    assert_eq!(e.seq, 1);
    assert_eq!(store.checkpoints().unwrap().len(), 1, "checkpoint still stored");
}

#[test]
fn invalid_records_are_refused_before_anything_is_stored() {
    let f = fixture(every(100));
    let err = f.log.append(record(1).with_detail(json!({"ratio": 0.5}))).unwrap_err();
    assert!(err.to_string().contains("detail.ratio"), "{err}");
    assert!(f.store.head().unwrap().is_none());
}

#[test]
fn a_restarted_log_continues_the_chain_and_the_checkpoint_count() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("audit.key");
    let store = Arc::new(MemoryStore::new());
    let first = AuditLog::new(
        store.clone(),
        AuditKey::load_or_create(&key_path).unwrap(),
        vec![],
        every(4),
    );
    append_n(&first, 5);
    drop(first);
    let second = AuditLog::new(
        store.clone(),
        AuditKey::load_or_create(&key_path).unwrap(),
        vec![],
        every(4),
    );
    append_n(&second, 3);
    let seqs: Vec<u64> = store.checkpoints().unwrap().iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![4, 8]);
    let report = verify_store(store.as_ref(), &[], &[second.key().trusted()]).unwrap();
    assert!(report.ok, "{report}");
    assert_eq!(report.last_seq, 8);
}
