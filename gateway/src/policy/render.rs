//! Policies and decisions for people and machines: text, JSON (serde), and TOML that the
//! parser reads back ([`PolicyBuilder`], used by `fwnpctl report` for its suggested policy).

use std::collections::BTreeMap;
use std::fmt::{self, Display, Write as _};

use fwnp_proto::message::{Grant, Prefix, Target};
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use super::syntax::Item;
use super::{
    Action, Decision, Defaults, Explanation, GroupSpec, Policy, PolicyError, PolicyWarning,
    PortSpan, RateLimit, Request, RuleSpec, Verdict, format_duration,
};

/// Joins displayable values with ", ".
pub(super) fn join_display<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for (index, item) in items.into_iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{item}");
    }
    out
}

/// A port span as an item text (`tcp/443`).
pub(super) struct SpanText<'a>(pub(super) &'a PortSpan);

impl Display for SpanText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Item::Ports {
            protocol: self.0.protocol,
            ports: self.0.ports,
        }
        .fmt(f)
    }
}

/// A grant in words: `tcp/443 on 192.0.2.10 from 198.51.100.0/24 (app https)`.
pub(super) struct GrantText<'a>(pub(super) &'a Grant);

impl Display for GrantText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let grant = self.0;
        write!(
            f,
            "{}/{} on {} from ",
            grant.protocol, grant.ports, grant.host
        )?;
        if grant.remotes.is_empty() {
            f.write_str("any")?;
        } else {
            f.write_str(&join_display(grant.remotes.iter()))?;
        }
        if let Some(app) = &grant.app {
            write!(f, " (app {app})")?;
        }
        Ok(())
    }
}

pub(super) fn describe_request(request: &Request<'_>) -> String {
    let what = match request.target {
        Target::Ports { protocol, ports } => format!("{protocol}/{ports}"),
        Target::App(id) => format!("app {id}"),
    };
    let from = if request.remotes.is_empty() {
        "any".to_owned()
    } else {
        join_display(request.remotes.iter())
    };
    let lifetime = match request.lifetime {
        None | Some(0) => "the default lifetime".to_owned(),
        Some(secs) => format!("lifetime {}", format_duration(secs)),
    };
    format!(
        "{} (holding {}) asks {what} on {} from {from}, {lifetime}",
        request.identity,
        if request.addresses.is_empty() {
            "no address".to_owned()
        } else {
            join_display(request.addresses.iter())
        },
        request.host_address,
    )
}

pub(super) fn serialize_shared_str<S: Serializer>(
    text: &std::sync::Arc<str>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(text)
}

pub(super) fn serialize_prefixes<S: Serializer>(
    prefixes: &[Prefix],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(prefixes.len()))?;
    for prefix in prefixes {
        seq.serialize_element(&prefix.to_string())?;
    }
    seq.end()
}

pub(super) fn serialize_optional_prefixes<S: Serializer>(
    prefixes: &Option<Vec<Prefix>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match prefixes {
        Some(prefixes) => serialize_prefixes(prefixes, serializer),
        None => serializer.serialize_none(),
    }
}

pub(super) fn serialize_items<S: Serializer>(
    items: &[Item],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(items.len()))?;
    for item in items {
        seq.serialize_element(&item.to_string())?;
    }
    seq.end()
}

/// A grant as JSON: `{"protocol": "tcp", "ports": "443", "host": "192.0.2.10",
/// "remotes": [...], "app": "https"}`.
struct GrantJson<'a>(&'a Grant);

impl Serialize for GrantJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let grant = self.0;
        let mut s = serializer.serialize_struct("Grant", 5)?;
        s.serialize_field("protocol", grant.protocol.name())?;
        s.serialize_field("ports", &grant.ports.to_string())?;
        s.serialize_field("host", &grant.host.to_string())?;
        let remotes: Vec<String> = grant.remotes.iter().map(ToString::to_string).collect();
        s.serialize_field("remotes", &remotes)?;
        s.serialize_field("app", &grant.app)?;
        s.end()
    }
}

/// Decisions serialize as `{"allowed": bool, "code": "denied-by-policy" | null, "rule":
/// {"name", "line"} | null, "reason": "...", and when allowed "grants", "lifetime",
/// "granted_lifetime_secs", "max_leases", "narrowed", "remotes_narrowed"}`.
impl Serialize for Decision {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Decision", 10)?;
        s.serialize_field("allowed", &self.is_allowed())?;
        s.serialize_field("code", &self.denied_code().map(|c| c.name()))?;
        s.serialize_field("rule", &self.rule)?;
        s.serialize_field("reason", &self.reason)?;
        if let Verdict::Allowed(allowance) = &self.verdict {
            let grants: Vec<GrantJson<'_>> = allowance.grants.iter().map(GrantJson).collect();
            s.serialize_field("grants", &grants)?;
            s.serialize_field("lifetime", &allowance.lifetime)?;
            s.serialize_field("granted_lifetime_secs", &allowance.granted_lifetime_secs)?;
            s.serialize_field("max_leases", &allowance.max_leases)?;
            s.serialize_field("narrowed", &allowance.narrowed)?;
            s.serialize_field("remotes_narrowed", &allowance.remotes_narrowed)?;
        }
        s.end()
    }
}

/// Explanations serialize as `{"request": "...", "steps": [...], "decision": {...}}`.
impl Serialize for Explanation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Explanation", 3)?;
        s.serialize_field("request", &self.request)?;
        s.serialize_field("steps", &self.steps)?;
        s.serialize_field("decision", &self.decision)?;
        s.end()
    }
}

/// A group with its line, in a summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSummary {
    /// The line of its `[[group]]`.
    pub line: u32,
    /// The group.
    #[serde(flatten)]
    pub spec: GroupSpec,
}

/// A rule with its line, in a summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleSummary {
    /// The line of its `[[rule]]`.
    pub line: u32,
    /// The rule.
    #[serde(flatten)]
    pub spec: RuleSpec,
}

/// The whole policy as data, for `fwnpctl policy check` (JSON through serde, or [`Display`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySummary {
    /// Where the policy came from.
    pub origin: String,
    /// The defaults in force.
    pub defaults: Defaults,
    /// The catalogue: id to entries (`"tcp/443"`).
    pub applications: BTreeMap<String, Vec<String>>,
    /// The groups, in file order.
    pub groups: Vec<GroupSummary>,
    /// The rules, in file order (the order of evaluation).
    pub rules: Vec<RuleSummary>,
    /// The rate limit per identity.
    pub rate_limit: Option<RateLimit>,
    /// Remarks on the policy.
    pub warnings: Vec<PolicyWarning>,
}

pub(super) fn summary(policy: &Policy) -> PolicySummary {
    PolicySummary {
        origin: policy.origin.clone(),
        defaults: policy.defaults,
        applications: policy
            .applications
            .iter()
            .map(|(id, app)| {
                (
                    id.clone(),
                    app.entries
                        .iter()
                        .map(|e| SpanText(e).to_string())
                        .collect(),
                )
            })
            .collect(),
        groups: policy
            .groups
            .iter()
            .map(|g| GroupSummary {
                line: g.line,
                spec: g.spec.clone(),
            })
            .collect(),
        rules: policy
            .rules
            .iter()
            .map(|r| RuleSummary {
                line: r.rule_ref.line,
                spec: r.spec.clone(),
            })
            .collect(),
        rate_limit: policy.rate_limit,
        warnings: policy.warnings.clone(),
    }
}

impl Display for PolicySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.defaults;
        writeln!(f, "policy {}", self.origin)?;
        writeln!(
            f,
            "defaults: lifetime {} (min {}, max {}), at most {} leases per host",
            format_duration(d.lifetime_secs),
            format_duration(d.min_lifetime_secs),
            format_duration(d.max_lifetime_secs),
            d.max_leases
        )?;
        match &self.rate_limit {
            Some(r) => writeln!(
                f,
                "rate limit: {} requests per second per host, burst {}",
                r.requests_per_second, r.burst
            )?,
            None => writeln!(
                f,
                "rate limit: none set, the default applies: {} requests per second per host, burst {}",
                RateLimit::DEFAULT.requests_per_second,
                RateLimit::DEFAULT.burst
            )?,
        }
        writeln!(f, "applications: {}", self.applications.len())?;
        for (id, entries) in &self.applications {
            writeln!(f, "  {id}: {}", entries.join(", "))?;
        }
        writeln!(f, "groups: {}", self.groups.len())?;
        for g in &self.groups {
            write!(f, "  line {:>4}  {}:", g.line, g.spec.name)?;
            if !g.spec.identities.is_empty() {
                write!(f, " identity {}", g.spec.identities.join(" | "))?;
            }
            if !g.spec.addresses.is_empty() {
                if !g.spec.identities.is_empty() {
                    f.write_str(" and")?;
                }
                write!(f, " address in {}", join_display(g.spec.addresses.iter()))?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "rules (first match wins, then default deny): {}",
            self.rules.len()
        )?;
        for r in &self.rules {
            let spec = &r.spec;
            write!(
                f,
                "  line {:>4}  {} {}: {} for {}",
                r.line,
                spec.action,
                spec.name,
                join_display(spec.items.iter()),
                spec.groups.join(", ")
            )?;
            if let Some(from) = &spec.from {
                write!(f, " from {}", join_display(from.iter()))?;
            }
            if spec.third_party {
                f.write_str(" (third party")?;
                if !spec.third_party_addresses.is_empty() {
                    write!(f, " in {}", join_display(spec.third_party_addresses.iter()))?;
                }
                f.write_str(")")?;
            }
            writeln!(f)?;
        }
        for w in &self.warnings {
            writeln!(f, "{w}")?;
        }
        Ok(())
    }
}

/// Builds a policy from parts and renders it as a policy file, e.g. for `fwnpctl report`'s
/// suggested policy. [`PolicyBuilder::build`] parses the rendered text with the same parser
/// as a file, so what the builder produces is exactly what an operator would get by saving
/// the text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyBuilder {
    /// Comment lines at the top of the file (without the `#`).
    pub header: Vec<String>,
    /// The `[defaults]` section; `None` leaves the built-in defaults.
    pub defaults: Option<Defaults>,
    /// The catalogue.
    pub applications: BTreeMap<String, Vec<Item>>,
    /// The groups, in order.
    pub groups: Vec<GroupSpec>,
    /// The rules, in order of evaluation.
    pub rules: Vec<RuleSpec>,
    /// The rate limit per identity.
    pub rate_limit: Option<RateLimit>,
}

impl PolicyBuilder {
    /// An empty policy (deny all).
    pub fn new() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// Adds a comment line at the top.
    pub fn comment(mut self, line: &str) -> PolicyBuilder {
        self.header.push(line.to_owned());
        self
    }

    /// Sets the defaults.
    pub fn defaults(mut self, defaults: Defaults) -> PolicyBuilder {
        self.defaults = Some(defaults);
        self
    }

    /// Adds (or replaces) an application in the catalogue.
    pub fn application(mut self, id: &str, entries: Vec<Item>) -> PolicyBuilder {
        self.applications.insert(id.to_owned(), entries);
        self
    }

    /// Adds a group.
    pub fn group(mut self, group: GroupSpec) -> PolicyBuilder {
        self.groups.push(group);
        self
    }

    /// Adds a rule after the others.
    pub fn rule(mut self, rule: RuleSpec) -> PolicyBuilder {
        self.rules.push(rule);
        self
    }

    /// Sets the rate limit.
    pub fn rate_limit(mut self, rate_limit: RateLimit) -> PolicyBuilder {
        self.rate_limit = Some(rate_limit);
        self
    }

    /// Renders the policy file.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for line in &self.header {
            for part in line.lines() {
                out.push_str("# ");
                out.push_str(part);
                out.push('\n');
            }
            if line.is_empty() {
                out.push_str("#\n");
            }
        }
        if !self.header.is_empty() {
            out.push('\n');
        }
        if let Some(d) = &self.defaults {
            out.push_str("[defaults]\n");
            let _ = writeln!(
                out,
                "lifetime = {}",
                toml_string(&format_duration(d.lifetime_secs))
            );
            let _ = writeln!(
                out,
                "min_lifetime = {}",
                toml_string(&format_duration(d.min_lifetime_secs))
            );
            let _ = writeln!(
                out,
                "max_lifetime = {}",
                toml_string(&format_duration(d.max_lifetime_secs))
            );
            let _ = writeln!(out, "max_leases = {}\n", d.max_leases);
        }
        if !self.applications.is_empty() {
            out.push_str("[applications]\n");
            for (id, entries) in &self.applications {
                let _ = writeln!(out, "{} = {}", toml_key(id), toml_list(entries.iter()));
            }
            out.push('\n');
        }
        for group in &self.groups {
            out.push_str("[[group]]\n");
            let _ = writeln!(out, "name = {}", toml_string(&group.name));
            if let Some(description) = &group.description {
                let _ = writeln!(out, "description = {}", toml_string(description));
            }
            if !group.identities.is_empty() {
                let _ = writeln!(out, "identities = {}", toml_list(group.identities.iter()));
            }
            if !group.addresses.is_empty() {
                let _ = writeln!(out, "addresses = {}", toml_list(group.addresses.iter()));
            }
            out.push('\n');
        }
        for rule in &self.rules {
            out.push_str("[[rule]]\n");
            let _ = writeln!(out, "name = {}", toml_string(&rule.name));
            if let Some(description) = &rule.description {
                let _ = writeln!(out, "description = {}", toml_string(description));
            }
            let _ = writeln!(out, "groups = {}", toml_list(rule.groups.iter()));
            let key = match rule.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            };
            let _ = writeln!(out, "{key} = {}", toml_list(rule.items.iter()));
            if let Some(from) = &rule.from {
                let _ = writeln!(out, "from = {}", toml_list(from.iter()));
            }
            for (key, value) in [
                ("lifetime", rule.lifetime_secs),
                ("min_lifetime", rule.min_lifetime_secs),
                ("max_lifetime", rule.max_lifetime_secs),
            ] {
                if let Some(secs) = value {
                    let _ = writeln!(out, "{key} = {}", toml_string(&format_duration(secs)));
                }
            }
            if let Some(max_leases) = rule.max_leases {
                let _ = writeln!(out, "max_leases = {max_leases}");
            }
            if rule.third_party {
                out.push_str("third_party = true\n");
                if !rule.third_party_addresses.is_empty() {
                    let _ = writeln!(
                        out,
                        "third_party_addresses = {}",
                        toml_list(rule.third_party_addresses.iter())
                    );
                }
            }
            out.push('\n');
        }
        if let Some(rate) = &self.rate_limit {
            out.push_str("[rate_limit]\n");
            let _ = writeln!(out, "requests_per_second = {}", rate.requests_per_second);
            let _ = writeln!(out, "burst = {}", rate.burst);
        }
        while out.ends_with("\n\n") {
            out.pop();
        }
        out
    }

    /// Renders and parses the policy; errors point into the rendered text, named `origin`.
    pub fn build(&self, origin: &str) -> Result<Policy, PolicyError> {
        Policy::from_str(&self.to_toml(), origin)
    }
}

pub(super) fn to_builder(policy: &Policy) -> PolicyBuilder {
    PolicyBuilder {
        header: Vec::new(),
        defaults: Some(policy.defaults),
        applications: policy
            .applications
            .iter()
            .map(|(id, app)| {
                (
                    id.clone(),
                    app.entries
                        .iter()
                        .map(|e| Item::Ports {
                            protocol: e.protocol,
                            ports: e.ports,
                        })
                        .collect(),
                )
            })
            .collect(),
        groups: policy.groups.iter().map(|g| g.spec.clone()).collect(),
        rules: policy.rules.iter().map(|r| r.spec.clone()).collect(),
        rate_limit: policy.rate_limit,
    }
}

/// A TOML basic string with every character that needs it escaped.
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A key, bare when TOML allows it (an application id with a `.` must be quoted, or it would
/// be read as a dotted key).
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        toml_string(key)
    }
}

fn toml_list<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    let quoted: Vec<String> = items
        .into_iter()
        .map(|item| toml_string(&item.to_string()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_keys_escape() {
        assert_eq!(toml_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        assert_eq!(toml_key("https"), "https");
        assert_eq!(toml_key("web.v2"), "\"web.v2\"");
        let text = format!("x = {}\n", toml_string("tab\there \"q\" \u{7f} é"));
        let value: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(value["x"].as_str(), Some("tab\there \"q\" \u{7f} é"));
    }
}
