//! Fuzzes the PCP request decoder with arbitrary datagrams: it must never panic; a request it
//! reads fits PCP's bounds, and every refusal's answer is a PCP answer of at most 1100 octets
//! with a non-zero result code.
#![no_main]

use fwnp_agent::frontend::pcp::{MAX_FILTERS, MAX_MESSAGE, Op, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_request(data) {
        Ok(request) => {
            assert!(data.len() <= MAX_MESSAGE && data.len().is_multiple_of(4));
            if let Op::Map(map) = request.op {
                assert!(map.filters.len() <= MAX_FILTERS);
            }
        }
        Err(e) => {
            if let Some(answer) = e.answer(data, 1) {
                assert!(answer.len() <= MAX_MESSAGE && answer.len().is_multiple_of(4));
                assert_eq!(answer[0], 2);
                assert!(answer[1] & 0x80 != 0);
                assert_ne!(answer[3], 0);
            }
            let _ = e.to_string();
        }
    }
});
