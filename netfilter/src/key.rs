//! Openings as set elements: which set an opening lives in and its key bytes, both ways.
//!
//! Four sets per table:
//! - `lease4` / `lease6`: hash sets keyed `addr . inet_proto . inet_service` with per-element
//!   timeouts, for the common case (one port, any source);
//! - `range4` / `range6`: concatenated interval sets (the kernel's pipapo backend) keyed
//!   `addr . inet_proto . inet_service . saddr` with per-element timeouts, for port ranges and
//!   source prefixes. "Any source" is the whole address space.
//!
//! Registers are 32 bits wide, so the protocol (1 byte) and the port (2 bytes, big-endian)
//! each take 4 bytes of key, zero-padded, exactly as the kernel's payload and meta loads leave
//! them in the registers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fwnp_proto::message::{PortRange, Prefix, Protocol};

use crate::{Element, Error};

/// Address family of an opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    V4,
    V6,
}

/// The two kinds of set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SetKind {
    /// Single port, any source: hash set.
    Exact,
    /// Port range and/or source prefix: concatenated interval set.
    Range,
}

/// A set of our table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SetId {
    pub(crate) family: Family,
    pub(crate) kind: SetKind,
}

pub(crate) const ALL_SETS: [SetId; 4] = [
    SetId {
        family: Family::V4,
        kind: SetKind::Exact,
    },
    SetId {
        family: Family::V6,
        kind: SetKind::Exact,
    },
    SetId {
        family: Family::V4,
        kind: SetKind::Range,
    },
    SetId {
        family: Family::V6,
        kind: SetKind::Range,
    },
];

// nft's datatype numbers, used only so that `nft list` shows the keys readably.
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_BITS: u32 = 6;

impl SetId {
    pub(crate) fn name(self) -> &'static str {
        match (self.family, self.kind) {
            (Family::V4, SetKind::Exact) => "lease4",
            (Family::V6, SetKind::Exact) => "lease6",
            (Family::V4, SetKind::Range) => "range4",
            (Family::V6, SetKind::Range) => "range6",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<SetId> {
        ALL_SETS.into_iter().find(|s| s.name() == name)
    }

    pub(crate) fn addr_len(self) -> usize {
        match self.family {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    /// Length of the key in bytes (each field rounded up to a 32-bit register).
    pub(crate) fn key_len(self) -> usize {
        let addr = self.addr_len();
        match self.kind {
            SetKind::Exact => addr + 4 + 4,
            SetKind::Range => addr + 4 + 4 + addr,
        }
    }

    /// The lengths of the concatenated fields, unpadded, as the interval set's description.
    pub(crate) fn field_lens(self) -> Vec<u32> {
        let addr = self.addr_len() as u32;
        match self.kind {
            SetKind::Exact => vec![addr, 1, 2],
            SetKind::Range => vec![addr, 1, 2, addr],
        }
    }

    /// nft's concatenated type id: each component's type shifted in by 6 bits.
    pub(crate) fn key_type(self) -> u32 {
        let addr = match self.family {
            Family::V4 => TYPE_IPV4_ADDR,
            Family::V6 => TYPE_IPV6_ADDR,
        };
        let base = (((addr << TYPE_BITS) | TYPE_INET_PROTO) << TYPE_BITS) | TYPE_INET_SERVICE;
        match self.kind {
            SetKind::Exact => base,
            SetKind::Range => (base << TYPE_BITS) | addr,
        }
    }

    /// Numeric id of the set within a transaction (NFTA_SET_ID), unique per set.
    pub(crate) fn transaction_id(self) -> u32 {
        match (self.family, self.kind) {
            (Family::V4, SetKind::Exact) => 1,
            (Family::V6, SetKind::Exact) => 2,
            (Family::V4, SetKind::Range) => 3,
            (Family::V6, SetKind::Range) => 4,
        }
    }
}

/// An opening encoded as an element of one of our sets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ElementKey {
    pub(crate) set: SetId,
    pub(crate) key: Vec<u8>,
    /// The upper end of every field, for interval sets.
    pub(crate) key_end: Option<Vec<u8>>,
}

fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The lowest and highest address of a prefix (the network and its last address).
pub(crate) fn prefix_bounds(prefix: &Prefix) -> (IpAddr, IpAddr) {
    match prefix.addr {
        IpAddr::V4(a) => {
            let len = u32::from(prefix.len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let low = u32::from(a) & mask;
            (
                IpAddr::V4(Ipv4Addr::from(low)),
                IpAddr::V4(Ipv4Addr::from(low | !mask)),
            )
        }
        IpAddr::V6(a) => {
            let len = u32::from(prefix.len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            let low = u128::from(a) & mask;
            (
                IpAddr::V6(Ipv6Addr::from(low)),
                IpAddr::V6(Ipv6Addr::from(low | !mask)),
            )
        }
    }
}

/// The prefix spanning exactly `low..=high`, if that range is a CIDR block.
pub(crate) fn prefix_from_bounds(low: IpAddr, high: IpAddr) -> Option<Prefix> {
    match (low, high) {
        (IpAddr::V4(l), IpAddr::V4(h)) => {
            let (l, h) = (u32::from(l), u32::from(h));
            let host_bits = (l ^ h).count_ones();
            let len = 32 - host_bits;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (l & !mask == 0 && h == l | !mask).then(|| Prefix {
                addr: IpAddr::V4(Ipv4Addr::from(l)),
                len: len as u8,
            })
        }
        (IpAddr::V6(l), IpAddr::V6(h)) => {
            let (l, h) = (u128::from(l), u128::from(h));
            let host_bits = (l ^ h).count_ones();
            let len = 128 - host_bits;
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            (l & !mask == 0 && h == l | !mask).then(|| Prefix {
                addr: IpAddr::V6(Ipv6Addr::from(l)),
                len: len as u8,
            })
        }
        _ => None,
    }
}

impl Element {
    /// The form in which the kernel holds and reports this opening: the remote prefix reduced
    /// to its network address, and a remote prefix of length 0 (everyone) written as `None`.
    /// [`crate::Netfilter::elements`] returns canonical openings, and reconciling compares
    /// canonical forms. Fails for an opening the tables cannot hold: a remote prefix of the
    /// other address family or too long, or a reversed port range.
    pub fn canonical(&self) -> Result<Element, Error> {
        if self.ports.is_empty() {
            return Err(Error::UnsupportedOpening(format!(
                "reversed port range {}",
                self.ports
            )));
        }
        let remote = match self.remote {
            None => None,
            Some(prefix) => {
                if family_of(prefix.addr) != family_of(self.host) {
                    return Err(Error::UnsupportedOpening(format!(
                        "remote prefix {prefix} is not of the family of host {}",
                        self.host
                    )));
                }
                let max = match prefix.addr {
                    IpAddr::V4(_) => 32,
                    IpAddr::V6(_) => 128,
                };
                if prefix.len > max {
                    return Err(Error::UnsupportedOpening(format!(
                        "prefix length of {prefix} exceeds {max}"
                    )));
                }
                if prefix.len == 0 {
                    None
                } else {
                    Some(Prefix {
                        addr: prefix_bounds(&prefix).0,
                        len: prefix.len,
                    })
                }
            }
        };
        Ok(Element {
            host: self.host,
            protocol: self.protocol,
            ports: self.ports,
            remote,
        })
    }
}

fn padded(value: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    for (slot, byte) in out.iter_mut().zip(value) {
        *slot = *byte;
    }
    out
}

/// The set and key bytes of an opening (canonicalised first).
pub(crate) fn encode(opening: &Element) -> Result<ElementKey, Error> {
    let opening = opening.canonical()?;
    let family = family_of(opening.host);
    let kind = if opening.ports.first == opening.ports.last && opening.remote.is_none() {
        SetKind::Exact
    } else {
        SetKind::Range
    };
    let set = SetId { family, kind };
    let proto = padded(&[opening.protocol.number()]);
    let mut key = addr_bytes(opening.host);
    key.extend_from_slice(&proto);
    key.extend_from_slice(&padded(&opening.ports.first.to_be_bytes()));
    match kind {
        SetKind::Exact => Ok(ElementKey {
            set,
            key,
            key_end: None,
        }),
        SetKind::Range => {
            let whole = Prefix {
                addr: match family {
                    Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                },
                len: 0,
            };
            let (low, high) = prefix_bounds(&opening.remote.unwrap_or(whole));
            let mut key_end = addr_bytes(opening.host);
            key_end.extend_from_slice(&proto);
            key_end.extend_from_slice(&padded(&opening.ports.last.to_be_bytes()));
            key.extend_from_slice(&addr_bytes(low));
            key_end.extend_from_slice(&addr_bytes(high));
            Ok(ElementKey {
                set,
                key,
                key_end: Some(key_end),
            })
        }
    }
}

fn read_addr(family: Family, bytes: &[u8]) -> Option<IpAddr> {
    match family {
        Family::V4 => {
            let octets: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        Family::V6 => {
            let octets: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
    }
}

/// The opening an element of `set` stands for, or why it is not one of ours.
pub(crate) fn decode(set: SetId, key: &[u8], key_end: Option<&[u8]>) -> Result<Element, String> {
    if key.len() != set.key_len() {
        return Err(format!(
            "{} key of {} bytes, expected {}",
            set.name(),
            key.len(),
            set.key_len()
        ));
    }
    let a = set.addr_len();
    let host = read_addr(set.family, key).ok_or("short key")?;
    let protocol = Protocol::from_number(u64::from(key[a]))
        .ok_or_else(|| format!("unknown protocol number {}", key[a]))?;
    let first = u16::from_be_bytes([key[a + 4], key[a + 5]]);
    match set.kind {
        SetKind::Exact => Ok(Element {
            host,
            protocol,
            ports: PortRange::single(first),
            remote: None,
        }),
        SetKind::Range => {
            let end = key_end.ok_or("interval element without an end key")?;
            if end.len() != key.len() || end[..a + 4] != key[..a + 4] {
                return Err("interval element spans several hosts or protocols".into());
            }
            let last = u16::from_be_bytes([end[a + 4], end[a + 5]]);
            let low = read_addr(set.family, &key[a + 8..]).ok_or("short key")?;
            let high = read_addr(set.family, &end[a + 8..]).ok_or("short key")?;
            let prefix = prefix_from_bounds(low, high)
                .ok_or_else(|| format!("source range {low}-{high} is not a prefix"))?;
            let remote = (prefix.len != 0).then_some(prefix);
            Ok(Element {
                host,
                protocol,
                ports: PortRange { first, last },
                remote,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening(
        host: &str,
        protocol: Protocol,
        first: u16,
        last: u16,
        remote: Option<(&str, u8)>,
    ) -> Element {
        Element {
            host: host.parse().unwrap(),
            protocol,
            ports: PortRange { first, last },
            remote: remote.map(|(a, len)| Prefix {
                addr: a.parse().unwrap(),
                len,
            }),
        }
    }

    #[test]
    fn exact_v4_key_matches_what_nft_sends() {
        // nft add element inet t lease4 { 10.0.0.1 . tcp . 1000 }: 0a000001 06000000 03e80000
        let key = encode(&opening("10.0.0.1", Protocol::Tcp, 1000, 1000, None)).unwrap();
        assert_eq!(key.set.name(), "lease4");
        assert_eq!(key.key, [10, 0, 0, 1, 6, 0, 0, 0, 0x03, 0xe8, 0, 0]);
        assert_eq!(key.key_end, None);
        assert_eq!(key.set.key_type(), 0x730d);
    }

    #[test]
    fn range_v4_key_matches_what_nft_sends() {
        // nft: 10.0.0.1 . tcp . 1000-2000 . 0.0.0.0/0 gives
        // key 0a000001 06000000 03e80000 00000000, end 0a000001 06000000 07d00000 ffffffff
        let key = encode(&opening("10.0.0.1", Protocol::Tcp, 1000, 2000, None)).unwrap();
        assert_eq!(key.set.name(), "range4");
        assert_eq!(
            key.key,
            [10, 0, 0, 1, 6, 0, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            key.key_end.unwrap(),
            [
                10, 0, 0, 1, 6, 0, 0, 0, 0x07, 0xd0, 0, 0, 255, 255, 255, 255
            ]
        );
    }

    #[test]
    fn key_types_match_nft() {
        let range6 = SetId {
            family: Family::V6,
            kind: SetKind::Range,
        };
        assert_eq!(range6.key_type(), 0x0020_c348);
        assert_eq!(range6.key_len(), 40);
        assert_eq!(range6.field_lens(), vec![16, 1, 2, 16]);
        assert_eq!(
            SetId {
                family: Family::V6,
                kind: SetKind::Exact
            }
            .key_len(),
            24
        );
    }

    #[test]
    fn single_port_with_prefix_goes_to_the_interval_set() {
        let key = encode(&opening(
            "10.0.0.1",
            Protocol::Udp,
            53,
            53,
            Some(("192.0.2.0", 24)),
        ))
        .unwrap();
        assert_eq!(key.set.name(), "range4");
        assert_eq!(&key.key[12..], [192, 0, 2, 0]);
        assert_eq!(&key.key_end.unwrap()[12..], [192, 0, 2, 255]);
    }

    #[test]
    fn round_trips_every_shape() {
        let cases = [
            opening("10.0.0.1", Protocol::Tcp, 22, 22, None),
            opening("10.0.0.1", Protocol::Udp, 0, 65535, None),
            opening(
                "10.0.0.1",
                Protocol::Sctp,
                80,
                80,
                Some(("198.51.100.7", 32)),
            ),
            opening("2001:db8::1", Protocol::UdpLite, 443, 443, None),
            opening(
                "2001:db8::1",
                Protocol::Tcp,
                8000,
                8100,
                Some(("2001:db8:ff::", 48)),
            ),
        ];
        for case in cases {
            let key = encode(&case).unwrap();
            let back = decode(key.set, &key.key, key.key_end.as_deref()).unwrap();
            assert_eq!(back, case);
        }
    }

    #[test]
    fn canonical_form_masks_and_drops_everyone() {
        let messy = opening("10.0.0.1", Protocol::Tcp, 80, 80, Some(("192.0.2.77", 24)));
        assert_eq!(
            messy.canonical().unwrap().remote,
            Some(Prefix {
                addr: "192.0.2.0".parse().unwrap(),
                len: 24
            })
        );
        let everyone = opening("10.0.0.1", Protocol::Tcp, 80, 80, Some(("0.0.0.0", 0)));
        assert_eq!(everyone.canonical().unwrap().remote, None);
        assert_eq!(encode(&everyone).unwrap().set.name(), "lease4");
    }

    #[test]
    fn refuses_what_the_tables_cannot_hold() {
        assert!(matches!(
            encode(&opening(
                "10.0.0.1",
                Protocol::Tcp,
                80,
                80,
                Some(("2001:db8::", 32))
            )),
            Err(Error::UnsupportedOpening(_))
        ));
        assert!(matches!(
            encode(&opening("10.0.0.1", Protocol::Tcp, 90, 80, None)),
            Err(Error::UnsupportedOpening(_))
        ));
        assert!(matches!(
            encode(&opening(
                "10.0.0.1",
                Protocol::Tcp,
                80,
                80,
                Some(("10.0.0.0", 33))
            )),
            Err(Error::UnsupportedOpening(_))
        ));
    }

    #[test]
    fn decode_rejects_foreign_elements() {
        let set = SetId {
            family: Family::V4,
            kind: SetKind::Range,
        };
        // Source range 10.0.0.1-10.0.0.2 is not a prefix.
        let key = [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0, 10, 0, 0, 1];
        let end = [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0, 10, 0, 0, 2];
        assert!(decode(set, &key, Some(&end)).is_err());
        assert!(decode(set, &key[..8], None).is_err());
        // Protocol 1 (ICMP) is not an FWNP protocol.
        let exact = SetId {
            family: Family::V4,
            kind: SetKind::Exact,
        };
        assert!(decode(exact, &[10, 0, 0, 1, 1, 0, 0, 0, 0, 80, 0, 0], None).is_err());
    }

    #[test]
    fn prefix_bounds_edges() {
        let p = Prefix {
            addr: "10.1.2.3".parse().unwrap(),
            len: 0,
        };
        assert_eq!(
            prefix_bounds(&p),
            (
                "0.0.0.0".parse().unwrap(),
                "255.255.255.255".parse().unwrap()
            )
        );
        let p = Prefix {
            addr: "2001:db8::1".parse().unwrap(),
            len: 128,
        };
        assert_eq!(prefix_bounds(&p).0, prefix_bounds(&p).1);
        assert_eq!(
            prefix_from_bounds(
                "0.0.0.0".parse().unwrap(),
                "255.255.255.255".parse().unwrap()
            ),
            Some(Prefix {
                addr: "0.0.0.0".parse().unwrap(),
                len: 0
            })
        );
    }
}
