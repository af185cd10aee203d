//! Property tests of the codec: every valid message of every type survives encode then decode
//! unchanged, its encoding is deterministic, and decoding arbitrary or mutated bytes never
//! panics and, when it succeeds, yields a message that re-encodes stably.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fwnp_proto::codec::{DecodeError, decode, encode};
use fwnp_proto::validate::validate_message;
use fwnp_proto::*;
use proptest::prelude::*;

fn common(t: MessageType) -> impl Strategy<Value = Common> {
    // Critical lists only keys the decoder knows, so that the message decodes.
    (
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(0..=t.highest_known_key(), 0..3),
    )
        .prop_map(|(request_id, critical)| Common {
            request_id,
            critical,
        })
}

fn lease_id() -> impl Strategy<Value = LeaseId> {
    any::<[u8; 16]>().prop_map(LeaseId)
}

fn addr_of(family: Family) -> BoxedStrategy<IpAddr> {
    match family {
        Family::Ipv4 => any::<u32>()
            .prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
            .boxed(),
        Family::Ipv6 => any::<u128>()
            .prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
            .boxed(),
    }
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::Ipv4), Just(Family::Ipv6)]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    family().prop_flat_map(addr_of)
}

/// A valid prefix of the family: host bits cleared.
fn prefix_of(family: Family) -> BoxedStrategy<Prefix> {
    match family {
        Family::Ipv4 => (any::<u32>(), 0u8..=32)
            .prop_map(|(a, len)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Prefix {
                    addr: IpAddr::V4(Ipv4Addr::from(a & mask)),
                    len,
                }
            })
            .boxed(),
        Family::Ipv6 => (any::<u128>(), 0u8..=128)
            .prop_map(|(a, len)| {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                Prefix {
                    addr: IpAddr::V6(Ipv6Addr::from(a & mask)),
                    len,
                }
            })
            .boxed(),
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        Just(Protocol::Tcp),
        Just(Protocol::Udp),
        Just(Protocol::Sctp),
        Just(Protocol::UdpLite)
    ]
}

fn ports() -> impl Strategy<Value = PortRange> {
    (1u16..=65535)
        .prop_flat_map(|first| (Just(first), first..=65535))
        .prop_map(|(first, last)| PortRange { first, last })
}

fn app_id() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,64}"
}

/// Text of at most `max_chars` characters of any script (so at most 4 * max_chars bytes).
fn text(max_chars: usize) -> BoxedStrategy<String> {
    proptest::string::string_regex(&format!("\\PC{{0,{max_chars}}}"))
        .unwrap()
        .boxed()
}

fn seconds() -> impl Strategy<Value = u32> {
    prop_oneof![0..=MAX_LIFETIME_SECS, Just(0), Just(MAX_LIFETIME_SECS)]
}

fn app_info() -> impl Strategy<Value = AppInfo> {
    (
        proptest::option::of(text(64)),
        proptest::option::of(text(256)),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(name, executable, uid, pid)| AppInfo {
            name,
            executable,
            uid,
            pid,
        })
}

fn opening() -> impl Strategy<Value = Opening> {
    let target = prop_oneof![
        (protocol(), ports()).prop_map(|(protocol, ports)| Target::Ports { protocol, ports }),
        app_id().prop_map(Target::App),
    ];
    // The host addresses share the family of the prefixes (key 5, when present, is theirs too);
    // with no prefix, an array may hold both families.
    let one_family = family().prop_flat_map(|f| {
        (
            proptest::collection::vec(addr_of(f), 0..4),
            any::<bool>(),
            proptest::collection::vec(prefix_of(f), 0..4),
            Just(f),
        )
            .prop_map(|(mut hosts, with_family, remotes, f)| {
                let mut seen = Vec::new();
                hosts.retain(|h| {
                    !seen.contains(h) && {
                        seen.push(*h);
                        true
                    }
                });
                (hosts, if with_family { Some(f) } else { None }, remotes)
            })
    });
    let both_families = (addr_of(Family::Ipv4), addr_of(Family::Ipv6))
        .prop_map(|(v4, v6)| (vec![v4, v6], None, Vec::new()));
    let placement = prop_oneof![3 => one_family, 1 => both_families];
    (target, placement).prop_map(|(target, (hosts, family, remotes))| Opening {
        target,
        host: HostAddresses::from_addresses(hosts),
        family,
        remotes,
    })
}

fn grant() -> impl Strategy<Value = Grant> {
    (protocol(), ports(), addr(), proptest::option::of(app_id()))
        .prop_flat_map(|(protocol, ports, host, app)| {
            let remotes = proptest::collection::vec(prefix_of(Family::of(host)), 0..3);
            (Just(protocol), Just(ports), Just(host), remotes, Just(app))
        })
        .prop_map(|(protocol, ports, host, remotes, app)| Grant {
            protocol,
            ports,
            host,
            remotes,
            app,
        })
}

fn hello() -> impl Strategy<Value = Message> {
    (
        common(MessageType::Hello),
        proptest::collection::vec(any::<u16>(), 0..4),
        any::<u64>(),
        proptest::option::of(text(32)),
    )
        .prop_map(|(common, mut versions, caps, software)| {
            versions.push(VERSION);
            Message::Hello(Hello {
                common,
                versions,
                capabilities: Capabilities(caps),
                software,
            })
        })
}

fn welcome() -> impl Strategy<Value = Message> {
    (
        common(MessageType::Welcome),
        // A Welcome's version is 1, the only one FWNP/1 defines (spec Section 6.3 rule 13).
        Just(1u16),
        any::<u64>(),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(any::<u32>()),
        ),
        any::<u64>(),
        any::<u64>(),
        "[a-z:/.0-9-]{1,100}",
        proptest::collection::vec(addr(), 0..4),
    )
        .prop_map(
            |(common, version, caps, l, epoch, time_ms, identity, addresses)| {
                Message::Welcome(Welcome {
                    common,
                    version,
                    capabilities: Capabilities(caps),
                    limits: Limits {
                        max_message_size: l.0,
                        max_streams: l.1,
                        min_lifetime: l.2,
                        max_lifetime: l.3,
                        max_leases: l.4,
                    },
                    epoch,
                    time_ms,
                    identity,
                    addresses,
                })
            },
        )
}

fn open() -> impl Strategy<Value = Message> {
    (
        common(MessageType::Open),
        opening(),
        proptest::option::of(seconds()),
        proptest::option::of(app_info()),
    )
        .prop_map(|(common, opening, lifetime, app)| {
            Message::Open(Open {
                common,
                opening,
                lifetime,
                app,
            })
        })
}

fn requests() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello(),
        open(),
        (
            common(MessageType::Renew),
            lease_id(),
            proptest::option::of(seconds())
        )
            .prop_map(|(common, lease, lifetime)| Message::Renew(Renew {
                common,
                lease,
                lifetime
            })),
        (common(MessageType::Release), lease_id())
            .prop_map(|(common, lease)| Message::Release(Release { common, lease })),
        common(MessageType::List).prop_map(|common| Message::List(List { common })),
    ]
}

fn result_code() -> impl Strategy<Value = ResultCode> {
    proptest::sample::select(ResultCode::ALL.to_vec())
}

fn revoke_reason() -> impl Strategy<Value = RevokeReason> {
    (1u64..=4).prop_map(|n| RevokeReason::from_number(n).unwrap())
}

fn lease_info() -> impl Strategy<Value = LeaseInfo> {
    (
        lease_id(),
        proptest::collection::vec(grant(), 1..3),
        any::<u32>(),
        any::<u64>(),
        proptest::option::of(app_info()),
    )
        .prop_map(|(lease, grants, remaining, expires_ms, app)| LeaseInfo {
            lease,
            grants,
            remaining,
            expires_ms,
            app,
        })
}

fn answers() -> impl Strategy<Value = Message> {
    prop_oneof![
        welcome(),
        (
            common(MessageType::Granted),
            lease_id(),
            proptest::collection::vec(grant(), 1..4),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                any::<bool>()
            ),
        )
            .prop_map(
                |(common, lease, grants, (lifetime, expires_ms, renew_after, epoch, narrowed))| {
                    Message::Granted(Granted {
                        common,
                        lease,
                        grants,
                        lifetime,
                        expires_ms,
                        renew_after,
                        epoch,
                        narrowed,
                    })
                }
            ),
        (
            common(MessageType::Denied),
            result_code(),
            proptest::option::of(text(100)),
            proptest::option::of(any::<u32>()),
            proptest::option::of(lease_id()),
            proptest::collection::vec(any::<u64>(), 0..3),
        )
            .prop_map(|(common, code, reason, retry_after, lease, unsupported)| {
                Message::Denied(Denied {
                    common,
                    code,
                    reason,
                    retry_after,
                    lease,
                    unsupported,
                })
            }),
        (
            common(MessageType::Leases),
            proptest::collection::vec(lease_info(), 0..3),
            any::<u64>()
        )
            .prop_map(|(common, leases, epoch)| Message::Leases(Leases {
                common,
                leases,
                epoch
            })),
        (common(MessageType::Released), lease_id())
            .prop_map(|(common, lease)| Message::Released(Released { common, lease })),
    ]
}

fn notices() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            common(MessageType::Revoked),
            lease_id(),
            revoke_reason(),
            proptest::option::of(text(100))
        )
            .prop_map(|(common, lease, reason, text)| {
                Message::Revoked(Revoked {
                    common,
                    lease,
                    reason,
                    text,
                })
            }),
        (common(MessageType::EpochChanged), any::<u64>())
            .prop_map(|(common, epoch)| Message::EpochChanged(EpochChanged { common, epoch })),
        (
            common(MessageType::GoingAway),
            proptest::option::of(any::<u32>()),
            proptest::option::of(text(100)),
        )
            .prop_map(|(common, reconnect_after, reason)| {
                Message::GoingAway(GoingAway {
                    common,
                    reconnect_after,
                    reason,
                })
            }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![requests(), answers(), notices()]
}

fn check_round_trip(msg: &Message) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        validate_message(msg),
        Ok(()),
        "the strategy made an invalid {:?}",
        msg
    );
    let bytes = encode(msg);
    prop_assert!(bytes.len() <= MAX_MESSAGE_SIZE);
    // The encoder writes its bytes directly: they must be what a general CBOR serialiser makes
    // of the same items (definite lengths, shortest heads), as when it went through one.
    let mut serialised = Vec::new();
    ciborium::into_writer(&fwnp_proto::codec::to_value(msg), &mut serialised)
        .expect("serialising into memory");
    prop_assert_eq!(&serialised, &bytes, "not the serialiser's encoding");
    let decoded = decode(&bytes);
    prop_assert_eq!(decoded.as_ref(), Ok(msg));
    prop_assert_eq!(encode(&decoded.unwrap()), bytes, "encoding is not stable");
    Ok(())
}

/// Decoding must not panic; what it accepts must re-encode to something that decodes to the
/// same message and encodes to the same bytes again.
fn check_arbitrary(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(msg) = decode(bytes) {
        let canonical = encode(&msg);
        let again = decode(&canonical);
        prop_assert_eq!(
            again.as_ref(),
            Ok(&msg),
            "re-encoding of an accepted input fails"
        );
        prop_assert_eq!(encode(&again.unwrap()), canonical);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip(msg in requests()) {
        check_round_trip(&msg)?;
    }

    #[test]
    fn answers_round_trip(msg in answers()) {
        check_round_trip(&msg)?;
    }

    #[test]
    fn notices_round_trip(msg in notices()) {
        check_round_trip(&msg)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_arbitrary(&bytes)?;
    }

    #[test]
    fn arbitrary_maps_never_panic(
        // A map header followed by random bytes reaches the field decoding more often.
        header in 0xa0u8..=0xbf,
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![header];
        bytes.extend(rest);
        check_arbitrary(&bytes)?;
    }

    #[test]
    fn mutated_messages_never_panic(
        msg in message(),
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = encode(&msg);
        for (at, byte, op) in edits {
            let len = bytes.len();
            match op {
                0 if len > 0 => bytes[at.index(len)] = byte,
                1 => bytes.insert(at.index(len + 1), byte),
                _ if len > 0 => { bytes.remove(at.index(len)); }
                _ => {}
            }
        }
        check_arbitrary(&bytes)?;
    }

    #[test]
    fn decoder_and_notation_printer_agree_on_well_formedness(
        msg in message(),
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
    ) {
        // Two independent walkers of CBOR: the decoder and the diagnostic-notation printer of
        // the vector tests. Where the decoder stops for a reason of its own (depth, tags, size),
        // the question is moot; otherwise they must agree on what is well-formed.
        let mut bytes = encode(&msg);
        for (at, byte) in edits {
            let len = bytes.len();
            bytes[at.index(len)] = byte;
        }
        let decoded = decode(&bytes);
        let moot = matches!(
            decoded,
            Err(DecodeError::NestingTooDeep { .. } | DecodeError::TagNotAllowed { .. } | DecodeError::TooLarge { .. })
        );
        if !moot {
            let ill_formed = matches!(
                decoded,
                Err(DecodeError::InvalidCbor { .. } | DecodeError::TrailingBytes { .. })
            );
            let printed = common::diagnostic(&bytes);
            prop_assert_eq!(ill_formed, printed.is_err(), "decoder {:?}, printer {:?}", decoded, printed);
        }
    }

    #[test]
    fn truncated_messages_are_refused(msg in message(), cut in any::<proptest::sample::Index>()) {
        let bytes = encode(&msg);
        let cut = cut.index(bytes.len());
        let refused = matches!(decode(&bytes[..cut]), Err(DecodeError::InvalidCbor { .. }));
        prop_assert!(refused, "a prefix of {} bytes of {} was not refused as ill-formed", cut, bytes.len());
    }
}

#[test]
fn every_message_type_is_generated() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let msg = message().new_tree(&mut runner).unwrap().current();
        seen.insert(msg.message_type().number());
    }
    assert_eq!(seen.len(), 13, "types generated: {seen:?}");
}
