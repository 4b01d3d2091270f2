//! Kernel uevents (`NETLINK_KOBJECT_UEVENT`): a cheap trigger to re-collect the
//! inventory when a block device or a network interface appears, disappears
//! or changes, instead of waiting for the next timer tick. Messages are only a
//! hint: nothing in them is trusted or stored.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Kernel uevent multicast group.
const KERNEL_GROUP: u32 = 1;

/// Whether a uevent payload (`ACTION@DEVPATH\0KEY=VALUE\0...`) concerns disks or NICs.
pub fn is_interesting(payload: &[u8]) -> bool {
    payload
        .split(|b| *b == 0)
        .any(|kv| kv == b"SUBSYSTEM=block" || kv == b"SUBSYSTEM=net")
}

/// Listen for uevents and call `wake.notify_one()` on interesting ones. Returns `false` (and logs) when the
/// socket cannot be opened; the timer still re-collects then.
pub fn spawn(wake: Arc<Notify>) -> bool {
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::info!(error = %e, "kernel uevents unavailable; inventory changes are found by the timer only");
            return false;
        }
    };
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same until it is dropped.
    let fd = match unsafe { AsyncFd::register(fd) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::info!(error = %e, "kernel uevents unavailable; inventory changes are found by the timer only");
            return false;
        }
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        loop {
            let Ok(mut guard) = fd.readable().await else { return };
            match guard.try_io(|inner| {
                recv(inner.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    if is_interesting(&buf[..n.min(buf.len())]) {
                        wake.notify_one();
                    }
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => wake.notify_one(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "uevent socket failed; timer only from now on");
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    });
    true
}

fn open() -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_block_and_net_events() {
        assert!(is_interesting(
            b"add@/devices/virtual/block/loop3\0ACTION=add\0SUBSYSTEM=block\0DEVNAME=loop3\0"
        ));
        assert!(is_interesting(
            b"change@/devices/virtual/net/eth0\0ACTION=change\0SUBSYSTEM=net\0"
        ));
        assert!(!is_interesting(b"add@/module/foo\0ACTION=add\0SUBSYSTEM=module\0"));
        assert!(!is_interesting(b"SUBSYSTEM=blockish"));
        assert!(!is_interesting(b""));
    }
}
