//! Shared by the integration tests that need a real etcd (Debian's etcd-server, /usr/bin/etcd): a
//! single-member etcd started on loopback with random ports in a temporary data directory, killed by PID
//! when dropped.
//!
//! Without /usr/bin/etcd, [`Etcd::start`] prints a note and returns `None` (the test passes), unless
//! NIMBUS_REQUIRE_ROOT_TESTS=1 (CI), where it panics.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::store::{EtcdOptions, EtcdStore};

pub const ETCD: &str = "/usr/bin/etcd";

/// A single-member etcd on 127.0.0.1.
pub struct Etcd {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts etcd, or returns `None` (after printing why) when it is not installed and not required.
    pub fn start() -> Option<Etcd> {
        if !Path::new(ETCD).exists() {
            if std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
                panic!(
                    "{ETCD} is missing but NIMBUS_REQUIRE_ROOT_TESTS=1: install etcd-server (apt-get install etcd-server)"
                );
            }
            eprintln!("NOTE: skipping etcd store test: {ETCD} not found (install etcd-server to run it)");
            return None;
        }
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        // Ports come from binding port 0 and closing it, so a parallel test may grab one before etcd does:
        // start over with fresh ports and a fresh data directory when etcd exits during startup.
        for attempt in 1.. {
            match etcd.try_spawn() {
                Ok(()) => break,
                Err(e) if attempt < 3 => {
                    eprintln!("NOTE: etcd start attempt {attempt} failed, retrying on other ports: {e}");
                    let _ = std::fs::remove_dir_all(etcd.data_dir());
                    etcd.client_port = free_port();
                    etcd.peer_port = free_port();
                }
                Err(e) => panic!("{e}"),
            }
        }
        Some(etcd)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts etcd again on the same ports and data directory (after [`Etcd::kill`]); panics if it fails.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none());
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new(ETCD)
            .args(["--name", "default"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until etcd answers a store connection (20 s at most); kills it and says why when it does not.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status} during startup; log:\n{}",
                    self.log()
                ));
            }
            let mut o = self.options("probe/");
            o.connect_timeout = Duration::from_millis(500);
            o.request_timeout = Duration::from_secs(1);
            if EtcdStore::connect(o).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("etcd did not become ready in 20 s; log:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn options(&self, prefix: &str) -> EtcdOptions {
        let mut o = EtcdOptions::new([self.endpoint()]).with_prefix(prefix);
        o.connect_timeout = Duration::from_secs(2);
        o.request_timeout = Duration::from_secs(5);
        o
    }

    pub fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::connect(self.options(prefix)).unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
