//! Section `wg-peers`: WireGuard peer scale at the coordinator (issue 12, item 2).
//!
//! The coordinator side is the production I/O shell, [`tunnel::Tunnel`] (TUN device + one UDP
//! socket + the sans-IO `Router` behind a mutex), started on its own tokio runtime inside a
//! fresh network namespace; its threads and the tunnel's packet thread are named `wg-nbwg0`. The generator side is N in-process
//! boringtun `Tunn`s (one per simulated agent, keepalive 25 s like the agent) behind one UDP
//! socket on the namespace's loopback, driven from the calling thread.
//!
//! What it measures, in order:
//! 1. a reference: x25519 Diffie-Hellman operations per second on one thread (the unit every
//!    handshake figure is expressed in, so the figures survive a noisy machine);
//! 2. memory: RSS and malloc'd bytes before/after configuring N peers, and after every peer has a
//!    session (the generator's own share is removed by dropping it at the end);
//! 3. handshakes per second at increasing offered load (open loop), then closed loop at the
//!    maximum; the knee is the last load the coordinator keeps up with (≥ 90 % completed). The
//!    generator completes every handshake it is answered (its own Diffie-Hellman work shares the
//!    two cores with the coordinator);
//! 4. CPU of the coordinator threads (`/proc/self/task/*/schedstat`) with N established, silent
//!    peers (the idle reference), then with every peer sending a keepalive every 25 s (N/25 per
//!    second, spread evenly like desynchronised agents);
//! 5. capacity: the coordinator alone, answering one pre-formed initiation per peer as fast as
//!    it can (the generator only sends and counts), with the rate limit lifted, on a runtime with
//!    one worker thread and on one with a worker per core: how many handshakes per second the
//!    coordinator answers and how many cores it uses (a second tunnel with the same key and peers
//!    in the same namespace, threads `wg-nbwgc<workers>`);
//! 6. where a handshake's CPU goes: the three steps of answering an initiation
//!    (`Router::accept_initiation` under the router lock, `Initiation::answer` without it,
//!    `Router::finish_initiation` under it again) timed with the thread's CPU clock on a plain
//!    `Router` with the same peers, no I/O. The share under the lock bounds how many cores
//!    handshakes can use (Amdahl).
//!
//! Figures are counts (bytes, packets) or ratios to a reference taken in the same run.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use e2e::Netns;
use tunnel::{PeerConfig, PublicKey, Router, StaticSecret, Tunnel, TunnelConfig};

use crate::cpu::own_threads_cpu_ns;
use crate::report::Table;

/// Persistent keepalive of an agent toward the coordinator (seconds).
const KEEPALIVE_SECS: u64 = 25;
/// TUN of the coordinator-side tunnel.
const COORD_TUN: &str = "nbwg0";
/// Name prefix of the coordinator-side threads (what the CPU figures add up): the runtime's
/// threads and the tunnel's packet thread, which the tunnel names `wg-<tun name>`.
const COORD_THREAD: &str = "wg-nbwg0";
/// TUN name prefix of the capacity tunnels (the number of runtime workers follows).
const CAPACITY_TUN: &str = "nbwgc";
/// Name prefix of the capacity tunnels' threads (runtime and packet thread, as above).
const CAPACITY_THREAD: &str = "wg-nbwgc";
/// Initiations in flight during the capacity measurement (below what the coordinator's socket
/// buffer holds, about 270 datagrams at the default 208 KiB).
const CAPACITY_WINDOW: usize = 128;
/// Closed-loop window: handshakes in flight at once when the offered load is "max".
const MAX_IN_FLIGHT: usize = 256;
/// A handshake not answered within this is counted lost and its peer becomes free again.
const LOST_AFTER: Duration = Duration::from_secs(2);
/// WireGuard message types.
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;

struct Params {
    peers: usize,
    /// Offered handshake loads (per second); `None` is closed loop with [`MAX_IN_FLIGHT`].
    levels: Vec<Option<f64>>,
    level_time: Duration,
    cpu_window: Duration,
}

impl Params {
    fn new(quick: bool) -> Params {
        if quick {
            Params {
                peers: 1_000,
                levels: vec![Some(50.0), Some(200.0), Some(800.0), Some(1_600.0), Some(3_200.0), None],
                level_time: Duration::from_millis(1_500),
                cpu_window: Duration::from_secs(4),
            }
        } else {
            Params {
                peers: 10_000,
                levels: vec![
                    Some(50.0),
                    Some(200.0),
                    Some(500.0),
                    Some(1_000.0),
                    Some(2_000.0),
                    Some(4_000.0),
                    Some(8_000.0),
                    None,
                ],
                level_time: Duration::from_secs(4),
                cpu_window: Duration::from_secs(15),
            }
        }
    }
}

/// Runs the section; see the module docs.
pub fn run(quick: bool) -> Result<Vec<Table>> {
    let p = Params::new(quick);
    let dh_per_sec = dh_reference(Duration::from_millis(if quick { 300 } else { 1_000 }));

    let ns = Netns::create(&format!("{}-wg", e2e::netns::unique_prefix())).context("creating the namespace")?;
    let ns_name = ns.name().to_string();
    let rt = ns
        .run_in(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name(COORD_THREAD)
                .enable_all()
                .build()
        })
        .context("entering the namespace")?
        .context("starting the coordinator runtime")?;
    let secret = tunnel::keys::generate_secret();
    let cfg = TunnelConfig::new(
        secret.clone(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        COORD_TUN,
        Ipv4Addr::new(10, 200, 0, 1),
        16,
    );
    // Spawned (not block_on) so the socket and TUN are created on a runtime thread, in the namespace.
    let tun = rt
        .block_on(rt.spawn(Tunnel::start(cfg)))
        .context("coordinator tunnel task")?
        .context("starting the coordinator tunnel")?;
    let result = measure(&p, &ns, &tun, &secret, dh_per_sec);
    rt.block_on(tun.shutdown());
    drop(rt);
    drop(ns);
    let tables = result?;
    if Netns::exists(&ns_name) {
        bail!("namespace {ns_name} is still there after the run; delete it with `ip netns del {ns_name}`");
    }
    Ok(tables)
}

/// Samples of the coordinator's threads' CPU time and the process memory.
#[derive(Clone, Copy, Debug)]
struct Mem {
    rss: u64,
    heap: u64,
}

fn measure(p: &Params, ns: &Netns, tun: &Tunnel, secret: &StaticSecret, dh_per_sec: f64) -> Result<Vec<Table>> {
    let n = p.peers;
    let coord_key = tun.public_key();
    let coord_addr = tun.local_udp_addr();

    // Empty-tunnel reference: the coordinator's runtime with no peers.
    let empty_cpu = coord_cpu_over(p.cpu_window.min(Duration::from_secs(5)), || Ok(()))?;

    let m0 = mem();
    let sock = ns
        .run_in(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .context("entering the namespace")?
        .context("binding the generator socket")?;
    let mut generator = Generator::new(sock, coord_addr, coord_key, n)?;
    let m1 = mem();
    for (i, key) in generator.keys.iter().enumerate() {
        tun.add_peer(PeerConfig {
            public_key: *key,
            endpoint: None,
            allowed_ips: vec![format!("{}/32", overlay_ip(i)).parse().context("overlay address")?],
            persistent_keepalive: None, // as the coordinator configures agents (enroll.rs)
        })
        .with_context(|| format!("adding peer {i}"))?;
    }
    let m2 = mem();
    // Tick cost over configured peers without sessions.
    let configured_cpu = coord_cpu_over(p.cpu_window.min(Duration::from_secs(5)), || Ok(()))?;

    // Handshake sweep.
    let mut hs = Table::new(
        format!("WireGuard handshakes at the coordinator ({n} peers, one UDP socket)"),
        &[
            "offered load",
            "handshakes/s",
            "× DH reference",
            "completed / offered",
            "cookie replies",
            "lost (of which dropped at a full socket buffer)",
            "coordinator CPU (cores)",
            "coordinator CPU per handshake (DH equivalents)",
            "generator CPU (cores)",
        ],
    );
    let mut results = Vec::new();
    for level in &p.levels {
        let lost0 = generator.lost;
        let drops0 = udp_rcvbuf_errors(ns);
        let mut r = generator.run_level(*level, p.level_time)?;
        generator.drain(Duration::from_millis(300))?;
        generator.forget_in_flight();
        r.lost = generator.lost - lost0;
        let drops = udp_rcvbuf_errors(ns).saturating_sub(drops0);
        let offered = level.map_or_else(|| "max (256 in flight)".to_string(), |l| format!("{l:.0}/s"));
        let ratio = level.map_or("–".to_string(), |l| format!("{:.2}", r.rate / l));
        hs.row(vec![
            offered,
            format!("{:.0}", r.rate),
            format!("{:.4}", r.rate / dh_per_sec),
            ratio,
            r.cookies.to_string(),
            format!("{} ({drops})", r.lost),
            format!("{:.2}", r.coord_cpu),
            if r.rate > 0.0 {
                format!("{:.1}", r.coord_cpu / r.rate * dh_per_sec)
            } else {
                "–".to_string()
            },
            format!("{:.2}", r.gen_cpu),
        ]);
        results.push((*level, r));
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let best = results.iter().map(|(_, r)| r.rate).fold(0.0, f64::max);
    let knee = results
        .iter()
        .filter_map(|(l, r)| l.filter(|l| r.rate >= 0.9 * l).map(|l| (l, r)))
        .next_back();
    let top = results.last().map(|(_, r)| r);
    hs.note(format!(
        "Reference: {dh_per_sec:.0} x25519 Diffie-Hellman operations per second on one thread in this run; \
         \"× DH reference\" is handshakes/s over that (a responder handshake costs about 4 DH plus one key \
         generation, so a coordinator-bound ceiling is about 0.2 per busy core)."
    ));
    if let (Some((l, _)), Some(top)) = (knee, top) {
        hs.note(format!(
            "Knee: the coordinator completes ≥ 90 % of an offered {l:.0} handshakes/s; the most it completed was \
             {best:.0}/s ({:.3} × DH reference). At the top the coordinator threads used {:.2} cores and the \
             generator {:.2}. {}",
            best / dh_per_sec,
            top.coord_cpu,
            top.gen_cpu,
            if top.coord_cpu + top.gen_cpu >= 0.85 * cores as f64 {
                "Limit: the machine. The generator completes every handshake too (about as much \
                 Diffie-Hellman work as the coordinator's), and both share the same cores; the capacity rows \
                 show the coordinator alone."
            } else {
                "Limit: not CPU (below the cores available): socket buffers and the generator's single \
                 thread; the ratio column (CPU per handshake in DH equivalents) is the figure that carries over \
                 to another machine."
            }
        ));
    }
    hs.note(format!(
        "Cookie replies: the router's handshake rate limit grows with the peers (tunnel::handshake_rate_limit: \
         one handshake message per second per 10 peers, at least 100; {} per second at {n} peers; rekeys of \
         {n} sessions need {:.0}/s); beyond it initiations are answered with a cookie. The generator resends at \
         once with the cookie (as WireGuard's under-load mode intends), so each such handshake costs one extra \
         round trip and one more initiation on the generator's side, but no Diffie-Hellman at the coordinator \
         for the refused one. All generator peers share one source address here; real agents each have their \
         own.",
        tunnel::handshake_rate_limit(n),
        n as f64 / 120.0
    ));

    // Every peer needs a session before the keepalive phase.
    generator.establish_all(Duration::from_secs(if n > 2_000 { 30 } else { 10 }))?;
    let established = generator.peers.iter().filter(|g| g.established).count();
    let m3 = mem();

    // Idle reference: N established sessions, nothing sent (only the router's 250 ms tick runs).
    let idle_cpu = coord_cpu_over(p.cpu_window, || generator.pump(false).map(|_| ()))?;
    // Keepalives: N / 25 per second, evenly spread.
    let ka_before = generator.keepalives_sent;
    let ka_cpu = generator.keepalive_phase(p.cpu_window)?;
    let ka_sent = generator.keepalives_sent - ka_before;
    let rejected = tun.counters().rejected;

    // Capacity: the coordinator alone, one worker thread and then one per core.
    let mut capacities = Vec::new();
    for workers in [1, cores] {
        let c = capacity(ns, secret, &mut generator, workers, Duration::from_secs(8))
            .with_context(|| format!("capacity with {workers} worker thread(s)"))?;
        hs.row(vec![
            format!("capacity: pre-formed, limit lifted, {workers} worker thread(s)"),
            format!("{:.0}", c.rate),
            format!("{:.4}", c.rate / dh_per_sec),
            format!("{} / {} answered", c.answered, c.sent),
            c.cookies.to_string(),
            format!("{} ({})", c.sent.saturating_sub(c.answered), c.drops),
            format!("{:.2}", c.coord_cpu),
            if c.rate > 0.0 {
                format!("{:.1}", c.coord_cpu / c.rate * dh_per_sec)
            } else {
                "–".to_string()
            },
            format!("{:.2}", c.gen_cpu),
        ]);
        capacities.push((workers, c));
    }
    let split = split_profile(secret, &mut generator, n.min(3_000)).context("profiling the handshake steps")?;
    let dh_us = 1e6 / dh_per_sec;
    hs.note(format!(
        "Where a handshake's CPU goes ({} initiations answered by a plain Router with the same {n} peers, thread \
         CPU clock, no I/O): under the router lock {:.0} µs ({:.1} DH) for MAC1, rate limit and finding the peer \
         (decrypting the initiator's static key takes one Diffie-Hellman) plus {:.1} µs to record the answer; \
         outside it {:.0} µs ({:.1} DH) in the peer's session (the same Diffie-Hellman again inside boringtun, \
         the ephemeral key, two more for the response). {:.0} % of the work holds the router lock, so handshakes \
         can use up to {:.1} cores (before this split all of it did: one core).",
        split.count,
        split.accept_us,
        split.accept_us / dh_us,
        split.finish_us,
        split.answer_us,
        split.answer_us / dh_us,
        100.0 * split.serial_fraction(),
        1.0 / split.serial_fraction().max(1e-9)
    ));
    if let [(w1, one), .., (wn, all)] = capacities.as_slice() {
        hs.note(format!(
            "Capacity rows: one pre-formed initiation per peer, {CAPACITY_WINDOW} in flight, the rate limit lifted, \
             the generator only counts the responses (no Diffie-Hellman on its side), a fresh tunnel with the same \
             key and peers. {w1} worker thread: {:.0} handshakes/s on {:.2} cores; {wn} worker threads: {:.0}/s on \
             {:.2} cores ({:.2}× one worker). Initiations are answered by one handshake task per runtime worker \
             (the coordinator's runtime has one worker per core); the router lock covers only the MAC, rate-limit \
             and peer-lookup step, the peer's own session does the rest without it.",
            one.rate,
            one.coord_cpu,
            all.rate,
            all.coord_cpu,
            all.rate / one.rate.max(1e-9)
        ));
    }
    let gen_stats = (generator.handshakes_completed, generator.cookies);
    drop(generator);
    let m4 = mem();

    let per_min = |cores: f64| cores * 60.0;
    let mut cpu = Table::new(
        format!("Coordinator CPU with {n} WireGuard peers (keepalive every {KEEPALIVE_SECS} s)"),
        &["state", "CPU s per minute", "× idle reference"],
    );
    let ratio = |c: f64| {
        if idle_cpu > 0.0 {
            format!("{:.2}", c / idle_cpu)
        } else {
            "–".to_string()
        }
    };
    cpu.row(vec![
        "tunnel with no peers".into(),
        format!("{:.3}", per_min(empty_cpu)),
        ratio(empty_cpu),
    ]);
    cpu.row(vec![
        format!("{n} peers configured, no sessions"),
        format!("{:.3}", per_min(configured_cpu)),
        ratio(configured_cpu),
    ]);
    cpu.row(vec![
        format!("{established} sessions, silent (idle reference)"),
        format!("{:.3}", per_min(idle_cpu)),
        "1.00".into(),
    ]);
    cpu.row(vec![
        format!("{established} sessions, keepalive every {KEEPALIVE_SECS} s ({ka_sent} sent)"),
        format!("{:.3}", per_min(ka_cpu)),
        ratio(ka_cpu),
    ]);
    cpu.note(format!(
        "CPU of the coordinator runtime threads (`{COORD_THREAD}`, schedstat) over {:.0} s windows, as CPU \
         seconds per wall minute (60 = one core busy). The idle reference is the same tunnel with the same \
         established sessions and no traffic: what remains is the router's tick (every 250 ms it runs \
         boringtun's timers over every peer, O(peers)). Keepalives add one UDP receive, one ChaCha20-Poly1305 \
         open and one mutex round per packet ({:.0}/s here).",
        p.cpu_window.as_secs_f64(),
        n as f64 / KEEPALIVE_SECS as f64
    ));
    cpu.note(format!(
        "Steady state also holds rekeys: every session is renewed after 120 s, i.e. {:.0} handshakes/s at {n} \
         peers ({:.4} × DH reference per second of CPU work, see the handshake table).",
        n as f64 / 120.0,
        n as f64 / 120.0 / dh_per_sec
    ));
    if rejected > 0 {
        cpu.note(format!(
            "The router rejected {rejected} datagrams during the run (MAC, replay or decryption)."
        ));
    }

    let per_peer = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / n as f64;
    let mut mem_t = Table::new(
        format!("Coordinator memory per WireGuard peer ({n} peers)"),
        &["what", "RSS delta / peer (bytes)", "heap delta / peer (bytes)"],
    );
    mem_t.row(vec![
        "peer configured (Tunn + tables), no session".into(),
        format!("{:.0}", per_peer(m1.rss, m2.rss)),
        format!("{:.0}", per_peer(m1.heap, m2.heap)),
    ]);
    mem_t.row(vec![
        "session established, both sides (coordinator + generator)".into(),
        format!("{:.0}", per_peer(m2.rss, m3.rss)),
        format!("{:.0}", per_peer(m2.heap, m3.heap)),
    ]);
    mem_t.row(vec![
        "coordinator total with sessions (generator dropped)".into(),
        "–".into(),
        format!("{:.0}", per_peer(m0.heap, m4.heap)),
    ]);
    mem_t.note(format!(
        "Counts on this machine: RSS from /proc/self/statm, heap = bytes in use by malloc (mallinfo2: arenas + \
         mmapped chunks), each delta divided by {n}. The last row is measured after the generator's Tunns are \
         freed, so it is the coordinator's own state per peer. At 10 000 peers multiply by 10 000 for the \
         tunnel's share of the coordinator's RSS. The generator completed {} handshakes and received {} cookie \
         replies in total.",
        gen_stats.0, gen_stats.1
    ));
    Ok(vec![hs, cpu, mem_t])
}

/// Mean thread-CPU time of each step of answering an initiation.
struct Split {
    count: usize,
    accept_us: f64,
    answer_us: f64,
    finish_us: f64,
}

impl Split {
    /// Share of the work done under the router lock.
    fn serial_fraction(&self) -> f64 {
        let locked = self.accept_us + self.finish_us;
        locked / (locked + self.answer_us).max(1e-9)
    }
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), in nanoseconds.
fn thread_clock_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Answers `count` pre-formed initiations with a plain [`Router`] (same key and peers as the
/// coordinator tunnel) and times each step on this thread's CPU clock.
fn split_profile(secret: &StaticSecret, generator: &mut Generator, count: usize) -> Result<Split> {
    let mut router = Router::new(secret.clone());
    for (i, key) in generator.keys.iter().enumerate() {
        router
            .add_peer(PeerConfig {
                public_key: *key,
                endpoint: None,
                allowed_ips: vec![format!("{}/32", overlay_ip(i)).parse().context("overlay address")?],
                persistent_keepalive: None,
            })
            .with_context(|| format!("adding peer {i}"))?;
    }
    router.set_handshake_rate_limit(Some(u64::MAX));
    let inits = generator.preform();
    let src = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    let mut buf = vec![0u8; tunnel::router::SCRATCH_LEN];
    let mut out = Vec::new();
    let (mut accept, mut answer, mut finish, mut done) = (0u64, 0u64, 0u64, 0usize);
    for init in inits.iter().take(count) {
        let t0 = thread_clock_ns();
        let Some(initiation) = router.accept_initiation(src, init, &mut out) else {
            continue;
        };
        let t1 = thread_clock_ns();
        let answered = initiation.answer(&mut buf);
        let t2 = thread_clock_ns();
        router.finish_initiation(answered, &mut out);
        let t3 = thread_clock_ns();
        out.clear();
        accept += t1 - t0;
        answer += t2 - t1;
        finish += t3 - t2;
        done += 1;
    }
    if done == 0 {
        bail!(
            "the router accepted none of {} initiations: {:?}",
            inits.len().min(count),
            router.counters()
        );
    }
    let us = |ns: u64| ns as f64 / 1e3 / done as f64;
    Ok(Split {
        count: done,
        accept_us: us(accept),
        answer_us: us(answer),
        finish_us: us(finish),
    })
}

/// What one capacity run measured.
#[derive(Debug, Default)]
struct Capacity {
    rate: f64,
    sent: u64,
    answered: u64,
    cookies: u64,
    /// Datagrams the kernel dropped at a full socket buffer meanwhile (namespace-wide).
    drops: u64,
    coord_cpu: f64,
    gen_cpu: f64,
}

/// Starts a second coordinator tunnel (same key, same peers, another UDP port, TUN and overlay
/// prefix) on a runtime with `workers` worker threads, lifts its handshake rate limit, and has the
/// generator send it one pre-formed initiation per peer, `CAPACITY_WINDOW` in flight, for at
/// most `time`.
fn capacity(
    ns: &Netns,
    secret: &StaticSecret,
    generator: &mut Generator,
    workers: usize,
    time: Duration,
) -> Result<Capacity> {
    let rt = ns
        .run_in(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(format!("{CAPACITY_THREAD}{workers}"))
                .enable_all()
                .build()
        })
        .context("entering the namespace")?
        .context("starting the capacity runtime")?;
    let cfg = TunnelConfig::new(
        secret.clone(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        format!("{CAPACITY_TUN}{workers}"),
        Ipv4Addr::new(10, 201, 0, 1),
        16,
    );
    let tun = rt
        .block_on(rt.spawn(Tunnel::start(cfg)))
        .context("capacity tunnel task")?
        .context("starting the capacity tunnel")?;
    let result = (|| {
        for (i, key) in generator.keys.iter().enumerate() {
            let ip = Ipv4Addr::from(u32::from(overlay_ip(i)) + (1 << 16));
            tun.add_peer(PeerConfig {
                public_key: *key,
                endpoint: None,
                allowed_ips: vec![format!("{ip}/32").parse().context("overlay address")?],
                persistent_keepalive: None,
            })
            .with_context(|| format!("adding peer {i}"))?;
        }
        tun.set_handshake_rate_limit(Some(u64::MAX));
        let inits = generator.preform();
        let drops0 = udp_rcvbuf_errors(ns);
        let c0 = own_threads_cpu_ns(&format!("{CAPACITY_THREAD}{workers}"));
        let g0 = this_thread_cpu_ns();
        let (sent, answered, cookies, busy) = generator.blast(tun.local_udp_addr(), &inits, time)?;
        let secs = busy.as_secs_f64().max(1e-3);
        let c1 = own_threads_cpu_ns(&format!("{CAPACITY_THREAD}{workers}"));
        let g1 = this_thread_cpu_ns();
        // Late answers must not reach the generator's sessions with the main tunnel.
        generator.discard(Duration::from_millis(300))?;
        Ok(Capacity {
            rate: answered as f64 / secs,
            sent,
            answered,
            cookies,
            drops: udp_rcvbuf_errors(ns).saturating_sub(drops0),
            coord_cpu: c1.saturating_sub(c0) as f64 / 1e9 / secs,
            gen_cpu: g1.saturating_sub(g0) as f64 / 1e9 / secs,
        })
    })();
    rt.block_on(tun.shutdown());
    drop(rt);
    result
}

/// Overlay address of peer `i` (10.200.0.2 upwards).
fn overlay_ip(i: usize) -> Ipv4Addr {
    let v = u32::from(Ipv4Addr::new(10, 200, 0, 2)) + i as u32;
    Ipv4Addr::from(v)
}

/// x25519 DH operations per second on this thread.
fn dh_reference(time: Duration) -> f64 {
    let a = tunnel::keys::generate_secret();
    let b = PublicKey::from(&tunnel::keys::generate_secret());
    let start = Instant::now();
    let mut n = 0u64;
    let mut acc = 0u8;
    while start.elapsed() < time {
        for _ in 0..64 {
            acc ^= a.diffie_hellman(&b).as_bytes()[0];
        }
        n += 64;
    }
    std::hint::black_box(acc);
    n as f64 / start.elapsed().as_secs_f64()
}

fn mem() -> Mem {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * page;
    // SAFETY: mallinfo2 only reads glibc's allocator statistics.
    let mi = unsafe { libc::mallinfo2() };
    Mem {
        rss,
        heap: (mi.uordblks + mi.hblkhd) as u64,
    }
}

/// UDP datagrams the kernel dropped in the namespace because a receive buffer was full
/// (`Udp: RcvbufErrors` in /proc/net/snmp); 0 if unreadable.
fn udp_rcvbuf_errors(ns: &Netns) -> u64 {
    let text = ns
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(header), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    header
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(h, _)| *h == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// CPU nanoseconds of the calling thread.
fn this_thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Coordinator CPU (in cores) while `work` is called repeatedly for `window`.
fn coord_cpu_over(window: Duration, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    let c0 = own_threads_cpu_ns(COORD_THREAD);
    let start = Instant::now();
    while start.elapsed() < window {
        work()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let c1 = own_threads_cpu_ns(COORD_THREAD);
    Ok((c1.saturating_sub(c0)) as f64 / 1e9 / start.elapsed().as_secs_f64())
}

struct GenPeer {
    tunn: Tunn,
    in_flight: Option<Instant>,
    established: bool,
}

#[derive(Debug, Default)]
struct LevelResult {
    rate: f64,
    cookies: u64,
    lost: u64,
    coord_cpu: f64,
    gen_cpu: f64,
}

/// The simulated agents: one boringtun `Tunn` each, one UDP socket for all.
struct Generator {
    sock: UdpSocket,
    coord: SocketAddr,
    keys: Vec<PublicKey>,
    peers: Vec<GenPeer>,
    in_flight: usize,
    next: usize,
    buf: Vec<u8>,
    rx: Vec<u8>,
    handshakes_completed: u64,
    cookies: u64,
    lost: u64,
    keepalives_sent: u64,
}

impl Generator {
    fn new(sock: UdpSocket, coord: SocketAddr, coord_key: PublicKey, n: usize) -> Result<Generator> {
        sock.set_nonblocking(true).context("generator socket")?;
        set_buffers(&sock);
        let mut peers = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        for i in 0..n {
            let secret: StaticSecret = tunnel::keys::generate_secret();
            let public = PublicKey::from(&secret);
            // Each simulated agent answers only the coordinator: no rate limit on its side.
            let limiter = Arc::new(RateLimiter::new(&public, u64::MAX / 2));
            let tunn = Tunn::new(
                secret,
                coord_key,
                None,
                Some(KEEPALIVE_SECS as u16),
                i as u32,
                Some(limiter),
            );
            keys.push(public);
            peers.push(GenPeer {
                tunn,
                in_flight: None,
                established: false,
            });
        }
        Ok(Generator {
            sock,
            coord,
            keys,
            peers,
            in_flight: 0,
            next: 0,
            buf: vec![0u8; 2048],
            rx: vec![0u8; 2048],
            handshakes_completed: 0,
            cookies: 0,
            lost: 0,
            keepalives_sent: 0,
        })
    }

    fn send(&self, data: &[u8]) {
        // A full socket buffer drops the packet, as the network would; the handshake then counts as lost.
        let _ = self.sock.send_to(data, self.coord);
    }

    fn initiate(&mut self, i: usize) {
        let Generator {
            peers,
            buf,
            sock,
            coord,
            ..
        } = self;
        let peer = &mut peers[i];
        if let TunnResult::WriteToNetwork(pkt) = peer.tunn.format_handshake_initiation(buf, true) {
            let _ = sock.send_to(pkt, *coord);
            if peer.in_flight.replace(Instant::now()).is_none() {
                self.in_flight += 1;
            }
        }
    }

    /// The next peer without a handshake in flight (round robin), expiring lost ones.
    fn next_free(&mut self) -> Option<usize> {
        let n = self.peers.len();
        let now = Instant::now();
        for _ in 0..n {
            let i = self.next;
            self.next = (self.next + 1) % n;
            let peer = &mut self.peers[i];
            match peer.in_flight {
                None => return Some(i),
                Some(t) if now.duration_since(t) > LOST_AFTER => {
                    peer.in_flight = None;
                    self.in_flight -= 1;
                    self.lost += 1;
                    return Some(i);
                }
                Some(_) => {}
            }
        }
        None
    }

    /// Frees peers whose handshake has gone unanswered for [`LOST_AFTER`] (counted lost).
    fn expire_lost(&mut self) {
        let now = Instant::now();
        for peer in &mut self.peers {
            if peer.in_flight.is_some_and(|t| now.duration_since(t) > LOST_AFTER) {
                peer.in_flight = None;
                self.in_flight -= 1;
                self.lost += 1;
            }
        }
    }

    /// Gives up on every handshake still in flight (counted lost).
    fn forget_in_flight(&mut self) {
        for peer in &mut self.peers {
            if peer.in_flight.take().is_some() {
                self.lost += 1;
            }
        }
        self.in_flight = 0;
    }

    /// Processes every datagram waiting; returns how many. `resend_on_cookie`: answer a cookie
    /// reply with a fresh initiation at once (the sweep) instead of waiting for boringtun's retry.
    fn pump(&mut self, resend_on_cookie: bool) -> Result<usize> {
        let mut count = 0;
        loop {
            let (len, src) = match self.sock.recv_from(&mut self.rx) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(count),
                Err(e) => return Err(e).context("generator receive"),
            };
            count += 1;
            let dgram = &self.rx[..len];
            if len < 8 {
                continue;
            }
            let receiver_idx = match dgram[0] {
                MSG_RESPONSE => u32::from_le_bytes([dgram[8], dgram[9], dgram[10], dgram[11]]),
                MSG_COOKIE | MSG_DATA => u32::from_le_bytes([dgram[4], dgram[5], dgram[6], dgram[7]]),
                _ => continue,
            };
            let i = (receiver_idx >> 8) as usize;
            let Some(peer) = self.peers.get_mut(i) else { continue };
            let kind = dgram[0];
            match peer.tunn.decapsulate(Some(src.ip()), dgram, &mut self.buf) {
                TunnResult::WriteToNetwork(pkt) if kind == MSG_RESPONSE => {
                    let _ = self.sock.send_to(pkt, self.coord);
                    if peer.in_flight.take().is_some() {
                        self.in_flight -= 1;
                    }
                    peer.established = true;
                    self.handshakes_completed += 1;
                }
                TunnResult::Done if kind == MSG_COOKIE => {
                    self.cookies += 1;
                    if resend_on_cookie {
                        self.initiate(i);
                    }
                }
                _ => {}
            }
        }
    }

    fn run_level(&mut self, rate: Option<f64>, time: Duration) -> Result<LevelResult> {
        let (done0, cookies0, lost0) = (self.handshakes_completed, self.cookies, self.lost);
        let c0 = own_threads_cpu_ns(COORD_THREAD);
        let g0 = this_thread_cpu_ns();
        let start = Instant::now();
        let mut issued = 0u64;
        let mut last_expiry = start;
        while start.elapsed() < time {
            if last_expiry.elapsed() > Duration::from_millis(100) {
                self.expire_lost();
                last_expiry = Instant::now();
            }
            let due = match rate {
                Some(r) => (r * start.elapsed().as_secs_f64()) as u64,
                None => issued + MAX_IN_FLIGHT.saturating_sub(self.in_flight) as u64,
            };
            while issued < due {
                match self.next_free() {
                    Some(i) => self.initiate(i),
                    None => break,
                }
                issued += 1;
            }
            if self.pump(true)? == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let c1 = own_threads_cpu_ns(COORD_THREAD);
        let g1 = this_thread_cpu_ns();
        Ok(LevelResult {
            rate: (self.handshakes_completed - done0) as f64 / elapsed,
            cookies: self.cookies - cookies0,
            lost: self.lost - lost0,
            coord_cpu: (c1.saturating_sub(c0)) as f64 / 1e9 / elapsed,
            gen_cpu: (g1.saturating_sub(g0)) as f64 / 1e9 / elapsed,
        })
    }

    /// One fresh initiation per peer (their handshakes restart; sessions already made stay).
    fn preform(&mut self) -> Vec<Vec<u8>> {
        let Generator { peers, buf, .. } = self;
        peers
            .iter_mut()
            .filter_map(|p| match p.tunn.format_handshake_initiation(buf, true) {
                TunnResult::WriteToNetwork(pkt) => Some(pkt.to_vec()),
                _ => None,
            })
            .collect()
    }

    /// Sends `inits` to `to`, [`CAPACITY_WINDOW`] in flight, counting the answers by type only
    /// (no decryption: the generator does no Diffie-Hellman here). Stops when all are answered,
    /// when nothing has come back for 0.5 s, or after `time`. Returns (sent, responses, cookies,
    /// time from the first send to the last answer).
    fn blast(&mut self, to: SocketAddr, inits: &[Vec<u8>], time: Duration) -> Result<(u64, u64, u64, Duration)> {
        let start = Instant::now();
        let (mut sent, mut answered, mut cookies) = (0usize, 0u64, 0u64);
        let mut last_answer = Instant::now();
        while start.elapsed() < time {
            let in_flight = sent.saturating_sub(answered as usize + cookies as usize);
            let mut burst = CAPACITY_WINDOW.saturating_sub(in_flight);
            while burst > 0 && sent < inits.len() {
                // A full socket buffer drops the initiation, as the network would: it counts as unanswered.
                let _ = self.sock.send_to(&inits[sent], to);
                sent += 1;
                burst -= 1;
            }
            let mut got = 0;
            loop {
                match self.sock.recv_from(&mut self.rx) {
                    Ok((len, _)) if len > 0 => {
                        got += 1;
                        match self.rx[0] {
                            MSG_RESPONSE => answered += 1,
                            MSG_COOKIE => cookies += 1,
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("generator receive"),
                }
            }
            if got > 0 {
                last_answer = Instant::now();
            } else if last_answer.elapsed() > Duration::from_millis(500) {
                break;
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
            if sent == inits.len() && answered + cookies >= sent as u64 {
                break;
            }
        }
        Ok((sent as u64, answered, cookies, last_answer.duration_since(start)))
    }

    /// Reads and drops every datagram arriving for `time`.
    fn discard(&mut self, time: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < time {
            match self.sock.recv_from(&mut self.rx) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(e).context("generator receive"),
            }
        }
        Ok(())
    }

    /// Lets answers in flight arrive (not counted toward any level's rate).
    fn drain(&mut self, time: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < time {
            if self.pump(true)? == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Hand-shakes every peer that has no session yet (closed loop).
    fn establish_all(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let mut todo: Vec<usize> = (0..self.peers.len()).filter(|&i| !self.peers[i].established).collect();
        while !todo.is_empty() {
            if start.elapsed() > limit {
                bail!(
                    "{} of {} generator peers still have no session after {:?}; the coordinator stopped answering \
                     handshakes (see its counters)",
                    todo.len(),
                    self.peers.len(),
                    limit
                );
            }
            let now = Instant::now();
            for &i in &todo {
                if self.in_flight >= MAX_IN_FLIGHT {
                    break;
                }
                match self.peers[i].in_flight {
                    None => self.initiate(i),
                    Some(t) if now.duration_since(t) > LOST_AFTER => {
                        self.peers[i].in_flight = None;
                        self.in_flight -= 1;
                        self.lost += 1;
                        self.initiate(i);
                    }
                    Some(_) => {}
                }
            }
            if self.pump(true)? == 0 {
                std::thread::sleep(Duration::from_micros(500));
            }
            todo.retain(|&i| !self.peers[i].established);
        }
        Ok(())
    }

    /// Sends one keepalive per peer every [`KEEPALIVE_SECS`], evenly spread; returns the
    /// coordinator's CPU (cores) over `window`.
    fn keepalive_phase(&mut self, window: Duration) -> Result<f64> {
        let n = self.peers.len();
        let rate = n as f64 / KEEPALIVE_SECS as f64;
        let c0 = own_threads_cpu_ns(COORD_THREAD);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < window {
            let due = (rate * start.elapsed().as_secs_f64()) as u64;
            while sent < due {
                let i = self.next;
                self.next = (self.next + 1) % n;
                let Generator { peers, buf, .. } = self;
                if let TunnResult::WriteToNetwork(pkt) = peers[i].tunn.encapsulate(&[], buf) {
                    let pkt = pkt.to_vec();
                    self.send(&pkt);
                    self.keepalives_sent += 1;
                }
                sent += 1;
            }
            self.pump(false)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        let c1 = own_threads_cpu_ns(COORD_THREAD);
        Ok((c1.saturating_sub(c0)) as f64 / 1e9 / start.elapsed().as_secs_f64())
    }
}

/// Larger socket buffers so bursts are not dropped on the generator side (best effort).
fn set_buffers(sock: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(sock, sockopt::RcvBuf, &(4 << 20));
    let _ = setsockopt(sock, sockopt::SndBuf, &(4 << 20));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locked_share_bounds_the_cores() {
        let split = Split {
            count: 10,
            accept_us: 20.0,
            answer_us: 75.0,
            finish_us: 5.0,
        };
        assert!((split.serial_fraction() - 0.25).abs() < 1e-9);
        assert!(thread_clock_ns() > 0, "the thread CPU clock is readable");
    }
}
