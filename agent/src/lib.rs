//! # nimbus-agent
//!
//! The host agent: enrolls once with a join token (TLS, CA pin), persists its
//! identity, brings up the embedded WireGuard tunnel to the coordinator and
//! keeps one fleet stream open inside it.
//!
//! # Layout
//! * `backoff`   — reconnect delays: exponential, capped, jittered.
//! * `config`    — file + flag configuration, validated as a whole.
//! * `identity`  — `identity.json` and `wg.key` in the state directory (0600).
//! * `enroll`    — the Enrollment client (pinned TLS), also used for the
//!   revocation check of an agent whose tunnel stays dead.
//! * `run`       — tunnel, reconnect loop with backoff and jitter, heartbeats.
//! * `inventory` — the inventory watcher: collect (nimbus-inventory), enrich from cloud metadata once,
//!   re-collect on a timer and on uevents, publish only changes.
//! * `probes`    — the latency probe socket and driver (nimbus-latency), configured by the coordinator.
//! * `uevent`    — kernel uevent listener that wakes the watcher when disks or NICs change.
//! * `desired`   — the desired state recorded in `desired.json` and acknowledged.
//! * `join`      — kubelet join / reset with kubeadm (nimbus-kube).
//! * `volumes`   — the storage plan applied with nimbus-storage; removal at decommission.
//! * `install`   — `nimbus-agent bootstrap`: install the agent on a bare host, idempotently.
//! * `drift`     — hand-made changes to what the agent manages, found and reverted on a timer.
//! * `versions`  — staged agent versions (`versions/<v>/`, the `current` link, `upgrade.json`): stage,
//!   activate, confirm, roll back, clean up; every step crash-safe.
//! * `launcher`  — `nimbus-agent launch`, the unit's main process: starts the resolved version, relays its
//!   sd_notify messages, forwards signals, rolls back a new version that does not become ready.
//! * `error`     — `AgentError` and the documented exit codes.

pub mod backoff;
pub mod config;
pub mod desired;
pub mod drift;
pub mod enroll;
pub mod error;
pub mod identity;
pub mod install;
pub mod inventory;
pub mod join;
pub mod launcher;
pub mod probes;
pub mod run;
pub mod uevent;
pub mod versions;
pub mod volumes;

pub use config::Config;
pub use error::AgentError;

/// Version reported to the coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
