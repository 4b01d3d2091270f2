//! `EtcdStore` against a real etcd (Debian's etcd-server, /usr/bin/etcd) started per test on loopback with
//! random ports in a temporary data directory, and killed by PID when the test ends (`common::Etcd`).
//!
//! Without /usr/bin/etcd each test prints a note and passes, unless NIMBUS_REQUIRE_ROOT_TESTS=1 (CI), where
//! it fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Etcd, free_port};
use coordinator::ipam::OverlayPlan;
use coordinator::state::{EnrollInput, State};
use coordinator::store::{self, EtcdOptions, EtcdStore, SledStore, Store, Txn, keys};

#[test]
fn conformance_on_etcd_and_sled() {
    let dir = tempfile::tempdir().unwrap();
    store::conformance(&SledStore::open(dir.path()).unwrap());
    let Some(etcd) = Etcd::start() else { return };
    store::conformance(&etcd.store("nimbus/"));
}

#[test]
fn prefixes_isolate_stores_and_keys_are_stored_under_the_prefix() {
    let Some(etcd) = Etcd::start() else { return };
    let a = etcd.store("fleet-a/");
    let b = etcd.store("fleet-b/");
    let raw = etcd.store("");
    assert!(a.txn(Txn::new().put("nodes/n1", "A")).unwrap());
    assert!(b.txn(Txn::new().put("nodes/n1", "B")).unwrap());
    assert_eq!(a.get(b"nodes/n1").unwrap().as_deref(), Some(&b"A"[..]));
    assert_eq!(b.get(b"nodes/n1").unwrap().as_deref(), Some(&b"B"[..]));
    assert_eq!(a.scan_prefix(b"").unwrap(), vec![(b"nodes/n1".to_vec(), b"A".to_vec())]);
    assert_eq!(raw.get(b"fleet-a/nodes/n1").unwrap().as_deref(), Some(&b"A"[..]));
    // The empty prefix scans everything, in byte order.
    let all: Vec<Vec<u8>> = raw.scan_prefix(b"").unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(all.contains(&b"fleet-a/nodes/n1".to_vec()) && all.contains(&b"fleet-b/nodes/n1".to_vec()));
    assert!(all.is_sorted());
    // A CAS in one namespace does not see the other.
    assert!(!a.txn(Txn::new().if_equals("nodes/n1", "B").delete("nodes/n1")).unwrap());
    assert!(b.txn(Txn::new().if_equals("nodes/n1", "B").delete("nodes/n1")).unwrap());
    assert_eq!(a.get(b"nodes/n1").unwrap().as_deref(), Some(&b"A"[..]));
    assert_eq!(b.get(b"nodes/n1").unwrap(), None);
    assert_eq!(a.prefix(), b"fleet-a/");
    assert_eq!(
        format!("{a:?}"),
        format!(
            "EtcdStore {{ endpoints: {:?}, prefix: \"fleet-a/\", .. }}",
            etcd.endpoint()
        )
    );
}

#[test]
fn scans_paginate_in_key_order() {
    let Some(etcd) = Etcd::start() else { return };
    // Default page size (1000) with more than two pages, and a tiny page size.
    let s = etcd.store("nimbus/");
    let n = 2_345;
    let mut expected = Vec::new();
    for batch in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut t = Txn::new();
        for i in batch {
            // Reverse-ish write order: the scan must still come back sorted.
            let k = format!("p/{:05}", n - i);
            t = t.put(k.clone(), format!("v{i}"));
            expected.push((k.into_bytes(), format!("v{i}").into_bytes()));
        }
        assert!(s.txn(t).unwrap());
    }
    assert!(s.txn(Txn::new().put("p", "outside").put("q/1", "outside")).unwrap());
    expected.sort();
    let got = s.scan_prefix(b"p/").unwrap();
    assert_eq!(got.len(), n);
    assert!(got == expected, "scan differs from the written keys");

    let mut o = etcd.options("nimbus/");
    o.page_size = 7;
    let small = EtcdStore::connect(o).unwrap();
    // (assert! rather than assert_eq!: a diff of thousands of pairs is unreadable.)
    assert!(small.scan_prefix(b"p/").unwrap() == expected, "small-page scan differs");
    let sub: Vec<_> = expected
        .iter()
        .filter(|(k, _)| k.starts_with(b"p/01"))
        .cloned()
        .collect();
    assert_eq!(sub.len(), 1000);
    assert!(
        small.scan_prefix(b"p/01").unwrap() == sub,
        "small-page sub-prefix scan differs"
    );
    assert!(s.scan_prefix(b"p/01").unwrap() == sub, "sub-prefix scan differs");
    assert!(small.scan_prefix(b"none/").unwrap().is_empty());
}

#[test]
fn scans_larger_than_the_response_limit_still_work() {
    let Some(etcd) = Etcd::start() else { return };
    let s = etcd.store("nimbus/");
    // 6 × 1 MiB: one 1000-key page would be over the client's 4 MiB response limit.
    let big = vec![b'x'; 1024 * 1024];
    for i in 0..6 {
        assert!(s.txn(Txn::new().put(format!("big/{i}"), big.clone())).unwrap());
    }
    let got = s.scan_prefix(b"big/").unwrap();
    assert_eq!(got.len(), 6);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, (k, v))| *k == format!("big/{i}").into_bytes() && *v == big)
    );
}

#[test]
fn limits_are_refused_with_a_clear_error_and_nothing_applied() {
    let Some(etcd) = Etcd::start() else { return };
    let s = etcd.store("nimbus/");
    let many = (0..129).fold(Txn::new(), |t, i| t.put(format!("many/{i}"), "v"));
    let err = s.txn(many.clone()).unwrap_err().to_string();
    assert!(err.contains("--max-txn-ops") && err.contains("129"), "{err}");
    assert!(s.scan_prefix(b"many/").unwrap().is_empty());
    // 128 is fine.
    let ok = (0..128).fold(Txn::new(), |t, i| t.put(format!("many/{i}"), "v"));
    assert!(s.txn(ok).unwrap());

    let huge = vec![b'x'; 2 * 1024 * 1024];
    let err = s.txn(Txn::new().put("huge", huge.clone())).unwrap_err().to_string();
    assert!(err.contains("--max-request-bytes"), "{err}");
    assert_eq!(s.get(b"huge").unwrap(), None);

    // When the configured limits are wrong, etcd's own refusal is explained the same way.
    let mut o = etcd.options("nimbus/");
    o.max_txn_ops = 10_000;
    o.max_request_bytes = 64 * 1024 * 1024;
    let lax = EtcdStore::connect(o).unwrap();
    let err = lax.txn(many).unwrap_err().to_string();
    assert!(err.contains("--max-txn-ops"), "{err}");
    let err = lax.txn(Txn::new().put("huge", huge)).unwrap_err().to_string();
    assert!(err.contains("--max-request-bytes"), "{err}");
    assert_eq!(lax.get(b"huge").unwrap(), None);
    assert_eq!(lax.scan_prefix(b"many/").unwrap().len(), 128);
}

#[test]
fn concurrent_cas_from_two_threads_loses_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    // Two stores (like two replicas), one thread each.
    let stores = [Arc::new(etcd.store("nimbus/")), Arc::new(etcd.store("nimbus/"))];
    assert!(stores[0].txn(Txn::new().put("ctr", "0")).unwrap());
    let threads: Vec<_> = stores
        .iter()
        .cloned()
        .map(|s| {
            std::thread::spawn(move || {
                let mut conflicts = 0u32;
                for _ in 0..200 {
                    loop {
                        let cur = s.get(b"ctr").unwrap().unwrap();
                        let n: u32 = std::str::from_utf8(&cur).unwrap().parse().unwrap();
                        if s.txn(Txn::new().if_equals("ctr", cur).put("ctr", (n + 1).to_string()))
                            .unwrap()
                        {
                            break;
                        }
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(stores[1].get(b"ctr").unwrap().as_deref(), Some(&b"400"[..]));
    eprintln!("CAS conflicts retried: {conflicts}");
}

#[test]
fn works_from_inside_a_tokio_runtime() {
    let Some(etcd) = Etcd::start() else { return };
    let s: Arc<dyn Store> = Arc::new(etcd.store("nimbus/"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The intended way: spawn_blocking.
        let s2 = s.clone();
        let ok = tokio::task::spawn_blocking(move || s2.txn(Txn::new().put("rt", "1")).unwrap())
            .await
            .unwrap();
        assert!(ok);
        // Even directly on the (single) runtime thread it neither panics nor deadlocks.
        assert_eq!(s.get(b"rt").unwrap().as_deref(), Some(&b"1"[..]));
    });
    // Dropping the last handle inside an async context must not panic either.
    rt.block_on(async move { drop(s) });
}

#[test]
fn unreachable_etcd_is_reported_with_what_to_check() {
    let port = free_port();
    let mut o = EtcdOptions::new([format!("http://127.0.0.1:{port}")]);
    o.connect_timeout = Duration::from_millis(500);
    o.request_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = EtcdStore::connect(o).unwrap_err().to_string();
    assert!(err.contains("check etcd_endpoints and TLS"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let err = EtcdStore::connect(EtcdOptions::new(["ftp://x y"]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("etcd"), "{err}");
}

#[test]
fn store_recovers_after_etcd_restarts() {
    let Some(mut etcd) = Etcd::start() else { return };
    let s = etcd.store("nimbus/");
    assert!(s.txn(Txn::new().put("before", "1")).unwrap());

    etcd.kill();
    let err = s.get(b"before").unwrap_err().to_string();
    assert!(err.contains("check etcd_endpoints and TLS"), "{err}");
    let err = s.txn(Txn::new().put("during", "x")).unwrap_err().to_string();
    assert!(err.contains("etcd"), "{err}");

    etcd.spawn();
    // The same store object, without reconnecting by hand.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.get(b"before") {
            Ok(v) => {
                assert_eq!(v.as_deref(), Some(&b"1"[..]));
                break;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "store did not recover after etcd restarted: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert!(s.txn(Txn::new().if_absent("after").put("after", "2")).unwrap());
    assert_eq!(
        s.scan_prefix(b"after").unwrap(),
        vec![(b"after".to_vec(), b"2".to_vec())]
    );
}

fn enroll_input(b: u8) -> EnrollInput {
    EnrollInput {
        public_key_b64url: URL_SAFE_NO_PAD.encode([b; 32]),
        hostname: format!("host-{b}"),
        machine_id: format!("{b:032x}"),
        agent_version: "0.1.0".to_owned(),
        requested_name: String::new(),
        macs: vec![format!("02:00:00:00:00:{b:02x}")],
    }
}

#[test]
fn state_opens_on_etcd_and_two_replicas_enroll_without_duplicate_ips() {
    let Some(etcd) = Etcd::start() else { return };
    let plan = || OverlayPlan::new("10.9.0.0/24".parse().unwrap()).unwrap();
    let a = State::open(Arc::new(etcd.store("nimbus/")), plan()).unwrap();
    // Schema initialised, under the prefix.
    let raw = etcd.store("");
    let mut schema_key = b"nimbus/".to_vec();
    schema_key.extend_from_slice(keys::SCHEMA);
    assert!(raw.get(&schema_key).unwrap().is_some());
    // A second replica opens the same, already-initialised store.
    let b = State::open(Arc::new(etcd.store("nimbus/")), plan()).unwrap();

    let now = SystemTime::now();
    let (token, _) = a
        .create_token(
            Duration::from_secs(3600),
            40,
            BTreeMap::new(),
            "etcd test".to_owned(),
            now,
        )
        .unwrap();
    let secret = token.to_string_secret();
    let nodes: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = [(&a, 1u8), (&b, 101u8)]
            .into_iter()
            .map(|(state, base)| {
                let secret = &secret;
                scope.spawn(move || {
                    (0..10u8)
                        .map(|i| state.enroll(secret, enroll_input(base + i), now).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(nodes.len(), 20);
    let ips: BTreeSet<_> = nodes.iter().map(|n| n.overlay_ip).collect();
    let ids: BTreeSet<_> = nodes.iter().map(|n| n.id.clone()).collect();
    assert_eq!(ips.len(), 20, "duplicate overlay IPs: {nodes:?}");
    assert_eq!(ids.len(), 20);
    assert_eq!(a.list_nodes().unwrap().len(), 20);
    assert_eq!(b.list_nodes().unwrap().len(), 20);
}

#[test]
fn leases_bind_keys_renewals_keep_them_and_fingerprints_follow_changes() {
    let Some(etcd) = Etcd::start() else { return };
    let s = etcd.store("lease/");
    let lease = s.grant_lease(Duration::from_secs(2)).unwrap();
    s.put_leased(b"replicas/a", b"1".to_vec(), lease).unwrap();
    assert!(
        !s.put_leased_if_absent(b"replicas/a", b"2".to_vec(), lease).unwrap(),
        "present: not replaced"
    );
    assert!(s.put_leased_if_absent(b"replicas/b", b"2".to_vec(), lease).unwrap());
    let fp = s.fingerprint(b"replicas/").unwrap();
    assert_eq!(fp.0, 2);
    // Renewals keep the keys past the TTL; each answers at once (no waiting for a second reply).
    for _ in 0..6 {
        let t = Instant::now();
        assert!(s.renew_lease(lease).unwrap());
        assert!(t.elapsed() < Duration::from_secs(2), "renewal took {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(s.get(b"replicas/a").unwrap().as_deref(), Some(&b"1"[..]));
    // A change moves the fingerprint; revoking the lease removes its keys and is then unknown to etcd.
    s.put_leased(b"replicas/a", b"3".to_vec(), lease).unwrap();
    assert_ne!(s.fingerprint(b"replicas/").unwrap(), fp);
    s.revoke_lease(lease).unwrap();
    assert!(s.get(b"replicas/a").unwrap().is_none() && s.get(b"replicas/b").unwrap().is_none());
    assert_eq!(s.fingerprint(b"replicas/").unwrap().0, 0);
    assert!(!s.renew_lease(lease).unwrap(), "a revoked lease is reported gone");
    s.revoke_lease(lease).unwrap();
}
