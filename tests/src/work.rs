//! The work directory of a fleet or a delay lab: data, state, logs, sockets. A fresh temp dir removed on
//! drop (kept when `NIMBUS_E2E_KEEP=1`), or a fixed directory the caller chose (the lab), never removed.

use std::path::{Path, PathBuf};

use crate::error::{HarnessError, Result};

#[derive(Debug)]
pub(crate) enum Work {
    Temp(tempfile::TempDir),
    Fixed(PathBuf),
}

impl Work {
    /// `dir` (created if missing), or a new temp dir named `prefix…`.
    pub(crate) fn create(dir: Option<&PathBuf>, prefix: &str) -> Result<Work> {
        match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
                Ok(Work::Fixed(dir.clone()))
            }
            None => Ok(Work::Temp(
                tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir()
                    .map_err(|e| HarnessError::io("creating a temp work dir", e))?,
            )),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Work::Temp(t) => t.path(),
            Work::Fixed(p) => p,
        }
    }

    /// Never remove it (detached labs).
    pub(crate) fn keep(self) {
        if let Work::Temp(t) = self {
            let _ = t.keep();
        }
    }

    /// On drop: keep a temp dir when `NIMBUS_E2E_KEEP=1`, saying where; otherwise it is removed.
    pub(crate) fn finish(self) {
        if let Work::Temp(t) = self
            && std::env::var(crate::fleet::KEEP_ENV).is_ok_and(|v| v == "1")
        {
            eprintln!("nimbus-e2e: keeping {}", t.keep().display());
        }
    }
}
