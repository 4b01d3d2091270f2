//! Prometheus metrics of the coordinator: what an operator watches (agents
//! connected, nodes by state, enrollments accepted and refused by reason, refused fleet streams and stream
//! reconnects, WireGuard handshakes, per-peer bytes and packets the tunnel dropped, RPC latency, latency-probe
//! RTT, rollout progress, store size, audit append failures), served as the Prometheus text format on
//! `metrics_listen` (HTTP/1.1 `GET /metrics`). Every metric is documented in `docs/metrics.md` (a test keeps
//! the two in step).
//!
//! The same listener answers the probes of a supervisor (Kubernetes, a load balancer): `GET /healthz` is 200
//! while the process serves HTTP at all (liveness), `GET /readyz` is 200 only when the store answers a read
//! within [`READY_TIMEOUT`] and 503 otherwise (readiness). Neither carries fleet data.
//!
//! Event counters live in [`Metrics`] (cheap to clone, updated where things
//! happen); levels (connected agents, nodes by state, WireGuard peers, tunnel
//! drop counters, rollout, store size) are read at scrape time into a [`Snapshot`], so nothing has
//! to be kept in sync. Label values come from fixed sets, never from input, with two documented exceptions
//! bounded by the fleet: `node` (one series per enrolled node that is a WireGuard peer) and the RPC
//! `service`/`method` (only methods the servers implement; anything answered UNIMPLEMENTED is `unknown`).
//! RPC latency is measured by [`RpcMetricsLayer`], a tower layer around each tonic server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::context::{Ctx, key_id};
use crate::state::{NodeStatus, StateError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// Labels of `nimbus_rpc_duration_seconds`: the gRPC service and method (from the request path, bounded:
/// see [`RpcMetricsLayer`]) and the gRPC status code name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: String,
    pub method: String,
    pub code: &'static str,
}

/// Why an enrollment was refused: the `reason` label of `nimbus_enrollment_refusals_total` (a fixed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The token is malformed or not known.
    BadToken,
    /// The token expired.
    Expired,
    /// The token has no uses left.
    UsedUp,
    /// The token was revoked.
    TokenRevoked,
    /// The token is bound to a MAC address the host does not have.
    MacMismatch,
    /// The WireGuard key belongs to a revoked node.
    KeyRevoked,
    /// The agent's version is outside the supported skew.
    Skew,
    /// The request itself is invalid (e.g. not a 32-byte public key, a bad name).
    InvalidRequest,
    /// The overlay network has no free address.
    AddressPoolExhausted,
    /// Anything else (store failure, tunnel failure): see the coordinator log.
    Internal,
}

impl RefusalReason {
    /// Every reason, in the order they are rendered.
    pub const ALL: [RefusalReason; 10] = [
        RefusalReason::BadToken,
        RefusalReason::Expired,
        RefusalReason::UsedUp,
        RefusalReason::TokenRevoked,
        RefusalReason::MacMismatch,
        RefusalReason::KeyRevoked,
        RefusalReason::Skew,
        RefusalReason::InvalidRequest,
        RefusalReason::AddressPoolExhausted,
        RefusalReason::Internal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::BadToken => "bad_token",
            RefusalReason::Expired => "expired",
            RefusalReason::UsedUp => "used_up",
            RefusalReason::TokenRevoked => "token_revoked",
            RefusalReason::MacMismatch => "mac_mismatch",
            RefusalReason::KeyRevoked => "key_revoked",
            RefusalReason::Skew => "skew",
            RefusalReason::InvalidRequest => "invalid_request",
            RefusalReason::AddressPoolExhausted => "address_pool_exhausted",
            RefusalReason::Internal => "internal",
        }
    }

    /// The reason of a refusal by the store's enrollment.
    pub fn of(e: &StateError) -> RefusalReason {
        match e {
            StateError::TokenMalformed(_) | StateError::TokenInvalid => RefusalReason::BadToken,
            StateError::TokenExpired { .. } => RefusalReason::Expired,
            StateError::TokenUsedUp => RefusalReason::UsedUp,
            StateError::TokenRevoked => RefusalReason::TokenRevoked,
            StateError::TokenMacMismatch { .. } => RefusalReason::MacMismatch,
            StateError::KeyRevoked => RefusalReason::KeyRevoked,
            StateError::InvalidArgument(_) => RefusalReason::InvalidRequest,
            StateError::Ipam(crate::ipam::IpamError::Exhausted { .. }) => RefusalReason::AddressPoolExhausted,
            _ => RefusalReason::Internal,
        }
    }
}

/// Buckets of `nimbus_rpc_duration_seconds`: 1 ms to 60 s (fleet streams last longer and land in +Inf).
const RPC_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

/// Buckets of `nimbus_probe_rtt_p50_seconds`: 50 µs doubling to ~0.8 s (same rack to another continent).
fn rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

/// Event counters, incremented where the events happen.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub enrollments: Family<ResultLabel, Counter>,
    /// Refused enrollments by [`RefusalReason`] (all reasons exist from the start, at 0).
    pub enrollment_refusals: Family<ReasonLabel, Counter>,
    pub fleet_streams_refused: Counter,
    /// Fleet streams opened (accepted after Hello).
    pub fleet_streams_opened: Counter,
    /// Fleet streams opened by a node that already had one since this coordinator started.
    pub stream_reconnects: Counter,
    pub heartbeats: Counter,
    pub inventory_changes: Counter,
    pub node_revocations: Counter,
    pub replication_drift: Family<KindLabel, Counter>,
    pub probe_key_rotations: Counter,
    /// Node label/taint reconciliations through the Kubernetes API, by result: in_sync, corrected, error.
    pub cluster_syncs: Family<ResultLabel, Counter>,
    /// Hand-made changes agents found on their hosts and reverted.
    pub host_drift_corrected: Counter,
    /// Rollout nodes that were not healthy before their deadline.
    pub rollout_timeouts: Counter,
    /// Audit log entries that could not be appended (the state change itself went through or was refused
    /// as the audit policy says; see the log).
    pub audit_append_failures: Counter,
    /// The p50 RTT of every answered latency window agents report.
    pub probe_rtt_p50: Histogram,
    /// gRPC call durations by service, method and code ([`RpcMetricsLayer`]).
    pub rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    handshakes: Arc<Mutex<tunnel::HandshakeCounter>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let enrollment_refusals = Family::<ReasonLabel, Counter>::default();
        for r in RefusalReason::ALL {
            let _ = enrollment_refusals.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        let enrollments = Family::<ResultLabel, Counter>::default();
        for result in ["accepted", "refused"] {
            let _ = enrollments.get_or_create(&ResultLabel { result });
        }
        Metrics {
            enrollments,
            enrollment_refusals,
            fleet_streams_refused: Counter::default(),
            fleet_streams_opened: Counter::default(),
            stream_reconnects: Counter::default(),
            heartbeats: Counter::default(),
            inventory_changes: Counter::default(),
            node_revocations: Counter::default(),
            replication_drift: Family::default(),
            probe_key_rotations: Counter::default(),
            cluster_syncs: Family::default(),
            host_drift_corrected: Counter::default(),
            rollout_timeouts: Counter::default(),
            audit_append_failures: Counter::default(),
            probe_rtt_p50: rtt_histogram(),
            rpc_duration: Family::new_with_constructor(rpc_histogram as fn() -> Histogram),
            handshakes: Arc::default(),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// An enrollment was accepted.
    pub fn enrollment_accepted(&self) {
        self.enrollments
            .get_or_create(&ResultLabel { result: "accepted" })
            .inc();
    }

    /// An enrollment was refused for `reason`.
    pub fn enrollment_refused(&self, reason: RefusalReason) {
        self.enrollments.get_or_create(&ResultLabel { result: "refused" }).inc();
        self.enrollment_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A planner drift event of `kind` (a fixed set of names from the planner).
    pub fn replication_drift(&self, kind: &'static str) {
        self.replication_drift.get_or_create(&KindLabel { kind }).inc();
    }

    /// An audit log entry could not be appended (call it wherever an append fails).
    pub fn audit_append_failed(&self) {
        self.audit_append_failures.inc();
    }

    /// A latency window reported by an agent: its p50 goes into the RTT histogram if it had answers.
    pub fn probe_window(&self, w: &nimbus_proto::LatencyWindow) {
        if w.samples > 0 {
            self.probe_rtt_p50.observe(w.p50_ns as f64 / 1e9);
        }
    }

    /// Feeds the handshake counter from the peers' last-handshake ages; returns the total so far.
    pub fn observe_handshakes(&self, peers: &[tunnel::PeerStats]) -> u64 {
        self.handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(peers, Instant::now())
    }
}

/// One WireGuard peer of the coordinator, by node name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerSample {
    /// Node name (the key itself when no node has it, e.g. a peer added a moment ago).
    pub node: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds since the current session's handshake; `None` without a session.
    pub handshake_age_seconds: Option<f64>,
}

/// The running rollout, or the last finished one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutSample {
    /// pending, running, paused, completed, aborted.
    pub phase: &'static str,
    pub current_wave: u32,
    pub pending: u64,
    pub applying: u64,
    pub waiting_healthy: u64,
    pub healthy: u64,
    pub failed: u64,
}

/// Every rollout phase label value; `none` when there never was a rollout.
pub const ROLLOUT_PHASES: [&str; 6] = ["none", "pending", "running", "paused", "completed", "aborted"];

/// Levels read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub agents_connected: u64,
    pub nodes_active: u64,
    pub nodes_revoked: u64,
    /// Enrolled, waiting for `nimbusctl node accept`.
    pub nodes_pending: u64,
    pub wireguard_peers: u64,
    pub tunnel: tunnel::RouterCounters,
    /// WireGuard handshakes completed since start ([`Metrics::observe_handshakes`]).
    pub handshakes: u64,
    pub peers: Vec<PeerSample>,
    pub rollout: Option<RolloutSample>,
    /// Bytes on disk of the store (the sled database under `data_dir/state`).
    pub store_bytes: u64,
    /// Ordered probe pairs with a measurement, and the worst newest p50 among them (seconds).
    pub rtt_pairs: u64,
    pub rtt_worst_p50_seconds: f64,
    /// Whether this coordinator holds the leader lease (always for a single coordinator).
    pub leader: bool,
    /// Live coordinator replicas on the store, this one included (1 for a single coordinator).
    pub replicas: u64,
}

/// The Prometheus text exposition of `m` and `s`.
pub fn render(m: &Metrics, s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("nimbus");
    r.register(
        "enrollments",
        "Enrollment requests by result (accepted, refused)",
        m.enrollments.clone(),
    );
    r.register(
        "enrollment_refusals",
        "Refused enrollment requests by reason",
        m.enrollment_refusals.clone(),
    );
    r.register(
        "fleet_streams_refused",
        "Fleet streams refused (unknown or revoked node, id claim not matching the WireGuard peer)",
        m.fleet_streams_refused.clone(),
    );
    r.register(
        "fleet_streams_opened",
        "Fleet streams accepted (after Hello)",
        m.fleet_streams_opened.clone(),
    );
    r.register(
        "stream_reconnects",
        "Fleet streams opened by a node that already had one since the coordinator started",
        m.stream_reconnects.clone(),
    );
    r.register("heartbeats", "Heartbeats received from agents", m.heartbeats.clone());
    r.register(
        "inventory_changes",
        "Stored inventory changes",
        m.inventory_changes.clone(),
    );
    r.register("node_revocations", "Nodes revoked", m.node_revocations.clone());
    r.register(
        "replication_drift_events",
        "Replicated stores drifting out of their commit budget, by kind",
        m.replication_drift.clone(),
    );
    r.register(
        "probe_key_rotations",
        "Latency probe key rotations since start",
        m.probe_key_rotations.clone(),
    );
    r.register(
        "cluster_node_syncs",
        "Node labels and taints reconciled through the Kubernetes API, by result (in_sync, corrected, error)",
        m.cluster_syncs.clone(),
    );
    r.register(
        "host_drift_corrected",
        "Hand-made changes on hosts that agents found and reverted",
        m.host_drift_corrected.clone(),
    );
    r.register(
        "rollout_node_timeouts",
        "Rollout nodes not healthy before their deadline",
        m.rollout_timeouts.clone(),
    );
    r.register(
        "audit_append_failures",
        "Audit log entries that could not be appended",
        m.audit_append_failures.clone(),
    );
    r.register(
        "probe_rtt_p50_seconds",
        "Median RTT of every answered latency-probe window agents reported",
        m.probe_rtt_p50.clone(),
    );
    r.register(
        "probe_pairs_measured",
        "Ordered node pairs with a latency measurement",
        ConstGauge::new(s.rtt_pairs as i64),
    );
    r.register(
        "probe_rtt_worst_pair_p50_seconds",
        "The largest newest p50 RTT among all measured node pairs",
        ConstGauge::new(s.rtt_worst_p50_seconds),
    );
    r.register(
        "rpc_duration_seconds",
        "gRPC call durations by service, method and status code (streams: their whole life)",
        m.rpc_duration.clone(),
    );
    r.register(
        "agents_connected",
        "Agents with an open fleet stream",
        ConstGauge::new(s.agents_connected as i64),
    );
    r.register(
        "coordinator_leader",
        "1 when this coordinator leads (runs rollout deadlines, drains, label sync, audit checkpoints), else 0",
        ConstGauge::new(i64::from(s.leader)),
    );
    r.register(
        "coordinator_replicas",
        "Live coordinator replicas on this store, this one included",
        ConstGauge::new(s.replicas as i64),
    );
    let nodes = Family::<StateLabel, Gauge>::default();
    for (state, n) in [
        ("active", s.nodes_active),
        ("revoked", s.nodes_revoked),
        ("pending", s.nodes_pending),
    ] {
        nodes.get_or_create(&StateLabel { state }).set(n as i64);
    }
    r.register("nodes", "Enrolled nodes by state", nodes);
    r.register(
        "wireguard_peers",
        "WireGuard peers of the coordinator",
        ConstGauge::new(s.wireguard_peers as i64),
    );
    r.register(
        "wireguard_handshakes",
        "WireGuard handshakes completed with peers (sampled from the peers' handshake times)",
        ConstCounter::new(s.handshakes),
    );
    let rx = Family::<NodeLabel, Counter>::default();
    let tx = Family::<NodeLabel, Counter>::default();
    let age = Family::<NodeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for p in &s.peers {
        let l = NodeLabel { node: p.node.clone() };
        rx.get_or_create(&l).inc_by(p.rx_bytes);
        tx.get_or_create(&l).inc_by(p.tx_bytes);
        if let Some(a) = p.handshake_age_seconds {
            age.get_or_create(&l).set(a);
        }
    }
    r.register(
        "wireguard_peer_rx_bytes",
        "Plaintext bytes received from each node through the tunnel (one series per node)",
        rx,
    );
    r.register(
        "wireguard_peer_tx_bytes",
        "Plaintext bytes sent to each node through the tunnel (one series per node)",
        tx,
    );
    r.register(
        "wireguard_peer_last_handshake_age_seconds",
        "Seconds since each node's current WireGuard session was established (absent: no session)",
        age,
    );
    let drops = Family::<ReasonLabel, Counter>::default();
    let t = &s.tunnel;
    for (reason, n) in [
        ("unknown_peer", t.unknown_peer),
        ("unknown_index", t.unknown_index),
        ("spoofed_source", t.spoofed_source),
        ("no_route", t.no_route),
        ("no_endpoint", t.no_endpoint),
        ("malformed", t.malformed),
        ("rejected", t.rejected),
        ("handshake_queue_full", t.handshake_queue_full),
    ] {
        drops.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }
    r.register(
        "wireguard_dropped_packets",
        "Packets the tunnel dropped, by reason (spoofed_source: a peer sent from an address not its own; \
         handshake_queue_full: initiations arrived faster than the cores answer them)",
        drops,
    );
    r.register(
        "wireguard_cookies_sent",
        "Handshake cookie replies sent (handshake load)",
        ConstCounter::new(t.cookies_sent),
    );
    let phase = Family::<PhaseLabel, Gauge>::default();
    let current = s.rollout.as_ref().map_or("none", |r| r.phase);
    for p in ROLLOUT_PHASES {
        phase
            .get_or_create(&PhaseLabel { phase: p })
            .set(i64::from(p == current));
    }
    r.register(
        "rollout_phase",
        "1 for the phase of the running or last rollout (none, pending, running, paused, completed, aborted)",
        phase,
    );
    let ro = s.rollout.clone().unwrap_or_default();
    let by_state = Family::<StateLabel, Gauge>::default();
    for (state, n) in [
        ("pending", ro.pending),
        ("applying", ro.applying),
        ("waiting_healthy", ro.waiting_healthy),
        ("healthy", ro.healthy),
        ("failed", ro.failed),
    ] {
        by_state.get_or_create(&StateLabel { state }).set(n as i64);
    }
    r.register(
        "rollout_nodes",
        "Target nodes of the running or last rollout by state",
        by_state,
    );
    r.register(
        "rollout_current_wave",
        "The last wave the running or last rollout started (0: none yet)",
        ConstGauge::new(i64::from(ro.current_wave)),
    );
    r.register(
        "store_size_bytes",
        "Bytes on disk of the coordinator's state store",
        ConstGauge::new(s.store_bytes as i64),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// Bytes of the regular files under `dir`, recursively (symlinks not followed); unreadable entries count 0.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn rollout_sample(r: &crate::placement::RolloutRecord) -> RolloutSample {
    let st = r.rollout.status();
    RolloutSample {
        phase: match st.phase {
            waves::Phase::Pending => "pending",
            waves::Phase::Running => "running",
            waves::Phase::Paused => "paused",
            waves::Phase::Completed => "completed",
            waves::Phase::Aborted => "aborted",
        },
        current_wave: st.current_wave,
        pending: st.counts.pending as u64,
        applying: st.counts.applying as u64,
        waiting_healthy: st.counts.waiting_healthy as u64,
        healthy: st.counts.healthy as u64,
        failed: st.counts.failed as u64,
    }
}

async fn snapshot(ctx: &Ctx) -> Snapshot {
    let read = ctx
        .state(|s| {
            let rollout = match s.rollout()? {
                Some(r) => Some(r),
                None => s.last_rollout()?,
            };
            Ok((s.list_nodes()?, rollout))
        })
        .await;
    let (nodes, rollout) = match read {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e.message(), "metrics: the store did not answer; node and rollout levels are 0");
            (Vec::new(), None)
        }
    };
    let count = |st: NodeStatus| nodes.iter().filter(|n| n.status == st).count() as u64;
    let names: HashMap<&str, &str> = nodes.iter().map(|n| (n.public_key.as_str(), n.name.as_str())).collect();
    let stats = ctx.tunnel.stats();
    let handshakes = ctx.metrics.observe_handshakes(&stats);
    let peers = stats
        .iter()
        .map(|p| {
            let id = key_id(&p.public_key);
            PeerSample {
                node: names.get(id.as_str()).map_or(id.clone(), |n| (*n).to_string()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                handshake_age_seconds: p.last_handshake_age.map(|a| a.as_secs_f64()),
            }
        })
        .collect();
    let store_dir = ctx.config.data_dir.join("state");
    let store_bytes = tokio::task::spawn_blocking(move || dir_size(&store_dir))
        .await
        .unwrap_or(0);
    let rtt = ctx.probes.rtt_summary();
    Snapshot {
        leader: ctx.leadership.is_leader(),
        replicas: ctx.replicas.as_ref().map_or(1, |m| m.all().len() as u64),
        agents_connected: ctx.sessions.connected_count() as u64,
        nodes_active: count(NodeStatus::Active),
        nodes_revoked: count(NodeStatus::Revoked),
        nodes_pending: count(NodeStatus::Pending),
        wireguard_peers: stats.len() as u64,
        tunnel: ctx.tunnel.counters(),
        handshakes,
        peers,
        rollout: rollout.as_ref().map(rollout_sample),
        store_bytes,
        rtt_pairs: rtt.pairs,
        rtt_worst_p50_seconds: rtt.worst_p50_ns as f64 / 1e9,
    }
}

/// gRPC status code names (the `code` label), by number; anything else is `UNKNOWN`.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn grpc_code(headers: &hyper::HeaderMap) -> Option<&'static str> {
    let n: usize = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    Some(GRPC_CODES.get(n).copied().unwrap_or("UNKNOWN"))
}

/// `/pkg.Service/Method` → (service, method), if both are short names of `[A-Za-z0-9_.]`.
fn rpc_name(path: &str) -> Option<(String, String)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    (ok(service) && ok(method)).then(|| (service.to_string(), method.to_string()))
}

/// A tower [`Layer`](tower::Layer) for tonic servers that records every call's duration in
/// `nimbus_rpc_duration_seconds{service, method, code}`: from the request to the end of the response body (the
/// gRPC status trailer), so a stream counts its whole life. Calls answered UNIMPLEMENTED (unknown service or
/// method: anything a client makes up) are recorded as service and method `unknown`, which keeps the label
/// set bounded by the methods the server implements.
///
/// ```ignore
/// tonic::transport::Server::builder()
///     .layer(coordinator::metrics::RpcMetricsLayer::new(ctx.metrics.clone()))
///     .add_service(...)
/// ```
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    metrics: Metrics,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        RpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around a tonic server.
#[derive(Clone, Debug)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

/// A call being timed: recorded once, when the response body ends (or is dropped).
struct Timing {
    family: Family<RpcLabels, Histogram, fn() -> Histogram>,
    name: Option<(String, String)>,
    start: Instant,
}

impl Timing {
    fn record(self, code: &'static str) {
        let (service, method) = match self.name {
            Some(n) if code != "UNIMPLEMENTED" => n,
            _ => ("unknown".to_string(), "unknown".to_string()),
        };
        self.family
            .get_or_create(&RpcLabels { service, method, code })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl<S, ReqBody, ResBody> tower::Service<hyper::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<hyper::Request<ReqBody>, Response = hyper::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: hyper::body::Body<Data = Bytes> + Send + 'static,
{
    type Response = hyper::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<ReqBody>) -> Self::Future {
        let timing = Timing {
            family: self.metrics.rpc_duration.clone(),
            name: rpc_name(req.uri().path()),
            start: Instant::now(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    // Trailers-only responses (most errors) carry the status in the headers.
                    let code = grpc_code(resp.headers());
                    Ok(resp.map(|body| RpcBody {
                        inner: Box::pin(body),
                        code,
                        timing: Some(timing),
                    }))
                }
                Err(e) => {
                    timing.record("UNKNOWN");
                    Err(e)
                }
            }
        })
    }
}

/// The response body of a timed call: passes frames through and records the call at its end.
pub struct RpcBody<B> {
    inner: Pin<Box<B>>,
    /// The status from the response headers, if it was there.
    code: Option<&'static str>,
    timing: Option<Timing>,
}

impl<B> RpcBody<B> {
    fn finish(&mut self, code: Option<&'static str>) {
        if let Some(t) = self.timing.take() {
            t.record(code.or(self.code).unwrap_or("UNKNOWN"));
        }
    }
}

impl<B: hyper::body::Body<Data = Bytes>> hyper::body::Body for RpcBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = this.inner.as_mut().poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_code(trailers);
                    this.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Some("UNKNOWN")),
            Poll::Ready(None) => this.finish(None),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for RpcBody<B> {
    fn drop(&mut self) {
        // Not read to the end: a client that went away mid-stream, or a trailers-only response.
        let code = if self.code.is_some() { None } else { Some("CANCELLED") };
        self.finish(code);
    }
}

/// How long `/readyz` waits for the store to answer.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the store answers a read in time: (status, body) of `/readyz`.
async fn readiness(ctx: &Ctx) -> (StatusCode, String) {
    match tokio::time::timeout(READY_TIMEOUT, ctx.state(|s| s.list_nodes().map(|n| n.len()))).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store failed a read: {}\n", e.message()),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store did not answer within {READY_TIMEOUT:?}\n"),
        ),
    }
}

async fn handle(ctx: Arc<Ctx>, req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()));
    }
    match req.uri().path() {
        "/metrics" => {}
        "/healthz" => return Ok(reply(StatusCode::OK, "ok\n".into())),
        "/readyz" => {
            let (status, body) = readiness(&ctx).await;
            return Ok(reply(status, body));
        }
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                "served here: GET /metrics, /healthz, /readyz\n".into(),
            ));
        }
    }
    let body = render(&ctx.metrics, &snapshot(&ctx).await);
    let mut r = reply(StatusCode::OK, body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

/// Serve `GET /metrics` on `listener` until `shutdown` changes.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.changed() => return Ok(()),
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&ctx), req));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await {
                tracing::debug!(%peer, error = %e, "metrics connection timed out");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A snapshot with every level set, so every metric renders.
    fn full_snapshot() -> Snapshot {
        Snapshot {
            leader: true,
            replicas: 2,
            agents_connected: 3,
            nodes_active: 3,
            nodes_revoked: 1,
            nodes_pending: 2,
            wireguard_peers: 3,
            tunnel: tunnel::RouterCounters {
                spoofed_source: 7,
                handshake_queue_full: 2,
                ..Default::default()
            },
            handshakes: 4,
            peers: vec![PeerSample {
                node: "db-1".into(),
                rx_bytes: 1000,
                tx_bytes: 2000,
                handshake_age_seconds: Some(12.5),
            }],
            rollout: Some(RolloutSample {
                phase: "aborted",
                current_wave: 2,
                pending: 1,
                applying: 0,
                waiting_healthy: 0,
                healthy: 3,
                failed: 1,
            }),
            store_bytes: 4096,
            rtt_pairs: 6,
            rtt_worst_p50_seconds: 0.0125,
        }
    }

    fn full_metrics() -> Metrics {
        let m = Metrics::default();
        m.enrollment_accepted();
        m.enrollment_accepted();
        m.enrollment_refused(RefusalReason::Expired);
        m.fleet_streams_refused.inc();
        m.replication_drift("over_budget");
        m.cluster_syncs.get_or_create(&ResultLabel { result: "in_sync" }).inc();
        m.probe_window(&nimbus_proto::LatencyWindow {
            samples: 3,
            p50_ns: 250_000,
            ..Default::default()
        });
        m.rpc_duration
            .get_or_create(&RpcLabels {
                service: "nimbus.v1.Enrollment".into(),
                method: "Enroll".into(),
                code: "OK",
            })
            .observe(0.01);
        m
    }

    #[test]
    fn renders_counters_and_levels() {
        let text = render(&full_metrics(), &full_snapshot());
        for line in [
            "nimbus_enrollments_total{result=\"accepted\"} 2",
            "nimbus_enrollments_total{result=\"refused\"} 1",
            "nimbus_enrollment_refusals_total{reason=\"expired\"} 1",
            "nimbus_enrollment_refusals_total{reason=\"bad_token\"} 0",
            "nimbus_fleet_streams_refused_total 1",
            "nimbus_agents_connected 3",
            "nimbus_nodes{state=\"revoked\"} 1",
            "nimbus_nodes{state=\"pending\"} 2",
            "nimbus_wireguard_dropped_packets_total{reason=\"spoofed_source\"} 7",
            "nimbus_wireguard_dropped_packets_total{reason=\"handshake_queue_full\"} 2",
            "# HELP nimbus_wireguard_peers",
            "nimbus_wireguard_handshakes_total 4",
            "nimbus_wireguard_peer_rx_bytes_total{node=\"db-1\"} 1000",
            "nimbus_wireguard_peer_tx_bytes_total{node=\"db-1\"} 2000",
            "nimbus_wireguard_peer_last_handshake_age_seconds{node=\"db-1\"} 12.5",
            "nimbus_rollout_phase{phase=\"aborted\"} 1",
            "nimbus_rollout_phase{phase=\"running\"} 0",
            "nimbus_rollout_nodes{state=\"healthy\"} 3",
            "nimbus_rollout_current_wave 2",
            "nimbus_store_size_bytes 4096",
            "nimbus_probe_pairs_measured 6",
            "nimbus_probe_rtt_worst_pair_p50_seconds 0.0125",
            "nimbus_probe_rtt_p50_seconds_count 1",
            "nimbus_rpc_duration_seconds_count{service=\"nimbus.v1.Enrollment\",method=\"Enroll\",code=\"OK\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line || l.starts_with(line)),
                "{line} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn no_rollout_renders_phase_none() {
        let text = render(&Metrics::default(), &Snapshot::default());
        assert!(text.contains("nimbus_rollout_phase{phase=\"none\"} 1"), "{text}");
        assert!(text.contains("nimbus_rollout_phase{phase=\"aborted\"} 0"), "{text}");
    }

    #[test]
    fn refusal_reasons_come_from_the_store_error() {
        assert_eq!(RefusalReason::of(&StateError::TokenInvalid), RefusalReason::BadToken);
        assert_eq!(
            RefusalReason::of(&StateError::TokenExpired { expired_at: 1 }),
            RefusalReason::Expired
        );
        assert_eq!(RefusalReason::of(&StateError::TokenUsedUp), RefusalReason::UsedUp);
        assert_eq!(RefusalReason::of(&StateError::KeyRevoked), RefusalReason::KeyRevoked);
        assert_eq!(RefusalReason::of(&StateError::Conflict), RefusalReason::Internal);
        let names: std::collections::HashSet<_> = RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), RefusalReason::ALL.len(), "distinct label values");
    }

    #[test]
    fn rpc_names_are_bounded() {
        assert_eq!(
            rpc_name("/nimbus.v1.Admin/ListNodes"),
            Some(("nimbus.v1.Admin".into(), "ListNodes".into()))
        );
        assert_eq!(rpc_name("/a/b/c"), None);
        assert_eq!(rpc_name("/x/{}"), None);
        assert_eq!(rpc_name(&format!("/{}/m", "s".repeat(65))), None);
    }

    #[test]
    fn dir_size_adds_up_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 23]).unwrap();
        assert_eq!(dir_size(dir.path()), 123);
        assert_eq!(dir_size(&dir.path().join("missing")), 0);
    }

    struct Dummy;

    #[tonic::async_trait]
    impl nimbus_proto::enrollment_server::Enrollment for Dummy {
        async fn enroll(
            &self,
            _: tonic::Request<nimbus_proto::EnrollRequest>,
        ) -> Result<tonic::Response<nimbus_proto::EnrollResponse>, tonic::Status> {
            Err(tonic::Status::unauthenticated("no"))
        }

        async fn status(
            &self,
            _: tonic::Request<nimbus_proto::StatusRequest>,
        ) -> Result<tonic::Response<nimbus_proto::StatusResponse>, tonic::Status> {
            Ok(tonic::Response::new(nimbus_proto::StatusResponse::default()))
        }
    }

    /// The layer as server.rs uses it, around a real tonic server: OK (status in the trailers) and an error
    /// (trailers-only) are both recorded with their code.
    #[tokio::test]
    async fn the_layer_times_calls_of_a_tonic_server() {
        let m = Metrics::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .layer(RpcMetricsLayer::new(m.clone()))
            .add_service(nimbus_proto::enrollment_server::EnrollmentServer::new(Dummy));
        let task = tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        let mut client = nimbus_proto::enrollment_client::EnrollmentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client.status(nimbus_proto::StatusRequest::default()).await.unwrap();
        let err = client.enroll(nimbus_proto::EnrollRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // The OK call is recorded when its body (with the trailers) has been sent.
        let ok = "nimbus_rpc_duration_seconds_count{service=\"nimbus.v1.Enrollment\",method=\"Status\",code=\"OK\"} 1";
        let refused = "nimbus_rpc_duration_seconds_count{service=\"nimbus.v1.Enrollment\",method=\"Enroll\",code=\"UNAUTHENTICATED\"} 1";
        let mut text = String::new();
        for _ in 0..50 {
            text = render(&m, &Snapshot::default());
            if text.contains(ok) && text.contains(refused) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(text.contains(ok), "{text}");
        assert!(text.contains(refused), "{text}");
        task.abort();
    }

    /// Every metric name rendered is in docs/metrics.md, and every coordinator metric the docs name is
    /// rendered.
    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../../docs/metrics.md");
        let text = render(&full_metrics(), &full_snapshot());
        let rendered = family_names(&text);
        let documented: std::collections::BTreeSet<String> = documented_names(docs)
            .into_iter()
            .filter(|n| !n.starts_with("nimbus_agent_"))
            .collect();
        let missing: Vec<_> = rendered.difference(&documented).collect();
        assert!(missing.is_empty(), "rendered but not in docs/metrics.md: {missing:?}");
        let stale: Vec<_> = documented.difference(&rendered).collect();
        assert!(stale.is_empty(), "in docs/metrics.md but not rendered: {stale:?}");
    }

    /// Names as queried: counters with `_total`, others as their family name.
    fn family_names(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (name, kind) = l.split_once(' ')?;
                Some(if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                })
            })
            .collect()
    }

    /// The backticked `nimbus_*` names at the start of table rows.
    fn documented_names(docs: &str) -> Vec<String> {
        docs.lines()
            .filter_map(|l| l.strip_prefix("| `nimbus_"))
            .filter_map(|l| l.split_once('`').map(|(n, _)| format!("nimbus_{n}")))
            .collect()
    }
}
