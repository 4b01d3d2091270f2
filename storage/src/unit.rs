//! systemd `.mount` units: the unit name for a mount point (systemd's path escaping, as
//! `systemd-escape --path --suffix=mount` prints it) and the unit text.

use crate::model::Filesystem;

/// How long systemd waits for the device at boot before giving up on the mount (instance store that did not
/// come back must never hold up a boot; `nofail` keeps the mount out of `local-fs.target`'s requirements).
pub const DEVICE_TIMEOUT_OPTION: &str = "x-systemd.device-timeout=10s";

/// systemd's path escaping (`systemd-escape --path`): `/var/lib/my-data` → `var-lib-my\x2ddata`, `/` → `-`.
/// Expects an absolute, normalized path; duplicate and trailing slashes are dropped as systemd does.
pub fn escape_path(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() {
        return "-".to_string();
    }
    let joined = parts.join("/");
    let mut out = String::with_capacity(joined.len());
    for (i, b) in joined.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// The `.mount` unit name systemd requires for `mount_point`.
pub fn mount_unit_name(mount_point: &str) -> String {
    format!("{}.mount", escape_path(mount_point))
}

/// The options given to the mount: `nofail`, then the plan's (duplicates of `nofail` dropped).
pub fn mount_options(options: &[String]) -> String {
    std::iter::once("nofail")
        .chain(options.iter().map(String::as_str).filter(|o| *o != "nofail"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The options in the unit: as [`mount_options`] plus [`DEVICE_TIMEOUT_OPTION`] unless the plan sets its own.
pub fn unit_options(options: &[String]) -> String {
    let has_timeout = options.iter().any(|o| o.starts_with("x-systemd.device-timeout="));
    let mut all: Vec<String> = Vec::with_capacity(options.len() + 1);
    if !has_timeout {
        all.push(DEVICE_TIMEOUT_OPTION.to_string());
    }
    all.extend(options.iter().cloned());
    mount_options(&all)
}

/// The unit text: mount the file system with UUID `fs_uuid` at `mount_point`, wanted by `local-fs.target`.
pub fn render_mount_unit(
    volume: &str,
    fs_uuid: &str,
    mount_point: &str,
    filesystem: Filesystem,
    options: &[String],
) -> String {
    format!(
        "# Written by the polynimbus agent for storage volume {volume}; changes here are overwritten.\n\
         [Unit]\n\
         Description=polynimbus storage volume {volume}\n\
         \n\
         [Mount]\n\
         What=/dev/disk/by-uuid/{fs_uuid}\n\
         Where={mount_point}\n\
         Type={fs}\n\
         Options={opts}\n\
         \n\
         [Install]\n\
         WantedBy=local-fs.target\n",
        fs = filesystem.as_str(),
        opts = unit_options(options),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs printed by `systemd-escape --path --suffix=mount` (systemd 252).
    const KNOWN: &[(&str, &str)] = &[
        ("/var/lib/nimbus/volumes/fast", "var-lib-nimbus-volumes-fast.mount"),
        ("/mnt/my-disk", "mnt-my\\x2ddisk.mount"),
        ("/", "-.mount"),
        ("/foo bar", "foo\\x20bar.mount"),
        ("/.hidden", "\\x2ehidden.mount"),
        ("/a/.b", "a-.b.mount"),
        ("/x/ü", "x-\\xc3\\xbc.mount"),
        ("/a:b_c.d", "a:b_c.d.mount"),
        ("//srv//data/", "srv-data.mount"),
        ("/data/x\\y", "data-x\\x5cy.mount"),
    ];

    #[test]
    fn escaping_matches_systemd_escape() {
        for (path, unit) in KNOWN {
            assert_eq!(mount_unit_name(path), *unit, "{path}");
        }
    }

    /// Where `systemd-escape` is installed, compare with it too.
    #[test]
    fn escaping_matches_the_installed_systemd_escape() {
        let samples = [
            "/var/lib/nimbus/volumes/fast-1",
            "/tmp/.x/y z/é",
            "/a/b-c/.d",
            "/srv/data_1:2",
        ];
        for p in samples {
            let Ok(out) = std::process::Command::new("systemd-escape")
                .args(["--path", "--suffix=mount", p])
                .output()
            else {
                eprintln!("skipped: systemd-escape is not installed");
                return;
            };
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), mount_unit_name(p), "{p}");
        }
    }

    #[test]
    fn unit_text_and_options() {
        let text = render_mount_unit(
            "fast",
            "0e5c4b0c-1111-4222-8333-444455556666",
            "/var/lib/nimbus/volumes/fast",
            Filesystem::Xfs,
            &["noatime".into(), "nofail".into()],
        );
        assert_eq!(
            text,
            "# Written by the polynimbus agent for storage volume fast; changes here are overwritten.\n\
             [Unit]\n\
             Description=polynimbus storage volume fast\n\n\
             [Mount]\n\
             What=/dev/disk/by-uuid/0e5c4b0c-1111-4222-8333-444455556666\n\
             Where=/var/lib/nimbus/volumes/fast\n\
             Type=xfs\n\
             Options=nofail,x-systemd.device-timeout=10s,noatime\n\n\
             [Install]\n\
             WantedBy=local-fs.target\n"
        );
        assert_eq!(mount_options(&[]), "nofail");
        assert_eq!(
            unit_options(&["x-systemd.device-timeout=30s".into()]),
            "nofail,x-systemd.device-timeout=30s"
        );
    }
}
