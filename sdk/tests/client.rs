//! The SDK's own logic against a scripted socket that speaks the real local API frames
//! (`harness`): what the SDK sends, how it routes answers (several requests in flight, answered
//! out of order) and events (to the right lease, following a re-open), that dropping a lease
//! releases it, that each denial code maps to the right error, and that a missing agent, a
//! closed connection, a late or malformed answer are reported as such.
//!
//! These tests check the client side only; the harness answers what each test scripts, not what
//! the real agent would. End-to-end tests with the real agent, gateway and kernel live in
//! `host-agent/` and `interop-tests/`.

mod harness;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fwnp_proto::local::{DenialCode, EventKind, LocalCode, LocalMessage};
use fwnp_proto::{Message, PortRange, Protocol, ResultCode, Target};
use fwnp_sdk::{Client, Error, LeaseEvent, Opening};
use harness::{Harness, denied, event};

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

async fn next(lease: &mut fwnp_sdk::Lease) -> Option<LeaseEvent> {
    tokio::time::timeout(Duration::from_secs(5), lease.next_event())
        .await
        .expect("no event within 5 s")
}

#[tokio::test]
async fn open_sends_the_opening_and_returns_the_grant() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let before = Instant::now();
    let lease = client
        .open(
            Opening::tcp(8080)
                .lifetime(Duration::from_secs(600))
                .from("198.51.100.0/24")
                .name("inventory"),
        )
        .await
        .unwrap();
    let received = agent.received();
    // The connection first asks for its leases' events.
    assert!(matches!(received.first(), Some(LocalMessage::Watch(w)) if w.lease.is_none()));
    let open = &opens(&received)[0];
    assert!(open.common.request_id.is_some());
    assert_eq!(
        open.opening.target,
        Target::Ports {
            protocol: Protocol::Tcp,
            ports: PortRange::single(8080)
        }
    );
    assert_eq!(open.opening.remotes[0].to_string(), "198.51.100.0/24");
    assert_eq!(open.lifetime, Some(600));
    assert_eq!(
        open.app.as_ref().and_then(|a| a.name.as_deref()),
        Some("inventory")
    );

    assert_eq!(lease.lifetime(), Duration::from_secs(600));
    assert_eq!(lease.grants().len(), 1);
    assert_eq!(lease.grants()[0].host.to_string(), harness::HOST);
    assert_eq!(lease.epoch(), 7);
    assert_eq!(lease.renew_after(), Duration::from_secs(300));
    // Measured from the request: after it was sent, and not later than a fresh now + lifetime.
    assert!(lease.expires() >= before + Duration::from_secs(600));
    assert!(lease.expires() <= Instant::now() + Duration::from_secs(600));
    assert!(lease.is_active());
}

#[tokio::test]
async fn an_invalid_opening_is_refused_before_sending() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    for bad in [
        Opening::tcp(0),
        Opening::udp_range(10, 9),
        Opening::tcp(1).from("10.0.0.1/8"),
        Opening::tcp(1).from("not-a-prefix"),
        Opening::app("Bad App"),
        Opening::tcp(1).lifetime(Duration::from_secs(8 * 86400)),
    ] {
        let err = client.open(bad.clone()).await.unwrap_err();
        assert!(matches!(err, Error::InvalidOpening(_)), "{bad}: {err}");
    }
    // Round trip a status so that anything sent before it has arrived.
    client.status().await.unwrap();
    assert!(opens(&agent.received()).is_empty());
}

/// Two Opens in flight; the agent answers the second first. Each caller gets its own lease.
#[tokio::test]
async fn concurrent_requests_are_routed_by_request_id() {
    let held: Arc<Mutex<Option<LocalMessage>>> = Arc::default();
    let held2 = held.clone();
    let agent = Harness::with_script(Box::new(move |req| {
        let LocalMessage::Wire(Message::Open(open)) = req else {
            return None;
        };
        let granted = LocalMessage::Wire(Message::Granted(harness::grant_for(open)));
        let mut held = held2.lock().unwrap();
        match held.take() {
            // First Open: hold its answer back.
            None => {
                *held = Some(granted);
                Some(vec![])
            }
            // Second Open: answer it, then the first.
            Some(first) => Some(vec![granted, first]),
        }
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    let (a, b) = tokio::join!(client.open(Opening::tcp(1001)), async {
        // Make sure the first Open is sent first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.open(Opening::udp(2002)).await
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.grants()[0].protocol, Protocol::Tcp);
    assert_eq!(a.grants()[0].ports.first, 1001);
    assert_eq!(b.grants()[0].protocol, Protocol::Udp);
    assert_eq!(b.grants()[0].ports.first, 2002);
    assert_ne!(a.id(), b.id());

    // Many at once, each with its own port.
    let results = futures_join_all(&client, 20).await;
    for (port, lease) in results {
        assert_eq!(lease.grants()[0].ports.first, port);
    }
}

async fn futures_join_all(client: &Client, n: u16) -> Vec<(u16, fwnp_sdk::Lease)> {
    let mut set = tokio::task::JoinSet::new();
    for port in 3000..3000 + n {
        let client = client.clone();
        set.spawn(async move { (port, client.open(Opening::tcp(port)).await.unwrap()) });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    assert_eq!(out.len(), usize::from(n));
    out
}

#[tokio::test]
async fn events_reach_the_right_lease() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let mut a = client.open(Opening::tcp(80)).await.unwrap();
    let mut b = client.open(Opening::tcp(443)).await.unwrap();

    let mut renewed = event(b.id(), EventKind::Renewed);
    renewed.expires_in_ms = Some(3_600_000);
    agent.push(&LocalMessage::Event(renewed));
    let mut revoked = event(a.id(), EventKind::Revoked);
    revoked.reason = Some("operator: maintenance".into());
    revoked.code = Some(DenialCode::Wire(ResultCode::DeniedByPolicy));
    agent.push(&LocalMessage::Event(revoked));
    let mut unreachable = event(b.id(), EventKind::GatewayUnreachable);
    unreachable.reason = Some("connection refused".into());
    agent.push(&LocalMessage::Event(unreachable));
    // An event for a lease nobody holds is ignored.
    agent.push(&LocalMessage::Event(event(
        fwnp_proto::LeaseId([0xee; 16]),
        EventKind::Expired,
    )));

    match next(&mut b).await {
        Some(LeaseEvent::Renewed { expires }) => {
            assert!(expires > Instant::now() + Duration::from_secs(3500));
            assert_eq!(b.expires(), expires);
        }
        other => panic!("b: {other:?}"),
    }
    assert_eq!(
        next(&mut a).await,
        Some(LeaseEvent::Revoked {
            reason: Some("operator: maintenance".into()),
            code: Some(DenialCode::Wire(ResultCode::DeniedByPolicy)),
        })
    );
    assert!(!a.is_active());
    // After a terminal event the stream ends.
    assert_eq!(next(&mut a).await, None);
    assert_eq!(
        next(&mut b).await,
        Some(LeaseEvent::GatewayUnreachable {
            reason: Some("connection refused".into())
        })
    );
    assert!(b.is_active());

    // A revoked lease is not released again on drop; b is.
    let b_id = b.id();
    let a_id = a.id();
    drop(a);
    drop(b);
    let received = agent
        .wait_for("b's release", |r| releases(r).contains(&b_id))
        .await;
    assert!(!releases(&received).contains(&a_id));
}

#[tokio::test]
async fn a_refused_renewal_is_reported_and_the_lease_stays_until_its_expiry() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let mut lease = client.open(Opening::tcp(8080)).await.unwrap();
    let mut refused = event(lease.id(), EventKind::RenewalRefused);
    refused.expires_in_ms = Some(42_000);
    refused.reason = Some("the host's credential was revoked".into());
    refused.code = Some(DenialCode::Wire(ResultCode::NotAuthorized));
    agent.push(&LocalMessage::Event(refused));
    let expires = match next(&mut lease).await {
        Some(LeaseEvent::RenewalRefused {
            expires,
            reason,
            code,
        }) => {
            assert_eq!(reason.as_deref(), Some("the host's credential was revoked"));
            assert_eq!(code, Some(DenialCode::Wire(ResultCode::NotAuthorized)));
            expires
        }
        other => panic!("expected a refused renewal, got {other:?}"),
    };
    // The time left the agent gave is now the lease's expiry; the lease is still in force.
    let left = expires.saturating_duration_since(Instant::now());
    assert!(
        left > Duration::from_secs(40) && left <= Duration::from_secs(42),
        "{left:?}"
    );
    assert_eq!(lease.expires(), expires);
    assert!(lease.is_active());
    // Its expiry ends it.
    agent.push(&LocalMessage::Event(event(lease.id(), EventKind::Expired)));
    assert_eq!(next(&mut lease).await, Some(LeaseEvent::Expired));
    assert!(!lease.is_active());
}

#[tokio::test]
async fn a_reopened_lease_takes_its_new_id() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let mut lease = client.open(Opening::tcp(8443)).await.unwrap();
    let old = lease.id();
    let new = fwnp_proto::LeaseId([0xab; 16]);
    let mut reopened = event(old, EventKind::Reopened);
    reopened.new_lease = Some(new);
    reopened.expires_in_ms = Some(60_000);
    agent.push(&LocalMessage::Event(reopened));
    assert_eq!(
        next(&mut lease).await,
        Some(LeaseEvent::Reopened { old, new })
    );
    assert_eq!(lease.id(), new);
    // Later events name the new id.
    agent.push(&LocalMessage::Event(event(new, EventKind::Expired)));
    assert_eq!(next(&mut lease).await, Some(LeaseEvent::Expired));
    assert!(!lease.is_active());
}

#[tokio::test]
async fn dropping_a_lease_releases_it() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let lease = client.open(Opening::tcp(9000)).await.unwrap();
    let id = lease.id();
    drop(lease);
    agent
        .wait_for("the release", |r| releases(r) == vec![id])
        .await;
    // The connection stays open for the client.
    client.status().await.unwrap();
    assert_eq!(agent.closed(), 0);
}

#[tokio::test]
async fn release_waits_for_the_answer_and_is_not_repeated() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let lease = client.open(Opening::tcp(9001)).await.unwrap();
    let id = lease.id();
    lease.release().await.unwrap();
    assert!(agent.live().is_empty());
    client.status().await.unwrap();
    assert_eq!(releases(&agent.received()), vec![id]);

    // Releasing by id a lease this connection does not hold reports the agent's refusal.
    let err = client
        .release(fwnp_proto::LeaseId([0x42; 16]))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(DenialCode::Local(LocalCode::UnknownLocalLease))
    );
}

/// The agent's answers to a Release of `id`, as it gives them: the Released event of the id,
/// then the answer.
fn released_as_the_agent_does(
    id: fwnp_proto::LeaseId,
    release: &fwnp_proto::Release,
) -> Vec<LocalMessage> {
    vec![
        LocalMessage::Event(event(id, EventKind::Released)),
        LocalMessage::Wire(Message::Released(fwnp_proto::Released {
            common: release.common.clone(),
            lease: release.lease,
        })),
    ]
}

/// Opening the same thing twice gives the gateway's same lease id twice (it extends the lease),
/// which the connection holds once (the local API's Section 5.2): releasing one handle ends it
/// alone, without a Release that would end the other's opening too; the last one's release
/// sends the Release.
#[tokio::test]
async fn two_handles_of_one_lease_id_are_one_hold_released_with_the_last() {
    let id = fwnp_proto::LeaseId([0x33; 16]);
    let agent = Harness::with_script(Box::new(move |req| match req {
        LocalMessage::Wire(Message::Open(open)) => {
            let mut granted = harness::grant_for(open);
            granted.lease = id;
            Some(vec![LocalMessage::Wire(Message::Granted(granted))])
        }
        LocalMessage::Wire(Message::Release(release)) => {
            Some(released_as_the_agent_does(id, release))
        }
        _ => None,
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    let first = client.open(Opening::tcp(7000)).await.unwrap();
    let mut second = client.open(Opening::tcp(7000)).await.unwrap();
    assert_eq!(first.id(), second.id());
    first.release().await.unwrap();
    // Round trip a status so that anything sent before it has arrived.
    client.status().await.unwrap();
    assert!(releases(&agent.received()).is_empty());
    assert!(second.is_active());
    // Events still reach the remaining handle.
    let mut renewed = event(id, EventKind::Renewed);
    renewed.expires_in_ms = Some(1000);
    agent.push(&LocalMessage::Event(renewed));
    assert!(matches!(
        next(&mut second).await,
        Some(LeaseEvent::Renewed { .. })
    ));
    drop(second);
    agent
        .wait_for("the release", |r| releases(r) == vec![id])
        .await;
}

/// A release by id ends this connection's hold of the lease: every handle of the id it was
/// sent for ends, as the agent's Released event says; a handle granted the same id after it
/// was sent (an Open the gateway merged into the lease later) holds the lease anew and stays.
#[tokio::test]
async fn a_release_by_id_ends_every_handle_it_was_sent_for() {
    let id = fwnp_proto::LeaseId([0x34; 16]);
    let held: Arc<Mutex<Option<fwnp_proto::Release>>> = Arc::default();
    let held2 = held.clone();
    let agent = Harness::with_script(Box::new(move |req| match req {
        LocalMessage::Wire(Message::Open(open)) => {
            let mut granted = harness::grant_for(open);
            granted.lease = id;
            Some(vec![LocalMessage::Wire(Message::Granted(granted))])
        }
        // Answered when the test says.
        LocalMessage::Wire(Message::Release(release)) => {
            *held2.lock().unwrap() = Some(release.clone());
            Some(vec![])
        }
        _ => None,
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    let mut first = client.open(Opening::tcp(7001)).await.unwrap();
    let mut second = client.open(Opening::tcp(7001)).await.unwrap();
    let releasing = tokio::spawn({
        let client = client.clone();
        async move { client.release(id).await }
    });
    agent
        .wait_for("the release", |r| releases(r) == vec![id])
        .await;
    let third = client.open(Opening::tcp(7001)).await.unwrap();
    let release = held.lock().unwrap().take().expect("the release");
    agent.push(&LocalMessage::Wire(Message::Released(
        fwnp_proto::Released {
            common: release.common.clone(),
            lease: id,
        },
    )));
    releasing.await.unwrap().unwrap();
    assert!(!first.is_active() && !second.is_active());
    assert_eq!(next(&mut first).await, Some(LeaseEvent::Released));
    assert_eq!(next(&mut second).await, Some(LeaseEvent::Released));
    assert!(third.is_active());
}

#[tokio::test]
async fn every_denial_code_maps_to_an_actionable_error() {
    let codes: Vec<DenialCode> = ResultCode::ALL
        .into_iter()
        .map(DenialCode::Wire)
        .chain(LocalCode::ALL.into_iter().map(DenialCode::Local))
        .collect();
    let by_port: HashMap<u16, DenialCode> = codes
        .iter()
        .enumerate()
        .map(|(i, c)| (1000 + i as u16, *c))
        .collect();
    let table = by_port.clone();
    let agent = Harness::with_script(Box::new(move |req| {
        let LocalMessage::Wire(Message::Open(open)) = req else {
            return None;
        };
        let Target::Ports { ports, .. } = &open.opening.target else {
            return None;
        };
        let code = table[&ports.first];
        Some(vec![denied(
            open.common.request_id,
            code,
            &format!("because {}", code.name()),
            Some(7),
        )])
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    for (port, code) in by_port {
        let err = client.open(Opening::tcp(port)).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(err.is_denied());
        let reason = format!("because {}", code.name());
        assert_eq!(err.reason(), Some(reason.as_str()));
        assert!(err.to_string().contains(&reason), "{err}");
        let expect_transient = matches!(
            code,
            DenialCode::Wire(ResultCode::NoResources | ResultCode::RateLimited)
                | DenialCode::Local(LocalCode::GatewayUnreachable)
        );
        assert_eq!(err.is_transient(), expect_transient, "{code}");
        match code {
            DenialCode::Wire(ResultCode::RateLimited) => {
                assert!(
                    matches!(err, Error::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7))
                );
            }
            DenialCode::Wire(ResultCode::QuotaExceeded) => {
                assert!(matches!(err, Error::QuotaExceeded { .. }))
            }
            DenialCode::Wire(ResultCode::DeniedByPolicy) => {
                assert!(matches!(err, Error::DeniedByPolicy { .. }))
            }
            DenialCode::Wire(ResultCode::AddressMismatch) => {
                assert!(matches!(err, Error::AddressMismatch { .. }))
            }
            DenialCode::Local(LocalCode::PortNotOwned) => {
                assert!(matches!(err, Error::PortNotOwned { .. }))
            }
            DenialCode::Local(LocalCode::AgentNotAuthorized) => {
                assert!(matches!(err, Error::AgentNotAuthorized { .. }))
            }
            DenialCode::Local(LocalCode::GatewayUnreachable) => {
                assert!(matches!(err, Error::GatewayUnreachable { .. }))
            }
            DenialCode::Wire(ResultCode::NoResources) => {
                assert!(matches!(err, Error::Denied { .. }));
                assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
            }
            _ => assert!(matches!(err, Error::Denied { .. }), "{code}: {err:?}"),
        }
    }
}

#[tokio::test]
async fn a_missing_agent_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    match Client::connect_to(&missing).await {
        Err(Error::AgentUnavailable { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    // A socket file nobody listens on any more: connection refused.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = Client::connect_to(&stale).await.unwrap_err();
    assert!(matches!(&err, Error::AgentUnavailable { source, .. }
        if source.kind() == std::io::ErrorKind::ConnectionRefused));
    assert!(err.to_string().contains("is fwnp-agent running?"), "{err}");
}

#[tokio::test]
async fn an_agent_refusing_the_user_fails_connect() {
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Watch(w) => Some(vec![denied(
            w.common.request_id,
            DenialCode::Local(LocalCode::AgentNotAuthorized),
            "uid 1000 may not use the agent",
            None,
        )]),
        _ => None,
    }));
    let err = Client::connect_to(&agent.path).await.unwrap_err();
    assert!(
        matches!(&err, Error::AgentNotAuthorized { reason: Some(r) } if r.contains("uid 1000"))
    );
}

#[tokio::test]
async fn a_closed_connection_ends_leases_and_fails_requests() {
    let agent = Harness::with_script(Box::new(|req| match req {
        // Opens of port 1 are never answered.
        LocalMessage::Wire(Message::Open(o)) if matches!(o.opening.target, Target::Ports { ports, .. } if ports.first == 1) => {
            Some(vec![])
        }
        _ => None,
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    let mut lease = client.open(Opening::tcp(8080)).await.unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.open(Opening::tcp(1)).await }
    });
    agent
        .wait_for("the unanswered open", |r| opens(r).len() == 2)
        .await;
    agent.hang_up();
    assert_eq!(next(&mut lease).await, Some(LeaseEvent::Disconnected));
    assert!(!lease.is_active());
    assert!(matches!(waiting.await.unwrap(), Err(Error::Closed)));
    assert!(matches!(client.status().await, Err(Error::Closed)));
}

#[tokio::test]
async fn the_connection_lives_while_a_lease_does() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let lease = client.open(Opening::tcp(8080)).await.unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(agent.closed(), 0);
    assert!(lease.is_active());
    let id = lease.id();
    drop(lease);
    // The release goes out, then the connection closes (which makes the real agent release
    // whatever is left).
    agent.wait_closed(1).await;
    assert_eq!(releases(&agent.received()), vec![id]);
}

/// The caller stops waiting (timeout); the Granted arrives later: the SDK releases that lease
/// at once rather than leaving an opening nobody holds.
#[tokio::test]
async fn a_late_grant_is_released() {
    let held: Arc<Mutex<Option<LocalMessage>>> = Arc::default();
    let held2 = held.clone();
    let agent = Harness::with_script(Box::new(move |req| {
        if let LocalMessage::Wire(Message::Open(open)) = req {
            *held2.lock().unwrap() = Some(LocalMessage::Wire(Message::Granted(
                harness::grant_for(open),
            )));
            return Some(vec![]);
        }
        None
    }));
    let client = Client::connect_to(&agent.path)
        .await
        .unwrap()
        .with_request_timeout(Duration::from_millis(200));
    let err = client.open(Opening::tcp(8080)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                request: "open",
                ..
            }
        ),
        "{err}"
    );
    let late = held.lock().unwrap().take().unwrap();
    let LocalMessage::Wire(Message::Granted(g)) = &late else {
        unreachable!()
    };
    let id = g.lease;
    agent.push(&late);
    agent
        .wait_for("the late lease's release", |r| releases(r) == vec![id])
        .await;
}

#[tokio::test]
async fn malformed_answers_are_protocol_errors() {
    // The first Status is the one connect sends; it is answered as the agent would.
    let statuses = std::sync::atomic::AtomicUsize::new(0);
    let agent = Harness::with_script(Box::new(move |req| match req {
        LocalMessage::Status(_)
            if statuses.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 =>
        {
            None
        }
        // Status answered with a Released: the wrong kind of answer.
        LocalMessage::Status(s) => Some(vec![LocalMessage::Wire(Message::Released(
            fwnp_proto::Released {
                common: s.common.clone(),
                lease: fwnp_proto::LeaseId([1; 16]),
            },
        ))]),
        // List answered with an undecodable body that still names the request:
        // {0: 18, 1: id} (a Leases without its leases and epoch).
        LocalMessage::Wire(Message::List(_)) => Some(vec![]),
        _ => None,
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    assert!(matches!(client.status().await, Err(Error::Protocol(_))));

    let list = tokio::spawn({
        let client = client.clone();
        async move { client.leases().await }
    });
    let received = agent
        .wait_for("the list", |r| {
            r.iter()
                .any(|m| matches!(m, LocalMessage::Wire(Message::List(_))))
        })
        .await;
    let id = received
        .iter()
        .find_map(|m| match m {
            LocalMessage::Wire(Message::List(l)) => l.common.request_id,
            _ => None,
        })
        .unwrap();
    assert!(id < 24, "one-byte id in this hand-made frame");
    agent.push_raw(&[0, 0, 0, 5, 0xa2, 0x00, 0x12, 0x01, id as u8]);
    let result = tokio::time::timeout(Duration::from_secs(5), list)
        .await
        .expect("the list request was left hanging")
        .unwrap();
    assert!(matches!(result, Err(Error::Protocol(_))), "{result:?}");
    // The connection is still usable after an undecodable frame.
    client.open(Opening::tcp(8080)).await.unwrap();

    // A broken frame header (an empty frame) loses the framing: the connection is dropped.
    agent.push_raw(&[0, 0, 0, 0]);
    agent.wait_closed(1).await;
}

#[tokio::test]
async fn status_and_leases_are_mapped() {
    let agent = Harness::start();
    let client = Client::connect_to(&agent.path).await.unwrap();
    let lease = client.open(Opening::udp_range(5000, 5010)).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.gateway, "gw.example:4433");
    assert!(status.connected);
    assert_eq!(status.epoch, Some(7));
    assert_eq!(status.mirror_mode, "enforce");
    assert_eq!(status.identity.as_deref(), Some("fwnp://host/web-01"));
    assert_eq!(status.leases, 1);
    let leases = client.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].id, lease.id());
    assert_eq!(leases[0].remaining, Duration::from_secs(120));
    assert_eq!(
        leases[0].grants[0].ports,
        PortRange {
            first: 5000,
            last: 5010
        }
    );
}

/// A StatusAnswer of an agent implementing `api_version` (`None`: an agent that does not say).
fn status_of_version(request: &LocalMessage, api_version: Option<u64>) -> LocalMessage {
    LocalMessage::StatusAnswer(fwnp_proto::local::StatusAnswer {
        common: harness::common(request.request_id()),
        agent_version: "harness 0".into(),
        gateway: "gw.example:4433".into(),
        connected: true,
        epoch: None,
        mirror_mode: "enforce".into(),
        identity: None,
        leases: 0,
        last_error: None,
        api_version,
    })
}

#[tokio::test]
async fn connect_refuses_an_agent_older_than_the_api_version_it_needs() {
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Status(_) => Some(vec![status_of_version(req, Some(0))]),
        _ => None,
    }));
    let result = Client::connect_to(&agent.path).await;
    assert!(
        matches!(
            result,
            Err(Error::AgentTooOld {
                api_version: 0,
                required: fwnp_sdk::REQUIRED_API_VERSION
            })
        ),
        "{result:?}"
    );
    // Watch first, then Status, both sent by connect; nothing else.
    let received = agent.received();
    assert!(
        matches!(received.first(), Some(LocalMessage::Watch(_))),
        "{received:?}"
    );
    assert!(
        matches!(received.get(1), Some(LocalMessage::Status(_))),
        "{received:?}"
    );
    assert_eq!(received.len(), 2, "{received:?}");
    // The connection is dropped with the error.
    agent.wait_closed(1).await;
}

#[tokio::test]
async fn an_agent_that_does_not_state_its_api_version_implements_version_1() {
    let agent = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Status(_) => Some(vec![status_of_version(req, None)]),
        _ => None,
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    assert_eq!(client.status().await.unwrap().api_version, 1);

    // A newer agent is used as it is.
    let newer = Harness::with_script(Box::new(|req| match req {
        LocalMessage::Status(_) => Some(vec![status_of_version(req, Some(7))]),
        _ => None,
    }));
    let client = Client::connect_to(&newer.path).await.unwrap();
    assert_eq!(client.status().await.unwrap().api_version, 7);
}

#[tokio::test]
async fn what_a_newer_agent_adds_is_ignored_or_fails_only_its_request() {
    // The first Open is left unanswered by the script; the test answers it by hand below.
    let first = std::sync::atomic::AtomicBool::new(true);
    let agent = Harness::with_script(Box::new(move |req| match req {
        LocalMessage::Wire(Message::Open(_))
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) =>
        {
            Some(vec![])
        }
        _ => None,
    }));
    let client = Client::connect_to(&agent.path).await.unwrap();
    let refused = tokio::spawn({
        let client = client.clone();
        async move { client.open(Opening::tcp(8080)).await }
    });
    let received = agent.wait_for("the open", |r| !opens(r).is_empty()).await;
    let id = opens(&received)[0].common.request_id.unwrap();
    assert!(id < 24, "one-byte id in this hand-made frame");
    // An Event of a kind this version does not know that carries the Open's request id:
    // {0: 66, 1: id, 3: h'00..', 4: 9}. An Event answers no request: ignored, and the Open
    // still waits for its answer.
    let mut odd_event = vec![
        0, 0, 0, 26, 0xa4, 0x00, 0x18, 0x42, 0x01, id as u8, 0x03, 0x50,
    ];
    odd_event.extend_from_slice(&[0; 16]);
    odd_event.extend_from_slice(&[0x04, 0x09]);
    agent.push_raw(&odd_event);
    // Denied with a local code above 1027 that this version does not know:
    // {0: 17, 1: id, 3: 1030, 4: "quiet hours"}. The request fails as refused, with the code's
    // number and the reason; the connection stays.
    let mut body = vec![
        0xa4, 0x00, 0x11, 0x01, id as u8, 0x03, 0x19, 0x04, 0x06, 0x04, 0x6b,
    ];
    body.extend_from_slice(b"quiet hours");
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    agent.push_raw(&frame);
    let result = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("the refused open was left hanging")
        .unwrap();
    let Err(error) = result else {
        panic!("the open was refused: {result:?}")
    };
    assert!(
        matches!(&error, Error::UnknownDenial { code: 1030, reason } if reason.as_deref() == Some("quiet hours")),
        "{error:?}"
    );
    assert!(error.is_denied() && !error.is_transient(), "{error:?}");
    assert_eq!((error.code_number(), error.code()), (Some(1030), None));
    assert_eq!(error.reason(), Some("quiet hours"));
    assert_eq!(error.to_string(), "denied (code 1030): quiet hours");

    let mut lease = client.open(Opening::tcp(8080)).await.unwrap();
    let lease_id = lease.id();
    // An Event of a kind this version does not know (9): {0: 66, 3: lease, 4: 9}. Ignored: the
    // lease is not ended, and the next known event still arrives.
    let mut unknown = vec![0, 0, 0, 24, 0xa3, 0x00, 0x18, 0x42, 0x03, 0x50];
    unknown.extend_from_slice(&lease_id.0);
    unknown.extend_from_slice(&[0x04, 0x09]);
    agent.push_raw(&unknown);
    let mut renewed = event(lease_id, EventKind::Renewed);
    renewed.expires_in_ms = Some(120_000);
    agent.push(&LocalMessage::Event(renewed));
    assert!(matches!(
        next(&mut lease).await,
        Some(LeaseEvent::Renewed { .. })
    ));
    assert!(lease.is_active());
    // The connection still serves requests.
    assert_eq!(client.status().await.unwrap().api_version, 1);
}
