//! The examples as a new user meets them: run without an agent, they say what is wrong in
//! words (the error's Display), not in the Debug form of the error value.

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples beside the test binaries: target/debug/examples/NAME.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let debug = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    let path = debug.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: `cargo test` builds the examples, `cargo test --test examples` alone \
         does not (run `cargo build --examples` first)",
        path.display()
    );
    path
}

#[test]
fn serve_without_an_agent_explains_what_is_missing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("no-agent.sock");
    let output = Command::new(example("serve"))
        .args(["0", "60"])
        .env("FWNP_AGENT_SOCKET", &socket)
        .output()
        .expect("run the serve example");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("serve: cannot reach the FWNP host agent at"),
        "{stderr}"
    );
    assert!(stderr.contains("is fwnp-agent running?"), "{stderr}");
    assert!(!stderr.contains("AgentUnavailable"), "{stderr}");
}
