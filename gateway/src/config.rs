//! The gateway's configuration file (`fwnp-gateway --config PATH`), documented by example in
//! `gateway/examples/gateway.toml`.
//!
//! Parsing refuses unknown keys and every value it cannot use, naming the line and the reason,
//! so that a typo never silently turns into a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fwnp_proto::Prefix;
use serde::Deserialize;
use toml::Spanned;

pub use fwnp_daemon::config::{ConfigError, line_column, parse_duration, parse_prefix};

/// The whole gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// UDP addresses the QUIC service listens on.
    pub listen: Vec<SocketAddr>,
    /// The gateway's certificate chain (PEM).
    pub certificate: PathBuf,
    /// The gateway's private key (PEM).
    pub key: PathBuf,
    /// The deployment's CA certificates that host certificates must chain to (PEM).
    pub ca: PathBuf,
    /// An optional certificate revocation list (PEM), re-read on reload.
    pub crl: Option<PathBuf>,
    /// The policy file.
    pub policy: PathBuf,
    /// Where the SQLite store lives.
    pub state_dir: PathBuf,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The kernel filter.
    pub filter: FilterConfig,
    /// Limits on what one host may use.
    pub limits: LimitsConfig,
    /// The store's durability and retention.
    pub store: StoreConfig,
}

/// How the gateway's nftables table guards the protected networks.
#[derive(Debug, Clone)]
pub struct FilterConfig {
    /// Whether the gateway programs the kernel at all (off only for trials of policy and PKI).
    pub enabled: bool,
    /// The table's name, in family `inet`.
    pub table: String,
    /// Destination prefixes the filter guards.
    pub protected: Vec<Prefix>,
    /// Inbound interfaces whose new connections the filter guards.
    pub inbound_interfaces: Vec<String>,
    /// Whether refused connections are rejected (an answer) rather than dropped.
    pub reject: bool,
    /// Whether revoking or releasing a lease also ends its live connections.
    pub kill_connections: bool,
}

/// Limits per connection and per identity.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Concurrent connections one identity may hold.
    pub max_connections_per_identity: u32,
    /// Concurrent request streams per connection.
    pub max_streams: u32,
    /// How long a request stream may take to arrive whole.
    pub request_timeout: Duration,
    /// Handshakes one source address may start per second, sustained (`refuse`d beyond).
    pub handshakes_per_source_per_second: u32,
    /// Handshakes one source address may start at once after a quiet period.
    pub handshake_burst_per_source: u32,
    /// While more handshakes than this are in progress, a source must prove its address (QUIC
    /// Retry) before its handshake begins; 0 asks every source.
    pub retry_above_handshakes: u32,
    /// Repeated events anyone can cause (failed handshakes per source address, handshakes
    /// refused per source address, Lists per host) are recorded and logged once per interval,
    /// the rest as one count at its end.
    pub audit_count_interval: Duration,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Whether every commit is flushed to the disk (SQLite `synchronous = FULL`).
    pub synchronous_full: bool,
    /// How long audit records are kept.
    pub audit_retention: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Vec<Spanned<String>>,
    certificate: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    crl: Option<PathBuf>,
    policy: PathBuf,
    state_dir: PathBuf,
    #[serde(default = "default_admin_socket")]
    admin_socket: PathBuf,
    metrics: Option<Spanned<String>>,
    #[serde(default)]
    filter: RawFilter,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    store: RawStore,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "default_table")]
    table: Spanned<String>,
    #[serde(default)]
    protected: Vec<Spanned<String>>,
    #[serde(default)]
    inbound_interfaces: Vec<Spanned<String>>,
    #[serde(default = "default_refuse")]
    refuse: Spanned<String>,
    #[serde(default)]
    kill_connections: bool,
}

impl Default for RawFilter {
    fn default() -> Self {
        RawFilter {
            enabled: true,
            table: default_table(),
            protected: Vec::new(),
            inbound_interfaces: Vec::new(),
            refuse: default_refuse(),
            kill_connections: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_connections")]
    max_connections_per_identity: u32,
    #[serde(default = "default_max_streams")]
    max_streams: u32,
    #[serde(default = "default_request_timeout")]
    request_timeout: Spanned<String>,
    #[serde(default = "default_handshakes_per_source")]
    handshakes_per_source_per_second: Spanned<u32>,
    #[serde(default = "default_handshake_burst")]
    handshake_burst_per_source: Spanned<u32>,
    #[serde(default = "default_retry_above")]
    retry_above_handshakes: u32,
    #[serde(default = "default_audit_count_interval")]
    audit_count_interval: Spanned<String>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections_per_identity: default_max_connections(),
            max_streams: default_max_streams(),
            request_timeout: default_request_timeout(),
            handshakes_per_source_per_second: default_handshakes_per_source(),
            handshake_burst_per_source: default_handshake_burst(),
            retry_above_handshakes: default_retry_above(),
            audit_count_interval: default_audit_count_interval(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_synchronous")]
    synchronous: Spanned<String>,
    #[serde(default = "default_retention")]
    audit_retention: Spanned<String>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            synchronous: default_synchronous(),
            audit_retention: default_retention(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/fwnp/gateway.sock")
}
fn default_table() -> Spanned<String> {
    Spanned::new(0..0, "fwnp".to_owned())
}
fn default_refuse() -> Spanned<String> {
    Spanned::new(0..0, "drop".to_owned())
}
fn default_max_connections() -> u32 {
    4
}
/// 16, the least the protocol recommends: QUIC keeps state for every stream a peer may open,
/// idle or not (an entry in each of the connection's stream maps), so every connection pays for
/// the limit; 64 cost each idle connection about 4.5 KiB more than 16. A host's requests are
/// small and answered at once, and 16 in flight keep a busy connection at full speed.
fn default_max_streams() -> u32 {
    16
}
fn default_request_timeout() -> Spanned<String> {
    Spanned::new(0..0, "10s".to_owned())
}
fn default_handshakes_per_source() -> Spanned<u32> {
    Spanned::new(0..0, 50)
}
fn default_handshake_burst() -> Spanned<u32> {
    Spanned::new(0..0, 200)
}
fn default_retry_above() -> u32 {
    64
}
fn default_audit_count_interval() -> Spanned<String> {
    Spanned::new(0..0, "60s".to_owned())
}
fn default_synchronous() -> Spanned<String> {
    Spanned::new(0..0, "normal".to_owned())
}
fn default_retention() -> Spanned<String> {
    Spanned::new(0..0, "90d".to_owned())
}

impl GatewayConfig {
    /// The TLS files named by the configuration.
    pub fn tls_files(&self) -> fwnp_trust::tls::ServerTlsFiles {
        fwnp_trust::tls::ServerTlsFiles {
            cert: self.certificate.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            crl: self.crl.clone(),
        }
    }

    /// The TLS and transport options the gateway serves with.
    pub fn server_options(&self) -> fwnp_trust::tls::ServerOptions {
        fwnp_trust::tls::ServerOptions {
            max_concurrent_bidi_streams: self.limits.max_streams,
            // No unidirectional stream for the host (initial_max_streams_uni 0): a client never
            // opens one, and a peer that tries anyway is refused by QUIC flow control.
            ..fwnp_trust::tls::ServerOptions::default()
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks a configuration held in memory; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let at = |span: std::ops::Range<usize>, reason: String| {
            let (line, column) = line_column(text, span.start);
            ConfigError::Invalid {
                origin: origin.to_owned(),
                line,
                column,
                reason,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at(span, e.message().to_owned())
        })?;

        let mut listen = Vec::with_capacity(raw.listen.len());
        for addr in &raw.listen {
            listen.push(addr.get_ref().parse::<SocketAddr>().map_err(|e| {
                at(
                    addr.span(),
                    format!("listen address {:?}: {e}", addr.get_ref()),
                )
            })?);
        }
        if listen.is_empty() {
            return Err(at(0..0, "`listen` needs at least one address".to_owned()));
        }
        let metrics = match &raw.metrics {
            Some(addr) => Some(addr.get_ref().parse::<SocketAddr>().map_err(|e| {
                at(
                    addr.span(),
                    format!("metrics address {:?}: {e}", addr.get_ref()),
                )
            })?),
            None => None,
        };

        let table = raw.filter.table.get_ref();
        if table.is_empty()
            || table.len() > 64
            || !table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(at(
                raw.filter.table.span(),
                format!("table name {table:?}: 1 to 64 letters, digits, '_' or '-'"),
            ));
        }
        let mut protected = Vec::new();
        for p in &raw.filter.protected {
            protected.push(parse_prefix(p.get_ref()).map_err(|reason| at(p.span(), reason))?);
        }
        let mut inbound_interfaces = Vec::new();
        for name in &raw.filter.inbound_interfaces {
            let n = name.get_ref();
            // IFNAMSIZ is 16 with the terminating NUL.
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ']) {
                return Err(at(
                    name.span(),
                    format!("interface name {n:?} is not valid"),
                ));
            }
            inbound_interfaces.push(n.clone());
        }
        if raw.filter.enabled && protected.is_empty() && inbound_interfaces.is_empty() {
            return Err(at(
                0..0,
                "[filter] needs `protected` prefixes or `inbound_interfaces` (or enabled = false): \
                 without them the gateway would guard nothing"
                    .to_owned(),
            ));
        }
        let reject = match raw.filter.refuse.get_ref().as_str() {
            "drop" => false,
            "reject" => true,
            other => {
                return Err(at(
                    raw.filter.refuse.span(),
                    format!("refuse = {other:?}: expected \"drop\" or \"reject\""),
                ));
            }
        };

        let request_timeout = parse_duration(raw.limits.request_timeout.get_ref())
            .map_err(|reason| at(raw.limits.request_timeout.span(), reason))?;
        if raw.limits.max_streams == 0 || raw.limits.max_connections_per_identity == 0 {
            return Err(at(0..0, "[limits] values must be at least 1".to_owned()));
        }
        for (key, value) in [
            (
                "handshakes_per_source_per_second",
                &raw.limits.handshakes_per_source_per_second,
            ),
            (
                "handshake_burst_per_source",
                &raw.limits.handshake_burst_per_source,
            ),
        ] {
            if *value.get_ref() == 0 {
                return Err(at(value.span(), format!("{key} must be at least 1")));
            }
        }
        let audit_count_interval = parse_duration(raw.limits.audit_count_interval.get_ref())
            .map_err(|reason| at(raw.limits.audit_count_interval.span(), reason))?;
        if audit_count_interval < Duration::from_millis(100) {
            return Err(at(
                raw.limits.audit_count_interval.span(),
                "audit_count_interval must be at least 100ms".to_owned(),
            ));
        }
        let synchronous_full = match raw.store.synchronous.get_ref().as_str() {
            "normal" => false,
            "full" => true,
            other => {
                return Err(at(
                    raw.store.synchronous.span(),
                    format!("synchronous = {other:?}: expected \"normal\" or \"full\""),
                ));
            }
        };
        let audit_retention = parse_duration(raw.store.audit_retention.get_ref())
            .map_err(|reason| at(raw.store.audit_retention.span(), reason))?;

        Ok(GatewayConfig {
            listen,
            certificate: raw.certificate,
            key: raw.key,
            ca: raw.ca,
            crl: raw.crl,
            policy: raw.policy,
            state_dir: raw.state_dir,
            admin_socket: raw.admin_socket,
            metrics,
            filter: FilterConfig {
                enabled: raw.filter.enabled,
                table: table.clone(),
                protected,
                inbound_interfaces,
                reject,
                kill_connections: raw.filter.kill_connections,
            },
            limits: LimitsConfig {
                max_connections_per_identity: raw.limits.max_connections_per_identity,
                max_streams: raw.limits.max_streams,
                request_timeout,
                handshakes_per_source_per_second: *raw
                    .limits
                    .handshakes_per_source_per_second
                    .get_ref(),
                handshake_burst_per_source: *raw.limits.handshake_burst_per_source.get_ref(),
                retry_above_handshakes: raw.limits.retry_above_handshakes,
                audit_count_interval,
            },
            store: StoreConfig {
                synchronous_full,
                audit_retention,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = ["0.0.0.0:4433", "[::]:4433"]
certificate = "/etc/fwnp/gateway.pem"
key = "/etc/fwnp/gateway.key"
ca = "/etc/fwnp/ca.pem"
policy = "/etc/fwnp/policy.toml"
state_dir = "/var/lib/fwnp"

[filter]
protected = ["10.1.0.0/16", "2001:db8:1::/48"]
"#;

    #[test]
    fn good_file_parses_with_defaults() {
        let config = GatewayConfig::parse(GOOD, "gateway.toml").expect("valid");
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.filter.table, "fwnp");
        assert!(!config.filter.reject);
        assert_eq!(config.limits.request_timeout, Duration::from_secs(10));
        assert_eq!(config.limits.handshakes_per_source_per_second, 50);
        assert_eq!(config.limits.handshake_burst_per_source, 200);
        assert_eq!(config.limits.retry_above_handshakes, 64);
        assert_eq!(config.limits.max_streams, 16);
        assert_eq!(config.server_options().max_concurrent_bidi_streams, 16);
        assert_eq!(config.limits.audit_count_interval, Duration::from_secs(60));
        assert_eq!(
            config.store.audit_retention,
            Duration::from_secs(90 * 86400)
        );
        assert_eq!(config.admin_socket, PathBuf::from("/run/fwnp/gateway.sock"));
    }

    fn error_of(text: &str) -> (usize, String) {
        match GatewayConfig::parse(text, "g.toml") {
            Err(ConfigError::Invalid { line, reason, .. }) => (line, reason),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_line() {
        let (line, reason) = error_of(&GOOD.replace("10.1.0.0/16", "10.1.0.1/16"));
        assert_eq!(line, 10);
        assert!(reason.contains("host bits"), "{reason}");

        let (line, reason) = error_of(&GOOD.replace("\"[::]:4433\"", "\"nowhere\""));
        assert_eq!(line, 2);
        assert!(reason.contains("nowhere"), "{reason}");

        let (line, reason) = error_of(&format!("{GOOD}refuse = \"maybe\"\n"));
        assert_eq!(line, 11);
        assert!(reason.contains("drop"), "{reason}");

        let (line, reason) = error_of(&format!(
            "{GOOD}\n[limits]\nretry_above_handshakes = 8\nhandshake_burst_per_source = 0\n"
        ));
        assert_eq!(line, 14);
        assert!(reason.contains("handshake_burst_per_source"), "{reason}");
        let (line, reason) = error_of(&format!(
            "{GOOD}\n[limits]\naudit_count_interval = \"soon\"\n"
        ));
        assert_eq!(line, 13);
        assert!(reason.contains("soon"), "{reason}");
        let (line, reason) = error_of(&format!(
            "{GOOD}\n[limits]\naudit_count_interval = \"1ms\"\n"
        ));
        assert_eq!(line, 13);
        assert!(reason.contains("at least"), "{reason}");
    }

    #[test]
    fn durations_follow_the_one_grammar_with_line_and_reason() {
        let config = GatewayConfig::parse(
            &format!("{GOOD}\n[limits]\nrequest_timeout = \"1m30s\"\naudit_count_interval = \"1s500ms\"\n"),
            "g.toml",
        )
        .expect("valid");
        assert_eq!(config.limits.request_timeout, Duration::from_secs(90));
        assert_eq!(
            config.limits.audit_count_interval,
            Duration::from_millis(1500)
        );
        for (value, reason) in [
            ("10", "has no unit"),
            ("1h 30m", "unexpected ' '"),
            ("2min", "unknown unit \"min\""),
            ("1.5s", "unexpected '.'"),
        ] {
            let (line, got) = error_of(&format!(
                "{GOOD}\n[limits]\nrequest_timeout = \"{value}\"\n"
            ));
            assert_eq!(line, 13, "{value}");
            assert!(
                got.contains(reason) && got.contains(value),
                "{value}: {got}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (line, reason) = error_of(&GOOD.replace("state_dir", "stat_dir"));
        assert_eq!(line, 7);
        assert!(reason.contains("stat_dir"), "{reason}");
    }

    #[test]
    fn a_filter_that_guards_nothing_is_refused() {
        let text = GOOD.replace("protected = [\"10.1.0.0/16\", \"2001:db8:1::/48\"]", "");
        let (_, reason) = error_of(&text);
        assert!(reason.contains("guard nothing"), "{reason}");
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../examples/gateway.toml");
        let config = super::GatewayConfig::parse(text, "examples/gateway.toml").expect("valid");
        assert_eq!(config.filter.protected.len(), 2);
        assert_eq!(
            config.metrics,
            Some("127.0.0.1:9771".parse().expect("address"))
        );
    }
}
