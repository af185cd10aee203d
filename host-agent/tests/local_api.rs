//! The local API of the real `fwnp-agent` binary over its real Unix socket, without a gateway
//! (its address answers nothing) and without the kernel (mirror mode off): framing, Status,
//! List, Watch, Release of an unknown lease, malformed frames, who may use the agent, and port
//! owner verification (the caller's own port, a port bound by another process, nobody). No root
//! needed.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use fwnp_proto::local::{DenialCode, LocalCode, LocalMessage, TYPE_WATCH};
use fwnp_proto::{LeaseId, Protocol, ResultCode};

/// An agent started for one test, with its directory.
struct Agent {
    process: ProcessGuard,
    socket: PathBuf,
    _pki: Pki,
    _dir: TempDir,
}

impl Agent {
    fn start(label: &str, users: &str, grace: &str) -> Agent {
        let dir = temp_dir(label);
        let pki = Pki::new(label, &[]);
        pki.host("web-01", &[]);
        // Port 9 on loopback: nothing answers QUIC there, so the gateway is unreachable.
        let text = agent_config(
            &pki,
            "web-01",
            dir.path(),
            "127.0.0.1:9",
            "off",
            users,
            grace,
        );
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, text).expect("write config");
        let socket = dir.path().join("agent.sock");
        let mut process = ProcessGuard(Some(
            agent_command(&config).spawn().expect("start fwnp-agent"),
        ));
        wait_for_socket(&mut process, &socket);
        Agent {
            process,
            socket,
            _pki: pki,
            _dir: dir,
        }
    }

    fn client(&self) -> LocalClient {
        LocalClient::connect(&self.socket)
    }
}

fn denial(message: &LocalMessage) -> (DenialCode, String) {
    match message {
        LocalMessage::Denied(d) => (d.code, d.reason.clone().unwrap_or_default()),
        other => panic!("expected a Denied, got {other:?}"),
    }
}

#[test]
fn status_list_watch_and_unknown_release() {
    let agent = Agent::start("status", &my_uid().to_string(), "1s");
    let mut client = agent.client();
    let status = client.status();
    assert!(!status.connected);
    assert_eq!(status.mirror_mode, "off");
    assert_eq!(status.gateway, "127.0.0.1:9");
    assert_eq!(status.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.leases, 0);
    assert_eq!(status.identity, None);

    let leases = client.list();
    assert!(leases.leases.is_empty());
    client.watch(None);

    let (code, reason) = denial(&client.release(LeaseId([7; 16])));
    assert_eq!(code, DenialCode::Local(LocalCode::UnknownLocalLease));
    assert!(reason.contains("07070707"), "{reason}");
}

#[test]
fn own_port_is_verified_then_the_missing_gateway_refuses() {
    let agent = Agent::start("own", &my_uid().to_string(), "1s");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut client = agent.client();
    let (code, reason) = denial(&client.open(Protocol::Tcp, port, Some(60), STEP));
    assert_eq!(
        code,
        DenialCode::Local(LocalCode::GatewayUnreachable),
        "{reason}"
    );
    assert!(reason.contains("127.0.0.1:9"), "{reason}");
}

#[test]
fn a_port_nobody_binds_is_refused_after_the_grace_period() {
    let agent = Agent::start("nobody", &my_uid().to_string(), "300ms");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let mut client = agent.client();
    let (code, reason) = denial(&client.open(Protocol::Udp, port, None, STEP));
    assert_eq!(code, DenialCode::Local(LocalCode::PortNotOwned));
    assert!(
        reason.contains(&format!("nobody listens on udp/{port}")),
        "{reason}"
    );
}

/// Runs the helper below in a child process (this test binary again) that asks for `port`.
fn ask_from_child(socket: &Path, port: u16, uid: Option<u32>) -> (u64, String) {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "helper_ask_for_port",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FWNP_TEST_SOCKET", socket)
        .env("FWNP_TEST_PORT", port.to_string());
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(uid);
    }
    let output = command.output().expect("run the helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("ANSWER ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "the helper printed no answer: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let (code, reason) = line.split_once(' ').unwrap_or((line, ""));
    (code.parse().expect("a code"), reason.to_owned())
}

/// Not a test on its own: the child side of [`ask_from_child`].
#[test]
#[ignore = "helper run by other tests in a child process"]
fn helper_ask_for_port() {
    let (Ok(socket), Ok(port)) = (
        std::env::var("FWNP_TEST_SOCKET"),
        std::env::var("FWNP_TEST_PORT"),
    ) else {
        return;
    };
    let mut client = LocalClient::connect(Path::new(&socket));
    let answer = client.open(Protocol::Tcp, port.parse().expect("port"), Some(60), STEP);
    match answer {
        LocalMessage::Denied(d) => {
            println!(
                "ANSWER {} {}",
                d.code.number(),
                d.reason.unwrap_or_default()
            )
        }
        other => println!("ANSWER 0 {other:?}"),
    }
}

#[test]
fn a_port_bound_by_another_process_is_refused_naming_it() {
    let agent = Agent::start("other", &my_uid().to_string(), "1s");
    // This process binds the port; a child of it asks: the binder is not the child's.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (code, reason) = ask_from_child(&agent.socket, port, None);
    assert_eq!(code, LocalCode::PortNotOwned.number(), "{reason}");
    let me = std::process::id();
    assert!(
        reason.contains(&format!("tcp/{port} is bound by pid {me} ("))
            && reason.contains("not by the caller"),
        "{reason}"
    );
}

#[test]
fn a_caller_outside_the_allowed_users_is_refused() {
    let me = my_uid();
    // Allow only a uid that is not the caller's.
    let agent = Agent::start("unauthorized", &(me + 4242).to_string(), "1s");
    if me == 0 {
        // Root may always use the agent: ask from a child running as nobody.
        let (code, reason) = ask_from_child(&agent.socket, 1, Some(65534));
        assert_eq!(code, LocalCode::AgentNotAuthorized.number(), "{reason}");
        assert!(reason.contains("uid 65534"), "{reason}");
    } else {
        let mut client = agent.client();
        let (code, reason) = denial(&client.open(Protocol::Tcp, 1, None, STEP));
        assert_eq!(code, DenialCode::Local(LocalCode::AgentNotAuthorized));
        assert!(reason.contains(&format!("uid {me}")), "{reason}");
    }
}

#[test]
fn malformed_frames_are_answered_or_close_the_connection() {
    use std::io::Write;
    let agent = Agent::start("malformed", &my_uid().to_string(), "1s");

    // An Open without its opening, request id 77: Denied malformed-request, id echoed.
    let mut client = agent.client();
    let body = [0xa2, 0x00, 0x03, 0x01, 0x18, 0x4d];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    client.stream.write_all(&frame).expect("write");
    let (code, reason) = denial(&client.answer(77, STEP));
    assert_eq!(code, DenialCode::Wire(ResultCode::MalformedRequest));
    assert!(reason.contains("key 3"), "{reason}");

    // A Watch whose lease id is 3 bytes: Denied, and the connection stays usable.
    let body = [
        0xa3,
        0x00,
        0x18,
        TYPE_WATCH as u8,
        0x01,
        0x05,
        0x03,
        0x43,
        1,
        2,
        3,
    ];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    client.stream.write_all(&frame).expect("write");
    let (code, _) = denial(&client.answer(5, STEP));
    assert_eq!(code, DenialCode::Wire(ResultCode::MalformedRequest));
    assert!(!client.status().connected);

    // An item that is not a map: no request id to answer, so the connection is closed.
    client
        .stream
        .write_all(&[0, 0, 0, 2, 0x81, 0x01])
        .expect("write");
    assert!(
        client.closed_within(STEP),
        "the agent should close the connection"
    );

    // A header announcing more than 16 KiB: closed at once.
    let mut client = agent.client();
    client.stream.write_all(&[0, 0, 0x40, 0x01]).expect("write");
    assert!(client.closed_within(STEP));

    // The agent still serves others.
    assert!(!agent.client().status().connected);
    let mut agent = agent;
    assert!(agent.process.exited().is_none(), "the agent survived");
}

/// An Open whose key 4 names several host addresses: checked by the agent like any opening, then
/// forwarded as it is (here to an unreachable gateway); one naming an address twice is refused
/// by the agent itself with malformed-option, without asking the gateway.
#[test]
fn an_open_naming_several_addresses_is_checked_then_forwarded() {
    let agent = Agent::start("addresses", &my_uid().to_string(), "1s");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut client = agent.client();
    let with_hosts = |client: &mut LocalClient, hosts: &[&str]| {
        let mut message = open_msg(client.next_id(), Protocol::Tcp, port, Some(60));
        if let LocalMessage::Wire(fwnp_proto::Message::Open(open)) = &mut message {
            open.opening.host = fwnp_proto::HostAddresses::List(
                hosts
                    .iter()
                    .map(|h| h.parse().expect("an address"))
                    .collect(),
            );
        }
        message
    };

    let both = with_hosts(&mut client, &["192.0.2.10", "2001:db8::10"]);
    let (code, reason) = denial(&client.request(both, STEP));
    assert_eq!(
        code,
        DenialCode::Local(LocalCode::GatewayUnreachable),
        "{reason}"
    );

    let twice = with_hosts(&mut client, &["192.0.2.10", "192.0.2.10"]);
    let (code, reason) = denial(&client.request(twice, STEP));
    assert_eq!(
        code,
        DenialCode::Wire(ResultCode::MalformedOption),
        "{reason}"
    );
    assert!(reason.contains("named twice"), "{reason}");
}
