//! The Kubernetes side of node join: bootstrap tokens, the kubeadm `JoinConfiguration`, running `kubeadm`
//! on the agent, and the cluster API calls the coordinator makes.
//!
//! # Layout
//!
//! - [`token`]: [`token::BootstrapToken`], the kubeadm bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`): generate,
//!   parse, the `bootstrap-token-<id>` Secret manifest, and redaction (`Debug`/`Display` never show the secret;
//!   [`token::scrub`] blanks anything token-shaped in free text).
//! - [`join`]: [`join::JoinParams`] and [`join::render`], the `JoinConfiguration` YAML for kubeadm API
//!   `v1beta3` and `v1beta4`; labels and taints must live under `polynimbus.io` (the kubelet may set those at
//!   registration, NodeRestriction refuses `*.kubernetes.io`/`k8s.io` ones). [`join::write_config`] writes
//!   the file mode 0600, atomically. Pure apart from `write_config`.
//! - [`kubeadm`]: [`kubeadm::Kubeadm`] on the agent: [`kubeadm::Kubeadm::state`] (joined, not joined,
//!   half-joined, from files under `/etc/kubernetes` and `/var/lib/kubelet`), `join` (output streamed into the
//!   log with the token redacted, the last `[phase]` reported), `reset`, and
//!   [`kubeadm::Kubeadm::ensure_joined`] (idempotent join with reset, backoff and a fresh token per retry).
//! - [`cluster`]: the [`cluster::Cluster`] trait (bootstrap token Secrets, node label/taint reconciliation under
//!   `polynimbus.io`, cordon, drain through the Eviction API, node deletion), [`cluster::KubeCluster`] over
//!   kube-rs from a kubeconfig path, and [`cluster::CommandTokenSource`] (an operator command that prints a
//!   token).
//! - [`error`]: [`KubeError`], the one error type of the crate.
//!
//! **Invariant:** no error, log line or `Debug` output of this crate contains a bootstrap token's secret.
//! **Invariant:** only keys under `polynimbus.io` are ever written to a Node's labels or taints.

pub mod cluster;
pub mod error;
pub mod join;
pub mod kubeadm;
pub mod token;

pub use error::KubeError;
