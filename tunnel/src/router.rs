//! The sans-IO WireGuard driver: many peers behind one (virtual) UDP socket and one (virtual) TUN.
//!
//! [`Router`] owns one boringtun [`Tunn`] per peer, the allowed-IPs table and a shared handshake
//! [`RateLimiter`]. Callers feed it IP packets read from the TUN
//! ([`Router::handle_tun_packet`]), datagrams received on the UDP socket
//! ([`Router::handle_datagram`]) and a periodic [`Router::tick`] (every [`TICK_INTERVAL`]); it
//! answers with [`Action`]s to perform. It performs no I/O itself.
//!
//! # Peer lookup
//!
//! - Handshake initiations carry the initiator's static key encrypted to ours: the key is
//!   recovered with [`parse_handshake_anon`] (after the MAC1 / cookie check, so unauthenticated
//!   junk never costs a Diffie-Hellman) and looked up; unknown keys are dropped.
//! - Every other message carries our *receiver index*. Each peer's `Tunn` is created with a
//!   unique 24-bit slot, and boringtun puts that slot in the upper 24 bits of every index it
//!   hands out, so `receiver_idx >> 8` names the peer (as in boringtun's own device).
//!
//! # Counters
//!
//! [`PeerStats::rx_bytes`] counts plaintext IP bytes delivered to the TUN (after the allowed-IPs
//! check); [`PeerStats::tx_bytes`] counts plaintext IP bytes encrypted toward the peer (packets
//! queued during a handshake count when they are sent). Neither includes WireGuard/UDP overhead
//! or keepalives. Drops are counted per cause in [`RouterCounters`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;
use rand_core::{OsRng, RngCore};

use crate::error::TunnelError;
use crate::keys::{PublicKey, StaticSecret, public_key_to_base64};

/// How often [`Router::tick`] should be called. Default 250 ms, like boringtun's device.
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);

/// Largest IP packet accepted from the TUN or produced for it (the IPv4 total-length limit).
pub const MAX_IP_PACKET: usize = 65_535;

/// Largest UDP datagram accepted from the network.
pub const MAX_DATAGRAM: usize = 65_535;

/// Handshake messages per second accepted before cookies are demanded (boringtun's device
/// uses the same value). Initiations pass the limiter twice — once before the peer lookup and
/// once inside `Tunn` — so about half as many initiations per second go through unchallenged.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// WireGuard data message overhead: 16-byte header + 16-byte AEAD tag.
const DATA_OVERHEAD: usize = 32;
/// Scratch buffer: room for the largest packet plus overhead (and ≥ 148, a handshake init).
const BUF_LEN: usize = MAX_IP_PACKET + DATA_OVERHEAD + 32;
/// WireGuard message type of a cookie reply.
const MSG_COOKIE_REPLY: u8 = 3;
/// Bound on the queued-packet flush loop (boringtun queues at most 256 packets per peer).
const MAX_FLUSH: usize = 1024;
/// Peer slots are 24-bit (boringtun shifts the index left by 8).
const SLOT_MASK: u32 = 0x00FF_FFFF;

/// A peer as configured by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's static public key: its identity.
    pub public_key: PublicKey,
    /// Where to send to before the peer has spoken. `None` waits for the peer to initiate (the
    /// coordinator's view of agents); the endpoint is then learned from authenticated packets.
    pub endpoint: Option<SocketAddr>,
    /// Overlay addresses routed to this peer and accepted as sources from it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle (keeps NAT mappings open). With an endpoint, a
    /// peer with keepalive also starts its handshake at the next tick and keeps retrying it.
    pub persistent_keepalive: Option<u16>,
}

/// What the I/O layer must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `data` on the UDP socket to `to`.
    SendDatagram { to: SocketAddr, data: Vec<u8> },
    /// Write this IP packet to the TUN device.
    WriteTun(Vec<u8>),
}

/// A snapshot of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    /// Current endpoint (configured or learned from the last authenticated packet).
    pub endpoint: Option<SocketAddr>,
    /// Time since the current session's handshake; `None` if there is no session.
    pub last_handshake_age: Option<Duration>,
    /// Plaintext IP bytes received from the peer and written to the TUN.
    pub rx_bytes: u64,
    /// Plaintext IP bytes encrypted and sent to the peer.
    pub tx_bytes: u64,
    pub allowed_ips: Vec<IpNet>,
}

/// Router-wide drop counters (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterCounters {
    /// Handshake initiations from a static key that is not a configured peer.
    pub unknown_peer: u64,
    /// Handshake responses, cookies or data whose receiver index matches no peer.
    pub unknown_index: u64,
    /// Decrypted packets whose source address is not in the sender's allowed IPs.
    pub spoofed_source: u64,
    /// TUN packets whose destination matches no peer's allowed IPs.
    pub no_route: u64,
    /// TUN packets for a peer whose endpoint is not known yet.
    pub no_endpoint: u64,
    /// Datagrams or TUN packets that do not parse (wrong size, type, IP header).
    pub malformed: u64,
    /// Datagrams that parsed but failed MAC, decryption, replay or handshake checks.
    pub rejected: u64,
    /// Cookie replies sent because handshakes arrived faster than the rate limit.
    pub cookies_sent: u64,
}

struct Peer {
    public_key: PublicKey,
    tunn: Tunn,
    slot: u32,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    keepalive: Option<u16>,
    rx_bytes: u64,
    /// tx bytes of earlier `Tunn`s of this peer (a keepalive change recreates the `Tunn`).
    tx_base: u64,
    /// Start a handshake at the next tick (persistent keepalive peers with an endpoint).
    initiate: bool,
}

impl Peer {
    fn stats(&self) -> PeerStats {
        let (age, tx, _rx, _loss, _rtt) = self.tunn.stats();
        PeerStats {
            public_key: self.public_key,
            endpoint: self.endpoint,
            last_handshake_age: age,
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_base.saturating_add(tx as u64),
            allowed_ips: self.allowed_ips.clone(),
        }
    }
}

/// Allowed-IPs table: longest prefix match, one owner per prefix.
#[derive(Default)]
struct AllowedIps {
    map: HashMap<IpNet, u32>,
    /// Prefix lengths present, with how many entries use each (v4 and v6 separately).
    v4_lens: BTreeMap<u8, usize>,
    v6_lens: BTreeMap<u8, usize>,
}

impl AllowedIps {
    fn lens_mut(&mut self, net: &IpNet) -> &mut BTreeMap<u8, usize> {
        match net {
            IpNet::V4(_) => &mut self.v4_lens,
            IpNet::V6(_) => &mut self.v6_lens,
        }
    }

    /// Inserts `net` (already truncated) for `slot`; returns the previous owner if different.
    fn insert(&mut self, net: IpNet, slot: u32) -> Option<u32> {
        match self.map.insert(net, slot) {
            Some(prev) => (prev != slot).then_some(prev),
            None => {
                *self.lens_mut(&net).entry(net.prefix_len()).or_default() += 1;
                None
            }
        }
    }

    /// Removes `net` if it is owned by `slot`.
    fn remove(&mut self, net: &IpNet, slot: u32) {
        if self.map.get(net) != Some(&slot) {
            return;
        }
        self.map.remove(net);
        let lens = self.lens_mut(net);
        if let Some(n) = lens.get_mut(&net.prefix_len()) {
            *n -= 1;
            if *n == 0 {
                lens.remove(&net.prefix_len());
            }
        }
    }

    fn lookup(&self, addr: IpAddr) -> Option<u32> {
        let lens = match addr {
            IpAddr::V4(_) => &self.v4_lens,
            IpAddr::V6(_) => &self.v6_lens,
        };
        lens.keys().rev().find_map(|&len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.map.get(&net).copied()
        })
    }
}

/// The WireGuard state machine driver for one local key and many peers. See the module docs.
pub struct Router {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    by_key: HashMap<PublicKey, u32>,
    peers: HashMap<u32, Peer>,
    table: AllowedIps,
    buf: Box<[u8]>,
    counters: RouterCounters,
}

impl Router {
    /// A router with no peers for the local private key.
    pub fn new(private: StaticSecret) -> Self {
        let public = PublicKey::from(&private);
        Router {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            by_key: HashMap::new(),
            peers: HashMap::new(),
            table: AllowedIps::default(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            counters: RouterCounters::default(),
        }
    }

    /// The local public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Adds a peer, or updates the peer with the same key.
    ///
    /// Updating keeps the current session unless `persistent_keepalive` changes (boringtun
    /// cannot change it in place, so the session is rebuilt and a new handshake follows). An
    /// update with `endpoint: None` keeps the endpoint already known. As in WireGuard, an
    /// allowed-IP prefix that belongs to another peer moves to this one.
    pub fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), TunnelError> {
        if cfg.public_key == self.public {
            return Err(TunnelError::InvalidPeer(
                "the peer's public key is this node's own key; each node needs its own key pair".to_string(),
            ));
        }
        let mut nets: Vec<IpNet> = cfg.allowed_ips.iter().map(IpNet::trunc).collect();
        nets.sort();
        nets.dedup();

        // Allocate before touching the tables so a failure leaves the router unchanged.
        let needs_new_tunn = match self.by_key.get(&cfg.public_key).and_then(|s| self.peers.get(s)) {
            Some(old) => old.keepalive != cfg.persistent_keepalive,
            None => true,
        };
        let new_slot = if needs_new_tunn { Some(self.alloc_slot()?) } else { None };
        let existing = self
            .by_key
            .get(&cfg.public_key)
            .and_then(|slot| self.peers.remove(slot));

        let peer = match existing {
            Some(mut old) => {
                for net in &old.allowed_ips {
                    self.table.remove(net, old.slot);
                }
                self.by_key.remove(&old.public_key);
                if let Some(ep) = cfg.endpoint {
                    old.endpoint = Some(ep);
                }
                if let Some(slot) = new_slot {
                    let (_, tx, _, _, _) = old.tunn.stats();
                    old.tx_base = old.tx_base.saturating_add(tx as u64);
                    old.tunn = self.new_tunn(&cfg, slot);
                    old.slot = slot;
                    old.keepalive = cfg.persistent_keepalive;
                    old.initiate = old.keepalive.is_some() && old.endpoint.is_some();
                } else if cfg.endpoint.is_some() && old.keepalive.is_some() {
                    old.initiate = old.tunn.time_since_last_handshake().is_none();
                }
                old.allowed_ips = nets;
                old
            }
            None => {
                let slot = match new_slot {
                    Some(slot) => slot,
                    None => self.alloc_slot()?,
                };
                Peer {
                    public_key: cfg.public_key,
                    tunn: self.new_tunn(&cfg, slot),
                    slot,
                    endpoint: cfg.endpoint,
                    allowed_ips: nets,
                    keepalive: cfg.persistent_keepalive,
                    rx_bytes: 0,
                    tx_base: 0,
                    initiate: cfg.persistent_keepalive.is_some() && cfg.endpoint.is_some(),
                }
            }
        };

        for net in &peer.allowed_ips {
            if let Some(prev) = self.table.insert(*net, peer.slot)
                && let Some(other) = self.peers.get_mut(&prev)
            {
                other.allowed_ips.retain(|n| n != net);
                tracing::info!(
                    allowed_ip = %net,
                    from = %public_key_to_base64(&other.public_key),
                    to = %public_key_to_base64(&peer.public_key),
                    "allowed IP moved to another WireGuard peer"
                );
            }
        }
        tracing::debug!(
            peer = %public_key_to_base64(&peer.public_key),
            endpoint = ?peer.endpoint,
            allowed_ips = ?peer.allowed_ips,
            keepalive = ?peer.keepalive,
            "WireGuard peer configured"
        );
        self.by_key.insert(peer.public_key, peer.slot);
        self.peers.insert(peer.slot, peer);
        Ok(())
    }

    /// Removes a peer; returns whether it existed. Its session and queued packets are dropped.
    pub fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(slot) = self.by_key.remove(key) else {
            return false;
        };
        if let Some(peer) = self.peers.remove(&slot) {
            for net in &peer.allowed_ips {
                self.table.remove(net, slot);
            }
        }
        tracing::debug!(peer = %public_key_to_base64(key), "WireGuard peer removed");
        true
    }

    fn alloc_slot(&self) -> Result<u32, TunnelError> {
        // Random slots make a removed peer's stale indices unlikely to hit its successor.
        for _ in 0..64 {
            let slot = OsRng.next_u32() & SLOT_MASK;
            if !self.peers.contains_key(&slot) {
                return Ok(slot);
            }
        }
        Err(TunnelError::InvalidPeer(format!(
            "no free peer index left ({} peers configured); remove unused peers",
            self.peers.len()
        )))
    }

    fn new_tunn(&self, cfg: &PeerConfig, slot: u32) -> Tunn {
        Tunn::new(
            self.private.clone(),
            cfg.public_key,
            None,
            cfg.persistent_keepalive,
            slot,
            Some(Arc::clone(&self.rate_limiter)),
        )
    }

    /// An IP packet read from the TUN: routed by destination (longest prefix over allowed IPs),
    /// encrypted, and emitted as [`Action::SendDatagram`]. Without a session the packet is
    /// queued inside the peer's `Tunn` and a handshake initiation is emitted instead.
    pub fn handle_tun_packet(&mut self, packet: &[u8], out: &mut Vec<Action>) {
        if packet.is_empty() || packet.len() > MAX_IP_PACKET {
            self.counters.malformed += 1;
            return;
        }
        let Some(dst) = Tunn::dst_address(packet) else {
            self.counters.malformed += 1;
            return;
        };
        let Some(slot) = self.table.lookup(dst) else {
            self.counters.no_route += 1;
            tracing::trace!(%dst, "no WireGuard peer for destination; dropped");
            return;
        };
        let Some(peer) = self.peers.get_mut(&slot) else {
            self.counters.no_route += 1;
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            self.counters.no_endpoint += 1;
            tracing::trace!(%dst, "WireGuard peer has no known endpoint yet; dropped");
            return;
        };
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(data) => out.push(Action::SendDatagram {
                to: endpoint,
                data: data.to_vec(),
            }),
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                tracing::debug!(error = ?e, %dst, "WireGuard encapsulation failed");
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// A UDP datagram from the network. See the module docs for how the peer is found.
    pub fn handle_datagram(&mut self, src: SocketAddr, datagram: &[u8], out: &mut Vec<Action>) {
        if datagram.len() > MAX_DATAGRAM {
            self.counters.malformed += 1;
            return;
        }
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.counters.malformed += 1;
                tracing::trace!(%src, len = datagram.len(), "malformed WireGuard datagram");
                return;
            }
        };

        let slot = match packet {
            Packet::HandshakeInit(ref init) => {
                // MAC1 (and, under load, MAC2/cookie) before any Diffie-Hellman.
                let mut cookie = [0u8; 64];
                match self.rate_limiter.verify_packet(Some(src.ip()), datagram, &mut cookie) {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        self.counters.cookies_sent += 1;
                        out.push(Action::SendDatagram {
                            to: src,
                            data: reply.to_vec(),
                        });
                        return;
                    }
                    Err(_) => {
                        self.counters.rejected += 1;
                        tracing::trace!(%src, "handshake initiation with bad MAC; dropped");
                        return;
                    }
                }
                let half = match parse_handshake_anon(&self.private, &self.public, init) {
                    Ok(h) => h,
                    Err(e) => {
                        self.counters.rejected += 1;
                        tracing::debug!(%src, error = ?e, "undecryptable handshake initiation");
                        return;
                    }
                };
                let key = PublicKey::from(half.peer_static_public);
                match self.by_key.get(&key) {
                    Some(&slot) => slot,
                    None => {
                        self.counters.unknown_peer += 1;
                        tracing::debug!(
                            %src,
                            peer = %public_key_to_base64(&key),
                            "handshake initiation from unknown WireGuard key; dropped"
                        );
                        return;
                    }
                }
            }
            Packet::HandshakeResponse(ref p) => p.receiver_idx >> 8,
            Packet::PacketCookieReply(ref p) => p.receiver_idx >> 8,
            Packet::PacketData(ref p) => p.receiver_idx >> 8,
        };
        let is_cookie = matches!(packet, Packet::PacketCookieReply(_));

        let Router {
            peers,
            table,
            buf,
            counters,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&slot) else {
            counters.unknown_index += 1;
            tracing::trace!(%src, slot, "WireGuard packet for unknown receiver index; dropped");
            return;
        };

        // Whether the datagram proved to come from the peer (endpoint roaming).
        let mut authenticated = false;
        let mut flush = false;
        match peer.tunn.decapsulate(Some(src.ip()), datagram, buf) {
            TunnResult::Done => authenticated = !is_cookie,
            TunnResult::Err(e) => {
                counters.rejected += 1;
                log_decap_error(src, &e);
            }
            TunnResult::WriteToNetwork(data) => {
                if data.first() == Some(&MSG_COOKIE_REPLY) {
                    counters.cookies_sent += 1;
                } else {
                    authenticated = true;
                    flush = true;
                }
                out.push(Action::SendDatagram {
                    to: src,
                    data: data.to_vec(),
                });
            }
            TunnResult::WriteToTunnelV4(data, from) => {
                authenticated = true;
                deliver(peer, table, counters, data, IpAddr::V4(from), out);
            }
            TunnResult::WriteToTunnelV6(data, from) => {
                authenticated = true;
                deliver(peer, table, counters, data, IpAddr::V6(from), out);
            }
        }

        if authenticated && peer.endpoint != Some(src) {
            tracing::debug!(
                peer = %public_key_to_base64(&peer.public_key),
                from = ?peer.endpoint,
                to = %src,
                "WireGuard peer endpoint updated"
            );
            peer.endpoint = Some(src);
        }

        if flush {
            // Packets queued while the handshake was in flight.
            for _ in 0..MAX_FLUSH {
                match peer.tunn.decapsulate(None, &[], buf) {
                    TunnResult::WriteToNetwork(data) => out.push(Action::SendDatagram {
                        to: src,
                        data: data.to_vec(),
                    }),
                    _ => break,
                }
            }
        }
    }

    /// Timers: keepalives, handshake retries and rekeys for every peer, plus the rate limiter's
    /// per-second reset. Call every [`TICK_INTERVAL`].
    pub fn tick(&mut self, out: &mut Vec<Action>) {
        self.rate_limiter.reset_count();
        let Router { peers, buf, .. } = self;
        for peer in peers.values_mut() {
            let endpoint = peer.endpoint;
            let result = if std::mem::take(&mut peer.initiate) && endpoint.is_some() {
                peer.tunn.format_handshake_initiation(buf, false)
            } else {
                match peer.tunn.update_timers(buf) {
                    TunnResult::Err(WireGuardError::ConnectionExpired)
                        if peer.keepalive.is_some() && endpoint.is_some() =>
                    {
                        // Like kernel WireGuard with persistent keepalive: keep trying. A new
                        // attempt starts only after the previous one gave up (90 s).
                        tracing::debug!(
                            peer = %public_key_to_base64(&peer.public_key),
                            "WireGuard session expired; starting a new handshake"
                        );
                        peer.tunn.format_handshake_initiation(buf, false)
                    }
                    other => other,
                }
            };
            match result {
                TunnResult::WriteToNetwork(data) => {
                    if let Some(to) = endpoint {
                        out.push(Action::SendDatagram {
                            to,
                            data: data.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => {
                    tracing::debug!(
                        peer = %public_key_to_base64(&peer.public_key),
                        error = ?e,
                        "WireGuard timer error"
                    );
                }
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }

    /// Snapshots of all peers (in no particular order).
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers.values().map(Peer::stats).collect()
    }

    /// Snapshot of one peer.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let slot = self.by_key.get(key)?;
        self.peers.get(slot).map(Peer::stats)
    }

    /// Router-wide drop counters.
    pub fn counters(&self) -> RouterCounters {
        self.counters
    }

    /// Number of configured peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }
}

/// Cryptokey routing on receive: write the packet to the TUN only if its source routes back to
/// the peer that sent it.
fn deliver(
    peer: &mut Peer,
    table: &AllowedIps,
    counters: &mut RouterCounters,
    data: &[u8],
    from: IpAddr,
    out: &mut Vec<Action>,
) {
    if table.lookup(from) == Some(peer.slot) {
        peer.rx_bytes = peer.rx_bytes.saturating_add(data.len() as u64);
        out.push(Action::WriteTun(data.to_vec()));
    } else {
        counters.spoofed_source += 1;
        tracing::debug!(
            peer = %public_key_to_base64(&peer.public_key),
            source = %from,
            "decrypted packet with a source outside the peer's allowed IPs; dropped"
        );
    }
}

fn log_decap_error(src: SocketAddr, e: &WireGuardError) {
    match e {
        // Routine: retransmits, reordering, sessions that just rotated.
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter | WireGuardError::NoCurrentSession => {
            tracing::trace!(%src, error = ?e, "WireGuard packet dropped");
        }
        _ => tracing::debug!(%src, error = ?e, "WireGuard packet rejected"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
