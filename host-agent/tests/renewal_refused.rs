//! What the real `fwnp-agent` does when a gateway refuses a renewal for good without revoking
//! the lease (spec section 8.5; local API event 8). FWNP's own gateway never answers so: it
//! revokes a lease it will not renew. Other gateways may, so the agent is driven here by a
//! scripted gateway: a real QUIC endpoint with the gateway's TLS configuration and certificates,
//! which grants Opens and refuses every Renew with not-authorized. No root needed (mirror off).
//! The same gateway, made to grant a reversed port range first, shows that the agent refuses an
//! invalid grant (spec 9.4); made to answer an Open with more bytes than an answer may have, it
//! shows that the agent stops that stream with `MessageTooLarge` and sends the request again
//! under the same request id (spec 5.2, 15).

mod common;

use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scripted::{Conduct, LeaseTable, Reply, Terms, answer_common, denied, lock};
use common::*;
use fwnp_proto::codec::DecodeError;
use fwnp_proto::local::{DenialCode, EventKind, LocalMessage};
use fwnp_proto::{Grant, Message, PortRange, Protocol, ResultCode, Target};

const REFUSAL: &str = "this gateway renews nothing";
/// The lifetime the scripted gateway grants, and when it asks for the renewal.
const LIFETIME_SECS: u32 = 3;
const RENEW_AFTER_SECS: u32 = 1;
const TERMS: Terms = Terms {
    epoch: 0x5c21_97ed_0000_0001,
    lifetime: LIFETIME_SECS,
    renew_after: RENEW_AFTER_SECS,
    lifetimes: (1, 3600),
    lease_fill: 0x5a,
};

/// What the scripted gateway has seen.
#[derive(Debug, Default)]
struct Seen {
    renews: u32,
    opens: u32,
    /// Opens still to be granted an invalid grant (a reversed port range).
    invalid_grants: u32,
    /// Opens still to be answered with more than 16,384 bytes.
    oversized_answers: u32,
    /// The request id of each Open, in order.
    open_ids: Vec<Option<u64>>,
    /// The codes with which the agent stopped the oversized answers' streams.
    stop_codes: Vec<u64>,
    /// Requests that did not decode, or that the script does not expect.
    unexpected: Vec<String>,
    leases: LeaseTable,
}

/// The scripted gateway's answer to one request from `remote`: Opens granted (to the host
/// address asked for), every Renew refused for good.
fn answer(request: &Message, remote: IpAddr, seen: &mut Seen) -> Message {
    match request {
        Message::Open(open) => {
            let Target::Ports { protocol, ports } = open.opening.target.clone() else {
                seen.unexpected.push(format!("{open:?}"));
                return seen.leases.answer(&TERMS, request, remote);
            };
            seen.opens += 1;
            let ports = if seen.invalid_grants > 0 {
                seen.invalid_grants -= 1;
                PortRange {
                    first: ports.first,
                    last: ports.first - 1,
                }
            } else {
                ports
            };
            let grant = Grant {
                protocol,
                ports,
                host: open
                    .opening
                    .host
                    .addresses()
                    .first()
                    .copied()
                    .unwrap_or(remote),
                remotes: Vec::new(),
                app: None,
            };
            seen.leases.grant(&TERMS, answer_common(request), grant)
        }
        Message::Renew(renew) => {
            seen.renews += 1;
            denied(
                answer_common(request),
                ResultCode::NotAuthorized,
                Some(REFUSAL),
                Some(renew.lease),
            )
        }
        Message::Hello(_) | Message::List(_) | Message::Release(_) => {
            seen.leases.answer(&TERMS, request, remote)
        }
        other => {
            seen.unexpected.push(format!("{other:?}"));
            seen.leases.answer(&TERMS, request, remote)
        }
    }
}

impl Conduct for Mutex<Seen> {
    fn reply(&self, request: Result<Message, DecodeError>, remote: IpAddr) -> Reply {
        match request {
            Ok(request) if oversized(&request, self) => Reply::Oversized,
            Ok(request) => Reply::Answer(answer(&request, remote, &mut lock(self))),
            Err(e) => {
                lock(self)
                    .unexpected
                    .push(format!("undecodable request: {e}"));
                Reply::Nothing
            }
        }
    }

    fn oversized_stopped(&self, code: Option<quinn::VarInt>) {
        let mut seen = lock(self);
        match code {
            Some(code) => seen.stop_codes.push(code.into_inner()),
            None => seen.unexpected.push("an oversized answer was read".into()),
        }
    }
}

/// Records an Open's request id, and says whether its answer is to be oversized.
fn oversized(request: &Message, seen: &Mutex<Seen>) -> bool {
    let Message::Open(open) = request else {
        return false;
    };
    let mut seen = lock(seen);
    seen.open_ids.push(open.common.request_id);
    if seen.oversized_answers == 0 {
        return false;
    }
    seen.oversized_answers -= 1;
    true
}

/// A real `fwnp-agent` connected to the scripted gateway, which answers as `seen` says.
struct Scripted {
    /// The scripted gateway's runtime: it serves as long as this lives.
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    _agent: ProcessGuard,
    socket: std::path::PathBuf,
}

impl Scripted {
    /// Starts both, and waits until the agent is connected: an Open before that is refused
    /// (gateway-unreachable).
    fn start(label: &str, seen: Arc<Mutex<Seen>>) -> Scripted {
        let pki = scripted::pki(label);
        let runtime = scripted::runtime();
        let gateway = scripted::spawn_gateway(&pki, &runtime, seen);
        let dir = temp_dir(label);
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            agent_config(
                &pki,
                "web-01",
                dir.path(),
                &gateway.to_string(),
                "off",
                &my_uid().to_string(),
                "1s",
            ),
        )
        .expect("write config");
        let socket = dir.path().join("agent.sock");
        let mut agent = ProcessGuard(Some(
            agent_command(&config).spawn().expect("start fwnp-agent"),
        ));
        wait_for_socket(&mut agent, &socket);
        let mut status = LocalClient::connect(&socket);
        let deadline = Instant::now() + STEP;
        while !status.status().connected {
            assert!(
                Instant::now() < deadline,
                "the agent did not connect to the scripted gateway"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Scripted {
            _runtime: runtime,
            _dir: dir,
            _agent: agent,
            socket,
        }
    }

    /// Binds a port, has an application open it through the agent and checks the grant; the
    /// port stays bound as long as the returned listener lives.
    fn open_a_port(&self) -> TcpListener {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let mut client = LocalClient::connect(&self.socket);
        let granted = match client.open(Protocol::Tcp, port, None, STEP) {
            LocalMessage::Wire(Message::Granted(granted)) => granted,
            other => panic!("Open answered with {other:?}"),
        };
        assert_eq!(
            granted.grants[0].ports,
            PortRange::single(port),
            "{granted:?}"
        );
        listener
    }
}

#[test]
fn a_renewal_refused_for_good_is_told_to_the_application_and_the_lease_ends_at_expiry() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let scripted = Scripted::start("renewal-refused", seen.clone());
    let socket = &scripted.socket;

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut client = LocalClient::connect(socket);
    let granted = match client.open(Protocol::Tcp, port, None, STEP) {
        LocalMessage::Wire(Message::Granted(granted)) => granted,
        other => panic!("Open answered with {other:?}"),
    };
    assert_eq!(
        granted.grants[0].ports,
        PortRange::single(port),
        "{granted:?}"
    );
    let opened = Instant::now();
    client.watch(Some(granted.lease));

    let refused = client
        .event(STEP)
        .expect("no event after the refused renewal");
    assert_eq!(refused.kind, EventKind::RenewalRefused, "{refused:?}");
    assert_eq!(refused.lease, granted.lease);
    assert_eq!(
        refused.code,
        Some(DenialCode::Wire(ResultCode::NotAuthorized))
    );
    assert_eq!(refused.reason.as_deref(), Some(REFUSAL));
    let left = refused.expires_in_ms.expect("the time left is told");
    assert!(
        left > 0 && left < u64::from(LIFETIME_SECS) * 1000,
        "time left {left} ms"
    );

    // The lease lives on until its expiry, and then ends.
    let expired = client.event(STEP).expect("no event at expiry");
    assert_eq!(expired.kind, EventKind::Expired, "{expired:?}");
    assert_eq!(expired.lease, granted.lease);
    assert!(
        opened.elapsed() >= Duration::from_millis(u64::from(LIFETIME_SECS) * 1000 - 500),
        "ended {:?} after it was granted, before its expiry",
        opened.elapsed()
    );
    let seen = lock(&seen);
    assert_eq!(
        seen.renews, 1,
        "a renewal refused for good is not asked again"
    );
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    drop(listener);
}

/// A Granted whose grant breaks the rules of spec 9.4 (here a reversed port range) is treated
/// as an answer that did not decode: the application is not told of it and nothing is
/// mirrored; the agent asks again, and the valid grant that follows is the one it gets.
#[test]
fn an_invalid_grant_is_refused_and_the_open_asked_again() {
    let seen = Arc::new(Mutex::new(Seen {
        invalid_grants: 1,
        ..Seen::default()
    }));
    let scripted = Scripted::start("invalid-grant", seen.clone());
    let listener = scripted.open_a_port();
    let seen = lock(&seen);
    assert_eq!(seen.opens, 2, "the invalid grant was taken as no answer");
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    drop(listener);
}

/// An answer longer than 16,384 bytes is refused: the agent stops its stream with
/// `MessageTooLarge` (spec 5.2) and, the request being unanswered, sends it again under the same
/// request id (spec 15); the application gets the grant of the second attempt.
#[test]
fn an_oversized_answer_is_stopped_and_the_request_sent_again_under_its_id() {
    let seen = Arc::new(Mutex::new(Seen {
        oversized_answers: 1,
        ..Seen::default()
    }));
    let scripted = Scripted::start("oversized-answer", seen.clone());
    let listener = scripted.open_a_port();
    // The stop may reach the scripted gateway after the retry's answer: wait for it, bounded.
    let deadline = Instant::now() + STEP;
    while lock(&seen).stop_codes.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the oversized answer was never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = lock(&seen);
    assert_eq!(
        seen.stop_codes,
        vec![u64::from(fwnp_proto::QuicErrorCode::MessageTooLarge.code())]
    );
    assert_eq!(seen.open_ids.len(), 2, "{:?}", seen.open_ids);
    assert!(seen.open_ids[0].is_some());
    assert_eq!(
        seen.open_ids[0], seen.open_ids[1],
        "the retry reuses the id"
    );
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    drop(listener);
}
