//! Lease events through libfwnp, seen from C (`tests/c/events.c`, built with `cc` against the
//! built library): the first by polling the lease's descriptor, the later ones by a callback on
//! the library's thread, where a blocking call is refused rather than deadlocking. The agent is
//! a scripted socket in this test speaking the local API's real frames (`fwnp_proto::local`),
//! because the events (a renewal, a re-open, a revocation) are pushed when the test says. The
//! program runs once as it is and once under Valgrind, which must find no leak and no error.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{VALGRIND, compile, crate_dir, require_valgrind};
use fwnp_interop_tests::TempDir;
use fwnp_proto::local::{
    self, Event, EventKind, LocalMessage, StatusAnswer, Watching, decode_frame_body, encode_frame,
    frame_body_len,
};
use fwnp_proto::{Common, Grant, Granted, LeaseId, Message, Released, Target};

/// Bound of every wait (Valgrind is slow).
const STEP: Duration = Duration::from_secs(60);
const FIRST: LeaseId = LeaseId([0xab; 16]);
const REOPENED: LeaseId = LeaseId([0xcd; 16]);

fn with_id(id: Option<u64>) -> Common {
    Common {
        request_id: id,
        critical: vec![],
    }
}

fn event(lease: LeaseId, kind: EventKind) -> LocalMessage {
    LocalMessage::Event(Event {
        common: with_id(None),
        lease,
        kind,
        expires_in_ms: None,
        reason: None,
        code: None,
        new_lease: None,
    })
}

/// The scripted agent: answers the requests of one connection and lets the test push frames.
struct Agent {
    path: PathBuf,
    connection: Arc<Mutex<Option<UnixStream>>>,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).expect("binding the scripted agent");
        let connection = Arc::new(Mutex::new(None));
        let shared = connection.clone();
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let writer = stream.try_clone().expect("a second handle");
            *shared.lock().unwrap() = Some(writer);
            serve(stream, &shared);
        });
        Agent { path, connection }
    }

    fn push(&self, message: &LocalMessage) {
        let mut connection = self.connection.lock().unwrap();
        let stream = connection.as_mut().expect("the program is connected");
        stream
            .write_all(&encode_frame(message))
            .expect("pushing a frame");
    }
}

/// Answers each request as the agent would for this story.
fn serve(mut stream: UnixStream, writer: &Mutex<Option<UnixStream>>) {
    loop {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let len = frame_body_len(header).expect("a valid frame header");
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).expect("a frame body");
        let request = decode_frame_body(&body).expect("a local API frame");
        let id = request.request_id();
        let mut answers = vec![];
        match request {
            LocalMessage::Watch(_) => answers.push(LocalMessage::Watching(Watching {
                common: with_id(id),
            })),
            LocalMessage::Status(_) => answers.push(LocalMessage::StatusAnswer(StatusAnswer {
                common: with_id(id),
                agent_version: "scripted".into(),
                gateway: "gw.example:4433".into(),
                connected: true,
                epoch: Some(7),
                mirror_mode: "enforce".into(),
                identity: None,
                leases: 0,
                last_error: None,
                api_version: Some(local::API_VERSION),
            })),
            LocalMessage::Wire(Message::Open(open)) => {
                let Target::Ports { protocol, ports } = open.opening.target else {
                    panic!("a port was asked");
                };
                answers.push(LocalMessage::Wire(Message::Granted(Granted {
                    common: with_id(id),
                    lease: FIRST,
                    grants: vec![Grant {
                        protocol,
                        ports,
                        host: "192.0.2.10".parse().unwrap(),
                        remotes: vec![],
                        app: None,
                    }],
                    lifetime: 300,
                    expires_ms: 1_900_000_000_000,
                    renew_after: 150,
                    epoch: 7,
                    narrowed: false,
                })));
                // The first event follows at once: the program polls for it.
                let mut renewed = event(FIRST, EventKind::Renewed);
                if let LocalMessage::Event(e) = &mut renewed {
                    e.expires_in_ms = Some(299_000);
                }
                answers.push(renewed);
            }
            LocalMessage::Wire(Message::Release(release)) => {
                answers.push(LocalMessage::Wire(Message::Released(Released {
                    common: with_id(id),
                    lease: release.lease,
                })))
            }
            other => panic!("unexpected request {other:?}"),
        }
        let mut writer = writer.lock().unwrap();
        let Some(writer) = writer.as_mut() else {
            return;
        };
        for answer in answers {
            if writer.write_all(&encode_frame(&answer)).is_err() {
                return;
            }
        }
    }
}

/// The next line of the program's output, within [`STEP`].
fn line(lines: &Receiver<String>) -> String {
    lines
        .recv_timeout(STEP)
        .expect("the program printed its next line in time")
}

/// Runs the program (under `wrapper` when given) through the whole story; returns its stderr.
fn run_story(exe: &Path, wrapper: &[&str]) -> String {
    let dir = TempDir::new("fwnp-c-events").expect("a temporary directory");
    let agent = Agent::start(dir.path());
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    let mut child = command
        .arg("8080")
        .env("FWNP_AGENT_SOCKET", &agent.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the program starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (sender, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    assert_eq!(line(&lines), format!("open {FIRST}"));
    assert_eq!(
        line(&lines),
        "poll 1",
        "the descriptor is readable with an event waiting"
    );
    let polled = line(&lines);
    let left: u64 = polled
        .strip_prefix("polled 1 ")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("a renewal with its time left: {polled}"));
    assert!((280_000..=299_000).contains(&left), "{polled}");
    assert_eq!(
        line(&lines),
        "then -12",
        "no second event: FWNP_ERR_NO_EVENT"
    );
    assert_eq!(
        line(&lines),
        "readable 0",
        "the descriptor is quiet once drained"
    );
    assert_eq!(line(&lines), "callback set");

    let mut reopened = event(FIRST, EventKind::Reopened);
    if let LocalMessage::Event(e) = &mut reopened {
        e.new_lease = Some(REOPENED);
        e.expires_in_ms = Some(300_000);
    }
    agent.push(&reopened);
    let mut revoked = event(REOPENED, EventKind::Revoked);
    if let LocalMessage::Event(e) = &mut revoked {
        e.reason = Some("the operator closed it".into());
    }
    agent.push(&revoked);

    assert_eq!(
        line(&lines),
        format!("callback reopened {REOPENED} release-in-callback -14"),
        "FWNP_ERR_WRONG_THREAD from a blocking call in the callback"
    );
    assert_eq!(
        line(&lines),
        "callback revoked: the operator closed it (2 events)"
    );
    assert_eq!(line(&lines), format!("id now {REOPENED}"));
    assert_eq!(line(&lines), "active 0");
    assert_eq!(
        line(&lines),
        "released 0",
        "releasing an ended lease succeeds"
    );

    let status = child.wait().expect("the program's status");
    let stderr = stderr.join().unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{stderr}");
    stderr
}

#[test]
fn events_come_by_descriptor_then_by_callback() {
    let dir = TempDir::new("fwnp-c-events-build").expect("a temporary directory");
    let exe = compile(
        &crate_dir().join("tests/c/events.c"),
        &dir.path().join("events"),
    );
    run_story(&exe, &[]);

    require_valgrind();
    let report = run_story(&exe, &VALGRIND);
    assert!(report.contains("ERROR SUMMARY: 0 errors"), "{report}");
}
