//! From TOML text to a compiled [`Policy`]: every check of meaning, each pointing at the line
//! and column of what it refuses.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;

use fwnp_proto::message::{MAX_LIFETIME_SECS, Prefix};
use toml::Spanned;

use super::pattern::IdentityPattern;
use super::raw::{DurationValue, RawDefaults, RawPolicy, RawRateLimit, RawRule, StringList};
use super::syntax::{Item, Net, is_app_id, is_name, parse_duration, parse_prefix};
use super::{
    Action, Application, CompiledGroup, CompiledRule, Defaults, GroupSpec, LifetimeBounds, Policy,
    PolicyError, PolicyErrorKind, PolicyWarning, PortSpan, RateLimit, RuleRef, RuleSpec,
};

/// Largest `max_leases`, `requests_per_second` and `burst` a file may set.
const MAX_COUNT: i64 = 1_000_000;

/// The text being compiled, to turn byte offsets into lines and columns.
struct Source<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Source<'_> {
    fn line_col(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (
            u32::try_from(line).unwrap_or(u32::MAX),
            u32::try_from(column).unwrap_or(u32::MAX),
        )
    }

    fn line(&self, span: &Range<usize>) -> u32 {
        self.line_col(span.start).0
    }

    fn error(&self, span: &Range<usize>, kind: PolicyErrorKind) -> PolicyError {
        let (line, column) = self.line_col(span.start);
        PolicyError {
            origin: self.origin.to_owned(),
            line,
            column,
            kind,
        }
    }
}

pub(super) fn compile(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let source = Source { text, origin };
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_owned();
        match e.span() {
            Some(span) => source.error(&span, PolicyErrorKind::Toml(message)),
            None => PolicyError {
                origin: origin.to_owned(),
                line: 1,
                column: 1,
                kind: PolicyErrorKind::Toml(message),
            },
        }
    })?;

    let defaults = compile_defaults(&source, raw.defaults.as_ref().map(Spanned::get_ref))?;
    let applications = compile_applications(&source, &raw.applications)?;
    let groups = compile_groups(&source, &raw.groups)?;
    let rules = compile_rules(&source, &raw.rules, &defaults, &applications, &groups)?;
    let rate_limit = raw
        .rate_limit
        .as_ref()
        .map(|r| compile_rate_limit(&source, r.get_ref()))
        .transpose()?;

    let mut warnings = Vec::new();
    for group in &groups {
        let index = groups.iter().position(|g| std::ptr::eq(g, group));
        if !rules
            .iter()
            .any(|r| index.is_some_and(|i| r.groups.contains(&i)))
        {
            warnings.push(PolicyWarning {
                line: group.line,
                message: format!("group {:?} is used by no rule", group.spec.name),
            });
        }
    }
    if !rules.iter().any(|r| r.spec.action == Action::Allow) {
        warnings.push(PolicyWarning {
            line: 1,
            message: "no allow rule: every request will be denied".to_owned(),
        });
    }

    Ok(Policy {
        origin: origin.to_owned(),
        defaults,
        applications,
        groups,
        rules,
        rate_limit,
        warnings,
    })
}

fn duration(
    source: &Source<'_>,
    value: &Spanned<DurationValue>,
    key: &'static str,
) -> Result<u32, PolicyError> {
    let span = value.span();
    let secs: u64 = match value.get_ref() {
        DurationValue::Text(text) => parse_duration(text).map(u64::from).map_err(|error| {
            source.error(
                &span,
                PolicyErrorKind::Duration {
                    text: text.clone(),
                    error,
                },
            )
        })?,
        DurationValue::Seconds(n) => {
            u64::try_from(*n).map_err(|_| source.error(&span, PolicyErrorKind::NegativeDuration))?
        }
    };
    if secs == 0 || secs > u64::from(MAX_LIFETIME_SECS) {
        return Err(source.error(
            &span,
            PolicyErrorKind::LifetimeOutOfRange {
                key,
                secs,
                max: MAX_LIFETIME_SECS,
            },
        ));
    }
    u32::try_from(secs).map_err(|_| {
        source.error(
            &span,
            PolicyErrorKind::LifetimeOutOfRange {
                key,
                secs,
                max: MAX_LIFETIME_SECS,
            },
        )
    })
}

fn count(
    source: &Source<'_>,
    value: &Spanned<i64>,
    key: &'static str,
) -> Result<NonZeroU32, PolicyError> {
    let n = *value.get_ref();
    let out_of_range = || {
        source.error(
            &value.span(),
            PolicyErrorKind::OutOfRange {
                key,
                value: n,
                min: 1,
                max: MAX_COUNT,
            },
        )
    };
    if !(1..=MAX_COUNT).contains(&n) {
        return Err(out_of_range());
    }
    u32::try_from(n)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(out_of_range)
}

/// The lifetime keys of one scope (defaults or a rule), as written.
struct LifetimeKeys<'a> {
    lifetime: Option<&'a Spanned<DurationValue>>,
    min: Option<&'a Spanned<DurationValue>>,
    max: Option<&'a Spanned<DurationValue>>,
}

/// Resolves a scope's lifetime bounds over the inherited ones: written values replace
/// inherited ones; a written minimum above the maximum (written or inherited) is an error; a
/// written default outside the bounds is an error, an inherited one is clamped into them.
fn lifetimes(
    source: &Source<'_>,
    keys: &LifetimeKeys<'_>,
    inherited: LifetimeBounds,
    inherited_from: &str,
) -> Result<(LifetimeBounds, [Option<u32>; 3]), PolicyError> {
    let lifetime = keys
        .lifetime
        .map(|v| duration(source, v, "lifetime"))
        .transpose()?;
    let min = keys
        .min
        .map(|v| duration(source, v, "min_lifetime"))
        .transpose()?;
    let max = keys
        .max
        .map(|v| duration(source, v, "max_lifetime"))
        .transpose()?;
    let min_secs = min.unwrap_or(inherited.min_secs);
    let max_secs = max.unwrap_or(inherited.max_secs);
    let origin_of = |written: bool| if written { "here" } else { inherited_from };
    if min_secs > max_secs {
        let (span, which) = match (keys.min, keys.max) {
            (Some(min), _) => (min.span(), "min_lifetime"),
            (None, Some(max)) => (max.span(), "max_lifetime"),
            (None, None) => (0..0, "min_lifetime"),
        };
        return Err(source.error(
            &span,
            PolicyErrorKind::LifetimeOrder(format!(
                "{which}: min_lifetime {} (set {}) is above max_lifetime {} (set {})",
                super::format_duration(min_secs),
                origin_of(min.is_some()),
                super::format_duration(max_secs),
                origin_of(max.is_some()),
            )),
        ));
    }
    let default_secs = match (lifetime, keys.lifetime) {
        (Some(secs), Some(value)) => {
            if secs < min_secs || secs > max_secs {
                return Err(source.error(
                    &value.span(),
                    PolicyErrorKind::LifetimeOrder(format!(
                        "lifetime {} is outside min_lifetime {} .. max_lifetime {}",
                        super::format_duration(secs),
                        super::format_duration(min_secs),
                        super::format_duration(max_secs),
                    )),
                ));
            }
            secs
        }
        _ => inherited.default_secs.clamp(min_secs, max_secs),
    };
    Ok((
        LifetimeBounds {
            default_secs,
            min_secs,
            max_secs,
        },
        [lifetime, min, max],
    ))
}

fn compile_defaults(
    source: &Source<'_>,
    raw: Option<&RawDefaults>,
) -> Result<Defaults, PolicyError> {
    let builtin = Defaults::default();
    let Some(raw) = raw else {
        return Ok(builtin);
    };
    let keys = LifetimeKeys {
        lifetime: raw.lifetime.as_ref(),
        min: raw.min_lifetime.as_ref(),
        max: raw.max_lifetime.as_ref(),
    };
    let inherited = LifetimeBounds {
        default_secs: builtin.lifetime_secs,
        min_secs: builtin.min_lifetime_secs,
        max_secs: builtin.max_lifetime_secs,
    };
    // Built-in values a file does not write bend to those it does, so that writing only
    // `max_lifetime = "10s"` or only `lifetime = "2h"` is valid: the built-in bounds follow.
    let written = |value: Option<&Spanned<DurationValue>>, key| {
        value.map(|v| duration(source, v, key)).transpose()
    };
    let lifetime = written(keys.lifetime, "lifetime")?;
    let min = written(keys.min, "min_lifetime")?;
    let max = written(keys.max, "max_lifetime")?;
    let mut inherited = inherited;
    if min.is_none() {
        inherited.min_secs = [max, lifetime]
            .into_iter()
            .flatten()
            .fold(inherited.min_secs, u32::min);
    }
    if max.is_none() {
        inherited.max_secs = [min, lifetime]
            .into_iter()
            .flatten()
            .fold(inherited.max_secs, u32::max);
    }
    let (bounds, _) = lifetimes(source, &keys, inherited, "by default")?;
    let max_leases = raw
        .max_leases
        .as_ref()
        .map(|v| count(source, v, "max_leases"))
        .transpose()?
        .map_or(builtin.max_leases, NonZeroU32::get);
    Ok(Defaults {
        lifetime_secs: bounds.default_secs,
        min_lifetime_secs: bounds.min_secs,
        max_lifetime_secs: bounds.max_secs,
        max_leases,
    })
}

fn parse_item(source: &Source<'_>, text: &str, span: &Range<usize>) -> Result<Item, PolicyError> {
    text.parse::<Item>().map_err(|error| {
        source.error(
            span,
            PolicyErrorKind::Item {
                text: text.to_owned(),
                error,
            },
        )
    })
}

fn parse_prefixes(
    source: &Source<'_>,
    list: &Spanned<StringList>,
    key: &'static str,
) -> Result<Vec<Prefix>, PolicyError> {
    let items = list.get_ref().items(&list.span());
    if items.is_empty() {
        return Err(source.error(&list.span(), PolicyErrorKind::EmptyList(key)));
    }
    items
        .iter()
        .map(|(text, span)| {
            let prefix = parse_prefix(text).map_err(|error| {
                source.error(
                    span,
                    PolicyErrorKind::Prefix {
                        text: text.clone(),
                        error,
                    },
                )
            })?;
            match mapped_ipv4(&prefix) {
                Some(ipv4) => Err(source.error(
                    span,
                    PolicyErrorKind::MappedPrefix {
                        text: text.clone(),
                        ipv4,
                    },
                )),
                None => Ok(prefix),
            }
        })
        .collect()
}

/// The IPv4 network an IPv4-mapped IPv6 prefix (within `::ffff:0:0/96`) stands for.
fn mapped_ipv4(prefix: &Prefix) -> Option<Prefix> {
    let IpAddr::V6(v6) = prefix.addr else {
        return None;
    };
    let v4 = v6.to_ipv4_mapped()?;
    Some(Prefix {
        addr: IpAddr::V4(v4),
        len: prefix.len.checked_sub(96)?,
    })
}

fn compile_applications(
    source: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<StringList>>,
) -> Result<BTreeMap<String, Application>, PolicyError> {
    let mut applications = BTreeMap::new();
    for (id, list) in raw {
        if !is_app_id(id.get_ref()) {
            return Err(source.error(&id.span(), PolicyErrorKind::AppId(id.get_ref().clone())));
        }
        let items = list.get_ref().items(&list.span());
        if items.is_empty() {
            return Err(source.error(&list.span(), PolicyErrorKind::EmptyList("an application")));
        }
        let mut entries = Vec::with_capacity(items.len());
        for (text, span) in &items {
            match parse_item(source, text, span)? {
                Item::Ports { protocol, ports } => {
                    let entry = PortSpan { protocol, ports };
                    if !entries.contains(&entry) {
                        entries.push(entry);
                    }
                }
                Item::App(_) => {
                    return Err(
                        source.error(span, PolicyErrorKind::NestedApplication(text.clone()))
                    );
                }
            }
        }
        applications.insert(
            id.get_ref().clone(),
            Application {
                entries,
                line: source.line(&id.span()),
            },
        );
    }
    Ok(applications)
}

fn compile_groups(
    source: &Source<'_>,
    raw: &[Spanned<super::raw::RawGroup>],
) -> Result<Vec<CompiledGroup>, PolicyError> {
    let mut groups: Vec<CompiledGroup> = Vec::with_capacity(raw.len());
    let mut seen: HashMap<String, u32> = HashMap::new();
    for spanned in raw {
        let group = spanned.get_ref();
        let name = group.name.get_ref();
        let line = source.line(&spanned.span());
        if !is_name(name) {
            return Err(source.error(&group.name.span(), PolicyErrorKind::Name(name.clone())));
        }
        if let Some(&first_line) = seen.get(name) {
            return Err(source.error(
                &group.name.span(),
                PolicyErrorKind::DuplicateName {
                    what: "group",
                    name: name.clone(),
                    first_line,
                },
            ));
        }
        seen.insert(name.clone(), line);
        let mut patterns = Vec::new();
        if let Some(list) = &group.identities {
            let items = list.get_ref().items(&list.span());
            if items.is_empty() {
                return Err(source.error(&list.span(), PolicyErrorKind::EmptyList("identities")));
            }
            for (text, span) in &items {
                let pattern = IdentityPattern::compile(text).map_err(|error| {
                    source.error(
                        span,
                        PolicyErrorKind::Pattern {
                            text: text.clone(),
                            error,
                        },
                    )
                })?;
                patterns.push(pattern);
            }
        }
        let addresses = match &group.addresses {
            Some(list) => parse_prefixes(source, list, "addresses")?,
            None => Vec::new(),
        };
        if patterns.is_empty() && addresses.is_empty() {
            return Err(source.error(&spanned.span(), PolicyErrorKind::EmptyGroup(name.clone())));
        }
        groups.push(CompiledGroup {
            spec: GroupSpec {
                name: name.clone(),
                description: group.description.clone(),
                identities: patterns.iter().map(|p| p.as_str().to_owned()).collect(),
                addresses: addresses.clone(),
            },
            line,
            nets: addresses.iter().map(Net::from_prefix).collect(),
            patterns,
        });
    }
    Ok(groups)
}

/// Sorts port spans and joins those of one protocol that overlap or touch.
fn join_spans(mut spans: Vec<PortSpan>) -> Vec<PortSpan> {
    spans.sort_by_key(|s| (s.protocol, s.ports.first, s.ports.last));
    let mut joined: Vec<PortSpan> = Vec::with_capacity(spans.len());
    for span in spans {
        match joined.last_mut() {
            Some(last)
                if last.protocol == span.protocol
                    && u32::from(span.ports.first) <= u32::from(last.ports.last) + 1 =>
            {
                last.ports.last = last.ports.last.max(span.ports.last);
            }
            _ => joined.push(span),
        }
    }
    joined
}

fn compile_rules(
    source: &Source<'_>,
    raw: &[Spanned<RawRule>],
    defaults: &Defaults,
    applications: &BTreeMap<String, Application>,
    groups: &[CompiledGroup],
) -> Result<Vec<CompiledRule>, PolicyError> {
    let mut rules = Vec::with_capacity(raw.len());
    let mut seen: HashMap<String, u32> = HashMap::new();
    for spanned in raw {
        let rule = spanned.get_ref();
        let line = source.line(&spanned.span());
        let name = rule.name.get_ref();
        if !is_name(name) {
            return Err(source.error(&rule.name.span(), PolicyErrorKind::Name(name.clone())));
        }
        if let Some(&first_line) = seen.get(name) {
            return Err(source.error(
                &rule.name.span(),
                PolicyErrorKind::DuplicateName {
                    what: "rule",
                    name: name.clone(),
                    first_line,
                },
            ));
        }
        seen.insert(name.clone(), line);

        let group_items = rule.groups.get_ref().items(&rule.groups.span());
        if group_items.is_empty() {
            return Err(source.error(&rule.groups.span(), PolicyErrorKind::EmptyList("groups")));
        }
        let mut group_indices = Vec::with_capacity(group_items.len());
        let mut group_names = Vec::with_capacity(group_items.len());
        for (group_name, span) in &group_items {
            let index = groups
                .iter()
                .position(|g| &g.spec.name == group_name)
                .ok_or_else(|| {
                    source.error(span, PolicyErrorKind::UnknownGroup(group_name.clone()))
                })?;
            if !group_indices.contains(&index) {
                group_indices.push(index);
                group_names.push(group_name.clone());
            }
        }

        let (action, list, key) = match (&rule.allow, &rule.deny) {
            (Some(list), None) => (Action::Allow, list, "allow"),
            (None, Some(list)) => (Action::Deny, list, "deny"),
            _ => return Err(source.error(&spanned.span(), PolicyErrorKind::AllowOrDeny)),
        };
        let item_texts = list.get_ref().items(&list.span());
        if item_texts.is_empty() {
            return Err(source.error(&list.span(), PolicyErrorKind::EmptyList(key)));
        }
        let mut items = Vec::with_capacity(item_texts.len());
        let mut spans = Vec::new();
        for (text, span) in &item_texts {
            let item = parse_item(source, text, span)?;
            match &item {
                Item::Ports { protocol, ports } => spans.push(PortSpan {
                    protocol: *protocol,
                    ports: *ports,
                }),
                Item::App(id) => {
                    let app = applications.get(id).ok_or_else(|| {
                        source.error(span, PolicyErrorKind::UnknownApplication(id.clone()))
                    })?;
                    spans.extend(app.entries.iter().copied());
                }
            }
            if !items.contains(&item) {
                items.push(item);
            }
        }

        let from = rule
            .from
            .as_ref()
            .map(|list| parse_prefixes(source, list, "from"))
            .transpose()?;

        if action == Action::Deny {
            let allow_only: [(&'static str, Option<Range<usize>>); 6] = [
                ("lifetime", rule.lifetime.as_ref().map(Spanned::span)),
                (
                    "min_lifetime",
                    rule.min_lifetime.as_ref().map(Spanned::span),
                ),
                (
                    "max_lifetime",
                    rule.max_lifetime.as_ref().map(Spanned::span),
                ),
                ("max_leases", rule.max_leases.as_ref().map(Spanned::span)),
                ("third_party", rule.third_party.as_ref().map(Spanned::span)),
                (
                    "third_party_addresses",
                    rule.third_party_addresses.as_ref().map(Spanned::span),
                ),
            ];
            if let Some((key, Some(span))) = allow_only.into_iter().find(|(_, s)| s.is_some()) {
                return Err(source.error(&span, PolicyErrorKind::NotForDeny(key)));
            }
        }

        let inherited = LifetimeBounds {
            default_secs: defaults.lifetime_secs,
            min_secs: defaults.min_lifetime_secs,
            max_secs: defaults.max_lifetime_secs,
        };
        let keys = LifetimeKeys {
            lifetime: rule.lifetime.as_ref(),
            min: rule.min_lifetime.as_ref(),
            max: rule.max_lifetime.as_ref(),
        };
        let (lifetime, [lifetime_secs, min_lifetime_secs, max_lifetime_secs]) =
            lifetimes(source, &keys, inherited, "in [defaults]")?;
        let max_leases = rule
            .max_leases
            .as_ref()
            .map(|v| count(source, v, "max_leases"))
            .transpose()?
            .map(NonZeroU32::get);

        let third_party = rule.third_party.as_ref().is_some_and(|v| *v.get_ref());
        let third_party_addresses = match &rule.third_party_addresses {
            Some(list) => {
                if !third_party {
                    return Err(source.error(
                        &list.span(),
                        PolicyErrorKind::ThirdPartyAddressesWithoutRight,
                    ));
                }
                parse_prefixes(source, list, "third_party_addresses")?
            }
            None => Vec::new(),
        };

        rules.push(CompiledRule {
            rule_ref: RuleRef {
                name: Arc::from(name.as_str()),
                line,
            },
            groups: group_indices,
            ports: join_spans(spans),
            from: from
                .as_ref()
                .map(|prefixes| prefixes.iter().map(Net::from_prefix).collect()),
            lifetime,
            max_leases: max_leases.unwrap_or(defaults.max_leases),
            third_party_nets: third_party_addresses.iter().map(Net::from_prefix).collect(),
            spec: RuleSpec {
                name: name.clone(),
                description: rule.description.clone(),
                groups: group_names,
                action,
                items,
                from,
                lifetime_secs,
                min_lifetime_secs,
                max_lifetime_secs,
                max_leases,
                third_party,
                third_party_addresses,
            },
        });
    }
    Ok(rules)
}

fn compile_rate_limit(source: &Source<'_>, raw: &RawRateLimit) -> Result<RateLimit, PolicyError> {
    let requests_per_second = count(source, &raw.requests_per_second, "requests_per_second")?;
    let burst = raw
        .burst
        .as_ref()
        .map(|v| count(source, v, "burst"))
        .transpose()?
        .unwrap_or(requests_per_second);
    Ok(RateLimit {
        requests_per_second,
        burst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::message::{PortRange, Protocol};

    #[test]
    fn spans_join_when_they_touch() {
        let span = |protocol, first, last| PortSpan {
            protocol,
            ports: PortRange { first, last },
        };
        let joined = join_spans(vec![
            span(Protocol::Tcp, 8100, 8200),
            span(Protocol::Udp, 443, 443),
            span(Protocol::Tcp, 8000, 8099),
            span(Protocol::Tcp, 443, 443),
            span(Protocol::Tcp, 9000, 9000),
            span(Protocol::Tcp, 1, 65535),
        ]);
        assert_eq!(
            joined,
            vec![span(Protocol::Tcp, 1, 65535), span(Protocol::Udp, 443, 443)]
        );
        let joined = join_spans(vec![
            span(Protocol::Tcp, 8100, 8200),
            span(Protocol::Tcp, 8000, 8099),
            span(Protocol::Tcp, 8202, 8300),
        ]);
        assert_eq!(
            joined,
            vec![
                span(Protocol::Tcp, 8000, 8200),
                span(Protocol::Tcp, 8202, 8300)
            ]
        );
    }

    #[test]
    fn line_and_column_count_characters() {
        let source = Source {
            text: "a = 1\nbé = \"x\"\n",
            origin: "t",
        };
        assert_eq!(source.line_col(0), (1, 1));
        assert_eq!(source.line_col(6), (2, 1));
        // "bé = " is 6 bytes but 5 characters: the value starts in column 6.
        assert_eq!(source.line_col(12), (2, 6));
        assert_eq!(source.line_col(10_000), (3, 1));
    }
}
