//! Benchmark (not a test): enrollment rate and write load of the coordinator's store, sled against a real etcd
//! (Debian's etcd-server on loopback, plain HTTP), for 1 000 and 10 000 simulated agents. Each agent is one
//! `State::enroll` (the code the Enrollment RPC runs: token use, node, name, key and IP records in one
//! compare-and-swap transaction) from 8 threads, as the coordinator runs them on its blocking pool; tokens have
//! 100 uses each, so agents of one batch contend on their token record as they do in production.
//!
//! Prints a markdown table: enrollments per second, p50/p99 latency, and the write load: for sled the store's size
//! on disk after the run, for etcd the bytes it wrote to its WAL (`etcd_disk_wal_write_bytes_total`).
//!
//! `cargo bench -p nimbus-e2e --bench store_enroll` (needs /usr/bin/etcd; `-- --quick` for 1 000 only).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use coordinator::ipam::OverlayPlan;
use coordinator::state::{EnrollInput, State};
use coordinator::store::{EtcdOptions, EtcdStore, SledStore, Store};

const THREADS: usize = 8;
const USES_PER_TOKEN: u32 = 100;

struct Row {
    backend: &'static str,
    agents: usize,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    bytes: u64,
}

fn input(i: usize) -> EnrollInput {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    key[31] = 0x42;
    EnrollInput {
        public_key_b64url: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key),
        hostname: format!("host-{i}"),
        machine_id: format!("{i:032x}"),
        agent_version: coordinator::VERSION.to_owned(),
        requested_name: String::new(),
        macs: Vec::new(),
    }
}

/// Enrolls `agents` simulated agents into `store`; returns (seconds, per-enrollment latencies).
fn run(store: Arc<dyn Store>, agents: usize) -> (f64, Vec<Duration>) {
    let state = Arc::new(State::open(store, OverlayPlan::new("100.96.0.0/16".parse().unwrap()).unwrap()).unwrap());
    let tokens: Vec<String> = (0..agents.div_ceil(USES_PER_TOKEN as usize))
        .map(|_| {
            let (t, _) = state
                .create_token(
                    Duration::from_secs(3600),
                    USES_PER_TOKEN,
                    BTreeMap::new(),
                    "bench".into(),
                    SystemTime::now(),
                )
                .unwrap();
            t.to_string_secret()
        })
        .collect();
    let tokens = Arc::new(tokens);
    let start = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (state, tokens) = (Arc::clone(&state), Arc::clone(&tokens));
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                for i in (t..agents).step_by(THREADS) {
                    let token = &tokens[i / USES_PER_TOKEN as usize];
                    let t0 = Instant::now();
                    state.enroll(token, input(i), SystemTime::now()).unwrap();
                    lat.push(t0.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    (secs, lat)
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat[i].as_secs_f64() * 1e3
}

fn dir_size(dir: &Path) -> u64 {
    coordinator::metrics::dir_size(dir)
}

/// Bytes etcd wrote to its WAL so far (its own metric; the WAL files on disk are preallocated in 64 MiB segments).
fn wal_bytes(etcd: &e2e::etcd::Etcd) -> u64 {
    let addr = etcd.endpoint().trim_start_matches("http://").to_string();
    let text = e2e::scrape::http_get_here(&addr, "/metrics").unwrap_or_default();
    e2e::scrape::sample(&text, "etcd_disk_wal_write_bytes_total", &[]).unwrap_or(0.0) as u64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if !Path::new(e2e::etcd::ETCD).exists() {
        eprintln!("store_enroll: {} not found: install etcd-server", e2e::etcd::ETCD);
        return;
    }
    let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
    let mut rows = Vec::new();
    for &agents in sizes {
        let dir = tempfile::tempdir().unwrap();
        let sled_dir = dir.path().join("sled");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&sled_dir).unwrap());
        let (secs, lat) = run(Arc::clone(&store), agents);
        store.flush().unwrap();
        drop(store);
        rows.push(Row {
            backend: "sled",
            agents,
            secs,
            p50_ms: pct(&lat, 0.5),
            p99_ms: pct(&lat, 0.99),
            bytes: dir_size(&sled_dir),
        });
        eprintln!("sled {agents}: {secs:.1} s");

        let etcd_dir = dir.path().join("etcd");
        let etcd = e2e::etcd::Etcd::start_local(&etcd_dir).unwrap();
        let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(EtcdOptions::new([etcd.endpoint()])).unwrap());
        let wal_before = wal_bytes(&etcd);
        let (secs, lat) = run(store, agents);
        rows.push(Row {
            backend: "etcd",
            agents,
            secs,
            p50_ms: pct(&lat, 0.5),
            p99_ms: pct(&lat, 0.99),
            bytes: wal_bytes(&etcd).saturating_sub(wal_before),
        });
        eprintln!("etcd {agents}: {secs:.1} s");
        drop(etcd);
    }
    println!("| store | agents | enrollments/s | p50 ms | p99 ms | bytes written | bytes per agent |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            r.backend,
            r.agents,
            r.agents as f64 / r.secs,
            r.p50_ms,
            r.p99_ms,
            r.bytes,
            r.bytes / r.agents as u64
        );
    }
}
