//! [`Store`] on sled 0.34.
//!
//! Files under the data directory (created mode 0700 when missing):
//! * `store.lock`: held with an exclusive `flock` while the store is open, so a second coordinator on the
//!   same directory fails fast with [`StoreError::Locked`].
//! * `sled/`: the sled database.
//!
//! Transactions run through `Tree::transaction` (sled serialises transactions), and every transaction that
//! applied its ops is flushed before `txn` returns, so a `kill -9` loses nothing that was acknowledged.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ::sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Compare, KeyValue, Op, Store, StoreError, Txn};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "store.lock";
/// Name of the sled directory inside the data directory.
pub const SLED_DIR: &str = "sled";

/// A sled database in `<data dir>/sled`, locked by `<data dir>/store.lock`.
pub struct SledStore {
    // Field order matters: the database closes before the lock is released.
    db: ::sled::Db,
    path: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (creating if needed) the store under the data directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| open_io_error(dir, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: dir.to_owned() });
            }
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    source: e,
                });
            }
        }

        let sled_dir = dir.join(SLED_DIR);
        create_private_dir(&sled_dir)?;
        let db = ::sled::Config::new().path(&sled_dir).open().map_err(|e| match e {
            ::sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked { path: dir.to_owned() }
            }
            ::sled::Error::Io(io) => open_io_error(&sled_dir, io),
            other => map_sled(&sled_dir, other),
        })?;
        tracing::debug!(path = %sled_dir.display(), recovered = db.was_recovered(), "opened sled store");
        Ok(SledStore {
            db,
            path: sled_dir,
            _lock: lock,
        })
    }

    /// Directory of the sled database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: ::sled::Error) -> StoreError {
        map_sled(&self.path, e)
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(|e| self.err(e))?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.err(e)))
            .collect()
    }

    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let result: Result<bool, TransactionError<()>> = self.db.transaction(|tx| {
            for c in &txn.compares {
                let holds = match c {
                    Compare::Equals(k, v) => tx.get(k)?.is_some_and(|cur| cur.as_ref() == v.as_slice()),
                    Compare::Absent(k) => tx.get(k)?.is_none(),
                    Compare::Present(k) => tx.get(k)?.is_some(),
                };
                if !holds {
                    // Nothing was written yet: committing an empty write set applies nothing.
                    return Ok::<bool, ConflictableTransactionError<()>>(false);
                }
            }
            for op in &txn.ops {
                match op {
                    Op::Put(k, v) => {
                        tx.insert(k.as_slice(), v.as_slice())?;
                    }
                    Op::Delete(k) => {
                        tx.remove(k.as_slice())?;
                    }
                }
            }
            Ok(true)
        });
        match result {
            Ok(true) => {
                self.flush()?;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(self.err(e)),
            Err(TransactionError::Abort(())) => {
                Err(StoreError::Backend("sled transaction aborted unexpectedly".to_owned()))
            }
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }
}

/// Creates `dir` (and parents) with mode 0700 when missing; maps failures to [`StoreError::NotWritable`].
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| open_io_error(dir, e))?;
    if !dir.is_dir() {
        return Err(StoreError::NotWritable {
            path: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    Ok(())
}

fn open_io_error(path: &Path, e: io::Error) -> StoreError {
    use io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem | K::NotADirectory | K::AlreadyExists => StoreError::NotWritable {
            path: path.to_owned(),
            source: e,
        },
        _ => StoreError::Io {
            path: path.to_owned(),
            source: e,
        },
    }
}

fn map_sled(path: &Path, e: ::sled::Error) -> StoreError {
    match e {
        ::sled::Error::Io(source) => StoreError::Io {
            path: path.to_owned(),
            source,
        },
        ::sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            path: path.to_owned(),
            detail: match at {
                Some(at) => format!("sled detected corruption at {at:?}"),
                None => "sled detected corruption".to_owned(),
            },
        },
        other => StoreError::Backend(other.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn open_tmp() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("data")).unwrap();
        (dir, store)
    }

    #[test]
    fn creates_private_dirs() {
        let (dir, store) = open_tmp();
        let data = dir.path().join("data");
        for d in [data.clone(), data.join(SLED_DIR)] {
            let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        assert_eq!(store.path(), data.join(SLED_DIR));
        let lock_mode = fs::metadata(data.join(LOCK_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(lock_mode, 0o600);
    }

    #[test]
    fn get_put_delete_scan() {
        let (_dir, s) = open_tmp();
        assert_eq!(s.get(b"a/1").unwrap(), None);
        assert!(
            s.txn(Txn::new().put("a/1", "x").put("a/2", "y").put("b/1", "z"))
                .unwrap()
        );
        assert_eq!(s.get(b"a/1").unwrap().as_deref(), Some(&b"x"[..]));
        let scan = s.scan_prefix(b"a/").unwrap();
        assert_eq!(
            scan,
            vec![(b"a/1".to_vec(), b"x".to_vec()), (b"a/2".to_vec(), b"y".to_vec())]
        );
        assert!(s.txn(Txn::new().delete("a/1").delete("missing")).unwrap());
        assert_eq!(s.get(b"a/1").unwrap(), None);
        assert_eq!(s.scan_prefix(b"a/").unwrap().len(), 1);
        assert_eq!(s.scan_prefix(b"").unwrap().len(), 2);
    }

    #[test]
    fn compare_semantics() {
        let (_dir, s) = open_tmp();
        assert!(s.txn(Txn::new().put("k", "v1")).unwrap());
        let snapshot = || s.scan_prefix(b"").unwrap();
        let before = snapshot();

        // Each failing compare leaves the store untouched, even with other compares holding.
        let failing = [
            Compare::Equals(b"k".to_vec(), b"v2".to_vec()),
            Compare::Equals(b"nope".to_vec(), b"v1".to_vec()),
            Compare::Absent(b"k".to_vec()),
            Compare::Present(b"nope".to_vec()),
        ];
        for c in failing {
            let t = Txn::new()
                .if_present("k")
                .when(c.clone())
                .put("k", "changed")
                .put("new", "1")
                .delete("k");
            assert!(!s.txn(t).unwrap(), "{c:?} should fail");
            assert_eq!(snapshot(), before, "{c:?} changed the store");
        }

        // Holding compares apply every op.
        let t = Txn::new()
            .if_equals("k", "v1")
            .if_absent("nope")
            .if_present("k")
            .put("k", "v2")
            .put("n", "1");
        assert!(s.txn(t).unwrap());
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(s.get(b"n").unwrap().as_deref(), Some(&b"1"[..]));
        // A CAS on the old value now fails.
        assert!(!s.txn(Txn::new().if_equals("k", "v1").put("k", "v3")).unwrap());
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"v2"[..]));
        // No compares: always applies.
        assert!(s.txn(Txn::new().delete("n")).unwrap());
        assert_eq!(s.get(b"n").unwrap(), None);
    }

    #[test]
    fn concurrent_cas_increments_are_not_lost() {
        let (_dir, s) = open_tmp();
        let s = std::sync::Arc::new(s);
        assert!(s.txn(Txn::new().put("ctr", "0")).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        loop {
                            let cur = s.get(b"ctr").unwrap().unwrap();
                            let n: u32 = std::str::from_utf8(&cur).unwrap().parse().unwrap();
                            let t = Txn::new().if_equals("ctr", cur).put("ctr", (n + 1).to_string());
                            if s.txn(t).unwrap() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.get(b"ctr").unwrap().as_deref(), Some(&b"100"[..]));
    }

    #[test]
    fn reopen_after_drop_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let s = SledStore::open(&data).unwrap();
            assert!(s.txn(Txn::new().put("persist", "me")).unwrap());
        }
        let s = SledStore::open(&data).unwrap();
        assert_eq!(s.get(b"persist").unwrap().as_deref(), Some(&b"me"[..]));
    }

    #[test]
    fn second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = SledStore::open(&data).unwrap();
        let err = SledStore::open(&data).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("another nimbus-coordinator is using"), "{msg}");
        assert!(msg.contains(&data.display().to_string()), "{msg}");
        drop(first);
        SledStore::open(&data).unwrap();
    }

    #[test]
    fn unwritable_dir_is_reported() {
        // Tests run as root, so permissions do not stop us: a path under a regular file does.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, "x").unwrap();
        for path in [file.join("data"), file.clone()] {
            let err = SledStore::open(&path).unwrap_err();
            assert!(matches!(err, StoreError::NotWritable { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(
                msg.contains("check ownership/permissions or choose another --data-dir"),
                "{msg}"
            );
        }
    }

    #[test]
    fn unwritable_system_path_is_reported() {
        let path = Path::new("/etc/hostname/x");
        if !Path::new("/etc/hostname").is_file() {
            return;
        }
        let err = SledStore::open(path).unwrap_err();
        assert!(matches!(err, StoreError::NotWritable { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("data directory /etc/hostname/x is not writable"),
            "{err}"
        );
    }
}
