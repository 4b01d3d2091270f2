//! Agent errors and their documented exit codes.
//!
//! | code | meaning | systemd |
//! |---|---|---|
//! | 0  | stopped by SIGTERM/SIGINT | — |
//! | 1  | runtime failure (retry) | `Restart=on-failure` restarts |
//! | 10 | this node was revoked | `RestartPreventExitStatus=10` |
//! | 64 | bad usage or configuration, malformed join token | also prevented |
//! | 69 | coordinator unreachable during enrollment | restarted |
//! | 75 | restart into the new current version (exited after staging and activating an upgrade) | the launcher restarts it at once |
//! | 77 | enrollment refused (token expired/used up/unknown, CA pin mismatch) | also prevented |
//!
//! Under `nimbus-agent launch` (the unit's `ExecStart`) the launcher ends with the agent's code, or by the
//! signal that killed it, so the table above is what systemd sees. Exceptions: 75 after ready starts the new
//! current version instead; a *pending* version that exits (any code) or is killed before READY=1, or misses
//! the deadline, is a failed start, retried and after `--max-failures` rolled back. The launcher's own
//! failures: 1 (cannot wait for the agent, or cannot start the package binary); if it cannot create its notify
//! socket or signalfd it replaces itself with the agent (same PID, no rollback protection).

use std::path::PathBuf;

pub const EXIT_REVOKED: u8 = 10;
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;
/// `EX_TEMPFAIL`: "restart me"; the launcher starts the (new) current version at once.
pub const EXIT_RESTART: u8 = 75;
pub const EXIT_REFUSED: u8 = 77;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    #[error("malformed join token: {0}; expected nimbus1.<id>.<secret> as printed by `nimbusctl token create`")]
    MalformedToken(String),
    #[error(
        "this host is not enrolled yet and no join token was given: pass --token (or --token-file) from `nimbusctl token create`"
    )]
    NoToken,
    #[error("enrollment refused by the coordinator: {0}")]
    Refused(String),
    #[error(
        "the coordinator at {addr} presented a certificate that does not match the pin {pin}: {detail}; check --ca-pin against `nimbusctl token create`"
    )]
    PinMismatch { addr: String, pin: String, detail: String },
    #[error("cannot reach the coordinator at {addr}: {detail}; check --coordinator and that TCP port is open")]
    Unreachable { addr: String, detail: String },
    #[error("this node was revoked: {0}")]
    Revoked(String),
    #[error("state directory {path}: {detail}; check ownership and permissions or choose another --state-dir")]
    StateDir { path: PathBuf, detail: String },
    #[error("{0}")]
    Tunnel(#[from] tunnel::TunnelError),
    #[error(
        "the coordinator's enrollment answer lists an invalid replica: {0}; is the coordinator a compatible version?"
    )]
    Replicas(#[from] crate::replicas::ReplicaError),
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) | AgentError::MalformedToken(_) | AgentError::NoToken => EXIT_USAGE,
            AgentError::Refused(_) | AgentError::PinMismatch { .. } => EXIT_REFUSED,
            AgentError::Unreachable { .. } => EXIT_UNAVAILABLE,
            AgentError::Revoked(_) => EXIT_REVOKED,
            _ => 1,
        }
    }
}
