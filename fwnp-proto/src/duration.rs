//! The one way FWNP writes a duration, in every file and on every command line: the policy, the
//! gateway's and the agent's configuration, `fwnpctl`, the `fwnp` command and the load generator.
//!
//! A duration is one or more parts `NUMBER UNIT`, written together without spaces, largest unit
//! first or not: `100ms`, `90s`, `5m`, `1h`, `2h30m`, `7d`. The units are `ms` (milliseconds),
//! `s`, `m` (minutes), `h` and `d` (days of 24 hours); the number is decimal digits. A bare
//! number is refused in text, because a reader cannot tell its unit; on a command line, where
//! nothing else could tell a number from text, [`parse_argument`] reads a bare number as
//! seconds, as a TOML integer is read in the files that allow one. The total is at most
//! `u32::MAX` seconds (some 136 years).
//!
//! ```
//! use std::time::Duration;
//! use fwnp_proto::duration::{self, DurationError};
//! assert_eq!(duration::parse("2h30m"), Ok(Duration::from_secs(9000)));
//! assert_eq!(duration::parse("100ms"), Ok(Duration::from_millis(100)));
//! assert_eq!(duration::parse("90"), Err(DurationError::MissingUnit("90".into())));
//! assert_eq!(duration::parse_argument("90"), Ok(Duration::from_secs(90)));
//! ```

use std::time::Duration;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The text is empty.
    #[error("a duration cannot be empty: write for example \"30s\", \"10m\", \"1h\" or \"1h30m\"")]
    Empty,
    /// A number is not followed by a unit.
    #[error("the number {0} has no unit: add ms, s, m, h or d (\"{0}s\")")]
    MissingUnit(String),
    /// A unit other than ms, s, m, h, d.
    #[error("unknown unit {0:?}: the units are ms, s, m, h and d")]
    UnknownUnit(String),
    /// A unit with no number before it.
    #[error("a unit must follow a number, as in \"10m\"")]
    MissingNumber,
    /// A character that is neither a digit nor a unit's letter (a space, a sign, a dot).
    #[error("unexpected {0:?}: a duration is numbers and units written together, as in \"1h30m\"")]
    Unexpected(char),
    /// The total is longer than `u32::MAX` seconds.
    #[error("the duration is too long")]
    TooLong,
    /// Whole seconds were asked for ([`parse_secs`]) and the duration has a fraction of one.
    #[error("the duration must be whole seconds")]
    NotWholeSeconds,
}

/// Reads a duration written in the grammar of this module.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(fwnp_proto::duration::parse("1m30s"), Ok(Duration::from_secs(90)));
/// assert!(fwnp_proto::duration::parse("1 h").is_err());
/// ```
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    const LIMIT_MS: u64 = u32::MAX as u64 * 1000;
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return match rest.chars().next() {
                Some(c) if c.is_ascii_alphabetic() => Err(DurationError::MissingNumber),
                Some(c) => Err(DurationError::Unexpected(c)),
                None => Err(DurationError::Empty),
            };
        }
        let (number_text, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after_unit) = after.split_at(unit_len);
        let scale_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return match after.chars().next() {
                    None => Err(DurationError::MissingUnit(number_text.to_owned())),
                    Some(c) => Err(DurationError::Unexpected(c)),
                };
            }
            other => return Err(DurationError::UnknownUnit(other.to_owned())),
        };
        let number: u64 = number_text.parse().map_err(|_| DurationError::TooLong)?;
        total_ms = number
            .checked_mul(scale_ms)
            .and_then(|part| total_ms.checked_add(part))
            .filter(|&total| total <= LIMIT_MS)
            .ok_or(DurationError::TooLong)?;
        rest = after_unit;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Reads a duration that must be whole seconds, as the protocol's lifetimes are.
///
/// ```
/// assert_eq!(fwnp_proto::duration::parse_secs("1h30m"), Ok(5400));
/// assert!(fwnp_proto::duration::parse_secs("1500ms").is_err());
/// ```
pub fn parse_secs(text: &str) -> Result<u32, DurationError> {
    let duration = parse(text)?;
    if duration.subsec_nanos() != 0 {
        return Err(DurationError::NotWholeSeconds);
    }
    u32::try_from(duration.as_secs()).map_err(|_| DurationError::TooLong)
}

/// Reads a duration given on a command line: the grammar of this module, or a bare number of
/// seconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(fwnp_proto::duration::parse_argument("600"), Ok(Duration::from_secs(600)));
/// assert_eq!(fwnp_proto::duration::parse_argument("10m"), Ok(Duration::from_secs(600)));
/// ```
pub fn parse_argument(text: &str) -> Result<Duration, DurationError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u32 = text.parse().map_err(|_| DurationError::TooLong)?;
        return Ok(Duration::from_secs(u64::from(secs)));
    }
    parse(text)
}

/// Prints seconds as the shortest text [`parse_secs`] reads back: `600` is `"10m"`, `5400` is
/// `"1h30m"`, `0` is `"0s"`.
///
/// ```
/// assert_eq!(fwnp_proto::duration::format_secs(90_061), "1d1h1m1s");
/// ```
pub fn format_secs(secs: u32) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (scale, unit) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        let count = rest / scale;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push(unit);
            rest %= scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_secs("30s"), Ok(30));
        assert_eq!(parse_secs("10m"), Ok(600));
        assert_eq!(parse_secs("1h30m"), Ok(5400));
        assert_eq!(parse_secs("7d"), Ok(604_800));
        assert_eq!(parse_secs(""), Err(DurationError::Empty));
        assert_eq!(
            parse_secs("30"),
            Err(DurationError::MissingUnit("30".into()))
        );
        assert_eq!(
            parse_secs("3x"),
            Err(DurationError::UnknownUnit("x".into()))
        );
        assert_eq!(parse_secs("h"), Err(DurationError::MissingNumber));
        assert_eq!(
            parse_secs("99999999999999999999999s"),
            Err(DurationError::TooLong)
        );
        assert_eq!(parse_secs("50000d"), Err(DurationError::TooLong));
        for secs in [0, 1, 59, 60, 61, 3600, 5400, 86_399, 90_061, u32::MAX] {
            assert_eq!(parse_secs(&format_secs(secs)), Ok(secs), "{secs}");
        }
        assert_eq!(format_secs(5400), "1h30m");
    }

    #[test]
    fn what_the_examples_write_is_read() {
        for (text, ms) in [
            ("100ms", 100),
            ("1ms", 1),
            ("500ms", 500),
            ("1s", 1000),
            ("2s", 2000),
            ("10s", 10_000),
            ("90s", 90_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("2h30m", 9_000_000),
            ("1m30s", 90_000),
            ("1s500ms", 1500),
            ("90d", 7_776_000_000),
            ("0s", 0),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_millis(ms)), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_duration_is_named() {
        assert_eq!(parse("10 minutes"), Err(DurationError::Unexpected(' ')));
        assert_eq!(parse("1h 30m"), Err(DurationError::Unexpected(' ')));
        assert_eq!(parse(" 1h"), Err(DurationError::Unexpected(' ')));
        assert_eq!(parse("1.5h"), Err(DurationError::Unexpected('.')));
        assert_eq!(parse("-5s"), Err(DurationError::Unexpected('-')));
        assert_eq!(parse("10y"), Err(DurationError::UnknownUnit("y".into())));
        assert_eq!(
            parse("10min"),
            Err(DurationError::UnknownUnit("min".into()))
        );
        assert_eq!(parse("ten minutes"), Err(DurationError::MissingNumber));
        assert_eq!(parse("soon"), Err(DurationError::MissingNumber));
        assert_eq!(parse("1h30"), Err(DurationError::MissingUnit("30".into())));
        assert_eq!(parse("1é"), Err(DurationError::Unexpected('é')));
        assert_eq!(parse_secs("1500ms"), Err(DurationError::NotWholeSeconds));
        assert_eq!(parse_secs("2000ms"), Ok(2));
        // The bound is u32::MAX seconds, in any unit.
        assert_eq!(
            parse(&format!("{}s", u32::MAX)),
            Ok(Duration::from_secs(u64::from(u32::MAX)))
        );
        assert_eq!(
            parse(&format!("{}s", u64::from(u32::MAX) + 1)),
            Err(DurationError::TooLong)
        );
        assert_eq!(
            parse(&format!("{}ms", u64::MAX)),
            Err(DurationError::TooLong)
        );
    }

    #[test]
    fn a_command_line_may_give_bare_seconds() {
        assert_eq!(parse_argument("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_argument("0"), Ok(Duration::ZERO));
        assert_eq!(parse_argument("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_argument(""), Err(DurationError::Empty));
        assert_eq!(parse_argument("soon"), Err(DurationError::MissingNumber));
        assert_eq!(parse_argument("99999999999"), Err(DurationError::TooLong));
    }
}
