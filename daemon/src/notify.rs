//! systemd readiness notification (`sd_notify`) and the watchdog keep-alive.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd with
//! `Type=notify`). Failures are logged at `warn` and otherwise ignored: a daemon must not die because
//! the service manager went away.

use std::time::Duration;

use systemd::daemon;

fn send(state: &[(&str, &str)]) {
    match daemon::notify(state.iter()) {
        Ok(_) => {}
        Err(err) => {
            let keys: Vec<&str> = state.iter().map(|(k, _)| *k).collect();
            tracing::warn!(error = %err, ?keys, "sd_notify failed; is NOTIFY_SOCKET valid?");
        }
    }
}

/// `READY=1`: startup finished (sockets bound, tunnel up). Also send it after a reload completed.
pub fn ready() {
    send(&[(daemon::STATE_READY, "1")]);
}

/// `STATUS=msg`: free-form status line shown by `systemctl status`. NUL bytes and newlines are replaced
/// by spaces (the protocol is newline-separated).
pub fn status(msg: &str) {
    let clean: String = msg
        .chars()
        .map(|c| if c == '\0' || c == '\n' { ' ' } else { c })
        .collect();
    send(&[(daemon::STATE_STATUS, clean.as_str())]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[(daemon::STATE_STOPPING, "1")]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`). Send [`ready`] when the
/// reload is done.
pub fn reloading() {
    let usec = monotonic_usec().to_string();
    send(&[(daemon::STATE_RELOADING, "1"), ("MONOTONIC_USEC", usec.as_str())]);
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or ours).
pub fn watchdog_period() -> Option<Duration> {
    match daemon::watchdog_enabled() {
        Ok(0) => None,
        Ok(usec) => Some(Duration::from_micros(usec)),
        Err(err) => {
            tracing::warn!(error = %err, "ignoring invalid WATCHDOG_USEC/WATCHDOG_PID");
            None
        }
    }
}

/// If systemd asked for a watchdog, spawn a task that sends `WATCHDOG=1` every half period (the first
/// one right away) and return its handle; otherwise, or outside a tokio runtime, `None`.
/// Abort the handle to stop pinging (e.g. when the main loop is stuck and you want systemd to notice).
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = watchdog_period()?;
    let handle = match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle,
        Err(_) => {
            tracing::warn!("watchdog requested but no tokio runtime is running; not sending WATCHDOG=1");
            return None;
        }
    };
    let every = (period / 2).max(Duration::from_millis(1));
    tracing::debug!(?period, ?every, "systemd watchdog enabled");
    Some(handle.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[(daemon::STATE_WATCHDOG, "1")]);
        }
    }))
}
