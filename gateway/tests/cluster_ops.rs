//! Operating a cluster of two gateways on one real etcd cluster (in a network
//! namespace of its own, the gateways and hosts there too), through their admin sockets as
//! `fwnpctl` does: `status` lists the members with their revisions and policy versions, and
//! one as absent once it stops; a policy reload through A reaches B (B's decisions change) and
//! the revocation it causes is committed once (one end in etcd, one audit record), and a
//! gateway started later with the old file enforces the cluster's version; `audit`
//! through A shows B's events and names B once B is gone; `revoke` through B ends a lease
//! granted through A in etcd; a reload without etcd's quorum is answered 503 and succeeds once
//! the quorum is back. A reload whose every publish another gateway's publish beats (a seam
//! between its read of the policy key and its transaction, where the test publishes the next
//! version first) is answered 409 Conflict after [`PUBLISH_ATTEMPTS`] tries and changes
//! nothing; one beaten fewer times publishes the next version after the others'. An older
//! version from another gateway that the policy's watch found newer than the one in force,
//! held there (a seam between that check and the step that puts it in force) while the
//! reload publishes and puts in force a newer one, is not put in force after it. A reload's
//! own version that the watch brings back before the reload's step (a seam between the two)
//! is put in force once, by the reload, with one audit record; a reload dropped at that seam
//! leaves its version to the watches, which put it in force on every gateway and end the
//! leases it disallows, each audited once. A version whose revocation is held (a seam before
//! each lease it judges) while a newer one comes in force revokes nothing after that. A lease
//! whose end is held before its commit (a seam) is not put back into the book by a list of the
//! cluster or a change the watch brings meanwhile, and one whose renewal is held there keeps
//! the renewal's expiry through a list. An event published while a page of the trail is read
//! (a seam between the read of the follow cursor and the page's) is on the page and is not
//! followed again.
//!
//! Needs root and etcd; skipped otherwise, a failure under `FWNP_REQUIRE_NETNS=1`.

mod common;
mod etcd_cluster;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use common::{
    Client, Follower, Pki, STEP, admin_request, config_text, denied, granted, tcp, temp_dir,
};
use etcd_cluster::{EtcdCluster, available, in_cluster, published_policy, two_workers};
use fwnp_gateway::cluster::policy::StoredPolicy;
use fwnp_gateway::cluster::sha256_hex;
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::{PUBLISH_ATTEMPTS, Pause, Seams, Service};
use fwnp_proto::{LeaseId, ResultCode};
use fwnp_testkit::process::{ProcessGuard, wait_for_socket};
use fwnp_trust::tls::ServerOptions;
use serde_json::Value;

const POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_leases = 5

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7999"
"#;

/// The reload's policy: tcp/7002 and above are no longer allowed.
const NARROWER: &str = r#"
[defaults]
lifetime = "10m"
max_leases = 5

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts-web"
groups = ["hosts"]
allow = "tcp/7000-7001"
"#;

/// Gateway A (site `gw-a`) with its work held at `seams`, once it holds the cluster's first
/// policy version, and a host connected to it, its Hello answered.
async fn gateway_a_with_a_host(
    cluster: &EtcdCluster,
    pki: &Pki,
    dir: &Path,
    seams: Seams,
) -> (Gateway, Client) {
    let a = Gateway::start_with_seams(cluster, pki, dir, "gw-a", seams).await;
    until(
        "A holds policy version 1",
        || a.get("/v1/status"),
        |s| s["cluster"]["policy"]["version"] == 1,
    )
    .await;
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let client = Client::connect(a.addr, &pki.host("web-01", &[host], &[], &[])).await;
    client.hello().await;
    (a, client)
}

/// A gateway on the cluster with its admin socket, served on 127.0.0.1 of the namespace.
struct Gateway {
    service: Arc<Service>,
    addr: SocketAddr,
    admin: PathBuf,
    policy: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
}

impl Gateway {
    async fn start(cluster: &EtcdCluster, pki: &Pki, dir: &Path, site: &str) -> Gateway {
        Gateway::start_with_seams(cluster, pki, dir, site, Seams::default()).await
    }

    /// As [`Gateway::start`], with its work held at `seams`.
    async fn start_with_seams(
        cluster: &EtcdCluster,
        pki: &Pki,
        dir: &Path,
        site: &str,
        seams: Seams,
    ) -> Gateway {
        let policy = dir.join("policy.toml");
        common::write_policy(&policy, POLICY);
        let text = etcd_config_text(cluster, pki, dir, "127.0.0.1:0", site);
        let config = GatewayConfig::parse(&text, "cluster-ops.toml").expect("valid config");
        let admin = config.admin_socket.clone();
        let service = Service::start_with_seams(config, None, seams)
            .await
            .expect("service starts");
        let (endpoint, addr, serving) =
            common::serve_on_loopback(pki, &service, &ServerOptions::default());
        let mut tasks = vec![serving];
        {
            let (service, path) = (service.clone(), admin.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = fwnp_gateway::admin::serve(&path, service).await {
                    panic!("admin socket {}: {e}", path.display());
                }
            }));
        }
        let deadline = tokio::time::Instant::now() + STEP;
        while std::os::unix::net::UnixStream::connect(&admin).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "no admin socket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Gateway {
            service,
            addr,
            admin,
            policy,
            tasks,
            endpoint,
        }
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = admin_request(&self.admin, "GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Option<&Value>) -> (u16, Value) {
        admin_request(&self.admin, "POST", path, body).await
    }

    /// Stops it as the daemon does: its registration withdrawn, its tasks and endpoint gone.
    async fn stop(self) {
        if let Some(cluster) = self.service.cluster() {
            cluster.withdraw().await;
        }
        self.endpoint.close(0u32.into(), b"done");
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A gateway's configuration on the cluster (filter off), listening on `listen`.
fn etcd_config_text(
    cluster: &EtcdCluster,
    pki: &Pki,
    dir: &Path,
    listen: &str,
    site: &str,
) -> String {
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    format!(
        "{}\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/fwnp-test\"\n\
         site = \"{site}\"\ntimeout = \"2s\"\n",
        config_text(pki, dir, listen, "[filter]\nenabled = false"),
        endpoints.join(", ")
    )
}

/// Polls `read` until `accept` holds of its answer, at most [`STEP`] and a half.
async fn until<F, Fut>(what: &str, mut read: F, accept: impl Fn(&Value) -> bool) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let deadline = tokio::time::Instant::now() + STEP + STEP / 2;
    loop {
        let value = read().await;
        if accept(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never held; last answer: {value:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs fwnpctl against a gateway's admin socket, off the runtime that serves it; it must
/// succeed.
async fn fwnpctl(admin: &Path, args: &[&str]) -> (String, String) {
    let (success, stdout, stderr) = fwnpctl_output(admin, args).await;
    assert!(success, "fwnpctl {args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

/// Runs fwnpctl against a gateway's admin socket, off the runtime that serves it: whether it
/// succeeded, its standard output and its standard error.
async fn fwnpctl_output(admin: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["--admin".to_owned(), admin.display().to_string()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fwnpctl"))
            .args(&all)
            .output()
            .expect("run fwnpctl")
    })
    .await
    .expect("fwnpctl ran");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The line of `fwnpctl status` that lists `site` among the members.
fn member_line<'a>(status: &'a str, site: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(site))
}

fn member<'a>(status: &'a Value, site: &str) -> Option<&'a Value> {
    status["cluster"]["members"]
        .as_array()?
        .iter()
        .find(|m| m["site"] == site)
}

/// The lease's key in etcd, if it is there.
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

fn events_of_lease<'a>(page: &'a Value, lease: LeaseId, kind: &str) -> Vec<&'a Value> {
    page["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["kind"] == kind && e["lease"] == lease.to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_gateways_share_members_policy_audit_and_revocations() {
    in_cluster(
        "two_gateways_share_members_policy_audit_and_revocations",
        "clops",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-ops");
            let (dir_a, dir_b) = (temp_dir("clops-a"), temp_dir("clops-b"));
            let a = Gateway::start(cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;

            // Status through either lists both members, live, with the revision each
            // last applied and the policy version each holds.
            for gateway in [&a, &b] {
                let status = until(
                    "both members live",
                    || gateway.get("/v1/status"),
                    |s| {
                        ["gw-a", "gw-b"].iter().all(|site| {
                            member(s, site).is_some_and(|m| {
                                m["live"] == true
                                    && m["revision"].as_i64().unwrap_or(0) > 0
                                    && m["policy_version"] == 1
                            })
                        })
                    },
                )
                .await;
                assert_eq!(status["cluster"]["policy"]["version"], 1, "{status:#}");
                assert_eq!(status["cluster"]["policy"]["file_differs"], false);
            }

            // As the operator reads it.
            let (status, _) = fwnpctl(&a.admin, &["status"]).await;
            for site in ["gw-a", "gw-b"] {
                let line = member_line(&status, site).unwrap_or_default();
                assert!(
                    line.contains(" live ") && line.contains("policy v1"),
                    "{site} in {status}"
                );
            }

            let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let web1 = pki.host("web-01", &[host], &[], &[]);
            let web2 = pki.host("web-02", &[host], &[], &[]);
            let to_a = Client::connect(a.addr, &web1).await;
            to_a.hello().await;
            let on_a = granted(to_a.open(tcp(7001), None).await).lease;
            let to_b = Client::connect(b.addr, &web2).await;
            to_b.hello().await;
            let on_b = granted(to_b.open(tcp(7002), None).await).lease;

            // The cluster's trail through A shows B's grant, and A's own.
            let page = until(
                "B's grant in A's audit",
                || a.get("/v1/audit?kind=grant&limit=100"),
                |p| {
                    p["events"].as_array().is_some_and(|events| {
                        events
                            .iter()
                            .any(|e| e["site"] == "gw-b" && e["lease"] == on_b.to_string())
                    })
                },
            )
            .await;
            assert!(
                page["events"].as_array().is_some_and(|events| events
                    .iter()
                    .any(|e| e["site"] == "gw-a" && e["lease"] == on_a.to_string())),
                "{page:#}"
            );
            assert!(page.get("unreachable").is_none(), "{page:#}");
            // scope=local: A's own events only.
            let own = a.get("/v1/audit?kind=grant&limit=100&scope=local").await;
            let own = own["events"].as_array().expect("events");
            assert!(own.iter().any(|e| e["lease"] == on_a.to_string()));
            assert!(
                !own.iter().any(|e| e["lease"] == on_b.to_string()),
                "{own:#?}"
            );

            // Followed through A from where the page stood: a grant through either member
            // comes, named with its site, and nothing the page already held.
            let mut after = page["follow_from"]
                .as_str()
                .unwrap_or_else(|| panic!("a cluster's page says where to follow from: {page:#}"))
                .to_owned();
            assert!(
                after.contains("gw-a:") && after.contains("gw-b:"),
                "{after}"
            );
            // And by an operator, through A, once its first page is printed.
            let mut follower = Follower::start(
                &a.admin,
                &[
                    "--json", "audit", "--kind", "grant", "--limit", "1", "--follow",
                ],
            );
            let first = follower.line(Duration::from_secs(20)).await;
            assert!(first.is_some(), "fwnpctl printed its page");
            let more_a = granted(to_a.open(tcp(7005), None).await).lease;
            let more_b = granted(to_b.open(tcp(7006), None).await).lease;
            let wanted = [("gw-a", more_a.to_string()), ("gw-b", more_b.to_string())];
            let mut followed: Vec<(String, String)> = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !wanted
                .iter()
                .all(|(site, lease)| followed.iter().any(|f| f.0 == *site && f.1 == *lease))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "both grants followed through A: {followed:?}"
                );
                let answer = a
                    .get(&format!("/v1/audit?kind=grant&after={after}&wait=5s"))
                    .await;
                for event in answer["events"].as_array().expect("events") {
                    followed.push((
                        event["site"].as_str().unwrap_or_default().to_owned(),
                        event["lease"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
                after = answer["next_cluster_after"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a cluster's follow goes on: {answer:#}"))
                    .to_owned();
            }
            assert_eq!(followed.len(), 2, "each grant once, no other: {followed:?}");
            let mut printed: Vec<(String, String)> = Vec::new();
            while printed.len() < 2 {
                let line = follower
                    .line(Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|| panic!("fwnpctl follows both grants: {printed:?}"));
                let event: Value = serde_json::from_str(&line).expect("a JSON line");
                printed.push((
                    event["site"].as_str().unwrap_or_default().to_owned(),
                    event["lease"].as_str().unwrap_or_default().to_owned(),
                ));
            }
            printed.sort();
            assert_eq!(
                printed,
                wanted.map(|(site, lease)| (site.to_owned(), lease))
            );
            drop(follower);
            // Out of the way of the reload below.
            for (client, lease) in [(&to_a, more_a), (&to_b, more_b)] {
                let released = client.release(lease).await;
                assert!(
                    matches!(released, fwnp_proto::Message::Released(_)),
                    "{released:?}"
                );
            }
            // A cursor that is neither an event id nor a cluster's is refused, and says why.
            let (status, refused) =
                admin_request(&a.admin, "GET", "/v1/audit?after=gw-a:x", None).await;
            assert_eq!(status, 400, "{refused:#}");
            assert!(
                refused.to_string().contains("not an event id"),
                "{refused:#}"
            );

            // A policy reload through A reaches B: the lease granted through B that the
            // new policy no longer allows is revoked (its host, connected to B, is told
            // by B) and B refuses what it refuses.
            common::write_policy(&a.policy, NARROWER);
            let (status, reload) = a.post("/v1/policy/reload", None).await;
            assert_eq!(status, 200, "{reload:#}");
            until(
                "B holds policy version 2",
                || b.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 2,
            )
            .await;
            let notice = to_b.next_notice(STEP).await;
            assert!(
                matches!(&notice, Some(fwnp_proto::Message::Revoked(r)) if r.lease == on_b),
                "{notice:?}"
            );
            let refused = denied(to_b.open(tcp(7003), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
            assert!(!lease_in_etcd(cluster, on_b).await, "the end is in etcd");
            assert!(lease_in_etcd(cluster, on_a).await, "still allowed");
            // B's own file differs from the cluster's policy now, and B says so.
            let status_b = b.get("/v1/status").await;
            assert_eq!(status_b["cluster"]["policy"]["file_differs"], true);
            let status_a = a.get("/v1/status").await;
            assert_eq!(status_a["cluster"]["policy"]["file_differs"], false);
            let store = status_a["store"].as_str().unwrap_or_default();
            assert!(
                store.starts_with("etcd ") && store.contains("as site gw-a"),
                "{status_a:#}"
            );
            // A gateway started now, with the old file, enforces the cluster's version 2
            // from its first decision, and says its file differs.
            let dir_c = temp_dir("clops-c");
            let c = Gateway::start(cluster, &pki, dir_c.path(), "gw-c").await;
            let status_c = c.get("/v1/status").await;
            assert_eq!(status_c["cluster"]["policy"]["version"], 2, "{status_c:#}");
            assert_eq!(status_c["cluster"]["policy"]["file_differs"], true);
            let web3 = pki.host("web-03", &[host], &[], &[]);
            let to_c = Client::connect(c.addr, &web3).await;
            to_c.hello().await;
            let refused = denied(to_c.open(tcp(7003), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
            drop(to_c);
            c.stop().await;

            // One revocation record in the cluster's trail: A's reload and B's watch both
            // revoke what version 2 disallows, and etcd takes each end from one of them.
            let page = until(
                "the revocation in A's audit",
                || a.get("/v1/audit?kind=revocation&limit=100"),
                |p| !events_of_lease(p, on_b, "revocation").is_empty(),
            )
            .await;
            let records = events_of_lease(&page, on_b, "revocation");
            assert_eq!(records.len(), 1, "{page:#}");
            assert!(
                records[0]["site"] == "gw-a" || records[0]["site"] == "gw-b",
                "{page:#}"
            );

            // The operator revokes through B what was granted through A: ended in etcd.
            let (answer, _) = fwnpctl(
                &b.admin,
                &[
                    "--json",
                    "revoke",
                    &on_a.to_string(),
                    "--reason",
                    "maintenance",
                ],
            )
            .await;
            let revoked: Value = serde_json::from_str(&answer).expect("JSON answer");
            assert_eq!(revoked["revoked"], on_a.to_string(), "{revoked:#}");
            assert_eq!(revoked["host"], "fwnp://host/web-01");
            assert!(!lease_in_etcd(cluster, on_a).await, "ended in etcd");
            let (status, again) = b.post(&format!("/v1/leases/{on_a}/revoke"), None).await;
            assert_eq!(status, 404, "{again:#}");
            let page = until(
                "the operator's revocation in A's audit",
                || a.get("/v1/audit?kind=revocation&limit=100"),
                |p| !events_of_lease(p, on_a, "revocation").is_empty(),
            )
            .await;
            let records = events_of_lease(&page, on_a, "revocation");
            assert_eq!(records.len(), 1, "{page:#}");
            assert_eq!(records[0]["actor"], "operator");

            // B stops: A lists it as absent, with what it last published, and its audit
            // names it as a member whose events may be missing.
            let b_revision = member(&a.get("/v1/status").await, "gw-b")
                .map(|m| m["revision"].clone())
                .expect("gw-b listed");
            drop(to_b);
            b.stop().await;
            let status = until(
                "gw-b absent",
                || a.get("/v1/status"),
                |s| member(s, "gw-b").is_some_and(|m| m["live"] == false),
            )
            .await;
            let gone = member(&status, "gw-b").expect("gw-b listed");
            assert!(gone["revision"].as_i64() >= b_revision.as_i64(), "{gone:#}");
            assert_eq!(
                member(&status, "gw-a").map(|m| &m["live"]),
                Some(&Value::Bool(true))
            );
            let page = a.get("/v1/audit?limit=100").await;
            let unreachable = page["unreachable"].as_array().expect("unreachable members");
            assert!(
                unreachable.iter().any(|u| u["site"] == "gw-b"),
                "{unreachable:#?}"
            );
            assert!(
                page["events"]
                    .as_array()
                    .is_some_and(|events| events.iter().any(|e| e["site"] == "gw-b")),
                "B's published events are still shown"
            );
            let (status, _) = fwnpctl(&a.admin, &["status"]).await;
            assert!(
                member_line(&status, "gw-b").is_some_and(|l| l.contains(" absent ")),
                "{status}"
            );
            let (trail, warning) = fwnpctl(&a.admin, &["audit", "--limit", "100"]).await;
            assert!(
                warning.contains("the events of member gw-b may be missing"),
                "{warning}"
            );
            assert!(
                trail.contains("[gw-b]") && trail.contains("[gw-a]"),
                "{trail}"
            );
            drop(to_a);
            a.stop().await;
        },
    );
}

/// A gateway whose state directory is replaced (a new machine, a lost disk) comes back with a
/// database that numbers its events from 1, where its site has published events up to some
/// id and followers' cursors stand past them. Its events now come after what it published:
/// a follow through another member from a cursor made before the replacement hands over its
/// new grants, and its published events stay in the cluster's trail.
#[test]
fn a_gateway_with_a_new_database_numbers_its_events_after_what_its_site_published() {
    in_cluster(
        "a_gateway_with_a_new_database_numbers_its_events_after_what_its_site_published",
        "clnewdb",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-newdb");
            let (dir_a, dir_b) = (temp_dir("clnewdb-a"), temp_dir("clnewdb-b"));
            let a = Gateway::start(cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let web1 = pki.host("web-01", &[host], &[], &[]);
            let to_a = Client::connect(a.addr, &web1).await;
            to_a.hello().await;
            let mut first = Vec::new();
            for port in 7000..7004 {
                first.push(granted(to_a.open(tcp(port), None).await).lease.to_string());
            }
            // Through B once A has published them; B's page says where to follow from.
            let grants_of_a = |page: &Value| -> Vec<String> {
                page["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|e| e["site"] == "gw-a")
                    .filter_map(|e| e["lease"].as_str().map(str::to_owned))
                    .collect()
            };
            let page = until(
                "A's grants published",
                || b.get("/v1/audit?kind=grant&limit=100"),
                |p| first.iter().all(|lease| grants_of_a(p).contains(lease)),
            )
            .await;
            let cursor = page["follow_from"]
                .as_str()
                .unwrap_or_else(|| panic!("a cluster's page says where to follow from: {page:#}"))
                .to_owned();
            let published: u64 = cursor
                .split(',')
                .find_map(|entry| entry.strip_prefix("gw-a:"))
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("the cursor names gw-a: {cursor}"));
            assert!(published >= 4, "A's grants are behind the cursor: {cursor}");
            drop(to_a);
            a.stop().await;

            // A again, on a new state directory: an empty database.
            let dir_new = temp_dir("clnewdb-a2");
            let a = Gateway::start(cluster, &pki, dir_new.path(), "gw-a").await;
            let to_a = Client::connect(a.addr, &web1).await;
            to_a.hello().await;
            let later = granted(to_a.open(tcp(7005), None).await).lease.to_string();
            // Recorded in A's database once etcd took the lease, after the answer.
            let own = until(
                "the grant in A's new database",
                || a.get("/v1/audit?kind=grant&limit=100&scope=local"),
                |page| page["events"].as_array().is_some_and(|e| !e.is_empty()),
            )
            .await;
            let own: Vec<&Value> = own["events"].as_array().expect("events").iter().collect();
            assert_eq!(own.len(), 1, "the new database holds one grant: {own:#?}");
            let id = own[0]["id"].as_u64().expect("an event id");
            assert!(id > published, "event {id} numbered after {published}");

            // Followed through B from the cursor made before: the new grant comes.
            let mut after = cursor;
            let mut followed = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !followed.contains(&later) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "A's new grant followed through B: {followed:?}"
                );
                let answer = b
                    .get(&format!("/v1/audit?kind=grant&after={after}&wait=5s"))
                    .await;
                followed.extend(grants_of_a(&answer));
                after = answer["next_cluster_after"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a cluster's follow goes on: {answer:#}"))
                    .to_owned();
            }
            assert_eq!(
                followed,
                std::slice::from_ref(&later),
                "the new grant, once"
            );
            // What the first database published is still the cluster's.
            let page = b.get("/v1/audit?kind=grant&limit=100").await;
            let shown = grants_of_a(&page);
            assert!(
                first
                    .iter()
                    .chain([&later])
                    .all(|lease| shown.contains(lease)),
                "{page:#}"
            );
            drop(to_a);
            a.stop().await;
            b.stop().await;
        },
    );
}

#[test]
fn a_killed_gateway_is_absent_once_its_registration_runs_out_and_a_stopped_one_at_its_stop() {
    in_cluster(
        "a_killed_gateway_is_absent_once_its_registration_runs_out_and_a_stopped_one_at_its_stop",
        "clkill",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-kill");
            let (dir_a, dir_b) = (temp_dir("clkill-a"), temp_dir("clkill-b"));
            let a = Gateway::start(cluster, &pki, dir_a.path(), "gw-a").await;
            // B is a real daemon process, as a gateway's machine runs it.
            common::write_policy(&dir_b.path().join("policy.toml"), POLICY);
            let config_b = dir_b.path().join("gateway.toml");
            std::fs::write(
                &config_b,
                etcd_config_text(cluster, &pki, dir_b.path(), "127.0.0.1:0", "gw-b"),
            )
            .expect("write B's config");
            let admin_b = dir_b.path().join("admin.sock");
            let start_b = || {
                let mut daemon = ProcessGuard::spawn(
                    std::process::Command::new(env!("CARGO_BIN_EXE_fwnp-gateway"))
                        .arg("--config")
                        .arg(&config_b)
                        .env("RUST_LOG", "warn"),
                )
                .expect("start fwnp-gateway");
                tokio::task::block_in_place(|| wait_for_socket(&mut daemon, &admin_b, STEP));
                daemon
            };
            let live = |site: &'static str, want: bool| {
                move |s: &Value| member(s, site).is_some_and(|m| m["live"] == want)
            };

            let mut b = start_b();
            let status = until("gw-b live", || a.get("/v1/status"), live("gw-b", true)).await;
            let first_start = member(&status, "gw-b").expect("gw-b")["started_ms"].clone();
            // SIGKILL: no withdrawal; the registration runs out with its etcd lease.
            b.kill();
            let killed = tokio::time::Instant::now();
            until("gw-b absent", || a.get("/v1/status"), live("gw-b", false)).await;
            let took = killed.elapsed();
            assert!(
                took <= Duration::from_secs(5) + Duration::from_secs(4),
                "absent after {took:?}: the registration's TTL is 5 s"
            );

            // Restarted, it is live again with a new start; stopped with SIGTERM, it
            // withdraws its registration as it stops.
            let mut b = start_b();
            let status = until(
                "gw-b live again",
                || a.get("/v1/status"),
                live("gw-b", true),
            )
            .await;
            assert_ne!(
                member(&status, "gw-b").expect("gw-b")["started_ms"],
                first_start
            );
            tokio::task::block_in_place(|| b.terminate(STEP));
            let status = a.get("/v1/status").await;
            assert_eq!(
                member(&status, "gw-b").map(|m| &m["live"]),
                Some(&Value::Bool(false)),
                "absent as soon as it stopped: {status:#}"
            );
            a.stop().await;
        },
    );
}

/// The report's row of `identity` and `opening`.
fn report_row<'a>(report: &'a Value, identity: &str, opening: &str) -> Option<&'a Value> {
    report["rows"]
        .as_array()?
        .iter()
        .find(|r| r["identity"] == identity && r["opening"] == opening)
}

#[test]
fn the_report_through_either_gateway_covers_the_cluster_and_names_a_member_it_may_lack() {
    in_cluster(
        "the_report_through_either_gateway_covers_the_cluster_and_names_a_member_it_may_lack",
        "clrep",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-report");
            let (dir_a, dir_b) = (temp_dir("clrep-a"), temp_dir("clrep-b"));
            let a = Gateway::start(cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let web1 = pki.host("web-01", &[host], &[], &[]);
            let web2 = pki.host("web-02", &[host], &[], &[]);
            let to_a = Client::connect(a.addr, &web1).await;
            to_a.hello().await;
            let on_a = granted(to_a.open(tcp(7001), None).await).lease;
            let refused = denied(to_a.open(tcp(8000), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
            let to_b = Client::connect(b.addr, &web2).await;
            to_b.hello().await;
            granted(to_b.open(tcp(7002), None).await);

            // Through B: A's grant and denial as well as B's own grant, the held time of
            // A's live lease counted.
            let report = until(
                "A's decisions in B's report",
                || b.get("/v1/report?since=1h"),
                |r| {
                    // B's own events reach its database a moment after the answer too.
                    report_row(r, "fwnp://host/web-01", "tcp/8000").is_some()
                        && report_row(r, "fwnp://host/web-02", "tcp/7002").is_some()
                },
            )
            .await;
            let row = report_row(&report, "fwnp://host/web-01", "tcp/7001")
                .unwrap_or_else(|| panic!("A's grant in B's report: {report:#}"));
            assert_eq!(row["granted"], 1, "{row:#}");
            assert_eq!(row["leases"], 1, "{row:#}");
            assert!(row["total_held_ms"].as_u64() > Some(0), "{row:#}");
            let row = report_row(&report, "fwnp://host/web-01", "tcp/8000").expect("row");
            assert_eq!((&row["granted"], &row["denied"]), (&0.into(), &1.into()));
            let row = report_row(&report, "fwnp://host/web-02", "tcp/7002").expect("row");
            assert_eq!(row["granted"], 1, "{row:#}");
            assert!(report.get("unreachable").is_none(), "{report:#}");
            assert!(
                report["suggested_policy"]
                    .as_str()
                    .is_some_and(|p| p.contains("tcp/7001") && p.contains("tcp/7002")),
                "{report:#}"
            );
            // As the operator reads it, through B.
            let (text, warning) = fwnpctl(&b.admin, &["report", "--since", "1h"]).await;
            assert!(
                text.contains("fwnp://host/web-01") && text.contains("fwnp://host/web-02"),
                "{text}"
            );
            assert!(warning.is_empty(), "{warning}");

            // A released lease's held time ends at its release, once B sees A's record
            // of it: it no longer grows.
            to_a.release(on_a).await;
            until(
                "A's release in B's trail",
                || b.get("/v1/audit?kind=release&limit=100"),
                |p| !events_of_lease(p, on_a, "release").is_empty(),
            )
            .await;
            let held = || async {
                let report = b.get("/v1/report?since=1h").await;
                report_row(&report, "fwnp://host/web-01", "tcp/7001")
                    .and_then(|row| row["total_held_ms"].as_u64())
            };
            let first = held().await;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            assert_eq!(held().await, first, "held until the release, not after");
            assert!(first > Some(0), "{first:?}");

            // A stops: B's report still shows what A published and names A.
            drop(to_a);
            a.stop().await;
            let report = until(
                "gw-a named in B's report",
                || b.get("/v1/report?since=1h"),
                |r| {
                    r["unreachable"]
                        .as_array()
                        .is_some_and(|u| u.iter().any(|m| m["site"] == "gw-a"))
                },
            )
            .await;
            assert!(
                report_row(&report, "fwnp://host/web-01", "tcp/7001").is_some(),
                "{report:#}"
            );
            let (_, warning) = fwnpctl(&b.admin, &["report", "--since", "1h"]).await;
            assert!(
                warning.contains("the events of member gw-a may be missing"),
                "{warning}"
            );
            drop(to_b);
            b.stop().await;
        },
    );
}

#[test]
fn reloads_at_the_same_moment_each_publish_a_version_in_turn() {
    in_cluster(
        "reloads_at_the_same_moment_each_publish_a_version_in_turn",
        "clreload",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-reload");
            let (dir_a, dir_b) = (temp_dir("clreload-a"), temp_dir("clreload-b"));
            let a = Gateway::start(cluster, &pki, dir_a.path(), "gw-a").await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            until(
                "A holds policy version 1",
                || a.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 1,
            )
            .await;
            // Two reloads through A and one through B, sent together: the second through
            // A waits for the first, the one through B publishes after whichever it met.
            for round in 0..2 {
                let (first, second, other) = tokio::join!(
                    a.post("/v1/policy/reload", None),
                    a.post("/v1/policy/reload", None),
                    b.post("/v1/policy/reload", None),
                );
                for (status, body) in [first, second, other] {
                    assert_eq!(status, 200, "round {round}: {body:#}");
                    assert_eq!(body["revoked"], serde_json::json!([]), "{body:#}");
                }
            }
            // Six reloads, six versions, on both gateways.
            for gateway in [&a, &b] {
                until(
                    "policy version 7",
                    || gateway.get("/v1/status"),
                    |s| s["cluster"]["policy"]["version"] == 7,
                )
                .await;
            }
            a.stop().await;
            b.stop().await;
        },
    );
}

#[test]
fn status_shows_the_etcd_store_with_its_applied_revision_and_transactions() {
    in_cluster(
        "status_shows_the_etcd_store_with_its_applied_revision_and_transactions",
        "clstatus",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-status");
            let dir = temp_dir("clstatus-a");
            let a = Gateway::start(cluster, &pki, dir.path(), "gw-a").await;
            let before = a.get("/v1/status").await;
            let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let web1 = pki.host("web-01", &[host], &[], &[]);
            let client = Client::connect(a.addr, &web1).await;
            client.hello().await;
            let lease = granted(client.open(tcp(7001), None).await).lease;
            client.release(lease).await;

            let status = a.get("/v1/status").await;
            let store = &status["store_backend"];
            assert_eq!(store["backend"], "etcd", "{status:#}");
            assert_eq!(
                store["endpoints"],
                serde_json::json!(cluster.endpoints()),
                "{status:#}"
            );
            assert_eq!(store["prefix"], "/fwnp-test");
            assert_eq!(store["site"], "gw-a");
            let audit_database = store["audit_database"].as_str().unwrap_or_default();
            assert!(
                audit_database.starts_with(&dir.path().join("state").display().to_string()),
                "{status:#}"
            );
            // The grant and the release: two write transactions more than before, applied.
            let count = |s: &Value, what: &str| s["store_backend"][what].as_u64();
            let transactions = count(&status, "transactions").expect("transactions");
            assert!(
                transactions >= count(&before, "transactions").expect("before") + 2,
                "{before:#} then {status:#}"
            );
            assert_eq!(count(&status, "unanswered"), Some(0), "{status:#}");
            assert!(count(&status, "conflicts") <= Some(transactions));
            // The watch brings this gateway's own writes back: the revision goes past them.
            let applied = until(
                "the release applied",
                || a.get("/v1/status"),
                |s| {
                    s["store_backend"]["applied_revision"].as_i64()
                        > before["store_backend"]["applied_revision"].as_i64()
                },
            )
            .await;
            let revision = applied["store_backend"]["applied_revision"]
                .as_i64()
                .expect("a revision");
            assert!(revision > 0, "{applied:#}");

            // As the operator reads it: the cluster, not the audit database, as the store.
            let (text, _) = fwnpctl(&a.admin, &["status"]).await;
            let line = |name: &str| {
                text.lines()
                    .find(|l| l.trim_start().starts_with(name))
                    .unwrap_or_default()
                    .to_owned()
            };
            assert_eq!(
                line("store ").split_whitespace().nth(1),
                Some("etcd"),
                "{text}"
            );
            assert!(
                line("endpoints").contains(&cluster.endpoints().join(",")),
                "{text}"
            );
            assert!(line("prefix").ends_with("/fwnp-test"), "{text}");
            let shown: i64 = line("applied revision")
                .split_whitespace()
                .nth(2)
                .and_then(|r| r.parse().ok())
                .expect("a revision shown");
            assert!(shown >= revision, "{text}");
            assert!(line("transactions").contains("without an answer"), "{text}");
            assert!(line("audit database").contains(audit_database), "{text}");
            assert!(!line("store ").contains(audit_database), "{text}");
            a.stop().await;
        },
    );
}

#[test]
fn a_reload_without_etcd_quorum_is_unavailable_and_succeeds_once_it_is_back() {
    const TEST: &str = "a_reload_without_etcd_quorum_is_unavailable_and_succeeds_once_it_is_back";
    if !available(TEST) {
        return;
    }
    let mut cluster = EtcdCluster::start("clrlq").unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new("cluster-reload-quorum");
    let dir = temp_dir("clrlq-a");
    // Members are killed and started between the steps, outside the runtime's block.
    let (rt, a) = cluster.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let a = rt.block_on(async {
            let a = Gateway::start(&cluster, &pki, dir.path(), "gw-a").await;
            until(
                "A holds policy version 1",
                || a.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 1,
            )
            .await;
            common::write_policy(&a.policy, NARROWER);
            a
        });
        (rt, a)
    });

    cluster.kill(0);
    cluster.kill(1);
    cluster.run(|| {
        rt.block_on(async {
            let (status, body) = a.post("/v1/policy/reload", None).await;
            assert_eq!(status, 503, "{body:#}");
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                error.starts_with("policy not reloaded, the old one stays in force: etcd"),
                "{body:#}"
            );
        })
    });

    cluster.restart(0).unwrap_or_else(|e| panic!("{e}"));
    cluster.restart(1).unwrap_or_else(|e| panic!("{e}"));
    assert!(cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30)));
    cluster.run(|| {
        rt.block_on(async {
            // The same reload, asked again with the quorum back, publishes version 2.
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                let (status, body) = a.post("/v1/policy/reload", None).await;
                if status == 200 {
                    break;
                }
                assert!(
                    status == 503 && tokio::time::Instant::now() < deadline,
                    "{status}: {body:#}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            until(
                "A holds policy version 2",
                || a.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 2,
            )
            .await;
            a.stop().await;
        })
    });
    drop(rt);
}

/// The site of the other gateway whose reloads beat A's publishes.
const RIVAL: &str = "gw-rival";

/// Another gateway's reloads, met at the seam of A's publish ([`Seams::publishing`]): between
/// A's read of `P/policy` and its transaction, the rival publishes the next version itself
/// (the text of [`POLICY`], a reload of an unchanged file there) and waits until A has put it
/// in force, so that A's transaction finds the key changed. Once armed, it does so at the
/// first `losses` publishes of A, then lets A's through.
struct Rival {
    endpoints: Vec<String>,
    armed: AtomicBool,
    losses: AtomicU32,
    /// A's publishes that reached the seam since the rival was armed.
    publishes: AtomicU32,
    gateway: OnceLock<Weak<Service>>,
}

impl Rival {
    fn new(cluster: &EtcdCluster) -> Arc<Rival> {
        Arc::new(Rival {
            endpoints: cluster.endpoints(),
            armed: AtomicBool::new(false),
            losses: AtomicU32::new(0),
            publishes: AtomicU32::new(0),
            gateway: OnceLock::new(),
        })
    }

    /// A's seams: the rival at its publishes.
    fn seams(self: &Arc<Self>) -> Seams {
        let rival = self.clone();
        let publishing: Pause = Arc::new(move || {
            let rival = rival.clone();
            Box::pin(async move { rival.meet().await })
        });
        Seams {
            publishing: Some(publishing),
            ..Seams::default()
        }
    }

    /// From now on, beats A's next `losses` publishes.
    fn arm(&self, gateway: &Gateway, losses: u32) {
        let _ = self.gateway.set(Arc::downgrade(&gateway.service));
        self.losses.store(losses, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    fn publishes(&self) -> u32 {
        self.publishes.load(Ordering::Acquire)
    }

    async fn meet(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        self.publishes.fetch_add(1, Ordering::AcqRel);
        let beaten = self
            .losses
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if beaten.is_err() {
            return;
        }
        let version = self.publish().await;
        until_in_force(&self.gateway, version).await;
    }

    /// Publishes the next version of the cluster's policy, as a gateway's reload does;
    /// returns it.
    async fn publish(&self) -> u64 {
        publish_as_rival(&self.endpoints, POLICY).await
    }
}

/// Publishes `text` as the next version of the cluster's policy, as the rival's reload does;
/// returns the version.
/// Waits until gateway A (once started, in `gateway`) has put the cluster's policy `version`
/// in force.
async fn until_in_force(gateway: &OnceLock<Weak<Service>>, version: u64) {
    let service = gateway
        .get()
        .and_then(Weak::upgrade)
        .expect("A runs while the rival publishes");
    let member = service.cluster().expect("A is a member").clone();
    let deadline = tokio::time::Instant::now() + STEP;
    while member.status().await.policy.version < version {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never put the rival's version {version} in force"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish_as_rival(endpoints: &[String], text: &str) -> u64 {
    let current = published_policy(endpoints)
        .await
        .expect("a policy is published")
        .0;
    let stored = StoredPolicy {
        version: current.version + 1,
        hash: sha256_hex(text.as_bytes()),
        text: text.to_owned(),
        site: RIVAL.to_owned(),
        file: "/etc/fwnp/policy.toml".to_owned(),
    };
    let mut client = etcd_client::Client::connect(endpoints, None)
        .await
        .expect("etcd client");
    client
        .put(
            "/fwnp-test/policy",
            serde_json::to_vec(&stored).expect("JSON"),
            None,
        )
        .await
        .expect("publish the rival's version");
    stored.version
}

#[test]
fn a_reload_beaten_at_every_publish_is_answered_409_and_changes_nothing() {
    in_cluster(
        "a_reload_beaten_at_every_publish_is_answered_409_and_changes_nothing",
        "cl409",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-409");
            let dir = temp_dir("cl409-a");
            let rival = Rival::new(cluster);
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), rival.seams()).await;

            common::write_policy(&a.policy, NARROWER);
            rival.arm(&a, u32::MAX);
            let attempts = u64::from(PUBLISH_ATTEMPTS);
            let conflict = |version: u64| {
                format!(
                    "policy not reloaded, the old one stays in force: another gateway published \
                     policy version {version} meanwhile; reload again (other gateways' reloads \
                     are in progress, {PUBLISH_ATTEMPTS} attempts)"
                )
            };
            let (status, body) = a.post("/v1/policy/reload", None).await;
            assert_eq!(status, 409, "{body:#}");
            assert_eq!(body["error"], conflict(1 + attempts), "{body:#}");
            assert_eq!(rival.publishes(), PUBLISH_ATTEMPTS);

            let (ok, stdout, stderr) = fwnpctl_output(&a.admin, &["policy", "reload"]).await;
            assert!(!ok, "{stdout}{stderr}");
            assert_eq!(stdout, "");
            assert_eq!(stderr, format!("fwnpctl: {}\n", conflict(1 + 2 * attempts)));
            assert_eq!(rival.publishes(), 2 * PUBLISH_ATTEMPTS);

            // The key was written at A's start and by the rival only: the cluster's policy
            // is the rival's last version, of the old text.
            let (stored, writes) = published_policy(&cluster.endpoints())
                .await
                .expect("a policy is published");
            assert_eq!(writes, 1 + 2 * i64::from(PUBLISH_ATTEMPTS));
            assert_eq!(stored.version, 1 + 2 * attempts);
            assert_eq!(
                (stored.site.as_str(), stored.text.as_str()),
                (RIVAL, POLICY)
            );
            // In force on A: the old text, not the reloaded file, which A says differs.
            let status = a.get("/v1/status").await;
            let policy = &status["cluster"]["policy"];
            assert_eq!(policy["version"], 1 + 2 * attempts, "{status:#}");
            assert_eq!(policy["hash"], sha256_hex(POLICY.as_bytes()), "{status:#}");
            assert_eq!(policy["file_differs"], true, "{status:#}");
            assert_eq!(
                status["policy"],
                stored.origin(),
                "the rival's version is in force: {status:#}"
            );
            granted(client.open(tcp(7002), None).await);
            drop(client);
            a.stop().await;
        },
    );
}

#[test]
fn a_reload_beaten_fewer_times_than_its_attempts_publishes_the_next_version() {
    in_cluster(
        "a_reload_beaten_fewer_times_than_its_attempts_publishes_the_next_version",
        "clbeaten",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-beaten");
            let dir = temp_dir("clbeaten-a");
            let rival = Rival::new(cluster);
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), rival.seams()).await;
            let lease = granted(client.open(tcp(7002), None).await).lease;

            common::write_policy(&a.policy, NARROWER);
            let losses = PUBLISH_ATTEMPTS - 1;
            rival.arm(&a, losses);
            let (stdout, stderr) = fwnpctl(&a.admin, &["policy", "reload"]).await;
            assert_eq!(rival.publishes(), PUBLISH_ATTEMPTS);
            let file = a.policy.display().to_string();
            assert!(
                stdout.starts_with(&format!("policy {file} loaded; 1 live leases revoked\n")),
                "{stdout}"
            );
            assert!(
                stdout.contains(&format!("  revoked {lease} (fwnp://host/web-01): ")),
                "{stdout}"
            );
            assert!(stderr.is_empty(), "{stderr}");

            // After the rival's versions 2 to 1 + losses, A's file as the next one.
            let version = 2 + u64::from(losses);
            let (stored, writes) = published_policy(&cluster.endpoints())
                .await
                .expect("a policy is published");
            assert_eq!(stored.version, version);
            assert_eq!(writes, 2 + i64::from(losses));
            assert_eq!(
                (
                    stored.site.as_str(),
                    stored.text.as_str(),
                    stored.file.as_str()
                ),
                ("gw-a", NARROWER, file.as_str())
            );
            let status = a.get("/v1/status").await;
            let policy = &status["cluster"]["policy"];
            assert_eq!(policy["version"], version, "{status:#}");
            assert_eq!(
                policy["hash"],
                sha256_hex(NARROWER.as_bytes()),
                "{status:#}"
            );
            assert_eq!(policy["file_differs"], false, "{status:#}");
            let refused = denied(client.open(tcp(7002), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
            assert!(
                !lease_in_etcd(cluster, lease).await,
                "the revoked lease's end is in etcd"
            );
            drop(client);
            a.stop().await;
        },
    );
}

/// A's policy watch, held at its seam ([`Seams::adopting`]): once armed, each version the
/// watch finds newer than the one in force waits there, after that check, until the test
/// lets it go on.
struct HeldWatch {
    armed: AtomicBool,
    /// The versions that reached the seam since it was armed.
    reached: AtomicU32,
    go: tokio::sync::Semaphore,
}

impl HeldWatch {
    fn new() -> Arc<HeldWatch> {
        Arc::new(HeldWatch {
            armed: AtomicBool::new(false),
            reached: AtomicU32::new(0),
            go: tokio::sync::Semaphore::new(0),
        })
    }

    /// A's seams: the watch held before it puts a version in force.
    fn seams(self: &Arc<Self>) -> Seams {
        let held = self.clone();
        let adopting: Pause = Arc::new(move || {
            let held = held.clone();
            Box::pin(async move { held.hold().await })
        });
        Seams {
            adopting: Some(adopting),
            ..Seams::default()
        }
    }

    async fn hold(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        self.reached.fetch_add(1, Ordering::AcqRel);
        // Closed at the end of the test: whatever is held then goes on.
        if let Ok(permit) = self.go.acquire().await {
            permit.forget();
        }
    }

    /// Waits (at most [`STEP`]) until `count` versions have reached the seam.
    async fn until_reached(&self, count: u32) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.reached.load(Ordering::Acquire) < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watch brought {} versions to its seam, not {count}",
                self.reached.load(Ordering::Acquire)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.reached.load(Ordering::Acquire), count);
    }

    /// Lets the version held at the seam go on.
    fn release(&self) {
        self.go.add_permits(1);
    }
}

/// Asserts that A's reload of [`NARROWER`], published as `version`, is the policy in force on
/// A: its status says so, and an Open of tcp/7002, which [`POLICY`] allows and it does not, is
/// denied by policy.
async fn reload_in_force(a: &Gateway, client: &Client, version: u64) {
    let status = a.get("/v1/status").await;
    let policy = &status["cluster"]["policy"];
    assert_eq!(policy["version"], version, "{status:#}");
    assert_eq!(
        policy["hash"],
        sha256_hex(NARROWER.as_bytes()),
        "{status:#}"
    );
    assert_eq!(policy["file_differs"], false, "{status:#}");
    assert_eq!(
        status["policy"],
        a.policy.display().to_string(),
        "{status:#}"
    );
    let refused = denied(client.open(tcp(7002), None).await);
    assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
}

#[test]
fn an_older_version_the_watch_checked_is_not_put_in_force_after_a_reload_published_a_newer() {
    in_cluster(
        "an_older_version_the_watch_checked_is_not_put_in_force_after_a_reload_published_a_newer",
        "clheld",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-held-watch");
            let dir = temp_dir("clheld-a");
            let watch = HeldWatch::new();
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), watch.seams()).await;
            let endpoints = cluster.endpoints();

            // The rival publishes version 2 (the old text); A's watch finds it newer than
            // version 1 and is held there, after its check.
            watch.armed.store(true, Ordering::Release);
            assert_eq!(publish_as_rival(&endpoints, POLICY).await, 2);
            watch.until_reached(1).await;

            // Meanwhile A's reload publishes its file as version 3 and puts it in force.
            common::write_policy(&a.policy, NARROWER);
            let (status, body) = a.post("/v1/policy/reload", None).await;
            assert_eq!(status, 200, "{body:#}");
            let (stored, _) = published_policy(&endpoints)
                .await
                .expect("a policy is published");
            assert_eq!((stored.version, stored.site.as_str()), (3, "gw-a"));
            reload_in_force(&a, &client, 3).await;

            // Version 2 goes on from the seam; then the rival publishes version 4, of A's
            // text, so that once the watch holds that one it has been through 2 and 3.
            watch.release();
            assert_eq!(publish_as_rival(&endpoints, NARROWER).await, 4);
            watch.until_reached(2).await;
            reload_in_force(&a, &client, 3).await;

            // Version 4 is newer, and goes in force.
            watch.release();
            until(
                "A holds policy version 4",
                || a.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 4,
            )
            .await;
            let refused = denied(client.open(tcp(7002), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");
            watch.go.close();
            drop(client);
            a.stop().await;
        },
    );
}

#[test]
fn a_reload_whose_version_a_newer_one_overtook_leaves_the_newer_in_force_and_revokes_nothing() {
    in_cluster(
        "a_reload_whose_version_a_newer_one_overtook_leaves_the_newer_in_force_and_revokes_nothing",
        "clpassed",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-overtaken");
            let dir = temp_dir("clpassed-a");
            let endpoints = cluster.endpoints();
            // At the seam between A's publish and the step that puts it in force, the rival
            // publishes the next version (the old text) and waits until A's watch has put it
            // in force.
            let gateway: Arc<OnceLock<Weak<Service>>> = Arc::new(OnceLock::new());
            let overtaking = Arc::new(AtomicU32::new(0));
            let published: Pause = Arc::new({
                let (endpoints, gateway, overtaking) =
                    (endpoints.clone(), gateway.clone(), overtaking.clone());
                move || {
                    let (endpoints, gateway, overtaking) =
                        (endpoints.clone(), gateway.clone(), overtaking.clone());
                    Box::pin(async move {
                        let version = publish_as_rival(&endpoints, POLICY).await;
                        overtaking.store(version as u32, Ordering::Release);
                        until_in_force(&gateway, version).await;
                    })
                }
            });
            let seams = Seams {
                published: Some(published),
                ..Seams::default()
            };
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), seams).await;
            let _ = gateway.set(Arc::downgrade(&a.service));
            let lease = granted(client.open(tcp(7002), None).await).lease;

            // A's reload publishes its file as version 2; the rival's version 3 is in force
            // before A's step, which leaves it there and revokes nothing.
            common::write_policy(&a.policy, NARROWER);
            let (status, body) = a.post("/v1/policy/reload", None).await;
            assert_eq!(status, 200, "{body:#}");
            assert_eq!(overtaking.load(Ordering::Acquire), 3);
            let file = a.policy.display().to_string();
            assert_eq!(body["policy"], file, "{body:#}");
            assert_eq!(body["revoked"], serde_json::json!([]), "{body:#}");
            let (stored, writes) = published_policy(&endpoints)
                .await
                .expect("a policy is published");
            assert_eq!((stored.version, stored.site.as_str()), (3, RIVAL));
            // The answer says the reloaded file is not the policy in force.
            assert_eq!(
                body["superseded"],
                serde_json::json!({"version": 2, "in_force": stored.origin()}),
                "{body:#}"
            );
            assert_eq!(writes, 3, "version 1 at the start, A's 2, the rival's 3");

            let status = a.get("/v1/status").await;
            let policy = &status["cluster"]["policy"];
            assert_eq!(policy["version"], 3, "{status:#}");
            assert_eq!(policy["hash"], sha256_hex(POLICY.as_bytes()), "{status:#}");
            assert_eq!(policy["file_differs"], true, "{status:#}");
            assert_eq!(status["policy"], stored.origin(), "{status:#}");
            granted(client.open(tcp(7003), None).await);
            assert!(
                lease_in_etcd(cluster, lease).await,
                "the lease the rival's version allows stays"
            );
            let page = until(
                "the reload's audit record",
                || a.get("/v1/audit?kind=policy-reload&scope=local&limit=100"),
                |p| {
                    p["events"]
                        .as_array()
                        .is_some_and(|events| events.iter().any(|e| e["actor"] == "operator"))
                },
            )
            .await;
            let reason = page["events"]
                .as_array()
                .and_then(|events| events.iter().find(|e| e["actor"] == "operator"))
                .map(|e| e["reason"].clone())
                .unwrap_or_default();
            assert_eq!(
                reason,
                format!(
                    "policy {file} published as cluster policy version 2, not put in force: {} \
                     was in force already; 0 leases revoked",
                    stored.origin()
                ),
                "{page:#}"
            );
            drop(client);
            a.stop().await;
        },
    );
}

/// A's local audit records of `kind`.
async fn local_records(gateway: &Gateway, kind: &str) -> Vec<Value> {
    let page = gateway
        .get(&format!("/v1/audit?kind={kind}&scope=local&limit=100"))
        .await;
    page["events"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_reload_whose_version_the_watch_brings_back_first_puts_it_in_force_once() {
    in_cluster(
        "a_reload_whose_version_the_watch_brings_back_first_puts_it_in_force_once",
        "clonce",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-once");
            let dir = temp_dir("clonce-a");
            let endpoints = cluster.endpoints();
            let watch = HeldWatch::new();
            // At the seam between A's publish of version 2 and the step that puts it in
            // force, the watch brings version 2 back and goes on with it; the rival then
            // publishes version 3, and once the watch holds that one at its seam, it has
            // been through version 2's step. Only then does the reload take its step.
            let published: Pause = Arc::new({
                let (watch, endpoints) = (watch.clone(), endpoints.clone());
                move || {
                    let (watch, endpoints) = (watch.clone(), endpoints.clone());
                    Box::pin(async move {
                        watch.until_reached(1).await;
                        watch.release();
                        assert_eq!(publish_as_rival(&endpoints, POLICY).await, 3);
                        watch.until_reached(2).await;
                    })
                }
            });
            let seams = Seams {
                published: Some(published),
                ..watch.seams()
            };
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), seams).await;
            let lease = granted(client.open(tcp(7002), None).await).lease;

            common::write_policy(&a.policy, NARROWER);
            watch.armed.store(true, Ordering::Release);
            let (status, body) = a.post("/v1/policy/reload", None).await;
            assert_eq!(status, 200, "{body:#}");
            assert_eq!(body["superseded"], Value::Null, "{body:#}");
            let revoked: Vec<&Value> = body["revoked"].as_array().into_iter().flatten().collect();
            assert_eq!(revoked.len(), 1, "{body:#}");
            assert_eq!(revoked[0]["lease"], lease.to_string(), "{body:#}");
            assert!(!lease_in_etcd(cluster, lease).await, "the end is in etcd");
            reload_in_force(&a, &client, 2).await;

            // Version 3 goes on; once it is in force, the watch is done with version 2.
            watch.release();
            until(
                "A holds policy version 3",
                || a.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 3,
            )
            .await;
            let file = a.policy.display().to_string();
            let records = until(
                "version 3's record",
                || a.get("/v1/audit?kind=policy-reload&scope=local&limit=100"),
                |p| {
                    p["events"].as_array().is_some_and(|events| {
                        events.iter().any(|e| {
                            e["reason"]
                                .as_str()
                                .is_some_and(|r| r.starts_with("cluster policy version 3 "))
                        })
                    })
                },
            )
            .await;
            let records = records["events"].as_array().cloned().unwrap_or_default();
            // Version 2 was put in force once, by the reload: the watch recorded version 3
            // only.
            let adopted: Vec<&Value> = records.iter().filter(|e| e["actor"] == "cluster").collect();
            assert_eq!(adopted.len(), 1, "{records:#?}");
            assert_eq!(
                adopted[0]["reason"],
                format!(
                    "cluster policy version 3 from {RIVAL} put in force; 0 leases it no longer \
                     allows revoked here"
                ),
                "{records:#?}"
            );
            let reloads: Vec<&Value> = records
                .iter()
                .filter(|e| e["actor"] == "operator")
                .collect();
            assert_eq!(reloads.len(), 1, "{records:#?}");
            assert_eq!(
                reloads[0]["reason"],
                format!(
                    "policy {file} loaded, published as cluster policy version 2; 1 leases revoked"
                ),
                "{records:#?}"
            );
            assert_eq!(
                events_of_lease(
                    &a.get("/v1/audit?kind=revocation&scope=local&limit=100")
                        .await,
                    lease,
                    "revocation"
                )
                .len(),
                1
            );
            watch.go.close();
            drop(client);
            a.stop().await;
        },
    );
}

#[test]
fn a_version_whose_reload_was_dropped_before_its_step_still_ends_the_leases_it_disallows() {
    in_cluster(
        "a_version_whose_reload_was_dropped_before_its_step_still_ends_the_leases_it_disallows",
        "cldrop",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-dropped");
            let (dir_a, dir_b) = (temp_dir("cldrop-a"), temp_dir("cldrop-b"));
            // A's reload, once it has published, waits at the seam for ever: the test drops
            // it there, as a dropped admin request does, and its step never runs.
            let reached = Arc::new(tokio::sync::Notify::new());
            let published: Pause = Arc::new({
                let reached = reached.clone();
                move || {
                    reached.notify_one();
                    Box::pin(std::future::pending())
                }
            });
            let seams = Seams {
                published: Some(published),
                ..Seams::default()
            };
            let (a, to_a) = gateway_a_with_a_host(cluster, &pki, dir_a.path(), seams).await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let to_b = Client::connect(b.addr, &pki.host("web-02", &[host], &[], &[])).await;
            to_b.hello().await;
            let on_a = granted(to_a.open(tcp(7002), None).await).lease;
            let on_b = granted(to_b.open(tcp(7003), None).await).lease;
            let kept = granted(to_b.open(tcp(7001), None).await).lease;
            for gateway in [&a, &b] {
                until(
                    "every lease in the book",
                    || gateway.get("/v1/status"),
                    |s| s["live_leases"] == 3,
                )
                .await;
            }

            common::write_policy(&a.policy, NARROWER);
            let reload = tokio::spawn({
                let service = a.service.clone();
                async move { service.reload_policy().await }
            });
            tokio::time::timeout(STEP, reached.notified())
                .await
                .expect("the reload published its version");
            reload.abort();
            assert!(
                reload.await.is_err_and(|e| e.is_cancelled()),
                "the reload was dropped at its seam"
            );
            let (stored, _) = published_policy(&cluster.endpoints())
                .await
                .expect("a policy is published");
            assert_eq!((stored.version, stored.site.as_str()), (2, "gw-a"));

            // Version 2 is in force on both, and what it disallows has ended: in etcd, in
            // each book, and each host is told by its gateway.
            for gateway in [&a, &b] {
                until(
                    "version 2 in force and its revocations done",
                    || gateway.get("/v1/status"),
                    |s| s["cluster"]["policy"]["version"] == 2 && s["live_leases"] == 1,
                )
                .await;
            }
            for (client, lease) in [(&to_a, on_a), (&to_b, on_b)] {
                let notice = client.next_notice(STEP).await;
                assert!(
                    matches!(
                        &notice,
                        Some(fwnp_proto::Message::Revoked(r))
                            if r.lease == lease
                                && r.reason == fwnp_proto::RevokeReason::PolicyChanged
                    ),
                    "{notice:?}"
                );
            }
            assert!(!lease_in_etcd(cluster, on_a).await, "{on_a} ended in etcd");
            assert!(!lease_in_etcd(cluster, on_b).await, "{on_b} ended in etcd");
            assert!(lease_in_etcd(cluster, kept).await, "{kept} still allowed");
            let refused = denied(to_b.open(tcp(7004), None).await);
            assert_eq!(refused.code, ResultCode::DeniedByPolicy, "{refused:?}");

            // Each gateway recorded version 2 once, as the watch put it in force; both
            // tried each end, and etcd took it from one, audited there alone.
            let mut revocations = Vec::new();
            for gateway in [&a, &b] {
                let records = until(
                    "version 2's record",
                    || gateway.get("/v1/audit?kind=policy-reload&scope=local&limit=100"),
                    |p| {
                        p["events"]
                            .as_array()
                            .is_some_and(|events| events.iter().any(|e| e["actor"] == "cluster"))
                    },
                )
                .await;
                let records = records["events"].as_array().cloned().unwrap_or_default();
                assert_eq!(records.len(), 1, "{records:#?}");
                let reason = records[0]["reason"].as_str().unwrap_or_default();
                assert!(
                    reason.starts_with("cluster policy version 2 from gw-a put in force; "),
                    "{records:#?}"
                );
                revocations.push(local_records(gateway, "revocation").await);
            }
            for lease in [on_a, on_b] {
                let audited: Vec<&Value> = revocations
                    .iter()
                    .flatten()
                    .filter(|e| e["lease"] == lease.to_string())
                    .collect();
                assert_eq!(audited.len(), 1, "{lease}: {revocations:#?}");
                assert_eq!(audited[0]["actor"], "policy-reload", "{audited:#?}");
            }
            // So is each counted: the gateways' counters add up to the cluster's two ends.
            let revoked = |gateway: &Gateway| {
                gateway
                    .service
                    .metrics
                    .lease_ends
                    .with_label_values(&["revoked"])
                    .get()
            };
            // The counter follows the commit that the audit record is part of: a moment later.
            for _ in 0..50 {
                if revoked(&a) + revoked(&b) >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(
                revoked(&a) + revoked(&b),
                2,
                "lease_ends_total{{how=\"revoked\"}}: gw-a {}, gw-b {}",
                revoked(&a),
                revoked(&b)
            );
            drop((to_a, to_b));
            a.stop().await;
            b.stop().await;
        },
    );
}

#[test]
fn a_version_overtaken_while_it_revokes_stops_and_the_newer_one_judges_the_leases_left() {
    in_cluster(
        "a_version_overtaken_while_it_revokes_stops_and_the_newer_one_judges_the_leases_left",
        "clstop",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-stop");
            let dir = temp_dir("clstop-a");
            let endpoints = cluster.endpoints();
            // Once armed, each lease a policy put in force judges waits at the seam before
            // it is judged.
            let held = HeldWatch::new();
            let revoking: Pause = Arc::new({
                let held = held.clone();
                move || {
                    let held = held.clone();
                    Box::pin(async move { held.hold().await })
                }
            });
            let seams = Seams {
                revoking: Some(revoking),
                ..Seams::default()
            };
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), seams).await;
            let leases = [
                granted(client.open(tcp(7002), None).await).lease,
                granted(client.open(tcp(7003), None).await).lease,
            ];

            // The rival publishes version 2, which allows neither lease: A's watch puts it in
            // force, and its revocation waits before the first lease.
            held.armed.store(true, Ordering::Release);
            assert_eq!(publish_as_rival(&endpoints, NARROWER).await, 2);
            held.until_reached(1).await;
            // The rival publishes version 3, which allows both again: the watch puts it in
            // force meanwhile, and version 2 revokes nothing once it goes on.
            assert_eq!(publish_as_rival(&endpoints, POLICY).await, 3);
            until(
                "A holds policy version 3",
                || a.get("/v1/status"),
                |s| s["cluster"]["policy"]["version"] == 3,
            )
            .await;
            held.go.close();
            let records = until(
                "both versions' records",
                || a.get("/v1/audit?kind=policy-reload&scope=local&limit=100"),
                |p| {
                    p["events"]
                        .as_array()
                        .is_some_and(|events| events.len() == 2)
                },
            )
            .await;
            let mut reasons: Vec<String> = records["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                .collect();
            reasons.sort();
            assert_eq!(
                reasons,
                [2, 3].map(|version| format!(
                    "cluster policy version {version} from {RIVAL} put in force; 0 leases it \
                     no longer allows revoked here"
                )),
                "{records:#}"
            );
            for lease in leases {
                assert!(lease_in_etcd(cluster, lease).await, "{lease} stays live");
            }
            let status = a.get("/v1/status").await;
            assert_eq!(status["live_leases"], 2, "{status:#}");
            granted(client.open(tcp(7004), None).await);
            drop(client);
            a.stop().await;
        },
    );
}

/// A list of the cluster read while a grant's insert is on its way to etcd lacks the new
/// lease. Taken out of A's book by that list, the lease was refused to its host (its kernel
/// hold found it ended) while etcd kept it, and the watch brought it back into every book: an
/// opening granted to no one. The grant is answered, and the lease is A's and etcd's.
#[test]
fn a_grant_being_stored_while_the_cluster_is_listed_again_is_granted_and_kept() {
    in_cluster(
        "a_grant_being_stored_while_the_cluster_is_listed_again_is_granted_and_kept",
        "clstoring",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-storing");
            let dir = temp_dir("clstoring-a");
            // The new lease waits at the seam, in the book and on its way to the store, until
            // A has listed the cluster again.
            let mut seam = HeldSeam::new();
            let seams = Seams {
                storing: Some(seam.pause()),
                ..Seams::default()
            };
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), seams).await;
            let client = Arc::new(client);
            let opening = tokio::spawn({
                let client = client.clone();
                async move { client.open(tcp(7001), None).await }
            });
            seam.reached("the Open").await;
            list_again(&a).await;
            seam.release();
            let lease = granted(opening.await.expect("the Open's task")).lease;
            assert!(lease_in_etcd(cluster, lease).await, "etcd holds the grant");
            assert!(
                client.list().await.leases.iter().any(|l| l.lease == lease),
                "A's book holds the grant"
            );
            drop(client);
            a.stop().await;
        },
    );
}

/// A list of the cluster read while a Release's end is on its way to etcd still shows the
/// lease. Put back into A's book by that list, the released lease was live again (listed to
/// its host, and open in a kernel) until the end came through the watch.
#[test]
fn a_lease_being_released_while_the_cluster_is_listed_again_stays_released() {
    while_a_release_is_held(
        "a_lease_being_released_while_the_cluster_is_listed_again_stays_released",
        "clending",
        async |_cluster, a, client, lease| {
            list_again(a).await;
            assert!(
                !client.list().await.leases.iter().any(|l| l.lease == lease),
                "the list put the released lease back into A's book"
            );
        },
    );
}

/// The watch's side of the same race: a change of the lease the watch brings while its end is
/// on its way (here the lease's record written again, as another gateway's renewal writes it)
/// does not put it back into the book either.
#[test]
fn a_lease_being_released_while_the_watch_brings_a_change_of_it_stays_released() {
    while_a_release_is_held(
        "a_lease_being_released_while_the_watch_brings_a_change_of_it_stays_released",
        "clendwatch",
        async |cluster, _a, client, lease| {
            // The copy comes through the watch after the record written again: once A's book
            // holds the copy, A has taken that change too.
            let mut copy = lease;
            copy.0[15] ^= 0xff;
            store_again_with_a_copy(cluster, lease, copy).await;
            until(
                "the copy in A's book",
                || async {
                    let listed = client.list().await;
                    Value::from(listed.leases.iter().any(|l| l.lease == copy))
                },
                |held| held.as_bool() == Some(true),
            )
            .await;
            assert!(
                !client.list().await.leases.iter().any(|l| l.lease == lease),
                "the watch put the released lease back into A's book"
            );
        },
    );
}

/// A host of gateway A releases a lease whose end waits at a seam, out of the book and on its
/// way to etcd, while `meanwhile` runs; then the end goes on, the host is answered Released and
/// etcd no longer holds the lease.
fn while_a_release_is_held(
    test: &str,
    short: &str,
    meanwhile: impl AsyncFnOnce(&EtcdCluster, &Gateway, &Client, LeaseId) + Send,
) {
    in_cluster(test, short, two_workers, async |cluster| {
        let pki = Pki::new(&format!("cluster-{short}"));
        let dir = temp_dir(&format!("{short}-a"));
        let mut seam = HeldSeam::new();
        let seams = Seams {
            ending: Some(seam.pause()),
            ..Seams::default()
        };
        let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), seams).await;
        let client = Arc::new(client);
        let lease = granted(client.open(tcp(7001), None).await).lease;
        let releasing = tokio::spawn({
            let client = client.clone();
            async move { client.release(lease).await }
        });
        seam.reached("the Release").await;
        meanwhile(cluster, &a, &client, lease).await;
        seam.release();
        let released = releasing.await.expect("the Release's task");
        assert!(
            matches!(released, fwnp_proto::Message::Released(_)),
            "{released:?}"
        );
        assert!(!lease_in_etcd(cluster, lease).await, "etcd ended it");
        drop(client);
        a.stop().await;
    });
}

/// A list of the cluster read before a renewal of this gateway's was committed shows the
/// expiry before it: A's book (and kernel) keep the renewal's, which the watch brings next.
#[test]
fn a_lease_being_renewed_while_the_cluster_is_listed_again_keeps_its_new_expiry() {
    in_cluster(
        "a_lease_being_renewed_while_the_cluster_is_listed_again_keeps_its_new_expiry",
        "clrenewing",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-renewing");
            let dir = temp_dir("clrenewing-a");
            // The renewal waits at the seam, in the book and on its way to the store, until A
            // has listed the cluster again.
            let mut seam = HeldSeam::new();
            let seams = Seams {
                renewing: Some(seam.pause()),
                ..Seams::default()
            };
            let (a, client) = gateway_a_with_a_host(cluster, &pki, dir.path(), seams).await;
            let client = Arc::new(client);
            let opened = granted(client.open(tcp(7001), Some(60)).await);
            assert_eq!(opened.lifetime, 60);
            let lease = opened.lease;
            let renewing = tokio::spawn({
                let client = client.clone();
                async move { client.renew(lease, Some(600)).await }
            });
            seam.reached("the Renew").await;
            list_again(&a).await;
            let remaining = remaining_in_list(&client, lease).await;
            assert!(
                remaining > 300,
                "the list put the expiry before the renewal back into A's book: {remaining} s left"
            );
            seam.release();
            let renewed = granted(renewing.await.expect("the Renew's task"));
            assert_eq!(renewed.lifetime, 600);
            let remaining = remaining_in_list(&client, lease).await;
            assert!(remaining > 300, "{remaining} s left after the renewal");
            drop(client);
            a.stop().await;
        },
    );
}

/// An event published between the read of where a follow of the trail goes on from and the
/// read of the page (held at a seam between the two) is in the page, and a follow from the
/// page's `follow_from` does not give it again.
#[test]
fn an_event_published_while_a_page_is_read_is_followed_once() {
    in_cluster(
        "an_event_published_while_a_page_is_read_is_followed_once",
        "clpaging",
        two_workers,
        async |cluster| {
            let pki = Pki::new("cluster-paging");
            let (dir_a, dir_b) = (temp_dir("clpaging-a"), temp_dir("clpaging-b"));
            let mut seam = HeldSeam::new();
            let seams = Seams {
                paging: Some(seam.pause()),
                ..Seams::default()
            };
            let a = Gateway::start_with_seams(cluster, &pki, dir_a.path(), "gw-a", seams).await;
            let b = Gateway::start(cluster, &pki, dir_b.path(), "gw-b").await;
            let web2 = pki.host("web-02", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], &[], &[]);
            let to_b = Client::connect(b.addr, &web2).await;
            to_b.hello().await;
            let (page, on_b) = tokio::join!(a.get("/v1/audit?kind=grant&limit=100"), async {
                seam.reached("the page").await;
                let on_b = granted(to_b.open(tcp(7002), None).await).lease;
                until_published(cluster, "gw-b", on_b).await;
                seam.release();
                on_b
            });
            let on_b = on_b.to_string();
            assert!(
                page["events"]
                    .as_array()
                    .is_some_and(|events| events.iter().any(|e| e["lease"] == on_b)),
                "the page holds B's grant: {page:#}"
            );
            let from = page["follow_from"]
                .as_str()
                .unwrap_or_else(|| panic!("a cluster's page says where to follow from: {page:#}"));
            let followed = a
                .get(&format!("/v1/audit?kind=grant&after={from}&wait=1s"))
                .await;
            assert!(
                !followed["events"]
                    .as_array()
                    .is_some_and(|events| events.iter().any(|e| e["lease"] == on_b)),
                "B's grant followed again after the page that held it: {followed:#}"
            );
            drop(to_b);
            a.stop().await;
            b.stop().await;
        },
    );
}

/// Waits until the gateway of `site` has published the audit event of lease `id`'s grant in
/// etcd, where the other members read it.
async fn until_published(cluster: &EtcdCluster, site: &str, id: LeaseId) {
    let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .expect("etcd client");
    let (prefix, lease) = (format!("/fwnp-test/audit/{site}/"), id.to_string());
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let answer = client
            .get(
                prefix.clone(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("read the published events");
        let published = answer.kvs().iter().any(|kv| {
            let value = String::from_utf8_lossy(kv.value());
            value.contains(&lease) && value.contains("grant")
        });
        if published {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{site} published the grant of {lease}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The seconds lease `id` has left, as its gateway lists it to its host.
async fn remaining_in_list(client: &Client, id: LeaseId) -> u32 {
    client
        .list()
        .await
        .leases
        .iter()
        .find(|l| l.lease == id)
        .unwrap_or_else(|| panic!("lease {id} is not listed"))
        .remaining
}

/// Writes lease `id`'s record in etcd again, unchanged, then a copy of it as lease `copy`: the
/// watch of every gateway brings both, in that order.
async fn store_again_with_a_copy(cluster: &EtcdCluster, id: LeaseId, copy: LeaseId) {
    let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .expect("etcd client");
    let key = format!("/fwnp-test/leases/{id}");
    let answer = client.get(key.clone(), None).await.expect("read the lease");
    let value = answer
        .kvs()
        .first()
        .expect("the lease in etcd")
        .value()
        .to_vec();
    client
        .put(key, value.clone(), None)
        .await
        .expect("write the lease again");
    client
        .put(format!("/fwnp-test/leases/{copy}"), value, None)
        .await
        .expect("write its copy");
}

/// A seam that holds the work reaching it until the test lets it go on, and tells the test
/// when it is reached.
struct HeldSeam {
    reached: tokio::sync::mpsc::UnboundedSender<()>,
    at_seam: tokio::sync::mpsc::UnboundedReceiver<()>,
    go: Arc<tokio::sync::Semaphore>,
}

impl HeldSeam {
    fn new() -> HeldSeam {
        let (reached, at_seam) = tokio::sync::mpsc::unbounded_channel();
        HeldSeam {
            reached,
            at_seam,
            go: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }

    /// The seam's pause: each work that reaches it waits for one [`HeldSeam::release`].
    fn pause(&self) -> Pause {
        let (reached, go) = (self.reached.clone(), self.go.clone());
        Arc::new(move || {
            let (reached, go) = (reached.clone(), go.clone());
            Box::pin(async move {
                let _ = reached.send(());
                if let Ok(permit) = go.acquire().await {
                    permit.forget();
                }
            })
        })
    }

    /// Waits until `what` reaches the seam.
    async fn reached(&mut self, what: &str) {
        tokio::time::timeout(STEP, self.at_seam.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} never reached the seam"));
    }

    /// Lets one work held at the seam go on.
    fn release(&self) {
        self.go.add_permits(1);
    }
}

/// Has `gateway` list the cluster's leases again, as after a lost watch, and waits until it
/// has applied the list.
async fn list_again(gateway: &Gateway) {
    let listed = local_records(gateway, "reconcile").await.len();
    gateway
        .service
        .cluster_store()
        .expect("the etcd backend")
        .resync();
    until(
        "the gateway's list of the cluster",
        || async { Value::from(local_records(gateway, "reconcile").await.len()) },
        |n| n.as_u64().is_some_and(|n| n as usize > listed),
    )
    .await;
}
