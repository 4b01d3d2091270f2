//! The prober: schedules probes, matches responses, measures RTT and closes windows. Pure (no I/O).
//!
//! # Driving it
//! - [`Prober::poll_transmit`] with a fresh [`Timestamp`] until it returns `None`; send each [`Transmit`] at once.
//! - [`Prober::handle_response`] for every datagram of kind *response*.
//! - [`Prober::on_tx_timestamp`] when the kernel reports a send timestamp for a probe (optional).
//! - [`Prober::poll_windows`] regularly; it expires overdue probes and returns finished windows.
//! - [`Prober::poll_timeout`] says when the next of these is due.
//!
//! # Schedule
//! Each peer is probed every `interval` (default 1 s) with a uniformly random jitter of ±`jitter` (default
//! ±10 %), so probes from many nodes do not synchronize. A new peer's first probe is placed at a random phase
//! within one interval. A peer gets at most one probe per call: if the caller fell behind, the schedule
//! restarts from now instead of sending a burst.
//!
//! # Sequence numbers
//! Per peer, starting at the prober's wall-clock time in ns when the peer was (re-)added, then +1 per probe.
//! They thus stay above anything a previous run of the prober sent (unless the wall clock was stepped back past
//! the previous start), which the responder's anti-replay window requires.
//!
//! # RTT
//! The prober judges everything by its own clock: a response is accepted only for an outstanding probe (same
//! peer, sequence number and echoed send time) and only until `timeout` (default 1 s) after the send; later it
//! is *late* and the probe counts as lost. Duplicates find no outstanding probe and are ignored.
//!
//! The RTT is, from the most precise timestamps available:
//! - user space: receive minus send on `CLOCK_MONOTONIC`, read around the system calls;
//! - kernel RX (and TX): kernel software receive timestamp minus the kernel send timestamp (or the realtime
//!   clock read just before `sendmsg`). Kernel timestamps are on `CLOCK_REALTIME`; such a value is used only if
//!   it is positive and not larger than the monotonic measurement (+10 µs + 0.1 %), which it must be, since the
//!   kernel stamps lie between the user-space readings. A clock step during the round trip fails that check and
//!   the sample falls back to user space.
//!
//! The responder's reported hold time (from its receive to its send) is then subtracted when it is smaller than
//! the measured value, so the RTT approximates the network path alone, comparable to ICMP echo answered by the
//! peer's kernel.
//!
//! # Windows
//! Windows are aligned for all peers: window k covers probes *sent* in `[start + k·window, start + (k+1)·window)`,
//! `start` being the last multiple of the window length on the realtime clock before the prober was created (so
//! windows of different nodes line up, e.g. at :00 and :30 for 30 s windows; the first window is partial). A window is closed and reported `timeout` after its end, when all its
//! probes have either been answered or timed out. A peer removed from the probe list stops being probed at once,
//! but its open windows are still completed and reported.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ConfigError;
use crate::clock::{RxTime, Timestamp, TimestampMode, duration_ns};
use crate::id::{NodeId, WireId};
use crate::key::{KeyRing, ProbeKey};
use crate::responder::{Peer, same_endpoint};
use crate::stats::{RttSample, WindowAcc, WindowStats};
use crate::wire::{Kind, Probe, WireError};

/// Default probe interval per peer.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default jitter of the interval, as a fraction (±10 %).
pub const DEFAULT_JITTER: f64 = 0.1;
/// Default time after which an unanswered probe counts as lost.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default statistics window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// How many timed-out sequence numbers per peer are remembered, to tell a late response from an unsolicited one.
const REMEMBER_TIMED_OUT: usize = 64;

/// Prober settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ProberConfig {
    /// Probe interval per peer. Default [`DEFAULT_INTERVAL`]; at least 1 ms.
    pub interval: Duration,
    /// Random jitter of each interval as a fraction, `0 ≤ jitter ≤ 0.5`. Default [`DEFAULT_JITTER`].
    pub jitter: f64,
    /// Unanswered after this long: lost. Default [`DEFAULT_TIMEOUT`]; must be shorter than `window`.
    pub timeout: Duration,
    /// Statistics window. Default [`DEFAULT_WINDOW`]; at least one interval.
    pub window: Duration,
    /// Seed for the jitter; `None` seeds from the operating system. Tests set it.
    pub seed: Option<u64>,
}

impl Default for ProberConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            jitter: DEFAULT_JITTER,
            timeout: DEFAULT_TIMEOUT,
            window: DEFAULT_WINDOW,
            seed: None,
        }
    }
}

impl ProberConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.interval < Duration::from_millis(1) {
            return bad(
                "interval",
                format!(
                    "{:?} is below 1 ms; probe at most 1000 times per second per peer",
                    self.interval
                ),
            );
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return bad(
                "jitter",
                format!(
                    "{} is outside 0..=0.5; give a fraction of the interval such as 0.1",
                    self.jitter
                ),
            );
        }
        if self.timeout.is_zero() || self.timeout >= self.window {
            return bad(
                "timeout",
                format!(
                    "{:?} must be above 0 and shorter than the window ({:?})",
                    self.timeout, self.window
                ),
            );
        }
        if self.window < self.interval {
            return bad(
                "window",
                format!("{:?} is shorter than the interval ({:?})", self.window, self.interval),
            );
        }
        Ok(())
    }
}

/// A probe to send now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The peer's underlay address.
    pub to: SocketAddr,
    /// The peer.
    pub peer: NodeId,
    /// Sequence number of the probe.
    pub seq: u64,
    /// The datagram.
    pub datagram: Vec<u8>,
}

/// Why a response produced no sample.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseRejected {
    /// Not a well-formed probe, unknown key, or bad MAC.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A request reached the prober.
    #[error("datagram is a probe request, not a response; requests are for the responder")]
    NotAResponse,
    /// Addressed to another node.
    #[error("response is addressed to another node")]
    NotForMe,
    /// From a node that is not (or no longer) a probe target.
    #[error("response from a node this prober does not probe")]
    UnknownPeer,
    /// From another address than the peer's.
    #[error("response from {peer} came from {got}, but that peer is probed at {expected}; spoofed or stale peer list")]
    WrongSource {
        /// The peer.
        peer: NodeId,
        /// Where it is probed.
        expected: SocketAddr,
        /// Actual source.
        got: SocketAddr,
    },
    /// Arrived after the timeout; the probe was counted as lost.
    #[error("response for sequence {seq} arrived after the timeout; counted as lost")]
    Late {
        /// Sequence number.
        seq: u64,
    },
    /// No such probe outstanding: a duplicate, or never sent.
    #[error("response for sequence {seq}, which is not outstanding (duplicate or unsolicited)")]
    NotOutstanding {
        /// Sequence number.
        seq: u64,
    },
    /// The echoed send time does not match what was sent.
    #[error("response for sequence {seq} echoes another send time than the probe had; ignored")]
    Mismatch {
        /// Sequence number.
        seq: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    mono: u64,
    real: u64,
    kernel_tx_real: Option<u64>,
    window: u64,
    deadline: u64,
}

#[derive(Debug)]
struct PeerState {
    id: NodeId,
    addr: SocketAddr,
    active: bool,
    next_seq: u64,
    next_due: u64,
    outstanding: BTreeMap<u64, Sent>,
    windows: BTreeMap<u64, WindowAcc>,
    timed_out: VecDeque<(u64, u64)>,
}

/// Probes a set of peers. See the module documentation.
#[derive(Debug)]
pub struct Prober {
    me: WireId,
    keys: KeyRing,
    config: ProberConfig,
    interval_ns: u64,
    timeout_ns: u64,
    window_ns: u64,
    rng: StdRng,
    start: Timestamp,
    peers: BTreeMap<WireId, PeerState>,
}

impl Prober {
    /// A prober for node `me` with no peers yet. Windows are aligned to multiples of the window length on the
    /// realtime clock (so nodes' windows line up to within their clock offset); the first one is partial.
    pub fn new(me: &NodeId, keys: KeyRing, config: ProberConfig, now: Timestamp) -> Result<Self, ConfigError> {
        config.validate()?;
        let window_ns = duration_ns(config.window);
        let rng = match config.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Ok(Self {
            me: me.wire_id(),
            keys,
            interval_ns: duration_ns(config.interval),
            timeout_ns: duration_ns(config.timeout),
            window_ns,
            config,
            rng,
            start: aligned_start(now, window_ns),
            peers: BTreeMap::new(),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &ProberConfig {
        &self.config
    }

    /// Replaces the probe targets. Peers that stay keep their state (an address change applies to the next
    /// probe); new peers get their first probe at a random phase within one interval; removed peers are no
    /// longer probed, but their open windows are still completed and reported.
    pub fn set_peers(&mut self, now: Timestamp, peers: impl IntoIterator<Item = Peer>) {
        for p in self.peers.values_mut() {
            p.active = false;
        }
        // Wall-clock time in ns, advanced by the monotonic clock since start: never goes back within a run.
        let seq_start = self
            .start
            .real_ns
            .saturating_add(now.mono_ns.saturating_sub(self.start.mono_ns))
            .max(1);
        for peer in peers {
            let w = peer.id.wire_id();
            if w == self.me {
                continue;
            }
            let phase = self.rng.gen_range(0..self.interval_ns);
            let st = self.peers.entry(w).or_insert_with(|| PeerState {
                id: peer.id.clone(),
                addr: peer.addr,
                active: false,
                next_seq: seq_start,
                next_due: now.mono_ns.saturating_add(phase),
                outstanding: BTreeMap::new(),
                windows: BTreeMap::new(),
                timed_out: VecDeque::new(),
            });
            if !st.active && st.next_due < now.mono_ns {
                st.next_due = now.mono_ns.saturating_add(phase);
            }
            st.active = true;
            st.addr = peer.addr;
            st.id = peer.id;
        }
    }

    /// The nodes currently probed.
    pub fn peers(&self) -> Vec<NodeId> {
        self.peers.values().filter(|p| p.active).map(|p| p.id.clone()).collect()
    }

    /// Installs a new probe key: new probes use it, responses under the previous key are accepted for the
    /// ring's grace period.
    pub fn rotate_key(&mut self, key: ProbeKey, now_mono_ns: u64) {
        self.keys.rotate(key, now_mono_ns);
    }

    /// Number of probes awaiting a response.
    pub fn outstanding(&self) -> usize {
        self.peers.values().map(|p| p.outstanding.len()).sum()
    }

    fn window_of(&self, mono: u64) -> u64 {
        mono.saturating_sub(self.start.mono_ns) / self.window_ns
    }

    fn window_close_time(&self, k: u64) -> u64 {
        self.start
            .mono_ns
            .saturating_add(k.saturating_add(1).saturating_mul(self.window_ns))
            .saturating_add(self.timeout_ns)
    }

    fn jittered_interval(&mut self) -> u64 {
        let j = self.config.jitter;
        let f = if j > 0.0 {
            self.rng.gen_range(1.0 - j..=1.0 + j)
        } else {
            1.0
        };
        ((self.interval_ns as f64) * f).max(1.0) as u64
    }

    /// The next probe due at `now`, if any. Call again with a fresh reading until `None`.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        let (&w, _) = self
            .peers
            .iter()
            .filter(|(_, p)| p.active && p.next_due <= now.mono_ns)
            .min_by_key(|(_, p)| p.next_due)?;
        let step = self.jittered_interval();
        let window = self.window_of(now.mono_ns);
        let (me, timeout_ns) = (self.me, self.timeout_ns);
        let key = self.keys.current().clone();
        let p = self.peers.get_mut(&w)?;
        let seq = p.next_seq;
        p.next_seq = p.next_seq.wrapping_add(1);
        p.next_due = p.next_due.saturating_add(step);
        if p.next_due <= now.mono_ns {
            // The caller fell behind: restart the schedule from now rather than send a burst.
            p.next_due = now.mono_ns.saturating_add(step);
        }
        p.outstanding.insert(
            seq,
            Sent {
                mono: now.mono_ns,
                real: now.real_ns,
                kernel_tx_real: None,
                window,
                deadline: now.mono_ns.saturating_add(timeout_ns),
            },
        );
        p.windows.entry(window).or_default();
        let probe = Probe {
            kind: Kind::Request,
            key_id: key.id(),
            sender: me,
            receiver: w,
            seq,
            sent_mono_ns: now.mono_ns,
            hold_ns: 0,
        };
        Some(Transmit {
            to: p.addr,
            peer: p.id.clone(),
            seq,
            datagram: probe.encode(&key).to_vec(),
        })
    }

    /// Records the kernel's software send timestamp (`CLOCK_REALTIME` ns) of the probe `seq` to `peer`.
    /// Ignored unless the probe is outstanding and the timestamp lies within 100 ms after the user-space send
    /// reading.
    pub fn on_tx_timestamp(&mut self, peer: WireId, seq: u64, kernel_real_ns: u64) {
        if let Some(s) = self.peers.get_mut(&peer).and_then(|p| p.outstanding.get_mut(&seq))
            && kernel_real_ns >= s.real
            && kernel_real_ns - s.real <= 100_000_000
        {
            s.kernel_tx_real = Some(kernel_real_ns);
        }
    }

    /// Handles a response datagram from `src` received at `rx`; returns the RTT sample it yields.
    pub fn handle_response(
        &mut self,
        rx: RxTime,
        src: SocketAddr,
        datagram: &[u8],
    ) -> Result<RttSample, ResponseRejected> {
        let resp = Probe::parse_unverified(datagram)?;
        if resp.kind != Kind::Response {
            return Err(ResponseRejected::NotAResponse);
        }
        if resp.receiver != self.me {
            return Err(ResponseRejected::NotForMe);
        }
        let now = rx.user.mono_ns;
        let p = self.peers.get(&resp.sender).ok_or(ResponseRejected::UnknownPeer)?;
        if !same_endpoint(p.addr, src) {
            return Err(ResponseRejected::WrongSource {
                peer: p.id.clone(),
                expected: p.addr,
                got: src,
            });
        }
        resp.verify(datagram, &self.keys, now)?;
        let p = self.peers.get_mut(&resp.sender).ok_or(ResponseRejected::UnknownPeer)?;
        let seq = resp.seq;
        let Some(sent) = p.outstanding.get(&seq).copied() else {
            if let Some(&(_, window)) = p.timed_out.iter().find(|(s, _)| *s == seq) {
                p.timed_out.retain(|(s, _)| *s != seq);
                if let Some(acc) = p.windows.get_mut(&window) {
                    acc.late();
                }
                return Err(ResponseRejected::Late { seq });
            }
            return Err(ResponseRejected::NotOutstanding { seq });
        };
        if sent.mono != resp.sent_mono_ns {
            return Err(ResponseRejected::Mismatch { seq });
        }
        p.outstanding.remove(&seq);
        let acc = p.windows.entry(sent.window).or_default();
        if now > sent.deadline {
            acc.lost();
            acc.late();
            return Err(ResponseRejected::Late { seq });
        }
        let (raw, mode) = raw_rtt(&sent, rx);
        let hold = u64::from(resp.hold_ns);
        let rtt_ns = if hold < raw { raw - hold } else { raw };
        let sample = RttSample { seq, rtt_ns, mode };
        acc.sample(sample);
        Ok(sample)
    }

    /// Counts overdue probes as lost.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        for p in self.peers.values_mut() {
            while let Some((&seq, s)) = p.outstanding.first_key_value() {
                // Sequence numbers grow with send time, so the first entry has the earliest deadline.
                if s.deadline > now.mono_ns {
                    break;
                }
                let window = s.window;
                p.outstanding.remove(&seq);
                p.windows.entry(window).or_default().lost();
                if p.timed_out.len() >= REMEMBER_TIMED_OUT {
                    p.timed_out.pop_front();
                }
                p.timed_out.push_back((seq, window));
            }
        }
    }

    /// Expires overdue probes and returns every window that is complete at `now`, per peer, oldest first.
    pub fn poll_windows(&mut self, now: Timestamp) -> Vec<WindowStats> {
        self.handle_timeout(now);
        let mut out = Vec::new();
        let closable = |k: u64| self.window_close_time(k) <= now.mono_ns;
        let mut done: Vec<(WireId, u64)> = Vec::new();
        for (w, p) in &self.peers {
            for &k in p.windows.keys() {
                if closable(k) {
                    done.push((*w, k));
                }
            }
        }
        done.sort_by_key(|&(w, k)| (k, w));
        let duration_ms = self.window_ns / 1_000_000;
        for (w, k) in done {
            let start_unix_ms = self.start.real_ns.saturating_add(k.saturating_mul(self.window_ns)) / 1_000_000;
            if let Some(p) = self.peers.get_mut(&w)
                && let Some(acc) = p.windows.remove(&k)
            {
                out.push(acc.finish(p.id.clone(), start_unix_ms, duration_ms));
            }
        }
        self.peers
            .retain(|_, p| p.active || !p.outstanding.is_empty() || !p.windows.is_empty());
        out
    }

    /// When [`Prober::poll_transmit`] or [`Prober::poll_windows`] next has something to do (monotonic ns).
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut min = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        for p in self.peers.values() {
            if p.active {
                min(p.next_due);
            }
            if let Some((_, s)) = p.outstanding.first_key_value() {
                min(s.deadline);
            }
            if let Some((&k, _)) = p.windows.first_key_value() {
                min(self.window_close_time(k));
            }
        }
        t
    }
}

/// `now` moved back to the last realtime multiple of `window_ns` (both clocks alike), if the monotonic clock
/// allows.
fn aligned_start(now: Timestamp, window_ns: u64) -> Timestamp {
    let offset = now.real_ns % window_ns.max(1);
    if now.mono_ns >= offset {
        Timestamp {
            mono_ns: now.mono_ns - offset,
            real_ns: now.real_ns - offset,
        }
    } else {
        now
    }
}

/// RTT before subtracting the responder's hold time, and the timestamping mode used.
fn raw_rtt(sent: &Sent, rx: RxTime) -> (u64, TimestampMode) {
    let user = rx.user.mono_ns.saturating_sub(sent.mono);
    if let Some(krx) = rx.kernel_real_ns {
        let (tx, mode) = match sent.kernel_tx_real {
            Some(k) => (k, TimestampMode::KernelTxRx),
            None => (sent.real, TimestampMode::KernelRx),
        };
        let slack = 10_000 + user / 1000;
        if krx > tx && krx - tx <= user.saturating_add(slack) {
            return (krx - tx, mode);
        }
    }
    (user, TimestampMode::UserSpace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{DEFAULT_KEY_GRACE, KEY_LEN};
    use crate::responder::{Responder, ResponderConfig};

    const MS: u64 = 1_000_000;
    const A: &str = "192.0.2.1:7444";
    const B: &str = "192.0.2.2:7444";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ring(id: u32) -> KeyRing {
        KeyRing::new(ProbeKey::new(id, [id as u8; KEY_LEN]), DEFAULT_KEY_GRACE)
    }

    fn cfg() -> ProberConfig {
        ProberConfig {
            seed: Some(7),
            ..ProberConfig::default()
        }
    }

    fn t(mono: u64) -> Timestamp {
        Timestamp::from_mono(mono)
    }

    /// "a" probes "b"; "b" answers.
    fn pair() -> (Prober, Responder) {
        let mut prober = Prober::new(&NodeId::new("a"), ring(1), cfg(), t(0)).unwrap();
        prober.set_peers(t(0), [Peer::new("b", addr(B))]);
        let mut responder = Responder::new(&NodeId::new("b"), ring(1), ResponderConfig::default()).unwrap();
        responder.set_peers([Peer::new("a", addr(A))]);
        (prober, responder)
    }

    /// Sends everything due at `now` and returns it.
    fn send_due(p: &mut Prober, now: u64) -> Vec<Transmit> {
        std::iter::from_fn(|| p.poll_transmit(t(now))).collect()
    }

    #[test]
    fn config_is_validated() {
        let me = NodeId::new("a");
        for bad in [
            ProberConfig {
                interval: Duration::ZERO,
                ..cfg()
            },
            ProberConfig { jitter: 0.9, ..cfg() },
            ProberConfig {
                jitter: f64::NAN,
                ..cfg()
            },
            ProberConfig {
                timeout: Duration::from_secs(30),
                ..cfg()
            },
            ProberConfig {
                timeout: Duration::ZERO,
                ..cfg()
            },
            ProberConfig {
                window: Duration::from_millis(500),
                timeout: Duration::from_millis(100),
                ..cfg()
            },
        ] {
            assert!(Prober::new(&me, ring(1), bad.clone(), t(0)).is_err(), "{bad:?}");
        }
        assert!(Prober::new(&me, ring(1), cfg(), t(0)).is_ok());
    }

    #[test]
    fn schedules_about_once_per_interval_with_jitter() {
        let (mut p, _) = pair();
        let mut sends = Vec::new();
        let mut now = 0;
        while now < 100_000 * MS {
            for tx in send_due(&mut p, now) {
                assert_eq!(tx.to, addr(B));
                sends.push(now);
            }
            now += MS;
        }
        // 100 s at 1/s.
        assert!((98..=102).contains(&sends.len()), "{}", sends.len());
        let gaps: Vec<u64> = sends.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&g| (899 * MS..=1101 * MS).contains(&g)), "{gaps:?}");
        // Jittered: not all the same.
        assert!(gaps.iter().any(|&g| g != gaps[0]));
        // First probe within the first interval.
        assert!(sends[0] < 1000 * MS);
    }

    #[test]
    fn no_burst_after_falling_behind() {
        let (mut p, _) = pair();
        assert_eq!(send_due(&mut p, 1000 * MS).len(), 1);
        // The caller stalls for a minute: one probe, not sixty.
        assert_eq!(send_due(&mut p, 61_000 * MS).len(), 1);
        p.poll_windows(t(61_000 * MS));
        let next = p.poll_timeout().unwrap();
        assert!(next >= 61_000 * MS + 900 * MS, "{next}");
    }

    #[test]
    fn measures_rtt_from_matched_response() {
        let (mut p, mut r) = pair();
        let tx = send_due(&mut p, 1000 * MS).pop().unwrap();
        // Network 2 ms each way, responder holds 50 µs.
        let rx_at_b = RxTime::user(t(1002 * MS));
        let resp = r
            .respond(t(1002 * MS + 50_000), rx_at_b, addr(A), &tx.datagram)
            .unwrap();
        let s = p
            .handle_response(RxTime::user(t(1004 * MS + 50_000)), addr(B), &resp)
            .unwrap();
        assert_eq!(s.rtt_ns, 4 * MS);
        assert_eq!(s.mode, TimestampMode::UserSpace);
        assert_eq!(s.seq, tx.seq);
        // The same response again: a duplicate, no second sample.
        let dup = p.handle_response(RxTime::user(t(1005 * MS)), addr(B), &resp);
        assert_eq!(dup, Err(ResponseRejected::NotOutstanding { seq: tx.seq }));
    }

    #[test]
    fn kernel_timestamps_are_used_when_consistent() {
        let (mut p, mut r) = pair();
        // Realtime 5 000 s ahead of monotonic.
        let off = 5_000_000 * MS;
        let now = Timestamp {
            mono_ns: 1000 * MS,
            real_ns: 1000 * MS + off,
        };
        let tx = p.poll_transmit(now).unwrap();
        let resp = r.respond(t(0), RxTime::user(t(0)), addr(A), &tx.datagram).unwrap();
        // User space saw 1.2 ms; the kernel stamped receive 150 µs before user space did.
        let rx = RxTime {
            user: Timestamp {
                mono_ns: 1001 * MS + 200_000,
                real_ns: 0,
            },
            kernel_real_ns: Some(now.real_ns + 1_050_000),
        };
        let s = p.handle_response(rx, addr(B), &resp).unwrap();
        assert_eq!((s.rtt_ns, s.mode), (1_050_000, TimestampMode::KernelRx));

        // With a kernel TX stamp 20 µs after the user-space send reading as well.
        let now = Timestamp {
            mono_ns: 3000 * MS,
            real_ns: 3000 * MS + off,
        };
        let tx = p.poll_transmit(now).unwrap();
        p.on_tx_timestamp(WireId::of("b"), tx.seq, now.real_ns + 20_000);
        let resp = r.respond(t(0), RxTime::user(t(1)), addr(A), &tx.datagram).unwrap();
        let rx = RxTime {
            user: Timestamp {
                mono_ns: 3001 * MS,
                real_ns: 0,
            },
            kernel_real_ns: Some(now.real_ns + 900_000),
        };
        let s = p.handle_response(rx, addr(B), &resp).unwrap();
        assert_eq!((s.rtt_ns, s.mode), (880_000, TimestampMode::KernelTxRx));
    }

    #[test]
    fn inconsistent_kernel_timestamp_falls_back_to_user_space() {
        let (mut p, mut r) = pair();
        let now = Timestamp {
            mono_ns: 1000 * MS,
            real_ns: 9_000_000 * MS,
        };
        let tx = p.poll_transmit(now).unwrap();
        let resp = r.respond(t(0), RxTime::user(t(0)), addr(A), &tx.datagram).unwrap();
        // Realtime clock stepped forward by 1 s during the round trip.
        let rx = RxTime {
            user: t(1002 * MS),
            kernel_real_ns: Some(now.real_ns + 1001 * MS),
        };
        let s = p.handle_response(rx, addr(B), &resp).unwrap();
        assert_eq!((s.rtt_ns, s.mode), (2 * MS, TimestampMode::UserSpace));
        // A TX stamp before the send reading is ignored.
        let now = Timestamp {
            mono_ns: 3000 * MS,
            real_ns: 9_000_000 * MS + 2000 * MS,
        };
        let tx = p.poll_transmit(now).unwrap();
        p.on_tx_timestamp(WireId::of("b"), tx.seq, now.real_ns - 1);
        let resp = r.respond(t(0), RxTime::user(t(1)), addr(A), &tx.datagram).unwrap();
        let rx = RxTime {
            user: t(3001 * MS),
            kernel_real_ns: Some(now.real_ns + 900_000),
        };
        assert_eq!(
            p.handle_response(rx, addr(B), &resp).unwrap().mode,
            TimestampMode::KernelRx
        );
    }

    #[test]
    fn late_response_is_loss_and_flagged() {
        let (mut p, mut r) = pair();
        let tx = send_due(&mut p, 1000 * MS).pop().unwrap();
        let resp = r
            .respond(t(0), RxTime::user(t(1000 * MS)), addr(A), &tx.datagram)
            .unwrap();
        // Timeout is 1 s: at 2000 ms + 1 the probe is lost.
        p.handle_timeout(t(2000 * MS + 1));
        assert_eq!(p.outstanding(), 0);
        let late = p.handle_response(RxTime::user(t(2500 * MS)), addr(B), &resp);
        assert_eq!(late, Err(ResponseRejected::Late { seq: tx.seq }));
        // Also late when the response arrives after the deadline but before handle_timeout ran.
        let tx = send_due(&mut p, 3000 * MS).pop().unwrap();
        let resp = r
            .respond(t(0), RxTime::user(t(3000 * MS)), addr(A), &tx.datagram)
            .unwrap();
        assert_eq!(
            p.handle_response(RxTime::user(t(4001 * MS)), addr(B), &resp),
            Err(ResponseRejected::Late { seq: tx.seq })
        );
        let w = p.poll_windows(t(31_000 * MS + 1));
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].sent, w[0].samples, w[0].lost, w[0].late), (2, 0, 2, 2));
        assert_eq!(w[0].loss_ratio, 1.0);
        assert_eq!(w[0].rtt, None);
    }

    #[test]
    fn responses_are_authenticated_and_pinned_to_peer_address() {
        let (mut p, mut r) = pair();
        let tx = send_due(&mut p, 1000 * MS).pop().unwrap();
        let resp = r
            .respond(t(0), RxTime::user(t(1000 * MS)), addr(A), &tx.datagram)
            .unwrap();
        let at = RxTime::user(t(1001 * MS));
        assert!(matches!(
            p.handle_response(at, addr("203.0.113.9:7444"), &resp),
            Err(ResponseRejected::WrongSource { .. })
        ));
        let mut bad = resp.clone();
        bad[50] ^= 1;
        assert_eq!(
            p.handle_response(at, addr(B), &bad),
            Err(ResponseRejected::Wire(WireError::BadMac))
        );
        // A request echoed back is not a response.
        assert_eq!(
            p.handle_response(at, addr(B), &tx.datagram),
            Err(ResponseRejected::NotAResponse)
        );
        // A response signed by a node with the right key but claiming to be someone else.
        let forged = Probe {
            kind: Kind::Response,
            key_id: 1,
            sender: WireId::of("c"),
            receiver: WireId::of("a"),
            seq: tx.seq,
            sent_mono_ns: 1000 * MS,
            hold_ns: 0,
        }
        .encode(ring(1).current());
        assert_eq!(
            p.handle_response(at, addr(B), &forged),
            Err(ResponseRejected::UnknownPeer)
        );
        // Forged echo of the send time (a key holder lying): not matched.
        let lying = Probe {
            kind: Kind::Response,
            key_id: 1,
            sender: WireId::of("b"),
            receiver: WireId::of("a"),
            seq: tx.seq,
            sent_mono_ns: 999 * MS,
            hold_ns: 0,
        }
        .encode(ring(1).current());
        assert_eq!(
            p.handle_response(at, addr(B), &lying),
            Err(ResponseRejected::Mismatch { seq: tx.seq })
        );
        // The genuine response still counts after all that.
        assert_eq!(p.handle_response(at, addr(B), &resp).unwrap().rtt_ns, MS);
    }

    #[test]
    fn key_rotation_with_grace() {
        let (mut p, mut r) = pair();
        // Probe sent under key 1.
        let old = send_due(&mut p, 1000 * MS).pop().unwrap();
        // Both rotate to key 2 while it is in flight, the responder first.
        r.rotate_key(ProbeKey::new(2, [2; KEY_LEN]), 1000 * MS);
        p.rotate_key(ProbeKey::new(2, [2; KEY_LEN]), 1000 * MS);
        let resp = r
            .respond(t(1001 * MS), RxTime::user(t(1001 * MS)), addr(A), &old.datagram)
            .unwrap();
        assert_eq!(
            Probe::parse_unverified(&resp).unwrap().key_id,
            1,
            "answered under the request's key"
        );
        assert!(p.handle_response(RxTime::user(t(1002 * MS)), addr(B), &resp).is_ok());
        // New probes use key 2.
        let new = send_due(&mut p, 2000 * MS).pop().unwrap();
        assert_eq!(Probe::parse_unverified(&new.datagram).unwrap().key_id, 2);
        let resp = r
            .respond(t(2001 * MS), RxTime::user(t(2001 * MS)), addr(A), &new.datagram)
            .unwrap();
        assert!(p.handle_response(RxTime::user(t(2002 * MS)), addr(B), &resp).is_ok());
        // A responder still on key 1 (it missed the rotation): its answers are accepted during grace only.
        let mut lagging = Responder::new(&NodeId::new("b"), ring(1), ResponderConfig::default()).unwrap();
        lagging.set_peers([Peer::new("a", addr(A))]);
        let mut p1 = Prober::new(&NodeId::new("a"), ring(1), cfg(), t(0)).unwrap();
        p1.set_peers(t(0), [Peer::new("b", addr(B))]);
        let x = send_due(&mut p1, 1000 * MS).pop().unwrap();
        p1.rotate_key(ProbeKey::new(2, [2; KEY_LEN]), 1000 * MS);
        let resp = lagging
            .respond(t(0), RxTime::user(t(1000 * MS)), addr(A), &x.datagram)
            .unwrap();
        assert!(p1.handle_response(RxTime::user(t(1001 * MS)), addr(B), &resp).is_ok());
        // 61 s later key 1 is gone (grace 60 s): a response under it is refused.
        p1.poll_windows(t(61_000 * MS));
        let y = send_due(&mut p1, 61_500 * MS).pop().unwrap();
        let mut y_old = Probe::parse_unverified(&y.datagram).unwrap();
        y_old.key_id = 1;
        let resp = Probe {
            kind: Kind::Response,
            sender: WireId::of("b"),
            receiver: WireId::of("a"),
            ..y_old
        }
        .encode(ring(1).current());
        assert_eq!(
            p1.handle_response(RxTime::user(t(61_501 * MS)), addr(B), &resp),
            Err(ResponseRejected::Wire(WireError::UnknownKey { key_id: 1 }))
        );
    }

    #[test]
    fn windows_report_stats_of_known_samples() {
        let cfg = ProberConfig {
            interval: Duration::from_millis(100),
            jitter: 0.0,
            timeout: Duration::from_millis(50),
            window: Duration::from_secs(1),
            seed: Some(1),
        };
        let mut p = Prober::new(
            &NodeId::new("a"),
            ring(1),
            cfg,
            Timestamp {
                mono_ns: 0,
                real_ns: 1_700_000_000_000 * MS,
            },
        )
        .unwrap();
        p.set_peers(t(0), [Peer::new("b", addr(B))]);
        let fast = ResponderConfig {
            per_peer_rate: 100.0,
            ..ResponderConfig::default()
        };
        let mut r = Responder::new(&NodeId::new("b"), ring(1), fast).unwrap();
        r.set_peers([Peer::new("a", addr(A))]);
        // RTTs in ms for the 10 probes of window 0; every 5th is lost.
        let rtts = [1u64, 2, 3, 4, 0, 6, 7, 8, 9, 0];
        let mut i = 0;
        let mut now = 0;
        let mut reports = Vec::new();
        while now < 2_100 * MS {
            while let Some(tx) = p.poll_transmit(t(now)) {
                let rtt = if i < rtts.len() { rtts[i] } else { 1 };
                i += 1;
                if rtt > 0 {
                    let resp = r.respond(t(now), RxTime::user(t(now)), addr(A), &tx.datagram).unwrap();
                    p.handle_response(RxTime::user(t(now + rtt * MS)), addr(B), &resp)
                        .unwrap();
                }
            }
            reports.extend(p.poll_windows(t(now)));
            now += MS;
        }
        assert_eq!(reports.len(), 2, "{reports:?}");
        let w = &reports[0];
        assert_eq!(w.peer, NodeId::new("b"));
        assert_eq!((w.sent, w.samples, w.lost, w.late), (10, 8, 2, 0));
        assert_eq!(w.start_unix_ms, 1_700_000_000_000);
        assert_eq!(w.duration_ms, 1000);
        assert!((w.loss_ratio - 0.2).abs() < 1e-12);
        let s = w.rtt.unwrap();
        // Samples 1 2 3 4 6 7 8 9 ms.
        assert_eq!((s.min_ns, s.max_ns), (MS, 9 * MS));
        assert_eq!(s.p50_ns, 4 * MS); // rank ceil(4) = 4
        assert_eq!(s.p90_ns, 9 * MS); // rank ceil(7.2) = 8
        assert_eq!(s.p99_ns, 9 * MS);
        assert_eq!(s.mean_ns, 5 * MS); // 40 / 8
        // Consecutive differences 1 1 1 2 1 1 1 = 8 over 7.
        assert_eq!(s.jitter_ns, (8 * MS + 3) / 7);
        assert_eq!(w.mode, Some(TimestampMode::UserSpace));
        assert_eq!(reports[1].start_unix_ms, 1_700_000_001_000);
        assert_eq!((reports[1].sent, reports[1].lost), (10, 0));
    }

    #[test]
    fn windows_align_to_realtime_multiples() {
        // Created at realtime 1 700 000 012.345 s: window 0 started at 1 700 000 010 s, a multiple of 30 s.
        let now = Timestamp {
            mono_ns: 50_000 * MS,
            real_ns: 1_700_000_012_345 * MS,
        };
        let mut p = Prober::new(&NodeId::new("a"), ring(1), cfg(), now).unwrap();
        p.set_peers(now, [Peer::new("b", addr(B))]);
        let at = |mono: u64| Timestamp {
            mono_ns: mono,
            real_ns: mono - 50_000 * MS + 1_700_000_012_345 * MS,
        };
        assert!(p.poll_transmit(at(51_000 * MS)).is_some());
        // Window 0 ends 27.655 s after creation and closes one timeout (1 s) later.
        assert!(p.poll_windows(at(50_000 * MS + 28_654 * MS)).is_empty());
        let w = p.poll_windows(at(50_000 * MS + 28_656 * MS));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].start_unix_ms, 1_700_000_010_000);
    }

    #[test]
    fn removed_peer_finishes_its_window_then_disappears() {
        let (mut p, mut r) = pair();
        let tx = send_due(&mut p, 1000 * MS).pop().unwrap();
        p.set_peers(t(1000 * MS), []);
        assert!(p.peers().is_empty());
        assert!(send_due(&mut p, 5000 * MS).is_empty());
        // Its outstanding probe is still answered.
        let resp = r
            .respond(t(0), RxTime::user(t(1000 * MS)), addr(A), &tx.datagram)
            .unwrap();
        assert!(p.handle_response(RxTime::user(t(1001 * MS)), addr(B), &resp).is_ok());
        let w = p.poll_windows(t(31_000 * MS));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].samples, 1);
        assert_eq!(p.poll_timeout(), None);
        // Re-added: sequence numbers continue above the old ones.
        p.set_peers(t(40_000 * MS), [Peer::new("b", addr(B))]);
        let tx2 = send_due(&mut p, 41_000 * MS).pop().unwrap();
        assert!(tx2.seq > tx.seq);
        assert!(
            r.respond(t(0), RxTime::user(t(41_000 * MS)), addr(A), &tx2.datagram)
                .is_some()
        );
    }

    #[test]
    fn never_probes_itself() {
        let mut p = Prober::new(&NodeId::new("a"), ring(1), cfg(), t(0)).unwrap();
        p.set_peers(t(0), [Peer::new("a", addr(A)), Peer::new("b", addr(B))]);
        assert_eq!(p.peers(), vec![NodeId::new("b")]);
    }
}
