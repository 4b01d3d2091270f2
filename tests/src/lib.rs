//! Multi-host harness for polynimbus: network namespaces joined by a bridge, daemons started inside them,
//! and the fixtures the end-to-end tests and the local lab (`nimbus-lab`) share.
//!
//! # Layout
//! - [`error`]: [`HarnessError`], the single error type (messages say what to do).
//! - [`wait`]: one patience setting ([`patience`], env `NIMBUS_E2E_PATIENCE_SECS`) and [`eventually`] /
//!   [`poll_until`] instead of sleeps.
//! - [`mod@env`]: [`require_root`] (skip or fail privileged tests), where the daemon binaries are ([`bin_dir`],
//!   [`binary`]).
//! - [`netns`]: [`Netns`] — `ip netns add`, `exec`, `bind_tcp`, `ping`, `tcp_connect`, delete on drop.
//! - [`topology`]: [`Lab`] — a switch namespace with a bridge and hosts with `eth0` on it; nothing is ever
//!   created in the root namespace; everything is deleted on drop, also while unwinding.
//! - [`process`]: [`Process`] — a daemon in a namespace with a log file, signals and exit codes;
//!   [`run_with_timeout`] for short commands.
//! - [`fleet`]: [`Fleet`] — coordinator + agents + `nimbusctl`, logs dumped when a test panics.
//! - [`lab`]: `nimbus-lab up/down/status` (the binary only parses flags).
//! - [`state`]: [`LabState`] file and [`teardown_from_state`] for `nimbus-lab down`.
//! - [`blockdev`]: [`blockdev::LoopDisk`] — a loop device with a `/dev/disk/by-id/` link, for storage tests.
//! - [`kubeadm`]: [`kubeadm::KubeadmStandIn`] — the kubeadm TEST STAND-IN installed per agent, and a stand-in
//!   join-token command.
//! - [`kube_api`]: [`kube_api::KubeApiStandIn`] — the Kubernetes API TEST STAND-IN process (not a Kubernetes
//!   API server) and its control client, for tests of what the coordinator does in a cluster.
//! - [`packages`]: helpers of the `.deb`/`.rpm` tests — commands that must succeed within a timeout, skip-or-fail
//!   prerequisites, a minimal `/etc` for throwaway roots, snapshots of host files that must not change.
//! - [`etcd`]: [`etcd::Etcd`] — a real single-member etcd on a namespace's loopback, restartable on its data.
//! - [`scrape`]: `GET /metrics` inside a namespace, Prometheus samples, metric names in docs and rules.
//! - [`delay`]: [`DelayLab`] — zones of hosts joined through a userspace delay router (TUN + policy routing,
//!   per-zone-pair delay, per-host loss; the `nimbus-delay-router` binary), for kernels without `netem`.
//!
//! Invariant: the harness only ever signals PIDs it started (checked against `/proc/PID/exe` and the start
//! time when they come from a state file), and only deletes namespaces it named.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod blockdev;
pub mod delay;
pub mod env;
pub mod error;
pub mod etcd;
pub mod fleet;
pub mod kube_api;
pub mod kubeadm;
pub mod lab;
pub mod netns;
pub mod packages;
pub mod process;
pub mod scrape;
pub mod state;
pub mod topology;
pub mod wait;
mod work;

pub use delay::{DelayHost, DelayLab, DelayLabBuilder, PingReport, RouterConfig, ping_rtts};
pub use env::{Binaries, bin_dir, binary, require_root};
pub use error::{HarnessError, Result};
pub use fleet::{Fleet, FleetOptions, JoinToken, Layout, ZoneLayout, agent_name};
pub use netns::Netns;
pub use process::{Process, ProcessBuilder, expect_success, run_with_timeout};
pub use state::{LabState, ProcessRecord, TeardownReport, teardown_from_state};
pub use topology::{Host, Lab, LabBuilder};
pub use wait::{Attempt, eventually, eventually_patiently, patience, poll_until};
