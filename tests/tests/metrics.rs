//! End-to-end: the coordinator's Prometheus endpoint reports what an operator watches.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use e2e::{Fleet, eventually_patiently, require_root};

/// `GET path` from inside the coordinator's namespace (the endpoint listens on its loopback): the whole
/// HTTP response.
fn get(fleet: &Fleet, path: &str) -> Result<String, String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    fleet
        .coordinator_ns()
        .run_in(move || -> Result<String, String> {
            let mut s = TcpStream::connect("127.0.0.1:9464").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
            let mut body = String::new();
            s.read_to_string(&mut body).map_err(|e| e.to_string())?;
            Ok(body)
        })
        .map_err(|e| e.to_string())?
}

fn has(text: &str, line: &str) -> Result<(), String> {
    if text.lines().any(|l| l == line) {
        Ok(())
    } else {
        Err(format!("no `{line}` in:\n{text}"))
    }
}

#[test]
fn metrics_count_enrollments_connections_and_peers() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2);
    let token = fleet.create_token("1h", 1);
    fleet.start_agent(1, Some(&token), &[]);
    fleet.wait_connected(&["agent-1"]);
    fleet.start_agent(2, Some(&token), &[]);
    fleet.expect_agent_exit(2, 77, "no uses left");

    eventually_patiently(|| {
        let text = get(&fleet, "/metrics")?;
        if !text.starts_with("HTTP/1.") || !text.contains("200 OK") {
            return Err(format!("not a 200 response: {text}"));
        }
        has(&text, "nimbus_enrollments_total{result=\"accepted\"} 1")?;
        has(&text, "nimbus_enrollments_total{result=\"refused\"} 1")?;
        has(&text, "nimbus_agents_connected 1")?;
        has(&text, "nimbus_nodes{state=\"active\"} 1")?;
        has(&text, "nimbus_wireguard_peers 1")?;
        has(
            &text,
            "nimbus_wireguard_dropped_packets_total{reason=\"spoofed_source\"} 0",
        )
    });

    // The supervisor's probes: alive, and ready because the store answers.
    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let text = get(&fleet, path).unwrap();
        assert!(text.starts_with("HTTP/1.") && text.contains(" 200 "), "{path}: {text}");
        assert_eq!(
            text.rsplit("\r\n\r\n").next(),
            Some(format!("{body}\n").as_str()),
            "{path}: {text}"
        );
    }
    let text = get(&fleet, "/nothing").unwrap();
    assert!(text.contains(" 404 "), "{text}");
}
