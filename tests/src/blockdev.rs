//! Loop devices for end-to-end storage tests: a sparse backing file, `losetup --partscan`, and a stable name
//! under `/dev/disk/by-id/` (normally made by udev, which does not run here). Everything is undone on drop:
//! the by-id link removed, the device detached (found by its backing file, so a device reused by someone else
//! is never touched).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::process::{run_checked, run_with_timeout};

/// Where udev puts stable names.
pub const BY_ID_DIR: &str = "/dev/disk/by-id";

/// One loop device with a by-id link.
#[derive(Debug)]
pub struct LoopDisk {
    file: PathBuf,
    device: PathBuf,
    link: PathBuf,
}

impl LoopDisk {
    /// A `size_mib` sparse file in `dir`, attached with partition scanning, linked as
    /// `/dev/disk/by-id/<by_id>` (which must not exist yet).
    pub fn create(dir: &Path, name: &str, size_mib: u64, by_id: &str) -> Result<LoopDisk> {
        let file = dir.join(format!("{name}.img"));
        let f =
            std::fs::File::create(&file).map_err(|e| HarnessError::io(format!("creating {}", file.display()), e))?;
        f.set_len(size_mib * 1024 * 1024)
            .map_err(|e| HarnessError::io(format!("sizing {}", file.display()), e))?;
        drop(f);
        let out = run_with_timeout(
            Command::new("losetup")
                .args(["--find", "--show", "--partscan"])
                .arg(&file),
            Duration::from_secs(10),
        )?;
        if !out.status.success() {
            return Err(HarnessError::Misuse(format!(
                "losetup failed for {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let link = Path::new(BY_ID_DIR).join(by_id);
        let disk = LoopDisk { file, device, link };
        std::fs::create_dir_all(BY_ID_DIR).map_err(|e| HarnessError::io(format!("creating {BY_ID_DIR}"), e))?;
        let target = Path::new("../..").join(disk.device.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, &disk.link)
            .map_err(|e| HarnessError::io(format!("linking {}", disk.link.display()), e))?;
        Ok(disk)
    }

    /// `/dev/loopN`.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// `/dev/disk/by-id/<name>`.
    pub fn by_id(&self) -> &Path {
        &self.link
    }

    /// The backing file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Writes `bytes` at offset 0 of the device (e.g. a hand-made file system signature), then flushes.
    pub fn write_at_start(&self, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.device)
            .map_err(|e| HarnessError::io(format!("opening {}", self.device.display()), e))?;
        f.write_all_at(bytes, 0)
            .and_then(|()| f.sync_all())
            .map_err(|e| HarnessError::io(format!("writing {}", self.device.display()), e))
    }

    /// Runs `mkfs.ext4 -q -F` on the whole device (a disk that "carries data").
    pub fn format_ext4(&self) -> Result<()> {
        run_checked(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&self.device)).map(drop)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
        // Only detach the device if it is still backed by our file.
        let backed = Command::new("losetup")
            .args(["--noheadings", "--output", "BACK-FILE"])
            .arg(&self.device)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == self.file.display().to_string())
            .unwrap_or(false);
        if backed {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}
