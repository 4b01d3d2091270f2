//! The key-encryption key (KEK): 32 random bytes that seal secrets and backups with AES-256-GCM (ring).
//!
//! # Sources ([`KekSource`])
//! * a file holding the key as base64 text (mode 0600 or stricter, refused otherwise);
//! * the environment variable [`KEK_ENV`] (`NIMBUS_KEK`, base64);
//! * a command whose stdout is the key in base64, Vault-style (`vault kv get -field=kek secret/nimbus`), run
//!   without a shell and killed after [`COMMAND_TIMEOUT`].
//!
//! [`Kek::generate_file`] writes a fresh key (0600, refusing to overwrite).
//!
//! # Envelope (version 1)
//!
//! ```text
//! "NKEK" | version u8 = 1 | algorithm u8 = 1 (AES-256-GCM) | key id [8] | nonce [12] | ciphertext | tag [16]
//! ```
//!
//! The key id is the first 8 bytes of SHA-256 of the key: not secret, it names the key so that a wrong KEK is
//! reported as "sealed with key X, you gave key Y". The header (magic through nonce) is authenticated together
//! with the caller's associated data. Nonces are 96 random bits.
//!
//! The key is never logged: `Debug` shows only its id, and the bytes are zeroed on drop.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Environment variable holding the KEK (base64).
pub const KEK_ENV: &str = "NIMBUS_KEK";
/// How long a `--kek-command` may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Length of the key.
pub const KEY_LEN: usize = 32;

const MAGIC: &[u8; 4] = b"NKEK";
const VERSION: u8 = 1;
const ALG_AES_256_GCM: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 1 + 8 + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Largest command output read (a base64 key is 44 bytes; Vault adds a newline).
const MAX_COMMAND_OUTPUT: u64 = 4096;

/// Errors loading a KEK or opening a sealed envelope.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("cannot read the KEK file {}: {source}; check the path given with --kek-file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the KEK file {} is readable by group or others (mode {mode:o}); run `chmod 600 {}` (and make it owned by \
         the coordinator's user)",
        path.display(), path.display()
    )]
    FileMode { path: PathBuf, mode: u32 },
    #[error(
        "the KEK from {origin} is not valid: {detail}; it must be {KEY_LEN} bytes in base64 (44 characters), e.g. from `nimbus-coordinator kek generate FILE`"
    )]
    Invalid { origin: String, detail: String },
    #[error("{KEK_ENV} is not set; set it to the base64 KEK, or use --kek-file / --kek-command")]
    EnvMissing,
    #[error(
        "the KEK command {command:?} failed: {detail}; run it by hand to see why (is the secret manager reachable and are you logged in?)"
    )]
    Command { command: String, detail: String },
    #[error("cannot create the KEK file {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite a KEK (anything sealed with it would be lost): choose another file", path.display())]
    Exists { path: PathBuf },
    #[error("sealed data is not a KEK envelope ({0}); is this the right file?")]
    Malformed(&'static str),
    #[error(
        "sealed data has envelope version {0}, this coordinator reads version {VERSION}; use a newer nimbus-coordinator"
    )]
    UnsupportedVersion(u8),
    #[error("this was sealed with key {sealed_with}, you gave key {given}; supply the KEK that made it")]
    WrongKey { sealed_with: KeyId, given: KeyId },
    #[error("sealed data (key {0}) failed authentication: it was modified or truncated; use an intact copy")]
    Tampered(KeyId),
    #[error("cannot seal: {0}")]
    Seal(&'static str),
}

/// The public name of a key: the first 8 bytes of its SHA-256, shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Where the KEK comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding base64 text, mode 0600 or stricter.
    File(PathBuf),
    /// The environment variable [`KEK_ENV`].
    Env,
    /// A program and its arguments (no shell); its stdout is the base64 key.
    Command(Vec<String>),
}

impl fmt::Display for KekSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekSource::File(p) => write!(f, "file {}", p.display()),
            KekSource::Env => write!(f, "${KEK_ENV}"),
            KekSource::Command(argv) => write!(f, "command {:?}", argv.join(" ")),
        }
    }
}

/// A key-encryption key.
pub struct Kek {
    key: LessSafeKey,
    id: KeyId,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Kek {
    /// A KEK from raw bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Kek {
        let digest = Sha256::digest(bytes);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        // AES-256 accepts any 32 bytes: `new` fails only on a wrong length, which the type rules out.
        let key = match UnboundKey::new(&AES_256_GCM, bytes) {
            Ok(k) => LessSafeKey::new(k),
            Err(_) => unreachable!("AES-256-GCM takes 32-byte keys"),
        };
        Kek { key, id: KeyId(id) }
    }

    /// A KEK from base64 text (standard alphabet, padding optional, surrounding whitespace ignored).
    /// `origin` names where it came from, for the error.
    pub fn from_base64(text: &str, origin: &str) -> Result<Kek, KekError> {
        let invalid = |detail: String| KekError::Invalid {
            origin: origin.to_owned(),
            detail,
        };
        let trimmed = text.trim();
        let decoded = Zeroizing::new(
            STANDARD
                .decode(trimmed)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
                .map_err(|_| invalid("not base64".to_owned()))?,
        );
        let bytes: Zeroizing<[u8; KEY_LEN]> = Zeroizing::new(
            decoded
                .as_slice()
                .try_into()
                .map_err(|_| invalid(format!("{} bytes", decoded.len())))?,
        );
        Ok(Kek::from_bytes(&bytes))
    }

    /// Reads the key from a file (base64 text) that must not be readable or writable by group or others.
    pub fn from_file(path: &Path) -> Result<Kek, KekError> {
        let read = |source| KekError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mode = file.metadata().map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::FileMode {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = Zeroizing::new(String::new());
        file.take(4096).read_to_string(&mut text).map_err(read)?;
        Kek::from_base64(&text, &format!("file {}", path.display()))
    }

    /// Reads the key from [`KEK_ENV`].
    pub fn from_env() -> Result<Kek, KekError> {
        let text = Zeroizing::new(std::env::var(KEK_ENV).map_err(|_| KekError::EnvMissing)?);
        Kek::from_base64(&text, KEK_ENV)
    }

    /// Runs `argv` (no shell; stdin closed, stderr passed through) and reads the key from its stdout. The
    /// command is killed after `timeout`.
    pub fn from_command(argv: &[String], timeout: Duration) -> Result<Kek, KekError> {
        let shown = argv.join(" ");
        let fail = |detail: String| KekError::Command {
            command: shown.clone(),
            detail,
        };
        let (program, args) = argv.split_first().ok_or_else(|| fail("empty command".to_owned()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start it: {e}")))?;
        let mut stdout = child.stdout.take().ok_or_else(|| fail("no stdout".to_owned()))?;
        let reader = std::thread::spawn(move || {
            let mut out = Zeroizing::new(Vec::new());
            let r = (&mut stdout).take(MAX_COMMAND_OUTPUT).read_to_end(&mut out);
            r.map(|_| out)
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "no answer within {}",
                        humantime::format_duration(timeout)
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
            }
        };
        let out = match reader.join() {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(fail(format!("cannot read its output: {e}"))),
            Err(_) => return Err(fail("reading its output failed".to_owned())),
        };
        if !status.success() {
            return Err(fail(format!("it exited with {status}")));
        }
        let text = Zeroizing::new(String::from_utf8_lossy(&out).into_owned());
        Kek::from_base64(&text, &format!("command {shown:?}"))
    }

    /// Loads the key from `source` ([`COMMAND_TIMEOUT`] for commands).
    pub fn load(source: &KekSource) -> Result<Kek, KekError> {
        match source {
            KekSource::File(p) => Kek::from_file(p),
            KekSource::Env => Kek::from_env(),
            KekSource::Command(argv) => Kek::from_command(argv, COMMAND_TIMEOUT),
        }
    }

    /// Generates a fresh random key, writes it as base64 to `path` (created 0600; an existing file is never
    /// overwritten) and returns it.
    pub fn generate_file(path: &Path) -> Result<Kek, KekError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut())
            .map_err(|_| KekError::Seal("the system random generator failed"))?;
        let text = Zeroizing::new(format!("{}\n", STANDARD.encode(bytes.as_ref())));
        let create = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KekError::Exists { path: path.to_owned() }
            } else {
                KekError::Create {
                    path: path.to_owned(),
                    source,
                }
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create)?;
        f.write_all(text.as_bytes()).map_err(create)?;
        f.sync_all().map_err(create)?;
        Ok(Kek::from_bytes(&bytes))
    }

    /// The key's public id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Seals `plaintext`, binding `aad` (which [`Kek::open`] must be given again) into the envelope.
    ///
    /// # Panics
    /// Never in practice: only if the system random generator fails or `plaintext` exceeds AES-GCM's limit
    /// of about 64 GiB, neither of which a caller can recover from. Use [`Kek::try_seal`] to get an error.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        match self.try_seal(plaintext, aad) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Kek::seal`], with the (practically impossible) failures as errors.
    pub fn try_seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| KekError::Seal("the system random generator failed"))?;
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(ALG_AES_256_GCM);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&nonce);
        let full_aad = [&out[..HEADER_LEN], aad].concat();
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&full_aad), &mut body)
            .map_err(|_| KekError::Seal("plaintext too large for AES-GCM"))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens an envelope made by [`Kek::seal`] with the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KekError> {
        let sealed_with = Kek::sealed_key_id(sealed)?;
        if sealed_with != self.id {
            return Err(KekError::WrongKey {
                sealed_with,
                given: self.id,
            });
        }
        if sealed.len() < HEADER_LEN + TAG_LEN {
            return Err(KekError::Tampered(sealed_with));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[HEADER_LEN - NONCE_LEN..HEADER_LEN]);
        let full_aad = [&sealed[..HEADER_LEN], aad].concat();
        let mut body = sealed[HEADER_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&full_aad), &mut body)
            .map_err(|_| KekError::Tampered(sealed_with))?;
        Ok(plain.to_vec())
    }

    /// The id of the key that sealed `sealed` (read from the envelope header, without opening it).
    pub fn sealed_key_id(sealed: &[u8]) -> Result<KeyId, KekError> {
        if sealed.len() < HEADER_LEN {
            return Err(KekError::Malformed("too short"));
        }
        if &sealed[..4] != MAGIC {
            return Err(KekError::Malformed("wrong magic"));
        }
        if sealed[4] != VERSION {
            return Err(KekError::UnsupportedVersion(sealed[4]));
        }
        if sealed[5] != ALG_AES_256_GCM {
            return Err(KekError::Malformed("unknown algorithm"));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&sealed[6..14]);
        Ok(KeyId(id))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let k = Kek::from_bytes(&[7; 32]);
        let s = k.seal(b"secret", b"ctx");
        assert_eq!(k.open(&s, b"ctx").unwrap(), b"secret");
        assert!(matches!(k.open(&s, b"other"), Err(KekError::Tampered(_))));
        // Two seals of the same plaintext differ (random nonce).
        assert_ne!(k.seal(b"secret", b"ctx"), s);
        assert!(!format!("{k:?}").contains("07"), "Debug must not show key bytes");
    }

    #[test]
    fn base64_key_parsing() {
        let text = STANDARD.encode([1u8; 32]);
        assert_eq!(
            Kek::from_base64(&format!(" {text}\n"), "t").unwrap().id(),
            Kek::from_bytes(&[1; 32]).id()
        );
        let err = Kek::from_base64(&STANDARD.encode([1u8; 16]), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("16 bytes") && err.contains("kek generate"), "{err}");
        assert!(Kek::from_base64("not base64!", "t").is_err());
    }

    #[test]
    fn command_source_and_timeout() {
        let text = STANDARD.encode([2u8; 32]);
        let k = Kek::from_command(&["echo".into(), text], Duration::from_secs(5)).unwrap();
        assert_eq!(k.id(), Kek::from_bytes(&[2; 32]).id());
        let err = Kek::from_command(&["sleep".into(), "5".into()], Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
        let err = Kek::from_command(&["false".into()], Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("exited"), "{err}");
        let err = Kek::from_command(&["/nonexistent/vault".into()], Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("cannot start"), "{err}");
    }
}
