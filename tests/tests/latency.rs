//! End-to-end: agents measure each other on the underlay with authenticated probes, as the coordinator
//! tells them, and `nimbusctl latency` shows the matrix.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use e2e::fleet::{FleetOptions, agent_name};
use e2e::{Fleet, eventually_patiently, require_root};
use serde_json::Value;

#[test]
fn agents_measure_a_full_mesh_and_the_coordinator_shows_it() {
    if !require_root() {
        return;
    }
    let opts = FleetOptions {
        coordinator_args: [
            "--probe-interval",
            "200ms",
            "--probe-window",
            "2s",
            "--probe-key-rotation",
            "4s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..FleetOptions::test(3)
    };
    let mut fleet = Fleet::new(opts).unwrap();
    let token = fleet.create_token("1h", 3);
    for i in 1..=3 {
        fleet.start_agent(i, Some(&token), &[]);
    }
    fleet.wait_connected(&["agent-1", "agent-2", "agent-3"]);

    // First every pair measured at all ...
    eventually_patiently(|| {
        let out = fleet.ctl(&["-o", "json", "latency"]);
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {out:?}"))?;
        let pairs = v["pairs"].as_array().cloned().unwrap_or_default();
        let measured: Vec<Value> = pairs
            .into_iter()
            .filter(|p| p["samples"].as_u64().unwrap_or(0) > 0)
            .collect();
        if measured.len() == 6 {
            Ok(())
        } else {
            Err(format!("{} of 6 pairs measured: {v}", measured.len()))
        }
    });
    // Windows measured after at least two key rotations: the two-step switch loses nothing.
    let rotations = |fleet: &Fleet| fleet.coordinator().log().matches("latency probe key rotated").count();
    eventually_patiently(|| match rotations(&fleet) {
        n if n >= 2 => Ok(()),
        n => Err(format!("{n} key rotations so far")),
    });
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let pairs = eventually_patiently(|| {
        let v = fleet.ctl_json(&["latency"]);
        let fresh: Vec<Value> = v["pairs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["samples"].as_u64().unwrap_or(0) > 0 && p["start_unix_ms"].as_u64().unwrap_or(0) >= since)
            .collect();
        if fresh.len() == 6 {
            Ok(fresh)
        } else {
            Err(format!(
                "{} of 6 pairs with windows after the rotations: {v}",
                fresh.len()
            ))
        }
    });
    for p in &pairs {
        let (from, to) = (p["from"].as_str().unwrap(), p["to"].as_str().unwrap());
        assert_ne!(from, to);
        assert!(
            (1..=3).any(|i| agent_name(i) == from) && (1..=3).any(|i| agent_name(i) == to),
            "{p}"
        );
        let p50 = p["p50_ns"].as_u64().unwrap();
        assert!(
            p50 > 0 && p50 < 50_000_000,
            "a veth/bridge RTT is well under 50 ms: {p}"
        );
        assert!(p["p99_ns"].as_u64().unwrap() >= p50, "{p}");
        assert_eq!(p["lost"], 0, "nothing is lost on a quiet bridge: {p}");
        assert!(!p["timestamping"].as_str().unwrap().is_empty(), "{p}");
    }
    // One bridge, sub-millisecond RTTs: the coordinator infers a single zone for all three.
    let v: Value = serde_json::from_slice(&fleet.ctl(&["-o", "json", "latency"]).stdout).unwrap();
    let zones: Vec<&str> = (1..=3)
        .map(|i| v["zones"][agent_name(i)].as_str().unwrap_or(""))
        .collect();
    assert!(!zones[0].is_empty() && zones.iter().all(|z| *z == zones[0]), "{v}");
    assert_eq!(v["zone_sources"]["agent-1"], "inferred", "{v}");
    let svg = fleet.work_dir().join("latency.svg");
    assert!(
        fleet
            .ctl(&["latency", "--svg", &svg.display().to_string()])
            .status
            .success()
    );
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("agent-3"), "{svg}");

    let text = String::from_utf8_lossy(&fleet.ctl(&["-o", "text", "latency"]).stdout).to_string();
    for i in 1..=3 {
        assert!(text.contains(&agent_name(i)), "{text}");
    }

    // Plan a Galera cluster on the three agents from the measured RTTs: on one quiet bridge a 50 ms commit
    // budget fits everyone.
    let stores = fleet.work_dir().join("stores.yaml");
    std::fs::write(
        &stores,
        "galera:\n  - name: ledger\n    members: [agent-1, agent-2, agent-3]\n    txn_time: 0.2ms\n    commit_budget: 50ms\n    max_dop: 1\n",
    )
    .unwrap();
    let out = fleet.ctl(&[
        "-o",
        "json",
        "plan",
        "replication",
        "-f",
        &stores.display().to_string(),
        "--keep",
    ]);
    assert!(out.status.success(), "{out:?}");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ledger = &plan["stores"][0];
    assert_eq!(ledger["name"], "ledger", "{plan}");
    assert_eq!(ledger["fits_budget"], true, "{plan}");
    let modes: Vec<&str> = ledger["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes.len(), 3, "{plan}");
    assert!(modes.iter().all(|m| m.eq_ignore_ascii_case("synchronous")), "{plan}");
    let helm = fleet.ctl(&["-o", "yaml", "plan", "replication", "-f", &stores.display().to_string()]);
    assert!(
        helm.status.success() && String::from_utf8_lossy(&helm.stdout).contains("ledger"),
        "{helm:?}"
    );

    // The matrix survives a coordinator restart (checkpointed at shutdown and every minute): with every agent
    // stopped, so nothing new can arrive, the restarted coordinator still shows all six pairs.
    for i in 1..=3 {
        fleet.agent(i).terminate().unwrap();
        assert!(fleet.agent(i).wait_exit(e2e::patience()).is_some());
    }
    fleet.coordinator().terminate().unwrap();
    assert_eq!(
        fleet.coordinator().wait_exit(e2e::patience()).and_then(|s| s.code()),
        Some(0)
    );
    fleet.start_coordinator();
    let restored = fleet.ctl_json(&["latency"]);
    let with_samples = restored["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["samples"].as_u64().unwrap_or(0) > 0)
        .count();
    assert_eq!(with_samples, 6, "{restored}");
    assert!(fleet.coordinator().log().contains("latency matrix restored"));

    // A broken file is refused with its position.
    std::fs::write(&stores, "galera:\n  - name: ledger\n    colour: blue\n").unwrap();
    let bad = fleet.ctl(&["plan", "replication", "-f", &stores.display().to_string()]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("line 3") && err.contains("colour"), "{err}");
}
