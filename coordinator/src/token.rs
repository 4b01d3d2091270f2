//! Join tokens: `nimbus1.<id>.<secret>`.
//!
//! * `id` is 10 characters of `[a-z0-9]`; it names the token in the store (`tokens/<id>`) and is safe to
//!   show and log.
//! * `secret` is 32 characters of `[a-z0-9]` drawn from the OS RNG (about 165 bits). Only its SHA-256 (hex)
//!   is stored; [`verify_secret`] compares in constant time.
//!
//! [`JoinToken`]'s `Debug` and `Display` never print the secret; use [`JoinToken::to_string_secret`] exactly
//! once, where the token is handed to the operator.

use std::fmt;

use rand::Rng;
use rand::distributions::Uniform;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Version prefix of every join token.
pub const TOKEN_PREFIX: &str = "nimbus1";
/// Length of the public token id.
pub const TOKEN_ID_LEN: usize = 10;
/// Length of the token secret.
pub const TOKEN_SECRET_LEN: usize = 32;

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Why a join token string could not be parsed. Reasons never contain the token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token: {0}; expected nimbus1.<id>.<secret> as printed by `nimbusctl token create`")]
    Malformed(&'static str),
}

/// A parsed or freshly generated join token.
#[derive(Clone)]
pub struct JoinToken {
    /// Public token id (10 × `[a-z0-9]`).
    pub id: String,
    secret: String,
}

impl JoinToken {
    /// A new token with a random id and secret from the OS RNG.
    pub fn generate() -> Self {
        JoinToken {
            id: random_alnum(TOKEN_ID_LEN),
            secret: random_alnum(TOKEN_SECRET_LEN),
        }
    }

    /// Parses `nimbus1.<id>.<secret>`. Surrounding whitespace (a pasted newline) is ignored.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TokenError::Malformed("the token is empty"));
        }
        let mut parts = s.split('.');
        let (Some(prefix), Some(id), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("it must have exactly three dot-separated parts"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(TokenError::Malformed("it does not start with `nimbus1.`"));
        }
        if id.len() != TOKEN_ID_LEN || !is_alnum_lower(id) {
            return Err(TokenError::Malformed("the id part must be 10 characters of [a-z0-9]"));
        }
        if secret.len() != TOKEN_SECRET_LEN || !is_alnum_lower(secret) {
            return Err(TokenError::Malformed(
                "the secret part must be 32 characters of [a-z0-9]",
            ));
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The full token including the secret, for handing to the operator once. Never log it.
    pub fn to_string_secret(&self) -> String {
        format!("{TOKEN_PREFIX}.{}.{}", self.id, self.secret)
    }

    /// The secret part. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    /// Lower-case hex SHA-256 of the secret: what the store keeps.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}.{}.<redacted>", self.id)
    }
}

/// True when the token's secret hashes to `stored_hash_hex`. The comparison of the digests is constant-time.
pub fn verify_secret(token: &JoinToken, stored_hash_hex: &str) -> bool {
    let Ok(stored) = hex::decode(stored_hash_hex) else {
        return false;
    };
    let presented = Sha256::digest(token.secret.as_bytes());
    stored.len() == presented.len() && bool::from(presented.as_slice().ct_eq(&stored))
}

/// `n` characters of `[a-z0-9]`, uniformly from the OS RNG.
pub(crate) fn random_alnum(n: usize) -> String {
    let dist = Uniform::from(0..ALPHABET.len());
    (0..n).map(|_| char::from(ALPHABET[OsRng.sample(dist)])).collect()
}

fn is_alnum_lower(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_round_trip() {
        let t = JoinToken::generate();
        assert_eq!(t.id.len(), TOKEN_ID_LEN);
        assert_eq!(t.expose_secret().len(), TOKEN_SECRET_LEN);
        assert!(is_alnum_lower(&t.id) && is_alnum_lower(t.expose_secret()));
        let s = t.to_string_secret();
        assert!(s.starts_with("nimbus1."));
        let p = JoinToken::parse(&s).unwrap();
        assert_eq!(p.id, t.id);
        assert_eq!(p.expose_secret(), t.expose_secret());
        assert_eq!(p.secret_hash(), t.secret_hash());
        // A pasted trailing newline is fine.
        assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap().id, t.id);
    }

    #[test]
    fn generated_tokens_differ() {
        let a = JoinToken::generate();
        let b = JoinToken::generate();
        assert_ne!(a.id, b.id);
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn malformed_variants() {
        let id = "abcdefghij";
        let secret = "0123456789abcdefghijklmnopqrstuv";
        assert!(JoinToken::parse(&format!("nimbus1.{id}.{secret}")).is_ok());
        let bad = [
            String::new(),
            "   ".to_owned(),
            format!("nimbus2.{id}.{secret}"),
            format!("{id}.{secret}"),
            format!("nimbus1.{id}.{secret}.x"),
            format!("nimbus1.{id}"),
            format!("nimbus1.abcdefghi.{secret}"),
            format!("nimbus1.ABCDEFGHIJ.{secret}"),
            format!("nimbus1.{id}.{}", &secret[1..]),
            format!("nimbus1.{id}.{secret}x"),
            format!("nimbus1.{id}.0123456789abcdefghijklmnopqrstu-"),
            format!("nimbus1.{id}.0123456789abcdéfghijklmnopqrstu"),
        ];
        for s in &bad {
            let err = JoinToken::parse(s).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("malformed join token: "), "{msg}");
            assert!(msg.ends_with("as printed by `nimbusctl token create`"), "{msg}");
            assert!(!msg.contains(secret), "error leaks the secret: {msg}");
        }
    }

    #[test]
    fn secret_never_in_debug_or_display() {
        let t = JoinToken::generate();
        let dbg = format!("{t:?}");
        let alt = format!("{t:#?}");
        let disp = t.to_string();
        for s in [&dbg, &alt, &disp] {
            assert!(!s.contains(t.expose_secret()), "secret leaked: {s}");
            assert!(s.contains(&t.id));
            assert!(s.contains("<redacted>"));
        }
    }

    #[test]
    fn verify_secret_checks_hash() {
        let t = JoinToken::generate();
        let h = t.secret_hash();
        assert_eq!(h.len(), 64);
        assert!(verify_secret(&t, &h));
        assert!(!verify_secret(&JoinToken::generate(), &h));
        assert!(!verify_secret(&t, "not hex"));
        assert!(!verify_secret(&t, &h[..62]));
        assert!(!verify_secret(&t, ""));
    }
}
