//! An etcd cluster of real `etcd` processes for the tests, in a network namespace of its own
//! (each member on 127.0.0.1 there, with its own client and peer ports), with data
//! directories in a temporary directory. Every member is killed when the cluster is dropped,
//! and the namespace goes with it, even when the test fails.
//!
//! Three members by default, for the tests of member failure and quorum; one
//! ([`EtcdCluster::single`]) for those that need etcd's transactions and watches but lose no
//! member, which start in about a third of the time and leave the machine's cores to the
//! test (three members on two cores elect and replicate at every write).
//!
//! Code that runs in the cluster's namespace ([`EtcdCluster::run`]) reaches the members on
//! 127.0.0.1 ([`EtcdCluster::endpoints`]); another namespace, such as a gateway's with a kernel
//! filter of its own, is joined to the cluster's by a veth pair of its own
//! ([`EtcdCluster::connect`]) and reaches the members on the cluster's end of that pair.
//!
//! A cluster that does not come up (a member that exits at start, no leader in time) is an
//! [`EtcdClusterError`] with the end of each member's log, for the test to report; nothing is
//! left behind.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::netns::{self as lab, Netns};

/// How long a cluster may take to elect a leader (about 4 s on a loaded 2-core machine).
pub const LEADER_WAIT: Duration = Duration::from_secs(30);

/// How many lines of each member's log an [`EtcdClusterError`] carries.
const LOG_LINES: usize = 8;

/// How long a killed member may take to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// How many members a cluster has unless its options say otherwise.
const MEMBERS: usize = 3;

/// How many namespaces [`EtcdCluster::connect`] can join to one cluster: each link takes a /30
/// of 203.0.113.0/24.
const MAX_LINKS: usize = 63;

/// The cluster's end of the veth pair towards each connected namespace.
const CLUSTER_LINK_IF: &str = "etcd-l";

/// The connected namespace's end of its veth pair towards the cluster.
pub const LINK_IF: &str = "veth-etcd";

/// Why a cluster, or one of its members, did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdClusterError {
    /// The cluster's network namespace or data directory could not be made.
    #[error("etcd cluster: {what}: {source}")]
    Setup {
        /// What was being made.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A member's process could not be started.
    #[error("etcd member {member} could not be started: {source}")]
    Spawn {
        /// The member, from 0.
        member: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A member was started while it runs.
    #[error("etcd member {member} runs already")]
    Running {
        /// The member.
        member: usize,
    },
    /// A member exited while the cluster was waiting for its leader.
    #[error("etcd member {member} exited at start ({status}); the members' logs:\n{logs}")]
    Exited {
        /// The member.
        member: usize,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of each member's log.
        logs: String,
    },
    /// The members run but no leader answered within the wait.
    #[error("the etcd cluster has no leader after {waited:?}; the members' logs:\n{logs}")]
    NoLeader {
        /// How long was waited.
        waited: Duration,
        /// The end of each member's log.
        logs: String,
    },
}

/// How a cluster is started ([`EtcdCluster::start_with`]).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// TLS on the members' client URLs, with client certificates required; none by default.
    pub tls: Option<MemberTls>,
    /// How long to wait for a leader ([`LEADER_WAIT`] by default).
    pub leader_wait: Duration,
    /// How many members (three by default; at least one).
    pub members: usize,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            tls: None,
            leader_wait: LEADER_WAIT,
            members: MEMBERS,
        }
    }
}

/// A running cluster; see the module documentation.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    tls: Option<MemberTls>,
    dir: tempfile::TempDir,
    token: String,
    links: usize,
    // Last, so that the members are killed before the namespace is deleted.
    ns: Netns,
}

/// TLS on the members' client URLs, with client certificates required: the CA that signed
/// both sides, the members' certificate (for 127.0.0.1) and key, and a client's (for etcdctl).
#[derive(Debug, Clone)]
pub struct MemberTls {
    /// The CA certificate both sides trust.
    pub ca: PathBuf,
    /// The members' certificate, for 127.0.0.1.
    pub cert: PathBuf,
    /// The members' key.
    pub key: PathBuf,
    /// A client certificate signed by the same CA, for etcdctl.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn client_port(member: usize) -> u16 {
    21379 + 1000 * member as u16
}

fn peer_port(member: usize) -> u16 {
    21380 + 1000 * member as u16
}

/// Whether the etcd tests can run here: root (for the namespace) and etcd installed. Skips
/// with a message otherwise, and fails under `FWNP_REQUIRE_NETNS=1` as the other privileged
/// tests do.
pub fn available(test: &str) -> bool {
    if !lab::require_root(test) {
        return false;
    }
    let installed =
        [("etcd", "--version"), ("etcdctl", "version")]
            .iter()
            .all(|(tool, version)| {
                Command::new(tool)
                    .arg(version)
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
    if installed {
        return true;
    }
    if std::env::var(lab::REQUIRE_NETNS_VAR).is_ok_and(|v| v == "1") {
        panic!(
            "{test}: needs etcd and etcdctl (Debian's etcd-server and etcd-client, which \
             scripts/deps.sh installs), and {}=1 forbids skipping it",
            lab::REQUIRE_NETNS_VAR
        );
    }
    eprintln!(
        "{test}: skipped: etcd or etcdctl is not installed (apt-get install etcd-server \
         etcd-client)"
    );
    false
}

impl EtcdCluster {
    /// Starts three members and waits for a leader.
    ///
    /// ```no_run
    /// let cluster = fwnp_testkit::etcd::EtcdCluster::start("doc")?;
    /// assert_eq!(cluster.endpoints().len(), 3);
    /// # Ok::<(), fwnp_testkit::etcd::EtcdClusterError>(())
    /// ```
    pub fn start(name: &str) -> Result<EtcdCluster, EtcdClusterError> {
        Self::start_with(name, EtcdOptions::default())
    }

    /// Starts one member, and waits until it leads: for a test that loses no member.
    ///
    /// ```no_run
    /// let cluster = fwnp_testkit::etcd::EtcdCluster::single("doc")?;
    /// assert_eq!(cluster.endpoints().len(), 1);
    /// # Ok::<(), fwnp_testkit::etcd::EtcdClusterError>(())
    /// ```
    pub fn single(name: &str) -> Result<EtcdCluster, EtcdClusterError> {
        Self::start_with(
            name,
            EtcdOptions {
                members: 1,
                ..EtcdOptions::default()
            },
        )
    }

    /// Starts three members whose client URLs speak TLS only and require a client
    /// certificate, and waits for a leader.
    pub fn start_tls(name: &str, tls: MemberTls) -> Result<EtcdCluster, EtcdClusterError> {
        Self::start_with(
            name,
            EtcdOptions {
                tls: Some(tls),
                ..EtcdOptions::default()
            },
        )
    }

    /// Starts the members `options` say and waits for a leader. Whatever fails, the
    /// members started are killed and the namespace and data directory removed.
    pub fn start_with(name: &str, options: EtcdOptions) -> Result<EtcdCluster, EtcdClusterError> {
        let setup = |what| move |source| EtcdClusterError::Setup { what, source };
        let ns = Netns::new(&format!("etcd{name}")).map_err(setup("network namespace"))?;
        let dir = tempfile::tempdir().map_err(setup("data directory"))?;
        let token = format!("fwnp-{}-{}", name, std::process::id());
        let mut cluster = EtcdCluster {
            members: (0..options.members.max(1)).map(|_| None).collect(),
            tls: options.tls,
            dir,
            token,
            links: 0,
            ns,
        };
        for member in 0..cluster.members.len() {
            cluster.start_member(member)?;
        }
        let all: Vec<usize> = (0..cluster.members.len()).collect();
        let deadline = Instant::now() + options.leader_wait;
        loop {
            // A member that exited will not come back: said at once, not after the wait.
            if let Some((member, status)) = cluster.exited() {
                return Err(EtcdClusterError::Exited {
                    member,
                    status,
                    logs: cluster.log_tails(),
                });
            }
            // Each look waits until the deadline at most, so the wait is over once none is left.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EtcdClusterError::NoLeader {
                    waited: options.leader_wait,
                    logs: cluster.log_tails(),
                });
            }
            if cluster.wait_healthy(&all, left.min(Duration::from_secs(1))) {
                return Ok(cluster);
            }
        }
    }

    /// The first member whose process has exited, with its status.
    fn exited(&mut self) -> Option<(usize, std::process::ExitStatus)> {
        self.members.iter_mut().enumerate().find_map(|(m, child)| {
            let status = child.as_mut()?.try_wait().ok()??;
            Some((m, status))
        })
    }

    /// The last lines of each member's log.
    fn log_tails(&self) -> String {
        (0..self.members.len())
            .map(|m| {
                let path = self.dir.path().join(format!("m{m}.log"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_LINES)..].join("\n");
                format!("member {m} ({}):\n{tail}", path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn start_member(&mut self, member: usize) -> Result<(), EtcdClusterError> {
        if self.members[member].is_some() {
            return Err(EtcdClusterError::Running { member });
        }
        let initial: Vec<String> = (0..self.members.len())
            .map(|m| format!("m{m}=http://127.0.0.1:{}", peer_port(m)))
            .collect();
        let data = self.dir.path().join(format!("m{member}"));
        let log = self.dir.path().join(format!("m{member}.log"));
        let client = self.client_url(member);
        // Every address of the cluster's namespace, so that the ends of the links made by
        // `connect` reach the members too; the namespace has no other interfaces.
        let listen = format!(
            "{}://0.0.0.0:{}",
            if self.tls.is_some() { "https" } else { "http" },
            client_port(member)
        );
        let peer = format!("http://127.0.0.1:{}", peer_port(member));
        let mut command = Command::new("etcd");
        command.args([
            "--name",
            &format!("m{member}"),
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &listen,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &self.token,
            // Faster elections than the defaults (100 ms, 1 s): a lost leader is replaced
            // within a second, as the tests' bounds expect.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--logger",
            "zap",
            "--log-outputs",
            &log.display().to_string(),
        ]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = self
            .ns
            .spawn(&mut command)
            .map_err(|source| EtcdClusterError::Spawn { member, source })?;
        self.members[member] = Some(child);
        Ok(())
    }

    /// The client URLs of every member (running or not), as a gateway is configured.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|m| self.client_url(m))
            .collect()
    }

    fn client_url(&self, member: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", client_port(member))
    }

    /// Joins `other` to the cluster's namespace with a veth pair of its own and returns the
    /// client URLs of every member as seen from `other` (the cluster's end of that pair).
    ///
    /// Link `k` (from 0) is 203.0.113.(4k+1)/30 on the cluster's side and 203.0.113.(4k+2)/30
    /// on `other`'s (interface [`LINK_IF`]), a documentation range the topologies of
    /// [`crate::netns`] do not use. The pair goes away with either namespace; taking `other`'s
    /// end down (`ip link set veth-etcd down` there) cuts that namespace off from the cluster.
    pub fn connect(&mut self, other: &Netns) -> io::Result<Vec<String>> {
        if self.links >= MAX_LINKS {
            return Err(io::Error::other(format!(
                "at most {MAX_LINKS} namespaces can be joined to one cluster"
            )));
        }
        let link = self.links;
        self.links += 1;
        let base = u8::try_from(4 * link).map_err(io::Error::other)?;
        let ours = Ipv4Addr::new(203, 0, 113, base + 1);
        let theirs = Ipv4Addr::new(203, 0, 113, base + 2);
        let ours_if = format!("{CLUSTER_LINK_IF}{link}");
        // Created inside the cluster's namespace with the peer put straight into `other`, so
        // that no name ever appears in the namespace the tests run in.
        self.ns.ip(&[
            "link",
            "add",
            &ours_if,
            "type",
            "veth",
            "peer",
            "name",
            LINK_IF,
            "netns",
            other.name(),
        ])?;
        self.ns
            .ip(&["addr", "add", &format!("{ours}/30"), "dev", &ours_if])?;
        other.ip(&["addr", "add", &format!("{theirs}/30"), "dev", LINK_IF])?;
        self.ns.ip(&["link", "set", &ours_if, "up"])?;
        other.ip(&["link", "set", LINK_IF, "up"])?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok((0..self.members.len())
            .map(|m| format!("{scheme}://{ours}:{}", client_port(m)))
            .collect())
    }

    /// The cluster's namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Runs `f` on a thread inside the cluster's namespace (threads it starts stay there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run(f)
    }

    /// Kills member `member` with SIGKILL and waits until it is gone.
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].take() {
            let _ = child.kill();
            let deadline = Instant::now() + EXIT_WAIT;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("etcd member {member} did not exit within {EXIT_WAIT:?}");
        }
    }

    /// Starts member `member` again on its data directory (without waiting for it).
    pub fn restart(&mut self, member: usize) -> Result<(), EtcdClusterError> {
        self.start_member(member)
    }

    /// Deletes every key under `prefix` (`etcdctl del --prefix`), as an operator who erases a
    /// deployment's state does.
    pub fn delete_prefix(&self, prefix: &str) -> io::Result<()> {
        let endpoints = self.endpoints().join(",");
        let mut args = vec!["etcdctl", "--endpoints", &endpoints];
        let tls = self.tls_args();
        args.extend(tls.iter().map(String::as_str));
        args.extend(["del", "--prefix", prefix]);
        self.ns.exec_checked(&args).map(drop)
    }

    /// Saves a snapshot of the cluster's keys, as member `member` holds them, to `path`
    /// (`etcdctl snapshot save`).
    pub fn snapshot(&self, member: usize, path: &std::path::Path) -> io::Result<()> {
        let endpoint = self.client_url(member);
        let path = path.display().to_string();
        let mut args = vec!["etcdctl", "--endpoints", &endpoint];
        let tls = self.tls_args();
        args.extend(tls.iter().map(String::as_str));
        args.extend(["snapshot", "save", &path]);
        self.ns.exec_checked(&args).map(drop)
    }

    /// Replaces the data directory of member `member`, killed first, by one restored from
    /// `snapshot` (`etcdctl snapshot restore`), as an operator puts an etcd back from a
    /// backup; [`EtcdCluster::restart`] starts it again on it. For a cluster of one member:
    /// the others would still hold the history the snapshot goes back from.
    pub fn restore_snapshot(
        &mut self,
        member: usize,
        snapshot: &std::path::Path,
    ) -> io::Result<()> {
        self.kill(member);
        let data = self.dir.path().join(format!("m{member}"));
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        let peer = format!("http://127.0.0.1:{}", peer_port(member));
        let output = Command::new("etcdctl")
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .args(["--name", &format!("m{member}"), "--data-dir"])
            .arg(&data)
            .args([
                "--initial-cluster",
                &format!("m{member}={peer}"),
                "--initial-cluster-token",
                &self.token,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .env("ETCDCTL_API", "3")
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "etcdctl snapshot restore: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    /// etcdctl's TLS flags for this cluster (none without TLS).
    fn tls_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cacert", &tls.ca),
                ("--cert", &tls.client_cert),
                ("--key", &tls.client_key),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
        }
        args
    }

    /// Waits until `members` all answer a linearizable read (which needs a leader).
    pub fn wait_healthy(&self, members: &[usize], limit: Duration) -> bool {
        let endpoints: Vec<String> = members.iter().map(|&m| self.client_url(m)).collect();
        let endpoints = endpoints.join(",");
        let mut args = vec![
            "etcdctl".to_owned(),
            "--endpoints".into(),
            endpoints,
            "--command-timeout".into(),
            "1s".into(),
            "--dial-timeout".into(),
            "1s".into(),
        ];
        args.extend(self.tls_args());
        args.extend(["endpoint".into(), "health".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab::wait_until(limit, Duration::from_millis(200), || {
            self.ns.exec(&args).is_ok_and(|o| o.status.success())
        })
    }

    /// Where the members' data directories and logs are.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in self.members.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
