//! The latency mesh, coordinator side: hands every connected agent its probe
//! targets, the peers allowed to probe it, and the probe MAC key (over the
//! fleet stream, so the key only ever travels inside the tunnel); keeps a
//! bounded time series of the windows agents report, per ordered pair.
//!
//! Peers are addressed at the underlay IP the coordinator sees as the node's
//! WireGuard endpoint (authenticated by the handshake) and the probe port the
//! agent announced in Hello. Which peers each node probes comes from
//! `latency::Mesh` (full mesh up to 64 peers, then own zone plus a rotating
//! sample per other zone). Recomputation is coalesced: membership changes mark
//! the mesh dirty and one task pushes new configurations at most twice a second.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::{CoordinatorMessage, LatencySnapshot, LatencyWindow, ProbeConfig, ProbePeer, StoredLatencyWindow};
use prost::Message;
use tokio::sync::{Notify, watch};

use crate::context::{Ctx, key_from_id};

/// Windows kept per ordered pair: one hour of 30 s windows.
pub const MAX_WINDOWS_PER_PAIR: usize = 120;
/// Store key of the latency checkpoint ([`Probes::snapshot`]).
pub const SNAPSHOT_BLOB: &str = "latency/latest";
/// Most pairs a checkpoint restores (a fleet of 5 000 nodes probing 64 peers each has 320 000).
pub const MAX_SNAPSHOT_PAIRS: usize = 500_000;
/// How often the checkpoint is written (and once more at shutdown).
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(60);
/// How often the rotating sample of peers changes in large fleets.
pub const ROTATION: Duration = Duration::from_secs(300);

/// Probe timing told to agents.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    pub interval: Duration,
    pub window: Duration,
    /// How often the fleet key is replaced.
    pub key_rotation: Duration,
}

/// What [`Probes::rtt_summary`] returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RttSummary {
    /// Ordered pairs with at least one window that got an answer.
    pub pairs: u64,
    /// The largest p50 RTT of those pairs' newest answered windows, in nanoseconds (0 without pairs).
    pub worst_p50_ns: u64,
}

pub struct Probes {
    /// The fleet's probe MAC key: generated at start, replaced every `timing.key_rotation`; only ever sent
    /// inside the tunnel and never logged (its Debug form is redacted).
    key: Mutex<latency::ProbeKey>,
    timing: ProbeTiming,
    generation: AtomicU64,
    /// node id -> announced probe port (agents streaming to this coordinator)
    ports: Mutex<HashMap<String, u16>>,
    /// Members streaming to other replicas: node id -> probe address (`crate::probeshare`).
    remote: Mutex<HashMap<String, SocketAddr>>,
    /// (from id, to id) -> windows, oldest first
    series: Mutex<HashMap<(String, String), VecDeque<LatencyWindow>>>,
    dirty: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Probes {
    pub fn new(timing: ProbeTiming) -> Self {
        Probes {
            key: Mutex::new(latency::ProbeKey::generate(rand::random())),
            timing,
            generation: AtomicU64::new(0),
            ports: Mutex::new(HashMap::new()),
            remote: Mutex::new(HashMap::new()),
            series: Mutex::new(HashMap::new()),
            dirty: Notify::new(),
        }
    }

    /// A node announced (or withdrew, with 0) its probe port.
    pub fn set_port(&self, node_id: &str, port: u16) {
        let mut ports = lock(&self.ports);
        let changed = if port == 0 {
            ports.remove(node_id).is_some()
        } else {
            ports.insert(node_id.to_string(), port) != Some(port)
        };
        if changed {
            self.dirty.notify_one();
        }
    }

    /// Replaces the fleet key with a fresh one (the next key id) and marks the mesh dirty so every member gets
    /// it. Returns the new key id.
    pub fn rotate_key(&self) -> u32 {
        let id = {
            let mut key = lock(&self.key);
            let id = key.id().wrapping_add(1);
            *key = latency::ProbeKey::generate(id);
            id
        };
        self.dirty.notify_one();
        id
    }

    /// Id of the current fleet key.
    pub fn key_id(&self) -> u32 {
        lock(&self.key).id()
    }

    /// The current fleet key (to seal it into the store for the other replicas).
    pub fn key(&self) -> latency::ProbeKey {
        lock(&self.key).clone()
    }

    /// Takes the fleet key the replicas share (from the store); marks the mesh dirty when it changed.
    pub fn set_key(&self, key: latency::ProbeKey) {
        let mut k = lock(&self.key);
        if k.id() != key.id() || k.expose_secret() != key.expose_secret() {
            *k = key;
            self.dirty.notify_one();
        }
    }

    /// The members other replicas hold (replaces the previous set); marks the mesh dirty when it changed.
    pub fn set_remote(&self, members: HashMap<String, SocketAddr>) {
        let mut r = lock(&self.remote);
        if *r != members {
            *r = members;
            self.dirty.notify_one();
        }
    }

    /// The other replicas' members.
    pub fn remote(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> = lock(&self.remote).iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    }

    /// Nodes streaming to this coordinator that announced a probe port.
    pub fn local_ids(&self) -> Vec<String> {
        lock(&self.ports).keys().cloned().collect()
    }

    /// The newest windows measured by `from` (one per peer), as stored for other replicas.
    pub fn latest_of(&self, from: &str) -> Vec<LatencyWindow> {
        let series = lock(&self.series);
        let mut out: Vec<LatencyWindow> = series
            .iter()
            .filter(|((a, _), _)| a == from)
            .filter_map(|(_, q)| q.iter().rev().find(|w| w.sent > 0).or(q.back()).cloned())
            .collect();
        out.sort_by(|a, b| a.peer_node_id.cmp(&b.peer_node_id));
        out
    }

    /// Windows of `from` measured through another replica: each one newer than the pair's newest is appended.
    /// Returns how many were new.
    pub fn import(&self, from: &str, windows: Vec<LatencyWindow>) -> usize {
        let mut series = lock(&self.series);
        let mut added = 0;
        for w in windows {
            if w.peer_node_id.is_empty() || w.peer_node_id == from {
                continue;
            }
            let q = series.entry((from.to_string(), w.peer_node_id.clone())).or_default();
            if q.back().is_none_or(|b| b.start_unix_ms < w.start_unix_ms) {
                q.push_back(w);
                while q.len() > MAX_WINDOWS_PER_PAIR {
                    q.pop_front();
                }
                added += 1;
            }
        }
        added
    }

    /// Membership changed in a way `set_port` does not see (a stream closed, a node was revoked).
    pub fn mark_dirty(&self) {
        self.dirty.notify_one();
    }

    /// Store windows `from` reported. Windows about peers `from` was not told to probe are dropped, so a
    /// node cannot grow the coordinator's memory with made-up peers.
    pub fn record(&self, from: &str, windows: Vec<LatencyWindow>) -> usize {
        let ports = lock(&self.ports);
        let remote = lock(&self.remote);
        let mut series = lock(&self.series);
        let mut kept = 0;
        for w in windows {
            if w.peer_node_id == from || !(ports.contains_key(&w.peer_node_id) || remote.contains_key(&w.peer_node_id))
            {
                continue;
            }
            let q = series.entry((from.to_string(), w.peer_node_id.clone())).or_default();
            q.push_back(w);
            while q.len() > MAX_WINDOWS_PER_PAIR {
                q.pop_front();
            }
            kept += 1;
        }
        kept
    }

    /// Forget a node's series (revocation).
    pub fn forget(&self, node_id: &str) {
        lock(&self.ports).remove(node_id);
        lock(&self.series).retain(|(a, b), _| a != node_id && b != node_id);
        self.dirty.notify_one();
    }

    /// The newest window of every ordered pair in which probes were sent (a window in which the prober sent
    /// nothing, e.g. right after its targets changed, says nothing about the link and would hide the last
    /// measurement).
    pub fn latest(&self) -> Vec<(String, String, LatencyWindow)> {
        let series = lock(&self.series);
        let mut out: Vec<_> = series
            .iter()
            .filter_map(|((a, b), q)| {
                let w = q.iter().rev().find(|w| w.sent > 0).or(q.back())?;
                Some((a.clone(), b.clone(), w.clone()))
            })
            .collect();
        out.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
        out
    }

    /// Summary of the newest measured window of every ordered pair, for the metrics endpoint (one pass under
    /// the lock, nothing cloned): how many pairs have a measurement and the worst p50 RTT among them.
    pub fn rtt_summary(&self) -> RttSummary {
        let series = lock(&self.series);
        let mut out = RttSummary::default();
        for q in series.values() {
            let Some(w) = q.iter().rev().find(|w| w.samples > 0) else {
                continue;
            };
            out.pairs += 1;
            out.worst_p50_ns = out.worst_p50_ns.max(w.p50_ns);
        }
        out
    }

    /// The newest window of every pair ([`Probes::latest`]), encoded for the store.
    pub fn snapshot(&self) -> Vec<u8> {
        LatencySnapshot {
            pairs: self
                .latest()
                .into_iter()
                .map(|(from, _, window)| StoredLatencyWindow {
                    from_node_id: from,
                    window: Some(window),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Loads a checkpoint written by [`Probes::snapshot`] into empty series (at startup). A damaged checkpoint
    /// is reported and ignored: measurements come back with the next windows. Returns the pairs restored.
    pub fn restore(&self, bytes: &[u8]) -> usize {
        let snapshot = match LatencySnapshot::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "latency checkpoint unreadable; starting with an empty matrix");
                return 0;
            }
        };
        let mut series = lock(&self.series);
        let mut restored = 0;
        for stored in snapshot.pairs.into_iter().take(MAX_SNAPSHOT_PAIRS) {
            let Some(w) = stored.window else { continue };
            if stored.from_node_id.is_empty() || w.peer_node_id.is_empty() || stored.from_node_id == w.peer_node_id {
                continue;
            }
            let q = series.entry((stored.from_node_id, w.peer_node_id.clone())).or_default();
            if q.is_empty() {
                q.push_back(w);
                restored += 1;
            }
        }
        restored
    }

    /// The whole series of one ordered pair, oldest first.
    pub fn series(&self, from: &str, to: &str) -> Vec<LatencyWindow> {
        lock(&self.series)
            .get(&(from.to_string(), to.to_string()))
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Configurations for every member, from members `(node id, probe address, zone)`.
    pub fn configs(&self, members: &[(String, SocketAddr, Option<String>)]) -> Vec<(String, ProbeConfig)> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // From the clock, so every replica samples the same peers for the same members.
        let round = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / ROTATION.as_secs().max(1));
        let mesh_members: Vec<latency::Member> = members
            .iter()
            .map(|(id, _, zone)| latency::Member {
                id: latency::NodeId::new(id.clone()),
                zone: zone.clone(),
            })
            .collect();
        let peer = |(id, addr, zone): &(String, SocketAddr, Option<String>)| ProbePeer {
            node_id: id.clone(),
            address: addr.to_string(),
            zone: zone.clone().unwrap_or_default(),
        };
        let by_id: HashMap<&str, &(String, SocketAddr, Option<String>)> =
            members.iter().map(|m| (m.0.as_str(), m)).collect();
        let mesh = match latency::Mesh::new(&mesh_members, &latency::MeshConfig::default(), round) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot arrange the probe mesh");
                return Vec::new();
            }
        };
        let key = lock(&self.key).clone();
        members
            .iter()
            .map(|me| {
                let selection = mesh.select(&latency::NodeId::new(me.0.clone()));
                let targets = selection
                    .peers
                    .iter()
                    .filter_map(|p| by_id.get(p.as_str()).map(|m| peer(m)))
                    .collect();
                let known = members.iter().filter(|m| m.0 != me.0).map(peer).collect();
                let cfg = ProbeConfig {
                    generation,
                    key_id: key.id(),
                    key: key.expose_secret().to_vec(),
                    targets,
                    known,
                    interval_ms: u32::try_from(self.timing.interval.as_millis()).unwrap_or(u32::MAX),
                    window_secs: u32::try_from(self.timing.window.as_secs()).unwrap_or(u32::MAX).max(1),
                };
                (me.0.clone(), cfg)
            })
            .collect()
    }
}

/// Current members: connected nodes that announced a probe port and whose underlay endpoint is known — this
/// coordinator's own (also returned apart, by probe address) and, with replicas, the other replicas' (as they
/// published them, `crate::probeshare`).
async fn members(ctx: &Ctx) -> (HashMap<String, SocketAddr>, Vec<(String, SocketAddr, Option<String>)>) {
    let ports: Vec<(String, u16)> = lock(&ctx.probes.ports).iter().map(|(k, v)| (k.clone(), *v)).collect();
    let remote = ctx.probes.remote();
    let ids: Vec<String> = ports
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| ctx.sessions.is_connected(id))
        .chain(remote.iter().map(|(id, _)| id.clone()))
        .collect();
    let facts = ctx
        .state(move |s| {
            ids.iter()
                .map(|id| Ok((s.node(id)?, s.hardware(id)?.and_then(|h| h.document.platform.zone))))
                .collect::<Result<Vec<_>, crate::state::StateError>>()
        })
        .await
        .unwrap_or_default();
    let mut local = HashMap::new();
    let mut out = Vec::new();
    for (node, zone) in facts {
        let Some(node) = node else { continue };
        if let Some(port) = ports.iter().find(|(id, _)| *id == node.id).map(|(_, p)| *p) {
            let endpoint = key_from_id(&node.public_key)
                .and_then(|k| ctx.tunnel.peer_stats(&k))
                .and_then(|s| s.endpoint);
            if let Some(ep) = endpoint {
                let addr = SocketAddr::new(ep.ip(), port);
                local.insert(node.id.clone(), addr);
                out.push((node.id, addr, zone));
            }
        } else if let Some((_, addr)) = remote.iter().find(|(id, _)| *id == node.id) {
            out.push((node.id, *addr, zone));
        }
    }
    out.sort();
    (local, out)
}

/// Writes the latency checkpoint; a failure is logged (the next one retries), never fatal. With replicas: this
/// replica's agents' newest windows, one value per node, and the other replicas' imported
/// (`crate::probeshare`).
async fn save_snapshot(ctx: &std::sync::Arc<Ctx>) {
    if ctx.replicas.is_some() {
        let c = std::sync::Arc::clone(ctx);
        let shared = tokio::task::spawn_blocking(move || {
            let local = c.probes.local_ids();
            let written = crate::probeshare::write_windows(&c, &local)?;
            let imported = crate::probeshare::import_windows(&c, &local)?;
            Ok::<_, crate::replicas::ReplicaError>((written, imported))
        })
        .await;
        match shared {
            Ok(Ok((written, imported))) => {
                tracing::debug!(written, imported, "latency windows shared with the other replicas")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "latency windows not shared this time; retried next window"),
            Err(e) => tracing::warn!(error = %e, "latency sharing task failed"),
        }
        return;
    }
    let bytes = ctx.probes.snapshot();
    match ctx.state(move |s| s.put_config_blob(SNAPSHOT_BLOB, &bytes)).await {
        Ok(()) => tracing::debug!("latency checkpoint written"),
        Err(e) => tracing::warn!(error = %e, "latency checkpoint not written; retrying in a minute"),
    }
}

/// Loads the checkpoint at startup (with replicas: the shared probe key and every node's stored windows).
pub async fn load_snapshot(ctx: &std::sync::Arc<Ctx>) {
    if let (Some(_), Some(kek)) = (&ctx.replicas, &ctx.kek) {
        let (c, k) = (std::sync::Arc::clone(ctx), std::sync::Arc::clone(kek));
        let loaded = tokio::task::spawn_blocking(move || {
            crate::probeshare::sync_key(c.state.store(), &k, &c.probes)?;
            crate::probeshare::import_windows(&c, &[])
        })
        .await;
        match loaded {
            Ok(Ok(pairs)) => tracing::info!(pairs, "latency windows loaded from the store"),
            Ok(Err(e)) => tracing::warn!(error = %e, "shared latency state not loaded; it comes with the next poll"),
            Err(e) => tracing::warn!(error = %e, "latency loading task failed"),
        }
        return;
    }
    match ctx.state(|s| s.config_blob(SNAPSHOT_BLOB)).await {
        Ok(Some(bytes)) => {
            let pairs = ctx.probes.restore(&bytes);
            tracing::info!(pairs, "latency matrix restored from the last checkpoint");
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "latency checkpoint not read; starting with an empty matrix"),
    }
}

/// Push configurations whenever the mesh is dirty (coalesced), and rotate the sample periodically.
pub async fn run(ctx: std::sync::Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    // What this replica last published of its members (`crate::probeshare`).
    let published = std::sync::Arc::new(Mutex::new(HashMap::new()));
    let mut rotate = tokio::time::interval(ROTATION);
    rotate.tick().await;
    let mut new_key = tokio::time::interval(ctx.probes.timing.key_rotation);
    new_key.tick().await;
    // With replicas the windows are shared every probe window (the others' view stays that fresh).
    let every = if ctx.replicas.is_some() {
        ctx.probes.timing.window.max(Duration::from_secs(1))
    } else {
        SNAPSHOT_EVERY
    };
    let mut checkpoint = tokio::time::interval(every);
    checkpoint.tick().await;
    loop {
        tokio::select! {
            _ = ctx.probes.dirty.notified() => {}
            _ = checkpoint.tick() => {
                save_snapshot(&ctx).await;
                continue;
            }
            _ = rotate.tick() => {}
            _ = new_key.tick() => {
                // With replicas the leader rotates and shares the key; the others take it from the store.
                let key_id = match (&ctx.replicas, &ctx.kek) {
                    (Some(_), Some(kek)) if ctx.leadership.is_leader() => {
                        let (c, k) = (std::sync::Arc::clone(&ctx), std::sync::Arc::clone(kek));
                        match tokio::task::spawn_blocking(move || crate::probeshare::rotate_key(&c, &k)).await {
                            Ok(Ok(id)) => Some(id),
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "probe key not rotated (store); the old one stays in use");
                                None
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "probe key task failed");
                                None
                            }
                        }
                    }
                    (Some(_), _) => None,
                    (None, _) => Some(ctx.probes.rotate_key()),
                };
                if let Some(key_id) = key_id {
                    ctx.metrics.probe_key_rotations.inc();
                    tracing::info!(key_id, "latency probe key rotated; pushing it to every member");
                }
            }
            _ = shutdown.changed() => {
                save_snapshot(&ctx).await;
                return;
            }
        }
        // Let a burst of connects settle into one recomputation.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (local, members) = members(&ctx).await;
        if let Some(m) = &ctx.replicas {
            let (m, last_sent) = (std::sync::Arc::clone(m), std::sync::Arc::clone(&published));
            let published_now = tokio::task::spawn_blocking(move || {
                let mut last = lock(&last_sent);
                crate::probeshare::publish_members(&m, &local, &mut last)
            })
            .await;
            if let Ok(Err(e)) = published_now {
                tracing::warn!(error = %e, "probe members not published to the other replicas; retried at the next change");
            }
        }
        let configs = ctx.probes.configs(&members);
        let mut pushed = 0;
        for (id, cfg) in configs {
            if ctx.sessions.send(
                &id,
                CoordinatorMessage {
                    msg: Some(CoordMsg::ProbeConfig(cfg)),
                },
            ) {
                pushed += 1;
            }
        }
        tracing::debug!(members = members.len(), pushed, "probe mesh pushed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes() -> Probes {
        Probes::new(ProbeTiming {
            interval: Duration::from_secs(1),
            window: Duration::from_secs(30),
            key_rotation: Duration::from_secs(3600),
        })
    }

    fn member(id: &str, last: u8) -> (String, SocketAddr, Option<String>) {
        (id.into(), SocketAddr::from(([192, 0, 2, last], 7444)), None)
    }

    #[test]
    fn small_fleets_get_a_full_mesh_with_one_key() {
        let p = probes();
        let members = vec![member("a", 1), member("b", 2), member("c", 3)];
        let configs = p.configs(&members);
        assert_eq!(configs.len(), 3);
        for (id, cfg) in &configs {
            let targets: Vec<&str> = cfg.targets.iter().map(|t| t.node_id.as_str()).collect();
            assert_eq!(targets.len(), 2, "{id}: {targets:?}");
            assert!(!targets.contains(&id.as_str()));
            assert_eq!(cfg.known.len(), 2);
            assert_eq!(cfg.key.len(), 32);
            assert_eq!(cfg.window_secs, 30);
        }
        assert_eq!(configs[0].1.key, configs[1].1.key, "one fleet key");
        assert!(configs[0].1.targets.iter().any(|t| t.address == "192.0.2.2:7444"));
    }

    #[test]
    fn a_rotated_key_is_new_and_reaches_every_member() {
        let p = probes();
        let members = vec![member("a", 1), member("b", 2)];
        let before = p.configs(&members);
        let id = p.rotate_key();
        assert_eq!(id, before[0].1.key_id.wrapping_add(1));
        assert_eq!(p.key_id(), id);
        let after = p.configs(&members);
        for (_, cfg) in &after {
            assert_eq!(cfg.key_id, id);
            assert_ne!(
                cfg.key, before[0].1.key,
                "a fresh secret, not the old one under a new id"
            );
        }
        assert_eq!(after[0].1.key, after[1].1.key, "still one fleet key");
    }

    #[test]
    fn the_checkpoint_restores_the_newest_window_of_every_pair() {
        let p = probes();
        p.set_port("a", 7444);
        p.set_port("b", 7444);
        let w = |peer: &str, start: u64, sent: u32| LatencyWindow {
            peer_node_id: peer.into(),
            start_unix_ms: start,
            sent,
            samples: sent,
            p50_ns: 100 + start,
            ..Default::default()
        };
        p.record("a", vec![w("b", 1, 10), w("b", 2, 10), w("b", 3, 0)]);
        p.record("b", vec![w("a", 5, 10)]);
        let bytes = p.snapshot();
        let q = probes();
        assert_eq!(q.restore(&bytes), 2);
        assert_eq!(q.latest(), p.latest());
        assert_eq!(q.series("a", "b").len(), 1, "only the newest window with probes");
        assert_eq!(q.series("a", "b")[0].start_unix_ms, 2);
        assert_eq!(probes().restore(b"\xff\xff not protobuf"), 0, "damaged: ignored");
    }

    #[test]
    fn windows_are_kept_bounded_and_only_for_known_peers() {
        let p = probes();
        p.set_port("a", 7444);
        p.set_port("b", 7444);
        let w = |peer: &str| LatencyWindow {
            peer_node_id: peer.into(),
            p50_ns: 100,
            ..Default::default()
        };
        assert_eq!(p.record("a", vec![w("b"), w("made-up"), w("a")]), 1);
        for _ in 0..(MAX_WINDOWS_PER_PAIR + 10) {
            p.record("a", vec![w("b")]);
        }
        assert_eq!(p.series("a", "b").len(), MAX_WINDOWS_PER_PAIR);
        assert_eq!(p.latest().len(), 1);
        // A window without probes does not hide the last measurement.
        let sent = LatencyWindow {
            peer_node_id: "b".into(),
            sent: 4,
            samples: 4,
            p50_ns: 200,
            ..Default::default()
        };
        p.record("a", vec![sent, w("b")]);
        assert_eq!(p.latest()[0].2.p50_ns, 200);
        assert_eq!(
            p.rtt_summary(),
            RttSummary {
                pairs: 1,
                worst_p50_ns: 200
            }
        );
        p.forget("b");
        assert!(p.latest().is_empty());
        assert_eq!(p.rtt_summary(), RttSummary::default());
    }
}
