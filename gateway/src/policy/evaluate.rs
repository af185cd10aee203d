//! Evaluation: first match in file order, default deny. One function serves both
//! [`Policy::evaluate`] and [`Policy::explain`]; a tracer type parameter decides at compile
//! time whether the steps are written down, so plain evaluation formats nothing it does not
//! return.

use std::borrow::Cow;
use std::net::IpAddr;

use fwnp_proto::message::{Grant, Prefix, ResultCode, Target};

use super::pattern::IdentityView;
use super::render::{SpanText, join_display};
use super::syntax::Net;
use super::{
    Action, Allowance, CompiledGroup, CompiledRule, Decision, HostLimits, LifetimeBounds,
    NoLongerAllowed, Policy, PortSpan, Request, RuleRef, Step, StepOutcome, Verdict,
};

/// Receives the steps of an evaluation.
pub(super) trait Tracer {
    /// Whether steps are recorded; when false, no step text is even formatted.
    const ON: bool;
    fn step(&mut self, rule: Option<&RuleRef>, outcome: StepOutcome, detail: String);
}

/// Records nothing.
pub(super) struct NoTrace;

impl Tracer for NoTrace {
    const ON: bool = false;
    fn step(&mut self, _: Option<&RuleRef>, _: StepOutcome, _: String) {}
}

/// Records every step.
#[derive(Default)]
pub(super) struct Trace {
    pub(super) steps: Vec<Step>,
}

impl Tracer for Trace {
    const ON: bool = true;
    fn step(&mut self, rule: Option<&RuleRef>, outcome: StepOutcome, detail: String) {
        self.steps.push(Step {
            rule: rule.cloned(),
            outcome,
            detail,
        });
    }
}

/// Group membership computed at most once per group and request, without allocating (for
/// the first 128 groups; later ones are simply computed again).
struct GroupMemo {
    known: u128,
    value: u128,
}

impl GroupMemo {
    fn new() -> GroupMemo {
        GroupMemo { known: 0, value: 0 }
    }

    fn is_member(
        &mut self,
        groups: &[CompiledGroup],
        index: usize,
        identity: &IdentityView<'_>,
        addresses: &[IpAddr],
    ) -> bool {
        let Some(group) = groups.get(index) else {
            return false;
        };
        if index >= 128 {
            return group_matches(group, identity, addresses);
        }
        let bit = 1u128 << index;
        if self.known & bit != 0 {
            return self.value & bit != 0;
        }
        let member = group_matches(group, identity, addresses);
        self.known |= bit;
        if member {
            self.value |= bit;
        }
        member
    }
}

/// Whether the host is in the group: identity (if the group names any) and address (if the
/// group names any) must both match.
pub(super) fn group_matches(
    group: &CompiledGroup,
    identity: &IdentityView<'_>,
    addresses: &[IpAddr],
) -> bool {
    (group.patterns.is_empty() || group.patterns.iter().any(|p| p.matches(identity)))
        && (group.nets.is_empty()
            || addresses
                .iter()
                .any(|&a| group.nets.iter().any(|n| n.contains_addr(a))))
}

fn rule_groups_text(policy: &Policy, rule: &CompiledRule) -> String {
    join_display(
        rule.groups
            .iter()
            .filter_map(|&g| policy.groups.get(g))
            .map(|g| g.spec.name.as_str()),
    )
}

fn denied(code: ResultCode, rule: Option<&RuleRef>, reason: String) -> Decision {
    Decision {
        verdict: Verdict::Denied(code),
        rule: rule.cloned(),
        reason,
    }
}

/// Whether an allow rule of the host's groups gives it third-party rights covering the
/// request's host address.
fn third_party_rights_cover(policy: &Policy, request: &Request<'_>) -> bool {
    let identity = IdentityView::new(request.identity);
    let mut memo = GroupMemo::new();
    policy.rules.iter().any(|rule| {
        rule.spec.action == Action::Allow
            && rule.gives_third_party_rights(request.host_address)
            && rule
                .groups
                .iter()
                .any(|&g| memo.is_member(&policy.groups, g, &identity, request.addresses))
    })
}

/// What the request asks, in words, for reasons ("tcp/443", "app https").
fn what_text(request: &Request<'_>) -> String {
    match request.target {
        Target::Ports { protocol, ports } => format!("{protocol}/{ports}"),
        Target::App(id) => format!("app {id}"),
    }
}

/// Checks what validation should already have refused, so that a caller that skipped it
/// still gets a sound answer.
fn malformed(request: &Request<'_>, entries: &[PortSpan]) -> Option<String> {
    if let Some(bad) = entries
        .iter()
        .find(|e| e.ports.first == 0 || e.ports.last < e.ports.first)
    {
        return Some(format!(
            "{}/{}-{} is not a valid port range",
            bad.protocol, bad.ports.first, bad.ports.last
        ));
    }
    for remote in request.remotes {
        let max_len = if remote.addr.is_ipv4() { 32 } else { 128 };
        if remote.len > max_len || Net::had_host_bits(remote) {
            return Some(format!("remote prefix {remote} is not a valid prefix"));
        }
        if !Net::from_prefix(remote).same_family(request.host_address) {
            return Some(format!(
                "remote prefix {remote} is not of the family of host address {}",
                request.host_address
            ));
        }
    }
    None
}

pub(super) fn decide<T: Tracer>(policy: &Policy, request: &Request<'_>, trace: &mut T) -> Decision {
    // An address the host does not hold is address-mismatch before anything else is looked at
    // (spec 4.3, 11.3 step 6), unless a rule of the host gives it third-party rights there:
    // deny rules, the catalogue and the ports only decide within those rights.
    if request.is_third_party() && !third_party_rights_cover(policy, request) {
        let reason = format!(
            "the host does not hold {} and no rule gives it third-party rights there",
            request.host_address
        );
        if T::ON {
            trace.step(None, StepOutcome::Note, reason.clone());
        }
        return denied(ResultCode::AddressMismatch, None, reason);
    }
    let single;
    let (entries, app): (&[PortSpan], Option<&str>) = match request.target {
        Target::Ports { protocol, ports } => {
            single = [PortSpan {
                protocol: *protocol,
                ports: *ports,
            }];
            (&single, None)
        }
        Target::App(id) => match policy.applications.get(id) {
            Some(application) => {
                if T::ON {
                    trace.step(
                        None,
                        StepOutcome::Note,
                        format!(
                            "application {id} (catalogue line {}) is {}",
                            application.line,
                            join_display(application.entries.iter().map(SpanText))
                        ),
                    );
                }
                (application.entries.as_slice(), Some(id.as_str()))
            }
            None => {
                let reason = format!("application {id:?} is not in the gateway's catalogue");
                if T::ON {
                    trace.step(None, StepOutcome::Note, reason.clone());
                }
                return denied(ResultCode::UnknownApplication, None, reason);
            }
        },
    };
    if let Some(reason) = malformed(request, entries) {
        if T::ON {
            trace.step(None, StepOutcome::Note, reason.clone());
        }
        return denied(ResultCode::MalformedOption, None, reason);
    }

    let identity = IdentityView::new(request.identity);
    let third_party = request.is_third_party();
    if T::ON && third_party {
        trace.step(
            None,
            StepOutcome::Note,
            format!(
                "the host does not hold {}: a third-party request",
                request.host_address
            ),
        );
    }
    let mut memo = GroupMemo::new();
    let mut third_party_right_seen = false;

    for rule in &policy.rules {
        let rule_ref = &rule.rule_ref;
        // Without a trace the cheap port check goes first: most rules fail it, and then the
        // host's groups need not be computed. The decision is the same in either order; only
        // a rule with third-party rights must still be looked at for a third-party request,
        // since it decides between address-mismatch and denied-by-policy.
        if !T::ON {
            let ports_fit = match rule.spec.action {
                Action::Deny => deny_hit(rule, entries, request.remotes).is_some(),
                Action::Allow => entries.iter().all(|e| covers(rule, e)),
            };
            let may_matter = ports_fit || (third_party && rule.spec.third_party);
            if !may_matter {
                continue;
            }
        }
        let in_groups = rule
            .groups
            .iter()
            .any(|&g| memo.is_member(&policy.groups, g, &identity, request.addresses));
        if !in_groups {
            if T::ON {
                trace.step(
                    Some(rule_ref),
                    StepOutcome::NoMatch,
                    format!(
                        "the host is in none of its groups ({})",
                        rule_groups_text(policy, rule)
                    ),
                );
            }
            continue;
        }

        if rule.spec.action == Action::Deny {
            match deny_hit(rule, entries, request.remotes) {
                Some(hit) => {
                    let reason = format!("{rule_ref} denies {}", SpanText(&hit));
                    if T::ON {
                        trace.step(Some(rule_ref), StepOutcome::Matched, reason.clone());
                    }
                    return denied(ResultCode::DeniedByPolicy, Some(rule_ref), reason);
                }
                None => {
                    if T::ON {
                        let detail = match &rule.spec.from {
                            Some(from) if !request.remotes.is_empty() => format!(
                                "denies {} from {}, which the request does not touch",
                                join_display(rule.ports.iter().map(SpanText)),
                                join_display(from.iter())
                            ),
                            _ => format!(
                                "denies {}, which the request does not touch",
                                join_display(rule.ports.iter().map(SpanText))
                            ),
                        };
                        trace.step(Some(rule_ref), StepOutcome::NoMatch, detail);
                    }
                    continue;
                }
            }
        }

        if third_party {
            let right = rule.gives_third_party_rights(request.host_address);
            if !right {
                if T::ON {
                    let detail = if rule.spec.third_party {
                        format!(
                            "its third-party rights ({}) do not cover {}",
                            join_display(rule.spec.third_party_addresses.iter()),
                            request.host_address
                        )
                    } else {
                        format!(
                            "it gives no third-party rights, and the host does not hold {}",
                            request.host_address
                        )
                    };
                    trace.step(Some(rule_ref), StepOutcome::NoMatch, detail);
                }
                continue;
            }
            third_party_right_seen = true;
        }

        if let Some(missing) = entries.iter().find(|e| !covers(rule, e)) {
            if T::ON {
                trace.step(
                    Some(rule_ref),
                    StepOutcome::NoMatch,
                    format!(
                        "it does not allow {} (it allows {})",
                        SpanText(missing),
                        join_display(rule.ports.iter().map(SpanText))
                    ),
                );
            }
            continue;
        }

        let (remotes, remotes_narrowed): (Cow<'_, [Prefix]>, bool) =
            match (&rule.from, &rule.spec.from) {
                (Some(nets), Some(prefixes)) => {
                    if request.remotes.is_empty() {
                        let same_family: Vec<Prefix> = nets
                            .iter()
                            .zip(prefixes)
                            .filter(|(net, _)| net.same_family(request.host_address))
                            .map(|(_, prefix)| *prefix)
                            .collect();
                        if same_family.is_empty() {
                            if T::ON {
                                trace.step(
                                    Some(rule_ref),
                                    StepOutcome::NoMatch,
                                    format!(
                                        "its from ({}) holds no prefix of the family of {}",
                                        join_display(prefixes.iter()),
                                        request.host_address
                                    ),
                                );
                            }
                            continue;
                        }
                        (Cow::Owned(same_family), true)
                    } else if let Some(outside) = request.remotes.iter().find(|remote| {
                        let remote = Net::from_prefix(remote);
                        !nets.iter().any(|n| n.contains_net(&remote))
                    }) {
                        if T::ON {
                            trace.step(
                                Some(rule_ref),
                                StepOutcome::NoMatch,
                                format!(
                                    "remote {outside} is outside its from ({})",
                                    join_display(prefixes.iter())
                                ),
                            );
                        }
                        continue;
                    } else {
                        (Cow::Borrowed(request.remotes), false)
                    }
                }
                _ => (Cow::Borrowed(request.remotes), false),
            };

        let granted_lifetime_secs = rule.lifetime.clamp(request.lifetime);
        let lifetime_clamped =
            matches!(request.lifetime, Some(asked) if asked != 0 && asked != granted_lifetime_secs);
        let grants: Vec<Grant> = entries
            .iter()
            .map(|entry| Grant {
                protocol: entry.protocol,
                ports: entry.ports,
                host: request.host_address,
                remotes: remotes.to_vec(),
                app: app.map(str::to_owned),
            })
            .collect();
        let reason = if remotes_narrowed {
            format!(
                "allowed by {rule_ref}, remotes narrowed to {}",
                join_display(remotes.iter())
            )
        } else {
            format!("allowed by {rule_ref}")
        };
        if T::ON {
            trace.step(Some(rule_ref), StepOutcome::Matched, reason.clone());
        }
        return Decision {
            verdict: Verdict::Allowed(Allowance {
                grants,
                lifetime: rule.lifetime,
                granted_lifetime_secs,
                max_leases: rule.max_leases,
                remotes_narrowed,
                narrowed: remotes_narrowed || lifetime_clamped,
            }),
            rule: Some(rule_ref.clone()),
            reason,
        };
    }

    let decision = if third_party && !third_party_right_seen {
        denied(
            ResultCode::AddressMismatch,
            None,
            format!(
                "the host does not hold {} and no rule gives it third-party rights there",
                request.host_address
            ),
        )
    } else {
        denied(
            ResultCode::DeniedByPolicy,
            None,
            format!(
                "no rule allows {} on {} (default deny)",
                what_text(request),
                request.host_address
            ),
        )
    };
    if T::ON {
        trace.step(None, StepOutcome::Note, decision.reason.clone());
    }
    decision
}

/// Whether one span of the rule holds the whole entry.
fn covers(rule: &CompiledRule, entry: &PortSpan) -> bool {
    rule.ports
        .iter()
        .any(|span| span.protocol == entry.protocol && span.ports.contains_range(&entry.ports))
}

/// The part of the request a deny rule hits, if any: an overlap of ports of one protocol,
/// provided the remotes may overlap the rule's `from`.
fn deny_hit(rule: &CompiledRule, entries: &[PortSpan], remotes: &[Prefix]) -> Option<PortSpan> {
    let remotes_touch = match &rule.from {
        None => true,
        Some(nets) => {
            remotes.is_empty()
                || remotes.iter().any(|remote| {
                    let remote = Net::from_prefix(remote);
                    nets.iter().any(|n| n.overlaps(&remote))
                })
        }
    };
    if !remotes_touch {
        return None;
    }
    entries.iter().find_map(|entry| {
        rule.ports.iter().find_map(|span| {
            let first = span.ports.first.max(entry.ports.first);
            let last = span.ports.last.min(entry.ports.last);
            (span.protocol == entry.protocol && first <= last).then_some(PortSpan {
                protocol: entry.protocol,
                ports: fwnp_proto::message::PortRange { first, last },
            })
        })
    })
}

pub(super) fn still_allows(
    policy: &Policy,
    identity: &str,
    addresses: &[IpAddr],
    grants: &[Grant],
) -> Result<LifetimeBounds, NoLongerAllowed> {
    let mut bounds: Option<LifetimeBounds> = None;
    for grant in grants {
        let fail = |rule: Option<RuleRef>, reason: String| NoLongerAllowed {
            grant: grant.clone(),
            rule,
            reason,
        };
        if let Some(id) = &grant.app {
            let entry = PortSpan {
                protocol: grant.protocol,
                ports: grant.ports,
            };
            match policy.applications.get(id) {
                None => {
                    return Err(fail(
                        None,
                        format!("application {id:?} is no longer in the catalogue"),
                    ));
                }
                Some(application) if !application.entries.contains(&entry) => {
                    return Err(fail(
                        None,
                        format!("application {id:?} no longer includes {}", SpanText(&entry)),
                    ));
                }
                Some(_) => {}
            }
        }
        let target = Target::Ports {
            protocol: grant.protocol,
            ports: grant.ports,
        };
        let decision = decide_on_grant(policy, identity, addresses, grant, &target);
        match decision.verdict {
            Verdict::Allowed(allowance) if !allowance.remotes_narrowed => {
                // The bounds of the rule that allows the opening as it was asked: for a grant
                // of an application, the rule that allows the application, which may not be
                // the one that allows the entry on its own.
                let lifetime = grant
                    .app
                    .as_deref()
                    .and_then(|id| application_bounds(policy, identity, addresses, grant, id))
                    .unwrap_or(allowance.lifetime);
                bounds = Some(match bounds {
                    None => lifetime,
                    Some(so_far) => so_far.narrowest(lifetime),
                });
            }
            Verdict::Allowed(allowance) => {
                let narrowed_to = allowance
                    .grants
                    .first()
                    .map(|g| join_display(g.remotes.iter()))
                    .unwrap_or_default();
                return Err(fail(
                    decision.rule,
                    format!(
                        "the lease admits any remote; the policy now admits only {narrowed_to}"
                    ),
                ));
            }
            Verdict::Denied(_) => return Err(fail(decision.rule, decision.reason)),
        }
    }
    // A lease has at least one grant; for none, the policy's defaults.
    Ok(bounds.unwrap_or_else(|| default_bounds(policy)))
}

/// The lifetime bounds of the policy's `[defaults]`.
fn default_bounds(policy: &Policy) -> LifetimeBounds {
    LifetimeBounds {
        default_secs: policy.defaults.lifetime_secs,
        min_secs: policy.defaults.min_lifetime_secs,
        max_secs: policy.defaults.max_lifetime_secs,
    }
}

/// The lifetime bounds of the rule that allows application `id` on `grant`'s host address and
/// remotes, if one does.
fn application_bounds(
    policy: &Policy,
    identity: &str,
    addresses: &[IpAddr],
    grant: &Grant,
    id: &str,
) -> Option<LifetimeBounds> {
    let target = Target::App(id.to_owned());
    match decide_on_grant(policy, identity, addresses, grant, &target).verdict {
        Verdict::Allowed(allowance) => Some(allowance.lifetime),
        Verdict::Denied(_) => None,
    }
}

/// The decision for `target` asked on `grant`'s host address and remotes, with no lifetime.
fn decide_on_grant(
    policy: &Policy,
    identity: &str,
    addresses: &[IpAddr],
    grant: &Grant,
    target: &Target,
) -> Decision {
    let request = Request {
        identity,
        addresses,
        host_address: grant.host,
        target,
        remotes: &grant.remotes,
        lifetime: None,
    };
    decide(policy, &request, &mut NoTrace)
}

pub(super) fn limits_for(policy: &Policy, identity: &str, addresses: &[IpAddr]) -> HostLimits {
    let view = IdentityView::new(identity);
    let mut memo = GroupMemo::new();
    let mut limits: Option<HostLimits> = None;
    for rule in policy
        .rules
        .iter()
        .filter(|r| r.spec.action == Action::Allow)
    {
        if !rule
            .groups
            .iter()
            .any(|&g| memo.is_member(&policy.groups, g, &view, addresses))
        {
            continue;
        }
        limits = Some(match limits {
            None => HostLimits {
                lifetime: rule.lifetime,
                max_leases: rule.max_leases,
                third_party: rule.spec.third_party,
                allow_rules: 1,
            },
            Some(so_far) => HostLimits {
                lifetime: LifetimeBounds {
                    default_secs: so_far.lifetime.default_secs,
                    min_secs: so_far.lifetime.min_secs.min(rule.lifetime.min_secs),
                    max_secs: so_far.lifetime.max_secs.max(rule.lifetime.max_secs),
                },
                max_leases: so_far.max_leases.max(rule.max_leases),
                third_party: so_far.third_party || rule.spec.third_party,
                allow_rules: so_far.allow_rules + 1,
            },
        });
    }
    limits.unwrap_or(HostLimits {
        lifetime: default_bounds(policy),
        max_leases: policy.defaults.max_leases,
        third_party: false,
        allow_rules: 0,
    })
}
