//! [`StorageError`]: every way applying or removing a storage plan can fail. Each message says what was wrong
//! and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

use crate::apply::Step;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The plan itself is unusable (bad names, mount points, options); nothing was touched.
    #[error("the storage plan is invalid: {0}; fix the pool's storage profile in the policy and apply again")]
    InvalidPlan(String),

    /// An LVM or RAID0 volume on a kernel without device-mapper / md; nothing was touched.
    #[error(
        "volume {volume}: the {layout} layout needs {feature} in the kernel, and this host's kernel lacks it \
         ({evidence}); load the {module} module, or give this pool a per-disk storage profile"
    )]
    KernelLacks {
        volume: String,
        layout: &'static str,
        feature: &'static str,
        module: &'static str,
        evidence: &'static str,
    },

    /// The plan's disk path does not lead to a usable whole-disk block device.
    #[error("disk {by_id}: {reason}; check that the disk is attached and that the plan (inventory) is current")]
    DiskNotFound { by_id: String, reason: String },

    /// The disk carries data, is mounted, is in use, or holds the root file system: it was left untouched.
    #[error("refusing disk {by_id} ({device}, {identity}): {found}; {advice}")]
    Refused {
        by_id: String,
        device: String,
        /// `serial X, WWN Y` or `no serial or WWN`.
        identity: String,
        found: String,
        advice: String,
    },

    /// The host's state does not match what the plan and our record say (mount point taken, file system
    /// changed in the plan, VG exists with other disks, ...). Nothing destructive was done.
    #[error("volume {volume}: {detail}; {advice}")]
    Conflict {
        volume: String,
        detail: String,
        advice: String,
    },

    /// The program could not be started.
    #[error("could not run {program}: {source}; install it (Debian package: {package}) and apply again")]
    Spawn {
        program: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The program ran longer than its timeout and was killed.
    #[error(
        "`{command}` did not finish within {timeout:?} and was killed; check the disk's health (dmesg) or raise \
         the timeout (Host::command_timeout / mkfs_timeout)"
    )]
    Timeout { command: String, timeout: Duration },

    /// The program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}; fix the cause named above and apply again")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    /// The state file (our record of what we created) is unreadable or unwritable.
    #[error(
        "storage state file {path}: {reason}; it records which disks this agent prepared, so restore it from a \
         backup or fix the permissions; without it prepared disks are refused as foreign, never destroyed"
    )]
    State { path: PathBuf, reason: String },

    /// A file or directory operation failed.
    #[error("{action} {path}: {source}; check the permissions and free space there")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `ApplyOptions::fail_after` (tests): the named step was just done (or found done).
    #[error("failure injected after step {0:?} (ApplyOptions::fail_after); apply again without it to converge")]
    Injected(Step),
}

impl StorageError {
    /// Refusals are reported as [`crate::VolumeState::Refused`], other per-volume errors as `Failed`.
    pub fn is_refusal(&self) -> bool {
        matches!(self, StorageError::Refused { .. })
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Errors that must stop the whole apply (not only the current volume).
    pub(crate) fn is_global(&self) -> bool {
        matches!(self, StorageError::Injected(_) | StorageError::State { .. })
    }
}
