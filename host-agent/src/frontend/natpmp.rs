//! NAT-PMP (RFC 6886) messages: the requests a client sends to port 5351 and the answers the
//! agent gives, as fixed binary layouts. No I/O here: bytes in, a typed request or a typed
//! reason to refuse out, and answers written into byte arrays.

use std::net::Ipv4Addr;

/// The only version of NAT-PMP.
pub const VERSION: u8 = 0;
/// Opcode of the external-address request.
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode of a UDP mapping request.
pub const OP_MAP_UDP: u8 = 1;
/// Opcode of a TCP mapping request.
pub const OP_MAP_TCP: u8 = 2;
/// An answer's opcode is the request's plus this.
pub const OP_ANSWER: u8 = 128;
/// The port announcements are multicast to (on 224.0.0.1).
pub const ANNOUNCE_PORT: u16 = 5350;
/// Length of a mapping request.
pub const MAP_REQUEST_LEN: usize = 12;

/// The transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapProtocol {
    /// Opcode 1.
    Udp,
    /// Opcode 2.
    Tcp,
}

impl MapProtocol {
    /// The request's opcode.
    pub fn opcode(self) -> u8 {
        match self {
            MapProtocol::Udp => OP_MAP_UDP,
            MapProtocol::Tcp => OP_MAP_TCP,
        }
    }
}

/// A request the agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Opcode 0: which external address the host has.
    ExternalAddress,
    /// Opcodes 1 and 2: open (lifetime above 0) or delete (lifetime 0) a mapping.
    Map {
        /// UDP or TCP.
        protocol: MapProtocol,
        /// The port the application listens on; 0 with lifetime 0 deletes all its mappings.
        internal_port: u16,
        /// The external port it would like (FWNP does not translate: the internal port is what
        /// is granted).
        suggested_external_port: u16,
        /// Seconds; 0 deletes.
        lifetime: u32,
    },
}

/// Why a datagram is not a request the agent can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Shorter than the version and opcode, or than its opcode's layout: no answer can be
    /// matched to it, so it is dropped.
    #[error("a NAT-PMP request of {len} bytes is truncated")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// A version other than 0 (answered Unsupported Version).
    #[error("NAT-PMP version {version} is not supported")]
    UnsupportedVersion {
        /// The version sent.
        version: u8,
        /// The opcode sent.
        opcode: u8,
    },
    /// An opcode NAT-PMP does not define (answered Unsupported Opcode).
    #[error("NAT-PMP opcode {opcode} is not supported")]
    UnsupportedOpcode {
        /// The opcode sent.
        opcode: u8,
    },
    /// An answer, not a request (another server's announcement): ignored.
    #[error("NAT-PMP opcode {opcode} is an answer")]
    NotARequest {
        /// The opcode sent.
        opcode: u8,
    },
}

impl RequestError {
    /// The answer this refusal gets, if any, given the server's epoch.
    pub fn answer(&self, epoch: u32) -> Option<[u8; 8]> {
        match *self {
            RequestError::Truncated { .. } | RequestError::NotARequest { .. } => None,
            RequestError::UnsupportedVersion { opcode, .. } => {
                Some(encode_error(opcode, ResultCode::UnsupportedVersion, epoch))
            }
            RequestError::UnsupportedOpcode { opcode } => {
                Some(encode_error(opcode, ResultCode::UnsupportedOpcode, epoch))
            }
        }
    }
}

/// NAT-PMP's result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    /// 0.
    Success,
    /// 1.
    UnsupportedVersion,
    /// 2: not authorized or refused (the port is another program's, the policy says no, this
    /// user may not use the agent).
    NotAuthorized,
    /// 3: the network failed (the agent has no connection to the gateway).
    NetworkFailure,
    /// 4: out of resources (a quota, the gateway's resources).
    OutOfResources,
    /// 5.
    UnsupportedOpcode,
}

impl ResultCode {
    /// The number on the wire.
    pub fn number(self) -> u16 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::NetworkFailure => 3,
            ResultCode::OutOfResources => 4,
            ResultCode::UnsupportedOpcode => 5,
        }
    }
}

/// Reads a request.
///
/// ```
/// use fwnp_agent::frontend::natpmp::{decode_request, MapProtocol, Request};
/// let request = decode_request(&[0, 2, 0, 0, 0x1b, 0x58, 0, 0, 0, 0, 0x0e, 0x10]).unwrap();
/// assert_eq!(
///     request,
///     Request::Map {
///         protocol: MapProtocol::Tcp,
///         internal_port: 7000,
///         suggested_external_port: 0,
///         lifetime: 3600,
///     }
/// );
/// ```
pub fn decode_request(bytes: &[u8]) -> Result<Request, RequestError> {
    let (Some(&version), Some(&opcode)) = (bytes.first(), bytes.get(1)) else {
        return Err(RequestError::Truncated { len: bytes.len() });
    };
    if opcode >= OP_ANSWER {
        return Err(RequestError::NotARequest { opcode });
    }
    if version != VERSION {
        return Err(RequestError::UnsupportedVersion { version, opcode });
    }
    let protocol = match opcode {
        OP_EXTERNAL_ADDRESS => return Ok(Request::ExternalAddress),
        OP_MAP_UDP => MapProtocol::Udp,
        OP_MAP_TCP => MapProtocol::Tcp,
        _ => return Err(RequestError::UnsupportedOpcode { opcode }),
    };
    let Some(body) = bytes.get(..MAP_REQUEST_LEN) else {
        return Err(RequestError::Truncated { len: bytes.len() });
    };
    let u16_at = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    Ok(Request::Map {
        protocol,
        internal_port: u16_at(4),
        suggested_external_port: u16_at(6),
        lifetime: u32::from_be_bytes([body[8], body[9], body[10], body[11]]),
    })
}

/// The 8-byte answer to a request refused before its body was read.
pub fn encode_error(opcode: u8, result: ResultCode, epoch: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[1] = OP_ANSWER.wrapping_add(opcode);
    out[2..4].copy_from_slice(&result.number().to_be_bytes());
    out[4..8].copy_from_slice(&epoch.to_be_bytes());
    out
}

/// The answer to an external-address request (also the announcement multicast at start).
pub fn encode_external_address(result: ResultCode, epoch: u32, address: Ipv4Addr) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&encode_error(OP_EXTERNAL_ADDRESS, result, epoch));
    out[8..12].copy_from_slice(&address.octets());
    out
}

/// The answer to a mapping request: the port granted as external port (FWNP does not
/// translate) and the lifetime granted, both 0 after a delete or a refusal.
pub fn encode_mapping(
    protocol: MapProtocol,
    result: ResultCode,
    epoch: u32,
    internal_port: u16,
    external_port: u16,
    lifetime: u32,
) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&encode_error(protocol.opcode(), result, epoch));
    out[8..10].copy_from_slice(&internal_port.to_be_bytes());
    out[10..12].copy_from_slice(&external_port.to_be_bytes());
    out[12..16].copy_from_slice(&lifetime.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_three_requests() {
        assert_eq!(decode_request(&[0, 0]), Ok(Request::ExternalAddress));
        assert_eq!(
            decode_request(&[0, 1, 0, 0, 0x13, 0x88, 0x13, 0x89, 0, 0, 0, 0]),
            Ok(Request::Map {
                protocol: MapProtocol::Udp,
                internal_port: 5000,
                suggested_external_port: 5001,
                lifetime: 0,
            })
        );
        // Trailing bytes are tolerated, as RFC 6886 lets future versions add fields.
        assert!(decode_request(&[0, 2, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 9]).is_ok());
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        assert_eq!(
            decode_request(&[0]),
            Err(RequestError::Truncated { len: 1 })
        );
        assert_eq!(
            decode_request(&[0, 2, 0, 0, 0x1b]),
            Err(RequestError::Truncated { len: 5 })
        );
        let wrong = decode_request(&[1, 2, 0, 0]).unwrap_err();
        assert_eq!(
            wrong,
            RequestError::UnsupportedVersion {
                version: 1,
                opcode: 2
            }
        );
        assert_eq!(wrong.answer(7), Some([0, 130, 0, 1, 0, 0, 0, 7]));
        let unknown = decode_request(&[0, 3]).unwrap_err();
        assert_eq!(unknown, RequestError::UnsupportedOpcode { opcode: 3 });
        assert_eq!(unknown.answer(7), Some([0, 131, 0, 5, 0, 0, 0, 7]));
        assert_eq!(
            decode_request(&[0, 128, 0, 0]),
            Err(RequestError::NotARequest { opcode: 128 })
        );
    }

    #[test]
    fn encodes_answers() {
        assert_eq!(
            encode_external_address(ResultCode::Success, 9, Ipv4Addr::new(198, 51, 100, 2)),
            [0, 128, 0, 0, 0, 0, 0, 9, 198, 51, 100, 2]
        );
        assert_eq!(
            encode_mapping(MapProtocol::Tcp, ResultCode::Success, 1, 7000, 7000, 60),
            [
                0, 130, 0, 0, 0, 0, 0, 1, 0x1b, 0x58, 0x1b, 0x58, 0, 0, 0, 60
            ]
        );
        assert_eq!(
            encode_mapping(MapProtocol::Udp, ResultCode::NotAuthorized, 1, 7000, 0, 0)[..4],
            [0, 129, 0, 2]
        );
    }
}
