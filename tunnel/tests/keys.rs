//! The private key file: created 0600 and atomically, reloaded unchanged, refused when loose.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use tunnel::TunnelError;
use tunnel::keys::{PublicKey, load_or_create_secret, public_key_from_base64};

#[test]
fn creates_0600_and_reloads_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/wg.key");
    let first = load_or_create_secret(&path).unwrap();

    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let parent_mode = fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
    assert_eq!(parent_mode & 0o077, 0, "created directories are private");
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 45, "44 base64 characters and a newline: {text:?}");
    assert!(text.ends_with('\n'));
    // No temporary file is left next to the key.
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("wg.key")]);

    let again = load_or_create_secret(&path).unwrap();
    assert_eq!(PublicKey::from(&first), PublicKey::from(&again));
    assert_eq!(first.to_bytes(), again.to_bytes());
}

#[test]
fn refuses_a_key_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wg.key");
    load_or_create_secret(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

    let err = load_or_create_secret(&path).err().unwrap();
    match &err {
        TunnelError::KeyFilePermissions { path: p, mode } => {
            assert_eq!(p, &path);
            assert_eq!(*mode, 0o644);
        }
        other => panic!("expected KeyFilePermissions, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("chmod 600 {}", path.display())),
        "message says what to do: {msg}"
    );

    // Group-readable is refused too; 0400 is fine.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(load_or_create_secret(&path).is_err());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    assert!(load_or_create_secret(&path).is_ok());
}

#[test]
fn rejects_invalid_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wg.key");
    let write = |content: &str| {
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    };
    for bad in [
        "",
        "not base64 at all",
        "AAAA\n",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        write(bad);
        match load_or_create_secret(&path) {
            Err(TunnelError::InvalidKey(msg)) => {
                assert!(msg.contains(&path.display().to_string()), "{msg}")
            }
            other => panic!("{bad:?}: expected InvalidKey, got {:?}", other.map(|_| ())),
        }
    }
    // A `wg genkey`-style key is accepted (leading/trailing whitespace ignored).
    write("  YNqHbfBQKaGvzefSSmdR1FsDA+T7S8zqJ3NfYiELPnI=  \n");
    let s = load_or_create_secret(&path).unwrap();
    assert_eq!(s.to_bytes().len(), 32);

    assert!(matches!(
        public_key_from_base64("AAAA"),
        Err(TunnelError::InvalidKey(_))
    ));
}
