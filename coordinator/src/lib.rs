//! # nimbus-coordinator
//!
//! Holds fleet state and serves three gRPC services:
//!
//! * **Enrollment** (`enroll`) — TLS on the public address; trades a join
//!   token for a node identity and adds the node as a WireGuard peer.
//! * **Fleet** (`fleet`) — one stream per agent, reachable only inside the
//!   WireGuard overlay (listener bound to the TUN device).
//! * **Admin** (`admin`) — for `nimbusctl`, on a Unix socket (0600).
//!
//! # Layout
//! * `auditlog` — the audit log (`audit` crate) on the store: append from handlers, checkpoints, `ListAudit`.
//! * `auth`     — admin callers and roles: the one RPC → role table, mTLS and OIDC credentials.
//! * `config`   — file + flag configuration, validated as a whole.
//! * `server`   — start-up order, serving, draining (`start`, `run`).
//! * `context`  — the shared `Ctx` the services hold.
//! * `sessions` — open fleet streams and in-memory last-seen, flushed in batches.
//! * `state`    — typed repository (nodes, tokens, IP allocations) over `store`.
//! * `store`    — the transactional key-value trait and its sled backend.
//! * `rotation` — key rotation: WireGuard key (announced to agents, overlap), enrollment certificate, CA.
//! * `token`    — join token format and hashing.
//! * `ipam`     — overlay address plan.
//! * `probes`   — the latency mesh: probe configs pushed to agents, reported windows kept per pair.
//! * `probeshare` — the mesh across replicas: members, the probe key (sealed) and windows shared through the store.
//! * `replication` — stores.yaml planned against measured latency (nimbus-planner), drift watch.
//! * `placement` — the fleet policy in the store: revisions, live placement, desired/observed per node.
//! * `rollout`  — disruptive changes in waves: health gates, deadlines, pause/resume/abort.
//! * `moves`    — nodes leaving a cluster in a rollout are drained there before they are told.
//! * `kek`      — the key-encryption key (file, NIMBUS_KEK, or a secret-manager command) and AES-GCM envelopes.
//! * `backup`   — encrypted backup/restore of store + data_dir secrets, and the sled → etcd migration.
//! * `leader`   — leader election on etcd (lease + fenced writes, `FencedStore`) for singleton work; always leader
//!   on sled.
//! * `replicas` — several coordinators on one etcd prefix: registry, per-replica overlay address, CA and WireGuard
//!   keys sealed in the store, fleet-wide sessions, mail between replicas, peers for every node.
//! * `join`     — per-node bootstrap tokens for kubelet joins.
//! * `clustersync` — node labels/taints kept in each environment's cluster through the Kubernetes API.
//! * `decommission` — drain, reset, revoke, free IP and name.
//! * `packages` — the package mirror: agent packages (and seeds) over HTTP for new hosts, content-addressed.
//! * `metrics`  — Prometheus counters and the `GET /metrics` endpoint.
//! * `error`    — `CoordError` and the one mapping to `tonic::Status`.

pub mod admin;
pub mod auditlog;
pub mod auth;
pub mod backup;
pub mod clustersync;
pub mod config;
pub mod context;
pub mod decommission;
pub mod enroll;
pub mod error;
pub mod fleet;
pub mod ipam;
pub mod join;
pub mod kek;
pub mod leader;
pub mod metrics;
pub mod moves;
pub mod packages;
pub mod placement;
pub mod probes;
pub mod probeshare;
pub mod releases;
pub mod replicas;
pub mod replication;
pub mod rollout;
pub mod rotation;
pub mod schema;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod token;
pub mod upgrade;

pub use config::Config;
pub use error::CoordError;
pub use server::{Running, run, start};

/// Version reported by the binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Refuses, as FAILED_PRECONDITION with the rule and what to do, an agent version this coordinator does not
/// serve (its own minor version and the one before: [`nimbus_proto::skew`]).
pub fn check_agent_skew(agent_version: &str) -> Result<(), tonic::Status> {
    let ours = semver::Version::parse(VERSION)
        .map_err(|e| tonic::Status::internal(format!("this coordinator's own version {VERSION:?} is invalid: {e}")))?;
    nimbus_proto::skew::check(&ours, agent_version).map_err(|e| tonic::Status::failed_precondition(e.to_string()))
}
