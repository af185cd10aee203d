//! Port owner verification against the real kernel's socket tables and real processes: sockets
//! bound by this test process, a child process, and ports nobody binds. No root needed.

use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fwnp_agent::ports::{CallerProcess, Ownership, PortNotOwned, ProcFs};
use fwnp_proto::{PortRange, Protocol};

/// A child process killed and reaped when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper() -> ChildGuard {
    ChildGuard(
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep"),
    )
}

/// A port that nothing binds right now (bound and closed again at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

/// The running process `pid`, as the agent pins down a caller.
fn identify(pid: u32) -> CallerProcess {
    CallerProcess::identify(&ProcFs::default(), pid, None).expect("a running process")
}

#[test]
fn a_caller_that_exited_is_refused_and_pid_zero_is_nobody() {
    let procfs = ProcFs::default();
    let mut child = sleeper();
    let caller = identify(child.0.id());
    assert!(caller.is_alive(&procfs));
    // Bound by this process: the refusal must say the caller is gone, before any owner.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let _ = child.0.kill();
    let _ = child.0.wait();
    assert!(
        !caller.is_alive(&procfs),
        "an exited process counts as alive"
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused = runtime
        .block_on(procfs.verify(
            &caller,
            Protocol::Tcp,
            PortRange::single(port),
            Duration::from_secs(1),
        ))
        .expect_err("refused");
    assert_eq!(refused, PortNotOwned::CallerGone { pid: caller.pid() });
    assert!(refused.to_string().contains("has exited"), "{refused}");
    // Pid 0 (a peer in another PID namespace) is no process: its "descendants" would be all.
    assert!(CallerProcess::identify(&procfs, 0, None).is_none());
    drop(listener);
}

#[test]
fn a_listener_of_this_process_is_its_own() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let me = std::process::id();
    let procfs = ProcFs::default();
    assert_eq!(
        procfs
            .ownership(me, Protocol::Tcp, PortRange::single(port))
            .expect("read /proc"),
        Ownership::Caller { pid: me }
    );
    // Another protocol on the same port is not bound.
    assert_eq!(
        procfs
            .ownership(me, Protocol::Udp, PortRange::single(port))
            .expect("read /proc"),
        Ownership::Unbound
    );
}

#[test]
fn a_udp_socket_and_a_range_are_found() {
    let socket = UdpSocket::bind("[::1]:0")
        .or_else(|_| UdpSocket::bind("127.0.0.1:0"))
        .expect("bind");
    let port = socket.local_addr().expect("address").port();
    let me = std::process::id();
    let range = PortRange {
        first: port.saturating_sub(2).max(1),
        last: port.saturating_add(2),
    };
    assert_eq!(
        ProcFs::default()
            .ownership(me, Protocol::Udp, range)
            .expect("read /proc"),
        Ownership::Caller { pid: me }
    );
}

#[test]
fn a_port_bound_by_someone_else_names_the_owner() {
    // The caller is a child (`sleep`); the port is bound by this test process, which is not
    // one of the child's descendants.
    let child = sleeper();
    let caller = child.0.id();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let me = std::process::id();
    let procfs = ProcFs::default();
    match procfs
        .ownership(caller, Protocol::Tcp, PortRange::single(port))
        .expect("read /proc")
    {
        Ownership::Other { port: p, pid, comm } => {
            assert_eq!(p, port);
            assert_eq!(pid, me);
            assert_eq!(comm, procfs.comm(me));
        }
        other => panic!("expected another owner, got {other:?}"),
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused = runtime
        .block_on(procfs.verify(
            &identify(caller),
            Protocol::Tcp,
            PortRange::single(port),
            Duration::from_secs(2),
        ))
        .expect_err("refused");
    let text = refused.to_string();
    assert!(
        text.contains(&format!("tcp/{port} is bound by pid {me}"))
            && text.contains("not by the caller"),
        "{text}"
    );
}

#[test]
fn a_socket_held_by_a_descendant_counts_as_the_caller() {
    // The listening socket goes to a child as its standard input; this process keeps no copy.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let child = ChildGuard(
        Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                listener,
            )))
            .spawn()
            .expect("start sleep"),
    );
    let holder = child.0.id();
    let me = std::process::id();
    let procfs = ProcFs::default();
    assert!(procfs.process_tree(me).contains(&holder));
    assert_eq!(
        procfs
            .ownership(me, Protocol::Tcp, PortRange::single(port))
            .expect("read /proc"),
        Ownership::Caller { pid: holder }
    );
    // Seen from the child, this process is not a descendant, but it holds nothing: still fine.
    assert_eq!(
        procfs
            .ownership(holder, Protocol::Tcp, PortRange::single(port))
            .expect("read /proc"),
        Ownership::Caller { pid: holder }
    );
}

#[test]
fn nobody_binding_within_the_grace_period_is_refused() {
    let port = free_port();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let refused = runtime
        .block_on(ProcFs::default().verify(
            &identify(std::process::id()),
            Protocol::Tcp,
            PortRange::single(port),
            Duration::from_millis(500),
        ))
        .expect_err("refused");
    let waited = started.elapsed();
    assert!(
        matches!(refused, PortNotOwned::Nobody { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("nobody listens"), "{refused}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn binding_during_the_grace_period_is_accepted() {
    let port = free_port();
    let binder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind late");
        std::thread::sleep(Duration::from_secs(2));
        drop(listener);
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let holder = runtime
        .block_on(ProcFs::default().verify(
            &identify(std::process::id()),
            Protocol::Tcp,
            PortRange::single(port),
            Duration::from_secs(2),
        ))
        .expect("bound within the grace period");
    assert_eq!(holder, std::process::id());
    binder.join().expect("binder thread");
}

#[test]
fn a_caller_in_another_network_namespace_is_told_why() {
    if !fwnp_testkit::netns::require_root("a_caller_in_another_network_namespace_is_told_why") {
        return;
    }
    // A process in a network namespace of its own, as in a container, listening there.
    let child = ChildGuard(
        Command::new("unshare")
            .args(["--net", "--", "python3", "-c"])
            .arg(
                "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 7002)); \
                 s.listen(); time.sleep(30)",
            )
            .spawn()
            .expect("run unshare (util-linux)"),
    );
    let procfs = ProcFs::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs.network_namespace(&child.0.id().to_string()) == procfs.network_namespace("self") {
        assert!(Instant::now() < deadline, "unshare made no namespace");
        std::thread::sleep(Duration::from_millis(10));
    }
    let caller = identify(child.0.id());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused = runtime
        .block_on(procfs.verify(
            &caller,
            Protocol::Tcp,
            PortRange::single(7002),
            Duration::from_millis(300),
        ))
        .expect_err("a port the agent cannot see is not verified");
    assert!(
        matches!(refused, PortNotOwned::OtherNetworkNamespace { pid, .. } if pid == child.0.id()),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("another network namespace"),
        "{refused}"
    );
}
