//! Configuration files: the error both daemons report, pointing at a line and column, and the
//! readings of values both files hold.

use std::ops::Range;
use std::path::{Path, PathBuf};
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

/// Reads a configuration file whole.
///
/// ```
/// use fwnp_daemon::config::{ConfigError, read_file};
/// let missing = read_file(std::path::Path::new("/nonexistent/fwnp.toml"));
/// assert!(matches!(missing, Err(ConfigError::Read { .. })));
/// ```
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The error for what is wrong at `span` of the file `text` named `origin`.
///
/// ```
/// use fwnp_daemon::config::invalid_at;
/// let e = invalid_at("a = 1\nb = x\n", "f.toml", 10..11, "bad".into());
/// assert_eq!(e.to_string(), "f.toml:2:5: bad");
/// ```
pub fn invalid_at(text: &str, origin: &str, span: Range<usize>, reason: String) -> ConfigError {
    let (line, column) = line_column(text, span.start);
    ConfigError::Invalid {
        origin: origin.to_owned(),
        line,
        column,
        reason,
    }
}

/// Reads the TOML `text` of the file `origin` into `T`; invalid TOML, a value of the wrong
/// type or an unknown key (where `T` refuses them) is an error that names its line.
///
/// ```
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct Raw {
///     port: u16,
/// }
/// let raw: Raw = fwnp_daemon::config::from_toml("port = 4433", "f.toml").unwrap();
/// assert_eq!(raw.port, 4433);
/// let e = fwnp_daemon::config::from_toml::<Raw>("\nport = 70000", "f.toml").err().unwrap();
/// assert!(e.to_string().starts_with("f.toml:2:"));
/// ```
pub fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        invalid_at(
            text,
            origin,
            e.span().unwrap_or(0..0),
            e.message().to_owned(),
        )
    })
}

/// Checks the name of an nf_tables table the daemon owns: 1 to 64 letters, digits, `_` or
/// `-`, so that it is a name `nft` prints and takes back unquoted.
///
/// ```
/// use fwnp_daemon::config::check_table_name;
/// assert!(check_table_name("fwnp").is_ok());
/// assert!(check_table_name("").is_err());
/// assert!(check_table_name("a b").unwrap_err().contains("letters, digits"));
/// ```
pub fn check_table_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "table name {name:?}: 1 to 64 letters, digits, '_' or '-'"
        ));
    }
    Ok(())
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
