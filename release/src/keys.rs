//! Signing keys for the four TUF roles.
//!
//! Each key is an Ed25519 key pair stored as an unencrypted PKCS#8 document in a PEM file (`-----BEGIN PRIVATE
//! KEY-----`), created with mode 0600 in directories created 0700. A key file is never overwritten: generating
//! over an existing one is an error. Loading refuses a key file that group or others can access, or that
//! another user owns. Key material is never logged; errors name the file, not its content.
//!
//! The root key signs `root.json` only and is meant to live offline (a USB stick mounted for `init`, `rotate`
//! and yearly root renewal). The three online keys (targets, snapshot, timestamp) live with the coordinator,
//! which re-signs the timestamp daily.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use tough::key_source::KeySource;
use tough::schema::RoleType;
use tough::sign::Sign;

use crate::fsio;

/// The PEM label of a PKCS#8 private key.
const PEM_TAG: &str = "PRIVATE KEY";

/// Errors about key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "key file {path} already exists: refusing to overwrite a signing key; move it away first if you really mean to replace it (use `rotate` to change a role's key)"
    )]
    Exists { path: PathBuf },
    #[error("cannot create key directory {path}: {source}; check that the parent exists and is writable")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write key file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read key file {path}: {source}; check the path (is the offline key's medium mounted?)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("key file {path} has mode {mode:o}: group or others may access it; run `chmod 600 {path}`")]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is owned by uid {owner}, not by this process's uid {me}; chown it to the user that signs")]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "key file {path} is not a PEM PKCS#8 Ed25519/ECDSA private key ({reason}); generate keys with `nimbusctl release keys`"
    )]
    Parse { path: PathBuf, reason: String },
    #[error("cannot generate an Ed25519 key: the system random source failed")]
    Generate,
    #[error("cannot compute the TUF key id of {path}: {reason}")]
    KeyId { path: PathBuf, reason: String },
}

/// The four top-level TUF roles, each with its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRole {
    /// Signs `root.json`: which keys are trusted for every role. Kept offline.
    Root,
    /// Signs `targets.json`: the artefacts, their hashes, lengths and release metadata.
    Targets,
    /// Signs `snapshot.json`: the current version of `targets.json`.
    Snapshot,
    /// Signs `timestamp.json`: the current snapshot; short-lived, re-signed daily.
    Timestamp,
}

impl KeyRole {
    /// All four roles, root first.
    pub const ALL: [KeyRole; 4] = [KeyRole::Root, KeyRole::Targets, KeyRole::Snapshot, KeyRole::Timestamp];
    /// The three roles whose keys stay online with the coordinator.
    pub const ONLINE: [KeyRole; 3] = [KeyRole::Targets, KeyRole::Snapshot, KeyRole::Timestamp];

    /// The role's name in TUF metadata: `root`, `targets`, `snapshot`, `timestamp`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Root => "root",
            KeyRole::Targets => "targets",
            KeyRole::Snapshot => "snapshot",
            KeyRole::Timestamp => "timestamp",
        }
    }

    /// The conventional key file name in a key directory: `<role>.pem`.
    pub fn file_name(self) -> String {
        format!("{}.pem", self.as_str())
    }

    pub(crate) fn role_type(self) -> RoleType {
        match self {
            KeyRole::Root => RoleType::Root,
            KeyRole::Targets => RoleType::Targets,
            KeyRole::Snapshot => RoleType::Snapshot,
            KeyRole::Timestamp => RoleType::Timestamp,
        }
    }
}

impl fmt::Display for KeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: use root, targets, snapshot or timestamp"))
    }
}

/// A key file and the TUF key id of its public half (hex SHA-256 of the canonical public key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub path: PathBuf,
    pub key_id: String,
}

/// Where the three online keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineKeys {
    pub targets: PathBuf,
    pub snapshot: PathBuf,
    pub timestamp: PathBuf,
}

impl OnlineKeys {
    /// The conventional layout: `<dir>/targets.pem`, `<dir>/snapshot.pem`, `<dir>/timestamp.pem`.
    pub fn in_dir(dir: &Path) -> OnlineKeys {
        OnlineKeys {
            targets: dir.join(KeyRole::Targets.file_name()),
            snapshot: dir.join(KeyRole::Snapshot.file_name()),
            timestamp: dir.join(KeyRole::Timestamp.file_name()),
        }
    }

    /// Generates the three online keys in `dir` (see [`generate_role_keys`]).
    pub fn generate(dir: &Path) -> Result<OnlineKeys, KeyError> {
        generate_role_keys(dir, &KeyRole::ONLINE)?;
        Ok(OnlineKeys::in_dir(dir))
    }

    /// The key file of an online role; `None` for [`KeyRole::Root`].
    pub fn path(&self, role: KeyRole) -> Option<&Path> {
        match role {
            KeyRole::Root => None,
            KeyRole::Targets => Some(&self.targets),
            KeyRole::Snapshot => Some(&self.snapshot),
            KeyRole::Timestamp => Some(&self.timestamp),
        }
    }

    pub(crate) fn sources(&self) -> Vec<Box<dyn KeySource>> {
        vec![
            FileKeySource::boxed(&self.targets),
            FileKeySource::boxed(&self.snapshot),
            FileKeySource::boxed(&self.timestamp),
        ]
    }
}

/// Generates a new Ed25519 key at `path` (PKCS#8 PEM, mode 0600; missing parent directories are created 0700).
/// Fails with [`KeyError::Exists`] if `path` exists.
pub fn generate_key(path: &Path) -> Result<KeyInfo, KeyError> {
    let dir = fsio::parent_of(path);
    fsio::create_dirs(dir, 0o700).map_err(|source| KeyError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
    let der = pkcs8.as_ref();
    let key_id = key_id_of_der(path, der)?;
    let text = pem::encode(&pem::Pem::new(PEM_TAG, der.to_vec()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
    if let Err(source) = written {
        // Leave no truncated key behind: a later `generate` would refuse to replace it.
        let _ = std::fs::remove_file(path);
        return Err(KeyError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    let _ = fsio::sync_dir(dir);
    tracing::info!(path = %path.display(), key_id = %key_id, "generated a signing key");
    Ok(KeyInfo {
        path: path.to_path_buf(),
        key_id,
    })
}

/// Generates `<dir>/<role>.pem` for each of `roles`. Checks first that none of the files exists, so a refused
/// call creates nothing.
pub fn generate_role_keys(dir: &Path, roles: &[KeyRole]) -> Result<Vec<(KeyRole, KeyInfo)>, KeyError> {
    for role in roles {
        let path = dir.join(role.file_name());
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(KeyError::Exists { path });
        }
    }
    roles
        .iter()
        .map(|role| Ok((*role, generate_key(&dir.join(role.file_name()))?)))
        .collect()
}

/// The TUF key id of the key at `path` (checks its permissions like every load).
pub fn key_id(path: &Path) -> Result<String, KeyError> {
    let der = read_private_der(path)?;
    key_id_of_der(path, &der)
}

pub(crate) fn tuf_key(path: &Path) -> Result<(String, tough::schema::key::Key), KeyError> {
    let der = read_private_der(path)?;
    let pair = tough::sign::parse_keypair(&der).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let key = pair.tuf_key();
    let id = key.key_id().map_err(|e| KeyError::KeyId {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((hex::encode(&*id), key))
}

fn key_id_of_der(path: &Path, der: &[u8]) -> Result<String, KeyError> {
    let pair = tough::sign::parse_keypair(der).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let id = pair.tuf_key().key_id().map_err(|e| KeyError::KeyId {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(hex::encode(&*id))
}

/// Reads a key file after checking its owner and mode; returns the PKCS#8 DER.
fn read_private_der(path: &Path) -> Result<Vec<u8>, KeyError> {
    let read = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(KeyError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let text = std::io::read_to_string(file).map_err(read)?;
    let parsed = pem::parse(text.as_bytes()).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        reason: format!("not PEM: {e}"),
    })?;
    if parsed.tag() != PEM_TAG {
        return Err(KeyError::Parse {
            path: path.to_path_buf(),
            reason: format!("PEM label is {:?}, expected {PEM_TAG:?}", parsed.tag()),
        });
    }
    Ok(parsed.into_contents())
}

/// A `tough` key source reading a PEM PKCS#8 key file on each use, after the permission checks above. Unlike
/// `tough::key_source::LocalKeySource` it accepts PEM (tough's reads raw DER for Ed25519) and never writes.
#[derive(Debug, Clone)]
pub struct FileKeySource {
    pub path: PathBuf,
}

impl FileKeySource {
    pub(crate) fn boxed(path: &Path) -> Box<dyn KeySource> {
        Box::new(FileKeySource {
            path: path.to_path_buf(),
        })
    }
}

#[tough::async_trait]
impl KeySource for FileKeySource {
    async fn as_sign(&self) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        let der = read_private_der(&self.path)?;
        let pair = tough::sign::parse_keypair(&der).map_err(|e| KeyError::Parse {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Box::new(pair))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err(format!(
            "refusing to write key material to {}: keys are only created by generate_key",
            self.path.display()
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_keys_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let keydir = dir.path().join("offline/keys");
        let info = generate_key(&keydir.join("root.pem")).unwrap();
        let meta = std::fs::metadata(&info.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&keydir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(dir.path().join("offline"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let text = std::fs::read_to_string(&info.path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        assert_eq!(key_id(&info.path).unwrap(), info.key_id);
        assert_eq!(info.key_id.len(), 64);

        let err = generate_key(&info.path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(&info.path).unwrap(),
            text,
            "the existing key is untouched"
        );

        // A set with one existing member creates nothing.
        let err = generate_role_keys(&keydir, &KeyRole::ALL).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert!(!keydir.join("targets.pem").exists());

        let online = OnlineKeys::generate(&dir.path().join("online")).unwrap();
        let ids: Vec<String> = KeyRole::ONLINE
            .iter()
            .map(|r| key_id(online.path(*r).unwrap()).unwrap())
            .collect();
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[1], ids[2]);
    }

    #[test]
    fn loose_or_foreign_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let info = generate_key(&dir.path().join("k.pem")).unwrap();
        std::fs::set_permissions(&info.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = key_id(&info.path).unwrap_err();
        assert!(matches!(err, KeyError::LoosePermissions { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a key").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = key_id(&junk).unwrap_err();
        assert!(matches!(err, KeyError::Parse { .. }), "{err}");
        assert!(
            !err.to_string().contains("not a key"),
            "key content must not appear in errors: {err}"
        );
    }
}
