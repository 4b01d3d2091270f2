//! The real driver over UDP on 127.0.0.1.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic there is a failed assertion

use std::net::SocketAddr;
use std::time::Duration;

use latency::wire::{Kind, Probe};
use latency::{
    Command, Driver, DriverConfig, DriverReport, NodeId, Peer, ProbeKey, ProberConfig, ResponderConfig, TimestampMode,
    TimestampingRequest, WindowStats, WireId,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

fn config(timestamping: TimestampingRequest) -> DriverConfig {
    DriverConfig {
        prober: ProberConfig {
            interval: Duration::from_millis(50),
            jitter: 0.1,
            timeout: Duration::from_millis(200),
            window: Duration::from_secs(1),
            seed: Some(1),
        },
        // 20 probes/s from each peer: above the default per-peer limit of 5/s.
        responder: ResponderConfig {
            per_peer_rate: 100.0,
            per_peer_burst: 100.0,
            ..ResponderConfig::default()
        },
        timestamping,
        key_grace: None,
    }
}

struct Running {
    capability: TimestampMode,
    reports: mpsc::Receiver<WindowStats>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<DriverReport, latency::DriverError>>,
    _commands: mpsc::Sender<Command>,
}

async fn start(mut d: Driver, known: Vec<Peer>, targets: Vec<Peer>) -> Running {
    d.apply(Command::SetKnownPeers(known));
    d.apply(Command::SetProbeTargets(targets));
    let capability = d.capability();
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (rep_tx, reports) = mpsc::channel(64);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(d.run(cmd_rx, rep_tx, async move {
        let _ = stopped.await;
    }));
    Running {
        capability,
        reports,
        stop,
        task,
        _commands: cmd_tx,
    }
}

/// The first complete window: windows are aligned to whole seconds of the realtime clock here, so the first
/// one reported is partial and skipped.
async fn first_window(r: &mut Running) -> WindowStats {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = 0;
        loop {
            let w = r.reports.recv().await.expect("driver stopped");
            seen += 1;
            if seen > 1 && w.samples > 0 {
                return w;
            }
        }
    })
    .await
    .expect("no complete window with samples within 10 s")
}

async fn stop(r: Running) -> DriverReport {
    let _ = r.stop.send(());
    r.task.await.unwrap().unwrap()
}

async fn pair(mode: TimestampingRequest) -> (Running, Running, SocketAddr, SocketAddr) {
    let key = ProbeKey::new(1, [3; 32]);
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = Driver::bind(local, NodeId::new("a"), key.clone(), config(mode))
        .await
        .unwrap();
    let b = Driver::bind(local, NodeId::new("b"), key, config(mode)).await.unwrap();
    let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let ra = start(a, vec![Peer::new("b", ba)], vec![Peer::new("b", ba)]).await;
    let rb = start(b, vec![Peer::new("a", aa)], vec![Peer::new("a", aa)]).await;
    (ra, rb, aa, ba)
}

fn check_window(w: &WindowStats, peer: &str, capability: TimestampMode) {
    assert_eq!(w.peer, NodeId::new(peer));
    assert!(w.samples >= 5, "{w:?}");
    assert_eq!(w.lost, 0, "{w:?}");
    assert_eq!(w.loss_ratio, 0.0);
    let rtt = w.rtt.expect("samples but no RTT summary");
    assert!(rtt.min_ns > 0, "{rtt:?}");
    assert!(rtt.p99_ns < 50_000_000, "{rtt:?}");
    assert!(
        rtt.min_ns <= rtt.p50_ns && rtt.p50_ns <= rtt.p90_ns && rtt.p90_ns <= rtt.p99_ns && rtt.p99_ns <= rtt.max_ns
    );
    let mode = w.mode.expect("samples but no mode");
    assert!(mode <= capability, "window claims {mode}, socket only has {capability}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_measure_each_other_with_kernel_timestamps() {
    let (mut ra, mut rb, _, _) = pair(TimestampingRequest::Kernel).await;
    // This kernel (Linux ≥ 3.17) grants software TX and RX timestamps on UDP sockets.
    assert_eq!(ra.capability, TimestampMode::KernelTxRx);
    let wa = first_window(&mut ra).await;
    let wb = first_window(&mut rb).await;
    check_window(&wa, "b", ra.capability);
    check_window(&wb, "a", rb.capability);
    eprintln!("a→b {:?}\nb→a {:?}", wa.rtt, wb.rtt);
    let (repa, repb) = (stop(ra).await, stop(rb).await);
    eprintln!("{repa:?}\n{repb:?}");
    // On loopback every sample should get both kernel timestamps.
    assert_eq!(wa.mode, Some(TimestampMode::KernelTxRx), "{wa:?}");
    assert!(
        repa.probes_sent > 0 && repa.samples > 0 && repa.tx_timestamps > 0,
        "{repa:?}"
    );
    assert!(repb.responder.answered > 0, "{repb:?}");
    assert_eq!(
        repa.responder.wrong_source + repa.responder.bad_mac + repa.responder.replayed,
        0,
        "{repa:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_in_user_space_mode_say_so() {
    let (mut ra, rb, _, _) = pair(TimestampingRequest::UserSpace).await;
    assert_eq!(ra.capability, TimestampMode::UserSpace);
    let w = first_window(&mut ra).await;
    check_window(&w, "b", TimestampMode::UserSpace);
    assert_eq!(w.mode, Some(TimestampMode::UserSpace));
    let rep = stop(ra).await;
    assert_eq!(rep.tx_timestamps, 0);
    stop(rb).await;
}

/// A real responder answers a genuine probe once, and nothing spoofed, forged, replayed or oversized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responder_over_udp_refuses_spoofed_forged_and_replayed_probes() {
    let key = ProbeKey::new(1, [3; 32]);
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let b = Driver::bind(
        local,
        NodeId::new("b"),
        key.clone(),
        config(TimestampingRequest::Kernel),
    )
    .await
    .unwrap();
    let baddr = b.local_addr().unwrap();
    // "a" is a plain socket holding the key; "m" is another socket (a different source address).
    let a = UdpSocket::bind(local).await.unwrap();
    let m = UdpSocket::bind(local).await.unwrap();
    // b answers a, but probes no one (a plain socket would not answer anyway).
    let rb = start(b, vec![Peer::new("a", a.local_addr().unwrap())], vec![]).await;

    let probe = |seq: u64, k: &ProbeKey| {
        Probe {
            kind: Kind::Request,
            key_id: k.id(),
            sender: WireId::of("a"),
            receiver: WireId::of("b"),
            seq,
            sent_mono_ns: 1_000 + seq,
            hold_ns: 0,
        }
        .encode(k)
    };
    async fn answer(s: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 2048];
        match tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    // Genuine: answered, same size, valid response.
    let good = probe(10, &key);
    a.send_to(&good, baddr).await.unwrap();
    let resp = answer(&a).await.expect("genuine probe not answered");
    assert_eq!(resp.len(), good.len());
    let p = Probe::parse_unverified(&resp).unwrap();
    assert_eq!((p.kind, p.seq, p.sender), (Kind::Response, 10, WireId::of("b")));
    // Replayed from the genuine address: no answer.
    a.send_to(&good, baddr).await.unwrap();
    assert_eq!(answer(&a).await, None, "replay answered");
    // Replayed (a fresh capture) from another address: no answer to either.
    let fresh = probe(11, &key);
    m.send_to(&fresh, baddr).await.unwrap();
    assert_eq!(answer(&m).await, None, "spoofed source answered");
    // Forged with a wrong secret under the right key id: no answer.
    a.send_to(&probe(12, &ProbeKey::new(1, [4; 32])), baddr).await.unwrap();
    assert_eq!(answer(&a).await, None, "forged probe answered");
    // Oversized: a valid probe with padding (amplification bait the other way round) and junk.
    let mut padded = probe(13, &key).to_vec();
    padded.extend_from_slice(&[0u8; 1000]);
    a.send_to(&padded, baddr).await.unwrap();
    a.send_to(b"ping", baddr).await.unwrap();
    assert_eq!(answer(&a).await, None, "malformed probe answered");
    // The probe the spoofer sent was never answered, so the genuine sender still gets its answer.
    a.send_to(&fresh, baddr).await.unwrap();
    assert!(answer(&a).await.is_some());

    let rep = stop(rb).await;
    assert_eq!(rep.responder.answered, 2, "{rep:?}");
    assert_eq!(
        (
            rep.responder.replayed,
            rep.responder.wrong_source,
            rep.responder.bad_mac
        ),
        (1, 1, 1),
        "{rep:?}"
    );
    assert_eq!(rep.responder.malformed, 2, "{rep:?}");
}

/// A dual-stack IPv6 socket probes an IPv4 peer (sent to the IPv4-mapped address) and is probed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_socket_measures_ipv4_peer() {
    let key = ProbeKey::new(1, [3; 32]);
    let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let any6: SocketAddr = "[::]:0".parse().unwrap();
    let a = Driver::bind(v4, NodeId::new("a"), key.clone(), config(TimestampingRequest::Kernel))
        .await
        .unwrap();
    let b = Driver::bind(any6, NodeId::new("b"), key, config(TimestampingRequest::Kernel))
        .await
        .unwrap();
    let aa = a.local_addr().unwrap();
    // The peer list gives b's IPv4 underlay address.
    let ba: SocketAddr = format!("127.0.0.1:{}", b.local_addr().unwrap().port()).parse().unwrap();
    let mut ra = start(a, vec![Peer::new("b", ba)], vec![Peer::new("b", ba)]).await;
    let mut rb = start(b, vec![Peer::new("a", aa)], vec![Peer::new("a", aa)]).await;
    check_window(&first_window(&mut ra).await, "b", ra.capability);
    check_window(&first_window(&mut rb).await, "a", rb.capability);
    let (repa, repb) = (stop(ra).await, stop(rb).await);
    assert_eq!(repb.send_errors, 0, "{repb:?}");
    assert_eq!(repa.responder.wrong_source, 0, "{repa:?}");
}

/// Windows that started after `since_ms` (unix ms), until `n` of them with samples arrived.
async fn windows_after(r: &mut Running, since_ms: u64, n: usize) -> Vec<WindowStats> {
    tokio::time::timeout(Duration::from_secs(15), async {
        let mut out = Vec::new();
        while out.len() < n {
            let w = r.reports.recv().await.expect("driver stopped");
            if w.start_unix_ms >= since_ms && w.sent > 0 {
                out.push(w);
            }
        }
        out
    })
    .await
    .expect("no windows after the rotation within 15 s")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_key_rotation_loses_no_probe_while_the_key_spreads() {
    let (mut ra, mut rb, _, _) = pair(TimestampingRequest::Kernel).await;
    first_window(&mut ra).await;
    let k2 = ProbeKey::new(2, [9; 32]);
    // b has only been told to accept the new key; a already signs with it. Both directions still answer:
    // a's k2 probes because b accepts k2, b's k1 probes because a keeps k1 for the grace period.
    rb._commands.send(Command::AcceptKey(k2.clone())).await.unwrap();
    ra._commands.send(Command::AcceptKey(k2.clone())).await.unwrap();
    ra._commands.send(Command::RotateKey(k2.clone())).await.unwrap();
    let since = now_ms() + 1000;
    for w in windows_after(&mut ra, since, 2).await {
        assert_eq!(w.lost, 0, "a signs with k2, b accepts it: {w:?}");
    }
    for w in windows_after(&mut rb, since, 2).await {
        assert_eq!(w.lost, 0, "b still signs with k1, a accepts it in grace: {w:?}");
    }
    // Control: a key b was never told about is refused, so the check above is not vacuous.
    ra._commands
        .send(Command::RotateKey(ProbeKey::new(3, [7; 32])))
        .await
        .unwrap();
    let since = now_ms() + 1000;
    let w = windows_after(&mut ra, since, 1).await.remove(0);
    assert_eq!(w.samples, 0, "probes under an unknown key get no answer: {w:?}");
    assert!(w.lost > 0, "{w:?}");
    stop(ra).await;
    stop(rb).await;
}
