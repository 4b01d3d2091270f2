//! SHA-256 pins of DER certificates.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::PkiError;

const PREFIX: &str = "sha256:";

/// The SHA-256 digest of a DER-encoded certificate. Displays as `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pin([u8; 32]);

impl Pin {
    /// Parse `sha256:<64 lowercase hex digits>` (surrounding whitespace is ignored).
    pub fn parse(s: &str) -> Result<Pin, PkiError> {
        let input = s.trim();
        let invalid = |reason: &str| PkiError::InvalidPin {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let Some(digits) = input.strip_prefix(PREFIX) else {
            return Err(invalid("it does not start with `sha256:`"));
        };
        if digits.len() != 64 {
            return Err(invalid(&format!(
                "it has {} characters after `sha256:`, not 64",
                digits.len()
            )));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(invalid("it contains characters that are not lowercase hex digits"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes)
            .map_err(|_| invalid("it contains characters that are not hex digits"))?;
        Ok(Pin(bytes))
    }

    /// The pin of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Pin {
        Pin(Sha256::digest(der).into())
    }

    /// The pin of the first certificate in a PEM text.
    pub fn of_pem(pem: &str) -> Result<Pin, PkiError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|err| PkiError::BadPem {
            what: "certificate".into(),
            reason: err.to_string(),
        })?;
        Ok(Pin::of_der(&der))
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({self})")
    }
}

impl FromStr for Pin {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pin::parse(s)
    }
}

impl From<[u8; 32]> for Pin {
    fn from(bytes: [u8; 32]) -> Self {
        Pin(bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let pin = Pin::of_der(b"not really a certificate");
        let text = pin.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(Pin::parse(&text).unwrap(), pin);
        assert_eq!(format!("  {text}\n").parse::<Pin>().unwrap(), pin);
        assert_eq!(format!("{pin:?}"), format!("Pin({text})"));
        // Known vector: SHA-256 of the empty string.
        assert_eq!(
            Pin::of_der(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_bad_forms() {
        let good = Pin::of_der(b"x").to_string();
        let digits = good.strip_prefix("sha256:").unwrap();
        for (bad, why) in [
            (digits.to_string(), "does not start with `sha256:`"),
            (format!("sha1:{digits}"), "does not start with `sha256:`"),
            (format!("SHA256:{digits}"), "does not start with `sha256:`"),
            (format!("sha256:{}", &digits[..63]), "63 characters"),
            (format!("sha256:{digits}00"), "66 characters"),
            (format!("sha256:{}zz", &digits[..62]), "not lowercase hex digits"),
            (format!("sha256:{}", digits.to_uppercase()), "not lowercase hex digits"),
            (String::new(), "does not start"),
        ] {
            let err = Pin::parse(&bad).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, PkiError::InvalidPin { .. }), "{bad}: {err:?}");
            assert!(msg.contains(why), "{bad}: {msg}");
            assert!(msg.contains("nimbusctl token create"), "{msg}");
        }
    }
}
