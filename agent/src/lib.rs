//! # nimbus-agent
//!
//! The host agent: enrolls once with a join token (TLS, CA pin), persists its
//! identity, brings up the embedded WireGuard tunnel to the coordinator and
//! keeps one fleet stream open inside it, on one coordinator replica at a time.
//!
//! # Layout
//! * `backoff`   — reconnect delays: exponential, capped, jittered.
//! * `config`    — file + flag configuration, validated as a whole.
//! * `identity`  — `identity.json` (with the coordinator replicas known) and `wg.key` in the state directory
//!   (0600).
//! * `enroll`    — the Enrollment client (pinned TLS), also used for the
//!   revocation check of an agent whose tunnel stays dead.
//! * `replicas`  — coordinator replicas without I/O: checking a replica list, the tunnel peer changes a new
//!   list needs, and which replica the fleet stream tries next (failover).
//! * `run`       — tunnel (a peer per replica), reconnect loop with failover, backoff and jitter, heartbeats.
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
//! * `upgrade`   — carries out the agent release a desired state names: decides (pure [`upgrade::decide`]),
//!   verifies and fetches it from the coordinator's TUF repository (nimbus-release) with the pinned root,
//!   stages and activates it (`versions`), reports, and asks for exit 75 so the launcher starts it.
//! * `metrics`   — Prometheus metrics and `GET /metrics`, `/healthz`, `/readyz` on `metrics_listen`.
//! * `cli`       — the `nimbus-agent` command line (`main.rs` only calls [`cli::main`]).
//! * `error`     — `AgentError` and the documented exit codes.
//!
//! The version this agent reports everywhere (Hello, enrollment, every `ObservedState`) is [`version()`].

pub mod backoff;
pub mod cli;
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
pub mod metrics;
pub mod probes;
pub mod replicas;
pub mod run;
pub mod uevent;
pub mod upgrade;
pub mod versions;
pub mod volumes;

pub use config::Config;
pub use error::AgentError;

/// The version this crate was built as (`CARGO_PKG_VERSION`); what [`version()`] returns unless
/// [`set_version`] changed it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static VERSION_OVERRIDE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The version this agent runs as and reports to the coordinator (Hello, enrollment facts, every
/// `ObservedState`), and compares with the version a desired state asks for. [`VERSION`] by default.
pub fn version() -> &'static str {
    VERSION_OVERRIDE.get().copied().unwrap_or(VERSION)
}

/// Makes [`version()`] return `v` for the rest of the process; the first call wins, later ones change nothing.
///
/// For building test releases of *another* version from the same code (the e2e's `nimbus-agent-next` calls it
/// before [`cli::main`]), so an upgrade can be exercised without a second source tree. Not a runtime flag:
/// production binaries never call it, and nothing on the command line or in the configuration reaches it.
pub fn set_version(v: &'static str) {
    let _ = VERSION_OVERRIDE.set(v);
}
