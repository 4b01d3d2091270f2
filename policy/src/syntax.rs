//! Syntax of single values: names, Kubernetes label keys and values, sizes, globs, the API endpoint and the
//! CA certificate hash. Pure functions; each error is a [`Problem`] (message and hint) that the decoder places.

use crate::model::{COHORT_LABEL_PREFIX, ENV_LABEL, LABEL_DOMAIN, POOL_LABEL};

/// What is wrong with one value and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub message: String,
    pub hint: String,
}

impl Problem {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Problem {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

pub(crate) const NAME_HINT: &str =
    "names are 1-32 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";

/// Names of environments, pools and cohorts: `[a-z0-9-]{1,32}`, starting and ending with a letter or digit
/// (they become label values and, for cohorts, part of a label key, where Kubernetes demands that).
pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), Problem> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(Problem::new(format!("invalid {kind} name {name:?}"), NAME_HINT))
    }
}

const KEY_HINT: &str = "a label key is an optional DNS-subdomain prefix (at most 253 characters) and '/', then a \
                        name of at most 63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with \
                        a letter or digit";
const VALUE_HINT: &str = "a label value is empty or at most 63 characters of A-Z, a-z, 0-9, '-', '_' and '.', \
                          starting and ending with a letter or digit";

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters (the name part of a key, and a value).
pub fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// RFC 1123 DNS subdomain: lowercase labels of `[a-z0-9]([-a-z0-9]*[a-z0-9])?` joined by dots, at most 253.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns_label(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Split a label key into (prefix, name) if its syntax is valid.
fn split_key(key: &str) -> Option<(Option<&str>, &str)> {
    match key.split_once('/') {
        None => is_label_name(key).then_some((None, key)),
        Some((prefix, name)) => {
            (is_dns_subdomain(prefix) && is_label_name(name) && !name.contains('/')).then_some((Some(prefix), name))
        }
    }
}

/// Kubernetes label key syntax.
pub(crate) fn check_label_key(what: &str, key: &str) -> Result<(), Problem> {
    match split_key(key) {
        Some(_) => Ok(()),
        None => Err(Problem::new(format!("invalid {what} key {key:?}"), KEY_HINT)),
    }
}

/// Kubernetes label value syntax (may be empty).
pub(crate) fn check_label_value(what: &str, key: &str, value: &str) -> Result<(), Problem> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(Problem::new(
            format!("invalid value {value:?} for {what} {key:?}"),
            VALUE_HINT,
        ))
    }
}

fn in_domain(prefix: &str, domain: &str) -> bool {
    prefix == domain || prefix.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.'))
}

/// A key the policy puts on nodes (`what` is `label` or `taint`): valid syntax, under `polynimbus.io/` (or a
/// sub-domain of it), never a Kubernetes-reserved one, and for labels not one that placement sets itself.
pub(crate) fn check_node_key(what: &str, key: &str) -> Result<(), Problem> {
    let Some((prefix, name)) = split_key(key) else {
        return Err(Problem::new(format!("invalid {what} key {key:?}"), KEY_HINT));
    };
    match prefix {
        None => Err(Problem::new(
            format!("{what} key {key:?} has no prefix"),
            format!("keys the policy puts on nodes must use the project prefix: write \"{LABEL_DOMAIN}/{name}\""),
        )),
        Some(p) if in_domain(p, "kubernetes.io") || in_domain(p, "k8s.io") => Err(Problem::new(
            format!("{what} key {key:?} uses a prefix reserved for Kubernetes"),
            format!(
                "the NodeRestriction admission plugin refuses kubelets setting kubernetes.io and k8s.io keys (such \
                 as node-role.kubernetes.io/*); use \"{LABEL_DOMAIN}/{name}\""
            ),
        )),
        Some(p) if !in_domain(p, LABEL_DOMAIN) => Err(Problem::new(
            format!("{what} key {key:?} is outside the {LABEL_DOMAIN}/ prefix"),
            format!(
                "keys the policy puts on nodes must use {LABEL_DOMAIN}/ or a sub-domain such as team.{LABEL_DOMAIN}/"
            ),
        )),
        Some(_)
            if what == "label" && (key == POOL_LABEL || key == ENV_LABEL || key.starts_with(COHORT_LABEL_PREFIX)) =>
        {
            Err(Problem::new(
                format!("label key {key:?} is set by placement itself"),
                format!(
                    "placement sets {POOL_LABEL}, {ENV_LABEL} and {COHORT_LABEL_PREFIX}<cohort>; choose another key"
                ),
            ))
        }
        Some(_) => Ok(()),
    }
}

const SIZE_HINT: &str = "write a whole number and a unit: B, KiB, MiB, GiB, TiB, KB, MB, GB or TB (e.g. 64GiB)";

const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// A size such as `60GiB`, `512 MiB` or `1TB`, in bytes. A unit is required (a bare `64` is too easily
/// meant as gigabytes).
pub(crate) fn parse_size(field: &str, s: &str) -> Result<u64, Problem> {
    let bad = || Problem::new(format!("invalid size {s:?} for {field}"), SIZE_HINT);
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    if num.is_empty() {
        return Err(bad());
    }
    let mult = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, m)| *m)
        .ok_or_else(bad)?;
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(|| {
        Problem::new(
            format!("size {s:?} for {field} is too large"),
            "sizes must be below 16 EiB",
        )
    })
}

/// The canonical text of a size: the largest binary unit that divides it exactly (`60GiB`, `1536MiB`, `7B`).
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, mult) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes != 0 && bytes.is_multiple_of(mult) {
            return format!("{}{unit}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

/// A glob over instance types or similar: any characters but `[ ] { } \`; `*` is any run, `?` one character.
pub(crate) fn check_glob(field: &str, pattern: &str) -> Result<(), Problem> {
    if pattern.is_empty() || pattern.contains(['[', ']', '{', '}', '\\']) {
        return Err(Problem::new(
            format!("invalid glob {pattern:?} in {field}"),
            "only * (any run of characters) and ? (one character) are special; [ ] { } and \\ are not supported \
             and the pattern must not be empty",
        ));
    }
    Ok(())
}

/// Whether `text` matches the glob `pattern` (`*` and `?`; case-sensitive; whole string).
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position of the last `*` in the pattern, and the text position it currently absorbs up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

const ENDPOINT_HINT: &str = "write host:port, e.g. 10.0.0.10:6443, [fd00::10]:6443 or api.prod.example.com:6443";

/// `host:port` where host is an IPv4 address, a bracketed IPv6 address or a DNS name, and port is 1-65535.
pub(crate) fn check_endpoint(s: &str) -> Result<(), Problem> {
    let bad = || Problem::new(format!("invalid api_endpoint {s:?}"), ENDPOINT_HINT);
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return if addr.port() == 0 { Err(bad()) } else { Ok(()) };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port_ok =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0);
    // A dotted all-digit host that did not parse as an IPv4 address above is a mistyped address, not a name.
    let numeric = host.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if port_ok && !numeric && is_dns_subdomain(&host.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `sha256:` and 64 hex digits, as `kubeadm token create --print-join-command` prints it.
pub(crate) fn check_ca_cert_hash(s: &str) -> Result<(), Problem> {
    match s.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
        _ => Err(Problem::new(
            format!("invalid ca_cert_hash {s:?}"),
            "write \"sha256:\" and the 64 hex digits of the cluster CA's public key hash, as kubeadm prints them \
             (openssl x509 -pubkey -in ca.crt | openssl rsa -pubin -outform der | sha256sum)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "production", "hub-enclave", "x1", "0", &"a".repeat(32)] {
            assert!(check_name("pool", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Prod", "a_b", "a.b", &"a".repeat(33), "ü"] {
            assert!(check_name("pool", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for ok in ["tier", "polynimbus.io/x", "a.b-c.d/Name_1.x", "x/y"] {
            assert!(check_label_key("label", ok).is_ok(), "{ok}");
        }
        let long_prefix = format!("{}/x", "a".repeat(254));
        for bad in [
            "",
            "/x",
            "x/",
            "a/b/c",
            "-x",
            "x-",
            "Ex.COM/x",
            &long_prefix,
            &"a".repeat(64),
            "a b",
        ] {
            assert!(check_label_key("label", bad).is_err(), "{bad}");
        }
        for ok in ["", "true", "a.b_c-d", &"v".repeat(63)] {
            assert!(check_label_value("label", "k", ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a b", &"v".repeat(64), "a/b"] {
            assert!(check_label_value("label", "k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_keys() {
        assert!(check_node_key("label", "polynimbus.io/storage").is_ok());
        assert!(check_node_key("label", "team.polynimbus.io/x").is_ok());
        assert!(check_node_key("taint", "polynimbus.io/pool").is_ok());
        let msg = |k: &str| check_node_key("label", k).err().map(|p| p.message);
        assert_eq!(msg("tier").as_deref(), Some("label key \"tier\" has no prefix"));
        assert_eq!(
            msg("node-role.kubernetes.io/worker").as_deref(),
            Some("label key \"node-role.kubernetes.io/worker\" uses a prefix reserved for Kubernetes")
        );
        assert_eq!(
            msg("k8s.io/x").as_deref(),
            Some("label key \"k8s.io/x\" uses a prefix reserved for Kubernetes")
        );
        assert_eq!(
            msg("notpolynimbus.io/x").as_deref(),
            Some("label key \"notpolynimbus.io/x\" is outside the polynimbus.io/ prefix")
        );
        assert_eq!(
            msg("polynimbus.io/cohort.edge").as_deref(),
            Some("label key \"polynimbus.io/cohort.edge\" is set by placement itself")
        );
    }

    #[test]
    fn sizes() {
        let cases: &[(&str, u64)] = &[
            ("60GiB", 60 << 30),
            ("512 MiB", 512 << 20),
            ("1TB", 1_000_000_000_000),
            ("7B", 7),
            ("2KiB", 2048),
            ("3KB", 3000),
            ("4MB", 4_000_000),
            ("5GB", 5_000_000_000),
            ("1TiB", 1 << 40),
        ];
        for (s, n) in cases {
            assert_eq!(parse_size("min_memory", s), Ok(*n), "{s}");
        }
        for bad in [
            "64",
            "GiB",
            "1.5GiB",
            "-1GiB",
            "60gib",
            "60  GiB",
            "",
            "18446744073709551616B",
        ] {
            assert!(parse_size("min_memory", bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_size("min_memory", "99999999TiB")
                .err()
                .map(|p| p.message)
                .as_deref(),
            Some("size \"99999999TiB\" for min_memory is too large")
        );
        assert_eq!(format_size(60 << 30), "60GiB");
        assert_eq!(format_size(1536 << 20), "1536MiB");
        assert_eq!(format_size(1_000_000_000), "1000000000B");
        assert_eq!(format_size(0), "0B");
        for n in [0u64, 1, 1024, 1_000_000_000_000, 60 << 30, u64::MAX] {
            assert_eq!(parse_size("x", &format_size(n)), Ok(n));
        }
    }

    #[test]
    fn globs() {
        let cases = [
            ("i3.*", "i3.2xlarge", true),
            ("i3.*", "i3en.2xlarge", false),
            ("i3*", "i3en.2xlarge", true),
            ("Standard_L*", "Standard_L8s_v2", true),
            ("Standard_L*", "Standard_D8s_v5", false),
            ("m?.large", "m5.large", true),
            ("m?.large", "m5a.large", false),
            ("*", "", true),
            ("", "", true),
            ("*.*x*", "a.bxc", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p} ~ {t}");
        }
        assert!(check_glob("instance_type", "i3.*").is_ok());
        for bad in ["", "i3[en]", "{a,b}", "a\\*"] {
            assert!(check_glob("instance_type", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_and_hashes() {
        for ok in [
            "10.0.0.10:6443",
            "[fd00::10]:6443",
            "api.prod.example.com:6443",
            "API.example.com:443",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.10",
            "10.0.0.10:0",
            "10.0.0.10:65536",
            "fd00::10:6443",
            ":6443",
            "a b:1",
            "host:x",
            "10.0.0.300:6443",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
        assert!(check_ca_cert_hash(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        for bad in [
            "sha256:abc",
            "ab".repeat(32).as_str(),
            &format!("sha1:{}", "ab".repeat(32)),
        ] {
            assert!(check_ca_cert_hash(bad).is_err(), "{bad}");
        }
    }
}
