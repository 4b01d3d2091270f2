//! OIDC bearer tokens (JWT) on the remote admin API.
//!
//! A token is accepted only when its signature verifies under a key of the issuer's JWKS (looked up by `kid`,
//! asymmetric algorithms only: an `HS*` token or `alg: none` is refused, so a public key can never be used as
//! an HMAC secret), its `iss` equals the configured issuer, its `aud` contains the configured audience, and
//! `exp`/`nbf` hold (with [`LEEWAY`] for clock skew). Roles come from the configured claim (a dotted path to a
//! list of strings, Keycloak's `realm_access.roles` by default); names other than `viewer`, `operator` and
//! `admin` are ignored.
//!
//! Keys come from a configured JWKS file (air-gapped sites) or from the issuer: its discovery document
//! (`<issuer>/.well-known/openid-configuration`) names `jwks_uri`. Fetched keys are cached for [`JWKS_TTL`]; an
//! unknown `kid` refetches at most once per [`REFETCH_MIN_INTERVAL`] (the issuer rotated its key). Plain
//! `http://` is allowed for issuers on a loopback address only.
//!
//! Tokens are never logged; refusals say which check failed.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use super::{Principal, Role};
use crate::config::OidcSettings;

/// How long fetched keys are used before they are fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(600);
/// An unknown key id refetches the JWKS at most this often.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: u64 = 30;
/// Largest discovery document or JWKS read.
const MAX_DOCUMENT: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("bearer token is not a JWT: {0}")]
    Malformed(String),
    #[error(
        "bearer token algorithm {0:?} is not accepted; the issuer must sign with an asymmetric key (RS*, PS*, ES*, EdDSA)"
    )]
    Algorithm(Algorithm),
    #[error("bearer token has no key id (kid); the issuer must name its signing key")]
    NoKeyId,
    #[error("bearer token was signed by key {0:?}, which the issuer's JWKS does not list")]
    UnknownKey(String),
    #[error("bearer token rejected: {0}")]
    Invalid(String),
    #[error("bearer token has no subject (sub)")]
    NoSubject,
    #[error("cannot read the issuer's keys: {0}; check oidc_issuer / oidc_jwks_file and the coordinator's network")]
    Keys(String),
}

struct Cache {
    set: Option<Arc<JwkSet>>,
    fetched: Option<Instant>,
}

/// Checks bearer tokens of one issuer.
pub struct Verifier {
    settings: OidcSettings,
    tls: Arc<rustls::ClientConfig>,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.settings.issuer)
            .finish()
    }
}

impl Verifier {
    /// A verifier for `settings`. A configured JWKS file is read now (a bad file fails start-up); keys from the
    /// issuer are fetched on first use, so an issuer that is down at start does not stop the coordinator.
    pub fn new(settings: OidcSettings) -> Result<Verifier, OidcError> {
        let tls = client_config(settings.ca.as_deref())?;
        let set = match &settings.jwks_file {
            Some(path) => {
                let text = std::fs::read(path)
                    .map_err(|e| OidcError::Keys(format!("reading oidc_jwks_file {}: {e}", path.display())))?;
                let set: JwkSet = serde_json::from_slice(&text)
                    .map_err(|e| OidcError::Keys(format!("oidc_jwks_file {} is not a JWKS: {e}", path.display())))?;
                Some(Arc::new(set))
            }
            None => None,
        };
        Ok(Verifier {
            settings,
            tls,
            cache: Mutex::new(Cache { set, fetched: None }),
        })
    }

    /// The principal and roles `token` proves.
    pub async fn verify(&self, token: &str) -> Result<(Principal, BTreeSet<Role>), OidcError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| OidcError::Malformed(e.to_string()))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(OidcError::Algorithm(header.alg));
        }
        let kid = header.kid.ok_or(OidcError::NoKeyId)?;
        let jwk = self.key(&kid).await?;
        if let Some(alg) = jwk.common.key_algorithm
            && alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(OidcError::Invalid(format!(
                "key {kid:?} is for {alg}, the token says {:?}",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| OidcError::Keys(format!("key {kid:?}: {e}")))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = LEEWAY;
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| OidcError::Invalid(describe(&e)))?;
        let sub = data
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(OidcError::NoSubject)?;
        let roles = roles_at(&data.claims, &self.settings.roles_claim);
        Ok((Principal::oidc(sub), roles))
    }

    /// The issuer's key `kid`, from the cache or a (re)fetch.
    async fn key(&self, kid: &str) -> Result<Jwk, OidcError> {
        let mut cache = self.cache.lock().await;
        let from_file = self.settings.jwks_file.is_some();
        let stale = cache.fetched.is_none_or(|t| t.elapsed() > JWKS_TTL);
        if !from_file && (cache.set.is_none() || stale) {
            self.refresh(&mut cache).await?;
        }
        if let Some(k) = cache.set.as_ref().and_then(|s| s.find(kid)) {
            return Ok(k.clone());
        }
        let may_refetch = cache.fetched.is_none_or(|t| t.elapsed() > REFETCH_MIN_INTERVAL);
        if !from_file && may_refetch {
            self.refresh(&mut cache).await?;
            if let Some(k) = cache.set.as_ref().and_then(|s| s.find(kid)) {
                return Ok(k.clone());
            }
        }
        Err(OidcError::UnknownKey(kid.to_string()))
    }

    async fn refresh(&self, cache: &mut Cache) -> Result<(), OidcError> {
        let issuer = self.settings.issuer.trim_end_matches('/');
        let discovery: Value = self
            .get_json(&format!("{issuer}/.well-known/openid-configuration"))
            .await?;
        if discovery.get("issuer").and_then(Value::as_str) != Some(self.settings.issuer.as_str()) {
            return Err(OidcError::Keys(format!(
                "the discovery document names issuer {:?}, not {:?}; set oidc_issuer to the exact issuer URL",
                discovery.get("issuer"),
                self.settings.issuer
            )));
        }
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| OidcError::Keys("the discovery document has no jwks_uri".into()))?;
        let set: JwkSet = serde_json::from_value(self.get_json(jwks_uri).await?)
            .map_err(|e| OidcError::Keys(format!("{jwks_uri} is not a JWKS: {e}")))?;
        tracing::info!(issuer = %self.settings.issuer, keys = set.keys.len(), "OIDC signing keys fetched");
        cache.set = Some(Arc::new(set));
        cache.fetched = Some(Instant::now());
        Ok(())
    }

    async fn get_json(&self, url: &str) -> Result<Value, OidcError> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, get(url, &self.tls))
            .await
            .map_err(|_| OidcError::Keys(format!("{url}: no answer within {FETCH_TIMEOUT:?}")))??;
        serde_json::from_slice(&body).map_err(|e| OidcError::Keys(format!("{url}: not JSON: {e}")))
    }
}

/// A readable reason for a failed JWT check (which claim, not the token).
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        ExpiredSignature => "the token has expired; get a new one".into(),
        ImmatureSignature => "the token is not valid yet (nbf)".into(),
        InvalidIssuer => "the token was issued by another issuer".into(),
        InvalidAudience => "the token is for another audience (aud)".into(),
        InvalidSignature => "the signature does not verify".into(),
        MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        other => format!("{other:?}"),
    }
}

/// The roles listed at the dotted `path` of `claims` (unknown names ignored).
pub fn roles_at(claims: &Value, path: &str) -> BTreeSet<Role> {
    let mut v = claims;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return BTreeSet::new(),
        }
    }
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).filter_map(Role::parse).collect())
        .unwrap_or_default()
}

fn client_config(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, OidcError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca {
        let pem =
            std::fs::read(path).map_err(|e| OidcError::Keys(format!("reading oidc_ca {}: {e}", path.display())))?;
        let mut any = false;
        for c in <rustls_pki_types::CertificateDer<'static> as rustls_pki_types::pem::PemObject>::pem_slice_iter(&pem) {
            let c = c.map_err(|e| OidcError::Keys(format!("oidc_ca {}: {e}", path.display())))?;
            roots
                .add(c)
                .map_err(|e| OidcError::Keys(format!("oidc_ca {}: {e}", path.display())))?;
            any = true;
        }
        if !any {
            return Err(OidcError::Keys(format!(
                "oidc_ca {} holds no certificate",
                path.display()
            )));
        }
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// GET `url` (https, or http to a loopback address), at most [`MAX_DOCUMENT`] bytes of 200 body.
async fn get(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Bytes, OidcError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| OidcError::Keys(format!("{url:?} is not a URL: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| OidcError::Keys(format!("{url:?} has no host")))?
        .to_string();
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") if bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || bare == "localhost" => false,
        _ => {
            return Err(OidcError::Keys(format!(
                "{url:?}: only https:// URLs (or http:// on loopback, for tests) are fetched"
            )));
        }
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| OidcError::Keys(format!("{url}: connect: {e}")))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    if https {
        let name =
            rustls_pki_types::ServerName::try_from(bare.clone()).map_err(|e| OidcError::Keys(format!("{url}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| OidcError::Keys(format!("{url}: TLS: {e}")))?;
        request(stream, &authority, &path, url).await
    } else {
        request(tcp, &authority, &path, url).await
    }
}

async fn request<S>(stream: S, authority: &str, path: &str, url: &str) -> Result<Bytes, OidcError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let err = |e: &dyn std::fmt::Display| OidcError::Keys(format!("{url}: {e}"));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| err(&e))?;
    let resp = send.send_request(req).await.map_err(|e| err(&e))?;
    if resp.status() != http::StatusCode::OK {
        return Err(OidcError::Keys(format!("{url}: HTTP {}", resp.status())));
    }
    let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| err(&e))?;
    Ok(body.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;
    use std::sync::Mutex as StdMutex;

    /// TEST STAND-IN for an OIDC issuer (Keycloak): serves a discovery document and the JWKS it is given, and
    /// counts JWKS fetches. Plain HTTP on loopback.
    struct FakeIssuer {
        url: String,
        jwks: Arc<StdMutex<Value>>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    }

    async fn fake_issuer() -> FakeIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/realms/ops", listener.local_addr().unwrap());
        let jwks = Arc::new(StdMutex::new(json!({"keys": []})));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (j, f, u) = (Arc::clone(&jwks), Arc::clone(&fetches), url.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (j, f, u) = (Arc::clone(&j), Arc::clone(&f), u.clone());
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = match req.uri().path() {
                        "/realms/ops/.well-known/openid-configuration" => {
                            json!({"issuer": u, "jwks_uri": format!("{u}/certs")}).to_string()
                        }
                        "/realms/ops/certs" => {
                            f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            j.lock().unwrap().to_string()
                        }
                        _ => String::new(),
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
            }
        });
        FakeIssuer { url, jwks, fetches }
    }

    fn es256(kid: &str) -> (jsonwebtoken::EncodingKey, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        (
            jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]), "kid": kid, "alg": "ES256"}),
        )
    }

    fn sign(key: &jsonwebtoken::EncodingKey, kid: &str, iss: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        let claims = json!({"sub": "op-1", "iss": iss, "aud": "nimbus", "exp": now + 300, "realm_access": {"roles": ["operator"]}});
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    }

    #[tokio::test]
    async fn keys_come_from_the_issuers_discovery_document_and_a_new_kid_refetches() {
        crate::auth::tests::provider();
        let issuer = fake_issuer().await;
        let (k1, jwk1) = es256("k1");
        *issuer.jwks.lock().unwrap() = json!({"keys": [jwk1]});
        let v = Verifier::new(OidcSettings {
            issuer: issuer.url.clone(),
            audience: "nimbus".into(),
            jwks_file: None,
            roles_claim: crate::config::DEFAULT_OIDC_ROLES_CLAIM.into(),
            ca: None,
        })
        .unwrap();
        let (p, roles) = v.verify(&sign(&k1, "k1", &issuer.url)).await.unwrap();
        assert_eq!(p, Principal::oidc("op-1"));
        assert_eq!(roles, [Role::Operator].into_iter().collect());
        // Cached: a second token costs no fetch.
        v.verify(&sign(&k1, "k1", &issuer.url)).await.unwrap();
        assert_eq!(issuer.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The issuer rotates to k2: the unknown kid triggers one refetch (after the minimum interval).
        let (k2, jwk2) = es256("k2");
        *issuer.jwks.lock().unwrap() = json!({"keys": [jwk2]});
        let err = v.verify(&sign(&k2, "k2", &issuer.url)).await.unwrap_err();
        assert!(
            matches!(err, OidcError::UnknownKey(_)),
            "refetch is rate-limited: {err}"
        );
        v.cache.lock().await.fetched = Some(Instant::now() - REFETCH_MIN_INTERVAL - Duration::from_secs(1));
        v.verify(&sign(&k2, "k2", &issuer.url)).await.unwrap();
        assert_eq!(issuer.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A token naming another issuer is refused even with a known key.
        let err = v.verify(&sign(&k2, "k2", "https://other.test")).await.unwrap_err();
        assert!(err.to_string().contains("another issuer"), "{err}");
    }

    #[test]
    fn plain_http_is_only_for_loopback_issuers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tls = client_config(None).unwrap();
        let err = rt.block_on(get("http://192.0.2.7/realms/x", &tls)).unwrap_err();
        assert!(err.to_string().contains("only https://"), "{err}");
    }

    #[test]
    fn roles_come_from_the_configured_claim_and_unknown_names_are_ignored() {
        let claims = json!({
            "realm_access": {"roles": ["operator", "offline_access", "viewer"]},
            "resource_access": {"nimbus": {"roles": ["admin"]}},
        });
        assert_eq!(
            roles_at(&claims, "realm_access.roles"),
            [Role::Viewer, Role::Operator].into_iter().collect()
        );
        assert_eq!(
            roles_at(&claims, "resource_access.nimbus.roles"),
            [Role::Admin].into_iter().collect()
        );
        assert!(roles_at(&claims, "groups").is_empty());
        assert!(roles_at(&json!({"realm_access": {"roles": "admin"}}), "realm_access.roles").is_empty());
    }
}
