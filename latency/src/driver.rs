//! The I/O driver: one UDP socket, the responder and the prober, kernel timestamps where available.
//!
//! [`Driver::run`] owns the socket and loops over: datagrams (requests go to the [`Responder`], responses to
//! the [`Prober`]), the prober's timers, [`Command`]s (peer lists, key rotation) and shutdown. Finished windows
//! go out on a channel.
//!
//! # Timestamps
//! With [`TimestampingRequest::Kernel`] (the default) the socket asks for `SO_TIMESTAMPING` software
//! timestamps: on receive (`SOF_TIMESTAMPING_RX_SOFTWARE`, delivered with each datagram as an
//! `SCM_TIMESTAMPING` control message) and on send (`SOF_TIMESTAMPING_TX_SOFTWARE`: the kernel loops each sent
//! packet back on the socket's error queue with the time the driver handed it to the device; the driver reads
//! the probe's receiver and sequence number from the looped packet). If the kernel refuses TX timestamps the
//! driver uses RX only; if it refuses both, user space. [`Driver::capability`] says which mode the socket got;
//! each sample and window records the mode actually used (a sample falls back when a timestamp is missing or
//! implausible; see [`crate::prober`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage, TimestampingFlag, recvmsg, setsockopt, sockopt,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::ConfigError;
use crate::clock::{RxTime, Timestamp, TimestampMode, timespec_ns};
use crate::id::NodeId;
use crate::key::{DEFAULT_KEY_GRACE, KeyRing, ProbeKey};
use crate::prober::{Prober, ProberConfig};
use crate::responder::{Peer, Responder, ResponderConfig, ResponderCounters};
use crate::stats::WindowStats;
use crate::wire::{Kind, PROBE_LEN, Probe};

/// Default UDP port of the probe socket on the underlay.
pub const DEFAULT_PORT: u16 = 7444;

/// Receive buffer: larger than any probe, so an oversized datagram is seen as such (and refused).
const RX_BUF: usize = 2048;

/// Which timestamps to ask the kernel for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimestampingRequest {
    /// Kernel software TX and RX timestamps where available, falling back to RX only, then user space.
    #[default]
    Kernel,
    /// User space only (for comparison, or kernels that misbehave).
    UserSpace,
}

/// Driver settings.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DriverConfig {
    /// Prober settings.
    pub prober: ProberConfig,
    /// Responder settings.
    pub responder: ResponderConfig,
    /// Timestamping.
    pub timestamping: TimestampingRequest,
    /// How long a rotated-out key stays accepted. `None`: [`DEFAULT_KEY_GRACE`].
    pub key_grace: Option<Duration>,
}

/// Instructions to a running driver.
#[derive(Clone, Debug)]
pub enum Command {
    /// The nodes to probe (replaces the previous list).
    SetProbeTargets(Vec<Peer>),
    /// The nodes allowed to probe this node, with their underlay probe addresses (replaces the previous list).
    SetKnownPeers(Vec<Peer>),
    /// Answer probes signed with this key from now on (the previous key stays accepted for the grace period),
    /// but keep signing our own probes with the old one. Step one of a rotation: every node accepts the new key
    /// before any node signs with it, so no probe is refused while the new key spreads through the fleet.
    AcceptKey(ProbeKey),
    /// Sign our probes with this key (and answer it, if [`Command::AcceptKey`] did not already); the previous
    /// key stays accepted for the grace period.
    RotateKey(ProbeKey),
}

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Socket trouble.
    #[error("latency probe socket: {context}: {source}")]
    Io {
        /// What the driver was doing, and what to check.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What a driver did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DriverReport {
    /// Responder counters.
    pub responder: ResponderCounters,
    /// Probes sent.
    pub probes_sent: u64,
    /// Responses accepted as RTT samples.
    pub samples: u64,
    /// Responses rejected by the prober (late, duplicate, unauthenticated, ...).
    pub responses_rejected: u64,
    /// Sends that failed (e.g. no route); the probe then times out and counts as lost.
    pub send_errors: u64,
    /// Kernel TX timestamps read from the error queue.
    pub tx_timestamps: u64,
    /// Windows not delivered because the report channel was full or closed.
    pub windows_dropped: u64,
}

/// One UDP socket running a responder and a prober.
#[derive(Debug)]
pub struct Driver {
    socket: UdpSocket,
    /// The socket is IPv6 (possibly dual-stack): IPv4 destinations are sent as IPv4-mapped addresses.
    v6: bool,
    me: NodeId,
    prober: Prober,
    responder: Responder,
    capability: TimestampMode,
    report: DriverReport,
}

impl Driver {
    /// Binds a UDP socket to `addr` (e.g. the underlay address and [`DEFAULT_PORT`]) and sets up a driver.
    pub async fn bind(addr: SocketAddr, me: NodeId, key: ProbeKey, config: DriverConfig) -> Result<Self, DriverError> {
        let socket = UdpSocket::bind(addr).await.map_err(|source| DriverError::Io {
            context: "binding the probe port (is it in use, or the address not local?)",
            source,
        })?;
        Self::new(socket, me, key, config)
    }

    /// A driver on an already bound socket.
    pub fn new(socket: UdpSocket, me: NodeId, key: ProbeKey, config: DriverConfig) -> Result<Self, DriverError> {
        let keys = KeyRing::new(key, config.key_grace.unwrap_or(DEFAULT_KEY_GRACE));
        let now = Timestamp::now();
        let prober = Prober::new(&me, keys.clone(), config.prober, now)?;
        let responder = Responder::new(&me, keys, config.responder)?;
        let capability = match config.timestamping {
            TimestampingRequest::UserSpace => TimestampMode::UserSpace,
            TimestampingRequest::Kernel => enable_timestamping(socket.as_raw_fd()),
        };
        tracing::info!(node = %me, mode = %capability, "latency prober socket timestamping");
        let v6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        Ok(Self {
            socket,
            v6,
            me,
            prober,
            responder,
            capability,
            report: DriverReport::default(),
        })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> Result<SocketAddr, DriverError> {
        self.socket.local_addr().map_err(|source| DriverError::Io {
            context: "reading the local address",
            source,
        })
    }

    /// The most precise timestamping the socket was granted.
    pub fn capability(&self) -> TimestampMode {
        self.capability
    }

    /// Applies a command (also usable before [`Driver::run`]).
    pub fn apply(&mut self, command: Command) {
        let now = Timestamp::now();
        match command {
            Command::SetProbeTargets(peers) => self.prober.set_peers(now, peers),
            Command::SetKnownPeers(peers) => self.responder.set_peers(peers),
            Command::AcceptKey(key) => {
                if self.responder.current_key_id() != key.id() {
                    tracing::info!(
                        key_id = key.id(),
                        "latency probe key accepted (signing switches shortly)"
                    );
                    self.responder.rotate_key(key, now.mono_ns);
                }
            }
            Command::RotateKey(key) => {
                tracing::info!(key_id = key.id(), "latency probe key rotated");
                if self.responder.current_key_id() != key.id() {
                    self.responder.rotate_key(key.clone(), now.mono_ns);
                }
                self.prober.rotate_key(key, now.mono_ns);
            }
        }
    }

    /// Runs until `shutdown` completes. Finished windows are sent on `reports` (never blocking: if the channel
    /// is full the window is dropped and counted). Commands are applied as they arrive; a closed command
    /// channel just means no more commands.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        reports: mpsc::Sender<WindowStats>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<DriverReport, DriverError> {
        let fd = self.socket.as_raw_fd();
        let tx_stamps = self.capability == TimestampMode::KernelTxRx;
        let mut buf = vec![0u8; RX_BUF];
        let mut err_buf = vec![0u8; RX_BUF];
        let mut commands_open = true;
        tokio::pin!(shutdown);
        loop {
            let sleep = match self.prober.poll_timeout() {
                Some(at) => Duration::from_nanos(at.saturating_sub(Timestamp::now().mono_ns)),
                None => Duration::from_secs(3600),
            };
            enum Event {
                Shutdown,
                Datagram(io::Result<Received>),
                ErrQueue(io::Result<Option<(crate::id::WireId, u64, u64)>>),
                Command(Option<Command>),
                Timer,
            }
            let ev = tokio::select! {
                biased;
                _ = &mut shutdown => Event::Shutdown,
                r = self.socket.async_io(Interest::READABLE, || recv_datagram(fd, &mut buf)) => Event::Datagram(r),
                r = self.socket.async_io(Interest::ERROR, || recv_tx_stamp(fd, &mut err_buf, &self.me)), if tx_stamps => {
                    Event::ErrQueue(r)
                }
                c = commands.recv(), if commands_open => Event::Command(c),
                _ = tokio::time::sleep(sleep) => Event::Timer,
            };
            match ev {
                Event::Shutdown => break,
                Event::Datagram(Ok(rx)) => self.on_datagram(rx, &buf, fd, &mut err_buf, tx_stamps).await,
                Event::Datagram(Err(e)) => {
                    // ICMP errors (e.g. port unreachable from a peer that is down) surface here; not fatal.
                    tracing::debug!(error = %e, "latency probe socket receive error");
                }
                Event::ErrQueue(Ok(stamp)) => self.on_tx_stamp(stamp),
                Event::ErrQueue(Err(e)) => tracing::debug!(error = %e, "latency probe error queue"),
                Event::Command(Some(c)) => self.apply(c),
                Event::Command(None) => commands_open = false,
                Event::Timer => {}
            }
            self.send_due().await;
            for w in self.prober.poll_windows(Timestamp::now()) {
                if reports.try_send(w).is_err() {
                    self.report.windows_dropped += 1;
                    tracing::warn!("latency window report dropped: the consumer is not keeping up or has stopped");
                }
            }
        }
        self.report.responder = self.responder.counters();
        Ok(self.report)
    }

    fn on_tx_stamp(&mut self, stamp: Option<(crate::id::WireId, u64, u64)>) {
        if let Some((peer, seq, ts)) = stamp {
            self.report.tx_timestamps += 1;
            self.prober.on_tx_timestamp(peer, seq, ts);
        }
    }

    async fn on_datagram(&mut self, rx: Received, buf: &[u8], fd: RawFd, err_buf: &mut [u8], tx_stamps: bool) {
        let data = &buf[..rx.len.min(buf.len())];
        let kind = Probe::parse_unverified(data).map(|p| p.kind).ok();
        let time = RxTime {
            user: rx.at,
            kernel_real_ns: rx.kernel_real_ns,
        };
        if kind == Some(Kind::Response) {
            if tx_stamps {
                // The probe's TX timestamp is normally queued long before its response arrives; read it first.
                // Read directly (MSG_DONTWAIT) rather than through tokio's readiness, which may not have seen the
                // error-queue event yet; a spurious wake-up of the error branch later just finds EAGAIN.
                while let Ok(stamp) = recv_tx_stamp(fd, err_buf, &self.me) {
                    self.on_tx_stamp(stamp);
                }
            }
            match self.prober.handle_response(time, rx.src, data) {
                Ok(_) => self.report.samples += 1,
                Err(e) => {
                    self.report.responses_rejected += 1;
                    tracing::debug!(src = %rx.src, reason = %e, "latency response ignored");
                }
            }
        } else if let Some(resp) = self.responder.respond(Timestamp::now(), time, rx.src, data)
            && let Err(e) = self.socket.send_to(&resp, rx.src).await
        {
            self.report.send_errors += 1;
            tracing::debug!(dst = %rx.src, error = %e, "latency response not sent");
        }
    }

    /// `to` in the socket's address family.
    fn destination(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.v6 => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            other => other,
        }
    }

    async fn send_due(&mut self) {
        // A fresh clock reading per probe, taken just before it is built and sent.
        while let Some(tx) = self.prober.poll_transmit(Timestamp::now()) {
            match self.socket.send_to(&tx.datagram, self.destination(tx.to)).await {
                Ok(_) => self.report.probes_sent += 1,
                Err(e) => {
                    self.report.send_errors += 1;
                    tracing::debug!(peer = %tx.peer, dst = %tx.to, error = %e, "latency probe not sent");
                }
            }
        }
    }
}

/// Asks for software timestamps; returns what the kernel granted.
fn enable_timestamping(fd: RawFd) -> TimestampMode {
    use std::os::fd::BorrowedFd;
    // SAFETY: `fd` belongs to the socket the driver owns and outlives this call.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    let rx = TimestampingFlag::SOF_TIMESTAMPING_SOFTWARE | TimestampingFlag::SOF_TIMESTAMPING_RX_SOFTWARE;
    let txrx = rx | TimestampingFlag::SOF_TIMESTAMPING_TX_SOFTWARE;
    if setsockopt(&sock, sockopt::Timestamping, &txrx).is_ok() {
        return TimestampMode::KernelTxRx;
    }
    match setsockopt(&sock, sockopt::Timestamping, &rx) {
        Ok(()) => TimestampMode::KernelRx,
        Err(e) => {
            tracing::warn!(error = %e, "SO_TIMESTAMPING unavailable; latency probes use user-space timestamps");
            TimestampMode::UserSpace
        }
    }
}

/// A datagram received into the caller's buffer.
#[derive(Clone, Copy, Debug)]
struct Received {
    len: usize,
    src: SocketAddr,
    at: Timestamp,
    kernel_real_ns: Option<u64>,
}

fn recv_datagram(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::Timestamps);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let at = Timestamp::now();
    let mut kernel_real_ns = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmTimestampsns(ts) = c {
                let ns = timespec_ns(ts.system);
                if ns > 0 {
                    kernel_real_ns = Some(ns);
                }
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let src = msg
        .address
        .as_ref()
        .and_then(to_socket_addr)
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    // A truncated datagram was larger than the buffer: report a length no probe has.
    let len = if truncated { RX_BUF + 1 } else { msg.bytes };
    Ok(Received {
        len,
        src,
        at,
        kernel_real_ns,
    })
}

/// Reads one message from the error queue; if it is a TX timestamp of one of our probes, returns
/// (receiver, sequence, kernel realtime ns).
fn recv_tx_stamp(fd: RawFd, buf: &mut [u8], me: &NodeId) -> io::Result<Option<(crate::id::WireId, u64, u64)>> {
    let mut cmsg = nix::cmsg_space!(
        nix::sys::socket::Timestamps,
        libc::sock_extended_err,
        libc::sockaddr_in6
    );
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut ts = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmTimestampsns(t) = c {
                let ns = timespec_ns(t.system);
                if ns > 0 {
                    ts = Some(ns);
                }
            }
        }
    }
    let n = msg.bytes;
    let Some(ts) = ts else { return Ok(None) };
    // The looped packet carries link, IP and UDP headers before our payload; a probe is its last 76 bytes.
    if n < PROBE_LEN || n > buf.len() {
        return Ok(None);
    }
    match Probe::parse_unverified(&buf[n - PROBE_LEN..n]) {
        Ok(p) if p.kind == Kind::Request && p.sender == me.wire_id() => Ok(Some((p.receiver, p.seq, ts))),
        _ => Ok(None),
    }
}

fn to_socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = s.as_sockaddr_in6() {
        return Some(SocketAddr::V6((*v6).into()));
    }
    let _ = s.family();
    None
}
