//! Self-tests of the harness (no polynimbus daemons needed; privileged ones need root).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::process::{pid_alive, proc_exe};
use e2e::topology::{TEST_SUBNET, host_addr};
use e2e::{Lab, LabState, Netns, Process, eventually_patiently, require_root, teardown_from_state};

fn ip(host: u8) -> Ipv4Addr {
    host_addr(TEST_SUBNET, host)
}

fn root_links() -> String {
    String::from_utf8(Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).unwrap()
}

fn root_routes() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["route", "show", "table", "all"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

/// Root-namespace links and routes, to compare before/after (the host itself may use 192.0.2.0/24).
fn root_snapshot() -> Vec<String> {
    let mut lines: Vec<String> = root_links()
        .lines()
        .map(|l| format!("link {}", strip_counters(l)))
        .collect();
    lines.extend(root_routes().lines().map(|l| format!("route {l}")));
    lines
}

/// `ip -o link` lines without the parts that change on their own.
fn strip_counters(line: &str) -> String {
    line.split(" link/").next().unwrap_or(line).to_string()
}

fn assert_gone(namespaces: &[String], before: &[String]) {
    let listed = Netns::list().unwrap();
    for ns in namespaces {
        assert!(!listed.contains(ns), "namespace {ns} still listed: {listed:?}");
        assert!(!Netns::exists(ns), "namespace {ns} still mounted");
        let out = Command::new("ip").args(["-n", ns, "link"]).output().unwrap();
        assert!(!out.status.success(), "`ip -n {ns} link` still works");
    }
    // Nothing of ours appeared in the root namespace (links named after us, routes via the test underlay).
    let new: Vec<String> = root_snapshot().into_iter().filter(|l| !before.contains(l)).collect();
    for line in &new {
        let ours = namespaces.iter().any(|ns| line.contains(ns.as_str()))
            || line.contains("veth")
            || line.contains("br0")
            || line.contains("192.0.2.");
        assert!(!ours, "root namespace gained {line:?}");
    }
}

#[test]
fn two_hosts_ping_each_other_over_the_bridge() {
    if !require_root() {
        return;
    }
    let lab = Lab::builder().host("a", ip(1)).host("b", ip(2)).build().unwrap();
    let (a, b) = (lab.host("a"), lab.host("b"));
    a.ns().ping(IpAddr::V4(b.ip())).unwrap();
    b.ns().ping(IpAddr::V4(a.ip())).unwrap();
    // The topology is what the brief says: eth0 with the address, lo up, the port on the bridge.
    let addr = a.ns().ip(["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains("192.0.2.1/24"), "{addr}");
    let lo = a.ns().ip(["-o", "link", "show", "lo"]).unwrap();
    assert!(lo.contains("UP"), "{lo}");
    let port = lab.switch().ip(["-o", "link", "show", a.port()]).unwrap();
    assert!(port.contains("master br0"), "{port}");
    // Nothing was created in the root namespace.
    let links = root_links();
    assert!(!links.contains(lab.prefix()), "{links}");
}

#[test]
fn dropping_the_lab_removes_namespaces_and_links() {
    if !require_root() {
        return;
    }
    let before = root_snapshot();
    let lab = Lab::builder()
        .host("a", ip(1))
        .host("b", ip(2))
        .host("c", ip(3))
        .build()
        .unwrap();
    let names = lab.namespaces();
    assert_eq!(names.len(), 4, "3 hosts + switch: {names:?}");
    assert!(names.iter().all(|n| Netns::exists(n)));
    drop(lab);
    assert_gone(&names, &before);
}

#[test]
fn a_panicking_body_still_cleans_up() {
    if !require_root() {
        return;
    }
    let before = root_snapshot();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen_inner = Arc::clone(&seen);
    let result = std::panic::catch_unwind(move || {
        let mut lab = Lab::builder().host("a", ip(1)).build().unwrap();
        lab.add_host("b", ip(2)).unwrap();
        *seen_inner.lock().unwrap() = lab.namespaces();
        panic!("test body fails while the lab is up");
    });
    assert!(result.is_err());
    let names = seen.lock().unwrap().clone();
    assert_eq!(names.len(), 3);
    assert_gone(&names, &before);
}

#[test]
fn teardown_is_idempotent_and_tolerates_vanished_namespaces() {
    if !require_root() {
        return;
    }
    let before = root_snapshot();
    let mut lab = Lab::builder().host("a", ip(1)).host("b", ip(2)).build().unwrap();
    let names = lab.namespaces();
    // Someone removes one namespace behind our back.
    Command::new("ip")
        .args(["netns", "delete", &names[0]])
        .status()
        .unwrap();
    lab.teardown().unwrap();
    lab.teardown().unwrap();
    drop(lab);
    assert_gone(&names, &before);
}

#[test]
fn process_reports_exit_codes_and_signals() {
    let dir = tempfile::tempdir().unwrap();
    let exit3 = Process::builder("exit3", "sh", dir.path().join("exit3.log"))
        .args(["-c", "exit 3"])
        .spawn()
        .unwrap();
    let status = exit3.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(!exit3.is_running());

    let sleeper = Process::builder("sleep", "sleep", dir.path().join("sleep.log"))
        .arg("30")
        .spawn()
        .unwrap();
    assert!(sleeper.is_running());
    assert_eq!(sleeper.wait_exit(Duration::from_millis(100)), None, "still running");
    sleeper.terminate().unwrap();
    let status = sleeper.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!((status.code(), status.signal()), (None, Some(libc::SIGTERM)));
    // Signalling an exited process is a no-op, never a stray kill of a reused PID.
    sleeper.kill9().unwrap();

    let victim = Process::builder("victim", "sleep", dir.path().join("victim.log"))
        .arg("30")
        .spawn()
        .unwrap();
    victim.kill9().unwrap();
    let status = victim.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_eq!(Process::describe_status(Some(status)), "killed by signal 9");
}

#[test]
fn process_log_captures_stdout_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::builder("talker", "sh", dir.path().join("logs/talker.log"))
        .args([
            "-c",
            "echo to-stdout; echo to-stderr >&2; echo \"$GREETING\"; echo \"home=${HOME-unset}\"",
        ])
        .env("GREETING", "hello-env")
        .env_remove("HOME")
        .spawn()
        .unwrap();
    assert_eq!(p.wait_exit(Duration::from_secs(10)).unwrap().code(), Some(0));
    let log = p.log();
    for want in ["to-stdout", "to-stderr", "hello-env", "home=unset"] {
        assert!(log.contains(want), "{want} missing from {log:?}");
    }
}

#[test]
fn dropping_a_process_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    // Ignores SIGTERM: Drop must fall back to SIGKILL (after the grace period).
    let stubborn = Process::builder("stubborn", "sh", dir.path().join("s.log"))
        .args(["-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
        .spawn()
        .unwrap();
    let pid = stubborn.pid();
    eventually_patiently(|| {
        if stubborn.log().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    let start = Instant::now();
    drop(stubborn);
    assert!(!pid_alive(pid), "PID {pid} survived drop");
    assert!(
        start.elapsed() >= Duration::from_secs(4),
        "SIGTERM was ignored, so Drop waited the grace period"
    );

    let polite = Process::builder("polite", "sleep", dir.path().join("p.log"))
        .arg("30")
        .spawn()
        .unwrap();
    let pid = polite.pid();
    let start = Instant::now();
    drop(polite);
    assert!(!pid_alive(pid));
    assert!(start.elapsed() < Duration::from_secs(4), "SIGTERM sufficed");
}

#[test]
fn process_in_a_namespace_is_the_program_itself() {
    if !require_root() {
        return;
    }
    let lab = Lab::builder().host("a", ip(1)).build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = Process::builder("sleeper", "sleep", dir.path().join("sleeper.log"))
        .netns(lab.host("a").ns())
        .arg("30")
        .spawn()
        .unwrap();
    // `ip netns exec` execs: the PID we hold becomes sleep itself, inside the namespace.
    eventually_patiently(|| match proc_exe(p.pid()) {
        Some(exe) if exe.ends_with("sleep") => Ok(()),
        other => Err(format!("exe is {other:?}")),
    });
    let pids = lab.host("a").ns().pids();
    assert!(pids.contains(&p.pid()), "{pids:?} lacks {}", p.pid());
    p.terminate().unwrap();
    assert_eq!(
        p.wait_exit(Duration::from_secs(10)).unwrap().signal(),
        Some(libc::SIGTERM)
    );
}

#[test]
fn bind_tcp_listens_inside_the_namespace() {
    if !require_root() {
        return;
    }
    let lab = Lab::builder()
        .host("server", ip(1))
        .host("client", ip(2))
        .host("other", ip(3))
        .build()
        .unwrap();
    let listener = lab
        .host("server")
        .ns()
        .bind_tcp(SocketAddr::new(IpAddr::V4(ip(1)), 7443))
        .unwrap();
    let accepter = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    lab.host("client")
        .ns()
        .tcp_connect(SocketAddr::new(IpAddr::V4(ip(1)), 7443))
        .unwrap();
    let peer = accepter.join().unwrap().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(ip(2)));
    // A closed port is refused, and the error says so.
    let err = lab
        .host("client")
        .ns()
        .tcp_connect(SocketAddr::new(IpAddr::V4(ip(1)), 7444))
        .unwrap_err();
    assert!(err.contains("failed"), "{err}");
    // The calling thread stayed in the root namespace.
    assert!(std::net::TcpListener::bind("127.0.0.1:0").is_ok());
}

#[test]
fn a_detached_lab_survives_and_teardown_from_state_removes_it() {
    if !require_root() {
        return;
    }
    let before = root_snapshot();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("nbe2e-{}-detach", std::process::id());
    let lab = Lab::builder()
        .prefix(&prefix)
        .host("a", ip(1))
        .host("b", ip(2))
        .build()
        .unwrap();
    let p = Process::builder("sleeper", "sleep", dir.path().join("logs/sleeper.log"))
        .netns(lab.host("a").ns())
        .arg("300")
        .detached(true)
        .spawn()
        .unwrap();
    let pid = p.pid();
    eventually_patiently(|| match proc_exe(pid) {
        Some(exe) if exe.ends_with("sleep") => Ok(()),
        other => Err(format!("exe is {other:?}")),
    });
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("inner")).unwrap();
    let record = p.detach().unwrap();
    let namespaces = lab.persist();
    // Both outlive their handles.
    assert!(pid_alive(pid));
    assert!(namespaces.iter().all(|n| Netns::exists(n)));

    let state_file = dir.path().join("state.json");
    let state = LabState {
        format: e2e::state::STATE_FORMAT,
        created_at_unix: e2e::state::now_unix(),
        work_dir: dir.path().to_path_buf(),
        admin_socket: dir.path().join("admin.sock"),
        nimbusctl: "/nonexistent/nimbusctl".into(),
        namespaces: namespaces.clone(),
        processes: vec![record],
        data_dirs: vec![data.clone()],
        log_dir: dir.path().join("logs"),
    };
    state.save(&state_file).unwrap();
    let report = teardown_from_state(&state_file).unwrap();
    assert_eq!(report.stopped, vec!["sleeper".to_string()], "{report:?}");
    assert!(report.warnings.is_empty(), "{report:?}");
    assert_eq!(report.namespaces_deleted, namespaces);
    assert!(!pid_alive(pid));
    assert!(!data.exists() && !state_file.exists());
    assert!(dir.path().join("logs/sleeper.log").exists(), "logs are kept");
    assert_gone(&namespaces, &before);
    // Idempotent.
    assert!(teardown_from_state(&state_file).unwrap().nothing_to_do);
}

#[test]
fn non_detached_children_die_with_their_thread() {
    // PR_SET_PDEATHSIG: a test process killed outright must not leave daemons behind.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orphan.log");
    let pid = std::thread::spawn(move || {
        let p = Process::builder("orphan", "sleep", &log).arg("300").spawn().unwrap();
        let pid = p.pid();
        std::mem::forget(p); // no Drop: only the death signal can stop it
        pid
    })
    .join()
    .unwrap();
    eventually_patiently(|| {
        if pid_alive(pid) {
            Err(format!("PID {pid} still alive"))
        } else {
            Ok(())
        }
    });
}

#[test]
fn only_detached_processes_can_be_detached() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::builder("s", "sleep", dir.path().join("s.log"))
        .arg("30")
        .spawn()
        .unwrap();
    let pid = p.pid();
    let err = p.detach().unwrap_err().to_string();
    assert!(err.contains("detached(true)"), "{err}");
    assert!(!pid_alive(pid), "a refused detach drops (and stops) the process");
}

#[test]
fn require_root_is_true_for_root() {
    let root = nix::unistd::geteuid().is_root();
    assert_eq!(require_root(), root && e2e::env::netns_available().is_ok());
}

/// Why `isolation.rs` is a real test: on Linux (weak host model) a listener bound only to an address on
/// another interface *is* reachable from the underlay by anyone routing that address via the host; binding
/// the socket to the device (SO_BINDTODEVICE) is what closes it.
#[test]
fn an_intruder_route_reaches_a_listener_unless_it_is_bound_to_its_device() {
    if !require_root() {
        return;
    }
    let lab = Lab::builder()
        .host("server", ip(1))
        .host("intruder", ip(99))
        .build()
        .unwrap();
    let server = lab.host("server").ns();
    // Stand-in for the TUN device (this kernel has no dummy links): a veth pair kept inside the namespace.
    server
        .ip(["link", "add", "ovl0", "type", "veth", "peer", "name", "ovl1"])
        .unwrap();
    server.ip(["addr", "add", "100.96.0.1/16", "dev", "ovl0"]).unwrap();
    server.ip(["link", "set", "ovl1", "up"]).unwrap();
    server.ip(["link", "set", "ovl0", "up"]).unwrap();
    let intruder = lab.host("intruder").ns();
    intruder
        .ip(["route", "add", "100.96.0.0/16", "via", &ip(1).to_string()])
        .unwrap();

    let overlay = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 96, 0, 1)), 7000);
    let open = server.bind_tcp(overlay).unwrap();
    intruder
        .tcp_connect(overlay)
        .expect("address-only binding is reachable from the underlay");
    drop(open);

    // A fresh port: the first listener's accepted connection may still hold 7000 (TIME_WAIT), and a plain
    // std listener does not set SO_REUSEADDR.
    let overlay = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 96, 0, 1)), 7001);
    let bound = server.bind_tcp(overlay).unwrap();
    let dev = b"ovl0\0";
    // SAFETY: valid fd, valid NUL-terminated buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&bound),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            libc::socklen_t::try_from(dev.len()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "SO_BINDTODEVICE: {}", std::io::Error::last_os_error());
    let err = intruder
        .tcp_connect(overlay)
        .expect_err("device-bound listener must not be reachable");
    assert!(err.contains("failed"), "{err}");
}
