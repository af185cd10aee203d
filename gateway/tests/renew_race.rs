//! A Renew racing a revocation: the lease is renewed in the book, and is revoked (by the
//! operator, a policy reload or a CRL reload) before the renewal's store write is committed or
//! answered. The SQLite store's steps wait on the test's signal, so that each order of the two
//! writes is held open in turn, with and without the kernel. Whatever the order, the host is
//! not told Granted for a lease that is no longer live, the store keeps the lease ended (never
//! renewed after its end), the audit trail has the revocation (after the renewal when the
//! renewal was stored), and the kernel keeps no element of the lease. An Open that extends a
//! live lease is a renewal too.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::kernel::{FILTER, Kernel};
use common::{
    Client, Pki, STEP, config_text, denied, granted, serve_on_loopback, tcp, temp_dir, write_policy,
};
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::Service;
use fwnp_gateway::store::{
    AuditKind, AuditQuery, LeaseEnd, LeaseState, LeaseStore, Order, Store, StoreQueries,
    WriteError, WriteFuture, WriteOp,
};
use fwnp_netfilter::{Batcher, BatcherConfig, Netfilter};
use fwnp_proto::{LeaseId, Message, ResultCode, RevokeReason};
use fwnp_testkit::netns as lab;
use fwnp_trust::pki::{self, RevocationReason};
use fwnp_trust::tls::ServerOptions;
use tokio::sync::{Notify, mpsc};

/// The port the leases open.
const PORT: u16 = 7001;

const POLICY: &str = r#"
[defaults]
lifetime = "10m"
min_lifetime = "1s"
max_lifetime = "1h"
max_leases = 3

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// What the reload puts in force: the lease's port is no longer allowed.
fn narrower_policy() -> String {
    POLICY.replace("allow = \"tcp/7000-7999\"", "allow = \"tcp/7500-7999\"")
}

/// The SQLite store, except that a commit renewing a lease waits until the test lets it go,
/// and says which lease it holds: before the renewal is applied (`applied_first` false), or
/// after it is applied and before the commit is answered (true).
#[derive(Debug)]
struct RenewalsWait {
    store: Arc<Store>,
    applied_first: bool,
    held: mpsc::UnboundedSender<LeaseId>,
    go: Arc<Notify>,
}

impl LeaseStore for RenewalsWait {
    fn epoch(&self) -> fwnp_proto::Epoch {
        LeaseStore::epoch(&*self.store)
    }

    fn restore(&self, now_ms: u64) -> WriteFuture<'_, fwnp_gateway::store::Restored> {
        LeaseStore::restore(&*self.store, now_ms)
    }

    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()> {
        let renewed = ops.iter().find_map(|op| match op {
            WriteOp::RenewLease { id, .. } => Some(*id),
            _ => None,
        });
        let store = self.store.clone();
        let Some(id) = renewed else {
            return LeaseStore::commit(&*store, ops);
        };
        let go = self.go.clone();
        let held = self.held.clone();
        if self.applied_first {
            Box::pin(async move {
                let committed = LeaseStore::commit(&*store, ops).await;
                let _ = held.send(id);
                go.notified().await;
                committed
            })
        } else {
            let _ = held.send(id);
            Box::pin(async move {
                go.notified().await;
                LeaseStore::commit(&*store, ops).await
            })
        }
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        LeaseStore::record(&*self.store, ops)
    }
}

/// Who ends the lease while its renewal is held.
#[derive(Debug, Clone, Copy)]
enum Revoker {
    /// `fwnpctl revoke`: the admin API's revoke.
    Operator,
    /// A policy reload whose new policy no longer allows the lease.
    PolicyReload,
}

/// What the race left.
struct Raced {
    /// The answer to the Renew.
    answer: Message,
    /// The lease's row in the store.
    stored: fwnp_gateway::store::LeaseRecord,
    /// The lease's expiry as granted by the Open.
    opened_expires_ms: u64,
    /// The lease's audit records of renewal and revocation, in the trail's order.
    audited: Vec<AuditKind>,
    /// Whether the host got the Revoked notice.
    notified: bool,
    /// The service's count of live leases afterwards.
    live_leases: u64,
    /// With a kernel: whether the opening was closed afterwards (no element, no traffic).
    kernel_closed: Option<bool>,
}

/// Opens a lease for `opened` seconds, renews it for `renewed` seconds while the store holds
/// the renewal's commit, and has `revoker` end the lease meanwhile.
/// A gateway on the SQLite store behind [`RenewalsWait`], serving QUIC on loopback.
struct Seam {
    pki: Pki,
    dir: common::TempDir,
    service: Arc<Service>,
    store: Arc<Store>,
    holding: mpsc::UnboundedReceiver<LeaseId>,
    go: Arc<Notify>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    serving: tokio::task::JoinHandle<()>,
    /// The namespaces whose router's nf_tables the gateway programs, when it has a filter.
    kernel: Option<Kernel>,
}

impl Seam {
    async fn start(label: &str, applied_first: bool, kernel: Option<Kernel>) -> Seam {
        let pki = Pki::new(label);
        let dir = temp_dir(label);
        write_policy(&dir.path().join("policy.toml"), POLICY);
        let filter_text = if kernel.is_some() {
            FILTER
        } else {
            "[filter]\nenabled = false"
        };
        let text = config_text(&pki, dir.path(), "127.0.0.1:0", filter_text);
        let config = GatewayConfig::parse(&text, "renew-race.toml").expect("valid config");
        let filter = kernel.as_ref().map(|kernel| {
            let layout = fwnp_gateway::daemon::layout(&config);
            kernel.topology.gateway.run(|| {
                let mut netfilter = Netfilter::open().expect("netlink in the router namespace");
                netfilter.apply(&layout, &[]).expect("table");
                Batcher::start(netfilter, layout, BatcherConfig::default()).expect("batcher")
            })
        });
        let store = Arc::new(Store::open(dir.path().join("store")).expect("the store"));
        let (held, holding) = mpsc::unbounded_channel();
        let go = Arc::new(Notify::new());
        let waits = Arc::new(RenewalsWait {
            store: store.clone(),
            applied_first,
            held,
            go: go.clone(),
        });
        let service = Service::start_with_store(config, filter, store.clone(), waits)
            .await
            .expect("service starts");
        let (endpoint, addr, serving) =
            serve_on_loopback(&pki, &service, &ServerOptions::default());
        service.add_endpoint(endpoint.clone());
        Seam {
            pki,
            dir,
            service,
            store,
            holding,
            go,
            endpoint,
            addr,
            serving,
            kernel,
        }
    }

    /// Waits until the store holds the renewal of `lease`.
    async fn renewal_held(&mut self, lease: LeaseId) {
        let id = tokio::time::timeout(STEP, self.holding.recv())
            .await
            .expect("the renewal reaches the store")
            .expect("the store is up");
        assert_eq!(id, lease);
    }

    fn stored(&self, lease: LeaseId) -> fwnp_gateway::store::LeaseRecord {
        StoreQueries::lease(&*self.store, lease)
            .expect("the store answers")
            .expect("the lease is stored")
    }

    /// The lease's audit records of renewal and revocation, in the trail's order.
    fn audited(&self, lease: LeaseId) -> Vec<AuditKind> {
        let query = AuditQuery {
            kinds: vec![AuditKind::Renewal, AuditKind::Revocation],
            lease: Some(lease),
            order: Order::OldestFirst,
            limit: 100,
            ..AuditQuery::default()
        };
        StoreQueries::audit(&*self.store, &query)
            .expect("the store answers")
            .events
            .into_iter()
            .map(|r| r.event.kind)
            .collect()
    }
}

impl Drop for Seam {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
        self.serving.abort();
    }
}

/// Opens a lease for `opened` seconds, renews it for `renewed` seconds while the store holds
/// the renewal's commit, and has `revoker` end the lease meanwhile.
async fn race(
    label: &str,
    opened: u32,
    renewed: u32,
    applied_first: bool,
    revoker: Revoker,
    kernel: Option<Kernel>,
) -> Raced {
    let host = kernel
        .as_ref()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), Kernel::host);
    let mut seam = Seam::start(label, applied_first, kernel).await;
    let policy_path = seam.dir.path().join("policy.toml");
    let service = seam.service.clone();
    let client =
        Arc::new(Client::connect(seam.addr, &seam.pki.host("web-01", &[host], &[], &[])).await);
    client.hello().await;
    let lease = granted(client.open(tcp(PORT), Some(opened)).await).lease;
    let opened_expires_ms = seam.stored(lease).expires_ms;
    if let Some(kernel) = &seam.kernel {
        assert!(
            kernel.settles(PORT, true).await,
            "the granted lease is open"
        );
    }

    let renewing = tokio::spawn({
        let client = client.clone();
        async move { client.renew(lease, Some(renewed)).await }
    });
    seam.renewal_held(lease).await;
    match revoker {
        Revoker::Operator => {
            let answer = service
                .revoke_by_operator(lease, Some("revoked while it was being renewed".into()))
                .await
                .expect("the lease is live in the book while its renewal is held");
            assert_eq!(answer.revoked, lease.to_string());
        }
        Revoker::PolicyReload => {
            write_policy(&policy_path, &narrower_policy());
            let reloaded = service.reload_policy().await.expect("the reload");
            let revoked: Vec<&str> = reloaded.revoked.iter().map(|r| r.lease.as_str()).collect();
            assert_eq!(revoked, vec![lease.to_string()]);
        }
    }
    seam.go.notify_one();
    let answer = tokio::time::timeout(STEP, renewing)
        .await
        .expect("the Renew is answered")
        .expect("the Renew's task");
    let notified = matches!(
        client.next_notice(STEP).await,
        Some(Message::Revoked(r)) if r.lease == lease
    );
    let kernel_closed = match &seam.kernel {
        Some(kernel) => Some(kernel.settles(PORT, false).await),
        None => None,
    };
    Raced {
        answer,
        kernel_closed,
        stored: seam.stored(lease),
        opened_expires_ms,
        audited: seam.audited(lease),
        notified,
        live_leases: service.status().live_leases,
    }
}

/// The answer every race must give: the lease is not live when the renewal is answered.
fn assert_unknown_lease(raced: &Raced) {
    let d = denied(raced.answer.clone());
    assert_eq!(
        d.code,
        ResultCode::UnknownLease,
        "a renewal of a lease revoked before it was answered is not Granted: {d:?}"
    );
    assert!(raced.notified, "the host is told of the revocation");
    assert_eq!(raced.live_leases, 0);
}

fn assert_revoked(raced: &Raced, reason: RevokeReason) {
    assert_eq!(
        raced.stored.state,
        LeaseState::Revoked,
        "{:?}",
        raced.stored
    );
    assert_eq!(
        raced.stored.ending.as_ref().map(|e| e.end),
        Some(LeaseEnd::Revoked(reason)),
        "{:?}",
        raced.stored
    );
}

/// A lengthening renewal is written to the store before its kernel hold; the revocation's end
/// reaches the store first, so the store refuses to renew the ended lease: the renewal is
/// neither stored nor audited, and the host is told the lease is unknown, not that the
/// gateway lacked resources.
#[tokio::test]
async fn a_renewal_stored_after_the_revocation_is_refused_and_answered_unknown_lease() {
    let raced = race("renew-race-a", 60, 600, false, Revoker::Operator, None).await;
    assert_unknown_lease(&raced);
    assert_revoked(&raced, RevokeReason::Operator);
    assert_eq!(
        raced.stored.expires_ms, raced.opened_expires_ms,
        "the ended lease was not renewed"
    );
    assert_eq!(raced.stored.renewed_ms, None);
    assert_eq!(raced.audited, vec![AuditKind::Revocation]);
}

/// The renewal is stored first and the revocation's end after it; the lengthening renewal's
/// kernel hold then finds the lease gone from the book and gives its elements up again.
#[tokio::test]
async fn a_renewal_stored_before_the_revocation_is_audited_first_and_answered_unknown_lease() {
    let raced = race("renew-race-b", 60, 600, true, Revoker::PolicyReload, None).await;
    assert_unknown_lease(&raced);
    assert_revoked(&raced, RevokeReason::PolicyChanged);
    assert!(
        raced.stored.expires_ms > raced.opened_expires_ms && raced.stored.renewed_ms.is_some(),
        "renewed, then ended: {:?}",
        raced.stored
    );
    assert_eq!(
        raced.audited,
        vec![AuditKind::Renewal, AuditKind::Revocation]
    );
}

/// A shortening renewal holds the kernel first, then is written to the store; the revocation
/// comes in between and its end reaches the store first.
#[tokio::test]
async fn a_shortening_renewal_revoked_between_kernel_and_store_is_answered_unknown_lease() {
    let raced = race("renew-race-c", 600, 60, false, Revoker::PolicyReload, None).await;
    assert_unknown_lease(&raced);
    assert_revoked(&raced, RevokeReason::PolicyChanged);
    assert_eq!(raced.stored.expires_ms, raced.opened_expires_ms);
    assert_eq!(raced.stored.renewed_ms, None);
    assert_eq!(raced.audited, vec![AuditKind::Revocation]);
}

/// Every step of a shortening renewal is done (kernel, then store) when the revocation comes,
/// before the renewal is answered: the answer is not Granted for a lease already revoked.
#[tokio::test]
async fn a_renewal_revoked_after_its_effects_and_before_its_answer_is_not_granted() {
    let raced = race("renew-race-d", 600, 60, true, Revoker::Operator, None).await;
    assert_unknown_lease(&raced);
    assert_revoked(&raced, RevokeReason::Operator);
    assert!(
        raced.stored.expires_ms < raced.opened_expires_ms && raced.stored.renewed_ms.is_some(),
        "renewed, then ended: {:?}",
        raced.stored
    );
    assert_eq!(
        raced.audited,
        vec![AuditKind::Renewal, AuditKind::Revocation]
    );
}

/// A host rolled to a new certificate and opened a lease with it; a connection under its old
/// certificate (a stolen key) renews that lease while a CRL reload revokes the old certificate.
/// The reload looked at the lease while its renewal was on its way to the store, when the new
/// certificate had last renewed it, and left it; the renewal then made the revoked certificate
/// the one that last renewed it. The lease is revoked with `credential-revoked` all the same,
/// and the real host is told.
#[tokio::test]
async fn a_lease_renewed_by_a_certificate_revoked_meanwhile_is_revoked() {
    let mut seam = Seam::start("renew-race-crl", false, None).await;
    let host_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let old_files = seam.pki.host("web-01", &[host_ip], &[], &[]);
    let new_files = seam
        .pki
        .host("web-01-renewed", &[host_ip], &["fwnp://host/web-01"], &[]);
    let host = Client::connect(seam.addr, &new_files).await;
    assert_eq!(host.hello().await.identity, "fwnp://host/web-01");
    let lease = granted(host.open(tcp(7001), None).await).lease;
    let thief = Arc::new(Client::connect(seam.addr, &old_files).await);
    assert_eq!(thief.hello().await.identity, "fwnp://host/web-01");

    let renew = Message::Renew(fwnp_proto::Renew {
        common: common::common(thief.next_id()),
        lease,
        lifetime: None,
    });
    let renewing = tokio::spawn({
        let thief = thief.clone();
        async move { thief.exchange(&fwnp_proto::codec::encode(&renew)).await }
    });
    seam.renewal_held(lease).await;
    pki::revoke(
        seam.pki.path(),
        &old_files.cert,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke");
    let closed = seam.service.reload_tls().await.expect("reload");
    assert_eq!(closed.len(), 1, "the thief's connection: {closed:?}");
    seam.go.notify_one();
    // The thief's connection is closed: whatever it was answered does not reach it.
    let _ = tokio::time::timeout(STEP, renewing).await;

    let revoked = loop {
        match host.next_notice(STEP).await {
            Some(Message::Revoked(r)) => break r,
            Some(_) => continue,
            None => panic!("the host was not told its lease was revoked"),
        }
    };
    assert_eq!(revoked.lease, lease);
    assert_eq!(revoked.reason, RevokeReason::CredentialRevoked);
    let stored = seam.stored(lease);
    assert_eq!(
        stored.ending.as_ref().map(|e| e.end),
        Some(LeaseEnd::Revoked(RevokeReason::CredentialRevoked)),
        "a lease last renewed with a revoked certificate stays live: {stored:?}"
    );
    assert_eq!(
        seam.audited(lease),
        vec![AuditKind::Renewal, AuditKind::Revocation]
    );
    assert_eq!(seam.service.status().live_leases, 0);
    assert!(host.list().await.leases.is_empty());
}

/// The same races with the kernel: whichever step the revocation comes between, the renewal
/// leaves no element of the revoked lease in the router's nf_tables, and the outside's traffic
/// to the host is dropped again. (A lengthening renewal revoked after its store write holds
/// the element again, finds the lease gone and gives it up; a shortening one revoked after its
/// kernel hold has its element removed by the revocation; one refused by the store never
/// reaches the kernel.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_element_of_a_lease_revoked_while_it_was_renewed_stays_in_the_kernel() {
    if !lab::require_root("no_element_of_a_lease_revoked_while_it_was_renewed_stays_in_the_kernel")
    {
        return;
    }
    let cases = [
        ("renew-race-kernel-a", 60, 600, false, Revoker::Operator),
        ("renew-race-kernel-b", 60, 600, true, Revoker::PolicyReload),
        ("renew-race-kernel-c", 600, 60, false, Revoker::Operator),
        ("renew-race-kernel-d", 600, 60, true, Revoker::PolicyReload),
    ];
    for (label, opened, renewed, applied_first, revoker) in cases {
        let raced = race(
            label,
            opened,
            renewed,
            applied_first,
            revoker,
            Some(Kernel::new(&[PORT])),
        )
        .await;
        assert_unknown_lease(&raced);
        assert_eq!(
            raced.kernel_closed,
            Some(true),
            "{label}: the revoked lease's opening is closed in the kernel"
        );
    }
}

/// An Open repeated for an opening its host already holds extends that lease, as a Renew
/// does; revoked once the extension is stored and before it is answered, it is not answered
/// Granted with the revoked lease, but no-resources with a retry-after, for a new lease.
#[tokio::test]
async fn an_open_extending_a_lease_revoked_before_its_answer_is_not_granted() {
    let mut seam = Seam::start("renew-race-open", true, None).await;
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let client =
        Arc::new(Client::connect(seam.addr, &seam.pki.host("web-01", &[host], &[], &[])).await);
    client.hello().await;
    let lease = granted(client.open(tcp(PORT), Some(600)).await).lease;
    // Shorter: the kernel is held first, then the store, whose write is applied and held.
    let opening = tokio::spawn({
        let client = client.clone();
        async move { client.open(tcp(PORT), Some(60)).await }
    });
    seam.renewal_held(lease).await;
    seam.service
        .revoke_by_operator(lease, Some("revoked while it was being extended".into()))
        .await
        .expect("the lease is live in the book while its extension is held");
    seam.go.notify_one();
    let answer = tokio::time::timeout(STEP, opening)
        .await
        .expect("the Open is answered")
        .expect("the Open's task");
    let d = denied(answer);
    assert_eq!(d.code, ResultCode::NoResources, "{d:?}");
    assert!(d.retry_after.is_some(), "{d:?}");
    assert!(
        matches!(client.next_notice(STEP).await, Some(Message::Revoked(r)) if r.lease == lease),
        "the host is told of the revocation"
    );
    let stored = seam.stored(lease);
    assert_eq!(stored.state, LeaseState::Revoked, "{stored:?}");
    assert_eq!(seam.service.status().live_leases, 0);
    assert!(client.list().await.leases.is_empty());
}

/// A store that holds the lease as ended while the book still holds it live: how the etcd store
/// answers a renewal once another gateway's revocation is committed to the cluster and its
/// news has not reached this gateway's book. The renewal is answered unknown-lease, as when
/// the book had heard (not no-resources: the gateway lacked nothing, the lease is gone).
#[tokio::test]
async fn a_renewal_the_store_refuses_for_a_lease_it_holds_ended_is_answered_unknown_lease() {
    let mut seam = Seam::start("renew-race-ended", false, None).await;
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let client =
        Arc::new(Client::connect(seam.addr, &seam.pki.host("web-01", &[host], &[], &[])).await);
    client.hello().await;
    let lease = granted(client.open(tcp(PORT), Some(600)).await).lease;
    seam.store
        .writer()
        .commit(vec![WriteOp::EndLease {
            id: lease,
            end: LeaseEnd::Revoked(RevokeReason::Operator),
            ended_ms: fwnp_gateway::store::now_ms(),
            by: Some("gw-b".into()),
            why: Some("revoked through another gateway".into()),
        }])
        .await
        .expect("the lease ends in the store");
    let renewing = tokio::spawn({
        let client = client.clone();
        async move { client.renew(lease, Some(60)).await }
    });
    seam.renewal_held(lease).await;
    seam.go.notify_one();
    let answer = tokio::time::timeout(STEP, renewing)
        .await
        .expect("the Renew is answered")
        .expect("the Renew's task");
    let d = denied(answer);
    assert_eq!(d.code, ResultCode::UnknownLease, "{d:?}");
    let stored = seam.stored(lease);
    assert_eq!(stored.state, LeaseState::Revoked, "{stored:?}");
}
