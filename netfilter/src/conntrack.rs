//! Ending live connections through ctnetlink: dump the conntrack table of the namespace, then
//! delete each entry whose original direction matches the opening.
//!
//! IPCTNL_MSG_CT_DELETE needs a complete tuple (source address and port included), so a
//! wildcard such as "every connection to 10.0.0.5 tcp/8080" is a dump and a delete per match.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::key::prefix_bounds;
use crate::netfilter::{Netfilter, next_seq};
use crate::nl::*;
use crate::{Element, Error};

const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
/// Bound on entries ended per call, so that a huge table cannot stall the caller forever.
const MAX_DELETES: usize = 1_000_000;

/// The original-direction tuple of a conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tuple {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) protocol: u8,
    pub(crate) dst_port: u16,
}

pub(crate) fn parse_tuple(nest: &[u8]) -> Option<Tuple> {
    let ip = Attrs::new(nest).find(CTA_TUPLE_IP)?;
    let proto = Attrs::new(nest).find(CTA_TUPLE_PROTO)?;
    let (mut src, mut dst) = (None, None);
    for (t, data) in Attrs::new(ip) {
        match t {
            CTA_IP_V4_SRC => {
                src = <[u8; 4]>::try_from(data)
                    .ok()
                    .map(|o| IpAddr::V4(Ipv4Addr::from(o)))
            }
            CTA_IP_V4_DST => {
                dst = <[u8; 4]>::try_from(data)
                    .ok()
                    .map(|o| IpAddr::V4(Ipv4Addr::from(o)))
            }
            CTA_IP_V6_SRC => {
                src = <[u8; 16]>::try_from(data)
                    .ok()
                    .map(|o| IpAddr::V6(Ipv6Addr::from(o)))
            }
            CTA_IP_V6_DST => {
                dst = <[u8; 16]>::try_from(data)
                    .ok()
                    .map(|o| IpAddr::V6(Ipv6Addr::from(o)))
            }
            _ => {}
        }
    }
    let protocol = *Attrs::new(proto).find(CTA_PROTO_NUM)?.first()?;
    let port = Attrs::new(proto)
        .find(CTA_PROTO_DST_PORT)
        .unwrap_or(&[0, 0]);
    let dst_port = u16::from_be_bytes([*port.first()?, *port.get(1)?]);
    Some(Tuple {
        src: src?,
        dst: dst?,
        protocol,
        dst_port,
    })
}

/// Whether a connection is one the opening admitted.
pub(crate) fn matches(opening: &Element, tuple: &Tuple) -> bool {
    if tuple.dst != opening.host || tuple.protocol != opening.protocol.number() {
        return false;
    }
    if tuple.dst_port < opening.ports.first || tuple.dst_port > opening.ports.last {
        return false;
    }
    match opening.remote {
        None => true,
        Some(prefix) => {
            let (low, high) = prefix_bounds(&prefix);
            match (tuple.src, low, high) {
                (IpAddr::V4(s), IpAddr::V4(l), IpAddr::V4(h)) => l <= s && s <= h,
                (IpAddr::V6(s), IpAddr::V6(l), IpAddr::V6(h)) => l <= s && s <= h,
                _ => false,
            }
        }
    }
}

pub(crate) fn kill(nf: &mut Netfilter, opening: &Element) -> Result<usize, Error> {
    let family = match opening.host {
        IpAddr::V4(_) => NFPROTO_IPV4,
        IpAddr::V6(_) => NFPROTO_IPV6,
    };
    let (socket, buf, seq) = nf.socket_and_buf();
    // 1. Dump, keeping the raw tuple (and zone) of each match to send back verbatim.
    let dump_seq = next_seq(seq);
    let mut b = Builder::new();
    let start = b.begin_msg(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        dump_seq,
        family,
        0,
    );
    b.end_msg(start);
    socket.send(b.as_bytes())?;
    let mut victims: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    'dump: loop {
        let n = socket.recv(buf, false).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                Error::UnexpectedReply("conntrack dump did not finish".into())
            }
            _ => Error::Io(e),
        })?;
        for m in messages(&buf[..n]) {
            if m.seq != dump_seq {
                continue;
            }
            match m.msg_type {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => match parse_ack(&m) {
                    Some(ack) if ack.errno == libc::EPERM || ack.errno == libc::EACCES => {
                        return Err(Error::PermissionDenied);
                    }
                    Some(ack) if ack.errno != 0 => {
                        return Err(Error::Kernel {
                            op: "dump conntrack",
                            errno: ack.errno,
                            message: ack.message.unwrap_or_default(),
                        });
                    }
                    _ => break 'dump,
                },
                t if t == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                    let attrs = m.nft_attrs();
                    let Some(orig) = attrs.clone().find(CTA_TUPLE_ORIG) else {
                        continue;
                    };
                    if parse_tuple(orig).is_some_and(|t| matches(opening, &t))
                        && victims.len() < MAX_DELETES
                    {
                        victims.push((orig.to_vec(), attrs.find(CTA_ZONE).map(<[u8]>::to_vec)));
                    }
                }
                _ => {}
            }
        }
    }
    // 2. Delete each; an entry that vanished meanwhile (ENOENT) was not ended by us.
    let mut ended = 0;
    for (tuple, zone) in victims {
        let del_seq = next_seq(seq);
        let mut b = Builder::new();
        let start = b.begin_msg(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            del_seq,
            family,
            0,
        );
        let nest = b.nest_start(CTA_TUPLE_ORIG);
        // The tuple's inner attributes, as the kernel gave them.
        for (t, data) in Attrs::new(&tuple) {
            let inner = b.nest_start(t);
            for (t2, d2) in Attrs::new(data) {
                b.put(t2, d2);
            }
            b.nest_end(inner);
        }
        b.nest_end(nest);
        if let Some(zone) = zone {
            b.put(CTA_ZONE, &zone);
        }
        b.end_msg(start);
        socket.send(b.as_bytes())?;
        'ack: for _ in 0..16 {
            let n = socket.recv(buf, false)?;
            for m in messages(&buf[..n]) {
                if m.seq != del_seq {
                    continue;
                }
                if let Some(ack) = parse_ack(&m) {
                    match ack.errno {
                        0 => ended += 1,
                        libc::ENOENT => {}
                        libc::EPERM | libc::EACCES => return Err(Error::PermissionDenied),
                        errno => {
                            return Err(Error::Kernel {
                                op: "delete conntrack entry",
                                errno,
                                message: ack.message.unwrap_or_default(),
                            });
                        }
                    }
                    break 'ack;
                }
            }
        }
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::message::{PortRange, Prefix, Protocol};

    fn tuple(src: &str, dst: &str, protocol: u8, port: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            dst_port: port,
        }
    }

    #[test]
    fn matching_follows_the_opening() {
        let opening = Element {
            host: "10.0.0.5".parse().unwrap(),
            protocol: Protocol::Tcp,
            ports: PortRange {
                first: 8000,
                last: 8010,
            },
            remote: Some(Prefix {
                addr: "192.0.2.0".parse().unwrap(),
                len: 24,
            }),
        };
        assert!(matches(&opening, &tuple("192.0.2.9", "10.0.0.5", 6, 8005)));
        assert!(!matches(&opening, &tuple("192.0.3.9", "10.0.0.5", 6, 8005)));
        assert!(!matches(
            &opening,
            &tuple("192.0.2.9", "10.0.0.5", 17, 8005)
        ));
        assert!(!matches(&opening, &tuple("192.0.2.9", "10.0.0.5", 6, 8011)));
        assert!(!matches(&opening, &tuple("192.0.2.9", "10.0.0.6", 6, 8005)));
    }

    #[test]
    fn parses_a_tuple_nest() {
        let mut b = Builder::new();
        let ip = b.nest_start(CTA_TUPLE_IP);
        b.put(CTA_IP_V4_SRC, &[192, 0, 2, 1]);
        b.put(CTA_IP_V4_DST, &[10, 0, 0, 5]);
        b.nest_end(ip);
        let proto = b.nest_start(CTA_TUPLE_PROTO);
        b.put(CTA_PROTO_NUM, &[6]);
        b.put(2, &1234u16.to_be_bytes());
        b.put(CTA_PROTO_DST_PORT, &80u16.to_be_bytes());
        b.nest_end(proto);
        let bytes = b.into_bytes();
        assert_eq!(
            parse_tuple(&bytes),
            Some(tuple("192.0.2.1", "10.0.0.5", 6, 80))
        );
        assert_eq!(parse_tuple(&bytes[..10]), None);
    }
}
