//! Two gateways on one real etcd cluster, each with its own kernel filter in its
//! own network namespace (a [`Topology`] each: the gateway's router namespace guards a host
//! namespace at 198.51.100.2, and an outside namespace connects to it through the filter), both
//! following the cluster's leases: a lease granted through one is enforced by the other's
//! kernel (real TCP connections through it), renewed and released through the other, ended in
//! both kernels; an expiry happens once across them, and a renewal through one racing the
//! other's expiry timer ends the same way on both; a revocation through one reaches the host
//! connected to the other as the Revoked notice; with the quorum lost the openings stay until
//! their own timeouts and close then, and with it back every kernel is reconciled; a gateway
//! cut off from etcd, whether its connections end or go silent for good, keeps its openings,
//! connects anew when the network is back and reconciles its book and kernel; a release
//! etcd took without answering is refused to the host, carried out by both gateways and
//! audited once; an operator's revoke without the quorum is refused and changes no book or kernel; a policy
//! reload through one gateway closes what it disallows in both kernels, each lease ended and
//! audited once, with no gateway warning of a refused write; so does a CRL reloaded on both
//! gateways at once. The cluster's state lost under them (the prefix deleted, etcd started
//! again empty or put back from a snapshot at the same address): both take one new epoch, tell
//! the host with EpochChanged, close the openings of the leases the state lost and keep the
//! others, and the host's Opens again pass; no member or quorum lost changes the epoch.
//!
//! The gateways and the host's QUIC connections run in the cluster's namespace (where etcd's
//! members listen on 127.0.0.1); each gateway's netlink socket is opened in its own router
//! namespace, which is where its filter acts.
//!
//! Needs root and etcd; skipped otherwise, a failure under `FWNP_REQUIRE_NETNS=1`.

mod common;
mod etcd_cluster;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Pki, config_text, denied, granted, tcp, temp_dir, write_policy};
use etcd_cluster::{
    Cut, EtcdCluster, Link, available, in_cluster, published_policy, two_workers as runtime,
};
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::Service;
use fwnp_gateway::store::{AuditKind, AuditQuery, Outcome, now_ms};
use fwnp_netfilter::{Batcher, BatcherConfig, Netfilter};
use fwnp_proto::{LeaseId, Message, ResultCode, RevokeReason};
use fwnp_testkit::netns::{self as lab, TcpEchoServer, Topology};
use fwnp_trust::tls::ServerOptions;

const POLICY: &str = r#"
[defaults]
lifetime = "60s"
min_lifetime = "1s"
max_lifetime = "1h"
max_leases = 16

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

const FILTER: &str = "[filter]\nenabled = true\ntable = \"fwnp\"\nprotected = [\"198.51.100.0/24\"]\nrefuse = \"drop\"";

/// Below TCP's first SYN retransmission: a connection made within it was let through at once.
const FIRST_SYN: Duration = Duration::from_millis(800);

/// How long a change may take to reach the other gateway's kernel.
const PROPAGATION: Duration = Duration::from_secs(5);

const PORTS: [u16; 6] = [7001, 7002, 7003, 7004, 7005, 7006];

/// A gateway on the cluster, served on 127.0.0.1 of the cluster's namespace, its filter in
/// `topology`'s router namespace.
struct Gateway {
    service: Arc<Service>,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    topology: Topology,
    _echo: TcpEchoServer,
}

impl Gateway {
    async fn start(cluster: &EtcdCluster, pki: &Pki, dir: &Path, site: &str) -> Gateway {
        Self::start_on(&cluster.endpoints(), pki, dir, site).await
    }

    /// A gateway whose etcd client reaches the members at `endpoints`.
    async fn start_on(endpoints: &[String], pki: &Pki, dir: &Path, site: &str) -> Gateway {
        let topology = Topology::new().expect("build the namespaces");
        let echo = TcpEchoServer::start_ports(&topology.host().netns, &PORTS).expect("echo");
        write_policy(&dir.join("policy.toml"), POLICY);
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let text = format!(
            "{}\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/fwnp-test\"\n\
             site = \"{site}\"\ntimeout = \"1s\"\n",
            config_text(pki, dir, "127.0.0.1:0", FILTER),
            endpoints.join(", ")
        );
        let config = GatewayConfig::parse(&text, "etcd-watch.toml").expect("valid config");
        let layout = fwnp_gateway::daemon::layout(&config);
        let filter = topology.gateway.run(|| {
            let mut netfilter = Netfilter::open().expect("netlink in the router namespace");
            netfilter.apply(&layout, &[]).expect("table");
            Batcher::start(netfilter, layout, BatcherConfig::default()).expect("batcher")
        });
        let service = Service::start(config, Some(filter))
            .await
            .expect("service starts");
        let (endpoint, addr, serving) =
            common::serve_on_loopback(pki, &service, &ServerOptions::default());
        let tasks = vec![serving, tokio::spawn(service.clone().run_expiry())];
        Gateway {
            service,
            addr,
            endpoint,
            tasks,
            topology,
            _echo: echo,
        }
    }

    /// Whether the outside reaches the host's `port` through this gateway's filter.
    fn passes(&self, port: u16) -> bool {
        let to = SocketAddr::new(self.topology.host().v4, port);
        tokio::task::block_in_place(|| {
            lab::tcp_connects(&self.topology.outside, to, None, FIRST_SYN)
        })
    }

    /// Whether this gateway's kernel holds an element for the host's TCP `port`.
    fn kernel_has(&self, port: u16) -> bool {
        common::kernel::router_holds(&self.topology, port)
    }

    /// Waits until the kernel holds (or no longer holds) `port` and the outside's connection
    /// agrees, at most `limit`.
    async fn wait_open(&self, port: u16, open: bool, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.kernel_has(port) == open && self.passes(port) == open {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many reconciliations with the cluster this gateway's trail records.
    fn reconciliations(&self) -> usize {
        let query = AuditQuery {
            kinds: vec![AuditKind::Reconcile],
            limit: 10_000,
            ..AuditQuery::default()
        };
        self.service
            .store()
            .audit(&query)
            .expect("audit query")
            .events
            .iter()
            .filter(|e| {
                e.event
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("cluster listed again"))
            })
            .count()
    }

    /// The audit records of `lease` with `outcome` in this gateway's own trail.
    fn audited(&self, lease: LeaseId, outcome: Outcome) -> usize {
        let query = AuditQuery {
            lease: Some(lease),
            outcomes: vec![outcome],
            limit: 100,
            ..AuditQuery::default()
        };
        self.service
            .store()
            .audit(&query)
            .expect("audit query")
            .events
            .len()
    }

    fn stop(self) {
        self.endpoint.close(0u32.into(), b"done");
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Members lost, a quorum lost, a gateway cut off: none of it is the cluster's state lost,
/// and no gateway took a new epoch for it.
fn assert_no_epoch_change(gateways: &[&Gateway]) {
    for gateway in gateways {
        assert_eq!(gateway.service.metrics.epoch_changes.get(), 0);
        assert!(epoch_changes_audited(gateway).is_empty());
    }
}

/// The host's addresses as its certificate names them: the same in both topologies.
fn host_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))
}

/// The host web-01 of `pki`, connected to gateway `a` and to gateway `b`, and welcomed by each.
async fn connected_to_both(pki: &Pki, a: &Gateway, b: &Gateway) -> (Client, Client) {
    let files = pki.host("web-01", &[host_ip()], &[], &[]);
    let to_a = Client::connect(a.addr, &files).await;
    to_a.hello().await;
    let to_b = Client::connect(b.addr, &files).await;
    to_b.hello().await;
    (to_a, to_b)
}

/// Polls `check` every 100 ms until it holds, at most `limit`.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn every_gateway_enforces_renews_releases_expires_and_revokes_the_leases_of_the_other() {
    in_cluster(
        "every_gateway_enforces_renews_releases_expires_and_revokes_the_leases_of_the_other",
        "watch",
        runtime,
        async |cluster| {
            let pki = Pki::new("etcd-watch");
            let (dir_a, dir_b) = (temp_dir("watch-a"), temp_dir("watch-b"));
            let a = Gateway::start(cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            let (to_a, to_b) = connected_to_both(&pki, &a, &b).await;
            assert!(!b.passes(7001), "closed before any lease");

            // Granted through A: B's kernel lets the outside in too.
            let first = granted(to_a.open(tcp(7001), Some(60)).await).lease;
            assert!(a.passes(7001), "granted means in A's kernel");
            assert!(
                b.wait_open(7001, true, PROPAGATION).await,
                "a lease granted through A is enforced by B's kernel"
            );
            assert!(!b.passes(7002), "and nothing else");

            // Renewed through B, which never granted it; A takes the new expiry.
            let renewed = to_b.renew(first, Some(600)).await;
            assert!(matches!(renewed, Message::Granted(_)), "{renewed:?}");
            let deadline = Instant::now() + PROPAGATION;
            loop {
                let lifetime = to_a
                    .list()
                    .await
                    .leases
                    .iter()
                    .find(|l| l.lease == first)
                    .map(|l| l.remaining);
                if lifetime.is_some_and(|secs| secs > 60) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "A's book did not take the renewal made through B: {lifetime:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            // Released through B: gone from both kernels.
            let released = to_b.release(first).await;
            assert!(matches!(released, Message::Released(_)), "{released:?}");
            assert!(b.wait_open(7001, false, PROPAGATION).await, "B closed it");
            assert!(
                a.wait_open(7001, false, PROPAGATION).await,
                "a release through B closes A's kernel too"
            );
            assert!(to_a.list().await.leases.is_empty(), "A's book let it go");

            // Revoked through B: the host, connected to A, gets the notice from A.
            let second = granted(to_a.open(tcp(7002), Some(60)).await).lease;
            assert!(b.wait_open(7002, true, PROPAGATION).await);
            assert!(
                b.service
                    .revoke(
                        &second,
                        RevokeReason::Operator,
                        "operator",
                        Some("test revocation".into())
                    )
                    .await
                    .is_some(),
                "B's book holds the lease A granted"
            );
            let deadline = Instant::now() + PROPAGATION;
            let notice = loop {
                match to_a.next_notice(PROPAGATION).await {
                    Some(Message::Revoked(revoked)) if revoked.lease == second => break revoked,
                    Some(_) if Instant::now() < deadline => continue,
                    other => panic!("no Revoked notice through A: {other:?}"),
                }
            };
            assert_eq!(notice.reason, RevokeReason::Operator);
            assert!(a.wait_open(7002, false, PROPAGATION).await, "A closed it");
            assert!(b.wait_open(7002, false, PROPAGATION).await, "B closed it");

            // A lease of 2 s renewed through B before its end is not expired by A.
            let third = granted(to_a.open(tcp(7003), Some(2)).await).lease;
            // B answers for the lease once its watch brought it (it is then in B's kernel).
            assert!(b.wait_open(7003, true, PROPAGATION).await, "B learnt of it");
            assert!(matches!(
                to_b.renew(third, Some(60)).await,
                Message::Granted(_)
            ));
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(a.passes(7003), "A kept the lease renewed through B");
            assert!(b.passes(7003), "so did B");
            assert_eq!(a.audited(third, Outcome::Expired), 0);
            assert_eq!(b.audited(third, Outcome::Expired), 0);

            // A lease of 2 s left to run out: closed in both kernels, audited once.
            let fourth = granted(to_a.open(tcp(7004), Some(2)).await).lease;
            assert!(b.wait_open(7004, true, PROPAGATION).await);
            assert!(a.wait_open(7004, false, Duration::from_secs(5)).await);
            assert!(b.wait_open(7004, false, Duration::from_secs(5)).await);
            let both = || a.audited(fourth, Outcome::Expired) + b.audited(fourth, Outcome::Expired);
            assert!(
                eventually(PROPAGATION, || both() >= 1).await,
                "the expiry is audited"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(both(), 1, "the expiry is audited once across the gateways");
            let listed: HashMap<LeaseId, u32> = to_b
                .list()
                .await
                .leases
                .iter()
                .map(|l| (l.lease, l.remaining))
                .collect();
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert!(listed.contains_key(&third));

            // The operator's listing through either gateway shows the cluster's leases, those
            // granted through the other one included, with its filters applied.
            let fifth = granted(to_b.open(tcp(7005), Some(60)).await).lease;
            for gateway in [&a, &b] {
                let all = gateway
                    .service
                    .leases(&HashMap::new())
                    .await
                    .expect("leases");
                let mut ids: Vec<String> = all.leases.iter().map(|l| l.id.clone()).collect();
                ids.sort();
                let mut expected = vec![third.to_string(), fifth.to_string()];
                expected.sort();
                assert_eq!(ids, expected);
                let on_port = gateway
                    .service
                    .leases(&HashMap::from([("port".to_owned(), "7005".to_owned())]))
                    .await
                    .expect("leases");
                let ids: Vec<String> = on_port.leases.iter().map(|l| l.id.clone()).collect();
                assert_eq!(ids, vec![fifth.to_string()]);
            }

            // Both gateways have followed the cluster up to the same revision.
            let (ra, rb) = (
                a.service.cluster().expect("etcd").applied_revision(),
                b.service.cluster().expect("etcd").applied_revision(),
            );
            assert!(
                eventually(PROPAGATION, || {
                    a.service.cluster().expect("etcd").applied_revision()
                        == b.service.cluster().expect("etcd").applied_revision()
                })
                .await,
                "{ra} and {rb}"
            );
            assert!(ra > 0);
            drop((to_a, to_b));
            assert_no_epoch_change(&[&a, &b]);
            a.stop();
            b.stop();
        },
    );
}

#[test]
fn without_quorum_openings_close_at_their_end_and_with_it_back_every_kernel_is_reconciled() {
    const TEST: &str =
        "without_quorum_openings_close_at_their_end_and_with_it_back_every_kernel_is_reconciled";
    if !available(TEST) {
        return;
    }
    let mut cluster = EtcdCluster::start("wquor").unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new("etcd-wquor");
    let (dir_a, dir_b) = (temp_dir("wquor-a"), temp_dir("wquor-b"));
    let files = pki.host("web-01", &[host_ip()], &[], &[]);
    // Sockets are made inside the cluster's namespace (the runtime's threads start there too);
    // members are killed and started between the steps.
    let (rt, a, b, to_a, to_b) = cluster.run(|| {
        let rt = runtime();
        let (a, b, to_a, to_b) = rt.block_on(async {
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(&cluster, &pki, dir_b.path(), "gw-b").await;
            let to_a = Client::connect(a.addr, &files).await;
            to_a.hello().await;
            let to_b = Client::connect(b.addr, &files).await;
            to_b.hello().await;
            (a, b, to_a, to_b)
        });
        (rt, a, b, to_a, to_b)
    });

    cluster.kill(0);
    // If the killed member led, the two left elect a new leader first, which on a loaded
    // machine can outlast the store's timeout: the grants below are asked once they have one.
    assert!(
        cluster.wait_healthy(&[1, 2], Duration::from_secs(30)),
        "the two members left elect a leader"
    );
    let (long, short) = cluster.run(|| {
        rt.block_on(async {
            // One member down: grants go on, and both kernels enforce them.
            let long = granted(to_a.open(tcp(7001), Some(600)).await).lease;
            assert!(b.wait_open(7001, true, PROPAGATION).await);
            let short = granted(to_b.open(tcp(7002), Some(8)).await);
            assert!(a.wait_open(7002, true, PROPAGATION).await);
            (long, short)
        })
    });

    cluster.kill(1);
    cluster.run(|| {
        rt.block_on(async {
            let started = Instant::now();
            let refused = denied(to_a.open(tcp(7003), None).await);
            let took = started.elapsed();
            assert_eq!(refused.code, ResultCode::NoResources, "{refused:?}");
            assert_eq!(refused.retry_after, Some(5), "{refused:?}");
            assert!(took < Duration::from_secs(3), "answered after {took:?}");
            // The openings stay, each until its own end.
            assert!(
                a.passes(7001) && b.passes(7001),
                "the quorum lost closes nothing"
            );
            assert!(
                now_ms() + 1_000 < short.expires_ms,
                "too slow to see the short lease before its end"
            );
            assert!(a.passes(7002) && b.passes(7002), "not closed at once");
            let end = short.expires_ms;
            tokio::time::sleep(Duration::from_millis(
                (end + 1_000).saturating_sub(now_ms()),
            ))
            .await;
            assert!(!a.passes(7002), "A closed it at the lease's end");
            assert!(!b.passes(7002), "B closed it at the lease's end");
            assert!(!a.kernel_has(7002) && !b.kernel_has(7002));
            assert!(a.passes(7001) && b.passes(7001), "the long lease stays");
        })
    });

    cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
    cluster.restart(1).unwrap_or_else(|e| panic!("{e}"));
    assert!(cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30)));
    cluster.run(|| {
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(15);
            let third = loop {
                match to_b.open(tcp(7003), Some(600)).await {
                    Message::Granted(granted) => break granted.lease,
                    other => assert!(
                        Instant::now() < deadline,
                        "no grant with the quorum back: {other:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert!(
                a.wait_open(7003, true, Duration::from_secs(15)).await,
                "A's kernel follows the cluster again"
            );
            // The end the gateways could not store without the quorum is stored now, once.
            let both = || {
                a.audited(short.lease, Outcome::Expired) + b.audited(short.lease, Outcome::Expired)
            };
            assert!(
                eventually(Duration::from_secs(15), || both() >= 1).await,
                "the expiry is stored and audited with the quorum back"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(both(), 1, "audited once across the gateways");
            for (name, client) in [("A", &to_a), ("B", &to_b)] {
                let mut listed: Vec<LeaseId> =
                    client.list().await.leases.iter().map(|l| l.lease).collect();
                listed.sort();
                let mut expected = vec![long, third];
                expected.sort();
                assert_eq!(listed, expected, "{name}'s book");
            }
            assert!(!a.passes(7002) && !b.passes(7002));
            // Every end stored, each gateway follows the cluster by its watch again, and lists
            // it no more.
            let counted = |g: &Gateway| g.service.metrics.cluster_lists.get();
            let listed = (a.reconciliations(), b.reconciliations());
            let lists = (counted(&a), counted(&b));
            assert!(
                lists.0 > 0 && lists.1 > 0,
                "the lists are counted: {lists:?}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(
                (
                    a.reconciliations(),
                    b.reconciliations(),
                    counted(&a),
                    counted(&b)
                ),
                (listed.0, listed.1, lists.0, lists.1),
                "the gateways still list the cluster again and again"
            );
        })
    });
    drop((to_a, to_b));
    assert_no_epoch_change(&[&a, &b]);
    a.stop();
    b.stop();
    drop(rt);
}

#[test]
fn a_gateway_cut_off_from_etcd_keeps_its_openings_and_reconciles_when_it_is_back() {
    cut_off_and_back(
        "a_gateway_cut_off_from_etcd_keeps_its_openings_and_reconciles_when_it_is_back",
        "wpart",
        Cut::Closed,
    );
}

/// A release whose commit got no answer, though etcd took it: the host is refused, B carries
/// the end out at once, and once etcd answers A again, A finds its end taken: it drops the
/// lease from its book and kernel, and records the release, once.
#[test]
fn a_release_etcd_took_unanswered_is_carried_out_and_audited_once_etcd_answers_again() {
    in_cluster(
        "a_release_etcd_took_unanswered_is_carried_out_and_audited_once_etcd_answers_again",
        "wdeaf",
        runtime,
        async |cluster| {
            let pki = Pki::new("etcd-wdeaf");
            let (dir_a, dir_b) = (temp_dir("wdeaf-a"), temp_dir("wdeaf-b"));
            let link = Link::start(&cluster.endpoints()).await;
            let a = Gateway::start_on(&link.endpoints, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            let (to_a, _to_b) = connected_to_both(&pki, &a, &b).await;
            let lease = granted(to_a.open(tcp(7001), Some(600)).await).lease;
            assert!(b.wait_open(7001, true, PROPAGATION).await);
            // An end before the cut, so that A holds the etcd lease its tombstones are put
            // with: its grant would go unanswered too, and the release would not be sent.
            let before = granted(to_a.open(tcp(7002), Some(600)).await).lease;
            let released = to_a.release(before).await;
            assert!(matches!(released, Message::Released(_)), "{released:?}");

            link.set_cut(Cut::Deaf);
            let refused = denied(to_a.release(lease).await);
            assert_eq!(refused.code, ResultCode::NoResources, "{refused:?}");
            assert!(
                b.wait_open(7001, false, PROPAGATION).await,
                "etcd took the release: B carries it out"
            );

            link.set_cut(Cut::No);
            assert!(
                a.wait_open(7001, false, Duration::from_secs(20)).await,
                "A carries it out once etcd answers"
            );
            let released =
                || a.audited(lease, Outcome::Released) + b.audited(lease, Outcome::Released);
            assert!(
                eventually(Duration::from_secs(15), || released() >= 1).await,
                "the release is recorded"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(
                a.audited(lease, Outcome::Released),
                1,
                "by A, which made it"
            );
            assert_eq!(released(), 1, "once");
            assert!(to_a.list().await.leases.is_empty(), "A's book");
            drop(to_a);
            a.stop();
            b.stop();
        },
    );
}

/// Cut off by a network that drops everything and tells nothing: no connection of A's ends,
/// and none that lived through the cut ever answers again. A must find out by itself (its
/// HTTP/2 keep-alive, its watch's silence), connect anew once the network is back, and list
/// the cluster again, as after a cut it is told of.
#[test]
fn a_gateway_silently_cut_off_from_etcd_connects_anew_and_reconciles_when_the_network_is_back() {
    cut_off_and_back(
        "a_gateway_silently_cut_off_from_etcd_connects_anew_and_reconciles_when_the_network_is_back",
        "wsil",
        Cut::Silent,
    );
}

/// Gateway A cut off from etcd by `cut` while B goes on: A keeps its openings and grants
/// nothing; once the network is back, it drops the lease B released meanwhile, enforces the one
/// B granted, grants again and follows the cluster again.
fn cut_off_and_back(test: &str, short: &str, cut: Cut) {
    in_cluster(test, short, runtime, async |cluster| {
        let pki = Pki::new(&format!("etcd-{short}"));
        let (dir_a, dir_b) = (
            temp_dir(&format!("{short}-a")),
            temp_dir(&format!("{short}-b")),
        );
        let link = Link::start(&cluster.endpoints()).await;
        let a = Gateway::start_on(&link.endpoints, &pki, dir_a.path(), "gw-a").await;
        let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
        let (to_a, to_b) = connected_to_both(&pki, &a, &b).await;
        let kept = granted(to_b.open(tcp(7001), Some(600)).await).lease;
        let gone = granted(to_b.open(tcp(7002), Some(600)).await).lease;
        assert!(a.wait_open(7001, true, PROPAGATION).await);
        assert!(a.wait_open(7002, true, PROPAGATION).await);
        let before = a.reconciliations();

        link.set_cut(cut);
        // Cut off, A grants nothing, within its timeout however it is cut, and keeps what its
        // kernel holds.
        let asked = Instant::now();
        let refused = denied(to_a.open(tcp(7004), None).await);
        assert_eq!(refused.code, ResultCode::NoResources, "{refused:?}");
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{:?}",
            asked.elapsed()
        );
        // Meanwhile, through B: one lease released, one granted.
        let released = to_b.release(gone).await;
        assert!(matches!(released, Message::Released(_)), "{released:?}");
        let new = granted(to_b.open(tcp(7003), Some(600)).await).lease;
        assert!(b.wait_open(7002, false, PROPAGATION).await);
        assert!(b.wait_open(7003, true, PROPAGATION).await);
        // Long enough for every connection of a silent cut to be found dead and tried again
        // (into the same silence).
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            a.passes(7001) && a.passes(7002),
            "a gateway cut off from etcd drops none of its openings"
        );
        assert!(!a.passes(7003), "nor learns of new ones");

        link.set_cut(Cut::No);
        assert!(
            a.wait_open(7002, false, Duration::from_secs(20)).await,
            "the lease released meanwhile is gone from A's kernel"
        );
        assert!(
            a.wait_open(7003, true, PROPAGATION).await,
            "the lease granted meanwhile is in A's kernel"
        );
        assert!(a.passes(7001), "the lease that lived on stays");
        assert!(
            a.reconciliations() > before,
            "A's trail records the reconcile"
        );
        let mut listed: Vec<LeaseId> = to_a.list().await.leases.iter().map(|l| l.lease).collect();
        listed.sort();
        let mut expected = vec![kept, new];
        expected.sort();
        assert_eq!(listed, expected, "A's book");
        // A grants again, and its watch follows the cluster again: what A grants reaches B,
        // and what B grants reaches A.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match to_a.open(tcp(7004), Some(600)).await {
                Message::Granted(_) => break,
                other => assert!(Instant::now() < deadline, "A grants nothing: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(b.wait_open(7004, true, PROPAGATION).await);
        granted(to_b.open(tcp(7005), Some(600)).await);
        assert!(
            a.wait_open(7005, true, PROPAGATION).await,
            "A's watch follows the cluster again"
        );
        drop((to_a, to_b));
        assert_no_epoch_change(&[&a, &b]);
        a.stop();
        b.stop();
        drop(link);
    });
}

#[test]
fn renewals_racing_the_other_gateways_expiry_end_in_one_answer_on_both_gateways() {
    const TEST: &str =
        "renewals_racing_the_other_gateways_expiry_end_in_one_answer_on_both_gateways";
    if !available(TEST) {
        return;
    }
    const LEASES: u16 = 12;
    let cluster = EtcdCluster::single("wrace").unwrap_or_else(|e| panic!("{e}"));
    cluster.run(|| {
        runtime().block_on(async {
            let pki = Pki::new("etcd-wrace");
            let (dir_a, dir_b) = (temp_dir("wrace-a"), temp_dir("wrace-b"));
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(&cluster, &pki, dir_b.path(), "gw-b").await;
            let files = pki.host("web-01", &[host_ip()], &[], &[]);
            let to_a = Client::connect(a.addr, &files).await;
            to_a.hello().await;
            let to_b = Arc::new(Client::connect(b.addr, &files).await);
            to_b.hello().await;
            // Leases of 2 s through A, each renewed through B a few milliseconds before its
            // end, when A's timer is about to end it: whichever etcd takes first wins, on both.
            let mut leases = Vec::new();
            for n in 0..LEASES {
                let port = 7100 + n;
                let lease = granted(to_a.open(tcp(port), Some(2)).await);
                leases.push((port, lease));
            }
            for (port, _) in &leases {
                // No server listens on these ports: the kernel's elements tell.
                assert!(eventually(PROPAGATION, || b.kernel_has(*port)).await);
            }
            let mut renewals = Vec::new();
            for (n, (port, lease)) in leases.iter().enumerate() {
                let to_b = to_b.clone();
                let (port, id, end) = (*port, lease.lease, lease.expires_ms);
                let early = 1 + 2 * n as u64;
                renewals.push(tokio::spawn(async move {
                    let at = end.saturating_sub(early);
                    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
                    (port, id, to_b.renew(id, Some(60)).await)
                }));
            }
            let mut outcomes = Vec::new();
            for renewal in renewals {
                outcomes.push(renewal.await.expect("renewal task"));
            }
            let last_end = leases.iter().map(|(_, l)| l.expires_ms).max().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(
                (last_end + 1_500).saturating_sub(now_ms()),
            ))
            .await;
            let (mut kept, mut ended) = (0, 0);
            for (port, id, answer) in outcomes {
                let expired = || a.audited(id, Outcome::Expired) + b.audited(id, Outcome::Expired);
                let in_book =
                    |leases: &fwnp_proto::Leases| leases.leases.iter().any(|l| l.lease == id);
                match answer {
                    Message::Granted(_) => {
                        kept += 1;
                        assert!(
                            in_book(&to_a.list().await),
                            "A kept {id}, renewed through B"
                        );
                        assert!(in_book(&to_b.list().await), "B kept {id}");
                        assert!(
                            a.kernel_has(port) && b.kernel_has(port),
                            "{id} in both kernels"
                        );
                        assert_eq!(expired(), 0, "{id} renewed, not expired");
                    }
                    other => {
                        ended += 1;
                        assert!(matches!(other, Message::Denied(_)), "{other:?}");
                        assert!(!in_book(&to_a.list().await), "{id} ended on A");
                        assert!(!in_book(&to_b.list().await), "{id} ended on B");
                        assert!(!a.kernel_has(port) && !b.kernel_has(port));
                        assert!(
                            eventually(PROPAGATION, || expired() >= 1).await,
                            "{id} expired and audited"
                        );
                        assert_eq!(expired(), 1, "{id} audited once");
                    }
                }
            }
            assert_eq!(kept + ended, usize::from(LEASES));
            eprintln!("{TEST}: {kept} renewed, {ended} expired first");
            drop((to_a, to_b));
            a.stop();
            b.stop();
        });
    });
}

/// The reload's policy: tcp/7003 and above are no longer allowed.
const NARROWER: &str = r#"
[defaults]
lifetime = "60s"
min_lifetime = "1s"
max_lifetime = "1h"
max_leases = 16

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7002"
"#;

/// The WARN lines logged by threads named `thread` (a test's runtime), from the moment
/// [`Warnings::install`] was first called in this test binary.
#[derive(Clone, Default)]
struct Warnings(Arc<std::sync::Mutex<Vec<(String, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={value:?}", field.name()));
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        let thread = std::thread::current().name().unwrap_or_default().to_owned();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((thread, text.0));
    }
}

impl Warnings {
    /// The binary's one log subscriber (tests of this file run in parallel, each on a runtime
    /// whose threads it names).
    fn install() -> Warnings {
        static WARNINGS: std::sync::OnceLock<Warnings> = std::sync::OnceLock::new();
        WARNINGS
            .get_or_init(|| {
                let warnings = Warnings::default();
                tracing::subscriber::set_global_default(
                    tracing_subscriber::layer::SubscriberExt::with(
                        tracing_subscriber::registry(),
                        warnings.clone(),
                    ),
                )
                .expect("the only global subscriber");
                warnings
            })
            .clone()
    }

    fn of(&self, thread: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(t, _)| t == thread)
            .map(|(_, text)| text.clone())
            .collect()
    }
}

/// A runtime whose threads are named `name`, for [`Warnings::of`].
fn named_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits for the Revoked notice of `lease` on `client`, skipping other notices.
async fn revoked_notice(client: &Client, lease: LeaseId) -> Option<fwnp_proto::Revoked> {
    let deadline = Instant::now() + PROPAGATION;
    loop {
        match client.next_notice(PROPAGATION).await {
            Some(Message::Revoked(revoked)) if revoked.lease == lease => return Some(revoked),
            Some(_) if Instant::now() < deadline => continue,
            _ => return None,
        }
    }
}

/// Whether the lease's key is in etcd.
/// The test's policy with another `max_leases`, to reload.
fn policy_of_max_leases(max: u32) -> String {
    POLICY.replace("max_leases = 16", &format!("max_leases = {max}"))
}

/// The cluster policy's version in force on each gateway.
fn policy_versions(gateways: &[&Gateway]) -> Vec<u64> {
    gateways
        .iter()
        .map(|g| g.service.cluster().map_or(0, |c| c.policy_version()))
        .collect()
}

async fn lease_in_etcd(cluster: &EtcdCluster, id: LeaseId) -> bool {
    let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .expect("etcd client");
    let answer = client
        .get(format!("/fwnp-test/leases/{id}"), None)
        .await
        .expect("read the lease");
    !answer.kvs().is_empty()
}

#[test]
fn a_policy_reload_through_one_gateway_revokes_once_what_it_disallows_on_every_kernel() {
    const TEST: &str =
        "a_policy_reload_through_one_gateway_revokes_once_what_it_disallows_on_every_kernel";
    const THREADS: &str = "fwnp-reload-once";
    if !available(TEST) {
        return;
    }
    let warnings = Warnings::install();
    let cluster = EtcdCluster::single("wrel").unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new("etcd-wrel");
    let (dir_a, dir_b) = (temp_dir("wrel-a"), temp_dir("wrel-b"));
    let web1 = pki.host("web-01", &[host_ip()], &[], &[]);
    let web2 = pki.host("web-02", &[host_ip()], &[], &[]);
    cluster.run(|| {
        named_runtime(THREADS).block_on(async {
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(&cluster, &pki, dir_b.path(), "gw-b").await;
            // A host on each gateway, each with a lease of each kind: one the reload still
            // allows, one it no longer does.
            let to_a = Client::connect(a.addr, &web1).await;
            to_a.hello().await;
            let to_b = Client::connect(b.addr, &web2).await;
            to_b.hello().await;
            let kept_a = granted(to_a.open(tcp(7001), Some(600)).await).lease;
            let gone_a = granted(to_a.open(tcp(7003), Some(600)).await).lease;
            let kept_b = granted(to_b.open(tcp(7002), Some(600)).await).lease;
            let gone_b = granted(to_b.open(tcp(7004), Some(600)).await).lease;
            for gateway in [&a, &b] {
                for port in [7001, 7002, 7003, 7004] {
                    assert!(
                        gateway.wait_open(port, true, PROPAGATION).await,
                        "{port} open before the reload"
                    );
                }
            }

            write_policy(&dir_a.path().join("policy.toml"), NARROWER);
            let reloaded = a.service.reload_policy().await.expect("reloaded");
            // A revokes what the new policy disallows, but for what B's watch, which revokes
            // it too, ended first.
            let by_a: Vec<String> = reloaded.revoked.iter().map(|r| r.lease.clone()).collect();
            let expected = [gone_a.to_string(), gone_b.to_string()];
            assert!(
                by_a.iter().all(|id| expected.contains(id)),
                "{by_a:?} of {expected:?}"
            );

            // Each host has its Revoked from the gateway it is connected to.
            let notice = revoked_notice(&to_a, gone_a).await.expect("Revoked on A");
            assert_eq!(notice.reason, RevokeReason::PolicyChanged);
            let notice = revoked_notice(&to_b, gone_b).await.expect("Revoked on B");
            assert_eq!(notice.reason, RevokeReason::PolicyChanged);

            // Closed in both kernels, a TCP connection through either filter fails; the
            // others stay open.
            for gateway in [&a, &b] {
                for port in [7003, 7004] {
                    assert!(
                        gateway.wait_open(port, false, PROPAGATION).await,
                        "{port} closed"
                    );
                }
                for port in [7001, 7002] {
                    assert!(gateway.passes(port), "{port} still open");
                    assert!(gateway.kernel_has(port), "{port} still held");
                }
            }
            for lease in [gone_a, gone_b] {
                assert!(
                    !lease_in_etcd(&cluster, lease).await,
                    "{lease} ended in etcd"
                );
            }
            for lease in [kept_a, kept_b] {
                assert!(lease_in_etcd(&cluster, lease).await, "{lease} still live");
            }

            // One end each, audited once across the gateways, by whichever committed it
            // first: A's reload lists what left A's book, which may be an end B's watch
            // committed first, so its list does not say which gateway audited.
            tokio::time::sleep(Duration::from_secs(1)).await;
            for lease in [gone_a, gone_b] {
                let on_a = a.audited(lease, Outcome::Revoked);
                let on_b = b.audited(lease, Outcome::Revoked);
                assert_eq!(on_a + on_b, 1, "{lease}: A {on_a}, B {on_b}");
            }
            let not_stored: Vec<String> = warnings
                .of(THREADS)
                .into_iter()
                .filter(|w| w.contains("not stored"))
                .collect();
            assert!(not_stored.is_empty(), "{not_stored:#?}");

            // B decides by the new policy.
            let refused = denied(to_b.open(tcp(7005), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
            drop((to_a, to_b));
            a.stop();
            b.stop();
        });
    });
}

#[test]
fn without_quorum_a_revoke_or_a_release_is_refused_and_leaves_book_and_kernels_as_they_were() {
    const TEST: &str =
        "without_quorum_a_revoke_or_a_release_is_refused_and_leaves_book_and_kernels_as_they_were";
    if !available(TEST) {
        return;
    }
    let mut cluster = EtcdCluster::start("wrvq").unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new("etcd-wrvq");
    let (dir_a, dir_b) = (temp_dir("wrvq-a"), temp_dir("wrvq-b"));
    let files = pki.host("web-01", &[host_ip()], &[], &[]);
    let (rt, a, b, to_a, lease, held) = cluster.run(|| {
        let rt = runtime();
        let (a, b, to_a, lease, held) = rt.block_on(async {
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(&cluster, &pki, dir_b.path(), "gw-b").await;
            let to_a = Client::connect(a.addr, &files).await;
            to_a.hello().await;
            let lease = granted(to_a.open(tcp(7001), Some(600)).await).lease;
            // The one the host releases.
            let held = granted(to_a.open(tcp(7002), Some(600)).await).lease;
            for port in [7001, 7002] {
                assert!(a.wait_open(port, true, PROPAGATION).await);
                assert!(b.wait_open(port, true, PROPAGATION).await);
            }
            (a, b, to_a, lease, held)
        });
        (rt, a, b, to_a, lease, held)
    });

    cluster.kill(0);
    cluster.kill(1);
    cluster.run(|| {
        rt.block_on(async {
            for gateway in [&a, &b] {
                let refused = gateway
                    .service
                    .revoke_by_operator(lease, Some("maintenance".into()))
                    .await
                    .expect_err("no quorum, no revocation");
                assert_eq!(
                    refused.kind,
                    fwnp_gateway::api::AdminErrorKind::Unavailable,
                    "{refused}"
                );
                assert!(
                    refused
                        .message
                        .contains(&format!("lease {lease} not revoked")),
                    "{refused}"
                );
            }
            // Book and kernels as they were: the opening holds through both filters, the
            // host was told nothing, and A still answers for the lease.
            for gateway in [&a, &b] {
                assert!(gateway.passes(7001) && gateway.kernel_has(7001));
            }
            assert!(to_a.next_notice(Duration::from_secs(1)).await.is_none());

            // The host's Release: no-resources with a retry-after, and the lease stays.
            let refused = denied(to_a.release(held).await);
            assert_eq!(refused.code, ResultCode::NoResources, "{refused:?}");
            assert_eq!(refused.retry_after, Some(5), "{refused:?}");
            for gateway in [&a, &b] {
                assert!(gateway.passes(7002) && gateway.kernel_has(7002));
            }
            let listed = to_a.list().await;
            for id in [lease, held] {
                assert!(listed.leases.iter().any(|l| l.lease == id), "{listed:?}");
            }
        })
    });

    cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
    cluster.restart(1).unwrap_or_else(|e| panic!("{e}"));
    assert!(cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30)));
    cluster.run(|| {
        rt.block_on(async {
            // With the quorum back the lease is still the cluster's, and the same revoke
            // through B ends it everywhere.
            assert!(lease_in_etcd(&cluster, lease).await, "never ended");
            let deadline = Instant::now() + Duration::from_secs(15);
            let answer = loop {
                match b
                    .service
                    .revoke_by_operator(lease, Some("maintenance".into()))
                    .await
                {
                    Ok(answer) => break answer,
                    Err(e) => assert!(Instant::now() < deadline, "not revoked: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert_eq!(answer.revoked, lease.to_string());
            let notice = revoked_notice(&to_a, lease)
                .await
                .expect("Revoked through A");
            assert_eq!(notice.reason, RevokeReason::Operator);
            assert!(a.wait_open(7001, false, PROPAGATION).await, "A closed it");
            assert!(b.wait_open(7001, false, PROPAGATION).await, "B closed it");
            assert!(!lease_in_etcd(&cluster, lease).await);
            assert_eq!(
                a.audited(lease, Outcome::Revoked) + b.audited(lease, Outcome::Revoked),
                1
            );
            // And the Release asked again: released, closed in both kernels. A's store may
            // meet a member still catching up, as B's revoke above may: no-resources is
            // transient, and the host asks again after its retry-after.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match to_a.release(held).await {
                    Message::Released(_) => break,
                    // The Release refused without the quorum got no answer from etcd, which
                    // may have taken it all the same once the quorum came back: the lease is
                    // ended, and a client takes unknown-lease to a Release as released (spec
                    // 11.5).
                    Message::Denied(d) if d.code == ResultCode::UnknownLease => break,
                    Message::Denied(d)
                        if d.code == ResultCode::NoResources && Instant::now() < deadline =>
                    {
                        eprintln!("release refused for now: {d:?}");
                    }
                    other => panic!("not released with the quorum back: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(a.wait_open(7002, false, PROPAGATION).await, "A closed it");
            assert!(b.wait_open(7002, false, PROPAGATION).await, "B closed it");
            assert!(!lease_in_etcd(&cluster, held).await);
        })
    });
    drop(to_a);
    assert_no_epoch_change(&[&a, &b]);
    a.stop();
    b.stop();
    drop(rt);
}

#[test]
fn a_crl_reloaded_on_every_gateway_at_once_revokes_each_lease_of_it_once() {
    const TEST: &str = "a_crl_reloaded_on_every_gateway_at_once_revokes_each_lease_of_it_once";
    const THREADS: &str = "fwnp-crl-once";
    if !available(TEST) {
        return;
    }
    let warnings = Warnings::install();
    let cluster = EtcdCluster::single("wcrl").unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new("etcd-wcrl");
    let (dir_a, dir_b) = (temp_dir("wcrl-a"), temp_dir("wcrl-b"));
    let doomed = pki.host("web-01", &[host_ip()], &[], &[]);
    let kept = pki.host("web-02", &[host_ip()], &[], &[]);
    cluster.run(|| {
        named_runtime(THREADS).block_on(async {
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(&cluster, &pki, dir_b.path(), "gw-b").await;
            let to_a = Client::connect(a.addr, &doomed).await;
            to_a.hello().await;
            let to_b = Client::connect(b.addr, &kept).await;
            to_b.hello().await;
            let mut gone = Vec::new();
            for port in [7001, 7003] {
                gone.push(granted(to_a.open(tcp(port), Some(600)).await).lease);
            }
            let stays = granted(to_b.open(tcp(7002), Some(600)).await).lease;
            for gateway in [&a, &b] {
                for port in [7001, 7002, 7003] {
                    assert!(gateway.wait_open(port, true, PROPAGATION).await, "{port}");
                }
            }

            // Both gateways read the CRL that lists web-01's certificate at the same moment
            // (both share the PKI's CRL file): each finds web-01's leases in its book.
            fwnp_trust::pki::revoke(
                pki.path(),
                &doomed.cert,
                fwnp_trust::pki::RevocationReason::KeyCompromise,
            )
            .expect("revoke");
            let (on_a, on_b) = tokio::join!(a.service.reload_tls(), b.service.reload_tls());
            let (closed_a, closed_b) = (on_a.expect("A reloads"), on_b.expect("B reloads"));
            assert_eq!(closed_a.len(), 1, "web-01's connection to A: {closed_a:?}");
            assert!(closed_b.is_empty(), "{closed_b:?}");

            for gateway in [&a, &b] {
                for port in [7001, 7003] {
                    assert!(
                        gateway.wait_open(port, false, PROPAGATION).await,
                        "{port} closed"
                    );
                }
                assert!(gateway.passes(7002), "web-02's lease stays");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            for lease in &gone {
                assert!(!lease_in_etcd(&cluster, *lease).await, "{lease} ended");
                assert_eq!(
                    a.audited(*lease, Outcome::Revoked) + b.audited(*lease, Outcome::Revoked),
                    1,
                    "{lease} revoked once"
                );
            }
            assert!(lease_in_etcd(&cluster, stays).await);
            let not_stored: Vec<String> = warnings
                .of(THREADS)
                .into_iter()
                .filter(|w| w.contains("not stored"))
                .collect();
            assert!(not_stored.is_empty(), "{not_stored:#?}");
            drop((to_a, to_b));
            a.stop();
            b.stop();
        });
    });
}

/// How the cluster's shared lease state is lost under the running gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Every key under the deployment's prefix deleted (etcdctl del --prefix).
    PrefixDeleted,
    /// etcd stopped and started again on an empty data directory, at the same address.
    FreshEtcd,
    /// etcd stopped and put back from a snapshot taken before the second lease, at the same
    /// address: its epoch key still holds the old epoch, its revision is behind.
    RestoredSnapshot,
}

/// How long a gateway may take to find its cluster's state lost, once etcd answers.
const FIND_LOSS: Duration = Duration::from_secs(20);

#[test]
fn a_deleted_prefix_gives_the_cluster_a_new_epoch_that_every_gateway_and_host_takes() {
    state_lost_under_running_gateways(
        "a_deleted_prefix_gives_the_cluster_a_new_epoch_that_every_gateway_and_host_takes",
        "epdel",
        Loss::PrefixDeleted,
    );
}

#[test]
fn an_etcd_started_again_empty_gives_the_cluster_a_new_epoch_that_every_gateway_and_host_takes() {
    state_lost_under_running_gateways(
        "an_etcd_started_again_empty_gives_the_cluster_a_new_epoch_that_every_gateway_and_host_takes",
        "epnew",
        Loss::FreshEtcd,
    );
}

#[test]
fn an_etcd_put_back_from_a_snapshot_gives_the_cluster_a_new_epoch_and_its_older_leases() {
    state_lost_under_running_gateways(
        "an_etcd_put_back_from_a_snapshot_gives_the_cluster_a_new_epoch_and_its_older_leases",
        "epsnap",
        Loss::RestoredSnapshot,
    );
}

/// Waits for the EpochChanged notice on `client`, skipping other notices.
async fn epoch_changed(client: &Client, within: Duration) -> Option<fwnp_proto::Epoch> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_notice(left).await {
            Some(Message::EpochChanged(changed)) => return Some(changed.epoch),
            Some(_) if Instant::now() < deadline => continue,
            _ => return None,
        }
    }
}

/// Waits at most `within` for the Revoked notice of `lease` on `client`.
async fn revoked_notice_within(
    client: &Client,
    lease: LeaseId,
    within: Duration,
) -> Option<fwnp_proto::Revoked> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_notice(left).await {
            Some(Message::Revoked(revoked)) if revoked.lease == lease => return Some(revoked),
            Some(_) if Instant::now() < deadline => continue,
            _ => return None,
        }
    }
}

/// The records of this gateway's trail that say its epoch changed.
fn epoch_changes_audited(gateway: &Gateway) -> Vec<String> {
    let query = AuditQuery {
        kinds: vec![AuditKind::Reconcile],
        limit: 100,
        ..AuditQuery::default()
    };
    gateway
        .service
        .store()
        .audit(&query)
        .expect("audit query")
        .events
        .into_iter()
        .filter_map(|e| e.event.reason)
        .filter(|r| r.starts_with("epoch changed"))
        .collect()
}

/// Two gateways on one etcd, a host connected to each with NOTICES and leases whose openings
/// pass both kernels; the cluster's state is lost (`loss`). Both gateways take one new epoch,
/// tell the host, close in their kernels the openings of the leases the state lost (every
/// lease, or with a snapshot the one granted after it) and keep the others, welcome with the
/// new epoch and audit the change once each; the host's Opens again are granted under the new
/// epoch and pass again; a gateway started again on the state keeps its epoch.
fn state_lost_under_running_gateways(test: &str, short: &str, loss: Loss) {
    if !available(test) {
        return;
    }
    let mut cluster = EtcdCluster::single(short).unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new(&format!("etcd-{short}"));
    let (dir_a, dir_b) = (
        temp_dir(&format!("{short}-a")),
        temp_dir(&format!("{short}-b")),
    );
    let files = pki.host("web-01", &[host_ip()], &[], &[]);
    let snapshot = cluster.dir().join("before-second.db");
    let (rt, a, b, to_a, to_b, old, first, second) = cluster.run(|| {
        let rt = runtime();
        let (a, b, to_a, to_b, old, first, second) = rt.block_on(async {
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(&cluster, &pki, dir_b.path(), "gw-b").await;
            let to_a = Client::connect(a.addr, &files).await;
            let old = to_a.hello().await.epoch;
            let to_b = Client::connect(b.addr, &files).await;
            assert_eq!(to_b.hello().await.epoch, old, "one epoch for the cluster");
            let first = granted(to_a.open(tcp(7001), Some(600)).await);
            assert_eq!(first.epoch, old);
            assert!(a.passes(7001), "granted means in A's kernel");
            assert!(b.wait_open(7001, true, PROPAGATION).await, "and in B's");
            tokio::task::block_in_place(|| cluster.snapshot(0, &snapshot))
                .expect("a snapshot of etcd");
            // A reload after the snapshot: the cluster enforces version 2, which the snapshot
            // does not hold.
            write_policy(&dir_a.path().join("policy.toml"), &policy_of_max_leases(17));
            a.service.reload_policy().await.expect("reloaded through A");
            assert!(
                eventually(PROPAGATION, || policy_versions(&[&a, &b]) == [2, 2]).await,
                "version 2 in force on both: {:?}",
                policy_versions(&[&a, &b])
            );
            // Granted after the snapshot, renewed a few times (the history goes on).
            let second = granted(to_b.open(tcp(7002), Some(600)).await).lease;
            for _ in 0..5 {
                assert!(matches!(
                    to_b.renew(second, Some(600)).await,
                    Message::Granted(_)
                ));
            }
            assert!(a.wait_open(7002, true, PROPAGATION).await);
            (a, b, to_a, to_b, old, first.lease, second)
        });
        (rt, a, b, to_a, to_b, old, first, second)
    });

    match loss {
        Loss::PrefixDeleted => {
            cluster
                .delete_prefix("/fwnp-test/")
                .expect("etcdctl deletes the prefix");
        }
        Loss::FreshEtcd => {
            cluster.kill(0);
            std::fs::remove_dir_all(cluster.dir().join("m0")).expect("remove the data directory");
            cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
        }
        Loss::RestoredSnapshot => {
            cluster
                .restore_snapshot(0, &snapshot)
                .expect("etcd restored from the snapshot");
            cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert!(
        cluster.wait_healthy(&[0], Duration::from_secs(30)),
        "etcd answers"
    );
    // What the state holds now: with the snapshot, the first lease.
    let kept: Vec<(u16, LeaseId)> = match loss {
        Loss::RestoredSnapshot => vec![(7001, first)],
        _ => Vec::new(),
    };
    let lost: Vec<u16> = match loss {
        Loss::RestoredSnapshot => vec![7002],
        _ => vec![7001, 7002],
    };

    let new = cluster.run(|| {
        rt.block_on(async {
            // Both connections of the host are told, with one new epoch.
            let told_a = epoch_changed(&to_a, FIND_LOSS).await;
            let told_b = epoch_changed(&to_b, FIND_LOSS).await;
            let new = told_a.expect("the host connected to A is sent EpochChanged");
            assert_ne!(new, old, "a new epoch");
            assert_eq!(told_b, Some(new), "B tells the same epoch");
            assert_eq!(a.service.epoch(), new);
            assert_eq!(b.service.epoch(), new);
            for (name, gateway) in [("A", &a), ("B", &b)] {
                let welcome = Client::connect(gateway.addr, &files).await.hello().await;
                assert_eq!(welcome.epoch, new, "{name} welcomes with the new epoch");
            }

            // The lost leases' openings are closed in both kernels, and no book holds them;
            // the state's leases stay.
            for port in &lost {
                assert!(
                    a.wait_open(*port, false, PROPAGATION).await,
                    "A closed {port}"
                );
                assert!(
                    b.wait_open(*port, false, PROPAGATION).await,
                    "B closed {port}"
                );
            }
            for (port, _) in &kept {
                assert!(a.passes(*port) && b.passes(*port), "{port} stays open");
            }
            for client in [&to_a, &to_b] {
                let leases = client.list().await;
                assert_eq!(leases.epoch, new);
                let listed: Vec<LeaseId> = leases.leases.iter().map(|l| l.lease).collect();
                let expected: Vec<LeaseId> = kept.iter().map(|(_, id)| *id).collect();
                assert_eq!(listed, expected);
            }
            // Lost with the state, not revoked: no Revoked notice.
            for (client, lease) in [(&to_a, first), (&to_b, second)] {
                assert!(
                    revoked_notice_within(client, lease, Duration::from_millis(500))
                        .await
                        .is_none(),
                    "no Revoked notice for a lease lost with the state"
                );
            }

            // The host opens them again: granted under the new epoch (the one the state kept
            // as it is), and both kernels pass them.
            for port in [7001, 7002] {
                let again = granted(to_a.open(tcp(port), Some(600)).await);
                assert_eq!(again.epoch, new);
                if let Some((_, id)) = kept.iter().find(|(p, _)| *p == port) {
                    assert_eq!(again.lease, *id, "the state's lease, extended");
                }
                assert!(a.passes(port), "{port} open again through A");
                assert!(
                    b.wait_open(port, true, PROPAGATION).await,
                    "{port} open again through B"
                );
                assert!(lease_in_etcd(&cluster, again.lease).await);
            }

            // The policy in force is the cluster's again, and versions count on from it.
            let deadline = Instant::now() + PROPAGATION;
            let mut stored = published_policy(&cluster.endpoints())
                .await
                .map(|(stored, _)| stored);
            while stored.as_ref().map(|p| p.version) != Some(2) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                stored = published_policy(&cluster.endpoints())
                    .await
                    .map(|(stored, _)| stored);
            }
            let stored = stored.expect("a policy in etcd again");
            assert_eq!(
                (stored.version, stored.text.as_str()),
                (2, policy_of_max_leases(17).as_str()),
                "the version in force put back"
            );
            write_policy(&dir_b.path().join("policy.toml"), &policy_of_max_leases(18));
            let reloaded = b.service.reload_policy().await.expect("reloaded through B");
            assert!(reloaded.superseded.is_none(), "{reloaded:?}");
            assert!(
                eventually(PROPAGATION, || policy_versions(&[&a, &b]) == [3, 3]).await,
                "version 3 in force on both: {:?}",
                policy_versions(&[&a, &b])
            );

            for (name, gateway) in [("A", &a), ("B", &b)] {
                let records = epoch_changes_audited(gateway);
                assert_eq!(records.len(), 1, "{name}: {records:?}");
                assert!(
                    records[0].contains(&format!("from {old:016x} to {new:016x}")),
                    "{name}: {records:?}"
                );
                assert_eq!(gateway.service.metrics.epoch_changes.get(), 1, "{name}");
            }
            new
        })
    });
    // A gateway started again on the cluster's state keeps its epoch and its leases.
    drop((to_a, to_b));
    a.stop();
    cluster.run(|| {
        rt.block_on(async {
            let a = Gateway::start(&cluster, &pki, dir_a.path(), "gw-a").await;
            assert_eq!(a.service.epoch(), new, "a restart keeps the epoch");
            let to_a = Client::connect(a.addr, &files).await;
            assert_eq!(to_a.hello().await.epoch, new);
            assert!(
                a.passes(7001) && a.passes(7002),
                "the leases opened again are restored"
            );
            assert_eq!(epoch_changes_audited(&a).len(), 1, "and no change more");
            drop(to_a);
            a.stop();
        })
    });
    b.stop();
    drop(rt);
}
