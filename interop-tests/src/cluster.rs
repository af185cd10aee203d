//! A cluster deployment: two real `fwnp-gateway` processes on a real three-member etcd cluster
//! (`[store] backend = "etcd"`), each in a namespace of its own with its own kernel filter, in
//! front of one host with the real `fwnp-agent` (configured with both gateways), and a server
//! outside that reaches the host's ports through the active gateway:
//!
//! ```text
//!   server 192.0.2.100 ── wan bridge ──┬── gateway A 192.0.2.1 / 198.51.100.1 ──┬── lan bridge ── host 198.51.100.10
//!                                      └── gateway B 192.0.2.2 / 198.51.100.2 ──┘
//!   etcd cluster (its own namespace) ── one veth to each gateway
//! ```
//!
//! The host's and the server's routes go through one gateway at a time
//! ([`ClusterSite::route_through`]), as a VRRP address would; a gateway's machine dies when its
//! process is killed ([`ClusterDeployment::kill_gateway`]) and its links go down
//! ([`ClusterDeployment::gateway_links`]). The cluster failover test and `fwnp-lab --cluster`
//! both run on it.
//!
//! Everything is removed when the [`ClusterDeployment`] is dropped; the etcd members' data
//! directory is also in the record [`crate::emergency_cleanup`] empties.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fwnp_testkit::etcd::{EtcdCluster, LINK_IF};

use crate::{
    AuditEntry, Binaries, Daemon, LabError, Netns, Pki, Resource, TempDir, audit_at, io_err,
    register, run_ok, table_has, tcp_connects, unregister,
};

/// The gateways' QUIC port.
pub const QUIC_PORT: u16 = 4433;
/// The host's address.
pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The server's address, outside.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// Each gateway's address on the host's network.
pub const LAN: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(198, 51, 100, 2),
];
/// Each gateway's address on the server's network.
pub const WAN: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];
/// The gateways' interface towards the host's network.
pub const LAN_IF: &str = "veth-lan";
/// The gateways' interface towards the server's network.
pub const WAN_IF: &str = "veth-wan";
/// Each gateway's `site` name in the cluster.
pub const SITES: [&str; 2] = ["gw-a", "gw-b"];

/// The policy both gateways load: the hosts may open TCP ports 7000-7999. Lifetimes of 30 s at
/// least: the protocol's timers for shorter ones (idle timeout 3.75 s) would be too slow for
/// the failover's aim; the agent's failover timers are what makes it.
pub const POLICY: &str = r#"
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

/// A connection that gets no answer within this long counts as refused.
const REFUSED: Duration = Duration::from_millis(1200);
/// How long a gateway may take to answer on its admin socket.
const GATEWAY_UP: Duration = Duration::from_secs(10);

/// The names a deployment gives what it creates, so that several can run side by side and a
/// leftover shows whose it is.
#[derive(Debug, Clone)]
pub struct ClusterNames {
    /// The temporary directory's label (`/tmp/fwnp-LABEL-PID-N`).
    pub label: String,
    /// The etcd cluster's name (its namespace is `etcdNAME`, cut to six characters).
    pub etcd: String,
    /// The prefix of the namespaces' names: `PREFIXh` (host), `PREFIXs` (server), `PREFIXga`
    /// and `PREFIXgb` (gateways), `PREFIXlan` and `PREFIXwan` (bridges).
    pub netns: String,
    /// The gateways' key prefix in etcd.
    pub key_prefix: String,
}

/// The namespaces: the host's, the server's, the gateways', and the two networks' bridges.
/// Dropped after the daemons (the deployment holds those), each namespace removes itself.
#[derive(Debug)]
pub struct ClusterSite {
    /// The host, behind the gateways.
    pub host: Netns,
    /// The server, outside.
    pub server: Netns,
    /// Gateway A's and gateway B's.
    pub gateways: [Netns; 2],
    /// The bridge of the host's network.
    pub lan: Netns,
    /// The bridge of the server's network.
    pub wan: Netns,
}

/// `ns`'s interface `ifname` with `cidr`, its other end on the bridge `br0` of `bridge`.
fn join(bridge: &Netns, peer: &str, ns: &Netns, ifname: &str, cidr: &str) -> Result<(), LabError> {
    let what = format!("joining {} to {}", ns.name(), bridge.name());
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
    .map_err(io_err(&what))?;
    bridge
        .ip(&["link", "set", peer, "master", "br0", "up"])
        .map_err(io_err(&what))?;
    ns.ip(&["addr", "add", cidr, "dev", ifname])
        .map_err(io_err(&what))?;
    ns.ip(&["link", "set", ifname, "up"])
        .map_err(io_err(&what))?;
    Ok(())
}

impl ClusterSite {
    /// Builds the namespaces and both networks, with the routes through gateway A.
    pub fn new(prefix: &str) -> Result<ClusterSite, LabError> {
        let netns = |suffix: &str| {
            Netns::new(&format!("{prefix}{suffix}"))
                .map_err(io_err(format!("creating the namespace {prefix}{suffix}")))
        };
        let site = ClusterSite {
            host: netns("h")?,
            server: netns("s")?,
            gateways: [netns("ga")?, netns("gb")?],
            lan: netns("lan")?,
            wan: netns("wan")?,
        };
        for bridge in [&site.lan, &site.wan] {
            bridge
                .ip(&["link", "add", "br0", "type", "bridge"])
                .and_then(|_| bridge.ip(&["link", "set", "br0", "up"]))
                .map_err(io_err(format!("the bridge in {}", bridge.name())))?;
        }
        join(
            &site.lan,
            "p-host",
            &site.host,
            "veth-host",
            &format!("{HOST}/24"),
        )?;
        join(
            &site.wan,
            "p-srv",
            &site.server,
            "veth-srv",
            &format!("{SERVER}/24"),
        )?;
        for (i, gateway) in site.gateways.iter().enumerate() {
            gateway
                .sysctl("net.ipv4.ip_forward", "1")
                .map_err(io_err(format!("forwarding in {}", gateway.name())))?;
            join(
                &site.lan,
                &format!("p-lan{i}"),
                gateway,
                LAN_IF,
                &format!("{}/24", LAN[i]),
            )?;
            join(
                &site.wan,
                &format!("p-wan{i}"),
                gateway,
                WAN_IF,
                &format!("{}/24", WAN[i]),
            )?;
        }
        site.route_through(0)?;
        Ok(site)
    }

    /// The host's and the server's routes through gateway `i` (as a moved VRRP address).
    pub fn route_through(&self, i: usize) -> Result<(), LabError> {
        self.host
            .ip(&["route", "replace", "default", "via", &LAN[i].to_string()])
            .map_err(io_err("the host's route"))?;
        self.server
            .ip(&[
                "route",
                "replace",
                "198.51.100.0/24",
                "via",
                &WAN[i].to_string(),
            ])
            .map_err(io_err("the server's route"))?;
        Ok(())
    }

    /// Whether the server reaches the host's `port` (through whichever gateway routes it).
    pub fn reaches(&self, port: u16) -> bool {
        tcp_connects(&self.server, SocketAddr::from((HOST, port)), None, REFUSED)
    }

    /// Gateway `i`'s table as `nft` lists it.
    pub fn gateway_table(&self, i: usize) -> String {
        self.gateways
            .get(i)
            .and_then(|ns| {
                ns.exec_checked(&["nft", "list", "table", "inet", "fwnp"])
                    .ok()
            })
            .unwrap_or_default()
    }

    /// Whether gateway `i`'s kernel holds an element for the host's `port`.
    pub fn gateway_has(&self, i: usize, port: u16) -> bool {
        table_has(&self.gateway_table(i), Some(IpAddr::V4(HOST)), "tcp", port)
    }

    /// The host's own table as `nft` lists it.
    pub fn host_table(&self) -> String {
        self.host
            .exec_checked(&["nft", "list", "table", "inet", "fwnp_host"])
            .unwrap_or_default()
    }

    /// Whether the host's own kernel holds an element for its `port`.
    pub fn host_has(&self, port: u16) -> bool {
        table_has(&self.host_table(), None, "tcp", port)
    }
}

/// The deployment: the files, the cluster, the namespaces and the daemons.
#[derive(Debug)]
pub struct ClusterDeployment {
    // Declaration order is drop order: daemons, then the cluster and namespaces, then files.
    gateways: [Option<Daemon>; 2],
    agent: Option<Daemon>,
    /// The etcd cluster.
    pub cluster: EtcdCluster,
    /// The namespaces.
    pub site: ClusterSite,
    /// The binaries it runs.
    pub bins: Binaries,
    /// What `fwnpctl pki` printed while the deployment was set up.
    pub pki_output: String,
    names: ClusterNames,
    dir: TempDir,
}

impl ClusterDeployment {
    /// Starts the etcd cluster, builds the namespaces, the PKI and the configurations, and
    /// starts both gateways (each answering on its admin socket) and the agent.
    pub fn start(bins: Binaries, names: &ClusterNames) -> Result<ClusterDeployment, LabError> {
        let dir = TempDir::new(&names.label)?;
        let mut cluster = EtcdCluster::start(&names.etcd)?;
        // Its members are in its namespace, which the emergency cleanup deletes first.
        register(Resource::Dir(cluster.dir()));
        let site = ClusterSite::new(&names.netns)?;
        let (pki, mut pki_output) =
            Pki::init(&bins.fwnpctl, &dir.path().join("pki"), IpAddr::V4(LAN[0]))?;
        pki_output += &pki.issue(&bins.fwnpctl, "gateway", "gateway-b", &[IpAddr::V4(LAN[1])])?;
        pki_output += &pki.issue(&bins.fwnpctl, "host", "web-01", &[IpAddr::V4(HOST)])?;
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
        };
        write("policy.toml", POLICY)?;
        for (i, cert) in ["gateway", "gateway-b"].into_iter().enumerate() {
            let endpoints = cluster
                .connect(&site.gateways[i])
                .map_err(io_err("linking a gateway to etcd"))?;
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
prefix = "{prefix}"
site = "{site}"
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
                prefix = names.key_prefix,
                site = SITES[i],
            );
            write(&format!("gateway-{i}.toml"), &text)?;
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
        write("agent.toml", &agent)?;
        let mut deployment = ClusterDeployment {
            gateways: [None, None],
            agent: None,
            cluster,
            site,
            bins,
            pki_output,
            names: names.clone(),
            dir,
        };
        deployment.start_gateway(0)?;
        deployment.start_gateway(1)?;
        deployment.agent = Some(Daemon::start(
            "fwnp-agent",
            &deployment.site.host,
            &deployment.bins.agent,
            &deployment.dir.path().join("agent.toml"),
            &deployment.dir.path().join("agent.log"),
        )?);
        Ok(deployment)
    }

    /// The deployment's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Gateway `i`'s admin socket.
    pub fn admin(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("gateway-{i}.sock"))
    }

    /// The agent's local API socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Starts gateway `i` and waits until its admin socket answers.
    pub fn start_gateway(&mut self, i: usize) -> Result<(), LabError> {
        let admin = self.admin(i);
        let _ = std::fs::remove_file(&admin);
        let mut daemon = Daemon::start(
            &format!("fwnp-gateway {i}"),
            &self.site.gateways[i],
            &self.bins.gateway,
            &self.dir.path().join(format!("gateway-{i}.toml")),
            &self.dir.path().join(format!("gateway-{i}.log")),
        )?;
        let ready = daemon.wait_ready(GATEWAY_UP, || {
            std::os::unix::net::UnixStream::connect(&admin).is_ok()
        });
        self.gateways[i] = Some(daemon);
        ready
    }

    /// Gateway `i`'s process id, while it runs.
    pub fn gateway_pid(&self, i: usize) -> Option<u32> {
        self.gateways.get(i)?.as_ref()?.pid()
    }

    /// Whether the agent has exited (and how), without waiting.
    pub fn agent_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.agent.as_mut().and_then(Daemon::exited)
    }

    /// Kills gateway `i`'s process with SIGKILL (its kernel table stays, as after a crash).
    pub fn kill_gateway(&mut self, i: usize) {
        if let Some(daemon) = self.gateways[i].as_mut() {
            daemon.kill();
        }
    }

    /// Takes gateway `i`'s links down (or up again): the host's network, the server's, etcd.
    pub fn gateway_links(&self, i: usize, up: bool) -> Result<(), LabError> {
        for link in [LAN_IF, WAN_IF, LINK_IF] {
            self.site.gateways[i]
                .ip(&["link", "set", link, if up { "up" } else { "down" }])
                .map_err(io_err(format!("setting {link} of gateway {i}")))?;
        }
        Ok(())
    }

    /// Whether etcd holds the lease `id` (its key under the deployment's prefix).
    pub fn etcd_has(&self, id: &str) -> bool {
        let endpoints = self.cluster.endpoints().join(",");
        let leases = format!("{}/leases/", self.names.key_prefix);
        self.cluster
            .netns()
            .exec(&[
                "etcdctl",
                "--endpoints",
                &endpoints,
                "get",
                "--prefix",
                &leases,
                "--keys-only",
            ])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(id))
    }

    /// Runs `fwnpctl ARGS` against gateway `i`; returns its standard output.
    pub fn fwnpctl(&self, i: usize, args: &[&str]) -> Result<String, LabError> {
        run_ok(
            std::process::Command::new(&self.bins.fwnpctl)
                .arg("--admin")
                .arg(self.admin(i))
                .args(args),
        )
    }

    /// The cluster's audit trail through gateway `i` (see [`crate::audit_at`]).
    pub fn audit(&self, i: usize, args: &[&str]) -> Result<Vec<AuditEntry>, LabError> {
        audit_at(&self.bins.fwnpctl, &self.admin(i), args)
    }

    /// The last 30 lines of each daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        self.log_tails(30)
    }

    /// The last `lines` lines of each daemon's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["gateway-0.log", "gateway-1.log", "agent.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out += &format!(
                "--- {name}\n{}\n",
                all[all.len().saturating_sub(lines)..].join("\n")
            );
        }
        out
    }
}

impl Drop for ClusterDeployment {
    fn drop(&mut self) {
        // The fields drop after this: the cluster removes its directory itself.
        unregister(&Resource::Dir(self.cluster.dir()));
    }
}

/// The index of the gateway listening at `address` (as the agent's status names it).
pub fn gateway_index(address: &str) -> Option<usize> {
    LAN.iter()
        .position(|ip| address == SocketAddr::from((*ip, QUIC_PORT)).to_string())
}
