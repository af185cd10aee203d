//! PCP (RFC 6887) messages the agent serves: ANNOUNCE and MAP, with the FILTER and
//! PREFER_FAILURE options. No I/O here: bytes in, a typed request or the result code of the
//! refusal out, and answers written into byte vectors.

use std::net::{IpAddr, Ipv6Addr};

/// The version of PCP.
pub const VERSION: u8 = 2;
/// ANNOUNCE.
pub const OP_ANNOUNCE: u8 = 0;
/// MAP.
pub const OP_MAP: u8 = 1;
/// The longest PCP message.
pub const MAX_MESSAGE: usize = 1100;
/// The common header of a request and of an answer.
pub const HEADER_LEN: usize = 24;
/// MAP's opcode-specific part.
pub const MAP_LEN: usize = 36;
/// THIRD_PARTY: not served (a process asks for itself).
pub const OPTION_THIRD_PARTY: u8 = 1;
/// PREFER_FAILURE: the suggested external port and address, or no mapping. The agent grants
/// only the internal port on the client's own address, so a request suggesting anything else
/// is refused with CANNOT_PROVIDE_EXTERNAL.
pub const OPTION_PREFER_FAILURE: u8 = 2;
/// FILTER: only these remote peers.
pub const OPTION_FILTER: u8 = 3;
/// Most FILTER options in one request (each becomes a remote prefix of the lease).
pub const MAX_FILTERS: usize = 16;

/// PCP's result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    /// 0.
    Success,
    /// 1.
    UnsupportedVersion,
    /// 2: the port is another program's, the policy says no, this user may not use the agent,
    /// or the nonce is not the mapping's.
    NotAuthorized,
    /// 3.
    MalformedRequest,
    /// 4.
    UnsupportedOpcode,
    /// 5.
    UnsupportedOption,
    /// 6.
    MalformedOption,
    /// 7: the agent has no connection to the gateway.
    NetworkFailure,
    /// 8.
    NoResources,
    /// 9: a protocol FWNP does not open (or "all protocols").
    UnsupportedProtocol,
    /// 10: the host holds as many leases as the policy allows.
    UserExceededQuota,
    /// 11: the suggested external port or address is not the one the agent would give, and
    /// the client prefers no mapping to another (PREFER_FAILURE, or SCTP).
    CannotProvideExternal,
    /// 12: the client's address is not the one it sends from, or not the host's.
    AddressMismatch,
    /// 13: more FILTER options than the agent takes.
    ExcessiveRemotePeers,
}

impl ResultCode {
    /// The number on the wire.
    pub fn number(self) -> u8 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::MalformedRequest => 3,
            ResultCode::UnsupportedOpcode => 4,
            ResultCode::UnsupportedOption => 5,
            ResultCode::MalformedOption => 6,
            ResultCode::NetworkFailure => 7,
            ResultCode::NoResources => 8,
            ResultCode::UnsupportedProtocol => 9,
            ResultCode::UserExceededQuota => 10,
            ResultCode::CannotProvideExternal => 11,
            ResultCode::AddressMismatch => 12,
            ResultCode::ExcessiveRemotePeers => 13,
        }
    }
}

/// A FILTER option: only peers in this prefix (and from this port, 0 for any) may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    /// The peer's address (an IPv4 one when the option carried an IPv4-mapped address).
    pub address: IpAddr,
    /// The prefix length, of `address`'s family.
    pub prefix_len: u8,
    /// The peer's port, 0 for any.
    pub port: u16,
}

/// A MAP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    /// Identifies the mapping's client.
    pub nonce: [u8; 12],
    /// The IANA protocol number.
    pub protocol: u8,
    /// The port the application listens on.
    pub internal_port: u16,
    /// The external port it would like, 0 for no preference (the internal one is what is
    /// granted; see [`Map::exact_or_nothing`]).
    pub suggested_external_port: u16,
    /// The external address it would like, the all-zeros address for no preference (the
    /// client's own is what is granted).
    pub suggested_external_address: IpAddr,
    /// FILTER options, in order.
    pub filters: Vec<Filter>,
    /// Whether PREFER_FAILURE was sent.
    pub prefer_failure: bool,
}

impl Map {
    /// Whether the client wants the suggested external port and address or no mapping at all:
    /// with PREFER_FAILURE, and for SCTP, where RFC 6887 section 7.4 says it is implied.
    pub fn exact_or_nothing(&self) -> bool {
        const SCTP: u8 = 132;
        self.prefer_failure || self.protocol == SCTP
    }

    /// Whether what the agent grants, the internal port as external port on `external` (the
    /// client's own address: FWNP does not translate), is what the client suggested.
    pub fn can_be_given(&self, external: IpAddr) -> bool {
        let port = self.suggested_external_port;
        let address = self.suggested_external_address;
        (port == 0 || port == self.internal_port)
            && (address.is_unspecified() || address == external)
    }
}

/// The parts of a request the answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Seconds asked; 0 deletes.
    pub lifetime: u32,
    /// The address the client says it sends from (an IPv4 one for an IPv4-mapped address).
    pub client: IpAddr,
    /// ANNOUNCE or MAP.
    pub op: Op,
}

/// The opcodes served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// ANNOUNCE.
    Announce,
    /// MAP.
    Map(Map),
}

/// Why a request is not served; [`RequestError::answer`] builds its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Shorter than two octets, or an answer: dropped without an answer (RFC 6887 section 8.3).
    #[error("not a PCP request")]
    Dropped,
    /// The request is answered with this code.
    #[error("PCP request refused: {reason}")]
    Refused {
        /// The code.
        code: ResultCode,
        /// Why, for the log.
        reason: &'static str,
    },
}

/// An address of the 16-octet form: IPv4-mapped addresses are IPv4.
fn address_at(bytes: &[u8]) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(bytes);
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The 16-octet form of an address.
pub fn address_bytes(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn refused(code: ResultCode, reason: &'static str) -> RequestError {
    RequestError::Refused { code, reason }
}

/// Reads a request.
///
/// ```
/// use fwnp_agent::frontend::pcp::{decode_request, Op};
/// let mut announce = vec![2, 0, 0, 0, 0, 0, 0, 0];
/// announce.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]);
/// let request = decode_request(&announce).unwrap();
/// assert_eq!(request.op, Op::Announce);
/// assert_eq!(request.client, "192.0.2.7".parse::<std::net::IpAddr>().unwrap());
/// ```
pub fn decode_request(bytes: &[u8]) -> Result<Request, RequestError> {
    let (Some(&version), Some(&second)) = (bytes.first(), bytes.get(1)) else {
        return Err(RequestError::Dropped);
    };
    if second & 0x80 != 0 {
        return Err(RequestError::Dropped);
    }
    if version != VERSION {
        return Err(refused(ResultCode::UnsupportedVersion, "not version 2"));
    }
    if bytes.len() > MAX_MESSAGE || !bytes.len().is_multiple_of(4) || bytes.len() < HEADER_LEN {
        return Err(refused(
            ResultCode::MalformedRequest,
            "the length is not a multiple of 4 between 24 and 1100",
        ));
    }
    let opcode = second & 0x7f;
    let lifetime = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let client = address_at(&bytes[8..24]);
    let (op, options) = match opcode {
        OP_ANNOUNCE => (Op::Announce, &bytes[HEADER_LEN..]),
        OP_MAP => {
            let Some(body) = bytes.get(HEADER_LEN..HEADER_LEN + MAP_LEN) else {
                return Err(refused(ResultCode::MalformedRequest, "MAP is truncated"));
            };
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&body[..12]);
            let map = Map {
                nonce,
                protocol: body[12],
                internal_port: u16::from_be_bytes([body[16], body[17]]),
                suggested_external_port: u16::from_be_bytes([body[18], body[19]]),
                suggested_external_address: address_at(&body[20..36]),
                filters: Vec::new(),
                prefer_failure: false,
            };
            (Op::Map(map), &bytes[HEADER_LEN + MAP_LEN..])
        }
        _ => return Err(refused(ResultCode::UnsupportedOpcode, "unknown opcode")),
    };
    let mut op = op;
    let mut rest = options;
    // Each option takes at least its 4-octet header: bounded by the message's length.
    while !rest.is_empty() {
        let Some(header) = rest.get(..4) else {
            return Err(refused(
                ResultCode::MalformedOption,
                "option header truncated",
            ));
        };
        let code = header[0];
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let padded = len.div_ceil(4) * 4;
        let Some(data) = rest.get(4..4 + len) else {
            return Err(refused(
                ResultCode::MalformedOption,
                "option data truncated",
            ));
        };
        rest = rest.get(4 + padded..).unwrap_or(&[]);
        match (&mut op, code) {
            (Op::Map(map), OPTION_FILTER) => {
                if len != 20 {
                    return Err(refused(ResultCode::MalformedOption, "FILTER is 20 octets"));
                }
                let prefix_len = data[1];
                let port = u16::from_be_bytes([data[2], data[3]]);
                let address = address_at(&data[4..20]);
                let prefix_len = match address {
                    IpAddr::V4(_) if (96..=128).contains(&prefix_len) => prefix_len - 96,
                    IpAddr::V6(_) if prefix_len <= 128 => prefix_len,
                    _ => {
                        return Err(refused(
                            ResultCode::MalformedOption,
                            "FILTER prefix length out of range",
                        ));
                    }
                };
                if map.filters.len() >= MAX_FILTERS {
                    return Err(refused(
                        ResultCode::ExcessiveRemotePeers,
                        "too many FILTER options",
                    ));
                }
                map.filters.push(Filter {
                    address,
                    prefix_len,
                    port,
                });
            }
            // RFC 6887 section 13.2: no data, at most once; section 7.3: MALFORMED_OPTION else.
            (Op::Map(map), OPTION_PREFER_FAILURE) => {
                if len != 0 {
                    return Err(refused(
                        ResultCode::MalformedOption,
                        "PREFER_FAILURE has no data",
                    ));
                }
                if map.prefer_failure {
                    return Err(refused(
                        ResultCode::MalformedOption,
                        "PREFER_FAILURE more than once",
                    ));
                }
                map.prefer_failure = true;
            }
            // Options 128 and above may be ignored; below, they must be understood.
            (_, code) if code >= 128 => {}
            _ => {
                return Err(refused(
                    ResultCode::UnsupportedOption,
                    "an option the agent does not serve",
                ));
            }
        }
    }
    Ok(Request {
        lifetime,
        client,
        op,
    })
}

/// The common header of an answer to `opcode`.
fn header(opcode: u8, result: ResultCode, lifetime: u32, epoch: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + MAP_LEN);
    out.push(VERSION);
    out.push(0x80 | (opcode & 0x7f));
    out.push(0);
    out.push(result.number());
    out.extend_from_slice(&lifetime.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&[0u8; 12]);
    out
}

impl RequestError {
    /// The answer to the refused `request`, if it gets one: the header with the code, then
    /// the request's opcode-specific part copied, as RFC 6887 section 7.2 asks.
    pub fn answer(&self, request: &[u8], epoch: u32) -> Option<Vec<u8>> {
        let RequestError::Refused { code, .. } = self else {
            return None;
        };
        let opcode = request.get(1).copied().unwrap_or(0) & 0x7f;
        // RFC 6887 section 7.4: short lifetime errors may go away soon (30 seconds), long
        // ones will not (30 minutes). CANNOT_PROVIDE_EXTERNAL's depends on its cause; here it
        // is that the agent never gives another port or address, which retrying cannot change.
        let lifetime = match code {
            ResultCode::NetworkFailure
            | ResultCode::NoResources
            | ResultCode::UserExceededQuota => 30,
            _ => 1800,
        };
        let mut out = header(opcode, *code, lifetime, epoch);
        if *code != ResultCode::UnsupportedVersion
            && let Some(rest) = request.get(HEADER_LEN..)
        {
            let end = rest.len().min(MAX_MESSAGE - HEADER_LEN) / 4 * 4;
            out.extend_from_slice(&rest[..end]);
        }
        Some(out)
    }
}

/// The answer to an ANNOUNCE.
pub fn encode_announce(epoch: u32) -> Vec<u8> {
    header(OP_ANNOUNCE, ResultCode::Success, 0, epoch)
}

/// The answer to a MAP: the mapping's lifetime, the port granted as external port (the
/// internal one: FWNP does not translate) and the host's address as external address.
pub fn encode_map(
    map: &Map,
    result: ResultCode,
    lifetime: u32,
    epoch: u32,
    external_port: u16,
    external_address: IpAddr,
) -> Vec<u8> {
    let mut out = header(OP_MAP, result, lifetime, epoch);
    out.extend_from_slice(&map.nonce);
    out.push(map.protocol);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&map.internal_port.to_be_bytes());
    out.extend_from_slice(&external_port.to_be_bytes());
    out.extend_from_slice(&address_bytes(external_address));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_request(lifetime: u32, options: &[u8]) -> Vec<u8> {
        let mut out = vec![2, 1, 0, 0];
        out.extend_from_slice(&lifetime.to_be_bytes());
        out.extend_from_slice(&address_bytes("198.51.100.2".parse().unwrap()));
        out.extend_from_slice(&[7u8; 12]);
        out.extend_from_slice(&[6, 0, 0, 0, 0x1c, 0xe8, 0, 0]);
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(options);
        out
    }

    #[test]
    fn decodes_map_with_filter() {
        let mut filter = vec![OPTION_FILTER, 0, 0, 20, 0, 120, 0, 0];
        filter.extend_from_slice(&address_bytes("203.0.113.0".parse().unwrap()));
        let request = decode_request(&map_request(60, &filter)).unwrap();
        assert_eq!(request.lifetime, 60);
        assert_eq!(request.client, "198.51.100.2".parse::<IpAddr>().unwrap());
        let Op::Map(map) = request.op else {
            panic!("not MAP")
        };
        assert_eq!((map.protocol, map.internal_port), (6, 7400));
        assert_eq!(
            map.filters,
            vec![Filter {
                address: "203.0.113.0".parse().unwrap(),
                prefix_len: 24,
                port: 0
            }]
        );
        let answer = encode_map(
            &map,
            ResultCode::Success,
            60,
            5,
            7400,
            "198.51.100.2".parse().unwrap(),
        );
        assert_eq!(answer.len(), HEADER_LEN + MAP_LEN);
        assert_eq!(answer[..4], [2, 0x81, 0, 0]);
        assert_eq!(answer[24..36], [7u8; 12]);
    }

    #[test]
    fn refuses_with_the_right_codes() {
        let code = |bytes: &[u8]| match decode_request(bytes) {
            Err(RequestError::Refused { code, .. }) => Some(code),
            _ => None,
        };
        assert_eq!(decode_request(&[2]), Err(RequestError::Dropped));
        assert_eq!(decode_request(&[2, 0x81, 0, 0]), Err(RequestError::Dropped));
        assert_eq!(code(&[3, 1, 0, 0]), Some(ResultCode::UnsupportedVersion));
        let request = map_request(60, &[]);
        assert_eq!(code(&request[..40]), Some(ResultCode::MalformedRequest));
        assert_eq!(code(&request[..41]), Some(ResultCode::MalformedRequest));
        let mut unknown = request.clone();
        unknown[1] = 9;
        assert_eq!(code(&unknown), Some(ResultCode::UnsupportedOpcode));
        assert_eq!(
            code(&map_request(60, &[OPTION_THIRD_PARTY, 0, 0, 0])),
            Some(ResultCode::UnsupportedOption)
        );
        assert_eq!(
            code(&map_request(60, &[OPTION_FILTER, 0, 0, 4, 0, 0, 0, 0])),
            Some(ResultCode::MalformedOption)
        );
        // An optional option is ignored.
        assert!(decode_request(&map_request(60, &[200, 0, 0, 0])).is_ok());
        // PREFER_FAILURE has no data and comes at most once (RFC 6887 section 13.2).
        let prefer_failure = [OPTION_PREFER_FAILURE, 0, 0, 0];
        let Op::Map(map) = decode_request(&map_request(60, &prefer_failure))
            .expect("PREFER_FAILURE")
            .op
        else {
            panic!("not MAP")
        };
        assert!(map.prefer_failure);
        assert_eq!(
            code(&map_request(60, &[prefer_failure, prefer_failure].concat())),
            Some(ResultCode::MalformedOption),
            "PREFER_FAILURE twice"
        );
        assert_eq!(
            code(&map_request(
                60,
                &[OPTION_PREFER_FAILURE, 0, 0, 4, 0, 0, 0, 0]
            )),
            Some(ResultCode::MalformedOption),
            "PREFER_FAILURE with data"
        );
        let error = decode_request(&unknown).unwrap_err();
        let answer = error.answer(&unknown, 3).expect("an answer");
        assert_eq!(answer[..4], [2, 0x89, 0, 4]);
        assert_eq!(answer.len(), unknown.len());
    }

    #[test]
    fn prefer_failure_asks_for_the_suggested_external_port_and_address_or_nothing() {
        let host: IpAddr = "198.51.100.2".parse().unwrap();
        let map = |protocol: u8, port: u16, address: &str, prefer_failure: bool| Map {
            nonce: [7; 12],
            protocol,
            internal_port: 7400,
            suggested_external_port: port,
            suggested_external_address: address.parse().unwrap(),
            filters: Vec::new(),
            prefer_failure,
        };
        // What the agent gives: the internal port on the client's own address; a suggestion
        // of 0 or the all-zeros address is no preference.
        for (port, address) in [
            (0, "0.0.0.0"),
            (0, "::"),
            (7400, "0.0.0.0"),
            (0, "198.51.100.2"),
            (7400, "198.51.100.2"),
        ] {
            assert!(
                map(6, port, address, true).can_be_given(host),
                "{port} {address}"
            );
        }
        for (port, address) in [
            (7401, "0.0.0.0"),
            (0, "198.51.100.3"),
            (7400, "2001:db8::2"),
        ] {
            assert!(
                !map(6, port, address, true).can_be_given(host),
                "{port} {address}"
            );
        }
        // Only PREFER_FAILURE, or SCTP where it is implied (RFC 6887 section 7.4), asks for the
        // suggestion or nothing.
        assert!(map(6, 7401, "0.0.0.0", true).exact_or_nothing());
        assert!(!map(6, 7401, "0.0.0.0", false).exact_or_nothing());
        assert!(map(132, 7401, "0.0.0.0", false).exact_or_nothing());
    }

    #[test]
    fn error_answers_carry_their_lifetimes() {
        let request = map_request(60, &[OPTION_PREFER_FAILURE, 0, 0, 0]);
        let lifetime = |code: ResultCode| {
            let answer = RequestError::Refused {
                code,
                reason: "test",
            }
            .answer(&request, 3)
            .expect("an answer");
            assert_eq!(answer[3], code.number());
            // The request's MAP part and options, copied (RFC 6887 section 7.2).
            assert_eq!(answer[HEADER_LEN..], request[HEADER_LEN..]);
            u32::from_be_bytes([answer[4], answer[5], answer[6], answer[7]])
        };
        assert_eq!(ResultCode::CannotProvideExternal.number(), 11);
        // The agent never gives another port or address: asking again will not help soon.
        assert_eq!(lifetime(ResultCode::CannotProvideExternal), 1800);
        // Short lifetime errors (RFC 6887 section 7.4): 30 seconds.
        for code in [
            ResultCode::NetworkFailure,
            ResultCode::NoResources,
            ResultCode::UserExceededQuota,
        ] {
            assert_eq!(lifetime(code), 30, "{code:?}");
        }
        for code in [ResultCode::NotAuthorized, ResultCode::MalformedOption] {
            assert_eq!(lifetime(code), 1800, "{code:?}");
        }
    }
}
