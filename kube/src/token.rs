//! kubeadm bootstrap tokens: `[a-z0-9]{6}.[a-z0-9]{16}` (id `.` secret).
//!
//! The id is public (it names the `bootstrap-token-<id>` Secret); the secret is not. [`BootstrapToken`]'s
//! `Debug` and `Display` print `abcdef.<redacted>`; only [`BootstrapToken::expose`] gives the full token, for
//! the one place that needs it (the join configuration, the Secret). [`scrub`] blanks anything token-shaped in
//! free text (a command's stderr, kubeadm's output) as a second line of defence.

use std::fmt;
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde_json::json;

use crate::KubeError;

/// Length of the public token id.
pub const ID_LEN: usize = 6;
/// Length of the token secret.
pub const SECRET_LEN: usize = 16;
/// What replaces a secret in logs and errors.
pub const REDACTED: &str = "<redacted>";
/// Namespace of bootstrap token Secrets.
pub const NAMESPACE: &str = "kube-system";
/// Secret `type` of bootstrap tokens.
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// Extra group kubeadm's RBAC (`kubeadm:kubelet-bootstrap`, `kubeadm:node-autoapprove-bootstrap`, cluster-info
/// access) is bound to; a token without it cannot join with `kubeadm join`.
pub const KUBEADM_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
/// Label put on the Secrets this crate creates, so stale ones can be found.
pub const MANAGED_BY_LABEL: &str = "polynimbus.io/managed-by";

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A kubeadm bootstrap token. `Debug`/`Display` redact the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

impl BootstrapToken {
    /// A fresh random token (thread-local CSPRNG, uniform over `[a-z0-9]`).
    pub fn generate() -> Self {
        let mut rng = rand::thread_rng();
        let mut pick = |n: usize| -> String {
            (0..n)
                .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
                .collect()
        };
        let id = pick(ID_LEN);
        let secret = pick(SECRET_LEN);
        BootstrapToken { id, secret }
    }

    /// Parses `abcdef.0123456789abcdef`. Surrounding whitespace is not accepted (trim first). The error never
    /// contains the input.
    pub fn parse(s: &str) -> Result<Self, KubeError> {
        let Some((id, secret)) = s.split_once('.') else {
            return Err(KubeError::InvalidToken {
                reason: "no '.' between id and secret".into(),
            });
        };
        if !is_token_part(id, ID_LEN) {
            return Err(KubeError::InvalidToken {
                reason: format!(
                    "the id must be {ID_LEN} characters of [a-z0-9] (got {} characters)",
                    id.len()
                ),
            });
        }
        if !is_token_part(secret, SECRET_LEN) {
            return Err(KubeError::InvalidToken {
                reason: format!(
                    "the secret must be {SECRET_LEN} characters of [a-z0-9] (got {} characters)",
                    secret.len()
                ),
            });
        }
        Ok(BootstrapToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The public id (the `<id>` of `bootstrap-token-<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full token `id.secret`. Only for the join configuration and the Secret: never log it.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// The name of its Secret in `kube-system`: `bootstrap-token-<id>`.
    pub fn secret_name(&self) -> String {
        secret_name(&self.id)
    }

    /// `text` with this token (and its secret alone) replaced by `id.<redacted>` / `<redacted>`, then anything
    /// else token-shaped blanked too ([`scrub`]).
    pub fn redact(&self, text: &str) -> String {
        let full = self.expose();
        let once = text.replace(&full, &self.to_string()).replace(&self.secret, REDACTED);
        scrub(&once)
    }

    /// The `bootstrap-token-<id>` Secret (kubeadm's format) as JSON: usable for authentication and signing,
    /// in kubeadm's default node group, expiring at `now + ttl` (RFC 3339, whole seconds; the token cleaner
    /// of kube-controller-manager deletes it then).
    pub fn secret_manifest(&self, ttl: Duration, now: SystemTime, description: &str) -> serde_json::Value {
        let expiration = humantime::format_rfc3339_seconds(now + ttl).to_string();
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.secret_name(),
                "namespace": NAMESPACE,
                "labels": { MANAGED_BY_LABEL: "nimbus-coordinator" },
            },
            "type": SECRET_TYPE,
            "stringData": {
                "description": description,
                "token-id": self.id,
                "token-secret": self.secret,
                "expiration": expiration,
                "usage-bootstrap-authentication": "true",
                "usage-bootstrap-signing": "true",
                "auth-extra-groups": KUBEADM_GROUP,
            },
        })
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{REDACTED}", self.id)
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .field("secret", &REDACTED)
            .finish()
    }
}

/// `bootstrap-token-<id>`.
pub fn secret_name(id: &str) -> String {
    format!("bootstrap-token-{id}")
}

/// Whether `id` is a well-formed token id (`[a-z0-9]{6}`).
pub fn is_valid_id(id: &str) -> bool {
    is_token_part(id, ID_LEN)
}

fn is_token_part(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// Replaces every token-shaped substring (`[a-z0-9]{6}.[a-z0-9]{16}` not inside a longer run of `[a-z0-9]`)
/// of `text` by `id.<redacted>`.
pub fn scrub(text: &str) -> String {
    let bytes = text.as_bytes();
    let tok = |b: u8| ALPHABET.contains(&b);
    let total = ID_LEN + 1 + SECRET_LEN;
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i + total <= bytes.len() {
        let starts_run = i == 0 || !tok(bytes[i - 1]);
        let ends_run = i + total == bytes.len() || !tok(bytes[i + total]);
        if starts_run
            && ends_run
            && bytes[i..i + ID_LEN].iter().all(|&b| tok(b))
            && bytes[i + ID_LEN] == b'.'
            && bytes[i + ID_LEN + 1..i + total].iter().all(|&b| tok(b))
        {
            // All bytes in the match are ASCII, so these are char boundaries.
            out.push_str(&text[copied..i + ID_LEN + 1]);
            out.push_str(REDACTED);
            i += total;
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "abcdef.0123456789abcdef";

    #[test]
    fn generate_has_kubeadm_format_and_is_random() {
        let a = BootstrapToken::generate();
        let b = BootstrapToken::generate();
        let full = a.expose();
        assert_eq!(full.len(), 23);
        assert_eq!(BootstrapToken::parse(&full).unwrap(), a);
        assert!(full[..6].bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(&full[6..7], ".");
        assert!(full[7..].bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, b, "two generated tokens collided");
    }

    #[test]
    fn parse_accepts_exact_format_only() {
        let t = BootstrapToken::parse(T).unwrap();
        assert_eq!(t.id(), "abcdef");
        assert_eq!(t.expose(), T);
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "abcde.0123456789abcdef",
            "abcdefg.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef0",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789ABCDEF",
            "abcdef-0123456789abcdef",
            " abcdef.0123456789abcdef",
            "abcdef.0123456789abcdef\n",
            "abc_ef.0123456789abcdef",
        ] {
            let err = BootstrapToken::parse(bad).unwrap_err();
            assert!(matches!(err, KubeError::InvalidToken { .. }), "{bad:?} accepted");
            let msg = err.to_string();
            assert!(!msg.contains("0123456789"), "error echoes the input: {msg}");
        }
    }

    #[test]
    fn debug_and_display_redact_the_secret() {
        let t = BootstrapToken::parse(T).unwrap();
        assert_eq!(t.to_string(), "abcdef.<redacted>");
        assert_eq!(
            format!("{t:?}"),
            r#"BootstrapToken { id: "abcdef", secret: "<redacted>" }"#
        );
        assert!(!format!("{t:#?}").contains("0123456789abcdef"));
        let g = BootstrapToken::generate();
        let secret = &g.expose()[7..];
        assert!(!format!("{g:?}").contains(secret));
        assert!(!g.to_string().contains(secret));
    }

    #[test]
    fn redact_and_scrub() {
        let t = BootstrapToken::parse(T).unwrap();
        assert_eq!(
            t.redact("token abcdef.0123456789abcdef and secret 0123456789abcdef"),
            "token abcdef.<redacted> and secret <redacted>"
        );
        assert_eq!(
            scrub("other zzzzzz.yyyyyyyyyyyyyyyy, end"),
            "other zzzzzz.<redacted>, end"
        );
        assert_eq!(scrub("zzzzzz.yyyyyyyyyyyyyyyy"), "zzzzzz.<redacted>");
        // Not token-shaped: longer runs, upper case, short.
        for keep in [
            "azzzzzz.yyyyyyyyyyyyyyyy",
            "zzzzzz.yyyyyyyyyyyyyyyyy",
            "ZZZZZZ.yyyyyyyyyyyyyyyy",
            "a.b",
            "é",
        ] {
            assert_eq!(scrub(keep), keep);
        }
        assert_eq!(scrub("é abcdef.0123456789abcdef é"), "é abcdef.<redacted> é");
    }

    #[test]
    fn secret_manifest_is_kubeadms_format() {
        let t = BootstrapToken::parse(T).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let m = t.secret_manifest(Duration::from_secs(15 * 60), now, "join of node-a");
        assert_eq!(
            m,
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "bootstrap-token-abcdef",
                    "namespace": "kube-system",
                    "labels": { "polynimbus.io/managed-by": "nimbus-coordinator" },
                },
                "type": "bootstrap.kubernetes.io/token",
                "stringData": {
                    "description": "join of node-a",
                    "token-id": "abcdef",
                    "token-secret": "0123456789abcdef",
                    "expiration": "2027-01-15T08:15:00Z",
                    "usage-bootstrap-authentication": "true",
                    "usage-bootstrap-signing": "true",
                    "auth-extra-groups": "system:bootstrappers:kubeadm:default-node-token",
                },
            })
        );
    }
}
