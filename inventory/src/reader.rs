//! Bounded file reads under a root path, recording what could not be read.
//!
//! Rule: a file that is simply absent is normal for optional facts (not every disk has a WWN, not every host has
//! DMI) and yields `None` silently; a file that exists but cannot be read or parsed (permission denied, I/O
//! error, garbage) yields `None` *and* an [`Unreadable`] entry. Facts every Linux host has (e.g. `proc/meminfo`)
//! are read with [`Ctx::required`], where absence is reported too.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest sysfs/procfs attribute read. Real attributes are a page (4 KiB) at most.
const ATTR_LIMIT: u64 = 64 * 1024;
/// Largest whole file read (mountinfo on a busy node, dpkg status).
pub(crate) const FILE_LIMIT: u64 = 32 * 1024 * 1024;

/// A field that could not be read: the caller logs it once (see [`crate::WarnOnce`]) and carries on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    /// The inventory field, e.g. `memory.total_bytes` or `disks[sda].serial`.
    pub field: String,
    /// The file that was tried, under the collection root.
    pub path: PathBuf,
    /// What went wrong (the OS error, or why the content was rejected).
    pub reason: String,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is unknown: {}: {} (check that the file exists and is readable by the agent)",
            self.field,
            self.path.display(),
            self.reason
        )
    }
}

/// Collection context: the root and the list of unreadable fields so far.
pub(crate) struct Ctx<'a> {
    pub root: &'a Path,
    pub unreadable: Vec<Unreadable>,
}

impl<'a> Ctx<'a> {
    pub fn new(root: &'a Path) -> Self {
        Ctx {
            root,
            unreadable: Vec::new(),
        }
    }

    /// Whether this collection is of the running system (root is `/`).
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `rel` under root. `rel` is relative (`sys/block`); a leading `/` is ignored.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        self.root.join(rel)
    }

    pub fn warn(&mut self, field: impl Into<String>, path: impl Into<PathBuf>, reason: impl Into<String>) {
        self.unreadable.push(Unreadable {
            field: field.into(),
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// Optional attribute: absent → `None` silently; unreadable → `None` + warning. Trimmed; empty → `None`.
    pub fn attr(&mut self, field: &str, rel: impl AsRef<Path>) -> Option<String> {
        let path = self.path(rel);
        match read_limited(&path, ATTR_LIMIT) {
            Ok(s) => non_empty(s.trim()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                self.warn(field, path, e.to_string());
                None
            }
        }
    }

    /// Attribute whose read errors are all normal (e.g. `speed` of a down link returns EINVAL): never warns.
    pub fn attr_quiet(&self, rel: impl AsRef<Path>) -> Option<String> {
        read_limited(&self.path(rel), ATTR_LIMIT)
            .ok()
            .and_then(|s| non_empty(s.trim()))
    }

    /// Optional attribute parsed as `T`; garbage → `None` + warning.
    pub fn parse<T: FromStr>(&mut self, field: &str, rel: impl AsRef<Path>) -> Option<T> {
        let rel = rel.as_ref();
        let raw = self.attr(field, rel)?;
        match raw.parse::<T>() {
            Ok(v) => Some(v),
            Err(_) => {
                let path = self.path(rel);
                self.warn(field, path, format!("unexpected content {:?}", truncate(&raw, 40)));
                None
            }
        }
    }

    /// A boolean sysfs attribute (`0`/`1`).
    pub fn flag(&mut self, field: &str, rel: impl AsRef<Path>) -> Option<bool> {
        self.parse::<u8>(field, rel).map(|v| v != 0)
    }

    /// A file every host has: absent or unreadable → `None` + warning. Not trimmed.
    pub fn required(&mut self, field: &str, rel: impl AsRef<Path>) -> Option<String> {
        let path = self.path(rel);
        match read_limited(&path, FILE_LIMIT) {
            Ok(s) => Some(s),
            Err(e) => {
                self.warn(field, path, e.to_string());
                None
            }
        }
    }

    /// An optional whole file: absent → `None` silently; unreadable → `None` + warning. Not trimmed.
    pub fn file(&mut self, field: &str, rel: impl AsRef<Path>) -> Option<String> {
        let path = self.path(rel);
        match read_limited(&path, FILE_LIMIT) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                self.warn(field, path, e.to_string());
                None
            }
        }
    }

    /// The last path component of a symlink's target (e.g. a `driver` link → `nvme`). Never warns.
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Option<String> {
        let target = std::fs::read_link(self.path(rel)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Names in a directory, sorted; absent or unreadable → empty (and a warning when unreadable and `field`
    /// is given).
    pub fn dir_names(&mut self, field: Option<&str>, rel: impl AsRef<Path>) -> Vec<String> {
        let path = self.path(rel);
        let mut names = match std::fs::read_dir(&path) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound
                    && let Some(field) = field
                {
                    self.warn(field, path, e.to_string());
                }
                Vec::new()
            }
        };
        names.sort();
        names
    }

    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        self.path(rel).exists()
    }
}

/// Read at most `limit` bytes of a file as (lossy) UTF-8.
pub(crate) fn read_limited(path: &Path, limit: u64) -> io::Result<String> {
    let file = File::open(path)?;
    let mut buf = Vec::new();
    file.take(limit).read_to_end(&mut buf)?;
    Ok(match String::from_utf8(buf) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

pub(crate) fn non_empty(s: &str) -> Option<String> {
    if s.is_empty() { None } else { Some(s.to_string()) }
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parse a kernel CPU/node list such as `0-3,8,10-11` into its element count.
pub(crate) fn count_list(list: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a {
                    return None;
                }
                n = n.checked_add(b - a + 1)?;
            }
            None => {
                part.trim().parse::<u32>().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_list_parses_ranges_and_singles() {
        assert_eq!(count_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(count_list("0"), Some(1));
        assert_eq!(count_list(""), Some(0));
        assert_eq!(count_list("3-1"), None);
        assert_eq!(count_list("x"), None);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
