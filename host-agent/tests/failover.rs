//! The real `fwnp-agent` with two gateways of one cluster on loopback: real QUIC endpoints
//! with the gateway's TLS configuration and certificates, scripted to share one lease table as
//! a cluster does (a lease granted through one is renewed through the other). The first
//! gateway's machine dies: its packets stop, with no close and no reset (a relay in front of
//! it drops everything, as a dead machine or a cut link does). The agent must notice within a
//! second or two although the lifetimes would allow it much longer, go on with the second
//! gateway at once, and renew the lease there under its own id: no re-open, no expiry, and
//! the application hears nothing but that the lease was renewed. No root needed (mirror off).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scripted::{
    Conduct, LeaseTable, Reply, Terms, agent_config_with_gateways, lock, serve, spawn_gateway,
    start_agent,
};
use common::*;
use fwnp_proto::codec::DecodeError;
use fwnp_proto::local::{EventKind, LocalMessage};
use fwnp_proto::{Epoch, Message};

/// The cluster's one epoch.
const EPOCH: Epoch = 0x5c21_97ed_0000_00c1;
/// Long enough that no renewal falls due during the test on its own, and that the protocol's
/// M/8 idle timeout (7.5 s) would be far too slow to fail over in time.
const LIFETIME_SECS: u32 = 60;
const RENEW_AFTER_SECS: u32 = 45;
const TERMS: Terms = Terms {
    epoch: EPOCH,
    lifetime: LIFETIME_SECS,
    renew_after: RENEW_AFTER_SECS,
    lifetimes: (LIFETIME_SECS, LIFETIME_SECS),
    lease_fill: 0xc1,
};
/// The bound asserted from a gateway's death to the renewal answered by another: the aim is
/// 3 s (1.5 s of silence, a handshake, a Renew; about 1.9 s here), with a margin for a loaded
/// machine. Without the failover timers it takes the M/8 idle timeout, 7.5 s and more.
const BOUND: Duration = Duration::from_secs(4);

/// One request as a gateway of the scripted cluster saw it.
#[derive(Debug, Clone)]
struct Seen {
    gateway: char,
    at: Instant,
    remote: IpAddr,
    request: Message,
}

/// The scripted cluster's shared state: the leases, and every request each gateway answered.
#[derive(Debug, Default)]
struct Cluster {
    leases: LeaseTable,
    seen: Vec<Seen>,
}

/// A gateway of the scripted cluster, named by a letter: it notes each request and answers it
/// on the shared lease table.
struct Member {
    name: char,
    cluster: Arc<Mutex<Cluster>>,
}

impl Conduct for Member {
    fn reply(&self, request: Result<Message, DecodeError>, remote: IpAddr) -> Reply {
        let Ok(request) = request else {
            return Reply::Nothing;
        };
        let mut cluster = lock(&self.cluster);
        cluster.seen.push(Seen {
            gateway: self.name,
            at: Instant::now(),
            remote,
            request: request.clone(),
        });
        Reply::Answer(cluster.leases.answer(&TERMS, &request, remote))
    }
}

/// Gateway `name` of `cluster`.
fn member(name: char, cluster: &Arc<Mutex<Cluster>>) -> Arc<Member> {
    Arc::new(Member {
        name,
        cluster: cluster.clone(),
    })
}

/// A UDP relay on loopback in front of a gateway, for one client; when `alive` turns false it
/// drops every datagram both ways, as a machine that died does. Its threads end with the test
/// process (each read waits at most 50 ms, and they stop once `alive` is false).
fn relay(upstream: SocketAddr, alive: Arc<AtomicBool>) -> SocketAddr {
    let front = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the relay");
    let back = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the relay");
    back.connect(upstream).expect("connect the relay");
    for socket in [&front, &back] {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
    }
    let address = front.local_addr().expect("address");
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let (front2, back2) = (
        front.try_clone().expect("clone"),
        back.try_clone().expect("clone"),
    );
    let (alive2, client2) = (alive.clone(), client.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 65_536];
        while alive.load(Ordering::SeqCst) {
            if let Ok((n, from)) = front.recv_from(&mut buf) {
                *lock(&client) = Some(from);
                if alive.load(Ordering::SeqCst) {
                    let _ = back.send(&buf[..n]);
                }
            }
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 65_536];
        while alive2.load(Ordering::SeqCst) {
            if let Ok(n) = back2.recv(&mut buf) {
                let to = *lock(&client2);
                if let (Some(to), true) = (to, alive2.load(Ordering::SeqCst)) {
                    let _ = front2.send_to(&buf[..n], to);
                }
            }
        }
    });
    address
}

#[test]
fn the_agent_fails_over_to_the_next_gateway_and_renews_its_lease_there_within_seconds() {
    let pki = scripted::pki("failover");
    let runtime = scripted::runtime();
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let a_alive = Arc::new(AtomicBool::new(true));
    let a = relay(
        spawn_gateway(&pki, &runtime, member('A', &cluster)),
        a_alive.clone(),
    );
    let b = spawn_gateway(&pki, &runtime, member('B', &cluster));

    let dir = temp_dir("failover");
    let (_agent, socket) = start_agent(&pki, &dir, &[a, b]);
    let mut status = LocalClient::connect(&socket);
    let deadline = Instant::now() + STEP;
    loop {
        let now = status.status();
        if now.connected {
            assert_eq!(now.gateway, a.to_string(), "the first gateway listed first");
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut client = LocalClient::connect(&socket);
    let granted = match client.open(fwnp_proto::Protocol::Tcp, port, None, STEP) {
        LocalMessage::Wire(Message::Granted(granted)) => granted,
        other => panic!("Open answered with {other:?}"),
    };
    client.watch(Some(granted.lease));
    // A connection that lived less than a second is not followed at once by the next gateway.
    std::thread::sleep(Duration::from_millis(1200));

    // Gateway A's machine dies.
    a_alive.store(false, Ordering::SeqCst);
    let died = Instant::now();

    let renewed = client
        .event(STEP)
        .into_iter()
        .chain(std::iter::from_fn(|| client.event(STEP)))
        .find(|e| e.kind != EventKind::GatewayUnreachable)
        .expect("no event after the failover");
    let answered = died.elapsed();
    assert_eq!(
        (renewed.kind, renewed.lease),
        (EventKind::Renewed, granted.lease),
        "{renewed:?}"
    );
    eprintln!("failover: gateway A died, the lease was renewed through B {answered:?} later");
    assert!(
        answered < BOUND,
        "renewed through B {answered:?} after A died, bound {BOUND:?}"
    );
    let now = status.status();
    assert_eq!((now.connected, now.gateway), (true, b.to_string()));

    let cluster = lock(&cluster);
    let opens: Vec<&Seen> = cluster
        .seen
        .iter()
        .filter(|s| matches!(s.request, Message::Open(_)))
        .collect();
    assert_eq!(opens.len(), 1, "opened again: {opens:?}");
    assert_eq!(opens[0].gateway, 'A');
    let renewals: Vec<&Seen> = cluster
        .seen
        .iter()
        .filter(|s| matches!(&s.request, Message::Renew(r) if r.lease == granted.lease))
        .collect();
    assert!(
        !renewals.is_empty() && renewals.iter().all(|s| s.gateway == 'B' && s.at > died),
        "{renewals:?}"
    );
    drop(listener);
}

/// Namespace-specific files that `ip netns exec` puts in place of those of `/etc` (see
/// ip-netns(8)): `resolv.conf`, `hosts`; removed when dropped.
struct NetnsEtc(std::path::PathBuf);

impl NetnsEtc {
    fn write(ns: &fwnp_testkit::netns::Netns, files: &[(&str, String)]) -> Self {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{}", ns.name()));
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        let etc = NetnsEtc(dir);
        for (name, text) in files {
            std::fs::write(etc.0.join(name), text).expect("write a file of /etc/netns/NAME");
        }
        etc
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A scripted gateway ('A') whose socket is made inside `ns`, on its loopback, where the agent
/// will look for it: its runtime (keep it), the cluster's record and the port.
fn scripted_gateway_in(
    ns: &fwnp_testkit::netns::Netns,
    pki: &Pki,
) -> (tokio::runtime::Runtime, Arc<Mutex<Cluster>>, u16) {
    let runtime = scripted::runtime();
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let endpoint = ns.run(|| gateway_endpoint(pki, &runtime));
    let port = endpoint.local_addr().expect("address").port();
    runtime.spawn(serve(endpoint, member('A', &cluster)));
    (runtime, cluster, port)
}

/// Starts the agent of `config` (its socket in `dir`) in `ns` and waits `within` for its Status
/// to say it is connected, through `what`.
fn agent_connected_in(
    ns: &fwnp_testkit::netns::Netns,
    config: &std::path::Path,
    dir: &std::path::Path,
    within: Duration,
    what: &str,
) -> (ProcessGuard, fwnp_proto::local::StatusAnswer) {
    let socket = dir.join("agent.sock");
    let mut agent = ProcessGuard(Some(
        ns.spawn(&mut agent_command(config))
            .expect("start fwnp-agent"),
    ));
    wait_for_socket(&mut agent, &socket);
    let mut status = LocalClient::connect(&socket);
    let deadline = Instant::now() + within;
    loop {
        let now = status.status();
        if now.connected {
            return (agent, now);
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not connect through {what}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent configured with an SRV name finds its gateway through DNS (a real dnsmasq on the
/// loopback of a namespace of its own): the target of the lowest priority has no address, so
/// the agent goes on with the next one, verifies its certificate against the target's name and
/// connects; Status names that target.
#[test]
fn an_srv_name_is_looked_up_and_its_targets_tried_in_priority_order() {
    let test = "an_srv_name_is_looked_up_and_its_targets_tried_in_priority_order";
    if !dnsmasq_available(test) {
        return;
    }
    let ns = fwnp_testkit::netns::Netns::new("srv").expect("namespace");
    let _resolv = NetnsEtc::write(&ns, &[("resolv.conf", "nameserver 127.0.0.1\n".into())]);
    let pki = scripted::pki("srv");
    let (_runtime, cluster, port) = scripted_gateway_in(&ns, &pki);

    let _dnsmasq = start_dnsmasq(
        &ns,
        &[
            "--srv-host=_fwnp._udp.example.test,nowhere.example.test,4433,10,0",
            &format!("--srv-host=_fwnp._udp.example.test,{GATEWAY_NAME},{port},20,0"),
            &format!("--host-record={GATEWAY_NAME},127.0.0.1"),
        ],
    );

    let dir = temp_dir("srv");
    let config = dir.path().join("agent.toml");
    let text = agent_config_with_gateways(&pki, dir.path(), "srv = \"_fwnp._udp.example.test\"")
        .replace(&format!("server_name = \"{GATEWAY_NAME}\"\n"), "");
    assert!(
        text.contains("srv = ") && !text.contains("server_name"),
        "{text}"
    );
    std::fs::write(&config, text).expect("write config");
    let (_agent, connected) = agent_connected_in(&ns, &config, dir.path(), STEP, "the SRV name");
    assert_eq!(connected.gateway, format!("{GATEWAY_NAME}:{port}"));
    let cluster = lock(&cluster);
    assert!(
        cluster
            .seen
            .iter()
            .any(|s| matches!(s.request, Message::Hello(_))),
        "{:?}",
        cluster.seen
    );
}

/// A gateway name whose first address is dead (here IPv6's loopback, which the C library puts
/// first and where nothing listens, the classic broken-IPv6 case) costs the agent a moment: the
/// next address is tried a quarter of a second later, long before the first one's handshake
/// would give up, and the agent connects through it.
#[test]
fn a_name_whose_first_address_is_dead_is_reached_through_the_next() {
    let test = "a_name_whose_first_address_is_dead_is_reached_through_the_next";
    if !fwnp_testkit::netns::require_root(test) {
        return;
    }
    let ns = fwnp_testkit::netns::Netns::new("addrs").expect("namespace");
    let _hosts = NetnsEtc::write(
        &ns,
        &[(
            "hosts",
            format!("::1 {GATEWAY_NAME}\n127.0.0.1 {GATEWAY_NAME}\n"),
        )],
    );
    let pki = scripted::pki("addrs");
    // The gateway listens on IPv4's loopback only.
    let (_runtime, cluster, port) = scripted_gateway_in(&ns, &pki);

    let dir = temp_dir("addrs");
    let config = dir.path().join("agent.toml");
    let text = agent_config(
        &pki,
        "web-01",
        dir.path(),
        &format!("{GATEWAY_NAME}:{port}"),
        "off",
        &my_uid().to_string(),
        "1s",
    );
    std::fs::write(&config, text).expect("write config");
    // Well inside one handshake timeout: an agent that tried only the first address would
    // never connect, one that waited for it to give up would take longer.
    let (_agent, connected) = agent_connected_in(
        &ns,
        &config,
        dir.path(),
        fwnp_proto::link::HANDSHAKE_TIMEOUT / 2,
        "the second address",
    );
    assert_eq!(connected.gateway, format!("{GATEWAY_NAME}:{port}"));
    let cluster = lock(&cluster);
    let hello = cluster
        .seen
        .iter()
        .find(|s| matches!(s.request, Message::Hello(_)))
        .unwrap_or_else(|| panic!("no Hello: {:?}", cluster.seen));
    assert_eq!(hello.remote, IpAddr::V4(Ipv4Addr::LOCALHOST));
}
