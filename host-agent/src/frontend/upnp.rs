//! A UPnP Internet Gateway Device on the host itself: SSDP discovery from local processes is
//! answered (the agent joins 239.255.255.250:1900), the device description and its services'
//! descriptions (SCPD) are served over HTTP, and WANIPConnection's actions (IGD v1 and v2)
//! become FWNP leases through the seam.
//! Who asks is the process at the other end of the HTTP connection.
//!
//! HTTP is the front end's own small exchange ([`super::http`]: one request a connection, its
//! head read with httparse), SSDP's HTTP-over-UDP is read with httparse too and SOAP's XML with
//! quick-xml: a document type declaration or an entity other than XML's five is refused, and a
//! body above [`MAX_BODY`] is refused (HTTP's 413 with UPnP's 501) before any of it is read.
//!
//! A control request's SOAPAction header must name the action of its body, of the service of
//! its control URL (any version): `"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"`
//! for an AddPortMapping posted to WANIPConnection's URL. A request without it, or naming
//! another action or service, is answered UPnP's 401 Invalid Action, as an IGD does, and nothing
//! is done: a proxy or a cache that reads the header must not see one action while the body
//! carries out another.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fwnp_proto::local::{DenialCode, LocalCode};
use fwnp_proto::{Prefix, Protocol, ResultCode as WireCode};
use quick_xml::events::Event;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::http::{self, HttpError, Method, Request, Response, StatusCode};
use super::{MapRequest, Refusal, Seam, Via};

/// The default TCP port of the description and control.
pub const DEFAULT_PORT: u16 = 49152;
/// The largest SOAP request read.
pub const MAX_BODY: usize = 16 * 1024;
/// Deepest element nesting of a SOAP request.
const MAX_DEPTH: usize = 8;
/// Most arguments of one action.
pub const MAX_ARGUMENTS: usize = 16;
/// The SSDP multicast group and port.
const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
const SSDP_PORT: u16 = 1900;
/// The device's UUID (one device per host; it only needs to be stable for a run).
const UUID: &str = "f3a4c1e2-46b0-4c57-9e1f-0a5e7f0b1d2c";
const IGD: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
const WAN_DEVICE: &str = "urn:schemas-upnp-org:device:WANDevice:1";
const WAN_CONNECTION_DEVICE: &str = "urn:schemas-upnp-org:device:WANConnectionDevice:1";
const L3F: &str = "urn:schemas-upnp-org:service:Layer3Forwarding:1";
const WAN_IP: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
const WAN_COMMON: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";
const WAN_IP6_FW: &str = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";
const CONTROL_PATH: &str = "/ctl/IPConn";
const FIREWALL_PATH: &str = "/ctl/IP6FCtl";
/// The SSDP multicast group of IPv6, link-local scope.
const SSDP_GROUP_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xc);
/// Longest pinhole lease (WANIPv6FirewallControl's range is 1 to 86400 seconds).
const MAX_PINHOLE_LEASE: u32 = 86_400;
const COMMON_PATH: &str = "/ctl/CmnIfCfg";
/// The prefix of a service type in a SOAPAction header, before the service's name.
const SERVICE_URN: &str = "urn:schemas-upnp-org:service:";
/// The devices of the description, the root first: each one's UDN after the root's UUID, its
/// type and its services' types.
const DEVICES: [(&str, &str, &[&str]); 3] = [
    ("", IGD, &[L3F]),
    ("-1", WAN_DEVICE, &[WAN_COMMON]),
    ("-2", WAN_CONNECTION_DEVICE, &[WAN_IP, WAN_IP6_FW]),
];
/// The service descriptions (SCPD), by the SCPDURL the description gives each. Each declares
/// the actions its control URL serves, no other: WANIPConnection's has AddAnyPortMapping of
/// version 2 beside those of version 1. No state variable is evented: the agent sends
/// no events (its eventSubURLs are not served), so a control point must not wait for any.
/// Layer3Forwarding has no action the agent serves, hence no actionList (UDA 1.0 section 2.3:
/// present if and only if the service has actions).
const SCPDS: [(&str, &str); 4] = [
    (L3F_SCPD, include_str!("scpd/L3F.xml")),
    (WAN_COMMON_SCPD, include_str!("scpd/WANCfg.xml")),
    (WAN_IP_SCPD, include_str!("scpd/WANIPCn.xml")),
    (WAN_IP6_FW_SCPD, include_str!("scpd/WANIP6FC.xml")),
];
const L3F_SCPD: &str = "/L3F.xml";
const WAN_COMMON_SCPD: &str = "/WANCfg.xml";
const WAN_IP_SCPD: &str = "/WANIPCn.xml";
const WAN_IP6_FW_SCPD: &str = "/WANIP6FC.xml";

/// Whether `header` (a SOAPAction header's value, quoted or not) names `action` of `service`
/// (a service's name, such as `WANIPConnection`), in any version of the service.
///
/// ```
/// use fwnp_agent::frontend::upnp::soap_action_names;
/// let header = "\"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping\"";
/// assert!(soap_action_names(header, "WANIPConnection", "AddPortMapping"));
/// assert!(!soap_action_names(header, "WANIPConnection", "DeletePortMapping"));
/// assert!(!soap_action_names(header, "WANIPv6FirewallControl", "AddPortMapping"));
/// ```
pub fn soap_action_names(header: &str, service: &str, action: &str) -> bool {
    let value = header.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let Some((service_type, name)) = value.rsplit_once('#') else {
        return false;
    };
    let version = service_type
        .strip_prefix(SERVICE_URN)
        .and_then(|rest| rest.strip_prefix(service))
        .and_then(|rest| rest.strip_prefix(':'));
    name == action
        && version.is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// The answer to a control request whose SOAPAction header does not name its body's action of
/// `service`: `None` when it does.
fn soap_action_mismatch(
    request: &Request,
    service: &str,
    action: &Action,
    peer: SocketAddr,
) -> Option<Response> {
    let header = request.header("soapaction");
    if header.is_some_and(|h| soap_action_names(h, service, &action.name)) {
        return None;
    }
    info!(
        %peer,
        action = %action.name,
        soapaction = header.unwrap_or("(none)"),
        "UPnP request refused: its SOAPAction does not name the action of its body"
    );
    Some(fault(401, "Invalid Action"))
}

/// A SOAP action request: its name and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The action's name (the local name of the element in the Body).
    pub name: String,
    /// Its arguments, in order.
    pub arguments: Vec<(String, String)>,
}

impl Action {
    /// The value of argument `name` (empty when absent).
    pub fn argument(&self, name: &str) -> &str {
        self.arguments
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Why a SOAP request cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoapError {
    /// The body holds a document type declaration (where entities would be declared).
    #[error("a document type declaration is not accepted")]
    Dtd,
    /// The body refers to an entity other than XML's predefined ones.
    #[error("entity {0:?} is not accepted")]
    Entity(String),
    /// Elements nested deeper than a SOAP request needs, or too many arguments.
    #[error("the request is too deep or has too many arguments")]
    TooLarge,
    /// Not well-formed XML, or no action in a Body.
    #[error("not a SOAP request: {0}")]
    Malformed(String),
}

/// Reads a SOAP request: the first element inside `Body` is the action, its children the
/// arguments.
///
/// ```
/// use fwnp_agent::frontend::upnp::parse_soap;
/// let body = br#"<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><u:DeletePortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewExternalPort>7500</NewExternalPort><NewProtocol>TCP</NewProtocol></u:DeletePortMapping></s:Body></s:Envelope>"#;
/// let action = parse_soap(body).unwrap();
/// assert_eq!(action.name, "DeletePortMapping");
/// assert_eq!(action.argument("NewExternalPort"), "7500");
/// ```
pub fn parse_soap(body: &[u8]) -> Result<Action, SoapError> {
    let mut reader = quick_xml::Reader::from_reader(body);
    let malformed = |e: &dyn std::fmt::Display| SoapError::Malformed(e.to_string());
    let mut path: Vec<String> = Vec::new();
    let mut action: Option<Action> = None;
    let mut current: Option<(String, String)> = None;
    let mut buf = Vec::new();
    loop {
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| malformed(&e))?;
        match event {
            Event::DocType(_) => return Err(SoapError::Dtd),
            Event::GeneralRef(r) => {
                let name = String::from_utf8_lossy(&r).into_owned();
                let text = match name.as_str() {
                    "lt" => "<".to_owned(),
                    "gt" => ">".to_owned(),
                    "amp" => "&".to_owned(),
                    "apos" => "'".to_owned(),
                    "quot" => "\"".to_owned(),
                    _ => match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => return Err(SoapError::Entity(name)),
                    },
                };
                if let Some((_, value)) = current.as_mut() {
                    value.push_str(&text);
                }
            }
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if path.len() >= MAX_DEPTH {
                    return Err(SoapError::TooLarge);
                }
                let in_body = path.last().is_some_and(|p| p == "Body");
                if in_body && action.is_none() {
                    action = Some(Action {
                        name: name.clone(),
                        arguments: Vec::new(),
                    });
                } else if path.len() >= 2
                    && path[path.len() - 2] == "Body"
                    && action.is_some()
                    && current.is_none()
                {
                    current = Some((name.clone(), String::new()));
                }
                path.push(name);
            }
            Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if path.last().is_some_and(|p| p == "Body") && action.is_none() {
                    action = Some(Action {
                        name,
                        arguments: Vec::new(),
                    });
                } else if path.len() >= 2
                    && path[path.len() - 2] == "Body"
                    && let Some(a) = action.as_mut()
                {
                    if a.arguments.len() >= MAX_ARGUMENTS {
                        return Err(SoapError::TooLarge);
                    }
                    a.arguments.push((name, String::new()));
                }
            }
            Event::Text(t) => {
                if let Some((_, value)) = current.as_mut() {
                    value.push_str(&t.decode().map_err(|e| malformed(&e))?);
                }
            }
            Event::End(_) => {
                path.pop();
                if path.len() >= 2
                    && path[path.len() - 2] == "Body"
                    && let (Some(a), Some(arg)) = (action.as_mut(), current.take())
                {
                    if a.arguments.len() >= MAX_ARGUMENTS {
                        return Err(SoapError::TooLarge);
                    }
                    a.arguments.push((arg.0, arg.1.trim().to_owned()));
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    action.ok_or_else(|| SoapError::Malformed("no action in a SOAP Body".into()))
}

/// The device description, with the control URLs on `base`.
pub fn description(base: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion><URLBase>{base}</URLBase>
<device><deviceType>{IGD}</deviceType><friendlyName>FWNP host agent</friendlyName><manufacturer>FWNP</manufacturer><modelName>fwnp-agent</modelName><UDN>uuid:{UUID}</UDN>
<serviceList><service><serviceType>{L3F}</serviceType><serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId><controlURL>/ctl/L3F</controlURL><eventSubURL>/evt/L3F</eventSubURL><SCPDURL>{L3F_SCPD}</SCPDURL></service></serviceList>
<deviceList><device><deviceType>{WAN_DEVICE}</deviceType><friendlyName>WAN</friendlyName><manufacturer>FWNP</manufacturer><modelName>fwnp-agent</modelName><UDN>uuid:{UUID}-1</UDN>
<serviceList><service><serviceType>{WAN_COMMON}</serviceType><serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId><controlURL>{COMMON_PATH}</controlURL><eventSubURL>/evt/CmnIfCfg</eventSubURL><SCPDURL>{WAN_COMMON_SCPD}</SCPDURL></service></serviceList>
<deviceList><device><deviceType>{WAN_CONNECTION_DEVICE}</deviceType><friendlyName>WAN connection</friendlyName><manufacturer>FWNP</manufacturer><modelName>fwnp-agent</modelName><UDN>uuid:{UUID}-2</UDN>
<serviceList><service><serviceType>{WAN_IP}</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>{CONTROL_PATH}</controlURL><eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>{WAN_IP_SCPD}</SCPDURL></service><service><serviceType>{WAN_IP6_FW}</serviceType><serviceId>urn:upnp-org:serviceId:WANIPv6Firewall1</serviceId><controlURL>{FIREWALL_PATH}</controlURL><eventSubURL>/evt/IP6FCtl</eventSubURL><SCPDURL>{WAN_IP6_FW_SCPD}</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>
"#
    )
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>{inner}</s:Body></s:Envelope>
"#
    )
}

/// The answer to `action` of `service` with these output arguments.
pub fn soap_response(service: &str, action: &str, arguments: &[(&str, String)]) -> String {
    let mut inner = format!(r#"<u:{action}Response xmlns:u="{service}">"#);
    for (name, value) in arguments {
        inner.push_str(&format!(
            "<{name}>{}</{name}>",
            quick_xml::escape::escape(value.as_str())
        ));
    }
    inner.push_str(&format!("</u:{action}Response>"));
    envelope(&inner)
}

/// A SOAP fault carrying a UPnP error.
pub fn soap_fault(code: u16, description: &str) -> String {
    envelope(&format!(
        r#"<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode><errorDescription>{}</errorDescription></UPnPError></detail></s:Fault>"#,
        quick_xml::escape::escape(description)
    ))
}

/// UPnP's error code for a refusal.
fn upnp_code(refusal: &Refusal) -> (u16, &'static str) {
    match refusal {
        Refusal::Denied {
            code: DenialCode::Wire(WireCode::QuotaExceeded | WireCode::NoResources),
            ..
        } => (728, "NoPortMapsAvailable"),
        Refusal::Denied {
            code: DenialCode::Local(LocalCode::GatewayUnreachable),
            ..
        }
        | Refusal::CoreGone
        | Refusal::NoAnswer => (501, "Action Failed"),
        // An internal port the caller does not listen on: WANIPConnection's 718
        // ConflictInMappingEntry is about another client's mapping, which need not exist (the
        // port may be bound by nobody), so this is the device's refusal to act for this
        // caller: 606 Action not authorized.
        Refusal::Denied {
            code: DenialCode::Local(LocalCode::PortNotOwned),
            ..
        } => (606, "Action not authorized"),
        _ => (606, "Action not authorized"),
    }
}

struct Device {
    seam: Arc<Seam>,
    port: u16,
    /// The UniqueIDs of the pinholes.
    pinholes: tokio::sync::Mutex<Pinholes>,
}

/// Each pinhole's UniqueID and the serial number of its mapping in the seam. The seam alone
/// knows whether a pinhole still lives (its client refreshed it in time, its process runs, it
/// was not deleted): an ID is answered only while its serial is the seam's, so an
/// ID outliving its pinhole names nothing, and never the next pinhole of the same port.
#[derive(Default)]
struct Pinholes {
    next: u16,
    made: std::collections::HashMap<u16, u64>,
}

impl Pinholes {
    /// The UniqueID of the pinhole `serial`: the one it has if it was added before (an
    /// AddPinhole the same as a live one refreshes that one), else a new one. The IDs of
    /// pinholes no longer `live` are forgotten first, so the table holds only the live ones
    /// and their IDs can be given again. `None`: every ID is taken.
    fn id_of(&mut self, serial: u64, live: &HashSet<u64>) -> Option<u16> {
        self.made.retain(|_, s| *s == serial || live.contains(s));
        if let Some((id, _)) = self.made.iter().find(|(_, s)| **s == serial) {
            return Some(*id);
        }
        for _ in 0..u16::MAX {
            // 0 is no UniqueID.
            self.next = self.next.wrapping_add(1).max(1);
            if let std::collections::hash_map::Entry::Vacant(free) = self.made.entry(self.next) {
                free.insert(serial);
                return Some(self.next);
            }
        }
        None
    }
}

fn xml(status: StatusCode, body: String) -> Response {
    Response::new(status, "text/xml; charset=\"utf-8\"", body)
}

fn fault(code: u16, description: &str) -> Response {
    xml(
        StatusCode::INTERNAL_SERVER_ERROR,
        soap_fault(code, description),
    )
}

/// The address family of `address`.
fn family_of(address: IpAddr) -> fwnp_proto::Family {
    match address {
        IpAddr::V4(_) => fwnp_proto::Family::Ipv4,
        IpAddr::V6(_) => fwnp_proto::Family::Ipv6,
    }
}

/// The remote prefixes of WANIPConnection's NewRemoteHost: none for the wildcard (empty, or
/// `*` as some control points send it), else the one address; `None` if it is no address.
fn remote_hosts(text: &str) -> Option<Vec<Prefix>> {
    match text {
        "" | "*" => Some(Vec::new()),
        text => {
            let addr = text.parse::<IpAddr>().ok()?;
            let len = if addr.is_ipv4() { 32 } else { 128 };
            Some(vec![Prefix { addr, len }])
        }
    }
}

/// The port mapping of `port` a caller at `peer` names: on its own address (every address of
/// its family when it asks over loopback), for `remotes`. Its lifetime is left to the caller.
fn port_mapping(
    requester: u32,
    peer: SocketAddr,
    protocol: Protocol,
    port: u16,
    remotes: Vec<Prefix>,
) -> MapRequest {
    MapRequest {
        via: Via::Upnp,
        requester,
        protocol,
        port,
        lifetime: 0,
        host: (!peer.ip().is_loopback()).then_some(peer.ip()),
        family: Some(family_of(peer.ip())),
        remotes,
        nonce: None,
    }
}

/// Whether `address` is one of this host's (only local processes are served).
fn is_local(address: IpAddr) -> bool {
    is_local_socket(SocketAddr::new(address, 0))
}

/// The same, with the scope of a link-local IPv6 address.
fn is_local_socket(address: SocketAddr) -> bool {
    let probe = match address {
        SocketAddr::V4(v4) => SocketAddr::V4(std::net::SocketAddrV4::new(*v4.ip(), 0)),
        SocketAddr::V6(v6) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), 0, 0, v6.scope_id()))
        }
    };
    address.ip().is_loopback() || std::net::UdpSocket::bind(probe).is_ok()
}

/// A peer's address as IPv4 when it is an IPv4-mapped one (the listener is dual-stack).
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// The answer to a body above [`MAX_BODY`]: HTTP's 413, with UPnP's 501 for a control point
/// that reads only the SOAP fault.
const TOO_LARGE: (u16, &str) = (501, "Action Failed: the request is too large");

impl http::Handler for Device {
    async fn handle(&self, request: Request, peer: SocketAddr, local: SocketAddr) -> Response {
        // Dual-stack: IPv4 callers arrive as IPv4-mapped addresses, made IPv4 again.
        let peer = canonical(peer);
        let local = canonical(local);
        let post = request.method == Method::POST;
        let get = request.method == Method::GET;
        if let Some((_, document)) = SCPDS.iter().find(|(path, _)| *path == request.path) {
            return if get {
                local_document(peer, document)
            } else {
                Response::empty(StatusCode::METHOD_NOT_ALLOWED)
            };
        }
        match request.path.as_str() {
            "/rootDesc.xml" if get => self.root(peer),
            CONTROL_PATH | FIREWALL_PATH if post => self.control(request, peer, local).await,
            COMMON_PATH if post => common(&request, peer),
            "/rootDesc.xml" | CONTROL_PATH | FIREWALL_PATH | COMMON_PATH => {
                Response::empty(StatusCode::METHOD_NOT_ALLOWED)
            }
            _ => Response::empty(StatusCode::NOT_FOUND),
        }
    }

    fn refused(&self, error: &HttpError, status: StatusCode, peer: SocketAddr) -> Response {
        if let HttpError::BodyTooLarge { .. } = error
            && is_local(canonical(peer).ip())
        {
            info!(%peer, "UPnP request refused: {error}");
            let (code, text) = TOO_LARGE;
            return xml(status, soap_fault(code, text));
        }
        Response::empty(status)
    }
}

/// A fixed XML document, for local callers only (as the description is).
fn local_document(peer: SocketAddr, document: &str) -> Response {
    if !is_local(peer.ip()) {
        return Response::empty(StatusCode::FORBIDDEN);
    }
    xml(StatusCode::OK, document.to_owned())
}

fn common(request: &Request, peer: SocketAddr) -> Response {
    if !is_local(peer.ip()) {
        return Response::empty(StatusCode::FORBIDDEN);
    }
    let action = parse_soap(&request.body);
    if let Ok(action) = &action
        && let Some(refused) =
            soap_action_mismatch(request, "WANCommonInterfaceConfig", action, peer)
    {
        return refused;
    }
    match action {
        Ok(action) if action.name == "GetCommonLinkProperties" => xml(
            StatusCode::OK,
            soap_response(
                WAN_COMMON,
                &action.name,
                &[
                    ("NewWANAccessType", "Ethernet".into()),
                    ("NewLayer1UpstreamMaxBitRate", "1000000000".into()),
                    ("NewLayer1DownstreamMaxBitRate", "1000000000".into()),
                    ("NewPhysicalLinkStatus", "Up".into()),
                ],
            ),
        ),
        Ok(_) => fault(401, "Invalid Action"),
        Err(e) => fault(402, &format!("Invalid Args: {e}")),
    }
}

impl Device {
    fn root(&self, peer: SocketAddr) -> Response {
        if !is_local(peer.ip()) {
            return Response::empty(StatusCode::FORBIDDEN);
        }
        let host = match peer.ip() {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        xml(
            StatusCode::OK,
            description(&format!("http://{host}:{}/", self.port)),
        )
    }

    async fn control(&self, request: Request, peer: SocketAddr, local: SocketAddr) -> Response {
        if !is_local(peer.ip()) {
            return Response::empty(StatusCode::FORBIDDEN);
        }
        let firewall = request.path == FIREWALL_PATH;
        let action = match parse_soap(&request.body) {
            Ok(action) => action,
            Err(e) => {
                info!(%peer, "UPnP request refused: {e}");
                return fault(402, &format!("Invalid Args: {e}"));
            }
        };
        let service = if firewall {
            "WANIPv6FirewallControl"
        } else {
            "WANIPConnection"
        };
        if let Some(refused) = soap_action_mismatch(&request, service, &action, peer) {
            return refused;
        }
        debug!(%peer, action = %action.name, "UPnP action");
        if firewall {
            self.firewall(action, peer, local).await
        } else {
            self.act(action, peer, local).await
        }
    }
}

impl Device {
    /// The pinhole an action names by its UniqueID, with the serial of its mapping and the
    /// process asking; the fault to answer when the ID is malformed (402) or names no pinhole
    /// (704), or the caller cannot be told (606).
    async fn named_pinhole(
        &self,
        action: &Action,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(u16, u64, u32), Response> {
        let Ok(id) = action.argument("UniqueID").parse::<u16>() else {
            return Err(fault(402, "Invalid Args"));
        };
        let Some(serial) = self.pinholes.lock().await.made.get(&id).copied() else {
            return Err(fault(704, "NoSuchEntry"));
        };
        match self.seam.tcp_peer(peer, local).await {
            Ok(requester) => Ok((id, serial, requester)),
            Err(e) => Err(fault(606, &format!("Action not authorized: {e}"))),
        }
    }

    /// WANIPv6FirewallControl: pinholes are FWNP leases on the caller's IPv6 address.
    async fn firewall(&self, action: Action, peer: SocketAddr, local: SocketAddr) -> Response {
        let ok = |arguments: &[(&str, String)]| {
            xml(
                StatusCode::OK,
                soap_response(WAN_IP6_FW, &action.name, arguments),
            )
        };
        let unique_id = || action.argument("UniqueID").parse::<u16>().ok();
        match action.name.as_str() {
            "GetFirewallStatus" => ok(&[
                ("FirewallEnabled", "1".into()),
                ("InboundPinholeAllowed", "1".into()),
            ]),
            // FWNP does not restrict outbound traffic.
            "GetOutboundPinholeTimeout" => {
                ok(&[("OutboundPinholeTimeout", MAX_PINHOLE_LEASE.to_string())])
            }
            "AddPinhole" => {
                let protocol = match action.argument("Protocol") {
                    "6" => Protocol::Tcp,
                    "17" => Protocol::Udp,
                    "132" => Protocol::Sctp,
                    "136" => Protocol::UdpLite,
                    _ => return fault(705, "ProtocolNotSupported"),
                };
                let (Ok(IpAddr::V6(internal)), Ok(port), Ok(lease)) = (
                    action.argument("InternalClient").parse::<IpAddr>(),
                    action.argument("InternalPort").parse::<u16>(),
                    action.argument("LeaseTime").parse::<u32>(),
                ) else {
                    return fault(402, "Invalid Args");
                };
                if port == 0 || !(1..=MAX_PINHOLE_LEASE).contains(&lease) {
                    return fault(402, "Invalid Args");
                }
                if !is_local(IpAddr::V6(internal)) {
                    return fault(606, "Action not authorized: not an address of this host");
                }
                if !matches!(action.argument("RemotePort"), "" | "0") {
                    return fault(
                        606,
                        "Action not authorized: FWNP does not restrict the remote port",
                    );
                }
                let remotes = match action.argument("RemoteHost") {
                    "" | "*" | "::" => Vec::new(),
                    text => match text.parse::<std::net::Ipv6Addr>() {
                        Ok(addr) => vec![Prefix {
                            addr: IpAddr::V6(addr),
                            len: 128,
                        }],
                        Err(_) => return fault(402, "Invalid Args: RemoteHost"),
                    },
                };
                let requester = match self.seam.tcp_peer(peer, local).await {
                    Ok(pid) => pid,
                    Err(e) => return fault(606, &format!("Action not authorized: {e}")),
                };
                let request = MapRequest {
                    via: Via::UpnpPinhole,
                    requester,
                    protocol,
                    port,
                    lifetime: lease,
                    host: Some(IpAddr::V6(internal)),
                    family: Some(fwnp_proto::Family::Ipv6),
                    remotes,
                    nonce: None,
                };
                match self.seam.map(request).await {
                    Ok(mapped) => {
                        let live: HashSet<u64> = self
                            .seam
                            .entries(Via::UpnpPinhole)
                            .await
                            .iter()
                            .map(|e| e.serial)
                            .collect();
                        let id = self.pinholes.lock().await.id_of(mapped.serial, &live);
                        let Some(id) = id else {
                            info!(
                                pid = requester,
                                port, "UPnP pinhole refused: no UniqueID left"
                            );
                            if let Err(e) = self
                                .seam
                                .unmap_serial(Via::UpnpPinhole, requester, mapped.serial)
                                .await
                            {
                                warn!(pid = requester, port, "UPnP pinhole not released: {e}");
                            }
                            return fault(728, "NoPortMapsAvailable");
                        };
                        info!(
                            pid = requester,
                            holder = mapped.holder,
                            port,
                            id,
                            "UPnP pinhole granted"
                        );
                        ok(&[("UniqueID", id.to_string())])
                    }
                    Err(e) => {
                        info!(pid = requester, port, "UPnP pinhole refused: {e}");
                        let (code, text) = upnp_code(&e);
                        fault(code, &format!("{text}: {e}"))
                    }
                }
            }
            "UpdatePinhole" => {
                let (Some(id), Ok(lease)) =
                    (unique_id(), action.argument("NewLeaseTime").parse::<u32>())
                else {
                    return fault(402, "Invalid Args");
                };
                if !(1..=MAX_PINHOLE_LEASE).contains(&lease) {
                    return fault(402, "Invalid Args");
                }
                let Some(serial) = self.pinholes.lock().await.made.get(&id).copied() else {
                    return fault(704, "NoSuchEntry");
                };
                let requester = match self.seam.tcp_peer(peer, local).await {
                    Ok(pid) => pid,
                    Err(e) => return fault(606, &format!("Action not authorized: {e}")),
                };
                // Only a refresh: a pinhole that ended stays ended.
                match self
                    .seam
                    .refresh(Via::UpnpPinhole, requester, serial, lease)
                    .await
                {
                    Some(_) => ok(&[]),
                    None => fault(704, "NoSuchEntry"),
                }
            }
            // The agent counts no pinhole's packets: neither the host table nor the gateway keeps
            // a counter per lease. The action is required, so it is answered, for a pinhole of
            // the caller's, with the failure to act.
            "GetPinholePackets" => {
                let (_, serial, requester) = match self.named_pinhole(&action, peer, local).await {
                    Ok(named) => named,
                    Err(refused) => return refused,
                };
                match self.seam.holds(Via::UpnpPinhole, requester, serial).await {
                    true => fault(
                        501,
                        "Action Failed: the agent does not count a pinhole's packets",
                    ),
                    false => fault(704, "NoSuchEntry"),
                }
            }
            // Optional, and not implemented (so not in the description): it tells whether
            // traffic of the pinhole was received, which the agent does not see, and neither
            // answer (IsWorking, or 709 NoTrafficReceived) could be given truthfully.
            "CheckPinholeWorking" => fault(401, "Invalid Action"),
            "DeletePinhole" => {
                let (id, serial, requester) = match self.named_pinhole(&action, peer, local).await {
                    Ok(named) => named,
                    Err(refused) => return refused,
                };
                match self
                    .seam
                    .unmap_serial(Via::UpnpPinhole, requester, serial)
                    .await
                {
                    Ok(false) => fault(704, "NoSuchEntry"),
                    Ok(true) => {
                        let mut pinholes = self.pinholes.lock().await;
                        if pinholes.made.get(&id) == Some(&serial) {
                            pinholes.made.remove(&id);
                        }
                        ok(&[])
                    }
                    Err(e) => {
                        let (code, text) = upnp_code(&e);
                        fault(code, text)
                    }
                }
            }
            _ => fault(401, "Invalid Action"),
        }
    }

    async fn act(&self, action: Action, peer: SocketAddr, local: SocketAddr) -> Response {
        let ok = |arguments: &[(&str, String)]| {
            xml(
                StatusCode::OK,
                soap_response(WAN_IP, &action.name, arguments),
            )
        };
        let protocol = || match action.argument("NewProtocol").to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        };
        match action.name.as_str() {
            "GetStatusInfo" => ok(&[
                ("NewConnectionStatus", "Connected".into()),
                ("NewLastConnectionError", "ERROR_NONE".into()),
                ("NewUptime", "0".into()),
            ]),
            "GetConnectionTypeInfo" => ok(&[
                ("NewConnectionType", "IP_Routed".into()),
                ("NewPossibleConnectionTypes", "IP_Routed".into()),
            ]),
            // The connection is the host's own, always routed and up: asking for what it is
            // already changes nothing, anything else is not the agent's to do.
            "SetConnectionType" => match action.argument("NewConnectionType") {
                "IP_Routed" => ok(&[]),
                "Unconfigured" | "IP_Bridged" => fault(
                    606,
                    "Action not authorized: the host's connection is not the agent's to change",
                ),
                _ => fault(402, "Invalid Args: NewConnectionType"),
            },
            "RequestConnection" => ok(&[]),
            "ForceTermination" => fault(
                606,
                "Action not authorized: the agent does not disconnect the host",
            ),
            // No RSIP, and no NAT: FWNP opens the host's own addresses and ports (a NAT
            // gateway such as miniupnpd answers 1 here).
            "GetNATRSIPStatus" => ok(&[
                ("NewRSIPAvailable", "0".into()),
                ("NewNATEnabled", "0".into()),
            ]),
            // FWNP does not translate: the host's address is its external address.
            "GetExternalIPAddress" => ok(&[("NewExternalIPAddress", peer.ip().to_string())]),
            "AddPortMapping" | "AddAnyPortMapping" => {
                let (Some(protocol), Ok(internal), Ok(external)) = (
                    protocol(),
                    action.argument("NewInternalPort").parse::<u16>(),
                    action.argument("NewExternalPort").parse::<u16>(),
                ) else {
                    return fault(402, "Invalid Args");
                };
                if internal == 0 {
                    return fault(402, "Invalid Args");
                }
                // 0 is WANIPConnection's wildcard external port, which AddPortMapping does not
                // take: a control point that lets the device choose asks AddAnyPortMapping.
                if action.name == "AddPortMapping" && external == 0 {
                    return fault(716, "WildCardNotPermittedInExtPort");
                }
                if action.name == "AddPortMapping" && external != internal {
                    return fault(724, "SamePortValuesRequired: FWNP does not translate ports");
                }
                // The mapping is for the caller's own host address.
                let client = action.argument("NewInternalClient");
                if client.parse::<IpAddr>().ok() != Some(peer.ip()) {
                    return fault(
                        606,
                        "Action not authorized: the internal client is not the caller",
                    );
                }
                let Some(remotes) = remote_hosts(action.argument("NewRemoteHost")) else {
                    return fault(402, "Invalid Args: NewRemoteHost");
                };
                let Ok(lifetime) = action.argument("NewLeaseDuration").parse::<u32>() else {
                    return fault(402, "Invalid Args: NewLeaseDuration");
                };
                let requester = match self.seam.tcp_peer(peer, local).await {
                    Ok(pid) => pid,
                    Err(e) => return fault(606, &format!("Action not authorized: {e}")),
                };
                let request = port_mapping(requester, peer, protocol, internal, remotes);
                match self
                    .seam
                    .map(MapRequest {
                        lifetime,
                        ..request
                    })
                    .await
                {
                    Ok(mapped) => {
                        info!(
                            pid = requester,
                            holder = mapped.holder,
                            port = internal,
                            "UPnP mapping granted"
                        );
                        if action.name == "AddAnyPortMapping" {
                            ok(&[("NewReservedPort", internal.to_string())])
                        } else {
                            ok(&[])
                        }
                    }
                    Err(e) => {
                        info!(
                            pid = requester,
                            port = internal,
                            "UPnP mapping refused: {e}"
                        );
                        let (code, text) = upnp_code(&e);
                        fault(code, &format!("{text}: {e}"))
                    }
                }
            }
            "DeletePortMapping" => {
                let (Some(protocol), Ok(port)) = (
                    protocol(),
                    action.argument("NewExternalPort").parse::<u16>(),
                ) else {
                    return fault(402, "Invalid Args");
                };
                // Port 0 names no mapping (to the seam it would be all of the caller's); Invalid
                // Args, as miniupnpd answers it.
                if port == 0 {
                    return fault(402, "Invalid Args");
                }
                let Some(remotes) = remote_hosts(action.argument("NewRemoteHost")) else {
                    return fault(402, "Invalid Args: NewRemoteHost");
                };
                let requester = match self.seam.tcp_peer(peer, local).await {
                    Ok(pid) => pid,
                    Err(e) => return fault(606, &format!("Action not authorized: {e}")),
                };
                // The caller's mapping of its own address family: the other one's stays.
                let request = port_mapping(requester, peer, protocol, port, remotes);
                match self.seam.unmap(&request).await {
                    Ok(0) => fault(714, "NoSuchEntryInArray"),
                    Ok(_) => ok(&[]),
                    Err(e) => {
                        let (code, text) = upnp_code(&e);
                        fault(code, text)
                    }
                }
            }
            "GetSpecificPortMappingEntry" => {
                let (Some(protocol), Ok(port)) = (
                    protocol(),
                    action.argument("NewExternalPort").parse::<u16>(),
                ) else {
                    return fault(402, "Invalid Args");
                };
                let Some(remotes) = remote_hosts(action.argument("NewRemoteHost")) else {
                    return fault(402, "Invalid Args: NewRemoteHost");
                };
                let family = family_of(peer.ip());
                let entries = self.seam.entries(Via::Upnp).await;
                // Of an IPv4 and an IPv6 mapping of the port, the caller's family's first.
                match entries
                    .iter()
                    .filter(|e| e.protocol == protocol && e.port == port && e.remotes == remotes)
                    .min_by_key(|e| e.family != Some(family))
                {
                    Some(entry) => ok(&[
                        ("NewInternalPort", entry.port.to_string()),
                        (
                            "NewInternalClient",
                            entry.host.unwrap_or(peer.ip()).to_string(),
                        ),
                        ("NewEnabled", "1".into()),
                        ("NewPortMappingDescription", format!("pid {}", entry.holder)),
                        ("NewLeaseDuration", entry.remaining.unwrap_or(0).to_string()),
                    ]),
                    None => fault(714, "NoSuchEntryInArray"),
                }
            }
            "GetGenericPortMappingEntry" => {
                let Ok(index) = action.argument("NewPortMappingIndex").parse::<usize>() else {
                    return fault(402, "Invalid Args");
                };
                let entries = self.seam.entries(Via::Upnp).await;
                match entries.get(index) {
                    Some(entry) => ok(&[
                        (
                            "NewRemoteHost",
                            entry
                                .remotes
                                .first()
                                .map(|p| p.addr.to_string())
                                .unwrap_or_default(),
                        ),
                        ("NewExternalPort", entry.port.to_string()),
                        (
                            "NewProtocol",
                            entry.protocol.to_string().to_ascii_uppercase(),
                        ),
                        ("NewInternalPort", entry.port.to_string()),
                        (
                            "NewInternalClient",
                            entry.host.unwrap_or(peer.ip()).to_string(),
                        ),
                        ("NewEnabled", "1".into()),
                        ("NewPortMappingDescription", format!("pid {}", entry.holder)),
                        ("NewLeaseDuration", entry.remaining.unwrap_or(0).to_string()),
                    ]),
                    None => fault(713, "SpecifiedArrayIndexInvalid"),
                }
            }
            _ => fault(401, "Invalid Action"),
        }
    }
}

/// The host's IPv6 addresses, every scope, from the text of `/proc/net/if_inet6`.
pub fn ipv6_addresses(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            let raw = u128::from_str_radix(hex, 16).ok()?;
            Some(IpAddr::V6(std::net::Ipv6Addr::from(raw)))
        })
        .collect()
}

/// What the host table must admit for discovery: a local process's M-SEARCH is looped back to
/// the agent on the outgoing interface, from the host's own address, so the input filter sees
/// it as new inbound traffic.
pub fn admitted(addresses: &[IpAddr]) -> Vec<fwnp_netfilter::AlwaysAllowed> {
    addresses
        .iter()
        .filter(|a| !a.is_loopback())
        .map(|addr| fwnp_netfilter::AlwaysAllowed {
            remote: Prefix {
                addr: *addr,
                len: if addr.is_ipv4() { 32 } else { 128 },
            },
            protocol: Some(Protocol::Udp),
            ports: Some(fwnp_proto::PortRange::single(SSDP_PORT)),
        })
        .collect()
}

/// Serves the description and control on `port` (every address; only local callers are
/// answered) and SSDP discovery, until the core goes away. Without SSDP (port 1900 held by a
/// service that does not share it) the device still serves the control points that are given
/// its description's URL.
pub async fn serve(seam: Arc<Seam>, port: u16) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).await?;
    match ssdp_v4() {
        Ok(socket) => {
            tokio::spawn(discovery(socket, port));
        }
        Err(e) => warn!(
            "SSDP over IPv4: {e}; not discoverable, the description is at http://127.0.0.1:{port}/rootDesc.xml"
        ),
    }
    match ssdp_v6() {
        Ok(socket) => {
            tokio::spawn(discovery(socket, port));
        }
        Err(e) => warn!("SSDP over IPv6: {e}"),
    }
    let device = Arc::new(Device {
        seam,
        port,
        pinholes: tokio::sync::Mutex::new(Pinholes::default()),
    });
    info!(port, "UPnP IGD front end listening");
    http::serve(listener, http::Limits::with_body(MAX_BODY), device).await;
    Ok(())
}

/// An SSDP socket of `domain`, bound to port 1900 beside the other SSDP services of the host
/// (minissdpd, a media server's): with SO_REUSEADDR, which they set too, each binds the port
/// and each hears the multicast searches. SO_REUSEPORT is not needed for that on Linux, and
/// would have the kernel spread unicast datagrams to the port among the sockets that set it.
fn ssdp_socket(domain: socket2::Domain, address: IpAddr) -> std::io::Result<socket2::Socket> {
    let raw = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    raw.set_reuse_address(true)?;
    if address.is_ipv6() {
        raw.set_only_v6(true)?;
    }
    raw.bind(&SocketAddr::new(address, SSDP_PORT).into())?;
    Ok(raw)
}

/// The IPv4 SSDP socket, joined to 239.255.255.250 on the default interface.
fn ssdp_v4() -> std::io::Result<UdpSocket> {
    let raw = ssdp_socket(socket2::Domain::IPV4, IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    raw.join_multicast_v4(&SSDP_GROUP, &Ipv4Addr::UNSPECIFIED)?;
    raw.set_nonblocking(true)?;
    UdpSocket::from_std(raw.into())
}

/// The IPv6 SSDP socket, joined to ff02::c on every interface.
fn ssdp_v6() -> std::io::Result<UdpSocket> {
    let raw = ssdp_socket(
        socket2::Domain::IPV6,
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    )?;
    let socket: std::net::UdpSocket = raw.into();
    let mut joined = 0;
    for entry in std::fs::read_dir("/sys/class/net")?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("ifindex")) else {
            continue;
        };
        if let Ok(index) = text.trim().parse::<u32>()
            && socket.join_multicast_v6(&SSDP_GROUP_V6, index).is_ok()
        {
            joined += 1;
        }
    }
    if joined == 0 {
        return Err(std::io::Error::other("no interface joined ff02::c"));
    }
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// The answers to an M-SEARCH for `target`, each its ST and USN (UDA 1.0 section 1.2.3). For
/// `ssdp:all`: three for the root device, two for each embedded device, one for each service
/// type of each device. For `upnp:rootdevice`, a device's UUID, or a device or service type
/// the description offers in the version asked for or a later one: one per device that has
/// it, with the ST as asked. None for anything else.
///
/// ```
/// use fwnp_agent::frontend::upnp::search_answers;
/// let answers = search_answers("urn:schemas-upnp-org:service:WANIPConnection:1");
/// assert_eq!(answers.len(), 1);
/// assert!(answers[0].1.ends_with("-2::urn:schemas-upnp-org:service:WANIPConnection:1"));
/// assert!(search_answers("urn:schemas-upnp-org:service:WANIPConnection:2").is_empty());
/// ```
pub fn search_answers(target: &str) -> Vec<(String, String)> {
    let mut answers = Vec::new();
    for (index, (suffix, device_type, services)) in DEVICES.iter().enumerate() {
        let udn = format!("uuid:{UUID}{suffix}");
        let root = index == 0;
        if target == "ssdp:all" {
            if root {
                answers.push((
                    "upnp:rootdevice".to_owned(),
                    format!("{udn}::upnp:rootdevice"),
                ));
            }
            answers.push((udn.clone(), udn.clone()));
            for kind in std::iter::once(device_type).chain(services.iter()) {
                answers.push(((*kind).to_owned(), format!("{udn}::{kind}")));
            }
        } else if target == "upnp:rootdevice" {
            if root {
                answers.push((target.to_owned(), format!("{udn}::{target}")));
            }
        } else if target.eq_ignore_ascii_case(&udn) {
            answers.push((udn.clone(), udn));
        } else if std::iter::once(device_type)
            .chain(services.iter())
            .any(|offered| offers(offered, target))
        {
            answers.push((target.to_owned(), format!("{udn}::{target}")));
        }
    }
    answers
}

/// Whether a device or service of type `offered` is found by a search for `target`: the same
/// type, in a version from 1 to the one offered (a later version must do all an earlier one
/// does).
fn offers(offered: &str, target: &str) -> bool {
    let (Some((kind, version)), Some((asked_kind, asked))) =
        (offered.rsplit_once(':'), target.rsplit_once(':'))
    else {
        return false;
    };
    if kind != asked_kind || asked.is_empty() || !asked.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    match (version.parse::<u32>(), asked.parse::<u32>()) {
        (Ok(version), Ok(asked)) => (1..=version).contains(&asked),
        _ => false,
    }
}

/// Answers M-SEARCH requests of local processes for the gateway device or its service.
async fn discovery(socket: UdpSocket, port: u16) {
    let mut buf = [0u8; 2048];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                warn!("SSDP: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !is_local_socket(from) {
            continue;
        }
        let Some(target) = search_target(&buf[..len]) else {
            continue;
        };
        let answers = search_answers(&target);
        if answers.is_empty() {
            continue;
        }
        // A link-local source cannot be named in a URL without its zone: then the host's
        // global address towards the default route.
        let host = match from.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => match local_ipv6() {
                Some(global) => format!("[{global}]"),
                None => continue,
            },
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        for (st, usn) in answers {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\nUSN: {usn}\r\nEXT:\r\nSERVER: Linux UPnP/1.1 fwnp-agent/{}\r\nLOCATION: http://{host}:{port}/rootDesc.xml\r\nContent-Length: 0\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
            );
            debug!(%from, %st, "SSDP answer");
            let _ = socket.send_to(answer.as_bytes(), from).await;
        }
    }
}

/// The host's IPv6 address towards its default route (no packet is sent to learn it).
fn local_ipv6() -> Option<std::net::Ipv6Addr> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    socket
        .connect((std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9))
        .ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    }
}

/// The search target of an SSDP M-SEARCH request.
pub fn search_target(datagram: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(datagram).ok()?;
    if request.method != Some("M-SEARCH") {
        return None;
    }
    let man = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("MAN"))?;
    if !String::from_utf8_lossy(man.value).contains("ssdp:discover") {
        return None;
    }
    let st = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("ST"))?;
    Some(String::from_utf8_lossy(st.value).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::stand_in::Held;

    #[test]
    fn refuses_dtds_and_entities() {
        let bomb = br#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><s:Envelope xmlns:s="x"><s:Body><u:A xmlns:u="y"><B>&lol2;</B></u:A></s:Body></s:Envelope>"#;
        assert_eq!(parse_soap(bomb), Err(SoapError::Dtd));
        let entity = br#"<s:Envelope xmlns:s="x"><s:Body><u:A xmlns:u="y"><B>&lol2;</B></u:A></s:Body></s:Envelope>"#;
        assert_eq!(parse_soap(entity), Err(SoapError::Entity("lol2".into())));
        let fine = br#"<s:Envelope xmlns:s="x"><s:Body><u:A xmlns:u="y"><B>a&amp;b&#65;</B><C/></u:A></s:Body></s:Envelope>"#;
        let action = parse_soap(fine).unwrap();
        assert_eq!(action.name, "A");
        assert_eq!(action.argument("B"), "a&bA");
        assert!(matches!(
            parse_soap(b"<a><b>"),
            Err(SoapError::Malformed(_))
        ));
    }

    /// The device's HTTP on 127.0.0.1, its core a channel the test reads.
    async fn device() -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<crate::core::CoreInput>,
        tokio::task::JoinHandle<()>,
    ) {
        let local = crate::frontend::stand_in::local_config();
        let (core, inputs) = tokio::sync::mpsc::unbounded_channel();
        let (address, task) = serve_device(Seam::new(core, local)).await;
        (address, inputs, task)
    }

    /// The device's HTTP on 127.0.0.1 in front of `seam`.
    async fn serve_device(seam: Arc<Seam>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        serve_device_on(seam, "127.0.0.1:0").await
    }

    /// The device's HTTP on `listen` in front of `seam`; the address it listens on.
    async fn serve_device_on(
        seam: Arc<Seam>,
        listen: &str,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        let address = listener.local_addr().expect("address");
        let device = Arc::new(Device {
            seam,
            port: address.port(),
            pinholes: tokio::sync::Mutex::new(Pinholes::default()),
        });
        let task = tokio::spawn(http::serve(
            listener,
            http::Limits::with_body(MAX_BODY),
            device,
        ));
        (address, task)
    }

    /// [`serve_device`] in front of the stand-in core ([`crate::frontend::stand_in`]).
    async fn granting_device() -> (
        SocketAddr,
        Arc<std::sync::Mutex<Held>>,
        Vec<tokio::task::JoinHandle<()>>,
    ) {
        let (seam, held, mut tasks) = crate::frontend::stand_in::granting_seam();
        let (address, task) = serve_device(seam).await;
        tasks.push(task);
        (address, held, tasks)
    }

    /// Posts `action` of WANIPConnection (`firewall`: of WANIPv6FirewallControl) with
    /// `arguments`; the answer.
    async fn ask(
        address: SocketAddr,
        firewall: bool,
        action: &str,
        arguments: &[(&str, &str)],
    ) -> String {
        let (path, service) = if firewall {
            (FIREWALL_PATH, WAN_IP6_FW)
        } else {
            (CONTROL_PATH, WAN_IP)
        };
        exchange(address, &control_request(path, service, action, arguments)).await
    }

    /// AddPortMapping of TCP `port` for the address it is asked from (that of `address`).
    async fn add_mapping(address: SocketAddr, port: u16) -> String {
        add_mapping_for(address, "", port).await
    }

    /// [`add_mapping`] for `remote_host` (NewRemoteHost) only.
    async fn add_mapping_for(address: SocketAddr, remote_host: &str, port: u16) -> String {
        let port = port.to_string();
        ask(
            address,
            false,
            "AddPortMapping",
            &[
                ("NewRemoteHost", remote_host),
                ("NewExternalPort", &port),
                ("NewProtocol", "TCP"),
                ("NewInternalPort", &port),
                ("NewInternalClient", &address.ip().to_string()),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", "test"),
                ("NewLeaseDuration", "0"),
            ],
        )
        .await
    }

    /// AddPinhole of `protocol` (IANA number) `port` on ::1 for `lease` seconds; its UniqueID.
    async fn add_pinhole(address: SocketAddr, protocol: &str, port: u16, lease: u32) -> String {
        add_pinhole_for(address, "", protocol, port, lease).await
    }

    /// [`add_pinhole`] for `remote_host` (RemoteHost) only.
    async fn add_pinhole_for(
        address: SocketAddr,
        remote_host: &str,
        protocol: &str,
        port: u16,
        lease: u32,
    ) -> String {
        let answer = ask(
            address,
            true,
            "AddPinhole",
            &[
                ("RemoteHost", remote_host),
                ("RemotePort", "0"),
                ("InternalClient", "::1"),
                ("InternalPort", &port.to_string()),
                ("Protocol", protocol),
                ("LeaseTime", &lease.to_string()),
            ],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        answer
            .split("<UniqueID>")
            .nth(1)
            .and_then(|rest| rest.split("</UniqueID>").next())
            .unwrap_or_else(|| panic!("no UniqueID: {answer}"))
            .to_owned()
    }

    fn error_code(answer: &str) -> Option<&str> {
        answer
            .split("<errorCode>")
            .nth(1)
            .and_then(|rest| rest.split("</errorCode>").next())
    }

    #[tokio::test]
    async fn a_port_mapping_and_a_pinhole_of_one_port_are_each_their_services_own() {
        use fwnp_proto::{Family, HostAddresses};
        let (address, held, tasks) = granting_device().await;
        let ipv4 = (HostAddresses::Default, Some(Family::Ipv4));
        let pinhole = (
            HostAddresses::One("::1".parse().expect("an address")),
            Some(Family::Ipv6),
        );
        let openings = |port| held.lock().expect("state").openings(port);

        // A mapping, then a pinhole of the same port: both open, side by side.
        let answer = add_mapping(address, 7000).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let id = add_pinhole(address, "6", 7000, 60).await;
        assert_eq!(openings(7000), vec![ipv4.clone(), pinhole.clone()]);
        // A pinhole of another protocol is no port mapping either.
        add_pinhole(address, "132", 7001, 60).await;

        // WANIPConnection lists its mapping, only it.
        let answer = ask(
            address,
            false,
            "GetGenericPortMappingEntry",
            &[("NewPortMappingIndex", "0")],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer.contains("<NewProtocol>TCP</NewProtocol>"),
            "{answer}"
        );
        assert!(
            answer.contains("<NewExternalPort>7000</NewExternalPort>"),
            "{answer}"
        );
        assert!(
            answer.contains("<NewInternalClient>127.0.0.1</NewInternalClient>"),
            "{answer}"
        );
        let answer = ask(
            address,
            false,
            "GetGenericPortMappingEntry",
            &[("NewPortMappingIndex", "1")],
        )
        .await;
        assert_eq!(error_code(&answer), Some("713"), "{answer}");
        let answer = ask(
            address,
            false,
            "GetSpecificPortMappingEntry",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "7001"),
                ("NewProtocol", "TCP"),
            ],
        )
        .await;
        assert_eq!(error_code(&answer), Some("714"), "{answer}");

        // DeletePortMapping deletes the mapping, not the pinhole; once gone, it finds nothing.
        let delete = [
            ("NewRemoteHost", ""),
            ("NewExternalPort", "7000"),
            ("NewProtocol", "TCP"),
        ];
        let answer = ask(address, false, "DeletePortMapping", &delete).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(openings(7000), vec![pinhole.clone()]);
        let answer = ask(address, false, "DeletePortMapping", &delete).await;
        assert_eq!(error_code(&answer), Some("714"), "{answer}");
        assert_eq!(openings(7000), vec![pinhole.clone()]);

        // UpdatePinhole refreshes the pinhole alone; DeletePinhole deletes it, not the mapping.
        let answer = add_mapping(address, 7000).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let opened = held.lock().expect("state").opened;
        let update = [("UniqueID", id.as_str()), ("NewLeaseTime", "120")];
        let answer = ask(address, true, "UpdatePinhole", &update).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(
            held.lock().expect("state").opened,
            opened,
            "a refresh opened"
        );
        assert_eq!(openings(7000), vec![ipv4.clone(), pinhole.clone()]);
        let answer = ask(address, true, "DeletePinhole", &[("UniqueID", &id)]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(openings(7000), vec![ipv4.clone()]);
        let answer = ask(address, false, "GetSpecificPortMappingEntry", &delete).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        for task in tasks {
            task.abort();
        }
    }

    #[tokio::test]
    async fn update_pinhole_does_not_bring_back_a_pinhole_that_ended() {
        let (address, held, tasks) = granting_device().await;
        let update = |id: String| async move {
            ask(
                address,
                true,
                "UpdatePinhole",
                &[("UniqueID", &id), ("NewLeaseTime", "60")],
            )
            .await
        };

        // Not refreshed within its lease time: the seam releases it, and its ID names nothing.
        let expired = add_pinhole(address, "6", 7100, 1).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !held.lock().expect("state").live.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the pinhole outlived its lease time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let opened = held.lock().expect("state").opened;
        let answer = update(expired.clone()).await;
        assert_eq!(error_code(&answer), Some("704"), "{answer}");
        let answer = ask(address, true, "DeletePinhole", &[("UniqueID", &expired)]).await;
        assert_eq!(error_code(&answer), Some("704"), "{answer}");
        let opened_after = |held: &std::sync::Mutex<Held>| {
            let held = held.lock().expect("state");
            held.live.is_empty().then_some(held.opened)
        };
        assert_eq!(opened_after(&held), Some(opened), "the update opened");

        // Added twice, deleted under the second ID: the first names nothing either.
        let first = add_pinhole(address, "6", 7101, 60).await;
        let second = add_pinhole(address, "6", 7101, 60).await;
        let answer = ask(address, true, "DeletePinhole", &[("UniqueID", &second)]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let opened = opened_after(&held).expect("no pinhole left");
        let answer = update(first).await;
        assert_eq!(error_code(&answer), Some("704"), "{answer}");
        assert_eq!(opened_after(&held), Some(opened), "the update opened");

        for task in tasks {
            task.abort();
        }
    }

    #[tokio::test]
    async fn pinholes_of_one_port_for_other_remote_hosts_are_each_their_own() {
        let (address, held, tasks) = granting_device().await;
        let remote = |text: &str| Prefix {
            addr: text.parse().expect("an address"),
            len: 128,
        };
        let remotes = |held: &std::sync::Mutex<Held>| held.lock().expect("state").remotes(7102);
        let opened = |held: &std::sync::Mutex<Held>| held.lock().expect("state").opened;
        let update = |id: String| async move {
            ask(
                address,
                true,
                "UpdatePinhole",
                &[("UniqueID", &id), ("NewLeaseTime", "60")],
            )
            .await
        };

        // Two remote hosts, two pinholes: both open, each under its own UniqueID.
        let seven = add_pinhole_for(address, "2001:db8::7", "6", 7102, 60).await;
        let eight = add_pinhole_for(address, "2001:db8::8", "6", 7102, 1).await;
        assert_ne!(seven, eight);
        assert_eq!(
            remotes(&held),
            vec![vec![remote("2001:db8::7")], vec![remote("2001:db8::8")]]
        );
        assert_eq!(opened(&held), 2);

        // Added again, each is refreshed under its ID; updated, each is refreshed alone.
        assert_eq!(
            add_pinhole_for(address, "2001:db8::7", "6", 7102, 60).await,
            seven
        );
        let answer = update(seven.clone()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(opened(&held), 2, "a refresh opened");

        // The one not refreshed within its lease time ends alone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while remotes(&held).len() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the pinhole outlived its lease time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(remotes(&held), vec![vec![remote("2001:db8::7")]]);
        let answer = update(eight).await;
        assert_eq!(error_code(&answer), Some("704"), "{answer}");
        let answer = update(seven.clone()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

        // Deleting one leaves the other.
        let eight = add_pinhole_for(address, "2001:db8::8", "6", 7102, 60).await;
        let answer = ask(address, true, "DeletePinhole", &[("UniqueID", &eight)]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(remotes(&held), vec![vec![remote("2001:db8::7")]]);
        let answer = ask(address, true, "DeletePinhole", &[("UniqueID", &seven)]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(remotes(&held).is_empty());
        for task in tasks {
            task.abort();
        }
    }

    #[tokio::test]
    async fn the_pinhole_counters_are_answered_with_upnp_errors() {
        let (address, held, tasks) = granting_device().await;
        let packets = |id: String| async move {
            ask(address, true, "GetPinholePackets", &[("UniqueID", &id)]).await
        };
        let id = add_pinhole(address, "6", 7200, 60).await;

        // No counter per pinhole: the required GetPinholePackets fails to act on a live
        // pinhole, and names no other; the optional CheckPinholeWorking is not implemented, as
        // the description says.
        let answer = packets(id.clone()).await;
        assert_eq!(error_code(&answer), Some("501"), "{answer}");
        let unknown = (id.parse::<u16>().expect("a UniqueID") + 1).to_string();
        let answer = packets(unknown).await;
        assert_eq!(error_code(&answer), Some("704"), "{answer}");
        let answer = packets("not an ID".into()).await;
        assert_eq!(error_code(&answer), Some("402"), "{answer}");
        let answer = ask(address, true, "CheckPinholeWorking", &[("UniqueID", &id)]).await;
        assert_eq!(error_code(&answer), Some("401"), "{answer}");
        {
            let held = held.lock().expect("state");
            assert_eq!((held.opened, held.live.len()), (1, 1), "{held:?}");
        }

        // A pinhole deleted is no entry.
        let answer = ask(address, true, "DeletePinhole", &[("UniqueID", &id)]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let answer = packets(id).await;
        assert_eq!(error_code(&answer), Some("704"), "{answer}");
        for task in tasks {
            task.abort();
        }
    }

    #[tokio::test]
    async fn port_mappings_of_one_port_for_each_family_and_remote_host_are_each_their_own() {
        use fwnp_proto::{Family, HostAddresses};
        let (seam, held, mut tasks) = crate::frontend::stand_in::granting_seam();
        let (listening, task) = serve_device_on(seam, "[::]:0").await;
        tasks.push(task);
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, listening.port()));
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listening.port()));
        let both = vec![
            (HostAddresses::Default, Some(Family::Ipv4)),
            (HostAddresses::Default, Some(Family::Ipv6)),
        ];
        let openings = || held.lock().expect("state").openings(7000);
        let opened = || held.lock().expect("state").opened;
        let specific = |from: SocketAddr, remote_host: &'static str| async move {
            ask(
                from,
                false,
                "GetSpecificPortMappingEntry",
                &[
                    ("NewRemoteHost", remote_host),
                    ("NewExternalPort", "7000"),
                    ("NewProtocol", "TCP"),
                ],
            )
            .await
        };
        let delete = |from: SocketAddr, remote_host: &'static str| async move {
            ask(
                from,
                false,
                "DeletePortMapping",
                &[
                    ("NewRemoteHost", remote_host),
                    ("NewExternalPort", "7000"),
                    ("NewProtocol", "TCP"),
                ],
            )
            .await
        };

        // The same port mapped over IPv4 and over IPv6: both open.
        for from in [v4, v6] {
            let answer = add_mapping(from, 7000).await;
            assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        }
        assert_eq!(openings(), both);
        for from in [v4, v6] {
            let answer = add_mapping(from, 7000).await;
            assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        }
        assert_eq!(opened(), 2, "a refresh opened");
        for (from, client) in [(v4, "127.0.0.1"), (v6, "::1")] {
            let answer = specific(from, "").await;
            assert!(
                answer.contains(&format!("<NewInternalClient>{client}</NewInternalClient>")),
                "{answer}"
            );
        }
        let answer = ask(
            v4,
            false,
            "GetGenericPortMappingEntry",
            &[("NewPortMappingIndex", "1")],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

        // For one remote host beside the one for any: another mapping, named by its
        // NewRemoteHost.
        let answer = add_mapping_for(v4, "192.0.2.7", 7000).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(opened(), 3);
        let remotes = held.lock().expect("state").remotes(7000);
        assert_eq!(remotes.len(), 3, "{remotes:?}");
        let answer = specific(v4, "192.0.2.7").await;
        assert!(
            answer.contains("<NewLeaseDuration>0</NewLeaseDuration>"),
            "{answer}"
        );
        let answer = delete(v4, "192.0.2.7").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(openings(), both);
        let answer = specific(v4, "192.0.2.7").await;
        assert_eq!(error_code(&answer), Some("714"), "{answer}");

        // Deleted over IPv6, the IPv6 mapping goes and the IPv4 one stays.
        let answer = delete(v6, "").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(openings(), vec![both[0].clone()]);
        let answer = delete(v6, "").await;
        assert_eq!(error_code(&answer), Some("714"), "{answer}");
        assert_eq!(openings(), vec![both[0].clone()]);
        let answer = delete(v4, "").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(openings().is_empty());
        for task in tasks {
            task.abort();
        }
    }

    #[tokio::test]
    async fn the_required_actions_of_wanipconnection_1_are_answered() {
        let (address, mut core, task) = device().await;
        let answer = ask(address, false, "GetNATRSIPStatus", &[]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer.contains("<NewRSIPAvailable>0</NewRSIPAvailable>"),
            "{answer}"
        );
        // FWNP does not translate: the host's address is its external one.
        assert!(
            answer.contains("<NewNATEnabled>0</NewNATEnabled>"),
            "{answer}"
        );
        let answer = ask(address, false, "GetConnectionTypeInfo", &[]).await;
        assert!(
            answer.contains("<NewConnectionType>IP_Routed</NewConnectionType>"),
            "{answer}"
        );
        // The connection type it has already: nothing to change.
        let answer = ask(
            address,
            false,
            "SetConnectionType",
            &[("NewConnectionType", "IP_Routed")],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let answer = ask(
            address,
            false,
            "SetConnectionType",
            &[("NewConnectionType", "IP_Bridged")],
        )
        .await;
        assert_eq!(error_code(&answer), Some("606"), "{answer}");
        let answer = ask(address, false, "RequestConnection", &[]).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let answer = ask(address, false, "ForceTermination", &[]).await;
        assert_eq!(error_code(&answer), Some("606"), "{answer}");
        // Each action WANIPConnection:1 requires is served (answered, or refused otherwise than
        // as an unknown action).
        for action in [
            "SetConnectionType",
            "GetConnectionTypeInfo",
            "RequestConnection",
            "ForceTermination",
            "GetStatusInfo",
            "GetNATRSIPStatus",
            "GetSpecificPortMappingEntry",
            "AddPortMapping",
            "DeletePortMapping",
            "GetExternalIPAddress",
        ] {
            let answer = ask(address, false, action, &[]).await;
            assert_ne!(error_code(&answer), Some("401"), "{action}: {answer}");
        }
        assert!(core.try_recv().is_err(), "an action reached the core");
        task.abort();
    }

    /// Sends `request` raw and reads the answer until the device closes.
    async fn exchange(address: SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(request).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_end(&mut answer),
        )
        .await
        .expect("the device closes")
        .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// A SOAP request for `action` of `service` posted to `path`, with `soapaction` (none when
    /// `None`).
    fn soap(path: &str, service: &str, action: &str, soapaction: Option<&str>) -> Vec<u8> {
        let body = format!(
            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><u:{action} xmlns:u=\"urn:schemas-upnp-org:service:{service}:1\"><NewExternalPort>7500</NewExternalPort><NewProtocol>TCP</NewProtocol></u:{action}></s:Body></s:Envelope>"
        );
        let header = soapaction
            .map(|h| format!("SOAPAction: {h}\r\n"))
            .unwrap_or_default();
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n{header}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn invalid_action(answer: &str) -> bool {
        answer.starts_with("HTTP/1.1 500 ")
            && answer.contains("<errorCode>401</errorCode>")
            && answer.contains("Invalid Action")
    }

    #[tokio::test]
    async fn a_soapaction_that_does_not_name_the_bodys_action_is_an_invalid_action() {
        let (address, mut core, task) = device().await;
        let wan = "WANIPConnection";
        // Named as in the body: answered (this action asks nothing of the core).
        let answer = exchange(
            address,
            &soap(
                CONTROL_PATH,
                wan,
                "GetExternalIPAddress",
                Some(&format!(
                    "\"urn:schemas-upnp-org:service:{wan}:1#GetExternalIPAddress\""
                )),
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer.contains("<NewExternalIPAddress>127.0.0.1</NewExternalIPAddress>"),
            "{answer}"
        );
        // Version 2 of the service, unquoted: the same action.
        let answer = exchange(
            address,
            &soap(
                CONTROL_PATH,
                wan,
                "GetExternalIPAddress",
                Some(&format!(
                    "urn:schemas-upnp-org:service:{wan}:2#GetExternalIPAddress"
                )),
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        // Another action, another service, none at all, no action part: 401, nothing done.
        for soapaction in [
            Some(format!(
                "\"urn:schemas-upnp-org:service:{wan}:1#DeletePortMapping\""
            )),
            Some(
                "\"urn:schemas-upnp-org:service:WANIPv6FirewallControl:1#AddPortMapping\""
                    .to_owned(),
            ),
            Some(format!("\"urn:schemas-upnp-org:service:{wan}:1\"")),
            Some(format!(
                "\"urn:schemas-upnp-org:service:{wan}:#AddPortMapping\""
            )),
            None,
        ] {
            let answer = exchange(
                address,
                &soap(CONTROL_PATH, wan, "AddPortMapping", soapaction.as_deref()),
            )
            .await;
            assert!(invalid_action(&answer), "{soapaction:?}: {answer}");
        }
        assert!(
            core.try_recv().is_err(),
            "a refused request reached the core"
        );
        // The other control URLs check their own service: another's is refused, theirs answered.
        for (path, service, action) in [
            (
                COMMON_PATH,
                "WANCommonInterfaceConfig",
                "GetCommonLinkProperties",
            ),
            (FIREWALL_PATH, "WANIPv6FirewallControl", "GetFirewallStatus"),
        ] {
            for (named, accepted) in [(wan, false), (service, true)] {
                let header = format!("\"urn:schemas-upnp-org:service:{named}:1#{action}\"");
                let answer = exchange(address, &soap(path, service, action, Some(&header))).await;
                if accepted {
                    assert!(answer.starts_with("HTTP/1.1 200 "), "{path}: {answer}");
                } else {
                    assert!(invalid_action(&answer), "{path} as {named}: {answer}");
                }
            }
        }
        task.abort();
    }

    #[tokio::test]
    async fn head_on_the_description_is_answered_as_get_without_the_body() {
        let (address, _core, task) = device().await;
        let get = exchange(
            address,
            b"GET /rootDesc.xml HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await;
        let head = exchange(
            address,
            b"HEAD /rootDesc.xml HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let (get_head, body) = get.split_once("\r\n\r\n").expect("a head and a body");
        assert!(body.contains(IGD), "{get}");
        assert_eq!(head, format!("{get_head}\r\n\r\n"), "GET's head, no body");
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        // Elsewhere HEAD is what GET is: not allowed on a control URL, unknown elsewhere.
        let control = exchange(address, b"HEAD /ctl/IPConn HTTP/1.1\r\n\r\n").await;
        assert!(control.starts_with("HTTP/1.1 405 "), "{control}");
        let unknown = exchange(address, b"HEAD /nothing HTTP/1.1\r\n\r\n").await;
        assert!(unknown.starts_with("HTTP/1.1 404 "), "{unknown}");
        task.abort();
    }

    /// An element of an XML document: its local name, attributes, text and children.
    #[derive(Debug, Default)]
    struct Element {
        name: String,
        attributes: Vec<(String, String)>,
        text: String,
        children: Vec<Element>,
    }

    impl Element {
        fn child(&self, name: &str) -> Option<&Element> {
            self.children.iter().find(|c| c.name == name)
        }

        /// The text of the child `name` (empty when there is none).
        fn text_of(&self, name: &str) -> &str {
            self.child(name).map_or("", |c| c.text.as_str())
        }

        fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
            self.children.iter().filter(move |c| c.name == name)
        }

        /// Every element named `name` below this one, in document order.
        fn descendants<'a>(&'a self, name: &str, found: &mut Vec<&'a Element>) {
            for child in &self.children {
                if child.name == name {
                    found.push(child);
                }
                child.descendants(name, found);
            }
        }

        fn attribute(&self, name: &str) -> Option<&str> {
            self.attributes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Reads `text` as an XML document (well-formed, each end tag its start tag's): its root
    /// element.
    fn parse_xml(text: &str) -> Result<Element, String> {
        fn open(start: &quick_xml::events::BytesStart<'_>) -> Result<Element, String> {
            let mut attributes = Vec::new();
            for attribute in start.attributes() {
                let attribute = attribute.map_err(|e| e.to_string())?;
                attributes.push((
                    String::from_utf8_lossy(attribute.key.as_ref()).into_owned(),
                    String::from_utf8_lossy(&attribute.value).into_owned(),
                ));
            }
            Ok(Element {
                name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
                attributes,
                ..Element::default()
            })
        }
        let mut reader = quick_xml::Reader::from_str(text);
        let mut open_elements = vec![Element::default()];
        loop {
            match reader.read_event().map_err(|e| e.to_string())? {
                Event::Start(start) => open_elements.push(open(&start)?),
                Event::Empty(start) => {
                    let element = open(&start)?;
                    open_elements
                        .last_mut()
                        .ok_or("an element after the root")?
                        .children
                        .push(element);
                }
                Event::Text(t) => {
                    let text = t.decode().map_err(|e| e.to_string())?;
                    if let Some(element) = open_elements.last_mut() {
                        element.text.push_str(text.trim());
                    }
                }
                Event::GeneralRef(r) => {
                    return Err(format!(
                        "unexpected entity {:?}",
                        String::from_utf8_lossy(&r)
                    ));
                }
                Event::End(_) => {
                    let done = open_elements.pop().ok_or("an end tag without a start")?;
                    open_elements
                        .last_mut()
                        .ok_or("an end tag without a start")?
                        .children
                        .push(done);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let mut document = match open_elements.pop() {
            Some(document) if open_elements.is_empty() => document,
            _ => return Err("an element is not closed".into()),
        };
        match document.children.len() {
            1 => document
                .children
                .pop()
                .ok_or_else(|| "no root element".into()),
            n => Err(format!("{n} root elements")),
        }
    }

    /// The body of an HTTP answer.
    fn body_of(answer: &str) -> &str {
        answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    }

    /// A control request for `action` of `service_type` posted to `path`, with `arguments` and
    /// the SOAPAction that names it.
    fn control_request(
        path: &str,
        service_type: &str,
        action: &str,
        arguments: &[(&str, &str)],
    ) -> Vec<u8> {
        let arguments: String = arguments
            .iter()
            .map(|(name, value)| format!("<{name}>{value}</{name}>"))
            .collect();
        let body = format!(
            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{service_type}\">{arguments}</u:{action}></s:Body></s:Envelope>"
        );
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: \"{service_type}#{action}\"\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// The actions each service's specification defines (WANIPConnection's of versions 1 and
    /// 2), by the service's name: what a control point may ask of its control URL.
    const SPECIFIED_ACTIONS: [(&str, &[&str]); 4] = [
        (
            "Layer3Forwarding",
            &["SetDefaultConnectionService", "GetDefaultConnectionService"],
        ),
        (
            "WANCommonInterfaceConfig",
            &[
                "SetEnabledForInternet",
                "GetEnabledForInternet",
                "GetCommonLinkProperties",
                "GetWANAccessProvider",
                "GetMaximumActiveConnections",
                "GetTotalBytesSent",
                "GetTotalBytesReceived",
                "GetTotalPacketsSent",
                "GetTotalPacketsReceived",
                "GetActiveConnection",
            ],
        ),
        (
            "WANIPConnection",
            &[
                "SetConnectionType",
                "GetConnectionTypeInfo",
                "RequestConnection",
                "RequestTermination",
                "ForceTermination",
                "SetAutoDisconnectTime",
                "SetIdleDisconnectTime",
                "SetWarnDisconnectDelay",
                "GetStatusInfo",
                "GetAutoDisconnectTime",
                "GetIdleDisconnectTime",
                "GetWarnDisconnectDelay",
                "GetNATRSIPStatus",
                "GetGenericPortMappingEntry",
                "GetSpecificPortMappingEntry",
                "AddPortMapping",
                "DeletePortMapping",
                "GetExternalIPAddress",
                "DeletePortMappingRange",
                "GetListOfPortMappings",
                "AddAnyPortMapping",
            ],
        ),
        (
            "WANIPv6FirewallControl",
            &[
                "GetFirewallStatus",
                "GetOutboundPinholeTimeout",
                "AddPinhole",
                "UpdatePinhole",
                "DeletePinhole",
                "GetPinholePackets",
                "CheckPinholeWorking",
            ],
        ),
    ];

    /// The data type each state variable has in its service's specification.
    const SPECIFIED_TYPES: [(&str, &str); 31] = [
        ("DefaultConnectionService", "string"),
        ("WANAccessType", "string"),
        ("Layer1UpstreamMaxBitRate", "ui4"),
        ("Layer1DownstreamMaxBitRate", "ui4"),
        ("PhysicalLinkStatus", "string"),
        ("ConnectionType", "string"),
        ("PossibleConnectionTypes", "string"),
        ("ConnectionStatus", "string"),
        ("Uptime", "ui4"),
        ("LastConnectionError", "string"),
        ("ExternalIPAddress", "string"),
        ("RSIPAvailable", "boolean"),
        ("NATEnabled", "boolean"),
        ("PortMappingNumberOfEntries", "ui2"),
        ("PortMappingEnabled", "boolean"),
        ("PortMappingLeaseDuration", "ui4"),
        ("RemoteHost", "string"),
        ("ExternalPort", "ui2"),
        ("InternalPort", "ui2"),
        ("PortMappingProtocol", "string"),
        ("InternalClient", "string"),
        ("PortMappingDescription", "string"),
        ("FirewallEnabled", "boolean"),
        ("InboundPinholeAllowed", "boolean"),
        ("A_ARG_TYPE_OutboundPinholeTimeout", "ui4"),
        ("A_ARG_TYPE_IPv6Address", "string"),
        ("A_ARG_TYPE_Port", "ui2"),
        ("A_ARG_TYPE_Protocol", "ui2"),
        ("A_ARG_TYPE_LeaseTime", "ui4"),
        ("A_ARG_TYPE_UniqueID", "ui2"),
        ("A_ARG_TYPE_PinholePackets", "ui4"),
    ];

    #[tokio::test]
    async fn each_service_description_is_served_and_declares_what_its_control_url_serves() {
        let (address, mut core, task) = device().await;
        let root = exchange(
            address,
            b"GET /rootDesc.xml HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await;
        let description = parse_xml(body_of(&root)).expect("the description is XML");
        let mut services = Vec::new();
        description.descendants("service", &mut services);
        assert_eq!(services.len(), 4, "{root}");
        for service in services {
            let service_type = service.text_of("serviceType");
            let scpd_url = service.text_of("SCPDURL");
            let control_url = service.text_of("controlURL");
            let answer = exchange(
                address,
                format!("GET {scpd_url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
            )
            .await;
            assert!(answer.starts_with("HTTP/1.1 200 "), "{scpd_url}: {answer}");
            assert!(
                answer.contains("\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n"),
                "{scpd_url}: {answer}"
            );
            let scpd = parse_xml(body_of(&answer))
                .unwrap_or_else(|e| panic!("{scpd_url} is not XML: {e}"));
            assert_eq!(scpd.name, "scpd", "{scpd_url}");
            assert_eq!(
                scpd.attribute("xmlns"),
                Some("urn:schemas-upnp-org:service-1-0"),
                "{scpd_url}"
            );
            let version = scpd.child("specVersion").expect("specVersion");
            assert_eq!(
                (version.text_of("major"), version.text_of("minor")),
                ("1", "0"),
                "{scpd_url}"
            );

            // The state variables, each of its specified data type.
            let table = scpd.child("serviceStateTable").expect("serviceStateTable");
            let mut variables = std::collections::BTreeSet::new();
            for variable in table.children_named("stateVariable") {
                let name = variable.text_of("name");
                let specified = SPECIFIED_TYPES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("{scpd_url}: {name} is no specified variable"));
                assert_eq!(
                    variable.text_of("dataType"),
                    specified.1,
                    "{scpd_url}: {name}"
                );
                assert!(
                    matches!(variable.attribute("sendEvents"), Some("yes" | "no")),
                    "{scpd_url}: {name}"
                );
                assert!(variables.insert(name), "{scpd_url}: {name} twice");
            }
            assert!(!variables.is_empty(), "{scpd_url}: no state variable");

            // The actions: their arguments in, then out, each related to a variable above.
            let mut declared = std::collections::BTreeMap::new();
            for action in scpd
                .child("actionList")
                .map(|list| list.children_named("action").collect::<Vec<_>>())
                .unwrap_or_default()
            {
                let name = action.text_of("name");
                let mut outs = Vec::new();
                for argument in action
                    .child("argumentList")
                    .map(|list| list.children_named("argument").collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    let argument_name = argument.text_of("name");
                    match argument.text_of("direction") {
                        "in" => assert!(
                            outs.is_empty(),
                            "{scpd_url}: {name}: in argument {argument_name} after an out one"
                        ),
                        "out" => outs.push(argument_name),
                        other => panic!("{scpd_url}: {name}: direction {other:?}"),
                    }
                    let related = argument.text_of("relatedStateVariable");
                    assert!(
                        variables.contains(related),
                        "{scpd_url}: {name}: {argument_name} refers to {related:?}"
                    );
                }
                assert!(
                    declared.insert(name, outs).is_none(),
                    "{scpd_url}: {name} twice"
                );
            }

            // What the control URL serves is what the document declares: every action of the
            // specification is asked for, without arguments. Served is an answer or a UPnP
            // error other than 401 Invalid Action; an answer has the declared out arguments,
            // in order.
            let (_, specified) = SPECIFIED_ACTIONS
                .iter()
                .find(|(name, _)| service_type.starts_with(&format!("{SERVICE_URN}{name}:")))
                .unwrap_or_else(|| panic!("{service_type} is no specified service"));
            let mut asked: std::collections::BTreeSet<&str> = specified.iter().copied().collect();
            asked.extend(declared.keys().copied());
            for action in asked {
                let answer = exchange(
                    address,
                    &control_request(control_url, service_type, action, &[]),
                )
                .await;
                let served = answer.starts_with("HTTP/1.1 200 ")
                    || (answer.starts_with("HTTP/1.1 500 ")
                        && answer.contains("<errorCode>")
                        && !answer.contains("<errorCode>401</errorCode>"));
                assert_eq!(
                    served,
                    declared.contains_key(action),
                    "{control_url} {action}: {answer}"
                );
                if answer.starts_with("HTTP/1.1 200 ") {
                    let envelope = parse_xml(body_of(&answer)).expect("the answer is XML");
                    let response = envelope
                        .child("Body")
                        .and_then(|b| b.child(&format!("{action}Response")))
                        .unwrap_or_else(|| panic!("{action}: {answer}"));
                    let given: Vec<&str> =
                        response.children.iter().map(|c| c.name.as_str()).collect();
                    assert_eq!(Some(&given), declared.get(action), "{action}: {answer}");
                }
            }
        }
        assert!(core.try_recv().is_err(), "an action reached the core");
        task.abort();
    }

    #[tokio::test]
    async fn the_external_port_wildcard_is_refused_and_deletes_nothing() {
        let (address, mut core, task) = device().await;
        let answer = ask(
            address,
            false,
            "AddPortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "0"),
                ("NewProtocol", "TCP"),
                ("NewInternalPort", "7500"),
                ("NewInternalClient", "127.0.0.1"),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", "test"),
                ("NewLeaseDuration", "60"),
            ],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 500 "), "{answer}");
        assert!(answer.contains("<errorCode>716</errorCode>"), "{answer}");
        assert!(answer.contains("WildCardNotPermittedInExtPort"), "{answer}");
        // Port 0 names no mapping: Invalid Args, as miniupnpd answers, and nothing released.
        let answer = ask(
            address,
            false,
            "DeletePortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "0"),
                ("NewProtocol", "TCP"),
            ],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 500 "), "{answer}");
        assert!(answer.contains("<errorCode>402</errorCode>"), "{answer}");
        assert!(core.try_recv().is_err(), "the request reached the core");
        task.abort();
    }

    #[test]
    fn answers_searches_only_for_what_the_description_offers() {
        let root = format!("uuid:{UUID}");
        let wan = format!("uuid:{UUID}-1");
        let connection = format!("uuid:{UUID}-2");
        let one = |st: &str, udn: &str| vec![(st.to_owned(), format!("{udn}::{st}"))];
        assert_eq!(
            search_answers("upnp:rootdevice"),
            one("upnp:rootdevice", &root)
        );
        assert_eq!(search_answers(IGD), one(IGD, &root));
        assert_eq!(search_answers(L3F), one(L3F, &root));
        assert_eq!(search_answers(WAN_DEVICE), one(WAN_DEVICE, &wan));
        assert_eq!(search_answers(WAN_COMMON), one(WAN_COMMON, &wan));
        assert_eq!(
            search_answers(WAN_CONNECTION_DEVICE),
            one(WAN_CONNECTION_DEVICE, &connection)
        );
        assert_eq!(search_answers(WAN_IP), one(WAN_IP, &connection));
        assert_eq!(search_answers(WAN_IP6_FW), one(WAN_IP6_FW, &connection));
        assert_eq!(
            search_answers(&connection),
            vec![(connection.clone(), connection.clone())]
        );
        // Versions above the one offered, no version, version 0, types not offered: silence.
        for target in [
            "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
            "urn:schemas-upnp-org:service:WANIPConnection:2",
            "urn:schemas-upnp-org:service:WANIPConnection:",
            "urn:schemas-upnp-org:service:WANIPConnection:0",
            "urn:schemas-upnp-org:service:WANIPConnection:+1",
            "urn:schemas-upnp-org:service:WANIPConnection",
            "urn:schemas-upnp-org:service:WANPPPConnection:1",
            "urn:schemas-upnp-org:device:MediaServer:1",
            "uuid:00000000-0000-0000-0000-000000000000",
            "",
        ] {
            assert_eq!(search_answers(target), Vec::new(), "{target:?}");
        }

        // ssdp:all: 3 answers for the root device, 2 for each embedded device, 1 for each
        // service, exactly the devices and services of the description, each service under the
        // UUID of the device that holds it.
        let description = parse_xml(&description("http://127.0.0.1:1/")).expect("XML");
        let mut devices = Vec::new();
        description.descendants("device", &mut devices);
        let mut expected = vec![(
            "upnp:rootdevice".to_owned(),
            format!("{root}::upnp:rootdevice"),
        )];
        for device in &devices {
            let udn = device.text_of("UDN");
            expected.push((udn.to_owned(), udn.to_owned()));
            let device_type = device.text_of("deviceType");
            expected.push((device_type.to_owned(), format!("{udn}::{device_type}")));
            for service in device
                .child("serviceList")
                .map(|list| list.children_named("service").collect::<Vec<_>>())
                .unwrap_or_default()
            {
                let service_type = service.text_of("serviceType");
                expected.push((service_type.to_owned(), format!("{udn}::{service_type}")));
            }
        }
        assert_eq!(devices.len(), 3);
        assert_eq!(search_answers("ssdp:all"), expected);
        assert_eq!(expected.len(), 3 + 2 * 2 + 4);
    }

    #[test]
    fn reads_ssdp_searches() {
        let search = b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\n\r\n";
        assert_eq!(
            search_target(search).as_deref(),
            Some("urn:schemas-upnp-org:device:InternetGatewayDevice:1")
        );
        assert_eq!(search_target(b"NOTIFY * HTTP/1.1\r\n\r\n"), None);
    }
}
