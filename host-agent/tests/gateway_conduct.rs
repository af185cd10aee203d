//! The real `fwnp-agent` against scripted gateways on loopback (real QUIC endpoints with the
//! gateway's TLS configuration and certificates) that do what FWNP's own gateway rarely does:
//! refuse every version the agent offers (spec 13, unsupported-version), go away with or without
//! asking to be left alone for a while (spec 8.14), send a notice the agent cannot read, or lose
//! one on its way (spec 5.3). No root needed (mirror off).

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scripted::{
    Conduct, LeaseTable, Reply, Terms, answer_common, denied, lock, pki, runtime, spawn_gateway,
    start_agent, wait_connected_to,
};
use common::*;
use fwnp_proto::codec::DecodeError;
use fwnp_proto::local::{DenialCode, LocalMessage};
use fwnp_proto::{Common, Epoch, GoingAway, Message, QuicErrorCode, ResultCode};

const EPOCH: Epoch = 0x5c21_97ed_0000_00c3;
const LIFETIME_SECS: u32 = 600;
const TERMS: Terms = Terms {
    epoch: EPOCH,
    lifetime: LIFETIME_SECS,
    renew_after: LIFETIME_SECS / 2,
    lifetimes: (LIFETIME_SECS, LIFETIME_SECS),
    lease_fill: 0xc3,
};
/// A connection that lived at least this long is followed at once by the next gateway.
const UPTIME: Duration = Duration::from_millis(1200);

/// One scripted gateway: what it is told to do, and what it has seen.
#[derive(Debug, Default)]
struct Script {
    /// Answer Hello with Denied unsupported-version, then close with `VersionMismatch`.
    refuse_versions: bool,
    /// Every request, with when it came.
    seen: Vec<(Instant, Message)>,
    /// Its connections, the latest last.
    connections: Vec<quinn::Connection>,
    leases: LeaseTable,
}

type Shared = Arc<Mutex<Script>>;

impl Conduct for Mutex<Script> {
    fn accepted(&self, connection: &quinn::Connection) {
        lock(self).connections.push(connection.clone());
    }

    fn reply(&self, request: Result<Message, DecodeError>, remote: IpAddr) -> Reply {
        let Ok(request) = request else {
            return Reply::Nothing;
        };
        let mut script = lock(self);
        script.seen.push((Instant::now(), request.clone()));
        if script.refuse_versions && matches!(request, Message::Hello(_)) {
            let refusal = denied(
                answer_common(&request),
                ResultCode::UnsupportedVersion,
                Some("this gateway speaks version 2 only"),
                None,
            );
            return Reply::AnswerAndClose(
                refusal,
                QuicErrorCode::VersionMismatch,
                b"no version in common",
            );
        }
        Reply::Answer(script.leases.answer(&TERMS, &request, remote))
    }
}

/// A scripted gateway serving in `runtime`: its address and its script.
fn start_gateway(
    pki: &Pki,
    runtime: &tokio::runtime::Runtime,
    refuse_versions: bool,
) -> (SocketAddr, Shared) {
    let script: Shared = Arc::new(Mutex::new(Script {
        refuse_versions,
        ..Script::default()
    }));
    (spawn_gateway(pki, runtime, script.clone()), script)
}

/// How many requests of the kind `what` picks the gateway has seen, since `after` if given.
fn count(script: &Shared, after: Option<Instant>, what: fn(&Message) -> bool) -> usize {
    lock(script)
        .seen
        .iter()
        .filter(|(at, m)| after.is_none_or(|after| *at > after) && what(m))
        .count()
}

fn is_hello(m: &Message) -> bool {
    matches!(m, Message::Hello(_))
}

fn is_list(m: &Message) -> bool {
    matches!(m, Message::List(_))
}

/// When the gateway first saw a request of the kind `what` picks after `after`.
fn first_after(script: &Shared, after: Instant, what: fn(&Message) -> bool) -> Option<Instant> {
    lock(script)
        .seen
        .iter()
        .find(|(at, m)| *at > after && what(m))
        .map(|(at, _)| *at)
}

/// The gateway's latest connection.
fn latest_connection(script: &Shared) -> quinn::Connection {
    lock(script)
        .connections
        .last()
        .cloned()
        .expect("a connection")
}

/// Sends `bytes` as one notice on the gateway's latest connection and waits until the agent
/// read it (or stopped its stream).
fn send_notice(runtime: &tokio::runtime::Runtime, script: &Shared, bytes: Vec<u8>) {
    let connection = latest_connection(script);
    runtime.block_on(async move {
        let mut stream = connection.open_uni().await.expect("a notice stream");
        // A stream the agent stopped (too long) refuses the rest: that is its answer.
        let _ = stream.write_all(&bytes).await;
        let _ = stream.finish();
        let _ = tokio::time::timeout(STEP, stream.stopped()).await;
    });
}

/// Opens a notice stream on the gateway's latest connection and writes `bytes` on it without
/// ending it: the stream, for the test to reset or leave open (dropping it ends it).
fn begin_notice(
    runtime: &tokio::runtime::Runtime,
    script: &Shared,
    bytes: &'static [u8],
) -> quinn::SendStream {
    let connection = latest_connection(script);
    runtime.block_on(async move {
        let mut stream = connection.open_uni().await.expect("a notice stream");
        stream
            .write_all(bytes)
            .await
            .expect("the notice's first bytes");
        stream
    })
}

/// Closes the gateway's latest connection with `code`.
fn close_latest(script: &Shared, code: QuicErrorCode) {
    latest_connection(script).close(quinn::VarInt::from_u32(code.code()), b"scripted");
}

/// Waits up to `within` for `done`, checking every 50 ms.
fn eventually(within: Duration, done: impl FnMut() -> bool) -> bool {
    fwnp_testkit::netns::wait_until(within, Duration::from_millis(50), done)
}

/// The only gateway refuses every version the agent offers: the agent does not say Hello to it
/// again (the same Hello would be refused), Status says why it is not connected, naming the
/// gateway and the refusal, and an application's Open is refused at once with
/// unsupported-version rather than left to wait for a connection that will not come.
#[test]
fn a_gateway_that_refuses_the_versions_is_not_asked_again() {
    let pki = pki("versions");
    let runtime = runtime();
    let (a, script) = start_gateway(&pki, &runtime, true);
    let dir = temp_dir("versions");
    let (_agent, socket) = start_agent(&pki, &dir, &[a]);
    let mut client = LocalClient::connect(&socket);

    assert!(
        eventually(STEP, || count(&script, None, is_hello) >= 1),
        "no Hello"
    );
    // Long enough for two more attempts at the reconnection delays (1 s, then 2 s).
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(count(&script, None, is_hello), 1, "asked again");

    let status = client.status();
    assert!(!status.connected);
    let last_error = status.last_error.unwrap_or_default();
    assert!(
        last_error.contains(&a.to_string()) && last_error.contains("unsupported-version"),
        "{last_error}"
    );

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let started = Instant::now();
    match client.open(fwnp_proto::Protocol::Tcp, port, None, STEP) {
        LocalMessage::Denied(d) => {
            assert_eq!(
                d.code,
                DenialCode::Wire(ResultCode::UnsupportedVersion),
                "{d:?}"
            );
            assert!(
                d.reason.as_deref().unwrap_or("").contains(&a.to_string()),
                "{d:?}"
            );
        }
        other => panic!("Open answered with {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Of two gateways, the first refuses every version the agent offers: the agent connects to
/// the second, and when that connection ends it goes back to the second, never to the first.
#[test]
fn with_several_gateways_one_that_refuses_the_versions_is_left_for_the_others() {
    let pki = pki("versions-two");
    let runtime = runtime();
    let (a, refusing) = start_gateway(&pki, &runtime, true);
    let (b, welcoming) = start_gateway(&pki, &runtime, false);
    let dir = temp_dir("versions-two");
    let (_agent, socket) = start_agent(&pki, &dir, &[a, b]);
    let mut status = LocalClient::connect(&socket);
    wait_connected_to(&mut status, b);
    assert_eq!(count(&refusing, None, is_hello), 1);

    std::thread::sleep(UPTIME);
    close_latest(&welcoming, QuicErrorCode::NoError);
    assert!(
        eventually(STEP, || count(&welcoming, None, is_hello) >= 2),
        "the agent did not come back to the second gateway"
    );
    wait_connected_to(&mut status, b);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&refusing, None, is_hello),
        1,
        "the refusing gateway was asked again"
    );
}

/// Of two gateways, the one in use sends GoingAway asking for 30 s and closes: the agent goes
/// on with the other at once, and when that one's connection ends too it does not go back to
/// the departed gateway before its time, but to the other again.
#[test]
fn a_gateway_that_went_away_is_not_tried_again_before_its_reconnect_after() {
    let pki = pki("going-away");
    let runtime = runtime();
    let (a, departing) = start_gateway(&pki, &runtime, false);
    let (b, staying) = start_gateway(&pki, &runtime, false);
    let dir = temp_dir("going-away");
    let (_agent, socket) = start_agent(&pki, &dir, &[a, b]);
    let mut status = LocalClient::connect(&socket);
    wait_connected_to(&mut status, a);

    std::thread::sleep(UPTIME);
    let notice = Message::GoingAway(GoingAway {
        common: Common::default(),
        reconnect_after: Some(30),
        reason: Some("maintenance".into()),
    });
    send_notice(&runtime, &departing, fwnp_proto::codec::encode(&notice));
    close_latest(&departing, QuicErrorCode::GoingAway);
    let went = Instant::now();
    wait_connected_to(&mut status, b);
    assert!(
        went.elapsed() < Duration::from_secs(3),
        "{:?}",
        went.elapsed()
    );

    std::thread::sleep(UPTIME);
    close_latest(&staying, QuicErrorCode::NoError);
    let lost = Instant::now();
    assert!(
        eventually(STEP, || {
            count(&staying, Some(lost), is_hello) + count(&departing, Some(went), is_hello) > 0
        }),
        "the agent did not connect again"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&departing, Some(went), is_hello),
        0,
        "the departed gateway was tried again {:?} after it went away",
        went.elapsed()
    );
    wait_connected_to(&mut status, b);
}

/// Of two gateways, the one in use sends GoingAway without reconnect-after and closes, and the
/// other cannot take its place (it refuses the agent's versions): the departed gateway is tried
/// again after the delay of a lost connection (spec 8.14, 3.5: a second, +-20 %), not at once
/// when the other one failed; then the agent is connected to it again.
#[test]
fn a_gateway_that_went_away_without_a_delay_is_tried_again_after_the_usual_one() {
    let pki = pki("going-away-plain");
    let runtime = runtime();
    let (a, departing) = start_gateway(&pki, &runtime, false);
    let (b, refusing) = start_gateway(&pki, &runtime, true);
    let dir = temp_dir("going-away-plain");
    let (_agent, socket) = start_agent(&pki, &dir, &[a, b]);
    let mut status = LocalClient::connect(&socket);
    wait_connected_to(&mut status, a);
    assert_eq!(count(&refusing, None, is_hello), 0);

    std::thread::sleep(UPTIME);
    let notice = Message::GoingAway(GoingAway {
        common: Common::default(),
        reconnect_after: None,
        reason: Some("restart".into()),
    });
    send_notice(&runtime, &departing, fwnp_proto::codec::encode(&notice));
    close_latest(&departing, QuicErrorCode::GoingAway);
    let went = Instant::now();
    assert!(
        eventually(STEP, || first_after(&departing, went, is_hello).is_some()),
        "the departed gateway was not tried again"
    );
    let back = first_after(&departing, went, is_hello).unwrap_or(went) - went;
    let other = first_after(&refusing, went, is_hello).map(|at| at - went);
    assert!(
        other.is_some_and(|other| other < back),
        "the other gateway was not tried first: {other:?}, the departed one {back:?} after it went"
    );
    assert!(
        back >= Duration::from_millis(800),
        "the departed gateway was tried again {back:?} after it went away"
    );
    wait_connected_to(&mut status, a);
}

/// Notices the agent cannot read: one of a type it does not know is ignored (spec 5.3); one of
/// a known type that does not decode, and one longer than 16,384 bytes, are discarded, and the
/// agent asks for the list of its leases to learn what it missed. The connection stays.
#[test]
fn a_notice_that_does_not_decode_makes_the_agent_list_its_leases() {
    let pki = pki("notices");
    let runtime = runtime();
    let (a, script) = start_gateway(&pki, &runtime, false);
    let dir = temp_dir("notices");
    let (_agent, socket) = start_agent(&pki, &dir, &[a]);
    let mut status = LocalClient::connect(&socket);
    wait_connected_to(&mut status, a);
    assert!(eventually(STEP, || count(&script, None, is_list) == 1));

    // {0: 99}: a notice type of a later version.
    send_notice(&runtime, &script, vec![0xa1, 0x00, 0x18, 0x63]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(&script, None, is_list),
        1,
        "listed after an unknown notice"
    );

    // {0: 32, 3: h'010203', 4: 1}: a Revoked whose lease id is 3 bytes, not 16.
    send_notice(
        &runtime,
        &script,
        vec![
            0xa3, 0x00, 0x18, 0x20, 0x03, 0x43, 0x01, 0x02, 0x03, 0x04, 0x01,
        ],
    );
    assert!(
        eventually(STEP, || count(&script, None, is_list) == 2),
        "no List after an undecodable notice"
    );

    send_notice(
        &runtime,
        &script,
        vec![0u8; fwnp_proto::MAX_MESSAGE_SIZE + 1],
    );
    assert!(
        eventually(STEP, || count(&script, None, is_list) == 3),
        "no List after a notice too long"
    );
    assert!(status.status().connected);
    assert_eq!(
        count(&script, None, is_hello),
        1,
        "the connection was made again"
    );
}

/// Notices lost on their way (spec 5.3): a notice stream the gateway resets, and one that does
/// not end within the agent's bound, may each have carried a Revoked or an EpochChanged; the
/// agent asks for the list of its leases after each, as after a notice it discarded, and once
/// only. The connection stays.
#[test]
fn a_notice_lost_on_its_way_makes_the_agent_list_its_leases() {
    let pki = pki("lost-notices");
    let runtime = runtime();
    let (a, script) = start_gateway(&pki, &runtime, false);
    let dir = temp_dir("lost-notices");
    let (_agent, socket) = start_agent(&pki, &dir, &[a]);
    let mut status = LocalClient::connect(&socket);
    wait_connected_to(&mut status, a);
    assert!(eventually(STEP, || count(&script, None, is_list) == 1));

    // The first bytes of a Revoked ({0: 32, ...}), then the stream is reset.
    let revoked_start: &[u8] = &[0xa3, 0x00, 0x18, 0x20];
    let mut reset = begin_notice(&runtime, &script, revoked_start);
    reset
        .reset(quinn::VarInt::from_u32(QuicErrorCode::InternalError.code()))
        .expect("reset the notice stream");
    assert!(
        eventually(STEP, || count(&script, None, is_list) == 2),
        "no List after a notice stream was reset"
    );

    // The same bytes on a stream that does not end.
    let unfinished = begin_notice(&runtime, &script, revoked_start);
    assert!(
        eventually(fwnp_agent::link::EXCHANGE_TIMEOUT + STEP, || {
            count(&script, None, is_list) == 3
        }),
        "no List after a notice stream that did not end"
    );
    drop(unfinished);

    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(&script, None, is_list),
        3,
        "listed more than once each"
    );
    assert!(status.status().connected);
    assert_eq!(
        count(&script, None, is_hello),
        1,
        "the connection was made again"
    );
}
