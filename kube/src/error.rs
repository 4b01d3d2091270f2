//! [`KubeError`]: every failure of this crate. Messages say what was wrong and what to do; none contains a
//! bootstrap token's secret (kubeadm output is redacted before it lands in [`KubeError::JoinFailed`]).

use std::path::PathBuf;
use std::time::Duration;

/// Errors of `nimbus-kube`.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A string that should be a bootstrap token is not one. The input is never echoed (it may be a secret).
    #[error(
        "malformed bootstrap token: {reason}; expected the kubeadm format [a-z0-9]{{6}}.[a-z0-9]{{16}} \
         (for example as printed by `kubeadm token generate`)"
    )]
    InvalidToken {
        /// What was wrong, without the token itself.
        reason: String,
    },

    /// A label or taint key outside `polynimbus.io`.
    #[error(
        "{what} key {key:?} is not allowed: {reason}; use a key under polynimbus.io (for example \
         polynimbus.io/pool) — other prefixes are refused by NodeRestriction or owned by someone else"
    )]
    ForbiddenKey {
        /// `"label"` or `"taint"`.
        what: &'static str,
        /// The offending key.
        key: String,
        /// Why it was refused.
        reason: String,
    },

    /// A join parameter (node name, endpoint, CA hash, label value, taint effect, kubelet argument) is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidParams {
        /// Which parameter.
        field: String,
        /// What was wrong and what is expected.
        reason: String,
    },

    /// Serialising or parsing YAML failed.
    #[error("YAML {action} failed: {source}")]
    Yaml {
        /// What was being done.
        action: String,
        /// The YAML error.
        #[source]
        source: serde_norway::Error,
    },

    /// A file system operation failed.
    #[error("{action} {path}: {source}; check that the directory exists and is writable by this process", path = path.display())]
    Io {
        /// What was being done ("writing", "renaming", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A program could not be started.
    #[error("cannot run {program}: {source}; check the configured path and that it is executable", program = program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// `kubeadm join` failed or timed out. `tail` is the end of its output with the token redacted.
    #[error(
        "kubeadm join failed{}{}; the node is half-joined: reset it (kubeadm reset --force) and retry with a \
         fresh token. Last output: {}",
        phase.as_ref().map(|p| format!(" in phase [{p}]")).unwrap_or_default(),
        exit.map(|c| format!(" with exit code {c}")).unwrap_or_else(|| " (killed: timed out or signalled)".into()),
        summary(tail)
    )]
    JoinFailed {
        /// The last kubeadm phase seen (`preflight`, `kubelet-start`, ...), or the one kubeadm named as failing.
        phase: Option<String>,
        /// The exit code; `None` when kubeadm was killed (timeout) or died from a signal.
        exit: Option<i32>,
        /// The last lines of output, token redacted.
        tail: Vec<String>,
    },

    /// `kubeadm reset` failed or timed out.
    #[error(
        "kubeadm reset failed{}; inspect the node by hand (kubeadm reset --force -v=5). Last output: {}",
        exit.map(|c| format!(" with exit code {c}")).unwrap_or_else(|| " (killed: timed out or signalled)".into()),
        summary(tail)
    )]
    ResetFailed {
        /// The exit code; `None` when killed.
        exit: Option<i32>,
        /// The last lines of output, token redacted.
        tail: Vec<String>,
    },

    /// Another kubeadm command (`version`) failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// What happened.
        reason: String,
    },

    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {reason}; check the environment's kubeconfig path and its current context", path = path.display())]
    Kubeconfig {
        /// The kubeconfig path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A Kubernetes API call failed.
    #[error(
        "Kubernetes API: {action} failed: {source}; check the API server is reachable and the kubeconfig's credentials may do this (RBAC)"
    )]
    Api {
        /// What was being done (`"create Secret kube-system/bootstrap-token-abcdef"`).
        action: String,
        /// The client error (carries the API server's status and message).
        #[source]
        source: Box<kube::Error>,
    },

    /// A bootstrap token Secret with this id exists already.
    #[error("bootstrap token id {id} is already in use in kube-system; generate another token")]
    TokenExists {
        /// The token id (public part).
        id: String,
    },

    /// The Node object does not exist.
    #[error("node {node} does not exist in the cluster; was it deleted, or has it not registered yet?")]
    NodeNotFound {
        /// The node name.
        node: String,
    },

    /// Draining did not finish before the deadline.
    #[error(
        "draining node {node} did not finish within {}: {} pod(s) still there ({}); a PodDisruptionBudget may \
         block eviction — raise the deadline or fix the budget",
        humantime::format_duration(*deadline), remaining.len(), remaining.join(", ")
    )]
    DrainTimeout {
        /// The node.
        node: String,
        /// The deadline that passed.
        deadline: Duration,
        /// Pods (`namespace/name`) not yet evicted or not yet gone.
        remaining: Vec<String>,
    },

    /// The operator's token command failed or printed something that is not a token.
    #[error("token command `{command}` {reason}{}", if stderr.is_empty() { String::new() } else { format!("; stderr: {stderr}") })]
    TokenCommand {
        /// The command line (argv joined by spaces).
        command: String,
        /// What went wrong (never the token).
        reason: String,
        /// Its standard error, truncated, anything token-shaped blanked.
        stderr: String,
    },
}

/// The most telling line of kubeadm output: its `error execution phase ...` line, else the last non-empty one.
fn summary(tail: &[String]) -> &str {
    tail.iter()
        .rev()
        .find(|l| l.contains("error execution phase"))
        .or_else(|| tail.iter().rev().find(|l| !l.trim().is_empty()))
        .map(String::as_str)
        .unwrap_or("(none)")
}

impl KubeError {
    pub(crate) fn api(action: impl Into<String>, source: kube::Error) -> Self {
        KubeError::Api {
            action: action.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        KubeError::InvalidParams {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
