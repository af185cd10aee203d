//! The messages of FWNP/1, as `spec/fwnp.cddl` defines them.
//!
//! These are plain values: [`crate::codec`] turns them into CBOR and back, [`crate::validate`]
//! checks the rules the schema cannot express.

use std::net::IpAddr;

/// The only protocol version this crate speaks.
pub const VERSION: u16 = 1;

/// The ALPN protocol id of FWNP/1 over QUIC.
pub const ALPN: &[u8] = b"fwnp/1";

/// Largest encoded message a peer must accept, in bytes.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024;

/// Deepest nesting of arrays and maps a decoder accepts (the message map is depth 1).
pub const MAX_NESTING_DEPTH: usize = 8;

/// Largest lifetime a request may ask for: seven days. Larger asks are refused with
/// [`ResultCode::LifetimeOutOfRange`]; smaller ones are clamped to policy.
pub const MAX_LIFETIME_SECS: u32 = 7 * 24 * 3600;

/// First key available to extensions; keys below it are assigned by the specification.
pub const FIRST_EXTENSION_KEY: u64 = 64;

/// The most host addresses one opening may name (key 4 as an array). One per address family a
/// host may serve on, with room for hosts that hold several of each.
pub const MAX_HOST_ADDRESSES: usize = 16;

/// The most allowed addresses a host's certificate may name (spec Section 4.2): Welcome key 9
/// lists them all, and an answer must fit in [`MAX_MESSAGE_SIZE`] (256 IPv6 addresses take
/// some 4.6 KB). A certificate naming more names no usable identity.
pub const MAX_ALLOWED_ADDRESSES: usize = 256;

/// A lease's identifier: 128 opaque bits chosen by the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub [u8; 16]);

impl std::fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LeaseId {
    type Err = ParseLeaseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(ParseLeaseIdError);
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ParseLeaseIdError)?;
        }
        Ok(LeaseId(id))
    }
}

/// A lease id that is not 32 hexadecimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a lease id is 32 hexadecimal digits")]
pub struct ParseLeaseIdError;

/// Identifies one lifetime of the gateway's lease state; it changes only when state was lost.
pub type Epoch = u64;

/// Transport protocols an opening may name, by their IANA protocol numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Protocol {
    /// TCP, 6.
    Tcp,
    /// UDP, 17.
    Udp,
    /// SCTP, 132.
    Sctp,
    /// UDP-Lite, 136.
    UdpLite,
}

impl Protocol {
    /// The IANA protocol number, as carried on the wire and in the kernel.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::UdpLite => 136,
        }
    }

    /// The protocol with this IANA number, if FWNP/1 knows it.
    pub fn from_number(n: u64) -> Option<Self> {
        Some(match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            136 => Protocol::UdpLite,
            _ => return None,
        })
    }

    /// The lower-case name used in policy files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
            Protocol::UdpLite => "udplite",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An address family, for an opening that names no address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, 4 on the wire.
    Ipv4,
    /// IPv6, 6 on the wire.
    Ipv6,
}

impl Family {
    /// The number on the wire (key 5 of an opening).
    pub fn number(self) -> u64 {
        match self {
            Family::Ipv4 => 4,
            Family::Ipv6 => 6,
        }
    }

    /// The family with this number, if FWNP/1 defines it.
    pub fn from_number(n: u64) -> Option<Self> {
        match n {
            4 => Some(Family::Ipv4),
            6 => Some(Family::Ipv6),
            _ => None,
        }
    }

    /// The family of an address.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

/// An inclusive range of ports; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// The first port of the range.
    pub first: u16,
    /// The last port of the range, at least `first` once validated.
    pub last: u16,
}

impl PortRange {
    /// One port.
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// How many ports the range holds (0 only for a reversed range).
    pub fn len(&self) -> u32 {
        (u32::from(self.last) + 1).saturating_sub(u32::from(self.first))
    }

    /// Whether the range is reversed and so holds no port.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// Whether `other` lies entirely within this range.
    pub fn contains_range(&self, other: &PortRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A remote network allowed to connect: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length, at most 32 for IPv4 and 128 for IPv6 once validated.
    pub len: u8,
}

impl Prefix {
    /// The number of bits of its address: 32 for IPv4, 128 for IPv6.
    pub fn address_bits(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// The prefix with every bit of its address beyond its length cleared: the network it
    /// names (`10.1.2.3/16` gives `10.1.0.0/16`). A length beyond the address counts as all of it.
    ///
    /// ```
    /// use fwnp_proto::Prefix;
    /// let p = Prefix { addr: "10.1.2.3".parse().unwrap(), len: 16 };
    /// assert_eq!(p.network().to_string(), "10.1.0.0/16");
    /// ```
    pub fn network(&self) -> Prefix {
        let keep = u32::from(self.len.min(self.address_bits()));
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - keep).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Prefix {
            addr,
            len: self.len,
        }
    }
}

/// Why a text is not a prefix ([`Prefix`]'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrefixParseError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
    /// The length part is not a number.
    #[error("the prefix length {0:?} is not a number")]
    BadLength(String),
    /// The length is longer than the address.
    #[error("a prefix length of {len} is longer than the {max} bits of the address")]
    LengthTooLong {
        /// The length written.
        len: u32,
        /// 32 or 128.
        max: u8,
    },
    /// Bits beyond the length are set.
    #[error("host bits are set beyond the prefix length (the network is {network})")]
    HostBitsSet {
        /// The prefix with the host bits cleared, which the writer probably meant.
        network: Prefix,
    },
}

impl std::str::FromStr for Prefix {
    type Err = PrefixParseError;

    /// Reads `ADDRESS/LENGTH` (`10.0.0.0/8`, `2001:db8::/32`) or a bare address, which means
    /// that one address (`/32` or `/128`). Bits beyond the length must be zero, as the protocol
    /// requires (spec section 9.4): `10.0.0.1/24` is refused, since it usually hides a typing
    /// mistake. This is the one reading of a prefix for every file and command line of FWNP.
    ///
    /// ```
    /// use fwnp_proto::{Prefix, PrefixParseError};
    /// assert_eq!("198.51.100.0/24".parse::<Prefix>().unwrap().len, 24);
    /// assert_eq!("2001:db8::1".parse::<Prefix>().unwrap().len, 128);
    /// assert!(matches!(
    ///     "10.0.0.1/24".parse::<Prefix>(),
    ///     Err(PrefixParseError::HostBitsSet { .. })
    /// ));
    /// ```
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| PrefixParseError::NotAnAddress(addr_text.to_owned()))?;
        let max = Prefix { addr, len: 0 }.address_bits();
        let len = match len_text {
            None => max,
            Some(len_text) => {
                if len_text.is_empty() || !len_text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(PrefixParseError::BadLength(len_text.to_owned()));
                }
                let len: u32 = len_text
                    .parse()
                    .map_err(|_| PrefixParseError::BadLength(len_text.to_owned()))?;
                if len > u32::from(max) {
                    return Err(PrefixParseError::LengthTooLong { len, max });
                }
                u8::try_from(len).map_err(|_| PrefixParseError::LengthTooLong { len, max })?
            }
        };
        let prefix = Prefix { addr, len };
        let network = prefix.network();
        if network != prefix {
            return Err(PrefixParseError::HostBitsSet { network });
        }
        Ok(prefix)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What is to be opened: a protocol with ports, or an application from the gateway's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A protocol and a port or port range (keys 1, 2 and 3).
    Ports {
        /// The transport protocol.
        protocol: Protocol,
        /// The port or ports.
        ports: PortRange,
    },
    /// An application id (key 7).
    App(String),
}

/// The host addresses an opening names (key 4), kept in the form they travel in, so that
/// validation can refuse the array forms the protocol does not allow (empty, one address,
/// more than [`MAX_HOST_ADDRESSES`], duplicates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum HostAddresses {
    /// No key 4: every allowed address of the host, narrowed by family (spec section 9.2).
    #[default]
    Default,
    /// One address, written as a byte string.
    One(IpAddr),
    /// Several addresses, written as an array (2 to [`MAX_HOST_ADDRESSES`] distinct ones once
    /// validated).
    List(Vec<IpAddr>),
}

impl HostAddresses {
    /// The canonical form of these addresses: none is [`HostAddresses::Default`], one is
    /// [`HostAddresses::One`], more is [`HostAddresses::List`] (in the order given).
    pub fn from_addresses(addresses: Vec<IpAddr>) -> Self {
        match addresses.as_slice() {
            [] => HostAddresses::Default,
            [one] => HostAddresses::One(*one),
            _ => HostAddresses::List(addresses),
        }
    }

    /// The addresses named; empty for [`HostAddresses::Default`].
    pub fn addresses(&self) -> &[IpAddr] {
        match self {
            HostAddresses::Default => &[],
            HostAddresses::One(one) => std::slice::from_ref(one),
            HostAddresses::List(list) => list,
        }
    }

    /// Whether no address is named (key 4 absent).
    pub fn is_default(&self) -> bool {
        matches!(self, HostAddresses::Default)
    }
}

impl From<IpAddr> for HostAddresses {
    fn from(addr: IpAddr) -> Self {
        HostAddresses::One(addr)
    }
}

impl From<Option<IpAddr>> for HostAddresses {
    fn from(addr: Option<IpAddr>) -> Self {
        addr.map_or(HostAddresses::Default, HostAddresses::One)
    }
}

/// What a host asks to open (the CDDL `opening`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Opening {
    /// Ports or an application.
    pub target: Target,
    /// The host addresses to open (key 4); [`HostAddresses::Default`] means the default of the
    /// spec: every allowed address of the family asked.
    pub host: HostAddresses,
    /// Which family (key 5): with no host address, which of the host's addresses; with some,
    /// the family they must all be of.
    pub family: Option<Family>,
    /// Only these remote prefixes may connect (key 6); empty means any.
    pub remotes: Vec<Prefix>,
}

impl Opening {
    /// The capability bits (spec Section 14) this opening uses, for a host whose allowed
    /// addresses are `allowed`: a client may not send it unless the gateway's Welcome set them
    /// all.
    ///
    /// ```
    /// use fwnp_proto::{Capabilities, HostAddresses, Opening, PortRange, Protocol, Target};
    ///
    /// let own: std::net::IpAddr = "192.0.2.10".parse().unwrap();
    /// let mut opening = Opening {
    ///     target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange { first: 8000, last: 8010 } },
    ///     host: HostAddresses::One(own),
    ///     family: None,
    ///     remotes: Vec::new(),
    /// };
    /// assert_eq!(opening.capabilities_used(&[own]), Capabilities::PORT_RANGES);
    /// opening.host = HostAddresses::One("192.0.2.99".parse().unwrap());
    /// assert_eq!(
    ///     opening.capabilities_used(&[own]),
    ///     Capabilities::PORT_RANGES | Capabilities::THIRD_PARTY
    /// );
    /// ```
    pub fn capabilities_used(&self, allowed: &[IpAddr]) -> u64 {
        let mut used = 0;
        match &self.target {
            Target::Ports { ports, .. } if ports.first != ports.last => {
                used |= Capabilities::PORT_RANGES;
            }
            Target::Ports { .. } => {}
            Target::App(_) => used |= Capabilities::APPLICATIONS,
        }
        if !self.remotes.is_empty() {
            used |= Capabilities::REMOTE_PREFIXES;
        }
        if self.host.addresses().iter().any(|a| !allowed.contains(a)) {
            used |= Capabilities::THIRD_PARTY;
        }
        used
    }
}

/// One concrete entry of what the gateway granted (the CDDL `grant`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    /// The transport protocol.
    pub protocol: Protocol,
    /// The port or ports.
    pub ports: PortRange,
    /// The host address opened.
    pub host: IpAddr,
    /// Only these remote prefixes may connect; empty means any.
    pub remotes: Vec<Prefix>,
    /// The application this entry was expanded from, if any.
    pub app: Option<String>,
}

impl std::fmt::Display for Grant {
    /// `tcp/7000 on 198.18.1.2`, then ` from PREFIX, PREFIX` when the remotes are restricted and
    /// ` (app ID)` when the grant stands for an application: what operators read in every tool.
    ///
    /// ```
    /// use fwnp_proto::{Grant, PortRange, Prefix, Protocol};
    /// let grant = Grant {
    ///     protocol: Protocol::Tcp,
    ///     ports: PortRange::single(7000),
    ///     host: "198.18.1.2".parse().unwrap(),
    ///     remotes: vec![Prefix { addr: "198.18.0.0".parse().unwrap(), len: 24 }],
    ///     app: None,
    /// };
    /// assert_eq!(grant.to_string(), "tcp/7000 on 198.18.1.2 from 198.18.0.0/24");
    /// ```
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.protocol, self.ports, self.host)?;
        for (i, prefix) in self.remotes.iter().enumerate() {
            f.write_str(if i == 0 { " from " } else { ", " })?;
            write!(f, "{prefix}")?;
        }
        if let Some(app) = &self.app {
            write!(f, " (app {app})")?;
        }
        Ok(())
    }
}

/// What the host tells about the application, for audit (the CDDL `app-info`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AppInfo {
    /// The application's name.
    pub name: Option<String>,
    /// The executable's path.
    pub executable: Option<String>,
    /// The user id it runs as.
    pub uid: Option<u32>,
    /// Its process id.
    pub pid: Option<u32>,
}

/// Capability bits exchanged in Hello and Welcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Port ranges in openings.
    pub const PORT_RANGES: u64 = 1 << 0;
    /// Remote prefixes in openings.
    pub const REMOTE_PREFIXES: u64 = 1 << 1;
    /// Application ids in openings.
    pub const APPLICATIONS: u64 = 1 << 2;
    /// Notices on gateway-opened unidirectional streams.
    pub const NOTICES: u64 = 1 << 3;
    /// Third-party requests (a host address the host does not hold).
    pub const THIRD_PARTY: u64 = 1 << 4;
    /// Everything this version defines.
    pub const ALL: u64 = 0b1_1111;

    /// Whether every bit of `flags` is set.
    pub fn has(self, flags: u64) -> bool {
        self.0 & flags == flags
    }
}

/// Keys every message may carry (CDDL `common`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Common {
    /// Request id chosen by the client and echoed in the answer (key 1).
    pub request_id: Option<u64>,
    /// Keys the receiver must understand (key 2). A decoded message only keeps those this
    /// implementation understands; the decoder refuses the others.
    pub critical: Vec<u64>,
}

/// Hello, type 1: the first request of every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Common keys.
    pub common: Common,
    /// Versions the client speaks, most preferred first.
    pub versions: Vec<u16>,
    /// Capabilities the client supports.
    pub capabilities: Capabilities,
    /// Software name and version.
    pub software: Option<String>,
}

/// Limits the gateway announces in Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message the gateway accepts, in bytes.
    pub max_message_size: u32,
    /// Concurrent request streams per connection.
    pub max_streams: u32,
    /// Smallest lifetime the gateway grants.
    pub min_lifetime: u32,
    /// Largest lifetime the gateway grants.
    pub max_lifetime: u32,
    /// Concurrent leases this host may hold, if limited.
    pub max_leases: Option<u32>,
}

/// Welcome, type 2: the answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Common keys.
    pub common: Common,
    /// The version chosen.
    pub version: u16,
    /// Capabilities the gateway supports for this host.
    pub capabilities: Capabilities,
    /// The gateway's limits.
    pub limits: Limits,
    /// The gateway's epoch.
    pub epoch: Epoch,
    /// The gateway's time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The identity the gateway authenticated.
    pub identity: String,
    /// The addresses this host may open without third-party rights.
    pub addresses: Vec<IpAddr>,
}

/// Open, type 3: ask for an opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Common keys.
    pub common: Common,
    /// What to open.
    pub opening: Opening,
    /// The lifetime asked, in seconds; `None` or 0 asks for the policy's default.
    pub lifetime: Option<u32>,
    /// What the host tells about the application.
    pub app: Option<AppInfo>,
}

/// Renew, type 4: extend a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renew {
    /// Common keys.
    pub common: Common,
    /// The lease to renew.
    pub lease: LeaseId,
    /// The lifetime asked, in seconds; `None` or 0 asks for the lease's own lifetime.
    pub lifetime: Option<u32>,
}

/// Release, type 5: end a lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Common keys.
    pub common: Common,
    /// The lease to release.
    pub lease: LeaseId,
}

/// List, type 6: ask for the host's live leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List {
    /// Common keys.
    pub common: Common,
}

/// Granted, type 16: the answer to a successful Open or Renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// Common keys.
    pub common: Common,
    /// The lease.
    pub lease: LeaseId,
    /// What was granted, one entry per protocol and port range.
    pub grants: Vec<Grant>,
    /// The lifetime granted, in seconds.
    pub lifetime: u32,
    /// Expiry on the gateway's clock, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Renew after this many seconds.
    pub renew_after: u32,
    /// The gateway's epoch.
    pub epoch: Epoch,
    /// Whether the grant is narrower than what was asked.
    pub narrowed: bool,
}

/// Denied, type 17: the answer to a request that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// Common keys.
    pub common: Common,
    /// Why.
    pub code: ResultCode,
    /// A human-readable reason.
    pub reason: Option<String>,
    /// Retry after this many seconds.
    pub retry_after: Option<u32>,
    /// The lease the request named.
    pub lease: Option<LeaseId>,
    /// The critical keys that were not understood.
    pub unsupported: Vec<u64>,
}

/// One live lease in a Leases answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease.
    pub lease: LeaseId,
    /// What it grants.
    pub grants: Vec<Grant>,
    /// Remaining lifetime, in seconds.
    pub remaining: u32,
    /// Expiry on the gateway's clock, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// What the host told about the application when it asked.
    pub app: Option<AppInfo>,
}

/// Leases, type 18: the answer to List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leases {
    /// Common keys.
    pub common: Common,
    /// The host's live leases.
    pub leases: Vec<LeaseInfo>,
    /// The gateway's epoch.
    pub epoch: Epoch,
}

/// Released, type 19: the answer to a successful Release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Common keys.
    pub common: Common,
    /// The lease released.
    pub lease: LeaseId,
}

/// Why the gateway revoked a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevokeReason {
    /// An operator revoked it, 1.
    Operator,
    /// The policy changed and no longer allows it, 2.
    PolicyChanged,
    /// The host's credential was revoked, 3.
    CredentialRevoked,
    /// The gateway needed the resources, 4.
    ResourcePressure,
}

impl RevokeReason {
    /// The number on the wire.
    pub fn number(self) -> u64 {
        match self {
            RevokeReason::Operator => 1,
            RevokeReason::PolicyChanged => 2,
            RevokeReason::CredentialRevoked => 3,
            RevokeReason::ResourcePressure => 4,
        }
    }

    /// The reason with this number, if FWNP/1 defines it.
    pub fn from_number(n: u64) -> Option<Self> {
        Some(match n {
            1 => RevokeReason::Operator,
            2 => RevokeReason::PolicyChanged,
            3 => RevokeReason::CredentialRevoked,
            4 => RevokeReason::ResourcePressure,
            _ => return None,
        })
    }
}

/// Revoked, type 32: a notice that the gateway ended a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Common keys.
    pub common: Common,
    /// The lease revoked.
    pub lease: LeaseId,
    /// Why.
    pub reason: RevokeReason,
    /// A human-readable explanation.
    pub text: Option<String>,
}

/// EpochChanged, type 33: a notice that the gateway lost its lease state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochChanged {
    /// Common keys.
    pub common: Common,
    /// The new epoch.
    pub epoch: Epoch,
}

/// GoingAway, type 34: a notice that the gateway is about to close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoingAway {
    /// Common keys.
    pub common: Common,
    /// Reconnect after this many seconds.
    pub reconnect_after: Option<u32>,
    /// A human-readable reason.
    pub reason: Option<String>,
}

/// Every FWNP/1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Open(Open),
    Renew(Renew),
    Release(Release),
    List(List),
    Granted(Granted),
    Denied(Denied),
    Leases(Leases),
    Released(Released),
    Revoked(Revoked),
    EpochChanged(EpochChanged),
    GoingAway(GoingAway),
}

/// The message type numbers (key 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum MessageType {
    Hello = 1,
    Welcome = 2,
    Open = 3,
    Renew = 4,
    Release = 5,
    List = 6,
    Granted = 16,
    Denied = 17,
    Leases = 18,
    Released = 19,
    Revoked = 32,
    EpochChanged = 33,
    GoingAway = 34,
}

impl MessageType {
    /// The type with this number, if FWNP/1 defines it.
    pub fn from_number(n: u64) -> Option<Self> {
        use MessageType::*;
        Some(match n {
            1 => Hello,
            2 => Welcome,
            3 => Open,
            4 => Renew,
            5 => Release,
            6 => List,
            16 => Granted,
            17 => Denied,
            18 => Leases,
            19 => Released,
            32 => Revoked,
            33 => EpochChanged,
            34 => GoingAway,
            _ => return None,
        })
    }
}

impl MessageType {
    /// The message's name in the specification (`hello`, `epoch-changed`...).
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "hello",
            MessageType::Welcome => "welcome",
            MessageType::Open => "open",
            MessageType::Renew => "renew",
            MessageType::Release => "release",
            MessageType::List => "list",
            MessageType::Granted => "granted",
            MessageType::Denied => "denied",
            MessageType::Leases => "leases",
            MessageType::Released => "released",
            MessageType::Revoked => "revoked",
            MessageType::EpochChanged => "epoch-changed",
            MessageType::GoingAway => "going-away",
        }
    }

    /// The number on the wire (key 0).
    pub fn number(self) -> u64 {
        self as u64
    }

    /// The highest top-level key FWNP/1 defines for this type; every key up to it is known.
    pub fn highest_known_key(self) -> u64 {
        match self {
            MessageType::Hello => 5,
            MessageType::Welcome => 9,
            MessageType::Open => 5,
            MessageType::Renew => 4,
            MessageType::Release => 3,
            MessageType::List => 2,
            MessageType::Granted => 9,
            MessageType::Denied => 7,
            MessageType::Leases => 4,
            MessageType::Released => 3,
            MessageType::Revoked => 5,
            MessageType::EpochChanged => 3,
            MessageType::GoingAway => 4,
        }
    }

    /// Whether a client sends this message to the gateway.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            MessageType::Hello
                | MessageType::Open
                | MessageType::Renew
                | MessageType::Release
                | MessageType::List
        )
    }

    /// Whether the gateway sends this message as a notice on a unidirectional stream.
    pub fn is_notice(self) -> bool {
        matches!(
            self,
            MessageType::Revoked | MessageType::EpochChanged | MessageType::GoingAway
        )
    }
}

impl Message {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Welcome(_) => MessageType::Welcome,
            Message::Open(_) => MessageType::Open,
            Message::Renew(_) => MessageType::Renew,
            Message::Release(_) => MessageType::Release,
            Message::List(_) => MessageType::List,
            Message::Granted(_) => MessageType::Granted,
            Message::Denied(_) => MessageType::Denied,
            Message::Leases(_) => MessageType::Leases,
            Message::Released(_) => MessageType::Released,
            Message::Revoked(_) => MessageType::Revoked,
            Message::EpochChanged(_) => MessageType::EpochChanged,
            Message::GoingAway(_) => MessageType::GoingAway,
        }
    }

    /// The common keys of the message.
    pub fn common(&self) -> &Common {
        match self {
            Message::Hello(m) => &m.common,
            Message::Welcome(m) => &m.common,
            Message::Open(m) => &m.common,
            Message::Renew(m) => &m.common,
            Message::Release(m) => &m.common,
            Message::List(m) => &m.common,
            Message::Granted(m) => &m.common,
            Message::Denied(m) => &m.common,
            Message::Leases(m) => &m.common,
            Message::Released(m) => &m.common,
            Message::Revoked(m) => &m.common,
            Message::EpochChanged(m) => &m.common,
            Message::GoingAway(m) => &m.common,
        }
    }
}

/// Result codes carried by Denied (key 3), with what a client should do about each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResultCode {
    /// 1: no version in common; the connection is then closed.
    UnsupportedVersion,
    /// 2: not a well-formed request; do not retry unchanged.
    MalformedRequest,
    /// 3: a critical key was not understood; retry without it.
    UnsupportedOption,
    /// 4: an option is malformed (a bad prefix, a reversed range); correct it.
    MalformedOption,
    /// 5: this host may not make this request at all.
    NotAuthorized,
    /// 6: the host address is not one the host holds, and it has no third-party rights.
    AddressMismatch,
    /// 7: policy does not allow this opening; the reason says which rule.
    DeniedByPolicy,
    /// 8: the gateway is out of resources; retry after the hint.
    NoResources,
    /// 9: the host holds as many leases as policy allows; release one first.
    QuotaExceeded,
    /// 10: too many requests; retry after the hint.
    RateLimited,
    /// 11: no such lease for this host; open anew.
    UnknownLease,
    /// 12: the lifetime asked is above the protocol's maximum.
    LifetimeOutOfRange,
    /// 13: the application id is not in the gateway's catalogue.
    UnknownApplication,
    /// 14: a request came before Hello on this connection.
    HelloRequired,
}

impl ResultCode {
    /// Every code, in number order.
    pub const ALL: [ResultCode; 14] = [
        ResultCode::UnsupportedVersion,
        ResultCode::MalformedRequest,
        ResultCode::UnsupportedOption,
        ResultCode::MalformedOption,
        ResultCode::NotAuthorized,
        ResultCode::AddressMismatch,
        ResultCode::DeniedByPolicy,
        ResultCode::NoResources,
        ResultCode::QuotaExceeded,
        ResultCode::RateLimited,
        ResultCode::UnknownLease,
        ResultCode::LifetimeOutOfRange,
        ResultCode::UnknownApplication,
        ResultCode::HelloRequired,
    ];

    /// The number on the wire.
    pub fn number(self) -> u64 {
        match self {
            ResultCode::UnsupportedVersion => 1,
            ResultCode::MalformedRequest => 2,
            ResultCode::UnsupportedOption => 3,
            ResultCode::MalformedOption => 4,
            ResultCode::NotAuthorized => 5,
            ResultCode::AddressMismatch => 6,
            ResultCode::DeniedByPolicy => 7,
            ResultCode::NoResources => 8,
            ResultCode::QuotaExceeded => 9,
            ResultCode::RateLimited => 10,
            ResultCode::UnknownLease => 11,
            ResultCode::LifetimeOutOfRange => 12,
            ResultCode::UnknownApplication => 13,
            ResultCode::HelloRequired => 14,
        }
    }

    /// The code with this number, if FWNP/1 defines it.
    pub fn from_number(n: u64) -> Option<Self> {
        ResultCode::ALL.into_iter().find(|c| c.number() == n)
    }

    /// The name used in the specification's registry and in the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            ResultCode::UnsupportedVersion => "unsupported-version",
            ResultCode::MalformedRequest => "malformed-request",
            ResultCode::UnsupportedOption => "unsupported-option",
            ResultCode::MalformedOption => "malformed-option",
            ResultCode::NotAuthorized => "not-authorized",
            ResultCode::AddressMismatch => "address-mismatch",
            ResultCode::DeniedByPolicy => "denied-by-policy",
            ResultCode::NoResources => "no-resources",
            ResultCode::QuotaExceeded => "quota-exceeded",
            ResultCode::RateLimited => "rate-limited",
            ResultCode::UnknownLease => "unknown-lease",
            ResultCode::LifetimeOutOfRange => "lifetime-out-of-range",
            ResultCode::UnknownApplication => "unknown-application",
            ResultCode::HelloRequired => "hello-required",
        }
    }

    /// Whether the same request may succeed later without change.
    pub fn is_transient(self) -> bool {
        matches!(self, ResultCode::NoResources | ResultCode::RateLimited)
    }
}

impl std::fmt::Display for ResultCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// QUIC application error codes, for closing a stream or the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuicErrorCode {
    /// 0x0: orderly close.
    NoError,
    /// 0x1: the peer broke a rule of the framing (a second item, a wrong stream direction).
    ProtocolViolation,
    /// 0x2: a message over the size limit.
    MessageTooLarge,
    /// 0x3: the sender failed internally.
    InternalError,
    /// 0x4: the gateway is shutting down.
    GoingAway,
    /// 0x5: no version in common.
    VersionMismatch,
    /// 0x6: a request stream was not finished in time.
    RequestTimeout,
    /// 0x7: too many connections or streams.
    ExcessiveLoad,
}

impl QuicErrorCode {
    /// The code on the wire.
    pub fn code(self) -> u32 {
        match self {
            QuicErrorCode::NoError => 0x0,
            QuicErrorCode::ProtocolViolation => 0x1,
            QuicErrorCode::MessageTooLarge => 0x2,
            QuicErrorCode::InternalError => 0x3,
            QuicErrorCode::GoingAway => 0x4,
            QuicErrorCode::VersionMismatch => 0x5,
            QuicErrorCode::RequestTimeout => 0x6,
            QuicErrorCode::ExcessiveLoad => 0x7,
        }
    }

    /// The code with this number, if FWNP/1 defines it.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0x0 => QuicErrorCode::NoError,
            0x1 => QuicErrorCode::ProtocolViolation,
            0x2 => QuicErrorCode::MessageTooLarge,
            0x3 => QuicErrorCode::InternalError,
            0x4 => QuicErrorCode::GoingAway,
            0x5 => QuicErrorCode::VersionMismatch,
            0x6 => QuicErrorCode::RequestTimeout,
            0x7 => QuicErrorCode::ExcessiveLoad,
            _ => return None,
        })
    }
}
