//! The whole FWNP story end to end: the real `fwnp-gateway`, one real `fwnp-agent` per host,
//! applications using the SDK, `fwnpctl` for the operator, the real kernel, in network namespaces.
//!
//! Each test builds its own [`Lab`] (an outside network, a gateway, hosts behind it on one
//! bridge, IPv4 and IPv6) and proves with real TCP traffic what an opening does, and checks the
//! audit trail (`fwnpctl audit --json`) for every step. The binaries are built first with
//! `cargo build --bins -p fwnp-gateway -p fwnp-agent -p fwnp-sdk` into the same target
//! directory (cargo only builds the binaries of the package under test itself).
//!
//! Needs root: skipped otherwise, and failing instead when FWNP_REQUIRE_NETNS=1.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fwnp_interop_tests::{
    AuditEntry, Binaries, Lab, LabOptions, LongConnection, TcpEchoServer, netns_command,
    require_root, table_has, wait_until,
};
use fwnp_sdk::{Client, Family, Lease, LeaseEvent, Opening};

/// A connection attempt that gets no answer within this long counts as refused (beyond TCP's
/// first SYN retransmission).
const REFUSED: Duration = Duration::from_millis(1200);
/// Bound of every poll for a change that should follow an action.
const SETTLE: Duration = Duration::from_secs(5);

/// The policy after the operator's change: the "extra" rule is gone.
const POLICY_WITHOUT_EXTRA: &str = r#"
[defaults]
lifetime = "30s"
min_lifetime = "1s"
max_lifetime = "5m"

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/8000-8999"
"#;

/// The policy the lab starts with: the one above and an "extra" rule.
fn policy() -> String {
    format!(
        "{POLICY_WITHOUT_EXTRA}\n[[rule]]\nname = \"extra\"\ngroups = [\"hosts\"]\nallow = \"tcp/9000-9999\"\n"
    )
}

/// The binaries, built once per test process.
fn binaries() -> Binaries {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    match BUILT.get_or_init(|| Binaries::build().map_err(|err| err.to_string())) {
        Ok(bins) => bins.clone(),
        Err(err) => panic!("the lab's binaries: {err}"),
    }
}

fn start_lab(label: &str, hosts: usize) -> Lab {
    let options = LabOptions {
        label: label.into(),
        hosts,
        host_prefix: "web".into(),
        policy: policy(),
        verify_port_owner: true,
    };
    let bins = binaries();
    tokio::task::block_in_place(|| Lab::start(bins, &options)).unwrap_or_else(|err| panic!("{err}"))
}

fn reaches(lab: &Lab, host: usize, v6: bool, port: u16, within: Duration) -> bool {
    tokio::task::block_in_place(|| lab.outside_reaches(host, v6, port, within))
}

fn eventually_reachable(lab: &Lab, host: usize, v6: bool, port: u16, reachable: bool) -> bool {
    tokio::task::block_in_place(|| lab.wait_reachable(host, v6, port, reachable, SETTLE))
}

/// Polls (bounded) until `condition` holds.
fn eventually(limit: Duration, condition: impl FnMut() -> bool) -> bool {
    tokio::task::block_in_place(|| wait_until(limit, Duration::from_millis(25), condition))
}

fn audit(lab: &Lab) -> Vec<AuditEntry> {
    tokio::task::block_in_place(|| lab.audit(&[])).unwrap_or_else(|err| panic!("{err}"))
}

/// The audit events of `lease`, as (kind, outcome) pairs.
fn lease_trail(trail: &[AuditEntry], lease: &str) -> Vec<(String, String)> {
    trail
        .iter()
        .filter(|e| e.lease() == Some(lease))
        .map(|e| {
            (
                e.kind().unwrap_or("-").to_string(),
                e.outcome().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

fn has(trail: &[(String, String)], kind: &str, outcome: &str) -> bool {
    trail.iter().any(|(k, o)| k == kind && o == outcome)
}

async fn client(lab: &Lab, host: usize) -> Client {
    Client::connect_to(lab.agent_socket(host))
        .await
        .unwrap_or_else(|err| panic!("connect to the agent of host {host}: {err}"))
}

async fn open(client: &Client, opening: Opening) -> Lease {
    let shown = opening.to_string();
    client
        .open(opening)
        .await
        .unwrap_or_else(|err| panic!("open {shown}: {err}"))
}

/// The next event of `lease` within `limit`, skipping renewals.
async fn next_non_renewal(lease: &mut Lease, limit: Duration) -> Option<LeaseEvent> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, lease.next_event()).await {
            Ok(Some(LeaseEvent::Renewed { .. })) => continue,
            Ok(event) => return event,
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_several_applications_ipv4_and_ipv6() {
    if !require_root("three_hosts_several_applications_ipv4_and_ipv6") {
        return;
    }
    let lab = start_lab("e2e-hosts", 3);
    let echoes: Vec<TcpEchoServer> = lab
        .site
        .hosts
        .iter()
        .map(|h| TcpEchoServer::start_ports(&h.netns, &[8001, 8002, 8003]).expect("echo servers"))
        .collect();

    // Nothing is open before anyone asks.
    for host in 0..3 {
        assert!(
            !reaches(&lab, host, false, 8001, REFUSED),
            "host {host} open without a lease"
        );
    }

    // Per host, two applications with their own connections to the agent: one opens tcp/8001
    // over IPv4, the other tcp/8002 over IPv6 (without a family, both would be opened).
    let mut apps = Vec::new();
    for host in 0..3 {
        let web = client(&lab, host).await;
        let api = client(&lab, host).await;
        let web_lease = open(&web, Opening::tcp(8001).family(Family::Ipv4).name("web")).await;
        let api_lease = open(&api, Opening::tcp(8002).family(Family::Ipv6).name("api")).await;
        assert_eq!(web_lease.grants()[0].host, lab.site.hosts[host].v4);
        assert_eq!(api_lease.grants()[0].host, lab.site.hosts[host].v6);
        apps.push((web, web_lease, api, api_lease));
    }
    for host in 0..3 {
        let (v4, v6) = (lab.site.hosts[host].v4, lab.site.hosts[host].v6);
        assert!(
            reaches(&lab, host, false, 8001, REFUSED),
            "host {host} v4 tcp/8001 closed"
        );
        assert!(
            reaches(&lab, host, true, 8002, REFUSED),
            "host {host} v6 tcp/8002 closed"
        );
        // Exactly what was granted: the other family and the neighbouring port stay closed.
        assert!(
            !reaches(&lab, host, true, 8001, REFUSED),
            "host {host} v6 tcp/8001 open"
        );
        assert!(
            !reaches(&lab, host, false, 8003, REFUSED),
            "host {host} tcp/8003 open"
        );
        assert!(lab.gateway_has(v4, "tcp", 8001) && lab.gateway_has(v6, "tcp", 8002));
        assert!(lab.host_has(host, "tcp", 8001) && lab.host_has(host, "tcp", 8002));
    }
    let trail = audit(&lab);
    for (host, (_, web_lease, _, api_lease)) in apps.iter().enumerate() {
        let identity = format!("fwnp://host/{}", lab.site.hosts[host].name);
        for lease in [web_lease, api_lease] {
            let id = lease.id().to_string();
            let events = lease_trail(&trail, &id);
            assert!(has(&events, "grant", "granted"), "{id}: {events:?}");
            // The grant names the rule that allowed it.
            assert!(
                trail.iter().any(|e| e.lease() == Some(id.as_str())
                    && e.kind() == Some("grant")
                    && e.0
                        .get("rule")
                        .and_then(serde_json::Value::as_str)
                        .is_some()),
                "{id}: the grant names no rule"
            );
            assert!(
                trail
                    .iter()
                    .filter(|e| e.lease() == Some(id.as_str()))
                    .all(|e| e.identity() == Some(identity.as_str())),
                "{id} audited under another identity"
            );
        }
    }

    // Host 1's web application releases its lease: closed on both sides, the others stay.
    let (web1, web1_lease, api1, api1_lease) = apps.remove(0);
    let released_id = web1_lease.id().to_string();
    web1_lease.release().await.expect("release");
    assert!(
        eventually_reachable(&lab, 0, false, 8001, false),
        "released, still open"
    );
    assert!(
        eventually(SETTLE, || !lab.host_has(0, "tcp", 8001)),
        "released, still mirrored"
    );
    assert!(!lab.gateway_has(lab.site.hosts[0].v4, "tcp", 8001));
    assert!(
        reaches(&lab, 0, true, 8002, REFUSED),
        "the other application lost its opening"
    );

    // Host 1's api application exits without releasing (its connection to the agent closes):
    // the agent releases its lease.
    let exited_id = api1_lease.id().to_string();
    drop(api1_lease);
    drop(api1);
    drop(web1);
    assert!(
        eventually_reachable(&lab, 0, true, 8002, false),
        "the application left, still open"
    );
    assert!(eventually(SETTLE, || !lab.host_has(0, "tcp", 8002)));
    assert!(
        reaches(&lab, 1, false, 8001, REFUSED),
        "another host lost its opening"
    );
    assert!(
        reaches(&lab, 2, true, 8002, REFUSED),
        "another host lost its opening"
    );

    let trail = audit(&lab);
    for id in [&released_id, &exited_id] {
        let events = lease_trail(&trail, id);
        assert!(has(&events, "release", "released"), "{id}: {events:?}");
    }
    drop(apps);
    drop(echoes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_revokes_the_leases_it_no_longer_allows() {
    if !require_root("policy_reload_revokes_the_leases_it_no_longer_allows") {
        return;
    }
    let lab = start_lab("e2e-reload", 1);
    let _echo =
        TcpEchoServer::start_ports(&lab.site.hosts[0].netns, &[8001, 9001, 9002]).expect("echo");
    let app = client(&lab, 0).await;
    let mut kept = open(&app, Opening::tcp(8001)).await;
    let mut doomed = open(&app, Opening::tcp(9001)).await;
    assert!(reaches(&lab, 0, false, 8001, REFUSED));
    assert!(reaches(&lab, 0, false, 9001, REFUSED));

    lab.write_policy(POLICY_WITHOUT_EXTRA)
        .expect("rewrite the policy");
    let reloaded = tokio::task::block_in_place(|| lab.fwnpctl(&["policy", "reload"]))
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(!reloaded.trim().is_empty());

    match next_non_renewal(&mut doomed, SETTLE).await {
        Some(LeaseEvent::Revoked { .. }) => {}
        other => panic!("expected Revoked on the SDK's lease, got {other:?}"),
    }
    assert!(
        eventually_reachable(&lab, 0, false, 9001, false),
        "revoked, still open"
    );
    assert!(
        eventually(SETTLE, || !lab.host_has(0, "tcp", 9001)),
        "revoked, still mirrored"
    );
    assert!(!lab.gateway_has(lab.site.hosts[0].v4, "tcp", 9001));
    // The lease the new policy still allows is untouched.
    assert!(reaches(&lab, 0, false, 8001, REFUSED));
    assert!(lab.host_has(0, "tcp", 8001));
    assert!(kept.is_active());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), kept.next_event())
            .await
            .map_or(true, |event| !event.is_some_and(|e| e.is_terminal())),
        "the allowed lease ended"
    );
    // A new request the new policy denies is refused.
    assert!(app.open(Opening::tcp(9002)).await.is_err());

    let trail = audit(&lab);
    let doomed_id = doomed.id().to_string();
    let events = lease_trail(&trail, &doomed_id);
    assert!(has(&events, "grant", "granted"), "{events:?}");
    assert!(has(&events, "revocation", "revoked"), "{events:?}");
    assert!(
        trail.iter().any(|e| e.kind() == Some("policy-reload")),
        "no policy-reload event"
    );
    let revocation = trail
        .iter()
        .find(|e| e.lease() == Some(doomed_id.as_str()) && e.outcome() == Some("revoked"))
        .expect("the revocation");
    assert_eq!(revocation.actor(), Some("policy-reload"), "{revocation}");
    let kept_events = lease_trail(&trail, &kept.id().to_string());
    assert!(
        !has(&kept_events, "revocation", "revoked"),
        "{kept_events:?}"
    );
    assert!(
        trail.iter().any(|e| e.outcome() == Some("denied")),
        "the denial is not audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkill_and_restart_under_traffic() {
    if !require_root("gateway_sigkill_and_restart_under_traffic") {
        return;
    }
    let mut lab = start_lab("e2e-gwkill", 1);
    let _echo = TcpEchoServer::start(&lab.site.hosts[0].netns, 8001).expect("echo");
    let app = client(&lab, 0).await;
    // A gateway crash is noticed by the silence of the old connection (or by the restarted
    // gateway's stateless reset), and the new gateway restores the lease from its store with
    // its expiry unchanged.
    let mut lease = open(&app, Opening::tcp(8001).lifetime(Duration::from_secs(60))).await;
    let id = lease.id().to_string();
    let to = SocketAddr::new(lab.site.hosts[0].v4, 8001);
    let mut long = tokio::task::block_in_place(|| {
        LongConnection::open(&lab.site.outside, to, Duration::from_secs(2))
    })
    .expect("a long-lived connection");
    long.roundtrip().expect("traffic before the crash");

    lab.kill_gateway();
    // The kernel keeps the element: the established connection and new ones still pass.
    long.roundtrip()
        .expect("the established connection after the gateway died");
    assert!(
        reaches(&lab, 0, false, 8001, REFUSED),
        "closed right after the gateway died"
    );
    assert!(lab.gateway_has(lab.site.hosts[0].v4, "tcp", 8001));

    tokio::task::block_in_place(|| lab.start_gateway()).unwrap_or_else(|err| panic!("{err}"));
    let restarted = Instant::now();
    let restart_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // The restarted gateway restored the lease and put it back in the kernel.
    let leases = tokio::task::block_in_place(|| lab.fwnpctl(&["leases"]))
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        leases.contains(&id),
        "the lease was not restored:\n{leases}"
    );

    // Under traffic until the agent has reconnected and renewed the lease with the new gateway
    // (bounded: the idle timeout, a reconnection and a renewal window).
    let renewed_after_restart = |trail: &[AuditEntry], current: &str| {
        trail.iter().any(|e| {
            e.lease() == Some(current)
                && matches!(e.kind(), Some("renewal") | Some("grant"))
                && e.0.get("time_ms").and_then(serde_json::Value::as_u64) > Some(restart_ms)
        })
    };
    let limit = Duration::from_secs(75);
    loop {
        long.roundtrip().unwrap_or_else(|err| {
            panic!(
                "the long-lived connection {:?} after the restart: {err}\n{}",
                restarted.elapsed(),
                lab.log_tails(40)
            )
        });
        assert!(
            reaches(&lab, 0, false, 8001, Duration::from_secs(2)),
            "new connections refused {:?} after the restart\n{}",
            restarted.elapsed(),
            lab.log_tails(40)
        );
        let current = lease.id().to_string();
        if renewed_after_restart(&audit(&lab), &current) {
            break;
        }
        assert!(
            restarted.elapsed() < limit,
            "no renewal of the lease by the restarted gateway within {limit:?}\n{}",
            lab.log_tails(40)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The application kept its opening all along (the same lease, or a reopened one).
    assert!(lease.is_active(), "the application lost its lease");
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(50), lease.next_event()).await
    {
        assert!(!event.is_terminal(), "the lease ended: {event}");
    }
    assert!(
        lab.host_has(0, "tcp", 8001),
        "the host's mirror was dropped"
    );
    let trail = audit(&lab);
    let reconciles = trail
        .iter()
        .filter(|e| e.kind() == Some("reconcile"))
        .count();
    assert!(reconciles >= 2, "no reconcile audited at the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_closes_openings_at_lease_end() {
    if !require_root("agent_sigkill_closes_openings_at_lease_end") {
        return;
    }
    let mut lab = start_lab("e2e-agentkill", 1);
    let _echo = TcpEchoServer::start(&lab.site.hosts[0].netns, 8001).expect("echo");
    let app = client(&lab, 0).await;
    let mut lease = open(&app, Opening::tcp(8001).lifetime(Duration::from_secs(3))).await;
    let id = lease.id().to_string();
    assert_eq!(lease.lifetime(), Duration::from_secs(3));
    assert!(reaches(&lab, 0, false, 8001, REFUSED));

    let killed = Instant::now();
    lab.kill_agent(0);
    // The kernels keep the opening until the lease's end: a dead agent closes nothing early.
    let v4 = lab.site.hosts[0].v4;
    assert!(lab.gateway_has(v4, "tcp", 8001) && lab.host_has(0, "tcp", 8001));
    match next_non_renewal(&mut lease, SETTLE).await {
        Some(LeaseEvent::Disconnected) | None => {}
        Some(other) => panic!("expected the SDK to see the agent go, got {other}"),
    }
    // Nobody renews: the opening closes at the lease's end on both sides (the gateway's timer
    // and the kernel's element timeouts).
    assert!(
        eventually(Duration::from_secs(8), || !lab.gateway_has(v4, "tcp", 8001)
            && !lab.host_has(0, "tcp", 8001)),
        "still in a table {:?} after the agent died:\n{}\n{}",
        killed.elapsed(),
        lab.gateway_table(),
        lab.host_table(0)
    );
    assert!(
        !reaches(&lab, 0, false, 8001, REFUSED),
        "open after the lease's end"
    );
    let trail = audit(&lab);
    let events = lease_trail(&trail, &id);
    assert!(has(&events, "expiry", "expired"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_lease_survives_a_three_second_gateway_restart() {
    if !require_root("a_ten_second_lease_survives_a_three_second_gateway_restart") {
        return;
    }
    let mut lab = start_lab("e2e-gwrestart", 1);
    let _echo = TcpEchoServer::start(&lab.site.hosts[0].netns, 8002).expect("echo");
    let app = client(&lab, 0).await;
    let mut lease = open(&app, Opening::tcp(8002).lifetime(Duration::from_secs(10))).await;
    let granted = Instant::now();
    let id = lease.id().to_string();
    assert_eq!(lease.lifetime(), Duration::from_secs(10));

    // A crash just after the grant, and a restart on the same state directory 3 s later.
    lab.kill_gateway();
    let killed = granted.elapsed();
    let mut missing = Vec::new();
    let mut watch_host_table = |lab: &Lab, until: Instant| {
        while Instant::now() < until {
            if !lab.host_has(0, "tcp", 8002) {
                missing.push(granted.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    tokio::task::block_in_place(|| watch_host_table(&lab, Instant::now() + Duration::from_secs(3)));
    tokio::task::block_in_place(|| lab.start_gateway()).unwrap_or_else(|err| panic!("{err}"));
    let ready = granted.elapsed();

    // Two and a half lifetimes after the grant: the lease must have been renewed by the
    // restarted gateway, and the host's opening never closed.
    tokio::task::block_in_place(|| watch_host_table(&lab, granted + Duration::from_secs(25)));
    let mut events = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(50), lease.next_event()).await
    {
        events.push(event);
    }
    let logs = lab.log_tails(60);
    assert!(
        missing.is_empty(),
        "the host's opening was missing at {missing:?} (killed at {killed:?}, ready again at \
         {ready:?})\n{logs}"
    );
    assert!(
        events
            .iter()
            .all(|e| !e.is_terminal() && !matches!(e, LeaseEvent::Reopened { .. })),
        "the lease did not survive: {events:?}\n{logs}"
    );
    assert_eq!(
        lease.id().to_string(),
        id,
        "the lease was replaced: {events:?}"
    );
    assert!(lease.is_active(), "{events:?}\n{logs}");
    let trail = lease_trail(&audit(&lab), &id);
    assert!(!has(&trail, "expiry", "expired"), "{trail:?}\n{logs}");
    let renewals = trail
        .iter()
        .filter(|(kind, outcome)| kind == "renewal" && outcome == "renewed")
        .count();
    assert!(renewals >= 2, "{renewals} renewals: {trail:?}\n{logs}");
    assert!(
        lab.gateway_has(lab.site.hosts[0].v4, "tcp", 8002),
        "{}",
        lab.gateway_table()
    );
}

/// The lab's echo server, run by `fwnp open` as its command (`fwnp-lab serve PORT SECONDS`).
const LAB_EXE: &str = env!("CARGO_BIN_EXE_fwnp-lab");

/// `fwnp open SPEC ARGS -- fwnp-lab serve PORT 60` in host 0's namespace, started.
fn fwnp_open_serving(lab: &Lab, port: u16, args: &[&str]) -> Child {
    let mut command = netns_command(&lab.site.hosts[0].netns, &lab.bins.fwnp);
    command
        .arg("open")
        .arg(format!("tcp/{port}"))
        .args(args)
        .args(["--", LAB_EXE, "serve", &port.to_string(), "60"])
        .env("FWNP_AGENT_SOCKET", lab.agent_socket(0))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().expect("fwnp starts")
}

/// Stops `fwnp` with SIGTERM (which it passes on to its command, then releases the lease) and
/// waits for it, at most 10 s; returns what it wrote on stderr.
fn stop_fwnp(mut child: Child) -> String {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let exited = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            child.try_wait().is_ok_and(|status| status.is_some())
        })
    });
    if !exited {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("fwnp's output");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A dual-stack host: `fwnp open tcp/PORT -- SERVER` with no address makes PORT reachable from
/// outside over IPv4 and IPv6 under one lease (both kernels hold an element per address);
/// `--family 6` and one `--address` narrow it to one family; the SDK does the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opening_without_an_address_covers_both_families() {
    if !require_root("an_opening_without_an_address_covers_both_families") {
        return;
    }
    let lab = start_lab("e2e-dual", 1);
    let (v4, v6) = (lab.site.hosts[0].v4, lab.site.hosts[0].v6);

    // The command line, no address: both families.
    let both = fwnp_open_serving(&lab, 8101, &[]);
    assert!(
        eventually_reachable(&lab, 0, false, 8101, true),
        "IPv4 closed"
    );
    assert!(
        eventually_reachable(&lab, 0, true, 8101, true),
        "IPv6 closed"
    );
    assert!(lab.gateway_has(v4, "tcp", 8101) && lab.gateway_has(v6, "tcp", 8101));
    let host_table = lab.host_table(0);
    assert!(
        table_has(&host_table, Some(v4), "tcp", 8101)
            && table_has(&host_table, Some(v6), "tcp", 8101),
        "{host_table}"
    );
    let said = stop_fwnp(both);
    assert!(
        eventually_reachable(&lab, 0, false, 8101, false),
        "IPv4 still open: {said}"
    );
    assert!(
        eventually_reachable(&lab, 0, true, 8101, false),
        "IPv6 still open: {said}"
    );
    // One lease held both: one grant and one release for the port in the audit trail.
    let trail = audit(&lab);
    let granted: Vec<&AuditEntry> = trail
        .iter()
        .filter(|e| {
            e.outcome() == Some("granted")
                && e.0
                    .pointer("/request/opening")
                    .and_then(serde_json::Value::as_str)
                    == Some("tcp/8101")
        })
        .collect();
    assert_eq!(granted.len(), 1, "{trail:?}");

    // --family 6: IPv6 only.
    let v6_only = fwnp_open_serving(&lab, 8102, &["--family", "6"]);
    assert!(
        eventually_reachable(&lab, 0, true, 8102, true),
        "IPv6 closed"
    );
    assert!(
        !reaches(&lab, 0, false, 8102, REFUSED),
        "IPv4 open with --family 6"
    );
    assert!(!lab.gateway_has(v4, "tcp", 8102));
    stop_fwnp(v6_only);

    // One --address: that address only.
    let v4_arg = v4.to_string();
    let one = fwnp_open_serving(&lab, 8103, &["--address", &v4_arg]);
    assert!(
        eventually_reachable(&lab, 0, false, 8103, true),
        "IPv4 closed"
    );
    assert!(
        !reaches(&lab, 0, true, 8103, REFUSED),
        "IPv6 open with one --address"
    );
    assert!(!lab.gateway_has(v6, "tcp", 8103));
    stop_fwnp(one);

    // The SDK, no address: one lease with a grant on each address.
    let _echo = TcpEchoServer::start_ports(&lab.site.hosts[0].netns, &[8104]).expect("echo");
    let app = client(&lab, 0).await;
    let lease = open(&app, Opening::tcp(8104)).await;
    let hosts: Vec<_> = lease.grants().iter().map(|g| g.host).collect();
    assert_eq!(hosts, vec![v4, v6]);
    assert!(reaches(&lab, 0, false, 8104, REFUSED) && reaches(&lab, 0, true, 8104, REFUSED));
    lease.release().await.expect("release");
    assert!(eventually_reachable(&lab, 0, false, 8104, false));
    assert!(eventually_reachable(&lab, 0, true, 8104, false));
}
