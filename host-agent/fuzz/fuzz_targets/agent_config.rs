//! Fuzzes the host agent's configuration parser (`AgentConfig::parse`) with arbitrary text: it
//! must never panic, and every error must be one with a place and a reason.
#![no_main]

use fwnp_agent::config::{AgentConfig, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = AgentConfig::parse(text, "fuzz.toml") {
        assert!(
            matches!(e, ConfigError::Invalid { line, column, .. } if line >= 1 && column >= 1),
            "an error without a place: {e:?}"
        );
        let _ = e.to_string();
    }
});
