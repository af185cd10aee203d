//! The policy as an operator meets it: the example file, every class of mistake with its line
//! and reason, the matching semantics, explain, re-evaluation after a reload, and rendering.

use std::net::IpAddr;
use std::path::PathBuf;

use fwnp_gateway::policy::{
    Action, Decision, Defaults, GroupSpec, Item, Policy, PolicyBuilder, PolicyError,
    PolicyErrorKind, RateLimit, Request, RuleSpec, StepOutcome, parse_prefix,
};
use fwnp_proto::message::{Grant, PortRange, Prefix, Protocol, ResultCode, Target};
use proptest::prelude::*;

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/policy.toml")
}

fn example() -> Policy {
    Policy::load(&example_path()).unwrap_or_else(|e| panic!("{e}"))
}

fn policy(text: &str) -> Policy {
    Policy::from_str(text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn error(text: &str) -> PolicyError {
    match Policy::from_str(text, "test.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn prefix(text: &str) -> Prefix {
    parse_prefix(text).unwrap()
}

fn item(text: &str) -> Item {
    text.parse().unwrap()
}

fn target(text: &str) -> Target {
    item(text).to_target()
}

/// A request from a host holding `addresses`, for `what` ("tcp/443" or "app:https") on
/// `host` (the first address when empty), from `remotes`, for `lifetime` seconds.
struct Ask<'a> {
    identity: &'a str,
    addresses: Vec<IpAddr>,
    host: Option<IpAddr>,
    target: Target,
    remotes: Vec<Prefix>,
    lifetime: Option<u32>,
}

fn ask<'a>(identity: &'a str, addresses: &[&str], what: &str) -> Ask<'a> {
    Ask {
        identity,
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        host: None,
        target: target(what),
        remotes: Vec::new(),
        lifetime: None,
    }
}

impl Ask<'_> {
    fn on(mut self, host: &str) -> Self {
        self.host = Some(ip(host));
        self
    }
    fn from(mut self, remotes: &[&str]) -> Self {
        self.remotes = remotes.iter().map(|r| prefix(r)).collect();
        self
    }
    fn lifetime(mut self, secs: u32) -> Self {
        self.lifetime = Some(secs);
        self
    }
    fn request(&self) -> Request<'_> {
        Request {
            identity: self.identity,
            addresses: &self.addresses,
            host_address: self.host.unwrap_or_else(|| self.addresses[0]),
            target: &self.target,
            remotes: &self.remotes,
            lifetime: self.lifetime,
        }
    }
    fn to(&self, policy: &Policy) -> Decision {
        let decision = policy.evaluate(&self.request());
        // explain must always reach the same decision as evaluate.
        assert_eq!(policy.explain(&self.request()).decision, decision);
        decision
    }
}

fn rule_name(decision: &Decision) -> Option<&str> {
    decision.rule.as_ref().map(|r| &*r.name)
}

fn assert_allowed_by(decision: &Decision, rule: &str) {
    assert!(
        decision.is_allowed(),
        "expected allowed by {rule}: {decision}"
    );
    assert_eq!(rule_name(decision), Some(rule), "{decision}");
}

fn assert_denied(decision: &Decision, code: ResultCode, rule: Option<&str>) {
    assert_eq!(decision.denied_code(), Some(code), "{decision}");
    assert_eq!(rule_name(decision), rule, "{decision}");
}

// ---------------------------------------------------------------- the example file

#[test]
fn example_file_parses_without_warnings_and_decides_as_documented() {
    let policy = example();
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    assert_eq!(policy.rules().count(), 6);
    assert_eq!(policy.rate_limit().map(|r| r.burst.get()), Some(40));
    assert_eq!(policy.defaults(), &Defaults::default());

    let web = "spiffe://example.org/host/web-03";
    let d = ask(web, &["192.0.2.10"], "app:https").to(&policy);
    assert_allowed_by(&d, "web-public");
    let allowance = d.allowance().unwrap();
    assert_eq!(allowance.grants.len(), 2);
    assert_eq!(allowance.granted_lifetime_secs, 3600);
    assert!(
        allowance
            .grants
            .iter()
            .all(|g| g.app.as_deref() == Some("https"))
    );

    // SSH without remotes: narrowed to the admin network of the host's family.
    let d = ask(web, &["192.0.2.10"], "tcp/22").to(&policy);
    assert_allowed_by(&d, "ssh-from-admin");
    assert_eq!(
        d.allowance().unwrap().grants[0].remotes,
        vec![prefix("10.99.0.0/16")]
    );
    let d = ask(web, &["2001:db8:0:1::10"], "tcp/22").to(&policy);
    assert_eq!(
        d.allowance().unwrap().grants[0].remotes,
        vec![prefix("2001:db8:99::/48")]
    );
    // SSH from elsewhere: the deny rule.
    let d = ask(web, &["192.0.2.10"], "tcp/22")
        .from(&["203.0.113.0/24"])
        .to(&policy);
    assert_denied(&d, ResultCode::DeniedByPolicy, Some("no-other-ssh"));
    // A lab host may open anything but a range touching SSH.
    let lab = "fwnp://host/whatever";
    assert_allowed_by(
        &ask(lab, &["198.51.100.7"], "udp/1-65535").to(&policy),
        "lab-anything",
    );
    let d = ask(lab, &["198.51.100.7"], "tcp/1-1024")
        .from(&["192.0.2.0/24"])
        .to(&policy);
    assert_denied(&d, ResultCode::DeniedByPolicy, Some("no-other-ssh"));
    // The web certificate outside the web network is not a web server.
    let d = ask(web, &["198.18.0.1"], "tcp/443").to(&policy);
    assert_denied(&d, ResultCode::DeniedByPolicy, None);
    // Databases only from the app tier.
    let db = "db-1.internal.example.org";
    let d = ask(db, &["10.30.0.5"], "app:postgres").to(&policy);
    assert_eq!(
        d.allowance().unwrap().grants[0].remotes,
        vec![prefix("10.20.0.0/16")]
    );
    assert_eq!(d.allowance().unwrap().max_leases, 4);
    let d = ask(db, &["10.30.0.5"], "tcp/5432")
        .from(&["0.0.0.0/0"])
        .to(&policy);
    assert_denied(&d, ResultCode::DeniedByPolicy, None);
}

// ---------------------------------------------------------------- errors

/// Asserts the error's line, column, that its reason contains `reason`, and that it displays
/// as `test.toml:LINE:COL: reason`.
fn assert_error(text: &str, line: u32, column: u32, reason: &str) -> PolicyError {
    let e = error(text);
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("test.toml:{line}:{column}: ")),
        "wrong place: {shown}"
    );
    assert!(shown.contains(reason), "wrong reason: {shown}");
    assert_eq!((e.line, e.column), (line, column));
    e
}

const GROUP: &str = "[[group]]\nname = \"web\"\nidentities = \"fwnp://host/web-*\"\n";

#[test]
fn toml_syntax_errors_are_located() {
    assert_error("[defaults\nlifetime = \"1m\"\n", 1, 10, "");
    assert_error("[defaults]\nlifetime = \"1m\nmax_leases = 3\n", 2, 15, "");
    assert_error("[defaults]\n[defaults]\n", 2, 2, "duplicate");
}

#[test]
fn unknown_keys_are_errors() {
    let e = assert_error(
        "[defaults]\nlifetme = \"1m\"\n",
        2,
        1,
        "unknown field `lifetme`",
    );
    assert!(matches!(e.kind, PolicyErrorKind::Toml(_)));
    assert_error(
        &format!(
            "{GROUP}\n[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = \"tcp/1\"\naction = \"deny\"\n"
        ),
        9,
        1,
        "unknown field `action`",
    );
    assert_error("[nonsense]\n", 1, 2, "unknown field `nonsense`");
    assert_error(
        &format!("{GROUP}color = \"red\"\n"),
        4,
        1,
        "unknown field `color`",
    );
}

#[test]
fn missing_keys_and_wrong_types_are_errors() {
    assert_error(
        &format!("{GROUP}\n[[rule]]\ngroups = \"web\"\nallow = \"tcp/1\"\n"),
        5,
        1,
        "missing field `name`",
    );
    assert_error("[defaults]\nmax_leases = \"ten\"\n", 2, 14, "invalid type");
    assert_error(
        &format!("{GROUP}addresses = 10\n"),
        4,
        13,
        "a string or a list of strings",
    );
}

#[test]
fn bad_durations_are_errors() {
    let e = assert_error(
        "[defaults]\nlifetime = \"10 minutes\"\n",
        2,
        12,
        "bad duration",
    );
    assert!(matches!(e.kind, PolicyErrorKind::Duration { .. }));
    assert_error("[defaults]\nlifetime = \"10\"\n", 2, 12, "has no unit");
    assert_error("[defaults]\nlifetime = \"10y\"\n", 2, 12, "unknown unit");
    assert_error(
        "[defaults]\nlifetime = \"1h 30m\"\n",
        2,
        12,
        "unexpected ' '",
    );
    assert_error(
        "[defaults]\nlifetime = \"1500ms\"\n",
        2,
        12,
        "whole seconds",
    );
    assert_error("[defaults]\nlifetime = -5\n", 2, 12, "negative");
    assert_error("[defaults]\nmax_lifetime = \"8d\"\n", 2, 16, "7 days");
    assert_error(
        "[defaults]\nmin_lifetime = \"0s\"\n",
        2,
        16,
        "from 1 second",
    );
    // A number of seconds is fine.
    assert_eq!(
        policy("[defaults]\nlifetime = 90\n")
            .defaults()
            .lifetime_secs,
        90
    );
}

#[test]
fn lifetime_order_is_checked() {
    let e = assert_error(
        "[defaults]\nmin_lifetime = \"1h\"\nmax_lifetime = \"10m\"\n",
        2,
        16,
        "min_lifetime 1h",
    );
    assert!(matches!(e.kind, PolicyErrorKind::LifetimeOrder(_)));
    assert_error(
        "[defaults]\nlifetime = \"2h\"\nmax_lifetime = \"1h\"\n",
        2,
        12,
        "outside",
    );
    // A rule's minimum above the inherited maximum: the error points at the rule's key.
    assert_error(
        &format!(
            "{GROUP}[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = \"tcp/1\"\nmin_lifetime = \"2h\"\n"
        ),
        8,
        16,
        "set in [defaults]",
    );
    // Built-in values bend to what the file writes.
    let p = policy("[defaults]\nmax_lifetime = \"10s\"\n");
    assert_eq!(
        (
            p.defaults().min_lifetime_secs,
            p.defaults().lifetime_secs,
            p.defaults().max_lifetime_secs
        ),
        (10, 10, 10)
    );
    let p = policy("[defaults]\nlifetime = \"2h\"\n");
    assert_eq!(p.defaults().max_lifetime_secs, 7200);
}

#[test]
fn bad_prefixes_are_errors() {
    let e = assert_error(
        "[[group]]\nname = \"g\"\naddresses = [\"10.0.0.0/8\", \"10.0.0.1/24\"]\n",
        3,
        28,
        "host bits are set",
    );
    assert!(
        e.to_string().contains("10.0.0.0/24"),
        "suggests the network: {e}"
    );
    assert_error(
        "[[group]]\nname = \"g\"\naddresses = \"10.0.0.0/33\"\n",
        3,
        13,
        "longer than",
    );
    assert_error(
        "[[group]]\nname = \"g\"\naddresses = \"web/8\"\n",
        3,
        13,
        "not an IP address",
    );
    assert_error(
        &format!(
            "{GROUP}[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = \"tcp/1\"\nfrom = [\"::1/129\"]\n"
        ),
        8,
        9,
        "bad prefix",
    );
    // An IPv4-mapped prefix would reach grants in a form hosts must refuse (spec 9.4).
    assert_error(
        &format!(
            "{GROUP}[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = \"tcp/1\"\nfrom = [\"::ffff:198.51.100.0/120\"]\n"
        ),
        8,
        9,
        "IPv4-mapped IPv6 prefix; write the IPv4 network 198.51.100.0/24",
    );
}

#[test]
fn references_must_exist() {
    let e = assert_error(
        &format!("{GROUP}[[rule]]\nname = \"r\"\ngroups = [\"web\", \"wbe\"]\nallow = \"tcp/1\"\n"),
        6,
        18,
        "unknown group \"wbe\"",
    );
    assert_eq!(e.kind, PolicyErrorKind::UnknownGroup("wbe".into()));
    let e = assert_error(
        &format!(
            "[applications]\nhttps = \"tcp/443\"\n{GROUP}[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = [\"app:https\", \"app:htps\"]\n"
        ),
        9,
        23,
        "unknown application \"htps\"",
    );
    assert_eq!(e.kind, PolicyErrorKind::UnknownApplication("htps".into()));
}

#[test]
fn names_must_be_unique_and_valid() {
    let e = assert_error(
        &format!("{GROUP}{GROUP}"),
        5,
        8,
        "duplicate group name \"web\"",
    );
    assert!(e.to_string().contains("first defined on line 1"));
    let rule = "[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = \"tcp/1\"\n";
    assert_error(
        &format!("{GROUP}{rule}{rule}"),
        9,
        8,
        "duplicate rule name \"r\"",
    );
    assert_error(
        "[[group]]\nname = \"a b\"\naddresses = \"10.0.0.0/8\"\n",
        2,
        8,
        "bad name",
    );
    assert_error(
        "[applications]\nHTTPS = \"tcp/443\"\n",
        2,
        1,
        "bad application id",
    );
}

#[test]
fn items_are_checked() {
    let rule =
        |allow: &str| format!("{GROUP}[[rule]]\nname = \"r\"\ngroups = \"web\"\nallow = {allow}\n");
    assert_error(&rule("[]"), 7, 9, "allow cannot be empty");
    let e = assert_error(&rule("[\"tcp/0\"]"), 7, 10, "port 0");
    assert!(matches!(e.kind, PolicyErrorKind::Item { .. }));
    assert_error(&rule("[\"tcp/80\", \"tcp/8100-8000\"]"), 7, 20, "reversed");
    assert_error(&rule("\"icmp/8\""), 7, 9, "unknown protocol");
    assert_error(&rule("\"tcp/70000\""), 7, 9, "not a port number");
    assert_error(&rule("\"tcp\""), 7, 9, "PROTOCOL/PORTS");
    assert_error("[applications]\nweb = []\n", 2, 7, "cannot be empty");
    assert_error(
        "[applications]\nweb = [\"app:x\"]\n",
        2,
        8,
        "not another application",
    );
}

#[test]
fn rule_shapes_are_checked() {
    let head = format!("{GROUP}[[rule]]\nname = \"r\"\ngroups = \"web\"\n");
    assert_error(
        &format!("{head}allow = \"tcp/1\"\ndeny = \"tcp/2\"\n"),
        4,
        1,
        "exactly one of allow",
    );
    assert_error(&head, 4, 1, "exactly one of allow");
    assert_error(
        &format!("{head}deny = \"tcp/2\"\nmax_lifetime = \"1h\"\n"),
        8,
        16,
        "max_lifetime only applies to allow rules",
    );
    assert_error(
        &format!("{head}allow = \"tcp/2\"\nthird_party_addresses = \"10.0.0.0/8\"\n"),
        8,
        25,
        "needs third_party = true",
    );
    assert_error(
        &format!("{head}allow = \"tcp/2\"\nmax_leases = 0\n"),
        8,
        14,
        "max_leases is 0",
    );
    assert_error(
        &format!("{GROUP}[[rule]]\nname = \"r\"\ngroups = []\nallow = \"tcp/1\"\n"),
        6,
        10,
        "groups cannot be empty",
    );
    assert_error(
        &format!("{head}allow = \"tcp/2\"\nfrom = []\n"),
        8,
        8,
        "from cannot be empty",
    );
    assert_error(
        "[[group]]\nname = \"g\"\n",
        1,
        1,
        "neither identities nor addresses",
    );
    assert_error(
        "[rate_limit]\nrequests_per_second = 0\n",
        2,
        23,
        "requests_per_second is 0",
    );
}

#[test]
fn bad_identity_patterns_are_errors() {
    let e = assert_error(
        "[[group]]\nname = \"g\"\nidentities = [\"spiffe://example.org/a**\"]\n",
        3,
        15,
        "whole segment",
    );
    assert!(matches!(e.kind, PolicyErrorKind::Pattern { .. }));
    assert_error(
        "[[group]]\nname = \"g\"\nidentities = \"web/01\"\n",
        3,
        14,
        "DNS name pattern",
    );
}

#[test]
fn files_that_cannot_be_read_are_errors() {
    let missing =
        std::env::temp_dir().join(format!("fwnp-no-such-policy-{}.toml", std::process::id()));
    let e = Policy::load(&missing).unwrap_err();
    assert_eq!(e.line, 0);
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", missing.display())),
        "{e}"
    );

    let binary =
        std::env::temp_dir().join(format!("fwnp-binary-policy-{}.toml", std::process::id()));
    std::fs::write(&binary, b"[defaults]\nlifetime = \"\xff\"\n").unwrap();
    let e = Policy::load(&binary).unwrap_err();
    let _ = std::fs::remove_file(&binary);
    assert!(e.to_string().contains("not UTF-8"), "{e}");
}

#[test]
fn an_empty_file_denies_everything_and_says_so() {
    let p = policy("");
    assert_eq!(p.warnings().len(), 1);
    let d = ask("fwnp://host/a", &["192.0.2.1"], "tcp/80").to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, None);
    assert!(d.reason.contains("default deny"), "{}", d.reason);
}

// ---------------------------------------------------------------- matching

const ALL_HOSTS: &str = "[[group]]\nname = \"all\"\naddresses = [\"0.0.0.0/0\", \"::/0\"]\n";

#[test]
fn first_match_in_file_order_decides() {
    let first =
        "[[rule]]\nname = \"short\"\ngroups = \"all\"\nallow = \"tcp/80\"\nmax_lifetime = \"1m\"\n";
    let second = "[[rule]]\nname = \"long\"\ngroups = \"all\"\nallow = \"tcp/1-1000\"\nmax_lifetime = \"1h\"\n";
    let p = policy(&format!("{ALL_HOSTS}{first}{second}"));
    let d = ask("fwnp://host/a", &["192.0.2.1"], "tcp/80")
        .lifetime(3600)
        .to(&p);
    assert_allowed_by(&d, "short");
    assert_eq!(d.allowance().unwrap().granted_lifetime_secs, 60);
    assert!(d.allowance().unwrap().narrowed);
    let d = ask("fwnp://host/a", &["192.0.2.1"], "tcp/81")
        .lifetime(3600)
        .to(&p);
    assert_allowed_by(&d, "long");
    assert_eq!(d.rule.as_ref().unwrap().line, 9);

    let p = policy(&format!("{ALL_HOSTS}{second}{first}"));
    let d = ask("fwnp://host/a", &["192.0.2.1"], "tcp/80")
        .lifetime(3600)
        .to(&p);
    assert_allowed_by(&d, "long");
    assert_eq!(d.allowance().unwrap().granted_lifetime_secs, 3600);
    assert!(!d.allowance().unwrap().narrowed);
}

#[test]
fn deny_rules_stop_evaluation() {
    let p = policy(&format!(
        "{ALL_HOSTS}[[rule]]\nname = \"no-telnet\"\ngroups = \"all\"\ndeny = \"tcp/23\"\n\
         [[rule]]\nname = \"no-smb-outside\"\ngroups = \"all\"\ndeny = \"tcp/445\"\nfrom = \"0.0.0.0/0\"\n\
         [[rule]]\nname = \"everything\"\ngroups = \"all\"\nallow = [\"tcp/*\", \"udp/*\"]\n"
    ));
    let host = "fwnp://host/a";
    assert_denied(
        &ask(host, &["192.0.2.1"], "tcp/23").to(&p),
        ResultCode::DeniedByPolicy,
        Some("no-telnet"),
    );
    // Overlap is enough: a range through a denied port is refused whole.
    let d = ask(host, &["192.0.2.1"], "tcp/1-100").to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, Some("no-telnet"));
    assert!(d.reason.contains("denies tcp/23"), "{}", d.reason);
    assert_allowed_by(&ask(host, &["192.0.2.1"], "udp/23").to(&p), "everything");
    assert_allowed_by(
        &ask(host, &["192.0.2.1"], "tcp/24-100").to(&p),
        "everything",
    );
    // A deny with `from`: any remote (none asked) overlaps; IPv6 remotes do not.
    assert_denied(
        &ask(host, &["192.0.2.1"], "tcp/445").to(&p),
        ResultCode::DeniedByPolicy,
        Some("no-smb-outside"),
    );
    assert_allowed_by(
        &ask(host, &["2001:db8::1"], "tcp/445")
            .from(&["2001:db8:1::/48"])
            .to(&p),
        "everything",
    );
}

#[test]
fn groups_match_uri_spiffe_dns_and_addresses() {
    let p = policy(
        "[[group]]\nname = \"fwnp\"\nidentities = \"fwnp://host/web-*\"\n\
         [[group]]\nname = \"spiffe\"\nidentities = \"spiffe://example.org/**\"\n\
         [[group]]\nname = \"dns\"\nidentities = [\"*.dmz.example.org\"]\n\
         [[group]]\nname = \"net\"\naddresses = \"10.1.0.0/16\"\n\
         [[group]]\nname = \"both\"\nidentities = \"**.example.net\"\naddresses = \"10.2.0.0/16\"\n\
         [[rule]]\nname = \"r-fwnp\"\ngroups = \"fwnp\"\nallow = \"tcp/1\"\n\
         [[rule]]\nname = \"r-spiffe\"\ngroups = \"spiffe\"\nallow = \"tcp/1\"\n\
         [[rule]]\nname = \"r-dns\"\ngroups = \"dns\"\nallow = \"tcp/1\"\n\
         [[rule]]\nname = \"r-net\"\ngroups = \"net\"\nallow = \"tcp/1\"\n\
         [[rule]]\nname = \"r-both\"\ngroups = \"both\"\nallow = \"tcp/1\"\n",
    );
    let rule_for = |identity: &str, address: &str| {
        let d = ask(identity, &[address], "tcp/1").to(&p);
        rule_name(&d).map(str::to_owned)
    };
    assert_eq!(
        rule_for("fwnp://host/web-1", "192.0.2.1").as_deref(),
        Some("r-fwnp")
    );
    assert_eq!(rule_for("fwnp://host/db-1", "192.0.2.1"), None);
    assert_eq!(
        rule_for("spiffe://example.org/ns/prod/sa/web", "192.0.2.1").as_deref(),
        Some("r-spiffe")
    );
    assert_eq!(rule_for("spiffe://example.com/ns/prod", "192.0.2.1"), None);
    assert_eq!(
        rule_for("www.dmz.example.org", "192.0.2.1").as_deref(),
        Some("r-dns")
    );
    assert_eq!(rule_for("a.www.dmz.example.org", "192.0.2.1"), None);
    assert_eq!(
        rule_for("fwnp://host/x", "10.1.2.3").as_deref(),
        Some("r-net")
    );
    assert_eq!(
        rule_for("a.example.net", "10.2.0.9").as_deref(),
        Some("r-both")
    );
    // Both keys: identity AND address.
    assert_eq!(rule_for("a.example.net", "10.3.0.9"), None);
    assert_eq!(rule_for("a.example.com", "10.2.0.9"), None);
    assert_eq!(
        p.groups_of("a.example.net", &[ip("10.2.0.9"), ip("10.1.0.1")]),
        vec!["net", "both"]
    );
}

#[test]
fn applications_expand_through_the_catalogue() {
    let p = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\", \"udp/443\"]\n\"web.v2\" = \"tcp/8443\"\n{ALL_HOSTS}\
         [[rule]]\nname = \"tcp-only\"\ngroups = \"all\"\nallow = \"tcp/443\"\n\
         [[rule]]\nname = \"by-ports\"\ngroups = \"all\"\nallow = [\"udp/443\", \"tcp/443\"]\nfrom = \"192.0.2.0/24\"\n\
         [[rule]]\nname = \"by-app\"\ngroups = \"all\"\nallow = [\"app:web.v2\"]\n"
    ));
    let host = "fwnp://host/a";
    // tcp-only covers one entry of https, so it does not match the application.
    let d = ask(host, &["198.51.100.1"], "app:https").to(&p);
    assert_allowed_by(&d, "by-ports");
    let grants = &d.allowance().unwrap().grants;
    assert_eq!(grants.len(), 2);
    assert_eq!(
        grants
            .iter()
            .map(|g| (g.protocol, g.ports.first))
            .collect::<Vec<_>>(),
        vec![(Protocol::Tcp, 443), (Protocol::Udp, 443)]
    );
    assert!(
        grants
            .iter()
            .all(|g| g.app.as_deref() == Some("https") && g.host == ip("198.51.100.1"))
    );
    assert_allowed_by(&ask(host, &["198.51.100.1"], "tcp/443").to(&p), "tcp-only");
    assert_allowed_by(&ask(host, &["198.51.100.1"], "app:web.v2").to(&p), "by-app");
    // "app:web.v2" in a rule is its entries: a plain port request matches it as well.
    assert_allowed_by(&ask(host, &["198.51.100.1"], "tcp/8443").to(&p), "by-app");
    let d = ask(host, &["198.51.100.1"], "app:ftp").to(&p);
    assert_denied(&d, ResultCode::UnknownApplication, None);
    assert_eq!(p.application("https").unwrap().len(), 2);
}

#[test]
fn remotes_are_narrowed_kept_or_refused() {
    let p = policy(&format!(
        "{ALL_HOSTS}[[rule]]\nname = \"r\"\ngroups = \"all\"\nallow = \"tcp/443\"\n\
         from = [\"198.51.100.0/24\", \"203.0.113.0/24\", \"2001:db8:f::/48\"]\n"
    ));
    let host = "fwnp://host/a";
    let d = ask(host, &["192.0.2.1"], "tcp/443").to(&p);
    let allowance = d.allowance().unwrap();
    assert!(allowance.remotes_narrowed && allowance.narrowed);
    assert_eq!(
        allowance.grants[0].remotes,
        vec![prefix("198.51.100.0/24"), prefix("203.0.113.0/24")]
    );
    let d = ask(host, &["2001:db8::1"], "tcp/443").to(&p);
    assert_eq!(
        d.allowance().unwrap().grants[0].remotes,
        vec![prefix("2001:db8:f::/48")]
    );

    let d = ask(host, &["192.0.2.1"], "tcp/443")
        .from(&["198.51.100.128/25", "203.0.113.7"])
        .to(&p);
    let allowance = d.allowance().unwrap();
    assert!(!allowance.narrowed);
    assert_eq!(
        allowance.grants[0].remotes,
        vec![prefix("198.51.100.128/25"), prefix("203.0.113.7/32")]
    );

    let d = ask(host, &["192.0.2.1"], "tcp/443")
        .from(&["198.51.100.0/23"])
        .to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, None);

    let v4_only = policy(&format!(
        "{ALL_HOSTS}[[rule]]\nname = \"r\"\ngroups = \"all\"\nallow = \"tcp/443\"\nfrom = \"198.51.100.0/24\"\n"
    ));
    let e = v4_only.explain(&ask(host, &["2001:db8::1"], "tcp/443").request());
    assert!(!e.decision.is_allowed());
    assert!(
        e.steps
            .iter()
            .any(|s| s.detail.contains("no prefix of the family")),
        "{e}"
    );

    // A rule without `from` keeps what was asked, including "any".
    let open = policy(&format!(
        "{ALL_HOSTS}[[rule]]\nname = \"r\"\ngroups = \"all\"\nallow = \"tcp/443\"\n"
    ));
    let d = ask(host, &["192.0.2.1"], "tcp/443").to(&open);
    assert!(d.allowance().unwrap().grants[0].remotes.is_empty());
    // A request with a remote of the wrong family is malformed.
    let d = ask(host, &["192.0.2.1"], "tcp/443")
        .from(&["2001:db8::/32"])
        .to(&open);
    assert_denied(&d, ResultCode::MalformedOption, None);
}

#[test]
fn port_ranges_must_be_covered() {
    let p = policy(&format!(
        "{ALL_HOSTS}[[rule]]\nname = \"r\"\ngroups = \"all\"\n\
         allow = [\"tcp/8000-8099\", \"tcp/8100-8200\", \"tcp/9000\", \"udp/5000-5100\"]\n"
    ));
    let host = "fwnp://host/a";
    let allowed = |what: &str| ask(host, &["192.0.2.1"], what).to(&p).is_allowed();
    assert!(allowed("tcp/8000-8200"), "touching items are joined");
    assert!(allowed("tcp/8050-8150"));
    assert!(allowed("udp/5000"));
    assert!(allowed("udp/5100"));
    assert!(allowed("tcp/9000"));
    assert!(!allowed("tcp/7999-8000"));
    assert!(!allowed("tcp/8200-8201"));
    assert!(!allowed("tcp/9000-9001"));
    assert!(!allowed("udp/8000"));
    assert!(!allowed("tcp/5000"));
    let d = ask(host, &["192.0.2.1"], "tcp/8200-8201").to(&p);
    assert_eq!(
        d.reason,
        "no rule allows tcp/8200-8201 on 192.0.2.1 (default deny)"
    );
    let bad = Target::Ports {
        protocol: Protocol::Tcp,
        ports: PortRange { first: 9, last: 8 },
    };
    let addresses = [ip("192.0.2.1")];
    let d = p.evaluate(&Request {
        identity: host,
        addresses: &addresses,
        host_address: addresses[0],
        target: &bad,
        remotes: &[],
        lifetime: None,
    });
    assert_denied(&d, ResultCode::MalformedOption, None);
}

#[test]
fn third_party_rights() {
    let p = policy(
        "[[group]]\nname = \"lb\"\nidentities = \"fwnp://host/lb-*\"\n\
         [[group]]\nname = \"all\"\naddresses = [\"0.0.0.0/0\", \"::/0\"]\n\
         [[rule]]\nname = \"pool\"\ngroups = \"lb\"\nallow = \"tcp/443\"\nthird_party = true\n\
         third_party_addresses = \"10.0.1.0/24\"\n\
         [[rule]]\nname = \"other-pool\"\ngroups = \"lb\"\nallow = \"tcp/8443\"\nthird_party = true\n\
         third_party_addresses = \"10.0.2.0/24\"\n\
         [[rule]]\nname = \"own\"\ngroups = \"all\"\nallow = \"tcp/*\"\n",
    );
    let lb = "fwnp://host/lb-1";
    assert_allowed_by(
        &ask(lb, &["10.0.0.5"], "tcp/443").on("10.0.1.7").to(&p),
        "pool",
    );
    let d = ask(lb, &["10.0.0.5"], "tcp/443").on("10.0.3.7").to(&p);
    assert_denied(&d, ResultCode::AddressMismatch, None);
    assert_allowed_by(
        &ask(lb, &["10.0.0.5"], "tcp/8443").on("10.0.2.7").to(&p),
        "other-pool",
    );
    // A right exists for the address but not the port: denied by policy, not a mismatch.
    let d = ask(lb, &["10.0.0.5"], "tcp/443").on("10.0.2.7").to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, None);
    let d = ask(lb, &["10.0.0.5"], "tcp/80").on("10.0.1.7").to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, None);
    // The host's own address needs no right; another host has none.
    assert_allowed_by(&ask(lb, &["10.0.0.5"], "tcp/80").to(&p), "own");
    let d = ask("fwnp://host/web", &["10.0.0.6"], "tcp/80")
        .on("10.0.0.7")
        .to(&p);
    assert_denied(&d, ResultCode::AddressMismatch, None);
    assert!(d.reason.contains("does not hold 10.0.0.7"), "{}", d.reason);
    // An IPv4-mapped address is the same address.
    assert_allowed_by(
        &ask(lb, &["::ffff:10.0.0.5"], "tcp/80")
            .on("10.0.0.5")
            .to(&p),
        "own",
    );
    assert!(p.limits_for(lb, &[ip("10.0.0.5")]).third_party);
    assert!(
        !p.limits_for("fwnp://host/web", &[ip("10.0.0.5")])
            .third_party
    );
}

/// Spec 4.3 and 11.3 step 6: an address outside the host's third-party rights is
/// address-mismatch before any deny rule, port or catalogue lookup decides, also for a host
/// that has such rights for other addresses.
#[test]
fn an_address_outside_the_third_party_rights_is_a_mismatch_before_the_rules() {
    let p = policy(
        "[[group]]\nname = \"lb\"\nidentities = \"fwnp://host/lb-*\"\n\
         [[rule]]\nname = \"no-ssh\"\ngroups = \"lb\"\ndeny = \"tcp/22\"\n\
         [[rule]]\nname = \"pool\"\ngroups = \"lb\"\nallow = \"tcp/*\"\nthird_party = true\n\
         third_party_addresses = \"10.1.0.0/24\"\n",
    );
    let lb = "fwnp://host/lb-1";
    let d = ask(lb, &["192.0.2.10"], "tcp/22").on("10.9.9.9").to(&p);
    assert_denied(&d, ResultCode::AddressMismatch, None);
    let d = ask(lb, &["192.0.2.10"], "app:nosuch").on("10.9.9.9").to(&p);
    assert_denied(&d, ResultCode::AddressMismatch, None);
    // Within the rights, the deny rule and the catalogue decide.
    let d = ask(lb, &["192.0.2.10"], "tcp/22").on("10.1.0.9").to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, Some("no-ssh"));
    let d = ask(lb, &["192.0.2.10"], "app:nosuch").on("10.1.0.9").to(&p);
    assert_denied(&d, ResultCode::UnknownApplication, None);
}

#[test]
fn lifetimes_are_bounded() {
    let p = policy(&format!(
        "[defaults]\nlifetime = \"5m\"\nmin_lifetime = \"1m\"\nmax_lifetime = \"30m\"\nmax_leases = 10\n{ALL_HOSTS}\
         [[rule]]\nname = \"long\"\ngroups = \"all\"\nallow = \"tcp/1\"\nmax_lifetime = \"1d\"\nlifetime = \"2h\"\nmax_leases = 2\n\
         [[rule]]\nname = \"plain\"\ngroups = \"all\"\nallow = \"tcp/2\"\n\
         [[rule]]\nname = \"short\"\ngroups = \"all\"\nallow = \"tcp/3\"\nmax_lifetime = \"2m\"\n"
    ));
    let host = "fwnp://host/a";
    let granted = |what: &str, asked: Option<u32>| {
        let mut a = ask(host, &["192.0.2.1"], what);
        a.lifetime = asked;
        let d = a.to(&p);
        let allowance = d.allowance().unwrap().clone();
        (
            allowance.granted_lifetime_secs,
            allowance.max_leases,
            allowance.narrowed,
        )
    };
    assert_eq!(granted("tcp/1", None), (7200, 2, false));
    assert_eq!(granted("tcp/1", Some(0)), (7200, 2, false));
    assert_eq!(granted("tcp/1", Some(200_000)), (86_400, 2, true));
    assert_eq!(granted("tcp/2", None), (300, 10, false));
    assert_eq!(granted("tcp/2", Some(10)), (60, 10, true));
    assert_eq!(granted("tcp/2", Some(600)), (600, 10, false));
    // The inherited default (5m) is clamped into the rule's bounds.
    assert_eq!(granted("tcp/3", None), (120, 10, false));

    let limits = p.limits_for(host, &[ip("192.0.2.1")]);
    assert_eq!(
        (
            limits.lifetime.min_secs,
            limits.lifetime.max_secs,
            limits.max_leases,
            limits.allow_rules
        ),
        (60, 86_400, 10, 3)
    );
    let nobody = p.limits_for("fwnp://host/a", &[]);
    assert_eq!(
        (
            nobody.allow_rules,
            nobody.max_leases,
            nobody.lifetime.max_secs
        ),
        (0, 10, 1800)
    );
}

// ---------------------------------------------------------------- reload, explain, rendering

fn grants_of(policy: &Policy, a: Ask<'_>) -> Vec<Grant> {
    let d = a.to(policy);
    d.allowance()
        .unwrap_or_else(|| panic!("{d}"))
        .grants
        .clone()
}

#[test]
fn still_allows_follows_policy_changes() {
    let before = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\", \"udp/443\"]\n{ALL_HOSTS}\
         [[rule]]\nname = \"web\"\ngroups = \"all\"\nallow = [\"app:https\", \"tcp/80\"]\n"
    ));
    let host = "fwnp://host/a";
    let addresses = [ip("192.0.2.1")];
    let https = grants_of(&before, ask(host, &["192.0.2.1"], "app:https"));
    let http = grants_of(&before, ask(host, &["192.0.2.1"], "tcp/80"));
    assert_eq!(
        before.still_allows(host, &addresses, &https).map(|_| ()),
        Ok(())
    );
    assert_eq!(
        before.still_allows(host, &addresses, &http).map(|_| ()),
        Ok(())
    );

    // tcp/80 removed: that lease goes, https stays.
    let after = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\", \"udp/443\"]\n{ALL_HOSTS}\
         [[rule]]\nname = \"web\"\ngroups = \"all\"\nallow = [\"app:https\"]\n"
    ));
    assert_eq!(
        after.still_allows(host, &addresses, &https).map(|_| ()),
        Ok(())
    );
    let gone = after.still_allows(host, &addresses, &http).unwrap_err();
    assert_eq!(gone.grant, http[0]);
    assert!(
        gone.to_string()
            .contains("tcp/80 on 192.0.2.1 from any is no longer allowed"),
        "{gone}"
    );
    assert!(gone.reason.contains("default deny"), "{gone}");

    // A `from` appears: leases open to any remote would be narrowed now, so they go.
    let narrowed = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\", \"udp/443\"]\n{ALL_HOSTS}\
         [[rule]]\nname = \"web\"\ngroups = \"all\"\nallow = [\"app:https\", \"tcp/80\"]\nfrom = \"10.0.0.0/8\"\n"
    ));
    let e = narrowed.still_allows(host, &addresses, &https).unwrap_err();
    assert_eq!(e.rule.as_ref().map(|r| &*r.name), Some("web"));
    assert!(e.reason.contains("10.0.0.0/8"), "{e}");
    // ...but a lease granted under that `from` survives it.
    let inside = grants_of(&narrowed, ask(host, &["192.0.2.1"], "tcp/80"));
    assert_eq!(
        narrowed.still_allows(host, &addresses, &inside).map(|_| ()),
        Ok(())
    );

    // The application shrinks: its udp entry is no longer part of it.
    let shrunk = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\"]\n{ALL_HOSTS}\
         [[rule]]\nname = \"web\"\ngroups = \"all\"\nallow = [\"tcp/*\", \"udp/*\"]\n"
    ));
    let e = shrunk.still_allows(host, &addresses, &https).unwrap_err();
    assert_eq!(e.grant.protocol, Protocol::Udp);
    assert!(e.reason.contains("no longer includes udp/443"), "{e}");

    // A deny rule ahead of the allow revokes, naming the rule.
    let denied = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\", \"udp/443\"]\n{ALL_HOSTS}\
         [[rule]]\nname = \"no-quic\"\ngroups = \"all\"\ndeny = \"udp/443\"\n\
         [[rule]]\nname = \"web\"\ngroups = \"all\"\nallow = [\"app:https\"]\n"
    ));
    let e = denied.still_allows(host, &addresses, &https).unwrap_err();
    assert_eq!(
        e.rule.as_ref().map(|r| (&*r.name, r.line)),
        Some(("no-quic", 6))
    );

    // The host's certificate changed address: a grant on the old address is third-party now.
    assert!(
        before
            .still_allows(host, &[ip("192.0.2.2")], &http)
            .is_err()
    );
    assert!(
        Policy::deny_all()
            .still_allows(host, &addresses, &http)
            .is_err()
    );
}

#[test]
fn explain_traces_every_rule_considered() {
    let p = policy(&format!(
        "[applications]\nhttps = [\"tcp/443\", \"udp/443\"]\n\
         [[group]]\nname = \"db\"\nidentities = \"db-*.example.org\"\n{ALL_HOSTS}\
         [[rule]]\nname = \"databases\"\ngroups = \"db\"\nallow = \"tcp/5432\"\n\
         [[rule]]\nname = \"no-telnet\"\ngroups = \"all\"\ndeny = \"tcp/23\"\n\
         [[rule]]\nname = \"tcp-web\"\ngroups = \"all\"\nallow = \"tcp/443\"\n\
         [[rule]]\nname = \"web\"\ngroups = \"all\"\nallow = \"app:https\"\nfrom = \"198.51.100.0/24\"\n"
    ));
    let a = ask("fwnp://host/web-1", &["192.0.2.1"], "app:https");
    let e = p.explain(&a.request());
    let outcomes: Vec<(Option<&str>, StepOutcome)> = e
        .steps
        .iter()
        .map(|s| (s.rule.as_ref().map(|r| &*r.name), s.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (None, StepOutcome::Note),
            (Some("databases"), StepOutcome::NoMatch),
            (Some("no-telnet"), StepOutcome::NoMatch),
            (Some("tcp-web"), StepOutcome::NoMatch),
            (Some("web"), StepOutcome::Matched),
        ]
    );
    assert!(
        e.steps[0]
            .detail
            .contains("application https (catalogue line 2) is tcp/443, udp/443"),
        "{e}"
    );
    assert!(e.steps[1].detail.contains("none of its groups (db)"), "{e}");
    assert!(e.steps[3].detail.contains("does not allow udp/443"), "{e}");
    assert!(
        e.steps[4].detail.contains("narrowed to 198.51.100.0/24"),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(
            "request: fwnp://host/web-1 (holding 192.0.2.1) asks app https on 192.0.2.1 from any"
        ),
        "{text}"
    );
    assert!(
        text.contains("decision: allowed: allowed by rule \"web\" (line 21)"),
        "{text}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["allowed"], true);
    assert_eq!(json["decision"]["rule"]["name"], "web");
    assert_eq!(json["decision"]["grants"][1]["protocol"], "udp");
    assert_eq!(json["steps"][4]["outcome"], "matched");

    let e = p.explain(&ask("fwnp://host/web-1", &["192.0.2.1"], "tcp/25").request());
    assert_eq!(e.steps.last().unwrap().outcome, StepOutcome::Note);
    assert!(
        e.to_string().ends_with(
            "decision: denied (denied-by-policy): no rule allows tcp/25 on 192.0.2.1 (default deny)"
        ),
        "{e}"
    );
}

#[test]
fn to_toml_round_trips() {
    let original = example();
    let text = original.to_toml();
    let again = Policy::from_str(&text, "rendered.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(again.to_toml(), text);
    let (mut a, mut b) = (original.summary(), again.summary());
    assert_eq!(a.rules.len(), b.rules.len());
    for rules in [&mut a.rules, &mut b.rules] {
        for rule in rules.iter_mut() {
            rule.line = 0;
        }
    }
    for groups in [&mut a.groups, &mut b.groups] {
        for group in groups.iter_mut() {
            group.line = 0;
        }
    }
    a.origin.clear();
    b.origin.clear();
    assert_eq!(a, b);
    // The same decisions.
    for (identity, address, what) in [
        (
            "spiffe://example.org/host/web-03",
            "192.0.2.10",
            "app:https",
        ),
        ("spiffe://example.org/host/web-03", "192.0.2.10", "tcp/22"),
        ("fwnp://host/x", "198.51.100.7", "tcp/1-1024"),
        ("spiffe://example.org/relay/eu/1", "10.0.0.1", "app:rtp"),
    ] {
        let d1 = ask(identity, &[address], what).to(&original);
        let d2 = ask(identity, &[address], what).to(&again);
        assert_eq!(d1.verdict, d2.verdict);
        assert_eq!(rule_name(&d1), rule_name(&d2));
    }
}

#[test]
fn builder_renders_a_policy_the_parser_reads() {
    let mut web = GroupSpec::by_identity("web-hosts", &["fwnp://host/web-*"]);
    web.description = Some("Found in the audit trail: \"web\" hosts\nsecond line".into());
    let mut api = RuleSpec::allow(
        "api",
        &["web-hosts"],
        vec![item("app:api.v1"), item("tcp/8000-8100")],
    );
    api.from = Some(vec![prefix("198.51.100.0/24")]);
    api.max_lifetime_secs = Some(5400);
    api.max_leases = Some(3);
    let builder = PolicyBuilder::new()
        .comment("Suggested by fwnpctl report")
        .defaults(Defaults {
            max_leases: 8,
            ..Defaults::default()
        })
        .application("api.v1", vec![item("tcp/9443"), item("udp/9443")])
        .group(web)
        .group(GroupSpec::by_address("lab", &[prefix("10.9.0.0/16")]))
        .rule(RuleSpec::deny(
            "no-ssh",
            &["web-hosts", "lab"],
            vec![item("tcp/22")],
        ))
        .rule(api)
        .rate_limit(RateLimit {
            requests_per_second: 5.try_into().unwrap(),
            burst: 10.try_into().unwrap(),
        });
    let text = builder.to_toml();
    assert!(
        text.starts_with("# Suggested by fwnpctl report\n"),
        "{text}"
    );
    assert!(
        text.contains("\"api.v1\" = [\"tcp/9443\", \"udp/9443\"]"),
        "{text}"
    );
    assert!(text.contains("max_lifetime = \"1h30m\""), "{text}");
    let p = builder
        .build("suggested.toml")
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(p.to_builder().rules, builder.rules);
    assert_eq!(p.to_builder().groups, builder.groups);
    assert_eq!(p.defaults().max_leases, 8);
    assert_eq!(
        p.rate_limit().map(|r| r.replenish_interval().as_millis()),
        Some(200)
    );
    let d = ask("fwnp://host/web-2", &["192.0.2.1"], "app:api.v1").to(&p);
    assert_allowed_by(&d, "api");
    assert_eq!(d.allowance().unwrap().max_leases, 3);
    let d = ask("fwnp://host/web-2", &["192.0.2.1"], "tcp/22").to(&p);
    assert_denied(&d, ResultCode::DeniedByPolicy, Some("no-ssh"));
    let rules: Vec<_> = p.rules().map(|(r, _)| r.action).collect();
    assert_eq!(rules, vec![Action::Deny, Action::Allow]);

    // A builder with a mistake fails with a located error in the rendered text.
    let broken = PolicyBuilder::new().rule(RuleSpec::allow("x", &["missing"], vec![item("tcp/1")]));
    let e = broken.build("suggested.toml").unwrap_err();
    assert_eq!(e.kind, PolicyErrorKind::UnknownGroup("missing".into()));
    assert_eq!(e.line, 3);
}

#[test]
fn summary_serializes_for_fwnpctl() {
    let summary = example().summary();
    let json = serde_json::to_value(&summary).unwrap();
    assert_eq!(json["defaults"]["lifetime_secs"], 600);
    assert_eq!(json["applications"]["https"][1], "udp/443");
    assert_eq!(json["groups"][0]["name"], "web");
    assert_eq!(json["groups"][0]["addresses"][1], "2001:db8:0:1::/64");
    assert_eq!(json["rules"][0]["name"], "ssh-from-admin");
    assert_eq!(json["rules"][0]["items"][0], "app:ssh");
    assert_eq!(json["rules"][1]["action"], "deny");
    assert_eq!(json["rules"][2]["from"], serde_json::Value::Null);
    assert_eq!(json["rate_limit"]["requests_per_second"], 20);
    let text = summary.to_string();
    assert!(
        text.contains("rules (first match wins, then default deny): 6"),
        "{text}"
    );
    assert!(
        text.contains("deny no-other-ssh: tcp/22 for web, databases, lab"),
        "{text}"
    );
}

// ---------------------------------------------------------------- robustness

fn arbitrary_policy_text() -> impl Strategy<Value = String> {
    let fragments = prop::sample::select(vec![
        "[defaults]\n",
        "[applications]\n",
        "[[group]]\n",
        "[[rule]]\n",
        "[rate_limit]\n",
        "name = \"g\"\n",
        "name = \"r\"\n",
        "groups = [\"g\"]\n",
        "groups = \"\"\n",
        "identities = [\"**\"]\n",
        "identities = \"spiffe://x/**/**\"\n",
        "addresses = [\"::/0\"]\n",
        "addresses = \"1.2.3.4/40\"\n",
        "allow = [\"tcp/1-65535\"]\n",
        "allow = \"app:a\"\n",
        "deny = \"udp/0\"\n",
        "from = []\n",
        "from = [\"10.0.0.0/8\"]\n",
        "lifetime = \"99999999999d\"\n",
        "lifetime = -1\n",
        "min_lifetime = \"1h\"\n",
        "max_lifetime = 1\n",
        "max_leases = 9e9\n",
        "max_leases = -9223372036854775808\n",
        "third_party = true\n",
        "third_party_addresses = [\"0.0.0.0/0\"]\n",
        "a = [\"tcp/443\"]\n",
        "requests_per_second = 1\n",
        "burst = 0\n",
        "= \n",
        "\"\n",
        "[\n",
        "\u{0}",
        "é = 1\n",
        "x.y.z = 1\n",
        "{}",
        "[[group]]\nname=\"g\"\naddresses=\"0.0.0.0/0\"\n",
    ]);
    prop::collection::vec(fragments, 0..24).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics_the_parser(text in any::<String>()) {
        let _ = Policy::from_str(&text, "random.toml");
    }

    #[test]
    fn random_policy_fragments_never_panic(text in arbitrary_policy_text()) {
        if let Ok(p) = Policy::from_str(&text, "random.toml") {
            // Whatever parses renders to text that parses again the same way.
            let again = Policy::from_str(&p.to_toml(), "again.toml");
            prop_assert!(again.is_ok(), "{:?}", again.err());
            let d = ask("fwnp://host/x", &["10.0.0.1"], "tcp/443").to(&p);
            let _ = d.to_string();
        }
    }

    #[test]
    fn mutated_example_never_panics(position in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = std::fs::read(example_path()).unwrap();
        let index = position.index(bytes.len());
        if cut { bytes.truncate(index) } else { bytes[index] = byte }
        if let Ok(text) = String::from_utf8(bytes)
            && let Err(e) = Policy::from_str(&text, "mutated.toml")
        {
            prop_assert!(e.line >= 1, "{}", e);
        }
    }

    #[test]
    fn evaluate_and_explain_agree_on_random_requests(
        identity in prop::sample::select(vec![
            "spiffe://example.org/host/web-1", "fwnp://host/web-x", "db-1.internal.example.org",
            "spiffe://example.org/relay/a/b", "", "://", "a..b", "spiffe://example.org//x",
        ]),
        address in any::<[u8; 4]>(),
        host in any::<[u8; 4]>(),
        first in 1u16.., len in 0u16..2000,
        udp in any::<bool>(),
        remote_len in prop::option::of(8u8..=32),
        lifetime in prop::option::of(any::<u32>()),
    ) {
        let policy = example();
        let addresses = [IpAddr::from(address)];
        let last = first.saturating_add(len);
        let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
        let target = Target::Ports { protocol, ports: PortRange { first, last } };
        let remotes: Vec<Prefix> = remote_len
            .map(|l| vec![prefix(&format!("198.51.100.0/{}", l.max(24)))])
            .unwrap_or_default();
        let request = Request {
            identity,
            addresses: &addresses,
            host_address: IpAddr::from(host),
            target: &target,
            remotes: &remotes,
            lifetime,
        };
        let decision = policy.evaluate(&request);
        prop_assert_eq!(&policy.explain(&request).decision, &decision);
        if let Some(allowance) = decision.allowance() {
            prop_assert!(allowance.granted_lifetime_secs >= allowance.lifetime.min_secs);
            prop_assert!(allowance.granted_lifetime_secs <= allowance.lifetime.max_secs);
            prop_assert_eq!(
                policy.still_allows(identity, &addresses, &allowance.grants).map(|_| ()),
                Ok(())
            );
        }
    }
}

#[test]
fn pathological_files_are_refused_without_harm() {
    let deep_array = format!(
        "[applications]\nx = {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(Policy::from_str(&deep_array, "deep.toml").is_err());
    let deep_table = format!("x = {}{}\n", "{a = ".repeat(50_000), "}".repeat(50_000));
    assert!(Policy::from_str(&deep_table, "deep.toml").is_err());
    let dotted = format!("{} = 1\n", vec!["a"; 100_000].join("."));
    assert!(Policy::from_str(&dotted, "dotted.toml").is_err());
    let long_name = format!(
        "[[group]]\nname = \"{}\"\naddresses = \"::/0\"\n",
        "g".repeat(1_000_000)
    );
    let e = Policy::from_str(&long_name, "long.toml").unwrap_err();
    assert_eq!((e.line, e.column), (2, 8));
    // A huge identity and many addresses are judged like any other.
    let p = example();
    let identity = format!("spiffe://example.org/{}", "x/".repeat(100_000));
    let addresses: Vec<IpAddr> = (0..10_000u32)
        .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
        .collect();
    let target = target("tcp/443");
    let d = p.evaluate(&Request {
        identity: &identity,
        addresses: &addresses,
        host_address: addresses[0],
        target: &target,
        remotes: &[],
        lifetime: Some(u32::MAX),
    });
    assert_denied(&d, ResultCode::DeniedByPolicy, None);
}

#[test]
fn policies_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Policy>();
    shareable::<Decision>();
    let p = std::sync::Arc::new(example());
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                ask("fwnp://host/web-1", &["192.0.2.1"], "app:https")
                    .to(&p)
                    .is_allowed()
            })
        })
        .collect();
    for handle in handles {
        assert!(handle.join().unwrap());
    }
}

#[test]
#[ignore = "a measurement: cargo test --release -p fwnp-gateway --test policy -- --ignored --nocapture"]
fn evaluation_throughput() {
    // A policy of 200 rules over 100 groups; the request matches near the end.
    let mut builder = PolicyBuilder::new();
    for g in 0..100 {
        builder = builder.group(GroupSpec::by_identity(
            &format!("g{g}"),
            &[
                &format!("spiffe://example.org/team-{g}/**"),
                &format!("*.team-{g}.example.org"),
            ],
        ));
    }
    for r in 0..200 {
        let g = r / 2;
        let mut rule = RuleSpec::allow(
            &format!("r{r}"),
            &[&format!("g{g}")],
            vec![item(&format!("tcp/{}-{}", 1000 + r, 1100 + r))],
        );
        rule.from = Some(vec![prefix("198.51.100.0/24"), prefix("2001:db8::/32")]);
        builder = builder.rule(rule);
    }
    let policy = builder.build("bench").unwrap();
    let ask = ask(
        "spiffe://example.org/team-99/host/web-1",
        &["192.0.2.1"],
        "tcp/1198",
    )
    .from(&["198.51.100.0/25"]);
    let request = ask.request();
    assert_allowed_by(&policy.evaluate(&request), "r198");
    let count = 200_000;
    let start = std::time::Instant::now();
    for _ in 0..count {
        std::hint::black_box(policy.evaluate(std::hint::black_box(&request)));
    }
    let elapsed = start.elapsed();
    println!(
        "{count} evaluations against 200 rules in {elapsed:?}: {:.0} per second",
        count as f64 / elapsed.as_secs_f64()
    );
}
