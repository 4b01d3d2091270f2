//! Placement: which environment, pool and cohorts each node gets, and the labels and taints that follow.
//! Pure and deterministic: the same policy and node facts give the same [`Placement`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use inventory::{DiskClass, Inventory, Transport};
use serde::{Deserialize, Serialize};

use crate::model::{COHORT_LABEL_PREFIX, ENV_LABEL, POOL_LABEL, Policy, PoolMatch, Taint};
use crate::syntax::{format_size, glob_match};
use crate::validate::quoted_and;

/// What placement needs about one node (built by the coordinator from its records).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// Unique node id (the key of [`Placement::nodes`]).
    pub id: String,
    /// Node name, for messages and for ordering (`max`, below).
    pub name: String,
    /// Enrollment labels.
    pub labels: BTreeMap<String, String>,
    /// The last inventory the node sent, if any. Rules on hardware reject a node without one.
    pub inventory: Option<Inventory>,
    /// Declared zone; when `None` the inventory's platform zone (cloud metadata) is used.
    pub zone: Option<String>,
}

impl NodeFacts {
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        NodeFacts {
            id: id.into(),
            name: name.into(),
            ..NodeFacts::default()
        }
    }

    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn with_inventory(mut self, inventory: Inventory) -> Self {
        self.inventory = Some(inventory);
        self
    }

    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The declared zone, else the platform zone from the inventory.
    pub fn effective_zone(&self) -> Option<&str> {
        self.zone
            .as_deref()
            .or_else(|| self.inventory.as_ref().and_then(|i| i.platform.zone.as_deref()))
    }
}

/// Whether the inventory shows a local NVMe disk: an NVMe disk that is instance storage (AWS instance store,
/// Azure NVMe direct disk, GCP local SSD) or a physical disk of a bare-metal host. Network volumes on NVMe
/// (EBS, Azure "NVMe Accelerator") and hypervisor-emulated NVMe disks (VMware) do not count; neither does the
/// Azure SCSI resource disk.
pub fn has_local_nvme(inv: &Inventory) -> bool {
    inv.disks
        .iter()
        .any(|d| d.transport == Transport::Nvme && matches!(d.class, DiskClass::LocalInstanceStore | DiskClass::Local))
}

impl PoolMatch {
    /// Why `node` does not satisfy these rules (the first failing rule), or `None` when it does.
    pub fn mismatch(&self, node: &NodeFacts) -> Option<String> {
        let needs_inventory = !self.platform.is_empty()
            || !self.instance_type.is_empty()
            || self.min_cpus.is_some()
            || self.min_memory.is_some()
            || self.local_nvme.is_some();
        let inv = node.inventory.as_ref();
        if needs_inventory && inv.is_none() {
            return Some("no inventory yet".to_string());
        }
        if let Some(inv) = inv {
            let kind = inv.platform.kind;
            if !self.platform.is_empty() && !self.platform.contains(&kind) {
                let want: Vec<&str> = self.platform.iter().map(|k| k.as_str()).collect();
                return Some(format!("platform {kind} is not one of {}", want.join(", ")));
            }
            if !self.instance_type.is_empty() {
                match inv.platform.instance_type.as_deref() {
                    None => return Some("instance type unknown".to_string()),
                    Some(t) if !self.instance_type.iter().any(|g| glob_match(g, t)) => {
                        return Some(format!(
                            "instance type {t} matches none of {}",
                            self.instance_type.join(", ")
                        ));
                    }
                    Some(_) => {}
                }
            }
            if let Some(min) = self.min_cpus {
                match inv.cpu.threads {
                    None => return Some("CPU count unknown".to_string()),
                    Some(n) if n < min => return Some(format!("{n} CPUs, fewer than {min}")),
                    Some(_) => {}
                }
            }
            if let Some(min) = self.min_memory {
                match inv.memory.total_bytes {
                    None => return Some("memory size unknown".to_string()),
                    Some(n) if n < min => {
                        let gib = n as f64 / (1u64 << 30) as f64;
                        return Some(format!("memory {gib:.1}GiB, less than {}", format_size(min)));
                    }
                    Some(_) => {}
                }
            }
            if let Some(want) = self.local_nvme {
                match (want, has_local_nvme(inv)) {
                    (true, false) => return Some("no local NVMe disk".to_string()),
                    (false, true) => return Some("has a local NVMe disk".to_string()),
                    _ => {}
                }
            }
        }
        if !self.zone.is_empty() {
            match node.effective_zone() {
                None => return Some("zone unknown".to_string()),
                Some(z) if !self.zone.iter().any(|w| w == z) => {
                    return Some(format!("zone {z} is not one of {}", self.zone.join(", ")));
                }
                Some(_) => {}
            }
        }
        for (k, v) in &self.labels {
            if node.labels.get(k) != Some(v) {
                return Some(format!("lacks label {k}={v}"));
            }
        }
        None
    }

    /// Whether `node` satisfies every rule.
    pub fn matches(&self, node: &NodeFacts) -> bool {
        self.mismatch(node).is_none()
    }
}

/// The result of [`place`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Every node given to [`place`], by node id.
    pub nodes: BTreeMap<String, NodePlacement>,
    pub warnings: Vec<Warning>,
}

impl Placement {
    /// The assignment of a placed node.
    pub fn assignment(&self, node_id: &str) -> Option<&Assignment> {
        self.nodes.get(node_id).and_then(NodePlacement::assignment)
    }

    /// Ids of the nodes placed in `pool` of `environment`, sorted.
    pub fn placed_in(&self, environment: &str, pool: &str) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|(_, p)| {
                p.assignment()
                    .is_some_and(|a| a.environment == environment && a.pool == pool)
            })
            .map(|(id, _)| id.as_str())
            .collect()
    }
}

/// Where one node goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodePlacement {
    Placed(Assignment),
    Unplaced { reason: String },
}

impl NodePlacement {
    pub fn assignment(&self) -> Option<&Assignment> {
        match self {
            NodePlacement::Placed(a) => Some(a),
            NodePlacement::Unplaced { .. } => None,
        }
    }
}

/// A placed node's environment, pool, cohorts, and the labels and taints it must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub environment: String,
    pub pool: String,
    /// Cohorts whose `pools` contain the pool, sorted.
    pub cohorts: Vec<String>,
    /// The pool's and cohorts' labels plus `polynimbus.io/env`, `polynimbus.io/pool` and
    /// `polynimbus.io/cohort.<cohort>=true`.
    pub labels: BTreeMap<String, String>,
    /// The cohorts' taints, sorted.
    pub taints: Vec<Taint>,
    /// The node's local storage: one volume per storage profile of the pool that found disks on it. The
    /// profiles' labels are in `labels` only for those.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<storage::Volume>,
}

/// Something placement noticed. Serialized with a `kind` tag; `Display` is a sentence for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Warning {
    /// Fewer nodes placed than the pool's `min` (`have` may be 0).
    PoolBelowMinimum {
        environment: String,
        pool: String,
        have: u32,
        min: u32,
    },
    /// More nodes matched than the pool's `max`; the extra ones are unplaced.
    PoolAboveMaximum {
        environment: String,
        pool: String,
        have: u32,
        max: u32,
    },
    /// A node matched several pools of its environment and was left unplaced.
    PoolsOverlap {
        node_id: String,
        node: String,
        pools: Vec<String>,
    },
    /// A node matched several environments and was left unplaced.
    EnvironmentsOverlap {
        node_id: String,
        node: String,
        environments: Vec<String>,
    },
    /// A node was left unplaced (every unplaced node gets one).
    Unplaced {
        node_id: String,
        node: String,
        reason: String,
    },
    /// Two cohorts that prefer not to share nodes both run on a pool that has nodes.
    AntiAffinityShared {
        environment: String,
        pool: String,
        cohort: String,
        other: String,
    },
    /// A storage profile of the node's pool found no disk on it (no volume, no labels from the profile).
    StorageWithoutDisks {
        node_id: String,
        node: String,
        pool: String,
        profile: String,
    },
    /// Several nodes were given with the same id; only the last (by name) was placed.
    DuplicateNodeId { node_id: String },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes = |n: u32| if n == 1 { "node" } else { "nodes" };
        match self {
            Warning::PoolBelowMinimum {
                environment,
                pool,
                have,
                min,
            } => write!(
                f,
                "pool {pool:?} in environment {environment:?} has {have} {}, below its minimum of {min}",
                nodes(*have)
            ),
            Warning::PoolAboveMaximum {
                environment,
                pool,
                have,
                max,
            } => write!(
                f,
                "pool {pool:?} in environment {environment:?} has {have} matching {}, above its maximum of {max}; \
                 {} left unplaced",
                nodes(*have),
                have.saturating_sub(*max)
            ),
            Warning::PoolsOverlap { node, pools, .. } => {
                let names: Vec<&str> = pools.iter().map(String::as_str).collect();
                write!(f, "pools {} overlap on node {node:?}", quoted_and(&names))
            }
            Warning::EnvironmentsOverlap { node, environments, .. } => {
                let names: Vec<&str> = environments.iter().map(String::as_str).collect();
                write!(f, "environments {} overlap on node {node:?}", quoted_and(&names))
            }
            Warning::Unplaced { node, reason, .. } => write!(f, "node {node:?} is unplaced: {reason}"),
            Warning::AntiAffinityShared {
                environment,
                pool,
                cohort,
                other,
            } => write!(
                f,
                "cohorts {cohort:?} and {other:?} prefer not to share nodes but both run on pool {pool:?} in \
                 environment {environment:?}"
            ),
            Warning::StorageWithoutDisks {
                node, pool, profile, ..
            } => write!(
                f,
                "storage profile {profile:?} of pool {pool:?} found no disk on node {node:?} (check its inventory: \
                 `nimbusctl node show {node} --hardware`)"
            ),
            Warning::DuplicateNodeId { node_id } => {
                write!(
                    f,
                    "node id {node_id:?} was given more than once; only the last by name is placed"
                )
            }
        }
    }
}

impl Policy {
    /// The assignment a node in `pool` of `environment` gets, or `None` if either is unknown or the pool does
    /// not exist in that environment.
    pub fn assignment(&self, environment: &str, pool: &str) -> Option<Assignment> {
        self.environment(environment)?;
        let p = self.pool(pool).filter(|p| p.allows(environment))?;
        let mut labels = p.labels.clone();
        let mut taints = BTreeSet::new();
        let mut cohorts = Vec::new();
        for c in self.cohorts_on(pool) {
            cohorts.push(c.name.clone());
            labels.extend(c.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            labels.insert(format!("{COHORT_LABEL_PREFIX}{}", c.name), "true".to_string());
            taints.extend(c.taints.iter().cloned());
        }
        labels.insert(POOL_LABEL.to_string(), pool.to_string());
        labels.insert(ENV_LABEL.to_string(), environment.to_string());
        Some(Assignment {
            environment: environment.to_string(),
            pool: pool.to_string(),
            cohorts,
            labels,
            taints: taints.into_iter().collect(),
            storage: Vec::new(),
        })
    }
}

/// Place every node. Deterministic: nodes are considered in (name, id) order, and when more nodes match a
/// pool than its `max`, the first ones by name are placed and the rest are unplaced.
pub fn place(policy: &Policy, nodes: &[NodeFacts]) -> Placement {
    place_with_previous(policy, nodes, None)
}

/// Like [`place`], but when a pool is over its `max`, nodes that `previous` already had in that pool keep
/// their place before newcomers (then by name), so a new node never pushes a running one out.
pub fn place_with_previous(policy: &Policy, nodes: &[NodeFacts], previous: Option<&Placement>) -> Placement {
    let mut order: Vec<&NodeFacts> = nodes.iter().collect();
    order.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));

    let mut out = Placement::default();
    let mut overlap_warnings = Vec::new();
    let mut seen_ids = BTreeSet::new();
    let mut duplicate_ids = BTreeSet::new();
    // (environment, pool) -> candidate nodes in (name, id) order.
    let mut groups: BTreeMap<(String, String), Vec<&NodeFacts>> = BTreeMap::new();

    for node in &order {
        if !seen_ids.insert(node.id.as_str()) {
            duplicate_ids.insert(node.id.clone());
            groups.values_mut().for_each(|g| g.retain(|n| n.id != node.id));
        }
        let envs: Vec<&str> = policy
            .environments()
            .iter()
            .filter(|e| e.selector.matches(&node.labels))
            .map(|e| e.name.as_str())
            .collect();
        let env = match envs.as_slice() {
            [] => {
                out.nodes
                    .insert(node.id.clone(), unplaced("matches no environment".to_string()));
                continue;
            }
            [one] => *one,
            many => {
                overlap_warnings.push(Warning::EnvironmentsOverlap {
                    node_id: node.id.clone(),
                    node: node.name.clone(),
                    environments: many.iter().map(|s| s.to_string()).collect(),
                });
                out.nodes.insert(
                    node.id.clone(),
                    unplaced(format!("matches environments {}", quoted_and(many))),
                );
                continue;
            }
        };
        let mut matched = Vec::new();
        let mut misses = Vec::new();
        for p in policy.pools_in(env) {
            match p.selector.mismatch(node) {
                None => matched.push(p.name.as_str()),
                Some(why) => misses.push(format!("{}: {why}", p.name)),
            }
        }
        match matched.as_slice() {
            [] if misses.is_empty() => {
                out.nodes
                    .insert(node.id.clone(), unplaced(format!("environment {env:?} has no pools")));
            }
            [] => {
                out.nodes.insert(
                    node.id.clone(),
                    unplaced(format!(
                        "matches no pool of environment {env:?} ({})",
                        misses.join("; ")
                    )),
                );
            }
            [one] => {
                out.nodes.remove(&node.id);
                groups.entry((env.to_string(), one.to_string())).or_default().push(node);
            }
            many => {
                overlap_warnings.push(Warning::PoolsOverlap {
                    node_id: node.id.clone(),
                    node: node.name.clone(),
                    pools: many.iter().map(|s| s.to_string()).collect(),
                });
                out.nodes
                    .insert(node.id.clone(), unplaced(format!("matches pools {}", quoted_and(many))));
            }
        }
    }

    let mut pool_warnings = Vec::new();
    let mut storage_warnings = Vec::new();
    for ((env, pool), mut members) in groups {
        let Some(assignment) = policy.assignment(&env, &pool) else {
            continue;
        };
        let max = policy.pool(&pool).and_then(|p| p.max);
        if let Some(prev) = previous {
            // Stable sort: within each class the (name, id) order stays.
            members.sort_by_key(|n| {
                prev.assignment(&n.id)
                    .is_none_or(|a| a.environment != env || a.pool != pool)
            });
        }
        let limit = max.map_or(usize::MAX, |m| m as usize);
        if let Some(max) = max
            && members.len() > limit
        {
            pool_warnings.push(Warning::PoolAboveMaximum {
                environment: env.clone(),
                pool: pool.clone(),
                have: count(members.len()),
                max,
            });
        }
        let profiles = policy.pool(&pool).map(|p| p.storage.as_slice()).unwrap_or_default();
        for (i, node) in members.iter().enumerate() {
            let placement = if i < limit {
                let mut a = assignment.clone();
                let (volumes, without) = crate::storage_select::volumes(profiles, node.inventory.as_ref());
                for v in &volumes {
                    if let Some(p) = profiles.iter().find(|p| p.name == v.name) {
                        a.labels.extend(p.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                a.storage = volumes;
                for profile in without {
                    storage_warnings.push(Warning::StorageWithoutDisks {
                        node_id: node.id.clone(),
                        node: node.name.clone(),
                        pool: pool.clone(),
                        profile,
                    });
                }
                NodePlacement::Placed(a)
            } else {
                unplaced(format!("pool {pool:?} is full (max {})", max.unwrap_or_default()))
            };
            out.nodes.insert(node.id.clone(), placement);
        }
    }

    out.warnings.extend(
        duplicate_ids
            .into_iter()
            .map(|node_id| Warning::DuplicateNodeId { node_id }),
    );
    out.warnings.extend(overlap_warnings);
    out.warnings.extend(pool_warnings);
    out.warnings.extend(storage_warnings);
    // With duplicate ids the last node (by name) is the one placed; report that one.
    let last: BTreeMap<&str, &NodeFacts> = order.iter().map(|n| (n.id.as_str(), *n)).collect();
    for node in &order {
        if let Some(NodePlacement::Unplaced { reason }) = out.nodes.get(&node.id)
            && last.get(node.id.as_str()).is_some_and(|l| std::ptr::eq(*l, *node))
        {
            out.warnings.push(Warning::Unplaced {
                node_id: node.id.clone(),
                node: node.name.clone(),
                reason: reason.clone(),
            });
        }
    }
    for env in policy.environments() {
        for pool in policy.pools_in(&env.name) {
            let have = out.placed_in(&env.name, &pool.name).len();
            if have < pool.min as usize {
                out.warnings.push(Warning::PoolBelowMinimum {
                    environment: env.name.clone(),
                    pool: pool.name.clone(),
                    have: count(have),
                    min: pool.min,
                });
            }
            if have == 0 {
                continue;
            }
            let cohorts: Vec<_> = policy.cohorts_on(&pool.name).collect();
            for (i, a) in cohorts.iter().enumerate() {
                for b in &cohorts[i + 1..] {
                    if a.anti_affinity.contains(&b.name) || b.anti_affinity.contains(&a.name) {
                        out.warnings.push(Warning::AntiAffinityShared {
                            environment: env.name.clone(),
                            pool: pool.name.clone(),
                            cohort: a.name.clone(),
                            other: b.name.clone(),
                        });
                    }
                }
            }
        }
    }
    let placed = out.nodes.values().filter(|p| p.assignment().is_some()).count();
    tracing::debug!(
        nodes = out.nodes.len(),
        placed,
        warnings = out.warnings.len(),
        "placement computed"
    );
    out
}

fn unplaced(reason: String) -> NodePlacement {
    NodePlacement::Unplaced { reason }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
