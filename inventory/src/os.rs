//! Operating system facts: `etc/os-release` (os-release(5)), `proc/sys/kernel/{osrelease,arch,hostname}`,
//! `proc/stat` `btime`, and the Kubernetes node components from the dpkg database (`var/lib/dpkg/status`,
//! deb-control(5) stanzas) or executables in `usr/bin`, `usr/local/bin`, `opt/bin`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use crate::model::{OsInfo, Package, PackageSource};
use crate::reader::Ctx;

/// The components reported in [`OsInfo::packages`], by canonical name.
pub const TRACKED_PACKAGES: &[&str] = &["containerd", "kubeadm", "kubelet"];

/// dpkg package names → canonical name.
const DPKG_NAMES: &[(&str, &str)] = &[
    ("kubelet", "kubelet"),
    ("kubeadm", "kubeadm"),
    ("containerd", "containerd"),
    // Docker's repository.
    ("containerd.io", "containerd"),
    // Microsoft's build, on AKS node images.
    ("moby-containerd", "containerd"),
];

/// Where binaries are looked for (relative to root), in order.
pub(crate) const BIN_DIRS: &[&str] = &["usr/bin", "usr/local/bin", "opt/bin"];

pub(crate) fn collect(ctx: &mut Ctx<'_>) -> OsInfo {
    let mut os = OsInfo::default();
    let release = ctx
        .file("os.id", "etc/os-release")
        .or_else(|| ctx.file("os.id", "usr/lib/os-release"));
    match release {
        Some(text) => {
            let kv = parse_os_release(&text);
            os.id = kv.get("ID").cloned();
            os.version_id = kv.get("VERSION_ID").cloned();
            os.pretty_name = kv.get("PRETTY_NAME").cloned();
        }
        None => {
            let path = ctx.path("etc/os-release");
            ctx.warn("os.id", path, "neither etc/os-release nor usr/lib/os-release exists");
        }
    }
    os.kernel = ctx
        .required("os.kernel", "proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    os.arch = ctx
        .attr("os.arch", "proc/sys/kernel/arch")
        .or_else(|| ctx.is_live().then(|| std::env::consts::ARCH.to_string()));
    if let Some(stat) = ctx.required("os.boot_time", "proc/stat") {
        os.boot_time = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok());
        if os.boot_time.is_none() {
            let path = ctx.path("proc/stat");
            ctx.warn("os.boot_time", path, "no parsable btime line");
        }
    }
    os.packages = packages(ctx);
    os
}

pub(crate) fn hostname(ctx: &mut Ctx<'_>) -> Option<String> {
    ctx.attr("hostname", "proc/sys/kernel/hostname")
        .or_else(|| ctx.attr("hostname", "etc/hostname"))
}

/// `KEY=value`, `KEY="quoted \"value\""`, `KEY='single'`; comments and blank lines ignored.
fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim();
        let value = if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            let mut s = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        s.push(n);
                    }
                } else {
                    s.push(c);
                }
            }
            s
        } else if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
            inner.to_string()
        } else {
            v.to_string()
        };
        out.insert(k.trim().to_string(), value);
    }
    out
}

fn packages(ctx: &mut Ctx<'_>) -> Vec<Package> {
    let mut found: BTreeMap<&'static str, Package> = BTreeMap::new();
    if let Some(status) = ctx.file("os.packages", "var/lib/dpkg/status") {
        for (pkg, version) in dpkg_installed(&status) {
            if let Some((_, canonical)) = DPKG_NAMES.iter().find(|(n, _)| *n == pkg) {
                found.entry(canonical).or_insert(Package {
                    name: canonical.to_string(),
                    version,
                    source: PackageSource::Dpkg,
                    origin: pkg.to_string(),
                });
            }
        }
    }
    for name in TRACKED_PACKAGES {
        if found.contains_key(name) {
            continue;
        }
        for dir in BIN_DIRS {
            let rel = format!("{dir}/{name}");
            let executable =
                std::fs::metadata(ctx.path(&rel)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if executable {
                found.insert(
                    name,
                    Package {
                        name: name.to_string(),
                        version: None,
                        source: PackageSource::Binary,
                        origin: rel,
                    },
                );
                break;
            }
        }
    }
    found.into_values().collect()
}

/// Installed packages of a dpkg status file: (name, version). Only stanzas whose `Status` ends in `installed`.
fn dpkg_installed(status: &str) -> Vec<(&str, Option<String>)> {
    let mut out = Vec::new();
    let (mut pkg, mut ver, mut installed) = (None, None, false);
    for line in status.lines().chain(std::iter::once("")) {
        if line.is_empty() {
            if let (Some(p), true) = (pkg.take(), installed) {
                out.push((p, ver.take()));
            }
            pkg = None;
            ver = None;
            installed = false;
        } else if let Some(v) = line.strip_prefix("Package:") {
            pkg = Some(v.trim());
        } else if let Some(v) = line.strip_prefix("Status:") {
            installed = v.trim().ends_with(" installed");
        } else if let Some(v) = line.strip_prefix("Version:") {
            ver = Some(v.trim().to_string()).filter(|v| !v.is_empty());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quoting() {
        let kv =
            parse_os_release("# c\nID=ubuntu\nPRETTY_NAME=\"Ubuntu \\\"22.04\\\" LTS\"\nVERSION_ID='22.04'\nbad\n");
        assert_eq!(kv["ID"], "ubuntu");
        assert_eq!(kv["PRETTY_NAME"], "Ubuntu \"22.04\" LTS");
        assert_eq!(kv["VERSION_ID"], "22.04");
    }

    #[test]
    fn dpkg_only_installed_stanzas() {
        let status = "Package: kubelet\nStatus: install ok installed\nVersion: 1.30.2-1.1\n\n\
                      Package: kubeadm\nStatus: deinstall ok config-files\nVersion: 1.29.0-1.1\n\n\
                      Package: containerd.io\nStatus: install ok installed\nVersion: 1.7.19-1\n";
        let got = dpkg_installed(status);
        assert_eq!(
            got,
            vec![
                ("kubelet", Some("1.30.2-1.1".to_string())),
                ("containerd.io", Some("1.7.19-1".to_string()))
            ]
        );
    }
}
