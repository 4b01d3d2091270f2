//! The I/O shell around [`Router`]: a TUN device, one UDP socket, one packet thread and tokio
//! tasks.
//!
//! - Packet thread (`wg-<tun name>`, a plain OS thread blocking in `epoll_wait` on the UDP
//!   socket, the TUN and a stop eventfd): the data path in both directions, as boringtun's own
//!   device runs it.
//!   - TUN readable: `read` → [`Router::handle_tun_packet`] → UDP `send_to`.
//!   - UDP readable: `recv_from` → [`Router::handle_datagram`] → TUN write / UDP `send_to`.
//!     After a TUN write it reads what the kernel queued on the TUN in reply meanwhile (echo
//!     replies, TCP ACKs) and sends it at once. Handshake initiations are handed to the
//!     handshake tasks instead (a bounded queue; when it is full the initiation is dropped like a
//!     datagram at a full socket buffer, and the peer retries).
//!
//!   A packet costs the kernel's wake-up of this one thread and nothing else: with the data path
//!   on tokio tasks every packet also went through the runtime's reactor and scheduler, which
//!   measured 1.11× boringtun-cli's ping RTT (nimbus-bench `tunnel`).
//! - Handshake tasks, one per runtime worker thread: [`Router::accept_initiation`] (MAC1, rate
//!   limit, peer lookup), then [`Initiation::answer`] without the router lock (the peer's `Tunn`
//!   derives the session: most of the Diffie-Hellman work), then [`Router::finish_initiation`] →
//!   UDP `send_to`. Many peers hand-shaking at once (a coordinator restart) thus use every core,
//!   while data keeps flowing in order through the packet thread.
//! - Timer task: every [`TICK_INTERVAL`] → [`Router::tick`] → UDP `send_to`.
//!
//! The router sits behind a `std::sync::Mutex`; each user locks it only to compute actions and
//! performs the actions after unlocking (the lock is never held across `.await` or I/O). Both
//! descriptors are non-blocking; the tokio side never registers them with its reactor (it only
//! sends, and a send that finds the socket buffer full drops the datagram, as a full network
//! would; the peer retransmits).
//!
//! The packet thread owns the only reference to the TUN device and, with the tasks, the socket,
//! so stopping them ([`Tunnel::shutdown`], or dropping the last [`Tunnel`] handle) closes the
//! TUN file descriptor and the kernel removes the interface.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::task::JoinHandle;
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::error::TunnelError;
use crate::keys::{PublicKey, StaticSecret};
#[cfg(doc)]
use crate::router::Initiation;
use crate::router::{
    Action, MAX_DATAGRAM, MAX_IP_PACKET, PeerConfig, PeerStats, Router, RouterCounters, SCRATCH_LEN, TICK_INTERVAL,
    is_handshake_initiation,
};

/// Default TUN MTU: 1500 minus the WireGuard-over-IPv6 overhead (80), as wg-quick uses.
pub const DEFAULT_MTU: u16 = 1420;
/// Smallest accepted MTU (IPv4's minimum reassembly size).
pub const MIN_MTU: u16 = 576;
/// Largest accepted MTU.
pub const MAX_MTU: u16 = 65_000;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Pause after an I/O error in a reader loop, so a persistent error cannot spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Handshake initiations waiting for a handshake task. A coordinator answers a few thousand per
/// second; a full queue drops the newest (the initiator retries after 5 s, as after a loss).
const HANDSHAKE_QUEUE: usize = 1024;
/// Most handshake tasks (one per runtime worker thread up to this).
const MAX_HANDSHAKE_TASKS: usize = 8;

/// Datagrams (or TUN packets) the packet thread handles per readiness event before it looks at
/// the other descriptor; epoll is level-triggered, so the rest is read on the next turn.
const BATCH: usize = 64;
/// Most packets the packet thread takes from the TUN right after a TUN write (replies the
/// kernel generated during the write); the rest waits for the TUN's own readiness event.
const INLINE_ANSWERS: usize = 8;
/// How long the packet thread waits for room when the UDP socket buffer is full, once per
/// datagram, before it drops the datagram (a full network drops too; TCP inside retransmits).
const SEND_WAIT_MS: u16 = 10;
/// epoll tokens of the packet thread's descriptors.
const TOKEN_STOP: u64 = 0;
const TOKEN_UDP: u64 = 1;
const TOKEN_TUN: u64 = 2;

/// A handshake initiation on its way from the packet thread to a handshake task.
type QueuedInitiation = (SocketAddr, Vec<u8>);

/// How to start a [`Tunnel`].
#[derive(Clone)]
pub struct TunnelConfig {
    /// This node's WireGuard private key.
    pub private_key: StaticSecret,
    /// UDP listen address; port 0 picks an ephemeral port (see [`Tunnel::local_udp_addr`]).
    pub listen: SocketAddr,
    /// TUN interface name (at most 15 characters), e.g. `nimbus0`.
    pub tun_name: String,
    /// This node's overlay address, assigned to the TUN.
    pub address: Ipv4Addr,
    /// Overlay prefix length; the kernel routes the whole prefix into the TUN.
    pub prefix_len: u8,
    /// TUN MTU. Default [`DEFAULT_MTU`] (1420).
    pub mtu: u16,
}

impl TunnelConfig {
    /// A configuration with the default MTU.
    pub fn new(
        private_key: StaticSecret,
        listen: SocketAddr,
        tun_name: impl Into<String>,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Self {
        TunnelConfig {
            private_key,
            listen,
            tun_name: tun_name.into(),
            address,
            prefix_len,
            mtu: DEFAULT_MTU,
        }
    }

    fn validate(&self) -> Result<(), TunnelError> {
        let mut problems = Vec::new();
        if self.prefix_len > 32 {
            problems.push(format!(
                "prefix length {} is above 32; use the overlay prefix, e.g. 16 for 10.77.0.0/16",
                self.prefix_len
            ));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            problems.push(format!(
                "MTU {} is outside {MIN_MTU}..={MAX_MTU}; the default is {DEFAULT_MTU}",
                self.mtu
            ));
        }
        let name = &self.tun_name;
        if name.is_empty()
            || name.len() > MAX_IFNAME_LEN
            || name.contains(|c: char| c == '/' || c == '%' || c.is_whitespace() || c == '\0')
            || name == "."
            || name == ".."
        {
            problems.push(format!(
                "TUN name {name:?} is not a valid interface name (1 to {MAX_IFNAME_LEN} \
                 characters, no '/', '%' or whitespace)"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TunnelError::InvalidConfig(problems.join("; ")))
        }
    }
}

impl std::fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("private_key", &"<redacted>")
            .field("listen", &self.listen)
            .field("tun_name", &self.tun_name)
            .field("address", &self.address)
            .field("prefix_len", &self.prefix_len)
            .field("mtu", &self.mtu)
            .finish()
    }
}

/// A running userspace WireGuard tunnel. Cheap to clone; all clones share one device.
#[derive(Clone)]
pub struct Tunnel {
    inner: Arc<Inner>,
}

struct Inner {
    router: Arc<Mutex<Router>>,
    local_addr: SocketAddr,
    name: String,
    /// For datagrams a method call must send at once (the handshake of a peer key change).
    /// Weak: the tasks own the socket, so [`Tunnel::shutdown`] still closes it.
    udp: Weak<UdpSocket>,
    is_v6_socket: bool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    packets: Mutex<Option<PacketThread>>,
}

/// The running packet thread and how to stop it.
struct PacketThread {
    stop: Arc<EventFd>,
    thread: std::thread::JoinHandle<()>,
}

impl PacketThread {
    /// Asks the thread to return (it does within one turn of its loop); does not wait.
    fn signal_stop(&self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!(error = %e, "cannot signal the WireGuard packet thread to stop");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone without shutdown(): stop the tasks and the packet thread; they own
        // the TUN and socket.
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        if let Some(packets) = lock(&self.packets).take() {
            packets.signal_stop();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the router usable (no invariant spans a panic).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tunnel {
    /// Binds the UDP socket, creates the TUN device (name, address/prefix, MTU, up), starts the
    /// packet thread and spawns the handshake and timer tasks. Must be called inside a tokio
    /// runtime.
    pub async fn start(cfg: TunnelConfig) -> Result<Tunnel, TunnelError> {
        cfg.validate()?;

        let udp = UdpSocket::bind(cfg.listen).map_err(|source| udp_error(cfg.listen, source))?;
        udp.set_nonblocking(true)
            .map_err(|source| udp_error(cfg.listen, source))?;
        let local_addr = udp.local_addr().map_err(|source| udp_error(cfg.listen, source))?;

        let tun = DeviceBuilder::new()
            .name(cfg.tun_name.as_str())
            .mtu(cfg.mtu)
            .ipv4(cfg.address, cfg.prefix_len, None)
            .enable(true)
            .build_sync()
            .and_then(|tun| tun.set_nonblocking(true).map(|()| tun))
            .map_err(|source| TunnelError::TunCreate {
                name: cfg.tun_name.clone(),
                source,
            })?;
        let name = tun.name().unwrap_or_else(|_| cfg.tun_name.clone());

        let router = Router::new(cfg.private_key);
        let router = Arc::new(Mutex::new(router));
        let udp = Arc::new(udp);
        let is_v6_socket = local_addr.is_ipv6();
        let udp_weak = Arc::downgrade(&udp);

        let (initiations_tx, initiations_rx) = tokio::sync::mpsc::channel::<QueuedInitiation>(HANDSHAKE_QUEUE);
        let initiations_rx = Arc::new(tokio::sync::Mutex::new(initiations_rx));
        let packets = PacketPath {
            router: Arc::clone(&router),
            tun,
            udp: Arc::clone(&udp),
            is_v6: is_v6_socket,
            initiations: initiations_tx,
        }
        .spawn(&name)?;
        let mut tasks = Vec::new();
        // As many as the runtime has worker threads: a current-thread runtime (or one worker)
        // answers handshakes one at a time.
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        for _ in 0..workers.clamp(1, MAX_HANDSHAKE_TASKS) {
            tasks.push(tokio::spawn(handshake_task(
                Arc::clone(&router),
                Arc::clone(&initiations_rx),
                Arc::clone(&udp),
                is_v6_socket,
            )));
        }
        tasks.push(tokio::spawn(timer_task(
            Arc::clone(&router),
            Arc::clone(&udp),
            is_v6_socket,
        )));

        tracing::info!(
            tun = %name,
            address = %cfg.address,
            prefix_len = cfg.prefix_len,
            mtu = cfg.mtu,
            udp = %local_addr,
            "WireGuard tunnel up"
        );
        Ok(Tunnel {
            inner: Arc::new(Inner {
                router,
                local_addr,
                name,
                udp: udp_weak,
                is_v6_socket,
                tasks: Mutex::new(tasks),
                packets: Mutex::new(Some(packets)),
            }),
        })
    }

    /// Adds or updates a peer (see [`Router::add_peer`]). A peer with an endpoint and
    /// persistent keepalive starts its handshake within one tick (250 ms).
    pub fn add_peer(&self, cfg: PeerConfig) -> Result<(), TunnelError> {
        lock(&self.inner.router).add_peer(cfg)
    }

    /// Removes a peer; returns whether it existed.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        lock(&self.inner.router).remove_peer(key)
    }

    /// Snapshots of all peers.
    pub fn stats(&self) -> Vec<PeerStats> {
        lock(&self.inner.router).stats()
    }

    /// Snapshot of one peer.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        lock(&self.inner.router).peer_stats(key)
    }

    /// Handshake messages per second accepted before cookies are demanded (see
    /// [`Router::handshake_rate_limit`]; by default it grows with the number of peers).
    pub fn handshake_rate_limit(&self) -> u64 {
        lock(&self.inner.router).handshake_rate_limit()
    }

    /// Fixes the handshake rate limit, or with `None` lets it follow the number of peers (see
    /// [`Router::set_handshake_rate_limit`]).
    pub fn set_handshake_rate_limit(&self, limit: Option<u64>) {
        lock(&self.inner.router).set_handshake_rate_limit(limit);
    }

    /// Router-wide drop counters.
    pub fn counters(&self) -> RouterCounters {
        lock(&self.inner.router).counters()
    }

    /// The bound UDP address (with the actual port when `listen` used port 0).
    pub fn local_udp_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The actual TUN interface name.
    pub fn device_name(&self) -> &str {
        &self.inner.name
    }

    /// This node's public key (the new one once a key rotation has started).
    pub fn public_key(&self) -> PublicKey {
        lock(&self.inner.router).public_key()
    }

    /// The key being rotated away from, while a key rotation is in progress.
    pub fn previous_public_key(&self) -> Option<PublicKey> {
        lock(&self.inner.router).previous_public_key()
    }

    /// Coordinator side of a key rotation: answer handshakes to both the old key and `new`;
    /// established sessions stay up. Returns the new public key. See
    /// [`Router::start_key_rotation`].
    pub fn start_key_rotation(&self, new: StaticSecret) -> Result<PublicKey, TunnelError> {
        lock(&self.inner.router).start_key_rotation(new)
    }

    /// Ends a key rotation: the old key is no longer answered and sessions still on it end.
    /// Returns how many peers lost an established session. See
    /// [`Router::finish_key_rotation`].
    pub fn finish_key_rotation(&self) -> Result<usize, TunnelError> {
        lock(&self.inner.router).finish_key_rotation()
    }

    /// Agent side of a key rotation: the peer `old` now has key `new`. The handshake to `new`
    /// is sent before this returns; traffic stays on the old session until the new one is
    /// up. See [`Router::set_peer_public_key`].
    pub async fn set_peer_public_key(&self, old: &PublicKey, new: PublicKey) -> Result<(), TunnelError> {
        let mut actions = Vec::new();
        lock(&self.inner.router).set_peer_public_key(old, new, &mut actions)?;
        let Some(udp) = self.inner.udp.upgrade() else {
            return Ok(());
        };
        // A handshake lost here is retried by the timer task.
        send_datagrams(&mut actions, &udp, self.inner.is_v6_socket);
        Ok(())
    }

    /// Stops the packet thread and the tasks and waits for them; this closes the TUN (the
    /// interface disappears) and the UDP socket. Other clones of this handle stay valid but no
    /// longer move packets.
    pub async fn shutdown(self) {
        let tasks: Vec<JoinHandle<()>> = lock(&self.inner.tasks).drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Cancelled is the expected outcome; a panic has already been reported.
            let _ = task.await;
        }
        let packets = lock(&self.inner.packets).take();
        if let Some(packets) = packets {
            packets.signal_stop();
            let thread = packets.thread;
            if let Ok(Err(_)) = tokio::task::spawn_blocking(move || thread.join()).await {
                tracing::error!(tun = %self.inner.name, "the WireGuard packet thread had panicked");
            }
        }
        tracing::info!(tun = %self.inner.name, "WireGuard tunnel shut down");
    }
}

fn udp_error(addr: SocketAddr, source: io::Error) -> TunnelError {
    if source.kind() == io::ErrorKind::AddrInUse {
        TunnelError::UdpBind { addr, source }
    } else {
        TunnelError::UdpSocket { addr, source }
    }
}

/// IPv4 peers on a dual-stack `[::]` socket appear as `::ffff:a.b.c.d`: the router sees them
/// as plain IPv4 so endpoints compare and print naturally.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The inverse of [`canonical`] for sending on an IPv6 socket.
fn for_socket(addr: SocketAddr, is_v6_socket: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if is_v6_socket => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        _ => addr,
    }
}

/// Sends the datagrams among `actions` (and drains them) without waiting: a full socket buffer
/// drops the datagram. For the tokio side, which only sends handshake messages and keepalives,
/// all of them retried by the timers.
fn send_datagrams(actions: &mut Vec<Action>, udp: &UdpSocket, is_v6: bool) {
    for action in actions.drain(..) {
        match action {
            Action::SendDatagram { to, data } => send_datagram(udp, to, &data, is_v6, false),
            // Handshakes and timers never decrypt anything for the TUN.
            Action::WriteTun(_) => tracing::debug!("unexpected TUN packet from a handshake or timer; dropped"),
        }
    }
}

/// Sends one datagram on the non-blocking socket. With `wait`, a full socket buffer is waited on
/// once, for at most [`SEND_WAIT_MS`]; otherwise (or still full) the datagram is dropped.
fn send_datagram(udp: &UdpSocket, to: SocketAddr, data: &[u8], is_v6: bool, wait: bool) {
    let dst = for_socket(to, is_v6);
    let result = match udp.send_to(data, dst) {
        Err(e) if wait && e.kind() == io::ErrorKind::WouldBlock => {
            let mut fds = [PollFd::new(udp.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(&mut fds, PollTimeout::from(SEND_WAIT_MS));
            udp.send_to(data, dst)
        }
        other => other,
    };
    if let Err(e) = result {
        tracing::debug!(%to, error = %e, "WireGuard UDP send failed; datagram dropped");
    }
}

/// What the packet thread owns: the data path of [`Tunnel`] (see the module docs).
struct PacketPath {
    router: Arc<Mutex<Router>>,
    tun: SyncDevice,
    udp: Arc<UdpSocket>,
    is_v6: bool,
    initiations: tokio::sync::mpsc::Sender<QueuedInitiation>,
}

impl PacketPath {
    /// Starts the packet thread, named `wg-<tun name>` (as `top -H` shows it).
    fn spawn(self, tun_name: &str) -> Result<PacketThread, TunnelError> {
        let setup = |what: &'static str| {
            move |e: Errno| TunnelError::PacketThread {
                what,
                source: io::Error::from(e),
            }
        };
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(setup("eventfd"))?;
        let stop = Arc::new(stop);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup("epoll"))?;
        for (fd, token) in [
            (stop.as_fd(), TOKEN_STOP),
            (self.udp.as_fd(), TOKEN_UDP),
            (self.tun.as_fd(), TOKEN_TUN),
        ] {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(setup("epoll_ctl"))?;
        }
        let name: String = format!("wg-{tun_name}").chars().take(15).collect();
        // The thread keeps the eventfd open: closing it would take it out of the epoll set
        // together with a stop signal written just before.
        let stop_open = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                self.run(&epoll);
                drop(stop_open);
            })
            .map_err(|source| TunnelError::PacketThread { what: "thread", source })?;
        Ok(PacketThread { stop, thread })
    }

    fn run(self, epoll: &Epoll) {
        let mut events = [EpollEvent::empty(); 3];
        let mut udp_buf = vec![0u8; MAX_DATAGRAM];
        let mut tun_buf = vec![0u8; MAX_IP_PACKET];
        let mut actions = Vec::new();
        loop {
            let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "WireGuard packet thread: epoll_wait failed; retrying");
                    std::thread::sleep(ERROR_BACKOFF);
                    continue;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    TOKEN_UDP => self.network_readable(&mut udp_buf, &mut tun_buf, &mut actions),
                    TOKEN_TUN => self.tun_readable(&mut tun_buf, BATCH, &mut actions),
                    _ => return,
                }
            }
        }
    }

    /// Datagrams from the network: decrypted into the TUN, or handshake work.
    fn network_readable(&self, buf: &mut [u8], tun_buf: &mut [u8], actions: &mut Vec<Action>) {
        for _ in 0..BATCH {
            match self.udp.recv_from(buf) {
                Ok((n, src)) if is_handshake_initiation(&buf[..n]) => {
                    if self.initiations.try_send((canonical(src), buf[..n].to_vec())).is_err() {
                        lock(&self.router).count_initiation_dropped();
                        tracing::debug!(%src, "WireGuard handshake queue full; initiation dropped (the peer retries)");
                    }
                }
                Ok((n, src)) => {
                    lock(&self.router).handle_datagram(canonical(src), &buf[..n], actions);
                    let wrote_tun = actions.iter().any(|a| matches!(a, Action::WriteTun(_)));
                    self.perform(actions);
                    if wrote_tun {
                        // Replies the kernel generated while the write ran (an echo reply, a TCP
                        // ACK) go out now rather than after another epoll turn.
                        self.tun_readable(tun_buf, INLINE_ANSWERS, actions);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "WireGuard UDP receive failed");
                    std::thread::sleep(ERROR_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Up to `limit` packets from the TUN, encrypted to their peers.
    fn tun_readable(&self, buf: &mut [u8], limit: usize, actions: &mut Vec<Action>) {
        for _ in 0..limit {
            match self.tun.recv(buf) {
                Ok(0) => {}
                Ok(n) => {
                    lock(&self.router).handle_tun_packet(&buf[..n], actions);
                    self.perform(actions);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "TUN read failed");
                    std::thread::sleep(ERROR_BACKOFF);
                    return;
                }
            }
        }
    }

    fn perform(&self, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::SendDatagram { to, data } => send_datagram(&self.udp, to, &data, self.is_v6, true),
                Action::WriteTun(packet) => {
                    if let Err(e) = self.tun.send(&packet) {
                        tracing::debug!(error = %e, "TUN write failed; packet dropped");
                    }
                }
            }
        }
    }
}

/// Answers queued handshake initiations; see the module docs. The Diffie-Hellman work of
/// [`Initiation::answer`] (about 0.1 ms) runs on this task without the router lock, so other
/// handshake tasks and the packet thread proceed meanwhile.
async fn handshake_task(
    router: Arc<Mutex<Router>>,
    initiations: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<QueuedInitiation>>>,
    udp: Arc<UdpSocket>,
    is_v6: bool,
) {
    let mut buf = vec![0u8; SCRATCH_LEN];
    let mut actions = Vec::new();
    loop {
        // One task at a time waits on the queue; the lock is released before the work.
        let next = initiations.lock().await.recv().await;
        let Some((src, datagram)) = next else { return };
        let accepted = lock(&router).accept_initiation(src, &datagram, &mut actions);
        if let Some(initiation) = accepted {
            let answered = initiation.answer(&mut buf);
            lock(&router).finish_initiation(answered, &mut actions);
        }
        send_datagrams(&mut actions, &udp, is_v6);
    }
}

async fn timer_task(router: Arc<Mutex<Router>>, udp: Arc<UdpSocket>, is_v6: bool) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut actions = Vec::new();
    loop {
        interval.tick().await;
        lock(&router).tick(&mut actions);
        send_datagrams(&mut actions, &udp, is_v6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_mapping_roundtrip() {
        let v4: SocketAddr = "192.0.2.7:51820".parse().unwrap_or_else(|_| unreachable!());
        let mapped = for_socket(v4, true);
        assert!(mapped.is_ipv6());
        assert_eq!(canonical(mapped), v4);
        assert_eq!(for_socket(v4, false), v4);
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn config_validation_names_each_problem() {
        let mut cfg = TunnelConfig::new(
            crate::keys::generate_secret(),
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            "this-name-is-far-too-long",
            Ipv4Addr::new(10, 0, 0, 1),
            33,
        );
        cfg.mtu = 100;
        let msg = cfg.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("prefix length 33"), "{msg}");
        assert!(msg.contains("MTU 100"), "{msg}");
        assert!(msg.contains("not a valid interface name"), "{msg}");
        assert!(!format!("{cfg:?}").contains("private_key: ["));
        cfg.tun_name = "nimbus0".into();
        cfg.prefix_len = 16;
        cfg.mtu = DEFAULT_MTU;
        assert!(cfg.validate().is_ok());
    }
}
