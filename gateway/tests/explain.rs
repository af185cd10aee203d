//! `policy explain`'s reading of a described request: each mistake in the description is
//! refused with its own error, naming the field (and the entry of a list) at fault, and a
//! correct description is answered in the admin API's JSON shape.

use fwnp_gateway::api::{AdminErrorKind, ExplainRequest, LifetimeAsked, StepOutcomeView};
use fwnp_gateway::explain::{ExplainError, explain};
use fwnp_gateway::policy::{DurationError, ItemError, Policy, PrefixError};

const POLICY: &str = r#"
[defaults]
lifetime = "10m"
max_lifetime = "1h"

[[group]]
name = "web"
identities = ["fwnp://host/web-*"]

[[rule]]
name = "web-https"
groups = ["web"]
allow = ["tcp/443"]
"#;

fn policy() -> Policy {
    Policy::from_str(POLICY, "policy.toml").expect("the test policy")
}

/// A description that is correct: every test breaks one field of it.
fn asked() -> ExplainRequest {
    ExplainRequest {
        host: "fwnp://host/web-01".into(),
        open: "tcp/443".into(),
        address: Some("192.0.2.10".into()),
        ..Default::default()
    }
}

fn refused(request: ExplainRequest) -> ExplainError {
    explain(&policy(), &request).expect_err("the description is refused")
}

#[test]
fn a_correct_description_is_explained_in_the_api_shape() {
    let mut request = asked();
    request.from = vec!["198.51.100.0/24".into()];
    request.lifetime = Some(LifetimeAsked::Text("20m".into()));
    let answer = explain(&policy(), &request).expect("explained");
    assert!(answer.allowed);
    assert_eq!(answer.code, None);
    assert_eq!(
        answer.rule.as_ref().map(|r| r.name.as_str()),
        Some("web-https")
    );
    assert_eq!(answer.lifetime, Some(1200));
    assert_eq!(answer.grants.len(), 1);
    assert_eq!(
        answer.grants[0].to_string(),
        "tcp/443 on 192.0.2.10 from 198.51.100.0/24"
    );
    assert!(
        answer
            .steps
            .iter()
            .any(|s| s.outcome == StepOutcomeView::Matched)
    );
    assert!(answer.text.contains("web-https"), "{}", answer.text);

    let json = serde_json::to_value(&answer).expect("json");
    assert_eq!(json["allowed"], true);
    assert_eq!(json["code"], serde_json::Value::Null);
    assert_eq!(json["rule"]["name"], "web-https");
    assert_eq!(json["lifetime"], 1200);
    assert_eq!(json["grants"][0]["ports"], "443");
    assert_eq!(json["steps"][0]["outcome"], "matched");

    request.host = "fwnp://host/db-01".into();
    request.lifetime = Some(LifetimeAsked::Secs(600));
    let denied = explain(&policy(), &request).expect("explained");
    assert!(!denied.allowed);
    assert_eq!(denied.code.as_deref(), Some("denied-by-policy"));
    assert!(denied.grants.is_empty());
    assert_eq!(denied.lifetime, None);
}

#[test]
fn the_request_json_of_the_api_is_read_as_before() {
    let body = serde_json::json!({
        "host": "fwnp://host/web-01",
        "addresses": ["192.0.2.10", "2001:db8::10"],
        "open": "tcp/443",
        "from": ["198.51.100.0/24"],
        "lifetime": 900,
    });
    let request: ExplainRequest = serde_json::from_value(body).expect("the API's request");
    assert_eq!(request.lifetime, Some(LifetimeAsked::Secs(900)));
    let answer = explain(&policy(), &request).expect("explained");
    assert!(answer.allowed);
    // No `address`: the host's first address is opened.
    assert_eq!(answer.grants[0].host, "192.0.2.10");
    assert_eq!(answer.lifetime, Some(900));
}

#[test]
fn a_missing_host_is_refused() {
    let mut request = asked();
    request.host.clear();
    assert_eq!(refused(request), ExplainError::MissingHost);
    // Absent from the JSON as well.
    let request: ExplainRequest =
        serde_json::from_str(r#"{"open":"tcp/443","address":"192.0.2.10"}"#).expect("json");
    let e = refused(request);
    assert_eq!(e, ExplainError::MissingHost);
    assert_eq!(e.to_string(), "`host` (the identity) is required");
}

#[test]
fn a_missing_open_is_refused() {
    let mut request = asked();
    request.open.clear();
    let e = refused(request);
    assert_eq!(e, ExplainError::MissingOpen);
    assert!(e.to_string().contains("`open`"), "{e}");
}

#[test]
fn an_open_that_is_not_an_item_is_refused() {
    let mut request = asked();
    request.open = "tcp/0".into();
    let e = refused(request);
    assert_eq!(
        e,
        ExplainError::BadOpen {
            open: "tcp/0".into(),
            error: ItemError::PortZero
        }
    );
    assert!(e.to_string().starts_with("open \"tcp/0\": port 0"), "{e}");
}

#[test]
fn a_bad_address_is_refused_with_its_index() {
    let mut request = asked();
    request.address = None;
    request.addresses = vec!["192.0.2.10".into(), "192.0.2.300".into()];
    let e = refused(request);
    assert_eq!(
        e,
        ExplainError::BadAddress {
            index: 1,
            text: "192.0.2.300".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "addresses[1]: \"192.0.2.300\" is not an address"
    );
}

#[test]
fn a_bad_host_address_is_refused() {
    let mut request = asked();
    request.address = Some("web-01".into());
    let e = refused(request);
    assert_eq!(e, ExplainError::BadHostAddress("web-01".into()));
    assert_eq!(e.to_string(), "address: \"web-01\" is not an address");
}

#[test]
fn no_address_at_all_is_refused() {
    let mut request = asked();
    request.address = None;
    assert_eq!(refused(request), ExplainError::MissingAddress);
}

#[test]
fn a_prefix_with_host_bits_is_refused_with_its_index() {
    let mut request = asked();
    request.from = vec!["198.51.100.0/24".into(), "10.0.0.1/8".into()];
    let e = refused(request);
    match &e {
        ExplainError::BadPrefix { index, text, error } => {
            assert_eq!((*index, text.as_str()), (1, "10.0.0.1/8"));
            assert!(
                matches!(error, PrefixError::HostBitsSet { .. }),
                "{error:?}"
            );
        }
        other => panic!("not a bad prefix: {other:?}"),
    }
    assert!(
        e.to_string()
            .starts_with("from[1] \"10.0.0.1/8\": host bits"),
        "{e}"
    );
}

#[test]
fn a_lifetime_beyond_the_protocol_is_refused() {
    let mut request = asked();
    request.lifetime = Some(LifetimeAsked::Secs(u64::from(u32::MAX) + 1));
    assert_eq!(
        refused(request),
        ExplainError::LifetimeTooLong(u64::from(u32::MAX) + 1)
    );
}

#[test]
fn a_lifetime_text_outside_the_duration_grammar_is_refused() {
    let mut request = asked();
    request.lifetime = Some(LifetimeAsked::Text("10".into()));
    let e = refused(request);
    assert_eq!(
        e,
        ExplainError::BadLifetime {
            text: "10".into(),
            error: DurationError::MissingUnit("10".into())
        }
    );
    assert!(
        e.to_string()
            .starts_with("lifetime \"10\": the number 10 has no unit"),
        "{e}"
    );
}

#[test]
fn every_refusal_is_a_bad_request_of_the_admin_api() {
    let mut request = asked();
    request.address = Some("nowhere".into());
    let e = refused(request);
    let admin = fwnp_gateway::api::AdminError::from(e.clone());
    assert_eq!(admin.kind, AdminErrorKind::BadRequest);
    assert_eq!(admin.message, e.to_string());
}
