//! [`Client`]: one connection to the host agent, and the task that serves it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use fwnp_proto::local::{
    self, DenialCode, Event, EventKind, LocalCode, LocalMessage, Status, StatusAnswer, Watch,
};
use fwnp_proto::{
    AppInfo, Common, Epoch, Grant, Granted, LeaseId, LeaseInfo, List, Message, Open, Release,
    ResultCode, validate,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::lease::{GrantedLease, Lease, LeaseEvent, LeaseShared};
use crate::opening::Opening;

/// How long a request waits for the agent's answer unless [`Client::with_request_timeout`]
/// says otherwise. Generous, because an Open waits for the gateway and, when the agent checks
/// who binds the port, for a grace period (at most 30 s by the agent's configuration).
///
/// ```
/// assert!(fwnp_sdk::DEFAULT_REQUEST_TIMEOUT > std::time::Duration::from_secs(30));
/// ```
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The oldest local API version (`spec/local-api.md` Section 12) an agent may implement for
/// this library to use it: [`Client::connect`] asks the agent's version and fails with
/// [`Error::AgentTooOld`] below it.
///
/// ```
/// assert!(fwnp_sdk::REQUIRED_API_VERSION <= fwnp_proto::local::API_VERSION);
/// ```
pub const REQUIRED_API_VERSION: u64 = 1;

/// What the host agent says about itself, from [`Client::status`].
///
/// ```no_run
/// # async fn f() -> Result<(), fwnp_sdk::Error> {
/// let status = fwnp_sdk::Client::connect().await?.status().await?;
/// println!("gateway {} connected: {}", status.gateway, status.connected);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentStatus {
    /// The agent's version.
    pub agent_version: String,
    /// The gateway's address as the agent is configured with it.
    pub gateway: String,
    /// Whether the agent's connection to the gateway is up.
    pub connected: bool,
    /// The gateway's epoch, once the agent has met the gateway.
    pub epoch: Option<Epoch>,
    /// How the agent mirrors grants in the host's own firewall: `enforce`, `monitor` or `off`.
    pub mirror_mode: String,
    /// The host's identity as the gateway authenticated it, once known.
    pub identity: Option<String>,
    /// How many leases the agent holds for applications.
    pub leases: u64,
    /// While the agent is not connected: why (the last attempt's or connection's end), as the
    /// agent tells it; `None` when connected, or from an agent too old to tell.
    pub last_error: Option<String>,
    /// The version of the local API the agent implements (1 from an agent that does not say).
    pub api_version: u64,
}

impl From<StatusAnswer> for AgentStatus {
    fn from(s: StatusAnswer) -> Self {
        AgentStatus {
            api_version: s.implemented_api_version(),
            agent_version: s.agent_version,
            gateway: s.gateway,
            connected: s.connected,
            epoch: s.epoch,
            mirror_mode: s.mirror_mode,
            identity: s.identity,
            leases: s.leases,
            last_error: s.last_error,
        }
    }
}

/// One live lease as [`Client::leases`] lists it.
///
/// ```no_run
/// # async fn f() -> Result<(), fwnp_sdk::Error> {
/// for lease in fwnp_sdk::Client::connect().await?.leases().await? {
///     println!("{} {} s left", lease.id, lease.remaining.as_secs());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseSummary {
    /// The lease's id.
    pub id: LeaseId,
    /// What it grants.
    pub grants: Vec<Grant>,
    /// Time left when the agent answered.
    pub remaining: Duration,
    /// Expiry on the gateway's clock.
    pub expires_at: SystemTime,
    /// What the host told the gateway about the application that asked.
    pub app: Option<AppInfo>,
}

impl From<LeaseInfo> for LeaseSummary {
    fn from(info: LeaseInfo) -> Self {
        LeaseSummary {
            id: info.lease,
            grants: info.grants,
            remaining: Duration::from_secs(u64::from(info.remaining)),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_millis(info.expires_ms),
            app: info.app,
        }
    }
}

/// A connection to the local FWNP host agent (`fwnp-agent`), through which an application asks
/// for openings.
///
/// One background task per connection reads the agent's frames and routes each answer to its
/// request (several requests may be in flight at once) and each event to its [`Lease`].
/// `Client` is cheap to clone; clones share the connection. The connection stays open while a
/// `Client` or a [`Lease`] from it is alive, and closing it makes the agent release every lease
/// opened through it. It needs a tokio runtime.
///
/// ```no_run
/// use std::time::Duration;
/// use fwnp_sdk::{Client, Opening};
///
/// #[tokio::main]
/// async fn main() -> Result<(), fwnp_sdk::Error> {
///     let client = Client::connect().await?;
///     let lease = client.open(Opening::tcp(8080).lifetime(Duration::from_secs(600))).await?;
///     println!("tcp/8080 is open until {:?} (lease {})", lease.expires(), lease.id());
///     // ... serve ...
///     lease.release().await
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

/// The part shared by clones and leases: dropping the last one closes the connection.
#[derive(Debug)]
struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    path: PathBuf,
}

type Reply = oneshot::Sender<Result<Answer, Error>>;

#[derive(Debug)]
enum Answer {
    Watching,
    Opened(Lease),
    Released,
    Leases(Vec<LeaseSummary>),
    Status(AgentStatus),
}

#[derive(Debug)]
enum Command {
    Watch {
        reply: Reply,
    },
    Open {
        opening: fwnp_proto::Opening,
        lifetime: Option<u32>,
        app: Option<AppInfo>,
        /// The opening client's request timeout, kept by the lease for its release.
        timeout: Duration,
        reply: Reply,
    },
    /// Release a lease held by a handle of this client.
    ReleaseHandle {
        shared: Arc<LeaseShared>,
        /// From Drop: skip it when the lease is over already.
        only_if_over: bool,
        reply: Option<Reply>,
    },
    /// Release a lease by its id ([`Client::release`]).
    ReleaseId {
        lease: LeaseId,
        reply: Reply,
    },
    List {
        reply: Reply,
    },
    Status {
        reply: Reply,
    },
}

impl Client {
    /// Connects to the agent's socket: `$FWNP_AGENT_SOCKET` if set and not empty, else
    /// `/run/fwnp/agent.sock`. Asks at once for the events of this connection's leases and for
    /// the agent's status (both in one round trip), so that an agent that refuses this user
    /// ([`Error::AgentNotAuthorized`]) or implements a local API older than
    /// [`REQUIRED_API_VERSION`] ([`Error::AgentTooOld`]) is reported here.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let client = fwnp_sdk::Client::connect().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect() -> Result<Client, Error> {
        Client::connect_to(default_socket_path()).await
    }

    /// Connects to the agent's socket at `path`.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let client = fwnp_sdk::Client::connect_to("/run/fwnp/agent.sock").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_to(path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref().to_path_buf();
        let stream =
            UnixStream::connect(&path)
                .await
                .map_err(|source| Error::AgentUnavailable {
                    path: path.clone(),
                    source,
                })?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner { commands, path });
        tokio::spawn(run(stream, receiver, Arc::downgrade(&inner)));
        let client = Client {
            inner,
            timeout: DEFAULT_REQUEST_TIMEOUT,
        };
        // Pipelined: Watch first, so that an agent that answers only the first request of a
        // refused user (spec/local-api.md Section 2.1) answers the Watch.
        let (watch, status) = tokio::join!(
            client.request("watch", |reply| Command::Watch { reply }),
            client.request("status", |reply| Command::Status { reply }),
        );
        match watch? {
            Answer::Watching => {}
            other => return Err(unexpected("watch", &other)),
        }
        let status = match status? {
            Answer::Status(status) => status,
            other => return Err(unexpected("status", &other)),
        };
        check_api_version(status.api_version)?;
        Ok(client)
    }

    /// The same connection, with requests waiting at most `timeout` for their answer
    /// ([`Error::Timeout`] after that). The default is [`DEFAULT_REQUEST_TIMEOUT`].
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// use std::time::Duration;
    /// let client = fwnp_sdk::Client::connect().await?.with_request_timeout(Duration::from_secs(5));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_request_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket path this client is connected to.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let client = fwnp_sdk::Client::connect().await?;
    /// println!("agent at {}", client.socket_path().display());
    /// # Ok(())
    /// # }
    /// ```
    pub fn socket_path(&self) -> &Path {
        &self.inner.path
    }

    /// Asks for an opening and returns the lease once the gateway granted it and the agent
    /// mirrored it in the host's firewall. The opening is checked locally first
    /// ([`Error::InvalidOpening`]); a refusal comes as one of the refusal variants of
    /// [`Error`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use fwnp_sdk::{Client, Opening};
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let client = Client::connect().await?;
    /// let lease = client
    ///     .open(Opening::udp(5000).from("198.51.100.0/24").lifetime(Duration::from_secs(300)))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open(&self, opening: Opening) -> Result<Lease, Error> {
        let (opening, lifetime, app) = opening.to_request()?;
        match self
            .request("open", |reply| Command::Open {
                opening,
                lifetime,
                app,
                timeout: self.timeout,
                reply,
            })
            .await?
        {
            Answer::Opened(lease) => Ok(lease),
            other => Err(unexpected("open", &other)),
        }
    }

    /// Releases a lease by its id: this connection's hold of it ends. The agent lets a
    /// connection release the leases it opened; for a lease it does not hold it answers
    /// unknown-local-lease ([`Error::Denied`] with `LocalCode::UnknownLocalLease`).
    ///
    /// A connection holds a lease once. Opening the same opening twice gives the same lease id
    /// twice (the gateway merges the second Open into the lease), as two [`Lease`] handles:
    /// releasing the id ends both, each with [`LeaseEvent::Released`]. The opening itself stays
    /// while another connection (another application) still holds the lease (the local API's
    /// Sections 5.2 and 9.1). To end one handle only, use [`Lease::release`].
    ///
    /// ```no_run
    /// use fwnp_sdk::{Client, Opening};
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let client = Client::connect().await?;
    /// let first = client.open(Opening::tcp(8080)).await?;
    /// let second = client.open(Opening::tcp(8080)).await?;
    /// assert_eq!(first.id(), second.id());
    /// client.release(first.id()).await?;
    /// assert!(!first.is_active() && !second.is_active());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn release(&self, lease: LeaseId) -> Result<(), Error> {
        match self
            .request("release", |reply| Command::ReleaseId { lease, reply })
            .await?
        {
            Answer::Released => Ok(()),
            other => Err(unexpected("release", &other)),
        }
    }

    /// The live leases the agent lists for this caller, with their time left.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let leases = fwnp_sdk::Client::connect().await?.leases().await?;
    /// println!("{} leases", leases.len());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn leases(&self) -> Result<Vec<LeaseSummary>, Error> {
        match self
            .request("list", |reply| Command::List { reply })
            .await?
        {
            Answer::Leases(leases) => Ok(leases),
            other => Err(unexpected("list", &other)),
        }
    }

    /// How the agent is doing: its gateway, whether it is connected, the epoch, the mirror
    /// mode, the host's identity.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let status = fwnp_sdk::Client::connect().await?.status().await?;
    /// if !status.connected {
    ///     eprintln!("the agent is not connected to {}", status.gateway);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn status(&self) -> Result<AgentStatus, Error> {
        match self
            .request("status", |reply| Command::Status { reply })
            .await?
        {
            Answer::Status(status) => Ok(status),
            other => Err(unexpected("status", &other)),
        }
    }

    async fn request(
        &self,
        name: &'static str,
        command: impl FnOnce(Reply) -> Command,
    ) -> Result<Answer, Error> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(command(reply))
            .map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Err(Error::Timeout {
                request: name,
                after: self.timeout,
            }),
            // The task dropped the request: the connection closed before the answer.
            Ok(Err(_)) => Err(Error::Closed),
            Ok(Ok(result)) => result,
        }
    }

    /// [`Lease::release`]: release now and wait for the answer.
    pub(crate) async fn release_handle(&self, shared: Arc<LeaseShared>) -> Result<(), Error> {
        match self
            .request("release", |reply| Command::ReleaseHandle {
                shared,
                only_if_over: false,
                reply: Some(reply),
            })
            .await?
        {
            Answer::Released => Ok(()),
            other => Err(unexpected("release", &other)),
        }
    }

    /// `Drop for Lease`: queue the release without waiting.
    pub(crate) fn release_on_drop(&self, shared: Arc<LeaseShared>) {
        // A closed channel means the connection is gone, and the agent released the lease.
        let _ = self.inner.commands.send(Command::ReleaseHandle {
            shared,
            only_if_over: true,
            reply: None,
        });
    }
}

/// The handle a [`Lease`] keeps on its connection.
pub(crate) type ClientRef = Client;

/// Refuses an agent older than this library's [`REQUIRED_API_VERSION`].
fn check_api_version(api_version: u64) -> Result<(), Error> {
    if api_version < REQUIRED_API_VERSION {
        return Err(Error::AgentTooOld {
            api_version,
            required: REQUIRED_API_VERSION,
        });
    }
    Ok(())
}

fn default_socket_path() -> PathBuf {
    match std::env::var_os(local::SOCKET_ENV_VAR) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(local::DEFAULT_SOCKET_PATH),
    }
}

fn unexpected(request: &str, answer: &Answer) -> Error {
    Error::Protocol(format!(
        "unexpected answer {answer:?} to a {request} request"
    ))
}

/// A request waiting for its answer.
#[derive(Debug)]
enum Pending {
    Watch(Reply),
    Open {
        sent_at: Instant,
        timeout: Duration,
        reply: Reply,
    },
    Release {
        lease: LeaseId,
        /// A release of one of our own handles: unknown-lease means it is over anyway.
        own_handle: bool,
        reply: Option<Reply>,
        /// For a release by id, the handles of the id when it was sent, which it ends (a
        /// handle granted later holds the lease anew).
        handles: Vec<u64>,
    },
    List(Reply),
    Status(Reply),
}

impl Pending {
    fn name(&self) -> &'static str {
        match self {
            Pending::Watch(_) => "watch",
            Pending::Open { .. } => "open",
            Pending::Release { .. } => "release",
            Pending::List(_) => "list",
            Pending::Status(_) => "status",
        }
    }
}

/// Where a lease's events go.
#[derive(Debug)]
struct Route {
    shared: Arc<LeaseShared>,
    events: mpsc::UnboundedSender<LeaseEvent>,
}

impl Route {
    fn send(&self, event: LeaseEvent) {
        // The Lease may have been dropped meanwhile; its release is queued.
        let _ = self.events.send(event);
    }

    fn end(&self, event: LeaseEvent) {
        if self.shared.end(event.clone()) {
            self.send(event);
        }
    }
}

/// The state of the connection task.
#[derive(Debug)]
struct Connection {
    inner: Weak<Inner>,
    next_request: u64,
    next_handle: u64,
    pending: HashMap<u64, Pending>,
    /// The handles of each lease id (usually one; opening the same thing twice gives the gateway's
    /// same lease id twice).
    routes: HashMap<LeaseId, Vec<Route>>,
}

fn common(request_id: u64) -> Common {
    Common {
        request_id: Some(request_id),
        critical: Vec::new(),
    }
}

impl Connection {
    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// Turns a command into the frame to send, remembering what answer it waits for.
    fn command(&mut self, command: Command) -> Option<Vec<u8>> {
        let id = self.request_id();
        let (message, pending) = match command {
            Command::Watch { reply } => (
                LocalMessage::Watch(Watch {
                    common: common(id),
                    lease: None,
                }),
                Pending::Watch(reply),
            ),
            Command::Open {
                opening,
                lifetime,
                app,
                timeout,
                reply,
            } => (
                LocalMessage::Wire(Message::Open(Open {
                    common: common(id),
                    opening,
                    lifetime,
                    app,
                })),
                Pending::Open {
                    sent_at: Instant::now(),
                    timeout,
                    reply,
                },
            ),
            Command::ReleaseHandle {
                shared,
                only_if_over,
                reply,
            } => {
                let lease = shared.id();
                let was_ended = shared.is_ended();
                let others = self.remove_handle(lease, shared.handle);
                let others_hold = !others.is_empty();
                self.keep(lease, others);
                if only_if_over && was_ended {
                    return None;
                }
                shared.end(LeaseEvent::Released);
                // The connection holds a lease once, whatever number of its Opens the gateway
                // merged into it, and a Release ends that hold (the local API's Section 5.2):
                // while another handle has the lease, this one ends here alone.
                if others_hold {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(Answer::Released));
                    }
                    return None;
                }
                (
                    LocalMessage::Wire(Message::Release(Release {
                        common: common(id),
                        lease,
                    })),
                    Pending::Release {
                        lease,
                        own_handle: true,
                        reply,
                        handles: Vec::new(),
                    },
                )
            }
            Command::ReleaseId { lease, reply } => (
                LocalMessage::Wire(Message::Release(Release {
                    common: common(id),
                    lease,
                })),
                Pending::Release {
                    lease,
                    own_handle: false,
                    reply: Some(reply),
                    handles: self
                        .routes
                        .get(&lease)
                        .map(|routes| routes.iter().map(|r| r.shared.handle).collect())
                        .unwrap_or_default(),
                },
            ),
            Command::List { reply } => (
                LocalMessage::Wire(Message::List(List { common: common(id) })),
                Pending::List(reply),
            ),
            Command::Status { reply } => (
                LocalMessage::Status(Status { common: common(id) }),
                Pending::Status(reply),
            ),
        };
        self.pending.insert(id, pending);
        Some(local::encode_frame(&message))
    }

    /// Removes one handle's route and returns the other routes of the same lease id.
    fn remove_handle(&mut self, lease: LeaseId, handle: u64) -> Vec<Route> {
        let mut routes = self.routes.remove(&lease).unwrap_or_default();
        routes.retain(|r| r.shared.handle != handle);
        routes
    }

    fn keep(&mut self, lease: LeaseId, routes: Vec<Route>) {
        if !routes.is_empty() {
            self.routes.entry(lease).or_default().extend(routes);
        }
    }

    /// A frame from the agent.
    fn frame(&mut self, message: LocalMessage) {
        if let LocalMessage::Event(event) = message {
            self.event(event);
            return;
        }
        // An answer to nothing we asked (or to a request whose answer came already) is ignored.
        let Some(pending) = message.request_id().and_then(|id| self.pending.remove(&id)) else {
            return;
        };
        self.answer(pending, message);
    }

    /// A frame that could not be decoded: fail its request, if it names one.
    fn undecodable(&mut self, body: &[u8], error: local::LocalError) {
        // An Event this library cannot read (a kind of a later version) is ignored, whatever
        // it carries: it answers no request (the local API's Section 12.3).
        if fwnp_proto::codec::peek_message_type(body) == Some(local::TYPE_EVENT) {
            return;
        }
        let Some(pending) =
            fwnp_proto::codec::peek_request_id(body).and_then(|id| self.pending.remove(&id))
        else {
            return;
        };
        // A Denied with a code this library does not know is a refusal all the same; its
        // number and reason are kept for the application (the local API's Section 12.3).
        let error = match fwnp_proto::codec::peek_denial(body) {
            Some(denial) if DenialCode::from_number(denial.code).is_none() => {
                Error::UnknownDenial {
                    code: denial.code,
                    reason: denial.reason,
                }
            }
            _ => Error::Protocol(format!(
                "undecodable answer to a {} request: {error}",
                pending.name()
            )),
        };
        match pending {
            Pending::Watch(reply)
            | Pending::Open { reply, .. }
            | Pending::List(reply)
            | Pending::Status(reply) => {
                let _ = reply.send(Err(error));
            }
            Pending::Release { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    fn answer(&mut self, pending: Pending, message: LocalMessage) {
        let name = pending.name();
        let wrong = |message: &LocalMessage| {
            Error::Protocol(format!(
                "the agent answered a {name} request with a message of type {}",
                message.type_number()
            ))
        };
        match pending {
            Pending::Watch(reply) => {
                let result = match message {
                    LocalMessage::Watching(_) => Ok(Answer::Watching),
                    LocalMessage::Denied(d) => Err(Error::from_denied(d)),
                    other => Err(wrong(&other)),
                };
                let _ = reply.send(result);
            }
            Pending::Open {
                sent_at,
                timeout,
                reply,
            } => {
                let result = match message {
                    LocalMessage::Wire(Message::Granted(granted)) => {
                        self.granted(granted, sent_at, timeout).map(Answer::Opened)
                    }
                    LocalMessage::Denied(d) => Err(Error::from_denied(d)),
                    other => Err(wrong(&other)),
                };
                // If the caller gave up waiting, the lease comes back here and its Drop
                // releases it: no orphaned opening.
                let _ = reply.send(result);
            }
            Pending::Release {
                lease,
                own_handle,
                reply,
                handles,
            } => {
                let result = match message {
                    LocalMessage::Wire(Message::Released(_)) if own_handle => Ok(Answer::Released),
                    LocalMessage::Wire(Message::Released(_)) => {
                        self.released_by_id(lease, &handles);
                        Ok(Answer::Released)
                    }
                    LocalMessage::Denied(d)
                        if own_handle
                            && matches!(
                                d.code,
                                DenialCode::Wire(ResultCode::UnknownLease)
                                    | DenialCode::Local(LocalCode::UnknownLocalLease)
                            ) =>
                    {
                        // Already gone at the agent or the gateway: released either way.
                        Ok(Answer::Released)
                    }
                    LocalMessage::Denied(d) => Err(Error::from_denied(d)),
                    other => Err(wrong(&other)),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Pending::List(reply) => {
                let result = match message {
                    LocalMessage::Wire(Message::Leases(leases)) => {
                        match validate::validate_message(&Message::Leases(leases.clone())) {
                            Ok(()) => Ok(Answer::Leases(
                                leases.leases.into_iter().map(LeaseSummary::from).collect(),
                            )),
                            Err(e) => Err(Error::Protocol(format!("invalid lease list: {e}"))),
                        }
                    }
                    LocalMessage::Denied(d) => Err(Error::from_denied(d)),
                    other => Err(wrong(&other)),
                };
                let _ = reply.send(result);
            }
            Pending::Status(reply) => {
                let result = match message {
                    LocalMessage::StatusAnswer(status) => Ok(Answer::Status(status.into())),
                    LocalMessage::Denied(d) => Err(Error::from_denied(d)),
                    other => Err(wrong(&other)),
                };
                let _ = reply.send(result);
            }
        }
    }

    /// A Granted answer to an Open: the new lease handle, routed for events.
    fn granted(
        &mut self,
        granted: Granted,
        sent_at: Instant,
        timeout: Duration,
    ) -> Result<Lease, Error> {
        let Some(inner) = self.inner.upgrade() else {
            // Nobody is left to hold the lease; closing the connection releases it.
            return Err(Error::Closed);
        };
        let client = Client { inner, timeout };
        let lifetime = Duration::from_secs(u64::from(granted.lifetime));
        self.next_handle += 1;
        let shared = Arc::new(LeaseShared::new(
            self.next_handle,
            granted.lease,
            // Measured from the request, so never later than the gateway's expiry.
            sent_at + lifetime,
            SystemTime::UNIX_EPOCH + Duration::from_millis(granted.expires_ms),
        ));
        let (events, receiver) = mpsc::unbounded_channel();
        self.routes.entry(granted.lease).or_default().push(Route {
            shared: shared.clone(),
            events,
        });
        let invalid = validate::validate_message(&Message::Granted(granted.clone())).err();
        let lease = Lease::new(
            shared,
            GrantedLease {
                grants: granted.grants,
                lifetime,
                renew_after: Duration::from_secs(u64::from(granted.renew_after)),
                epoch: granted.epoch,
                narrowed: granted.narrowed,
            },
            receiver,
            client,
        );
        match invalid {
            None => Ok(lease),
            // Dropping the lease releases what the agent granted.
            Some(e) => Err(Error::Protocol(format!("invalid grant: {e}"))),
        }
    }

    /// A successful Release by id: the connection's hold of the lease is over, and with it
    /// every handle of the id it was sent for (its Released event ended them already, for a
    /// connection that watches).
    fn released_by_id(&mut self, lease: LeaseId, handles: &[u64]) {
        let routes = self.routes.remove(&lease).unwrap_or_default();
        let (ended, kept): (Vec<Route>, Vec<Route>) = routes
            .into_iter()
            .partition(|r| handles.contains(&r.shared.handle));
        for route in ended {
            route.end(LeaseEvent::Released);
        }
        self.keep(lease, kept);
    }

    fn event(&mut self, event: Event) {
        let Some(routes) = self.routes.get(&event.lease) else {
            return;
        };
        let left = event.expires_in_ms.map(Duration::from_millis);
        match event.kind {
            EventKind::Renewed => {
                for route in routes {
                    let expires = match left {
                        Some(left) => route.shared.set_expires_in(left),
                        None => continue,
                    };
                    route.send(LeaseEvent::Renewed { expires });
                }
            }
            EventKind::GatewayUnreachable => {
                for route in routes {
                    route.send(LeaseEvent::GatewayUnreachable {
                        reason: event.reason.clone(),
                    });
                }
            }
            EventKind::RenewalRefused => {
                for route in routes {
                    let expires = match left {
                        Some(left) => route.shared.set_expires_in(left),
                        None => route.shared.expires(),
                    };
                    route.send(LeaseEvent::RenewalRefused {
                        expires,
                        reason: event.reason.clone(),
                        code: event.code,
                    });
                }
            }
            EventKind::Reopened => {
                let Some(new) = event.new_lease else {
                    return;
                };
                let routes = self.routes.remove(&event.lease).unwrap_or_default();
                for route in &routes {
                    route.shared.set_id(new);
                    if let Some(left) = left {
                        route.shared.set_expires_in(left);
                    }
                    route.send(LeaseEvent::Reopened {
                        old: event.lease,
                        new,
                    });
                }
                self.keep(new, routes);
            }
            kind => {
                let terminal = match kind {
                    EventKind::Revoked => LeaseEvent::Revoked {
                        reason: event.reason,
                        code: event.code,
                    },
                    EventKind::Expired => LeaseEvent::Expired,
                    EventKind::Lost => LeaseEvent::Lost {
                        reason: event.reason,
                        code: event.code,
                    },
                    EventKind::Released => LeaseEvent::Released,
                    // A kind this version does not know: not ours to interpret.
                    _ => return,
                };
                for route in self.routes.remove(&event.lease).unwrap_or_default() {
                    route.end(terminal.clone());
                }
            }
        }
    }

    /// The connection is gone: every request fails, every lease is over.
    fn closed(&mut self) {
        // Dropping the replies makes each waiting request return `Error::Closed`.
        self.pending.clear();
        for (_, routes) in self.routes.drain() {
            for route in routes {
                route.end(LeaseEvent::Disconnected);
            }
        }
    }
}

/// Splits complete frames off the front of `buf`. `Err` when the framing itself is broken (an
/// empty or oversized frame), after which nothing more can be read.
fn take_frames(buf: &mut Vec<u8>, connection: &mut Connection) -> Result<(), local::LocalError> {
    let mut start = 0;
    let result = loop {
        let Some(header) = buf
            .get(start..start + local::FRAME_HEADER_LEN)
            .and_then(|h| <[u8; local::FRAME_HEADER_LEN]>::try_from(h).ok())
        else {
            break Ok(());
        };
        let len = match local::frame_body_len(header) {
            Ok(len) => len,
            Err(e) => break Err(e),
        };
        let body_start = start + local::FRAME_HEADER_LEN;
        let Some(body) = buf.get(body_start..body_start + len) else {
            break Ok(());
        };
        match local::decode_frame_body(body) {
            Ok(message) => connection.frame(message),
            Err(e) => connection.undecodable(body, e),
        }
        start = body_start + len;
    };
    buf.drain(..start);
    result
}

/// The connection task: writes the requests, reads the answers and events.
async fn run(
    stream: UnixStream,
    mut commands: mpsc::UnboundedReceiver<Command>,
    inner: Weak<Inner>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let mut connection = Connection {
        inner,
        next_request: 0,
        next_handle: 0,
        pending: HashMap::new(),
        routes: HashMap::new(),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    loop {
        tokio::select! {
            command = commands.recv() => {
                // None: every Client and Lease is gone; closing the socket makes the agent
                // release whatever is left.
                let Some(command) = command else { break };
                if let Some(frame) = connection.command(command)
                    && writer.write_all(&frame).await.is_err()
                {
                    break;
                }
            }
            // `read_buf` is cancel-safe: when the other branch wins, nothing was read.
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if take_frames(&mut buf, &mut connection).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    connection.closed();
}
