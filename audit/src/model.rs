//! The audit data model and its canonical encodings.
//!
//! # Entry hash (recomputable by any outside tool)
//!
//! `hash = hex(SHA-256("nimbus-audit-entry v1\n" || body))`, lowercase hex, where `body` is the
//! entry's JSON object **without** its `hash` member, encoded canonically:
//!
//! - object members sorted by key (Unicode code point order, which is UTF-8 byte order);
//! - no whitespace anywhere (`,` and `:` separators only);
//! - strings as UTF-8 with only `"`, `\` and control characters below U+0020 escaped (`\b \f \n \r \t`,
//!   others as `\u00xx` with lowercase hex), everything else literal;
//! - numbers are integers printed in decimal (floats are refused when an entry is appended);
//! - `null`, `true`, `false` as usual.
//!
//! This is exactly what Python prints with
//! `json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, so an auditor can check
//! a JSON-lines export with:
//!
//! ```text
//! import hashlib, json
//! e = json.loads(line); e.pop("type", None); h = e.pop("hash")
//! body = json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
//! assert h == hashlib.sha256(b"nimbus-audit-entry v1\n" + body.encode()).hexdigest()
//! ```
//!
//! The members are `seq`, `at_unix_ms`, `who` (`{"kind","subject"}`), `from`, `action`, `target`,
//! `result` (`{"status":"ok"}` or `{"status":"refused"|"failed","reason":...}`), `detail` and `prev`.
//! `prev` is the previous entry's `hash` ([`GENESIS_PREV`], 64 zeros, for seq 1).
//!
//! # Checkpoint signature
//!
//! Ed25519 over the UTF-8 text `"nimbus-audit-checkpoint v1\n<seq>\n<hash>\n<at_unix_ms>"` (decimal
//! numbers, lowercase hex hash, no trailing newline), stored base64 (standard alphabet, padded).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{AuditError, Result};

/// `prev` of the first entry (seq 1): 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain-separation prefix hashed before an entry's canonical body.
pub const ENTRY_HASH_PREFIX: &str = "nimbus-audit-entry v1\n";

/// First line of the text a checkpoint signs.
pub const CHECKPOINT_PREFIX: &str = "nimbus-audit-checkpoint v1";

/// Largest canonical `detail` accepted by [`Record::validate`]. Default 16 KiB.
pub const MAX_DETAIL_BYTES: usize = 16 * 1024;

/// How the caller was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// A local Unix-socket caller; the subject is its uid from `SO_PEERCRED`.
    Uid,
    /// A client certificate; the subject is the certificate subject.
    Cert,
    /// An OIDC bearer token; the subject is its `sub` or `preferred_username`.
    Oidc,
    /// The coordinator itself (timers, reconcilers).
    System,
}

impl PrincipalKind {
    /// The wire name: `uid`, `cert`, `oidc` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Uid => "uid",
            PrincipalKind::Cert => "cert",
            PrincipalKind::Oidc => "oidc",
            PrincipalKind::System => "system",
        }
    }
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub subject: String,
}

impl Principal {
    /// A Unix-socket caller identified by `SO_PEERCRED`.
    pub fn uid(uid: u32) -> Self {
        Principal {
            kind: PrincipalKind::Uid,
            subject: uid.to_string(),
        }
    }

    /// A caller authenticated by a client certificate with this subject.
    pub fn cert(subject: impl Into<String>) -> Self {
        Principal {
            kind: PrincipalKind::Cert,
            subject: subject.into(),
        }
    }

    /// A caller authenticated by an OIDC token with this `sub` / `preferred_username`.
    pub fn oidc(subject: impl Into<String>) -> Self {
        Principal {
            kind: PrincipalKind::Oidc,
            subject: subject.into(),
        }
    }

    /// The coordinator itself (e.g. `Principal::system("coordinator")`).
    pub fn system(name: impl Into<String>) -> Self {
        Principal {
            kind: PrincipalKind::System,
            subject: name.into(),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.subject)
    }
}

/// What came of the call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// The change was made.
    Ok,
    /// The caller was not allowed (authentication, role, validation).
    Refused { reason: String },
    /// The call was allowed but failed.
    Failed { reason: String },
}

impl Outcome {
    /// `Outcome::Refused` with this reason.
    pub fn refused(reason: impl Into<String>) -> Self {
        Outcome::Refused { reason: reason.into() }
    }

    /// `Outcome::Failed` with this reason.
    pub fn failed(reason: impl Into<String>) -> Self {
        Outcome::Failed { reason: reason.into() }
    }

    fn to_value(&self) -> Value {
        let mut m = serde_json::Map::new();
        match self {
            Outcome::Ok => {
                m.insert("status".into(), Value::from("ok"));
            }
            Outcome::Refused { reason } => {
                m.insert("status".into(), Value::from("refused"));
                m.insert("reason".into(), Value::from(reason.as_str()));
            }
            Outcome::Failed { reason } => {
                m.insert("status".into(), Value::from("failed"));
                m.insert("reason".into(), Value::from(reason.as_str()));
            }
        }
        Value::Object(m)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Refused { reason } => write!(f, "refused: {reason}"),
            Outcome::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// What a caller asks [`AuditLog::append`](crate::AuditLog::append) to record.
///
/// **`detail` is stored and shipped to the sinks exactly as given. Never put secrets in it** (tokens,
/// keys, passwords, bearer headers): record ids, names and counts instead. Floats are refused (they have
/// no canonical encoding) and the canonical size is capped at [`MAX_DETAIL_BYTES`].
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub who: Principal,
    /// Where the call came from: `unix`, a peer `ip:port`, …
    pub from: String,
    /// What was done, e.g. `token.create`, `node.revoke`, `rollout.pause`.
    pub action: String,
    /// What it was done to, e.g. `node/web-1`.
    pub target: String,
    pub result: Outcome,
    /// Small structured context. Never secrets.
    pub detail: Value,
}

impl Record {
    /// A successful record with empty `from` and `null` detail.
    pub fn new(who: Principal, action: impl Into<String>, target: impl Into<String>) -> Self {
        Record {
            who,
            from: String::new(),
            action: action.into(),
            target: target.into(),
            result: Outcome::Ok,
            detail: Value::Null,
        }
    }

    /// Sets `from`.
    pub fn with_from(mut self, from: impl Into<String>) -> Self {
        self.from = from.into();
        self
    }

    /// Sets `result`.
    pub fn with_result(mut self, result: Outcome) -> Self {
        self.result = result;
        self
    }

    /// Sets `detail` (never secrets).
    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }

    /// Checks what append requires: a non-empty action, no floats and a small detail.
    pub fn validate(&self) -> Result<()> {
        if self.action.trim().is_empty() {
            return Err(AuditError::InvalidRecord {
                reason: "action is empty; name the operation, e.g. `token.create`".into(),
            });
        }
        if let Some(at) = find_float(&self.detail, "detail") {
            return Err(AuditError::DetailHasFloat { at });
        }
        let size = canonical_json(&self.detail).len();
        if size > MAX_DETAIL_BYTES {
            return Err(AuditError::DetailTooLarge {
                size,
                max: MAX_DETAIL_BYTES,
            });
        }
        Ok(())
    }
}

/// One link of the audit chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 1, 2, 3, … without gaps.
    pub seq: u64,
    pub at_unix_ms: u64,
    pub who: Principal,
    pub from: String,
    pub action: String,
    pub target: String,
    pub result: Outcome,
    /// Stored as given by the caller; never secrets.
    pub detail: Value,
    /// The previous entry's `hash`; [`GENESIS_PREV`] for seq 1.
    pub prev: String,
    /// [`entry_hash`] of this entry.
    pub hash: String,
}

impl Entry {
    /// Builds entry `seq` from a record, linking it to `prev` and computing its hash.
    pub fn seal(seq: u64, at_unix_ms: u64, prev: impl Into<String>, record: Record) -> Entry {
        let mut e = Entry {
            seq,
            at_unix_ms,
            who: record.who,
            from: record.from,
            action: record.action,
            target: record.target,
            result: record.result,
            detail: record.detail,
            prev: prev.into(),
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        e
    }

    /// The hash recomputed from the content (compare with `self.hash`).
    pub fn computed_hash(&self) -> String {
        entry_hash(self)
    }
}

/// The canonical body of an entry (every member but `hash`), as hashed by [`entry_hash`].
pub fn entry_canonical_body(e: &Entry) -> String {
    let mut who = serde_json::Map::new();
    who.insert("kind".into(), Value::from(e.who.kind.as_str()));
    who.insert("subject".into(), Value::from(e.who.subject.as_str()));
    let mut m = serde_json::Map::new();
    m.insert("seq".into(), Value::from(e.seq));
    m.insert("at_unix_ms".into(), Value::from(e.at_unix_ms));
    m.insert("who".into(), Value::Object(who));
    m.insert("from".into(), Value::from(e.from.as_str()));
    m.insert("action".into(), Value::from(e.action.as_str()));
    m.insert("target".into(), Value::from(e.target.as_str()));
    m.insert("result".into(), e.result.to_value());
    m.insert("detail".into(), e.detail.clone());
    m.insert("prev".into(), Value::from(e.prev.as_str()));
    canonical_json(&Value::Object(m))
}

/// `hex(SHA-256(ENTRY_HASH_PREFIX || canonical body))`; see the module docs.
pub fn entry_hash(e: &Entry) -> String {
    let mut h = Sha256::new();
    h.update(ENTRY_HASH_PREFIX.as_bytes());
    h.update(entry_canonical_body(e).as_bytes());
    hex::encode(h.finalize())
}

/// A signed statement "entry `seq` had hash `hash`", made by the coordinator's audit key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// The `hash` of entry `seq`.
    pub hash: String,
    pub at_unix_ms: u64,
    /// [`key_id`](crate::key_id) of the signing key.
    pub key_id: String,
    /// Base64 Ed25519 signature over [`Checkpoint::signed_text`].
    pub signature: String,
}

impl Checkpoint {
    /// The text the signature covers: `"nimbus-audit-checkpoint v1\n<seq>\n<hash>\n<at_unix_ms>"`.
    pub fn signed_text(&self) -> String {
        checkpoint_text(self.seq, &self.hash, self.at_unix_ms)
    }
}

pub(crate) fn checkpoint_text(seq: u64, hash: &str, at_unix_ms: u64) -> String {
    format!("{CHECKPOINT_PREFIX}\n{seq}\n{hash}\n{at_unix_ms}")
}

/// Canonical JSON text of a value (sorted keys, no whitespace, minimal escaping); see the module docs.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The path of the first floating-point number in `v`, if any.
fn find_float(v: &Value, path: &str) -> Option<String> {
    match v {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => Some(path.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_float(item, &format!("{path}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .find_map(|(k, item)| find_float(item, &format!("{path}.{k}"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Entry {
        let r = Record::new(Principal::oidc("alice"), "token.create", "token/t1")
            .with_from("192.0.2.7:50123")
            .with_result(Outcome::refused("role viewer lacks operator"))
            .with_detail(json!({"z": 1, "a": ["x\n\"y\"", -3, true, null], "é": {"b": 2, "a": 1}}));
        Entry::seal(7, 1_700_000_000_123, GENESIS_PREV, r)
    }

    #[test]
    fn canonical_body_matches_the_serde_shape_minus_hash() {
        let e = sample();
        let mut v = serde_json::to_value(&e).unwrap();
        v.as_object_mut().unwrap().remove("hash");
        assert_eq!(entry_canonical_body(&e), canonical_json(&v));
    }

    #[test]
    fn canonical_json_sorts_keys_and_escapes_minimally() {
        let v = json!({"b": "\u{1}\t\u{7f}ü", "a": {"d": 1, "c": [2, -1]}});
        assert_eq!(
            canonical_json(&v),
            "{\"a\":{\"c\":[2,-1],\"d\":1},\"b\":\"\\u0001\\t\u{7f}ü\"}"
        );
    }

    /// Expected value computed outside Rust with the Python recipe in the module docs.
    #[test]
    fn hash_matches_the_documented_python_recipe() {
        let e = sample();
        assert_eq!(e.hash, PYTHON_HASH_OF_SAMPLE);
    }

    const PYTHON_HASH_OF_SAMPLE: &str = "b33b12884f664111804ba43fea544130fe1ef02e2dacaafbb438246c74e64ba3";

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = sample();
        let mut variants = Vec::new();
        let mut e = base.clone();
        e.seq += 1;
        variants.push(e);
        let mut e = base.clone();
        e.at_unix_ms += 1;
        variants.push(e);
        let mut e = base.clone();
        e.who.kind = PrincipalKind::Cert;
        variants.push(e);
        let mut e = base.clone();
        e.who.subject.push('x');
        variants.push(e);
        let mut e = base.clone();
        e.from.push('x');
        variants.push(e);
        let mut e = base.clone();
        e.action.push('x');
        variants.push(e);
        let mut e = base.clone();
        e.target.push('x');
        variants.push(e);
        let mut e = base.clone();
        e.result = Outcome::failed("role viewer lacks operator");
        variants.push(e);
        let mut e = base.clone();
        e.detail = json!({"z": 2});
        variants.push(e);
        let mut e = base.clone();
        e.prev = "1".repeat(64);
        variants.push(e);
        for v in variants {
            assert_ne!(v.computed_hash(), base.hash, "{v:?}");
        }
    }

    #[test]
    fn validate_refuses_floats_empty_action_and_big_detail() {
        let ok = Record::new(Principal::uid(0), "node.revoke", "node/a").with_detail(json!({"n": 3}));
        ok.validate().unwrap();
        let float = ok.clone().with_detail(json!({"a": [1, {"b": 0.5}]}));
        match float.validate() {
            Err(AuditError::DetailHasFloat { at }) => assert_eq!(at, "detail.a[1].b"),
            other => panic!("{other:?}"),
        }
        let empty = Record::new(Principal::uid(0), " ", "node/a");
        assert!(matches!(empty.validate(), Err(AuditError::InvalidRecord { .. })));
        let big = ok.with_detail(json!({"s": "x".repeat(MAX_DETAIL_BYTES)}));
        assert!(matches!(big.validate(), Err(AuditError::DetailTooLarge { .. })));
    }

    #[test]
    fn outcome_and_principal_wire_shape() {
        assert_eq!(serde_json::to_value(Outcome::Ok).unwrap(), json!({"status": "ok"}));
        assert_eq!(
            serde_json::to_value(Outcome::refused("no")).unwrap(),
            json!({"status": "refused", "reason": "no"})
        );
        assert_eq!(
            serde_json::to_value(Principal::uid(1000)).unwrap(),
            json!({"kind": "uid", "subject": "1000"})
        );
        assert_eq!(Principal::cert("CN=ops").to_string(), "cert:CN=ops");
    }

    #[test]
    fn checkpoint_text_is_the_documented_one() {
        let c = Checkpoint {
            seq: 12,
            hash: "ab".repeat(32),
            at_unix_ms: 99,
            key_id: "k".into(),
            signature: "s".into(),
        };
        assert_eq!(
            c.signed_text(),
            format!("nimbus-audit-checkpoint v1\n12\n{}\n99", "ab".repeat(32))
        );
    }
}
