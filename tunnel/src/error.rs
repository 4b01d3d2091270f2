//! Errors of the tunnel crate: one variant per cause, each message says what to do.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong while setting up keys, peers or the tunnel device.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The TUN device could not be created or configured (address, MTU, link up).
    #[error("cannot create TUN device {name}: {source}; {}", tun_hint(.name, .source))]
    TunCreate {
        name: String,
        #[source]
        source: io::Error,
    },

    /// The UDP port is already taken.
    #[error(
        "cannot bind WireGuard UDP socket on {addr}: address in use; another WireGuard/nimbus \
         process is using it — pick another port with the listen address setting (e.g. port 0 \
         for an ephemeral one) or stop the other process"
    )]
    UdpBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// The packet thread could not be set up (its epoll, its stop eventfd or the thread).
    #[error(
        "cannot start the WireGuard packet thread ({what}): {source}; the host is out of a \
         per-process resource (open files or threads): check `ulimit -n` and the service's \
         LimitNOFILE and TasksMax"
    )]
    PacketThread {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// The UDP socket could not be set up for another reason than the port being in use.
    #[error(
        "cannot set up WireGuard UDP socket on {addr}: {source}; check that the address is \
         assigned to this host (or listen on 0.0.0.0 / [::]) and that the port is allowed"
    )]
    UdpSocket {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// Key material is not a valid x25519 key (wrong length, bad base64, all zeros).
    #[error("invalid WireGuard key: {0}")]
    InvalidKey(String),

    /// The private key file can be read by group or other.
    #[error(
        "private key file {} has mode {mode:04o}, which lets group/other access it; \
         run `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    KeyFilePermissions { path: PathBuf, mode: u32 },

    /// The private key file belongs to another user than the one running this process.
    #[error(
        "private key file {} is owned by uid {owner} but this process runs as uid {euid}; \
         run `chown {euid} {}` (and keep mode 600)",
        .path.display(),
        .path.display()
    )]
    KeyFileOwner { path: PathBuf, owner: u32, euid: u32 },

    /// The private key file exists but cannot be read.
    #[error("cannot read private key file {}: {source}", .path.display())]
    KeyFileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The private key file could not be created.
    #[error(
        "cannot create private key file {}: {source}; check that its directory is writable \
         by this process",
        .path.display()
    )]
    KeyFileWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A peer configuration was rejected (e.g. it names this node's own key).
    #[error("invalid WireGuard peer: {0}")]
    InvalidPeer(String),

    /// A tunnel configuration value is out of range (prefix length, MTU, interface name).
    #[error("invalid tunnel configuration: {0}")]
    InvalidConfig(String),

    /// A key rotation step was out of order (one already running, none to finish, a reused key).
    #[error("WireGuard key rotation: {0}")]
    KeyRotation(String),
}

/// The actionable part of a [`TunnelError::TunCreate`] message, chosen by the OS error.
fn tun_hint(name: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EEXIST) => format!(
            "an interface named {name} already exists and is held by another process; stop that \
             process, delete the interface (`ip link del {name}`) or choose another TUN name"
        ),
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            "/dev/net/tun is missing: load the tun module (`modprobe tun`) or, in a container, \
             pass the device through (e.g. `--device /dev/net/tun`)"
                .to_string()
        }
        Some(libc::EINVAL) => format!(
            "the kernel rejected the settings for {name}: check the interface name (at most 15 \
             characters), the overlay address/prefix and the MTU"
        ),
        _ => "the process needs CAP_NET_ADMIN and /dev/net/tun (run as root or grant \
              AmbientCapabilities=CAP_NET_ADMIN)"
            .to_string(),
    }
}
