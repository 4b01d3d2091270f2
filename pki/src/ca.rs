//! The coordinator's certificate authority and its server identities.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::{Pin, PkiError, SERVER_NAME};

/// File name of the CA certificate (PEM, mode 0644) inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key (PEM PKCS#8, mode 0600) inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// During a CA rotation: the new CA certificate (PEM, 0644). Its presence means "rotation in
/// progress"; `ca.crt`/`ca.key` then still hold the previous CA.
pub const NEXT_CERT_FILE: &str = "ca-next.crt";
/// During a CA rotation: the new CA's private key (PEM PKCS#8, 0600).
pub const NEXT_KEY_FILE: &str = "ca-next.key";
/// During a CA rotation: the new CA certificate cross-signed by the previous CA (PEM, 0644).
pub const CROSS_CERT_FILE: &str = "ca-cross.crt";

/// Validity of a newly created CA: 10 years (like kubeadm's CA).
const CA_VALIDITY: Duration = Duration::days(3650);
/// Validity of a server certificate. They are issued afresh at every coordinator start.
const SERVER_CERT_VALIDITY: Duration = Duration::days(825);
/// Backdating of `notBefore`, for peers whose clocks are a little behind.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// The coordinator's CA: a self-signed certificate and its key, kept in a directory.
pub struct CertificateAuthority {
    /// The issuing CA (the new one during a rotation).
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    /// Set while a CA rotation is in its overlap.
    overlap: Option<Overlap>,
}

/// The overlap of a CA rotation: the previous CA and the new CA cross-signed by it.
struct Overlap {
    previous_pem: String,
    previous_der: CertificateDer<'static>,
    cross_pem: String,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("pin", &self.pin())
            .field("previous_pin", &self.previous_pin())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// Load `dir/ca.crt` and `dir/ca.key`, or create both when neither exists (creating `dir` with
    /// mode 0700 if needed). `ca.key` is written to a 0600 temp file and renamed into place, so it is
    /// never visible half-written or with wider permissions.
    ///
    /// Refuses a `ca.key` that group or others may access, a directory holding only one of the two
    /// files, unparsable PEM, and a key that does not match the certificate.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        recover_interrupted_rotation(dir)?;
        let cert_exists = exists(&cert_path)?;
        let key_exists = exists(&key_path)?;
        match (cert_exists, key_exists) {
            (true, true) => {
                let ca = Self::load(dir, &cert_path, &key_path)?;
                ca.load_overlap()
            }
            (false, false) => Self::create(dir, &cert_path, &key_path),
            (true, false) => Err(PkiError::IncompleteCa {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(PkiError::IncompleteCa {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        check_key_permissions(key_path)?;
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|err| {
            bad_pem(
                cert_path,
                format!("no PEM certificate found ({err}); restore the file from a backup"),
            )
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|err| {
            bad_pem(
                key_path,
                format!("not a usable PEM private key ({err}); restore the file from a backup"),
            )
        })?;
        check_key_matches(std::slice::from_ref(&cert_der), &key_pem, cert_path, key_path)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|err| {
            bad_pem(
                cert_path,
                format!("cannot use it as a CA certificate ({err}); restore the file from a backup"),
            )
        })?;
        let ca = CertificateAuthority {
            cert_pem,
            cert_der,
            issuer,
            dir: dir.to_path_buf(),
            overlap: None,
        };
        tracing::info!(dir = %dir.display(), pin = %ca.pin(), "loaded the coordinator CA");
        Ok(ca)
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| {
                io_err(
                    "create the CA directory",
                    dir,
                    "check that the parent exists and is writable",
                    err,
                )
            })?;

        let (key, params, cert) = generate_ca()?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        write_atomically(dir, key_path, key_pem.as_bytes(), 0o600)?;
        write_atomically(dir, cert_path, cert_pem.as_bytes(), 0o644)?;
        sync_dir(dir);

        let ca = CertificateAuthority {
            cert_der: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
            overlap: None,
        };
        tracing::info!(dir = %dir.display(), pin = %ca.pin(), "created a new coordinator CA");
        Ok(ca)
    }

    /// The issuing CA certificate's pin (what `nimbusctl token create` prints). During a CA
    /// rotation this is the *new* CA's pin; see [`CertificateAuthority::accepted_pins`].
    pub fn pin(&self) -> Pin {
        Pin::of_der(&self.cert_der)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The directory holding `ca.crt` and `ca.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issue a server certificate (fresh P-256 key, valid 825 days, `serverAuth`) signed by this CA.
    /// SANs: [`SERVER_NAME`] plus `extra_sans` (IP addresses become IP SANs, anything else must be a
    /// valid DNS name; duplicates and blanks are dropped).
    pub fn issue_server_identity(&self, extra_sans: &[String]) -> Result<ServerIdentity, PkiError> {
        let mut sans = vec![SanType::DnsName(ia5(SERVER_NAME)?)];
        for name in extra_sans.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    DnsName::try_from(name).map_err(|err| PkiError::InvalidSan {
                        name: name.to_string(),
                        reason: err.to_string(),
                    })?;
                    SanType::DnsName(ia5(name)?)
                }
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }

        let key = KeyPair::generate().map_err(|source| PkiError::Certificate {
            what: "server key",
            source,
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, SERVER_NAME);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + SERVER_CERT_VALIDITY;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Certificate {
                what: "server certificate",
                source,
            })?;
        // During a rotation's overlap: [leaf, cross, previous CA, new CA]. A client pinning the
        // previous CA anchors there and verifies leaf → cross → previous CA; one pinning the new
        // CA anchors on the last certificate (whose pin `ServerIdentity::ca_pin` reports).
        let cert_chain_pem = match &self.overlap {
            Some(o) => format!("{}{}{}{}", cert.pem(), o.cross_pem, o.previous_pem, self.cert_pem),
            None => format!("{}{}", cert.pem(), self.cert_pem),
        };
        Ok(ServerIdentity {
            cert_chain_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Whether a CA rotation is in its overlap (started, not finished).
    pub fn rotation_in_progress(&self) -> bool {
        self.overlap.is_some()
    }

    /// The previous CA's pin during a rotation's overlap.
    pub fn previous_pin(&self) -> Option<Pin> {
        self.overlap.as_ref().map(|o| Pin::of_der(&o.previous_der))
    }

    /// Pins a client may hold and still verify this coordinator: the issuing CA's, plus the
    /// previous CA's during a rotation's overlap.
    pub fn accepted_pins(&self) -> Vec<Pin> {
        std::iter::once(self.pin()).chain(self.previous_pin()).collect()
    }

    /// The new CA certificate cross-signed by the previous CA (PEM), during the overlap.
    pub fn cross_cert_pem(&self) -> Option<String> {
        self.overlap.as_ref().map(|o| o.cross_pem.clone())
    }

    /// Starts a CA rotation: creates a new CA key and self-signed certificate and a
    /// certificate for the same subject and key signed by the current CA (the cross
    /// certificate). From now on [`CertificateAuthority::issue_server_identity`] signs with the
    /// new CA and serves `[leaf, cross, previous CA, new CA]`, which verifies for a client
    /// pinning either CA ([`crate::client_config`]). Returns the new pin, for new join tokens and
    /// for agents to switch to.
    ///
    /// Persisted before returning: `ca-next.key` (0600), `ca-cross.crt`, then `ca-next.crt`
    /// (its presence marks the rotation); `ca.crt`/`ca.key` keep the previous CA until
    /// [`CertificateAuthority::finish_rotation`]. [`CertificateAuthority::load_or_create`] sees
    /// a rotation in progress. Server identities issued before keep working (they chain to the
    /// previous CA, still trusted by its pin); reissue them so new-pin clients accept them.
    ///
    /// Errors: [`PkiError::CaRotation`] when a rotation is already in progress; I/O errors.
    pub fn rotate(&mut self) -> Result<Pin, PkiError> {
        if self.overlap.is_some() {
            return Err(PkiError::CaRotation {
                reason: "a rotation is already in progress; finish it before starting another".into(),
            });
        }
        let (key, params, cert) = generate_ca()?;
        let cross = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Certificate {
                what: "cross-signed CA certificate",
                source,
            })?;
        let dir = self.dir.clone();
        write_atomically(&dir, &dir.join(NEXT_KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&dir, &dir.join(CROSS_CERT_FILE), cross.pem().as_bytes(), 0o644)?;
        write_atomically(&dir, &dir.join(NEXT_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        sync_dir(&dir);

        let previous_pin = self.pin();
        let previous_pem = std::mem::replace(&mut self.cert_pem, cert.pem());
        let previous_der = std::mem::replace(&mut self.cert_der, cert.der().clone());
        self.issuer = Issuer::new(params, key);
        self.overlap = Some(Overlap {
            previous_pem,
            previous_der,
            cross_pem: cross.pem(),
        });
        tracing::info!(previous = %previous_pin, new = %self.pin(), "CA rotation started; both pins are accepted");
        Ok(self.pin())
    }

    /// Ends a CA rotation: the new CA replaces `ca.crt`/`ca.key` (the previous CA's key is
    /// overwritten) and the cross certificate is removed. Identities issued afterwards carry
    /// `[leaf, new CA]`: clients still pinning the previous CA then fail with
    /// [`PkiError::PinMismatch`]. Reissue the served identity after calling this.
    ///
    /// Crash-safe: `ca-next.crt` is renamed first, then `ca-next.key`; `load_or_create` completes
    /// a finish interrupted in between.
    ///
    /// Errors: [`PkiError::CaRotation`] when no rotation is in progress; I/O errors.
    pub fn finish_rotation(&mut self) -> Result<(), PkiError> {
        if self.overlap.is_none() {
            return Err(PkiError::CaRotation {
                reason: "no rotation is in progress; start one first".into(),
            });
        }
        let dir = self.dir.clone();
        rename(&dir.join(NEXT_CERT_FILE), &dir.join(CA_CERT_FILE))?;
        rename(&dir.join(NEXT_KEY_FILE), &dir.join(CA_KEY_FILE))?;
        remove_if_exists(&dir.join(CROSS_CERT_FILE))?;
        sync_dir(&dir);
        let previous = self.previous_pin();
        self.overlap = None;
        tracing::info!(retired = ?previous, pin = %self.pin(), "CA rotation finished; only the new pin is accepted");
        Ok(())
    }

    /// After `load`: pick up a rotation in progress (`ca-next.crt` present).
    fn load_overlap(mut self) -> Result<Self, PkiError> {
        let dir = self.dir.clone();
        let next_cert = dir.join(NEXT_CERT_FILE);
        let next_key = dir.join(NEXT_KEY_FILE);
        let cross = dir.join(CROSS_CERT_FILE);
        if !exists(&next_cert)? {
            return Ok(self);
        }
        for needed in [&next_key, &cross] {
            if !exists(needed)? {
                return Err(PkiError::IncompleteCa {
                    present: next_cert.clone(),
                    missing: needed.clone(),
                });
            }
        }
        let next = Self::load(&dir, &next_cert, &next_key)?;
        let cross_pem = read(&cross)?;
        CertificateDer::from_pem_slice(cross_pem.as_bytes()).map_err(|err| {
            bad_pem(
                &cross,
                format!("no PEM certificate found ({err}); restore it from a backup"),
            )
        })?;
        let previous_pem = std::mem::replace(&mut self.cert_pem, next.cert_pem);
        let previous_der = std::mem::replace(&mut self.cert_der, next.cert_der);
        self.issuer = next.issuer;
        self.overlap = Some(Overlap {
            previous_pem,
            previous_der,
            cross_pem,
        });
        tracing::info!(previous = ?self.previous_pin(), new = %self.pin(), "CA rotation in progress");
        Ok(self)
    }
}

/// A fresh CA: P-256 key, self-signed certificate valid [`CA_VALIDITY`], path length 0.
fn generate_ca() -> Result<(KeyPair, CertificateParams, rcgen::Certificate), PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Certificate { what: "CA key", source })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "polynimbus");
    // A short key fingerprint in the name tells CAs apart in tools' output, and gives a rotated CA
    // a subject distinct from its predecessor (path building matches issuers by name).
    let id = hex::encode(&Pin::of_der(key.public_key_raw()).as_bytes()[..4]);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("nimbus coordinator CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key).map_err(|source| PkiError::Certificate {
        what: "CA certificate",
        source,
    })?;
    Ok((key, params, cert))
}

/// Completes or undoes a rotation step cut short by a crash, before the CA is loaded:
/// - `ca-next.key` without `ca-next.crt`, and that key belongs to `ca.crt`: `finish_rotation`
///   stopped between its two renames; finish it.
/// - otherwise `ca-next.key`/`ca-cross.crt` without `ca-next.crt`: `rotate` stopped before its
///   commit point; remove the leftovers.
fn recover_interrupted_rotation(dir: &Path) -> Result<(), PkiError> {
    let next_cert = dir.join(NEXT_CERT_FILE);
    let next_key = dir.join(NEXT_KEY_FILE);
    let cross = dir.join(CROSS_CERT_FILE);
    if exists(&next_cert)? {
        return Ok(());
    }
    let cert_path = dir.join(CA_CERT_FILE);
    if exists(&next_key)? && exists(&cert_path)? {
        check_key_permissions(&next_key)?;
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&next_key)?;
        let belongs = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .ok()
            .is_some_and(|der| check_key_matches(&[der], &key_pem, &cert_path, &next_key).is_ok());
        if belongs {
            tracing::warn!(dir = %dir.display(), "completing a CA rotation finish that was interrupted");
            rename(&next_key, &dir.join(CA_KEY_FILE))?;
        } else {
            tracing::warn!(dir = %dir.display(), "removing the leftovers of an interrupted CA rotation start");
            remove_if_exists(&next_key)?;
        }
    }
    remove_if_exists(&cross)?;
    sync_dir(dir);
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<(), PkiError> {
    fs::rename(from, to).map_err(|err| {
        io_err(
            "rename into place",
            from,
            "check that the CA directory is writable; the rotation resumes at the next start",
            err,
        )
    })
}

fn remove_if_exists(path: &Path) -> Result<(), PkiError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_err("remove", path, "check that the CA directory is writable", err)),
    }
}

/// A server certificate chain and its private key, ready for tonic's `ServerTlsConfig`.
#[derive(Clone)]
pub struct ServerIdentity {
    /// PEM certificates: the server (leaf) certificate first, then its CA (and any intermediates).
    pub cert_chain_pem: String,
    /// PEM private key of the leaf. Secret: never logged, redacted in `Debug`.
    pub key_pem: String,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ServerIdentity {
    /// Operator-provided certificate chain and key (PEM files). The chain must start with the server
    /// certificate and should end with the CA certificate: agents are then given that CA's pin
    /// ([`ServerIdentity::ca_pin`]). The key file must not be accessible by group or others, and must
    /// match the first certificate.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        check_key_permissions(key)?;
        let cert_chain_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain = parse_chain(&cert_chain_pem).map_err(|reason| bad_pem(cert, reason))?;
        check_key_matches(&chain, &key_pem, cert, key)?;
        Ok(ServerIdentity {
            cert_chain_pem,
            key_pem,
        })
    }

    /// Makes sure the served chain contains the CA `ca_pem` (whose pin agents check): appended when no
    /// certificate of the chain has its pin. Some issuers put only the leaf and intermediates in the chain
    /// file and the root in a separate `ca.crt`; agents would then refuse a chain without their pinned CA.
    pub fn with_ca(mut self, ca_pem: &str) -> Result<Self, PkiError> {
        let pin = Pin::of_pem(ca_pem)?;
        if self.cert_chain()?.iter().any(|der| Pin::of_der(der) == pin) {
            return Ok(self);
        }
        if !self.cert_chain_pem.ends_with('\n') {
            self.cert_chain_pem.push('\n');
        }
        self.cert_chain_pem.push_str(ca_pem);
        Ok(self)
    }

    /// The identity for `tonic::transport::ServerTlsConfig::identity`.
    pub fn tonic_identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_chain_pem, &self.key_pem)
    }

    /// The chain as DER certificates, leaf first.
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        parse_chain(&self.cert_chain_pem).map_err(|reason| PkiError::BadPem {
            what: "server certificate chain".into(),
            reason,
        })
    }

    /// A rustls server configuration for this identity (ring provider, TLS 1.2 and 1.3, no client
    /// certificates, HTTP/1.1 only), for plain HTTPS listeners such as the package mirror.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let chain = self.cert_chain()?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|err| PkiError::BadPem {
            what: "server private key".into(),
            reason: format!("no PEM private key found ({err}); provide a PKCS#8, PKCS#1 or SEC1 PEM key"),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|err| PkiError::BadPem {
                what: "server certificate and key".into(),
                reason: format!("rustls refused them ({err}); provide a certificate chain and its own key"),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The pin of the last certificate in the chain (the CA, for chains built as documented).
    pub fn ca_pin(&self) -> Result<Pin, PkiError> {
        let chain = self.cert_chain()?;
        chain
            .last()
            .map(|der| Pin::of_der(der))
            .ok_or_else(|| PkiError::BadPem {
                what: "server certificate chain".into(),
                reason: "it holds no certificate".into(),
            })
    }
}

fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("cannot parse the PEM certificates ({err}); provide PEM `CERTIFICATE` blocks"))?;
    if chain.is_empty() {
        return Err("it holds no PEM `CERTIFICATE` block; provide the server certificate followed by its CA".into());
    }
    Ok(chain)
}

/// Check that `key_pem` is a private key rustls can use and that it belongs to `chain[0]`.
fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key_pem: &str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), PkiError> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|err| {
        bad_pem(
            key_path,
            format!("no PEM private key found ({err}); provide a PKCS#8, PKCS#1 or SEC1 PEM key"),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), key, &provider).map_err(|err| {
        bad_pem(
            key_path,
            format!(
                "it cannot be used with the certificate in {} ({err}); provide the key that belongs to that certificate",
                cert_path.display()
            ),
        )
    })?;
    Ok(())
}

fn ia5(name: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    rcgen::string::Ia5String::try_from(name).map_err(|err| PkiError::InvalidSan {
        name: name.to_string(),
        reason: err.to_string(),
    })
}

fn bad_pem(path: &Path, reason: String) -> PkiError {
    PkiError::BadPem {
        what: format!("file {}", path.display()),
        reason,
    }
}

fn io_err(action: &'static str, path: &Path, hint: &'static str, err: io::Error) -> PkiError {
    PkiError::Io {
        action,
        path: path.to_path_buf(),
        hint,
        source: Arc::new(err),
    }
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists()
        .map_err(|err| io_err("check", path, "check the permissions of its directory", err))
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|err| {
        io_err(
            "read",
            path,
            "check that the file exists and is readable by the daemon's user",
            err,
        )
    })
}

/// Refuse a key file that group or others may read, write or execute.
fn check_key_permissions(path: &Path) -> Result<(), PkiError> {
    let meta = fs::metadata(path).map_err(|err| {
        io_err(
            "read",
            path,
            "check that the file exists and is readable by the daemon's user",
            err,
        )
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Write `contents` to a temp file with `mode` in `dir`, fsync it and rename it to `path`.
fn write_atomically(dir: &Path, path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let hint = "check that the directory is writable and the disk is not full";
    // tempfile creates the file with mode 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".nimbus-pki-")
        .tempfile_in(dir)
        .map_err(|err| io_err("create a temporary file in", dir, hint, err))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|err| io_err("set permissions on a temporary file in", dir, hint, err))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|err| io_err("write a temporary file in", dir, hint, err))?;
    tmp.persist(path)
        .map_err(|err| io_err("rename a temporary file to", path, hint, err.error))?;
    Ok(())
}

/// Best effort: make the renames durable.
fn sync_dir(dir: &Path) {
    if let Err(err) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %err, "cannot fsync the CA directory");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        let key_mode = fs::metadata(dir.join(CA_KEY_FILE)).unwrap().mode() & 0o7777;
        let cert_mode = fs::metadata(dir.join(CA_CERT_FILE)).unwrap().mode() & 0o7777;
        assert_eq!(key_mode, 0o600);
        assert_eq!(cert_mode, 0o644);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        // No temp files left behind.
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["ca.crt", "ca.key"]);
        assert_eq!(Pin::of_pem(&ca.cert_pem()).unwrap(), ca.pin());

        let again = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(again.pin(), ca.pin());
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert!(!format!("{again:?}").contains("PRIVATE KEY"));

        // A reloaded CA still issues certificates chaining to the same CA.
        let id = again.issue_server_identity(&["10.0.0.1".into()]).unwrap();
        assert_eq!(id.ca_pin().unwrap(), ca.pin());
    }

    #[test]
    fn refuses_a_group_readable_key() {
        let tmp = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
        assert!(
            matches!(err, PkiError::InsecureKeyPermissions { mode: 0o644, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("chmod 600 {}", key.display())), "{msg}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        CertificateAuthority::load_or_create(tmp.path()).unwrap();
    }

    #[test]
    fn refuses_half_a_ca_and_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        let cert = tmp.path().join(CA_CERT_FILE);
        let key_pem = fs::read_to_string(&key).unwrap();
        fs::remove_file(&key).unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, PkiError::IncompleteCa { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");

        // A key from another CA does not match the certificate.
        let other = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(other.path()).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), &key).unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, PkiError::BadPem { .. }), "{err:?}");
        assert!(err.to_string().contains("provide the key that belongs"), "{err}");

        fs::write(&key, key_pem).unwrap();
        fs::write(&cert, "garbage").unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, PkiError::BadPem { .. }), "{err:?}");
        assert!(err.to_string().contains(&cert.display().to_string()), "{err}");
    }

    #[test]
    fn server_identity_round_trips_through_files() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(&tmp.path().join("ca")).unwrap();
        let id = ca
            .issue_server_identity(&["coord.example.org".into(), "192.0.2.7".into(), "::1".into(), " ".into()])
            .unwrap();
        assert!(!format!("{id:?}").contains("PRIVATE KEY"));
        assert!(format!("{id:?}").contains("<redacted>"));
        let chain = id.cert_chain().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(Pin::of_der(&chain[1]), ca.pin());

        let cert = tmp.path().join("server.crt");
        let key = tmp.path().join("server.key");
        fs::write(&cert, &id.cert_chain_pem).unwrap();
        fs::write(&key, &id.key_pem).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = ServerIdentity::from_files(&cert, &key).unwrap_err();
        assert!(matches!(err, PkiError::InsecureKeyPermissions { .. }), "{err:?}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = ServerIdentity::from_files(&cert, &key).unwrap();
        assert_eq!(loaded.ca_pin().unwrap(), ca.pin());

        let missing = tmp.path().join("nope.crt");
        let err = ServerIdentity::from_files(&missing, &key).unwrap_err();
        assert!(err.to_string().contains("nope.crt"), "{err}");

        // A chain file with the leaf only gets the CA appended, once.
        let leaf_only = ServerIdentity {
            cert_chain_pem: id
                .cert_chain_pem
                .split_inclusive("-----END CERTIFICATE-----\n")
                .next()
                .unwrap()
                .into(),
            key_pem: id.key_pem.clone(),
        };
        assert_eq!(leaf_only.cert_chain().unwrap().len(), 1);
        let completed = leaf_only.with_ca(&ca.cert_pem()).unwrap();
        assert_eq!(completed.cert_chain().unwrap().len(), 2);
        assert_eq!(completed.ca_pin().unwrap(), ca.pin());
        let again = completed.with_ca(&ca.cert_pem()).unwrap();
        assert_eq!(
            again.cert_chain().unwrap().len(),
            2,
            "already there: not appended twice"
        );
        again.rustls_server_config().unwrap();
    }

    #[test]
    fn rejects_invalid_names() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let err = ca.issue_server_identity(&["not a name".into()]).unwrap_err();
        assert!(matches!(err, PkiError::InvalidSan { .. }), "{err:?}");
    }
}
