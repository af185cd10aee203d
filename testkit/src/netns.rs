//! Linux network namespaces for tests of code that programs nf_tables or runs the daemons.
//!
//! It builds what such a test needs and nothing more: namespaces with unique names that are
//! removed again when their guard is dropped (also when a test panics), a [`Topology`] (outside,
//! gateway, one or more hosts) joined by veth pairs and a bridge with IPv4 and IPv6, echo
//! servers that run inside a namespace, and bounded probes ([`tcp_connects`], [`udp_roundtrip`])
//! that prove with real traffic whether a path is open.
//!
//! Namespaces are managed with iproute2 (`ip netns`), as an operator would; code runs inside one
//! on a thread that entered it with `setns(2)` ([`Netns::run`]). A socket belongs to the
//! namespace of the thread that created it, so a netlink socket or a listener created inside
//! [`Netns::run`] keeps working in that namespace from any thread afterwards.
//!
//! Every address used lies in the documentation ranges (192.0.2.0/24, 198.51.100.0/24) or the
//! unique-local range fd00::/8, and exists only inside the namespaces of one topology, so tests
//! never send traffic anywhere else and several topologies can run side by side.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use socket2::{Domain, Protocol as SockProtocol, SockAddr, Socket, Type};

/// The environment variable that turns a skipped privileged test into a failure (as CI sets it).
pub const REQUIRE_NETNS_VAR: &str = "FWNP_REQUIRE_NETNS";

/// Whether a privileged test can run: true when the process is root.
///
/// When it is not root, prints that `test` is skipped and why, and returns false, so the test can
/// return early; when [`REQUIRE_NETNS_VAR`] is `1` it panics instead, so that CI cannot pass by
/// skipping.
pub fn require_root(test: &str) -> bool {
    require_root_for(test, "network namespaces and nf_tables")
}

/// As [`require_root`], for a test that needs root for `what` (to run a child as another user,
/// say) rather than for namespaces.
pub fn require_root_for(test: &str, what: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let required = std::env::var(REQUIRE_NETNS_VAR).is_ok_and(|value| value == "1");
    if required {
        panic!(
            "{test}: needs root for {what}, and {REQUIRE_NETNS_VAR}=1 forbids skipping it; run \
             the tests as root"
        );
    }
    eprintln!(
        "{test}: skipped: needs root for {what} (set {REQUIRE_NETNS_VAR}=1 to make this a \
         failure)"
    );
    false
}

/// Counter that makes namespace names unique within this process; the pid makes them unique
/// between processes.
static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

/// How long [`Drop`] of a [`Netns`] waits for processes it killed to leave the namespace.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// How long [`Netns::spawn`] waits for the new process to be inside the namespace.
const SPAWN_WAIT: Duration = Duration::from_secs(2);

/// A network namespace created with `ip netns add`, deleted again (with every process left in
/// it killed) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `PREFIX-PID-N` (prefix cut to 6 characters so names stay short)
    /// with its loopback interface up.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let short: String = prefix
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(6)
            .collect();
        let counter = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{short}-{}-{counter}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        if let Ok(mut live) = LIVE.lock() {
            live.push(name.clone());
        }
        // From here on the guard owns the namespace: an error below still removes it.
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle that lets any thread enter this namespace (see [`NetnsEntry`]).
    pub fn entry(&self) -> NetnsEntry {
        NetnsEntry {
            path: PathBuf::from(format!("/run/netns/{}", self.name)),
        }
    }

    /// Runs `f` on a new thread that has entered this namespace and returns its result.
    ///
    /// Sockets created by `f` stay in this namespace wherever they are used later. A panic in
    /// `f` is propagated; failing to enter the namespace panics (the namespace is ours, so that
    /// is a broken test environment, not a test outcome).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let entry = self.entry();
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                if let Err(err) = entry.enter() {
                    panic!(
                        "cannot enter network namespace {}: {err}",
                        entry.path.display()
                    );
                }
                f()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `cmd` (program and arguments) inside the namespace with `ip netns exec` and waits for
    /// it; the caller looks at the exit status.
    pub fn exec(&self, cmd: &[&str]) -> io::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
    }

    /// Like [`Netns::exec`], but a non-zero exit is an error carrying the command's stderr;
    /// returns its stdout.
    pub fn exec_checked(&self, cmd: &[&str]) -> io::Result<String> {
        run_checked(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(cmd),
        )
    }

    /// Runs `nft` inside the namespace with the given script on its standard input
    /// (`nft -f -`); a non-zero exit is an error carrying nft's message.
    pub fn nft_script(&self, script: &str) -> io::Result<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        checked_output("nft -f -", output)
    }

    /// Starts `cmd` inside the namespace (`ip netns exec NAME PROGRAM ARGS...`) and returns once
    /// the process is in the namespace (or has ended), so that dropping the namespace right
    /// afterwards finds and kills it.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        let mut child = wrapped.spawn()?;
        let ns_link = format!("net:[{}]", self.inode()?);
        let proc_link = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let entered = wait_until(SPAWN_WAIT, Duration::from_millis(2), || {
            std::fs::read_link(&proc_link).is_ok_and(|link| link.as_os_str() == ns_link.as_str())
                || matches!(child.try_wait(), Ok(Some(_)))
        });
        if !entered {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the process did not enter network namespace {}", self.name),
            ));
        }
        Ok(child)
    }

    /// The inode number that identifies the namespace (as `/proc/PID/ns/net` shows it).
    fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name)).map(|meta| meta.ino())
    }

    /// The IPv4 and IPv6 addresses of the namespace's interfaces, loopback included, link-local
    /// IPv6 addresses left out.
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        let out = self.ip(&["-o", "addr", "show"])?;
        let mut addresses = Vec::new();
        for line in out.lines() {
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                if word == "inet" || word == "inet6" {
                    let parsed = words
                        .next()
                        .and_then(|cidr| cidr.split('/').next())
                        .and_then(|addr| addr.parse::<IpAddr>().ok());
                    if let Some(addr) = parsed {
                        let link_local =
                            matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local());
                        if !link_local {
                            addresses.push(addr);
                        }
                    }
                }
            }
        }
        Ok(addresses)
    }

    /// Runs `ip ARGS...` against this namespace (`ip -n NAME ...`).
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a sysctl inside the namespace (`sysctl -w KEY=VALUE`).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.exec_checked(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// The pids of the processes whose network namespace is this one, except this process.
    fn foreign_pids(&self) -> Vec<i32> {
        foreign_pids(&self.name)
    }
}

/// The pids of the processes in the namespace `name`, except this process.
fn foreign_pids(name: &str) -> Vec<i32> {
    let own = std::process::id();
    match run_checked(Command::new("ip").args(["netns", "pids", name])) {
        Ok(out) => out
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .filter(|&pid| pid != own)
            .filter_map(|pid| i32::try_from(pid).ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let pids = self.foreign_pids();
            if pids.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in pids {
                // The process may have ended on its own meanwhile: nothing to do then.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(err) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "lab: could not delete network namespace {}: {err}",
                self.name
            );
        }
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|name| *name != self.name);
        }
    }
}

/// The namespaces of this process not yet deleted, for [`emergency_cleanup`].
static LIVE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Deletes every namespace this process created and has not deleted yet, killing the
/// processes in it first, newest first. For a signal handler that is about to exit the process,
/// when the guards' `Drop` will not run; harmless to call twice.
pub fn emergency_cleanup() {
    let live = match LIVE.lock() {
        Ok(mut live) => std::mem::take(&mut *live),
        Err(_) => return,
    };
    for name in live.iter().rev() {
        for pid in foreign_pids(name) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What a thread needs to enter a [`Netns`]: cheap to clone, `Send + Sync + 'static`, so it can
/// go into a thread-start hook (for example a tokio runtime whose every thread should live in the
/// namespace: `Builder::on_thread_start(move || entry.enter().expect(..))`).
#[derive(Debug, Clone)]
pub struct NetnsEntry {
    path: PathBuf,
}

impl NetnsEntry {
    /// Moves the calling thread into the namespace for good (`setns(2)` on `/run/netns/NAME`).
    /// Threads it creates afterwards start in the namespace too.
    pub fn enter(&self) -> io::Result<()> {
        let file = File::open(&self.path)?;
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }
}

/// Runs a command, returning its stdout, or an error with its stderr when it fails.
fn run_checked(cmd: &mut Command) -> io::Result<String> {
    let what = format!("{cmd:?}");
    let output = cmd.stdin(Stdio::null()).output()?;
    checked_output(&what, output)
}

fn checked_output(what: &str, output: Output) -> io::Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// An outside network, a gateway, and hosts behind it on one bridge, with IPv4 and IPv6
/// addresses, default routes towards the gateway and forwarding on in the gateway:
///
/// ```text
///  outside   192.0.2.2, 192.0.2.66, fd00:1::2, fd00:1::1:2            (OUTSIDE_IF)
///     | veth
///  gateway   192.0.2.1, fd00:1::1 (GATEWAY_OUTSIDE_IF)
///            bridge INSIDE_BRIDGE 198.51.100.1, fd00:2::1
///     | one veth per host, its gateway end on the bridge
///  hosts     (HOST_IF in each)
/// ```
///
/// [`Topology::new`] has one host, 198.51.100.2 and .3, fd00:2::2 and ::3 (a second address of
/// each family lets a test protect only the first one and see that the other is untouched);
/// [`Topology::with_hosts`] has any number, host `i` (from 1) at 198.51.100.(10+i) and
/// fd00:2::(10+i), named `PREFIX-01`, `PREFIX-02`... The second outside address lies outside
/// 192.0.2.0/26 and fd00:1::/112, so a lease restricted to one of those prefixes admits the
/// first outside address and not the second. Interface names are local to each namespace, so
/// topologies never collide.
///
/// Fields drop hosts first, then the gateway, then the outside; each namespace removes itself.
#[derive(Debug)]
pub struct Topology {
    /// The protected hosts.
    pub hosts: Vec<Host>,
    /// The router in the middle, where the gateway runs.
    pub gateway: Netns,
    /// Where connections come from.
    pub outside: Netns,
    /// The outside namespace's main IPv4 address.
    pub outside_v4: IpAddr,
    /// A second outside IPv4 address, outside 192.0.2.0/26.
    pub outside_v4_alt: IpAddr,
    /// The outside namespace's main IPv6 address.
    pub outside_v6: IpAddr,
    /// A second outside IPv6 address, outside fd00:1::/112.
    pub outside_v6_alt: IpAddr,
    /// The gateway's IPv4 address towards the outside.
    pub gateway_outside_v4: IpAddr,
    /// The gateway's IPv6 address towards the outside.
    pub gateway_outside_v6: IpAddr,
    /// The gateway's IPv4 address towards the hosts (their router).
    pub gateway_inside_v4: IpAddr,
    /// The gateway's IPv6 address towards the hosts.
    pub gateway_inside_v6: IpAddr,
}

/// One protected host of a [`Topology`].
#[derive(Debug)]
pub struct Host {
    /// Its short name (`host`, or `PREFIX-01`...), which tests also use as its certificate name.
    pub name: String,
    /// Its namespace.
    pub netns: Netns,
    /// Its main IPv4 address.
    pub v4: IpAddr,
    /// Its main IPv6 address.
    pub v6: IpAddr,
    /// A second IPv4 address in the same subnet (the host of [`Topology::new`] only).
    pub v4_alt: Option<IpAddr>,
    /// A second IPv6 address in the same subnet (the host of [`Topology::new`] only).
    pub v6_alt: Option<IpAddr>,
}

impl Host {
    /// Its main address of the family asked.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6 } else { self.v4 }
    }
}

/// How long [`Topology::new`] waits for its links to come up.
const LINK_UP_WAIT: Duration = Duration::from_secs(5);

/// The outside namespace's interface towards the gateway.
pub const OUTSIDE_IF: &str = "veth-out";
/// The gateway's interface towards the outside.
pub const GATEWAY_OUTSIDE_IF: &str = "veth-gw-out";
/// The bridge in the gateway namespace that joins every host.
pub const INSIDE_BRIDGE: &str = "br-in";
/// Each host's interface towards the gateway.
pub const HOST_IF: &str = "veth-host";

impl Topology {
    /// Builds the namespaces and links with one host (see [`Topology`]). Returns once the
    /// addresses are usable (IPv6 addresses are added with `nodad`).
    pub fn new() -> io::Result<Self> {
        let mut topology = Self::empty("fwo", "fwg")?;
        topology.hosts.push(Host {
            name: "host".into(),
            netns: Netns::new("fwh")?,
            v4: v4(198, 51, 100, 2),
            v6: v6(0xfd00, 2, 0, 2),
            v4_alt: Some(v4(198, 51, 100, 3)),
            v6_alt: Some(v6(0xfd00, 2, 0, 3)),
        });
        topology.wire()?;
        Ok(topology)
    }

    /// Builds the namespaces and links with `count` hosts named `NAME_PREFIX-01`, `-02`... (at
    /// most 200).
    pub fn with_hosts(count: usize, name_prefix: &str) -> io::Result<Self> {
        let mut topology = Self::empty("fwlo", "fwlg")?;
        for i in 1..=count {
            let number = u8::try_from(10 + i)
                .ok()
                .filter(|&n| n < 255)
                .ok_or_else(|| io::Error::other(format!("{count} hosts is too many")))?;
            topology.hosts.push(Host {
                name: format!("{name_prefix}-{i:02}"),
                netns: Netns::new("fwlh")?,
                v4: v4(198, 51, 100, number),
                v6: v6(0xfd00, 2, 0, u16::from(number)),
                v4_alt: None,
                v6_alt: None,
            });
        }
        topology.wire()?;
        Ok(topology)
    }

    fn empty(outside_prefix: &str, gateway_prefix: &str) -> io::Result<Self> {
        let outside = Netns::new(outside_prefix)?;
        let gateway = Netns::new(gateway_prefix)?;
        Ok(Topology {
            hosts: Vec::new(),
            gateway,
            outside,
            outside_v4: v4(192, 0, 2, 2),
            outside_v4_alt: v4(192, 0, 2, 66),
            outside_v6: v6(0xfd00, 1, 0, 2),
            outside_v6_alt: v6(0xfd00, 1, 1, 2),
            gateway_outside_v4: v4(192, 0, 2, 1),
            gateway_outside_v6: v6(0xfd00, 1, 0, 1),
            gateway_inside_v4: v4(198, 51, 100, 1),
            gateway_inside_v6: v6(0xfd00, 2, 0, 1),
        })
    }

    /// The first host (the only one of [`Topology::new`]).
    pub fn host(&self) -> &Host {
        &self.hosts[0]
    }

    fn wire(&self) -> io::Result<()> {
        let (outside, gateway) = (&self.outside, &self.gateway);
        let all = [outside, gateway]
            .into_iter()
            .chain(self.hosts.iter().map(|h| &h.netns));
        // No duplicate address detection anywhere: link-local addresses would stay tentative for
        // a second or two after the links come up, and neighbour discovery through them with it.
        for ns in all {
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        // Each pair is created inside the namespace of its first end, with the peer put straight
        // into the other namespace: no name ever appears in the namespace the tests run in.
        outside.ip(&[
            "link",
            "add",
            OUTSIDE_IF,
            "type",
            "veth",
            "peer",
            "name",
            GATEWAY_OUTSIDE_IF,
            "netns",
            gateway.name(),
        ])?;
        // Forwarding before addresses: on IPv6, turning it on resets some interface settings.
        gateway.sysctl("net.ipv4.ip_forward", "1")?;
        gateway.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        gateway.ip(&["link", "add", INSIDE_BRIDGE, "type", "bridge"])?;
        let mut links: Vec<(&Netns, String)> = vec![
            (outside, OUTSIDE_IF.into()),
            (gateway, GATEWAY_OUTSIDE_IF.into()),
            (gateway, INSIDE_BRIDGE.into()),
        ];
        for (index, host) in self.hosts.iter().enumerate() {
            let peer = format!("vh{}", index + 1);
            host.netns.ip(&[
                "link",
                "add",
                HOST_IF,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                gateway.name(),
            ])?;
            gateway.ip(&["link", "set", &peer, "master", INSIDE_BRIDGE])?;
            links.push((&host.netns, HOST_IF.into()));
            links.push((gateway, peer));
        }
        let address = |ns: &Netns, ifname: &str, addr: IpAddr, len: u8| -> io::Result<()> {
            let cidr = format!("{addr}/{len}");
            match addr {
                IpAddr::V4(_) => ns.ip(&["addr", "add", &cidr, "dev", ifname]).map(drop),
                IpAddr::V6(_) => ns
                    .ip(&["-6", "addr", "add", &cidr, "dev", ifname, "nodad"])
                    .map(drop),
            }
        };
        for (addr, len) in [
            (self.outside_v4, 24),
            (self.outside_v4_alt, 24),
            (self.outside_v6, 64),
            (self.outside_v6_alt, 64),
        ] {
            address(outside, OUTSIDE_IF, addr, len)?;
        }
        address(gateway, GATEWAY_OUTSIDE_IF, self.gateway_outside_v4, 24)?;
        address(gateway, GATEWAY_OUTSIDE_IF, self.gateway_outside_v6, 64)?;
        address(gateway, INSIDE_BRIDGE, self.gateway_inside_v4, 24)?;
        address(gateway, INSIDE_BRIDGE, self.gateway_inside_v6, 64)?;
        for host in &self.hosts {
            address(&host.netns, HOST_IF, host.v4, 24)?;
            if let Some(alt) = host.v4_alt {
                address(&host.netns, HOST_IF, alt, 24)?;
            }
            address(&host.netns, HOST_IF, host.v6, 64)?;
            if let Some(alt) = host.v6_alt {
                address(&host.netns, HOST_IF, alt, 64)?;
            }
        }
        for (ns, ifname) in &links {
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        // A veth carries packets only once the kernel's link watcher has marked it up, which it
        // may do up to a second later; until then the first packets would be lost.
        for (ns, ifname) in &links {
            let up = wait_until(LINK_UP_WAIT, Duration::from_millis(10), || {
                ns.ip(&["-o", "link", "show", "dev", ifname])
                    .is_ok_and(|out| out.contains("state UP") || out.contains(",UP"))
            });
            if !up {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{ifname} in {} did not come up", ns.name()),
                ));
            }
        }
        let gw_out_v4 = self.gateway_outside_v4.to_string();
        let gw_out_v6 = self.gateway_outside_v6.to_string();
        let gw_in_v4 = self.gateway_inside_v4.to_string();
        let gw_in_v6 = self.gateway_inside_v6.to_string();
        outside.ip(&["route", "add", "default", "via", &gw_out_v4])?;
        outside.ip(&["-6", "route", "add", "default", "via", &gw_out_v6])?;
        for host in &self.hosts {
            host.netns
                .ip(&["route", "add", "default", "via", &gw_in_v4])?;
            host.netns
                .ip(&["-6", "route", "add", "default", "via", &gw_in_v6])?;
        }
        Ok(())
    }

    /// The first host's main address, IPv6 if `v6`, else IPv4.
    pub fn host_addr(&self, v6: bool) -> IpAddr {
        self.host().addr(v6)
    }

    /// The outside's main address, IPv6 if `v6`, else IPv4.
    pub fn outside_addr(&self, v6: bool) -> IpAddr {
        if v6 { self.outside_v6 } else { self.outside_v4 }
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// `PREFIX:SUBNET::HIGH:LOW`, enough for the few addresses of a topology.
fn v6(prefix: u16, subnet: u16, high: u16, low: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(prefix, subnet, 0, 0, 0, 0, high, low))
}

/// How often server threads look at their stop flag, and the bound of a blocked read in them.
const SERVER_POLL: Duration = Duration::from_millis(20);
/// How long one echo connection may stay idle before the server closes it.
const ECHO_IDLE: Duration = Duration::from_secs(5);

/// A TCP server inside a namespace that echoes back whatever each connection sends. Listens on
/// `[::]` (IPv4 and IPv6) on every port it was given; stops when dropped.
#[derive(Debug)]
pub struct TcpEchoServer {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Starts a server on `port` in `ns`.
    pub fn start(ns: &Netns, port: u16) -> io::Result<Self> {
        Self::start_ports(ns, &[port])
    }

    /// Starts a server listening on every port of `ports` in `ns`.
    pub fn start_ports(ns: &Netns, ports: &[u16]) -> io::Result<Self> {
        let listeners: Vec<TcpListener> = ns.run(|| {
            ports
                .iter()
                .map(|&port| {
                    let listener = TcpListener::bind(SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                        port,
                    ))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .collect::<io::Result<_>>()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .map(|listener| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || tcp_accept_loop(&listener, &stop))
            })
            .collect();
        Ok(TcpEchoServer {
            ports: ports.to_vec(),
            stop,
            threads,
        })
    }

    /// The ports it listens on.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }
}

fn tcp_accept_loop(listener: &TcpListener, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let stop = Arc::clone(stop);
                std::thread::spawn(move || tcp_echo(stream, &stop));
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(SERVER_POLL);
            }
            Err(_) => std::thread::sleep(SERVER_POLL),
        }
    }
}

fn tcp_echo(mut stream: TcpStream, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(SERVER_POLL)).is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut idle_since = Instant::now();
    while !stop.load(Ordering::Relaxed) && idle_since.elapsed() < ECHO_IDLE {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let Some(data) = buf.get(..n) else { return };
                if stream.write_all(data).is_err() {
                    return;
                }
                idle_since = Instant::now();
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A UDP server inside a namespace that sends every datagram back to its sender, from the
/// address it was sent to, on every port it was given; stops when dropped.
#[derive(Debug)]
pub struct UdpEchoServer {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpEchoServer {
    /// Starts a server on `port` in `ns`.
    pub fn start(ns: &Netns, port: u16) -> io::Result<Self> {
        Self::start_ports(ns, &[port])
    }

    /// Starts a server on every port of `ports` in `ns`.
    ///
    /// It binds one socket per address of the namespace (as they are now), so that every answer
    /// leaves from the address the datagram was sent to, as a client expects.
    pub fn start_ports(ns: &Netns, ports: &[u16]) -> io::Result<Self> {
        let addresses = ns.addresses()?;
        let sockets: Vec<UdpSocket> = ns.run(|| {
            let mut sockets = Vec::new();
            for &port in ports {
                for &addr in &addresses {
                    let socket = UdpSocket::bind(SocketAddr::new(addr, port))?;
                    socket.set_read_timeout(Some(SERVER_POLL))?;
                    sockets.push(socket);
                }
            }
            Ok::<_, io::Error>(sockets)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = sockets
            .into_iter()
            .map(|socket| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = socket.recv_from(&mut buf)
                            && let Some(data) = buf.get(..n)
                        {
                            let _ = socket.send_to(data, from);
                        }
                    }
                })
            })
            .collect();
        Ok(UdpEchoServer {
            ports: ports.to_vec(),
            stop,
            threads,
        })
    }

    /// The ports it listens on.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Counter that makes every probe's payload different, so an echo can't be mistaken for an
/// earlier one.
static NEXT_PROBE: AtomicU32 = AtomicU32::new(0);

fn probe_payload() -> Vec<u8> {
    format!(
        "fwnp-probe {} {}\n",
        std::process::id(),
        NEXT_PROBE.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// Whether a TCP connection from `ns` to `to` is established within `timeout` and carries a
/// payload there and back (checked against an echo server). `from` picks the source address
/// (it must be an address of `ns`); `None` lets the kernel choose.
///
/// Never waits longer than about twice `timeout` (connect, then the echo).
pub fn tcp_connects(ns: &Netns, to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> bool {
    ns.run(|| tcp_probe(to, from, timeout)).is_ok()
}

/// The same probe as [`tcp_connects`], with the reason when it fails (for test messages).
pub fn tcp_probe_in(
    ns: &Netns,
    to: SocketAddr,
    from: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<()> {
    ns.run(|| tcp_probe(to, from, timeout))
}

fn tcp_probe(to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> io::Result<()> {
    let socket = Socket::new(
        Domain::for_address(to),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    if let Some(source) = from {
        socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(to), timeout)?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let payload = probe_payload();
    stream.write_all(&payload)?;
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed)?;
    if echoed == payload {
        Ok(())
    } else {
        Err(io::Error::other("the echo differs from what was sent"))
    }
}

/// How many datagrams a UDP probe sends at most (a first one may be lost while neighbours are
/// being resolved).
const UDP_ATTEMPTS: u32 = 3;

/// Whether a datagram sent from `ns` to `to` comes back from an echo server within `timeout`
/// (split over a few attempts). `from` picks the source address, as in [`tcp_connects`].
pub fn udp_roundtrip(ns: &Netns, to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> bool {
    ns.run(|| udp_probe(to, from, timeout)).is_ok()
}

fn udp_probe(to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> io::Result<()> {
    let unspecified = match to {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(from.unwrap_or(unspecified), 0))?;
    socket.connect(to)?;
    let per_attempt = (timeout / UDP_ATTEMPTS).max(Duration::from_millis(10));
    let deadline = Instant::now() + timeout;
    let payload = probe_payload();
    let mut buf = [0u8; 2048];
    for _ in 0..UDP_ATTEMPTS {
        socket.send(&payload)?;
        let attempt_end = (Instant::now() + per_attempt).min(deadline);
        loop {
            let left = attempt_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buf) {
                Ok(n) if buf.get(..n) == Some(payload.as_slice()) => return Ok(()),
                // An echo of an earlier attempt of this probe, or noise: keep listening.
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                // ECONNREFUSED (an ICMP error from a reject rule or a closed port) and others.
                Err(err) => return Err(err),
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no echo"))
}

/// Polls `condition` every `interval` until it holds or `limit` has passed; returns whether it
/// held. Bounded in time and, through the interval, in count.
pub fn wait_until(
    limit: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}
