//! The userspace delay router (`e2e::delay`, binary `nimbus-delay-router`): zones get the configured
//! delay on top of the router's own cost, a lossy host shows its loss, nothing is left behind.
//! Privileged tests need root (see `require_root`); they run one at a time so timings do not interfere.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use e2e::delay::{DelayLab, EXIT_CONFIG, ROUTER_TUN, ping_rtts};
use e2e::process::pid_alive;
use e2e::{Netns, require_root};

const ROUTER: &str = env!("CARGO_BIN_EXE_nimbus-delay-router");

/// Timing tests must not run concurrently (two cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn root_link_names() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(str::to_string))
        .collect()
}

fn assert_gone(namespaces: &[String], router_pid: u32, links_before: &[String]) {
    let listed = Netns::list().unwrap();
    for ns in namespaces {
        assert!(
            !listed.contains(ns) && !Netns::exists(ns),
            "namespace {ns} is still there"
        );
    }
    assert!(
        !pid_alive(router_pid),
        "the delay router (PID {router_pid}) is still running"
    );
    let new: Vec<String> = root_link_names()
        .into_iter()
        .filter(|l| !links_before.contains(l))
        .collect();
    assert!(
        !new.iter()
            .any(|l| l.starts_with(ROUTER_TUN) || l.starts_with("eth0") || l.starts_with('h')),
        "links appeared in the root namespace: {new:?}"
    );
}

const INSIDE: Duration = Duration::from_micros(50);
const NEAR: Duration = Duration::from_micros(500);
const FAR: Duration = Duration::from_micros(2500);
const LOSSY: &str = "lossy";

#[test]
fn zones_get_their_delay_and_a_lossy_host_its_loss() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let links_before = root_link_names();
    // Three zones of two hosts: 0.1 ms RTT inside a zone, 1 ms a<->b, 5 ms to c. Plus a host with 30 % loss.
    let mut lab = DelayLab::builder()
        .router_binary(ROUTER)
        .zone("a", 2)
        .zone("b", 2)
        .zone("c", 2)
        .host("b", LOSSY, Ipv4Addr::new(198, 18, 2, 100))
        .delay("a", "a", INSIDE)
        .delay("b", "b", INSIDE)
        .delay("c", "c", INSIDE)
        .delay("a", "b", NEAR)
        .delay("a", "c", FAR)
        .delay("b", "c", FAR)
        .loss(LOSSY, 0.3)
        .seed(7)
        .build()
        .unwrap();
    let namespaces = lab.namespaces();
    let router_pid = lab.router_process().unwrap().pid();
    let target = lab.config().clone();
    assert_eq!(lab.injected_rtt("a-1", "c-2").unwrap(), Duration::from_micros(5000));
    assert_eq!(lab.injected_rtt("a-1", "a-2").unwrap(), Duration::from_micros(100));

    let roles: Vec<String> = lab
        .hosts()
        .iter()
        .map(|h| h.role().to_string())
        .filter(|r| r != LOSSY)
        .collect();
    let mut pairs = Vec::new();
    for (i, a) in roles.iter().enumerate() {
        for b in &roles[i + 1..] {
            pairs.push((a.clone(), b.clone()));
        }
    }
    let measure = |lab: &DelayLab, count: u32| -> Vec<Duration> {
        pairs
            .iter()
            .map(|(a, b)| {
                let report = ping_rtts(lab.host(a).ns(), lab.host(b).ip(), count, Duration::from_millis(50)).unwrap();
                assert_eq!(
                    report.received, report.transmitted,
                    "{a} -> {b} lost packets: {report:?}"
                );
                report.median().unwrap()
            })
            .collect()
    };

    // The router's own cost, over the same router and the same path (its delay queue, 1 µs each way; after a
    // warm-up that resolves ARP). Every pair crosses the same router, so its cost is one number: the median
    // over all pairs, far less noisy than each pair's own 20 pings.
    let mut base_cfg = target.without_impairments();
    for z in ["a", "b", "c"] {
        for y in ["a", "b", "c"] {
            base_cfg.set_one_way(z, y, Duration::from_micros(1), true);
        }
    }
    lab.apply(base_cfg).unwrap();
    measure(&lab, 2);
    let mut per_pair = measure(&lab, 20);
    per_pair.sort_unstable();
    let router_cost = per_pair[per_pair.len() / 2].saturating_sub(Duration::from_micros(2));
    let baseline = vec![router_cost; pairs.len()];
    lab.apply(target.clone()).unwrap();
    let measured = measure(&lab, 20);

    let mut table = String::from("pair            injected   baseline   measured   error      tolerance\n");
    let mut failures = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let injected = lab.injected_rtt(a, b).unwrap();
        let expected = injected + baseline[i];
        let error = us(measured[i]) - us(expected);
        let tolerance = us(Duration::from_micros(100)).max(us(expected) * 0.10);
        table.push_str(&format!(
            "{:<15} {:>7.0} µs {:>7.0} µs {:>7.0} µs {:>+7.0} µs {:>7.0} µs\n",
            format!("{a}<->{b}"),
            us(injected),
            us(baseline[i]),
            us(measured[i]),
            error,
            tolerance
        ));
        if error.abs() > tolerance {
            failures.push(format!("{a}<->{b}"));
        }
    }
    let stats = lab.stats().unwrap();
    eprintln!(
        "{table}router: {} packets, {} delayed, release lateness mean {:.1} µs, max {:.1} µs, {} over 50 µs",
        stats.received,
        stats.delayed,
        us(stats.mean_late()),
        stats.late_max_ns as f64 / 1000.0,
        stats.late_over_50us
    );
    assert!(failures.is_empty(), "RTT outside tolerance for {failures:?}:\n{table}");
    assert_eq!(stats.dropped_queue_full, 0, "{stats:?}");

    // 30 % configured loss shows as 20-40 % ping loss, whichever side pings.
    let lossy = lab.host(LOSSY);
    let a1 = lab.host("a-1");
    for (from, to, what) in [(a1, lossy, "a-1 -> lossy"), (lossy, a1, "lossy -> a-1")] {
        let report = ping_rtts(from.ns(), to.ip(), 200, Duration::from_millis(10)).unwrap();
        eprintln!(
            "{what}: {:.1} % loss over {} pings",
            report.loss() * 100.0,
            report.transmitted
        );
        assert_eq!(report.transmitted, 200, "{report:?}");
        assert!(
            (0.20..=0.40).contains(&report.loss()),
            "{what}: loss {} ({report:?})",
            report.loss()
        );
    }
    // Other hosts lose nothing.
    let report = ping_rtts(a1.ns(), lab.host("b-1").ip(), 50, Duration::from_millis(10)).unwrap();
    assert_eq!(report.received, 50, "{report:?}");
    assert!(lab.stats().unwrap().dropped_loss > 0);

    drop(lab);
    assert_gone(&namespaces, router_pid, &links_before);
}

#[test]
fn traffic_inside_a_zone_crosses_the_router_and_config_changes_apply_live() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut lab = DelayLab::builder().router_binary(ROUTER).zone("a", 2).build().unwrap();
    let (a1, a2) = (lab.host("a-1"), lab.host("a-2"));
    assert_eq!(a1.ip(), Ipv4Addr::new(198, 18, 1, 1));
    ping_rtts(a1.ns(), a2.ip(), 3, Duration::from_millis(20)).unwrap();
    let before = lab.stats().unwrap();
    // Same zone, no delay configured: the packets still went through the TUN.
    assert!(before.received >= 6 && before.forwarded_at_once >= 6, "{before:?}");

    let mut config = lab.config().clone();
    config.set_one_way("a", "a", Duration::from_millis(5), true);
    lab.apply(config).unwrap();
    let (a1, a2) = (lab.host("a-1"), lab.host("a-2"));
    let report = ping_rtts(a1.ns(), a2.ip(), 5, Duration::from_millis(20)).unwrap();
    let median = report.median().unwrap();
    assert!(
        median >= Duration::from_millis(10) && median < Duration::from_millis(12),
        "{median:?}"
    );
    // Without the router, nothing passes: the TUN has no reader and the kernel drops what is routed to it.
    lab.router_process().unwrap().stop(Duration::from_secs(5));
    let (a1, a2) = (lab.host("a-1"), lab.host("a-2"));
    assert!(a1.ns().ping(a2.ip().into()).is_err());
    // A config the router would refuse is refused before it is written.
    let mut bad = lab.config().clone();
    bad.set_loss(Ipv4Addr::new(203, 0, 113, 9), 0.5);
    assert!(lab.apply(bad).unwrap_err().to_string().contains("in no zone"));
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let links_before = root_link_names();
    let seen = std::sync::Arc::new(Mutex::new(None));
    let seen_in = std::sync::Arc::clone(&seen);
    let outcome = std::thread::spawn(move || {
        let lab = DelayLab::builder()
            .router_binary(ROUTER)
            .zone("a", 1)
            .zone("b", 1)
            .delay("a", "b", Duration::from_millis(1))
            .build()
            .unwrap();
        *seen_in.lock().unwrap() = Some((lab.namespaces(), lab.router_process().unwrap().pid()));
        panic!("deliberate panic with a delay lab alive");
    })
    .join();
    assert!(outcome.is_err());
    let (namespaces, pid) = seen.lock().unwrap().take().unwrap();
    assert_eq!(namespaces.len(), 3);
    assert_gone(&namespaces, pid, &links_before);
}

#[test]
fn the_router_refuses_a_bad_config_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(
        &path,
        r#"{"zones": [{"name": "a", "hosts": ["198.18.1.1"]}],
            "delays": [{"from": "a", "to": "z", "one_way_us": 10}],
            "loss": [{"host": "198.18.1.1", "fraction": 2}]}"#,
    )
    .unwrap();
    for extra in [&["--check"][..], &[][..]] {
        let out = Command::new(ROUTER)
            .args(["--tun", "dly-test", "--config"])
            .arg(&path)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(i32::from(EXIT_CONFIG)), "{stderr}");
        assert!(
            stderr.contains("unknown zone \"z\"") && stderr.contains("from 0.0 to 1.0"),
            "{stderr}"
        );
    }
    std::fs::write(&path, "{ not json").unwrap();
    let out = Command::new(ROUTER).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(i32::from(EXIT_CONFIG)));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"zones": [{"name": "a", "hosts": ["198.18.1.1"]}]}"#).unwrap();
    let out = Command::new(ROUTER)
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
