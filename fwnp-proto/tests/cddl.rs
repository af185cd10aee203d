//! Checks the committed vectors against the normative schema `spec/fwnp.cddl` with the `cddl`
//! crate: every vector marked `schema_valid: true` matches it, every vector marked
//! `schema_valid: false` does not. Together with `tests/vectors.rs` this ties the schema, the
//! vectors and the codec to each other.

mod common;

use cddl::validator::cbor_value::Value as CborValue;
use serde_json::Value as Json;

fn normative_schema() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/fwnp.cddl");
    std::fs::read_to_string(path).expect("spec/fwnp.cddl is readable")
}

fn schema() -> String {
    checkable_schema(&normative_schema())
}

fn schema_valid(vector: &Json) -> Option<bool> {
    vector["valid"]["schema_valid"]
        .as_bool()
        .or_else(|| vector["invalid"]["schema_valid"].as_bool())
}

/// The schema as the `cddl` crate (0.10) can check it.
///
/// The crate cannot validate a map entry `* extension-key => any` whose key type is a control
/// (`uint .ge 64`), a range (`64..n`) or a choice of values: it then refuses every message,
/// even `{0: 6}`, with "expected type uint, got Map(...)". So the check is done in two steps
/// that together mean exactly the normative schema: [`strip_extension_entries`] removes every
/// map entry whose key is an unsigned integer of 64 or more (what `* extension-key => any`
/// allows, and no key the schema defines is that high), and the entries
/// `* extension-key => any` are removed from the schema, which leaves every map closed.
fn checkable_schema(schema: &str) -> String {
    let entry = "* extension-key => any,";
    assert!(
        schema.matches(entry).count() >= 5,
        "the schema's extension entries moved"
    );
    schema.replace(entry, "")
}

/// Whether two items are one value of the data model, as spec Section 6.3 rule 9 compares
/// keys: floating-point numbers by their bits (so that 0.0 and -0.0 are two values), every NaN
/// one value, maps whatever the order of their entries.
fn same_value(a: &CborValue, b: &CborValue) -> bool {
    let bits = |f: f64| if f.is_nan() { f64::NAN } else { f }.to_bits();
    match (a, b) {
        (CborValue::Float(x), CborValue::Float(y)) => bits(*x) == bits(*y),
        (CborValue::Array(x), CborValue::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        // A map is its entries, in any order (its own keys are checked unique on their own).
        (CborValue::Map(x), CborValue::Map(y)) => {
            x.len() == y.len()
                && x.iter().all(|(xk, xv)| {
                    y.iter()
                        .any(|(yk, yv)| same_value(xk, yk) && same_value(xv, yv))
                })
        }
        (CborValue::Tag(xt, x), CborValue::Tag(yt, y)) => xt == yt && same_value(x, y),
        _ => a == b,
    }
}

/// Removes, recursively, every map entry with an unsigned key of 64 or more. Refuses a map
/// with a duplicate key, inside the entries it removes too: it is not a valid CBOR map (RFC
/// 8949 section 5.6), so no schema matches it (the crate itself would check whichever entry it
/// met).
fn strip_extension_entries(value: &mut CborValue) -> Result<(), String> {
    match value {
        CborValue::Map(entries) => {
            for (i, (k, _)) in entries.iter().enumerate() {
                if entries[..i]
                    .iter()
                    .any(|(earlier, _)| same_value(earlier, k))
                {
                    return Err(format!("duplicate map key {k:?}"));
                }
            }
            for (k, v) in entries.iter_mut() {
                strip_extension_entries(k)?;
                strip_extension_entries(v)?;
            }
            entries.retain(|(k, _)| !matches!(k, CborValue::Integer(k) if i128::from(*k) >= 64));
            Ok(())
        }
        CborValue::Array(items) => items.iter_mut().try_for_each(strip_extension_entries),
        CborValue::Tag(_, inner) => strip_extension_entries(inner),
        _ => Ok(()),
    }
}

/// Whether `bytes`, one CBOR data item, matches the (checkable) schema.
fn matches_schema(schema: &cddl::ast::CDDL<'_>, bytes: &[u8]) -> Result<(), String> {
    use cddl::validator::Validator;
    // The crate reads only the first item and ignores what follows; a message is one item.
    common::diagnostic(bytes).map_err(|why| format!("not one well-formed CBOR item: {why}"))?;
    let mut value = cddl::validator::cbor_value::decode_cbor(bytes).map_err(|e| e.to_string())?;
    strip_extension_entries(&mut value)?;
    let mut validator = cddl::validator::cbor::CBORValidator::new(schema, value, None);
    validator.validate().map_err(|e| e.to_string())
}

/// Runs `check` with the parsed schema on a thread with a large stack: the validator recurses
/// over the CBOR it is given.
fn with_schema(check: impl FnOnce(&cddl::ast::CDDL<'_>) + Send) {
    let text = schema();
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn_scoped(scope, || {
                let parsed = cddl::cddl_from_str(&text, true).expect("the schema parses");
                check(&parsed);
            })
            .expect("thread starts");
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

#[test]
fn schema_parses() {
    cddl::cddl_from_str(&normative_schema(), true).expect("spec/fwnp.cddl parses");
    cddl::cddl_from_str(&schema(), true).expect("the checkable form parses");
}

#[test]
fn vectors_match_the_schema_as_marked() {
    with_schema(vectors_match_as_marked);
}

fn vectors_match_as_marked(schema: &cddl::ast::CDDL<'_>) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, vector) in common::load_vectors() {
        let expected = schema_valid(&vector).unwrap_or_else(|| panic!("{name}: no schema_valid"));
        let bytes = common::vector_bytes(&name, &vector);
        let outcome = matches_schema(schema, &bytes);
        checked += 1;
        match (expected, outcome) {
            (true, Err(why)) => failures.push(format!("{name}: should match the schema: {why}")),
            (false, Ok(())) => failures.push(format!("{name}: should not match the schema")),
            _ => {}
        }
    }
    assert!(checked >= 40);
    assert!(
        failures.is_empty(),
        "{} vectors:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_valid_vector_in_the_canonical_form_matches_the_schema() {
    // The canonical re-encoding is what a version-1 sender writes: it must match the schema
    // even where the input did not (unknown keys below 64 are dropped by re-encoding).
    with_schema(canonical_forms_match);
}

fn canonical_forms_match(schema: &cddl::ast::CDDL<'_>) {
    let mut failures = Vec::new();
    for (name, vector) in common::load_vectors() {
        let Some(canonical) = vector["valid"]["canonical_hex"].as_str() else {
            continue;
        };
        let bytes = hex::decode(canonical).expect("canonical_hex is hex");
        if let Err(why) = matches_schema(schema, &bytes) {
            failures.push(format!("{name}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} canonical forms:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The local API's frames (`spec/vectors/local/`) against the CDDL of `spec/local-api.md`
// Section 4, which extends `spec/fwnp.cddl`.

/// The local API's schema, checkable: its CDDL block (first, so that `local-message` is the
/// root) with the open entries `* uint => any` removed, then the checkable wire schema. Closed
/// maps are right for what is checked here: canonical forms, which carry no unknown keys.
fn local_schema() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/local-api.md");
    let text = std::fs::read_to_string(path).expect("spec/local-api.md is readable");
    let start = text
        .find("In CDDL (extending `spec/fwnp.cddl`):")
        .expect("local-api.md has its CDDL");
    let block = text[start..]
        .split("```")
        .nth(1)
        .expect("the CDDL is a code block");
    let entry = "* uint => any";
    assert!(
        block.matches(entry).count() >= 5,
        "the local schema's open entries moved"
    );
    let local: String = block
        .lines()
        .filter(|line| line.trim() != entry)
        .map(|line| line.replace(&format!(", {entry} "), " ") + "\n")
        .collect();
    assert!(
        !local.contains(entry),
        "an open entry was not removed:\n{local}"
    );
    format!("{local}\n{}", schema())
}

#[test]
fn local_frames_match_the_local_schema() {
    let text = local_schema();
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn_scoped(scope, || {
                let parsed = cddl::cddl_from_str(&text, true).expect("the local schema parses");
                local_frames_match(&parsed);
            })
            .expect("thread starts");
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

fn local_frames_match(schema: &cddl::ast::CDDL<'_>) {
    // Errors of the body that the schema states: inputs refused for them do not match it.
    const SCHEMA_ERRORS: [&str; 6] = [
        "not-a-map",
        "key-not-unsigned",
        "unknown-message-type",
        "missing-key",
        "wrong-type",
        "out-of-range",
    ];
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, vector) in common::load_local_vectors() {
        if let Some(canonical) = vector["valid"]["canonical_hex"].as_str() {
            let frame = hex::decode(canonical).expect("canonical_hex is hex");
            checked += 1;
            if let Err(why) = matches_schema(schema, &frame[4..]) {
                failures.push(format!("{name}: should match the local schema: {why}"));
            }
        } else if SCHEMA_ERRORS.contains(&vector["invalid"]["error"].as_str().unwrap_or("")) {
            let frame = common::vector_bytes(&name, &vector);
            checked += 1;
            if matches_schema(schema, &frame[4..]).is_ok() {
                failures.push(format!("{name}: should not match the local schema"));
            }
        }
    }
    assert!(checked >= 30, "only {checked} local vectors checked");
    assert!(
        failures.is_empty(),
        "{} local vectors:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
