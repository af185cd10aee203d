//! The audit export (`[audit]`): a gateway serving real Opens over QUIC writes each stored
//! audit event as a JSON line and as an RFC 5424 syslog message to a Unix datagram socket the
//! test binds, each checked field by field against the stored record; a sink that is gone
//! drops and counts its events while every grant goes on.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{GatewayOptions, HOST_A, POLICY, STEP, TestGateway, denied, granted, tcp};
use fwnp_gateway::config::{AuditConfig, SyslogTarget};
use fwnp_gateway::store::{AuditQuery, Order};
use serde_json::Value;

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
    let gateway = TestGateway::start_with(
        "audit-export",
        POLICY,
        GatewayOptions {
            audit: Some(AuditConfig {
                json_file: Some(jsonl.clone()),
                syslog: Some(SyslogTarget::Unix(socket_path.clone())),
                queue: 100,
            }),
            ..GatewayOptions::default()
        },
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
    let gateway = TestGateway::start_with(
        "audit-dead",
        POLICY,
        GatewayOptions {
            audit: Some(AuditConfig {
                // Nobody listens there, and the file's directory does not exist.
                json_file: Some(dir.path().join("missing").join("audit.jsonl")),
                syslog: Some(SyslogTarget::Unix(dir.path().join("nobody.sock"))),
                queue: 2,
            }),
            ..GatewayOptions::default()
        },
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
    let gateway = TestGateway::start_with(
        "audit-udp",
        POLICY,
        GatewayOptions {
            audit: Some(AuditConfig {
                json_file: None,
                syslog: Some(SyslogTarget::Udp(
                    collector.local_addr().expect("collector address"),
                )),
                queue: 100,
            }),
            ..GatewayOptions::default()
        },
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
    let gateway = TestGateway::start_with(
        "audit-slow",
        POLICY,
        GatewayOptions {
            audit: Some(AuditConfig {
                json_file: Some(jsonl.clone()),
                syslog: Some(SyslogTarget::Unix(socket_path)),
                queue: 1000,
            }),
            ..GatewayOptions::default()
        },
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
