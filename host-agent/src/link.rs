//! The agent's one QUIC connection to the gateway: connect with the host's certificate, Hello
//! and Welcome, List (so the agent can resync before any lease machine sends), then notices from
//! the gateway's unidirectional streams until the connection ends; then reconnect.
//!
//! With several gateways (a list, or the targets of an SRV name, looked up again at every
//! round and ordered as RFC 2782 says) the agent stays with the one that answered; when that
//! one is lost it goes on at once with the next, each verified against its own name, and only
//! a round in which none answered waits for the delays below. Its connections then notice a
//! dead gateway within [`FAILOVER_IDLE_TIMEOUT`], whatever the lifetimes. One that sent
//! GoingAway is left out until the time its reconnect-after gives has passed (without one, the
//! delay after a lost connection), while the others are tried at once. A gateway whose name has
//! several addresses is reached through the first that answers, the next tried 250 ms after the
//! one before began (RFC 8305's connection attempt delay).
//!
//! A gateway that refuses every version the agent offers (unsupported-version) would refuse the
//! same Hello again: it is left out until the agent restarts, and when no gateway is left the
//! link stops and tells the core, which refuses Opens with that reason from then on. A notice
//! of a known type that does not decode, or one too long to read, is discarded and the core
//! told, which asks for the list of leases to learn what it missed (spec 5.3); so is a notice
//! lost on its way, its stream reset by the gateway or not ended within [`EXCHANGE_TIMEOUT`].
//!
//! The timing is [`fwnp_proto::link`]'s: each connection's keep-alive and idle timeout suit the
//! shortest lifetime the gateway grants (known from the last Welcome; a connection whose timers
//! are too slow for it is replaced at once by one whose timers suit); after a stateless reset
//! (the gateway restarted and listens again) the next attempt is at once; otherwise an
//! exponential backoff, or the delay a GoingAway notice asked for, but while leases are held
//! never more than a sixteenth of the shortest remaining lifetime, and handshakes are given up
//! after as long. The core publishes that earliest expiry on a watch channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::codec::DecodeError;
use fwnp_proto::link::{Ending, Reconnect, TransportTimers};
use fwnp_proto::{
    Capabilities, Common, Hello, Leases, List, MAX_MESSAGE_SIZE, Message, QuicErrorCode, VERSION,
    Welcome,
};
use fwnp_trust::tls::{ClientOptions, client_transport};
use quinn::{ReadError, ReadToEndError, VarInt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{GatewaySource, SRV_PREFIX};
use crate::core::CoreInput;
use crate::srv::{SrvError, SrvResolver};

/// How long a request waits for its answer on its stream.
pub const EXCHANGE_TIMEOUT: Duration = fwnp_proto::lease::REQUEST_TIMEOUT;

/// What the link tells the agent's core.
#[derive(Debug)]
pub enum GatewayEvent {
    /// A connection is up: Welcome was received, and the gateway listed the host's leases
    /// unless it could not.
    Connected {
        /// Which gateway (`HOST:PORT`).
        gateway: String,
        /// The connection, for requests.
        connection: quinn::Connection,
        /// The gateway's Welcome.
        welcome: Welcome,
        /// The gateway's answer to List, taken before any other request; `None` when it
        /// refused (a list too large for one answer, a rate limit) or its answer was unusable:
        /// then what the host holds is asked for again with Open (spec 5.4).
        leases: Option<Leases>,
    },
    /// A notice from the gateway (Revoked, EpochChanged, GoingAway).
    Notice(Message),
    /// A notice was discarded (spec 5.3): it was of a known type and did not decode, or it
    /// was longer than any notice may be; or it was lost on its way (its stream was reset, or
    /// did not end in time).
    NoticeDiscarded {
        /// What was wrong with it.
        reason: String,
    },
    /// The connection ended.
    Disconnected {
        /// Why, for logs and Status.
        reason: String,
    },
    /// An attempt to connect failed.
    ConnectFailed {
        /// Why, for Status.
        reason: String,
    },
    /// Every configured gateway refused the versions the agent speaks: the link stopped, and
    /// tries again only when the agent is restarted (spec 13, unsupported-version).
    NoGatewayLeft {
        /// Which gateways refused, and the versions offered.
        reason: String,
    },
}

/// Why one request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The stream or the connection failed.
    #[error("request stream failed: {0}")]
    Stream(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer was longer than any answer may be (spec 5.4); its stream was stopped.
    #[error("answer longer than {MAX_MESSAGE_SIZE} bytes")]
    TooLarge,
    /// The answer did not decode.
    #[error("undecodable answer: {0}")]
    Decode(#[from] fwnp_proto::codec::DecodeError),
    /// The answer decoded, but carries a grant the rules of spec 9.4 refuse (a port 0, a
    /// reversed range, a prefix with host bits set, an IPv4-mapped address): treated as one
    /// that did not decode, so that nothing of it reaches the host's filter.
    #[error("invalid answer: {0}")]
    Invalid(#[from] fwnp_proto::validate::ValidationError),
}

/// Sends `request` on a new bidirectional stream and reads the answer, for at most
/// [`EXCHANGE_TIMEOUT`]. An answer that does not come in time, or that is longer than
/// [`MAX_MESSAGE_SIZE`], is refused with STOP_SENDING and the code spec 5.2 gives for it
/// (`RequestTimeout`, `MessageTooLarge`); the request then counts as unanswered.
pub async fn exchange(
    connection: &quinn::Connection,
    request: &Message,
) -> Result<Message, ExchangeError> {
    let bytes = fwnp_proto::codec::encode(request);
    let deadline = tokio::time::Instant::now() + EXCHANGE_TIMEOUT;
    let timeout = || ExchangeError::Timeout(EXCHANGE_TIMEOUT);
    let sent = async {
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| ExchangeError::Stream(e.to_string()))?;
        send.write_all(&bytes)
            .await
            .map_err(|e| ExchangeError::Stream(e.to_string()))?;
        let _ = send.finish();
        Ok::<_, ExchangeError>((send, recv))
    };
    // The send half stays until the answer is read: dropping it early changes nothing on the
    // wire (it is finished), but keeps the stream's two halves' lives together.
    let (_send, mut recv) = tokio::time::timeout_at(deadline, sent)
        .await
        .map_err(|_| timeout())??;
    let answer = match tokio::time::timeout_at(deadline, recv.read_to_end(MAX_MESSAGE_SIZE)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(ReadToEndError::TooLong)) => {
            let _ = recv.stop(VarInt::from_u32(QuicErrorCode::MessageTooLarge.code()));
            return Err(ExchangeError::TooLarge);
        }
        Ok(Err(e)) => return Err(ExchangeError::Stream(e.to_string())),
        Err(_) => {
            let _ = recv.stop(VarInt::from_u32(QuicErrorCode::RequestTimeout.code()));
            return Err(timeout());
        }
    };
    let answer = fwnp_proto::codec::decode(&answer)?;
    fwnp_proto::validate::validate_message(&answer)?;
    Ok(answer)
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("SRV {0}: {1}")]
    Srv(String, SrvError),
    #[error("cannot open a UDP endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("connection attempt failed: {0}")]
    Attempt(String),
    /// Every address of a name failed; each address's own failure, in the order they were
    /// tried.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    EveryAddress(Vec<ConnectError>),
    #[error("Hello: {0}")]
    Hello(ExchangeError),
    #[error("Hello answered with {0}")]
    Refused(String),
    /// Hello refused unsupported-version: the gateway speaks none of the versions offered.
    #[error(
        "Hello answered with unsupported-version: the gateway speaks none of the versions offered {:?}{}",
        OFFERED_VERSIONS,
        .0.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
    )]
    UnsupportedVersion(Option<String>),
    /// Hello refused rate-limited, with the gateway's retry-after.
    #[error("Hello answered with rate-limited: retry after {0:?}")]
    RetryAfter(Duration),
    #[error("List: {0}")]
    List(String),
    #[error("transport options: {0}")]
    Transport(fwnp_trust::tls::TlsError),
}

/// The link's settings.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The gateways, and the names their certificates must carry.
    pub gateways: GatewaySource,
    /// The QUIC client configuration with the host's certificate.
    pub client_config: quinn::ClientConfig,
    /// The transport options the timers of each connection are set on.
    pub client_options: ClientOptions,
}

/// With another gateway to go to, a connection is given up after this long without a packet
/// from its gateway, whatever the lifetimes (keep-alive a third of it). The protocol's M/8
/// (Section 3.4) is sized for waiting on the same gateway to come back; with a second one the
/// host is better served by leaving a silent gateway early: 1.5 s of silence plus a handshake
/// and a Renew on the next gateway stay under 3 s, and a PING every 500 ms is a few bytes a
/// second per host. It is not shorter than that because a loaded gateway may well be silent
/// for a second, and moving a host costs a Renew of each of its leases.
pub const FAILOVER_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A connection that ended sooner than this after it was made is not followed at once by the
/// next gateway but by the usual delay: gateways that accept and drop hosts at once are not
/// tried in a tight loop.
const FAILOVER_MIN_UPTIME: Duration = Duration::from_secs(1);

/// The versions of the protocol the agent offers in its Hello, most preferred first.
pub const OFFERED_VERSIONS: [u16; 1] = [VERSION];

/// The gateways a round of attempts leaves out.
#[derive(Debug, Default)]
struct Exclusions {
    /// Those that refused every version the agent offers (spec 13, unsupported-version), each
    /// with its refusal: the same Hello would be refused again, so they are not tried until the
    /// agent restarts, perhaps upgraded.
    refused: Vec<(String, String)>,
    /// Those that went away (GoingAway) while another gateway could take their place, each
    /// until the instant its reconnect-after gives (spec 8.14).
    departed: HashMap<String, Instant>,
}

impl Exclusions {
    fn refuse(&mut self, address: &str, refusal: String) {
        if !self.is_refused(address) {
            self.refused.push((address.to_owned(), refusal));
        }
    }

    fn is_refused(&self, address: &str) -> bool {
        self.refused.iter().any(|(refused, _)| refused == address)
    }

    fn depart(&mut self, address: &str, until: Instant) {
        self.departed.insert(address.to_owned(), until);
    }

    /// Whether the gateway at `address` may be tried at `now`.
    fn may_try(&self, address: &str, now: Instant) -> bool {
        !self.is_refused(address) && self.departed.get(address).is_none_or(|until| *until <= now)
    }

    /// Whether every gateway of `list` refused the versions offered (and `list` has one).
    fn every_one_refused(&self, list: &[Candidate]) -> bool {
        !list.is_empty() && list.iter().all(|c| self.is_refused(&c.address))
    }

    /// The first instant after `now` at which a gateway of `list` that went away may be tried
    /// again.
    fn next_return(&self, list: &[Candidate], now: Instant) -> Option<Instant> {
        list.iter()
            .filter(|c| !self.is_refused(&c.address))
            .filter_map(|c| self.departed.get(&c.address).copied())
            .filter(|until| *until > now)
            .min()
    }

    /// Why no gateway is left, for the log, Status and the applications' refusals.
    fn no_gateway_left(&self) -> String {
        let refusals: Vec<String> = self
            .refused
            .iter()
            .map(|(address, refusal)| format!("{address}: {refusal}"))
            .collect();
        format!(
            "every configured gateway refused the protocol versions this agent offers {:?} ({}); \
             it connects to none of them again until it is restarted (upgrade the agent or \
             the gateways)",
            OFFERED_VERSIONS,
            refusals.join("; ")
        )
    }
}

/// One gateway to try: where, and the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `HOST:PORT`.
    pub address: String,
    /// The name its certificate must carry.
    pub server_name: String,
    /// Its addresses when an SRV lookup found them; empty, `address` is resolved when it is
    /// tried.
    pub resolved: Vec<SocketAddr>,
}

/// One SRV record's target, as [`srv_order`] orders them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    /// Lower is tried first.
    pub priority: u16,
    /// Within one priority, the share of first places.
    pub weight: u16,
    /// The target's port.
    pub port: u16,
    /// The target's host name, without the final dot.
    pub target: String,
}

/// Orders SRV targets as RFC 2782 says: by priority, lowest first; within one priority, by a
/// weighted random draw (each remaining target comes next with a chance proportional to its
/// weight, those of weight 0 having a small one). A single target `.` means the service is
/// not offered there: no target at all.
///
/// ```
/// use fwnp_agent::link::{SrvTarget, srv_order};
/// let target = |priority, weight, name: &str| SrvTarget {
///     priority, weight, port: 4433, target: name.into(),
/// };
/// let ordered = srv_order(
///     vec![target(20, 0, "c.example.org"), target(10, 5, "a.example.org"), target(10, 5, "b.example.org")],
///     &mut rand::rng(),
/// );
/// assert_eq!(ordered.len(), 3);
/// assert_eq!(ordered[2].target, "c.example.org");
/// ```
pub fn srv_order<R: rand::Rng + ?Sized>(
    mut targets: Vec<SrvTarget>,
    rng: &mut R,
) -> Vec<SrvTarget> {
    if let [only] = targets.as_slice()
        && (only.target.is_empty() || only.target == ".")
    {
        return Vec::new();
    }
    targets.sort_by_key(|t| t.priority);
    let mut ordered = Vec::with_capacity(targets.len());
    while !targets.is_empty() {
        let priority = targets[0].priority;
        let same = targets
            .iter()
            .take_while(|t| t.priority == priority)
            .count();
        let mut group: Vec<SrvTarget> = targets.drain(..same).collect();
        // RFC 2782: those of weight 0 first, then a running sum and a draw in [0, total].
        group.sort_by_key(|t| t.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|t| u32::from(t.weight)).sum();
            let draw = rng.random_range(0..=total);
            let mut running = 0u32;
            let pick = group
                .iter()
                .position(|t| {
                    running += u32::from(t.weight);
                    running >= draw
                })
                .unwrap_or(0);
            ordered.push(group.remove(pick));
        }
    }
    ordered
}

/// The gateways to try in this round, in order. The targets of an SRV name that have no
/// address are left out with a warning; the name fails only when none is left.
async fn candidates(
    source: &GatewaySource,
    rng: &mut StdRng,
) -> Result<Vec<Candidate>, ConnectError> {
    let (name, server_name) = match source {
        GatewaySource::Addresses(list) => {
            return Ok(list
                .iter()
                .map(|g| Candidate {
                    address: g.address.clone(),
                    server_name: g.server_name.clone(),
                    resolved: Vec::new(),
                })
                .collect());
        }
        GatewaySource::Srv { name, server_name } => (name, server_name),
    };
    debug_assert!(name.starts_with(SRV_PREFIX));
    let srv_error = |e: SrvError| ConnectError::Srv(name.clone(), e);
    // Read again at every round, as the C library's resolver does when the file changes.
    let resolver = SrvResolver::system().map_err(srv_error)?;
    let mut list = Vec::new();
    let mut last_error = None;
    for found in resolver.locate(name, rng).await.map_err(srv_error)? {
        match found.addresses {
            Ok(resolved) => list.push(Candidate {
                address: format!("{}:{}", found.target.target, found.target.port),
                server_name: server_name.clone().unwrap_or(found.target.target),
                resolved,
            }),
            Err(e) => {
                warn!(srv = %name, "a gateway of the SRV name is left out: {e}");
                last_error = Some(e);
            }
        }
    }
    match last_error {
        Some(e) if list.is_empty() => Err(srv_error(e)),
        _ => Ok(list),
    }
}

/// Runs the link until the core goes away. `earliest_expiry` is the earliest local expiry of
/// the leases the core holds, which bounds the reconnection delays.
pub async fn run(
    settings: LinkSettings,
    core: mpsc::UnboundedSender<CoreInput>,
    earliest_expiry: watch::Receiver<Option<Instant>>,
) {
    let mut schedule = Reconnect::new();
    let mut rng = StdRng::from_os_rng();
    // The shortest lifetime the gateway grants, from its last Welcome.
    let mut min_lifetime: Option<u32> = None;
    // The gateway to try first in the next round: the one after a lost gateway, the same one
    // after a stateless reset (it listens again), else the first in order.
    let mut prefer: Option<(String, bool)> = None;
    let mut exclusions = Exclusions::default();
    loop {
        let list = match candidates(&settings.gateways, &mut rng).await {
            Ok(list) => list,
            Err(e) => {
                warn!("no gateway to connect to: {e}");
                Vec::new()
            }
        };
        let several = list.len() > 1 || matches!(settings.gateways, GatewaySource::Srv { .. });
        let start = prefer
            .take()
            .and_then(|(address, next)| {
                let at = list.iter().position(|c| c.address == address)?;
                Some(if next { (at + 1) % list.len() } else { at })
            })
            .unwrap_or(0);
        let mut ending = Ending::Lost;
        let mut failures = Vec::new();
        // The shortest retry-after of a round whose every gateway asked for one (rate-limited).
        let mut retry_after: Option<Duration> = None;
        let mut all_asked_to_wait = true;
        let mut connected = None;
        for candidate in list.iter().cycle().skip(start).take(list.len()) {
            if !exclusions.may_try(&candidate.address, Instant::now()) {
                continue;
            }
            let expiry = *earliest_expiry.borrow();
            let handshake = Reconnect::handshake_timeout(Instant::now(), expiry);
            match connect(&settings, candidate, several, &mut min_lifetime, handshake).await {
                Ok(up) => {
                    connected = Some((candidate, up));
                    break;
                }
                Err(e @ ConnectError::UnsupportedVersion(_)) => {
                    error!(
                        gateway = %candidate.address,
                        versions = ?OFFERED_VERSIONS,
                        "the gateway refused every protocol version this agent offers; it is not tried again until the agent is restarted (upgrade the agent or the gateway): {e}"
                    );
                    all_asked_to_wait = false;
                    exclusions.refuse(&candidate.address, e.to_string());
                    failures.push(format!("{}: {e}", candidate.address));
                }
                Err(e) => {
                    warn!(gateway = %candidate.address, "cannot connect to the gateway: {e}");
                    match e {
                        ConnectError::RetryAfter(after) => {
                            retry_after = Some(retry_after.map_or(after, |r| r.min(after)));
                        }
                        _ => all_asked_to_wait = false,
                    }
                    failures.push(format!("{}: {e}", candidate.address));
                }
            }
        }
        let mut at_once = false;
        match connected {
            Some((candidate, (endpoint, connection, welcome, leases))) => {
                let since = Instant::now();
                schedule.connected(since);
                info!(
                    gateway = %candidate.address,
                    identity = %welcome.identity,
                    epoch = format_args!("{:016x}", welcome.epoch),
                    leases = ?leases.as_ref().map(|l| l.leases.len()),
                    "connected to the gateway"
                );
                let event = GatewayEvent::Connected {
                    gateway: candidate.address.clone(),
                    connection: connection.clone(),
                    welcome,
                    leases,
                };
                if core.send(CoreInput::Gateway(event)).is_err() {
                    return;
                }
                let Followed {
                    reason,
                    ending: how,
                    went_away,
                } = follow(&connection, &core).await;
                warn!(gateway = %candidate.address, %reason, "connection to the gateway ended");
                endpoint.close(0u32.into(), b"");
                if core
                    .send(CoreInput::Gateway(GatewayEvent::Disconnected { reason }))
                    .is_err()
                {
                    return;
                }
                ending = how;
                // A lost (or departing) gateway is followed at once by the next one; the one
                // that reset listens again and is tried first.
                let reset = how == Ending::Reset;
                prefer = Some((candidate.address.clone(), !reset));
                at_once = list.len() > 1 && !reset && since.elapsed() >= FAILOVER_MIN_UPTIME;
                if went_away && list.len() > 1 {
                    // Only the departing gateway waits: what it asked for, or without
                    // reconnect-after the delays of a lost connection (spec 8.14, 3.5), as the
                    // schedule reckons them for it alone; the others are tried at once, or after
                    // the usual delays when this connection was too short.
                    let mut alone = schedule.clone();
                    let expiry = *earliest_expiry.borrow();
                    let until = alone.next_attempt(Instant::now(), how, expiry, &mut rng);
                    exclusions.depart(&candidate.address, until);
                    ending = Ending::Lost;
                }
            }
            None => {
                if exclusions.every_one_refused(&list) {
                    let reason = exclusions.no_gateway_left();
                    error!("{reason}");
                    let _ = core.send(CoreInput::Gateway(GatewayEvent::NoGatewayLeft { reason }));
                    return;
                }
                if let (true, Some(back)) = (
                    failures.is_empty(),
                    exclusions.next_return(&list, Instant::now()),
                ) {
                    // Every gateway that could be tried went away and asked for time: the
                    // first to be back is tried when its time is up.
                    debug!(delay = ?back.saturating_duration_since(Instant::now()), "waiting for a gateway that went away");
                    tokio::select! {
                        _ = tokio::time::sleep_until(back.into()) => {}
                        _ = core.closed() => return,
                    }
                    continue;
                }
                let reason = if failures.is_empty() {
                    format!(
                        "no gateway to connect to ({})",
                        settings.gateways.describe()
                    )
                } else {
                    format!("cannot connect to {}", failures.join("; "))
                };
                if core
                    .send(CoreInput::Gateway(GatewayEvent::ConnectFailed { reason }))
                    .is_err()
                {
                    return;
                }
                if let Some(after) = retry_after.filter(|_| all_asked_to_wait) {
                    ending = Ending::RetryAfter(after);
                }
            }
        }
        if at_once {
            continue;
        }
        let now = Instant::now();
        let expiry = *earliest_expiry.borrow();
        let at = schedule.next_attempt(now, ending, expiry, &mut rng);
        // A gateway that went away may be back before the others are tried again.
        let at = exclusions
            .next_return(&list, now)
            .map_or(at, |back| at.min(back));
        debug!(delay = ?at.saturating_duration_since(now), ?ending, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = core.closed() => return,
        }
    }
}

/// One connection attempt. If the Welcome announces a shorter minimum lifetime than the
/// timers of the connection suit, it is closed and made again at once with suitable timers.
/// With `several` gateways the timers are never slower than [`FAILOVER_IDLE_TIMEOUT`].
async fn connect(
    settings: &LinkSettings,
    candidate: &Candidate,
    several: bool,
    min_lifetime: &mut Option<u32>,
    handshake: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection, Welcome, Option<Leases>), ConnectError> {
    let mut addrs = if candidate.resolved.is_empty() {
        tokio::net::lookup_host(&candidate.address)
            .await
            .map_err(|e| ConnectError::Resolve(candidate.address.clone(), e.to_string()))?
            .collect()
    } else {
        candidate.resolved.clone()
    };
    if addrs.is_empty() {
        return Err(ConnectError::Resolve(
            candidate.address.clone(),
            "no address".into(),
        ));
    }
    let mut retimed = false;
    loop {
        let mut timers = TransportTimers::for_min_lifetime(*min_lifetime);
        if several && timers.idle_timeout > FAILOVER_IDLE_TIMEOUT {
            timers = TransportTimers {
                keep_alive: FAILOVER_IDLE_TIMEOUT / fwnp_proto::link::KEEP_ALIVES_PER_IDLE_TIMEOUT,
                idle_timeout: FAILOVER_IDLE_TIMEOUT,
            };
        }
        let (addr, endpoint, connection, welcome) =
            connect_once(settings, candidate, &addrs, timers, handshake).await?;
        // A connection made again with other timers goes to the address that answered.
        addrs = vec![addr];
        let announced = welcome.limits.min_lifetime;
        *min_lifetime = Some(announced);
        if !retimed && !timers.suits(announced) {
            info!(
                min_lifetime = announced,
                "the gateway grants short leases: connecting again with shorter keep-alive and idle timeout"
            );
            connection.close(0u32.into(), b"transport timers");
            endpoint.close(0u32.into(), b"");
            retimed = true;
            continue;
        }
        // Request ids drawn at random, each connection's own (spec 15): fixed ones would repeat
        // on every connection, and a gateway keeping a window of ids would answer a List made
        // again within it with the list it gave before.
        let list = Message::List(List {
            common: Common {
                request_id: Some(rand::random()),
                critical: Vec::new(),
            },
        });
        // A gateway that answers but will not list (no-resources for a list over 16,384 bytes,
        // rate-limited) leaves the connection usable: the host asks again for what it holds
        // with Open (spec 5.4). A List unanswered, like any request, ends the connection.
        let leases = match exchange(&connection, &list).await {
            Ok(Message::Leases(l)) => Some(l),
            Ok(other) => {
                warn!(
                    "the gateway answered List with {}: opening what the host holds again",
                    other.message_type().name()
                );
                None
            }
            Err(e @ (ExchangeError::Decode(_) | ExchangeError::Invalid(_))) => {
                warn!("the gateway's list is unusable ({e}): opening what the host holds again");
                None
            }
            Err(e) => return Err(ConnectError::List(e.to_string())),
        };
        return Ok((endpoint, connection, welcome, leases));
    }
}

/// Between the start of one address's handshake and the next one's while no earlier one has
/// succeeded, as RFC 8305 recommends: a name whose first address is dead (an IPv6 route that
/// goes nowhere, a stale record) costs a quarter of a second, not a whole handshake timeout.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// A handshake (each given up after `handshake`) with `timers` to the first of `addrs` that
/// answers, then Hello and Welcome on it. The addresses are tried in order, each started when
/// the one before failed or [`ATTEMPT_DELAY`] after it began; the first handshake to succeed
/// wins and the others are dropped.
async fn connect_once(
    settings: &LinkSettings,
    candidate: &Candidate,
    addrs: &[SocketAddr],
    timers: TransportTimers,
    handshake: Duration,
) -> Result<(SocketAddr, quinn::Endpoint, quinn::Connection, Welcome), ConnectError> {
    let options = ClientOptions {
        keep_alive_interval: timers.keep_alive,
        idle_timeout: timers.idle_timeout,
        ..settings.client_options.clone()
    };
    let mut config = settings.client_config.clone();
    config.transport_config(Arc::new(
        client_transport(&options).map_err(ConnectError::Transport)?,
    ));
    let (addr, endpoint, connection) =
        first_handshake(&config, &candidate.server_name, addrs, handshake).await?;
    let hello = Message::Hello(Hello {
        common: Common {
            request_id: Some(rand::random()),
            critical: Vec::new(),
        },
        versions: OFFERED_VERSIONS.to_vec(),
        capabilities: Capabilities(Capabilities::ALL),
        software: Some(format!("fwnp-agent/{}", env!("CARGO_PKG_VERSION"))),
    });
    let answer = exchange(&connection, &hello).await.map_err(|e| {
        // The gateway closes the connection with VersionMismatch right after its Denied
        // unsupported-version (spec 5.2): a close that overtook the answer says the same.
        let mismatch = VarInt::from_u32(QuicErrorCode::VersionMismatch.code());
        match connection.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == mismatch =>
            {
                ConnectError::UnsupportedVersion(None)
            }
            _ => ConnectError::Hello(e),
        }
    })?;
    let welcome = match answer {
        Message::Welcome(w) => w,
        Message::Denied(d) if d.code == fwnp_proto::ResultCode::RateLimited => {
            let after = Duration::from_secs(u64::from(d.retry_after.unwrap_or(0)));
            return Err(ConnectError::RetryAfter(after));
        }
        Message::Denied(d) if d.code == fwnp_proto::ResultCode::UnsupportedVersion => {
            return Err(ConnectError::UnsupportedVersion(d.reason));
        }
        Message::Denied(d) => {
            return Err(ConnectError::Refused(format!(
                "Denied {}{}",
                d.code,
                d.reason.map(|r| format!(": {r}")).unwrap_or_default()
            )));
        }
        other => {
            return Err(ConnectError::Refused(
                other.message_type().name().to_owned(),
            ));
        }
    };
    Ok((addr, endpoint, connection, welcome))
}

/// The first handshake of `addrs` to succeed, started as [`connect_once`] says.
async fn first_handshake(
    config: &quinn::ClientConfig,
    server_name: &str,
    addrs: &[SocketAddr],
    handshake: Duration,
) -> Result<(SocketAddr, quinn::Endpoint, quinn::Connection), ConnectError> {
    type Attempt = (
        SocketAddr,
        quinn::Endpoint,
        Result<quinn::Connection, ConnectError>,
    );
    let start = |attempts: &mut tokio::task::JoinSet<Attempt>,
                 addr: SocketAddr|
     -> Result<(), ConnectError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Endpoint)?;
        let connecting = endpoint
            .connect_with(config.clone(), addr, server_name)
            .map_err(|e| ConnectError::Connect(addr, e.to_string()))?;
        attempts.spawn(async move {
            let connection = match tokio::time::timeout(handshake, connecting).await {
                Ok(Ok(connection)) => Ok(connection),
                Ok(Err(e)) => Err(ConnectError::Connect(addr, e.to_string())),
                Err(_) => Err(ConnectError::Connect(
                    addr,
                    format!("no handshake within {handshake:?}"),
                )),
            };
            (addr, endpoint, connection)
        });
        Ok(())
    };
    // Dropping the set aborts the attempts still running, and their connections with them.
    let mut attempts = tokio::task::JoinSet::new();
    let mut waiting = addrs.iter().copied();
    let mut failures = Vec::new();
    loop {
        if attempts.is_empty() {
            let Some(addr) = waiting.next() else {
                return Err(match failures.len() {
                    1 => failures.remove(0),
                    _ => ConnectError::EveryAddress(failures),
                });
            };
            if let Err(e) = start(&mut attempts, addr) {
                failures.push(e);
            }
            continue;
        }
        let more = waiting.len() > 0;
        tokio::select! {
            joined = attempts.join_next() => match joined {
                Some(Ok((addr, endpoint, Ok(connection)))) => {
                    return Ok((addr, endpoint, connection));
                }
                Some(Ok((_, _, Err(e)))) => {
                    debug!("{e}");
                    failures.push(e);
                    if let Some(addr) = waiting.next()
                        && let Err(e) = start(&mut attempts, addr)
                    {
                        failures.push(e);
                    }
                }
                // An attempt's task cannot be aborted while the set is held, and panics in it
                // are bugs: say so rather than hang.
                Some(Err(e)) => failures.push(ConnectError::Attempt(e.to_string())),
                None => {}
            },
            _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {
                if let Some(addr) = waiting.next()
                    && let Err(e) = start(&mut attempts, addr)
                {
                    failures.push(e);
                }
            }
        }
    }
}

/// How a followed connection ended.
struct Followed {
    /// Why, for logs and Status.
    reason: String,
    /// How, for the reconnection schedule: a stateless reset; after a GoingAway, the delay it
    /// asked for; otherwise lost.
    ending: Ending,
    /// Whether the gateway said it was going away (GoingAway), with or without a delay.
    went_away: bool,
}

impl Followed {
    fn stopping() -> Self {
        Followed {
            reason: "the agent is stopping".into(),
            ending: Ending::Lost,
            went_away: false,
        }
    }
}

/// Forwards notices until the connection ends; returns why it ended and how.
async fn follow(
    connection: &quinn::Connection,
    core: &mpsc::UnboundedSender<CoreInput>,
) -> Followed {
    let mut went_away = false;
    let mut hint = None;
    loop {
        let mut stream = match connection.accept_uni().await {
            Ok(stream) => stream,
            Err(e) => {
                let ending = match (&e, hint) {
                    (quinn::ConnectionError::Reset, _) => Ending::Reset,
                    (_, Some(after)) => Ending::GoingAway(after),
                    _ => Ending::Lost,
                };
                return Followed {
                    reason: e.to_string(),
                    ending,
                    went_away,
                };
            }
        };
        // A notice is one small item; read it here, bounded in size and time.
        let bytes = match tokio::time::timeout(
            EXCHANGE_TIMEOUT,
            stream.read_to_end(MAX_MESSAGE_SIZE),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(ReadToEndError::TooLong)) => {
                let _ = stream.stop(VarInt::from_u32(QuicErrorCode::MessageTooLarge.code()));
                let reason = format!("a notice longer than {MAX_MESSAGE_SIZE} bytes");
                if !discarded(core, reason) {
                    return Followed::stopping();
                }
                continue;
            }
            // The connection's end comes next, and the next connection lists the leases first
            // anyway.
            Ok(Err(ReadToEndError::Read(ReadError::ConnectionLost(e)))) => {
                debug!("a notice stream ended with its connection: {e}");
                continue;
            }
            // A notice lost on its way may have been a Revoked or an EpochChanged: the list of
            // leases tells what it said, as for one discarded (spec 5.3).
            Ok(Err(e)) => {
                if !discarded(core, format!("a notice lost on its way ({e})")) {
                    return Followed::stopping();
                }
                continue;
            }
            Err(_) => {
                let _ = stream.stop(VarInt::from_u32(QuicErrorCode::RequestTimeout.code()));
                let reason =
                    format!("a notice whose stream did not end within {EXCHANGE_TIMEOUT:?}");
                if !discarded(core, reason) {
                    return Followed::stopping();
                }
                continue;
            }
        };
        match fwnp_proto::codec::decode(&bytes) {
            Ok(notice) if notice.message_type().is_notice() => {
                if let Message::GoingAway(g) = &notice {
                    info!(reason = ?g.reason, reconnect_after = ?g.reconnect_after, "the gateway is going away");
                    went_away = true;
                    // Without reconnect-after, the usual delays apply (spec Section 8.14).
                    hint = g
                        .reconnect_after
                        .map(|seconds| Duration::from_secs(u64::from(seconds)));
                }
                if core
                    .send(CoreInput::Gateway(GatewayEvent::Notice(notice)))
                    .is_err()
                {
                    return Followed::stopping();
                }
            }
            // A notice type this agent does not know is ignored, as the protocol says; one it
            // knows that does not decode, or that is no notice at all, is discarded (spec 5.3).
            Err(DecodeError::UnknownMessageType(number)) => {
                debug!("ignored a notice of unknown type {number}");
            }
            Ok(other) => {
                let reason = format!("a {} on a notice stream", other.message_type().name());
                if !discarded(core, reason) {
                    return Followed::stopping();
                }
            }
            Err(e) => {
                if !discarded(core, format!("an undecodable notice: {e}")) {
                    return Followed::stopping();
                }
            }
        }
    }
}

/// Tells the core that a notice was discarded or lost, so that it asks for the list of leases
/// to learn what it missed (spec 5.3); false when the core is gone.
fn discarded(core: &mpsc::UnboundedSender<CoreInput>, reason: String) -> bool {
    warn!("discarded {reason}");
    core.send(CoreInput::Gateway(GatewayEvent::NoticeDiscarded { reason }))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(priority: u16, weight: u16, name: &str) -> SrvTarget {
        SrvTarget {
            priority,
            weight,
            port: 4433,
            target: name.into(),
        }
    }

    #[test]
    fn srv_targets_go_by_priority_then_by_weight() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut heavy_first = 0;
        for _ in 0..1000 {
            let ordered = srv_order(
                vec![
                    target(20, 1, "late.example.org"),
                    target(10, 90, "heavy.example.org"),
                    target(10, 10, "light.example.org"),
                ],
                &mut rng,
            );
            let names: Vec<&str> = ordered.iter().map(|t| t.target.as_str()).collect();
            assert_eq!(names.len(), 3);
            assert_eq!(names[2], "late.example.org", "{names:?}");
            if names[0] == "heavy.example.org" {
                heavy_first += 1;
            }
        }
        // 90 % in expectation; far from 50 % either way.
        assert!((820..=970).contains(&heavy_first), "{heavy_first}");
    }

    fn candidate(address: &str) -> Candidate {
        Candidate {
            address: address.into(),
            server_name: "gw.example.org".into(),
            resolved: Vec::new(),
        }
    }

    #[test]
    fn a_departed_gateway_waits_its_time_and_a_refusing_one_a_restart() {
        let now = Instant::now();
        let back = now + Duration::from_secs(30);
        let list = vec![
            candidate("a.example.org:4433"),
            candidate("b.example.org:4433"),
        ];
        let mut exclusions = Exclusions::default();
        exclusions.depart("a.example.org:4433", back);
        assert!(!exclusions.may_try("a.example.org:4433", now));
        assert!(exclusions.may_try("b.example.org:4433", now));
        assert_eq!(exclusions.next_return(&list, now), Some(back));
        assert!(exclusions.may_try("a.example.org:4433", back));
        assert_eq!(exclusions.next_return(&list, back), None);

        exclusions.refuse("b.example.org:4433", "unsupported-version".into());
        assert!(!exclusions.may_try("b.example.org:4433", back + Duration::from_secs(3600)));
        assert!(!exclusions.every_one_refused(&list));
        exclusions.refuse("a.example.org:4433", "unsupported-version".into());
        assert!(exclusions.every_one_refused(&list));
        // A refusing gateway does not come back, whatever its GoingAway asked.
        assert_eq!(exclusions.next_return(&list, now), None);
        assert!(!exclusions.every_one_refused(&[]));
        let why = exclusions.no_gateway_left();
        assert!(
            why.contains("a.example.org:4433") && why.contains("b.example.org:4433"),
            "{why}"
        );
        assert!(why.contains(&format!("{OFFERED_VERSIONS:?}")), "{why}");
    }

    #[test]
    fn a_lone_dot_target_offers_no_gateway() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(srv_order(vec![target(0, 0, ".")], &mut rng).is_empty());
        assert_eq!(
            srv_order(vec![target(0, 0, "gw.example.org")], &mut rng).len(),
            1
        );
    }
}
