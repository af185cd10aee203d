//! A three-member etcd cluster of real `etcd` processes for the tests, in a network namespace
//! of its own (each member on 127.0.0.1 there, with its own client and peer ports), with data
//! directories in a temporary directory. Every member is killed when the cluster is dropped,
//! and the namespace goes with it, even when the test fails.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fwnp_gateway::config::EtcdConfig;
use fwnp_testkit::netns::{self as lab, Netns};

/// How long a cluster may take to elect a leader (about 4 s on a loaded 2-core machine).
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// How long a killed member may take to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(10);

const MEMBERS: usize = 3;

/// A running cluster; see the module documentation.
pub(crate) struct EtcdCluster {
    members: Vec<Option<Child>>,
    tls: Option<MemberTls>,
    dir: tempfile::TempDir,
    token: String,
    // Last, so that the members are killed before the namespace is deleted.
    ns: Netns,
}

/// TLS on the members' client URLs, with client certificates required: the CA that signed
/// both sides, the members' certificate (for 127.0.0.1) and key, and a client's (for etcdctl).
#[derive(Debug, Clone)]
pub(crate) struct MemberTls {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
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
pub(crate) fn available(test: &str) -> bool {
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
    pub(crate) fn start(name: &str) -> EtcdCluster {
        Self::start_with(name, None)
    }

    /// Starts three members whose client URLs speak TLS only and require a client
    /// certificate, and waits for a leader.
    pub(crate) fn start_tls(name: &str, tls: MemberTls) -> EtcdCluster {
        Self::start_with(name, Some(tls))
    }

    fn start_with(name: &str, tls: Option<MemberTls>) -> EtcdCluster {
        let ns = Netns::new(&format!("etcd{name}")).expect("network namespace");
        let dir = tempfile::tempdir().expect("temp dir");
        let token = format!("fwnp-{}-{}", name, std::process::id());
        let mut cluster = EtcdCluster {
            members: (0..MEMBERS).map(|_| None).collect(),
            tls,
            dir,
            token,
            ns,
        };
        for member in 0..MEMBERS {
            cluster.start_member(member);
        }
        assert!(
            cluster.wait_healthy(&[0, 1, 2], LEADER_WAIT),
            "the etcd cluster has no leader after {LEADER_WAIT:?}; logs in {}",
            cluster.dir.path().display()
        );
        cluster
    }

    fn start_member(&mut self, member: usize) {
        assert!(self.members[member].is_none(), "member {member} runs");
        let initial: Vec<String> = (0..MEMBERS)
            .map(|m| format!("m{m}=http://127.0.0.1:{}", peer_port(m)))
            .collect();
        let data = self.dir.path().join(format!("m{member}"));
        let log = self.dir.path().join(format!("m{member}.log"));
        let client = self.client_url(member);
        let peer = format!("http://127.0.0.1:{}", peer_port(member));
        let mut command = Command::new("etcd");
        command.args([
            "--name",
            &format!("m{member}"),
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &client,
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
        let child = self.ns.spawn(&mut command).expect("start etcd");
        self.members[member] = Some(child);
    }

    /// The client URLs of every member (running or not), as a gateway is configured.
    pub(crate) fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS).map(|m| self.client_url(m)).collect()
    }

    fn client_url(&self, member: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", client_port(member))
    }

    /// A store configuration for a gateway named `site`, with `timeout` per request.
    pub(crate) fn config(&self, site: &str, timeout: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints(),
            prefix: "/fwnp-test".into(),
            site: site.into(),
            timeout,
            tls: None,
        }
    }

    /// Runs `f` on a thread inside the cluster's namespace (threads it starts stay there).
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run(f)
    }

    /// Kills member `member` with SIGKILL and waits until it is gone.
    pub(crate) fn kill(&mut self, member: usize) {
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

    /// Starts member `member` again on its data directory.
    pub(crate) fn restart(&mut self, member: usize) {
        self.start_member(member);
    }

    /// Waits until `members` all answer a linearizable read (which needs a leader).
    pub(crate) fn wait_healthy(&self, members: &[usize], limit: Duration) -> bool {
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
        args.extend(["endpoint".into(), "health".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab::wait_until(limit, Duration::from_millis(200), || {
            self.ns.exec(&args).is_ok_and(|o| o.status.success())
        })
    }

    /// Where the members' data directories and logs are.
    pub(crate) fn dir(&self) -> PathBuf {
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
