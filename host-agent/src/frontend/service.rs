//! The UDP service on loopback port 5351 (where the host table sends the host's own requests
//! to its gateways' port 5351): each datagram is read by the codec of its version (0 NAT-PMP,
//! 2 PCP) and answered on its own task, so that one slow answer from the gateway holds up no
//! other client.
//!
//! The clients believe they speak to their gateway, so the announcements the server multicasts
//! to them (NAT-PMP's external address, PCP's unsolicited ANNOUNCE) come from each gateway's
//! address and port 5351, as a conforming client checks: sent with IP_TRANSPARENT, with a hop
//! limit of 0 so that only this host's own listeners get them (they speak for a gateway that did
//! not send them, and must not reach the link).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::local::{DenialCode, LocalCode};
use fwnp_proto::{Family, Prefix, Protocol, ResultCode as WireCode};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::natpmp::{self, MapProtocol, Request};
use super::pcp;
use super::{MapRequest, Refusal, SERVER_PORT, Seam, Via};
use crate::config::FrontendsConfig;

/// The largest datagram read: PCP's limit (RFC 6887 section 7); anything longer is cut and
/// refused as malformed.
const MAX_DATAGRAM: usize = 1100;

/// Where the announcements go: all hosts (all nodes), the port clients listen on.
const ALL_HOSTS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Announcements of one round.
const ANNOUNCEMENTS: u32 = 10;
/// The time between a round's first two announcements; each next one doubles it.
const FIRST_INTERVAL: Duration = Duration::from_millis(250);
/// How often the host's side towards each gateway is looked at: NAT-PMP's announcement is due
/// again when the host's address changes.
const SIDE_CHECK: Duration = Duration::from_secs(2);

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

/// Serves the sockets until the core goes away; announces from each of `gateways` (the
/// addresses the host table redirects from).
pub async fn serve(
    sockets: Vec<UdpSocket>,
    seam: Arc<Seam>,
    config: FrontendsConfig,
    gateways: Vec<IpAddr>,
) {
    let service = Arc::new(Service {
        seam: seam.clone(),
        config,
        started: Instant::now(),
    });
    let mut tasks: Vec<_> = gateways
        .into_iter()
        .map(|gateway| tokio::spawn(announce(service.clone(), gateway)))
        .collect();
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

/// When the announcements of a round are due: ten, the first at once and each next one after
/// twice the interval before it, from 250 ms (RFC 6886 section 3.2.1; RFC 6887 section 14.1.3
/// for PCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Round {
    next: tokio::time::Instant,
    interval: Duration,
    left: u32,
}

impl Round {
    fn starting(now: tokio::time::Instant) -> Round {
        Round {
            next: now,
            interval: FIRST_INTERVAL,
            left: ANNOUNCEMENTS,
        }
    }

    /// When the next announcement is due; `None` once the round is over.
    fn due(&self) -> Option<tokio::time::Instant> {
        (self.left > 0).then_some(self.next)
    }

    /// One more was sent.
    fn sent(&mut self) {
        self.left = self.left.saturating_sub(1);
        self.next += self.interval;
        self.interval = self.interval.saturating_mul(2);
    }
}

/// The host's side towards a gateway: what an announcement in its name is sent through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The host's IPv4 address towards it: NAT-PMP's external address (FWNP does not translate)
    /// and the interface the announcement is looped back on.
    V4(Ipv4Addr),
    /// The index of the interface it is reached through.
    V6(u32),
}

impl Side {
    /// The host's side towards `gateway` now, if it has one (no packet is sent to learn it).
    fn towards(gateway: IpAddr) -> Option<Side> {
        let read = |file: &str| std::fs::read_to_string(file).unwrap_or_default();
        match gateway {
            IpAddr::V4(_) => match local_address(SocketAddr::new(gateway, SERVER_PORT))? {
                IpAddr::V4(v4) => Some(Side::V4(v4)),
                IpAddr::V6(_) => None,
            },
            // A link-local next hop has no route of its own to ask: its default route's
            // interface is the one.
            IpAddr::V6(v6) if v6.is_unicast_link_local() => interface_of_next_hop(
                &read("/proc/net/ipv6_route"),
                &read("/proc/net/if_inet6"),
                v6,
            )
            .map(Side::V6),
            IpAddr::V6(_) => match local_address(SocketAddr::new(gateway, SERVER_PORT))? {
                IpAddr::V6(local) => {
                    interface_of_address(&read("/proc/net/if_inet6"), local).map(Side::V6)
                }
                IpAddr::V4(_) => None,
            },
        }
    }
}

/// The address the host sends to `to` from (no packet is sent to learn it).
fn local_address(to: SocketAddr) -> Option<IpAddr> {
    let any = match to {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = std::net::UdpSocket::bind(SocketAddr::new(any, 0)).ok()?;
    socket.connect(to).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// The index of the interface holding `address`, from the text of `/proc/net/if_inet6`.
fn interface_of_address(if_inet6: &str, address: Ipv6Addr) -> Option<u32> {
    if_inet6.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let held = u128::from_str_radix(fields.first()?, 16).ok()?;
        (Ipv6Addr::from(held) == address)
            .then(|| u32::from_str_radix(fields.get(1)?, 16).ok())
            .flatten()
    })
}

/// The index of the interface of a route through `hop`, from the texts of
/// `/proc/net/ipv6_route` (which names the interface) and `/proc/net/if_inet6` (which numbers
/// it).
fn interface_of_next_hop(ipv6_route: &str, if_inet6: &str, hop: Ipv6Addr) -> Option<u32> {
    let name = ipv6_route.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let next_hop = u128::from_str_radix(fields.get(4)?, 16).ok()?;
        (Ipv6Addr::from(next_hop) == hop)
            .then(|| fields.get(9).copied())
            .flatten()
    })?;
    if_inet6.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(5) == Some(&name))
            .then(|| u32::from_str_radix(fields.get(1)?, 16).ok())
            .flatten()
    })
}

/// A socket that sends as `gateway`'s port 5351 to this host's own listeners on `side`.
fn announcer(gateway: IpAddr, side: Side) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let unsupported = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let socket = match (gateway, side) {
        (IpAddr::V4(gateway), Side::V4(host)) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(socket2::Protocol::UDP))?;
            // Binding and sending from an address the host does not hold (CAP_NET_ADMIN).
            socket.set_ip_transparent_v4(true)?;
            socket.set_multicast_if_v4(&host)?;
            socket.set_multicast_ttl_v4(0)?;
            socket.set_multicast_loop_v4(true)?;
            socket.bind(&SocketAddr::from((gateway, SERVER_PORT)).into())?;
            socket
        }
        (IpAddr::V6(gateway), Side::V6(interface)) => {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(socket2::Protocol::UDP))?;
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
            socket.set_multicast_if_v6(interface)?;
            socket.set_multicast_hops_v6(0)?;
            socket.set_multicast_loop_v6(true)?;
            let scope = if gateway.is_unicast_link_local() {
                interface
            } else {
                0
            };
            let address = std::net::SocketAddrV6::new(gateway, SERVER_PORT, 0, scope);
            socket.bind(&SocketAddr::V6(address).into())?;
            socket
        }
        _ => return Err(unsupported()),
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Announces in `gateway`'s name, until the service stops: at start (RFC 6886 section 3.2.1
/// for NAT-PMP, RFC 6887 section 14.1.3 for PCP, whose ANNOUNCE also goes to ff02::1 from an
/// IPv6 gateway), and NAT-PMP's external address again when the host's address towards the
/// gateway changes. An address lost to the host stops nothing: the round starts again when one
/// is back.
async fn announce(service: Arc<Service>, gateway: IpAddr) {
    let natpmp = service.config.natpmp && gateway.is_ipv4();
    // PCP's ANNOUNCE tells of a restart: one round.
    let mut pcp = service.config.pcp;
    if !natpmp && !pcp {
        return;
    }
    let group = match gateway {
        IpAddr::V4(_) => SocketAddr::from((ALL_HOSTS, natpmp::ANNOUNCE_PORT)),
        IpAddr::V6(_) => SocketAddr::from((ALL_NODES, natpmp::ANNOUNCE_PORT)),
    };
    let mut side = None;
    let mut socket = None;
    let mut round: Option<Round> = None;
    let mut next_check = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now >= next_check {
            next_check = now + SIDE_CHECK;
            let found = Side::towards(gateway);
            if found != side {
                side = found;
                // The old socket holds the gateway's port until it is closed.
                drop(socket.take());
                socket = match side.map(|side| announcer(gateway, side)) {
                    Some(Ok(socket)) => Some(socket),
                    Some(Err(e)) => {
                        warn!(%gateway, "announcements in the gateway's name cannot be sent: {e}");
                        return;
                    }
                    None => None,
                };
                round = (natpmp || pcp).then(|| Round::starting(now));
                debug!(%gateway, ?side, "the host's side towards the gateway");
            }
        }
        if let (Some(socket), Some(due), Some(side)) = (&socket, round.and_then(|r| r.due()), side)
            && due <= now
        {
            let epoch = service.epoch();
            let mut messages = Vec::new();
            if let (true, Side::V4(address)) = (natpmp, side) {
                let answer =
                    natpmp::encode_external_address(natpmp::ResultCode::Success, epoch, address);
                messages.push(answer.to_vec());
            }
            if pcp {
                messages.push(pcp::encode_announce(epoch));
            }
            for message in messages {
                if let Err(e) = socket.send_to(&message, group).await {
                    debug!(%gateway, "announcement: {e}");
                }
            }
            if let Some(round) = &mut round {
                round.sent();
                if round.due().is_none() {
                    pcp = false;
                }
            }
        }
        let wake = match round.and_then(|r| r.due()).filter(|_| socket.is_some()) {
            Some(due) => due.min(next_check),
            None => next_check,
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// What the host table must admit for the host's own processes to hear the announcements sent
/// in `gateways`' names: they are looped back on the outgoing interface, where the input
/// filter sees them as new.
pub fn admitted_announcements(gateways: &[IpAddr]) -> Vec<fwnp_netfilter::AlwaysAllowed> {
    gateways
        .iter()
        .map(|gateway| fwnp_netfilter::AlwaysAllowed {
            remote: Prefix {
                addr: *gateway,
                len: if gateway.is_ipv4() { 32 } else { 128 },
            },
            protocol: Some(Protocol::Udp),
            ports: Some(fwnp_proto::PortRange::single(natpmp::ANNOUNCE_PORT)),
        })
        .collect()
}

/// The host's IPv4 address towards its default route (no packet is sent to learn it).
pub(crate) fn local_ipv4() -> Option<Ipv4Addr> {
    match local_address(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 9)))? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_ten_announcements_each_interval_twice_the_one_before() {
        let start = tokio::time::Instant::now();
        let mut round = Round::starting(start);
        let mut sent = Vec::new();
        while let Some(due) = round.due() {
            sent.push(due.duration_since(start).as_millis());
            round.sent();
            assert!(sent.len() <= 10, "the round does not end");
        }
        assert_eq!(
            sent,
            vec![0, 250, 750, 1750, 3750, 7750, 15750, 31750, 63750, 127750]
        );
    }

    #[test]
    fn finds_the_interface_towards_a_gateway() {
        let if_inet6 = "fd000002000000000000000000000002 02 40 00 80     eth0\n\
            fe80000000000000000000fffe000002 02 40 20 80     eth0\n\
            00000000000000000000000000000001 01 80 10 80       lo\n\
            fe80000000000000000000fffe000003 0a 40 20 80    wlan0\n";
        let ipv6_route = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003    wlan0\n\
            fd000002000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        let address = |text: &str| text.parse::<Ipv6Addr>().expect("an address");
        assert_eq!(
            interface_of_address(if_inet6, address("fd00:2::2")),
            Some(2)
        );
        assert_eq!(interface_of_address(if_inet6, address("fd00:2::9")), None);
        assert_eq!(
            interface_of_next_hop(ipv6_route, if_inet6, address("fe80::1")),
            Some(10)
        );
        assert_eq!(
            interface_of_next_hop(ipv6_route, if_inet6, address("fe80::2")),
            None
        );
    }
}
