//! The gateway's request path without sockets: the request core of `fwnp_proto` deciding with
//! the gateway's real compiled policy, in simulated time. Every decision that needs no
//! transport is tested here (Hello rules, validation, ownership, quotas, lifetimes, the size
//! bound, the Release replay rule, what a failing kernel or store turns an answer into, the
//! order of the effects); `tests/service.rs` keeps what needs QUIC and certificates.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::{HOST_A, HOST_B, POLICY, app, common, denied, granted, hello_msg, open_msg, tcp};
use fwnp_gateway::policy::Policy;
use fwnp_proto::gateway::request::{
    Asked, Audit, ConnectionState, CoreConfig, Decide, Decision, Effect, EffectFailure, HostLimits,
    Objection, Peer, RequestCore, Step, Write,
};
use fwnp_proto::{
    Capabilities, LeaseId, MAX_LIFETIME_SECS, MAX_MESSAGE_SIZE, Message, ResultCode, RevokeReason,
    codec,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

const START_MS: u64 = 1_700_000_000_000;
const EPOCH: u64 = 0x0123_4567_89ab_cdef;

/// The core, the policy, simulated time and an RNG.
struct Gateway {
    core: RequestCore,
    policy: Policy,
    now_ms: u64,
    rng: StdRng,
}

/// One connection of a host.
struct Host {
    identity: String,
    addresses: Vec<IpAddr>,
    state: ConnectionState,
    next_id: u64,
}

/// Which effect fails (the first it matches), and how.
type Failing = (fn(&Effect) -> bool, EffectFailure);

/// What one request came to: the answer, and every effect carried out for it, in order.
struct Outcome {
    answer: Message,
    effects: Vec<Effect>,
}

impl Gateway {
    fn new(policy: &str) -> Self {
        Gateway {
            core: RequestCore::new(CoreConfig {
                epoch: EPOCH,
                max_streams: 16,
                kill_connections: true,
            }),
            policy: Policy::from_str(policy, "test").expect("the test policy compiles"),
            now_ms: START_MS,
            rng: StdRng::seed_from_u64(7),
        }
    }

    fn host(&self, name: &str, addresses: &[IpAddr]) -> Host {
        Host {
            identity: format!("fwnp://host/{name}"),
            addresses: addresses.to_vec(),
            state: ConnectionState::default(),
            next_id: 100,
        }
    }

    /// A host that said Hello.
    fn welcomed(&mut self, name: &str, addresses: &[IpAddr]) -> Host {
        let mut host = self.host(name, addresses);
        let answer = self.request(&mut host, &hello_msg(Some(1), &[1], Capabilities::ALL));
        assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
        host
    }

    /// The core's step for `bytes`, before any effect is carried out.
    fn step(&mut self, host: &Host, bytes: &[u8]) -> Step {
        let peer = Peer {
            identity: Some(&host.identity),
            no_identity: "",
            remote: SocketAddr::new(host.addresses.first().copied().unwrap_or(HOST_A), 40000),
            addresses: &host.addresses,
        };
        self.core.handle(
            self.now_ms,
            host.state,
            &peer,
            bytes,
            &self.policy,
            &mut self.rng,
        )
    }

    /// Sends `bytes`; the effects succeed, or the first of kind `fail` fails with `failure`.
    fn exchange_failing(
        &mut self,
        host: &mut Host,
        bytes: &[u8],
        fail: Option<Failing>,
    ) -> Outcome {
        let mut carried = Vec::new();
        let answer = match self.step(host, bytes) {
            Step::Answer(answer) => answer,
            Step::Pending(pending) => {
                let mut outcome = Ok(());
                for effect in pending.effects() {
                    if let Some((matches, failure)) = &fail
                        && matches(effect)
                    {
                        outcome = Err(failure.clone());
                        break;
                    }
                    carried.push(effect.clone());
                }
                self.core.finish(self.now_ms, pending, outcome)
            }
        };
        for effect in &answer.effects {
            if let Effect::Welcomed { .. } = effect {
                host.state.welcomed = true;
            }
        }
        carried.extend(answer.effects);
        Outcome {
            answer: answer.message,
            effects: carried,
        }
    }

    fn exchange(&mut self, host: &mut Host, bytes: &[u8]) -> Outcome {
        self.exchange_failing(host, bytes, None)
    }

    fn request(&mut self, host: &mut Host, message: &Message) -> Message {
        self.exchange(host, &codec::encode(message)).answer
    }

    fn open(
        &mut self,
        host: &mut Host,
        opening: fwnp_proto::Opening,
        life: Option<u32>,
    ) -> Message {
        let id = host.id();
        self.request(host, &open_msg(Some(id), opening, life))
    }

    fn renew(&mut self, host: &mut Host, lease: LeaseId, lifetime: Option<u32>) -> Message {
        let id = host.id();
        self.request(
            host,
            &Message::Renew(fwnp_proto::Renew {
                common: common(Some(id)),
                lease,
                lifetime,
            }),
        )
    }

    fn release(&mut self, host: &mut Host, lease: LeaseId) -> Message {
        let id = host.id();
        self.request(
            host,
            &Message::Release(fwnp_proto::Release {
                common: common(Some(id)),
                lease,
            }),
        )
    }

    fn list(&mut self, host: &mut Host) -> fwnp_proto::Leases {
        let id = host.id();
        match self.request(
            host,
            &Message::List(fwnp_proto::List {
                common: common(Some(id)),
            }),
        ) {
            Message::Leases(leases) => leases,
            other => panic!("expected Leases, got {other:?}"),
        }
    }
}

impl Host {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

fn commits(effects: &[Effect]) -> Vec<&Write> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Commit(writes) => Some(writes.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn refusal_audit(effects: &[Effect]) -> Option<&Audit> {
    effects.iter().find_map(|e| match e {
        Effect::Audit(record) => Some(&record.what),
        _ => None,
    })
}

#[test]
fn hello_is_answered_with_welcome_naming_identity_addresses_epoch_and_limits() {
    let mut gw = Gateway::new(POLICY);
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    let mut host = gw.host("web-01", &[HOST_A, v6]);
    let out = gw.exchange(
        &mut host,
        &codec::encode(&hello_msg(Some(1), &[1], Capabilities::NOTICES)),
    );
    let Message::Welcome(welcome) = out.answer else {
        panic!("expected Welcome, got {:?}", out.answer);
    };
    assert_eq!(welcome.version, 1);
    assert_eq!(welcome.identity, "fwnp://host/web-01");
    assert_eq!(welcome.addresses, vec![HOST_A, v6]);
    assert_eq!(welcome.epoch, EPOCH);
    assert_eq!(welcome.common.request_id, Some(1));
    assert_eq!(welcome.time_ms, START_MS, "the gateway's time, as given");
    assert_eq!(welcome.limits.max_message_size, MAX_MESSAGE_SIZE as u32);
    assert_eq!(welcome.limits.max_streams, 16);
    assert_eq!(welcome.limits.min_lifetime, 1);
    assert_eq!(welcome.limits.max_lifetime, 3600);
    assert_eq!(welcome.limits.max_leases, Some(3));
    assert!(!welcome.capabilities.has(Capabilities::THIRD_PARTY));
    // The connection is welcomed and takes notices: what the driver records.
    assert_eq!(out.effects, vec![Effect::Welcomed { notices: true }]);
    assert!(host.state.welcomed);

    // A balancer learns that it has third-party rights; a Hello without NOTICES gets none.
    let mut lb = gw.host("lb-01", &[HOST_B]);
    let out = gw.exchange(&mut lb, &codec::encode(&hello_msg(Some(2), &[1], 0)));
    let Message::Welcome(welcome) = out.answer else {
        panic!("expected Welcome");
    };
    assert!(welcome.capabilities.has(Capabilities::THIRD_PARTY));
    assert_eq!(out.effects, vec![Effect::Welcomed { notices: false }]);
}

#[test]
fn welcome_announces_the_gateways_capabilities_whatever_the_hello_offers() {
    let mut gw = Gateway::new(POLICY);
    let gateway_offers = Capabilities::PORT_RANGES
        | Capabilities::REMOTE_PREFIXES
        | Capabilities::APPLICATIONS
        | Capabilities::NOTICES;
    // Whatever a client announces (its bits are informational, spec section 14), Welcome says
    // what the gateway supports and offers this host: here everything but THIRD_PARTY.
    for offered in [
        0,
        Capabilities::THIRD_PARTY,
        Capabilities::NOTICES,
        Capabilities::ALL,
        1 << 40,
    ] {
        let mut host = gw.host("web-01", &[HOST_A]);
        match gw.request(&mut host, &hello_msg(Some(9), &[1], offered)) {
            Message::Welcome(w) => assert_eq!(
                w.capabilities,
                Capabilities(gateway_offers),
                "Hello offered {offered:#x}"
            ),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
}

#[test]
fn hello_picks_version_one_from_a_list_and_refuses_one_without_it() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.host("web-01", &[HOST_A]);
    match gw.request(&mut host, &hello_msg(Some(1), &[7, 1, 3], 0)) {
        Message::Welcome(w) => assert_eq!(w.version, 1),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut other = gw.host("web-02", &[HOST_B]);
    let out = gw.exchange(&mut other, &codec::encode(&hello_msg(Some(2), &[2, 3], 0)));
    let d = denied(out.answer);
    assert_eq!(d.code, ResultCode::UnsupportedVersion);
    assert!(!other.state.welcomed, "a refused Hello welcomes nothing");
    // A Hello offering very many versions still gets a Denied a client can decode.
    let many: Vec<u16> = (2..400).collect();
    let out = gw.exchange(&mut other, &codec::encode(&hello_msg(Some(3), &many, 0)));
    let bytes = codec::encode(&out.answer);
    assert_eq!(
        denied(codec::decode(&bytes).expect("decodes")).code,
        ResultCode::UnsupportedVersion
    );
}

#[test]
fn requests_before_hello_are_refused_and_a_second_hello_is_malformed() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.host("web-01", &[HOST_A]);
    for request in [
        open_msg(Some(1), tcp(7001), None),
        Message::List(fwnp_proto::List {
            common: common(Some(2)),
        }),
        Message::Release(fwnp_proto::Release {
            common: common(Some(3)),
            lease: LeaseId([7; 16]),
        }),
        // Invalid as well (port 0): the missing Hello is named first (spec 11.3, steps 4, 5).
        open_msg(Some(4), tcp(0), None),
        // Out of range as well (more than seven days).
        open_msg(Some(5), tcp(7001), Some(MAX_LIFETIME_SECS + 1)),
    ] {
        let out = gw.exchange(&mut host, &codec::encode(&request));
        assert!(commits(&out.effects).is_empty(), "nothing is written");
        let d = denied(out.answer);
        assert_eq!(d.code, ResultCode::HelloRequired, "{d:?}");
        assert_eq!(d.common.request_id, request.common().request_id);
    }
    assert!(gw.core.book().is_empty(), "nothing was opened");

    let answer = gw.request(&mut host, &hello_msg(Some(49), &[1], 0));
    assert!(matches!(answer, Message::Welcome(_)));
    let d = denied(gw.request(&mut host, &hello_msg(Some(50), &[1], Capabilities::ALL)));
    assert_eq!(d.code, ResultCode::MalformedRequest);
    assert_eq!(d.common.request_id, Some(50));
    // The connection keeps working after the refused second Hello.
    granted(gw.open(&mut host, tcp(7001), None));
}

/// Rule 10 of spec 6.3: a message that is not a request, on a request stream, is
/// malformed-request, before its critical keys (unsupported-option), its own keys, and the
/// connection's state (hello-required) are looked at (spec 6.6, 11.3 step 3).
#[test]
fn a_message_that_is_not_a_request_is_malformed_before_anything_else() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.host("web-01", &[HOST_A]);
    // Before Hello: {0: 33, 1: 9, 3: 5}, an EpochChanged.
    let d = denied(
        gw.exchange(&mut host, &[0xa3, 0x00, 0x18, 0x21, 0x01, 0x09, 0x03, 0x05])
            .answer,
    );
    assert_eq!(d.code, ResultCode::MalformedRequest, "{d:?}");
    assert_eq!(d.common.request_id, Some(9));
    assert!(matches!(
        gw.request(&mut host, &hello_msg(Some(1), &[1], 0)),
        Message::Welcome(_)
    ));
    // {0: 2, 1: 1, 2: [64]}: a Welcome naming an unknown critical key.
    let d = denied(
        gw.exchange(
            &mut host,
            &[0xa3, 0x00, 0x02, 0x01, 0x01, 0x02, 0x81, 0x18, 0x40],
        )
        .answer,
    );
    assert_eq!(d.code, ResultCode::MalformedRequest, "{d:?}");
    assert!(d.unsupported.is_empty(), "{d:?}");
    // {0: 16, 1: 2, 3: h'00..', 4: [{}]}: a Granted whose grant is empty.
    let mut granted_bytes = vec![0xa4, 0x00, 0x10, 0x01, 0x02, 0x03, 0x50];
    granted_bytes.extend_from_slice(&[0; 16]);
    granted_bytes.extend_from_slice(&[0x04, 0x81, 0xa0]);
    let d = denied(gw.exchange(&mut host, &granted_bytes).answer);
    assert_eq!(d.code, ResultCode::MalformedRequest, "{d:?}");
    assert_eq!(d.common.request_id, Some(2));
}

#[test]
fn a_certificate_naming_no_identity_gets_not_authorized() {
    let mut gw = Gateway::new(POLICY);
    let addresses = [HOST_A];
    let peer = Peer {
        identity: None,
        no_identity: "no URI or DNS SAN",
        remote: SocketAddr::new(HOST_A, 40000),
        addresses: &addresses,
    };
    let bytes = codec::encode(&hello_msg(Some(3), &[1], 0));
    let Step::Answer(answer) = gw.core.handle(
        START_MS,
        ConnectionState::default(),
        &peer,
        &bytes,
        &gw.policy,
        &mut gw.rng,
    ) else {
        panic!("refused at once");
    };
    let d = denied(answer.message);
    assert_eq!(d.code, ResultCode::NotAuthorized);
    assert_eq!(d.common.request_id, Some(3));
    assert!(d.reason.is_some_and(|r| r.contains("no URI or DNS SAN")));

    // Every request, even one that does not decode (spec 4.1; 11.3 step 3): who asks comes
    // before what is asked.
    let mut undecodable = codec::encode(&open_msg(Some(4), tcp(7001), None));
    undecodable.push(0xff);
    for bytes in [undecodable, vec![0xa1, 0x00]] {
        let Step::Answer(answer) = gw.core.handle(
            START_MS,
            ConnectionState::default(),
            &peer,
            &bytes,
            &gw.policy,
            &mut gw.rng,
        ) else {
            panic!("refused at once");
        };
        assert_eq!(denied(answer.message).code, ResultCode::NotAuthorized);
    }
}

#[test]
fn a_grant_waits_for_the_kernel_then_the_store_and_is_answered_only_then() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let bytes = codec::encode(&open_msg(Some(5), tcp(7001), None));
    let Step::Pending(pending) = gw.step(&host, &bytes) else {
        panic!("an Open is not answered before its effects");
    };
    let lease = pending.lease();
    match pending.effects() {
        [
            Effect::Hold {
                lease: held,
                grants,
                expires_ms,
            },
            Effect::Commit(writes),
        ] => {
            assert_eq!(*held, lease);
            assert_eq!(grants.len(), 1);
            assert_eq!(grants[0].host, HOST_A);
            assert_eq!(*expires_ms, START_MS + 600_000);
            assert!(matches!(&writes[0], Write::Insert { lease: l, .. } if l.id == lease));
            assert!(
                matches!(&writes[1], Write::Audit(r) if matches!(r.what, Audit::Granted { .. }))
            );
        }
        other => panic!("kernel then store expected: {other:?}"),
    }
    let answer = gw.core.finish(gw.now_ms, pending, Ok(()));
    let g = granted(answer.message);
    assert_eq!((g.lease, g.epoch, g.lifetime), (lease, EPOCH, 600));
    assert_eq!(answer.label, Some("granted"));

    // A repeated Open that makes the lease longer writes the store first, then the kernel.
    gw.now_ms += 60_000;
    let bytes = codec::encode(&open_msg(Some(6), tcp(7001), None));
    let Step::Pending(pending) = gw.step(&host, &bytes) else {
        panic!("pending");
    };
    assert!(
        matches!(pending.effects(), [Effect::Commit(_), Effect::Hold { .. }]),
        "{:?}",
        pending.effects()
    );
    assert_eq!(
        granted(gw.core.finish(gw.now_ms, pending, Ok(())).message).lease,
        lease
    );
    // A renewal that shortens it goes to the kernel first.
    let id = host.id();
    let bytes = codec::encode(&Message::Renew(fwnp_proto::Renew {
        common: common(Some(id)),
        lease,
        lifetime: Some(60),
    }));
    let Step::Pending(pending) = gw.step(&host, &bytes) else {
        panic!("pending");
    };
    assert!(matches!(
        pending.effects(),
        [Effect::Hold { .. }, Effect::Commit(_)]
    ));
}

#[test]
fn a_failing_kernel_or_store_turns_the_grant_into_no_resources_and_gives_the_lease_back() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let is_hold: fn(&Effect) -> bool = |e| matches!(e, Effect::Hold { .. });
    let is_commit: fn(&Effect) -> bool = |e| matches!(e, Effect::Commit(_));
    for (fail, failure, what) in [
        (
            is_hold,
            EffectFailure::Kernel("no buffer space".into()),
            "kernel",
        ),
        (is_commit, EffectFailure::Store("disk full".into()), "store"),
    ] {
        let bytes = codec::encode(&open_msg(Some(8), tcp(7001), None));
        let out = gw.exchange_failing(&mut host, &bytes, Some((fail, failure)));
        let d = denied(out.answer);
        assert_eq!(d.code, ResultCode::NoResources, "{what}");
        assert_eq!(d.retry_after, Some(5));
        assert!(d.reason.is_some_and(|r| r.contains(what)), "{what}");
        assert!(gw.core.book().is_empty(), "the book gave the lease back");
        // The elements taken are given up again, and the refusal is audited.
        assert!(
            out.effects.iter().any(|e| matches!(
                e,
                Effect::Unhold {
                    kill_connections: false,
                    ..
                }
            )),
            "{what}: {:?}",
            out.effects
        );
        assert!(matches!(
            refusal_audit(&out.effects),
            Some(Audit::Refused {
                code: ResultCode::NoResources,
                ..
            })
        ));
    }
    // The quota was not spent on the failures.
    for port in [7001, 7002, 7003] {
        granted(gw.open(&mut host, tcp(port), None));
    }
}

/// A renewal whose first effect fails was taken by neither the kernel nor the store, and the
/// book gives it back; one whose second effect fails keeps what the first put in force. Either
/// is answered no-resources with a retry-after (spec Section 12.1 for a store that refuses).
#[test]
fn a_failing_renewal_is_no_resources_and_a_lease_revoked_meanwhile_is_unknown() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let lease = granted(gw.open(&mut host, tcp(7001), None)).lease;
    let renew = |id, lifetime| {
        codec::encode(&Message::Renew(fwnp_proto::Renew {
            common: common(Some(id)),
            lease,
            lifetime: Some(lifetime),
        }))
    };
    let is_hold: fn(&Effect) -> bool = |e| matches!(e, Effect::Hold { .. });
    let is_commit: fn(&Effect) -> bool = |e| matches!(e, Effect::Commit(_));
    let expiry = |gw: &mut Gateway, host: &mut Host| gw.list(host).leases[0].expires_ms;
    let opened = expiry(&mut gw, &mut host);
    let (shorter, longer) = (opened - 540_000, opened + 3_000_000);
    let failing = |gw: &mut Gateway, host: &mut Host, id, lifetime, failing: Failing| {
        denied(
            gw.exchange_failing(host, &renew(id, lifetime), Some(failing))
                .answer,
        )
    };

    // Shortening: the kernel first. It refuses: nothing changed.
    let d = failing(
        &mut gw,
        &mut host,
        20,
        60,
        (is_hold, EffectFailure::Kernel("busy".into())),
    );
    assert_eq!(
        (d.code, d.retry_after, d.lease),
        (ResultCode::NoResources, Some(1), Some(lease))
    );
    assert_eq!(expiry(&mut gw, &mut host), opened);
    // Lengthening: the store first. It refuses: nothing changed.
    let d = failing(
        &mut gw,
        &mut host,
        21,
        3600,
        (is_commit, EffectFailure::Store("no quorum".into())),
    );
    assert_eq!((d.code, d.retry_after), (ResultCode::NoResources, Some(5)));
    assert_eq!(expiry(&mut gw, &mut host), opened);
    // Lengthening, the store took it and the kernel refused: the book holds the store's.
    let d = failing(
        &mut gw,
        &mut host,
        22,
        3600,
        (is_hold, EffectFailure::Kernel("busy".into())),
    );
    assert_eq!((d.code, d.retry_after), (ResultCode::NoResources, Some(1)));
    assert_eq!(expiry(&mut gw, &mut host), longer);
    // Shortening, the kernel took it and the store refused: the stored lease keeps its
    // expiry, so the book gives the renewal back and the kernel's element is put back to it
    // (spec 12.1: the opening closes at its expiry, not earlier).
    let out = gw.exchange_failing(
        &mut host,
        &renew(23, 60),
        Some((is_commit, EffectFailure::Store("locked".into()))),
    );
    let restored: Vec<_> = out
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Hold {
                lease: l,
                expires_ms,
                ..
            } if *l == lease => Some(*expires_ms),
            _ => None,
        })
        .collect();
    let d = denied(out.answer);
    assert_eq!((d.code, d.retry_after), (ResultCode::NoResources, Some(5)));
    // The renewal's own Hold, which the kernel took, then the one that puts it back.
    assert_eq!(
        restored,
        vec![shorter, longer],
        "the kernel's element is put back"
    );
    assert_eq!(expiry(&mut gw, &mut host), longer);

    let d = failing(
        &mut gw,
        &mut host,
        24,
        60,
        (is_hold, EffectFailure::LeaseEnded),
    );
    assert_eq!(d.code, ResultCode::UnknownLease);
}

/// An Open matching a live lease extends it: when the extension's first effect fails, the
/// book gives the lease back as it was (spec 11.2: the lifetime last granted is that of the
/// last Granted sent), so a later Renew without a lifetime renews for the lifetime granted.
#[test]
fn a_failing_extension_by_an_identical_open_leaves_the_lease_as_it_was() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let first = granted(gw.open(&mut host, tcp(7001), Some(600)));
    let opened = gw.list(&mut host).leases[0].expires_ms;
    let is_commit: fn(&Effect) -> bool = |e| matches!(e, Effect::Commit(_));
    let again = codec::encode(&open_msg(Some(30), tcp(7001), Some(3600)));
    let out = gw.exchange_failing(
        &mut host,
        &again,
        Some((is_commit, EffectFailure::Store("no quorum".into()))),
    );
    let d = denied(out.answer);
    assert_eq!((d.code, d.retry_after), (ResultCode::NoResources, Some(5)));
    assert_eq!(gw.list(&mut host).leases[0].expires_ms, opened);
    let renewed = granted(gw.request(
        &mut host,
        &Message::Renew(fwnp_proto::Renew {
            common: common(Some(31)),
            lease: first.lease,
            lifetime: None,
        }),
    ));
    assert_eq!((renewed.lease, renewed.lifetime), (first.lease, 600));
}

/// A cluster store that refuses a new lease over the host's quota as the cluster counts it
/// (another member granted the last places first): the Open is quota-exceeded, not a
/// transient no-resources, and the lease is taken out again (spec 12.1, 11.3 step 11).
#[test]
fn a_quota_refused_by_the_cluster_store_is_quota_exceeded() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let is_commit: fn(&Effect) -> bool = |e| matches!(e, Effect::Commit(_));
    let out = gw.exchange_failing(
        &mut host,
        &codec::encode(&open_msg(Some(40), tcp(7001), None)),
        Some((
            is_commit,
            EffectFailure::QuotaExceeded(
                "web-01 holds 2 live leases across the cluster, at most 2".into(),
            ),
        )),
    );
    assert!(
        out.effects
            .iter()
            .any(|e| matches!(e, Effect::Unhold { .. })),
        "the kernel's element is taken back: {:?}",
        out.effects
    );
    let d = denied(out.answer);
    assert_eq!((d.code, d.retry_after), (ResultCode::QuotaExceeded, None));
    assert!(
        d.reason
            .as_deref()
            .is_some_and(|r| r.contains("across the cluster")),
        "{d:?}"
    );
    assert!(gw.core.book().is_empty());
}

#[test]
fn only_the_owner_may_renew_release_or_list_a_lease() {
    let mut gw = Gateway::new(POLICY);
    let mut a = gw.welcomed("web-a", &[HOST_A]);
    let mut b = gw.welcomed("web-b", &[HOST_B]);
    let lease = granted(gw.open(&mut a, tcp(7100), None)).lease;

    assert_eq!(
        denied(gw.renew(&mut b, lease, None)).code,
        ResultCode::UnknownLease
    );
    let release = denied(gw.release(&mut b, lease));
    assert_eq!(release.code, ResultCode::UnknownLease);
    // Indistinguishable from a lease that does not exist.
    let missing = denied(gw.release(&mut b, LeaseId([0x5a; 16])));
    assert_eq!(missing.code, release.code);
    assert_eq!(missing.reason, release.reason);
    assert!(
        gw.list(&mut b).leases.is_empty(),
        "B does not see A's lease"
    );

    assert_eq!(gw.list(&mut a).leases.len(), 1);
    granted(gw.renew(&mut a, lease, None));
    assert!(matches!(gw.release(&mut a, lease), Message::Released(_)));
}

#[test]
fn denied_by_policy_names_the_rule_in_the_answer_and_the_audit() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let out = gw.exchange(&mut host, &codec::encode(&open_msg(Some(3), tcp(23), None)));
    let d = denied(out.answer);
    assert_eq!(d.code, ResultCode::DeniedByPolicy);
    assert!(d.reason.is_some_and(|r| r.contains("no-telnet")));
    match refusal_audit(&out.effects) {
        Some(Audit::Refused {
            identity,
            code,
            rule,
            request: Asked::Open(open),
            ..
        }) => {
            assert_eq!(identity.as_deref(), Some("fwnp://host/web-01"));
            assert_eq!(*code, ResultCode::DeniedByPolicy);
            assert_eq!(rule.as_deref(), Some("no-telnet"));
            assert_eq!(open.opening, tcp(23));
        }
        other => panic!("expected the refusal's record, got {other:?}"),
    }
    assert_eq!(
        denied(gw.open(&mut host, tcp(9999), None)).code,
        ResultCode::DeniedByPolicy
    );
    assert!(gw.list(&mut host).leases.is_empty());
}

#[test]
fn lifetimes_above_seven_days_are_out_of_range() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let d = denied(gw.open(&mut host, tcp(7001), Some(MAX_LIFETIME_SECS + 1)));
    assert_eq!(d.code, ResultCode::LifetimeOutOfRange);
    // Exactly seven days is in range and clamped by policy.
    let g = granted(gw.open(&mut host, tcp(7001), Some(MAX_LIFETIME_SECS)));
    assert_eq!(g.lifetime, 3600);
    let d = denied(gw.renew(&mut host, g.lease, Some(MAX_LIFETIME_SECS + 1)));
    assert_eq!(d.code, ResultCode::LifetimeOutOfRange);
    // So is one too large for 32 bits: it is still a lifetime above the maximum.
    let mut value: ciborium::Value =
        ciborium::from_reader(codec::encode(&open_msg(Some(91), tcp(7003), None)).as_slice())
            .unwrap();
    if let ciborium::Value::Map(entries) = &mut value {
        entries.push((
            ciborium::Value::Integer(4.into()),
            ciborium::Value::Integer((1u64 << 32).into()),
        ));
    }
    let mut too_long = Vec::new();
    ciborium::into_writer(&value, &mut too_long).unwrap();
    let d = denied(gw.exchange(&mut host, &too_long).answer);
    assert_eq!(
        (d.code, d.common.request_id),
        (ResultCode::LifetimeOutOfRange, Some(91))
    );
    // 0 asks for the default.
    assert_eq!(
        granted(gw.open(&mut host, tcp(7002), Some(0))).lifetime,
        600
    );
}

#[test]
fn the_quota_counts_new_leases_only() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let first = granted(gw.open(&mut host, tcp(7001), None)).lease;
    granted(gw.open(&mut host, tcp(7002), None));
    granted(gw.open(&mut host, tcp(7003), None));
    assert_eq!(
        denied(gw.open(&mut host, tcp(7004), None)).code,
        ResultCode::QuotaExceeded
    );
    // Re-opening a held lease is not a new lease: still granted at the quota.
    assert_eq!(granted(gw.open(&mut host, tcp(7001), None)).lease, first);
    // Releasing one makes room.
    assert!(matches!(gw.release(&mut host, first), Message::Released(_)));
    granted(gw.open(&mut host, tcp(7004), None));
    // The quota is per host.
    let mut other = gw.welcomed("web-02", &[HOST_B]);
    granted(gw.open(&mut other, tcp(7001), None));
}

#[test]
fn mapped_addresses_and_empty_remote_lists_are_malformed_options() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let mut mapped = tcp(7001);
    mapped.host = fwnp_proto::HostAddresses::One("::ffff:192.0.2.10".parse().unwrap());
    assert_eq!(
        denied(gw.open(&mut host, mapped, None)).code,
        ResultCode::MalformedOption
    );
    let mut mapped_remote = tcp(7002);
    mapped_remote.remotes = vec![fwnp_proto::Prefix {
        addr: "::ffff:198.51.100.0".parse().unwrap(),
        len: 120,
    }];
    assert_eq!(
        denied(gw.open(&mut host, mapped_remote, None)).code,
        ResultCode::MalformedOption
    );
    let mut empty = tcp(7003);
    empty.remotes = Vec::new();
    let mut value: ciborium::Value =
        ciborium::from_reader(codec::encode(&open_msg(Some(90), empty, None)).as_slice()).unwrap();
    let opening = value
        .as_map_mut()
        .and_then(|m| {
            m.iter_mut()
                .find(|(k, _)| *k == ciborium::Value::Integer(3.into()))
        })
        .and_then(|(_, v)| v.as_map_mut())
        .expect("an Open has an opening map");
    opening.push((
        ciborium::Value::Integer(6.into()),
        ciborium::Value::Array(vec![]),
    ));
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    let out = gw.exchange(&mut host, &bytes);
    let d = denied(out.answer);
    assert_eq!(
        (d.code, d.common.request_id),
        (ResultCode::MalformedOption, Some(90))
    );
    assert!(gw.core.book().is_empty(), "nothing was opened");
}

#[test]
fn undecodable_bytes_are_denied_with_their_request_id_and_audited() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    // A lifetime that is text, not a number.
    let mut value: ciborium::Value =
        ciborium::from_reader(codec::encode(&open_msg(Some(77), tcp(7001), Some(60))).as_slice())
            .unwrap();
    for (key, v) in value.as_map_mut().expect("a map") {
        if *key == ciborium::Value::Integer(4.into()) {
            *v = ciborium::Value::Text("sixty".into());
        }
    }
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    let out = gw.exchange(&mut host, &bytes);
    let d = denied(out.answer);
    assert_eq!(d.common.request_id, Some(77));
    assert!(matches!(
        refusal_audit(&out.effects),
        Some(Audit::Refused { request: Asked::Other, reason, .. }) if reason.starts_with("undecodable request")
    ));
}

#[test]
fn a_repeated_release_gets_the_first_answer_within_the_window_only() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let lease = granted(gw.open(&mut host, tcp(7001), None)).lease;
    let release = codec::encode(&Message::Release(fwnp_proto::Release {
        common: common(Some(4242)),
        lease,
    }));
    let first = gw.exchange(&mut host, &release);
    assert!(matches!(first.answer, Message::Released(_)));
    assert!(
        commits(&first.effects)
            .iter()
            .any(|w| matches!(w, Write::End { .. }))
    );
    // A retry (same id, same bytes): the same answer, and nothing is done twice.
    let second = gw.exchange(&mut host, &release);
    assert_eq!(second.answer, first.answer);
    assert!(second.effects.is_empty());
    // Also on another connection of the same identity.
    let mut again = gw.welcomed("web-01", &[HOST_A]);
    assert_eq!(gw.exchange(&mut again, &release).answer, first.answer);
    // The same id with other content is a new request.
    let other = codec::encode(&Message::Renew(fwnp_proto::Renew {
        common: common(Some(4242)),
        lease,
        lifetime: None,
    }));
    assert_eq!(
        denied(gw.exchange(&mut host, &other).answer).code,
        ResultCode::UnknownLease
    );
    // Another identity is not answered from this host's memory.
    let mut b = gw.welcomed("web-02", &[HOST_B]);
    assert_eq!(
        denied(gw.exchange(&mut b, &release).answer).code,
        ResultCode::UnknownLease
    );
    // After the window the memory is gone.
    gw.now_ms += fwnp_proto::gateway::request::RELEASE_REPLAY_WINDOW_MS;
    assert_eq!(
        denied(gw.exchange(&mut host, &release).answer).code,
        ResultCode::UnknownLease
    );
}

#[test]
fn a_grant_that_would_exceed_the_size_limit_is_denied_instead() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    // 1200 remote prefixes fit in a request; the https application doubles them in the grant.
    let mut opening = app("https");
    opening.remotes = (0..1200u32)
        .map(|i| fwnp_proto::Prefix {
            addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))),
            len: 24,
        })
        .collect();
    let request = codec::encode(&open_msg(Some(5), opening, None));
    assert!(request.len() <= MAX_MESSAGE_SIZE);
    let out = gw.exchange(&mut host, &request);
    assert!(codec::encode(&out.answer).len() <= MAX_MESSAGE_SIZE);
    let d = denied(out.answer);
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
    assert!(gw.core.book().is_empty(), "no lease is left behind");
}

#[test]
fn a_renewal_revokes_a_lease_the_current_policy_no_longer_allows() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let lease = granted(gw.open(
        &mut host,
        fwnp_proto::Opening {
            target: fwnp_proto::Target::Ports {
                protocol: fwnp_proto::Protocol::Udp,
                ports: fwnp_proto::PortRange::single(7001),
            },
            ..tcp(7001)
        },
        None,
    ))
    .lease;
    gw.policy = Policy::from_str(&POLICY.replace("\"udp/7000-7999\"", "\"tcp/7500\""), "test")
        .expect("compiles");
    let id = host.id();
    let out = gw.exchange(
        &mut host,
        &codec::encode(&Message::Renew(fwnp_proto::Renew {
            common: common(Some(id)),
            lease,
            lifetime: None,
        })),
    );
    assert_eq!(denied(out.answer).code, ResultCode::DeniedByPolicy);
    assert!(gw.core.book().get(&lease).is_none(), "revoked at once");
    // Kernel, store, then the host's notice: the order of a revocation.
    assert!(matches!(
        out.effects[0],
        Effect::Unhold {
            kill_connections: true,
            ..
        }
    ));
    assert!(matches!(
        commits(&out.effects)[0],
        Write::End {
            end: fwnp_proto::gateway::request::LeaseEnd::Revoked(RevokeReason::PolicyChanged),
            ..
        }
    ));
    assert!(out.effects.iter().any(|e| matches!(
        e,
        Effect::Notify { notice: Message::Revoked(r), .. } if r.lease == lease && r.reason == RevokeReason::PolicyChanged
    )));
}

#[test]
fn leases_expire_at_their_expiry_with_their_ends_as_effects() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let lease = granted(gw.open(&mut host, tcp(7001), Some(60))).lease;
    assert_eq!(gw.core.next_expiry(), Some(START_MS + 60_000));
    assert!(gw.core.expire_due(START_MS + 59_999).is_empty());
    let effects = gw.core.expire_due(START_MS + 60_000);
    assert!(
        matches!(effects[0], Effect::Unhold { lease: l, kill_connections: false, .. } if l == lease)
    );
    assert!(matches!(
        commits(&effects)[0],
        Write::End {
            end: fwnp_proto::gateway::request::LeaseEnd::Expired,
            ..
        }
    ));
    assert!(gw.core.book().is_empty());
}

#[test]
fn an_operator_revocation_gives_the_notice_to_deliver() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let lease = granted(gw.open(&mut host, tcp(7001), None)).lease;
    let long = "x".repeat(2000);
    let revocation = gw
        .core
        .revoke(
            START_MS,
            &lease,
            RevokeReason::Operator,
            "operator",
            Some(long),
        )
        .expect("live");
    let Message::Revoked(notice) = &revocation.notice else {
        panic!("a Revoked notice");
    };
    assert_eq!(notice.lease, lease);
    assert!(
        notice
            .text
            .as_ref()
            .is_some_and(|t| t.len() <= fwnp_proto::validate::MAX_REASON_LEN),
        "the reason is fitted to the schema"
    );
    assert!(
        gw.core
            .revoke(START_MS, &lease, RevokeReason::Operator, "operator", None)
            .is_none()
    );
}

/// The gateway's policy, counting how often each question is asked.
struct Counting<'a> {
    policy: &'a Policy,
    evaluations: std::cell::Cell<u32>,
    renewals: std::cell::Cell<u32>,
}

impl Decide for Counting<'_> {
    fn host_limits(&self, identity: &str, addresses: &[IpAddr]) -> HostLimits {
        Decide::host_limits(self.policy, identity, addresses)
    }

    fn evaluate(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        hosts: &[IpAddr],
        open: &fwnp_proto::Open,
    ) -> Decision {
        self.evaluations.set(self.evaluations.get() + 1);
        Decide::evaluate(self.policy, identity, addresses, hosts, open)
    }

    fn still_allows(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        grants: &[fwnp_proto::Grant],
    ) -> Result<fwnp_proto::gateway::LifetimePolicy, Objection> {
        self.renewals.set(self.renewals.get() + 1);
        Decide::still_allows(self.policy, identity, addresses, grants)
    }
}

#[test]
fn the_policy_decides_an_open_once_before_the_book_and_the_book_decides_after() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    granted(gw.open(&mut host, tcp(7001), None));
    granted(gw.open(&mut host, tcp(7002), None));
    let config = CoreConfig {
        epoch: EPOCH,
        max_streams: 16,
        kill_connections: true,
    };
    let decide = Counting {
        policy: &gw.policy,
        evaluations: Default::default(),
        renewals: Default::default(),
    };
    let peer = Peer {
        identity: Some(&host.identity),
        no_identity: "",
        remote: SocketAddr::new(HOST_A, 40000),
        addresses: &host.addresses,
    };
    let prepare = |message: &Message| {
        RequestCore::prepare(
            &config,
            gw.now_ms,
            host.state,
            &peer,
            &codec::encode(message),
            &decide,
        )
    };
    // Two Opens the policy allows, prepared side by side as two connections' would be, while
    // the host holds two of its three leases: each is evaluated once, neither answered yet.
    let third = prepare(&open_msg(Some(20), tcp(7003), None))
        .into_answer()
        .expect_err("an allowed Open waits for the book");
    let fourth = prepare(&open_msg(Some(21), tcp(7004), None))
        .into_answer()
        .expect_err("an allowed Open waits for the book");
    assert_eq!(decide.evaluations.get(), 2);
    // A refused Open and a second Hello are answered without the book.
    let refused = prepare(&open_msg(Some(22), tcp(23), None))
        .into_answer()
        .expect("a refused Open needs no book");
    assert_eq!(denied(refused.message).code, ResultCode::DeniedByPolicy);
    let again = prepare(&hello_msg(Some(23), &[1], Capabilities::ALL))
        .into_answer()
        .expect("a second Hello needs no book");
    assert_eq!(denied(again.message).code, ResultCode::MalformedRequest);
    assert_eq!(decide.evaluations.get(), 3);
    let before = gw.core.book().len();
    assert_eq!(before, 2);

    // Under the lock the book takes the first and refuses the second over the quota, which
    // only it knows; the policy is not asked again.
    let Step::Pending(pending) =
        gw.core
            .handle_prepared(gw.now_ms, &peer, third, &decide, &mut gw.rng)
    else {
        panic!("the third lease is within the quota");
    };
    granted(gw.core.finish(gw.now_ms, pending, Ok(())).message);
    let Step::Answer(answer) =
        gw.core
            .handle_prepared(gw.now_ms, &peer, fourth, &decide, &mut gw.rng)
    else {
        panic!("the fourth lease is over the quota");
    };
    assert_eq!(denied(answer.message).code, ResultCode::QuotaExceeded);
    assert_eq!(decide.evaluations.get(), 3);
    assert_eq!(gw.core.book().len(), 3);

    // A Renew asks the policy about the lease's grants, which only the book has.
    let lease = gw.core.book().leases_of(&host.identity).next().unwrap().id;
    let renew = prepare(&Message::Renew(fwnp_proto::Renew {
        common: common(Some(24)),
        lease,
        lifetime: None,
    }))
    .into_answer()
    .expect_err("a Renew waits for the book");
    assert_eq!(decide.renewals.get(), 0);
    assert!(matches!(
        gw.core
            .handle_prepared(gw.now_ms, &peer, renew, &decide, &mut gw.rng),
        Step::Pending(_)
    ));
    assert_eq!((decide.evaluations.get(), decide.renewals.get()), (3, 1));
}

/// A renewal is clamped to the bounds of the rule that allowed the lease (spec Section 11.2),
/// not to the widest of the host's rules: a host that may hold ssh for five minutes and a web
/// port for a day could otherwise renew its ssh opening for a day.
#[test]
fn a_renewal_is_bounded_by_the_rule_that_allowed_the_lease() {
    let policy = r#"
[defaults]
lifetime = "1m"
max_lifetime = "1h"

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "ssh"
groups = ["hosts"]
allow = "tcp/22"
max_lifetime = "5m"

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/8080"
max_lifetime = "1d"
"#;
    let mut gw = Gateway::new(policy);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let ssh = granted(gw.open(&mut host, tcp(22), Some(86_400)));
    assert_eq!(ssh.lifetime, 300);
    let renewed = granted(gw.renew(&mut host, ssh.lease, Some(86_400)));
    assert_eq!(
        renewed.lifetime, 300,
        "the ssh rule's maximum, not the web rule's"
    );
    let web = granted(gw.open(&mut host, tcp(8080), Some(86_400)));
    assert_eq!(web.lifetime, 86_400);
    assert_eq!(
        granted(gw.renew(&mut host, web.lease, Some(86_400))).lifetime,
        86_400
    );
}

/// A lease of an application is renewed within the bounds of the rule that allows the
/// application, even where another rule allows one of its entries with other bounds.
#[test]
fn an_application_lease_is_renewed_within_its_own_rule() {
    let policy = r#"
[defaults]
lifetime = "1m"
max_lifetime = "1h"

[applications]
https = ["tcp/443", "udp/443"]

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "short-tls"
groups = ["hosts"]
allow = "tcp/443"
max_lifetime = "5m"

[[rule]]
name = "web"
groups = ["hosts"]
allow = ["app:https"]
max_lifetime = "1d"
"#;
    let mut gw = Gateway::new(policy);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let https = granted(gw.open(&mut host, app("https"), Some(86_400)));
    assert_eq!(https.lifetime, 86_400);
    let renewed = granted(gw.renew(&mut host, https.lease, Some(86_400)));
    assert_eq!(
        renewed.lifetime, 86_400,
        "the application's rule, not the entry's"
    );
}

/// An address the host does not hold is refused `address-mismatch` before the policy's rules
/// are read (step 6 of spec 11.3, before step 8): a deny rule for the port, or a refusal on the
/// host's own address named beside it, would otherwise answer `denied-by-policy`. A host with
/// third-party rights is judged by the rules.
#[test]
fn an_address_the_host_does_not_hold_is_refused_before_the_rules() {
    let mut gw = Gateway::new(POLICY);
    let mut web = gw.welcomed("web-01", &[HOST_A]);
    let named = |port, hosts: Vec<IpAddr>| {
        let mut opening = tcp(port);
        opening.host = fwnp_proto::HostAddresses::from_addresses(hosts);
        opening
    };
    // tcp/23 is denied by the rule "no-telnet" for every host.
    let d = denied(gw.open(&mut web, named(23, vec![HOST_B]), None));
    assert_eq!(d.code, ResultCode::AddressMismatch, "{d:?}");
    let d = denied(gw.open(&mut web, named(23, vec![HOST_A, HOST_B]), None));
    assert_eq!(d.code, ResultCode::AddressMismatch, "{d:?}");
    // tcp/9999 is allowed by no rule: its own address is denied-by-policy.
    let d = denied(gw.open(&mut web, named(9999, vec![HOST_A, HOST_B]), None));
    assert_eq!(d.code, ResultCode::AddressMismatch, "{d:?}");
    let d = denied(gw.open(&mut web, named(23, vec![HOST_A]), None));
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");

    // A balancer holds third-party rights: the rules judge its foreign addresses.
    let mut lb = gw.welcomed("lb-01", &[HOST_B]);
    let pool: IpAddr = "203.0.113.5".parse().unwrap();
    let d = denied(gw.open(&mut lb, named(23, vec![pool]), None));
    assert_eq!(d.code, ResultCode::DeniedByPolicy, "{d:?}");
    granted(gw.open(&mut lb, named(8080, vec![pool]), None));
}

/// A request of the largest size may list some 5,000 critical keys the gateway does not know;
/// its Denied `unsupported-option` still fits in an answer (spec Section 5.4): key 7 keeps the
/// smallest keys, as many as fit, in ascending order. A few such keys are all listed.
#[test]
fn an_answer_listing_unsupported_critical_keys_fits_in_an_answer() {
    let mut gw = Gateway::new(POLICY);
    let mut host = gw.welcomed("web-01", &[HOST_A]);
    let list_critical = |keys: std::ops::Range<u64>| {
        let critical = keys.map(|k| ciborium::Value::Integer(k.into())).collect();
        let map = ciborium::Value::Map(vec![
            (0.into(), 6.into()),
            (1.into(), 1.into()),
            (2.into(), ciborium::Value::Array(critical)),
        ]);
        let mut bytes = Vec::new();
        ciborium::into_writer(&map, &mut bytes).unwrap();
        bytes
    };
    // Keys of three bytes from 256 on: as many as a request of the largest size holds.
    let mut last = 256 + 5_000;
    while list_critical(256..last + 1).len() <= MAX_MESSAGE_SIZE {
        last += 1;
    }
    let request = list_critical(256..last);
    assert!(request.len() <= MAX_MESSAGE_SIZE && request.len() > MAX_MESSAGE_SIZE - 3);
    let answer = gw.exchange(&mut host, &request).answer;
    let encoded = codec::encode(&answer);
    assert!(encoded.len() <= MAX_MESSAGE_SIZE, "{} bytes", encoded.len());
    let d = denied(answer);
    assert_eq!(d.code, ResultCode::UnsupportedOption);
    assert!(d.unsupported.len() > 4_000, "{} keys", d.unsupported.len());
    assert!(d.unsupported.len() < (last - 256) as usize);
    assert_eq!(
        d.unsupported,
        (256..256 + d.unsupported.len() as u64).collect::<Vec<_>>()
    );

    let d = denied(gw.exchange(&mut host, &list_critical(64..70)).answer);
    assert_eq!(d.unsupported, (64..70).collect::<Vec<_>>());
    assert!(
        d.reason
            .is_some_and(|r| r.contains("[64, 65, 66, 67, 68, 69]"))
    );
}
