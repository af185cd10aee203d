//! `fwnpctl report`: what each host and application actually asked for, and a policy that
//! allows exactly what was granted, in the policy file's own format.
//!
//! This answers the question the project started from: which ports does this application
//! really need? The suggestion is a starting point for an operator to read, not a policy to
//! install blindly: it allows each host what it was granted in the window and nothing it was
//! only denied, with lifetimes sized to how long leases were really held.

use std::collections::BTreeMap;

use crate::policy::{GroupSpec, Item, PolicyBuilder, RuleSpec};
use crate::store::ReportRow;

/// Lifetime bounds a suggestion never goes below or above, in seconds.
const MIN_SUGGESTED_MAX_LIFETIME: u32 = 60;
const MAX_SUGGESTED_MAX_LIFETIME: u32 = 24 * 3600;

/// A name usable for a group or rule, derived from a host identity
/// (`fwnp://host/web-01` → `web-01`, `spiffe://example.org/host/db` → `example-org-host-db`).
fn name_of(identity: &str) -> String {
    let tail = identity
        .strip_prefix("fwnp://host/")
        .or_else(|| identity.split_once("://").map(|(_, rest)| rest))
        .unwrap_or(identity);
    let mut name: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.is_empty() {
        name.push_str("host");
    }
    name.truncate(48);
    name
}

/// The suggested policy for the report's rows, as TOML text.
pub fn suggest_policy(rows: &[ReportRow]) -> String {
    // Per host: the items it was granted, and how long its leases were held.
    let mut hosts: BTreeMap<&str, (Vec<Item>, u64, u64)> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.granted > 0) {
        let item = match (&row.app_id, row.protocol, row.ports) {
            (Some(app), _, _) => Item::App(app.clone()),
            (None, Some(protocol), Some(ports)) => Item::Ports { protocol, ports },
            _ => continue,
        };
        let entry = hosts
            .entry(row.identity.as_str())
            .or_insert((Vec::new(), 0, 0));
        if !entry.0.contains(&item) {
            entry.0.push(item);
        }
        entry.1 = entry.1.max(row.p90_held_ms);
        entry.2 += row.leases;
    }
    let mut builder = PolicyBuilder::new()
        .comment("Suggested by `fwnpctl report` from what hosts were granted.")
        .comment("Review before use: it allows each host exactly what it used, nothing more.");
    let mut used_names: BTreeMap<String, usize> = BTreeMap::new();
    for (identity, (mut items, p90_held_ms, _)) in hosts {
        items.sort();
        let base = name_of(identity);
        let count = used_names.entry(base.clone()).or_insert(0);
        *count += 1;
        let name = if *count == 1 {
            base
        } else {
            format!("{base}-{count}")
        };
        // Leases are renewed while held, so the lifetime only needs to cover a renewal
        // interval; the p90 of the time held, doubled, bounded, is a comfortable maximum.
        let held_secs = u32::try_from(p90_held_ms / 1000).unwrap_or(u32::MAX);
        let max_lifetime = held_secs
            .saturating_mul(2)
            .clamp(MIN_SUGGESTED_MAX_LIFETIME, MAX_SUGGESTED_MAX_LIFETIME);
        let mut rule = RuleSpec::allow(&name, &[name.as_str()], items);
        rule.max_lifetime_secs = Some(max_lifetime);
        builder = builder
            .group(GroupSpec::by_identity(&name, &[identity]))
            .rule(rule);
    }
    builder.to_toml()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use fwnp_proto::{PortRange, Protocol};

    fn row(identity: &str, protocol: Protocol, port: u16, granted: u64, p90: u64) -> ReportRow {
        ReportRow {
            identity: identity.into(),
            app: Some("demo".into()),
            protocol: Some(protocol),
            ports: Some(PortRange::single(port)),
            app_id: None,
            requests: granted + 1,
            granted,
            denied: 1,
            leases: granted,
            total_held_ms: p90 * granted,
            median_held_ms: p90 / 2,
            p90_held_ms: p90,
            max_lifetime_asked: Some(600),
            first_ms: 0,
            last_ms: 1,
        }
    }

    #[test]
    fn suggestion_parses_and_allows_exactly_what_was_granted() {
        let rows = vec![
            row("fwnp://host/web-01", Protocol::Tcp, 443, 10, 300_000),
            row("fwnp://host/web-01", Protocol::Udp, 443, 2, 60_000),
            row("fwnp://host/db-01", Protocol::Tcp, 5432, 3, 7_200_000),
            // Only ever denied: not suggested.
            row("fwnp://host/db-01", Protocol::Tcp, 22, 0, 0),
        ];
        let text = suggest_policy(&rows);
        let policy = Policy::from_str(&text, "suggested.toml").expect("the suggestion parses");
        let rules: Vec<_> = policy.rules().map(|(r, _)| r.clone()).collect();
        assert_eq!(rules.len(), 2, "{text}");
        let web = rules
            .iter()
            .find(|r| r.name == "web-01")
            .expect("a rule for web-01");
        assert_eq!(web.items.len(), 2);
        assert_eq!(web.max_lifetime_secs, Some(600));
        let db = rules
            .iter()
            .find(|r| r.name == "db-01")
            .expect("a rule for db-01");
        assert_eq!(
            db.items,
            vec![Item::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(5432)
            }]
        );
        assert_eq!(db.max_lifetime_secs, Some(14_400));
    }

    #[test]
    fn names_come_from_identities() {
        assert_eq!(name_of("fwnp://host/web-01"), "web-01");
        assert_eq!(
            name_of("spiffe://example.org/host/db"),
            "example-org-host-db"
        );
        assert_eq!(name_of("gw.example.net"), "gw-example-net");
    }
}
