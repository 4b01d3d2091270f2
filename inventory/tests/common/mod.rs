//! Shared test helpers: fixture paths and copying a fixture tree so a test can change it.

#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};

pub const FIXTURES: &[&str] = &[
    "aws-nitro-i3en",
    "aws-xen-i3",
    "azure-lsv2",
    "vmware",
    "opennebula-kvm",
    "baremetal",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Copy a tree, keeping symlinks as symlinks (sysfs layouts depend on them) and file modes.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// A temporary copy of fixture `name`; the directory is removed when the guard drops.
pub fn fixture_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tree(&fixture(name), dir.path()).expect("copy fixture");
    dir
}

/// Write `content` to `rel` under `root`, creating parent directories.
pub fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, content).expect("write");
}
