//! The QUIC side of the gateway: connections, streams and framing, as `spec/fwnp.md` lays them
//! out. One request per client-opened bidirectional stream, one answer back, then FIN; notices
//! on gateway-opened unidirectional streams. What a request means is [`crate::service`]'s
//! business; this module only moves bytes and enforces the transport's limits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fwnp_proto::{MAX_MESSAGE_SIZE, Message, QuicErrorCode, ResultCode};
use quinn::{ReadToEndError, VarInt};
use tracing::{debug, info, warn};

use crate::service::{Admission, Service};
use crate::sessions::{HostLink, NoticeError, NoticeFuture, Session};
use fwnp_trust::identity::PeerIdentity;

/// How long a connection may go without a Hello before it is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection's next request stream waits after one of its requests was refused as
/// rate-limited. A host past its rate is answered at once, but it cannot make the gateway
/// answer refusals as fast as it can send: its streams wait in QUIC flow control meanwhile,
/// costing the gateway nothing, and the other hosts keep the CPU.
const RATE_LIMITED_PAUSE: Duration = Duration::from_millis(10);

fn code(c: QuicErrorCode) -> VarInt {
    VarInt::from_u32(c.code())
}

/// Accepts connections until the endpoint is closed. Before any TLS work, each attempt is
/// admitted, sent a Retry or refused ([`Service::admit_handshake`]): a flood of handshakes from
/// one source, or from spoofed ones, cannot take the gateway's CPU from good hosts.
pub async fn serve(endpoint: quinn::Endpoint, service: Arc<Service>) {
    let in_progress = Arc::new(AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        match service.admit_handshake(remote, validated, in_progress.load(Ordering::Acquire)) {
            Admission::Accept => {}
            Admission::Retry if incoming.may_retry() => {
                // Only fails for an attempt that cannot be retried, checked just above.
                let _ = incoming.retry();
                continue;
            }
            Admission::Retry => {}
            Admission::Refuse => {
                incoming.refuse();
                continue;
            }
        }
        let guard = InProgress::enter(&in_progress);
        tokio::spawn(connection_task(incoming, service.clone(), guard));
    }
}

/// A connection's task: its set-up on the heap, then its life. A task keeps room for the
/// largest state its future may reach for as long as it runs, and this one runs as long as its
/// connection, idle most of the time. With the handshake's state (the initial packet, the TLS
/// and credential checks) inline, the task's future was 1,136 bytes in a release build; with it
/// boxed, freed once the connection is up, 320 (the streams it waits for, its timers).
fn connection_task(
    incoming: quinn::Incoming,
    service: Arc<Service>,
    handshake: InProgress,
) -> impl Future<Output = ()> + Send + 'static {
    let set_up = Box::pin(set_up(incoming, service.clone(), handshake));
    async move {
        if let Some((connection, session)) = set_up.await {
            serve_connection(connection, session, service).await;
        }
    }
}

/// One handshake in progress, counted until dropped.
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InProgress(count.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The handshake, the identity and credential checks and the session's registration: the
/// connection and its session once it may serve requests, `None` once it was refused.
async fn set_up(
    incoming: quinn::Incoming,
    service: Arc<Service>,
    handshake: InProgress,
) -> Option<(quinn::Connection, Arc<Session>)> {
    let remote = incoming.remote_address();
    let handshaken = incoming.await;
    drop(handshake);
    let connection = match handshaken {
        Ok(connection) => connection,
        Err(e) => {
            // Refused certificates end here: the TLS handshake failed.
            service.auth_failure(remote, &e.to_string());
            return None;
        }
    };
    let (peer, identity_error) =
        match PeerIdentity::from_connection(&connection).map_err(|e| e.to_string()) {
            Ok(peer) => (Some(peer), None),
            Err(reason) => {
                service.auth_failure(remote, &reason);
                (None, Some(reason))
            }
        };
    let session = Arc::new(Session::new(
        service.sessions.next_id(),
        peer,
        identity_error,
        remote,
        Box::new(QuicLink(connection.clone())),
    ));
    if !service
        .sessions
        .insert(&session, service.config.limits.max_connections_per_identity)
    {
        warn!(identity = session.identity(), %remote, "too many connections for this identity");
        session.close(
            QuicErrorCode::ExcessiveLoad,
            "too many connections for this identity",
        );
        return None;
    }
    if !service.check_credential(&session).await {
        service.sessions.remove(&session);
        return None;
    }
    info!(session = session.id, identity = session.identity(), %remote, "connected");
    service.metrics.connections.inc();
    Some((connection, session))
}

/// A connection's life once it is up: takes its request streams until it closes.
async fn serve_connection(
    connection: quinn::Connection,
    session: Arc<Session>,
    service: Arc<Service>,
) {
    // The Hello timer and the pause after a rate-limited request are on the heap, and only while
    // they run: this task lives as long as its connection, idle most of the time, and a task
    // keeps room for every state its future may reach (a timer inline is some 100 bytes).
    let mut hello_deadline = Some(Box::pin(tokio::time::sleep(HELLO_TIMEOUT)));
    let mut pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // The Hello is answered by its stream's own task, so whether the host is welcomed is read
    // when the timer fires: read when this loop waits for the next stream, it would be the state
    // before the Hello's answer, and a host that says Hello and then stays quiet would be closed
    // by a timer it had already satisfied.
    loop {
        if pause.is_none() && session.rate_limited.swap(false, Ordering::AcqRel) {
            pause = Some(Box::pin(tokio::time::sleep(RATE_LIMITED_PAUSE)));
        }
        tokio::select! {
            () = wait(&mut pause), if pause.is_some() => pause = None,
            stream = connection.accept_bi(), if pause.is_none() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(handle_stream(send, recv, session.clone(), service.clone()));
                }
                Err(e) => { debug!(session = session.id, "closed: {e}"); break; }
            },
            () = wait(&mut hello_deadline), if hello_deadline.is_some() => {
                hello_deadline = None;
                if !session.welcomed.load(Ordering::Acquire) {
                    session.close(QuicErrorCode::RequestTimeout, "no Hello in time");
                    break;
                }
            }
            stream = connection.accept_uni() => {
                if stream.is_ok() {
                    session.close(QuicErrorCode::ProtocolViolation, "clients do not open unidirectional streams");
                }
                break;
            }
        }
    }
    service.metrics.connections.dec();
    service.sessions.remove(&session);
    info!(
        session = session.id,
        identity = session.identity(),
        "disconnected"
    );
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    session: Arc<Session>,
    service: Arc<Service>,
) {
    let timeout: Duration = service.config.limits.request_timeout;
    let bytes = match tokio::time::timeout(timeout, recv.read_to_end(MAX_MESSAGE_SIZE)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(ReadToEndError::TooLong)) => {
            let _ = recv.stop(code(QuicErrorCode::MessageTooLarge));
            let _ = send.reset(code(QuicErrorCode::MessageTooLarge));
            service.metrics.request(ResultCode::MalformedRequest.name());
            return;
        }
        Ok(Err(e)) => {
            debug!(session = session.id, "request stream failed: {e}");
            return;
        }
        Err(_) => {
            let _ = recv.stop(code(QuicErrorCode::RequestTimeout));
            let _ = send.reset(code(QuicErrorCode::RequestTimeout));
            return;
        }
    };
    // The request's handling is on the heap, not in the task: tokio copies a task's future
    // whole when it spawns it (three times) and again when it stores its output and when it
    // drops it, and the handling's state (its kernel hold, store commit and the effects after
    // them) is some 3 KB against the few hundred bytes of the stream's own. One allocation and
    // one copy instead of five copies of it per request.
    let answer = Box::pin(service.handle(&session, &bytes)).await;
    if matches!(&answer, Message::Denied(d) if d.code == ResultCode::RateLimited) {
        session.rate_limited.store(true, Ordering::Release);
    }
    let close_after = matches!(
        &answer,
        Message::Denied(d) if d.code == ResultCode::UnsupportedVersion
    );
    let encoded = fwnp_proto::codec::encode(&answer);
    let welcome = matches!(answer, Message::Welcome(_));
    if send.write_all(&encoded).await.is_ok() {
        let _ = send.finish();
        // Only now may the host's other requests be served and notices be sent (spec 5.2, 5.3).
        if welcome && session.welcome_written() {
            info!(session = session.id, identity = session.identity(), "hello");
        }
    } else if welcome {
        session.welcome_not_written();
    }
    if close_after {
        // Let the answer leave before the connection closes.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        session.close(QuicErrorCode::VersionMismatch, "no version in common");
    }
}

/// Waits for a timer that may not run (a `select!` branch is disabled then).
async fn wait(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    if let Some(timer) = timer {
        timer.await;
    }
}

/// A host's QUIC connection, as the sessions reach it: notices on new unidirectional streams.
#[derive(Debug)]
struct QuicLink(quinn::Connection);

impl HostLink for QuicLink {
    fn send_notice(
        &self,
        bytes: Vec<u8>,
        acknowledged_within: Option<Duration>,
    ) -> NoticeFuture<'_> {
        Box::pin(async move {
            let send = async {
                let mut stream = self.0.open_uni().await?;
                stream.write_all(&bytes).await?;
                stream.finish()?;
                if acknowledged_within.is_some() {
                    stream.stopped().await?;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match acknowledged_within {
                None => send.await.map_err(|e| NoticeError::Failed(e.to_string())),
                Some(within) => match tokio::time::timeout(within, send).await {
                    Ok(result) => result.map_err(|e| NoticeError::Failed(e.to_string())),
                    Err(_) => Err(NoticeError::NotAcknowledged),
                },
            }
        })
    }

    fn close(&self, reason: QuicErrorCode, text: &str) {
        self.0.close(code(reason), text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    /// The size of the future an `async fn` of four arguments returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_: &impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request stream is a task, whose future tokio copies whole several times over its
    /// life (into the task when spawned, then when it stores the output and drops it): the
    /// task holds the stream's own state, and the request's handling, ten times that size,
    /// lies on the heap once.
    #[test]
    fn a_request_stream_task_holds_the_stream_not_the_handling() {
        let size = future_size(&super::handle_stream);
        println!("request stream task: {size} bytes");
        assert!(size <= 640, "{size} bytes");
    }
}
