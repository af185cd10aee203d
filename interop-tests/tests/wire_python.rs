//! A FWNP/1 client written in Python from `spec/` alone (`interop-tests/python/wire_client.py`,
//! on aioquic and cbor2) against the real `fwnp-gateway`: what an outside implementer can check
//! of the specification's promises.
//!
//! The client's codec first meets the conformance vectors of `spec/vectors/`. Then, in a host's
//! network namespace, with the host's certificate from the lab's PKI, it speaks to the gateway
//! directly (the host's agent is stopped and its own table removed, so that the gateway alone
//! decides what reaches the host): a port it opened is reachable from the outside network on
//! both families while the lease is held and refused once it is released, a port opened for a
//! remote prefix only from inside it, a lease an operator revokes closed before its Revoked
//! notice arrives (on the connection with NOTICES only), a revoked host certificate's lease
//! revoked and its connections closed, a gateway stopped sending GoingAway and, started again
//! on its state, keeping its epoch and the lease; a gateway killed and started again answering
//! a packet of a connection of its previous run with a stateless reset bearing the token it
//! issued (the client connecting again at once, the epoch and the lease kept), and started
//! without its lease state announcing a new epoch in its Welcome, whereupon the client opens
//! its lease again; a connection that migrates neither reset nor closed, its packets on the new
//! path dropped, and working again on its first path; every conformance vector of a request is
//! answered as the vector says; and the gateway's answers keep the MUSTs a client can see:
//! hello-required before Hello, unsupported-version then VersionMismatch, QUIC's
//! STREAM_LIMIT_ERROR for a client's unidirectional stream, TLS alerts for a handshake without
//! a client certificate or without the ALPN, RequestTimeout for
//! an unfinished request or a missing Hello (and nothing opened meanwhile), malformed-request
//! for ill-formed items and a second Hello, unsupported-option listing the critical keys,
//! address-mismatch, lifetime-out-of-range, malformed-option, unknown-lease, MessageTooLarge for
//! an item over 16,384 bytes, the request id echoed exactly when it was readable, idempotent
//! re-open, Renew lifetimes, answers in the deterministic encoding and the transport parameters
//! of Section 3.4 (disable_active_migration and a stateless reset token among them, and the
//! client's own).
//!
//! Needs a Python with cbor2 and aioquic: `$FWNP_PYTHON`, else the virtual environment
//! `scripts/test` makes in `target/python-venv` (missing: skipped, failing instead when
//! FWNP_REQUIRE_NETNS=1). The gateway test needs root as well (skipped otherwise, failing
//! instead when FWNP_REQUIRE_NETNS=1).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fwnp_interop_tests::{
    Binaries, GATEWAY_PORT, Lab, LabOptions, LineProcess, TcpEchoServer, netns_command,
    require_root, run_ok, tcp_connects, test_python, wait_until,
};
use serde_json::Value;

/// A connection attempt that gets no answer within this long counts as refused.
const REFUSED: Duration = Duration::from_millis(1200);
/// Bound of every wait for a change that should follow a step.
const SETTLE: Duration = Duration::from_secs(5);
/// Bound of the wait for the client's next line (a step waits at most 5 s for an answer).
const STEP: Duration = Duration::from_secs(20);
/// The port the client opens.
const PORT: u16 = 8201;
/// The remote prefix of the second opening: the outside's main address lies in it, its second
/// address does not.
const REMOTE_PREFIX: &str = "192.0.2.0/26";

const POLICY: &str = r#"
[defaults]
lifetime = "2m"
min_lifetime = "30s"
max_lifetime = "5m"

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/8000-8999"
"#;

// Section 18.4.
const NO_ERROR: u64 = 0x0;
const MESSAGE_TOO_LARGE: u64 = 0x2;
const GOING_AWAY: u64 = 0x4;
const VERSION_MISMATCH: u64 = 0x5;
const REQUEST_TIMEOUT: u64 = 0x6;
const EXCESSIVE_LOAD: u64 = 0x7;
/// TLS alerts (RFC 8446, RFC 7301).
const CERTIFICATE_REVOKED: u64 = 44;
const CERTIFICATE_REQUIRED: u64 = 116;
const NO_APPLICATION_PROTOCOL: u64 = 120;
/// RFC 9000's transport error for a stream beyond the peer's limit.
const STREAM_LIMIT_ERROR: u64 = 0x4;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/wire_client.py")
}

#[test]
fn wire_python_codec_passes_the_conformance_vectors() {
    let Some(python) = test_python(
        "wire_python_codec_passes_the_conformance_vectors",
        &["cbor2", "aioquic"],
    ) else {
        return;
    };
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors");
    let output = std::process::Command::new(python)
        // No __pycache__ beside the sources in the tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(script())
        .arg("vectors")
        .arg(vectors)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "no summary: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert!(summary["vectors"].as_u64().unwrap_or(0) >= 100, "{stdout}");
    assert_eq!(summary["failed"], 0, "{stdout}");
    assert!(output.status.success(), "{stdout}");
}

/// The client in host 0's namespace; killed when dropped.
struct Client(LineProcess);

impl Client {
    fn start(lab: &Lab, python: &Path) -> Client {
        let host = &lab.site.hosts[0];
        let gateway = format!("{}:{GATEWAY_PORT}", lab.site.gateway_inside_v4);
        let mut command = netns_command(&host.netns, python);
        command
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .arg(script())
            .arg("drive")
            .args(["--gateway", &gateway, "--port", &PORT.to_string()])
            .args(["--remote-prefix", REMOTE_PREFIX])
            .arg("--vectors")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors"))
            .arg("--cert")
            .arg(lab.pki.file(&format!("{}.pem", host.name)))
            .arg("--key")
            .arg(lab.pki.file(&format!("{}.key", host.name)))
            .arg("--second-cert")
            .arg(lab.pki.file(&format!("{}-second.pem", host.name)))
            .arg("--second-key")
            .arg(lab.pki.file(&format!("{}-second.key", host.name)))
            .arg("--ca")
            .arg(lab.pki.file("ca.pem"));
        Client(LineProcess::spawn(&mut command, "the Python client"))
    }

    /// Every step's line up to and including `last`, by step name.
    fn steps_until(&self, last: &str, lab: &Lab) -> HashMap<String, Value> {
        let mut steps = HashMap::new();
        loop {
            let line = self.0.next_line(STEP).unwrap_or_else(|| {
                panic!(
                    "the client said nothing within {STEP:?} (waiting for {last}); it said \
                     {steps:#?}\n{}",
                    lab.log_tails(20)
                )
            });
            let value: Value =
                serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"));
            let step = value["step"].as_str().unwrap_or_default().to_owned();
            // The rules every answer keeps, whatever the request (the client checks them:
            // request id, answer type, lifetimes, limits, Denied's keys).
            assert!(
                value["violations"]
                    .as_array()
                    .is_none_or(std::vec::Vec::is_empty),
                "{step}: the answer breaks the specification: {value:#}"
            );
            steps.insert(step.clone(), value);
            if step == last {
                return steps;
            }
        }
    }

    fn tell(&mut self, line: &str) {
        self.0.tell(line);
    }

    /// Waits (bounded) for the client to exit and returns whether it succeeded.
    fn finished(&mut self) -> bool {
        self.0.finished(Duration::from_secs(10))
    }
}

/// The step's answer, which must be of `kind`, decoded by the client and written in the
/// deterministic encoding.
fn answer<'a>(steps: &'a HashMap<String, Value>, step: &str, kind: &str) -> &'a Value {
    let value = steps
        .get(step)
        .unwrap_or_else(|| panic!("no step {step}: {steps:#?}"));
    let answer = &value["answer"];
    assert_eq!(answer["type"], kind, "{step}: {value:#}");
    assert_eq!(
        value["canonical"], true,
        "{step}: not the deterministic encoding: {value:#}"
    );
    answer
}

/// A Denied with `code` for the step, carrying `request_id` (or none).
fn denied(steps: &HashMap<String, Value>, step: &str, code: &str, request_id: Option<u64>) {
    let answer = answer(steps, step, "denied");
    assert_eq!(answer["code"], code, "{step}: {answer:#}");
    assert_eq!(
        answer["request_id"].as_u64(),
        request_id,
        "{step}: the request id: {answer:#}"
    );
}

/// The request id the client sent in the step (Section 6.6: as the gateway can read it).
fn sent_request_id(step: &Value) -> Option<u64> {
    step["request_id"].as_u64()
}

/// The step's connection, held across a restart of the gateway, ended by a stateless reset
/// (Section 3.4; RFC 9000 Section 10.3): a datagram of at least 21 bytes that looks like a
/// short-header packet and ends in the token the gateway issued with the connection id the
/// client sent its last packet to. The client then connected again at once (Section 3.5), and
/// no EpochChanged came on either connection (the gateway replaced no state while they were
/// up). Returns the step.
fn stateless_reset<'a>(steps: &'a HashMap<String, Value>, step: &str) -> &'a Value {
    let value = steps
        .get(step)
        .unwrap_or_else(|| panic!("no step {step}: {steps:#?}"));
    let reset = &value["reset"];
    assert!(
        reset.is_object(),
        "{step}: no stateless reset for a packet of the connection the gateway's previous run \
         held: {value:#}"
    );
    let cid = reset["connection_id"].as_str().expect("connection id");
    assert_eq!(value["issued"][cid], reset["token"], "{step}: {value:#}");
    assert!(
        value["used"]
            .as_array()
            .is_some_and(|used| used.iter().any(|u| u == cid)),
        "{step}: {value:#}"
    );
    assert!(reset["size"].as_u64() >= Some(21), "{step}: {reset}");
    // The first two bits 01: a short header with the fixed bit.
    assert_eq!(
        reset["first_byte"].as_u64().map(|b| b & 0xc0),
        Some(0x40),
        "{step}: {reset}"
    );
    // The List on the reset connection unanswered, then answered on the new one.
    assert!(value["list"].get("answer").is_none(), "{step}: {value:#}");
    assert_eq!(
        value["list"]["closed"]["reason"], "stateless reset",
        "{step}: {value:#}"
    );
    // At once: not after the second or so of a reconnection without a reset.
    assert!(
        value["reconnected_after"].as_f64().is_some_and(|s| s < 0.5),
        "{step}: not reconnected at once: {value:#}"
    );
    assert_eq!(
        value["hello"]["answer"]["type"], "welcome",
        "{step}: {value:#}"
    );
    assert_eq!(
        value["listed"]["answer"]["type"], "leases",
        "{step}: {value:#}"
    );
    let kinds: Vec<&str> = value["notices"]
        .as_array()
        .expect("notices")
        .iter()
        .filter_map(|n| n["notice"]["type"].as_str())
        .collect();
    assert!(
        !kinds.contains(&"epoch-changed"),
        "{step}: EpochChanged without a state replaced while connected: {value:#}"
    );
    value
}

fn start_lab() -> Lab {
    let bins = Binaries::build().unwrap_or_else(|err| panic!("the lab's binaries: {err}"));
    let options = LabOptions {
        label: "wire-py".into(),
        hosts: 1,
        host_prefix: "wire".into(),
        policy: POLICY.into(),
        verify_port_owner: false,
    };
    let mut lab = Lab::start(bins, &options).unwrap_or_else(|err| panic!("{err}"));
    // The client speaks for host 0 itself: its agent goes, and with it the agent's table on
    // the host, so that only the gateway's filter decides what reaches the host.
    lab.kill_agent(0);
    lab.site.hosts[0]
        .netns
        .exec_checked(&["nft", "delete", "table", "inet", "fwnp_host"])
        .unwrap_or_else(|err| panic!("removing the agent's table: {err}"));
    // A second certificate of the same identity: the first kept aside, the name issued again,
    // the new one moved to NAME-second.
    let host = &lab.site.hosts[0];
    let file = |suffix: &str| lab.pki.file(&format!("{}{suffix}", host.name));
    for ext in ["pem", "key"] {
        std::fs::rename(file(&format!(".{ext}")), file(&format!("-first.{ext}")))
            .unwrap_or_else(|err| panic!("keeping the first certificate: {err}"));
    }
    lab.pki
        .issue(&lab.bins.fwnpctl, "host", &host.name, &[host.v4, host.v6])
        .unwrap_or_else(|err| panic!("issuing a second certificate: {err}"));
    for ext in ["pem", "key"] {
        std::fs::rename(file(&format!(".{ext}")), file(&format!("-second.{ext}")))
            .and_then(|()| {
                std::fs::rename(file(&format!("-first.{ext}")), file(&format!(".{ext}")))
            })
            .unwrap_or_else(|err| panic!("placing the certificates: {err}"));
    }
    lab
}

#[test]
fn wire_python_client_holds_a_port_and_the_gateway_keeps_the_specs_musts() {
    let test = "wire_python_client_holds_a_port_and_the_gateway_keeps_the_specs_musts";
    if !require_root(test) {
        return;
    }
    let Some(python) = test_python(test, &["cbor2", "aioquic"]) else {
        return;
    };
    let mut lab = start_lab();
    let host = &lab.site.hosts[0];
    let _echo = TcpEchoServer::start(&host.netns, PORT).expect("echo server");
    assert!(
        !lab.outside_reaches(0, false, PORT, REFUSED),
        "tcp/{PORT} open before any lease"
    );

    let _echo_remote = TcpEchoServer::start(&host.netns, PORT + 1).expect("echo server");
    let _echo_pending = TcpEchoServer::start(&host.netns, PORT + 4).expect("echo server");
    let _echo_kept = TcpEchoServer::start(&host.netns, PORT + 7).expect("echo server");
    let _echo_restart = TcpEchoServer::start(&host.netns, PORT + 9).expect("echo server");
    let mut client = Client::start(&lab, &python);
    // Granted means in force (Section 11.3): reachable at once, on both families.
    let held = client.steps_until("held", &lab);
    for v6 in [false, true] {
        assert!(
            lab.outside_reaches(0, v6, PORT, REFUSED),
            "tcp/{PORT} (v6 {v6}) not reachable when Granted arrived\n{}",
            lab.log_tails(20)
        );
    }
    client.tell("probed");
    // A request not yet complete has no effect: its port stays closed.
    let mut pending = client.steps_until("pending", &lab);
    pending.extend(held);
    assert!(
        !lab.outside_reaches(0, false, PORT + 4, REFUSED),
        "tcp/{} opened by an Open whose stream has no FIN",
        PORT + 4
    );
    let mut steps = client.steps_until("waiting", &lab);
    steps.extend(pending);

    // The handshake's own refusals: TLS alerts as QUIC crypto errors (0x100 + the alert).
    for (step, alert) in [
        ("no-client-certificate", CERTIFICATE_REQUIRED),
        ("other-alpn", NO_APPLICATION_PROTOCOL),
    ] {
        let closed = &steps[step]["closed"];
        assert_eq!(closed["code"], 0x100 + alert, "{step}: {:#}", steps[step]);
        assert_eq!(closed["application"], false, "{step}: {closed}");
    }
    denied(&steps, "truncated-before-hello", "malformed-request", None);

    // Connection rules.
    denied(&steps, "open-before-hello", "hello-required", Some(7001));
    let unknown_version = &steps["unknown-version"];
    assert_eq!(
        unknown_version["answer"]["code"], "unsupported-version",
        "{unknown_version:#}"
    );
    assert_eq!(
        unknown_version["then_closed"]["code"], VERSION_MISMATCH,
        "{unknown_version:#}"
    );
    // The gateway's initial_max_streams_uni of 0 makes a client's unidirectional stream a
    // breach of QUIC's stream limit, which QUIC closes with its own transport error.
    let uni = &steps["unidirectional-stream"]["closed"];
    assert_eq!(uni["code"], STREAM_LIMIT_ERROR, "{uni}");
    assert_eq!(uni["application"], false, "{uni}");

    // Hello: the Welcome, and the transport parameters of Section 3.4.
    let hello = &steps["hello"];
    let welcome = answer(&steps, "hello", "welcome");
    assert_eq!(welcome["version"], 1);
    assert_eq!(welcome["identity"], format!("fwnp://host/{}", host.name));
    let addresses: Vec<&str> = welcome["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        addresses,
        [host.v4.to_string(), host.v6.to_string()],
        "{welcome:#}"
    );
    let limits = &welcome["limits"];
    assert!(
        limits["max_message_size"].as_u64() >= Some(16384),
        "{limits}"
    );
    assert_eq!(limits["min_lifetime"], 30, "{limits}");
    assert_eq!(limits["max_lifetime"], 300, "{limits}");
    let transport = &hello["transport"];
    assert_eq!(transport["alpn"], "fwnp/1");
    assert_eq!(transport["initial_max_streams_uni"], 0, "{transport}");
    assert_eq!(
        transport["initial_max_streams_bidi"], limits["max_streams"],
        "{transport} {limits}"
    );
    // The client's own parameters (Section 3.4), as it sent them: no bidirectional stream for
    // the gateway, at least 8 unidirectional ones for its notices.
    let own = &hello["own_transport"];
    assert_eq!(own["initial_max_streams_bidi"], 0, "{own}");
    assert!(own["initial_max_streams_uni"].as_u64() >= Some(8), "{own}");
    // Section 3.4: the gateway forbids active migration and issues a stateless reset token.
    assert_eq!(transport["disable_active_migration"], true, "{transport}");
    assert_eq!(transport["stateless_reset_token"], true, "{transport}");
    // Section 3.3: no early data offered (and here no session ticket at all).
    assert_eq!(hello["early_data_offered"], false, "{hello:#}");
    assert_eq!(hello["session_tickets"], 0, "{hello:#}");
    // M = 30 s: the client connected again with an idle timeout of 3.75 s.
    assert_eq!(hello["hellos"], 2, "{hello:#}");
    assert_eq!(hello["idle_timeout"], 3.75, "{hello:#}");
    assert_eq!(own["max_idle_timeout"], 3750, "{own}");
    // The gateway's own idle timeout (Section 3.4: 30,000 ms).
    assert_eq!(transport["max_idle_timeout"], 30000, "{transport}");
    let hello_id = sent_request_id(hello);
    assert_eq!(welcome["request_id"].as_u64(), hello_id, "{hello:#}");
    denied(
        &steps,
        "second-hello",
        "malformed-request",
        sent_request_id(&steps["second-hello"]),
    );

    // The opening, held: reachable on both families.
    let welcome_epoch = welcome["epoch"].clone();
    let open = answer(&steps, "open", "granted");
    let lease = open["lease"].as_str().expect("lease id").to_owned();
    assert_eq!(open["lifetime"], 60, "{open:#}");
    assert_eq!(open["renew_after"], 30, "{open:#}");
    assert_eq!(open["narrowed"], false, "{open:#}");
    let hosts: Vec<&str> = open["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .filter_map(|g| g["host"].as_str())
        .collect();
    assert_eq!(hosts, addresses, "one grant per allowed address: {open:#}");
    for v6 in [false, true] {
        assert!(
            lab.wait_reachable(0, v6, PORT, true, SETTLE),
            "tcp/{PORT} (v6 {v6}) not reachable while the lease is held\n{}",
            lab.log_tails(20)
        );
    }
    assert_eq!(open["epoch"], welcome["epoch"]);
    let again = answer(&steps, "open-again", "granted");
    assert_eq!(
        again["lease"],
        lease.as_str(),
        "idempotent re-open: {again:#}"
    );
    let renew = answer(&steps, "renew", "granted");
    assert_eq!(renew["lease"], lease.as_str());
    assert_eq!(renew["lifetime"], 30, "{renew:#}");
    assert_eq!(renew["grants"], open["grants"]);
    assert_eq!(renew["narrowed"], false, "{renew:#}");
    // Absent lifetime: the lifetime last granted (Section 11.2).
    let renew_default = answer(&steps, "renew-default", "granted");
    assert_eq!(renew_default["lifetime"], 30, "{renew_default:#}");
    let list = answer(&steps, "list", "leases");
    let listed: Vec<&str> = list["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .filter_map(|l| l["lease"].as_str())
        .collect();
    assert_eq!(listed, [lease.as_str()], "{list:#}");
    assert_eq!(list["epoch"], welcome["epoch"]);
    let unnamed = answer(&steps, "list-without-request-id", "leases");
    assert!(unnamed["request_id"].is_null(), "{unnamed:#}");

    // A port range: one grant per address, the range whole.
    let range = answer(&steps, "open-range", "granted");
    for grant in range["grants"].as_array().expect("grants") {
        let (first, last) = (u64::from(PORT) + 100, u64::from(PORT) + 102);
        assert_eq!(
            grant["ports"],
            serde_json::json!({"first": first, "last": last})
        );
    }
    answer(&steps, "release-range", "released");
    // Remote prefixes of IPv4 without a host address: the host's IPv4 address alone, reached
    // from inside the prefix and not from outside it.
    let remotes = answer(&steps, "open-remotes", "granted");
    let remote_lease = remotes["lease"].as_str().expect("lease id").to_owned();
    assert_eq!(remotes["narrowed"], false, "{remotes:#}");
    assert_eq!(
        remotes["grants"],
        serde_json::json!([{"protocol": "tcp", "ports": {"first": PORT + 1, "last": PORT + 1},
            "host": host.v4.to_string(), "remotes": [REMOTE_PREFIX], "app": null}]),
        "{remotes:#}"
    );
    let remote_target = SocketAddr::new(host.v4, PORT + 1);
    let reaches_from = |from: IpAddr| {
        tcp_connects(
            &lab.site.outside,
            remote_target,
            Some(from),
            Duration::from_millis(400),
        )
    };
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || reaches_from(
            lab.site.outside_v4
        )),
        "tcp/{} not reachable from inside {REMOTE_PREFIX}\n{}",
        PORT + 1,
        lab.log_tails(20)
    );
    assert!(
        !reaches_from(lab.site.outside_v4_alt),
        "tcp/{} reachable from outside {REMOTE_PREFIX}",
        PORT + 1
    );
    answer(&steps, "critical-common-keys", "leases");
    denied(
        &steps,
        "open-unknown-application",
        "unknown-application",
        Some(7005),
    );

    // Section 5.2's timers: the incomplete request reset with RequestTimeout and never
    // answered, the connection without Hello closed with it.
    let unfinished = &steps["open-without-fin"];
    assert_eq!(unfinished["reset"], REQUEST_TIMEOUT, "{unfinished:#}");
    assert!(unfinished.get("answer").is_none(), "{unfinished:#}");
    assert!(
        !lab.outside_reaches(0, false, PORT + 4, REFUSED),
        "tcp/{} opened by an Open that never ended",
        PORT + 4
    );
    let no_hello = &steps["no-hello"]["closed"];
    assert_eq!(no_hello["code"], REQUEST_TIMEOUT, "{no_hello}");
    assert_eq!(no_hello["application"], true, "{no_hello}");

    // A client that migrates although the gateway forbade it (Section 3.4, RFC 9000 Section
    // 9): what it sends on the new path is dropped (or the path validated), never answered
    // with a stateless reset or a close; back on the handshake's path the connection works.
    let migration = &steps["migration"];
    assert_eq!(migration["welcome"], "welcome", "{migration:#}");
    assert_eq!(migration["disable_active_migration"], true, "{migration:#}");
    assert!(migration["reset"].is_null(), "{migration:#}");
    assert!(migration["closed_while_moved"].is_null(), "{migration:#}");
    let moved = &migration["moved"];
    if moved.get("answer").is_some() {
        // The gateway validated the new path and let the client move: the answer came there.
        assert_eq!(moved["answer"]["request_id"], 7701, "{migration:#}");
        assert!(
            migration["received_on_new_path"].as_u64() > Some(0),
            "{migration:#}"
        );
    } else {
        assert_eq!(moved["timed_out"], true, "{migration:#}");
        assert_eq!(migration["received_on_new_path"], 0, "{migration:#}");
    }
    assert_eq!(
        migration["back"]["answer"]["type"], "leases",
        "{migration:#}"
    );
    assert_eq!(
        migration["back"]["answer"]["request_id"], 7702,
        "{migration:#}"
    );

    // Host addresses as an array: one lease, a grant for each; a family alone: its address.
    let named = answer(&steps, "open-host-addresses", "granted");
    let named_hosts: Vec<&str> = named["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .filter_map(|g| g["host"].as_str())
        .collect();
    assert_eq!(named_hosts, addresses, "{named:#}");
    let v6_only = answer(&steps, "open-family-ipv6", "granted");
    assert_eq!(
        v6_only["grants"],
        serde_json::json!([{"protocol": "tcp", "ports": {"first": PORT + 6, "last": PORT + 6},
            "host": host.v6.to_string(), "remotes": [], "app": null}]),
        "{v6_only:#}"
    );

    // Connections per identity (Section 3.5): the lab's gateway allows 4, the client held two
    // (the agent's, killed over 10 s ago, has timed out) and opened three more.
    let connections = &steps["connections"];
    let fates = connections["fates"].as_array().expect("fates");
    assert_eq!(fates[0]["answer"], "welcome", "{connections:#}");
    assert_eq!(fates[1]["answer"], "welcome", "{connections:#}");
    assert_eq!(
        fates[2]["closed"]["code"], EXCESSIVE_LOAD,
        "{connections:#}"
    );
    assert_eq!(fates[2]["closed"]["application"], true, "{connections:#}");
    assert!(connections["main_closed"].is_null(), "{connections:#}");

    // Lifetimes (Section 11.2) and narrowed (Section 9.5).
    for (step, lifetime, narrowed) in [
        ("open-short-lifetime", 30, true),
        ("open-zero-lifetime", 120, false),
        ("renew-long", 300, true),
    ] {
        let granted = answer(&steps, step, "granted");
        assert_eq!(granted["lifetime"], lifetime, "{step}: {granted:#}");
        assert_eq!(granted["narrowed"], narrowed, "{step}: {granted:#}");
        assert_eq!(granted["renew_after"], lifetime / 2, "{step}: {granted:#}");
    }

    // Items that break several rules: the first failure in the order of Section 6.6.
    for (step, code, request_id) in [
        (
            "first-critical-then-opening-keys",
            "unsupported-option",
            Some(7501),
        ),
        (
            "first-message-keys-then-critical",
            "malformed-request",
            Some(7502),
        ),
        ("first-critical-then-request-id", "unsupported-option", None),
        (
            "first-opening-then-lifetime",
            "malformed-option",
            Some(7503),
        ),
        (
            "first-opening-then-app-info",
            "malformed-option",
            Some(7504),
        ),
        (
            "first-missing-opening-then-lifetime",
            "malformed-request",
            Some(7505),
        ),
        (
            "first-decoding-then-validation",
            "lifetime-out-of-range",
            Some(7506),
        ),
        (
            "first-opening-rules-then-lifetime-maximum",
            "malformed-option",
            Some(7507),
        ),
        (
            "first-decoding-then-versions",
            "malformed-request",
            Some(7508),
        ),
    ] {
        denied(&steps, step, code, request_id);
        // The client's own decoder, written from the same text, agrees.
        assert_eq!(steps[step]["own_code"], code, "{step}: {:#}", steps[step]);
    }

    // The conformance vectors of requests, sent to the gateway.
    let vectors = &steps["vectors"];
    assert!(vectors["sent"].as_u64() >= Some(80), "{vectors:#}");
    assert_eq!(vectors["differences"], serde_json::json!([]), "{vectors:#}");

    // Refusals.
    denied(&steps, "renew-unknown-lease", "unknown-lease", Some(7101));
    denied(
        &steps,
        "open-foreign-address",
        "address-mismatch",
        Some(7102),
    );
    denied(
        &steps,
        "open-lifetime-above-maximum",
        "lifetime-out-of-range",
        Some(7103),
    );
    denied(&steps, "open-port-zero", "malformed-option", Some(7104));
    denied(&steps, "unknown-critical", "unsupported-option", Some(7105));
    assert_eq!(
        steps["unknown-critical"]["answer"]["unsupported"],
        serde_json::json!([64, 70])
    );
    denied(&steps, "truncated", "malformed-request", None);
    denied(&steps, "trailing-byte", "malformed-request", Some(7106));
    denied(&steps, "duplicate-request-id", "malformed-request", None);
    denied(&steps, "unknown-type", "malformed-request", Some(7108));
    denied(
        &steps,
        "answer-type-as-request",
        "malformed-request",
        Some(7109),
    );
    let ignored = answer(&steps, "unknown-keys", "leases");
    assert_eq!(ignored["request_id"], 7110);
    let distinct = answer(&steps, "float-and-integer-keys", "leases");
    assert_eq!(distinct["request_id"], 7113, "{distinct:#}");
    // An Open of 16,384 bytes at most whose Granted would exceed 16,384 (Section 5.4).
    let largest_open = &steps["open-largest-answer"];
    assert!(
        largest_open["size"].as_u64() > Some(16300),
        "{largest_open:#}"
    );
    denied(
        &steps,
        "open-largest-answer",
        "denied-by-policy",
        Some(7114),
    );
    let too_large = &steps["too-large"];
    assert_eq!(too_large["size"], 16385);
    assert_eq!(
        too_large["reset"], MESSAGE_TOO_LARGE,
        "an item of 16,385 bytes: {too_large:#}"
    );
    assert!(too_large.get("answer").is_none(), "{too_large:#}");
    assert_eq!(steps["largest"]["size"], 16384);
    assert_eq!(answer(&steps, "largest", "leases")["request_id"], 7112);

    // An operator's revocation: the Revoked notice on the connection with NOTICES only, sent
    // after the opening left the gateway's filter.
    lab.fwnpctl(&["revoke", &remote_lease, "--reason", "wire test"])
        .unwrap_or_else(|err| panic!("fwnpctl revoke: {err}"));
    client.tell("revoked");
    let steps = client.steps_until("revoke-checked", &lab);
    assert!(
        !reaches_from(lab.site.outside_v4),
        "tcp/{} reachable after its Revoked notice",
        PORT + 1
    );
    let notices = &steps["notices"];
    assert_eq!(
        notices["notices"],
        serde_json::json!([{"notice": {"type": "revoked", "request_id": null, "critical": [],
            "lease": remote_lease, "reason": "operator", "text": "wire test"}}]),
        "{notices:#}"
    );
    assert_eq!(notices["quiet"], serde_json::json!([]), "{notices:#}");
    assert_eq!(notices["unwelcomed"], serde_json::json!([]), "{notices:#}");
    denied(&steps, "renew-revoked", "unknown-lease", Some(7301));

    // Release: refused from the outside again.
    client.tell("release");
    let steps = client.steps_until("ready-for-credential", &lab);
    let released = answer(&steps, "release", "released");
    assert_eq!(released["lease"], lease.as_str());
    for v6 in [false, true] {
        assert!(
            lab.wait_reachable(0, v6, PORT, false, SETTLE),
            "tcp/{PORT} (v6 {v6}) still reachable after Release"
        );
    }
    // The same Release again: the recorded answer, byte for byte, if the gateway keeps a window
    // of request ids (Section 15); otherwise unknown-lease.
    let retried = &steps["release-retried"];
    match retried["answer"]["type"].as_str() {
        Some("released") => assert_eq!(
            retried["answer_hex"], retried["first_answer"],
            "{retried:#}"
        ),
        _ => denied(
            &steps,
            "release-retried",
            "unknown-lease",
            sent_request_id(retried),
        ),
    }
    denied(&steps, "renew-released", "unknown-lease", Some(7201));
    denied(&steps, "release-released", "unknown-lease", Some(7202));
    let after = answer(&steps, "list-after-release", "leases");
    assert_eq!(after["leases"], serde_json::json!([]), "{after:#}");

    // The first certificate revoked, and the CRL reloaded (Section 8.12).
    let kept = answer(&steps, "open-before-credential", "granted");
    let kept_lease = kept["lease"].as_str().expect("lease id").to_owned();
    let first_cert = lab.pki.file(&format!("{}.pem", host.name));
    let pki_dir = lab.pki.file("");
    let revoke_cert = [
        "pki".as_ref(),
        "revoke".as_ref(),
        first_cert.as_os_str(),
        "--dir".as_ref(),
        pki_dir.as_os_str(),
    ];
    run_ok(lab.fwnpctl_command().args(revoke_cert))
        .unwrap_or_else(|err| panic!("fwnpctl pki revoke: {err}"));
    lab.fwnpctl(&["policy", "reload"])
        .unwrap_or_else(|err| panic!("fwnpctl policy reload: {err}"));
    client.tell("credential-revoked");
    let steps = client.steps_until("ready-for-shutdown", &lab);
    let credential = &steps["credential"];
    let revoked_notice = serde_json::json!([{"notice": {"type": "revoked", "request_id": null,
        "critical": [], "lease": kept_lease, "reason": "credential-revoked"}}]);
    let without_text = |notices: &Value| {
        let mut notices = notices.clone();
        for notice in notices.as_array_mut().into_iter().flatten() {
            if let Some(map) = notice["notice"].as_object_mut() {
                map.remove("text");
            }
        }
        notices
    };
    assert_eq!(
        without_text(&credential["notices"]),
        revoked_notice,
        "{credential:#}"
    );
    assert_eq!(
        without_text(&credential["second_notices"]),
        revoked_notice,
        "{credential:#}"
    );
    assert_eq!(credential["closed"]["code"], NO_ERROR, "{credential:#}");
    assert_eq!(credential["closed"]["application"], true, "{credential:#}");
    assert!(credential["second_closed"].is_null(), "{credential:#}");
    assert_eq!(
        credential["new_handshake"]["code"],
        0x100 + CERTIFICATE_REVOKED,
        "{credential:#}"
    );
    assert!(
        !lab.outside_reaches(0, false, PORT + 7, REFUSED),
        "tcp/{} reachable after its certificate was revoked",
        PORT + 7
    );

    let restart_lease = answer(&steps, "open-before-restart", "granted")["lease"]
        .as_str()
        .expect("lease id")
        .to_owned();

    // A gateway that shuts down: GoingAway, then the close with GoingAway.
    let pid = lab
        .gateway_daemon()
        .and_then(|daemon| daemon.pid())
        .expect("the gateway runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to the gateway");
    let steps = client.steps_until("shutdown", &lab);
    let shutdown = &steps["shutdown"];
    let kinds: Vec<&str> = shutdown["notices"]
        .as_array()
        .expect("notices")
        .iter()
        .filter_map(|n| n["notice"]["type"].as_str())
        .collect();
    assert_eq!(kinds, ["going-away"], "{shutdown:#}");
    assert_eq!(shutdown["closed"]["code"], GOING_AWAY, "{shutdown:#}");
    assert_eq!(shutdown["closed"]["application"], true, "{shutdown:#}");

    // Started again on its state: the epoch kept, the lease live, renewable and in force.
    lab.start_gateway()
        .unwrap_or_else(|err| panic!("restarting the gateway: {err}"));
    client.tell("restarted");
    let steps = client.steps_until("ready-for-crash", &lab);
    let welcome_again = answer(&steps, "hello-after-restart", "welcome");
    assert_eq!(welcome_again["epoch"], welcome_epoch, "{welcome_again:#}");
    let listed = answer(&steps, "list-after-restart", "leases");
    assert_eq!(
        listed["leases"][0]["lease"],
        restart_lease.as_str(),
        "{listed:#}"
    );
    assert_eq!(
        listed["leases"].as_array().map(Vec::len),
        Some(1),
        "{listed:#}"
    );
    let renewed = answer(&steps, "renew-after-restart", "granted");
    assert_eq!(renewed["lease"], restart_lease.as_str(), "{renewed:#}");
    assert_eq!(
        renewed["lifetime"], 120,
        "the lifetime last granted: {renewed:#}"
    );
    assert!(
        lab.wait_reachable(0, false, PORT + 9, true, SETTLE),
        "tcp/{} not reachable after the restart\n{}",
        PORT + 9,
        lab.log_tails(20)
    );

    // A crash (SIGKILL) and a start on the same state: the connection the client held draws a
    // stateless reset at its next packet (Section 3.4), the epoch and the lease are kept.
    lab.kill_gateway();
    lab.start_gateway()
        .unwrap_or_else(|err| panic!("restarting the gateway: {err}"));
    client.tell("crashed");
    let steps = client.steps_until("ready-for-state-loss", &lab);
    let crash = stateless_reset(&steps, "crash");
    assert_eq!(
        crash["epochs"],
        serde_json::json!([welcome_epoch, welcome_epoch])
    );
    assert_eq!(crash["reopened"], serde_json::json!([]), "{crash:#}");
    assert_eq!(
        crash["book"],
        serde_json::json!([restart_lease]),
        "{crash:#}"
    );
    assert_eq!(
        crash["listed"]["answer"]["leases"][0]["lease"],
        restart_lease.as_str(),
        "{crash:#}"
    );

    // A crash and a start without the lease state: the Welcome's new epoch tells the client
    // that its lease is lost, and it opens the port again (Section 12).
    lab.kill_gateway();
    let state = lab.dir().join("gateway-state");
    for suffix in ["", "-wal", "-shm"] {
        let file = state.join(format!("{}{suffix}", fwnp_gateway::store::DATABASE_FILE));
        match std::fs::remove_file(&file) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                panic!("removing {}: {err}", file.display())
            }
            _ => {}
        }
    }
    lab.start_gateway()
        .unwrap_or_else(|err| panic!("starting the gateway without state: {err}"));
    client.tell("state-lost");
    let steps = client.steps_until("done", &lab);
    let lost = stateless_reset(&steps, "state-loss");
    let epochs = lost["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 2, "{lost:#}");
    assert_eq!(epochs[0], welcome_epoch, "{lost:#}");
    assert_ne!(
        epochs[1], welcome_epoch,
        "a new epoch for a new state: {lost:#}"
    );
    let reopened = lost["reopened"].as_array().expect("reopened");
    assert_eq!(
        reopened.len(),
        1,
        "one fresh Open for the lease lost: {lost:#}"
    );
    let regranted = &reopened[0]["answer"];
    assert_eq!(regranted["type"], "granted", "{lost:#}");
    assert_eq!(regranted["epoch"], epochs[1], "{lost:#}");
    assert_eq!(
        regranted["lifetime"], 120,
        "the Open as first asked: {lost:#}"
    );
    assert_eq!(
        regranted["grants"][0]["ports"],
        serde_json::json!({"first": PORT + 9, "last": PORT + 9}),
        "{lost:#}"
    );
    let new_lease = regranted["lease"].as_str().expect("lease id");
    assert_ne!(new_lease, restart_lease, "{lost:#}");
    assert_eq!(lost["book"], serde_json::json!([new_lease]), "{lost:#}");
    let listed: Vec<&str> = lost["listed"]["answer"]["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .filter_map(|l| l["lease"].as_str())
        .collect();
    assert_eq!(listed, [new_lease], "{lost:#}");
    assert!(
        lab.wait_reachable(0, false, PORT + 9, true, SETTLE),
        "tcp/{} not reachable once opened again\n{}",
        PORT + 9,
        lab.log_tails(20)
    );
    assert!(client.finished(), "the client failed");
}
