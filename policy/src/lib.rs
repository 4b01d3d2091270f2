//! The declarative fleet policy: environments (one Kubernetes cluster each), node pools and workload cohorts;
//! parsed from YAML with every error located, placed onto nodes, and diffed between revisions.
//!
//! ```
//! let yaml = r#"
//! version: 1
//! environments:
//!   - name: production
//!     match: { labels: { env: production } }
//!     kubernetes:
//!       api_endpoint: "10.0.0.10:6443"
//!       ca_cert_hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000"
//!       credentials: { kubeconfig: /etc/nimbus/envs/production.kubeconfig }
//! pools:
//!   - name: general
//!     match: { labels: { tier: general } }
//!     min: 1
//! "#;
//! let policy = policy::parse("policy.yaml", yaml).unwrap();
//! let node = policy::NodeFacts::new("n1", "node-1").with_label("env", "production").with_label("tier", "general");
//! let placement = policy::place(&policy, &[node]);
//! let a = placement.assignment("n1").unwrap();
//! assert_eq!(a.labels["polynimbus.io/pool"], "general");
//! assert!(policy.digest().starts_with("sha256:"));
//!
//! let err = policy::parse("policy.yaml", "version: 2\nenvironment: []\n").unwrap_err();
//! assert_eq!(
//!     err.to_string().lines().next(),
//!     Some("policy.yaml:1:1: the policy defines no environments (hint: add `environments:` with at least one environment)")
//! );
//! ```
//!
//! # Layout
//!
//! - `diagnostic` — [`Diagnostic`] (`FILE:LINE:COL: MESSAGE (hint: HINT)`), [`PolicyErrors`], [`Location`].
//! - `model` — the validated model: [`Policy`], [`Environment`], [`Kubernetes`], [`Credentials`], [`Pool`],
//!   [`PoolMatch`], [`Cohort`], [`Taint`]; label constants.
//! - `syntax` — single values: names, Kubernetes label keys/values and the `polynimbus.io/` rule, sizes,
//!   globs, the API endpoint, the CA hash.
//! - `decode` — YAML nodes (marked-yaml, with positions) → model values; unknown fields, types, per-value
//!   syntax. Visits everything, so all problems are reported in one run.
//! - `validate` — checks across entries: unique names, references, `min`/`max`, provable overlaps of
//!   environments and pools, conflicting labels/taints on one pool; sorting into canonical order.
//! - `canonical` — [`parse`], [`Policy::to_canonical_json`], [`Policy::from_canonical_json`],
//!   [`Policy::digest`].
//! - `place` — [`NodeFacts`], [`place`] → [`Placement`] ([`NodePlacement`], [`Assignment`], [`Warning`]).
//! - `diff` — [`diff`] → [`NodeChange`] / [`Change`] with the disruptive flag.
//!
//! Invariants: nothing here does I/O, reads the clock or panics on input; [`place`] and [`diff`] are
//! deterministic; a [`Policy`] value is always valid (its only constructors validate).
//!
//! # Schema
//!
//! One YAML document; unknown fields are errors everywhere. Names of environments, pools and cohorts are
//! 1-32 characters of `a-z`, `0-9` and `-`, starting and ending with a letter or digit, unique per kind.
//!
//! ```yaml
//! version: 1                                   # required; only 1
//! environments:                                # required, at least one
//!   - name: production
//!     match: { labels: { env: production } }  # required; enrollment labels that must all match ({} = all)
//!     kubernetes:
//!       api_endpoint: "10.0.0.10:6443"         # host:port (IPv4, [IPv6] or DNS name)
//!       ca_cert_hash: "sha256:<64 hex>"        # kubeadm discovery hash
//!       kubeadm_api: v1beta4                   # v1beta3 | v1beta4 (default v1beta4)
//!       credentials: { kubeconfig: /etc/nimbus/envs/production.kubeconfig }  # or { token_command: [argv..] }
//!       join_token_command: [/usr/local/bin/mint-join-token, --cluster, prod]  # optional: bootstrap tokens
//! pools:                                       # required, at least one
//!   - name: fast-nvme
//!     environments: [production, staging]     # optional; default all
//!     match:                                   # required; every given rule must hold ({} = every node)
//!       platform: [aws, azure, baremetal]      # aws azure opennebula vmware baremetal other-virtual
//!       instance_type: ["i3.*", "i3en.*", "Standard_L*"]  # globs: * any run, ? one character ("i3.*" misses i3en)
//!       min_cpus: 8                            # online logical CPUs
//!       min_memory: 60GiB                      # MemTotal; units B KiB MiB GiB TiB KB MB GB TB (unit required)
//!       local_nvme: true                       # true: has a local NVMe disk; false: has none
//!       zone: ["eu-west-1a"]                   # declared zone, else the cloud metadata zone
//!       labels: { tier: db }                   # enrollment labels
//!     min: 1                                   # default 0; fewer placed nodes -> warning
//!     max: 10                                  # optional; extra nodes (by name) stay unplaced
//!     max_unavailable: 1                       # for rollout waves; default 1, at least 1
//!     labels: { "polynimbus.io/storage": fast }  # extra node labels
//! cohorts:                                     # optional
//!   - name: hub-enclave
//!     pools: [fast-nvme, performance]          # required, non-empty, existing pools
//!     labels: { "polynimbus.io/cohort-hub-enclave": "true" }
//!     taints: [ { key: polynimbus.io/enclave, value: "true", effect: NoSchedule } ]  # value optional
//!     anti_affinity: [edge]                    # cohorts it prefers not to share a node with
//! ```
//!
//! Rules beyond syntax:
//!
//! - Label keys and values follow Kubernetes syntax. Labels and taint keys the policy puts on nodes (pool and
//!   cohort `labels`, taint `key`) must be under `polynimbus.io/` or a sub-domain (`team.polynimbus.io/`);
//!   `kubernetes.io` and `k8s.io` keys (e.g. `node-role.kubernetes.io/*`) are refused, since the
//!   NodeRestriction admission plugin stops kubelets from setting them. Placement adds
//!   `polynimbus.io/env=<env>`, `polynimbus.io/pool=<pool>` and `polynimbus.io/cohort.<cohort>=true`
//!   itself; the file may not set those keys.
//! - A node belongs to one environment and one pool: two environments whose label sets contain one another,
//!   and two pools sharing an environment where one accepts every node the other accepts (identical rules,
//!   an empty `match`, or weaker rules), are errors. Other overlaps are found at placement.
//! - The labels and taints of a pool and of all cohorts on it must not disagree (same key, different value;
//!   for taints same key and effect).
//! - Hardware rules (`platform`, `instance_type`, `min_cpus`, `min_memory`, `local_nvme`) need the node's
//!   inventory; a node without one does not match them.
//! - `local_nvme` counts NVMe disks classed as local instance storage (AWS instance store, Azure NVMe direct
//!   disks) or as physical (bare metal); not EBS/managed disks on NVMe, VMware's emulated NVMe, nor the Azure
//!   SCSI resource disk.

mod canonical;
mod decode;
mod diagnostic;
mod diff;
mod model;
mod place;
mod storage_select;
mod syntax;
mod validate;

pub use canonical::{CANONICAL_SOURCE, parse};
pub use diagnostic::{Diagnostic, Location, PolicyErrors};
pub use diff::{Change, NodeChange, diff};
pub use model::{
    COHORT_LABEL_PREFIX, Cohort, Credentials, ENV_LABEL, Environment, EnvironmentMatch, ItemKind, KubeadmApi,
    Kubernetes, LABEL_DOMAIN, POLICY_VERSION, POOL_LABEL, Policy, Pool, PoolMatch, Taint, TaintEffect,
};
pub use model::{DiskSelector, StorageLayout, StorageProfile};
/// Kubernetes name syntax, shared with the kube crate (which checks again what it renders).
pub mod k8s_syntax {
    pub use crate::syntax::{is_dns_subdomain, is_label_name};
}
pub use place::{Assignment, NodeFacts, NodePlacement, Placement, Warning, has_local_nvme, place, place_with_previous};
pub use storage_select::volumes as storage_volumes;
