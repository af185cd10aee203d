//! The gateway's pure lease logic: idempotent re-open, quotas, ownership, clamping, renewal,
//! release, revocation, expiry ordering over many leases, and restore from a store.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use fwnp_proto::gateway::{
    LeaseBook, LifetimePolicy, OpenOutcome, PolicyFacts, Refusal, resolve_host_addresses,
};
use fwnp_proto::{
    AppInfo, Common, Grant, HostAddresses, LeaseId, MAX_LIFETIME_SECS, Open, Opening, PortRange,
    Prefix, Protocol, ResultCode, RevokeReason, Target,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HOST_A: &str = "fwnp://host/a";
const HOST_B: &str = "spiffe://example.org/host/b";
const ADDR_A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const ADDR_B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
const NOW: u64 = 1_700_000_000_000;
const POLICY: LifetimePolicy = LifetimePolicy {
    min: 60,
    max: 3600,
    default: 600,
};

fn open_tcp(port: u16, lifetime: Option<u32>) -> Open {
    Open {
        common: Common {
            request_id: Some(u64::from(port)),
            critical: Vec::new(),
        },
        opening: Opening {
            target: Target::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(port),
            },
            host: HostAddresses::Default,
            family: None,
            remotes: Vec::new(),
        },
        lifetime,
        app: None,
    }
}

fn tcp_grant(host: IpAddr, port: u16) -> Grant {
    Grant {
        protocol: Protocol::Tcp,
        ports: PortRange::single(port),
        host,
        remotes: Vec::new(),
        app: None,
    }
}

/// The facts a policy allowing exactly what was asked would produce.
fn facts(host: IpAddr, port: u16, max_leases: Option<u32>) -> PolicyFacts {
    PolicyFacts {
        grants: vec![tcp_grant(host, port)],
        grants_narrowed: false,
        lifetime: POLICY,
        max_leases,
    }
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(0xF00D)
}

fn new_lease(outcome: Result<OpenOutcome, Refusal>) -> LeaseId {
    match outcome {
        Ok(OpenOutcome::NewLease(grant)) => grant.lease.id,
        other => panic!("expected a new lease, got {other:?}"),
    }
}

#[test]
fn a_new_lease_gets_a_fresh_id_and_the_granted_answer_says_everything() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let open = open_tcp(443, Some(120));
    let outcome = book
        .open(NOW, HOST_A, &open, &facts(ADDR_A, 443, None), &mut rng)
        .expect("granted");
    let OpenOutcome::NewLease(grant) = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(grant.lease.lifetime, 120);
    assert_eq!(grant.lease.expires_ms, NOW + 120_000);
    assert_eq!(grant.lease.created_ms, NOW);
    assert_eq!(&*grant.lease.host, HOST_A);
    assert!(!grant.narrowed);
    let granted = grant.to_granted(Some(443), 77);
    assert_eq!(granted.common.request_id, Some(443));
    assert_eq!(granted.renew_after, 60);
    assert_eq!(granted.epoch, 77);
    assert_eq!(granted.expires_ms, NOW + 120_000);
    assert_eq!(granted.grants, vec![tcp_grant(ADDR_A, 443)]);
    // Another lease gets another id.
    let second = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(80, None),
        &facts(ADDR_A, 80, None),
        &mut rng,
    ));
    assert_ne!(second, grant.lease.id);
    assert_eq!(book.len(), 2);
    assert_eq!(book.lease_count(HOST_A), 2);
}

#[test]
fn lease_ids_start_with_their_creation_time_and_end_in_random_bits() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let mut ids = Vec::new();
    // Two in the same millisecond, then one a millisecond and one a day later.
    for (i, now) in [NOW, NOW, NOW + 1, NOW + 86_400_000]
        .into_iter()
        .enumerate()
    {
        let port = 1000 + i as u16;
        ids.push(new_lease(book.open(
            now,
            HOST_A,
            &open_tcp(port, None),
            &facts(ADDR_A, port, None),
            &mut rng,
        )));
    }
    for (id, now) in ids.iter().zip([NOW, NOW, NOW + 1, NOW + 86_400_000]) {
        assert_eq!(id.0[..6], now.to_be_bytes()[2..], "{id}");
    }
    // Made later, sorted later: a store's index of ids grows at its end.
    assert!(ids[1] < ids[2] && ids[2] < ids[3], "{ids:?}");
    // Within one millisecond the 80 random bits tell them apart.
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[0].0[6..], ids[1].0[6..]);
}

#[test]
fn idempotent_reopen_extends_the_same_lease_without_using_quota() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let first = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(443, Some(600)),
        &facts(ADDR_A, 443, Some(1)),
        &mut rng,
    ));
    // Same host, same grants, later, asking for less: same id, expiry max(old, now + granted).
    let later = NOW + 100_000;
    let outcome = book
        .open(
            later,
            HOST_A,
            &open_tcp(443, Some(120)),
            &facts(ADDR_A, 443, Some(1)),
            &mut rng,
        )
        .expect("extended despite a quota of one");
    let OpenOutcome::Extended {
        grant,
        previous_expires_ms,
        previous_lifetime,
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(grant.lease.id, first);
    assert_eq!(previous_expires_ms, NOW + 600_000);
    assert_eq!(previous_lifetime, 600);
    assert_eq!(grant.lease.expires_ms, NOW + 600_000, "never shortened");
    // Asking for more moves the expiry out.
    let outcome = book
        .open(
            later,
            HOST_A,
            &open_tcp(443, Some(3000)),
            &facts(ADDR_A, 443, Some(1)),
            &mut rng,
        )
        .expect("extended");
    assert_eq!(outcome.grant().lease.id, first);
    assert_eq!(outcome.grant().lease.expires_ms, later + 3_000_000);
    assert_eq!(book.next_expiry(), Some(later + 3_000_000));
    assert_eq!(book.len(), 1);
    assert_eq!(book.lease_count(HOST_A), 1);
    // A different opening does need quota, and there is none left.
    let refused = book.open(
        later,
        HOST_A,
        &open_tcp(80, None),
        &facts(ADDR_A, 80, Some(1)),
        &mut rng,
    );
    assert_eq!(
        refused.map_err(|r| r.code()),
        Err(ResultCode::QuotaExceeded)
    );
    // The same grants in another order, with duplicated prefixes, are the same opening.
    let p1 = Prefix {
        addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 0)),
        len: 24,
    };
    let p2 = Prefix {
        addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)),
        len: 24,
    };
    let two = |remotes: Vec<Prefix>, order_swapped: bool| {
        let mut g = vec![
            Grant {
                remotes: remotes.clone(),
                ..tcp_grant(ADDR_A, 8443)
            },
            Grant {
                protocol: Protocol::Udp,
                remotes,
                ..tcp_grant(ADDR_A, 8443)
            },
        ];
        if order_swapped {
            g.reverse();
        }
        PolicyFacts {
            grants: g,
            grants_narrowed: false,
            lifetime: POLICY,
            max_leases: None,
        }
    };
    let id = new_lease(book.open(
        NOW,
        HOST_B,
        &open_tcp(8443, None),
        &two(vec![p1, p2], false),
        &mut rng,
    ));
    let again = book.open(
        NOW,
        HOST_B,
        &open_tcp(8443, None),
        &two(vec![p2, p1, p2], true),
        &mut rng,
    );
    assert!(matches!(again, Ok(OpenOutcome::Extended { grant, .. }) if grant.lease.id == id));
}

#[test]
fn the_same_opening_from_another_host_is_another_lease() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    // Host B with third-party rights asks for exactly A's grants: still its own lease.
    let a = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(22, None),
        &facts(ADDR_A, 22, None),
        &mut rng,
    ));
    let b = new_lease(book.open(
        NOW,
        HOST_B,
        &open_tcp(22, None),
        &facts(ADDR_A, 22, None),
        &mut rng,
    ));
    assert_ne!(a, b);
    assert_eq!(book.owned(HOST_A, &a).map(|l| l.id), Some(a));
    assert_eq!(book.owned(HOST_B, &b).map(|l| l.id), Some(b));
}

#[test]
fn quota_counts_live_leases_and_frees_on_release() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let ids: Vec<LeaseId> = (1..=3)
        .map(|port| {
            new_lease(book.open(
                NOW,
                HOST_A,
                &open_tcp(port, None),
                &facts(ADDR_A, port, Some(3)),
                &mut rng,
            ))
        })
        .collect();
    let refused = book.open(
        NOW,
        HOST_A,
        &open_tcp(4, None),
        &facts(ADDR_A, 4, Some(3)),
        &mut rng,
    );
    assert_eq!(refused, Err(Refusal::QuotaExceeded { held: 3, max: 3 }));
    // Another host is not affected by A's quota.
    new_lease(book.open(
        NOW,
        HOST_B,
        &open_tcp(4, None),
        &facts(ADDR_B, 4, Some(3)),
        &mut rng,
    ));
    book.release(NOW, HOST_A, &ids[0]).expect("owned");
    new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(4, None),
        &facts(ADDR_A, 4, Some(3)),
        &mut rng,
    ));
    // A quota of zero refuses everything.
    let refused = book.open(
        NOW,
        HOST_B,
        &open_tcp(5, None),
        &facts(ADDR_B, 5, Some(0)),
        &mut rng,
    );
    assert_eq!(
        refused.map_err(|r| r.code()),
        Err(ResultCode::QuotaExceeded)
    );
}

/// A lease past its expiry is not held, even before the expiry timer takes it out of the book:
/// it does not count against the quota (spec 11.3 step 11).
#[test]
fn a_lease_past_its_expiry_does_not_count_against_the_quota() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    for (port, lifetime) in [(1, Some(POLICY.min)), (2, None), (3, None)] {
        new_lease(book.open(
            NOW,
            HOST_A,
            &open_tcp(port, lifetime),
            &facts(ADDR_A, port, Some(3)),
            &mut rng,
        ));
    }
    let later = NOW + u64::from(POLICY.min) * 1000;
    new_lease(book.open(
        later,
        HOST_A,
        &open_tcp(4, None),
        &facts(ADDR_A, 4, Some(3)),
        &mut rng,
    ));
    let refused = book.open(
        later,
        HOST_A,
        &open_tcp(5, None),
        &facts(ADDR_A, 5, Some(3)),
        &mut rng,
    );
    assert_eq!(refused, Err(Refusal::QuotaExceeded { held: 3, max: 3 }));
}

#[test]
fn only_the_owner_may_renew_or_release() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let a = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(443, None),
        &facts(ADDR_A, 443, None),
        &mut rng,
    ));
    let before = book.get(&a).cloned();
    assert_eq!(
        book.renew(NOW + 1000, HOST_B, &a, None, POLICY),
        Err(Refusal::UnknownLease)
    );
    assert_eq!(
        book.release(NOW + 1000, HOST_B, &a),
        Err(Refusal::UnknownLease)
    );
    // The same answer as for a lease that does not exist at all: nothing leaks.
    let missing = LeaseId([7; 16]);
    assert_eq!(
        book.renew(NOW, HOST_A, &missing, None, POLICY),
        Err(Refusal::UnknownLease)
    );
    assert_eq!(
        book.release(NOW, HOST_A, &missing),
        Err(Refusal::UnknownLease)
    );
    assert_eq!(Refusal::UnknownLease.code(), ResultCode::UnknownLease);
    assert_eq!(book.get(&a).cloned(), before, "A's lease untouched");
    assert_eq!(book.leases_of(HOST_B).count(), 0);
    // The owner can.
    book.renew(NOW + 1000, HOST_A, &a, None, POLICY)
        .expect("owner renews");
    let released = book
        .release(NOW + 2000, HOST_A, &a)
        .expect("owner releases");
    assert_eq!(released.id, a);
    assert!(book.is_empty());
    assert_eq!(book.next_expiry(), None);
    assert_eq!(book.host_count(), 0);
}

#[test]
fn lifetimes_are_clamped_and_narrowed_is_reported() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let mut open = |port: u16, lifetime: Option<u32>, narrowed_grants: bool| {
        let mut f = facts(ADDR_A, port, None);
        f.grants_narrowed = narrowed_grants;
        book.open(NOW, HOST_A, &open_tcp(port, lifetime), &f, &mut rng)
            .map(|o| (o.grant().lease.lifetime, o.grant().narrowed))
    };
    assert_eq!(
        open(1, None, false),
        Ok((600, false)),
        "absent: the default"
    );
    assert_eq!(open(2, Some(0), false), Ok((600, false)), "0: the default");
    assert_eq!(
        open(3, Some(10), false),
        Ok((60, true)),
        "raised to the minimum"
    );
    assert_eq!(
        open(4, Some(86_400), false),
        Ok((3600, true)),
        "lowered to the maximum"
    );
    assert_eq!(open(5, Some(MAX_LIFETIME_SECS), false), Ok((3600, true)));
    assert_eq!(
        open(6, Some(300), true),
        Ok((300, true)),
        "narrowed ports or prefixes"
    );
    assert_eq!(
        open(7, Some(MAX_LIFETIME_SECS + 1), false),
        Err(Refusal::LifetimeOutOfRange {
            asked: MAX_LIFETIME_SECS + 1
        })
    );
}

/// Spec Section 11.2: a Renew asking 0 (or nothing) gets the lifetime last granted to the
/// lease, by its Open, an idempotent re-open or a Renew, not the one it was created with.
#[test]
fn a_renew_without_a_lifetime_gets_the_lifetime_last_granted() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let facts = facts(ADDR_A, 443, None);
    let id = new_lease(book.open(NOW, HOST_A, &open_tcp(443, Some(1200)), &facts, &mut rng));
    let renewed = |book: &mut LeaseBook, at: u64, asked: Option<u32>| {
        book.renew(NOW + at, HOST_A, &id, asked, POLICY)
            .expect("renewed")
            .grant
            .lease
            .lifetime
    };
    // A shorter Renew...
    assert_eq!(renewed(&mut book, 1_000, Some(120)), 120);
    // ...is what the next Renew without a lifetime gets, absent or 0.
    assert_eq!(renewed(&mut book, 2_000, None), 120);
    assert_eq!(renewed(&mut book, 3_000, Some(0)), 120);
    // An idempotent re-open grants a lifetime too, and that one is kept.
    let again = book.open(
        NOW + 4_000,
        HOST_A,
        &open_tcp(443, Some(900)),
        &facts,
        &mut rng,
    );
    assert!(
        matches!(again, Ok(OpenOutcome::Extended { .. })),
        "{again:?}"
    );
    assert_eq!(renewed(&mut book, 5_000, None), 900);
}

#[test]
fn renew_extends_from_now_and_is_clamped_by_the_current_policy() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let id = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(443, Some(1200)),
        &facts(ADDR_A, 443, None),
        &mut rng,
    ));
    // No ask: the lease's own lifetime again, from now.
    let renewed = book
        .renew(NOW + 600_000, HOST_A, &id, None, POLICY)
        .expect("renewed");
    assert_eq!(renewed.previous_expires_ms, NOW + 1_200_000);
    assert_eq!(renewed.grant.lease.expires_ms, NOW + 600_000 + 1_200_000);
    assert!(!renewed.grant.narrowed);
    assert_eq!(renewed.grant.lease.id, id);
    // The policy shrank meanwhile: clamped again, narrowed.
    let tighter = LifetimePolicy {
        min: 60,
        max: 300,
        default: 120,
    };
    let renewed = book
        .renew(NOW + 700_000, HOST_A, &id, Some(0), tighter)
        .expect("renewed");
    assert_eq!(renewed.grant.lease.lifetime, 300);
    assert_eq!(renewed.grant.lease.expires_ms, NOW + 700_000 + 300_000);
    assert!(renewed.grant.narrowed);
    assert_eq!(book.next_expiry(), Some(NOW + 1_000_000));
    // An ask above the protocol maximum is refused and changes nothing.
    assert_eq!(
        book.renew(
            NOW + 800_000,
            HOST_A,
            &id,
            Some(MAX_LIFETIME_SECS + 1),
            POLICY
        )
        .map_err(|r| r.code()),
        Err(ResultCode::LifetimeOutOfRange)
    );
    assert_eq!(book.get(&id).map(|l| l.expires_ms), Some(NOW + 1_000_000));
    // A lease past its expiry is unknown, even before expire_due reaps it.
    assert_eq!(
        book.renew(NOW + 1_000_000, HOST_A, &id, None, POLICY),
        Err(Refusal::UnknownLease)
    );
    assert_eq!(book.expire_due(NOW + 1_000_000).len(), 1);
}

#[test]
fn revoke_removes_and_says_what_to_tell_the_host() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let id = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(443, None),
        &facts(ADDR_A, 443, None),
        &mut rng,
    ));
    let lease = book.revoke(&id).expect("revoked");
    assert_eq!(&*lease.host, HOST_A);
    let notice = lease.to_revoked(RevokeReason::PolicyChanged, Some("rule web removed".into()));
    assert_eq!(notice.lease, id);
    assert_eq!(notice.reason, RevokeReason::PolicyChanged);
    assert_eq!(book.revoke(&id), None);
    assert_eq!(
        book.renew(NOW, HOST_A, &id, None, POLICY),
        Err(Refusal::UnknownLease)
    );
    assert_eq!(book.next_expiry(), None);
    // The same opening after a revocation is a new lease.
    let again = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(443, None),
        &facts(ADDR_A, 443, None),
        &mut rng,
    ));
    assert_ne!(again, id);
}

#[test]
fn nothing_granted_is_denied_by_policy() {
    let mut book = LeaseBook::new();
    let facts = PolicyFacts {
        grants: Vec::new(),
        grants_narrowed: false,
        lifetime: POLICY,
        max_leases: None,
    };
    let refused = book.open(NOW, HOST_A, &open_tcp(1, None), &facts, &mut rng());
    assert_eq!(
        refused.map_err(|r| r.code()),
        Err(ResultCode::DeniedByPolicy)
    );
}

#[test]
fn address_mismatch_unless_third_party() {
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let mut open = open_tcp(80, None);
    open.opening.host = HostAddresses::One(ADDR_B);
    let refused = resolve_host_addresses(&open.opening, &[ADDR_A, v6], false);
    assert_eq!(
        refused.map_err(|r| r.code()),
        Err(ResultCode::AddressMismatch)
    );
    assert_eq!(
        resolve_host_addresses(&open.opening, &[ADDR_A, v6], true),
        Ok(vec![ADDR_B])
    );
}

/// An IPv4-mapped IPv6 address names an IPv4 host in IPv6 clothing; granting it would program
/// an IPv6 element for an IPv4 host. It is refused on the way a request really takes: decoded,
/// validated, and, should a caller skip validation, by the host address resolution itself.
#[test]
fn ipv4_mapped_addresses_are_refused_wherever_an_opening_names_an_address() {
    use fwnp_proto::codec::{decode, encode};
    use fwnp_proto::validate::validate_request;
    let mapped: IpAddr = "::ffff:10.1.0.10".parse().unwrap();
    let ipv4: IpAddr = "10.1.0.10".parse().unwrap();
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    let mut as_host = open_tcp(443, None);
    as_host.opening.host = HostAddresses::One(mapped);
    let mut as_remote = open_tcp(443, None);
    as_remote.opening.host = HostAddresses::One(v6);
    as_remote.opening.remotes = vec![Prefix {
        addr: "::ffff:10.0.0.0".parse().unwrap(),
        len: 104,
    }];
    let mut as_remote_no_host = as_remote.clone();
    as_remote_no_host.opening.host = HostAddresses::Default;
    // In a list of addresses too.
    let mut in_list = open_tcp(443, None);
    in_list.opening.host = HostAddresses::List(vec![v6, mapped]);
    for open in [&as_host, &as_remote, &as_remote_no_host, &in_list] {
        let bytes = encode(&fwnp_proto::Message::Open(open.clone()));
        let decoded = decode(&bytes).expect("a mapped address is well-formed");
        let refused = validate_request(&decoded).expect_err("a mapped address is refused");
        assert_eq!(refused.kind(), "ipv4-mapped-address", "{open:?}");
        assert_eq!(
            refused.to_denied(open.common.request_id).code,
            ResultCode::MalformedOption
        );
    }
    // The decision core refuses it too, even for a host with third-party rights, and even when
    // the host holds the IPv4 address it maps.
    for third_party in [false, true] {
        assert_eq!(
            resolve_host_addresses(&as_host.opening, &[ipv4, v6], third_party)
                .map_err(|r| r.code()),
            Err(ResultCode::MalformedOption)
        );
    }
}

#[test]
fn many_leases_expire_in_order() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let count = 50_000u32;
    let hosts: Vec<String> = (0..500).map(|h| format!("fwnp://host/h{h}")).collect();
    for i in 0..count {
        let host = &hosts[(i % 500) as usize];
        let port = u16::try_from(i / 500 + 1).expect("small");
        let lifetime = rng.random_range(60..=3600);
        let created = NOW + u64::from(rng.random_range(0..60_000u32));
        new_lease(book.open(
            created,
            host,
            &open_tcp(port, Some(lifetime)),
            &facts(ADDR_A, port, None),
            &mut rng,
        ));
    }
    assert_eq!(book.len(), count as usize);
    assert_eq!(book.host_count(), 500);
    let earliest = book.iter().map(|l| l.expires_ms).min();
    assert_eq!(book.next_expiry(), earliest);

    let mut total = 0;
    let mut last_seen = 0;
    let mut now = NOW;
    while !book.is_empty() {
        now += 97_000;
        let expired = book.expire_due(now);
        for lease in &expired {
            assert!(lease.expires_ms <= now, "expired early");
            assert!(lease.expires_ms >= last_seen, "out of order");
            last_seen = lease.expires_ms;
        }
        total += expired.len();
        // Everything left is still live and the next expiry is the true minimum.
        assert_eq!(book.next_expiry(), book.iter().map(|l| l.expires_ms).min());
        if let Some(next) = book.next_expiry() {
            assert!(next > now);
        }
        let by_host: usize = hosts.iter().map(|h| book.lease_count(h)).sum();
        assert_eq!(by_host, book.len());
    }
    assert_eq!(total, count as usize);
    assert_eq!(book.host_count(), 0);
}

#[test]
fn expire_due_at_the_exact_expiry_and_not_before() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let id = new_lease(book.open(
        NOW,
        HOST_A,
        &open_tcp(1, Some(60)),
        &facts(ADDR_A, 1, None),
        &mut rng,
    ));
    assert!(book.expire_due(NOW + 59_999).is_empty());
    let expired = book.expire_due(NOW + 60_000);
    assert_eq!(expired.iter().map(|l| l.id).collect::<Vec<_>>(), vec![id]);
    assert!(book.expire_due(NOW + 120_000).is_empty());
}

#[test]
fn restore_loads_live_leases_and_reports_the_expired() {
    let mut rng = rng();
    let mut lease = |port: u16, expires_ms: u64, host: &str| fwnp_proto::gateway::Lease {
        id: LeaseId(rng.random()),
        host: Arc::from(host),
        grants: vec![tcp_grant(ADDR_A, port)],
        lifetime: 600,
        created_ms: NOW - 600_000,
        expires_ms,
        app: Some(Box::new(AppInfo {
            name: Some("nginx".into()),
            ..AppInfo::default()
        })),
    };
    let live = lease(443, NOW + 300_000, HOST_A);
    let dead = lease(80, NOW - 1, HOST_A);
    let at_now = lease(81, NOW, HOST_B);
    let other = lease(22, NOW + 10_000, HOST_B);
    let duplicate = fwnp_proto::gateway::Lease {
        grants: vec![tcp_grant(ADDR_A, 9)],
        ..live.clone()
    };
    let mut book = LeaseBook::new();
    let report = book.restore(
        NOW,
        [
            live.clone(),
            dead.clone(),
            at_now.clone(),
            other.clone(),
            duplicate.clone(),
        ],
    );
    assert_eq!(report.restored, 2);
    assert_eq!(report.expired, vec![dead, at_now]);
    assert_eq!(report.duplicates, vec![duplicate]);
    assert_eq!(book.next_expiry(), Some(NOW + 10_000));
    assert_eq!(
        book.leases_of(HOST_A).map(|l| l.id).collect::<Vec<_>>(),
        vec![live.id]
    );
    // A host that reconnects and opens the same thing gets its restored lease back.
    let outcome = book
        .open(
            NOW,
            HOST_A,
            &open_tcp(443, None),
            &facts(ADDR_A, 443, Some(1)),
            &mut rng,
        )
        .expect("extended");
    assert!(
        matches!(outcome, OpenOutcome::Extended { ref grant, .. } if grant.lease.id == live.id)
    );
    // The List answer for it, and nothing of the other host's.
    let answer = book.leases_answer(NOW + 1500, HOST_A, Some(5), 99);
    assert_eq!(answer.epoch, 99);
    assert_eq!(answer.common.request_id, Some(5));
    assert_eq!(
        answer.leases.iter().map(|l| l.lease).collect::<Vec<_>>(),
        vec![live.id]
    );
    let info = book.get(&live.id).expect("live").to_lease_info(NOW + 1500);
    assert_eq!(info.remaining, 598);
    assert_eq!(info.app.and_then(|a| a.name), Some("nginx".into()));
}

#[test]
fn a_lease_past_its_expiry_is_not_extended_even_before_it_is_reaped() {
    let mut book = LeaseBook::new();
    let mut rng = rng();
    let open = open_tcp(443, Some(60));
    let old = new_lease(book.open(NOW, HOST_A, &open, &facts(ADDR_A, 443, None), &mut rng));
    let later = NOW + 60_000;
    let fresh = new_lease(book.open(later, HOST_A, &open, &facts(ADDR_A, 443, None), &mut rng));
    assert_ne!(fresh, old);
    let expired = book.expire_due(later);
    assert_eq!(expired.iter().map(|l| l.id).collect::<Vec<_>>(), vec![old]);
    assert_eq!(
        book.leases_of(HOST_A).map(|l| l.id).collect::<Vec<_>>(),
        vec![fresh]
    );
}

/// Resident memory of this process in KiB (Linux), for the scale figure below.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The book at the gateway's target scale: a million leases over ten thousand hosts.
/// Run with `cargo test --release -p fwnp-proto --test gateway_logic -- --ignored --nocapture`.
#[test]
#[ignore = "a scale measurement; run in release with --ignored --nocapture"]
fn a_million_leases() {
    const HOSTS: u32 = 10_000;
    const PER_HOST: u32 = 100;
    let hosts: Vec<String> = (0..HOSTS)
        .map(|h| format!("spiffe://example.org/host/h{h:05}"))
        .collect();
    let mut rng = rng();
    let rss_before = resident_kib();
    let mut book = LeaseBook::new();
    let started = std::time::Instant::now();
    for port in 1..=PER_HOST {
        let port = u16::try_from(port).expect("small");
        for (h, host) in hosts.iter().enumerate() {
            let addr = IpAddr::V4(Ipv4Addr::from(
                0x0A00_0000 + u32::try_from(h).expect("small"),
            ));
            let lifetime = rng.random_range(60..=3600);
            let outcome = book.open(
                NOW,
                host,
                &open_tcp(port, Some(lifetime)),
                &facts(addr, port, None),
                &mut rng,
            );
            assert!(matches!(outcome, Ok(OpenOutcome::NewLease(_))));
        }
    }
    let opened = started.elapsed();
    let rss_after = resident_kib();
    assert_eq!(book.len(), (HOSTS * PER_HOST) as usize);

    // Idempotent re-opens, renewals and lookups at full size.
    let started = std::time::Instant::now();
    let mut extended = 0;
    for (h, host) in hosts.iter().enumerate().take(10_000) {
        let addr = IpAddr::V4(Ipv4Addr::from(
            0x0A00_0000 + u32::try_from(h).expect("small"),
        ));
        let outcome = book.open(
            NOW + 1,
            host,
            &open_tcp(50, None),
            &facts(addr, 50, None),
            &mut rng,
        );
        extended += usize::from(matches!(outcome, Ok(OpenOutcome::Extended { .. })));
    }
    let reopened = started.elapsed();
    assert_eq!(extended, 10_000);

    let started = std::time::Instant::now();
    let mut last = 0;
    let mut drained = 0;
    let mut now = NOW;
    while !book.is_empty() {
        now += 60_000;
        for lease in book.expire_due(now) {
            assert!(lease.expires_ms >= last && lease.expires_ms <= now);
            last = lease.expires_ms;
            drained += 1;
        }
    }
    let expired = started.elapsed();
    assert_eq!(drained, (HOSTS * PER_HOST) as usize);
    let per_lease = match (rss_before, rss_after) {
        (Some(before), Some(after)) => format!(
            "{} bytes",
            (after.saturating_sub(before) * 1024) / u64::from(HOSTS * PER_HOST)
        ),
        _ => "unknown".to_string(),
    };
    println!(
        "1,000,000 leases: opened in {opened:?}, resident memory per lease {per_lease}, \
         10,000 idempotent re-opens in {reopened:?}, all expired in order in {expired:?}"
    );
}
