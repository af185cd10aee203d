//! Fuzzes the NAT-PMP request decoder with arbitrary datagrams: it must never panic; a request
//! it reads is one of the RFC's layouts, and every refusal that is answered is answered with an
//! answer opcode and a non-zero result code.
#![no_main]

use fwnp_agent::frontend::natpmp::{MAP_REQUEST_LEN, Request, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_request(data) {
        Ok(Request::ExternalAddress) => assert_eq!(data.get(..2), Some(&[0u8, 0][..])),
        Ok(Request::Map { .. }) => assert!(data.len() >= MAP_REQUEST_LEN && data[0] == 0),
        Err(e) => {
            if let Some(answer) = e.answer(1) {
                assert!(answer[1] >= 128);
                assert_ne!(u16::from_be_bytes([answer[2], answer[3]]), 0);
            }
            let _ = e.to_string();
        }
    }
});
