//! Two `Router`s, each behind a real UDP socket on 127.0.0.1, complete a real WireGuard
//! handshake and exchange packets both ways. No TUN, no privileges.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;

use common::{Driven, ipv4_udp, parse_ipv4_udp};
use tunnel::keys::generate_secret;
use tunnel::{PeerConfig, Router};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

#[tokio::test]
async fn handshake_and_packets_over_loopback_udp() {
    let a = Router::new(generate_secret());
    let b = Router::new(generate_secret());
    let (a_key, b_key) = (a.public_key(), b.public_key());
    let mut a = Driven::start(a).await;
    let mut b = Driven::start(b).await;

    // The agent's shape: A knows B's endpoint and keeps the session alive; B (the
    // coordinator's shape) has no endpoint for A and learns it from the handshake.
    a.router
        .lock()
        .unwrap()
        .add_peer(PeerConfig {
            public_key: b_key,
            endpoint: Some(b.addr()),
            allowed_ips: vec!["10.99.0.2/32".parse().unwrap()],
            persistent_keepalive: Some(25),
        })
        .unwrap();
    b.router
        .lock()
        .unwrap()
        .add_peer(PeerConfig {
            public_key: a_key,
            endpoint: None,
            allowed_ips: vec!["10.99.0.1/32".parse().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();

    let ping = ipv4_udp(A_IP, 40000, B_IP, 7, b"ping over wireguard");
    a.inject_tun(&ping).await;
    let got = b.next_tun(|_| true).await;
    assert_eq!(got, ping, "B's TUN gets A's packet byte for byte");
    let (src, _, dst, dport, payload) = parse_ipv4_udp(&got).unwrap();
    assert_eq!((src, dst, dport), (A_IP, B_IP, 7));
    assert_eq!(payload, b"ping over wireguard");

    let pong = ipv4_udp(B_IP, 7, A_IP, 40000, b"pong");
    b.inject_tun(&pong).await;
    assert_eq!(a.next_tun(|_| true).await, pong);

    let a_view = a.router.lock().unwrap().peer_stats(&b_key).unwrap();
    let b_view = b.router.lock().unwrap().peer_stats(&a_key).unwrap();
    assert!(a_view.last_handshake_age.is_some());
    assert!(b_view.last_handshake_age.is_some());
    assert_eq!(a_view.tx_bytes, ping.len() as u64);
    assert_eq!(a_view.rx_bytes, pong.len() as u64);
    assert_eq!(b_view.rx_bytes, ping.len() as u64);
    assert_eq!(b_view.tx_bytes, pong.len() as u64);
    assert_eq!(b_view.endpoint, Some(a.addr()), "B learned A's endpoint");

    // Many packets in a row, all delivered in order (no loss on loopback).
    for i in 0..50u16 {
        a.inject_tun(&ipv4_udp(A_IP, 40000, B_IP, 7, &i.to_be_bytes())).await;
    }
    for i in 0..50u16 {
        let p = b.next_tun(|_| true).await;
        assert_eq!(parse_ipv4_udp(&p).unwrap().4, i.to_be_bytes());
    }
}
