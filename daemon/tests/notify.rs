#![allow(clippy::unwrap_used)] // tests may unwrap
//! sd_notify against a fake NOTIFY_SOCKET. Everything that touches the environment lives in this ONE
//! test function (this file is its own test binary), so no other test can race on `set_var`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("datagram within the timeout");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[tokio::test]
async fn notify_sends_datagrams_to_notify_socket() {
    // Unset: every call is a silent no-op, and no watchdog task.
    // SAFETY: the only test in this binary; no other thread reads the environment concurrently.
    unsafe {
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
    }
    daemon::notify::ready();
    daemon::notify::status("nobody listens");
    assert!(daemon::notify::spawn_watchdog().is_none());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // SAFETY: as above.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };

    daemon::notify::ready();
    assert_eq!(recv(&sock), "READY=1");
    daemon::notify::status("x");
    assert_eq!(recv(&sock), "STATUS=x");
    daemon::notify::status("two\nlines\0");
    assert_eq!(recv(&sock), "STATUS=two lines ");
    daemon::notify::stopping();
    assert_eq!(recv(&sock), "STOPPING=1");
    daemon::notify::reloading();
    let msg = recv(&sock);
    let mut lines = msg.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"));
    let usec = lines.next().unwrap().strip_prefix("MONOTONIC_USEC=").unwrap();
    assert!(usec.parse::<u64>().unwrap() > 0, "{msg}");
    // The environment is left alone (unset_environment = false).
    assert_eq!(std::env::var_os("NOTIFY_SOCKET").as_deref(), Some(path.as_os_str()));

    // Watchdog for another pid: not ours, so no task.
    // SAFETY: as above.
    unsafe {
        std::env::set_var("WATCHDOG_USEC", "200000");
        std::env::set_var("WATCHDOG_PID", "1");
    }
    assert!(daemon::notify::spawn_watchdog().is_none());

    // Watchdog for us: WATCHDOG=1 at least twice within a few half-periods.
    // SAFETY: as above.
    unsafe { std::env::set_var("WATCHDOG_PID", std::process::id().to_string()) };
    assert_eq!(daemon::notify::watchdog_period(), Some(Duration::from_millis(200)));
    let handle = daemon::notify::spawn_watchdog().expect("watchdog task");
    let sock = tokio::net::UnixDatagram::from_std({
        sock.set_nonblocking(true).unwrap();
        sock
    })
    .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
    // First ping immediately, then every 100 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
}
