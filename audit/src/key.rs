//! The coordinator's Ed25519 audit key: load or create it, sign checkpoints, verify signatures.
//!
//! The key file is PKCS#8 in PEM (`-----BEGIN PRIVATE KEY-----`), mode 0600, owned by the coordinator's
//! user; DER files and `openssl genpkey -algorithm ED25519` output are accepted too. The private key is
//! never logged and never appears in `Debug` output.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::error::{AuditError, Result};
use crate::model::{Checkpoint, checkpoint_text};

/// A verifier's view of a signing key: `(key_id, 32-byte Ed25519 public key)`.
pub type TrustedKey = (String, [u8; 32]);

/// The coordinator's audit signing key.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// Loads the key at `path`, or creates a new one there (mode 0600, written to a temp file in the
    /// same directory and linked into place, so a crash never leaves half a key and two starters never
    /// overwrite each other). The directory must exist.
    pub fn load_or_create(path: &Path) -> Result<AuditKey> {
        match fs::metadata(path) {
            Ok(_) => return AuditKey::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AuditError::KeyRead {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| AuditError::KeyGenerate)?;
        let pem = to_pem(pkcs8.as_ref());
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let write_err = |source| AuditError::KeyWrite {
            path: path.to_path_buf(),
            source,
        };
        // tempfile creates its files 0600.
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
        tmp.write_all(pem.as_bytes()).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        match tmp.persist_noclobber(path) {
            Ok(_) => {}
            // Someone else created it first: use theirs.
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => return AuditKey::load(path),
            Err(e) => return Err(write_err(e.error)),
        }
        let key = AuditKey::load(path)?;
        tracing::info!(path = %path.display(), key_id = %key.key_id, "created a new audit signing key");
        Ok(key)
    }

    /// Loads an existing key. Refuses a file readable by group or others, or owned by another user.
    pub fn load(path: &Path) -> Result<AuditKey> {
        let read_err = |source| AuditError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuditError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid {
            return Err(AuditError::KeyOwner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                euid,
            });
        }
        let bytes = fs::read(path).map_err(read_err)?;
        let invalid = |reason: String| AuditError::KeyInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let der = if bytes.starts_with(b"-----BEGIN") {
            PrivatePkcs8KeyDer::from_pem_slice(&bytes)
                .map_err(|e| invalid(format!("PEM: {e}")))?
                .secret_pkcs8_der()
                .to_vec()
        } else {
            bytes
        };
        AuditKey::from_pkcs8(&der).map_err(invalid)
    }

    /// A fresh key kept in memory only (tests, tools).
    pub fn generate() -> Result<AuditKey> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| AuditError::KeyGenerate)?;
        AuditKey::from_pkcs8(pkcs8.as_ref()).map_err(|_| AuditError::KeyGenerate)
    }

    fn from_pkcs8(der: &[u8]) -> std::result::Result<AuditKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| e.to_string())?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(AuditKey { pair, key_id })
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key in standard base64, as operators copy it into `nimbusctl audit verify`.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.pair.public_key().as_ref())
    }

    /// First 16 hex digits of SHA-256 of the public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `(key_id, public_key)` for [`verify`](crate::verify()).
    pub fn trusted(&self) -> TrustedKey {
        (self.key_id.clone(), self.public_key())
    }

    /// Signs "entry `seq` has hash `hash`" at `at_unix_ms`.
    pub fn sign_checkpoint(&self, seq: u64, hash: &str, at_unix_ms: u64) -> Checkpoint {
        let sig = self.pair.sign(checkpoint_text(seq, hash, at_unix_ms).as_bytes());
        Checkpoint {
            seq,
            hash: hash.to_string(),
            at_unix_ms,
            key_id: self.key_id.clone(),
            signature: B64.encode(sig.as_ref()),
        }
    }
}

/// First 16 hex digits of SHA-256 of an Ed25519 public key.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    hex::encode(&digest[..8])
}

/// Parses a public key given as base64 (standard or URL-safe, padded or not) or 64 hex digits.
pub fn decode_public_key(input: &str) -> Result<[u8; 32]> {
    let s = input.trim();
    let bytes = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(s).ok()
    } else {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        [&B64, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(s).ok())
    };
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| AuditError::PublicKeyInvalid { input: s.to_string() })
}

/// Whether `cp.signature` is a valid Ed25519 signature by `public_key` over the checkpoint text.
pub fn verify_checkpoint_signature(cp: &Checkpoint, public_key: &[u8]) -> bool {
    let Ok(sig) = B64.decode(cp.signature.trim()) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(cp.signed_text().as_bytes(), &sig)
        .is_ok()
}

fn to_pem(der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_then_load_gives_the_same_key_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let a = AuditKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            fs::read_to_string(&path)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----\n")
        );
        let b = AuditKey::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.key_id().len(), 16);
        assert_eq!(a.key_id(), key_id(&a.public_key()));
    }

    #[test]
    fn debug_does_not_show_the_private_key() {
        let k = AuditKey::generate().unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(k.key_id()));
        assert!(!dbg.contains(&k.public_key_base64()));
    }

    #[test]
    fn group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        AuditKey::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = AuditKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, AuditError::KeyPermissions { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn garbage_key_is_reported_as_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        fs::write(&path, b"not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(AuditKey::load(&path), Err(AuditError::KeyInvalid { .. })));
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_text() {
        let k = AuditKey::generate().unwrap();
        let other = AuditKey::generate().unwrap();
        let cp = k.sign_checkpoint(3, &"a".repeat(64), 1000);
        assert!(verify_checkpoint_signature(&cp, &k.public_key()));
        assert!(!verify_checkpoint_signature(&cp, &other.public_key()));
        let mut moved = cp.clone();
        moved.seq = 2;
        assert!(!verify_checkpoint_signature(&moved, &k.public_key()));
        let mut garbled = cp;
        garbled.signature = "!!".into();
        assert!(!verify_checkpoint_signature(&garbled, &k.public_key()));
    }

    #[test]
    fn public_keys_decode_from_base64_and_hex() {
        let k = AuditKey::generate().unwrap();
        assert_eq!(decode_public_key(&k.public_key_base64()).unwrap(), k.public_key());
        assert_eq!(decode_public_key(&hex::encode(k.public_key())).unwrap(), k.public_key());
        assert!(decode_public_key("abc").is_err());
    }
}
