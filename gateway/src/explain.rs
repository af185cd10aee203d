//! `policy explain`: a request described in JSON (as `fwnpctl policy explain` sends it to the
//! admin API, or evaluates locally against a file) turned into a policy [`Request`] and the
//! explanation turned back into JSON.
//!
//! The description: `{"host": IDENTITY, "addresses": [ADDR...], "address": ADDR,
//! "open": "tcp/8080" | "app:https", "from": [PREFIX...], "lifetime": SECONDS}`; only `host`
//! and `open` are required. With no `addresses`, the host holds `address` (or none); with no
//! `address`, it opens its first address.

use std::net::IpAddr;

use fwnp_proto::{HostAddresses, Opening};
use serde_json::{Value, json};

use crate::policy::{Item, Policy, Request, Verdict, parse_prefix};

/// Evaluates a described request against `policy` and returns the explanation as JSON, or
/// what is wrong with the description.
pub fn explain_json(policy: &Policy, body: &Value) -> Result<Value, String> {
    let host = body
        .get("host")
        .and_then(Value::as_str)
        .ok_or("`host` (the identity) is required")?;
    let open = body
        .get("open")
        .and_then(Value::as_str)
        .ok_or("`open` (e.g. \"tcp/8080\") is required")?;
    let item: Item = open.parse().map_err(|e| format!("open {open:?}: {e}"))?;
    let parse_addr = |v: &Value| -> Result<IpAddr, String> {
        let text = v.as_str().ok_or("addresses are strings")?;
        text.parse()
            .map_err(|_| format!("{text:?} is not an address"))
    };
    let address = body.get("address").map(parse_addr).transpose()?;
    let mut addresses = match body.get("addresses").and_then(Value::as_array) {
        Some(list) => list.iter().map(parse_addr).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    if addresses.is_empty() {
        addresses.extend(address);
    }
    let host_address = address
        .or_else(|| addresses.first().copied())
        .ok_or("give the host's `address` (or `addresses`)")?;
    let mut remotes = Vec::new();
    if let Some(list) = body.get("from").and_then(Value::as_array) {
        for v in list {
            let text = v.as_str().ok_or("`from` holds prefixes as strings")?;
            remotes.push(parse_prefix(text).map_err(|e| format!("from {text:?}: {e}"))?);
        }
    }
    let lifetime = body
        .get("lifetime")
        .and_then(Value::as_u64)
        .map(|l| u32::try_from(l).unwrap_or(u32::MAX));
    let opening = Opening {
        target: item.to_target(),
        host: HostAddresses::One(host_address),
        family: None,
        remotes,
    };
    let request = Request::for_opening(host, &addresses, host_address, &opening, lifetime);
    let explanation = policy.explain(&request);
    let decision = &explanation.decision;
    let (allowed, code, grants, lifetime) = match &decision.verdict {
        Verdict::Allowed(a) => (
            true,
            None,
            a.grants
                .iter()
                .map(|g| {
                    json!({
                        "protocol": g.protocol.name(),
                        "ports": g.ports.to_string(),
                        "host": g.host.to_string(),
                        "remotes": g.remotes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "app": g.app,
                    })
                })
                .collect::<Vec<_>>(),
            Some(a.granted_lifetime_secs),
        ),
        Verdict::Denied(code) => (false, Some(code.name()), Vec::new(), None),
    };
    Ok(json!({
        "request": explanation.request,
        "allowed": allowed,
        "code": code,
        "rule": decision.rule.as_ref().map(|r| json!({"name": &*r.name, "line": r.line})),
        "reason": decision.reason,
        "grants": grants,
        "lifetime": lifetime,
        "steps": explanation.steps,
        "text": explanation.to_string(),
    }))
}
