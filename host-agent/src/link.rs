//! The agent's one QUIC connection to the gateway: connect with the host's certificate, Hello
//! and Welcome, List (so the agent can resync before any lease machine sends), then notices from
//! the gateway's unidirectional streams until the connection ends; then reconnect after an
//! exponential backoff (1 s doubling to 60 s, each delay jittered by +-20 %), or after the delay
//! a GoingAway notice asked for.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fwnp_proto::{
    Capabilities, Common, Hello, Leases, List, MAX_MESSAGE_SIZE, Message, VERSION, Welcome,
};
use rand::Rng;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::core::CoreInput;

/// The first reconnection delay.
pub const FIRST_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// The longest reconnection delay.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(60);
/// How long a request waits for its answer on its stream.
pub const EXCHANGE_TIMEOUT: Duration = fwnp_proto::lease::REQUEST_TIMEOUT;
/// A connection that lived at least this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

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
}

/// Runs the link until the core goes away.
pub async fn run(settings: LinkSettings, core: mpsc::UnboundedSender<CoreInput>) {
    let mut backoff = FIRST_RECONNECT_DELAY;
    loop {
        let started = Instant::now();
        let mut delay = None;
        match connect(&settings).await {
            Ok((endpoint, connection, welcome, leases)) => {
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
                let (reason, hint) = follow(&connection, &core).await;
                warn!(gateway = %settings.address, %reason, "connection to the gateway ended");
                endpoint.close(0u32.into(), b"");
                if core
                    .send(CoreInput::Gateway(GatewayEvent::Disconnected { reason }))
                    .is_err()
                {
                    return;
                }
                if started.elapsed() >= STABLE_CONNECTION {
                    backoff = FIRST_RECONNECT_DELAY;
                }
                delay = hint;
            }
            Err(e) => warn!(gateway = %settings.address, "cannot connect to the gateway: {e}"),
        }
        let base = delay.unwrap_or(backoff);
        let jittered = base.mul_f64(rand::rng().random_range(0.8..=1.2));
        debug!(?jittered, "reconnecting after a delay");
        backoff = (backoff * 2).min(MAX_RECONNECT_DELAY);
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = core.closed() => return,
        }
    }
}

async fn connect(
    settings: &LinkSettings,
) -> Result<(quinn::Endpoint, quinn::Connection, Welcome, Leases), ConnectError> {
    let addr = tokio::net::lookup_host(&settings.address)
        .await
        .map_err(|e| ConnectError::Resolve(settings.address.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| ConnectError::Resolve(settings.address.clone(), "no address".into()))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Endpoint)?;
    let connecting = endpoint
        .connect_with(settings.client_config.clone(), addr, &settings.server_name)
        .map_err(|e| ConnectError::Connect(addr, e.to_string()))?;
    let connection = tokio::time::timeout(EXCHANGE_TIMEOUT * 2, connecting)
        .await
        .map_err(|_| ConnectError::Connect(addr, "handshake timed out".into()))?
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
    Ok((endpoint, connection, welcome, leases))
}

/// Forwards notices until the connection ends; returns why it ended and, after a GoingAway,
/// when to reconnect.
async fn follow(
    connection: &quinn::Connection,
    core: &mpsc::UnboundedSender<CoreInput>,
) -> (String, Option<Duration>) {
    let mut hint = None;
    loop {
        let mut stream = match connection.accept_uni().await {
            Ok(stream) => stream,
            Err(e) => return (e.to_string(), hint),
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
                    hint = Some(Duration::from_secs(u64::from(
                        g.reconnect_after.unwrap_or(1).max(1),
                    )));
                }
                if core
                    .send(CoreInput::Gateway(GatewayEvent::Notice(notice)))
                    .is_err()
                {
                    return ("the agent is stopping".into(), hint);
                }
            }
            // A notice type this agent does not know is ignored, as the protocol says.
            Ok(other) => debug!("ignored {} on a notice stream", other.message_type().name()),
            Err(e) => debug!("ignored an undecodable notice: {e}"),
        }
    }
}
