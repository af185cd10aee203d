//! The gateway layout on the real kernel, proven with real traffic: outside -> gateway -> host.
//!
//! Each test builds its own three namespaces, applies `inet fwnp` in the gateway namespace and
//! sends TCP or UDP from the outside namespace to echo servers in the host namespace.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use fwnp_netfilter::{Change, Element, Error, Netfilter, Refuse};
use fwnp_testkit::netns::{TcpEchoServer, UdpEchoServer, require_root, tcp_connects};

#[test]
fn lease_opens_the_port_and_its_timeout_closes_it_v4_and_v6() {
    if !require_root("lease_opens_the_port_and_its_timeout_closes_it_v4_and_v6") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start(&topo.host().netns, 8080).expect("server");
    // Drop: a refused connection is a silent timeout, as an operator would configure it.
    let layout = gateway_layout(Refuse::Drop);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    for host in [topo.host().v4, topo.host().v6] {
        assert!(
            !outside_tcp(&topo, host, 8080),
            "{host}:8080 open before any lease"
        );
    }
    let lifetime = Duration::from_millis(2500);
    let changes = [
        Change::Add(tcp(topo.host().v4, 8080), lifetime),
        Change::Add(tcp(topo.host().v6, 8080), lifetime),
    ];
    let added = Instant::now();
    let results = nf.commit(&layout, &changes).expect("commit");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for host in [topo.host().v4, topo.host().v6] {
        assert!(
            outside_tcp(&topo, host, 8080),
            "{host}:8080 closed with a lease"
        );
    }
    // The kernel alone closes it: nothing of ours runs any more after the commit.
    for host in [topo.host().v4, topo.host().v6] {
        let closed = until(Duration::from_secs(5), false, || {
            outside_tcp(&topo, host, 8080)
        });
        assert!(
            closed.is_some(),
            "{host}:8080 still open 5 s after a 2.5 s lease"
        );
    }
    let elapsed = added.elapsed();
    assert!(
        elapsed >= lifetime,
        "closed after {elapsed:?}, before the lease's {lifetime:?}"
    );
    let left = nf.elements(&layout).expect("elements");
    assert!(left.is_empty(), "expired elements still listed: {left:?}");
}

#[test]
fn remove_closes_at_once_and_renew_keeps_open_past_the_first_timeout() {
    if !require_root("remove_closes_at_once_and_renew_keeps_open_past_the_first_timeout") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start_ports(&topo.host().netns, &[8080, 8081]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    let removed = tcp(topo.host().v4, 8080);
    let renewed = tcp(topo.host().v4, 8081);
    let first = Duration::from_secs(2);
    let results = nf
        .commit(
            &layout,
            &[
                Change::Add(removed.clone(), Duration::from_secs(60)),
                Change::Add(renewed.clone(), first),
            ],
        )
        .expect("commit");
    let added = Instant::now();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(outside_tcp(&topo, topo.host().v4, 8080));
    assert!(outside_tcp(&topo, topo.host().v4, 8081));

    let results = nf
        .commit(&layout, &[Change::Remove(removed.clone())])
        .expect("commit remove");
    assert!(results[0].is_ok(), "{results:?}");
    // At once: the very next connection is refused.
    assert!(
        !outside_tcp(&topo, topo.host().v4, 8080),
        "open after remove"
    );

    // Renew at about half the lifetime, to 4 s from then.
    std::thread::sleep(Duration::from_millis(1000).saturating_sub(added.elapsed()));
    let results = nf
        .commit(
            &layout,
            &[Change::Renew(renewed.clone(), Duration::from_secs(4))],
        )
        .expect("commit renew");
    let renewed_at = Instant::now();
    assert!(results[0].is_ok(), "{results:?}");
    // Past the first timeout (2 s after adding), with a margin.
    std::thread::sleep((first + Duration::from_millis(700)).saturating_sub(added.elapsed()));
    assert!(
        outside_tcp(&topo, topo.host().v4, 8081),
        "closed after the first timeout although renewed"
    );
    let remaining = nf
        .elements(&layout)
        .expect("elements")
        .into_iter()
        .find(|(o, _)| *o == renewed)
        .map(|(_, left)| left)
        .expect("renewed element listed");
    let expected = Duration::from_secs(4).saturating_sub(renewed_at.elapsed());
    assert!(
        remaining.abs_diff(expected) < Duration::from_millis(500),
        "remaining {remaining:?}, expected about {expected:?}"
    );
    // And the renewed timeout is real: it closes by itself afterwards.
    let closed = until(Duration::from_secs(4), false, || {
        outside_tcp(&topo, topo.host().v4, 8081)
    });
    assert!(closed.is_some(), "renewed opening never closed");
    assert!(renewed_at.elapsed() >= Duration::from_millis(3900));
}

#[test]
fn source_restricted_lease_admits_only_its_prefix() {
    if !require_root("source_restricted_lease_admits_only_its_prefix") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start(&topo.host().netns, 8443).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    let leases = [
        tcp_from(topo.host().v4, 8443, prefix_str("192.0.2.0/26")),
        tcp_from(topo.host().v6, 8443, prefix_str("fd00:1::/112")),
    ];
    let changes: Vec<Change> = leases
        .iter()
        .map(|o| Change::Add(o.clone(), Duration::from_secs(30)))
        .collect();
    let results = nf.commit(&layout, &changes).expect("commit");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v4,
        topo.host().v4,
        8443
    ));
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v4_alt,
        topo.host().v4,
        8443
    ));
    assert!(outside_tcp_from(
        &topo,
        topo.outside_v6,
        topo.host().v6,
        8443
    ));
    assert!(!outside_tcp_from(
        &topo,
        topo.outside_v6_alt,
        topo.host().v6,
        8443
    ));
    // Read back as given (the prefixes are already canonical).
    let listed: BTreeSet<Element> = nf
        .elements(&layout)
        .expect("elements")
        .into_iter()
        .map(|(o, _)| o)
        .collect();
    assert_eq!(listed, leases.iter().cloned().collect());
}

#[test]
fn port_range_admits_its_ports_and_not_the_next() {
    if !require_root("port_range_admits_its_ports_and_not_the_next") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start_ports(&topo.host().netns, &[8999, 9000, 9001, 9002, 9003])
        .expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    let changes = [
        Change::Add(
            tcp_range(topo.host().v4, 9000, 9002),
            Duration::from_secs(30),
        ),
        Change::Add(
            tcp_range(topo.host().v6, 9000, 9002),
            Duration::from_secs(30),
        ),
    ];
    let results = nf.commit(&layout, &changes).expect("commit");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for host in [topo.host().v4, topo.host().v6] {
        for port in [9000, 9001, 9002] {
            assert!(
                outside_tcp(&topo, host, port),
                "{host}:{port} in the range refused"
            );
        }
        for port in [8999, 9003] {
            assert!(
                !outside_tcp(&topo, host, port),
                "{host}:{port} outside the range admitted"
            );
        }
    }
}

#[test]
fn udp_works_as_tcp_and_protocols_are_kept_apart() {
    if !require_root("udp_works_as_tcp_and_protocols_are_kept_apart") {
        return;
    }
    let topo = topology();
    let _udp = UdpEchoServer::start(&topo.host().netns, 5353).expect("udp server");
    let _tcp = TcpEchoServer::start(&topo.host().netns, 5353).expect("tcp server");
    let layout = gateway_layout(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    for host in [topo.host().v4, topo.host().v6] {
        assert!(
            !outside_udp(&topo, host, 5353),
            "udp {host} open before a lease"
        );
    }
    let leases = [udp(topo.host().v4, 5353), udp(topo.host().v6, 5353)];
    let changes: Vec<Change> = leases
        .iter()
        .map(|o| Change::Add(o.clone(), Duration::from_secs(30)))
        .collect();
    assert!(
        nf.commit(&layout, &changes)
            .expect("commit")
            .iter()
            .all(Result::is_ok)
    );
    for host in [topo.host().v4, topo.host().v6] {
        assert!(
            outside_udp(&topo, host, 5353),
            "udp {host} closed with a lease"
        );
        assert!(
            !outside_tcp(&topo, host, 5353),
            "a udp lease admitted tcp to {host}"
        );
    }
    let removes: Vec<Change> = leases.iter().cloned().map(Change::Remove).collect();
    assert!(
        nf.commit(&layout, &removes)
            .expect("commit")
            .iter()
            .all(Result::is_ok)
    );
    for host in [topo.host().v4, topo.host().v6] {
        assert!(
            !outside_udp(&topo, host, 5353),
            "udp {host} open after remove"
        );
    }
}

#[test]
fn traffic_not_towards_protected_prefixes_is_untouched() {
    if !require_root("traffic_not_towards_protected_prefixes_is_untouched") {
        return;
    }
    let topo = topology();
    let _host_server = TcpEchoServer::start(&topo.host().netns, 8080).expect("host server");
    let _outside_server = TcpEchoServer::start(&topo.outside, 8080).expect("outside server");
    let _gateway_server = TcpEchoServer::start(&topo.gateway, 8080).expect("gateway server");
    // Protect only the host's main addresses.
    let layout = fwnp_netfilter::Layout::Gateway(fwnp_netfilter::GatewayLayout {
        protected: vec![prefix(topo.host().v4, 32), prefix(topo.host().v6, 128)],
        refuse: Refuse::Reject,
        ..fwnp_netfilter::GatewayLayout::default()
    });
    let _nf = open_and_apply(&topo.gateway, &layout, &[]);
    for host in [topo.host().v4, topo.host().v6] {
        assert!(
            !outside_tcp(&topo, host, 8080),
            "protected {host} open without a lease"
        );
    }
    // The host's other addresses are not protected.
    for host in [
        topo.host().v4_alt.expect("a second host address"),
        topo.host().v6_alt.expect("a second host address"),
    ] {
        assert!(outside_tcp(&topo, host, 8080), "unprotected {host} refused");
    }
    // The other direction, host -> outside, is not protected either.
    for to in [topo.outside_v4, topo.outside_v6] {
        assert!(
            tcp_connects(&topo.host().netns, SocketAddr::new(to, 8080), None, PROBE),
            "host -> {to} refused"
        );
    }
    // Nor is the gateway itself (input, not forward).
    for to in [topo.gateway_outside_v4, topo.gateway_outside_v6] {
        assert!(
            outside_tcp(&topo, to, 8080),
            "outside -> gateway {to} refused"
        );
    }
}

#[test]
fn inbound_interface_layout_guards_only_what_arrives_there() {
    if !require_root("inbound_interface_layout_guards_only_what_arrives_there") {
        return;
    }
    let topo = topology();
    let _host_server = TcpEchoServer::start(&topo.host().netns, 8080).expect("host server");
    let _outside_server = TcpEchoServer::start(&topo.outside, 8080).expect("outside server");
    let layout = gateway_layout_by_interface(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    assert!(!outside_tcp(&topo, topo.host().v4, 8080));
    assert!(!outside_tcp(&topo, topo.host().v6, 8080));
    for to in [topo.outside_v4, topo.outside_v6] {
        assert!(tcp_connects(
            &topo.host().netns,
            SocketAddr::new(to, 8080),
            None,
            PROBE
        ));
    }
    let results = nf
        .commit(
            &layout,
            &[Change::Add(
                tcp(topo.host().v6, 8080),
                Duration::from_secs(30),
            )],
        )
        .expect("commit");
    assert!(results[0].is_ok(), "{results:?}");
    assert!(outside_tcp(&topo, topo.host().v6, 8080));
    assert!(!outside_tcp(&topo, topo.host().v4, 8080));
}

#[test]
fn one_bad_element_fails_alone_and_the_others_land() {
    if !require_root("one_bad_element_fails_alone_and_the_others_land") {
        return;
    }
    let topo = topology();
    let _server =
        TcpEchoServer::start_ports(&topo.host().netns, &[7001, 7002, 7003, 7004]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    let existing = tcp(topo.host().v4, 7001);
    let results = nf
        .commit(
            &layout,
            &[Change::Add(existing.clone(), Duration::from_secs(30))],
        )
        .expect("commit");
    assert!(results[0].is_ok());
    let good_a = tcp(topo.host().v4, 7002);
    let good_b = tcp(topo.host().v6, 7003);
    let good_c = tcp_range(topo.host().v4, 7004, 7005);
    let never_added = tcp(topo.host().v4, 7999);
    let family_mismatch = tcp_from(topo.host().v6, 7004, prefix_str("192.0.2.0/24"));
    let ttl = Duration::from_secs(30);
    let changes = [
        Change::Add(good_a.clone(), ttl),
        Change::Add(existing.clone(), ttl),
        Change::Add(good_b.clone(), ttl),
        Change::Remove(never_added.clone()),
        Change::Add(family_mismatch.clone(), ttl),
        Change::Add(good_c.clone(), ttl),
        Change::Add(good_a.clone(), ttl),
    ];
    let results = nf.commit(&layout, &changes).expect("commit");
    assert_eq!(results.len(), changes.len());
    assert!(results[0].is_ok(), "good_a: {:?}", results[0]);
    assert!(
        matches!(&results[1], Err(Error::ElementExists(o)) if *o == existing),
        "existing: {:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "good_b: {:?}", results[2]);
    assert!(
        matches!(&results[3], Err(Error::ElementMissing(o)) if *o == never_added),
        "never added: {:?}",
        results[3]
    );
    assert!(
        matches!(&results[4], Err(Error::UnsupportedOpening(_))),
        "family mismatch: {:?}",
        results[4]
    );
    assert!(results[5].is_ok(), "good_c: {:?}", results[5]);
    // The same opening twice in one batch: the second add finds the first.
    assert!(
        matches!(&results[6], Err(Error::ElementExists(_))),
        "second add of good_a: {:?}",
        results[6]
    );
    let listed: BTreeSet<Element> = nf
        .elements(&layout)
        .expect("elements")
        .into_iter()
        .map(|(o, _)| o)
        .collect();
    let expected: BTreeSet<Element> = [existing, good_a, good_b, good_c].into_iter().collect();
    assert_eq!(listed, expected);
    for (host, port) in [
        (topo.host().v4, 7001),
        (topo.host().v4, 7002),
        (topo.host().v6, 7003),
        (topo.host().v4, 7004),
    ] {
        assert!(
            outside_tcp(&topo, host, port),
            "{host}:{port} lost with the bad element"
        );
    }
    // Removing twice: the second reports the element missing.
    let removes = [
        Change::Remove(tcp(topo.host().v4, 7002)),
        Change::Remove(tcp(topo.host().v4, 7002)),
    ];
    let results = nf.commit(&layout, &removes).expect("commit");
    assert!(results[0].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(Error::ElementMissing(_))),
        "{results:?}"
    );
    assert!(!outside_tcp(&topo, topo.host().v4, 7002));
}

#[test]
fn apply_twice_is_harmless_and_replaces_the_table() {
    if !require_root("apply_twice_is_harmless_and_replaces_the_table") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start_ports(&topo.host().netns, &[8080, 8081]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let elements = [
        (tcp(topo.host().v4, 8080), Duration::from_secs(60)),
        (tcp(topo.host().v6, 8080), Duration::from_secs(60)),
    ];
    let mut nf = open_and_apply(&topo.gateway, &layout, &elements);
    let before = nft_json(&topo.gateway);
    let rules_before = nft_objects(&before, "rule", "fwnp").len();
    let sets_before = nft_objects(&before, "set", "fwnp").len();
    assert!(rules_before > 0 && sets_before >= 2);
    nf.apply(&layout, &elements).expect("second apply");
    assert!(nf.table_present(&layout).expect("table_present"));
    let after = nft_json(&topo.gateway);
    assert_eq!(nft_objects(&after, "table", "fwnp").len(), 1);
    assert_eq!(nft_objects(&after, "rule", "fwnp").len(), rules_before);
    assert_eq!(nft_objects(&after, "set", "fwnp").len(), sets_before);
    let listed: BTreeSet<Element> = nf
        .elements(&layout)
        .expect("elements")
        .into_iter()
        .map(|(o, _)| o)
        .collect();
    assert_eq!(listed, elements.iter().map(|(o, _)| o.clone()).collect());
    assert!(outside_tcp(&topo, topo.host().v4, 8080));
    assert!(outside_tcp(&topo, topo.host().v6, 8080));
    assert!(!outside_tcp(&topo, topo.host().v4, 8081));
    // Applying with other elements replaces them: the table is the layout plus what is given.
    nf.apply(
        &layout,
        &[(tcp(topo.host().v4, 8081), Duration::from_secs(60))],
    )
    .expect("third apply");
    assert!(!outside_tcp(&topo, topo.host().v4, 8080));
    assert!(outside_tcp(&topo, topo.host().v4, 8081));
    // Someone else's table in the same namespace is left alone.
    topo.gateway
        .nft_script("table inet other {\n set s { type ipv4_addr; }\n}\n")
        .expect("nft");
    nf.apply(&layout, &[]).expect("fourth apply");
    nf.delete_table(&layout).expect("delete table");
    assert!(!nf.table_present(&layout).expect("table_present"));
    nf.delete_table(&layout)
        .expect("deleting a missing table is fine");
    let last = nft_json(&topo.gateway);
    assert_eq!(nft_objects(&last, "table", "other").len(), 1);
    assert!(
        outside_tcp(&topo, topo.host().v4, 8080),
        "no table: nothing is filtered"
    );
}

#[test]
fn elements_report_their_remaining_timeouts() {
    if !require_root("elements_report_their_remaining_timeouts") {
        return;
    }
    let topo = topology();
    let layout = gateway_layout(Refuse::Drop);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    let wanted = [
        (tcp(topo.host().v4, 80), Duration::from_secs(30)),
        (udp(topo.host().v6, 53), Duration::from_secs(10)),
        (
            tcp_range(topo.host().v4, 1000, 2000),
            Duration::from_secs(3600),
        ),
        (
            tcp_from(topo.host().v6, 443, prefix_str("fd00:1::/48")),
            Duration::from_secs(120),
        ),
    ];
    let changes: Vec<Change> = wanted
        .iter()
        .map(|(o, t)| Change::Add(o.clone(), *t))
        .collect();
    let results = nf.commit(&layout, &changes).expect("commit");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let sent = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let listed = nf.elements(&layout).expect("elements");
    assert_eq!(listed.len(), wanted.len(), "{listed:?}");
    for (opening, timeout) in &wanted {
        let (_, remaining) = listed
            .iter()
            .find(|(o, _)| o == opening)
            .unwrap_or_else(|| panic!("{opening:?} not listed in {listed:?}"));
        let upper = timeout.saturating_sub(Duration::from_millis(250));
        let lower = timeout.saturating_sub(sent.elapsed() + Duration::from_millis(200));
        assert!(
            *remaining <= upper && *remaining >= lower,
            "{opening:?}: remaining {remaining:?}, expected {lower:?}..={upper:?}"
        );
    }
    // nft agrees on what is there.
    assert_eq!(nft_set_len(&topo.gateway, "fwnp", "lease4"), 1);
    assert_eq!(nft_set_len(&topo.gateway, "fwnp", "lease6"), 1);
}

#[test]
fn reconcile_repairs_missing_and_extra_elements() {
    if !require_root("reconcile_repairs_missing_and_extra_elements") {
        return;
    }
    let topo = topology();
    let _server =
        TcpEchoServer::start_ports(&topo.host().netns, &[8001, 8002, 8003]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let keep = tcp(topo.host().v4, 8001);
    let lost = tcp(topo.host().v4, 8002);
    let desired = vec![
        (keep.clone(), Duration::from_secs(60)),
        (lost.clone(), Duration::from_secs(60)),
    ];
    let mut nf = open_shared_and_apply(&topo.gateway, &layout, &desired);
    assert!(outside_tcp(&topo, topo.host().v4, 8002));
    // Someone deletes one element and adds another behind our back.
    foreign_lease4(&topo.gateway, "delete", "198.51.100.2 . tcp . 8002");
    foreign_lease4(&topo.gateway, "add", "198.51.100.2 . tcp . 8003 timeout 1h");
    assert!(!outside_tcp(&topo, topo.host().v4, 8002));
    assert!(outside_tcp(&topo, topo.host().v4, 8003));
    let report = nf.reconcile(&layout, desired.clone()).expect("reconcile");
    assert!(!report.table_recreated);
    assert_eq!(report.added, vec![lost.clone()], "{report:?}");
    assert_eq!(
        report.removed,
        vec![tcp(topo.host().v4, 8003)],
        "{report:?}"
    );
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(outside_tcp(&topo, topo.host().v4, 8001));
    assert!(outside_tcp(&topo, topo.host().v4, 8002));
    assert!(!outside_tcp(&topo, topo.host().v4, 8003));
    // A second reconcile finds nothing to do.
    let again = nf
        .reconcile(&layout, desired.clone())
        .expect("reconcile again");
    assert!(
        again.added.is_empty() && again.removed.is_empty() && !again.table_recreated,
        "{again:?}"
    );
    // A deleted table is recreated with the desired elements.
    topo.gateway
        .exec_checked(&["nft", "delete", "table", "inet", "fwnp"])
        .expect("nft delete table");
    assert!(
        outside_tcp(&topo, topo.host().v4, 8003),
        "no table, nothing filtered"
    );
    let report = nf.reconcile(&layout, desired.clone()).expect("reconcile");
    assert!(report.table_recreated, "{report:?}");
    let added: BTreeSet<Element> = report.added.into_iter().collect();
    assert_eq!(added, [keep, lost].into_iter().collect());
    assert!(outside_tcp(&topo, topo.host().v4, 8002));
    assert!(!outside_tcp(&topo, topo.host().v4, 8003));
}

/// A deleted table with many desired elements is recreated empty and filled by one
/// replacement batch: every element is in force (an interval one too, and a repeated one with
/// its last timeout), counted but not listed, and nothing else passes.
#[test]
fn a_table_recreated_with_many_elements_holds_every_one() {
    if !require_root("a_table_recreated_with_many_elements_holds_every_one") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start_ports(&topo.host().netns, &[8001, 8002, 8003, 21_050])
        .expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let host = topo.host().v4;
    let lifetime = Duration::from_secs(600);
    let mut desired: Vec<(Element, Duration)> = (0..Netfilter::REPLACE_AT)
        .map(|i| {
            let port = 30_000 + u16::try_from(i).expect("port");
            (tcp(host, port), lifetime)
        })
        .collect();
    desired.push((tcp(host, 8001), Duration::from_secs(5)));
    desired.push((tcp(host, 8002), lifetime));
    desired.push((tcp_range(host, 21_000, 21_100), lifetime));
    // Repeated: the last timeout is the one kept.
    desired.push((tcp(host, 8001), lifetime));
    let mut nf = open_shared_and_apply(&topo.gateway, &layout, &[]);
    topo.gateway
        .exec_checked(&["nft", "delete", "table", "inet", "fwnp"])
        .expect("nft delete table");
    let report = topo
        .gateway
        .run(|| nf.reconcile(&layout, desired.clone()))
        .expect("reconcile");
    assert!(report.table_recreated, "{report:?}");
    assert!(report.replaced, "{report:?}");
    assert!(report.added.is_empty(), "{report:?}");
    assert_eq!(report.added_count, desired.len() - 1, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(
        nft_set_len(&topo.gateway, "fwnp", "lease4"),
        Netfilter::REPLACE_AT + 2
    );
    let listed = topo.gateway.run(|| nf.elements(&layout)).expect("elements");
    let remaining = |element: &Element| {
        listed
            .iter()
            .find(|(listed, _)| listed == element)
            .map(|(_, remaining)| *remaining)
    };
    let repeated = remaining(&tcp(host, 8001)).expect("the repeated element is held");
    assert!(repeated > Duration::from_secs(60), "{repeated:?}");
    assert!(remaining(&tcp_range(host, 21_000, 21_100)).is_some());
    for port in [8001, 8002, 21_050] {
        assert!(outside_tcp(&topo, host, port), "{port} refused");
    }
    assert!(!outside_tcp(&topo, host, 8003), "8003 was never desired");
}

#[test]
fn kill_connections_cuts_a_live_connection_of_a_removed_opening() {
    if !require_root("kill_connections_cuts_a_live_connection_of_a_removed_opening") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start(&topo.host().netns, 8080).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let opening = tcp(topo.host().v4, 8080);
    let mut nf = open_and_apply(
        &topo.gateway,
        &layout,
        &[(opening.clone(), Duration::from_secs(60))],
    );
    let to = SocketAddr::new(topo.host().v4, 8080);
    let mut stream: TcpStream = topo
        .outside
        .run(|| TcpStream::connect_timeout(&to, PROBE))
        .expect("connect");
    stream.set_read_timeout(Some(PROBE)).expect("timeout");
    let echo = |stream: &mut TcpStream| -> bool {
        let mut buf = [0u8; 4];
        stream.write_all(b"ping").is_ok() && stream.read_exact(&mut buf).is_ok() && &buf == b"ping"
    };
    assert!(echo(&mut stream));
    let results = nf
        .commit(&layout, &[Change::Remove(opening.clone())])
        .expect("commit");
    assert!(results[0].is_ok());
    // Established connections survive a removal by design...
    assert!(
        echo(&mut stream),
        "an established connection was cut by the removal alone"
    );
    // ...until their conntrack entries are ended.
    let ended = nf.kill_connections(&opening).expect("kill_connections");
    assert!(ended >= 1, "ended {ended}");
    assert!(
        !echo(&mut stream),
        "the connection survived kill_connections"
    );
    // Other connections of other openings are not touched: none exist, so nothing to end.
    assert_eq!(
        nf.kill_connections(&tcp(topo.host().v4, 9)).expect("kill"),
        0
    );
}

#[test]
fn netfilter_without_a_table_says_so() {
    if !require_root("netfilter_without_a_table_says_so") {
        return;
    }
    let topo = topology();
    let layout = gateway_layout(Refuse::Drop);
    topo.gateway.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        assert!(!nf.table_present(&layout).expect("table_present"));
        assert!(matches!(
            nf.elements(&layout),
            Err(Error::TableMissing { .. })
        ));
        let results = nf
            .commit(
                &layout,
                &[Change::Add(tcp(topo.host().v4, 80), Duration::from_secs(5))],
            )
            .expect("commit");
        assert!(
            matches!(results[0], Err(Error::TableMissing { .. })),
            "{results:?}"
        );
        let zero = nf
            .commit(
                &layout,
                &[Change::Add(tcp(topo.host().v4, 80), Duration::ZERO)],
            )
            .expect("commit");
        assert!(matches!(zero[0], Err(Error::InvalidTimeout(_))), "{zero:?}");
    });
}

#[test]
fn overlapping_port_ranges_are_refused_as_conflicts_and_the_first_keeps_working() {
    if !require_root("overlapping_port_ranges_are_refused_as_conflicts_and_the_first_keeps_working")
    {
        return;
    }
    let topo = topology();
    let _server =
        TcpEchoServer::start_ports(&topo.host().netns, &[8000, 8010, 8015]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let mut nf = open_and_apply(&topo.gateway, &layout, &[]);
    let ttl = Duration::from_secs(30);
    let first = tcp_range(topo.host().v4, 8000, 8010);
    let results = nf
        .commit(&layout, &[Change::Add(first.clone(), ttl)])
        .expect("commit");
    assert!(results[0].is_ok(), "{results:?}");
    let overlapping = tcp_range(topo.host().v4, 8005, 8020);
    let narrower_source = tcp_from(topo.host().v4, 8003, prefix_str("192.0.2.0/26"));
    let disjoint = tcp_range(topo.host().v4, 8011, 8020);
    let results = nf
        .commit(
            &layout,
            &[
                Change::Add(overlapping.clone(), ttl),
                Change::Add(narrower_source.clone(), ttl),
                Change::Add(disjoint.clone(), ttl),
            ],
        )
        .expect("commit");
    // The crate's documented contract: an overlap that is not the same element is a conflict,
    // not "exists" (a caller treats "exists" as already done, but this element is not there).
    assert!(
        matches!(&results[0], Err(Error::ElementConflicts(o)) if *o == overlapping),
        "overlapping range: {:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(Error::ElementConflicts(o)) if *o == narrower_source),
        "source-restricted port inside the range: {:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "disjoint range: {:?}", results[2]);
    let listed: BTreeSet<Element> = nf
        .elements(&layout)
        .expect("elements")
        .into_iter()
        .map(|(o, _)| o)
        .collect();
    assert_eq!(listed, [first, disjoint].into_iter().collect());
    for port in [8000, 8010, 8015] {
        assert!(outside_tcp(&topo, topo.host().v4, port), "{port} refused");
    }
}

#[test]
fn a_repair_lists_the_sets_however_many_elements_and_reports_what_differed() {
    if !require_root("a_repair_lists_the_sets_however_many_elements_and_reports_what_differed") {
        return;
    }
    let topo = topology();
    let layout = gateway_layout(Refuse::Drop);
    let desired: Vec<(Element, Duration)> = (0..Netfilter::REPLACE_AT)
        .map(|i| {
            let port = 10_000 + u16::try_from(i % 50_000).expect("port");
            (tcp(topo.host().v4, port), Duration::from_secs(120))
        })
        .collect();
    let mut nf = open_shared_and_apply(&topo.gateway, &layout, &desired);
    foreign_lease4(&topo.gateway, "add", "198.51.100.2 . tcp . 9 timeout 1h");
    let report = topo
        .gateway
        .run(|| nf.reconcile_listing(&layout, desired.clone()))
        .expect("reconcile_listing");
    assert!(!report.replaced, "{report:?}");
    assert!(report.added.is_empty(), "{report:?}");
    assert_eq!(report.removed, vec![tcp(topo.host().v4, 9)]);
    assert_eq!(report.refreshed, 0);
    assert_eq!(nft_set_len(&topo.gateway, "fwnp", "lease4"), desired.len());
}

/// An owned table's elements change only through its handle, so a repair of many elements
/// looks the desired ones up and puts right what they lack, without replacing the sets: an
/// element removed comes back, one whose time was cut short gets its time back, and the rest
/// are left as they are.
#[test]
fn a_repair_of_an_owned_table_looks_the_desired_elements_up() {
    if !require_root("a_repair_of_an_owned_table_looks_the_desired_elements_up") {
        return;
    }
    let topo = topology();
    let _server = TcpEchoServer::start_ports(&topo.host().netns, &[8120, 8121]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let host = topo.host().v4;
    let lifetime = Duration::from_secs(600);
    // Interval elements too (ports ranges, a source prefix), which the kernel holds apart.
    let kept_range = tcp_range(host, 20_000, 20_100);
    let taken_range = tcp_from(host, 21_000, prefix_str("203.0.113.0/24"));
    let mut desired = vec![
        (tcp(host, 8120), lifetime),
        (tcp(host, 8121), lifetime),
        (kept_range, lifetime),
        (taken_range.clone(), lifetime),
    ];
    desired.extend((0..Netfilter::REPLACE_AT).map(|i| {
        let port = 10_000 + u16::try_from(i % 50_000).expect("port");
        (tcp(topo.host().v6, port), lifetime)
    }));
    let mut nf = open_and_apply(&topo.gateway, &layout, &desired);
    let results = topo
        .gateway
        .run(|| {
            nf.commit(
                &layout,
                &[
                    Change::Remove(tcp(host, 8120)),
                    Change::Remove(taken_range.clone()),
                    Change::Renew(tcp(host, 8121), Duration::from_secs(5)),
                ],
            )
        })
        .expect("commit");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(!outside_tcp(&topo, host, 8120));
    let report = topo
        .gateway
        .run(|| nf.repair(&layout, desired.clone()))
        .expect("repair");
    assert!(!report.replaced, "{report:?}");
    assert!(!report.table_recreated, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.added, vec![tcp(host, 8120), taken_range]);
    assert_eq!(report.refreshed, 1, "{report:?}");
    assert!(outside_tcp(&topo, host, 8120));
    let listed = topo.gateway.run(|| nf.elements(&layout)).expect("elements");
    assert_eq!(listed.len(), desired.len());
    let renewed = listed
        .iter()
        .find(|(o, _)| *o == tcp(host, 8121))
        .map(|(_, remaining)| *remaining);
    assert!(
        renewed.is_some_and(|r| r > Duration::from_secs(500)),
        "{renewed:?}"
    );
}

/// A repair of a large shared table whose replacement the kernel refuses does not list the
/// sets either: two desired port ranges that overlap abort the whole replacement, the changes
/// that follow give the second its own error, and the replacement without it removes what
/// someone else added.
#[test]
fn a_refused_replacement_is_tried_again_without_the_elements_the_kernel_refuses() {
    if !require_root("a_refused_replacement_is_tried_again_without_the_elements_the_kernel_refuses")
    {
        return;
    }
    let topo = topology();
    let _server =
        TcpEchoServer::start_ports(&topo.host().netns, &[8140, 8141, 20_050]).expect("server");
    let layout = gateway_layout(Refuse::Reject);
    let host = topo.host().v4;
    let lifetime = Duration::from_secs(600);
    let range = tcp_range(host, 20_000, 20_100);
    let overlapping = tcp_range(host, 20_050, 20_150);
    let mut desired = vec![
        (tcp(host, 8140), lifetime),
        (range.clone(), lifetime),
        (overlapping.clone(), lifetime),
    ];
    desired.extend((0..Netfilter::REPLACE_AT).map(|i| {
        let port = 10_000 + u16::try_from(i % 50_000).expect("port");
        (tcp(topo.host().v6, port), lifetime)
    }));
    let held: Vec<(Element, Duration)> = desired
        .iter()
        .filter(|(o, _)| *o != overlapping)
        .cloned()
        .collect();
    let mut nf = open_shared_and_apply(&topo.gateway, &layout, &held);
    // Someone else removes a lease and adds an element of their own.
    foreign_lease4(&topo.gateway, "delete", &format!("{host} . tcp . 8140"));
    foreign_lease4(
        &topo.gateway,
        "add",
        &format!("{host} . tcp . 8141 timeout 1h"),
    );
    assert!(outside_tcp(&topo, host, 8141));
    let report = topo
        .gateway
        .run(|| nf.repair(&layout, desired.clone()))
        .expect("repair");
    assert!(report.replaced, "{report:?}");
    assert!(!report.undesired_may_remain, "{report:?}");
    assert_eq!(report.added, vec![tcp(host, 8140)]);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(
        matches!(&report.failed[0], (o, Error::ElementConflicts(_)) if *o == overlapping),
        "{report:?}"
    );
    assert!(outside_tcp(&topo, host, 8140), "the lease is not back");
    assert!(outside_tcp(&topo, host, 20_050), "the range is gone");
    assert!(
        !outside_tcp(&topo, host, 8141),
        "the foreign element outlived the repair"
    );
    let listed = topo.gateway.run(|| nf.elements(&layout)).expect("elements");
    assert_eq!(listed.len(), held.len());
}
