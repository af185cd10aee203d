//! Fuzzes `codec::decode` with arbitrary bytes: it must never panic; whatever it accepts must
//! validate without panicking and re-encode to bytes that decode to the same message and
//! encode to themselves again; and the Denied answering any failure must itself be a valid
//! message that survives the same round trip.
#![no_main]

use fwnp_proto::Message;
use fwnp_proto::codec::{decode, encode, peek_request_id};
use fwnp_proto::validate::validate_message;
use libfuzzer_sys::fuzz_target;

fn check_answer(denied: fwnp_proto::Denied) {
    let answer = Message::Denied(denied);
    assert_eq!(
        validate_message(&answer),
        Ok(()),
        "an invalid Denied: {answer:?}"
    );
    assert_eq!(decode(&encode(&answer)).as_ref(), Ok(&answer));
}

fuzz_target!(|data: &[u8]| {
    let request_id = peek_request_id(data);
    match decode(data) {
        Ok(msg) => {
            if let Err(e) = validate_message(&msg) {
                let _ = (e.kind(), e.closes_connection());
                check_answer(e.to_denied(request_id));
            }
            let canonical = encode(&msg);
            let again =
                decode(&canonical).expect("the canonical encoding of a decoded message decodes");
            assert_eq!(again, msg, "re-encoding changed the message");
            assert_eq!(encode(&again), canonical, "the encoding is not stable");
        }
        Err(e) => {
            let _ = e.kind();
            check_answer(e.to_denied(request_id));
        }
    }
});
