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
        .ip(["route", "add", "100.96.0.0/16", "via", &coordinator_ip.to_string()])
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

/// A Hello over agent-1's tunnel that claims to be agent-2 is refused and logged: the coordinator knows
/// the node from the WireGuard peer (overlay source address), never from what the message says.
#[test]
fn a_stream_claiming_another_nodes_id_is_refused() {
    use nimbus_proto::agent_message::Msg;
    use nimbus_proto::fleet_client::FleetClient;
    use nimbus_proto::{AgentMessage, Hello};

    if !require_root() {
        return;
    }
    let (fleet, _token) = Fleet::with_connected_agents(2);
    let id_of = |name: &str| e2e::fleet::str_field(&fleet.node(name).expect("node listed"), "id").to_string();
    let (id1, id2) = (id_of("agent-1"), id_of("agent-2"));
    let target = format!("http://{}", fleet.fleet_endpoint());

    let claim = |claimed: String| {
        let target = target.clone();
        fleet
            .agent_ns(1)
            .block_on(move || async move {
                let mut client = FleetClient::connect(target).await.map_err(|e| e.to_string())?;
                let hello = AgentMessage {
                    msg: Some(Msg::Hello(Hello {
                        node_id: claimed,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    })),
                };
                // Keep the request stream open so only the coordinator's verdict ends the call.
                let outbound = tokio_stream::StreamExt::chain(tokio_stream::iter(vec![hello]), tokio_stream::pending());
                match client.channel(outbound).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(status),
                }
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            })
            .unwrap()
    };

    let refused = claim(id2.clone()).expect_err("a Hello naming agent-2 through agent-1's tunnel must be refused");
    assert!(refused.starts_with("PermissionDenied"), "{refused}");
    let log = fleet.coordinator().log();
    assert!(
        log.contains("claims another node's id") && log.contains(&id2),
        "the refusal is logged with the claimed id:\n{log}"
    );
    // The same tunnel with its own id is accepted (the check is not a blanket refusal).
    claim(id1).expect("agent-1's own id through its own tunnel is accepted");
    eventually_patiently(|| {
        let state = e2e::fleet::str_field(&fleet.node("agent-2").expect("agent-2 listed"), "state").to_string();
        if state == "connected" {
            Ok(())
        } else {
            Err(format!("agent-2 is {state}"))
        }
    });
}
