//! Hostile inputs for the decoder: shapes that break naive CBOR decoders (deep nesting, nested
//! tags, huge declared lengths, many keys), and any input the `decode` fuzz target found.
//! Each must be refused (or accepted) with the stated outcome, quickly, without a panic.

use std::time::{Duration, Instant};

use fwnp_proto::codec::{DecodeError, decode, encode};
use fwnp_proto::{MAX_MESSAGE_SIZE, MAX_NESTING_DEPTH};

fn decode_quickly(bytes: &[u8]) -> Result<fwnp_proto::Message, DecodeError> {
    let start = Instant::now();
    let outcome = decode(bytes);
    // Generous for unoptimised builds on a loaded machine; a quadratic decoder takes seconds.
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "decoding {} bytes took {:?}",
        bytes.len(),
        start.elapsed()
    );
    outcome
}

fn too_deep() -> Result<fwnp_proto::Message, DecodeError> {
    Err(DecodeError::NestingTooDeep {
        limit: MAX_NESTING_DEPTH,
    })
}

#[test]
fn deep_nesting_of_every_container_kind_is_refused() {
    for opener in [0x81u8, 0x9f, 0xa1, 0xbf] {
        let bytes = vec![opener; MAX_MESSAGE_SIZE];
        assert_eq!(decode_quickly(&bytes), too_deep(), "opener {opener:#x}");
    }
    // Maps whose keys are arrays nest as well.
    let mut bytes = Vec::new();
    for _ in 0..5000 {
        bytes.extend([0xa1, 0x81]);
    }
    assert_eq!(decode_quickly(&bytes), too_deep());
}

#[test]
fn nesting_one_level_deeper_than_allowed_inside_an_ignored_value() {
    // {0: 6, 64: [[[[[[[0]]]]]]]}: depth 8 in all, accepted.
    let mut ok = vec![0xa2, 0x00, 0x06, 0x18, 0x40];
    ok.extend([0x81; 7]);
    ok.push(0x00);
    assert!(decode_quickly(&ok).is_ok());
    // One more level: refused.
    let mut deep = vec![0xa2, 0x00, 0x06, 0x18, 0x40];
    deep.extend([0x81; 8]);
    deep.push(0x00);
    assert_eq!(decode_quickly(&deep), too_deep());
}

#[test]
fn nested_tags_are_refused_at_the_first() {
    let mut bytes = Vec::new();
    for _ in 0..MAX_MESSAGE_SIZE / 2 {
        bytes.extend([0xd8, 0x18]);
    }
    assert_eq!(
        decode_quickly(&bytes),
        Err(DecodeError::TagNotAllowed { tag: 24 })
    );
}

#[test]
fn nested_indefinite_strings_are_ill_formed() {
    let bytes = vec![0x5f; 1000];
    assert!(matches!(
        decode_quickly(&bytes),
        Err(DecodeError::InvalidCbor { .. })
    ));
    let bytes = [0x7f, 0x61, 0x61, 0x41, 0x62, 0xff];
    assert!(matches!(
        decode_quickly(&bytes),
        Err(DecodeError::InvalidCbor { .. })
    ));
}

#[test]
fn declared_lengths_beyond_the_input_allocate_nothing() {
    for header in [
        &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
        &[0x7b, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
        &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &[0xbb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &[0xa2, 0x00, 0x06, 0x18, 0x40, 0x5a, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(
            matches!(decode_quickly(header), Err(DecodeError::InvalidCbor { .. })),
            "{header:02x?}"
        );
    }
}

#[test]
fn thousands_of_keys_decode_in_time() {
    // {0: 6, 64: 0, 65: 0, ...} up to 16 KiB: every extension key is ignored.
    let mut entries = vec![(0u64, 6u64)];
    let mut key = 64u64;
    let mut size = 4;
    while size < MAX_MESSAGE_SIZE - 8 {
        entries.push((key, 0));
        size += if key < 256 { 3 } else { 4 };
        key += 1;
    }
    let mut bytes = vec![0xb9];
    bytes.extend((entries.len() as u16).to_be_bytes());
    for (k, v) in &entries {
        if *k < 24 {
            bytes.push(*k as u8);
        } else if *k < 256 {
            bytes.extend([0x18, *k as u8]);
        } else {
            bytes.push(0x19);
            bytes.extend((*k as u16).to_be_bytes());
        }
        bytes.push(*v as u8);
    }
    assert!(bytes.len() <= MAX_MESSAGE_SIZE);
    let msg = decode_quickly(&bytes).expect("a List with ignored keys");
    assert_eq!(encode(&msg), [0xa1, 0x00, 0x06]);

    // The same keys made duplicates: refused.
    let mut dup = vec![0xb9];
    dup.extend(4001u16.to_be_bytes());
    dup.extend([0x00, 0x06]);
    for _ in 0..4000 {
        dup.extend([0x18, 0x40, 0x00]);
    }
    assert!(matches!(
        decode_quickly(&dup),
        Err(DecodeError::DuplicateKey {
            depth: 1,
            key: Some(64)
        })
    ));
}

#[test]
fn an_item_of_exactly_the_limit_is_parsed_and_one_byte_more_is_not() {
    // {0: 6, 64: h'00...'} of exactly MAX_MESSAGE_SIZE bytes.
    let header = [0xa2, 0x00, 0x06, 0x18, 0x40, 0x59];
    let payload = MAX_MESSAGE_SIZE - header.len() - 2;
    let mut bytes = header.to_vec();
    bytes.extend((payload as u16).to_be_bytes());
    bytes.resize(MAX_MESSAGE_SIZE, 0);
    assert!(decode_quickly(&bytes).is_ok());
    bytes.push(0);
    assert_eq!(
        decode_quickly(&bytes),
        Err(DecodeError::TooLarge {
            size: MAX_MESSAGE_SIZE + 1,
            limit: MAX_MESSAGE_SIZE
        })
    );
}
