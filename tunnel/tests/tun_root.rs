//! Root-only: `Tunnel::start` creates real TUN interfaces, carries kernel UDP traffic to a
//! WireGuard peer, reports specific errors, and leaves nothing behind.
//!
//! Without root (or without /dev/net/tun, or without CAP_NET_ADMIN) the test prints
//! "SKIPPED: needs root" and passes, unless NIMBUS_REQUIRE_ROOT_TESTS=1, where it fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::{Driven, PATIENCE, ipv4_udp, parse_ipv4_udp};
use tunnel::keys::generate_secret;
use tunnel::{PeerConfig, Router, Tunnel, TunnelConfig, TunnelError};

const NAME_A: &str = "nt-test-a";
const NAME_B: &str = "nt-test-b";
// Documentation ranges (RFC 5737).
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn required() -> bool {
    std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() == Ok("1")
}

fn skip(why: &str) {
    assert!(
        !required(),
        "NIMBUS_REQUIRE_ROOT_TESTS=1 but this test cannot run: {why}"
    );
    println!("SKIPPED: needs root ({why})");
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Deletes the test interfaces on drop (also while unwinding from a failed assertion).
struct LinkGuard(&'static [&'static str]);

impl LinkGuard {
    fn new(names: &'static [&'static str]) -> Self {
        let g = LinkGuard(names);
        g.clean(); // leftovers of a killed earlier run
        g
    }
    fn clean(&self) {
        for name in self.0 {
            if link_exists(name) {
                let _ = std::process::Command::new("ip").args(["link", "del", name]).status();
            }
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.clean();
    }
}

fn sysfs(name: &str, attr: &str) -> String {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join(attr))
        .unwrap()
        .trim()
        .to_string()
}

/// (address, netmask) pairs of `name`'s IPv4 addresses.
fn ipv4_addrs(name: &str) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter(|i| i.interface_name == name)
        .filter_map(|i| {
            let addr = i.address?.as_sockaddr_in()?.ip();
            let mask = i.netmask?.as_sockaddr_in()?.ip();
            Some((addr, mask))
        })
        .collect()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(name: &str, address: Ipv4Addr, prefix_len: u8) -> TunnelConfig {
    TunnelConfig::new(
        generate_secret(),
        "127.0.0.1:0".parse().unwrap(),
        name,
        address,
        prefix_len,
    )
}

#[tokio::test]
async fn tunnel_on_a_real_tun_device() {
    if !nix::unistd::geteuid().is_root() {
        return skip("not running as root");
    }
    if !Path::new("/dev/net/tun").exists() {
        return skip("/dev/net/tun is missing");
    }
    let _guard = LinkGuard::new(&[NAME_A, NAME_B]);

    let mut cfg_a = config(NAME_A, A_IP, 24);
    cfg_a.mtu = 1380;
    let a = match Tunnel::start(cfg_a).await {
        Ok(t) => t,
        Err(e @ TunnelError::TunCreate { .. })
            if matches!(&e, TunnelError::TunCreate { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied) =>
        {
            assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            return skip(&format!("root without CAP_NET_ADMIN: {e}"));
        }
        Err(e) => panic!("{e}"),
    };
    let b = Tunnel::start(config(NAME_B, B_IP, 24)).await.unwrap();

    // The interfaces exist, are up, and carry the configured address, prefix and MTU.
    assert_eq!(a.device_name(), NAME_A);
    assert_eq!(b.device_name(), NAME_B);
    assert_eq!(sysfs(NAME_A, "mtu"), "1380");
    assert_eq!(sysfs(NAME_B, "mtu"), "1420");
    for name in [NAME_A, NAME_B] {
        let flags = u32::from_str_radix(sysfs(name, "flags").trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "{name} is up (IFF_UP)");
    }
    assert_eq!(ipv4_addrs(NAME_A), vec![(A_IP, Ipv4Addr::new(255, 255, 255, 0))]);
    assert_eq!(ipv4_addrs(NAME_B), vec![(B_IP, Ipv4Addr::new(255, 255, 255, 0))]);
    assert_ne!(a.local_udp_addr().port(), 0);
    assert_ne!(a.public_key(), b.public_key());

    // Specific errors: the UDP port and the interface name are taken.
    let mut dup_port = config("nt-test-c", Ipv4Addr::new(192, 0, 2, 1), 24);
    dup_port.listen = a.local_udp_addr();
    match Tunnel::start(dup_port).await {
        Err(e @ TunnelError::UdpBind { .. }) => {
            println!("port taken: {e}");
            assert!(e.to_string().contains("address in use"), "{e}")
        }
        Err(e) => panic!("expected UdpBind, got {e}"),
        Ok(_) => panic!("a second tunnel bound the same UDP port"),
    }
    assert!(!link_exists("nt-test-c"), "a failed start leaves no interface");
    match Tunnel::start(config(NAME_A, Ipv4Addr::new(192, 0, 2, 1), 24)).await {
        Err(e @ TunnelError::TunCreate { .. }) => {
            let msg = e.to_string();
            println!("name taken: {msg}");
            assert!(
                msg.starts_with(&format!("cannot create TUN device {NAME_A}: ")),
                "{msg}"
            );
        }
        Err(e) => panic!("expected TunCreate, got {e}"),
        Ok(_) => panic!("a second tunnel took {NAME_A}"),
    }

    // A WireGuard peer (an in-test Router on a UDP socket) at 198.51.100.2. Kernel UDP to
    // that address goes into nt-test-a, through the tunnel, and out of the peer's "TUN".
    let peer = Router::new(generate_secret());
    let peer_key = peer.public_key();
    let mut peer = Driven::start(peer).await;
    peer.router
        .lock()
        .unwrap()
        .add_peer(PeerConfig {
            public_key: a.public_key(),
            endpoint: Some(a.local_udp_addr()),
            allowed_ips: vec!["198.51.100.1/32".parse().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();
    a.add_peer(PeerConfig {
        public_key: peer_key,
        endpoint: Some(peer.addr()),
        allowed_ips: vec!["198.51.100.2/32".parse().unwrap()],
        persistent_keepalive: Some(25),
    })
    .unwrap();
    assert_eq!(a.stats().len(), 1);
    assert!(b.stats().is_empty());

    let app = tokio::net::UdpSocket::bind(SocketAddr::from((A_IP, 0))).await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    app.send_to(b"hello through the tun", (PEER_IP, 9999)).await.unwrap();
    let got = peer
        .next_tun(|p| matches!(parse_ipv4_udp(p), Some((_, _, _, 9999, _))))
        .await;
    let (src, sport, dst, _, payload) = parse_ipv4_udp(&got).unwrap();
    assert_eq!((src, sport, dst), (A_IP, app_port, PEER_IP));
    assert_eq!(payload, b"hello through the tun");

    // And back: the peer answers; the kernel delivers it to the application socket.
    peer.inject_tun(&ipv4_udp(PEER_IP, 9999, A_IP, app_port, b"hello back"))
        .await;
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(PATIENCE, app.recv_from(&mut buf))
        .await
        .expect("the reply never reached the application socket")
        .unwrap();
    assert_eq!(&buf[..n], b"hello back");
    assert_eq!(from, SocketAddr::from((PEER_IP, 9999)));

    let stats = a.peer_stats(&peer_key).unwrap();
    assert!(stats.last_handshake_age.is_some());
    assert!(stats.tx_bytes > 0 && stats.rx_bytes > 0, "{stats:?}");
    assert_eq!(stats.endpoint, Some(peer.addr()));
    assert_eq!(a.counters().spoofed_source, 0);

    // Peers come and go at run time.
    assert!(a.remove_peer(&peer_key));
    assert!(!a.remove_peer(&peer_key));
    assert!(a.stats().is_empty());
    assert!(a.peer_stats(&peer_key).is_none());

    // Each tunnel moves its packets on a thread named after its TUN.
    assert_eq!(thread_count(&format!("wg-{NAME_A}")), 1);
    assert_eq!(thread_count(&format!("wg-{NAME_B}")), 1);

    // Shutdown removes the interface and has stopped the packet thread when it returns;
    // dropping the last handle removes the interface and stops the thread too.
    let a_clone = a.clone();
    a.shutdown().await;
    assert_eq!(
        thread_count(&format!("wg-{NAME_A}")),
        0,
        "shutdown waits for the packet thread"
    );
    wait_until("nt-test-a disappears after shutdown", || !link_exists(NAME_A)).await;
    drop(a_clone);
    drop(b);
    wait_until("nt-test-b disappears after the last handle is dropped", || {
        !link_exists(NAME_B)
    })
    .await;
    wait_until(
        "the packet thread of nt-test-b ends after the last handle is dropped",
        || thread_count(&format!("wg-{NAME_B}")) == 0,
    )
    .await;
}

/// Threads of this process named `name` (`/proc/self/task/*/comm`).
fn thread_count(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
        .count()
}
