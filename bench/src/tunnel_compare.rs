//! Section `tunnel`: TCP throughput (iperf3) and ping RTT between two namespaces joined by a veth pair, over
//! (a) the plain veth, (b) wireguard-go, (c) boringtun-cli and (d) our embedded tunnel (`tunnel::Tunnel`).
//!
//! Every figure is a ratio against the plain veth measured in the same run, plus ours against boringtun-cli.
//! This kernel has no WireGuard module, so kernel WireGuard is not compared.
//!
//! All tunnels are up at once, each on its own UDP port and overlay /24, so the paths can be measured in
//! interleaved rounds: in every round each path gets a burst of pings (the order rotates from round to
//! round) and, in the throughput rounds, an iperf3 run. A path's figure is the median of its round medians,
//! and the spread of the round medians is printed beside it, so drift and noise of the shared machine show
//! instead of hiding in one sequential pass. Ours against boringtun-cli is paired: the median of the
//! per-round ratios (both measured back to back in the same round).
//!
//! Our tunnel runs inside this process: one thread per namespace enters the namespace (`setns`) and runs a
//! multi-thread tokio runtime (one worker per core, like the agent) with a [`tunnel::Tunnel`]; threads it
//! spawns inherit the namespace, and the TUN device and UDP socket are created there. The other
//! implementations are separate processes configured with `wg`. Missing tools (`iperf3`, `wireguard-go`,
//! `wg`, `boringtun-cli`) skip their row with a note; `bench/run.sh` installs them.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use e2e::{Netns, Process, run_with_timeout};

use crate::cpu::{own_threads_cpu_ns, threads_cpu_ns};
use crate::report::Table;

/// Underlay (veth) addresses.
const UNDER_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const UNDER_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const IPERF_PORT: u16 = 5201;
/// The tunnels' MTU (wg-quick's default; also our `DEFAULT_MTU`).
const MTU: u16 = 1420;
/// Pause between echo requests.
const PING_INTERVAL: Duration = Duration::from_millis(20);

/// One measured path: the per-round figures.
#[derive(Default)]
struct Measured {
    /// Receiver-side TCP throughput of each throughput round, bit/s.
    bps: Vec<f64>,
    /// Median ping RTT of each ping round.
    rtt_p50: Vec<Duration>,
    /// Pings sent and lost over all rounds.
    pings: u32,
    lost: u32,
    /// CPU time both ends of the tunnel used during the ping rounds, ns (`None`: the kernel's).
    ping_cpu_ns: Option<u64>,
}

impl Measured {
    fn bps(&self) -> f64 {
        median_f64(&self.bps)
    }

    fn rtt(&self) -> Duration {
        let mut v = self.rtt_p50.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    /// `min–max` of the round medians as a ratio to `reference`.
    fn rtt_spread(&self, reference: Duration) -> String {
        let min = self.rtt_p50.iter().min().copied().unwrap_or_default();
        let max = self.rtt_p50.iter().max().copied().unwrap_or_default();
        format!("{:.2}–{:.2}", ratio(min, reference), ratio(max, reference))
    }

    /// Tunnel CPU per echo (request and reply through both ends), µs.
    fn cpu_per_echo_us(&self) -> Option<f64> {
        let replies = self.pings.saturating_sub(self.lost);
        self.ping_cpu_ns
            .filter(|_| replies > 0)
            .map(|ns| ns as f64 / 1e3 / f64::from(replies))
    }

    fn bps_spread(&self, reference: f64) -> String {
        let min = self.bps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.bps.iter().copied().fold(0.0, f64::max);
        format!("{:.3}–{:.3}", min / reference, max / reference)
    }
}

fn median_f64(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Which implementation carries the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    WireguardGo,
    BoringtunCli,
    Ours,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "plain veth (reference)",
            Kind::WireguardGo => "wireguard-go + wg (userspace, TUN)",
            Kind::BoringtunCli => "boringtun-cli (userspace, TUN)",
            Kind::Ours => "nimbus embedded tunnel (tunnel::Tunnel)",
        }
    }

    /// The address pinged and iperf'd in namespace `b` over this path.
    fn target(self) -> Ipv4Addr {
        match self {
            Kind::Plain => UNDER_B,
            other => other.overlay(2),
        }
    }

    /// Overlay address `host` of this tunnel (each tunnel has its own /24).
    fn overlay(self, host: u8) -> Ipv4Addr {
        let net = match self {
            Kind::Plain => 231,
            Kind::WireguardGo => 232,
            Kind::BoringtunCli => 233,
            Kind::Ours => 234,
        };
        Ipv4Addr::new(10, net, 0, host)
    }

    /// The tunnel's UDP port (both ends).
    fn port(self) -> u16 {
        match self {
            Kind::Plain => 0,
            Kind::WireguardGo => 51820,
            Kind::BoringtunCli => 51821,
            Kind::Ours => 51822,
        }
    }
}

struct Params {
    iperf_secs: u32,
    iperf_rounds: usize,
    ping_rounds: usize,
    pings_per_round: u32,
}

/// A tunnel that is up; stopped on drop.
enum Running {
    Userspace(Box<(UserspaceWg, UserspaceWg)>),
    Ours(OurEndpoint, OurEndpoint),
}

/// Name of our tunnel's runtime threads (both ends), whose CPU time is counted.
const OUR_THREADS: &str = "nbtun-ours";
/// Our tunnel's TUN (both ends, each in its namespace).
const OUR_TUN: &str = "nbtun0";
/// Name of our tunnel's packet threads (the tunnel names them `wg-<tun name>`), counted too.
const OUR_PACKET_THREADS: &str = "wg-nbtun0";

impl Running {
    fn kind(&self) -> Kind {
        match self {
            Running::Userspace(ends) if ends.0.kind == Kind::WireguardGo => Kind::WireguardGo,
            Running::Userspace(..) => Kind::BoringtunCli,
            Running::Ours(..) => Kind::Ours,
        }
    }

    /// CPU time (ns) used so far by both ends: every thread of the two processes, or our runtime threads.
    fn cpu_ns(&self) -> u64 {
        match self {
            Running::Userspace(ends) => process_cpu_ns(ends.0.process.pid()) + process_cpu_ns(ends.1.process.pid()),
            Running::Ours(..) => own_threads_cpu_ns(OUR_THREADS) + own_threads_cpu_ns(OUR_PACKET_THREADS),
        }
    }

    fn stop(self) {
        match self {
            Running::Userspace(ends) => drop(ends),
            Running::Ours(a, b) => {
                a.stop();
                b.stop();
            }
        }
    }
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Table>> {
    let params = if quick {
        Params {
            iperf_secs: 2,
            iperf_rounds: 1,
            ping_rounds: 3,
            pings_per_round: 20,
        }
    } else {
        // Odd round counts: the median is a measured round.
        Params {
            iperf_secs: 4,
            iperf_rounds: 3,
            ping_rounds: 9,
            pings_per_round: 30,
        }
    };
    let started = Instant::now();
    if which("iperf3").is_none() {
        bail!("iperf3 is not installed: run bench/run.sh or `apt-get install -y iperf3`");
    }
    let work = tempfile::tempdir().context("creating a temp dir for keys and logs")?;
    let prefix = format!("nbtun{}", std::process::id());
    let pair = Pair::create(&prefix)?;

    let mut table = Table::new(
        "Tunnel: TCP throughput and ping RTT between two namespaces over a veth pair",
        &[
            "path",
            "TCP throughput (× plain veth)",
            "rounds (min–max)",
            "ping RTT p50 (× plain veth)",
            "rounds (min–max)",
            "pings lost",
            "tunnel CPU per echo (µs, both ends)",
        ],
    );

    // Every path up at once (each tunnel on its own port and /24), then measured in interleaved rounds.
    let mut paths = vec![Kind::Plain];
    let mut running = Vec::new();
    for kind in [Kind::WireguardGo, Kind::BoringtunCli, Kind::Ours] {
        match start_tunnel(kind, &pair, work.path()).and_then(|r| {
            wait_path(&pair, kind.target())?;
            Ok(r)
        }) {
            Ok(r) => {
                running.push(r);
                paths.push(kind);
            }
            Err(e) => table.note(format!("{}: not measured: {e:#}", kind.label())),
        }
    }
    let result = measure_rounds(&pair, &paths, &running, &params, work.path());
    for r in running {
        r.stop();
    }
    let results = result?;

    let plain = &results[0].1;
    let (plain_bps, plain_rtt) = (plain.bps(), plain.rtt());
    table.note(format!(
        "Reference (plain veth, this run): {:.2} Gbit/s, ping p50 {:.3} ms. Interleaved: {} ping rounds of {} echo \
         requests {} ms apart per path (order rotating each round; figure = median of the round medians), {} \
         iperf3 rounds of {} s (one TCP stream, receiver side; figure = median of the rounds); all tunnels up \
         throughout.",
        plain_bps / 1e9,
        ms(plain_rtt),
        params.ping_rounds,
        params.pings_per_round,
        PING_INTERVAL.as_millis(),
        params.iperf_rounds,
        params.iperf_secs,
    ));
    table.note(format!(
        "Absolute figures of this run (for orientation only): {}.",
        results
            .iter()
            .map(|(k, m)| format!("{} {:.0} Mbit/s, {:.3} ms", k.label(), m.bps() / 1e6, ms(m.rtt())))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    for (kind, m) in &results {
        table.row(vec![
            kind.label().to_string(),
            format!("{:.3}×", m.bps() / plain_bps),
            m.bps_spread(plain_bps),
            format!("{:.2}×", ratio(m.rtt(), plain_rtt)),
            m.rtt_spread(plain_rtt),
            format!("{}/{}", m.lost, m.pings),
            m.cpu_per_echo_us()
                .map_or_else(|| "– (kernel)".to_string(), |us| format!("{us:.0}")),
        ]);
    }
    let find = |k: Kind| results.iter().find(|(kind, _)| *kind == k).map(|(_, m)| m);
    if let (Some(ours), Some(bt)) = (find(Kind::Ours), find(Kind::BoringtunCli)) {
        let tput = ours.bps() / bt.bps();
        // Paired per round: ours against boringtun-cli measured back to back in the same round, so
        // a machine that gets busier or quieter between rounds moves both; the figure is the median
        // of those ratios (≤ 1× when ours was as fast in at least half of the rounds).
        let rounds = ours.rtt_p50.len().min(bt.rtt_p50.len());
        let better = (0..rounds).filter(|&r| ours.rtt_p50[r] <= bt.rtt_p50[r]).count();
        let paired: Vec<f64> = (0..rounds).map(|r| ratio(ours.rtt_p50[r], bt.rtt_p50[r])).collect();
        let rtt = median_f64(&paired);
        let per_round: Vec<String> = paired.iter().map(|r| format!("{r:.2}")).collect();
        table.row(vec![
            "**ours vs boringtun-cli** (goal ≥ 0.9× throughput, RTT ≤ 1×)".into(),
            format!("{tput:.2}× ({})", if tput >= 0.9 { "meets goal" } else { "BELOW goal" }),
            String::new(),
            format!(
                "{rtt:.2}× median of the paired rounds ({})",
                if rtt <= 1.0 { "meets goal" } else { "worse" }
            ),
            format!("per round: {}", per_round.join(", ")),
            String::new(),
            match (ours.cpu_per_echo_us(), bt.cpu_per_echo_us()) {
                (Some(o), Some(b)) if b > 0.0 => format!("{:.2}×", o / b),
                _ => String::new(),
            },
        ]);
        table.note(format!(
            "Ours against boringtun-cli round by round (RTT p50 ratio, same round): {}; ours was as fast or faster \
             in {better} of {rounds} rounds. The ratio of the two paths' medians over all rounds is {:.2}×.",
            per_round.join(", "),
            ratio(ours.rtt(), bt.rtt())
        ));
    }
    if let Some(bt) = find(Kind::BoringtunCli)
        && let Some(wg) = find(Kind::WireguardGo)
    {
        table.note(format!(
            "boringtun-cli vs wireguard-go: {:.2}× throughput, {:.2}× RTT.",
            bt.bps() / wg.bps(),
            ratio(bt.rtt(), wg.rtt())
        ));
    }
    table.note(
        "What limits it: every userspace tunnel crosses the TUN device twice per packet (kernel → process → \
         UDP socket → kernel) with one encryption or decryption per packet at 1420-byte MTU, so throughput is \
         bound by per-packet syscalls and ChaCha20-Poly1305 on 2 cores shared by both ends and iperf3; the \
         plain veth has none of that (TSO/GRO, 64 KiB segments). Kernel WireGuard is not available on this \
         kernel and is not compared.",
    );
    table.note(format!(
        "Implementations: wireguard-go {}; boringtun-cli {}; ours runs in the bench process (per namespace a \
         multi-thread tokio runtime with {} workers, as the agent has, plus the tunnel's packet thread; CPU counts \
         both). Section wall time {:.0} s.",
        tool_version("wireguard-go", &["--version"]).unwrap_or_else(|| "missing".into()),
        tool_version("boringtun-cli", &["--version"]).unwrap_or_else(|| "missing".into()),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        started.elapsed().as_secs_f64()
    ));
    drop(pair);
    Ok(vec![table])
}

/// Interleaved rounds over `paths`: pings first (all rounds), then throughput.
fn measure_rounds(
    pair: &Pair,
    paths: &[Kind],
    running: &[Running],
    p: &Params,
    work: &Path,
) -> anyhow::Result<Vec<(Kind, Measured)>> {
    let mut results: Vec<(Kind, Measured)> = paths.iter().map(|&k| (k, Measured::default())).collect();
    let n = results.len();
    for round in 0..p.ping_rounds {
        for i in 0..n {
            let (kind, m) = &mut results[(i + round) % n];
            let tunnel = running.iter().find(|r| r.kind() == *kind);
            let cpu0 = tunnel.map(Running::cpu_ns);
            let pings = e2e::ping_rtts(&pair.a, kind.target(), p.pings_per_round, PING_INTERVAL)
                .with_context(|| format!("pinging over {}", kind.label()))?;
            if let (Some(t), Some(c0)) = (tunnel, cpu0) {
                let used = t.cpu_ns().saturating_sub(c0);
                m.ping_cpu_ns = Some(m.ping_cpu_ns.unwrap_or(0) + used);
            }
            let mut rtts = pings.rtts.clone();
            rtts.sort();
            let Some(p50) = rtts.get(rtts.len() / 2).copied() else {
                bail!("no ping replies over {} in round {round}", kind.label());
            };
            m.rtt_p50.push(p50);
            m.pings += pings.transmitted;
            m.lost += pings.transmitted.saturating_sub(pings.received);
        }
    }
    // Every path is measured once per round, so index r of each path's figures is round r.
    for round in 0..p.iperf_rounds {
        for i in 0..n {
            let (kind, m) = &mut results[(i + round) % n];
            let bps = iperf(pair, kind.target(), p.iperf_secs, work)
                .with_context(|| format!("iperf3 over {}", kind.label()))?;
            m.bps.push(bps);
        }
    }
    Ok(results)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// Two namespaces `a`, `b` with a veth pair between them (created inside `a`; nothing in the root namespace).
struct Pair {
    a: Netns,
    b: Netns,
}

impl Pair {
    fn create(prefix: &str) -> anyhow::Result<Pair> {
        let a = Netns::create(&format!("{prefix}-a"))?;
        let b = Netns::create(&format!("{prefix}-b"))?;
        a.ip([
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            b.name(),
        ])?;
        a.ip(["addr", "add", &format!("{UNDER_A}/24"), "dev", "veth0"])?;
        b.ip(["addr", "add", &format!("{UNDER_B}/24"), "dev", "veth1"])?;
        a.ip(["link", "set", "veth0", "up"])?;
        b.ip(["link", "set", "veth1", "up"])?;
        Ok(Pair { a, b })
    }
}

/// Waits until `target` answers pings from `a` (handshake done, ARP resolved).
fn wait_path(pair: &Pair, target: Ipv4Addr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pair.a.ping(target.into()) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("{target} does not answer pings from the peer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// iperf3 from `a` to `target` (server in `b`): receiver-side bit/s. The client is retried until the
/// server answers (it may not listen yet) for up to 5 s.
fn iperf(pair: &Pair, target: Ipv4Addr, secs: u32, work: &Path) -> anyhow::Result<f64> {
    let server = Process::builder("iperf3-server", "iperf3", work.join(format!("iperf3-{target}.log")))
        .netns(&pair.b)
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string(), "-B", &target.to_string()])
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let result = loop {
        let mut cmd = pair.a.exec("iperf3");
        cmd.args(["-c", &target.to_string(), "-p", &IPERF_PORT.to_string(), "-J", "-t"])
            .arg(secs.to_string());
        let o = run_with_timeout(&mut cmd, Duration::from_secs(u64::from(secs) + 20))?;
        // iperf3 -J reports some failures (e.g. "unable to connect") in the JSON with exit status 0.
        let json: Option<serde_json::Value> = serde_json::from_slice(&o.stdout).ok();
        let bps = json
            .as_ref()
            .and_then(|j| j.pointer("/end/sum_received/bits_per_second"))
            .and_then(serde_json::Value::as_f64);
        match bps {
            Some(bps) if o.status.success() => break Ok(bps),
            _ if Instant::now() > deadline => {
                let error = json
                    .as_ref()
                    .and_then(|j| j.get("error"))
                    .and_then(serde_json::Value::as_str)
                    .map_or_else(|| String::from_utf8_lossy(&o.stderr).trim().to_string(), str::to_string);
                break Err(anyhow::anyhow!(
                    "iperf3 client to {target} gave no result ({}): {error}; server log: {}",
                    o.status,
                    server.log()
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    server.stop(Duration::from_secs(2));
    result
}

/// Starts both ends of tunnel `kind` (its own port and overlay /24).
fn start_tunnel(kind: Kind, pair: &Pair, work: &Path) -> anyhow::Result<Running> {
    let sa = tunnel::keys::generate_secret();
    let sb = tunnel::keys::generate_secret();
    let pa = tunnel::keys::public_key_of(&sa);
    let pb = tunnel::keys::public_key_of(&sb);
    let (oa, ob, port) = (kind.overlay(1), kind.overlay(2), kind.port());
    match kind {
        Kind::Plain => bail!("the plain veth is not a tunnel"),
        Kind::Ours => {
            let ea = OurEndpoint::start(&pair.a, sa, pb, UNDER_B, oa, ob, port)?;
            let eb = match OurEndpoint::start(&pair.b, sb, pa, UNDER_A, ob, oa, port) {
                Ok(e) => e,
                Err(e) => {
                    ea.stop();
                    return Err(e);
                }
            };
            Ok(Running::Ours(ea, eb))
        }
        Kind::WireguardGo | Kind::BoringtunCli => {
            let (program, args): (&str, &[&str]) = if kind == Kind::WireguardGo {
                ("wireguard-go", &["-f"])
            } else {
                ("boringtun-cli", &["-f", "--disable-drop-privileges"])
            };
            let program = which(program).with_context(|| format!("{program} is not installed (bench/run.sh)"))?;
            if which("wg").is_none() {
                bail!("wg (wireguard-tools) is not installed (bench/run.sh)");
            }
            let tag = if kind == Kind::WireguardGo { "g" } else { "b" };
            let name_a = format!("nb{}{tag}a", std::process::id() % 1_000_000);
            let name_b = format!("nb{}{tag}b", std::process::id() % 1_000_000);
            let da = UserspaceWg::start(kind, &program, args, &pair.a, &name_a, work)?;
            let db = UserspaceWg::start(kind, &program, args, &pair.b, &name_b, work)?;
            da.configure(&sa, &pb, UNDER_B, oa, ob, port, work)?;
            db.configure(&sb, &pa, UNDER_A, ob, oa, port, work)?;
            Ok(Running::Userspace(Box::new((da, db))))
        }
    }
}

/// wireguard-go or boringtun-cli in the foreground in a namespace, configured with `wg`.
struct UserspaceWg {
    process: Process,
    ns: String,
    name: String,
    kind: Kind,
}

impl UserspaceWg {
    fn start(
        kind: Kind,
        program: &Path,
        args: &[&str],
        ns: &Netns,
        name: &str,
        work: &Path,
    ) -> anyhow::Result<UserspaceWg> {
        let process = Process::builder(name, program, work.join(format!("{name}.log")))
            .netns(ns)
            .args(args)
            .arg(name)
            .env("WG_SUDO", "1")
            .spawn()?;
        let sock = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if !process.is_running() || Instant::now() > deadline {
                bail!(
                    "{} did not create {} within 10 s; log: {}",
                    program.display(),
                    sock.display(),
                    process.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(UserspaceWg {
            process,
            ns: ns.name().to_string(),
            name: name.to_string(),
            kind,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn configure(
        &self,
        secret: &tunnel::StaticSecret,
        peer: &tunnel::PublicKey,
        peer_under: Ipv4Addr,
        own: Ipv4Addr,
        peer_over: Ipv4Addr,
        port: u16,
        work: &Path,
    ) -> anyhow::Result<()> {
        let key_path = work.join(format!("{}.key", self.name));
        write_secret(
            &key_path,
            &base64::engine::general_purpose::STANDARD.encode(secret.to_bytes()),
        )?;
        let ns = Netns::existing(&self.ns)?;
        let mut cmd = ns.exec("wg");
        cmd.args(["set", &self.name, "listen-port", &port.to_string(), "private-key"])
            .arg(&key_path)
            .args([
                "peer",
                &tunnel::keys::public_key_to_base64(peer),
                "endpoint",
                &format!("{peer_under}:{port}"),
                "allowed-ips",
                &format!("{peer_over}/32"),
            ]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!(
                "wg set {} failed: {}; daemon log: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr),
                self.process.log()
            );
        }
        ns.ip(["addr", "add", &format!("{own}/24"), "dev", &self.name])?;
        ns.ip(["link", "set", &self.name, "mtu", &MTU.to_string(), "up"])?;
        Ok(())
    }
}

impl Drop for UserspaceWg {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(3));
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.name));
    }
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing key file {}", path.display()))
}

/// Our tunnel on a thread inside a namespace.
struct OurEndpoint {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl OurEndpoint {
    fn start(
        ns: &Netns,
        secret: tunnel::StaticSecret,
        peer: tunnel::PublicKey,
        peer_under: Ipv4Addr,
        own: Ipv4Addr,
        peer_over: Ipv4Addr,
        port: u16,
    ) -> anyhow::Result<OurEndpoint> {
        let path = PathBuf::from("/var/run/netns").join(ns.name());
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on an open namespace fd changes only this thread (and threads it spawns later).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let _ = ready_tx.send(Err(std::io::Error::last_os_error()).context("setns"));
                return;
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .thread_name(OUR_THREADS)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e).context("tokio runtime"));
                    return;
                }
            };
            rt.block_on(async move {
                let cfg = tunnel::TunnelConfig {
                    mtu: MTU,
                    ..tunnel::TunnelConfig::new(secret, (Ipv4Addr::UNSPECIFIED, port).into(), OUR_TUN, own, 24)
                };
                let started = async {
                    let t = tunnel::Tunnel::start(cfg).await?;
                    t.add_peer(tunnel::PeerConfig {
                        public_key: peer,
                        endpoint: Some((peer_under, port).into()),
                        allowed_ips: vec![format!("{peer_over}/32").parse()?],
                        persistent_keepalive: Some(25),
                    })?;
                    anyhow::Ok(t)
                }
                .await;
                match started {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stop_rx.await;
                        t.shutdown().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(OurEndpoint { stop: stop_tx, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.context(format!("starting our tunnel in {}", ns.name())))
            }
            Err(_) => bail!("our tunnel in {} did not start within 10 s", ns.name()),
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// CPU time (ns) of every thread of process `pid` (`/proc/PID/task/*/schedstat`); 0 if it is gone.
fn process_cpu_ns(pid: u32) -> u64 {
    threads_cpu_ns(pid, "")
}

/// `program` on PATH or in ~/.cargo/bin.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(program)).find(|p| p.is_file())
}

fn tool_version(program: &str, args: &[&str]) -> Option<String> {
    let path = which(program)?;
    let mut cmd = std::process::Command::new(path);
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(5)).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    (!first.is_empty()).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_medians_of_rounds_with_their_spread() {
        assert_eq!(median_f64(&[]), 0.0);
        assert_eq!(median_f64(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let ms = |v: u64| Duration::from_micros(v);
        let m = Measured {
            bps: vec![100.0, 300.0, 200.0],
            rtt_p50: vec![ms(220), ms(200), ms(260)],
            pings: 90,
            lost: 0,
            ping_cpu_ns: Some(90 * 250_000),
        };
        assert_eq!(m.bps(), 200.0);
        assert_eq!(m.rtt(), ms(220), "the median round, not the mean");
        assert_eq!(m.rtt_spread(ms(200)), "1.00–1.30");
        assert_eq!(m.bps_spread(100.0), "1.000–3.000");
        assert_eq!(m.cpu_per_echo_us(), Some(250.0));
        let kernel = Measured {
            ping_cpu_ns: None,
            ..Measured::default()
        };
        assert_eq!(kernel.cpu_per_echo_us(), None);
    }

    #[test]
    fn every_tunnel_has_its_own_port_and_overlay() {
        let kinds = [Kind::WireguardGo, Kind::BoringtunCli, Kind::Ours];
        for (i, a) in kinds.iter().enumerate() {
            for b in &kinds[i + 1..] {
                assert_ne!(a.port(), b.port());
                assert_ne!(a.overlay(1), b.overlay(1));
            }
            assert_eq!(a.target(), a.overlay(2));
        }
        assert_eq!(Kind::Plain.target(), UNDER_B);
    }
}
