//! Version skew between agents and the coordinator.
//!
//! The coordinator serves agents of its own minor version and of the minor version before it (same major):
//! coordinator 0.4.x serves agents 0.3.x and 0.4.x. So the order of an upgrade is always coordinator first, then
//! agents in waves, and an agent is never more than one minor version behind. An agent newer than its
//! coordinator is refused (upgrade the coordinator first); an older one is refused with the oldest version it
//! would accept. The contract itself only grows between neighbouring releases (see [`crate::compat`]).
//!
//! Checked at enrollment and at every fleet-stream Hello, so a refused agent learns why at once.

use semver::Version;

/// Why an agent version is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkewError {
    #[error("agent version {agent:?} is not a semantic version (MAJOR.MINOR.PATCH); reinstall the agent package")]
    Unparsable { agent: String },
    #[error(
        "agent {agent} is newer than this coordinator ({coordinator}): upgrade the coordinator first, then the agents"
    )]
    AgentNewer { agent: Version, coordinator: Version },
    #[error(
        "agent {agent} is too old for this coordinator ({coordinator}), which serves agents {oldest} and newer of \
         its major version: upgrade this host's agent package (or run `nimbus-agent bootstrap` with the new one)"
    )]
    AgentTooOld {
        agent: Version,
        coordinator: Version,
        oldest: String,
    },
}

/// Checks that a coordinator of version `coordinator` serves an agent reporting `agent`.
pub fn check(coordinator: &Version, agent: &str) -> Result<(), SkewError> {
    let a = Version::parse(agent.trim()).map_err(|_| SkewError::Unparsable {
        agent: agent.chars().take(64).collect(),
    })?;
    let oldest_minor = coordinator.minor.saturating_sub(1);
    if (a.major, a.minor) > (coordinator.major, coordinator.minor) {
        return Err(SkewError::AgentNewer {
            agent: a,
            coordinator: coordinator.clone(),
        });
    }
    if a.major < coordinator.major || a.minor < oldest_minor {
        return Err(SkewError::AgentTooOld {
            agent: a,
            coordinator: coordinator.clone(),
            oldest: format!("{}.{oldest_minor}.0", coordinator.major),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_and_the_previous_minor_are_served_nothing_else() {
        let c = Version::parse("1.4.2").unwrap();
        for ok in ["1.4.0", "1.4.9", "1.3.0", "1.3.7", "1.4.3-rc.1"] {
            assert_eq!(check(&c, ok), Ok(()), "{ok}");
        }
        for newer in ["1.5.0", "2.0.0"] {
            assert!(matches!(check(&c, newer), Err(SkewError::AgentNewer { .. })), "{newer}");
        }
        for old in ["1.2.9", "0.9.0"] {
            let e = check(&c, old).unwrap_err();
            assert!(matches!(e, SkewError::AgentTooOld { .. }), "{old}");
            assert!(e.to_string().contains("serves agents 1.3.0 and newer"), "{e}");
        }
        for junk in ["", "1.4", "v1.4.0", "latest"] {
            assert!(matches!(check(&c, junk), Err(SkewError::Unparsable { .. })), "{junk:?}");
        }
        // 0.x: the minor is what moves.
        let c = Version::parse("0.1.0").unwrap();
        assert_eq!(check(&c, "0.1.0"), Ok(()));
        assert_eq!(check(&c, "0.0.5"), Ok(()));
        assert!(check(&c, "0.2.0").is_err());
        let c = Version::parse("2.0.0").unwrap();
        assert!(check(&c, "1.9.0").is_err(), "a new major serves only its own");
    }
}
