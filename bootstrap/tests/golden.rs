//! Golden files: every artefact of a fixed spec, byte for byte, under tests/golden/<case>/. A file name's `:`
//! (MACs) becomes `-` on disk. `NIMBUS_BLESS=1 cargo test -p nimbus-bootstrap --test golden` rewrites them.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed assertion

mod common;

use std::fs;
use std::path::PathBuf;

use bootstrap::opennebula::ContextMode;
use bootstrap::{Artefact, PackageKind, azure, cloud_init, ipxe, opennebula, shell, vmware};
use common::{ipxe_spec, spec, spec_with_root};

fn golden_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
}

/// The notes and the secret-file list, as text.
fn summary(a: &Artefact) -> String {
    let mut s = String::new();
    for n in &a.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    for f in &a.secret_files {
        s.push_str(&format!("secret: {f}\n"));
    }
    s
}

fn check(case: &str, a: &Artefact) {
    let dir = golden_dir(case);
    let mut expected: Vec<(String, Vec<u8>)> = a.files.iter().map(|(n, c)| (n.replace(':', "-"), c.clone())).collect();
    expected.push(("ARTEFACT.txt".into(), summary(a).into_bytes()));
    let bless = std::env::var("NIMBUS_BLESS").as_deref() == Ok("1");
    if bless {
        let _ = fs::remove_dir_all(&dir);
    }
    for (name, contents) in &expected {
        let path = dir.join(name);
        if bless {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, contents).unwrap();
            continue;
        }
        let want = fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run NIMBUS_BLESS=1 cargo test -p nimbus-bootstrap --test golden",
                path.display()
            )
        });
        assert!(
            want == *contents,
            "{} differs from the rendering:\n{}\n(if the change is intended: NIMBUS_BLESS=1 cargo test -p nimbus-bootstrap --test golden)",
            path.display(),
            String::from_utf8_lossy(contents)
        );
    }
    // No stale golden files.
    let mut on_disk = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                on_disk.push(p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    on_disk.sort();
    let mut names: Vec<String> = expected.into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(
        on_disk,
        names,
        "golden files in {} do not match the artefact's files",
        dir.display()
    );
}

#[test]
fn cloud_init_golden() {
    check("cloud-init", &cloud_init::render(&spec(PackageKind::Deb)).unwrap());
    let scripts: [(&str, &str, &[u8]); 2] = [
        (
            "10-tune.sh",
            "text/x-shellscript",
            b"#!/bin/sh\nsysctl -w vm.swappiness=10\n",
        ),
        (
            "motd.txt",
            "text/x-shellscript",
            "#!/bin/sh\necho 'Grüße' > /etc/motd\n".as_bytes(),
        ),
    ];
    check(
        "cloud-init-release-root",
        &cloud_init::render(&spec_with_root(PackageKind::Deb)).unwrap(),
    );
    check(
        "cloud-init-multipart",
        &cloud_init::render_multipart(&spec(PackageKind::Deb), &scripts).unwrap(),
    );
}

#[test]
fn azure_golden() {
    check("azure", &azure::render(&spec(PackageKind::Deb)).unwrap());
}

#[test]
fn opennebula_golden() {
    check(
        "opennebula-start-script",
        &opennebula::render(&spec(PackageKind::Deb), ContextMode::StartScript).unwrap(),
    );
    check(
        "opennebula-cloud-init",
        &opennebula::render(&spec(PackageKind::Rpm), ContextMode::CloudInit).unwrap(),
    );
}

#[test]
fn vmware_golden() {
    check("vmware", &vmware::render(&spec(PackageKind::Binary)).unwrap());
}

#[test]
fn ipxe_golden() {
    check("ipxe", &ipxe::render(&spec(PackageKind::Deb), &ipxe_spec()).unwrap());
}

#[test]
fn shell_golden() {
    check("shell-deb", &shell::render(&spec(PackageKind::Deb)).unwrap());
    check("shell-rpm", &shell::render(&spec(PackageKind::Rpm)).unwrap());
    check("shell-binary", &shell::render(&spec(PackageKind::Binary)).unwrap());
    check(
        "shell-deb-release-root",
        &shell::render(&spec_with_root(PackageKind::Deb)).unwrap(),
    );
}
