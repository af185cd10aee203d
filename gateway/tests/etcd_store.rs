//! The etcd lease store against a real etcd cluster (processes started by the
//! test in a network namespace of their own): two gateways' stores on one cluster share the
//! leases and the epoch, the cluster's rules hold across them (a lease inserted once, owner's
//! incarnation, a host's lease count, an expiry that a renewal elsewhere overrides), also when
//! what a gateway knows of the keys grew stale through another and when two race for a host's
//! last lease slot, concurrent commits are grouped into few transactions, several batches in
//! flight keep the counts right, the store keeps taking writes with one member lost, refuses
//! them promptly without a quorum, and takes them again when it is back, a grant etcd took
//! without the gateway hearing of it is ended, one that reaches etcd only after the gateway
//! settled it is refused by its fence, and a watch from a compacted revision lists the leases
//! instead.
//!
//! Needs root (for the namespace) and etcd (Debian's etcd-server and etcd-client); skipped
//! otherwise, a failure under `FWNP_REQUIRE_NETNS=1`.

mod etcd_cluster;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_cluster::{
    Cut, EtcdCluster, EtcdOptions, Link, MemberTls, StoreConfig, available, in_cluster,
};
use fwnp_gateway::config::{EtcdConfig, EtcdTls};
use fwnp_gateway::store::{
    AuditEvent, AuditKind, AuditQuery, ClusterChange, EtcdStore, LeaseEnd, LeaseStore, NewLease,
    Store, StoreError, WriteError, WriteOp,
};
use fwnp_proto::{Grant, LeaseId, PortRange, Protocol};
use fwnp_trust::pki::{self, Validity};

const NOW: u64 = 1_700_000_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn lease(n: u16, identity: &str, expires_ms: u64, max_leases: Option<u32>) -> NewLease {
    let [hi, lo] = n.to_be_bytes();
    NewLease {
        id: LeaseId([hi, lo, 0xe7, 0xcd, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
        identity: identity.into(),
        peer: None,
        grants: vec![Grant {
            protocol: Protocol::Tcp,
            ports: PortRange::single(7000 + n),
            host: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            remotes: Vec::new(),
            app: None,
        }],
        app: None,
        requested_lifetime: None,
        granted_lifetime: 600,
        created_ms: NOW,
        expires_ms,
        certificate: None,
        max_leases,
    }
}

fn grant_event(id: LeaseId) -> WriteOp {
    let mut event = AuditEvent::new(NOW, AuditKind::Grant);
    event.lease = Some(id);
    WriteOp::audit(event)
}

fn renew(id: LeaseId, expires_ms: u64) -> WriteOp {
    WriteOp::RenewLease {
        id,
        renewed_ms: NOW,
        expires_ms,
        granted_lifetime: 600,
        certificate: None,
    }
}

/// An end of lease `id` by `by` (the host's identity for a release, `gateway` for an expiry).
fn end(id: LeaseId, end: LeaseEnd, ended_ms: u64, by: &str) -> WriteOp {
    WriteOp::EndLease {
        id,
        end,
        ended_ms,
        by: Some(by.into()),
        why: None,
    }
}

/// A gateway's side: its own SQLite database (for the audit trail) and its etcd store.
struct Gateway {
    local: Store,
    etcd: EtcdStore,
    _dir: tempfile::TempDir,
}

async fn gateway(cluster: &EtcdCluster, site: &str, timeout: Duration) -> Gateway {
    gateway_with(&cluster.config(site, timeout)).await
}

async fn gateway_with(config: &EtcdConfig) -> Gateway {
    let dir = tempfile::tempdir().expect("temp dir");
    let local = Store::open(dir.path()).expect("local store");
    let etcd = EtcdStore::connect(config, local.writer().clone())
        .await
        .expect("connected to etcd");
    Gateway {
        local,
        etcd,
        _dir: dir,
    }
}

/// The ids of the cluster's live leases, as the gateway's restore lists them.
async fn live_ids(gateway: &Gateway) -> Vec<LeaseId> {
    let restored = gateway.etcd.restore(NOW).await.expect("listed");
    restored.live.iter().map(|l| l.id).collect()
}

/// Gateway A, reaching etcd through a [`Link`] with a timeout of one second, after a first
/// grant while etcd answered; and B, reaching it directly.
struct Linked {
    link: Link,
    config: EtcdConfig,
    a: Gateway,
    b: Gateway,
    first_id: LeaseId,
}

impl Linked {
    async fn start(cluster: &EtcdCluster) -> Linked {
        let link = Link::start(&cluster.endpoints()).await;
        let mut config = cluster.config("gw-a", Duration::from_secs(1));
        config.endpoints = link.endpoints.clone();
        let a = gateway_with(&config).await;
        let b = gateway(cluster, "gw-b", config.timeout).await;
        let first = lease(1, "fwnp://host/linked", NOW + 600_000, None);
        let first_id = first.id;
        a.etcd
            .commit(vec![WriteOp::InsertLease(first), grant_event(first_id)])
            .await
            .expect("granted while etcd answers");
        Linked {
            link,
            config,
            a,
            b,
            first_id,
        }
    }
}

/// Cuts `link` so and has A grant a second lease: refused as unavailable. Its id.
async fn link_refuses_a_grant(link: &Link, a: &Gateway, cut: Cut) -> LeaseId {
    link.set_cut(cut);
    let refused = lease(2, "fwnp://host/linked", NOW + 600_000, None);
    let id = refused.id;
    let answer = a
        .etcd
        .commit(vec![WriteOp::InsertLease(refused), grant_event(id)])
        .await;
    assert!(
        matches!(answer, Err(WriteError::Unavailable(_))),
        "{answer:?}"
    );
    id
}

/// The next change a watch hands over, within 20 s.
async fn next_change(
    changes: &mut tokio::sync::mpsc::UnboundedReceiver<ClusterChange>,
) -> ClusterChange {
    tokio::time::timeout(Duration::from_secs(20), changes.recv())
        .await
        .expect("a change within 20 s")
        .expect("the watch goes on")
}

/// Audit events of the gateway's own database that name `id`.
async fn audited(gateway: &Gateway, id: LeaseId) -> usize {
    // Audit records are queued to the local writer after the etcd commit: let it commit them.
    gateway
        .local
        .writer()
        .commit(vec![WriteOp::DeleteAuditBefore {
            before_ms: 0,
            max_rows: 1,
        }])
        .await
        .expect("a local commit after the queued records");
    let page = gateway
        .local
        .audit(&AuditQuery {
            limit: 1_000,
            ..AuditQuery::default()
        })
        .expect("audit");
    page.events
        .iter()
        .filter(|e| e.event.lease == Some(id))
        .count()
}

#[test]
fn two_gateways_share_the_leases_and_the_cluster_rules_hold_across_them() {
    in_cluster(
        "two_gateways_share_the_leases_and_the_cluster_rules_hold_across_them",
        "share",
        runtime,
        async |cluster| {
            let a = gateway(cluster, "gw-a", Duration::from_secs(2)).await;
            let b = gateway(cluster, "gw-b", Duration::from_secs(2)).await;
            assert_eq!(a.etcd.epoch(), b.etcd.epoch(), "one epoch for the cluster");
            assert_ne!(a.etcd.epoch(), 0);
            assert_eq!(a.etcd.site(), "gw-a");

            // A lease granted through A is renewed through B, and A sees the renewal.
            let web = "fwnp://host/web-01";
            let one = lease(1, web, NOW + 600_000, Some(2));
            a.etcd
                .commit(vec![WriteOp::InsertLease(one.clone()), grant_event(one.id)])
                .await
                .expect("A grants");
            b.etcd
                .commit(vec![renew(one.id, NOW + 900_000)])
                .await
                .expect("B renews A's lease");
            let live = a.etcd.restore(NOW).await.expect("A lists").live;
            assert_eq!(live.len(), 1);
            assert_eq!(live[0].id, one.id);
            assert_eq!(live[0].expires_ms, NOW + 900_000, "A sees B's renewal");
            assert_eq!(live[0].identity, web);
            assert_eq!(audited(&a, one.id).await, 1, "A recorded its grant");
            assert_eq!(audited(&b, one.id).await, 0, "B did not grant it");

            // The same lease inserted again, through either gateway: refused.
            let err = b
                .etcd
                .commit(vec![WriteOp::InsertLease(one.clone())])
                .await
                .expect_err("a lease is inserted once");
            assert!(
                matches!(err, WriteError::Store(StoreError::DuplicateLease { id }) if id == one.id),
                "{err:?}"
            );

            // max_leases = 2 across the cluster: one through A, one through B, the third through
            // A is refused although A itself granted only one.
            let two = lease(2, web, NOW + 600_000, Some(2));
            b.etcd
                .commit(vec![WriteOp::InsertLease(two.clone())])
                .await
                .expect("B grants the second");
            let three = lease(3, web, NOW + 600_000, Some(2));
            let err = a
                .etcd
                .commit(vec![
                    WriteOp::InsertLease(three.clone()),
                    grant_event(three.id),
                ])
                .await
                .expect_err("a third lease is beyond max_leases");
            assert!(
                matches!(
                    &err,
                    WriteError::QuotaExceeded {
                        held: 2,
                        max: 2,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(
                audited(&a, three.id).await,
                0,
                "a refused commit records nothing"
            );
            // Another host is not counted against this one.
            a.etcd
                .commit(vec![WriteOp::InsertLease(lease(
                    4,
                    "fwnp://host/db-01",
                    NOW + 600_000,
                    Some(1),
                ))])
                .await
                .expect("another host's lease");
            // Only its host releases a lease, through whichever gateway.
            let err = b
                .etcd
                .commit(vec![end(
                    two.id,
                    LeaseEnd::Released,
                    NOW,
                    "fwnp://host/db-01",
                )])
                .await
                .expect_err("another host's release");
            assert!(
                matches!(&err, WriteError::Conflict(why) if why.contains("is held by")),
                "{err:?}"
            );
            // Released through B by its host: A may grant the third now.
            b.etcd
                .commit(vec![end(two.id, LeaseEnd::Released, NOW, web)])
                .await
                .expect("B ends the second");
            a.etcd
                .commit(vec![WriteOp::InsertLease(three.clone())])
                .await
                .expect("the count went down across the cluster");

            // Owner's incarnation: lease 1 ended through B, then stored again for another host.
            // A, which saw the first incarnation, may neither renew nor end the second.
            b.etcd
                .commit(vec![end(one.id, LeaseEnd::Released, NOW, web)])
                .await
                .expect("B ends lease 1");
            let err = a
                .etcd
                .commit(vec![renew(one.id, NOW + 999_000)])
                .await
                .expect_err("an ended lease is not renewed");
            assert!(
                matches!(err, WriteError::Store(StoreError::LeaseNotLive { .. })),
                "{err:?}"
            );
            let intruder = NewLease {
                identity: "fwnp://host/other".into(),
                ..one.clone()
            };
            b.etcd
                .commit(vec![WriteOp::InsertLease(intruder)])
                .await
                .expect("a new lease of the same id");
            let err = a
                .etcd
                .commit(vec![renew(one.id, NOW + 999_000)])
                .await
                .expect_err("A saw another owner's lease under this id");
            assert!(
                matches!(&err, WriteError::Conflict(why) if why.contains("stored again")),
                "{err:?}"
            );

            // Expiry: a lease renewed through B is not expired by A at its old expiry; once
            // really past it, two gateways expiring it at once end it once.
            let five = lease(5, "fwnp://host/app-05", NOW + 10_000, None);
            a.etcd
                .commit(vec![WriteOp::InsertLease(five.clone())])
                .await
                .expect("A grants lease 5");
            b.etcd
                .commit(vec![renew(five.id, NOW + 20_000)])
                .await
                .expect("B renews lease 5");
            let err = a
                .etcd
                .commit(vec![end(
                    five.id,
                    LeaseEnd::Expired,
                    NOW + 10_000,
                    "gateway",
                )])
                .await
                .expect_err("renewed elsewhere: not expired");
            assert!(
                matches!(&err, WriteError::Conflict(why) if why.contains("renewed")),
                "{err:?}"
            );
            let expire = |g: &Gateway| {
                g.etcd.commit(vec![
                    end(five.id, LeaseEnd::Expired, NOW + 20_000, "gateway"),
                    WriteOp::audit({
                        let mut e = AuditEvent::new(NOW + 20_000, AuditKind::Expiry);
                        e.lease = Some(five.id);
                        e
                    }),
                ])
            };
            let (by_a, by_b) = tokio::join!(expire(&a), expire(&b));
            assert!(
                by_a.is_ok() != by_b.is_ok(),
                "exactly one gateway expires it: {by_a:?} {by_b:?}"
            );
            let expiries = audited(&a, five.id).await + audited(&b, five.id).await;
            assert_eq!(expiries, 1, "the expiry is audited once in the cluster");
            let live = live_ids(&b).await;
            assert_eq!(live.len(), 3, "{live:?}");
            assert!(!live.contains(&five.id) && !live.contains(&two.id));
        },
    );
}

#[test]
fn concurrent_commits_are_grouped_into_few_transactions() {
    in_cluster(
        "concurrent_commits_are_grouped_into_few_transactions",
        "group",
        runtime,
        async |cluster| {
            let a = Arc::new(gateway(cluster, "gw-a", Duration::from_secs(2)).await);
            let before = a.etcd.transactions();
            let mut commits = tokio::task::JoinSet::new();
            const N: u16 = 400;
            for n in 0..N {
                let a = a.clone();
                commits.spawn(async move {
                    let new = lease(
                        n,
                        &format!("fwnp://host/h-{}", n % 50),
                        NOW + 600_000,
                        Some(8),
                    );
                    let id = new.id;
                    a.etcd
                        .commit(vec![WriteOp::InsertLease(new), grant_event(id)])
                        .await
                });
            }
            while let Some(result) = commits.join_next().await {
                result.expect("task").expect("every commit applies");
            }
            let transactions = a.etcd.transactions() - before;
            assert!(
                transactions <= u64::from(N) / 4,
                "{N} commits took {transactions} transactions"
            );
            let restored = a.etcd.restore(NOW).await.expect("listed");
            assert_eq!(restored.live.len(), usize::from(N));
            // The per-host count was kept right through the grouping: 8 per host, the ninth
            // is refused.
            let err = a
                .etcd
                .commit(vec![WriteOp::InsertLease(lease(
                    N + 1,
                    "fwnp://host/h-0",
                    NOW + 600_000,
                    Some(8),
                ))])
                .await
                .expect_err("the host holds 8");
            assert!(
                matches!(
                    err,
                    WriteError::QuotaExceeded {
                        held: 8,
                        max: 8,
                        ..
                    }
                ),
                "{err:?}"
            );
        },
    );
}

#[test]
fn what_a_gateway_knows_of_keys_changed_through_another_is_read_again() {
    in_cluster(
        "what_a_gateway_knows_of_keys_changed_through_another_is_read_again",
        "stale",
        runtime,
        async |cluster| {
            let a = gateway(cluster, "gw-a", Duration::from_secs(2)).await;
            let b = gateway(cluster, "gw-b", Duration::from_secs(2)).await;
            let web = "fwnp://host/web-02";
            let one = lease(1, web, NOW + 600_000, Some(2));
            let two = lease(2, web, NOW + 600_000, Some(2));
            for new in [&one, &two] {
                a.etcd
                    .commit(vec![WriteOp::InsertLease(new.clone())])
                    .await
                    .expect("A grants");
            }
            // A knows the lease it inserted: inserted again, it is refused as a duplicate.
            let err = a
                .etcd
                .commit(vec![WriteOp::InsertLease(one.clone())])
                .await
                .expect_err("a lease is inserted once");
            assert!(
                matches!(err, WriteError::Store(StoreError::DuplicateLease { id }) if id == one.id),
                "{err:?}"
            );

            // B releases one: A still knows the host's counter at 2, its maximum, and the
            // lease as live. The host has room again through A, and the lease is not live.
            b.etcd
                .commit(vec![end(one.id, LeaseEnd::Released, NOW, web)])
                .await
                .expect("B releases");
            let three = lease(3, web, NOW + 600_000, Some(2));
            a.etcd
                .commit(vec![WriteOp::InsertLease(three.clone())])
                .await
                .expect("the host holds one lease: A grants a second");
            let err = a
                .etcd
                .commit(vec![renew(one.id, NOW + 900_000)])
                .await
                .expect_err("released through B");
            assert!(
                matches!(err, WriteError::Store(StoreError::LeaseNotLive { id }) if id == one.id),
                "{err:?}"
            );

            // B renews two: A's expiry of it, on the expiry it knows, is refused, and its own
            // renewal goes on the revision B left.
            b.etcd
                .commit(vec![renew(two.id, NOW + 900_000)])
                .await
                .expect("B renews");
            let err = a
                .etcd
                .commit(vec![end(
                    two.id,
                    LeaseEnd::Expired,
                    NOW + 700_000,
                    "gateway",
                )])
                .await
                .expect_err("renewed through B");
            assert!(
                matches!(&err, WriteError::Conflict(why) if why.contains("renewed")),
                "{err:?}"
            );
            a.etcd
                .commit(vec![renew(two.id, NOW + 1_000_000)])
                .await
                .expect("A renews after B");

            let four = lease(4, web, NOW + 600_000, Some(2));
            for gateway in [&a, &b] {
                let err = gateway
                    .etcd
                    .commit(vec![WriteOp::InsertLease(four.clone())])
                    .await
                    .expect_err("the host holds 2");
                assert!(
                    matches!(
                        &err,
                        WriteError::QuotaExceeded {
                            held: 2,
                            max: 2,
                            ..
                        }
                    ),
                    "{err:?}"
                );
            }
            let live = b.etcd.restore(NOW).await.expect("listed").live;
            let mut ids: Vec<_> = live.iter().map(|l| (l.id, l.expires_ms)).collect();
            ids.sort();
            let mut expected = vec![(two.id, NOW + 1_000_000), (three.id, NOW + 600_000)];
            expected.sort();
            assert_eq!(ids, expected);
        },
    );
}

#[test]
fn two_gateways_racing_for_a_hosts_last_lease_slot_one_wins_each_time() {
    in_cluster(
        "two_gateways_racing_for_a_hosts_last_lease_slot_one_wins_each_time",
        "race",
        runtime,
        async |cluster| {
            let a = gateway(cluster, "gw-a", Duration::from_secs(2)).await;
            let b = gateway(cluster, "gw-b", Duration::from_secs(2)).await;
            let host = "fwnp://host/race";
            let first = lease(1, host, NOW + 600_000, Some(2));
            a.etcd
                .commit(vec![WriteOp::InsertLease(first.clone())])
                .await
                .expect("the first lease");
            const ROUNDS: u16 = 12;
            for round in 0..ROUNDS {
                let via_a = lease(100 + 2 * round, host, NOW + 600_000, Some(2));
                let via_b = lease(101 + 2 * round, host, NOW + 600_000, Some(2));
                let (from_a, from_b) = tokio::join!(
                    a.etcd.commit(vec![WriteOp::InsertLease(via_a.clone())]),
                    b.etcd.commit(vec![WriteOp::InsertLease(via_b.clone())]),
                );
                let (winner, loser, lost) = match (from_a, from_b) {
                    (Ok(()), Err(e)) => (via_a.id, &b, e),
                    (Err(e), Ok(())) => (via_b.id, &a, e),
                    other => panic!("round {round}: not exactly one winner: {other:?}"),
                };
                assert!(
                    matches!(
                        &lost,
                        WriteError::QuotaExceeded {
                            held: 2,
                            max: 2,
                            ..
                        }
                    ),
                    "round {round}: {lost:?}"
                );
                if round + 1 < ROUNDS {
                    // The slot is freed through the gateway that lost it.
                    loser
                        .etcd
                        .commit(vec![end(winner, LeaseEnd::Released, NOW, host)])
                        .await
                        .expect("the winner's lease released");
                }
            }
            for gateway in [&a, &b] {
                let live = gateway.etcd.restore(NOW).await.expect("listed").live;
                assert_eq!(live.len(), 2, "{live:?}");
                assert!(live.iter().any(|l| l.id == first.id));
            }
        },
    );
}

#[test]
fn several_batches_in_flight_commit_everything_with_the_counts_right() {
    in_cluster(
        "several_batches_in_flight_commit_everything_with_the_counts_right",
        "flight",
        runtime,
        async |cluster| {
            let a = Arc::new(gateway(cluster, "gw-a", Duration::from_secs(2)).await);
            let b = Arc::new(gateway(cluster, "gw-b", Duration::from_secs(2)).await);
            const HOSTS: u16 = 30;
            const MAX: u32 = 12;
            let host = |n: u16| format!("fwnp://host/f-{}", n % HOSTS);
            // 20 inserts per host, all at once, at most 12 each: exactly 12 per host granted.
            let mut commits = tokio::task::JoinSet::new();
            for n in 0..HOSTS * 20 {
                let a = a.clone();
                let new = lease(n, &host(n), NOW + 600_000, Some(MAX));
                commits.spawn(async move {
                    (
                        new.id,
                        n % HOSTS,
                        a.etcd.commit(vec![WriteOp::InsertLease(new)]).await,
                    )
                });
            }
            let mut granted: Vec<Vec<LeaseId>> = vec![Vec::new(); usize::from(HOSTS)];
            while let Some(done) = commits.join_next().await {
                let (id, h, result) = done.expect("task");
                match result {
                    Ok(()) => granted[usize::from(h)].push(id),
                    Err(WriteError::QuotaExceeded { max: 12, .. }) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
            for (h, ids) in granted.iter().enumerate() {
                assert_eq!(ids.len(), 12, "host {h}");
            }

            // Half of each host's leases released at once, half of those through B, which has
            // not seen them.
            let mut ends = tokio::task::JoinSet::new();
            for (h, ids) in granted.iter_mut().enumerate() {
                let h = u16::try_from(h).expect("few hosts");
                for (i, id) in ids.drain(..6).enumerate() {
                    let gateway = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let by = host(h);
                    ends.spawn(async move {
                        gateway
                            .etcd
                            .commit(vec![end(id, LeaseEnd::Released, NOW, &by)])
                            .await
                    });
                }
            }
            while let Some(done) = ends.join_next().await {
                done.expect("task").expect("every release applies");
            }

            // 10 more per host, at once: the counters say 6, so 6 more are granted each.
            let mut commits = tokio::task::JoinSet::new();
            for n in HOSTS * 20..HOSTS * 30 {
                let a = a.clone();
                let new = lease(n, &host(n), NOW + 600_000, Some(MAX));
                commits.spawn(async move {
                    (
                        n % HOSTS,
                        a.etcd.commit(vec![WriteOp::InsertLease(new)]).await.is_ok(),
                    )
                });
            }
            let mut more = vec![0u32; usize::from(HOSTS)];
            while let Some(done) = commits.join_next().await {
                let (h, ok) = done.expect("task");
                more[usize::from(h)] += u32::from(ok);
            }
            assert!(more.iter().all(|&m| m == 6), "{more:?}");
            let live = b.etcd.restore(NOW).await.expect("listed").live;
            assert_eq!(live.len(), usize::from(HOSTS) * 12);
            for h in 0..HOSTS {
                let held = live.iter().filter(|l| l.identity == host(h)).count();
                assert_eq!(held, 12, "host {h}");
            }
        },
    );
}

#[test]
fn commits_survive_one_member_lost_stop_promptly_without_quorum_and_resume() {
    const TEST: &str = "commits_survive_one_member_lost_stop_promptly_without_quorum_and_resume";
    if !available(TEST) {
        return;
    }
    let mut cluster = EtcdCluster::start("quorum").unwrap_or_else(|e| panic!("{e}"));
    let timeout = Duration::from_secs(1);
    let (a, rt) = cluster.run(|| {
        let rt = runtime();
        let a = rt.block_on(gateway(&cluster, "gw-a", timeout));
        (a, rt)
    });
    let n = std::cell::Cell::new(0u16);
    let grant = |a: &Gateway| {
        n.set(n.get() + 1);
        rt.block_on(a.etcd.commit(vec![WriteOp::InsertLease(lease(
            n.get(),
            "fwnp://host/q",
            NOW + 600_000,
            None,
        ))]))
    };
    grant(&a).expect("the cluster takes writes");

    // One member lost: the two others are a quorum. If the lost member led, the others first
    // elect a new leader, which on a loaded machine can take longer than the store's timeout;
    // what this asserts is that writes go on once the quorum has a leader, none refused.
    cluster.kill(0);
    assert!(
        cluster.wait_healthy(&[1, 2], Duration::from_secs(30)),
        "the two members left elect a leader"
    );
    for _ in 0..20 {
        grant(&a).expect("every write goes on with one member lost");
    }

    // Two lost: no quorum. A commit is refused as unavailable within the timeout (its read and
    // its transaction, each bounded), not held.
    cluster.kill(1);
    let started = Instant::now();
    let err = grant(&a).expect_err("no quorum, no write");
    let took = started.elapsed();
    assert!(matches!(err, WriteError::Unavailable(_)), "{err:?}");
    assert!(took < timeout * 3, "refused after {took:?}");
    let before = rt.block_on(a.etcd.restore(NOW));
    assert!(
        matches!(before, Err(WriteError::Unavailable(_))),
        "{before:?}"
    );

    // Back: writes are taken again.
    cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
    cluster.restart(1).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30)),
        "the cluster came back"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = grant(&a);
    while again.is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        again = grant(&a);
    }
    again.expect("writes resume with the quorum");
    // The first write, the twenty with one member lost, and the one that resumed. A write
    // refused without an answer (the one without quorum, any refused while the cluster came
    // back) may still have applied once the quorum was back, its leader having kept it: the
    // gateway ends it when it next settles what got no answer, which it does when idle.
    let granted = 1 + 20 + 1;
    fwnp_testkit::netns::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        rt.block_on(live_ids(&a)).len() == granted
    });
    let live = rt.block_on(live_ids(&a));
    assert_eq!(
        live.len(),
        granted,
        "every granted lease is there, none other"
    );
    drop(a);
}

/// A grant refused to its host because its transaction got no answer, and still on its way to
/// etcd once the gateway has settled it (found it absent), never applies: the fence the
/// gateway put first makes etcd refuse it when it arrives.
#[test]
fn a_grant_still_on_its_way_to_etcd_after_it_was_settled_never_applies() {
    in_cluster(
        "a_grant_still_on_its_way_to_etcd_after_it_was_settled_never_applies",
        "held",
        runtime,
        async |cluster| {
            let Linked {
                link,
                config,
                a,
                b,
                first_id,
            } = Linked::start(cluster).await;
            let id = link_refuses_a_grant(&link, &a, Cut::Held).await;
            // New connections pass: A settles the grant, finding it absent, behind its fence.
            link.set_cut(Cut::No);
            let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
                .await
                .expect("connected to etcd");
            let fences = format!("{}/fences/", config.prefix);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let found = client
                    .get(
                        fences.clone(),
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await
                    .expect("fences read");
                if found.count() > 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "A put no fence");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Its read of the lease follows the fence at once.
            tokio::time::sleep(config.timeout).await;
            b.etcd.restore(NOW).await.expect("restored");
            let mut changes = b.etcd.watch().expect("watching");

            // Now the held transaction reaches etcd.
            link.release_held();
            let arrived = tokio::time::timeout(Duration::from_secs(3), changes.recv()).await;
            assert!(arrived.is_err(), "nothing changes: {arrived:?}");
            assert_eq!(live_ids(&b).await, [first_id]);
            assert_eq!(audited(&a, id).await, 0, "no grant of it recorded");
        },
    );
}

/// A watch that starts from a revision etcd has compacted away can replay nothing: the gateway
/// lists the leases instead, and misses no change made since its restore.
#[test]
fn a_watch_from_a_compacted_revision_lists_the_leases_again() {
    in_cluster(
        "a_watch_from_a_compacted_revision_lists_the_leases_again",
        "compact",
        runtime,
        async |cluster| {
            let timeout = Duration::from_secs(1);
            let a = gateway(cluster, "gw-a", timeout).await;
            let b = gateway(cluster, "gw-b", timeout).await;
            let early = lease(1, "fwnp://host/c", NOW + 600_000, None);
            let early_id = early.id;
            b.etcd
                .commit(vec![WriteOp::InsertLease(early)])
                .await
                .expect("granted");
            a.etcd.restore(NOW).await.expect("restored");
            let restored_at = a.etcd.applied_revision();

            // After A's restore, through B: one lease granted, the early one released.
            let late = lease(2, "fwnp://host/c", NOW + 600_000, None);
            let late_id = late.id;
            b.etcd
                .commit(vec![WriteOp::InsertLease(late)])
                .await
                .expect("granted");
            b.etcd
                .commit(vec![end(
                    early_id,
                    LeaseEnd::Released,
                    NOW,
                    "fwnp://host/c",
                )])
                .await
                .expect("released");
            // Then etcd forgets the history A would replay.
            let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
                .await
                .expect("connected to etcd");
            let now = client
                .get("/", None)
                .await
                .expect("read")
                .header()
                .expect("a header")
                .revision();
            assert!(now > restored_at + 1, "{now} after {restored_at}");
            client
                .compact(
                    now,
                    Some(etcd_client::CompactionOptions::new().with_physical()),
                )
                .await
                .expect("compacted");

            let mut changes = a.etcd.watch().expect("watching");
            let change = next_change(&mut changes).await;
            let ClusterChange::Listed {
                live,
                ended,
                revision,
            } = change
            else {
                panic!("a list expected: {change:?}");
            };
            assert_eq!(
                live.iter().map(|l| l.id).collect::<Vec<_>>(),
                [late_id],
                "the lease granted since the restore, not the one released"
            );
            assert_eq!(
                ended.get(&early_id).map(|e| e.ending.end),
                Some(LeaseEnd::Released),
                "the release, from its tombstone"
            );
            assert!(revision >= now, "listed at {revision}, compacted at {now}");
            assert_eq!(a.etcd.applied_revision(), revision);

            // And the watch goes on from the list.
            let later = lease(3, "fwnp://host/c", NOW + 600_000, None);
            let later_id = later.id;
            b.etcd
                .commit(vec![WriteOp::InsertLease(later)])
                .await
                .expect("granted");
            let change = next_change(&mut changes).await;
            assert!(
                matches!(&change, ClusterChange::Stored { lease, .. } if lease.id == later_id),
                "{change:?}"
            );
        },
    );
}

/// A grant etcd took without its answer reaching the gateway was refused to its host: the
/// gateway ends it once etcd answers again, by itself (nothing else is committed through it
/// meanwhile), and records no grant of it.
#[test]
fn a_grant_etcd_took_unanswered_is_ended_once_it_answers_again_though_nothing_else_is_sent() {
    in_cluster(
        "a_grant_etcd_took_unanswered_is_ended_once_it_answers_again_though_nothing_else_is_sent",
        "deaf",
        runtime,
        async |cluster| {
            let Linked {
                link,
                config,
                a,
                b,
                first_id,
            } = Linked::start(cluster).await;
            b.etcd.restore(NOW).await.expect("restored");
            let mut changes = b.etcd.watch().expect("watching");
            let id = link_refuses_a_grant(&link, &a, Cut::Deaf).await;
            let change = next_change(&mut changes).await;
            assert!(
                matches!(&change, ClusterChange::Stored { lease, .. } if lease.id == id),
                "etcd took the refused grant: {change:?}"
            );
            // Long enough for the gateway's first attempts to settle it to go unanswered too.
            tokio::time::sleep(config.timeout * 3).await;

            link.set_cut(Cut::No);
            let change = next_change(&mut changes).await;
            let ClusterChange::Ended { id: ended, end, .. } = change else {
                panic!("nothing but the end expected: {change:?}");
            };
            assert_eq!(ended, id, "the refused grant is ended, and it alone");
            let ending = end.expect("its tombstone").ending;
            assert_eq!(ending.end, LeaseEnd::Released);
            assert_eq!(
                ending.why.as_deref(),
                Some("granted by a transaction reported failed")
            );
            assert_eq!(live_ids(&b).await, [first_id]);
            // Before reading the lease, A put the fence its transaction compared absent, so
            // that it cannot apply any more; it goes by itself, as tombstones do.
            let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
                .await
                .expect("connected to etcd");
            let fences = client
                .get(
                    format!("{}/fences/", config.prefix),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .expect("fences read");
            assert_eq!(fences.kvs().len(), 1, "one transaction went unanswered");
            assert_ne!(fences.kvs()[0].lease(), 0, "the fence goes by itself");
            assert_eq!(audited(&a, first_id).await, 1);
            assert_eq!(
                audited(&a, id).await,
                0,
                "no grant of the refused one recorded"
            );
        },
    );
}

#[test]
fn the_store_speaks_tls_to_etcd_with_a_client_certificate_and_is_refused_without_one() {
    const TEST: &str =
        "the_store_speaks_tls_to_etcd_with_a_client_certificate_and_is_refused_without_one";
    if !available(TEST) {
        return;
    }
    let ca = tempfile::tempdir().expect("temp dir");
    pki::init_ca(ca.path(), "etcd test CA", Validity::days(1)).expect("CA");
    pki::issue_gateway(
        ca.path(),
        "member",
        &["localhost".to_owned()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        Validity::days(1),
    )
    .expect("member certificate");
    pki::issue_host(ca.path(), "gw-a", &[], &[], &[], Validity::days(1)).expect("client");
    let file = |name: &str| ca.path().join(name);
    let cluster = EtcdCluster::start_with(
        "tls",
        EtcdOptions {
            members: 1,
            tls: Some(MemberTls {
                ca: file("ca.pem"),
                cert: file("member.pem"),
                key: file("member.key"),
                client_cert: file("gw-a.pem"),
                client_key: file("gw-a.key"),
            }),
            ..EtcdOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    cluster.run(|| {
        runtime().block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let local = Store::open(dir.path()).expect("local store");
            let mut config = cluster.config("gw-a", Duration::from_secs(2));
            assert!(config.endpoints.iter().all(|e| e.starts_with("https://")));
            config.tls = Some(EtcdTls {
                ca: file("ca.pem"),
                client: Some((file("gw-a.pem"), file("gw-a.key"))),
            });
            let store = EtcdStore::connect(&config, local.writer().clone())
                .await
                .expect("connected over TLS");
            let new = lease(1, "fwnp://host/tls", NOW + 600_000, None);
            store
                .commit(vec![WriteOp::InsertLease(new.clone())])
                .await
                .expect("a commit over TLS");
            let live = store.restore(NOW).await.expect("listed").live;
            assert_eq!(live.len(), 1);
            assert_eq!(live[0].id, new.id);

            // The members require a client certificate: without one, no connection, and the
            // gateway is told so within its timeout.
            config.tls = Some(EtcdTls {
                ca: file("ca.pem"),
                client: None,
            });
            let started = Instant::now();
            let refused = EtcdStore::connect(&config, local.writer().clone()).await;
            assert!(
                matches!(refused, Err(fwnp_gateway::store::EtcdError::Unreachable { .. })),
                "{refused:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            // A missing TLS file is named.
            config.tls = Some(EtcdTls {
                ca: file("missing.pem"),
                client: None,
            });
            let missing = EtcdStore::connect(&config, local.writer().clone()).await;
            assert!(
                matches!(&missing, Err(fwnp_gateway::store::EtcdError::ReadTls { path, .. }) if path.ends_with("missing.pem")),
                "{missing:?}"
            );
        });
    });
}
