//! `fwnpctl` against a live gateway, as an operator uses it: after real hosts asked a real
//! gateway for applications, port ranges and openings restricted to remote prefixes, the policy
//! `fwnpctl report` suggests passes `fwnpctl policy check` and allows again what was granted;
//! `fwnpctl leases` stays a readable table when an application's name is a long command line.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use common::*;
use fwnp_proto::{PortRange, Prefix, Protocol};

const POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_lifetime = "1h"
max_leases = 10

[applications]
echo = ["tcp/7000", "udp/7000-7010"]
game = ["udp/27015"]

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "hosts"
groups = ["hosts"]
allow = ["app:echo", "app:game", "tcp/8000-8999", "udp/9000-9100"]
"#;

const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

/// Runs fwnpctl. The gateway serves its admin API on this test's runtime, so the test runs on
/// a multi-threaded one: a blocking wait here must not stop the runtime that answers.
fn fwnpctl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fwnpctl"))
        .args(args)
        .output()
        .expect("run fwnpctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suggested_policy_passes_check_and_allows_what_was_granted() {
    let gw = TestGateway::start("report-policy", POLICY).await;
    let (web, _) = gw.welcomed_host("web-01", &[HOST]).await;
    let (db, _) = gw
        .welcomed_host("db-01", &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20))])
        .await;

    granted(web.open(app("echo"), Some(300)).await);
    let mut range = port(Protocol::Udp, 9000);
    if let fwnp_proto::Target::Ports { ports, .. } = &mut range.target {
        *ports = PortRange {
            first: 9000,
            last: 9050,
        };
    }
    granted(web.open(range, Some(300)).await);
    let mut from = tcp(8080);
    from.remotes = vec![Prefix {
        addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 0)),
        len: 24,
    }];
    granted(db.open(from, Some(300)).await);
    granted(db.open(app("game"), Some(300)).await);

    let admin = gw.admin_socket.to_str().expect("utf-8 path");
    let (ok, suggested, stderr) = fwnpctl(&["--admin", admin, "report", "--policy-only"]);
    assert!(ok, "{stderr}");
    for needed in [
        "[applications]",
        "app:echo",
        "app:game",
        "udp/9000-9050",
        "tcp/8080",
    ] {
        assert!(
            suggested.contains(needed),
            "{needed} missing from:\n{suggested}"
        );
    }
    let file = gw.dir().join("suggested.toml");
    std::fs::write(&file, &suggested).expect("write the suggestion");
    let (ok, out, stderr) = fwnpctl(&["policy", "check", file.to_str().expect("utf-8 path")]);
    assert!(
        ok,
        "the suggestion fails its own check:\n{suggested}\n{out}{stderr}"
    );

    // What was granted is allowed again by the suggestion.
    for (host, address, open) in [
        ("fwnp://host/web-01", "192.0.2.10", "app:echo"),
        ("fwnp://host/web-01", "192.0.2.10", "udp/9000-9050"),
        ("fwnp://host/db-01", "192.0.2.20", "tcp/8080"),
        ("fwnp://host/db-01", "192.0.2.20", "app:game"),
    ] {
        let (ok, out, stderr) = fwnpctl(&[
            "policy",
            "explain",
            "--policy",
            file.to_str().expect("utf-8 path"),
            "--host",
            host,
            "--address",
            address,
            "--open",
            open,
        ]);
        assert!(
            ok,
            "{host} {open} is not allowed by the suggestion:\n{suggested}\n{out}{stderr}"
        );
    }
}

/// `fwnpctl audit --follow` prints its page, then each new event once, as it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_prints_the_page_then_each_new_event_once() {
    let gw = TestGateway::start("audit-follow", POLICY).await;
    let (web, _) = gw.welcomed_host("web-01", &[HOST]).await;
    let before = granted(web.open(tcp(7000), Some(300)).await).lease;
    let mut follower = Follower::start(
        &gw.admin_socket,
        &[
            "--json", "audit", "--kind", "grant", "--limit", "1", "--follow",
        ],
    );
    let lease_of = |line: Option<String>| {
        let line = line.expect("a line within 20 s");
        let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        event["lease"].as_str().unwrap_or_default().to_owned()
    };
    let page = follower.line(Duration::from_secs(20)).await;
    assert_eq!(
        lease_of(page),
        before.to_string(),
        "the page: the newest grant"
    );
    let next = granted(web.open(app("echo"), Some(300)).await).lease;
    let last = granted(web.open(app("game"), Some(300)).await).lease;
    for lease in [next, last] {
        let line = follower.line(Duration::from_secs(20)).await;
        assert_eq!(lease_of(line), lease.to_string());
    }
    let more = follower.line(Duration::from_secs(2)).await;
    assert_eq!(more, None, "each event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leases_table_stays_narrow_when_an_application_names_itself_by_its_command_line() {
    let gw = TestGateway::start("leases-table", POLICY).await;
    let (web, _) = gw.welcomed_host("web-01", &[HOST]).await;
    let command_line = format!(
        "/usr/bin/python3 -m http.server 8080 {}",
        "--verbose ".repeat(21)
    );
    let answer = web
        .request(&fwnp_proto::Message::Open(fwnp_proto::Open {
            common: common(Some(7)),
            opening: tcp(8080),
            lifetime: Some(300),
            app: Some(fwnp_proto::AppInfo {
                name: Some(command_line.clone()),
                ..Default::default()
            }),
        }))
        .await;
    granted(answer);

    let admin = gw.admin_socket.to_str().expect("utf-8 path");
    let (ok, table, stderr) = fwnpctl(&["--admin", admin, "leases"]);
    assert!(ok, "{stderr}");
    assert!(table.contains("/usr/bin/python3 -m http.server"), "{table}");
    for line in table.lines() {
        assert!(
            line.chars().count() <= 120,
            "a {}-column line:\n{table}",
            line.chars().count()
        );
    }
    // The whole name is still there for machines.
    let (ok, json, stderr) = fwnpctl(&["--admin", admin, "--json", "leases"]);
    assert!(ok, "{stderr}");
    assert!(json.contains(command_line.trim_end()), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_sqlite_store_by_its_backend_and_database() {
    let gw = TestGateway::start("status-sqlite", POLICY).await;
    let (status, body) = gw.admin("GET", "/v1/status", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["store_backend"]["backend"], "sqlite", "{body}");
    let database = body["store_backend"]["database"]
        .as_str()
        .expect("the database")
        .to_owned();
    assert_eq!(body["store"], database.as_str(), "{body}");
    let admin = gw.admin_socket.to_str().expect("utf-8 path");
    let (ok, text, stderr) = fwnpctl(&["--admin", admin, "status"]);
    assert!(ok, "{stderr}");
    let store = text
        .lines()
        .find(|l| l.starts_with("store "))
        .expect("a store line");
    assert_eq!(
        store.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["sqlite", database.as_str()],
        "{text}"
    );
    assert!(!text.contains("store_backend"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_over_the_admin_api_refuses_a_bad_description_as_a_bad_request() {
    let gw = TestGateway::start("explain-admin", POLICY).await;
    let good = serde_json::json!({
        "host": "fwnp://host/web-01", "address": "192.0.2.10", "open": "app:echo", "lifetime": "20m",
    });
    let (status, body) = gw.admin("POST", "/v1/policy/explain", Some(&good)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["allowed"], true, "{body}");
    assert_eq!(body["lifetime"], 1200, "{body}");
    assert_eq!(body["grants"].as_array().map(Vec::len), Some(2), "{body}");

    let cases = [
        (
            serde_json::json!({"open": "tcp/8080", "address": "192.0.2.10"}),
            "`host` (the identity) is required",
        ),
        (
            serde_json::json!({"host": "fwnp://host/web-01", "addresses": ["192.0.2.10", "x"], "open": "tcp/8080"}),
            "addresses[1]: \"x\" is not an address",
        ),
        (
            serde_json::json!({"host": "fwnp://host/web-01", "address": "192.0.2.10", "open": "tcp/8080", "from": ["10.0.0.1/8"]}),
            "from[0] \"10.0.0.1/8\": host bits",
        ),
        (
            serde_json::json!({"host": "fwnp://host/web-01", "address": "192.0.2.10", "open": "tcp/8080", "lifetime": "10 m"}),
            "lifetime \"10 m\"",
        ),
        // JSON of the wrong shape: the API's bad request too, with its error body.
        (
            serde_json::json!({"host": "fwnp://host/web-01", "address": 7, "open": "tcp/8080"}),
            "address",
        ),
    ];
    for (request, message) in cases {
        let (status, body) = gw.admin("POST", "/v1/policy/explain", Some(&request)).await;
        assert_eq!(status, 400, "{request}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{request}: {error:?}");
    }
}
