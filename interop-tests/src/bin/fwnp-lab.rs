//! `fwnp-lab`: FWNP's whole story on one machine, with the real daemons and the real kernel.
//!
//! As root it builds three network namespaces (outside, gateway, host), makes a PKI with
//! `fwnpctl pki`, starts `fwnp-gateway` and `fwnp-agent` in their namespaces, and walks through
//! the life of an opening, printing what it observes at each step: the host's port is closed, an
//! application asks for it, it is granted and carries traffic, the audit trail shows it, the
//! operator revokes it and it is closed again on the gateway and on the host; then the `fwnp`
//! command holds an opening for exactly as long as a server it runs. It exits 0 only when every
//! step behaved as expected, and removes everything it created, also when interrupted.
//!
//! With `--cluster` it tells a failover instead: a three-member etcd cluster and two gateways
//! on it, each with its own kernel filter, a host whose agent knows both and whose application
//! holds an opening; the active gateway's machine dies (SIGKILL, links down, routes moved to the
//! other), the host's agent renews the same lease through the other gateway within seconds
//! (measured), the port stays reachable through it, the dead gateway comes back and holds the
//! opening again, and the release closes it on both.
//!
//! Run it with `sudo scripts/lab` (or `sudo scripts/lab --cluster`), which builds the binaries
//! first.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use fwnp_interop_tests::cluster::{
    ClusterDeployment, ClusterNames, HOST, LAN, LAN_IF, QUIC_PORT, SERVER, SITES, WAN, WAN_IF,
    gateway_index,
};
use fwnp_interop_tests::{
    AuditEntry, Binaries, Lab, LabError, LabOptions, TcpEchoServer, echo_exchange,
    emergency_cleanup, netns_command, tcp_connects, wait_until,
};
use fwnp_sdk::{Client, LeaseEvent, Opening};

/// Exit status when the lab cannot run here (not root, binaries missing).
const CANNOT_RUN: u8 = 2;
/// Exit status when a step did not behave as expected.
const STEP_FAILED: u8 = 1;
/// Exit status after SIGINT or SIGTERM (128 + SIGINT).
const INTERRUPTED: u8 = 130;

/// The port the application of the story serves on.
const APP_PORT: u16 = 8080;
/// The port the `fwnp open ... -- CMD` part serves on.
const CMD_PORT: u16 = 8081;
/// How long the server run by `fwnp open` serves before it exits.
const CMD_SERVES: Duration = Duration::from_secs(4);

/// A connection attempt that gets no answer within this long counts as closed (longer than
/// TCP's first SYN retransmission, so one lost packet does not decide).
const CLOSED_WITHIN: Duration = Duration::from_millis(1200);

const POLICY: &str = r#"# The lab's policy: default deny; the lab's hosts may open TCP ports 8000-8999 for up to five
# minutes at a time (they renew for as long as the application holds the opening).
[defaults]
lifetime = "60s"
min_lifetime = "1s"
max_lifetime = "5m"

[[group]]
name = "lab-hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "lab-web"
description = "Web-style services of the lab's hosts"
groups = ["lab-hosts"]
allow = "tcp/8000-8999"
"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cluster = false;
    match args.first().map(String::as_str) {
        None => {}
        Some("--cluster") => match args.get(1) {
            None => cluster = true,
            Some(other) => {
                eprintln!("fwnp-lab: unknown argument {other:?} after --cluster (try --help)");
                return ExitCode::from(CANNOT_RUN);
            }
        },
        Some("serve") => return serve(&args[1..]),
        Some("-h" | "--help") => {
            println!(
                "fwnp-lab: FWNP's story in network namespaces, with the real gateway and agent.\n\n\
                 Usage: sudo scripts/lab      (builds the binaries, then runs target/debug/fwnp-lab)\n\
                 \x20      sudo scripts/lab --cluster\n\
                 \x20      sudo fwnp-lab [--cluster]\n\n\
                 --cluster: two gateways on a three-member etcd cluster; the active one dies and\n\
                 the host's agent fails over to the other, with real packets (needs etcd and\n\
                 etcdctl too).\n\n\
                 Needs root (network namespaces and nf_tables), iproute2 and nftables.\n\
                 Exit status: 0 every step behaved as expected; 1 a step did not (it says which\n\
                 and what it saw); 2 it cannot run here; 130 interrupted.\n\
                 FWNP_LAB_LOG sets the daemons' log filter (default info); their logs are shown\n\
                 when a step fails."
            );
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("fwnp-lab: unknown argument {other:?} (try --help)");
            return ExitCode::from(CANNOT_RUN);
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "fwnp-lab needs root: it creates network namespaces (ip netns) and programs nf_tables \
             in them.\nRun it as root: sudo scripts/lab"
        );
        return ExitCode::from(CANNOT_RUN);
    }
    if cluster && let Some(missing) = missing_etcd() {
        eprintln!(
            "fwnp-lab --cluster needs {missing} (Debian's etcd-server and etcd-client, which \
             scripts/deps.sh installs)"
        );
        return ExitCode::from(CANNOT_RUN);
    }
    let bins = match Binaries::locate() {
        Ok(bins) => bins,
        Err(err) => {
            eprintln!("fwnp-lab: {err}");
            return ExitCode::from(CANNOT_RUN);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fwnp-lab: cannot start the runtime: {err}");
            return ExitCode::from(CANNOT_RUN);
        }
    };
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            eprintln!("fwnp-lab: cannot install the signal handlers");
            return ExitCode::from(CANNOT_RUN);
        };
        let started = Instant::now();
        // The story owns the lab: when a signal wins, the story is dropped, and with it the
        // daemons, namespaces and files (their Drop guards).
        // The story runs on a worker thread and owns the lab, whose Drop guards clean up when
        // it ends. A signal is handled here at once, even while the story is in a blocking
        // step: everything the lab created is removed from the library's record of it, then
        // the process exits.
        let story = if cluster {
            tokio::spawn(cluster_story(bins))
        } else {
            tokio::spawn(story(bins))
        };
        let interrupted = tokio::select! {
            result = story => {
                return match result {
                    Ok(Ok(steps)) => {
                        println!(
                            "\nAll {steps} steps behaved as expected ({:.1} s). Everything the \
                             lab created has been removed.",
                            started.elapsed().as_secs_f64()
                        );
                        ExitCode::SUCCESS
                    }
                    Ok(Err(failure)) => {
                        println!("\n{failure}");
                        println!("Everything the lab created has been removed.");
                        ExitCode::from(STEP_FAILED)
                    }
                    Err(panic) => {
                        emergency_cleanup();
                        println!("\nthe lab itself failed: {panic}");
                        ExitCode::from(STEP_FAILED)
                    }
                };
            }
            _ = interrupt.recv() => "interrupted",
            _ = terminate.recv() => "terminated",
        };
        tokio::task::block_in_place(emergency_cleanup);
        eprintln!("\nfwnp-lab: {interrupted}; everything it created has been removed");
        std::process::exit(i32::from(INTERRUPTED));
    })
}

/// A step that did not behave as expected.
#[derive(Debug)]
struct Failure {
    step: usize,
    title: String,
    expected: String,
    seen: String,
    logs: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "FAILED at step {}: {}", self.step, self.title)?;
        writeln!(f, "  expected: {}", self.expected)?;
        writeln!(f, "  seen:     {}", self.seen)?;
        if !self.logs.is_empty() {
            write!(f, "{}", self.logs)?;
        }
        Ok(())
    }
}

/// The narrator: numbers the steps and turns a surprise into a [`Failure`].
struct Story {
    step: usize,
    title: String,
}

impl Story {
    fn step(&mut self, title: &str) {
        self.step += 1;
        self.title = title.to_string();
        println!("\n[{}] {title}", self.step);
    }

    fn saw(&self, what: impl std::fmt::Display) {
        for line in what.to_string().lines() {
            println!("    {line}");
        }
    }

    fn ok(&self, what: impl std::fmt::Display) {
        println!("  ok: {what}");
    }

    fn fail(&self, lab: Option<&mut Lab>, expected: &str, seen: impl Into<String>) -> Failure {
        let logs = match lab {
            Some(lab) => {
                let gateway = lab
                    .gateway_daemon()
                    .map(|d| d.log_tail(15))
                    .unwrap_or_default();
                let agent = lab
                    .agent_daemon(0)
                    .map(|d| d.log_tail(15))
                    .unwrap_or_default();
                format!(
                    "  the gateway's last log lines:\n{}\n  the agent's last log lines:\n{}\n",
                    indent(&gateway),
                    indent(&agent)
                )
            }
            None => String::new(),
        };
        self.fail_with(logs, expected, seen)
    }

    /// A failure with `logs`, the daemons' last lines as the caller has them.
    fn fail_with(&self, logs: String, expected: &str, seen: impl Into<String>) -> Failure {
        Failure {
            step: self.step,
            title: self.title.clone(),
            expected: expected.to_string(),
            seen: seen.into(),
            logs,
        }
    }

    fn lab_error(&self, lab: Option<&mut Lab>, err: LabError) -> Failure {
        self.fail(lab, "the operation to succeed", err.to_string())
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the outside reaches `to` (blocking probe, off the async workers' hot path).
fn reaches(lab: &Lab, to: SocketAddr, within: Duration) -> bool {
    tokio::task::block_in_place(|| tcp_connects(&lab.site.outside, to, None, within))
}

async fn story(bins: Binaries) -> Result<usize, Failure> {
    let mut story = Story {
        step: 0,
        title: String::new(),
    };
    println!("FWNP lab: a host asks its gateway to open a port, for as long as it needs it.");

    story.step("Build the network, the PKI, and start the gateway and the host's agent");
    let options = LabOptions {
        label: "lab".into(),
        hosts: 1,
        host_prefix: "web".into(),
        policy: POLICY.into(),
        verify_port_owner: true,
    };
    let mut lab = tokio::task::block_in_place(|| Lab::start(bins, &options))
        .map_err(|err| story.lab_error(None, err))?;
    let site = &lab.site;
    let host = &site.hosts[0];
    story.saw(format!(
        "outside  (namespace {})  {}  {}",
        site.outside.name(),
        site.outside_v4,
        site.outside_v6
    ));
    story.saw(format!(
        "gateway  (namespace {})  {}  {}  forwarding; fwnp-gateway listens on {}:{}",
        site.gateway.name(),
        site.gateway_inside_v4,
        site.gateway_inside_v6,
        site.gateway_inside_v4,
        fwnp_interop_tests::GATEWAY_PORT
    ));
    story.saw(format!(
        "host     (namespace {})  {}  {}  runs fwnp-agent; identity fwnp://host/{}",
        host.netns.name(),
        host.v4,
        host.v6,
        host.name
    ));
    story.saw(format!("files in {}", lab.dir().display()));
    story.saw("fwnpctl pki init / pki issue:");
    story.saw(indent(lab.pki_output.trim()));
    let status = lab
        .fwnpctl(&["status"])
        .map_err(|err| story.lab_error(None, err))?;
    story.saw("fwnpctl status:");
    story.saw(indent(status.trim()));
    story.ok("the gateway serves and the agent is connected to it");

    let host_v4 = lab.site.hosts[0].v4;
    let app_v4 = SocketAddr::new(host_v4, APP_PORT);

    story.step(&format!(
        "An application listens on tcp/{APP_PORT} on the host: closed from outside"
    ));
    let echo = TcpEchoServer::start(&lab.site.hosts[0].netns, APP_PORT).map_err(|err| {
        story.fail(
            Some(&mut lab),
            "an echo server on the host",
            err.to_string(),
        )
    })?;
    story.saw(format!(
        "an echo server listens on [::]:{APP_PORT} in the host namespace"
    ));
    if reaches(&lab, app_v4, CLOSED_WITHIN) {
        return Err(story.fail(
            Some(&mut lab),
            "no answer from outside",
            "the connection succeeded",
        ));
    }
    story.saw(format!(
        "outside -> {app_v4}: no answer within {CLOSED_WITHIN:?} (the gateway drops the SYN)"
    ));
    let gateway_inside = lab.site.gateway_inside_v4;
    let from_gateway = tokio::task::block_in_place(|| {
        tcp_connects(
            &lab.site.gateway,
            app_v4,
            Some(gateway_inside),
            CLOSED_WITHIN,
        )
    });
    if from_gateway {
        return Err(story.fail(
            Some(&mut lab),
            "no answer from the gateway's own address (the host's table drops it)",
            "the connection succeeded",
        ));
    }
    story.saw(format!(
        "gateway -> {app_v4}: no answer (the host's own table `inet fwnp_host` drops it too)"
    ));
    story.ok("closed on the gateway and on the host");

    story.step(&format!(
        "The application asks the agent for tcp/{APP_PORT} through the SDK"
    ));
    let client = Client::connect_to(lab.agent_socket(0))
        .await
        .map_err(|err| story.fail(Some(&mut lab), "a connection to the agent", err.to_string()))?;
    let asked = Instant::now();
    let mut lease = client
        .open(
            Opening::tcp(APP_PORT)
                .lifetime(Duration::from_secs(60))
                .name("lab-echo"),
        )
        .await
        .map_err(|err| story.fail(Some(&mut lab), "a grant", err.to_string()))?;
    let lease_id = lease.id().to_string();
    story.saw(format!(
        "Client::connect_to({}).open(Opening::tcp({APP_PORT}).lifetime(60 s).name(\"lab-echo\"))",
        lab.agent_socket(0).display()
    ));
    story.saw(format!(
        "granted in {} ms: lease {lease_id}",
        asked.elapsed().as_millis()
    ));
    for grant in lease.grants() {
        story.saw(format!(
            "  grant: {}/{} on {}",
            format!("{:?}", grant.protocol).to_lowercase(),
            grant.ports,
            grant.host
        ));
    }
    story.saw(format!(
        "  lifetime {} s, expires {} (the agent renews it while the application holds it)",
        lease.lifetime().as_secs(),
        humantime::format_rfc3339_seconds(lease.gateway_expires())
    ));
    story.ok("granted");

    story.step("The opening is in both kernels, and a connection from outside carries data");
    if !lab.gateway_has(host_v4, "tcp", APP_PORT) {
        let table = lab.gateway_table();
        return Err(story.fail(Some(&mut lab), "an element in the gateway's table", table));
    }
    let host_mirrored = wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
        lab.host_has(0, "tcp", APP_PORT)
    });
    if !host_mirrored {
        let table = lab.host_table(0);
        return Err(story.fail(Some(&mut lab), "an element in the host's table", table));
    }
    for (where_, table) in [
        ("gateway", lab.gateway_table()),
        ("host", lab.host_table(0)),
    ] {
        for line in table.lines().filter(|l| l.contains(&format!("{APP_PORT}"))) {
            story.saw(format!("{where_} table: {}", line.trim()));
        }
    }
    // The opening names no address, so the gateway granted every address of the host, IPv4
    // and IPv6; the exchange goes over IPv4, the end-to-end suite tries both.
    {
        let to = app_v4;
        let payload = format!("hello {to} through FWNP\n");
        let back = tokio::task::block_in_place(|| {
            echo_exchange(
                &lab.site.outside,
                to,
                payload.as_bytes(),
                Duration::from_secs(2),
            )
        });
        match back {
            Ok(back) if back == payload.as_bytes() => story.saw(format!(
                "outside -> {to}: connected, sent {:?}, got back {:?}",
                payload.trim_end(),
                String::from_utf8_lossy(&back).trim_end()
            )),
            Ok(back) => {
                return Err(story.fail(
                    Some(&mut lab),
                    "the echo of what was sent",
                    String::from_utf8_lossy(&back),
                ));
            }
            Err(err) => {
                return Err(story.fail(
                    Some(&mut lab),
                    "a connection from outside",
                    err.to_string(),
                ));
            }
        }
    }
    story.ok("open");

    story.step("The operator sees the lease and its audit trail");
    let leases = lab
        .fwnpctl(&["leases"])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    story.saw("fwnpctl leases:");
    story.saw(indent(leases.trim()));
    let audit = lab
        .fwnpctl(&["audit"])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    story.saw("fwnpctl audit:");
    story.saw(indent(audit.trim()));
    let trail = lab
        .audit(&[])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    let granted = trail
        .iter()
        .any(|e| e.lease() == Some(lease_id.as_str()) && e.outcome() == Some("granted"));
    if !granted || !leases.contains(&lease_id) {
        return Err(story.fail(
            Some(&mut lab),
            "the lease in `fwnpctl leases` and a granted event for it in the audit trail",
            format!("{} audit events; leases:\n{leases}", trail.len()),
        ));
    }
    story.ok("the lease is listed and its grant is audited");

    story.step("The operator revokes the lease");
    let revoked = lab
        .fwnpctl(&[
            "revoke",
            &lease_id,
            "--reason",
            "lab: the operator closes it",
        ])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    story.saw(format!(
        "fwnpctl revoke {lease_id} --reason 'lab: the operator closes it':"
    ));
    story.saw(indent(revoked.trim()));
    let event = tokio::time::timeout(Duration::from_secs(5), lease.next_event()).await;
    match event {
        Ok(Some(event @ LeaseEvent::Revoked { .. })) => {
            story.saw(format!("the application's Lease reports: {event}"));
        }
        other => {
            return Err(story.fail(
                Some(&mut lab),
                "a Revoked event on the application's Lease within 5 s",
                format!("{other:?}"),
            ));
        }
    }
    story.ok("revoked, and the application was told");

    story.step("The port is closed again, on the gateway and on the host");
    let closed = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            !lab.gateway_has(host_v4, "tcp", APP_PORT) && !lab.host_has(0, "tcp", APP_PORT)
        })
    });
    if !closed {
        let tables = format!("{}\n{}", lab.gateway_table(), lab.host_table(0));
        return Err(story.fail(Some(&mut lab), "no element left in either table", tables));
    }
    story.saw(format!(
        "no element for {host_v4} . tcp . {APP_PORT} in the gateway's table, none for tcp . {APP_PORT} in the host's"
    ));
    if reaches(&lab, app_v4, CLOSED_WITHIN) {
        return Err(story.fail(
            Some(&mut lab),
            "no answer from outside",
            "the connection succeeded",
        ));
    }
    story.saw(format!("outside -> {app_v4}: no answer"));
    let from_gateway = tokio::task::block_in_place(|| {
        tcp_connects(
            &lab.site.gateway,
            app_v4,
            Some(gateway_inside),
            CLOSED_WITHIN,
        )
    });
    if from_gateway {
        return Err(story.fail(
            Some(&mut lab),
            "no answer from the gateway's address (the host's table)",
            "the connection succeeded",
        ));
    }
    story.saw(format!(
        "gateway -> {app_v4}: no answer (the host's own table)"
    ));
    let trail = lab
        .audit(&[])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    let revocation = trail
        .iter()
        .find(|e| e.lease() == Some(lease_id.as_str()) && e.outcome() == Some("revoked"));
    match revocation {
        Some(entry) => story.saw(format!(
            "audit: {} revoked by {} ({})",
            lease_id,
            entry.actor().unwrap_or("?"),
            entry.reason().unwrap_or("no reason")
        )),
        None => {
            return Err(story.fail(
                Some(&mut lab),
                "a revoked event for the lease in the audit trail",
                format!("{} events, none revoked for {lease_id}", trail.len()),
            ));
        }
    }
    story.ok("closed on both sides, and the revocation is audited");
    drop(echo);
    drop(client);

    story.step(&format!(
        "`fwnp open tcp/{CMD_PORT} -- SERVER` holds an opening exactly as long as SERVER runs"
    ));
    let cmd_v4 = SocketAddr::new(host_v4, CMD_PORT);
    let lab_exe = std::env::current_exe()
        .map_err(|err| story.fail(Some(&mut lab), "the lab's own path", err.to_string()))?;
    let serves = CMD_SERVES.as_secs().to_string();
    let mut command = netns_command(&lab.site.hosts[0].netns, &lab.bins.fwnp);
    command
        .args(["open", &format!("tcp/{CMD_PORT}"), "--for", "30s", "--"])
        .arg(&lab_exe)
        .args(["serve", &CMD_PORT.to_string(), &serves])
        .env("FWNP_AGENT_SOCKET", lab.agent_socket(0))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    story.saw(format!(
        "in the host namespace: fwnp open tcp/{CMD_PORT} --for 30s -- fwnp-lab serve {CMD_PORT} {serves}"
    ));
    let started = Instant::now();
    let child = command
        .spawn()
        .map_err(|err| story.fail(Some(&mut lab), "fwnp to start", err.to_string()))?;
    let opened = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
            tcp_connects(&lab.site.outside, cmd_v4, None, Duration::from_millis(300))
        })
    });
    if !opened {
        let output = child.wait_with_output().ok();
        let said = output
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        return Err(story.fail(
            Some(&mut lab),
            "the server reachable from outside while fwnp holds the opening",
            format!("no connection within 3 s; fwnp said: {said}"),
        ));
    }
    story.saw(format!(
        "outside -> {cmd_v4}: connected and echoed {} ms after fwnp started",
        started.elapsed().as_millis()
    ));
    let output = tokio::task::block_in_place(|| child.wait_with_output())
        .map_err(|err| story.fail(Some(&mut lab), "fwnp to exit", err.to_string()))?;
    story.saw(format!(
        "the server exited after {:.1} s; fwnp exited with {}",
        started.elapsed().as_secs_f64(),
        output.status
    ));
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        story.saw(format!("  {line}"));
    }
    if !output.status.success() {
        return Err(story.fail(
            Some(&mut lab),
            "fwnp to exit 0 like its command",
            output.status.to_string(),
        ));
    }
    let closed = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            !lab.gateway_has(host_v4, "tcp", CMD_PORT) && !lab.host_has(0, "tcp", CMD_PORT)
        })
    });
    if !closed {
        let tables = format!("{}\n{}", lab.gateway_table(), lab.host_table(0));
        return Err(story.fail(
            Some(&mut lab),
            "the opening gone once the command exited",
            tables,
        ));
    }
    story.saw(format!(
        "no element for tcp/{CMD_PORT} left on the gateway or the host"
    ));
    // The gateway takes the opening out of the kernel before it records the release: the
    // record may come a moment after the element is gone.
    let has_release = |trail: &[AuditEntry]| trail.iter().any(|e| e.outcome() == Some("released"));
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
            lab.audit(&[]).is_ok_and(|trail| has_release(&trail))
        })
    });
    let trail = lab
        .audit(&[])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    if !has_release(&trail) {
        return Err(story.fail(
            Some(&mut lab),
            "a released event in the audit trail",
            format!("{} events, none released", trail.len()),
        ));
    }
    story.ok("granted while the server ran, released when it exited");

    story.step("The whole trail, as an auditor reads it");
    let audit = lab
        .fwnpctl(&["audit", "--outcome", "granted,revoked,released"])
        .map_err(|err| story.lab_error(Some(&mut lab), err))?;
    story.saw("fwnpctl audit --outcome granted,revoked,released:");
    story.saw(indent(audit.trim()));
    story.ok(format!(
        "{} events recorded in the gateway's SQLite store",
        trail.len()
    ));

    println!("\nCleaning up: stopping the daemons, deleting the namespaces and files.");
    drop(lab);
    Ok(story.step)
}

/// `fwnp-lab serve PORT SECONDS`: an echo server on `[::]:PORT` for SECONDS, then exit 0. The
/// lab runs it under `fwnp open` in the host namespace.
fn serve(args: &[String]) -> ExitCode {
    let (Some(port), Some(seconds)) = (
        args.first().and_then(|p| p.parse::<u16>().ok()),
        args.get(1).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: fwnp-lab serve PORT SECONDS");
        return ExitCode::from(CANNOT_RUN);
    };
    use std::io::{Read, Write};
    let listener = match std::net::TcpListener::bind(("::", port)) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("fwnp-lab serve: cannot listen on port {port}: {err}");
            return ExitCode::from(STEP_FAILED);
        }
    };
    if listener.set_nonblocking(true).is_err() {
        return ExitCode::from(STEP_FAILED);
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 1024];
                if let Ok(n) = stream.read(&mut buf)
                    && let Some(data) = buf.get(..n)
                {
                    let _ = stream.write_all(data);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    ExitCode::SUCCESS
}

/// The port the application of the cluster story serves on (the cluster's policy allows
/// tcp/7000-7999).
const CLUSTER_PORT: u16 = 7080;

/// Bound of every wait in the cluster story for a change to show.
const CLUSTER_SETTLE: Duration = Duration::from_secs(10);

/// The failover's aim: from a gateway's death to the host's renewals answered by another.
const FAILOVER_AIM: Duration = Duration::from_secs(3);

/// The first of `etcd` and `etcdctl` that cannot be run here, if any.
fn missing_etcd() -> Option<&'static str> {
    [("etcd", "--version"), ("etcdctl", "version")]
        .into_iter()
        .find(|(tool, version)| {
            !std::process::Command::new(tool)
                .arg(version)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(tool, _)| tool)
}

/// A failure of the cluster story, with the daemons' last log lines.
fn cluster_fail(
    story: &Story,
    d: &ClusterDeployment,
    expected: &str,
    seen: impl Into<String>,
) -> Failure {
    story.fail_with(
        format!(
            "  the daemons' last log lines:\n{}\n",
            indent(&d.log_tails(15))
        ),
        expected,
        seen,
    )
}

/// The members `fwnpctl status` lists as live.
fn live_members(status: &str) -> Vec<String> {
    status
        .lines()
        .skip_while(|line| line.trim() != "members:")
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let site = words.next()?;
            (words.next() == Some("live")).then(|| site.to_string())
        })
        .collect()
}

/// The cluster's part of `fwnpctl status` (from its `site` line on): the members and the
/// revision each one applied.
fn cluster_part(status: &str) -> String {
    status
        .lines()
        .skip_while(|line| !line.starts_with("site "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines of an `nft list table` listing that mention `port`.
fn element_lines(table: &str, port: u16) -> Vec<String> {
    let port = port.to_string();
    table
        .lines()
        .filter(|line| line.contains(&port))
        .map(|line| line.trim().to_string())
        .collect()
}

/// `fwnpctl status` through gateway `i` once it lists both gateways as live members (bounded).
fn status_with_both_members(d: &ClusterDeployment, i: usize) -> Result<String, String> {
    let mut last = String::new();
    let both = wait_until(CLUSTER_SETTLE, Duration::from_millis(200), || {
        match d.fwnpctl(i, &["status"]) {
            Ok(status) => {
                let live = live_members(&status);
                last = status;
                SITES.iter().all(|site| live.iter().any(|l| l == site))
            }
            Err(err) => {
                last = err.to_string();
                false
            }
        }
    });
    if both { Ok(last) } else { Err(last) }
}

/// Sends a line from the server to the host's `port` and checks that it comes back.
fn server_exchange(d: &ClusterDeployment, port: u16, payload: &str) -> Result<String, String> {
    let to = SocketAddr::from((HOST, port));
    match echo_exchange(
        &d.site.server,
        to,
        payload.as_bytes(),
        Duration::from_secs(2),
    ) {
        Ok(back) if back == payload.as_bytes() => Ok(format!(
            "server -> {to}: connected, sent {:?}, got back {:?}",
            payload.trim_end(),
            String::from_utf8_lossy(&back).trim_end()
        )),
        Ok(back) => Err(format!(
            "the echo differs: {:?}",
            String::from_utf8_lossy(&back)
        )),
        Err(err) => Err(format!("server -> {to}: {err}")),
    }
}

/// The cluster story: two gateways on a three-member etcd cluster, a host whose application
/// holds an opening, the active gateway's death and the host's failover, with real packets.
async fn cluster_story(bins: Binaries) -> Result<usize, Failure> {
    let mut story = Story {
        step: 0,
        title: String::new(),
    };
    println!(
        "FWNP lab, cluster: two gateways share their leases through etcd; the active one dies \
         and the host's opening goes on through the other."
    );

    story.step("Start a three-member etcd cluster, two gateways on it, and the host's agent");
    let names = ClusterNames {
        label: "lab-cluster".into(),
        etcd: "lab".into(),
        netns: "lab".into(),
        key_prefix: "/fwnp-lab".into(),
    };
    let mut d = tokio::task::block_in_place(|| ClusterDeployment::start(bins, &names))
        .map_err(|err| story.lab_error(None, err))?;
    story.saw(format!(
        "etcd     (namespace {})  3 members: {}",
        d.cluster.netns().name(),
        d.cluster.endpoints().join(" ")
    ));
    for i in 0..2 {
        story.saw(format!(
            "gateway {} (namespace {})  {} / {}  site {}; [store] backend = \"etcd\"; listens on {}:{QUIC_PORT}",
            ["A", "B"][i],
            d.site.gateways[i].name(),
            WAN[i],
            LAN[i],
            SITES[i],
            LAN[i],
        ));
    }
    story.saw(format!(
        "host     (namespace {})  {HOST}  runs fwnp-agent with addresses = [\"{}:{QUIC_PORT}\", \"{}:{QUIC_PORT}\"]; default route via A",
        d.site.host.name(),
        LAN[0],
        LAN[1]
    ));
    story.saw(format!(
        "server   (namespace {})  {SERVER}  route to 198.51.100.0/24 via A",
        d.site.server.name()
    ));
    story.saw(format!("files in {}", d.dir().display()));
    story.saw(format!(
        "etcd's data and logs in {}",
        d.cluster.dir().display()
    ));
    let socket = d.agent_socket();
    let connected = tokio::time::timeout(CLUSTER_SETTLE, async {
        loop {
            if let Ok(client) = Client::connect_to(&socket).await
                && client.status().await.is_ok_and(|s| s.connected)
            {
                return Ok(client);
            }
            if let Some(status) = d.agent_exited() {
                return Err(format!("fwnp-agent exited: {status}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("not within {CLUSTER_SETTLE:?}")));
    let client = connected
        .map_err(|seen| cluster_fail(&story, &d, "the agent connected to a gateway", seen))?;
    let agent = client
        .status()
        .await
        .map_err(|err| cluster_fail(&story, &d, "the agent's status", err.to_string()))?;
    if gateway_index(&agent.gateway) != Some(0) {
        return Err(cluster_fail(
            &story,
            &d,
            "the agent connected to A, the first address it has",
            agent.gateway,
        ));
    }
    story.saw(format!("fwnp status: connected to {} (A)", agent.gateway));
    let status = tokio::task::block_in_place(|| status_with_both_members(&d, 0))
        .map_err(|seen| cluster_fail(&story, &d, "gw-a and gw-b live in `fwnpctl status`", seen))?;
    story.saw("fwnpctl status (through A), its cluster part:");
    story.saw(indent(&cluster_part(&status)));
    story.ok("the cluster has both gateways as members, and the agent is connected to A");

    story.step(&format!(
        "An application on the host holds tcp/{CLUSTER_PORT} through the SDK"
    ));
    let echo = TcpEchoServer::start(&d.site.host, CLUSTER_PORT)
        .map_err(|err| cluster_fail(&story, &d, "an echo server on the host", err.to_string()))?;
    if tokio::task::block_in_place(|| d.site.reaches(CLUSTER_PORT)) {
        return Err(cluster_fail(
            &story,
            &d,
            "no answer from the server before the grant",
            "the connection succeeded",
        ));
    }
    story.saw(format!(
        "an echo server listens on [::]:{CLUSTER_PORT} in the host namespace; server -> \
         {HOST}:{CLUSTER_PORT}: no answer (closed)"
    ));
    let asked = Instant::now();
    let mut lease = client
        .open(
            Opening::tcp(CLUSTER_PORT)
                .lifetime(Duration::from_secs(30))
                .name("lab-cluster"),
        )
        .await
        .map_err(|err| cluster_fail(&story, &d, "a grant", err.to_string()))?;
    let id = lease.id();
    let lease_id = id.to_string();
    story.saw(format!(
        "open(Opening::tcp({CLUSTER_PORT}).lifetime(30 s).name(\"lab-cluster\")): granted through \
         A in {} ms, lease {lease_id}",
        asked.elapsed().as_millis()
    ));
    if !tokio::task::block_in_place(|| d.etcd_has(&lease_id)) {
        return Err(cluster_fail(
            &story,
            &d,
            "the lease's key in etcd",
            "etcdctl get --prefix lists no such key",
        ));
    }
    story.saw(format!(
        "etcdctl get --prefix {}/leases/ --keys-only: the lease's key is there",
        names.key_prefix
    ));
    story.ok("granted, and committed in etcd");

    story.step("The server reaches it through A, and B's kernel already holds the opening");
    let exchanged = tokio::task::block_in_place(|| {
        server_exchange(&d, CLUSTER_PORT, "hello through gateway A\n")
    })
    .map_err(|seen| cluster_fail(&story, &d, "a connection through A", seen))?;
    story.saw(exchanged);
    let standby = tokio::task::block_in_place(|| {
        wait_until(CLUSTER_SETTLE, Duration::from_millis(50), || {
            d.site.gateway_has(1, CLUSTER_PORT)
        })
    });
    if !standby {
        return Err(cluster_fail(
            &story,
            &d,
            "an element for the opening in B's table",
            d.site.gateway_table(1),
        ));
    }
    for i in 0..2 {
        for line in element_lines(&d.site.gateway_table(i), CLUSTER_PORT) {
            story.saw(format!("gateway {} table: {line}", ["A", "B"][i]));
        }
    }
    story.ok("open through A; B learnt it from the cluster's watch and holds it in its kernel");

    story.step("Gateway A's machine dies: SIGKILL, its links down, the routes move to B");
    let pid = d.gateway_pid(0);
    let died = Instant::now();
    d.kill_gateway(0);
    d.gateway_links(0, false)
        .and_then(|()| d.site.route_through(1))
        .map_err(|err| story.lab_error(None, err))?;
    story.saw(format!(
        "kill -KILL {} (fwnp-gateway A)",
        pid.map_or_else(|| "?".into(), |p| p.to_string())
    ));
    story.saw(format!(
        "ip link set {LAN_IF} / {WAN_IF} / veth-etcd down in {}",
        d.site.gateways[0].name()
    ));
    story.saw(format!(
        "host: default via {} (B); server: 198.51.100.0/24 via {} (B)",
        LAN[1], WAN[1]
    ));
    story.ok("A is gone: no process, no links");

    story.step("The host's agent fails over to B and renews the lease there");
    let mut lost_at = None;
    let renewed = tokio::time::timeout(CLUSTER_SETTLE, async {
        loop {
            match lease.next_event().await {
                Some(LeaseEvent::Renewed { .. }) => return Ok(died.elapsed()),
                Some(LeaseEvent::GatewayUnreachable { .. }) => {
                    lost_at.get_or_insert(died.elapsed());
                }
                Some(other) => return Err(other.to_string()),
                None => return Err("the event stream ended".into()),
            }
        }
    })
    .await;
    let after = match renewed {
        Ok(Ok(after)) => after,
        Ok(Err(seen)) => {
            return Err(cluster_fail(&story, &d, "a renewal through B", seen));
        }
        Err(_) => {
            return Err(cluster_fail(
                &story,
                &d,
                "a renewal through B",
                format!("none within {CLUSTER_SETTLE:?} of A's death"),
            ));
        }
    };
    if let Some(lost) = lost_at {
        story.saw(format!(
            "the application's Lease: gateway unreachable {} ms after A's death",
            lost.as_millis()
        ));
    }
    story.saw(format!(
        "the application's Lease: renewed {} ms after A's death (the aim: at most {} s)",
        after.as_millis(),
        FAILOVER_AIM.as_secs()
    ));
    let agent = client
        .status()
        .await
        .map_err(|err| cluster_fail(&story, &d, "the agent's status", err.to_string()))?;
    if !agent.connected || gateway_index(&agent.gateway) != Some(1) {
        return Err(cluster_fail(
            &story,
            &d,
            "the agent connected to B",
            format!("{} (connected: {})", agent.gateway, agent.connected),
        ));
    }
    story.saw(format!("fwnp status: connected to {} (B)", agent.gateway));
    if lease.id() != id {
        return Err(cluster_fail(
            &story,
            &d,
            format!("the lease id unchanged ({lease_id})").as_str(),
            lease.id().to_string(),
        ));
    }
    story.saw(format!(
        "the lease id is unchanged: {lease_id} (no re-open)"
    ));
    let port = CLUSTER_PORT.to_string();
    let renewal = |trail: &[AuditEntry]| {
        trail
            .iter()
            .rev()
            .find(|e| {
                e.lease() == Some(lease_id.as_str())
                    && e.outcome() == Some("renewed")
                    && e.site() == Some(SITES[1])
            })
            .cloned()
    };
    let mut seen = String::new();
    let renewal_event = tokio::task::block_in_place(|| {
        let mut found = None;
        wait_until(CLUSTER_SETTLE, Duration::from_millis(200), || {
            match d.audit(1, &["--outcome", "renewed", "--port", &port]) {
                Ok(trail) => {
                    found = renewal(&trail);
                    seen = format!(
                        "{} renewals, none by {} for {lease_id}",
                        trail.len(),
                        SITES[1]
                    );
                }
                Err(err) => seen = err.to_string(),
            }
            found.is_some()
        });
        found
    });
    let Some(renewal_event) = renewal_event else {
        return Err(cluster_fail(
            &story,
            &d,
            "a renewed event for the lease recorded by gw-b",
            seen,
        ));
    };
    story.saw(format!(
        "fwnpctl audit (through B): [{}] {} renewed lease {lease_id}",
        renewal_event.site().unwrap_or("?"),
        renewal_event.identity().unwrap_or("?"),
    ));
    story.ok(format!(
        "on B {:.1} s after A's death, the same lease renewed there",
        after.as_secs_f64()
    ));

    story.step("The port is still reachable, now through B");
    let exchanged = tokio::task::block_in_place(|| {
        server_exchange(&d, CLUSTER_PORT, "hello through gateway B\n")
    })
    .map_err(|seen| cluster_fail(&story, &d, "a connection through B", seen))?;
    story.saw(exchanged);
    for line in element_lines(&d.site.gateway_table(1), CLUSTER_PORT) {
        story.saw(format!("gateway B table: {line}"));
    }
    if !d.site.host_has(CLUSTER_PORT) {
        return Err(cluster_fail(
            &story,
            &d,
            "the opening still in the host's own table",
            d.site.host_table(),
        ));
    }
    story.saw(format!(
        "host table: the opening of tcp/{CLUSTER_PORT} is still there"
    ));
    story.ok("the host's traffic goes on through B's kernel");

    story.step("A comes back: links up, process started again; it rejoins and holds the opening");
    tokio::task::block_in_place(|| {
        d.gateway_links(0, true)?;
        d.start_gateway(0)
    })
    .map_err(|err| story.lab_error(None, err))?;
    story.saw(format!(
        "ip link set ... up in {}; fwnp-gateway A started again (pid {})",
        d.site.gateways[0].name(),
        d.gateway_pid(0)
            .map_or_else(|| "?".into(), |p| p.to_string())
    ));
    let rejoined = tokio::task::block_in_place(|| {
        wait_until(CLUSTER_SETTLE, Duration::from_millis(50), || {
            d.site.gateway_has(0, CLUSTER_PORT)
        })
    });
    if !rejoined {
        return Err(cluster_fail(
            &story,
            &d,
            "the opening in A's table again",
            d.site.gateway_table(0),
        ));
    }
    for line in element_lines(&d.site.gateway_table(0), CLUSTER_PORT) {
        story.saw(format!("gateway A table: {line}"));
    }
    let status = tokio::task::block_in_place(|| status_with_both_members(&d, 0))
        .map_err(|seen| cluster_fail(&story, &d, "gw-a and gw-b live in `fwnpctl status`", seen))?;
    story.saw("fwnpctl status (through A), its cluster part:");
    story.saw(indent(&cluster_part(&status)));
    story.ok("A reconciled its kernel from the cluster and is a live member again");

    story.step("The application releases the lease: closed on both gateways and on the host");
    lease
        .release()
        .await
        .map_err(|err| cluster_fail(&story, &d, "the release", err.to_string()))?;
    story.saw(format!("lease.release(): {lease_id} released"));
    let closed = tokio::task::block_in_place(|| {
        wait_until(CLUSTER_SETTLE, Duration::from_millis(50), || {
            !d.site.gateway_has(0, CLUSTER_PORT)
                && !d.site.gateway_has(1, CLUSTER_PORT)
                && !d.site.host_has(CLUSTER_PORT)
        })
    });
    if !closed {
        let tables = format!(
            "{}\n{}\n{}",
            d.site.gateway_table(0),
            d.site.gateway_table(1),
            d.site.host_table()
        );
        return Err(cluster_fail(
            &story,
            &d,
            "no element left in any table",
            tables,
        ));
    }
    story.saw(format!(
        "no element for {HOST} . tcp . {CLUSTER_PORT} in A's or B's table, none for tcp . \
         {CLUSTER_PORT} in the host's"
    ));
    if tokio::task::block_in_place(|| d.site.reaches(CLUSTER_PORT)) {
        return Err(cluster_fail(
            &story,
            &d,
            "no answer from the server",
            "the connection succeeded",
        ));
    }
    story.saw(format!("server -> {HOST}:{CLUSTER_PORT}: no answer"));
    if tokio::task::block_in_place(|| d.etcd_has(&lease_id)) {
        return Err(cluster_fail(
            &story,
            &d,
            "the lease's key gone from etcd",
            "etcdctl still lists it",
        ));
    }
    story.saw("etcd: the lease's key is gone");
    story.ok("closed everywhere");
    drop(echo);
    drop(client);

    println!("\nCleaning up: stopping the daemons and etcd, deleting the namespaces and files.");
    drop(d);
    Ok(story.step)
}
