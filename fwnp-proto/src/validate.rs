//! The rules of FWNP/1 that the schema cannot express, checked on decoded messages.
//!
//! [`crate::codec::decode`] checks form: types, numeric ranges, registries, the opening's shape
//! and the must-understand rule. This module checks meaning, and is what a gateway runs after
//! decoding a request and before looking at policy:
//!
//! | rule | function | result code |
//! | --- | --- | --- |
//! | port 0, reversed range (`last < first`) | [`validate_ports`] | malformed-option |
//! | prefix longer than 32 (IPv4) or 128 (IPv6), host bits set | [`validate_prefix`] | malformed-option |
//! | host address and family disagree; a remote prefix of the other family | [`validate_opening`] | malformed-option |
//! | an IPv4-mapped IPv6 address (`::ffff:0:0/96`) as host address or remote prefix | [`validate_opening`], [`validate_grant`] | malformed-option |
//! | host addresses as an array of fewer than 2 or more than [`MAX_HOST_ADDRESSES`], or with one twice | [`validate_opening`] | malformed-option |
//! | app id not 1..=64 bytes of `[a-z0-9._-]` | [`validate_app_id`] | malformed-option |
//! | lifetime asked above [`MAX_LIFETIME_SECS`] | [`validate_lifetime`] | lifetime-out-of-range |
//! | Hello without version 1 | [`validate_request`] | unsupported-version |
//! | an answer or notice sent as a request | [`validate_request`] | malformed-request |
//!
//! The same functions serve a client checking what a gateway sent ([`validate_message`]) and
//! the gateway checking its own policy and catalogue ([`validate_grant`], [`validate_app_id`]).

use std::net::IpAddr;

use crate::message::*;

/// A decoded message, or a part of one, that breaks a rule of FWNP/1.
///
/// Every variant maps to the result code a gateway answers with ([`ValidationError::result_code`])
/// and has a stable short name ([`ValidationError::kind`]) used by the test vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// Port 0 in an opening or a grant.
    #[error("port 0 cannot be opened: ports run from 1 to 65535")]
    PortZero,
    /// A port range whose last port is below its first.
    #[error("port range {first}-{last} is reversed: write {last}-{first}")]
    ReversedRange {
        /// The first port.
        first: u16,
        /// The last port.
        last: u16,
    },
    /// A prefix length above 32 for IPv4 or 128 for IPv6.
    #[error("prefix length {len} is too long for {addr} (at most {max})")]
    PrefixTooLong {
        /// The network address.
        addr: IpAddr,
        /// The length given.
        len: u8,
        /// The longest length of the family.
        max: u8,
    },
    /// A prefix whose address has bits set beyond its length (10.0.0.1/24).
    #[error("prefix {0} has host bits set")]
    HostBitsSet(Prefix),
    /// An opening's host address and family disagree.
    #[error("host address {host} is not of the family asked")]
    FamilyMismatch {
        /// The host address.
        host: IpAddr,
    },
    /// Key 4 as an array of fewer than 2 or more than [`MAX_HOST_ADDRESSES`] addresses (one
    /// address is written as a byte string, none by leaving key 4 out).
    #[error("an opening names 2 to {max} host addresses in an array, not {count}")]
    HostAddressCount {
        /// How many the array holds.
        count: usize,
        /// [`MAX_HOST_ADDRESSES`].
        max: usize,
    },
    /// The same host address twice in key 4.
    #[error("host address {0} is named twice")]
    DuplicateHostAddress(IpAddr),
    /// A remote prefix is not of the host address's family.
    #[error("remote prefix {prefix} is not of the opening's family ({family:?})")]
    RemoteFamilyMismatch {
        /// The prefix.
        prefix: Prefix,
        /// The family of the host address (or, with none, of the family asked).
        family: Family,
    },
    /// An IPv4-mapped IPv6 address (`::ffff:0:0/96`) where an address is named: IPv4
    /// addresses travel as 4 bytes, and a mapped one would be opened as IPv6.
    #[error("{addr} is an IPv4-mapped IPv6 address; name the IPv4 address as 4 bytes")]
    Ipv4Mapped {
        /// The address.
        addr: IpAddr,
    },
    /// An application id that is not 1 to 64 bytes.
    #[error("an application id is 1 to 64 bytes, not {len}")]
    AppIdLength {
        /// Its length in bytes.
        len: usize,
    },
    /// An application id with a byte outside `[a-z0-9._-]`.
    #[error("an application id holds only a-z, 0-9, '.', '_' and '-', not {found:?}")]
    AppIdCharacter {
        /// The first character outside the set.
        found: char,
    },
    /// A lifetime asked above [`MAX_LIFETIME_SECS`].
    #[error("lifetime {asked} s is above the maximum of {max} s")]
    LifetimeOutOfRange {
        /// The lifetime asked, in seconds.
        asked: u32,
        /// [`MAX_LIFETIME_SECS`].
        max: u32,
    },
    /// A Hello whose versions do not include the one this implementation speaks.
    #[error("no version in common: offered {offered:?}, this gateway speaks {VERSION}")]
    UnsupportedVersion {
        /// The versions the client offered.
        offered: Vec<u16>,
    },
    /// A message that is not a request arrived where a request was expected.
    #[error("a {0:?} message is not a request")]
    NotARequest(MessageType),
}

impl ValidationError {
    /// The result code a gateway answers this error with in a Denied.
    pub fn result_code(&self) -> ResultCode {
        match self {
            ValidationError::PortZero
            | ValidationError::ReversedRange { .. }
            | ValidationError::PrefixTooLong { .. }
            | ValidationError::HostBitsSet(_)
            | ValidationError::FamilyMismatch { .. }
            | ValidationError::HostAddressCount { .. }
            | ValidationError::DuplicateHostAddress(_)
            | ValidationError::RemoteFamilyMismatch { .. }
            | ValidationError::Ipv4Mapped { .. }
            | ValidationError::AppIdLength { .. }
            | ValidationError::AppIdCharacter { .. } => ResultCode::MalformedOption,
            ValidationError::LifetimeOutOfRange { .. } => ResultCode::LifetimeOutOfRange,
            ValidationError::UnsupportedVersion { .. } => ResultCode::UnsupportedVersion,
            ValidationError::NotARequest(_) => ResultCode::MalformedRequest,
        }
    }

    /// A stable short name of the variant, as used in `spec/vectors/`.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidationError::PortZero => "port-zero",
            ValidationError::ReversedRange { .. } => "reversed-range",
            ValidationError::PrefixTooLong { .. } => "prefix-too-long",
            ValidationError::HostBitsSet(_) => "host-bits-set",
            ValidationError::FamilyMismatch { .. } => "family-mismatch",
            ValidationError::HostAddressCount { .. } => "host-address-count",
            ValidationError::DuplicateHostAddress(_) => "duplicate-host-address",
            ValidationError::RemoteFamilyMismatch { .. } => "remote-family-mismatch",
            ValidationError::Ipv4Mapped { .. } => "ipv4-mapped-address",
            ValidationError::AppIdLength { .. } => "app-id-length",
            ValidationError::AppIdCharacter { .. } => "app-id-character",
            ValidationError::LifetimeOutOfRange { .. } => "lifetime-out-of-range",
            ValidationError::UnsupportedVersion { .. } => "unsupported-version",
            ValidationError::NotARequest(_) => "not-a-request",
        }
    }

    /// The Denied that answers a request failing with this error: its result code, the error
    /// as the reason, and the request's id.
    pub fn to_denied(&self, request_id: Option<u64>) -> Denied {
        Denied {
            common: Common {
                request_id,
                critical: Vec::new(),
            },
            code: self.result_code(),
            reason: Some(crate::codec::reason_text(&self.to_string())),
            retry_after: None,
            lease: None,
            unsupported: Vec::new(),
        }
    }

    /// The QUIC code with which the gateway closes the connection after answering, if it does:
    /// [`QuicErrorCode::VersionMismatch`] for a Hello with no common version, else none.
    pub fn closes_connection(&self) -> Option<QuicErrorCode> {
        match self {
            ValidationError::UnsupportedVersion { .. } => Some(QuicErrorCode::VersionMismatch),
            _ => None,
        }
    }
}

/// Longest application name in app-info, bytes.
pub const MAX_APP_NAME_LEN: usize = 256;
/// Longest executable path in app-info, bytes.
pub const MAX_EXECUTABLE_LEN: usize = 1024;
/// Longest reason text (Denied, Revoked, GoingAway), bytes.
pub const MAX_REASON_LEN: usize = 512;
/// Longest software description in Hello, bytes.
pub const MAX_SOFTWARE_LEN: usize = 128;
/// Longest authenticated identity in Welcome, bytes.
pub const MAX_IDENTITY_LEN: usize = 512;
/// Longest application id, bytes.
pub const MAX_APP_ID_LEN: usize = 64;

/// A port range of an opening or a grant: no port 0, not reversed.
pub fn validate_ports(ports: &PortRange) -> Result<(), ValidationError> {
    // A reversed range is named as such even when its last port is 0 (`1-0`): that is the
    // mistake the writer made.
    if ports.last < ports.first {
        return Err(ValidationError::ReversedRange {
            first: ports.first,
            last: ports.last,
        });
    }
    if ports.first == 0 {
        return Err(ValidationError::PortZero);
    }
    Ok(())
}

/// A remote prefix: a length within its family, no host bits set.
pub fn validate_prefix(prefix: &Prefix) -> Result<(), ValidationError> {
    let (bits, width): (u128, u8) = match prefix.addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    if prefix.len > width {
        return Err(ValidationError::PrefixTooLong {
            addr: prefix.addr,
            len: prefix.len,
            max: width,
        });
    }
    let host_bits = u32::from(width - prefix.len);
    let host_mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |m| m - 1);
    if bits & host_mask != 0 {
        return Err(ValidationError::HostBitsSet(*prefix));
    }
    Ok(())
}

/// An application id: 1 to 64 bytes of `[a-z0-9._-]`.
pub fn validate_app_id(app: &str) -> Result<(), ValidationError> {
    if app.is_empty() || app.len() > MAX_APP_ID_LEN {
        return Err(ValidationError::AppIdLength { len: app.len() });
    }
    match app
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        Some(found) => Err(ValidationError::AppIdCharacter { found }),
        None => Ok(()),
    }
}

/// A lifetime asked in Open or Renew: absent or 0 (the default), or at most
/// [`MAX_LIFETIME_SECS`].
pub fn validate_lifetime(lifetime: Option<u32>) -> Result<(), ValidationError> {
    match lifetime {
        Some(asked) if asked > MAX_LIFETIME_SECS => Err(ValidationError::LifetimeOutOfRange {
            asked,
            max: MAX_LIFETIME_SECS,
        }),
        _ => Ok(()),
    }
}

/// An address named in an opening or a grant: not IPv4-mapped (spec Section 9.4 rule 8).
pub fn validate_address(addr: IpAddr) -> Result<(), ValidationError> {
    match addr {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Err(ValidationError::Ipv4Mapped { addr })
        }
        _ => Ok(()),
    }
}

fn validate_remotes(family: Option<Family>, remotes: &[Prefix]) -> Result<(), ValidationError> {
    for prefix in remotes {
        validate_address(prefix.addr)?;
        validate_prefix(prefix)?;
        if let Some(family) = family
            && family != Family::of(prefix.addr)
        {
            return Err(ValidationError::RemoteFamilyMismatch {
                prefix: *prefix,
                family,
            });
        }
    }
    Ok(())
}

/// An opening: its ports or app id, its host addresses (how many, no duplicate, each against
/// the family), its remote prefixes against the family of every host address (or, with none,
/// of the family asked, or else of the first prefix).
pub fn validate_opening(opening: &Opening) -> Result<(), ValidationError> {
    match &opening.target {
        Target::Ports { ports, .. } => validate_ports(ports)?,
        Target::App(app) => validate_app_id(app)?,
    }
    if let HostAddresses::List(list) = &opening.host
        && !(2..=MAX_HOST_ADDRESSES).contains(&list.len())
    {
        return Err(ValidationError::HostAddressCount {
            count: list.len(),
            max: MAX_HOST_ADDRESSES,
        });
    }
    let hosts = opening.host.addresses();
    for (i, host) in hosts.iter().enumerate() {
        validate_address(*host)?;
        if hosts[..i].contains(host) {
            return Err(ValidationError::DuplicateHostAddress(*host));
        }
        if let Some(family) = opening.family
            && Family::of(*host) != family
        {
            return Err(ValidationError::FamilyMismatch { host: *host });
        }
    }
    if hosts.is_empty() {
        // With no host address, the family asked, or else the first prefix, tells what the
        // other prefixes must be.
        let family = opening
            .family
            .or_else(|| opening.remotes.first().map(|p| Family::of(p.addr)));
        return validate_remotes(family, &opening.remotes);
    }
    // Remote prefixes restrict every address named, so each must be of the prefixes' family.
    hosts
        .iter()
        .try_for_each(|host| validate_remotes(Some(Family::of(*host)), &opening.remotes))
}

/// A grant: the same rules as an opening, with its concrete host address.
pub fn validate_grant(grant: &Grant) -> Result<(), ValidationError> {
    validate_ports(&grant.ports)?;
    validate_address(grant.host)?;
    validate_remotes(Some(Family::of(grant.host)), &grant.remotes)?;
    if let Some(app) = &grant.app {
        validate_app_id(app)?;
    }
    Ok(())
}

/// A Hello: version 1 among its versions (the decoder refuses an empty list and a software
/// text too long).
pub fn validate_hello(hello: &Hello) -> Result<(), ValidationError> {
    if !hello.versions.contains(&VERSION) {
        return Err(ValidationError::UnsupportedVersion {
            offered: hello.versions.clone(),
        });
    }
    Ok(())
}

/// A message a client sent to the gateway (Hello, Open, Renew, Release, List); any other type
/// is [`ValidationError::NotARequest`].
pub fn validate_request(msg: &Message) -> Result<(), ValidationError> {
    match msg {
        Message::Hello(h) => validate_hello(h),
        Message::Open(o) => {
            validate_opening(&o.opening)?;
            validate_lifetime(o.lifetime)
        }
        Message::Renew(r) => validate_lifetime(r.lifetime),
        Message::Release(_) | Message::List(_) => Ok(()),
        other => Err(ValidationError::NotARequest(other.message_type())),
    }
}

/// Any message: requests as [`validate_request`], answers and notices as a client checks them
/// (grants concrete and well-formed). Empty lists and text lengths the schema forbids are
/// refused by the decoder.
pub fn validate_message(msg: &Message) -> Result<(), ValidationError> {
    match msg {
        Message::Hello(_)
        | Message::Open(_)
        | Message::Renew(_)
        | Message::Release(_)
        | Message::List(_) => validate_request(msg),
        Message::Granted(g) => g.grants.iter().try_for_each(validate_grant),
        Message::Leases(l) => l
            .leases
            .iter()
            .try_for_each(|info| info.grants.iter().try_for_each(validate_grant)),
        Message::Welcome(_)
        | Message::Denied(_)
        | Message::Released(_)
        | Message::Revoked(_)
        | Message::EpochChanged(_)
        | Message::GoingAway(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> Prefix {
        let (addr, len) = s.split_once('/').unwrap();
        Prefix {
            addr: addr.parse().unwrap(),
            len: len.parse().unwrap(),
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(validate_prefix(&prefix("10.0.0.0/24")), Ok(()));
        assert_eq!(validate_prefix(&prefix("0.0.0.0/0")), Ok(()));
        assert_eq!(validate_prefix(&prefix("10.0.0.1/32")), Ok(()));
        assert_eq!(validate_prefix(&prefix("::/0")), Ok(()));
        assert_eq!(validate_prefix(&prefix("2001:db8::1/128")), Ok(()));
        assert_eq!(
            validate_prefix(&prefix("10.0.0.1/24")),
            Err(ValidationError::HostBitsSet(prefix("10.0.0.1/24")))
        );
        assert_eq!(
            validate_prefix(&prefix("1.0.0.0/0")),
            Err(ValidationError::HostBitsSet(prefix("1.0.0.0/0")))
        );
        assert!(matches!(
            validate_prefix(&prefix("10.0.0.0/33")),
            Err(ValidationError::PrefixTooLong { max: 32, .. })
        ));
        assert!(matches!(
            validate_prefix(&prefix("2001:db8::/129")),
            Err(ValidationError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            validate_prefix(&prefix("2001:db8::1/64")),
            Err(ValidationError::HostBitsSet(_))
        ));
    }

    #[test]
    fn app_ids() {
        assert_eq!(validate_app_id("https"), Ok(()));
        assert_eq!(validate_app_id("a.b_c-9"), Ok(()));
        assert_eq!(validate_app_id(&"a".repeat(64)), Ok(()));
        assert_eq!(
            validate_app_id(""),
            Err(ValidationError::AppIdLength { len: 0 })
        );
        assert_eq!(
            validate_app_id(&"a".repeat(65)),
            Err(ValidationError::AppIdLength { len: 65 })
        );
        assert_eq!(
            validate_app_id("HTTPS"),
            Err(ValidationError::AppIdCharacter { found: 'H' })
        );
        assert_eq!(
            validate_app_id("a b"),
            Err(ValidationError::AppIdCharacter { found: ' ' })
        );
        assert_eq!(
            validate_app_id("é"),
            Err(ValidationError::AppIdCharacter { found: 'é' })
        );
    }

    #[test]
    fn ports_and_lifetimes() {
        assert_eq!(validate_ports(&PortRange::single(65535)), Ok(()));
        assert_eq!(
            validate_ports(&PortRange::single(0)),
            Err(ValidationError::PortZero)
        );
        assert_eq!(
            validate_ports(&PortRange { first: 9, last: 8 }),
            Err(ValidationError::ReversedRange { first: 9, last: 8 })
        );
        assert_eq!(validate_lifetime(None), Ok(()));
        assert_eq!(validate_lifetime(Some(0)), Ok(()));
        assert_eq!(validate_lifetime(Some(MAX_LIFETIME_SECS)), Ok(()));
        assert_eq!(
            validate_lifetime(Some(MAX_LIFETIME_SECS + 1)),
            Err(ValidationError::LifetimeOutOfRange {
                asked: MAX_LIFETIME_SECS + 1,
                max: MAX_LIFETIME_SECS
            })
        );
    }

    #[test]
    fn denied_answers_carry_the_code_and_a_bounded_reason() {
        let err = ValidationError::UnsupportedVersion {
            offered: vec![65535; 200],
        };
        let denied = err.to_denied(Some(9));
        assert_eq!(denied.code, ResultCode::UnsupportedVersion);
        assert_eq!(denied.common.request_id, Some(9));
        let reason = denied.reason.unwrap();
        assert!(reason.len() <= MAX_REASON_LEN && reason.starts_with("no version in common"));
        assert_eq!(
            err.closes_connection(),
            Some(QuicErrorCode::VersionMismatch)
        );
        assert_eq!(ValidationError::PortZero.closes_connection(), None);
        let long = format!("x{}", "é".repeat(300));
        assert_eq!(
            crate::codec::reason_text(&long).len(),
            511,
            "cut on a character boundary"
        );
    }

    #[test]
    fn opening_families() {
        let mut o = Opening {
            target: Target::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(443),
            },
            host: HostAddresses::One("192.0.2.1".parse().unwrap()),
            family: Some(Family::Ipv6),
            remotes: vec![],
        };
        assert!(matches!(
            validate_opening(&o),
            Err(ValidationError::FamilyMismatch { .. })
        ));
        o.family = Some(Family::Ipv4);
        assert_eq!(validate_opening(&o), Ok(()));
        o.remotes = vec![prefix("2001:db8::/32")];
        assert!(matches!(
            validate_opening(&o),
            Err(ValidationError::RemoteFamilyMismatch { .. })
        ));
        o.host = HostAddresses::Default;
        assert!(matches!(
            validate_opening(&o),
            Err(ValidationError::RemoteFamilyMismatch { .. })
        ));
        o.family = None;
        assert_eq!(validate_opening(&o), Ok(()));
        // With neither, the prefixes must share one family.
        o.remotes.push(prefix("198.51.100.0/24"));
        assert!(matches!(
            validate_opening(&o),
            Err(ValidationError::RemoteFamilyMismatch { .. })
        ));
    }

    #[test]
    fn host_address_lists() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v4b: IpAddr = "192.0.2.2".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mut o = Opening {
            target: Target::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(443),
            },
            host: HostAddresses::List(vec![v4, v6]),
            family: None,
            remotes: vec![],
        };
        assert_eq!(validate_opening(&o), Ok(()));
        o.host = HostAddresses::List(vec![]);
        assert_eq!(
            validate_opening(&o),
            Err(ValidationError::HostAddressCount { count: 0, max: 16 })
        );
        o.host = HostAddresses::List(vec![v4]);
        assert_eq!(
            validate_opening(&o),
            Err(ValidationError::HostAddressCount { count: 1, max: 16 })
        );
        let many: Vec<IpAddr> = (1..=17u8).map(|i| IpAddr::from([192, 0, 2, i])).collect();
        o.host = HostAddresses::List(many[..16].to_vec());
        assert_eq!(validate_opening(&o), Ok(()));
        o.host = HostAddresses::List(many);
        assert_eq!(
            validate_opening(&o),
            Err(ValidationError::HostAddressCount { count: 17, max: 16 })
        );
        o.host = HostAddresses::List(vec![v4, v6, v4]);
        assert_eq!(
            validate_opening(&o),
            Err(ValidationError::DuplicateHostAddress(v4))
        );
        // Every address agrees with the family and with the prefixes.
        o.host = HostAddresses::List(vec![v4, v6]);
        o.family = Some(Family::Ipv4);
        assert_eq!(
            validate_opening(&o),
            Err(ValidationError::FamilyMismatch { host: v6 })
        );
        o.family = None;
        o.remotes = vec![prefix("198.51.100.0/24")];
        assert!(matches!(
            validate_opening(&o),
            Err(ValidationError::RemoteFamilyMismatch { .. })
        ));
        o.host = HostAddresses::List(vec![v4, v4b]);
        assert_eq!(validate_opening(&o), Ok(()));
    }
}
