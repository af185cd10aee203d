//! The audit export (`[audit]`): a gateway serving real Opens over QUIC writes each stored
//! audit event as a JSON line and as an RFC 5424 syslog message to a Unix datagram socket the
//! test binds, each checked field by field against the stored record; a sink that is gone
//! drops and counts its events while every grant goes on; the JSON file follows its path when
//! renamed, as logrotate does it, with each event in the old or the new file.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use common::{GatewayOptions, HOST_A, POLICY, STEP, TestGateway, denied, granted, tcp};
use fwnp_gateway::config::{AuditConfig, SyslogTarget};
use fwnp_gateway::store::{AuditQuery, Order};
use serde_json::Value;

/// A gateway for `label` whose audit export writes the JSON file and the syslog target given,
/// through a queue of `queue` events.
async fn exporting(
    label: &str,
    json_file: Option<PathBuf>,
    syslog: Option<SyslogTarget>,
    queue: usize,
) -> TestGateway {
    let audit = AuditConfig {
        json_file,
        syslog,
        queue,
    };
    let options = GatewayOptions {
        audit: Some(audit),
        ..GatewayOptions::default()
    };
    TestGateway::start_with(label, POLICY, options).await
}

/// The stored audit trail as the admin API shows it, by event id.
fn stored(gateway: &TestGateway) -> BTreeMap<u64, Value> {
    let query = AuditQuery {
        order: Order::OldestFirst,
        limit: 1000,
        ..AuditQuery::default()
    };
    gateway
        .service
        .store()
        .audit(&query)
        .expect("audit query")
        .events
        .iter()
        .map(|e| (e.id, serde_json::to_value(e.view()).expect("json")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stored_event_is_written_as_a_json_line_and_an_rfc5424_message() {
    let dir = common::temp_dir("audit-export");
    let jsonl = dir.path().join("audit.jsonl");
    let socket_path = dir.path().join("syslog.sock");
    let syslog = UnixDatagram::bind(&socket_path).expect("bind the syslog socket");
    syslog
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let gateway = exporting(
        "audit-export",
        Some(jsonl.clone()),
        Some(SyslogTarget::Unix(socket_path.clone())),
        100,
    )
    .await;
    let (client, _) = gateway.welcomed_host("web-01", &[HOST_A]).await;
    let lease = granted(client.open(tcp(7001), None).await).lease;
    let refused = denied(client.open(tcp(23), None).await);
    assert_eq!(
        refused.code,
        fwnp_proto::ResultCode::DeniedByPolicy,
        "{refused:?}"
    );

    // The grant and the denial, as the JSON lines show them.
    let deadline = tokio::time::Instant::now() + STEP;
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&jsonl).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect();
        let has = |outcome: &str| lines.iter().any(|l| l["outcome"] == outcome);
        if has("granted") && has("denied") {
            break lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the JSON lines never showed the grant and the denial: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Field by field, each line is the stored record as the admin API shows it.
    let store = stored(&gateway);
    for line in &lines {
        let id = line["id"].as_u64().expect("an id");
        assert_eq!(Some(line), store.get(&id), "event {id}");
    }
    let grant = lines
        .iter()
        .find(|l| l["kind"] == "grant")
        .expect("a grant event");
    assert_eq!(grant["outcome"], "granted");
    assert_eq!(grant["identity"], "fwnp://host/web-01");
    assert_eq!(grant["lease"], lease.to_string());
    assert_eq!(grant["grants"][0]["protocol"], "tcp");
    assert_eq!(grant["grants"][0]["ports"], "7001");
    let denial = lines
        .iter()
        .find(|l| l["outcome"] == "denied")
        .expect("a denial");
    assert_eq!(denial["rule"], "no-telnet");
    assert_eq!(
        denial["code"],
        fwnp_proto::ResultCode::DeniedByPolicy.name()
    );

    // The same events over syslog, one datagram each.
    let mut messages: BTreeMap<u64, (String, Value)> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + STEP;
    let mut buf = vec![0u8; 65536];
    while lines
        .iter()
        .any(|l| !messages.contains_key(&l["id"].as_u64().unwrap_or_default()))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "syslog never had every event: {:?}",
            messages.keys()
        );
        let Ok(n) = syslog.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8(buf[..n].to_vec()).expect("UTF-8");
        let parsed = syslog_loose::parse_message(&text, syslog_loose::Variant::RFC5424);
        assert_eq!(
            parsed.protocol,
            syslog_loose::Protocol::RFC5424(1),
            "{text}"
        );
        assert_eq!(parsed.appname, Some("fwnp-gateway"), "{text}");
        assert_eq!(
            parsed.facility,
            Some(syslog_loose::SyslogFacility::LOG_AUTHPRIV),
            "{text}"
        );
        let params: BTreeMap<&str, String> = parsed
            .structured_data
            .iter()
            .find(|e| e.id == "fwnp@32473")
            .expect("the fwnp structured data")
            .params()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        let body: Value = serde_json::from_str(parsed.msg).expect("MSG is the event's JSON");
        let id: u64 = params["id"].parse().expect("id");
        assert_eq!(Some(&body), store.get(&id), "{text}");
        assert_eq!(parsed.msgid, body["kind"].as_str(), "{text}");
        assert_eq!(params["kind"], body["kind"].as_str().unwrap_or_default());
        assert_eq!(params["time_ms"], body["time_ms"].to_string());
        for field in ["outcome", "identity", "lease", "rule", "code"] {
            assert_eq!(
                params.get(field).map(String::as_str),
                body[field].as_str(),
                "{field} in {text}"
            );
        }
        let severity = if body["outcome"] == "denied" {
            syslog_loose::SyslogSeverity::SEV_NOTICE
        } else {
            syslog_loose::SyslogSeverity::SEV_INFO
        };
        assert_eq!(parsed.severity, Some(severity), "{text}");
        messages.insert(id, (text.clone(), body));
    }
    let metrics = gateway.service.render_metrics();
    assert!(
        !metrics.contains("fwnp_audit_export_dropped_total{"),
        "nothing dropped: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_gone_drops_and_counts_and_grants_go_on() {
    let dir = common::temp_dir("audit-dead");
    // Nobody listens there, and the file's directory does not exist.
    let gateway = exporting(
        "audit-dead",
        Some(dir.path().join("missing").join("audit.jsonl")),
        Some(SyslogTarget::Unix(dir.path().join("nobody.sock"))),
        2,
    )
    .await;
    let (client, _) = gateway.welcomed_host("web-01", &[HOST_A]).await;
    for port in [7001, 7002, 7003] {
        let answer = tokio::time::timeout(STEP, client.open(tcp(port), None))
            .await
            .expect("answered in time");
        granted(answer);
    }
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let events = stored(&gateway).len() as u64;
        assert!(events >= 3, "{events} events stored");
        let metrics = gateway.service.render_metrics();
        let dropped = |sink: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "fwnp_audit_export_dropped_total{{sink=\"{sink}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (file, syslog) = (dropped("json_file"), dropped("syslog"));
        // Each stored event dropped once per sink, none written.
        if file == events && syslog == events {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped {file} (file) and {syslog} (syslog) of {events} events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_reaches_a_collector_over_udp() {
    let collector = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the collector");
    collector
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let gateway = exporting(
        "audit-udp",
        None,
        Some(SyslogTarget::Udp(
            collector.local_addr().expect("collector address"),
        )),
        100,
    )
    .await;
    let (client, _) = gateway.welcomed_host("web-01", &[HOST_A]).await;
    let lease = granted(client.open(tcp(7001), None).await).lease;
    let deadline = tokio::time::Instant::now() + STEP;
    let mut buf = vec![0u8; 65536];
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the grant never reached the collector"
        );
        let Ok(n) = collector.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8(buf[..n].to_vec()).expect("UTF-8");
        let parsed = syslog_loose::parse_message(&text, syslog_loose::Variant::RFC5424);
        assert_eq!(parsed.appname, Some("fwnp-gateway"), "{text}");
        if parsed.msgid != Some("grant") {
            continue;
        }
        let body: Value = serde_json::from_str(parsed.msg).expect("MSG is the event's JSON");
        assert_eq!(body["lease"], lease.to_string(), "{text}");
        assert_eq!(body["outcome"], "granted", "{text}");
        let id = body["id"].as_u64().expect("id");
        assert_eq!(stored(&gateway).get(&id), Some(&body));
        break;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syslog_reader_that_falls_behind_loses_counted_events_and_the_file_gets_them_all() {
    let dir = common::temp_dir("audit-slow");
    let jsonl = dir.path().join("audit.jsonl");
    let socket_path = dir.path().join("slow.sock");
    // Bound and never read: its queue of datagrams fills and stays full.
    let _slow = UnixDatagram::bind(&socket_path).expect("bind the syslog socket");
    let gateway = exporting(
        "audit-slow",
        Some(jsonl.clone()),
        Some(SyslogTarget::Unix(socket_path)),
        1000,
    )
    .await;
    let (client, _) = gateway.welcomed_host("web-01", &[HOST_A]).await;
    // Granted and released, again and again: more events than the socket holds.
    for round in 0..40u16 {
        let answer = tokio::time::timeout(STEP, client.open(tcp(7000 + round), None))
            .await
            .expect("answered in time");
        let lease = granted(answer).lease;
        client.release(lease).await;
    }
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let events = stored(&gateway).len();
        let lines = std::fs::read_to_string(&jsonl)
            .unwrap_or_default()
            .lines()
            .count();
        let metrics = gateway.service.render_metrics();
        let dropped = |sink: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "fwnp_audit_export_dropped_total{{sink=\"{sink}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        };
        if lines == events && dropped("syslog") > 0 {
            assert_eq!(dropped("json_file"), 0);
            assert!(
                dropped("syslog") < events,
                "some went out before the socket filled"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{lines} lines of {events} events, {} dropped by syslog",
            dropped("syslog")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids of the JSON lines in `path` (none when it does not exist).
fn line_ids(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let line: Value = serde_json::from_str(l).expect("each line is one JSON object");
            line["id"].as_u64().expect("an id")
        })
        .collect()
}

/// Waits until the JSON lines of `path` hold a grant of each of `ports`.
async fn wait_for_grants(path: &std::path::Path, ports: &[u16]) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let granted_ports: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["kind"] == "grant")
            .filter_map(|l| l["grants"][0]["ports"].as_str().map(str::to_owned))
            .collect();
        if ports.iter().all(|p| granted_ports.contains(&p.to_string())) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never showed the grants of {ports:?}: {text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every stored event is in exactly one of the files, those before the rename in the old one.
fn assert_split(gateway: &TestGateway, old: &[u64], new: &[u64]) {
    let all: Vec<u64> = stored(gateway).into_keys().collect();
    let mut both: Vec<u64> = old.iter().chain(new).copied().collect();
    both.sort_unstable();
    assert_eq!(
        both, all,
        "each stored event once: old {old:?}, new {new:?}"
    );
    let last_old = old.iter().max().copied().unwrap_or_default();
    assert!(
        new.iter().all(|id| *id > last_old),
        "the new file holds only later events: old {old:?}, new {new:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_file_follows_its_path_after_a_rename() {
    let dir = common::temp_dir("audit-rotate");
    let jsonl = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let gateway = exporting("audit-rotate", Some(jsonl.clone()), None, 100).await;
    let (client, _) = gateway.welcomed_host("web-01", &[HOST_A]).await;
    let mut leases = Vec::new();
    for port in [7001, 7002] {
        leases.push(granted(client.open(tcp(port), None).await).lease);
    }
    wait_for_grants(&jsonl, &[7001, 7002]).await;
    // As logrotate does without copytruncate: the file is renamed, nobody tells the gateway.
    std::fs::rename(&jsonl, &rotated).expect("rename the audit file");
    tokio::time::sleep(fwnp_gateway::audit_export::REOPEN_CHECK + Duration::from_millis(300)).await;
    // The policy allows three leases: the first two end (two more events) before two more.
    for lease in leases {
        client.release(lease).await;
    }
    for port in [7003, 7004] {
        granted(client.open(tcp(port), None).await);
    }
    wait_for_grants(&jsonl, &[7003, 7004]).await;
    let (old, new) = (line_ids(&rotated), line_ids(&jsonl));
    assert_split(&gateway, &old, &new);
    let text = std::fs::read_to_string(&rotated).expect("the rotated file");
    assert!(
        !text.contains("\"7003\""),
        "a later grant in the old file: {text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&jsonl)
        .expect("the new file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "created as the first one was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_request_takes_the_new_file_at_the_next_event() {
    let dir = common::temp_dir("audit-hup");
    let jsonl = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    // A syslog sink too: the request to reopen is the file's, whichever sink's thread runs first.
    let socket_path = dir.path().join("syslog.sock");
    let _syslog = UnixDatagram::bind(&socket_path).expect("bind the syslog socket");
    let gateway = exporting(
        "audit-hup",
        Some(jsonl.clone()),
        Some(SyslogTarget::Unix(socket_path)),
        100,
    )
    .await;
    let (client, _) = gateway.welcomed_host("web-01", &[HOST_A]).await;
    granted(client.open(tcp(7001), None).await);
    wait_for_grants(&jsonl, &[7001]).await;
    std::fs::rename(&jsonl, &rotated).expect("rename the audit file");
    // What SIGHUP does, and at once the next grant: no wait for the path check.
    gateway.service.reopen_audit_export();
    granted(client.open(tcp(7002), None).await);
    wait_for_grants(&jsonl, &[7002]).await;
    assert_split(&gateway, &line_ids(&rotated), &line_ids(&jsonl));
}
