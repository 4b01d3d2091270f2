//! Coordinator scale: the real coordinator in-process, thousands of simulated agents on real gRPC Fleet streams.
//!
//! What is measured, exactly: `coordinator::start` runs inside a fresh network namespace (TUN `nimbus0`, sled
//! store). The nodes are created through the real `State::enroll` (one join token). The production Fleet
//! listener is bound to the TUN device, so the simulated agents cannot reach it without WireGuard; the bench
//! serves a second copy of the production `coordinator::fleet::FleetService` (same `Ctx`, same metrics layer,
//! same HTTP/2 keepalives) on 100.96.0.1:17000 over `lo`, with the overlay /16 routed as local. Each simulated
//! agent binds its socket to its node's overlay address, so the service identifies it by source address as in
//! production. The agents run in a CHILD process (this binary re-executed with `NIMBUS_BENCH_SIM` set), so
//! the coordinator's CPU and RSS are this process's own figures.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nimbus_proto::agent_message::Msg as AgentMsg;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::fleet_client::FleetClient;
use nimbus_proto::{AgentMessage, Heartbeat, Hello, Inventory};
use serde_json::json;

use crate::report::Table;
use crate::sim;

/// Environment variable that turns this section into the agent simulator (child process); its value is the
/// path of the plan file.
const SIM_ENV: &str = "NIMBUS_BENCH_SIM";
/// The bench's own Fleet listener (port differs from production's 7000, which stays bound to the TUN device).
const FLEET_PORT: u16 = 17000;
/// Heartbeat interval, as the issue asks (production default too).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Connections being set up at once by the simulator.
const CONNECT_CONCURRENCY: usize = 128;

pub fn run(quick: bool) -> anyhow::Result<Vec<Table>> {
    if let Ok(plan) = std::env::var(SIM_ENV) {
        // Child: simulate the agents, then leave without printing tables.
        let code = match simulate(&plan) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("agent simulator: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    let (sizes, measure): (&[usize], Duration) = if quick {
        (&[1_000], Duration::from_secs(20))
    } else {
        // Two heartbeats per agent (20 000 samples at 10 000 agents) keep the whole harness under 10 minutes.
        (&[1_000, 5_000, 10_000], Duration::from_secs(20))
    };
    let mut table = Table::new(
        "Coordinator scale (simulated agents on real gRPC Fleet streams)",
        &[
            "agents",
            "connected",
            "heartbeat ack p50 ms",
            "p99 ms",
            "p99 ÷ idle p50 (idle p50/p99 ms)",
            "coordinator CPU (% of 1 core)",
            "RSS per agent KB",
            "store per agent KB",
            "connect s",
            "State::enroll /s",
        ],
    );
    for &n in sizes {
        match sim::in_namespace("scale", move || one_size(n, measure)) {
            Ok(row) => table.row(row),
            Err(e) => {
                table.row(vec![n.to_string(), format!("failed: {e:#}")]);
                break;
            }
        }
    }
    table.note(format!(
        "Path measured: in-process `coordinator::start` (sled, TUN in a namespace) + the production \
         `FleetService` served a second time on 100.96.0.1:{FLEET_PORT} over `lo` (no WireGuard on this path; \
         the TUN-bound production listener is untouched). Agents: separate process, one HTTP/2 connection each, \
         bound to the node's overlay address; Hello, one Inventory (summary, no hardware document), heartbeats \
         every {} s at random phase. Latency = Heartbeat sent → HeartbeatAck received by the agent, over a {} s \
         window after all agents connected. Idle reference: one agent, 30 sequential heartbeats before the others connect \
         (same run). CPU and RSS are the coordinator process's own (/proc/self); RSS per agent = (RSS at end of \
         window − RSS after enrollment, before any stream) ÷ agents. Store = sled directory size ÷ agents. \
         No tracing subscriber is installed, so log formatting costs are not included.",
        HEARTBEAT.as_secs(),
        measure.as_secs()
    ));
    table.note(
        "Goal (issue 12): 10 000 agents on 2 cores, p99 under 50 ms, under 100 KB per agent. The knee is where p99 \
         leaves the idle p50 by more than a few times, or connected < agents.",
    );
    Ok(vec![table])
}

/// One fleet size against a fresh coordinator; returns the table row.
fn one_size(n: usize, measure: Duration) -> anyhow::Result<Vec<String>> {
    sim::raise_nofile()?;
    let rt = sim::runtime("coordinator", 2)?;
    let ns_ip = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip").args(args).output().context("running ip")?;
        anyhow::ensure!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let coord = rt.block_on(sim::Coord::start())?;
    let ctx = Arc::clone(&coord.running.ctx);
    // Nodes through the real State (one join token, as an operator would hand out for a rollout).
    let t0 = Instant::now();
    let nodes: Vec<(Ipv4Addr, String)> = rt.block_on(async {
        let state = Arc::clone(&ctx.state);
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(Ipv4Addr, String)>> {
            let (token, _) = state
                .create_token(
                    Duration::from_secs(3600),
                    u32::try_from(n).unwrap_or(u32::MAX),
                    Default::default(),
                    "bench".into(),
                    std::time::SystemTime::now(),
                )
                .context("creating a join token")?;
            let secret = token.to_string_secret();
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let key = tunnel::keys::public_key_of(&tunnel::keys::generate_secret());
                let input = coordinator::state::EnrollInput {
                    public_key_b64url: coordinator::context::key_id(&key),
                    hostname: format!("sim-{i}"),
                    machine_id: format!("{i:032x}"),
                    agent_version: coordinator::VERSION.into(),
                    requested_name: String::new(),
                    macs: Vec::new(),
                };
                let node = state
                    .enroll(&secret, input, std::time::SystemTime::now())
                    .with_context(|| format!("enrolling simulated node {i}"))?;
                out.push((node.overlay_ip, node.id));
            }
            Ok(out)
        })
        .await
        .context("enrollment task")?
    })?;
    let enroll_rate = n as f64 / t0.elapsed().as_secs_f64();
    // The overlay range is local on lo, so agents can bind their overlay address; the bench's listener is on lo.
    ns_ip(&["route", "add", "local", "100.96.0.0/16", "dev", "lo", "table", "local"])?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::from((ctx.coordinator_ip, FLEET_PORT)))?;
        let listener = sock.listen(4096)?;
        let svc = coordinator::fleet::FleetService::new(Arc::clone(&ctx), stop_rx.clone());
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(15)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(coordinator::metrics::RpcMetricsLayer::new(ctx.metrics.clone()))
            .add_service(nimbus_proto::fleet_server::FleetServer::new(svc));
        let mut rx = stop_rx;
        anyhow::Ok(tokio::spawn(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = rx.changed().await;
            },
        )))
    })?;
    // Give the allocator a moment to settle, then take the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = sim::process_rss();

    let plan_path = coord.dir.path().join("sim-plan.json");
    let plan = json!({
        "target": SocketAddr::from((ctx.coordinator_ip, FLEET_PORT)).to_string(),
        "version": coordinator::VERSION,
        "measure_ms": measure.as_millis() as u64,
        "nodes": nodes.iter().map(|(ip, id)| json!([ip.to_string(), id])).collect::<Vec<_>>(),
    });
    std::fs::write(&plan_path, serde_json::to_vec(&plan)?).context("writing the simulator plan")?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .args(["--only", "coordinator-scale"])
        .env(SIM_ENV, &plan_path)
        // Closed by this side once it has read the coordinator's session count after SIM-DONE: the
        // simulator keeps its streams open until then.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agent simulator process")?;
    let child_pid = child.id();
    let mut hold_streams = child.stdin.take();
    let stdout = child.stdout.take().context("simulator stdout")?;
    let mut ready: Option<(Instant, Duration, f64)> = None;
    let mut done: Option<(Instant, Duration, u64, usize, serde_json::Value)> = None;
    // The simulator prints READY/DONE lines; bound the whole wait.
    let deadline = Instant::now() + measure + Duration::from_secs(240);
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    while done.is_none() && Instant::now() < deadline {
        let Ok(line) = line_rx.recv_timeout(Duration::from_millis(200)) else {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            continue;
        };
        if let Some(rest) = line.strip_prefix("SIM-READY ") {
            let secs: f64 = rest.trim().parse().unwrap_or(f64::NAN);
            ready = Some((Instant::now(), sim::process_cpu(), secs));
        } else if let Some(rest) = line.strip_prefix("SIM-DONE ") {
            let v: serde_json::Value = serde_json::from_str(rest).context("simulator result")?;
            done = Some((
                Instant::now(),
                sim::process_cpu(),
                sim::process_rss(),
                ctx.sessions.connected_count(),
                v,
            ));
            // Counted: the simulator may close its streams now.
            drop(hold_streams.take());
        }
    }
    if done.is_none() {
        // SAFETY: kill on the PID of the child this function started and has not reaped yet.
        unsafe { libc::kill(i32::try_from(child_pid).unwrap_or(0), libc::SIGKILL) };
    }
    let status = child.wait().context("waiting for the simulator")?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = stop_tx.send(true);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    });
    let store_dir = coord.store_dir();
    let _dir = rt.block_on(coord.stop());
    let store = sim::dir_size(&store_dir);
    drop(rt);
    let (Some((t_ready, cpu_ready, connect_s)), Some((t_done, cpu_done, rss_done, sessions, v))) = (ready, done) else {
        anyhow::bail!(
            "the simulator did not finish ({status}); its stderr: {}",
            err.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    };
    let cpu_pct = (cpu_done - cpu_ready).as_secs_f64() / (t_done - t_ready).as_secs_f64() * 100.0;
    let lat = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    let (p50, p99) = (lat("p50_ms"), lat("p99_ms"));
    let (idle_p50, idle_p99) = (lat("idle_p50_ms"), lat("idle_p99_ms"));
    let acks = v.get("acks").and_then(serde_json::Value::as_u64).unwrap_or(0);
    let lost = v.get("lost").and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok(vec![
        n.to_string(),
        format!("{sessions} ({acks} acks, {lost} unanswered)"),
        format!("{p50:.2}"),
        format!("{p99:.2}"),
        format!("{:.1}× ({idle_p50:.2}/{idle_p99:.2})", p99 / idle_p50),
        format!("{cpu_pct:.1}"),
        format!("{:.1}", rss_done.saturating_sub(rss_before) as f64 / n as f64 / 1024.0),
        format!("{:.2}", store as f64 / n as f64 / 1024.0),
        format!("{connect_s:.1}"),
        format!("{enroll_rate:.0}"),
    ])
}

// ---- the agent simulator (child process) ----

struct Shared {
    measuring: std::sync::atomic::AtomicBool,
    lat_us: std::sync::Mutex<Vec<u32>>,
    sent: AtomicUsize,
    acked: AtomicUsize,
    connected: AtomicUsize,
}

fn simulate(plan_path: &str) -> anyhow::Result<()> {
    sim::raise_nofile()?;
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plan_path).with_context(|| format!("reading {plan_path}"))?)?;
    let target: SocketAddr = plan["target"].as_str().context("plan: target")?.parse()?;
    let version = plan["version"].as_str().context("plan: version")?.to_string();
    let measure = Duration::from_millis(plan["measure_ms"].as_u64().context("plan: measure_ms")?);
    let nodes: Vec<(Ipv4Addr, String)> = plan["nodes"]
        .as_array()
        .context("plan: nodes")?
        .iter()
        .filter_map(|n| Some((n.get(0)?.as_str()?.parse().ok()?, n.get(1)?.as_str()?.to_string())))
        .collect();
    let rt = sim::runtime("sim-agent", 2)?;
    rt.block_on(async move {
        let shared = Arc::new(Shared {
            measuring: false.into(),
            lat_us: Default::default(),
            sent: 0.into(),
            acked: 0.into(),
            connected: 0.into(),
        });
        // Reference: one agent, sequential heartbeats before anyone else is connected.
        let (ip0, id0) = nodes.first().context("no nodes in the plan")?.clone();
        let mut idle = Vec::new();
        {
            let (tx, mut inbound) = open(target, ip0, &id0, &version).await?;
            for seq in 0..30u64 {
                let t = Instant::now();
                tx.send(AgentMessage {
                    msg: Some(AgentMsg::Heartbeat(Heartbeat { seq })),
                })
                .await?;
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
                        Ok(Ok(Some(m))) => {
                            if let Some(CoordMsg::HeartbeatAck(a)) = m.msg
                                && a.seq == seq
                            {
                                idle.push(t.elapsed());
                                break;
                            }
                        }
                        _ => anyhow::bail!("reference agent: no heartbeat ack"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        idle.sort();
        let idle_p50 = sim::percentile(&idle, 50.0).unwrap_or_default();
        let idle_p99 = sim::percentile(&idle, 99.0).unwrap_or_default();
        // The fleet.
        let t0 = Instant::now();
        let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
        let mut failures = HashMap::<String, usize>::new();
        let mut joins = tokio::task::JoinSet::new();
        for (ip, id) in nodes {
            let (shared, version, gate) = (Arc::clone(&shared), version.clone(), Arc::clone(&gate));
            joins.spawn(async move { agent(target, ip, id, version, shared, gate).await });
        }
        let total = joins.len();
        // Wait until every agent is connected (or failed), bounded.
        let connect_deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let c = shared.connected.load(Ordering::Relaxed);
            while let Some(r) = joins.try_join_next() {
                if let Ok(Err(e)) = r {
                    *failures.entry(format!("{e:#}")).or_default() += 1;
                }
            }
            let failed: usize = failures.values().sum();
            if c + failed >= total || Instant::now() > connect_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connect_s = t0.elapsed().as_secs_f64();
        println!("SIM-READY {connect_s:.2}");
        let _ = std::io::stdout().flush();
        shared.measuring.store(true, Ordering::Relaxed);
        let sent0 = shared.sent.load(Ordering::Relaxed);
        let acked0 = shared.acked.load(Ordering::Relaxed);
        tokio::time::sleep(measure).await;
        shared.measuring.store(false, Ordering::Relaxed);
        // Acks for heartbeats sent at the very end of the window still count (they are in flight).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sent = shared.sent.load(Ordering::Relaxed) - sent0;
        let acked = shared.acked.load(Ordering::Relaxed) - acked0;
        let mut lat = std::mem::take(&mut *shared.lat_us.lock().unwrap_or_else(|p| p.into_inner()));
        lat.sort_unstable();
        let p = |q| sim::percentile(&lat, q).map_or(f64::NAN, |us| f64::from(us) / 1000.0);
        let result = json!({
            "p50_ms": p(50.0), "p99_ms": p(99.0), "max_ms": p(100.0),
            "idle_p50_ms": idle_p50.as_secs_f64() * 1000.0,
            "idle_p99_ms": idle_p99.as_secs_f64() * 1000.0,
            "acks": lat.len(), "lost": sent.saturating_sub(acked),
            "connected": shared.connected.load(Ordering::Relaxed),
            "failures": failures,
        });
        println!("SIM-DONE {result}");
        let _ = std::io::stdout().flush();
        // Streams stay open until the coordinator side has counted its sessions and closed our
        // stdin (bounded, should it never do so).
        let held = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new()));
        let _ = tokio::time::timeout(Duration::from_secs(30), held).await;
        joins.abort_all();
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

type Outbound = tokio::sync::mpsc::Sender<AgentMessage>;

/// Connects from `ip` to the fleet listener, opens the stream, says Hello and waits for Welcome.
async fn open(
    target: SocketAddr,
    ip: Ipv4Addr,
    node_id: &str,
    version: &str,
) -> anyhow::Result<(Outbound, tonic::Streaming<nimbus_proto::CoordinatorMessage>)> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(20));
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| async move {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from((ip, 0)))?;
            let s = sock.connect(target).await?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }))
        .await
        .context("connecting")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(16);
    tx.send(AgentMessage {
        msg: Some(AgentMsg::Hello(Hello {
            node_id: node_id.to_string(),
            agent_version: version.to_string(),
            probe_port: 0,
        })),
    })
    .await?;
    let mut inbound = FleetClient::new(channel)
        .channel(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening the fleet stream")?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(20), inbound.message()).await {
        Ok(Ok(Some(nimbus_proto::CoordinatorMessage {
            msg: Some(CoordMsg::Welcome(_)),
        }))) => Ok((tx, inbound)),
        Ok(Ok(other)) => anyhow::bail!("expected Welcome, got {other:?}"),
        Ok(Err(s)) => anyhow::bail!("stream refused: {}", s.message()),
        Err(_) => anyhow::bail!("no Welcome within 20 s"),
    }
}

/// One simulated agent: connect, Inventory once, heartbeats every [`HEARTBEAT`] at a random phase.
async fn agent(
    target: SocketAddr,
    ip: Ipv4Addr,
    node_id: String,
    version: String,
    shared: Arc<Shared>,
    gate: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let (tx, mut inbound) = {
        let _permit = gate.acquire().await?;
        open(target, ip, &node_id, &version).await?
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    tx.send(AgentMessage {
        msg: Some(AgentMsg::Inventory(Inventory {
            hostname: format!("sim-{ip}"),
            cpus: 8,
            memory_bytes: 16 << 30,
            kernel: "6.1.0-bench".into(),
            os_release: "Debian GNU/Linux 12 (bookworm)".into(),
            document: Vec::new(),
            document_schema: 0,
        })),
    })
    .await?;
    let phase = Duration::from_millis(rand::random::<u64>() % HEARTBEAT.as_millis() as u64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, HEARTBEAT);
    let mut seq = 0u64;
    let mut pending: Option<(u64, Instant, bool)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let measuring = shared.measuring.load(Ordering::Relaxed);
                if measuring {
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                }
                pending = Some((seq, Instant::now(), measuring));
                tx.send(AgentMessage { msg: Some(AgentMsg::Heartbeat(Heartbeat { seq })) }).await?;
            }
            m = inbound.message() => match m {
                Ok(Some(nimbus_proto::CoordinatorMessage { msg: Some(CoordMsg::HeartbeatAck(a)) })) => {
                    if let Some((s, t, measuring)) = pending
                        && s == a.seq
                    {
                        pending = None;
                        if measuring {
                            shared.acked.fetch_add(1, Ordering::Relaxed);
                            let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
                            shared.lat_us.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("stream closed by the coordinator"),
                Err(s) => anyhow::bail!("stream error: {}", s.message()),
            }
        }
    }
}
