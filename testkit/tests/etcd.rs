//! The etcd cluster of the testkit: its members answer from the cluster's own namespace and,
//! through the link `connect` makes, from another namespace, until that link goes down; a
//! cluster that does not come up is an error naming why, with the members' logs, not a panic;
//! a one-member cluster leads alone and is reached the same ways.

use std::time::Duration;

use fwnp_testkit::etcd::{
    EtcdCluster, EtcdClusterError, EtcdOptions, LINK_IF, MemberTls, available,
};
use fwnp_testkit::netns::Netns;

fn healthy(ns: &Netns, endpoints: &[String]) -> bool {
    let endpoints = endpoints.join(",");
    ns.exec(&[
        "etcdctl",
        "--endpoints",
        &endpoints,
        "--command-timeout",
        "1s",
        "--dial-timeout",
        "1s",
        "endpoint",
        "health",
    ])
    .is_ok_and(|o| o.status.success())
}

#[test]
fn another_namespace_reaches_the_members_through_its_link() {
    if !available("another_namespace_reaches_the_members_through_its_link") {
        return;
    }
    let mut cluster = EtcdCluster::start("tkit").unwrap_or_else(|e| panic!("{e}"));
    let gateway = Netns::new("tkgw").expect("namespace");
    let endpoints = cluster.connect(&gateway).expect("link");
    assert_eq!(endpoints.len(), 3);
    assert!(
        endpoints[0].starts_with("http://203.0.113.1:"),
        "{endpoints:?}"
    );
    // The cluster's own loopback URLs mean nothing in the other namespace.
    assert!(!healthy(&gateway, &cluster.endpoints()));
    assert!(
        healthy(&gateway, &endpoints),
        "members unreachable over the link"
    );

    // A second namespace gets a link (and addresses) of its own.
    let other = Netns::new("tkgw").expect("namespace");
    let second = cluster.connect(&other).expect("second link");
    assert!(second[0].starts_with("http://203.0.113.5:"), "{second:?}");
    assert!(healthy(&other, &second));

    gateway
        .ip(&["link", "set", LINK_IF, "down"])
        .expect("link down");
    assert!(
        !healthy(&gateway, &endpoints),
        "reachable with its link down"
    );
    assert!(healthy(&other, &second));
    assert!(cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(5)));
}

#[test]
fn a_single_member_cluster_leads_alone_and_is_reached_through_a_link() {
    if !available("a_single_member_cluster_leads_alone_and_is_reached_through_a_link") {
        return;
    }
    let mut cluster = EtcdCluster::single("tkone").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cluster.endpoints().len(), 1, "{:?}", cluster.endpoints());
    assert!(cluster.wait_healthy(&[0], Duration::from_secs(5)));
    // No second member was started: its ports answer nothing.
    assert!(!healthy(
        cluster.netns(),
        &["http://127.0.0.1:22379".to_owned()]
    ));
    let gateway = Netns::new("tkone").expect("namespace");
    let endpoints = cluster.connect(&gateway).expect("link");
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert!(
        healthy(&gateway, &endpoints),
        "the member unreachable over the link"
    );
}

#[test]
fn a_cluster_without_a_leader_in_time_is_an_error_with_the_logs() {
    if !available("a_cluster_without_a_leader_in_time_is_an_error_with_the_logs") {
        return;
    }
    // No time to wait: whether a leader was quick or not, none was seen in time.
    let options = EtcdOptions {
        leader_wait: Duration::ZERO,
        ..EtcdOptions::default()
    };
    let error = EtcdCluster::start_with("tknol", options).expect_err("no leader at once");
    let EtcdClusterError::NoLeader { waited, logs } = &error else {
        panic!("{error}");
    };
    assert_eq!(*waited, Duration::ZERO);
    for member in 0..3 {
        assert!(logs.contains(&format!("member {member} (")), "{logs}");
    }
    assert!(
        error
            .to_string()
            .starts_with("the etcd cluster has no leader"),
        "{error}"
    );
}

#[test]
fn a_member_that_exits_at_start_is_an_error_at_once() {
    if !available("a_member_that_exits_at_start_is_an_error_at_once") {
        return;
    }
    // Certificate files that do not exist: every member exits at start.
    let missing = std::path::PathBuf::from("/nonexistent/fwnp-testkit");
    let options = EtcdOptions {
        tls: Some(MemberTls {
            ca: missing.join("ca.pem"),
            cert: missing.join("member.pem"),
            key: missing.join("member.key"),
            client_cert: missing.join("client.pem"),
            client_key: missing.join("client.key"),
        }),
        ..EtcdOptions::default()
    };
    let started = std::time::Instant::now();
    let error = EtcdCluster::start_with("tkexit", options).expect_err("the members exit");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "said at once, not after the leader wait: {:?}",
        started.elapsed()
    );
    let EtcdClusterError::Exited { status, logs, .. } = &error else {
        panic!("{error}");
    };
    assert!(!status.success(), "{error}");
    assert!(logs.contains("/nonexistent/fwnp-testkit"), "{logs}");
}
