//! Tests of the namespace toolkit itself: the topology forwards traffic, the probes tell an open
//! path from a closed one, and namespaces disappear when their guard is dropped, also on panic.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use fwnp_testkit::netns::{
    Netns, TcpEchoServer, Topology, UdpEchoServer, require_root, tcp_connects, tcp_probe_in,
    udp_roundtrip, wait_until,
};

const PROBE: Duration = Duration::from_secs(1);

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

#[test]
fn topology_forwards_tcp_and_udp_both_families() {
    if !require_root("topology_forwards_tcp_and_udp_both_families") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let _tcp = TcpEchoServer::start(&topo.host().netns, 7001).expect("tcp server");
    let _udp = UdpEchoServer::start(&topo.host().netns, 7001).expect("udp server");
    for host in [
        topo.host().v4,
        topo.host().v6,
        topo.host().v4_alt.expect("a second host address"),
        topo.host().v6_alt.expect("a second host address"),
    ] {
        let to = SocketAddr::new(host, 7001);
        if let Err(err) = tcp_probe_in(&topo.outside, to, None, PROBE) {
            panic!("tcp outside -> {to}: {err}");
        }
        assert!(
            udp_roundtrip(&topo.outside, to, None, PROBE),
            "udp outside -> {to}"
        );
    }
    // Chosen source addresses, main and second, in both families.
    for (from, host) in [
        (topo.outside_v4, topo.host().v4),
        (topo.outside_v4_alt, topo.host().v4),
        (topo.outside_v6, topo.host().v6),
        (topo.outside_v6_alt, topo.host().v6),
    ] {
        let to = SocketAddr::new(host, 7001);
        assert!(
            tcp_connects(&topo.outside, to, Some(from), PROBE),
            "tcp {from} -> {to}"
        );
        assert!(
            udp_roundtrip(&topo.outside, to, Some(from), PROBE),
            "udp {from} -> {to}"
        );
    }
}

#[test]
fn a_topology_of_several_hosts_forwards_to_each_by_its_own_address() {
    if !require_root("a_topology_of_several_hosts_forwards_to_each_by_its_own_address") {
        return;
    }
    let topo = Topology::with_hosts(3, "web").expect("topology");
    let names: Vec<&str> = topo.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["web-01", "web-02", "web-03"]);
    // Each host answers on a port of its own, so a reply proves which host was reached.
    let servers: Vec<TcpEchoServer> = topo
        .hosts
        .iter()
        .enumerate()
        .map(|(i, host)| TcpEchoServer::start(&host.netns, 7100 + i as u16).expect("server"))
        .collect();
    for (i, host) in topo.hosts.iter().enumerate() {
        assert_eq!(host.v4_alt, None, "{}", host.name);
        for v6 in [false, true] {
            let port = 7100 + i as u16;
            let to = SocketAddr::new(host.addr(v6), port);
            assert!(
                tcp_connects(&topo.outside, to, None, PROBE),
                "outside -> {to}"
            );
            // Another host's port is closed at this address.
            let other = SocketAddr::new(host.addr(v6), 7100 + ((i + 1) % 3) as u16);
            assert!(
                !tcp_connects(&topo.outside, other, None, PROBE),
                "outside -> {other}"
            );
        }
    }
    drop(servers);
}

#[test]
fn probes_fail_fast_and_bounded_without_a_server() {
    if !require_root("probes_fail_fast_and_bounded_without_a_server") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let to = SocketAddr::new(topo.host().v4, 7002);
    let started = Instant::now();
    assert!(!tcp_connects(&topo.outside, to, None, PROBE));
    assert!(!udp_roundtrip(&topo.outside, to, None, PROBE));
    assert!(
        started.elapsed() < 3 * PROBE,
        "took {:?}",
        started.elapsed()
    );
    // A black hole (a drop rule with nft, in the gateway): the probe gives up after its timeout.
    topo.gateway
        .nft_script("table inet blackhole {\n chain f { type filter hook forward priority 0; policy drop; }\n}\n")
        .expect("nft");
    let _tcp = TcpEchoServer::start(&topo.host().netns, 7003).expect("tcp server");
    let started = Instant::now();
    assert!(!tcp_connects(
        &topo.outside,
        SocketAddr::new(topo.host().v4, 7003),
        None,
        PROBE
    ));
    let took = started.elapsed();
    assert!(took >= PROBE / 2 && took < 3 * PROBE, "took {took:?}");
}

#[test]
fn namespaces_are_removed_on_drop_and_on_panic() {
    if !require_root("namespaces_are_removed_on_drop_and_on_panic") {
        return;
    }
    let ns = Netns::new("fwlab").expect("netns");
    let name = ns.name().to_owned();
    assert!(netns_exists(&name));
    // A process left running inside is killed when the namespace goes.
    let mut child = ns
        .spawn(Command::new("sleep").arg("30"))
        .expect("spawn sleep");
    drop(ns);
    assert!(!netns_exists(&name), "{name} still exists");
    let ended = wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    assert!(ended, "the process in the namespace was not killed");

    let names = std::thread::spawn(|| {
        let ns = Netns::new("fwlab").expect("netns");
        let name = ns.name().to_owned();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ns.run(|| panic!("a test failing inside the namespace"));
        }));
        assert!(result.is_err());
        name
    })
    .join()
    .expect("thread");
    assert!(!netns_exists(&names), "{names} survived a panic");
}

#[test]
fn names_are_unique_and_short() {
    if !require_root("names_are_unique_and_short") {
        return;
    }
    let a = Netns::new("fwuniquelongprefix").expect("netns");
    let b = Netns::new("fwuniquelongprefix").expect("netns");
    assert_ne!(a.name(), b.name());
    assert!(a.name().contains(&std::process::id().to_string()));
    assert!(a.name().len() <= 24, "{}", a.name());
    // A fresh namespace has just `lo`, and code run inside it binds there.
    let out = a.exec_checked(&["ip", "-o", "link"]).expect("ip link");
    assert_eq!(out.lines().count(), 1, "{out}");
    let bound = a.run(|| std::net::TcpListener::bind("127.0.0.1:7004").map(drop));
    assert!(bound.is_ok(), "{bound:?}");
}
