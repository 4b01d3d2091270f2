//! `nimbus-lab up|down|status`: the local lab, built from the same [`Fleet`] the tests use, left running
//! after the command exits (detached processes, persisted namespaces, a state file for `down`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::env::{COORDINATOR_BIN, bin_dir};
use crate::error::{HarnessError, Result};
use crate::fleet::{Fleet, FleetOptions, Layout, ZoneLayout, agent_name, tail};
use crate::netns::Netns;
use crate::process::pid_alive;
use crate::state::{LabState, TeardownReport, teardown_from_state};
use crate::topology::LAB_SUBNET;

/// Default state file; its directory is the lab's work dir (data, logs, admin socket).
pub const DEFAULT_STATE_FILE: &str = "/run/nimbus-lab/state.json";

/// Namespace prefix of the lab (`nlab-sw`, `nlab-coord`, `nlab-agent-1`, ...).
pub const LAB_PREFIX: &str = "nlab";

/// Default time `up` waits for all agents to connect.
pub const DEFAULT_UP_TIMEOUT: Duration = Duration::from_secs(90);

/// Default number of agents.
pub const DEFAULT_AGENTS: usize = 6;

/// Default number of zones (0: one bridge, no delay router).
pub const DEFAULT_ZONES: usize = 3;

/// Most zones (named `a` to `z`).
pub const MAX_ZONES: usize = 26;

/// One-way delay inside a zone (0.1 ms RTT).
pub const LAB_INSIDE: Duration = Duration::from_micros(50);
/// One-way delay between zones `a` and `b` (1 ms RTT: a metro link, below the 2 ms zone budget but two zones).
pub const LAB_NEAR: Duration = Duration::from_micros(500);
/// One-way delay between every other pair of zones (5 ms RTT: another region).
pub const LAB_FAR: Duration = Duration::from_micros(2500);

/// The coordinator's probe settings in the lab: short windows, so the matrix fills within seconds.
const LAB_PROBE_ARGS: [&str; 4] = ["--probe-interval", "250ms", "--probe-window", "10s"];

/// How long `up` waits for the first latency windows of every pair (a warning, not a failure, after).
const LATENCY_WAIT: Duration = Duration::from_secs(60);

/// The lab's zones: `agents` agents round-robin over `zones` zones named `a`, `b`, ...; 0.1 ms RTT inside a zone,
/// 1 ms between `a` and `b`, 5 ms between any other two. `None` for 0 zones (one bridge).
pub fn lab_zones(agents: usize, zones: usize) -> Option<ZoneLayout> {
    if zones == 0 {
        return None;
    }
    let names: Vec<String> = (0..zones.min(MAX_ZONES))
        .filter_map(|i| u8::try_from(i).ok().map(|i| char::from(b'a' + i).to_string()))
        .collect();
    let mut layout = ZoneLayout::round_robin(&names, agents);
    for (i, a) in names.iter().enumerate() {
        layout = layout.delay(a, a, LAB_INSIDE);
        for b in &names[i + 1..] {
            let one_way = if (a.as_str(), b.as_str()) == ("a", "b") {
                LAB_NEAR
            } else {
                LAB_FAR
            };
            layout = layout.delay(a, b, one_way);
        }
    }
    Some(layout)
}

/// What `up` needs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of agents (`agent-1..=N`).
    pub agents: usize,
    /// Number of zones behind the delay router ([`lab_zones`]); 0: one bridge without delay.
    pub zones: usize,
    /// The state file (refused if it exists).
    pub state_file: PathBuf,
    /// Where the daemon binaries are; default: next to this executable if they are there, else [`bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for all agents to connect.
    pub timeout: Duration,
    /// Namespace prefix (default [`LAB_PREFIX`]; tests use a unique one).
    pub prefix: String,
}

/// The directory the daemon binaries are taken from when none is given.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(crate::env::BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join(COORDINATOR_BIN).is_file())
        .unwrap_or_else(bin_dir)
}

fn work_dir_of(state_file: &Path) -> PathBuf {
    match state_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes what a previous (already torn down) lab left in the work dir: data, state, logs, socket.
fn clear_leftovers(work: &Path, agents: usize) -> Result<()> {
    let mut doomed = vec![work.join("coordinator"), work.join("logs")];
    if let Ok(entries) = std::fs::read_dir(work) {
        doomed.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("agent-"))
        }));
    }
    doomed.extend((1..=agents).map(|i| work.join(agent_name(i))));
    for dir in doomed {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HarnessError::io(format!("removing leftover {}", dir.display()), e));
            }
        }
    }
    match std::fs::remove_file(work.join("admin.sock")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HarnessError::io("removing leftover admin.sock", e)),
    }
}

fn say(out: &mut dyn Write, line: impl AsRef<str>) {
    // The lab's output is for a human at a terminal; a closed stdout is not worth failing over.
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

/// Brings the lab up and leaves it running. On failure everything created is removed again (logs kept).
pub fn up(opts: &UpOptions, out: &mut dyn Write) -> Result<LabState> {
    crate::env::netns_available()?;
    if opts.state_file.exists() {
        return Err(HarnessError::State {
            path: opts.state_file.clone(),
            reason: "a lab is already up (or a previous `up` was interrupted): run `./deploy/lab.sh down` first".into(),
        });
    }
    if opts.agents == 0 {
        return Err(HarnessError::Misuse("--agents must be at least 1".into()));
    }
    if opts.zones > MAX_ZONES {
        return Err(HarnessError::Misuse(format!(
            "--zones {}: at most {MAX_ZONES} (named a to z); 0 puts every host on one bridge",
            opts.zones
        )));
    }
    let work = work_dir_of(&opts.state_file);
    std::fs::create_dir_all(&work).map_err(|e| HarnessError::io(format!("creating {}", work.display()), e))?;
    clear_leftovers(&work, opts.agents)?;
    let bins = opts.bin_dir.clone().unwrap_or_else(default_bin_dir);
    let fleet_opts = FleetOptions {
        agents: opts.agents,
        subnet: LAB_SUBNET,
        prefix: Some(opts.prefix.clone()),
        work_dir: Some(work.clone()),
        bin_dir: Some(bins),
        detached: true,
        state_file: Some(opts.state_file.clone()),
        start_coordinator: true,
        coordinator_args: LAB_PROBE_ARGS.iter().map(|a| a.to_string()).collect(),
        layout: lab_zones(opts.agents, opts.zones).map_or(Layout::Bridge, Layout::Zones),
    };
    let shape = match &fleet_opts.layout {
        Layout::Bridge => "on one bridge".to_string(),
        Layout::Zones(z) => format!(
            "in {} zones ({}) behind the delay router: {} ms RTT inside a zone, {} ms a-b, {} ms otherwise",
            z.zones().len(),
            z.zones().join(", "),
            (LAB_INSIDE * 2).as_secs_f64() * 1e3,
            (LAB_NEAR * 2).as_secs_f64() * 1e3,
            (LAB_FAR * 2).as_secs_f64() * 1e3,
        ),
    };
    say(
        out,
        format!(
            "nimbus-lab: building {} hosts on {LAB_SUBNET}/24 {shape}, and starting the coordinator ...",
            opts.agents + 1
        ),
    );
    let mut fleet = match Fleet::new(fleet_opts) {
        Ok(f) => f,
        Err(e) => {
            // Fleet::new cleaned up after itself; remove the journal it may have written.
            let _ = teardown_from_state(&opts.state_file);
            return Err(e);
        }
    };
    match bring_up_agents(&mut fleet, opts, out) {
        Ok(()) => {}
        Err(e) => {
            say(out, format!("nimbus-lab: up failed: {e}"));
            say(out, "nimbus-lab: last lines of each log:");
            for entry in fleet.state().processes {
                let text = std::fs::read_to_string(&entry.log).unwrap_or_default();
                say(
                    out,
                    format!("--- {} ({})\n{}", entry.name, entry.log.display(), tail(&text, 20)),
                );
            }
            drop(fleet);
            let _ = teardown_from_state(&opts.state_file);
            return Err(e);
        }
    }
    let nodes = fleet
        .try_ctl(&["nodes"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let latency = if opts.zones > 0 && opts.agents > 1 {
        wait_for_latency(&fleet, opts.agents, out)
    } else {
        String::new()
    };
    let state = fleet.detach()?;
    print_summary(&state, &nodes, &latency, opts, out);
    Ok(state)
}

fn bring_up_agents(fleet: &mut Fleet, opts: &UpOptions, out: &mut dyn Write) -> Result<()> {
    say(
        out,
        format!(
            "nimbus-lab: coordinator up in {} ({})",
            fleet.coordinator_ns().name(),
            fleet.coordinator_ip()
        ),
    );
    let uses = u32::try_from(opts.agents).unwrap_or(u32::MAX);
    let token = fleet.try_create_token("1h", uses)?;
    for i in 1..=opts.agents {
        fleet.try_start_agent(i, Some(&token), &[])?;
        say(
            out,
            format!(
                "nimbus-lab: started {} in {} ({})",
                agent_name(i),
                fleet.agent_ns(i).name(),
                fleet.agent_ip(i)
            ),
        );
    }
    let names: Vec<String> = (1..=opts.agents).map(agent_name).collect();
    let started = Instant::now();
    let mut last_line = String::new();
    let mut last_print = Instant::now();
    fleet.try_wait_connected(&names, opts.timeout, &mut |line: &str| {
        if line != last_line || last_print.elapsed() >= Duration::from_secs(5) {
            say(
                out,
                format!(
                    "nimbus-lab: waiting for agents ({}s): {line}",
                    started.elapsed().as_secs()
                ),
            );
            last_line = line.to_string();
            last_print = Instant::now();
        }
    })?;
    Ok(())
}

/// Waits until every ordered pair of agents has a latency window with samples (progress every 5 s), then returns
/// `nimbusctl latency` as text. A lab whose matrix is slow to fill is still up: on timeout this says so.
fn wait_for_latency(fleet: &Fleet, agents: usize, out: &mut dyn Write) -> String {
    let want = agents * (agents - 1);
    let started = Instant::now();
    let mut last_print = Instant::now();
    say(
        out,
        format!("nimbus-lab: waiting for the agents' first latency windows ({want} pairs) ..."),
    );
    loop {
        let have = fleet
            .try_ctl_json(&["latency"])
            .ok()
            .and_then(|v| v.get("pairs").and_then(|p| p.as_array()).cloned())
            .map_or(0, |pairs| {
                pairs
                    .iter()
                    .filter(|p| p.get("samples").and_then(serde_json::Value::as_u64).unwrap_or(0) > 0)
                    .count()
            });
        if have >= want {
            break;
        }
        if started.elapsed() >= LATENCY_WAIT {
            say(
                out,
                format!(
                    "nimbus-lab: warning: only {have} of {want} pairs measured after {}s; the lab is up, run `nimbusctl latency` again in a minute",
                    LATENCY_WAIT.as_secs()
                ),
            );
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            say(
                out,
                format!(
                    "nimbus-lab: latency: {have} of {want} pairs measured ({}s)",
                    started.elapsed().as_secs()
                ),
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    fleet
        .try_ctl(&["latency"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn print_summary(state: &LabState, nodes: &str, latency: &str, opts: &UpOptions, out: &mut dyn Write) {
    let (agents, prefix) = (opts.agents, opts.prefix.as_str());
    let ctl = format!(
        "{} --socket {}",
        state.nimbusctl.display(),
        state.admin_socket.display()
    );
    say(out, format!("\nnimbus-lab: coordinator and {agents} agents are up.\n"));
    say(out, nodes.trim_end());
    if !latency.trim().is_empty() {
        say(out, "");
        say(out, latency.trim_end());
    }
    say(out, "\nTry:");
    say(out, format!("  {ctl} nodes"));
    say(out, format!("  {ctl} node show agent-1"));
    if opts.zones > 0 {
        say(out, format!("  {ctl} latency --svg /tmp/nimbus-lab-latency.svg"));
        say(
            out,
            format!("  {ctl} plan replication -f deploy/examples/lab-stores.yaml"),
        );
    }
    say(out, format!("  {ctl} token create --ttl 1h --uses 1"));
    say(
        out,
        format!("  ip netns exec {prefix}-agent-1 ping -c1 100.96.0.1   # through the tunnel"),
    );
    say(
        out,
        format!(
            "  (or `export NIMBUS_ADMIN_SOCKET={}`, then plain `nimbusctl nodes`)",
            state.admin_socket.display()
        ),
    );
    say(
        out,
        format!("Logs: {}/{{coordinator,agent-N}}.log", state.log_dir.display()),
    );
    say(out, "Stop: sudo ./deploy/lab.sh down");
}

/// Tears the lab down from its state file. Idempotent.
pub fn down(state_file: &Path, out: &mut dyn Write) -> Result<TeardownReport> {
    let state = LabState::load(state_file)?;
    let report = teardown_from_state(state_file)?;
    if report.nothing_to_do {
        say(
            out,
            format!("nimbus-lab: no lab is up (no {}); nothing to do", state_file.display()),
        );
        let leftovers: Vec<String> = Netns::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{LAB_PREFIX}-")))
            .collect();
        if !leftovers.is_empty() {
            say(
                out,
                format!(
                    "nimbus-lab: namespaces named like the lab's exist but are not recorded: {} (remove with `ip netns delete NAME`)",
                    leftovers.join(", ")
                ),
            );
        }
        return Ok(report);
    }
    if !report.stopped.is_empty() {
        say(out, format!("nimbus-lab: stopped {}", report.stopped.join(", ")));
    }
    if !report.already_gone.is_empty() {
        say(
            out,
            format!("nimbus-lab: already gone: {}", report.already_gone.join(", ")),
        );
    }
    say(
        out,
        format!(
            "nimbus-lab: deleted namespaces: {}",
            if report.namespaces_deleted.is_empty() {
                "none left".to_string()
            } else {
                report.namespaces_deleted.join(", ")
            }
        ),
    );
    for w in &report.warnings {
        say(out, format!("nimbus-lab: warning: {w}"));
    }
    if let Some(state) = state {
        say(out, format!("nimbus-lab: logs kept in {}", state.log_dir.display()));
    }
    Ok(report)
}

/// Prints the lab's processes and `nimbusctl nodes`. `Ok(false)` when no lab is up.
pub fn status(state_file: &Path, out: &mut dyn Write) -> Result<bool> {
    let Some(state) = LabState::load(state_file)? else {
        say(
            out,
            format!(
                "nimbus-lab: no lab is up (no {}); start one with `sudo ./deploy/lab.sh up`",
                state_file.display()
            ),
        );
        return Ok(false);
    };
    for p in &state.processes {
        let alive = if pid_alive(p.pid) { "running" } else { "NOT RUNNING" };
        say(
            out,
            format!("{:<12} pid {:<8} {alive:<12} log {}", p.name, p.pid, p.log.display()),
        );
    }
    let mut cmd = std::process::Command::new(&state.nimbusctl);
    cmd.arg("--socket").arg(&state.admin_socket).arg("nodes");
    let output = crate::process::run_with_timeout(&mut cmd, crate::process::COMMAND_TIMEOUT)?;
    say(out, String::from_utf8_lossy(&output.stdout).trim_end());
    if !output.status.success() {
        say(
            out,
            format!(
                "nimbusctl failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_refuses_when_a_state_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state.json");
        std::fs::write(&state_file, "{}").unwrap();
        let opts = UpOptions {
            agents: 1,
            zones: 0,
            state_file,
            bin_dir: None,
            timeout: Duration::from_secs(1),
            prefix: LAB_PREFIX.into(),
        };
        let mut out = Vec::new();
        let err = up(&opts, &mut out);
        // Without root, up fails earlier (netns unavailable); with root, it must name `down`.
        if crate::env::netns_available().is_ok() {
            let msg = err.unwrap_err().to_string();
            assert!(msg.contains("already up") && msg.contains("lab.sh down"), "{msg}");
        } else {
            assert!(err.is_err());
        }
    }

    #[test]
    fn down_and_status_without_a_lab_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state.json");
        let mut out = Vec::new();
        let report = down(&state_file, &mut out).unwrap();
        assert!(report.nothing_to_do);
        assert!(!status(&state_file, &mut out).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("nothing to do") && text.contains("no lab is up"),
            "{text}"
        );
    }

    #[test]
    fn leftovers_of_a_previous_lab_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["coordinator/data", "agent-1/state", "agent-7/state", "logs", "keep-me"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("admin.sock"), b"").unwrap();
        clear_leftovers(dir.path(), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["keep-me"]);
    }
}
