//! What the agent's binary is built from: none of the crates that only the gateway needs (its
//! store, admin HTTP server, metrics, certificate issuance, rate limiting, caches). Each would
//! grow every host's install and its attack surface for nothing the agent does; the SRV lookup
//! in particular must not bring a caching resolver back.

use std::process::Command;

/// Crates the agent must not depend on, whatever the path.
const GATEWAY_ONLY: &[&str] = &[
    "rusqlite",
    "libsqlite3-sys",
    "axum",
    "hyper",
    "prometheus",
    "rcgen",
    "governor",
    "moka",
    "hickory-resolver",
];

#[test]
fn the_agent_depends_on_none_of_the_gateways_crates() {
    let output = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--locked",
            "-p",
            "fwnp-agent",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    // Each line is "NAME vVERSION [(PATH)] [(*)]".
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(names.contains(&"fwnp-agent"), "{tree}");
    let found: Vec<&&str> = GATEWAY_ONLY
        .iter()
        .filter(|name| names.contains(name))
        .collect();
    assert!(found.is_empty(), "the agent depends on {found:?}:\n{tree}");
    assert!(names.contains(&"domain"), "the SRV lookup's crate: {tree}");
}
