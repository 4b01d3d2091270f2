//! A userspace delay router: zones with per-zone-pair one-way delays and per-host loss, for kernels without
//! the `netem` qdisc (this one). Used by the latency end-to-end tests and, later, by `nimbus-lab` for zones.
//!
//! # Topology
//! ```text
//!   [host ns "a-1" eth0 198.18.1.1/32]──veth──h1┐
//!   [host ns "a-2" eth0 198.18.1.2/32]──veth──h2┤ [router ns "PREFIX-rt"]
//!   [host ns "b-1" eth0 198.18.2.1/32]──veth──h3┤    dly0 (TUN) <-> nimbus-delay-router
//!   ...                                         ┘
//! ```
//! - Every host has its own veth pair to the router namespace (there is no bridge), so **every** packet
//!   between two hosts — same zone or not — crosses the router. Veths are created inside the router namespace
//!   with the peer moved straight into the host namespace; nothing is ever created in the root namespace, and
//!   deleting the namespaces removes every link, rule, route and the TUN device.
//! - Host side: `eth0` carries the host's address as a /32, `169.254.0.1 dev eth0 scope link` and
//!   `default via 169.254.0.1`, so the host sends everything to the router whatever the addresses are
//!   (default addresses come from 198.18.0.0/15, the RFC 2544 benchmarking range: zone `z` (1-based), host `h`
//!   → `198.18.z.h`; explicit addresses are allowed, e.g. the lab's 198.51.100.0/24).
//! - Router side: every `hN` carries the same gateway address [`ROUTER_GATEWAY`]/32 (so ARP works in both
//!   directions), a route `HOST_IP/32 dev hN`, and a policy rule `iif hN lookup 100`; table 100 holds only
//!   `default dev dly0`. IPv4 forwarding is on, `rp_filter` off (a packet written back into the TUN arrives
//!   on `dly0`, not on the source host's veth) and IPv6 off in the router namespace.
//! - `dly0` is a persistent TUN device created by the harness (`ip tuntap add`) so the routes exist before
//!   the router process starts; the process attaches to it by name. While no process is attached the
//!   device has no carrier and the kernel drops what is routed to it (fail closed, no undelayed leak).
//!
//! # Packet path
//! A packet from `a-1` to `b-1` enters the router on `h1`; the `iif h1` rule sends it to table 100 and out of
//! `dly0`, where `nimbus-delay-router` reads it. The process classifies it by source and destination
//! address into (zone(src), zone(dst)), drops it with the configured probability of the *source* host
//! (deterministic PRNG per host, seeded; so a host with loss `p` shows `p` ping loss whichever side pings),
//! otherwise holds it for the one-way delay of that ordered zone pair and writes it back into `dly0`. The
//! kernel then routes it (iif `dly0`, no rule matches, main table) to `h3` and `b-1`. RTT between two hosts is
//! the sum of both one-way delays plus the router's own cost (the "baseline", measured with zero delay).
//!
//! # Precision
//! Async runtime timers tick in whole milliseconds, so packets are held and released by one dedicated OS
//! thread ([`Engine::run`]) with a min-heap ([`DelayQueue`]) ordered by (release time, arrival sequence).
//! The thread waits for the TUN with `ppoll` (nanosecond timeout, timer slack set to 1 ns) until
//! [`SPIN_WINDOW`] (200 µs) before the earliest release time, then spins on the monotonic clock, still
//! polling the TUN without blocking, and writes each packet when its time comes. Reading and releasing
//! share the thread on purpose: handing packets to a separate release thread costs a futex wake-up, measured
//! here (a 2-vCPU VM) at 50-100 µs when the other vCPU idles — more than the 50 µs in-zone delay; a second
//! thread made intra-zone RTTs up to 75-120 µs too long; this design keeps release lateness at a few µs.
//! Order is FIFO per zone pair (and so per flow): a packet is never released before an earlier packet of
//! the same zone pair, even across a reload that shortens the delay. Packets whose release time has already
//! come (zero delay) are written at once. The queue is bounded ([`RouterConfig::queue_limit`]); packets
//! beyond it are dropped and counted.
//!
//! # The router process
//! `nimbus-delay-router --tun dly0 --config FILE` ([`run_router`]): reads and validates the JSON
//! [`RouterConfig`] (exit 64 when it is wrong), attaches to the TUN, prints [`READY_MARKER`] on stdout, then
//! runs until SIGTERM/SIGINT. SIGHUP re-reads the file (a bad file is reported and the old configuration
//! kept; success prints [`RELOADED_MARKER`]`N`), SIGUSR1 prints [`STATS_MARKER`] and a JSON
//! [`StatsSnapshot`].
//!
//! # Harness
//! [`DelayLab::builder`] declares zones, hosts, delays and loss, creates everything and starts the router;
//! [`DelayLab::apply`] changes delays at run time (SIGHUP); [`ping_rtts`] measures. Dropping the lab stops
//! the router and deletes every namespace, also while unwinding from a panic.
//!
//! Where a kernel has `tc netem`, prefer it; this router exists because this machine's kernel does not.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};
use crate::netns::{Netns, check_ifname, reap_stale_test_namespaces, unique_prefix};
use crate::process::{Process, ProcessBuilder, run_checked};
use crate::state::ProcessRecord;
use crate::wait::{Attempt, patience, poll_until};
use crate::work::Work;

/// File name of the router binary.
pub const ROUTER_BIN: &str = "nimbus-delay-router";

/// Name of the TUN device in the router namespace.
pub const ROUTER_TUN: &str = "dly0";

/// Routing table that sends everything arriving from a host into the TUN.
pub const ROUTE_TABLE: u32 = 100;

/// Priority of the `iif hN lookup 100` rules (after `local`, before `main`).
pub const RULE_PREF: u32 = 100;

/// The router's address on every host-facing veth, the hosts' default gateway.
pub const ROUTER_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

/// Default host addresses: 198.18.0.0/15 (RFC 2544 benchmarking). Zone `z`, host `h` → `198.18.z.h`.
pub const DELAY_SUBNET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

/// How long before a release time the forwarding thread stops sleeping and spins on the clock.
pub const SPIN_WINDOW: Duration = Duration::from_micros(200);

/// Default bound of the release queue, in packets (about 12 MB of 1500-byte packets).
pub const DEFAULT_QUEUE_LIMIT: usize = 8192;

/// Largest one-way delay a configuration may ask for.
pub const MAX_ONE_WAY: Duration = Duration::from_secs(10);

/// Default seed of the loss PRNG.
pub const DEFAULT_SEED: u64 = 0x6e69_6d62_7573;

/// Printed on stdout once the router is attached to its TUN and forwarding.
pub const READY_MARKER: &str = "nimbus-delay-router ready";

/// Printed on stdout after a successful SIGHUP reload, followed by the new generation number (1, 2, ...).
pub const RELOADED_MARKER: &str = "nimbus-delay-router reloaded generation=";

/// Printed on stdout when a SIGHUP reload fails (the old configuration stays in force).
pub const RELOAD_FAILED_MARKER: &str = "nimbus-delay-router reload failed:";

/// Printed on stdout on SIGUSR1 and at exit, followed by a JSON [`StatsSnapshot`].
pub const STATS_MARKER: &str = "nimbus-delay-router stats";

/// Exit code of the router for a bad configuration or usage.
pub const EXIT_CONFIG: u8 = 64;

/// A release later than this counts in [`StatsSnapshot::late_over_50us`].
const LATE_THRESHOLD: Duration = Duration::from_micros(50);

/// Largest packet read from the TUN (no offloads: at most the MTU, but be generous).
const MAX_PACKET: usize = 65_536;

// ----- errors -------------------------------------------------------------------------------------------

/// What can go wrong in the router process or with its configuration.
#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    /// The configuration parsed but makes no sense.
    #[error(
        "invalid delay router config{}: {}; fix it and start the router again (a running router keeps its old \
         config when a SIGHUP reload fails)",
        path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default(),
        problems.join("; ")
    )]
    InvalidConfig {
        /// The file, when it came from one.
        path: Option<PathBuf>,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The configuration file could not be read.
    #[error("reading delay router config {}: {source} (check the --config path)", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not JSON of the expected shape.
    #[error(
        "delay router config {}: {source} (expected JSON with \"zones\", optional \"delays\", \"loss\", \"seed\", \
         \"queue_limit\"; see the e2e README)",
        path.display()
    )]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// The TUN device could not be opened.
    #[error(
        "attaching to TUN device {name}: {source} (run as root inside the router namespace, where the device was \
         created with `ip tuntap add dev {name} mode tun`)"
    )]
    Tun {
        /// The device name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another I/O failure while running.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl DelayError {
    /// Whether the router should exit with [`EXIT_CONFIG`] (bad configuration) rather than 1.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            DelayError::InvalidConfig { .. } | DelayError::ReadConfig { .. } | DelayError::ParseConfig { .. }
        )
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DelayError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<DelayError> for HarnessError {
    fn from(e: DelayError) -> Self {
        match e {
            DelayError::Io { context, source } => HarnessError::Io { context, source },
            other => HarnessError::Misuse(other.to_string()),
        }
    }
}

// ----- configuration ------------------------------------------------------------------------------------

/// The router's configuration file (JSON).
///
/// ```json
/// {
///   "zones": [ { "name": "a", "hosts": ["198.18.1.1", "198.18.1.2"] },
///              { "name": "b", "hosts": ["198.18.2.1"] } ],
///   "delays": [ { "from": "a", "to": "a", "one_way_us": 50 },
///               { "from": "a", "to": "b", "one_way_us": 500, "symmetric": true } ],
///   "loss": [ { "host": "198.18.2.1", "fraction": 0.3 } ],
///   "seed": 1,
///   "queue_limit": 8192
/// }
/// ```
/// Zone pairs without a `delays` entry get no delay; so do packets from or to addresses in no zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// The zones and the host addresses in each (an address may be in one zone only).
    pub zones: Vec<ZoneConfig>,
    /// One-way delays per ordered zone pair.
    #[serde(default)]
    pub delays: Vec<DelayConfig>,
    /// Per-host loss of the packets the host *sends*.
    #[serde(default)]
    pub loss: Vec<LossConfig>,
    /// Seed of the loss PRNG (the same seed and traffic give the same drops). Default [`DEFAULT_SEED`].
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Most packets held at once; more are dropped and counted. Default [`DEFAULT_QUEUE_LIMIT`].
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
}

fn default_seed() -> u64 {
    DEFAULT_SEED
}

fn default_queue_limit() -> usize {
    DEFAULT_QUEUE_LIMIT
}

/// One zone of a [`RouterConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Zone name (unique).
    pub name: String,
    /// Host addresses in the zone.
    pub hosts: Vec<Ipv4Addr>,
}

/// One delay entry of a [`RouterConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayConfig {
    /// Zone of the sender.
    pub from: String,
    /// Zone of the receiver (may equal `from`: the delay inside a zone).
    pub to: String,
    /// One-way delay in microseconds (RTT is the sum of both directions).
    pub one_way_us: u64,
    /// Also applies from `to` to `from`. Default false.
    #[serde(default)]
    pub symmetric: bool,
}

/// One loss entry of a [`RouterConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// The host whose outgoing packets are dropped.
    pub host: Ipv4Addr,
    /// Fraction dropped, 0.0 to 1.0.
    pub fraction: f64,
}

impl RouterConfig {
    /// A configuration with these zones and no delay or loss.
    pub fn new(zones: Vec<ZoneConfig>) -> RouterConfig {
        RouterConfig {
            zones,
            delays: Vec::new(),
            loss: Vec::new(),
            seed: DEFAULT_SEED,
            queue_limit: DEFAULT_QUEUE_LIMIT,
        }
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> std::result::Result<RouterConfig, DelayError> {
        let text = std::fs::read_to_string(path).map_err(|source| DelayError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let config: RouterConfig = serde_json::from_str(&text).map_err(|source| DelayError::ParseConfig {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate().map_err(|e| match e {
            DelayError::InvalidConfig { problems, .. } => DelayError::InvalidConfig {
                path: Some(path.to_path_buf()),
                problems,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Pretty JSON, as [`RouterConfig::load`] reads it.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks everything and reports every problem at once.
    pub fn validate(&self) -> std::result::Result<(), DelayError> {
        let mut problems = Vec::new();
        if self.zones.is_empty() {
            problems.push("no zones: declare at least one zone with its hosts".to_string());
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut owner: HashMap<Ipv4Addr, &str> = HashMap::new();
        for (i, zone) in self.zones.iter().enumerate() {
            if zone.name.trim().is_empty() {
                problems.push(format!("zone #{} has an empty name", i + 1));
            }
            if names.insert(zone.name.as_str(), i).is_some() {
                problems.push(format!("zone {:?} is declared twice", zone.name));
            }
            for ip in &zone.hosts {
                if let Some(other) = owner.insert(*ip, zone.name.as_str()) {
                    problems.push(format!("host {ip} is in zone {other:?} and in zone {:?}", zone.name));
                }
            }
        }
        let mut seen: HashMap<(&str, &str), u64> = HashMap::new();
        for d in &self.delays {
            for zone in [&d.from, &d.to] {
                if !names.contains_key(zone.as_str()) {
                    problems.push(format!("delay {}->{} names unknown zone {zone:?}", d.from, d.to));
                }
            }
            if Duration::from_micros(d.one_way_us) > MAX_ONE_WAY {
                problems.push(format!(
                    "delay {}->{} of {} µs is above the limit of {:?}",
                    d.from, d.to, d.one_way_us, MAX_ONE_WAY
                ));
            }
            let mut pairs = vec![(d.from.as_str(), d.to.as_str())];
            if d.symmetric && d.from != d.to {
                pairs.push((d.to.as_str(), d.from.as_str()));
            }
            for pair in pairs {
                if let Some(old) = seen.insert(pair, d.one_way_us)
                    && old != d.one_way_us
                {
                    problems.push(format!(
                        "delay {}->{} is given twice ({old} µs and {} µs)",
                        pair.0, pair.1, d.one_way_us
                    ));
                }
            }
        }
        let mut lossy: HashMap<Ipv4Addr, f64> = HashMap::new();
        for l in &self.loss {
            if !(0.0..=1.0).contains(&l.fraction) {
                problems.push(format!(
                    "loss of {} is {}: give a fraction from 0.0 to 1.0",
                    l.host, l.fraction
                ));
            }
            if !owner.contains_key(&l.host) {
                problems.push(format!("loss names host {} which is in no zone", l.host));
            }
            if lossy.insert(l.host, l.fraction).is_some() {
                problems.push(format!("loss of {} is given twice", l.host));
            }
        }
        if self.queue_limit == 0 {
            problems.push("queue_limit is 0: give the most packets to hold at once (default 8192)".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DelayError::InvalidConfig { path: None, problems })
        }
    }

    /// The zone `ip` belongs to.
    pub fn zone_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.zones
            .iter()
            .find(|z| z.hosts.contains(&ip))
            .map(|z| z.name.as_str())
    }

    /// The one-way delay from zone `from` to zone `to` (zero when none is configured).
    pub fn one_way(&self, from: &str, to: &str) -> Duration {
        self.delays
            .iter()
            .find(|d| (d.from == from && d.to == to) || (d.symmetric && d.from == to && d.to == from))
            .map_or(Duration::ZERO, |d| Duration::from_micros(d.one_way_us))
    }

    /// The delay a round trip between hosts `a` and `b` gets injected (both one-way delays added).
    pub fn injected_rtt(&self, a: Ipv4Addr, b: Ipv4Addr) -> Duration {
        match (self.zone_of(a), self.zone_of(b)) {
            (Some(za), Some(zb)) => self.one_way(za, zb) + self.one_way(zb, za),
            _ => Duration::ZERO,
        }
    }

    /// Sets the one-way delay from `from` to `to` (and back, if `symmetric`), replacing what was set for
    /// those ordered pairs. Sub-microsecond parts are dropped.
    pub fn set_one_way(&mut self, from: &str, to: &str, one_way: Duration, symmetric: bool) {
        let mut pairs = vec![(from.to_string(), to.to_string())];
        if symmetric && from != to {
            pairs.push((to.to_string(), from.to_string()));
        }
        // Split entries that cover a pair we are replacing, keeping their other direction.
        let mut kept = Vec::new();
        for d in self.delays.drain(..) {
            let forward = pairs.iter().any(|(f, t)| *f == d.from && *t == d.to);
            let backward = d.symmetric && pairs.iter().any(|(f, t)| *f == d.to && *t == d.from);
            match (forward, backward) {
                (false, false) => kept.push(d),
                (true, true) => {}
                (true, false) if d.symmetric && d.from != d.to => kept.push(DelayConfig {
                    from: d.to,
                    to: d.from,
                    one_way_us: d.one_way_us,
                    symmetric: false,
                }),
                (false, true) => kept.push(DelayConfig { symmetric: false, ..d }),
                (true, false) => {}
            }
        }
        self.delays = kept;
        self.delays.push(DelayConfig {
            from: from.to_string(),
            to: to.to_string(),
            one_way_us: u64::try_from(one_way.as_micros()).unwrap_or(u64::MAX),
            symmetric: symmetric && from != to,
        });
    }

    /// Sets the loss of host `host` (replacing an earlier value).
    pub fn set_loss(&mut self, host: Ipv4Addr, fraction: f64) {
        self.loss.retain(|l| l.host != host);
        self.loss.push(LossConfig { host, fraction });
    }

    /// The same zones, seed and queue bound without any delay or loss (to measure the router's baseline).
    pub fn without_impairments(&self) -> RouterConfig {
        RouterConfig {
            delays: Vec::new(),
            loss: Vec::new(),
            ..self.clone()
        }
    }
}

// ----- classification (no I/O) --------------------------------------------------------------------------

/// What to do with one packet read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it back at `deadline` (at once if that has passed).
    Forward {
        /// When to release it.
        deadline: Instant,
    },
    /// Drop it.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not an IPv4 packet (the router namespace has IPv6 disabled; nothing else is expected).
    NotIpv4,
    /// The sending host's configured loss.
    Loss,
}

#[derive(Debug)]
struct HostSlot {
    zone: usize,
    loss: f64,
    rng: Option<StdRng>,
}

/// The compiled configuration: address → zone, the delay matrix, loss PRNGs and per-pair FIFO floors.
#[derive(Debug)]
pub struct Classifier {
    hosts: HashMap<Ipv4Addr, HostSlot>,
    /// Number of zones plus one: the last index is "outside every zone".
    width: usize,
    matrix: Vec<Duration>,
    /// The latest deadline handed out per zone pair (FIFO per pair).
    floors: Vec<Option<Instant>>,
    /// Zone names by index; the last one (outside every zone) is `None`.
    names: Vec<Option<String>>,
}

impl Classifier {
    /// Compiles a (validated) configuration.
    pub fn new(config: &RouterConfig) -> std::result::Result<Classifier, DelayError> {
        config.validate()?;
        let width = config.zones.len() + 1;
        let index: HashMap<&str, usize> = config
            .zones
            .iter()
            .enumerate()
            .map(|(i, z)| (z.name.as_str(), i))
            .collect();
        let mut hosts = HashMap::new();
        for (zi, zone) in config.zones.iter().enumerate() {
            for ip in &zone.hosts {
                hosts.insert(
                    *ip,
                    HostSlot {
                        zone: zi,
                        loss: 0.0,
                        rng: None,
                    },
                );
            }
        }
        for l in &config.loss {
            if let Some(slot) = hosts.get_mut(&l.host) {
                slot.loss = l.fraction;
                let salt = u64::from(u32::from(l.host)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                slot.rng = Some(StdRng::seed_from_u64(config.seed ^ salt));
            }
        }
        let mut matrix = vec![Duration::ZERO; width * width];
        for d in &config.delays {
            let (Some(&f), Some(&t)) = (index.get(d.from.as_str()), index.get(d.to.as_str())) else {
                continue;
            };
            let delay = Duration::from_micros(d.one_way_us);
            matrix[f * width + t] = delay;
            if d.symmetric {
                matrix[t * width + f] = delay;
            }
        }
        let mut names: Vec<Option<String>> = config.zones.iter().map(|z| Some(z.name.clone())).collect();
        names.push(None);
        Ok(Classifier {
            hosts,
            width,
            matrix,
            floors: vec![None; width * width],
            names,
        })
    }

    fn zone(&self, ip: Ipv4Addr) -> usize {
        self.hosts.get(&ip).map_or(self.width - 1, |h| h.zone)
    }

    /// Decides what to do with `packet`, read at `now`.
    pub fn classify(&mut self, packet: &[u8], now: Instant) -> Verdict {
        let Some((src, dst)) = ipv4_addresses(packet) else {
            return Verdict::Drop(DropReason::NotIpv4);
        };
        if let Some(slot) = self.hosts.get_mut(&src)
            && let Some(rng) = slot.rng.as_mut()
            && rng.gen_bool(slot.loss)
        {
            return Verdict::Drop(DropReason::Loss);
        }
        let pair = self.zone(src) * self.width + self.zone(dst);
        let mut deadline = now + self.matrix[pair];
        if let Some(floor) = self.floors[pair]
            && floor > deadline
        {
            deadline = floor;
        }
        self.floors[pair] = Some(deadline);
        Verdict::Forward { deadline }
    }

    /// Takes over the ordering guarantee from the classifier this one replaces: a zone pair (matched by
    /// name) releases nothing before the last deadline the old classifier gave that pair, so a reload
    /// that shortens a delay does not reorder a flow. Pairs involving a zone the old configuration did not
    /// have (or "outside every zone") wait for the latest deadline of any pair, since their hosts may
    /// have been elsewhere before.
    pub fn continue_after(&mut self, old: &Classifier) {
        let latest = old.floors.iter().flatten().max().copied();
        let old_index = |name: &Option<String>| -> Option<usize> {
            name.as_ref()?;
            old.names.iter().position(|n| n == name)
        };
        for from in 0..self.width {
            for to in 0..self.width {
                let floor = match (old_index(&self.names[from]), old_index(&self.names[to])) {
                    (Some(f), Some(t)) => old.floors[f * old.width + t],
                    _ => latest,
                };
                self.floors[from * self.width + to] = floor;
            }
        }
    }
}

/// Source and destination of an IPv4 packet, `None` for anything else.
pub fn ipv4_addresses(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

// ----- the delay queue and the forwarding loop ----------------------------------------------------------

#[derive(Debug)]
struct Held {
    deadline: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// Packets waiting for their release time: a bounded min-heap ordered by (deadline, arrival).
#[derive(Debug)]
pub struct DelayQueue {
    heap: BinaryHeap<Reverse<Held>>,
    next_seq: u64,
    limit: usize,
}

impl DelayQueue {
    /// An empty queue holding at most `limit` packets.
    pub fn new(limit: usize) -> DelayQueue {
        DelayQueue {
            heap: BinaryHeap::new(),
            next_seq: 0,
            limit,
        }
    }

    /// Holds `packet` until `deadline`. `false` (the packet is dropped) when the queue is full.
    pub fn push(&mut self, deadline: Instant, packet: Vec<u8>) -> bool {
        if self.heap.len() >= self.limit {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Reverse(Held { deadline, seq, packet }));
        true
    }

    /// The earliest release time, if anything is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(h)| h.deadline)
    }

    /// The next packet due at `now` (earliest deadline first, FIFO among equal deadlines), with its deadline.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Vec<u8>, Instant)> {
        if self.next_deadline()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(h)| (h.packet, h.deadline))
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// The forwarding loop's packet I/O (the TUN device in the router; a fake in unit tests).
pub trait PacketIo {
    /// Reads one packet without blocking; `Ok(None)` when none is waiting.
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Blocks until a packet may be readable or `timeout` has passed; `Ok(true)` when asked to stop.
    fn wait(&mut self, timeout: Duration) -> std::io::Result<bool>;
    /// Writes one packet.
    fn write(&mut self, packet: &[u8]) -> std::io::Result<()>;
}

/// How the signal-handling thread steers the forwarding loop: a new [`Classifier`] to take, or stop.
#[derive(Debug, Default)]
pub struct Control {
    ready: AtomicBool,
    next: Mutex<Option<Classifier>>,
    stop: AtomicBool,
}

impl Control {
    /// Offers `next`; the loop takes it before the next packet it reads.
    pub fn offer(&self, next: Classifier) {
        *self.next.lock().unwrap_or_else(PoisonError::into_inner) = Some(next);
        self.ready.store(true, Ordering::Release);
    }

    /// Asks the loop to return (it checks on every turn; wake it from a blocking wait separately).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn take(&self) -> Option<Classifier> {
        if !self.ready.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.next.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// How long the loop sleeps when nothing is held (it also wakes on packets and on stop).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Most packets read in a row before due packets are released (keeps releases on time under a flood).
const READ_BURST: usize = 64;

/// The forwarding loop: reads, classifies, holds and releases packets, all on one dedicated OS thread.
///
/// One thread on purpose: handing a packet to a second (release) thread costs a futex wake-up, and on this
/// VM a wake-up of a thread on an idle vCPU was measured at 50-100 µs, more than the 50 µs in-zone delay.
/// Here the only wake-ups are the ones the zero-delay path has too (a packet arriving) or timer expiries
/// absorbed by [`SPIN_WINDOW`]; inside the window the loop spins on the monotonic clock, polling the TUN
/// without blocking, so packets arriving meanwhile are still read (and timestamped) within microseconds.
#[derive(Debug)]
pub struct Engine {
    classifier: Classifier,
    queue: DelayQueue,
    stats: Arc<RouterStats>,
    control: Arc<Control>,
}

impl Engine {
    /// A loop applying `classifier`, holding at most `queue_limit` packets, counting into `stats` and
    /// taking new classifiers and the stop request from `control`.
    pub fn new(classifier: Classifier, queue_limit: usize, stats: Arc<RouterStats>, control: Arc<Control>) -> Self {
        Engine {
            classifier,
            queue: DelayQueue::new(queue_limit),
            stats,
            control,
        }
    }

    fn write(&self, io: &mut impl PacketIo, packet: &[u8], counter: &AtomicU64) {
        match io.write(packet) {
            Ok(()) => RouterStats::bump(counter),
            Err(_) => RouterStats::bump(&self.stats.write_errors),
        }
    }

    fn handle(&mut self, io: &mut impl PacketIo, packet: &[u8], now: Instant) {
        RouterStats::bump(&self.stats.received);
        match self.classifier.classify(packet, now) {
            Verdict::Drop(DropReason::NotIpv4) => RouterStats::bump(&self.stats.dropped_not_ipv4),
            Verdict::Drop(DropReason::Loss) => RouterStats::bump(&self.stats.dropped_loss),
            Verdict::Forward { deadline } if deadline <= now => {
                self.write(io, packet, &self.stats.forwarded_at_once);
            }
            Verdict::Forward { deadline } => {
                if self.queue.push(deadline, packet.to_vec()) {
                    RouterStats::bump(&self.stats.delayed);
                } else {
                    RouterStats::bump(&self.stats.dropped_queue_full);
                }
            }
        }
    }

    fn release_due(&mut self, io: &mut impl PacketIo) {
        let now = Instant::now();
        while let Some((packet, deadline)) = self.queue.pop_due(now) {
            self.stats
                .record_late(Instant::now().saturating_duration_since(deadline));
            self.write(io, &packet, &self.stats.released);
        }
    }

    /// Runs until [`Control::stop`] or `io.wait` reports a stop (held packets are then discarded), or until
    /// reading fails.
    /// Sets the calling thread's timer slack to 1 ns so timed waits end when asked.
    pub fn run(&mut self, io: &mut impl PacketIo) -> std::io::Result<()> {
        // Best effort: without it a wait may end up to 50 µs late, still inside the spin window.
        let _ = nix::sys::prctl::set_timerslack(1);
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            if self.control.stopped() {
                return Ok(());
            }
            if let Some(mut next) = self.control.take() {
                next.continue_after(&self.classifier);
                self.classifier = next;
            }
            for _ in 0..READ_BURST {
                match io.try_read(&mut buf)? {
                    Some(n) => {
                        let now = Instant::now();
                        let packet = &buf[..n];
                        self.handle(io, packet, now);
                    }
                    None => break,
                }
            }
            self.release_due(io);
            let timeout = match self.queue.next_deadline() {
                None => IDLE_WAIT,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left <= SPIN_WINDOW {
                        std::hint::spin_loop();
                        continue;
                    }
                    left - SPIN_WINDOW
                }
            };
            if io.wait(timeout)? {
                return Ok(());
            }
        }
    }
}

/// [`PacketIo`] on a TUN device, with a pipe that ends [`PacketIo::wait`] for shutdown.
struct TunIo {
    tun: tun_rs::SyncDevice,
    wake: std::os::fd::OwnedFd,
}

impl PacketIo for TunIo {
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.tun.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn wait(&mut self, timeout: Duration) -> std::io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, ppoll};
        use std::os::fd::AsFd;
        let mut fds = [
            PollFd::new(self.tun.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        match ppoll(&mut fds, Some(nix::sys::time::TimeSpec::from_duration(timeout)), None) {
            Ok(_) => Ok(fds[1].revents().is_some_and(|r| !r.is_empty())),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn write(&mut self, packet: &[u8]) -> std::io::Result<()> {
        self.tun.send(packet).map(|_| ())
    }
}

// ----- statistics ---------------------------------------------------------------------------------------

/// Counters of a running router (shared by its threads).
#[derive(Debug, Default)]
pub struct RouterStats {
    received: AtomicU64,
    forwarded_at_once: AtomicU64,
    delayed: AtomicU64,
    released: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_not_ipv4: AtomicU64,
    dropped_queue_full: AtomicU64,
    write_errors: AtomicU64,
    late_total_ns: AtomicU64,
    late_max_ns: AtomicU64,
    late_over_50us: AtomicU64,
}

/// A copy of [`RouterStats`], printed after [`STATS_MARKER`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Packets read from the TUN.
    pub received: u64,
    /// Packets written back at once (zero delay).
    pub forwarded_at_once: u64,
    /// Packets queued for later release.
    pub delayed: u64,
    /// Queued packets written back.
    pub released: u64,
    /// Packets dropped by configured loss.
    pub dropped_loss: u64,
    /// Packets dropped because they were not IPv4.
    pub dropped_not_ipv4: u64,
    /// Packets dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Writes to the TUN that failed.
    pub write_errors: u64,
    /// Sum of how late queued packets were released, in ns.
    pub late_total_ns: u64,
    /// The latest release, in ns after its deadline.
    pub late_max_ns: u64,
    /// Releases more than 50 µs after their deadline.
    pub late_over_50us: u64,
}

impl StatsSnapshot {
    /// Mean lateness of released packets.
    pub fn mean_late(&self) -> Duration {
        Duration::from_nanos(self.late_total_ns.checked_div(self.released).unwrap_or(0))
    }
}

impl RouterStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn record_late(&self, late: Duration) {
        let ns = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
        self.late_total_ns.fetch_add(ns, Ordering::Relaxed);
        self.late_max_ns.fetch_max(ns, Ordering::Relaxed);
        if late > LATE_THRESHOLD {
            Self::bump(&self.late_over_50us);
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            forwarded_at_once: get(&self.forwarded_at_once),
            delayed: get(&self.delayed),
            released: get(&self.released),
            dropped_loss: get(&self.dropped_loss),
            dropped_not_ipv4: get(&self.dropped_not_ipv4),
            dropped_queue_full: get(&self.dropped_queue_full),
            write_errors: get(&self.write_errors),
            late_total_ns: get(&self.late_total_ns),
            late_max_ns: get(&self.late_max_ns),
            late_over_50us: get(&self.late_over_50us),
        }
    }
}

// ----- the router process -------------------------------------------------------------------------------

/// What [`run_router`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterOptions {
    /// The TUN device to attach to (created if missing; then routes to it must be added afterwards).
    pub tun: String,
    /// The JSON [`RouterConfig`] file, re-read on SIGHUP.
    pub config: PathBuf,
}

enum Event {
    Signal(Signal),
    EngineFailed(std::io::Error),
}

fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // The markers are for whoever supervises us; a closed stdout is no reason to stop forwarding.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn print_stats(stats: &RouterStats) {
    let json = serde_json::to_string(&stats.snapshot()).unwrap_or_default();
    print_line(&format!("{STATS_MARKER} {json}"));
}

/// Runs the delay router until SIGTERM or SIGINT and returns the final counters.
///
/// Blocks SIGTERM, SIGINT, SIGHUP and SIGUSR1 in the calling thread (and so in the threads it starts) and
/// takes them with `sigwait`: call it from `main` before starting other threads.
pub fn run_router(opts: &RouterOptions) -> std::result::Result<StatsSnapshot, DelayError> {
    check_ifname(&opts.tun).map_err(|e| DelayError::InvalidConfig {
        path: None,
        problems: vec![format!("--tun: {e}")],
    })?;
    let config = RouterConfig::load(&opts.config)?;
    let classifier = Classifier::new(&config)?;

    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| DelayError::io("blocking signals", e.into()))?;

    let tun_error = |source| DelayError::Tun {
        name: opts.tun.clone(),
        source,
    };
    let tun = tun_rs::DeviceBuilder::new()
        .name(opts.tun.as_str())
        .enable(true)
        .build_sync()
        .map_err(tun_error)?;
    tun.set_nonblocking(true).map_err(tun_error)?;
    let (wake_read, wake_write) =
        nix::unistd::pipe().map_err(|e| DelayError::io("creating a wake-up pipe", e.into()))?;
    let stats = Arc::new(RouterStats::default());
    let control = Arc::new(Control::default());
    let (events, inbox) = mpsc::channel::<Event>();

    let mut engine = Engine::new(classifier, config.queue_limit, Arc::clone(&stats), Arc::clone(&control));
    let mut io = TunIo { tun, wake: wake_read };
    let forwarder = {
        let events = events.clone();
        std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || {
                if let Err(e) = engine.run(&mut io) {
                    let _ = events.send(Event::EngineFailed(e));
                }
            })
            .map_err(|e| DelayError::io("starting the forwarding thread", e))?
    };

    // The signal thread stays blocked in sigwait when we return; the process exits right after.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = signals.wait() {
                if events.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| DelayError::io("starting the signal thread", e))?;

    let zones: Vec<&str> = config.zones.iter().map(|z| z.name.as_str()).collect();
    tracing::info!(tun = %opts.tun, config = %opts.config.display(), zones = ?zones, "delay router forwarding");
    print_line(&format!(
        "{READY_MARKER} tun={} zones={} hosts={} pid={}",
        opts.tun,
        config.zones.len(),
        config.zones.iter().map(|z| z.hosts.len()).sum::<usize>(),
        std::process::id()
    ));

    let mut generation = 0u64;
    let mut failure = None;
    while let Ok(event) = inbox.recv() {
        match event {
            Event::Signal(Signal::SIGHUP) => match RouterConfig::load(&opts.config).and_then(|c| Classifier::new(&c)) {
                Ok(next) => {
                    control.offer(next);
                    generation += 1;
                    tracing::info!(generation, "configuration reloaded");
                    print_line(&format!("{RELOADED_MARKER}{generation}"));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reload failed; keeping the previous configuration");
                    print_line(&format!("{RELOAD_FAILED_MARKER} {e}"));
                }
            },
            Event::Signal(Signal::SIGUSR1) => print_stats(&stats),
            Event::Signal(sig) => {
                tracing::info!(signal = %sig, "stopping");
                break;
            }
            Event::EngineFailed(e) => {
                failure = Some(DelayError::io(format!("forwarding on TUN device {}", opts.tun), e));
                break;
            }
        }
    }
    control.stop();
    let _ = nix::unistd::write(&wake_write, b"x");
    let _ = forwarder.join();
    print_stats(&stats);
    match failure {
        Some(e) => Err(e),
        None => Ok(stats.snapshot()),
    }
}

// ----- measuring ----------------------------------------------------------------------------------------

/// What one `ping` run saw.
#[derive(Debug, Clone, PartialEq)]
pub struct PingReport {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// The round-trip time of every reply, in arrival order.
    pub rtts: Vec<Duration>,
}

impl PingReport {
    /// Parses iputils `ping -n` output (reply lines with `time=X ms`, and the summary line).
    pub fn parse(output: &str) -> std::result::Result<PingReport, String> {
        let mut rtts = Vec::new();
        let mut counts = None;
        for line in output.lines() {
            if let Some(rest) = line.split(" time=").nth(1) {
                let ms = rest.split_whitespace().next().unwrap_or("");
                let ms: f64 = ms.parse().map_err(|e| format!("bad time in {line:?}: {e}"))?;
                rtts.push(Duration::from_secs_f64(ms / 1000.0));
            }
            if line.contains(" packets transmitted, ") {
                let mut fields = line.split(", ");
                let number = |field: Option<&str>| -> Option<u32> { field?.split_whitespace().next()?.parse().ok() };
                let tx = number(fields.next());
                let rx = number(fields.next());
                if let (Some(tx), Some(rx)) = (tx, rx) {
                    counts = Some((tx, rx));
                }
            }
        }
        let (transmitted, received) = counts.ok_or_else(|| format!("no ping summary line in: {output}"))?;
        Ok(PingReport {
            transmitted,
            received,
            rtts,
        })
    }

    /// The fraction of requests without reply.
    pub fn loss(&self) -> f64 {
        if self.transmitted == 0 {
            return 0.0;
        }
        1.0 - f64::from(self.received) / f64::from(self.transmitted)
    }

    /// The `p`-th percentile (0.0..=1.0, nearest rank) of the RTTs; `None` without replies.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        percentile(&self.rtts, p)
    }

    /// The median RTT; `None` without replies.
    pub fn median(&self) -> Option<Duration> {
        self.percentile(0.5)
    }
}

/// Nearest-rank percentile (`p` from 0.0 to 1.0) of `values`; `None` when empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = (p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank).copied()
}

/// `ping -n -c COUNT -i INTERVAL -W 1 TO` from inside `from`; parses every reply's RTT and the loss.
pub fn ping_rtts(from: &Netns, to: Ipv4Addr, count: u32, interval: Duration) -> Result<PingReport> {
    let interval_arg = format!("{:.3}", interval.as_secs_f64());
    let mut cmd = from.exec("ping");
    cmd.args([
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        &interval_arg,
        "-W",
        "1",
        &to.to_string(),
    ]);
    let limit = interval * count + Duration::from_secs(15);
    let out = crate::process::run_with_timeout(&mut cmd, limit)?;
    let text = String::from_utf8_lossy(&out.stdout);
    PingReport::parse(&text).map_err(|reason| HarnessError::BadOutput {
        what: format!("ping {to} from {}", from.name()),
        reason: format!("{reason}; stderr: {}", String::from_utf8_lossy(&out.stderr).trim()),
    })
}

// ----- the harness --------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PlannedHost {
    role: String,
    zone: String,
    ip: Option<Ipv4Addr>,
}

/// Builds a [`DelayLab`]: `DelayLab::builder().zone("a", 2).zone("b", 2).delay("a", "b", d).build()`.
#[derive(Debug, Clone)]
pub struct DelayLabBuilder {
    prefix: Option<String>,
    zones: Vec<String>,
    hosts: Vec<PlannedHost>,
    delays: Vec<(String, String, Duration, bool)>,
    loss: Vec<(String, f64)>,
    seed: u64,
    queue_limit: usize,
    router_binary: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    detached: bool,
}

impl Default for DelayLabBuilder {
    fn default() -> Self {
        DelayLabBuilder {
            prefix: None,
            zones: Vec::new(),
            hosts: Vec::new(),
            delays: Vec::new(),
            loss: Vec::new(),
            seed: DEFAULT_SEED,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            router_binary: None,
            work_dir: None,
            detached: false,
        }
    }
}

impl DelayLabBuilder {
    /// Namespace name prefix (default: unique per process and call, `nbe2e-PID-N`). With a fixed prefix the
    /// build fails if any planned namespace exists already.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    fn ensure_zone(&mut self, zone: &str) {
        if !self.zones.iter().any(|z| z == zone) {
            self.zones.push(zone.to_string());
        }
    }

    /// Adds zone `name` (if new) with `hosts` more hosts called `NAME-1`, `NAME-2`, ... at `198.18.Z.H`
    /// (Z: the zone's position, 1-based; H: the number in the role). Hosts added with
    /// [`DelayLabBuilder::host`] do not take numbers.
    pub fn zone(mut self, name: &str, hosts: usize) -> Self {
        self.ensure_zone(name);
        let already = self.hosts.iter().filter(|h| h.zone == name && h.ip.is_none()).count();
        for i in 1..=hosts {
            self.hosts.push(PlannedHost {
                role: format!("{name}-{}", already + i),
                zone: name.to_string(),
                ip: None,
            });
        }
        self
    }

    /// Adds host `role` with address `ip` to zone `zone` (created if new).
    pub fn host(mut self, zone: &str, role: impl Into<String>, ip: Ipv4Addr) -> Self {
        self.ensure_zone(zone);
        self.hosts.push(PlannedHost {
            role: role.into(),
            zone: zone.to_string(),
            ip: Some(ip),
        });
        self
    }

    /// One-way delay between zones `a` and `b` in both directions (`a == b`: inside the zone).
    pub fn delay(mut self, a: &str, b: &str, one_way: Duration) -> Self {
        self.delays.push((a.to_string(), b.to_string(), one_way, true));
        self
    }

    /// One-way delay from zone `from` to zone `to` only.
    pub fn delay_one_way(mut self, from: &str, to: &str, one_way: Duration) -> Self {
        self.delays.push((from.to_string(), to.to_string(), one_way, false));
        self
    }

    /// Drops `fraction` (0.0..=1.0) of the packets host `role` sends.
    pub fn loss(mut self, role: &str, fraction: f64) -> Self {
        self.loss.push((role.to_string(), fraction));
        self
    }

    /// Seed of the loss PRNG (default [`DEFAULT_SEED`]).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Most packets held at once (default [`DEFAULT_QUEUE_LIMIT`]).
    pub fn queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = limit;
        self
    }

    /// The router binary (default: [`ROUTER_BIN`] next to the running executable, else in
    /// [`crate::env::bin_dir`]). Integration tests pass `env!("CARGO_BIN_EXE_nimbus-delay-router")`.
    pub fn router_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.router_binary = Some(path.into());
        self
    }

    /// Directory for the config file and logs (default: a temp dir, removed on drop unless
    /// `NIMBUS_E2E_KEEP=1`).
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    /// Start the router (and [`DelayLab::spawn_on`] processes) in their own session, so
    /// [`DelayLab::detach`] can leave them running (the lab).
    pub fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// The namespace names this builder will create, router last (deletion order).
    pub fn planned_namespaces(&self) -> Vec<String> {
        let prefix = self.prefix.clone().unwrap_or_else(|| "<unique>".into());
        let mut names: Vec<String> = self.hosts.iter().map(|h| format!("{prefix}-{}", h.role)).collect();
        names.push(format!("{prefix}-rt"));
        names
    }

    /// Hosts with their addresses, and the router configuration, after checking everything.
    fn plan(&self) -> Result<(Vec<(PlannedHost, Ipv4Addr)>, RouterConfig)> {
        let mut problems = Vec::new();
        if self.hosts.is_empty() {
            problems.push("no hosts: add zones with `.zone(name, n)` or `.host(zone, role, ip)`".to_string());
        }
        if self.zones.len() > 254 {
            problems.push(format!(
                "{} zones: at most 254 fit the default addressing",
                self.zones.len()
            ));
        }
        let mut planned = Vec::new();
        let mut per_zone: HashMap<&str, u32> = HashMap::new();
        for host in &self.hosts {
            let ip = match host.ip {
                Some(ip) => ip,
                None => {
                    let n = per_zone.entry(host.zone.as_str()).or_insert(0);
                    *n += 1;
                    let z = self.zones.iter().position(|z| *z == host.zone).unwrap_or(0) + 1;
                    match (u8::try_from(z), u8::try_from(*n)) {
                        (Ok(z), Ok(h)) if h < 255 => {
                            let o = DELAY_SUBNET.octets();
                            Ipv4Addr::new(o[0], o[1], z, h)
                        }
                        _ => {
                            problems.push(format!("zone {:?} has more than 254 hosts", host.zone));
                            continue;
                        }
                    }
                }
            };
            if self.hosts.iter().filter(|h| h.role == host.role).count() > 1
                && !problems.iter().any(|p| p.contains(&format!("role {:?}", host.role)))
            {
                problems.push(format!("host role {:?} is used twice", host.role));
            }
            planned.push((host.clone(), ip));
        }
        let zones = self
            .zones
            .iter()
            .map(|z| ZoneConfig {
                name: z.clone(),
                hosts: planned
                    .iter()
                    .filter(|(h, _)| h.zone == *z)
                    .map(|(_, ip)| *ip)
                    .collect(),
            })
            .collect();
        let mut config = RouterConfig::new(zones);
        config.seed = self.seed;
        config.queue_limit = self.queue_limit;
        for (from, to, d, symmetric) in &self.delays {
            config.set_one_way(from, to, *d, *symmetric);
        }
        for (role, fraction) in &self.loss {
            match planned.iter().find(|(h, _)| h.role == *role) {
                Some((_, ip)) => config.set_loss(*ip, *fraction),
                None => problems.push(format!("loss for unknown host {role:?}")),
            }
        }
        if let Err(DelayError::InvalidConfig { problems: more, .. }) = config.validate() {
            problems.extend(more);
        }
        if problems.is_empty() {
            Ok((planned, config))
        } else {
            Err(HarnessError::Misuse(format!(
                "delay lab: {}; fix the builder calls",
                problems.join("; ")
            )))
        }
    }

    /// Creates the router namespace (forwarding, TUN, table 100), every host with its veth and rule, writes
    /// the configuration, starts the router and waits for its ready line. On error everything created so far
    /// is removed.
    pub fn build(self) -> Result<DelayLab> {
        let (planned, config) = self.plan()?;
        let router_binary = match &self.router_binary {
            Some(p) => p.clone(),
            None => default_router_binary()?,
        };
        let prefix = match &self.prefix {
            Some(p) => {
                if let Some(taken) = self.planned_namespaces().into_iter().find(|n| Netns::exists(n)) {
                    return Err(HarnessError::NamespaceExists(taken));
                }
                p.clone()
            }
            None => {
                reap_stale_test_namespaces();
                unique_prefix()
            }
        };
        let work = Work::create(self.work_dir.as_ref(), "nimbus-delay-")?;
        let config_path = work.path().join("delay-router.json");
        let mut lab = DelayLab {
            router: Some(Netns::create(&format!("{prefix}-rt"))?),
            prefix,
            hosts: Vec::new(),
            process: None,
            config,
            config_path,
            work: Some(work),
            generation: 0,
            detached: self.detached,
        };
        lab.setup_router()?;
        for (i, (host, ip)) in planned.into_iter().enumerate() {
            lab.add_host(i + 1, host, ip)?;
        }
        write_config(&lab.config_path, &lab.config)?;
        lab.start_router(&router_binary)?;
        Ok(lab)
    }
}

fn default_router_binary() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(ROUTER_BIN)))
        .filter(|p| p.is_file());
    match beside {
        Some(p) => Ok(p),
        None => crate::env::binary_in(&crate::env::bin_dir(), ROUTER_BIN),
    }
}

fn write_config(path: &Path, config: &RouterConfig) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, config.to_json() + "\n")
        .map_err(|e| HarnessError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| HarnessError::io(format!("renaming {} to {}", tmp.display(), path.display()), e))
}

fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    run_checked(ns.exec("sysctl").args(["-q", "-w", &format!("{key}={value}")]))?;
    Ok(())
}

/// One host of a [`DelayLab`].
#[derive(Debug)]
pub struct DelayHost {
    role: String,
    zone: String,
    ns: Netns,
    ip: Ipv4Addr,
    port: String,
}

impl DelayHost {
    /// The role given at creation (`a-1`, `coord`, ...).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The zone it is in.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Its namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Its address (on `eth0`, as a /32).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The veth name on the router side (`h1`, `h2`, ...).
    pub fn port(&self) -> &str {
        &self.port
    }
}

/// What [`DelayLab::detach`] leaves running, for a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedDelayLab {
    /// Namespaces in deletion order (hosts, then the router).
    pub namespaces: Vec<String>,
    /// The router process.
    pub router: ProcessRecord,
    /// The router's configuration file.
    pub config_path: PathBuf,
    /// The work dir (config, logs).
    pub work_dir: PathBuf,
}

/// Zones of hosts joined through a delay router. Dropping it stops the router and deletes every namespace
/// (hosts first, then the router), even while unwinding from a panic; if the thread is panicking the router's
/// log is printed first.
#[derive(Debug)]
pub struct DelayLab {
    prefix: String,
    router: Option<Netns>,
    hosts: Vec<DelayHost>,
    process: Option<Process>,
    config: RouterConfig,
    config_path: PathBuf,
    work: Option<Work>,
    generation: u64,
    detached: bool,
}

impl DelayLab {
    /// Starts a [`DelayLabBuilder`].
    pub fn builder() -> DelayLabBuilder {
        DelayLabBuilder::default()
    }

    fn router_ns(&self) -> Result<&Netns> {
        self.router
            .as_ref()
            .ok_or_else(|| HarnessError::Misuse(format!("delay lab {} was already torn down", self.prefix)))
    }

    fn setup_router(&self) -> Result<()> {
        let rt = self.router_ns()?;
        // Before any link exists, so every interface created later inherits the defaults.
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ] {
            sysctl(rt, key, value)?;
        }
        rt.ip(["tuntap", "add", "dev", ROUTER_TUN, "mode", "tun"])?;
        rt.ip(["link", "set", ROUTER_TUN, "up"])?;
        let table = ROUTE_TABLE.to_string();
        rt.ip(["route", "add", "default", "dev", ROUTER_TUN, "table", &table])?;
        Ok(())
    }

    fn add_host(&mut self, n: usize, host: PlannedHost, ip: Ipv4Addr) -> Result<()> {
        let port = format!("h{n}");
        check_ifname(&port)?;
        let ns = Netns::create(&format!("{}-{}", self.prefix, host.role))?;
        let rt = self.router_ns()?;
        rt.ip([
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        // Recorded before configuring, so a failure below still deletes the namespace.
        self.hosts.push(DelayHost {
            role: host.role,
            zone: host.zone,
            ns,
            ip,
            port: port.clone(),
        });
        let rt = self.router_ns()?;
        let gw = ROUTER_GATEWAY.to_string();
        let pref = RULE_PREF.to_string();
        let table = ROUTE_TABLE.to_string();
        rt.ip(["addr", "add", &format!("{gw}/32"), "dev", &port])?;
        rt.ip(["link", "set", &port, "up"])?;
        rt.ip(["route", "add", &format!("{ip}/32"), "dev", &port, "scope", "link"])?;
        rt.ip(["rule", "add", "iif", &port, "lookup", &table, "pref", &pref])?;
        let Some(added) = self.hosts.last() else {
            return Err(HarnessError::Misuse("host vanished while being added".into()));
        };
        let hns = &added.ns;
        hns.ip(["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        hns.ip(["link", "set", "eth0", "up"])?;
        hns.ip(["route", "add", &format!("{gw}/32"), "dev", "eth0", "scope", "link"])?;
        hns.ip(["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        Ok(())
    }

    fn log_dir(&self) -> PathBuf {
        self.work_dir().join("logs")
    }

    fn start_router(&mut self, binary: &Path) -> Result<()> {
        let log = self.log_dir().join("delay-router.log");
        let process = ProcessBuilder::new("delay-router", binary, &log)
            .netns(self.router_ns()?)
            .args(["--tun", ROUTER_TUN, "--config"])
            .arg(&self.config_path)
            .detached(self.detached)
            .spawn()?;
        self.process = Some(process);
        self.wait_for_log("the delay router's ready line", |log| {
            log.lines().any(|l| l.starts_with(READY_MARKER))
        })
    }

    fn wait_for_log(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<()> {
        let process = self.router_process()?;
        poll_until(what, patience(), Duration::from_millis(20), || {
            let log = process.log();
            if done(&log) {
                return Attempt::Done(());
            }
            if let Some(status) = process.try_status() {
                return Attempt::Fail(format!(
                    "the delay router exited ({}); its log:\n{}",
                    Process::describe_status(Some(status)),
                    crate::fleet::tail(&log, 40)
                ));
            }
            Attempt::Retry("not yet".into())
        })
    }

    /// The namespace prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The router namespace (holds [`ROUTER_TUN`] and the host-facing veths).
    ///
    /// # Panics
    /// After [`DelayLab::teardown`].
    pub fn router(&self) -> &Netns {
        self.router_ns().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The router process.
    pub fn router_process(&self) -> Result<&Process> {
        self.process
            .as_ref()
            .ok_or_else(|| HarnessError::Misuse("the delay router is not running".into()))
    }

    /// All hosts, in creation order.
    pub fn hosts(&self) -> &[DelayHost] {
        &self.hosts
    }

    /// The host called `role`.
    pub fn try_host(&self, role: &str) -> Result<&DelayHost> {
        self.hosts.iter().find(|h| h.role == role).ok_or_else(|| {
            let known: Vec<&str> = self.hosts.iter().map(|h| h.role.as_str()).collect();
            HarnessError::UnknownHost(role.to_string(), known.join(", "))
        })
    }

    /// The host called `role`.
    ///
    /// # Panics
    /// If there is none.
    pub fn host(&self, role: &str) -> &DelayHost {
        self.try_host(role).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Zone names, in declaration order.
    pub fn zone_names(&self) -> Vec<&str> {
        self.config.zones.iter().map(|z| z.name.as_str()).collect()
    }

    /// The hosts of zone `zone`, in creation order.
    pub fn zone_hosts(&self, zone: &str) -> Vec<&DelayHost> {
        self.hosts.iter().filter(|h| h.zone == zone).collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The router's configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The work dir (configuration, logs).
    pub fn work_dir(&self) -> &Path {
        self.work.as_ref().map_or(Path::new("/nonexistent"), Work::path)
    }

    /// The delay injected into a round trip between hosts `a` and `b` (roles).
    pub fn injected_rtt(&self, a: &str, b: &str) -> Result<Duration> {
        Ok(self.config.injected_rtt(self.try_host(a)?.ip, self.try_host(b)?.ip))
    }

    /// Replaces the configuration of the running router (file + SIGHUP) and waits until it took it.
    /// The zones may change too, but hosts are not created or removed.
    pub fn apply(&mut self, config: RouterConfig) -> Result<()> {
        config.validate()?;
        let failures_before = self.router_process()?.log().matches(RELOAD_FAILED_MARKER).count();
        write_config(&self.config_path, &config)?;
        let process = self.router_process()?;
        process.signal(Signal::SIGHUP)?;
        let generation = self.generation + 1;
        let wanted = format!("{RELOADED_MARKER}{generation}");
        let process_log = || process.log();
        poll_until(
            &format!("the delay router to reload (generation {generation})"),
            patience(),
            Duration::from_millis(10),
            || {
                let log = process_log();
                if log.lines().any(|l| l.trim_end() == wanted) {
                    return Attempt::Done(());
                }
                if log.matches(RELOAD_FAILED_MARKER).count() > failures_before {
                    return Attempt::Fail(format!(
                        "the router refused the new config:\n{}",
                        crate::fleet::tail(&log, 5)
                    ));
                }
                if let Some(status) = process.try_status() {
                    return Attempt::Fail(format!(
                        "the router exited ({})",
                        Process::describe_status(Some(status))
                    ));
                }
                Attempt::Retry("no reload line yet".into())
            },
        )?;
        self.generation = generation;
        self.config = config;
        Ok(())
    }

    /// The router's counters now (SIGUSR1, then the line it prints).
    pub fn stats(&self) -> Result<StatsSnapshot> {
        let process = self.router_process()?;
        let count = |log: &str| log.lines().filter(|l| l.starts_with(STATS_MARKER)).count();
        let before = count(&process.log());
        process.signal(Signal::SIGUSR1)?;
        let line = poll_until(
            "the delay router's stats line",
            patience(),
            Duration::from_millis(10),
            || {
                let log = process.log();
                if count(&log) > before
                    && let Some(line) = log.lines().rev().find(|l| l.starts_with(STATS_MARKER))
                {
                    return Attempt::Done(line.to_string());
                }
                Attempt::Retry("no stats line yet".into())
            },
        )?;
        let json = line.trim_start_matches(STATS_MARKER).trim();
        serde_json::from_str(json).map_err(|e| HarnessError::BadOutput {
            what: "the delay router's stats line".into(),
            reason: format!("{e}: {line}"),
        })
    }

    /// Starts `program` with `args` on host `role` (logs in the work dir as `NAME.log`), e.g. a coordinator
    /// or an agent. The caller owns the [`Process`]; drop it before the lab.
    pub fn spawn_on<I, S>(&self, role: &str, name: &str, program: impl AsRef<Path>, args: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let host = self.try_host(role)?;
        ProcessBuilder::new(name, program, self.log_dir().join(format!("{name}.log")))
            .netns(&host.ns)
            .args(args)
            .detached(self.detached)
            .spawn()
    }

    /// Every namespace name, in deletion order (hosts, then the router).
    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.ns.name().to_string()).collect();
        if let Some(rt) = &self.router {
            names.push(rt.name().to_string());
        }
        names
    }

    /// Stops the router and deletes every namespace now. Idempotent; reports the first error but tries
    /// everything.
    pub fn teardown(&mut self) -> Result<()> {
        if let Some(p) = self.process.take() {
            p.stop(crate::process::STOP_GRACE);
        }
        let mut hosts: Vec<DelayHost> = self.hosts.drain(..).rev().collect();
        let mut router = self.router.take();
        crate::netns::delete_all(hosts.iter_mut().map(|h| &mut h.ns).chain(router.as_mut()))
    }

    /// Leaves the router and the namespaces in place (the router must have been started detached) and
    /// returns what a state file needs to remove them later (`teardown_from_state`).
    pub fn detach(mut self) -> Result<DetachedDelayLab> {
        if !self.detached {
            return Err(HarnessError::Misuse(
                "only a delay lab built with `.detached(true)` can be detached".into(),
            ));
        }
        let namespaces = self.namespaces();
        let router = match self.process.take() {
            Some(p) => p.detach()?,
            None => return Err(HarnessError::Misuse("the delay router is not running".into())),
        };
        for host in self.hosts.drain(..) {
            host.ns.persist();
        }
        if let Some(rt) = self.router.take() {
            rt.persist();
        }
        let work_dir = self.work_dir().to_path_buf();
        if let Some(w) = self.work.take() {
            w.keep();
        }
        Ok(DetachedDelayLab {
            namespaces,
            router,
            config_path: self.config_path.clone(),
            work_dir,
        })
    }
}

impl Drop for DelayLab {
    fn drop(&mut self) {
        if let Some(p) = &self.process {
            p.stop(crate::process::STOP_GRACE);
            if std::thread::panicking() {
                eprintln!(
                    "\n----- delay router log ({}) -----\n{}",
                    p.log_path().display(),
                    crate::fleet::tail(&p.log(), 100)
                );
            }
        }
        if let Err(e) = self.teardown() {
            eprintln!("nimbus-e2e: warning: delay lab {} teardown: {e}", self.prefix);
        }
        if let Some(w) = self.work.take() {
            w.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(z: u8, h: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, z, h)
    }

    fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p
    }

    fn two_zones() -> RouterConfig {
        let mut c = RouterConfig::new(vec![
            ZoneConfig {
                name: "a".into(),
                hosts: vec![ip(1, 1), ip(1, 2)],
            },
            ZoneConfig {
                name: "b".into(),
                hosts: vec![ip(2, 1)],
            },
        ]);
        c.set_one_way("a", "a", Duration::from_micros(50), true);
        c.set_one_way("a", "b", Duration::from_micros(500), true);
        c
    }

    #[test]
    fn config_round_trips_and_reports_every_problem() {
        let c = two_zones();
        let back: RouterConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.one_way("b", "a"), Duration::from_micros(500));
        assert_eq!(c.one_way("b", "b"), Duration::ZERO);
        assert_eq!(c.injected_rtt(ip(1, 1), ip(2, 1)), Duration::from_micros(1000));

        let mut bad = c.clone();
        bad.zones[1].hosts.push(ip(1, 1));
        bad.delays.push(DelayConfig {
            from: "a".into(),
            to: "x".into(),
            one_way_us: 1,
            symmetric: false,
        });
        bad.loss.push(LossConfig {
            host: ip(9, 9),
            fraction: 1.5,
        });
        let msg = bad.validate().unwrap_err().to_string();
        for needle in [
            "host 198.18.1.1 is in zone \"a\" and in zone \"b\"",
            "unknown zone \"x\"",
            "from 0.0 to 1.0",
            "198.18.9.9 which is in no zone",
            "fix it",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from {msg}");
        }
    }

    #[test]
    fn conflicting_delays_are_refused_and_set_one_way_replaces() {
        let mut c = two_zones();
        c.delays.push(DelayConfig {
            from: "b".into(),
            to: "a".into(),
            one_way_us: 7,
            symmetric: false,
        });
        assert!(c.validate().unwrap_err().to_string().contains("given twice"));
        let mut c = two_zones();
        c.set_one_way("b", "a", Duration::from_micros(7), false);
        c.validate().unwrap();
        assert_eq!(c.one_way("a", "b"), Duration::from_micros(500));
        assert_eq!(c.one_way("b", "a"), Duration::from_micros(7));
        assert!(c.without_impairments().delays.is_empty());
    }

    #[test]
    fn unknown_json_fields_are_refused() {
        let err = serde_json::from_str::<RouterConfig>(r#"{"zones": [], "delay": []}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn classifier_applies_the_pair_delay_and_keeps_fifo_per_pair() {
        let mut cl = Classifier::new(&two_zones()).unwrap();
        let t0 = Instant::now();
        let v = cl.classify(&packet(ip(1, 1), ip(2, 1)), t0);
        assert_eq!(
            v,
            Verdict::Forward {
                deadline: t0 + Duration::from_micros(500)
            }
        );
        let v = cl.classify(&packet(ip(1, 1), ip(1, 2)), t0);
        assert_eq!(
            v,
            Verdict::Forward {
                deadline: t0 + Duration::from_micros(50)
            }
        );
        // Outside every zone: no delay.
        let v = cl.classify(&packet(ip(1, 1), Ipv4Addr::new(203, 0, 113, 1)), t0);
        assert_eq!(v, Verdict::Forward { deadline: t0 });
        assert_eq!(cl.classify(&[0x60; 40], t0), Verdict::Drop(DropReason::NotIpv4));

        // A reload to zero delay must not overtake what the old config still holds.
        let mut next = Classifier::new(&two_zones().without_impairments()).unwrap();
        next.continue_after(&cl);
        let t1 = t0 + Duration::from_micros(10);
        let v = next.classify(&packet(ip(1, 1), ip(2, 1)), t1);
        assert_eq!(
            v,
            Verdict::Forward {
                deadline: t0 + Duration::from_micros(500)
            }
        );
    }

    #[test]
    fn loss_is_deterministic_and_close_to_the_fraction() {
        let mut c = two_zones();
        c.set_loss(ip(2, 1), 0.3);
        let run = |c: &RouterConfig| {
            let mut cl = Classifier::new(c).unwrap();
            let now = Instant::now();
            (0..10_000)
                .map(|_| cl.classify(&packet(ip(2, 1), ip(1, 1)), now) == Verdict::Drop(DropReason::Loss))
                .collect::<Vec<bool>>()
        };
        let first = run(&c);
        assert_eq!(first, run(&c), "same seed, same drops");
        let dropped = first.iter().filter(|d| **d).count();
        assert!((2700..3300).contains(&dropped), "{dropped} of 10000 dropped");
        // Only the lossy host's own packets are dropped.
        let mut cl = Classifier::new(&c).unwrap();
        let now = Instant::now();
        assert!((0..1000).all(|_| cl.classify(&packet(ip(1, 1), ip(2, 1)), now) != Verdict::Drop(DropReason::Loss)));
    }

    #[test]
    fn delay_queue_is_ordered_fifo_and_bounded() {
        let mut q = DelayQueue::new(3);
        let t0 = Instant::now();
        assert!(q.push(t0 + Duration::from_micros(500), vec![1]));
        assert!(q.push(t0 + Duration::from_micros(500), vec![2]));
        assert!(q.push(t0 + Duration::from_micros(50), vec![0]));
        assert!(!q.push(t0, vec![9]), "full");
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_micros(50)));
        assert!(q.pop_due(t0).is_none());
        let due: Vec<u8> = std::iter::from_fn(|| q.pop_due(t0 + Duration::from_millis(1)))
            .map(|(p, _)| p[0])
            .collect();
        assert_eq!(due, vec![0, 1, 2]);
        assert!(q.is_empty());
    }

    /// Packets become readable at given instants; writes are recorded with the time they happened.
    struct FakeIo {
        input: std::collections::VecDeque<(Instant, Vec<u8>)>,
        written: Vec<(Instant, Vec<u8>)>,
        expect: usize,
    }

    impl PacketIo for FakeIo {
        fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            match self.input.front() {
                Some((at, _)) if *at <= Instant::now() => {
                    let (_, p) = self.input.pop_front().unwrap();
                    buf[..p.len()].copy_from_slice(&p);
                    Ok(Some(p.len()))
                }
                _ => Ok(None),
            }
        }

        fn wait(&mut self, timeout: Duration) -> std::io::Result<bool> {
            if self.written.len() >= self.expect {
                return Ok(true);
            }
            let until_input = self
                .input
                .front()
                .map_or(timeout, |(at, _)| at.saturating_duration_since(Instant::now()));
            std::thread::sleep(timeout.min(until_input));
            Ok(false)
        }

        fn write(&mut self, packet: &[u8]) -> std::io::Result<()> {
            self.written.push((Instant::now(), packet.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn engine_releases_each_packet_after_its_delay_in_order() {
        let config = two_zones();
        let stats = Arc::new(RouterStats::default());
        let mut engine = Engine::new(
            Classifier::new(&config).unwrap(),
            100,
            Arc::clone(&stats),
            Arc::new(Control::default()),
        );
        let start = Instant::now() + Duration::from_millis(2);
        let mut input = std::collections::VecDeque::new();
        let mut expected = Vec::new();
        for i in 0..20u8 {
            let at = start + Duration::from_micros(300) * u32::from(i);
            let (src, dst, delay) = match i % 3 {
                0 => (ip(1, 1), ip(1, 2), 50),
                1 => (ip(1, 1), ip(2, 1), 500),
                _ => (ip(2, 1), ip(1, 1), 500),
            };
            let mut p = packet(src, dst);
            p[27] = i;
            input.push_back((at, p));
            expected.push((i, at + Duration::from_micros(delay)));
        }
        let mut io = FakeIo {
            input,
            written: Vec::new(),
            expect: 20,
        };
        engine.run(&mut io).unwrap();
        assert_eq!(io.written.len(), 20);
        for (i, not_before) in &expected {
            let (at, _) = io.written.iter().find(|(_, p)| p[27] == *i).unwrap();
            assert!(at >= not_before, "packet {i} released early");
        }
        // FIFO per zone pair: the tags of one pair come out in order.
        for pair in 0..3u8 {
            let tags: Vec<u8> = io
                .written
                .iter()
                .map(|(_, p)| p[27])
                .filter(|t| t % 3 == pair)
                .collect();
            assert!(tags.windows(2).all(|w| w[0] < w[1]), "pair {pair}: {tags:?}");
        }
        let snap = stats.snapshot();
        assert_eq!((snap.received, snap.delayed, snap.released), (20, 20, 20));
    }

    #[test]
    fn engine_drops_what_does_not_fit_and_takes_reloads() {
        let mut config = two_zones();
        config.set_one_way("a", "b", Duration::from_secs(5), true);
        let stats = Arc::new(RouterStats::default());
        let control = Arc::new(Control::default());
        let mut engine = Engine::new(
            Classifier::new(&config).unwrap(),
            3,
            Arc::clone(&stats),
            Arc::clone(&control),
        );
        let now = Instant::now();
        let input = (0..4).map(|_| (now, packet(ip(1, 1), ip(2, 1)))).collect();
        let mut io = FakeIo {
            input,
            written: Vec::new(),
            expect: 0,
        };
        engine.run(&mut io).unwrap();
        let snap = stats.snapshot();
        assert_eq!((snap.delayed, snap.dropped_queue_full), (3, 1), "{snap:?}");
        // After a reload to zero delay, a pair with nothing held goes out at once, while a pair with
        // packets held keeps its order behind them.
        control.offer(Classifier::new(&config.without_impairments()).unwrap());
        engine.queue.pop_due(Instant::now() + Duration::from_secs(60)).unwrap();
        io.input.push_back((Instant::now(), packet(ip(1, 1), ip(1, 2))));
        io.input.push_back((Instant::now(), packet(ip(1, 1), ip(2, 1))));
        io.expect = 1;
        engine.run(&mut io).unwrap();
        let snap = stats.snapshot();
        assert_eq!((snap.forwarded_at_once, snap.delayed), (1, 4), "{snap:?}");
        assert_eq!(engine.queue.len(), 3);
        // A stop request ends the loop even though the fake I/O would keep it waiting.
        control.stop();
        io.expect = usize::MAX;
        engine.run(&mut io).unwrap();
    }

    #[test]
    fn ping_output_parses() {
        let out = "PING 198.18.2.1 (198.18.2.1) 56(84) bytes of data.\n\
                   64 bytes from 198.18.2.1: icmp_seq=1 ttl=62 time=1.12 ms\n\
                   64 bytes from 198.18.2.1: icmp_seq=2 ttl=62 time=0.987 ms\n\
                   64 bytes from 198.18.2.1: icmp_seq=4 ttl=62 time=1.05 ms\n\n\
                   --- 198.18.2.1 ping statistics ---\n\
                   4 packets transmitted, 3 received, 25% packet loss, time 153ms\n\
                   rtt min/avg/max/mdev = 0.987/1.052/1.120/0.054 ms\n";
        let r = PingReport::parse(out).unwrap();
        assert_eq!((r.transmitted, r.received), (4, 3));
        assert_eq!(r.median(), Some(Duration::from_micros(1050)));
        assert!((r.loss() - 0.25).abs() < 1e-9);
        assert!(PingReport::parse("ping: connect: Network is unreachable").is_err());
    }

    #[test]
    fn builder_plans_addresses_and_refuses_mistakes() {
        let b = DelayLab::builder()
            .prefix("p")
            .zone("a", 2)
            .zone("b", 1)
            .host("b", "coord", Ipv4Addr::new(198, 51, 100, 1))
            .delay("a", "b", Duration::from_micros(500))
            .loss("b-1", 0.3);
        let (hosts, config) = b.plan().unwrap();
        let got: Vec<(String, Ipv4Addr)> = hosts.iter().map(|(h, ip)| (h.role.clone(), *ip)).collect();
        assert_eq!(
            got,
            vec![
                ("a-1".to_string(), ip(1, 1)),
                ("a-2".to_string(), ip(1, 2)),
                ("b-1".to_string(), ip(2, 1)),
                ("coord".to_string(), Ipv4Addr::new(198, 51, 100, 1)),
            ]
        );
        assert_eq!(config.zone_of(Ipv4Addr::new(198, 51, 100, 1)), Some("b"));
        assert_eq!(
            config.loss,
            vec![LossConfig {
                host: ip(2, 1),
                fraction: 0.3
            }]
        );
        assert_eq!(
            b.planned_namespaces(),
            vec!["p-a-1", "p-a-2", "p-b-1", "p-coord", "p-rt"]
        );

        let err = DelayLab::builder()
            .zone("a", 1)
            .host("a", "a-1", ip(1, 9))
            .delay("a", "nope", Duration::from_micros(1))
            .loss("ghost", 0.1)
            .plan()
            .unwrap_err()
            .to_string();
        for needle in [
            "\"a-1\" is used twice",
            "unknown zone \"nope\"",
            "unknown host \"ghost\"",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from {err}");
        }
    }
}
