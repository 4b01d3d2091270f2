//! In-memory tests: routers exchange `Action`s directly, no sockets, no TUN.

use super::*;
use crate::keys::generate_secret;

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";
const C_ADDR: &str = "192.0.2.3:51820";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A minimal valid IPv4 packet (protocol 253, "experimental") with a correct header checksum.
fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 253;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let mut sum: u32 = 0;
    for chunk in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

/// A set of routers on a perfect in-memory network.
struct Net {
    nodes: Vec<(SocketAddr, Router)>,
    /// Packets each node wrote to its TUN, by node index.
    tun: Vec<Vec<Vec<u8>>>,
    /// Datagrams delivered, for inspection: (from, to, bytes).
    wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

impl Net {
    fn new(nodes: Vec<(SocketAddr, Router)>) -> Self {
        let n = nodes.len();
        Net {
            nodes,
            tun: vec![Vec::new(); n],
            wire: Vec::new(),
        }
    }

    fn idx(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|(a, _)| *a == addr)
    }

    /// Applies `actions` emitted by node `from` and everything they cause, until quiet.
    fn run(&mut self, from: usize, actions: Vec<Action>) {
        let mut queue: Vec<(usize, Action)> = actions.into_iter().map(|a| (from, a)).collect();
        let mut steps = 0;
        while let Some((origin, action)) = (!queue.is_empty()).then(|| queue.remove(0)) {
            steps += 1;
            assert!(steps < 10_000, "routers ping-pong forever");
            match action {
                Action::WriteTun(p) => self.tun[origin].push(p),
                Action::SendDatagram { to, data } => {
                    let src = self.nodes[origin].0;
                    self.wire.push((src, to, data.clone()));
                    let Some(dst) = self.idx(to) else { continue };
                    let mut out = Vec::new();
                    self.nodes[dst].1.handle_datagram(src, &data, &mut out);
                    queue.extend(out.into_iter().map(|a| (dst, a)));
                }
            }
        }
    }

    fn send_tun(&mut self, node: usize, packet: &[u8]) -> Vec<Action> {
        let mut out = Vec::new();
        self.nodes[node].1.handle_tun_packet(packet, &mut out);
        let copy = out.clone();
        self.run(node, out);
        copy
    }

    fn tick_all(&mut self) {
        for i in 0..self.nodes.len() {
            let mut out = Vec::new();
            self.nodes[i].1.tick(&mut out);
            self.run(i, out);
        }
    }

    fn router(&mut self, i: usize) -> &mut Router {
        &mut self.nodes[i].1
    }
}

fn peer(key: PublicKey, endpoint: Option<&str>, ips: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: endpoint.map(sa),
        allowed_ips: ips.iter().map(|s| net(s)).collect(),
        persistent_keepalive: None,
    }
}

/// A (10.0.0.1) knows B's endpoint; B (10.0.0.2) learns A's. `b_allows_for_a` is what B
/// accepts from A.
fn pair(b_allows_for_a: &[&str]) -> Net {
    let mut a = Router::new(generate_secret());
    let mut b = Router::new(generate_secret());
    a.add_peer(peer(b.public_key(), Some(B_ADDR), &["10.0.0.2/32"]))
        .unwrap();
    b.add_peer(peer(a.public_key(), None, b_allows_for_a)).unwrap();
    let mut net = Net::new(vec![(sa(A_ADDR), a), (sa(B_ADDR), b)]);
    net.tick_all();
    net
}

const A_IP: [u8; 4] = [10, 0, 0, 1];
const B_IP: [u8; 4] = [10, 0, 0, 2];

#[test]
fn handshake_then_data_both_ways() {
    let mut net = pair(&["10.0.0.1/32"]);
    let a_key = net.router(0).public_key();
    let b_key = net.router(1).public_key();

    let ping = ipv4(A_IP, B_IP, b"hello from a");
    let first = net.send_tun(0, &ping);
    // No session yet: the packet is queued and a handshake initiation (148 bytes) goes out.
    assert_eq!(first.len(), 1);
    match &first[0] {
        Action::SendDatagram { to, data } => {
            assert_eq!(*to, sa(B_ADDR));
            assert_eq!(data.len(), 148);
            assert_eq!(data[0], 1);
        }
        other => panic!("expected a handshake initiation, got {other:?}"),
    }
    assert_eq!(net.tun[1], vec![ping.clone()], "B's TUN gets A's packet unchanged");
    assert!(net.tun[0].is_empty());

    let pong = ipv4(B_IP, A_IP, b"reply from b");
    net.send_tun(1, &pong);
    assert_eq!(net.tun[0], vec![pong.clone()], "A's TUN gets B's reply unchanged");

    let a_view = net.router(0).peer_stats(&b_key).unwrap();
    assert!(a_view.last_handshake_age.is_some());
    assert_eq!(a_view.tx_bytes, ping.len() as u64);
    assert_eq!(a_view.rx_bytes, pong.len() as u64);
    assert_eq!(a_view.endpoint, Some(sa(B_ADDR)));

    let b_view = net.router(1).peer_stats(&a_key).unwrap();
    assert!(b_view.last_handshake_age.is_some());
    assert_eq!(b_view.rx_bytes, ping.len() as u64);
    assert_eq!(b_view.tx_bytes, pong.len() as u64);
    // B had no endpoint for A: learned from the authenticated handshake.
    assert_eq!(b_view.endpoint, Some(sa(A_ADDR)));
    assert_eq!(net.router(1).stats().len(), 1);
    assert_eq!(net.router(0).counters(), RouterCounters::default());
    assert_eq!(net.router(1).counters(), RouterCounters::default());
}

#[test]
fn roaming_follows_authenticated_source() {
    let mut net = pair(&["10.0.0.1/32"]);
    let a_key = net.router(0).public_key();
    net.send_tun(0, &ipv4(A_IP, B_IP, b"x"));
    assert_eq!(net.tun[1].len(), 1);

    // A moves: its next packet arrives from a new address.
    let new_a = sa("198.51.100.9:4000");
    net.nodes[0].0 = new_a;
    net.send_tun(0, &ipv4(A_IP, B_IP, b"y"));
    assert_eq!(net.tun[1].len(), 2);
    assert_eq!(net.router(1).peer_stats(&a_key).unwrap().endpoint, Some(new_a));

    // A forged copy of a data packet from elsewhere does not move the endpoint (replay).
    let (_, _, data) = net.wire.last().cloned().unwrap();
    let mut out = Vec::new();
    net.router(1).handle_datagram(sa("203.0.113.66:1"), &data, &mut out);
    assert!(out.is_empty());
    assert_eq!(net.router(1).peer_stats(&a_key).unwrap().endpoint, Some(new_a));
    assert_eq!(net.router(1).counters().rejected, 1);
}

#[test]
fn unknown_peer_key_is_dropped() {
    let mut net = pair(&["10.0.0.1/32"]);
    let b_key = net.router(1).public_key();
    // C knows B, but B does not know C.
    let mut c = Router::new(generate_secret());
    c.add_peer(peer(b_key, Some(B_ADDR), &["10.0.0.0/24"])).unwrap();
    let mut out = Vec::new();
    c.tick(&mut out);
    c.handle_tun_packet(&ipv4([10, 0, 0, 3], B_IP, b"let me in"), &mut out);
    let init = match out.as_slice() {
        [Action::SendDatagram { data, .. }] => data.clone(),
        other => panic!("expected one initiation, got {other:?}"),
    };
    let mut b_out = Vec::new();
    net.router(1).handle_datagram(sa(C_ADDR), &init, &mut b_out);
    assert!(b_out.is_empty(), "no answer to an unknown key: {b_out:?}");
    assert_eq!(net.router(1).counters().unknown_peer, 1);
    assert!(net.tun[1].is_empty());
}

#[test]
fn source_outside_allowed_ips_is_dropped() {
    // B accepts only 10.0.0.100 from A, so A's real address 10.0.0.1 is a spoof.
    let mut net = pair(&["10.0.0.100/32"]);
    net.send_tun(0, &ipv4(A_IP, B_IP, b"spoofed"));
    assert!(net.tun[1].is_empty(), "nothing may reach B's TUN");
    assert_eq!(net.router(1).counters().spoofed_source, 1);
    let a_key = net.router(0).public_key();
    let stats = net.router(1).peer_stats(&a_key).unwrap();
    assert_eq!(stats.rx_bytes, 0);
    // The handshake itself was fine.
    assert!(stats.last_handshake_age.is_some());

    // The allowed source still works.
    net.send_tun(0, &ipv4([10, 0, 0, 100], B_IP, b"legit"));
    assert_eq!(net.tun[1].len(), 1);
}

#[test]
fn peer_cannot_use_another_peers_address() {
    // B has peers A (10.0.0.1) and C (10.0.0.3). A sends with C's address.
    let mut net = pair(&["10.0.0.1/32"]);
    let c_key = PublicKey::from(&generate_secret());
    net.router(1).add_peer(peer(c_key, None, &["10.0.0.3/32"])).unwrap();
    net.send_tun(0, &ipv4([10, 0, 0, 3], B_IP, b"i am c"));
    assert!(net.tun[1].is_empty());
    assert_eq!(net.router(1).counters().spoofed_source, 1);

    // Also when A's allowed range covers C's host route: longest prefix says C.
    let a_key = net.router(0).public_key();
    net.router(1).add_peer(peer(a_key, None, &["10.0.0.0/24"])).unwrap();
    net.send_tun(0, &ipv4([10, 0, 0, 3], B_IP, b"still c?"));
    assert!(net.tun[1].is_empty());
    assert_eq!(net.router(1).counters().spoofed_source, 2);
    net.send_tun(0, &ipv4([10, 0, 0, 4], B_IP, b"in a's range"));
    assert_eq!(net.tun[1].len(), 1);
}

#[test]
fn garbage_never_panics_or_reaches_the_tun() {
    let mut net = pair(&["10.0.0.1/32"]);
    net.send_tun(0, &ipv4(A_IP, B_IP, b"establish"));
    assert_eq!(net.tun[1].len(), 1);
    // A genuine data packet from A to B, to reuse its receiver index.
    let (_, _, real) = net
        .wire
        .iter()
        .rev()
        .find(|(_, to, d)| *to == sa(B_ADDR) && d[0] == 4)
        .cloned()
        .unwrap();

    let mut rng = OsRng;
    let mut out = Vec::new();
    let b = net.router(1);
    for round in 0..3000u32 {
        let len = match round % 6 {
            0 => (rng.next_u32() % 2048) as usize,
            1 => 148,
            2 => 92,
            3 => 64,
            4 => 32 + (rng.next_u32() % 1500) as usize,
            _ => (rng.next_u32() % 70_000) as usize,
        };
        let mut d = vec![0u8; len];
        rng.fill_bytes(&mut d);
        if len >= 8 && round % 12 != 0 {
            // Valid message types with valid sizes, and sometimes a live receiver index.
            d[0] = (round % 6).clamp(1, 4) as u8;
            d[1..4].fill(0);
            if round % 3 == 0 {
                d[4..8].copy_from_slice(&real[4..8]);
            }
        }
        b.handle_datagram(sa(C_ADDR), &d, &mut out);
        let mut tun_out = Vec::new();
        b.handle_tun_packet(&d, &mut tun_out);
        out.extend(tun_out);
    }
    assert!(
        !out.iter().any(|a| matches!(a, Action::WriteTun(_))),
        "garbage reached the TUN"
    );
    let c = b.counters();
    assert!(c.malformed > 0 && c.rejected > 0, "{c:?}");
    // The session survived.
    net.send_tun(0, &ipv4(A_IP, B_IP, b"still alive"));
    assert_eq!(net.tun[1].len(), 2);
}

#[test]
fn removed_peer_gets_nothing() {
    let mut net = pair(&["10.0.0.1/32"]);
    let b_key = net.router(1).public_key();
    net.send_tun(0, &ipv4(A_IP, B_IP, b"before"));
    assert_eq!(net.tun[1].len(), 1);

    assert!(net.router(0).remove_peer(&b_key));
    assert!(!net.router(0).remove_peer(&b_key));
    assert!(net.router(0).peer_stats(&b_key).is_none());
    let sent = net.send_tun(0, &ipv4(A_IP, B_IP, b"after"));
    assert!(
        !sent.iter().any(|a| matches!(a, Action::SendDatagram { .. })),
        "{sent:?}"
    );
    assert_eq!(net.router(0).counters().no_route, 1);
    assert_eq!(net.tun[1].len(), 1);

    // B's packets to A now hit an unknown receiver index at A and go nowhere.
    net.send_tun(1, &ipv4(B_IP, A_IP, b"hello?"));
    assert!(net.tun[0].is_empty());
    assert_eq!(net.router(0).counters().unknown_index, 1);
    let mut out = Vec::new();
    net.router(0).tick(&mut out);
    assert!(out.is_empty());
}

#[test]
fn longest_prefix_wins_and_prefixes_move() {
    let mut r = Router::new(generate_secret());
    let wide = PublicKey::from(&generate_secret());
    let narrow = PublicKey::from(&generate_secret());
    r.add_peer(peer(wide, Some(B_ADDR), &["10.0.0.77/24"])).unwrap();
    r.add_peer(peer(narrow, Some(C_ADDR), &["10.0.0.5/32"])).unwrap();
    // Host bits are cleared.
    assert_eq!(r.peer_stats(&wide).unwrap().allowed_ips, vec![net("10.0.0.0/24")]);

    let dest = |r: &mut Router, ip: [u8; 4]| {
        let mut out = Vec::new();
        r.handle_tun_packet(&ipv4(A_IP, ip, b"?"), &mut out);
        match out.as_slice() {
            [Action::SendDatagram { to, .. }] => Some(*to),
            [] => None,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(dest(&mut r, [10, 0, 0, 5]), Some(sa(C_ADDR)));
    assert_eq!(dest(&mut r, [10, 0, 0, 6]), Some(sa(B_ADDR)));
    assert_eq!(dest(&mut r, [10, 0, 1, 6]), None);
    assert_eq!(r.counters().no_route, 1);

    // The /24 moves to `narrow`: `wide` loses it.
    r.add_peer(peer(narrow, None, &["10.0.0.5/32", "10.0.0.0/24"])).unwrap();
    assert!(r.peer_stats(&wide).unwrap().allowed_ips.is_empty());
    // `endpoint: None` on update keeps the known endpoint.
    assert_eq!(r.peer_stats(&narrow).unwrap().endpoint, Some(sa(C_ADDR)));
    assert_eq!(r.peer_count(), 2);
}

#[test]
fn update_keeps_session_and_keepalive_change_rekeys() {
    let mut net = pair(&["10.0.0.1/32"]);
    let b_key = net.router(1).public_key();
    net.send_tun(0, &ipv4(A_IP, B_IP, b"one"));
    let inits = |net: &Net| net.wire.iter().filter(|(_, _, d)| d[0] == 1).count();
    assert_eq!(inits(&net), 1);

    // Same keepalive: the session is kept, no new handshake.
    net.router(0)
        .add_peer(peer(b_key, Some(B_ADDR), &["10.0.0.2/32", "10.9.0.0/16"]))
        .unwrap();
    net.send_tun(0, &ipv4(A_IP, [10, 9, 1, 1], b"two"));
    assert_eq!(net.tun[1].len(), 2);
    assert_eq!(inits(&net), 1);

    // New keepalive: a new Tunn, a new handshake, counters carried over.
    let mut cfg = peer(b_key, None, &["10.0.0.2/32"]);
    cfg.persistent_keepalive = Some(25);
    net.router(0).add_peer(cfg).unwrap();
    net.tick_all();
    assert_eq!(inits(&net), 2, "keepalive peers initiate at the next tick");
    net.send_tun(0, &ipv4(A_IP, B_IP, b"three"));
    assert_eq!(net.tun[1].len(), 3);
    let tx = net.router(0).peer_stats(&b_key).unwrap().tx_bytes;
    assert_eq!(tx, (20 + 3 + 20 + 3 + 20 + 5) as u64);
}

#[test]
fn keepalive_peer_initiates_on_tick() {
    let mut a = Router::new(generate_secret());
    let b = PublicKey::from(&generate_secret());
    let mut cfg = peer(b, Some(B_ADDR), &["10.0.0.2/32"]);
    cfg.persistent_keepalive = Some(25);
    a.add_peer(cfg).unwrap();
    let mut out = Vec::new();
    a.tick(&mut out);
    match out.as_slice() {
        [Action::SendDatagram { to, data }] => {
            assert_eq!(*to, sa(B_ADDR));
            assert_eq!(data.len(), 148);
        }
        other => panic!("{other:?}"),
    }
    out.clear();
    a.tick(&mut out);
    assert!(out.is_empty(), "no second initiation right away: {out:?}");
}

#[test]
fn own_key_is_refused_and_no_endpoint_is_counted() {
    let secret = generate_secret();
    let mut r = Router::new(secret.clone());
    let own = PublicKey::from(&secret);
    assert!(matches!(
        r.add_peer(peer(own, None, &[])),
        Err(TunnelError::InvalidPeer(_))
    ));
    r.add_peer(peer(PublicKey::from(&generate_secret()), None, &["10.0.0.0/8"]))
        .unwrap();
    let mut out = Vec::new();
    r.handle_tun_packet(&ipv4(A_IP, B_IP, b"x"), &mut out);
    assert!(out.is_empty());
    assert_eq!(r.counters().no_endpoint, 1);
    // Not an IP packet.
    r.handle_tun_packet(&[0x45, 0, 0], &mut out);
    r.handle_tun_packet(&[], &mut out);
    assert!(out.is_empty());
    assert_eq!(r.counters().malformed, 2);
}

/// Feeds `n` fresh initiations from `tunn` (source `src`) to `b`; returns (responses, cookie
/// replies) and the last cookie reply.
fn initiations(b: &mut Router, tunn: &mut Tunn, src: SocketAddr, n: u64) -> (u64, u64, Option<Vec<u8>>) {
    let mut buf = vec![0u8; 256];
    let (mut responses, mut cookies, mut last_cookie) = (0, 0, None);
    for _ in 0..n {
        let init = match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        let mut out = Vec::new();
        b.handle_datagram(src, &init, &mut out);
        for a in out {
            match a {
                Action::SendDatagram { to, data } => {
                    assert_eq!(to, src);
                    match data[0] {
                        2 => responses += 1,
                        3 => {
                            cookies += 1;
                            last_cookie = Some(data);
                        }
                        t => panic!("unexpected message type {t}"),
                    }
                }
                Action::WriteTun(_) => panic!("handshake wrote to the TUN"),
            }
        }
    }
    (responses, cookies, last_cookie)
}

/// Router B with peer A configured; A's initiator `Tunn`.
fn responder_and_initiator() -> (Router, Tunn) {
    let a_secret = generate_secret();
    let a_pub = PublicKey::from(&a_secret);
    let mut b = Router::new(generate_secret());
    b.add_peer(peer(a_pub, None, &["10.0.0.1/32"])).unwrap();
    let tunn = Tunn::new(a_secret, b.public_key(), None, None, 7, None);
    (b, tunn)
}

#[test]
fn handshake_flood_gets_cookie_replies() {
    let (mut b, mut tunn) = responder_and_initiator();
    assert_eq!(b.handshake_rate_limit(), HANDSHAKE_RATE_LIMIT, "one peer: the floor");
    let (responses, cookies, _) = initiations(&mut b, &mut tunn, sa(A_ADDR), HANDSHAKE_RATE_LIMIT * 2);
    // Each initiation is counted once: the whole limit is answered (boringtun's device, which
    // counts an initiation twice, answers half).
    assert_eq!(responses, HANDSHAKE_RATE_LIMIT, "the limit is answered");
    assert_eq!(cookies, HANDSHAKE_RATE_LIMIT, "the rest of the flood gets cookies");
    assert_eq!(b.counters().cookies_sent, cookies);
}

#[test]
fn initiations_dropped_at_a_full_queue_are_counted() {
    let mut r = Router::new(generate_secret());
    assert_eq!(r.counters().handshake_queue_full, 0);
    r.count_initiation_dropped();
    r.count_initiation_dropped();
    assert_eq!(r.counters().handshake_queue_full, 2);
    assert_eq!(
        r.counters().rejected,
        0,
        "a drop at the queue is not a rejected handshake"
    );
}

#[test]
fn the_default_limit_covers_the_rekeys_of_many_peers() {
    assert_eq!(handshake_rate_limit(0), HANDSHAKE_RATE_LIMIT);
    assert_eq!(handshake_rate_limit(1_000), HANDSHAKE_RATE_LIMIT);
    assert_eq!(handshake_rate_limit(2_000), 200);
    // Every session is renewed after 120 s: 10 000 peers rekey ~83 times a second.
    let rekeys_per_sec = 10_000 / 120;
    assert_eq!(handshake_rate_limit(10_000), 1_000);
    assert!(handshake_rate_limit(10_000) >= 10 * rekeys_per_sec);
    assert!(handshake_rate_limit(100_000) >= 10 * (100_000 / 120));
}

#[test]
fn the_limit_follows_the_configured_peers() {
    let mut r = Router::new(generate_secret());
    // Peer keys only need to be distinct points; no handshake is made.
    for i in 0..1_100u32 {
        let mut k = [9u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        r.add_peer(peer(PublicKey::from(k), None, &[&format!("{ip}/32")]))
            .unwrap();
    }
    assert_eq!(r.peer_count(), 1_100);
    assert_eq!(r.handshake_rate_limit(), 110);
    r.set_handshake_rate_limit(Some(5));
    assert_eq!(r.handshake_rate_limit(), 5, "a fixed limit wins");
    r.set_handshake_rate_limit(None);
    assert_eq!(r.handshake_rate_limit(), 110, "and can be undone");
}

#[test]
fn over_the_limit_a_valid_cookie_gets_through_from_its_address_only() {
    let (mut b, mut tunn) = responder_and_initiator();
    b.set_handshake_rate_limit(Some(3));
    let (responses, cookies, cookie) = initiations(&mut b, &mut tunn, sa(A_ADDR), 5);
    assert_eq!((responses, cookies), (3, 2));
    // The initiator takes the cookie; its next initiation carries MAC2 for A's address.
    let cookie = cookie.unwrap();
    let mut buf = vec![0u8; 256];
    assert!(matches!(
        tunn.decapsulate(Some(sa(B_ADDR).ip()), &cookie, &mut buf),
        TunnResult::Done
    ));
    let (responses, cookies, _) = initiations(&mut b, &mut tunn, sa(A_ADDR), 1);
    assert_eq!(
        (responses, cookies),
        (1, 0),
        "a cookie from the right address is served"
    );
    // The same cookie does not help another source address.
    let (responses, cookies, _) = initiations(&mut b, &mut tunn, sa(C_ADDR), 1);
    assert_eq!((responses, cookies), (0, 1), "another address must prove itself");
}

#[test]
fn the_count_starts_again_every_second() {
    let (mut b, mut tunn) = responder_and_initiator();
    b.set_handshake_rate_limit(Some(1));
    assert_eq!(initiations(&mut b, &mut tunn, sa(A_ADDR), 2).0, 1);
    assert_eq!(
        initiations(&mut b, &mut tunn, sa(A_ADDR), 1).0,
        0,
        "within the second the count holds"
    );
    // The window is measured on the real clock: one second must pass.
    std::thread::sleep(HANDSHAKE_WINDOW);
    assert_eq!(
        initiations(&mut b, &mut tunn, sa(A_ADDR), 2).0,
        1,
        "a new second, a new budget"
    );
}

#[test]
fn ipv6_routes_too() {
    let mut r = Router::new(generate_secret());
    let k = PublicKey::from(&generate_secret());
    r.add_peer(peer(k, Some(B_ADDR), &["fd00::/64"])).unwrap();
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    let mut out = Vec::new();
    r.handle_tun_packet(&p, &mut out);
    assert_eq!(out.len(), 1);
    p[24] = 0xfe;
    out.clear();
    r.handle_tun_packet(&p, &mut out);
    assert!(out.is_empty());
}

#[test]
fn key_rotation_steps_out_of_order_are_refused() {
    let mut r = Router::new(generate_secret());
    let peer_key = PublicKey::from(&generate_secret());
    r.add_peer(peer(peer_key, None, &["10.0.0.2/32"])).unwrap();
    assert!(matches!(r.finish_key_rotation(), Err(TunnelError::KeyRotation(_))));
    // Rotating to the key already in use is refused.
    let secret = generate_secret();
    let mut other = Router::new(secret.clone());
    assert!(matches!(
        other.start_key_rotation(secret),
        Err(TunnelError::KeyRotation(_))
    ));
    let old = r.public_key();
    let new = r.start_key_rotation(generate_secret()).unwrap();
    assert_eq!(r.public_key(), new);
    assert_eq!(r.previous_public_key(), Some(old));
    let err = r.start_key_rotation(generate_secret()).unwrap_err();
    assert!(err.to_string().contains("finish it"), "{err}");
    // Neither of our keys can become a peer.
    assert!(r.add_peer(peer(old, None, &["10.0.0.9/32"])).is_err());
    assert!(r.add_peer(peer(new, None, &["10.0.0.9/32"])).is_err());
    // No session yet: nothing is cut.
    assert_eq!(r.finish_key_rotation().unwrap(), 0);
    assert_eq!(r.previous_public_key(), None);
    assert_eq!(r.peer_stats(&peer_key).unwrap().local_key, None);
}

#[test]
fn set_peer_public_key_checks_its_arguments() {
    let mut r = Router::new(generate_secret());
    let (k1, k2, k3) = (
        PublicKey::from(&generate_secret()),
        PublicKey::from(&generate_secret()),
        PublicKey::from(&generate_secret()),
    );
    r.add_peer(peer(k1, Some(B_ADDR), &["10.0.0.2/32"])).unwrap();
    r.add_peer(peer(k2, None, &["10.0.0.3/32"])).unwrap();
    let mut out = Vec::new();
    assert!(r.set_peer_public_key(&k3, k1, &mut out).is_err(), "unknown old key");
    assert!(r.set_peer_public_key(&k1, k2, &mut out).is_err(), "another peer's key");
    let own = r.public_key();
    assert!(r.set_peer_public_key(&k1, own, &mut out).is_err(), "our own key");
    assert!(out.is_empty());
    r.set_peer_public_key(&k1, k3, &mut out).unwrap();
    assert!(matches!(out.as_slice(), [Action::SendDatagram { to, data }] if *to == sa(B_ADDR) && data.len() == 148));
    assert!(r.peer_stats(&k1).is_none());
    let s = r.peer_stats(&k3).unwrap();
    assert!(s.key_change_pending);
    assert_eq!(s.allowed_ips, vec![net("10.0.0.2/32")]);
    assert_eq!(r.peer_count(), 2);
    assert!(r.remove_peer(&k3));
    assert_eq!(r.peer_count(), 1);
}

#[test]
fn initiations_are_answered_outside_the_router_on_another_thread() {
    let (mut b, mut a_tunn) = responder_and_initiator();
    let mut buf = vec![0u8; 256];
    let init = match a_tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    assert!(is_handshake_initiation(&init));
    assert!(!is_handshake_initiation(&init[..100]));

    let mut out = Vec::new();
    let initiation = b.accept_initiation(sa(A_ADDR), &init, &mut out).expect("accepted");
    assert!(out.is_empty(), "nothing to send before the answer");
    // The router keeps serving while the answer is computed elsewhere.
    b.tick(&mut out);
    let answered = std::thread::spawn(move || initiation.answer(&mut vec![0u8; SCRATCH_LEN]))
        .join()
        .unwrap();
    b.finish_initiation(answered, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    let Action::SendDatagram { to, data } = out.remove(0) else {
        panic!("expected a datagram")
    };
    assert_eq!(
        (to, data[0]),
        (sa(A_ADDR), 2),
        "the handshake response, to the initiator"
    );
    let a_key = b.stats()[0].public_key;
    assert_eq!(
        b.peer_stats(&a_key).unwrap().endpoint,
        Some(sa(A_ADDR)),
        "endpoint learned"
    );

    // A completes the handshake; its keepalive confirms the session at B.
    let mut rbuf = vec![0u8; 256];
    let keepalive = match a_tunn.decapsulate(Some(sa(B_ADDR).ip()), &data, &mut rbuf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("A did not accept the response"),
    };
    b.handle_datagram(sa(A_ADDR), &keepalive, &mut out);
    assert!(b.peer_stats(&a_key).unwrap().last_handshake_age.is_some());
    assert_eq!(b.counters(), RouterCounters::default(), "nothing dropped");
}

#[test]
fn an_answer_for_a_removed_peer_is_dropped() {
    let (mut b, mut a_tunn) = responder_and_initiator();
    let mut buf = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) = a_tunn.format_handshake_initiation(&mut buf, false) else {
        panic!("no initiation")
    };
    let init = init.to_vec();
    let mut out = Vec::new();
    let initiation = b.accept_initiation(sa(A_ADDR), &init, &mut out).unwrap();
    let a_key = b.stats()[0].public_key;
    assert!(b.remove_peer(&a_key));
    let answered = initiation.answer(&mut vec![0u8; SCRATCH_LEN]);
    b.finish_initiation(answered, &mut out);
    assert!(out.is_empty(), "no response for a peer that is gone: {out:?}");
    assert_eq!(b.counters().unknown_index, 1);
    // Not an initiation at all: refused and counted, nothing sent.
    assert!(b.accept_initiation(sa(A_ADDR), &[4u8; 32], &mut out).is_none());
    assert_eq!(b.counters().malformed, 1);
}
