//! The agent's one QUIC connection to the gateway: connect with the host's certificate, Hello
//! and Welcome, List (so the agent can resync before any lease machine sends), then notices from
//! the gateway's unidirectional streams until the connection ends; then reconnect.
//!
//! The timing is [`fwnp_proto::link`]'s: each connection's keep-alive and idle timeout suit the
//! shortest lifetime the gateway grants (known from the last Welcome; a connection whose timers
//! are too slow for it is replaced at once by one whose timers suit); after a stateless reset
//! (the gateway restarted and listens again) the next attempt is at once; otherwise an
//! exponential backoff, or the delay a GoingAway notice asked for, but while leases are held
//! never more than a sixteenth of the shortest remaining lifetime, and handshakes are given up
//! after as long. The core publishes that earliest expiry on a watch channel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::link::{Ending, Reconnect, TransportTimers};
use fwnp_proto::{
    Capabilities, Common, Hello, Leases, List, MAX_MESSAGE_SIZE, Message, VERSION, Welcome,
};
use fwnp_trust::tls::{ClientOptions, client_transport};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::core::CoreInput;

/// How long a request waits for its answer on its stream.
pub const EXCHANGE_TIMEOUT: Duration = fwnp_proto::lease::REQUEST_TIMEOUT;

/// What the link tells the agent's core.
#[derive(Debug)]
pub enum GatewayEvent {
    /// A connection is up: Welcome was received and the gateway listed the host's leases.
    Connected {
        /// The connection, for requests.
        connection: quinn::Connection,
        /// The gateway's Welcome.
        welcome: Welcome,
        /// The gateway's answer to List, taken before any other request.
        leases: Leases,
    },
    /// A notice from the gateway (Revoked, EpochChanged, GoingAway).
    Notice(Message),
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
    /// The answer did not decode.
    #[error("undecodable answer: {0}")]
    Decode(#[from] fwnp_proto::codec::DecodeError),
}

/// Sends `request` on a new bidirectional stream and reads the answer.
pub async fn exchange(
    connection: &quinn::Connection,
    request: &Message,
) -> Result<Message, ExchangeError> {
    let bytes = fwnp_proto::codec::encode(request);
    let work = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| ExchangeError::Stream(e.to_string()))?;
        send.write_all(&bytes)
            .await
            .map_err(|e| ExchangeError::Stream(e.to_string()))?;
        let _ = send.finish();
        let answer = recv
            .read_to_end(MAX_MESSAGE_SIZE)
            .await
            .map_err(|e| ExchangeError::Stream(e.to_string()))?;
        Ok(fwnp_proto::codec::decode(&answer)?)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| ExchangeError::Timeout(EXCHANGE_TIMEOUT))?
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot open a UDP endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("Hello: {0}")]
    Hello(ExchangeError),
    #[error("Hello answered with {0}")]
    Refused(String),
    #[error("List: {0}")]
    List(String),
    #[error("transport options: {0}")]
    Transport(fwnp_trust::tls::TlsError),
}

/// The link's settings.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// `HOST:PORT` of the gateway.
    pub address: String,
    /// The name its certificate must carry.
    pub server_name: String,
    /// The QUIC client configuration with the host's certificate.
    pub client_config: quinn::ClientConfig,
    /// The transport options the timers of each connection are set on.
    pub client_options: ClientOptions,
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
    loop {
        let expiry = *earliest_expiry.borrow();
        let handshake = Reconnect::handshake_timeout(Instant::now(), expiry);
        let ending = match connect(&settings, &mut min_lifetime, handshake).await {
            Ok((endpoint, connection, welcome, leases)) => {
                schedule.connected(Instant::now());
                info!(
                    gateway = %settings.address,
                    identity = %welcome.identity,
                    epoch = format_args!("{:016x}", welcome.epoch),
                    leases = leases.leases.len(),
                    "connected to the gateway"
                );
                let event = GatewayEvent::Connected {
                    connection: connection.clone(),
                    welcome,
                    leases,
                };
                if core.send(CoreInput::Gateway(event)).is_err() {
                    return;
                }
                let (reason, ending) = follow(&connection, &core).await;
                warn!(gateway = %settings.address, %reason, "connection to the gateway ended");
                endpoint.close(0u32.into(), b"");
                if core
                    .send(CoreInput::Gateway(GatewayEvent::Disconnected { reason }))
                    .is_err()
                {
                    return;
                }
                ending
            }
            Err(e) => {
                warn!(gateway = %settings.address, "cannot connect to the gateway: {e}");
                let reason = format!("cannot connect to {}: {e}", settings.address);
                if core
                    .send(CoreInput::Gateway(GatewayEvent::ConnectFailed { reason }))
                    .is_err()
                {
                    return;
                }
                Ending::Lost
            }
        };
        let now = Instant::now();
        let expiry = *earliest_expiry.borrow();
        let at = schedule.next_attempt(now, ending, expiry, &mut rng);
        debug!(delay = ?at.saturating_duration_since(now), ?ending, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = core.closed() => return,
        }
    }
}

/// One connection attempt. If the Welcome announces a shorter minimum lifetime than the
/// timers of the connection suit, it is closed and made again at once with suitable timers.
async fn connect(
    settings: &LinkSettings,
    min_lifetime: &mut Option<u32>,
    handshake: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection, Welcome, Leases), ConnectError> {
    let addr = tokio::net::lookup_host(&settings.address)
        .await
        .map_err(|e| ConnectError::Resolve(settings.address.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| ConnectError::Resolve(settings.address.clone(), "no address".into()))?;
    let mut retimed = false;
    loop {
        let timers = TransportTimers::for_min_lifetime(*min_lifetime);
        let (endpoint, connection, welcome) =
            connect_once(settings, addr, timers, handshake).await?;
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
        let list = Message::List(List {
            common: Common {
                request_id: Some(2),
                critical: Vec::new(),
            },
        });
        let leases = match exchange(&connection, &list).await {
            Ok(Message::Leases(l)) => l,
            Ok(other) => return Err(ConnectError::List(format!("answered {other:?}"))),
            Err(e) => return Err(ConnectError::List(e.to_string())),
        };
        return Ok((endpoint, connection, welcome, leases));
    }
}

/// A handshake (given up after `handshake`) with `timers`, then Hello and Welcome.
async fn connect_once(
    settings: &LinkSettings,
    addr: SocketAddr,
    timers: TransportTimers,
    handshake: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection, Welcome), ConnectError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let options = ClientOptions {
        keep_alive_interval: timers.keep_alive,
        idle_timeout: timers.idle_timeout,
        ..settings.client_options.clone()
    };
    let mut config = settings.client_config.clone();
    config.transport_config(Arc::new(
        client_transport(&options).map_err(ConnectError::Transport)?,
    ));
    let endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Endpoint)?;
    let connecting = endpoint
        .connect_with(config, addr, &settings.server_name)
        .map_err(|e| ConnectError::Connect(addr, e.to_string()))?;
    let connection = tokio::time::timeout(handshake, connecting)
        .await
        .map_err(|_| ConnectError::Connect(addr, format!("no handshake within {handshake:?}")))?
        .map_err(|e| ConnectError::Connect(addr, e.to_string()))?;

    let hello = Message::Hello(Hello {
        common: Common {
            request_id: Some(1),
            critical: Vec::new(),
        },
        versions: vec![VERSION],
        capabilities: Capabilities(Capabilities::ALL),
        software: Some(format!("fwnp-agent/{}", env!("CARGO_PKG_VERSION"))),
    });
    let welcome = match exchange(&connection, &hello)
        .await
        .map_err(ConnectError::Hello)?
    {
        Message::Welcome(w) => w,
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
    Ok((endpoint, connection, welcome))
}

/// Forwards notices until the connection ends; returns why it ended and how, for the
/// reconnection schedule (a stateless reset; after a GoingAway, the delay it asked for).
async fn follow(
    connection: &quinn::Connection,
    core: &mpsc::UnboundedSender<CoreInput>,
) -> (String, Ending) {
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
                return (e.to_string(), ending);
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
            Ok(Err(e)) => {
                debug!("notice stream failed: {e}");
                continue;
            }
            Err(_) => {
                debug!("notice stream not finished in time");
                continue;
            }
        };
        match fwnp_proto::codec::decode(&bytes) {
            Ok(notice) if notice.message_type().is_notice() => {
                if let Message::GoingAway(g) = &notice {
                    info!(reason = ?g.reason, reconnect_after = ?g.reconnect_after, "the gateway is going away");
                    // Without reconnect-after, the usual delays apply (spec Section 8.14).
                    hint = g
                        .reconnect_after
                        .map(|seconds| Duration::from_secs(u64::from(seconds)));
                }
                if core
                    .send(CoreInput::Gateway(GatewayEvent::Notice(notice)))
                    .is_err()
                {
                    return ("the agent is stopping".into(), Ending::Lost);
                }
            }
            // A notice type this agent does not know is ignored, as the protocol says.
            Ok(other) => debug!("ignored {} on a notice stream", other.message_type().name()),
            Err(e) => debug!("ignored an undecodable notice: {e}"),
        }
    }
}
