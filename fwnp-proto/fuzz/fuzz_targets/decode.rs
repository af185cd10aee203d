//! Fuzzes `codec::decode` with arbitrary bytes: it must never panic, and whatever it accepts
//! must validate without panicking and re-encode to bytes that decode to the same message and
//! encode to themselves again.
#![no_main]

use fwnp_proto::codec::{decode, encode, peek_request_id};
use fwnp_proto::validate::validate_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek_request_id(data);
    match decode(data) {
        Ok(msg) => {
            if let Err(e) = validate_message(&msg) {
                let _ = (e.kind(), e.result_code(), e.to_string());
            }
            let canonical = encode(&msg);
            let again =
                decode(&canonical).expect("the canonical encoding of a decoded message decodes");
            assert_eq!(again, msg, "re-encoding changed the message");
            assert_eq!(encode(&again), canonical, "the encoding is not stable");
        }
        Err(e) => {
            let _ = (
                e.kind(),
                e.result_code(),
                e.to_string(),
                e.unsupported_keys(),
            );
        }
    }
});
