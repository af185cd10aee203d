//! Configuration files: the error both daemons report, pointing at a line and column, and the
//! readings of values both files hold.

use std::path::PathBuf;
use std::time::Duration;

use fwnp_proto::Prefix;

/// A configuration file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type or an unknown key.
    #[error("{origin}:{line}:{column}: {reason}")]
    Invalid {
        /// The file, as named to the parser.
        origin: String,
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Line and column (both from 1) of a byte offset, for errors that point into a file.
///
/// ```
/// use fwnp_daemon::config::line_column;
/// assert_eq!(line_column("a = 1\nb = x\n", 10), (2, 5));
/// ```
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, column)
}

/// A duration in FWNP's one grammar (`fwnp_proto::duration`): `100ms`, `30s`, `10m`, `1h30m`,
/// `90d`. The reason of an error names the text and what is wrong with it.
///
/// ```
/// use std::time::Duration;
/// use fwnp_daemon::config::parse_duration;
/// assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
/// assert!(parse_duration("10").unwrap_err().contains("has no unit"));
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    fwnp_proto::duration::parse(text).map_err(|e| format!("duration {text:?}: {e}"))
}

/// A prefix such as `10.1.0.0/16` or `2001:db8::/32`; a bare address is a host prefix. Host
/// bits set beyond the length are refused, as the protocol refuses them, and the reason names
/// the network probably meant.
///
/// ```
/// use fwnp_daemon::config::parse_prefix;
/// assert!(parse_prefix("10.1.0.0/16").is_ok());
/// assert!(parse_prefix("10.1.2.3/16").unwrap_err().contains("did you mean 10.1.0.0/16"));
/// ```
pub fn parse_prefix(text: &str) -> Result<Prefix, String> {
    text.parse().map_err(|e| match e {
        fwnp_proto::PrefixParseError::HostBitsSet { network } => format!(
            "{text:?} has host bits set beyond /{}; did you mean {network}?",
            network.len
        ),
        other => format!("{text:?} is not an address prefix: {other}"),
    })
}
