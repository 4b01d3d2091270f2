//! x25519 keys: generation, base64 (the `wg` format), and the private key file.
//!
//! Private key files hold the standard base64 encoding of the 32 raw key bytes followed by a
//! newline, exactly like `wg genkey`, so keys can be inspected with `wg pubkey < FILE`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand_core::{OsRng, RngCore};

pub use boringtun::x25519::{PublicKey, StaticSecret};

use crate::error::TunnelError;

/// Length of an x25519 key in bytes.
pub const KEY_LEN: usize = 32;

/// A fresh random private key from the OS RNG.
pub fn generate_secret() -> StaticSecret {
    StaticSecret::random_from_rng(OsRng)
}

/// The public key that belongs to `secret`.
pub fn public_key_of(secret: &StaticSecret) -> PublicKey {
    PublicKey::from(secret)
}

/// Loads a private key file (base64, 32 bytes) or creates it with mode 0600.
///
/// Creation is atomic: the key is written to a temporary file (mode 0600, same directory),
/// synced, then renamed over `path`, so a crash never leaves a half-written key. Missing parent
/// directories are created with mode 0700.
///
/// An existing file is refused when its mode gives group/other any access
/// ([`TunnelError::KeyFilePermissions`], "run `chmod 600 PATH`") or when it is owned by another
/// user than the effective uid ([`TunnelError::KeyFileOwner`]).
pub fn load_or_create_secret(path: &Path) -> Result<StaticSecret, TunnelError> {
    match fs::metadata(path) {
        Ok(meta) => {
            check_key_file_metadata(path, &meta)?;
            load_secret(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_secret(path),
        Err(source) => Err(TunnelError::KeyFileRead {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn check_key_file_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), TunnelError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TunnelError::KeyFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(TunnelError::KeyFileOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    Ok(())
}

fn load_secret(path: &Path) -> Result<StaticSecret, TunnelError> {
    let mut raw = fs::read(path).map_err(|source| TunnelError::KeyFileRead {
        path: path.to_path_buf(),
        source,
    })?;
    let result = match std::str::from_utf8(&raw) {
        Ok(text) => secret_from_base64(text.trim()),
        Err(_) => Err(TunnelError::InvalidKey("private key is not valid base64".to_string())),
    }
    .map_err(|e| match e {
        TunnelError::InvalidKey(why) => TunnelError::InvalidKey(format!(
            "private key file {}: {why}; delete it to generate a new key, or restore the \
             right one",
            path.display()
        )),
        other => other,
    });
    // Best-effort scrub of the encoded secret.
    raw.fill(0);
    result
}

fn create_secret(path: &Path) -> Result<StaticSecret, TunnelError> {
    let write_err = |source| TunnelError::KeyFileWrite {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name")))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(write_err)?;

    let secret = generate_secret();
    let mut encoded = STANDARD.encode(secret.to_bytes());
    encoded.push('\n');

    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:08x}",
        file_name.to_string_lossy(),
        std::process::id(),
        OsRng.next_u32()
    ));
    let written = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(encoded.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Make the rename durable; failure here does not invalidate the key.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    encoded.clear();
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(source));
    }
    tracing::info!(path = %path.display(), public_key = %public_key_to_base64(&PublicKey::from(&secret)),
        "created new WireGuard private key");
    Ok(secret)
}

/// Standard base64 of the 32 public key bytes (the `wg` format).
pub fn public_key_to_base64(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// A public key from exactly 32 bytes. The all-zero key is refused.
pub fn public_key_from_bytes(bytes: &[u8]) -> Result<PublicKey, TunnelError> {
    let arr = key_bytes(bytes)?;
    Ok(PublicKey::from(arr))
}

/// A public key from standard base64 (44 characters, as printed by `wg pubkey`).
pub fn public_key_from_base64(text: &str) -> Result<PublicKey, TunnelError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| TunnelError::InvalidKey(format!("public key is not valid base64: {e}")))?;
    public_key_from_bytes(&bytes)
}

/// A private key from standard base64 (as printed by `wg genkey`).
pub fn secret_from_base64(text: &str) -> Result<StaticSecret, TunnelError> {
    let mut bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| TunnelError::InvalidKey("private key is not valid base64".to_string()))?;
    let arr = key_bytes(&bytes);
    bytes.fill(0);
    Ok(StaticSecret::from(arr?))
}

fn key_bytes(bytes: &[u8]) -> Result<[u8; KEY_LEN], TunnelError> {
    let arr: [u8; KEY_LEN] = bytes
        .try_into()
        .map_err(|_| TunnelError::InvalidKey(format!("a key is exactly {KEY_LEN} bytes, got {}", bytes.len())))?;
    if arr == [0u8; KEY_LEN] {
        return Err(TunnelError::InvalidKey(
            "the all-zero key is not a valid x25519 key".to_string(),
        ));
    }
    Ok(arr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_roundtrip_and_rejections() {
        let pk = PublicKey::from(&generate_secret());
        let b64 = public_key_to_base64(&pk);
        assert_eq!(b64.len(), 44);
        assert_eq!(public_key_from_base64(&b64).ok(), Some(pk));
        assert_eq!(public_key_from_bytes(pk.as_bytes()).ok(), Some(pk));
        assert!(matches!(
            public_key_from_bytes(&[1u8; 31]),
            Err(TunnelError::InvalidKey(_))
        ));
        assert!(matches!(
            public_key_from_bytes(&[1u8; 33]),
            Err(TunnelError::InvalidKey(_))
        ));
        assert!(matches!(
            public_key_from_bytes(&[0u8; 32]),
            Err(TunnelError::InvalidKey(_))
        ));
        assert!(matches!(
            public_key_from_base64("not base64!"),
            Err(TunnelError::InvalidKey(_))
        ));
    }

    #[test]
    fn secret_base64_roundtrip() {
        let s = generate_secret();
        let s2 = secret_from_base64(&STANDARD.encode(s.to_bytes())).ok();
        assert_eq!(s2.map(|k| PublicKey::from(&k)), Some(PublicKey::from(&s)));
    }
}
