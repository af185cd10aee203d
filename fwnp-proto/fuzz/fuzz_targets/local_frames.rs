//! Fuzzes the local API's framing and decoder with a byte stream read as frames, as the agent
//! reads its socket: each header must be checked without panicking, each body decoded without
//! panicking, and whatever decodes must encode to a frame that decodes to the same message and
//! encodes to itself again.
#![no_main]

use fwnp_proto::local::{FRAME_HEADER_LEN, decode_frame_body, encode_frame, frame_body_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one body first: most inputs are not well-framed streams.
    round_trip(data);
    let mut rest = data;
    while rest.len() >= FRAME_HEADER_LEN {
        let (header, body) = rest.split_at(FRAME_HEADER_LEN);
        let header = [header[0], header[1], header[2], header[3]];
        let Ok(len) = frame_body_len(header) else {
            return;
        };
        assert!(len >= 1, "an accepted header announces an empty body");
        let Some(body) = body.get(..len) else {
            return;
        };
        round_trip(body);
        rest = &rest[FRAME_HEADER_LEN + len..];
    }
});

fn round_trip(body: &[u8]) {
    let Ok(msg) = decode_frame_body(body) else {
        return;
    };
    let _ = (msg.request_id(), msg.type_number());
    let frame = encode_frame(&msg);
    let header = [frame[0], frame[1], frame[2], frame[3]];
    let len = frame_body_len(header).expect("the frame of a decoded message has a valid header");
    assert_eq!(
        len,
        frame.len() - FRAME_HEADER_LEN,
        "the header lies about the body"
    );
    let again = decode_frame_body(&frame[FRAME_HEADER_LEN..])
        .expect("the encoding of a decoded message decodes");
    assert_eq!(again, msg, "re-encoding changed the message");
    assert_eq!(encode_frame(&again), frame, "the encoding is not stable");
}
