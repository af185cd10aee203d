//! Checks every committed vector of `spec/vectors/` against the codec and the validation rules
//! (the format is described in `spec/vectors/README.md`).
//!
//! Valid vectors: the input decodes, passes `validate_message`, renders to the expected JSON
//! and re-encodes to `canonical_hex`; the canonical bytes decode to the same message again.
//! Invalid vectors: the input fails in the expected layer with the expected error kind, and the
//! error maps to the expected result code.

mod common;

use fwnp_proto::codec::{decode, encode};
use fwnp_proto::validate::validate_message;
use serde_json::Value as Json;

fn check(name: &str, vector: &Json) -> Result<(), String> {
    let bytes = common::vector_bytes(name, vector);
    for field in ["name", "description", "diagnostic"] {
        if !vector[field].is_string() {
            return Err(format!("field {field} missing"));
        }
    }
    let stem = name.trim_end_matches(".json");
    if stem.get(4..) != vector["name"].as_str() {
        return Err(format!(
            "file name {name} does not end with the vector's name"
        ));
    }
    match (vector.get("valid"), vector.get("invalid")) {
        (Some(valid), None) => {
            let msg = decode(&bytes).map_err(|e| format!("decode failed: {e} ({})", e.kind()))?;
            validate_message(&msg).map_err(|e| format!("validation failed: {e}"))?;
            let rendered = common::message_json(&msg);
            if rendered != valid["decoded"] {
                return Err(format!(
                    "decoded to\n{}\nexpected\n{}",
                    serde_json::to_string_pretty(&rendered).unwrap(),
                    serde_json::to_string_pretty(&valid["decoded"]).unwrap()
                ));
            }
            let canonical = hex::encode(encode(&msg));
            if Some(canonical.as_str()) != valid["canonical_hex"].as_str() {
                return Err(format!(
                    "re-encoded to {canonical}, expected {}",
                    valid["canonical_hex"]
                ));
            }
            let again = decode(&encode(&msg)).map_err(|e| format!("canonical form fails: {e}"))?;
            if again != msg {
                return Err("the canonical form decodes to another message".into());
            }
            if !valid["schema_valid"].is_boolean() {
                return Err("valid.schema_valid missing".into());
            }
            Ok(())
        }
        (None, Some(invalid)) => {
            let (layer, kind, code, unsupported) = match decode(&bytes) {
                Err(e) => (
                    "decode",
                    e.kind(),
                    e.result_code(),
                    e.to_denied(None).unsupported,
                ),
                Ok(msg) => match validate_message(&msg) {
                    Err(e) => ("validate", e.kind(), e.result_code(), Vec::new()),
                    Ok(()) => return Err(format!("accepted as {msg:?}")),
                },
            };
            // Denied key 7, as the vector gives it (absent: none).
            let expected_unsupported: Vec<u64> = invalid
                .get("unsupported")
                .map(|keys| serde_json::from_value(keys.clone()).unwrap_or_default())
                .unwrap_or_default();
            if unsupported != expected_unsupported {
                return Err(format!(
                    "Denied key 7 would list {unsupported:?}, expected {expected_unsupported:?}"
                ));
            }
            let got = (layer, kind, code.name());
            let expected = (
                invalid["layer"].as_str().unwrap_or("?"),
                invalid["error"].as_str().unwrap_or("?"),
                invalid["result_code"].as_str().unwrap_or("?"),
            );
            if got != expected {
                return Err(format!("failed with {got:?}, expected {expected:?}"));
            }
            if !invalid["schema_valid"].is_boolean() {
                return Err("invalid.schema_valid missing".into());
            }
            Ok(())
        }
        _ => Err("a vector has exactly one of \"valid\" and \"invalid\"".into()),
    }
}

#[test]
fn every_vector_gives_its_expected_outcome() {
    let vectors = common::load_vectors();
    assert!(vectors.len() >= 40, "only {} vectors", vectors.len());
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|(name, v)| check(name, v).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} vectors fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn vectors_cover_every_message_type_and_result_code() {
    let vectors = common::load_vectors();
    let decoded_types: Vec<&str> = vectors
        .iter()
        .filter_map(|(_, v)| v["valid"]["decoded"]["type"].as_str())
        .collect();
    for t in [
        "hello",
        "welcome",
        "open",
        "renew",
        "release",
        "list",
        "granted",
        "denied",
        "leases",
        "released",
        "revoked",
        "epoch-changed",
        "going-away",
    ] {
        assert!(decoded_types.contains(&t), "no valid vector of type {t}");
    }
    for code in fwnp_proto::ResultCode::ALL {
        let carried = vectors.iter().any(|(_, v)| {
            v["valid"]["decoded"]["type"] == "denied"
                && v["valid"]["decoded"]["code"] == code.name()
        });
        assert!(carried, "no Denied vector carries {code}");
    }
}

/// The README defines the layers by the spec's rules: `decode` is Section 6.3, which holds
/// everything the schema can say, and `validate` is what the schema cannot say. So a vector's
/// layer and its `schema_valid` agree, but for the rules the README names as exceptions.
#[test]
fn the_layer_of_an_invalid_vector_agrees_with_the_schema() {
    const DECODE_YET_SCHEMA_VALID: [&str; 4] = [
        "too-large",
        "nesting-too-deep",
        "tag-not-allowed",
        "unsupported-critical",
    ];
    const VALIDATE_YET_SCHEMA_INVALID: [&str; 2] = ["app-id-length", "host-address-count"];
    let mut disagreeing = Vec::new();
    for (name, v) in common::load_vectors() {
        let invalid = &v["invalid"];
        let (Some(layer), Some(error), Some(schema_valid)) = (
            invalid["layer"].as_str(),
            invalid["error"].as_str(),
            invalid["schema_valid"].as_bool(),
        ) else {
            continue;
        };
        let agrees = match (layer, schema_valid) {
            ("decode", false) | ("validate", true) => true,
            ("decode", true) => DECODE_YET_SCHEMA_VALID.contains(&error),
            ("validate", false) => VALIDATE_YET_SCHEMA_INVALID.contains(&error),
            _ => false,
        };
        if !agrees {
            disagreeing.push(format!(
                "{name}: {layer}, {error}, schema_valid {schema_valid}"
            ));
        }
    }
    assert!(disagreeing.is_empty(), "{}", disagreeing.join("\n"));
}

#[test]
fn invalid_vectors_decode_layer_matches_the_decoder_alone() {
    // A vector marked layer=decode must fail in `decode` itself, whatever validation would say.
    for (name, v) in common::load_vectors() {
        if v["invalid"]["layer"] == "decode" {
            assert!(
                decode(&common::vector_bytes(&name, &v)).is_err(),
                "{name} decodes"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The local API's frames, in `spec/vectors/local/`.

use fwnp_proto::codec::peek_request_id;
use fwnp_proto::local::{FRAME_HEADER_LEN, decode_frame_body, encode_frame, frame_body_len};

/// How a receiver reads one frame from a stream that ends after `bytes`: the header, then the
/// body it announces. `Err` names the frame-layer error.
fn read_frame(bytes: &[u8]) -> Result<&[u8], &'static str> {
    let header: [u8; FRAME_HEADER_LEN] = bytes
        .get(..FRAME_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or("truncated-frame")?;
    let len = frame_body_len(header).map_err(|e| common::local_error_kind(&e))?;
    let body = &bytes[FRAME_HEADER_LEN..];
    if body.len() < len {
        return Err("truncated-frame");
    }
    if body.len() > len {
        return Err("one frame per vector: bytes follow the frame");
    }
    Ok(body)
}

fn check_local(name: &str, vector: &Json) -> Result<(), String> {
    let bytes = common::vector_bytes(name, vector);
    for field in ["name", "description", "diagnostic"] {
        if !vector[field].is_string() {
            return Err(format!("field {field} missing"));
        }
    }
    if name.trim_end_matches(".json").get(4..) != vector["name"].as_str() {
        return Err(format!(
            "file name {name} does not end with the vector's name"
        ));
    }
    match (vector.get("valid"), vector.get("invalid")) {
        (Some(valid), None) => {
            let body = read_frame(&bytes).map_err(|e| format!("frame refused: {e}"))?;
            let msg = decode_frame_body(body).map_err(|e| format!("decode failed: {e}"))?;
            let rendered = common::local_message_json(&msg);
            if rendered != valid["decoded"] {
                return Err(format!(
                    "decoded to\n{}\nexpected\n{}",
                    serde_json::to_string_pretty(&rendered).unwrap(),
                    serde_json::to_string_pretty(&valid["decoded"]).unwrap()
                ));
            }
            let canonical = hex::encode(encode_frame(&msg));
            if Some(canonical.as_str()) != valid["canonical_hex"].as_str() {
                return Err(format!(
                    "re-encoded to {canonical}, expected {}",
                    valid["canonical_hex"]
                ));
            }
            Ok(())
        }
        (None, Some(invalid)) => {
            // What the agent does (local-api.md Section 3): a frame it cannot delimit closes
            // the connection; a body that does not decode is answered Denied when it names its
            // request, and closes the connection otherwise.
            let (layer, kind, answer) = match read_frame(&bytes) {
                Err(kind) => ("frame", kind, Json::from("close")),
                Ok(body) => match decode_frame_body(body) {
                    Ok(msg) => return Err(format!("accepted as {msg:?}")),
                    Err(e) => (
                        "decode",
                        common::local_error_kind(&e),
                        match peek_request_id(body) {
                            Some(_) => serde_json::json!({"denied": e.result_code().name()}),
                            None => Json::from("close"),
                        },
                    ),
                },
            };
            let got = (layer, kind, &answer);
            let expected = (
                invalid["layer"].as_str().unwrap_or("?"),
                invalid["error"].as_str().unwrap_or("?"),
                &invalid["answer"],
            );
            if got != expected {
                return Err(format!("failed with {got:?}, expected {expected:?}"));
            }
            Ok(())
        }
        _ => Err("a vector has exactly one of \"valid\" and \"invalid\"".into()),
    }
}

#[test]
fn every_local_vector_gives_its_expected_outcome() {
    let vectors = common::load_local_vectors();
    assert!(vectors.len() >= 30, "only {} local vectors", vectors.len());
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|(name, v)| check_local(name, v).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} local vectors fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn local_vectors_cover_every_message_type_code_and_event_kind() {
    let vectors = common::load_local_vectors();
    let decoded = |field: &str| -> Vec<String> {
        vectors
            .iter()
            .filter_map(|(_, v)| v["valid"]["decoded"][field].as_str().map(str::to_owned))
            .collect()
    };
    let types = decoded("type");
    for t in [
        "open",
        "release",
        "list",
        "granted",
        "denied",
        "leases",
        "released",
        "watch",
        "watching",
        "event",
        "status",
        "status-answer",
    ] {
        assert!(types.iter().any(|x| x == t), "no local vector of type {t}");
    }
    let kinds = decoded("kind");
    for kind in fwnp_proto::local::EventKind::ALL {
        assert!(
            kinds.iter().any(|k| k == kind.name()),
            "no Event of kind {kind}"
        );
    }
    for code in fwnp_proto::local::LocalCode::ALL {
        let carried = vectors.iter().any(|(_, v)| {
            v["valid"]["decoded"]["type"] == "denied"
                && v["valid"]["decoded"]["code"] == code.name()
        });
        assert!(carried, "no local Denied vector carries {}", code.name());
    }
    let errors: Vec<&str> = vectors
        .iter()
        .filter_map(|(_, v)| v["invalid"]["error"].as_str())
        .collect();
    for e in [
        "empty-frame",
        "frame-too-large",
        "truncated-frame",
        "unknown-message-type",
        "key-not-unsigned",
    ] {
        assert!(errors.contains(&e), "no invalid local vector of {e}");
    }
}
