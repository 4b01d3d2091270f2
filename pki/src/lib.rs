//! The coordinator's certificate authority, CA pins, and pinned TLS connections for enrollment.
//!
//! The coordinator serves enrollment over TLS with a server certificate issued by its own CA (created
//! on first start, or operator-provided). `nimbusctl token create` prints the CA's SHA-256 [`Pin`];
//! an agent only talks to a coordinator whose presented chain contains a certificate with that pin,
//! and verifies the server certificate against that one CA for the name [`SERVER_NAME`].
//!
//! # What a pin means
//!
//! A [`Pin`] is the SHA-256 of one CA certificate's DER encoding (not of a key). A client holding a
//! pin accepts a server when (1) some certificate in the presented chain has that hash and (2) the
//! leaf verifies (webpki path building through the other presented certificates, validity, name
//! [`SERVER_NAME`]) with that certificate as the only trust anchor. The pinned certificate's own
//! signature and validity are not checked: the pin is the trust.
//!
//! During a CA rotation ([`CertificateAuthority::rotate`]) the server presents
//! `[leaf, cross, previous CA, new CA]`, where `cross` is the new CA's subject and key signed by
//! the previous CA: a client pinning the previous CA anchors there and verifies
//! leaf → cross → previous CA; one pinning the new CA anchors on it directly. After
//! [`CertificateAuthority::finish_rotation`] the chain is `[leaf, new CA]` and previous-pin clients
//! get [`PkiError::PinMismatch`]. The client side needed no change for this.
//!
//! # Layout
//!
//! - [`pin`]: [`Pin`], the `sha256:<hex>` fingerprint of a DER certificate.
//! - [`ca`]: [`CertificateAuthority`] (`ca.crt`/`ca.key` on disk, 0644/0600; during a CA rotation
//!   also `ca-next.crt`/`ca-next.key`/`ca-cross.crt`) and [`ServerIdentity`]
//!   (a leaf chain + key for tonic's `ServerTlsConfig`, issued by the CA or read from operator files).
//! - [`reload`]: [`SwappableServerCert`], a rustls certificate resolver whose identity can be
//!   replaced while the listener runs (enrollment certificate rotation without restart).
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
pub mod reload;

pub use ca::{CertificateAuthority, ServerIdentity};
pub use client::{ConnectFailures, client_config, connect_pinned, connect_pinned_tracked, tls_connect};
pub use error::{PkiError, classify};
pub use pin::Pin;
pub use reload::SwappableServerCert;

/// Makes ring the process-wide rustls provider, for code that builds rustls configurations without naming one
/// (tonic's `ServerTlsConfig`). Needed because the build also carries aws-lc-rs (through `tough`): with two
/// providers compiled in, rustls cannot pick one by itself and panics. Idempotent; call it at startup.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// DNS name always present in server certificates; agents verify the coordinator against this name,
/// whatever address they dialled.
pub const SERVER_NAME: &str = "nimbus-coordinator";
