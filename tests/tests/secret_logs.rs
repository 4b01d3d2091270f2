//! End-to-end: with `--log-format json` at debug level, a coordinator and an agent write only JSON lines, and
//! no line holds a secret: the join token (or its secret part), the agent's or the coordinator's WireGuard
//! private key, any private key under the coordinator's data directory (CA, TLS), or a probe key (which lives
//! only in memory: no line may carry a `key` field with key bytes).
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::scrape::json_debug_logs;
use e2e::{Attempt, Fleet, Process, agent_name, patience, poll_until, require_root};

/// The `.key` files under `dir`, recursively.
fn key_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            key_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "key") {
            out.push(p);
        }
    }
}

/// What must never appear in a log, from a key file: each base64 line of a PEM body, or the whole trimmed
/// content of a raw (base64) key.
fn secrets_of(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    if text.contains("-----BEGIN") {
        text.lines()
            .filter(|l| !l.starts_with("-----") && l.trim().len() >= 16)
            .map(|l| l.trim().to_string())
            .collect()
    } else {
        vec![text.trim().to_string()]
    }
}

fn check_log(name: &str, log: &str, secrets: &[(String, String)]) {
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: a log line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "{name}: a log line is not a JSON object: {line}");
        for (what, secret) in secrets {
            assert!(!line.contains(secret.as_str()), "{name} logged {what}: {line}");
        }
        // A probe key's Debug form is a byte list; its Display form is redacted.
        assert!(
            !(line.contains("\"key\":[") || line.contains("key: [")),
            "{name} logged key bytes: {line}"
        );
    }
    assert!(
        lines > 10,
        "{name}: only {lines} log lines; was it at debug level?\n{log}"
    );
}

#[test]
fn json_logs_hold_no_secrets() {
    if !require_root() {
        return;
    }
    let fleet = Fleet::setup(1);
    let data_dir = fleet.coordinator_data_dir();
    std::fs::create_dir_all(data_dir.parent().unwrap()).unwrap();
    let mut args = json_debug_logs(fleet.coordinator_args(&data_dir));
    args.extend(
        [
            "--heartbeat-interval",
            "1s",
            "--probe-interval",
            "200ms",
            "--probe-window",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let coordinator_log = fleet.log_dir().join("secret-logs-coordinator.log");
    std::fs::create_dir_all(fleet.log_dir()).unwrap();
    let coordinator = Process::builder("coordinator", &fleet.bins().coordinator, &coordinator_log)
        .netns(fleet.coordinator_ns())
        .args(&args)
        .spawn()
        .unwrap();
    poll_until(
        "the coordinator to answer",
        patience(),
        Duration::from_millis(200),
        || {
            if let Some(s) = coordinator.try_status() {
                return Attempt::Fail(format!("coordinator exited ({s:?}):\n{}", coordinator.log()));
            }
            match fleet.try_ctl_json(&["nodes"]) {
                Ok(_) => Attempt::Done(()),
                Err(e) => Attempt::Retry(e.to_string()),
            }
        },
    )
    .unwrap();

    let token = fleet.create_token("1h", 1);
    let state_dir = fleet.agent_state_dir(1);
    std::fs::create_dir_all(&state_dir).unwrap();
    let agent_log = fleet.log_dir().join("secret-logs-agent-1.log");
    let agent = Process::builder(agent_name(1), &fleet.bins().agent, &agent_log)
        .netns(fleet.agent_ns(1))
        .args(json_debug_logs(fleet.agent_args(1, Some(&token), &[])))
        .spawn()
        .unwrap();
    // Enrolled, connected, and a few heartbeats exchanged.
    poll_until(
        "the agent to connect and heartbeat",
        patience(),
        Duration::from_millis(300),
        || {
            if let Some(s) = agent.try_status() {
                return Attempt::Fail(format!("agent exited ({s:?}):\n{}", agent.log()));
            }
            match fleet.try_nodes() {
                Ok(nodes)
                    if nodes.iter().any(|n| n["state"] == "connected") && agent.log().contains("fleet stream open") =>
                {
                    // Heartbeats every second: a few of them, and the probe configuration.
                    std::thread::sleep(Duration::from_secs(4));
                    Attempt::Done(())
                }
                Ok(_) => Attempt::Retry("not connected yet".into()),
                Err(e) => Attempt::Retry(e.to_string()),
            }
        },
    )
    .unwrap();
    agent.stop(Duration::from_secs(10));
    coordinator.stop(Duration::from_secs(10));

    let mut secrets: Vec<(String, String)> = Vec::new();
    secrets.push(("the join token".into(), token.token.clone()));
    let token_secret = token.token.rsplit('.').next().unwrap().to_string();
    assert!(token_secret.len() >= 16, "token secret {token_secret:?}");
    secrets.push(("the join token's secret".into(), token_secret));
    for s in secrets_of(&state_dir.join("wg.key")) {
        secrets.push(("the agent's WireGuard private key".into(), s));
    }
    let mut keys = Vec::new();
    key_files(&data_dir, &mut keys);
    assert!(
        keys.iter().any(|k| k.ends_with("wg.key")) && keys.iter().any(|k| k.ends_with("ca.key")),
        "the coordinator's key files: {keys:?}"
    );
    for k in &keys {
        for s in secrets_of(k) {
            secrets.push((format!("{} (private key)", k.display()), s));
        }
    }
    check_log(
        "the coordinator",
        &std::fs::read_to_string(&coordinator_log).unwrap(),
        &secrets,
    );
    check_log("the agent", &std::fs::read_to_string(&agent_log).unwrap(), &secrets);
}
