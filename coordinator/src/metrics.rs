//! Prometheus metrics of the coordinator: what an operator watches (agents
//! connected, enrollments accepted and refused, refused fleet streams, packets
//! the tunnel dropped and why, revocations, inventory changes), served as the
//! Prometheus text format on `metrics_listen` (HTTP/1.1 `GET /metrics`).
//!
//! The same listener answers the probes of a supervisor (Kubernetes, a load balancer): `GET /healthz` is 200
//! while the process serves HTTP at all (liveness), `GET /readyz` is 200 only when the store answers a read
//! within [`READY_TIMEOUT`] and 503 otherwise (readiness). Neither carries fleet data.
//!
//! Event counters live in [`Metrics`] (cheap to clone, updated where things
//! happen); levels (connected agents, nodes by state, WireGuard peers, tunnel
//! drop counters) are read at scrape time into a [`Snapshot`], so nothing has
//! to be kept in sync. Label values come from fixed sets, never from input.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::context::Ctx;
use crate::state::NodeStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Event counters, incremented where the events happen.
#[derive(Clone, Default, Debug)]
pub struct Metrics {
    pub enrollments: Family<ResultLabel, Counter>,
    pub fleet_streams_refused: Counter,
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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl Metrics {
    pub fn enrollment(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.enrollments.get_or_create(&ResultLabel { result }).inc();
    }

    /// A planner drift event of `kind` (a fixed set of names from the planner).
    pub fn replication_drift(&self, kind: &'static str) {
        self.replication_drift.get_or_create(&KindLabel { kind }).inc();
    }
}

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
}

/// The Prometheus text exposition of `m` and `s`.
pub fn render(m: &Metrics, s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("nimbus");
    r.register("enrollments", "Enrollment requests by result", m.enrollments.clone());
    r.register(
        "fleet_streams_refused",
        "Fleet streams refused (unknown or revoked node, id claim not matching the WireGuard peer)",
        m.fleet_streams_refused.clone(),
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
        "agents_connected",
        "Agents with an open fleet stream",
        ConstGauge::new(s.agents_connected as i64),
    );
    let nodes = Family::<StateLabel, prometheus_client::metrics::gauge::Gauge>::default();
    nodes
        .get_or_create(&StateLabel { state: "active" })
        .set(s.nodes_active as i64);
    nodes
        .get_or_create(&StateLabel { state: "revoked" })
        .set(s.nodes_revoked as i64);
    nodes
        .get_or_create(&StateLabel { state: "pending" })
        .set(s.nodes_pending as i64);
    r.register("nodes", "Enrolled nodes by state", nodes);
    r.register(
        "wireguard_peers",
        "WireGuard peers of the coordinator",
        ConstGauge::new(s.wireguard_peers as i64),
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
    ] {
        drops.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }
    r.register(
        "wireguard_dropped_packets",
        "Packets the tunnel dropped, by reason (spoofed_source: a peer sent from an address not its own)",
        drops,
    );
    r.register(
        "wireguard_cookies_sent",
        "Handshake cookie replies sent (handshake load)",
        ConstCounter::new(t.cookies_sent),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

async fn snapshot(ctx: &Ctx) -> Snapshot {
    let (active, revoked, pending) = match ctx.state(|s| s.list_nodes()).await {
        Ok(nodes) => {
            let count = |st: NodeStatus| nodes.iter().filter(|n| n.status == st).count() as u64;
            (
                count(NodeStatus::Active),
                count(NodeStatus::Revoked),
                count(NodeStatus::Pending),
            )
        }
        Err(_) => (0, 0, 0),
    };
    Snapshot {
        agents_connected: ctx.sessions.connected_count() as u64,
        nodes_active: active,
        nodes_revoked: revoked,
        nodes_pending: pending,
        wireguard_peers: ctx.tunnel.stats().len() as u64,
        tunnel: ctx.tunnel.counters(),
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

    #[test]
    fn renders_counters_and_levels() {
        let m = Metrics::default();
        m.enrollment(true);
        m.enrollment(true);
        m.enrollment(false);
        m.fleet_streams_refused.inc();
        let s = Snapshot {
            agents_connected: 3,
            nodes_active: 3,
            nodes_revoked: 1,
            nodes_pending: 2,
            wireguard_peers: 3,
            tunnel: tunnel::RouterCounters {
                spoofed_source: 7,
                ..Default::default()
            },
        };
        let text = render(&m, &s);
        for line in [
            "nimbus_enrollments_total{result=\"accepted\"} 2",
            "nimbus_enrollments_total{result=\"refused\"} 1",
            "nimbus_fleet_streams_refused_total 1",
            "nimbus_agents_connected 3",
            "nimbus_nodes{state=\"revoked\"} 1",
            "nimbus_nodes{state=\"pending\"} 2",
            "nimbus_wireguard_dropped_packets_total{reason=\"spoofed_source\"} 7",
            "# HELP nimbus_wireguard_peers",
        ] {
            assert!(
                text.lines().any(|l| l == line || l.starts_with(line)),
                "{line} missing in:\n{text}"
            );
        }
    }
}
