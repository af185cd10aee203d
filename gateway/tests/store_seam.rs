//! The lease store seam: one contract, run against every backend (the SQLite store and the
//! in-memory one), so that a new backend is checked by the same test; the refusals a cluster
//! backend may give, typed; and the gateway serving over real QUIC with the in-memory backend,
//! whose refusal turns a grant into no-resources without leaving a lease behind.

mod common;
mod etcd_cluster;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::{Client, Pki, config_text, denied, granted, tcp, temp_dir, write_policy};
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::Service;
use fwnp_proto::ResultCode;
use fwnp_trust::tls::{self, ServerOptions};

use fwnp_gateway::store::{
    AuditEvent, AuditKind, LeaseEnd, LeaseState, LeaseStore, MemoryStore, NewLease, Store,
    StoreError, WriteError, WriteOp,
};
use fwnp_proto::{Grant, LeaseId, PortRange, Protocol};

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
    if !etcd_cluster::available("the_etcd_store_keeps_the_contract") {
        return;
    }
    let cluster = etcd_cluster::EtcdCluster::start("seam");
    let dir = tempfile::tempdir().expect("temp dir");
    let local = Store::open(dir.path()).expect("local store");
    cluster.run(|| {
        let config = cluster.config("gw-a", std::time::Duration::from_secs(2));
        let store = block_on(fwnp_gateway::store::EtcdStore::connect(
            &config,
            local.writer().clone(),
        ))
        .expect("connected");
        contract(&store);
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

const POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_leases = 3

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

#[tokio::test]
async fn a_gateway_on_the_memory_store_grants_and_a_refused_write_grants_nothing() {
    let pki = Pki::new("seam");
    let dir = temp_dir("seam");
    let policy_path = dir.path().join("policy.toml");
    write_policy(&policy_path, POLICY);
    let text = config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false");
    let config = GatewayConfig::parse(&text, "seam.toml").expect("valid config");
    let database = Store::open(&config.state_dir).expect("database");
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let service = Service::start_with_store(config, None, database, memory.clone())
        .await
        .expect("service starts");
    assert_eq!(service.epoch(), 0xfeed, "the epoch is the backend's");
    let server_config =
        tls::server_config_from_files(&pki.server_files(), &ServerOptions::default())
            .expect("server TLS config");
    let endpoint =
        quinn::Endpoint::server(server_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind");
    let addr = endpoint.local_addr().expect("address");
    let serving = tokio::spawn(fwnp_gateway::server::serve(
        endpoint.clone(),
        service.clone(),
    ));

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
