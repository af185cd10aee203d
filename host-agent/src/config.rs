//! The agent's configuration file (`fwnp-agent --config PATH`), documented by example in
//! `host-agent/examples/agent.toml`.
//!
//! Parsing refuses unknown keys and every value it cannot use, naming the line, the column and
//! the reason, so that a typo never silently turns into a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fwnp_netfilter::{AlwaysAllowed, HostMode, LocalRedirect};
use fwnp_proto::{PortRange, Protocol};
use serde::Deserialize;
use toml::Spanned;

/// A configuration file that cannot be used, with where and why (both daemons report their files
/// the same way).
pub use fwnp_daemon::config::ConfigError;
use fwnp_daemon::config::{
    check_table_name, from_toml, invalid_at, parse_duration, parse_prefix, read_file,
};

/// What the host mirrors into its own nftables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorMode {
    /// New inbound connections pass only if a mirrored lease or an always-allowed entry admits
    /// them.
    Enforce,
    /// The table is installed and counts what it would drop, but accepts everything.
    Monitor,
    /// No host table at all: the agent never touches the kernel.
    Off,
}

impl MirrorMode {
    /// The mode's name in the configuration and in Status answers.
    pub fn name(self) -> &'static str {
        match self {
            MirrorMode::Enforce => "enforce",
            MirrorMode::Monitor => "monitor",
            MirrorMode::Off => "off",
        }
    }

    /// The host layout's mode, unless the mirror is off.
    pub fn host_mode(self) -> Option<HostMode> {
        match self {
            MirrorMode::Enforce => Some(HostMode::Enforce),
            MirrorMode::Monitor => Some(HostMode::Monitor),
            MirrorMode::Off => None,
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The gateway and the host's credentials.
    pub gateway: GatewayConfig,
    /// The local API.
    pub local: LocalConfig,
    /// The host's own table.
    pub mirror: MirrorConfig,
    /// The NAT-PMP, PCP and UPnP IGD front ends.
    pub frontends: FrontendsConfig,
    /// Where the agent keeps its small state file.
    pub state_dir: PathBuf,
}

/// How to reach the gateways, and who the host is.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateways the agent may connect to (one or more, or an SRV name).
    pub gateways: GatewaySource,
    /// The host's certificate chain (PEM).
    pub certificate: PathBuf,
    /// The host's private key (PEM).
    pub key: PathBuf,
    /// The deployment's CA certificates the gateway's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// Where the agent finds its gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewaySource {
    /// Fixed addresses (`address`, or `addresses`), tried in the order written: the agent
    /// stays with the first that answers and moves on to the next when it is lost.
    Addresses(Vec<GatewayAddress>),
    /// A DNS SRV name (`srv = "_fwnp._udp.DOMAIN"`), looked up at every connection attempt;
    /// its targets are tried in the order of RFC 2782 (priority, then weight).
    Srv {
        /// The SRV owner name, `_fwnp._udp.DOMAIN`.
        name: String,
        /// The name every gateway's certificate must carry; `None`: each target's own name.
        server_name: Option<String>,
    },
}

/// One gateway of a fixed list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAddress {
    /// `HOST:PORT` of its QUIC service; resolved at each connection attempt.
    pub address: String,
    /// The name its certificate must carry (a DNS SAN, or an IP SAN written as an address).
    pub server_name: String,
}

impl GatewaySource {
    /// The gateways in a few words, for logs and Status.
    ///
    /// ```
    /// use fwnp_agent::config::{GatewayAddress, GatewaySource};
    /// let one = GatewaySource::Addresses(vec![GatewayAddress {
    ///     address: "gw.example.org:4433".into(),
    ///     server_name: "gw.example.org".into(),
    /// }]);
    /// assert_eq!(one.describe(), "gw.example.org:4433");
    /// ```
    pub fn describe(&self) -> String {
        match self {
            GatewaySource::Addresses(list) => list
                .iter()
                .map(|g| g.address.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            GatewaySource::Srv { name, .. } => format!("SRV {name}"),
        }
    }
}

/// The prefix of the SRV names the agent looks up (RFC 2782: service and protocol).
pub const SRV_PREFIX: &str = "_fwnp._udp.";

/// The local API's socket and who may use it.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The Unix socket path.
    pub socket: PathBuf,
    /// User ids that may use the agent (root always may).
    pub allowed_uids: Vec<u32>,
    /// Group ids whose members (primary or supplementary) may use the agent.
    pub allowed_gids: Vec<u32>,
    /// Whether a port opening requires the port to be bound by the caller or its descendants.
    pub verify_port_owner: bool,
    /// How long the agent waits for the caller to bind the port.
    pub port_owner_grace: Duration,
    /// How long leases of an earlier run of the agent (still live at the gateway after a
    /// restart) wait for an application to ask for them again before the agent releases them.
    pub earlier_run_grace: Duration,
    /// How often the ports of verified leases are checked again (besides before each renewal
    /// and re-open): a lease whose port is no longer the caller's ends.
    pub owner_check_interval: Duration,
    /// Local connections open at once, all users together.
    pub max_connections: usize,
    /// Local connections open at once by one user id.
    pub max_connections_per_user: usize,
    /// Bytes of answers and events queued for one connection that does not read them; past
    /// this the connection is closed.
    pub max_output_bytes: usize,
    /// Leases (held or being requested) of one connection.
    pub max_leases_per_connection: usize,
    /// Watches of one connection (a watch of all its leases counts once).
    pub max_watches: usize,
    /// A connection that holds no lease and sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// What of the application the agent tells the gateway with each Open, where it is
    /// audited (spec Section 10: the operator may turn each field off).
    pub app_info: AppInfoFields,
}

/// The fields of an Open's application information the agent sends (`app_info` in `[local]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppInfoFields {
    /// The application's name (its own label, or else its command line).
    pub name: bool,
    /// The path of its executable.
    pub executable: bool,
    /// The user id it runs as.
    pub uid: bool,
    /// Its process id.
    pub pid: bool,
}

impl Default for AppInfoFields {
    fn default() -> Self {
        AppInfoFields {
            name: true,
            executable: true,
            uid: true,
            pid: true,
        }
    }
}

impl AppInfoFields {
    /// The field names `app_info` takes, in the order of the protocol's keys.
    pub const NAMES: [&'static str; 4] = ["name", "executable", "uid", "pid"];

    /// `app` with the fields turned off left out; `None` when nothing is left to send.
    ///
    /// ```
    /// use fwnp_agent::config::AppInfoFields;
    /// use fwnp_proto::AppInfo;
    ///
    /// let app = AppInfo { name: Some("web".into()), executable: None, uid: Some(1000), pid: Some(42) };
    /// let only_name = AppInfoFields { name: true, executable: false, uid: false, pid: false };
    /// assert_eq!(only_name.keep(app.clone()), Some(AppInfo { name: Some("web".into()), ..AppInfo::default() }));
    /// let nothing = AppInfoFields { name: false, ..only_name };
    /// assert_eq!(nothing.keep(app), None);
    /// ```
    pub fn keep(&self, app: fwnp_proto::AppInfo) -> Option<fwnp_proto::AppInfo> {
        let kept = fwnp_proto::AppInfo {
            name: app.name.filter(|_| self.name),
            executable: app.executable.filter(|_| self.executable),
            uid: app.uid.filter(|_| self.uid),
            pid: app.pid.filter(|_| self.pid),
        };
        (kept != fwnp_proto::AppInfo::default()).then_some(kept)
    }
}

/// Default of `max_connections`: well below the descriptor limit the unit sets.
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `max_connections_per_user`.
const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;
/// Default of `max_output_bytes`: sixteen of the largest frames.
const DEFAULT_MAX_OUTPUT_BYTES: usize = 16 * 16_388;
/// Default of `max_leases_per_connection`.
const DEFAULT_MAX_LEASES_PER_CONNECTION: usize = 256;
/// Default of `max_watches`.
const DEFAULT_MAX_WATCHES: usize = 64;

/// The host table.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Enforce, monitor or off.
    pub mode: MirrorMode,
    /// The table's name, in family `inet`.
    pub table: String,
    /// Inbound traffic that always passes.
    pub always_allowed: Vec<AlwaysAllowed>,
    /// The host's own traffic sent to the agent instead (set at start-up from the front ends'
    /// configuration, not read from the file).
    pub redirects: Vec<LocalRedirect>,
}

/// The front ends that answer protocols unmodified applications already speak, each off unless
/// switched on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendsConfig {
    /// NAT-PMP (RFC 6886).
    pub natpmp: bool,
    /// PCP (RFC 6887).
    pub pcp: bool,
    /// The loopback port NAT-PMP and PCP are answered on (the host's requests to port 5351 of
    /// `gateways` are redirected there).
    pub port: u16,
    /// The addresses whose port 5351 the host's own requests are redirected from; empty: the
    /// default routes' gateways when the agent starts.
    pub gateways: Vec<std::net::IpAddr>,
    /// UPnP IGD (SSDP discovery on the host and the device's control over HTTP).
    pub upnp: bool,
    /// The TCP port of the UPnP device's description and control.
    pub upnp_port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    gateway: Spanned<RawGateway>,
    #[serde(default)]
    local: RawLocal,
    #[serde(default)]
    mirror: RawMirror,
    #[serde(default)]
    frontends: RawFrontends,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFrontends {
    #[serde(default)]
    natpmp: bool,
    #[serde(default)]
    pcp: bool,
    port: Option<Spanned<i64>>,
    #[serde(default)]
    gateways: Vec<Spanned<String>>,
    #[serde(default)]
    upnp: bool,
    upnp_port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    address: Option<Spanned<String>>,
    addresses: Option<Spanned<Vec<Spanned<String>>>>,
    srv: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    certificate: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default)]
    allowed_users: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    allowed_groups: Vec<Spanned<toml::Value>>,
    #[serde(default = "yes")]
    verify_port_owner: bool,
    #[serde(default = "default_grace")]
    port_owner_grace: Spanned<String>,
    #[serde(default = "default_earlier_run_grace")]
    earlier_run_grace: Spanned<String>,
    #[serde(default = "default_owner_check_interval")]
    owner_check_interval: Spanned<String>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_user: Option<Spanned<i64>>,
    max_output_bytes: Option<Spanned<i64>>,
    max_leases_per_connection: Option<Spanned<i64>>,
    max_watches: Option<Spanned<i64>>,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: Spanned<String>,
    app_info: Option<Vec<Spanned<String>>>,
}

impl Default for RawLocal {
    fn default() -> Self {
        RawLocal {
            socket: default_socket(),
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            verify_port_owner: true,
            port_owner_grace: default_grace(),
            earlier_run_grace: default_earlier_run_grace(),
            owner_check_interval: default_owner_check_interval(),
            max_connections: None,
            max_connections_per_user: None,
            max_output_bytes: None,
            max_leases_per_connection: None,
            max_watches: None,
            idle_timeout: default_idle_timeout(),
            app_info: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    #[serde(default = "default_mode")]
    mode: Spanned<String>,
    #[serde(default = "default_table")]
    table: Spanned<String>,
    #[serde(default)]
    always_allowed: Vec<RawAllowed>,
}

impl Default for RawMirror {
    fn default() -> Self {
        RawMirror {
            mode: default_mode(),
            table: default_table(),
            always_allowed: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowed {
    from: Spanned<String>,
    protocol: Option<Spanned<String>>,
    ports: Option<Spanned<toml::Value>>,
}

fn yes() -> bool {
    true
}
fn default_socket() -> PathBuf {
    PathBuf::from(fwnp_proto::local::DEFAULT_SOCKET_PATH)
}
fn default_grace() -> Spanned<String> {
    Spanned::new(0..0, "2s".to_owned())
}
fn default_earlier_run_grace() -> Spanned<String> {
    Spanned::new(0..0, "15s".to_owned())
}
fn default_owner_check_interval() -> Spanned<String> {
    Spanned::new(0..0, "2s".to_owned())
}
fn default_idle_timeout() -> Spanned<String> {
    Spanned::new(0..0, "60s".to_owned())
}
fn default_mode() -> Spanned<String> {
    Spanned::new(0..0, "enforce".to_owned())
}
fn default_table() -> Spanned<String> {
    Spanned::new(0..0, "fwnp_host".to_owned())
}

/// The longest grace period accepted: an application waits this long for its answer.
const MAX_GRACE: Duration = Duration::from_secs(30);
/// An earlier run's leases are openings nobody asked for since: they wait at most this long.
const MAX_EARLIER_RUN_GRACE: Duration = Duration::from_secs(600);
/// Ownership checks more often than this would keep the agent reading `/proc` all the time.
const MIN_OWNER_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Less often, and a port taken over by another program stays open too long.
const MAX_OWNER_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// An application needs a moment between connecting and asking.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Past this many connections the descriptor limit of any usual system is near.
const MAX_CONNECTIONS: usize = 1 << 20;
/// One largest frame (header and body) must fit.
const MIN_OUTPUT_BYTES: usize = 16_388;
const MAX_OUTPUT_BYTES: usize = 64 << 20;
const MAX_LEASES_PER_CONNECTION: usize = 65_536;
const MAX_WATCHES: usize = 65_536;

impl AgentConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read_file(path)?, &path.display().to_string())
    }

    /// Checks a configuration held in memory; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, origin, Path::new("/etc"))
    }

    /// As [`AgentConfig::parse`], resolving user and group names in `etc/passwd` and
    /// `etc/group` under `etc` (tests point it elsewhere).
    pub fn parse_with(text: &str, origin: &str, etc: &Path) -> Result<Self, ConfigError> {
        let at =
            |span: std::ops::Range<usize>, reason: String| invalid_at(text, origin, span, reason);
        let raw: RawConfig = from_toml(text, origin)?;

        let gateway_span = raw.gateway.span();
        let raw_gateway = raw.gateway.into_inner();
        let sources = gateway_source(&raw_gateway, gateway_span, &at)?;

        let mut allowed_uids = Vec::new();
        for user in &raw.local.allowed_users {
            let uid = id_of(user.get_ref(), &etc.join("passwd"), "user")
                .map_err(|reason| at(user.span(), reason))?;
            allowed_uids.push(uid);
        }
        let mut allowed_gids = Vec::new();
        for group in &raw.local.allowed_groups {
            let gid = id_of(group.get_ref(), &etc.join("group"), "group")
                .map_err(|reason| at(group.span(), reason))?;
            allowed_gids.push(gid);
        }
        // A duration of at most `max`, or the line and reason.
        let bounded = |value: &Spanned<String>, name: &str, max: Duration| {
            let duration =
                parse_duration(value.get_ref()).map_err(|reason| at(value.span(), reason))?;
            if duration > max {
                return Err(at(
                    value.span(),
                    format!("{name} is at most {}s", max.as_secs()),
                ));
            }
            Ok(duration)
        };
        let grace = bounded(&raw.local.port_owner_grace, "port_owner_grace", MAX_GRACE)?;
        let earlier_run_grace = bounded(
            &raw.local.earlier_run_grace,
            "earlier_run_grace",
            MAX_EARLIER_RUN_GRACE,
        )?;
        let owner_check_interval = bounded(
            &raw.local.owner_check_interval,
            "owner_check_interval",
            MAX_OWNER_CHECK_INTERVAL,
        )?;
        if owner_check_interval < MIN_OWNER_CHECK_INTERVAL {
            return Err(at(
                raw.local.owner_check_interval.span(),
                format!(
                    "owner_check_interval is at least {}ms",
                    MIN_OWNER_CHECK_INTERVAL.as_millis()
                ),
            ));
        }
        let app_info = match &raw.local.app_info {
            None => AppInfoFields::default(),
            Some(names) => {
                let mut fields = AppInfoFields {
                    name: false,
                    executable: false,
                    uid: false,
                    pid: false,
                };
                for name in names {
                    let field = match name.get_ref().as_str() {
                        "name" => &mut fields.name,
                        "executable" => &mut fields.executable,
                        "uid" => &mut fields.uid,
                        "pid" => &mut fields.pid,
                        other => {
                            return Err(at(
                                name.span(),
                                format!(
                                    "app_info: unknown field {other:?} (expected some of {})",
                                    AppInfoFields::NAMES.join(", ")
                                ),
                            ));
                        }
                    };
                    *field = true;
                }
                fields
            }
        };
        let idle_timeout = bounded(&raw.local.idle_timeout, "idle_timeout", MAX_IDLE_TIMEOUT)?;
        if idle_timeout < MIN_IDLE_TIMEOUT {
            return Err(at(
                raw.local.idle_timeout.span(),
                format!("idle_timeout is at least {}s", MIN_IDLE_TIMEOUT.as_secs()),
            ));
        }
        // A count between 1 and `max`, or the line and reason.
        let count = |value: &Option<Spanned<i64>>, name: &str, default: usize, max: usize| {
            let Some(value) = value else {
                return Ok(default);
            };
            usize::try_from(*value.get_ref())
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| at(value.span(), format!("{name} is between 1 and {max}")))
        };
        let max_connections = count(
            &raw.local.max_connections,
            "max_connections",
            DEFAULT_MAX_CONNECTIONS,
            MAX_CONNECTIONS,
        )?;
        let max_connections_per_user = count(
            &raw.local.max_connections_per_user,
            "max_connections_per_user",
            DEFAULT_MAX_CONNECTIONS_PER_USER,
            max_connections,
        )?;
        let max_output_bytes = count(
            &raw.local.max_output_bytes,
            "max_output_bytes",
            DEFAULT_MAX_OUTPUT_BYTES,
            MAX_OUTPUT_BYTES,
        )?;
        if max_output_bytes < MIN_OUTPUT_BYTES {
            return Err(at(
                raw.local
                    .max_output_bytes
                    .as_ref()
                    .map_or(0..0, |v| v.span()),
                format!("max_output_bytes is at least {MIN_OUTPUT_BYTES} (one largest frame)"),
            ));
        }
        let max_leases_per_connection = count(
            &raw.local.max_leases_per_connection,
            "max_leases_per_connection",
            DEFAULT_MAX_LEASES_PER_CONNECTION,
            MAX_LEASES_PER_CONNECTION,
        )?;
        let max_watches = count(
            &raw.local.max_watches,
            "max_watches",
            DEFAULT_MAX_WATCHES,
            MAX_WATCHES,
        )?;
        if raw.local.socket.as_os_str().is_empty() || !raw.local.socket.is_absolute() {
            return Err(at(
                0..0,
                "[local] socket must be an absolute path".to_owned(),
            ));
        }

        let mode = match raw.mirror.mode.get_ref().as_str() {
            "enforce" => MirrorMode::Enforce,
            "monitor" => MirrorMode::Monitor,
            "off" => MirrorMode::Off,
            other => {
                return Err(at(
                    raw.mirror.mode.span(),
                    format!("mode = {other:?}: expected \"enforce\", \"monitor\" or \"off\""),
                ));
            }
        };
        let table = raw.mirror.table.get_ref();
        check_table_name(table).map_err(|reason| at(raw.mirror.table.span(), reason))?;
        let mut always_allowed = Vec::new();
        for entry in &raw.mirror.always_allowed {
            let remote = parse_prefix(entry.from.get_ref())
                .map_err(|reason| at(entry.from.span(), reason))?;
            let protocol = match &entry.protocol {
                None => None,
                Some(p) => Some(parse_protocol(p.get_ref()).map_err(|r| at(p.span(), r))?),
            };
            let ports = match &entry.ports {
                None => None,
                Some(p) => Some(parse_ports(p.get_ref()).map_err(|r| at(p.span(), r))?),
            };
            if ports.is_some()
                && !matches!(
                    protocol,
                    Some(Protocol::Tcp | Protocol::Udp | Protocol::Sctp | Protocol::UdpLite)
                )
            {
                return Err(at(
                    entry.from.span(),
                    "an always-allowed entry with ports needs a protocol".to_owned(),
                ));
            }
            always_allowed.push(AlwaysAllowed {
                remote,
                protocol,
                ports,
            });
        }

        let port = match &raw.frontends.port {
            None => crate::frontend::SERVER_PORT,
            Some(value) => u16::try_from(*value.get_ref())
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| at(value.span(), "port is between 1 and 65535".to_owned()))?,
        };
        let upnp_port = match &raw.frontends.upnp_port {
            None => crate::frontend::upnp::DEFAULT_PORT,
            Some(value) => u16::try_from(*value.get_ref())
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| at(value.span(), "upnp_port is between 1 and 65535".to_owned()))?,
        };
        let mut gateways = Vec::new();
        for address in &raw.frontends.gateways {
            let parsed = address.get_ref().parse::<std::net::IpAddr>().map_err(|_| {
                at(
                    address.span(),
                    format!(
                        "gateway {:?}: expected an IPv4 or IPv6 address",
                        address.get_ref()
                    ),
                )
            })?;
            gateways.push(parsed);
        }

        Ok(AgentConfig {
            gateway: GatewayConfig {
                gateways: sources,
                certificate: raw_gateway.certificate,
                key: raw_gateway.key,
                ca: raw_gateway.ca,
            },
            local: LocalConfig {
                socket: raw.local.socket,
                allowed_uids,
                allowed_gids,
                verify_port_owner: raw.local.verify_port_owner,
                port_owner_grace: grace,
                earlier_run_grace,
                owner_check_interval,
                max_connections,
                max_connections_per_user,
                max_output_bytes,
                max_leases_per_connection,
                max_watches,
                idle_timeout,
                app_info,
            },
            mirror: MirrorConfig {
                mode,
                table: table.clone(),
                always_allowed,
                redirects: Vec::new(),
            },
            frontends: FrontendsConfig {
                natpmp: raw.frontends.natpmp,
                pcp: raw.frontends.pcp,
                port,
                gateways,
                upnp: raw.frontends.upnp,
                upnp_port,
            },
            state_dir: raw.state_dir,
        })
    }
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        "udplite" => Ok(Protocol::UdpLite),
        other => Err(format!(
            "protocol {other:?}: expected \"tcp\", \"udp\", \"sctp\" or \"udplite\""
        )),
    }
}

/// `22`, `"22"` or `"8000-8100"`.
fn parse_ports(value: &toml::Value) -> Result<PortRange, String> {
    let port = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {n} is not between 1 and 65535"))
    };
    let range = match value {
        toml::Value::Integer(n) => PortRange::single(port(*n)?),
        toml::Value::String(s) => {
            let number = |t: &str| -> Result<u16, String> {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("ports {s:?}: expected a port or FIRST-LAST"))
                    .and_then(port)
            };
            match s.split_once('-') {
                Some((first, last)) => PortRange {
                    first: number(first)?,
                    last: number(last)?,
                },
                None => PortRange::single(number(s)?),
            }
        }
        _ => return Err("ports: expected a port number or a \"FIRST-LAST\" string".to_owned()),
    };
    if range.last < range.first {
        return Err(format!(
            "port range {}-{} is reversed: write {}-{}",
            range.first, range.last, range.last, range.first
        ));
    }
    Ok(range)
}

/// A user or group given by number or by name, looked up in a passwd or group file.
fn id_of(value: &toml::Value, file: &Path, what: &str) -> Result<u32, String> {
    match value {
        toml::Value::Integer(n) => {
            u32::try_from(*n).map_err(|_| format!("{what} id {n} is out of range"))
        }
        toml::Value::String(name) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("{what} {name:?}: cannot read {}: {e}", file.display()))?;
            text.lines()
                .filter_map(|line| {
                    let mut fields = line.split(':');
                    let entry = fields.next()?;
                    let id = fields.nth(1)?.parse::<u32>().ok()?;
                    (entry == name).then_some(id)
                })
                .next()
                .ok_or_else(|| {
                    format!(
                        "no {what} named {name:?} in {} (create it, for example with \
                         `{what}add --system {name}`, or leave it out)",
                        file.display()
                    )
                })
        }
        _ => Err(format!("{what}: expected a name or a numeric id")),
    }
}

/// The gateways of `[gateway]`: exactly one of `address`, `addresses` and `srv`, each
/// `HOST:PORT` checked, and `server_name` (shared by all when given) non-empty.
fn gateway_source(
    raw: &RawGateway,
    table: std::ops::Range<usize>,
    at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<GatewaySource, ConfigError> {
    let given: Vec<std::ops::Range<usize>> = [
        raw.address.as_ref().map(Spanned::span),
        raw.addresses.as_ref().map(Spanned::span),
        raw.srv.as_ref().map(Spanned::span),
    ]
    .into_iter()
    .flatten()
    .collect();
    match given.as_slice() {
        [] => {
            return Err(at(
                table,
                "[gateway] needs address (one gateway), addresses (several) or srv (a DNS SRV \
                 name)"
                    .to_owned(),
            ));
        }
        [_] => {}
        [_, second, ..] => {
            return Err(at(
                second.clone(),
                "give only one of address, addresses and srv".to_owned(),
            ));
        }
    }
    let shared = match &raw.server_name {
        Some(name) if name.get_ref().is_empty() => {
            return Err(at(
                name.span(),
                "server_name must name the gateway's certificate".to_owned(),
            ));
        }
        Some(name) => Some(name.get_ref().clone()),
        None => None,
    };
    if let Some(srv) = &raw.srv {
        let name = srv.get_ref().trim_end_matches('.');
        let domain = name.strip_prefix(SRV_PREFIX).unwrap_or_default();
        if domain.is_empty() || domain.split('.').any(str::is_empty) {
            return Err(at(
                srv.span(),
                format!(
                    "srv {:?}: expected {SRV_PREFIX}DOMAIN, e.g. \"_fwnp._udp.example.org\"",
                    srv.get_ref()
                ),
            ));
        }
        return Ok(GatewaySource::Srv {
            name: name.to_owned(),
            server_name: shared,
        });
    }
    let list: Vec<&Spanned<String>> = match (&raw.address, &raw.addresses) {
        (Some(one), _) => vec![one],
        (_, Some(many)) if many.get_ref().is_empty() => {
            return Err(at(many.span(), "addresses is empty".to_owned()));
        }
        (_, Some(many)) => many.get_ref().iter().collect(),
        (None, None) => Vec::new(),
    };
    let mut gateways = Vec::with_capacity(list.len());
    for address in list {
        let text = address.get_ref();
        let host = match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                host
            }
            _ => {
                return Err(at(
                    address.span(),
                    format!(
                        "gateway address {text:?}: expected HOST:PORT, e.g. \"gateway.example.org:4433\""
                    ),
                ));
            }
        };
        if gateways.iter().any(|g: &GatewayAddress| &g.address == text) {
            return Err(at(
                address.span(),
                format!("gateway address {text:?} is listed twice"),
            ));
        }
        // Without a shared server_name each gateway is verified against its own host name
        // (an IPv6 literal is written in brackets in HOST:PORT, and without them in a SAN).
        let own = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        gateways.push(GatewayAddress {
            address: text.clone(),
            server_name: shared.clone().unwrap_or(own),
        });
    }
    Ok(GatewaySource::Addresses(gateways))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"state_dir = "/var/lib/fwnp-agent"

[gateway]
address = "gateway.example.org:4433"
server_name = "gateway.example.org"
certificate = "/etc/fwnp/pki/web-01.pem"
key = "/etc/fwnp/pki/web-01.key"
ca = "/etc/fwnp/pki/ca.pem"
"#;

    fn error_of(text: &str) -> (usize, String) {
        match AgentConfig::parse(text, "agent.toml") {
            Err(ConfigError::Invalid { line, reason, .. }) => (line, reason),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let config = AgentConfig::parse(GOOD, "agent.toml").expect("valid");
        assert_eq!(config.local.socket, PathBuf::from("/run/fwnp/agent.sock"));
        assert!(config.local.verify_port_owner);
        assert_eq!(config.local.port_owner_grace, Duration::from_secs(2));
        assert_eq!(config.local.earlier_run_grace, Duration::from_secs(15));
        assert_eq!(config.local.owner_check_interval, Duration::from_secs(2));
        assert_eq!(config.local.max_connections, 1024);
        assert_eq!(config.local.max_connections_per_user, 64);
        assert_eq!(config.local.max_output_bytes, 16 * 16_388);
        assert_eq!(config.local.max_leases_per_connection, 256);
        assert_eq!(config.local.max_watches, 64);
        assert_eq!(config.local.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.mirror.mode, MirrorMode::Enforce);
        assert_eq!(config.mirror.table, "fwnp_host");
        assert!(config.local.allowed_uids.is_empty());
        assert_eq!(config.local.app_info, AppInfoFields::default());
    }

    /// Each field of the application information can be turned off (spec Section 10).
    #[test]
    fn app_info_lists_the_fields_sent() {
        let config = AgentConfig::parse(
            &format!("{GOOD}\n[local]\napp_info = [\"name\", \"uid\"]\n"),
            "agent.toml",
        )
        .expect("valid");
        let expected = AppInfoFields {
            name: true,
            executable: false,
            uid: true,
            pid: false,
        };
        assert_eq!(config.local.app_info, expected);
        let none = AgentConfig::parse(&format!("{GOOD}\n[local]\napp_info = []\n"), "agent.toml")
            .expect("valid");
        assert_eq!(
            none.local.app_info.keep(fwnp_proto::AppInfo {
                name: Some("web".into()),
                executable: Some("/usr/bin/web".into()),
                uid: Some(1000),
                pid: Some(7),
            }),
            None
        );
        let (line, reason) = error_of(&format!(
            "{GOOD}\n[local]\napp_info = [\"name\", \"cmdline\"]\n"
        ));
        assert_eq!(line, 11);
        assert!(
            reason.contains("\"cmdline\"") && reason.contains("executable"),
            "{reason}"
        );
    }

    #[test]
    fn bad_values_name_line_and_reason() {
        let (line, reason) = error_of(&GOOD.replace("gateway.example.org:4433", "gateway"));
        assert_eq!(line, 4);
        assert!(reason.contains("HOST:PORT"), "{reason}");

        let (line, reason) = error_of(&format!("{GOOD}\n[mirror]\nmode = \"strict\"\n"));
        assert_eq!(line, 11);
        assert!(reason.contains("monitor"), "{reason}");

        let (line, reason) = error_of(&format!("{GOOD}\n[local]\nearlier_run_grace = \"11m\"\n"));
        assert_eq!(line, 11);
        assert!(reason.contains("at most 600s"), "{reason}");

        for (setting, expected) in [
            ("owner_check_interval = \"100ms\"", "at least 200ms"),
            ("owner_check_interval = \"2m\"", "at most 60s"),
            ("idle_timeout = \"2h\"", "at most 3600s"),
            ("max_connections = 0", "between 1 and"),
            (
                "max_connections = 10\nmax_connections_per_user = 11",
                "between 1 and 10",
            ),
            ("max_output_bytes = 1000", "at least 16388"),
            ("max_leases_per_connection = -1", "between 1 and 65536"),
            ("max_watches = 70000", "between 1 and 65536"),
        ] {
            let (line, reason) = error_of(&format!("{GOOD}\n[local]\n{setting}\n"));
            let last = 11 + setting.matches('\n').count();
            assert_eq!(line, last, "{setting}: {reason}");
            assert!(reason.contains(expected), "{setting}: {reason}");
        }

        let (line, reason) = error_of(&GOOD.replace("state_dir", "stat_dir"));
        assert_eq!(line, 1);
        assert!(reason.contains("stat_dir"), "{reason}");
    }
}

#[cfg(test)]
mod gateway_tests {
    use super::*;

    fn with_gateway(lines: &str) -> String {
        format!(
            "state_dir = \"/var/lib/fwnp-agent\"\n\n[gateway]\n{lines}\ncertificate = \"/c.pem\"\n\
             key = \"/k.pem\"\nca = \"/ca.pem\"\n"
        )
    }

    fn gateways(lines: &str) -> GatewaySource {
        AgentConfig::parse(&with_gateway(lines), "agent.toml")
            .expect("valid")
            .gateway
            .gateways
    }

    fn error_of(lines: &str) -> (usize, String) {
        match AgentConfig::parse(&with_gateway(lines), "agent.toml") {
            Err(ConfigError::Invalid { line, reason, .. }) => (line, reason),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    fn address(address: &str, server_name: &str) -> GatewayAddress {
        GatewayAddress {
            address: address.into(),
            server_name: server_name.into(),
        }
    }

    #[test]
    fn several_addresses_are_each_verified_against_their_own_name() {
        assert_eq!(
            gateways(
                r#"addresses = ["gw-a.example.org:4433", "198.51.100.2:4433", "[fd00:2::2]:4433"]"#
            ),
            GatewaySource::Addresses(vec![
                address("gw-a.example.org:4433", "gw-a.example.org"),
                address("198.51.100.2:4433", "198.51.100.2"),
                address("[fd00:2::2]:4433", "fd00:2::2"),
            ])
        );
    }

    #[test]
    fn a_shared_server_name_applies_to_every_address() {
        assert_eq!(
            gateways(
                "addresses = [\"198.51.100.1:4433\", \"198.51.100.2:4433\"]\nserver_name = \"gw.example.org\""
            ),
            GatewaySource::Addresses(vec![
                address("198.51.100.1:4433", "gw.example.org"),
                address("198.51.100.2:4433", "gw.example.org"),
            ])
        );
        // One address as before, with or without its own server_name.
        assert_eq!(
            gateways("address = \"198.51.100.1:4433\"\nserver_name = \"gw.example.org\""),
            GatewaySource::Addresses(vec![address("198.51.100.1:4433", "gw.example.org")])
        );
        assert_eq!(
            gateways("address = \"gw.example.org:4433\""),
            GatewaySource::Addresses(vec![address("gw.example.org:4433", "gw.example.org")])
        );
    }

    #[test]
    fn an_srv_name_is_kept_for_every_attempt() {
        assert_eq!(
            gateways("srv = \"_fwnp._udp.example.org.\""),
            GatewaySource::Srv {
                name: "_fwnp._udp.example.org".into(),
                server_name: None,
            }
        );
        assert_eq!(
            gateways("srv = \"_fwnp._udp.example.org\"\nserver_name = \"gw.example.org\""),
            GatewaySource::Srv {
                name: "_fwnp._udp.example.org".into(),
                server_name: Some("gw.example.org".into()),
            }
        );
    }

    #[test]
    fn gateway_mistakes_name_line_and_reason() {
        for (lines, line, expected) in [
            ("", 3, "needs address"),
            (
                "address = \"a.example:1\"\nsrv = \"_fwnp._udp.example.org\"",
                5,
                "only one of",
            ),
            ("addresses = []", 4, "addresses is empty"),
            (
                "addresses = [\"a.example:1\",\n  \"b.example\"]",
                5,
                "HOST:PORT",
            ),
            (
                "addresses = [\"a.example:1\", \"a.example:1\"]",
                4,
                "listed twice",
            ),
            ("addresses = [\"a.example:0\"]", 4, "HOST:PORT"),
            ("srv = \"_fwnp._tcp.example.org\"", 4, "_fwnp._udp.DOMAIN"),
            ("srv = \"_fwnp._udp.\"", 4, "_fwnp._udp.DOMAIN"),
            (
                "address = \"a.example:1\"\nserver_name = \"\"",
                5,
                "server_name",
            ),
        ] {
            let (got_line, reason) = error_of(lines);
            assert_eq!(got_line, line, "{lines}: {reason}");
            assert!(reason.contains(expected), "{lines}: {reason}");
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_on_a_fresh_machine() {
        // A fresh machine has no group for FWNP's users: the example must not name one.
        let text = include_str!("../examples/agent.toml");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("group"), "root:x:0:\n").unwrap();
        std::fs::write(dir.path().join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        let config =
            AgentConfig::parse_with(text, "examples/agent.toml", dir.path()).expect("valid");
        assert!(config.local.allowed_gids.is_empty());
        assert_eq!(config.local.max_output_bytes, 262_208);
        assert_eq!(config.local.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.mirror.always_allowed.len(), 3);
        assert_eq!(
            config.mirror.always_allowed[2].ports,
            Some(PortRange {
                first: 161,
                last: 162
            })
        );
        assert_eq!(
            config.gateway.gateways,
            GatewaySource::Addresses(vec![GatewayAddress {
                address: "gateway.example.org:4433".into(),
                server_name: "gateway.example.org".into(),
            }])
        );
    }
}
