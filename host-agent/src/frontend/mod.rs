//! Front ends for applications that will never speak FWNP: NAT-PMP (RFC 6886) and PCP
//! (RFC 6887) requests sent to the default gateway's port 5351 reach the agent (the host table
//! redirects the host's own requests there), and UPnP IGD clients find the agent by SSDP
//! ([`upnp`]); the agent turns each mapping or pinhole into an FWNP lease.
//!
//! A front end is a client of the core like any application: for each process that asks, it
//! opens a virtual local connection to the core with the facts the kernel gives about that
//! process (uid, pid, executable), and sends the local API's Open and Release on it. So the
//! port-ownership check, the local user and group rules, the policy's lifetime clamp, renewal
//! at the gateway and release when the process exits are the core's, exactly as for
//! applications of the SDK. The front end only translates: its protocol's request into an
//! Open or a Release, the answer into its protocol's result code and lifetime. The lease's name
//! says which front end it came through ("natpmpc via NAT-PMP"), so that the gateway's audit
//! trail and `fwnp leases` show it.
//!
//! Who asks is the process that holds the request's source port (for UPnP, its end of the HTTP
//! connection). A tool such as `natpmpc`
//! asks for a port its parent listens on and exits at once; the lease is then held for the
//! nearest ancestor that holds the port, and ends when that process exits.
//!
//! A mapping lives while its client refreshes it: the front end releases it when the lifetime
//! it told the client has passed without a refresh (the core renews it at the gateway
//! meanwhile). Each virtual connection watches its leases (local API 6.1), so a mapping also
//! ends with its lease when the core reports it revoked, expired or lost, and the next refresh
//! asks again rather than vouching for an opening the gateway closed; a lease the core
//! re-opened goes on under its new id.

pub mod http;
pub mod natpmp;
pub mod pcp;
pub mod service;
#[cfg(test)]
mod stand_in;
pub mod upnp;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fwnp_netfilter::LocalRedirect;
use fwnp_proto::local::{
    DenialCode, EventKind, FRAME_HEADER_LEN, LocalCode, LocalMessage, Watch, decode_frame_body,
};
use fwnp_proto::{
    AppInfo, Common, Family, HostAddresses, LeaseId, Message, Open, Opening, PortRange, Prefix,
    Protocol, Release, Target,
};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info};

use crate::config::{FrontendsConfig, LocalConfig};
use crate::core::{ConnId, CoreInput, OPEN_WAIT};
use crate::ports::{CallerProcess, ProcFs};
use crate::server::{Outbox, peer_of};

/// The port NAT-PMP and PCP clients send their requests to.
pub const SERVER_PORT: u16 = 5351;

/// How often mappings past their lifetime and clients that exited are looked for.
const SWEEP: Duration = Duration::from_millis(500);
/// How far up from the asking process the holder of the port is looked for.
const MAX_ANCESTORS: usize = 16;
/// Requests of one client the core may have in hand at once.
const PENDING_PER_CLIENT: usize = 4;
/// Bytes of answers queued for one virtual connection: its front end reads them as they come.
const OUTBOX_LIMIT: usize = 1 << 20;

/// Which front end a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// NAT-PMP.
    NatPmp,
    /// PCP.
    Pcp,
    /// UPnP IGD: WANIPConnection's port mappings.
    Upnp,
    /// UPnP IGD: WANIPv6FirewallControl's pinholes. The two services keep their entries apart
    /// (a pinhole is no port mapping and each service lists, updates and deletes only its
    /// own), so a mapping and a pinhole of the same port are two openings.
    UpnpPinhole,
}

impl Via {
    /// Whether the front end's protocol tells mappings of one port apart by their remote
    /// hosts. UPnP's entries are named by their RemoteHost with their port and protocol, so a
    /// pinhole for another remote host is another pinhole. A PCP mapping is named by its
    /// internal address, protocol and port alone: its FILTERs are its own, and each request
    /// for it brings the whole set that replaces them (RFC 6887 section 13.3). NAT-PMP has no
    /// remote hosts.
    fn remotes_name_mappings(self) -> bool {
        matches!(self, Via::Upnp | Via::UpnpPinhole)
    }

    /// The protocol's name, as the lease's label shows it.
    pub fn name(self) -> &'static str {
        match self {
            Via::NatPmp => "NAT-PMP",
            Via::Pcp => "PCP",
            Via::Upnp | Via::UpnpPinhole => "UPnP IGD",
        }
    }
}

/// Why a request was not granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No process of this host (or more than one) holds the request's source port.
    #[error("no single process of this host sends from port {port}")]
    NoCaller {
        /// The source port.
        port: u16,
    },
    /// The agent or the gateway refused, with the local API's code.
    #[error("{reason}")]
    Denied {
        /// The code.
        code: DenialCode,
        /// Why, as the core or the gateway said it.
        reason: String,
    },
    /// The core has stopped.
    #[error("the agent is stopping")]
    CoreGone,
    /// The core did not answer in time.
    #[error("no answer from the agent's core")]
    NoAnswer,
    /// A PCP refresh or delete with another nonce than the mapping's (another client's).
    #[error("the nonce is not the mapping's")]
    NonceMismatch,
}

/// A mapping to open, refresh or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRequest {
    /// The front end.
    pub via: Via,
    /// The process that sent the request (the holder of its source port).
    pub requester: u32,
    /// TCP, UDP or another transport protocol.
    pub protocol: Protocol,
    /// The internal port, which is also the external one.
    pub port: u16,
    /// Seconds asked; 0 (UPnP's "permanent") asks for the policy's default, and the mapping
    /// lasts until it is deleted or its process exits.
    pub lifetime: u32,
    /// The host address to open (the one the client asks from); `None`: every address of
    /// `family`.
    pub host: Option<IpAddr>,
    /// The family of the host addresses to open; `None`: both.
    pub family: Option<Family>,
    /// Only these remote prefixes (PCP's FILTER); empty: any.
    pub remotes: Vec<Prefix>,
    /// PCP's nonce: a refresh or delete must carry the one the mapping was made with.
    pub nonce: Option<[u8; 12]>,
}

/// What was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// The lease.
    pub lease: LeaseId,
    /// Seconds the client may count on before refreshing, as the policy clamped them.
    pub lifetime: u32,
    /// The process the lease is held for.
    pub holder: u32,
    /// The mapping's serial number: it stays through refreshes and the lease's re-opening,
    /// and a mapping made later (after this one ended or was replaced) never has it.
    pub serial: u64,
}

impl MapRequest {
    /// The mapping the request names.
    fn key(&self) -> MappingKey {
        MappingKey {
            via: self.via,
            protocol: self.protocol,
            port: self.port,
            host: self.host,
            family: self.family,
            remotes: match self.via.remotes_name_mappings() {
                true => self.remotes.clone(),
                false => Vec::new(),
            },
        }
    }
}

/// What tells a process's mappings apart: each is its own opening, renewed, deleted and ended
/// on its own. An IPv4 and an IPv6 mapping of one port are two, as are two UPnP pinholes of one
/// port for other remote hosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MappingKey {
    via: Via,
    protocol: Protocol,
    port: u16,
    /// The host address opened; `None`: every address of `family`.
    host: Option<IpAddr>,
    /// The family of the host addresses opened; `None`: both.
    family: Option<Family>,
    /// Where [`Via::remotes_name_mappings`]: the remote prefixes; else empty.
    remotes: Vec<Prefix>,
}

impl MappingKey {
    /// Whether a delete of `asked` deletes this mapping: the same one, or, when `asked` names
    /// port 0, any port of its protocol at the same host address.
    fn deleted_by(&self, asked: &MappingKey) -> bool {
        (asked.port == 0 || self.port == asked.port)
            && (self.via, self.protocol, self.host, self.family)
                == (asked.via, asked.protocol, asked.host, asked.family)
            && self.remotes == asked.remotes
    }
}

#[derive(Debug, Clone)]
struct Mapping {
    lease: LeaseId,
    /// The lifetime granted, in seconds.
    lifetime: u32,
    /// The remote prefixes opened (where they do not name the mapping, the latest asked).
    remotes: Vec<Prefix>,
    nonce: Option<[u8; 12]>,
    /// Released unless refreshed by then; `None`: until deleted.
    expires: Option<Instant>,
    /// See [`Mapped::serial`].
    serial: u64,
}

impl Mapping {
    /// Refreshes the mapping for `asked` seconds (0: until deleted); the lifetime the client
    /// may count on, never above the one granted.
    fn refresh(&mut self, asked: u32, now: Instant) -> u32 {
        let lifetime = match asked {
            0 => self.lifetime,
            asked => asked.min(self.lifetime),
        };
        self.expires = (asked > 0).then(|| now + Duration::from_secs(u64::from(lifetime)));
        lifetime
    }
}

/// One process's virtual local connection.
struct Client {
    conn: ConnId,
    caller: CallerProcess,
    out: Outbox,
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    permits: Arc<Semaphore>,
    next_request: u64,
    mappings: HashMap<MappingKey, Mapping>,
}

impl Client {
    /// Sends a request on the virtual connection and waits for its answer, taking in the
    /// events that come first.
    async fn ask(
        &mut self,
        core: &mpsc::UnboundedSender<CoreInput>,
        message: LocalMessage,
        request_id: u64,
    ) -> Result<LocalMessage, Refusal> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::CoreGone)?;
        core.send(CoreInput::LocalRequest {
            conn: self.conn,
            message,
            permit,
        })
        .map_err(|_| Refusal::CoreGone)?;
        let deadline = tokio::time::Instant::now() + OPEN_WAIT + Duration::from_secs(5);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.frames.recv())
                .await
                .map_err(|_| Refusal::NoAnswer)?
                .ok_or(Refusal::CoreGone)?;
            let Some(message) = decode(&frame) else {
                continue;
            };
            if message.request_id() == Some(request_id) {
                return Ok(message);
            }
            self.take_event(&message);
        }
    }

    /// Takes in the events and late answers queued so far.
    fn drain(&mut self) {
        while let Ok(frame) = self.frames.try_recv() {
            if let Some(message) = decode(&frame) {
                self.take_event(&message);
            }
        }
    }

    /// A lease that ended (revoked, expired, lost, released: local API 6.3) is no longer a
    /// mapping; a re-opened one goes on under its new id, which later events name. Events for
    /// a lease no mapping has (one the seam released itself) change nothing.
    ///
    /// Once its mapping is gone, the client's next request for it is answered as the server
    /// that lost a mapping answers it. NAT-PMP and PCP refresh a mapping with the request that
    /// made it, and a server that lost it makes it again (RFC 6886 section 3.7, RFC 6887
    /// sections 11.2.1 and 11.3): the refresh sends a fresh Open, which the gateway's policy
    /// grants or refuses anew. UPnP's AddPortMapping likewise makes an entry that does not
    /// exist, while UpdatePinhole of a pinhole that is gone is 704 NoSuchEntry
    /// (WANIPv6FirewallControl:1), after which the control point adds it again.
    fn take_event(&mut self, message: &LocalMessage) {
        let LocalMessage::Event(event) = message else {
            return;
        };
        match event.kind {
            EventKind::Reopened => {
                if let Some(new) = event.new_lease {
                    for mapping in self.mappings.values_mut() {
                        if mapping.lease == event.lease {
                            mapping.lease = new;
                        }
                    }
                }
            }
            EventKind::Revoked | EventKind::Expired | EventKind::Lost | EventKind::Released => {
                let before = self.mappings.len();
                self.mappings.retain(|_, m| m.lease != event.lease);
                if self.mappings.len() < before {
                    info!(
                        conn = self.conn,
                        lease = %event.lease,
                        kind = ?event.kind,
                        "a mapping's lease ended at the agent; the mapping is gone"
                    );
                }
            }
            _ => {}
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// Whether one of its mappings has `lease`.
    fn holds(&self, lease: LeaseId) -> bool {
        self.mappings.values().any(|m| m.lease == lease)
    }

    /// The key of the mapping `serial` made through `via`, if this client holds it.
    fn find(&self, via: Via, serial: u64) -> Option<MappingKey> {
        self.mappings
            .iter()
            .find(|(key, mapping)| key.via == via && mapping.serial == serial)
            .map(|(key, _)| key.clone())
    }

    /// Releases `lease` and waits until the core says it is gone from both tables, unless
    /// another mapping of this client has it: the gateway merged their identical openings into
    /// one lease, which a connection holds once (local API 5.2), so a Release would end it for
    /// that mapping too.
    async fn release(
        &mut self,
        core: &mpsc::UnboundedSender<CoreInput>,
        lease: LeaseId,
    ) -> Result<(), Refusal> {
        if self.holds(lease) {
            return Ok(());
        }
        let id = self.next_id();
        let message = LocalMessage::Wire(Message::Release(Release {
            common: common(id),
            lease,
        }));
        match self.ask(core, message, id).await? {
            LocalMessage::Denied(d)
                if d.code != DenialCode::Local(LocalCode::UnknownLocalLease) =>
            {
                Err(Refusal::Denied {
                    code: d.code,
                    reason: d.reason.unwrap_or_default(),
                })
            }
            _ => Ok(()),
        }
    }
}

fn common(id: u64) -> Common {
    Common {
        request_id: Some(id),
        critical: Vec::new(),
    }
}

fn decode(frame: &[u8]) -> Option<LocalMessage> {
    decode_frame_body(frame.get(FRAME_HEADER_LEN..)?).ok()
}

/// The front ends' side of the core: virtual local connections, one per process that asks.
pub struct Seam {
    core: mpsc::UnboundedSender<CoreInput>,
    local: LocalConfig,
    procfs: ProcFs,
    clients: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<Client>>>>,
    /// The serial number of the next mapping opened.
    next_serial: AtomicU64,
}

impl std::fmt::Debug for Seam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seam").finish_non_exhaustive()
    }
}

/// Connection numbers of the virtual connections: above those of the local socket.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1 << 62);

impl Seam {
    /// A seam to the core behind `core`; `local` holds the user and group rules.
    pub fn new(core: mpsc::UnboundedSender<CoreInput>, local: LocalConfig) -> Arc<Seam> {
        Arc::new(Seam {
            core,
            local,
            procfs: ProcFs::default(),
            clients: Mutex::new(HashMap::new()),
            next_serial: AtomicU64::new(1),
        })
    }

    /// Releases mappings past their lifetime and closes the connections of processes that
    /// exited, until the core goes away.
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP);
        loop {
            tick.tick().await;
            if self.core.is_closed() {
                return;
            }
            let clients: Vec<(u32, Arc<tokio::sync::Mutex<Client>>)> = self
                .lock()
                .iter()
                .map(|(pid, c)| (*pid, c.clone()))
                .collect();
            for (pid, client) in clients {
                let Ok(mut client) = client.try_lock() else {
                    continue;
                };
                client.drain();
                let gone = !client.caller.is_alive(&self.procfs) || client.out.is_closing();
                if gone {
                    debug!(pid, conn = client.conn, "front-end client gone");
                    self.lock().remove(&pid);
                    let _ = self.core.send(CoreInput::LocalClosed { conn: client.conn });
                    continue;
                }
                let now = Instant::now();
                let expired: Vec<MappingKey> = client
                    .mappings
                    .iter()
                    .filter(|(_, m)| m.expires.is_some_and(|e| e <= now))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in expired {
                    if let Some(mapping) = client.mappings.remove(&key) {
                        if client.holds(mapping.lease) {
                            continue;
                        }
                        info!(
                            pid,
                            port = key.port,
                            via = key.via.name(),
                            "mapping not refreshed in time; releasing it"
                        );
                        // The answer is taken in with the next events.
                        let id = client.next_id();
                        let permit = client.permits.clone().try_acquire_owned();
                        if let Ok(permit) = permit {
                            let _ = self.core.send(CoreInput::LocalRequest {
                                conn: client.conn,
                                message: LocalMessage::Wire(Message::Release(Release {
                                    common: common(id),
                                    lease: mapping.lease,
                                })),
                                permit,
                            });
                        }
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<tokio::sync::Mutex<Client>>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process that sent a request from local UDP port `port`: the one holding the port's
    /// socket, or the eldest of several that a fork left holding it ([`ProcFs::sender`]).
    pub async fn udp_sender(&self, port: u16) -> Result<u32, Refusal> {
        let procfs = self.procfs.clone();
        tokio::task::spawn_blocking(move || {
            let inodes: HashSet<u64> = procfs
                .bound_sockets(Protocol::Udp, PortRange::single(port))
                .ok()?
                .into_iter()
                .map(|(_, inode)| inode)
                .collect();
            procfs.sender(&inodes)
        })
        .await
        .ok()
        .flatten()
        .ok_or(Refusal::NoCaller { port })
    }

    /// The process a lease on `port` is held for: the requester if it (or a descendant) holds
    /// the port, else its nearest ancestor of the same user that holds the port's socket itself
    /// (the application that ran a tool such as `natpmpc`), else the requester, whom the core's
    /// check then refuses. Only a socket the ancestor holds itself counts: a process does not
    /// open what a sibling of the requester serves, nor what another user's daemon above it
    /// (sshd) serves.
    async fn holder_for(&self, requester: u32, protocol: Protocol, port: u16) -> u32 {
        let procfs = self.procfs.clone();
        tokio::task::spawn_blocking(move || {
            let ports = PortRange::single(port);
            if let Ok(crate::ports::Ownership::Caller { .. }) =
                procfs.ownership(requester, protocol, ports)
            {
                return requester;
            }
            let Ok(bound) = procfs.bound_sockets(protocol, ports) else {
                return requester;
            };
            let inodes: HashSet<u64> = bound.into_iter().map(|(_, inode)| inode).collect();
            let user = owner_of(requester).map(|(uid, _)| uid);
            let mut candidate = requester;
            for _ in 0..MAX_ANCESTORS {
                match procfs.parent(candidate) {
                    // Init holds nothing for anyone.
                    Some(parent) if parent > 1 => candidate = parent,
                    _ => break,
                }
                if owner_of(candidate).map(|(uid, _)| uid) == user
                    && !procfs.socket_inodes(candidate).is_disjoint(&inodes)
                {
                    return candidate;
                }
            }
            requester
        })
        .await
        .unwrap_or(requester)
    }

    /// The client of `pid`, connecting it to the core if it has no connection yet.
    fn client(&self, pid: u32) -> Result<Arc<tokio::sync::Mutex<Client>>, Refusal> {
        let mut clients = self.lock();
        if let Some(client) = clients.get(&pid) {
            let alive = client
                .try_lock()
                .map(|c| c.caller.is_alive(&self.procfs) && !c.out.is_closing())
                .unwrap_or(true);
            if alive {
                return Ok(client.clone());
            }
            if let Some(old) = clients.remove(&pid)
                && let Ok(old) = old.try_lock()
            {
                let _ = self.core.send(CoreInput::LocalClosed { conn: old.conn });
            }
        }
        let refused = |reason: String| Refusal::Denied {
            code: DenialCode::Local(LocalCode::AgentNotAuthorized),
            reason,
        };
        let caller = CallerProcess::identify(&self.procfs, pid, None).ok_or_else(|| {
            refused(format!(
                "process {pid} exited before it could be identified"
            ))
        })?;
        let (uid, gid) = owner_of(pid).ok_or_else(|| refused(format!("process {pid} exited")))?;
        let mut peer = peer_of(Some(pid), uid, gid, &self.local, Path::new("/proc"));
        if !peer.authorized {
            return Err(refused(crate::server::not_authorized_reason(&peer)));
        }
        peer.process = Some(caller.clone());
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let (out, frames) = Outbox::new(OUTBOX_LIMIT);
        self.core
            .send(CoreInput::LocalConnected {
                conn,
                peer,
                out: out.clone(),
            })
            .map_err(|_| Refusal::CoreGone)?;
        // The connection watches all its leases, as an application does (local API 6.1), so
        // that a lease the agent ends takes its mapping with it and a re-opened one keeps its
        // mapping under the new id ([`Client::take_event`]). The core takes its inputs in
        // order, so the watch is in place before the connection's first Open; its Watching
        // answer is passed over with the events.
        let permits = Arc::new(Semaphore::new(PENDING_PER_CLIENT));
        let permit = permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::CoreGone)?;
        let watch_id = 1;
        self.core
            .send(CoreInput::LocalRequest {
                conn,
                message: LocalMessage::Watch(Watch {
                    common: common(watch_id),
                    lease: None,
                }),
                permit,
            })
            .map_err(|_| Refusal::CoreGone)?;
        let client = Arc::new(tokio::sync::Mutex::new(Client {
            conn,
            caller,
            out,
            frames,
            permits,
            next_request: watch_id,
            mappings: HashMap::new(),
        }));
        clients.insert(pid, client.clone());
        Ok(client)
    }

    /// Opens a mapping, or refreshes it when the same process holds it already.
    pub async fn map(&self, request: MapRequest) -> Result<Mapped, Refusal> {
        let holder = self
            .holder_for(request.requester, request.protocol, request.port)
            .await;
        let client = self.client(holder)?;
        let mut client = client.lock().await;
        client.drain();
        let key = request.key();
        let now = Instant::now();
        if let Some(mapping) = client.mappings.get_mut(&key) {
            if mapping.nonce != request.nonce {
                return Err(Refusal::NonceMismatch);
            }
            if mapping.remotes == request.remotes {
                let lifetime = mapping.refresh(request.lifetime, now);
                debug!(holder, port = request.port, lifetime, "mapping refreshed");
                return Ok(Mapped {
                    lease: mapping.lease,
                    lifetime,
                    holder,
                    serial: mapping.serial,
                });
            }
            // Other PCP FILTERs for the same mapping: a new opening replaces the old one.
            let old = mapping.lease;
            client.mappings.remove(&key);
            client.release(&self.core, old).await?;
        }
        let label = format!(
            "{} via {}",
            self.procfs.comm(request.requester),
            request.via.name()
        );
        let id = client.next_id();
        let open = LocalMessage::Wire(Message::Open(Open {
            common: common(id),
            opening: Opening {
                target: Target::Ports {
                    protocol: request.protocol,
                    ports: PortRange::single(request.port),
                },
                host: request
                    .host
                    .map_or(HostAddresses::Default, HostAddresses::One),
                family: request.family,
                remotes: request.remotes.clone(),
            },
            lifetime: (request.lifetime > 0).then_some(request.lifetime),
            app: Some(AppInfo {
                name: Some(label),
                ..AppInfo::default()
            }),
        }));
        match client.ask(&self.core, open, id).await? {
            LocalMessage::Wire(Message::Granted(granted)) => {
                let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
                client.mappings.insert(
                    key,
                    Mapping {
                        lease: granted.lease,
                        lifetime: granted.lifetime,
                        remotes: request.remotes,
                        nonce: request.nonce,
                        expires: (request.lifetime > 0)
                            .then(|| now + Duration::from_secs(u64::from(granted.lifetime))),
                        serial,
                    },
                );
                Ok(Mapped {
                    lease: granted.lease,
                    lifetime: granted.lifetime,
                    holder,
                    serial,
                })
            }
            LocalMessage::Denied(denied) => Err(Refusal::Denied {
                code: denied.code,
                reason: denied.reason.unwrap_or_default(),
            }),
            other => Err(Refusal::Denied {
                code: DenialCode::Wire(fwnp_proto::ResultCode::NoResources),
                reason: format!("unexpected answer of type {}", other.type_number()),
            }),
        }
    }

    /// Deletes the mapping `request` names (its lifetime aside), or every mapping of its
    /// protocol through its front end at its host address when its port is 0, of the requester
    /// or of its ancestors; the request's nonce must be the mapping's. Other mappings of the
    /// port (of the other family, for other remote hosts) stay. Returns how many were
    /// released.
    pub async fn unmap(&self, request: &MapRequest) -> Result<usize, Refusal> {
        let asked = request.key();
        let mut released = 0;
        for pid in self.lineage(request.requester) {
            let Some(client) = self.lock().get(&pid).cloned() else {
                continue;
            };
            let mut client = client.lock().await;
            client.drain();
            let keys: Vec<MappingKey> = client
                .mappings
                .keys()
                .filter(|k| k.deleted_by(&asked))
                .cloned()
                .collect();
            for key in keys {
                if client
                    .mappings
                    .get(&key)
                    .is_some_and(|m| m.nonce != request.nonce)
                {
                    return Err(Refusal::NonceMismatch);
                }
                if let Some(mapping) = client.mappings.remove(&key) {
                    client.release(&self.core, mapping.lease).await?;
                    released += 1;
                }
            }
        }
        Ok(released)
    }

    /// Refreshes the mapping `serial` made through `via` for `lifetime` seconds (0: until
    /// deleted), if the requester or one of its ancestors holds it; `None` when none does
    /// (it ended, was deleted or replaced, or is another process's): nothing is opened then.
    pub async fn refresh(
        &self,
        via: Via,
        requester: u32,
        serial: u64,
        lifetime: u32,
    ) -> Option<Mapped> {
        for holder in self.lineage(requester) {
            let Some(client) = self.lock().get(&holder).cloned() else {
                continue;
            };
            let mut client = client.lock().await;
            client.drain();
            // A process that exited loses its leases at the next sweep: not a refresh.
            if !client.caller.is_alive(&self.procfs) || client.out.is_closing() {
                continue;
            }
            let Some(key) = client.find(via, serial) else {
                continue;
            };
            let mapping = client.mappings.get_mut(&key)?;
            let lifetime = mapping.refresh(lifetime, Instant::now());
            debug!(holder, port = key.port, lifetime, "mapping refreshed");
            return Some(Mapped {
                lease: mapping.lease,
                lifetime,
                holder,
                serial,
            });
        }
        None
    }

    /// Whether the requester or one of its ancestors holds the live mapping `serial` made
    /// through `via` (nothing is refreshed).
    pub async fn holds(&self, via: Via, requester: u32, serial: u64) -> bool {
        for holder in self.lineage(requester) {
            let Some(client) = self.lock().get(&holder).cloned() else {
                continue;
            };
            let mut client = client.lock().await;
            client.drain();
            if client.caller.is_alive(&self.procfs)
                && !client.out.is_closing()
                && client.find(via, serial).is_some()
            {
                return true;
            }
        }
        false
    }

    /// Deletes the mapping `serial` made through `via`, if the requester or one of its
    /// ancestors holds it. Returns whether one was released.
    pub async fn unmap_serial(
        &self,
        via: Via,
        requester: u32,
        serial: u64,
    ) -> Result<bool, Refusal> {
        for pid in self.lineage(requester) {
            let Some(client) = self.lock().get(&pid).cloned() else {
                continue;
            };
            let mut client = client.lock().await;
            client.drain();
            let Some(key) = client.find(via, serial) else {
                continue;
            };
            if let Some(mapping) = client.mappings.remove(&key) {
                client.release(&self.core, mapping.lease).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The requester and its ancestors below init, nearest first: whose mappings it may
    /// refresh and delete.
    fn lineage(&self, requester: u32) -> Vec<u32> {
        let mut lineage = vec![requester];
        let mut pid = requester;
        while lineage.len() < MAX_ANCESTORS {
            match self.procfs.parent(pid) {
                Some(parent) if parent > 1 => {
                    lineage.push(parent);
                    pid = parent;
                }
                _ => break,
            }
        }
        lineage
    }
}

/// One mapping as a front end lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The front end it came through.
    pub via: Via,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its port.
    pub port: u16,
    /// The host address it opens; `None`: every address of its family.
    pub host: Option<IpAddr>,
    /// The family of the host addresses it opens; `None`: both.
    pub family: Option<Family>,
    /// Its remote prefixes.
    pub remotes: Vec<Prefix>,
    /// Seconds left before it ends unless refreshed; `None`: until deleted.
    pub remaining: Option<u32>,
    /// The process it is held for.
    pub holder: u32,
    /// See [`Mapped::serial`].
    pub serial: u64,
}

impl Seam {
    /// Every mapping made through `via`, in a stable order (holder, protocol, port, then the
    /// order they were made in).
    pub async fn entries(&self, via: Via) -> Vec<Entry> {
        let clients: Vec<(u32, Arc<tokio::sync::Mutex<Client>>)> = self
            .lock()
            .iter()
            .map(|(pid, c)| (*pid, c.clone()))
            .collect();
        let now = Instant::now();
        let mut out = Vec::new();
        for (holder, client) in clients {
            let mut client = client.lock().await;
            client.drain();
            for (key, mapping) in &client.mappings {
                if key.via != via {
                    continue;
                }
                out.push(Entry {
                    via,
                    protocol: key.protocol,
                    port: key.port,
                    host: key.host,
                    family: key.family,
                    remotes: mapping.remotes.clone(),
                    remaining: mapping.expires.map(|e| {
                        u32::try_from(e.saturating_duration_since(now).as_secs()).unwrap_or(0)
                    }),
                    holder,
                    serial: mapping.serial,
                });
            }
        }
        out.sort_by_key(|e| (e.holder, e.protocol.number(), e.port, e.serial));
        out
    }

    /// The process at the other end of a TCP connection of this host from `peer` to the
    /// agent's `local` address, if exactly one holds it.
    pub async fn tcp_peer(
        &self,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) -> Result<u32, Refusal> {
        let procfs = self.procfs.clone();
        tokio::task::spawn_blocking(move || {
            let mut inodes = HashSet::new();
            for file in ["tcp", "tcp6"] {
                let text = std::fs::read_to_string(format!("/proc/net/{file}")).unwrap_or_default();
                inodes.extend(connection_inodes(&text, peer.port(), local.port()));
            }
            match procfs.holders(&inodes).as_slice() {
                [one] => Some(*one),
                _ => None,
            }
        })
        .await
        .ok()
        .flatten()
        .ok_or(Refusal::NoCaller { port: peer.port() })
    }
}

/// The inodes of the sockets of a `/proc/net/tcp{,6}` table whose local port is `local_port`
/// and whose remote port is `remote_port` (the client's end of a connection to the agent).
fn connection_inodes(text: &str, local_port: u16, remote_port: u16) -> Vec<u64> {
    let port_of = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            (port_of(fields.get(1)?)? == local_port
                && port_of(fields.get(2)?)? == remote_port
                && inode != 0)
                .then_some(inode)
        })
        .collect()
}

/// The owner's uid and gid of a running process (those of its `/proc` directory).
fn owner_of(pid: u32) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}")).ok()?;
    Some((meta.uid(), meta.gid()))
}

/// The next hops of the IPv4 default routes in the text of `/proc/net/route`.
pub fn ipv4_default_gateways(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (destination, gateway, mask) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
            if *destination != "00000000" || *mask != "00000000" {
                return None;
            }
            // The kernel prints the address as a native-endian (little-endian here) number.
            let raw = u32::from_str_radix(gateway, 16).ok()?;
            let address = Ipv4Addr::from(raw.to_le_bytes());
            (!address.is_unspecified()).then_some(address)
        })
        .collect()
}

/// The next hops of the IPv6 default routes in the text of `/proc/net/ipv6_route`.
pub fn ipv6_default_gateways(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (destination, length, next_hop) = (fields.first()?, fields.get(1)?, fields.get(4)?);
            if destination.chars().any(|c| c != '0') || *length != "00" {
                return None;
            }
            let raw = u128::from_str_radix(next_hop, 16).ok()?;
            let address = Ipv6Addr::from(raw);
            (!address.is_unspecified()).then_some(address)
        })
        .collect()
}

/// The host's own requests to port 5351 of its gateways that the host table sends to the
/// agent: of the configured addresses, or of the default routes' next hops now.
pub fn redirects(config: &FrontendsConfig, proc: &Path) -> Vec<LocalRedirect> {
    if !config.natpmp && !config.pcp {
        return Vec::new();
    }
    let gateways: Vec<IpAddr> = if config.gateways.is_empty() {
        let read = |file: &str| std::fs::read_to_string(proc.join(file)).unwrap_or_default();
        ipv4_default_gateways(&read("net/route"))
            .into_iter()
            .map(IpAddr::V4)
            .chain(
                ipv6_default_gateways(&read("net/ipv6_route"))
                    .into_iter()
                    .map(IpAddr::V6),
            )
            .collect()
    } else {
        config.gateways.clone()
    };
    let mut seen = HashSet::new();
    gateways
        .into_iter()
        .filter(|g| seen.insert(*g))
        .map(|to| LocalRedirect {
            to,
            protocol: Protocol::Udp,
            port: SERVER_PORT,
            local_port: config.port,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PCP MAP of TCP port 7000 from `client` with `nonce`, as the PCP front end asks it.
    fn pcp_map(client: &str, nonce: u8, lifetime: u32) -> MapRequest {
        let client: IpAddr = client.parse().expect("an address");
        MapRequest {
            via: Via::Pcp,
            requester: std::process::id(),
            protocol: Protocol::Tcp,
            port: 7000,
            lifetime,
            host: Some(client),
            family: Some(match client {
                IpAddr::V4(_) => Family::Ipv4,
                IpAddr::V6(_) => Family::Ipv6,
            }),
            remotes: Vec::new(),
            nonce: Some([nonce; 12]),
        }
    }

    #[tokio::test]
    async fn an_ipv4_and_an_ipv6_mapping_of_one_port_are_each_their_own() {
        let (seam, held, tasks) = stand_in::granting_seam();
        let v4 = "198.51.100.2";
        let v6 = "2001:db8::2";
        let hosts = |held: &std::sync::Mutex<stand_in::Held>| {
            held.lock()
                .expect("state")
                .openings(7000)
                .into_iter()
                .map(|(host, _)| host)
                .collect::<Vec<_>>()
        };
        let one = |text: &str| HostAddresses::One(text.parse().expect("an address"));

        // Each with its own nonce, each its own lease.
        let ipv4 = seam
            .map(pcp_map(v4, 4, 60))
            .await
            .expect("the IPv4 mapping");
        let ipv6 = seam.map(pcp_map(v6, 6, 1)).await.expect("the IPv6 mapping");
        assert_ne!(ipv4.lease, ipv6.lease);
        assert_eq!(hosts(&held), vec![one(v4), one(v6)]);

        // Each is refreshed with its own nonce, and only with it.
        let again = seam.map(pcp_map(v4, 4, 60)).await.expect("a refresh");
        assert_eq!((again.lease, again.serial), (ipv4.lease, ipv4.serial));
        assert_eq!(
            seam.map(pcp_map(v4, 6, 60)).await,
            Err(Refusal::NonceMismatch)
        );
        assert_eq!(held.lock().expect("state").opened, 2, "a refresh opened");

        // The IPv6 one, not refreshed within its lifetime, ends alone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while hosts(&held).len() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the mapping outlived its lifetime"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(hosts(&held), vec![one(v4)]);

        // Deleting one leaves the other.
        seam.map(pcp_map(v6, 6, 60))
            .await
            .expect("the IPv6 mapping");
        assert_eq!(seam.unmap(&pcp_map(v6, 6, 0)).await, Ok(1));
        assert_eq!(hosts(&held), vec![one(v4)]);
        assert_eq!(seam.unmap(&pcp_map(v6, 6, 0)).await, Ok(0));
        assert_eq!(seam.unmap(&pcp_map(v4, 4, 0)).await, Ok(1));
        assert!(hosts(&held).is_empty());
        for task in tasks {
            task.abort();
        }
    }

    /// A NAT-PMP mapping of TCP `port` for `lifetime` seconds (0: delete), as the NAT-PMP
    /// front end asks it for this process.
    fn natpmp_map(port: u16, lifetime: u32) -> MapRequest {
        MapRequest {
            via: Via::NatPmp,
            requester: std::process::id(),
            protocol: Protocol::Tcp,
            port,
            lifetime,
            host: None,
            family: Some(Family::Ipv4),
            remotes: Vec::new(),
            nonce: None,
        }
    }

    /// The gateway revokes a mapping's lease: the mapping ends with it. The client's refresh
    /// then asks the core for a fresh Open rather than being told that the closed opening is
    /// mapped, and a UPnP pinhole's refresh finds no pinhole.
    #[tokio::test]
    async fn a_mapping_whose_lease_was_revoked_is_opened_afresh_by_its_refresh() {
        let (seam, held, tasks) = stand_in::granting_seam();
        let port = 7200;
        let opened = || held.lock().expect("state").opened;
        let live = || held.lock().expect("state").openings(port).len();

        let first = seam.map(natpmp_map(port, 60)).await.expect("mapped");
        held.lock().expect("state").revoke(first.lease);
        assert_eq!(live(), 0);
        assert!(seam.entries(Via::NatPmp).await.is_empty());

        let again = seam.map(natpmp_map(port, 60)).await.expect("mapped again");
        assert_eq!(
            opened(),
            2,
            "the refresh was answered from the revoked mapping"
        );
        assert_eq!(live(), 1);
        assert_ne!(again.lease, first.lease);
        assert_ne!(again.serial, first.serial);

        let me = std::process::id();
        let pinhole = MapRequest {
            via: Via::UpnpPinhole,
            port: port + 1,
            host: Some("2001:db8::2".parse().expect("an address")),
            family: Some(Family::Ipv6),
            ..natpmp_map(port + 1, 60)
        };
        let made = seam.map(pinhole).await.expect("a pinhole");
        assert!(
            seam.refresh(Via::UpnpPinhole, me, made.serial, 60)
                .await
                .is_some()
        );
        held.lock().expect("state").revoke(made.lease);
        assert_eq!(
            seam.refresh(Via::UpnpPinhole, me, made.serial, 60).await,
            None,
            "a revoked pinhole was refreshed"
        );
        for task in tasks {
            task.abort();
        }
    }

    /// The agent re-opens a mapping's lease under a new id: the mapping goes on with the new
    /// id, which later events name, so a revocation of it still ends the mapping.
    #[tokio::test]
    async fn a_reopened_lease_keeps_its_mapping_under_the_new_id() {
        let (seam, held, tasks) = stand_in::granting_seam();
        let port = 7300;
        let opened = || held.lock().expect("state").opened;

        let first = seam.map(natpmp_map(port, 60)).await.expect("mapped");
        let new = held.lock().expect("state").reopen(first.lease);
        let again = seam.map(natpmp_map(port, 60)).await.expect("refreshed");
        assert_eq!((again.lease, again.serial), (new, first.serial));
        assert_eq!(opened(), 1, "a refresh opened");

        held.lock().expect("state").revoke(new);
        let third = seam.map(natpmp_map(port, 60)).await.expect("mapped again");
        assert_eq!(
            opened(),
            2,
            "the refresh was answered from the revoked mapping"
        );
        assert_ne!(third.lease, new);

        assert_eq!(seam.unmap(&natpmp_map(port, 0)).await, Ok(1));
        assert!(held.lock().expect("state").openings(port).is_empty());
        for task in tasks {
            task.abort();
        }
    }

    #[test]
    fn reads_default_gateways() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t016433C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            ipv4_default_gateways(route),
            vec![Ipv4Addr::new(198, 51, 100, 1)]
        );
        let route6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000002000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
            fd000002000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(
            ipv6_default_gateways(route6),
            vec!["fd00:2::1".parse::<Ipv6Addr>().unwrap()]
        );
    }

    #[test]
    fn finds_the_client_end_of_a_connection() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:C350 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:C000 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(connection_inodes(tcp, 0xC350, 0xC000), vec![4242]);
    }

    #[test]
    fn redirects_only_when_switched_on() {
        let mut config = FrontendsConfig {
            port: SERVER_PORT,
            gateways: vec!["192.0.2.1".parse().unwrap()],
            ..FrontendsConfig::default()
        };
        assert!(redirects(&config, Path::new("/nonexistent")).is_empty());
        config.natpmp = true;
        assert_eq!(
            redirects(&config, Path::new("/nonexistent")),
            vec![LocalRedirect {
                to: "192.0.2.1".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 5351,
                local_port: 5351,
            }]
        );
    }

    /// A process maps one port through NAT-PMP and UPnP alike: the two identical openings are
    /// one lease (the gateway merged them), which the process's connection holds once. Deleting
    /// one mapping leaves the lease held for the other; deleting that one releases it.
    #[tokio::test]
    async fn two_mappings_of_one_lease_keep_it_until_the_last_goes() {
        let (seam, held, tasks) = stand_in::granting_seam();
        let me = std::process::id();
        let port = 7100;
        let request = |via| MapRequest {
            via,
            requester: me,
            protocol: Protocol::Tcp,
            port,
            lifetime: 0,
            host: None,
            family: Some(Family::Ipv4),
            remotes: Vec::new(),
            nonce: None,
        };
        let natpmp = seam.map(request(Via::NatPmp)).await.expect("mapped");
        let upnp = seam.map(request(Via::Upnp)).await.expect("mapped");
        assert_eq!(natpmp.lease, upnp.lease);
        let live = || held.lock().expect("state").openings(port).len();

        let released = seam.unmap(&request(Via::NatPmp)).await;
        assert_eq!(released.expect("unmapped"), 1);
        assert_eq!(live(), 1, "the lease stays for the UPnP mapping");
        assert!(seam.refresh(Via::Upnp, me, upnp.serial, 0).await.is_some());

        let released = seam.unmap(&request(Via::Upnp)).await;
        assert_eq!(released.expect("unmapped"), 1);
        assert_eq!(live(), 0);
        for task in tasks {
            task.abort();
        }
    }
}
