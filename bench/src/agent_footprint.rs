//! Section `agent-footprint`: RSS and CPU of one real `nimbus-agent` process (release build when
//! `target/release` has the daemons, else the debug build — the table says which) connected to a real
//! coordinator in an `e2e::Fleet`:
//!
//! 1. idle: the only agent of the fleet (no probe peers), over 60 s (`--quick`: 10 s);
//! 2. probe round: the other agents of the fleet are started (64 more, `--quick`: 16), the coordinator puts
//!    them all in the probe mesh (default mesh budget: 64 peers per node, 1 probe/s per peer — the production
//!    defaults), agent-1 is sampled for 30 s (`--quick`: 10 s) while it probes them, and the section then checks
//!    that agent-1 reported measured windows to every peer (the windows close on :00/:30 boundaries, so one
//!    closes during the sample).
//!
//! The peers are real agents, not simulated responders: the coordinator only gives an agent probe targets that
//! are connected members, so this is the honest setup; it is also the heaviest (65 agent processes on this
//! machine). 66 hosts probing each other need ~4 400 entries in the kernel's neighbour table, which all
//! namespaces share (default hard limit 1 024): [`NeighbourRoom`] raises the limit for the run (see
//! [`crate::neigh`]; without it every agent lost its path to the coordinator ~25 s into the round).
//! Figures are counts on this machine against the goals (RSS ≤ 15 MB, idle CPU ≤ 0.5 %).
//! CPU % is (utime + stime) delta / wall time of the agent process (100 % = one core).
//!
//! The daemons' logs stay in a work directory that is removed when the section succeeds and kept (its path is
//! in the error) when it fails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use e2e::{Fleet, FleetOptions, agent_name};

use crate::neigh::NeighbourRoom;
use crate::report::Table;

/// RSS goal, MB (the issue says 15 MB).
const RSS_GOAL_MB: f64 = 15.0;
/// Idle CPU goal, percent of one core.
const IDLE_CPU_GOAL: f64 = 0.5;
/// After the peers are connected: time for the coordinator to push the mesh (it coalesces for 0.5 s) and for
/// every agent to start probing its new targets (first probe within one interval).
const MESH_SETTLE: Duration = Duration::from_secs(2);

/// Samples of one process over a period.
struct Footprint {
    rss_mean_kib: f64,
    rss_max_kib: u64,
    cpu_percent: f64,
    secs: f64,
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Table>> {
    let started = Instant::now();
    let (idle_secs, probe_secs, peers) = if quick { (10, 10, 16) } else { (60, 30, 64) };

    let release = match std::env::var_os("NIMBUS_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => e2e::bin_dir().with_file_name("release"),
    };
    let (bin_dir, build) = if e2e::Binaries::in_dir(&release).is_ok() {
        (release, "release")
    } else {
        (
            e2e::bin_dir(),
            "debug (no release daemons found: `cargo build --release --bins`)",
        )
    };
    let hosts = u64::try_from(peers + 2)?;
    let room = NeighbourRoom::reserve(2 * hosts * hosts).context("making room in the neighbour table")?;
    let work = tempfile::Builder::new()
        .prefix("nimbus-bench-footprint-")
        .tempdir()
        .context("creating the work directory")?;
    let opts = FleetOptions {
        bin_dir: Some(bin_dir.clone()),
        work_dir: Some(work.path().to_path_buf()),
        ..FleetOptions::test(peers + 1)
    };
    let result = measure(opts, &bin_dir, build, (idle_secs, probe_secs, peers), &room, started);
    drop(room);
    match result {
        Ok(table) => Ok(vec![table]),
        Err(e) => {
            let kept = work.keep();
            Err(e.context(format!("daemon logs kept in {}", kept.join("logs").display())))
        }
    }
}

fn measure(
    opts: FleetOptions,
    bin_dir: &std::path::Path,
    build: &str,
    (idle_secs, probe_secs, peers): (u64, u64, usize),
    room: &NeighbourRoom,
    started: Instant,
) -> anyhow::Result<Table> {
    let mut fleet = Fleet::new(opts).context("starting the lab and the coordinator")?;
    let token = fleet.try_create_token("1h", u32::try_from(peers + 1)?)?;

    // 1. Idle: agent-1 alone.
    fleet.try_start_agent(1, Some(&token), &[])?;
    fleet.try_wait_connected(&[agent_name(1)], Duration::from_secs(60), &mut |_| {})?;
    let pid = fleet.agent(1).pid();
    // Let start-up work (enrollment, first reports) settle before sampling.
    std::thread::sleep(Duration::from_secs(2));
    let idle = sample(pid, Duration::from_secs(idle_secs)).context("sampling the idle agent")?;

    // 2. Probe round: the peers join, agent-1 probes all of them.
    let round_start = Instant::now();
    for i in 2..=peers + 1 {
        fleet.try_start_agent(i, Some(&token), &[])?;
    }
    let names: Vec<String> = (2..=peers + 1).map(agent_name).collect();
    fleet.try_wait_connected(&names, Duration::from_secs(60), &mut |_| {})?;
    let connected = round_start.elapsed();
    std::thread::sleep(MESH_SETTLE);
    let probing = sample(pid, Duration::from_secs(probe_secs)).context("sampling the probing agent")?;
    // A window closes on every :00/:30 boundary (+1 s for the last probes' timeout); one did during the sample.
    let measured = wait_probed(&fleet, peers, Duration::from_secs(35))?;
    let measured_at = round_start.elapsed();
    // Everyone still connected: the round did not cost the agents their fleet streams.
    let all: Vec<String> = (1..=peers + 1).map(agent_name).collect();
    fleet
        .try_wait_connected(&all, Duration::from_secs(5), &mut |_| {})
        .context("after the probe round")?;

    let mut table = Table::new(
        format!("Agent footprint: one connected nimbus-agent ({build} build)"),
        &["phase", "RSS mean / max (MiB)", "CPU (% of one core)", "goal"],
    );
    let mib = |kib: f64| kib / 1024.0;
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    table.row(vec![
        format!("idle, only agent, {:.0} s", idle.secs),
        format!("{:.1} / {:.1}", mib(idle.rss_mean_kib), mib(idle.rss_max_kib as f64)),
        format!("{:.2}", idle.cpu_percent),
        format!(
            "RSS ≤ {RSS_GOAL_MB} MB: {} ({:.1} MB); CPU ≤ {IDLE_CPU_GOAL} %: {}",
            verdict(mb(idle.rss_max_kib) <= RSS_GOAL_MB),
            mb(idle.rss_max_kib),
            verdict(idle.cpu_percent <= IDLE_CPU_GOAL)
        ),
    ]);
    table.row(vec![
        format!("probe round, {peers} peers, {measured} measured, {:.0} s", probing.secs),
        format!(
            "{:.1} / {:.1}",
            mib(probing.rss_mean_kib),
            mib(probing.rss_max_kib as f64)
        ),
        format!("{:.2}", probing.cpu_percent),
        format!(
            "RSS ≤ {RSS_GOAL_MB} MB: {} ({:.1} MB)",
            verdict(mb(probing.rss_max_kib) <= RSS_GOAL_MB),
            mb(probing.rss_max_kib)
        ),
    ]);
    table.note(format!(
        "Process: {} (PID {pid}), VmRSS from /proc/PID/status sampled every 0.5 s; CPU from /proc/PID/stat. \
         Goals: RSS ≤ 15 MB (= {:.1} MiB), idle CPU ≤ 0.5 % of one core.",
        bin_dir.join("nimbus-agent").display(),
        RSS_GOAL_MB * 1e6 / (1024.0 * 1024.0)
    ));
    table.note(format!(
        "Probe round: {peers} real peer agents in the same lab (one bridge, no delay), production probe defaults \
         (1 probe/s to each target, 30 s windows, mesh budget 64 peers). The peers were enrolled and connected \
         {:.1} s after they were started; agent-1 was sampled from {:.0} s on, and had reported measured windows \
         to {measured} of {peers} peers {:.0} s after the start. The other {peers} agents and the coordinator \
         share the same 2 cores, so CPU here is the agent's own time, not wall-clock latency. The lab's {} hosts \
         share the kernel's neighbour (ARP) table: {} for the run.",
        connected.as_secs_f64(),
        (connected + MESH_SETTLE).as_secs_f64(),
        measured_at.as_secs_f64(),
        peers + 2,
        room.describe()
    ));
    let teardown = Instant::now();
    drop(fleet);
    table.note(format!(
        "Section wall time {:.0} s (of which stopping {} agents and deleting the lab {:.0} s).",
        started.elapsed().as_secs_f64(),
        peers + 1,
        teardown.elapsed().as_secs_f64()
    ));
    Ok(table)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Peers agent-1 has a latency window with samples to, from `nimbusctl latency`.
fn probed_peers(fleet: &Fleet) -> anyhow::Result<usize> {
    let v = fleet.try_ctl_json(&["latency"])?;
    let from = agent_name(1);
    let pairs = v
        .get("pairs")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut peers: Vec<String> = pairs
        .iter()
        .filter(|p| {
            let name = p.get("from").and_then(serde_json::Value::as_str).unwrap_or("");
            name == from && p.get("samples").and_then(serde_json::Value::as_u64).unwrap_or(0) > 0
        })
        .filter_map(|p| p.get("to").and_then(serde_json::Value::as_str).map(str::to_string))
        .collect();
    peers.sort();
    peers.dedup();
    Ok(peers.len())
}

/// Waits until agent-1 has measured all `peers`; fails (with how many it had) at the timeout.
fn wait_probed(fleet: &Fleet, peers: usize, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    loop {
        last = probed_peers(fleet).unwrap_or(last);
        if last >= peers {
            return Ok(last);
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!(
        "agent-1 reported measured windows to {last} of {peers} peers within {timeout:?} after its sample; \
         check the coordinator's and the agents' logs (fleet streams, probe configuration, kernel log)"
    )
}

/// Samples `pid` for `period`: RSS every 0.5 s and the CPU time delta.
fn sample(pid: u32, period: Duration) -> anyhow::Result<Footprint> {
    let start = Instant::now();
    let cpu0 = cpu_ticks(pid)?;
    let mut rss = Vec::new();
    while start.elapsed() < period {
        rss.push(rss_kib(pid)?);
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu1 = cpu_ticks(pid)?;
    let secs = start.elapsed().as_secs_f64();
    // SAFETY: sysconf only reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_secs = cpu1.saturating_sub(cpu0) as f64 / hz;
    let n = rss.len().max(1) as f64;
    Ok(Footprint {
        rss_mean_kib: rss.iter().sum::<u64>() as f64 / n,
        rss_max_kib: rss.iter().copied().max().unwrap_or(0),
        cpu_percent: 100.0 * cpu_secs / secs,
        secs,
    })
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status: did the agent exit?"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat: did the agent exit?"))?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let get = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {i} missing in /proc/{pid}/stat"))
    };
    Ok(get(14)? + get(15)?)
}
