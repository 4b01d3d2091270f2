//! Diagnostics: what is wrong in a policy file, where, and what to do about it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One problem found in a policy, with its position (1-based line and column; `0:0` when the text had no
/// positions, as for [`crate::Policy::from_canonical_json`]) and a hint saying what to do.
///
/// `Display`: `FILE:LINE:COL: MESSAGE (hint: HINT)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)?;
        if !self.hint.is_empty() {
            write!(f, " (hint: {})", self.hint)?;
        }
        Ok(())
    }
}

/// Every problem found while parsing and validating a policy, sorted by position. Never empty when returned
/// as an error.
///
/// `Display`: one [`Diagnostic`] per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyErrors(pub Vec<Diagnostic>);

impl PolicyErrors {
    /// The messages alone, in order (handy in tests and short reports).
    pub fn messages(&self) -> Vec<&str> {
        self.0.iter().map(|d| d.message.as_str()).collect()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// A position in a policy file (1-based line and column).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub(crate) fn new(line: usize, column: usize) -> Self {
        Pos { line, column }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where an environment, pool or cohort was defined ([`crate::Policy::locate`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Collects diagnostics for one file.
#[derive(Debug)]
pub(crate) struct Sink {
    pub file: String,
    pub diags: Vec<Diagnostic>,
}

impl Sink {
    pub fn new(file: &str) -> Self {
        Sink {
            file: file.to_string(),
            diags: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>, hint: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
            hint: hint.into(),
        });
    }

    /// The diagnostics sorted by position (stable: equal positions keep their order), without exact duplicates.
    pub fn finish(mut self) -> Vec<Diagnostic> {
        self.diags.sort_by_key(|d| (d.line, d.column));
        self.diags.dedup();
        self.diags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_formats() {
        let d = Diagnostic {
            file: "p.yaml".into(),
            line: 3,
            column: 5,
            message: "bad".into(),
            hint: "fix it".into(),
        };
        assert_eq!(d.to_string(), "p.yaml:3:5: bad (hint: fix it)");
        let e = PolicyErrors(vec![d.clone(), Diagnostic { line: 4, ..d }]);
        assert_eq!(
            e.to_string(),
            "p.yaml:3:5: bad (hint: fix it)\np.yaml:4:5: bad (hint: fix it)"
        );
    }

    #[test]
    fn sink_sorts_by_position() {
        let mut s = Sink::new("f");
        s.error(Pos::new(5, 1), "b", "h");
        s.error(Pos::new(2, 9), "a", "h");
        s.error(Pos::new(2, 9), "a", "h");
        let d = s.finish();
        assert_eq!(d.iter().map(|d| d.message.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }
}
