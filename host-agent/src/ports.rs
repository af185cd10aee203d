//! Port owner verification: before the agent asks the gateway to open a port for an
//! application, it checks that the port is bound by a socket of that application (the process
//! that asked, or one of its descendants), so that one program cannot open the firewall for a
//! port another program serves.
//!
//! How: the kernel's socket tables for the agent's network namespace (`/proc/net/tcp`, `tcp6`,
//! `udp`, `udp6`, `udplite`, `udplite6`, `sctp/eps`) give the sockets bound on the port (for TCP
//! only listening ones) and their inodes; `/proc/PID/fd` links (`socket:[INODE]`) say which
//! processes hold them; `/proc/*/stat` gives the parent of every process, hence the caller's
//! descendants. The rules:
//!
//! - every socket bound on the port (on any port of a range) must be held by the caller or a
//!   descendant; one that is not (even if shared with the caller, as with `SO_REUSEPORT` across
//!   programs) means another program serves it: refused, naming that process;
//! - a socket held by both the caller and someone else (an inherited listening socket, systemd
//!   socket activation) counts as the caller's;
//! - if no socket is bound yet, the agent polls for a grace period (the application may bind
//!   right after asking), then refuses saying nobody listens.
//! - the caller is a [`CallerProcess`], not a bare pid: once the process that connected has
//!   exited, its pid may be another's, so every check first (and again after the scan) confirms
//!   that the process still runs under that pid, and refuses otherwise.
//!
//! Reading another user's `/proc/PID/fd` needs privileges the agent has as root; as another
//! user, processes it cannot read are simply not seen (and a port they hold is reported as
//! bound by an unknown process).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::{PortRange, Protocol};

/// How often the socket tables are read again during the grace period.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Who holds the sockets bound on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Every socket bound on the port is held by the caller or a descendant; `pid` is one
    /// process that holds one.
    Caller {
        /// A process of the caller's tree holding the socket.
        pid: u32,
    },
    /// A socket bound on the port is held by this process, outside the caller's tree.
    Other {
        /// The port concerned.
        port: u16,
        /// The process.
        pid: u32,
        /// Its command name (`/proc/PID/comm`).
        comm: String,
    },
    /// A socket is bound on the port but no process the agent can see holds it.
    Unknown {
        /// The port concerned.
        port: u16,
    },
    /// Nothing is bound on the port.
    Unbound,
}

/// Why a port opening is refused (local code port-not-owned).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PortNotOwned {
    /// Another process binds the port.
    #[error("{protocol}/{port} is bound by pid {pid} ({comm}), not by the caller")]
    Other {
        /// The protocol.
        protocol: Protocol,
        /// The port.
        port: u16,
        /// The owner.
        pid: u32,
        /// The owner's command name.
        comm: String,
    },
    /// A socket no visible process holds binds the port.
    #[error("{protocol}/{port} is bound by a socket no visible process holds, not by the caller")]
    Unknown {
        /// The protocol.
        protocol: Protocol,
        /// The port.
        port: u16,
    },
    /// Nothing bound the port within the grace period.
    #[error("nobody listens on {protocol}/{ports} (waited {waited:?} for the caller to bind it)")]
    Nobody {
        /// The protocol.
        protocol: Protocol,
        /// The ports.
        ports: PortRange,
        /// How long the agent waited.
        waited: Duration,
    },
    /// The process that connected to the agent has exited (its pid may now be another
    /// process's): nothing it asks for can be verified any more.
    #[error("the calling process (pid {pid}) has exited or been replaced")]
    CallerGone {
        /// The pid the caller had.
        pid: u32,
    },
    /// Nothing of the caller's bound the port within the grace period, and the caller runs in
    /// another network namespace than the agent (a container with a network of its own): the
    /// agent sees only its own namespace's sockets, and the host's table and addresses are not
    /// the caller's.
    #[error(
        "the caller (pid {pid}) runs in another network namespace ({caller}) than the agent \
         ({agent}), whose sockets the agent cannot see: run the application in the host's \
         network namespace (for a container, its host network)"
    )]
    OtherNetworkNamespace {
        /// The caller's pid.
        pid: u32,
        /// The caller's namespace, as the kernel names it (`net:[4026531840]`).
        caller: String,
        /// The agent's namespace.
        agent: String,
    },
    /// The socket tables could not be read.
    #[error("cannot read the socket tables: {0}")]
    Unreadable(String),
}

/// The process at the other end of a local connection, bound to that very process: a pid alone
/// may be reused by another once the first exits. The kernel's pidfd of the peer (when it gives
/// one) says whether that process still lives; its start time (`/proc/PID/stat` field 22) says
/// whether the pid still names it.
#[derive(Debug, Clone)]
pub struct CallerProcess {
    pid: u32,
    start_time: u64,
    pidfd: Option<Arc<OwnedFd>>,
}

impl CallerProcess {
    /// The process `pid` as it is now, with the peer's pidfd if the kernel gave one; `None`
    /// if it has already exited or the pidfd names another process.
    pub fn identify(procfs: &ProcFs, pid: u32, pidfd: Option<OwnedFd>) -> Option<CallerProcess> {
        if pid == 0 {
            return None;
        }
        let start_time = procfs.start_time(pid)?;
        let caller = CallerProcess {
            pid,
            start_time,
            pidfd: pidfd.map(Arc::new),
        };
        // Read after the start time: if the pidfd's process still has this pid now, the start
        // time read before was its own.
        caller.is_alive(procfs).then_some(caller)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is still running under its pid (not exited, not replaced).
    pub fn is_alive(&self, procfs: &ProcFs) -> bool {
        if let Some(pidfd) = &self.pidfd
            && procfs.pidfd_pid(pidfd.as_raw_fd()) != Some(self.pid)
        {
            return false;
        }
        procfs.start_time(self.pid) == Some(self.start_time)
    }
}

/// The socket tables and processes of one `/proc`.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs {
            root: PathBuf::from("/proc"),
        }
    }
}

impl ProcFs {
    /// The `/proc` mounted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    /// The network namespace of `pid` (`self` for the reader), as the kernel names it
    /// (`net:[4026531840]`); `None` if it cannot be read.
    pub fn network_namespace(&self, pid: &str) -> Option<String> {
        std::fs::read_link(self.root.join(pid).join("ns/net"))
            .ok()
            .map(|link| link.to_string_lossy().into_owned())
    }

    /// Refuses a caller whose network namespace is not the agent's, once nothing of its binds
    /// the port in the agent's: its own sockets are not in the tables this agent reads. (A
    /// process may hold sockets of several namespaces, so this is asked only when the scan found
    /// none.) A namespace that cannot be read is not refused here.
    fn same_network_namespace(&self, caller: u32) -> Result<(), PortNotOwned> {
        match (
            self.network_namespace(&caller.to_string()),
            self.network_namespace("self"),
        ) {
            (Some(theirs), Some(ours)) if theirs != ours => {
                Err(PortNotOwned::OtherNetworkNamespace {
                    pid: caller,
                    caller: theirs,
                    agent: ours,
                })
            }
            _ => Ok(()),
        }
    }

    /// The inodes of sockets bound on `ports` for `protocol` in the reader's network namespace,
    /// with their port. For TCP only listening sockets count.
    pub fn bound_sockets(
        &self,
        protocol: Protocol,
        ports: PortRange,
    ) -> std::io::Result<Vec<(u16, u64)>> {
        let net = self.root.join("net");
        let mut found = Vec::new();
        match protocol {
            Protocol::Tcp | Protocol::Udp | Protocol::UdpLite => {
                let (files, listen_only): (&[&str], bool) = match protocol {
                    Protocol::Tcp => (&["tcp", "tcp6"], true),
                    Protocol::Udp => (&["udp", "udp6"], false),
                    _ => (&["udplite", "udplite6"], false),
                };
                let mut any = false;
                for file in files {
                    let text = match std::fs::read_to_string(net.join(file)) {
                        Ok(text) => text,
                        // IPv6 (or UDP-Lite) may be absent from the kernel.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    any = true;
                    found.extend(parse_inet_table(&text, ports, listen_only));
                }
                if !any && protocol != Protocol::UdpLite {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no {protocol} socket table under {}", net.display()),
                    ));
                }
            }
            Protocol::Sctp => match std::fs::read_to_string(net.join("sctp/eps")) {
                Ok(text) => found.extend(parse_sctp_eps(&text, ports)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            // A protocol FWNP learns later: nothing known to be bound.
            _ => {}
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// `pid` and all its descendants.
    pub fn process_tree(&self, pid: u32) -> HashSet<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (child, parent) in self.parents() {
            children.entry(parent).or_default().push(child);
        }
        let mut tree = HashSet::from([pid]);
        let mut todo = vec![pid];
        // Bounded by the number of processes: each is pushed at most once.
        while let Some(p) = todo.pop() {
            for c in children.get(&p).into_iter().flatten() {
                if tree.insert(*c) {
                    todo.push(*c);
                }
            }
        }
        tree
    }

    /// (pid, parent pid) of every process.
    fn parents(&self) -> Vec<(u32, u32)> {
        self.pids()
            .filter_map(|pid| {
                let stat =
                    std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
                Some((pid, parse_ppid(&stat)?))
            })
            .collect()
    }

    fn pids(&self) -> impl Iterator<Item = u32> + use<> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
    }

    /// The processes holding any of `inodes` (who sent a datagram from a port, for the front
    /// ends), in pid order.
    pub fn holders(&self, inodes: &HashSet<u64>) -> Vec<u32> {
        let mut found: Vec<u32> = self
            .pids()
            .filter(|pid| !self.socket_inodes(*pid).is_disjoint(inodes))
            .collect();
        found.sort_unstable();
        found
    }

    /// The process that sent a datagram from a socket of `inodes`: the one process holding it,
    /// or, when several do, the one whose descendants all the others are. A fork copies every
    /// descriptor of its parent into the child, which holds them until its `exec` closes them
    /// (or for good, if it does not exec): a request sent while the application starts a
    /// child would otherwise find two holders and no sender. Holders in no such line (a socket
    /// passed to an unrelated process) name no sender.
    pub fn sender(&self, inodes: &HashSet<u64>) -> Option<u32> {
        match self.holders(inodes).as_slice() {
            [] => None,
            [one] => Some(*one),
            several => several.iter().copied().find(|&eldest| {
                let tree = self.process_tree(eldest);
                several.iter().all(|holder| tree.contains(holder))
            }),
        }
    }

    /// The parent of `pid`, if it still runs.
    pub fn parent(&self, pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        parse_ppid(&stat)
    }

    /// The socket inodes `pid` holds open.
    pub fn socket_inodes(&self, pid: u32) -> HashSet<u64> {
        let dir = self.root.join(pid.to_string()).join("fd");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let link = std::fs::read_link(entry.ok()?.path()).ok()?;
                socket_inode(&link)
            })
            .collect()
    }

    /// The start time of `pid` (field 22 of `/proc/PID/stat`, in clock ticks since boot).
    pub fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        parse_start_time(&stat)
    }

    /// The pid the agent's pidfd `fd` refers to, from `/proc/self/fdinfo`; `None` once that
    /// process has exited (the kernel shows -1) or when the file cannot be read.
    fn pidfd_pid(&self, fd: i32) -> Option<u32> {
        let info =
            std::fs::read_to_string(self.root.join("self/fdinfo").join(fd.to_string())).ok()?;
        let line = info.lines().find(|l| l.starts_with("Pid:"))?;
        line.trim_start_matches("Pid:").trim().parse().ok()
    }

    /// The command name of `pid`.
    pub fn comm(&self, pid: u32) -> String {
        std::fs::read_to_string(self.root.join(pid.to_string()).join("comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_else(|_| "?".to_owned())
    }

    /// Who holds the sockets bound on `ports`, as seen now.
    pub fn ownership(
        &self,
        caller: u32,
        protocol: Protocol,
        ports: PortRange,
    ) -> std::io::Result<Ownership> {
        let bound = self.bound_sockets(protocol, ports)?;
        if bound.is_empty() {
            return Ok(Ownership::Unbound);
        }
        let tree = self.process_tree(caller);
        let mut held_by: HashMap<u64, u32> = HashMap::new();
        for pid in &tree {
            for inode in self.socket_inodes(*pid) {
                held_by.entry(inode).or_insert(*pid);
            }
        }
        let mut holder = None;
        for (port, inode) in &bound {
            match held_by.get(inode) {
                Some(pid) => holder = holder.or(Some(*pid)),
                None => return Ok(self.foreign_owner(*port, *inode, &tree)),
            }
        }
        Ok(holder.map_or(Ownership::Unbound, |pid| Ownership::Caller { pid }))
    }

    /// The process outside `tree` that holds `inode`.
    fn foreign_owner(&self, port: u16, inode: u64, tree: &HashSet<u32>) -> Ownership {
        for pid in self.pids().filter(|p| !tree.contains(p)) {
            if self.socket_inodes(pid).contains(&inode) {
                return Ownership::Other {
                    port,
                    pid,
                    comm: self.comm(pid),
                };
            }
        }
        Ownership::Unknown { port }
    }

    /// Waits up to `grace` for `ports` to be bound by the caller's tree; returns the holder's
    /// pid, or why the opening is refused. Refuses at once when another process holds a socket
    /// on the port, or when the caller has exited or been replaced (before or during the scan:
    /// its pid may then name someone else's process).
    pub async fn verify(
        &self,
        caller: &CallerProcess,
        protocol: Protocol,
        ports: PortRange,
        grace: Duration,
    ) -> Result<u32, PortNotOwned> {
        let started = Instant::now();
        loop {
            let procfs = self.clone();
            let who = caller.clone();
            let seen = tokio::task::spawn_blocking(move || {
                if !who.is_alive(&procfs) {
                    return Ok(None);
                }
                let seen = procfs.ownership(who.pid, protocol, ports)?;
                // Alive after the scan too: the tree the scan saw was this process's.
                Ok(who.is_alive(&procfs).then_some(seen))
            })
            .await
            .map_err(|e| PortNotOwned::Unreadable(e.to_string()))?
            .map_err(|e: std::io::Error| PortNotOwned::Unreadable(e.to_string()))?;
            let Some(seen) = seen else {
                return Err(PortNotOwned::CallerGone { pid: caller.pid });
            };
            match seen {
                Ownership::Caller { pid } => return Ok(pid),
                Ownership::Other { port, pid, comm } => {
                    return Err(PortNotOwned::Other {
                        protocol,
                        port,
                        pid,
                        comm,
                    });
                }
                Ownership::Unknown { port } => {
                    return Err(PortNotOwned::Unknown { protocol, port });
                }
                Ownership::Unbound => {
                    let waited = started.elapsed();
                    if waited >= grace {
                        // A caller in another network namespace may well listen, where the
                        // agent cannot see: say so rather than that nobody listens.
                        self.same_network_namespace(caller.pid)?;
                        return Err(PortNotOwned::Nobody {
                            protocol,
                            ports,
                            waited,
                        });
                    }
                    tokio::time::sleep(POLL_INTERVAL.min(grace - waited)).await;
                }
            }
        }
    }

    /// [`ProcFs::verify`] for each of `targets` in turn, all within one `grace`.
    pub async fn verify_all(
        &self,
        caller: &CallerProcess,
        targets: &[(Protocol, PortRange)],
        grace: Duration,
    ) -> Result<(), PortNotOwned> {
        let started = Instant::now();
        for (protocol, ports) in targets {
            let left = grace.saturating_sub(started.elapsed());
            self.verify(caller, *protocol, *ports, left).await?;
        }
        Ok(())
    }
}

/// The parent pid in the text of `/proc/PID/stat`: the fourth field, counted after the command
/// name, which is in parentheses and may itself hold spaces and parentheses.
fn parse_ppid(stat: &str) -> Option<u32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// The start time in the text of `/proc/PID/stat`: field 22, the 20th after the command name.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// The inode of a `/proc/PID/fd` link `socket:[INODE]`.
fn socket_inode(link: &Path) -> Option<u64> {
    let text = link.to_str()?;
    text.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// (port, inode) of the sockets of a `/proc/net/{tcp,udp,...}{,6}` table whose local port lies
/// in `ports`; with `listen_only`, only sockets in state LISTEN (0A).
fn parse_inet_table(text: &str, ports: PortRange, listen_only: bool) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let in_range = ports.first <= port && port <= ports.last;
            // Inode 0: a socket in TIME_WAIT or being torn down, held by nobody.
            (in_range && inode != 0 && (!listen_only || *state == "0A")).then_some((port, inode))
        })
        .collect()
}

/// (port, inode) of the SCTP endpoints of `/proc/net/sctp/eps` whose port lies in `ports`.
fn parse_sctp_eps(text: &str, ports: PortRange) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(5)?.parse::<u16>().ok()?;
            let inode = fields.get(7)?.parse::<u64>().ok()?;
            (ports.first <= port && port <= ports.last && inode != 0).then_some((port, inode))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process in a `/proc` made for a test: its parent and the socket inodes it holds.
    fn fake_process(root: &Path, pid: u32, parent: u32, sockets: &[u64]) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        std::fs::write(
            dir.join("stat"),
            format!(
                "{pid} (app name) S {parent} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 100"
            ),
        )
        .unwrap();
        for (fd, inode) in sockets.iter().enumerate() {
            std::os::unix::fs::symlink(
                format!("socket:[{inode}]"),
                dir.join("fd").join(fd.to_string()),
            )
            .unwrap();
        }
    }

    #[test]
    fn a_datagram_from_a_socket_a_fork_copied_has_the_parent_for_sender() {
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), 1, 0, &[]);
        // The application, and the child it is starting, which holds its sockets until exec.
        fake_process(root.path(), 100, 1, &[555, 556]);
        fake_process(root.path(), 101, 100, &[555, 556]);
        fake_process(root.path(), 102, 101, &[555]);
        // Unrelated to the application, and a socket passed to it.
        fake_process(root.path(), 200, 1, &[777, 556]);
        fake_process(root.path(), 300, 1, &[777]);
        let proc = ProcFs::at(root.path());
        let inodes = |i: &[u64]| i.iter().copied().collect::<HashSet<u64>>();
        assert_eq!(proc.sender(&inodes(&[555])), Some(100));
        assert_eq!(proc.sender(&inodes(&[777])), None, "two unrelated holders");
        assert_eq!(
            proc.sender(&inodes(&[556])),
            None,
            "held outside the line too"
        );
        assert_eq!(proc.sender(&inodes(&[888])), None, "nobody holds it");
        fake_process(root.path(), 400, 1, &[999]);
        assert_eq!(proc.sender(&inodes(&[999])), Some(400));
    }

    #[test]
    fn parses_proc_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0\n\
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_inet_table(tcp, PortRange::single(8080), true),
            vec![(8080, 4242)]
        );
        assert_eq!(
            parse_inet_table(tcp, PortRange::single(8080), false),
            vec![(8080, 4242), (8080, 4343)]
        );
        assert_eq!(
            parse_inet_table(
                tcp,
                PortRange {
                    first: 1,
                    last: 100
                },
                true
            ),
            vec![(22, 77)]
        );
        let eps = " ENDPT     SOCK   STY SST HBKT LPORT   UID INODE LADDRS\n\
 ffff8881  ffff8882 2   10  5    9000      0 31337 10.0.0.1\n";
        assert_eq!(
            parse_sctp_eps(eps, PortRange::single(9000)),
            vec![(9000, 31337)]
        );
        assert_eq!(parse_ppid("12 (a) b) c) S 7 12 12 0"), Some(7));
        let stat = "12 (a) b) S 7 12 12 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1 2";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(socket_inode(Path::new("socket:[99]")), Some(99));
        assert_eq!(socket_inode(Path::new("pipe:[99]")), None);
    }
}
