//! The responder: answers valid probe requests, pure (no I/O).
//!
//! # What gets an answer
//! A datagram is answered only if, in this order of checks:
//! 1. it is exactly one version-1 probe ([`crate::wire`]) of kind *request*;
//! 2. it is addressed to this node (receiver id);
//! 3. its sender is a known peer, and it came from the underlay address the peer list gives for that peer
//!    (IP and port; an IPv4-mapped IPv6 address counts as the IPv4 address);
//! 4. its key id is accepted (current key, or the previous one within its grace period) and the MAC verifies;
//! 5. its sequence number was never answered before for this sender and key (anti-replay window of
//!    [`REPLAY_WINDOW`] sequence numbers below the highest seen, as in IPsec/WireGuard), and it is not older
//!    than that window;
//! 6. it is not *late*: see below;
//! 7. the sender's token bucket and the responder's global bucket have a token (rate limit).
//!
//! The response has exactly the request's length (76 bytes), goes only to the address the request came from —
//! which step 3 pinned to the peer's listed address — and is signed with the key that verified the request.
//! So the responder can neither amplify nor reflect traffic towards a third party.
//!
//! # Freshness without a shared clock
//! The send time in a probe is the *prober's* monotonic clock, which the responder cannot compare with its own.
//! What it can compare are differences: for a sender, `d = (local receive time) − (sender's send time)` is the
//! one-way delay plus a constant clock offset (plus drift, ppm). The responder keeps `d` of the probe carrying
//! the highest sequence number. A probe with a lower sequence number (reordered, or withheld by an attacker and
//! released later) is answered only if its `d` exceeds that reference by at most `max_reorder` (default 2 s):
//! i.e. it was delayed at most that much more than the newest probe. A probe with a new highest sequence number
//! is always fresh relative to everything seen, and becomes the reference. Comparing only with the latest
//! probe makes clock drift irrelevant, and a restarted sender (monotonic clock reset, sequence numbers continue
//! above the old ones because probers start them at the wall-clock time) is handled naturally.
//!
//! What the responder cannot detect without a shared clock: an attacker that blocks *every* probe of a sender
//! and releases them later. Those answers go only to the genuine peer's address, at most one per probe and no
//! larger than it, and the prober, which judges with its own clock, discards them as late (timeout, default
//! 1 s) and counts the probes as lost. The prober's clock is the final arbiter of freshness; the responder's
//! checks only keep it from being a replay amplifier.
//!
//! Replay state is kept per (sender, key id), so a key rotation also resets it: probes under a retired key are
//! refused by the key check anyway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::clock::{RxTime, Timestamp, duration_ns};
use crate::id::{NodeId, WireId};
use crate::key::{KeyRing, ProbeKey};
use crate::wire::{Kind, Probe, WireError};

/// Number of sequence numbers below the highest seen that are still tracked individually.
pub const REPLAY_WINDOW: u64 = 128;

/// Default answers per second per sender. Probers send 1/s by default, so 5/s leaves room for jitter and for
/// faster intervals while capping what one (compromised) key holder can make a responder send.
pub const DEFAULT_PER_PEER_RATE: f64 = 5.0;
/// Default per-sender burst.
pub const DEFAULT_PER_PEER_BURST: f64 = 10.0;
/// Default answers per second in total (every node probes at most 64 peers by default, so a typical
/// responder answers ~64/s).
pub const DEFAULT_TOTAL_RATE: f64 = 2000.0;
/// Default total burst.
pub const DEFAULT_TOTAL_BURST: f64 = 2000.0;
/// Default for how much later than the newest probe a reordered probe may arrive.
pub const DEFAULT_MAX_REORDER: Duration = Duration::from_secs(2);

/// A node this node talks to: its id and the underlay address its probe socket uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    /// Node id.
    pub id: NodeId,
    /// Underlay address and probe port.
    pub addr: SocketAddr,
}

impl Peer {
    /// A peer from id and address.
    pub fn new(id: impl Into<NodeId>, addr: SocketAddr) -> Self {
        Self { id: id.into(), addr }
    }
}

/// Responder limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponderConfig {
    /// Answers per second per sender. Default [`DEFAULT_PER_PEER_RATE`].
    pub per_peer_rate: f64,
    /// Burst per sender. Default [`DEFAULT_PER_PEER_BURST`].
    pub per_peer_burst: f64,
    /// Answers per second in total. Default [`DEFAULT_TOTAL_RATE`].
    pub total_rate: f64,
    /// Total burst. Default [`DEFAULT_TOTAL_BURST`].
    pub total_burst: f64,
    /// How much more delayed than the newest probe a reordered probe may be. Default [`DEFAULT_MAX_REORDER`].
    pub max_reorder: Duration,
}

impl Default for ResponderConfig {
    fn default() -> Self {
        Self {
            per_peer_rate: DEFAULT_PER_PEER_RATE,
            per_peer_burst: DEFAULT_PER_PEER_BURST,
            total_rate: DEFAULT_TOTAL_RATE,
            total_burst: DEFAULT_TOTAL_BURST,
            max_reorder: DEFAULT_MAX_REORDER,
        }
    }
}

impl ResponderConfig {
    /// Checks that rates and bursts are positive and finite.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        for (name, v) in [
            ("per_peer_rate", self.per_peer_rate),
            ("per_peer_burst", self.per_peer_burst),
            ("total_rate", self.total_rate),
            ("total_burst", self.total_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(crate::ConfigError::Invalid {
                    field: name,
                    reason: format!("{v} is not a positive number; give a rate or burst above 0"),
                });
            }
        }
        Ok(())
    }
}

/// Why a datagram got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not a well-formed probe, unknown key, or bad MAC.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A response arrived at the responder.
    #[error("datagram is a probe response, not a request; responses are for the prober")]
    NotARequest,
    /// Receiver id is not this node.
    #[error("probe is addressed to another node; the sender's peer list maps this address to someone else")]
    NotForMe,
    /// Sender id not in the peer list.
    #[error("probe from an unknown sender id; it is not in this node's peer list (peer lists out of date?)")]
    UnknownSender,
    /// Known sender, wrong source address.
    #[error("probe from {sender} came from {got}, but that peer is expected at {expected}; spoofed or stale peer list")]
    WrongSource {
        /// Sender's node id.
        sender: NodeId,
        /// Listed address.
        expected: SocketAddr,
        /// Actual source.
        got: SocketAddr,
    },
    /// This (sender, key, seq) was already answered.
    #[error("probe sequence number already answered (replay)")]
    Replay,
    /// Below the replay window.
    #[error("probe sequence number is older than the replay window")]
    TooOld,
    /// Delayed much more than the newest probe from the same sender.
    #[error("probe arrived {late_ms} ms later than the sender's newest probe allows; withheld or badly reordered")]
    Late {
        /// Extra delay relative to the newest probe, ms.
        late_ms: u64,
    },
    /// Rate limit hit.
    #[error("rate limit reached; probe dropped")]
    RateLimited,
}

/// Counters of what the responder did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResponderCounters {
    /// Requests answered.
    pub answered: u64,
    /// Malformed (length, magic, version, kind) or a response sent to the responder.
    pub malformed: u64,
    /// Addressed to another node.
    pub not_for_me: u64,
    /// Unknown sender.
    pub unknown_sender: u64,
    /// Known sender, wrong source address.
    pub wrong_source: u64,
    /// Key id not accepted.
    pub unknown_key: u64,
    /// MAC mismatch.
    pub bad_mac: u64,
    /// Replayed, or older than the replay window.
    pub replayed: u64,
    /// Late relative to the sender's newest probe.
    pub late: u64,
    /// Rate limited.
    pub rate_limited: u64,
}

impl ResponderCounters {
    fn count(&mut self, r: &Result<Vec<u8>, Rejected>) {
        let c = match r {
            Ok(_) => &mut self.answered,
            Err(Rejected::Wire(WireError::UnknownKey { .. })) => &mut self.unknown_key,
            Err(Rejected::Wire(WireError::BadMac)) => &mut self.bad_mac,
            Err(Rejected::Wire(_) | Rejected::NotARequest) => &mut self.malformed,
            Err(Rejected::NotForMe) => &mut self.not_for_me,
            Err(Rejected::UnknownSender) => &mut self.unknown_sender,
            Err(Rejected::WrongSource { .. }) => &mut self.wrong_source,
            Err(Rejected::Replay | Rejected::TooOld) => &mut self.replayed,
            Err(Rejected::Late { .. }) => &mut self.late,
            Err(Rejected::RateLimited) => &mut self.rate_limited,
        };
        *c += 1;
    }
}

/// A token bucket on the monotonic clock.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last_ns: Option<u64>,
}

impl TokenBucket {
    pub(crate) fn new(burst: f64) -> Self {
        Self {
            tokens: burst,
            last_ns: None,
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now_ns: u64, rate: f64, burst: f64) -> bool {
        if let Some(last) = self.last_ns {
            let dt = now_ns.saturating_sub(last) as f64 / 1e9;
            self.tokens = (self.tokens + dt * rate).min(burst);
        }
        self.last_ns = Some(self.last_ns.map_or(now_ns, |l| l.max(now_ns)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Anti-replay state for one (sender, key id).
#[derive(Clone, Debug)]
struct ReplayState {
    highest: u64,
    /// Bit i set: `highest - i` was answered.
    seen: u128,
    /// `local receive mono − sender send mono` of the probe with the highest sequence number.
    d_high: i128,
}

impl ReplayState {
    fn check(&self, seq: u64, d: i128, max_reorder_ns: i128) -> Result<(), Rejected> {
        if seq > self.highest {
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= REPLAY_WINDOW {
            return Err(Rejected::TooOld);
        }
        if self.seen & (1u128 << back) != 0 {
            return Err(Rejected::Replay);
        }
        let extra = d - self.d_high;
        if extra > max_reorder_ns {
            return Err(Rejected::Late {
                late_ms: u64::try_from(extra / 1_000_000).unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }

    fn commit(&mut self, seq: u64, d: i128) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= REPLAY_WINDOW { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = seq;
            self.d_high = d;
        } else {
            self.seen |= 1u128 << (self.highest - seq);
        }
    }
}

#[derive(Debug)]
struct Known {
    id: NodeId,
    addr: SocketAddr,
    bucket: TokenBucket,
    replay: Vec<(u32, ReplayState)>,
}

/// Answers probe requests addressed to this node. See the module documentation for the rules.
#[derive(Debug)]
pub struct Responder {
    me: WireId,
    keys: KeyRing,
    known: HashMap<WireId, Known>,
    total: TokenBucket,
    config: ResponderConfig,
    counters: ResponderCounters,
}

impl Responder {
    /// A responder for node `me`, answering no one until [`Responder::set_peers`] is called.
    pub fn new(me: &NodeId, keys: KeyRing, config: ResponderConfig) -> Result<Self, crate::ConfigError> {
        config.validate()?;
        Ok(Self {
            me: me.wire_id(),
            keys,
            known: HashMap::new(),
            total: TokenBucket::new(config.total_burst),
            config,
            counters: ResponderCounters::default(),
        })
    }

    /// Replaces the set of nodes allowed to probe this node (with a rotating peer selection this is the whole
    /// address book, not only the nodes this node probes). State of peers that stay is kept.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = Peer>) {
        let mut old = std::mem::take(&mut self.known);
        for p in peers {
            let w = p.id.wire_id();
            let entry = match old.remove(&w) {
                Some(mut k) => {
                    k.addr = p.addr;
                    k.id = p.id;
                    k
                }
                None => Known {
                    id: p.id,
                    addr: p.addr,
                    bucket: TokenBucket::new(self.config.per_peer_burst),
                    replay: Vec::new(),
                },
            };
            self.known.insert(w, entry);
        }
    }

    /// Id of the newest key this responder accepts.
    pub fn current_key_id(&self) -> u32 {
        self.keys.current().id()
    }

    /// Installs a new probe key; the previous one stays accepted for the ring's grace period.
    pub fn rotate_key(&mut self, key: ProbeKey, now_mono_ns: u64) {
        self.keys.rotate(key, now_mono_ns);
    }

    /// What the responder has done so far.
    pub fn counters(&self) -> ResponderCounters {
        self.counters
    }

    /// Answers `datagram` from `src`, received at `rx`, with the response to send back to `src`, or `None`.
    /// `now` is read just before the answer is sent; the time between `rx` and `now` is reported to the prober
    /// as hold time so that it can subtract it.
    pub fn respond(&mut self, now: Timestamp, rx: RxTime, src: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
        match self.handle(now, rx, src, datagram) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(%src, reason = %e, "latency probe not answered");
                None
            }
        }
    }

    /// Like [`Responder::respond`], but says why a datagram was not answered.
    pub fn handle(
        &mut self,
        now: Timestamp,
        rx: RxTime,
        src: SocketAddr,
        datagram: &[u8],
    ) -> Result<Vec<u8>, Rejected> {
        let r = self.handle_inner(now, rx, src, datagram);
        self.counters.count(&r);
        r
    }

    fn handle_inner(
        &mut self,
        now: Timestamp,
        rx: RxTime,
        src: SocketAddr,
        datagram: &[u8],
    ) -> Result<Vec<u8>, Rejected> {
        let req = Probe::parse_unverified(datagram)?;
        if req.kind != Kind::Request {
            return Err(Rejected::NotARequest);
        }
        if req.receiver != self.me {
            return Err(Rejected::NotForMe);
        }
        let peer = self.known.get_mut(&req.sender).ok_or(Rejected::UnknownSender)?;
        if !same_endpoint(peer.addr, src) {
            return Err(Rejected::WrongSource {
                sender: peer.id.clone(),
                expected: peer.addr,
                got: src,
            });
        }
        let rx_mono = rx.user.mono_ns;
        let key = req.verify(datagram, &self.keys, rx_mono)?.clone();

        // Forget replay state of keys no longer accepted.
        let accepted = self.keys.accepted_ids(rx_mono);
        peer.replay.retain(|(id, _)| accepted.contains(id));
        let d = i128::from(rx_mono) - i128::from(req.sent_mono_ns);
        let max_reorder = i128::from(duration_ns(self.config.max_reorder));
        let slot = peer.replay.iter().position(|(id, _)| *id == key.id());
        if let Some(i) = slot {
            peer.replay[i].1.check(req.seq, d, max_reorder)?;
        }
        if !peer
            .bucket
            .take(rx_mono, self.config.per_peer_rate, self.config.per_peer_burst)
        {
            return Err(Rejected::RateLimited);
        }
        if !self
            .total
            .take(rx_mono, self.config.total_rate, self.config.total_burst)
        {
            return Err(Rejected::RateLimited);
        }
        match slot {
            Some(i) => peer.replay[i].1.commit(req.seq, d),
            None => peer.replay.push((
                key.id(),
                ReplayState {
                    highest: req.seq,
                    seen: 1,
                    d_high: d,
                },
            )),
        }

        let resp = Probe {
            kind: Kind::Response,
            key_id: key.id(),
            sender: self.me,
            receiver: req.sender,
            seq: req.seq,
            sent_mono_ns: req.sent_mono_ns,
            hold_ns: u32::try_from(hold_ns(now, rx)).unwrap_or(u32::MAX),
        };
        let out = resp.encode(&key).to_vec();
        // Invariant (no amplification): never answer with more bytes than were received.
        if out.len() > datagram.len() {
            return Err(Rejected::Wire(WireError::Length { got: datagram.len() }));
        }
        Ok(out)
    }
}

/// How long the request was held before the answer: from the kernel receive timestamp when it is plausible
/// (not before the user-space hold, and at most 100 ms more), else from the user-space receive time.
fn hold_ns(now: Timestamp, rx: RxTime) -> u64 {
    let user = now.mono_ns.saturating_sub(rx.user.mono_ns);
    match rx.kernel_real_ns {
        Some(k) if now.real_ns >= k => {
            let kernel = now.real_ns - k;
            if kernel + 1_000 >= user && kernel <= user + 100_000_000 {
                kernel
            } else {
                user
            }
        }
        _ => user,
    }
}

/// Same IP and port, treating IPv4-mapped IPv6 addresses as IPv4.
pub(crate) fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{DEFAULT_KEY_GRACE, KEY_LEN};

    const MS: u64 = 1_000_000;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ring(id: u32) -> KeyRing {
        KeyRing::new(ProbeKey::new(id, [id as u8; KEY_LEN]), DEFAULT_KEY_GRACE)
    }

    struct Fixture {
        responder: Responder,
        keys: KeyRing,
        a: WireId,
        b: WireId,
    }

    /// Node "b" at 192.0.2.2 responds; node "a" at 192.0.2.1:7444 is its peer.
    fn fixture() -> Fixture {
        let mut responder = Responder::new(&NodeId::new("b"), ring(1), ResponderConfig::default()).unwrap();
        responder.set_peers([Peer::new("a", addr("192.0.2.1:7444"))]);
        Fixture {
            responder,
            keys: ring(1),
            a: WireId::of("a"),
            b: WireId::of("b"),
        }
    }

    fn request(f: &Fixture, seq: u64, sent: u64) -> [u8; 76] {
        Probe {
            kind: Kind::Request,
            key_id: 0,
            sender: f.a,
            receiver: f.b,
            seq,
            sent_mono_ns: sent,
            hold_ns: 0,
        }
        .encode(f.keys.current())
    }

    fn at(mono: u64) -> RxTime {
        RxTime::user(Timestamp::from_mono(mono))
    }

    const A: &str = "192.0.2.1:7444";

    #[test]
    fn answers_a_valid_probe_with_same_size_response() {
        let mut f = fixture();
        let req = request(&f, 10, 5 * MS);
        let resp = f
            .responder
            .handle(Timestamp::from_mono(1000 * MS + 30_000), at(1000 * MS), addr(A), &req)
            .unwrap();
        assert!(resp.len() <= req.len());
        assert_eq!(resp.len(), req.len());
        let (p, _) = Probe::decode(&resp, &f.keys, 0).unwrap();
        assert_eq!(p.kind, Kind::Response);
        assert_eq!((p.sender, p.receiver, p.seq, p.sent_mono_ns), (f.b, f.a, 10, 5 * MS));
        assert_eq!(p.hold_ns, 30_000);
        assert_eq!(f.responder.counters().answered, 1);
    }

    #[test]
    fn hold_prefers_plausible_kernel_timestamp() {
        let now = Timestamp {
            mono_ns: 1_000_050_000,
            real_ns: 5_000_000_050_000,
        };
        // User-space receive 20 µs before now; kernel receive 45 µs before now.
        let rx = RxTime {
            user: Timestamp::from_mono(1_000_030_000),
            kernel_real_ns: Some(5_000_000_005_000),
        };
        assert_eq!(hold_ns(now, rx), 45_000);
        // Kernel timestamp after now (clock stepped): fall back to user space.
        let rx = RxTime {
            kernel_real_ns: Some(5_000_000_060_000),
            ..rx
        };
        assert_eq!(hold_ns(now, rx), 20_000);
        // Kernel timestamp an hour ago (clock stepped forward): fall back.
        let rx = RxTime {
            kernel_real_ns: Some(5_000_000_050_000 - 3_600_000_000_000),
            ..rx
        };
        assert_eq!(hold_ns(now, rx), 20_000);
    }

    #[test]
    fn never_answers_the_same_probe_twice() {
        let mut f = fixture();
        let req = request(&f, 10, 0);
        let now = Timestamp::from_mono(1000 * MS);
        assert!(f.responder.respond(now, at(1000 * MS), addr(A), &req).is_some());
        assert_eq!(
            f.responder.handle(now, at(1001 * MS), addr(A), &req),
            Err(Rejected::Replay)
        );
        assert_eq!(
            f.responder.handle(now, at(5000 * MS), addr(A), &req),
            Err(Rejected::Replay)
        );
        assert_eq!(f.responder.counters().replayed, 2);
    }

    #[test]
    fn reordered_probes_in_window_are_answered_once_old_ones_not() {
        let mut f = fixture();
        let t = |s| Timestamp::from_mono(s);
        for seq in [1000, 998, 999, 1001] {
            let req = request(&f, seq, seq * 10 * MS);
            // Arrivals 1 ms apart, send times 10 ms apart: the reordered ones are "early", not late.
            assert!(
                f.responder
                    .respond(t(seq * 10 * MS), at(seq * 10 * MS + MS), addr(A), &req)
                    .is_some(),
                "seq {seq}"
            );
        }
        let req = request(&f, 999, 9990 * MS);
        assert_eq!(
            f.responder.handle(t(20_000 * MS), at(10_011 * MS), addr(A), &req),
            Err(Rejected::Replay)
        );
        // Far below the window.
        let old = request(&f, 1001 - REPLAY_WINDOW, 0);
        assert_eq!(
            f.responder.handle(t(20_000 * MS), at(10_011 * MS), addr(A), &old),
            Err(Rejected::TooOld)
        );
    }

    #[test]
    fn withheld_probe_released_late_is_refused() {
        let mut f = fixture();
        // Probes 1..=5 sent 1 s apart; probe 3 is withheld by an attacker.
        for seq in [1u64, 2, 4, 5] {
            let req = request(&f, seq, seq * 1000 * MS);
            assert!(
                f.responder
                    .respond(Timestamp::from_mono(0), at(seq * 1000 * MS + 7 * MS), addr(A), &req)
                    .is_some()
            );
        }
        // Probe 3 released 10 s after it should have arrived (the newest probe took 7 ms).
        let req = request(&f, 3, 3000 * MS);
        let r = f
            .responder
            .handle(Timestamp::from_mono(0), at(13_000 * MS + 7 * MS), addr(A), &req);
        assert!(
            matches!(r, Err(Rejected::Late { late_ms }) if late_ms == 10_000),
            "{r:?}"
        );
        // Released only 1.5 s late: within max_reorder (2 s), answered once.
        let mut f = fixture();
        for seq in [1u64, 2, 4] {
            let req = request(&f, seq, seq * 1000 * MS);
            f.responder
                .respond(Timestamp::from_mono(0), at(seq * 1000 * MS + 7 * MS), addr(A), &req)
                .unwrap();
        }
        let req = request(&f, 3, 3000 * MS);
        assert!(
            f.responder
                .respond(Timestamp::from_mono(0), at(4507 * MS), addr(A), &req)
                .is_some()
        );
        assert_eq!(
            f.responder
                .handle(Timestamp::from_mono(0), at(4508 * MS), addr(A), &req),
            Err(Rejected::Replay)
        );
    }

    #[test]
    fn restarted_sender_continues_above_old_sequence_numbers() {
        let mut f = fixture();
        let req = request(&f, 1_000, 900_000 * MS);
        assert!(
            f.responder
                .respond(Timestamp::from_mono(0), at(1_000 * MS), addr(A), &req)
                .is_some()
        );
        // The sender restarts: monotonic clock near zero, sequence numbers from its (later) wall clock.
        let req = request(&f, 5_000, 3 * MS);
        assert!(
            f.responder
                .respond(Timestamp::from_mono(0), at(1_010 * MS), addr(A), &req)
                .is_some()
        );
        let req = request(&f, 5_001, 1003 * MS);
        assert!(
            f.responder
                .respond(Timestamp::from_mono(0), at(2_010 * MS), addr(A), &req)
                .is_some()
        );
    }

    #[test]
    fn spoofed_source_gets_no_answer() {
        let mut f = fixture();
        let req = request(&f, 1, 0);
        let now = Timestamp::from_mono(MS);
        // Right IP, wrong port; wrong IP, right port.
        for src in ["192.0.2.1:7445", "198.51.100.7:7444", "[2001:db8::1]:7444"] {
            let r = f.responder.handle(now, at(MS), addr(src), &req);
            assert!(matches!(r, Err(Rejected::WrongSource { .. })), "{src}: {r:?}");
        }
        assert_eq!(f.responder.counters().wrong_source, 3);
        // The genuine source is still answered afterwards (the spoofed copies did not burn the sequence number).
        assert!(f.responder.respond(now, at(MS), addr(A), &req).is_some());
        // An IPv4-mapped IPv6 source (dual-stack socket) is the same endpoint.
        let req = request(&f, 2, 0);
        assert!(
            f.responder
                .respond(now, at(MS), addr("[::ffff:192.0.2.1]:7444"), &req)
                .is_some()
        );
    }

    #[test]
    fn unknown_unauthenticated_and_misaddressed_probes_get_no_answer() {
        let mut f = fixture();
        let now = Timestamp::from_mono(MS);
        // Bad MAC.
        let mut req = request(&f, 1, 0);
        req[70] ^= 1;
        assert_eq!(
            f.responder.handle(now, at(MS), addr(A), &req),
            Err(Rejected::Wire(WireError::BadMac))
        );
        // Right key id, wrong secret.
        let forged = Probe {
            kind: Kind::Request,
            key_id: 1,
            sender: f.a,
            receiver: f.b,
            seq: 2,
            sent_mono_ns: 0,
            hold_ns: 0,
        }
        .encode(&ProbeKey::new(1, [0xEE; KEY_LEN]));
        assert_eq!(
            f.responder.handle(now, at(MS), addr(A), &forged),
            Err(Rejected::Wire(WireError::BadMac))
        );
        // Unknown key id.
        let other = Probe {
            kind: Kind::Request,
            key_id: 9,
            sender: f.a,
            receiver: f.b,
            seq: 3,
            sent_mono_ns: 0,
            hold_ns: 0,
        }
        .encode(&ProbeKey::new(9, [9; KEY_LEN]));
        assert_eq!(
            f.responder.handle(now, at(MS), addr(A), &other),
            Err(Rejected::Wire(WireError::UnknownKey { key_id: 9 }))
        );
        // Unknown sender (valid key, not in the peer list).
        let stranger = Probe {
            kind: Kind::Request,
            key_id: 1,
            sender: WireId::of("mallory"),
            receiver: f.b,
            seq: 1,
            sent_mono_ns: 0,
            hold_ns: 0,
        }
        .encode(f.keys.current());
        assert_eq!(
            f.responder.handle(now, at(MS), addr(A), &stranger),
            Err(Rejected::UnknownSender)
        );
        // Addressed to someone else.
        let elsewhere = Probe {
            kind: Kind::Request,
            key_id: 1,
            sender: f.a,
            receiver: WireId::of("c"),
            seq: 1,
            sent_mono_ns: 0,
            hold_ns: 0,
        }
        .encode(f.keys.current());
        assert_eq!(
            f.responder.handle(now, at(MS), addr(A), &elsewhere),
            Err(Rejected::NotForMe)
        );
        // A response is never answered (no ping-pong between two responders).
        let resp = Probe {
            kind: Kind::Response,
            key_id: 1,
            sender: f.a,
            receiver: f.b,
            seq: 1,
            sent_mono_ns: 0,
            hold_ns: 0,
        }
        .encode(f.keys.current());
        assert_eq!(
            f.responder.handle(now, at(MS), addr(A), &resp),
            Err(Rejected::NotARequest)
        );
        // Garbage and truncated.
        assert!(f.responder.respond(now, at(MS), addr(A), b"hello").is_none());
        assert!(
            f.responder
                .respond(now, at(MS), addr(A), &request(&f, 4, 0)[..60])
                .is_none()
        );
        let c = f.responder.counters();
        assert_eq!(
            (
                c.answered,
                c.bad_mac,
                c.unknown_key,
                c.unknown_sender,
                c.not_for_me,
                c.malformed
            ),
            (0, 2, 1, 1, 1, 3)
        );
    }

    #[test]
    fn no_amplification_for_any_input_length() {
        let mut f = fixture();
        let good = request(&f, 1, 0);
        let now = Timestamp::from_mono(MS);
        for len in 0..=200 {
            let mut d = vec![0u8; len];
            let n = len.min(good.len());
            d[..n].copy_from_slice(&good[..n]);
            if let Some(r) = f.responder.respond(now, at(MS), addr(A), &d) {
                assert!(r.len() <= d.len(), "answered {} bytes to {}", r.len(), d.len());
                assert_eq!(len, 76);
            } else {
                assert_ne!(len, 76);
            }
        }
    }

    #[test]
    fn rate_limit_per_sender() {
        let mut f = fixture();
        let now = Timestamp::from_mono(0);
        let mut answered = 0;
        // 100 distinct valid probes within 1 ms: only the burst (10) gets answers.
        for seq in 1..=100u64 {
            if f.responder
                .respond(
                    now,
                    at(1000 * MS + seq * 10_000),
                    addr(A),
                    &request(&f, seq, seq * 10_000),
                )
                .is_some()
            {
                answered += 1;
            }
        }
        assert_eq!(answered, 10);
        assert_eq!(f.responder.counters().rate_limited, 90);
        // One second later, 5 more tokens.
        let mut later = 0;
        for seq in 101..=120u64 {
            if f.responder
                .respond(now, at(2001 * MS + seq), addr(A), &request(&f, seq, 1000 * MS + seq))
                .is_some()
            {
                later += 1;
            }
        }
        assert_eq!(later, 5);
    }

    #[test]
    fn key_rotation_grace_and_replay_state_per_key() {
        let mut f = fixture();
        let now = Timestamp::from_mono(0);
        let old = f.keys.clone();
        assert!(f.responder.respond(now, at(MS), addr(A), &request(&f, 50, 0)).is_some());
        f.responder.rotate_key(ProbeKey::new(2, [2; KEY_LEN]), 10 * MS);
        // Old key still accepted within the 60 s grace.
        assert!(
            f.responder
                .respond(now, at(20 * MS), addr(A), &request(&f, 51, 19 * MS))
                .is_some()
        );
        // New key: its own replay window, starting wherever the sender is.
        f.keys.rotate(ProbeKey::new(2, [2; KEY_LEN]), 10 * MS);
        let req = request(&f, 52, 20 * MS);
        assert!(f.responder.respond(now, at(21 * MS), addr(A), &req).is_some());
        assert_eq!(
            f.responder.handle(now, at(22 * MS), addr(A), &req),
            Err(Rejected::Replay)
        );
        // After the grace period the old key is refused.
        let stale = Fixture { keys: old, ..fixture() };
        let req = request(&stale, 53, 61_000 * MS);
        assert_eq!(
            f.responder.handle(now, at(10 * MS + 60_000 * MS), addr(A), &req),
            Err(Rejected::Wire(WireError::UnknownKey { key_id: 1 }))
        );
    }

    #[test]
    fn peer_list_update_changes_expected_address() {
        let mut f = fixture();
        let now = Timestamp::from_mono(0);
        f.responder.set_peers([Peer::new("a", addr("192.0.2.99:7444"))]);
        assert!(matches!(
            f.responder.handle(now, at(MS), addr(A), &request(&f, 1, 0)),
            Err(Rejected::WrongSource { .. })
        ));
        assert!(
            f.responder
                .respond(now, at(MS), addr("192.0.2.99:7444"), &request(&f, 1, 0))
                .is_some()
        );
        f.responder.set_peers([]);
        assert_eq!(
            f.responder
                .handle(now, at(MS), addr("192.0.2.99:7444"), &request(&f, 2, 0)),
            Err(Rejected::UnknownSender)
        );
    }
}
