//! Error types of the coordinator and the one mapping from state errors to
//! gRPC statuses.

use std::path::PathBuf;

use crate::state::StateError;

/// Errors that stop the coordinator from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    #[error("cannot open the state store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("certificate authority: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Tunnel(#[from] tunnel::TunnelError),
    #[error("cannot listen for {what} on {addr}: {source}; {hint}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
        hint: String,
    },
    #[error("admin socket {path}: {reason}")]
    AdminSocket { path: PathBuf, reason: String },
    #[error("{what} server failed: {source}")]
    Serve {
        what: &'static str,
        source: tonic::transport::Error,
    },
    #[error("data directory {path}: {source}; check ownership and permissions or choose another --data-dir")]
    DataDir { path: PathBuf, source: std::io::Error },
}

impl CoordError {
    /// Process exit code for this error (64 = bad configuration).
    pub fn exit_code(&self) -> i32 {
        match self {
            CoordError::Config(_) => daemon::config::EXIT_USAGE,
            _ => 1,
        }
    }
}

/// Map a listen error to an actionable hint.
pub fn listen_hint(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "another process uses this port: stop it or choose another port".into(),
        std::io::ErrorKind::AddrNotAvailable => {
            "the address is not assigned to this host: use one of its addresses or 0.0.0.0".into()
        }
        std::io::ErrorKind::PermissionDenied => "not permitted: run as root or grant CAP_NET_BIND_SERVICE".into(),
        _ => "check the address and port".into(),
    }
}

impl From<&StateError> for tonic::Status {
    fn from(e: &StateError) -> Self {
        use tonic::Status;
        match e {
            StateError::TokenMalformed(_) => Status::invalid_argument(e.to_string()),
            StateError::TokenInvalid
            | StateError::TokenExpired { .. }
            | StateError::TokenUsedUp
            | StateError::TokenRevoked => Status::unauthenticated(e.to_string()),
            StateError::KeyRevoked | StateError::TokenMacMismatch { .. } => Status::permission_denied(e.to_string()),
            StateError::Ipam(_) => Status::resource_exhausted(e.to_string()),
            StateError::NotFound { .. } => Status::not_found(e.to_string()),
            StateError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            StateError::Conflict => Status::aborted(e.to_string()),
            _ => {
                tracing::error!(error = %e, "state store failure");
                Status::internal("internal state store error; see the coordinator log")
            }
        }
    }
}

impl From<StateError> for tonic::Status {
    fn from(e: StateError) -> Self {
        (&e).into()
    }
}
