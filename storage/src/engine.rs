//! The execution context shared by `apply` and `remove`: runs (or, on a dry run, only lists) mutating
//! commands and file changes, saves the state record, and the common probes (`blkid`, device nodes).

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::apply::{Step, VolumeReport};
use crate::error::StorageError;
use crate::host::Host;
use crate::probe::{DevNum, PartitionFacts};
use crate::runner::{Command, Output};
use crate::state::{State, write_atomic};

pub(crate) struct Ctx<'a> {
    pub host: &'a Host,
    pub dry_run: bool,
    pub fail_after: Option<Step>,
    pub state: State,
    /// Mutating commands run (or, dry, that would run), in order.
    pub commands: Vec<String>,
    /// File changes made (or that would be made), in order.
    pub files: Vec<String>,
    pub volumes: Vec<VolumeReport>,
    /// Set by every change; the caller resets it per volume to tell `Created` from `AlreadyReady`.
    pub changed: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(host: &'a Host, dry_run: bool, fail_after: Option<Step>, state: State) -> Ctx<'a> {
        Ctx {
            host,
            dry_run,
            fail_after,
            state,
            commands: Vec::new(),
            files: Vec::new(),
            volumes: Vec::new(),
            changed: false,
        }
    }

    /// A command with the host's timeout.
    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        Command::new(program, args).timeout(self.host.command_timeout)
    }

    /// Run a command that changes the system (dry run: list it only). A non-zero exit is an error.
    pub fn mutate(&mut self, cmd: Command) -> Result<Output, StorageError> {
        let cmd = cmd.mutating();
        self.commands.push(cmd.to_string());
        self.changed = true;
        if self.dry_run {
            info!(command = %cmd.argv_line(), "dry run: would run");
            return Ok(Output::ok());
        }
        info!(command = %cmd.argv_line(), "running");
        let out = self.host.runner.run(&cmd)?;
        if !out.success() {
            return Err(StorageError::CommandFailed {
                command: cmd.argv_line(),
                status: out.status_text(),
                stderr: one_line(&out.stderr),
            });
        }
        Ok(out)
    }

    /// Run a read-only command (also on a dry run); the caller judges the exit code.
    pub fn probe(&self, cmd: Command) -> Result<Output, StorageError> {
        debug!(command = %cmd.argv_line(), "probing");
        self.host.runner.run(&cmd)
    }

    /// Save the state record (not on a dry run).
    pub fn save(&mut self) -> Result<(), StorageError> {
        if self.dry_run {
            return Ok(());
        }
        self.state.save(&self.host.state_dir)
    }

    /// Failure injection: `Err` when `step` is the one to fail after.
    pub fn reached(&self, step: Step) -> Result<(), StorageError> {
        if self.fail_after == Some(step) {
            warn!(?step, "failure injected");
            return Err(StorageError::Injected(step));
        }
        Ok(())
    }

    /// Write `content` to `path` atomically with `mode` (parent directories created).
    pub fn write_file(&mut self, path: &Path, content: &str, mode: u32) -> Result<(), StorageError> {
        self.files.push(format!("write {}", path.display()));
        self.changed = true;
        if self.dry_run {
            info!(path = %path.display(), "dry run: would write");
            return Ok(());
        }
        info!(path = %path.display(), "writing");
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| StorageError::io("creating directory", dir, e))?;
        }
        write_atomic(path, content.as_bytes(), mode).map_err(|e| StorageError::io("writing", path, e))
    }

    /// Remove a file or symlink if it exists.
    pub fn remove_file(&mut self, path: &Path) -> Result<(), StorageError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        self.files.push(format!("remove {}", path.display()));
        self.changed = true;
        if self.dry_run {
            info!(path = %path.display(), "dry run: would remove");
            return Ok(());
        }
        info!(path = %path.display(), "removing");
        fs::remove_file(path).map_err(|e| StorageError::io("removing", path, e))
    }

    /// Create symlink `link` → `target` (parent directory created).
    pub fn symlink(&mut self, target: &Path, link: &Path) -> Result<(), StorageError> {
        self.files
            .push(format!("link {} -> {}", link.display(), target.display()));
        self.changed = true;
        if self.dry_run {
            info!(link = %link.display(), "dry run: would link");
            return Ok(());
        }
        info!(link = %link.display(), target = %target.display(), "linking");
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).map_err(|e| StorageError::io("creating directory", dir, e))?;
        }
        let _ = fs::remove_file(link);
        std::os::unix::fs::symlink(target, link).map_err(|e| StorageError::io("linking", link, e))
    }

    /// Make sure the partition's device node exists and is the right device: udev (when it runs) gets a few
    /// seconds; otherwise, or when a stale node names another device, make it with mknod(2) from sysfs.
    pub fn ensure_node(&mut self, p: &PartitionFacts) -> Result<(), StorageError> {
        let in_test_dir = self
            .host
            .dev_dir
            .as_ref()
            .and_then(|d| fs::canonicalize(d).ok())
            .is_some_and(|d| p.node.parent() == Some(d.as_path()));
        if in_test_dir && p.node.is_file() {
            return Ok(());
        }
        if DevNum::of_node(&p.node) == Some(p.dev) {
            return Ok(());
        }
        if fs::symlink_metadata(&p.node).is_err() && Path::new("/run/udev/control").exists() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if DevNum::of_node(&p.node) == Some(p.dev) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let stale = fs::symlink_metadata(&p.node).is_ok();
        self.files.push(format!(
            "mknod {} b {} {}{}",
            p.node.display(),
            p.dev.major,
            p.dev.minor,
            if stale { " (replacing a stale node)" } else { "" }
        ));
        self.changed = true;
        if self.dry_run {
            return Ok(());
        }
        if stale {
            let is_dev = fs::symlink_metadata(&p.node)
                .map(|m| m.file_type().is_block_device() || m.file_type().is_symlink())
                .unwrap_or(false);
            if !is_dev {
                return Err(StorageError::io(
                    "replacing",
                    &p.node,
                    std::io::Error::other("a file that is not a device node is in the way; move it away"),
                ));
            }
            warn!(node = %p.node.display(), dev = %p.dev, "replacing a stale device node");
            fs::remove_file(&p.node).map_err(|e| StorageError::io("removing stale node", &p.node, e))?;
        }
        info!(node = %p.node.display(), dev = %p.dev, "creating the partition's device node (no udev made it)");
        nix::sys::stat::mknod(
            &p.node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o660),
            nix::sys::stat::makedev(u64::from(p.dev.major), u64::from(p.dev.minor)),
        )
        .map_err(|e| StorageError::io("mknod", &p.node, std::io::Error::from(e)))
    }

    /// `blkid -p -o export DEV`: what the device carries; `None` when nothing is recognised (exit code 2, or
    /// only `PART_ENTRY_*` facts about the partition itself).
    pub fn blkid(&self, dev: &Path) -> Result<Option<Blk>, StorageError> {
        let cmd = self.cmd("blkid", &["-p", "-o", "export"]).arg(dev.to_string_lossy());
        let out = self.probe(cmd.clone())?;
        match out.status {
            Some(0) => Ok(Some(Blk::parse(&out.stdout)).filter(|b| b.fstype.is_some() || b.pttype.is_some())),
            Some(2) => Ok(None),
            _ => Err(StorageError::CommandFailed {
                command: cmd.argv_line(),
                status: out.status_text(),
                stderr: one_line(&out.stderr),
            }),
        }
    }
}

/// What `blkid -p -o export` said about a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Blk {
    pub fstype: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub usage: Option<String>,
    pub pttype: Option<String>,
}

impl Blk {
    pub fn parse(text: &str) -> Blk {
        let mut b = Blk::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
            match k.trim() {
                "TYPE" => b.fstype = v,
                "UUID" => b.uuid = v,
                "LABEL" => b.label = v,
                "USAGE" => b.usage = v,
                "PTTYPE" => b.pttype = v,
                _ => {}
            }
        }
        b
    }

    /// `an xfs file system (UUID …)`, `a gpt partition table`, …
    pub fn describe(&self) -> String {
        let mut s = match (&self.fstype, &self.pttype, self.usage.as_deref()) {
            (Some(t), _, Some("filesystem")) => format!("an existing {t} file system"),
            (Some(t), _, _) => format!("an existing {t} signature"),
            (None, Some(pt), _) => format!("an existing {pt} partition table"),
            _ => "an unrecognised signature".to_string(),
        };
        if let Some(u) = &self.uuid {
            s += &format!(" (UUID {u})");
        }
        s
    }
}

/// The first non-empty line of a tool's stderr, bounded (for error messages).
pub(crate) fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut out = lines.join(" / ");
    if out.len() > 600 {
        let mut cut = 600;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    if out.is_empty() {
        "no error output".to_string()
    } else {
        out
    }
}

/// `path` as a `String` for commands and records.
pub(crate) fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `/dev/<vg>/<lv>`.
pub(crate) fn lv_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{vg}/{lv}"))
}

/// `/dev/md/<name>`.
pub(crate) fn md_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/md/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_parsing() {
        let b = Blk::parse("DEVNAME=/dev/loop0p1\nUUID=abc\nTYPE=xfs\nUSAGE=filesystem\nLABEL=nimbus-fast\n");
        assert_eq!(b.fstype.as_deref(), Some("xfs"));
        assert_eq!(b.describe(), "an existing xfs file system (UUID abc)");
        let b = Blk::parse("PTUUID=x\nPTTYPE=gpt\n");
        assert_eq!(b.describe(), "an existing gpt partition table");
        assert_eq!(one_line("\n  first\nsecond\n"), "first / second");
    }
}
