//! `fwnpctl` as an operator runs it: the commands that work on files (pki, policy check,
//! policy explain --policy) and the exit codes that scripts rely on. The commands that talk
//! to a running gateway are exercised against the real daemon by the lab and the end-to-end
//! suite in interop-tests.

use std::path::Path;
use std::process::{Command, Output};

fn fwnpctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fwnpctl"))
        .args(args)
        .env_remove("FWNP_ADMIN_SOCKET")
        .env_remove("FWNP_PKI_DIR")
        .output()
        .expect("run fwnpctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fwnpctl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

const EXAMPLE_POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml");

#[test]
fn policy_check_accepts_the_example_and_names_the_line_of_a_mistake() {
    let out = fwnpctl(&["policy", "check", EXAMPLE_POLICY]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid"), "{}", text(&out.stdout));

    let dir = temp_dir("check");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[group]]\nname = \"web\"\nidentities = [\"fwnp://host/web-*\"]\n\n[[rule]]\nname = \"r\"\ngroups = [\"web\"]\nallow = [\"tcp/0\"]\n",
    )
    .expect("write policy");
    let out = fwnpctl(&["policy", "check", bad.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml:8:"), "the error names line 8: {err}");

    let out = fwnpctl(&[
        "--json",
        "policy",
        "check",
        bad.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["valid"], false);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn policy_explain_against_a_file_exits_by_the_decision() {
    let dir = temp_dir("explain");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[group]]\nname = \"web\"\nidentities = [\"fwnp://host/web-*\"]\n\n[[rule]]\nname = \"web-https\"\ngroups = [\"web\"]\nallow = [\"tcp/443\"]\n",
    )
    .expect("write policy");
    let policy = policy.to_str().expect("utf-8 path");
    let allowed = fwnpctl(&[
        "policy",
        "explain",
        "--host",
        "fwnp://host/web-01",
        "--address",
        "10.1.0.5",
        "--open",
        "tcp/443",
        "--policy",
        policy,
    ]);
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed.stderr));
    assert!(
        text(&allowed.stdout).contains("web-https"),
        "{}",
        text(&allowed.stdout)
    );

    let denied = fwnpctl(&[
        "--json",
        "policy",
        "explain",
        "--host",
        "fwnp://host/db-01",
        "--address",
        "10.1.0.6",
        "--open",
        "tcp/443",
        "--policy",
        policy,
    ]);
    assert_eq!(denied.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&denied.stdout).expect("json");
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["code"], "denied-by-policy");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pki_init_issue_revoke_and_list() {
    let dir = temp_dir("pki");
    let ca = dir.join("pki");
    let ca_arg = ca.to_str().expect("utf-8 path");
    let out = fwnpctl(&["pki", "init", ca_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sha256"));

    let out = fwnpctl(&[
        "pki",
        "issue",
        "gateway",
        "gw",
        "--dir",
        ca_arg,
        "--dns",
        "gw.example.net",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = fwnpctl(&[
        "--json", "pki", "issue", "host", "web-01", "--dir", ca_arg, "--ip", "10.1.0.5",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let issued: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let key = issued["key"].as_str().expect("a key path");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(Path::new(key))
            .expect("key file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "host keys are private");

    // Issuing the same name twice refuses rather than overwriting a key.
    let again = fwnpctl(&["pki", "issue", "host", "web-01", "--dir", ca_arg]);
    assert_eq!(again.status.code(), Some(4), "{}", text(&again.stderr));

    let cert = ca.join("web-01.pem");
    let out = fwnpctl(&[
        "pki",
        "revoke",
        cert.to_str().expect("utf-8 path"),
        "--dir",
        ca_arg,
        "--reason",
        "key-compromise",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = fwnpctl(&["--json", "pki", "revoked", "--dir", ca_arg]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["serial"], issued["serial"]);
    assert_eq!(list[0]["reason"], "key-compromise");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_gateway_exits_three_and_says_why() {
    let out = fwnpctl(&["--admin", "/nonexistent/fwnp.sock", "status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("/nonexistent/fwnp.sock"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn completions_are_generated() {
    let out = fwnpctl(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("fwnpctl"));
}
