//! Fuzzes the UPnP front end's readers with arbitrary bytes: the SOAP request reader and the
//! SSDP search reader must never panic, and an action read has a name and at most the
//! arguments the reader allows.
#![no_main]

use fwnp_agent::frontend::upnp::{MAX_ARGUMENTS, parse_soap, search_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(action) = parse_soap(data) {
        assert!(action.arguments.len() <= MAX_ARGUMENTS);
        let _ = action.argument("NewExternalPort");
    }
    let _ = search_target(data);
});
