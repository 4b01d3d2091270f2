//! The coordinator's certificate authority, CA pins, and pinned TLS connections for enrollment.
//!
//! The coordinator serves enrollment over TLS with a server certificate issued by its own CA (created
//! on first start, or operator-provided). `nimbusctl token create` prints the CA's SHA-256 [`Pin`];
//! an agent only talks to a coordinator whose presented chain contains a certificate with that pin,
//! and verifies the server certificate against that one CA for the name [`SERVER_NAME`].
//!
//! # Layout
//!
//! - [`pin`]: [`Pin`], the `sha256:<hex>` fingerprint of a DER certificate.
//! - [`ca`]: [`CertificateAuthority`] (`ca.crt`/`ca.key` on disk, 0644/0600) and [`ServerIdentity`]
//!   (a leaf chain + key for tonic's `ServerTlsConfig`, issued by the CA or read from operator files).
//! - [`client`]: the pinned rustls verifier, [`tls_connect`] and [`connect_pinned`] (a tonic
//!   `Channel` whose every (re)connection is pinned).
//! - [`error`]: [`PkiError`] and [`classify`], which finds a `PkiError` inside tonic/hyper error
//!   chains so callers can tell a pin mismatch from an unreachable coordinator.
//!
//! Invariants: everything here passes the ring provider explicitly; only tonic's server TLS needs the
//! process-wide one, which [`install_crypto_provider`] sets (the coordinator calls it before serving). Private
//! keys never appear in `Debug` output or logs.

pub mod ca;
pub mod client;
pub mod error;
pub mod pin;

pub use ca::{CertificateAuthority, ServerIdentity};
pub use client::{ConnectFailures, client_config, connect_pinned, connect_pinned_tracked, tls_connect};
pub use error::{PkiError, classify};
pub use pin::Pin;

/// Makes ring the process-wide rustls provider, for code that builds rustls configurations without naming one
/// (tonic's `ServerTlsConfig`). Needed because the build also carries aws-lc-rs (through `tough`): with two
/// providers compiled in, rustls cannot pick one by itself and panics. Idempotent; call it at startup.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// DNS name always present in server certificates; agents verify the coordinator against this name,
/// whatever address they dialled.
pub const SERVER_NAME: &str = "nimbus-coordinator";
