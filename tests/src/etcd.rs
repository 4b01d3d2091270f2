//! A real etcd (Debian's etcd-server, `/usr/bin/etcd`) for the end-to-end tests: one member listening on the
//! loopback of a lab namespace (the coordinator's), plain HTTP, data in the test's work dir. Started and
//! killed by PID through [`Process`]; [`Etcd::restart`] keeps the data dir (a restarted etcd has the same state).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Process;
use crate::wait::{Attempt, poll_until};
use crate::{HarnessError, Result};

/// Where Debian installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";
/// Client and peer ports inside the namespace.
pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// A single-member etcd in a namespace.
#[derive(Debug)]
pub struct Etcd {
    ns: String,
    dir: PathBuf,
    process: Option<Process>,
    starts: usize,
}

impl Etcd {
    /// Whether etcd is installed; when it is not and `NIMBUS_REQUIRE_ROOT_TESTS=1`, panics saying what to install.
    pub fn available() -> bool {
        if Path::new(ETCD).exists() {
            return true;
        }
        assert!(
            std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
            "{ETCD} is missing but NIMBUS_REQUIRE_ROOT_TESTS=1: install etcd-server (apt-get install etcd-server)"
        );
        eprintln!("NOTE: skipping: {ETCD} not found (install etcd-server to run this test)");
        false
    }

    /// Starts etcd in `ns` with its data and log under `dir`, and waits until it answers `/health`.
    pub fn start(ns: &Netns, dir: &Path) -> Result<Etcd> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let mut etcd = Etcd {
            ns: ns.name().to_string(),
            dir: dir.to_path_buf(),
            process: None,
            starts: 0,
        };
        etcd.spawn(ns)?;
        Ok(etcd)
    }

    /// The client URL inside the namespace.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{CLIENT_PORT}")
    }

    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{PEER_PORT}");
        self.starts += 1;
        let log = self.dir.join(format!("etcd-{}.log", self.starts));
        let data = self.dir.join("data");
        let process = Process::builder("etcd", ETCD, &log)
            .netns_name(self.ns.clone())
            .args(["--name", "default", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .spawn()?;
        self.process = Some(process);
        let addr = format!("127.0.0.1:{CLIENT_PORT}");
        poll_until(
            "etcd to answer /health",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                if let Some(p) = &self.process
                    && let Some(status) = p.try_status()
                {
                    return Attempt::Fail(format!(
                        "etcd exited ({}); its log:\n{}",
                        Process::describe_status(Some(status)),
                        p.log()
                    ));
                }
                match crate::scrape::http_get(ns, &addr, "/health") {
                    Ok(r) if r.contains("\"health\":\"true\"") => Attempt::Done(()),
                    Ok(r) => Attempt::Retry(r),
                    Err(e) => Attempt::Retry(e),
                }
            },
        )
    }

    /// Kills etcd (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.kill9();
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// Kills and starts etcd again on the same data dir.
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.kill();
        self.spawn(ns)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
