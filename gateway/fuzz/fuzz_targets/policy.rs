//! Fuzzes the policy compiler (`Policy::from_str`) with arbitrary text: it must never panic,
//! every error must name the line and column it is about, and a policy that compiles must
//! render to TOML that compiles again to a policy rendering the same way. A policy that compiles
//! then judges a few requests chosen by the input: evaluation must not panic, must decide as
//! `explain` does, must grant nothing beyond the request, and what it grants must be what
//! `still_allows` (the check of live leases at renewal and reload) still allows.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fwnp_gateway::policy::{Policy, Request, Verdict};
use fwnp_proto::message::{PortRange, Prefix, Protocol, Target};
use libfuzzer_sys::fuzz_target;

const IDENTITIES: [&str; 4] = [
    "fwnp://host/web-01",
    "spiffe://example.org/relay/r1",
    "db-1.internal.example.org",
    "spiffe://Example.ORG/host/a/b",
];

fn judge(policy: &Policy, pick: &[u8]) {
    let byte = |i: usize| pick.get(i).copied().unwrap_or(0);
    let identity = IDENTITIES[usize::from(byte(0)) % IDENTITIES.len()];
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let addresses = match byte(1) % 3 {
        0 => vec![v4(192, 0, 2, 10)],
        1 => vec![
            v4(198, 51, 100, 9),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1)),
        ],
        _ => vec![v4(10, 20, 0, 7)],
    };
    let host_address = match byte(2) % 3 {
        0 => addresses[0],
        1 => v4(203, 0, 113, byte(3)),
        _ => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1)),
    };
    let apps: Vec<&str> = policy.application_ids().take(4).collect();
    let target = match byte(4) % 5 {
        0 => Target::Ports {
            protocol: Protocol::Tcp,
            ports: PortRange {
                first: 443,
                last: 443,
            },
        },
        1 => Target::Ports {
            protocol: Protocol::Udp,
            ports: PortRange {
                first: 1,
                last: 65535,
            },
        },
        2 => Target::Ports {
            protocol: Protocol::Sctp,
            ports: PortRange {
                first: u16::from(byte(5)).max(1),
                last: 200 + u16::from(byte(6)),
            },
        },
        3 if !apps.is_empty() => Target::App(apps[usize::from(byte(5)) % apps.len()].to_owned()),
        _ => Target::App("nope".to_owned()),
    };
    let remotes = match byte(7) % 4 {
        0 | 1 => vec![],
        2 => vec![Prefix {
            addr: v4(10, 99, 0, 0),
            len: 16,
        }],
        _ => vec![Prefix {
            addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0)),
            len: 48,
        }],
    };
    let lifetime = [None, Some(0), Some(1), Some(3600), Some(u32::MAX)][usize::from(byte(8)) % 5];
    let request = Request {
        identity,
        addresses: &addresses,
        host_address,
        target: &target,
        remotes: &remotes,
        lifetime,
    };
    let decision = policy.evaluate(&request);
    assert_eq!(
        policy.explain(&request).decision,
        decision,
        "explain decides otherwise"
    );
    let _ = (decision.to_string(), policy.groups_of(identity, &addresses));
    let limits = policy.limits_for(identity, &addresses);
    let Verdict::Allowed(allowance) = &decision.verdict else {
        return;
    };
    assert!(!allowance.grants.is_empty(), "allowed with nothing granted");
    assert!(allowance.max_leases <= limits.max_leases.max(allowance.max_leases));
    for grant in &allowance.grants {
        assert_eq!(grant.host, host_address);
        if let Target::Ports { protocol, ports } = &target {
            assert_eq!(grant.protocol, *protocol);
            assert!(ports.first <= grant.ports.first && grant.ports.last <= ports.last);
        }
        if !remotes.is_empty() {
            assert!(
                grant.remotes.iter().all(|r| remotes.contains(r)),
                "remotes beyond those asked"
            );
        }
    }
    let lifetime = allowance.granted_lifetime_secs;
    assert!(lifetime >= 1, "a lifetime of 0 granted");
    if let Err(e) = policy.still_allows(identity, &addresses, &allowance.grants) {
        panic!("granted what still_allows refuses: {e}\n{decision}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::from_str(text, "fuzz.toml") {
        Ok(policy) => {
            let _ = (policy.summary(), policy.warnings().len());
            let rendered = policy.to_toml();
            let again = Policy::from_str(&rendered, "rendered.toml").unwrap_or_else(|e| {
                panic!("a compiled policy renders to text that does not compile: {e}\n{rendered}")
            });
            assert_eq!(again.to_toml(), rendered, "rendering is not stable");
            // The requests are chosen by the end of the input, which a mutation of the policy's
            // text rarely touches.
            for pick in data.rchunks(9).take(4) {
                judge(&policy, pick);
            }
        }
        Err(e) => {
            assert!(
                e.line >= 1 && e.column >= 1,
                "an error without a place: {e} ({:?})",
                e.kind
            );
            let _ = e.to_string();
        }
    }
});
