//! The agent's Prometheus metrics, served as the Prometheus text format on `metrics_listen` (HTTP/1.1
//! `GET /metrics`; default [`DEFAULT_METRICS_LISTEN`], loopback only; `off` disables it). The same listener
//! answers `GET /healthz` (200 while the process serves HTTP: liveness) and `GET /readyz` (200 while the fleet
//! stream is open, 503 otherwise). Every metric is documented in `docs/metrics.md`.
//!
//! What is measured: the fleet stream (open or not, streams opened, reconnects, moves to another coordinator
//! replica, heartbeat answer latency), the
//! WireGuard tunnel to the coordinator (handshakes, bytes each way, age of the session), the latency probes
//! (newest p50 RTT and loss per probed peer, label `peer` = the peer's node id: bounded by the probe target
//! count, at most 64, and a peer not reported for [`PROBE_STALE`] disappears), the upgrade state
//! (`upgrade.json`) and the running version. No label value comes from anything but the agent itself and the
//! coordinator's probe targets; nothing secret is ever a label or a value.
//!
//! Event counters are updated where things happen ([`AgentMetrics`], cheap to clone); the tunnel and upgrade
//! levels are read at scrape time.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Where the agent serves `/metrics` unless configured otherwise: loopback only, so a node-local Prometheus
/// agent (or an SSH tunnel) can scrape it and nothing else can.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";

/// A probe peer's RTT series disappears when no window about it arrived for this long (it left the probe
/// targets): the `peer` label set stays bounded by the current targets.
pub const PROBE_STALE: Duration = Duration::from_secs(180);

/// Buckets of `nimbus_agent_heartbeat_ack_seconds`: 1 ms to 10 s (two unanswered heartbeats end the stream).
const ACK_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// The newest window about one probe peer.
#[derive(Clone, Debug)]
struct PeerRtt {
    p50_seconds: f64,
    loss_ratio: f64,
    at: Instant,
}

#[derive(Debug)]
struct Inner {
    state_dir: PathBuf,
    connected: Gauge,
    streams_opened: Counter,
    stream_reconnects: Counter,
    replica_switches: Counter,
    heartbeats_sent: Counter,
    heartbeat_ack: Histogram,
    /// (seq, sent at) of the newest heartbeat sent.
    last_heartbeat: Mutex<Option<(u64, Instant)>>,
    probe_windows: Counter,
    probes: Mutex<BTreeMap<String, PeerRtt>>,
    handshakes: Mutex<tunnel::HandshakeCounter>,
    upgrade_restarts: Counter,
    /// Streams opened in this process (the first is not a reconnect).
    opened: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent's event counters; clones share them.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

/// Marks the fleet stream open while it lives ([`AgentMetrics::stream_opened`]).
#[derive(Debug)]
pub struct StreamGuard {
    connected: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.connected.set(0);
    }
}

/// The tunnel levels read at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TunnelSample {
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds since the newest session's handshake; `None` without a session.
    pub handshake_age_seconds: Option<f64>,
}

/// The upgrade levels read at scrape time (`upgrade.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpgradeSample {
    /// A version is activated and not yet confirmed healthy.
    pub pending: bool,
    /// Versions this host rolled back (kept in `upgrade.json`).
    pub rolled_back: u64,
}

impl AgentMetrics {
    /// Counters at zero; `state_dir` is where `upgrade.json` is read from at scrape time.
    pub fn new(state_dir: PathBuf) -> Self {
        AgentMetrics {
            inner: Arc::new(Inner {
                state_dir,
                connected: Gauge::default(),
                streams_opened: Counter::default(),
                stream_reconnects: Counter::default(),
                replica_switches: Counter::default(),
                heartbeats_sent: Counter::default(),
                heartbeat_ack: Histogram::new(ACK_BUCKETS),
                last_heartbeat: Mutex::new(None),
                probe_windows: Counter::default(),
                probes: Mutex::new(BTreeMap::new()),
                handshakes: Mutex::new(tunnel::HandshakeCounter::default()),
                upgrade_restarts: Counter::default(),
                opened: AtomicU64::new(0),
            }),
        }
    }

    /// A fleet stream was established (Welcome received); it counts as open until the guard is dropped.
    pub fn stream_opened(&self) -> StreamGuard {
        let i = &self.inner;
        i.streams_opened.inc();
        if i.opened.fetch_add(1, Ordering::Relaxed) > 0 {
            i.stream_reconnects.inc();
        }
        i.connected.set(1);
        StreamGuard {
            connected: i.connected.clone(),
        }
    }

    /// Whether a fleet stream is open.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.get() > 0
    }

    /// The fleet stream moves to another coordinator replica (its replica failed).
    pub fn replica_switch(&self) {
        self.inner.replica_switches.inc();
    }

    /// Heartbeat `seq` went up the stream.
    pub fn heartbeat_sent(&self, seq: u64) {
        self.inner.heartbeats_sent.inc();
        *lock(&self.inner.last_heartbeat) = Some((seq, Instant::now()));
    }

    /// The coordinator answered heartbeat `seq`: the time since it was sent is observed (answers to older
    /// heartbeats than the newest are not, their send time is gone).
    pub fn heartbeat_acked(&self, seq: u64) {
        let sent = *lock(&self.inner.last_heartbeat);
        if let Some((s, at)) = sent
            && s == seq
        {
            self.inner.heartbeat_ack.observe(at.elapsed().as_secs_f64());
        }
    }

    /// A closed latency window about `w.peer`.
    pub fn probe_window(&self, w: &latency::WindowStats) {
        self.inner.probe_windows.inc();
        let Some(rtt) = w.rtt else { return };
        let loss_ratio = w.loss_ratio;
        let mut probes = lock(&self.inner.probes);
        if probes.len() >= MAX_PROBE_PEERS && !probes.contains_key(w.peer.as_str()) {
            return;
        }
        probes.insert(
            w.peer.as_str().to_string(),
            PeerRtt {
                p50_seconds: rtt.p50_ns as f64 / 1e9,
                loss_ratio,
                at: Instant::now(),
            },
        );
    }

    /// The agent is about to restart into an upgraded version.
    pub fn upgrade_restart(&self) {
        self.inner.upgrade_restarts.inc();
    }

    /// Samples the tunnel's peers (the coordinator; two keys of it during a key rotation).
    pub fn sample_tunnel(&self, peers: &[tunnel::PeerStats]) -> TunnelSample {
        let handshakes = lock(&self.inner.handshakes).observe(peers, Instant::now());
        TunnelSample {
            handshakes,
            rx_bytes: peers.iter().map(|p| p.rx_bytes).sum(),
            tx_bytes: peers.iter().map(|p| p.tx_bytes).sum(),
            handshake_age_seconds: peers
                .iter()
                .filter_map(|p| p.last_handshake_age)
                .min()
                .map(|a| a.as_secs_f64()),
        }
    }

    /// The upgrade state from `upgrade.json` (none yet: nothing pending, nothing rolled back).
    pub fn sample_upgrade(&self) -> UpgradeSample {
        match crate::versions::load(&self.inner.state_dir) {
            Ok(u) => UpgradeSample {
                pending: u.pending.is_some(),
                rolled_back: u.failed.len() as u64,
            },
            Err(e) => {
                tracing::debug!(error = %e, "metrics: upgrade.json unreadable");
                UpgradeSample::default()
            }
        }
    }

    /// The Prometheus text exposition, with the tunnel and upgrade levels given.
    pub fn render(&self, tunnel: &TunnelSample, upgrade: &UpgradeSample) -> String {
        let i = &self.inner;
        let mut r = Registry::with_prefix("nimbus_agent");
        let info = Family::<VersionLabel, Gauge>::default();
        info.get_or_create(&VersionLabel {
            version: crate::version().to_string(),
        })
        .set(1);
        r.register("build_info", "1, labelled with the version this agent runs as", info);
        r.register(
            "connected",
            "1 while the fleet stream to the coordinator is open",
            i.connected.clone(),
        );
        r.register(
            "streams_opened",
            "Fleet streams established (Welcome received)",
            i.streams_opened.clone(),
        );
        r.register(
            "stream_reconnects",
            "Fleet streams established after the first one of this process",
            i.stream_reconnects.clone(),
        );
        r.register(
            "replica_switches",
            "Moves of the fleet stream to another coordinator replica after its replica failed",
            i.replica_switches.clone(),
        );
        r.register(
            "heartbeats_sent",
            "Heartbeats sent to the coordinator",
            i.heartbeats_sent.clone(),
        );
        r.register(
            "heartbeat_ack_seconds",
            "Time from sending a heartbeat to the coordinator's answer",
            i.heartbeat_ack.clone(),
        );
        r.register(
            "wireguard_handshakes",
            "WireGuard handshakes completed with the coordinator (sampled from the session's handshake time)",
            ConstCounter::new(tunnel.handshakes),
        );
        r.register(
            "wireguard_rx_bytes",
            "Plaintext bytes received from the coordinator through the tunnel",
            ConstCounter::new(tunnel.rx_bytes),
        );
        r.register(
            "wireguard_tx_bytes",
            "Plaintext bytes sent to the coordinator through the tunnel",
            ConstCounter::new(tunnel.tx_bytes),
        );
        if let Some(age) = tunnel.handshake_age_seconds {
            r.register(
                "wireguard_last_handshake_age_seconds",
                "Seconds since the current WireGuard session with the coordinator was established",
                ConstGauge::new(age),
            );
        }
        r.register(
            "probe_windows",
            "Latency probe windows closed (and reported)",
            i.probe_windows.clone(),
        );
        let rtt = Family::<PeerLabel, Gauge<f64, AtomicU64>>::default();
        let loss = Family::<PeerLabel, Gauge<f64, AtomicU64>>::default();
        {
            let mut probes = lock(&i.probes);
            probes.retain(|_, p| p.at.elapsed() < PROBE_STALE);
            for (peer, p) in probes.iter() {
                let l = PeerLabel { peer: peer.clone() };
                rtt.get_or_create(&l).set(p.p50_seconds);
                loss.get_or_create(&l).set(p.loss_ratio);
            }
        }
        r.register(
            "probe_rtt_p50_seconds",
            "Median RTT of the newest probe window per peer (label peer: its node id)",
            rtt,
        );
        r.register(
            "probe_loss_ratio",
            "Share of probes lost in the newest window per peer (0..1)",
            loss,
        );
        r.register(
            "upgrade_pending",
            "1 while an upgraded version is activated and not yet confirmed healthy",
            ConstGauge::new(i64::from(upgrade.pending)),
        );
        r.register(
            "upgrade_rolled_back_releases",
            "Agent releases this host rolled back (kept in upgrade.json)",
            ConstGauge::new(upgrade.rolled_back as i64),
        );
        r.register(
            "upgrade_restarts",
            "Restarts into an upgraded version requested by this process",
            i.upgrade_restarts.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// Most probe peers kept (the coordinator gives at most 64 targets; this is a guard, not a setting).
pub const MAX_PROBE_PEERS: usize = 256;

async fn handle(
    metrics: AgentMetrics,
    tun: tunnel::Tunnel,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
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
        "/readyz" if metrics.is_connected() => return Ok(reply(StatusCode::OK, "ready\n".into())),
        "/readyz" => {
            return Ok(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no fleet stream to the coordinator\n".into(),
            ));
        }
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                "served here: GET /metrics, /healthz, /readyz\n".into(),
            ));
        }
    }
    let tunnel = metrics.sample_tunnel(&tun.stats());
    let m = metrics.clone();
    let upgrade = tokio::task::spawn_blocking(move || m.sample_upgrade())
        .await
        .unwrap_or_default();
    let mut r = reply(StatusCode::OK, metrics.render(&tunnel, &upgrade));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

/// Serve the metrics endpoint on `listener` (for ever; abort the task to stop it). `tun`'s peers are sampled at
/// every scrape.
pub async fn serve(listener: TcpListener, metrics: AgentMetrics, tun: tunnel::Tunnel) {
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, tun) = (metrics.clone(), tun.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(metrics.clone(), tun.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                tracing::debug!(%peer, error = %e, "metrics connection timed out");
            }
        });
    }
}

/// Binds `addr` and serves the endpoint in a task. A failed bind is logged and the agent runs on without
/// metrics: the tunnel and the fleet stream matter more than their measurement.
pub async fn spawn(
    addr: SocketAddr,
    metrics: AgentMetrics,
    tun: tunnel::Tunnel,
) -> Option<tokio::task::JoinHandle<()>> {
    match TcpListener::bind(addr).await {
        Ok(l) => {
            tracing::info!(listen = %addr, "metrics endpoint up (GET /metrics, /healthz, /readyz)");
            Some(tokio::spawn(serve(l, metrics, tun)))
        }
        Err(e) => {
            tracing::warn!(
                listen = %addr, error = %e,
                "metrics endpoint not started: the address is taken or not local; set metrics_listen to a free \
                 address or `off`"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(peer: &str, p50_ns: u64, sent: u32, lost: u32) -> latency::WindowStats {
        latency::WindowStats {
            peer: latency::NodeId::new(peer.to_string()),
            start_unix_ms: 0,
            duration_ms: 30_000,
            sent,
            samples: sent - lost,
            lost,
            late: 0,
            loss_ratio: if sent == 0 {
                0.0
            } else {
                f64::from(lost) / f64::from(sent)
            },
            rtt: Some(latency::stats::RttSummary {
                p50_ns,
                ..Default::default()
            }),
            mode: None,
        }
    }

    #[test]
    fn renders_stream_heartbeat_probe_and_tunnel_series() {
        let dir = tempfile::tempdir().unwrap();
        let m = AgentMetrics::new(dir.path().to_path_buf());
        let first = m.stream_opened();
        assert!(m.is_connected());
        drop(first);
        assert!(!m.is_connected());
        let _second = m.stream_opened();
        m.replica_switch();
        m.heartbeat_sent(1);
        m.heartbeat_acked(1);
        m.heartbeat_acked(7);
        m.probe_window(&window("n00000000001", 2_500_000, 10, 1));
        let tunnel = TunnelSample {
            handshakes: 2,
            rx_bytes: 1234,
            tx_bytes: 567,
            handshake_age_seconds: Some(3.0),
        };
        let text = m.render(&tunnel, &m.sample_upgrade());
        for line in [
            format!("nimbus_agent_build_info{{version=\"{}\"}} 1", crate::version()),
            "nimbus_agent_connected 1".into(),
            "nimbus_agent_streams_opened_total 2".into(),
            "nimbus_agent_stream_reconnects_total 1".into(),
            "nimbus_agent_replica_switches_total 1".into(),
            "nimbus_agent_heartbeats_sent_total 1".into(),
            "nimbus_agent_heartbeat_ack_seconds_count 1".into(),
            "nimbus_agent_wireguard_handshakes_total 2".into(),
            "nimbus_agent_wireguard_rx_bytes_total 1234".into(),
            "nimbus_agent_wireguard_tx_bytes_total 567".into(),
            "nimbus_agent_wireguard_last_handshake_age_seconds 3.0".into(),
            "nimbus_agent_probe_windows_total 1".into(),
            "nimbus_agent_probe_rtt_p50_seconds{peer=\"n00000000001\"} 0.0025".into(),
            "nimbus_agent_probe_loss_ratio{peer=\"n00000000001\"} 0.1".into(),
            "nimbus_agent_upgrade_pending 0".into(),
            "nimbus_agent_upgrade_rolled_back_releases 0".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn probe_peers_are_bounded() {
        let m = AgentMetrics::new(PathBuf::from("/nonexistent"));
        for i in 0..(MAX_PROBE_PEERS + 10) {
            m.probe_window(&window(&format!("n{i:011}"), 1000, 1, 0));
        }
        assert_eq!(lock(&m.inner.probes).len(), MAX_PROBE_PEERS);
        // A window without answers counts but sets no RTT.
        let mut w = window("silent", 0, 5, 5);
        w.rtt = None;
        m.probe_window(&w);
        assert!(!lock(&m.inner.probes).contains_key("silent"));
    }

    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../../docs/metrics.md");
        let m = AgentMetrics::new(PathBuf::from("/nonexistent"));
        m.probe_window(&window("n1", 1000, 1, 0));
        let text = m.render(
            &TunnelSample {
                handshake_age_seconds: Some(1.0),
                ..Default::default()
            },
            &UpgradeSample::default(),
        );
        let rendered: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (name, kind) = l.split_once(' ')?;
                Some(if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                })
            })
            .collect();
        let documented: std::collections::BTreeSet<String> = docs
            .lines()
            .filter_map(|l| l.strip_prefix("| `nimbus_agent_"))
            .filter_map(|l| l.split_once('`').map(|(n, _)| format!("nimbus_agent_{n}")))
            .collect();
        let missing: Vec<_> = rendered.difference(&documented).collect();
        assert!(missing.is_empty(), "rendered but not in docs/metrics.md: {missing:?}");
        let stale: Vec<_> = documented.difference(&rendered).collect();
        assert!(stale.is_empty(), "in docs/metrics.md but not rendered: {stale:?}");
    }
}
