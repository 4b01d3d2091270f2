//! Entry points that produce a [`Policy`]: [`parse`] (YAML with positions) and the canonical JSON form
//! ([`Policy::to_canonical_json`], [`Policy::from_canonical_json`], [`Policy::digest`]).
//!
//! The canonical JSON is itself a policy document in the same schema (JSON being YAML's flow subset): sorted
//! object keys, no whitespace, entries sorted by name, sets sorted, defaults written out, sizes in their
//! largest exact binary unit. Reading it back goes through the same decoder and validation as a YAML file.

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode, Span};
use marked_yaml::{LoadError, LoaderOptions, Node};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::diagnostic::{Diagnostic, PolicyErrors, Pos, Sink};
use crate::model::Policy;
use crate::{decode, validate};

/// The file name reported in diagnostics about canonical JSON.
pub const CANONICAL_SOURCE: &str = "<canonical>";

/// Parse and validate a policy file. `file_name` only labels the diagnostics. Returns every problem found
/// (each with line, column and hint), sorted by position.
pub fn parse(file_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sink = Sink::new(file_name);
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        Err(e) => {
            let (pos, message, hint) = load_error(&e);
            sink.error(pos, message, hint);
            return Err(PolicyErrors(sink.finish()));
        }
    };
    if let Some((pos, message, hint)) = extra_document(text) {
        sink.error(pos, message, hint);
        return Err(PolicyErrors(sink.finish()));
    }
    finish(sink, &root)
}

fn finish(mut sink: Sink, root: &Node) -> Result<Policy, PolicyErrors> {
    let decoded = decode::decode(&mut sink, root);
    let policy = validate::build(&mut sink, decoded);
    let diags = sink.finish();
    if diags.is_empty() {
        tracing::debug!(
            file = %policy.origin.file,
            environments = policy.environments.len(),
            pools = policy.pools.len(),
            cohorts = policy.cohorts.len(),
            "policy validated"
        );
        Ok(policy)
    } else {
        Err(PolicyErrors(diags))
    }
}

/// Where the text holds more than one YAML document or a syntax error: a diagnostic for it. Run after the
/// loader succeeded, which reads the first document only and would silently ignore the rest.
fn extra_document(text: &str) -> Option<(Pos, String, String)> {
    use yaml_rust2::parser::{Event, Parser};
    let at = |m: &yaml_rust2::scanner::Marker| Pos::new(m.line(), m.col() + 1);
    let mut parser = Parser::new_from_str(text);
    let mut documents = 0;
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => return None,
            Ok((Event::DocumentStart, mark)) => {
                documents += 1;
                if documents > 1 {
                    // The column of an implicit document start is where its first value begins; the line is what
                    // matters.
                    return Some((
                        Pos::new(mark.line(), 1),
                        "the file holds more than one YAML document".into(),
                        "a policy is a single document; remove the `---` or `...` separator and what follows, or \
                         split the file"
                            .into(),
                    ));
                }
            }
            Ok(_) => {}
            Err(e) => return Some((at(e.marker()), format!("invalid YAML: {}", e.info()), SCAN_HINT.into())),
        }
    }
}

const SCAN_HINT: &str = "check indentation (spaces, not tabs), quotes and brackets near this position";

fn load_error(e: &LoadError) -> (Pos, String, String) {
    let at = |m: &marked_yaml::Marker| Pos::new(m.line(), m.column());
    match e {
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => (
            at(m),
            "the policy must be a YAML mapping".into(),
            "start with `version: 1`, then `environments:`, `pools:` and `cohorts:`".into(),
        ),
        LoadError::UnexpectedAnchor(m) => (
            at(m),
            "YAML anchors and aliases are not supported".into(),
            "write the value out in full".into(),
        ),
        LoadError::MappingKeyMustBeScalar(m) => (
            at(m),
            "mapping keys must be plain strings".into(),
            "write `key: value`; complex keys (`? ...`) are not supported".into(),
        ),
        LoadError::UnexpectedTag(m) => (
            at(m),
            "YAML tags (such as !!str) are not supported".into(),
            "quote the value instead".into(),
        ),
        LoadError::ScanError(m, s) => (at(m), format!("invalid YAML: {}", s.info()), SCAN_HINT.into()),
        LoadError::DuplicateKey(d) => {
            let first = d.prev_key.span().start().map(at).unwrap_or_default();
            (
                d.key.span().start().map(at).unwrap_or_default(),
                format!("duplicate key `{}`", d.key.as_str()),
                format!(
                    "first given at line {}, column {}; give each key once",
                    first.line, first.column
                ),
            )
        }
    }
}

/// A JSON value as a YAML node without positions: strings are quoted scalars, numbers, booleans and null
/// plain ones.
fn to_node(v: &Value) -> Node {
    let scalar = |s: String, plain: bool| {
        let mut n = MarkedScalarNode::new(Span::new_blank(), s);
        n.set_coerce(plain);
        Node::from(n)
    };
    match v {
        Value::Null => scalar("~".into(), true),
        Value::Bool(b) => scalar(b.to_string(), true),
        Value::Number(n) => scalar(n.to_string(), true),
        Value::String(s) => scalar(s.clone(), false),
        Value::Array(items) => Node::from(MarkedSequenceNode::new(
            Span::new_blank(),
            items.iter().map(to_node).collect(),
        )),
        Value::Object(map) => Node::from(
            map.iter()
                .map(|(k, v)| (MarkedScalarNode::new(Span::new_blank(), k.as_str()), to_node(v)))
                .collect::<MarkedMappingNode>(),
        ),
    }
}

/// Validate a JSON value as a policy (no positions: diagnostics say `<canonical>:0:0`).
pub(crate) fn from_value(v: &Value) -> Result<Policy, PolicyErrors> {
    finish(Sink::new(CANONICAL_SOURCE), &to_node(v))
}

/// Compact JSON with object keys sorted (independent of serde_json's `preserve_order` feature).
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => out.push_str(&v.to_string()),
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
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
    }
}

impl Policy {
    /// The canonical JSON form: stable across runs and releases of the same schema version, for storing
    /// revisions and hashing. Two files meaning the same policy (order of entries or set members, defaults
    /// spelt out or not, `60GiB` or `61440MiB`) give the same text.
    pub fn to_canonical_json(&self) -> String {
        // Serializing these types into a Value cannot fail (string keys, no foreign types).
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut out = String::new();
        write_canonical(&value, &mut out);
        out
    }

    /// Read a policy back from its canonical JSON (or any JSON in the policy schema), validating it exactly
    /// as [`parse`] does. Diagnostics are reported against `<canonical>` with line and column 0.
    pub fn from_canonical_json(s: &str) -> Result<Policy, PolicyErrors> {
        match serde_json::from_str::<Value>(s) {
            Ok(v) => from_value(&v),
            Err(e) => Err(PolicyErrors(vec![Diagnostic {
                file: CANONICAL_SOURCE.to_string(),
                line: e.line(),
                column: e.column(),
                message: format!("invalid JSON: {e}"),
                hint: "pass the text produced by Policy::to_canonical_json".to_string(),
            }])),
        }
    }

    /// `sha256:<64 hex>` of [`Policy::to_canonical_json`].
    pub fn digest(&self) -> String {
        let hash = Sha256::digest(self.to_canonical_json().as_bytes());
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256:");
        for b in hash {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_documents_are_found() {
        let line = |t: &str| extra_document(t).map(|(p, m, _)| format!("{p} {m}"));
        for one in [
            "a: 1\n",
            "---\na: 1\n...\n",
            "# c\n---\na: 1\n",
            "a: |\n  ---\n",
            "a: 1\n----: x\n",
            "",
        ] {
            assert_eq!(line(one), None, "{one:?}");
        }
        let two = Some("3:1 the file holds more than one YAML document".to_string());
        assert_eq!(line("a: 1\n# x\n---\nb: 2\n"), two);
        assert_eq!(line("a: 1\n...\nb: 2\n"), two);
        assert_eq!(line("a: 1\n...\n---\n"), two);
        assert_eq!(line("{a: 1}\n\n{b: 2}\n").map(|s| s.starts_with("3:1 ")), Some(true));
        assert_eq!(
            line("a: [1\n").as_deref(),
            Some("2:1 invalid YAML: while parsing a flow sequence, expected ',' or ']'")
        );
    }

    #[test]
    fn canonical_writer_sorts_keys() {
        let v: Value = serde_json::from_str(r#"{"b":[1,{"z":null,"a":"x\"y"}],"a":true}"#).unwrap();
        let mut s = String::new();
        write_canonical(&v, &mut s);
        assert_eq!(s, r#"{"a":true,"b":[1,{"a":"x\"y","z":null}]}"#);
    }
}
