//! Sinks: where entries and checkpoints are shipped outside the store, and reading a JSON-lines sink
//! back for `nimbusctl audit verify --against FILE`.
//!
//! Line format (one JSON object per line): the entry or checkpoint's own members plus
//! `"type": "entry"` or `"type": "checkpoint"`, e.g.
//! `{"type":"checkpoint","seq":42,"hash":"…","at_unix_ms":…,"key_id":"…","signature":"…"}`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{AuditError, Result};
use crate::model::{Checkpoint, Entry};

/// Mode of a JSON-lines sink file the library creates: owner read/write, group read (e.g. `adm` for
/// the log shipper).
pub const SINK_FILE_MODE: u32 = 0o640;

/// Somewhere entries and checkpoints are shipped to. Emitting never fails the caller: a sink logs its
/// own errors (with `tracing`) and carries on.
pub trait Sink: Send + Sync {
    /// Called once per appended entry, in seq order within one process.
    fn emit_entry(&self, entry: &Entry);
    /// Called for every checkpoint; checkpoints reaching an outside sink are what make truncating or
    /// rewriting the store detectable.
    fn emit_checkpoint(&self, checkpoint: &Checkpoint);
}

/// One line of a JSON-lines sink, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkLine {
    Entry(Entry),
    Checkpoint(Checkpoint),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum SinkLineRef<'a> {
    Entry(&'a Entry),
    Checkpoint(&'a Checkpoint),
}

/// The JSON object (one line, no newline) a sink writes for an entry.
pub fn entry_json(entry: &Entry) -> Result<String> {
    Ok(serde_json::to_string(&SinkLineRef::Entry(entry))?)
}

/// The JSON object (one line, no newline) a sink writes for a checkpoint.
pub fn checkpoint_json(checkpoint: &Checkpoint) -> Result<String> {
    Ok(serde_json::to_string(&SinkLineRef::Checkpoint(checkpoint))?)
}

/// An append-only JSON-lines file. Created mode 0640 if missing (an existing file keeps its mode).
/// Each line goes to the kernel in one `write` (no user-space buffering); checkpoint lines are also
/// `fdatasync`ed. When the path is renamed or removed (log rotation), the next write reopens it.
#[derive(Debug)]
pub struct JsonLinesFile {
    path: PathBuf,
    file: Mutex<Option<OpenFile>>,
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    dev: u64,
    ino: u64,
}

impl JsonLinesFile {
    /// Opens (or creates) the file now, so a bad path is reported at startup.
    pub fn open(path: impl Into<PathBuf>) -> Result<JsonLinesFile> {
        let path = path.into();
        let file = open_append(&path).map_err(|source| AuditError::SinkOpen {
            path: path.clone(),
            source,
        })?;
        Ok(JsonLinesFile {
            path,
            file: Mutex::new(Some(file)),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes and reopens the file (e.g. on SIGHUP after rotation).
    pub fn reopen(&self) -> Result<()> {
        let file = open_append(&self.path).map_err(|source| AuditError::SinkOpen {
            path: self.path.clone(),
            source,
        })?;
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        *guard = Some(file);
        Ok(())
    }

    fn write_line(&self, what: &str, seq: u64, json: Result<String>, sync: bool) {
        let mut line = match json {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, what, seq, "audit: could not encode a sink line");
                return;
            }
        };
        line.push('\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // Follow log rotation: the path now names another file (or none).
        let rotated = match (&*guard, std::fs::metadata(&self.path)) {
            (Some(open), Ok(meta)) => meta.dev() != open.dev || meta.ino() != open.ino,
            _ => true,
        };
        if rotated {
            match open_append(&self.path) {
                Ok(f) => *guard = Some(f),
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, what, seq, "audit: cannot reopen sink file; line lost");
                    *guard = None;
                    return;
                }
            }
        }
        let Some(open) = guard.as_mut() else { return };
        let res = open
            .file
            .write_all(line.as_bytes())
            .and_then(|()| if sync { open.file.sync_data() } else { Ok(()) });
        if let Err(error) = res {
            tracing::warn!(path = %self.path.display(), %error, what, seq, "audit: sink file write failed; line lost");
            // Reopen on the next write.
            *guard = None;
        }
    }
}

impl Sink for JsonLinesFile {
    fn emit_entry(&self, entry: &Entry) {
        self.write_line("entry", entry.seq, entry_json(entry), false);
    }

    fn emit_checkpoint(&self, checkpoint: &Checkpoint) {
        self.write_line("checkpoint", checkpoint.seq, checkpoint_json(checkpoint), true);
    }
}

fn open_append(path: &Path) -> std::io::Result<OpenFile> {
    let file = match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(SINK_FILE_MODE)
        .open(path)
    {
        Ok(f) => {
            // The umask may have taken bits away; the mode is part of the contract.
            f.set_permissions(std::fs::Permissions::from_mode(SINK_FILE_MODE))?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new().append(true).open(path)?,
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    Ok(OpenFile {
        file,
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Every line of a JSON-lines sink file. Blank lines are skipped, and so is a last line without its
/// newline (a write cut short by a crash), with a warning; any other line that is not an entry or a
/// checkpoint is an error naming the line.
pub fn read_sink(path: &Path) -> Result<Vec<SinkLine>> {
    let file = File::open(path).map_err(|source| AuditError::SinkRead {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| AuditError::SinkRead {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let complete = buf.ends_with(b"\n");
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<SinkLine>(text) {
            Ok(l) => out.push(l),
            Err(_) if !complete => {
                tracing::warn!(path = %path.display(), line = line_no, "audit: ignoring an incomplete last line");
            }
            Err(e) => {
                return Err(AuditError::SinkParse {
                    path: path.to_path_buf(),
                    line: line_no,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// The checkpoints of a JSON-lines sink file (see [`read_sink`]), in file order.
pub fn read_sink_checkpoints(path: &Path) -> Result<Vec<Checkpoint>> {
    Ok(read_sink(path)?
        .into_iter()
        .filter_map(|l| match l {
            SinkLine::Checkpoint(c) => Some(c),
            SinkLine::Entry(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GENESIS_PREV, Principal, Record};

    fn entry() -> Entry {
        Entry::seal(
            1,
            5,
            GENESIS_PREV,
            Record::new(Principal::system("coordinator"), "key.rotate", "wg"),
        )
    }

    #[test]
    fn lines_carry_a_type_and_round_trip() {
        let e = entry();
        let v: serde_json::Value = serde_json::from_str(&entry_json(&e).unwrap()).unwrap();
        assert_eq!(v["type"], "entry");
        assert_eq!(v["seq"], 1);
        let back: SinkLine = serde_json::from_value(v).unwrap();
        assert_eq!(back, SinkLine::Entry(e));
    }

    #[test]
    fn incomplete_last_line_is_skipped_but_a_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let good = entry_json(&entry()).unwrap();
        std::fs::write(&path, format!("{good}\n\n{good}\n{{\"type\":\"chec")).unwrap();
        assert_eq!(read_sink(&path).unwrap().len(), 2);
        std::fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        match read_sink(&path) {
            Err(AuditError::SinkParse { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rotation_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = JsonLinesFile::open(&path).unwrap();
        sink.emit_entry(&entry());
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.emit_entry(&entry());
        assert_eq!(read_sink(&path).unwrap().len(), 1);
        assert_eq!(read_sink(&dir.path().join("audit.jsonl.1")).unwrap().len(), 1);
    }

    #[test]
    fn missing_directory_is_reported_at_open() {
        let err = JsonLinesFile::open("/nonexistent-dir/audit.jsonl").unwrap_err();
        assert!(matches!(err, AuditError::SinkOpen { .. }), "{err}");
    }
}
