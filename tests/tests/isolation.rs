//! End-to-end: the Fleet gRPC service is reachable through the tunnel only, never from the underlay.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};

use e2e::fleet::FLEET_PORT;
use e2e::topology::{TEST_SUBNET, host_addr};
use e2e::{Fleet, eventually_patiently, require_root};

#[test]
fn fleet_service_is_unreachable_from_the_underlay() {
    if !require_root() {
        return;
    }
    let (mut fleet, _token) = Fleet::with_connected_agents(1);
    let fleet_addr = fleet.fleet_endpoint();

    // Positive control: through the tunnel, the Fleet port accepts connections.
    eventually_patiently(|| fleet.agent_ns(1).tcp_connect(fleet_addr));

    // An intruder on the same bridge, without a tunnel, routing the overlay via the coordinator.
    let coordinator_ip = fleet.coordinator_ip();
    fleet
        .lab_mut()
        .add_host("intruder", host_addr(TEST_SUBNET, 99))
        .unwrap();
    let intruder = fleet.lab().host("intruder").ns();
    intruder
        .ip([
            "route",
            "add",
            "100.96.0.0/16",
            "via",
            &coordinator_ip.to_string(),
        ])
        .unwrap();

    // Control: the intruder does reach the coordinator (its enrollment port is public by design).
    intruder.tcp_connect(fleet.enroll_endpoint()).unwrap();

    let through_route = intruder.tcp_connect(fleet_addr);
    assert!(
        through_route.is_err(),
        "the Fleet service at {fleet_addr} accepted a connection from the underlay (192.0.2.99 via {coordinator_ip}); \
         bind it to the TUN device (SO_BINDTODEVICE) or filter by interface"
    );
    let on_underlay = intruder.tcp_connect(SocketAddr::new(IpAddr::V4(coordinator_ip), FLEET_PORT));
    assert!(
        on_underlay.is_err(),
        "the Fleet port is open on the coordinator's underlay address {coordinator_ip}"
    );

    // The legitimate path still works afterwards.
    fleet.agent_ns(1).tcp_connect(fleet_addr).unwrap();
}
