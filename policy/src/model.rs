//! The validated policy model. Values are only built by [`crate::parse`] and
//! [`Policy::from_canonical_json`], which validate; every list is sorted (entries by name, sets by value) so
//! that two files meaning the same thing give equal policies and the same [`Policy::digest`].

use std::collections::BTreeMap;
use std::fmt;

use inventory::PlatformKind;
use serde::{Deserialize, Serialize};

use crate::diagnostic::{Location, Pos};

/// The only policy file version this release understands.
pub const POLICY_VERSION: u32 = 1;
/// The project's label domain: every label and taint key the policy puts on nodes lives under it.
pub const LABEL_DOMAIN: &str = "polynimbus.io";
/// Set by placement on every placed node: its pool.
pub const POOL_LABEL: &str = "polynimbus.io/pool";
/// Set by placement on every placed node: its environment.
pub const ENV_LABEL: &str = "polynimbus.io/env";
/// Set by placement on every placed node, once per cohort: `polynimbus.io/cohort.<cohort>=true`.
pub const COHORT_LABEL_PREFIX: &str = "polynimbus.io/cohort.";

/// A parsed and validated fleet policy. Build it with [`crate::parse`] or [`Policy::from_canonical_json`].
///
/// Equality and serialization ignore where the policy came from (file name and positions).
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub(crate) version: u32,
    pub(crate) environments: Vec<Environment>,
    pub(crate) pools: Vec<Pool>,
    pub(crate) cohorts: Vec<Cohort>,
    #[serde(skip)]
    pub(crate) origin: Origin,
}

/// Where the policy came from: the file name and the position of each environment, pool and cohort.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    pub file: String,
    pub items: BTreeMap<(ItemKind, String), Pos>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.environments == other.environments
            && self.pools == other.pools
            && self.cohorts == other.cohorts
    }
}

impl Eq for Policy {}

/// A policy deserializes from its canonical JSON form and is validated on the way (see
/// [`Policy::from_canonical_json`]).
impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        crate::canonical::from_value(&value).map_err(serde::de::Error::custom)
    }
}

/// The kinds of named entries of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    Environment,
    Pool,
    Cohort,
}

impl Policy {
    /// The file version (always [`POLICY_VERSION`]).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The environments, sorted by name.
    pub fn environments(&self) -> &[Environment] {
        &self.environments
    }

    /// The pools, sorted by name.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The cohorts, sorted by name.
    pub fn cohorts(&self) -> &[Cohort] {
        &self.cohorts
    }

    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments.iter().find(|e| e.name == name)
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub fn cohort(&self, name: &str) -> Option<&Cohort> {
        self.cohorts.iter().find(|c| c.name == name)
    }

    /// The pools a node of `environment` may join, sorted by name.
    pub fn pools_in<'a>(&'a self, environment: &'a str) -> impl Iterator<Item = &'a Pool> + 'a {
        self.pools.iter().filter(move |p| p.allows(environment))
    }

    /// The cohorts placed on `pool`, sorted by name.
    pub fn cohorts_on<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = &'a Cohort> + 'a {
        self.cohorts.iter().filter(move |c| c.pools.iter().any(|p| p == pool))
    }

    /// Where an environment, pool or cohort was defined. `None` for unknown names and for policies read from
    /// canonical JSON (which has no positions).
    pub fn locate(&self, kind: ItemKind, name: &str) -> Option<Location> {
        let pos = self.origin.items.get(&(kind, name.to_string()))?;
        Some(Location {
            file: self.origin.file.clone(),
            line: pos.line,
            column: pos.column,
        })
    }
}

/// One environment: a Kubernetes cluster and the nodes that belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// `[a-z0-9-]{1,32}`, unique.
    pub name: String,
    /// Which nodes belong to this environment. YAML key `match`.
    #[serde(rename = "match")]
    pub selector: EnvironmentMatch,
    pub kubernetes: Kubernetes,
}

/// Enrollment labels a node must all carry to belong to an environment. Empty: every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentMatch {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl EnvironmentMatch {
    /// Whether a node with these enrollment labels belongs to the environment.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// How the nodes of an environment join its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// `host:port` of the API server (the `kubeadm join` endpoint).
    pub api_endpoint: String,
    /// `sha256:<64 hex>`: kubeadm's `--discovery-token-ca-cert-hash`. Stored lowercase.
    pub ca_cert_hash: String,
    /// kubeadm configuration API version to write. Default [`KubeadmApi::V1beta4`].
    #[serde(default)]
    pub kubeadm_api: KubeadmApi,
    /// How the coordinator talks to the cluster (labels, taints, drain; and bootstrap tokens unless
    /// `join_token_command` is given).
    pub credentials: Credentials,
    /// argv of a command (run without a shell) that prints one kubeadm bootstrap token
    /// (`[a-z0-9]{6}.[a-z0-9]{16}`) for a node joining this cluster, e.g.
    /// `[/usr/local/bin/mint-join-token, --cluster, prod]`. `None`: tokens are created through the Kubernetes
    /// API with `credentials`. The program is an absolute path and no entry is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_command: Option<Vec<String>>,
}

/// kubeadm configuration API versions: `v1beta3` (kubeadm 1.22-1.30) and `v1beta4` (1.31 and later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeadmApi {
    V1beta3,
    #[default]
    V1beta4,
}

impl KubeadmApi {
    pub fn as_str(self) -> &'static str {
        match self {
            KubeadmApi::V1beta3 => "v1beta3",
            KubeadmApi::V1beta4 => "v1beta4",
        }
    }
}

impl fmt::Display for KubeadmApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cluster credentials of the coordinator: a kubeconfig file, or a command that prints a bearer token (its
/// argv, run without a shell). Neither holds the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Credentials {
    /// Absolute path of a kubeconfig file.
    Kubeconfig(String),
    /// argv of a command printing a token, e.g. `[aws, eks, get-token, --cluster-name, prod]`.
    TokenCommand(Vec<String>),
}

/// A node pool: which nodes of which environments belong to it, and its size bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// Environments where the pool exists; `None`: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<String>>,
    /// Which nodes belong to the pool. YAML key `match`.
    #[serde(rename = "match")]
    pub selector: PoolMatch,
    /// Fewer placed nodes than this (per environment) raise [`crate::Warning::PoolBelowMinimum`]. Default 0.
    #[serde(default)]
    pub min: u32,
    /// At most this many nodes per environment; further matching nodes are left unplaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Nodes of the pool that a rollout wave may take down at once. Default 1.
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// Extra node labels (keys under `polynimbus.io/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Local storage the pool's nodes prepare (see [`StorageProfile`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<StorageProfile>,
}

fn one() -> u32 {
    1
}

impl Pool {
    /// Whether the pool exists in `environment`.
    pub fn allows(&self, environment: &str) -> bool {
        self.environments
            .as_ref()
            .is_none_or(|envs| envs.iter().any(|e| e == environment))
    }
}

/// Rules a node must all satisfy to join a pool. Absent rules accept any node; rules on hardware need the
/// node's inventory and reject a node without one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMatch {
    /// Inventory platform kinds; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platform: Vec<PlatformKind>,
    /// Globs (`*`, `?`) over the cloud instance type; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_type: Vec<String>,
    /// Minimum online logical CPUs (threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cpus: Option<u32>,
    /// Minimum `MemTotal` in bytes (the kernel's figure, a little below the instance's nominal memory).
    /// Written as a size (`60GiB`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "size_opt")]
    pub min_memory: Option<u64>,
    /// `true`: the node has a local NVMe disk (an NVMe instance-store disk or a physical NVMe disk);
    /// `false`: it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_nvme: Option<bool>,
    /// Zones (the node's declared zone, else the platform zone from cloud metadata); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zone: Vec<String>,
    /// Enrollment labels the node must all carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl PoolMatch {
    /// True when no rule is given (the pool accepts every node of its environments).
    pub fn is_empty(&self) -> bool {
        self == &PoolMatch::default()
    }
}

/// `Option<u64>` bytes written as a size string.
mod size_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::syntax::{format_size, parse_size};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_str(&format_size(*n)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| parse_size("min_memory", &s).map_err(|p| serde::de::Error::custom(p.message)))
            .transpose()
    }
}

/// A workload cohort: which pools run it, and the labels and taints its nodes carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cohort {
    pub name: String,
    /// Pools whose nodes serve this cohort; never empty.
    pub pools: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Cohorts this one prefers not to share a node with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<String>,
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: String,
    pub effect: TaintEffect,
}

impl fmt::Display for Taint {
    /// kubectl's form: `key=value:Effect` (`key:Effect` when the value is empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect)
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect)
        }
    }
}

/// Kubernetes taint effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub const ALL: [TaintEffect; 3] = [
        TaintEffect::NoSchedule,
        TaintEffect::PreferNoSchedule,
        TaintEffect::NoExecute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

impl fmt::Display for TaintEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pool's local storage: which disks of each node (selected from its inventory at every apply), how they
/// are combined, the file system and where it is mounted, and the node labels announcing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageProfile {
    /// `[a-z0-9-]{1,32}`, unique in the pool; names the LVM volume group / md array (`nimbus-<name>`).
    pub name: String,
    pub disks: DiskSelector,
    #[serde(default)]
    pub layout: StorageLayout,
    #[serde(default = "xfs")]
    pub filesystem: storage::Filesystem,
    /// Absolute; empty only for an `lvm` layout left to a CSI driver (volume group only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mount_point: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// Node labels (keys under `polynimbus.io/`) set on nodes where the profile found at least one disk.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Serials, WWNs or by-id paths of disks whose existing data may be destroyed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wipe: Vec<String>,
}

fn xfs() -> storage::Filesystem {
    storage::Filesystem::Xfs
}

/// How a profile combines its disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageLayout {
    /// One file system per disk.
    #[default]
    PerDisk,
    /// One LVM volume group (and, with a mount point, one logical volume with a file system).
    Lvm,
    /// One md RAID0 stripe with one file system.
    Raid0,
}

impl StorageLayout {
    pub const ALL: [StorageLayout; 3] = [StorageLayout::PerDisk, StorageLayout::Lvm, StorageLayout::Raid0];

    pub fn as_str(self) -> &'static str {
        match self {
            StorageLayout::PerDisk => "per-disk",
            StorageLayout::Lvm => "lvm",
            StorageLayout::Raid0 => "raid0",
        }
    }
}

/// Which disks of a node a profile takes. Never the disk holding the root file system, a mounted disk, a
/// read-only or removable one. Absent rules accept any disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSelector {
    /// Inventory disk classes (`local-instance-store`, `local`, `network-volume`, `virtual-disk`, `logical`);
    /// empty: any but `logical` and `removable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class: Vec<inventory::DiskClass>,
    /// Transports (`nvme`, `sata`, `sas`, `scsi`, `virtio`, `xen`, ...); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transport: Vec<inventory::Transport>,
    /// Minimum size in bytes, written as a size (`100GiB`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "size_opt")]
    pub min_size: Option<u64>,
    /// Glob (`*`, `?`) over the disk model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Glob over the name of the disk's stable `/dev/disk/by-id/` link (e.g. `nvme-Amazon_EC2_NVMe_*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id: Option<String>,
    /// At most this many disks (the first by stable path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disks: Option<u32>,
}
