//! End-to-end: bare-metal enrollment. A token bound to one host's MAC is refused from another host; the right
//! host enrolls but waits in `pending` (no tunnel, no fleet stream) until `nimbusctl node accept`, then connects.
//! Needs root and the binaries.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, require_root};

/// The MAC of `eth0` in agent `i`'s namespace.
fn mac(fleet: &Fleet, i: usize) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", fleet.agent_ns(i).name(), "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "link/ether").unwrap();
    words.next().unwrap().to_string()
}

#[test]
fn a_mac_bound_token_admits_only_its_host_and_only_after_acceptance() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2);
    let host_mac = mac(&fleet, 1);
    // Any common spelling of the MAC; stored normalized, single use, acceptance required.
    let spelled = host_mac.to_ascii_uppercase().replace(':', "-");
    let token = fleet
        .try_create_token_with(&["--ttl", "1h", "--bind-mac", &spelled])
        .unwrap();
    let info = fleet.token(&token.id);
    assert_eq!(info["bind_mac"], host_mac.as_str(), "{info}");
    assert_eq!(
        (info["require_acceptance"].as_bool(), info["uses_total"].as_u64()),
        (Some(true), Some(1))
    );
    assert!(
        fleet
            .try_create_token_with(&["--ttl", "1h", "--uses", "2", "--bind-mac", &spelled])
            .is_err(),
        "a MAC-bound token is single-use"
    );

    // Another host with the token: refused, naming the MAC; the token keeps its use.
    fleet.start_agent(2, Some(&token), &[]);
    let log = fleet.expect_agent_exit(2, 77, "bound to MAC address");
    assert!(log.contains(&host_mac), "{log}");
    assert_eq!(fleet.token(&token.id)["uses_left"], 1);

    // The right host enrolls, but stays pending: no tunnel, no stream.
    fleet.start_agent(1, Some(&token), &[]);
    let name = agent_name(1);
    e2e::eventually_patiently(|| match fleet.node(&name) {
        Some(n) if str_field(&n, "state") == "pending" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        str_field(&fleet.node(&name).unwrap(), "state"),
        "pending",
        "no tunnel before acceptance"
    );
    assert!(fleet.agent(1).is_running(), "the agent waits, it does not give up");
    assert!(fleet.agent(1).log().contains("waiting for an operator to accept"));

    // Accepted: the tunnel comes up and the node connects.
    let out = fleet.ctl(&["node", "accept", &name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fleet.wait_connected(&[name]);
}
