//! The built `fwnp` binary run against a scripted socket that speaks the real local API frames
//! (`harness`): `open -- CMD` passes CMD's exit status on (code or 128 + signal) and releases
//! the lease when CMD exits; a refusal stops CMD and exits 1; the exit codes for an absent agent
//! (3) and an unreachable gateway (4); `open` without CMD holds until SIGTERM and releases;
//! a revocation is reported, and with `--on-end stop` stops CMD; `status`, `leases` and
//! `release` print what the agent answered.
//!
//! The harness answers what each test scripts, not what the real agent would; the command's
//! end-to-end tests with the real agent, gateway and kernel live in `host-agent/` and
//! `interop-tests/`.

mod harness;

use std::process::Stdio;
use std::time::{Duration, Instant};

use fwnp_proto::local::{DenialCode, EventKind, LocalCode, LocalMessage};
use fwnp_proto::{Message, ResultCode, Target};
use harness::{Harness, denied, event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const FWNP: &str = env!("CARGO_BIN_EXE_fwnp");

fn fwnp(agent: &Harness) -> Command {
    let mut command = Command::new(FWNP);
    command
        .env("FWNP_AGENT_SOCKET", &agent.path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(mut command: Command) -> Outcome {
    let output = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("fwnp did not finish within 20 s")
        .unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn opens(received: &[LocalMessage]) -> Vec<fwnp_proto::Open> {
    received
        .iter()
        .filter_map(|m| match m {
            LocalMessage::Wire(Message::Open(o)) => Some(o.clone()),
            _ => None,
        })
        .collect()
}

fn releases(received: &[LocalMessage]) -> Vec<fwnp_proto::LeaseId> {
    received
        .iter()
        .filter_map(|m| match m {
            LocalMessage::Wire(Message::Release(r)) => Some(r.lease),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn open_with_a_command_returns_its_status_and_releases() {
    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command.args([
        "open",
        "tcp/8080",
        "--for",
        "10m",
        "--from",
        "198.51.100.0/24",
        "--",
        "sh",
        "-c",
        "sleep 0.5; exit 7",
    ]);
    let out = run(command).await;
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    let received = agent.received();
    let open = &opens(&received)[0];
    assert_eq!(open.lifetime, Some(600));
    assert_eq!(open.opening.remotes[0].to_string(), "198.51.100.0/24");
    assert_eq!(
        open.app.as_ref().and_then(|a| a.name.as_deref()),
        Some("sh")
    );
    // The lease granted is the lease released, and nothing is left.
    assert_eq!(releases(&received).len(), 1);
    assert!(agent.live().is_empty());
    assert!(out.stderr.contains("held while sh runs"), "{}", out.stderr);
}

/// `--address` twice names both addresses in one opening (one Open, so one lease with a grant
/// on each), and `--family` travels as key 5.
#[tokio::test]
async fn several_addresses_and_a_family_reach_the_agent_in_one_open() {
    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command.args([
        "open",
        "tcp/8443",
        "--address",
        "192.0.2.10",
        "--address",
        "2001:db8::10",
        "--",
        "true",
    ]);
    let out = run(command).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let received = agent.received();
    assert_eq!(opens(&received).len(), 1);
    let open = &opens(&received)[0];
    assert_eq!(
        open.opening.host,
        fwnp_proto::HostAddresses::List(vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap()
        ])
    );

    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command.args(["open", "tcp/8080", "--family", "6", "--", "true"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let open = &opens(&agent.received())[0];
    assert_eq!(open.opening.host, fwnp_proto::HostAddresses::Default);
    assert_eq!(open.opening.family, Some(fwnp_proto::Family::Ipv6));
}

#[tokio::test]
async fn after_grant_starts_the_command_only_once_granted() {
    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command.args([
        "open",
        "udp/5000-5010",
        "--after-grant",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    let out = run(command).await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert_eq!(releases(&agent.received()).len(), 1);
    assert!(agent.live().is_empty());
}

#[tokio::test]
async fn a_command_killed_by_a_signal_gives_128_plus_the_signal() {
    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command.args([
        "open",
        "tcp/8080",
        "--",
        "sh",
        "-c",
        "sleep 0.5; kill -TERM $$",
    ]);
    let out = run(command).await;
    assert_eq!(out.code, Some(128 + 15), "{}", out.stderr);
    assert!(agent.live().is_empty());
}

#[tokio::test]
async fn a_missing_command_exits_127() {
    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command.args(["open", "tcp/8080", "--", "/nonexistent/fwnp-test-cmd"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(127), "{}", out.stderr);
    // Nothing was asked for a command that could not start.
    assert!(opens(&agent.received()).is_empty());
}

#[tokio::test]
async fn fwnp_open_re_attaches_to_a_restarted_agent_while_the_command_runs() {
    let agent = Harness::start();
    let mut command = fwnp(&agent);
    command
        .args(["open", "tcp/8089", "--", "sleep", "30"])
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    agent
        .wait_for("the first Open", |r| {
            r.iter()
                .filter(|m| matches!(m, LocalMessage::Wire(Message::Open(_))))
                .count()
                == 1
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The agent goes away and comes back (the harness hangs up and keeps listening): fwnp asks
    // for the same opening again, on a new connection.
    agent.hang_up();
    agent
        .wait_for("the Open asked again", |r| {
            r.iter()
                .filter(|m| matches!(m, LocalMessage::Wire(Message::Open(_))))
                .count()
                == 2
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the host agent went away"), "{stderr}");
    assert!(stderr.contains("re-attached to the host agent"), "{stderr}");
    assert!(!stderr.contains("the lease is over"), "{stderr}");
}

#[tokio::test]
async fn status_says_why_the_agent_is_not_connected() {
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Status(s) => Some(vec![LocalMessage::StatusAnswer(
            fwnp_proto::local::StatusAnswer {
                common: fwnp_proto::Common {
                    request_id: s.common.request_id,
                    critical: Vec::new(),
                },
                agent_version: "harness 0".into(),
                gateway: "gw.example:4433".into(),
                connected: false,
                epoch: None,
                mirror_mode: "enforce".into(),
                identity: None,
                leases: 0,
                last_error: Some("certificate not valid for name \"gw.example\"".into()),
                api_version: Some(fwnp_proto::local::API_VERSION),
            },
        )]),
        _ => None,
    }));
    let mut command = fwnp(&agent);
    command.arg("status");
    let out = run(command).await;
    assert!(
        out.stdout.contains(
            "gateway:   gw.example:4433 (NOT connected: certificate not valid for name \"gw.example\")"
        ),
        "{}",
        out.stdout
    );
    let mut command = fwnp(&agent);
    command.args(["status", "--json"]);
    let out = run(command).await;
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        status["last_error"],
        "certificate not valid for name \"gw.example\""
    );
}

#[tokio::test]
async fn a_command_that_exits_0_before_a_refusal_does_not_hide_it() {
    // The agent answers only after its grace period for the port's socket, which `true`
    // never binds: by then the command has long exited with 0.
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Wire(Message::Open(o)) => {
            std::thread::sleep(Duration::from_millis(500));
            Some(vec![denied(
                o.common.request_id,
                DenialCode::Local(LocalCode::PortNotOwned),
                "nobody listens on tcp/8089",
                None,
            )])
        }
        _ => None,
    }));
    let mut command = fwnp(&agent);
    command.args(["open", "tcp/8089", "--", "true"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("exited before the opening was granted"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("nobody listens on tcp/8089"),
        "{}",
        out.stderr
    );
    // A failing command keeps its own status.
    let mut command = fwnp(&agent);
    command.args(["open", "tcp/8089", "--", "false"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(!out.stderr.contains("nobody listens"), "{}", out.stderr);
}

#[tokio::test]
async fn a_refusal_stops_the_command_and_exits_1() {
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Wire(Message::Open(o)) => Some(vec![denied(
            o.common.request_id,
            DenialCode::Wire(ResultCode::DeniedByPolicy),
            "rule web allows tcp/80 and tcp/443 only",
            None,
        )]),
        _ => None,
    }));
    let mut command = fwnp(&agent);
    command.args(["open", "tcp/8080", "--", "sleep", "30"]);
    let started = Instant::now();
    let out = run(command).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("rule web allows tcp/80"),
        "{}",
        out.stderr
    );
    // CMD was stopped, not waited for.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn port_not_owned_and_gateway_unreachable_have_their_codes() {
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Wire(Message::Open(o)) => {
            let Target::Ports { ports, .. } = &o.opening.target else {
                return None;
            };
            let (code, reason) = if ports.first == 1 {
                (
                    LocalCode::PortNotOwned,
                    "tcp/1 is bound by pid 1234 (nginx), not by the caller",
                )
            } else {
                (LocalCode::GatewayUnreachable, "no connection to gw.example")
            };
            Some(vec![denied(
                o.common.request_id,
                DenialCode::Local(code),
                reason,
                None,
            )])
        }
        _ => None,
    }));
    let mut command = fwnp(&agent);
    command.args(["open", "tcp/1"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("pid 1234 (nginx)"), "{}", out.stderr);

    let mut command = fwnp(&agent);
    command.args(["open", "tcp/2"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(4), "{}", out.stderr);
}

#[tokio::test]
async fn an_absent_agent_exits_3_and_bad_usage_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(FWNP);
    command.args([
        "--socket",
        dir.path().join("none.sock").to_str().unwrap(),
        "open",
        "tcp/8080",
        "--",
        "true",
    ]);
    let out = run(command).await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains("is fwnp-agent running?"),
        "{}",
        out.stderr
    );

    for args in [
        &["open"][..],
        &["open", "tcp/0"],
        &["release", "nope"],
        &["frobnicate"],
    ] {
        let mut command = Command::new(FWNP);
        command.args(args);
        assert_eq!(run(command).await.code, Some(2), "{args:?}");
    }
}

#[tokio::test]
async fn open_without_a_command_holds_until_sigterm_and_releases() {
    let agent = Harness::start();
    let mut child = fwnp(&agent)
        .args(["open", "udp/5353", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
    let id = printed["id"].as_str().unwrap().to_owned();
    assert_eq!(printed["grants"][0]["protocol"], "udp");
    assert_eq!(printed["grants"][0]["first_port"], 5353);
    // Held: not released yet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(releases(&agent.received()).is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let released = releases(&agent.received());
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].to_string(), id);
}

#[tokio::test]
async fn a_revocation_ends_a_held_lease_with_6() {
    let agent = Harness::start();
    let mut child = fwnp(&agent)
        .args(["open", "tcp/8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let received = agent.wait_for("the open", |r| !opens(r).is_empty()).await;
    let _ = received;
    // Wait for the grant to be printed before revoking.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let id = agent.live()[0];
    let mut revoked = event(id, EventKind::Revoked);
    revoked.reason = Some("operator: incident 42".into());
    agent.push(&LocalMessage::Event(revoked));
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("revoked") && stderr.contains("incident 42"),
        "{stderr}"
    );
}

#[tokio::test]
async fn on_end_stop_terminates_the_command_and_report_lets_it_run() {
    for (mode, script, expect) in [
        ("stop", "exec sleep 30", 128 + 15),
        ("report", "sleep 1; exit 0", 0),
    ] {
        let agent = Harness::start();
        let child = fwnp(&agent)
            .args([
                "open", "tcp/8080", "--on-end", mode, "--", "sh", "-c", script,
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        agent.wait_for("the open", |r| !opens(r).is_empty()).await;
        // Let the grant reach fwnp before the event.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id = agent.live()[0];
        agent.push(&LocalMessage::Event(event(id, EventKind::Revoked)));
        let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(expect), "{mode}: {stderr}");
        assert!(stderr.contains("revoked"), "{mode}: {stderr}");
    }
}

#[tokio::test]
async fn status_leases_and_release_print_what_the_agent_answers() {
    let agent = Harness::start();
    // A lease held by another connection (an SDK client), listed by `fwnp leases`.
    let client = fwnp_sdk::Client::connect_to(&agent.path).await.unwrap();
    let lease = client
        .open(fwnp_sdk::Opening::tcp(8443).from("203.0.113.0/24"))
        .await
        .unwrap();

    let mut command = fwnp(&agent);
    command.args(["status", "--json"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(status["gateway"], "gw.example:4433");
    assert_eq!(status["connected"], true);
    // The epoch is written as the daemons log it: 16 hexadecimal digits.
    assert_eq!(status["epoch"], "0000000000000007");
    assert_eq!(status["api_version"], fwnp_proto::local::API_VERSION);
    assert_eq!(status["mirror_mode"], "enforce");
    let mut command = fwnp(&agent);
    command.arg("status");
    let out = run(command).await;
    assert!(
        out.stdout.contains("epoch:     0000000000000007"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("local API: version 1"),
        "{}",
        out.stdout
    );

    let mut command = fwnp(&agent);
    command.args(["leases", "--json"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let leases: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(leases[0]["id"], lease.id().to_string());
    assert_eq!(leases[0]["remaining_secs"], 120);
    assert_eq!(leases[0]["grants"][0]["remotes"][0], "203.0.113.0/24");

    let mut command = fwnp(&agent);
    command.arg("leases");
    let out = run(command).await;
    assert!(
        out.stdout.contains(&lease.id().to_string()),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("2m00s"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("tcp/8443 on 192.0.2.10 from 203.0.113.0/24"),
        "{}",
        out.stdout
    );

    // The harness, like the local API, refuses a release of a lease this connection does not
    // hold... except that it knows only one lease table; ask for an unknown id.
    let mut command = fwnp(&agent);
    command.args(["release", "0123456789abcdef0123456789abcdef"]);
    let out = run(command).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("fwnpctl revoke"), "{}", out.stderr);
}

#[tokio::test]
async fn sigterm_to_fwnp_reaches_the_command_and_the_lease_is_released() {
    let agent = Harness::start();
    let mut child = fwnp(&agent)
        .args(["open", "tcp/8080", "--", "sh", "-c", "exec sleep 30"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until fwnp says it holds the lease.
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = Vec::new();
    while !said
        .iter()
        .any(|l: &String| l.contains("held while sh runs"))
    {
        let line = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("fwnp ended before holding the lease");
        said.push(line);
    }
    let id = agent.live()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    // CMD died of the forwarded SIGTERM; fwnp reports it as a shell would, after releasing.
    assert_eq!(status.code(), Some(128 + 15), "{said:?}");
    assert_eq!(releases(&agent.received()), vec![id]);
}
