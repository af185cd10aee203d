//! Two policy reloads sent to one gateway at once, through the admin API and `fwnpctl`: the
//! second waits for the first (no 409: a gateway answers 409 Conflict to a reload only when
//! other gateways of its cluster keep publishing theirs), then runs and is answered with what
//! it did. The first is held in the middle of its work, at the store write of the lease it
//! revokes, by a store whose writes wait on the test's signal.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    Client, HOSTS_POLICY, Pki, STEP, admin_request, config_text, granted, serve_on_loopback, tcp,
    temp_dir, write_policy,
};
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::service::Service;
use fwnp_gateway::store::{AuditKind, LeaseStore, MemoryStore, WriteError, WriteFuture, WriteOp};
use fwnp_proto::LeaseId;
use fwnp_trust::tls::ServerOptions;
use tokio::sync::{Notify, mpsc};

/// How long a reload that must wait is given to finish anyway, were it not waiting: far more
/// than a reload of a small policy takes.
const QUIET: Duration = Duration::from_millis(500);

/// The memory store, except that the first commit ending a lease waits until the test lets it
/// go, and says which lease it ends.
#[derive(Debug)]
struct FirstEndWaits {
    memory: Arc<MemoryStore>,
    armed: AtomicBool,
    held: mpsc::UnboundedSender<LeaseId>,
    go: Arc<Notify>,
}

impl LeaseStore for FirstEndWaits {
    fn epoch(&self) -> fwnp_proto::Epoch {
        LeaseStore::epoch(&*self.memory)
    }

    fn restore(&self, now_ms: u64) -> WriteFuture<'_, fwnp_gateway::store::Restored> {
        self.memory.restore(now_ms)
    }

    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()> {
        let ended = ops.iter().find_map(|op| match op {
            WriteOp::EndLease { id, .. } => Some(*id),
            _ => None,
        });
        let memory = self.memory.clone();
        match ended {
            Some(id) if self.armed.swap(false, Ordering::AcqRel) => {
                let _ = self.held.send(id);
                let go = self.go.clone();
                Box::pin(async move {
                    go.notified().await;
                    memory.commit(ops).await
                })
            }
            _ => memory.commit(ops),
        }
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        self.memory.record(ops)
    }
}

/// `fwnpctl --admin SOCKET ARGS`: its exit status, standard output and standard error.
async fn fwnpctl(admin: &Path, args: &[&str]) -> (bool, String, String) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_sent_while_another_runs_waits_for_it_then_runs() {
    let pki = Pki::new("reload-race");
    let dir = temp_dir("reload-race");
    let policy_path = dir.path().join("policy.toml");
    write_policy(&policy_path, HOSTS_POLICY);
    let text = config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false");
    let config = GatewayConfig::parse(&text, "reload-race.toml").expect("valid config");
    let admin = config.admin_socket.clone();
    let memory = Arc::new(MemoryStore::new(0xfeed));
    let (held, mut holding) = mpsc::unbounded_channel();
    let go = Arc::new(Notify::new());
    let store = Arc::new(FirstEndWaits {
        memory: memory.clone(),
        armed: AtomicBool::new(true),
        held,
        go: go.clone(),
    });
    let service = Service::start_with_store(config, None, memory.clone(), store)
        .await
        .expect("service starts");
    let (endpoint, addr, serving) = serve_on_loopback(&pki, &service, &ServerOptions::default());
    service.add_endpoint(endpoint.clone());
    let admin_task = tokio::spawn({
        let (service, admin) = (service.clone(), admin.clone());
        async move {
            if let Err(e) = fwnp_gateway::admin::serve(&admin, service).await {
                panic!("admin socket {}: {e}", admin.display());
            }
        }
    });
    let deadline = tokio::time::Instant::now() + STEP;
    while std::os::unix::net::UnixStream::connect(&admin).is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no admin socket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let client = Client::connect(addr, &pki.host("web-01", &[host], &[], &[])).await;
    client.hello().await;
    let first_lease = granted(client.open(tcp(7001), None).await).lease;
    let second_lease = granted(client.open(tcp(7600), None).await).lease;

    // The first reload no longer allows 7001, and is held at its revocation's store write.
    write_policy(
        &policy_path,
        &HOSTS_POLICY.replace("tcp/7000-7999", "tcp/7500-7999"),
    );
    let first = tokio::spawn({
        let admin = admin.clone();
        async move { admin_request(&admin, "POST", "/v1/policy/reload", None).await }
    });
    let id = tokio::time::timeout(STEP, holding.recv())
        .await
        .expect("the first reload revokes")
        .expect("the store is up");
    assert_eq!(id, first_lease);

    // The second, sent meanwhile through fwnpctl, no longer allows 7600 either: it waits.
    write_policy(
        &policy_path,
        &HOSTS_POLICY.replace("tcp/7000-7999", "tcp/7800-7999"),
    );
    let mut second = tokio::spawn({
        let admin = admin.clone();
        async move { fwnpctl(&admin, &["policy", "reload"]).await }
    });
    assert!(
        tokio::time::timeout(QUIET, &mut second).await.is_err(),
        "the second reload ran while the first was still running"
    );
    assert!(
        memory
            .audit()
            .iter()
            .all(|e| e.kind != AuditKind::PolicyReload),
        "no reload is done yet: {:?}",
        memory.audit()
    );

    go.notify_one();
    let (status, body) = tokio::time::timeout(STEP, first)
        .await
        .expect("the first reload is answered")
        .expect("the first reload's task");
    assert_eq!(status, 200, "the first reload completes: {body:#}");
    assert!(body.get("superseded").is_none(), "{body:#}");
    let revoked: Vec<&str> = body["revoked"]
        .as_array()
        .expect("the leases it revoked")
        .iter()
        .filter_map(|r| r["lease"].as_str())
        .collect();
    assert_eq!(revoked, vec![first_lease.to_string()], "{body:#}");
    assert_eq!(body["tls"], "reloaded", "{body:#}");

    let (ok, stdout, stderr) = tokio::time::timeout(STEP, second)
        .await
        .expect("the second reload is answered")
        .expect("fwnpctl's task");
    assert!(
        ok,
        "the second reload completes after the first: {stdout}{stderr}"
    );
    let policy = policy_path.display().to_string();
    assert!(
        stdout.starts_with(&format!("policy {policy} loaded; 1 live leases revoked\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("  revoked {second_lease} (fwnp://host/web-01): ")),
        "the second reload revoked what the first left and its policy disallows: {stdout}"
    );
    assert!(stderr.is_empty(), "{stderr}");

    // In the trail: the first reload's revocation and record, then the second's.
    let order: Vec<(AuditKind, Option<LeaseId>)> = memory
        .audit()
        .into_iter()
        .filter(|e| matches!(e.kind, AuditKind::Revocation | AuditKind::PolicyReload))
        .map(|e| (e.kind, e.lease))
        .collect();
    assert_eq!(
        order,
        vec![
            (AuditKind::Revocation, Some(first_lease)),
            (AuditKind::PolicyReload, None),
            (AuditKind::Revocation, Some(second_lease)),
            (AuditKind::PolicyReload, None),
        ]
    );
    assert!(client.list().await.leases.is_empty());

    admin_task.abort();
    endpoint.close(0u32.into(), b"done");
    serving.abort();
}
