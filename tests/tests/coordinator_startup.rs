//! End-to-end: the coordinator refuses bad startup conditions with one clear line and a non-zero exit.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;

use e2e::fleet::ENROLL_PORT;
use e2e::{Fleet, patience, require_root, run_with_timeout};

fn run_coordinator(fleet: &Fleet, args: &[String]) -> Output {
    run_with_timeout(&mut fleet.coordinator_command(args), patience())
        .unwrap_or_else(|e| panic!("the coordinator must exit by itself on a startup error: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn enroll_port_in_use_is_a_startup_error() {
    if !require_root() {
        return;
    }
    let fleet = Fleet::setup(0);
    let _holder = fleet
        .coordinator_ns()
        .bind_tcp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, ENROLL_PORT)))
        .unwrap();
    let out = run_coordinator(&fleet, &fleet.coordinator_args(&fleet.coordinator_data_dir()));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&ENROLL_PORT.to_string()) && l.contains("in use")),
        "stderr needs a line naming the port and 'in use':\n{}",
        describe(&out)
    );
}

#[test]
fn an_uncreatable_data_dir_is_a_startup_error() {
    if !require_root() {
        return;
    }
    let fleet = Fleet::setup(0);
    let file = fleet.work_dir().join("not-a-dir");
    std::fs::write(&file, b"a regular file").unwrap();
    let out = run_coordinator(&fleet, &fleet.coordinator_args(&file.join("data")));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.contains("not-a-dir")),
        "stderr needs a line naming the data dir:\n{}",
        describe(&out)
    );
}

#[test]
fn a_bad_config_file_exits_64() {
    if !require_root() {
        return;
    }
    let fleet = Fleet::setup(0);
    let config = fleet.work_dir().join("coordinator.toml");
    std::fs::write(&config, "[[[ this is not a config file\n").unwrap();
    let mut args = fleet.coordinator_args(&fleet.coordinator_data_dir());
    args.extend(["--config".to_string(), config.display().to_string()]);
    let out = run_coordinator(&fleet, &args);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_tun_device_that_cannot_be_created_is_a_startup_error_and_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let fleet = Fleet::setup(0);
    // Another kind of interface already holds the TUN name.
    fleet
        .coordinator_ns()
        .ip(["link", "add", e2e::fleet::TUN_NAME, "type", "bridge"])
        .unwrap();
    let out = run_coordinator(&fleet, &fleet.coordinator_args(&fleet.coordinator_data_dir()));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(e2e::fleet::TUN_NAME)).collect();
    assert!(
        lines.iter().any(|l| l.contains("TUN")),
        "stderr needs a line naming the TUN device and the cause:\n{}",
        describe(&out)
    );
    assert!(
        !fleet.admin_socket().exists(),
        "a failed start must not leave its admin socket behind"
    );
}

#[test]
fn every_bad_config_key_is_reported_at_once() {
    if !require_root() {
        return;
    }
    let fleet = Fleet::setup(0);
    let config = fleet.work_dir().join("coordinator.toml");
    std::fs::write(
        &config,
        "mtu = \"big\"\nfleet_prot = 7000\noverlay_cidr = \"100.96.0.0/40\"\n[tls]\nweird = 1\n",
    )
    .unwrap();
    let mut args = fleet.coordinator_args(&fleet.coordinator_data_dir());
    args.extend(["--config".to_string(), config.display().to_string()]);
    let out = run_coordinator(&fleet, &args);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["mtu", "fleet_prot", "tls"] {
        assert!(
            stderr.lines().any(|l| l.contains(key)),
            "{key} is not reported:\n{}",
            describe(&out)
        );
    }
    assert!(
        !fleet.admin_socket().exists(),
        "nothing binds before the configuration is valid"
    );
}
