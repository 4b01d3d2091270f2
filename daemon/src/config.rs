//! TOML configuration loading that reports every problem at once.
//!
//! [`parse_toml`] runs three passes over the document:
//! 1. syntax: a TOML syntax error stops here and is reported with its line and column;
//! 2. unknown keys anywhere in the document, with dotted paths (`serde_ignored`);
//! 3. type errors, found by deserializing each top-level key on its own (as a one-key table) into `T`, so
//!    one bad key does not hide another.
//!
//! `T` is expected to be `Default` with `#[serde(default)]` on every field, so that a one-key table is
//! a complete document.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, Deserializer};

/// Exit code for bad usage or configuration (sysexits `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// Every problem found in one configuration document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// One message per problem, each `ORIGIN: key `x.y`: what is wrong (line L, column C)` (syntax and
    /// I/O errors name the origin and position but no key).
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(err)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Load the file at `path` if one was given, else the defaults. Used by both daemons to get the file layer
/// before flags are merged over it.
pub fn load_optional<T>(path: Option<&Path>) -> Result<T, Vec<String>>
where
    T: DeserializeOwned + Default,
{
    match path {
        Some(p) => load_toml(p).map_err(|e| e.errors),
        None => Ok(T::default()),
    }
}

/// Validators for settings both daemons share. Each pushes one actionable line to `errs` on failure.
pub mod check {
    use std::time::Duration;

    /// A Linux interface name: 1-15 characters of `[A-Za-z0-9._-]`.
    pub fn ifname(key: &str, v: &str, errs: &mut Vec<String>) {
        let ok = !v.is_empty() && v.len() <= 15 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            errs.push(format!(
                "{key} `{v}` is not a valid interface name: 1-15 characters of [A-Za-z0-9._-]"
            ));
        }
    }

    /// A positive humantime duration such as `10s` or `1m`; `default` when unset.
    pub fn duration(key: &str, v: Option<&str>, default: Duration, errs: &mut Vec<String>) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    errs.push(format!("{key} `{s}` is not a positive duration: write e.g. 10s or 1m"));
                    default
                }
            },
        }
    }

    /// `text` or `json`.
    pub fn log_format(v: &str, errs: &mut Vec<String>) {
        if v.parse::<crate::logging::LogFormat>().is_err() {
            errs.push(format!("log_format `{v}` is not supported: use text or json"));
        }
    }

    /// A tracing filter such as `info` or `info,coordinator=debug`.
    pub fn log_level(v: &str, errs: &mut Vec<String>) {
        if let Err(e) = crate::logging::parse_filter(v) {
            errs.push(format!("log_level: {e}"));
        }
    }
}

/// The names of the listed fields whose values differ between two structs (for "takes effect at restart").
#[macro_export]
macro_rules! changed_fields {
    ($old:expr, $new:expr; $($field:ident),+ $(,)?) => {{
        let mut changed: Vec<&'static str> = Vec::new();
        $( if $old.$field != $new.$field { changed.push(stringify!($field)); } )+
        changed
    }};
}

/// Read `path` and parse it with [`parse_toml`], using the path as the origin in messages.
pub fn load_toml<T>(path: &Path) -> Result<T, ConfigErrors>
where
    T: DeserializeOwned + Default,
{
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigErrors {
        errors: vec![format!(
            "{origin}: cannot read the configuration file: {err}; check the path and its permissions"
        )],
    })?;
    parse_toml(&text, &origin)
}

/// Parse `text` (a TOML document) into `T`. `origin` names the document in messages (usually its path).
pub fn parse_toml<T>(text: &str, origin: &str) -> Result<T, ConfigErrors>
where
    T: DeserializeOwned + Default,
{
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(err) => {
            let at = err
                .span()
                .map(|span| format!("line {}: ", position(text, span.start)))
                .unwrap_or_default();
            return Err(ConfigErrors {
                errors: vec![format!("{origin}: {at}TOML syntax error: {}", err.message().trim_end())],
            });
        }
    };

    // Passes 2 and 3, one top-level key at a time. Within a key, each type error's value is removed and
    // the key deserialized again, so a bad value does not hide later problems next to it either.
    let mut found: Vec<(usize, String)> = Vec::new();
    for (key, value) in root.get_ref().iter() {
        let mut one = DeTable::new();
        one.insert(key.clone(), value.clone());
        let span = key.span().start..value.span().end;
        let mut unknown: Vec<String> = Vec::new();
        for _ in 0..MAX_ERRORS_PER_KEY {
            let result: Result<T, toml::de::Error> = serde_ignored::deserialize(
                Deserializer::from(Spanned::new(span.clone(), one.clone())),
                |path: serde_ignored::Path<'_>| {
                    let path = dotted(&path.to_string());
                    if !unknown.contains(&path) {
                        unknown.push(path);
                    }
                },
            );
            let err = match result {
                Ok(_) => break,
                Err(err) => err,
            };
            // Errors without a position (e.g. a required field missing from the one-key table) are
            // not about this key; the whole-document pass below reports them.
            let Some(err_span) = err.span() else { break };
            let path = find_path(&one, err_span.start);
            let msg = describe(text, origin, path.as_deref(), &err, key.get_ref());
            found.push((err_span.start, msg));
            match path {
                Some(path) if remove_path(&mut one, &path) => {}
                _ => break,
            }
        }
        for path in unknown {
            let pos = key_span(root.get_ref(), &path).map(|s| s.start);
            let at = pos
                .map(|p| format!(" (line {})", position(text, p)))
                .unwrap_or_default();
            found.push((
                pos.unwrap_or(key.span().start),
                format!("{origin}: key `{path}`: unknown key; remove it or check its spelling{at}"),
            ));
        }
    }

    if found.is_empty() {
        // Everything checks out key by key; what is left are document-wide problems (e.g. a missing
        // required field).
        return T::deserialize(Deserializer::from(root.clone())).map_err(|err| {
            let at = err
                .span()
                .map(|span| format!(" (line {})", position(text, span.start)))
                .unwrap_or_default();
            ConfigErrors {
                errors: vec![format!("{origin}: {}{at}", err.message().trim_end())],
            }
        });
    }
    found.sort_by_key(|(pos, _)| *pos);
    let mut errors: Vec<String> = Vec::with_capacity(found.len());
    for (_, msg) in found {
        if !errors.contains(&msg) {
            errors.push(msg);
        }
    }
    Err(ConfigErrors { errors })
}

/// Bound on the retries per top-level key (each retry removes one bad value).
const MAX_ERRORS_PER_KEY: usize = 64;

/// Remove the value at `path` from `table`. A path ending in an array index removes the whole array
/// (so the indices of later errors in it stay true). Returns whether something was removed.
fn remove_path(table: &mut DeTable<'_>, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let Some(key) = table
        .iter()
        .map(|(k, _)| k.clone())
        .find(|k| k.get_ref().as_ref() == first.as_str())
    else {
        return false;
    };
    let ends_in_index = rest.len() == 1 && rest[0].parse::<usize>().is_ok();
    if rest.is_empty() || ends_in_index {
        return table.remove(&key).is_some();
    }
    let Some(value) = table.get_mut(&key) else {
        return false;
    };
    match value.get_mut() {
        DeValue::Table(inner) => remove_path(inner, rest),
        DeValue::Array(items) => {
            let Some(item) = rest
                .first()
                .and_then(|s| s.parse::<usize>().ok())
                .and_then(|i| items.get_mut(i))
            else {
                return false;
            };
            match item.get_mut() {
                DeValue::Table(inner) => remove_path(inner, &rest[1..]),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Turn a deserialization error into `ORIGIN: key `a.b`: message (line L, column C)`.
fn describe(
    text: &str,
    origin: &str,
    path: Option<&[String]>,
    err: &toml::de::Error,
    top_key: &toml::de::DeString<'_>,
) -> String {
    let message = err.message().trim_end();
    let path = path.map_or_else(|| top_key.to_string(), |p| p.join("."));
    let at = err
        .span()
        .map(|span| format!(" (line {})", position(text, span.start)))
        .unwrap_or_default();
    format!("{origin}: key `{path}`: {message}{at}")
}

/// `serde_ignored` paths with the `?` segments of `Option`/newtype wrappers removed.
fn dotted(path: &str) -> String {
    path.split('.')
        .filter(|segment| *segment != "?")
        .collect::<Vec<_>>()
        .join(".")
}

/// "L, column C" (1-based; columns count characters) for a byte offset into `text`.
fn position(text: &str, offset: usize) -> String {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    format!("{line}, column {column}")
}

/// The dotted path of the deepest key whose value (or key) contains byte `pos`.
fn find_path(table: &DeTable<'_>, pos: usize) -> Option<Vec<String>> {
    for (key, value) in table.iter() {
        if let Some(mut rest) = find_in_value(value, pos) {
            rest.insert(0, key.get_ref().to_string());
            return Some(rest);
        }
        if contains(&key.span(), pos) {
            return Some(vec![key.get_ref().to_string()]);
        }
    }
    None
}

fn find_in_value(value: &Spanned<DeValue<'_>>, pos: usize) -> Option<Vec<String>> {
    // Children first: a `[section]` table's own span may cover only its header.
    match value.get_ref() {
        DeValue::Table(table) => {
            if let Some(path) = find_path(table, pos) {
                return Some(path);
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(mut rest) = find_in_value(item, pos) {
                    rest.insert(0, i.to_string());
                    return Some(rest);
                }
            }
        }
        _ => {}
    }
    contains(&value.span(), pos).then(Vec::new)
}

fn contains(span: &Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

/// The span of the key at dotted `path` (array elements by index), for positions of unknown keys.
fn key_span(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut segments = path.split('.');
    let first = segments.next()?;
    let (key, mut value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == first)?;
    let mut span = key.span();
    for segment in segments {
        let next = match value.get_ref() {
            DeValue::Table(t) => {
                let (k, v) = t.iter().find(|(k, _)| k.get_ref().as_ref() == segment)?;
                span = k.span();
                v
            }
            DeValue::Array(items) => {
                let item = items.get(segment.parse::<usize>().ok()?)?;
                span = item.span();
                item
            }
            _ => return None,
        };
        value = next;
    }
    Some(span)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Server {
        port: u16,
        name: String,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Config {
        listen: String,
        workers: u32,
        verbose: bool,
        server: Server,
        peers: Vec<Server>,
        tls: Option<Server>,
    }

    #[test]
    fn valid_document_parses() {
        let text = r#"
listen = "0.0.0.0:7000"
workers = 4

[server]
port = 8080
name = "a"

[[peers]]
port = 1
"#;
        let cfg: Config = parse_toml(text, "test.toml").unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:7000");
        assert_eq!(cfg.workers, 4);
        assert!(!cfg.verbose);
        assert_eq!(
            cfg.server,
            Server {
                port: 8080,
                name: "a".into()
            }
        );
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.tls, None);
    }

    #[test]
    fn empty_document_is_default() {
        let cfg: Config = parse_toml("", "empty.toml").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn reports_all_unknown_keys_and_type_errors_together() {
        let text = r#"listen = "0.0.0.0:7000"
wokers = 4
verbose = "yes"

[server]
port = "eighty"
colour = "blue"

[tls]
nmae = "x"
"#;
        let err = parse_toml::<Config>(text, "bad.toml").unwrap_err();
        let all = err.to_string();
        println!("{all}");
        assert_eq!(err.errors.len(), 5, "{all}");
        assert_eq!(all.lines().count(), 5, "{all}");
        assert!(
            all.contains("bad.toml: key `wokers`: unknown key; remove it or check its spelling (line 2, column 1)"),
            "{all}"
        );
        assert!(all.contains("bad.toml: key `server.colour`: unknown key"), "{all}");
        assert!(all.contains("(line 7, column 1)"), "{all}");
        assert!(all.contains("bad.toml: key `tls.nmae`: unknown key"), "{all}");
        assert!(
            all.contains(
                "bad.toml: key `verbose`: invalid type: string \"yes\", expected a boolean (line 3, column 11)"
            ),
            "{all}"
        );
        assert!(
            all.contains(
                "bad.toml: key `server.port`: invalid type: string \"eighty\", expected u16 (line 6, column 8)"
            ),
            "{all}"
        );
        for line in all.lines() {
            assert!(line.starts_with("bad.toml: key `"), "{line}");
        }
    }

    #[test]
    fn two_unknown_keys_and_one_type_error() {
        let text = "workers = -1\nfoo = 1\nbar = 2\n";
        let err = parse_toml::<Config>(text, "c.toml").unwrap_err();
        assert_eq!(err.errors.len(), 3, "{err}");
        assert!(
            err.errors
                .iter()
                .any(|e| e.starts_with("c.toml: key `foo`: unknown key")),
            "{err}"
        );
        assert!(
            err.errors
                .iter()
                .any(|e| e.starts_with("c.toml: key `bar`: unknown key")),
            "{err}"
        );
        assert!(
            err.errors
                .iter()
                .any(|e| e.starts_with("c.toml: key `workers`: invalid value")),
            "{err}"
        );
    }

    #[test]
    fn errors_in_one_section_do_not_hide_each_other() {
        let text = "[server]\nname = 5\nport = \"x\"\nzzz = 1\n";
        let err = parse_toml::<Config>(text, "s.toml").unwrap_err();
        println!("{err}");
        assert_eq!(
            err.errors,
            vec![
                "s.toml: key `server.name`: invalid type: integer `5`, expected a string (line 2, column 8)",
                "s.toml: key `server.port`: invalid type: string \"x\", expected u16 (line 3, column 8)",
                "s.toml: key `server.zzz`: unknown key; remove it or check its spelling (line 4, column 1)",
            ]
        );
    }

    #[test]
    fn nested_array_errors_have_indices() {
        let text = "[[peers]]\nport = 1\n[[peers]]\nport = true\n";
        let err = parse_toml::<Config>(text, "p.toml").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert!(
            err.errors[0].starts_with("p.toml: key `peers.1.port`: invalid type: boolean `true`"),
            "{err}"
        );
        assert!(err.errors[0].ends_with("(line 4, column 8)"), "{err}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let text = "listen = \"a\"\nworkers = = 3\n";
        let err = parse_toml::<Config>(text, "s.toml").unwrap_err();
        println!("{err}");
        assert_eq!(err.errors.len(), 1, "{err}");
        assert!(err.errors[0].starts_with("s.toml: line 2, column "), "{err}");
        assert!(err.errors[0].contains("TOML syntax error"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let err = load_toml::<Config>(&path).unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert!(err.errors[0].starts_with(&path.display().to_string()), "{err}");
        assert!(err.errors[0].contains("cannot read"), "{err}");
    }

    #[test]
    fn load_toml_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.toml");
        std::fs::write(&path, "workers = 2\n[server]\nport = 1\n").unwrap();
        let cfg: Config = load_toml(&path).unwrap();
        assert_eq!(cfg.workers, 2);
        assert_eq!(cfg.server.port, 1);
    }

    #[test]
    fn required_fields_are_reported_once() {
        #[derive(Debug, Default, Deserialize)]
        struct Strict {
            #[allow(dead_code)]
            must: u32,
            #[serde(default)]
            #[allow(dead_code)]
            other: u32,
        }
        let err = parse_toml::<Strict>("other = 1\n", "r.toml").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert!(err.errors[0].contains("missing field `must`"), "{err}");
    }
}
