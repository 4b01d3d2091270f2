//! Process signals in one place: SIGTERM/SIGINT drain and stop, SIGHUP reloads.

use tokio::signal::unix::{SignalKind, signal};

/// What the daemon was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Terminate,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// Listener for the daemon's signals. Create it early (inside the tokio runtime): from then on the
/// signals are caught instead of killing the process.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Register the handlers. Must be called from within a tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Wait for the next signal.
    pub async fn recv(&mut self) -> Signal {
        loop {
            // A stream only ends when the runtime shuts down; then wait on the remaining ones.
            tokio::select! {
                Some(()) = self.term.recv() => return Signal::Terminate,
                Some(()) = self.int.recv() => return Signal::Terminate,
                Some(()) = self.hup.recv() => return Signal::Reload,
                else => std::future::pending::<()>().await,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sighup_is_reload_and_sigterm_is_terminate() {
        let mut signals = Signals::new().unwrap();
        let pid = std::process::id() as libc::pid_t;
        // SAFETY: sending a signal to ourselves; handlers were installed by `Signals::new`.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        let got = tokio::time::timeout(Duration::from_secs(5), signals.recv())
            .await
            .unwrap();
        assert_eq!(got, Signal::Reload);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let got = tokio::time::timeout(Duration::from_secs(5), signals.recv())
            .await
            .unwrap();
        assert_eq!(got, Signal::Terminate);
    }
}
