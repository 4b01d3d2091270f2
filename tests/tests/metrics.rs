//! End-to-end: the coordinator's and the agents' Prometheus endpoints report what an operator watches, with
//! the series docs/metrics.md documents; the alert rules and the dashboard in deploy/ parse and use only
//! documented metrics. The end-to-end tests need root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use e2e::scrape::{self, AGENT_METRICS, COORDINATOR_METRICS};
use e2e::{Fleet, FleetOptions, eventually_patiently, require_root};

/// `GET path` from inside the coordinator's namespace (the endpoint listens on its loopback): the whole
/// HTTP response.
fn get(fleet: &Fleet, path: &str) -> Result<String, String> {
    e2e::scrape::http_get(fleet.coordinator_ns(), "127.0.0.1:9464", path)
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

fn repo_file(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn alert_rules_and_dashboard_parse_and_use_documented_metrics() {
    let documented = scrape::documented_names(&repo_file("docs/metrics.md"));
    assert!(documented.contains("nimbus_agents_connected"), "{documented:?}");

    let rules: serde_norway::Value =
        serde_norway::from_str(&repo_file("deploy/prometheus/nimbus-alerts.yaml")).unwrap();
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert").to_string();
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
            let used = scrape::expr_names(expr);
            assert!(
                !used.is_empty() || expr.contains("up{"),
                "{name}: no nimbus metric in {expr}"
            );
            for m in used {
                assert!(
                    documented.contains(&m),
                    "{name} uses {m}, which docs/metrics.md does not list"
                );
            }
            assert!(rule["labels"]["severity"].as_str().is_some(), "{name}: no severity");
            alerts.push(name);
        }
    }
    for required in ["NimbusNodeLost", "NimbusRttBudgetBreached", "NimbusRolloutAborted"] {
        assert!(alerts.iter().any(|a| a == required), "{required} missing: {alerts:?}");
    }

    let dashboard: serde_json::Value = serde_json::from_str(&repo_file("deploy/grafana/nimbus-fleet.json")).unwrap();
    assert!(dashboard["title"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = 0;
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            exprs += 1;
            for m in scrape::expr_names(expr) {
                assert!(
                    documented.contains(&m),
                    "panel {} uses {m}, not in docs/metrics.md",
                    p["title"]
                );
            }
        }
    }
    assert!(exprs >= 10, "{exprs} queries");
    let all: String = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for needed in [
        "nimbus_nodes",
        "nimbus_enrollments_total",
        "nimbus_wireguard_handshakes_total",
        "nimbus_probe_rtt",
        "nimbus_rollout_nodes",
        "nimbus_rpc_duration_seconds_bucket",
    ] {
        assert!(all.contains(needed), "the dashboard shows no {needed}");
    }
}

/// A run with two agents: both endpoints have the documented series with values that fit the run.
#[test]
fn scraped_series_fit_a_running_fleet() {
    if !require_root() {
        return;
    }
    const N: usize = 2;
    let mut opts = FleetOptions::test(N);
    opts.coordinator_args.extend(
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
    let mut fleet = Fleet::new(opts).unwrap();
    let token = fleet.create_token("1h", N as u32);
    for i in 1..=N {
        fleet.start_agent(i, Some(&token), &[]);
    }
    let names: Vec<String> = (1..=N).map(e2e::agent_name).collect();
    fleet.wait_connected(&names);
    let documented = scrape::documented_names(&repo_file("docs/metrics.md"));
    let n = N as f64;

    eventually_patiently(|| {
        let text = scrape::scrape(fleet.coordinator_ns(), COORDINATOR_METRICS)?;
        let check = |what: &str, ok: bool| if ok { Ok(()) } else { Err(format!("{what} in:\n{text}")) };
        let get = |name: &str, labels: &[(&str, &str)]| scrape::sample(&text, name, labels).unwrap_or(-1.0);
        check("agents connected", get("nimbus_agents_connected", &[]) == n)?;
        check("active nodes", get("nimbus_nodes", &[("state", "active")]) == n)?;
        check(
            "enrollments accepted",
            get("nimbus_enrollments_total", &[("result", "accepted")]) == n,
        )?;
        check(
            "no refusals",
            scrape::sum(&text, "nimbus_enrollment_refusals_total") == 0.0,
        )?;
        check("handshakes", get("nimbus_wireguard_handshakes_total", &[]) >= n)?;
        for name in &names {
            check(
                "per-node rx bytes",
                get("nimbus_wireguard_peer_rx_bytes_total", &[("node", name)]) > 0.0,
            )?;
        }
        check("heartbeats", get("nimbus_heartbeats_total", &[]) >= n)?;
        check("RTT summary", get("nimbus_probe_rtt_p50_seconds_count", &[]) > 0.0)?;
        check("pairs measured", get("nimbus_probe_pairs_measured", &[]) >= 1.0)?;
        check(
            "rollout phase none",
            get("nimbus_rollout_phase", &[("phase", "none")]) == 1.0,
        )?;
        check("store size", get("nimbus_store_size_bytes", &[]) > 0.0)?;
        check(
            "Enroll RPC histogram",
            get(
                "nimbus_rpc_duration_seconds_count",
                &[
                    ("service", "nimbus.v1.Enrollment"),
                    ("method", "Enroll"),
                    ("code", "OK"),
                ],
            ) >= n,
        )?;
        for name in scrape::family_names(&text) {
            check(&format!("{name} documented"), documented.contains(&name))?;
        }
        Ok(())
    });

    for i in 1..=N {
        eventually_patiently(|| {
            let text = scrape::scrape(fleet.agent_ns(i), AGENT_METRICS)?;
            let check = |what: &str, ok: bool| {
                if ok {
                    Ok(())
                } else {
                    Err(format!("agent {i}: {what} in:\n{text}"))
                }
            };
            let get = |name: &str| scrape::sample(&text, name, &[]).unwrap_or(-1.0);
            check("connected", get("nimbus_agent_connected") == 1.0)?;
            check("stream opened", get("nimbus_agent_streams_opened_total") >= 1.0)?;
            check("heartbeat acks", get("nimbus_agent_heartbeat_ack_seconds_count") >= 1.0)?;
            check("handshakes", get("nimbus_agent_wireguard_handshakes_total") >= 1.0)?;
            check("rx bytes", get("nimbus_agent_wireguard_rx_bytes_total") > 0.0)?;
            check("tx bytes", get("nimbus_agent_wireguard_tx_bytes_total") > 0.0)?;
            check(
                "probe RTT per peer",
                text.contains("nimbus_agent_probe_rtt_p50_seconds{peer="),
            )?;
            check("version", text.contains("nimbus_agent_build_info{version="))?;
            for name in scrape::family_names(&text) {
                check(&format!("{name} documented"), documented.contains(&name))?;
            }
            Ok(())
        });
        let ready = scrape::http_get(fleet.agent_ns(i), AGENT_METRICS, "/readyz").unwrap();
        assert!(ready.contains(" 200 "), "{ready}");
    }
}
