//! Section `tunnel`: TCP throughput (iperf3) and ping RTT between two namespaces joined by a veth pair, over
//! (a) the plain veth, (b) wireguard-go, (c) boringtun-cli and (d) our embedded tunnel (`tunnel::Tunnel`).
//!
//! Every figure is a ratio against the plain veth measured in the same run, plus ours against boringtun-cli.
//! This kernel has no WireGuard module, so kernel WireGuard is not compared.
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

use crate::report::Table;

/// Underlay (veth) addresses.
const UNDER_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const UNDER_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// Overlay (tunnel) addresses.
const OVER_A: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 1);
const OVER_B: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 2);
const WG_PORT: u16 = 51820;
const IPERF_PORT: u16 = 5201;
/// The tunnels' MTU (wg-quick's default; also our `DEFAULT_MTU`).
const MTU: u16 = 1420;

/// One measured path.
struct Measured {
    /// Receiver-side TCP throughput, bit/s.
    bps: f64,
    /// Median ping RTT.
    rtt_p50: Duration,
    /// Pings lost.
    lost: u32,
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
}

struct Params {
    iperf_secs: u32,
    pings: u32,
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Table>> {
    let params = if quick {
        Params {
            iperf_secs: 3,
            pings: 20,
        }
    } else {
        Params {
            iperf_secs: 10,
            pings: 50,
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
            "ping RTT p50 (× plain veth)",
            "pings lost",
        ],
    );
    let mut results: Vec<(Kind, Measured)> = Vec::new();

    let plain = measure(&pair, UNDER_B, &params, work.path()).context("plain veth")?;
    table.note(format!(
        "Reference (plain veth, this run): {:.2} Gbit/s, ping p50 {:.3} ms. iperf3 TCP {} s, one stream, \
         receiver side; ping: {} echo requests 20 ms apart, median.",
        plain.bps / 1e9,
        ms(plain.rtt_p50),
        params.iperf_secs,
        params.pings
    ));
    results.push((Kind::Plain, plain));

    for kind in [Kind::WireguardGo, Kind::BoringtunCli, Kind::Ours] {
        match measure_tunnel(kind, &pair, &params, work.path()) {
            Ok(m) => results.push((kind, m)),
            Err(e) => table.note(format!("{}: not measured: {e:#}", kind.label())),
        }
    }

    let plain = &results[0].1;
    table.note(format!(
        "Absolute figures of this run (for orientation only): {}.",
        results
            .iter()
            .map(|(k, m)| format!("{} {:.0} Mbit/s, {:.3} ms", k.label(), m.bps / 1e6, ms(m.rtt_p50)))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    for (kind, m) in &results {
        table.row(vec![
            kind.label().to_string(),
            format!("{:.3}×", m.bps / plain.bps),
            format!("{:.2}×", ratio(m.rtt_p50, plain.rtt_p50)),
            format!("{}/{}", m.lost, params.pings),
        ]);
    }
    let find = |k: Kind| results.iter().find(|(kind, _)| *kind == k).map(|(_, m)| m);
    if let (Some(ours), Some(bt)) = (find(Kind::Ours), find(Kind::BoringtunCli)) {
        let tput = ours.bps / bt.bps;
        let rtt = ratio(ours.rtt_p50, bt.rtt_p50);
        table.row(vec![
            "**ours vs boringtun-cli** (goal ≥ 0.9× throughput, RTT ≤ 1×)".into(),
            format!("{tput:.2}× ({})", if tput >= 0.9 { "meets goal" } else { "BELOW goal" }),
            format!("{rtt:.2}× ({})", if rtt <= 1.0 { "meets goal" } else { "worse" }),
            String::new(),
        ]);
    }
    if let Some(bt) = find(Kind::BoringtunCli)
        && let Some(wg) = find(Kind::WireguardGo)
    {
        table.note(format!(
            "boringtun-cli vs wireguard-go: {:.2}× throughput, {:.2}× RTT.",
            bt.bps / wg.bps,
            ratio(bt.rtt_p50, wg.rtt_p50)
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
        "Implementations: wireguard-go {}; boringtun-cli {}; ours runs in the bench process (one thread per \
         namespace with a multi-thread tokio runtime, {} workers). Section wall time {:.0} s.",
        tool_version("wireguard-go", &["--version"]).unwrap_or_else(|| "missing".into()),
        tool_version("boringtun-cli", &["--version"]).unwrap_or_else(|| "missing".into()),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        started.elapsed().as_secs_f64()
    ));
    drop(pair);
    Ok(vec![table])
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

/// iperf3 from `a` to `target` (server in `b`) and pings from `a` to `target`.
fn measure(pair: &Pair, target: Ipv4Addr, p: &Params, work: &Path) -> anyhow::Result<Measured> {
    // Warm up the path (handshake, ARP) and check it works at all.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pair.a.ping(target.into()) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => bail!("{target} does not answer pings from the peer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let pings = e2e::ping_rtts(&pair.a, target, p.pings, Duration::from_millis(20))?;
    let mut rtts = pings.rtts.clone();
    rtts.sort();
    let Some(rtt_p50) = rtts.get(rtts.len() / 2).copied() else {
        bail!("no ping replies from {target}");
    };
    let lost = pings.transmitted.saturating_sub(pings.received);

    let server = Process::builder("iperf3-server", "iperf3", work.join(format!("iperf3-{target}.log")))
        .netns(&pair.b)
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string(), "-B", &target.to_string()])
        .spawn()?;
    let mut out = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.is_none() {
        let mut cmd = pair.a.exec("iperf3");
        cmd.args(["-c", &target.to_string(), "-p", &IPERF_PORT.to_string(), "-J", "-t"])
            .arg(p.iperf_secs.to_string());
        let o = run_with_timeout(&mut cmd, Duration::from_secs(u64::from(p.iperf_secs) + 20))?;
        if o.status.success() {
            out = Some(o);
        } else if Instant::now() > deadline {
            bail!(
                "iperf3 client failed: {} {}; server log: {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                server.log()
            );
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    server.stop(Duration::from_secs(2));
    let json: serde_json::Value =
        serde_json::from_slice(&out.map(|o| o.stdout).unwrap_or_default()).context("iperf3 -J printed no JSON")?;
    let bps = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3 JSON without end.sum_received.bits_per_second")?;
    Ok(Measured { bps, rtt_p50, lost })
}

fn measure_tunnel(kind: Kind, pair: &Pair, p: &Params, work: &Path) -> anyhow::Result<Measured> {
    let sa = tunnel::keys::generate_secret();
    let sb = tunnel::keys::generate_secret();
    let pa = tunnel::keys::public_key_of(&sa);
    let pb = tunnel::keys::public_key_of(&sb);
    match kind {
        Kind::Plain => measure(pair, UNDER_B, p, work),
        Kind::Ours => {
            let ea = OurEndpoint::start(&pair.a, sa, pb, UNDER_B, OVER_A)?;
            let eb = OurEndpoint::start(&pair.b, sb, pa, UNDER_A, OVER_B)?;
            let m = measure(pair, OVER_B, p, work);
            ea.stop();
            eb.stop();
            m
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
            let da = UserspaceWg::start(&program, args, &pair.a, &name_a, work)?;
            let db = UserspaceWg::start(&program, args, &pair.b, &name_b, work)?;
            da.configure(&sa, &pb, UNDER_B, OVER_A, OVER_B, work)?;
            db.configure(&sb, &pa, UNDER_A, OVER_B, OVER_A, work)?;
            let m = measure(pair, OVER_B, p, work);
            drop(da);
            drop(db);
            m
        }
    }
}

/// wireguard-go or boringtun-cli in the foreground in a namespace, configured with `wg`.
struct UserspaceWg {
    process: Process,
    ns: String,
    name: String,
}

impl UserspaceWg {
    fn start(program: &Path, args: &[&str], ns: &Netns, name: &str, work: &Path) -> anyhow::Result<UserspaceWg> {
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
        })
    }

    fn configure(
        &self,
        secret: &tunnel::StaticSecret,
        peer: &tunnel::PublicKey,
        peer_under: Ipv4Addr,
        own: Ipv4Addr,
        peer_over: Ipv4Addr,
        work: &Path,
    ) -> anyhow::Result<()> {
        let key_path = work.join(format!("{}.key", self.name));
        write_secret(
            &key_path,
            &base64::engine::general_purpose::STANDARD.encode(secret.to_bytes()),
        )?;
        let ns = Netns::existing(&self.ns)?;
        let mut cmd = ns.exec("wg");
        cmd.args(["set", &self.name, "listen-port", &WG_PORT.to_string(), "private-key"])
            .arg(&key_path)
            .args([
                "peer",
                &tunnel::keys::public_key_to_base64(peer),
                "endpoint",
                &format!("{peer_under}:{WG_PORT}"),
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
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e).context("tokio runtime"));
                    return;
                }
            };
            rt.block_on(async move {
                let cfg = tunnel::TunnelConfig {
                    mtu: MTU,
                    ..tunnel::TunnelConfig::new(secret, (Ipv4Addr::UNSPECIFIED, WG_PORT).into(), "nbtun0", own, 24)
                };
                let started = async {
                    let t = tunnel::Tunnel::start(cfg).await?;
                    let allowed = if own == OVER_A { OVER_B } else { OVER_A };
                    t.add_peer(tunnel::PeerConfig {
                        public_key: peer,
                        endpoint: Some((peer_under, WG_PORT).into()),
                        allowed_ips: vec![format!("{allowed}/32").parse()?],
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
