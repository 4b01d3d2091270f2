//! Waiting without sleeps: one patience setting and polling helpers.

use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// Environment variable overriding [`patience`], in whole seconds.
pub const PATIENCE_ENV: &str = "NIMBUS_E2E_PATIENCE_SECS";

/// Default patience when [`PATIENCE_ENV`] is unset or unparsable: 30 s.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);

/// Default polling interval for [`eventually`]-style waits: 250 ms.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// How long any "eventually" condition may take. Default 30 s. Env: `NIMBUS_E2E_PATIENCE_SECS`.
pub fn patience() -> Duration {
    parse_patience(std::env::var(PATIENCE_ENV).ok().as_deref())
}

fn parse_patience(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_PATIENCE)
}

/// One attempt of a [`poll_until`] loop.
#[derive(Debug)]
pub enum Attempt<T> {
    /// The condition holds; stop with this value.
    Done(T),
    /// Not yet; the message says why (it is reported if time runs out).
    Retry(String),
    /// It will never hold (e.g. the process exited); stop now with this reason.
    Fail(String),
}

/// Polls `f` every `poll` until it returns [`Attempt::Done`], fails for good, or `timeout` passes.
///
/// `f` always runs at least once, and once more at the deadline.
pub fn poll_until<T>(what: &str, timeout: Duration, poll: Duration, mut f: impl FnMut() -> Attempt<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Attempt::Done(value) => return Ok(value),
            Attempt::Fail(reason) => {
                return Err(HarnessError::GaveUp {
                    what: what.to_string(),
                    reason,
                });
            }
            Attempt::Retry(last) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(HarnessError::Timeout {
                        what: what.to_string(),
                        after: timeout,
                        last,
                    });
                }
                std::thread::sleep(poll.min(deadline - now));
            }
        }
    }
}

/// Polls `f` until it returns `Ok`, and returns that value.
///
/// # Panics
/// When `timeout` passes first, with the last error message `f` returned.
pub fn eventually<T>(timeout: Duration, poll: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let outcome = poll_until("condition", timeout, poll, || match f() {
        Ok(value) => Attempt::Done(value),
        Err(e) => Attempt::Retry(e),
    });
    match outcome {
        Ok(value) => value,
        Err(HarnessError::Timeout { after, last, .. }) => {
            panic!("condition not met within {after:?}: {last}")
        }
        Err(other) => panic!("{other}"),
    }
}

/// [`eventually`] with the default [`patience`] and [`DEFAULT_POLL`].
pub fn eventually_patiently<T>(f: impl FnMut() -> Result<T, String>) -> T {
    eventually(patience(), DEFAULT_POLL, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn patience_parses_env_value_and_falls_back() {
        assert_eq!(parse_patience(Some("5")), Duration::from_secs(5));
        assert_eq!(parse_patience(Some(" 12 ")), Duration::from_secs(12));
        assert_eq!(parse_patience(Some("0")), DEFAULT_PATIENCE);
        assert_eq!(parse_patience(Some("soon")), DEFAULT_PATIENCE);
        assert_eq!(parse_patience(None), DEFAULT_PATIENCE);
    }

    #[test]
    fn eventually_returns_the_first_ok_value() {
        let calls = Cell::new(0);
        let v = eventually(Duration::from_secs(5), Duration::from_millis(1), || {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(format!("attempt {}", calls.get()))
            } else {
                Ok(calls.get() * 10)
            }
        });
        assert_eq!(v, 30);
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn eventually_panics_with_the_last_error() {
        let calls = Cell::new(0);
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually::<()>(Duration::from_millis(50), Duration::from_millis(5), || {
                calls.set(calls.get() + 1);
                Err(format!("still down (try {})", calls.get()))
            })
        }))
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("not met within 50ms"), "{msg}");
        assert!(msg.contains(&format!("still down (try {})", calls.get())), "{msg}");
        assert!(calls.get() >= 2, "polled at least twice, got {}", calls.get());
    }

    #[test]
    fn poll_until_stops_at_once_on_fail() {
        let start = Instant::now();
        let err = poll_until::<()>("agent up", Duration::from_secs(30), Duration::from_millis(1), || {
            Attempt::Fail("agent exited with code 77".into())
        })
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        let msg = err.to_string();
        assert!(msg.contains("agent up") && msg.contains("code 77"), "{msg}");
    }

    #[test]
    fn poll_until_reports_timeout_with_last_reason() {
        let err = poll_until::<()>("nodes", Duration::from_millis(20), Duration::from_millis(5), || {
            Attempt::Retry("0/3 connected".into())
        })
        .unwrap_err();
        assert!(
            matches!(err, HarnessError::Timeout { ref last, .. } if last == "0/3 connected"),
            "{err}"
        );
    }
}
