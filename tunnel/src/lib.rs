//! Embedded userspace WireGuard for polynimbus: boringtun's `noise::Tunn` in-process, one UDP
//! socket, many peers, and a real TUN interface carrying the overlay subnet. This kernel has no
//! WireGuard module, so the agent (one peer: the coordinator, with persistent keepalive) and the
//! coordinator (one peer per agent) both run the protocol here. Kernel TCP (gRPC included) runs
//! over the TUN device like over any other interface.
//!
//! # Layout
//!
//! - [`keys`]: x25519 key generation, base64 encoding, and the private key file
//!   ([`keys::load_or_create_secret`]: created atomically with mode 0600, refused when group/other
//!   can read it).
//! - [`router`]: the sans-IO driver ([`Router`]). It owns one [`boringtun::noise::Tunn`] per
//!   peer, the allowed-IPs table (longest prefix match) and the handshake rate limit (scaled with
//!   the number of peers; cookies through boringtun's
//!   [`boringtun::noise::rate_limiter::RateLimiter`] beyond it). It takes packets and datagrams and returns
//!   [`Action`]s. No sockets, no TUN, no clock of its own beyond what boringtun reads: it is
//!   tested entirely in memory.
//! - [`device`]: the I/O shell ([`Tunnel`]): creates the TUN device (address, prefix, MTU, up),
//!   binds the UDP socket and feeds the `Router` (kept behind a `std::sync::Mutex` that is never
//!   held across I/O or `.await`) from one packet thread (the data path, blocking in `epoll_wait`),
//!   one tokio handshake task per runtime worker that answers initiations with most of the
//!   Diffie-Hellman work outside the router lock ([`Initiation`]), and a tokio timer task.
//! - [`error`]: [`TunnelError`], one variant per cause, each message saying what to do.
//!
//! # Data path
//!
//! ```text
//!  kernel ──IP packet──▶ TUN ──packet thread──▶ Router::handle_tun_packet ──SendDatagram──▶ UDP send_to
//!  network ──datagram──▶ UDP ──packet thread──▶ Router::handle_datagram ──WriteTun──▶ TUN write ──▶ kernel
//!                                             Router::handle_datagram ──SendDatagram──▶ UDP (handshake
//!                                                                       responses, cookies, queued data)
//!  handshake initiations ──packet thread──▶ queue ──handshake tasks (one per worker thread)──▶
//!      Router::accept_initiation ─▶ Initiation::answer (no router lock) ─▶ Router::finish_initiation ─▶ UDP
//!  timer task, every 250 ms (TICK_INTERVAL) ──▶ Router::tick ──▶ keepalives, handshake retries
//! ```
//!
//! # Invariants
//!
//! - **Cryptokey routing on receive:** a decrypted packet is written to the TUN only if its
//!   *source* address routes (longest prefix match over all peers' allowed IPs) back to the peer
//!   whose keys decrypted it. The coordinator identifies agents by overlay source IP, so a peer
//!   can never speak with another peer's address. Violations are dropped and counted
//!   ([`RouterCounters::spoofed_source`]).
//! - **Unknown peers are dropped:** a handshake initiation from a static key that is not
//!   configured, or a packet whose receiver index matches no peer, is dropped (debug log,
//!   counted). Nothing is ever answered to an unknown key except, under load, a cookie reply.
//! - **Roaming:** a peer's endpoint follows the source of its last authenticated packet, as in
//!   WireGuard.
//! - **No panics on input:** every buffer is sized for the largest IP packet plus WireGuard
//!   overhead; oversized or malformed input is dropped.
//! - **Nothing left behind:** the TUN device is not persistent; it disappears when the
//!   [`Tunnel`] is shut down or its last handle is dropped.

pub mod device;
pub mod error;
pub mod handshakes;
pub mod keys;
pub mod router;

pub use device::{DEFAULT_MTU, Tunnel, TunnelConfig};
pub use error::TunnelError;
pub use handshakes::HandshakeCounter;
pub use keys::{PublicKey, StaticSecret};
pub use router::{
    Action, AnsweredInitiation, Initiation, LocalKey, PeerConfig, PeerStats, Router, RouterCounters, TICK_INTERVAL,
    handshake_rate_limit,
};
