//! Exact time quantities: integer nanoseconds, never floats, so that the worked example of the deck
//! (0.3 ms budget − 0.25 ms RTT = 0.05 ms margin) holds to the nanosecond.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A non-negative span of time in whole nanoseconds. Serialized as a plain integer (nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Nanos(pub u64);

impl Nanos {
    /// Zero.
    pub const ZERO: Nanos = Nanos(0);
    /// The largest value; used as "unbounded" in saturating arithmetic.
    pub const MAX: Nanos = Nanos(u64::MAX);

    /// `us` microseconds (saturating).
    pub const fn from_micros(us: u64) -> Nanos {
        Nanos(us.saturating_mul(1_000))
    }

    /// `ms` milliseconds (saturating).
    pub const fn from_millis(ms: u64) -> Nanos {
        Nanos(ms.saturating_mul(1_000_000))
    }

    /// `s` seconds (saturating).
    pub const fn from_secs(s: u64) -> Nanos {
        Nanos(s.saturating_mul(1_000_000_000))
    }

    /// The value in nanoseconds.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole microseconds, rounded up (a latency is never reported smaller than it is).
    pub const fn as_micros_ceil(self) -> u64 {
        self.0.div_ceil(1_000)
    }

    /// Whole milliseconds, rounded up.
    pub const fn as_millis_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000)
    }

    /// `self + other`, saturating at [`Nanos::MAX`].
    pub const fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }

    /// `self − other`, saturating at zero.
    pub const fn saturating_sub(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0))
    }

    /// `self × k`, saturating at [`Nanos::MAX`].
    pub const fn saturating_mul(self, k: u64) -> Nanos {
        Nanos(self.0.saturating_mul(k))
    }

    /// Rounds up to a whole millisecond.
    pub const fn ceil_to_millis(self) -> Nanos {
        Nanos::from_millis(self.as_millis_ceil())
    }

    /// Parses a duration with a unit: `0.3ms`, `250us`, `250µs`, `1.5 s`, `800ns`. The decimal is read
    /// exactly; digits finer than one nanosecond are an error rather than silently rounded.
    pub fn parse(text: &str) -> Result<Nanos, DurationParseError> {
        parse_duration(text)
    }

    /// ISO 8601 duration as Galera expects it (`PT5S`, `PT7.25S`), rounded up to whole milliseconds.
    pub fn to_iso8601(self) -> String {
        let ms = self.as_millis_ceil();
        let (secs, frac) = (ms / 1_000, ms % 1_000);
        if frac == 0 {
            format!("PT{secs}S")
        } else {
            let digits = format!("{frac:03}");
            format!("PT{secs}.{}S", digits.trim_end_matches('0'))
        }
    }
}

/// Displays as milliseconds with up to six decimals and no trailing zeros: `0.25 ms`, `5 ms`, `0.000001 ms`.
impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ms, rem) = (self.0 / 1_000_000, self.0 % 1_000_000);
        if rem == 0 {
            write!(f, "{ms} ms")
        } else {
            let digits = format!("{rem:06}");
            write!(f, "{ms}.{} ms", digits.trim_end_matches('0'))
        }
    }
}

impl From<Duration> for Nanos {
    fn from(d: Duration) -> Nanos {
        Nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl From<Nanos> for Duration {
    fn from(n: Nanos) -> Duration {
        Duration::from_nanos(n.0)
    }
}

/// A signed span in nanoseconds, for margins (negative = over budget).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SignedNanos(pub i64);

impl SignedNanos {
    /// `a − b` exactly (saturating at the `i64` range, about 292 years).
    pub fn difference(a: Nanos, b: Nanos) -> SignedNanos {
        let d = i128::from(a.0) - i128::from(b.0);
        SignedNanos(i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX }))
    }

    /// Whether the span is strictly positive.
    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for SignedNanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            write!(f, "-{}", Nanos(self.0.unsigned_abs()))
        } else {
            write!(f, "{}", Nanos(self.0.unsigned_abs()))
        }
    }
}

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationParseError {
    /// No digits, or stray characters.
    #[error("{0:?} is not a duration; write a number with a unit, e.g. \"0.3ms\", \"250us\" or \"2s\"")]
    Malformed(String),
    /// A number without a unit.
    #[error("{0:?} has no unit; write e.g. \"{0}ms\" (units: ns, us, µs, ms, s)")]
    MissingUnit(String),
    /// A unit that is not one of ns, us, µs, ms, s.
    #[error("unknown unit {unit:?} in {text:?}; use one of ns, us, µs, ms, s")]
    UnknownUnit {
        /// The whole input.
        text: String,
        /// The unit found.
        unit: String,
    },
    /// More precision than one nanosecond.
    #[error("{0:?} is finer than one nanosecond; drop the extra digits")]
    TooPrecise(String),
    /// Does not fit in 64 bits of nanoseconds.
    #[error("{0:?} is too large (the limit is about 584 years)")]
    TooLarge(String),
}

fn parse_duration(text: &str) -> Result<Nanos, DurationParseError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = (&trimmed[..split], trimmed[split..].trim());
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') || number.matches('.').count() > 1 {
        return Err(DurationParseError::Malformed(text.to_string()));
    }
    if unit.is_empty() {
        return Err(DurationParseError::MissingUnit(text.to_string()));
    }
    let exponent: u32 = match unit {
        "ns" => 0,
        "us" | "µs" | "μs" => 3,
        "ms" => 6,
        "s" => 9,
        other => {
            return Err(DurationParseError::UnknownUnit {
                text: text.to_string(),
                unit: other.to_string(),
            });
        }
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let too_large = || DurationParseError::TooLarge(text.to_string());
    let scale = 10u64.pow(exponent);
    let int: u64 = int_part.parse().map_err(|_| too_large())?;
    let mut total = int.checked_mul(scale).ok_or_else(too_large)?;
    let frac_len = u32::try_from(frac_part.len()).map_err(|_| DurationParseError::TooPrecise(text.to_string()))?;
    if frac_len > 0 {
        let (kept, dropped) = frac_part.split_at(frac_part.len().min(exponent as usize));
        if dropped.chars().any(|c| c != '0') {
            return Err(DurationParseError::TooPrecise(text.to_string()));
        }
        if !kept.is_empty() {
            let kept_len = u32::try_from(kept.len()).map_err(|_| too_large())?;
            let value: u64 = kept.parse().map_err(|_| too_large())?;
            let frac_ns = value * 10u64.pow(exponent - kept_len);
            total = total.checked_add(frac_ns).ok_or_else(too_large)?;
        }
    }
    Ok(Nanos(total))
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Nanos;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration with a unit, e.g. \"0.3ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Nanos, E> {
        parse_duration(v).map_err(|e| E::custom(crate::spec::with_hint(&e.to_string(), DURATION_HINT)))
    }
}

const DURATION_HINT: &str = "durations are strings with a unit: ns, us, µs, ms or s (e.g. `commit_budget: 0.3ms`)";

/// `deserialize_with` helper: a duration that must carry a unit (a bare `300` is refused rather than
/// guessed as nanoseconds or milliseconds). Errors are raised inside the scalar's visitor so that
/// `serde_norway` attaches the scalar's line and column.
pub fn duration_with_unit<'de, D: Deserializer<'de>>(d: D) -> Result<Nanos, D::Error> {
    d.deserialize_str(DurationVisitor)
}

/// Like [`duration_with_unit`], for optional fields (use with `#[serde(default)]`).
pub fn opt_duration_with_unit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Nanos>, D::Error> {
    d.deserialize_str(DurationVisitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Nanos::parse("0.3ms").unwrap(), Nanos(300_000));
        assert_eq!(Nanos::parse("0.25 ms").unwrap(), Nanos(250_000));
        assert_eq!(Nanos::parse("250us").unwrap(), Nanos(250_000));
        assert_eq!(Nanos::parse("250µs").unwrap(), Nanos(250_000));
        assert_eq!(Nanos::parse("1.5s").unwrap(), Nanos(1_500_000_000));
        assert_eq!(Nanos::parse("7ns").unwrap(), Nanos(7));
        assert_eq!(Nanos::parse("0.000001ms").unwrap(), Nanos(1));
        assert_eq!(Nanos::parse("2.50000ms").unwrap(), Nanos(2_500_000));
    }

    #[test]
    fn rejects_bad_durations() {
        assert!(matches!(Nanos::parse("300"), Err(DurationParseError::MissingUnit(_))));
        assert!(matches!(
            Nanos::parse("0.3 min"),
            Err(DurationParseError::UnknownUnit { .. })
        ));
        assert!(matches!(
            Nanos::parse("0.0000001ms"),
            Err(DurationParseError::TooPrecise(_))
        ));
        assert!(matches!(Nanos::parse("ms"), Err(DurationParseError::Malformed(_))));
        assert!(matches!(Nanos::parse("1.2.3ms"), Err(DurationParseError::Malformed(_))));
        assert!(matches!(Nanos::parse("-1ms"), Err(DurationParseError::Malformed(_))));
        assert!(matches!(
            Nanos::parse("99999999999s"),
            Err(DurationParseError::TooLarge(_))
        ));
    }

    #[test]
    fn displays_milliseconds() {
        assert_eq!(Nanos(250_000).to_string(), "0.25 ms");
        assert_eq!(Nanos(5_000_000).to_string(), "5 ms");
        assert_eq!(Nanos(1).to_string(), "0.000001 ms");
        assert_eq!(SignedNanos(-50_000).to_string(), "-0.05 ms");
    }

    #[test]
    fn iso8601_rounds_up_to_millis() {
        assert_eq!(Nanos::from_secs(5).to_iso8601(), "PT5S");
        assert_eq!(Nanos::from_millis(7_250).to_iso8601(), "PT7.25S");
        assert_eq!(Nanos(1_000_000_001).to_iso8601(), "PT1.001S");
    }
}
