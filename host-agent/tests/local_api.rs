//! The local API of the real `fwnp-agent` binary over its real Unix socket, without a gateway
//! (its address answers nothing) and without the kernel (mirror mode off): framing, Status,
//! List, Watch, Release of an unknown lease, malformed frames, who may use the agent, and port
//! owner verification (the caller's own port, a port bound by another process, nobody). With a
//! scripted gateway that merges identical Opens as FWNP's does: the leases several Opens hold.
//! No root needed.

mod common;

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scripted::{
    Conduct, LeaseTable, Reply, Terms, lock, spawn_gateway, start_agent, wait_connected_to,
};
use common::*;
use fwnp_proto::codec::DecodeError;
use fwnp_proto::local::{DenialCode, LocalCode, LocalMessage, TYPE_WATCH, encode_frame};
use fwnp_proto::{Granted, LeaseId, Message, Protocol, ResultCode};

/// An agent started for one test, with its directory.
struct Agent {
    process: ProcessGuard,
    socket: PathBuf,
    _pki: Pki,
    _dir: TempDir,
}

impl Agent {
    fn start(label: &str, users: &str, grace: &str) -> Agent {
        Self::start_with(label, users, grace, "", |command| command)
    }

    /// With `extra` lines in `[local]`, and the agent's command changed by `wrap` (a command
    /// that runs it under other limits).
    fn start_with(
        label: &str,
        users: &str,
        grace: &str,
        extra: &str,
        wrap: impl FnOnce(Command) -> Command,
    ) -> Agent {
        let dir = temp_dir(label);
        let pki = Pki::with_gateway_ips(label, &[]);
        pki.host("web-01", &[], &[], &[]);
        // Port 9 on loopback: nothing answers QUIC there, so the gateway is unreachable.
        let text = agent_config(
            &pki,
            "web-01",
            dir.path(),
            "127.0.0.1:9",
            "off",
            users,
            grace,
        )
        .replace("[mirror]", &format!("{extra}\n\n[mirror]"));
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, text).expect("write config");
        let socket = dir.path().join("agent.sock");
        let mut process = ProcessGuard(Some(
            wrap(agent_command(&config))
                .spawn()
                .expect("start fwnp-agent"),
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
    // Key 11: the local API version the agent implements.
    assert_eq!(status.api_version, Some(fwnp_proto::local::API_VERSION));

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
        // Root may always use the agent: ask from a child running as nobody, let through the
        // socket's permissions so that the peer credentials are what refuses it.
        let_in(&agent.socket, 65534);
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

    // A request of the largest size listing some 5,000 unknown critical keys: its Denied
    // still fits in a frame (local API 3), listing the smallest keys, with a reason within
    // the schema's 512 bytes.
    let request = |last: u64| {
        let critical = (256..last)
            .map(|k| ciborium::Value::Integer(k.into()))
            .collect();
        let map = ciborium::Value::Map(vec![
            (0.into(), 6.into()),
            (1.into(), 9.into()),
            (2.into(), ciborium::Value::Array(critical)),
        ]);
        let mut body = Vec::new();
        ciborium::into_writer(&map, &mut body).expect("encode");
        body
    };
    let mut last = 5_256;
    while request(last + 1).len() <= fwnp_proto::MAX_MESSAGE_SIZE {
        last += 1;
    }
    let body = request(last);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    client.stream.write_all(&frame).expect("write");
    let LocalMessage::Denied(denied) = client.answer(9, STEP) else {
        panic!("not a Denied");
    };
    assert_eq!(denied.code, DenialCode::Wire(ResultCode::UnsupportedOption));
    assert!(
        denied.unsupported.len() > 4_000,
        "{}",
        denied.unsupported.len()
    );
    assert_eq!(denied.unsupported[0], 256);
    assert!(denied.reason.is_some_and(|r| r.len() <= 512));
    assert!(!client.status().connected, "the connection stays usable");

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

/// `command` run under `prlimit --nofile=SOFT:HARD`, with its arguments and environment.
fn under_nofile(limits: &'static str) -> impl FnOnce(Command) -> Command {
    move |inner| {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={limits}"))
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(std::process::Stdio::null());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command
    }
}

/// The soft and hard open-file limits of process `pid`.
fn nofile_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[3].to_owned(), words[4].to_owned())
}

/// Runs a helper of this test binary in a child process, as `uid` if given.
fn helper(name: &str, socket: &Path, uid: Option<u32>, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FWNP_TEST_SOCKET", socket);
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(uid);
    }
    command
}

#[test]
fn a_caller_whose_pid_was_reused_is_refused() {
    if !fwnp_testkit::netns::require_root("a_caller_whose_pid_was_reused_is_refused") {
        return;
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let agent = Agent::start("pidreuse", &my_uid().to_string(), "1s");
    // A child connects through a socket this process keeps, asks once (so that the agent has
    // seen it), and exits.
    let kept = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a Unix socket");
    let for_child = kept.try_clone().expect("dup");
    let mut child = helper("helper_connect_ask_and_exit", &agent.socket, None, &[])
        .stdin(std::process::Stdio::from(for_child))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run the helper");
    let exited = child.wait().expect("wait for the helper");
    assert!(exited.success(), "the helper failed: {exited}");
    let gone = child.id();

    // Another process gets the same pid and serves a port: the agent must not take it for the
    // process that connected.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut listener = Some(listener);
    let mut server = None;
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (gone - 1).to_string())
            .expect("write ns_last_pid");
        let fd = std::os::fd::OwnedFd::from(listener.take().expect("the listener"));
        let copy = fd.try_clone().expect("dup");
        let candidate = ProcessGuard(Some(
            Command::new("sleep")
                .arg("30")
                .stdin(std::process::Stdio::from(fd))
                .spawn()
                .expect("start sleep"),
        ));
        if candidate.pid() == gone {
            server = Some(candidate);
            break;
        }
        listener = Some(TcpListener::from(copy));
    }
    let _server = server.expect("no process got the reused pid in 200 tries");
    drop(listener);

    let mut client = LocalClient::from_stream(std::os::unix::net::UnixStream::from(kept));
    let (code, reason) = denial(&client.open(Protocol::Tcp, port, Some(60), STEP));
    assert_eq!(code, DenialCode::Local(LocalCode::PortNotOwned), "{reason}");
    assert!(
        reason.contains(&format!("pid {gone}")) && reason.contains("exited"),
        "{reason}"
    );
}

/// Not a test on its own: connects its standard input (an unconnected Unix socket) to the
/// agent, asks for the Status, and exits.
#[test]
#[ignore = "helper run by other tests in a child process"]
fn helper_connect_ask_and_exit() {
    use std::os::fd::{AsFd, AsRawFd};
    let Ok(socket) = std::env::var("FWNP_TEST_SOCKET") else {
        return;
    };
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .expect("standard input");
    let address = nix::sys::socket::UnixAddr::new(Path::new(&socket)).expect("address");
    nix::sys::socket::connect(fd.as_raw_fd(), &address).expect("connect");
    let mut client = LocalClient::from_stream(std::os::unix::net::UnixStream::from(fd));
    assert!(!client.status().connected);
}

#[test]
fn a_client_that_does_not_read_is_closed_and_others_are_served() {
    use std::io::Write;
    let agent = Agent::start_with(
        "noread",
        &my_uid().to_string(),
        "1s",
        "max_output_bytes = 16388",
        |c| c,
    );
    let mut flood = agent.client();
    flood
        .stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // List requests, pipelined, never reading an answer.
    let list = LocalMessage::Wire(Message::List(fwnp_proto::List { common: common(1) }));
    let batch: Vec<u8> = std::iter::repeat_n(encode_frame(&list), 1000)
        .flatten()
        .collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < 300 && started.elapsed() < STEP {
        if flood.stream.write_all(&batch).is_err() {
            break;
        }
        sent += 1;
    }
    // Meanwhile another client is answered at once.
    let asked = Instant::now();
    assert!(!agent.client().status().connected);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        flood.closed_after_draining(STEP),
        "the agent kept a client that reads nothing (sent {sent} thousand requests)"
    );
    let rss = rss_kib(agent.process.pid());
    assert!(rss < 64 * 1024, "the agent grew to {rss} KiB");
}

/// The resident size of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a VmRSS line")
}

#[test]
fn an_unauthorized_peer_gets_one_answer_and_is_closed() {
    if !fwnp_testkit::netns::require_root_for(
        "an_unauthorized_peer_gets_one_answer_and_is_closed",
        "running a child as another user",
    ) {
        return;
    }
    let agent = Agent::start("unauthclose", "4242", "1s");
    let_in(&agent.socket, 65534);
    let output = helper("helper_unauthorized", &agent.socket, Some(65534), &[])
        .output()
        .expect("run the helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "ANSWER {}",
            LocalCode::AgentNotAuthorized.number()
        )),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("CLOSED after the answer"), "{stdout}");
    assert!(stdout.contains("CLOSED when silent"), "{stdout}");
}

/// Not a test on its own: as a user the agent does not allow, asks once and checks that the
/// connection is closed after the answer; then connects and sends nothing.
#[test]
#[ignore = "helper run by other tests in a child process"]
fn helper_unauthorized() {
    let Ok(socket) = std::env::var("FWNP_TEST_SOCKET") else {
        return;
    };
    let mut client = LocalClient::connect(Path::new(&socket));
    let id = client.next_id();
    let status = LocalMessage::Status(fwnp_proto::local::Status { common: common(id) });
    if let LocalMessage::Denied(d) = client.request(status, STEP) {
        println!("ANSWER {}", d.code.number());
    }
    if client.closed_within(STEP) {
        println!("CLOSED after the answer");
    }
    let mut silent = LocalClient::connect(Path::new(&socket));
    if silent.closed_within(STEP) {
        println!("CLOSED when silent");
    }
}

/// Adds `uid` to the socket's ACL, as an operator could by mistake: the peer-credential check
/// still refuses it (local API 2, 8).
fn let_in(socket: &Path, uid: u32) {
    let mut acl = posix_acl::PosixACL::read_acl(socket).expect("the socket's ACL");
    acl.set(
        posix_acl::Qualifier::User(uid),
        posix_acl::ACL_READ | posix_acl::ACL_WRITE,
    );
    acl.write_acl(socket).expect("widen the socket's ACL");
}

/// Local API 2: the socket's permissions let exactly the configured users and groups connect.
/// With two users allowed, its mode gives nobody else anything and its ACL names them; a user
/// it does not name cannot even connect, one it names can and is answered.
#[test]
fn the_socket_lets_only_the_allowed_users_connect() {
    if !fwnp_testkit::netns::require_root_for(
        "the_socket_lets_only_the_allowed_users_connect",
        "running a child as another user",
    ) {
        return;
    }
    let agent = Agent::start("acl", "4242, 4343", "1s");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket)
        .expect("the socket")
        .permissions()
        .mode();
    // With named entries, the mode's group bits show the ACL's mask; others get nothing.
    assert_eq!(mode & 0o007, 0, "others get nothing: {mode:o}");
    let acl = posix_acl::PosixACL::read_acl(&agent.socket).expect("the socket's ACL");
    let rw = posix_acl::ACL_READ | posix_acl::ACL_WRITE;
    for uid in [4242, 4343] {
        assert_eq!(
            acl.get(posix_acl::Qualifier::User(uid)),
            Some(rw),
            "{}",
            acl.as_text()
        );
    }
    assert_eq!(acl.get(posix_acl::Qualifier::GroupObj), Some(0));
    assert_eq!(acl.get(posix_acl::Qualifier::User(65534)), None);

    let connect = |uid| {
        let output = helper("helper_connect", &agent.socket, Some(uid), &[])
            .output()
            .expect("run the helper");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let nobody = connect(65534);
    assert!(nobody.contains("CONNECT PermissionDenied"), "{nobody}");
    let allowed = connect(4242);
    assert!(allowed.contains("CONNECT ok connected=false"), "{allowed}");
}

/// Not a test on its own: connects to the socket as the user it runs as, and says how that
/// went (and, connected, whether the agent is connected to its gateway).
#[test]
#[ignore = "helper run by other tests in a child process"]
fn helper_connect() {
    let Ok(socket) = std::env::var("FWNP_TEST_SOCKET") else {
        return;
    };
    match std::os::unix::net::UnixStream::connect(&socket) {
        Err(e) => println!("CONNECT {:?}", e.kind()),
        Ok(stream) => {
            drop(stream);
            let mut client = LocalClient::connect(Path::new(&socket));
            println!("CONNECT ok connected={}", client.status().connected);
        }
    }
}

#[test]
fn connections_are_capped_per_user_and_idle_ones_closed() {
    let agent = Agent::start_with(
        "caps",
        &my_uid().to_string(),
        "1s",
        "max_connections_per_user = 4\nidle_timeout = \"2s\"",
        |c| c,
    );
    // The connection that saw the socket appear at start must be gone before counting.
    std::thread::sleep(Duration::from_millis(300));
    let mut held: Vec<LocalClient> = (0..4).map(|_| agent.client()).collect();
    for client in &mut held {
        assert!(!client.status().connected);
    }
    // The fifth of the same user is closed at once.
    let mut fifth = agent.client();
    assert!(fifth.closed_within(STEP), "a fifth connection was kept");
    // Those that hold no lease and say nothing are closed after the idle timeout; one that
    // keeps asking stays.
    let started = Instant::now();
    let mut busy = held.pop().expect("a client");
    while started.elapsed() < Duration::from_secs(4) {
        assert!(!busy.status().connected);
        std::thread::sleep(Duration::from_millis(300));
    }
    for client in &mut held {
        assert!(
            client.closed_within(Duration::from_millis(500)),
            "an idle connection stayed"
        );
    }
    assert!(!busy.status().connected);
    // Their slots are free again.
    assert!(!agent.client().status().connected);
}

#[test]
fn a_flood_of_connections_from_another_user_leaves_the_agent_usable() {
    if !fwnp_testkit::netns::require_root_for(
        "a_flood_of_connections_from_another_user_leaves_the_agent_usable",
        "running a child as another user",
    ) {
        return;
    }
    // A descriptor limit of 256, soft and hard: the connection caps must keep the agent below it.
    let agent = Agent::start_with(
        "fdflood",
        &my_uid().to_string(),
        "1s",
        "max_connections = 160",
        under_nofile("256:256"),
    );
    let mut flood = helper(
        "helper_hold_connections",
        &agent.socket,
        Some(65534),
        &[("FWNP_TEST_COUNT", "400".to_owned())],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .expect("run the helper");
    let flood_guard_pid = flood.id();
    // Wait until the helper has made its connections.
    let out = std::io::BufReader::new(flood.stdout.take().expect("stdout"));
    let line = std::io::BufRead::lines(out)
        .map_while(Result::ok)
        .find(|l| l.contains("CONNECTED"))
        .expect("the helper's connections");
    eprintln!("{line}");
    let asked = Instant::now();
    let mut client = agent.client();
    assert!(!client.status().connected);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let _ = Command::new("kill")
        .arg(flood_guard_pid.to_string())
        .status();
    let _ = flood.wait();
}

/// Not a test on its own: makes FWNP_TEST_COUNT connections to the agent, says so, and holds
/// them (sending nothing) for a few seconds.
#[test]
#[ignore = "helper run by other tests in a child process"]
fn helper_hold_connections() {
    let (Ok(socket), Ok(count)) = (
        std::env::var("FWNP_TEST_SOCKET"),
        std::env::var("FWNP_TEST_COUNT"),
    ) else {
        return;
    };
    let count: usize = count.parse().expect("a count");
    let held: Vec<_> = (0..count)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    println!("CONNECTED {}", held.len());
    std::thread::sleep(Duration::from_secs(8));
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let agent = Agent::start_with(
        "nofile",
        &my_uid().to_string(),
        "1s",
        "",
        under_nofile("512:4096"),
    );
    // prlimit execs the agent: the pid is the agent's.
    let (soft, hard) = nofile_of(agent.process.pid());
    assert_eq!((soft.as_str(), hard.as_str()), ("4096", "4096"));
}

#[test]
fn the_socket_is_made_with_its_mode_even_under_an_open_umask() {
    let agent = Agent::start_with("mode", "", "1s", "", |inner| {
        // The agent inherits umask 0: the socket's mode must not depend on it.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("umask 0; exec \"$@\"")
            .arg("sh")
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(std::process::Stdio::null());
        command
    });
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Nothing is left of the private directory it was made in.
    let dir = agent.socket.parent().expect("directory");
    let stray: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".agent.sock"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn watches_are_bounded_per_connection() {
    // The default bound: 64 watches of one lease each.
    let agent = Agent::start("watches", &my_uid().to_string(), "1s");
    let mut client = agent.client();
    for n in 0..64u8 {
        client.watch(Some(LeaseId([n; 16])));
    }
    // The same watch again, and a watch of all leases, take nothing more.
    client.watch(Some(LeaseId([7; 16])));
    client.watch(None);
    let id = client.next_id();
    let answer = client.request(
        LocalMessage::Watch(fwnp_proto::local::Watch {
            common: common(id),
            lease: Some(LeaseId([200; 16])),
        }),
        STEP,
    );
    let (code, reason) = denial(&answer);
    assert_eq!(code, DenialCode::Wire(ResultCode::NoResources), "{reason}");
    assert!(reason.contains("max_watches"), "{reason}");
    // The connection still serves.
    assert!(!client.status().connected);
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

const MERGING_TERMS: Terms = Terms {
    epoch: 0x5c21_97ed_0000_00d4,
    lifetime: 600,
    renew_after: 300,
    lifetimes: (1, 3600),
    lease_fill: 0xd4,
};

/// A scripted gateway whose leases merge identical Opens (`LeaseTable`, spec 11.3), that
/// leaves the next Open unanswered when told to.
#[derive(Debug, Default)]
struct Merging {
    /// Every request, in order.
    seen: Vec<Message>,
    leases: LeaseTable,
    /// Leave the next Open unanswered (its sender's retry is answered).
    drop_next_open: bool,
}

impl Conduct for Mutex<Merging> {
    fn reply(&self, request: Result<Message, DecodeError>, remote: IpAddr) -> Reply {
        let Ok(request) = request else {
            return Reply::Nothing;
        };
        let mut script = lock(self);
        script.seen.push(request.clone());
        if matches!(request, Message::Open(_)) && std::mem::take(&mut script.drop_next_open) {
            return Reply::Nothing;
        }
        Reply::Answer(script.leases.answer(&MERGING_TERMS, &request, remote))
    }
}

/// The leases the gateway was asked to release, in order.
fn released_at_gateway(script: &Mutex<Merging>) -> Vec<LeaseId> {
    lock(script)
        .seen
        .iter()
        .filter_map(|m| match m {
            Message::Release(r) => Some(r.lease),
            _ => None,
        })
        .collect()
}

fn granted(answer: LocalMessage) -> Granted {
    match answer {
        LocalMessage::Wire(Message::Granted(g)) => g,
        other => panic!("expected a Granted, got {other:?}"),
    }
}

/// The gateway merges identical Opens into one lease. One connection opening its port twice
/// holds that lease once: one Release of the id ends its hold and releases the lease at the
/// gateway, and a second one is refused unknown-local-lease. Then a connection releases the
/// lease while another one's identical Open is on its way (its first sending unanswered, as
/// when its answer is lost): the Release does not reach the gateway before the Open is
/// answered, the answer is the lease, and the second connection holds it until it closes.
#[test]
fn a_merged_lease_is_held_once_per_connection_and_not_released_under_an_open() {
    let pki = common::scripted::pki("merged");
    let runtime = common::scripted::runtime();
    let script = Arc::new(Mutex::new(Merging::default()));
    let gateway = spawn_gateway(&pki, &runtime, script.clone());
    let dir = temp_dir("merged");
    let (_agent, socket) = start_agent(&pki, &dir, &[gateway]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut app = LocalClient::connect(&socket);
    wait_connected_to(&mut app, gateway);

    let first = granted(app.open(Protocol::Tcp, port, Some(60), STEP));
    let again = granted(app.open(Protocol::Tcp, port, Some(600), STEP));
    assert_eq!(again.lease, first.lease, "the gateway merged them");
    assert!(matches!(
        app.release(first.lease),
        LocalMessage::Wire(Message::Released(_))
    ));
    let (code, reason) = denial(&app.release(first.lease));
    assert_eq!(
        code,
        DenialCode::Local(LocalCode::UnknownLocalLease),
        "{reason}"
    );
    let wait = Duration::from_millis(50);
    assert!(
        fwnp_testkit::netns::wait_until(STEP, wait, || released_at_gateway(&script)
            == vec![first.lease]),
        "{:?}",
        released_at_gateway(&script)
    );

    let mut holder = LocalClient::connect(&socket);
    let held = granted(holder.open(Protocol::Tcp, port, Some(60), STEP));
    assert_ne!(held.lease, first.lease);
    lock(&script).drop_next_open = true;
    let mut joining = LocalClient::connect(&socket);
    let id = joining.next_id();
    joining.send(&open_msg(id, Protocol::Tcp, port, Some(60)));
    assert!(fwnp_testkit::netns::wait_until(STEP, wait, || !lock(
        &script
    )
    .drop_next_open));
    assert!(matches!(
        holder.release(held.lease),
        LocalMessage::Wire(Message::Released(_))
    ));
    // The agent sends the unanswered Open again.
    let joined = granted(joining.answer(id, 2 * STEP));
    assert_eq!(joined.lease, held.lease);
    assert_eq!(released_at_gateway(&script), vec![first.lease]);
    assert_eq!(joining.list().leases.len(), 1);

    drop(joining);
    assert!(
        fwnp_testkit::netns::wait_until(STEP, wait, || released_at_gateway(&script)
            == vec![first.lease, held.lease]),
        "{:?}",
        released_at_gateway(&script)
    );
}
