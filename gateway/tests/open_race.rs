//! An Open racing a policy reload. An Open is decided by the policy in force before it takes
//! the lease book's lock; a reload puts its policy in force, then judges the leases of the
//! book. An Open decided by the old policy and let into the book after the reload's judging
//! would live on, allowed by a policy no longer in force, until its first renewal. So a
//! request whose policy was replaced by the time it holds the book's lock is decided again by
//! the one in force.
//!
//! The gateway is started with a seam at which the Open, once decided, waits for the test: the
//! reload runs in that gap every time. With the router's real nf_tables in namespaces.
//!
//! Needs root: skipped otherwise, and failing instead when FWNP_REQUIRE_NETNS=1.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::kernel::{FILTER, Kernel};
use common::{
    Client, HOSTS_POLICY, Pki, STEP, config_text, denied, granted, serve_on_loopback, tcp,
    temp_dir, write_policy,
};
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::{Pause, Seams, Service};
use fwnp_gateway::store::{AuditKind, AuditQuery, LeaseFilter, Order, Outcome};
use fwnp_netfilter::{Batcher, BatcherConfig, Netfilter};
use fwnp_proto::ResultCode;
use fwnp_testkit::netns as lab;
use fwnp_trust::tls::ServerOptions;
use tokio::sync::{Notify, mpsc};

/// The port of the Open that races the reload: the old policy allows it, the new one denies it.
const RACED: u16 = 7001;

/// The port of a lease both policies allow, open before the race and after it.
const KEPT: u16 = 7600;

/// The name of the rule of [`narrower_policy`] that denies [`RACED`].
const DENYING_RULE: &str = "no-7000s";

/// What the reload puts in force: a rule ahead of the allowing one denies tcp/7000-7099.
fn narrower_policy() -> String {
    HOSTS_POLICY.replace(
        "[[rule]]\nname = \"hosts-web\"",
        &format!(
            "[[rule]]\nname = \"{DENYING_RULE}\"\ngroups = [\"hosts\"]\ndeny = \"tcp/7000-7099\"\n\n[[rule]]\nname = \"hosts-web\""
        ),
    )
}

/// A seam that holds the first request decided after it is armed, says so, and lets it go
/// when `go` is notified; it lets every other request through.
fn hold_once(armed: Arc<AtomicBool>, held: mpsc::UnboundedSender<()>, go: Arc<Notify>) -> Pause {
    Arc::new(move || {
        if armed.swap(false, Ordering::AcqRel) {
            let _ = held.send(());
            let go = go.clone();
            Box::pin(async move { go.notified().await })
        } else {
            Box::pin(async {})
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_decided_before_a_reload_is_decided_again_by_the_policy_in_force() {
    let test = "an_open_decided_before_a_reload_is_decided_again_by_the_policy_in_force";
    if !lab::require_root(test) {
        return;
    }
    let kernel = Kernel::new(&[RACED, KEPT]);
    let pki = Pki::new("open-race");
    let dir = temp_dir("open-race");
    let policy_path = dir.path().join("policy.toml");
    write_policy(&policy_path, HOSTS_POLICY);
    let text = config_text(&pki, dir.path(), "127.0.0.1:0", FILTER);
    let config = GatewayConfig::parse(&text, "open-race.toml").expect("valid config");
    let layout = fwnp_gateway::daemon::layout(&config);
    let filter = kernel.topology.gateway.run(|| {
        let mut netfilter = Netfilter::open().expect("netlink in the router namespace");
        netfilter.apply(&layout, &[]).expect("table");
        Batcher::start(netfilter, layout, BatcherConfig::default()).expect("batcher")
    });
    let armed = Arc::new(AtomicBool::new(false));
    let (held, mut holding) = mpsc::unbounded_channel();
    let go = Arc::new(Notify::new());
    let seams = Seams {
        decided: Some(hold_once(armed.clone(), held, go.clone())),
        ..Seams::default()
    };
    let service = Service::start_with_seams(config, Some(filter), seams)
        .await
        .expect("service starts");
    let (endpoint, addr, serving) = serve_on_loopback(&pki, &service, &ServerOptions::default());
    service.add_endpoint(endpoint.clone());

    let client =
        Arc::new(Client::connect(addr, &pki.host("web-01", &[kernel.host()], &[], &[])).await);
    client.hello().await;
    let kept = granted(client.open(tcp(KEPT), None).await).lease;
    assert!(
        kernel.settles(KEPT, true).await,
        "the filter lets a granted lease's traffic through"
    );

    armed.store(true, Ordering::Release);
    let opening = tokio::spawn({
        let client = client.clone();
        async move { client.open(tcp(RACED), None).await }
    });
    tokio::time::timeout(STEP, holding.recv())
        .await
        .expect("the Open is decided and held")
        .expect("the seam is up");

    write_policy(&policy_path, &narrower_policy());
    let reloaded = service.reload_policy().await.expect("the reload");
    assert!(
        reloaded.revoked.is_empty(),
        "the held Open is not in the book the reload judged, and the kept lease stays: {:?}",
        reloaded.revoked
    );
    go.notify_one();
    let answer = tokio::time::timeout(STEP, opening)
        .await
        .expect("the Open is answered")
        .expect("the Open's task");

    let d = denied(answer);
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
    let reason = d.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(DENYING_RULE),
        "denied by the new policy's rule: {d:?}"
    );
    // The audit trail's refusal names the rule (its records are queued, not awaited).
    let deadline = tokio::time::Instant::now() + STEP;
    let refusals = loop {
        let decisions = service
            .store()
            .audit(&AuditQuery {
                kinds: vec![AuditKind::Decision],
                order: Order::OldestFirst,
                limit: 100,
                ..AuditQuery::default()
            })
            .expect("the store answers")
            .events;
        let refusals: Vec<Option<String>> = decisions
            .into_iter()
            .filter(|r| r.event.outcome == Some(Outcome::Denied))
            .map(|r| r.event.rule)
            .collect();
        if !refusals.is_empty() || tokio::time::Instant::now() >= deadline {
            break refusals;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(refusals, vec![Some(DENYING_RULE.to_owned())]);

    // Of the two Opens, only the lease granted before the reload is live: in the book, the
    // store and the kernel.
    let listed: Vec<_> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![kept]);
    assert_eq!(service.status().live_leases, 1);
    let stored = service
        .store()
        .leases(&LeaseFilter::default())
        .expect("the store answers");
    let stored: Vec<_> = stored.iter().map(|l| l.id).collect();
    assert_eq!(stored, vec![kept], "no lease of the raced Open is stored");
    assert!(
        !kernel.holds(RACED),
        "the kernel holds no element for the denied Open"
    );
    assert!(
        !kernel.passes(RACED),
        "the outside's traffic to the denied Open's port is dropped"
    );
    assert!(kernel.holds(KEPT) && kernel.passes(KEPT));

    endpoint.close(0u32.into(), b"done");
    serving.abort();
}
