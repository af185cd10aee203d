//! Two real `fwnp-gateway` processes on a real three-member etcd cluster (`backend = "etcd"`),
//! each in a namespace of its own with its own kernel filter, in front of one host with the
//! real `fwnp-agent` (configured with both gateways) and an application holding leases, and a
//! server outside that connects to the host's ports through the active gateway:
//!
//! ```text
//!   server 192.0.2.100 ── wan bridge ──┬── gateway A 192.0.2.1 / 198.51.100.1 ──┬── lan bridge ── host 198.51.100.10
//!                                      └── gateway B 192.0.2.2 / 198.51.100.2 ──┘
//!   etcd cluster (its own namespace) ── one veth to each gateway
//! ```
//!
//! The active gateway's machine dies: its process is killed with SIGKILL and its links go
//! down, and the routes of the host and the server move to the other gateway, as a VRRP address
//! would. The host's traffic goes on through the other gateway's kernel, which already held the
//! opening; the agent's renewals are answered there within seconds (measured and printed); no
//! lease is lost. The dead gateway comes back and reconciles its kernel from the cluster. Then
//! a bounded campaign: 20 times the gateway the agent is connected to is killed with SIGKILL
//! (its process alone) while the application keeps opening leases, and restarted; every
//! granted lease stays live in etcd and in both kernels, and none is re-opened or lost.
//!
//! Needs root, nftables and etcd: skipped otherwise, failing instead when
//! FWNP_REQUIRE_NETNS=1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fwnp_interop_tests::{
    Binaries, Daemon, Netns, Pki, TcpEchoServer, TempDir, table_has, tcp_connects, wait_until,
};
use fwnp_sdk::{Client, Lease, LeaseEvent, Opening};
use fwnp_testkit::etcd::{EtcdCluster, LINK_IF, available};

const QUIC_PORT: u16 = 4433;
const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// Each gateway's address on the host's network and on the server's.
const LAN: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(198, 51, 100, 2),
];
const WAN: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];
/// The gateways' interfaces towards the host's and the server's networks.
const LAN_IF: &str = "veth-lan";
const WAN_IF: &str = "veth-wan";

/// Lifetimes of 30 s at least: the protocol's timers for them (idle timeout 3.75 s) would be
/// too slow for the aim; the agent's failover timers are what makes it.
const POLICY: &str = r#"
[defaults]
lifetime = "30s"
min_lifetime = "30s"
max_lifetime = "5m"
max_leases = 64

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// The aim: from a gateway's death to the host's renewals answered by another.
const AIM: Duration = Duration::from_secs(3);
/// A connection that gets no answer within this long counts as refused.
const REFUSED: Duration = Duration::from_millis(1200);
/// Bound of every wait for a change to show.
const SETTLE: Duration = Duration::from_secs(10);
/// How many times the campaign kills a gateway.
const KILL_POINTS: usize = 20;

/// The namespaces: the host's, the server's, the gateways', and the two networks' bridges.
/// Dropped after the daemons (the test holds those), each namespace removes itself.
struct Site {
    host: Netns,
    server: Netns,
    gateways: [Netns; 2],
    lan: Netns,
    wan: Netns,
}

/// `ns`'s interface `ifname` with `cidr`, its other end on the bridge `br0` of `bridge`.
fn join(bridge: &Netns, peer: &str, ns: &Netns, ifname: &str, cidr: &str) {
    ns.ip(&[
        "link",
        "add",
        ifname,
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        bridge.name(),
    ])
    .expect("veth");
    bridge
        .ip(&["link", "set", peer, "master", "br0", "up"])
        .expect("on the bridge");
    ns.ip(&["addr", "add", cidr, "dev", ifname])
        .expect("address");
    ns.ip(&["link", "set", ifname, "up"]).expect("up");
}

impl Site {
    fn new() -> Site {
        let site = Site {
            host: Netns::new("cfh").expect("namespace"),
            server: Netns::new("cfs").expect("namespace"),
            gateways: [
                Netns::new("cfga").expect("namespace"),
                Netns::new("cfgb").expect("namespace"),
            ],
            lan: Netns::new("cflan").expect("namespace"),
            wan: Netns::new("cfwan").expect("namespace"),
        };
        for bridge in [&site.lan, &site.wan] {
            bridge
                .ip(&["link", "add", "br0", "type", "bridge"])
                .expect("bridge");
            bridge.ip(&["link", "set", "br0", "up"]).expect("bridge up");
        }
        join(
            &site.lan,
            "p-host",
            &site.host,
            "veth-host",
            &format!("{HOST}/24"),
        );
        join(
            &site.wan,
            "p-srv",
            &site.server,
            "veth-srv",
            &format!("{SERVER}/24"),
        );
        for (i, gateway) in site.gateways.iter().enumerate() {
            gateway
                .sysctl("net.ipv4.ip_forward", "1")
                .expect("forwarding");
            join(
                &site.lan,
                &format!("p-lan{i}"),
                gateway,
                LAN_IF,
                &format!("{}/24", LAN[i]),
            );
            join(
                &site.wan,
                &format!("p-wan{i}"),
                gateway,
                WAN_IF,
                &format!("{}/24", WAN[i]),
            );
        }
        site.route_through(0);
        site
    }

    /// The host's and the server's routes through gateway `i` (as a moved VRRP address).
    fn route_through(&self, i: usize) {
        self.host
            .ip(&["route", "replace", "default", "via", &LAN[i].to_string()])
            .expect("host route");
        self.server
            .ip(&[
                "route",
                "replace",
                "198.51.100.0/24",
                "via",
                &WAN[i].to_string(),
            ])
            .expect("server route");
    }

    /// Whether the server reaches the host's `port` (through whichever gateway routes it).
    fn reaches(&self, port: u16) -> bool {
        tcp_connects(&self.server, SocketAddr::from((HOST, port)), None, REFUSED)
    }

    /// Whether gateway `i`'s kernel holds an element for the host's `port`.
    fn gateway_has(&self, i: usize, port: u16) -> bool {
        let table = self.gateways[i]
            .exec_checked(&["nft", "list", "table", "inet", "fwnp"])
            .unwrap_or_default();
        table_has(&table, Some(IpAddr::V4(HOST)), "tcp", port)
    }

    /// Whether the host's own kernel holds an element for its `port`.
    fn host_has(&self, port: u16) -> bool {
        let table = self
            .host
            .exec_checked(&["nft", "list", "table", "inet", "fwnp_host"])
            .unwrap_or_default();
        table_has(&table, None, "tcp", port)
    }
}

/// The deployment: the files, the cluster, the namespaces and the daemons.
struct Deployment {
    // Declaration order is drop order: daemons, then the cluster and namespaces, then files.
    gateways: [Option<Daemon>; 2],
    agent: Option<Daemon>,
    cluster: EtcdCluster,
    site: Site,
    bins: Binaries,
    dir: TempDir,
}

impl Deployment {
    fn start() -> Deployment {
        let bins = Binaries::build().unwrap_or_else(|e| panic!("the binaries: {e}"));
        let dir = TempDir::new("cluster-failover").expect("temp dir");
        let mut cluster = EtcdCluster::start("cfail");
        let site = Site::new();
        let (pki, _) =
            Pki::init(&bins.fwnpctl, &dir.path().join("pki"), IpAddr::V4(LAN[0])).expect("pki");
        pki.issue(&bins.fwnpctl, "gateway", "gateway-b", &[IpAddr::V4(LAN[1])])
            .expect("gateway B's certificate");
        pki.issue(&bins.fwnpctl, "host", "web-01", &[IpAddr::V4(HOST)])
            .expect("the host's certificate");
        std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
        for (i, cert) in ["gateway", "gateway-b"].into_iter().enumerate() {
            let endpoints = cluster.connect(&site.gateways[i]).expect("etcd link");
            let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
            let text = format!(
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
protected = ["198.51.100.0/24"]
inbound_interfaces = []
refuse = "drop"
kill_connections = false

[store]
backend = "etcd"
endpoints = [{endpoints}]
prefix = "/fwnp-failover"
site = "gw-{name}"
timeout = "1s"
"#,
                listen = SocketAddr::from((LAN[i], QUIC_PORT)),
                cert = pki.file(&format!("{cert}.pem")).display(),
                key = pki.file(&format!("{cert}.key")).display(),
                ca = pki.file("ca.pem").display(),
                policy = dir.path().join("policy.toml").display(),
                state = dir.path().join(format!("gateway-{i}-state")).display(),
                admin = dir.path().join(format!("gateway-{i}.sock")).display(),
                endpoints = endpoints.join(", "),
                name = ["a", "b"][i],
            );
            std::fs::write(dir.path().join(format!("gateway-{i}.toml")), text)
                .expect("gateway config");
        }
        let agent = format!(
            r#"state_dir = "{state}"

[gateway]
addresses = ["{a}", "{b}"]
certificate = "{cert}"
key = "{key}"
ca = "{ca}"

[local]
socket = "{socket}"
verify_port_owner = false

[mirror]
mode = "enforce"
table = "fwnp_host"
"#,
            state = dir.path().join("agent-state").display(),
            a = SocketAddr::from((LAN[0], QUIC_PORT)),
            b = SocketAddr::from((LAN[1], QUIC_PORT)),
            cert = pki.file("web-01.pem").display(),
            key = pki.file("web-01.key").display(),
            ca = pki.file("ca.pem").display(),
            socket = dir.path().join("agent.sock").display(),
        );
        std::fs::write(dir.path().join("agent.toml"), agent).expect("agent config");
        let mut deployment = Deployment {
            gateways: [None, None],
            agent: None,
            cluster,
            site,
            bins,
            dir,
        };
        deployment.start_gateway(0);
        deployment.start_gateway(1);
        deployment.agent = Some(
            Daemon::start(
                "fwnp-agent",
                &deployment.site.host,
                &deployment.bins.agent,
                &deployment.dir.path().join("agent.toml"),
                &deployment.dir.path().join("agent.log"),
            )
            .expect("agent"),
        );
        deployment
    }

    fn admin(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("gateway-{i}.sock"))
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Starts gateway `i` and waits until its admin socket answers.
    fn start_gateway(&mut self, i: usize) {
        let admin = self.admin(i);
        let _ = std::fs::remove_file(&admin);
        let daemon = Daemon::start(
            &format!("fwnp-gateway {i}"),
            &self.site.gateways[i],
            &self.bins.gateway,
            &self.dir.path().join(format!("gateway-{i}.toml")),
            &self.dir.path().join(format!("gateway-{i}.log")),
        )
        .expect("gateway");
        self.gateways[i] = Some(daemon);
        let up = wait_until(SETTLE, Duration::from_millis(50), || {
            std::os::unix::net::UnixStream::connect(&admin).is_ok()
        });
        assert!(up, "gateway {i} did not come up:\n{}", self.logs());
    }

    /// Kills gateway `i`'s process with SIGKILL (its kernel table stays, as after a crash).
    fn kill_gateway(&mut self, i: usize) {
        if let Some(daemon) = self.gateways[i].as_mut() {
            daemon.kill();
        }
    }

    /// Takes gateway `i`'s links down (or up again): the host's network, the server's, etcd.
    fn gateway_links(&self, i: usize, up: bool) {
        for link in [LAN_IF, WAN_IF, LINK_IF] {
            self.site.gateways[i]
                .ip(&["link", "set", link, if up { "up" } else { "down" }])
                .expect("link state");
        }
    }

    /// Whether etcd holds the lease `id` (its key under the deployment's prefix).
    fn etcd_has(&self, id: &str) -> bool {
        let endpoints = self.cluster.endpoints().join(",");
        self.cluster
            .netns()
            .exec(&[
                "etcdctl",
                "--endpoints",
                &endpoints,
                "get",
                "--prefix",
                "/fwnp-failover/leases/",
                "--keys-only",
            ])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(id))
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["gateway-0.log", "gateway-1.log", "agent.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!(
                "--- {name}\n{}\n",
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        out
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// Waits (bounded) for the agent to report a connection, and returns to which gateway.
async fn connected_gateway(client: &Client) -> Option<String> {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if let Ok(status) = client.status().await
            && status.connected
        {
            return Some(status.gateway);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The index of the gateway listening at `address`.
fn gateway_index(address: &str) -> usize {
    LAN.iter()
        .position(|ip| address == SocketAddr::from((*ip, QUIC_PORT)).to_string())
        .unwrap_or_else(|| panic!("unknown gateway {address}"))
}

/// Every event of `lease` that is not a renewal, received within `limit`.
async fn other_events(lease: &mut Lease, limit: Duration) -> Vec<LeaseEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, lease.next_event()).await {
        if !matches!(
            event,
            LeaseEvent::Renewed { .. } | LeaseEvent::GatewayUnreachable { .. }
        ) {
            seen.push(event);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_gateway_dies_and_the_host_fails_over_without_losing_a_lease() {
    let test = "the_active_gateway_dies_and_the_host_fails_over_without_losing_a_lease";
    if !available(test) {
        return;
    }
    let mut d = tokio::task::block_in_place(Deployment::start);
    let client = Client::connect_to(d.agent_socket()).await;
    let socket = path_str(&d.agent_socket());
    let client = match client {
        Ok(client) => client,
        Err(_) => {
            let up = tokio::task::block_in_place(|| {
                wait_until(SETTLE, Duration::from_millis(50), || {
                    Path::new(&socket).exists()
                })
            });
            assert!(up, "the agent's socket:\n{}", d.logs());
            Client::connect_to(d.agent_socket())
                .await
                .expect("connect to the agent")
        }
    };
    let first = connected_gateway(&client).await;
    assert_eq!(
        first.as_deref().map(gateway_index),
        Some(0),
        "the agent connects to the first gateway listed:\n{}",
        d.logs()
    );

    // An application serving on the host holds a lease; the server reaches it through A.
    let ports: Vec<u16> = (7001..7001 + KILL_POINTS as u16 + 1).collect();
    let echo = TcpEchoServer::start_ports(&d.site.host, &ports).expect("echo server");
    let mut lease = client
        .open(Opening::tcp(ports[0]))
        .await
        .unwrap_or_else(|e| panic!("open: {e}\n{}", d.logs()));
    let id = lease.id();
    tokio::task::block_in_place(|| {
        assert!(d.site.reaches(ports[0]), "not through A:\n{}", d.logs());
        // The standby already holds the opening in its own kernel.
        assert!(
            wait_until(SETTLE, Duration::from_millis(50), || d
                .site
                .gateway_has(1, ports[0])),
            "gateway B's kernel never held the opening granted through A:\n{}",
            d.logs()
        );
    });
    // A connection that lived less than a second is not followed at once by the next gateway.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // A's machine dies; the routes move to B.
    let died = Instant::now();
    d.kill_gateway(0);
    d.gateway_links(0, false);
    d.site.route_through(1);

    let renewed = tokio::time::timeout(SETTLE, async {
        loop {
            match lease.next_event().await {
                Some(LeaseEvent::Renewed { .. }) => return Ok(died.elapsed()),
                // The agent tells that it lost A before it is on B.
                Some(LeaseEvent::GatewayUnreachable { .. }) => continue,
                Some(other) => return Err(format!("{other:?}")),
                None => return Err("the event stream ended".into()),
            }
        }
    })
    .await;
    let answered = match renewed {
        Ok(Ok(after)) => after,
        Ok(Err(event)) => panic!("instead of a renewal: {event}\n{}", d.logs()),
        Err(_) => panic!("no renewal within {SETTLE:?} of A's death:\n{}", d.logs()),
    };
    eprintln!("failover: gateway A died; the lease was renewed through B {answered:?} later");
    assert_eq!(
        connected_gateway(&client)
            .await
            .as_deref()
            .map(gateway_index),
        Some(1)
    );
    assert_eq!(lease.id(), id, "the lease was opened again");
    tokio::task::block_in_place(|| {
        assert!(d.site.reaches(ports[0]), "not through B:\n{}", d.logs());
        assert!(d.site.host_has(ports[0]), "the host's kernel lost it");
        assert!(d.etcd_has(&id.to_string()), "etcd lost the lease");
    });
    // Reported against the aim rather than asserted at it: a loaded machine may add a second.
    assert!(
        answered < AIM * 2,
        "renewed through B {answered:?} after A's death (aim {AIM:?})"
    );

    // A comes back (links and process): it rejoins and its kernel holds the lease again.
    tokio::task::block_in_place(|| {
        d.gateway_links(0, true);
        d.start_gateway(0);
        assert!(
            wait_until(SETTLE, Duration::from_millis(50), || d
                .site
                .gateway_has(0, ports[0])),
            "the restarted gateway A did not reconcile its kernel:\n{}",
            d.logs()
        );
    });

    // The campaign: the gateway the agent uses is killed (its process alone) while the
    // application opens more leases, then restarted; 20 times.
    let mut leases = vec![lease];
    let mut grant_after_kill = Vec::new();
    for (point, port) in ports[1..].iter().enumerate() {
        let active = connected_gateway(&client)
            .await
            .map(|g| gateway_index(&g))
            .unwrap_or_else(|| panic!("point {point}: the agent is not connected:\n{}", d.logs()));
        let killed = Instant::now();
        d.kill_gateway(active);
        let other = 1 - active;
        d.site.route_through(other);
        // Load meanwhile: an Open, answered once the agent is on the other gateway.
        let opened = tokio::time::timeout(SETTLE, async {
            loop {
                match client.open(Opening::tcp(*port)).await {
                    Ok(lease) => return lease,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "point {point}: no grant through the other gateway:\n{}",
                d.logs()
            )
        });
        grant_after_kill.push(killed.elapsed());
        leases.push(opened);
        tokio::task::block_in_place(|| d.start_gateway(active));
    }
    grant_after_kill.sort();
    eprintln!(
        "campaign: {KILL_POINTS} SIGKILL points; a new lease granted through the other gateway \
         after the kill: median {:?}, slowest {:?}",
        grant_after_kill[grant_after_kill.len() / 2],
        grant_after_kill[grant_after_kill.len() - 1]
    );

    // Every granted lease is live: in etcd, in both kernels, on the host; none re-opened.
    tokio::task::block_in_place(|| {
        for (lease, port) in leases.iter().zip(&ports) {
            let id = lease.id().to_string();
            assert!(d.etcd_has(&id), "etcd lost {id}:\n{}", d.logs());
            for i in 0..2 {
                assert!(
                    wait_until(SETTLE, Duration::from_millis(50), || d
                        .site
                        .gateway_has(i, *port)),
                    "gateway {i}'s kernel lost tcp/{port}:\n{}",
                    d.logs()
                );
            }
            assert!(d.site.host_has(*port), "the host's kernel lost tcp/{port}");
        }
        assert!(d.site.reaches(ports[KILL_POINTS]));
    });
    for (lease, port) in leases.iter_mut().zip(&ports) {
        let others = other_events(lease, Duration::from_millis(10)).await;
        assert!(others.is_empty(), "tcp/{port}: {others:?}\n{}", d.logs());
        assert!(lease.is_active(), "tcp/{port} is no longer active");
    }
    drop(echo);
}
