//! `probe_versions` runs component binaries found without a package entry — only on the live root, bounded by
//! a timeout. The binaries here are stand-in scripts in a temporary directory.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use inventory::{Inventory, Package, PackageSource, probe_versions};

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Relative to the root "/", as the collector records binaries.
    path.to_str().unwrap().trim_start_matches('/').to_string()
}

fn binary(name: &str, origin: String) -> Package {
    Package {
        name: name.into(),
        version: None,
        source: PackageSource::Binary,
        origin,
    }
}

// One test function: the scripts are written and run in sequence (no concurrent fork while a script is still
// open for writing).
#[tokio::test]
async fn versions_come_from_running_the_binaries_with_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = script(
        dir.path(),
        "kubelet",
        r#"[ "$1" = --version ] && echo "Kubernetes v1.30.2""#,
    );
    let kubeadm = script(
        dir.path(),
        "kubeadm",
        r#"[ "$1 $2 $3" = "version -o short" ] && echo v1.30.2"#,
    );
    let containerd = script(dir.path(), "containerd", "sleep 10");

    let mut inv = Inventory::default();
    inv.os.packages = vec![
        binary("containerd", containerd),
        binary("kubeadm", kubeadm),
        binary("kubelet", kubelet),
    ];

    // A fixture root never runs anything.
    let mut fixture_inv = inv.clone();
    assert!(
        probe_versions(&mut fixture_inv, Path::new("/tmp"), Duration::from_secs(1))
            .await
            .is_empty()
    );
    assert_eq!(fixture_inv, inv);

    let started = Instant::now();
    let failed = probe_versions(&mut inv, Path::new("/"), Duration::from_millis(500)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(inv.os.package("kubelet").unwrap().version.as_deref(), Some("v1.30.2"));
    assert_eq!(inv.os.package("kubeadm").unwrap().version.as_deref(), Some("v1.30.2"));
    assert_eq!(inv.os.package("containerd").unwrap().version, None);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0].field, "os.packages[containerd].version");
    assert!(failed[0].reason.contains("no answer within"), "{}", failed[0].reason);
}
