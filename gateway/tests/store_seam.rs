//! The lease store seam: one contract for writes and one for reads, run against every backend
//! (the SQLite store and the in-memory one), so that a new backend is checked by the same
//! tests; the refusals a cluster backend may give, typed; and the gateway serving over real
//! QUIC with the in-memory backend for writes and reads, whose refusal turns a grant into
//! no-resources without leaving a lease behind.
//!
//! With a real kernel filter in a network namespace of its own (root only; skipped otherwise, a
//! failure under `FWNP_REQUIRE_NETNS=1`): a new lease's kernel hold and store commit run at the
//! same time, one after the other once many requests are in flight, and a lease the store
//! committed while the kernel refused it is ended in the store with the reason in its audit
//! record.

mod common;
mod etcd_cluster;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::{
    Client, HOSTS_POLICY, Pki, config_text, denied, granted, serve_on_loopback, tcp, temp_dir,
    write_policy,
};
use etcd_cluster::StoreConfig;
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::{AT_ONCE_IN_FLIGHT, Service};
use fwnp_proto::ResultCode;
use fwnp_trust::tls::ServerOptions;

use fwnp_gateway::store::{
    AuditEvent, AuditKind, AuditQuery, LeaseEnd, LeaseFilter, LeaseState, LeaseStore, MemoryStore,
    NewLease, Order, Outcome, ReportQuery, RequestSummary, Store, StoreError, StoreQueries,
    WriteError, WriteOp,
};
use fwnp_netfilter::{Batcher, BatcherConfig, Layout, Netfilter, Ownership};
use fwnp_proto::{AppInfo, Grant, LeaseId, PortRange, Protocol, ResultCode as Code};
use fwnp_testkit::netns::{Netns, require_root};
use fwnp_trust::identity::{CertificateName, Serial};

const NOW: u64 = 1_700_000_000_000;

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn new_lease(n: u8, expires_ms: u64) -> NewLease {
    NewLease {
        id: LeaseId([n; 16]),
        identity: format!("fwnp://host/web-{n:02}"),
        peer: Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
            40000,
        )),
        grants: vec![Grant {
            protocol: Protocol::Tcp,
            ports: PortRange::single(7000 + u16::from(n)),
            host: IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
            remotes: Vec::new(),
            app: None,
        }],
        app: None,
        requested_lifetime: None,
        granted_lifetime: 600,
        created_ms: NOW - 1_000,
        expires_ms,
        certificate: None,
        max_leases: None,
    }
}

fn grant_event(n: u8) -> WriteOp {
    let mut event = AuditEvent::new(NOW, AuditKind::Grant);
    event.lease = Some(LeaseId([n; 16]));
    WriteOp::audit(event)
}

/// What every backend does: commits all or nothing, refuses to insert a lease twice or to
/// renew or end one that is not live, and restores the live leases (recording those past
/// their expiry as expired) under an epoch that stays the same.
fn contract(store: &dyn LeaseStore) {
    let epoch = store.epoch();
    block_on(store.commit(vec![
        WriteOp::InsertLease(new_lease(1, NOW + 600_000)),
        grant_event(1),
    ]))
    .expect("a new lease is stored");
    block_on(store.commit(vec![WriteOp::InsertLease(new_lease(2, NOW + 5_000))]))
        .expect("a second lease is stored");
    block_on(store.commit(vec![WriteOp::InsertLease(new_lease(3, NOW + 600_000))]))
        .expect("a third lease is stored");

    // All or nothing: a duplicate in the batch leaves the new lease of the batch out too.
    let err = block_on(store.commit(vec![
        WriteOp::InsertLease(new_lease(4, NOW + 600_000)),
        WriteOp::InsertLease(new_lease(1, NOW + 600_000)),
    ]))
    .expect_err("a lease inserted twice is refused");
    assert!(
        matches!(err, WriteError::Store(StoreError::DuplicateLease { id }) if id == LeaseId([1; 16])),
        "{err:?}"
    );
    block_on(store.commit(vec![WriteOp::EndLease {
        id: LeaseId([3; 16]),
        end: LeaseEnd::Released,
        ended_ms: NOW,
        by: None,
        why: None,
    }]))
    .expect("a live lease ends");
    let err = block_on(store.commit(vec![WriteOp::RenewLease {
        id: LeaseId([3; 16]),
        renewed_ms: NOW,
        expires_ms: NOW + 900_000,
        granted_lifetime: 900,
        certificate: None,
    }]))
    .expect_err("an ended lease is not renewed");
    assert!(
        matches!(err, WriteError::Store(StoreError::LeaseNotLive { .. })),
        "{err:?}"
    );

    store
        .record(vec![grant_event(9)])
        .expect("an audit record is queued");

    // Restored ten seconds later: lease 2 ran out meanwhile.
    let restored = block_on(store.restore(NOW + 10_000)).expect("restored");
    let live: Vec<LeaseId> = restored.live.iter().map(|l| l.id).collect();
    assert_eq!(live, vec![LeaseId([1; 16])], "only the live lease");
    assert_eq!(restored.live[0].expires_ms, NOW + 600_000);
    assert_eq!(restored.live[0].identity, "fwnp://host/web-01");
    assert_eq!(restored.expired.len(), 1);
    assert_eq!(restored.expired[0].id, LeaseId([2; 16]));
    assert_eq!(restored.expired[0].state, LeaseState::Expired);
    assert_eq!(store.epoch(), epoch);
}

#[test]
fn the_sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    contract(&store);
}

#[test]
fn the_etcd_store_keeps_the_contract() {
    on_etcd_store("the_etcd_store_keeps_the_contract", "seam", |store| {
        contract(store)
    });
}

/// Runs `body` on an etcd store (site `gw-a`) over a one-member cluster of its own, named
/// after `tag`, unless etcd is not installed (then `test` is skipped, as it says).
fn on_etcd_store(test: &str, tag: &str, body: impl FnOnce(&fwnp_gateway::store::EtcdStore) + Send) {
    if !etcd_cluster::available(test) {
        return;
    }
    let cluster = etcd_cluster::EtcdCluster::single(tag).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let local = Store::open(dir.path()).expect("local store");
    cluster.run(|| {
        let config = cluster.config("gw-a", std::time::Duration::from_secs(2));
        let store = block_on(fwnp_gateway::store::EtcdStore::connect(
            &config,
            local.writer().clone(),
        ))
        .expect("connected");
        body(&store);
    });
}

#[test]
fn the_memory_store_keeps_the_contract() {
    let store = MemoryStore::new(0x5eed);
    contract(&store);
    assert_eq!(store.epoch(), 0x5eed);
    // The audit records of the commits that applied, and the one recorded.
    let leases: Vec<_> = store.audit().iter().filter_map(|e| e.lease).collect();
    assert_eq!(leases, vec![LeaseId([1; 16]), LeaseId([9; 16])]);
}

/// An Open's audit event as the request path writes it: a grant of lease `n`, or a denial.
fn open_event(n: u8, time_ms: u64, port: u16, lease: Option<u8>) -> WriteOp {
    let kind = if lease.is_some() {
        AuditKind::Grant
    } else {
        AuditKind::Decision
    };
    let mut event = AuditEvent::new(time_ms, kind);
    event.identity = Some(format!("fwnp://host/web-{n:02}"));
    event.outcome = Some(if lease.is_some() {
        Outcome::Granted
    } else {
        Outcome::Denied
    });
    event.code = lease.is_none().then_some(Code::NotAuthorized);
    event.lease = lease.map(|l| LeaseId([l; 16]));
    event.app = Some(AppInfo {
        name: Some("nginx".into()),
        executable: Some("/usr/sbin/nginx".into()),
        uid: None,
        pid: None,
    });
    event.request = Some(RequestSummary {
        protocol: Some(Protocol::Tcp),
        ports: Some(PortRange::single(port)),
        app_id: None,
        hosts: Vec::new(),
        remotes: Vec::new(),
        lifetime: Some(300),
    });
    if let Some(l) = lease {
        event.grants = new_lease(l, 0).grants;
    }
    WriteOp::audit(event)
}

fn ids(leases: &[fwnp_gateway::store::LeaseRecord]) -> Vec<LeaseId> {
    leases.iter().map(|l| l.id).collect()
}

/// What every backend answers to the admin API's reads, over the same writes: leases by id
/// and by filter (host exact or glob, application, port and protocol, certificate serial,
/// ended or not, a limit), soonest expiry first; the live count; audit pages in both orders
/// with their cursors and filters, and following; the usage report; the writer's counters;
/// and pruning old records.
fn reads_contract<S: LeaseStore + StoreQueries>(store: &S) {
    let serial = Serial::parse("0a1b").expect("serial");
    let mut one = new_lease(1, NOW + 600_000);
    one.app = Some(AppInfo {
        name: Some("nginx".into()),
        executable: None,
        uid: None,
        pid: None,
    });
    one.certificate = Some(Arc::new(CertificateName {
        issuer: vec![1, 2, 3],
        serial: serial.clone(),
    }));
    let mut two = new_lease(2, NOW + 300_000);
    two.grants[0].protocol = Protocol::Udp;
    let mut three = new_lease(13, NOW + 900_000);
    three.identity = "fwnp://host/db-13".into();
    three.created_ms = NOW - 100_000;
    block_on(store.commit(vec![
        WriteOp::InsertLease(one),
        open_event(1, NOW - 1_000, 7001, Some(1)),
        WriteOp::InsertLease(two),
        open_event(2, NOW - 900, 7002, Some(2)),
        WriteOp::InsertLease(three),
        open_event(2, NOW - 800, 9999, None),
    ]))
    .expect("stored");
    block_on(store.commit(vec![WriteOp::EndLease {
        id: LeaseId([13; 16]),
        end: LeaseEnd::Released,
        ended_ms: NOW - 40_000,
        by: Some("fwnp://host/db-13".into()),
        why: None,
    }]))
    .expect("ended");

    // Leases.
    let one = store
        .lease(LeaseId([1; 16]))
        .expect("read")
        .expect("lease 1 is there");
    assert_eq!(one.identity, "fwnp://host/web-01");
    assert_eq!(one.state, LeaseState::Live);
    assert_eq!(store.lease(LeaseId([99; 16])).expect("read"), None);
    let ended = store
        .lease(LeaseId([13; 16]))
        .expect("read")
        .expect("an ended lease stays");
    assert_eq!(ended.state, LeaseState::Released);
    assert_eq!(ended.ending.map(|e| e.ended_ms), Some(NOW - 40_000));
    let leases = |filter: LeaseFilter| ids(&store.leases(&filter).expect("leases"));
    let (l1, l2, l13) = (LeaseId([1; 16]), LeaseId([2; 16]), LeaseId([13; 16]));
    assert_eq!(
        leases(LeaseFilter::default()),
        vec![l2, l1],
        "live, soonest first"
    );
    assert_eq!(ids(&store.live_leases().expect("live")), vec![l2, l1]);
    assert_eq!(store.live_lease_count().expect("count"), 2);
    let all = LeaseFilter {
        include_ended: true,
        ..LeaseFilter::default()
    };
    assert_eq!(leases(all.clone()), vec![l2, l1, l13]);
    let host = |h: &str| LeaseFilter {
        host: Some(h.into()),
        ..all.clone()
    };
    assert_eq!(leases(host("fwnp://host/web-01")), vec![l1]);
    assert_eq!(leases(host("fwnp://host/web-*")), vec![l2, l1]);
    assert_eq!(leases(host("fwnp://host/*-1?")), vec![l13]);
    assert_eq!(leases(host("fwnp://host/web-0[2-9]")), vec![l2]);
    assert_eq!(leases(host("fwnp://host/web")), vec![]);
    assert_eq!(
        leases(LeaseFilter {
            app: Some("nginx".into()),
            ..all.clone()
        }),
        vec![l1]
    );
    assert_eq!(
        leases(LeaseFilter {
            port: Some(7002),
            ..all.clone()
        }),
        vec![l2]
    );
    assert_eq!(
        leases(LeaseFilter {
            port: Some(7002),
            protocol: Some(Protocol::Tcp),
            ..all.clone()
        }),
        vec![],
        "port and protocol of the same grant"
    );
    assert_eq!(
        leases(LeaseFilter {
            protocol: Some(Protocol::Tcp),
            ..all.clone()
        }),
        vec![l1, l13]
    );
    assert_eq!(
        leases(LeaseFilter {
            certificate_serial: Some(serial),
            ..all.clone()
        }),
        vec![l1]
    );
    assert_eq!(
        leases(LeaseFilter {
            limit: Some(2),
            ..all.clone()
        }),
        vec![l2, l1]
    );

    // Audit pages: newest first by default, the cursor continuing where a full page stopped.
    let page = store
        .audit(&AuditQuery {
            limit: 2,
            ..AuditQuery::default()
        })
        .expect("audit");
    let times: Vec<u64> = page.events.iter().map(|r| r.event.time_ms).collect();
    assert_eq!(times, vec![NOW - 800, NOW - 900]);
    let cursor = page.next_cursor.expect("a full page has a cursor");
    let rest = store
        .audit(&AuditQuery {
            limit: 2,
            cursor: Some(cursor),
            ..AuditQuery::default()
        })
        .expect("audit");
    let times: Vec<u64> = rest.events.iter().map(|r| r.event.time_ms).collect();
    assert_eq!(times, vec![NOW - 1_000]);
    assert_eq!(rest.next_cursor, None, "the last page is not full");
    let first_id = rest.events[0].id;
    let audit = |q: AuditQuery| -> Vec<u64> {
        store
            .audit(&q)
            .expect("audit")
            .events
            .iter()
            .map(|r| r.event.time_ms)
            .collect()
    };
    assert_eq!(
        audit(AuditQuery {
            order: Order::OldestFirst,
            ..AuditQuery::default()
        }),
        vec![NOW - 1_000, NOW - 900, NOW - 800]
    );
    assert_eq!(
        audit(AuditQuery {
            host: Some("fwnp://host/web-02".into()),
            ..AuditQuery::default()
        }),
        vec![NOW - 800, NOW - 900]
    );
    assert_eq!(
        audit(AuditQuery {
            outcomes: vec![Outcome::Denied],
            ..AuditQuery::default()
        }),
        vec![NOW - 800]
    );
    assert_eq!(
        audit(AuditQuery {
            kinds: vec![AuditKind::Grant],
            port: Some(7001),
            ..AuditQuery::default()
        }),
        vec![NOW - 1_000]
    );
    assert_eq!(
        audit(AuditQuery {
            port: Some(9999),
            ..AuditQuery::default()
        }),
        vec![NOW - 800],
        "the port asked, though nothing was granted"
    );
    assert_eq!(
        audit(AuditQuery {
            lease: Some(l2),
            ..AuditQuery::default()
        }),
        vec![NOW - 900]
    );
    assert_eq!(
        audit(AuditQuery {
            app: Some("/usr/sbin/nginx".into()),
            since_ms: Some(NOW - 900),
            until_ms: Some(NOW - 800),
            ..AuditQuery::default()
        }),
        vec![NOW - 900]
    );
    let followed = store
        .audit_follow(first_id, &AuditQuery::default(), 10)
        .expect("follow");
    let times: Vec<u64> = followed.iter().map(|r| r.event.time_ms).collect();
    assert_eq!(
        times,
        vec![NOW - 900, NOW - 800],
        "after the cursor, oldest first"
    );
    assert_eq!(
        *store.audit_watch().borrow(),
        followed[1].id,
        "the watch holds the newest event's id"
    );

    // The usage report: one row per host and opening, the denial counted with its host.
    let rows = store.report(&ReportQuery::default(), NOW).expect("report");
    let summary: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.identity.as_str(),
                r.ports.map(|p| p.first),
                r.granted,
                r.denied,
                r.leases,
                r.total_held_ms,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("fwnp://host/web-01", Some(7001), 1, 0, 1, 1_000),
            ("fwnp://host/web-02", Some(7002), 1, 0, 1, 1_000),
            ("fwnp://host/web-02", Some(9999), 0, 1, 0, 0),
        ]
    );
    assert!(rows.iter().all(|r| r.app.as_deref() == Some("nginx")));
    assert_eq!(rows[0].max_lifetime_asked, Some(300));
    let only = store
        .report(
            &ReportQuery {
                host: Some("fwnp://host/*-01".into()),
                since_ms: Some(NOW - 2_000),
                ..ReportQuery::default()
            },
            NOW,
        )
        .expect("report");
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].identity, "fwnp://host/web-01");

    let stats = store.writer_stats();
    assert!(stats.transactions >= 2 && stats.ops >= 7, "{stats:?}");

    // Pruning: the events before the middle one and the lease ended before then go.
    let (events, leases_pruned) = block_on(store.prune(NOW - 900, 1)).expect("pruned");
    assert_eq!((events, leases_pruned), (1, 1));
    assert_eq!(store.lease(l13).expect("read"), None);
    assert_eq!(audit(AuditQuery::default()), vec![NOW - 800, NOW - 900]);
    assert_eq!(store.live_lease_count().expect("count"), 2);
}

#[test]
fn the_sqlite_store_answers_the_reads_contract() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    reads_contract(&store);
}

#[test]
fn the_memory_store_answers_the_reads_contract() {
    reads_contract(&MemoryStore::new(7));
}

/// Three live leases, two of them expiring in the same millisecond and stored with the larger
/// id first, one expiring sooner; returns their ids in the order every listing gives them:
/// soonest expiry first, then by lease id, whatever the order they were stored in.
fn commit_tied_leases(store: &dyn LeaseStore) -> Vec<LeaseId> {
    block_on(store.commit(vec![
        WriteOp::InsertLease(new_lease(9, NOW + 600_000)),
        WriteOp::InsertLease(new_lease(3, NOW + 600_000)),
        WriteOp::InsertLease(new_lease(5, NOW + 300_000)),
    ]))
    .expect("stored");
    vec![LeaseId([5; 16]), LeaseId([3; 16]), LeaseId([9; 16])]
}

/// The listings of the admin API and of a restore break ties in expiry by the lease id.
fn ties_contract<S: LeaseStore + StoreQueries>(store: &S) {
    let order = commit_tied_leases(store);
    assert_eq!(
        ids(&store.leases(&LeaseFilter::default()).expect("leases")),
        order
    );
    assert_eq!(
        ids(&store
            .leases(&LeaseFilter {
                limit: Some(2),
                ..LeaseFilter::default()
            })
            .expect("leases")),
        order[..2],
        "a limit keeps the first in that order"
    );
    assert_eq!(ids(&store.live_leases().expect("live")), order);
    assert_eq!(
        ids(&block_on(store.restore(NOW)).expect("restored").live),
        order
    );
}

#[test]
fn the_sqlite_store_lists_leases_of_one_expiry_by_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    ties_contract(&store);
}

#[test]
fn the_memory_store_lists_leases_of_one_expiry_by_id() {
    ties_contract(&MemoryStore::new(7));
}

#[test]
fn the_etcd_store_lists_leases_of_one_expiry_by_id() {
    on_etcd_store(
        "the_etcd_store_lists_leases_of_one_expiry_by_id",
        "ties",
        |store| {
            let order = commit_tied_leases(store);
            let leases =
                |filter: LeaseFilter| ids(&block_on(store.leases(&filter)).expect("leases"));
            assert_eq!(leases(LeaseFilter::default()), order);
            assert_eq!(
                leases(LeaseFilter {
                    limit: Some(2),
                    ..LeaseFilter::default()
                }),
                order[..2]
            );
            assert_eq!(
                ids(&block_on(store.restore(NOW)).expect("restored").live),
                order
            );
        },
    );
}

#[test]
fn a_store_without_quorum_refuses_writes_typed_and_applies_none() {
    let store = MemoryStore::new(1);
    store.refuse_writes(Some("lost quorum"));
    let err = block_on(store.commit(vec![WriteOp::InsertLease(new_lease(1, NOW + 1_000))]))
        .expect_err("refused");
    assert!(matches!(&err, WriteError::Unavailable(why) if why == "lost quorum"));
    assert!(matches!(
        store.record(vec![grant_event(1)]),
        Err(WriteError::Unavailable(_))
    ));
    assert!(store.leases().is_empty() && store.audit().is_empty());
    assert_eq!(store.commits(), 0);
    store.refuse_writes(None);
    block_on(store.commit(vec![WriteOp::InsertLease(new_lease(1, NOW + 1_000))]))
        .expect("taken again");
    assert_eq!(store.leases().len(), 1);
}

#[tokio::test]
async fn a_gateway_on_the_memory_store_grants_and_a_refused_write_grants_nothing() {
    let pki = Pki::new("seam");
    let dir = temp_dir("seam");
    let policy_path = dir.path().join("policy.toml");
    write_policy(&policy_path, HOSTS_POLICY);
    let text = config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false");
    let config = GatewayConfig::parse(&text, "seam.toml").expect("valid config");
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let service = Service::start_with_store(config, None, memory.clone(), memory.clone())
        .await
        .expect("service starts");
    assert_eq!(service.epoch(), 0xfeed, "the epoch is the backend's");
    let (endpoint, addr, serving) = serve_on_loopback(&pki, &service, &ServerOptions::default());

    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let client = Client::connect(addr, &pki.host("web-01", &[host], &[], &[])).await;
    client.hello().await;
    let lease = granted(client.open(tcp(7001), None).await).lease;
    assert!(
        memory
            .leases()
            .iter()
            .any(|l| l.id == lease && l.state == LeaseState::Live),
        "the grant was committed to the backend before it was answered"
    );
    assert!(
        memory
            .audit()
            .iter()
            .any(|e| e.kind == AuditKind::Grant && e.lease == Some(lease))
    );
    // The admin API reads the same backend.
    let listed = service
        .leases(&std::collections::HashMap::new())
        .await
        .expect("the admin API's lease listing");
    let listed: Vec<&str> = listed.leases.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(listed, vec![lease.to_string()]);
    assert_eq!(service.status().store, "memory");

    // The backend loses its quorum: nothing new is granted, and the book keeps no lease the
    // store lacks.
    memory.refuse_writes(Some("lost quorum"));
    let d = denied(client.open(tcp(7002), None).await);
    assert_eq!(d.code, ResultCode::NoResources, "{d:?}");
    assert!(d.reason.is_some_and(|r| r.contains("lost quorum")));
    memory.refuse_writes(None);
    assert_eq!(
        client.list().await.leases.len(),
        1,
        "only the committed lease"
    );
    granted(client.open(tcp(7002), None).await);
    assert_eq!(memory.leases().len(), 2);

    endpoint.close(0u32.into(), b"done");
    serving.abort();
}

/// The memory store, except that its restore hands every live lease over twice: what a
/// backend whose rows are not unique by lease id would give the service.
#[derive(Debug)]
struct EveryLeaseTwice(Arc<MemoryStore>);

impl LeaseStore for EveryLeaseTwice {
    fn epoch(&self) -> fwnp_proto::Epoch {
        LeaseStore::epoch(&*self.0)
    }

    fn restore(
        &self,
        now_ms: u64,
    ) -> fwnp_gateway::store::WriteFuture<'_, fwnp_gateway::store::Restored> {
        Box::pin(async move {
            let mut restored = self.0.restore(now_ms).await?;
            let again = restored.live.clone();
            restored.live.extend(again);
            Ok(restored)
        })
    }

    fn commit(&self, ops: Vec<WriteOp>) -> fwnp_gateway::store::WriteFuture<'static, ()> {
        self.0.commit(ops)
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        self.0.record(ops)
    }
}

#[tokio::test]
async fn a_restored_lease_the_book_does_not_load_is_counted_and_audited() {
    let pki = Pki::new("seam-twice");
    let dir = temp_dir("seam-twice");
    write_policy(&dir.path().join("policy.toml"), HOSTS_POLICY);
    let text = config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false");
    let config = GatewayConfig::parse(&text, "seam.toml").expect("valid config");
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let now = fwnp_gateway::store::now_ms();
    let mut lease = new_lease(1, now + 600_000);
    lease.created_ms = now - 1_000;
    memory
        .commit(vec![WriteOp::InsertLease(lease)])
        .await
        .expect("stored");
    let service = Service::start_with_store(
        config,
        None,
        memory.clone(),
        Arc::new(EveryLeaseTwice(memory.clone())),
    )
    .await
    .expect("service starts");

    // The first copy is in force, the second is said, not dropped in silence.
    assert_eq!(service.status().live_leases, 1);
    let metrics = service.render_metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l == "fwnp_restore_unloaded_leases_total{why=\"duplicate\"} 1"),
        "{metrics}"
    );
    let id = LeaseId([1; 16]);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let audited = loop {
        let found: Vec<AuditEvent> = memory
            .audit()
            .into_iter()
            .filter(|e| e.kind == AuditKind::Reconcile && e.lease == Some(id))
            .collect();
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            break found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(audited.len(), 1, "{audited:?}");
    let event = &audited[0];
    assert_eq!(event.outcome, Some(Outcome::Error));
    assert_eq!(event.identity.as_deref(), Some("fwnp://host/web-01"));
    assert_eq!(
        event.reason.as_deref(),
        Some("start: lease not restored: the store holds another live lease with this id")
    );
}

/// The memory store, except that a commit that inserts a lease waits until the test lets it
/// go, and says which lease it holds back: the time between a lease entering the book and
/// reaching the store, held open.
#[derive(Debug)]
struct InsertsWait {
    memory: Arc<MemoryStore>,
    held: tokio::sync::mpsc::UnboundedSender<LeaseId>,
    go: Arc<tokio::sync::Notify>,
}

impl LeaseStore for InsertsWait {
    fn epoch(&self) -> fwnp_proto::Epoch {
        LeaseStore::epoch(&*self.memory)
    }

    fn restore(
        &self,
        now_ms: u64,
    ) -> fwnp_gateway::store::WriteFuture<'_, fwnp_gateway::store::Restored> {
        self.memory.restore(now_ms)
    }

    fn commit(&self, ops: Vec<WriteOp>) -> fwnp_gateway::store::WriteFuture<'static, ()> {
        let inserted = ops.iter().find_map(|op| match op {
            WriteOp::InsertLease(lease) => Some(lease.id),
            _ => None,
        });
        let memory = self.memory.clone();
        let Some(id) = inserted else {
            return memory.commit(ops);
        };
        let _ = self.held.send(id);
        let go = self.go.clone();
        Box::pin(async move {
            go.notified().await;
            memory.commit(ops).await
        })
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        self.memory.record(ops)
    }
}

/// A lease revoked after it entered the book but before the store had it: the revocation's
/// end is committed after the lease's insert, so that the store does not keep as live (and a
/// restart does not bring back) a lease that was revoked, and the revocation is audited.
#[tokio::test]
async fn a_lease_revoked_on_its_way_to_the_store_is_stored_ended() {
    let pki = Pki::new("seam-race");
    let dir = temp_dir("seam-race");
    write_policy(&dir.path().join("policy.toml"), HOSTS_POLICY);
    let text = config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false");
    let config = GatewayConfig::parse(&text, "seam.toml").expect("valid config");
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let (held, mut holding) = tokio::sync::mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Notify::new());
    let store = Arc::new(InsertsWait {
        memory: memory.clone(),
        held,
        go: go.clone(),
    });
    let service = Service::start_with_store(config, None, memory.clone(), store)
        .await
        .expect("service starts");
    let (endpoint, addr, serving) = serve_on_loopback(&pki, &service, &ServerOptions::default());
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let client = Arc::new(Client::connect(addr, &pki.host("web-01", &[host], &[], &[])).await);
    client.hello().await;
    let opening = tokio::spawn({
        let client = client.clone();
        async move { client.open(tcp(7001), None).await }
    });
    let id = tokio::time::timeout(std::time::Duration::from_secs(10), holding.recv())
        .await
        .expect("the lease's insert reaches the store")
        .expect("the store is up");
    assert!(
        service
            .revoke(
                &id,
                fwnp_proto::RevokeReason::Operator,
                "operator",
                Some("revoked on its way to the store".into())
            )
            .await
            .is_some(),
        "the lease is in the book while its insert waits"
    );
    go.notify_one();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), opening)
        .await
        .expect("the Open is answered")
        .expect("the Open's task");
    // The host may be told Granted (its Revoked notice says the rest, spec Section 8.1): what
    // matters is what the store keeps.
    drop(answer);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let (lease, audited) = loop {
        let lease = memory.leases().into_iter().find(|l| l.id == id);
        let audited = memory
            .audit()
            .into_iter()
            .any(|e| e.kind == AuditKind::Revocation && e.lease == Some(id));
        let ended = lease.as_ref().is_some_and(|l| l.state != LeaseState::Live);
        if (ended && audited) || tokio::time::Instant::now() >= deadline {
            break (lease, audited);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let lease = lease.expect("the lease was stored");
    assert_eq!(
        lease.state,
        LeaseState::Revoked,
        "a revoked lease is not live in the store: {lease:?}"
    );
    assert!(
        matches!(
            lease.ending.as_ref().map(|e| &e.end),
            Some(LeaseEnd::Revoked(fwnp_proto::RevokeReason::Operator))
        ),
        "{lease:?}"
    );
    assert!(audited, "the revocation is audited: {:?}", memory.audit());
    assert_eq!(service.status().live_leases, 0);
    endpoint.close(0u32.into(), b"done");
    serving.abort();
}

const FILTER: &str = "[filter]\nenabled = true\ntable = \"fwnp\"\nprotected = [\"198.51.100.0/24\"]\nrefuse = \"drop\"";

/// The gateway's filter in `netns`, on a table anyone there may change (`Shared`), so that the
/// test can take it away from the gateway.
fn filter_in(netns: &Netns, layout: &Layout) -> Batcher {
    netns.run(|| {
        let mut netfilter = Netfilter::open().expect("netlink in the namespace");
        netfilter.set_ownership(Ownership::Shared);
        netfilter.apply(layout, &[]).expect("the gateway's table");
        Batcher::start(netfilter, layout.clone(), BatcherConfig::default()).expect("batcher")
    })
}

/// Replaces the gateway's table by one that belongs to a handle of the test's own: while that
/// handle lives, the kernel refuses every change the gateway makes to the table, its repairs
/// included.
fn take_the_table(netns: &Netns, layout: &Layout) -> Netfilter {
    netns.run(|| {
        let mut owner = Netfilter::open().expect("netlink in the namespace");
        owner.apply(layout, &[]).expect("the table taken over");
        assert_eq!(
            owner.ownership(),
            Ownership::Owned,
            "this kernel has no owned tables (6.9 and later have)"
        );
        owner
    })
}

/// The ports the kernel's lease elements open.
fn kernel_ports(kernel: &mut Netfilter, layout: &Layout) -> Vec<u16> {
    kernel
        .elements(layout)
        .expect("the elements read")
        .iter()
        .map(|(element, _)| element.ports.first)
        .collect()
}

/// A gateway on the memory store's contents through `store`, its filter in a namespace of its
/// own, serving on loopback: the namespace, the table's layout, the service and what serves it.
struct KernelSeam {
    netns: Netns,
    layout: Layout,
    service: Arc<Service>,
    endpoint: quinn::Endpoint,
    serving: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl KernelSeam {
    async fn start(
        label: &str,
        policy: &str,
        memory: Arc<MemoryStore>,
        store: impl FnOnce(&Netns, &Layout) -> Arc<dyn LeaseStore>,
    ) -> KernelSeam {
        let netns = Netns::new(label).expect("a namespace");
        let pki = Pki::new(label);
        let dir = temp_dir(label);
        write_policy(&dir.path().join("policy.toml"), policy);
        let text = config_text(&pki, dir.path(), "127.0.0.1:0", FILTER);
        let config = GatewayConfig::parse(&text, "seam.toml").expect("valid config");
        let layout = fwnp_gateway::daemon::layout(&config);
        let filter = filter_in(&netns, &layout);
        let store = store(&netns, &layout);
        let service = Service::start_with_store(config, Some(filter), memory, store)
            .await
            .expect("service starts");
        let (endpoint, addr, serving) =
            serve_on_loopback(&pki, &service, &ServerOptions::default());
        KernelSeam {
            netns,
            layout,
            service,
            endpoint,
            serving,
            addr,
            pki,
            _dir: dir,
        }
    }

    async fn host(&self) -> Client {
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let client = Client::connect(self.addr, &self.pki.host("web-01", &[host], &[], &[])).await;
        client.hello().await;
        client
    }
}

impl Drop for KernelSeam {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
        self.serving.abort();
    }
}

/// The kernel refuses a new lease's element while the store commits the lease (the two at
/// once): the host is refused as when the kernel fails alone, and the store does not keep the
/// lease live (a restart would put it in the kernel, operators would list it): it is ended
/// there, revoked by the gateway, with the kernel's failure in its record, after its Granted
/// record and before the refusal's.
#[tokio::test]
async fn a_lease_the_store_committed_and_the_kernel_refused_is_ended_in_the_store() {
    const TEST: &str = "a_lease_the_store_committed_and_the_kernel_refused_is_ended_in_the_store";
    if !require_root(TEST) {
        return;
    }
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let seam = KernelSeam::start("seam-kernel", HOSTS_POLICY, memory.clone(), |_, _| {
        memory.clone()
    })
    .await;
    let client = seam.host().await;
    let kept = granted(client.open(tcp(7001), None).await).lease;

    let _owner = take_the_table(&seam.netns, &seam.layout);
    let d = denied(client.open(tcp(7002), None).await);
    assert_eq!(
        (d.code, d.retry_after),
        (ResultCode::NoResources, Some(5)),
        "{d:?}"
    );
    let reason = d.reason.expect("a reason");
    assert!(
        reason.starts_with("the gateway could not program the opening (kernel: "),
        "{reason}"
    );

    // Answered once the refusal's effects were carried out: the store holds what it will keep.
    let refused: Vec<_> = memory
        .leases()
        .into_iter()
        .filter(|l| l.id != kept)
        .collect();
    let [lease] = refused.as_slice() else {
        panic!("the store committed the refused lease once: {refused:?}");
    };
    assert_eq!(lease.state, LeaseState::Revoked, "{lease:?}");
    let ending = lease.ending.as_ref().expect("how it ended");
    assert_eq!(
        ending.end,
        LeaseEnd::Revoked(fwnp_proto::RevokeReason::ResourcePressure)
    );
    assert_eq!(ending.by.as_deref(), Some("gateway"));
    let why = ending.why.as_deref().expect("why");
    assert!(why.contains("kernel: ") && why.contains("refused"), "{why}");

    let trail = memory.audit();
    let of_lease: Vec<(AuditKind, Option<Outcome>)> = trail
        .iter()
        .filter(|e| e.lease == Some(lease.id))
        .map(|e| (e.kind, e.outcome))
        .collect();
    assert_eq!(
        of_lease,
        vec![
            (AuditKind::Grant, Some(Outcome::Granted)),
            (AuditKind::Revocation, Some(Outcome::Revoked)),
        ],
        "{trail:?}"
    );
    let revocation = trail
        .iter()
        .find(|e| e.kind == AuditKind::Revocation && e.lease == Some(lease.id))
        .expect("the end's record");
    assert_eq!(revocation.reason.as_deref(), Some(why));
    assert_eq!(revocation.actor.as_deref(), Some("gateway"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let refusal = loop {
        let found = memory
            .audit()
            .into_iter()
            .find(|e| e.kind == AuditKind::Decision && e.code == Some(Code::NoResources));
        if found.is_some() || tokio::time::Instant::now() >= deadline {
            break found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let refusal = refusal.expect("the refusal is audited");
    assert_eq!(refusal.outcome, Some(Outcome::Denied));

    assert_eq!(seam.service.status().live_leases, 1, "only the kept lease");
    let listed: Vec<LeaseId> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![kept]);
}

/// [`InsertsWait`], which also reads the kernel's lease elements as an insert's commit begins
/// and says how many there were.
#[derive(Debug)]
struct ReadsTheKernel {
    waits: InsertsWait,
    kernel: std::sync::Mutex<Netfilter>,
    layout: Layout,
    read: tokio::sync::mpsc::UnboundedSender<Vec<u16>>,
}

impl LeaseStore for ReadsTheKernel {
    fn epoch(&self) -> fwnp_proto::Epoch {
        self.waits.epoch()
    }

    fn restore(
        &self,
        now_ms: u64,
    ) -> fwnp_gateway::store::WriteFuture<'_, fwnp_gateway::store::Restored> {
        self.waits.restore(now_ms)
    }

    fn commit(&self, ops: Vec<WriteOp>) -> fwnp_gateway::store::WriteFuture<'static, ()> {
        if ops.iter().any(|op| matches!(op, WriteOp::InsertLease(_))) {
            let mut kernel = self.kernel.lock().expect("the kernel handle");
            let _ = self.read.send(kernel_ports(&mut kernel, &self.layout));
        }
        self.waits.commit(ops)
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        self.waits.record(ops)
    }
}

/// The store through [`ReadsTheKernel`], with what the test needs of it: the leases whose
/// inserts wait, the kernel's ports read as each began, and the signal that lets one go.
struct Reads {
    holding: tokio::sync::mpsc::UnboundedReceiver<LeaseId>,
    reads: tokio::sync::mpsc::UnboundedReceiver<Vec<u16>>,
    go: Arc<tokio::sync::Notify>,
}

impl Reads {
    async fn start(label: &str, policy: &str) -> (KernelSeam, Arc<MemoryStore>, Reads) {
        let memory = Arc::new(MemoryStore::new(0xfeed));
        let (held, holding) = tokio::sync::mpsc::unbounded_channel();
        let (read, reads) = tokio::sync::mpsc::unbounded_channel();
        let go = Arc::new(tokio::sync::Notify::new());
        let seam = KernelSeam::start(label, policy, memory.clone(), |netns, layout| {
            Arc::new(ReadsTheKernel {
                waits: InsertsWait {
                    memory: memory.clone(),
                    held,
                    go: go.clone(),
                },
                kernel: std::sync::Mutex::new(
                    netns.run(|| Netfilter::open().expect("netlink in the namespace")),
                ),
                layout: layout.clone(),
                read,
            })
        })
        .await;
        (seam, memory, Reads { holding, reads, go })
    }

    /// The next lease whose insert waits, and the kernel's ports as its commit began.
    async fn next(&mut self) -> (LeaseId, Vec<u16>) {
        let id = tokio::time::timeout(std::time::Duration::from_secs(10), self.holding.recv())
            .await
            .expect("the lease's insert reaches the store")
            .expect("the store is up");
        let ports = self
            .reads
            .recv()
            .await
            .expect("the kernel read at the commit");
        (id, ports)
    }
}

/// With more than [`AT_ONCE_IN_FLIGHT`] requests in flight, a new lease goes to the kernel
/// first and then to the store; up to it, at once. Counted: each lease's commit waits until
/// the test lets it go, so that each Open finds all those before it still in flight.
#[tokio::test]
async fn with_many_requests_in_flight_a_new_lease_goes_to_the_kernel_before_the_store() {
    const TEST: &str =
        "with_many_requests_in_flight_a_new_lease_goes_to_the_kernel_before_the_store";
    if !require_root(TEST) {
        return;
    }
    let policy = HOSTS_POLICY.replace("max_leases = 3", "max_leases = 16");
    let (seam, memory, mut store) = Reads::start("seam-many", &policy).await;
    let client = Arc::new(seam.host().await);
    let waiting = u16::try_from(AT_ONCE_IN_FLIGHT).expect("a few");
    let mut openings = Vec::new();
    for port in 7001..=7001 + waiting {
        openings.push(tokio::spawn({
            let client = client.clone();
            async move { client.open(tcp(port), None).await }
        }));
        let (_, at_commit) = store.next().await;
        if port < 7001 + waiting {
            assert!(
                !at_commit.contains(&port),
                "{} in flight: at once, the commit began first",
                port - 7000
            );
        } else {
            assert!(
                at_commit.contains(&port),
                "{} in flight: the kernel held the element before the commit began",
                port - 7000
            );
        }
    }
    for _ in &openings {
        store.go.notify_one();
    }
    for opening in openings {
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), opening)
            .await
            .expect("the Open is answered")
            .expect("the Open's task");
        granted(answer);
    }
    assert_eq!(memory.leases().len(), usize::from(waiting) + 1);
}

/// A new lease's hold and commit are in flight at once: the store's commit begins before the
/// kernel holds the element, and the kernel takes it while the commit still waits; the Granted
/// waits for both.
#[tokio::test]
async fn a_new_lease_is_held_in_the_kernel_while_its_commit_waits() {
    const TEST: &str = "a_new_lease_is_held_in_the_kernel_while_its_commit_waits";
    if !require_root(TEST) {
        return;
    }
    let (seam, memory, mut store) = Reads::start("seam-once", HOSTS_POLICY).await;
    let mut kernel = seam
        .netns
        .run(|| Netfilter::open().expect("netlink in the namespace"));
    let client = Arc::new(seam.host().await);
    let opening = tokio::spawn({
        let client = client.clone();
        async move { client.open(tcp(7001), None).await }
    });
    let (id, at_commit) = store.next().await;
    assert_eq!(
        at_commit,
        Vec::<u16>::new(),
        "the commit began before the kernel held the element"
    );
    // Bounded by count: 250 reads 20 ms apart.
    let mut reads_left = 250;
    while !kernel_ports(&mut kernel, &seam.layout).contains(&7001) {
        assert!(
            reads_left > 0,
            "the kernel never held the element while the commit waited"
        );
        reads_left -= 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !opening.is_finished(),
        "no answer before the store committed"
    );
    assert!(memory.leases().is_empty(), "the commit is still waiting");
    store.go.notify_one();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), opening)
        .await
        .expect("the Open is answered")
        .expect("the Open's task");
    assert_eq!(granted(answer).lease, id);
    assert!(
        memory
            .leases()
            .iter()
            .any(|l| l.id == id && l.state == LeaseState::Live)
    );
    assert_eq!(kernel_ports(&mut kernel, &seam.layout), vec![7001]);
}

/// A lease that admits every source by the prefix `0.0.0.0/0` and one that names no source hold
/// one kernel element: the release of one leaves it to the other. A table flushed by someone
/// else is repaired from what the live leases hold.
#[tokio::test]
async fn leases_that_hold_one_kernel_element_keep_it_until_the_last_ends_and_a_repair_restores_it()
{
    const TEST: &str =
        "leases_that_hold_one_kernel_element_keep_it_until_the_last_ends_and_a_repair_restores_it";
    if !require_root(TEST) {
        return;
    }
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let seam = KernelSeam::start("seam-held", HOSTS_POLICY, memory.clone(), |_, _| {
        memory.clone()
    })
    .await;
    let client = seam.host().await;
    let mut everyone = tcp(7001);
    everyone.remotes = vec!["0.0.0.0/0".parse().expect("prefix")];
    let first = granted(client.open(everyone, None).await).lease;
    let second = granted(client.open(tcp(7001), None).await).lease;
    assert_ne!(first, second, "two leases");
    let released = client.release(second).await;
    assert!(
        matches!(released, fwnp_proto::Message::Released(_)),
        "{released:?}"
    );
    let mut kernel = seam
        .netns
        .run(|| Netfilter::open().expect("netlink in the namespace"));
    assert_eq!(kernel_ports(&mut kernel, &seam.layout), vec![7001]);

    seam.netns
        .exec_checked(&["nft", "flush", "ruleset"])
        .expect("nft flush ruleset");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let ports = loop {
        let ports: Option<Vec<u16>> = kernel
            .elements(&seam.layout)
            .ok()
            .map(|elements| elements.iter().map(|(e, _)| e.ports.first).collect());
        if ports.as_deref() == Some(&[7001]) || tokio::time::Instant::now() >= deadline {
            break ports;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(ports, Some(vec![7001]), "the live lease's element is back");
    assert_eq!(seam.service.status().live_leases, 1);
}
