//! Hot-swappable server certificate: a rustls [`ResolvesServerCert`] whose certificate and key
//! can be replaced while the listener runs (enrollment TLS certificate rotation without a
//! restart). Handshakes that already started keep the certificate they resolved; every later
//! handshake gets the new one.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::{Pin, PkiError, ServerIdentity};

/// A server certificate that can be swapped at run time. Share it as `Arc<SwappableServerCert>`:
/// one clone goes into the rustls configuration ([`SwappableServerCert::server_config`]), the
/// other stays with whoever rotates the certificate ([`SwappableServerCert::replace`]).
pub struct SwappableServerCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl SwappableServerCert {
    /// Starts with `identity`. Errors when its chain or key cannot be parsed or do not match.
    pub fn new(identity: &ServerIdentity) -> Result<Arc<Self>, PkiError> {
        Ok(Arc::new(SwappableServerCert {
            current: RwLock::new(certified_key(identity)?),
        }))
    }

    /// Serves `identity` from the next handshake on. Checked first: on error the current
    /// certificate stays in place.
    pub fn replace(&self, identity: &ServerIdentity) -> Result<(), PkiError> {
        let next = certified_key(identity)?;
        let leaf = next.cert.first().map(|der| Pin::of_der(der));
        match self.current.write() {
            Ok(mut slot) => *slot = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        tracing::info!(leaf = ?leaf, "server certificate replaced");
        Ok(())
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(slot) => Arc::clone(&slot),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The pin of the leaf certificate served now.
    pub fn leaf_pin(&self) -> Option<Pin> {
        self.current().cert.first().map(|der| Pin::of_der(der))
    }

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3, no client certificates)
    /// resolving through this certificate, with the given ALPN protocols (`[b"h2"]` for gRPC
    /// behind a `tokio_rustls::TlsAcceptor`).
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| PkiError::TlsConfig { source })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for SwappableServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl fmt::Debug for SwappableServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwappableServerCert")
            .field("leaf", &self.leaf_pin())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The rustls signing form of an identity (ring provider), checking that the key matches the leaf.
fn certified_key(identity: &ServerIdentity) -> Result<Arc<CertifiedKey>, PkiError> {
    let chain = identity.cert_chain()?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(|err| PkiError::BadPem {
        what: "server private key".into(),
        reason: format!("no PEM private key found ({err}); provide a PKCS#8, PKCS#1 or SEC1 PEM key"),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|err| PkiError::BadPem {
            what: "server identity".into(),
            reason: format!("the key does not belong to the first certificate ({err}); issue a new identity"),
        })
}
