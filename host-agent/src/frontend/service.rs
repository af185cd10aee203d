//! The UDP service on loopback port 5351 (where the host table sends the host's own requests
//! to its gateways' port 5351): each datagram is read by the codec of its version (0 NAT-PMP,
//! 2 PCP) and answered on its own task, so that one slow answer from the gateway holds up no
//! other client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::local::{DenialCode, LocalCode};
use fwnp_proto::{Family, Prefix, Protocol, ResultCode as WireCode};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::natpmp::{self, MapProtocol, Request};
use super::pcp;
use super::{MapRequest, Refusal, Seam, Via};
use crate::config::FrontendsConfig;

/// The largest datagram read: PCP's limit (RFC 6887 section 7); anything longer is cut and
/// refused as malformed.
const MAX_DATAGRAM: usize = 1100;

/// What the service shares with the tasks answering its datagrams.
struct Service {
    seam: Arc<Seam>,
    config: FrontendsConfig,
    started: Instant,
}

impl Service {
    /// Seconds since the front end started (the epoch both protocols report).
    fn epoch(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

/// Binds the service's sockets on 127.0.0.1 and ::1; fails only if neither can be bound.
pub async fn bind(config: &FrontendsConfig) -> std::io::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::new();
    let mut last_error = None;
    for address in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        match UdpSocket::bind(SocketAddr::new(address, config.port)).await {
            Ok(socket) => sockets.push(socket),
            Err(e) => {
                warn!(%address, port = config.port, "NAT-PMP/PCP socket: {e}");
                last_error = Some(e);
            }
        }
    }
    match (sockets.is_empty(), last_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(sockets),
    }
}

/// Serves the sockets until the core goes away.
pub async fn serve(sockets: Vec<UdpSocket>, seam: Arc<Seam>, config: FrontendsConfig) {
    let service = Arc::new(Service {
        seam: seam.clone(),
        config,
        started: Instant::now(),
    });
    if service.config.natpmp {
        tokio::spawn(announce(service.clone()));
    }
    let mut tasks = Vec::new();
    for socket in sockets {
        info!(address = ?socket.local_addr().ok(), "NAT-PMP/PCP front end listening");
        tasks.push(tokio::spawn(receive(Arc::new(socket), service.clone())));
    }
    seam.sweep().await;
    for task in tasks {
        task.abort();
    }
}

async fn receive(socket: Arc<UdpSocket>, service: Arc<Service>) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                debug!("NAT-PMP/PCP receive: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let datagram = buf[..len].to_vec();
        let socket = socket.clone();
        let service = service.clone();
        tokio::spawn(async move {
            if let Some(answer) = service.answer(&datagram, from).await
                && let Err(e) = socket.send_to(&answer, from).await
            {
                debug!(%from, "NAT-PMP/PCP answer: {e}");
            }
        });
    }
}

/// RFC 6886 section 3.2.1: at start, the external address is multicast to 224.0.0.1:5350 ten
/// times, the first interval 250 ms and each next one twice as long.
async fn announce(service: Arc<Service>) {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await else {
        return;
    };
    let address = local_ipv4().unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut interval = Duration::from_millis(250);
    for _ in 0..10 {
        let message =
            natpmp::encode_external_address(natpmp::ResultCode::Success, service.epoch(), address);
        let _ = socket
            .send_to(
                &message,
                (Ipv4Addr::new(224, 0, 0, 1), natpmp::ANNOUNCE_PORT),
            )
            .await;
        tokio::time::sleep(interval).await;
        interval *= 2;
    }
}

/// What the host table must admit for the host's own processes to hear the announcements
/// multicast from `address` (the host's).
pub fn admitted_announcements(address: Option<Ipv4Addr>) -> Vec<fwnp_netfilter::AlwaysAllowed> {
    address
        .into_iter()
        .map(|addr| fwnp_netfilter::AlwaysAllowed {
            remote: Prefix {
                addr: IpAddr::V4(addr),
                len: 32,
            },
            protocol: Some(Protocol::Udp),
            ports: Some(fwnp_proto::PortRange::single(natpmp::ANNOUNCE_PORT)),
        })
        .collect()
}

/// The host's IPv4 address towards its default route (no packet is sent to learn it).
pub(crate) fn local_ipv4() -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

impl Service {
    async fn answer(&self, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        match datagram.first() {
            Some(&natpmp::VERSION) if self.config.natpmp => self.natpmp(datagram, from).await,
            _ if self.config.pcp => self.pcp(datagram, from).await,
            _ if self.config.natpmp => {
                // Another version while only NAT-PMP is served: NAT-PMP's Unsupported Version.
                let error = natpmp::decode_request(datagram).err()?;
                error.answer(self.epoch()).map(|a| a.to_vec())
            }
            _ => None,
        }
    }

    async fn natpmp(&self, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        let epoch = self.epoch();
        let request = match natpmp::decode_request(datagram) {
            Ok(request) => request,
            Err(e) => {
                debug!(%from, "NAT-PMP request refused: {e}");
                return e.answer(epoch).map(|a| a.to_vec());
            }
        };
        let (protocol, internal_port, lifetime) = match request {
            Request::ExternalAddress => {
                let address = match from.ip() {
                    IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
                    _ => local_ipv4(),
                };
                return Some(
                    natpmp::encode_external_address(
                        natpmp::ResultCode::Success,
                        epoch,
                        address.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    )
                    .to_vec(),
                );
            }
            Request::Map {
                protocol,
                internal_port,
                lifetime,
                ..
            } => (protocol, internal_port, lifetime),
        };
        let fwnp_protocol = match protocol {
            MapProtocol::Udp => Protocol::Udp,
            MapProtocol::Tcp => Protocol::Tcp,
        };
        let refuse = |code| {
            Some(natpmp::encode_mapping(protocol, code, epoch, internal_port, 0, 0).to_vec())
        };
        let requester = match self.seam.udp_sender(from.port()).await {
            Ok(pid) => pid,
            Err(e) => {
                info!(%from, "NAT-PMP request refused: {e}");
                return refuse(natpmp::ResultCode::NotAuthorized);
            }
        };
        let request = MapRequest {
            via: Via::NatPmp,
            requester,
            protocol: fwnp_protocol,
            port: internal_port,
            lifetime,
            // NAT-PMP speaks of IPv4 only; the address the client sends from, unless it sent to
            // loopback itself.
            host: match from.ip() {
                IpAddr::V4(v4) if !v4.is_loopback() => Some(IpAddr::V4(v4)),
                _ => None,
            },
            family: Some(Family::Ipv4),
            remotes: Vec::new(),
            nonce: None,
        };
        if lifetime == 0 {
            return match self.seam.unmap(&request).await {
                Ok(_) => Some(
                    natpmp::encode_mapping(
                        protocol,
                        natpmp::ResultCode::Success,
                        epoch,
                        internal_port,
                        0,
                        0,
                    )
                    .to_vec(),
                ),
                Err(e) => refuse(natpmp_code(&e)),
            };
        }
        if internal_port == 0 {
            return refuse(natpmp::ResultCode::NotAuthorized);
        }
        let mapped = self.seam.map(request).await;
        match mapped {
            Ok(mapped) => {
                info!(
                    pid = requester,
                    holder = mapped.holder,
                    port = internal_port,
                    lifetime = mapped.lifetime,
                    "NAT-PMP mapping granted"
                );
                Some(
                    natpmp::encode_mapping(
                        protocol,
                        natpmp::ResultCode::Success,
                        epoch,
                        internal_port,
                        internal_port,
                        mapped.lifetime,
                    )
                    .to_vec(),
                )
            }
            Err(e) => {
                info!(
                    pid = requester,
                    port = internal_port,
                    "NAT-PMP mapping refused: {e}"
                );
                refuse(natpmp_code(&e))
            }
        }
    }
}

impl Service {
    async fn pcp(&self, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        let epoch = self.epoch();
        let request = match pcp::decode_request(datagram) {
            Ok(request) => request,
            Err(e) => {
                debug!(%from, "{e}");
                return e.answer(datagram, epoch);
            }
        };
        let refuse = |code, reason: &'static str| {
            pcp::RequestError::Refused { code, reason }.answer(datagram, epoch)
        };
        let map = match request.op {
            pcp::Op::Announce => return Some(pcp::encode_announce(epoch)),
            pcp::Op::Map(map) => map,
        };
        // The client says which address it sends from; after the redirect the source is still
        // the host's (a request sent to loopback comes from loopback).
        let source = match from.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if request.client != source {
            info!(%from, client = %request.client, "PCP request refused: address mismatch");
            return refuse(pcp::ResultCode::AddressMismatch, "address mismatch");
        }
        let protocol = match map.protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            136 => Protocol::UdpLite,
            _ => return refuse(pcp::ResultCode::UnsupportedProtocol, "protocol"),
        };
        let mut remotes = Vec::new();
        for filter in &map.filters {
            if filter.port != 0 {
                return refuse(
                    pcp::ResultCode::UnsupportedOption,
                    "FWNP does not restrict the remote port",
                );
            }
            if filter.prefix_len == 0 {
                // A FILTER of length 0 lifts every filter (RFC 6887 section 13.3).
                remotes.clear();
                continue;
            }
            if filter.address.is_ipv4() != request.client.is_ipv4() {
                return refuse(pcp::ResultCode::MalformedOption, "FILTER of another family");
            }
            let Ok(net) = ipnet::IpNet::new(filter.address, filter.prefix_len) else {
                return refuse(pcp::ResultCode::MalformedOption, "FILTER prefix length");
            };
            remotes.push(Prefix {
                addr: net.trunc().addr(),
                len: filter.prefix_len,
            });
        }
        let requester = match self.seam.udp_sender(from.port()).await {
            Ok(pid) => pid,
            Err(e) => {
                info!(%from, "PCP request refused: {e}");
                return refuse(pcp::ResultCode::NotAuthorized, "no caller");
            }
        };
        let answer = |code, lifetime| {
            Some(pcp::encode_map(
                &map,
                code,
                lifetime,
                epoch,
                map.internal_port,
                request.client,
            ))
        };
        let family = match request.client {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        };
        // A mapping is named by its internal address, protocol and port (RFC 6887 section
        // 11.3): a MAP of the same port for the client's other address is another mapping.
        let mapping = MapRequest {
            via: Via::Pcp,
            requester,
            protocol,
            port: map.internal_port,
            lifetime: request.lifetime,
            host: (!request.client.is_loopback()).then_some(request.client),
            family: Some(family),
            remotes,
            nonce: Some(map.nonce),
        };
        if request.lifetime == 0 {
            return match self.seam.unmap(&mapping).await {
                Ok(_) => answer(pcp::ResultCode::Success, 0),
                Err(e) => {
                    info!(pid = requester, "PCP delete refused: {e}");
                    refuse(pcp_code(&e), "refused")
                }
            };
        }
        if map.internal_port == 0 {
            return refuse(pcp::ResultCode::UnsupportedProtocol, "all ports");
        }
        // RFC 6887 section 13.2: no mapping rather than one other than suggested.
        if map.exact_or_nothing() && !map.can_be_given(request.client) {
            info!(
                pid = requester,
                port = map.internal_port,
                suggested_port = map.suggested_external_port,
                suggested_address = %map.suggested_external_address,
                "PCP mapping refused: the suggested external port or address cannot be given"
            );
            return refuse(
                pcp::ResultCode::CannotProvideExternal,
                "the suggested external port or address",
            );
        }
        match self.seam.map(mapping).await {
            Ok(mapped) => {
                info!(
                    pid = requester,
                    holder = mapped.holder,
                    port = map.internal_port,
                    lifetime = mapped.lifetime,
                    "PCP mapping granted"
                );
                answer(pcp::ResultCode::Success, mapped.lifetime)
            }
            Err(e) => {
                info!(
                    pid = requester,
                    port = map.internal_port,
                    "PCP mapping refused: {e}"
                );
                refuse(pcp_code(&e), "refused")
            }
        }
    }
}

/// PCP's result code for a refusal.
fn pcp_code(refusal: &Refusal) -> pcp::ResultCode {
    use pcp::ResultCode as P;
    match refusal {
        Refusal::NoCaller { .. } | Refusal::NonceMismatch => P::NotAuthorized,
        Refusal::CoreGone | Refusal::NoAnswer => P::NetworkFailure,
        Refusal::Denied { code, .. } => match code {
            DenialCode::Local(LocalCode::GatewayUnreachable) => P::NetworkFailure,
            DenialCode::Wire(WireCode::QuotaExceeded) => P::UserExceededQuota,
            DenialCode::Wire(WireCode::NoResources | WireCode::RateLimited) => P::NoResources,
            DenialCode::Wire(WireCode::AddressMismatch) => P::AddressMismatch,
            DenialCode::Wire(WireCode::MalformedOption) => P::MalformedOption,
            DenialCode::Wire(WireCode::UnsupportedOption) => P::UnsupportedOption,
            DenialCode::Wire(WireCode::MalformedRequest | WireCode::LifetimeOutOfRange) => {
                P::MalformedRequest
            }
            // RFC 6887 section 7.4: NOT_AUTHORIZED is for "an operation that cannot be
            // fulfilled by the PCP server's security policy". An internal port the client does
            // not listen on is such a refusal: the mapping would serve another process.
            // CANNOT_PROVIDE_EXTERNAL does not fit: the external port is not what is refused.
            DenialCode::Local(LocalCode::PortNotOwned) => P::NotAuthorized,
            _ => P::NotAuthorized,
        },
    }
}

/// NAT-PMP's result code for a refusal.
fn natpmp_code(refusal: &Refusal) -> natpmp::ResultCode {
    use natpmp::ResultCode as N;
    match refusal {
        Refusal::NoCaller { .. } | Refusal::NonceMismatch => N::NotAuthorized,
        Refusal::CoreGone | Refusal::NoAnswer => N::NetworkFailure,
        Refusal::Denied { code, .. } => match code {
            DenialCode::Local(LocalCode::GatewayUnreachable) => N::NetworkFailure,
            DenialCode::Wire(
                WireCode::QuotaExceeded | WireCode::NoResources | WireCode::RateLimited,
            ) => N::OutOfResources,
            // RFC 6886 section 3.5: 2 is "Not Authorized/Refused (e.g., box supports mapping,
            // but user has turned feature off)", NAT-PMP's only code for a refusal by policy;
            // an internal port another process listens on is one.
            DenialCode::Local(LocalCode::PortNotOwned) => N::NotAuthorized,
            _ => N::NotAuthorized,
        },
    }
}
