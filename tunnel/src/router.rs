//! The sans-IO WireGuard driver: many peers behind one (virtual) UDP socket and one (virtual) TUN.
//!
//! [`Router`] owns one boringtun [`Tunn`] per peer, the allowed-IPs table and the handshake
//! rate limit. Callers feed it IP packets read from the TUN
//! ([`Router::handle_tun_packet`]), datagrams received on the UDP socket
//! ([`Router::handle_datagram`]) and a periodic [`Router::tick`] (every [`TICK_INTERVAL`]); it
//! answers with [`Action`]s to perform. It performs no I/O itself.
//!
//! # Peer lookup
//!
//! - Handshake initiations carry the initiator's static key encrypted to ours: the key is
//!   recovered with [`parse_handshake_anon`] (after the MAC1 / cookie check, so unauthenticated
//!   junk never costs a Diffie-Hellman) and looked up; unknown keys are dropped.
//! - Every other message carries our *receiver index*. Each `Tunn` is created with a unique
//!   24-bit slot, and boringtun puts that slot in the upper 24 bits of every index it hands
//!   out, so `receiver_idx >> 8` names the session and through it the peer (as in boringtun's
//!   own device).
//!
//! # Handshake rate limit
//!
//! Handshake messages with a valid MAC1 (initiations, and responses to our initiations) are
//! counted per second; up to [`Router::handshake_rate_limit`] (by default
//! [`handshake_rate_limit`] of the number of peers: 100, or one per 10 peers) are processed.
//! Beyond it a message is processed only with a valid cookie for its source address, otherwise
//! it is answered with a cookie reply before any Diffie-Hellman (WireGuard's under-load mode,
//! through boringtun's [`RateLimiter`]). Each message is counted once (boringtun's own device
//! counts an initiation twice: before the peer lookup and again inside `Tunn`).
//!
//! # Key rotation
//!
//! A `Tunn` is bound to one (local key, peer key) pair, so a peer has up to three sessions,
//! each a `Tunn` with its own slot: *main* (sends, runs timers), *pending* (a handshake on
//! another key pair) and *retired* (the previous main, decrypt-only for [`RETIRED_LINGER`]).
//!
//! - Coordinator side, [`Router::start_key_rotation`]: the router keeps the previous key and
//!   answers initiations to either. The addressed key is found by MAC1 (keyed by the
//!   responder's public key) before any Diffie-Hellman. An initiation on a key pair other than
//!   main's creates the pending session; the peer's first data packet on it (boringtun's
//!   initiator sends a keepalive right after the response) promotes it to main.
//!   [`PeerStats::local_key`] tells which key each peer's session uses.
//!   [`Router::finish_key_rotation`] forgets the previous key and ends sessions still on it.
//! - Agent side, [`Router::set_peer_public_key`]: a pending session toward the new peer key
//!   initiates at once; traffic stays on main until the handshake response promotes it.
//!
//! # Counters
//!
//! [`PeerStats::rx_bytes`] counts plaintext IP bytes delivered to the TUN (after the allowed-IPs
//! check); [`PeerStats::tx_bytes`] counts plaintext IP bytes encrypted toward the peer (packets
//! queued during a handshake count when they are sent). Neither includes WireGuard/UDP overhead
//! or keepalives. Drops are counted per cause in [`RouterCounters`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// Least handshake messages (initiations and responses with a valid MAC1) per second the
/// router accepts before it demands cookies; boringtun's device uses this value for any number
/// of peers. See [`handshake_rate_limit`] for the limit that scales with the peers.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Configured peers per handshake message per second of the default limit
/// ([`handshake_rate_limit`]): 10 000 peers get 1 000 per second.
pub const PEERS_PER_HANDSHAKE_PER_SEC: u64 = 10;

/// The default handshake rate limit for a router with `peers` configured peers: one message
/// per second per [`PEERS_PER_HANDSHAKE_PER_SEC`] peers, at least [`HANDSHAKE_RATE_LIMIT`].
///
/// Every WireGuard session is renewed after 120 s, so `peers` sessions cost `peers / 120`
/// handshakes per second in steady state: the limit leaves 12× headroom for that (10 000 peers:
/// 83/s of 1 000/s), and lets a tenth of the fleet reconnect per second without cookies (all of
/// it within 10 s after a coordinator restart). Beyond the limit the router answers with cookie
/// replies (WireGuard's under-load mode): an initiator that owns its source address retries with
/// the cookie and is served, a flood from spoofed addresses costs no Diffie-Hellman.
pub const fn handshake_rate_limit(peers: usize) -> u64 {
    let scaled = peers as u64 / PEERS_PER_HANDSHAKE_PER_SEC;
    if scaled > HANDSHAKE_RATE_LIMIT {
        scaled
    } else {
        HANDSHAKE_RATE_LIMIT
    }
}

/// How long one count of handshake messages lasts (the limit is per second): the first message
/// after a window has ended starts the next one.
const HANDSHAKE_WINDOW: Duration = Duration::from_secs(1);

/// WireGuard data message overhead: 16-byte header + 16-byte AEAD tag.
const DATA_OVERHEAD: usize = 32;
/// Scratch buffer: room for the largest packet plus overhead (and ≥ 148, a handshake init).
const BUF_LEN: usize = MAX_IP_PACKET + DATA_OVERHEAD + 32;
/// WireGuard message type of a cookie reply.
const MSG_COOKIE_REPLY: u8 = 3;
/// WireGuard message type and size of a handshake initiation.
const MSG_HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_INIT_LEN: usize = 148;
/// Scratch space [`Initiation::answer`] needs: a queued packet may be as large as the largest
/// IP packet, plus WireGuard overhead.
pub const SCRATCH_LEN: usize = BUF_LEN;
/// Bound on the queued-packet flush loop (boringtun queues at most 256 packets per peer).
const MAX_FLUSH: usize = 1024;
/// How long a session replaced by a key change keeps decrypting packets still in flight.
pub const RETIRED_LINGER: Duration = Duration::from_secs(10);
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
    /// Which of this router's own keys the session in use was made with (on the coordinator:
    /// which coordinator key the agent is on). `None` if there is no session. During a key
    /// rotation ([`Router::start_key_rotation`]) the coordinator watches this move from
    /// [`LocalKey::Previous`] to [`LocalKey::Current`] for every agent before finishing it.
    pub local_key: Option<LocalKey>,
    /// A handshake on another key pair is under way beside the session in use (after
    /// [`Router::set_peer_public_key`], or on the coordinator while an agent moves to the new
    /// key); traffic keeps using the old session until the new one is confirmed.
    pub key_change_pending: bool,
    /// Plaintext IP bytes received from the peer and written to the TUN.
    pub rx_bytes: u64,
    /// Plaintext IP bytes encrypted and sent to the peer.
    pub tx_bytes: u64,
    pub allowed_ips: Vec<IpNet>,
}

/// Which of the router's own static keys a session uses.
///
/// Labels are relative: [`Router::start_key_rotation`] turns every `Current` session into a
/// `Previous` one, and [`Router::finish_key_rotation`] ends the `Previous` sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LocalKey {
    /// The key returned by [`Router::public_key`].
    Current,
    /// The key being rotated away from ([`Router::previous_public_key`]).
    Previous,
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
    /// Handshake initiations the I/O layer dropped before the router saw them, because its queue
    /// to the handshake workers was full (initiations arriving faster than the cores answer them;
    /// the initiators retry after 5 s). See [`Router::count_initiation_dropped`].
    pub handshake_queue_full: u64,
}

/// One of this router's static key pairs, with the two boringtun [`RateLimiter`]s bound to it
/// (MAC1 and cookies are keyed by the receiver's public key, so each local key needs its own).
///
/// The router counts handshake messages itself (the limit follows the number of peers, which a
/// boringtun limiter cannot change) and uses the limiters only for their checks:
/// - `macs` never finds itself under load: it checks MAC1 only. Every `Tunn` of this key gets
///   it, so the check inside `Tunn::decapsulate` neither counts a message a second time nor
///   demands a cookie on its own.
/// - `cookies` is always under load: it checks MAC1 and MAC2 (the cookie) and formats cookie
///   replies. The router asks it only while over the limit.
struct LocalKeyPair {
    private: StaticSecret,
    public: PublicKey,
    macs: Arc<RateLimiter>,
    cookies: RateLimiter,
}

impl LocalKeyPair {
    fn new(private: StaticSecret) -> Self {
        let public = PublicKey::from(&private);
        LocalKeyPair {
            macs: Arc::new(RateLimiter::new(&public, u64::MAX)),
            cookies: RateLimiter::new(&public, 0),
            private,
            public,
        }
    }
}

/// Handshake messages counted in the current one-second window, and the limit.
struct HandshakeBudget {
    /// Set by [`Router::set_handshake_rate_limit`]; `None` follows [`handshake_rate_limit`].
    fixed: Option<u64>,
    count: u64,
    window_start: Instant,
}

/// One boringtun `Tunn`: a (local key, peer key) pair and its own 24-bit index slot.
///
/// The `Tunn` has a lock of its own so that answering a handshake initiation (three of its
/// five Diffie-Hellman operations) can run outside the router: see [`Initiation`]. Every other
/// use locks it briefly while the router itself is borrowed; nothing holds a `Tunn` lock while
/// it waits for the router.
struct Session {
    tunn: Arc<Mutex<Tunn>>,
    slot: u32,
    local: LocalKey,
    peer_key: PublicKey,
}

impl Session {
    fn tunn(&self) -> MutexGuard<'_, Tunn> {
        lock_tunn(&self.tunn)
    }

    fn has_session(&self) -> bool {
        self.tunn().time_since_last_handshake().is_some()
    }

    fn tx(&self) -> u64 {
        self.tunn().stats().1 as u64
    }
}

/// A `Tunn` lock; a panic while it was held (inside boringtun) leaves a session that at worst
/// fails its next packet, so poisoning is ignored.
fn lock_tunn(tunn: &Mutex<Tunn>) -> MutexGuard<'_, Tunn> {
    tunn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A handshake initiation that passed the router's checks: MAC1, the rate limit (or a valid
/// cookie), the initiator's static key (decrypted with our key) naming a configured peer. What
/// remains — the `Tunn` checks the timestamp, derives the session and writes the response, three
/// Diffie-Hellman operations — needs only that peer's session: [`Initiation::answer`] runs it
/// without the router, so several initiations can be answered on several cores while the router
/// serves other datagrams. [`Router::finish_initiation`] then records the result.
///
/// [`Router::handle_datagram`] does all three steps in a row.
pub struct Initiation {
    src: SocketAddr,
    id: u32,
    slot: u32,
    tunn: Arc<Mutex<Tunn>>,
    datagram: Vec<u8>,
}

/// The outcome of [`Initiation::answer`], for [`Router::finish_initiation`].
pub struct AnsweredInitiation {
    src: SocketAddr,
    id: u32,
    slot: u32,
    /// The handshake response followed by any packets queued for the peer, or why not.
    result: Result<Vec<Vec<u8>>, WireGuardError>,
}

impl Initiation {
    /// Lets the peer's `Tunn` process the initiation (locks only that session). `buf` is
    /// scratch space of at least [`SCRATCH_LEN`] bytes.
    pub fn answer(self, buf: &mut [u8]) -> AnsweredInitiation {
        let mut tunn = lock_tunn(&self.tunn);
        let result = match tunn.decapsulate(Some(self.src.ip()), &self.datagram, buf) {
            TunnResult::WriteToNetwork(data) => {
                let mut packets = vec![data.to_vec()];
                // Packets queued while the handshake was in flight.
                for _ in 0..MAX_FLUSH {
                    match tunn.decapsulate(None, &[], buf) {
                        TunnResult::WriteToNetwork(data) => packets.push(data.to_vec()),
                        _ => break,
                    }
                }
                Ok(packets)
            }
            TunnResult::Err(e) => Err(e),
            // An initiation yields a response or an error; anything else is not an answer.
            TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Err(WireGuardError::UnexpectedPacket)
            }
        };
        AnsweredInitiation {
            src: self.src,
            id: self.id,
            slot: self.slot,
            result,
        }
    }
}

/// Whether `datagram` looks like a handshake initiation (type and size only; nothing is
/// checked). The I/O layer uses it to hand initiations to [`Router::accept_initiation`].
pub fn is_handshake_initiation(datagram: &[u8]) -> bool {
    datagram.len() == HANDSHAKE_INIT_LEN && datagram.first() == Some(&MSG_HANDSHAKE_INIT)
}

/// Which of a peer's sessions a datagram belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Main,
    Pending,
    Retired,
}

struct Peer {
    /// Stable identity in `peers` and the allowed-IPs table (independent of session slots).
    id: u32,
    public_key: PublicKey,
    /// The session used for sending and timers.
    main: Session,
    /// A handshake on another (local key, peer key) pair. Promoted to `main` once the peer
    /// proves it uses it (a handshake response, or the first data packet on it).
    pending: Option<Box<Session>>,
    /// The previous `main` after a promotion: only decrypts packets still in flight, never
    /// sends, and is dropped after [`RETIRED_LINGER`].
    retired: Option<(Box<Session>, Instant)>,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    keepalive: Option<u16>,
    rx_bytes: u64,
    /// tx bytes of earlier `Tunn`s of this peer (rekeys and key changes replace the `Tunn`).
    tx_base: u64,
    /// Start a handshake at the next tick (persistent keepalive peers with an endpoint).
    initiate: bool,
}

impl Peer {
    fn stats(&self) -> PeerStats {
        let age = self.main.tunn().time_since_last_handshake();
        let pending_tx = self.pending.as_deref().map_or(0, Session::tx);
        PeerStats {
            public_key: self.public_key,
            endpoint: self.endpoint,
            last_handshake_age: age,
            local_key: age.map(|_| self.main.local),
            key_change_pending: self.pending.is_some(),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_base.saturating_add(self.main.tx()).saturating_add(pending_tx),
            allowed_ips: self.allowed_ips.clone(),
        }
    }

    /// Moves the endpoint to where an authenticated message came from (WireGuard roaming).
    fn roam_to(&mut self, src: SocketAddr) {
        if self.endpoint != Some(src) {
            tracing::debug!(
                peer = %public_key_to_base64(&self.public_key),
                from = ?self.endpoint,
                to = %src,
                "WireGuard peer endpoint updated"
            );
            self.endpoint = Some(src);
        }
    }

    fn session(&self, which: Which) -> Option<&Session> {
        match which {
            Which::Main => Some(&self.main),
            Which::Pending => self.pending.as_deref(),
            Which::Retired => self.retired.as_ref().map(|(s, _)| &**s),
        }
    }

    fn session_mut(&mut self, which: Which) -> Option<&mut Session> {
        match which {
            Which::Main => Some(&mut self.main),
            Which::Pending => self.pending.as_deref_mut(),
            Which::Retired => self.retired.as_mut().map(|(s, _)| &mut **s),
        }
    }

    /// Which session owns index slot `slot`.
    fn which(&self, slot: u32) -> Option<Which> {
        if self.main.slot == slot {
            Some(Which::Main)
        } else if self.pending.as_ref().is_some_and(|s| s.slot == slot) {
            Some(Which::Pending)
        } else if self.retired.as_ref().is_some_and(|(s, _)| s.slot == slot) {
            Some(Which::Retired)
        } else {
            None
        }
    }

    /// Slots of all sessions (for unregistering the peer).
    fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.main.slot)
            .chain(self.pending.as_ref().map(|s| s.slot))
            .chain(self.retired.as_ref().map(|(s, _)| s.slot))
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

/// The WireGuard state machine driver for one local key (two during a key rotation) and many
/// peers. See the module docs.
pub struct Router {
    local: LocalKeyPair,
    /// The key being rotated away from; handshakes addressed to it are still answered.
    previous: Option<LocalKeyPair>,
    /// Peer public key → peer id.
    by_key: HashMap<PublicKey, u32>,
    /// Session index slot → peer id (a peer has up to three sessions, each with its own slot).
    by_slot: HashMap<u32, u32>,
    /// Boxed, like the pending and retired sessions: a boringtun `Tunn` is about 11 KB inline,
    /// and an unboxed map reserves that much per bucket, times up to three sessions per peer
    /// (68 KB per configured peer at 1 000 peers before this; see the bench's `wg-peers`).
    peers: HashMap<u32, Box<Peer>>,
    table: AllowedIps,
    buf: Box<[u8]>,
    counters: RouterCounters,
    handshakes: HandshakeBudget,
}

/// What [`Router::admit_handshake`] decided.
enum Admission {
    /// Within the limit, or over it with a valid cookie: process the message.
    Process,
    /// Over the limit without a valid cookie: a cookie reply was queued (or nothing, if it
    /// could not be formatted); drop the message.
    Refused,
}

impl Router {
    /// A router with no peers for the local private key.
    pub fn new(private: StaticSecret) -> Self {
        Router {
            local: LocalKeyPair::new(private),
            previous: None,
            by_key: HashMap::new(),
            by_slot: HashMap::new(),
            peers: HashMap::new(),
            table: AllowedIps::default(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            counters: RouterCounters::default(),
            handshakes: HandshakeBudget {
                fixed: None,
                count: 0,
                window_start: Instant::now(),
            },
        }
    }

    /// Counts a handshake initiation the I/O layer dropped because its handshake queue was full
    /// ([`RouterCounters::handshake_queue_full`]).
    pub fn count_initiation_dropped(&mut self) {
        self.counters.handshake_queue_full += 1;
    }

    /// Handshake messages per second accepted before cookies are demanded: the value set with
    /// [`Router::set_handshake_rate_limit`], else [`handshake_rate_limit`] of the number of
    /// configured peers.
    pub fn handshake_rate_limit(&self) -> u64 {
        self.handshakes
            .fixed
            .unwrap_or_else(|| handshake_rate_limit(self.peers.len()))
    }

    /// Fixes the handshake rate limit (messages per second; 0 demands a cookie for every
    /// handshake), or with `None` lets it follow the number of peers again (the default).
    pub fn set_handshake_rate_limit(&mut self, limit: Option<u64>) {
        self.handshakes.fixed = limit;
    }

    /// Counts a handshake message whose MAC1 is valid for `local` and decides whether it may
    /// cost a Diffie-Hellman: within the limit it may; over it only with a valid cookie (MAC2)
    /// for `src`, otherwise a cookie reply goes back to `src`.
    fn admit_handshake(
        &mut self,
        local: LocalKey,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<Action>,
    ) -> Admission {
        let limit = self.handshake_rate_limit();
        let now = Instant::now();
        if now.duration_since(self.handshakes.window_start) >= HANDSHAKE_WINDOW {
            self.handshakes.count = 0;
            self.handshakes.window_start = now;
        }
        let count = self.handshakes.count;
        self.handshakes.count = count.saturating_add(1);
        if count < limit {
            return Admission::Process;
        }
        let Some(kp) = self.key_pair(local) else {
            return Admission::Refused;
        };
        let mut reply = [0u8; 64];
        match kp.cookies.verify_packet(Some(src.ip()), datagram, &mut reply) {
            Ok(_) => Admission::Process,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                out.push(Action::SendDatagram {
                    to: src,
                    data: cookie.to_vec(),
                });
                self.counters.cookies_sent += 1;
                Admission::Refused
            }
            Err(_) => Admission::Refused,
        }
    }

    /// The local public key (the new one once a key rotation has started).
    pub fn public_key(&self) -> PublicKey {
        self.local.public
    }

    /// The key being rotated away from, while a key rotation is in progress.
    pub fn previous_public_key(&self) -> Option<PublicKey> {
        self.previous.as_ref().map(|k| k.public)
    }

    /// Starts rotating this router's static key to `new` (the coordinator side of a key
    /// rotation). Returns the new public key.
    ///
    /// From now on handshake initiations addressed to either key are answered: the responder
    /// key is recognised by the initiation's MAC1 (keyed by the responder's public key), before
    /// any Diffie-Hellman. Sessions made before stay up and keep carrying traffic (they are now
    /// reported as [`LocalKey::Previous`] in [`PeerStats::local_key`]); a peer that hands-shakes
    /// on the new key moves to it without a gap. New handshakes this router initiates use the
    /// key of the peer's session in use. Call [`Router::finish_key_rotation`] once every peer
    /// reports [`LocalKey::Current`] (or the overlap has expired).
    ///
    /// Errors: a rotation is already in progress, or `new` is the current key or a peer's key.
    pub fn start_key_rotation(&mut self, new: StaticSecret) -> Result<PublicKey, TunnelError> {
        if let Some(prev) = &self.previous {
            return Err(TunnelError::KeyRotation(format!(
                "a key rotation away from {} is already in progress; finish it \
                 (finish_key_rotation) before starting another",
                public_key_to_base64(&prev.public)
            )));
        }
        let next = LocalKeyPair::new(new);
        if next.public == self.local.public {
            return Err(TunnelError::KeyRotation(
                "the new key is the key already in use; generate a fresh key for the rotation".to_string(),
            ));
        }
        if self.by_key.contains_key(&next.public) {
            return Err(TunnelError::KeyRotation(
                "the new key is a peer's public key; generate a fresh key for the rotation".to_string(),
            ));
        }
        let old = std::mem::replace(&mut self.local, next);
        for peer in self.peers.values_mut() {
            for s in std::iter::once(&mut peer.main)
                .chain(peer.pending.as_deref_mut())
                .chain(peer.retired.as_mut().map(|(s, _)| &mut **s))
            {
                s.local = LocalKey::Previous;
            }
        }
        tracing::info!(
            old = %public_key_to_base64(&old.public),
            new = %public_key_to_base64(&self.local.public),
            "WireGuard key rotation started; both keys are answered"
        );
        self.previous = Some(old);
        Ok(self.local.public)
    }

    /// Ends a key rotation: the previous key is forgotten. Peers whose session still used it
    /// lose that session (queued packets are dropped) and must hand-shake again on the current
    /// key; a handshake to the old key is then refused like one to any unknown key. Returns
    /// how many peers lost an established session.
    ///
    /// Errors: no rotation is in progress.
    pub fn finish_key_rotation(&mut self) -> Result<usize, TunnelError> {
        let Some(old) = self.previous.take() else {
            return Err(TunnelError::KeyRotation(
                "no key rotation is in progress; start one with start_key_rotation".to_string(),
            ));
        };
        let mut cut = 0;
        let ids: Vec<u32> = self.peers.keys().copied().collect();
        for id in ids {
            let Some(mut peer) = self.peers.remove(&id) else {
                continue;
            };
            if let Some((r, _)) = peer.retired.take_if(|(s, _)| s.local == LocalKey::Previous) {
                self.by_slot.remove(&r.slot);
            }
            if let Some(p) = peer.pending.take_if(|s| s.local == LocalKey::Previous) {
                peer.tx_base = peer.tx_base.saturating_add(p.tx());
                self.by_slot.remove(&p.slot);
            }
            if peer.main.local == LocalKey::Previous {
                if peer.main.has_session() {
                    cut += 1;
                }
                let replacement = match peer.pending.take() {
                    Some(p) => Some(*p),
                    None => match self.alloc_slot() {
                        Ok(slot) => {
                            self.by_slot.insert(slot, id);
                            Some(new_session(
                                &self.local,
                                LocalKey::Current,
                                peer.public_key,
                                peer.keepalive,
                                slot,
                            ))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot rebuild a WireGuard session after key rotation");
                            None
                        }
                    },
                };
                if let Some(replacement) = replacement {
                    let old_main = std::mem::replace(&mut peer.main, replacement);
                    peer.tx_base = peer.tx_base.saturating_add(old_main.tx());
                    self.by_slot.remove(&old_main.slot);
                    peer.initiate = peer.keepalive.is_some() && peer.endpoint.is_some();
                }
            }
            self.peers.insert(id, peer);
        }
        tracing::info!(
            retired = %public_key_to_base64(&old.public),
            current = %public_key_to_base64(&self.local.public),
            sessions_cut = cut,
            "WireGuard key rotation finished; the previous key is no longer answered"
        );
        Ok(cut)
    }

    /// Replaces the public key of the peer `old` by `new`, live (the agent side of a key
    /// rotation: the coordinator announced its next key).
    ///
    /// A handshake toward `new` starts at once (its initiation is pushed to `out` when the
    /// peer's endpoint is known, and retried by [`Router::tick`]). Until the peer answers it,
    /// traffic keeps flowing on the session with `old`; packets sent while neither session is
    /// up are queued (up to boringtun's 256 per session). Once the new session is confirmed
    /// it carries all traffic; packets still in flight on the old one are accepted for a few
    /// seconds ([`RETIRED_LINGER`]). Allowed IPs, endpoint, keepalive and counters are kept.
    /// Handshakes the peer initiates with `old` are refused from now on.
    ///
    /// Errors: no peer has key `old`; `new` is this router's key or another peer's key.
    pub fn set_peer_public_key(
        &mut self,
        old: &PublicKey,
        new: PublicKey,
        out: &mut Vec<Action>,
    ) -> Result<(), TunnelError> {
        let Some(&id) = self.by_key.get(old) else {
            return Err(TunnelError::InvalidPeer(format!(
                "no peer has the key {}; add the peer before changing its key",
                public_key_to_base64(old)
            )));
        };
        if new == *old {
            return Ok(());
        }
        if new == self.local.public || self.previous.as_ref().is_some_and(|p| p.public == new) {
            return Err(TunnelError::InvalidPeer(
                "the peer's new public key is this node's own key; each node needs its own key pair".to_string(),
            ));
        }
        if self.by_key.contains_key(&new) {
            return Err(TunnelError::InvalidPeer(format!(
                "another peer already has the key {}; remove it first",
                public_key_to_base64(&new)
            )));
        }
        let slot = self.alloc_slot()?;
        let Some(peer) = self.peers.get_mut(&id) else {
            return Err(TunnelError::InvalidPeer("peer table is inconsistent".to_string()));
        };
        let session = new_session(&self.local, LocalKey::Current, new, peer.keepalive, slot);
        self.by_slot.insert(slot, id);
        if let Some(endpoint) = peer.endpoint
            && let TunnResult::WriteToNetwork(data) = session.tunn().format_handshake_initiation(&mut self.buf, false)
        {
            out.push(Action::SendDatagram {
                to: endpoint,
                data: data.to_vec(),
            });
        }
        if let Some(p) = peer.pending.replace(Box::new(session)) {
            peer.tx_base = peer.tx_base.saturating_add(p.tx());
            self.by_slot.remove(&p.slot);
        }
        peer.public_key = new;
        self.by_key.remove(old);
        self.by_key.insert(new, id);
        tracing::info!(
            old = %public_key_to_base64(old),
            new = %public_key_to_base64(&new),
            "WireGuard peer key changing; handshaking with the new key"
        );
        Ok(())
    }

    /// Adds a peer, or updates the peer with the same key.
    ///
    /// Updating keeps the current session unless `persistent_keepalive` changes (boringtun
    /// cannot change it in place, so the session is rebuilt and a new handshake follows). An
    /// update with `endpoint: None` keeps the endpoint already known. As in WireGuard, an
    /// allowed-IP prefix that belongs to another peer moves to this one.
    pub fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), TunnelError> {
        if cfg.public_key == self.local.public || self.previous.as_ref().is_some_and(|p| p.public == cfg.public_key) {
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
        let existing = self.by_key.get(&cfg.public_key).and_then(|id| self.peers.remove(id));

        let peer = match existing {
            Some(mut old) => {
                for net in &old.allowed_ips {
                    self.table.remove(net, old.id);
                }
                if let Some(ep) = cfg.endpoint {
                    old.endpoint = Some(ep);
                }
                if let Some(slot) = new_slot {
                    // Rebuild on the same local key, toward the configured key; any key change
                    // in flight is abandoned.
                    let local = old.main.local;
                    let kp = match local {
                        LocalKey::Previous => self.previous.as_ref().unwrap_or(&self.local),
                        LocalKey::Current => &self.local,
                    };
                    let fresh = new_session(kp, local, cfg.public_key, cfg.persistent_keepalive, slot);
                    let stale: Vec<u32> = old.slots().collect();
                    for s in stale {
                        self.by_slot.remove(&s);
                    }
                    old.tx_base = old
                        .tx_base
                        .saturating_add(old.main.tx())
                        .saturating_add(old.pending.as_deref().map_or(0, Session::tx));
                    old.main = fresh;
                    old.pending = None;
                    old.retired = None;
                    self.by_slot.insert(slot, old.id);
                    old.keepalive = cfg.persistent_keepalive;
                    old.initiate = old.keepalive.is_some() && old.endpoint.is_some();
                } else if cfg.endpoint.is_some() && old.keepalive.is_some() {
                    old.initiate = !old.main.has_session();
                }
                old.allowed_ips = nets;
                old
            }
            None => {
                let Some(slot) = new_slot else {
                    return Err(TunnelError::InvalidPeer("peer table is inconsistent".to_string()));
                };
                self.by_slot.insert(slot, slot);
                Box::new(Peer {
                    id: slot,
                    public_key: cfg.public_key,
                    main: new_session(
                        &self.local,
                        LocalKey::Current,
                        cfg.public_key,
                        cfg.persistent_keepalive,
                        slot,
                    ),
                    pending: None,
                    retired: None,
                    endpoint: cfg.endpoint,
                    allowed_ips: nets,
                    keepalive: cfg.persistent_keepalive,
                    rx_bytes: 0,
                    tx_base: 0,
                    initiate: cfg.persistent_keepalive.is_some() && cfg.endpoint.is_some(),
                })
            }
        };

        for net in &peer.allowed_ips {
            if let Some(prev) = self.table.insert(*net, peer.id)
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
        self.by_key.insert(peer.public_key, peer.id);
        self.peers.insert(peer.id, peer);
        Ok(())
    }

    /// Removes a peer; returns whether it existed. Its session and queued packets are dropped.
    pub fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(id) = self.by_key.remove(key) else {
            return false;
        };
        if let Some(peer) = self.peers.remove(&id) {
            for net in &peer.allowed_ips {
                self.table.remove(net, id);
            }
            for s in peer.slots() {
                self.by_slot.remove(&s);
            }
        }
        tracing::debug!(peer = %public_key_to_base64(key), "WireGuard peer removed");
        true
    }

    fn alloc_slot(&self) -> Result<u32, TunnelError> {
        // Random slots make a removed peer's stale indices unlikely to hit its successor.
        for _ in 0..64 {
            let slot = OsRng.next_u32() & SLOT_MASK;
            if !self.peers.contains_key(&slot) && !self.by_slot.contains_key(&slot) {
                return Ok(slot);
            }
        }
        Err(TunnelError::InvalidPeer(format!(
            "no free peer index left ({} peers configured); remove unused peers",
            self.peers.len()
        )))
    }

    fn key_pair(&self, which: LocalKey) -> Option<&LocalKeyPair> {
        match which {
            LocalKey::Current => Some(&self.local),
            LocalKey::Previous => self.previous.as_ref(),
        }
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
        let Some(id) = self.table.lookup(dst) else {
            self.counters.no_route += 1;
            tracing::trace!(%dst, "no WireGuard peer for destination; dropped");
            return;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            self.counters.no_route += 1;
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            self.counters.no_endpoint += 1;
            tracing::trace!(%dst, "WireGuard peer has no known endpoint yet; dropped");
            return;
        };
        // The session in use; during a key change with no old session left, the new one
        // (which queues the packet until its handshake completes).
        let session = match peer.pending.as_mut() {
            Some(p) if !peer.main.has_session() => p,
            _ => &mut peer.main,
        };
        match session.tunn().encapsulate(packet, &mut self.buf) {
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

        let (id, which) = match packet {
            Packet::HandshakeInit(ref init) => {
                if let Some(initiation) = self.accept_parsed_initiation(src, datagram, init, out) {
                    let answered = initiation.answer(&mut self.buf);
                    self.finish_initiation(answered, out);
                }
                return;
            }
            Packet::HandshakeResponse(ref p) => match self.route_index(src, p.receiver_idx) {
                Some(found) => {
                    // Counted like initiations (boringtun's limiter counts both): MAC1 is keyed
                    // by our key of the session the response answers.
                    let local = self
                        .peers
                        .get(&found.0)
                        .and_then(|peer| peer.session(found.1))
                        .map(|s| s.local);
                    let Some(local) = local.filter(|&l| self.mac1_valid(l, src, datagram)) else {
                        self.counters.rejected += 1;
                        tracing::trace!(%src, "handshake response with bad MAC; dropped");
                        return;
                    };
                    if let Admission::Refused = self.admit_handshake(local, src, datagram, out) {
                        return;
                    }
                    found
                }
                None => return,
            },
            Packet::PacketCookieReply(ref p) => match self.route_index(src, p.receiver_idx) {
                Some(found) => found,
                None => return,
            },
            Packet::PacketData(ref p) => match self.route_index(src, p.receiver_idx) {
                Some(found) => found,
                None => return,
            },
        };
        let is_cookie = matches!(packet, Packet::PacketCookieReply(_));
        // Proof that the peer holds the keys of this session (the responder learns it from
        // the first data packet, the initiator from the handshake response).
        let confirms = matches!(packet, Packet::PacketData(_) | Packet::HandshakeResponse(_));

        let Router {
            peers,
            by_slot,
            table,
            buf,
            counters,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&id) else {
            counters.unknown_index += 1;
            return;
        };
        let Some(session) = peer.session_mut(which) else {
            counters.unknown_index += 1;
            return;
        };

        // Whether the datagram proved to come from the peer (endpoint roaming).
        let mut authenticated = false;
        let mut flush = false;
        let mut delivered: Option<(Vec<u8>, IpAddr)> = None;
        match session.tunn().decapsulate(Some(src.ip()), datagram, buf) {
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
                delivered = Some((data.to_vec(), IpAddr::V4(from)));
            }
            TunnResult::WriteToTunnelV6(data, from) => {
                authenticated = true;
                delivered = Some((data.to_vec(), IpAddr::V6(from)));
            }
        }
        if let Some((data, from)) = delivered {
            deliver(peer, table, counters, &data, from, out);
        }

        if authenticated {
            peer.roam_to(src);
        }

        let mut which = which;
        if authenticated && confirms && which == Which::Pending {
            promote(peer, by_slot);
            which = Which::Main;
        }

        if flush && let Some(session) = peer.session_mut(which) {
            // Packets queued while the handshake was in flight.
            let mut tunn = session.tunn();
            for _ in 0..MAX_FLUSH {
                match tunn.decapsulate(None, &[], buf) {
                    TunnResult::WriteToNetwork(data) => out.push(Action::SendDatagram {
                        to: src,
                        data: data.to_vec(),
                    }),
                    _ => break,
                }
            }
        }
    }

    /// First step of answering a handshake initiation received from `src` (see [`Initiation`]):
    /// everything that needs the router. `None` when the datagram is not an initiation, fails
    /// MAC1, is over the rate limit (a cookie reply is then in `out`), cannot be decrypted or
    /// comes from an unknown key; the drop is counted as in [`Router::handle_datagram`].
    pub fn accept_initiation(&mut self, src: SocketAddr, datagram: &[u8], out: &mut Vec<Action>) -> Option<Initiation> {
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(ref init)) => self.accept_parsed_initiation(src, datagram, init, out),
            _ => {
                self.counters.malformed += 1;
                tracing::trace!(%src, len = datagram.len(), "not a WireGuard handshake initiation");
                None
            }
        }
    }

    fn accept_parsed_initiation(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit,
        out: &mut Vec<Action>,
    ) -> Option<Initiation> {
        let (id, which) = self.route_initiation(src, datagram, init, out)?;
        let session = self.peers.get(&id)?.session(which)?;
        Some(Initiation {
            src,
            id,
            slot: session.slot,
            tunn: Arc::clone(&session.tunn),
            datagram: datagram.to_vec(),
        })
    }

    /// Last step of answering a handshake initiation: sends the response (and packets that were
    /// queued for the peer) and moves the peer's endpoint to where the initiation came from. If
    /// the peer or its session went away meanwhile, the answer is dropped.
    pub fn finish_initiation(&mut self, answered: AnsweredInitiation, out: &mut Vec<Action>) {
        let AnsweredInitiation { src, id, slot, result } = answered;
        let Some(peer) = self.peers.get_mut(&id).filter(|p| p.which(slot).is_some()) else {
            self.counters.unknown_index += 1;
            tracing::debug!(%src, "WireGuard peer removed while its handshake was answered; answer dropped");
            return;
        };
        match result {
            Ok(packets) => {
                out.extend(packets.into_iter().map(|data| Action::SendDatagram { to: src, data }));
                peer.roam_to(src);
            }
            Err(e) => {
                self.counters.rejected += 1;
                log_decap_error(src, &e);
            }
        }
    }

    /// Finds the peer and session for a handshake initiation: which local key it is addressed
    /// to (MAC1, and under load the cookie, before any Diffie-Hellman), then the initiator's
    /// static key. An initiation for a (local key, peer key) pair that is not the peer's main
    /// session starts a pending session (a peer moving to our new key).
    fn route_initiation(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit,
        out: &mut Vec<Action>,
    ) -> Option<(u32, Which)> {
        let Some(local) = self.mac1_key(src, datagram) else {
            self.counters.rejected += 1;
            tracing::trace!(%src, "handshake initiation with bad MAC; dropped");
            return None;
        };
        if let Admission::Refused = self.admit_handshake(local, src, datagram, out) {
            return None;
        }
        let kp = self.key_pair(local)?;
        let half = match parse_handshake_anon(&kp.private, &kp.public, init) {
            Ok(h) => h,
            Err(e) => {
                self.counters.rejected += 1;
                tracing::debug!(%src, error = ?e, "undecryptable handshake initiation");
                return None;
            }
        };
        let key = PublicKey::from(half.peer_static_public);
        let Some(&id) = self.by_key.get(&key) else {
            self.counters.unknown_peer += 1;
            tracing::debug!(
                %src,
                peer = %public_key_to_base64(&key),
                "handshake initiation from unknown WireGuard key; dropped"
            );
            return None;
        };
        let peer = self.peers.get(&id)?;
        let matches = |s: &Session| s.local == local && s.peer_key == key;
        if matches(&peer.main) {
            return Some((id, Which::Main));
        }
        if peer.pending.as_deref().is_some_and(matches) {
            return Some((id, Which::Pending));
        }
        let slot = match self.alloc_slot() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a handshake on another key");
                return None;
            }
        };
        let session = new_session(self.key_pair(local)?, local, key, peer.keepalive, slot);
        self.by_slot.insert(slot, id);
        let peer = self.peers.get_mut(&id)?;
        if let Some(p) = peer.pending.replace(Box::new(session)) {
            peer.tx_base = peer.tx_base.saturating_add(p.tx());
            self.by_slot.remove(&p.slot);
        }
        tracing::debug!(
            peer = %public_key_to_base64(&key),
            local_key = ?local,
            "WireGuard peer hand-shaking on another of our keys"
        );
        Some((id, Which::Pending))
    }

    /// Which of our keys the handshake message's MAC1 is valid for (no Diffie-Hellman, no
    /// counting).
    fn mac1_key(&self, src: SocketAddr, datagram: &[u8]) -> Option<LocalKey> {
        [LocalKey::Current, LocalKey::Previous]
            .into_iter()
            .find(|&which| self.mac1_valid(which, src, datagram))
    }

    /// Whether the handshake message's MAC1 is keyed by our key `which`.
    fn mac1_valid(&self, which: LocalKey, src: SocketAddr, datagram: &[u8]) -> bool {
        let mut unused = [0u8; 64];
        self.key_pair(which)
            .is_some_and(|kp| kp.macs.verify_packet(Some(src.ip()), datagram, &mut unused).is_ok())
    }

    /// Finds the peer and session by our receiver index (`index >> 8` is the session slot).
    fn route_index(&mut self, src: SocketAddr, receiver_idx: u32) -> Option<(u32, Which)> {
        let slot = receiver_idx >> 8;
        let found = self
            .by_slot
            .get(&slot)
            .and_then(|id| self.peers.get(id))
            .and_then(|peer| Some((peer.id, peer.which(slot)?)));
        if found.is_none() {
            self.counters.unknown_index += 1;
            tracing::trace!(%src, slot, "WireGuard packet for unknown receiver index; dropped");
        }
        found
    }

    /// Timers: keepalives, handshake retries and rekeys for every peer. Call every
    /// [`TICK_INTERVAL`].
    pub fn tick(&mut self, out: &mut Vec<Action>) {
        let Router {
            peers, by_slot, buf, ..
        } = self;
        for peer in peers.values_mut() {
            if let Some((r, _)) = peer.retired.take_if(|(_, since)| since.elapsed() >= RETIRED_LINGER) {
                by_slot.remove(&r.slot);
            }
            let endpoint = peer.endpoint;
            let retry = peer.keepalive.is_some() && endpoint.is_some();
            let has_pending = peer.pending.is_some();
            let key = peer.public_key;
            let initiate = std::mem::take(&mut peer.initiate);
            // While a key change is pending, the old session is not re-established.
            tick_session(
                &mut peer.main,
                buf,
                endpoint,
                initiate,
                retry && !has_pending,
                &key,
                out,
            );
            if let Some(p) = peer.pending.as_mut() {
                tick_session(p, buf, endpoint, false, retry, &key, out);
            }
        }
    }

    /// Snapshots of all peers (in no particular order).
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers.values().map(|p| p.stats()).collect()
    }

    /// Snapshot of one peer.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let id = self.by_key.get(key)?;
        self.peers.get(id).map(|p| p.stats())
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

fn new_session(kp: &LocalKeyPair, local: LocalKey, peer_key: PublicKey, keepalive: Option<u16>, slot: u32) -> Session {
    Session {
        tunn: Arc::new(Mutex::new(Tunn::new(
            kp.private.clone(),
            peer_key,
            None,
            keepalive,
            slot,
            Some(Arc::clone(&kp.macs)),
        ))),
        slot,
        local,
        peer_key,
    }
}

/// The pending session becomes the one in use; the old one only decrypts stragglers until it
/// is dropped after [`RETIRED_LINGER`].
fn promote(peer: &mut Peer, by_slot: &mut HashMap<u32, u32>) {
    let Some(pending) = peer.pending.take() else { return };
    let old = std::mem::replace(&mut peer.main, *pending);
    peer.tx_base = peer.tx_base.saturating_add(old.tx());
    if let Some((r, _)) = peer.retired.replace((Box::new(old), Instant::now())) {
        by_slot.remove(&r.slot);
    }
    peer.initiate = false;
    tracing::info!(
        peer = %public_key_to_base64(&peer.public_key),
        local_key = ?peer.main.local,
        "WireGuard session moved to the new key"
    );
}

fn tick_session(
    session: &mut Session,
    buf: &mut [u8],
    endpoint: Option<SocketAddr>,
    initiate: bool,
    retry_expired: bool,
    key: &PublicKey,
    out: &mut Vec<Action>,
) {
    let mut tunn = session.tunn();
    let result = if initiate && endpoint.is_some() {
        tunn.format_handshake_initiation(buf, false)
    } else {
        match tunn.update_timers(buf) {
            TunnResult::Err(WireGuardError::ConnectionExpired) if retry_expired => {
                // Like kernel WireGuard with persistent keepalive: keep trying. A new
                // attempt starts only after the previous one gave up (90 s).
                tracing::debug!(
                    peer = %public_key_to_base64(key),
                    "WireGuard session expired; starting a new handshake"
                );
                tunn.format_handshake_initiation(buf, false)
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
                peer = %public_key_to_base64(key),
                error = ?e,
                "WireGuard timer error"
            );
        }
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
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
    if table.lookup(from) == Some(peer.id) {
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
