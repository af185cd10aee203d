//! The operator's policy: which hosts may open what, from where, for how long.
//!
//! A policy is a TOML file (a documented example is `gateway/examples/policy.toml`). It is
//! parsed and compiled once ([`Policy::load`], [`Policy::from_str`]); every mistake is refused
//! with the file, line, column and reason ([`PolicyError`]). Evaluation
//! ([`Policy::evaluate`]) is pure, allocates only its result, and runs many thousand times a
//! second.
//!
//! # The file
//!
//! - `[defaults]`: `lifetime` (granted when a request asks none), `min_lifetime`,
//!   `max_lifetime` (durations: `"30s"`, `"10m"`, `"1h30m"`, `"1d"`, or a number of seconds),
//!   `max_leases` (live leases per host). Omitted: 10m, 30s, 1h, 64.
//! - `[applications]`: the catalogue, `ID = ["tcp/443", "udp/443"]`. An id is 1 to 64 characters
//!   of `a-z 0-9 . _ -`; entries are `PROTOCOL/PORT`, `PROTOCOL/FIRST-LAST` or `PROTOCOL/*`.
//! - `[[group]]`: `name`, optional `description`, `identities` (identity patterns) and/or
//!   `addresses` (prefixes). See [Groups](#groups).
//! - `[[rule]]`: `name`, optional `description`, `groups`, exactly one of `allow` or `deny`
//!   (items `"tcp/443"`, `"udp/5000-5100"`, `"tcp/*"`, `"app:https"`), and for allow rules
//!   optionally `from`, `lifetime`, `min_lifetime`, `max_lifetime`, `max_leases`,
//!   `third_party`, `third_party_addresses`. A deny rule may carry `from` too.
//! - `[rate_limit]`: `requests_per_second` and `burst` per host identity. Parsed and checked
//!   here; the daemon enforces it, and without the table [`RateLimit::DEFAULT`].
//!
//! Every list-valued key also takes a single string (`groups = "web"`). Unknown keys are errors.
//!
//! # Groups
//!
//! A host is in a group when its identity matches one of the group's `identities` patterns
//! (if the group has any) AND one of its own addresses lies in one of the group's `addresses`
//! prefixes (if the group has any). Giving both therefore narrows: a `web-*` certificate used
//! from outside the web network is not in the group. For a union, write two groups and name
//! both in the rule. The host's own addresses are those it may open without third-party rights
//! (its certificate's IP SANs, else its connection's source address). Identity patterns are
//! described in full in the `pattern` module documentation, in short:
//! `spiffe://example.org/host/web-*` (`*` stays within one `/` segment),
//! `spiffe://example.org/**` (`**` is one or more whole segments), `fwnp://host/db-01`,
//! `*.example.org`, `**.example.org` (`*` stays within one DNS label).
//!
//! # Matching: first match, default deny
//!
//! Rules are considered in file order, as in a firewall; the first rule that matches decides,
//! and no match is a denial. For a request (an opening of ports or of an application id, on a
//! resolved host address, with optional remote prefixes):
//!
//! 1. An application id is expanded through the catalogue first; an id not in it is denied at
//!    once with `unknown-application`. Each expanded entry must then be allowed.
//! 2. A rule applies only if the host is in at least one of its groups.
//! 3. A **deny** rule matches if any asked port of any entry falls in one of its items (same
//!    protocol) and, when it has `from`, the request's remotes may overlap its prefixes (a
//!    request with no remote prefixes asks for any remote, so it overlaps). Deny rules are
//!    therefore conservative: `deny = "tcp/22"` stops a request for `tcp/1-1024`. The decision
//!    is `denied-by-policy`.
//! 4. An **allow** rule matches if:
//!    - every asked entry lies entirely within the rule's ports of the same protocol (items of
//!      one protocol that touch or overlap are joined, so `tcp/8000-8099` and `tcp/8100-8200`
//!      together cover `tcp/8050-8150`);
//!    - the host address is one the host holds, or the rule has `third_party = true` and (when
//!      `third_party_addresses` is given) the address lies in those prefixes;
//!    - the remotes fit `from` (when the rule has it): a request with no remote prefixes is
//!      **narrowed** to the rule's `from` prefixes of the host address's family (a rule with
//!      none of that family does not match); a request whose every remote prefix lies within
//!      one of the `from` prefixes keeps its own; otherwise the rule does not match. A rule
//!      without `from` keeps the request's remotes (none = any remote).
//!
//!    The grants are the expanded entries on the host address with the resulting remotes; the
//!    lifetime is the request's (its default if it asks none) clamped to the rule's bounds.
//! 5. No rule matched: `address-mismatch` if the host does not hold the address and no rule of
//!    its groups gives it third-party rights for it, else `denied-by-policy` (default deny).
//!
//! A rule's `lifetime`, `min_lifetime`, `max_lifetime` and `max_leases` replace the defaults
//! for the requests it allows. `max_leases` bounds the host's total number of live leases at the
//! moment the rule allows a new one (the lease book counts; the policy states the bound).
//!
//! # Reload
//!
//! After a reload the daemon asks [`Policy::still_allows`] for every live lease: each grant is
//! evaluated again as a request for exactly that grant, and must be allowed as it is (not
//! narrowed). A grant from an application must also still be one of that application's
//! entries. Lifetimes are not a reason to revoke: the next renewal clamps them.

mod compile;
mod evaluate;
mod pattern;
mod raw;
mod render;
mod syntax;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use fwnp_proto::message::{Grant, Opening, PortRange, Prefix, Protocol, ResultCode, Target};
use serde::Serialize;

pub use pattern::PatternError;
pub use render::{PolicyBuilder, PolicySummary};
pub use syntax::{
    DurationError, Item, ItemError, MAX_APP_ID_LEN, MAX_NAME_LEN, PrefixError, format_duration,
    is_app_id, is_name, parse_duration, parse_port_range, parse_prefix, parse_protocol,
};

use pattern::IdentityPattern;
use syntax::Net;

/// Largest policy file [`Policy::load`] reads, in bytes.
pub const MAX_POLICY_FILE_SIZE: u64 = 4 * 1024 * 1024;

/// Lifetime granted when neither the request nor a rule says otherwise (10 minutes).
pub const DEFAULT_LIFETIME_SECS: u32 = 600;
/// Smallest lifetime when the file does not say (30 seconds).
pub const DEFAULT_MIN_LIFETIME_SECS: u32 = 30;
/// Largest lifetime when the file does not say (1 hour).
pub const DEFAULT_MAX_LIFETIME_SECS: u32 = 3600;
/// Live leases per host when the file does not say.
pub const DEFAULT_MAX_LEASES: u32 = 64;

/// The `[defaults]` section, with the built-in values for what it omits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Defaults {
    /// The lifetime granted when a request asks none, in seconds.
    pub lifetime_secs: u32,
    /// The smallest lifetime granted, in seconds.
    pub min_lifetime_secs: u32,
    /// The largest lifetime granted, in seconds.
    pub max_lifetime_secs: u32,
    /// How many live leases a host may hold.
    pub max_leases: u32,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            lifetime_secs: DEFAULT_LIFETIME_SECS,
            min_lifetime_secs: DEFAULT_MIN_LIFETIME_SECS,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
            max_leases: DEFAULT_MAX_LEASES,
        }
    }
}

/// A host group as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupSpec {
    /// The group's name, referenced by rules.
    pub name: String,
    /// What the group is, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Identity patterns; empty means any identity.
    pub identities: Vec<String>,
    /// Prefixes one of the host's addresses must lie in; empty means any address.
    #[serde(serialize_with = "render::serialize_prefixes")]
    pub addresses: Vec<Prefix>,
}

impl GroupSpec {
    /// A group of the hosts whose identity matches one of the patterns.
    pub fn by_identity(name: &str, identities: &[&str]) -> GroupSpec {
        GroupSpec {
            name: name.to_owned(),
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            ..GroupSpec::default()
        }
    }

    /// A group of the hosts holding an address in one of the prefixes.
    pub fn by_address(name: &str, addresses: &[Prefix]) -> GroupSpec {
        GroupSpec {
            name: name.to_owned(),
            addresses: addresses.to_vec(),
            ..GroupSpec::default()
        }
    }
}

/// Whether a rule allows or denies what it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Written `allow = [...]`.
    #[default]
    Allow,
    /// Written `deny = [...]`.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// A rule as written in the file (durations in seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RuleSpec {
    /// The rule's name, reported in decisions and the audit trail.
    pub name: String,
    /// What the rule is for, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The groups the rule applies to (a host in any of them).
    pub groups: Vec<String>,
    /// Allow or deny.
    pub action: Action,
    /// What it allows or denies.
    #[serde(serialize_with = "render::serialize_items")]
    pub items: Vec<Item>,
    /// Remote prefixes that may connect; `None` means any.
    #[serde(serialize_with = "render::serialize_optional_prefixes")]
    pub from: Option<Vec<Prefix>>,
    /// Replaces the default lifetime.
    pub lifetime_secs: Option<u32>,
    /// Replaces the default smallest lifetime.
    pub min_lifetime_secs: Option<u32>,
    /// Replaces the default largest lifetime.
    pub max_lifetime_secs: Option<u32>,
    /// Replaces the default number of live leases per host.
    pub max_leases: Option<u32>,
    /// Whether the rule may open addresses the host does not hold.
    pub third_party: bool,
    /// With `third_party`, the prefixes such addresses must lie in; empty means any.
    #[serde(serialize_with = "render::serialize_prefixes")]
    pub third_party_addresses: Vec<Prefix>,
}

impl RuleSpec {
    /// An allow rule.
    pub fn allow(name: &str, groups: &[&str], items: Vec<Item>) -> RuleSpec {
        RuleSpec {
            name: name.to_owned(),
            groups: groups.iter().map(|s| (*s).to_owned()).collect(),
            action: Action::Allow,
            items,
            ..RuleSpec::default()
        }
    }

    /// A deny rule.
    pub fn deny(name: &str, groups: &[&str], items: Vec<Item>) -> RuleSpec {
        RuleSpec {
            action: Action::Deny,
            ..RuleSpec::allow(name, groups, items)
        }
    }
}

/// The `[rate_limit]` section: requests per host identity, for the daemon's limiter (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub requests_per_second: NonZeroU32,
    /// Requests allowed at once after a quiet period; defaults to `requests_per_second`.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// The limit in force when the policy sets none: 1000 requests per second per identity, a
    /// burst of 2000. A host agent renews each lease about twice per lifetime, so this bounds a
    /// flood without slowing any real host, nor a load test of hundreds of requests per second
    /// per host.
    pub const DEFAULT: RateLimit = RateLimit {
        requests_per_second: NonZeroU32::MIN.saturating_add(999),
        burst: NonZeroU32::MIN.saturating_add(1999),
    };

    /// The time between two replenished requests (`1 s / requests_per_second`).
    pub fn replenish_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1) / self.requests_per_second.get()
    }
}

/// The lifetime bounds that apply to a request, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LifetimeBounds {
    /// Granted when the request asks none (or 0).
    pub default_secs: u32,
    /// The smallest lifetime granted.
    pub min_secs: u32,
    /// The largest lifetime granted.
    pub max_secs: u32,
}

impl LifetimeBounds {
    /// Bounds that keep within both `self` and `other`: the higher minimum, the lower maximum
    /// (and the minimum lowered to that maximum should they cross), `self`'s default kept
    /// within them.
    pub fn narrowest(self, other: LifetimeBounds) -> LifetimeBounds {
        let max_secs = self.max_secs.min(other.max_secs);
        let min_secs = self.min_secs.max(other.min_secs).min(max_secs);
        LifetimeBounds {
            default_secs: self.default_secs.clamp(min_secs, max_secs),
            min_secs,
            max_secs,
        }
    }

    /// The lifetime to grant for an asked one: the default for `None` or 0, then clamped to
    /// `min..=max`.
    pub fn clamp(&self, asked: Option<u32>) -> u32 {
        let wanted = match asked {
            None | Some(0) => self.default_secs,
            Some(secs) => secs,
        };
        wanted.clamp(self.min_secs, self.max_secs.max(self.min_secs))
    }
}

/// A rule's name and the line of its `[[rule]]` header, as decisions report it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleRef {
    /// The rule's name.
    #[serde(serialize_with = "render::serialize_shared_str")]
    pub name: Arc<str>,
    /// Its line in the policy file (1-based).
    pub line: u32,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule \"{}\" (line {})", self.name, self.line)
    }
}

/// A request to judge: who asks, what, on which address, from where, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The host's identity from its certificate (URI or DNS name).
    pub identity: &'a str,
    /// The addresses the host holds (certificate IP SANs, else the connection's source).
    pub addresses: &'a [IpAddr],
    /// The host address to open, already resolved from the opening (key 4 or the default).
    /// When it is not among `addresses`, the request is a third-party request.
    pub host_address: IpAddr,
    /// Ports or an application id.
    pub target: &'a Target,
    /// Remote prefixes asked for; empty means any remote.
    pub remotes: &'a [Prefix],
    /// The lifetime asked in seconds; `None` or 0 asks for the default.
    pub lifetime: Option<u32>,
}

impl<'a> Request<'a> {
    /// A request for an Open's opening, on the already resolved host address.
    pub fn for_opening(
        identity: &'a str,
        addresses: &'a [IpAddr],
        host_address: IpAddr,
        opening: &'a Opening,
        lifetime: Option<u32>,
    ) -> Request<'a> {
        Request {
            identity,
            addresses,
            host_address,
            target: &opening.target,
            remotes: &opening.remotes,
            lifetime,
        }
    }

    /// Whether the host does not hold the address it asks to open.
    pub fn is_third_party(&self) -> bool {
        let wanted = self.host_address.to_canonical();
        !self.addresses.iter().any(|a| a.to_canonical() == wanted)
    }
}

/// What an allowing decision grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// The concrete grants: one per expanded entry, on the host address, with the remotes.
    pub grants: Vec<Grant>,
    /// The lifetime bounds of the rule that allowed.
    pub lifetime: LifetimeBounds,
    /// The asked lifetime clamped to those bounds.
    pub granted_lifetime_secs: u32,
    /// Live leases the host may hold under this rule.
    pub max_leases: u32,
    /// Whether the remotes were narrowed to the rule's `from`.
    pub remotes_narrowed: bool,
    /// Whether what is granted differs from what was asked (remotes or a clamped lifetime).
    pub narrowed: bool,
}

/// Allowed, with what; or denied, with the result code for the Denied answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed.
    Allowed(Allowance),
    /// Denied with this code.
    Denied(ResultCode),
}

/// The outcome of evaluating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed or denied.
    pub verdict: Verdict,
    /// The rule that decided; `None` for the default deny and for an unknown application.
    pub rule: Option<RuleRef>,
    /// Why, for the host, the operator and the audit trail.
    pub reason: String,
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allowed(_))
    }

    /// What is granted, if allowed.
    pub fn allowance(&self) -> Option<&Allowance> {
        match &self.verdict {
            Verdict::Allowed(allowance) => Some(allowance),
            Verdict::Denied(_) => None,
        }
    }

    /// The result code, if denied.
    pub fn denied_code(&self) -> Option<ResultCode> {
        match self.verdict {
            Verdict::Allowed(_) => None,
            Verdict::Denied(code) => Some(code),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Allowed(allowance) => {
                write!(f, "allowed: {}", self.reason)?;
                for grant in &allowance.grants {
                    write!(f, "\n  grant {}", render::GrantText(grant))?;
                }
                write!(
                    f,
                    "\n  lifetime {} (default {}, min {}, max {}), max leases {}{}",
                    format_duration(allowance.granted_lifetime_secs),
                    format_duration(allowance.lifetime.default_secs),
                    format_duration(allowance.lifetime.min_secs),
                    format_duration(allowance.lifetime.max_secs),
                    allowance.max_leases,
                    if allowance.narrowed { ", narrowed" } else { "" }
                )
            }
            Verdict::Denied(code) => write!(f, "denied ({code}): {}", self.reason),
        }
    }
}

/// How one step of an explanation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    /// Information about the request (an application's expansion, third-party status).
    Note,
    /// The rule was considered and does not match.
    NoMatch,
    /// The rule matched and decided.
    Matched,
}

/// One step of an explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The rule considered, if the step is about one.
    pub rule: Option<RuleRef>,
    /// How it went.
    pub outcome: StepOutcome,
    /// What was checked.
    pub detail: String,
}

/// A decision with the trace of how it was reached (what `fwnpctl policy explain` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The request, in words.
    pub request: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The decision (identical to what [`Policy::evaluate`] returns).
    pub decision: Decision,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "request: {}", self.request)?;
        for step in &self.steps {
            let mark = match step.outcome {
                StepOutcome::Note => "  note",
                StepOutcome::NoMatch => "  skip",
                StepOutcome::Matched => "  MATCH",
            };
            match &step.rule {
                Some(rule) => writeln!(f, "{mark} {rule}: {}", step.detail)?,
                None => writeln!(f, "{mark} {}", step.detail)?,
            }
        }
        write!(f, "decision: {}", self.decision)
    }
}

/// What the policy allows a host in general, for Welcome's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostLimits {
    /// The widest lifetime bounds over the allow rules that apply to the host (the defaults if
    /// none applies): the smallest minimum, the largest maximum, the first rule's default.
    pub lifetime: LifetimeBounds,
    /// The largest `max_leases` over those rules (the default if none applies).
    pub max_leases: u32,
    /// Whether some rule gives the host third-party rights.
    pub third_party: bool,
    /// How many allow rules apply to the host (0: everything it asks will be denied).
    pub allow_rules: usize,
}

/// Why a live lease's grant is no longer allowed after a reload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} is no longer allowed: {reason}", render::GrantText(grant))]
pub struct NoLongerAllowed {
    /// The grant that fails.
    pub grant: Grant,
    /// The rule that now denies it, if one does.
    pub rule: Option<RuleRef>,
    /// Why.
    pub reason: String,
}

/// A remark on a policy that is valid but probably not what was meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyWarning {
    /// The line it is about.
    pub line: u32,
    /// What is odd.
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: warning: {}", self.line, self.message)
    }
}

/// A policy file refused: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// The file name (or the origin given to [`Policy::from_str`]).
    pub origin: String,
    /// The line (1-based), 0 when the error is about the whole file.
    pub line: u32,
    /// The column (1-based, in characters), 0 when the error is about the whole file.
    pub column: u32,
    /// What is wrong.
    pub kind: PolicyErrorKind,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.origin, self.kind)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.origin, self.line, self.column, self.kind
            )
        }
    }
}

/// The reasons a policy file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyErrorKind {
    /// The file cannot be read.
    #[error("cannot read the policy: {0}")]
    Read(String),
    /// The file is larger than [`MAX_POLICY_FILE_SIZE`].
    #[error("the policy is {0} bytes, more than the {MAX_POLICY_FILE_SIZE} allowed")]
    TooLarge(u64),
    /// TOML syntax, an unknown or missing key, or a value of the wrong type.
    #[error("{0}")]
    Toml(String),
    /// A duration that does not parse.
    #[error("bad duration {text:?}: {error}")]
    Duration {
        /// The text written.
        text: String,
        /// Why.
        error: DurationError,
    },
    /// A negative number of seconds.
    #[error("a duration cannot be negative")]
    NegativeDuration,
    /// A prefix that does not parse or has host bits set.
    #[error("bad prefix {text:?}: {error}")]
    Prefix {
        /// The text written.
        text: String,
        /// Why.
        error: PrefixError,
    },
    /// An IPv4-mapped IPv6 prefix (`::ffff:0:0/96` and within): FWNP names IPv4 networks in
    /// their own form, and a grant with a mapped prefix is one a host must refuse (spec 9.4).
    #[error("bad prefix {text:?}: an IPv4-mapped IPv6 prefix; write the IPv4 network {ipv4}")]
    MappedPrefix {
        /// The text written.
        text: String,
        /// The same network in IPv4 form.
        ipv4: Prefix,
    },
    /// An item that does not parse (unknown protocol, port 0, reversed range...).
    #[error("bad item {text:?}: {error}")]
    Item {
        /// The text written.
        text: String,
        /// Why.
        error: ItemError,
    },
    /// An identity pattern that does not compile.
    #[error("bad identity pattern {text:?}: {error}")]
    Pattern {
        /// The text written.
        text: String,
        /// Why.
        error: PatternError,
    },
    /// A group or rule name with characters outside `[A-Za-z0-9._-]` or of the wrong length.
    #[error("bad name {0:?}: names are 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    /// An application id that is not 1 to 64 characters of `[a-z0-9._-]`.
    #[error("bad application id {0:?}: ids are 1 to 64 characters of a-z 0-9 . _ -")]
    AppId(String),
    /// Two groups, rules or catalogue entries with one name.
    #[error("duplicate {what} name {name:?} (first defined on line {first_line})")]
    DuplicateName {
        /// "group" or "rule".
        what: &'static str,
        /// The name.
        name: String,
        /// The line of the first definition.
        first_line: u32,
    },
    /// A rule names a group the file does not define.
    #[error("unknown group {0:?}: define it with a [[group]] first")]
    UnknownGroup(String),
    /// A rule names an application the catalogue does not hold.
    #[error("unknown application {0:?}: add it to [applications]")]
    UnknownApplication(String),
    /// A catalogue entry names another application.
    #[error("a catalogue entry must be PROTOCOL/PORTS, not another application ({0:?})")]
    NestedApplication(String),
    /// A list that must hold something is empty.
    #[error("{0} cannot be empty")]
    EmptyList(&'static str),
    /// A group with neither identities nor addresses.
    #[error("group {0:?} has neither identities nor addresses")]
    EmptyGroup(String),
    /// A rule with both `allow` and `deny`, or neither.
    #[error("a rule needs exactly one of allow = [...] or deny = [...]")]
    AllowOrDeny,
    /// Lifetimes out of order.
    #[error("{0}")]
    LifetimeOrder(String),
    /// A lifetime outside 1 second ..= the protocol's 7 days.
    #[error("{key} is {secs} seconds; it must be from 1 second to 7 days ({max} seconds)")]
    LifetimeOutOfRange {
        /// The key.
        key: &'static str,
        /// The value.
        secs: u64,
        /// The protocol's maximum.
        max: u32,
    },
    /// A number outside its range.
    #[error("{key} is {value}; it must be from {min} to {max}")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// The value written.
        value: i64,
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
    },
    /// A key only allow rules may carry, on a deny rule.
    #[error("{0} only applies to allow rules")]
    NotForDeny(&'static str),
    /// `third_party_addresses` without `third_party = true`.
    #[error("third_party_addresses needs third_party = true")]
    ThirdPartyAddressesWithoutRight,
}

#[derive(Debug)]
struct CompiledGroup {
    spec: GroupSpec,
    line: u32,
    patterns: Vec<IdentityPattern>,
    nets: Vec<Net>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortSpan {
    protocol: Protocol,
    ports: PortRange,
}

#[derive(Debug)]
struct CompiledRule {
    spec: RuleSpec,
    rule_ref: RuleRef,
    groups: Vec<usize>,
    /// Sorted by protocol and first port; touching ranges of one protocol joined.
    ports: Vec<PortSpan>,
    from: Option<Vec<Net>>,
    lifetime: LifetimeBounds,
    max_leases: u32,
    third_party_nets: Vec<Net>,
}

impl CompiledRule {
    /// Whether the rule lets its hosts open `address`, which they do not hold: it gives
    /// third-party rights, for every address or for networks that contain this one.
    fn gives_third_party_rights(&self, address: IpAddr) -> bool {
        self.spec.third_party
            && (self.third_party_nets.is_empty()
                || self
                    .third_party_nets
                    .iter()
                    .any(|n| n.contains_addr(address)))
    }
}

#[derive(Debug)]
struct Application {
    entries: Vec<PortSpan>,
    line: u32,
}

/// A parsed, checked and compiled policy.
#[derive(Debug)]
pub struct Policy {
    origin: String,
    defaults: Defaults,
    applications: BTreeMap<String, Application>,
    groups: Vec<CompiledGroup>,
    rules: Vec<CompiledRule>,
    rate_limit: Option<RateLimit>,
    warnings: Vec<PolicyWarning>,
}

impl Policy {
    /// The policy's decision for an opening that covers several host addresses (spec section 9.2):
    /// policy is asked for each address. Addresses the host named must all be admitted, so the first
    /// refusal refuses the opening; addresses the gateway chose are granted where policy admits them
    /// and left out elsewhere (narrowed), and only when policy admits none is the opening refused,
    /// with the first address's refusal. The grants of every admitted address make one allowance;
    /// its lifetime bounds and lease limit are the strictest of the rules that admitted them.
    pub fn evaluate_addresses(
        &self,
        identity: &str,
        allowed: &[IpAddr],
        hosts: &[IpAddr],
        open: &fwnp_proto::Open,
    ) -> Decision {
        let named = !open.opening.host.is_default();
        // The first admitted address's allowance, growing with the grants of the others, and
        // that first decision's rule and reason.
        let mut merged: Option<(Allowance, Option<RuleRef>, String)> = None;
        let mut refused: Vec<(IpAddr, Decision)> = Vec::new();
        for &host in hosts {
            let decision = self.evaluate(&Request::for_opening(
                identity,
                allowed,
                host,
                &open.opening,
                open.lifetime,
            ));
            match (decision.verdict, &mut merged) {
                (Verdict::Allowed(more), Some((all, _, _))) => merge_allowance(all, more),
                (Verdict::Allowed(first), None) => {
                    merged = Some((first, decision.rule, decision.reason));
                }
                (verdict @ Verdict::Denied(_), _) => {
                    let decision = Decision {
                        verdict,
                        ..decision
                    };
                    if named || hosts.len() == 1 {
                        return decision;
                    }
                    refused.push((host, decision));
                }
            }
        }
        let Some((mut all, first_rule, first_reason)) = merged else {
            return refused
                .into_iter()
                .next()
                .map(|(_, d)| d)
                .unwrap_or_else(|| Decision {
                    verdict: Verdict::Denied(ResultCode::AddressMismatch),
                    rule: None,
                    reason: "no host address to open".to_owned(),
                });
        };
        let mut reason = first_reason;
        if !refused.is_empty() {
            all.remotes_narrowed = true;
            all.narrowed = true;
            for (host, decision) in &refused {
                reason.push_str(&format!("; {host} left out: {}", decision.reason));
            }
        }
        all.granted_lifetime_secs = all.lifetime.clamp(open.lifetime);
        Decision {
            verdict: Verdict::Allowed(all),
            rule: first_rule,
            reason,
        }
    }

    /// Parses and compiles a policy from text; `origin` names it in errors (a file name).
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        compile::compile(text, origin)
    }

    /// Reads, parses and compiles a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Self::load_with_text(path).map(|(policy, _)| policy)
    }

    /// [`Policy::load`], also returning the file's text (which a cluster publishes).
    pub fn load_with_text(path: &Path) -> Result<(Policy, String), PolicyError> {
        let origin = path.display().to_string();
        let whole_file = |kind| PolicyError {
            origin: origin.clone(),
            line: 0,
            column: 0,
            kind,
        };
        let metadata = std::fs::metadata(path)
            .map_err(|e| whole_file(PolicyErrorKind::Read(e.to_string())))?;
        if metadata.len() > MAX_POLICY_FILE_SIZE {
            return Err(whole_file(PolicyErrorKind::TooLarge(metadata.len())));
        }
        let bytes =
            std::fs::read(path).map_err(|e| whole_file(PolicyErrorKind::Read(e.to_string())))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            whole_file(PolicyErrorKind::Read(format!(
                "the file is not UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            )))
        })?;
        let policy = compile::compile(&text, &origin)?;
        Ok((policy, text))
    }

    /// The policy with no rule: every request is denied.
    pub fn deny_all() -> Policy {
        Policy {
            origin: "<deny-all>".to_owned(),
            defaults: Defaults::default(),
            applications: BTreeMap::new(),
            groups: Vec::new(),
            rules: Vec::new(),
            rate_limit: None,
            warnings: Vec::new(),
        }
    }

    /// Where the policy came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The defaults in force.
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    /// The rate limit per identity, if the file sets one.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.rate_limit.as_ref()
    }

    /// The rate limit per identity in force: the file's, else [`RateLimit::DEFAULT`].
    pub fn effective_rate_limit(&self) -> RateLimit {
        self.rate_limit.unwrap_or(RateLimit::DEFAULT)
    }

    /// Remarks on a valid policy that is probably not what was meant (unused groups, no rule).
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// The catalogue's entries for an application id, if it holds the id.
    pub fn application(&self, id: &str) -> Option<Vec<(Protocol, PortRange)>> {
        self.applications
            .get(id)
            .map(|app| app.entries.iter().map(|e| (e.protocol, e.ports)).collect())
    }

    /// The application ids of the catalogue, sorted.
    pub fn application_ids(&self) -> impl Iterator<Item = &str> {
        self.applications.keys().map(String::as_str)
    }

    /// The groups, in file order, with their lines.
    pub fn groups(&self) -> impl Iterator<Item = (&GroupSpec, u32)> {
        self.groups.iter().map(|g| (&g.spec, g.line))
    }

    /// The rules, in file order, with their lines.
    pub fn rules(&self) -> impl Iterator<Item = (&RuleSpec, u32)> {
        self.rules.iter().map(|r| (&r.spec, r.rule_ref.line))
    }

    /// The names of the groups the host is in.
    pub fn groups_of(&self, identity: &str, addresses: &[IpAddr]) -> Vec<&str> {
        let view = pattern::IdentityView::new(identity);
        self.groups
            .iter()
            .filter(|g| evaluate::group_matches(g, &view, addresses))
            .map(|g| g.spec.name.as_str())
            .collect()
    }

    /// Judges a request. Pure: the same policy and request give the same decision.
    pub fn evaluate(&self, request: &Request<'_>) -> Decision {
        evaluate::decide(self, request, &mut evaluate::NoTrace)
    }

    /// Judges a request and records every step: which rules were considered and why each did
    /// or did not match.
    pub fn explain(&self, request: &Request<'_>) -> Explanation {
        let mut trace = evaluate::Trace::default();
        let decision = evaluate::decide(self, request, &mut trace);
        Explanation {
            request: render::describe_request(request),
            steps: trace.steps,
            decision,
        }
    }

    /// Whether a live lease (its grants) is still allowed, for re-evaluation after a reload
    /// and at each renewal. Each grant is judged as a request for exactly that grant; it must
    /// be allowed without narrowing, and a grant from an application must still be one of its
    /// entries. If so, gives the lifetime bounds that a renewal of the lease is clamped to:
    /// those of the rule that allows its grants, the narrowest where rules of different bounds
    /// allow them.
    pub fn still_allows(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        grants: &[Grant],
    ) -> Result<LifetimeBounds, NoLongerAllowed> {
        evaluate::still_allows(self, identity, addresses, grants)
    }

    /// The limits to announce to a host in Welcome.
    pub fn limits_for(&self, identity: &str, addresses: &[IpAddr]) -> HostLimits {
        evaluate::limits_for(self, identity, addresses)
    }

    /// A serializable description of the whole policy, for `fwnpctl policy check`.
    pub fn summary(&self) -> PolicySummary {
        render::summary(self)
    }

    /// A builder holding this policy's content, to change it or render it.
    pub fn to_builder(&self) -> PolicyBuilder {
        render::to_builder(self)
    }

    /// The policy as TOML text that [`Policy::from_str`] reads back to the same policy.
    /// Comments of the original file are not kept.
    pub fn to_toml(&self) -> String {
        self.to_builder().to_toml()
    }
}

/// Adds the grants of `more` to `all`, keeping the stricter of their limits.
fn merge_allowance(all: &mut Allowance, more: Allowance) {
    all.grants.extend(more.grants);
    let max_secs = all.lifetime.max_secs.min(more.lifetime.max_secs);
    let min_secs = all
        .lifetime
        .min_secs
        .max(more.lifetime.min_secs)
        .min(max_secs);
    let default_secs = all
        .lifetime
        .default_secs
        .min(more.lifetime.default_secs)
        .clamp(min_secs, max_secs);
    all.lifetime = LifetimeBounds {
        default_secs,
        min_secs,
        max_secs,
    };
    all.max_leases = all.max_leases.min(more.max_leases);
    all.remotes_narrowed |= more.remotes_narrowed;
    all.narrowed |= more.narrowed;
}
