//! Benchmark, not a test: how precisely the userspace delay router adds delay (ping RTT percentiles over the
//! same router with and without delay, and the router's own release lateness). Prints a table; asserts nothing.
//! Run as root: `cargo build -p nimbus-e2e --bins && cargo bench -p nimbus-e2e --bench delay_precision`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::delay::{DelayLab, ping_rtts};
use e2e::require_root;

const ROUTER: &str = env!("CARGO_BIN_EXE_nimbus-delay-router");
const INSIDE: Duration = Duration::from_micros(50);
const FAR: Duration = Duration::from_micros(2500);

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    if !require_root() {
        return;
    }
    let mut lab = DelayLab::builder()
        .router_binary(ROUTER)
        .zone("a", 2)
        .zone("b", 1)
        .build()
        .unwrap();
    let target = {
        let mut c = lab.config().clone();
        c.set_one_way("a", "a", INSIDE, true);
        c.set_one_way("a", "b", FAR, true);
        c
    };
    let count: u32 = std::env::var("DELAY_BENCH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let interval = Duration::from_millis(
        std::env::var("DELAY_BENCH_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let run = |lab: &DelayLab, to: &str| ping_rtts(lab.host("a-1").ns(), lab.host(to).ip(), count, interval).unwrap();
    let show = |what: &str, r: &e2e::PingReport| {
        let p = |q: f64| us(r.percentile(q).unwrap());
        eprintln!(
            "{what:<28} n={:<4} min {:>7.0} p10 {:>7.0} p50 {:>7.0} p90 {:>7.0} p99 {:>7.0} max {:>7.0} µs",
            r.rtts.len(),
            p(0.0),
            p(0.1),
            p(0.5),
            p(0.9),
            p(0.99),
            p(1.0)
        );
    };
    lab.apply(target.without_impairments()).unwrap();
    run(&lab, "a-2");
    for round in 0..2 {
        lab.apply(target.without_impairments()).unwrap();
        let base_a = run(&lab, "a-2");
        let base_b = run(&lab, "b-1");
        lab.apply(target.clone()).unwrap();
        let before = lab.stats().unwrap();
        let del_a = run(&lab, "a-2");
        let del_b = run(&lab, "b-1");
        let after = lab.stats().unwrap();
        show(&format!("[{round}] baseline a-1<->a-2"), &base_a);
        show(&format!("[{round}] 100 µs  a-1<->a-2"), &del_a);
        show(&format!("[{round}] baseline a-1<->b-1"), &base_b);
        show(&format!("[{round}] 5000 µs a-1<->b-1"), &del_b);
        let released = after.released - before.released;
        eprintln!(
            "[{round}] router: {released} released, lateness mean {:.1} µs, max {:.1} µs, {} over 50 µs",
            (after.late_total_ns - before.late_total_ns) as f64 / 1000.0 / released.max(1) as f64,
            after.late_max_ns as f64 / 1000.0,
            after.late_over_50us - before.late_over_50us
        );
    }
}
