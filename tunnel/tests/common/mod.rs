//! Helpers shared by the integration tests: hand-built IP packets and a tiny UDP driver for a
//! `Router` (the same loop `Tunnel` runs, minus the TUN: packets for the "TUN" go to a channel).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tunnel::{Action, Router, TICK_INTERVAL};

/// How long a test waits for something that should happen quickly.
pub const PATIENCE: Duration = Duration::from_secs(10);

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).map(|b| u32::from(*b)).unwrap_or(0);
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet with a valid header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

/// An IPv4/UDP packet (UDP checksum 0 = none, which IPv4 allows).
pub fn ipv4_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4(src, dst, 17, &udp)
}

/// Parsed view of an IPv4/UDP packet: (src, sport, dst, dport, payload).
pub fn parse_ipv4_udp(p: &[u8]) -> Option<(Ipv4Addr, u16, Ipv4Addr, u16, Vec<u8>)> {
    if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let udp = p.get(ihl..)?;
    if udp.len() < 8 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    Some((src, sport, dst, dport, udp[8..].to_vec()))
}

/// A `Router` driven by a real UDP socket on 127.0.0.1 and a 250 ms timer.
pub struct Driven {
    pub router: Arc<Mutex<Router>>,
    pub socket: Arc<UdpSocket>,
    /// Packets the router wanted written to its TUN.
    pub tun_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    tun_tx: mpsc::UnboundedSender<Vec<u8>>,
    task: JoinHandle<()>,
}

async fn perform(actions: Vec<Action>, socket: &UdpSocket, tun: &mpsc::UnboundedSender<Vec<u8>>) {
    for a in actions {
        match a {
            Action::SendDatagram { to, data } => {
                socket.send_to(&data, to).await.unwrap();
            }
            Action::WriteTun(p) => {
                let _ = tun.send(p);
            }
        }
    }
}

impl Driven {
    pub async fn start(router: Router) -> Driven {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let router = Arc::new(Mutex::new(router));
        let (tun_tx, tun_rx) = mpsc::unbounded_channel();
        let task = {
            let router = Arc::clone(&router);
            let socket = Arc::clone(&socket);
            let tun_tx = tun_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                let mut tick = tokio::time::interval(TICK_INTERVAL);
                loop {
                    let mut out = Vec::new();
                    tokio::select! {
                        r = socket.recv_from(&mut buf) => {
                            let (n, src) = r.unwrap();
                            router.lock().unwrap().handle_datagram(src, &buf[..n], &mut out);
                        }
                        _ = tick.tick() => router.lock().unwrap().tick(&mut out),
                    }
                    perform(out, &socket, &tun_tx).await;
                }
            })
        };
        Driven {
            router,
            socket,
            tun_rx,
            tun_tx,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// As if `packet` had been read from this router's TUN.
    pub async fn inject_tun(&self, packet: &[u8]) {
        let mut out = Vec::new();
        self.router.lock().unwrap().handle_tun_packet(packet, &mut out);
        perform(out, &self.socket, &self.tun_tx).await;
    }

    /// The next packet written to this router's TUN that satisfies `want`.
    pub async fn next_tun(&mut self, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let p = self.tun_rx.recv().await.unwrap();
                if want(&p) {
                    return p;
                }
            }
        })
        .await
        .expect("no matching packet reached the TUN in time")
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        self.task.abort();
    }
}
