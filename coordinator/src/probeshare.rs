//! The latency mesh across coordinator replicas: one mesh for the whole fleet whichever replica each agent
//! streams to.
//!
//! * **Members**: each replica publishes the probe address of every agent streaming to it as
//!   `probe-members/<node>` (bound to its lease); the others read the prefix when its fingerprint changes
//!   (`crate::replicas::run`) into `Probes::set_remote`. Every replica computes the same mesh from the same
//!   member list (the sample rotation is time-based) and sends each of its own agents its configuration.
//! * **Key**: the fleet's probe MAC key is sealed with the KEK at `secrets/probe-key`; the first replica seals its
//!   own, the leader replaces it at each rotation (through the fenced store), every replica picks up a change
//!   within a poll.
//! * **Windows**: each replica writes, every probe window, the newest windows its agents measured as
//!   `latency/node/<from>` (one small value per node, a `LatencySnapshot`) and imports the other nodes' from
//!   there, so `nimbusctl latency`, the metrics and the replication planner see the whole matrix on any
//!   replica. At start a replica imports them all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use nimbus_proto::{LatencySnapshot, StoredLatencyWindow};
use prost::Message as _;

use crate::context::Ctx;
use crate::replicas::{Membership, ReplicaError};
use crate::store::{Store, Txn};

/// Probe members published by the replica holding their stream.
pub const MEMBERS: &[u8] = b"probe-members/";
/// Newest windows per measuring node.
pub const WINDOWS: &[u8] = b"latency/node/";
/// The fleet's probe key, sealed.
pub const SECRET_PROBE_KEY: &[u8] = b"secrets/probe-key";
/// Writes per transaction when storing windows (under etcd's default 128 operations).
const BATCH: usize = 100;

fn key(prefix: &[u8], node: &str) -> Vec<u8> {
    [prefix, node.as_bytes()].concat()
}

/// Publishes this replica's members (`local`: node → probe address), writing only what changed since `last`.
pub fn publish_members(
    m: &Membership,
    local: &HashMap<String, SocketAddr>,
    last: &mut HashMap<String, SocketAddr>,
) -> Result<(), ReplicaError> {
    for (node, addr) in local {
        if last.get(node) != Some(addr) {
            m.put_leased(&key(MEMBERS, node), addr.to_string().into_bytes())?;
        }
    }
    for node in last.keys().filter(|n| !local.contains_key(*n)) {
        m.store().txn(Txn::new().delete(key(MEMBERS, node)))?;
    }
    *last = local.clone();
    Ok(())
}

/// The members other replicas published (entries naming this replica's own agents are skipped; unreadable ones
/// are logged and skipped).
pub fn read_members(m: &Membership, local: &[String]) -> Result<HashMap<String, SocketAddr>, ReplicaError> {
    let mut out = HashMap::new();
    for (k, v) in m.store().scan_prefix(MEMBERS)? {
        let node = String::from_utf8_lossy(&k[MEMBERS.len()..]).into_owned();
        if local.contains(&node) {
            continue;
        }
        match String::from_utf8_lossy(&v).parse::<SocketAddr>() {
            Ok(a) => {
                out.insert(node, a);
            }
            Err(_) => tracing::warn!(node_id = %node, "unreadable probe member entry ignored"),
        }
    }
    Ok(out)
}

fn seal_key(kek: &crate::kek::Kek, k: &latency::ProbeKey) -> Result<Vec<u8>, ReplicaError> {
    let mut plain = k.id().to_be_bytes().to_vec();
    plain.extend_from_slice(k.expose_secret());
    kek.try_seal(&plain, SECRET_PROBE_KEY)
        .map_err(|e| ReplicaError::Secret(format!("cannot seal the probe key: {e}")))
}

fn open_key(kek: &crate::kek::Kek, sealed: &[u8]) -> Result<latency::ProbeKey, ReplicaError> {
    let plain = kek
        .open(sealed, SECRET_PROBE_KEY)
        .map_err(|e| ReplicaError::Secret(format!("cannot open the probe key from the store: {e}")))?;
    let (id, secret) = plain
        .split_first_chunk::<4>()
        .ok_or_else(|| ReplicaError::Secret("the stored probe key is too short".into()))?;
    let secret: [u8; latency::key::KEY_LEN] = secret
        .try_into()
        .map_err(|_| ReplicaError::Secret("the stored probe key has the wrong length".into()))?;
    Ok(latency::ProbeKey::new(u32::from_be_bytes(*id), secret))
}

/// The fleet key from the store into `ctx.probes` (sealing this replica's own when the store has none yet).
pub fn sync_key(store: &dyn Store, kek: &crate::kek::Kek, probes: &crate::probes::Probes) -> Result<(), ReplicaError> {
    for _ in 0..3 {
        if let Some(sealed) = store.get(SECRET_PROBE_KEY)? {
            probes.set_key(open_key(kek, &sealed)?);
            return Ok(());
        }
        let sealed = seal_key(kek, &probes.key())?;
        if store.txn(
            Txn::new()
                .if_absent(SECRET_PROBE_KEY.to_vec())
                .put(SECRET_PROBE_KEY.to_vec(), sealed),
        )? {
            return Ok(());
        }
    }
    Err(ReplicaError::Secret(
        "the probe key in the store kept changing; retrying".into(),
    ))
}

/// The leader's key rotation with replicas: a new key (next id) into the store, fenced (a replica that lost
/// leadership writes nothing), then taken here; the other replicas take it within a poll. Returns its id.
pub fn rotate_key(ctx: &Ctx, kek: &crate::kek::Kek) -> Result<u32, ReplicaError> {
    let new = latency::ProbeKey::generate(ctx.probes.key_id().wrapping_add(1));
    let sealed = seal_key(kek, &new)?;
    ctx.singleton
        .store()
        .txn(Txn::new().put(SECRET_PROBE_KEY.to_vec(), sealed))?;
    let id = new.id();
    ctx.probes.set_key(new);
    Ok(id)
}

/// Writes the newest windows of this replica's agents (`local`), one value per measuring node.
pub fn write_windows(ctx: &Ctx, local: &[String]) -> Result<usize, ReplicaError> {
    let store = ctx.state.store();
    let mut written = 0;
    for chunk in local.chunks(BATCH) {
        let mut txn = Txn::new();
        for from in chunk {
            let windows = ctx.probes.latest_of(from);
            if windows.is_empty() {
                continue;
            }
            let snapshot = LatencySnapshot {
                pairs: windows
                    .into_iter()
                    .map(|w| StoredLatencyWindow {
                        from_node_id: from.clone(),
                        window: Some(w),
                    })
                    .collect(),
            };
            txn = txn.put(key(WINDOWS, from), snapshot.encode_to_vec());
            written += 1;
        }
        if !txn.ops.is_empty() {
            store.txn(txn)?;
        }
    }
    Ok(written)
}

/// Imports the windows other replicas stored for nodes that are not this replica's own (`local`). Returns
/// how many windows were new.
pub fn import_windows(ctx: &Ctx, local: &[String]) -> Result<usize, ReplicaError> {
    let mut added = 0;
    for (k, v) in ctx.state.store().scan_prefix(WINDOWS)? {
        let from = String::from_utf8_lossy(&k[WINDOWS.len()..]).into_owned();
        if local.contains(&from) {
            continue;
        }
        let snapshot = match LatencySnapshot::decode(v.as_slice()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node_id = %from, error = %e, "unreadable stored latency windows ignored");
                continue;
            }
        };
        let windows = snapshot
            .pairs
            .into_iter()
            .filter(|p| p.from_node_id == from)
            .filter_map(|p| p.window)
            .take(latency::MeshConfig::default().max_peers.saturating_mul(2))
            .collect();
        added += ctx.probes.import(&from, windows);
    }
    Ok(added)
}

/// A revoked or decommissioned node's stored windows and member entry go with it.
pub fn forget(ctx: &Ctx, node: &str) {
    if ctx.replicas.is_none() {
        return;
    }
    let (state, node) = (Arc::clone(&ctx.state), node.to_string());
    tokio::task::spawn_blocking(move || {
        let txn = Txn::new().delete(key(WINDOWS, &node)).delete(key(MEMBERS, &node));
        if let Err(e) = state.store().txn(txn) {
            tracing::debug!(node_id = %node, error = %e, "stored latency entries not removed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::{ProbeTiming, Probes};
    use crate::store::SledStore;
    use std::time::Duration;

    fn probes() -> Probes {
        Probes::new(ProbeTiming {
            interval: Duration::from_secs(1),
            window: Duration::from_secs(30),
            key_rotation: Duration::from_secs(3600),
        })
    }

    #[test]
    fn replicas_end_up_with_one_probe_key_and_the_store_reveals_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let kek = crate::kek::Kek::from_bytes(&[3; 32]);
        let (a, b) = (probes(), probes());
        assert_ne!(a.key().expose_secret(), b.key().expose_secret());
        sync_key(&store, &kek, &a).unwrap();
        sync_key(&store, &kek, &b).unwrap();
        assert_eq!(
            a.key().expose_secret(),
            b.key().expose_secret(),
            "the first one's key is shared"
        );
        assert_eq!(a.key_id(), b.key_id());
        let sealed = store.get(SECRET_PROBE_KEY).unwrap().unwrap();
        assert!(!sealed.windows(8).any(|w| w == &a.key().expose_secret()[..8]));
        // Another KEK cannot open it.
        let other = crate::kek::Kek::from_bytes(&[4; 32]);
        assert!(sync_key(&store, &other, &probes()).is_err());
        // A new key in the store (the leader's rotation) is taken.
        let next = latency::ProbeKey::generate(a.key_id() + 1);
        store
            .txn(Txn::new().put(SECRET_PROBE_KEY.to_vec(), seal_key(&kek, &next).unwrap()))
            .unwrap();
        sync_key(&store, &kek, &b).unwrap();
        assert_eq!(b.key_id(), next.id());
        assert_eq!(b.key().expose_secret(), next.expose_secret());
    }

    #[test]
    fn imported_windows_append_only_newer_ones() {
        let p = probes();
        let w = |peer: &str, start: u64| nimbus_proto::LatencyWindow {
            peer_node_id: peer.into(),
            start_unix_ms: start,
            sent: 10,
            samples: 10,
            p50_ns: 1000,
            ..Default::default()
        };
        assert_eq!(
            p.import("a", vec![w("b", 1000), w("c", 1000), w("a", 1000)]),
            2,
            "no window to itself"
        );
        assert_eq!(
            p.import("a", vec![w("b", 1000), w("b", 500)]),
            0,
            "old and repeated windows are ignored"
        );
        assert_eq!(p.import("a", vec![w("b", 2000)]), 1);
        assert_eq!(p.series("a", "b").len(), 2);
        let latest = p.latest_of("a");
        assert_eq!(latest.len(), 2);
        assert_eq!(latest[0].start_unix_ms, 2000);
    }
}
