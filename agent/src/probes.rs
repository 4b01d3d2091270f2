//! Latency probing, agent side. One UDP socket on the underlay, bound at start
//! (so a port in use is reported before anything else runs); a
//! `latency::Driver` (prober + responder) started on the first probe
//! configuration the coordinator pushes and reconfigured by later ones (new
//! targets, new peers allowed to probe us, key rotation). Closed windows are
//! queued for the fleet stream; while no stream is open the oldest are dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nimbus_proto::{LatencyWindow, ProbeConfig, ProbePeer};
use tokio::sync::{Mutex, mpsc};

use crate::error::AgentError;

/// Windows buffered while no stream is open (64 peers × a few windows).
const WINDOW_QUEUE: usize = 512;

/// What the fleet session uses: the port to announce, where to deliver configurations, where windows come from.
pub struct ProbeHandle {
    /// Announced in Hello; 0 when probing is off.
    pub port: u16,
    configs: mpsc::Sender<ProbeConfig>,
    windows: Arc<Mutex<mpsc::Receiver<latency::WindowStats>>>,
}

impl ProbeHandle {
    /// Hand a configuration from the coordinator to the driver task.
    pub fn configure(&self, cfg: ProbeConfig) {
        if self.port != 0 && self.configs.try_send(cfg).is_err() {
            tracing::warn!("probe configuration dropped: the probe task is busy or gone");
        }
    }

    /// The window queue; one fleet session at a time holds it.
    pub fn windows(&self) -> Arc<Mutex<mpsc::Receiver<latency::WindowStats>>> {
        Arc::clone(&self.windows)
    }
}

/// The wire form of a closed window.
pub fn window_message(w: &latency::WindowStats) -> LatencyWindow {
    let rtt = w.rtt.unwrap_or_default();
    LatencyWindow {
        peer_node_id: w.peer.as_str().to_string(),
        start_unix_ms: w.start_unix_ms,
        duration_ms: u32::try_from(w.duration_ms).unwrap_or(u32::MAX),
        sent: w.sent,
        samples: w.samples,
        lost: w.lost,
        late: w.late,
        min_ns: rtt.min_ns,
        p50_ns: rtt.p50_ns,
        p90_ns: rtt.p90_ns,
        p99_ns: rtt.p99_ns,
        max_ns: rtt.max_ns,
        mean_ns: rtt.mean_ns,
        jitter_ns: rtt.jitter_ns,
        timestamping: w.mode.map(|m| m.as_str().to_string()).unwrap_or_default(),
    }
}

/// Parse the peers of a configuration (hostile input: bounded ids, real socket addresses).
fn peers(list: &[ProbePeer]) -> Vec<latency::Peer> {
    list.iter()
        .filter(|p| !p.node_id.is_empty() && p.node_id.len() <= 64)
        .filter_map(|p| {
            p.address
                .parse::<SocketAddr>()
                .ok()
                .map(|a| latency::Peer::new(latency::NodeId::new(p.node_id.clone()), a))
        })
        .collect()
}

/// How long after accepting a new probe key the agent starts signing with it: the time the coordinator's push
/// needs to reach every peer (milliseconds), with a wide margin; well inside the old key's grace period.
pub const KEY_SWITCH_DELAY: Duration = Duration::from_secs(2);

/// Sizes the responder's rate limits for the probe interval: every peer is answered at least twice as fast as
/// it is told to probe, and the total allows that for the largest mesh a node can be part of
/// ([`latency::mesh::DEFAULT_MAX_PEERS`] probers), so a fast interval does not starve the answers.
pub fn scale_responder(r: &mut latency::ResponderConfig, interval_ms: u32) {
    let rate = 2.0 * 1000.0 / f64::from(interval_ms.max(10));
    r.per_peer_rate = r.per_peer_rate.max(rate);
    r.per_peer_burst = r.per_peer_burst.max(2.0 * rate);
    let peers = latency::mesh::DEFAULT_MAX_PEERS as f64;
    r.total_rate = r.total_rate.max(rate * peers);
    r.total_burst = r.total_burst.max(2.0 * rate * peers);
}

fn key_of(cfg: &ProbeConfig) -> Option<latency::ProbeKey> {
    let secret: [u8; 32] = cfg.key.as_slice().try_into().ok()?;
    Some(latency::ProbeKey::new(cfg.key_id, secret))
}

/// Bind the probe socket (or not, with `None`) and start the task that runs the driver once configured.
pub async fn start(listen: Option<SocketAddr>, node_id: &str) -> Result<ProbeHandle, AgentError> {
    let (configs_tx, mut configs_rx) = mpsc::channel::<ProbeConfig>(8);
    let (windows_tx, windows_rx) = mpsc::channel(WINDOW_QUEUE);
    let handle = |port| ProbeHandle {
        port,
        configs: configs_tx.clone(),
        windows: Arc::new(Mutex::new(windows_rx)),
    };
    let Some(addr) = listen else {
        return Ok(handle(0));
    };
    let socket = tokio::net::UdpSocket::bind(addr).await.map_err(|e| {
        AgentError::Other(format!(
            "cannot bind the latency probe port {addr}: {e}; free the port or set --probe-listen (or `off`)"
        ))
    })?;
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(addr.port());
    let me = latency::NodeId::new(node_id.to_string());
    tokio::spawn(async move {
        // Wait for the first usable configuration: it carries the key and the timing.
        let (first, key) = loop {
            let Some(cfg) = configs_rx.recv().await else { return };
            match key_of(&cfg) {
                Some(k) => break (cfg, k),
                None => tracing::warn!("probe configuration without a valid 32-byte key ignored"),
            }
        };
        let mut config = latency::DriverConfig::default();
        config.prober.interval = Duration::from_millis(u64::from(first.interval_ms.max(10)));
        config.prober.window = Duration::from_secs(u64::from(first.window_secs.max(1)));
        config.prober.timeout = config.prober.timeout.min(config.prober.window / 2);
        scale_responder(&mut config.responder, first.interval_ms);
        let mut driver = match latency::Driver::new(socket, me, key, config) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "latency probing not started");
                return;
            }
        };
        tracing::info!(port, mode = ?driver.capability(), targets = first.targets.len(), "latency probing started");
        driver.apply(latency::Command::SetKnownPeers(peers(&first.known)));
        driver.apply(latency::Command::SetProbeTargets(peers(&first.targets)));
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let mut key_id = first.key_id;
        tokio::spawn(async move {
            while let Some(cfg) = configs_rx.recv().await {
                if cfg.key_id != key_id {
                    match key_of(&cfg) {
                        Some(k) => {
                            key_id = cfg.key_id;
                            // Two steps: answer the new key at once, sign with it only once every peer has
                            // had time to learn it too (the coordinator pushes to all nodes at once).
                            let _ = cmd_tx.send(latency::Command::AcceptKey(k.clone())).await;
                            let later = cmd_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(KEY_SWITCH_DELAY).await;
                                let _ = later.send(latency::Command::RotateKey(k)).await;
                            });
                        }
                        None => continue,
                    }
                }
                let _ = cmd_tx.send(latency::Command::SetKnownPeers(peers(&cfg.known))).await;
                if cmd_tx
                    .send(latency::Command::SetProbeTargets(peers(&cfg.targets)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        match driver.run(cmd_rx, windows_tx, std::future::pending()).await {
            Ok(report) => tracing::info!(?report, "latency probing stopped"),
            Err(e) => tracing::error!(error = %e, "latency probing failed"),
        }
    });
    Ok(handle(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_responder_can_answer_a_full_mesh_at_any_interval() {
        let mut slow = latency::ResponderConfig::default();
        scale_responder(&mut slow, 1000);
        assert_eq!(
            slow.total_rate,
            latency::ResponderConfig::default().total_rate,
            "defaults suffice at 1 s"
        );
        let mut fast = latency::ResponderConfig::default();
        scale_responder(&mut fast, 10);
        // 64 probers at 100 probes/s each: 6400 answers/s needed, twice that allowed.
        assert!(fast.total_rate >= 2.0 * 6400.0, "{fast:?}");
        assert!(fast.per_peer_rate >= 200.0);
        assert!(fast.validate().is_ok());
    }

    #[test]
    fn hostile_peer_lists_are_filtered() {
        let list = vec![
            ProbePeer {
                node_id: "n1".into(),
                address: "192.0.2.1:7444".into(),
                zone: String::new(),
            },
            ProbePeer {
                node_id: "n2".into(),
                address: "not an address".into(),
                zone: String::new(),
            },
            ProbePeer {
                node_id: "x".repeat(65),
                address: "192.0.2.3:7444".into(),
                zone: String::new(),
            },
            ProbePeer {
                node_id: String::new(),
                address: "192.0.2.4:7444".into(),
                zone: String::new(),
            },
        ];
        let p = peers(&list);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].addr, "192.0.2.1:7444".parse().unwrap());
        assert!(
            key_of(&ProbeConfig {
                key: vec![1; 31],
                ..Default::default()
            })
            .is_none()
        );
        assert!(
            key_of(&ProbeConfig {
                key: vec![1; 32],
                ..Default::default()
            })
            .is_some()
        );
    }

    #[test]
    fn windows_map_to_the_wire() {
        let w = latency::WindowStats {
            peer: latency::NodeId::new("n2"),
            start_unix_ms: 1000,
            duration_ms: 30_000,
            sent: 30,
            samples: 29,
            lost: 1,
            late: 0,
            loss_ratio: 1.0 / 30.0,
            rtt: Some(latency::RttSummary {
                p50_ns: 250_000,
                p99_ns: 300_000,
                ..Default::default()
            }),
            mode: Some(latency::TimestampMode::KernelTxRx),
        };
        let m = window_message(&w);
        assert_eq!(
            (m.peer_node_id.as_str(), m.p50_ns, m.p99_ns, m.lost),
            ("n2", 250_000, 300_000, 1)
        );
        assert_eq!(m.timestamping, "kernel_tx_rx");
    }
}
