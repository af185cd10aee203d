//! The configuration file as the operator meets it: the documented example is valid, and the
//! real binary refuses a bad file with its line and reason (exit status 2).

use std::process::Command;

use fwnp_agent::config::{AgentConfig, ConfigError, MirrorMode};

fn check(text: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!(
        "fwnp-agent-config-{}-{}",
        std::process::id(),
        text.len()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_fwnp-agent"))
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run fwnp-agent");
    let _ = std::fs::remove_dir_all(&dir);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const MINIMAL: &str = r#"state_dir = "/var/lib/fwnp-agent"
[gateway]
address = "198.51.100.1:4433"
server_name = "198.51.100.1"
certificate = "/etc/fwnp/pki/h.pem"
key = "/etc/fwnp/pki/h.key"
ca = "/etc/fwnp/pki/ca.pem"
"#;

#[test]
fn a_minimal_file_is_valid() {
    let (code, stderr) = check(MINIMAL);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bad_files_are_refused_with_line_and_reason() {
    let cases = [
        (
            format!(
                "{MINIMAL}[mirror]\nmode = \"enforce\"\nalways_allowed = [{{ from = \"10.0.0.1/24\" }}]\n"
            ),
            ":10:",
            "host bits",
        ),
        (
            format!("{MINIMAL}[local]\nport_owner_grace = \"soon\"\n"),
            ":9:",
            "soon",
        ),
        (
            format!("{MINIMAL}[local]\nport_owner_grace = \"2 s\"\n"),
            ":9:",
            "unexpected ' '",
        ),
        (
            format!("{MINIMAL}[local]\nidle_timeout = \"60\"\n"),
            ":9:",
            "has no unit",
        ),
        (
            format!("{MINIMAL}[local]\nallowed_groups = [\"no-such-group-fwnp\"]\n"),
            ":9:",
            "groupadd --system no-such-group-fwnp",
        ),
        (
            format!(
                "{MINIMAL}[mirror]\nalways_allowed = [{{ from = \"10.0.0.0/8\", ports = 22 }}]\n"
            ),
            ":9:",
            "needs a protocol",
        ),
        (
            MINIMAL.replace("server_name", "servername"),
            ":4:",
            "servername",
        ),
        (
            format!(
                "{MINIMAL}[mirror]\nalways_allowed = [{{ from = \"10.0.0.0/8\", protocol = \"tcp\", ports = \"90-80\" }}]\n"
            ),
            ":9:",
            "reversed",
        ),
    ];
    for (text, line, reason) in cases {
        let (code, stderr) = check(&text);
        assert_eq!(code, 2, "{text}\n{stderr}");
        assert!(
            stderr.contains(line) && stderr.contains(reason),
            "expected {line} {reason}: {stderr}"
        );
    }
}

#[test]
fn parse_errors_carry_the_line() {
    match AgentConfig::parse(&format!("{MINIMAL}[mirror]\nmode = \"loud\"\n"), "a.toml") {
        Err(ConfigError::Invalid {
            line,
            column,
            reason,
            ..
        }) => {
            assert_eq!((line, column), (9, 8));
            assert!(
                reason.contains("\"enforce\", \"monitor\" or \"off\""),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    let config = AgentConfig::parse(
        &format!("{MINIMAL}[mirror]\nmode = \"monitor\"\n"),
        "a.toml",
    )
    .expect("valid");
    assert_eq!(config.mirror.mode, MirrorMode::Monitor);
}

#[test]
fn front_ends_are_off_by_default_and_their_keys_checked() {
    let config = AgentConfig::parse(MINIMAL, "a.toml").expect("valid");
    assert!(!config.frontends.natpmp && !config.frontends.pcp && !config.frontends.upnp);
    assert_eq!(config.frontends.upnp_port, 49152);
    assert_eq!(config.frontends.port, 5351);
    let config = AgentConfig::parse(
        &format!("{MINIMAL}[frontends]\nnatpmp = true\nport = 15351\ngateways = [\"192.0.2.1\", \"2001:db8::1\"]\n"),
        "a.toml",
    )
    .expect("valid");
    assert!(config.frontends.natpmp);
    assert_eq!(config.frontends.port, 15351);
    assert_eq!(config.frontends.gateways.len(), 2);
    for (text, line, reason) in [
        (
            format!("{MINIMAL}[frontends]\nport = 0\n"),
            9,
            "between 1 and 65535",
        ),
        (
            format!("{MINIMAL}[frontends]\nnatpmp = true\ngateways = [\"gw.example\"]\n"),
            10,
            "expected an IPv4 or IPv6 address",
        ),
        (
            format!("{MINIMAL}[frontends]\nnat_pmp = true\n"),
            9,
            "nat_pmp",
        ),
    ] {
        match AgentConfig::parse(&text, "a.toml") {
            Err(ConfigError::Invalid {
                line: at,
                reason: why,
                ..
            }) => {
                assert_eq!(at, line, "{why}");
                assert!(why.contains(reason), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}
