//! Refusals seen from C (`tests/c/denied.c`, built with `cc` against the built library): a
//! Denied whose code the library does not name (a local code a newer agent added) answers
//! `FWNP_ERR_DENIED` with the code's number and the reason kept, and a known one its own code
//! with its reason. The agent is a scripted socket speaking the local API's real frames.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;

mod common;

use common::{compile, crate_dir};
use fwnp_interop_tests::TempDir;
use fwnp_proto::local::{
    self, DenialCode, LocalDenied, LocalMessage, StatusAnswer, Watching, decode_frame_body,
    encode_frame, frame_body_len,
};
use fwnp_proto::{Common, Message, ResultCode};

/// Local code 1099, unknown to this version: `{0: 17, 1: id, 3: 1099, 4: "quiet hours"}`.
fn unknown_denial(id: u8) -> Vec<u8> {
    let mut body = vec![
        0xa4, 0x00, 0x11, 0x01, id, 0x03, 0x19, 0x04, 0x4b, 0x04, 0x6b,
    ];
    body.extend_from_slice(b"quiet hours");
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Answers Watch and Status as an agent, the first Open with the unknown code, the second denied by
/// policy.
fn serve(listener: UnixListener) {
    let Ok((mut stream, _)) = listener.accept() else {
        return;
    };
    let mut opens = 0;
    loop {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let len = frame_body_len(header).expect("a valid frame header");
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).expect("a frame body");
        let request = decode_frame_body(&body).expect("a local API frame");
        let common = Common {
            request_id: request.request_id(),
            critical: vec![],
        };
        let answer = match request {
            LocalMessage::Watch(_) => encode_frame(&LocalMessage::Watching(Watching { common })),
            LocalMessage::Status(_) => encode_frame(&LocalMessage::StatusAnswer(StatusAnswer {
                common,
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
            LocalMessage::Wire(Message::Open(_)) if opens == 0 => {
                opens += 1;
                let id = common.request_id.expect("an id");
                unknown_denial(u8::try_from(id).expect("a one-byte id in this hand-made frame"))
            }
            LocalMessage::Wire(Message::Open(_)) => {
                encode_frame(&LocalMessage::Denied(LocalDenied {
                    common,
                    code: DenialCode::Wire(ResultCode::DeniedByPolicy),
                    reason: Some("rule web: tcp/443 only".into()),
                    retry_after: None,
                    lease: None,
                    unsupported: vec![],
                }))
            }
            other => panic!("unexpected request {other:?}"),
        };
        if stream.write_all(&answer).is_err() {
            return;
        }
    }
}

#[test]
fn a_refusal_keeps_its_code_number_and_reason_known_or_not() {
    let dir = TempDir::new("fwnp-c-denied").expect("a temporary directory");
    let exe = compile(
        &crate_dir().join("tests/c/denied.c"),
        &dir.path().join("denied"),
    );
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("binding the scripted agent");
    let agent = std::thread::spawn(move || serve(listener));
    let output = Command::new(&exe)
        .arg("8080")
        .env("FWNP_AGENT_SOCKET", &socket)
        .output()
        .expect("the program runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "rc -13 code 1099 reason quiet hours error fwnp_client_open: denied (code 1099): quiet hours",
            "rc 7 code 7 reason rule web: tcp/443 only error fwnp_client_open: denied by policy: rule web: tcp/443 only",
            "after 0 (null)",
        ],
        "{stdout}"
    );
    agent.join().expect("the scripted agent");
}
