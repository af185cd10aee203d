//! The small textual forms of the policy file, each with a parser and a printer: durations
//! (`"1h30m"`), prefixes (`"10.0.0.0/8"`), opening items (`"tcp/443"`, `"udp/5000-5100"`,
//! `"app:https"`) and names. `fwnpctl` uses the same parsers for its command-line arguments,
//! so an operator writes the same text on the command line and in the file.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use fwnp_proto::message::{PortRange, Prefix, Protocol, Target};

/// Largest length, in bytes, of a group or rule name.
pub const MAX_NAME_LEN: usize = 64;

/// Largest length, in bytes, of an application id (as the protocol allows).
pub const MAX_APP_ID_LEN: usize = 64;

/// Durations are read and printed as everywhere in FWNP (`fwnp_proto::duration`): `parse_duration`
/// gives whole seconds, and `format_duration` prints the shortest text it reads back.
pub use fwnp_proto::duration::{
    DurationError, format_secs as format_duration, parse_secs as parse_duration,
};

/// Why a prefix does not parse: the protocol crate's reading of a prefix, the one every file
/// and command line of FWNP uses.
pub use fwnp_proto::PrefixParseError as PrefixError;

/// Parses `ADDRESS/LENGTH` (`"10.0.0.0/8"`, `"2001:db8::/32"`) or a bare address, which means
/// the one address (`/32` or `/128`). Bits beyond the length must be zero: `10.0.0.1/24` is
/// refused, since it usually hides a typing mistake.
pub fn parse_prefix(text: &str) -> Result<Prefix, PrefixError> {
    text.parse()
}

fn address_bits(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// A prefix compiled for fast matching: the family, the network bits and the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Net {
    v6: bool,
    bits: u128,
    len: u8,
}

impl Net {
    /// Compiles a prefix; bits beyond the length are cleared and an over-long length is
    /// treated as the full address, so any value compiles.
    pub(crate) fn from_prefix(prefix: &Prefix) -> Net {
        let addr = prefix.addr;
        let width = address_bits(addr);
        let len = prefix.len.min(width);
        let (v6, raw) = match addr {
            IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (true, u128::from(v6)),
        };
        Net {
            v6,
            bits: raw & mask(len, width),
            len,
        }
    }

    fn width(&self) -> u8 {
        if self.v6 { 128 } else { 32 }
    }

    /// The prefix this net stands for.
    pub(crate) fn to_prefix(self) -> Prefix {
        let addr = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.bits))
        } else {
            // The bits of an IPv4 net are at most 32 wide by construction.
            IpAddr::V4(Ipv4Addr::from(u32::try_from(self.bits).unwrap_or(0)))
        };
        Prefix {
            addr,
            len: self.len,
        }
    }

    /// Whether the prefix this was compiled from had bits set beyond its length.
    pub(crate) fn had_host_bits(prefix: &Prefix) -> bool {
        Net::from_prefix(prefix).to_prefix() != *prefix
    }

    /// Whether the address lies in this net. IPv4-mapped IPv6 addresses count as IPv4.
    pub(crate) fn contains_addr(&self, addr: IpAddr) -> bool {
        let (v6, raw) = match addr.to_canonical() {
            IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (true, u128::from(v6)),
        };
        v6 == self.v6 && raw & mask(self.len, self.width()) == self.bits
    }

    /// Whether `other` lies entirely within this net.
    pub(crate) fn contains_net(&self, other: &Net) -> bool {
        other.v6 == self.v6
            && other.len >= self.len
            && other.bits & mask(self.len, self.width()) == self.bits
    }

    /// Whether the two nets share at least one address.
    pub(crate) fn overlaps(&self, other: &Net) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }

    /// Whether the net is of the address's family.
    pub(crate) fn same_family(&self, addr: IpAddr) -> bool {
        matches!(addr.to_canonical(), IpAddr::V6(_)) == self.v6
    }
}

/// The mask of the first `len` bits of a `width`-bit address, in the low bits of a u128.
fn mask(len: u8, width: u8) -> u128 {
    let len = u32::from(len.min(width));
    let width = u32::from(width);
    if len == 0 {
        return 0;
    }
    let all: u128 = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    if len >= width {
        return all;
    }
    // 1 <= len < width <= 128 here, so the shift is at most 127.
    all & !(all >> len)
}

/// Why an opening item does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ItemError {
    /// The text is empty.
    #[error("an item cannot be empty: write \"tcp/443\", \"udp/5000-5100\" or \"app:NAME\"")]
    Empty,
    /// No `/` between protocol and ports.
    #[error("expected PROTOCOL/PORTS (\"tcp/443\") or app:NAME")]
    MissingPorts,
    /// A protocol FWNP/1 does not know.
    #[error("unknown protocol {0:?}: the protocols are tcp, udp, sctp and udplite")]
    UnknownProtocol(String),
    /// A port that is not a number from 1 to 65535.
    #[error("{0:?} is not a port number from 1 to 65535")]
    BadPort(String),
    /// Port 0.
    #[error("port 0 cannot be opened: ports run from 1 to 65535")]
    PortZero,
    /// A range whose last port is below its first.
    #[error("port range {first}-{last} is reversed: write {last}-{first}")]
    ReversedRange {
        /// The first port written.
        first: u16,
        /// The last port written.
        last: u16,
    },
    /// An application id with characters outside `[a-z0-9._-]` or of the wrong length.
    #[error("{0:?} is not an application id: 1 to 64 characters of a-z 0-9 . _ -")]
    BadAppId(String),
}

/// One thing a rule allows or denies, or one entry of the application catalogue: a protocol
/// with a port or port range, or (in rules only) an application id from the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Item {
    /// `tcp/443`, `udp/5000-5100`, `tcp/*` (all ports, 1-65535).
    Ports {
        /// The transport protocol.
        protocol: Protocol,
        /// The port or ports.
        ports: PortRange,
    },
    /// `app:https`: the entries of the application in the catalogue.
    App(String),
}

impl Item {
    /// The item for one port.
    pub fn port(protocol: Protocol, port: u16) -> Item {
        Item::Ports {
            protocol,
            ports: PortRange::single(port),
        }
    }

    /// The protocol target this item asks for, as an opening would carry it.
    pub fn to_target(&self) -> Target {
        match self {
            Item::Ports { protocol, ports } => Target::Ports {
                protocol: *protocol,
                ports: *ports,
            },
            Item::App(id) => Target::App(id.clone()),
        }
    }

    /// The item naming the same thing as an opening's target.
    pub fn from_target(target: &Target) -> Item {
        match target {
            Target::Ports { protocol, ports } => Item::Ports {
                protocol: *protocol,
                ports: *ports,
            },
            Target::App(id) => Item::App(id.clone()),
        }
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Ports { protocol, ports } => {
                if ports.first == 1 && ports.last == u16::MAX {
                    write!(f, "{protocol}/*")
                } else {
                    write!(f, "{protocol}/{ports}")
                }
            }
            Item::App(id) => write!(f, "app:{id}"),
        }
    }
}

impl FromStr for Item {
    type Err = ItemError;

    fn from_str(text: &str) -> Result<Item, ItemError> {
        if text.is_empty() {
            return Err(ItemError::Empty);
        }
        if let Some(id) = text.strip_prefix("app:") {
            if !is_app_id(id) {
                return Err(ItemError::BadAppId(id.to_owned()));
            }
            return Ok(Item::App(id.to_owned()));
        }
        let (protocol_text, ports_text) = text.split_once('/').ok_or(ItemError::MissingPorts)?;
        let protocol = parse_protocol(protocol_text)
            .ok_or_else(|| ItemError::UnknownProtocol(protocol_text.to_owned()))?;
        let ports = parse_port_range(ports_text)?;
        Ok(Item::Ports { protocol, ports })
    }
}

/// The protocol with this lower-case name (`tcp`, `udp`, `sctp`, `udplite`).
pub fn parse_protocol(text: &str) -> Option<Protocol> {
    Some(match text {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "udplite" => Protocol::UdpLite,
        _ => return None,
    })
}

/// Parses `443`, `8000-8100` or `*` (all ports, 1-65535).
pub fn parse_port_range(text: &str) -> Result<PortRange, ItemError> {
    if text == "*" {
        return Ok(PortRange {
            first: 1,
            last: u16::MAX,
        });
    }
    let (first_text, last_text) = match text.split_once('-') {
        Some((first, last)) => (first, last),
        None => (text, text),
    };
    let first = parse_port(first_text)?;
    let last = parse_port(last_text)?;
    // As the protocol's own check: a reversed range is named as such even when it ends at 0.
    if last < first {
        return Err(ItemError::ReversedRange { first, last });
    }
    if first == 0 {
        return Err(ItemError::PortZero);
    }
    Ok(PortRange { first, last })
}

/// A number from 0 to 65535 (0 is refused by the caller, with its own error).
fn parse_port(text: &str) -> Result<u16, ItemError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ItemError::BadPort(text.to_owned()));
    }
    text.parse::<u16>()
        .map_err(|_| ItemError::BadPort(text.to_owned()))
}

/// Whether the text is a valid application id: 1 to 64 bytes of `[a-z0-9._-]`.
pub fn is_app_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_APP_ID_LEN
        && text.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Whether the text is a valid group or rule name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
pub fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_refuse_host_bits() {
        let p = parse_prefix("10.0.0.0/8").unwrap();
        assert_eq!(p.to_string(), "10.0.0.0/8");
        assert_eq!(parse_prefix("2001:db8::/32").unwrap().len, 32);
        assert_eq!(parse_prefix("192.0.2.7").unwrap().len, 32);
        assert_eq!(parse_prefix("::1").unwrap().len, 128);
        assert_eq!(
            parse_prefix("10.0.0.1/24"),
            Err(PrefixError::HostBitsSet {
                network: parse_prefix("10.0.0.0/24").unwrap()
            })
        );
        assert!(matches!(
            parse_prefix("10.0.0.0/33"),
            Err(PrefixError::LengthTooLong { .. })
        ));
        assert!(matches!(
            parse_prefix("10.0.0.0/+8"),
            Err(PrefixError::BadLength(_))
        ));
        assert!(matches!(
            parse_prefix("web/8"),
            Err(PrefixError::NotAnAddress(_))
        ));
        assert!(parse_prefix("0.0.0.0/0").is_ok());
        assert!(parse_prefix("::/0").is_ok());
    }

    #[test]
    fn nets_contain_and_overlap() {
        let net = |s: &str| Net::from_prefix(&parse_prefix(s).unwrap());
        let ten = net("10.0.0.0/8");
        assert!(ten.contains_addr("10.1.2.3".parse().unwrap()));
        assert!(ten.contains_addr("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!ten.contains_addr("11.0.0.0".parse().unwrap()));
        assert!(!ten.contains_addr("::a01:203".parse().unwrap()));
        assert!(ten.contains_net(&net("10.2.0.0/16")));
        assert!(!net("10.2.0.0/16").contains_net(&ten));
        assert!(net("10.2.0.0/16").overlaps(&ten));
        assert!(!net("10.2.0.0/16").overlaps(&net("10.3.0.0/16")));
        assert!(net("0.0.0.0/0").contains_addr("203.0.113.9".parse().unwrap()));
        assert!(net("::/0").contains_addr("2001:db8::1".parse().unwrap()));
        assert!(!net("::/0").contains_addr("203.0.113.9".parse().unwrap()));
        assert!(net("2001:db8::/32").contains_net(&net("2001:db8:1::/48")));
    }

    #[test]
    fn items_parse_and_print() {
        let item: Item = "tcp/443".parse().unwrap();
        assert_eq!(item, Item::port(Protocol::Tcp, 443));
        assert_eq!(
            "udp/5000-5100".parse::<Item>().unwrap().to_string(),
            "udp/5000-5100"
        );
        assert_eq!("tcp/*".parse::<Item>().unwrap().to_string(), "tcp/*");
        assert_eq!("tcp/1-65535".parse::<Item>().unwrap().to_string(), "tcp/*");
        assert_eq!(
            "app:https".parse::<Item>().unwrap(),
            Item::App("https".into())
        );
        assert_eq!("tcp/0".parse::<Item>(), Err(ItemError::PortZero));
        assert_eq!("tcp/0-10".parse::<Item>(), Err(ItemError::PortZero));
        assert_eq!(
            "udp/1-0".parse::<Item>(),
            Err(ItemError::ReversedRange { first: 1, last: 0 })
        );
        assert_eq!(
            "tcp/8100-8000".parse::<Item>(),
            Err(ItemError::ReversedRange {
                first: 8100,
                last: 8000
            })
        );
        assert_eq!(
            "tcp/65536".parse::<Item>(),
            Err(ItemError::BadPort("65536".into()))
        );
        assert_eq!(
            "icmp/1".parse::<Item>(),
            Err(ItemError::UnknownProtocol("icmp".into()))
        );
        assert_eq!("tcp".parse::<Item>(), Err(ItemError::MissingPorts));
        assert_eq!(
            "app:HTTPS".parse::<Item>(),
            Err(ItemError::BadAppId("HTTPS".into()))
        );
        assert_eq!("".parse::<Item>(), Err(ItemError::Empty));
    }
}
