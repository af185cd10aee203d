//! The etcd cluster of the testkit: its members answer from the cluster's own namespace and,
//! through the link `connect` makes, from another namespace, until that link goes down.

use std::time::Duration;

use fwnp_testkit::etcd::{EtcdCluster, LINK_IF, available};
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
    let mut cluster = EtcdCluster::start("tkit");
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
