//! Syntax checks shared by the renderers. Each returns an [`BootstrapError::Invalid`] naming the field and
//! saying what to give instead. Values are echoed in `{:?}` form (control characters escaped); the join
//! token never is.

use std::net::Ipv6Addr;

use crate::error::BootstrapError;

type Result<T> = std::result::Result<T, BootstrapError>;

/// Join token version prefix (mirrors `coordinator::token`).
const TOKEN_PREFIX: &str = "nimbus1";
/// Length of the public token id (mirrors `coordinator::token`).
const TOKEN_ID_LEN: usize = 10;
/// Length of the token secret (mirrors `coordinator::token`).
const TOKEN_SECRET_LEN: usize = 32;
/// Longest URL accepted.
const MAX_URL_LEN: usize = 2048;

fn is_alnum_lower(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Refuses newlines, NUL and every other control character: no value may break out of the line, comment or
/// quoted string it is rendered into.
pub(crate) fn single_line(field: &str, value: &str) -> Result<()> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(BootstrapError::invalid(
            field,
            format!(
                "contains the control character {c:?}; newlines, NUL and other control characters are refused \
                 in every value: give it on one line"
            ),
        ));
    }
    Ok(())
}

/// Free text for comments and notes (e.g. the token expiry): one line, 1-200 characters.
pub(crate) fn text(field: &str, value: &str) -> Result<()> {
    single_line(field, value)?;
    if value.trim().is_empty() || value.chars().count() > 200 {
        return Err(BootstrapError::invalid(
            field,
            "must be 1-200 characters of text, e.g. `2026-05-01T12:00:00Z (in 1h)`",
        ));
    }
    Ok(())
}

/// The coordinator's enrollment endpoint: `HOST:PORT`, with HOST a DNS name, an IPv4 address or a bracketed
/// IPv6 address.
pub(crate) fn endpoint(field: &str, value: &str) -> Result<()> {
    single_line(field, value)?;
    let bad = |why: &str| {
        BootstrapError::invalid(
            field,
            format!(
                "{value:?} {why}; give the enrollment endpoint as HOST:PORT, e.g. 192.0.2.10:7443 or [2001:db8::1]:7443"
            ),
        )
    };
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (addr, port) = rest
            .split_once("]:")
            .ok_or_else(|| bad("has no `]:PORT` after the IPv6 address"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| bad("does not hold an IPv6 address between the brackets"))?;
        (None, port)
    } else {
        let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("has no `:PORT`"))?;
        (Some(host), port)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => {}
        _ => return Err(bad("does not end in a port number 1-65535")),
    }
    if let Some(host) = host {
        dns_name(host).map_err(bad)?;
    }
    Ok(())
}

/// A DNS name or IPv4 address: labels of `[A-Za-z0-9-]`, 1-63 characters, not starting or ending with `-`.
fn dns_name(host: &str) -> std::result::Result<(), &'static str> {
    if host.is_empty() || host.len() > 253 {
        return Err("has an empty or over-long host");
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err("has a host that is not a DNS name or IPv4 address");
        }
    }
    Ok(())
}

/// A CA pin: `sha256:` and 64 lowercase hex digits (mirrors `pki::Pin::parse`, without trimming).
pub(crate) fn ca_pin(field: &str, value: &str) -> Result<()> {
    single_line(field, value)?;
    let ok = value
        .strip_prefix("sha256:")
        .is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if !ok {
        return Err(BootstrapError::invalid(
            field,
            format!(
                "{value:?} is not a CA pin; give `sha256:` followed by 64 lowercase hex digits, as printed by \
                 `nimbusctl token create`"
            ),
        ));
    }
    Ok(())
}

/// A join token, `nimbus1.<id>.<secret>` (the syntax check of `coordinator::token::JoinToken::parse`, without
/// trimming). Returns the public id. Messages never contain the token.
pub(crate) fn token<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    let bad = |why: &str| {
        BootstrapError::invalid(
            field,
            format!(
                "malformed join token: {why}; expected nimbus1.<id>.<secret> as printed by `nimbusctl token create`"
            ),
        )
    };
    let mut parts = value.split('.');
    let (Some(prefix), Some(id), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad("it must have exactly three dot-separated parts"));
    };
    if prefix != TOKEN_PREFIX {
        return Err(bad("it does not start with `nimbus1.`"));
    }
    if id.len() != TOKEN_ID_LEN || !is_alnum_lower(id) {
        return Err(bad("the id part must be 10 characters of [a-z0-9]"));
    }
    if secret.len() != TOKEN_SECRET_LEN || !is_alnum_lower(secret) {
        return Err(bad("the secret part must be 32 characters of [a-z0-9]"));
    }
    Ok(id)
}

/// The scheme of a URL that passed [`url`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

/// An `http://` or `https://` URL with a host, without credentials, made only of the characters RFC 3986
/// allows unencoded minus the quote characters (`'`, `"`, `` ` ``), `$`, `\`, `<>{}|^` and whitespace: so it
/// can be embedded in shell, YAML, iPXE and OpenNebula text without escaping.
pub(crate) fn url(field: &str, value: &str) -> Result<Scheme> {
    single_line(field, value)?;
    let bad = |why: &str| {
        BootstrapError::invalid(
            field,
            format!(
                "{value:?} {why}; give an http:// or https:// URL such as https://mirror.example.net/nimbus-agent.deb"
            ),
        )
    };
    if value.len() > MAX_URL_LEN {
        return Err(bad("is longer than 2048 characters"));
    }
    let (scheme, rest) = if let Some(rest) = value.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if let Some(rest) = value.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else {
        return Err(bad("does not start with http:// or https:// (lowercase)"));
    };
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~:/?#[]@!&()*+,;=%".contains(*c)))
    {
        return Err(bad(&format!(
            "contains {c:?}; percent-encode it (quotes, `$`, `\\`, spaces and `<>{{}}|^` are refused)"
        )));
    }
    let bytes = value.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        let escape_ok = || {
            bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
        };
        if *b == b'%' && !escape_ok() {
            return Err(bad("has a `%` that is not followed by two hex digits"));
        }
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    if authority.contains('@') {
        return Err(bad(
            "carries credentials (`user@` or `user:password@`); the join token is the only secret allowed in \
             bootstrap artefacts, so serve the file without authentication",
        ));
    }
    Ok(scheme)
}

/// A SHA-256 digest: 64 hex digits, either case. Returns it lowercase.
pub(crate) fn sha256(field: &str, value: &str) -> Result<String> {
    single_line(field, value)?;
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BootstrapError::invalid(
            field,
            format!("{value:?} is not a SHA-256 digest; give the 64 hex digits `sha256sum FILE` prints"),
        ));
    }
    Ok(value.to_ascii_lowercase())
}

/// A node name: 1-63 characters of `[a-z0-9-]`, not starting or ending with `-` (a DNS label, so it can also be
/// the host name).
pub(crate) fn node_name(field: &str, value: &str) -> Result<()> {
    single_line(field, value)?;
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !ok {
        return Err(BootstrapError::invalid(
            field,
            format!("{value:?} is not a node name; use 1-63 characters of [a-z0-9-], not starting or ending with `-`"),
        ));
    }
    Ok(())
}

/// An absolute path of `[A-Za-z0-9/._-]` without `.` or `..` components.
pub(crate) fn abs_path(field: &str, value: &str) -> Result<()> {
    single_line(field, value)?;
    let ok = value.starts_with('/')
        && value.len() <= 255
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        && value.split('/').all(|c| c != "." && c != "..");
    if !ok {
        return Err(BootstrapError::invalid(
            field,
            format!(
                "{value:?} is not a plain absolute path; use characters [A-Za-z0-9/._-], e.g. /var/lib/nimbus-agent"
            ),
        ));
    }
    Ok(())
}

/// Normalises a MAC address to lowercase colon form (`52:54:00:ab:cd:ef`). Accepts colon- or hyphen-separated
/// pairs or 12 bare hex digits; refuses the all-zero, broadcast and multicast addresses, which no NIC boots
/// with.
pub fn normalize_mac(value: &str) -> std::result::Result<String, BootstrapError> {
    normalize_mac_field("mac", value)
}

pub(crate) fn normalize_mac_field(field: &str, value: &str) -> Result<String> {
    single_line(field, value)?;
    let bad = |why: &str| {
        BootstrapError::invalid(
            field,
            format!("{value:?} {why}; give the NIC's MAC address as six hex pairs, e.g. 52:54:00:12:34:56"),
        )
    };
    let digits: String = if value.len() == 17 {
        let sep = value.as_bytes()[2];
        if sep != b':' && sep != b'-' {
            return Err(bad("is not a MAC address"));
        }
        let mut out = String::with_capacity(12);
        for (i, part) in value.split(char::from(sep)).enumerate() {
            if i >= 6 || part.len() != 2 {
                return Err(bad("is not a MAC address"));
            }
            out.push_str(part);
        }
        out
    } else if value.len() == 12 {
        value.to_string()
    } else {
        return Err(bad("is not a MAC address"));
    };
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("is not a MAC address"));
    }
    let digits = digits.to_ascii_lowercase();
    let mut bytes = [0u8; 6];
    hex::decode_to_slice(&digits, &mut bytes).map_err(|_| bad("is not a MAC address"))?;
    if bytes == [0; 6] || bytes == [0xff; 6] {
        return Err(bad("is the all-zero or broadcast address"));
    }
    if bytes[0] & 1 == 1 {
        return Err(bad("is a multicast address"));
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv";

    #[test]
    fn endpoints() {
        for ok in [
            "192.0.2.10:7443",
            "coord.example.net:7443",
            "[2001:db8::1]:7443",
            "localhost:1",
        ] {
            endpoint("coordinator", ok).unwrap();
        }
        for bad in [
            "coord",
            "coord:",
            "coord:0",
            "coord:65536",
            "coord:+80",
            ":7443",
            "-coord:7443",
            "co ord:7443",
            "co$(x):7443",
            "2001:db8::1:7443x",
            "[2001:db8::1]7443",
            "[nothex]:7443",
            "coord:7443\n",
        ] {
            let e = endpoint("coordinator", bad).unwrap_err().to_string();
            assert!(e.starts_with("coordinator: "), "{e}");
            assert!(e.contains("HOST:PORT") || e.contains("control character"), "{e}");
        }
    }

    #[test]
    fn pins() {
        ca_pin("ca_pin", &format!("sha256:{}", "ab".repeat(32))).unwrap();
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "AB".repeat(32)),
            format!("md5:{}", "ab".repeat(32)),
            format!(" sha256:{}", "ab".repeat(32)),
        ] {
            assert!(ca_pin("ca_pin", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_never_echoed() {
        assert_eq!(token("token", TOKEN).unwrap(), "abcdefghij");
        for bad in [
            "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuV",
            "nimbus2.abcdefghij.0123456789abcdefghijklmnopqrstuv",
            "nimbus1.abcdefghi.0123456789abcdefghijklmnopqrstuv",
            "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv.x",
            "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv\n",
            "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrst'$",
            "",
        ] {
            let e = token("token", bad).unwrap_err().to_string();
            assert!(!e.contains("0123456789"), "the message leaks the secret: {e}");
            assert!(e.contains("nimbusctl token create"), "{e}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(url("u", "https://m.example.net/a/b.deb").unwrap(), Scheme::Https);
        assert_eq!(url("u", "http://192.0.2.1:8080/p?x=1&y=%2F#f").unwrap(), Scheme::Http);
        for bad in [
            "ftp://m/x",
            "HTTPS://m/x",
            "https:///x",
            "https://",
            "https://user:pw@m/x",
            "https://m/x y",
            "https://m/$(reboot)",
            "https://m/`x`",
            "https://m/'x'",
            "https://m/\"x\"",
            "https://m/x\\y",
            "https://m/${net0/mac}",
            "https://m/x%zz",
            "https://m/x%2",
            "https://m/x\n",
            "https://m/é",
        ] {
            assert!(url("u", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_names_paths() {
        assert_eq!(sha256("s", &"AB".repeat(32)).unwrap(), "ab".repeat(32));
        assert!(sha256("s", &"ab".repeat(31)).is_err());
        assert!(sha256("s", &"zz".repeat(32)).is_err());
        node_name("n", "edge-1").unwrap();
        node_name("n", &"a".repeat(63)).unwrap();
        for bad in ["", "-a", "a-", "Edge", "a_b", "a.b", "a b", &"a".repeat(64)] {
            assert!(node_name("n", bad).is_err(), "{bad}");
        }
        abs_path("p", "/var/lib/nimbus-agent").unwrap();
        for bad in ["var/lib", "/var/../etc", "/var/./x", "/var/lib x", "/var/$HOME"] {
            assert!(abs_path("p", bad).is_err(), "{bad}");
        }
        text("t", "2026-05-01T12:00:00Z (in 1h)").unwrap();
        assert!(text("t", "").is_err());
        assert!(text("t", "a\nb").is_err());
        assert!(text("t", "a\0b").is_err());
    }

    #[test]
    fn macs() {
        for (input, want) in [
            ("52:54:00:AB:cd:ef", "52:54:00:ab:cd:ef"),
            ("52-54-00-ab-cd-ef", "52:54:00:ab:cd:ef"),
            ("525400ABCDEF", "52:54:00:ab:cd:ef"),
        ] {
            assert_eq!(normalize_mac(input).unwrap(), want);
        }
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00-ab:cd:ef",
            "52:54:00:ab:cd:eg",
            "52:54:00:ab:c:def",
            "5254.00ab.cdef",
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "52:54:00:ab:cd:ef\n",
            "52:54:00:ab:cd:e${x}",
        ] {
            assert!(normalize_mac(bad).is_err(), "{bad:?}");
        }
    }
}
