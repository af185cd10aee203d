//! The real `fwnp-gateway` daemon against the real kernel, in network namespaces: the gateway
//! runs in the gateway namespace of a [`Topology`] and guards the host's networks; the test is
//! the host's client (from the host namespace) and the outside world (from the outside
//! namespace). Proves with real TCP traffic that a Granted answer means the opening is already
//! in the kernel, that release, expiry and revocation close it, and that a gateway killed with
//! SIGKILL leaves the kernel's openings in place until they expire and gets its leases, its epoch
//! and the audit of what expired meanwhile back when it starts again.
//!
//! Needs root: skipped otherwise, and failing instead when FWNP_REQUIRE_NETNS=1.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use fwnp_proto::{Epoch, LeaseId, Message, RevokeReason};
use fwnp_testkit::netns::{self as lab, TcpEchoServer, Topology};
use fwnp_testkit::process::{ProcessGuard, wait_for_socket};
use fwnp_trust::tls::ClientTlsFiles;
use serde_json::json;

/// The gateway's QUIC port, inside its own namespace.
const GATEWAY_PORT: u16 = 4433;

/// Below TCP's first SYN retransmission (1 s): a connection that succeeds within it got through
/// with its first SYN, so the opening was in force when it was sent.
const FIRST_SYN: Duration = Duration::from_millis(800);
/// Long enough to be sure a dropped SYN is not answered.
const REFUSED: Duration = Duration::from_millis(1200);

const POLICY: &str = r#"
[defaults]
lifetime = "60s"
min_lifetime = "1s"
max_lifetime = "1h"

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// Everything a test of the daemon needs. Fields drop in declaration order: the daemon first,
/// then the echo server, then the namespaces, then the files.
struct Lab {
    /// The daemon; `kill` ends it at once, as a crash or `kill -9` would.
    gateway: ProcessGuard,
    _echo: TcpEchoServer,
    topology: Topology,
    host_files: ClientTlsFiles,
    pki: Pki,
    config_path: PathBuf,
    admin_socket: PathBuf,
    dir: TempDir,
}

impl Lab {
    fn new(label: &str, echo_ports: &[u16]) -> Lab {
        let topology = Topology::new().expect("build the namespaces");
        let pki = Pki::with_gateway_ips(label, &[topology.gateway_inside_v4]);
        let host_files = pki.host(
            "web-01",
            &[topology.host().v4, topology.host().v6],
            &[],
            &[],
        );
        let dir = temp_dir(label);
        write_policy(&dir.path().join("policy.toml"), POLICY);
        let listen = SocketAddr::new(topology.gateway_inside_v4, GATEWAY_PORT).to_string();
        let filter = "[filter]\nenabled = true\ntable = \"fwnp\"\nprotected = [\"198.51.100.0/24\", \"fd00:2::/64\"]\nrefuse = \"drop\"";
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config_text(&pki, dir.path(), &listen, filter))
            .expect("write config");
        let admin_socket = dir.path().join("admin.sock");
        let echo =
            TcpEchoServer::start_ports(&topology.host().netns, echo_ports).expect("echo server");
        let mut lab = Lab {
            dir,
            pki,
            host_files,
            topology,
            _echo: echo,
            gateway: ProcessGuard(None),
            config_path,
            admin_socket,
        };
        lab.start_gateway();
        lab
    }

    /// Starts the daemon in the gateway namespace and waits until its admin API answers.
    fn start_gateway(&mut self) {
        assert!(self.gateway.0.is_none(), "the gateway is already running");
        let mut command = Command::new(env!("CARGO_BIN_EXE_fwnp-gateway"));
        command.arg("--config").arg(&self.config_path).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        let child = self
            .topology
            .gateway
            .spawn(&mut command)
            .expect("start fwnp-gateway");
        self.gateway = ProcessGuard(Some(child));
        wait_for_socket(&mut self.gateway, &self.admin_socket, STEP);
    }

    fn gateway_addr(&self) -> SocketAddr {
        SocketAddr::new(self.topology.gateway_inside_v4, GATEWAY_PORT)
    }

    /// Connects as the host, from the host namespace, and says Hello.
    async fn connect(&self) -> (Client, fwnp_proto::Welcome) {
        let socket = self.topology.host().netns.run(|| {
            let socket =
                std::net::UdpSocket::bind("0.0.0.0:0").expect("bind in the host namespace");
            socket.set_nonblocking(true).expect("non-blocking");
            socket
        });
        let client = Client::connect_from_socket(socket, self.gateway_addr(), &self.host_files)
            .await
            .expect("the gateway accepts the host");
        let welcome = client.hello().await;
        (client, welcome)
    }

    fn host_port(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.topology.host().v4, port)
    }

    /// Whether a TCP connection from outside to the host's `port` gets through within `within`.
    fn outside_reaches(&self, port: u16, within: Duration) -> bool {
        tokio::task::block_in_place(|| {
            lab::tcp_connects(&self.topology.outside, self.host_port(port), None, within)
        })
    }

    /// Whether a TCP connection from outside to `to` gets through within `within`.
    fn outside_reaches_addr(&self, to: SocketAddr, within: Duration) -> bool {
        tokio::task::block_in_place(|| lab::tcp_connects(&self.topology.outside, to, None, within))
    }

    /// Polls until the outside reaches (or no longer reaches) `port`, at most `limit`.
    fn wait_reachability(&self, port: u16, reachable: bool, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.outside_reaches(port, Duration::from_millis(300)) == reachable {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The gateway's table as `nft` lists it.
    fn kernel_table(&self) -> String {
        self.topology
            .gateway
            .exec_checked(&["nft", "list", "table", "inet", "fwnp"])
            .expect("nft list table")
    }

    /// Whether the kernel holds an element for the host's TCP `port`.
    fn kernel_has(&self, port: u16) -> bool {
        let table = self.kernel_table();
        let host = self.topology.host().v4.to_string();
        table
            .lines()
            .any(|line| line.contains(&host) && element_has_port(line, &host, port))
    }

    async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        admin_request(&self.admin_socket, method, path, body).await
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether an nft element listing line holds `host . tcp . port` (in any of the ways nft
/// prints the protocol), with nothing but separators in between.
fn element_has_port(line: &str, host: &str, port: u16) -> bool {
    ["tcp", "6"].iter().any(|proto| {
        let needle = format!("{host} . {proto} . {port}");
        line.match_indices(&needle).any(|(at, _)| {
            let after = &line[at + needle.len()..];
            !after.starts_with(|c: char| c.is_ascii_digit())
        })
    })
}

fn opened(message: Message) -> fwnp_proto::Granted {
    granted(message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_means_in_the_kernel_and_release_expiry_and_revocation_close_it() {
    if !lab::require_root("granted_means_in_the_kernel_and_release_expiry_and_revocation_close_it")
    {
        return;
    }
    let lab = Lab::new(
        "nskernel",
        &[7001, 7002, 7003, 7004, 7005, 7006, 7007, 7008],
    );
    let (client, welcome) = lab.connect().await;
    assert_eq!(welcome.identity, "fwnp://host/web-01");
    assert_eq!(
        welcome.addresses,
        vec![lab.topology.host().v4, lab.topology.host().v6]
    );

    // Closed before any lease (the echo server is listening: the gateway drops the SYNs).
    assert!(
        !lab.outside_reaches(7001, REFUSED),
        "the host's port is open without a lease"
    );
    assert!(!lab.kernel_has(7001));

    // Granted: the element is in the kernel already, the very first SYN gets through.
    let g = opened(client.open(tcp(7001), None).await);
    let first = lab.outside_reaches(7001, FIRST_SYN);
    assert!(first, "the opening was not in force when Granted arrived");
    assert!(
        lab.kernel_has(7001),
        "no element in:\n{}",
        lab.kernel_table()
    );
    // Only this port: the neighbour stays closed.
    assert!(!lab.outside_reaches(7002, REFUSED));

    // Release closes it at once.
    assert!(matches!(
        client.release(g.lease).await,
        Message::Released(_)
    ));
    assert!(
        !lab.outside_reaches(7001, REFUSED),
        "released but still open"
    );
    assert!(!lab.kernel_has(7001));

    // A short lease expires and closes.
    let short = opened(client.open(tcp(7002), Some(2)).await);
    assert_eq!(short.lifetime, 2);
    assert!(lab.outside_reaches(7002, FIRST_SYN));
    let granted_at = Instant::now();
    assert!(
        lab.wait_reachability(7002, false, Duration::from_secs(6)),
        "still open {:?} after a 2 s lease",
        granted_at.elapsed()
    );
    assert!(
        granted_at.elapsed() >= Duration::from_millis(1500),
        "closed before its lifetime ended"
    );
    assert!(!lab.kernel_has(7002));
    let (status, body) = lab.admin("GET", "/v1/audit?outcome=expired", None).await;
    assert_eq!(status, 200, "{body}");
    let wait_expired = Instant::now() + STEP;
    let mut expired_recorded = body["events"].as_array().is_some_and(|e| {
        e.iter()
            .any(|e| e["lease"] == json!(short.lease.to_string()))
    });
    while !expired_recorded && Instant::now() < wait_expired {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, body) = lab.admin("GET", "/v1/audit?outcome=expired", None).await;
        expired_recorded = body["events"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["lease"] == json!(short.lease.to_string()))
        });
    }
    assert!(expired_recorded, "the expiry is not in the audit trail");

    // Renew and re-open refresh the kernel's timeout: a 2 s opening renewed (or opened again)
    // for longer stays open past its first expiry.
    let renewed = opened(client.open(tcp(7004), Some(2)).await);
    let reopened = opened(client.open(tcp(7005), Some(2)).await);
    let first_granted = Instant::now();
    assert_eq!(
        granted(client.renew(renewed.lease, Some(30)).await).lifetime,
        30
    );
    assert_eq!(
        opened(client.open(tcp(7005), Some(30)).await).lease,
        reopened.lease
    );
    while first_granted.elapsed() < Duration::from_millis(3500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lab.outside_reaches(7004, FIRST_SYN),
        "the renewal did not reach the kernel"
    );
    assert!(
        lab.outside_reaches(7005, FIRST_SYN),
        "the re-open did not reach the kernel"
    );
    assert!(lab.kernel_has(7004) && lab.kernel_has(7005));
    assert!(matches!(
        client.release(renewed.lease).await,
        Message::Released(_)
    ));
    assert!(matches!(
        client.release(reopened.lease).await,
        Message::Released(_)
    ));
    assert!(!lab.outside_reaches(7004, REFUSED) && !lab.kernel_has(7005));

    // A port range: its ports pass, the next one does not.
    let range = fwnp_proto::Opening {
        target: fwnp_proto::Target::Ports {
            protocol: fwnp_proto::Protocol::Tcp,
            ports: fwnp_proto::PortRange {
                first: 7006,
                last: 7007,
            },
        },
        host: fwnp_proto::HostAddresses::Default,
        family: None,
        remotes: Vec::new(),
    };
    let ranged = opened(client.open(range, None).await);
    assert!(lab.outside_reaches(7006, FIRST_SYN) && lab.outside_reaches(7007, FIRST_SYN));
    assert!(
        !lab.outside_reaches(7008, REFUSED),
        "the range opened the next port too"
    );
    assert!(matches!(
        client.release(ranged.lease).await,
        Message::Released(_)
    ));
    assert!(!lab.outside_reaches(7006, REFUSED) && !lab.outside_reaches(7007, REFUSED));

    // IPv6 works the same way: the host's IPv6 address, asked by family.
    let v6_port = SocketAddr::new(lab.topology.host().v6, 7001);
    assert!(!lab.outside_reaches_addr(v6_port, REFUSED));
    let mut opening = tcp(7001);
    opening.family = Some(fwnp_proto::Family::Ipv6);
    let v6 = opened(client.open(opening, None).await);
    assert_eq!(v6.grants[0].host, lab.topology.host().v6);
    assert!(
        lab.outside_reaches_addr(v6_port, FIRST_SYN),
        "the IPv6 opening was not in force"
    );
    assert!(
        !lab.outside_reaches(7001, REFUSED),
        "the IPv6 lease opened IPv4 too"
    );
    assert!(matches!(
        client.release(v6.lease).await,
        Message::Released(_)
    ));
    assert!(!lab.outside_reaches_addr(v6_port, REFUSED));

    // Revocation through the admin API closes it and tells the host.
    let revoked = opened(client.open(tcp(7003), None).await);
    assert!(lab.outside_reaches(7003, FIRST_SYN));
    let (status, body) = lab
        .admin(
            "POST",
            &format!("/v1/leases/{}/revoke", revoked.lease),
            Some(&json!({"reason": "netns test"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !lab.outside_reaches(7003, REFUSED),
        "revoked but still open"
    );
    assert!(!lab.kernel_has(7003));
    match client.next_notice(STEP).await {
        Some(Message::Revoked(r)) => {
            assert_eq!(r.lease, revoked.lease);
            assert_eq!(r.reason, RevokeReason::Operator);
        }
        other => panic!("expected a Revoked notice, got {other:?}"),
    }
    assert!(client.list().await.leases.is_empty());
    let _ = lab.dir();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_kernel_keeps_the_openings_and_a_restart_brings_the_leases_back() {
    if !lab::require_root(
        "after_a_sigkill_the_kernel_keeps_the_openings_and_a_restart_brings_the_leases_back",
    ) {
        return;
    }
    let mut lab = Lab::new("nsrestart", &[7010, 7011, 7012, 7013]);
    let (client, welcome) = lab.connect().await;
    let epoch: Epoch = welcome.epoch;
    let long = opened(client.open(tcp(7010), Some(300)).await).lease;
    let also_long = opened(client.open(tcp(7012), Some(300)).await).lease;
    let short = opened(client.open(tcp(7011), Some(3)).await).lease;
    let short_granted = Instant::now();
    assert!(lab.outside_reaches(7010, FIRST_SYN));
    assert!(lab.outside_reaches(7011, FIRST_SYN));
    drop(client);

    // SIGKILL: nothing is cleaned up, and nothing should be: the kernel keeps the openings.
    lab.gateway.kill();
    assert!(
        lab.kernel_has(7010) && lab.kernel_has(7011) && lab.kernel_has(7012),
        "{}",
        lab.kernel_table()
    );
    assert!(
        lab.outside_reaches(7010, FIRST_SYN),
        "traffic stopped when the gateway died"
    );
    // The short lease ends in the kernel by the element's own timeout while the gateway is down.
    assert!(
        lab.wait_reachability(7011, false, Duration::from_secs(8)),
        "the short opening outlived its lifetime with the gateway down"
    );
    assert!(short_granted.elapsed() >= Duration::from_millis(2500));
    assert!(
        lab.outside_reaches(7010, FIRST_SYN),
        "the long opening must still pass"
    );
    // Meanwhile the kernel loses one opening and gains one nobody granted (an operator's
    // mistake, a reload of the firewall): the restart must make the kernel match the store.
    let host = lab.topology.host().v4;
    lab.topology
        .gateway
        .nft_script(&format!(
            "delete element inet fwnp lease4 {{ {host} . tcp . 7012 }}\n\
             add element inet fwnp lease4 {{ {host} . tcp . 7013 timeout 5m }}\n"
        ))
        .expect("change the kernel behind the gateway's back");
    assert!(
        !lab.kernel_has(7012) && lab.kernel_has(7013),
        "{}",
        lab.kernel_table()
    );
    assert!(
        lab.outside_reaches(7013, FIRST_SYN),
        "the stray element lets traffic in"
    );

    // Start again on the same state directory.
    lab.start_gateway();
    let (client, welcome) = lab.connect().await;
    assert_eq!(
        welcome.epoch, epoch,
        "a restart with its state keeps the epoch"
    );
    let leases = client.list().await;
    assert_eq!(leases.epoch, epoch);
    let mut listed: Vec<LeaseId> = leases.leases.iter().map(|l| l.lease).collect();
    listed.sort();
    let mut want = vec![long, also_long];
    want.sort();
    assert_eq!(
        listed, want,
        "the live leases are back, the expired one is not"
    );
    assert!(
        leases
            .leases
            .iter()
            .all(|l| l.remaining > 250 && l.remaining <= 300),
        "{leases:?}"
    );
    // The kernel matches the store: the live openings pass, the expired one stays closed.
    assert!(lab.outside_reaches(7010, FIRST_SYN));
    assert!(lab.outside_reaches(7012, FIRST_SYN));
    assert!(!lab.outside_reaches(7011, REFUSED));
    assert!(!lab.kernel_has(7011));
    assert!(
        lab.kernel_has(7012),
        "the lost opening was not put back: {}",
        lab.kernel_table()
    );
    assert!(
        !lab.kernel_has(7013),
        "the stray opening was not removed: {}",
        lab.kernel_table()
    );
    assert!(!lab.outside_reaches(7013, REFUSED));

    // The lease that expired while the gateway was down is recorded as expired.
    let (status, body) = lab.admin("GET", "/v1/audit?outcome=expired", None).await;
    assert_eq!(status, 200, "{body}");
    let events = body["events"].as_array().expect("events");
    let event = events
        .iter()
        .find(|e| e["lease"] == json!(short.to_string()))
        .unwrap_or_else(|| panic!("no expiry recorded for {short}: {body}"));
    assert_eq!(event["kind"], json!("expiry"));
    assert!(
        event["reason"]
            .as_str()
            .is_some_and(|r| r.contains("stopped")),
        "{event}"
    );
    let (status, body) = lab.admin("GET", "/v1/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["epoch"], json!(format!("{epoch:016x}")));
    assert_eq!(body["live_leases"], json!(2));

    // The restored leases work as before: renew and release.
    granted(client.renew(long, Some(60)).await);
    assert!(matches!(
        client.release(also_long).await,
        Message::Released(_)
    ));
    assert!(!lab.outside_reaches(7012, REFUSED));
    assert!(lab.outside_reaches(7010, FIRST_SYN));
    let _: IpAddr = lab.topology.host().v4;
    let _ = &lab.pki;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_resets_the_connections_of_its_previous_run() {
    if !lab::require_root("a_restarted_gateway_resets_the_connections_of_its_previous_run") {
        return;
    }
    let mut lab = Lab::new("nsreset", &[7020]);
    let (client, _) = lab.connect().await;
    opened(client.open(tcp(7020), Some(60)).await);
    let secret = lab.dir().join("state").join("reset-secret");
    let mode = std::fs::metadata(&secret)
        .unwrap_or_else(|e| panic!("{}: {e}", secret.display()))
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the reset secret is readable by others"
    );
    let before = std::fs::read(&secret).expect("read the secret");

    lab.gateway.kill();
    lab.start_gateway();
    assert_eq!(
        std::fs::read(&secret).expect("read the secret"),
        before,
        "the restart replaced the secret"
    );
    // The old connection's next packet reaches a gateway that has no state for it: the
    // stateless reset it answers with is one the host accepts, so the host knows at once.
    let sent = Instant::now();
    let request = client.connection.open_bi().await;
    if let Ok((mut send, _recv)) = request {
        let _ = send.write_all(b"\xa1\x00\x06").await;
        let _ = send.finish();
    }
    let closed = tokio::time::timeout(Duration::from_secs(2), client.connection.closed())
        .await
        .expect("the old connection is not reset within 2 s");
    assert!(
        matches!(closed, quinn::ConnectionError::Reset),
        "{closed:?} after {:?}",
        sent.elapsed()
    );
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_grants_hosts_no_unidirectional_stream() {
    if !lab::require_root("the_daemon_grants_hosts_no_unidirectional_stream") {
        return;
    }
    let lab = Lab::new("nsuni", &[7030]);
    let (client, _) = lab.connect().await;
    // initial_max_streams_uni is 0: the host gets no credit for a stream of its own.
    let blocked =
        tokio::time::timeout(Duration::from_millis(500), client.connection.open_uni()).await;
    assert!(
        blocked.is_err(),
        "the daemon let the host open a unidirectional stream"
    );
}

/// A renewal that reached the kernel but not the store (the gateway killed in between) leaves
/// the kernel's element longer than the stored lease. The restart's reconcile brings it down to
/// the stored expiry, however small the difference: an opening never outlives its lease,
/// whether or not the gateway is alive at its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_brings_a_kernel_timeout_longer_than_the_stored_lease_down_to_it() {
    if !lab::require_root(
        "a_restart_brings_a_kernel_timeout_longer_than_the_stored_lease_down_to_it",
    ) {
        return;
    }
    let mut lab = Lab::new("nsoutlive", &[7030]);
    let (client, _) = lab.connect().await;
    let lease = opened(client.open(tcp(7030), Some(3600)).await);
    drop(client);
    lab.gateway.kill();
    // As a renewal that the store never committed would leave it: 100 s past the stored expiry
    // (less than the twentieth of an hour a reconcile used to tolerate).
    let host = lab.topology.host().v4;
    lab.topology
        .gateway
        .nft_script(&format!(
            "add element inet fwnp lease4 {{ {host} . tcp . 7030 timeout 3700s expires 3700s }}\n"
        ))
        .expect("lengthen the element behind the gateway's back");
    let layout = fwnp_netfilter::Layout::Gateway(fwnp_netfilter::GatewayLayout::default());
    let remaining = |lab: &Lab| -> Duration {
        lab.topology.gateway.run(|| {
            let mut nf = fwnp_netfilter::Netfilter::open().expect("netfilter handle");
            let elements = nf.elements(&layout).expect("elements");
            elements
                .into_iter()
                .find(|(o, _)| o.host == host && o.ports.first == 7030)
                .map(|(_, left)| left)
                .expect("the element is in the kernel")
        })
    };
    let stored_left = || {
        Duration::from_millis(
            lease
                .expires_ms
                .saturating_sub(fwnp_gateway::store::now_ms()),
        )
    };
    assert!(
        remaining(&lab) > stored_left() + Duration::from_secs(90),
        "the element was not lengthened"
    );
    lab.start_gateway();
    let left = remaining(&lab);
    let stored = stored_left();
    assert!(
        left <= stored + Duration::from_secs(1),
        "after the restart the kernel keeps the opening {left:?}, the stored lease ends in {stored:?}"
    );
    assert!(
        left + Duration::from_secs(5) >= stored,
        "the opening was shortened below its lease: {left:?} left, {stored:?} stored"
    );
}

/// Two hosts (here two certificates for the same address, as hosts behind one NAT address would
/// have) lease the same opening. The kernel's element is theirs together: one releasing its
/// lease leaves it open for the other, with the other's expiry; the last one closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_element_two_leases_hold_stays_until_the_last_one_ends_with_the_latest_expiry() {
    if !lab::require_root(
        "an_element_two_leases_hold_stays_until_the_last_one_ends_with_the_latest_expiry",
    ) {
        return;
    }
    let lab = Lab::new("nsshared", &[7040]);
    let (first, _) = lab.connect().await;
    let other_files = lab.pki.host(
        "web-02",
        &[lab.topology.host().v4, lab.topology.host().v6],
        &[],
        &[],
    );
    let socket = lab.topology.host().netns.run(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind in the host namespace");
        socket.set_nonblocking(true).expect("non-blocking");
        socket
    });
    let second = Client::connect_from_socket(socket, lab.gateway_addr(), &other_files)
        .await
        .expect("the gateway accepts the second host");
    let _ = second.hello().await;
    let host = lab.topology.host().v4;
    let layout = fwnp_netfilter::Layout::Gateway(fwnp_netfilter::GatewayLayout::default());
    let kernel_left = || -> Option<Duration> {
        lab.topology.gateway.run(|| {
            let mut nf = fwnp_netfilter::Netfilter::open().expect("netfilter handle");
            nf.elements(&layout)
                .expect("elements")
                .into_iter()
                .find(|(o, _)| o.host == host && o.ports.first == 7040)
                .map(|(_, left)| left)
        })
    };
    let left_of = |g: &fwnp_proto::Granted| {
        Duration::from_millis(g.expires_ms.saturating_sub(fwnp_gateway::store::now_ms()))
    };
    let near = |kernel: Option<Duration>, want: Duration| {
        kernel.is_some_and(|k| {
            k <= want + Duration::from_secs(1) && k + Duration::from_secs(3) >= want
        })
    };

    let short = opened(first.open(tcp(7040), Some(60)).await);
    let long = opened(second.open(tcp(7040), Some(600)).await);
    assert_ne!(short.lease, long.lease);
    assert!(
        near(kernel_left(), left_of(&long)),
        "the element does not run to the later expiry: {:?}, {:?} wanted",
        kernel_left(),
        left_of(&long)
    );
    // The longer lease goes: the element stays, cut back to the shorter one's expiry.
    assert!(matches!(
        second.release(long.lease).await,
        Message::Released(_)
    ));
    assert!(
        lab.outside_reaches(7040, FIRST_SYN),
        "the other host's release closed a live lease's opening"
    );
    assert!(
        near(kernel_left(), left_of(&short)),
        "the element keeps {:?}, the lease that holds it ends in {:?}",
        kernel_left(),
        left_of(&short)
    );
    // Held again by the second host, then given up by the first: still open.
    let again = opened(second.open(tcp(7040), Some(300)).await);
    assert!(matches!(
        first.release(short.lease).await,
        Message::Released(_)
    ));
    assert!(
        lab.outside_reaches(7040, FIRST_SYN),
        "the first host's release closed the second's opening"
    );
    assert!(near(kernel_left(), left_of(&again)), "{:?}", kernel_left());
    // The last lease ends: closed.
    assert!(matches!(
        second.release(again.lease).await,
        Message::Released(_)
    ));
    assert!(
        !lab.outside_reaches(7040, REFUSED),
        "open after every lease ended"
    );
    assert!(kernel_left().is_none());
}
