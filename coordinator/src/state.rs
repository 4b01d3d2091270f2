//! Typed repository over [`Store`]: join tokens, nodes, overlay addresses.
//!
//! Every write is a compare-and-swap [`Txn`] built from values read just before; when a concurrent writer
//! got there first the operation re-reads and retries (at most [`MAX_TXN_ATTEMPTS`] times, then
//! [`StateError::Conflict`]). The key layout is documented in [`crate::store`].
//!
//! Invariants kept by this module:
//! * `node-by-key/<key>` exists only for active nodes; revoking a node moves its key to `revoked-keys/`.
//! * `ip/<addr>` and `node-by-name/<name>` exist for every node record, revoked or not, until
//!   [`State::delete_node`].
//! * A join token's `uses_left` drops by one exactly when a new node record is written with it.
//! * Bad JSON in the store is reported as [`StateError::Corrupt`], never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ipam::{IpamError, OverlayPlan};
use crate::store::{Store, StoreError, Txn, keys};
use crate::token::{self, JoinToken, TokenError};

/// How many times a compare-and-swap update is retried before [`StateError::Conflict`].
pub const MAX_TXN_ATTEMPTS: usize = 32;
/// Longest pause between two attempts of a conflicted compare-and-swap update.
const MAX_CONFLICT_PAUSE_MS: u64 = 50;

/// The attempts of a compare-and-swap update: [`MAX_TXN_ATTEMPTS`] of them, each after the first preceded by a
/// short random pause that grows with the attempt (at most 50 ms), so threads or replicas that collided do not
/// collide again in lockstep. On etcd, where a round trip takes a millisecond, contenders retrying at once
/// starved one another (8 concurrent enrollments on one token ran out of attempts; benches/store_enroll.rs).
pub fn attempts() -> impl Iterator<Item = usize> {
    (0..MAX_TXN_ATTEMPTS).inspect(|&attempt| {
        if attempt > 0 {
            let cap = (1u64 << attempt.min(6)).min(MAX_CONFLICT_PAUSE_MS);
            std::thread::sleep(std::time::Duration::from_millis(rand::random::<u64>() % (cap + 1)));
        }
    })
}
/// Longest node name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest accepted hostname or requested name (a DNS name).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest accepted machine id (`/etc/machine-id` is 32 hex characters).
pub const MAX_MACHINE_ID_LEN: usize = 64;
/// Longest accepted agent version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Longest accepted kernel / os-release string in an inventory.
pub const MAX_INVENTORY_TEXT_LEN: usize = 256;
/// Longest accepted free text (token description, revoke reason, label value).
pub const MAX_TEXT_LEN: usize = 1024;
/// Most labels on one token.
pub const MAX_LABELS: usize = 64;

/// Errors of the state layer. Each message says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    TokenMalformed(#[from] TokenError),
    #[error(
        "join token not recognised: check it was copied completely, or create a new one with `nimbusctl token create`"
    )]
    TokenInvalid,
    #[error("join token expired at {}; create a new one with `nimbusctl token create`", fmt_unix(*expired_at))]
    TokenExpired { expired_at: u64 },
    #[error("join token has no uses left; create a new one with `nimbusctl token create`")]
    TokenUsedUp,
    #[error("join token was revoked; create a new one with `nimbusctl token create`")]
    TokenRevoked,
    #[error(
        "this join token is bound to MAC address {mac}, which this host does not have; use the token made for \
         this host, or create one with `nimbusctl token create --bind-mac <its MAC>`"
    )]
    TokenMacMismatch { mac: String },
    #[error(
        "this WireGuard public key belongs to a revoked node; give the agent a new key (remove its key file) \
         and enroll again"
    )]
    KeyRevoked,
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("{what} {name:?} not found; check the name against the list of {what}s")]
    NotFound { what: &'static str, name: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("state update kept conflicting with concurrent changes ({MAX_TXN_ATTEMPTS} attempts); retry the request")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored record {key} is corrupt: {reason}; restore the data directory from a backup")]
    Corrupt { key: String, reason: String },
    #[error(
        "the state store has schema {found}, written by a newer nimbus-coordinator; this one understands schemas up \
         to {supported} and will not touch it: run the newer coordinator (or restore a backup taken before it ran)"
    )]
    UnsupportedSchema { found: String, supported: u32 },
}

/// Lifecycle of a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Active,
    Revoked,
    /// Enrolled with a token that requires acceptance; not a WireGuard peer until `accept_node`.
    Pending,
}

/// What an agent reports about its machine.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct InventoryRecord {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel: String,
    pub os_release: String,
}

/// A node, stored at `nodes/<id>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// `n` + 12 × `[a-z0-9]`.
    pub id: String,
    /// Unique, `[a-z0-9-]`, at most 63 characters.
    pub name: String,
    /// WireGuard public key, canonical base64url without padding.
    pub public_key: String,
    pub overlay_ip: Ipv4Addr,
    pub hostname: String,
    pub machine_id: String,
    pub agent_version: String,
    /// Inherited from the join token.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub enrolled_at: u64,
    pub token_id: String,
    pub status: NodeStatus,
    #[serde(default)]
    pub revoked_at: Option<u64>,
    #[serde(default)]
    pub revoke_reason: Option<String>,
    #[serde(default)]
    pub inventory: Option<InventoryRecord>,
    /// Unix seconds, as persisted by [`State::persist_last_seen`].
    #[serde(default)]
    pub last_seen: Option<u64>,
}

/// Most inventory changes kept per node (newest first).
pub const MAX_INVENTORY_HISTORY: usize = 32;

/// One change of a node's inventory: when, and which fields (see `inventory::changed_fields`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InventoryChange {
    /// Unix seconds.
    pub at: u64,
    pub changes: Vec<String>,
}

/// A node's full inventory, stored at `inventory/<node id>` (apart from the node record, so listing nodes
/// stays cheap), with a bounded history of what changed.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct HardwareRecord {
    pub document: inventory::Inventory,
    /// Unix seconds of the last stored change.
    pub updated_at: u64,
    #[serde(default)]
    pub history: Vec<InventoryChange>,
}

/// A join token, stored at `tokens/<id>`. Holds only the hash of the secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the token is expired from this second on.
    pub expires_at: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub revoked: bool,
    /// Only a host with this MAC (lowercase, colon form) may enroll with the token.
    #[serde(default)]
    pub bind_mac: Option<String>,
    /// Enrollments wait in [`NodeStatus::Pending`] until an operator accepts them.
    #[serde(default)]
    pub require_acceptance: bool,
}

/// Restrictions on a join token beyond its TTL and uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenBinding {
    /// Bind to this MAC (any common spelling; stored lowercase with colons). Implies a single use.
    pub mac: Option<String>,
    /// Enrollments wait for `accept_node`.
    pub require_acceptance: bool,
}

/// `aa:bb:cc:dd:ee:ff` from `AA-BB-CC-DD-EE-FF`, `aabb.ccdd.eeff` or `aa:bb:…`; `None` if it is not a MAC.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let lower = hex.to_ascii_lowercase();
    let pairs: Vec<&str> = (0..6).map(|i| &lower[i * 2..i * 2 + 2]).collect();
    Some(pairs.join(":"))
}

/// What an agent sends to enroll. Every field is untrusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollInput {
    /// WireGuard public key, base64url (standard base64 and padding are accepted too).
    pub public_key_b64url: String,
    pub hostname: String,
    pub machine_id: String,
    pub agent_version: String,
    /// Preferred node name; empty means "use the hostname".
    pub requested_name: String,
    /// The host's NIC MACs, as the agent claims them (checked only against a MAC-bound token).
    pub macs: Vec<String>,
}

/// The coordinator's typed state.
#[derive(Clone)]
pub struct State {
    store: Arc<dyn Store>,
    overlay: OverlayPlan,
    /// Where the next overlay address search starts (just after the last one handed out). `None` until the
    /// first enrollment, which finds the lowest free address with one scan; later ones probe from here, so an
    /// enrollment costs O(1) reads instead of a scan of every allocation (quadratic at 10 000 nodes:
    /// benches/store_enroll.rs). Addresses freed below it are reused when the search wraps around.
    ip_hint: Arc<std::sync::Mutex<Option<Ipv4Addr>>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("overlay", &self.overlay)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Wraps `store` without touching it. Prefer [`State::open`], which also checks the schema.
    pub fn new(store: Arc<dyn Store>, overlay: OverlayPlan) -> Self {
        State {
            store,
            overlay,
            ip_hint: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Wraps `store`, bringing its layout to the current schema first (written into a fresh store, migrated
    /// forward from an older one, refused when newer: [`crate::schema`]).
    /// Logs a warning when allocated addresses fall outside `overlay` (the CIDR was changed).
    pub fn open(store: Arc<dyn Store>, overlay: OverlayPlan) -> Result<Self, StateError> {
        let state = State::new(store, overlay);
        if crate::schema::ensure_current(state.store.as_ref())?.is_some() {
            state.warn_outside_overlay()?;
        }
        Ok(state)
    }

    /// The store (for the typed repositories in sibling modules, e.g. `crate::placement`).
    pub(crate) fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// A JSON record and its raw bytes (for compare-and-swap).
    pub(crate) fn read_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<(T, Vec<u8>)>, StateError> {
        self.get_json(key)
    }

    /// The overlay plan addresses are allocated from.
    pub fn overlay(&self) -> &OverlayPlan {
        &self.overlay
    }

    // ---- tokens ----

    /// Creates a join token valid for `ttl` (at least 1 s) and `uses` enrollments (at least 1). The returned
    /// [`JoinToken`] is the only copy of the secret.
    pub fn create_token(
        &self,
        ttl: Duration,
        uses: u32,
        labels: BTreeMap<String, String>,
        description: String,
        now: SystemTime,
    ) -> Result<(JoinToken, TokenRecord), StateError> {
        self.create_bound_token(ttl, uses, labels, description, TokenBinding::default(), now)
    }

    /// [`State::create_token`] with a MAC binding and/or required acceptance.
    pub fn create_bound_token(
        &self,
        ttl: Duration,
        uses: u32,
        labels: BTreeMap<String, String>,
        description: String,
        binding: TokenBinding,
        now: SystemTime,
    ) -> Result<(JoinToken, TokenRecord), StateError> {
        let bind_mac = match &binding.mac {
            Some(m) => Some(normalize_mac(m).ok_or_else(|| {
                invalid(format!(
                    "{m:?} is not a MAC address; write it as aa:bb:cc:dd:ee:ff (the NIC the host boots from)"
                ))
            })?),
            None => None,
        };
        if bind_mac.is_some() && uses != 1 {
            return Err(invalid(format!(
                "a token bound to a MAC address is single-use (one host); got {uses} uses"
            )));
        }
        if uses == 0 {
            return Err(invalid("a join token needs at least 1 use"));
        }
        if ttl.as_secs() == 0 {
            return Err(invalid("a join token's ttl must be at least 1 second"));
        }
        validate_labels(&labels)?;
        check_text("description", &description, MAX_TEXT_LEN)?;
        let created_at = unix(now);
        for _ in attempts() {
            let token = JoinToken::generate();
            let record = TokenRecord {
                id: token.id.clone(),
                secret_hash: token.secret_hash(),
                created_at,
                expires_at: created_at.saturating_add(ttl.as_secs()),
                uses_total: uses,
                uses_left: uses,
                labels: labels.clone(),
                description: description.clone(),
                revoked: false,
                bind_mac: bind_mac.clone(),
                require_acceptance: binding.require_acceptance,
            };
            let key = keys::token(&record.id);
            let value = encode(&key, &record)?;
            if self.store.txn(Txn::new().if_absent(key.clone()).put(key, value))? {
                tracing::info!(token_id = %record.id, uses, expires_at = record.expires_at, "join token created");
                return Ok((token, record));
            }
        }
        Err(StateError::Conflict)
    }

    /// Every token, oldest first.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        let mut tokens: Vec<TokenRecord> = self.scan_json(keys::TOKENS)?;
        tokens.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(tokens)
    }

    /// The token record with this id.
    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StateError> {
        Ok(self.get_json::<TokenRecord>(&keys::token(id))?.map(|(t, _)| t))
    }

    /// Marks the token revoked (idempotent). Nodes enrolled with it stay enrolled.
    pub fn revoke_token(&self, id: &str) -> Result<TokenRecord, StateError> {
        let updated = self.update_json::<TokenRecord>(&keys::token(id), |t| {
            let changed = !t.revoked;
            t.revoked = true;
            Ok(changed)
        })?;
        let record = updated.ok_or_else(|| StateError::NotFound {
            what: "token",
            name: id.to_owned(),
        })?;
        tracing::info!(token_id = %record.id, "join token revoked");
        Ok(record)
    }

    // ---- enrollment ----

    /// Enrolls a node with a join token, in one compare-and-swap transaction (retried on conflict).
    ///
    /// Order of checks: token syntax ([`StateError::TokenMalformed`]), input ([`StateError::InvalidArgument`]),
    /// token id and secret ([`StateError::TokenInvalid`]), revoked key ([`StateError::KeyRevoked`]); then, when
    /// the key already belongs to an active node, that node is returned unchanged without consuming a use
    /// (an idempotent retry: if the node was enrolled with this same token, the token's revoked/expired/used-up
    /// state is not checked, so a retry after a single-use token was consumed still succeeds); otherwise the
    /// token must be usable (revoked, then expired, then used up) and a new node is written with the lowest
    /// free overlay address, a fresh id and a unique name.
    pub fn enroll(&self, token: &str, req: EnrollInput, now: SystemTime) -> Result<NodeRecord, StateError> {
        let token = JoinToken::parse(token)?;
        let public_key = canonical_public_key(&req.public_key_b64url)?;
        check_text("hostname", &req.hostname, MAX_HOSTNAME_LEN)?;
        check_text("machine id", &req.machine_id, MAX_MACHINE_ID_LEN)?;
        check_text("agent version", &req.agent_version, MAX_VERSION_LEN)?;
        check_text("requested name", &req.requested_name, MAX_HOSTNAME_LEN)?;
        let base_name = base_name(&req);
        let now_s = unix(now);
        let token_key = keys::token(&token.id);

        for attempt in attempts() {
            let Some((record, raw_token)) = self.get_json::<TokenRecord>(&token_key)? else {
                return Err(StateError::TokenInvalid);
            };
            if !token::verify_secret(&token, &record.secret_hash) {
                tracing::warn!(token_id = %token.id, "enrollment with a wrong join token secret");
                return Err(StateError::TokenInvalid);
            }
            if self.store.get(&keys::revoked_key(&public_key))?.is_some() {
                return Err(StateError::KeyRevoked);
            }
            let by_key = keys::node_by_key(&public_key);
            if let Some(id) = self.get_str(&by_key)? {
                return match self.node(&id)? {
                    Some(node) if node.status != NodeStatus::Revoked => {
                        if node.token_id != record.id {
                            check_token_usable(&record, now_s)?;
                        }
                        tracing::debug!(node = %node.name, "enrollment retry: key already enrolled");
                        Ok(node)
                    }
                    _ => Err(StateError::Corrupt {
                        key: lossy(&by_key),
                        reason: format!("index points to node {id}, which is missing or revoked"),
                    }),
                };
            }
            check_token_usable(&record, now_s)?;
            if let Some(mac) = &record.bind_mac
                && !req.macs.iter().filter_map(|m| normalize_mac(m)).any(|m| &m == mac)
            {
                tracing::warn!(token_id = %record.id, bound = %mac, claimed = ?req.macs, "enrollment from a host without the token's MAC");
                return Err(StateError::TokenMacMismatch { mac: mac.clone() });
            }

            let overlay_ip = self.next_free_ip()?;
            let id = format!("n{}", token::random_alnum(12));
            let name = self.pick_name(&base_name, &id)?;
            let node = NodeRecord {
                id: id.clone(),
                name: name.clone(),
                public_key: public_key.clone(),
                overlay_ip,
                hostname: req.hostname.clone(),
                machine_id: req.machine_id.clone(),
                agent_version: req.agent_version.clone(),
                labels: record.labels.clone(),
                enrolled_at: now_s,
                token_id: record.id.clone(),
                status: if record.require_acceptance {
                    NodeStatus::Pending
                } else {
                    NodeStatus::Active
                },
                revoked_at: None,
                revoke_reason: None,
                inventory: None,
                last_seen: None,
            };
            let mut spent = record.clone();
            spent.uses_left -= 1;
            let node_key = keys::node(&id);
            let txn = Txn::new()
                .if_equals(token_key.clone(), raw_token)
                .if_absent(keys::revoked_key(&public_key))
                .if_absent(by_key.clone())
                .if_absent(keys::node_by_name(&name))
                .if_absent(keys::ip(overlay_ip))
                .if_absent(node_key.clone())
                .put(token_key.clone(), encode(&token_key, &spent)?)
                .put(node_key.clone(), encode(&node_key, &node)?)
                .put(by_key, id.as_bytes())
                .put(keys::node_by_name(&name), id.as_bytes())
                .put(keys::ip(overlay_ip), id.as_bytes());
            if self.store.txn(txn)? {
                *self.ip_hint.lock().unwrap_or_else(|p| p.into_inner()) = Some(overlay_ip);
                tracing::info!(
                    node = %name, node_id = %id, %overlay_ip, token_id = %record.id, uses_left = spent.uses_left,
                    "node enrolled"
                );
                return Ok(node);
            }
            tracing::debug!(attempt, "enrollment transaction conflicted; retrying");
        }
        Err(StateError::Conflict)
    }

    // ---- node lookups ----

    pub fn node(&self, id: &str) -> Result<Option<NodeRecord>, StateError> {
        Ok(self.get_json::<NodeRecord>(&keys::node(id))?.map(|(n, _)| n))
    }

    pub fn node_by_name(&self, name: &str) -> Result<Option<NodeRecord>, StateError> {
        self.resolve(&keys::node_by_name(name))
    }

    /// The active node with this public key (base64url or standard base64). `None` for an unknown,
    /// revoked or malformed key.
    pub fn node_by_key(&self, key_b64url: &str) -> Result<Option<NodeRecord>, StateError> {
        let Ok(key) = canonical_public_key(key_b64url) else {
            return Ok(None);
        };
        self.resolve(&keys::node_by_key(&key))
    }

    /// The node (active or revoked) holding this overlay address.
    pub fn node_by_ip(&self, ip: Ipv4Addr) -> Result<Option<NodeRecord>, StateError> {
        self.resolve(&keys::ip(ip))
    }

    /// Every node, sorted by name.
    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        let mut nodes: Vec<NodeRecord> = self.scan_json(keys::NODES)?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    /// True when a node with this public key was revoked. `false` for a malformed key.
    pub fn is_key_revoked(&self, key_b64url: &str) -> Result<bool, StateError> {
        let Ok(key) = canonical_public_key(key_b64url) else {
            return Ok(false);
        };
        Ok(self.store.get(&keys::revoked_key(&key))?.is_some())
    }

    // ---- node updates ----

    /// Revokes the node named `name`: status, time and reason are recorded, the key is added to
    /// `revoked-keys/` and its `node-by-key/` index removed. The overlay address stays allocated. Revoking a
    /// revoked node returns its record unchanged.
    pub fn revoke_node(&self, name: &str, reason: &str, now: SystemTime) -> Result<NodeRecord, StateError> {
        check_text("revoke reason", reason, MAX_TEXT_LEN)?;
        let node = self.change_node(name, |node, id, txn| {
            if node.status == NodeStatus::Revoked {
                return Ok(None);
            }
            node.status = NodeStatus::Revoked;
            node.revoked_at = Some(unix(now));
            node.revoke_reason = (!reason.is_empty()).then(|| reason.to_owned());
            Ok(Some(
                txn.put(keys::revoked_key(&node.public_key), id.as_bytes())
                    .delete(keys::node_by_key(&node.public_key)),
            ))
        })?;
        tracing::info!(node = %node.name, node_id = %node.id, reason, "node revoked");
        Ok(node)
    }

    /// Reads node `name` and lets `change` edit it: `Ok(None)` leaves the record as it is (returned unchanged),
    /// `Ok(Some(txn))` writes the edited record (plus whatever `change` added to `txn`) in one compare-and-swap
    /// transaction, retried on conflict.
    fn change_node<F>(&self, name: &str, mut change: F) -> Result<NodeRecord, StateError>
    where
        F: FnMut(&mut NodeRecord, &str, Txn) -> Result<Option<Txn>, StateError>,
    {
        let not_found = || StateError::NotFound {
            what: "node",
            name: name.to_owned(),
        };
        for _ in attempts() {
            let id = self.get_str(&keys::node_by_name(name))?.ok_or_else(not_found)?;
            let node_key = keys::node(&id);
            let (mut node, raw) = self.get_json::<NodeRecord>(&node_key)?.ok_or_else(not_found)?;
            let Some(txn) = change(&mut node, &id, Txn::new())? else {
                return Ok(node);
            };
            let txn = txn
                .if_equals(node_key.clone(), raw)
                .put(node_key.clone(), encode(&node_key, &node)?);
            if self.store.txn(txn)? {
                return Ok(node);
            }
        }
        Err(StateError::Conflict)
    }

    /// Admits a pending node (`nimbusctl node accept`): it becomes active (the caller adds its WireGuard peer).
    /// Accepting an active node returns it unchanged; a revoked one is an error.
    pub fn accept_node(&self, name: &str, by: &str) -> Result<NodeRecord, StateError> {
        let mut accepted = false;
        let node = self.change_node(name, |node, _, txn| match node.status {
            NodeStatus::Active => Ok(None),
            NodeStatus::Revoked => Err(invalid(format!(
                "node {name} was revoked and cannot be accepted; enroll the host again with a new token"
            ))),
            NodeStatus::Pending => {
                node.status = NodeStatus::Active;
                accepted = true;
                Ok(Some(txn))
            }
        })?;
        if accepted {
            tracing::warn!(node = %node.name, node_id = %node.id, by, "pending node accepted");
        }
        Ok(node)
    }

    /// Deletes a revoked node, freeing its name and overlay address. Its key stays in `revoked-keys/`.
    /// An active node must be revoked first ([`StateError::InvalidArgument`]).
    pub fn delete_node(&self, name: &str) -> Result<NodeRecord, StateError> {
        let not_found = || StateError::NotFound {
            what: "node",
            name: name.to_owned(),
        };
        for _ in attempts() {
            let name_key = keys::node_by_name(name);
            let id = self.get_str(&name_key)?.ok_or_else(not_found)?;
            let node_key = keys::node(&id);
            let (node, raw) = self.get_json::<NodeRecord>(&node_key)?.ok_or_else(not_found)?;
            if node.status != NodeStatus::Revoked {
                return Err(invalid(format!(
                    "node {name:?} is active; revoke it before deleting it"
                )));
            }
            let mut txn = Txn::new()
                .if_equals(node_key.clone(), raw)
                .if_equals(name_key.clone(), id.as_bytes())
                .delete(node_key)
                .delete(name_key)
                .delete(keys::inventory(&id));
            // Free the address only if it is indexed to this node.
            let ip_key = keys::ip(node.overlay_ip);
            if self.get_str(&ip_key)?.as_deref() == Some(id.as_str()) {
                txn = txn.if_equals(ip_key.clone(), id.as_bytes()).delete(ip_key);
            }
            if self.store.txn(txn)? {
                self.ip_freed(node.overlay_ip);
                tracing::info!(node = %node.name, node_id = %node.id, "node deleted");
                return Ok(node);
            }
        }
        Err(StateError::Conflict)
    }

    /// Stores the agent's inventory and version on node `id`.
    pub fn set_inventory(&self, id: &str, inv: InventoryRecord, agent_version: &str) -> Result<(), StateError> {
        check_text("inventory hostname", &inv.hostname, MAX_HOSTNAME_LEN)?;
        check_text("inventory kernel", &inv.kernel, MAX_INVENTORY_TEXT_LEN)?;
        check_text("inventory os release", &inv.os_release, MAX_INVENTORY_TEXT_LEN)?;
        check_text("agent version", agent_version, MAX_VERSION_LEN)?;
        let updated = self.update_json::<NodeRecord>(&keys::node(id), |node| {
            let changed = node.inventory.as_ref() != Some(&inv) || node.agent_version != agent_version;
            node.inventory = Some(inv.clone());
            node.agent_version = agent_version.to_owned();
            Ok(changed)
        })?;
        updated.map(|_| ()).ok_or_else(|| StateError::NotFound {
            what: "node",
            name: id.to_owned(),
        })
    }

    /// Store the full inventory of node `id`. Returns what changed (`["first inventory"]` the first time,
    /// empty when nothing that matters did); only changes are added to the bounded history. A document that
    /// differs only in volatile values (boot time, free huge pages) replaces the stored one silently.
    pub fn set_hardware(
        &self,
        id: &str,
        document: inventory::Inventory,
        now: SystemTime,
    ) -> Result<Vec<String>, StateError> {
        let key = keys::inventory(id);
        for _ in attempts() {
            if self.node(id)?.is_none() {
                return Err(StateError::NotFound {
                    what: "node",
                    name: id.to_owned(),
                });
            }
            let old = self.get_json::<HardwareRecord>(&key)?;
            let (changes, mut history, txn) = match &old {
                None => (
                    vec!["first inventory".to_owned()],
                    Vec::new(),
                    Txn::new().if_absent(key.clone()),
                ),
                Some((rec, raw)) => {
                    if rec.document == document {
                        return Ok(Vec::new());
                    }
                    let changes = inventory::changed_fields(&rec.document, &document);
                    (
                        changes,
                        rec.history.clone(),
                        Txn::new().if_equals(key.clone(), raw.clone()),
                    )
                }
            };
            let updated_at = match (&old, changes.is_empty()) {
                (Some((rec, _)), true) => rec.updated_at,
                _ => unix(now),
            };
            if !changes.is_empty() {
                history.insert(
                    0,
                    InventoryChange {
                        at: unix(now),
                        changes: changes.clone(),
                    },
                );
                history.truncate(MAX_INVENTORY_HISTORY);
            }
            let rec = HardwareRecord {
                document: document.clone(),
                updated_at,
                history,
            };
            let value = encode(&key, &rec)?;
            if self.store.txn(txn.put(key.clone(), value))? {
                return Ok(changes);
            }
        }
        Err(StateError::Conflict)
    }

    /// Keep an operator document (e.g. a stores file) under `name`, replacing the previous one.
    pub fn put_config_blob(&self, name: &str, value: &[u8]) -> Result<(), StateError> {
        if value.len() > 1 << 20 {
            return Err(invalid(format!("{name} is larger than 1 MiB")));
        }
        self.store.txn(Txn::new().put(keys::config(name), value.to_vec()))?;
        Ok(())
    }

    /// An operator document kept with [`State::put_config_blob`].
    pub fn config_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.store.get(&keys::config(name))?)
    }

    /// The full inventory of node `id`, if it has reported one.
    pub fn hardware(&self, id: &str) -> Result<Option<HardwareRecord>, StateError> {
        Ok(self.get_json::<HardwareRecord>(&keys::inventory(id))?.map(|(r, _)| r))
    }

    /// Persists last-seen times for a batch of node ids in one transaction. Unknown ids are skipped, and a
    /// stored time is never moved backwards.
    pub fn persist_last_seen(&self, batch: &[(String, SystemTime)]) -> Result<(), StateError> {
        let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
        for (id, t) in batch {
            let t = unix(*t);
            let e = latest.entry(id.as_str()).or_insert(t);
            *e = (*e).max(t);
        }
        for _ in attempts() {
            let mut txn = Txn::new();
            for (id, seen) in &latest {
                let key = keys::node(id);
                let Some((mut node, raw)) = self.get_json::<NodeRecord>(&key)? else {
                    continue;
                };
                if node.last_seen.is_some_and(|old| old >= *seen) {
                    continue;
                }
                node.last_seen = Some(*seen);
                let value = encode(&key, &node)?;
                txn = txn.if_equals(key.clone(), raw).put(key, value);
            }
            if txn.ops.is_empty() || self.store.txn(txn)? {
                return Ok(());
            }
        }
        Err(StateError::Conflict)
    }

    // ---- helpers ----

    fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<(T, Vec<u8>)>, StateError> {
        match self.store.get(key)? {
            None => Ok(None),
            Some(raw) => Ok(Some((decode(key, &raw)?, raw))),
        }
    }

    fn get_str(&self, key: &[u8]) -> Result<Option<String>, StateError> {
        match self.store.get(key)? {
            None => Ok(None),
            Some(raw) => String::from_utf8(raw).map(Some).map_err(|_| StateError::Corrupt {
                key: lossy(key),
                reason: "value is not UTF-8".to_owned(),
            }),
        }
    }

    fn scan_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StateError> {
        self.store
            .scan_prefix(prefix.as_bytes())?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    /// Follows an index key to its node. A dangling index (a concurrent delete) reads as `None`.
    fn resolve(&self, index_key: &[u8]) -> Result<Option<NodeRecord>, StateError> {
        match self.get_str(index_key)? {
            None => Ok(None),
            Some(id) => self.node(&id),
        }
    }

    /// Read-modify-CAS loop on one JSON record. `f` returns whether it changed anything. `None` when absent.
    fn update_json<T>(
        &self,
        key: &[u8],
        mut f: impl FnMut(&mut T) -> Result<bool, StateError>,
    ) -> Result<Option<T>, StateError>
    where
        T: Serialize + DeserializeOwned,
    {
        for _ in attempts() {
            let Some((mut value, raw)) = self.get_json::<T>(key)? else {
                return Ok(None);
            };
            if !f(&mut value)? {
                return Ok(Some(value));
            }
            let new = encode(key, &value)?;
            if self.store.txn(Txn::new().if_equals(key, raw).put(key, new))? {
                return Ok(Some(value));
            }
        }
        Err(StateError::Conflict)
    }

    fn used_ips(&self) -> Result<BTreeSet<Ipv4Addr>, StateError> {
        self.store
            .scan_prefix(keys::IP.as_bytes())?
            .iter()
            .map(|(k, _)| {
                std::str::from_utf8(&k[keys::IP.len()..])
                    .ok()
                    .and_then(|s| s.parse::<Ipv4Addr>().ok())
                    .ok_or_else(|| StateError::Corrupt {
                        key: lossy(k),
                        reason: "not an IPv4 address".to_owned(),
                    })
            })
            .collect()
    }

    /// `base`, else `base-<4 chars of id>`, else `base-<12 chars of id>`: the first name not taken now (the
    /// enrollment transaction re-checks).
    fn pick_name(&self, base: &str, id: &str) -> Result<String, StateError> {
        let rand = id.get(1..).unwrap_or(id);
        let short = rand.get(..4).unwrap_or(rand);
        let options = [base.to_owned(), with_suffix(base, short), with_suffix(base, rand)];
        for name in &options {
            if self.store.get(&keys::node_by_name(name))?.is_none() {
                return Ok(name.clone());
            }
        }
        Ok(options[2].clone())
    }

    /// An address was freed: the next search starts at it when it lies before the current start, so freed
    /// addresses are handed out again lowest first.
    fn ip_freed(&self, ip: Ipv4Addr) {
        let mut hint = self.ip_hint.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = *hint
            && ip <= h
        {
            *hint = u32::from(ip).checked_sub(1).map(Ipv4Addr::from);
        }
    }

    /// A free overlay address: the lowest one (one scan) the first time, then the first free one after the last
    /// handed out, wrapping around. Free means no `ip/` record now; the enrollment transaction's `if_absent`
    /// settles races with other threads or replicas.
    pub(crate) fn next_free_ip(&self) -> Result<Ipv4Addr, StateError> {
        let hint = *self.ip_hint.lock().unwrap_or_else(|p| p.into_inner());
        let Some(after) = hint else {
            return Ok(self.overlay.first_free(&self.used_ips()?)?);
        };
        let after = u32::from(after);
        let ordered = self
            .overlay
            .candidates()
            .filter(|ip| u32::from(*ip) > after)
            .chain(self.overlay.candidates().filter(|ip| u32::from(*ip) <= after));
        for ip in ordered {
            if self.store.get(&keys::ip(ip))?.is_none() {
                return Ok(ip);
            }
        }
        // Every candidate is taken: report it with the count.
        Ok(self.overlay.first_free(&self.used_ips()?)?)
    }

    fn warn_outside_overlay(&self) -> Result<(), StateError> {
        let outside = self
            .used_ips()?
            .into_iter()
            .filter(|ip| !self.overlay.is_candidate(*ip))
            .count();
        if outside > 0 {
            tracing::warn!(
                outside, overlay_cidr = %self.overlay.cidr,
                "nodes hold overlay addresses outside overlay_cidr (was it changed?); they keep them"
            );
        }
        Ok(())
    }
}

/// Canonical form of a WireGuard public key: 32 bytes as base64url without padding. Accepts base64url or
/// standard base64, padded or not.
pub fn canonical_public_key(s: &str) -> Result<String, StateError> {
    let trimmed = s.trim().trim_end_matches('=');
    let bytes = URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| STANDARD_NO_PAD.decode(trimmed))
        .map_err(|_| invalid("public key is not base64; send the WireGuard public key as base64url"))?;
    if bytes.len() != 32 {
        return Err(invalid(format!(
            "public key decodes to {} bytes; a WireGuard public key has 32",
            bytes.len()
        )));
    }
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Lower-cases `s`, turns every run of characters outside `[a-z0-9]` into one `-`, trims `-` at both ends
/// and cuts to 63 characters.
pub fn sanitize_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_NAME_LEN));
    let mut pending_dash = false;
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if pending_dash && !out.is_empty() {
                out.push('-');
            }
            pending_dash = false;
            out.push(c);
        } else {
            pending_dash = true;
        }
        if out.len() >= MAX_NAME_LEN {
            break;
        }
    }
    out.truncate(MAX_NAME_LEN);
    out.trim_end_matches('-').to_owned()
}

fn base_name(req: &EnrollInput) -> String {
    let source = if req.requested_name.trim().is_empty() {
        &req.hostname
    } else {
        &req.requested_name
    };
    let name = sanitize_name(source);
    if name.is_empty() { "node".to_owned() } else { name }
}

fn with_suffix(base: &str, suffix: &str) -> String {
    let keep = MAX_NAME_LEN.saturating_sub(suffix.len() + 1).min(base.len());
    let head = base[..keep].trim_end_matches('-');
    if head.is_empty() {
        format!("node-{suffix}")
    } else {
        format!("{head}-{suffix}")
    }
}

fn check_token_usable(t: &TokenRecord, now_s: u64) -> Result<(), StateError> {
    if t.revoked {
        return Err(StateError::TokenRevoked);
    }
    if now_s >= t.expires_at {
        return Err(StateError::TokenExpired {
            expired_at: t.expires_at,
        });
    }
    if t.uses_left == 0 {
        return Err(StateError::TokenUsedUp);
    }
    Ok(())
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), StateError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "too many labels ({}, at most {MAX_LABELS})",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() {
            return Err(invalid("label keys must not be empty"));
        }
        check_text("label key", k, MAX_HOSTNAME_LEN)?;
        check_text("label value", v, MAX_TEXT_LEN)?;
    }
    Ok(())
}

/// Rejects text longer than `max` bytes or containing control characters.
fn check_text(what: &str, s: &str, max: usize) -> Result<(), StateError> {
    if s.len() > max {
        return Err(invalid(format!(
            "{what} is too long ({} bytes, at most {max})",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(format!("{what} contains control characters")));
    }
    Ok(())
}

pub(crate) fn invalid(msg: impl Into<String>) -> StateError {
    StateError::InvalidArgument(msg.into())
}

/// Records larger than this are stored gzip-compressed (a rollout of 10 000 nodes is about 1 MiB of JSON, near
/// etcd's default 1.5 MiB request limit; compressed it is about a tenth).
pub const COMPRESS_ABOVE: usize = 64 * 1024;
/// Most bytes a compressed record may inflate to (a hostile or corrupt value cannot exhaust memory).
pub const MAX_RECORD: u64 = 256 * 1024 * 1024;
/// gzip's magic; a JSON record never starts with it.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], raw: &[u8]) -> Result<T, StateError> {
    let corrupt = |reason: String| StateError::Corrupt {
        key: lossy(key),
        reason,
    };
    if raw.starts_with(&GZIP_MAGIC) {
        use std::io::Read as _;
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(raw)
            .take(MAX_RECORD + 1)
            .read_to_end(&mut json)
            .map_err(|e| corrupt(format!("compressed record unreadable: {e}")))?;
        if json.len() as u64 > MAX_RECORD {
            return Err(corrupt(format!("compressed record inflates beyond {MAX_RECORD} bytes")));
        }
        return serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()));
    }
    serde_json::from_slice(raw).map_err(|e| corrupt(e.to_string()))
}

pub(crate) fn encode<T: Serialize>(key: &[u8], value: &T) -> Result<Vec<u8>, StateError> {
    let json = serde_json::to_vec(value).map_err(|e| StateError::Corrupt {
        key: lossy(key),
        reason: format!("cannot encode record: {e}"),
    })?;
    if json.len() <= COMPRESS_ABOVE {
        return Ok(json);
    }
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(json.len() / 8), flate2::Compression::fast());
    gz.write_all(&json)
        .and_then(|()| gz.finish())
        .map_err(|e| StateError::Corrupt {
            key: lossy(key),
            reason: format!("cannot compress record: {e}"),
        })
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fmt_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use std::path::Path;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn large_records_are_stored_compressed_and_read_back_small_ones_stay_plain_json() {
        let small = vec!["n".to_string(); 10];
        assert_eq!(encode(b"k", &small).unwrap(), serde_json::to_vec(&small).unwrap());
        // A rollout-sized record: 10 000 similar entries.
        let big: Vec<String> = (0..10_000)
            .map(|i| format!("node-{i:05} pending wave 3 pool db"))
            .collect();
        let json = serde_json::to_vec(&big).unwrap();
        let raw = encode(b"k", &big).unwrap();
        assert!(
            raw.len() * 4 < json.len(),
            "{} bytes compressed from {}",
            raw.len(),
            json.len()
        );
        assert_eq!(decode::<Vec<String>>(b"k", &raw).unwrap(), big);
        assert_eq!(
            decode::<Vec<String>>(b"k", &json).unwrap(),
            big,
            "plain JSON still reads"
        );
        // A truncated or hostile compressed value is an error naming the key, never a panic.
        let e = decode::<Vec<String>>(b"rollout/current", &raw[..raw.len() / 2]).unwrap_err();
        assert!(e.to_string().contains("rollout/current"), "{e}");
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn open_state(dir: &Path, cidr: &str) -> State {
        let store = SledStore::open(dir).unwrap();
        State::open(Arc::new(store), OverlayPlan::new(cidr.parse().unwrap()).unwrap()).unwrap()
    }

    fn setup(cidr: &str) -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = open_state(dir.path(), cidr);
        (dir, state)
    }

    fn key(b: u8) -> String {
        URL_SAFE_NO_PAD.encode([b; 32])
    }

    fn input(b: u8, hostname: &str) -> EnrollInput {
        EnrollInput {
            public_key_b64url: key(b),
            hostname: hostname.to_owned(),
            machine_id: format!("{b:032x}"),
            agent_version: "0.1.0".to_owned(),
            requested_name: String::new(),
            macs: vec!["02:00:00:00:00:01".to_owned()],
        }
    }

    fn token(state: &State, uses: u32) -> (String, TokenRecord) {
        let labels = BTreeMap::from([("role".to_owned(), "worker".to_owned())]);
        let (t, rec) = state.create_token(HOUR, uses, labels, "test".to_owned(), t0()).unwrap();
        (t.to_string_secret(), rec)
    }

    #[test]
    fn a_mac_bound_token_enrolls_only_that_host_and_waits_for_acceptance() {
        let (_d, s) = setup("10.9.0.0/24");
        let bound = |mac: &str, uses: u32| {
            s.create_bound_token(
                HOUR,
                uses,
                BTreeMap::new(),
                String::new(),
                TokenBinding {
                    mac: Some(mac.into()),
                    require_acceptance: true,
                },
                t0(),
            )
        };
        assert!(
            bound("02:00:00:00:00:01", 2)
                .unwrap_err()
                .to_string()
                .contains("single-use")
        );
        assert!(
            bound("not-a-mac", 1)
                .unwrap_err()
                .to_string()
                .contains("not a MAC address")
        );
        let (t, rec) = bound("02-00-00-00-00-01", 1).unwrap();
        assert_eq!(rec.bind_mac.as_deref(), Some("02:00:00:00:00:01"), "stored normalized");
        let secret = t.to_string_secret();

        let elsewhere = EnrollInput {
            macs: vec!["02:00:00:00:00:99".into()],
            ..input(2, "other")
        };
        let err = s.enroll(&secret, elsewhere, t0()).unwrap_err();
        assert!(matches!(err, StateError::TokenMacMismatch { .. }), "{err:?}");
        assert_eq!(s.list_tokens().unwrap()[0].uses_left, 1, "a refused host spends no use");

        let node = s.enroll(&secret, input(1, "metal-1"), t0()).unwrap();
        assert_eq!(node.status, NodeStatus::Pending);
        let again = s.enroll(&secret, input(1, "metal-1"), t0()).unwrap();
        assert_eq!(again.id, node.id, "a pending node may retry its enrollment");

        let accepted = s.accept_node(&node.name, "uid:0").unwrap();
        assert_eq!(accepted.status, NodeStatus::Active);
        assert_eq!(s.accept_node(&node.name, "uid:0").unwrap().status, NodeStatus::Active);
        s.revoke_node(&node.name, "gone", t0()).unwrap();
        assert!(
            s.accept_node(&node.name, "uid:0").is_err(),
            "a revoked node cannot be accepted"
        );
        assert_eq!(normalize_mac("AABB.CCDD.EEFF").as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(normalize_mac("aa:bb:cc:dd:ee"), None);
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn create_and_list_tokens() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 3);
        assert_eq!(rec.uses_left, 3);
        assert_eq!(rec.uses_total, 3);
        assert_eq!(rec.expires_at, rec.created_at + 3600);
        assert!(!rec.revoked);
        let parsed = JoinToken::parse(&tok).unwrap();
        assert_eq!(parsed.id, rec.id);
        assert_eq!(rec.secret_hash, parsed.secret_hash());
        // The record never holds the secret itself.
        let json = serde_json::to_string(&rec).unwrap();
        assert!(!json.contains(parsed.expose_secret()));
        let (_, rec2) = token(&s, 1);
        let ids: BTreeSet<_> = s.list_tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, BTreeSet::from([rec.id.clone(), rec2.id]));
        assert_eq!(s.token(&rec.id).unwrap(), Some(rec));
    }

    #[test]
    fn create_token_rejects_bad_arguments() {
        let (_d, s) = setup("10.9.0.0/24");
        let none = BTreeMap::new;
        for (ttl, uses, labels, desc) in [
            (HOUR, 0, none(), String::new()),
            (Duration::ZERO, 1, none(), String::new()),
            (Duration::from_millis(500), 1, none(), String::new()),
            (HOUR, 1, none(), "bad\ndescription".to_owned()),
            (
                HOUR,
                1,
                BTreeMap::from([(String::new(), "v".to_owned())]),
                String::new(),
            ),
            (
                HOUR,
                1,
                BTreeMap::from([("k".to_owned(), "\u{7}".to_owned())]),
                String::new(),
            ),
        ] {
            let err = s.create_token(ttl, uses, labels, desc, t0()).unwrap_err();
            assert!(matches!(err, StateError::InvalidArgument(_)), "{err:?}");
        }
        assert!(s.list_tokens().unwrap().is_empty());
    }

    #[test]
    fn revoke_token_marks_and_not_found() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 1);
        let revoked = s.revoke_token(&rec.id).unwrap();
        assert!(revoked.revoked);
        assert!(s.revoke_token(&rec.id).unwrap().revoked);
        assert!(s.token(&rec.id).unwrap().unwrap().revoked);
        let err = s.revoke_token("zzzzzzzzzz").unwrap_err();
        assert!(matches!(err, StateError::NotFound { what: "token", .. }), "{err:?}");
        let err = s.enroll(&tok, input(1, "web"), t0()).unwrap_err();
        assert!(matches!(err, StateError::TokenRevoked), "{err:?}");
        assert!(s.list_nodes().unwrap().is_empty());
    }

    #[test]
    fn enroll_success_writes_node_and_indexes() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 2);
        let node = s.enroll(&tok, input(1, "Web01.Example.COM"), t0()).unwrap();
        assert_eq!(node.name, "web01-example-com");
        assert_eq!(node.overlay_ip, ip("10.9.0.2"));
        assert_eq!(node.public_key, key(1));
        assert_eq!(node.hostname, "Web01.Example.COM");
        assert_eq!(node.agent_version, "0.1.0");
        assert_eq!(node.token_id, rec.id);
        assert_eq!(node.status, NodeStatus::Active);
        assert_eq!(node.enrolled_at, 1_700_000_000);
        assert_eq!(node.labels.get("role").map(String::as_str), Some("worker"));
        assert!(node.id.starts_with('n') && node.id.len() == 13);
        assert!(
            node.id[1..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );

        assert_eq!(s.node(&node.id).unwrap().as_ref(), Some(&node));
        assert_eq!(s.node_by_name(&node.name).unwrap().as_ref(), Some(&node));
        assert_eq!(s.node_by_key(&key(1)).unwrap().as_ref(), Some(&node));
        assert_eq!(s.node_by_ip(node.overlay_ip).unwrap().as_ref(), Some(&node));
        assert_eq!(s.node_by_ip(ip("10.9.0.3")).unwrap(), None);
        assert_eq!(s.list_nodes().unwrap(), vec![node]);
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 1);
        assert!(!s.is_key_revoked(&key(1)).unwrap());
    }

    #[test]
    fn requested_name_wins_and_standard_base64_key_is_canonicalised() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 1);
        let raw = [0xfb_u8; 32]; // encodes with '+'/'/' in standard base64
        let mut req = input(0, "host");
        req.public_key_b64url = base64::engine::general_purpose::STANDARD.encode(raw);
        req.requested_name = "DB Primary!".to_owned();
        let node = s.enroll(&tok, req, t0()).unwrap();
        assert_eq!(node.name, "db-primary");
        assert_eq!(node.public_key, URL_SAFE_NO_PAD.encode(raw));
        let std_key = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(s.node_by_key(&std_key).unwrap().unwrap().id, node.id);
    }

    #[test]
    fn same_key_twice_returns_same_node_without_consuming_a_use() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 2);
        let a = s.enroll(&tok, input(1, "web"), t0()).unwrap();
        let b = s.enroll(&tok, input(1, "other-hostname"), t0()).unwrap();
        assert_eq!(a, b);
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 1);
        assert_eq!(s.list_nodes().unwrap().len(), 1);

        // A single-use token: the retry still succeeds after the use was consumed...
        let (one, one_rec) = token(&s, 1);
        let c = s.enroll(&one, input(2, "db"), t0()).unwrap();
        assert_eq!(s.token(&one_rec.id).unwrap().unwrap().uses_left, 0);
        assert_eq!(s.enroll(&one, input(2, "db"), t0()).unwrap(), c);
        // ...and even after it expired.
        assert_eq!(s.enroll(&one, input(2, "db"), t0() + 2 * HOUR).unwrap(), c);
        // A different, usable token returns the node too, without consuming a use.
        assert_eq!(s.enroll(&tok, input(2, "db"), t0()).unwrap(), c);
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 1);
        // A different token that is used up does not.
        let err = s.enroll(&one, input(1, "web"), t0()).unwrap_err();
        assert!(matches!(err, StateError::TokenUsedUp), "{err:?}");
    }

    #[test]
    fn uses_run_out() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 2);
        s.enroll(&tok, input(1, "a"), t0()).unwrap();
        s.enroll(&tok, input(2, "b"), t0()).unwrap();
        let err = s.enroll(&tok, input(3, "c"), t0()).unwrap_err();
        assert!(matches!(err, StateError::TokenUsedUp), "{err:?}");
        assert!(err.to_string().contains("nimbusctl token create"));
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 0);
        assert_eq!(s.list_nodes().unwrap().len(), 2);
    }

    #[test]
    fn expired_token() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 1);
        // Still valid one second before expiry.
        let (tok2, _) = token(&s, 1);
        s.enroll(&tok2, input(9, "x"), t0() + HOUR - Duration::from_secs(1))
            .unwrap();
        let err = s.enroll(&tok, input(1, "a"), t0() + HOUR).unwrap_err();
        match err {
            StateError::TokenExpired { expired_at } => assert_eq!(expired_at, rec.expires_at),
            other => panic!("{other:?}"),
        }
        let msg = s.enroll(&tok, input(1, "a"), t0() + 2 * HOUR).unwrap_err().to_string();
        assert!(msg.contains("2023-11-14T23:13:20Z"), "{msg}");
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 1);
    }

    #[test]
    fn wrong_secret_unknown_id_and_malformed() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 1);
        let forged = format!("nimbus1.{}.{}", rec.id, "a".repeat(32));
        assert_ne!(forged, tok);
        let err = s.enroll(&forged, input(1, "a"), t0()).unwrap_err();
        assert!(matches!(err, StateError::TokenInvalid), "{err:?}");
        assert!(err.to_string().starts_with("join token not recognised"));
        let unknown = format!("nimbus1.{}.{}", "q".repeat(10), "a".repeat(32));
        assert!(matches!(
            s.enroll(&unknown, input(1, "a"), t0()).unwrap_err(),
            StateError::TokenInvalid
        ));
        let err = s.enroll("nimbus1.short.x", input(1, "a"), t0()).unwrap_err();
        assert!(matches!(err, StateError::TokenMalformed(_)), "{err:?}");
        assert!(err.to_string().starts_with("malformed join token"));
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 1);
        assert!(s.list_nodes().unwrap().is_empty());
    }

    #[test]
    fn hostile_input_is_rejected() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 10);
        let mut cases = Vec::new();
        let mut r = input(1, "host\nname");
        cases.push(r.clone());
        r = input(1, &"a".repeat(254));
        cases.push(r.clone());
        r = input(1, "ok");
        r.machine_id = "m".repeat(65);
        cases.push(r.clone());
        r = input(1, "ok");
        r.agent_version = "1\u{1b}[31m".to_owned();
        cases.push(r.clone());
        r = input(1, "ok");
        r.requested_name = "x\u{0}".to_owned();
        cases.push(r.clone());
        r = input(1, "ok");
        r.public_key_b64url = "not a key".to_owned();
        cases.push(r.clone());
        r.public_key_b64url = URL_SAFE_NO_PAD.encode([1u8; 16]);
        cases.push(r);
        for req in cases {
            let err = s.enroll(&tok, req.clone(), t0()).unwrap_err();
            assert!(matches!(err, StateError::InvalidArgument(_)), "{req:?}: {err:?}");
        }
        assert!(s.list_nodes().unwrap().is_empty());
        // Unicode and odd punctuation are sanitised, not rejected; an empty result becomes "node".
        let n = s.enroll(&tok, input(2, "ÄÖÜ..."), t0()).unwrap();
        assert_eq!(n.name, "node");
        let n = s
            .enroll(&tok, input(3, &format!("{}.example", "x".repeat(80))), t0())
            .unwrap();
        assert_eq!(n.name, "x".repeat(63));
    }

    #[test]
    fn revoked_key_is_refused() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 5);
        let node = s.enroll(&tok, input(1, "web"), t0()).unwrap();
        let later = t0() + Duration::from_secs(60);
        let r = s.revoke_node("web", "stolen laptop", later).unwrap();
        assert_eq!(r.status, NodeStatus::Revoked);
        assert_eq!(r.revoked_at, Some(1_700_000_060));
        assert_eq!(r.revoke_reason.as_deref(), Some("stolen laptop"));
        assert_eq!(s.node_by_key(&key(1)).unwrap(), None);
        assert!(s.is_key_revoked(&key(1)).unwrap());
        assert!(!s.is_key_revoked(&key(2)).unwrap());
        assert!(!s.is_key_revoked("garbage").unwrap());
        // Revoking twice returns the record unchanged.
        assert_eq!(s.revoke_node("web", "again", later + HOUR).unwrap(), r);
        // The address and name stay allocated.
        assert_eq!(
            s.node_by_ip(node.overlay_ip).unwrap().unwrap().status,
            NodeStatus::Revoked
        );
        assert_eq!(s.node_by_name("web").unwrap().unwrap().id, node.id);
        let err = s.enroll(&tok, input(1, "web"), later).unwrap_err();
        assert!(matches!(err, StateError::KeyRevoked), "{err:?}");
        // A new key gets the next address and a suffixed name.
        let n2 = s.enroll(&tok, input(2, "web"), later).unwrap();
        assert_eq!(n2.overlay_ip, ip("10.9.0.3"));
        assert_ne!(n2.name, "web");
        let err = s.revoke_node("nope", "", later).unwrap_err();
        assert!(matches!(err, StateError::NotFound { what: "node", .. }), "{err:?}");
    }

    #[test]
    fn delete_node_frees_name_and_address() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 5);
        let node = s.enroll(&tok, input(1, "web"), t0()).unwrap();
        let err = s.delete_node("web").unwrap_err();
        assert!(matches!(err, StateError::InvalidArgument(_)), "{err:?}");
        s.revoke_node("web", "", t0()).unwrap();
        assert_eq!(s.delete_node("web").unwrap().id, node.id);
        assert_eq!(s.node(&node.id).unwrap(), None);
        assert_eq!(s.node_by_name("web").unwrap(), None);
        assert_eq!(s.node_by_ip(node.overlay_ip).unwrap(), None);
        assert!(s.is_key_revoked(&key(1)).unwrap());
        let n2 = s.enroll(&tok, input(2, "web"), t0()).unwrap();
        assert_eq!((n2.name.as_str(), n2.overlay_ip), ("web", node.overlay_ip));
        assert!(matches!(
            s.delete_node("web").unwrap_err(),
            StateError::InvalidArgument(_)
        ));
        assert!(matches!(
            s.delete_node("gone").unwrap_err(),
            StateError::NotFound { .. }
        ));
    }

    #[test]
    fn unique_names_on_collision() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 5);
        let a = s.enroll(&tok, input(1, "web"), t0()).unwrap();
        let b = s.enroll(&tok, input(2, "web"), t0()).unwrap();
        let mut req = input(3, "other");
        req.requested_name = "WEB".to_owned();
        let c = s.enroll(&tok, req, t0()).unwrap();
        assert_eq!(a.name, "web");
        assert_eq!(b.name, format!("web-{}", &b.id[1..5]));
        assert_eq!(c.name, format!("web-{}", &c.id[1..5]));
        let names: BTreeSet<_> = s.list_nodes().unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names.len(), 3);
        // A 63-character base is shortened to fit the suffix.
        let long = "y".repeat(63);
        s.enroll(&tok, input(4, &long), t0()).unwrap();
        let d = s.enroll(&tok, input(5, &long), t0()).unwrap();
        assert_eq!(d.name.len(), 63);
        assert_eq!(d.name, format!("{}-{}", "y".repeat(58), &d.id[1..5]));
    }

    #[test]
    fn list_nodes_sorted_by_name() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 3);
        for (b, h) in [(1, "charlie"), (2, "alpha"), (3, "bravo")] {
            s.enroll(&tok, input(b, h), t0()).unwrap();
        }
        let names: Vec<_> = s.list_nodes().unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["alpha", "bravo", "charlie"]);
    }

    #[test]
    fn ip_exhaustion() {
        let (_d, s) = setup("10.9.0.0/29");
        let (tok, rec) = token(&s, 10);
        let ips: Vec<_> = (1..=5)
            .map(|b| s.enroll(&tok, input(b, "n"), t0()).unwrap().overlay_ip)
            .collect();
        assert_eq!(
            ips,
            ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"].map(ip)
        );
        let err = s.enroll(&tok, input(6, "n"), t0()).unwrap_err();
        match &err {
            StateError::Ipam(IpamError::Exhausted { in_use, cidr }) => {
                assert_eq!(*in_use, 5);
                assert_eq!(cidr.to_string(), "10.9.0.0/29");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("widen overlay_cidr"));
        // The failed enrollment consumed nothing.
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 5);
    }

    #[test]
    fn concurrent_enrollments_get_distinct_addresses() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, rec) = token(&s, 8);
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let s = s.clone();
                let tok = tok.clone();
                std::thread::spawn(move || s.enroll(&tok, input(i + 1, "same-host"), t0()).unwrap())
            })
            .collect();
        let nodes: Vec<NodeRecord> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ips: BTreeSet<_> = nodes.iter().map(|n| n.overlay_ip).collect();
        let ids: BTreeSet<_> = nodes.iter().map(|n| n.id.clone()).collect();
        let names: BTreeSet<_> = nodes.iter().map(|n| n.name.clone()).collect();
        assert_eq!((ips.len(), ids.len(), names.len()), (8, 8, 8));
        let expected: BTreeSet<_> = (2..10).map(|i| Ipv4Addr::new(10, 9, 0, i)).collect();
        assert_eq!(ips, expected);
        assert_eq!(s.token(&rec.id).unwrap().unwrap().uses_left, 0);
        assert_eq!(s.list_nodes().unwrap().len(), 8);
        assert!(matches!(
            s.enroll(&tok, input(100, "late"), t0()).unwrap_err(),
            StateError::TokenUsedUp
        ));
    }

    #[test]
    fn set_inventory_updates_node() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 1);
        let node = s.enroll(&tok, input(1, "web"), t0()).unwrap();
        let inv = InventoryRecord {
            hostname: "web".to_owned(),
            cpus: 4,
            memory_bytes: 8 << 30,
            kernel: "6.1.0".to_owned(),
            os_release: "Debian GNU/Linux 12 (bookworm)".to_owned(),
        };
        s.set_inventory(&node.id, inv.clone(), "0.2.0").unwrap();
        let got = s.node(&node.id).unwrap().unwrap();
        assert_eq!(got.inventory, Some(inv.clone()));
        assert_eq!(got.agent_version, "0.2.0");
        let err = s.set_inventory("nmissing", inv.clone(), "0.2.0").unwrap_err();
        assert!(matches!(err, StateError::NotFound { .. }), "{err:?}");
        let bad = InventoryRecord {
            kernel: "k\r\n".to_owned(),
            ..inv
        };
        assert!(matches!(
            s.set_inventory(&node.id, bad, "0.2.0").unwrap_err(),
            StateError::InvalidArgument(_)
        ));
    }

    #[test]
    fn persist_last_seen_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let s = open_state(dir.path(), "10.9.0.0/24");
            let (tok, _) = token(&s, 2);
            let a = s.enroll(&tok, input(1, "a"), t0()).unwrap();
            let b = s.enroll(&tok, input(2, "b"), t0()).unwrap();
            let t1 = t0() + Duration::from_secs(10);
            let t2 = t0() + Duration::from_secs(20);
            s.persist_last_seen(&[
                (a.id.clone(), t1),
                (b.id.clone(), t2),
                (a.id.clone(), t0()), // older duplicate: ignored
                ("nunknown".to_owned(), t2),
            ])
            .unwrap();
            // Never moves backwards.
            s.persist_last_seen(&[(b.id.clone(), t1)]).unwrap();
            s.persist_last_seen(&[]).unwrap();
            (a, b)
        };
        let s = open_state(dir.path(), "10.9.0.0/24");
        assert_eq!(s.node(&a.id).unwrap().unwrap().last_seen, Some(1_700_000_010));
        assert_eq!(s.node(&b.id).unwrap().unwrap().last_seen, Some(1_700_000_020));
        assert_eq!(s.list_nodes().unwrap().len(), 2);
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let s = State::open(store.clone(), OverlayPlan::new("10.9.0.0/24".parse().unwrap()).unwrap()).unwrap();
        assert!(store.txn(Txn::new().put(keys::node("nbad"), "{not json")).unwrap());
        assert!(store.txn(Txn::new().put(keys::node_by_name("bad"), "nbad")).unwrap());
        let err = s.node("nbad").unwrap_err();
        match &err {
            StateError::Corrupt { key, .. } => assert_eq!(key, "nodes/nbad"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.node_by_name("bad").unwrap_err(), StateError::Corrupt { .. }));
        assert!(matches!(s.list_nodes().unwrap_err(), StateError::Corrupt { .. }));
        assert!(matches!(
            s.persist_last_seen(&[("nbad".to_owned(), t0())]).unwrap_err(),
            StateError::Corrupt { .. }
        ));
        assert!(
            store
                .txn(Txn::new().put(keys::token("tttttttttt"), vec![0xffu8, 0xfe]))
                .unwrap()
        );
        assert!(matches!(s.list_tokens().unwrap_err(), StateError::Corrupt { .. }));
        let tok = format!("nimbus1.tttttttttt.{}", "a".repeat(32));
        assert!(matches!(
            s.enroll(&tok, input(1, "a"), t0()).unwrap_err(),
            StateError::Corrupt { .. }
        ));
        assert!(store.txn(Txn::new().put("ip/not-an-ip", "nbad")).unwrap());
        let (good, _) = token(&s, 1);
        assert!(matches!(
            s.enroll(&good, input(1, "a"), t0()).unwrap_err(),
            StateError::Corrupt { .. }
        ));
    }

    #[test]
    fn schema_is_written_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let plan = OverlayPlan::new("10.9.0.0/24".parse().unwrap()).unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        State::open(store.clone(), plan).unwrap();
        let current = crate::schema::CURRENT.to_string();
        assert_eq!(store.get(keys::SCHEMA).unwrap().as_deref(), Some(current.as_bytes()));
        State::open(store.clone(), plan).unwrap();
        let newer = (crate::schema::CURRENT + 1).to_string();
        assert!(store.txn(Txn::new().put(keys::SCHEMA, newer.clone())).unwrap());
        let err = State::open(store, plan).unwrap_err();
        assert!(
            matches!(&err, StateError::UnsupportedSchema { found, .. } if *found == newer),
            "{err:?}"
        );
    }

    #[test]
    fn sanitize_name_rules() {
        assert_eq!(sanitize_name("Web_01.Example.COM"), "web-01-example-com");
        assert_eq!(sanitize_name("--a--b--"), "a-b");
        assert_eq!(sanitize_name("   "), "");
        assert_eq!(sanitize_name("ünï"), "n");
        assert_eq!(sanitize_name(&format!("{}-tail", "z".repeat(62))), "z".repeat(62));
        assert!(sanitize_name(&"ab-".repeat(40)).len() <= MAX_NAME_LEN);
        assert!(!sanitize_name(&"ab-".repeat(40)).ends_with('-'));
    }

    #[test]
    fn hardware_keeps_the_document_and_a_bounded_history_of_changes() {
        let (_d, s) = setup("10.9.0.0/24");
        let (tok, _) = token(&s, 1);
        let node = s.enroll(&tok, input(1, "h1"), t0()).unwrap();
        let mut doc = inventory::Inventory::default();
        doc.disks.push(inventory::Disk {
            name: "sda".into(),
            size_bytes: Some(1 << 30),
            ..Default::default()
        });
        assert_eq!(
            s.set_hardware(&node.id, doc.clone(), t0()).unwrap(),
            vec!["first inventory".to_owned()]
        );
        assert!(
            s.set_hardware(&node.id, doc.clone(), t0()).unwrap().is_empty(),
            "same document: no change"
        );

        // Volatile values replace the stored document without a history entry.
        doc.os.boot_time = Some(123);
        assert!(s.set_hardware(&node.id, doc.clone(), t0()).unwrap().is_empty());
        let rec = s.hardware(&node.id).unwrap().unwrap();
        assert_eq!(rec.document.os.boot_time, Some(123));
        assert_eq!(rec.history.len(), 1);

        // A hot-added disk is a change, recorded newest first.
        doc.disks.push(inventory::Disk {
            name: "loop7".into(),
            size_bytes: Some(1 << 20),
            ..Default::default()
        });
        let changes = s.set_hardware(&node.id, doc.clone(), t0() + HOUR).unwrap();
        assert!(changes.iter().any(|c| c.contains("loop7")), "{changes:?}");
        let rec = s.hardware(&node.id).unwrap().unwrap();
        assert_eq!(rec.history[0].changes, changes);
        assert_eq!(rec.updated_at, unix(t0() + HOUR));

        for i in 0..(MAX_INVENTORY_HISTORY + 5) {
            doc.memory.total_bytes = Some(i as u64);
            s.set_hardware(&node.id, doc.clone(), t0()).unwrap();
        }
        assert_eq!(
            s.hardware(&node.id).unwrap().unwrap().history.len(),
            MAX_INVENTORY_HISTORY
        );

        assert!(matches!(
            s.set_hardware("nunknown", doc, t0()),
            Err(StateError::NotFound { .. })
        ));
    }
}
