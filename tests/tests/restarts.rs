//! End-to-end: crashes and restarts keep identities; nobody re-enrolls.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use e2e::fleet::{OVERLAY_COORDINATOR, agent_name, overlay_ip, str_field};
use e2e::state::now_unix;
use e2e::{Fleet, eventually_patiently, require_root};
use serde_json::Value;

/// name -> (id, overlay IP)
fn identities(nodes: &[Value]) -> BTreeMap<String, (String, Ipv4Addr)> {
    nodes
        .iter()
        .map(|n| {
            (
                str_field(n, "name").to_string(),
                (str_field(n, "id").to_string(), overlay_ip(n).unwrap()),
            )
        })
        .collect()
}

/// Waits until `names` are connected *and* were seen at or after `since` (not stale state from disk),
/// and their tunnels carry traffic.
fn wait_reconnected(fleet: &Fleet, indices: &[usize], since: u64) -> Vec<Value> {
    let names: Vec<String> = indices.iter().map(|i| agent_name(*i)).collect();
    let nodes = eventually_patiently(|| {
        let nodes = fleet.try_nodes().map_err(|e| e.to_string())?;
        let mut ours = Vec::new();
        for name in &names {
            let n = nodes
                .iter()
                .find(|n| str_field(n, "name") == name)
                .ok_or(format!("{name} not listed"))?;
            let seen = n.get("last_seen_unix").and_then(Value::as_u64).unwrap_or(0);
            if str_field(n, "state") != "connected" || seen < since {
                return Err(format!(
                    "{name}: state {:?}, last_seen_unix {seen} (< {since}?)",
                    str_field(n, "state")
                ));
            }
            ours.push(n.clone());
        }
        Ok(ours)
    });
    for i in indices {
        eventually_patiently(|| fleet.agent_ns(*i).ping(IpAddr::V4(OVERLAY_COORDINATOR)));
    }
    nodes
}

#[test]
fn coordinator_kill9_and_restart_keeps_every_node() {
    if !require_root() {
        return;
    }
    let (mut fleet, token) = Fleet::with_connected_agents(3);
    let before = identities(&fleet.nodes());
    assert_eq!(before.len(), 3);
    let agent_pids: Vec<u32> = (1..=3).map(|i| fleet.agent(i).pid()).collect();

    fleet.coordinator().kill9().unwrap();
    let status = fleet
        .coordinator()
        .wait_exit(Duration::from_secs(10))
        .expect("SIGKILL ends the coordinator");
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    let restarted_at = now_unix();
    fleet.start_coordinator();
    let after = identities(&wait_reconnected(&fleet, &[1, 2, 3], restarted_at));
    assert_eq!(after, before, "same ids and overlay IPs after the restart");
    assert_eq!(fleet.nodes().len(), 3, "no duplicate nodes");
    assert_eq!(fleet.token(&token.id)["uses_left"], 0, "nobody re-enrolled");
    for (i, pid) in (1..=3).zip(agent_pids) {
        assert!(
            fleet.agent(i).is_running() && fleet.agent(i).pid() == pid,
            "agent-{i} rode out the crash"
        );
    }
}

#[test]
fn agent_restart_reuses_its_identity() {
    if !require_root() {
        return;
    }
    let (mut fleet, token) = Fleet::with_connected_agents(1);
    let before = identities(&fleet.nodes());

    fleet.agent(1).terminate().unwrap();
    let status = fleet
        .agent(1)
        .wait_exit(e2e::patience())
        .expect("agent-1 exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");
    assert!(fleet.agent_has_identity(1), "the identity survives in the state dir");

    let restarted_at = now_unix();
    fleet.start_agent(1, None, &[]);
    let after = identities(&wait_reconnected(&fleet, &[1], restarted_at));
    assert_eq!(after, before, "same id and overlay IP without a token");
    assert_eq!(fleet.nodes().len(), 1);
    assert_eq!(fleet.token(&token.id)["uses_left"], 0, "no second enrollment");
    assert!(fleet.agent(1).is_running());
}

#[test]
fn a_reinstalled_agent_with_a_new_token_gets_a_new_identity() {
    if !require_root() {
        return;
    }
    let (mut fleet, _token) = Fleet::with_connected_agents(1);
    let before = identities(&fleet.nodes())["agent-1"].clone();
    fleet.agent(1).terminate().unwrap();
    assert_eq!(
        fleet.agent(1).wait_exit(e2e::patience()).and_then(|s| s.code()),
        Some(0)
    );

    // Re-install: the state directory (identity and WireGuard key) is gone.
    std::fs::remove_dir_all(fleet.agent_state_dir(1)).unwrap();
    let fresh = fleet.create_token("1h", 1);
    fleet.start_agent(1, Some(&fresh), &[]);
    let since = now_unix();
    let nodes = eventually_patiently(|| {
        let nodes = fleet.try_nodes().map_err(|e| e.to_string())?;
        let connected: Vec<Value> = nodes
            .iter()
            .filter(|n| str_field(n, "state") == "connected")
            .cloned()
            .collect();
        // The old session may still read "connected" for a moment after the
        // old agent exited; wait for the new identity, not for any connection.
        if connected.len() == 1 && str_field(&connected[0], "id") != before.0 {
            Ok(nodes)
        } else {
            Err(format!("waiting for the re-installed agent: {nodes:?}"))
        }
    });
    assert_eq!(
        nodes.len(),
        2,
        "the old identity stays listed (lost), the new one is added: {nodes:?}"
    );
    let new = nodes.iter().find(|n| str_field(n, "state") == "connected").unwrap();
    assert_ne!(str_field(new, "id"), before.0, "a new node id");
    assert_ne!(overlay_ip(new).unwrap(), before.1, "a new overlay IP");
    assert_ne!(str_field(new, "name"), "agent-1", "the name stays unique: {new}");
    assert!(new.get("enrolled_at_unix").and_then(Value::as_u64).unwrap_or(0) + 5 >= since);
    assert_eq!(fleet.token(&fresh.id)["uses_left"], 0);
}
