//! The one error type of the crate.

/// Why an artefact could not be rendered. Messages name the input at fault and say what to do; they never
/// contain the join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// An input value is malformed or unsafe to embed (`field` is its name, e.g. `package.url` or
    /// `hosts[2].mac`).
    #[error("{field}: {problem}")]
    Invalid {
        /// The input that was refused.
        field: String,
        /// What is wrong with it and what to give instead.
        problem: String,
    },
    /// The rendered payload is larger than the platform accepts.
    #[error(
        "{what} is {size} bytes, over the platform limit of {limit} bytes; drop or shorten the extra user scripts \
         (or the release root), or host the scripts somewhere the machine fetches them from"
    )]
    TooLarge {
        /// The payload, e.g. "Azure custom data".
        what: &'static str,
        /// Its size in bytes, measured as the limit is defined.
        size: usize,
        /// The platform limit in bytes.
        limit: usize,
    },
    /// Serialising a document failed. Inputs are validated first, so this is a bug.
    #[error("rendering {what} failed: {reason}; this is a bug in nimbus-bootstrap, please report it")]
    Render {
        /// The document being rendered.
        what: &'static str,
        /// The serialiser's message.
        reason: String,
    },
}

impl BootstrapError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        BootstrapError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn render(what: &'static str, reason: impl std::fmt::Display) -> Self {
        BootstrapError::Render {
            what,
            reason: reason.to_string(),
        }
    }
}
