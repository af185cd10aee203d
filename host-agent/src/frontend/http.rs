//! The UPnP front end's HTTP/1.1: one request a connection, answered and closed. A UPnP
//! control point asks one thing at a time (the description, then one SOAP action), so neither
//! keep-alive, pipelining nor transfer codings are needed, and a whole framework would only
//! enlarge the agent.
//!
//! The head is read with httparse within [`MAX_HEAD`] bytes (a head that does not parse is
//! answered 400, one that does not fit 431); a body is read only with a Content-Length and
//! only up to the caller's bound (above it 413, before a byte of it is read; a POST without
//! Content-Length 411; a transfer coding 501). HEAD is handled as GET and answered with GET's
//! status and headers, Content-Length included, without the body (RFC 9110, Section 9.3.2): a
//! handler never sees it. Every answer carries `Connection: close`, and
//! what the client sent after its request is never answered. A client has [`Limits::time`] to
//! send its request and as long again to take the answer; at most [`Limits::connections`] are
//! served at once, and a connection above that is closed as soon as it is accepted.
//!
//! [`parse_request`] holds the whole reading logic without IO, so that it is fuzzed and tested
//! on bytes; [`serve`] carries it out on sockets.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, warn};

/// The largest request head read, request line and headers together.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields of a head (a control point sends fewer than ten).
const MAX_HEADERS: usize = 32;
/// What is read and thrown away after the answer, so that closing with unread data does not
/// reset the connection before the client has read the answer.
const MAX_LINGER: u64 = 64 * 1024;
/// The longest that reading is waited for after the answer.
const LINGER_TIME: Duration = Duration::from_secs(1);

/// The bounds of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest head, in bytes.
    pub head: usize,
    /// The largest body, in bytes.
    pub body: usize,
    /// How long a client has to send its request, and again to take the answer.
    pub time: Duration,
    /// Most connections served at once.
    pub connections: usize,
}

impl Limits {
    /// The default bounds with a body of at most `body` bytes: an 8 KiB head, 10 seconds,
    /// 64 connections.
    pub const fn with_body(body: usize) -> Self {
        Self {
            head: MAX_HEAD,
            body,
            time: Duration::from_secs(10),
            connections: 64,
        }
    }
}

/// A request read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// The path of its target, without a query.
    pub path: String,
    /// Its header fields, names as sent, values without surrounding whitespace.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Its body (Content-Length bytes).
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first header field named `name` (any case), when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Why a request is not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The head does not parse as HTTP/1.x.
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    /// The request target is not a path (an absolute or authority form, or `*`).
    #[error("the request target is not a path")]
    Target,
    /// The head does not fit in the bound, or has too many header fields.
    #[error("the request head is larger than {0} bytes or has too many fields")]
    HeadTooLarge(usize),
    /// Content-Length is not a number, or two of them differ.
    #[error("invalid Content-Length")]
    Length,
    /// The body announced is larger than the bound.
    #[error("a body of {length} bytes is larger than {limit}")]
    BodyTooLarge {
        /// The Content-Length sent.
        length: u64,
        /// The bound.
        limit: usize,
    },
    /// A POST without Content-Length.
    #[error("a POST without Content-Length")]
    LengthRequired,
    /// A transfer coding (chunked bodies are not read).
    #[error("transfer codings are not accepted")]
    TransferCoding,
    /// The connection was closed before the request was whole.
    #[error("the request ends after {0} bytes")]
    Incomplete(usize),
    /// The connection was closed before anything was sent.
    #[error("the connection was closed without a request")]
    Closed,
    /// The client took longer than the bound.
    #[error("the request was not received in time")]
    TimedOut,
    /// The socket failed.
    #[error("reading the request: {0}")]
    Io(std::io::ErrorKind),
}

impl HttpError {
    /// The status the refusal is answered with; none when the client cannot take an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Malformed(_) | Self::Target | Self::Length | Self::Incomplete(_) => {
                Some(StatusCode::BAD_REQUEST)
            }
            Self::HeadTooLarge(_) => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            Self::BodyTooLarge { .. } => Some(StatusCode::PAYLOAD_TOO_LARGE),
            Self::LengthRequired => Some(StatusCode::LENGTH_REQUIRED),
            Self::TransferCoding => Some(StatusCode::NOT_IMPLEMENTED),
            Self::Closed | Self::TimedOut | Self::Io(_) => None,
        }
    }
}

/// How far [`parse_request`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The request is whole; what follows it is not read.
    Request(Request),
    /// More is needed: the bytes received may grow up to `room`.
    Partial {
        /// The most bytes the request may still take, counted from its start.
        room: usize,
    },
}

/// Reads a request from the bytes received so far.
///
/// ```
/// use fwnp_agent::frontend::http::{Limits, Parsed, parse_request};
/// let limits = Limits::with_body(16);
/// let head = b"POST /ctl HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
/// assert_eq!(
///     parse_request(head, &limits),
///     Ok(Parsed::Partial { room: head.len() + 5 })
/// );
/// let Ok(Parsed::Request(request)) = parse_request(b"POST /ctl?x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", &limits) else {
///     panic!("not read");
/// };
/// assert_eq!((request.path.as_str(), request.body.as_slice()), ("/ctl", &b"hello"[..]));
/// ```
pub fn parse_request(received: &[u8], limits: &Limits) -> Result<Parsed, HttpError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    let head_len = match head.parse(received) {
        Ok(httparse::Status::Complete(len)) if len <= limits.head => len,
        Ok(httparse::Status::Complete(_)) => return Err(HttpError::HeadTooLarge(limits.head)),
        Ok(httparse::Status::Partial) if received.len() < limits.head => {
            return Ok(Parsed::Partial { room: limits.head });
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::HeadTooLarge(limits.head));
        }
        Err(e) => return Err(HttpError::Malformed(e)),
    };
    // A complete head has both (httparse fills them before it says Complete).
    let (Some(method), Some(target)) = (head.method, head.path) else {
        return Err(HttpError::Malformed(httparse::Error::Token));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HttpError::Malformed(httparse::Error::Token))?;
    if !target.starts_with('/') {
        return Err(HttpError::Target);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_owned();
    let headers: Vec<(String, Vec<u8>)> = head
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.trim_ascii().to_vec()))
        .collect();
    if headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(HttpError::TransferCoding);
    }
    let mut length: Option<u64> = None;
    for (_, value) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        // Digits only: u64's parser would take a sign.
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(HttpError::Length);
        }
        let this = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(HttpError::Length)?;
        if length.is_some_and(|l| l != this) {
            return Err(HttpError::Length);
        }
        length = Some(this);
    }
    let length = match length {
        Some(length) => length,
        None if method == Method::POST => return Err(HttpError::LengthRequired),
        None => 0,
    };
    let body_len = usize::try_from(length)
        .ok()
        .filter(|l| *l <= limits.body)
        .ok_or(HttpError::BodyTooLarge {
            length,
            limit: limits.body,
        })?;
    let end = head_len + body_len;
    let Some(body) = received.get(head_len..end) else {
        return Ok(Parsed::Partial { room: end });
    };
    Ok(Parsed::Request(Request {
        method,
        path,
        headers,
        body: body.to_vec(),
    }))
}

/// Reads one request from `reader`: until its head ends, at most the head's bound, then no
/// more than its body.
pub async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &Limits,
) -> Result<Request, HttpError> {
    let mut received = Vec::with_capacity(1024);
    loop {
        let room = match parse_request(&received, limits)? {
            Parsed::Request(request) => return Ok(request),
            Parsed::Partial { room } => room,
        };
        let more = room.saturating_sub(received.len()) as u64;
        let read = (&mut *reader)
            .take(more)
            .read_buf(&mut received)
            .await
            .map_err(|e| HttpError::Io(e.kind()))?;
        if read == 0 {
            return Err(if received.is_empty() {
                HttpError::Closed
            } else {
                HttpError::Incomplete(received.len())
            });
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Its status.
    pub status: StatusCode,
    /// Its Content-Type, when it has a body.
    pub content_type: Option<&'static str>,
    /// Its body.
    pub body: Vec<u8>,
}

impl Response {
    /// An answer with a body.
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type: Some(content_type),
            body: body.into(),
        }
    }

    /// An answer of a status alone.
    pub fn empty(status: StatusCode) -> Self {
        Self {
            status,
            content_type: None,
            body: Vec::new(),
        }
    }

    /// The answer as sent: status line, Content-Type, Content-Length, `Connection: close`,
    /// body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    /// The answer to a HEAD request: as [`Response::to_bytes`] without the body, its
    /// Content-Length still the body's.
    pub fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("")
        );
        if let Some(content_type) = self.content_type {
            out.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        out.into_bytes()
    }
}

/// What a server answers.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `request` from `peer`, received on `local`.
    fn handle(
        &self,
        request: Request,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> impl Future<Output = Response> + Send;

    /// The answer to a request refused before it was read whole, with `status`.
    fn refused(&self, error: &HttpError, status: StatusCode, peer: SocketAddr) -> Response {
        let _ = (error, peer);
        Response::empty(status)
    }
}

/// Accepts connections on `listener` and answers one request on each, for ever.
pub async fn serve<H: Handler>(listener: TcpListener, limits: Limits, handler: Arc<H>) {
    let permits = Arc::new(Semaphore::new(limits.connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, or a connection reset while queued: go on after a while.
                warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "HTTP connection closed: {} served already", limits.connections);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            exchange(stream, peer, &limits, &*handler).await;
            drop(permit);
        });
    }
}

/// One connection: its request read, answered and the connection closed.
async fn exchange<H: Handler>(
    mut stream: TcpStream,
    peer: SocketAddr,
    limits: &Limits,
    handler: &H,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let read = tokio::time::timeout(limits.time, read_request(&mut stream, limits))
        .await
        .unwrap_or(Err(HttpError::TimedOut));
    let mut head = false;
    let response = match read {
        Ok(mut request) => {
            if request.method == Method::HEAD {
                head = true;
                request.method = Method::GET;
            }
            handler.handle(request, peer, local).await
        }
        Err(e) => {
            debug!(%peer, "HTTP request refused: {e}");
            match e.status() {
                Some(status) => handler.refused(&e, status, peer),
                None => return,
            }
        }
    };
    let deadline = Instant::now() + limits.time;
    let written = tokio::time::timeout_at(deadline, async {
        let bytes = match head {
            true => response.head_bytes(),
            false => response.to_bytes(),
        };
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        debug!(%peer, "HTTP answer not taken");
        return;
    }
    // What the client sent after its request (a body not read, a second request) is read and
    // dropped until it closes: closing with it unread would reset the connection, and the
    // client could lose the answer.
    let linger = deadline.min(Instant::now() + LINGER_TIME);
    let _ = tokio::time::timeout_at(
        linger,
        tokio::io::copy(&mut (&mut stream).take(MAX_LINGER), &mut tokio::io::sink()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const LIMITS: Limits = Limits::with_body(64);

    fn parse(bytes: &[u8]) -> Result<Parsed, HttpError> {
        parse_request(bytes, &LIMITS)
    }

    #[test]
    fn reads_heads_and_bodies() {
        let Ok(Parsed::Request(request)) = parse(
            b"POST /ctl/IPConn HTTP/1.1\r\nHost: x\r\nSOAPAction: \"urn:a#B\" \r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
        ) else {
            panic!("not read");
        };
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.path, "/ctl/IPConn");
        assert_eq!(request.header("soapaction"), Some("\"urn:a#B\""));
        // Only Content-Length bytes: what follows is another request, not this body.
        assert_eq!(request.body, b"abc");
        let Ok(Parsed::Request(request)) = parse(b"GET /rootDesc.xml HTTP/1.0\r\n\r\n") else {
            panic!("not read");
        };
        assert_eq!((request.method, request.body.len()), (Method::GET, 0));
        assert_eq!(
            parse(b"GET /rootDesc.xml HTTP/1.1\r\nHo"),
            Ok(Parsed::Partial { room: MAX_HEAD })
        );
    }

    #[test]
    fn refuses_malformed_heads() {
        for head in [
            &b"GET /\x01 HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(
                matches!(parse(head), Err(HttpError::Malformed(_))),
                "{head:?}: {:?}",
                parse(head)
            );
        }
        assert_eq!(
            parse(b"GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(HttpError::Target)
        );
        for length in ["+3", "3, 3", "", "0x3", "99999999999999999999999"] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {length}\r\n\r\nabc");
            assert_eq!(parse(head.as_bytes()), Err(HttpError::Length), "{length:?}");
        }
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
            Err(HttpError::Length)
        );
    }

    #[test]
    fn refuses_large_heads_bodies_and_codings() {
        let large = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(
            parse(&large.as_bytes()[..MAX_HEAD]),
            Err(HttpError::HeadTooLarge(MAX_HEAD))
        );
        assert_eq!(
            parse(large.as_bytes()),
            Err(HttpError::HeadTooLarge(MAX_HEAD))
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(
            parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Err(HttpError::HeadTooLarge(MAX_HEAD))
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n"),
            Err(HttpError::BodyTooLarge {
                length: 65,
                limit: 64
            })
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\n\r\n"),
            Err(HttpError::LengthRequired)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            Err(HttpError::TransferCoding)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Err(HttpError::TransferCoding)
        );
    }

    #[tokio::test]
    async fn reads_no_further_than_the_request() {
        // Once the head is read, only its body is: the next request stays unread.
        let head = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        let mut after = &b"okPOST / HTTP/1.1\r\n"[..];
        let mut reader = (&head[..]).chain(&mut after);
        let request = read_request(&mut reader, &LIMITS).await.expect("read");
        assert_eq!(request.body, b"ok");
        assert_eq!(after, b"POST / HTTP/1.1\r\n");
        let mut truncated = &b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nok"[..];
        assert_eq!(
            read_request(&mut truncated, &LIMITS).await,
            Err(HttpError::Incomplete(40))
        );
        assert_eq!(
            read_request(&mut &b""[..], &LIMITS).await,
            Err(HttpError::Closed)
        );
    }

    /// Answers every request with its method, path and body length, and counts them.
    #[derive(Debug, Default)]
    struct Echo {
        handled: AtomicUsize,
    }

    impl Handler for Echo {
        async fn handle(&self, request: Request, _: SocketAddr, _: SocketAddr) -> Response {
            self.handled.fetch_add(1, Ordering::SeqCst);
            Response::new(
                StatusCode::OK,
                "text/plain",
                format!("{} {} {}", request.method, request.path, request.body.len()),
            )
        }
    }

    struct Server {
        address: SocketAddr,
        echo: Arc<Echo>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn server(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let echo = Arc::new(Echo::default());
        let task = tokio::spawn(serve(listener, limits, echo.clone()));
        Server {
            address,
            echo,
            task,
        }
    }

    /// Sends `bytes` (half-closing after them when `close`), and reads until the server closes.
    async fn exchange_bytes(address: SocketAddr, bytes: &[u8], close: bool) -> String {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(bytes).await.expect("send");
        if close {
            stream.shutdown().await.expect("half-close");
        }
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn answers_one_request_and_closes() {
        let server = server(LIMITS).await;
        let answer = exchange_bytes(
            server.address,
            b"POST /ctl HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
            false,
        )
        .await;
        assert_eq!(
            answer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\nPOST /ctl 4"
        );
        // Two requests pipelined: only the first is answered.
        let answer = exchange_bytes(
            server.address,
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
        assert!(answer.ends_with("GET /a 0"), "{answer}");
        assert_eq!(server.echo.handled.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn answers_head_as_get_without_the_body() {
        let server = server(LIMITS).await;
        let get = exchange_bytes(server.address, b"GET /doc HTTP/1.1\r\n\r\n", false).await;
        let head = exchange_bytes(server.address, b"HEAD /doc HTTP/1.1\r\n\r\n", false).await;
        // The handler saw a GET; the head of the answer is GET's, Content-Length included.
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(get, format!("{head}GET /doc 0"));
        assert_eq!(server.echo.handled.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refuses_with_the_status_of_each_refusal() {
        let server = server(LIMITS).await;
        let status = |answer: &str| answer.lines().next().unwrap_or("").to_owned();
        // Whether the client closes its side after sending, and the status it is answered.
        let cases: [(&[u8], bool, &str); 5] = [
            (
                b"GET /\x01 HTTP/1.1\r\n\r\n",
                false,
                "HTTP/1.1 400 Bad Request",
            ),
            // Answered before the body, which never comes.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n",
                false,
                "HTTP/1.1 413 Payload Too Large",
            ),
            (
                b"POST / HTTP/1.1\r\n\r\n",
                false,
                "HTTP/1.1 411 Length Required",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                "HTTP/1.1 501 Not Implemented",
            ),
            // Truncated: the client closes its side before the body is whole.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc",
                true,
                "HTTP/1.1 400 Bad Request",
            ),
        ];
        for (sent, close, expected) in cases {
            let answer = exchange_bytes(server.address, sent, close).await;
            assert_eq!(status(&answer), expected, "{sent:?}");
            assert!(answer.contains("Connection: close\r\n"), "{answer}");
        }
        // Too large a head, answered without waiting for its end.
        let large = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        let answer = exchange_bytes(server.address, large.as_bytes(), false).await;
        assert_eq!(
            status(&answer),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        assert_eq!(server.echo.handled.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn cuts_slow_clients_and_bounds_connections() {
        let limits = Limits {
            time: Duration::from_millis(500),
            connections: 1,
            ..LIMITS
        };
        let server = server(limits).await;
        // A client that never ends its head holds the only place until its time is up.
        let started = std::time::Instant::now();
        let mut slow = TcpStream::connect(server.address).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("send");
        // Meanwhile another is closed at once, unanswered.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut refused = TcpStream::connect(server.address).await.expect("connect");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read_to_end(&mut answer))
            .await
            .expect("closed at once");
        assert!(
            matches!(&read, Ok(0))
                || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{read:?} {answer:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(500));
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer))
            .await
            .expect("the slow client is cut")
            .expect("read");
        assert!(answer.is_empty(), "{answer:?}");
        assert!(started.elapsed() >= Duration::from_millis(500));
        // Then the place is free again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let answer = exchange_bytes(server.address, b"GET /x HTTP/1.1\r\n\r\n", false).await;
        assert!(answer.ends_with("GET /x 0"), "{answer}");
        assert_eq!(server.echo.handled.load(Ordering::SeqCst), 1);
    }
}
