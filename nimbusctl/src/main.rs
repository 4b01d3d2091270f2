//! `nimbusctl`: the operator's CLI over the coordinator's admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets};
use hyper_util::rt::TokioIo;
use nimbus_proto::admin_client::AdminClient;
use nimbus_proto::*;
use tonic::transport::{Channel, Endpoint};

mod hardware;
mod latency_view;

/// Operate a polynimbus fleet through the coordinator's admin API.
///
/// Examples:
///   nimbusctl token create --ttl 1h --uses 3 --labels env=prod
///   nimbusctl nodes
///   nimbusctl -o json node show agent-1
///   nimbusctl node revoke agent-1 --reason "host retired"
#[derive(Parser, Debug)]
#[command(name = "nimbusctl", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Admin socket of the coordinator (mode 0600: run as the coordinator's user or root).
    #[arg(
        long,
        global = true,
        env = "NIMBUS_ADMIN_SOCKET",
        default_value = "/run/nimbus/admin.sock"
    )]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Output {
    Text,
    Json,
    /// Helm values (`plan replication` only).
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Join tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List nodes: NAME, ID, OVERLAY-IP, STATE (connected/lost/revoked), LAST-SEEN, VERSION, CPUS, MEMORY.
    Nodes {
        /// Also PLATFORM, INSTANCE-TYPE, ZONE and a disk summary (e.g. `2×1.7T nvme-local`).
        #[arg(long)]
        wide: bool,
    },
    /// One node: show or revoke.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Measured round-trip times between nodes on the underlay: a matrix of p50/p99 in ms, grouped by zone
    /// and colored against the 2 ms zone budget (on a terminal); `-o json` for every window field.
    Latency {
        /// Also write the p50 matrix as an SVG heatmap to this file (for reports).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Plans from measured latency.
    #[command(subcommand)]
    Plan(PlanCmd),
}

#[derive(Subcommand, Debug)]
enum PlanCmd {
    /// Plan replicated stores (Galera, MySQL semi-sync, Kafka) against the measured p99 RTTs: predicted commit
    /// latency, which members can be synchronous, max serial transaction rate, timeouts, zone capacity.
    /// `-o yaml` prints helm values.
    Replication {
        /// The stores file (see planner/examples/stores.yaml).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Keep the file: the coordinator re-plans every probe window and warns (log + metric) on drift.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token. Prints the token (shown only once; the coordinator keeps a hash) and the CA pin agents need.
    Create {
        /// Lifetime, e.g. 30m, 1h, 7d (at most 30 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels given to nodes enrolled with it: k=v, repeat or separate with commas.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Free-text note shown in `token list`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id so it can no longer be used.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Everything known about a node.
    Show { name: String },
    /// Revoke a node: it is told to stop, its WireGuard peer is removed and its key can never enroll again.
    Revoke {
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label `{s}` must look like key=value")),
    }
}

async fn connect(socket: &Path) -> Result<AdminClient<Channel>> {
    if !socket.exists() {
        bail!(
            "admin socket {} does not exist: is nimbus-coordinator running? (set --socket or NIMBUS_ADMIN_SOCKET)",
            socket.display()
        );
    }
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://admin.local")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot connect to {} (permission denied means: run as root or the coordinator's user)",
                socket.display()
            )
        })?;
    Ok(AdminClient::new(channel))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn ago(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = now.saturating_sub(unix);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn when(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn mem(bytes: u64) -> String {
    if bytes == 0 {
        return "-".into();
    }
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    t
}

fn node_json(n: &Node) -> serde_json::Value {
    serde_json::json!({
        "id": n.id, "name": n.name, "overlay_ip": n.overlay_ip, "state": n.state,
        "last_seen_unix": n.last_seen_unix, "agent_version": n.agent_version, "hostname": n.hostname,
        "machine_id": n.machine_id, "wg_public_key": n.wg_public_key, "enrolled_at_unix": n.enrolled_at_unix,
        "labels": n.labels, "underlay_endpoint": n.underlay_endpoint, "rx_bytes": n.rx_bytes, "tx_bytes": n.tx_bytes,
        "handshake_age_secs": n.handshake_age_secs,
        "inventory": n.inventory.as_ref().map(|i| serde_json::json!({
            "hostname": i.hostname, "cpus": i.cpus, "memory_bytes": i.memory_bytes, "kernel": i.kernel, "os_release": i.os_release,
        })),
        "platform": n.platform, "instance_type": n.instance_type, "region": n.region, "zone": n.zone,
        "disk_summary": n.disk_summary,
        "hardware": hardware::document(&n.inventory_document),
        "inventory_updated_unix": n.inventory_updated_unix,
        "inventory_history": n.inventory_history.iter().map(|c| serde_json::json!({"at_unix": c.at_unix, "changes": c.changes})).collect::<Vec<_>>(),
    })
}

fn token_json(t: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "created_at_unix": t.created_at_unix, "expires_at_unix": t.expires_at_unix,
        "uses_total": t.uses_total, "uses_left": t.uses_left, "revoked": t.revoked, "labels": t.labels,
        "description": t.description,
    })
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let mut c = connect(&cli.socket).await?;
    let json = cli.output == Output::Json;
    if cli.output == Output::Yaml && !matches!(cli.cmd, Cmd::Plan(_)) {
        bail!("-o yaml is only for `plan replication`; use -o json");
    }
    match cli.cmd {
        Cmd::Token(TokenCmd::Create {
            ttl,
            uses,
            labels,
            description,
        }) => {
            let r = c
                .create_token(CreateTokenRequest {
                    ttl_secs: ttl.as_secs().max(1),
                    uses,
                    labels: labels.into_iter().collect(),
                    description,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&serde_json::json!({
                    "token": r.token, "token_id": r.token_id, "ca_pin": r.ca_pin,
                    "expires_at_unix": r.expires_at_unix, "enroll_endpoints": r.enroll_endpoints,
                }));
            }
            let endpoint = r
                .enroll_endpoints
                .first()
                .cloned()
                .unwrap_or_else(|| "COORDINATOR:7443".into());
            println!("token:    {}", r.token);
            println!("ca-pin:   {}", r.ca_pin);
            println!("token-id: {}", r.token_id);
            println!("expires:  {} ({} uses)", when(r.expires_at_unix), uses);
            println!();
            println!("This token is a secret, shown only now. Enroll a host with:");
            println!(
                "  nimbus-agent --coordinator {endpoint} --ca-pin {} --token {}",
                r.ca_pin, r.token
            );
        }
        Cmd::Token(TokenCmd::List) => {
            let r = c
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&serde_json::Value::Array(r.tokens.iter().map(token_json).collect()));
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut t = table(&["ID", "STATE", "USES-LEFT", "EXPIRES", "LABELS", "DESCRIPTION"]);
            for tok in &r.tokens {
                let state = if tok.revoked {
                    "revoked"
                } else if tok.expires_at_unix <= now {
                    "expired"
                } else if tok.uses_left == 0 {
                    "used-up"
                } else {
                    "valid"
                };
                let labels: Vec<String> = tok.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                t.add_row(vec![
                    tok.id.clone(),
                    state.into(),
                    format!("{}/{}", tok.uses_left, tok.uses_total),
                    when(tok.expires_at_unix),
                    labels.join(","),
                    tok.description.clone(),
                ]);
            }
            println!("{t}");
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            let r = c
                .revoke_token(RevokeTokenRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            let tok = r.token.unwrap_or_default();
            if json {
                return print_json(&token_json(&tok));
            }
            println!("token {} revoked", tok.id);
        }
        Cmd::Nodes { wide } => {
            let r = c
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&serde_json::Value::Array(r.nodes.iter().map(node_json).collect()));
            }
            let mut header = vec![
                "NAME",
                "ID",
                "OVERLAY-IP",
                "STATE",
                "LAST-SEEN",
                "VERSION",
                "CPUS",
                "MEMORY",
            ];
            if wide {
                header.extend(["PLATFORM", "INSTANCE-TYPE", "ZONE", "DISKS"]);
            }
            let mut t = table(&header);
            for n in &r.nodes {
                let inv = n.inventory.clone().unwrap_or_default();
                let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                let wide_cols = [
                    dash(&n.platform),
                    dash(&n.instance_type),
                    dash(&n.zone),
                    dash(&n.disk_summary),
                ];
                let mut row = vec![
                    n.name.clone(),
                    n.id.clone(),
                    n.overlay_ip.clone(),
                    n.state.clone(),
                    ago(n.last_seen_unix),
                    n.agent_version.clone(),
                    if inv.cpus == 0 {
                        "-".into()
                    } else {
                        inv.cpus.to_string()
                    },
                    mem(inv.memory_bytes),
                ];
                if wide {
                    row.extend(wide_cols);
                }
                t.add_row(row);
            }
            println!("{t}");
        }
        Cmd::Plan(PlanCmd::Replication { file, keep }) => {
            let stores_yaml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = c
                .plan_replication(PlanRequest { stores_yaml, keep })
                .await
                .map_err(status_err)?
                .into_inner();
            match cli.output {
                Output::Yaml => print!("{}", r.helm_yaml),
                Output::Json => println!("{}", r.json),
                Output::Text => print!("{}", r.text),
            }
        }
        Cmd::Latency { svg } => {
            let m = c.latency(LatencyRequest {}).await.map_err(status_err)?.into_inner();
            if let Some(path) = svg {
                std::fs::write(&path, latency_view::svg(&m)).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("heatmap written to {}", path.display());
            }
            if json {
                let pairs: Vec<serde_json::Value> = m
                    .pairs
                    .iter()
                    .map(|p| {
                        let w = p.window.clone().unwrap_or_default();
                        serde_json::json!({
                            "from": p.from_node, "to": p.to_node,
                            "from_zone": m.zones.get(&p.from_node), "to_zone": m.zones.get(&p.to_node),
                            "start_unix_ms": w.start_unix_ms, "duration_ms": w.duration_ms,
                            "sent": w.sent, "samples": w.samples, "lost": w.lost, "late": w.late,
                            "min_ns": w.min_ns, "p50_ns": w.p50_ns, "p90_ns": w.p90_ns, "p99_ns": w.p99_ns,
                            "max_ns": w.max_ns, "mean_ns": w.mean_ns, "jitter_ns": w.jitter_ns,
                            "timestamping": w.timestamping,
                        })
                    })
                    .collect();
                return print_json(&serde_json::json!({
                    "pairs": pairs, "zones": m.zones, "zone_sources": m.zone_sources, "findings": m.findings,
                }));
            }
            print!(
                "{}",
                latency_view::matrix(&m, std::io::IsTerminal::is_terminal(&std::io::stdout()))
            );
        }
        Cmd::Node(NodeCmd::Show { name }) => {
            let n = c
                .get_node(GetNodeRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&node_json(&n));
            }
            let inv = n.inventory.clone().unwrap_or_default();
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for (k, v) in [
                ("name", n.name.clone()),
                ("id", n.id.clone()),
                ("state", n.state.clone()),
                ("overlay-ip", n.overlay_ip.clone()),
                ("underlay-endpoint", n.underlay_endpoint.clone()),
                ("wg-public-key", n.wg_public_key.clone()),
                ("last-seen", ago(n.last_seen_unix)),
                (
                    "last-handshake",
                    if n.handshake_age_secs == 0 {
                        "-".into()
                    } else {
                        format!("{}s ago", n.handshake_age_secs)
                    },
                ),
                ("rx/tx", format!("{} / {} bytes", n.rx_bytes, n.tx_bytes)),
                ("enrolled", when(n.enrolled_at_unix)),
                ("agent-version", n.agent_version.clone()),
                ("hostname", n.hostname.clone()),
                ("machine-id", n.machine_id.clone()),
                ("labels", labels.join(",")),
                ("cpus", inv.cpus.to_string()),
                ("memory", mem(inv.memory_bytes)),
                ("kernel", inv.kernel.clone()),
                ("os", inv.os_release.clone()),
            ] {
                println!("{k:<18} {v}");
            }
            match hardware::document(&n.inventory_document) {
                Some(doc) => {
                    print!("{}", hardware::render(&doc));
                    println!("{:<18} {}", "inventory-updated", when(n.inventory_updated_unix));
                    for c in n.inventory_history.iter().take(5) {
                        println!("{:<18} {} {}", "change", when(c.at_unix), c.changes.join(", "));
                    }
                }
                None => println!("{:<18} not reported yet", "hardware"),
            }
        }
        Cmd::Node(NodeCmd::Revoke { name, reason }) => {
            let r = c
                .revoke_node(RevokeNodeRequest { name, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            let n = r.node.unwrap_or_default();
            if json {
                return print_json(&serde_json::json!({"node": node_json(&n), "was_connected": r.was_connected}));
            }
            let how = if r.was_connected {
                "it was told to stop"
            } else {
                "it was offline and will learn it when it next tries to connect"
            };
            println!("node {} revoked; {how}", n.name);
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nimbusctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
