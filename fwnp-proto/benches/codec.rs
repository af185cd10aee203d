//! How long the codec takes for the messages of a grant's round trip and a few larger ones:
//! each spec vector named below decoded from its bytes, and encoded again from the decoded
//! message. Every request a gateway answers and every answer a host reads passes through here
//! once.
//!
//! Run: `cargo bench -p fwnp-proto --bench codec` (criterion; `-- --save-baseline NAME` and
//! `-- --baseline NAME` compare two builds).

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use fwnp_proto::codec::{decode, encode};

/// The vectors measured: a request and an answer of each kind a host exchanges most.
const VECTORS: &[&str] = &[
    "005-open-tcp-port",
    "014-renew",
    "018-granted",
    "003-welcome",
    "035-leases",
];

/// The bytes of vector `name` (spec/vectors/NAME.json, its `hex`).
fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../spec/vectors")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let hex = json["hex"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no hex", path.display()));
    hex::decode(hex).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn codec(c: &mut Criterion) {
    for name in VECTORS {
        let bytes = vector(name);
        let message = decode(&bytes).unwrap_or_else(|e| panic!("vector {name}: {e}"));
        assert_eq!(
            encode(&message),
            bytes,
            "vector {name} encodes back to itself"
        );
        c.bench_function(&format!("decode {name}"), |b| {
            b.iter(|| decode(std::hint::black_box(&bytes)))
        });
        c.bench_function(&format!("encode {name}"), |b| {
            b.iter(|| encode(std::hint::black_box(&message)))
        });
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
