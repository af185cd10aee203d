//! Shared helpers of the gateway's integration tests: a PKI in a temporary directory, policy
//! files, a gateway [`Service`] served by a quinn endpoint on 127.0.0.1, a small FWNP client
//! (one request per bidirectional stream, notices from unidirectional streams) and a tiny
//! HTTP/1.1 client for the admin API's Unix socket. Every wait is bounded.
#![allow(dead_code)]

pub(crate) mod kernel;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::Service;
use fwnp_gateway::store::{AuditKind, AuditQuery, AuditRecord, Order};
use fwnp_proto::{
    Capabilities, Common, Hello, LeaseId, List, MAX_MESSAGE_SIZE, Message, Open, Opening,
    PortRange, Protocol, Release, Renew, Target, Welcome,
};
use fwnp_trust::tls::{self, ClientOptions, ClientTlsFiles, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

/// `service` serving QUIC on a loopback port with `options`: the endpoint, its address and the
/// serving task.
pub(crate) fn serve_on_loopback(
    pki: &Pki,
    service: &Arc<Service>,
    options: &ServerOptions,
) -> (quinn::Endpoint, SocketAddr, JoinHandle<()>) {
    let server_config =
        tls::server_config_from_files(&pki.server_files(), options).expect("server TLS config");
    let endpoint =
        quinn::Endpoint::server(server_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind the gateway endpoint");
    let addr = endpoint.local_addr().expect("gateway address");
    let serving = tokio::spawn(fwnp_gateway::server::serve(
        endpoint.clone(),
        service.clone(),
    ));
    (endpoint, addr, serving)
}

/// The bound of every single step of a test (a handshake, a request, an admin call).
pub(crate) const STEP: Duration = Duration::from_secs(10);
pub(crate) use fwnp_testkit::pki::{GATEWAY_NAME, Pki};
pub(crate) use fwnp_testkit::temp_dir;
pub(crate) use tempfile::TempDir;

/// A small policy: hosts named `fwnp://host/*` may open tcp/7000-7999, for 10 min by default,
/// at most 3 leases (tests derive narrower ones by replacing the range).
pub(crate) const HOSTS_POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_leases = 3

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// The policy most tests of the service and of its request core use: hosts named `fwnp://host/*` may open the https application and
/// tcp/udp 7000-7999 for 1 s to 1 h (default 10 min), at most 3 leases; telnet is denied by a
/// named rule; load balancers (`fwnp://host/lb-*`) may open tcp/8000-8999 for addresses in
/// 203.0.113.0/24 that they do not hold.
pub(crate) const POLICY: &str = r#"
[defaults]
lifetime = "10m"
min_lifetime = "1s"
max_lifetime = "1h"
max_leases = 3

[applications]
https = ["tcp/443", "udp/443"]

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[group]]
name = "balancers"
identities = ["fwnp://host/lb-*"]

[[rule]]
name = "no-telnet"
description = "telnet stays closed"
groups = ["hosts"]
deny = "tcp/23"

[[rule]]
name = "balancer-pool"
groups = ["balancers"]
allow = "tcp/8000-8999"
third_party = true
third_party_addresses = ["203.0.113.0/24"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = ["app:https", "tcp/7000-7999", "udp/7000-7999"]
"#;

/// A host's address (in its certificate, or its connection's source).
pub(crate) const HOST_A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// Another host's address.
pub(crate) const HOST_B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));

/// Writes a policy file (replacing it atomically, as an editor or a deployment tool would).
pub(crate) fn write_policy(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write policy");
    std::fs::rename(&tmp, path).expect("install policy");
}

/// The configuration file text of a gateway whose files live in `dir` and `pki`.
pub(crate) fn config_text(pki: &Pki, dir: &Path, listen: &str, filter: &str) -> String {
    format!(
        r#"listen = ["{listen}"]
certificate = "{cert}"
key = "{key}"
ca = "{ca}"
crl = "{crl}"
policy = "{policy}"
state_dir = "{state}"
admin_socket = "{admin}"

{filter}

[limits]
max_connections_per_identity = 4
max_streams = 16
request_timeout = "10s"
"#,
        cert = pki.file("gateway.pem").display(),
        key = pki.file("gateway.key").display(),
        ca = pki.file("ca.pem").display(),
        crl = pki.file("crl.pem").display(),
        policy = dir.join("policy.toml").display(),
        state = dir.join("state").display(),
        admin = dir.join("admin.sock").display(),
    )
}

/// How a [`TestGateway`] is started.
#[derive(Debug, Clone, Default)]
pub(crate) struct GatewayOptions {
    /// The QUIC and TLS options.
    pub(crate) server: ServerOptions,
    /// Replaces the configured request timeout (10 s).
    pub(crate) request_timeout: Option<Duration>,
    /// Replaces the configured connections per identity (4).
    pub(crate) max_connections_per_identity: Option<u32>,
    /// Replaces the handshakes per second and the burst per source address (50, 200).
    pub(crate) handshakes_per_source: Option<(u32, u32)>,
    /// Replaces the handshakes in progress above which sources get a Retry (64).
    pub(crate) retry_above_handshakes: Option<u32>,
    /// Replaces the interval of counted audit records (60 s).
    pub(crate) audit_count_interval: Option<Duration>,
    /// Replaces the audit export's sinks (none).
    pub(crate) audit: Option<fwnp_gateway::config::AuditConfig>,
}

/// A gateway service (filter disabled) served on 127.0.0.1 with its expiry timer and its admin
/// socket, all stopped when dropped.
#[derive(Debug)]
pub(crate) struct TestGateway {
    /// The service.
    pub(crate) service: Arc<Service>,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Its QUIC endpoint.
    pub(crate) endpoint: quinn::Endpoint,
    /// The CA of the deployment.
    pub(crate) pki: Pki,
    /// The policy file.
    pub(crate) policy_path: PathBuf,
    /// The admin API's socket.
    pub(crate) admin_socket: PathBuf,
    tasks: Vec<JoinHandle<()>>,
    dir: TempDir,
}

impl TestGateway {
    /// Starts a gateway with `policy` and default options.
    pub(crate) async fn start(label: &str, policy: &str) -> Self {
        Self::start_with(label, policy, GatewayOptions::default()).await
    }

    /// Starts a gateway with `policy` and `options`.
    pub(crate) async fn start_with(label: &str, policy: &str, options: GatewayOptions) -> Self {
        let pki = Pki::new(label);
        let dir = temp_dir(label);
        let policy_path = dir.path().join("policy.toml");
        write_policy(&policy_path, policy);
        let text = config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false");
        let mut config =
            GatewayConfig::parse(&text, "test-gateway.toml").expect("valid test config");
        if let Some(timeout) = options.request_timeout {
            config.limits.request_timeout = timeout;
        }
        if let Some(max) = options.max_connections_per_identity {
            config.limits.max_connections_per_identity = max;
        }
        if let Some((rate, burst)) = options.handshakes_per_source {
            config.limits.handshakes_per_source_per_second = rate;
            config.limits.handshake_burst_per_source = burst;
        }
        if let Some(above) = options.retry_above_handshakes {
            config.limits.retry_above_handshakes = above;
        }
        if let Some(interval) = options.audit_count_interval {
            config.limits.audit_count_interval = interval;
        }
        if let Some(audit) = options.audit.clone() {
            config.audit = audit;
        }
        let admin_socket = config.admin_socket.clone();
        let max_streams = config.limits.max_streams;
        let service = Service::start(config, None).await.expect("service starts");
        // The transport allows exactly the request streams Welcome announces, as the daemon.
        let server_options = ServerOptions {
            max_concurrent_bidi_streams: max_streams,
            ..options.server.clone()
        };
        let (endpoint, addr, serving) = serve_on_loopback(&pki, &service, &server_options);
        let mut tasks = vec![serving];
        tasks.push(tokio::spawn(service.clone().run_expiry()));
        {
            let service = service.clone();
            let path = admin_socket.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = fwnp_gateway::admin::serve(&path, service).await {
                    panic!("admin socket {}: {e}", path.display());
                }
            }));
        }
        // The admin socket is bound by the task just spawned: wait until it answers.
        let deadline = tokio::time::Instant::now() + STEP;
        while std::os::unix::net::UnixStream::connect(&admin_socket).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the admin socket never came up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        TestGateway {
            service,
            addr,
            endpoint,
            pki,
            policy_path,
            admin_socket,
            tasks,
            dir,
        }
    }

    /// The gateway's directory (policy, state, admin socket).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a host certificate from the gateway's CA and connects with it.
    pub(crate) async fn host(&self, name: &str, ips: &[IpAddr]) -> Client {
        // A second connection of the same host reuses its certificate.
        let files = if self.pki.file(&format!("{name}.pem")).exists() {
            self.pki.host_files(name)
        } else {
            self.pki.host(name, ips, &[], &[])
        };
        Client::connect(self.addr, &files).await
    }

    /// Issues a host certificate and connects, then sends Hello (with NOTICES).
    pub(crate) async fn welcomed_host(&self, name: &str, ips: &[IpAddr]) -> (Client, Welcome) {
        let client = self.host(name, ips).await;
        let welcome = client.hello().await;
        (client, welcome)
    }

    /// One admin API call.
    pub(crate) async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        admin_request(&self.admin_socket, method, path, body).await
    }

    /// The audit records of `kind` (oldest first), straight from the store.
    pub(crate) fn audit(&self, kinds: &[AuditKind], lease: Option<LeaseId>) -> Vec<AuditRecord> {
        let query = AuditQuery {
            kinds: kinds.to_vec(),
            lease,
            order: Order::OldestFirst,
            limit: 1000,
            ..AuditQuery::default()
        };
        self.service
            .store()
            .audit(&query)
            .expect("audit query")
            .events
    }

    /// Polls the audit trail until `accept` holds for its records of `kinds`, at most [`STEP`].
    pub(crate) async fn wait_audit(
        &self,
        kinds: &[AuditKind],
        lease: Option<LeaseId>,
        mut accept: impl FnMut(&[AuditRecord]) -> bool,
    ) -> Vec<AuditRecord> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let records = self.audit(kinds, lease);
            if accept(&records) {
                return records;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the audit trail never showed what was expected; it has: {:#?}",
                records.iter().map(AuditRecord::to_json).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"test over");
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What became of one request stream.
#[derive(Debug)]
pub(crate) enum Exchange {
    /// The answer's bytes.
    Answer(Vec<u8>),
    /// The gateway reset the stream with this code.
    Reset(u64),
    /// The gateway asked the client to stop sending with this code.
    Stopped(u64),
    /// The connection ended.
    ConnectionLost(quinn::ConnectionError),
    /// No answer within [`STEP`].
    TimedOut,
    /// Something else went wrong.
    Other(String),
}

/// A host's connection to a gateway: requests on bidirectional streams, notices collected from
/// unidirectional streams.
#[derive(Debug)]
pub(crate) struct Client {
    /// The client's endpoint.
    pub(crate) endpoint: quinn::Endpoint,
    /// The connection.
    pub(crate) connection: quinn::Connection,
    notices: Mutex<mpsc::UnboundedReceiver<Message>>,
    notice_task: JoinHandle<()>,
    next_id: AtomicU64,
}

impl Client {
    /// Connects from an endpoint on 127.0.0.1 with the host's files.
    pub(crate) async fn connect(gateway: SocketAddr, files: &ClientTlsFiles) -> Client {
        Self::try_connect(gateway, files)
            .await
            .expect("the gateway accepted the connection")
    }

    /// Connects from an endpoint on 127.0.0.1; the error when the handshake fails.
    pub(crate) async fn try_connect(
        gateway: SocketAddr,
        files: &ClientTlsFiles,
    ) -> Result<Client, quinn::ConnectionError> {
        let endpoint = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind client");
        let config = tls::client_config_from_files(files, &ClientOptions::default())
            .expect("client TLS config");
        Self::connect_on(endpoint, config, gateway).await
    }

    /// Connects from a UDP socket created by the caller (for example inside a network namespace).
    pub(crate) async fn connect_from_socket(
        socket: std::net::UdpSocket,
        gateway: SocketAddr,
        files: &ClientTlsFiles,
    ) -> Result<Client, quinn::ConnectionError> {
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .expect("client endpoint on the given socket");
        let config = tls::client_config_from_files(files, &ClientOptions::default())
            .expect("client TLS config");
        Self::connect_on(endpoint, config, gateway).await
    }

    /// Connects on `endpoint` with `config`.
    pub(crate) async fn connect_on(
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        gateway: SocketAddr,
    ) -> Result<Client, quinn::ConnectionError> {
        let connecting = endpoint
            .connect_with(config, gateway, GATEWAY_NAME)
            .expect("start connecting");
        let connection = tokio::time::timeout(STEP, connecting)
            .await
            .expect("handshake timed out")?;
        // A TLS 1.3 client finishes before the gateway has judged its certificate: a refusal
        // then arrives as a close right after. Wait a moment so that callers see it.
        if let Ok(reason) =
            tokio::time::timeout(Duration::from_millis(200), connection.closed()).await
        {
            return Err(reason);
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let notice_connection = connection.clone();
        let notice_task = tokio::spawn(async move {
            while let Ok(mut stream) = notice_connection.accept_uni().await {
                let sender = sender.clone();
                tokio::spawn(async move {
                    if let Ok(bytes) = stream.read_to_end(MAX_MESSAGE_SIZE).await {
                        match fwnp_proto::codec::decode(&bytes) {
                            Ok(message) => {
                                let _ = sender.send(message);
                            }
                            Err(e) => panic!("undecodable notice: {e}"),
                        }
                    }
                });
            }
        });
        Ok(Client {
            endpoint,
            connection,
            notices: Mutex::new(receiver),
            notice_task,
            next_id: AtomicU64::new(1),
        })
    }

    /// A fresh request id.
    pub(crate) fn next_id(&self) -> Option<u64> {
        Some(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends `bytes` as one request (then FIN) and reads the answer to its FIN.
    pub(crate) async fn exchange(&self, bytes: &[u8]) -> Exchange {
        let exchange = async {
            let (mut send, mut recv) = match self.connection.open_bi().await {
                Ok(streams) => streams,
                Err(e) => return Exchange::ConnectionLost(e),
            };
            match send.write_all(bytes).await {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(code)) => {
                    // Read on: the reset that goes with STOP_SENDING tells the whole story.
                    return match recv.read_to_end(MAX_MESSAGE_SIZE).await {
                        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(reset))) => {
                            Exchange::Reset(reset.into_inner())
                        }
                        _ => Exchange::Stopped(code.into_inner()),
                    };
                }
                Err(quinn::WriteError::ConnectionLost(e)) => return Exchange::ConnectionLost(e),
                Err(e) => return Exchange::Other(e.to_string()),
            }
            let _ = send.finish();
            match recv.read_to_end(MAX_MESSAGE_SIZE).await {
                Ok(bytes) => Exchange::Answer(bytes),
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                    Exchange::Reset(code.into_inner())
                }
                Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => {
                    Exchange::ConnectionLost(e)
                }
                Err(e) => Exchange::Other(e.to_string()),
            }
        };
        tokio::time::timeout(STEP, exchange)
            .await
            .unwrap_or(Exchange::TimedOut)
    }

    /// Sends raw bytes and decodes the answer; panics when there is none.
    pub(crate) async fn request_bytes(&self, bytes: &[u8]) -> Message {
        match self.exchange(bytes).await {
            Exchange::Answer(answer) => {
                fwnp_proto::codec::decode(&answer).expect("the answer decodes")
            }
            other => panic!("no answer: {other:?}"),
        }
    }

    /// Sends one message and returns the answer; panics when there is none.
    pub(crate) async fn request(&self, message: &Message) -> Message {
        self.request_bytes(&fwnp_proto::codec::encode(message))
            .await
    }

    /// Hello with version 1 and every capability; panics unless the answer is Welcome.
    pub(crate) async fn hello(&self) -> Welcome {
        match self
            .request(&hello_msg(self.next_id(), &[1], Capabilities::ALL))
            .await
        {
            Message::Welcome(welcome) => welcome,
            other => panic!("Hello answered with {other:?}"),
        }
    }

    /// Open of `opening` with `lifetime`.
    pub(crate) async fn open(&self, opening: Opening, lifetime: Option<u32>) -> Message {
        self.request(&open_msg(self.next_id(), opening, lifetime))
            .await
    }

    /// Renew of `lease` asking `lifetime`.
    pub(crate) async fn renew(&self, lease: LeaseId, lifetime: Option<u32>) -> Message {
        self.request(&Message::Renew(Renew {
            common: common(self.next_id()),
            lease,
            lifetime,
        }))
        .await
    }

    /// Release of `lease`.
    pub(crate) async fn release(&self, lease: LeaseId) -> Message {
        self.request(&Message::Release(Release {
            common: common(self.next_id()),
            lease,
        }))
        .await
    }

    /// List; panics unless the answer is Leases.
    pub(crate) async fn list(&self) -> fwnp_proto::Leases {
        match self
            .request(&Message::List(List {
                common: common(self.next_id()),
            }))
            .await
        {
            Message::Leases(leases) => leases,
            other => panic!("List answered with {other:?}"),
        }
    }

    /// The next notice, waiting at most `within`.
    pub(crate) async fn next_notice(&self, within: Duration) -> Option<Message> {
        let mut notices = self.notices.lock().await;
        tokio::time::timeout(within, notices.recv())
            .await
            .ok()
            .flatten()
    }

    /// How the connection ended, waiting at most `within`.
    pub(crate) async fn closed_within(&self, within: Duration) -> Option<quinn::ConnectionError> {
        tokio::time::timeout(within, self.connection.closed())
            .await
            .ok()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.notice_task.abort();
        self.connection.close(quinn::VarInt::from_u32(0), b"done");
    }
}

/// Common keys with a request id.
pub(crate) fn common(request_id: Option<u64>) -> Common {
    Common {
        request_id,
        critical: Vec::new(),
    }
}

/// A Hello message.
pub(crate) fn hello_msg(request_id: Option<u64>, versions: &[u16], capabilities: u64) -> Message {
    Message::Hello(Hello {
        common: common(request_id),
        versions: versions.to_vec(),
        capabilities: Capabilities(capabilities),
        software: Some("fwnp-gateway-tests".into()),
    })
}

/// An Open message.
pub(crate) fn open_msg(
    request_id: Option<u64>,
    opening: Opening,
    lifetime: Option<u32>,
) -> Message {
    Message::Open(Open {
        common: common(request_id),
        opening,
        lifetime,
        app: None,
    })
}

/// An opening of one port of `protocol`, on the host's default address.
pub(crate) fn port(protocol: Protocol, port: u16) -> Opening {
    Opening {
        target: Target::Ports {
            protocol,
            ports: PortRange::single(port),
        },
        host: fwnp_proto::HostAddresses::Default,
        family: None,
        remotes: Vec::new(),
    }
}

/// An opening of one TCP port.
pub(crate) fn tcp(p: u16) -> Opening {
    port(Protocol::Tcp, p)
}

/// An opening of an application id.
pub(crate) fn app(id: &str) -> Opening {
    Opening {
        target: Target::App(id.into()),
        host: fwnp_proto::HostAddresses::Default,
        family: None,
        remotes: Vec::new(),
    }
}

/// The Granted of a message; panics with the message otherwise.
pub(crate) fn granted(message: Message) -> fwnp_proto::Granted {
    match message {
        Message::Granted(granted) => granted,
        other => panic!("expected Granted, got {other:?}"),
    }
}

/// The Denied of a message; panics with the message otherwise.
pub(crate) fn denied(message: Message) -> fwnp_proto::Denied {
    match message {
        Message::Denied(denied) => denied,
        other => panic!("expected Denied, got {other:?}"),
    }
}

/// The application error code of a closed connection, if it was closed by the peer's
/// application.
pub(crate) fn application_close_code(error: &quinn::ConnectionError) -> Option<u64> {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

/// One HTTP/1.1 request on the admin API's Unix socket; the status and the JSON body
/// (`Value::Null` for a body that is not JSON).
pub(crate) async fn admin_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let call = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect to the admin socket");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: fwnp\r\nConnection: close\r\n");
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the admin request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read the admin response");
        response
    };
    let response = tokio::time::timeout(STEP, call)
        .await
        .expect("the admin API answered in time");
    parse_http_response(&response)
}

fn parse_http_response(response: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `fwnpctl ... --follow` running against a gateway's admin socket, its standard output read
/// line by line; killed when dropped.
pub(crate) struct Follower {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Follower {
    pub(crate) fn start(admin: &Path, args: &[&str]) -> Follower {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fwnpctl"))
            .arg("--admin")
            .arg(admin)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run fwnpctl");
        let stdout = child.stdout.take().expect("its output");
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// The next line it prints, if one comes within `within`.
    pub(crate) async fn line(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.lines.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
