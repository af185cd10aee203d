//! Gateways started with `[store] backend = "etcd"` on one real etcd cluster (in a
//! network namespace of its own, with the gateways and the host there too), serving real Opens
//! over QUIC: they welcome hosts with the cluster's one epoch, a grant is in etcd before it is
//! answered, and the host's max_leases holds across the gateways (a gateway to which the host
//! never spoke holds its leases granted through another, from the cluster, and refuses the one
//! too many, quota-exceeded, keeping nothing; etcd's own check of the count, for gateways that
//! have not yet seen each other's grants, is tested in etcd_store.rs).
//!
//! Needs root and etcd; skipped otherwise, a failure under `FWNP_REQUIRE_NETNS=1`.

mod common;
mod etcd_cluster;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Pki, config_text, denied, granted, tcp, temp_dir, write_policy};
use etcd_cluster::{EtcdCluster, StoreConfig, available};
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::Service;
use fwnp_gateway::store::{EtcdStore, LeaseStore, Store, now_ms};
use fwnp_proto::ResultCode;
use fwnp_trust::tls::ServerOptions;

const POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_leases = 2

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// A gateway on the cluster, served on 127.0.0.1 of the cluster's namespace.
struct Gateway {
    service: Arc<Service>,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    serving: tokio::task::JoinHandle<()>,
}

async fn gateway(cluster: &EtcdCluster, pki: &Pki, dir: &Path, site: &str) -> Gateway {
    gateway_with(cluster, pki, dir, site, "2s", POLICY).await
}

async fn gateway_with(
    cluster: &EtcdCluster,
    pki: &Pki,
    dir: &Path,
    site: &str,
    timeout: &str,
    policy: &str,
) -> Gateway {
    write_policy(&dir.join("policy.toml"), policy);
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let text = format!(
        "{}\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/fwnp-test\"\n\
         site = \"{site}\"\ntimeout = \"{timeout}\"\n",
        config_text(pki, dir, "127.0.0.1:0", "[filter]\nenabled = false"),
        endpoints.join(", ")
    );
    let config = GatewayConfig::parse(&text, "etcd-gateway.toml").expect("valid config");
    let service = Service::start(config, None).await.expect("service starts");
    let (endpoint, addr, serving) =
        common::serve_on_loopback(pki, &service, &ServerOptions::default());
    Gateway {
        service,
        addr,
        endpoint,
        serving,
    }
}

#[test]
fn gateways_on_etcd_serve_opens_and_hold_max_leases_across_the_cluster() {
    const TEST: &str = "gateways_on_etcd_serve_opens_and_hold_max_leases_across_the_cluster";
    if !available(TEST) {
        return;
    }
    let cluster = EtcdCluster::single("gwopen").unwrap_or_else(|e| panic!("{e}"));
    cluster.run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let pki = Pki::new("etcd-gw");
                let (dir_a, dir_b, dir_o) =
                    (temp_dir("etcd-a"), temp_dir("etcd-b"), temp_dir("etcd-o"));
                let a = gateway(&cluster, &pki, dir_a.path(), "gw-a").await;
                let b = gateway(&cluster, &pki, dir_b.path(), "gw-b").await;
                assert_eq!(a.service.epoch(), b.service.epoch(), "the cluster's epoch");

                let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
                let files = pki.host("web-01", &[host], &[], &[]);
                let to_a = Client::connect(a.addr, &files).await;
                let welcome = to_a.hello().await;
                assert_eq!(welcome.epoch, a.service.epoch());
                let first = granted(to_a.open(tcp(7001), None).await).lease;
                let second = granted(to_a.open(tcp(7002), None).await).lease;

                // What etcd holds, as a third party on the cluster reads it.
                let local = Store::open(dir_o.path()).expect("observer's database");
                let observer = EtcdStore::connect(
                    &cluster.config("observer", Duration::from_secs(2)),
                    local.writer().clone(),
                )
                .await
                .expect("observer connects");
                let mut live: Vec<_> = observer
                    .restore(now_ms())
                    .await
                    .expect("listed")
                    .live
                    .iter()
                    .map(|l| (l.id, l.identity.clone()))
                    .collect();
                live.sort();
                let mut expected = vec![
                    (first, "fwnp://host/web-01".to_owned()),
                    (second, "fwnp://host/web-01".to_owned()),
                ];
                expected.sort();
                assert_eq!(live, expected, "both grants are in etcd");

                // Through B, which follows the cluster: it holds the host's two leases, and
                // refuses the third.
                let to_b = Client::connect(b.addr, &files).await;
                assert_eq!(to_b.hello().await.epoch, welcome.epoch);
                let through_b = || async {
                    let mut ids: Vec<_> =
                        to_b.list().await.leases.iter().map(|l| l.lease).collect();
                    ids.sort();
                    ids
                };
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while through_b().await.len() < 2 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "B never held the leases"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let refused = denied(to_b.open(tcp(7003), None).await);
                assert_eq!(refused.code, ResultCode::QuotaExceeded, "{refused:?}");
                let mut both = vec![first, second];
                both.sort();
                assert_eq!(through_b().await, both, "B keeps nothing more");

                // A lease released through A frees a place that B may take.
                let released = to_a.release(first).await;
                assert!(
                    matches!(released, fwnp_proto::Message::Released(_)),
                    "{released:?}"
                );
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while through_b().await.len() > 1 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "B never saw the release"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let third = granted(to_b.open(tcp(7003), None).await).lease;
                let live: Vec<_> = observer
                    .restore(now_ms())
                    .await
                    .expect("listed")
                    .live
                    .iter()
                    .map(|l| l.id)
                    .collect();
                assert_eq!(live.len(), 2);
                assert!(live.contains(&second) && live.contains(&third));

                for gateway in [a, b] {
                    gateway.endpoint.close(0u32.into(), b"done");
                    gateway.serving.abort();
                }
            });
    });
}

#[test]
fn a_gateway_without_etcd_quorum_refuses_opens_with_retry_after_and_grants_again_when_it_is_back() {
    const TEST: &str = "a_gateway_without_etcd_quorum_refuses_opens_with_retry_after_and_grants_again_when_it_is_back";
    if !available(TEST) {
        return;
    }
    let mut cluster = EtcdCluster::start("gwquor").unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new("etcd-quorum");
    let dir = temp_dir("etcd-quorum");
    // Sockets are made inside the cluster's namespace (the runtime's threads start there too);
    // members are killed and started between the steps.
    let (rt, a, client) = cluster.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (a, client) = rt.block_on(async {
            let policy = POLICY.replace("max_leases = 2", "max_leases = 8");
            let a = gateway_with(&cluster, &pki, dir.path(), "gw-a", "1s", &policy).await;
            let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let client = Client::connect(a.addr, &pki.host("web-01", &[host], &[], &[])).await;
            client.hello().await;
            granted(client.open(tcp(7001), None).await);
            (a, client)
        });
        (rt, a, client)
    });

    cluster.kill(0);
    // If the killed member led, the two left elect a new leader first, which on a loaded
    // machine can outlast the store's timeout: the grant below is asked once they have one.
    assert!(
        cluster.wait_healthy(&[1, 2], Duration::from_secs(30)),
        "the two members left elect a leader"
    );
    cluster.run(|| {
        rt.block_on(async {
            granted(client.open(tcp(7002), None).await);
        })
    });

    cluster.kill(1);
    cluster.run(|| {
        rt.block_on(async {
            let started = std::time::Instant::now();
            let refused = denied(client.open(tcp(7003), None).await);
            let took = started.elapsed();
            assert_eq!(refused.code, ResultCode::NoResources, "{refused:?}");
            assert_eq!(refused.retry_after, Some(5), "{refused:?}");
            assert!(took < Duration::from_secs(3), "answered after {took:?}");
            assert_eq!(client.list().await.leases.len(), 2, "nothing more is held");
        })
    });

    cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
    cluster.restart(1).unwrap_or_else(|e| panic!("{e}"));
    assert!(cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30)));
    cluster.run(|| {
        rt.block_on(async {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match client.open(tcp(7003), None).await {
                    fwnp_proto::Message::Granted(_) => break,
                    other => assert!(
                        std::time::Instant::now() < deadline,
                        "no grant with the quorum back: {other:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The refused open's transaction may have been taken by the cluster once its quorum
            // was back; the store then ends that lease by itself, soon after: until then the
            // list may show it too.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut held = client.list().await.leases.len();
            while held != 3 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                held = client.list().await.leases.len();
            }
            assert_eq!(held, 3);
            a.endpoint.close(0u32.into(), b"done");
            a.serving.abort();
        })
    });
    drop(client);
    drop(a);
    drop(rt);
}
