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

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use fwnp_proto::local::{DenialCode, EventKind, LocalMessage};
use fwnp_proto::{
    Capabilities, Common, Denied, Epoch, Grant, Granted, LeaseId, LeaseInfo, Leases, Limits,
    Message, PortRange, Protocol, Released, ResultCode, Target, Welcome,
};

const REFUSAL: &str = "this gateway renews nothing";
/// The lifetime the scripted gateway grants, and when it asks for the renewal.
const LIFETIME_SECS: u32 = 3;
const RENEW_AFTER_SECS: u32 = 1;

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
    granted: HashMap<LeaseId, (Grant, u64)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn answer_common(request: &Message) -> Common {
    Common {
        request_id: request.common().request_id,
        critical: Vec::new(),
    }
}

/// The scripted gateway's answer to one request from `remote`.
fn answer(request: &Message, remote: IpAddr, seen: &Mutex<Seen>) -> Message {
    let epoch: Epoch = 0x5c21_97ed_0000_0001;
    let common = answer_common(request);
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    match request {
        Message::Hello(_) => Message::Welcome(Welcome {
            common,
            version: 1,
            capabilities: Capabilities(Capabilities::ALL),
            limits: Limits {
                max_message_size: fwnp_proto::MAX_MESSAGE_SIZE as u32,
                max_streams: 16,
                min_lifetime: 1,
                max_lifetime: 3600,
                max_leases: None,
            },
            epoch,
            time_ms: now_ms(),
            identity: "fwnp://host/web-01".into(),
            addresses: vec![remote],
        }),
        Message::Open(open) => {
            let Target::Ports { protocol, ports } = open.opening.target.clone() else {
                seen.unexpected.push(format!("{open:?}"));
                return Message::Denied(Denied {
                    common,
                    code: ResultCode::UnknownApplication,
                    reason: None,
                    retry_after: None,
                    lease: None,
                    unsupported: Vec::new(),
                });
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
            let lease = lease_id(seen.granted.len());
            let expires_ms = now_ms() + u64::from(LIFETIME_SECS) * 1000;
            seen.granted.insert(lease, (grant.clone(), expires_ms));
            Message::Granted(Granted {
                common,
                lease,
                grants: vec![grant],
                lifetime: LIFETIME_SECS,
                expires_ms,
                renew_after: RENEW_AFTER_SECS,
                epoch,
                narrowed: false,
            })
        }
        Message::Renew(renew) => {
            seen.renews += 1;
            Message::Denied(Denied {
                common,
                code: ResultCode::NotAuthorized,
                reason: Some(REFUSAL.into()),
                retry_after: None,
                lease: Some(renew.lease),
                unsupported: Vec::new(),
            })
        }
        Message::List(_) => Message::Leases(Leases {
            common,
            leases: seen
                .granted
                .iter()
                .filter(|(_, (_, expires_ms))| *expires_ms > now_ms())
                .map(|(lease, (grant, expires_ms))| LeaseInfo {
                    lease: *lease,
                    grants: vec![grant.clone()],
                    remaining: (expires_ms.saturating_sub(now_ms()) / 1000) as u32,
                    expires_ms: *expires_ms,
                    app: None,
                })
                .collect(),
            epoch,
        }),
        Message::Release(release) => {
            seen.granted.remove(&release.lease);
            Message::Released(Released {
                common,
                lease: release.lease,
            })
        }
        other => {
            seen.unexpected.push(format!("{other:?}"));
            Message::Denied(Denied {
                common,
                code: ResultCode::MalformedRequest,
                reason: Some("the scripted gateway does not answer this".into()),
                retry_after: None,
                lease: None,
                unsupported: Vec::new(),
            })
        }
    }
}

/// The `n`th lease id the scripted gateway hands out.
fn lease_id(n: usize) -> LeaseId {
    let mut id = [0x5a; 16];
    id[..8].copy_from_slice(&(n as u64 + 1).to_be_bytes());
    LeaseId(id)
}

/// Serves every connection and stream of `endpoint` with [`answer`].
async fn scripted_gateway(endpoint: quinn::Endpoint, seen: Arc<Mutex<Seen>>) {
    while let Some(incoming) = endpoint.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            let remote = connection.remote_address().ip();
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(fwnp_proto::MAX_MESSAGE_SIZE).await else {
                        return;
                    };
                    let reply = match fwnp_proto::codec::decode(&bytes) {
                        Ok(request) if oversized(&request, &seen) => {
                            let too_long = vec![0xa0; fwnp_proto::MAX_MESSAGE_SIZE + 4096];
                            let code = match send.write_all(&too_long).await {
                                Err(quinn::WriteError::Stopped(code)) => Some(code),
                                _ => send.stopped().await.ok().flatten(),
                            };
                            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                            match code {
                                Some(code) => seen.stop_codes.push(code.into_inner()),
                                None => seen.unexpected.push("an oversized answer was read".into()),
                            }
                            return;
                        }
                        Ok(request) => answer(&request, remote, &seen),
                        Err(e) => {
                            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                            seen.unexpected.push(format!("undecodable request: {e}"));
                            return;
                        }
                    };
                    let _ = send.write_all(&fwnp_proto::codec::encode(&reply)).await;
                    let _ = send.finish();
                });
            }
        });
    }
}

/// Records an Open's request id, and says whether its answer is to be oversized.
fn oversized(request: &Message, seen: &Mutex<Seen>) -> bool {
    let Message::Open(open) = request else {
        return false;
    };
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
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
        let pki = Pki::with_gateway_ips(label, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        pki.host("web-01", &[], &[], &[]);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let gateway = {
            let endpoint = gateway_endpoint(&pki, &runtime);
            let address = endpoint.local_addr().expect("address");
            runtime.spawn(scripted_gateway(endpoint, seen));
            address
        };
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
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
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
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
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
    while seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_codes
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the oversized answer was never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
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
