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
//! Run it with `sudo scripts/lab`, which builds the binaries first.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

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
    match args.first().map(String::as_str) {
        None => {}
        Some("serve") => return serve(&args[1..]),
        Some("-h" | "--help") => {
            println!(
                "fwnp-lab: FWNP's story in network namespaces, with the real gateway and agent.\n\n\
                 Usage: sudo scripts/lab      (builds the binaries, then runs target/debug/fwnp-lab)\n\
                 \x20      sudo fwnp-lab\n\n\
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
        let story = tokio::spawn(story(bins));
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
