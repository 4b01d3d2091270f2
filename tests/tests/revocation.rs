//! End-to-end: revoking a node stops its agent (exit 10), online or when it comes back.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use e2e::fleet::OVERLAY_COORDINATOR;
use e2e::{Fleet, eventually_patiently, require_root};

#[test]
fn revoking_a_connected_node_stops_only_that_agent() {
    if !require_root() {
        return;
    }
    let (fleet, _token) = Fleet::with_connected_agents(3);
    let out = fleet.ctl(&["node", "revoke", "agent-2", "--reason", "e2e test"]);
    assert!(
        out.status.success(),
        "node revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    fleet.expect_agent_exit(2, 10, "revoked");
    fleet.wait_node_state("agent-2", "revoked");
    let show = fleet.ctl_json(&["node", "show", "agent-2"]);
    assert_eq!(show["state"], "revoked", "{show}");

    fleet.wait_connected(&["agent-1", "agent-3"]);
    for i in [1, 3] {
        assert!(fleet.agent(i).is_running(), "agent-{i} must keep running");
        eventually_patiently(|| fleet.agent_ns(i).ping(IpAddr::V4(OVERLAY_COORDINATOR)));
    }
}

#[test]
fn a_node_revoked_while_offline_exits_when_it_returns() {
    if !require_root() {
        return;
    }
    let (mut fleet, _token) = Fleet::with_connected_agents(1);
    fleet.agent(1).terminate().unwrap();
    let status = fleet
        .agent(1)
        .wait_exit(e2e::patience())
        .expect("agent-1 exits on SIGTERM");
    assert_eq!(status.code(), Some(0));

    let out = fleet.ctl(&["node", "revoke", "agent-1"]);
    assert!(
        out.status.success(),
        "node revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_node_state("agent-1", "revoked");

    fleet.start_agent(1, None, &["--revocation-check-after", "3s"]);
    fleet.expect_agent_exit(1, 10, "revoked");
}
