//! End-to-end machinery for FWNP: a whole deployment in network namespaces, run from the real
//! binaries.
//!
//! This crate holds the lab demo (`fwnp-lab`), the end-to-end suite (`tests/`) and the load
//! generator (`fwnp-load`). This library is what the first two share: a [`Topology`] of network
//! namespaces (an outside network, a gateway and any number of hosts behind it on one inside
//! bridge, IPv4 and IPv6), a [`Pki`] made with `fwnpctl pki`, and a [`Lab`] that writes the
//! configurations, starts the real `fwnp-gateway` and one real `fwnp-agent` per host in their
//! namespaces, and offers the probes a story needs: can the outside reach a host's port, does the
//! gateway's or the host's table hold an element for it, what does `fwnpctl audit --json` say.
//! Its [`cluster`] module builds the deployment of two gateways on an etcd cluster that the
//! failover test and the lab's cluster story share.
//! It is not a library for the product: nothing here is used by the daemons.
//!
//! Everything is torn down when a [`Lab`] is dropped, also when a test panics: the daemons are
//! killed, the namespaces deleted (with any process left in them), the temporary directory
//! removed. The binaries are found beside the running executable in cargo's target directory
//! ([`Binaries::locate`]); [`Binaries::build`] runs the `cargo build` that makes them first.
//!
//! Every address lies in the documentation ranges (192.0.2.0/24, 198.51.100.0/24) or the
//! unique-local range fd00::/8 and exists only inside the lab's namespaces.

#![forbid(unsafe_code)]

pub mod cluster;

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use fwnp_testkit::binaries::{BUILD_COMMAND, Binaries, BinariesError};
pub use fwnp_testkit::netns::{
    Host, Netns, REQUIRE_NETNS_VAR, TcpEchoServer, Topology, UdpEchoServer, require_root,
    tcp_connects, udp_roundtrip, wait_until,
};

/// The gateway's QUIC port, on its inside address.
pub const GATEWAY_PORT: u16 = 4433;

/// How long a daemon may take to come up.
const START_WAIT: Duration = Duration::from_secs(15);

/// What can go wrong while building or running a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The binaries the lab runs cannot be found or built.
    #[error(transparent)]
    Binaries(#[from] BinariesError),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A command exited with a failure.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it wrote on its standard error.
        stderr: String,
    },
    /// The etcd cluster did not come up (a member exited at start, or no leader in time).
    #[error(transparent)]
    Etcd(#[from] fwnp_testkit::etcd::EtcdClusterError),
    /// A daemon did not become ready in time, or ended at start.
    #[error("{daemon} did not start: {reason}; its log:\n{log}")]
    Start {
        /// Which daemon.
        daemon: String,
        /// What was seen.
        reason: String,
        /// The end of its log.
        log: String,
    },
    /// An answer could not be understood.
    #[error("unexpected output of {what}: {detail}")]
    Output {
        /// The command.
        what: String,
        /// What was wrong.
        detail: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Counter that makes temporary directory names unique within this process.
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A directory under the system's temporary directory, removed with its contents when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/fwnp-LABEL-PID-N` (mode 0700: it holds private keys).
    pub fn new(label: &str) -> Result<Self, LabError> {
        use std::os::unix::fs::DirBuilderExt;
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fwnp-{label}-{}-{n}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        register(Resource::Dir(path.clone()));
        Ok(TempDir { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        unregister(&Resource::Dir(self.path.clone()));
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("lab: could not remove {}: {err}", self.path.display());
        }
    }
}

/// What the lab has created, for [`emergency_cleanup`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    Dir(PathBuf),
}

/// Every namespace and directory created through this library and not yet removed.
static CREATED: std::sync::Mutex<Vec<Resource>> = std::sync::Mutex::new(Vec::new());

fn register(resource: Resource) {
    if let Ok(mut created) = CREATED.lock() {
        created.push(resource);
    }
}

fn unregister(resource: &Resource) {
    if let Ok(mut created) = CREATED.lock() {
        created.retain(|r| r != resource);
    }
}

/// Removes everything this process created through this library and has not removed yet:
/// kills the processes in its namespaces, deletes the namespaces and the temporary
/// directories. For a signal handler that is about to exit the process, when the owners'
/// `Drop` guards will not run; harmless to call twice.
pub fn emergency_cleanup() {
    let created = match CREATED.lock() {
        Ok(mut created) => std::mem::take(&mut *created),
        Err(_) => return,
    };
    // The namespaces (and the daemons in them) first, then the directories they used.
    fwnp_testkit::netns::emergency_cleanup();
    for resource in created.iter().rev() {
        match resource {
            Resource::Dir(path) => {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}

/// The prefixes behind the gateway, which its filter protects.
pub const PROTECTED: [&str; 2] = ["198.51.100.0/24", "fd00:2::/64"];

/// The deployment's certificates, made by running `fwnpctl pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `fwnpctl pki init DIR`, then a gateway certificate `gateway` for `gateway_ip`. Returns
    /// the PKI and what fwnpctl printed.
    pub fn init(
        fwnpctl: &Path,
        dir: &Path,
        gateway_ip: IpAddr,
    ) -> Result<(Self, String), LabError> {
        let mut printed = run_ok(Command::new(fwnpctl).args(["pki", "init"]).arg(dir))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        printed += &pki.issue(fwnpctl, "gateway", "gateway", &[gateway_ip])?;
        Ok((pki, printed))
    }

    /// `fwnpctl pki issue ROLE NAME --ip ...`; returns what fwnpctl printed.
    pub fn issue(
        &self,
        fwnpctl: &Path,
        role: &str,
        name: &str,
        ips: &[IpAddr],
    ) -> Result<String, LabError> {
        let mut command = Command::new(fwnpctl);
        command
            .args(["pki", "issue", role, name, "--dir"])
            .arg(&self.dir);
        for ip in ips {
            command.arg("--ip").arg(ip.to_string());
        }
        run_ok(&mut command)
    }

    /// A file of the CA directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A command that runs `program` inside `ns` (`ip netns exec NAME PROGRAM`); the caller adds
/// arguments, environment and standard streams as for any command. (`ip netns exec` enters the
/// namespace and then executes the program in the same process, so the child's pid is the
/// program's.)
pub fn netns_command(ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns.name()]).arg(program);
    command
}

/// Runs a command and returns its stdout, or a [`LabError::Command`] with its stderr.
pub fn run_ok(command: &mut Command) -> Result<String, LabError> {
    let output = run(command)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: format!("{command:?}"),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn run(command: &mut Command) -> Result<Output, LabError> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {command:?}")))
}

/// A daemon started in a namespace, its output going to a log file; killed with SIGKILL and
/// reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program --config CONFIG` in `ns`, standard output and error appended to `log`.
    pub fn start(
        name: &str,
        ns: &Netns,
        program: &Path,
        config: &Path,
        log: &Path,
    ) -> Result<Self, LabError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(format!("opening {}", log.display())))?;
        let file2 = file
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let mut command = netns_command(ns, program);
        command
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("FWNP_LAB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        let child = command
            .spawn()
            .map_err(io_err(format!("starting {name}")))?;
        Ok(Daemon {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until `ready` holds, failing if the daemon exits or `limit` passes.
    fn wait_ready(
        &mut self,
        limit: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Err(LabError::Start {
                    daemon: self.name.clone(),
                    reason: format!("it exited: {status}"),
                    log: self.log_tail(30),
                });
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Start {
                    daemon: self.name.clone(),
                    reason: format!("not ready within {limit:?}"),
                    log: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a [`Lab`] is set up.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// A label for the temporary directory.
    pub label: String,
    /// How many hosts.
    pub hosts: usize,
    /// Host names are `PREFIX-01`...
    pub host_prefix: String,
    /// The policy file's text.
    pub policy: String,
    /// Whether the agents check that the asking process owns the port.
    pub verify_port_owner: bool,
}

/// A whole deployment: a [`Topology`] of namespaces, a [`Pki`], the gateway and one agent per host, all from the
/// real binaries. Dropping it kills the daemons, deletes the namespaces and the files.
#[derive(Debug)]
pub struct Lab {
    // Declaration order is drop order: daemons, then namespaces, then files.
    agents: Vec<Option<Daemon>>,
    gateway: Option<Daemon>,
    /// The namespaces.
    pub site: Topology,
    /// The binaries it runs.
    pub bins: Binaries,
    /// The certificates.
    pub pki: Pki,
    /// What `fwnpctl pki` printed while the lab was set up.
    pub pki_output: String,
    dir: TempDir,
}

impl Lab {
    /// Builds the site, the PKI and the configurations, and starts the gateway and every agent,
    /// returning once each agent is connected to the gateway.
    pub fn start(bins: Binaries, options: &LabOptions) -> Result<Self, LabError> {
        let dir = TempDir::new(&options.label)?;
        let site = Topology::with_hosts(options.hosts, &options.host_prefix)
            .map_err(io_err("building the namespaces"))?;
        let (pki, mut pki_output) = Pki::init(
            &bins.fwnpctl,
            &dir.path().join("pki"),
            site.gateway_inside_v4,
        )?;
        for host in &site.hosts {
            pki_output += &pki.issue(&bins.fwnpctl, "host", &host.name, &[host.v4, host.v6])?;
        }
        let mut lab = Lab {
            agents: Vec::new(),
            gateway: None,
            site,
            bins,
            pki,
            pki_output,
            dir,
        };
        lab.write_policy(&options.policy)?;
        lab.write_gateway_config()?;
        for index in 0..lab.site.hosts.len() {
            lab.write_agent_config(index, options.verify_port_owner)?;
            lab.agents.push(None);
        }
        lab.start_gateway()?;
        for index in 0..lab.site.hosts.len() {
            lab.start_agent(index)?;
        }
        Ok(lab)
    }

    /// The lab's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The gateway's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir().join("gateway.sock")
    }

    /// The policy file.
    pub fn policy_path(&self) -> PathBuf {
        self.dir().join("policy.toml")
    }

    /// The local API socket of host `index`'s agent.
    pub fn agent_socket(&self, index: usize) -> PathBuf {
        self.dir().join(format!("agent-{}.sock", index + 1))
    }

    /// Replaces the policy file (the gateway reads it at start and on reload).
    pub fn write_policy(&self, text: &str) -> Result<(), LabError> {
        let path = self.policy_path();
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    fn write_gateway_config(&self) -> Result<(), LabError> {
        let listen = SocketAddr::new(self.site.gateway_inside_v4, GATEWAY_PORT);
        let text = format!(
            r#"# The lab's gateway: the example configuration, with the lab's paths and networks.
listen = ["{listen}"]
certificate = "{cert}"
key = "{key}"
ca = "{ca}"
crl = "{crl}"
policy = "{policy}"
state_dir = "{state}"
admin_socket = "{admin}"

[filter]
enabled = true
table = "fwnp"
protected = ["{p4}", "{p6}"]
inbound_interfaces = []
refuse = "drop"
kill_connections = false

[limits]
max_connections_per_identity = 4
max_streams = 16
request_timeout = "10s"

[store]
synchronous = "normal"
audit_retention = "90d"
"#,
            cert = self.pki.file("gateway.pem").display(),
            key = self.pki.file("gateway.key").display(),
            ca = self.pki.file("ca.pem").display(),
            crl = self.pki.file("crl.pem").display(),
            policy = self.policy_path().display(),
            state = self.dir().join("gateway-state").display(),
            admin = self.admin_socket().display(),
            p4 = PROTECTED[0],
            p6 = PROTECTED[1],
        );
        let path = self.dir().join("gateway.toml");
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    fn write_agent_config(&self, index: usize, verify_port_owner: bool) -> Result<(), LabError> {
        let host = &self.site.hosts[index];
        let text = format!(
            r#"# The lab's agent for {name}: the example configuration, with the lab's paths.
state_dir = "{state}"

[gateway]
address = "{gateway}"
server_name = "{server_name}"
certificate = "{cert}"
key = "{key}"
ca = "{ca}"

[local]
socket = "{socket}"
allowed_users = []
allowed_groups = []
verify_port_owner = {verify_port_owner}
port_owner_grace = "2s"

[mirror]
mode = "enforce"
table = "fwnp_host"
always_allowed = []
"#,
            name = host.name,
            state = self
                .dir()
                .join(format!("agent-{}-state", index + 1))
                .display(),
            gateway = SocketAddr::new(self.site.gateway_inside_v4, GATEWAY_PORT),
            server_name = self.site.gateway_inside_v4,
            cert = self.pki.file(&format!("{}.pem", host.name)).display(),
            key = self.pki.file(&format!("{}.key", host.name)).display(),
            ca = self.pki.file("ca.pem").display(),
            socket = self.agent_socket(index).display(),
        );
        let path = self.dir().join(format!("agent-{}.toml", index + 1));
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Starts the gateway and waits until its admin socket answers.
    pub fn start_gateway(&mut self) -> Result<(), LabError> {
        if let Some(daemon) = self.gateway.as_mut() {
            daemon.kill();
        }
        let admin = self.admin_socket();
        let _ = std::fs::remove_file(&admin);
        let mut daemon = Daemon::start(
            "fwnp-gateway",
            &self.site.gateway,
            &self.bins.gateway,
            &self.dir().join("gateway.toml"),
            &self.dir().join("gateway.log"),
        )?;
        let ready = daemon.wait_ready(START_WAIT, || {
            std::os::unix::net::UnixStream::connect(&admin).is_ok()
        });
        self.gateway = Some(daemon);
        ready
    }

    /// Kills the gateway with SIGKILL (its kernel table stays, as after a crash).
    pub fn kill_gateway(&mut self) {
        if let Some(daemon) = self.gateway.as_mut() {
            daemon.kill();
        }
    }

    /// The gateway daemon, while started.
    pub fn gateway_daemon(&mut self) -> Option<&mut Daemon> {
        self.gateway.as_mut()
    }

    /// Starts host `index`'s agent and waits until it reports a connection to the gateway.
    pub fn start_agent(&mut self, index: usize) -> Result<(), LabError> {
        let socket = self.agent_socket(index);
        let _ = std::fs::remove_file(&socket);
        let host = &self.site.hosts[index];
        let mut daemon = Daemon::start(
            &format!("fwnp-agent of {}", host.name),
            &host.netns,
            &self.bins.agent,
            &self.dir().join(format!("agent-{}.toml", index + 1)),
            &self.dir().join(format!("agent-{}.log", index + 1)),
        )?;
        let fwnp = self.bins.fwnp.clone();
        let ready = daemon.wait_ready(START_WAIT, || agent_connected(&fwnp, &socket));
        if let Some(slot) = self.agents.get_mut(index) {
            *slot = Some(daemon);
        }
        ready
    }

    /// Kills host `index`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(Some(daemon)) = self.agents.get_mut(index) {
            daemon.kill();
        }
    }

    /// Host `index`'s agent daemon, while started.
    pub fn agent_daemon(&mut self, index: usize) -> Option<&mut Daemon> {
        self.agents.get_mut(index).and_then(Option::as_mut)
    }

    /// The last `lines` lines of every daemon's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let daemons = self.gateway.iter().chain(self.agents.iter().flatten());
        for daemon in daemons {
            out += &format!("--- {} ---\n{}\n", daemon.name, daemon.log_tail(lines));
        }
        out
    }

    /// A `fwnpctl` command aimed at the lab's gateway.
    pub fn fwnpctl_command(&self) -> Command {
        let mut command = Command::new(&self.bins.fwnpctl);
        command.arg("--admin").arg(self.admin_socket());
        command
    }

    /// Runs `fwnpctl ARGS` against the gateway; returns its standard output.
    pub fn fwnpctl(&self, args: &[&str]) -> Result<String, LabError> {
        run_ok(self.fwnpctl_command().args(args))
    }

    /// Runs `fwnpctl --json ARGS` and parses its output.
    pub fn fwnpctl_json(&self, args: &[&str]) -> Result<serde_json::Value, LabError> {
        let out = run_ok(self.fwnpctl_command().arg("--json").args(args))?;
        serde_json::from_str(&out).map_err(|err| LabError::Output {
            what: format!("fwnpctl --json {}", args.join(" ")),
            detail: format!("{err}: {out}"),
        })
    }

    /// The audit trail, oldest first, as `fwnpctl audit --json` gives it (up to `limit`
    /// events, plus the filters in `args`).
    pub fn audit(&self, args: &[&str]) -> Result<Vec<AuditEntry>, LabError> {
        audit_at(&self.bins.fwnpctl, &self.admin_socket(), args)
    }

    /// Whether the gateway's table holds an element for `addr`'s `port` of `proto` ("tcp"...).
    pub fn gateway_has(&self, addr: IpAddr, proto: &str, port: u16) -> bool {
        let table = self
            .site
            .gateway
            .exec_checked(&["nft", "list", "table", "inet", "fwnp"])
            .unwrap_or_default();
        table_has(&table, Some(addr), proto, port)
    }

    /// Whether host `index`'s own table holds an element for its `port` of `proto`.
    pub fn host_has(&self, index: usize, proto: &str, port: u16) -> bool {
        let Some(host) = self.site.hosts.get(index) else {
            return false;
        };
        let table = host
            .netns
            .exec_checked(&["nft", "list", "table", "inet", "fwnp_host"])
            .unwrap_or_default();
        table_has(&table, None, proto, port)
    }

    /// Host `index`'s table as `nft` lists it (for messages).
    pub fn host_table(&self, index: usize) -> String {
        self.site
            .hosts
            .get(index)
            .and_then(|host| {
                host.netns
                    .exec_checked(&["nft", "list", "table", "inet", "fwnp_host"])
                    .ok()
            })
            .unwrap_or_default()
    }

    /// The gateway's table as `nft` lists it (for messages).
    pub fn gateway_table(&self) -> String {
        self.site
            .gateway
            .exec_checked(&["nft", "list", "table", "inet", "fwnp"])
            .unwrap_or_default()
    }

    /// Whether a TCP connection from the outside to host `index`'s `port` (IPv6 if `v6`) is
    /// established within `within` and echoes a probe.
    pub fn outside_reaches(&self, index: usize, v6: bool, port: u16, within: Duration) -> bool {
        let Some(host) = self.site.hosts.get(index) else {
            return false;
        };
        tcp_connects(
            &self.site.outside,
            SocketAddr::new(host.addr(v6), port),
            None,
            within,
        )
    }

    /// Polls until the outside reaches host `index`'s `port` (or no longer does, per
    /// `reachable`), for at most `limit`. Returns whether it got there.
    pub fn wait_reachable(
        &self,
        index: usize,
        v6: bool,
        port: u16,
        reachable: bool,
        limit: Duration,
    ) -> bool {
        wait_until(limit, Duration::from_millis(50), || {
            self.outside_reaches(index, v6, port, Duration::from_millis(400)) == reachable
        })
    }
}

/// The audit trail through the gateway whose admin socket is `admin`, oldest first, as
/// `fwnpctl audit --json` gives it (up to 10,000 events, plus the filters in `args`).
pub fn audit_at(fwnpctl: &Path, admin: &Path, args: &[&str]) -> Result<Vec<AuditEntry>, LabError> {
    let mut all = vec!["audit", "--limit", "10000"];
    all.extend_from_slice(args);
    // One JSON object per line (so that `--follow` can stream).
    let out = run_ok(
        Command::new(fwnpctl)
            .arg("--admin")
            .arg(admin)
            .arg("--json")
            .args(&all),
    )?;
    let mut list = Vec::new();
    for line in out.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|err| LabError::Output {
                what: format!("fwnpctl --json {}", all.join(" ")),
                detail: format!("{err}: {line}"),
            })?;
        list.push(value);
    }
    let mut entries: Vec<AuditEntry> = list.into_iter().map(AuditEntry).collect();
    entries.sort_by_key(|entry| entry.0.get("id").and_then(serde_json::Value::as_u64));
    Ok(entries)
}

/// Whether `fwnp status --json` through `socket` says the agent is connected to the gateway.
fn agent_connected(fwnp: &Path, socket: &Path) -> bool {
    let Ok(output) = Command::new(fwnp)
        .args(["status", "--json"])
        .env("FWNP_AGENT_SOCKET", socket)
        .stdin(Stdio::null())
        .output()
    else {
        return false;
    };
    output.status.success()
        && serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|v| v.get("connected").and_then(serde_json::Value::as_bool))
            .unwrap_or(false)
}

/// Whether an `nft list table` listing holds an element with `proto . port` (after `addr .`
/// when given), in either of the ways nft prints a protocol.
pub fn table_has(table: &str, addr: Option<IpAddr>, proto: &str, port: u16) -> bool {
    let number = match proto {
        "tcp" => "6",
        "udp" => "17",
        "sctp" => "132",
        "udplite" => "136",
        other => other,
    };
    [proto, number].iter().any(|p| {
        let needle = match addr {
            Some(addr) => format!("{addr} . {p} . {port}"),
            None => format!("{p} . {port}"),
        };
        table.match_indices(&needle).any(|(at, _)| {
            let before_ok =
                addr.is_some() || at == 0 || table[..at].ends_with([' ', '{', ',', '\t']);
            let after = &table[at + needle.len()..];
            before_ok && !after.starts_with(|c: char| c.is_ascii_digit())
        })
    })
}

/// One event of the audit trail, as `fwnpctl audit --json` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry(pub serde_json::Value);

impl AuditEntry {
    fn text(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(serde_json::Value::as_str)
    }

    /// Its kind: request, decision, grant, renewal, release, expiry, revocation...
    pub fn kind(&self) -> Option<&str> {
        self.text("kind")
    }

    /// Its outcome, where it has one.
    pub fn outcome(&self) -> Option<&str> {
        self.text("outcome")
    }

    /// The lease concerned, as 32 hexadecimal digits.
    pub fn lease(&self) -> Option<&str> {
        self.text("lease")
    }

    /// The host's identity.
    pub fn identity(&self) -> Option<&str> {
        self.text("identity")
    }

    /// Who acted when not the host.
    pub fn actor(&self) -> Option<&str> {
        self.text("actor")
    }

    /// The reason given.
    pub fn reason(&self) -> Option<&str> {
        self.text("reason")
    }

    /// The cluster member that recorded it (a gateway's `site`), when the store is a cluster.
    pub fn site(&self) -> Option<&str> {
        self.text("site")
    }
}

impl fmt::Display for AuditEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Connects from `ns` to `to`, sends `payload` and reads as many bytes back; returns what came
/// back. Bounded by `timeout` for the connection and again for the echo.
pub fn echo_exchange(
    ns: &Netns,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(payload)?;
        let mut back = vec![0u8; payload.len()];
        stream.read_exact(&mut back)?;
        Ok(back)
    })
}

/// A TCP connection from the outside that stays open, to check that an established connection
/// keeps working (the kernel's connection tracking carries it across daemon restarts).
#[derive(Debug)]
pub struct LongConnection {
    stream: TcpStream,
    counter: u32,
}

impl LongConnection {
    /// Connects from `ns` to an echo server at `to`.
    pub fn open(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = ns.run(|| TcpStream::connect_timeout(&to, timeout))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(LongConnection { stream, counter: 0 })
    }

    /// Sends a numbered line and checks that it comes back.
    pub fn roundtrip(&mut self) -> io::Result<()> {
        self.counter += 1;
        let line = format!("long-lived {}\n", self.counter);
        self.stream.write_all(line.as_bytes())?;
        let mut back = vec![0u8; line.len()];
        self.stream.read_exact(&mut back)?;
        if back == line.as_bytes() {
            Ok(())
        } else {
            Err(io::Error::other("the echo differs from what was sent"))
        }
    }
}

/// The Python interpreter a test runs its Python side with, when one that imports `modules` is
/// there: `$FWNP_PYTHON`, else the virtual environment `scripts/test` makes in
/// `target/python-venv`. Without one the test is skipped with the reason on standard error,
/// or fails when [`REQUIRE_NETNS_VAR`] is 1.
pub fn test_python(test: &str, modules: &[&str]) -> Option<PathBuf> {
    let candidate = std::env::var_os("FWNP_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let target = Binaries::profile_dir().ok()?.parent()?.to_path_buf();
            Some(target.join("python-venv/bin/python"))
        });
    let imports = format!("import {}", modules.join(", "));
    let usable = candidate.as_ref().is_some_and(|python| {
        Command::new(python)
            .args(["-c", &imports])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if usable {
        return candidate;
    }
    let tried = candidate
        .as_deref()
        .map_or_else(|| "nothing".to_owned(), |p| p.display().to_string());
    let why = format!(
        "{test}: needs a Python with {} ($FWNP_PYTHON, or target/python-venv, which \
         scripts/test makes); tried {tried}",
        modules.join(" and ")
    );
    if std::env::var(REQUIRE_NETNS_VAR).is_ok_and(|v| v == "1") {
        panic!("{why}, and {REQUIRE_NETNS_VAR}=1 forbids skipping it");
    }
    eprintln!("{why}: skipped");
    None
}

/// A child process a test drives line by line: its standard output read by a thread of its own
/// into a channel, its standard input written a line at a time, killed when dropped.
#[derive(Debug)]
pub struct LineProcess {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    what: String,
}

impl LineProcess {
    /// Starts `command` with its standard input and output piped (its standard error is the
    /// test's); `what` names it in panics.
    pub fn spawn(command: &mut Command, what: impl Into<String>) -> LineProcess {
        let what = what.into();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {what}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        LineProcess {
            stdin: child.stdin.take(),
            child,
            lines,
            what,
        }
    }

    /// What the process is, as given to [`LineProcess::spawn`].
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The next line the process writes, if one comes within `within`.
    pub fn next_line(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }

    /// Writes `line` to the process's standard input.
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap_or_else(|err| panic!("{}: {err}", self.what));
        stdin
            .flush()
            .unwrap_or_else(|err| panic!("{}: {err}", self.what));
    }

    /// Closes its standard input and waits up to `within` for it to exit; whether it succeeded.
    pub fn finished(&mut self, within: Duration) -> bool {
        self.stdin = None;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY_TABLE: &str = "table inet fwnp {\n\tset v4 {\n\t\telements = { 198.51.100.11 . tcp . 8080 timeout 1m expires 59s, 198.51.100.12 . 6 . 443 timeout 30s }\n\t}\n\tset v6 {\n\t\telements = { fd00:2::b . tcp . 8002 timeout 30s }\n\t}\n}\n";

    #[test]
    fn table_has_finds_exactly_the_element_asked() {
        let v4: IpAddr = "198.51.100.11".parse().expect("address");
        let other: IpAddr = "198.51.100.12".parse().expect("address");
        let v6: IpAddr = "fd00:2::b".parse().expect("address");
        assert!(table_has(GATEWAY_TABLE, Some(v4), "tcp", 8080));
        assert!(
            table_has(GATEWAY_TABLE, Some(other), "tcp", 443),
            "numeric protocol"
        );
        assert!(table_has(GATEWAY_TABLE, Some(v6), "tcp", 8002));
        assert!(
            !table_has(GATEWAY_TABLE, Some(v4), "tcp", 808),
            "a prefix of the port"
        );
        assert!(
            !table_has(GATEWAY_TABLE, Some(v4), "udp", 8080),
            "another protocol"
        );
        assert!(
            !table_has(GATEWAY_TABLE, Some(other), "tcp", 8080),
            "another host"
        );
        // Without an address (the host's own table), any element with that protocol and port.
        assert!(table_has(GATEWAY_TABLE, None, "tcp", 8002));
        assert!(!table_has(GATEWAY_TABLE, None, "tcp", 800));
        assert!(!table_has("", None, "tcp", 8080));
    }
}
