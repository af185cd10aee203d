//! Fuzzes the policy compiler (`Policy::from_str`) with arbitrary text: it must never panic,
//! every error must name the line and column it is about, and a policy that compiles must
//! render to TOML that compiles again to a policy rendering the same way.
#![no_main]

use fwnp_gateway::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::from_str(text, "fuzz.toml") {
        Ok(policy) => {
            let _ = (policy.summary(), policy.warnings().len());
            let rendered = policy.to_toml();
            let again = Policy::from_str(&rendered, "rendered.toml").unwrap_or_else(|e| {
                panic!("a compiled policy renders to text that does not compile: {e}\n{rendered}")
            });
            assert_eq!(again.to_toml(), rendered, "rendering is not stable");
        }
        Err(e) => {
            assert!(
                e.line >= 1 && e.column >= 1,
                "an error without a place: {e} ({:?})",
                e.kind
            );
            let _ = e.to_string();
        }
    }
});
