//! Coordinator replicas sharing one etcd prefix (issue 11, "Replicas").
//!
//! Every replica serves enrollment, the fleet channel and the admin API. What they share, they share through
//! the store:
//!
//! * **Registry** `replicas/<id>`: each replica's WireGuard public key, UDP endpoint, overlay address and
//!   fleet port, put with the replica's own lease ([`LEASE_TTL`]): a dead replica's entry vanishes within the
//!   TTL. Agents learn the list at enrollment and on every fleet stream (`CoordinatorMessage.Replicas`, sent
//!   again whenever it changes) and keep a WireGuard peer per replica.
//! * **Overlay addresses**: each replica owns one address of the overlay, recorded as `replica-ip/<id>` and
//!   reserved in `ip/` (value `replica:<id>`) in one transaction, so nodes and replicas never collide. The
//!   first replica takes the overlay's first host address — the one a single coordinator uses — so agents
//!   enrolled before the move to replicas still reach it.
//! * **Secrets**, sealed with the key-encryption key ([`crate::kek`]; the store alone reveals none of them):
//!   `secrets/ca` (the CA every replica issues from, so a token's CA pin is valid on any replica) and
//!   `secrets/wg/<id>` (each replica's WireGuard key, so a replica restarted with an empty data dir keeps its
//!   key). The first replica seals what it has (or creates); later ones restore it into their data dir.
//! * **Sessions** `sessions/<node>` = the id of the replica holding the node's fleet stream, bound to that
//!   replica's lease. Each replica reads the prefix (when its fingerprint changed) into a view, so
//!   "connected" is fleet-wide.
//! * **Mail** `mail/<replica>/<node>/<nonce>`: a message for a node whose stream another replica holds
//!   (desired state, revocation, decommission) is written there with the *holder's* lease (mail for a dead
//!   replica vanishes with it); the holder delivers and deletes it within [`POLL`].
//! * **Peers**: every replica keeps every active node as a WireGuard peer; it re-reads the node list when the
//!   `nodes/` fingerprint changes and adds or removes peers (enrollment, acceptance or revocation on another
//!   replica).
//!
//! Singleton work (rollout deadlines, drains, cluster label sync, audit checkpoints) runs only on the leader
//! (`crate::leader`), see `crate::server`; the latency mesh spans the replicas (`crate::probeshare`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nimbus_proto::CoordinatorMessage;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::context::{Ctx, key_from_id};
use crate::kek::Kek;
use crate::state::{NodeStatus, State, StateError};
use crate::store::{EtcdStore, Store, StoreError, Txn, keys};

/// The replica registry prefix.
pub const REGISTRY: &[u8] = b"replicas/";
/// Which replica holds each node's fleet stream.
pub const SESSIONS: &[u8] = b"sessions/";
/// Messages for nodes whose stream another replica holds.
pub const MAIL: &str = "mail/";
/// The shared CA, sealed.
pub const SECRET_CA: &[u8] = b"secrets/ca";
/// The release repository's online keys, sealed.
pub const SECRET_RELEASE_KEYS: &[u8] = b"secrets/release-keys";
/// A replica's lease: its registry entry, its agents' session keys and mail for it vanish this long after it
/// stopped renewing.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a replica renews its lease, reads the registry, the sessions, its mail and the node list's
/// fingerprint.
pub const POLL: Duration = Duration::from_secs(1);
/// Most mail entries delivered per poll.
const MAIL_BATCH: usize = 1000;

/// Store key of a replica's sealed WireGuard key.
pub fn secret_wg_key(id: &str) -> Vec<u8> {
    format!("secrets/wg/{id}").into_bytes()
}

/// Store key of a replica's overlay address.
pub fn replica_ip_key(id: &str) -> Vec<u8> {
    format!("replica-ip/{id}").into_bytes()
}

fn registry_key(id: &str) -> Vec<u8> {
    [REGISTRY, id.as_bytes()].concat()
}

fn session_key(node: &str) -> Vec<u8> {
    [SESSIONS, node.as_bytes()].concat()
}

fn mailbox(replica: &str) -> Vec<u8> {
    format!("{MAIL}{replica}/").into_bytes()
}

/// Errors of replica membership.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Secret(String),
}

/// One replica, as the registry holds it and agents reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    /// WireGuard public key, standard base64.
    pub wg_public_key: String,
    /// host:port agents dial for WireGuard.
    pub wg_endpoint: String,
    pub overlay_ip: Ipv4Addr,
    pub fleet_port: u16,
    /// host:port of the enrollment listener.
    pub enroll_endpoint: String,
    /// The lease the entry (and mail for this replica) is bound to.
    pub lease: i64,
}

impl ReplicaRecord {
    /// The contract's form.
    pub fn message(&self) -> nimbus_proto::Replica {
        nimbus_proto::Replica {
            id: self.id.clone(),
            wg_public_key: base64::engine::general_purpose::STANDARD
                .decode(&self.wg_public_key)
                .unwrap_or_default(),
            wg_endpoint: self.wg_endpoint.clone(),
            overlay_ip: self.overlay_ip.to_string(),
            fleet_port: u32::from(self.fleet_port),
        }
    }
}

/// The overlay address of replica `id`: the one it has, or a new one reserved for it (the overlay's first
/// host address when free, else the next free one) — `replica-ip/<id>` and `ip/<addr>` in one transaction.
pub fn overlay_ip(state: &State, id: &str) -> Result<Ipv4Addr, ReplicaError> {
    let store = state.store();
    let key = replica_ip_key(id);
    for _ in crate::state::attempts() {
        if let Some(v) = store.get(&key)? {
            let text = String::from_utf8_lossy(&v);
            return text.trim().parse().map_err(|_| {
                ReplicaError::Secret(format!(
                    "the store's overlay address of replica {id} is unreadable ({text:?}); delete the key \
                     replica-ip/{id} and restart this replica"
                ))
            });
        }
        let first = state.overlay().coordinator_ip;
        let ip = if store.get(&keys::ip(first))?.is_none() {
            first
        } else {
            state.next_free_ip()?
        };
        let txn = Txn::new()
            .if_absent(key.clone())
            .if_absent(keys::ip(ip))
            .put(key.clone(), ip.to_string())
            .put(keys::ip(ip), format!("replica:{id}"));
        if store.txn(txn)? {
            tracing::info!(replica = %id, overlay_ip = %ip, "overlay address reserved for this replica");
            return Ok(ip);
        }
    }
    Err(ReplicaError::Secret(format!(
        "could not reserve an overlay address for replica {id}: the store kept changing; restart this replica"
    )))
}

#[derive(Serialize, Deserialize)]
struct SealedFiles {
    /// File name → base64 contents.
    files: BTreeMap<String, String>,
}

/// Keeps the files `names` of `dir` equal to the sealed copy at `key` in the store: restores them from the
/// store when it has them (replacing different local ones, with a warning), otherwise seals the local ones
/// (after `create` made them if missing) and puts them — unless another replica was first, whose copy then
/// wins. Returns whether the local files came from the store.
pub fn share_files(
    store: &dyn Store,
    kek: &Kek,
    key: &[u8],
    dir: &Path,
    names: &dyn Fn(&Path) -> Vec<String>,
    create: &dyn Fn(&Path) -> Result<(), ReplicaError>,
) -> Result<bool, ReplicaError> {
    let what = String::from_utf8_lossy(key).into_owned();
    let secret = |m: String| ReplicaError::Secret(m);
    for _ in 0..3 {
        if let Some(sealed) = store.get(key)? {
            let plain = kek.open(&sealed, key).map_err(|e| {
                secret(format!(
                    "cannot open {what} from the store with this KEK ({e}); every replica needs the same KEK"
                ))
            })?;
            let files: SealedFiles = serde_json::from_slice(&plain)
                .map_err(|e| secret(format!("{what} in the store is not a sealed file set ({e})")))?;
            for (name, b64) in &files.files {
                if name.contains('/') || name.starts_with('.') || name.is_empty() {
                    return Err(secret(format!("{what} names a file {name:?}: refused")));
                }
                let body = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| secret(format!("{what}: file {name} is not base64 ({e})")))?;
                let path = dir.join(name);
                match std::fs::read(&path) {
                    Ok(local) if local == body => continue,
                    Ok(_) => {
                        tracing::warn!(file = %path.display(), "replaced by the copy every replica shares (from the store)")
                    }
                    Err(_) => {}
                }
                write_private(&path, &body).map_err(|e| secret(format!("cannot write {}: {e}", path.display())))?;
            }
            // The managed files are exactly the sealed set: one the store does not have (e.g. the next key of
            // a rotation finished elsewhere) goes.
            for name in names(dir) {
                if !files.files.contains_key(&name) {
                    let path = dir.join(&name);
                    tracing::warn!(file = %path.display(), "removed: not in the copy every replica shares");
                    std::fs::remove_file(&path)
                        .map_err(|e| secret(format!("cannot remove {}: {e}", path.display())))?;
                }
            }
            return Ok(true);
        }
        create(dir)?;
        let mut files = BTreeMap::new();
        for name in names(dir) {
            let path = dir.join(&name);
            let body = std::fs::read(&path).map_err(|e| secret(format!("cannot read {}: {e}", path.display())))?;
            files.insert(name, base64::engine::general_purpose::STANDARD.encode(body));
        }
        let plain = serde_json::to_vec(&SealedFiles { files }).map_err(|e| secret(e.to_string()))?;
        let sealed = kek
            .try_seal(&plain, key)
            .map_err(|e| secret(format!("cannot seal {what}: {e}")))?;
        if store.txn(Txn::new().if_absent(key.to_vec()).put(key.to_vec(), sealed))? {
            tracing::info!(secret = %what, kek = %kek.id(), "sealed into the store for the other replicas");
            return Ok(false);
        }
        // Another replica sealed its copy first: take that one.
    }
    Err(secret(format!("{what}: the store kept changing; restart this replica")))
}

/// Seals the files `names` of `dir` into the store at `key`, replacing what is there.
pub fn seal_files(store: &dyn Store, kek: &Kek, key: &[u8], dir: &Path, names: &[String]) -> Result<(), ReplicaError> {
    let mut files = BTreeMap::new();
    for name in names {
        let path = dir.join(name);
        let body =
            std::fs::read(&path).map_err(|e| ReplicaError::Secret(format!("cannot read {}: {e}", path.display())))?;
        files.insert(name.clone(), base64::engine::general_purpose::STANDARD.encode(body));
    }
    let plain = serde_json::to_vec(&SealedFiles { files }).map_err(|e| ReplicaError::Secret(e.to_string()))?;
    let sealed = kek
        .try_seal(&plain, key)
        .map_err(|e| ReplicaError::Secret(format!("cannot seal {}: {e}", String::from_utf8_lossy(key))))?;
    store.txn(Txn::new().put(key.to_vec(), sealed))?;
    Ok(())
}

/// After `InstallReleaseRepository` on etcd: the new online keys sealed into the store, so every replica (and
/// a replica restarted with an empty data dir) signs with them. Failures are logged: the install itself stands.
pub async fn seal_release_keys(ctx: &Ctx, dir: &Path) {
    let (Some(_), Some(kek)) = (&ctx.replicas, &ctx.kek) else {
        return;
    };
    let (kek, dir, state) = (Arc::clone(kek), dir.to_path_buf(), Arc::clone(&ctx.state));
    let sealed = tokio::task::spawn_blocking(move || {
        seal_files(state.store(), &kek, SECRET_RELEASE_KEYS, &dir, &regular_files(&dir))
    })
    .await;
    match sealed {
        Ok(Ok(())) => tracing::info!("release online keys sealed into the store for every replica"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "release online keys not sealed into the store; other replicas keep the old ones")
        }
        Err(e) => tracing::error!(error = %e, "sealing the release keys failed"),
    }
}

/// At start on etcd: the release online keys from the store into `dir` when the store has them; otherwise this
/// replica's own keys (if any) are sealed for the others.
pub fn share_release_keys(store: &dyn Store, kek: &Kek, dir: &Path) -> Result<(), ReplicaError> {
    let secret = |e: std::io::Error| ReplicaError::Secret(format!("{}: {e}", dir.display()));
    if store.get(SECRET_RELEASE_KEYS)?.is_some() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(secret)?;
    } else if regular_files(dir).is_empty() {
        return Ok(());
    }
    share_files(store, kek, SECRET_RELEASE_KEYS, dir, &regular_files, &|_| Ok(()))?;
    Ok(())
}

fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("shared-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The files of a replica's WireGuard secret set present in `dir`: the key, and during a rotation the next key and
/// the rotation record.
pub fn wireguard_files(dir: &Path) -> Vec<String> {
    [
        "wg.key",
        crate::rotation::NEXT_WG_KEY,
        crate::rotation::WG_ROTATION_FILE,
    ]
    .iter()
    .filter(|n| dir.join(n).is_file())
    .map(|n| n.to_string())
    .collect()
}

/// After a WireGuard key rotation step on this replica: its key files sealed into the store again and its
/// registry entry carrying the key agents must use (the new one from the start of the overlap).
pub fn rotated_wireguard(ctx: &Ctx) -> Result<(), ReplicaError> {
    let (Some(m), Some(kek)) = (&ctx.replicas, &ctx.kek) else {
        return Ok(());
    };
    let dir = &ctx.config.data_dir;
    seal_files(
        ctx.state.store(),
        kek,
        &secret_wg_key(&m.id()),
        dir,
        &wireguard_files(dir),
    )?;
    m.set_public_key(&tunnel::keys::public_key_to_base64(&ctx.tunnel.public_key()))
}

/// The regular files of `dir` (not hidden): the CA directory's contents.
pub fn regular_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    out
}

/// This replica's membership: its lease and registry entry, the fleet-wide views it polls, and delivery of
/// messages to nodes streaming to another replica.
pub struct Membership {
    store: Arc<EtcdStore>,
    me: Mutex<ReplicaRecord>,
    lease: AtomicI64,
    all: watch::Sender<Vec<ReplicaRecord>>,
    /// node id → replica id holding its stream (every replica's, this one's included).
    holders: Mutex<HashMap<String, String>>,
    /// This replica's session keys: node id → `<replica>/<stream>` (put again when the lease is renewed anew).
    mine: Mutex<HashMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Membership {
    /// Registers `me` (a new lease; the record's `lease` is filled in) and reads the registry.
    pub fn register(store: Arc<EtcdStore>, mut me: ReplicaRecord) -> Result<Arc<Membership>, ReplicaError> {
        let lease = store.grant_lease(LEASE_TTL)?;
        me.lease = lease;
        store.put_leased(&registry_key(&me.id), encode(&me), lease)?;
        let m = Arc::new(Membership {
            store,
            me: Mutex::new(me),
            lease: AtomicI64::new(lease),
            all: watch::channel(Vec::new()).0,
            holders: Mutex::new(HashMap::new()),
            mine: Mutex::new(HashMap::new()),
        });
        m.refresh_registry()?;
        Ok(m)
    }

    pub fn id(&self) -> String {
        lock(&self.me).id.clone()
    }

    /// Every live replica, this one included, by id.
    pub fn all(&self) -> Vec<ReplicaRecord> {
        self.all.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Vec<ReplicaRecord>> {
        self.all.subscribe()
    }

    /// The `Replicas` message agents get.
    pub fn message(&self) -> CoordinatorMessage {
        CoordinatorMessage {
            msg: Some(CoordMsg::Replicas(nimbus_proto::Replicas {
                replicas: self.all().iter().map(ReplicaRecord::message).collect(),
            })),
        }
    }

    /// Whether some replica holds `node`'s stream (as of the last poll).
    pub fn holder(&self, node: &str) -> Option<String> {
        lock(&self.holders).get(node).cloned()
    }

    fn refresh_registry(&self) -> Result<bool, ReplicaError> {
        let mut list: Vec<ReplicaRecord> = self
            .store
            .scan_prefix(REGISTRY)?
            .into_iter()
            .filter_map(|(k, v)| match serde_json::from_slice::<ReplicaRecord>(&v) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "unreadable replica entry ignored");
                    None
                }
            })
            .collect();
        let me = lock(&self.me).clone();
        if !list.iter().any(|r| r.id == me.id) {
            list.push(me);
        }
        list.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(self.all.send_if_modified(|old| {
            if *old == list {
                false
            } else {
                *old = list;
                true
            }
        }))
    }

    /// Renews the lease; when etcd lost it (an etcd outage longer than the TTL), takes a new one and puts the
    /// registry entry and every local session again.
    fn keep_lease(&self) -> Result<(), ReplicaError> {
        let lease = self.lease.load(Ordering::Relaxed);
        if self.store.renew_lease(lease)? {
            return Ok(());
        }
        let lease = self.store.grant_lease(LEASE_TTL)?;
        let me = {
            let mut me = lock(&self.me);
            me.lease = lease;
            me.clone()
        };
        self.store.put_leased(&registry_key(&me.id), encode(&me), lease)?;
        let mine: Vec<(String, String)> = lock(&self.mine).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // Only where no other replica took the node meanwhile (its streams here may have died while this
        // replica was paused or cut off; the ones still open are put again).
        for (node, value) in &mine {
            self.store
                .put_leased_if_absent(&session_key(node), value.clone().into_bytes(), lease)?;
        }
        self.lease.store(lease, Ordering::Relaxed);
        tracing::warn!(
            replica = %me.id,
            sessions = mine.len(),
            "this replica's etcd lease had expired (etcd unreachable for longer than its TTL); registered again"
        );
        Ok(())
    }

    /// Records that this replica holds `node`'s stream number `stream` (`<replica>/<stream>` in the store, so
    /// the end of an older stream never removes a newer one's key).
    pub fn session_opened(&self, node: &str, stream: u64) -> Result<(), ReplicaError> {
        let id = self.id();
        let value = format!("{id}/{stream}");
        lock(&self.mine).insert(node.to_string(), value.clone());
        self.store.put_leased(
            &session_key(node),
            value.into_bytes(),
            self.lease.load(Ordering::Relaxed),
        )?;
        lock(&self.holders).insert(node.to_string(), id);
        Ok(())
    }

    /// Removes the session key of stream `stream` if it is still the recorded one (a newer stream, here or on
    /// another replica, keeps its own).
    pub fn session_closed(&self, node: &str, stream: u64) -> Result<(), ReplicaError> {
        let id = self.id();
        let value = format!("{id}/{stream}");
        {
            let mut mine = lock(&self.mine);
            if mine.get(node) == Some(&value) {
                mine.remove(node);
            }
        }
        if self
            .store
            .txn(Txn::new().if_equals(session_key(node), value).delete(session_key(node)))?
        {
            let mut h = lock(&self.holders);
            if h.get(node) == Some(&id) {
                h.remove(node);
            }
        }
        Ok(())
    }

    fn refresh_holders(&self) -> Result<(), ReplicaError> {
        let map: HashMap<String, String> = self
            .store
            .scan_prefix(SESSIONS)?
            .into_iter()
            .filter_map(|(k, v)| {
                let node = String::from_utf8(k.get(SESSIONS.len()..)?.to_vec()).ok()?;
                let value = String::from_utf8(v).ok()?;
                let replica = value.split_once('/').map_or(value.as_str(), |(r, _)| r);
                Some((node, replica.to_string()))
            })
            .collect();
        *lock(&self.holders) = map;
        Ok(())
    }

    /// Writes `msg` into the mailbox of replica `holder` for `node` (bound to the holder's lease).
    pub fn post(&self, holder: &str, node: &str, msg: &CoordinatorMessage) -> Result<(), ReplicaError> {
        let lease = self
            .all()
            .iter()
            .find(|r| r.id == holder)
            .map(|r| r.lease)
            .ok_or_else(|| ReplicaError::Secret(format!("replica {holder} is not registered")))?;
        let key = [
            mailbox(holder),
            format!("{node}/{:016x}", rand::random::<u64>()).into_bytes(),
        ]
        .concat();
        self.store.put_leased(&key, msg.encode_to_vec(), lease)?;
        Ok(())
    }

    /// This replica's mail: (node, message) pairs, each deleted from the store once read.
    fn take_mail(&self) -> Result<Vec<(String, CoordinatorMessage)>, ReplicaError> {
        let prefix = mailbox(&self.id());
        let mut out = Vec::new();
        for (k, v) in self.store.scan_prefix(&prefix)?.into_iter().take(MAIL_BATCH) {
            self.store.txn(Txn::new().delete(k.clone()))?;
            let rest = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let Some((node, _)) = rest.split_once('/') else {
                continue;
            };
            match CoordinatorMessage::decode(v.as_slice()) {
                Ok(m) => out.push((node.to_string(), m)),
                Err(e) => tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "unreadable mail dropped"),
            }
        }
        Ok(out)
    }

    /// This replica's WireGuard public key changed (a rotation): the registry entry is put again, and every
    /// agent learns it with the next `Replicas` message.
    pub fn set_public_key(&self, key: &str) -> Result<(), ReplicaError> {
        let me = {
            let mut me = lock(&self.me);
            if me.wg_public_key == key {
                return Ok(());
            }
            me.wg_public_key = key.to_string();
            me.clone()
        };
        self.store
            .put_leased(&registry_key(&me.id), encode(&me), self.lease.load(Ordering::Relaxed))?;
        self.refresh_registry()?;
        Ok(())
    }

    /// Puts `key` bound to this replica's lease (gone when the replica is).
    pub fn put_leased(&self, key: &[u8], value: Vec<u8>) -> Result<(), ReplicaError> {
        Ok(self.store.put_leased(key, value, self.lease.load(Ordering::Relaxed))?)
    }

    /// The etcd store the replicas share.
    pub fn store(&self) -> &EtcdStore {
        &self.store
    }

    /// Leaves the registry at shutdown: revokes the lease (entry, session keys and mail go at once).
    pub fn leave(&self) {
        if let Err(e) = self.store.revoke_lease(self.lease.load(Ordering::Relaxed)) {
            tracing::warn!(error = %e, "replica lease not revoked; its entries expire within the TTL");
        }
    }
}

fn encode(r: &ReplicaRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

/// Adds a WireGuard peer for every active node this replica does not have yet and removes peers of nodes
/// that are no longer active. `known` is the set of node keys this replica has as peers.
pub fn sync_peers(ctx: &Ctx, nodes: &[crate::state::NodeRecord], known: &mut HashSet<String>) -> (usize, usize) {
    let active: HashMap<&str, &crate::state::NodeRecord> = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Active)
        .map(|n| (n.public_key.as_str(), n))
        .collect();
    let (mut added, mut removed) = (0, 0);
    for (key, n) in &active {
        if known.contains(*key) {
            continue;
        }
        let Some(k) = key_from_id(key) else { continue };
        match ctx.tunnel.add_peer(crate::enroll::peer_for(n, k)) {
            Ok(()) => {
                known.insert((*key).to_string());
                added += 1;
            }
            Err(e) => tracing::error!(node = %n.name, error = %e, "cannot add WireGuard peer"),
        }
    }
    let gone: Vec<String> = known
        .iter()
        .filter(|k| !active.contains_key(k.as_str()))
        .cloned()
        .collect();
    for key in gone {
        if let Some(k) = key_from_id(&key) {
            ctx.tunnel.remove_peer(&k);
        }
        known.remove(&key);
        removed += 1;
    }
    (added, removed)
}

/// The replica's background work until shutdown: lease, registry (pushing a changed list to local agents),
/// sessions view, mail, and peers for every active node.
pub async fn run(ctx: Arc<Ctx>, m: Arc<Membership>, mut known: HashSet<String>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renew = Instant::now();
    let (mut nodes_fp, mut sessions_fp) = ((-1, -1), (-1, -1));
    let mut failing_since: Option<Instant> = None;
    let members_fp = Arc::new(Mutex::new((-1i64, -1i64)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        // Lease: renewed every third of its TTL.
        if last_renew.elapsed() >= LEASE_TTL / 3 {
            let m2 = Arc::clone(&m);
            match tokio::task::spawn_blocking(move || m2.keep_lease()).await {
                Ok(Ok(())) => last_renew = Instant::now(),
                Ok(Err(e)) => tracing::warn!(error = %e, "replica lease not renewed; retrying"),
                Err(e) => tracing::error!(error = %e, "replica lease task failed"),
            }
        }
        let (m2, c2, members_fp) = (Arc::clone(&m), Arc::clone(&ctx), Arc::clone(&members_fp));
        let polled = tokio::task::spawn_blocking(move || -> Result<_, ReplicaError> {
            let changed = m2.refresh_registry()?;
            let sfp = m2.store.fingerprint(SESSIONS)?;
            let nfp = m2.store.fingerprint(b"nodes/")?;
            let pfp = m2.store.fingerprint(crate::probeshare::MEMBERS)?;
            if pfp != *lock(&members_fp) {
                let remote = crate::probeshare::read_members(&m2, &c2.probes.local_ids())?;
                c2.probes.set_remote(remote);
                *lock(&members_fp) = pfp;
            }
            if let Some(kek) = &c2.kek {
                crate::probeshare::sync_key(m2.store(), kek, &c2.probes)?;
            }
            let mail = m2.take_mail()?;
            Ok((changed, sfp, nfp, mail))
        })
        .await;
        let (registry_changed, sfp, nfp, mail) = match polled {
            Ok(Ok(p)) if failing_since.is_some() => {
                let down = failing_since.take().map(|t| t.elapsed()).unwrap_or_default();
                tracing::info!(after = ?down, "replica poll works again");
                p
            }
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                // Once per outage at warn; the rest at debug (it is retried every second).
                if failing_since.is_none() {
                    tracing::warn!(error = %e, "replica poll failed (etcd unreachable?); retrying every second");
                    failing_since = Some(Instant::now());
                } else {
                    tracing::debug!(error = %e, "replica poll failed again");
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "replica poll task failed");
                continue;
            }
        };
        if registry_changed {
            let ids: Vec<String> = m.all().iter().map(|r| r.id.clone()).collect();
            tracing::info!(replicas = ?ids, "replica set changed; telling the agents");
            ctx.sessions.broadcast(&m.message());
        }
        if sfp != sessions_fp {
            let m2 = Arc::clone(&m);
            if let Ok(Ok(())) = tokio::task::spawn_blocking(move || m2.refresh_holders()).await {
                sessions_fp = sfp;
            }
        }
        for (node, mut msg) in mail {
            let revoked = matches!(msg.msg, Some(CoordMsg::Revoked(_)));
            // The agent fetches releases from the replica it streams to (this one), not from the sender.
            if let Some(CoordMsg::DesiredState(d)) = &mut msg.msg
                && let Some(a) = &mut d.agent
            {
                let url = crate::releases::url(&ctx);
                a.metadata_url = crate::releases::metadata_url(&url);
                a.targets_url = crate::releases::targets_url(&url);
            }
            let delivered = ctx.sessions.send(&node, msg);
            tracing::debug!(node_id = %node, delivered, "mail from another replica");
            if revoked && delivered {
                // As the revoking replica does with its own streams: a moment to read it, then the stream ends.
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    tokio::time::sleep(crate::admin::REVOKE_GRACE).await;
                    ctx.sessions.kick(&node);
                });
            }
        }
        if nfp != nodes_fp {
            match ctx.state(|s| s.list_nodes()).await {
                Ok(nodes) => {
                    let (added, removed) = sync_peers(&ctx, &nodes, &mut known);
                    if added + removed > 0 {
                        tracing::info!(added, removed, "WireGuard peers follow the fleet's node list");
                    }
                    nodes_fp = nfp;
                }
                Err(e) => tracing::warn!(error = %e.message(), "node list not read; retrying"),
            }
        }
    }
    let m2 = Arc::clone(&m);
    let _ = tokio::task::spawn_blocking(move || m2.leave()).await;
}

/// Delivers `msg` to `node`: down its stream when this replica holds it, else into the mail of the replica
/// that does. False when no replica holds a stream of the node.
pub fn deliver(ctx: &Ctx, node: &str, msg: CoordinatorMessage) -> bool {
    if ctx.sessions.is_connected(node) {
        return ctx.sessions.send(node, msg);
    }
    let Some(m) = ctx.replicas.as_ref() else { return false };
    let Some(holder) = m.holder(node).filter(|h| *h != m.id()) else {
        return false;
    };
    let (m, node) = (Arc::clone(m), node.to_string());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = m.post(&holder, &node, &msg) {
            tracing::warn!(node_id = %node, replica = %holder, error = %e, "message for another replica's agent not posted");
        }
    });
    true
}

/// The replicas as the admin API lists them (a single coordinator is one replica).
pub fn list(ctx: &Ctx) -> nimbus_proto::ListReplicasResponse {
    let leader = match ctx.leadership.role() {
        crate::leader::Role::Leader { .. } => Some(ctx.leadership.id().to_string()),
        crate::leader::Role::Follower { leader } => leader,
    };
    let replicas = match &ctx.replicas {
        None => vec![nimbus_proto::ReplicaInfo {
            id: ctx.leadership.id().to_string(),
            overlay_ip: ctx.coordinator_ip.to_string(),
            wg_endpoint: ctx.config.wg_endpoint(),
            enroll_endpoint: ctx.config.enroll_endpoint(),
            leader: true,
            this: true,
            agents: ctx.sessions.connected_count() as u64,
        }],
        Some(m) => {
            let me = m.id();
            let mut held: HashMap<String, u64> = HashMap::new();
            for holder in lock(&m.holders).values() {
                *held.entry(holder.clone()).or_default() += 1;
            }
            m.all()
                .into_iter()
                .map(|r| nimbus_proto::ReplicaInfo {
                    leader: leader.as_deref() == Some(r.id.as_str()),
                    this: r.id == me,
                    agents: held.get(&r.id).copied().unwrap_or(0),
                    overlay_ip: r.overlay_ip.to_string(),
                    wg_endpoint: r.wg_endpoint,
                    enroll_endpoint: r.enroll_endpoint,
                    id: r.id,
                })
                .collect()
        }
    };
    nimbus_proto::ListReplicasResponse {
        replicas,
        leader: leader.unwrap_or_default(),
    }
}

/// Whether `node` has a fleet stream on any replica.
pub fn connected(ctx: &Ctx, node: &str) -> bool {
    ctx.sessions.is_connected(node) || ctx.replicas.as_ref().is_some_and(|m| m.holder(node).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::OverlayPlan;
    use crate::store::SledStore;

    fn state(dir: &Path) -> State {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("state")).unwrap());
        State::open(store, OverlayPlan::new("100.96.0.0/24".parse().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn replicas_get_distinct_stable_overlay_addresses_the_first_one_the_single_coordinators() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let a = overlay_ip(&s, "a").unwrap();
        let b = overlay_ip(&s, "b").unwrap();
        assert_eq!(
            a,
            Ipv4Addr::new(100, 96, 0, 1),
            "the first replica keeps the single coordinator's address"
        );
        assert_ne!(a, b);
        assert_eq!(overlay_ip(&s, "a").unwrap(), a, "stable across restarts");
        assert_eq!(overlay_ip(&s, "b").unwrap(), b);
        // Nodes never get a replica's address.
        let taken = s.store().get(&keys::ip(b)).unwrap().unwrap();
        assert_eq!(taken, b"replica:b");
        assert_ne!(s.next_free_ip().unwrap(), b);
    }

    fn two_files(_: &Path) -> Vec<String> {
        vec!["one".into(), "two".into()]
    }

    #[test]
    fn secrets_are_sealed_once_and_restored_on_every_other_replica() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let kek = Kek::from_bytes(&[7; 32]);
        let (first, second) = (dir.path().join("r1"), dir.path().join("r2"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        let create = |d: &Path| -> Result<(), ReplicaError> {
            std::fs::write(d.join("one"), format!("secret of {}", d.display())).unwrap();
            std::fs::write(d.join("two"), b"2").unwrap();
            Ok(())
        };
        let restored = share_files(s.store(), &kek, SECRET_CA, &first, &two_files, &create).unwrap();
        assert!(!restored, "the first replica seals its own");
        let sealed = s.store().get(SECRET_CA).unwrap().unwrap();
        assert!(
            !sealed.windows(9).any(|w| w == b"secret of"),
            "the store alone does not reveal the secret"
        );
        let never = |_: &Path| -> Result<(), ReplicaError> { panic!("the second replica must not create its own") };
        assert!(share_files(s.store(), &kek, SECRET_CA, &second, &two_files, &never).unwrap());
        assert_eq!(
            std::fs::read(second.join("one")).unwrap(),
            std::fs::read(first.join("one")).unwrap()
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(second.join("one")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A different local copy is replaced by the shared one.
        std::fs::write(second.join("two"), b"other").unwrap();
        share_files(s.store(), &kek, SECRET_CA, &second, &two_files, &never).unwrap();
        assert_eq!(std::fs::read(second.join("two")).unwrap(), b"2");
        // Another KEK cannot open it, and says what to do.
        let other = Kek::from_bytes(&[8; 32]);
        let e = share_files(s.store(), &other, SECRET_CA, &second, &two_files, &never).unwrap_err();
        assert!(e.to_string().contains("same KEK"), "{e}");
        // Sealed for one key, not usable under another (the key is authenticated data).
        s.store().txn(Txn::new().put(secret_wg_key("x"), sealed)).unwrap();
        let e = share_files(s.store(), &kek, &secret_wg_key("x"), &second, &two_files, &never).unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }

    #[test]
    fn release_keys_follow_the_store_after_an_install_on_any_replica() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let kek = Kek::from_bytes(&[7; 32]);
        let (a, b) = (dir.path().join("a/keys"), dir.path().join("b/keys"));
        // No keys anywhere: nothing is created or sealed.
        share_release_keys(s.store(), &kek, &b).unwrap();
        assert!(!b.exists() && s.store().get(SECRET_RELEASE_KEYS).unwrap().is_none());
        // Replica a installs a repository: its keys are sealed; b restores them at its start.
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("targets.key"), b"k1").unwrap();
        seal_files(s.store(), &kek, SECRET_RELEASE_KEYS, &a, &regular_files(&a)).unwrap();
        share_release_keys(s.store(), &kek, &b).unwrap();
        assert_eq!(std::fs::read(b.join("targets.key")).unwrap(), b"k1");
        // A later install replaces them.
        std::fs::write(a.join("targets.key"), b"k2").unwrap();
        seal_files(s.store(), &kek, SECRET_RELEASE_KEYS, &a, &regular_files(&a)).unwrap();
        share_release_keys(s.store(), &kek, &b).unwrap();
        assert_eq!(std::fs::read(b.join("targets.key")).unwrap(), b"k2");
    }

    #[test]
    fn a_sealed_file_set_cannot_write_outside_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let kek = Kek::from_bytes(&[7; 32]);
        let mut files = BTreeMap::new();
        files.insert(
            "../escape".to_string(),
            base64::engine::general_purpose::STANDARD.encode(b"x"),
        );
        let plain = serde_json::to_vec(&SealedFiles { files }).unwrap();
        let sealed = kek.try_seal(&plain, SECRET_CA).unwrap();
        s.store().txn(Txn::new().put(SECRET_CA.to_vec(), sealed)).unwrap();
        let never = |_: &Path| -> Result<(), ReplicaError> { unreachable!() };
        let e = share_files(s.store(), &kek, SECRET_CA, dir.path(), &two_files, &never).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert!(!dir.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn a_fenced_store_of_a_single_coordinator_writes_through() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("f")).unwrap());
        let fenced =
            crate::leader::FencedStore::new(Arc::clone(&inner), Arc::new(crate::leader::Leadership::single("only")));
        assert!(fenced.txn(Txn::new().put(b"k".to_vec(), b"v".to_vec())).unwrap());
        assert_eq!(inner.get(b"k").unwrap().unwrap(), b"v");
        assert!(
            !fenced
                .txn(Txn::new().if_absent(b"k".to_vec()).put(b"k".to_vec(), b"w".to_vec()))
                .unwrap()
        );
    }
}
