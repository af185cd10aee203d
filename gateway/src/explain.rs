//! `policy explain`: a request described as an [`ExplainRequest`] (as `fwnpctl policy explain`
//! sends it to the admin API, or evaluates locally against a file) turned into a policy
//! [`Request`] and the explanation turned into an [`ExplainAnswer`].
//!
//! Only `host` and `open` are required. With no `addresses`, the host holds `address` (or
//! none); with no `address`, it opens its first address. Every text is read by the one parser
//! FWNP has for it: the opening as a policy [`Item`], the remotes as a [`fwnp_proto::Prefix`]
//! (host bits refused), a lifetime given as text in the duration grammar.

use std::net::IpAddr;

use fwnp_proto::{HostAddresses, Opening, Prefix};

use crate::api::{
    AdminError, ExplainAnswer, ExplainRequest, ExplainStep, GrantView, LifetimeAsked, RuleView,
    StepOutcomeView,
};
use crate::policy::{
    DurationError, Item, ItemError, Policy, PrefixError, Request, RuleRef, StepOutcome, Verdict,
    parse_duration,
};

/// Why a described request cannot be explained: what the operator has to correct.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExplainError {
    /// No `host`, or an empty one.
    #[error("`host` (the identity) is required")]
    MissingHost,
    /// No `open`, or an empty one.
    #[error("`open` (e.g. \"tcp/8080\") is required")]
    MissingOpen,
    /// `open` is not an opening item.
    #[error("open {open:?}: {error}")]
    BadOpen {
        /// The text given.
        open: String,
        /// Why it does not parse.
        error: ItemError,
    },
    /// An entry of `addresses` is not an IP address.
    #[error("addresses[{index}]: {text:?} is not an address")]
    BadAddress {
        /// Its position in `addresses`, from 0.
        index: usize,
        /// The text given.
        text: String,
    },
    /// `address` is not an IP address.
    #[error("address: {0:?} is not an address")]
    BadHostAddress(String),
    /// Neither `address` nor `addresses` names an address.
    #[error("give the host's `address` (or `addresses`)")]
    MissingAddress,
    /// An entry of `from` is not a prefix.
    #[error("from[{index}] {text:?}: {error}")]
    BadPrefix {
        /// Its position in `from`, from 0.
        index: usize,
        /// The text given.
        text: String,
        /// Why it does not parse.
        error: PrefixError,
    },
    /// `lifetime` in seconds beyond what the protocol carries.
    #[error("lifetime {0}: at most {max} seconds", max = u32::MAX)]
    LifetimeTooLong(u64),
    /// `lifetime` as text that is not a duration.
    #[error("lifetime {text:?}: {error}")]
    BadLifetime {
        /// The text given.
        text: String,
        /// Why it does not parse.
        error: DurationError,
    },
}

impl From<ExplainError> for AdminError {
    fn from(e: ExplainError) -> Self {
        AdminError::bad_request(e.to_string())
    }
}

/// A described request, read.
struct Described {
    item: Item,
    addresses: Vec<IpAddr>,
    host_address: IpAddr,
    remotes: Vec<Prefix>,
    lifetime: Option<u32>,
}

fn read(body: &ExplainRequest) -> Result<Described, ExplainError> {
    if body.host.is_empty() {
        return Err(ExplainError::MissingHost);
    }
    if body.open.is_empty() {
        return Err(ExplainError::MissingOpen);
    }
    let item: Item = body.open.parse().map_err(|error| ExplainError::BadOpen {
        open: body.open.clone(),
        error,
    })?;
    let address = body
        .address
        .as_deref()
        .map(|text| {
            text.parse::<IpAddr>()
                .map_err(|_| ExplainError::BadHostAddress(text.to_owned()))
        })
        .transpose()?;
    let mut addresses = body
        .addresses
        .iter()
        .enumerate()
        .map(|(index, text)| {
            text.parse::<IpAddr>()
                .map_err(|_| ExplainError::BadAddress {
                    index,
                    text: text.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() {
        addresses.extend(address);
    }
    let host_address = address
        .or_else(|| addresses.first().copied())
        .ok_or(ExplainError::MissingAddress)?;
    let remotes = body
        .from
        .iter()
        .enumerate()
        .map(|(index, text)| {
            text.parse::<Prefix>()
                .map_err(|error| ExplainError::BadPrefix {
                    index,
                    text: text.clone(),
                    error,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let lifetime = match &body.lifetime {
        None => None,
        Some(LifetimeAsked::Secs(secs)) => {
            Some(u32::try_from(*secs).map_err(|_| ExplainError::LifetimeTooLong(*secs))?)
        }
        Some(LifetimeAsked::Text(text)) => {
            Some(
                parse_duration(text).map_err(|error| ExplainError::BadLifetime {
                    text: text.clone(),
                    error,
                })?,
            )
        }
    };
    Ok(Described {
        item,
        addresses,
        host_address,
        remotes,
        lifetime,
    })
}

fn rule_view(rule: &RuleRef) -> RuleView {
    RuleView {
        name: rule.name.to_string(),
        line: rule.line,
    }
}

/// Evaluates a described request against `policy` and returns the explanation, or what is
/// wrong with the description.
///
/// ```
/// use fwnp_gateway::api::ExplainRequest;
/// use fwnp_gateway::explain::{ExplainError, explain};
/// use fwnp_gateway::policy::Policy;
/// let policy = Policy::from_str(
///     "[[group]]\nname = \"hosts\"\nidentities = [\"fwnp://host/*\"]\n\n\
///      [[rule]]\nname = \"https\"\ngroups = [\"hosts\"]\nallow = [\"tcp/443\"]\n",
///     "policy.toml",
/// ).unwrap();
/// let mut asked = ExplainRequest {
///     host: "fwnp://host/web-01".into(),
///     open: "tcp/443".into(),
///     address: Some("192.0.2.10".into()),
///     ..Default::default()
/// };
/// let answer = explain(&policy, &asked).unwrap();
/// assert!(answer.allowed);
/// assert_eq!(answer.rule.unwrap().name, "https");
/// asked.host.clear();
/// assert_eq!(explain(&policy, &asked), Err(ExplainError::MissingHost));
/// ```
pub fn explain(policy: &Policy, body: &ExplainRequest) -> Result<ExplainAnswer, ExplainError> {
    let described = read(body)?;
    let opening = Opening {
        target: described.item.to_target(),
        host: HostAddresses::One(described.host_address),
        family: None,
        remotes: described.remotes,
    };
    let request = Request::for_opening(
        &body.host,
        &described.addresses,
        described.host_address,
        &opening,
        described.lifetime,
    );
    let explanation = policy.explain(&request);
    let decision = &explanation.decision;
    let (code, grants, lifetime) = match &decision.verdict {
        Verdict::Allowed(a) => (
            None,
            a.grants.iter().map(GrantView::from).collect(),
            Some(a.granted_lifetime_secs),
        ),
        Verdict::Denied(code) => (Some(code.name().to_owned()), Vec::new(), None),
    };
    Ok(ExplainAnswer {
        text: explanation.to_string(),
        allowed: decision.is_allowed(),
        code,
        rule: decision.rule.as_ref().map(rule_view),
        reason: decision.reason.clone(),
        grants,
        lifetime,
        steps: explanation
            .steps
            .iter()
            .map(|step| ExplainStep {
                rule: step.rule.as_ref().map(rule_view),
                outcome: match step.outcome {
                    StepOutcome::Note => StepOutcomeView::Note,
                    StepOutcome::NoMatch => StepOutcomeView::NoMatch,
                    StepOutcome::Matched => StepOutcomeView::Matched,
                },
                detail: step.detail.clone(),
            })
            .collect(),
        request: explanation.request,
    })
}
