//! End-to-end: agents enroll over TLS with a join token and the CA pin, and bad enrollments are refused.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::IpAddr;

use e2e::fleet::{OVERLAY_COORDINATOR, agent_name, in_overlay, overlay_ip, str_field};
use e2e::{Fleet, eventually_patiently, patience, require_root};
use serde_json::Value;

/// The node objects of `names`, once each reports an inventory.
fn nodes_with_inventory(fleet: &Fleet, names: &[String]) -> Vec<Value> {
    eventually_patiently(|| {
        let nodes = fleet.try_nodes().map_err(|e| e.to_string())?;
        let mut ours = Vec::new();
        for name in names {
            let node = nodes
                .iter()
                .find(|n| str_field(n, "name") == name)
                .ok_or(format!("{name} not listed"))?;
            let inv = node
                .get("inventory")
                .filter(|v| !v.is_null())
                .ok_or(format!("{name} has no inventory yet"))?;
            let cpus = inv.get("cpus").and_then(Value::as_u64).unwrap_or(0);
            let memory = inv.get("memory_bytes").and_then(Value::as_u64).unwrap_or(0);
            if cpus == 0 || memory == 0 || str_field(inv, "kernel").is_empty() {
                return Err(format!("{name} inventory incomplete: {inv}"));
            }
            ours.push(node.clone());
        }
        Ok(ours)
    })
}

#[test]
fn three_agents_enroll_connect_and_report_inventory() {
    if !require_root() {
        return;
    }
    let (fleet, token) = Fleet::with_connected_agents(3);
    let names: Vec<String> = (1..=3).map(agent_name).collect();
    let nodes = nodes_with_inventory(&fleet, &names);

    let mut ids = HashSet::new();
    let mut ips = HashSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let i = i + 1;
        assert_eq!(str_field(node, "name"), agent_name(i));
        assert_eq!(str_field(node, "state"), "connected", "{node}");
        assert_eq!(str_field(node, "machine_id"), fleet.agent_machine_id(i), "{node}");
        let id = str_field(node, "id");
        assert!(!id.is_empty(), "{node}");
        assert!(ids.insert(id.to_string()), "duplicate id {id}");
        let ip = overlay_ip(node).unwrap();
        assert!(
            in_overlay(ip) && ip != OVERLAY_COORDINATOR,
            "{ip} must be an agent address in 100.96.0.0/16"
        );
        assert!(ips.insert(ip), "duplicate overlay IP {ip}");
        assert!(fleet.agent_has_identity(i), "agent-{i} stored its identity");
    }
    assert_eq!(fleet.nodes().len(), 3, "no other nodes");
    assert_eq!(
        fleet.token(&token.id)["uses_left"],
        0,
        "three enrollments used the three uses"
    );

    // The tunnel carries traffic: each agent reaches the coordinator's overlay address.
    for i in 1..=3 {
        eventually_patiently(|| fleet.agent_ns(i).ping(IpAddr::V4(OVERLAY_COORDINATOR)));
    }
}

#[test]
fn an_expired_token_is_refused() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1s", 1);
    std::thread::sleep(std::time::Duration::from_secs(2));
    fleet.start_agent(1, Some(&token), &[]);
    fleet.expect_agent_exit(1, 77, "expired");
    assert!(
        !fleet.agent_has_identity(1),
        "a refused agent must not write an identity"
    );
    assert!(fleet.nodes().is_empty());
}

#[test]
fn a_used_up_token_is_refused() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2);
    let token = fleet.create_token("1h", 1);
    fleet.start_agent(1, Some(&token), &[]);
    fleet.wait_connected(&["agent-1"]);
    fleet.start_agent(2, Some(&token), &[]);
    fleet.expect_agent_exit(2, 77, "no uses left");
    assert!(!fleet.agent_has_identity(2));
    assert!(fleet.agent(1).is_running(), "the first agent is unaffected");
    let nodes = fleet.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(fleet.token(&token.id)["uses_left"], 0);
}

#[test]
fn a_malformed_token_is_a_usage_error() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 1).with_token("nimbus1.zz");
    fleet.start_agent(1, Some(&token), &[]);
    fleet.expect_agent_exit(1, 64, "malformed join token");
    assert!(!fleet.agent_has_identity(1));
    assert!(fleet.nodes().is_empty());
}

#[test]
fn a_wrong_ca_pin_is_refused() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 1);
    let wrong = ["00", "11"]
        .iter()
        .map(|b| format!("sha256:{}", b.repeat(32)))
        .find(|pin| !pin.eq_ignore_ascii_case(&token.ca_pin))
        .unwrap();
    fleet.start_agent(1, Some(&token.with_pin(&wrong)), &[]);
    fleet.expect_agent_exit(1, 77, "does not match the pin");
    assert!(!fleet.agent_has_identity(1));
    assert!(fleet.nodes().is_empty());
    assert_eq!(
        fleet.token(&token.id)["uses_left"],
        1,
        "a refused handshake does not consume a use"
    );
}

#[test]
fn an_unreachable_coordinator_is_reported_with_exit_69() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 1);
    fleet.coordinator().kill9().unwrap();
    fleet.coordinator().wait_exit(patience());
    fleet.start_agent(1, Some(&token), &[]);
    fleet.expect_agent_exit(1, 69, "cannot reach the coordinator");
    assert!(!fleet.agent_has_identity(1));
}

#[test]
fn a_revoked_token_is_refused_and_listed_as_revoked() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 3);
    let out = fleet.ctl(&["token", "revoke", &token.id]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fleet.token(&token.id)["revoked"], true);
    let listed = String::from_utf8_lossy(&fleet.ctl(&["-o", "text", "token", "list"]).stdout).to_string();
    assert!(listed.contains("revoked"), "{listed}");
    fleet.start_agent(1, Some(&token), &[]);
    fleet.expect_agent_exit(1, 77, "revoked");
    assert!(!fleet.agent_has_identity(1));
    assert!(fleet.nodes().is_empty());
}
