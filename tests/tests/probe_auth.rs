//! End-to-end: a latency responder answers only fresh, authenticated probes from the peer's own address.
//!
//! Two agents probe each other on one bridge. One real probe agent-1 → agent-2 is captured on the wire
//! (`tcpdump -w` in agent-2's namespace; the pcap is parsed here: global header, record headers, Ethernet,
//! IPv4, UDP). Then an intruder host on the same bridge sends agent-2's probe port the captured probe, 76
//! random bytes, and the probe with one MAC byte flipped; agent-1 is killed and the captured probe (and the
//! flipped one) are sent again from agent-1's own address and probe port. None gets an answer within 1 s,
//! and agent-2's responder (started with `latency::responder=debug`) logs why: wrong source address, bad MAC,
//! replay. Positive controls, so that "no answer" is not an artefact of the sender: the same helper, from
//! the same namespaces and source addresses, gets the same bytes back from a UDP echo in agent-2's namespace,
//! and agent-2 keeps answering agent-1's live probes after the intruder's attempts (fresh windows fill).
//!
//! Datagrams are sent from a short-lived thread that has entered the sender's namespace (`Netns::run_in`,
//! i.e. `setns` on that thread only), with a plain `std::net::UdpSocket`: no helper process to clean up.
//! Needs root, `tcpdump` (`deploy/deps.sh tcpdump`) and the binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::fleet::{FleetOptions, tail};
use e2e::topology::{TEST_SUBNET, host_addr};
use e2e::{Fleet, Netns, eventually_patiently, patience, require_root, run_with_timeout};
use serde_json::Value;

/// The agents' default probe port.
const PROBE_PORT: u16 = 7444;
/// Where the UDP echo of the positive control listens, in agent-2's namespace.
const ECHO_PORT: u16 = 7445;
/// How long a probe that must not be answered is given. A genuine answer takes well under a millisecond on
/// a bridge; a slow machine can only make this pass wrongly, never fail wrongly.
const NO_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// How long the positive control may take (generous: 2 cores shared with compilers).
const CONTROL_WAIT: Duration = Duration::from_secs(10);
/// Longest the capture may run.
const CAPTURE_LIMIT: Duration = Duration::from_secs(60);
/// Packets captured (requests and responses share the ports; about half are requests).
const CAPTURE_COUNT: &str = "8";
/// Agent-2's log filter: the responder says why it drops a datagram at debug level.
const RESPONDER_DEBUG: &str = "info,latency::responder=debug";
/// What the responder logs for every datagram it does not answer.
const NOT_ANSWERED: &str = "latency probe not answered";

const PROBE_LEN: usize = 76;
const OFF_SENDER: std::ops::Range<usize> = 8..24;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A version-1 probe request: 76 bytes, magic "NL", version 1, kind 1 (see `latency::wire`).
fn is_request(d: &[u8]) -> bool {
    d.len() == PROBE_LEN && d[..2] == *b"NL" && d[2] == 1 && d[3] == 1
}

/// A probe request whose sender is not the sender named in `ours`: the destination's own probing of the
/// address we hold (agent-2 keeps probing agent-1's address after agent-1 is gone), not an answer to us.
fn is_foreign_request(d: &[u8], ours: &[u8]) -> bool {
    is_request(d) && d.get(OFF_SENDER) != ours.get(OFF_SENDER)
}

/// What one datagram sent from a namespace got back.
#[derive(Debug)]
struct Exchange {
    /// The sending socket's address: the source the receiver saw.
    local: SocketAddr,
    /// The first datagram from the destination that is not its own probing of us.
    answer: Option<Vec<u8>>,
    /// Datagrams ignored meanwhile (the destination's probe requests, or from elsewhere).
    ignored: usize,
}

/// Binds a UDP socket to `bind` inside `ns`, sends `payload` to `to`, and waits up to `wait` for an answer
/// from `to`.
fn exchange(ns: &Netns, bind: SocketAddr, to: SocketAddr, payload: &[u8], wait: Duration) -> Exchange {
    let payload = payload.to_vec();
    let name = ns.name().to_string();
    ns.run_in(move || -> std::io::Result<Exchange> {
        let socket = UdpSocket::bind(bind)?;
        let local = socket.local_addr()?;
        socket.send_to(&payload, to)?;
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        let mut ignored = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Exchange {
                    local,
                    answer: None,
                    ignored,
                });
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv_from(&mut buf) {
                Ok((n, src)) if src == to && !is_foreign_request(&buf[..n], &payload) => {
                    return Ok(Exchange {
                        local,
                        answer: Some(buf[..n].to_vec()),
                        ignored,
                    });
                }
                Ok(_) => ignored += 1,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .unwrap_or_else(|e| panic!("entering {name}: {e}"))
    .unwrap_or_else(|e| panic!("sending from {bind} in {name} to {to}: {e}"))
}

/// A UDP echo bound inside a namespace, served from a thread of this process; stopped on drop.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, addr: SocketAddr) -> Echo {
        // The socket lives in the namespace it was created in, whichever thread later uses it.
        let socket = ns.run_in(move || UdpSocket::bind(addr)).unwrap().unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, echoed) = (Arc::clone(&stop), Arc::clone(&echoed));
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, src)) = socket.recv_from(&mut buf)
                        && socket.send_to(&buf[..n], src).is_ok()
                    {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Echo {
            addr,
            stop,
            echoed,
            thread: Some(thread),
        }
    }
}

impl Echo {
    /// Stops the echo and returns how many datagrams it echoed.
    fn finish(mut self) -> usize {
        self.halt();
        self.echoed.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One UDP datagram from a capture.
#[derive(Debug, Clone, PartialEq)]
struct Datagram {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: Vec<u8>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The UDP/IPv4 datagrams of a classic pcap file (either byte order, µs or ns timestamps), link type
/// Ethernet (1), Linux cooked v1 (113) or v2 (276). Truncated records end the list (a capture cut short).
fn udp_datagrams(pcap: &[u8]) -> Result<Vec<Datagram>, String> {
    if pcap.len() < 24 {
        return Err(format!("{} bytes: shorter than the 24-byte pcap header", pcap.len()));
    }
    let magic = [pcap[0], pcap[1], pcap[2], pcap[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        other => return Err(format!("pcap magic {other:02x?} is not a classic pcap file")),
    };
    let u32_at = |b: &[u8], off: usize| {
        let w = [b[off], b[off + 1], b[off + 2], b[off + 3]];
        if little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let link = u32_at(pcap, 20) & 0x0fff_ffff;
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32_at(pcap, at + 8) as usize;
        let start = at + 16;
        let Some(frame) = pcap.get(start..start + incl) else {
            break;
        };
        at = start + incl;
        // (offset of the network header, its EtherType)
        let l3 = match link {
            1 if frame.len() >= 14 => {
                let mut off = 12;
                while off + 4 <= frame.len() && matches!(be16(&frame[off..]), 0x8100 | 0x88a8) {
                    off += 4;
                }
                frame.get(off..off + 2).map(|t| (off + 2, be16(t)))
            }
            113 if frame.len() >= 16 => Some((16, be16(&frame[14..]))),
            276 if frame.len() >= 20 => Some((20, be16(&frame[0..]))),
            1 | 113 | 276 => None,
            other => return Err(format!("pcap link type {other} is not Ethernet or Linux cooked")),
        };
        let Some((off, 0x0800)) = l3 else { continue };
        let ip = &frame[off..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let fragment = be16(&ip[6..]) & 0x3fff;
        if ip[9] != 17 || ihl < 20 || fragment != 0 || ip.len() < ihl + 8 {
            continue;
        }
        let total = usize::from(be16(&ip[2..])).min(ip.len());
        let udp = &ip[ihl..total.max(ihl + 8)];
        let udp_len = usize::from(be16(&udp[4..])).clamp(8, udp.len());
        let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        out.push(Datagram {
            src: SocketAddrV4::new(addr(12), be16(&udp[0..])),
            dst: SocketAddrV4::new(addr(16), be16(&udp[2..])),
            payload: udp[8..udp_len].to_vec(),
        });
    }
    Ok(out)
}

/// Captures traffic `from` → `to` on `ns`'s eth0 with tcpdump and returns the payload of the first probe
/// request in it.
fn capture_request(ns: &Netns, work: &Path, from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let file = work.join("probe-capture.pcap");
    let filter = format!(
        "udp and src host {} and src port {} and dst host {} and dst port {}",
        from.ip(),
        from.port(),
        to.ip(),
        to.port()
    );
    let mut cmd = ns.exec("tcpdump");
    // -Z root: Debian's tcpdump drops to user `tcpdump` otherwise, which cannot write into the work dir.
    cmd.args(["-i", "eth0", "-n", "-U", "-Z", "root", "-c", CAPTURE_COUNT, "-w"])
        .arg(&file)
        .arg(&filter);
    // On timeout the packets written so far (-U: one by one) are still used.
    let run = run_with_timeout(&mut cmd, CAPTURE_LIMIT);
    let bytes =
        std::fs::read(&file).unwrap_or_else(|e| panic!("tcpdump wrote no {} ({e}); it said: {run:?}", file.display()));
    let datagrams = udp_datagrams(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    datagrams
        .iter()
        .find(|d| d.src == from && d.dst == to && is_request(&d.payload))
        .map(|d| d.payload.clone())
        .unwrap_or_else(|| panic!("no probe request {from} -> {to} among {datagrams:?}; tcpdump: {run:?}"))
}

/// The newest window `from` → `to` that started at or after `since_ms` and has RTT samples.
fn fresh_window(fleet: &Fleet, from: &str, to: &str, since_ms: u64) -> Result<Value, String> {
    let v = fleet.try_ctl_json(&["latency"]).map_err(|e| e.to_string())?;
    v["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["from"] == from
                && p["to"] == to
                && p["start_unix_ms"].as_u64().unwrap_or(0) >= since_ms
                && p["samples"].as_u64().unwrap_or(0) > 0
        })
        .cloned()
        .ok_or_else(|| format!("no window {from} -> {to} with samples since {since_ms}: {v}"))
}

/// Waits for agent-2's responder to log why it did not answer the datagram from `src`, in the part of the
/// log after byte `mark`, and returns the reason.
fn rejection_reason(fleet: &Fleet, mark: usize, src: SocketAddr) -> String {
    let needle = format!("src={src} ");
    eventually_patiently(|| {
        let log = fleet.agent(2).log();
        log.get(mark..)
            .unwrap_or("")
            .lines()
            .find(|l| l.contains(NOT_ANSWERED) && l.contains(&needle))
            .map(|l| l.split(" reason=").nth(1).unwrap_or(l).to_string())
            .ok_or_else(|| format!("agent-2 logged no rejection of {src}:\n{}", tail(&log, 20)))
    })
}

/// Sends `payload` from `bind` in `ns` to agent-2's probe port, asserts that nothing answers, and returns the
/// reason agent-2 logged.
fn expect_no_answer(fleet: &Fleet, what: &str, ns: &Netns, bind: SocketAddr, payload: &[u8]) -> String {
    let target = SocketAddr::new(fleet.agent_ip(2).into(), PROBE_PORT);
    let mark = fleet.agent(2).log().len();
    let x = exchange(ns, bind, target, payload, NO_ANSWER_WAIT);
    assert!(
        x.answer.is_none(),
        "{what}: agent-2 answered {} bytes to {} from {}: {:02x?}",
        x.answer.as_ref().map_or(0, Vec::len),
        x.local,
        ns.name(),
        x.answer
    );
    let reason = rejection_reason(fleet, mark, x.local);
    eprintln!(
        "{what}: no answer to {} ({} other datagrams ignored); agent-2: {reason}",
        x.local, x.ignored
    );
    reason
}

/// Positive control: the same helper, namespace and source get `payload` back from the echo.
fn expect_echo(what: &str, ns: &Netns, bind: SocketAddr, echo: &Echo, payload: &[u8]) {
    let x = exchange(ns, bind, echo.addr, payload, CONTROL_WAIT);
    assert_eq!(
        x.answer.as_deref(),
        Some(payload),
        "{what}: the helper got no echo from {} (sent from {} in {}); a 'no answer' would prove nothing",
        echo.addr,
        x.local,
        ns.name()
    );
}

#[test]
fn spoofed_unauthenticated_and_replayed_probes_get_no_answer() {
    if !require_root() {
        return;
    }
    let tcpdump = run_with_timeout(
        std::process::Command::new("tcpdump").arg("--version"),
        Duration::from_secs(30),
    );
    assert!(
        tcpdump.as_ref().is_ok_and(|o| o.status.success()),
        "this test captures a probe with tcpdump: install it (`./deploy/deps.sh tcpdump`): {tcpdump:?}"
    );
    let opts = FleetOptions {
        coordinator_args: ["--probe-interval", "100ms", "--probe-window", "2s"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..FleetOptions::test(2)
    };
    let mut fleet = Fleet::new(opts).unwrap();
    let token = fleet.create_token("1h", 2);
    fleet.start_agent(1, Some(&token), &[]);
    fleet.start_agent(2, Some(&token), &["--log-level", RESPONDER_DEBUG]);
    fleet.wait_connected(&["agent-1", "agent-2"]);
    // Both directions measured: the responders answer real probes.
    for (from, to) in [("agent-1", "agent-2"), ("agent-2", "agent-1")] {
        eventually_patiently(|| fresh_window(&fleet, from, to, 0));
    }

    let a1 = SocketAddrV4::new(fleet.agent_ip(1), PROBE_PORT);
    let a2 = SocketAddrV4::new(fleet.agent_ip(2), PROBE_PORT);
    let probe = capture_request(fleet.agent_ns(2), fleet.work_dir(), a1, a2);
    let mut forged = probe.clone();
    forged[PROBE_LEN - 1] ^= 0x01;
    let random: Vec<u8> = (0..PROBE_LEN).map(|_| rand::random::<u8>()).collect();
    let echo = Echo::start(fleet.agent_ns(2), SocketAddr::new(fleet.agent_ip(2).into(), ECHO_PORT));

    // An intruder on the same bridge.
    let intruder_ip = host_addr(TEST_SUBNET, 99);
    fleet.lab_mut().add_host("intruder", intruder_ip).unwrap();
    let intruder = fleet.lab().host("intruder").ns();
    let anywhere = SocketAddr::new(intruder_ip.into(), 0);
    expect_echo("intruder control", intruder, anywhere, &echo, &probe);
    let attack_ms = now_ms();
    let expected_at = format!("expected at {a1}");
    let why = expect_no_answer(&fleet, "replay from the intruder", intruder, anywhere, &probe);
    assert!(why.contains(&expected_at), "refused for the source address: {why}");
    let why = expect_no_answer(&fleet, "random bytes from the intruder", intruder, anywhere, &random);
    assert!(!why.is_empty());
    let why = expect_no_answer(&fleet, "flipped MAC from the intruder", intruder, anywhere, &forged);
    assert!(why.contains(&expected_at), "refused for the source address: {why}");
    expect_echo("intruder control, after", intruder, anywhere, &echo, &probe);
    // The responder still answers the genuine prober.
    eventually_patiently(|| fresh_window(&fleet, "agent-1", "agent-2", attack_ms));

    // The sender gone (SIGKILL: no goodbye, so agent-2 still lists agent-1 as a peer at that address), its
    // own address and port free: the captured probe comes from exactly where agent-1's probes come from.
    fleet.agent(1).kill9().unwrap();
    assert!(fleet.agent(1).wait_exit(patience()).is_some(), "agent-1 did not die");
    // (The coordinator notices a killed agent only after its session times out, about 20 s here; these two
    // datagrams go out within a second or two. A reason "unknown sender id" would mean it was faster.)
    let own = SocketAddr::V4(a1);
    let why = expect_no_answer(&fleet, "replay from agent-1's address", fleet.agent_ns(1), own, &probe);
    assert!(
        [
            "already answered (replay)",
            "older than the replay window",
            "later than the sender's newest probe"
        ]
        .iter()
        .any(|r| why.contains(r)),
        "refused as a replay (or as late): {why}"
    );
    let why = expect_no_answer(
        &fleet,
        "flipped MAC from agent-1's address",
        fleet.agent_ns(1),
        own,
        &forged,
    );
    assert!(why.contains("MAC does not verify"), "refused for the MAC: {why}");
    expect_echo("agent-1's address control", fleet.agent_ns(1), own, &echo, &probe);
    assert_eq!(echo.finish(), 3, "the echo answered exactly the three controls");
}

#[test]
fn pcap_parser_reads_udp_payloads() {
    // Little-endian µs pcap, Ethernet; one UDP/IPv4 frame 192.0.2.11:7444 -> 192.0.2.12:7444 with "NL\x01\x01",
    // one ARP frame that must be skipped, and a truncated last record.
    let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    pcap.extend([0; 8]);
    pcap.extend(65535u32.to_le_bytes());
    pcap.extend(1u32.to_le_bytes());
    let payload = [b'N', b'L', 1, 1];
    let mut frame = vec![0u8; 12];
    frame.extend([0x08, 0x00]);
    let ip_len = 20 + 8 + payload.len() as u16;
    frame.extend([0x45, 0]);
    frame.extend(ip_len.to_be_bytes());
    frame.extend([0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 11, 192, 0, 2, 12]);
    frame.extend(7444u16.to_be_bytes());
    frame.extend(7444u16.to_be_bytes());
    frame.extend((8 + payload.len() as u16).to_be_bytes());
    frame.extend([0, 0]);
    frame.extend(payload);
    frame.extend([0; 6]); // Ethernet padding beyond the IP length
    let record = |pcap: &mut Vec<u8>, frame: &[u8], incl: u32| {
        pcap.extend([0; 8]);
        pcap.extend(incl.to_le_bytes());
        pcap.extend((frame.len() as u32).to_le_bytes());
        pcap.extend(frame);
    };
    record(&mut pcap, &frame, frame.len() as u32);
    let mut arp = vec![0u8; 12];
    arp.extend([0x08, 0x06]);
    arp.extend([0; 28]);
    record(&mut pcap, &arp, arp.len() as u32);
    record(&mut pcap, &frame[..10], 60);
    let got = udp_datagrams(&pcap).unwrap();
    assert_eq!(
        got,
        vec![Datagram {
            src: "192.0.2.11:7444".parse().unwrap(),
            dst: "192.0.2.12:7444".parse().unwrap(),
            payload: payload.to_vec(),
        }]
    );
    assert!(udp_datagrams(&pcap[..10]).is_err());
    assert!(udp_datagrams(&[0u8; 24]).is_err());
    let mut probe = vec![0u8; PROBE_LEN];
    probe[..4].copy_from_slice(&payload);
    assert!(is_request(&probe));
    let mut other = probe.clone();
    other[8] = 1;
    assert!(is_foreign_request(&other, &probe) && !is_foreign_request(&probe, &probe));
}
