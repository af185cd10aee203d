//! [`Opening`]: what an application asks the agent to open, built step by step.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use fwnp_proto::local::{self, LocalMessage};
use fwnp_proto::validate::{self, MAX_APP_NAME_LEN, ValidationError};
use fwnp_proto::{
    AppInfo, Common, Family, HostAddresses, MAX_LIFETIME_SECS, Message, Open, PortRange, Prefix,
    Protocol, Target,
};

/// Why an [`Opening`] cannot be sent: found on this host, before the agent is asked.
///
/// ```
/// use std::time::Duration;
/// use fwnp_sdk::{Opening, OpeningError};
///
/// let err = "tcp/http".parse::<Opening>().unwrap_err();
/// assert!(matches!(err, OpeningError::BadSpec { .. }), "{err}");
///
/// let week_and_a_day = Duration::from_secs(8 * 24 * 3600);
/// let err = Opening::tcp(8080).lifetime(week_and_a_day).check().unwrap_err();
/// assert!(matches!(err, OpeningError::LifetimeTooLong { .. }), "{err}");
///
/// let err = Opening::tcp(8080).from("198.51.100.7/33").check().unwrap_err();
/// assert!(matches!(err, OpeningError::BadPrefix { .. }), "{err}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpeningError {
    /// A remote prefix given as text is not `ADDRESS/LENGTH` (or a bare address).
    #[error("{text:?} is not a prefix such as 198.51.100.0/24 or 2001:db8::/32: {reason}")]
    BadPrefix {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: fwnp_proto::PrefixParseError,
    },
    /// The opening breaks a rule of the protocol (port 0, a reversed range, host bits set in a
    /// prefix, an IPv6 prefix on an IPv4 address, a bad application id...).
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// The lifetime asked is above the protocol's maximum of seven days.
    #[error("a lifetime of {asked:?} is above the protocol's maximum of {max} s")]
    LifetimeTooLong {
        /// The lifetime asked.
        asked: Duration,
        /// [`MAX_LIFETIME_SECS`].
        max: u32,
    },
    /// The application name is longer than the protocol allows.
    #[error("the application name is {len} bytes long; at most {max} are allowed")]
    NameTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The request asking for the opening would be larger than the agent reads (16,384
    /// bytes): too many remote prefixes or host addresses for one request. Split the opening.
    #[error("the request for this opening is {bytes} bytes long; the agent reads at most {max}")]
    TooLarge {
        /// The encoded request's length.
        bytes: usize,
        /// [`fwnp_proto::local::MAX_FRAME_BODY_LEN`].
        max: usize,
    },
    /// A textual opening (`tcp/8080`) could not be read.
    #[error("{text:?} is not an opening such as tcp/8080, udp/5000-5010 or app:https: {reason}")]
    BadSpec {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A remote network allowed to connect, as given to [`Opening::from`].
///
/// It converts from text (`"198.51.100.0/24"`, `"2001:db8::/32"`, or a bare address meaning
/// that one address), from [`ipnet::IpNet`] and its two halves, from an [`IpAddr`] and from the
/// protocol's own [`Prefix`]. Text that does not parse is kept as an error, reported by
/// [`Opening::check`] and by [`crate::Client::open`], so that the builder stays a chain of
/// plain calls.
///
/// ```
/// use fwnp_sdk::Remote;
///
/// assert!(Remote::from("198.51.100.0/24").prefix().is_ok());
/// assert!(Remote::from("198.51.100.0/33").prefix().is_err());
/// let net: ipnet::IpNet = "2001:db8::/32".parse().unwrap();
/// assert_eq!(Remote::from(net).prefix().unwrap().len, 32);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote(Result<Prefix, OpeningError>);

impl Remote {
    /// The prefix, or why the text given was not one. Host bits and the family are checked
    /// later, with the whole opening.
    ///
    /// ```
    /// use fwnp_sdk::Remote;
    /// let p = Remote::from("10.1.0.0/16").prefix().unwrap();
    /// assert_eq!(p.to_string(), "10.1.0.0/16");
    /// ```
    pub fn prefix(&self) -> Result<Prefix, OpeningError> {
        self.0.clone()
    }
}

fn parse_prefix(text: &str) -> Result<Prefix, OpeningError> {
    text.trim()
        .parse()
        .map_err(|reason| OpeningError::BadPrefix {
            text: text.to_owned(),
            reason,
        })
}

impl From<&str> for Remote {
    fn from(text: &str) -> Self {
        Remote(parse_prefix(text))
    }
}

impl From<String> for Remote {
    fn from(text: String) -> Self {
        Remote(parse_prefix(&text))
    }
}

impl From<&String> for Remote {
    fn from(text: &String) -> Self {
        Remote(parse_prefix(text))
    }
}

impl From<ipnet::IpNet> for Remote {
    fn from(net: ipnet::IpNet) -> Self {
        Remote(Ok(Prefix {
            addr: net.addr(),
            len: net.prefix_len(),
        }))
    }
}

impl From<ipnet::Ipv4Net> for Remote {
    fn from(net: ipnet::Ipv4Net) -> Self {
        Remote::from(ipnet::IpNet::V4(net))
    }
}

impl From<ipnet::Ipv6Net> for Remote {
    fn from(net: ipnet::Ipv6Net) -> Self {
        Remote::from(ipnet::IpNet::V6(net))
    }
}

impl From<IpAddr> for Remote {
    fn from(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Remote(Ok(Prefix { addr, len }))
    }
}

impl From<Prefix> for Remote {
    fn from(prefix: Prefix) -> Self {
        Remote(Ok(prefix))
    }
}

/// What an application asks to open: a protocol with a port or a port range, or an application
/// from the gateway's catalogue, with the options of the protocol.
///
/// Build one with [`Opening::tcp`], [`Opening::udp`], [`Opening::sctp`],
/// [`Opening::tcp_range`], [`Opening::udp_range`] or [`Opening::app`], then chain options.
/// Nothing is checked until [`Opening::check`] or [`crate::Client::open`], which run the
/// protocol's own validation (`fwnp_proto::validate`) before anything is sent, so a mistake is
/// reported precisely and never reaches the gateway.
///
/// Without [`Opening::lifetime`] the gateway's policy picks the lifetime; without
/// [`Opening::address`] the opening covers every address of the host, IPv4 and IPv6 alike, in
/// one lease ([`Opening::family`] or IPv4-only or IPv6-only [`Opening::from`] prefixes keep one
/// family); without [`Opening::from`] any remote address may connect, as policy allows.
///
/// ```
/// use std::time::Duration;
/// use fwnp_sdk::Opening;
///
/// let opening = Opening::tcp(8080)
///     .lifetime(Duration::from_secs(600))
///     .from("198.51.100.0/24")
///     .name("my-app");
/// assert!(opening.check().is_ok());
/// assert_eq!(opening.to_string(), "tcp/8080 from 198.51.100.0/24");
///
/// // Mistakes are found before the agent is asked.
/// assert!(Opening::tcp(0).check().is_err());
/// assert!(Opening::tcp(8080).from("198.51.100.7/24").check().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    target: Target,
    hosts: Vec<IpAddr>,
    family: Option<Family>,
    remotes: Vec<Remote>,
    lifetime: Option<Duration>,
    name: Option<String>,
}

impl Opening {
    fn ports(protocol: Protocol, first: u16, last: u16) -> Self {
        Opening {
            target: Target::Ports {
                protocol,
                ports: PortRange { first, last },
            },
            hosts: Vec::new(),
            family: None,
            remotes: Vec::new(),
            lifetime: None,
            name: None,
        }
    }

    /// One TCP port.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::tcp(8080);
    /// assert_eq!(opening.to_string(), "tcp/8080");
    /// ```
    pub fn tcp(port: u16) -> Self {
        Opening::ports(Protocol::Tcp, port, port)
    }

    /// One UDP port.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::udp(5353);
    /// assert_eq!(opening.to_string(), "udp/5353");
    /// ```
    pub fn udp(port: u16) -> Self {
        Opening::ports(Protocol::Udp, port, port)
    }

    /// One SCTP port.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::sctp(3868);
    /// assert_eq!(opening.to_string(), "sctp/3868");
    /// ```
    pub fn sctp(port: u16) -> Self {
        Opening::ports(Protocol::Sctp, port, port)
    }

    /// A range of TCP ports, both ends included.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::tcp_range(6000, 6010);
    /// assert_eq!(opening.to_string(), "tcp/6000-6010");
    /// assert!(fwnp_sdk::Opening::tcp_range(6010, 6000).check().is_err());
    /// ```
    pub fn tcp_range(first: u16, last: u16) -> Self {
        Opening::ports(Protocol::Tcp, first, last)
    }

    /// A range of UDP ports, both ends included.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::udp_range(60000, 60100);
    /// assert_eq!(opening.to_string(), "udp/60000-60100");
    /// ```
    pub fn udp_range(first: u16, last: u16) -> Self {
        Opening::ports(Protocol::Udp, first, last)
    }

    /// Any protocol FWNP/1 knows, with a port range (`first == last` for one port).
    ///
    /// ```
    /// use fwnp_sdk::Protocol;
    /// let opening = fwnp_sdk::Opening::protocol(Protocol::UdpLite, 7000, 7000);
    /// assert_eq!(opening.to_string(), "udplite/7000");
    /// ```
    pub fn protocol(protocol: Protocol, first: u16, last: u16) -> Self {
        Opening::ports(protocol, first, last)
    }

    /// An application from the gateway's catalogue, such as `https` (which the operator may
    /// define as `tcp/443` and `udp/443`). Ids are 1 to 64 bytes of `a-z 0-9 . _ -`.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::app("https");
    /// assert_eq!(opening.to_string(), "app:https");
    /// assert!(fwnp_sdk::Opening::app("HTTPS").check().is_err());
    /// ```
    pub fn app(id: impl Into<String>) -> Self {
        Opening {
            target: Target::App(id.into()),
            ..Opening::tcp(0)
        }
    }

    /// Only this remote network may connect; call it again to add more. Without any, every
    /// remote address may connect (as far as the gateway's policy allows). See [`Remote`] for
    /// what it accepts. Every prefix must be of the family of every [`Opening::address`]; with
    /// no address, the prefixes' family chooses the host's addresses of that family.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::tcp(22)
    ///     .from("198.51.100.0/24")
    ///     .from("203.0.113.9");
    /// assert_eq!(opening.to_string(), "tcp/22 from 198.51.100.0/24, 203.0.113.9/32");
    /// ```
    pub fn from(mut self, remote: impl Into<Remote>) -> Self {
        self.remotes.push(remote.into());
        self
    }

    /// The lifetime asked. The gateway clamps it to its policy (the granted lifetime is in
    /// [`crate::Lease::lifetime`]); the agent renews the lease for as long as it is held, so this
    /// is how long the opening outlives a host that stops renewing, not how long it lasts.
    /// Rounded up to whole seconds; zero asks for the policy's default; above seven days is
    /// an error.
    ///
    /// ```
    /// use std::time::Duration;
    /// let opening = fwnp_sdk::Opening::tcp(8080).lifetime(Duration::from_secs(600));
    /// assert!(opening.check().is_ok());
    /// assert!(fwnp_sdk::Opening::tcp(8080).lifetime(Duration::from_secs(8 * 86400)).check().is_err());
    /// ```
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// A host address to open; call it again to add more (at most 16, each once). Without
    /// any, the opening covers every address the host may open, of both families, in one
    /// lease. An address the host does not hold needs the operator's third-party rights.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::tcp(443).address("192.0.2.10".parse().unwrap());
    /// assert_eq!(opening.to_string(), "tcp/443 on 192.0.2.10");
    ///
    /// // Both families of a dual-stack host, named.
    /// let both = fwnp_sdk::Opening::tcp(443)
    ///     .address("192.0.2.10".parse().unwrap())
    ///     .address("2001:db8::10".parse().unwrap());
    /// assert_eq!(both.to_string(), "tcp/443 on 192.0.2.10, 2001:db8::10");
    /// assert!(both.check().is_ok());
    /// ```
    pub fn address(mut self, address: IpAddr) -> Self {
        self.hosts.push(address);
        self
    }

    /// Several host addresses at once, as [`Opening::address`] for each.
    ///
    /// ```
    /// use std::net::IpAddr;
    /// let addresses: [IpAddr; 2] = ["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap()];
    /// let opening = fwnp_sdk::Opening::tcp(443).addresses(addresses);
    /// assert_eq!(opening.to_string(), "tcp/443 on 192.0.2.10, 2001:db8::10");
    /// // The same address twice is refused before the agent is asked.
    /// assert!(fwnp_sdk::Opening::tcp(443).addresses([addresses[0], addresses[0]]).check().is_err());
    /// ```
    pub fn addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.hosts.extend(addresses);
        self
    }

    /// Which address family to open: with no [`Opening::address`], the host's addresses of
    /// this family only (the gateway refuses with address-mismatch if it has none); with
    /// addresses, the family they must all be of.
    ///
    /// ```
    /// use fwnp_sdk::Family;
    /// let opening = fwnp_sdk::Opening::tcp(443).family(Family::Ipv6).from("2001:db8::/32");
    /// assert!(opening.check().is_ok());
    /// assert_eq!(opening.to_string(), "tcp/443 over IPv6 from 2001:db8::/32");
    /// ```
    pub fn family(mut self, family: Family) -> Self {
        self.family = Some(family);
        self
    }

    /// The application's name, for the gateway's audit trail and `fwnpctl leases` (at most 256
    /// bytes). The agent carries it as the application's own label, in place of the command
    /// line it would record otherwise; what the agent can see for itself (executable, uid, pid)
    /// it fills in from the socket's peer credentials, whatever the application says.
    ///
    /// ```
    /// let opening = fwnp_sdk::Opening::tcp(8080).name("inventory-api");
    /// assert!(opening.check().is_ok());
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The lifetime asked, if any.
    ///
    /// ```
    /// use std::time::Duration;
    /// let opening = fwnp_sdk::Opening::tcp(1).lifetime(Duration::from_secs(5));
    /// assert_eq!(opening.lifetime_asked(), Some(Duration::from_secs(5)));
    /// ```
    pub fn lifetime_asked(&self) -> Option<Duration> {
        self.lifetime
    }

    /// What is asked: ports of a protocol, or an application id.
    ///
    /// ```
    /// use fwnp_sdk::Target;
    /// assert!(matches!(fwnp_sdk::Opening::app("ssh").target(), Target::App(id) if id == "ssh"));
    /// ```
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Checks the opening as the gateway would check its form, without asking anyone:
    /// ports, prefixes, families, the application id, the lifetime and the name.
    ///
    /// ```
    /// use fwnp_sdk::{Opening, OpeningError};
    /// assert!(matches!(Opening::udp(0).check(), Err(OpeningError::Invalid(_))));
    /// assert!(matches!(Opening::udp(53).from("dns.example").check(), Err(OpeningError::BadPrefix { .. })));
    /// ```
    pub fn check(&self) -> Result<(), OpeningError> {
        self.to_request().map(|_| ())
    }

    /// The protocol's opening, lifetime in seconds and application information, checked.
    pub(crate) fn to_request(
        &self,
    ) -> Result<(fwnp_proto::Opening, Option<u32>, Option<AppInfo>), OpeningError> {
        let remotes = self
            .remotes
            .iter()
            .map(Remote::prefix)
            .collect::<Result<Vec<_>, _>>()?;
        let opening = fwnp_proto::Opening {
            target: self.target.clone(),
            host: HostAddresses::from_addresses(self.hosts.clone()),
            family: self.family,
            remotes,
        };
        validate::validate_opening(&opening)?;
        let lifetime = match self.lifetime {
            None => None,
            Some(asked) => {
                let secs = asked.as_secs() + u64::from(asked.subsec_nanos() > 0);
                match u32::try_from(secs) {
                    Ok(secs) if secs <= MAX_LIFETIME_SECS => Some(secs),
                    _ => {
                        return Err(OpeningError::LifetimeTooLong {
                            asked,
                            max: MAX_LIFETIME_SECS,
                        });
                    }
                }
            }
        };
        let app = match &self.name {
            None => None,
            Some(name) if name.len() > MAX_APP_NAME_LEN => {
                return Err(OpeningError::NameTooLong {
                    len: name.len(),
                    max: MAX_APP_NAME_LEN,
                });
            }
            Some(name) => Some(AppInfo {
                name: Some(name.clone()),
                ..AppInfo::default()
            }),
        };
        // Measured with the largest request id, so that whatever id the client gives it, the
        // Open fits in a frame (local API 3): a longer one would cost the connection, and every
        // lease on it.
        let open = LocalMessage::Wire(Message::Open(Open {
            common: Common {
                request_id: Some(u64::MAX),
                critical: Vec::new(),
            },
            opening: opening.clone(),
            lifetime,
            app: app.clone(),
        }));
        let bytes = local::encode_body(&open).len();
        if bytes > local::MAX_FRAME_BODY_LEN {
            return Err(OpeningError::TooLarge {
                bytes,
                max: local::MAX_FRAME_BODY_LEN,
            });
        }
        Ok((opening, lifetime, app))
    }
}

impl fmt::Display for Opening {
    /// `tcp/8080`, `udp/5000-5010`, `app:https`, followed by ` on ADDRESS` and
    /// ` from PREFIX, PREFIX` when given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Ports { protocol, ports } => write!(f, "{protocol}/{ports}")?,
            Target::App(id) => write!(f, "app:{id}")?,
        }
        for (i, host) in self.hosts.iter().enumerate() {
            f.write_str(if i == 0 { " on " } else { ", " })?;
            write!(f, "{host}")?;
        }
        match self.family {
            Some(Family::Ipv4) => f.write_str(" over IPv4")?,
            Some(Family::Ipv6) => f.write_str(" over IPv6")?,
            None => {}
        }
        for (i, remote) in self.remotes.iter().enumerate() {
            f.write_str(if i == 0 { " from " } else { ", " })?;
            match &remote.0 {
                Ok(prefix) => write!(f, "{prefix}")?,
                Err(OpeningError::BadPrefix { text, .. }) => write!(f, "{text}")?,
                Err(_) => f.write_str("?")?,
            }
        }
        Ok(())
    }
}

impl FromStr for Opening {
    type Err = OpeningError;

    /// Reads what the `fwnp` command takes: `PROTOCOL/PORT`, `PROTOCOL/FIRST-LAST` (protocol
    /// `tcp`, `udp`, `sctp` or `udplite`), or `app:ID`. Only the form is read here; the rules
    /// (no port 0, no reversed range) are checked by [`Opening::check`].
    ///
    /// ```
    /// use fwnp_sdk::Opening;
    /// assert_eq!("tcp/8080".parse::<Opening>().unwrap(), Opening::tcp(8080));
    /// assert_eq!("udp/5000-5010".parse::<Opening>().unwrap(), Opening::udp_range(5000, 5010));
    /// assert_eq!("app:https".parse::<Opening>().unwrap(), Opening::app("https"));
    /// assert!("tcp".parse::<Opening>().is_err());
    /// assert!("icmp/1".parse::<Opening>().is_err());
    /// ```
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason| OpeningError::BadSpec {
            text: text.to_owned(),
            reason,
        };
        if let Some(id) = text.strip_prefix("app:") {
            return Ok(Opening::app(id));
        }
        let (protocol, ports) = text
            .split_once('/')
            .ok_or_else(|| bad("expected PROTOCOL/PORT"))?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            "udplite" => Protocol::UdpLite,
            _ => return Err(bad("the protocol is one of tcp, udp, sctp, udplite")),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| bad("a port is a number from 1 to 65535"))
        };
        let (first, last) = match ports.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        Ok(Opening::ports(protocol, first, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_with_and_without_length() {
        assert_eq!(
            Remote::from("198.51.100.0/24").prefix(),
            Ok(Prefix {
                addr: "198.51.100.0".parse().unwrap(),
                len: 24
            })
        );
        assert_eq!(Remote::from("2001:db8::1").prefix().unwrap().len, 128);
        assert!(matches!(
            Remote::from("198.51.100.0/x").prefix(),
            Err(OpeningError::BadPrefix { .. })
        ));
        assert!(matches!(
            Remote::from("2001:db8::/129").prefix(),
            Err(OpeningError::BadPrefix { .. })
        ));
    }

    #[test]
    fn check_reports_the_protocol_rule_broken() {
        assert_eq!(
            Opening::tcp_range(10, 9).check(),
            Err(OpeningError::Invalid(ValidationError::ReversedRange {
                first: 10,
                last: 9
            }))
        );
        // Host bits are refused as the prefix is read, naming the network probably meant.
        let err = Opening::tcp(1).from("10.0.0.1/8").check().unwrap_err();
        assert!(
            matches!(
                &err,
                OpeningError::BadPrefix {
                    reason: fwnp_proto::PrefixParseError::HostBitsSet { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
        assert!(matches!(
            Opening::tcp(1)
                .address("192.0.2.1".parse().unwrap())
                .from("2001:db8::/32")
                .check(),
            Err(OpeningError::Invalid(
                ValidationError::RemoteFamilyMismatch { .. }
            ))
        ));
        assert!(matches!(
            Opening::tcp(1).name("x".repeat(257)).check(),
            Err(OpeningError::NameTooLong { len: 257, .. })
        ));
    }

    /// An opening whose request would not fit in one frame is refused before it is sent: the
    /// agent would close the connection, and every lease on it would end.
    #[test]
    fn an_opening_too_large_for_one_frame_is_refused() {
        let with_remotes = |n: u32| {
            (0..n).fold(Opening::tcp(443), |o, i| {
                o.from(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            })
        };
        assert!(with_remotes(1_500).check().is_ok());
        let err = with_remotes(2_100).check().unwrap_err();
        match err {
            OpeningError::TooLarge { bytes, max } => {
                assert!(bytes > max && max == 16_384, "{bytes} {max}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn addresses_travel_as_one_or_a_list() {
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let (none, _, _) = Opening::tcp(1).to_request().unwrap();
        assert_eq!(none.host, HostAddresses::Default);
        let (one, _, _) = Opening::tcp(1).address(v6).to_request().unwrap();
        assert_eq!(one.host, HostAddresses::One(v6));
        let (two, _, _) = Opening::tcp(1)
            .address(v4)
            .address(v6)
            .to_request()
            .unwrap();
        assert_eq!(two.host, HostAddresses::List(vec![v4, v6]));
        assert!(matches!(
            Opening::tcp(1).address(v4).address(v4).check(),
            Err(OpeningError::Invalid(
                ValidationError::DuplicateHostAddress(_)
            ))
        ));
        assert!(matches!(
            Opening::tcp(1)
                .addresses((1..=17).map(|i| IpAddr::from([192, 0, 2, i])))
                .check(),
            Err(OpeningError::Invalid(ValidationError::HostAddressCount {
                count: 17,
                ..
            }))
        ));
        assert!(matches!(
            Opening::tcp(1)
                .address(v4)
                .address(v6)
                .family(Family::Ipv6)
                .check(),
            Err(OpeningError::Invalid(
                ValidationError::FamilyMismatch { .. }
            ))
        ));
    }

    #[test]
    fn lifetime_rounds_up_and_is_bounded() {
        let (_, lifetime, _) = Opening::tcp(1)
            .lifetime(Duration::from_millis(1500))
            .to_request()
            .unwrap();
        assert_eq!(lifetime, Some(2));
        let (_, lifetime, _) = Opening::tcp(1)
            .lifetime(Duration::from_secs(u64::from(MAX_LIFETIME_SECS)))
            .to_request()
            .unwrap();
        assert_eq!(lifetime, Some(MAX_LIFETIME_SECS));
        assert!(matches!(
            Opening::tcp(1)
                .lifetime(Duration::from_secs(u64::from(MAX_LIFETIME_SECS) + 1))
                .check(),
            Err(OpeningError::LifetimeTooLong { .. })
        ));
    }

    #[test]
    fn specs_parse() {
        assert_eq!("SCTP/3868".parse::<Opening>().unwrap(), Opening::sctp(3868));
        assert!("tcp/70000".parse::<Opening>().is_err());
        assert!("tcp/1-".parse::<Opening>().is_err());
        // The form is read; the rule (port 0) is the check's.
        assert!("tcp/0".parse::<Opening>().unwrap().check().is_err());
        // A range ending at 0 is named as reversed, in the same words as the policy's.
        let reversed = "udp/1-0".parse::<Opening>().unwrap().check().unwrap_err();
        assert_eq!(
            reversed,
            OpeningError::Invalid(ValidationError::ReversedRange { first: 1, last: 0 })
        );
        assert!(
            reversed
                .to_string()
                .contains("port range 1-0 is reversed: write 0-1"),
            "{reversed}"
        );
    }
}
