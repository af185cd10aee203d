//! A scripted stand-in for the host agent's socket, for testing the SDK's and the `fwnp`
//! command's own logic: it speaks the real local API frames of `fwnp_proto::local` (the same
//! encoder and decoder the agent uses), records every request it receives, answers with
//! scripted replies, and can push Event frames.
//!
//! It makes no claim about what the real agent does: it answers what each test tells it to.
//! End-to-end tests against the real `fwnp-agent` (and gateway, and kernel) live in
//! `host-agent/` and `interop-tests/`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fwnp_proto::local::{
    self, DenialCode, Event, EventKind, LocalDenied, LocalMessage, StatusAnswer, Watching,
};
use fwnp_proto::{Common, Grant, Granted, LeaseId, LeaseInfo, Leases, Message, Released, Target};

/// A custom reply: `Some(frames)` answers with those frames (possibly none), `None` falls back
/// to the default answers.
pub(crate) type Script = Box<dyn FnMut(&LocalMessage) -> Option<Vec<LocalMessage>> + Send>;

/// The address the default Granted puts in its grants.
pub(crate) const HOST: &str = "192.0.2.10";

#[derive(Default)]
struct State {
    received: Vec<LocalMessage>,
    /// Write halves of the live connections, in accept order.
    connections: Vec<UnixStream>,
    accepted: usize,
    closed: usize,
    granted: Vec<(LeaseId, Vec<Grant>)>,
}

/// The harness: a listening socket in a temporary directory, served by threads.
pub(crate) struct Harness {
    pub(crate) path: PathBuf,
    _dir: tempfile::TempDir,
    state: Arc<(Mutex<State>, Condvar)>,
}

pub(crate) fn common(id: Option<u64>) -> Common {
    Common {
        request_id: id,
        critical: vec![],
    }
}

pub(crate) fn denied(
    id: Option<u64>,
    code: DenialCode,
    reason: &str,
    retry: Option<u32>,
) -> LocalMessage {
    LocalMessage::Denied(LocalDenied {
        common: common(id),
        code,
        reason: Some(reason.to_owned()),
        retry_after: retry,
        lease: None,
        unsupported: vec![],
    })
}

pub(crate) fn event(lease: LeaseId, kind: EventKind) -> Event {
    Event {
        common: common(None),
        lease,
        kind,
        expires_in_ms: None,
        reason: None,
        code: None,
        new_lease: None,
    }
}

static NEXT_LEASE: AtomicU8 = AtomicU8::new(1);

/// The default answer to an Open: a Granted of exactly what was asked, on each address named
/// or else on [`HOST`], for the lifetime asked (or 300 s), with a fresh lease id.
pub(crate) fn grant_for(open: &fwnp_proto::Open) -> Granted {
    let host: IpAddr = HOST.parse().unwrap();
    let named = open.opening.host.addresses();
    let hosts = if named.is_empty() {
        vec![host]
    } else {
        named.to_vec()
    };
    let grants = match &open.opening.target {
        Target::Ports { protocol, ports } => hosts
            .iter()
            .map(|h| Grant {
                protocol: *protocol,
                ports: *ports,
                host: *h,
                remotes: open.opening.remotes.clone(),
                app: None,
            })
            .collect(),
        Target::App(id) => vec![Grant {
            protocol: fwnp_proto::Protocol::Tcp,
            ports: fwnp_proto::PortRange::single(443),
            host,
            remotes: vec![],
            app: Some(id.clone()),
        }],
    };
    let lifetime = open.lifetime.filter(|l| *l > 0).unwrap_or(300);
    Granted {
        common: open.common.clone(),
        lease: LeaseId([NEXT_LEASE.fetch_add(1, Ordering::Relaxed); 16]),
        grants,
        lifetime,
        expires_ms: 1_900_000_000_000,
        renew_after: lifetime / 2,
        epoch: 7,
        narrowed: false,
    }
}

impl Harness {
    /// A harness with the default answers only.
    pub(crate) fn start() -> Harness {
        Harness::with_script(Box::new(|_| None))
    }

    /// A harness that asks `script` first for every request.
    pub(crate) fn with_script(script: Script) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let script = Arc::new(Mutex::new(script));
        let accept_state = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                {
                    let (lock, cv) = &*accept_state;
                    let mut s = lock.lock().unwrap();
                    s.connections.push(stream.try_clone().unwrap());
                    s.accepted += 1;
                    cv.notify_all();
                }
                let state = accept_state.clone();
                let script = script.clone();
                std::thread::spawn(move || serve(stream, state, script));
            }
        });
        Harness {
            path,
            _dir: dir,
            state,
        }
    }

    /// Every request received so far, on every connection.
    pub(crate) fn received(&self) -> Vec<LocalMessage> {
        self.state.0.lock().unwrap().received.clone()
    }

    /// Waits (at most 5 s) until `check` holds for the requests received; panics otherwise.
    /// Polls, so that it can run on the same thread as the client under test.
    pub(crate) async fn wait_for(
        &self,
        what: &str,
        check: impl Fn(&[LocalMessage]) -> bool,
    ) -> Vec<LocalMessage> {
        self.wait_state(what, |s| check(&s.received)).await;
        self.received()
    }

    async fn wait_state(&self, what: &str, check: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            {
                let s = self.state.0.lock().unwrap();
                if check(&s) {
                    return;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "harness: timed out waiting for {what}; received {:#?}",
                        s.received
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `n` connections have been closed by their client.
    pub(crate) async fn wait_closed(&self, n: usize) {
        self.wait_state("connections to close", |s| s.closed >= n)
            .await;
    }

    /// How many connections were closed by their client so far.
    pub(crate) fn closed(&self) -> usize {
        self.state.0.lock().unwrap().closed
    }

    /// Sends a frame on the most recent connection.
    pub(crate) fn push(&self, message: &LocalMessage) {
        let mut s = self.state.0.lock().unwrap();
        let conn = s.connections.last_mut().expect("no connection yet");
        conn.write_all(&local::encode_frame(message)).unwrap();
    }

    /// Sends raw bytes on the most recent connection.
    pub(crate) fn push_raw(&self, bytes: &[u8]) {
        let mut s = self.state.0.lock().unwrap();
        let conn = s.connections.last_mut().expect("no connection yet");
        conn.write_all(bytes).unwrap();
    }

    /// Closes every connection from the agent's side.
    pub(crate) fn hang_up(&self) {
        let s = self.state.0.lock().unwrap();
        for conn in &s.connections {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Leases granted by the default answer, released ones removed.
    pub(crate) fn live(&self) -> Vec<LeaseId> {
        self.state
            .0
            .lock()
            .unwrap()
            .granted
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }
}

fn read_frame(stream: &mut UnixStream) -> Option<Result<LocalMessage, local::LocalError>> {
    let mut header = [0u8; local::FRAME_HEADER_LEN];
    stream.read_exact(&mut header).ok()?;
    let len = match local::frame_body_len(header) {
        Ok(len) => len,
        Err(e) => return Some(Err(e)),
    };
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(local::decode_frame_body(&body))
}

fn serve(mut stream: UnixStream, state: Arc<(Mutex<State>, Condvar)>, script: Arc<Mutex<Script>>) {
    let mut writer = stream.try_clone().unwrap();
    while let Some(frame) = read_frame(&mut stream) {
        let Ok(request) = frame else {
            break;
        };
        let scripted = (script.lock().unwrap())(&request);
        let replies = match scripted {
            Some(replies) => replies,
            None => default_answer(&request, &state),
        };
        {
            let (lock, cv) = &*state;
            lock.lock().unwrap().received.push(request);
            cv.notify_all();
        }
        for reply in replies {
            if writer.write_all(&local::encode_frame(&reply)).is_err() {
                break;
            }
        }
    }
    let (lock, cv) = &*state;
    lock.lock().unwrap().closed += 1;
    cv.notify_all();
}

fn default_answer(
    request: &LocalMessage,
    state: &Arc<(Mutex<State>, Condvar)>,
) -> Vec<LocalMessage> {
    let id = request.request_id();
    match request {
        LocalMessage::Watch(_) => vec![LocalMessage::Watching(Watching { common: common(id) })],
        LocalMessage::Status(_) => vec![LocalMessage::StatusAnswer(StatusAnswer {
            common: common(id),
            agent_version: "harness 0".into(),
            gateway: "gw.example:4433".into(),
            connected: true,
            epoch: Some(7),
            mirror_mode: "enforce".into(),
            identity: Some("fwnp://host/web-01".into()),
            leases: state.0.lock().unwrap().granted.len() as u64,
            last_error: None,
            api_version: Some(local::API_VERSION),
        })],
        LocalMessage::Wire(Message::Open(open)) => {
            let granted = grant_for(open);
            state
                .0
                .lock()
                .unwrap()
                .granted
                .push((granted.lease, granted.grants.clone()));
            vec![LocalMessage::Wire(Message::Granted(granted))]
        }
        LocalMessage::Wire(Message::Release(release)) => {
            let mut s = state.0.lock().unwrap();
            let before = s.granted.len();
            s.granted.retain(|(l, _)| *l != release.lease);
            if s.granted.len() == before {
                vec![denied(
                    id,
                    DenialCode::Local(local::LocalCode::UnknownLocalLease),
                    "no such lease on this connection",
                    None,
                )]
            } else {
                vec![LocalMessage::Wire(Message::Released(Released {
                    common: common(id),
                    lease: release.lease,
                }))]
            }
        }
        LocalMessage::Wire(Message::List(_)) => {
            let s = state.0.lock().unwrap();
            vec![LocalMessage::Wire(Message::Leases(Leases {
                common: common(id),
                leases: s
                    .granted
                    .iter()
                    .map(|(lease, grants)| LeaseInfo {
                        lease: *lease,
                        grants: grants.clone(),
                        remaining: 120,
                        expires_ms: 1_900_000_000_000,
                        app: None,
                    })
                    .collect(),
                epoch: 7,
            }))]
        }
        _ => vec![denied(
            id,
            DenialCode::Wire(fwnp_proto::ResultCode::MalformedRequest),
            "not a request",
            None,
        )],
    }
}
