//! Backup, restore and migrate: real sled stores in temporary directories, a real etcd (Debian's etcd-server,
//! started per test on loopback, killed by PID) when installed. Without /usr/bin/etcd the etcd tests print a
//! note and pass, unless NIMBUS_REQUIRE_ROOT_TESTS=1 (CI), where they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use coordinator::backup::{self, BackupError, RestoreOptions};
use coordinator::ipam::OverlayPlan;
use coordinator::kek::{Kek, KekError};
use coordinator::state::{EnrollInput, State};
use coordinator::store::{KeyValue, SledStore, Store, Txn};

mod common;
use common::Etcd;

fn kek(b: u8) -> Kek {
    Kek::from_bytes(&[b; 32])
}

fn plan() -> OverlayPlan {
    OverlayPlan::new("100.96.0.0/16".parse().unwrap()).unwrap()
}

/// A data_dir with a sled store holding realistic state (schema, a token, three enrolled nodes) and key files.
fn populated_data_dir(dir: &Path) -> Vec<KeyValue> {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("state")).unwrap());
    let state = State::open(Arc::clone(&store), plan()).unwrap();
    let now = SystemTime::now();
    let (token, _) = state
        .create_token(
            Duration::from_secs(3600),
            10,
            BTreeMap::new(),
            "backup test".into(),
            now,
        )
        .unwrap();
    let secret = token.to_string_secret();
    for b in 1..=3u8 {
        let input = EnrollInput {
            public_key_b64url: URL_SAFE_NO_PAD.encode([b; 32]),
            hostname: format!("host-{b}"),
            machine_id: format!("{b:032x}"),
            agent_version: "0.1.0".into(),
            requested_name: String::new(),
            macs: vec![],
        };
        state.enroll(&secret, input, now).unwrap();
    }
    // A value larger than one chunk, and a binary one.
    store
        .txn(
            Txn::new()
                .put("config/big", vec![b'x'; 1_500_000])
                .put("config/bin", vec![0u8, 255, 10]),
        )
        .unwrap();
    let snap = backup::snapshot(store.as_ref()).unwrap();
    drop(state);
    drop(store);
    write_file(&dir.join("pki/ca.key"), b"-----BEGIN PRIVATE KEY-----\nca\n", 0o600);
    write_file(&dir.join("pki/ca.crt"), b"-----BEGIN CERTIFICATE-----\nca\n", 0o644);
    write_file(&dir.join("wg.key"), b"wg secret", 0o600);
    write_file(&dir.join("audit.key"), b"audit secret", 0o600);
    write_file(&dir.join("releases/keys/timestamp.pem"), b"ts key", 0o600);
    write_file(&dir.join("releases/repo/metadata/1.root.json"), b"{}", 0o644);
    write_file(
        &dir.join("releases/repo/targets/agent.deb"),
        &vec![7u8; 2_500_000],
        0o644,
    );
    write_file(&dir.join("releases/uploads/partial"), b"skip me", 0o600);
    write_file(&dir.join("empty"), b"", 0o600);
    snap
}

/// Opens a sled store just closed in this process: sled's background flusher may hold its lock a moment
/// after the `Db` is dropped.
fn reopen(dir: &Path) -> SledStore {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(dir) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying sled open: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Runs a command, again while it reports the sled store in use (see [`reopen`]).
fn output_retrying_lock(c: &mut Command) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = c.output().unwrap();
        if out.status.success() || Instant::now() > deadline || !String::from_utf8_lossy(&out.stderr).contains("in use")
        {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_file(p: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Relative path → (content, mode) of every file a backup should hold.
fn files_of(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    backup::data_files(dir)
        .unwrap()
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            (f, (std::fs::read(&p).unwrap(), mode))
        })
        .collect()
}

/// Backs up a populated data_dir; returns (tempdir, source data_dir, backup file, snapshot).
fn make_backup() -> (tempfile::TempDir, PathBuf, PathBuf, Vec<KeyValue>) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let snap = populated_data_dir(&src);
    let file = tmp.path().join("nimbus.backup");
    let store = reopen(&src.join("state"));
    let entries = backup::snapshot(&store).unwrap();
    let s = backup::write_backup(&entries, &src, "sled:test", &kek(1), &file).unwrap();
    assert_eq!(s.entries, snap.len() as u64);
    assert_eq!(s.files, 8, "uploads/ and state/ are not backed up");
    (tmp, src, file, snap)
}

#[test]
fn kek_round_trip_wrong_key_named_and_tampering_refused() {
    let (a, b) = (kek(1), kek(2));
    let sealed = a.seal(b"ca private key", b"pki/ca.key");
    assert_eq!(a.open(&sealed, b"pki/ca.key").unwrap(), b"ca private key");
    let err = b.open(&sealed, b"pki/ca.key").unwrap_err();
    assert!(matches!(err, KekError::WrongKey { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&a.id().to_string()) && msg.contains(&b.id().to_string()),
        "{msg}"
    );
    for i in [6, 14, 20, 26, sealed.len() - 1] {
        let mut t = sealed.clone();
        t[i] ^= 1;
        assert!(a.open(&t, b"pki/ca.key").is_err(), "byte {i} flipped was accepted");
    }
    assert!(matches!(
        a.open(&sealed[..sealed.len() - 1], b"pki/ca.key"),
        Err(KekError::Tampered(_))
    ));
}

#[test]
fn kek_file_mode_checked_and_generate_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("kek");
    let k = Kek::generate_file(&p).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(Kek::from_file(&p).unwrap().id(), k.id());
    assert!(matches!(Kek::generate_file(&p), Err(KekError::Exists { .. })));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let msg = Kek::from_file(&p).unwrap_err().to_string();
    assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
    // Base64 of 32 bytes in a file written by hand.
    let q = tmp.path().join("kek2");
    write_file(&q, format!("{}\n", STANDARD.encode([9u8; 32])).as_bytes(), 0o400);
    assert_eq!(Kek::from_file(&q).unwrap().id(), kek(9).id());
}

#[test]
fn sled_backup_restores_into_an_empty_sled_identically() {
    let (tmp, src, file, snap) = make_backup();
    let header = backup::read_header(&file).unwrap();
    assert_eq!(header.kek_id, kek(1).id().to_string());
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // Nothing secret in clear text.
    let raw = std::fs::read(&file).unwrap();
    assert!(!raw.windows(9).any(|w| w == b"wg secret"));

    let dst = tmp.path().join("dst");
    let store = SledStore::open(&dst.join("state")).unwrap();
    let s = backup::restore_backup(&file, &kek(1), &store, &dst, RestoreOptions::default()).unwrap();
    assert_eq!(s.entries, snap.len() as u64);
    assert_eq!(backup::snapshot(&store).unwrap(), snap);
    assert_eq!(files_of(&dst), files_of(&src));
    assert!(!dst.join("releases/uploads/partial").exists());
    // The restored store opens as coordinator state.
    drop(store);
    let store: Arc<dyn Store> = Arc::new(reopen(&dst.join("state")));
    let state = State::open(store, plan()).unwrap();
    assert_eq!(state.list_nodes().unwrap().len(), 3);

    // Wrong KEK: named, before anything is read.
    let other = tmp.path().join("other");
    let store = SledStore::open(&other.join("state")).unwrap();
    let err = backup::restore_backup(&file, &kek(2), &store, &other, RestoreOptions::default()).unwrap_err();
    assert_eq!(err.exit_code(), 65);
    assert!(err.to_string().contains(&kek(2).id().to_string()), "{err}");
}

#[test]
fn restore_refuses_non_empty_store_and_existing_key_files() {
    let (tmp, _src, file, _) = make_backup();
    let dst = tmp.path().join("dst");
    let store = SledStore::open(&dst.join("state")).unwrap();
    store.txn(Txn::new().put("nodes/x", "{}")).unwrap();
    let err = backup::restore_backup(&file, &kek(1), &store, &dst, RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, BackupError::TargetNotEmpty { count: 1, .. }), "{err}");
    assert!(err.to_string().contains("not empty"));
    assert!(!dst.join("wg.key").exists());

    let dst2 = tmp.path().join("dst2");
    write_file(&dst2.join("wg.key"), b"current key", 0o600);
    let store2 = SledStore::open(&dst2.join("state")).unwrap();
    let err = backup::restore_backup(&file, &kek(1), &store2, &dst2, RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, BackupError::FilesExist { .. }), "{err}");
    assert!(err.to_string().contains("--force"));
    assert!(backup::snapshot(&store2).unwrap().is_empty());
    assert_eq!(std::fs::read(dst2.join("wg.key")).unwrap(), b"current key");
    let opts = RestoreOptions {
        force: true,
        progress: false,
    };
    backup::restore_backup(&file, &kek(1), &store2, &dst2, opts).unwrap();
    assert_eq!(std::fs::read(dst2.join("wg.key")).unwrap(), b"wg secret");
}

#[test]
fn tampered_or_truncated_backups_are_refused_before_writing() {
    let (tmp, _src, file, _) = make_backup();
    let raw = std::fs::read(&file).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for pos in [0, 20, 40, raw.len() / 3, raw.len() / 2, raw.len() - 40, raw.len() - 1] {
        let mut t = raw.clone();
        t[pos] ^= 0x01;
        cases.push((format!("byte {pos} flipped"), t));
    }
    for len in [10, 200, raw.len() / 2, raw.len() - 1, raw.len() - 60] {
        cases.push((format!("truncated to {len}"), raw[..len].to_vec()));
    }
    cases.push(("garbage appended".into(), [raw.clone(), vec![0, 0, 0, 1, 9]].concat()));
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let bad = tmp.path().join(format!("bad{i}"));
        std::fs::write(&bad, &bytes).unwrap();
        let dst = tmp.path().join(format!("dst{i}"));
        let store = SledStore::open(&dst.join("state")).unwrap();
        let err = backup::restore_backup(&bad, &kek(1), &store, &dst, RestoreOptions::default()).expect_err(&what);
        assert_eq!(err.exit_code(), 65, "{what}: {err}");
        assert!(backup::snapshot(&store).unwrap().is_empty(), "{what}: store written");
        assert!(backup::data_files(&dst).unwrap().is_empty(), "{what}: files written");
    }
}

#[test]
fn sled_backup_while_the_coordinator_holds_the_store_says_stop_it() {
    let tmp = tempfile::tempdir().unwrap();
    let _running = SledStore::open(&tmp.path().join("state")).unwrap();
    let err = BackupError::from_open(SledStore::open(&tmp.path().join("state")).unwrap_err());
    let msg = err.to_string();
    assert!(
        msg.contains("systemctl stop nimbus-coordinator") && msg.contains("etcd backups work online"),
        "{msg}"
    );
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nimbus-coordinator"));
    for (k, _) in std::env::vars() {
        if k.starts_with("NIMBUS_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn cli_backup_restore_and_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let snap = populated_data_dir(&src);
    let kek_file = tmp.path().join("kek");
    let out = bin().args(["kek", "generate"]).arg(&kek_file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = tmp.path().join("b.backup");
    let out = output_retrying_lock(
        bin()
            .args(["backup", "--to"])
            .arg(&file)
            .arg("--kek-file")
            .arg(&kek_file)
            .env("NIMBUS_DATA_DIR", &src)
            .env("NIMBUS_ADVERTISE_ADDRESS", "192.0.2.1"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // KEK from a command (no shell).
    let dst = tmp.path().join("dst");
    let cmd = format!("cat {}", kek_file.display());
    let out = bin()
        .args(["restore", "--from"])
        .arg(&file)
        .args(["--kek-command", &cmd, "--advertise-address", "192.0.2.1", "--data-dir"])
        .arg(&dst)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("restored {0}/{0} entries", snap.len())),
        "{stderr}"
    );
    let store = reopen(&dst.join("state"));
    assert_eq!(backup::snapshot(&store).unwrap(), snap);
    drop(store);
    // Bad data: 65. No KEK: 64. Non-empty target: 1.
    let mut raw = std::fs::read(&file).unwrap();
    let n = raw.len();
    raw[n - 5] ^= 0xff;
    let bad = tmp.path().join("bad.backup");
    std::fs::write(&bad, raw).unwrap();
    let run = |from: &Path, dir: &Path, kek: bool| {
        let mut c = bin();
        c.args(["restore", "--advertise-address", "192.0.2.1", "--from"])
            .arg(from)
            .arg("--data-dir")
            .arg(dir);
        if kek {
            c.arg("--kek-file").arg(&kek_file);
        }
        c.output().unwrap()
    };
    assert_eq!(run(&bad, &tmp.path().join("d1"), true).status.code(), Some(65));
    assert_eq!(run(&file, &tmp.path().join("d2"), false).status.code(), Some(64));
    assert_eq!(run(&file, &dst, true).status.code(), Some(1));
}

#[test]
fn sled_backup_restores_into_an_empty_etcd() {
    let Some(etcd) = Etcd::start() else { return };
    let (tmp, src, file, snap) = make_backup();
    let store = etcd.store("restored/");
    let dst = tmp.path().join("dst");
    backup::restore_backup(&file, &kek(1), &store, &dst, RestoreOptions::default()).unwrap();
    assert_eq!(backup::snapshot(&store).unwrap(), snap);
    assert_eq!(files_of(&dst), files_of(&src));
    // Not twice.
    let err = backup::restore_backup(
        &file,
        &kek(1),
        &store,
        &tmp.path().join("dst2"),
        RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, BackupError::TargetNotEmpty { .. }), "{err}");
    // And an etcd backup (online) restores into sled.
    let entries = backup::snapshot(&store).unwrap();
    let file2 = tmp.path().join("etcd.backup");
    backup::write_backup(&entries, &dst, "etcd:test", &kek(1), &file2).unwrap();
    let dst3 = tmp.path().join("dst3");
    let sled = SledStore::open(&dst3.join("state")).unwrap();
    backup::restore_backup(&file2, &kek(1), &sled, &dst3, RestoreOptions::default()).unwrap();
    assert_eq!(backup::snapshot(&sled).unwrap(), snap);
}

#[test]
fn migrate_sled_to_etcd_over_many_transactions() {
    let Some(etcd) = Etcd::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let sled = SledStore::open(&tmp.path().join("state")).unwrap();
    // 300 keys of 5 KiB: > 128 keys, ~1.5 MiB in all.
    for chunk in (0..300).collect::<Vec<u32>>().chunks(50) {
        let mut t = Txn::new();
        for i in chunk {
            t = t.put(format!("nodes/n{i:04}"), vec![b'a' + (*i % 26) as u8; 5 * 1024]);
        }
        sled.txn(t).unwrap();
    }
    let target = etcd.store("migrated/");
    let mut calls = 0;
    let s = backup::migrate(&sled, &target, |_, total| {
        calls += 1;
        assert_eq!(total, 300);
    })
    .unwrap();
    assert_eq!(s.entries, 300);
    assert!(calls >= 3, "expected several transactions, got {calls}");
    assert_eq!(backup::snapshot(&target).unwrap(), backup::snapshot(&sled).unwrap());
    // A non-empty target is refused.
    let err = backup::migrate(&sled, &target, |_, _| {}).unwrap_err();
    assert!(matches!(err, BackupError::TargetNotEmpty { count: 300, .. }), "{err}");

    // The command line, through the daemon's config validation and open_store.
    drop(sled);
    let out = output_retrying_lock(
        bin()
            .args(["migrate", "--etcd-plaintext", "--etcd-prefix", "cli/"])
            .arg(format!("--from=sled:{}", tmp.path().display()))
            .arg(format!("--to=etcd:{}", etcd.endpoint())),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrated 300 entries"));
    assert_eq!(backup::snapshot(&etcd.store("cli/")).unwrap().len(), 300);
}
