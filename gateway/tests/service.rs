//! The gateway's service over real QUIC with real certificates: identity and addresses from
//! certificates, the transport's limits, rate limits, idempotent re-open under concurrency,
//! policy reload, CRL reload and operator revocation with their notices on unidirectional
//! streams, expiry by the gateway's own timer, restarts, and the audit trail of it all. The
//! decisions that need no socket (Hello rules, ownership, quotas, lifetimes, the size bound, the
//! Release replay rule) are tested against the request core in `tests/request_core.rs`.
//!
//! The service runs with its kernel filter disabled (no root needed); `tests/netns.rs` runs the
//! real daemon against the real kernel. Every gateway listens on 127.0.0.1 only.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::*;
use fwnp_gateway::store::{AuditKind, LeaseFilter, LeaseState, Outcome};
use fwnp_proto::{
    Capabilities, HostAddresses, MAX_MESSAGE_SIZE, Message, PortRange, Protocol, QuicErrorCode,
    ResultCode, RevokeReason,
};
use fwnp_testkit::process::{ProcessGuard, wait_for_socket};
use fwnp_trust::pki::{self, RevocationReason};
use fwnp_trust::tls::{ClientTlsFiles, ServerOptions};
use serde_json::json;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[tokio::test]
async fn hello_is_answered_with_welcome_naming_identity_addresses_epoch_and_limits() {
    let gw = TestGateway::start("welcome", POLICY).await;
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));

    // Identity from the URI SAN, addresses from the IP SANs, in certificate order.
    let files = gw.pki.host(
        "web-01",
        &[HOST_A, v6],
        &["spiffe://example.org/host/web-01"],
        &["web-01.example.org"],
    );
    let client = Client::connect(gw.addr, &files).await;
    let welcome = client.hello().await;
    assert_eq!(welcome.version, 1);
    assert_eq!(welcome.identity, "spiffe://example.org/host/web-01");
    assert_eq!(welcome.addresses, vec![HOST_A, v6]);
    assert_eq!(welcome.epoch, gw.service.epoch());
    assert_eq!(
        welcome.common.request_id,
        Some(1),
        "the request id is echoed"
    );
    assert_eq!(welcome.limits.max_message_size, MAX_MESSAGE_SIZE as u32);
    assert_eq!(
        welcome.limits.max_streams, 16,
        "the configured stream limit"
    );
    let now = fwnp_gateway::store::now_ms();
    assert!(
        welcome.time_ms.abs_diff(now) < 5_000,
        "gateway time {} vs {now}",
        welcome.time_ms
    );
    for flag in [
        Capabilities::PORT_RANGES,
        Capabilities::REMOTE_PREFIXES,
        Capabilities::APPLICATIONS,
        Capabilities::NOTICES,
    ] {
        assert!(
            welcome.capabilities.has(flag),
            "capability {flag:#x} missing in {:?}",
            welcome.capabilities
        );
    }
    // This host is not a balancer: no third-party rights.
    assert!(!welcome.capabilities.has(Capabilities::THIRD_PARTY));

    // The default identity of pki (fwnp://host/NAME); no IP SAN: the source address.
    let (plain, welcome) = gw.welcomed_host("web-02", &[]).await;
    assert_eq!(welcome.identity, "fwnp://host/web-02");
    assert_eq!(welcome.addresses, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    // The limits of the rules that apply to this host.
    assert_eq!(welcome.limits.min_lifetime, 1);
    assert_eq!(welcome.limits.max_lifetime, 3600);
    assert_eq!(welcome.limits.max_leases, Some(3));
    drop(plain);

    // A DNS SAN is the identity when there is no URI SAN.
    let files = gw.pki.host("web-03", &[], &[], &["Web-03.Example.org"]);
    let client = Client::connect(gw.addr, &files).await;
    assert_eq!(client.hello().await.identity, "web-03.example.org");

    // A balancer learns that it has third-party rights.
    let (_lb, welcome) = gw.welcomed_host("lb-01", &[HOST_B]).await;
    assert!(
        welcome.capabilities.has(Capabilities::THIRD_PARTY),
        "{:?}",
        welcome.capabilities
    );
}

/// A host that says Hello and then has nothing to ask for a while (most hosts, most of the time)
/// keeps its connection past the 10 s within which a Hello must come.
#[tokio::test]
async fn a_welcomed_host_that_stays_quiet_outlives_the_hello_timer() {
    let gw = TestGateway::start("quiet", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let closed = client.closed_within(Duration::from_secs(11)).await;
    assert!(closed.is_none(), "the quiet host was closed: {closed:?}");
    granted(client.open(tcp(7001), None).await);
}

#[tokio::test]
async fn open_list_reopen_renew_release() {
    let gw = TestGateway::start("flow", POLICY).await;
    let (client, welcome) = gw.welcomed_host("web-01", &[HOST_A]).await;

    // Open, asking more than the rule's maximum: clamped to 1 h and marked narrowed.
    let g = granted(client.open(tcp(7001), Some(7200)).await);
    assert_eq!(g.lifetime, 3600);
    assert!(g.narrowed, "a clamped lifetime is a narrowed grant");
    assert_eq!(g.renew_after, 1800);
    assert_eq!(g.epoch, welcome.epoch);
    assert_eq!(g.grants.len(), 1);
    let grant = &g.grants[0];
    assert_eq!(
        (grant.protocol, grant.ports, grant.host),
        (Protocol::Tcp, PortRange::single(7001), HOST_A)
    );
    assert!(grant.remotes.is_empty());
    let now = fwnp_gateway::store::now_ms();
    assert!(
        g.expires_ms > now + 3_590_000 && g.expires_ms <= now + 3_600_000,
        "expires {} now {now}",
        g.expires_ms
    );

    // Asking nothing gives the default lifetime, not narrowed.
    let udp = granted(client.open(port(Protocol::Udp, 7002), None).await);
    assert_eq!(udp.lifetime, 600);
    assert!(!udp.narrowed);
    assert_ne!(udp.lease, g.lease);

    // List shows both with their remaining time.
    let leases = client.list().await;
    assert_eq!(leases.epoch, welcome.epoch);
    let ids: HashSet<_> = leases.leases.iter().map(|l| l.lease).collect();
    assert_eq!(ids, HashSet::from([g.lease, udp.lease]));
    let listed = leases
        .leases
        .iter()
        .find(|l| l.lease == g.lease)
        .expect("listed");
    assert_eq!(listed.grants, g.grants);
    assert!(
        (3590..=3600).contains(&listed.remaining),
        "remaining {}",
        listed.remaining
    );

    // The same Open again: the same lease, extended, not a new one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = granted(client.open(tcp(7001), Some(7200)).await);
    assert_eq!(again.lease, g.lease, "re-open must not create a duplicate");
    assert!(again.expires_ms >= g.expires_ms);
    assert_eq!(client.list().await.leases.len(), 2);
    let stored = gw.service.store().live_leases().expect("leases");
    assert_eq!(stored.len(), 2, "the store holds no duplicate either");

    // Renew: a new expiry, same lease and grants.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = granted(client.renew(g.lease, Some(60)).await);
    assert_eq!(renewed.lease, g.lease);
    assert_eq!(renewed.grants, g.grants);
    assert_eq!(renewed.lifetime, 60);
    assert_eq!(renewed.renew_after, 30);
    assert_eq!(renewed.epoch, welcome.epoch);
    let now = fwnp_gateway::store::now_ms();
    assert!(
        renewed.expires_ms > now + 55_000 && renewed.expires_ms <= now + 60_000,
        "a Renew sets the expiry"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed_again = granted(client.renew(g.lease, None).await);
    assert_eq!(
        renewed_again.lifetime, 60,
        "Renew without a lifetime keeps the lease's own"
    );
    assert!(
        renewed_again.expires_ms > renewed.expires_ms,
        "the expiry moves forward"
    );
    let record = gw
        .service
        .store()
        .lease(g.lease)
        .expect("query")
        .expect("stored");
    assert_eq!(
        record.expires_ms, renewed_again.expires_ms,
        "the store has the new expiry"
    );

    // Release, then the lease is gone for Renew, Release and List.
    match client.release(g.lease).await {
        Message::Released(r) => assert_eq!(r.lease, g.lease),
        other => panic!("expected Released, got {other:?}"),
    }
    let d = denied(client.renew(g.lease, None).await);
    assert_eq!(d.code, ResultCode::UnknownLease);
    assert_eq!(d.lease, Some(g.lease));
    assert_eq!(
        denied(client.release(g.lease).await).code,
        ResultCode::UnknownLease
    );
    let ids: Vec<_> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(ids, vec![udp.lease]);
    let record = gw
        .service
        .store()
        .lease(g.lease)
        .expect("query")
        .expect("stored");
    assert_eq!(record.state, LeaseState::Released);

    // A lease survives its connection: a new connection of the same host lists and releases it.
    drop(client);
    let (again, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let listed: Vec<_> = again.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![udp.lease]);
    assert!(matches!(
        again.release(udp.lease).await,
        Message::Released(_)
    ));
}

#[tokio::test]
async fn an_identity_the_policy_does_not_mention_is_welcomed_and_denied_by_policy_not_unauthorized()
{
    let gw = TestGateway::start("unmentioned", POLICY).await;
    // In no group of the policy: `not-authorized` is only for who asks (no identity, revoked).
    let files = gw
        .pki
        .host("stranger", &[HOST_B], &["fwnp://other/stranger"], &[]);
    let client = Client::connect(gw.addr, &files).await;
    let welcome = client.hello().await;
    assert_eq!(welcome.identity, "fwnp://other/stranger");
    let d = denied(client.open(tcp(7001), None).await);
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
    // A reload that names it allows it on the same connection.
    write_policy(
        &gw.policy_path,
        &POLICY.replace(
            r#"identities = ["fwnp://host/*"]"#,
            r#"identities = ["fwnp://host/*", "fwnp://other/stranger"]"#,
        ),
    );
    gw.service.reload_policy().await.expect("reload");
    granted(client.open(tcp(7001), None).await);
}

#[tokio::test]
async fn an_application_id_expands_from_the_catalogue() {
    let gw = TestGateway::start("apps", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;

    let g = granted(client.open(app("https"), None).await);
    let mut got: Vec<_> = g
        .grants
        .iter()
        .map(|grant| (grant.protocol, grant.ports, grant.host, grant.app.clone()))
        .collect();
    got.sort();
    let mut want = vec![
        (
            Protocol::Tcp,
            PortRange::single(443),
            HOST_A,
            Some("https".to_owned()),
        ),
        (
            Protocol::Udp,
            PortRange::single(443),
            HOST_A,
            Some("https".to_owned()),
        ),
    ];
    want.sort();
    assert_eq!(got, want);
    // One lease for the whole application, and re-asking for it is the same lease.
    assert_eq!(
        granted(client.open(app("https"), None).await).lease,
        g.lease
    );
    assert_eq!(client.list().await.leases.len(), 1);

    let d = denied(client.open(app("gopher"), None).await);
    assert_eq!(d.code, ResultCode::UnknownApplication, "{d:?}");
}

#[tokio::test]
async fn addresses_the_host_does_not_hold_need_third_party_rights() {
    let gw = TestGateway::start("addresses", POLICY).await;
    let (web, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let mut other = tcp(7001);
    other.host = HostAddresses::One(HOST_B);
    let d = denied(web.open(other.clone(), None).await);
    assert_eq!(d.code, ResultCode::AddressMismatch, "{d:?}");
    // Its own address, named explicitly, is fine.
    let mut own = tcp(7001);
    own.host = HostAddresses::One(HOST_A);
    assert_eq!(granted(web.open(own, None).await).grants[0].host, HOST_A);
    // No IPv6 address at all: a family it does not hold.
    let mut v6 = tcp(7002);
    v6.family = Some(fwnp_proto::Family::Ipv6);
    assert_eq!(
        denied(web.open(v6, None).await).code,
        ResultCode::AddressMismatch
    );

    // A balancer may open an address of its pool that it does not hold...
    let (lb, _) = gw.welcomed_host("lb-01", &[HOST_B]).await;
    let pool = v4(203, 0, 113, 5);
    let mut opening = tcp(8080);
    opening.host = HostAddresses::One(pool);
    let g = granted(lb.open(opening, None).await);
    assert_eq!(g.grants[0].host, pool);
    let record = gw
        .service
        .store()
        .lease(g.lease)
        .expect("query")
        .expect("stored");
    assert_eq!(
        record.identity, "fwnp://host/lb-01",
        "the asker owns a third-party lease"
    );
    // ...but not one outside it.
    let mut outside = tcp(8080);
    outside.host = HostAddresses::One(v4(198, 51, 100, 7));
    assert_eq!(
        denied(lb.open(outside, None).await).code,
        ResultCode::AddressMismatch
    );
}

#[tokio::test]
async fn too_many_requests_are_rate_limited_with_a_retry_after() {
    let policy = format!("{POLICY}\n[rate_limit]\nrequests_per_second = 1\nburst = 3\n");
    let gw = TestGateway::start("rate", &policy).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(
            client
                .request(&Message::List(fwnp_proto::List {
                    common: common(client.next_id()),
                }))
                .await,
        );
    }
    let limited: Vec<_> = answers
        .iter()
        .filter_map(|a| match a {
            Message::Denied(d) if d.code == ResultCode::RateLimited => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert!(
        matches!(answers[0], Message::Leases(_)),
        "the first requests pass: {answers:?}"
    );
    assert!(
        limited.len() >= 2,
        "requests beyond the burst are limited: {answers:?}"
    );
    for d in &limited {
        let retry = d.retry_after.expect("rate-limited carries retry-after");
        assert!((1..=2).contains(&retry), "retry-after {retry}");
    }
    // Another identity has its own budget.
    let (other, _) = gw.welcomed_host("web-02", &[HOST_B]).await;
    other.list().await;
    // After the retry-after, the host may ask again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.list().await;
    gw.wait_audit(&[AuditKind::Decision], None, |records| {
        records
            .iter()
            .any(|r| r.event.code == Some(ResultCode::RateLimited))
    })
    .await;
}

/// A host that sends as fast as it can, many requests at once, is refused as rate-limited and
/// slowed down, while another host's requests at the same time are answered on their merits.
#[tokio::test]
async fn a_flooding_host_is_rate_limited_while_another_hosts_requests_are_answered() {
    let policy = format!("{POLICY}\n[rate_limit]\nrequests_per_second = 20\nburst = 20\n");
    let gw = TestGateway::start("flood", &policy).await;
    let (flooder, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let (other, _) = gw.welcomed_host("web-02", &[HOST_B]).await;
    // Bounded: 16 requests in flight at a time, 25 after each other on each.
    let mut flood = tokio::task::JoinSet::new();
    for lane in 0..16u64 {
        let connection = flooder.connection.clone();
        flood.spawn(async move {
            let mut codes = Vec::new();
            for n in 0..25 {
                codes.push(list_answer_code(&connection, lane * 100 + n).await);
            }
            codes
        });
    }
    let steady = async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(other.list().await);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        answers
    };
    let answers = steady.await;
    let codes: Vec<Option<ResultCode>> = flood.join_all().await.into_iter().flatten().collect();
    let limited = codes
        .iter()
        .filter(|c| **c == Some(ResultCode::RateLimited))
        .count();
    assert!(
        limited > 0 && limited < codes.len(),
        "the flood is answered, beyond its rate as rate-limited: {limited} of {}",
        codes.len()
    );
    assert_eq!(
        answers.len(),
        10,
        "every request of the other host is answered"
    );
}

/// Sends a List on `connection` and returns the code of a Denied answer (`None` for another
/// answer); panics when there is no answer in time.
async fn list_answer_code(connection: &quinn::Connection, id: u64) -> Option<ResultCode> {
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await.expect("open a stream");
        let list = Message::List(fwnp_proto::List {
            common: common(Some(id)),
        });
        send.write_all(&fwnp_proto::codec::encode(&list))
            .await
            .expect("send");
        send.finish().expect("finish");
        recv.read_to_end(MAX_MESSAGE_SIZE).await.expect("an answer")
    };
    let bytes = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("answered in time");
    match fwnp_proto::codec::decode(&bytes).expect("the answer decodes") {
        Message::Denied(d) => Some(d.code),
        _ => None,
    }
}

/// Re-encodes a message with extra entries in its top-level map.
fn with_extra_keys(message: &Message, extra: Vec<(u64, ciborium::Value)>) -> Vec<u8> {
    let bytes = fwnp_proto::codec::encode(message);
    let value: ciborium::Value =
        ciborium::from_reader(bytes.as_slice()).expect("our own encoding parses");
    let ciborium::Value::Map(mut entries) = value else {
        panic!("a message is a map")
    };
    for (key, v) in extra {
        entries.push((ciborium::Value::Integer(key.into()), v));
    }
    let mut out = Vec::new();
    ciborium::into_writer(&ciborium::Value::Map(entries), &mut out).expect("encode");
    out
}

#[tokio::test]
async fn malformed_items_and_unknown_critical_keys_are_denied() {
    let gw = TestGateway::start("malformed", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;

    for (what, bytes) in [
        ("truncated map", vec![0xa2, 0x00, 0x03]),
        ("a stray break", vec![0xff]),
        ("an empty stream", vec![]),
        ("not a map", vec![0x83, 0x01, 0x02, 0x03]),
        ("unknown message type", vec![0xa1, 0x00, 0x18, 0x63]),
    ] {
        let d = denied(client.request_bytes(&bytes).await);
        assert_eq!(d.code, ResultCode::MalformedRequest, "{what}: {d:?}");
    }
    // Trailing bytes after a valid request.
    let mut bytes = fwnp_proto::codec::encode(&Message::List(fwnp_proto::List {
        common: common(Some(77)),
    }));
    bytes.push(0x00);
    let d = denied(client.request_bytes(&bytes).await);
    assert_eq!(d.code, ResultCode::MalformedRequest);
    // A readable request id of a refused item is echoed (spec section 6.6): {0: 99, 1: 78}.
    let d = denied(
        client
            .request_bytes(&[0xa2, 0x00, 0x18, 0x63, 0x01, 0x18, 0x4e])
            .await,
    );
    assert_eq!(d.code, ResultCode::MalformedRequest);
    assert_eq!(d.common.request_id, Some(78));
    // A List with key 1 twice ({0: 6, 1: 78, 1: 79}) has no request id to echo.
    let d = denied(
        client
            .request_bytes(&[0xa3, 0x00, 0x06, 0x01, 0x18, 0x4e, 0x01, 0x18, 0x4f])
            .await,
    );
    assert_eq!(d.code, ResultCode::MalformedRequest);
    assert_eq!(d.common.request_id, None, "{d:?}");
    // A request that is valid CBOR but lacks a mandatory key: Open without its opening.
    let d = denied(
        client
            .request_bytes(&[0xa2, 0x00, 0x03, 0x01, 0x18, 0x4f])
            .await,
    );
    assert_eq!(d.code, ResultCode::MalformedRequest, "{d:?}");
    assert_eq!(d.common.request_id, Some(79));

    // An opening with port 0 is a malformed option.
    let d = denied(client.open(tcp(0), None).await);
    assert_eq!(d.code, ResultCode::MalformedOption);

    // An unknown key is ignored...
    let open = open_msg(Some(80), tcp(7001), None);
    let g = granted(
        client
            .request_bytes(&with_extra_keys(
                &open,
                vec![(70, ciborium::Value::Text("x".into()))],
            ))
            .await,
    );
    assert_eq!(g.common.request_id, Some(80));
    // ...unless it is listed as critical; Denied key 7 lists such keys once each, in
    // ascending order, whatever their order in critical.
    let critical = ciborium::Value::Array(vec![
        ciborium::Value::Integer(71.into()),
        ciborium::Value::Integer(70.into()),
        ciborium::Value::Integer(71.into()),
    ]);
    let bytes = with_extra_keys(
        &open_msg(Some(81), tcp(7002), None),
        vec![
            (2, critical),
            (70, ciborium::Value::Text("x".into())),
            (71, ciborium::Value::Bool(true)),
        ],
    );
    let d = denied(client.request_bytes(&bytes).await);
    assert_eq!(d.code, ResultCode::UnsupportedOption, "{d:?}");
    assert_eq!(d.unsupported, vec![70, 71]);
    assert_eq!(d.common.request_id, Some(81));
    // Nothing was opened by the refused request.
    let ports: Vec<_> = client
        .list()
        .await
        .leases
        .iter()
        .map(|l| l.grants[0].ports.first)
        .collect();
    assert_eq!(ports, vec![7001]);
}

#[tokio::test]
async fn an_oversized_request_is_reset_without_an_answer() {
    let gw = TestGateway::start("oversized", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let bytes = vec![0x40u8; MAX_MESSAGE_SIZE + 600];
    match client.exchange(&bytes).await {
        Exchange::Reset(code) | Exchange::Stopped(code) => {
            assert_eq!(
                code,
                u64::from(QuicErrorCode::MessageTooLarge.code()),
                "code {code:#x}"
            )
        }
        other => panic!("expected a reset with MessageTooLarge, got {other:?}"),
    }
    // Exactly the limit is accepted (and then judged on its content).
    let mut exact = fwnp_proto::codec::encode(&Message::List(fwnp_proto::List {
        common: common(Some(5)),
    }));
    exact.resize(MAX_MESSAGE_SIZE, 0);
    let d = denied(client.request_bytes(&exact).await);
    assert_eq!(d.code, ResultCode::MalformedRequest, "trailing bytes");
    // The connection survives.
    client.list().await;
}

#[tokio::test]
async fn an_unsupported_version_is_denied_then_the_connection_closes() {
    let gw = TestGateway::start("version", POLICY).await;
    let client = gw.host("web-01", &[HOST_A]).await;
    let d = denied(
        client
            .request(&hello_msg(Some(3), &[2, 7], Capabilities::ALL))
            .await,
    );
    assert_eq!(d.code, ResultCode::UnsupportedVersion);
    assert_eq!(d.common.request_id, Some(3));
    let closed = client
        .closed_within(STEP)
        .await
        .expect("the gateway closes the connection");
    assert_eq!(
        application_close_code(&closed),
        Some(u64::from(QuicErrorCode::VersionMismatch.code())),
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_client_that_opens_a_unidirectional_stream_is_closed_with_protocol_violation() {
    // By default the gateway grants no unidirectional stream at all (the spec's transport
    // parameter): the stream cannot even be opened.
    let gw = TestGateway::start("uni-default", POLICY).await;
    let client = gw.host("web-01", &[HOST_A]).await;
    client.hello().await;
    let blocked =
        tokio::time::timeout(Duration::from_millis(500), client.connection.open_uni()).await;
    assert!(
        blocked.is_err(),
        "a unidirectional stream was opened although the gateway allows none"
    );

    // With one allowed, the gateway closes the connection when one arrives.
    let options = GatewayOptions {
        server: ServerOptions {
            max_concurrent_uni_streams_from_client: 1,
            ..ServerOptions::default()
        },
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("uni", POLICY, options).await;
    let client = gw.host("web-01", &[HOST_A]).await;
    client.hello().await;
    let mut stream = tokio::time::timeout(STEP, client.connection.open_uni())
        .await
        .expect("in time")
        .expect("open uni");
    let _ = stream.write_all(b"\xa1\x00\x06").await;
    let _ = stream.finish();
    let closed = client
        .closed_within(STEP)
        .await
        .expect("the gateway closes the connection");
    assert_eq!(
        application_close_code(&closed),
        Some(u64::from(QuicErrorCode::ProtocolViolation.code())),
        "{closed:?}"
    );
}

/// The policy without the UDP ports of `hosts-web`.
fn policy_without_udp() -> String {
    POLICY.replace(
        r#"allow = ["app:https", "tcp/7000-7999", "udp/7000-7999"]"#,
        r#"allow = ["app:https", "tcp/7000-7999"]"#,
    )
}

#[tokio::test]
async fn a_policy_reload_revokes_what_it_no_longer_allows_and_notifies_the_host() {
    let gw = TestGateway::start("reload", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let kept = granted(client.open(tcp(7001), None).await).lease;
    let doomed = granted(client.open(port(Protocol::Udp, 7001), None).await).lease;

    // A broken file is refused and the old policy stays in force.
    write_policy(&gw.policy_path, "[[rule]]\nname = \"broken\"\n");
    let error = gw
        .service
        .reload_policy()
        .await
        .expect_err("a broken policy is refused");
    // Mapped to HTTP 400 by the admin API.
    assert_eq!(error.kind, fwnp_gateway::api::AdminErrorKind::BadRequest);
    assert!(
        error.message.contains("old one stays in force"),
        "{}",
        error.message
    );
    assert!(
        client
            .next_notice(Duration::from_millis(200))
            .await
            .is_none(),
        "nothing revoked"
    );
    granted(client.open(port(Protocol::Udp, 7002), None).await);
    assert_eq!(client.list().await.leases.len(), 3);
    // The same through the admin API.
    let (status, body) = gw.admin("POST", "/v1/policy/reload", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("old one stays in force")),
        "{body}"
    );
    assert_eq!(client.list().await.leases.len(), 3);

    // A valid file without UDP: the UDP leases are revoked and the host is told.
    write_policy(&gw.policy_path, &policy_without_udp());
    let result = gw.service.reload_policy().await.expect("reload");
    assert_eq!(result.revoked.len(), 2, "{result:?}");
    let mut revoked = HashSet::new();
    for _ in 0..2 {
        match client.next_notice(STEP).await {
            Some(Message::Revoked(r)) => {
                assert_eq!(r.reason, RevokeReason::PolicyChanged);
                assert!(r.text.is_some());
                revoked.insert(r.lease);
            }
            other => panic!("expected a Revoked notice, got {other:?}"),
        }
    }
    assert!(revoked.contains(&doomed));
    let listed: Vec<_> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![kept]);
    assert_eq!(
        denied(client.renew(doomed, None).await).code,
        ResultCode::UnknownLease
    );
    let record = gw
        .service
        .store()
        .lease(doomed)
        .expect("query")
        .expect("stored");
    assert_eq!(record.state, LeaseState::Revoked);
    // The new policy is in force for new requests.
    assert_eq!(
        denied(client.open(port(Protocol::Udp, 7001), None).await).code,
        ResultCode::DeniedByPolicy
    );

    // Through the admin API: a policy without tcp/7000-7999 revokes the last one.
    write_policy(
        &gw.policy_path,
        &policy_without_udp().replace(r#", "tcp/7000-7999""#, ""),
    );
    let (status, body) = gw.admin("POST", "/v1/policy/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["revoked"][0]["lease"],
        json!(kept.to_string()),
        "{body}"
    );
    match client.next_notice(STEP).await {
        Some(Message::Revoked(r)) => {
            assert_eq!(r.lease, kept);
            assert_eq!(r.reason, RevokeReason::PolicyChanged);
        }
        other => panic!("expected a Revoked notice, got {other:?}"),
    }
    assert!(client.list().await.leases.is_empty());
    gw.wait_audit(&[AuditKind::PolicyReload], None, |r| r.len() >= 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reloads_at_the_same_moment_both_succeed_and_revoke_each_lease_once() {
    let gw = TestGateway::start("reload-twice", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let kept = granted(client.open(tcp(7001), None).await).lease;
    let doomed: Vec<_> = [7001, 7002]
        .into_iter()
        .map(|p| port(Protocol::Udp, p))
        .collect();
    let mut ended = Vec::new();
    for opening in doomed {
        ended.push(granted(client.open(opening, None).await).lease);
    }
    write_policy(&gw.policy_path, &policy_without_udp());
    let (first, second) = tokio::join!(
        gw.admin("POST", "/v1/policy/reload", None),
        gw.admin("POST", "/v1/policy/reload", None),
    );
    let mut revoked = Vec::new();
    for (status, body) in [first, second] {
        assert_eq!(status, 200, "{body}");
        for lease in body["revoked"].as_array().expect("revoked") {
            revoked.push(lease["lease"].as_str().expect("lease").to_owned());
        }
    }
    revoked.sort();
    let mut expected: Vec<String> = ended.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(
        revoked, expected,
        "each UDP lease revoked by one of the reloads"
    );
    for _ in 0..2 {
        assert!(
            matches!(client.next_notice(STEP).await, Some(Message::Revoked(_))),
            "a notice per revoked lease"
        );
    }
    assert!(
        client
            .next_notice(Duration::from_millis(200))
            .await
            .is_none(),
        "no lease revoked twice"
    );
    let listed: Vec<_> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![kept]);
    gw.wait_audit(&[AuditKind::PolicyReload], None, |r| r.len() >= 2)
        .await;
}

#[tokio::test]
async fn an_operator_revocation_through_the_admin_api_notifies_the_host() {
    let gw = TestGateway::start("revoke", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let (bystander, _) = gw.welcomed_host("web-02", &[HOST_B]).await;
    let lease = granted(client.open(tcp(7001), None).await).lease;
    let other = granted(bystander.open(tcp(7001), None).await).lease;

    let (status, body) = gw
        .admin("GET", "/v1/leases?host=fwnp://host/web-01", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["leases"][0]["id"], json!(lease.to_string()), "{body}");

    let path = format!("/v1/leases/{lease}/revoke");
    let (status, body) = gw
        .admin(
            "POST",
            &path,
            Some(&json!({"reason": "maintenance window"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], json!(lease.to_string()));
    match client.next_notice(STEP).await {
        Some(Message::Revoked(r)) => {
            assert_eq!(r.lease, lease);
            assert_eq!(r.reason, RevokeReason::Operator);
            assert_eq!(r.text.as_deref(), Some("maintenance window"));
        }
        other => panic!("expected a Revoked notice, got {other:?}"),
    }
    assert!(client.list().await.leases.is_empty());
    // Only the owner hears of it, and the other host's lease is untouched.
    assert!(
        bystander
            .next_notice(Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(bystander.list().await.leases.len(), 1);
    // Revoking again: not found. A malformed id: bad request.
    let (status, _) = gw.admin("POST", &path, Some(&json!({}))).await;
    assert_eq!(status, 404);
    let (status, _) = gw
        .admin("POST", "/v1/leases/not-a-lease/revoke", Some(&json!({})))
        .await;
    assert_eq!(status, 400);
    let records = gw
        .wait_audit(&[AuditKind::Revocation], Some(lease), |r| !r.is_empty())
        .await;
    assert_eq!(records[0].event.outcome, Some(Outcome::Revoked));
    assert_eq!(records[0].event.actor.as_deref(), Some("operator"));
    assert_eq!(
        records[0].event.reason.as_deref(),
        Some("maintenance window")
    );
    let _ = other;
}

#[tokio::test]
async fn notices_go_only_to_hosts_that_asked_for_them() {
    let gw = TestGateway::start("no-notices", POLICY).await;
    let client = gw.host("web-01", &[HOST_A]).await;
    let caps = Capabilities::ALL & !Capabilities::NOTICES;
    assert!(matches!(
        client.request(&hello_msg(Some(1), &[1], caps)).await,
        Message::Welcome(_)
    ));
    let lease = granted(client.open(tcp(7001), None).await).lease;
    // A second connection of the same host that did not even say Hello.
    let silent = gw.host("web-01", &[HOST_A]).await;
    let (status, body) = gw
        .admin(
            "POST",
            &format!("/v1/leases/{lease}/revoke"),
            Some(&json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        client
            .next_notice(Duration::from_millis(500))
            .await
            .is_none(),
        "a host without the NOTICES capability was sent a notice"
    );
    assert!(
        silent
            .next_notice(Duration::from_millis(100))
            .await
            .is_none(),
        "a connection without Welcome was sent a notice"
    );
}

#[tokio::test]
async fn the_gateways_timer_expires_leases_and_the_audit_tells_every_ending_apart() {
    let gw = TestGateway::start("expiry", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;

    let short = granted(client.open(tcp(7001), Some(2)).await);
    assert_eq!(short.lifetime, 2);
    assert_eq!(short.renew_after, 1);
    let released = granted(client.open(tcp(7002), None).await).lease;
    let revoked = granted(client.open(tcp(7003), None).await).lease;
    granted(client.renew(released, Some(120)).await);
    assert!(matches!(
        client.release(released).await,
        Message::Released(_)
    ));
    let (status, _) = gw
        .admin(
            "POST",
            &format!("/v1/leases/{revoked}/revoke"),
            Some(&json!({"reason": "test"})),
        )
        .await;
    assert_eq!(status, 200);

    // The gateway's own timer ends the short lease: no request is needed.
    let expired = gw
        .wait_audit(&[AuditKind::Expiry], Some(short.lease), |r| !r.is_empty())
        .await;
    let ended_at = expired[0].event.time_ms;
    assert!(
        ended_at >= short.expires_ms,
        "expired at {ended_at}, before its expiry {}",
        short.expires_ms
    );
    assert!(
        ended_at < short.expires_ms + 2_000,
        "expired late: {ended_at} vs {}",
        short.expires_ms
    );
    assert_eq!(expired[0].event.outcome, Some(Outcome::Expired));
    let record = gw
        .service
        .store()
        .lease(short.lease)
        .expect("query")
        .expect("stored");
    assert_eq!(record.state, LeaseState::Expired);
    assert!(client.list().await.leases.is_empty());
    assert_eq!(
        denied(client.renew(short.lease, None).await).code,
        ResultCode::UnknownLease
    );

    // Every ending is its own outcome in the audit trail, also through the admin API.
    let outcome_of = |lease: fwnp_proto::LeaseId, kind: AuditKind| {
        gw.audit(&[kind], Some(lease))
            .iter()
            .filter_map(|r| r.event.outcome)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        outcome_of(released, AuditKind::Grant),
        vec![Outcome::Granted]
    );
    assert_eq!(
        outcome_of(released, AuditKind::Renewal),
        vec![Outcome::Renewed]
    );
    assert_eq!(
        outcome_of(released, AuditKind::Release),
        vec![Outcome::Released]
    );
    assert_eq!(
        outcome_of(revoked, AuditKind::Revocation),
        vec![Outcome::Revoked]
    );
    assert_eq!(
        outcome_of(short.lease, AuditKind::Expiry),
        vec![Outcome::Expired]
    );
    for outcome in ["granted", "renewed", "released", "expired", "revoked"] {
        let (status, body) = gw
            .admin(
                "GET",
                &format!("/v1/audit?outcome={outcome}&host=fwnp://host/web-01"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let events = body["events"].as_array().expect("events");
        assert!(!events.is_empty(), "no {outcome} event: {body}");
        assert!(
            events.iter().all(|e| e["outcome"] == json!(outcome)),
            "{body}"
        );
    }
    let ended: Vec<_> = gw
        .service
        .store()
        .leases(&LeaseFilter {
            include_ended: true,
            ..LeaseFilter::default()
        })
        .expect("leases")
        .into_iter()
        .map(|l| (l.id, l.state))
        .collect();
    assert!(
        ended.contains(&(released, LeaseState::Released)),
        "{ended:?}"
    );
    assert!(ended.contains(&(revoked, LeaseState::Revoked)), "{ended:?}");
    assert!(
        ended.contains(&(short.lease, LeaseState::Expired)),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_renewed_lease_does_not_expire_at_its_first_expiry() {
    let gw = TestGateway::start("renew-expiry", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let g = granted(client.open(tcp(7001), Some(2)).await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    granted(client.renew(g.lease, Some(30)).await);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        client.list().await.leases.len(),
        1,
        "the renewal moved the expiry"
    );
    assert!(gw.audit(&[AuditKind::Expiry], Some(g.lease)).is_empty());
    // And a second short lease opened after the long one still expires on time.
    let later = granted(client.open(tcp(7002), Some(1)).await);
    gw.wait_audit(&[AuditKind::Expiry], Some(later.lease), |r| !r.is_empty())
        .await;
}

#[tokio::test]
async fn refused_connections_are_audited_as_authentication_failures() {
    let gw = TestGateway::start("auth", POLICY).await;
    let other = Pki::new("stranger");

    // A certificate from another CA (which trusts our gateway, so the refusal is the gateway's).
    let mut stranger = other.host("stranger", &[], &[], &[]);
    stranger.ca = gw.pki.file("ca.pem");
    assert!(
        Client::try_connect(gw.addr, &stranger).await.is_err(),
        "another CA's host was accepted"
    );

    // An expired certificate.
    let expired = gw.pki.expired_host("old-host");
    assert!(
        Client::try_connect(gw.addr, &expired).await.is_err(),
        "an expired certificate was accepted"
    );

    // A revoked certificate, once the endpoint has the new CRL.
    let doomed: ClientTlsFiles = gw.pki.host("doomed", &[HOST_A], &[], &[]);
    pki::revoke(gw.pki.path(), &doomed.cert, RevocationReason::KeyCompromise).expect("revoke");
    fwnp_trust::tls::reload_server_config(
        &gw.endpoint,
        &gw.pki.server_files(),
        &ServerOptions::default(),
    )
    .expect("reload the CRL");
    assert!(
        Client::try_connect(gw.addr, &doomed).await.is_err(),
        "a revoked certificate was accepted"
    );

    let failures = gw
        .wait_audit(&[AuditKind::AuthFailure], None, |r| r.len() >= 3)
        .await;
    for failure in &failures {
        assert_eq!(failure.event.outcome, Some(Outcome::Error));
        let peer = failure.event.peer.expect("the peer address is recorded");
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(failure.event.reason.is_some());
    }
    let reasons: Vec<String> = failures
        .iter()
        .filter_map(|f| f.event.reason.clone())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("UnknownIssuer") || r.contains("unknown")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.to_lowercase().contains("expired")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("Revoked") || r.contains("revoked")),
        "{reasons:?}"
    );

    // A good host still gets in.
    gw.welcomed_host("web-01", &[HOST_A]).await;
}

/// Counts the WARN events logged while it is the thread's subscriber (the tests' runtime runs
/// every task on the test's thread).
#[derive(Clone, Default)]
struct WarnCounter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarnCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl WarnCounter {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `attempts` handshakes from 127.0.0.1 with a certificate of another CA, `parallel` at a time;
/// returns how many the gateway refused before TLS (the client sees ConnectionRefused).
async fn failing_handshakes(gw: &TestGateway, attempts: usize, parallel: usize) -> usize {
    let other = Pki::new("flood-stranger");
    let mut stranger = other.host("stranger", &[], &[], &[]);
    stranger.ca = gw.pki.file("ca.pem");
    let config = fwnp_trust::tls::client_config_from_files(&stranger, &Default::default())
        .expect("client TLS config");
    let endpoint = quinn::Endpoint::client(std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind client");
    let mut refused = 0;
    let mut done = 0;
    while done < attempts {
        let batch = parallel.min(attempts - done);
        let results = futures_join_all((0..batch).map(|_| {
            let connecting = endpoint
                .connect_with(config.clone(), gw.addr, GATEWAY_NAME)
                .expect("connect");
            async move {
                match tokio::time::timeout(STEP, connecting).await {
                    Ok(Ok(connection)) => {
                        // TLS 1.3: the client may finish before the gateway judged it.
                        tokio::time::timeout(STEP, connection.closed())
                            .await
                            .expect("refusal in time")
                    }
                    Ok(Err(e)) => e,
                    Err(_) => panic!("a handshake neither finished nor failed in time"),
                }
            }
        }))
        .await;
        refused += results
            .iter()
            .filter(|e| {
                matches!(e, quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
            })
            .count();
        done += batch;
    }
    endpoint.close(0u32.into(), b"");
    refused
}

#[tokio::test]
async fn a_flood_of_failed_handshakes_makes_a_bounded_audit_and_log_with_counts() {
    let warnings = WarnCounter::default();
    let _log = tracing::subscriber::set_default(tracing_subscriber::layer::SubscriberExt::with(
        tracing_subscriber::registry(),
        warnings.clone(),
    ));
    let options = GatewayOptions {
        // Every attempt reaches TLS and fails there.
        handshakes_per_source: Some((100_000, 100_000)),
        audit_count_interval: Some(Duration::from_secs(1)),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("auth-flood", POLICY, options).await;
    let attempts = 300;
    let started = std::time::Instant::now();
    assert_eq!(failing_handshakes(&gw, attempts, 20).await, 0);
    let windows = started.elapsed().as_secs() + 2;
    // The first failure of each interval at once, the others as one count when it ends.
    let accounted = |records: &[fwnp_gateway::store::AuditRecord]| -> u64 {
        records
            .iter()
            .map(|r| {
                let reason = r.event.reason.as_deref().unwrap_or("");
                if reason.contains(" more failed authentications") {
                    reason
                        .split(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0)
                } else {
                    1
                }
            })
            .sum()
    };
    let records = gw
        .wait_audit(&[AuditKind::AuthFailure], None, |r| {
            accounted(r) >= attempts as u64
        })
        .await;
    assert_eq!(accounted(&records), attempts as u64);
    assert!(
        records.len() as u64 <= 2 * windows,
        "{} audit records for one flood over at most {windows} intervals",
        records.len()
    );
    for record in &records {
        assert_eq!(
            record.event.peer.map(|p| p.ip()),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }
    assert!(
        warnings.count() as u64 <= 2 * windows,
        "{} warnings logged for one flood",
        warnings.count()
    );
    // A good host is still served.
    gw.welcomed_host("web-01", &[HOST_A]).await;
}

#[tokio::test]
async fn a_handshake_flood_from_one_source_does_not_keep_a_good_host_out() {
    let options = GatewayOptions {
        handshakes_per_source: Some((5, 10)),
        audit_count_interval: Some(Duration::from_secs(1)),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("handshake-flood", POLICY, options).await;
    let good = gw.pki.host("web-01", &[HOST_A], &[], &[]);
    let started = std::time::Instant::now();
    let flood = async {
        let refused = failing_handshakes(&gw, 300, 30).await;
        (refused, started.elapsed())
    };
    let host = async {
        // From another source address, in the middle of the flood.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let socket =
            std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).expect("bind 127.0.0.2");
        let client = Client::connect_from_socket(socket, gw.addr, &good)
            .await
            .expect("the good host is accepted during the flood");
        client.hello().await
    };
    let ((refused, flood_time), welcome) = tokio::join!(flood, host);
    assert_eq!(welcome.identity, "fwnp://host/web-01");
    // Beyond the burst (and what a second replenishes), the flood is refused before any TLS.
    assert!(
        refused >= 250,
        "only {refused} of 300 handshakes were refused"
    );
    let refusals = gw
        .wait_audit(&[AuditKind::AuthFailure], None, |r| {
            r.iter().any(|r| {
                r.event
                    .reason
                    .as_deref()
                    .is_some_and(|t| t.contains("more handshakes refused"))
            })
        })
        .await;
    let refusals: Vec<_> = refusals
        .iter()
        .filter(|r| {
            r.event
                .reason
                .as_deref()
                .is_some_and(|t| t.contains("refused"))
        })
        .collect();
    // One record per counting interval (1 s) that saw refusals, not one per handshake: a flood
    // that a busy machine stretches over several seconds gets a few more.
    let intervals = flood_time.as_secs() as usize + 2;
    assert!(
        refusals.len() <= intervals.max(3),
        "{} records of refused handshakes in a flood of {flood_time:?}",
        refusals.len()
    );
}

#[tokio::test]
async fn under_load_a_new_source_must_prove_its_address_with_a_retry_first() {
    let options = GatewayOptions {
        // Every handshake counts as "under load".
        retry_above_handshakes: Some(0),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("retry", POLICY, options).await;
    let (client, welcome) = gw.welcomed_host("web-01", &[HOST_A]).await;
    assert_eq!(welcome.identity, "fwnp://host/web-01");
    granted(client.open(tcp(7001), None).await);
    let metrics = gw.service.render_metrics();
    assert!(
        metrics.contains("fwnp_requests_total{outcome=\"handshake-retry\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn lists_are_recorded_once_per_interval_with_a_count() {
    let options = GatewayOptions {
        audit_count_interval: Some(Duration::from_secs(1)),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("list-audit", POLICY, options).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    for _ in 0..50 {
        client.list().await;
    }
    let records = gw
        .wait_audit(&[AuditKind::Request], None, |r| {
            r.iter().any(|r| {
                r.event
                    .reason
                    .as_deref()
                    .is_some_and(|t| t.contains("more"))
            })
        })
        .await;
    let reasons: Vec<_> = records
        .iter()
        .filter_map(|r| r.event.reason.clone())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0], "list");
    assert!(reasons[1].starts_with("list: 49 more"), "{reasons:?}");
    assert!(
        records
            .iter()
            .all(|r| r.event.identity.as_deref() == Some("fwnp://host/web-01"))
    );
}

#[tokio::test]
async fn a_certificate_naming_no_identity_is_rate_limited_by_its_address() {
    let policy = format!("{POLICY}\n[rate_limit]\nrequests_per_second = 1\nburst = 3\n");
    let gw = TestGateway::start("nameless-rate", &policy).await;
    let client = Client::connect(gw.addr, &nameless_certificate(&gw)).await;
    let hello = hello_msg(Some(1), &[1], Capabilities::ALL);
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(denied(client.request(&hello).await).code);
    }
    assert_eq!(&codes[..3], &[ResultCode::NotAuthorized; 3], "{codes:?}");
    assert!(
        codes[3..].iter().all(|c| *c == ResultCode::RateLimited),
        "{codes:?}"
    );
    // A named host has a budget of its own.
    gw.welcomed_host("web-01", &[HOST_A]).await;
}

/// How the gateway closed a connection: the application error code and the reason text.
fn application_close(error: &quinn::ConnectionError) -> Option<(u64, String)> {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Some((
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        _ => None,
    }
}

/// A handshake in flight during a CRL reload was verified under the old CRL; if its connection
/// is registered after the reload has looked at the live ones, the reloaded CRL must still end
/// it. The test endpoint is left out of the reload, so that every handshake is verified under
/// the old CRL, as that one was.
#[tokio::test]
async fn a_connection_verified_under_the_crl_before_a_reload_is_checked_against_the_new_one() {
    let gw = TestGateway::start("crl-late", POLICY).await;
    let files = gw.pki.host("late", &[HOST_A], &[], &[]);
    pki::revoke(gw.pki.path(), &files.cert, RevocationReason::KeyCompromise).expect("revoke");
    let closed = gw.service.reload_tls().await.expect("reload");
    assert!(closed.is_empty(), "nobody was connected: {closed:?}");

    let refused = match Client::try_connect(gw.addr, &files).await {
        Ok(client) => client.closed_within(STEP).await,
        Err(e) => Some(e),
    };
    let refused = refused.expect("the connection of a revoked certificate went on");
    assert_eq!(
        application_close(&refused),
        Some((
            u64::from(QuicErrorCode::NoError.code()),
            "certificate revoked".to_owned()
        )),
        "not closed by the check of the reloaded CRL: {refused:?}"
    );
    let failures = gw
        .wait_audit(&[AuditKind::AuthFailure], None, |r| !r.is_empty())
        .await;
    assert_eq!(failures.len(), 1);
    assert_eq!(
        failures[0].event.identity.as_deref(),
        Some("fwnp://host/late")
    );
    assert!(gw.service.sessions.of("fwnp://host/late").is_empty());
}

#[tokio::test]
async fn a_crl_reload_revokes_the_leases_of_a_revoked_certificate_and_closes_its_connection() {
    let gw = TestGateway::start("crl-live", POLICY).await;
    // As the daemon does, so that the reload re-reads the CRL for this endpoint too.
    gw.service.add_endpoint(gw.endpoint.clone());
    let doomed_files = gw.pki.host("doomed", &[HOST_A], &[], &[]);
    let doomed = Client::connect(gw.addr, &doomed_files).await;
    doomed.hello().await;
    let lease = granted(doomed.open(tcp(7001), None).await).lease;
    // A host with a good certificate, connected, which loses nothing, and one whose
    // certificate is revoked too but that is no longer connected: its lease is revoked all the
    // same (a stolen key must not keep what it opened by hanging up).
    let (bystander, _) = gw.welcomed_host("web-01", &[HOST_B]).await;
    let kept = granted(bystander.open(tcp(7002), None).await).lease;
    let offline_files = gw.pki.host("offline", &[v4(192, 0, 2, 30)], &[], &[]);
    let offline_lease = {
        let offline = Client::connect(gw.addr, &offline_files).await;
        offline.hello().await;
        granted(offline.open(tcp(7003), None).await).lease
    };
    let deadline = tokio::time::Instant::now() + STEP;
    while !gw.service.sessions.of("fwnp://host/offline").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never saw the offline host go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let revocation = pki::revoke(
        gw.pki.path(),
        &doomed_files.cert,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke");
    pki::revoke(
        gw.pki.path(),
        &offline_files.cert,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke");
    let closed = gw.service.reload_tls().await.expect("reload");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].host, "fwnp://host/doomed");
    assert_eq!(closed[0].serial, revocation.serial.as_str());
    assert_eq!(closed[0].leases_revoked, 1);

    // The host is told first, then the connection is closed with NoError.
    match doomed.next_notice(STEP).await {
        Some(Message::Revoked(r)) => {
            assert_eq!(r.lease, lease);
            assert_eq!(r.reason, RevokeReason::CredentialRevoked);
            let text = r.text.unwrap_or_default();
            assert!(text.contains(revocation.serial.as_str()), "{text}");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    let ended = doomed.closed_within(STEP).await.expect("closed");
    assert_eq!(
        application_close(&ended),
        Some((
            u64::from(QuicErrorCode::NoError.code()),
            "certificate revoked".to_owned()
        )),
        "{ended:?}"
    );

    // The lease is gone from the service and revoked in the store.
    let record = gw
        .service
        .store()
        .lease(lease)
        .expect("store")
        .expect("the lease is stored");
    assert_eq!(record.state, LeaseState::Revoked);
    assert_eq!(
        record.to_json(0)["revoke_reason"],
        json!("credential-revoked")
    );
    let live: HashSet<_> = gw
        .service
        .store()
        .live_leases()
        .expect("leases")
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(live, HashSet::from([kept]));
    assert_eq!(gw.service.status().live_leases, 1);
    let offline_record = gw
        .service
        .store()
        .lease(offline_lease)
        .expect("store")
        .expect("the offline host's lease is stored");
    assert_eq!(offline_record.state, LeaseState::Revoked);
    assert_eq!(
        offline_record.to_json(0)["revoke_reason"],
        json!("credential-revoked")
    );
    let revocations = gw.audit(&[AuditKind::Revocation], Some(lease));
    assert_eq!(revocations.len(), 1);
    assert_eq!(revocations[0].event.actor.as_deref(), Some("gateway"));
    let failures = gw
        .wait_audit(&[AuditKind::AuthFailure], None, |r| !r.is_empty())
        .await;
    assert_eq!(failures.len(), 1, "one record per closed connection");
    assert_eq!(
        failures[0].event.identity.as_deref(),
        Some("fwnp://host/doomed")
    );
    assert_eq!(failures[0].event.outcome, Some(Outcome::Revoked));
    assert!(
        failures[0]
            .event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(revocation.serial.as_str())),
        "{:?}",
        failures[0].event.reason
    );

    // A new handshake with the certificate is refused.
    assert!(
        Client::try_connect(gw.addr, &doomed_files).await.is_err(),
        "the revoked certificate was accepted again"
    );
    // The other host has noticed nothing.
    assert!(
        bystander
            .next_notice(Duration::from_millis(200))
            .await
            .is_none(),
        "the other host got a notice"
    );
    let listed: Vec<_> = bystander
        .list()
        .await
        .leases
        .iter()
        .map(|l| l.lease)
        .collect();
    assert_eq!(listed, vec![kept]);
}

#[tokio::test]
async fn a_crl_reload_revokes_the_leases_of_a_stolen_certificate_while_its_host_is_connected_under_a_new_one()
 {
    let gw = TestGateway::start(
        "crl-rolled",
        &POLICY.replace("max_leases = 3", "max_leases = 4"),
    )
    .await;
    gw.service.add_endpoint(gw.endpoint.clone());
    // The same identity under two certificates: a stolen one, used by a thief, and the one
    // the real host rolled to.
    let old_files = gw.pki.host("web-01", &[HOST_A], &[], &[]);
    let new_files = gw
        .pki
        .host("web-01-renewed", &[HOST_A], &["fwnp://host/web-01"], &[]);
    let thief = Client::connect(gw.addr, &old_files).await;
    assert_eq!(thief.hello().await.identity, "fwnp://host/web-01");
    let thiefs = granted(thief.open(tcp(7001), None).await).lease;
    // A lease of the stolen certificate whose connection is gone.
    let hung_up = Client::connect(gw.addr, &old_files).await;
    hung_up.hello().await;
    let left_behind = granted(hung_up.open(tcp(7003), None).await).lease;
    hung_up.connection.close(0u32.into(), b"bye");
    drop(hung_up);
    let host = Client::connect(gw.addr, &new_files).await;
    assert_eq!(host.hello().await.identity, "fwnp://host/web-01");
    let hosts = granted(host.open(tcp(7002), None).await).lease;
    // A lease the stolen certificate opened and the real host renewed since is the host's.
    let renewed = granted(thief.open(tcp(7004), None).await).lease;
    granted(host.renew(renewed, None).await);

    let revocation = pki::revoke(
        gw.pki.path(),
        &old_files.cert,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke");
    let closed = gw.service.reload_tls().await.expect("reload");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].serial, revocation.serial.as_str());
    assert_eq!(closed[0].leases_revoked, 2, "{closed:?}");

    // The thief's connection closes; both leases the stolen certificate last opened or renewed
    // are revoked, and the real host, connected under its new certificate, is told.
    let ended = thief.closed_within(STEP).await.expect("closed");
    assert_eq!(
        application_close(&ended),
        Some((
            u64::from(QuicErrorCode::NoError.code()),
            "certificate revoked".to_owned()
        )),
        "{ended:?}"
    );
    let mut notified = Vec::new();
    while let Some(notice) = host.next_notice(Duration::from_millis(500)).await {
        match notice {
            Message::Revoked(r) => {
                assert_eq!(r.reason, RevokeReason::CredentialRevoked, "{r:?}");
                notified.push(r.lease);
            }
            other => panic!("unexpected notice {other:?}"),
        }
    }
    notified.sort();
    let mut expected = vec![thiefs, left_behind];
    expected.sort();
    assert_eq!(notified, expected);
    let mut listed: Vec<_> = host.list().await.leases.iter().map(|l| l.lease).collect();
    listed.sort();
    let mut kept = vec![hosts, renewed];
    kept.sort();
    assert_eq!(listed, kept);
    assert_eq!(gw.service.store().live_lease_count().expect("count"), 2);
    let revocations = gw.audit(&[AuditKind::Revocation], None);
    let mut revoked: Vec<_> = revocations.iter().filter_map(|r| r.event.lease).collect();
    revoked.sort();
    assert_eq!(revoked, expected);
    let failures = gw
        .wait_audit(&[AuditKind::AuthFailure], None, |r| !r.is_empty())
        .await;
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0]
            .event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(revocation.serial.as_str())),
        "{:?}",
        failures[0].event.reason
    );
    assert!(
        Client::try_connect(gw.addr, &old_files).await.is_err(),
        "the revoked certificate was accepted again"
    );
    // The new certificate still connects.
    Client::connect(gw.addr, &new_files).await.hello().await;
}

/// A certificate of the gateway's CA with neither URI nor DNS SAN, so naming no identity. Made
/// with rcgen directly: pki never issues one.
fn nameless_certificate(gw: &TestGateway) -> ClientTlsFiles {
    let ca_pem = std::fs::read_to_string(gw.pki.file("ca.pem")).expect("read ca");
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(gw.pki.file("ca.key")).expect("read key"),
    )
    .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(HOST_A)];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42, 0x02]));
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(gw.pki.file("nameless.pem"), certificate.pem()).expect("write cert");
    std::fs::write(gw.pki.file("nameless.key"), key.serialize_pem()).expect("write key");
    gw.pki.host_files("nameless")
}

/// A certificate of the gateway's CA with the given SANs, saved as host `name`. Made with rcgen
/// directly: pki issues none with a wildcard, an over-long URI or a DNS name ending in a dot.
fn certificate_with_sans(
    gw: &TestGateway,
    name: &str,
    sans: Vec<rcgen::SanType>,
) -> ClientTlsFiles {
    let ca_pem = std::fs::read_to_string(gw.pki.file("ca.pem")).expect("read ca");
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(gw.pki.file("ca.key")).expect("read key"),
    )
    .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(gw.pki.file(&format!("{name}.pem")), certificate.pem()).expect("write cert");
    std::fs::write(gw.pki.file(&format!("{name}.key")), key.serialize_pem()).expect("write key");
    gw.pki.host_files(name)
}

fn dns_san(name: &str) -> rcgen::SanType {
    rcgen::SanType::DnsName(name.try_into().expect("IA5 string"))
}

fn uri_san(uri: &str) -> rcgen::SanType {
    rcgen::SanType::URI(uri.try_into().expect("IA5 string"))
}

/// Hosts under `*.wild.example.org` (a pattern) may open tcp/7000-7999.
const WILD_POLICY: &str = r#"
[[group]]
name = "wild"
identities = ["*.wild.example.org"]

[[rule]]
name = "wild-web"
groups = ["wild"]
allow = "tcp/7000-7999"
"#;

#[tokio::test]
async fn a_wildcard_dns_san_names_no_identity_and_gets_nothing() {
    let gw = TestGateway::start("wildcard", WILD_POLICY).await;
    let files = certificate_with_sans(
        &gw,
        "wildcard",
        vec![
            dns_san("*.wild.example.org"),
            rcgen::SanType::IpAddress(HOST_A),
        ],
    );
    let client = Client::connect(gw.addr, &files).await;
    let d = denied(
        client
            .request(&hello_msg(Some(1), &[1], Capabilities::ALL))
            .await,
    );
    assert_eq!(d.code, ResultCode::NotAuthorized, "{d:?}");
    assert!(
        d.reason.as_deref().is_some_and(|r| r.contains("wildcard")),
        "{d:?}"
    );
    let d = denied(client.open(tcp(7001), None).await);
    assert_eq!(d.code, ResultCode::NotAuthorized, "{d:?}");
    assert!(gw.service.store().live_leases().expect("leases").is_empty());

    // A host the pattern really covers is served.
    let files = certificate_with_sans(
        &gw,
        "web-01",
        vec![
            dns_san("*.wild.example.org"),
            dns_san("web-01.wild.example.org"),
            rcgen::SanType::IpAddress(HOST_A),
        ],
    );
    let client = Client::connect(gw.addr, &files).await;
    assert_eq!(client.hello().await.identity, "web-01.wild.example.org");
    granted(client.open(tcp(7001), None).await);
}

#[tokio::test]
async fn an_identity_over_512_bytes_is_none_and_the_answer_stays_decodable() {
    let gw = TestGateway::start("long-identity", POLICY).await;
    let longest = format!("fwnp://host/{}", "a".repeat(500));
    assert_eq!(longest.len(), 512);
    let files = certificate_with_sans(&gw, "longest", vec![uri_san(&longest)]);
    let client = Client::connect(gw.addr, &files).await;
    assert_eq!(client.hello().await.identity, longest);

    let too_long = format!("{longest}a");
    let files = certificate_with_sans(
        &gw,
        "too-long",
        vec![uri_san(&too_long), dns_san("web-01.example.org")],
    );
    let client = Client::connect(gw.addr, &files).await;
    // `request` decodes the answer as a client does: a Welcome naming a 513-byte identity would
    // not decode.
    let d = denied(
        client
            .request(&hello_msg(Some(1), &[1], Capabilities::ALL))
            .await,
    );
    assert_eq!(d.code, ResultCode::NotAuthorized, "{d:?}");
    assert!(
        d.reason.as_deref().is_some_and(|r| r.contains("512")),
        "{d:?}"
    );
}

#[tokio::test]
async fn welcome_names_a_dns_identity_without_trailing_dot_and_each_address_once() {
    let gw = TestGateway::start("dns-dot", POLICY).await;
    let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped());
    let ip = rcgen::SanType::IpAddress;
    let files = certificate_with_sans(
        &gw,
        "dotted",
        vec![
            dns_san("Web-01.Example.ORG."),
            ip(HOST_B),
            ip(HOST_A),
            ip(mapped),
            ip(HOST_B),
        ],
    );
    let client = Client::connect(gw.addr, &files).await;
    let welcome = client.hello().await;
    assert_eq!(welcome.identity, "web-01.example.org");
    assert_eq!(welcome.addresses, vec![HOST_B, HOST_A]);
}

#[tokio::test]
async fn a_certificate_naming_no_identity_gets_not_authorized() {
    let gw = TestGateway::start("no-identity", POLICY).await;
    let client = Client::connect(gw.addr, &nameless_certificate(&gw)).await;
    let d = denied(
        client
            .request(&hello_msg(Some(1), &[1], Capabilities::ALL))
            .await,
    );
    assert_eq!(d.code, ResultCode::NotAuthorized, "{d:?}");
    let d = denied(client.open(tcp(7001), None).await);
    assert_eq!(d.code, ResultCode::NotAuthorized);
    assert!(gw.service.store().live_leases().expect("leases").is_empty());
    gw.wait_audit(&[AuditKind::AuthFailure], None, |r| !r.is_empty())
        .await;
}

#[tokio::test]
async fn a_policy_reload_judges_third_party_leases_by_the_hosts_own_addresses() {
    let gw = TestGateway::start("reload-third-party", POLICY).await;
    let (lb, _) = gw.welcomed_host("lb-01", &[HOST_B]).await;
    let pool = v4(203, 0, 113, 5);
    let mut opening = tcp(8080);
    opening.host = HostAddresses::One(pool);
    let third_party = granted(lb.open(opening, None).await).lease;
    let mut own = tcp(8081);
    own.host = HostAddresses::One(HOST_B);
    let own = granted(lb.open(own, None).await).lease;

    // The new policy still allows the ports, but no longer for addresses the host does not hold.
    write_policy(
        &gw.policy_path,
        &POLICY.replace(
            "third_party = true\nthird_party_addresses = [\"203.0.113.0/24\"]\n",
            "",
        ),
    );
    let result = gw.service.reload_policy().await.expect("reload");
    let revoked: Vec<_> = result.revoked.iter().map(|r| r.lease.clone()).collect();
    assert_eq!(
        revoked,
        vec![third_party.to_string()],
        "only the third-party lease loses its ground: {result:?}"
    );
    match lb.next_notice(STEP).await {
        Some(Message::Revoked(r)) => assert_eq!(r.lease, third_party),
        other => panic!("expected a Revoked notice, got {other:?}"),
    }
    let listed: Vec<_> = lb.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![own]);
}

#[tokio::test]
async fn a_renewal_that_shortens_a_lease_moves_the_expiry_timer() {
    let gw = TestGateway::start("shorten", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let lease = granted(client.open(tcp(7001), Some(600)).await).lease;
    let renewed = granted(client.renew(lease, Some(1)).await);
    assert_eq!(renewed.lifetime, 1);
    // The gateway's timer must end it about a second later, not ten minutes later.
    let records = gw
        .wait_audit(&[AuditKind::Expiry], Some(lease), |r| !r.is_empty())
        .await;
    assert!(records[0].event.time_ms >= renewed.expires_ms);
    let record = gw
        .service
        .store()
        .lease(lease)
        .expect("query")
        .expect("stored");
    assert_eq!(record.state, LeaseState::Expired);
}

#[tokio::test]
async fn connections_naming_no_identity_are_limited_per_address() {
    let options = GatewayOptions {
        max_connections_per_identity: Some(2),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("nameless-limit", POLICY, options).await;
    let files = nameless_certificate(&gw);
    let hello = hello_msg(Some(1), &[1], Capabilities::ALL);
    let first = Client::connect(gw.addr, &files).await;
    let second = Client::connect(gw.addr, &files).await;
    for client in [&first, &second] {
        assert_eq!(
            denied(client.request(&hello).await).code,
            ResultCode::NotAuthorized
        );
    }
    // A third from the same address is one too many...
    let closed = match Client::try_connect(gw.addr, &files).await {
        Err(e) => e,
        Ok(third) => third
            .closed_within(STEP)
            .await
            .expect("the third connection is closed"),
    };
    assert_eq!(
        application_close_code(&closed),
        Some(u64::from(QuicErrorCode::ExcessiveLoad.code())),
        "{closed:?}"
    );
    // ...but another address with a nameless certificate is still told why it cannot be served.
    let socket =
        std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).expect("bind 127.0.0.2");
    let other = Client::connect_from_socket(socket, gw.addr, &files)
        .await
        .expect("a connection from another address is accepted");
    assert_eq!(
        denied(other.request(&hello).await).code,
        ResultCode::NotAuthorized
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_per_identity_are_closed_with_excessive_load() {
    let options = GatewayOptions {
        max_connections_per_identity: Some(2),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("conn-limit", POLICY, options).await;
    let (first, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let (_second, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let closed = match Client::try_connect(gw.addr, &gw.pki.host_files("web-01")).await {
        Err(e) => e,
        Ok(third) => third
            .closed_within(STEP)
            .await
            .expect("the third connection is closed"),
    };
    assert_eq!(
        application_close_code(&closed),
        Some(u64::from(QuicErrorCode::ExcessiveLoad.code())),
        "{closed:?}"
    );
    // Another identity is not affected, and the first connections still work.
    gw.welcomed_host("web-02", &[HOST_B]).await;
    first.list().await;
    // Once one closes, the identity may connect again.
    drop(first);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok(again) = Client::try_connect(gw.addr, &gw.pki.host_files("web-01")).await {
            again.hello().await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed slot never became usable"
        );
    }
}

#[tokio::test]
async fn a_request_not_finished_in_time_is_reset_with_request_timeout() {
    let options = GatewayOptions {
        request_timeout: Some(Duration::from_secs(1)),
        ..GatewayOptions::default()
    };
    let gw = TestGateway::start_with("req-timeout", POLICY, options).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let (mut send, mut recv) = client.connection.open_bi().await.expect("open a stream");
    // Half a request and no FIN.
    send.write_all(&[0xa2, 0x00]).await.expect("write");
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(STEP, recv.read_to_end(MAX_MESSAGE_SIZE))
        .await
        .expect("the gateway gave up in time");
    match outcome {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(
                code.into_inner(),
                u64::from(QuicErrorCode::RequestTimeout.code())
            )
        }
        other => panic!("expected a reset with RequestTimeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The connection lives on.
    client.list().await;
}

#[tokio::test]
async fn a_connection_without_hello_is_closed_after_ten_seconds() {
    let gw = TestGateway::start("hello-timeout", POLICY).await;
    let client = gw.host("web-01", &[HOST_A]).await;
    let started = std::time::Instant::now();
    let closed = client
        .closed_within(Duration::from_secs(15))
        .await
        .expect("closed");
    assert_eq!(
        application_close_code(&closed),
        Some(u64::from(QuicErrorCode::RequestTimeout.code())),
        "{closed:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "closed too early: {:?}",
        started.elapsed()
    );
    // A host that said Hello is not closed by that timer.
    let (welcomed, _) = gw.welcomed_host("web-02", &[HOST_B]).await;
    assert!(
        welcomed
            .closed_within(Duration::from_millis(100))
            .await
            .is_none()
    );
}

fn app_info(n: usize) -> fwnp_proto::AppInfo {
    fwnp_proto::AppInfo {
        name: Some(format!("{n:0>200}")),
        executable: Some(format!("/opt/{}", "x".repeat(1000))),
        uid: Some(1000),
        pid: Some(4000 + n as u32),
    }
}

#[tokio::test]
async fn a_list_that_would_exceed_the_size_limit_drops_application_information() {
    let policy = POLICY.replace("max_leases = 3", "max_leases = 40");
    let gw = TestGateway::start("big-list", &policy).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let count = 20;
    for n in 0..count {
        let mut open = open_msg(client.next_id(), tcp(7000 + n as u16), None);
        if let Message::Open(o) = &mut open {
            o.app = Some(app_info(n));
        }
        granted(client.request(&open).await);
    }
    // The application information is in the audit trail...
    let grants = gw.audit(&[AuditKind::Grant], None);
    assert_eq!(grants.len(), count);
    assert!(
        grants
            .iter()
            .all(|g| g.event.app.as_ref().and_then(|a| a.uid) == Some(1000))
    );
    // ...and List answers within the limit, with every lease (spec section 5.4: no partial
    // list; application information is left out as needed).
    let bytes = fwnp_proto::codec::encode(&Message::List(fwnp_proto::List {
        common: common(Some(1)),
    }));
    match client.exchange(&bytes).await {
        Exchange::Answer(answer) => {
            assert!(answer.len() <= MAX_MESSAGE_SIZE, "{} bytes", answer.len());
            match fwnp_proto::codec::decode(&answer).expect("decodes") {
                Message::Leases(leases) => {
                    assert_eq!(leases.leases.len(), count);
                    assert!(
                        leases.leases.iter().any(|l| l.app.is_some()),
                        "as much as fits is kept"
                    );
                }
                other => panic!("expected Leases, got {other:?}"),
            }
        }
        other => panic!("no usable answer: {other:?}"),
    }
}

/// What a daemon needs, in a fresh directory: a CA, the test policy, and a configuration for a
/// gateway on a free port of 127.0.0.1 with its filter disabled.
struct DaemonFiles {
    pki: Pki,
    dir: TempDir,
    addr: std::net::SocketAddr,
    config: std::path::PathBuf,
    admin_socket: std::path::PathBuf,
}

impl DaemonFiles {
    fn new(label: &str) -> DaemonFiles {
        let pki = Pki::new(label);
        let dir = temp_dir(label);
        write_policy(&dir.path().join("policy.toml"), POLICY);
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port");
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            config_text(
                &pki,
                dir.path(),
                &addr.to_string(),
                "[filter]\nenabled = false",
            ),
        )
        .expect("write config");
        let admin_socket = dir.path().join("admin.sock");
        DaemonFiles {
            pki,
            dir,
            addr,
            config,
            admin_socket,
        }
    }
}

/// Starts `fwnp-gateway --config CONFIG` and waits until its admin socket answers.
fn start_daemon(config: &std::path::Path, admin_socket: &std::path::Path) -> ProcessGuard {
    let mut daemon = ProcessGuard::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_fwnp-gateway"))
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
    )
    .expect("start fwnp-gateway");
    tokio::task::block_in_place(|| wait_for_socket(&mut daemon, admin_socket, STEP));
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reloads_on_sighup_and_says_going_away_on_sigterm() {
    let DaemonFiles {
        pki,
        dir,
        addr: gateway_addr,
        config,
        admin_socket,
    } = DaemonFiles::new("daemon");
    let mut daemon = start_daemon(&config, &admin_socket);
    let files = pki.host("web-01", &[HOST_A], &[], &[]);
    let client = Client::connect(gateway_addr, &files).await;
    client.hello().await;
    let kept = granted(client.open(tcp(7001), None).await).lease;
    let doomed = granted(client.open(port(Protocol::Udp, 7001), None).await).lease;

    // SIGHUP reloads the policy and revokes what it no longer allows.
    write_policy(&dir.path().join("policy.toml"), &policy_without_udp());
    daemon.signal("HUP");
    match client.next_notice(STEP).await {
        Some(Message::Revoked(r)) => {
            assert_eq!(r.lease, doomed);
            assert_eq!(r.reason, RevokeReason::PolicyChanged);
        }
        other => panic!("expected a Revoked notice after SIGHUP, got {other:?}"),
    }
    let listed: Vec<_> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(listed, vec![kept]);

    // SIGHUP also re-reads the CRL: a revoked host is refused from then on.
    let doomed = pki.host("doomed", &[HOST_B], &[], &[]);
    Client::connect(gateway_addr, &doomed).await.hello().await;
    pki::revoke(pki.path(), &doomed.cert, RevocationReason::KeyCompromise).expect("revoke");
    daemon.signal("HUP");
    let deadline = std::time::Instant::now() + STEP;
    while Client::try_connect(gateway_addr, &doomed).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked host is still accepted after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // So does the admin API's reload, as the example configuration says.
    let doomed_too = pki.host("doomed-too", &[HOST_B], &[], &[]);
    Client::connect(gateway_addr, &doomed_too)
        .await
        .hello()
        .await;
    pki::revoke(
        pki.path(),
        &doomed_too.cert,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke");
    let (status, body) = admin_request(&admin_socket, "POST", "/v1/policy/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        Client::try_connect(gateway_addr, &doomed_too)
            .await
            .is_err(),
        "the revoked host is still accepted after the admin API's reload"
    );

    // SIGTERM: GoingAway, then the connection closes with GoingAway, and the daemon exits 0.
    daemon.signal("TERM");
    match client.next_notice(STEP).await {
        Some(Message::GoingAway(g)) => assert!(g.reconnect_after.is_some(), "{g:?}"),
        other => panic!("expected GoingAway, got {other:?}"),
    }
    let closed = client.closed_within(STEP).await.expect("closed");
    assert_eq!(
        application_close_code(&closed),
        Some(u64::from(QuicErrorCode::GoingAway.code())),
        "{closed:?}"
    );
    let status = tokio::task::block_in_place(|| daemon.wait_exit(STEP)).expect("the daemon exits");
    assert!(status.success(), "{status}");
    assert!(!admin_socket.exists(), "the admin socket is removed");

    // The lease outlives the daemon: the store still holds it as live.
    let store = fwnp_gateway::store::Store::open(dir.path().join("state")).expect("open the store");
    let live: Vec<_> = store
        .live_leases()
        .expect("leases")
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(live, vec![kept]);
}

#[tokio::test]
async fn concurrent_identical_opens_make_one_lease_and_the_quota_holds_under_concurrency() {
    let gw = TestGateway::start("concurrent", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let same = (0..10).map(|_| client.open(tcp(7001), None));
    let answers = futures_join_all(same).await;
    let ids: HashSet<_> = answers.into_iter().map(|a| granted(a).lease).collect();
    assert_eq!(
        ids.len(),
        1,
        "identical concurrent Opens made several leases: {ids:?}"
    );
    // Eight different ports at once with a quota of 3 (one already held): exactly 2 more.
    let different = (0..8).map(|n| client.open(tcp(7100 + n), None));
    let answers = futures_join_all(different).await;
    let granted_count = answers
        .iter()
        .filter(|a| matches!(a, Message::Granted(_)))
        .count();
    let quota = answers
        .iter()
        .filter(|a| matches!(a, Message::Denied(d) if d.code == ResultCode::QuotaExceeded))
        .count();
    assert_eq!((granted_count, quota), (2, 6), "{answers:?}");
    assert_eq!(gw.service.store().live_leases().expect("leases").len(), 3);
}

/// Runs the futures concurrently on this task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

#[tokio::test]
async fn a_rule_with_remote_prefixes_narrows_an_open_that_names_none() {
    let policy = POLICY.replace(
        "[[rule]]\nname = \"hosts-web\"",
        "[[rule]]\nname = \"admin-ssh\"\ngroups = [\"hosts\"]\nallow = \"tcp/22\"\nfrom = [\"198.51.100.0/24\"]\n\n[[rule]]\nname = \"hosts-web\"",
    );
    let gw = TestGateway::start("narrow", &policy).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let g = granted(client.open(tcp(22), None).await);
    assert!(g.narrowed);
    let from = fwnp_proto::Prefix {
        addr: v4(198, 51, 100, 0),
        len: 24,
    };
    assert_eq!(g.grants[0].remotes, vec![from]);
    // Asking within the rule's prefixes keeps what was asked, and is not narrowed.
    let mut within = tcp(22);
    within.remotes = vec![fwnp_proto::Prefix {
        addr: v4(198, 51, 100, 128),
        len: 25,
    }];
    let g2 = granted(client.open(within.clone(), None).await);
    assert!(!g2.narrowed);
    assert_eq!(g2.grants[0].remotes, within.remotes);
    assert_ne!(g2.lease, g.lease, "other remotes are another opening");
    // Outside them: denied.
    let mut outside = tcp(22);
    outside.remotes = vec![fwnp_proto::Prefix {
        addr: v4(192, 0, 2, 0),
        len: 24,
    }];
    assert_eq!(
        denied(client.open(outside, None).await).code,
        ResultCode::DeniedByPolicy
    );
}

#[tokio::test]
async fn the_transport_allows_the_request_streams_welcome_announces() {
    let gw = TestGateway::start("streams", POLICY).await;
    let (client, welcome) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let limit = welcome.limits.max_streams as usize;
    // Open unfinished request streams until the transport refuses one. The Hello stream's
    // credit comes back only in quinn's batched MAX_STREAMS updates (every 1/8 of the window),
    // so at least the limit less that batch and the Hello stream is available, never more
    // than the limit.
    let mut held = Vec::new();
    while held.len() <= limit {
        match tokio::time::timeout(Duration::from_millis(500), client.connection.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                send.write_all(&[0xa1]).await.expect("write");
                held.push((send, recv));
            }
            Ok(Err(e)) => panic!("connection lost: {e}"),
            Err(_) => break,
        }
    }
    assert!(
        held.len() <= limit,
        "the transport allows more streams than Welcome announced ({limit})"
    );
    assert!(
        held.len() + 1 + limit / 8 >= limit,
        "only {} of {limit} streams",
        held.len()
    );
    drop(held);
}

#[tokio::test]
async fn a_renewal_revokes_a_lease_the_current_policy_no_longer_allows() {
    let gw = TestGateway::start("renew-revoke", POLICY).await;
    let pool = v4(203, 0, 113, 9);
    let lease = {
        let (lb, _) = gw.welcomed_host("lb-01", &[HOST_B]).await;
        let mut opening = tcp(8080);
        opening.host = HostAddresses::One(pool);
        granted(lb.open(opening, None).await).lease
    };
    // The balancer is offline when the policy takes its third-party rights away.
    let deadline = tokio::time::Instant::now() + STEP;
    while gw.service.sessions.count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write_policy(
        &gw.policy_path,
        &POLICY.replace(
            "third_party = true\nthird_party_addresses = [\"203.0.113.0/24\"]\n",
            "",
        ),
    );
    gw.service.reload_policy().await.expect("reload");
    // At its next Renew the gateway judges it with the host's real addresses.
    let (lb, _) = gw.welcomed_host("lb-01", &[HOST_B]).await;
    // (With the host offline the reload could not know the host's addresses, so the lease
    // was kept; the kernel element still ends at its expiry.)
    assert!(
        lb.list().await.leases.iter().any(|l| l.lease == lease),
        "kept until the host is seen"
    );
    let d = denied(lb.renew(lease, None).await);
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
    assert_eq!(d.lease, Some(lease));
    match lb.next_notice(STEP).await {
        Some(Message::Revoked(r)) => {
            assert_eq!(r.lease, lease);
            assert_eq!(r.reason, RevokeReason::PolicyChanged);
        }
        other => panic!("expected a Revoked notice, got {other:?}"),
    }
    assert!(lb.list().await.leases.is_empty(), "the lease is gone");
    let record = gw
        .service
        .store()
        .lease(lease)
        .expect("query")
        .expect("stored");
    assert_eq!(record.state, LeaseState::Revoked);
    assert_eq!(
        denied(lb.renew(lease, None).await).code,
        ResultCode::UnknownLease
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_a_changed_policy_revokes_what_it_no_longer_allows() {
    let DaemonFiles {
        pki,
        dir,
        addr: gateway_addr,
        config,
        admin_socket,
    } = DaemonFiles::new("restart-policy");
    let policy = dir.path().join("policy.toml");
    let files = pki.host("web-01", &[HOST_A], &[], &[]);

    let mut daemon = start_daemon(&config, &admin_socket);
    let (kept, doomed) = {
        let client = Client::connect(gateway_addr, &files).await;
        client.hello().await;
        let kept = granted(client.open(tcp(7001), None).await).lease;
        let doomed = granted(client.open(port(Protocol::Udp, 7001), None).await).lease;
        (kept, doomed)
    };
    daemon.signal("TERM");
    tokio::task::block_in_place(|| daemon.wait_exit(STEP)).expect("the daemon stops");

    // The operator changes the policy while the gateway is down, then starts it.
    write_policy(&policy, &policy_without_udp());
    let _daemon = start_daemon(&config, &admin_socket);
    let client = Client::connect(gateway_addr, &files).await;
    client.hello().await;
    let listed: Vec<_> = client.list().await.leases.iter().map(|l| l.lease).collect();
    assert_eq!(
        listed,
        vec![kept],
        "a lease the policy no longer allows survived the restart"
    );
    let (status, body) =
        admin_request(&admin_socket, "GET", "/v1/audit?outcome=revoked", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["lease"] == json!(doomed.to_string()))),
        "no revocation recorded: {body}"
    );
}

/// The certificate each lease was last opened or renewed with is stored with it: a CRL that
/// lists it, whether found at the next start or reloaded after it, revokes the lease of a host
/// that is not connected, as it would have before the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_certificate_revoked_across_a_restart_are_revoked() {
    let DaemonFiles {
        pki,
        dir: _dir,
        addr: gateway_addr,
        config,
        admin_socket,
    } = DaemonFiles::new("restart-crl");
    // Revoked while the gateway is stopped; revoked after it started again; never revoked.
    let stolen = pki.host("stolen", &[HOST_A], &[], &[]);
    let lost = pki.host("lost", &[HOST_B], &[], &[]);
    let good = pki.host("good", &[v4(192, 0, 2, 30)], &[], &[]);

    let mut daemon = start_daemon(&config, &admin_socket);
    let mut leases = Vec::new();
    for files in [&stolen, &lost, &good] {
        let client = Client::connect(gateway_addr, files).await;
        client.hello().await;
        leases.push(granted(client.open(tcp(7001), None).await).lease);
    }
    let [stolen_lease, lost_lease, good_lease] = leases[..] else {
        unreachable!()
    };
    daemon.signal("TERM");
    tokio::task::block_in_place(|| daemon.wait_exit(STEP)).expect("the daemon stops");

    pki::revoke(pki.path(), &stolen.cert, RevocationReason::KeyCompromise).expect("revoke");
    let daemon = start_daemon(&config, &admin_socket);
    let live = |body: serde_json::Value| -> std::collections::BTreeSet<String> {
        body["leases"]
            .as_array()
            .expect("leases")
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect()
    };
    let (status, body) = admin_request(&admin_socket, "GET", "/v1/leases", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        live(body),
        std::collections::BTreeSet::from([lost_lease.to_string(), good_lease.to_string()]),
        "the lease of the certificate revoked while the gateway was stopped survived its start"
    );

    pki::revoke(pki.path(), &lost.cert, RevocationReason::KeyCompromise).expect("revoke");
    daemon.signal("HUP");
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, body) = admin_request(&admin_socket, "GET", "/v1/leases", None).await;
        assert_eq!(status, 200, "{body}");
        if live(body) == std::collections::BTreeSet::from([good_lease.to_string()]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a CRL reloaded after the restart left the offline host's lease live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator sees which certificate holds the lease that is left.
    let (_, body) = admin_request(&admin_socket, "GET", "/v1/leases", None).await;
    let good_der = fwnp_trust::tls::load_certificates(&good.cert).expect("good certificate");
    let good_serial = fwnp_trust::identity::PeerIdentity::from_certificate(good_der[0].as_ref())
        .expect("identity")
        .certificate
        .serial
        .as_str()
        .to_owned();
    assert_eq!(
        body["leases"][0]["certificate_serial"],
        json!(good_serial),
        "{body}"
    );
    // And can list what a certificate holds by its serial, written as a CA tool prints it.
    let colons: Vec<String> = good_serial
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_lowercase())
        .collect();
    let (status, body) = admin_request(
        &admin_socket,
        "GET",
        &format!("/v1/leases?serial={}", colons.join(":")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        live(body),
        std::collections::BTreeSet::from([good_lease.to_string()])
    );
    let (status, body) =
        admin_request(&admin_socket, "GET", "/v1/leases?serial=not-hex", None).await;
    assert_eq!(status, 400, "{body}");
    // The same through the command line, for the operator.
    let fwnpctl_leases = |serial: &str| {
        let cli = std::process::Command::new(env!("CARGO_BIN_EXE_fwnpctl"))
            .arg("--admin")
            .arg(&admin_socket)
            .args(["leases", "--serial", serial])
            .output()
            .expect("run fwnpctl");
        assert!(cli.status.success(), "{cli:?}");
        String::from_utf8_lossy(&cli.stdout).into_owned()
    };
    let out = fwnpctl_leases(&good_serial);
    assert!(out.contains("fwnp://host/good"), "{out}");
    let out = fwnpctl_leases("00FF");
    assert!(!out.contains("fwnp://host/good"), "{out}");
    let (status, body) = admin_request(
        &admin_socket,
        "GET",
        "/v1/audit?outcome=revoked&order=oldest",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let revoked: Vec<(String, String)> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["lease"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    for ((lease, reason), expected) in revoked.iter().zip([stolen_lease, lost_lease]) {
        assert_eq!(lease, &expected.to_string());
        assert!(reason.contains("was revoked"), "{reason}");
    }
}

/// A Hello left unfinished meets two timers of 10 s: its stream's, which starts when the
/// stream opens, and the connection's Hello timer, which starts at the handshake, before any
/// stream. The Hello timer fires first: the connection is closed with RequestTimeout, and the
/// stream ends with the connection rather than with a reset of its own (spec Section 5.2).
#[tokio::test]
async fn an_unfinished_hello_ends_with_the_connection_not_a_stream_reset() {
    let gw = TestGateway::start("hello-stream-timeout", POLICY).await;
    let client = gw.host("web-01", &[HOST_A]).await;
    let (mut send, mut recv) = client.connection.open_bi().await.expect("open a stream");
    // Half a Hello and no FIN.
    send.write_all(&[0xa2, 0x00]).await.expect("write");
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(MAX_MESSAGE_SIZE))
        .await
        .expect("the gateway gave up in time");
    match outcome {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(lost))) => {
            assert_eq!(
                application_close_code(&lost),
                Some(u64::from(QuicErrorCode::RequestTimeout.code())),
                "{lost:?}"
            );
        }
        other => panic!("expected the connection closed with RequestTimeout, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "ended too early: {:?}",
        started.elapsed()
    );
}

const DUAL_STACK_POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_lifetime = "1h"
max_leases = 10

[applications]
https = ["tcp/443", "udp/443"]

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "v4-clients-only"
groups = ["hosts"]
allow = "tcp/6000"
from = ["198.51.100.0/24"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = ["app:https", "tcp/7000-7999"]
"#;

const V6_A: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));

fn grant_hosts(g: &fwnp_proto::Granted) -> Vec<IpAddr> {
    g.grants.iter().map(|grant| grant.host).collect()
}

/// With no host address, an opening covers every address of the host, both families, in one
/// lease (spec section 9.2); key 5 or the remote prefixes' family narrow it, and so does a
/// list of addresses in key 4.
#[tokio::test]
async fn a_dual_stack_host_opens_both_families_in_one_lease() {
    let gw = TestGateway::start("dual-stack", DUAL_STACK_POLICY).await;
    let (web, welcome) = gw.welcomed_host("web-02", &[HOST_A, V6_A]).await;
    assert_eq!(welcome.addresses, vec![HOST_A, V6_A]);

    let both = granted(web.open(tcp(7010), None).await);
    assert_eq!(grant_hosts(&both), vec![HOST_A, V6_A]);
    assert!(!both.narrowed);
    let listed = web.list().await;
    assert_eq!(listed.leases.len(), 1, "one lease for both families");
    assert_eq!(listed.leases[0].grants, both.grants);
    // Renewing keeps both grants.
    assert_eq!(
        granted(web.renew(both.lease, None).await).grants,
        both.grants
    );

    let mut v6_only = tcp(7011);
    v6_only.family = Some(fwnp_proto::Family::Ipv6);
    assert_eq!(
        grant_hosts(&granted(web.open(v6_only, None).await)),
        vec![V6_A]
    );

    // IPv6 remote prefixes and nothing else: the IPv6 address, although IPv4 comes first.
    let mut from_v6 = tcp(7012);
    from_v6.remotes = vec![fwnp_proto::Prefix {
        addr: "fd18:1::2".parse().unwrap(),
        len: 128,
    }];
    let g = granted(web.open(from_v6.clone(), None).await);
    assert_eq!(grant_hosts(&g), vec![V6_A]);
    assert_eq!(g.grants[0].remotes, from_v6.remotes);

    // Both addresses named: both; a named address the host does not hold: refused whole.
    let mut named = tcp(7013);
    named.host = HostAddresses::List(vec![V6_A, HOST_A]);
    assert_eq!(
        grant_hosts(&granted(web.open(named, None).await)),
        vec![HOST_A, V6_A]
    );
    let mut foreign = tcp(7014);
    foreign.host = HostAddresses::List(vec![HOST_A, HOST_B]);
    let d = denied(web.open(foreign, None).await);
    assert_eq!(d.code, ResultCode::AddressMismatch, "{d:?}");

    // An application: one grant per catalogue entry and address.
    let g = granted(web.open(app("https"), None).await);
    assert_eq!(g.grants.len(), 4, "{:?}", g.grants);

    // Policy admits only IPv4 clients for tcp/6000: the IPv6 address is left out, narrowed.
    let g = granted(web.open(tcp(6000), None).await);
    assert_eq!(grant_hosts(&g), vec![HOST_A]);
    assert!(g.narrowed);
    // Named, the IPv6 address must be admitted too: refused.
    let mut named = tcp(6000);
    named.host = HostAddresses::List(vec![HOST_A, V6_A]);
    let d = denied(web.open(named, None).await);
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
}

/// Spec section 9.2: remote prefixes of a family the host holds no address of are refused with
/// address-mismatch; the opening itself is well-formed.
#[tokio::test]
async fn remote_prefixes_of_a_family_the_host_lacks_are_an_address_mismatch() {
    let gw = TestGateway::start("lacks-family", DUAL_STACK_POLICY).await;
    let (web, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let mut from_v6 = tcp(7012);
    from_v6.remotes = vec![fwnp_proto::Prefix {
        addr: "fd18:1::2".parse().unwrap(),
        len: 128,
    }];
    let d = denied(web.open(from_v6, None).await);
    assert_eq!(d.code, ResultCode::AddressMismatch, "{d:?}");
}

/// The size bounds of spec section 5.4 hold when the grants multiply by the host's addresses:
/// a Granted that 16 addresses make too large is refused (denied-by-policy, nothing left
/// behind), and a List of leases that each fit but together do not is answered no-resources,
/// never with a partial list or an oversized answer.
#[tokio::test]
async fn size_limits_hold_when_grants_multiply_by_addresses() {
    let gw = TestGateway::start("many-addresses", DUAL_STACK_POLICY).await;
    let addresses: Vec<IpAddr> = (1..=16).map(|i| v4(192, 0, 2, i)).collect();
    let (client, welcome) = gw.welcomed_host("web-16", &addresses).await;
    assert_eq!(welcome.addresses.len(), 16);
    let prefixes = |count: u32| -> Vec<fwnp_proto::Prefix> {
        (0..count)
            .map(|i| fwnp_proto::Prefix {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))),
                len: 24,
            })
            .collect()
    };

    // 300 prefixes fit in a grant on one address; on 16, twice (https), they do not.
    let mut big = app("https");
    big.remotes = prefixes(300);
    let d = denied(client.open(big, None).await);
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
    assert!(
        client.list().await.leases.is_empty(),
        "no lease is left behind"
    );

    // Four leases of 16 grants with 40 prefixes each: every Granted fits, their List does not.
    for port in 7100..7104 {
        let mut opening = tcp(port);
        opening.remotes = prefixes(40);
        let g = granted(client.open(opening, None).await);
        assert_eq!(g.grants.len(), 16);
    }
    let bytes = fwnp_proto::codec::encode(&Message::List(fwnp_proto::List {
        common: common(Some(9)),
    }));
    match client.exchange(&bytes).await {
        Exchange::Answer(answer) => {
            assert!(answer.len() <= MAX_MESSAGE_SIZE, "{} bytes", answer.len());
            let d = denied(fwnp_proto::codec::decode(&answer).expect("decodes"));
            assert_eq!(d.code, ResultCode::NoResources, "{d:?}");
            assert!(d.retry_after.is_some());
        }
        other => panic!("no usable answer: {other:?}"),
    }
}

#[tokio::test]
async fn the_status_tells_where_requests_waited() {
    let gw = TestGateway::start("stages", POLICY).await;
    let (client, _) = gw.welcomed_host("web-01", &[HOST_A]).await;
    let before = gw.service.status();
    granted(client.open(tcp(7001), None).await);
    granted(client.open(tcp(7002), None).await);
    // Refused by the policy before the lease book: no lock, kernel or store for it.
    denied(client.open(tcp(23), None).await);
    let after = gw.service.status();
    let (b, a) = (&before.request_path, &after.request_path);
    // Each grant took the lock once and waited for the kernel and the store once.
    assert_eq!(a.lock_waits - b.lock_waits, 2);
    assert_eq!(a.kernel_waits - b.kernel_waits, 2);
    assert_eq!(a.store_waits - b.store_waits, 2);
    assert!(a.store_wait_us > b.store_wait_us, "{a:?}");
    // Their spread: each bucket's count grew by at most the two, the unbounded one by both.
    for (name, b, a) in [
        ("kernel", &b.kernel_wait_buckets, &a.kernel_wait_buckets),
        ("store", &b.store_wait_buckets, &a.store_wait_buckets),
        ("grant", &b.grant_latency_buckets, &a.grant_latency_buckets),
    ] {
        assert_eq!(a.le_us, b.le_us, "{name}");
        let grown: Vec<u64> = a.counts.iter().zip(&b.counts).map(|(a, b)| a - b).collect();
        assert!(grown.windows(2).all(|w| w[0] <= w[1]), "{name}: {grown:?}");
        assert_eq!(grown.last(), Some(&2), "{name}: {grown:?}");
    }
    assert_eq!(a.in_flight, 0, "nothing is left in flight once answered");
    // The writer counted its two lease jobs (and the refusal's audit row) in line.
    assert!(after.store_writer.jobs >= before.store_writer.jobs + 2);
    assert!(after.store_writer.queue_wait_us >= before.store_writer.queue_wait_us);
}
