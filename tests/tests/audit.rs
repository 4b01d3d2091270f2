//! End-to-end: the audit log records state-changing admin calls (who = uid:0 on the local socket, the
//! result, never a token secret), `nimbusctl audit verify` passes, then fails after one entry is edited in
//! the store, and — against the audit sink file — after the tail is truncated.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use coordinator::store::{SledStore, Store, Txn};
use e2e::{Fleet, FleetOptions, require_root};
use serde_json::Value;

fn entry_key(seq: u64) -> String {
    format!("audit/entry/{seq:020}")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(fleet: &Fleet, args: &[&str]) -> Output {
    let out = fleet.ctl(args);
    assert!(out.status.success(), "nimbusctl {args:?}: {}", text(&out));
    out
}

/// `nimbusctl -o json audit`: one entry per line.
fn audit_entries(fleet: &Fleet) -> Vec<Value> {
    let out = ok(fleet, &["-o", "json", "audit"]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?} is not JSON: {e}")))
        .collect()
}

fn stop_coordinator(fleet: &Fleet) {
    fleet.coordinator().terminate().unwrap();
    let status = fleet.coordinator().wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the coordinator stops cleanly on SIGTERM"
    );
}

/// Opens the stopped coordinator's store with the coordinator's own code.
fn open_store(fleet: &Fleet) -> Arc<dyn Store> {
    Arc::new(SledStore::open(&fleet.coordinator_data_dir().join("state")).unwrap())
}

fn head(store: &dyn Store) -> u64 {
    let raw = store.get(b"audit/head").unwrap().expect("an audit head");
    String::from_utf8(raw).unwrap().parse().unwrap()
}

fn find<'a>(entries: &'a [Value], action: &str, target: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["action"] == action && e["target"] == target)
        .unwrap_or_else(|| panic!("no {action} of {target} in {entries:#?}"))
}

#[test]
fn audit_records_calls_verifies_and_detects_edits_and_truncation() {
    if !require_root() {
        return;
    }
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = sink_dir.path().join("audit.jsonl");
    let opts = FleetOptions {
        coordinator_args: vec![
            "--audit-file".into(),
            sink.display().to_string(),
            "--audit-checkpoint-entries".into(),
            "3".into(),
        ],
        ..FleetOptions::test(1)
    };
    let mut fleet = Fleet::new(opts).unwrap();

    // State-changing calls: tokens created and revoked, a refused revoke, an enrolled node revoked.
    let token = fleet.create_token("1h", 1);
    fleet.start_agent(1, Some(&token), &[]);
    fleet.wait_connected(&["agent-1"]);
    let spare = fleet.create_token("30m", 2);
    ok(&fleet, &["token", "revoke", &spare.id]);
    let refused = fleet.ctl(&["token", "revoke", "nosuchtokn"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    ok(&fleet, &["node", "revoke", "agent-1", "--reason", "audit e2e"]);
    fleet.expect_agent_exit(1, 10, "revoked");

    let entries = audit_entries(&fleet);
    let raw = serde_json::to_string(&entries).unwrap();
    assert!(
        !raw.contains(&token.token) && !raw.contains(&spare.token),
        "a token secret in the audit log: {raw}"
    );
    for e in &entries {
        if e["who"]["kind"] == "uid" {
            assert_eq!(e["who"]["subject"], "0", "{e}");
            assert_eq!(e["from"], "unix", "{e}");
        }
    }
    let created = find(&entries, "token.create", &format!("token/{}", spare.id));
    assert_eq!(created["result"]["status"], "ok");
    assert_eq!(created["who"]["kind"], "uid");
    assert_eq!(created["detail"]["uses"], 2);
    assert_eq!(created["detail"]["ttl_secs"], 1800);
    find(&entries, "token.create", &format!("token/{}", token.id));
    assert_eq!(
        find(&entries, "token.revoke", &format!("token/{}", spare.id))["result"]["status"],
        "ok"
    );
    let bad = find(&entries, "token.revoke", "token/nosuchtokn");
    assert_eq!(bad["result"]["status"], "refused", "{bad}");
    assert!(!bad["result"]["reason"].as_str().unwrap_or("").is_empty(), "{bad}");
    let revoked = find(&entries, "node.revoke", "node/agent-1");
    assert_eq!(revoked["result"]["status"], "ok");
    assert_eq!(revoked["detail"]["reason"], "audit e2e");
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seqs 1..=N");
    assert!(seqs.len() >= 5, "{entries:#?}");

    // The table names the same things.
    let table = String::from_utf8(ok(&fleet, &["audit", "--since", "1h"]).stdout).unwrap();
    for want in ["SEQ", "WHO", "uid:0", "token.create", "node.revoke", "refused:"] {
        assert!(table.contains(want), "{want} missing from:\n{table}");
    }

    let verified = ok(&fleet, &["audit", "verify", "--against", sink.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("audit log OK"),
        "{}",
        text(&verified)
    );

    // A clean stop signs a checkpoint of the last entry, in the store and in the sink.
    stop_coordinator(&fleet);
    let store = open_store(&fleet);
    let last = head(store.as_ref());
    assert_eq!(last, seqs.len() as u64);
    let sink_text = std::fs::read_to_string(&sink).unwrap();
    assert!(
        sink_text.contains(&format!("\"seq\":{last}")) && sink_text.contains("checkpoint"),
        "the sink holds the entries and the final checkpoint:\n{sink_text}"
    );
    assert!(
        !sink_text.contains(&token.token) && !sink_text.contains(&spare.token),
        "a token secret in the audit sink"
    );

    // 1. Edit entry 2 in place (its hash no longer matches): verify names it.
    let key = entry_key(2);
    let original = store.get(key.as_bytes()).unwrap().unwrap();
    let mut edited: Value = serde_json::from_slice(&original).unwrap();
    edited["target"] = "token/forged".into();
    assert!(
        store
            .txn(Txn::new().put(key.clone(), serde_json::to_vec(&edited).unwrap()))
            .unwrap()
    );
    drop(store);
    fleet.start_coordinator();
    let out = fleet.ctl(&["audit", "verify"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("entry 2 was edited"), "{said}");

    // 2. Restore it, then truncate the tail: delete the last two entries and every stored checkpoint past
    //    the new head, rewind the head. The store alone looks consistent; the sink's checkpoints do not.
    stop_coordinator(&fleet);
    let store = open_store(&fleet);
    let mut txn = Txn::new().put(key, original).put("audit/head", (last - 2).to_string());
    txn = txn.delete(entry_key(last)).delete(entry_key(last - 1));
    for (k, _) in store.scan_prefix(b"audit/checkpoint/").unwrap() {
        let seq: u64 = String::from_utf8_lossy(&k)
            .trim_start_matches("audit/checkpoint/")
            .parse()
            .unwrap();
        if seq > last - 2 {
            txn = txn.delete(k);
        }
    }
    assert!(store.txn(txn).unwrap());
    drop(store);
    fleet.start_coordinator();
    let inside = fleet.ctl(&["audit", "verify"]);
    assert!(
        inside.status.success(),
        "without the sink a clean truncation is not visible: {}",
        text(&inside)
    );
    let out = fleet.ctl(&["audit", "verify", "--against", sink.to_str().unwrap()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("truncated after seq {}", last - 2)), "{said}");

    // -o json carries the same verdict.
    let out = fleet.ctl(&["-o", "json", "audit", "verify", "--against", sink.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "truncated"),
        "{v}"
    );
    assert!(Path::new(&sink).exists());
}
