//! A stand-in for `nimbus-coordinator`, `nimbus-agent` and `nimbusctl`, chosen by the file name in argv[0]
//! (the harness's self-tests symlink it under those names). It follows the CLI contract just far enough to
//! exercise the harness: flags, namespaces, logs, exit codes, SIGTERM, JSON from `nimbusctl -o json`.
//!
//! - coordinator: creates `--data-dir` (exit 1 naming it if it cannot), binds a Unix socket at
//!   `--admin-socket`, exits 0 on SIGTERM.
//! - agent: exit 64 "malformed join token" for `nimbus1.zz`; exit 77 if a file `agent-fails` sits next to
//!   argv[0]; otherwise registers `{name, state: connected, netns, ...}` in `<socket dir>/fake-registry`
//!   (found from `--state-dir W/agent-N/state`), marks itself `lost` and exits 0 on SIGTERM.
//! - nimbusctl: `nodes`, `token create`, `token list` over that registry; exit 69 if the socket is missing.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigHandler, Signal, signal};
use serde_json::{Value, json};

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

fn wait_for_sigterm() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    if unsafe { signal(Signal::SIGTERM, SigHandler::Handler(on_term)) }.is_err() {
        eprintln!("fake: cannot install SIGTERM handler");
    }
    while !TERMINATED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--flag value` pairs (flags without a value map to "").
fn flags(args: &[String]) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(name) = args[i].strip_prefix("--") {
            let value = args.get(i + 1).filter(|v| !v.starts_with("--")).cloned();
            if value.is_some() {
                i += 1;
            }
            map.insert(name.to_string(), value.unwrap_or_default());
        }
        i += 1;
    }
    map
}

/// The name of the network namespace we run in (matched by inode against /run/netns).
fn current_netns() -> String {
    let Ok(me) = std::fs::metadata("/proc/self/ns/net") else {
        return "?".into();
    };
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
}

fn coordinator(args: &[String]) -> ExitCode {
    let f = flags(args);
    println!("fake coordinator in netns {} with {}", current_netns(), args.join(" "));
    let data = PathBuf::from(f.get("data-dir").cloned().unwrap_or_default());
    if let Err(e) = std::fs::create_dir_all(&data) {
        eprintln!("error: cannot create data dir {}: {e}", data.display());
        return ExitCode::from(1);
    }
    let socket = PathBuf::from(f.get("admin-socket").cloned().unwrap_or_default());
    let _ = std::fs::remove_file(&socket);
    let _listener = match std::os::unix::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot bind admin socket {}: {e}", socket.display());
            return ExitCode::from(1);
        }
    };
    wait_for_sigterm();
    let _ = std::fs::remove_file(&socket);
    println!("fake coordinator: SIGTERM, bye");
    ExitCode::SUCCESS
}

fn write_node(path: &Path, node: &Value) {
    if let Err(e) = std::fs::write(path, node.to_string()) {
        eprintln!("fake agent: cannot write {}: {e}", path.display());
    }
}

fn agent(argv0: &Path, args: &[String]) -> ExitCode {
    let f = flags(args);
    let netns = current_netns();
    println!("fake agent in netns {netns}");
    let token = f.get("token").cloned();
    if token.as_deref() == Some("nimbus1.zz") {
        eprintln!("error: malformed join token");
        return ExitCode::from(64);
    }
    if argv0.parent().is_some_and(|d| d.join("agent-fails").exists()) {
        eprintln!("error: enrollment refused: token expired");
        return ExitCode::from(77);
    }
    let name = f.get("node-name").cloned().unwrap_or_default();
    let state_dir = PathBuf::from(f.get("state-dir").cloned().unwrap_or_default());
    let work = state_dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let registry = work.join("fake-registry");
    let _ = std::fs::create_dir_all(&registry);
    let index: u32 = name.strip_prefix("agent-").and_then(|n| n.parse().ok()).unwrap_or(0);
    let mut node = json!({
        "id": format!("node-{index}"),
        "name": name,
        "state": "connected",
        "overlay_ip": format!("100.96.0.{}", index + 1),
        "machine_id": f.get("machine-id").cloned().unwrap_or_default(),
        "netns": netns,
        "coordinator": f.get("coordinator").cloned().unwrap_or_default(),
        "has_token": token.is_some(),
        "has_pin": f.contains_key("ca-pin"),
        "tun_name": f.get("tun-name").cloned().unwrap_or_default(),
        "extra": f.get("revocation-check-after").cloned(),
    });
    let path = registry.join(format!("{name}.json"));
    write_node(&path, &node);
    wait_for_sigterm();
    node["state"] = json!("lost");
    write_node(&path, &node);
    println!("fake agent: SIGTERM, bye");
    ExitCode::SUCCESS
}

fn ctl(args: &[String]) -> ExitCode {
    let mut socket = PathBuf::new();
    let mut json_out = false;
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--socket" => {
                socket = PathBuf::from(args.get(i + 1).cloned().unwrap_or_default());
                i += 1;
            }
            "-o" | "--output" => {
                json_out = args.get(i + 1).is_some_and(|v| v == "json");
                i += 1;
            }
            other => rest.push(other.to_string()),
        }
        i += 1;
    }
    if !socket.exists() {
        eprintln!("error: cannot connect to the coordinator at {}", socket.display());
        return ExitCode::from(69);
    }
    let registry = socket.parent().unwrap_or(Path::new("/")).join("fake-registry");
    let words: Vec<&str> = rest.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["nodes"] => {
            let mut nodes: Vec<Value> = std::fs::read_dir(&registry)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| serde_json::from_str(&t).ok())
                .collect();
            nodes.sort_by_key(|n| n["name"].as_str().unwrap_or("").to_string());
            if json_out {
                println!("{}", Value::Array(nodes));
            } else {
                println!("NAME      STATE");
                for n in nodes {
                    println!(
                        "{:<9} {}",
                        n["name"].as_str().unwrap_or(""),
                        n["state"].as_str().unwrap_or("")
                    );
                }
            }
            ExitCode::SUCCESS
        }
        ["token", "create", ..] => {
            let f = flags(&rest);
            println!(
                "{}",
                json!({
                    "token": "nimbus1.fake-secret",
                    "token_id": "tok-1",
                    "ca_pin": format!("sha256:{}", "ab".repeat(32)),
                    "expires_at_unix": 0,
                    "enroll_endpoints": [],
                    "ttl": f.get("ttl"),
                    "uses": f.get("uses"),
                })
            );
            ExitCode::SUCCESS
        }
        ["token", "list"] => {
            println!("[]");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("fake nimbusctl: unsupported {rest:?}");
            ExitCode::from(64)
        }
    }
}

fn main() -> ExitCode {
    let mut all: Vec<String> = std::env::args().collect();
    let argv0 = PathBuf::from(if all.is_empty() { String::new() } else { all.remove(0) });
    match argv0.file_name().and_then(|n| n.to_str()).unwrap_or("") {
        "nimbus-coordinator" => coordinator(&all),
        "nimbus-agent" => agent(&argv0, &all),
        "nimbusctl" => ctl(&all),
        other => {
            eprintln!("nimbus-e2e-fake: run me as nimbus-coordinator, nimbus-agent or nimbusctl, not {other:?}");
            ExitCode::from(64)
        }
    }
}
