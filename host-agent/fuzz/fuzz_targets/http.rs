//! Fuzzes the UPnP front end's HTTP request reader with arbitrary bytes: it must never panic,
//! a request read has a path and at most the body the bound allows, and when more is needed it
//! asks for no more than the head's and the body's bounds.
#![no_main]

use fwnp_agent::frontend::http::{Limits, Parsed, parse_request};
use fwnp_agent::frontend::upnp::MAX_BODY;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::with_body(MAX_BODY);
    match parse_request(data, &limits) {
        Ok(Parsed::Request(request)) => {
            assert!(request.body.len() <= limits.body);
            assert!(request.path.starts_with('/'));
            let _ = request.header("SOAPAction");
        }
        Ok(Parsed::Partial { room }) => {
            assert!(room > data.len(), "{room} <= {}", data.len());
            assert!(room <= limits.head + limits.body);
        }
        Err(e) => {
            let _ = e.status();
        }
    }
});
