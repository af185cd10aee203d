//! The host layout on the real kernel: `inet fwnp_host` on the host namespace's input hook,
//! proven with traffic from the outside namespace (through the gateway, which filters nothing
//! here) and from the host itself.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use fwnp_netfilter::{
    AlwaysAllowed, Batcher, BatcherConfig, Change, HostMode, Netfilter, PortRange, Protocol,
};
use fwnp_testkit::netns::{TcpEchoServer, UdpEchoServer, require_root, tcp_connects};

fn admin_segment() -> Vec<AlwaysAllowed> {
    vec![
        // IPv4: only tcp/2222 from 192.0.2.0/26 (the outside's main address, not its second).
        AlwaysAllowed {
            remote: prefix_str("192.0.2.0/26"),
            protocol: Some(Protocol::Tcp),
            ports: Some(PortRange::single(2222)),
        },
        // IPv6: anything from fd00:1::/112.
        AlwaysAllowed {
            remote: prefix_str("fd00:1::/112"),
            protocol: None,
            ports: None,
        },
    ]
}

#[test]
fn enforce_admits_only_mirrored_leases_and_always_allowed_entries() {
    if !require_root("enforce_admits_only_mirrored_leases_and_always_allowed_entries") {
        return;
    }
    let topo = topology();
    let _tcp = TcpEchoServer::start_ports(&topo.host().netns, &[2222, 8080, 8081]).expect("server");
    let _udp = UdpEchoServer::start(&topo.host().netns, 5353).expect("udp server");
    let _outside = TcpEchoServer::start(&topo.outside, 9000).expect("outside server");
    let layout = host_layout(HostMode::Enforce, admin_segment());
    let mut nf = open_and_apply(&topo.host().netns, &layout, &[]);

    // No lease: nothing from outside except the always-allowed entries.
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v4,
        topo.host().v4,
        8080
    ));
    assert!(!outside_udp(&topo, topo.host().v4, 5353));
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v4,
        topo.host().v4,
        2222
    ));
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v4_alt,
        topo.host().v4,
        2222
    ));
    assert!(
        !outside_tcp_from(&topo, topo.outside_v4, topo.host().v4, 8081),
        "port not allowed"
    );
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v6,
        topo.host().v6,
        8081
    ));
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v6,
        topo.host().v6,
        8080
    ));
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v6_alt,
        topo.host().v6,
        8080
    ));
    // Loopback and the host's own outgoing connections (their answers) pass.
    for to in ["127.0.0.1:8081", "[::1]:8081"] {
        let to: SocketAddr = to.parse().expect("address");
        assert!(
            tcp_connects(&topo.host().netns, to, None, PROBE),
            "loopback {to} refused"
        );
    }
    for to in [topo.outside_v4, topo.outside_v6] {
        assert!(tcp_connects(
            &topo.host().netns,
            SocketAddr::new(to, 9000),
            None,
            PROBE
        ));
    }

    // Mirrored leases: tcp/8080 on both main addresses, udp/5353 on IPv4, and tcp/8081 on IPv4
    // only from 192.0.2.64/26 (the outside's second address).
    let ttl = Duration::from_secs(30);
    let changes = [
        Change::Add(tcp(topo.host().v4, 8080), ttl),
        Change::Add(tcp(topo.host().v6, 8080), ttl),
        Change::Add(udp(topo.host().v4, 5353), ttl),
        Change::Add(
            tcp_from(topo.host().v4, 8081, prefix_str("192.0.2.64/26")),
            ttl,
        ),
    ];
    let results = nf.commit(&layout, &changes).expect("commit");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v4,
        topo.host().v4,
        8080
    ));
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v6_alt,
        topo.host().v6,
        8080
    ));
    assert!(outside_udp(&topo, topo.host().v4, 5353));
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v4_alt,
        topo.host().v4,
        8081
    ));
    assert!(
        !outside_tcp_from(&topo, topo.outside_v4, topo.host().v4, 8081),
        "wrong source"
    );
    // The lease names the host's address: its second address stays closed.
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v4,
        topo.host().v4_alt.expect("a second host address"),
        8080
    ));

    // Counters: refusals are counted as unmatched, leases as accepted.
    let counters = nf.counters(&layout).expect("counters");
    let count = |name: &str| {
        counters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.packets)
            .unwrap_or_else(|| panic!("no counter {name} in {counters:?}"))
    };
    assert!(count("accepted") > 0, "{counters:?}");
    assert!(count("unmatched") > 0, "{counters:?}");
    assert!(count("always_allowed") > 0, "{counters:?}");

    // Removing the mirror closes the port on the host at once.
    let results = nf
        .commit(&layout, &[Change::Remove(tcp(topo.host().v4, 8080))])
        .expect("commit");
    assert!(results[0].is_ok());
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v4,
        topo.host().v4,
        8080
    ));
}

#[test]
fn monitor_mode_accepts_and_counts() {
    if !require_root("monitor_mode_accepts_and_counts") {
        return;
    }
    let topo = topology();
    let _tcp = TcpEchoServer::start_ports(&topo.host().netns, &[8080, 8081]).expect("server");
    let layout = host_layout(HostMode::Monitor, Vec::new());
    let mut nf = open_and_apply(
        &topo.host().netns,
        &layout,
        &[(tcp(topo.host().v4, 8080), Duration::from_secs(30))],
    );
    let unmatched = |nf: &mut fwnp_netfilter::Netfilter| {
        nf.counters(&layout)
            .expect("counters")
            .into_iter()
            .find(|c| c.name == "unmatched")
            .map(|c| c.packets)
            .expect("unmatched counter")
    };
    let before = unmatched(&mut nf);
    assert_eq!(before, 0);
    // A connection no lease admits is accepted...
    assert!(outside_tcp(&topo, topo.host().v4, 8081));
    assert!(outside_tcp(&topo, topo.host().v6, 8081));
    // ...and counted: at least the two SYNs.
    let after = unmatched(&mut nf);
    assert!(after >= 2, "unmatched {before} -> {after}");
    // The kernel's own view, through nft, agrees.
    let by_nft =
        nft_counter_packets(&topo.host().netns, "fwnp_host", "unmatched").expect("nft counter");
    assert!(by_nft >= after, "nft says {by_nft}, the crate {after}");
    // A leased connection counts as accepted, not unmatched.
    let accepted_before =
        nft_counter_packets(&topo.host().netns, "fwnp_host", "accepted").expect("nft");
    let unmatched_before = unmatched(&mut nf);
    assert!(outside_tcp(&topo, topo.host().v4, 8080));
    let accepted_after =
        nft_counter_packets(&topo.host().netns, "fwnp_host", "accepted").expect("nft");
    assert!(accepted_after > accepted_before);
    assert_eq!(unmatched(&mut nf), unmatched_before);
}

/// The host agent's rollout: start in monitor mode, switch to enforce through the batcher; the
/// mirrored leases survive the switch, an invalid layout is refused and changes nothing, and a
/// repair restores the layout in force, not the first one.
#[test]
fn batcher_switches_monitor_to_enforce_keeping_leases() {
    if !require_root("batcher_switches_monitor_to_enforce_keeping_leases") {
        return;
    }
    let topo = topology();
    let _tcp = TcpEchoServer::start_ports(&topo.host().netns, &[8080, 8081]).expect("server");
    let monitor = host_layout(HostMode::Monitor, Vec::new());
    let enforce = host_layout(HostMode::Enforce, Vec::new());
    let batcher = topo.host().netns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        // Shared, so that the flush below reaches it and the repair can be seen.
        nf.set_ownership(fwnp_netfilter::Ownership::Shared);
        nf.apply(&monitor, &[]).expect("apply");
        Batcher::start(nf, monitor.clone(), BatcherConfig::default()).expect("batcher")
    });
    runtime().block_on(async {
        batcher
            .add(tcp(topo.host().v4, 8080), Duration::from_secs(30))
            .await
            .expect("add");
        assert!(
            outside_tcp(&topo, topo.host().v4, 8081),
            "monitor mode refused"
        );
        batcher.apply(enforce.clone()).await.expect("apply enforce");
        assert!(
            outside_tcp(&topo, topo.host().v4, 8080),
            "lease lost in the switch"
        );
        assert!(
            !outside_tcp(&topo, topo.host().v4, 8081),
            "enforce mode admits everything"
        );
        // A layout that cannot be built is refused, and the one in force stays.
        let invalid = host_layout(
            HostMode::Enforce,
            vec![AlwaysAllowed {
                remote: prefix_str("192.0.2.0/40"),
                protocol: None,
                ports: None,
            }],
        );
        let refused = batcher.apply(invalid).await;
        assert!(refused.is_err(), "an IPv4 prefix of length 40 was accepted");
        assert!(outside_tcp(&topo, topo.host().v4, 8080));
        assert!(!outside_tcp(&topo, topo.host().v4, 8081));
        // A repair restores enforce mode with the lease.
        let mut repairs = batcher.repairs();
        topo.host()
            .netns
            .exec_checked(&["nft", "flush", "ruleset"])
            .expect("nft flush ruleset");
        let event = tokio::time::timeout(Duration::from_secs(5), repairs.recv()).await;
        assert!(matches!(event, Ok(Ok(_))), "no repair: {event:?}");
        assert!(outside_tcp(&topo, topo.host().v4, 8080));
        assert!(
            !outside_tcp(&topo, topo.host().v4, 8081),
            "repair restored monitor mode"
        );
        batcher.shutdown().await;
    });
}
