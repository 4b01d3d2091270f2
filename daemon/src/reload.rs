//! SIGHUP handling shared by the daemons: re-read and validate the
//! configuration, apply what can change live (the log filter) and name the
//! keys that only take effect at restart.

use crate::logging::LogControl;

/// A daemon configuration that SIGHUP can reload.
pub trait Reloadable {
    /// The log filter to apply live.
    fn log_level(&self) -> &str;
    /// Keys that differ in `new` and only take effect at restart.
    fn restart_needed_for(&self, new: &Self) -> Vec<&'static str>;
}

/// What a reload did, for logging and tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Valid; the log level was applied; these keys wait for a restart.
    Applied { restart_needed_for: Vec<&'static str> },
    /// Invalid: nothing changed.
    Rejected(Vec<String>),
}

/// Apply a freshly loaded configuration to a running daemon. An invalid one
/// changes nothing; the running configuration stays what it was.
pub fn apply<C: Reloadable>(loaded: Result<C, Vec<String>>, running: &C, logs: &LogControl) -> Outcome {
    match loaded {
        Ok(new) => {
            if let Err(e) = logs.set_filter(new.log_level()) {
                tracing::error!(error = %e, "log level not changed");
            }
            let pending = running.restart_needed_for(&new);
            if pending.is_empty() {
                tracing::info!(log_level = new.log_level(), "configuration reloaded");
            } else {
                tracing::warn!(
                    log_level = new.log_level(), restart_needed_for = ?pending,
                    "configuration reloaded; these keys take effect at restart"
                );
            }
            Outcome::Applied {
                restart_needed_for: pending,
            }
        }
        Err(errs) => {
            tracing::error!(errors = ?errs, "configuration reload rejected; keeping the running configuration");
            Outcome::Rejected(errs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct C(&'static str, u16);
    impl Reloadable for C {
        fn log_level(&self) -> &str {
            self.0
        }
        fn restart_needed_for(&self, new: &Self) -> Vec<&'static str> {
            if self.1 == new.1 { vec![] } else { vec!["port"] }
        }
    }

    #[test]
    fn applies_valid_and_rejects_invalid() {
        let logs = LogControl::inert();
        assert_eq!(
            apply(Ok(C("debug", 1)), &C("info", 1), &logs),
            Outcome::Applied {
                restart_needed_for: vec![]
            }
        );
        assert_eq!(
            apply(Ok(C("info", 2)), &C("info", 1), &logs),
            Outcome::Applied {
                restart_needed_for: vec!["port"]
            }
        );
        assert_eq!(
            apply::<C>(Err(vec!["bad".into()]), &C("info", 1), &logs),
            Outcome::Rejected(vec!["bad".into()])
        );
    }
}
