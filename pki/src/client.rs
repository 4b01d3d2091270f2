//! Pinned TLS to the coordinator: a rustls verifier that trusts only the CA named by a [`Pin`],
//! [`tls_connect`], and [`connect_pinned`] (a tonic `Channel` built on it).

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::{Pin, PkiError, SERVER_NAME, classify};

/// HTTP/2 keep-alive ping interval on pinned channels (detects a vanished coordinator on idle streams).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keep-alive ping may stay unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A rustls client configuration (ring provider, TLS 1.2/1.3, ALPN `h2`) that accepts a server only if
/// its presented chain contains a certificate with SHA-256 `pin`, and the end-entity certificate
/// verifies against that certificate alone for the name [`SERVER_NAME`].
pub fn client_config(pin: &Pin) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedVerifier {
        pin: *pin,
        provider: provider.clone(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| PkiError::TlsConfig { source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TCP-connect to `addr` (`host:port`) and do the pinned TLS handshake with server name
/// [`SERVER_NAME`]. `connect_timeout` bounds the TCP connect and, separately, the handshake.
///
/// Errors: [`PkiError::InvalidAddress`], [`PkiError::Unreachable`] (refused, timed out, name not
/// resolved), [`PkiError::PinMismatch`], [`PkiError::Tls`] (anything else in the handshake).
pub async fn tls_connect(addr: &str, pin: &Pin, connect_timeout: Duration) -> Result<TlsStream<TcpStream>, PkiError> {
    check_addr(addr)?;
    let config = client_config(pin)?;
    tls_connect_with(config, addr, pin, connect_timeout).await
}

async fn tls_connect_with(
    config: Arc<ClientConfig>,
    addr: &str,
    pin: &Pin,
    connect_timeout: Duration,
) -> Result<TlsStream<TcpStream>, PkiError> {
    let unreachable = |source: io::Error| PkiError::Unreachable {
        addr: addr.to_string(),
        source: Arc::new(source),
    };
    let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Err(unreachable(err)),
        Err(_) => {
            return Err(unreachable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connection timed out after {connect_timeout:?}"),
            )));
        }
    };
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%addr, error = %err, "cannot set TCP_NODELAY");
    }
    let server_name = ServerName::try_from(SERVER_NAME).map_err(|err| PkiError::TlsConfig {
        source: rustls::Error::General(err.to_string()),
    })?;
    let handshake = TlsConnector::from(config).connect(server_name, tcp);
    match tokio::time::timeout(connect_timeout, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(err)) => Err(handshake_error(addr, pin, err)),
        Err(_) => Err(PkiError::Tls {
            addr: addr.to_string(),
            source: Arc::new(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {connect_timeout:?}"),
            )),
        }),
    }
}

fn handshake_error(addr: &str, pin: &Pin, err: io::Error) -> PkiError {
    let mismatch = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
                other.downcast_ref::<PinNotInChain>()
            }
            _ => None,
        });
    match mismatch {
        Some(PinNotInChain { seen }) => PkiError::PinMismatch {
            addr: addr.to_string(),
            expected: *pin,
            seen: seen.clone(),
        },
        None => PkiError::Tls {
            addr: addr.to_string(),
            source: Arc::new(err),
        },
    }
}

fn check_addr(addr: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidAddress {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(invalid("it has no port"));
    };
    if host.is_empty() {
        return Err(invalid("the host is empty"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(invalid("IPv6 addresses must be in brackets, e.g. [2001:db8::1]:7443"));
    }
    if host.contains('/') {
        return Err(invalid("it looks like a URL; give only host:port"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid("the port is not a number from 1 to 65535")),
        Ok(_) => Ok(()),
    }
}

/// The last error of a pinned channel's connector.
///
/// tonic turns a failed *re*connection into `Status::unavailable(<message>)` and drops the source, so
/// [`classify`] cannot see a [`PkiError::PinMismatch`] behind a failed RPC. Pass one of these to
/// [`connect_pinned_tracked`] and look at [`ConnectFailures::last`] when an RPC fails with
/// `Unavailable`. A successful (re)connection clears it.
#[derive(Clone, Default)]
pub struct ConnectFailures(Arc<Mutex<Option<PkiError>>>);

impl ConnectFailures {
    /// A fresh, empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The error of the last connection attempt, if it failed.
    pub fn last(&self) -> Option<PkiError> {
        self.0
            .lock()
            .map(|slot| slot.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn set(&self, value: Option<PkiError>) {
        match self.0.lock() {
            Ok(mut slot) => *slot = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

impl fmt::Debug for ConnectFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectFailures").field(&self.last()).finish()
    }
}

/// Connect a tonic [`Channel`] to `addr` (`host:port`) over TLS, trusting only a chain whose CA matches
/// `pin` (see [`client_config`]). Connects eagerly, so a wrong pin or an unreachable coordinator is
/// reported here as [`PkiError::PinMismatch`] / [`PkiError::Unreachable`]; reconnections of the
/// returned channel are pinned the same way.
pub async fn connect_pinned(addr: &str, pin: &Pin, connect_timeout: Duration) -> Result<Channel, PkiError> {
    connect_pinned_tracked(addr, pin, connect_timeout, &ConnectFailures::new()).await
}

/// [`connect_pinned`], recording every connection attempt's outcome in `failures` (also for later
/// reconnections, where tonic hides the cause).
pub async fn connect_pinned_tracked(
    addr: &str,
    pin: &Pin,
    connect_timeout: Duration,
    failures: &ConnectFailures,
) -> Result<Channel, PkiError> {
    check_addr(addr)?;
    let config = client_config(pin)?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|err| PkiError::InvalidAddress {
            addr: addr.to_string(),
            reason: err.to_string(),
        })?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);

    let connector = {
        let addr = addr.to_string();
        let pin = *pin;
        let failures = failures.clone();
        tower::service_fn(move |_: Uri| {
            let config = config.clone();
            let addr = addr.clone();
            let failures = failures.clone();
            async move {
                match tls_connect_with(config, &addr, &pin, connect_timeout).await {
                    Ok(tls) => {
                        failures.set(None);
                        Ok(TokioIo::new(tls))
                    }
                    Err(err) => {
                        tracing::debug!(%addr, error = %err, "pinned connection attempt failed");
                        failures.set(Some(err.clone()));
                        Err(err)
                    }
                }
            }
        })
    };

    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|err| match classify(&err) {
            Some(found) => found.clone(),
            None => PkiError::Transport {
                addr: addr.to_string(),
                source: Arc::new(err),
            },
        })
}

/// Carried inside `rustls::Error` out of the handshake, turned into [`PkiError::PinMismatch`].
#[derive(Debug)]
struct PinNotInChain {
    seen: Vec<Pin>,
}

impl fmt::Display for PinNotInChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no certificate in the presented chain matches the CA pin")
    }
}

impl std::error::Error for PinNotInChain {}

#[derive(Debug)]
struct PinnedVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = std::iter::once(end_entity).chain(intermediates);
        let Some(anchor) = presented.clone().find(|der| Pin::of_der(der) == self.pin) else {
            let seen = presented.map(|der| Pin::of_der(der)).collect();
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(PinNotInChain { seen }),
            ))));
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|err| rustls::Error::General(format!("pinned CA is not a usable trust anchor: {err}")))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        for good in ["127.0.0.1:7443", "coord.example.org:1", "[2001:db8::1]:7443"] {
            check_addr(good).unwrap();
        }
        for bad in [
            "127.0.0.1",
            ":7443",
            "host:0",
            "host:x",
            "2001:db8::1:7443",
            "https://h:1",
        ] {
            let err = check_addr(bad).unwrap_err();
            assert!(matches!(err, PkiError::InvalidAddress { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains("expected host:port"), "{err}");
        }
    }
}
