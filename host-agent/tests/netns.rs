//! The real `fwnp-agent` with the real `fwnp-gateway` and the real kernel, in network
//! namespaces: the gateway runs in the gateway namespace of a [`Topology`] and guards the host's
//! network; the agent runs in the host namespace with its table in enforce mode; the test is
//! the application (a raw local-API client, with its echo server bound in the host namespace)
//! and the outside world.
//!
//! Proves with real TCP traffic: closed before a lease at both the gateway and the host; open
//! from outside once Granted; closed at both after Release; closed when the application's
//! connection goes without releasing; a revocation removes the host's mirror and tells the
//! application; a port another process owns is refused naming it.
//!
//! Needs root: skipped otherwise, and failing instead when FWNP_REQUIRE_NETNS=1.

mod common;
#[path = "netns/frontends.rs"]
mod frontends;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use fwnp_proto::local::{EventKind, LocalCode, LocalMessage};
use fwnp_proto::{Granted, Message, Protocol};
use fwnp_testkit::netns::{self as lab, Netns, TcpEchoServer, Topology};

/// The gateway's QUIC port, inside its own namespace.
const GATEWAY_PORT: u16 = 4433;
/// Below TCP's first SYN retransmission: a connection made within it went through with its
/// first SYN, so the opening was in force when it was sent.
const FIRST_SYN: Duration = Duration::from_millis(800);
/// Long enough to be sure a dropped SYN is not answered.
const REFUSED: Duration = Duration::from_millis(1200);

const POLICY: &str = r#"
[defaults]
lifetime = "60s"
min_lifetime = "1s"
max_lifetime = "1h"

[applications]
web = ["tcp/7850"]

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// The `fwnp-gateway` binary of this workspace, built once per test run (it belongs to another
/// package, so Cargo does not build it for these tests), by the same build the lab and the
/// end-to-end suite run, so their artifacts are shared.
fn gateway_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            fwnp_testkit::binaries::Binaries::build()
                .expect("build the workspace's binaries")
                .gateway
        })
        .clone()
}

fn gateway_config(pki: &Pki, dir: &Path, listen: &str) -> String {
    format!(
        r#"listen = ["{listen}"]
certificate = "{cert}"
key = "{key}"
ca = "{ca}"
policy = "{policy}"
state_dir = "{state}"
admin_socket = "{admin}"

[filter]
enabled = true
table = "fwnp"
protected = ["198.51.100.0/24", "fd00:2::/64"]
refuse = "drop"
"#,
        cert = pki.file("gateway.pem").display(),
        key = pki.file("gateway.key").display(),
        ca = pki.file("ca.pem").display(),
        policy = dir.join("policy.toml").display(),
        state = dir.join("state").display(),
        admin = dir.join("admin.sock").display(),
    )
}

/// Everything a test needs. Fields drop in declaration order: the daemons first, then the echo
/// servers, then the namespaces, then the files.
struct Lab {
    agent: ProcessGuard,
    gateway: ProcessGuard,
    echo: Vec<TcpEchoServer>,
    topology: Topology,
    socket: PathBuf,
    admin_socket: PathBuf,
    gateway_command: (PathBuf, PathBuf),
    agent_config: PathBuf,
    _pki: Pki,
    _dir: TempDir,
}

impl Lab {
    fn new(label: &str, echo_ports: &[u16]) -> Lab {
        Self::with_local(label, echo_ports, "")
    }

    /// With `extra` lines in the agent's `[local]`.
    fn with_local(label: &str, echo_ports: &[u16], extra: &str) -> Lab {
        let gateway_bin = gateway_binary();
        let topology = Topology::new().expect("build the namespaces");
        let pki = Pki::with_gateway_ips(label, &[topology.gateway_inside_v4]);
        pki.host(
            "web-01",
            &[topology.host().v4, topology.host().v6],
            &[],
            &[],
        );
        let dir = temp_dir(label);
        std::fs::write(dir.path().join("policy.toml"), POLICY).expect("write policy");
        let gateway_addr = SocketAddr::new(topology.gateway_inside_v4, GATEWAY_PORT).to_string();
        let gateway_config_path = dir.path().join("gateway.toml");
        std::fs::write(
            &gateway_config_path,
            gateway_config(&pki, dir.path(), &gateway_addr),
        )
        .expect("write gateway config");
        let agent_config_path = dir.path().join("agent.toml");
        std::fs::write(
            &agent_config_path,
            agent_config(
                &pki,
                "web-01",
                dir.path(),
                &gateway_addr,
                "enforce",
                "",
                "1s",
            )
            .replace("[mirror]", &format!("{extra}\n\n[mirror]")),
        )
        .expect("write agent config");
        let echo = echo_ports
            .iter()
            .map(|p| TcpEchoServer::start(&topology.host().netns, *p).expect("echo server"))
            .collect();
        let admin_socket = dir.path().join("admin.sock");
        let socket = dir.path().join("agent.sock");
        let mut lab = Lab {
            agent: ProcessGuard(None),
            gateway: ProcessGuard(None),
            echo,
            topology,
            socket,
            admin_socket,
            gateway_command: (gateway_bin, gateway_config_path),
            agent_config: agent_config_path,
            _pki: pki,
            _dir: dir,
        };

        lab.start_gateway();
        lab.start_agent();
        lab
    }

    /// Starts the agent in the host namespace and waits until it is connected to the gateway.
    fn start_agent(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut command = agent_command(&self.agent_config);
        self.agent.0 = Some(
            self.topology
                .host()
                .netns
                .spawn(&mut command)
                .expect("start fwnp-agent"),
        );
        wait_for_socket(&mut self.agent, &self.socket.clone());
        let mut client = self.client();
        let deadline = Instant::now() + STEP;
        while !client.status().connected {
            assert!(
                Instant::now() < deadline,
                "the agent did not connect to the gateway"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the gateway in its namespace and waits for its admin socket.
    fn start_gateway(&mut self) {
        let _ = std::fs::remove_file(&self.admin_socket);
        let (binary, config) = &self.gateway_command;
        let mut command = Command::new(binary);
        command.arg("--config").arg(config).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        self.gateway.0 = Some(
            self.topology
                .gateway
                .spawn(&mut command)
                .expect("start fwnp-gateway"),
        );
        wait_for_socket(&mut self.gateway, &self.admin_socket.clone());
    }

    fn client(&self) -> LocalClient {
        LocalClient::connect(&self.socket)
    }

    fn host_port(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.topology.host().v4, port)
    }

    /// Whether a connection from `ns` to the host's `port` gets through within `within`.
    fn reaches(&self, ns: &Netns, port: u16, within: Duration) -> bool {
        lab::tcp_connects(ns, self.host_port(port), None, within)
    }

    /// From outside, through the gateway's forward filter and the host's input filter.
    fn outside_reaches(&self, port: u16, within: Duration) -> bool {
        self.reaches(&self.topology.outside, port, within)
    }

    /// From the gateway namespace itself: its own output is not forwarded, so only the host's
    /// table decides.
    fn host_admits(&self, port: u16, within: Duration) -> bool {
        self.reaches(&self.topology.gateway, port, within)
    }

    fn table(&self, ns: &Netns, table: &str) -> String {
        ns.exec_checked(&["nft", "list", "table", "inet", table])
            .unwrap_or_default()
    }

    fn gateway_has(&self, port: u16) -> bool {
        has_element(
            &self.table(&self.topology.gateway, "fwnp"),
            &self.topology.host().v4.to_string(),
            port,
        )
    }

    fn host_has(&self, port: u16) -> bool {
        has_element(
            &self.table(&self.topology.host().netns, "fwnp_host"),
            &self.topology.host().v4.to_string(),
            port,
        )
    }

    /// Polls `condition` for up to `limit`.
    fn eventually(&self, limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
        lab::wait_until(limit, Duration::from_millis(100), &mut condition)
    }

    /// Revokes a lease through the gateway's admin API.
    fn revoke(&self, lease: &str) {
        let mut stream =
            std::os::unix::net::UnixStream::connect(&self.admin_socket).expect("admin socket");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        let body = r#"{"reason":"test revocation"}"#;
        write!(
            stream,
            "POST /v1/leases/{lease}/revoke HTTP/1.1\r\nHost: fwnp\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send the revoke");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        assert!(response.starts_with("HTTP/1.1 200"), "revoke: {response}");
    }
}

/// Whether an nft listing holds an element `host . tcp . port` (nft prints the protocol by
/// name or number), with no digit following the port.
fn has_element(table: &str, host: &str, port: u16) -> bool {
    ["tcp", "6"].iter().any(|proto| {
        let needle = format!("{host} . {proto} . {port}");
        table
            .match_indices(&needle)
            .any(|(at, _)| !table[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
    })
}

fn granted(answer: LocalMessage) -> Granted {
    match answer {
        LocalMessage::Wire(Message::Granted(g)) => g,
        other => panic!("expected Granted, got {other:?}"),
    }
}

#[test]
fn an_application_opens_uses_and_releases_a_port() {
    if !lab::require_root("an_application_opens_uses_and_releases_a_port") {
        return;
    }
    let lab = Lab::new("e2e", &[7000, 7001]);
    let mut app = lab.client();
    let status = app.status();
    assert_eq!(status.identity.as_deref(), Some("fwnp://host/web-01"));
    assert_eq!(status.mirror_mode, "enforce");

    // Before any lease: closed at the gateway and at the host, though the server listens.
    assert!(
        !lab.outside_reaches(7000, REFUSED),
        "open from outside without a lease"
    );
    assert!(
        !lab.host_admits(7000, REFUSED),
        "the host admits the port without a lease"
    );

    // Granted only once both the gateway's and the host's kernel hold the opening: the very
    // first SYN from outside gets through.
    let g = granted(app.open(Protocol::Tcp, 7000, Some(60), STEP));
    assert!(
        lab.outside_reaches(7000, FIRST_SYN),
        "not open from outside after Granted"
    );
    assert!(lab.gateway_has(7000) && lab.host_has(7000));
    // No address asked: the host's two addresses, IPv4 and IPv6, in one lease, each mirrored.
    let hosts: Vec<_> = g.grants.iter().map(|grant| grant.host).collect();
    assert_eq!(hosts, vec![lab.topology.host().v4, lab.topology.host().v6]);
    let host_table = lab.table(&lab.topology.host().netns, "fwnp_host");
    assert!(
        has_element(&host_table, &lab.topology.host().v6.to_string(), 7000),
        "{host_table}"
    );
    assert_eq!(g.lifetime, 60);
    // Only that port.
    assert!(!lab.outside_reaches(7001, REFUSED));
    let leases = app.list();
    assert_eq!(leases.leases.len(), 1);
    assert_eq!(leases.leases[0].lease, g.lease);
    let info = leases.leases[0]
        .app
        .clone()
        .expect("application information");
    assert_eq!(info.pid, Some(std::process::id()));
    assert_eq!(info.uid, Some(my_uid()));
    assert!(info.executable.is_some_and(|e| e.contains("netns")));
    // Without a label of its own, the application is named by its command line.
    assert!(info.name.is_some_and(|n| n.contains("netns")));

    // Release: closed again at both.
    assert!(matches!(
        app.release(g.lease),
        LocalMessage::Wire(Message::Released(r)) if r.lease == g.lease
    ));
    assert!(
        !lab.host_has(7000),
        "the host's mirror outlived the release"
    );
    assert!(
        !lab.host_admits(7000, REFUSED),
        "the host still admits the port"
    );
    assert!(
        lab.eventually(STEP, || !lab.gateway_has(7000)),
        "the gateway's element outlived the release"
    );
    assert!(
        !lab.outside_reaches(7000, REFUSED),
        "still open from outside"
    );
    assert!(app.list().leases.is_empty());

    // An application that names itself is listed under that name (its own claim); what the
    // agent sees for itself still comes from the kernel, whatever the application says.
    let id = app.next_id();
    let mut labelled = open_msg(id, Protocol::Tcp, 7001, Some(60));
    if let LocalMessage::Wire(Message::Open(open)) = &mut labelled {
        open.app = Some(fwnp_proto::AppInfo {
            name: Some("inventory-api".into()),
            executable: Some("/usr/bin/not-me".into()),
            uid: Some(4242),
            pid: Some(1),
        });
    }
    let g = granted(app.request(labelled, STEP));
    let leases = app.list();
    let info = leases.leases[0]
        .app
        .clone()
        .expect("application information");
    assert_eq!(info.name.as_deref(), Some("inventory-api"));
    assert!(info.executable.is_some_and(|e| e.contains("netns")));
    assert_eq!(info.uid, Some(my_uid()));
    assert_eq!(info.pid, Some(std::process::id()));
    app.release(g.lease);
}

#[test]
fn leases_end_with_the_application_connection_and_revocation_reaches_it() {
    if !lab::require_root("leases_end_with_the_application_connection_and_revocation_reaches_it") {
        return;
    }
    let lab = Lab::new("e2eclose", &[7100, 7101]);

    // The application goes away without releasing: its lease goes with it.
    let mut app = lab.client();
    let g = granted(app.open(Protocol::Tcp, 7100, Some(300), STEP));
    assert!(lab.outside_reaches(7100, FIRST_SYN));
    drop(app);
    assert!(
        lab.eventually(STEP, || !lab.host_has(7100) && !lab.gateway_has(7100)),
        "lease {} outlived its application",
        g.lease
    );
    assert!(!lab.outside_reaches(7100, REFUSED));
    assert_eq!(lab.client().status().leases, 0);

    // The operator revokes: the mirror goes, and the application hears it.
    let mut app = lab.client();
    app.watch(None);
    let g = granted(app.open(Protocol::Tcp, 7101, Some(300), STEP));
    assert!(lab.outside_reaches(7101, FIRST_SYN));
    lab.revoke(&g.lease.to_string());
    let event = app.event(STEP).expect("an event after the revocation");
    assert_eq!(event.kind, EventKind::Revoked);
    assert_eq!(event.lease, g.lease);
    assert!(
        lab.eventually(STEP, || !lab.host_has(7101)),
        "the host's mirror outlived the revocation"
    );
    assert!(!lab.host_admits(7101, REFUSED));
    assert!(!lab.outside_reaches(7101, REFUSED));
}

/// Runs the helper below in a child process (this test binary again) that asks for `port`.
fn ask_from_child(socket: &Path, port: u16) -> (u64, String) {
    ask_from_child_for(socket, &port.to_string(), None)
}

/// The same, by application id.
fn ask_app_from_child(socket: &Path, app: &str) -> (u64, String) {
    ask_from_child_for(socket, "0", Some(app))
}

fn ask_from_child_for(socket: &Path, port: &str, app: Option<&str>) -> (u64, String) {
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
        .env("FWNP_TEST_PORT", port);
    if let Some(app) = app {
        command.env("FWNP_TEST_APP", app);
    }
    let output = command.output().expect("run the helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("ANSWER ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("the helper printed no answer: {stdout}"));
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
    let answer = match std::env::var("FWNP_TEST_APP") {
        Ok(app) => {
            let id = client.next_id();
            client.request(open_app_msg(id, &app, Some(60)), STEP)
        }
        Err(_) => client.open(Protocol::Tcp, port.parse().expect("port"), Some(60), STEP),
    };
    match answer {
        LocalMessage::Denied(d) => println!(
            "ANSWER {} {}",
            d.code.number(),
            d.reason.unwrap_or_default()
        ),
        other => println!("ANSWER 0 {other:?}"),
    }
}

#[test]
fn a_port_owned_by_another_process_is_refused_naming_it() {
    if !lab::require_root("a_port_owned_by_another_process_is_refused_naming_it") {
        return;
    }
    let lab = Lab::new("e2eowner", &[7200]);
    // The echo server on 7200 belongs to this test process; a child of it asks for the port.
    let (code, reason) = ask_from_child(&lab.socket, 7200);
    assert_eq!(code, LocalCode::PortNotOwned.number(), "{reason}");
    assert!(
        reason.contains(&format!(
            "tcp/7200 is bound by pid {} (",
            std::process::id()
        )),
        "{reason}"
    );
    assert!(!lab.gateway_has(7200) && !lab.host_has(7200));
    assert!(!lab.outside_reaches(7200, REFUSED));
    // The owner itself may.
    let mut app = lab.client();
    let first = granted(app.open(Protocol::Tcp, 7200, Some(60), STEP));
    assert!(lab.outside_reaches(7200, FIRST_SYN));
    assert_eq!(lab.echo.len(), 1);

    // A second connection of the same application asks for the same opening: the gateway
    // merges it into the same lease. One letting go does not close it for the other.
    let mut second = lab.client();
    let again = granted(second.open(Protocol::Tcp, 7200, Some(60), STEP));
    assert_eq!(again.lease, first.lease);
    drop(app);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.outside_reaches(7200, FIRST_SYN),
        "closed for the application still holding it"
    );
    assert!(lab.gateway_has(7200) && lab.host_has(7200));
    assert!(matches!(
        second.release(again.lease),
        LocalMessage::Wire(Message::Released(_))
    ));
    assert!(lab.eventually(STEP, || !lab.gateway_has(7200) && !lab.host_has(7200)));
    assert!(!lab.outside_reaches(7200, REFUSED));
}

#[test]
fn the_agent_resyncs_after_a_gateway_restart_and_keeps_the_opening() {
    if !lab::require_root("the_agent_resyncs_after_a_gateway_restart_and_keeps_the_opening") {
        return;
    }
    gateway_restart("e2erestart", 7300, false, 20);
}

#[test]
fn the_agent_recovers_from_a_gateway_killed_without_notice() {
    if !lab::require_root("the_agent_recovers_from_a_gateway_killed_without_notice") {
        return;
    }
    gateway_restart("e2ekillgw", 7500, true, 30);
}

/// Opens a lease of `lifetime` seconds, stops the gateway (SIGTERM, or SIGKILL with `kill`:
/// then the agent only learns it from an unanswered renewal), starts it again with its state,
/// and checks that the lease is renewed over the new connection and the opening survives its
/// first lifetime at both the gateway and the host.
fn gateway_restart(label: &str, port: u16, kill: bool, lifetime: u32) {
    let mut lab = Lab::new(label, &[port]);
    let mut app = lab.client();
    app.watch(None);
    let g = granted(app.open(Protocol::Tcp, port, Some(lifetime), STEP));
    let granted_at = Instant::now();
    let lifetime = Duration::from_secs(u64::from(lifetime));
    assert!(lab.outside_reaches(port, FIRST_SYN));

    if kill {
        lab.gateway.kill();
    } else {
        lab.gateway.terminate(STEP);
    }
    lab.start_gateway();
    // The application hears that the agent lost the gateway (at once after a GoingAway; after
    // a kill, when the renewal goes unanswered), and then the renewal over the new connection.
    let deadline = granted_at + lifetime;
    let mut unreachable = false;
    let renewed = loop {
        match app.event(deadline.saturating_duration_since(Instant::now())) {
            Some(e) if e.kind == EventKind::GatewayUnreachable => unreachable = true,
            Some(e) if e.kind == EventKind::Renewed && e.lease == g.lease => break e,
            Some(e) if e.kind.is_terminal() => panic!("the lease ended: {e:?}"),
            Some(_) => {}
            None => panic!("no renewal before the lease's end"),
        }
    };
    assert!(
        unreachable,
        "no gateway-unreachable event before the renewal"
    );
    assert!(lab.client().status().connected);
    assert!(
        renewed
            .expires_in_ms
            .is_some_and(|ms| ms > lifetime.as_millis() as u64 / 2),
        "{renewed:?}"
    );
    std::thread::sleep((lifetime + Duration::from_secs(1)).saturating_sub(granted_at.elapsed()));
    assert!(
        lab.outside_reaches(port, FIRST_SYN),
        "the opening did not survive the restart"
    );
    assert!(lab.gateway_has(port) && lab.host_has(port));
    assert_eq!(app.list().leases.first().map(|l| l.lease), Some(g.lease));
}

#[test]
fn openings_of_a_killed_agent_close_at_lease_end_on_both_sides() {
    if !lab::require_root("openings_of_a_killed_agent_close_at_lease_end_on_both_sides") {
        return;
    }
    let mut lab = Lab::new("e2ekill", &[7400]);
    let mut app = lab.client();
    granted(app.open(Protocol::Tcp, 7400, Some(4), STEP));
    let granted_at = Instant::now();
    lab.agent.kill();
    // Nobody renews: open until the lease's end, closed after it, at both.
    assert!(
        lab.outside_reaches(7400, FIRST_SYN),
        "closed before the lease ended"
    );
    assert!(
        lab.eventually(Duration::from_secs(10), || !lab.host_has(7400)
            && !lab.gateway_has(7400)),
        "the openings outlived the lease"
    );
    assert!(
        granted_at.elapsed() >= Duration::from_secs(3),
        "closed too early: {:?}",
        granted_at.elapsed()
    );
    assert!(!lab.outside_reaches(7400, REFUSED));
    assert!(!lab.host_admits(7400, REFUSED));
}

#[test]
fn a_new_gateway_epoch_reopens_the_lease_under_a_new_id() {
    if !lab::require_root("a_new_gateway_epoch_reopens_the_lease_under_a_new_id") {
        return;
    }
    let mut lab = Lab::new("e2eepoch", &[7600]);
    let mut app = lab.client();
    app.watch(None);
    let g = granted(app.open(Protocol::Tcp, 7600, Some(120), STEP));
    assert!(lab.outside_reaches(7600, FIRST_SYN));
    let old_epoch = lab.client().status().epoch.expect("an epoch");

    // The gateway loses its state: stopped, store deleted, started again with a new epoch.
    lab.gateway.terminate(STEP);
    std::fs::remove_dir_all(lab._dir.path().join("state")).expect("remove the gateway's store");
    lab.start_gateway();

    let deadline = Instant::now() + Duration::from_secs(30);
    let reopened = loop {
        match app.event(deadline.saturating_duration_since(Instant::now())) {
            Some(e) if e.kind == EventKind::Reopened => break e,
            Some(e) if e.kind.is_terminal() => panic!("the lease ended: {e:?}"),
            Some(_) => {}
            None => panic!("no reopened event after the epoch change"),
        }
    };
    assert_eq!(reopened.lease, g.lease);
    let new_id = reopened.new_lease.expect("the new lease id");
    assert_ne!(new_id, g.lease);
    let status = lab.client().status();
    assert!(status.epoch.is_some_and(|e| e != old_epoch), "{status:?}");
    assert!(
        lab.outside_reaches(7600, FIRST_SYN),
        "not open after the re-open"
    );
    assert_eq!(app.list().leases.first().map(|l| l.lease), Some(new_id));

    // The application still releases it by the id it was granted.
    assert!(matches!(
        app.release(g.lease),
        LocalMessage::Wire(Message::Released(_))
    ));
    assert!(lab.eventually(STEP, || !lab.gateway_has(7600) && !lab.host_has(7600)));
    assert!(!lab.outside_reaches(7600, REFUSED));
}

#[test]
fn a_restarted_agent_releases_the_earlier_runs_leases_nobody_asks_for_again() {
    if !lab::require_root(
        "a_restarted_agent_releases_the_earlier_runs_leases_nobody_asks_for_again",
    ) {
        return;
    }
    let mut lab = Lab::new("e2eearlier", &[7700, 7701]);
    // Two applications, whose connections end with the agent.
    let (mut first, mut second) = (lab.client(), lab.client());
    let kept = granted(first.open(Protocol::Tcp, 7700, Some(60), STEP));
    let dropped = granted(second.open(Protocol::Tcp, 7701, Some(60), STEP));
    assert_ne!(kept.lease, dropped.lease);
    lab.agent.kill();
    drop((first, second));
    lab.start_agent();
    let restarted = Instant::now();

    // Within the grace period one application asks for its opening again: the gateway gives it
    // the same lease back, and the opening has stayed open throughout.
    assert!(
        lab.host_has(7700) && lab.host_has(7701),
        "the restart closed the host's openings"
    );
    let mut app = lab.client();
    let again = granted(app.open(Protocol::Tcp, 7700, Some(60), STEP));
    assert_eq!(again.lease, kept.lease);

    // Nobody asks for the other: once the grace period (3 s here) is over, it is gone at both,
    // long before its 60 s lifetime.
    assert!(
        lab.eventually(Duration::from_secs(10), || !lab.host_has(7701)
            && !lab.gateway_has(7701)),
        "the earlier run's lease outlived the grace period"
    );
    assert!(
        restarted.elapsed() >= Duration::from_secs(2),
        "released before the grace period ended: {:?}",
        restarted.elapsed()
    );
    assert!(!lab.outside_reaches(7701, REFUSED));
    // The one asked for again stays, at both, with its application.
    assert!(
        lab.outside_reaches(7700, FIRST_SYN),
        "the lease asked for again was closed"
    );
    assert!(lab.host_has(7700) && lab.gateway_has(7700));
    assert_eq!(
        app.list()
            .leases
            .iter()
            .map(|l| l.lease)
            .collect::<Vec<_>>(),
        vec![kept.lease]
    );
}

#[test]
fn an_application_id_is_granted_only_for_ports_the_caller_owns() {
    if !lab::require_root("an_application_id_is_granted_only_for_ports_the_caller_owns") {
        return;
    }
    let lab = Lab::new("e2eappid", &[7850]);
    // "web" stands for tcp/7850, whose server is this test process; a child of it asks.
    let (code, reason) = ask_app_from_child(&lab.socket, "web");
    assert_eq!(code, LocalCode::PortNotOwned.number(), "{reason}");
    assert!(
        reason.contains(&format!(
            "tcp/7850 is bound by pid {} (",
            std::process::id()
        )),
        "{reason}"
    );
    // The gateway granted it before the agent could know its ports: released at once.
    assert!(
        lab.eventually(STEP, || !lab.gateway_has(7850)),
        "the gateway kept the lease of a port the caller does not own"
    );
    assert!(!lab.host_has(7850));
    assert!(!lab.outside_reaches(7850, REFUSED));
    assert_eq!(lab.client().status().leases, 0);

    // The server's own process may.
    let mut app = lab.client();
    let id = app.next_id();
    let g = granted(app.request(open_app_msg(id, "web", Some(60)), STEP));
    // One grant per address of the host (IPv4 and IPv6), each for the application's port.
    assert_eq!(g.grants.len(), 2, "{g:?}");
    assert!(
        g.grants.iter().all(|grant| grant.ports.first == 7850),
        "{g:?}"
    );
    assert!(lab.outside_reaches(7850, FIRST_SYN));
}

/// Kills process `0` (not a child of this one) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// Waits for a terminal event of `lease`; it must be lost with port-not-owned.
fn lost_for_ownership(app: &mut LocalClient, lease: fwnp_proto::LeaseId, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match app.event(deadline.saturating_duration_since(Instant::now())) {
            Some(e) if e.kind == EventKind::Lost => {
                assert_eq!(e.lease, lease);
                assert_eq!(
                    e.code,
                    Some(fwnp_proto::local::DenialCode::Local(
                        LocalCode::PortNotOwned
                    )),
                    "{e:?}"
                );
                return;
            }
            Some(e) if e.kind.is_terminal() => panic!("the lease ended otherwise: {e:?}"),
            Some(_) => {}
            None => panic!("the lease was not ended within {within:?}"),
        }
    }
}

#[test]
fn a_lease_whose_listener_closed_is_not_renewed() {
    if !lab::require_root("a_lease_whose_listener_closed_is_not_renewed") {
        return;
    }
    // No periodic check during the test: only the check before the renewal can end it.
    let mut lab = Lab::with_local("e2erenewown", &[7860], "owner_check_interval = \"60s\"");
    let mut app = lab.client();
    app.watch(None);
    let g = granted(app.open(Protocol::Tcp, 7860, Some(4), STEP));
    let granted_at = Instant::now();
    assert!(lab.outside_reaches(7860, FIRST_SYN));
    // The application closes its listener and keeps the lease.
    lab.echo.clear();
    lost_for_ownership(&mut app, g.lease, Duration::from_secs(4));
    assert!(
        granted_at.elapsed() < Duration::from_secs(4),
        "ended only at its expiry"
    );
    assert!(lab.eventually(STEP, || !lab.host_has(7860) && !lab.gateway_has(7860)));
}

#[test]
fn a_lease_ends_when_another_process_takes_its_port() {
    if !lab::require_root("a_lease_ends_when_another_process_takes_its_port") {
        return;
    }
    let mut lab = Lab::with_local("e2etakeown", &[7870], "owner_check_interval = \"500ms\"");
    let mut app = lab.client();
    app.watch(None);
    let g = granted(app.open(Protocol::Tcp, 7870, Some(60), STEP));
    assert!(lab.outside_reaches(7870, FIRST_SYN));
    // The application closes its listener; another program binds the port.
    lab.echo.clear();
    let listener = lab
        .topology
        .host()
        .netns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 7870)))
        .expect("bind in the host namespace");
    // Started through a shell that exits at once: the holder is not a descendant of this
    // process (the caller), as another user's server would not be.
    let output = Command::new("sh")
        .args(["-c", "sleep 30 <&0 >/dev/null 2>&1 & echo $!"])
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            listener,
        )))
        .output()
        .expect("start the other program");
    let other: u32 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("its pid");
    let _other = KillOnDrop(other);
    lost_for_ownership(&mut app, g.lease, Duration::from_secs(5));
    assert!(lab.eventually(STEP, || !lab.host_has(7870) && !lab.gateway_has(7870)));
    // The other program's port is not reachable from outside.
    assert!(!lab.outside_reaches(7870, REFUSED));
    assert!(app.list().leases.is_empty());
}

#[test]
fn leases_are_bounded_per_connection() {
    if !lab::require_root("leases_are_bounded_per_connection") {
        return;
    }
    let lab = Lab::with_local(
        "e2eleasecap",
        &[7880, 7881],
        "max_leases_per_connection = 1",
    );
    let mut app = lab.client();
    granted(app.open(Protocol::Tcp, 7880, Some(60), STEP));
    match app.open(Protocol::Tcp, 7881, Some(60), STEP) {
        LocalMessage::Denied(d) => {
            assert_eq!(
                d.code,
                fwnp_proto::local::DenialCode::Wire(fwnp_proto::ResultCode::NoResources)
            );
            assert!(
                d.reason
                    .is_some_and(|r| r.contains("max_leases_per_connection")),
                "no reason"
            );
        }
        other => panic!("a second lease was not refused: {other:?}"),
    }
    assert!(!lab.gateway_has(7881) && !lab.host_has(7881));
    // Another connection has its own bound.
    granted(lab.client().open(Protocol::Tcp, 7881, Some(60), STEP));
}
