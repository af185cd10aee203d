//! Runs every committed scenario of `spec/vectors/scenarios/` (the format is described in
//! `spec/vectors/README.md`) through the gateway's request core: its requests in order, each at
//! its time, under the scenario's policy, with the kernel and the store always succeeding as a
//! gateway's would. Each answer must be the one the scenario states.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use fwnp_proto::LeaseId;
use fwnp_proto::Message;
use fwnp_proto::gateway::LifetimePolicy;
use fwnp_proto::gateway::request::{ConnectionState, CoreConfig, Effect, Peer, RequestCore, Step};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value as Json;

fn number(json: &Json, what: &str) -> Result<u64, String> {
    json.as_u64().ok_or_else(|| format!("{what}: not a number"))
}

fn lifetime_bound(policy: &Json, key: &str) -> Result<u32, String> {
    let value = number(&policy["lifetime"][key], &format!("policy.lifetime.{key}"))?;
    u32::try_from(value).map_err(|_| format!("policy.lifetime.{key}: too large"))
}

/// Compares one answer with the one the step states; `leases` holds the lease each name of the
/// scenario stood for so far.
fn compare(
    answer: &Message,
    expected: &Json,
    leases: &mut HashMap<String, LeaseId>,
) -> Result<(), String> {
    let rendered = common::message_json(answer);
    if rendered["type"] != expected["type"] {
        return Err(format!("answered {answer:?}, expected {expected}"));
    }
    if answer.common().request_id != expected["request_id"].as_u64() {
        return Err(format!("request id of {answer:?}, expected {expected}"));
    }
    match answer {
        Message::Welcome(welcome) => {
            let limits = &welcome.limits;
            let got = (
                u64::from(limits.min_lifetime),
                u64::from(limits.max_lifetime),
                limits.max_leases.map(u64::from),
            );
            let wanted = (
                number(&expected["min_lifetime"], "min_lifetime")?,
                number(&expected["max_lifetime"], "max_lifetime")?,
                expected["max_leases"].as_u64(),
            );
            if got != wanted {
                return Err(format!("Welcome limits {limits:?}, expected {expected}"));
            }
        }
        Message::Granted(granted) => {
            let name = expected["lease"].as_str().ok_or("lease: not a name")?;
            match leases.get(name) {
                Some(id) if *id != granted.lease => {
                    return Err(format!("lease {} is not lease {name}", granted.lease));
                }
                Some(_) => {}
                None => {
                    if let Some((other, _)) = leases.iter().find(|(_, id)| **id == granted.lease) {
                        return Err(format!("lease {name} is lease {other} again"));
                    }
                    leases.insert(name.to_owned(), granted.lease);
                }
            }
            let got = (u64::from(granted.lifetime), granted.expires_ms);
            let wanted = (
                number(&expected["lifetime"], "lifetime")?,
                number(&expected["expires_ms"], "expires_ms")?,
            );
            if got != wanted {
                return Err(format!(
                    "granted lifetime and expiry {got:?}, expected {wanted:?}"
                ));
            }
        }
        Message::Denied(denied) => {
            if Some(denied.code.name()) != expected["result_code"].as_str() {
                return Err(format!(
                    "denied {}, expected {expected}",
                    denied.code.name()
                ));
            }
        }
        other => return Err(format!("no scenario answer is {other:?}")),
    }
    Ok(())
}

fn run(scenario: &Json) -> Result<(), String> {
    let policy = &scenario["policy"];
    let decide = common::PortsPolicy {
        lifetime: LifetimePolicy {
            min: lifetime_bound(policy, "min")?,
            default: lifetime_bound(policy, "default")?,
            max: lifetime_bound(policy, "max")?,
        },
        max_leases: Some(
            u32::try_from(number(&policy["max_leases"], "policy.max_leases")?)
                .map_err(|_| "policy.max_leases: too large")?,
        ),
    };
    let identity = scenario["host"]["identity"]
        .as_str()
        .ok_or("host.identity: not text")?;
    let addresses: Vec<IpAddr> = scenario["host"]["addresses"]
        .as_array()
        .ok_or("host.addresses: not a list")?
        .iter()
        .map(|a| a.as_str().and_then(|a| a.parse().ok()))
        .collect::<Option<_>>()
        .ok_or("host.addresses: not addresses")?;
    let peer = Peer {
        identity: Some(identity),
        no_identity: "",
        remote: SocketAddr::new(addresses[0], 40_000),
        addresses: &addresses,
    };
    let mut core = RequestCore::new(CoreConfig {
        epoch: 0x5eed,
        max_streams: 16,
        kill_connections: false,
    });
    let mut connection = ConnectionState::default();
    let mut rng = StdRng::seed_from_u64(7);
    let mut leases = HashMap::new();
    let steps = scenario["steps"].as_array().ok_or("steps: not a list")?;
    for (n, step) in steps.iter().enumerate() {
        let at_ms = number(&step["at_ms"], "at_ms")?;
        let bytes = step["request_hex"]
            .as_str()
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| format!("step {}: request_hex: not hexadecimal", n + 1))?;
        // A gateway ends each lease at its expiry, whether or not a request comes then.
        core.expire_due(at_ms);
        let answer = match core.handle(at_ms, connection, &peer, &bytes, &decide, &mut rng) {
            Step::Answer(answer) => answer,
            Step::Pending(pending) => core.finish(at_ms, pending, Ok(())),
        };
        if answer
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Welcomed { .. }))
        {
            connection.welcomed = true;
        }
        compare(&answer.message, &step["answer"], &mut leases)
            .map_err(|e| format!("step {}: {e}", n + 1))?;
    }
    Ok(())
}

#[test]
fn every_scenario_gets_its_expected_answers() {
    let scenarios = common::load_scenarios();
    assert!(scenarios.len() >= 3, "only {} scenarios", scenarios.len());
    let failures: Vec<String> = scenarios
        .iter()
        .filter_map(|(name, s)| run(s).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} scenarios fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The steps of Section 11.3 that depend on state each have a scenario: the Hello first, the
/// idempotent re-open, and the quota.
#[test]
fn scenarios_cover_the_state_dependent_steps_of_open() {
    let scenarios = common::load_scenarios();
    let answers: Vec<&Json> = scenarios
        .iter()
        .flat_map(|(_, s)| s["steps"].as_array().into_iter().flatten())
        .map(|step| &step["answer"])
        .collect();
    for code in ["hello-required", "quota-exceeded"] {
        assert!(
            answers.iter().any(|a| a["result_code"] == code),
            "no scenario is answered {code}"
        );
    }
    let granted_again = scenarios.iter().any(|(_, s)| {
        let names: Vec<&str> = s["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|step| step["answer"]["lease"].as_str())
            .collect();
        names
            .iter()
            .enumerate()
            .any(|(i, name)| names[..i].contains(name))
    });
    assert!(granted_again, "no scenario re-opens a lease");
}
