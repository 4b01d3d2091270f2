//! The syslog sink: each entry or checkpoint as one datagram to the local syslog socket (`/dev/log`),
//! RFC 5424 or RFC 3164, facility `authpriv` or `local0`, with the sink's JSON line as the message.
//!
//! Severity is `info` for entries and `notice` for checkpoints. In RFC 5424 the MSGID is `1` for an
//! entry and `2` for a checkpoint (the JSON's `"type"` says the same), with no structured data.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;

use syslog::{Facility, Formatter3164, Formatter5424, Logger, LoggerBackend};

use crate::error::{AuditError, Result};
use crate::model::{Checkpoint, Entry};
use crate::sink::{Sink, checkpoint_json, entry_json};

/// Default local syslog socket.
pub const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";

/// Syslog facility for audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyslogFacility {
    /// `authpriv` (10): security/authorization messages kept private by most syslog configurations.
    #[default]
    AuthPriv,
    /// `local0` (16): for sites that route a local facility to their log shipper.
    Local0,
}

impl FromStr for SyslogFacility {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "authpriv" => Ok(SyslogFacility::AuthPriv),
            "local0" => Ok(SyslogFacility::Local0),
            other => Err(format!("unknown syslog facility {other:?}; use `authpriv` or `local0`")),
        }
    }
}

impl fmt::Display for SyslogFacility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyslogFacility::AuthPriv => "authpriv",
            SyslogFacility::Local0 => "local0",
        })
    }
}

impl SyslogFacility {
    fn facility(self) -> Facility {
        match self {
            SyslogFacility::AuthPriv => Facility::LOG_AUTHPRIV,
            SyslogFacility::Local0 => Facility::LOG_LOCAL0,
        }
    }
}

/// Syslog message format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyslogFormat {
    /// `<PRI>1 TIMESTAMP HOST APP PID MSGID - MSG` (UTC RFC 3339 timestamp).
    #[default]
    Rfc5424,
    /// `<PRI>Mmm dd hh:mm:ss APP[PID]: MSG` (BSD syslog, UTC time, no hostname on the local socket).
    Rfc3164,
}

/// Where and how to send audit records to syslog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    /// Unix datagram socket. Default [`DEFAULT_SYSLOG_SOCKET`].
    pub socket: PathBuf,
    /// Default `authpriv`.
    pub facility: SyslogFacility,
    /// Default RFC 5424.
    pub format: SyslogFormat,
    /// APP-NAME / tag. Default `nimbus-coordinator`.
    pub app_name: String,
}

impl Default for SyslogConfig {
    fn default() -> Self {
        SyslogConfig {
            socket: PathBuf::from(DEFAULT_SYSLOG_SOCKET),
            facility: SyslogFacility::default(),
            format: SyslogFormat::default(),
            app_name: "nimbus-coordinator".into(),
        }
    }
}

enum Conn {
    Bsd(Logger<LoggerBackend, Formatter3164>),
    Ietf(Logger<LoggerBackend, Formatter5424>),
}

/// The syslog [`Sink`]. Reconnects once when a send fails (syslog daemon restarted); otherwise logs the
/// failure with `tracing` and drops the record.
pub struct Syslog {
    config: SyslogConfig,
    conn: Mutex<Option<Conn>>,
}

impl fmt::Debug for Syslog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Syslog")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Syslog {
    /// Connects now, so a missing syslog daemon is reported at startup.
    pub fn connect(config: SyslogConfig) -> Result<Syslog> {
        let conn = open(&config)?;
        Ok(Syslog {
            config,
            conn: Mutex::new(Some(conn)),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SyslogConfig {
        &self.config
    }

    fn send(&self, what: &str, seq: u64, json: Result<String>) {
        let msg = match json {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%error, what, seq, "audit: could not encode a syslog message");
                return;
            }
        };
        let checkpoint = what == "checkpoint";
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                match open(&self.config) {
                    Ok(c) => *guard = Some(c),
                    Err(error) => {
                        tracing::warn!(%error, what, seq, "audit: syslog unavailable; record not sent");
                        return;
                    }
                }
            }
            let Some(conn) = guard.as_mut() else { return };
            let res = match (conn, checkpoint) {
                (Conn::Bsd(l), false) => l.info(&msg),
                (Conn::Bsd(l), true) => l.notice(&msg),
                (Conn::Ietf(l), false) => l.info((1, Default::default(), &msg)),
                (Conn::Ietf(l), true) => l.notice((2, Default::default(), &msg)),
            };
            match res {
                Ok(()) => return,
                Err(error) => {
                    *guard = None;
                    if attempt == 1 {
                        tracing::warn!(%error, socket = %self.config.socket.display(), what, seq,
                            "audit: syslog send failed; record not sent");
                    }
                }
            }
        }
    }
}

impl Sink for Syslog {
    fn emit_entry(&self, entry: &Entry) {
        self.send("entry", entry.seq, entry_json(entry));
    }

    fn emit_checkpoint(&self, checkpoint: &Checkpoint) {
        self.send("checkpoint", checkpoint.seq, checkpoint_json(checkpoint));
    }
}

fn open(config: &SyslogConfig) -> Result<Conn> {
    let err = |e: syslog::Error| AuditError::Syslog {
        path: config.socket.clone(),
        reason: e.to_string(),
    };
    let pid = std::process::id();
    Ok(match config.format {
        SyslogFormat::Rfc3164 => {
            let f = Formatter3164 {
                facility: config.facility.facility(),
                hostname: None,
                process: config.app_name.clone(),
                pid,
            };
            Conn::Bsd(syslog::unix_custom(f, &config.socket).map_err(err)?)
        }
        SyslogFormat::Rfc5424 => {
            let hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok());
            let f = Formatter5424 {
                facility: config.facility.facility(),
                hostname,
                process: config.app_name.clone(),
                pid,
            };
            Conn::Ietf(syslog::unix_custom(f, &config.socket).map_err(err)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GENESIS_PREV, Principal, Record};
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = vec![0u8; 65536];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn json_part(msg: &str) -> serde_json::Value {
        serde_json::from_str(&msg[msg.find('{').unwrap()..]).unwrap()
    }

    #[test]
    fn rfc5424_authpriv_carries_the_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let sink = Syslog::connect(SyslogConfig {
            socket: path.clone(),
            ..Default::default()
        })
        .unwrap();
        let e = Entry::seal(
            1,
            7,
            GENESIS_PREV,
            Record::new(Principal::uid(0), "node.accept", "node/a"),
        );
        sink.emit_entry(&e);
        let msg = recv(&server);
        // authpriv (10) * 8 + info (6) = 86
        assert!(msg.starts_with("<86>1 "), "{msg}");
        assert!(msg.contains(" nimbus-coordinator "), "{msg}");
        let v = json_part(&msg);
        assert_eq!(v["type"], "entry");
        assert_eq!(v["hash"], e.hash.as_str());
    }

    #[test]
    fn rfc3164_local0_checkpoint_is_notice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let config = SyslogConfig {
            socket: path.clone(),
            facility: "local0".parse().unwrap(),
            format: SyslogFormat::Rfc3164,
            app_name: "nimbus-test".into(),
        };
        let sink = Syslog::connect(config).unwrap();
        let key = crate::AuditKey::generate().unwrap();
        sink.emit_checkpoint(&key.sign_checkpoint(4, &"c".repeat(64), 9));
        let msg = recv(&server);
        // local0 (16) * 8 + notice (5) = 133
        assert!(msg.starts_with("<133>"), "{msg}");
        assert!(msg.contains(&format!("nimbus-test[{}]: ", std::process::id())), "{msg}");
        assert_eq!(json_part(&msg)["type"], "checkpoint");
    }

    #[test]
    fn reconnects_after_the_daemon_restarts_and_never_panics_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        let sink = Syslog::connect(SyslogConfig {
            socket: path.clone(),
            ..Default::default()
        })
        .unwrap();
        drop(server);
        std::fs::remove_file(&path).unwrap();
        let e = Entry::seal(1, 7, GENESIS_PREV, Record::new(Principal::uid(0), "a", "b"));
        sink.emit_entry(&e); // no daemon: logged and dropped
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sink.emit_entry(&e);
        assert_eq!(json_part(&recv(&server))["seq"], 1);
    }

    #[test]
    fn missing_socket_is_an_error_at_connect() {
        let err = Syslog::connect(SyslogConfig {
            socket: "/nonexistent/log".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("syslog daemon"), "{err}");
        assert!("kern".parse::<SyslogFacility>().is_err());
    }
}
