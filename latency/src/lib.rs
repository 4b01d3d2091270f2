//! Authenticated UDP latency probes between hosts, and per-window RTT statistics.
//!
//! Every agent runs one [`Driver`]: a UDP socket on the underlay network (where replication traffic flows, not
//! the tunnel) that answers other nodes' probes ([`Responder`]) and probes its own peers ([`Prober`]). The
//! coordinator hands each agent its node id, the probe key, the address book of nodes allowed to probe it and
//! the subset it probes ([`mesh`] computes that subset for large fleets); the agent reports [`WindowStats`]
//! (min, p50, p90, p99, mean, jitter, loss, sample count, timestamping mode per peer and window) back.
//!
//! The protocol logic is sans-IO: the responder, prober, statistics and peer selection take time and
//! datagrams as arguments and return what to send, and are tested without sockets. Only [`driver`] does I/O.
//!
//! # Layout
//! - [`id`] — [`NodeId`] and its 16-byte wire form [`WireId`] (truncated SHA-256).
//! - [`clock`] — [`Timestamp`] (monotonic + realtime reading), [`RxTime`], [`TimestampMode`].
//! - [`key`] — [`ProbeKey`] (key id + 32-byte secret, redacted `Debug`) and [`KeyRing`] (current + previous
//!   key for a grace period).
//! - [`wire`] — the 76-byte probe format (documented byte layout, HMAC-SHA256/128), hostile parsing.
//! - [`responder`] — who gets an answer: authenticated, addressed to us, from the peer's listed address,
//!   not replayed, not late, rate limited; never larger than the request. The freshness argument is there.
//! - [`prober`] — schedule (interval, jitter), matching by (peer, sequence), RTT from the most precise
//!   timestamps available, timeouts as loss, windows.
//! - [`stats`] — [`WindowStats`], nearest-rank percentiles, RFC 3550-style jitter.
//! - [`mesh`] — full mesh up to 64 peers, zone-aware rotating selection beyond, and [`mesh::probe_load`]
//!   (64 probes/s, 128 datagrams/s and ≈13 kB/s each way per node at 5 000 nodes).
//! - [`driver`] — the tokio UDP driver: `SO_TIMESTAMPING` software RX/TX timestamps where the kernel
//!   offers them, user space otherwise, and reports which was used.
//!
//! **Invariants:** a responder answers only exact-size, authenticated requests for this node from the
//! sender's listed address, at most once per (sender, key, sequence), with a response of the same size as the
//! request. The prober accepts a response only for an outstanding probe, from the peer's address, before its
//! timeout, by its own monotonic clock. No secret is logged or shown by `Debug`.

pub mod clock;
pub mod driver;
pub mod id;
pub mod key;
pub mod mesh;
pub mod prober;
pub mod responder;
pub mod stats;
pub mod wire;

pub use clock::{RxTime, Timestamp, TimestampMode};
pub use driver::{Command, DEFAULT_PORT, Driver, DriverConfig, DriverError, DriverReport, TimestampingRequest};
pub use id::{NodeId, WireId};
pub use key::{KeyRing, ProbeKey};
pub use mesh::{Member, Mesh, MeshConfig, ProbeLoad, Selection, probe_load, select_peers};
pub use prober::{Prober, ProberConfig, ResponseRejected, Transmit};
pub use responder::{Peer, Rejected, Responder, ResponderConfig, ResponderCounters};
pub use stats::{RttSample, RttSummary, WindowStats};

/// A setting that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// One field is out of range or contradicts another.
    #[error("latency setting `{field}`: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong and what to give instead.
        reason: String,
    },
}
