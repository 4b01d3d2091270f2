//! Benchmark, not a test: the RTT the agents measure with their probes, against `ping` over the same pairs
//! and against the delay the userspace router injects. Prints a markdown table; asserts nothing.
//!
//! The lab's layout (`e2e::lab::lab_zones(6, 3)`: six agents in zones a, b, c; 0.1 ms RTT inside a zone,
//! 1 ms between a and b, 5 ms to c) runs as a [`Fleet`] with probes every 100 ms in 10 s windows. Two
//! phases: *baseline* (1 µs one way on every zone pair, i.e. the router's own cost) and *delayed* (the
//! layout's delays). In each, `ping` (100 × 10 ms) runs over every ordered pair, then the newest agent
//! window of every pair that started in the phase is read (`nimbusctl -o json latency`). Per class of pair
//! (inside a zone, a–b, to c) and overall, over the pairs: the median and the p99 of |error| of
//! agent p50 − ping p50, agent p99 − ping p99, and agent p50 − (injected RTT + router baseline), where the
//! router baseline is the median over pairs of the agents' baseline p50 (minus the 2 µs configured then).
//!
//! Run as root after `cargo build --workspace --bins` (the fleet runs target/debug's daemons):
//! `cargo bench -p nimbus-e2e --bench latency_accuracy`. Under `cargo test` (no `--bench`) it exits at once.
//! `NIMBUS_BIN_DIR=target/release` measures release daemons instead (build them first).
//! Env: `LATENCY_BENCH_PINGS` (default 100), `LATENCY_BENCH_PING_INTERVAL_MS` (default 10).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::fleet::{FleetOptions, agent_name};
use e2e::lab::lab_zones;
use e2e::{Fleet, eventually, patience, ping_rtts, require_root};
use serde_json::Value;

const AGENTS: usize = 6;
const ZONES: usize = 3;
/// What the baseline phase sets on every zone pair, one way (the router needs a delay entry to queue).
const NEAR_ZERO: Duration = Duration::from_micros(1);

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Nearest-rank percentile (`p` in 0..=1) of `values`; NaN when empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[(p.clamp(0.0, 1.0) * (v.len() - 1) as f64).round() as usize]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Inside,
    NearAB,
    ToC,
}

impl Class {
    fn of(za: &str, zb: &str) -> Class {
        if za == zb {
            Class::Inside
        } else if [za, zb].contains(&"c") {
            Class::ToC
        } else {
            Class::NearAB
        }
    }

    fn label(self) -> &'static str {
        match self {
            Class::Inside => "inside a zone",
            Class::NearAB => "a–b",
            Class::ToC => "to c",
        }
    }
}

/// One ordered pair in one phase, in µs.
#[derive(Debug, Clone)]
struct Pair {
    class: Class,
    injected: f64,
    agent_p50: f64,
    agent_p99: f64,
    samples: u64,
    ping_p50: f64,
    ping_p99: f64,
    timestamping: String,
}

/// The newest window of every ordered pair that started at or after `since_ms` and has samples, by (from, to).
fn fresh_windows(fleet: &Fleet, since_ms: u64) -> Result<BTreeMap<(String, String), Value>, String> {
    let v = fleet.try_ctl_json(&["latency"]).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for p in v["pairs"].as_array().cloned().unwrap_or_default() {
        if p["start_unix_ms"].as_u64().unwrap_or(0) >= since_ms && p["samples"].as_u64().unwrap_or(0) > 0 {
            let key = (
                p["from"].as_str().unwrap_or("").to_string(),
                p["to"].as_str().unwrap_or("").to_string(),
            );
            out.insert(key, p);
        }
    }
    let want = AGENTS * (AGENTS - 1);
    if out.len() == want {
        Ok(out)
    } else {
        Err(format!("{} of {want} pairs have a window since {since_ms}", out.len()))
    }
}

/// Pings every ordered pair, then reads the agents' windows that started after the phase began.
fn measure(fleet: &Fleet, phase: &str, since_ms: u64, pings: u32, interval: Duration) -> Vec<Pair> {
    let mut ping = BTreeMap::new();
    for i in 1..=AGENTS {
        for j in (1..=AGENTS).filter(|j| *j != i) {
            let r = ping_rtts(fleet.agent_ns(i), fleet.agent_ip(j), pings, interval).unwrap();
            eprintln!(
                "[{phase}] ping {} -> {}: {}/{} replies, p50 {:.0} µs",
                agent_name(i),
                agent_name(j),
                r.received,
                r.transmitted,
                r.median().map_or(f64::NAN, us)
            );
            ping.insert((i, j), r);
        }
    }
    // Windows are 10 s long and reported when they close: allow a few of them.
    let wait = patience().max(Duration::from_secs(120));
    let windows = eventually(wait, Duration::from_millis(500), || fresh_windows(fleet, since_ms));
    let mut out = Vec::new();
    for ((i, j), r) in &ping {
        let w = &windows[&(agent_name(*i), agent_name(*j))];
        let ns = |k: &str| w[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
        out.push(Pair {
            class: Class::of(fleet.agent_zone(*i).unwrap(), fleet.agent_zone(*j).unwrap()),
            injected: us(fleet
                .delay_lab()
                .injected_rtt(&agent_name(*i), &agent_name(*j))
                .unwrap()),
            agent_p50: ns("p50_ns"),
            agent_p99: ns("p99_ns"),
            samples: w["samples"].as_u64().unwrap_or(0),
            ping_p50: r.percentile(0.5).map_or(f64::NAN, us),
            ping_p99: r.percentile(0.99).map_or(f64::NAN, us),
            timestamping: w["timestamping"].as_str().unwrap_or("").to_string(),
        });
    }
    out
}

/// `median / p99 of |x|` of `values`, in µs.
fn stat(values: &[f64]) -> String {
    let abs: Vec<f64> = values.iter().map(|v| v.abs()).collect();
    format!("{:+.0} / {:.0}", percentile(values, 0.5), percentile(&abs, 0.99))
}

fn rows(phase: &str, pairs: &[Pair], base: f64) -> Vec<String> {
    let mut groups: BTreeMap<Class, Vec<&Pair>> = BTreeMap::new();
    for p in pairs {
        groups.entry(p.class).or_default().push(p);
    }
    let all: Vec<&Pair> = pairs.iter().collect();
    groups
        .iter()
        .map(|(class, ps)| (Some(*class), ps))
        .chain([(None, &all)])
        .map(|(class, ps)| {
            let col = |f: &dyn Fn(&Pair) -> f64| ps.iter().map(|p| f(p)).collect::<Vec<f64>>();
            let injected: BTreeSet<i64> = ps.iter().map(|p| p.injected.round() as i64).collect();
            let injected = injected.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
            format!(
                "| {phase} | {} | {} | {injected} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                class.map_or("all", Class::label),
                ps.len(),
                percentile(&col(&|p| p.agent_p50), 0.5),
                percentile(&col(&|p| p.ping_p50), 0.5),
                percentile(&col(&|p| p.agent_p99), 0.5),
                percentile(&col(&|p| p.ping_p99), 0.5),
                percentile(&col(&|p| p.samples as f64), 0.5),
                stat(&col(&|p| p.agent_p50 - p.ping_p50)),
                stat(&col(&|p| p.agent_p99 - p.ping_p99)),
                stat(&col(&|p| p.agent_p50 - (p.injected + base))),
            )
        })
        .collect()
}

/// The timestamping an agent's prober socket got, from its startup log line.
fn logged_timestamping(fleet: &Fleet, i: usize) -> Option<String> {
    let log = std::fs::read_to_string(fleet.log_dir().join(format!("{}.log", agent_name(i)))).ok()?;
    let line = log.lines().find(|l| l.contains("socket timestamping"))?;
    let mode = line.split("mode=").nth(1)?.split_whitespace().next()?;
    Some(mode.to_string())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs this without `--bench`: nothing to check, and it takes minutes.
        return;
    }
    if !require_root() {
        return;
    }
    let pings = u32::try_from(env_or("LATENCY_BENCH_PINGS", 100)).unwrap_or(100);
    let interval = Duration::from_millis(env_or("LATENCY_BENCH_PING_INTERVAL_MS", 10));
    let layout = lab_zones(AGENTS, ZONES).unwrap();
    let opts = FleetOptions {
        coordinator_args: ["--probe-interval", "100ms", "--probe-window", "10s"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..FleetOptions::zones(layout)
    };
    let mut fleet = Fleet::new(opts).unwrap();
    let token = fleet.create_token("1h", AGENTS as u32);
    for i in 1..=AGENTS {
        fleet.start_agent(i, Some(&token), &[]);
    }
    let names: Vec<String> = (1..=AGENTS).map(agent_name).collect();
    fleet.wait_connected(&names);
    let delayed = fleet.delay_lab().config().clone();

    let mut baseline_cfg = delayed.clone();
    let zones = ["a", "b", "c"];
    for a in zones {
        for b in zones {
            baseline_cfg.set_one_way(a, b, NEAR_ZERO, true);
        }
    }
    eprintln!("baseline phase: {NEAR_ZERO:?} one way on every zone pair");
    fleet.delay_lab_mut().apply(baseline_cfg).unwrap();
    let since = now_ms() + 500;
    let baseline = measure(&fleet, "baseline", since, pings, interval);

    eprintln!("delayed phase: the lab's delays");
    fleet.delay_lab_mut().apply(delayed).unwrap();
    let since = now_ms() + 500;
    let delayed = measure(&fleet, "delayed", since, pings, interval);

    // The router's own cost, as the agents see it: the median baseline p50 without the 2 × 1 µs configured.
    let base_agent = percentile(
        &baseline.iter().map(|p| p.agent_p50 - p.injected).collect::<Vec<_>>(),
        0.5,
    );
    let base_ping = percentile(
        &baseline.iter().map(|p| p.ping_p50 - p.injected).collect::<Vec<_>>(),
        0.5,
    );
    let modes: BTreeSet<&str> = baseline
        .iter()
        .chain(&delayed)
        .map(|p| p.timestamping.as_str())
        .collect();
    let logged: BTreeSet<String> = (1..=AGENTS).filter_map(|i| logged_timestamping(&fleet, i)).collect();

    println!(
        "Agent-measured RTT vs `ping` and the injected delay: {AGENTS} agents in zones a, b, c behind the userspace \
         delay router; probes every 100 ms, 10 s windows (one window per ordered pair and phase); ping {pings} × \
         {} ms per ordered pair. RTT columns: median over the pairs of each pair's p50 or p99. Error columns, in µs: \
         median (signed) / p99 of |error| over the pairs (with at most 30 pairs, the p99 is the largest).\n",
        interval.as_millis()
    );
    println!(
        "| phase | class | pairs | injected RTT µs | agent p50 µs | ping p50 µs | agent p99 µs | ping p99 µs | samples/window | agent p50 − ping p50 | agent p99 − ping p99 | agent p50 − (injected + baseline) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for line in rows("baseline", &baseline, base_agent)
        .into_iter()
        .chain(rows("delayed", &delayed, base_agent))
    {
        println!("{line}");
    }
    println!(
        "\nRouter baseline (median over pairs of the baseline p50, without the 2 µs configured): agents {base_agent:.0} µs, \
         ping {base_ping:.0} µs."
    );
    println!(
        "Timestamping: windows report {}; agents logged {} at startup.",
        modes.into_iter().collect::<Vec<_>>().join(", "),
        if logged.is_empty() {
            "nothing".to_string()
        } else {
            logged.into_iter().collect::<Vec<_>>().join(", ")
        }
    );
}
