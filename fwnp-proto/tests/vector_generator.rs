//! The generator of `spec/vectors/`: every vector is written here from Rust values (or from
//! hand-made bytes where the point is a non-canonical or ill-formed input), with its expected
//! outcome stated, not computed by the codec under test.
//!
//! Regenerate the files after changing a vector:
//!
//! ```text
//! cargo test -p fwnp-proto --test vector_generator -- --ignored write_vectors
//! ```
//!
//! It writes the local API's frames (`spec/local-api.md`) into `spec/vectors/local/` too, and
//! the scenarios of a gateway's state (Section 11.3) into `spec/vectors/scenarios/`.
//! `committed_vectors_are_current`, `committed_local_vectors_are_current` and
//! `committed_scenarios_are_current` fail when the committed files and this generator disagree.
//! `tests/vectors.rs` and `tests/cddl.rs` check the committed files themselves.

mod common;

use std::net::IpAddr;

use ciborium::Value;
use fwnp_proto::codec::{encode, to_value};
use fwnp_proto::*;
use serde_json::{Value as Json, json};

const LEASE_A: LeaseId = LeaseId([
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
]);
const LEASE_B: LeaseId = LeaseId([
    0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87, 0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f,
]);
const EPOCH: u64 = 0x5eed_cafe_f00d_0001;
const NOW_MS: u64 = 1_795_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ip16(s: &str) -> [u8; 16] {
    match ip(s) {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => panic!("{s} is not IPv6"),
    }
}

fn prefix(s: &str) -> Prefix {
    let (a, l) = s.split_once('/').unwrap();
    Prefix {
        addr: ip(a),
        len: l.parse().unwrap(),
    }
}

fn rid(n: u64) -> Common {
    Common {
        request_id: Some(n),
        critical: vec![],
    }
}

fn tcp(first: u16, last: u16) -> Target {
    Target::Ports {
        protocol: Protocol::Tcp,
        ports: PortRange { first, last },
    }
}

fn opening(target: Target) -> Opening {
    Opening {
        target,
        host: HostAddresses::Default,
        family: None,
        remotes: vec![],
    }
}

fn open(opening: Opening, lifetime: Option<u32>) -> Message {
    Message::Open(Open {
        common: rid(2),
        opening,
        lifetime,
        app: None,
    })
}

fn open_tcp_443() -> Message {
    open(
        Opening {
            host: HostAddresses::One(ip("192.0.2.10")),
            ..opening(tcp(443, 443))
        },
        Some(600),
    )
}

fn grant(protocol: Protocol, first: u16, last: u16, host: &str) -> Grant {
    Grant {
        protocol,
        ports: PortRange { first, last },
        host: ip(host),
        remotes: vec![],
        app: None,
    }
}

fn granted(grants: Vec<Grant>, narrowed: bool) -> Message {
    Message::Granted(Granted {
        common: rid(2),
        lease: LEASE_A,
        grants,
        lifetime: 600,
        expires_ms: NOW_MS + 600_000,
        renew_after: 300,
        epoch: EPOCH,
        narrowed,
    })
}

fn denied(code: ResultCode) -> Message {
    Message::Denied(Denied {
        common: rid(2),
        code,
        reason: None,
        retry_after: None,
        lease: None,
        unsupported: vec![],
    })
}

// Editing a message's CBOR value to make inputs no encoder of ours would write.

fn u(n: u64) -> Value {
    Value::Integer(n.into())
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

fn entries(v: &mut Value) -> &mut Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        _ => panic!("not a map"),
    }
}

/// Sets `key` to `value` in a map, keeping keys in ascending order when they are integers.
fn set(v: &mut Value, key: u64, value: Value) {
    let m = entries(v);
    m.retain(|(k, _)| k.as_integer() != Some(key.into()));
    let at = m
        .iter()
        .position(|(k, _)| {
            k.as_integer()
                .is_some_and(|k| i128::from(k) > i128::from(key))
        })
        .unwrap_or(m.len());
    m.insert(at, (u(key), value));
}

fn remove(v: &mut Value, key: u64) {
    entries(v).retain(|(k, _)| k.as_integer() != Some(key.into()));
}

fn get(v: &mut Value, key: u64) -> &mut Value {
    entries(v)
        .iter_mut()
        .find(|(k, _)| k.as_integer() == Some(key.into()))
        .map(|(_, v)| v)
        .unwrap()
}

/// The CBOR of `msg` after `edit` changed its value.
fn edited(msg: &Message, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = to_value(msg);
    edit(&mut v);
    cbor(&v)
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace([' ', '\n'], "")).unwrap()
}

// ---------------------------------------------------------------------------------------------

enum Expect {
    /// Decodes to this message, which re-encodes canonically.
    Valid { msg: Message, schema_valid: bool },
    Invalid {
        layer: &'static str,
        error: &'static str,
        code: ResultCode,
        schema_valid: bool,
        /// With `unsupported-critical`: the keys Denied key 7 lists, in ascending order.
        unsupported: Vec<u64>,
    },
}

struct Vector {
    name: String,
    description: String,
    bytes: Vec<u8>,
    diagnostic: Option<String>,
    expect: Expect,
}

fn valid(name: &str, description: &str, msg: Message) -> Vector {
    Vector {
        name: name.into(),
        description: description.into(),
        bytes: encode(&msg),
        diagnostic: None,
        expect: Expect::Valid {
            msg,
            schema_valid: true,
        },
    }
}

/// A valid vector whose input is not the canonical encoding of `msg`.
fn valid_from(
    name: &str,
    description: &str,
    bytes: Vec<u8>,
    msg: Message,
    schema_valid: bool,
) -> Vector {
    Vector {
        name: name.into(),
        description: description.into(),
        bytes,
        diagnostic: None,
        expect: Expect::Valid { msg, schema_valid },
    }
}

fn invalid(
    name: &str,
    description: &str,
    bytes: Vec<u8>,
    layer: &'static str,
    error: &'static str,
    code: ResultCode,
    schema_valid: bool,
) -> Vector {
    Vector {
        name: name.into(),
        description: description.into(),
        bytes,
        diagnostic: None,
        expect: Expect::Invalid {
            layer,
            error,
            code,
            schema_valid,
            unsupported: Vec::new(),
        },
    }
}

/// `vector`, whose refusal names the critical keys `keys` in Denied key 7.
fn listing_unsupported(mut vector: Vector, keys: &[u64]) -> Vector {
    if let Expect::Invalid { unsupported, .. } = &mut vector.expect {
        *unsupported = keys.to_vec();
    }
    vector
}

fn decode_err(
    name: &str,
    d: &str,
    bytes: Vec<u8>,
    error: &'static str,
    code: ResultCode,
    schema: bool,
) -> Vector {
    invalid(name, d, bytes, "decode", error, code, schema)
}

fn validate_err(
    name: &str,
    d: &str,
    bytes: Vec<u8>,
    error: &'static str,
    code: ResultCode,
    schema: bool,
) -> Vector {
    invalid(name, d, bytes, "validate", error, code, schema)
}

use ResultCode as R;

#[allow(clippy::vec_init_then_push)]
fn vectors() -> Vec<Vector> {
    let mut v = Vec::new();

    // --- Every message type, canonical. ---------------------------------------------------
    v.push(valid(
        "hello",
        "Hello offering version 1 with every capability and a software string.",
        Message::Hello(Hello {
            common: rid(1),
            versions: vec![1],
            capabilities: Capabilities(Capabilities::ALL),
            software: Some("fwnp-agent/0.1.0".into()),
        }),
    ));
    v.push(valid_from(
        "hello-minimal",
        "Hello with only its mandatory keys: capabilities absent means 0, and 0 is not written.",
        h("a2 00 01 03 81 01"),
        Message::Hello(Hello {
            common: Common::default(),
            versions: vec![1],
            capabilities: Capabilities(0),
            software: None,
        }),
        true,
    ));
    v.push(valid(
        "welcome",
        "Welcome with limits (lease limit given) and one IPv4 and one IPv6 address the host may open.",
        Message::Welcome(Welcome {
            common: rid(1),
            version: 1,
            capabilities: Capabilities(Capabilities::ALL),
            limits: Limits {
                max_message_size: 16384,
                max_streams: 16,
                min_lifetime: 30,
                max_lifetime: 86400,
                max_leases: Some(32),
            },
            epoch: EPOCH,
            time_ms: NOW_MS,
            identity: "fwnp://host/web-01".into(),
            addresses: vec![ip("192.0.2.10"), ip("2001:db8::10")],
        }),
    ));
    v.push(valid(
        "welcome-no-lease-limit",
        "Welcome with no lease limit (limits key 5 absent), no address list entries and a SPIFFE identity.",
        Message::Welcome(Welcome {
            common: Common::default(),
            version: 1,
            capabilities: Capabilities(Capabilities::PORT_RANGES),
            limits: Limits {
                max_message_size: 16384,
                max_streams: 4,
                min_lifetime: 60,
                max_lifetime: 604800,
                max_leases: None,
            },
            epoch: 1,
            time_ms: NOW_MS,
            identity: "spiffe://example.org/host/web-01".into(),
            addresses: vec![],
        }),
    ));
    v.push(valid(
        "open-tcp-port",
        "Open tcp/443 on an IPv4 host address for 600 s, with every app-info field.",
        Message::Open(Open {
            common: rid(2),
            opening: Opening {
                host: HostAddresses::One(ip("192.0.2.10")),
                ..opening(tcp(443, 443))
            },
            lifetime: Some(600),
            app: Some(AppInfo {
                name: Some("nginx".into()),
                executable: Some("/usr/sbin/nginx".into()),
                uid: Some(33),
                pid: Some(4242),
            }),
        }),
    ));
    v.push(valid(
        "open-port-range",
        "Open udp/60000-61000 with no host address and no lifetime (the policy's default).",
        open(
            opening(Target::Ports {
                protocol: Protocol::Udp,
                ports: PortRange {
                    first: 60000,
                    last: 61000,
                },
            }),
            None,
        ),
    ));
    v.push(valid(
        "open-app-id",
        "Open the catalogue application \"https\" on the host's IPv6 address (family 6, no address).",
        open(
            Opening { family: Some(Family::Ipv6), ..opening(Target::App("https".into())) },
            Some(3600),
        ),
    ));
    v.push(valid(
        "open-ipv6-remotes",
        "Open sctp/5000 on an IPv6 host address for two IPv6 remote prefixes.",
        open(
            Opening {
                host: HostAddresses::One(ip("2001:db8::10")),
                remotes: vec![prefix("2001:db8:1::/48"), prefix("2001:db8:2::7/128")],
                ..opening(Target::Ports {
                    protocol: Protocol::Sctp,
                    ports: PortRange::single(5000),
                })
            },
            Some(600),
        ),
    ));
    v.push(valid(
        "open-ipv4-remotes",
        "Open udplite/9000 with family 4 for two IPv4 remote prefixes, one of them 0.0.0.0/0.",
        open(
            Opening {
                family: Some(Family::Ipv4),
                remotes: vec![prefix("198.51.100.0/24"), prefix("0.0.0.0/0")],
                ..opening(Target::Ports {
                    protocol: Protocol::UdpLite,
                    ports: PortRange::single(9000),
                })
            },
            None,
        ),
    ));
    v.push(valid(
        "open-port-65535",
        "Open tcp/65535, the highest port.",
        open(opening(tcp(65535, 65535)), Some(60)),
    ));
    v.push(valid(
        "open-full-range",
        "Open tcp/1-65535, the widest range allowed.",
        open(opening(tcp(1, 65535)), Some(60)),
    ));
    v.push(valid_from(
        "open-single-port-range",
        "Open tcp/8080-8080 written with key 3 equal to key 2: a one-port range; the canonical form leaves key 3 out.",
        h("a3 00 03 01 02 03 a3 01 06 02 19 1f90 03 19 1f90"),
        Message::Open(Open {
            common: rid(2),
            opening: opening(tcp(8080, 8080)),
            lifetime: None,
            app: None,
        }),
        true,
    ));
    v.push(valid(
        "open-lifetime-maximum",
        "Open asking for exactly the maximum lifetime, 604800 s.",
        open(opening(tcp(22, 22)), Some(MAX_LIFETIME_SECS)),
    ));
    v.push(valid(
        "renew",
        "Renew a lease for 900 s.",
        Message::Renew(Renew {
            common: rid(3),
            lease: LEASE_A,
            lifetime: Some(900),
        }),
    ));
    v.push(valid(
        "renew-lifetime-zero",
        "Renew a lease with lifetime 0: the lease's own granted lifetime.",
        Message::Renew(Renew {
            common: rid(3),
            lease: LEASE_A,
            lifetime: Some(0),
        }),
    ));
    v.push(valid(
        "release",
        "Release a lease.",
        Message::Release(Release {
            common: rid(4),
            lease: LEASE_B,
        }),
    ));
    v.push(valid(
        "list",
        "List the host's leases.",
        Message::List(List { common: rid(5) }),
    ));
    v.push(valid(
        "granted",
        "Granted, narrowed, for the app \"https\": tcp/443 and udp/443 on an IPv4 address, restricted to one remote prefix.",
        granted(
            vec![
                Grant {
                    remotes: vec![prefix("203.0.113.0/24")],
                    app: Some("https".into()),
                    ..grant(Protocol::Tcp, 443, 443, "192.0.2.10")
                },
                Grant {
                    remotes: vec![prefix("203.0.113.0/24")],
                    app: Some("https".into()),
                    ..grant(Protocol::Udp, 443, 443, "192.0.2.10")
                },
            ],
            true,
        ),
    ));
    v.push(valid(
        "granted-range-ipv6",
        "Granted, not narrowed (key 9 absent), a udp range on an IPv6 address.",
        granted(
            vec![grant(Protocol::Udp, 60000, 61000, "2001:db8::10")],
            false,
        ),
    ));
    v.push(valid_from(
        "granted-narrowed-false",
        "Granted with key 9 written as false; the canonical form leaves it out.",
        edited(
            &granted(vec![grant(Protocol::Tcp, 80, 80, "192.0.2.10")], false),
            |m| set(m, 9, Value::Bool(false)),
        ),
        granted(vec![grant(Protocol::Tcp, 80, 80, "192.0.2.10")], false),
        true,
    ));

    // --- Denied with each result code. -----------------------------------------------------
    for code in ResultCode::ALL {
        let mut d = Denied {
            common: rid(2),
            code,
            reason: None,
            retry_after: None,
            lease: None,
            unsupported: vec![],
        };
        let description = match code {
            R::UnsupportedVersion => {
                d.common.request_id = Some(1);
                d.reason = Some("this gateway speaks version 1".into());
                "Denied unsupported-version, answering a Hello offering no version 1."
            }
            R::MalformedRequest => "Denied malformed-request.",
            R::UnsupportedOption => {
                d.unsupported = vec![64, 4096];
                "Denied unsupported-option, listing the critical keys not understood (key 7)."
            }
            R::MalformedOption => {
                d.reason = Some("prefix 10.0.0.1/24 has host bits set".into());
                "Denied malformed-option with a reason."
            }
            R::NotAuthorized => "Denied not-authorized.",
            R::AddressMismatch => {
                d.reason = Some("192.0.2.99 is not an address of this host".into());
                "Denied address-mismatch with a reason."
            }
            R::DeniedByPolicy => {
                d.reason = Some("rule web-servers allows tcp/80,443 only".into());
                "Denied denied-by-policy with the rule in the reason."
            }
            R::NoResources => {
                d.retry_after = Some(30);
                "Denied no-resources with retry-after 30 s."
            }
            R::QuotaExceeded => "Denied quota-exceeded.",
            R::RateLimited => {
                d.retry_after = Some(5);
                "Denied rate-limited with retry-after 5 s."
            }
            R::UnknownLease => {
                d.common.request_id = Some(3);
                d.lease = Some(LEASE_A);
                "Denied unknown-lease naming the lease (key 6)."
            }
            R::LifetimeOutOfRange => "Denied lifetime-out-of-range.",
            R::UnknownApplication => {
                d.reason = Some("no application \"minecraft\" in the catalogue".into());
                "Denied unknown-application."
            }
            R::HelloRequired => {
                d.common.request_id = None;
                "Denied hello-required, with no request id."
            }
            _ => unreachable!("every code is listed"),
        };
        v.push(valid(
            &format!("denied-{}", code.name()),
            description,
            Message::Denied(d),
        ));
    }

    v.push(valid(
        "leases",
        "Leases: two live leases, one with app-info.",
        Message::Leases(Leases {
            common: rid(5),
            leases: vec![
                LeaseInfo {
                    lease: LEASE_A,
                    grants: vec![grant(Protocol::Tcp, 443, 443, "192.0.2.10")],
                    remaining: 420,
                    expires_ms: NOW_MS + 420_000,
                    app: Some(AppInfo {
                        name: Some("nginx".into()),
                        uid: Some(33),
                        ..AppInfo::default()
                    }),
                },
                LeaseInfo {
                    lease: LEASE_B,
                    grants: vec![Grant {
                        remotes: vec![prefix("2001:db8:1::/48")],
                        ..grant(Protocol::Udp, 5353, 5353, "2001:db8::10")
                    }],
                    remaining: 30,
                    expires_ms: NOW_MS + 30_000,
                    app: None,
                },
            ],
            epoch: EPOCH,
        }),
    ));
    v.push(valid(
        "leases-empty",
        "Leases with no live lease.",
        Message::Leases(Leases {
            common: rid(5),
            leases: vec![],
            epoch: EPOCH,
        }),
    ));
    v.push(valid(
        "released",
        "Released, the answer to Release.",
        Message::Released(Released {
            common: rid(4),
            lease: LEASE_B,
        }),
    ));
    v.push(valid(
        "revoked-operator",
        "Revoked notice: an operator revoked the lease, with a text.",
        Message::Revoked(Revoked {
            common: Common::default(),
            lease: LEASE_A,
            reason: RevokeReason::Operator,
            text: Some("maintenance window".into()),
        }),
    ));
    v.push(valid(
        "revoked-policy-changed",
        "Revoked notice: the policy no longer allows the lease.",
        Message::Revoked(Revoked {
            common: Common::default(),
            lease: LEASE_B,
            reason: RevokeReason::PolicyChanged,
            text: None,
        }),
    ));
    v.push(valid(
        "epoch-changed",
        "EpochChanged notice with an epoch above 2^53 (JSON readers must keep 64-bit integers exact).",
        Message::EpochChanged(EpochChanged { common: Common::default(), epoch: u64::MAX - 1 }),
    ));
    v.push(valid(
        "going-away",
        "GoingAway notice: reconnect after 10 s, with a reason.",
        Message::GoingAway(GoingAway {
            common: Common::default(),
            reconnect_after: Some(10),
            reason: Some("gateway restarting".into()),
        }),
    ));
    v.push(valid(
        "going-away-empty",
        "GoingAway notice with no optional key.",
        Message::GoingAway(GoingAway {
            common: Common::default(),
            reconnect_after: None,
            reason: None,
        }),
    ));

    // --- Extensibility: unknown keys, critical. --------------------------------------------
    let list = Message::List(List { common: rid(5) });
    v.push(valid_from(
        "unknown-extension-keys",
        "List with unknown extension keys 64 (a map with a text key) and 1000 (an array): ignored.",
        edited(&list, |m| {
            set(m, 64, Value::Map(vec![(Value::Text("x".into()), u(1))]));
            set(
                m,
                1000,
                Value::Array(vec![u(1), Value::Text("two".into()), Value::Bool(true)]),
            );
        }),
        list.clone(),
        true,
    ));
    v.push(valid_from(
        "unknown-key-below-64",
        "Open with unknown key 20 in the message map: ignored (keys below 64 that this version does not assign are reserved for later revisions; a version-1 sender never writes them, so the bytes do not match the schema).",
        edited(&open_tcp_443(), |m| set(m, 20, Value::Text("later".into()))),
        open_tcp_443(),
        false,
    ));
    v.push(valid_from(
        "unknown-extension-keys-nested",
        "Open with unknown extension keys inside the opening (key 64) and inside app-info (key 99): ignored.",
        edited(
            &Message::Open(Open { app: Some(AppInfo::default()), ..match open_tcp_443() { Message::Open(o) => o, _ => unreachable!() } }),
            |m| {
                set(get(m, 3), 64, Value::Bytes(vec![1, 2, 3]));
                set(get(m, 5), 99, Value::Null);
            },
        ),
        Message::Open(Open { app: Some(AppInfo::default()), ..match open_tcp_443() { Message::Open(o) => o, _ => unreachable!() } }),
        true,
    ));
    v.push(valid_from(
        "unknown-key-below-64-nested",
        "Open whose opening carries unknown key 30 and whose message map carries unknown key 63: ignored (not in the version-1 schema).",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 30, u(1));
            set(m, 63, u(0));
        }),
        open_tcp_443(),
        false,
    ));
    let mut critical_known = open_tcp_443();
    if let Message::Open(o) = &mut critical_known {
        o.common.critical = vec![4];
    }
    v.push(valid(
        "critical-known-key",
        "Open listing key 4 (lifetime) in critical: a key this decoder knows, so the message is accepted and critical kept.",
        critical_known,
    ));
    v.push(valid_from(
        "extension-depth-8",
        "List whose extension key 64 holds arrays nested to depth 8 in all (the message map is depth 1): the deepest accepted.",
        edited(&list, |m| {
            let mut deep = u(0);
            for _ in 0..7 {
                deep = Value::Array(vec![deep]);
            }
            set(m, 64, deep);
        }),
        list.clone(),
        true,
    ));

    // --- Non-canonical but well-formed inputs. ---------------------------------------------
    v.push(valid_from(
        "indefinite-lengths",
        "Open written with indefinite-length maps, an indefinite-length array of remote prefixes and a chunked app-info name: accepted, re-encoded with definite lengths.",
        h("bf 00 03 01 02
           03 bf 01 06 02 19 01bb 06 9f 82 44 c6336400 18 18 ff ff
           05 bf 01 7f 62 6e67 63 696e78 ff ff
           ff"),
        Message::Open(Open {
            common: rid(2),
            opening: Opening { remotes: vec![prefix("198.51.100.0/24")], ..opening(tcp(443, 443)) },
            lifetime: None,
            app: Some(AppInfo { name: Some("nginx".into()), ..AppInfo::default() }),
        }),
        true,
    ));
    v.push(valid_from(
        "non-shortest-integers",
        "Renew written with integers and lengths in longer forms than needed: accepted, re-encoded in shortest form.",
        h("b9 0004 18 00 18 04 19 0001 1b 0000000000000007 18 03 58 10 00112233445566778899aabbccddeeff 19 0004 1a 00000384"),
        Message::Renew(Renew { common: rid(7), lease: LEASE_A, lifetime: Some(900) }),
        true,
    ));
    v.push(valid_from(
        "keys-out-of-order",
        "Release with its keys in descending order: accepted (order is not checked), re-encoded in ascending order.",
        h("a3 03 50 f0e1d2c3b4a5968778695a4b3c2d1e0f 01 04 00 05"),
        Message::Release(Release { common: rid(4), lease: LEASE_B }),
        true,
    ));

    // --- Decoding errors. --------------------------------------------------------------------
    let mut too_large = to_value(&list);
    set(&mut too_large, 64, Value::Bytes(vec![0; MAX_MESSAGE_SIZE]));
    let too_large = cbor(&too_large);
    v.push(decode_err(
        "too-large",
        &format!(
            "A List of {} bytes (extension key 64 holds 16384 zero bytes): refused before parsing.",
            too_large.len()
        ),
        too_large,
        "too-large",
        R::MalformedRequest,
        true,
    ));
    v.push(decode_err(
        "nesting-too-deep",
        "List whose extension key 64 holds arrays nested to depth 9 in all: one level too deep.",
        edited(&list, |m| {
            let mut deep = u(0);
            for _ in 0..8 {
                deep = Value::Array(vec![deep]);
            }
            set(m, 64, deep);
        }),
        "nesting-too-deep",
        R::MalformedRequest,
        true,
    ));
    let mut deep = vec![0x81u8; MAX_MESSAGE_SIZE - 1];
    deep.push(0x00);
    v.push(decode_err(
        "nesting-16k-arrays",
        "16383 nested one-element arrays around 0, 16 KiB in all: refused at depth 9 without recursing further.",
        deep,
        "nesting-too-deep",
        R::MalformedRequest,
        false,
    ));
    let mut trailing = encode(&list);
    trailing.push(0x00);
    v.push(decode_err(
        "trailing-bytes",
        "A List followed by one more byte (the CBOR item 0).",
        trailing,
        "trailing-bytes",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "tag-in-extension",
        "List whose extension key 64 holds a tagged value 1(0): tags are refused anywhere, even where the schema allows any value.",
        edited(&list, |m| set(m, 64, Value::Tag(1, Box::new(u(0))))),
        "tag-not-allowed",
        R::MalformedRequest,
        true,
    ));
    v.push(decode_err(
        "tag-bignum-port",
        "Open whose port is the bignum 2(h'01bb'): tags are refused, bignums included.",
        edited(&open_tcp_443(), |m| {
            set(
                get(m, 3),
                2,
                Value::Tag(2, Box::new(Value::Bytes(vec![1, 0xbb]))),
            )
        }),
        "tag-not-allowed",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "duplicate-key",
        "List with key 1 (request id) twice.",
        h("a3 00 06 01 05 01 06"),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "not-a-map",
        "An array [6] instead of a map.",
        h("81 06"),
        "not-a-map",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "key-not-unsigned",
        "List with a text key \"x\" in the message map.",
        h("a2 00 06 61 78 01"),
        "key-not-unsigned",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "key-negative",
        "List with the negative key -1.",
        h("a2 00 06 20 01"),
        "key-not-unsigned",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "unknown-message-type",
        "A message of type 7, which FWNP/1 does not define.",
        h("a2 00 07 01 01"),
        "unknown-message-type",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "missing-type",
        "A map without key 0.",
        h("a1 01 05"),
        "missing-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "missing-lease-id",
        "Release without its mandatory key 3 (the lease id).",
        h("a2 00 05 01 04"),
        "missing-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "missing-port",
        "Open whose opening has a protocol but no port (key 2).",
        edited(&open_tcp_443(), |m| remove(get(m, 3), 2)),
        "missing-key",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "wrong-type-lease-id",
        "Renew whose lease id is a text string.",
        edited(
            &Message::Renew(Renew {
                common: rid(3),
                lease: LEASE_A,
                lifetime: None,
            }),
            |m| set(m, 3, Value::Text(LEASE_A.to_string())),
        ),
        "wrong-type",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "wrong-type-port",
        "Open whose port is the text \"443\".",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 2, Value::Text("443".into()))
        }),
        "wrong-type",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "wrong-type-negative-lifetime",
        "Open whose lifetime is -1.",
        edited(&open_tcp_443(), |m| {
            set(m, 4, Value::Integer((-1i64).into()))
        }),
        "wrong-type",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "port-65536",
        "Open of tcp/65536: above the highest port.",
        edited(&open_tcp_443(), |m| set(get(m, 3), 2, u(65536))),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "unknown-protocol",
        "Open with protocol 1 (ICMP), which FWNP/1 does not open.",
        edited(&open_tcp_443(), |m| set(get(m, 3), 1, u(1))),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "lifetime-above-u32",
        "Open asking for a lifetime of 2^32 s: it does not fit the schema's 32 bits, and like every lifetime asked above 604800 s it is answered lifetime-out-of-range, not malformed-request.",
        edited(&open_tcp_443(), |m| set(m, 4, u(1 << 32))),
        "lifetime-out-of-range",
        R::LifetimeOutOfRange,
        false,
    ));
    v.push(decode_err(
        "unknown-family",
        "Open with family 5.",
        edited(&open_tcp_443(), |m| {
            remove(get(m, 3), 4);
            set(get(m, 3), 5, u(5));
        }),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "unknown-result-code",
        "Denied with result code 99, which the registry does not define.",
        edited(&denied(R::NotAuthorized), |m| set(m, 3, u(99))),
        "out-of-range",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "unknown-revoke-reason",
        "Revoked with reason 9, which the registry does not define.",
        edited(
            &Message::Revoked(Revoked {
                common: Common::default(),
                lease: LEASE_A,
                reason: RevokeReason::Operator,
                text: None,
            }),
            |m| set(m, 4, u(9)),
        ),
        "out-of-range",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "prefix-length-above-128",
        "Open with a remote prefix of length 129.",
        edited(&open_tcp_443(), |m| {
            set(
                get(m, 3),
                6,
                Value::Array(vec![Value::Array(vec![
                    Value::Bytes(vec![198, 51, 100, 0]),
                    u(129),
                ])]),
            )
        }),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "lease-id-15-bytes",
        "Release whose lease id is 15 bytes long.",
        edited(
            &Message::Release(Release {
                common: rid(4),
                lease: LEASE_B,
            }),
            |m| set(m, 3, Value::Bytes(LEASE_B.0[..15].to_vec())),
        ),
        "wrong-length",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "address-5-bytes",
        "Open whose host address is 5 bytes long.",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 4, Value::Bytes(vec![192, 0, 2, 10, 0]))
        }),
        "wrong-length",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "opening-ports-and-app",
        "Open whose opening names both tcp/443 (keys 1, 2) and the application \"https\" (key 7).",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 7, Value::Text("https".into()))
        }),
        "conflicting-target",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "opening-no-target",
        "Open whose opening names only a host address: neither ports nor an application.",
        edited(&open_tcp_443(), |m| {
            remove(get(m, 3), 1);
            remove(get(m, 3), 2);
        }),
        "missing-target",
        R::MalformedOption,
        false,
    ));
    v.push(listing_unsupported(
        decode_err(
            "critical-unknown-key",
            "Open carrying extension key 64 and listing 64 and 70 in critical: the decoder does not know them and refuses the message; Denied key 7 lists [64, 70].",
            edited(&open_tcp_443(), |m| {
                set(m, 2, Value::Array(vec![u(64), u(70)]));
                set(m, 64, Value::Text("must understand".into()));
            }),
            "unsupported-critical",
            R::UnsupportedOption,
            true,
        ),
        &[64, 70],
    ));
    v.push(decode_err(
        "truncated",
        "An Open cut short in the middle of its opening.",
        encode(&open_tcp_443())[..9].to_vec(),
        "invalid-cbor",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "empty-input",
        "Zero bytes.",
        vec![],
        "invalid-cbor",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "text-not-utf8",
        "Hello whose software text holds the byte 0xff.",
        h("a3 00 01 03 81 01 05 63 61 ff 62"),
        "invalid-cbor",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "reserved-additional-info",
        "List whose request id has additional information 28, which RFC 8949 reserves.",
        h("a2 00 06 01 1c"),
        "invalid-cbor",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "stray-break",
        "A definite-length map holding a break code where a value belongs.",
        h("a2 00 06 01 ff"),
        "invalid-cbor",
        R::MalformedRequest,
        false,
    ));

    // --- Validation errors (decode succeeds). ------------------------------------------------
    v.push(validate_err(
        "port-zero",
        "Open of tcp/0: well-formed, but port 0 cannot be opened.",
        encode(&open(opening(tcp(0, 0)), None)),
        "port-zero",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "reversed-range",
        "Open of tcp/9000-8000: the last port is below the first.",
        encode(&open(opening(tcp(9000, 8000)), None)),
        "reversed-range",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "prefix-host-bits",
        "Open with remote prefix 10.0.0.1/24: host bits set beyond the length.",
        encode(&open(
            Opening {
                remotes: vec![prefix("10.0.0.1/24")],
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "host-bits-set",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "prefix-ipv4-33",
        "Open with remote prefix 10.0.0.0/33: longer than an IPv4 address.",
        encode(&open(
            Opening {
                remotes: vec![prefix("10.0.0.0/33")],
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "prefix-too-long",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "family-mismatch",
        "Open with an IPv4 host address and family 6.",
        encode(&open(
            Opening {
                host: HostAddresses::One(ip("192.0.2.10")),
                family: Some(Family::Ipv6),
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "family-mismatch",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "remote-family-mismatch",
        "Open with an IPv6 host address and an IPv4 remote prefix.",
        encode(&open(
            Opening {
                host: HostAddresses::One(ip("2001:db8::10")),
                remotes: vec![prefix("198.51.100.0/24")],
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "remote-family-mismatch",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "app-id-uppercase",
        "Open of the application \"HTTPS\": app ids are lower case.",
        encode(&open(opening(Target::App("HTTPS".into())), None)),
        "app-id-character",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "app-id-too-long",
        "Open of an application id of 65 bytes.",
        encode(&open(opening(Target::App("a".repeat(65))), None)),
        "app-id-length",
        R::MalformedOption,
        false,
    ));
    v.push(validate_err(
        "lifetime-above-maximum",
        "Open asking for 604801 s, one second above the maximum lifetime.",
        encode(&open(opening(tcp(22, 22)), Some(MAX_LIFETIME_SECS + 1))),
        "lifetime-out-of-range",
        R::LifetimeOutOfRange,
        true,
    ));
    v.push(validate_err(
        "renew-lifetime-above-maximum",
        "Renew asking for 4294967295 s.",
        encode(&Message::Renew(Renew {
            common: rid(3),
            lease: LEASE_A,
            lifetime: Some(u32::MAX),
        })),
        "lifetime-out-of-range",
        R::LifetimeOutOfRange,
        true,
    ));
    v.push(decode_err(
        "hello-no-versions",
        "Hello with an empty version list (key 3 is `[+ version]`).",
        encode(&Message::Hello(Hello {
            common: rid(1),
            versions: vec![],
            capabilities: Capabilities(0),
            software: None,
        })),
        "empty-list",
        R::MalformedRequest,
        false,
    ));
    v.push(validate_err(
        "hello-unsupported-version",
        "Hello offering only versions 2 and 3: answered Denied unsupported-version, then the connection is closed with VersionMismatch (0x5).",
        encode(&Message::Hello(Hello { common: rid(1), versions: vec![2, 3], capabilities: Capabilities(0), software: None })),
        "unsupported-version",
        R::UnsupportedVersion,
        true,
    ));
    v.push(decode_err(
        "software-too-long",
        "Hello whose software text is 129 bytes (the schema allows 0 to 128): refused by decoding.",
        encode(&Message::Hello(Hello {
            common: rid(1),
            versions: vec![1],
            capabilities: Capabilities(0),
            software: Some("x".repeat(129)),
        })),
        "text-length",
        R::MalformedRequest,
        false,
    ));
    v.push(validate_err(
        "granted-port-zero",
        "Granted with a grant of port 0.",
        encode(&granted(
            vec![grant(Protocol::Tcp, 0, 0, "192.0.2.10")],
            false,
        )),
        "port-zero",
        R::MalformedOption,
        true,
    ));
    v.push(decode_err(
        "granted-no-grants",
        "Granted with an empty grant list (key 4 is `[+ grant]`).",
        encode(&granted(vec![], false)),
        "empty-list",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "denied-reason-too-long",
        "Denied whose reason is 513 bytes (reason-text is 0 to 512): refused by decoding.",
        encode(&Message::Denied(Denied {
            reason: Some("r".repeat(513)),
            ..match denied(R::DeniedByPolicy) {
                Message::Denied(d) => d,
                _ => unreachable!(),
            }
        })),
        "text-length",
        R::MalformedRequest,
        false,
    ));
    // --- Added after the first 101; their numbers start at 102. -----------------------------
    assert_eq!(v.len(), 101, "vectors 1 to 101 keep their numbers");
    v.push(decode_err(
        "open-remotes-empty",
        "Open whose opening has an empty list of remote prefixes (key 6 is `[+ prefix]`): refused, never read as \"from any\", which is what an absent key 6 means.",
        edited(&open_tcp_443(), |m| set(get(m, 3), 6, Value::Array(vec![]))),
        "empty-list",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "critical-empty",
        "List with an empty critical array (key 2 is `[+ uint]`; a sender with nothing critical leaves the key out).",
        edited(&list, |m| set(m, 2, Value::Array(vec![]))),
        "empty-list",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "granted-remotes-empty",
        "Granted whose grant has an empty list of remote prefixes: a client refuses it rather than open to any source.",
        edited(
            &granted(vec![grant(Protocol::Tcp, 80, 80, "192.0.2.10")], false),
            |m| set(&mut get(m, 4).as_array_mut().unwrap()[0], 6, Value::Array(vec![])),
        ),
        "empty-list",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "denied-unsupported-empty",
        "Denied unsupported-option whose key 7 is an empty array (key 7 is `[+ uint]`).",
        edited(&denied(R::UnsupportedOption), |m| {
            set(m, 7, Value::Array(vec![]))
        }),
        "empty-list",
        R::MalformedRequest,
        false,
    ));
    v.push(validate_err(
        "open-host-ipv4-mapped",
        "Open whose host address is the IPv4-mapped IPv6 address ::ffff:10.1.0.10: an IPv4 address travels as 4 bytes, never mapped.",
        encode(&open(
            Opening { host: HostAddresses::One(ip("::ffff:10.1.0.10")), ..opening(tcp(443, 443)) },
            None,
        )),
        "ipv4-mapped-address",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "open-remote-ipv4-mapped",
        "Open on an IPv6 host address whose remote prefix ::ffff:10.0.0.0/104 is IPv4-mapped.",
        encode(&open(
            Opening {
                host: HostAddresses::One(ip("2001:db8::10")),
                remotes: vec![prefix("::ffff:10.0.0.0/104")],
                ..opening(tcp(443, 443))
            },
            None,
        )),
        "ipv4-mapped-address",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "granted-host-ipv4-mapped",
        "Granted whose grant names the IPv4-mapped host address ::ffff:192.0.2.10: a client refuses it.",
        encode(&granted(vec![grant(Protocol::Tcp, 80, 80, "::ffff:192.0.2.10")], false)),
        "ipv4-mapped-address",
        R::MalformedOption,
        true,
    ));
    v.push(listing_unsupported(
        decode_err(
            "critical-unknown-keys-unordered",
            "List whose critical array is [70, 4, 64, 70]: Denied key 7 lists the keys not understood once each and in ascending order, [64, 70], whatever their order in critical (key 4 is not understood either: List assigns no key 4).",
            edited(&list, |m| {
                set(m, 2, Value::Array(vec![u(70), u(4), u(64), u(70)]));
            }),
            "unsupported-critical",
            R::UnsupportedOption,
            true,
        ),
        &[4, 64, 70],
    ));
    v.push(decode_err(
        "opening-duplicate-key",
        "Open whose opening holds key 2 (port) twice: a duplicate key breaks a structural rule (Section 6.3 rule 9), which is malformed-request wherever in the item it is, inside the opening too.",
        edited(&open_tcp_443(), |m| entries(get(m, 3)).push((u(2), u(443)))),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "opening-key-not-unsigned",
        "Open whose opening holds the text key \"x\": a key that is not an unsigned integer (Section 6.3 rule 8) is malformed-request, inside the opening too.",
        edited(&open_tcp_443(), |m| {
            entries(get(m, 3)).push((Value::Text("x".into()), u(1)))
        }),
        "key-not-unsigned",
        R::MalformedRequest,
        false,
    ));
    let remote = |addr: Vec<u8>, len: u64| {
        edited(&open_tcp_443(), move |m| {
            remove(get(m, 3), 4);
            set(
                get(m, 3),
                6,
                Value::Array(vec![Value::Array(vec![Value::Bytes(addr), u(len)])]),
            )
        })
    };
    v.push(decode_err(
        "prefix-length-300",
        "Open with a remote prefix 198.51.100.0/300: a length above 128 breaks the schema (`uint .le 128`) and is refused by decoding (Section 6.3 rule 13), inside the opening: malformed-option.",
        remote(vec![198, 51, 100, 0], 300),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "prefix-ipv6-129",
        "Open with the remote prefix 2001:db8::/129: refused by decoding, like any length above 128.",
        remote(ip6_bytes("2001:db8::"), 129),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "app-info-name-too-long",
        "Open whose app-info name is 257 bytes (at most 256): refused by decoding, and malformed-request since app-info is not the opening.",
        encode(&Message::Open(Open {
            app: Some(AppInfo { name: Some("n".repeat(257)), ..AppInfo::default() }),
            ..match open_tcp_443() {
                Message::Open(o) => o,
                _ => unreachable!(),
            }
        })),
        "text-length",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "welcome-identity-empty",
        "Welcome whose identity is the empty text (the schema allows 1 to 512 bytes).",
        edited(&minimal_welcome(), |m| {
            set(m, 8, Value::Text(String::new()))
        }),
        "text-length",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "renew-lifetime-u64-max",
        "Renew asking for a lifetime of 2^64-1 s: lifetime-out-of-range, like any lifetime asked above 604800 s.",
        edited(
            &Message::Renew(Renew {
                common: rid(3),
                lease: LEASE_A,
                lifetime: None,
            }),
            |m| set(m, 4, u(u64::MAX)),
        ),
        "lifetime-out-of-range",
        R::LifetimeOutOfRange,
        false,
    ));
    v.push(decode_err(
        "open-lifetime-null",
        "Open whose lifetime (key 4) is null: no key FWNP/1 defines takes null, so this is a value of the wrong type, not an absent key (unlike key 99 of vector 045, which the receiver ignores).",
        edited(&open_tcp_443(), |m| set(m, 4, Value::Null)),
        "wrong-type",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "opening-host-null",
        "Open whose opening's host address (key 4) is null: a wrong type inside the opening, malformed-option.",
        edited(&open_tcp_443(), |m| set(get(m, 3), 4, Value::Null)),
        "wrong-type",
        R::MalformedOption,
        false,
    ));

    // --- Host addresses: one, several, or the host's own (numbered from 130). ----------------
    let both = || HostAddresses::List(vec![ip("192.0.2.10"), ip("2001:db8::10")]);
    v.push(valid(
        "open-host-addresses-both-families",
        "Open tcp/8080 on two host addresses, one of each family, in one opening (key 4 as an array).",
        open(
            Opening {
                host: both(),
                ..opening(tcp(8080, 8080))
            },
            Some(600),
        ),
    ));
    v.push(valid(
        "open-host-addresses-ipv6-remotes",
        "Open udp/5353 on two IPv6 host addresses, family 6, for one IPv6 remote prefix: every address agrees with the family and the prefix.",
        open(
            Opening {
                host: HostAddresses::List(vec![ip("2001:db8::10"), ip("2001:db8::11")]),
                family: Some(Family::Ipv6),
                remotes: vec![prefix("2001:db8:1::/48")],
                ..opening(Target::Ports {
                    protocol: Protocol::Udp,
                    ports: PortRange::single(5353),
                })
            },
            None,
        ),
    ));
    v.push(valid(
        "open-host-addresses-16",
        "Open tcp/22 on 16 IPv4 host addresses, the most an opening may name.",
        open(
            Opening {
                host: HostAddresses::List((1..=16).map(|i| ip(&format!("192.0.2.{i}"))).collect()),
                ..opening(tcp(22, 22))
            },
            None,
        ),
    ));
    v.push(valid(
        "open-remotes-no-host",
        "Open tcp/8082 with one IPv6 remote prefix and neither host address nor family: the gateway opens the host's IPv6 addresses (the prefixes' family).",
        open(
            Opening {
                remotes: vec![prefix("fd18:1::2/128")],
                ..opening(tcp(8082, 8082))
            },
            None,
        ),
    ));
    v.push(valid_from(
        "open-host-addresses-indefinite",
        "Open whose host address array has an indefinite length: accepted, and re-encoded with a definite length.",
        {
            let canonical = encode(&open(
                Opening {
                    host: both(),
                    ..opening(tcp(8080, 8080))
                },
                Some(600),
            ));
            // The array of two addresses: header 0x82, then 4 and 16 bytes.
            let array = [&[0x82, 0x44, 192, 0, 2, 10, 0x50][..], &ip16("2001:db8::10")[..]].concat();
            let at = canonical.windows(array.len()).position(|w| w == array).unwrap();
            let mut bytes = canonical[..at].to_vec();
            bytes.push(0x9f);
            bytes.extend(&array[1..]);
            bytes.push(0xff);
            bytes.extend(&canonical[at + array.len()..]);
            bytes
        },
        open(
            Opening {
                host: both(),
                ..opening(tcp(8080, 8080))
            },
            Some(600),
        ),
        true,
    ));
    v.push(valid(
        "granted-both-families",
        "Granted for an opening of tcp/8080 with no host address on a host holding 192.0.2.10 and 2001:db8::10: one lease, one grant per address.",
        granted(
            vec![
                grant(Protocol::Tcp, 8080, 8080, "192.0.2.10"),
                grant(Protocol::Tcp, 8080, 8080, "2001:db8::10"),
            ],
            false,
        ),
    ));
    v.push(valid(
        "granted-app-both-families",
        "Granted for the application \"https\" (tcp/443 and udp/443) on two host addresses: one grant per catalogue entry and address, in the recommended order.",
        granted(
            [
                (Protocol::Tcp, "192.0.2.10"),
                (Protocol::Tcp, "2001:db8::10"),
                (Protocol::Udp, "192.0.2.10"),
                (Protocol::Udp, "2001:db8::10"),
            ]
            .into_iter()
            .map(|(protocol, host)| Grant {
                app: Some("https".into()),
                ..grant(protocol, 443, 443, host)
            })
            .collect(),
            false,
        ),
    ));
    v.push(valid(
        "granted-one-family-narrowed",
        "Granted for an opening of tcp/8080 on two named host addresses where policy admits only the IPv4 one: narrowed.",
        granted(vec![grant(Protocol::Tcp, 8080, 8080, "192.0.2.10")], true),
    ));
    v.push(valid(
        "leases-both-families",
        "Leases: one lease with a grant on each family.",
        Message::Leases(Leases {
            common: rid(5),
            leases: vec![LeaseInfo {
                lease: LEASE_A,
                grants: vec![
                    grant(Protocol::Tcp, 8080, 8080, "192.0.2.10"),
                    grant(Protocol::Tcp, 8080, 8080, "2001:db8::10"),
                ],
                remaining: 420,
                expires_ms: NOW_MS + 420_000,
                app: None,
            }],
            epoch: EPOCH,
        }),
    ));
    v.push(valid(
        "denied-address-mismatch-no-address-of-family",
        "Denied address-mismatch for an opening whose remote prefixes (or family) are IPv6, from a host with no IPv6 address it may open.",
        Message::Denied(Denied {
            reason: Some("the host holds no address of family IPv6 it may open".into()),
            ..match denied(R::AddressMismatch) {
                Message::Denied(d) => d,
                _ => unreachable!(),
            }
        }),
    ));
    v.push(validate_err(
        "host-addresses-empty",
        "Open whose key 4 is an empty array: to name no address, key 4 is left out.",
        edited(&open_tcp_443(), |m| set(get(m, 3), 4, Value::Array(vec![]))),
        "host-address-count",
        R::MalformedOption,
        false,
    ));
    v.push(validate_err(
        "host-addresses-one",
        "Open whose key 4 is an array of one address: one address is written as a byte string.",
        edited(&open_tcp_443(), |m| {
            set(
                get(m, 3),
                4,
                Value::Array(vec![Value::Bytes(vec![192, 0, 2, 10])]),
            )
        }),
        "host-address-count",
        R::MalformedOption,
        false,
    ));
    v.push(validate_err(
        "host-addresses-17",
        "Open naming 17 host addresses, one more than the most an opening may name.",
        encode(&open(
            Opening {
                host: HostAddresses::List((1..=17).map(|i| ip(&format!("192.0.2.{i}"))).collect()),
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "host-address-count",
        R::MalformedOption,
        false,
    ));
    v.push(validate_err(
        "host-addresses-duplicate",
        "Open naming 192.0.2.10 twice in its host addresses.",
        encode(&open(
            Opening {
                host: HostAddresses::List(vec![
                    ip("192.0.2.10"),
                    ip("2001:db8::10"),
                    ip("192.0.2.10"),
                ]),
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "duplicate-host-address",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "host-addresses-family-mismatch",
        "Open naming an IPv4 and an IPv6 host address with family 4: the IPv6 one disagrees.",
        encode(&open(
            Opening {
                host: both(),
                family: Some(Family::Ipv4),
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "family-mismatch",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "host-addresses-remote-family-mismatch",
        "Open naming an IPv4 and an IPv6 host address with an IPv4 remote prefix: the prefix cannot restrict the IPv6 address.",
        encode(&open(
            Opening {
                host: both(),
                remotes: vec![prefix("198.51.100.0/24")],
                ..opening(tcp(22, 22))
            },
            None,
        )),
        "remote-family-mismatch",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "remotes-mixed-families-no-host",
        "Open with an IPv6 and an IPv4 remote prefix and neither host address nor family: the prefixes must share one family.",
        encode(&open(
            Opening {
                remotes: vec![prefix("fd18:1::2/128"), prefix("198.51.100.0/24")],
                ..opening(tcp(8082, 8082))
            },
            None,
        )),
        "remote-family-mismatch",
        R::MalformedOption,
        true,
    ));
    v.push(decode_err(
        "host-addresses-element-5-bytes",
        "Open whose host address array holds an address of 5 bytes.",
        edited(&open_tcp_443(), |m| {
            set(
                get(m, 3),
                4,
                Value::Array(vec![
                    Value::Bytes(vec![192, 0, 2, 10]),
                    Value::Bytes(vec![192, 0, 2, 11, 0]),
                ]),
            )
        }),
        "wrong-length",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "host-addresses-element-not-bytes",
        "Open whose host address array holds a text string.",
        edited(&open_tcp_443(), |m| {
            set(
                get(m, 3),
                4,
                Value::Array(vec![
                    Value::Bytes(vec![192, 0, 2, 10]),
                    Value::Text("192.0.2.11".into()),
                ]),
            )
        }),
        "wrong-type",
        R::MalformedOption,
        false,
    ));

    // --- Welcome's version, duplicate keys in ignored values, items that break several rules
    // (numbered on from 149). ----------------------------------------------------------------
    v.push(decode_err(
        "welcome-version-2",
        "Welcome choosing version 2: FWNP/1 defines version 1 only, so a Welcome's version is 1 (Section 6.3 rule 13); a client refuses this answer as failing to decode.",
        edited(&minimal_welcome(), |m| set(m, 3, u(2))),
        "out-of-range",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "duplicate-key-in-extension",
        "List whose extension key 64 holds the map {1: 0, 1: 1}: a value that is ignored must still hold no map with a duplicate key (Sections 6.3 rule 9 and 6.4).",
        edited(&list, |m| {
            set(m, 64, Value::Map(vec![(u(1), u(0)), (u(1), u(1))]));
        }),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    // Each input below breaks two or more rules whose result codes (or, within one code, whose
    // errors) differ; the expected refusal is the first in the order of Section 6.6.
    let critical_64 = |m: &mut Value| set(m, 2, Value::Array(vec![u(64)]));
    let mut garbage = vec![0xff; MAX_MESSAGE_SIZE + 1];
    garbage[0] = 0xa1;
    v.push(decode_err(
        "first-size-then-form",
        "16385 bytes, a map header followed by break codes: longer than the limit and not well-formed. The size is checked before parsing (step 1 of the order), so on a request stream it is reset with MessageTooLarge, not answered malformed-request.",
        garbage,
        "too-large",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-tag-then-critical",
        "Open listing the unknown key 64 in critical, whose extension key 64 holds the tagged value 1(0): a tag (rule 5, step 1) comes before critical (rule 11, step 2), so malformed-request, not unsupported-option.",
        edited(&open_tcp_443(), |m| {
            critical_64(m);
            set(m, 64, Value::Tag(1, Box::new(u(0))));
        }),
        "tag-not-allowed",
        R::MalformedRequest,
        true,
    ));
    v.push(decode_err(
        "first-duplicate-then-critical",
        "Open listing the unknown key 64 in critical, whose opening holds key 2 (port) twice: a duplicate key anywhere (rule 9, step 1) comes before critical (step 2), so malformed-request.",
        edited(&open_tcp_443(), |m| {
            critical_64(m);
            entries(get(m, 3)).push((u(2), u(443)));
        }),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-message-keys-then-critical",
        "Open listing the unknown key 64 in critical, with the text key \"x\" in the message map: rule 8 for the message map's keys comes before critical (both step 2), so malformed-request.",
        edited(&open_tcp_443(), |m| {
            critical_64(m);
            entries(m).push((Value::Text("x".into()), u(1)));
        }),
        "key-not-unsigned",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-message-type-then-critical",
        "A message of type 7, which FWNP/1 does not define, listing the unknown key 64 in critical: rule 10 comes before rule 11 (step 2), so malformed-request.",
        h("a3 00 07 01 01 02 81 18 40"),
        "unknown-message-type",
        R::MalformedRequest,
        false,
    ));
    v.push(listing_unsupported(
        decode_err(
            "first-critical-then-opening-keys",
            "Open listing the unknown key 64 in critical, whose opening holds the text key \"x\": critical (step 2) comes before the opening's keys, which are checked when key 3 is reached (step 3), so unsupported-option.",
            edited(&open_tcp_443(), |m| {
                critical_64(m);
                entries(get(m, 3)).push((Value::Text("x".into()), u(1)));
            }),
            "unsupported-critical",
            R::UnsupportedOption,
            false,
        ),
        &[64],
    ));
    v.push(listing_unsupported(
        decode_err(
            "first-critical-then-request-id",
            "List whose request id (key 1) is a text and whose critical lists the unknown key 64: critical (step 2) comes before the keys' values (step 3), so unsupported-option, with no request id to echo.",
            h("a3 00 06 01 61 78 02 81 18 40"),
            "unsupported-critical",
            R::UnsupportedOption,
            false,
        ),
        &[64],
    ));
    v.push(listing_unsupported(
        decode_err(
            "first-critical-then-versions",
            "Hello offering only version 2 and listing the unknown key 64 in critical: decoding (step 2) comes before the versions (step 5), so unsupported-option.",
            edited(&hello_versions(vec![2]), critical_64),
            "unsupported-critical",
            R::UnsupportedOption,
            true,
        ),
        &[64],
    ));
    v.push(decode_err(
        "first-request-id-then-opening",
        "Open whose request id (key 1) is a text and whose opening names protocol 99: key 1 comes before key 3 (step 3), so malformed-request, not malformed-option.",
        edited(&open_tcp_443(), |m| {
            set(m, 1, Value::Text("x".into()));
            set(get(m, 3), 1, u(99));
        }),
        "wrong-type",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-opening-then-lifetime",
        "Open whose opening names protocol 99 and whose lifetime is 2^32: key 3 comes before key 4 (step 3), so malformed-option, not lifetime-out-of-range.",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 1, u(99));
            set(m, 4, u(1 << 32));
        }),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "first-opening-then-app-info",
        "Open whose opening names protocol 99 and whose app-info name (key 5, key 1 of app-info) is the number 5: key 3 comes before key 5 (step 3), so malformed-option, not malformed-request.",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 1, u(99));
            set(m, 5, Value::Map(vec![(u(1), u(5))]));
        }),
        "out-of-range",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "first-missing-opening-then-lifetime",
        "Open without its opening (key 3) and with a lifetime of 2^32: a missing mandatory key counts where its number falls, before key 4 (step 3), so malformed-request.",
        edited(&open_tcp_443(), |m| {
            remove(m, 3);
            set(m, 4, u(1 << 32));
        }),
        "missing-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-lease-then-lifetime",
        "Renew whose lease id is 15 bytes and whose lifetime is 2^32: key 3 comes before key 4 (step 3), so malformed-request, not lifetime-out-of-range.",
        edited(
            &Message::Renew(Renew {
                common: rid(3),
                lease: LEASE_A,
                lifetime: None,
            }),
            |m| {
                set(m, 3, Value::Bytes(LEASE_A.0[..15].to_vec()));
                set(m, 4, u(1 << 32));
            },
        ),
        "wrong-length",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-lifetime-then-app-info",
        "Open asking for a lifetime of 2^32 whose app-info name is 257 bytes: key 4 comes before key 5 (step 3), so lifetime-out-of-range, not malformed-request.",
        edited(&open_tcp_443(), |m| {
            set(m, 4, u(1 << 32));
            set(m, 5, Value::Map(vec![(u(1), Value::Text("n".repeat(257)))]));
        }),
        "lifetime-out-of-range",
        R::LifetimeOutOfRange,
        false,
    ));
    v.push(decode_err(
        "first-opening-keys-then-shape",
        "Open whose opening holds the text key \"x\" and a host address but neither ports nor an application: the opening's keys (rule 8) come before its shape (step 3), so malformed-request, not malformed-option.",
        edited(&open_tcp_443(), |m| {
            let opening = get(m, 3);
            remove(opening, 1);
            remove(opening, 2);
            entries(opening).push((Value::Text("x".into()), u(1)));
        }),
        "key-not-unsigned",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "first-opening-shape-then-values",
        "Open whose opening names tcp/443, family 5 and the application \"https\": the opening's shape (Section 9.4 rule 1) comes before its keys' values (step 3), so the error is the conflicting target, not the family (both malformed-option).",
        edited(&open_tcp_443(), |m| {
            set(get(m, 3), 5, u(5));
            set(get(m, 3), 7, Value::Text("https".into()));
        }),
        "conflicting-target",
        R::MalformedOption,
        false,
    ));
    v.push(decode_err(
        "first-decoding-then-validation",
        "Open of tcp/0 asking for a lifetime of 2^32: decoding (step 3) comes before the opening's validation (step 4), so lifetime-out-of-range, not malformed-option.",
        edited(&open(opening(tcp(0, 0)), None), |m| set(m, 4, u(1 << 32))),
        "lifetime-out-of-range",
        R::LifetimeOutOfRange,
        false,
    ));
    v.push(decode_err(
        "first-decoding-then-versions",
        "Hello offering only version 2 with a software text of 129 bytes: decoding (step 3) comes before the versions (step 5), so malformed-request, not unsupported-version.",
        edited(&hello_versions(vec![2]), |m| {
            set(m, 5, Value::Text("x".repeat(129)))
        }),
        "text-length",
        R::MalformedRequest,
        false,
    ));
    v.push(validate_err(
        "first-opening-rules-then-lifetime-maximum",
        "Open of tcp/0 asking for 700000 s: the opening's rules (step 4) come before the lifetime maximum (step 5), so malformed-option, not lifetime-out-of-range.",
        encode(&open(opening(tcp(0, 0)), Some(700_000))),
        "port-zero",
        R::MalformedOption,
        true,
    ));
    v.push(validate_err(
        "first-reversed-range-then-family",
        "Open of tcp/9000-8000 on the IPv4 host address 192.0.2.10 with family 6: Section 9.4 rule 3 (reversed range) comes before rule 6 (family), so the error is the reversed range (both malformed-option).",
        encode(&open(
            Opening {
                host: HostAddresses::One(ip("192.0.2.10")),
                family: Some(Family::Ipv6),
                ..opening(tcp(9000, 8000))
            },
            None,
        )),
        "reversed-range",
        R::MalformedOption,
        true,
    ));
    // --- Keys of ignored maps compared as values (Section 6.3 rule 9) ---------------------
    let list_with_keys = |keys: &str| h(&format!("a3 00 06 01 05 18 40 {keys}"));
    v.push(decode_err(
        "duplicate-key-nan",
        "List whose extension key 64 holds a map with two NaN keys, a half with no payload and a single with payload 1: every NaN is one value, whatever its width, sign and payload, so the map holds one key twice (Section 6.3 rule 9). The diagnostic notation cannot show the payload; the hex does.",
        list_with_keys("a2 f9 7e00 00 fa 7fc00001 01"),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "duplicate-key-float-widths",
        "List whose extension key 64 holds a map with the keys 1.0 as a half and 1.0 as a double: a floating-point number is the number it denotes, whatever its width, so the map holds one key twice (Section 6.3 rule 9).",
        list_with_keys("a2 f9 3c00 00 fb 3ff0000000000000 01"),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    v.push(decode_err(
        "duplicate-key-map-keys",
        "List whose extension key 64 holds a map whose two keys are the maps {1: 0, 2: 0} and {2: 0, 1: 0}: a map is its entries, whatever their order, so the map holds one key twice (Section 6.3 rule 9).",
        list_with_keys("a2 a2 0100 0200 00 a2 0200 0100 01"),
        "duplicate-key",
        R::MalformedRequest,
        false,
    ));
    v.push(valid_from(
        "distinct-keys-of-ignored-map",
        "List whose extension key 64 holds a map with the keys 1, 1.0, 0.0 and -0.0: an integer and a floating-point number are two values, and so are 0.0 and -0.0, so no key is there twice (Section 6.3 rule 9); key 64 is ignored.",
        list_with_keys("a4 01 00 f9 3c00 01 f9 0000 02 f9 8000 03"),
        list.clone(),
        true,
    ));
    v
}

/// A Welcome with only its mandatory keys' values, no lease limit and no address.
fn minimal_welcome() -> Message {
    Message::Welcome(Welcome {
        common: rid(1),
        version: 1,
        capabilities: Capabilities(0),
        limits: Limits {
            max_message_size: 16384,
            max_streams: 16,
            min_lifetime: 30,
            max_lifetime: 86400,
            max_leases: None,
        },
        epoch: EPOCH,
        time_ms: NOW_MS,
        identity: "fwnp://host/web-01".into(),
        addresses: vec![],
    })
}

/// A Hello offering `versions` and nothing else.
fn hello_versions(versions: Vec<u16>) -> Message {
    Message::Hello(Hello {
        common: rid(1),
        versions,
        capabilities: Capabilities(0),
        software: None,
    })
}

fn ip6_bytes(s: &str) -> Vec<u8> {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()
}

fn render(vector: &Vector) -> Json {
    let diagnostic = match &vector.diagnostic {
        Some(d) => d.clone(),
        None => {
            // Deeply nested inputs need a deep stack for the (recursive) notation printer.
            let bytes = vector.bytes.clone();
            std::thread::Builder::new()
                .stack_size(512 << 20)
                .spawn(move || common::diagnostic(&bytes))
                .unwrap()
                .join()
                .unwrap()
                .unwrap_or_else(|why| format!("not well-formed CBOR: {why}"))
        }
    };
    let outcome = match &vector.expect {
        Expect::Valid { msg, schema_valid } => json!({
            "valid": {
                "decoded": common::message_json(msg),
                "canonical_hex": hex::encode(encode(msg)),
                "schema_valid": schema_valid,
            }
        }),
        Expect::Invalid {
            layer,
            error,
            code,
            schema_valid,
            unsupported,
        } => {
            let mut invalid = json!({
                "layer": layer,
                "error": error,
                "result_code": code.name(),
                "schema_valid": schema_valid,
            });
            if !unsupported.is_empty() {
                invalid["unsupported"] = json!(unsupported);
            }
            json!({ "invalid": invalid })
        }
    };
    let mut out = json!({
        "name": vector.name,
        "description": vector.description,
        "hex": hex::encode(&vector.bytes),
        "diagnostic": diagnostic,
    });
    if let (Json::Object(out), Json::Object(outcome)) = (&mut out, outcome) {
        out.extend(outcome);
    }
    out
}

/// Vectors whose number is fixed rather than following the one before: the first of a block
/// of numbers set aside for one part of the protocol, so that blocks added side by side keep
/// their numbers. The vectors after it follow it.
const BLOCK_STARTS: &[(&str, usize)] = &[("open-host-addresses-both-families", 130)];

/// (file name, file contents) of every vector.
fn files() -> Vec<(String, String)> {
    let all = vectors();
    let mut names = std::collections::HashSet::new();
    let mut number = 0;
    all.iter()
        .map(|vector| {
            assert!(
                names.insert(vector.name.clone()),
                "duplicate vector name {}",
                vector.name
            );
            number += 1;
            if let Some(&(_, start)) = BLOCK_STARTS.iter().find(|(name, _)| *name == vector.name) {
                assert!(
                    start >= number,
                    "block {} starts at {start}, but {number} is next",
                    vector.name
                );
                number = start;
            }
            let text = serde_json::to_string_pretty(&render(vector)).unwrap() + "\n";
            (format!("{number:03}-{}.json", vector.name), text)
        })
        .collect()
}

/// Replaces the `.json` files of `dir` (not of its folders) with `files`.
fn write_files(dir: &std::path::Path, files: Vec<(String, String)>) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(path).unwrap();
        }
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// Fails unless the `.json` files of `dir` are `generated`, name for name and byte for byte.
fn assert_current(dir: &std::path::Path, generated: Vec<(String, String)>) {
    let mut committed: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    committed.sort();
    let committed_names: Vec<_> = committed.iter().map(|(n, _)| n.clone()).collect();
    let generated_names: Vec<_> = generated.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        committed_names,
        generated_names,
        "the files of {} differ from the generator's; regenerate",
        dir.display()
    );
    for ((name, committed), (_, generated)) in committed.iter().zip(&generated) {
        assert!(
            committed == generated,
            "{} differs from the generator's output; regenerate",
            dir.join(name).display()
        );
    }
}

#[test]
#[ignore = "writes spec/vectors/; run it after changing a vector"]
fn write_vectors() {
    write_files(&common::vectors_dir(), files());
    write_files(&common::local_vectors_dir(), local_files());
    write_files(&common::scenarios_dir(), scenario_files());
}

#[test]
fn committed_vectors_are_current() {
    assert_current(&common::vectors_dir(), files());
}

// ---------------------------------------------------------------------------------------------
// The local API's frames (`spec/local-api.md`), in `spec/vectors/local/`.

use fwnp_proto::local::{
    DenialCode, Event, EventKind, LocalCode, LocalDenied, LocalMessage, Status, StatusAnswer,
    Watch, Watching, encode_body, encode_frame,
};

/// What the agent does with a frame it cannot use (`spec/local-api.md` Section 3).
#[derive(Clone, Copy)]
enum Answer {
    /// It answers Denied with this code and the frame's request id.
    Denied(ResultCode),
    /// It closes the connection.
    Close,
}

enum LocalExpect {
    Valid(LocalMessage),
    Invalid {
        layer: &'static str,
        error: &'static str,
        answer: Answer,
    },
}

struct LocalVector {
    name: &'static str,
    description: &'static str,
    /// The whole input: the 4-byte header and what follows it.
    frame: Vec<u8>,
    expect: LocalExpect,
}

fn local_valid(name: &'static str, description: &'static str, msg: LocalMessage) -> LocalVector {
    LocalVector {
        name,
        description,
        frame: encode_frame(&msg),
        expect: LocalExpect::Valid(msg),
    }
}

/// A frame around `body`, with the header giving its true length.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn local_invalid(
    name: &'static str,
    description: &'static str,
    frame: Vec<u8>,
    layer: &'static str,
    error: &'static str,
    answer: Answer,
) -> LocalVector {
    LocalVector {
        name,
        description,
        frame,
        expect: LocalExpect::Invalid {
            layer,
            error,
            answer,
        },
    }
}

fn event(kind: EventKind) -> Event {
    Event {
        common: Common::default(),
        lease: LEASE_A,
        kind,
        expires_in_ms: None,
        reason: None,
        code: None,
        new_lease: None,
    }
}

fn local_denied(id: u64, code: DenialCode, reason: Option<&str>) -> LocalMessage {
    LocalMessage::Denied(LocalDenied {
        common: rid(id),
        code,
        reason: reason.map(Into::into),
        retry_after: None,
        lease: None,
        unsupported: vec![],
    })
}

#[allow(clippy::vec_init_then_push)]
fn local_vectors() -> Vec<LocalVector> {
    use LocalMessage as L;
    let mut v = Vec::new();

    // --- Requests of the application. -----------------------------------------------------
    v.push(local_valid(
        "open-tcp-ipv4",
        "Open tcp/8080 over IPv4 for 600 s, without application information (the agent fills it in): the example of local-api.md Appendix A.",
        L::Wire(Message::Open(Open {
            common: rid(1),
            opening: Opening {
                family: Some(Family::Ipv4),
                ..opening(tcp(8080, 8080))
            },
            lifetime: Some(600),
            app: None,
        })),
    ));
    v.push(local_valid(
        "open-udp-range-remotes-name",
        "Open udp/5000-5100 from one IPv6 prefix, no lifetime (the policy's default), with the application's own name as its label.",
        L::Wire(Message::Open(Open {
            common: rid(2),
            opening: Opening {
                remotes: vec![prefix("2001:db8:1::/48")],
                ..opening(Target::Ports {
                    protocol: Protocol::Udp,
                    ports: PortRange {
                        first: 5000,
                        last: 5100,
                    },
                })
            },
            lifetime: None,
            app: Some(AppInfo {
                name: Some("media-relay".into()),
                executable: None,
                uid: None,
                pid: None,
            }),
        })),
    ));
    v.push(local_valid(
        "open-app-address",
        "Open the catalogue application \"https\" on one host address for 300 s.",
        L::Wire(Message::Open(Open {
            common: rid(3),
            opening: Opening {
                host: HostAddresses::One(ip("192.0.2.10")),
                ..opening(Target::App("https".into()))
            },
            lifetime: Some(300),
            app: None,
        })),
    ));
    v.push(local_valid(
        "release",
        "Release a lease the connection holds.",
        L::Wire(Message::Release(Release {
            common: rid(4),
            lease: LEASE_A,
        })),
    ));
    v.push(local_valid(
        "list",
        "List every live lease the agent holds for applications.",
        L::Wire(Message::List(List { common: rid(5) })),
    ));
    v.push(local_valid(
        "watch-all",
        "Watch every lease of the connection (no key 3).",
        L::Watch(Watch {
            common: rid(6),
            lease: None,
        }),
    ));
    v.push(local_valid(
        "watch-one",
        "Watch one lease.",
        L::Watch(Watch {
            common: rid(7),
            lease: Some(LEASE_A),
        }),
    ));
    v.push(local_valid(
        "status",
        "Status: how the agent is doing.",
        L::Status(Status { common: rid(8) }),
    ));

    // --- Answers of the agent. ------------------------------------------------------------
    v.push(local_valid(
        "granted",
        "Granted, the gateway's answer passed on with the application's request id.",
        L::Wire(Message::Granted(Granted {
            common: rid(1),
            lease: LEASE_A,
            grants: vec![grant(Protocol::Tcp, 8080, 8080, "192.0.2.10")],
            lifetime: 600,
            expires_ms: NOW_MS + 600_000,
            renew_after: 300,
            epoch: EPOCH,
            narrowed: false,
        })),
    ));
    v.push(local_valid(
        "denied-by-policy",
        "Denied with a code of the FWNP/1 registry, as the gateway gave it, with its reason.",
        local_denied(
            2,
            DenialCode::Wire(ResultCode::DeniedByPolicy),
            Some("no rule allows tcp/7000"),
        ),
    ));
    v.push(local_valid(
        "denied-rate-limited",
        "Denied rate-limited with a retry-after of 5 s.",
        L::Denied(LocalDenied {
            common: rid(2),
            code: DenialCode::Wire(ResultCode::RateLimited),
            reason: None,
            retry_after: Some(5),
            lease: None,
            unsupported: vec![],
        }),
    ));
    v.push(local_valid(
        "denied-agent-not-authorized",
        "Denied 1024 agent-not-authorized: the caller's user may not use the agent.",
        local_denied(
            1,
            DenialCode::Local(LocalCode::AgentNotAuthorized),
            Some("uid 1000 is not allowed"),
        ),
    ));
    v.push(local_valid(
        "denied-port-not-owned",
        "Denied 1025 port-not-owned, naming the process that binds the port.",
        local_denied(
            1,
            DenialCode::Local(LocalCode::PortNotOwned),
            Some("tcp/8080 is bound by pid 1234 (nginx), not by the caller"),
        ),
    ));
    v.push(local_valid(
        "denied-gateway-unreachable",
        "Denied 1026 gateway-unreachable: the agent could not ask.",
        local_denied(1, DenialCode::Local(LocalCode::GatewayUnreachable), None),
    ));
    v.push(local_valid(
        "denied-unknown-local-lease",
        "Denied 1027 unknown-local-lease, answering a Release of a lease the connection does not hold, which key 6 names.",
        L::Denied(LocalDenied {
            common: rid(4),
            code: DenialCode::Local(LocalCode::UnknownLocalLease),
            reason: None,
            retry_after: None,
            lease: Some(LEASE_B),
            unsupported: vec![],
        }),
    ));
    v.push(local_valid(
        "denied-unsupported-option",
        "Denied unsupported-option listing the critical key not understood (key 7).",
        L::Denied(LocalDenied {
            common: rid(9),
            code: DenialCode::Wire(ResultCode::UnsupportedOption),
            reason: None,
            retry_after: None,
            lease: None,
            unsupported: vec![20],
        }),
    ));
    v.push(local_valid(
        "leases",
        "Leases: one live lease with its application information, and the gateway's epoch.",
        L::Wire(Message::Leases(Leases {
            common: rid(5),
            leases: vec![LeaseInfo {
                lease: LEASE_A,
                grants: vec![grant(Protocol::Tcp, 8080, 8080, "192.0.2.10")],
                remaining: 540,
                expires_ms: NOW_MS + 540_000,
                app: Some(AppInfo {
                    name: Some("srv --port 8080".into()),
                    executable: Some("/usr/bin/srv".into()),
                    uid: Some(1000),
                    pid: Some(4242),
                }),
            }],
            epoch: EPOCH,
        })),
    ));
    v.push(local_valid(
        "leases-empty",
        "Leases with none held and no epoch known yet (0).",
        L::Wire(Message::Leases(Leases {
            common: rid(5),
            leases: vec![],
            epoch: 0,
        })),
    ));
    v.push(local_valid(
        "released",
        "Released, once the lease's elements are gone from the host's table.",
        L::Wire(Message::Released(Released {
            common: rid(4),
            lease: LEASE_A,
        })),
    ));
    v.push(local_valid(
        "watching",
        "Watching, the answer to Watch.",
        L::Watching(Watching { common: rid(6) }),
    ));
    v.push(local_valid(
        "status-answer-connected",
        "StatusAnswer of a connected agent: version, gateway, epoch, mirror mode, identity, two leases, local API version 1 (key 11).",
        L::StatusAnswer(StatusAnswer {
            common: rid(8),
            agent_version: "0.1.0".into(),
            gateway: "gw.example.org:4433".into(),
            connected: true,
            epoch: Some(EPOCH),
            mirror_mode: "enforce".into(),
            identity: Some("fwnp://host/web-01".into()),
            leases: 2,
            last_error: None,
            api_version: Some(1),
        }),
    ));
    v.push(local_valid(
        "status-answer-not-connected",
        "StatusAnswer of an agent not connected, saying why (key 10), with no epoch or identity known; key 11 left out, as an agent that predates it does (it implements version 1).",
        L::StatusAnswer(StatusAnswer {
            common: rid(8),
            agent_version: "0.1.0".into(),
            gateway: "gw.example.org:4433".into(),
            connected: false,
            epoch: None,
            mirror_mode: "off".into(),
            identity: None,
            leases: 0,
            last_error: Some("the gateway's certificate does not carry gw.example.org".into()),
            api_version: None,
        }),
    ));

    // --- Events, one of every kind. -------------------------------------------------------
    v.push(local_valid(
        "event-renewed",
        "Event renewed (1), with the time left in milliseconds.",
        L::Event(Event {
            expires_in_ms: Some(599_950),
            ..event(EventKind::Renewed)
        }),
    ));
    v.push(local_valid(
        "event-revoked",
        "Event revoked (2), terminal, with the reason.",
        L::Event(Event {
            reason: Some("operator".into()),
            ..event(EventKind::Revoked)
        }),
    ));
    v.push(local_valid(
        "event-expired",
        "Event expired (3), terminal.",
        L::Event(event(EventKind::Expired)),
    ));
    v.push(local_valid(
        "event-lost",
        "Event lost (4), terminal: the agent ended the lease because its port is no longer the application's (code 1025).",
        L::Event(Event {
            reason: Some("tcp/8080 is no longer bound by the caller".into()),
            code: Some(DenialCode::Local(LocalCode::PortNotOwned)),
            ..event(EventKind::Lost)
        }),
    ));
    v.push(local_valid(
        "event-released",
        "Event released (5), terminal.",
        L::Event(event(EventKind::Released)),
    ));
    v.push(local_valid(
        "event-reopened",
        "Event reopened (6): the new lease id (key 8) and its time left.",
        L::Event(Event {
            expires_in_ms: Some(600_000),
            new_lease: Some(LEASE_B),
            ..event(EventKind::Reopened)
        }),
    ));
    v.push(local_valid(
        "event-gateway-unreachable",
        "Event gateway-unreachable (7), with why; the lease stays valid until its expiry.",
        L::Event(Event {
            reason: Some("no answer".into()),
            ..event(EventKind::GatewayUnreachable)
        }),
    ));
    v.push(local_valid(
        "event-renewal-refused",
        "Event renewal-refused (8), with the time left, the reason and the gateway's code.",
        L::Event(Event {
            expires_in_ms: Some(120_000),
            reason: Some("host no longer in group".into()),
            code: Some(DenialCode::Wire(ResultCode::NotAuthorized)),
            ..event(EventKind::RenewalRefused)
        }),
    ));
    v.push(LocalVector {
        name: "status-unknown-key",
        description: "Status with an unknown key 20, which is ignored.",
        frame: framed(&h("a3 00 18 43 01 08 14 61 78")),
        expect: LocalExpect::Valid(L::Status(Status { common: rid(8) })),
    });

    // --- Frames the agent cannot use. -----------------------------------------------------
    v.push(local_invalid(
        "frame-empty",
        "A header announcing a body of 0 bytes: the agent closes the connection.",
        h("00000000"),
        "frame",
        "empty-frame",
        Answer::Close,
    ));
    v.push(local_invalid(
        "frame-oversized",
        "A header announcing 16385 bytes, one more than allowed: the agent closes the connection without reading further.",
        h("00004001"),
        "frame",
        "frame-too-large",
        Answer::Close,
    ));
    v.push(local_invalid(
        "frame-length-max",
        "A header announcing 2^32-1 bytes: the agent closes the connection.",
        h("ffffffff"),
        "frame",
        "frame-too-large",
        Answer::Close,
    ));
    v.push(local_invalid(
        "frame-truncated",
        "A header announcing 6 bytes followed by 4 and the end of the stream: the frame is incomplete.",
        h("00000006 a2 00 18 43"),
        "frame",
        "truncated-frame",
        Answer::Close,
    ));
    v.push(local_invalid(
        "frame-header-truncated",
        "Two bytes, less than a header, then the end of the stream.",
        h("0000"),
        "frame",
        "truncated-frame",
        Answer::Close,
    ));
    v.push(local_invalid(
        "unknown-message-type",
        "A map of type 99, in neither registry: answered Denied malformed-request with its request id.",
        framed(&h("a2 00 18 63 01 05")),
        "decode",
        "unknown-message-type",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "key-not-unsigned",
        "Status with a text key \"x\": answered Denied malformed-request.",
        framed(&h("a3 00 18 43 01 08 61 78 00")),
        "decode",
        "key-not-unsigned",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "negative-key",
        "Status with the negative key -1: answered Denied malformed-request.",
        framed(&h("a3 00 18 43 01 08 20 00")),
        "decode",
        "key-not-unsigned",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "not-a-map",
        "A body that is an array: no request id to answer, so the agent closes the connection.",
        framed(&h("82 18 43 01")),
        "decode",
        "not-a-map",
        Answer::Close,
    ));
    v.push(local_invalid(
        "body-truncated-cbor",
        "A whole frame whose body is a map of 2 entries holding 1: not well-formed CBOR, closed.",
        framed(&h("a2 00 18 43")),
        "decode",
        "invalid-cbor",
        Answer::Close,
    ));
    v.push(local_invalid(
        "trailing-bytes",
        "A Status followed by one more byte inside the same frame: the map before it still names the request.",
        framed(&h("a2 00 18 43 01 08 00")),
        "decode",
        "trailing-bytes",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "missing-request-id",
        "List without its request id, mandatory on the local API: closed, as there is no id to answer.",
        framed(&h("a1 00 06")),
        "decode",
        "missing-request-id",
        Answer::Close,
    ));
    v.push(local_invalid(
        "wire-only-message",
        "Renew, a FWNP/1 message that is not part of the local API: answered Denied malformed-request.",
        framed(&encode(&Message::Renew(Renew {
            common: rid(3),
            lease: LEASE_A,
            lifetime: Some(600),
        }))),
        "decode",
        "not-local",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "watch-lease-wrong-length",
        "Watch whose lease id has 15 bytes.",
        framed(&h("a3 00 18 40 01 06 03 4f 000102030405060708090a0b0c0d0e")),
        "decode",
        "wrong-type",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "status-unsupported-critical",
        "Status marking an unknown key 20 critical: answered Denied unsupported-option.",
        framed(&h("a4 00 18 43 01 08 02 81 14 14 00")),
        "decode",
        "unsupported-critical",
        Answer::Denied(R::UnsupportedOption),
    ));
    v.push(local_invalid(
        "event-unknown-kind",
        "Event of kind 9, which this version does not define: a client ignores it.",
        framed(&{
            let mut body = encode_body(&LocalMessage::Event(event(EventKind::Expired)));
            let at = body.len() - 1;
            body[at] = 0x09;
            body
        }),
        "decode",
        "out-of-range",
        Answer::Close,
    ));
    v.push(local_invalid(
        "event-missing-lease",
        "Event without its lease id (key 3).",
        framed(&h("a2 00 18 42 04 01")),
        "decode",
        "missing-key",
        Answer::Close,
    ));
    v.push(local_invalid(
        "denied-unknown-code",
        "Denied with code 2000, in neither registry.",
        framed(&h("a3 00 11 01 01 03 19 07 d0")),
        "decode",
        "out-of-range",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "status-critical-empty",
        "Status with an empty critical list (key 2 is [+ uint]).",
        framed(&h("a3 00 18 43 01 08 02 80")),
        "decode",
        "empty-list",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "denied-local-code-unsupported-empty",
        "Denied 1027 whose key 7 (the critical keys not understood) is empty.",
        framed(&h("a4 00 11 01 04 03 19 04 03 07 80")),
        "decode",
        "empty-list",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "event-reason-too-long",
        "Event revoked whose reason has 513 bytes, one more than a reason text may.",
        framed(&encode_body(&LocalMessage::Event(Event {
            reason: Some("r".repeat(513)),
            ..event(EventKind::Revoked)
        }))),
        "decode",
        "text-length",
        Answer::Close,
    ));
    v.push(local_invalid(
        "status-answer-unknown-mirror-mode",
        "StatusAnswer whose mirror mode (key 7) is \"audit\", none of the three modes.",
        framed(&h(
            "a7 00 18 44 01 08 03 65 302e312e30 04 62 6777 05 f5 07 65 6175646974 09 00",
        )),
        "decode",
        "wrong-type",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(local_invalid(
        "status-answer-connected-not-bool",
        "StatusAnswer whose key 5 (connected) is the integer 1.",
        framed(&h(
            "a7 00 18 44 01 08 03 65 302e312e30 04 62 6777 05 01 07 63 6f6666 09 00",
        )),
        "decode",
        "wrong-type",
        Answer::Denied(R::MalformedRequest),
    ));
    v.push(LocalVector {
        name: "event-lost-unknown-code",
        description: "Event lost (4) with code 1030, a local code of a later version: the event stands without its code, and the lease is over (Section 12.3).",
        frame: framed(&{
            let mut body = h("a4 00 18 42 03 50");
            body.extend_from_slice(&LEASE_A.0);
            body.extend_from_slice(&h("04 04 07 19 04 06"));
            body
        }),
        expect: LocalExpect::Valid(L::Event(event(EventKind::Lost))),
    });
    v
}

fn render_local(vector: &LocalVector) -> Json {
    let body = vector.frame.get(4..).unwrap_or_default();
    let diagnostic = match &vector.expect {
        LocalExpect::Invalid { layer: "frame", .. } => {
            "not a whole frame: the header and what follows it".to_owned()
        }
        _ => common::diagnostic(body).unwrap_or_else(|why| format!("not well-formed CBOR: {why}")),
    };
    let outcome = match &vector.expect {
        LocalExpect::Valid(msg) => json!({
            "valid": {
                "decoded": common::local_message_json(msg),
                "canonical_hex": hex::encode(encode_frame(msg)),
            }
        }),
        LocalExpect::Invalid {
            layer,
            error,
            answer,
        } => json!({
            "invalid": {
                "layer": layer,
                "error": error,
                "answer": match answer {
                    Answer::Denied(code) => json!({"denied": code.name()}),
                    Answer::Close => json!("close"),
                },
            }
        }),
    };
    let mut out = json!({
        "name": vector.name,
        "description": vector.description,
        "hex": hex::encode(&vector.frame),
        "diagnostic": diagnostic,
    });
    if let (Json::Object(out), Json::Object(outcome)) = (&mut out, outcome) {
        out.extend(outcome);
    }
    out
}

/// (file name, file contents) of each (name, rendering), numbered from 1 in order.
fn numbered_files(rendered: impl Iterator<Item = (&'static str, Json)>) -> Vec<(String, String)> {
    let mut names = std::collections::HashSet::new();
    rendered
        .enumerate()
        .map(|(i, (name, json))| {
            assert!(names.insert(name), "duplicate name {name}");
            let text = serde_json::to_string_pretty(&json).unwrap() + "\n";
            (format!("{:03}-{name}.json", i + 1), text)
        })
        .collect()
}

/// (file name, file contents) of every local API vector, numbered from 1.
fn local_files() -> Vec<(String, String)> {
    numbered_files(local_vectors().iter().map(|v| (v.name, render_local(v))))
}

#[test]
fn committed_local_vectors_are_current() {
    assert_current(&common::local_vectors_dir(), local_files());
}

// ---------------------------------------------------------------------------------------------
// Scenarios (`spec/vectors/scenarios/`): the steps of Section 11.3 whose answer depends on what
// came before (the Hello, the host's live leases, time), as requests in order, each at a time
// on the gateway's clock, with the answers the spec prescribes, stated here by hand.

/// The host every scenario speaks for, and its one address.
const SCENARIO_IDENTITY: &str = "fwnp://host/web-01";
const SCENARIO_ADDRESS: &str = "192.0.2.10";
/// The policy's lifetime bounds in every scenario: minimum, default, maximum.
const SCENARIO_LIFETIMES: (u32, u32, u32) = (60, 600, 3600);

struct Scenario {
    name: &'static str,
    description: &'static str,
    /// The policy's quota of live leases for the host.
    max_leases: u32,
    /// (gateway clock in ms, request, the answer expected).
    steps: Vec<(u64, Message, Json)>,
}

fn scenario_hello(n: u64) -> Message {
    Message::Hello(Hello {
        common: rid(n),
        versions: vec![1],
        capabilities: Capabilities(0),
        software: None,
    })
}

/// An Open of one TCP port on the host's own address(es), asking `lifetime` seconds.
fn scenario_open(n: u64, port: u16, lifetime: u32) -> Message {
    Message::Open(Open {
        common: rid(n),
        opening: opening(tcp(port, port)),
        lifetime: Some(lifetime),
        app: None,
    })
}

fn welcomed(n: u64, max_leases: u32) -> Json {
    let (min, _, max) = SCENARIO_LIFETIMES;
    json!({
        "type": "welcome",
        "request_id": n,
        "min_lifetime": min,
        "max_lifetime": max,
        "max_leases": max_leases,
    })
}

/// Granted: `lease` names the lease within the scenario (the ids themselves are random).
fn granted_lease(n: u64, lease: &str, lifetime: u32, expires_ms: u64) -> Json {
    json!({
        "type": "granted",
        "request_id": n,
        "lease": lease,
        "lifetime": lifetime,
        "expires_ms": expires_ms,
    })
}

fn denied_with(n: u64, code: ResultCode) -> Json {
    json!({ "type": "denied", "request_id": n, "result_code": code.name() })
}

fn scenarios() -> Vec<Scenario> {
    let t0 = NOW_MS;
    let second = 1000;
    let mut all = Vec::new();

    all.push(Scenario {
        name: "open-before-hello",
        description: "An Open before the connection's Hello is refused hello-required and \
            creates nothing; after the Welcome the same Open is granted.",
        max_leases: 16,
        steps: vec![
            (
                t0,
                scenario_open(1, 443, 600),
                denied_with(1, R::HelloRequired),
            ),
            (t0 + second, scenario_hello(2), welcomed(2, 16)),
            (
                t0 + 2 * second,
                scenario_open(3, 443, 600),
                granted_lease(3, "A", 600, t0 + 2 * second + 600 * second),
            ),
        ],
    });

    // The lease's expiry after each re-open: the later of the one it had and now plus the
    // lifetime this Open is granted (clamped to the policy's bounds first).
    let opened = t0 + second;
    let first_expiry = opened + 600 * second;
    let longer = t0 + 201 * second;
    let longer_expiry = longer + 3600 * second;
    all.push(Scenario {
        name: "reopen-extends-the-lease",
        description: "Opening again exactly what a live lease grants gives that lease back, with \
            the lifetime this Open is granted and the later of the two expiries; another port \
            makes a second lease.",
        max_leases: 16,
        steps: vec![
            (t0, scenario_hello(1), welcomed(1, 16)),
            (
                opened,
                scenario_open(2, 443, 600),
                granted_lease(2, "A", 600, first_expiry),
            ),
            // Now plus 60 s is earlier than the lease's expiry, which stays.
            (
                t0 + 101 * second,
                scenario_open(3, 443, 60),
                granted_lease(3, "A", 60, first_expiry),
            ),
            (
                longer,
                scenario_open(4, 443, 3600),
                granted_lease(4, "A", 3600, longer_expiry),
            ),
            // 30 s is raised to the policy's minimum, 60 s; the expiry stays.
            (
                t0 + 202 * second,
                scenario_open(5, 443, 30),
                granted_lease(5, "A", 60, longer_expiry),
            ),
            (
                t0 + 203 * second,
                scenario_open(6, 444, 600),
                granted_lease(6, "B", 600, t0 + 203 * second + 600 * second),
            ),
        ],
    });

    let a_expires = t0 + 4 * second + 600 * second;
    let after = a_expires + second;
    all.push(Scenario {
        name: "quota-counts-live-leases",
        description: "With a quota of two leases, a third distinct Open is refused \
            quota-exceeded while a re-open of a held lease is still granted; once a lease has \
            expired it no longer counts, and opening its port again makes a new lease.",
        max_leases: 2,
        steps: vec![
            (t0, scenario_hello(1), welcomed(1, 2)),
            (
                t0 + second,
                scenario_open(2, 443, 600),
                granted_lease(2, "A", 600, t0 + second + 600 * second),
            ),
            (
                t0 + 2 * second,
                scenario_open(3, 444, 3600),
                granted_lease(3, "B", 3600, t0 + 2 * second + 3600 * second),
            ),
            (
                t0 + 3 * second,
                scenario_open(4, 445, 600),
                denied_with(4, R::QuotaExceeded),
            ),
            (
                t0 + 4 * second,
                scenario_open(5, 443, 600),
                granted_lease(5, "A", 600, a_expires),
            ),
            (
                after,
                scenario_open(6, 443, 600),
                granted_lease(6, "C", 600, after + 600 * second),
            ),
            (
                after + second,
                scenario_open(7, 445, 600),
                denied_with(7, R::QuotaExceeded),
            ),
        ],
    });
    all
}

fn render_scenario(scenario: &Scenario) -> Json {
    let (min, default, max) = SCENARIO_LIFETIMES;
    let steps: Vec<Json> = scenario
        .steps
        .iter()
        .map(|(at_ms, request, answer)| {
            let bytes = encode(request);
            json!({
                "at_ms": at_ms,
                "request_hex": hex::encode(&bytes),
                "request_diagnostic": common::diagnostic(&bytes).unwrap(),
                "answer": answer,
            })
        })
        .collect();
    json!({
        "name": scenario.name,
        "description": scenario.description,
        "host": {
            "identity": SCENARIO_IDENTITY,
            "addresses": [SCENARIO_ADDRESS],
        },
        "policy": {
            "lifetime": { "min": min, "default": default, "max": max },
            "max_leases": scenario.max_leases,
        },
        "steps": steps,
    })
}

/// (file name, file contents) of every scenario, numbered from 1.
fn scenario_files() -> Vec<(String, String)> {
    numbered_files(scenarios().iter().map(|s| (s.name, render_scenario(s))))
}

#[test]
fn committed_scenarios_are_current() {
    assert_current(&common::scenarios_dir(), scenario_files());
}
