//! Daemon plumbing shared by `nimbus-agent` and `nimbus-coordinator`.
//!
//! # Layout
//!
//! - [`config`]: load a TOML file into a `serde` type and report *every* problem at once (syntax errors
//!   with line and column, unknown keys with dotted paths, type errors per key), plus [`config::EXIT_USAGE`].
//! - [`logging`]: one-call `tracing` setup (text or JSON on stderr, `RUST_LOG` overrides the default filter).
//! - [`notify`]: systemd `sd_notify` (`READY=1`, `STATUS=`, `STOPPING=1`, `RELOADING=1`) and the watchdog
//!   keep-alive task; every call is a no-op when `NOTIFY_SOCKET` is unset.
//! - [`reload`]: SIGHUP — re-read and validate the configuration, apply the log filter live, name the keys
//!   that take effect at restart ([`reload::Reloadable`]).
//! - [`signals`]: SIGTERM/SIGINT → [`signals::Signal::Terminate`], SIGHUP → [`signals::Signal::Reload`].
//!
//! Invariant: nothing here modifies the process environment (the systemd calls are made with
//! `unset_environment = false`).

pub mod config;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod signals;
