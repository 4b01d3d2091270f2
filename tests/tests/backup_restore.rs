//! End-to-end: an encrypted backup of a coordinator (its sled store and the secret files of its data dir)
//! restored into an empty data dir brings every node back — the agents reconnect on their own, with the same
//! ids — and a tampered backup is refused before anything is written.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, expect_success, require_root, run_with_timeout};

fn coordinator_cmd(fleet: &Fleet, sub: &[&str], data_dir: &Path) -> std::process::Output {
    let mut cmd = Command::new(&fleet.bins().coordinator);
    cmd.args(sub).args(fleet.coordinator_args(data_dir));
    run_with_timeout(&mut cmd, Duration::from_secs(120)).unwrap()
}

fn ids(nodes: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| str_field(n, "id").to_string()).collect();
    v.sort();
    v
}

#[test]
fn a_restored_backup_brings_every_node_back() {
    if !require_root() {
        return;
    }
    let (mut fleet, _token) = Fleet::with_connected_agents(2);
    let names = [agent_name(1), agent_name(2)];
    let before = ids(&fleet.nodes());
    let work = tempfile::tempdir().unwrap();
    let kek = work.path().join("kek");
    let backup = work.path().join("nimbus.bak");
    let data_dir = fleet.coordinator_data_dir();

    expect_success(
        &run_with_timeout(
            Command::new(&fleet.bins().coordinator)
                .args(["kek", "generate"])
                .arg(&kek),
            Duration::from_secs(30),
        )
        .unwrap(),
    );
    let kek_arg = format!("--kek-file={}", kek.display());
    let to = format!("--to={}", backup.display());
    // sled allows one process: a backup while the coordinator runs is refused with what to do.
    let out = coordinator_cmd(&fleet, &["backup", &to, &kek_arg], &data_dir);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop the coordinator"),
        "{out:?}"
    );
    fleet.coordinator().stop(Duration::from_secs(10));
    expect_success(&coordinator_cmd(&fleet, &["backup", &to, &kek_arg], &data_dir));

    // The host is lost: a fresh data dir, restored from the backup.
    std::fs::rename(&data_dir, data_dir.with_extension("lost")).unwrap();
    let from = format!("--from={}", backup.display());
    // A tampered copy is refused (exit 65) and writes nothing.
    let tampered = work.path().join("tampered.bak");
    let mut bytes = std::fs::read(&backup).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x01;
    std::fs::write(&tampered, bytes).unwrap();
    let out = coordinator_cmd(
        &fleet,
        &["restore", &format!("--from={}", tampered.display()), &kek_arg],
        &data_dir,
    );
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(
        !data_dir.join("wg.key").exists(),
        "nothing restored from a tampered backup"
    );
    let out = coordinator_cmd(&fleet, &["restore", &from, &kek_arg], &data_dir);
    expect_success(&out);

    fleet.start_coordinator();
    let after = fleet.wait_connected(&names);
    assert_eq!(before, ids(&after), "the same nodes, reconnected");
    // Restoring again into the now populated store is refused.
    fleet.coordinator().stop(Duration::from_secs(10));
    let out = coordinator_cmd(&fleet, &["restore", &from, &kek_arg], &data_dir);
    assert!(!out.status.success(), "{out:?}");
}
