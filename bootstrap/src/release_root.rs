//! The pinned root of trust of the agent release repository: the TUF root metadata (`1.root.json`) that
//! `nimbusctl release init` writes and agents verify every upgrade against. It is public metadata, not a
//! secret. Artefacts install it as [`RELEASE_ROOT_PATH`] (0644) and point the agent configuration's
//! `release_root` at it; `nimbus-agent bootstrap --release-root` installs the same bytes.
//!
//! [`ReleaseRoot::parse`] checks the file is what an agent can pin (JSON, a TUF `root`, signed, at most
//! [`RELEASE_ROOT_MAX_BYTES`]) and keeps its text byte for byte, only adding a final newline when it lacks one,
//! so the file on every host has the same digest as the repository's (and every installer writes the same
//! bytes). Signatures are not verified here: the agent verifies the chain of roots when it upgrades.

use crate::error::BootstrapError;
use crate::validate;

/// Where the release root is installed on the host (mode 0644, owner root). The agent's `release_root`
/// default (`agent::config::DEFAULT_RELEASE_ROOT`) is the same path.
pub const RELEASE_ROOT_PATH: &str = "/etc/nimbus/release-root.json";
/// Largest release root accepted, in bytes (64 KiB). A root with a handful of Ed25519 keys is about 2 KiB.
pub const RELEASE_ROOT_MAX_BYTES: usize = 64 * 1024;
/// The field name in errors.
const FIELD: &str = "release_root";
/// What to give instead, appended to every refusal.
const GIVE: &str = "give the root metadata of the release repository as `nimbusctl release init` wrote it, \
                    e.g. releases/repo/metadata/1.root.json";

/// A release root that passed [`ReleaseRoot::parse`].
#[derive(Clone, PartialEq, Eq)]
pub struct ReleaseRoot {
    contents: String,
    version: Option<u64>,
    expires: Option<String>,
}

impl std::fmt::Debug for ReleaseRoot {
    /// Size and version only: the contents are long and say nothing more.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseRoot")
            .field("bytes", &self.contents.len())
            .field("version", &self.version)
            .field("expires", &self.expires)
            .finish()
    }
}

impl ReleaseRoot {
    /// Checks `text` is a TUF root metadata file: at most [`RELEASE_ROOT_MAX_BYTES`] bytes, no carriage
    /// returns or other control characters besides newlines and tabs, valid JSON, an object whose
    /// `signed._type` is `"root"` and which carries at least one signature. Refusals are
    /// [`BootstrapError::Invalid`] with field `release_root`.
    pub fn parse(text: &str) -> Result<ReleaseRoot, BootstrapError> {
        let bad = |why: String| BootstrapError::invalid(FIELD, format!("{why}; {GIVE}"));
        if text.len() > RELEASE_ROOT_MAX_BYTES {
            return Err(bad(format!(
                "is {} bytes, over the limit of {RELEASE_ROOT_MAX_BYTES} bytes for a root metadata file",
                text.len()
            )));
        }
        if text.trim().is_empty() {
            return Err(bad("is empty".into()));
        }
        if text.contains('\r') {
            return Err(bad(
                "has carriage returns (CRLF line endings): convert them to LF (e.g. with dos2unix)".into(),
            ));
        }
        if let Some(c) = text.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return Err(bad(format!("contains the control character {c:?}")));
        }
        let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("is not valid JSON ({e})")))?;
        let Some(signed) = doc.get("signed").and_then(serde_json::Value::as_object) else {
            return Err(bad("is not TUF metadata (no `signed` object at the top level)".into()));
        };
        match signed.get("_type").and_then(serde_json::Value::as_str) {
            Some("root") => {}
            Some(other) if other.len() <= 32 && validate::single_line(FIELD, other).is_ok() => {
                return Err(bad(format!(
                    "is TUF `{other}` metadata, not `root` (timestamp.json, snapshot.json and targets.json cannot \
                     be pinned)"
                )));
            }
            _ => return Err(bad("is not TUF root metadata (`signed._type` is not \"root\")".into())),
        }
        let signed_by_someone = doc
            .get("signatures")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|s| !s.is_empty());
        if !signed_by_someone {
            return Err(bad("carries no signatures, so no agent could verify it".into()));
        }
        let version = signed.get("version").and_then(serde_json::Value::as_u64);
        // Only for notes: kept when it is short plain text (it is printed to the operator's terminal).
        let expires = signed
            .get("expires")
            .and_then(serde_json::Value::as_str)
            .filter(|e| e.len() <= 40 && validate::single_line(FIELD, e).is_ok())
            .map(str::to_string);
        let mut contents = text.to_string();
        if !contents.ends_with('\n') {
            contents.push('\n');
        }
        Ok(ReleaseRoot {
            contents,
            version,
            expires,
        })
    }

    /// The file to install at [`RELEASE_ROOT_PATH`]: the given text, ending in a newline.
    pub fn contents(&self) -> &str {
        &self.contents
    }

    /// `signed.version` (1 for the first root), when it is a number.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// `signed.expires`, when present.
    pub fn expires(&self) -> Option<&str> {
        self.expires.as_deref()
    }

    /// The note for the operator: agents only accept releases signed under this root.
    pub fn note(&self) -> String {
        let mut about = Vec::new();
        if let Some(v) = self.version {
            about.push(format!("version {v}"));
        }
        if let Some(e) = &self.expires {
            about.push(format!("expires {e}"));
        }
        let about = if about.is_empty() {
            String::new()
        } else {
            format!(" ({})", about.join(", "))
        };
        format!(
            "the agent release root{about} is pinned as {RELEASE_ROOT_PATH}: agents will only accept releases signed \
             under this root"
        )
    }
}

/// The note for artefacts without a release root.
pub(crate) fn missing_note() -> String {
    format!(
        "no agent release root is pinned: these agents refuse upgrades until the release repository's root is \
         installed as {RELEASE_ROOT_PATH} (render with a release root, e.g. nimbusctl bootstrap render \
         --release-root releases/repo/metadata/1.root.json)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = r#"{"signed":{"_type":"root","version":1,"expires":"2027-11-25T17:11:40Z","keys":{},"roles":{}},"signatures":[{"keyid":"ab","sig":"cd"}]}"#;

    fn problem(text: &str) -> String {
        match ReleaseRoot::parse(text) {
            Err(BootstrapError::Invalid { field, problem }) => {
                assert_eq!(field, "release_root");
                assert!(problem.contains("1.root.json"), "says what to give: {problem}");
                problem
            }
            other => panic!("{text:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn a_root_is_kept_byte_for_byte_with_a_final_newline() {
        let r = ReleaseRoot::parse(ROOT).unwrap();
        assert_eq!(r.contents(), format!("{ROOT}\n"));
        assert_eq!(r.version(), Some(1));
        assert_eq!(r.expires(), Some("2027-11-25T17:11:40Z"));
        let again = ReleaseRoot::parse(r.contents()).unwrap();
        assert_eq!(again.contents(), r.contents(), "a newline is added once");
        assert!(
            r.note().contains("(version 1, expires 2027-11-25T17:11:40Z)"),
            "{}",
            r.note()
        );
        assert!(r.note().contains("only accept releases signed under this root"));
        let tabs = "{\n\t\"signed\": {\"_type\": \"root\"},\n\t\"signatures\": [{}]\n}\n";
        assert_eq!(ReleaseRoot::parse(tabs).unwrap().contents(), tabs);
    }

    #[test]
    fn what_is_not_a_root_is_refused_with_a_reason() {
        assert!(problem("").contains("empty"));
        assert!(problem("{\"signed\":").contains("not valid JSON"));
        assert!(problem("[1, 2]").contains("no `signed` object"));
        assert!(problem(r#"{"signed": 3, "signatures": [{}]}"#).contains("no `signed` object"));
        assert!(
            problem(r#"{"signed": {"_type": "timestamp"}, "signatures": [{}]}"#).contains("TUF `timestamp` metadata")
        );
        assert!(problem(r#"{"signed": {}, "signatures": [{}]}"#).contains("not TUF root"));
        assert!(problem(r#"{"signed": {"_type": "ro\u001bot"}, "signatures": [{}]}"#).contains("not TUF root"));
        assert!(problem(r#"{"signed": {"_type": "root"}, "signatures": []}"#).contains("no signatures"));
        assert!(problem(r#"{"signed": {"_type": "root"}}"#).contains("no signatures"));
        assert!(problem(&ROOT.replace(',', ",\r\n")).contains("CRLF"));
        assert!(problem(&format!("{ROOT}\u{0}")).contains("control character"));
        let big = ROOT.replace(
            "\"keys\":{}",
            &format!("\"keys\":{{\"pad\":\"{}\"}}", "a".repeat(70_000)),
        );
        assert!(problem(&big).contains("over the limit of 65536 bytes"));
    }

    #[test]
    fn the_limit_is_64_kib_inclusive() {
        let pad = |n: usize| {
            let base = ROOT.replace("\"keys\":{}", "\"keys\":{\"pad\":\"\"}");
            ROOT.replace(
                "\"keys\":{}",
                &format!("\"keys\":{{\"pad\":\"{}\"}}", "a".repeat(n - base.len())),
            )
        };
        assert_eq!(pad(RELEASE_ROOT_MAX_BYTES).len(), 65_536);
        ReleaseRoot::parse(&pad(RELEASE_ROOT_MAX_BYTES)).unwrap();
        assert!(ReleaseRoot::parse(&pad(RELEASE_ROOT_MAX_BYTES + 1)).is_err());
    }
}
