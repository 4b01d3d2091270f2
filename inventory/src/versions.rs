//! Optional: versions of Kubernetes components found as bare binaries (no package database entry), by running
//! them. Kept out of [`crate::collect`] because it starts processes (tens of milliseconds each); call it once at
//! start and after a change of `os.packages`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::model::{Inventory, PackageSource};
use crate::reader::Unreadable;

/// Largest output read from a version command.
const OUTPUT_LIMIT: u64 = 4096;

/// For each package with [`PackageSource::Binary`] and no version, run `kubelet --version`,
/// `kubeadm version -o short` or `containerd --version` (environment cleared, stdin closed, killed after
/// `timeout`) and store the version printed. Only when `root` is `/`: a fixture tree's binaries are never run.
/// Returns what could not be determined, for [`crate::WarnOnce`].
pub async fn probe_versions(inv: &mut Inventory, root: &Path, timeout: Duration) -> Vec<Unreadable> {
    let mut failed = Vec::new();
    if root != Path::new("/") {
        return failed;
    }
    for pkg in inv
        .os
        .packages
        .iter_mut()
        .filter(|p| p.source == PackageSource::Binary && p.version.is_none())
    {
        let path = root.join(&pkg.origin);
        let args: &[&str] = match pkg.name.as_str() {
            "kubeadm" => &["version", "-o", "short"],
            _ => &["--version"],
        };
        let field = format!("os.packages[{}].version", pkg.name);
        match run(&path, args, timeout).await {
            Ok(out) => match parse_version(&out) {
                Some(v) => pkg.version = Some(v),
                None => failed.push(Unreadable {
                    field,
                    path,
                    reason: "no version in the command's output".into(),
                }),
            },
            Err(reason) => failed.push(Unreadable { field, path, reason }),
        }
    }
    failed
}

async fn run(path: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = tokio::process::Command::new(path)
        .args(args)
        .env_clear()
        .env("LANG", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let work = async {
        let mut buf = Vec::new();
        (&mut stdout)
            .take(OUTPUT_LIMIT)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&buf).into_owned())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// The first token that looks like a version: `v1.30.2`, `1.7.19`.
pub(crate) fn parse_version(out: &str) -> Option<String> {
    out.split_whitespace().find_map(|tok| {
        let digits = tok.strip_prefix('v').unwrap_or(tok);
        let ok = digits.contains('.')
            && digits.starts_with(|c: char| c.is_ascii_digit())
            && tok.len() <= 64
            && tok.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b));
        ok.then(|| tok.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_typical_outputs() {
        assert_eq!(parse_version("Kubernetes v1.30.2\n").as_deref(), Some("v1.30.2"));
        assert_eq!(parse_version("v1.29.6").as_deref(), Some("v1.29.6"));
        assert_eq!(
            parse_version("containerd containerd.io 1.7.19 2bf793ef6dc9a18e00cb12efb64355c2c9d5eb41").as_deref(),
            Some("1.7.19")
        );
        assert_eq!(
            parse_version("containerd github.com/containerd/containerd v1.7.12 71909c1").as_deref(),
            Some("v1.7.12")
        );
        assert_eq!(parse_version("no version here"), None);
    }
}
