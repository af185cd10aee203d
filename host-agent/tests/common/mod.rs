//! Shared helpers of the agent's integration tests: temporary directories, a PKI made with the
//! gateway's own `pki` module, the real `fwnp-agent` binary as a child process, and a raw
//! local-API client that speaks the frames of `fwnp_proto::local` over the agent's Unix socket.
//! Every wait is bounded.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fwnp_proto::local::{
    FRAME_HEADER_LEN, LocalMessage, Status, Watch, decode_frame_body, encode_frame, frame_body_len,
};
use fwnp_proto::{
    Common, LeaseId, List, Message, Open, Opening, PortRange, Protocol, Release, Target,
};

pub(crate) mod scripted;

/// The bound of every single step (a start, an answer).
pub(crate) const STEP: Duration = Duration::from_secs(10);
pub(crate) use fwnp_testkit::pki::{GATEWAY_NAME, Pki};
pub(crate) use fwnp_testkit::process::ProcessGuard;
#[allow(unused_imports)]
pub(crate) use fwnp_testkit::temp_dir;
#[allow(unused_imports)]
pub(crate) use tempfile::TempDir;

/// The configuration text of an agent.
pub(crate) fn agent_config(
    pki: &Pki,
    host: &str,
    dir: &Path,
    gateway: &str,
    mode: &str,
    users: &str,
    grace: &str,
) -> String {
    format!(
        r#"state_dir = "{state}"

[gateway]
address = "{gateway}"
server_name = "{GATEWAY_NAME}"
certificate = "{cert}"
key = "{key}"
ca = "{ca}"

[local]
socket = "{socket}"
allowed_users = [{users}]
verify_port_owner = true
port_owner_grace = "{grace}"
# Short, so that a test can watch an earlier run's leases go.
earlier_run_grace = "3s"

[mirror]
mode = "{mode}"
table = "fwnp_host"
"#,
        state = dir.join("state").display(),
        cert = pki.file(&format!("{host}.pem")).display(),
        key = pki.file(&format!("{host}.key")).display(),
        ca = pki.file("ca.pem").display(),
        socket = dir.join("agent.sock").display(),
    )
}

/// The user id of this process (from `/proc/self/status`).
pub(crate) fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read status");
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("a Uid line")
}

/// Starts `command` (the agent, already configured) and waits until its socket accepts.
pub(crate) fn wait_for_socket(process: &mut ProcessGuard, socket: &Path) {
    fwnp_testkit::process::wait_for_socket(process, socket, STEP);
}

/// The agent binary with `--config`, logs to stderr.
pub(crate) fn agent_command(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fwnp-agent"));
    command
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null());
    command
}

/// A raw local-API client: frames of `fwnp_proto::local` over the agent's socket.
#[derive(Debug)]
pub(crate) struct LocalClient {
    pub(crate) stream: UnixStream,
    next_id: u64,
    /// Frames received while waiting for something else (events, other answers).
    pub(crate) backlog: Vec<LocalMessage>,
}

impl LocalClient {
    pub(crate) fn connect(socket: &Path) -> Self {
        Self::from_stream(UnixStream::connect(socket).expect("connect to the agent"))
    }

    /// A client over a stream connected already (perhaps by another process).
    pub(crate) fn from_stream(stream: UnixStream) -> Self {
        LocalClient {
            stream,
            next_id: 1,
            backlog: Vec::new(),
        }
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn send(&mut self, message: &LocalMessage) {
        self.stream
            .write_all(&encode_frame(message))
            .expect("write a frame");
    }

    /// The next frame within `within`; `None` on timeout; panics on a closed connection or a
    /// frame that does not decode.
    pub(crate) fn recv(&mut self, within: Duration) -> Option<LocalMessage> {
        self.stream.set_read_timeout(Some(within)).expect("timeout");
        let mut header = [0u8; FRAME_HEADER_LEN];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("reading from the agent: {e}"),
        }
        let len = frame_body_len(header).expect("a valid frame header from the agent");
        let mut body = vec![0u8; len];
        self.stream.set_read_timeout(Some(STEP)).expect("timeout");
        self.stream.read_exact(&mut body).expect("a whole frame");
        Some(decode_frame_body(&body).expect("the agent's frame decodes"))
    }

    /// Whether the agent closed the connection within `within`.
    pub(crate) fn closed_within(&mut self, within: Duration) -> bool {
        self.stream.set_read_timeout(Some(within)).expect("timeout");
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
    }

    /// Whether the agent closed the connection within `within`, discarding whatever it had
    /// sent before (answers this test does not read).
    pub(crate) fn closed_after_draining(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            match self.stream.read(&mut buffer) {
                Ok(0) => return true,
                Ok(_) => {}
                // A reset is a close too (the agent dropped unread requests).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// The answer to `request_id`, keeping other frames in the backlog.
    pub(crate) fn answer(&mut self, request_id: u64, within: Duration) -> LocalMessage {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.request_id() == Some(request_id))
        {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no answer to request {request_id} within {within:?}"
            );
            if let Some(message) = self.recv(left) {
                if message.request_id() == Some(request_id)
                    && !matches!(message, LocalMessage::Event(_))
                {
                    return message;
                }
                self.backlog.push(message);
            }
        }
    }

    /// Sends `message` (whose request id is set here) and returns its answer.
    pub(crate) fn request(&mut self, message: LocalMessage, within: Duration) -> LocalMessage {
        let id = message.request_id().expect("requests carry an id");
        self.send(&message);
        self.answer(id, within)
    }

    pub(crate) fn open(
        &mut self,
        protocol: Protocol,
        port: u16,
        lifetime: Option<u32>,
        within: Duration,
    ) -> LocalMessage {
        let id = self.next_id();
        self.request(open_msg(id, protocol, port, lifetime), within)
    }

    pub(crate) fn release(&mut self, lease: LeaseId) -> LocalMessage {
        let id = self.next_id();
        self.request(
            LocalMessage::Wire(Message::Release(Release {
                common: common(id),
                lease,
            })),
            STEP,
        )
    }

    pub(crate) fn list(&mut self) -> fwnp_proto::Leases {
        let id = self.next_id();
        match self.request(
            LocalMessage::Wire(Message::List(List { common: common(id) })),
            STEP,
        ) {
            LocalMessage::Wire(Message::Leases(leases)) => leases,
            other => panic!("List answered with {other:?}"),
        }
    }

    pub(crate) fn status(&mut self) -> fwnp_proto::local::StatusAnswer {
        let id = self.next_id();
        match self.request(LocalMessage::Status(Status { common: common(id) }), STEP) {
            LocalMessage::StatusAnswer(answer) => answer,
            other => panic!("Status answered with {other:?}"),
        }
    }

    pub(crate) fn watch(&mut self, lease: Option<LeaseId>) {
        let id = self.next_id();
        match self.request(
            LocalMessage::Watch(Watch {
                common: common(id),
                lease,
            }),
            STEP,
        ) {
            LocalMessage::Watching(_) => {}
            other => panic!("Watch answered with {other:?}"),
        }
    }

    /// The next Event (from the backlog first) within `within`.
    pub(crate) fn event(&mut self, within: Duration) -> Option<fwnp_proto::local::Event> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| matches!(m, LocalMessage::Event(_)))
            && let LocalMessage::Event(e) = self.backlog.remove(i)
        {
            return Some(e);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.recv(left)? {
                LocalMessage::Event(e) => return Some(e),
                other => self.backlog.push(other),
            }
        }
    }
}

pub(crate) fn common(id: u64) -> Common {
    Common {
        request_id: Some(id),
        critical: Vec::new(),
    }
}

/// An Open of the application id `app`.
pub(crate) fn open_app_msg(id: u64, app: &str, lifetime: Option<u32>) -> LocalMessage {
    LocalMessage::Wire(Message::Open(Open {
        common: common(id),
        opening: Opening {
            target: Target::App(app.to_owned()),
            host: fwnp_proto::HostAddresses::Default,
            family: None,
            remotes: Vec::new(),
        },
        lifetime,
        app: None,
    }))
}

pub(crate) fn open_msg(
    id: u64,
    protocol: Protocol,
    port: u16,
    lifetime: Option<u32>,
) -> LocalMessage {
    LocalMessage::Wire(Message::Open(Open {
        common: common(id),
        opening: Opening {
            target: Target::Ports {
                protocol,
                ports: PortRange::single(port),
            },
            host: fwnp_proto::HostAddresses::Default,
            family: None,
            remotes: Vec::new(),
        },
        lifetime,
        app: None,
    }))
}

/// A QUIC endpoint on 127.0.0.1 with the gateway's own TLS configuration and `pki`'s gateway
/// certificate, bound inside `runtime`: a stand-in gateway that the test drives itself.
pub(crate) fn gateway_endpoint(pki: &Pki, runtime: &tokio::runtime::Runtime) -> quinn::Endpoint {
    use fwnp_trust::tls::{ServerOptions, ServerTlsFiles, server_config_from_files};
    let _guard = runtime.enter();
    let files = ServerTlsFiles {
        cert: pki.file("gateway.pem"),
        key: pki.file("gateway.key"),
        ca: pki.file("ca.pem"),
        crl: None,
    };
    let config = server_config_from_files(&files, &ServerOptions::default()).expect("TLS");
    quinn::Endpoint::server(
        config,
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
    )
    .expect("bind the gateway endpoint")
}

/// Whether dnsmasq is here (Debian's dnsmasq-base, which scripts/deps.sh installs); skips
/// with a message otherwise, a failure under FWNP_REQUIRE_NETNS=1.
pub(crate) fn dnsmasq_available(test: &str) -> bool {
    if !fwnp_testkit::netns::require_root(test) {
        return false;
    }
    if Command::new("dnsmasq")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    let var = fwnp_testkit::netns::REQUIRE_NETNS_VAR;
    assert!(
        std::env::var(var).as_deref() != Ok("1"),
        "{test}: needs dnsmasq (apt-get install dnsmasq-base) and {var}=1 forbids skipping it"
    );
    eprintln!("{test}: skipped: dnsmasq is not installed (apt-get install dnsmasq-base)");
    false
}

/// A dnsmasq answering only from `records` (its `--srv-host=`, `--host-record=`... options) on
/// 127.0.0.1:53 of `ns`, UDP and TCP, once it listens; killed when dropped.
pub(crate) fn start_dnsmasq(ns: &fwnp_testkit::netns::Netns, records: &[&str]) -> ProcessGuard {
    let mut dnsmasq = ProcessGuard(Some(
        ns.spawn(
            Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--port=53",
                    "--pid-file=",
                    "--user=root",
                ])
                .args(records),
        )
        .expect("start dnsmasq"),
    ));
    let answering = fwnp_testkit::netns::wait_until(STEP, Duration::from_millis(50), || {
        ns.exec(&["ss", "-uln", "sport = :53"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("127.0.0.1:53"))
    });
    assert!(answering, "dnsmasq does not listen");
    assert!(
        dnsmasq
            .0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None))),
        "dnsmasq exited"
    );
    dnsmasq
}
