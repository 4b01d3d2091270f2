//! Benchmark, not a test: the CPU one latency [`Driver`] (prober + responder on one UDP socket, as every agent
//! runs it) uses while probing 64 peers, at the agent's default interval (1 s, the coordinator's
//! `probe_interval` default) and at 100 ms and 10 ms (stress). Prints markdown tables; asserts nothing in a full
//! run.
//!
//! Three processes, so that only the measured driver's CPU and memory are counted:
//! - the *orchestrator* (what cargo starts) runs one *agent* process per table row and prints the tables;
//! - an *agent* process binds one driver on 127.0.0.1, configured as the agent configures it (window, timeout,
//!   responder rates), starts the peers process, probes every peer for the measurement period and reports
//!   `getrusage(RUSAGE_SELF)` (user + system CPU, peak RSS) and the driver's counters as one JSON line;
//! - the *peers* process runs 64 drivers on 127.0.0.1 on a single thread, answering the agent (and, for the
//!   "probed back" row, probing it at the same interval, so the agent also answers 64 peers as in a real mesh),
//!   and prints their ports.
//!
//! Each child exits when its parent goes away (its stdin closes) and is killed by PID when its parent is done or
//! panics ([`ChildGuard`]); every wait has a timeout. Loopback only, no root.
//!
//! Run: `cargo bench -p nimbus-latency --bench prober_cpu`. `PROBER_CPU_SECS` sets the measurement period per row
//! (default 20 s), `PROBER_CPU_WINDOW_SECS` the statistics window (default 30 s, the coordinator's
//! `probe_window` default; windows are aligned to the wall clock, so a 20 s run closes one window per peer or
//! none). Under `cargo test --benches` (no `--bench` argument) it does one 1 s smoke run at 100 ms and fails if
//! the probes were not answered.

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command as Process, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use latency::mesh::DEFAULT_MAX_PEERS;
use latency::prober::DEFAULT_TIMEOUT;
use latency::responder::{DEFAULT_PER_PEER_BURST, DEFAULT_PER_PEER_RATE};
use latency::{
    Command, Driver, DriverConfig, NodeId, Peer, ProbeKey, ProberConfig, ResponderConfig, TimestampingRequest,
    WindowStats,
};
use tokio::sync::{mpsc, oneshot};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Which process this is: unset (orchestrator), [`ROLE_AGENT`] or [`ROLE_PEERS`].
const ENV_ROLE: &str = "PROBER_CPU_ROLE";
const ROLE_AGENT: &str = "agent";
const ROLE_PEERS: &str = "peers";
/// Measurement period per row, seconds (user setting; the orchestrator passes the effective value on).
const ENV_SECS: &str = "PROBER_CPU_SECS";
/// Statistics window, seconds (user setting).
const ENV_WINDOW: &str = "PROBER_CPU_WINDOW_SECS";
/// Probe interval of this row, µs.
const ENV_INTERVAL_US: &str = "PROBER_CPU_INTERVAL_US";
/// `1`: the peers probe the agent too.
const ENV_PROBE_BACK: &str = "PROBER_CPU_PROBE_BACK";
/// The probe key's secret, hex (only ever passed to our own children; never printed).
const ENV_KEY: &str = "PROBER_CPU_KEY";
/// The agent's node id.
const ENV_AGENT_ID: &str = "PROBER_CPU_AGENT_ID";
/// The agent's probe socket, for the peers' responders.
const ENV_AGENT_ADDR: &str = "PROBER_CPU_AGENT_ADDR";

const KEY_ID: u32 = 1;
const AGENT_ID: &str = "agent";
const PEERS: usize = DEFAULT_MAX_PEERS;
const DEFAULT_SECS: f64 = 20.0;
const DEFAULT_WINDOW_SECS: u64 = 30;
/// Lines on a child's stdout carrying data (anything else is ignored).
const PORTS_PREFIX: &str = "prober-cpu-ports ";
const RESULT_PREFIX: &str = "prober-cpu-result ";

fn main() {
    let result = match std::env::var(ENV_ROLE).as_deref() {
        Ok(ROLE_AGENT) => agent_role(),
        Ok(ROLE_PEERS) => peers_role(),
        _ => orchestrate(),
    };
    if let Err(e) = result {
        eprintln!("prober_cpu: {e}");
        std::process::exit(1);
    }
}

/// One table row to measure.
#[derive(Clone, Copy, Debug)]
struct Row {
    interval: Duration,
    probe_back: bool,
}

/// What an agent process measured.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Measured {
    interval_us: u64,
    probe_back: bool,
    peers: usize,
    mode: String,
    wall_s: f64,
    user_s: f64,
    sys_s: f64,
    max_rss_kib: u64,
    probes_sent: u64,
    samples: u64,
    responses_rejected: u64,
    send_errors: u64,
    tx_timestamps: u64,
    requests_received: u64,
    requests_answered: u64,
    windows: u64,
    windows_dropped: u64,
    lost_in_windows: u64,
}

impl Measured {
    fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
    fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.wall_s
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Orchestrator

fn orchestrate() -> Res<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (secs, rows) = if full {
        let rows = vec![
            Row {
                interval: Duration::from_secs(1),
                probe_back: false,
            },
            Row {
                interval: Duration::from_secs(1),
                probe_back: true,
            },
            Row {
                interval: Duration::from_millis(100),
                probe_back: false,
            },
            Row {
                interval: Duration::from_millis(10),
                probe_back: false,
            },
        ];
        (env_f64(ENV_SECS, DEFAULT_SECS)?, rows)
    } else {
        eprintln!("prober_cpu: no --bench argument (cargo test): one 1 s smoke run; `cargo bench` measures");
        let row = Row {
            interval: Duration::from_millis(100),
            probe_back: false,
        };
        (1.0, vec![row])
    };
    let window = env_u64(ENV_WINDOW, DEFAULT_WINDOW_SECS)?;
    let key = ProbeKey::generate(KEY_ID);
    let mut results = Vec::new();
    for row in &rows {
        eprintln!(
            "prober_cpu: {} to {PEERS} peers{} for {secs} s ...",
            interval_label(row.interval),
            if row.probe_back { ", probed back" } else { "" }
        );
        results.push(run_agent(*row, secs, window, &key)?);
    }
    print_tables(&results, secs, window);
    if !full {
        smoke_check(&results)?;
    }
    Ok(())
}

/// Runs one agent process and returns its measurement.
fn run_agent(row: Row, secs: f64, window: u64, key: &ProbeKey) -> Res<Measured> {
    let exe = std::env::current_exe()?;
    let mut agent = ChildGuard::spawn(
        "agent",
        Process::new(exe)
            .env(ENV_ROLE, ROLE_AGENT)
            .env(ENV_SECS, secs.to_string())
            .env(ENV_WINDOW, window.to_string())
            .env(ENV_INTERVAL_US, row.interval.as_micros().to_string())
            .env(ENV_PROBE_BACK, if row.probe_back { "1" } else { "0" })
            .env(ENV_KEY, hex(key.expose_secret()))
            .env(ENV_AGENT_ID, AGENT_ID),
    )?;
    let stdout = agent.stdout()?;
    // Generous: start-up of 64 responders plus the measurement plus shutdown.
    let patience = Duration::from_secs_f64(secs) + Duration::from_secs(60);
    let line = read_line_timeout(stdout, RESULT_PREFIX, patience, "agent process result")?;
    let measured: Measured =
        serde_json::from_str(&line).map_err(|e| format!("agent process printed an unreadable result ({e}): {line}"))?;
    agent.wait_timeout(Duration::from_secs(10))?;
    Ok(measured)
}

fn smoke_check(results: &[Measured]) -> Res<()> {
    for m in results {
        if m.probes_sent == 0 || m.samples * 2 < m.probes_sent || m.send_errors > 0 {
            return Err(format!(
                "smoke run: {} probes sent, {} answered, {} send errors; expected most probes answered over \
                 loopback (is 127.0.0.1 up?)",
                m.probes_sent, m.samples, m.send_errors
            )
            .into());
        }
    }
    Ok(())
}

fn interval_label(d: Duration) -> String {
    if d >= Duration::from_secs(1) && d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else if d >= Duration::from_millis(1) && d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} µs", d.as_micros())
    }
}

fn print_tables(results: &[Measured], secs: f64, window: u64) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mode = results.first().map(|m| m.mode.as_str()).unwrap_or("-");
    let build = if cfg!(debug_assertions) { "debug" } else { "optimised" };
    let mut out = String::new();
    out.push_str(&format!(
        "\nProber CPU, one driver probing {PEERS} peers over loopback; {secs} s per row, {window} s windows, \
         timestamping {mode}; {cpus} CPUs ({model}), Linux {kernel}, {build} build.\n\n"
    ));
    out.push_str("| interval | peers | probes/s | CPU % of one core | µs CPU per probe | RSS MB |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for m in results {
        let label = interval_label(Duration::from_micros(m.interval_us));
        let label = if m.probe_back {
            format!("{label}, probed back¹")
        } else {
            label
        };
        let per_probe = if m.probes_sent > 0 {
            format!("{:.1}", m.cpu_s() * 1e6 / m.probes_sent as f64)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "| {label} | {} | {:.0} | {:.2} | {per_probe} | {:.1} |\n",
            m.peers,
            m.per_s(m.probes_sent),
            100.0 * m.cpu_s() / m.wall_s,
            m.max_rss_kib as f64 / 1024.0,
        ));
    }
    out.push_str(
        "\nCPU: user + system time of the agent process (tokio multi-thread runtime, one driver) over the \
         measurement period; RSS: its peak (ru_maxrss).\n",
    );
    if results.iter().any(|m| m.probe_back) {
        out.push_str(
            "¹ The peers also probe the agent at the same interval, so it answers 64 peers as well (the load of \
             a real full mesh); µs per probe then covers a probe sent and one answered.\n",
        );
    }
    out.push('\n');
    out.push_str(
        "| interval | datagrams sent/s | datagrams received/s | TX timestamps/s | answered | windows \
         (lost probes) | user s | sys s |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in results {
        let label = interval_label(Duration::from_micros(m.interval_us));
        let label = if m.probe_back {
            format!("{label}, probed back")
        } else {
            label
        };
        let answered = if m.probes_sent > 0 {
            100.0 * m.samples as f64 / m.probes_sent as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            "| {label} | {:.0} | {:.0} | {:.0} | {answered:.1} % | {} ({}) | {:.3} | {:.3} |\n",
            m.per_s(m.probes_sent + m.requests_answered),
            m.per_s(m.samples + m.responses_rejected + m.requests_received),
            m.per_s(m.tx_timestamps),
            m.windows,
            m.lost_in_windows,
            m.user_s,
            m.sys_s,
        ));
        if m.windows_dropped > 0 || m.send_errors > 0 {
            out.push_str(&format!(
                "\n(row above: {} windows dropped, {} send errors)\n",
                m.windows_dropped, m.send_errors
            ));
        }
    }
    out.push_str(
        "\nanswered: RTT samples / probes sent (probes still in flight at the end count as unanswered); \
         windows: per-peer windows closed during the run.\n",
    );
    print!("{out}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------------------------------------------
// Agent process: one driver, measured

fn agent_role() -> Res<()> {
    exit_when_parent_goes();
    let interval = Duration::from_micros(env_u64(ENV_INTERVAL_US, 1_000_000)?);
    let secs = env_f64(ENV_SECS, DEFAULT_SECS)?;
    let window = Duration::from_secs(env_u64(ENV_WINDOW, DEFAULT_WINDOW_SECS)?);
    let probe_back = std::env::var(ENV_PROBE_BACK).as_deref() == Ok("1");
    let key = env_key()?;
    let me = NodeId::new(std::env::var(ENV_AGENT_ID).unwrap_or_else(|_| AGENT_ID.into()));

    // The agent binary runs on tokio's default multi-thread runtime.
    let rt = tokio::runtime::Runtime::new()?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let mut driver = rt.block_on(Driver::bind(
        loopback,
        me,
        key,
        driver_config(interval, window, TimestampingRequest::Kernel),
    ))?;
    let mode = driver.capability().to_string();
    let addr = driver.local_addr()?;

    // The peers inherit the key, interval, window and probe-back settings from this process's environment.
    let mut peers_proc = ChildGuard::spawn(
        "peers",
        Process::new(std::env::current_exe()?)
            .env(ENV_ROLE, ROLE_PEERS)
            .env(ENV_AGENT_ADDR, addr.to_string()),
    )?;
    let line = read_line_timeout(
        peers_proc.stdout()?,
        PORTS_PREFIX,
        Duration::from_secs(20),
        "peers process ports",
    )?;
    let ports = line
        .split_whitespace()
        .map(str::parse::<u16>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("peers process printed unreadable ports ({e}): {line}"))?;
    if ports.len() != PEERS {
        return Err(format!("peers process printed {} ports, expected {PEERS}: {line}", ports.len()).into());
    }
    let peers: Vec<Peer> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| Peer::new(peer_id(i), SocketAddr::new(addr.ip(), *port)))
        .collect();
    driver.apply(Command::SetKnownPeers(peers.clone()));
    driver.apply(Command::SetProbeTargets(peers));

    let measured = rt.block_on(async {
        let (_cmd_tx, cmd_rx) = mpsc::channel(1);
        let (rep_tx, mut rep_rx) = mpsc::channel::<WindowStats>(16 * PEERS);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let windows = tokio::spawn(async move {
            let (mut n, mut lost) = (0u64, 0u64);
            while let Some(w) = rep_rx.recv().await {
                n += 1;
                lost += u64::from(w.lost);
            }
            (n, lost)
        });
        let before = Usage::now()?;
        let started = Instant::now();
        let task = tokio::spawn(driver.run(cmd_rx, rep_tx, async move {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let _ = stop_tx.send(());
        let report = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .map_err(|_| "the driver did not stop within 10 s of shutdown")???;
        let wall = started.elapsed();
        let after = Usage::now()?;
        let (windows, lost_in_windows) = tokio::time::timeout(Duration::from_secs(5), windows)
            .await
            .map_err(|_| "the window counter did not finish within 5 s")??;
        let r = report.responder;
        Res::Ok(Measured {
            interval_us: u64::try_from(interval.as_micros())?,
            probe_back,
            peers: PEERS,
            mode,
            wall_s: wall.as_secs_f64(),
            user_s: (after.user - before.user).as_secs_f64(),
            sys_s: (after.sys - before.sys).as_secs_f64(),
            max_rss_kib: after.max_rss_kib,
            probes_sent: report.probes_sent,
            samples: report.samples,
            responses_rejected: report.responses_rejected,
            send_errors: report.send_errors,
            tx_timestamps: report.tx_timestamps,
            requests_received: r.answered
                + r.malformed
                + r.not_for_me
                + r.unknown_sender
                + r.wrong_source
                + r.unknown_key
                + r.bad_mac
                + r.replayed
                + r.late
                + r.rate_limited,
            requests_answered: r.answered,
            windows,
            windows_dropped: report.windows_dropped,
            lost_in_windows,
        })
    })?;
    drop(peers_proc);
    println!("{RESULT_PREFIX}{}", serde_json::to_string(&measured)?);
    std::io::stdout().flush()?;
    Ok(())
}

/// The driver settings the agent derives from the coordinator's interval and window (agent `probes.rs`).
fn driver_config(interval: Duration, window: Duration, timestamping: TimestampingRequest) -> DriverConfig {
    // Answer every peer at least twice as fast as it is told to probe.
    let rate = 2.0 / interval.as_secs_f64();
    DriverConfig {
        prober: ProberConfig {
            interval,
            window,
            timeout: DEFAULT_TIMEOUT.min(window / 2),
            ..ProberConfig::default()
        },
        responder: ResponderConfig {
            per_peer_rate: DEFAULT_PER_PEER_RATE.max(rate),
            per_peer_burst: DEFAULT_PER_PEER_BURST.max(2.0 * rate),
            ..ResponderConfig::default()
        },
        timestamping,
        key_grace: None,
    }
}

/// CPU time and peak RSS of this process so far.
struct Usage {
    user: Duration,
    sys: Duration,
    max_rss_kib: u64,
}

impl Usage {
    fn now() -> Res<Self> {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is valid for writes of a `rusage`, which is all getrusage writes.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
        if rc != 0 {
            return Err(format!("getrusage: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: zero-initialised, then filled in by the successful call; `rusage` is plain integers.
        let ru = unsafe { ru.assume_init() };
        let tv = |t: libc::timeval| {
            Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        Ok(Self {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
            // Linux reports ru_maxrss in KiB.
            max_rss_kib: u64::try_from(ru.ru_maxrss).unwrap_or(0),
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Peers process: 64 responders (and, with probe-back, probers of the agent), one thread

fn peers_role() -> Res<()> {
    exit_when_parent_goes();
    let interval = Duration::from_micros(env_u64(ENV_INTERVAL_US, 1_000_000)?);
    let window = Duration::from_secs(env_u64(ENV_WINDOW, DEFAULT_WINDOW_SECS)?);
    let probe_back = std::env::var(ENV_PROBE_BACK).as_deref() == Ok("1");
    let key = env_key()?;
    let agent_id = std::env::var(ENV_AGENT_ID).unwrap_or_else(|_| AGENT_ID.into());
    let agent_addr: SocketAddr = std::env::var(ENV_AGENT_ADDR)
        .map_err(|_| format!("{ENV_AGENT_ADDR} is not set; the agent process passes it"))?
        .parse()?;
    let agent = Peer::new(agent_id, agent_addr);
    // One thread, so the other core stays free for the agent. User-space timestamps: cheaper, and the peers'
    // timestamping only changes the hold time they report, not the agent's work.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let mut ports = Vec::with_capacity(PEERS);
        let mut commands = Vec::with_capacity(PEERS);
        for i in 0..PEERS {
            let mut d = Driver::bind(
                loopback,
                NodeId::new(peer_id(i)),
                key.clone(),
                driver_config(interval, window, TimestampingRequest::UserSpace),
            )
            .await?;
            ports.push(d.local_addr()?.port().to_string());
            d.apply(Command::SetKnownPeers(vec![agent.clone()]));
            if probe_back {
                d.apply(Command::SetProbeTargets(vec![agent.clone()]));
            }
            let (cmd_tx, cmd_rx) = mpsc::channel(1);
            commands.push(cmd_tx);
            let (rep_tx, mut rep_rx) = mpsc::channel(16);
            tokio::spawn(async move { while rep_rx.recv().await.is_some() {} });
            tokio::spawn(d.run(cmd_rx, rep_tx, std::future::pending()));
        }
        println!("{PORTS_PREFIX}{}", ports.join(" "));
        std::io::stdout().flush()?;
        // Until the agent process kills this one (or goes away: see `exit_when_parent_goes`).
        std::future::pending::<Res<()>>().await
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers

fn peer_id(i: usize) -> String {
    format!("peer-{i:02}")
}

fn env_f64(name: &str, default: f64) -> Res<f64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(format!("{name}={v:?} is not a positive number of seconds; give e.g. {name}=20").into()),
        },
    }
}

fn env_u64(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(x) if x > 0 => Ok(x),
            _ => Err(format!("{name}={v:?} is not a positive whole number; give e.g. {name}={default}").into()),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn env_key() -> Res<ProbeKey> {
    let v = std::env::var(ENV_KEY).map_err(|_| format!("{ENV_KEY} is not set; the orchestrator passes it"))?;
    let bad = || format!("{ENV_KEY} is not 64 hex digits");
    if v.len() != 64 || !v.is_ascii() {
        return Err(bad().into());
    }
    let mut secret = [0u8; 32];
    for (i, b) in secret.iter_mut().enumerate() {
        *b = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(ProbeKey::new(KEY_ID, secret))
}

/// Exits this process when the parent closes our stdin (it exited or was killed), so no child outlives a run.
fn exit_when_parent_goes() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

/// Reads `from` until a line starting with `prefix`; returns the rest of that line. Fails on EOF or timeout.
fn read_line_timeout(from: ChildStdout, prefix: &'static str, timeout: Duration, what: &str) -> Res<String> {
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            match line {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        let _ = tx.send(Some(rest.trim().to_owned()));
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    match rx.recv_timeout(timeout) {
        Ok(Some(line)) => Ok(line),
        Ok(None) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
            Err(format!("{what}: the process exited without printing it (see its error above)").into())
        }
        Err(std_mpsc::RecvTimeoutError::Timeout) => Err(format!("{what}: nothing within {timeout:?}").into()),
    }
}

/// A child process that is killed (by its PID) and reaped when this goes out of scope, also on panic.
struct ChildGuard {
    child: Child,
    what: &'static str,
}

impl ChildGuard {
    /// Starts `cmd` with piped stdin (the child's life line, see [`exit_when_parent_goes`]) and stdout.
    fn spawn(what: &'static str, cmd: &mut Process) -> Res<Self> {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the {what} process: {e}"))?;
        Ok(Self { child, what })
    }

    fn stdout(&mut self) -> Res<ChildStdout> {
        self.child
            .stdout
            .take()
            .ok_or_else(|| format!("{} process stdout already taken", self.what).into())
    }

    /// Waits for the child to exit by itself; fails if it does not within `timeout` or exits unsuccessfully.
    fn wait_timeout(&mut self, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("{} process exited with {status}", self.what).into())
                };
            }
            if Instant::now() >= deadline {
                return Err(format!("{} process did not exit within {timeout:?}", self.what).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // `Child::kill` sends SIGKILL to this child's PID only; harmless if it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
