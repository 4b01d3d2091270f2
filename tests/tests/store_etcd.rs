//! End-to-end: a coordinator that keeps its state in a real etcd (Debian's etcd-server, on the coordinator
//! host's loopback), its secrets sealed with a key-encryption key file. Agents enroll and connect; nothing is
//! written to a sled store; a restarted coordinator finds every node again and the agents reconnect; a
//! restarted etcd is waited out. (Several coordinators on one prefix are replicas: tests/replicas.rs.)
//! Needs root, etcd-server and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::etcd::Etcd;
use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, FleetOptions, eventually_patiently, require_root};

#[test]
fn coordinator_state_lives_in_etcd_and_survives_restarts() {
    if !require_root() || !Etcd::available() {
        return;
    }
    let opts = FleetOptions {
        start_coordinator: false,
        coordinator_args: [
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--etcd-plaintext",
            "true",
            "--etcd-prefix",
            "e2e/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..FleetOptions::test(2)
    };
    let mut fleet = Fleet::new(opts).unwrap();
    let mut etcd = Etcd::start(fleet.coordinator_ns(), &fleet.work_dir().join("etcd")).unwrap();
    // On etcd the coordinator seals the CA and its WireGuard key into the store: it needs a KEK.
    let kek = fleet.generate_kek().unwrap();
    fleet.extend_coordinator_args(["--kek-file".to_string(), kek.display().to_string()]);
    fleet.start_coordinator();
    let token = fleet.create_token("1h", 2);
    for i in 1..=2 {
        fleet.start_agent(i, Some(&token), &[]);
    }
    let names = [agent_name(1), agent_name(2)];
    let before = fleet.wait_connected(&names);
    assert!(
        !fleet.coordinator_data_dir().join("state").exists(),
        "with etcd configured no sled store is created"
    );
    let ids = |nodes: &[serde_json::Value]| {
        let mut v: Vec<String> = nodes.iter().map(|n| str_field(n, "id").to_string()).collect();
        v.sort();
        v
    };

    // A restarted coordinator reads the fleet back from etcd; the agents reconnect with the same ids.
    fleet.coordinator().stop(Duration::from_secs(10));
    fleet.start_coordinator();
    let after = fleet.wait_connected(&names);
    assert_eq!(ids(&before), ids(&after));

    // etcd goes away and comes back: the coordinator answers again without a restart of its own.
    etcd.restart(Some(fleet.coordinator_ns())).unwrap();
    eventually_patiently(|| {
        let nodes = fleet.try_nodes().map_err(|e| e.to_string())?;
        if ids(&nodes) == ids(&before) {
            Ok(())
        } else {
            Err(format!("{nodes:?}"))
        }
    });
    let t = fleet.create_token("1h", 1);
    assert!(
        t.token.starts_with("nimbus1."),
        "writes work again after etcd restarted"
    );
    assert!(fleet.coordinator().is_running());
}
