//! Key rotation with real handshakes: a coordinator-shaped `Router` and agent-shaped
//! `Router`s, each behind a real UDP socket on 127.0.0.1 (no TUN, no privileges).
//!
//! The coordinator starts a rotation, one agent moves to the new key while traffic flows,
//! another never moves and keeps working during the overlap; after the rotation is finished
//! the old key no longer gets a handshake.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{Driven, PATIENCE, ipv4_udp, parse_ipv4_udp};
use tunnel::keys::generate_secret;
use tunnel::{LocalKey, PeerConfig, PublicKey, Router};

const C_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const A1_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const A2_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);

/// Polls `cond` until it holds, or fails the test after [`PATIENCE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Nothing reaches `node`'s TUN within `wait`.
async fn nothing_arrives(node: &mut Driven, wait: Duration) {
    if let Ok(Some(p)) = tokio::time::timeout(wait, node.tun_rx.recv()).await {
        panic!("unexpected packet reached the TUN: {:?}", parse_ipv4_udp(&p));
    }
}

fn agent_peer(coordinator: PublicKey, endpoint: std::net::SocketAddr) -> PeerConfig {
    PeerConfig {
        public_key: coordinator,
        endpoint: Some(endpoint),
        allowed_ips: vec!["10.99.0.1/32".parse().unwrap()],
        persistent_keepalive: Some(25),
    }
}

fn coordinator_peer(agent: PublicKey, ip: Ipv4Addr) -> PeerConfig {
    PeerConfig {
        public_key: agent,
        endpoint: None,
        allowed_ips: vec![format!("{ip}/32").parse().unwrap()],
        persistent_keepalive: None,
    }
}

/// One packet each way between the coordinator and an agent, checked byte for byte.
async fn round_trip(c: &mut Driven, agent: &mut Driven, agent_ip: Ipv4Addr, tag: &str) {
    let up = ipv4_udp(agent_ip, 40000, C_IP, 7, format!("up {tag}").as_bytes());
    agent.inject_tun(&up).await;
    assert_eq!(c.next_tun(|_| true).await, up, "{tag}: agent → coordinator");
    let down = ipv4_udp(C_IP, 7, agent_ip, 40000, format!("down {tag}").as_bytes());
    c.inject_tun(&down).await;
    assert_eq!(agent.next_tun(|_| true).await, down, "{tag}: coordinator → agent");
}

fn local_key_of(c: &Driven, agent: &PublicKey) -> Option<LocalKey> {
    c.router.lock().unwrap().peer_stats(agent).unwrap().local_key
}

#[tokio::test]
async fn rotation_with_overlap_over_loopback_udp() {
    let coordinator = Router::new(generate_secret());
    let old_key = coordinator.public_key();
    let a1 = Router::new(generate_secret());
    let a2 = Router::new(generate_secret());
    let (a1_key, a2_key) = (a1.public_key(), a2.public_key());
    let mut c = Driven::start(coordinator).await;
    let mut a1 = Driven::start(a1).await;
    let mut a2 = Driven::start(a2).await;
    {
        let mut r = c.router.lock().unwrap();
        r.add_peer(coordinator_peer(a1_key, A1_IP)).unwrap();
        r.add_peer(coordinator_peer(a2_key, A2_IP)).unwrap();
    }
    a1.router
        .lock()
        .unwrap()
        .add_peer(agent_peer(old_key, c.addr()))
        .unwrap();
    a2.router
        .lock()
        .unwrap()
        .add_peer(agent_peer(old_key, c.addr()))
        .unwrap();

    round_trip(&mut c, &mut a1, A1_IP, "a1 before").await;
    round_trip(&mut c, &mut a2, A2_IP, "a2 before").await;
    assert_eq!(local_key_of(&c, &a1_key), Some(LocalKey::Current));

    // Start: both agents' sessions are now on the previous key, and keep working.
    let new_key = c.router.lock().unwrap().start_key_rotation(generate_secret()).unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(c.router.lock().unwrap().public_key(), new_key);
    assert_eq!(c.router.lock().unwrap().previous_public_key(), Some(old_key));
    assert_eq!(local_key_of(&c, &a1_key), Some(LocalKey::Previous));
    assert_eq!(local_key_of(&c, &a2_key), Some(LocalKey::Previous));
    round_trip(&mut c, &mut a1, A1_IP, "a1 overlap, old key").await;

    // A1 learns the new key: the initiation goes out at once, and a packet sent right away
    // still travels on the old session.
    let mut out = Vec::new();
    a1.router
        .lock()
        .unwrap()
        .set_peer_public_key(&old_key, new_key, &mut out)
        .unwrap();
    assert!(
        out.iter()
            .any(|a| matches!(a, tunnel::Action::SendDatagram { data, .. } if data.len() == 148)),
        "a handshake initiation to the new key is emitted at once: {out:?}"
    );
    let during = ipv4_udp(A1_IP, 40000, C_IP, 7, b"during the switch");
    a1.inject_tun(&during).await; // before the initiation: rides the old session
    for a in out {
        if let tunnel::Action::SendDatagram { to, data } = a {
            a1.socket.send_to(&data, to).await.unwrap();
        }
    }
    assert_eq!(c.next_tun(|_| true).await, during);

    eventually("the coordinator sees A1 on the new key", || {
        local_key_of(&c, &a1_key) == Some(LocalKey::Current)
    })
    .await;
    let a1_view = a1.router.lock().unwrap().peer_stats(&new_key).unwrap();
    assert!(!a1_view.key_change_pending);
    assert!(a1_view.last_handshake_age.is_some());
    assert!(a1.router.lock().unwrap().peer_stats(&old_key).is_none());
    round_trip(&mut c, &mut a1, A1_IP, "a1 on the new key").await;
    // Sequence of packets in order, no loss.
    for i in 0..20u16 {
        a1.inject_tun(&ipv4_udp(A1_IP, 40000, C_IP, 7, &i.to_be_bytes())).await;
    }
    for i in 0..20u16 {
        assert_eq!(parse_ipv4_udp(&c.next_tun(|_| true).await).unwrap().4, i.to_be_bytes());
    }

    // A2 never switched: still on the previous key, still working.
    round_trip(&mut c, &mut a2, A2_IP, "a2 overlap, old key").await;
    assert_eq!(local_key_of(&c, &a2_key), Some(LocalKey::Previous));

    // Finish: A1 unaffected; A2's old session is cut.
    let cut = c.router.lock().unwrap().finish_key_rotation().unwrap();
    assert_eq!(cut, 1, "only A2 was still on the old key");
    assert_eq!(c.router.lock().unwrap().previous_public_key(), None);
    round_trip(&mut c, &mut a1, A1_IP, "a1 after finish").await;
    assert_eq!(local_key_of(&c, &a2_key), None);

    // A2, still on the old key, cannot get a new handshake.
    {
        let mut r = a2.router.lock().unwrap();
        assert!(r.remove_peer(&old_key));
        r.add_peer(agent_peer(old_key, c.addr())).unwrap();
    }
    let rejected_before = c.router.lock().unwrap().counters().rejected;
    a2.inject_tun(&ipv4_udp(A2_IP, 40000, C_IP, 7, b"old key after finish"))
        .await;
    eventually("the coordinator rejects A2's initiation to the old key", || {
        c.router.lock().unwrap().counters().rejected > rejected_before
    })
    .await;
    nothing_arrives(&mut c, Duration::from_millis(600)).await;
    assert_eq!(
        a2.router
            .lock()
            .unwrap()
            .peer_stats(&old_key)
            .unwrap()
            .last_handshake_age,
        None
    );

    // Once A2 learns the new key it is back, and the packet queued meanwhile is delivered.
    let mut out = Vec::new();
    a2.router
        .lock()
        .unwrap()
        .set_peer_public_key(&old_key, new_key, &mut out)
        .unwrap();
    for a in out {
        if let tunnel::Action::SendDatagram { to, data } = a {
            a2.socket.send_to(&data, to).await.unwrap();
        }
    }
    eventually("the coordinator sees A2 on the new key", || {
        local_key_of(&c, &a2_key) == Some(LocalKey::Current)
    })
    .await;
    round_trip(&mut c, &mut a2, A2_IP, "a2 on the new key").await;
}

#[tokio::test]
async fn traffic_keeps_flowing_both_ways_while_an_agent_switches() {
    // Packets in both directions during the whole switch: none lost on loopback.
    let coordinator = Router::new(generate_secret());
    let old_key = coordinator.public_key();
    let agent = Router::new(generate_secret());
    let agent_key = agent.public_key();
    let mut c = Driven::start(coordinator).await;
    let mut a = Driven::start(agent).await;
    c.router
        .lock()
        .unwrap()
        .add_peer(coordinator_peer(agent_key, A1_IP))
        .unwrap();
    a.router
        .lock()
        .unwrap()
        .add_peer(agent_peer(old_key, c.addr()))
        .unwrap();
    round_trip(&mut c, &mut a, A1_IP, "before").await;

    let new_key = c.router.lock().unwrap().start_key_rotation(generate_secret()).unwrap();
    let mut out = Vec::new();
    a.router
        .lock()
        .unwrap()
        .set_peer_public_key(&old_key, new_key, &mut out)
        .unwrap();
    // Interleave: data both ways, then the initiation, then more data, while the handshake
    // is in flight.
    for i in 0..10u16 {
        a.inject_tun(&ipv4_udp(A1_IP, 1, C_IP, 7, &i.to_be_bytes())).await;
        c.inject_tun(&ipv4_udp(C_IP, 7, A1_IP, 1, &i.to_be_bytes())).await;
        if i == 3 {
            for action in std::mem::take(&mut out) {
                if let tunnel::Action::SendDatagram { to, data } = action {
                    a.socket.send_to(&data, to).await.unwrap();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut up = Vec::new();
    let mut down = Vec::new();
    for _ in 0..10 {
        up.push(parse_ipv4_udp(&c.next_tun(|_| true).await).unwrap().4);
        down.push(parse_ipv4_udp(&a.next_tun(|_| true).await).unwrap().4);
    }
    let expected: Vec<Vec<u8>> = (0..10u16).map(|i| i.to_be_bytes().to_vec()).collect();
    up.sort();
    down.sort();
    assert_eq!(up, expected, "every agent → coordinator packet arrived");
    assert_eq!(down, expected, "every coordinator → agent packet arrived");
    eventually("switched", || local_key_of(&c, &agent_key) == Some(LocalKey::Current)).await;
    let stats = c.router.lock().unwrap().peer_stats(&agent_key).unwrap();
    assert!(!stats.key_change_pending);
    assert_eq!(
        stats.rx_bytes,
        ((20 + 8 + "up before".len()) + 10 * (20 + 8 + 2)) as u64
    );
    c.router.lock().unwrap().finish_key_rotation().unwrap();
    round_trip(&mut c, &mut a, A1_IP, "after finish").await;
}
