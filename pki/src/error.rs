//! [`PkiError`] and [`classify`].

use std::error::Error;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::Pin;

/// Everything that can go wrong in this crate. `Clone` (sources are shared) so that an error found deep
/// inside a tonic error chain with [`classify`] can be returned as is.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PkiError {
    /// The coordinator's TLS chain holds no certificate with the expected pin: wrong pin, or not our
    /// coordinator. Never retry blindly.
    #[error(
        "coordinator at {addr} presented a certificate chain whose CA does not match the pin {expected}; \
         check the --ca-pin printed by `nimbusctl token create` (pins in the presented chain: {})",
        join(seen)
    )]
    PinMismatch {
        addr: String,
        expected: Pin,
        /// Pins of the certificates the server presented, end-entity first.
        seen: Vec<Pin>,
    },

    /// TCP connect failed or timed out (or the name did not resolve). Usually worth retrying.
    #[error("cannot reach coordinator at {addr}: {source}; check the address and that port is open")]
    Unreachable {
        addr: String,
        #[source]
        source: Arc<io::Error>,
    },

    /// The TLS handshake failed for another reason than the pin (certificate not valid for
    /// `nimbus-coordinator`, expired, not TLS at all, handshake timeout, ...).
    #[error(
        "TLS handshake with coordinator at {addr} failed: {source}; check that this is the coordinator's \
         enrollment address and that its certificate is issued by the pinned CA for the name `nimbus-coordinator`"
    )]
    Tls {
        addr: String,
        #[source]
        source: Arc<io::Error>,
    },

    /// The gRPC (HTTP/2) layer failed after TLS was up.
    #[error(
        "gRPC connection to coordinator at {addr} failed: {source}; check that this is the coordinator's enrollment address"
    )]
    Transport {
        addr: String,
        #[source]
        source: Arc<tonic::transport::Error>,
    },

    /// A `--ca-pin` value that is not `sha256:<64 hex digits>`.
    #[error(
        "invalid CA pin `{input}`: {reason}; expected `sha256:` followed by 64 hex digits, as printed by \
         `nimbusctl token create`"
    )]
    InvalidPin { input: String, reason: String },

    /// A coordinator address that is not `host:port`.
    #[error("invalid coordinator address `{addr}`: {reason}; expected host:port, e.g. 192.0.2.10:7443")]
    InvalidAddress { addr: String, reason: String },

    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {source}; {hint}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: Arc<io::Error>,
    },

    /// A private key file that group or others may access.
    #[error(
        "private key {} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}` and make \
         sure it is owned by the user the daemon runs as",
        path.display(), path.display()
    )]
    InsecureKeyPermissions { path: PathBuf, mode: u32 },

    /// Only one of `ca.crt` / `ca.key` exists.
    #[error(
        "found {} but not {}; restore {} from a backup, or remove {} to create a new CA (agents and join \
         tokens then need the new pin)",
        present.display(), missing.display(), missing.display(), present.display()
    )]
    IncompleteCa { present: PathBuf, missing: PathBuf },

    /// A PEM file or text that does not hold what it should (or a key that does not match its
    /// certificate). `what` names the file.
    #[error("invalid {what}: {reason}")]
    BadPem { what: String, reason: String },

    /// A server certificate name that is neither a DNS name nor an IP address.
    #[error("invalid server certificate name `{name}`: {reason}; use a DNS name or an IP address")]
    InvalidSan { name: String, reason: String },

    /// Generating or signing a certificate failed.
    #[error("cannot generate the {what}: {source}")]
    Certificate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },

    /// A CA rotation step out of order (start while one runs, finish with none running).
    #[error("CA rotation: {reason}")]
    CaRotation { reason: String },

    /// Building the rustls configuration failed (a bug or an unsupported key).
    #[error("cannot build the TLS configuration: {source}")]
    TlsConfig {
        #[source]
        source: rustls::Error,
    },
}

impl PkiError {
    /// The coordinator answered but is not the one the pin names.
    pub fn is_pin_mismatch(&self) -> bool {
        matches!(self, PkiError::PinMismatch { .. })
    }

    /// The coordinator could not be reached at all (connection refused, timeout, DNS).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PkiError::Unreachable { .. })
    }
}

fn join(pins: &[Pin]) -> String {
    if pins.is_empty() {
        return "none".into();
    }
    pins.iter().map(Pin::to_string).collect::<Vec<_>>().join(", ")
}

/// Find the [`PkiError`] at the root of an error chain: the error itself, any `source()`, and the
/// payload of any `std::io::Error` on the way (whose `source()` skips it). Works on
/// `tonic::transport::Error` from [`connect_pinned`](crate::connect_pinned) and on the `tonic::Status`
/// of an RPC over a pinned channel that failed to reconnect.
pub fn classify<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a PkiError> {
    let mut current = Some(err);
    // Bounded walk: error chains are short, a cycle would be a bug elsewhere.
    for _ in 0..64 {
        let e = current?;
        if let Some(found) = e.downcast_ref::<PkiError>() {
            return Some(found);
        }
        if let Some(io_err) = e.downcast_ref::<io::Error>()
            && let Some(inner) = io_err.get_ref()
        {
            let inner: &(dyn Error + 'static) = inner;
            if let Some(found) = classify(inner) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct Wrapper(Box<dyn Error + Send + Sync>);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "wrapped: {}", self.0)
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(self.0.as_ref())
        }
    }

    #[test]
    fn classify_walks_sources_and_io_payloads() {
        let pin = Pin::of_der(b"a");
        let mismatch = PkiError::PinMismatch {
            addr: "192.0.2.1:7443".into(),
            expected: pin,
            seen: vec![Pin::of_der(b"b")],
        };
        let msg = mismatch.to_string();
        assert!(
            msg.starts_with(
                "coordinator at 192.0.2.1:7443 presented a certificate chain whose CA does not match the pin sha256:"
            ),
            "{msg}"
        );
        assert!(msg.contains(&Pin::of_der(b"b").to_string()), "{msg}");
        assert!(msg.contains("--ca-pin printed by `nimbusctl token create`"), "{msg}");

        let nested = Wrapper(Box::new(io::Error::other(Wrapper(Box::new(mismatch)))));
        let found = classify(&nested).expect("found through Wrapper -> io::Error -> Wrapper");
        assert!(found.is_pin_mismatch());

        let status = tonic::Status::from_error(Box::new(nested));
        assert!(classify(&status).is_some_and(PkiError::is_pin_mismatch));

        let unrelated = Wrapper(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(classify(&unrelated).is_none());
    }
}
