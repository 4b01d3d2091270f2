//! Encrypted backup and restore of the coordinator's state (the store plus the secret files in `data_dir`),
//! and the sled → etcd migration.
//!
//! # What a backup holds
//! * Every store entry (one consistent snapshot: sled is read by the only process that may open it, an etcd scan
//!   is read at one revision), except the leader key ([`crate::leader::LEADER_KEY`], bound to a lease).
//! * Every regular file under `data_dir` (CA `pki/`, `wg.key`, `audit.key`, `releases/keys/*`,
//!   `releases/repo/**`, rotation state, …) with its mode, except the sled store `state/`, the transient
//!   `releases/uploads/` and `releases/staging/`, and symlinks (skipped with a warning).
//!
//! # Format (version 1)
//!
//! ```text
//! file   := MAGIC "NIMBUS-BACKUP\n" | header_len u32 | header (JSON, plaintext) | chunk* (the last one is End)
//! chunk  := len u32 | KEK envelope (crate::kek) of a record, AAD = "nimbus-backup/1" | SHA-256(header) | index u64
//! record := 1 Entries  | n u32 | (klen u32 | key | vlen u32 | value){n}
//!         | 2 File     | plen u32 | path (relative, UTF-8) | mode u32 | size u64 | offset u64 | dlen u32 | data
//!         | 3 End      | entries u64 | files u64 | file_bytes u64
//! ```
//!
//! Integers are big-endian. The header ([`BackupHeader`]: created_at, source backend, entry and file counts,
//! key id) is readable without the KEK but bound to every chunk through the AAD, as are the chunks' order
//! and count: a changed header, a swapped, dropped or modified chunk, or a missing End is refused. Entries go
//! in chunks of at most [`CHUNK_BYTES`], files in pieces of that size.
//!
//! # Restore
//! Only into an empty store and a data_dir without any of the backup's files (unless `force`). The whole
//! backup is verified first (every chunk opened and parsed, counts checked); nothing is written before. Store
//! entries go in transactions under etcd's limits ([`BATCH_OPS`] ops, [`BATCH_BYTES`]), each conditioned on
//! its keys being absent; files are written to a temporary name, fsynced and renamed. A failure while writing
//! (e.g. etcd unreachable) leaves a partial restore, which a second attempt refuses as non-empty: empty the
//! target (new data_dir / etcd prefix) and run it again.
//!
//! Writes of the backup file: temporary file in the same directory (0600), fsync, rename, fsync of the
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::sync::Arc;

use crate::config::{Config, StoreSettings};
use crate::error::CoordError;
use crate::kek::{Kek, KekError};
use crate::store::{KeyValue, Store, StoreError, Txn};

/// Exit code for bad backup data (sysexits `EX_DATAERR`).
pub const EXIT_DATAERR: i32 = 65;
/// Magic at the start of a backup file.
pub const MAGIC: &[u8; 14] = b"NIMBUS-BACKUP\n";
/// Format version written.
pub const FORMAT_VERSION: u32 = 1;
/// Target plaintext size of one chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Most writes per restore/migrate transaction (etcd's default `--max-txn-ops`).
pub const BATCH_OPS: usize = 128;
/// Most key+value bytes per restore/migrate transaction (under etcd's 1.5 MiB `--max-request-bytes`).
pub const BATCH_BYTES: usize = 1024 * 1024;

const MAX_HEADER: u32 = 64 * 1024;
const MAX_CHUNK: u32 = 4 * CHUNK_BYTES as u32;
/// The sled database directory inside a sled store directory (`store::sled::SLED_DIR`, private there).
const SLED_SUBDIR: &str = "sled";
const AAD_LABEL: &[u8] = b"nimbus-backup/1";
const TAG_ENTRIES: u8 = 1;
const TAG_FILE: u8 = 2;
const TAG_END: u8 = 3;
/// data_dir entries never backed up (relative paths).
const SKIP: &[&str] = &["state", "releases/uploads", "releases/staging", ".write-test"];

/// Errors of backup, restore and migrate.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Bad flags or configuration (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The KEK could not be loaded (exit 64).
    #[error("key-encryption key: {0}")]
    Kek(#[source] KekError),
    /// The backup file is not a valid backup for this KEK (exit 65).
    #[error("backup {}: {detail}; nothing was restored", path.display())]
    BadBackup { path: PathBuf, detail: String },
    /// The sled store is held by a running coordinator.
    #[error(
        "the sled store in {} is in use by a running coordinator: stop the coordinator (systemctl stop \
         nimbus-coordinator) first; etcd backups work online",
        path.display()
    )]
    CoordinatorRunning { path: PathBuf },
    /// The target store already holds data.
    #[error(
        "the target store is not empty ({count} keys, e.g. {example:?}); restore and migrate only fill an empty \
         store, so that nothing is mixed or overwritten: point at a fresh store (new data_dir or etcd prefix) or \
         remove its data first"
    )]
    TargetNotEmpty { count: usize, example: String },
    /// Files of the backup already exist in data_dir.
    #[error(
        "{} already holds {} of the backup's files (e.g. {}); refusing to overwrite keys: move them away, or \
         pass --force to replace them",
        data_dir.display(), paths.len(), paths.first().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    FilesExist { data_dir: PathBuf, paths: Vec<PathBuf> },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Read-back after a migration or restore differs from the source.
    #[error("verification failed: {0}; the target is incomplete, empty it before trying again")]
    Verify(String),
}

impl BackupError {
    /// Exit code: 64 usage/config, 65 bad backup data, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            BackupError::Usage(_) | BackupError::Kek(_) => daemon::config::EXIT_USAGE,
            BackupError::BadBackup { .. } => EXIT_DATAERR,
            _ => 1,
        }
    }

    /// A store error from opening the store, with a running coordinator named as such.
    pub fn from_open(e: StoreError) -> BackupError {
        match e {
            StoreError::Locked { path } => BackupError::CoordinatorRunning { path },
            other => BackupError::Store(other),
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_owned();
    move |source| BackupError::Io { what, path, source }
}

/// The plaintext header of a backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub format: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The backend it was taken from, e.g. `sled:/var/lib/nimbus-coordinator/state` or
    /// `etcd:https://a:2379,https://b:2379 prefix nimbus/`.
    pub source: String,
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    /// Id of the KEK that sealed it (hex).
    pub kek_id: String,
}

/// What a backup, restore or migration moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
}

/// Every entry of `store` except the leader key: one consistent snapshot.
pub fn snapshot(store: &dyn Store) -> Result<Vec<KeyValue>, StoreError> {
    let mut all = store.scan_prefix(b"")?;
    all.retain(|(k, _)| k.as_slice() != crate::leader::LEADER_KEY);
    Ok(all)
}

/// The regular files under `data_dir` a backup holds (relative paths, sorted), see the module doc.
pub fn data_files(data_dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut out = Vec::new();
    if data_dir.exists() {
        walk(data_dir, Path::new(""), &mut out)?;
    }
    out.sort();
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), BackupError> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).map_err(io("cannot list", &dir))? {
        let entry = entry.map_err(io("cannot list", &dir))?;
        let rel_path = rel.join(entry.file_name());
        if SKIP.iter().any(|s| rel_path == Path::new(s)) {
            continue;
        }
        let ft = entry.file_type().map_err(io("cannot stat", &entry.path()))?;
        if ft.is_dir() {
            walk(root, &rel_path, out)?;
        } else if ft.is_file() {
            if rel_path.to_str().is_none() {
                tracing::warn!(path = %rel_path.display(), "not backed up: name is not UTF-8");
                continue;
            }
            out.push(rel_path);
        } else {
            tracing::warn!(path = %rel_path.display(), "not backed up: not a regular file");
        }
    }
    Ok(())
}

fn aad(header_hash: &[u8; 32], index: u64) -> Vec<u8> {
    [AAD_LABEL, header_hash.as_slice(), &index.to_be_bytes()].concat()
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
    buf.extend_from_slice(b);
}

struct ChunkWriter<'a> {
    out: BufWriter<File>,
    path: &'a Path,
    kek: &'a Kek,
    header_hash: [u8; 32],
    index: u64,
}

impl ChunkWriter<'_> {
    fn write(&mut self, record: &[u8]) -> Result<(), BackupError> {
        let sealed = self
            .kek
            .try_seal(record, &aad(&self.header_hash, self.index))
            .map_err(BackupError::Kek)?;
        self.index += 1;
        self.out
            .write_all(&(sealed.len() as u32).to_be_bytes())
            .and_then(|()| self.out.write_all(&sealed))
            .map_err(io("cannot write", self.path))
    }
}

/// Writes an encrypted backup of `entries` (a [`snapshot`]) and the files of `data_dir` to `to`, atomically
/// (temporary file, fsync, rename; mode 0600). `source` names the backend for the header.
pub fn write_backup(
    entries: &[KeyValue],
    data_dir: &Path,
    source: &str,
    kek: &Kek,
    to: &Path,
) -> Result<Summary, BackupError> {
    let files = data_files(data_dir)?;
    let mut file_bytes = 0u64;
    for f in &files {
        let p = data_dir.join(f);
        file_bytes += fs::metadata(&p).map_err(io("cannot stat", &p))?.len();
    }
    let header = BackupHeader {
        format: FORMAT_VERSION,
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        source: source.to_owned(),
        entries: entries.len() as u64,
        files: files.len() as u64,
        file_bytes,
        kek_id: kek.id().to_string(),
    };
    let header_json =
        serde_json::to_vec(&header).map_err(|e| BackupError::Usage(format!("cannot encode the header: {e}")))?;

    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = to
        .file_name()
        .ok_or_else(|| BackupError::Usage(format!("--to {} is not a file name", to.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("cannot create", &tmp))?;
    let result = (|| {
        let mut w = ChunkWriter {
            out: BufWriter::new(file),
            path: &tmp,
            kek,
            header_hash: Sha256::digest(&header_json).into(),
            index: 0,
        };
        w.out
            .write_all(MAGIC)
            .and_then(|()| w.out.write_all(&(header_json.len() as u32).to_be_bytes()))
            .and_then(|()| w.out.write_all(&header_json))
            .map_err(io("cannot write", &tmp))?;

        // Store entries, in records of about CHUNK_BYTES.
        let mut rec = Vec::new();
        let mut n = 0u32;
        let flush = |w: &mut ChunkWriter, rec: &mut Vec<u8>, n: &mut u32| -> Result<(), BackupError> {
            if *n > 0 {
                let mut full = vec![TAG_ENTRIES];
                full.extend_from_slice(&n.to_be_bytes());
                full.extend_from_slice(rec);
                w.write(&full)?;
                rec.clear();
                *n = 0;
            }
            Ok(())
        };
        for (k, v) in entries {
            put_bytes(&mut rec, k);
            put_bytes(&mut rec, v);
            n += 1;
            if rec.len() >= CHUNK_BYTES {
                flush(&mut w, &mut rec, &mut n)?;
            }
        }
        flush(&mut w, &mut rec, &mut n)?;

        // Files, in pieces of CHUNK_BYTES (an empty file is one empty piece).
        let mut total = 0u64;
        for f in &files {
            let p = data_dir.join(f);
            let mut src = File::open(&p).map_err(io("cannot read", &p))?;
            let meta = src.metadata().map_err(io("cannot stat", &p))?;
            let size = meta.len();
            let mode = meta.permissions().mode() & 0o7777;
            let mut offset = 0u64;
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let want = (size - offset).min(CHUNK_BYTES as u64) as usize;
                src.read_exact(&mut buf[..want])
                    .map_err(io("cannot read (did it change during the backup?)", &p))?;
                let mut r = vec![TAG_FILE];
                put_bytes(&mut r, f.to_string_lossy().as_bytes());
                r.extend_from_slice(&mode.to_be_bytes());
                r.extend_from_slice(&size.to_be_bytes());
                r.extend_from_slice(&offset.to_be_bytes());
                put_bytes(&mut r, &buf[..want]);
                w.write(&r)?;
                offset += want as u64;
                if offset >= size {
                    break;
                }
            }
            total += size;
        }
        if total != file_bytes {
            return Err(BackupError::Verify(format!(
                "files in {} changed during the backup; run it again",
                data_dir.display()
            )));
        }
        let mut end = vec![TAG_END];
        end.extend_from_slice(&(entries.len() as u64).to_be_bytes());
        end.extend_from_slice(&(files.len() as u64).to_be_bytes());
        end.extend_from_slice(&file_bytes.to_be_bytes());
        w.write(&end)?;
        let file = w.out.into_inner().map_err(|e| BackupError::Io {
            what: "cannot write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io("cannot fsync", &tmp))?;
        fs::rename(&tmp, to).map_err(io("cannot rename the finished backup to", to))?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(Summary {
            entries: entries.len() as u64,
            files: files.len() as u64,
            file_bytes,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// One decoded record.
enum Record {
    Entries(Vec<KeyValue>),
    File {
        path: PathBuf,
        mode: u32,
        size: u64,
        offset: u64,
        data: Vec<u8>,
    },
    End(Summary),
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
}

fn decode(rec: &[u8]) -> Option<Record> {
    let (&tag, rest) = rec.split_first()?;
    let mut c = Cursor(rest);
    let r = match tag {
        TAG_ENTRIES => {
            let n = c.u32()?;
            let mut v = Vec::new();
            for _ in 0..n {
                v.push((c.bytes()?, c.bytes()?));
            }
            Record::Entries(v)
        }
        TAG_FILE => {
            let path = PathBuf::from(String::from_utf8(c.bytes()?).ok()?);
            // Relative, without `..`: a backup never writes outside data_dir.
            if path.as_os_str().is_empty() || !path.components().all(|p| matches!(p, Component::Normal(_))) {
                return None;
            }
            Record::File {
                path,
                mode: c.u32()?,
                size: c.u64()?,
                offset: c.u64()?,
                data: c.bytes()?,
            }
        }
        TAG_END => Record::End(Summary {
            entries: c.u64()?,
            files: c.u64()?,
            file_bytes: c.u64()?,
        }),
        _ => return None,
    };
    c.0.is_empty().then_some(r)
}

/// A backup file opened for reading: header read, chunks streamed.
struct Reader<'a> {
    input: BufReader<File>,
    path: &'a Path,
    kek: &'a Kek,
    header_hash: [u8; 32],
    index: u64,
}

impl Reader<'_> {
    fn bad(&self, detail: impl Into<String>) -> BackupError {
        BackupError::BadBackup {
            path: self.path.to_owned(),
            detail: detail.into(),
        }
    }

    /// The next record; `None` at a clean end of file.
    fn next(&mut self) -> Result<Option<Record>, BackupError> {
        let mut len = [0u8; 4];
        match self.input.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(io("cannot read", self.path)(e)),
        }
        self.input
            .read_exact(&mut len[1..])
            .map_err(|_| self.bad(format!("truncated in chunk {}", self.index)))?;
        let len = u32::from_be_bytes(len);
        if len > MAX_CHUNK {
            return Err(self.bad(format!("chunk {} claims {len} bytes: corrupt", self.index)));
        }
        let mut sealed = vec![0u8; len as usize];
        self.input
            .read_exact(&mut sealed)
            .map_err(|_| self.bad(format!("truncated in chunk {}", self.index)))?;
        let plain = self
            .kek
            .open(&sealed, &aad(&self.header_hash, self.index))
            .map_err(|e| match e {
                KekError::WrongKey { .. } => self.bad(e.to_string()),
                KekError::Tampered(_) => self.bad(format!(
                    "chunk {} failed authentication (modified, reordered, or the header was changed)",
                    self.index
                )),
                other => self.bad(format!("chunk {}: {other}", self.index)),
            })?;
        self.index += 1;
        decode(&plain).map(Some).ok_or_else(|| {
            self.bad(format!(
                "chunk {} is authentic but not a valid record: a bug in the writer",
                self.index - 1
            ))
        })
    }
}

/// Reads the plaintext header of a backup (no KEK needed).
pub fn read_header(from: &Path) -> Result<BackupHeader, BackupError> {
    open_backup(from).map(|(h, _, _)| h)
}

fn open_backup(from: &Path) -> Result<(BackupHeader, [u8; 32], BufReader<File>), BackupError> {
    let bad = |detail: String| BackupError::BadBackup {
        path: from.to_owned(),
        detail,
    };
    let mut input = BufReader::new(File::open(from).map_err(io("cannot open", from))?);
    let mut magic = [0u8; MAGIC.len()];
    if input.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(bad("not a nimbus-coordinator backup (wrong magic)".into()));
    }
    let mut len = [0u8; 4];
    input.read_exact(&mut len).map_err(|_| bad("truncated header".into()))?;
    let len = u32::from_be_bytes(len);
    if len > MAX_HEADER {
        return Err(bad(format!("header claims {len} bytes: corrupt")));
    }
    let mut json = vec![0u8; len as usize];
    input
        .read_exact(&mut json)
        .map_err(|_| bad("truncated header".into()))?;
    let header: BackupHeader = serde_json::from_slice(&json).map_err(|e| bad(format!("unreadable header: {e}")))?;
    if header.format != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {}, this nimbus-coordinator reads version {FORMAT_VERSION}; use a matching version",
            header.format
        )));
    }
    Ok((header, Sha256::digest(&json).into(), input))
}

fn reader<'a>(from: &'a Path, kek: &'a Kek) -> Result<(BackupHeader, Reader<'a>), BackupError> {
    let (header, header_hash, input) = open_backup(from)?;
    if header.kek_id != kek.id().to_string() {
        return Err(BackupError::BadBackup {
            path: from.to_owned(),
            detail: format!(
                "this was sealed with key {}, you gave key {}; supply the KEK that made it",
                header.kek_id,
                kek.id()
            ),
        });
    }
    Ok((
        header,
        Reader {
            input,
            path: from,
            kek,
            header_hash,
            index: 0,
        },
    ))
}

/// Opens and checks every chunk of the backup `from` without writing anything: authentic, in order,
/// complete (End present, counts matching the header). Returns the header and the files it holds.
pub fn verify_backup(from: &Path, kek: &Kek) -> Result<(BackupHeader, Vec<PathBuf>), BackupError> {
    let (header, mut r) = reader(from, kek)?;
    let mut seen = Summary::default();
    let mut files: Vec<PathBuf> = Vec::new();
    // (path, size, next offset) of the file being read.
    let mut current: Option<(PathBuf, u64, u64)> = None;
    let mut end = None;
    while let Some(rec) = r.next()? {
        if end.is_some() {
            return Err(r.bad("data after the end record"));
        }
        match rec {
            Record::Entries(v) => seen.entries += v.len() as u64,
            Record::File {
                path,
                size,
                offset,
                data,
                ..
            } => {
                let next = match current.take() {
                    Some((p, s, o)) if p == path && s == size && o == offset && o < s => o,
                    Some((p, s, o)) if o < s => {
                        return Err(r.bad(format!("file {} is incomplete", p.display())));
                    }
                    _ if offset == 0 => {
                        if files.contains(&path) {
                            return Err(r.bad(format!("file {} appears twice", path.display())));
                        }
                        files.push(path.clone());
                        seen.files += 1;
                        0
                    }
                    _ => return Err(r.bad(format!("file {} starts mid-way", path.display()))),
                };
                let o = next + data.len() as u64;
                if o > size {
                    return Err(r.bad(format!("file {} is longer than its size", path.display())));
                }
                seen.file_bytes += data.len() as u64;
                current = Some((path, size, o));
            }
            Record::End(s) => end = Some(s),
        }
    }
    if let Some((p, s, o)) = current
        && o < s
    {
        return Err(r.bad(format!("file {} is incomplete", p.display())));
    }
    let Some(end) = end else {
        return Err(r.bad("truncated: the end record is missing"));
    };
    let claimed = Summary {
        entries: header.entries,
        files: header.files,
        file_bytes: header.file_bytes,
    };
    if end != seen || claimed != seen {
        return Err(r.bad(format!(
            "counts do not match: header {claimed:?}, end record {end:?}, found {seen:?}"
        )));
    }
    Ok((header, files))
}

/// Fails with [`BackupError::TargetNotEmpty`] when `store` holds any key (the leader key included).
pub fn ensure_empty(store: &dyn Store) -> Result<(), BackupError> {
    let existing = store.scan_prefix(b"")?;
    if let Some((k, _)) = existing.first() {
        return Err(BackupError::TargetNotEmpty {
            count: existing.len(),
            example: String::from_utf8_lossy(k).into_owned(),
        });
    }
    Ok(())
}

/// Writes `entries` into `target` in transactions of at most [`BATCH_OPS`] keys and about [`BATCH_BYTES`],
/// each conditioned on its keys being absent (a concurrent writer makes it fail instead of mixing data).
/// `progress(done)` is called after every transaction.
pub fn copy_entries(
    target: &dyn Store,
    entries: &[KeyValue],
    mut progress: impl FnMut(u64),
) -> Result<(), BackupError> {
    let mut done = 0u64;
    let mut i = 0;
    while i < entries.len() {
        let mut txn = Txn::new();
        let mut bytes = 0;
        let mut n = 0;
        while i < entries.len() && n < BATCH_OPS {
            let (k, v) = &entries[i];
            let size = 2 * k.len() + v.len() + 64;
            if n > 0 && bytes + size > BATCH_BYTES {
                break;
            }
            txn = txn.if_absent(k.clone()).put(k.clone(), v.clone());
            bytes += size;
            n += 1;
            i += 1;
        }
        if !target.txn(txn)? {
            return Err(BackupError::Verify(
                "a key appeared in the target while copying: something else writes to it (a running coordinator?)"
                    .into(),
            ));
        }
        done += n as u64;
        progress(done);
    }
    target.flush()?;
    Ok(())
}

/// Checks that `target` holds exactly `expected` (leader key aside).
pub fn verify_copy(target: &dyn Store, expected: &[KeyValue]) -> Result<(), BackupError> {
    let got = snapshot(target)?;
    if got.len() != expected.len() {
        return Err(BackupError::Verify(format!(
            "the target holds {} keys, expected {}",
            got.len(),
            expected.len()
        )));
    }
    let mut want = expected.to_vec();
    want.sort();
    if let Some(((k, _), _)) = got.iter().zip(&want).find(|(a, b)| a != b) {
        return Err(BackupError::Verify(format!(
            "key {:?} differs after the copy",
            String::from_utf8_lossy(k)
        )));
    }
    Ok(())
}

/// Options of [`restore_backup`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Replace files that already exist in data_dir.
    pub force: bool,
    /// Print "restored N/M entries" lines on stderr.
    pub progress: bool,
}

/// Restores the backup `from` into the empty `store` and `data_dir` (see the module doc). The whole backup
/// is verified before anything is written.
pub fn restore_backup(
    from: &Path,
    kek: &Kek,
    store: &dyn Store,
    data_dir: &Path,
    opts: RestoreOptions,
) -> Result<Summary, BackupError> {
    let (header, files) = verify_backup(from, kek)?;
    ensure_empty(store)?;
    let existing: Vec<PathBuf> = files.iter().filter(|f| data_dir.join(f).exists()).cloned().collect();
    if !existing.is_empty() && !opts.force {
        return Err(BackupError::FilesExist {
            data_dir: data_dir.to_owned(),
            paths: existing,
        });
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io("cannot create", data_dir))?;
    // Restored files belong to whoever owns data_dir (restore may run as root for a service user).
    let owner = fs::metadata(data_dir).map(|m| (m.uid(), m.gid())).ok();

    let total = header.entries;
    let (_, mut r) = reader(from, kek)?;
    let mut restored = Summary::default();
    let mut open_file: Option<(PathBuf, PathBuf, File, u64)> = None; // (final, tmp, handle, size)
    let report = |done: u64| {
        if opts.progress {
            eprintln!("restored {done}/{total} entries");
        }
    };
    while let Some(rec) = r.next()? {
        match rec {
            Record::Entries(v) => {
                let base = restored.entries;
                copy_entries(store, &v, |d| report(base + d))?;
                restored.entries += v.len() as u64;
            }
            Record::File {
                path,
                mode,
                size,
                offset,
                data,
            } => {
                if offset == 0 {
                    let dest = data_dir.join(&path);
                    if let Some(parent) = dest.parent() {
                        create_dirs(data_dir, parent, owner)?;
                    }
                    let tmp = dest.with_file_name(format!(
                        ".{}.restore-{}",
                        dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                        std::process::id()
                    ));
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(io("cannot create", &tmp))?;
                    f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
                        .map_err(io("cannot chmod", &tmp))?;
                    if let Some((uid, gid)) = owner {
                        let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
                    }
                    open_file = Some((dest, tmp, f, size));
                    restored.files += 1;
                }
                if let Some((dest, tmp, f, size)) = open_file.as_mut() {
                    f.write_all(&data).map_err(io("cannot write", tmp))?;
                    restored.file_bytes += data.len() as u64;
                    if offset + data.len() as u64 >= *size {
                        f.sync_all().map_err(io("cannot fsync", tmp))?;
                        fs::rename(&*tmp, &*dest).map_err(io("cannot rename into place", dest))?;
                        open_file = None;
                    }
                }
            }
            Record::End(_) => {}
        }
    }
    if let Some((_, tmp, _, _)) = open_file {
        let _ = fs::remove_file(&tmp);
        return Err(BackupError::Verify("the backup changed while it was restored".into()));
    }
    if opts.progress {
        eprintln!(
            "restored {} entries and {} files ({} bytes)",
            restored.entries, restored.files, restored.file_bytes
        );
    }
    Ok(restored)
}

fn create_dirs(root: &Path, dir: &Path, owner: Option<(u32, u32)>) -> Result<(), BackupError> {
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != root
    {
        create_dirs(root, parent, owner)?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .or_else(|e| if dir.is_dir() { Ok(()) } else { Err(e) })
        .map_err(io("cannot create", dir))?;
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::chown(dir, Some(uid), Some(gid));
    }
    Ok(())
}

/// Copies every entry of `from` (leader key aside) into the empty `to`, then reads `to` back and compares.
pub fn migrate(from: &dyn Store, to: &dyn Store, mut progress: impl FnMut(u64, u64)) -> Result<Summary, BackupError> {
    let entries = snapshot(from)?;
    ensure_empty(to)?;
    let total = entries.len() as u64;
    copy_entries(to, &entries, |d| progress(d, total))?;
    verify_copy(to, &entries)?;
    Ok(Summary {
        entries: total,
        ..Summary::default()
    })
}

/// The backend `config` selects, for messages and backup headers.
pub fn describe_store(config: &Config) -> String {
    match &config.store {
        StoreSettings::Sled => format!("sled:{}", config.data_dir.join("state").display()),
        StoreSettings::Etcd(e) => format!("etcd:{} prefix {}", e.endpoints.join(","), e.prefix),
    }
}

/// Opens the store `config` selects through [`crate::server::open_store`], naming a running coordinator
/// that holds the sled store.
pub async fn open_configured_store(config: &Config) -> Result<Arc<dyn Store>, BackupError> {
    crate::server::open_store(config).await.map_err(|e| match e {
        CoordError::Store(s) => BackupError::from_open(s),
        CoordError::Config(errs) => BackupError::Usage(errs.join("; ")),
        other => BackupError::Usage(other.to_string()),
    })
}

/// `nimbus-coordinator backup`: a snapshot of the configured store and the files of `data_dir`, sealed with
/// `kek`, written atomically to `to`.
pub async fn backup(config: &Config, kek: &Kek, to: &Path) -> Result<Summary, BackupError> {
    if matches!(config.store, StoreSettings::Sled) && !config.data_dir.join("state").exists() {
        return Err(BackupError::Usage(format!(
            "there is no sled store in {}: check --data-dir / --config (or the etcd settings)",
            config.data_dir.join("state").display()
        )));
    }
    let store = open_configured_store(config).await?;
    let entries = snapshot(store.as_ref())?;
    // sled: the store stays open (and locked) until the files are read too, so no coordinator starts between.
    let summary = write_backup(&entries, &config.data_dir, &describe_store(config), kek, to)?;
    drop(store);
    Ok(summary)
}

/// `nimbus-coordinator restore`: verifies the backup `from`, then fills the configured (empty) store and
/// `data_dir`.
pub async fn restore(config: &Config, kek: &Kek, from: &Path, opts: RestoreOptions) -> Result<Summary, BackupError> {
    // Verify before opening (and, for sled, creating) anything.
    verify_backup(from, kek)?;
    let store = open_configured_store(config).await?;
    restore_backup(from, kek, store.as_ref(), &config.data_dir, opts)
}

/// A `--from`/`--to` store of `migrate`: `sled:PATH` or `etcd:ENDPOINT[,ENDPOINT…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// A data_dir (holding `state/`) or the sled store directory itself (holding `sled/`).
    Sled(PathBuf),
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("sled", p)) if !p.is_empty() => Ok(StoreSpec::Sled(PathBuf::from(p))),
            Some(("etcd", eps)) if !eps.is_empty() => Ok(StoreSpec::Etcd(eps.split(',').map(str::to_owned).collect())),
            _ => Err(format!(
                "{s:?} is not a store: use sled:/var/lib/nimbus-coordinator or etcd:https://10.0.0.5:2379,https://10.0.0.6:2379"
            )),
        }
    }
}

impl StoreSpec {
    /// The sled store directory of a `Sled` spec: `PATH/state` when PATH is a data_dir, else PATH.
    pub fn sled_store_dir(path: &Path) -> PathBuf {
        let state = path.join("state");
        if state.join(SLED_SUBDIR).exists() || !path.join(SLED_SUBDIR).exists() {
            state
        } else {
            path.to_owned()
        }
    }
}
