//! End-to-end: key rotation with connected agents.
//! - The coordinator's WireGuard key: connected agents learn the new key over their stream and move to it
//!   without losing the stream; the old key is retired; an agent restarted afterwards comes back on the new one.
//! - The enrollment TLS certificate (same CA, tokens keep working) and the CA itself (both pins accepted during
//!   the overlap, new tokens carry the new pin, the old pin refused once it ends).
//!
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, eventually_patiently, require_root};
use serde_json::Value;

/// How many times the coordinator logged a fleet stream opening.
fn streams_opened(fleet: &Fleet) -> usize {
    fleet.coordinator().log().matches("agent connected").count()
}

fn last_seen(fleet: &Fleet, name: &str) -> u64 {
    fleet.node(name).unwrap()["last_seen_unix"].as_u64().unwrap_or(0)
}

fn coordinator_key_of_agent(fleet: &Fleet, i: usize) -> String {
    let id: Value =
        serde_json::from_slice(&std::fs::read(fleet.agent_state_dir(i).join("identity.json")).unwrap()).unwrap();
    str_field(&id, "coordinator_public_key").to_string()
}

#[test]
fn wireguard_key_rotation_keeps_agent_streams() {
    if !require_root() {
        return;
    }
    let (mut fleet, _token) = Fleet::with_connected_agents(2);
    let names = [agent_name(1), agent_name(2)];
    let opened = streams_opened(&fleet);
    let old = coordinator_key_of_agent(&fleet, 1);

    let r = fleet.ctl_json(&["key", "rotate", "wireguard", "--overlap", "10m"]);
    assert_eq!(r["state"], "overlap", "{r}");
    assert_eq!(r["old_key"], old.as_str(), "{r}");
    assert_eq!(r["agents_notified"], 2, "{r}");
    let new = r["new_key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    // A second start during the overlap is refused with what to do.
    let again = fleet.try_ctl(&["key", "rotate", "wireguard"]).unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // Both agents record the new key and keep talking to the coordinator on it.
    for i in 1..=2 {
        eventually_patiently(|| {
            let k = coordinator_key_of_agent(&fleet, i);
            if k == new {
                Ok(())
            } else {
                Err(format!("{} still has {k}", agent_name(i)))
            }
        });
    }
    let r = fleet.ctl_json(&["key", "rotate", "wireguard", "--finish"]);
    assert_eq!(
        (r["state"].as_str(), r["new_key"].as_str()),
        (Some("done"), Some(new.as_str())),
        "{r}"
    );
    assert!(!fleet.coordinator_data_dir().join("wg.key.next").exists());

    // After the old key is gone, heartbeats still arrive over the same streams (no reconnect needed).
    let before: Vec<u64> = names.iter().map(|n| last_seen(&fleet, n)).collect();
    eventually_patiently(|| {
        for (n, b) in names.iter().zip(&before) {
            let node = fleet.node(n).unwrap();
            if str_field(&node, "state") != "connected" || last_seen(&fleet, n) <= *b {
                return Err(format!("{n}: {node}"));
            }
        }
        Ok(())
    });
    assert!(
        streams_opened(&fleet) <= opened + names.len(),
        "streams were lost more than once each during the rotation:\n{}",
        fleet.coordinator().log()
    );

    // A restarted agent comes back on the new key (the old one is no longer answered).
    fleet.agent(1).stop(Duration::from_secs(10));
    fleet.start_agent(1, None, &[]);
    fleet.wait_connected(&[agent_name(1)]);
    // Audited: the start, the refused second start, the finish (JSON lines, one entry each).
    let out = fleet.ctl(&["-o", "json", "audit"]);
    let entries: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["action"] == "key.rotate")
        .collect();
    let results: Vec<&str> = entries
        .iter()
        .map(|e| e["result"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(results, ["ok", "refused", "ok"], "{entries:?}");
}

#[test]
fn enrollment_certificate_and_ca_rotate_under_their_pins() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(3);
    let old_token = fleet.create_token("1h", 3);

    let r = fleet.ctl_json(&["key", "rotate", "enrollment-cert"]);
    assert_eq!(r["state"], "done", "{r}");
    assert_ne!(r["new_key"], r["old_key"], "a new leaf: {r}");
    fleet.start_agent(1, Some(&old_token), &[]);
    fleet.wait_connected(&[agent_name(1)]);

    let r = fleet.ctl_json(&["key", "rotate", "ca", "--overlap", "1h"]);
    assert_eq!(r["state"], "overlap", "{r}");
    assert_eq!(r["old_key"], old_token.ca_pin.as_str(), "{r}");
    let new_pin = r["new_key"].as_str().unwrap().to_string();
    assert_ne!(new_pin, old_token.ca_pin);
    let new_token = fleet.create_token("1h", 2);
    assert_eq!(new_token.ca_pin, new_pin, "new tokens carry the new pin");
    // During the overlap the old pin still enrolls.
    fleet.start_agent(2, Some(&old_token), &[]);
    fleet.wait_connected(&[agent_name(2)]);

    let r = fleet.ctl_json(&["key", "rotate", "ca", "--finish"]);
    assert_eq!(r["state"], "done", "{r}");
    // The old pin is refused now; the new one enrolls.
    fleet.start_agent(3, Some(&old_token), &[]);
    fleet.expect_agent_exit(3, 77, "does not match the pin");
    fleet.start_agent(3, Some(&new_token), &[]);
    fleet.wait_connected(&[agent_name(3)]);
    // Enrolled agents never depended on the enrollment certificate: still connected.
    for i in 1..=2 {
        assert_eq!(str_field(&fleet.node(&agent_name(i)).unwrap(), "state"), "connected");
    }
}
